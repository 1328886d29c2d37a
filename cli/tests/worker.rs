//! `backflow worker` as a controller drives it (here without SSH between them, which only carries
//! the same stdin and stdout): the task on stdin, events on stdout, the VM's record last; closing
//! stdin stops the run with nothing committed and nothing left behind; a bad task is refused
//! clearly. (The store's credentials in a task: s3_worker.rs.)

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backflow_jobs::Verdict;
use backflow_jobs::worker::{Event, PROTOCOL};
use backflow_testkit::libvirt::Domain;
use common::vm::{assert_nothing_left, vm_dirs};
use common::worker::{events_until_record, start, task};
use common::*;

#[test]
fn a_worker_backs_up_its_task_and_streams_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (image, repo) = (dir.path().join("disk.img"), dir.path().join("repo"));
    backflow_fixtures::generate_image(&image, 48 << 20, 5).unwrap();
    init_repo(&repo, "64K");

    let (mut child, stdin) = start(&task(&image, repo.to_str().unwrap()), &[]);
    let (events, record) = events_until_record(&mut child);
    drop(stdin);
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(status.success(), "worker: {status}");
    assert!(
        matches!(&events[0], Event::Started { host, .. } if host == "h1"),
        "{events:?}"
    );
    let record = record.expect("the worker sent its record");
    assert_eq!(record.result, Verdict::Success, "{record:?}");
    assert_eq!(record.vm, "disk0");
    assert!(record.bytes_read > 0 && record.bytes_written > 0);
    let snapshot = record.snapshot.expect("a committed snapshot");
    assert_eq!(snapshot_ids(&repo), vec![snapshot.clone()]);
    assert_restores(&repo, &[(&snapshot, &image)], dir.path());
}

/// The controller going away (stdin closed) while the worker backs up a running VM: the run is
/// cancelled, the VM's backup job ended, nothing committed, nothing left in the run's TMPDIR.
#[test]
fn closing_the_session_stops_the_run_with_nothing_committed() {
    let vm = Domain::start("bf-wk", &[("vda", "32M")]);
    let (dir, repo, tmp) = vm_dirs();
    let spec = run_ok(backflow().args(["specs", "backup-vm"])).stdout;
    let mut task = task(Path::new("/unused"), repo.to_str().unwrap());
    task.label = vm.name().to_owned();
    task.spec_name = "backup-vm (built in)".into();
    task.spec = String::from_utf8(spec).unwrap();
    task.variables = vec![
        ("domain".into(), vm.name().to_owned()),
        ("repo".into(), repo.display().to_string()),
        ("freeze".into(), "off".into()),
    ];
    let pause = dir.path().join("paused");

    let (mut child, stdin) = start(
        &task,
        &[("BACKFLOW_PAUSE_AFTER_SNAPSHOT", &pause), ("TMPDIR", &tmp)],
    );
    wait_for_pause(&mut child, &pause, 120);
    assert!(vm.has_backup_job());
    // The controller goes away while the VM's backup job runs.
    drop(stdin);
    let (_, record) = {
        // The stop reaches the run while it waits; then it may go on, and stops.
        std::thread::sleep(Duration::from_millis(500));
        std::fs::remove_file(&pause).unwrap();
        events_until_record(&mut child)
    };
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "worker: {status}");
    let record = record.expect("a stopped run still sends its record");
    assert_eq!(record.result, Verdict::Cancelled, "{record:?}");
    assert!(record.snapshot.is_none());
    assert!(snapshot_ids(&repo).is_empty());
    assert_nothing_left(&vm, &tmp);
}

#[test]
fn a_bad_task_is_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut bad_env = task(&image, "/nonexistent");
    bad_env.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
    let mut old = task(&image, "/nonexistent");
    old.protocol = PROTOCOL + 1;
    for (task_line, needle) in [
        ("{not json\n".to_owned(), "the task is not valid"),
        (String::new(), "no task"),
        (
            serde_json::to_string(&bad_env).unwrap() + "\n",
            "LD_PRELOAD",
        ),
        (serde_json::to_string(&old).unwrap() + "\n", "protocol"),
    ] {
        let mut child = backflow()
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(task_line.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_failed(&out, 2, needle);
    }
}
