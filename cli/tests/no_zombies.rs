//! No process left behind: every process backflow starts is waited for, on every path.
//!
//! This test binary makes itself a child subreaper ([`adopt_orphans`]): an orphan anywhere below
//! it is reparented to it rather than to PID 1, so a process backflow let go of without reaping
//! (a daemonised `qemu-nbd`, its intermediate parent) shows up as a zombie of the test process,
//! as it stays for good under an init that never reaps (a container's PID 1, or `backflow daemon`
//! running as PID 1). After each run, and while the daemon runs on, neither the test process
//! nor the daemon has a zombie child. The tests take a lock: a child of another test caught
//! between its exit and its wait would look like a zombie.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use backflow_testkit::libvirt::Domain;
use backflow_testkit::qemu::{adopt_orphans, compare_images, zombies_of};
use common::vm::{backup_vm_command, vm_dirs};
use common::*;

/// One test at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    adopt_orphans();
    guard
}

/// No zombie child of this process, nor of `others`.
fn assert_no_zombies(others: &[u32], when: &str) {
    for pid in std::iter::once(std::process::id()).chain(others.iter().copied()) {
        let zombies = zombies_of(pid);
        assert!(
            zombies.is_empty(),
            "{when}: zombie children of pid {pid}: {zombies:?}"
        );
    }
}

/// A VM on the system libvirtd, its repository and the TMPDIR of its runs.
struct Case {
    vm: Domain,
    dir: tempfile::TempDir,
    repo: PathBuf,
    tmp: PathBuf,
}

impl Case {
    fn new(prefix: &str) -> Case {
        let vm = Domain::start(prefix, &[("vda", "32M")]);
        vm.guest_write("vda", "write -P 0x5a 1M 2M");
        let (dir, repo, tmp) = vm_dirs();
        Case { vm, dir, repo, tmp }
    }

    fn command(&self) -> Command {
        backup_vm_command(&self.tmp, self.vm.name(), &self.repo)
    }

    /// A backup that must succeed; the raw copy of the disk it must restore to.
    fn backup(&self, n: usize) -> PathBuf {
        let copy = self.dir.path().join(format!("at-{n}.raw"));
        self.vm.copy_disk("vda", &copy);
        run_ok(&mut self.command());
        copy
    }
}

#[test]
fn vm_destroyed_mid_backup_read_offline_then_running_again_leaves_no_zombie() {
    let _serial = serial();
    let mut case = Case::new("bf-reap");
    let first = case.backup(0);
    assert_no_zombies(&[], "after a backup of the running VM");

    // Destroyed mid-transfer: the run fails.
    case.vm.guest_write("vda", "write -P 0x6b 8M 1M");
    let pause = case.dir.path().join("pause");
    let child = spawn_paused(
        &mut case.command(),
        "BACKFLOW_PAUSE_MID_TRANSFER",
        &pause,
        120,
    );
    case.vm.destroy();
    let out = resume(child, &pause);
    assert!(!out.status.success(), "the backup of a destroyed VM failed");
    assert_no_zombies(&[], "after the failed backup");

    // Shut off: read through a private qemu-nbd.
    let offline = case.backup(1);
    assert_no_zombies(&[], "after the offline backup (qemu-nbd)");

    // Running again.
    case.vm.start_again();
    case.vm.guest_write("vda", "write -P 0x7c 20M 1M");
    let online = case.backup(2);
    assert_no_zombies(&[], "after the backup of the restarted VM");

    // Every restore point restores identical, as qcow2 (through a private writable qemu-nbd).
    let ids = snapshot_ids(&case.repo);
    assert_eq!(ids.len(), 3, "{ids:?}");
    for (id, copy) in ids.iter().zip([&first, &offline, &online]) {
        let restored = case.dir.path().join(format!("restored-{id}.qcow2"));
        run_ok(
            backflow()
                .args(["restore", "--quiet", "--format", "qcow2", "--repo"])
                .arg(&case.repo)
                .args(["--snapshot", id, "--to"])
                .arg(&restored),
        );
        assert_no_zombies(&[], "after a qcow2 restore (qemu-nbd)");
        if let Err(verdict) = compare_images(&restored, "qcow2", copy, "raw") {
            panic!("snapshot {id}: {verdict}");
        }
    }
}

/// A job file over `glob` (the VMs of one test), owed a run at once (a session recorded an hour
/// ago).
fn job(dir: &Path, name: &str, repo: &Path, glob: &str) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nrepository: {}\nvms: [\"{glob}\"]\nschedule: [\"0 0 1 1 *\"]\n\
             variables: {{freeze: \"off\"}}\n",
            repo.display()
        ),
    )
    .unwrap();
    record_old_session(repo, name, 3600 * 24 * 400);
}

#[test]
fn a_daemon_backing_up_running_and_shut_off_vms_keeps_no_zombie() {
    let _serial = serial();
    let running = Case::new("bf-reapd-on");
    let off = Case::new("bf-reapd-off");
    off.vm.destroy();
    let work = tempfile::tempdir().unwrap();
    let jobs = work.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    // Two jobs, each owed a run: two sessions at once, one through libvirt's backup job, one
    // through a private qemu-nbd per image.
    job(&jobs, "on", &running.repo, running.vm.name());
    job(&jobs, "off", &off.repo, off.vm.name());

    let (mut daemon, lines) = start_daemon(&jobs);
    for _ in 0..2 {
        wait_for_line(&lines, "Session ended.", Duration::from_secs(120));
    }
    assert_eq!(snapshot_ids(&running.repo).len(), 1);
    assert_eq!(snapshot_ids(&off.repo).len(), 1);
    // The daemon lives on: nothing it started may linger, as its child or as an orphan.
    assert_no_zombies(&[daemon.id()], "while the daemon runs, after two sessions");
    sigterm(&daemon);
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(60)).code(),
        Some(0)
    );
    assert_no_zombies(&[], "after the daemon stopped");
}
