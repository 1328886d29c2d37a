//! Driving `backflow worker` as a controller does: a task, the events back.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};

use backflow_jobs::VmRecord;
use backflow_jobs::worker::{Event, PROTOCOL, Task};

use super::{backflow, run_ok};

/// The task of a backup of `image` (as disk `disk0`) into `repo` with the built-in image spec.
pub fn task(image: &Path, repo: &str) -> Task {
    let spec = run_ok(backflow().args(["specs", "backup-image"])).stdout;
    Task {
        protocol: PROTOCOL,
        job: "nightly".into(),
        host: "h1".into(),
        label: "disk0".into(),
        spec_name: "backup-image (built in)".into(),
        spec: String::from_utf8(spec).unwrap(),
        variables: vec![
            ("source".into(), image.display().to_string()),
            ("repo".into(), repo.into()),
            ("disk".into(), "disk0".into()),
        ],
        overrides: Vec::new(),
        env: Default::default(),
        password: None,
        heartbeat: None,
    }
}

/// Starts a worker (without the test's own S3 settings: a task brings its own) and hands it `task`;
/// stdin stays open, as the controller keeps it for the session.
pub fn start(task: &Task, extra_env: &[(&str, &Path)]) -> (Child, ChildStdin) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_backflow"));
    cmd.arg("worker")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut line = serde_json::to_string(task).unwrap();
    line.push('\n');
    stdin.write_all(line.as_bytes()).unwrap();
    (child, stdin)
}

/// Reads events until the record (or the end of the stream: `None`).
pub fn events_until_record(child: &mut Child) -> (Vec<Event>, Option<VmRecord>) {
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut events = Vec::new();
    for line in out.lines() {
        let event: Event = serde_json::from_str(&line.unwrap()).expect("an event per line");
        if let Event::Record { record } = event {
            return (events, Some(*record));
        }
        events.push(event);
    }
    (events, None)
}
