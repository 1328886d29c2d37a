//! `backflow daemon --jobs DIR` against real libvirt domains (`qemu:///system`, started by
//! `scripts/setup.sh`). Time is driven through the session history: a fake session recorded an
//! hour ago makes the daemon catch the job up at once, instead of waiting for its time.

mod common;

use std::path::Path;
use std::time::Duration;

use backflow_testkit::libvirt::Domain;
use common::*;

const JOB: &str = "every-minute";

/// Three domains named `PREFIX-PID-N`, data written on each, and the glob selecting them.
fn domains(prefix: &str) -> (Vec<Domain>, String) {
    let (vms, glob) = Domain::start_many(prefix, 3, &[("vda", "16M")]);
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 1M 1M", 0x11 + i));
    }
    (vms, glob)
}

/// A job directory with the every-minute job over `glob` (plus the YAML lines `extra`), and a
/// session of it recorded an hour ago, so that the daemon owes it a run at start.
fn job_dir(work: &Path, repo: &Path, glob: &str, extra: &str) -> std::path::PathBuf {
    let dir = work.join("jobs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("every-minute.yaml"),
        format!(
            "name: {JOB}\nrepository: {}\nvms: [\"{glob}\"]\nschedule: [\"* * * * *\"]\n\
             variables: {{freeze: \"off\"}}\n{extra}",
            repo.display()
        ),
    )
    .unwrap();
    record_old_session(repo, JOB, 3600);
    dir
}

/// The job's recorded sessions, the fake one included, oldest first.
fn sessions(repo: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(
        backflow()
            .args(["sessions", "--json", "--job", JOB, "--repo"])
            .arg(repo),
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut all = all.as_array().unwrap().clone();
    all.sort_by_key(|s| s["started"].as_i64());
    all
}

fn snapshots_per_vm(repo: &Path, vms: &[Domain]) -> Vec<usize> {
    let out = run_ok(backflow().args(["snapshots", "--json", "--repo"]).arg(repo));
    let snapshots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snapshots = snapshots.as_array().unwrap();
    vms.iter()
        .map(|vm| snapshots.iter().filter(|s| s["vm"] == vm.name()).count())
        .collect()
}

#[test]
fn the_daemon_catches_up_once_then_runs_on_schedule_and_stops_on_sigterm() {
    let (vms, glob) = domains("bf-daemon");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    let jobs = job_dir(work.path(), &repo, &glob, "retention: {keep_last: 1}\n");

    let (mut daemon, lines) = start_daemon(&jobs);
    // The run missed an hour ago is caught up at once: one session, not one per missed minute.
    wait_for_line(&lines, "Session ended.", Duration::from_secs(60));
    let history = sessions(&repo);
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(history[1]["result"], "success", "{:#}", history[1]);
    assert_eq!(history[1]["vms"].as_array().unwrap().len(), 3);
    assert_eq!(snapshots_per_vm(&repo, &vms), [1, 1, 1]);

    // Then the schedule: the next run starts at the next minute (on it, give or take a second).
    for (i, vm) in vms.iter().enumerate() {
        vm.guest_write("vda", &format!("write -P {} 4M 1M", 0x21 + i));
    }
    wait_for_line(&lines, "Session ended.", Duration::from_secs(120));
    let history = sessions(&repo);
    assert_eq!(history.len(), 3, "{history:#?}");
    assert_eq!(history[2]["result"], "success", "{:#}", history[2]);
    let started = history[2]["started"].as_i64().unwrap();
    assert!(started % 60 <= 2, "started at {started}, not on a minute");
    // Its retention (keep_last: 1) forgot each VM's first snapshot after the second.
    assert_eq!(snapshots_per_vm(&repo, &vms), [1, 1, 1]);
    for vm in history[2]["vms"].as_array().unwrap() {
        assert_eq!(vm["forgotten"].as_array().unwrap().len(), 1, "{vm}");
    }

    sigterm(&daemon);
    let status = wait_exit(&mut daemon, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    for vm in &vms {
        assert!(!vm.has_backup_job(), "{} has a backup job left", vm.name());
    }
    // `sessions` shows every run, the table too.
    let table = run_ok(backflow().args(["sessions", "--repo"]).arg(&repo));
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        table.lines().filter(|l| l.contains(JOB)).count(),
        3,
        "{table}"
    );
}

#[test]
fn sigterm_during_a_session_cancels_it_cleanly_and_the_next_start_runs_it() {
    let (vms, glob) = domains("bf-daemon-stop");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");
    let jobs = job_dir(work.path(), &repo, &glob, "");

    let (mut daemon, lines) = start_daemon(&jobs);
    // The first VM's pipeline is running (parallel: 1, so the other two are still to come) when
    // the signal lands.
    wait_for_line(&lines, "Backing up.", Duration::from_secs(60));
    sigterm(&daemon);
    let status = wait_exit(&mut daemon, Duration::from_secs(120));
    assert_eq!(status.code(), Some(0));
    let history = sessions(&repo);
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(history[1]["result"], "cancelled", "{:#}", history[1]);
    let results: Vec<&str> = history[1]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["result"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 3);
    assert_eq!(results[2], "cancelled", "{results:?}");
    // Nothing left behind: no backup job, no snapshot for a cancelled VM, a sound repository.
    for vm in &vms {
        assert!(!vm.has_backup_job(), "{} has a backup job left", vm.name());
    }
    let snapshots = snapshots_per_vm(&repo, &vms);
    for (result, count) in results.iter().zip(&snapshots) {
        assert_eq!(
            *count,
            usize::from(*result == "success"),
            "{results:?} {snapshots:?}"
        );
    }
    run_ok(backflow().args(["verify", "--repo"]).arg(&repo));

    // The cancelled run is owed: started again, the daemon runs it at once, in full. (It may start
    // within the same second as the cancelled one: it is told apart by its id, not its time.)
    run_daemon_until(&jobs, "Session ended.");
    let before: Vec<serde_json::Value> = history.iter().map(|s| s["id"].clone()).collect();
    let history = sessions(&repo);
    assert_eq!(history.len(), 3, "{history:#?}");
    let new = history
        .iter()
        .find(|s| !before.contains(&s["id"]))
        .expect("a new session");
    assert_eq!(new["result"], "success", "{new:#}");
    let after: Vec<usize> = snapshots_per_vm(&repo, &vms);
    let expected: Vec<usize> = snapshots.iter().map(|n| n + 1).collect();
    assert_eq!(after, expected);
}

#[test]
fn a_bad_job_file_stops_the_daemon_at_start_with_its_position() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("good.yaml"),
        "name: good\nrepository: /srv/b\nvms: [a]\nschedule: [\"0 2 * * *\"]\n",
    )
    .unwrap();
    let bad = work.path().join("nightly.yaml");
    std::fs::write(
        &bad,
        "name: nightly\nrepository: /srv/b\nvms: [a]\nschedule: [\"0 25 * * *\"]\n",
    )
    .unwrap();
    let out = backflow()
        .args(["daemon", "--jobs"])
        .arg(work.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4:", bad.display())) && stderr.contains("cron expression"),
        "{stderr}"
    );
}
