//! The web console in a real headless browser (Debian's chromium through chromedriver,
//! `backflow_testkit::webdriver`), served by `backflow daemon --http 127.0.0.1:0` over real jobs:
//! the dashboard lists the VMs of a job run with their successful backups; a job started with its
//! Run now button runs and its session (asked by `local`) appears, with each VM's result on its
//! page; a restore point is verified and forgotten from its VM's page; the live view shows a
//! backup's stages with changing throughput and its bottleneck highlighted, as it runs.
//!
//! The tests write screenshots (`console-dashboard.png`, `console-live.png`, ...) to
//! `target/screenshots/`, or to `$BACKFLOW_SCREENSHOTS` (`BACKFLOW_SCREENSHOTS=docs/img` refreshes
//! the documentation's): a test run leaves the checkout as it was.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backflow_testkit::libvirt::Domain;
use backflow_testkit::webdriver::Browser;
use common::console::{ConsoleDaemon, incompressible, run_job, write_tokens};
use common::*;
use serde_json::json;

/// How long a page may take to show what a job run produced (VM backups under TCG, a loaded
/// machine): deadlines, not measurements.
const JOB_WAIT: Duration = Duration::from_secs(180);
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// Where the screenshots go: `$BACKFLOW_SCREENSHOTS` (relative to the workspace), else
/// `target/screenshots`.
fn screenshot_dir() -> PathBuf {
    let dir = match std::env::var_os("BACKFLOW_SCREENSHOTS") {
        Some(dir) => root().join(dir),
        None => root().join("target").join("screenshots"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_job(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.yaml")), body).unwrap();
}

/// What `css` matches, read in one script: each element's `data-` attributes and its text.
fn rows(browser: &Browser, css: &str) -> Vec<serde_json::Value> {
    let value = browser.execute(
        "return [...document.querySelectorAll(arguments[0])].map(e => \
         Object.assign({text: e.innerText}, e.dataset));",
        &[json!(css)],
    );
    value.as_array().cloned().unwrap_or_default()
}

/// The text of `css` inside the row `row` (a selector), if both exist.
fn cell(browser: &Browser, row: &str, css: &str) -> Option<String> {
    browser.text_of(&format!("{row} {css}"))
}

/// Clicks the first element `css` matches once it exists and is enabled.
fn click_when_ready(browser: &Browser, css: &str) {
    browser.wait_until(&format!("{css} to be enabled"), PAGE_WAIT, |b| {
        let ready = b.execute(
            "const e = document.querySelector(arguments[0]); return !!e && !e.disabled;",
            &[json!(css)],
        );
        ready.as_bool().filter(|r| *r)
    });
    let button = browser.find(css);
    browser.click(&button);
}

const VM_JOB: &str = "console-vms";

#[test]
fn the_dashboard_shows_a_job_run_and_runs_a_job_from_its_button() {
    let (vms, glob) = Domain::start_many("bf-console", 2, &[("vda", "16M")]);
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 1M 2M", 0x31 + i));
    }
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    let jobs = work.path().join("jobs");
    write_job(
        &jobs,
        VM_JOB,
        &format!(
            "name: {VM_JOB}\nrepository: {}\nvms: [\"{glob}\"]\nschedule: [\"0 3 * * *\"]\n\
             variables: {{freeze: \"off\"}}\n",
            repo.display()
        ),
    );
    // A session recorded 25 hours ago: a 03:00 run was missed, and the daemon catches it up at
    // once (the scheduled run, asked by `schedule`).
    record_old_session(&repo, VM_JOB, 25 * 3600);
    let daemon = ConsoleDaemon::start(&[], &jobs, &[], &[]);
    let browser = Browser::start().unwrap();

    // 1. The dashboard lists the job's VMs by name, each with a successful last backup.
    browser.goto(&daemon.page("/"));
    for vm in &vms {
        let row = format!("tr.vm[data-vm=\"{}\"]", vm.name());
        browser.wait_until(
            &format!("{} with a successful backup", vm.name()),
            JOB_WAIT,
            |b| b.find_opt(&format!("{row}[data-result=\"success\"]")),
        );
        let age = cell(&browser, &row, ".age").unwrap();
        assert!(
            age.contains("just now") || age.contains("ago"),
            "the age of {}'s last backup: {age:?}",
            vm.name()
        );
        assert_eq!(cell(&browser, &row, ".points").as_deref(), Some("1"));
        // Its name links to its page.
        let link = browser.find(&format!("{row} td.name a"));
        assert_eq!(
            browser.attribute(&link, "href").unwrap(),
            format!("/vms/{}", vm.name())
        );
    }
    let job_row = format!("tr.job[data-job=\"{VM_JOB}\"]");
    assert!(
        cell(&browser, &job_row, ".next")
            .unwrap()
            .starts_with("in "),
        "next runs: {:?}",
        cell(&browser, &job_row, ".next")
    );
    // The caught-up run is among the recent sessions, asked by the schedule.
    browser.wait_until("the caught-up session", PAGE_WAIT, |b| {
        rows(b, &format!("tr.session[data-job=\"{VM_JOB}\"]"))
            .into_iter()
            .find(|s| s["text"].as_str().unwrap_or("").contains("schedule"))
    });

    // 2. Run now: the job runs again (an incremental of new guest writes), and its session
    // (asked by `local`) appears.
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 6M 1M", 0x41 + i));
    }
    click_when_ready(&browser, &format!("button.run-now[data-job=\"{VM_JOB}\"]"));
    let session = browser.wait_until("the session asked from the page", JOB_WAIT, |b| {
        rows(b, &format!("tr.session[data-job=\"{VM_JOB}\"]"))
            .into_iter()
            .find(|s| {
                s["text"].as_str().unwrap_or("").ends_with("local") && s["result"] == "success"
            })
    });
    let id = session["session"].as_str().unwrap().to_owned();
    for vm in &vms {
        browser.wait_until(
            &format!("{}'s second restore point", vm.name()),
            PAGE_WAIT,
            |b| {
                cell(b, &format!("tr.vm[data-vm=\"{}\"]", vm.name()), ".points")
                    .filter(|n| n == "2")
            },
        );
    }
    browser.screenshot(&screenshot_dir().join("console-dashboard.png"));

    // Its page shows each VM's result, and who asked.
    let link = browser.find(&format!("tr.session[data-session=\"{id}\"] a"));
    browser.click(&link);
    browser.wait_until("the session page's VMs", PAGE_WAIT, |b| {
        (rows(b, "tr.vm-result").len() == vms.len()).then_some(())
    });
    for vm in &vms {
        let row = rows(
            &browser,
            &format!("tr.vm-result[data-vm=\"{}\"]", vm.name()),
        );
        assert_eq!(row.len(), 1, "{row:?}");
        assert_eq!(row[0]["result"], "success", "{row:?}");
        // What it read (the 1 MiB written since the first backup, in whole chunks) is shown.
        let text = row[0]["text"].as_str().unwrap();
        assert!(text.contains("1.00 MiB"), "{text}");
    }
    assert_eq!(browser.text_of("#requested-by").as_deref(), Some("local"));
    browser.screenshot(&screenshot_dir().join("console-session.png"));

    // 3. A VM's page: verify its newest restore point, then forget its oldest (confirmed in the
    // dialog); each action's task is followed until it ends.
    let vm = &vms[0];
    browser.goto(&daemon.page(&format!("/vms/{}", vm.name())));
    let points = browser.wait_until("the restore points", PAGE_WAIT, |b| {
        let points = rows(b, "tr.point");
        (points.len() == 2).then_some(points)
    });
    let (newest, oldest) = (
        points[0]["point"].as_str().unwrap().to_owned(),
        points[1]["point"].as_str().unwrap().to_owned(),
    );
    click_when_ready(&browser, &format!("button.verify[data-point=\"{newest}\"]"));
    browser.wait_until("the verify task to succeed", JOB_WAIT, |b| {
        b.find_opt("tr.task[data-state=\"succeeded\"]")
    });
    click_when_ready(&browser, &format!("button.forget[data-point=\"{oldest}\"]"));
    click_when_ready(&browser, "#confirm-ok");
    browser.wait_until("the forget task to succeed", JOB_WAIT, |b| {
        (rows(b, "tr.task[data-state=\"succeeded\"]").len() == 2).then_some(())
    });
    browser.wait_until("one restore point left", PAGE_WAIT, |b| {
        let points = rows(b, "tr.point");
        (points.len() == 1 && points[0]["point"] == newest.as_str()).then_some(())
    });
    let out = run_ok(
        backflow()
            .args(["snapshots", "--json", "--repo"])
            .arg(&repo),
    );
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["vm"] == vm.name())
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [newest.as_str()]);
}

const LIVE_JOB: &str = "console-live";

#[test]
fn the_live_view_shows_changing_throughput_and_the_bottleneck_during_a_backup() {
    let work = tempfile::tempdir().unwrap();
    // 32 MiB of incompressible data through zstd at level 19: a backup of some seconds, with
    // zstd its bottleneck.
    let image = work.path().join("big.raw");
    incompressible(&image, 32 << 20);
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    let jobs = work.path().join("jobs");
    write_job(
        &jobs,
        LIVE_JOB,
        &format!(
            "name: {LIVE_JOB}\nrepository: {}\nimages: [{{path: {}, name: big}}]\n\
             schedule: [\"0 3 * * *\"]\noverrides: {{zstd: {{level: 19}}}}\n",
            repo.display(),
            image.display()
        ),
    );
    let daemon = ConsoleDaemon::start(&[], &jobs, &[], &[]);
    let browser = Browser::start().unwrap();

    // Started from the dashboard; then the live view, linked from it while the run runs.
    browser.goto(&daemon.page("/"));
    click_when_ready(
        &browser,
        &format!("button.run-now[data-job=\"{LIVE_JOB}\"]"),
    );
    let live = browser.wait_until("the link to the live view", JOB_WAIT, |b| {
        b.find_opt("#live-link:not([hidden]) a")
    });
    browser.click(&live);
    browser.wait_until("a running pipeline", JOB_WAIT, |b| {
        b.find_opt(".run[data-state=\"running\"] .stage")
    });

    // Each stage's throughput, read at each update: some stage must show two different positive
    // values while the run runs, and a stage must be highlighted as the bottleneck.
    let mut seen: HashMap<String, Vec<f64>> = HashMap::new();
    let mut bottleneck = None;
    let mut shot = false;
    let changed = browser.wait_until("changing throughput of a stage", JOB_WAIT, |b| {
        let stages = b.execute(
            "const run = document.querySelector('.run[data-state=\"running\"]');\
             if (!run) return null;\
             return [...run.querySelectorAll('.stage')].map(s => ({\
               stage: s.dataset.stage,\
               bps: Number(s.querySelector('.throughput').dataset.bytesPerSecond),\
               bottleneck: s.classList.contains('bottleneck')}));",
            &[],
        );
        let stages = stages.as_array()?;
        for s in stages {
            let name = s["stage"].as_str().unwrap_or_default().to_owned();
            if s["bottleneck"] == true {
                bottleneck = Some(name.clone());
            }
            let bps = s["bps"].as_f64().unwrap_or(0.0);
            let values = seen.entry(name).or_default();
            if bps > 0.0 && values.last() != Some(&bps) {
                values.push(bps);
            }
        }
        if bottleneck.is_some() && !shot && seen.values().any(|v| !v.is_empty()) {
            b.screenshot(&screenshot_dir().join("console-live.png"));
            shot = true;
        }
        seen.iter()
            .find(|(_, v)| v.len() >= 2)
            .filter(|_| shot)
            .map(|(stage, v)| (stage.clone(), v.clone()))
    });
    eprintln!("throughput of {}: {:?} B/s", changed.0, changed.1);
    assert!(changed.1.iter().all(|v| *v > 0.0));
    assert_ne!(changed.1[0], changed.1[1]);
    let bottleneck = bottleneck.expect("a bottleneck");
    eprintln!("bottleneck: {bottleneck}; all readings: {seen:?}");
    // Channels between stages show their queue fill.
    let channels = rows(&browser, ".run .channel");
    assert!(!channels.is_empty());
    for c in &channels {
        let queued: u64 = c["queued"].as_str().unwrap().parse().unwrap();
        let capacity: u64 = c["capacity"].as_str().unwrap().parse().unwrap();
        assert!(capacity > 0 && queued <= capacity, "{c}");
    }

    // The run ends, and stays shown as ended, having succeeded.
    browser.wait_until("the run to end", JOB_WAIT, |b| {
        b.find_opt(".run[data-state=\"ended\"] .badge[data-result=\"succeeded\"]")
    });
}

#[test]
fn a_read_only_token_logs_in_and_sees_everything_but_no_button() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("small.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let jobs = dir.path().join("jobs");
    write_job(
        &jobs,
        "small",
        &format!(
            "name: small\nrepository: {}\nimages: [{{path: {}, name: small}}]\nschedule: \"0 3 * * *\"\n",
            repo.display(),
            image.display()
        ),
    );
    run_job(&jobs.join("small.yaml"));
    let (tokens, secrets) = write_tokens(dir.path(), &[("grafana", "read-only")]);
    let secret = &secrets[0];
    let daemon = ConsoleDaemon::start(&[], &jobs, &["--tokens", tokens.to_str().unwrap()], &[]);
    let browser = Browser::start().unwrap();

    // Without a session: the page says to log in; the login form takes the token.
    browser.goto(&daemon.page("/"));
    assert!(
        browser.page_text().contains("log in"),
        "{}",
        browser.page_text()
    );
    browser.goto(&daemon.page("/login"));
    browser.execute(
        "document.querySelector('input[name=token]').value = arguments[0]; \
         document.querySelector('form').submit();",
        &[json!(secret)],
    );
    browser.wait_until("the dashboard's job row", PAGE_WAIT, |b| {
        b.find_opt("tr.job[data-job=small]")
    });
    let role = browser.execute(
        "return document.querySelector('meta[name=role]').content",
        &[],
    );
    assert_eq!(role, json!("read-only"));
    browser.wait_until("the VM's row", PAGE_WAIT, |b| {
        b.find_opt("tr.vm[data-vm=small]")
    });
    assert!(
        browser
            .find_all("button.run-now, button.enable, button.disable")
            .is_empty(),
        "a read-only caller sees no button that changes something"
    );
    browser.goto(&daemon.page("/vms/small"));
    browser.wait_until("the restore point's row", PAGE_WAIT, |b| {
        b.find_opt("tr.point")
    });
    assert!(
        browser
            .find_all("button.verify, button.forget, button.restore")
            .is_empty()
    );

    // The page's own session cannot change anything either: without the CSRF header the API
    // refuses the cookie; with it, the role.
    let statuses = browser.execute(
        "const csrf = document.querySelector('meta[name=csrf]').content; \
         return Promise.all([\
           fetch('/api/jobs/small/run', {method: 'POST'}).then(r => r.status),\
           fetch('/api/jobs/small/run', {method: 'POST', headers: {'X-Backflow-CSRF': csrf}})\
             .then(r => r.status)]);",
        &[],
    );
    assert_eq!(statuses, json!([403, 403]));
    let sessions = backflow()
        .args(["sessions", "--json", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    let sessions: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    assert_eq!(
        sessions.as_array().unwrap().len(),
        1,
        "nothing ran: {sessions:#}"
    );
    browser.screenshot(&screenshot_dir().join("console-read-only.png"));
}
