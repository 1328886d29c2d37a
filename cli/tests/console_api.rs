//! The daemon's console as scripts and Prometheus use it: the HTTP API and `/metrics` following
//! a real job run (scraped during and after the run, and parsed by `promtool check metrics`),
//! actions on restore points (verify, restore compared byte for byte, forget) recorded with who
//! asked, enable/disable kept across restarts; tokens, roles and TLS on an address other than
//! loopback (in a network namespace of the test's own); and the OpenAPI document checked against
//! the running server by schemathesis.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backflow_testkit::tools;
use common::backflow;
use common::console::{ConsoleDaemon as Daemon, incompressible, run_job, write_tokens};
use serde_json::Value;

/// One HTTP request through curl: (status, body).
struct Http<'a> {
    wrap: &'a [&'a str],
    cacert: Option<&'a Path>,
}

impl Http<'_> {
    fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[&str],
        body: Option<&str>,
    ) -> (u16, String) {
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("curl");
                c
            }
            None => Command::new("curl"),
        };
        cmd.args([
            "-s",
            "-S",
            "--max-time",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ]);
        if let Some(ca) = self.cacert {
            cmd.arg("--cacert").arg(ca);
        }
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(body) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let out = cmd.arg(url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn get(&self, url: &str, headers: &[&str]) -> (u16, String) {
        self.request("GET", url, headers, None)
    }

    fn json(&self, url: &str, headers: &[&str]) -> Value {
        let (status, body) = self.get(url, headers);
        assert_eq!(status, 200, "GET {url}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
    }
}

const LOCAL: Http<'static> = Http {
    wrap: &[],
    cacert: None,
};
/// What unsafe requests of a local console carry.
const CSRF: &str = "X-Backflow-CSRF: 1";

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `promtool check metrics` on the text: it must parse and lint clean.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new(tools::promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample whose name is `name` and whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric = series.split('{').next().unwrap_or("");
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// A repository and a job backing up one image of `size` bytes (whole MiB) of random data.
fn image_job(dir: &Path, size: u64) -> (PathBuf, PathBuf, PathBuf) {
    let repo = dir.join("repo");
    common::init_repo(&repo, "128K");
    let image = dir.join("disk.raw");
    incompressible(&image, size);
    let jobs = dir.join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("imgs.yaml"),
        format!(
            "name: imgs\nrepository: {}\nimages: [{}]\nschedule: \"0 3 * * *\"\n",
            repo.display(),
            image.display()
        ),
    )
    .unwrap();
    (repo, image, jobs)
}

/// Waits for a task to end; returns it (failing the test when it failed).
fn task_succeeded(url: &str, accepted: &str) -> Value {
    let task: Value = serde_json::from_str(accepted).unwrap();
    let id = task["task"]["id"].as_u64().unwrap();
    let done = wait_until("the task's end", Duration::from_secs(120), || {
        let t = LOCAL.json(&format!("{url}/api/tasks/{id}"), &[]);
        (t["state"] != "running").then_some(t)
    });
    assert_eq!(done["state"], "succeeded", "{done:#}");
    done
}

#[test]
fn the_api_and_metrics_follow_a_real_job_and_its_restore_points() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, image, jobs) = image_job(dir.path(), 48 << 20);
    let restores = dir.path().join("restores");
    let pause = dir.path().join("paused");
    let image_name = image.display().to_string();
    // A cluster job beside it: its cluster and hosts are listed (nothing is asked of them).
    std::fs::write(
        dir.path().join("cluster.yaml"),
        "name: lab\nhosts:\n  - {name: h1, address: 10.77.3.11}\n  - {name: h2, address: kvm2.example.com, worker: {enabled: false}}\n",
    )
    .unwrap();
    std::fs::write(
        jobs.join("site.yaml"),
        format!(
            "name: site\ncluster: {}\nrepository: {}\nvms: [\"*\"]\n",
            dir.path().join("cluster.yaml").display(),
            repo.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(
        &[],
        &jobs,
        &[
            "--http",
            "127.0.0.1:0",
            "--restore-dir",
            restores.to_str().unwrap(),
        ],
        &[("BACKFLOW_PAUSE_BEFORE_COMMIT", &pause)],
    );
    let url = daemon.url.clone();
    let clusters = LOCAL.json(&format!("{url}/api/clusters"), &[]);
    assert_eq!(clusters[0]["name"], "lab", "{clusters:#}");
    assert_eq!(clusters[0]["jobs"], serde_json::json!(["site"]));
    let hosts: Vec<(&str, bool)> = clusters[0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap(),
                h["worker_enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(hosts, [("h1", true), ("h2", false)]);

    // Nothing ran yet: the job is there, no VM has a restore point.
    let jobs_now = LOCAL.json(&format!("{url}/api/jobs"), &[]);
    assert_eq!(jobs_now[0]["name"], "imgs");
    assert_eq!(
        jobs_now[1]["cluster"],
        dir.path().join("cluster.yaml").to_str().unwrap()
    );
    assert_eq!(jobs_now[0]["enabled"], true);
    assert!(jobs_now[0]["last_session"].is_null());

    // A POST without the CSRF header, or from another site's page, or for another Host, is
    // refused; with it, the run starts.
    let run = format!("{url}/api/jobs/imgs/run");
    let (status, body) = LOCAL.request("POST", &run, &[], None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"csrf\""), "{body}");
    let (status, body) = LOCAL.request("POST", &run, &[CSRF, "Origin: http://evil.example"], None);
    assert_eq!(status, 403, "{body}");
    let (status, body) = LOCAL.get(&format!("{url}/api/jobs"), &["Host: evil.example"]);
    assert_eq!((status, body.contains("bad_host")), (403, true), "{body}");
    let (status, body) = LOCAL.request("POST", &run, &[CSRF], None);
    assert_eq!(status, 202, "{body}");

    // During the run (paused before its commit): the pipeline is live, and /metrics says so.
    wait_until(
        "the pause before the commit",
        Duration::from_secs(120),
        || pause.exists().then_some(()),
    );
    let live = LOCAL.json(&format!("{url}/api/pipelines"), &[]);
    let run_live = &live.as_array().unwrap()[0];
    assert!(run_live["ended"].is_null(), "{run_live:#}");
    assert_eq!(run_live["target"], image_name.as_str());
    let (_, during) = LOCAL.get(&format!("{url}/metrics"), &[]);
    promtool_check(&during);
    let run_id = run_live["id"].to_string();
    assert_eq!(
        sample(&during, "backflow_pipeline_running", &[("run", &run_id)]),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(
            &during,
            "backflow_pipeline_stage_bytes_in_total",
            &[("run", &run_id), ("kind", "zstd")]
        ),
        Some((48 << 20) as f64),
        "{during}"
    );
    assert_eq!(
        sample(&during, "backflow_job_running", &[("backflow_job", "imgs")]),
        Some(1.0)
    );
    std::fs::remove_file(&pause).unwrap();

    // After it: the session, the VM's last success, the repository.
    let session = wait_until("the session's record", Duration::from_secs(120), || {
        let jobs = LOCAL.json(&format!("{url}/api/jobs"), &[]);
        (jobs[0]["running"] == false && jobs[0]["last_session"].is_object())
            .then(|| jobs[0]["last_session"].clone())
    });
    assert_eq!(session["result"], "success", "{session:#}");
    assert_eq!(session["requested_by"], "local");
    let detail = LOCAL.json(
        &format!("{url}/api/sessions/{}", session["id"].as_str().unwrap()),
        &[],
    );
    let snapshot = detail["vms"][0]["snapshot"].as_str().unwrap().to_owned();
    assert_eq!(detail["vms"][0]["bytes_read"], 48 << 20);
    let points = LOCAL.json(
        &format!(
            "{url}/api/restore-points?vm={}",
            image_name.replace('/', "%2F")
        ),
        &[],
    );
    assert_eq!(points[0]["id"], snapshot.as_str(), "{points:#}");
    let vms = LOCAL.json(&format!("{url}/api/vms"), &[]);
    assert_eq!(vms[0]["vm"], image_name.as_str());
    assert_eq!(vms[0]["last_snapshot"], snapshot.as_str());
    assert_eq!(vms[0]["last_success"], session["ended"]);
    let repos = LOCAL.json(&format!("{url}/api/repositories"), &[]);
    assert_eq!(repos[0]["snapshots"], 1);
    assert_eq!(repos[0]["logical_bytes"], 48 << 20);
    let stored = repos[0]["stored_bytes"].as_u64().unwrap();
    // Random data: stored about as large as read, a little more for the packs' framing.
    assert!(((48 << 20)..(49 << 20)).contains(&stored), "{stored}");

    let (_, after) = LOCAL.get(&format!("{url}/metrics"), &[]);
    promtool_check(&after);
    let vm = [("backflow_job", "imgs"), ("vm", image_name.as_str())];
    assert_eq!(
        sample(&after, "backflow_vm_last_success_timestamp_seconds", &vm),
        session["ended"].as_f64()
    );
    assert_eq!(
        sample(&after, "backflow_vm_last_backup_size_bytes", &vm),
        Some((48 << 20) as f64)
    );
    assert_eq!(
        sample(
            &after,
            "backflow_job_last_success",
            &[("backflow_job", "imgs")]
        ),
        Some(1.0)
    );
    let repo_label = [("repository", repo.to_str().unwrap())];
    assert_eq!(
        sample(&after, "backflow_repository_stored_bytes", &repo_label),
        Some(stored as f64)
    );
    assert_eq!(
        sample(&after, "backflow_repository_snapshots", &repo_label),
        Some(1.0)
    );

    // Verify and restore the restore point; the restored image is the source.
    let point = format!("{url}/api/restore-points/{snapshot}");
    let (status, body) = LOCAL.request("POST", &format!("{point}/verify"), &[CSRF], None);
    assert_eq!(status, 202, "{body}");
    task_succeeded(&url, &body);
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{point}/restore"),
        &[CSRF],
        Some(r#"{"name": "r1"}"#),
    );
    assert_eq!(status, 202, "{body}");
    task_succeeded(&url, &body);
    let restored: Vec<PathBuf> = std::fs::read_dir(restores.join("r1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    let cmp = Command::new("cmp")
        .arg(&image)
        .arg(&restored[0])
        .status()
        .unwrap();
    assert!(cmp.success(), "the restored image differs from the source");
    // The same name again: refused, nothing overwritten.
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{point}/restore"),
        &[CSRF],
        Some(r#"{"name": "r1"}"#),
    );
    assert_eq!(status, 409, "{body}");
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{point}/restore"),
        &[CSRF],
        Some(r#"{"name": "../etc"}"#),
    );
    assert_eq!(status, 400, "{body}");

    // Disable: no next run, and it stays disabled across a restart (the history keeps it).
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{url}/api/jobs/imgs/disable"),
        &[CSRF],
        None,
    );
    assert_eq!(status, 200, "{body}");
    let job = LOCAL.json(&format!("{url}/api/jobs/imgs"), &[]);
    assert_eq!(
        (job["enabled"].clone(), job["next_runs"].clone()),
        (Value::Bool(false), serde_json::json!([]))
    );
    daemon.stop();
    let daemon = Daemon::start(
        &[],
        &jobs,
        &[
            "--http",
            "127.0.0.1:0",
            "--restore-dir",
            restores.to_str().unwrap(),
        ],
        &[],
    );
    let url = daemon.url.clone();
    let job = LOCAL.json(&format!("{url}/api/jobs/imgs"), &[]);
    assert_eq!(job["enabled"], false, "{job:#}");
    let (_, text) = LOCAL.get(&format!("{url}/metrics"), &[]);
    assert_eq!(
        sample(&text, "backflow_job_enabled", &[("backflow_job", "imgs")]),
        Some(0.0)
    );

    // Forget: gone from the API and from the repository.
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{url}/api/restore-points/{snapshot}/forget"),
        &[CSRF],
        None,
    );
    assert_eq!(status, 202, "{body}");
    task_succeeded(&url, &body);
    let points = LOCAL.json(&format!("{url}/api/restore-points"), &[]);
    assert_eq!(points, serde_json::json!([]));
    let listed = backflow()
        .args(["snapshots", "--json", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
    // A gc beside the console, which has just read the repository (and goes on reading it):
    // the console holds no repository handle between its reads, so the sweep waits for nothing
    // and deletes the forgotten restore point's packs at once.
    LOCAL.json(&format!("{url}/api/repositories"), &[]);
    let (_, text) = LOCAL.get(&format!("{url}/metrics"), &[]);
    assert!(text.contains("backflow_repository_snapshots"), "{text}");
    let gc = backflow()
        .args(["gc", "--json", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");
    let report: Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(report["waiting_for"].is_null(), "{report:#}");
    assert!(
        report["bytes_deleted"].as_u64().unwrap() >= 48 << 20,
        "{report:#}"
    );

    // Every action is in the session history, with who asked.
    let sessions = LOCAL.json(&format!("{url}/api/sessions?job=console"), &[]);
    let actions: Vec<(String, String)> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["action"].as_str().unwrap().to_owned(),
                s["requested_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for kind in ["verify", "restore", "disable", "forget"] {
        assert!(
            actions.contains(&(kind.to_owned(), "local".to_owned())),
            "{kind} not recorded: {actions:?}"
        );
    }
    daemon.stop();
}

/// A network namespace of the test's own with a veth pair inside it, one end at `ADDR/24`: an
/// address that is not loopback, reachable only inside the namespace (this kernel has no dummy
/// interfaces). Removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(addr: &str) -> Netns {
        let name = format!("bf-console-{}", std::process::id());
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run(&["netns", "add", &name]);
        let ns = Netns { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"]);
        run(&[
            "-n", &ns.name, "link", "add", "console0", "type", "veth", "peer", "name", "console1",
        ]);
        run(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "console0",
        ]);
        run(&["-n", &ns.name, "link", "set", "console0", "up"]);
        run(&["-n", &ns.name, "link", "set", "console1", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn another_address_needs_tls_and_tokens_and_a_read_only_token_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_repo, _image, jobs) = image_job(dir.path(), 4 << 20);
    // One restore point to act on.
    run_job(&jobs.join("imgs.yaml"));
    let addr = "10.213.77.1";
    let ns = Netns::create(addr);
    let wrap = ["ip", "netns", "exec", ns.name.as_str()];
    let pki = backflow_testkit::pki::Pki::create(dir.path(), "console");
    let server = pki.server("console", &[addr], &[]);
    let (cert, key) = (
        server.join("server-cert.pem"),
        server.join("server-key.pem"),
    );
    let (tokens, secrets) = write_tokens(
        dir.path(),
        &[("alice", "operator"), ("grafana", "read-only")],
    );
    let (alice, grafana) = (secrets[0].clone(), secrets[1].clone());
    let listen = format!("{addr}:8443");

    // Without TLS or without tokens, another address is refused at start.
    for args in [
        vec![
            "--http",
            listen.as_str(),
            "--tokens",
            tokens.to_str().unwrap(),
        ],
        vec![
            "--http",
            listen.as_str(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(backflow().get_program())
            .args(["daemon", "--jobs"])
            .arg(&jobs)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("needs TLS") || stderr.contains("needs a tokens file"),
            "{stderr}"
        );
    }

    let daemon = Daemon::start(
        &wrap,
        &jobs,
        &[
            "--http",
            &listen,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--restore-dir",
            dir.path().join("restores").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(daemon.url, format!("https://{listen}"));
    let url = daemon.url.clone();
    let http = Http {
        wrap: &wrap,
        cacert: Some(&pki.ca_cert()),
    };
    let bearer = |s: &str| format!("Authorization: Bearer {s}");
    let (alice_h, grafana_h) = (bearer(&alice), bearer(&grafana));

    // Plain HTTP to the TLS port gets no answer.
    let (status, _) = Http {
        wrap: &wrap,
        cacert: None,
    }
    .get(&format!("http://{listen}/api/health"), &[]);
    assert_ne!(status, 200);

    // Every operation of the document and every page: 401 without a token (or with a wrong
    // one), except the health check.
    let doc = http.json(&format!("{url}/api/openapi.json"), &[&grafana_h]);
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{name}", "imgs").replace("{id}", "1");
            let target = format!("{url}{concrete}");
            for headers in [vec![], vec!["Authorization: Bearer not-a-token"]] {
                let (status, body) =
                    http.request(&method.to_uppercase(), &target, &headers, Some("{}"));
                let expected = if path == "/api/health" { 200 } else { 401 };
                assert_eq!(status, expected, "{method} {path} {headers:?}: {body}");
                if expected == 401 {
                    let e: Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(e["error"]["code"], "unauthorized");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations");
    for page in ["/", "/pipelines", "/sessions/x"] {
        let (status, _) = http.get(&format!("{url}{page}"), &[]);
        assert_eq!(status, 401, "{page}");
    }

    // The read-only token reads everything and changes nothing.
    let points = http.json(&format!("{url}/api/restore-points"), &[&grafana_h]);
    let id = points[0]["id"].as_str().unwrap().to_owned();
    for (path, body) in [
        ("/api/jobs/imgs/run".to_owned(), None),
        ("/api/jobs/imgs/disable".to_owned(), None),
        (format!("/api/restore-points/{id}/verify"), None),
        (format!("/api/restore-points/{id}/forget"), None),
        (
            format!("/api/restore-points/{id}/restore"),
            Some(r#"{"name":"x"}"#),
        ),
        (
            format!("/api/restore-points/{id}/instant-restore"),
            Some(r#"{"name":"x"}"#),
        ),
    ] {
        let (status, text) = http.request("POST", &format!("{url}{path}"), &[&grafana_h], body);
        assert_eq!(status, 403, "{path}: {text}");
        assert!(text.contains("read-only token grafana"), "{text}");
    }
    assert_eq!(
        http.json(&format!("{url}/api/restore-points"), &[&grafana_h])[0]["id"],
        id.as_str()
    );
    assert!(!dir.path().join("restores/x").exists());
    // The operator's run starts, recorded with her name.
    let (status, body) = http.request(
        "POST",
        &format!("{url}/api/jobs/imgs/run"),
        &[&alice_h],
        None,
    );
    assert_eq!(status, 202, "{body}");
    let session = wait_until("alice's session", Duration::from_secs(120), || {
        let s = http.json(
            &format!("{url}/api/sessions?job=imgs&limit=1"),
            &[&grafana_h],
        );
        (s[0]["requested_by"] == "token:alice").then(|| s[0].clone())
    });
    assert_eq!(session["result"], "success");

    // No secret in any answer.
    for path in [
        "/api/jobs",
        "/api/sessions",
        "/api/repositories",
        "/api/vms",
        "/api/tasks",
        "/metrics",
        "/api/openapi.json",
    ] {
        let (_, body) = http.get(&format!("{url}{path}"), &[&alice_h]);
        assert!(
            !body.contains(&alice) && !body.contains(&grafana),
            "{path} shows a secret"
        );
    }
    daemon.stop();
    drop(ns);
}

#[test]
fn schemathesis_finds_the_server_true_to_its_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let (_repo, _image, jobs) = image_job(dir.path(), 2 << 20);
    run_job(&jobs.join("imgs.yaml"));
    let (tokens, secrets) = write_tokens(dir.path(), &[("op", "operator")]);
    let secret = &secrets[0];
    let daemon = Daemon::start(
        &[],
        &jobs,
        &[
            "--http",
            "127.0.0.1:0",
            "--tokens",
            tokens.to_str().unwrap(),
            "--restore-dir",
            dir.path().join("restores").to_str().unwrap(),
        ],
        &[],
    );
    // Every check (status codes documented, bodies matching their schemas, content types,
    // invalid input refused, auth required, unsupported methods 405); the event stream never
    // ends and instant recovery starts VMs, so those two operations are left out.
    let out = Command::new(tools::schemathesis())
        .current_dir(dir.path())
        .args(["run", &format!("{}/api/openapi.json", daemon.url)])
        .args(["-H", &format!("Authorization: Bearer {secret}")])
        .args(["--checks", "all", "-n", "15", "--seed", "16", "--no-color"])
        .args(["--exclude-path", "/api/pipelines/events"])
        .args(["--exclude-path", "/api/restore-points/{id}/instant-restore"])
        .args(["--max-time", "90", "--request-timeout", "30"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found the server untrue to its document:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Tested: 21"), "{stdout}");
    daemon.stop();
}

#[test]
fn an_instant_restore_asked_through_the_api_runs_the_restore_point_as_a_new_vm() {
    use backflow_testkit::libvirt::{Domain, make_traversable, virsh};
    use common::vm::{Defined, Recovery, backup_vm};

    let original = Domain::start("bf-console-ir", &[("vda", "32M")]);
    original.guest_write("vda", "write -P 0x5a 1M 2M");
    let work = tempfile::tempdir().unwrap();
    make_traversable(work.path());
    let repo = work.path().join("repo");
    common::init_repo(&repo, "64K");
    let id = backup_vm(&repo, original.name(), &work.path().join("backup.json"));
    virsh(&["destroy", original.name()]);
    let jobs = work.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("vms.yaml"),
        format!(
            "name: vms\nrepository: {}\nvms: [{}]\nschedule: \"0 3 * * *\"\n",
            repo.display(),
            original.name()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&[], &jobs, &["--http", "127.0.0.1:0"], &[]);
    let url = daemon.url.clone();
    let name = format!("{}-api", original.name());
    let _defined = Defined(name.clone());
    let _recovery = Recovery(
        PathBuf::from(backflow_recovery::DEFAULT_STATE_ROOT),
        name.clone(),
    );
    let (status, body) = LOCAL.request(
        "POST",
        &format!("{url}/api/restore-points/{id}/instant-restore"),
        &[CSRF],
        Some(&format!(r#"{{"name": "{name}", "no_network": true}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    let task = task_succeeded(&url, &body);
    assert!(task["output"].as_str().unwrap().contains("RTO"), "{task:#}");
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    // It reads what the backup holds (-U: the running domain holds the overlay's lock).
    let overlay = Path::new(backflow_recovery::DEFAULT_STATE_ROOT)
        .join(&name)
        .join("vda.qcow2");
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2"])
        .arg(&overlay)
        .arg(original.disk("vda"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Recorded with who asked, naming the new VM.
    let sessions = LOCAL.json(&format!("{url}/api/sessions?job=console"), &[]);
    assert_eq!(sessions[0]["action"], "instant-restore", "{sessions:#}");
    assert_eq!(sessions[0]["requested_by"], "local");
    let detail = LOCAL.json(
        &format!("{url}/api/sessions/{}", sessions[0]["id"].as_str().unwrap()),
        &[],
    );
    assert_eq!(detail["record"]["action"]["target"], name.as_str());
    daemon.stop();
}
