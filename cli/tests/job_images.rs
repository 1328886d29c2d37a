//! Jobs of image files (raw and qcow2) through the real binary: one session, one record per
//! source, retention per source, restores equal to the sources; the daemon's log at the default
//! level; and `backflow job validate`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use backflow_testkit::qemu::{assert_images_equal, qemu_io, raw_to_qcow2};
use common::*;

/// A raw image and a qcow2 image (different data), in `dir`.
fn two_images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("web.raw");
    backflow_fixtures::generate_image(&raw, 8 << 20, 31).unwrap();
    let source = dir.join("db-source.raw");
    backflow_fixtures::generate_image(&source, 8 << 20, 32).unwrap();
    let qcow2 = dir.join("db.qcow2");
    raw_to_qcow2(&source, &qcow2);
    std::fs::remove_file(&source).unwrap();
    (raw, qcow2)
}

/// Writes `body` as the job file `name.yaml` in `dir`.
fn write_job(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, body).unwrap();
    path
}

/// The name each snapshot was stored under, by id.
fn stored_names(repo: &Path) -> Vec<(String, String)> {
    let out = run_ok(backflow().args(["snapshots", "--json", "--repo"]).arg(repo));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["vm"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_job_of_a_raw_and_a_qcow2_image_keeps_each_by_its_own_retention_and_both_restore() {
    let work = tempfile::tempdir().unwrap();
    let (raw, qcow2) = two_images(work.path());
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    // Paths relative to the job file, and one schedule as a single string.
    let file = write_job(
        work.path(),
        "images",
        &format!(
            "name: images\nrepository: repo\nimages:\n  - web.raw\n  - {{path: {}}}\n\
             retention: {{keep_last: 1}}\nschedule: \"0 3 * * *\"\n",
            qcow2.display()
        ),
    );
    let report = work.path().join("session.json");
    let mut sessions = Vec::new();
    for round in 0..2u8 {
        if round == 1 {
            // New data in both, so that each round stores something of each.
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
            f.write_all_at(&[0x5a; 65536], 1 << 20).unwrap();
            qemu_io(&qcow2, &["write -P 0x6b 2M 64k"]);
        }
        run_ok(
            backflow()
                .args(["job", "run", "--quiet", "--report"])
                .arg(&report)
                .arg(&file),
        );
        let session = read_report(&report);
        assert_eq!(session["result"], "success", "{session:#}");
        let records = session["vms"].as_array().unwrap();
        assert_eq!(records.len(), 2, "one record per source: {session:#}");
        assert_eq!(records[0]["source"], raw.display().to_string());
        assert_eq!(records[1]["source"], qcow2.display().to_string());
        // The qcow2 ran the qcow2 spec (through qemu-nbd), the raw one the image spec.
        let kinds = |r: &serde_json::Value| -> Vec<String> {
            r["report"]["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["kind"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(
            kinds(&records[0]).contains(&"image".to_owned()),
            "{session:#}"
        );
        assert!(
            kinds(&records[1]).contains(&"qemu-nbd".to_owned()),
            "{session:#}"
        );
        sessions.push(session);
    }

    // Each record is named as its snapshot is stored; the two sources are two names.
    let stored = stored_names(&repo);
    assert_eq!(
        stored.len(),
        2,
        "keep_last 1 of each of two sources: {stored:?}"
    );
    let last = &sessions[1]["vms"];
    let first = &sessions[0]["vms"];
    for i in 0..2 {
        let id = last[i]["snapshot"].as_str().unwrap();
        let name = last[i]["vm"].as_str().unwrap();
        assert!(
            stored.contains(&(id.to_owned(), name.to_owned())),
            "{id} {name} in {stored:?}"
        );
        // The second round forgot the first round's snapshot of the same source, only it.
        assert_eq!(
            last[i]["forgotten"],
            serde_json::json!([first[i]["snapshot"]])
        );
    }
    assert_ne!(last[0]["vm"], last[1]["vm"]);

    // Both restore equal to their sources.
    let out = work.path().join("web.restored");
    restore_ok(&repo, last[0]["snapshot"].as_str().unwrap(), &out);
    assert_same_file(&raw, &out);
    let out = work.path().join("db.restored");
    restore_ok(&repo, last[1]["snapshot"].as_str().unwrap(), &out);
    assert_images_equal(&out, "raw", &qcow2, "qcow2");

    // The history: two sessions of two records each, read back typed.
    let listed = run_ok(backflow().args(["sessions", "--json", "--repo"]).arg(&repo));
    let history: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    for s in history {
        assert_eq!(s["job"], "images");
        assert_eq!(s["vms"].as_array().unwrap().len(), 2);
    }
}

/// `backflow daemon --jobs DIR` at the default log level (no `--log`, no RUST_LOG): its stderr
/// lines, until it logs a line containing `until`, then SIGTERM and every line to its exit.
fn daemon_lines_at_default_level(jobs: &Path, until: &str) -> Vec<String> {
    let mut child = backflow()
        .args(["daemon", "--http", "127.0.0.1:0", "--jobs"])
        .arg(jobs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("daemon: {line}");
            let _ = tx.send(line);
        }
    });
    // Every line, escape sequences (colours on some builds) removed, until `until`.
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !lines.last().is_some_and(|l: &String| l.contains(until)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no line with {until:?}: {e}; {lines:#?}"));
        lines.push(plain(&line));
    }
    sigterm(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)).code(),
        Some(0)
    );
    reader.join().unwrap();
    lines.extend(rx.try_iter().map(|l| plain(&l)));
    lines
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_daemon_logs_each_run_start_and_end_with_outcome_and_next_run_at_the_default_level() {
    let work = tempfile::tempdir().unwrap();
    let (raw, _) = two_images(work.path());
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    let jobs = work.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    write_job(
        &jobs,
        "hourly",
        &format!(
            "name: hourly\nrepository: {}\nimages: [{}]\nschedule: \"0 * * * *\"\n",
            repo.display(),
            raw.display()
        ),
    );
    // A session two hours ago: the daemon owes the job a run at once.
    record_old_session(&repo, "hourly", 7200);
    let lines = daemon_lines_at_default_level(&jobs, "Session ended.");
    let all = lines.join("\n");
    let started: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("Session started.") && l.contains("job=hourly"))
        .collect();
    let ended: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("Session ended.") && l.contains("job=hourly"))
        .collect();
    assert_eq!((started.len(), ended.len()), (1, 1), "{all}");
    let ended = ended[0];
    // The next run: the next full hour, in UTC, as people write it.
    assert!(
        ended.contains("outcome=success")
            && ended.contains("took=")
            && ended.contains(":00:00 UTC"),
        "{ended}"
    );
    assert!(ended.contains("next=20"), "{ended}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Job loaded.") && l.contains("next=20")),
        "{all}"
    );
    assert!(!all.contains("Some("), "{all}");
}

/// `backflow job validate FILE`: its output.
fn validate(file: &Path) -> std::process::Output {
    backflow()
        .args(["job", "validate"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn job_validate_checks_repository_spec_variables_cron_and_patterns_and_prints_next_runs() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    let nowhere = format!("bf-validate-{}-none-*", std::process::id());
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // A pattern that matches no VM now: a warning, exit 0, and three run times per schedule.
    let file = write_job(
        work.path(),
        "fine",
        &format!(
            "name: fine\nrepository: {}\nvms: [\"{nowhere}\"]\nschedule: [\"30 2 * * *\", \
             \"0 4 * * 0\"]\n",
            repo.display()
        ),
    );
    let out = validate(&file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("warning: vms: `{nowhere}` matches no VM")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let nightly = stdout
        .lines()
        .find(|l| l.contains("schedule \"30 2 * * *\""))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(nightly.matches(" 02:30:00 UTC").count(), 3, "{nightly}");
    let sundays = stdout
        .lines()
        .find(|l| l.contains("schedule \"0 4 * * 0\""))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(sundays.matches(" 04:00:00 UTC").count(), 3, "{sundays}");

    // Each mistake: exit 2, its file and what is wrong.
    let file_of = |name: &str, body: String| write_job(work.path(), name, &body);
    let cases = [
        (
            file_of(
                "norepo",
                format!(
                    "name: norepo\nrepository: {}\nvms: [\"{nowhere}\"]\n",
                    work.path().join("missing").display()
                ),
            ),
            ":",
            vec!["repository:", "backflow init --repo"],
        ),
        (
            file_of(
                "undeclared",
                format!(
                    "name: undeclared\nrepository: {}\nvms: [\"{nowhere}\"]\n\
                     variables: {{checkpont: nightly}}\n",
                    repo.display()
                ),
            ),
            ":4:",
            vec![
                "variables.checkpont",
                "specs/backup-vm.yaml (built in) declares no variable `checkpont`",
            ],
        ),
        (
            file_of(
                "seconds",
                format!(
                    "name: seconds\nrepository: {}\nvms: [\"{nowhere}\"]\n\
                     schedule: \"0 30 2 * * *\"\n",
                    repo.display()
                ),
            ),
            ":4:",
            vec!["schedule `0 30 2 * * *` has 6 fields", "no seconds field"],
        ),
        (
            file_of(
                "noimage",
                format!(
                    "name: noimage\nrepository: {}\nimages: [{}]\n",
                    repo.display(),
                    work.path().join("no.raw").display()
                ),
            ),
            ":",
            vec!["images:", "no.raw", "No such file"],
        ),
    ];
    for (file, at, what) in cases {
        let out = validate(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            file.display(),
            text(&out)
        );
        // Warnings (a pattern that matches no VM) come first; the error is the first other line,
        // after the program's name.
        let first = stderr
            .lines()
            .find(|l| !l.contains("warning: "))
            .unwrap_or_default();
        let first = first.strip_prefix("backflow: ").unwrap_or(first);
        assert!(
            first.starts_with(&format!("{}{at}", file.display()))
                && what.iter().all(|w| first.contains(w)),
            "{}: {stderr}",
            file.display()
        );
        assert!(out.stdout.is_empty(), "{}", text(&out));
    }
}
