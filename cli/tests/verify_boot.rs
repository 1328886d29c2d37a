//! `verify_boot` jobs run by the real daemon against real libvirtd: the latest restore point of the
//! bootable test guest is started as an isolated copy, prints its line, and the session records
//! success (with the time it took); the restore point of a guest whose disk does not boot is
//! recorded as a failure with the reason (what its console showed). Both copies are gone after.

mod common;

use std::path::Path;
use std::time::Duration;

use backflow_testkit::guest::{BOOT_LINE, Boot, Guest, GuestDisk, ImageFormat, NO_BOOTABLE_DEVICE};
use backflow_testkit::libvirt::{domain_names, make_traversable};
use common::vm::backup_vm;
use common::{
    backflow, init_repo, record_old_session, run_ok, sigterm, start_daemon, wait_exit,
    wait_for_line,
};

fn session_of(repo: &Path, job: &str, not: &str) -> serde_json::Value {
    let out = run_ok(
        backflow()
            .args(["sessions", "--json", "--job", job, "--repo"])
            .arg(repo),
    );
    let sessions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] != not)
        .unwrap_or_else(|| panic!("no session of {job} recorded: {sessions:#}"))
        .clone()
}

#[test]
fn the_daemon_proves_a_restore_point_boots_and_names_why_another_does_not() {
    let work = tempfile::tempdir().unwrap();
    make_traversable(work.path());
    let repo = work.path().join("repo");
    init_repo(&repo, "128K");

    // A guest that boots, and one whose disk does not (its boot sector zeroed): both backed up
    // while they run.
    let good = GuestDisk::new(64 << 20)
        .format(ImageFormat::Qcow2)
        .build(&work.path().join("good.qcow2"))
        .unwrap();
    let bad = GuestDisk::new(64 << 20)
        .format(ImageFormat::Qcow2)
        .boot(Boot::ZeroedBootSector)
        .build(&work.path().join("bad.qcow2"))
        .unwrap();
    let good = Guest::start(&good).unwrap();
    let bad = Guest::start(&bad).unwrap();
    good.wait_booted(Duration::from_secs(240)).unwrap();
    let good_id = backup_vm(&repo, good.name(), &work.path().join("good.json"));
    let bad_id = backup_vm(&repo, bad.name(), &work.path().join("bad.json"));

    // Two jobs (a short timeout for the disk that cannot boot), weekly, caught up at the daemon's
    // start.
    let state = work.path().join("instant");
    std::fs::create_dir(&state).unwrap();
    make_traversable(&state);
    let jobs = work.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    for (job, vm, timeout) in [
        ("boot-good", good.name(), 300),
        ("boot-bad", bad.name(), 40),
    ] {
        std::fs::write(
            jobs.join(format!("{job}.yaml")),
            format!(
                "name: {job}\nrepository: {}\nverify_boot:\n  vms: [{vm}]\n  console: {BOOT_LINE}\n  \
                 timeout: {timeout}\n  state_dir: {}\nschedule: \"0 5 * * 6\"\n",
                repo.display(),
                state.display()
            ),
        )
        .unwrap();
    }
    let old_good = record_old_session(&repo, "boot-good", 8 * 86400);
    let old_bad = record_old_session(&repo, "boot-bad", 8 * 86400);
    let (mut daemon, lines) = start_daemon(&jobs);
    wait_for_line(&lines, "Session ended.", Duration::from_secs(600));
    wait_for_line(&lines, "Session ended.", Duration::from_secs(600));
    sigterm(&daemon);
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(120)).code(),
        Some(0)
    );

    let ran = session_of(&repo, "boot-good", &old_good);
    assert_eq!(ran["result"], "success", "{ran:#}");
    let vm = &ran["verify_boot"]["vms"][0];
    assert_eq!(vm["vm"], good.name(), "{ran:#}");
    assert_eq!(vm["snapshot"], good_id.as_str(), "{ran:#}");
    assert_eq!(vm["result"], "success", "{ran:#}");
    assert_eq!(vm["sign"], "console", "{ran:#}");
    let seconds = vm["seconds"].as_f64().unwrap();
    let rto = vm["rto_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto <= seconds, "{ran:#}");

    let ran = session_of(&repo, "boot-bad", &old_bad);
    assert_eq!(ran["result"], "failure", "{ran:#}");
    let vm = &ran["verify_boot"]["vms"][0];
    assert_eq!(vm["snapshot"], bad_id.as_str(), "{ran:#}");
    assert_eq!(vm["result"], "failure", "{ran:#}");
    let error = vm["error"].as_str().unwrap();
    assert!(error.contains("no sign of life within 40 s"), "{error}");
    assert!(error.contains(NO_BOOTABLE_DEVICE), "{error}");

    // The copies are gone: no domain, no export, no state; the originals run on.
    assert!(
        !domain_names()
            .iter()
            .any(|d| d.starts_with("backflow-verify-")),
        "{:?}",
        domain_names()
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    assert!(good.is_active() && bad.is_active());
}
