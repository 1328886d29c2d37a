//! libvirtd going away in the middle of a backup of a running VM: the real binary,
//! `specs/backup-vm.yaml`, and a libvirtd of the test's own ([`PrivateLibvirtd`]: its own state
//! and sockets, in a mount namespace), which the test stops and restarts by pid without
//! disturbing the tests that share the system daemon.
//!
//! The transfer is paused deterministically (`BACKFLOW_PAUSE_MID_TRANSFER`: the first NBD read
//! pauses, the other reads wait), libvirtd is restarted or stopped, guest writes land, and the
//! run goes on. Every restore point restores identical to a raw copy of the disks taken when its
//! backup job began, and after every run no backup job, job directory or scratch file is left
//! (except where a test says so).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output};

use backflow_testkit::libvirt::Domain;
use backflow_testkit::libvirtd::PrivateLibvirtd;
use common::vm::*;
use common::*;

/// Written between the first and the second backup.
const VDA_SECOND: &[(u64, u64)] = &[(4096, 4096), (33 * MIB, 200 << 10)];
/// Written while the second backup is paused: not in it, in the third.
const DURING: &[(u64, u64)] = &[(0, MIB), (50 * MIB, 2 * MIB)];

/// One test's VM on its own libvirtd, repository and files. The VM is dropped before the daemon
/// (field order).
struct Case {
    vm: Domain,
    libvirtd: PrivateLibvirtd,
    dir: tempfile::TempDir,
    repo: PathBuf,
    /// The TMPDIR of the runs: where the job directories go.
    tmp: PathBuf,
    points: Vec<Point>,
}

impl Case {
    fn new() -> Case {
        let libvirtd = PrivateLibvirtd::start();
        let vm = libvirtd.start_domain("bf-restart", &[("vda", "64M"), ("vdb", "32M")]);
        let (dir, repo, tmp) = vm_dirs();
        guest_writes(&vm, "vda", VDA_FIRST, 1);
        guest_writes(&vm, "vdb", VDB_FIRST, 2);
        Case {
            vm,
            libvirtd,
            dir,
            repo,
            tmp,
            points: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = backup_vm_command(&self.tmp, self.vm.name(), &self.repo);
        cmd.arg("--var")
            .arg(format!("uri={}", self.libvirtd.uri()))
            .arg("--report")
            .arg(self.report_path());
        cmd
    }

    fn report_path(&self) -> PathBuf {
        self.dir.path().join("report.json")
    }

    /// A raw copy of every disk as it is now, for the restore point about to be taken.
    fn copies(&self) -> Vec<(String, PathBuf)> {
        let n = self.points.len();
        ["vda", "vdb"]
            .iter()
            .map(|t| {
                let copy = self.dir.path().join(format!("at-{n}-{t}.raw"));
                self.vm.copy_disk(t, &copy);
                ((*t).to_owned(), copy)
            })
            .collect()
    }

    /// A backup that must succeed; keeps the disks' copies for its restore point.
    fn backup(&mut self) -> serde_json::Value {
        let disks = self.copies();
        run_ok(&mut self.command());
        let report = read_report(&self.report_path());
        self.taken(&report, disks);
        report
    }

    fn taken(&mut self, report: &serde_json::Value, disks: Vec<(String, PathBuf)>) {
        let id = report["snapshot"].as_str().expect("a snapshot").to_owned();
        self.points.push(Point { id, disks });
    }

    /// A run paused in the middle of its transfer: the running child once it paused.
    fn paused_backup(&self) -> (Child, PathBuf) {
        let pause = self.dir.path().join("pause");
        let child = spawn_paused(
            &mut self.command(),
            "BACKFLOW_PAUSE_MID_TRANSFER",
            &pause,
            120,
        );
        (child, pause)
    }

    /// Every restore point restores identical to the disks as they were when its job began.
    fn assert_restores(&self) {
        for point in &self.points {
            restore_point(&self.repo, point, self.dir.path());
        }
    }

    /// No backup job on the VM, nothing in the runs' TMPDIR (job directories, scratch files).
    fn assert_nothing_left(&self) {
        assert_nothing_left(&self.vm, &self.tmp);
    }

    /// The one checkpoint left is ours: older ones went once a snapshot was committed.
    fn assert_one_checkpoint(&self) {
        let checkpoints = self.vm.checkpoints();
        assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
        assert!(checkpoints[0].starts_with("backflow."), "{checkpoints:?}");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn libvirtd_restarted_mid_transfer_the_run_reconnects_commits_and_ends_its_job() {
    let mut case = Case::new();
    case.backup();
    case.assert_nothing_left();
    let first_checkpoint = case.vm.checkpoints();
    guest_writes(&case.vm, "vda", VDA_SECOND, 3);

    let (child, pause) = case.paused_backup();
    let at_begin = case.copies();
    case.libvirtd.restart();
    // The restarted daemon took the job over: it still runs, and QEMU still exports the disks.
    assert!(
        case.vm.has_backup_job(),
        "libvirtd recovers a pull-mode job"
    );
    // Written after the job began: not in this backup, in the next.
    guest_writes(&case.vm, "vda", DURING, 4);
    guest_writes(&case.vm, "vdb", &DURING[..1], 5);
    let out = resume(child, &pause);
    assert!(
        out.status.success(),
        "every read came from the job's point-in-time view, which outlived the restart:\n{}",
        stderr(&out)
    );
    let report = read_report(&case.report_path());
    let warnings = warnings(&report);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("connection to libvirt") && w.contains("still running")),
        "the lost connection is reported: {warnings:?}"
    );
    case.taken(&report, at_begin);
    // The cleanup reconnected: the job is ended, its directory and scratch files gone, and the
    // older checkpoint deleted now that the new one is the base.
    case.assert_nothing_left();
    case.assert_one_checkpoint();
    assert_ne!(case.vm.checkpoints(), first_checkpoint);

    // The next run needs nobody's help, and counts the changes from the new checkpoint.
    let next = case.backup();
    assert!(self::warnings(&next).is_empty(), "{next}");
    assert_eq!(
        bytes_read(&next),
        chunk_bytes(DURING) + chunk_bytes(&DURING[..1])
    );
    case.assert_nothing_left();
    case.assert_one_checkpoint();
    case.assert_restores();
}

#[test]
fn libvirtd_gone_until_the_run_ended_it_fails_and_the_next_run_ends_the_job() {
    let mut case = Case::new();
    case.backup();
    let checkpoints = case.vm.checkpoints();
    guest_writes(&case.vm, "vda", VDA_SECOND, 6);

    let (child, pause) = case.paused_backup();
    case.libvirtd.stop();
    let out = resume(child, &pause);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nothing can confirm that the job's view held until the end:\n{}",
        stderr(&out)
    );
    let said = stderr(&out);
    assert!(
        said.contains("libvirt") && said.contains("next run"),
        "a clear error: {said}"
    );
    assert_eq!(snapshot_ids(&case.repo).len(), 1, "nothing committed");

    case.libvirtd.start_again();
    assert!(
        case.vm.has_backup_job(),
        "nobody could end the job while libvirtd was down"
    );
    let next = case.backup();
    let warnings = warnings(&next);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("cleaned up after a run") && w.contains("aborted")),
        "{warnings:?}"
    );
    assert_eq!(
        bytes_read(&next),
        chunk_bytes(VDA_SECOND),
        "counted from the last committed checkpoint"
    );
    case.assert_nothing_left();
    case.assert_one_checkpoint();
    assert_ne!(case.vm.checkpoints(), checkpoints);
    case.assert_restores();
}

#[test]
fn a_job_whose_directory_is_gone_is_recognised_as_ours_and_ended() {
    let mut case = Case::new();
    case.backup();
    guest_writes(&case.vm, "vdb", &[(MIB, 64 << 10)], 7);
    // A run killed mid-transfer whose job directory was removed afterwards (as versions before
    // this one did when they could not reach libvirt): only the job's socket path says whose it
    // was.
    let (mut child, pause) = case.paused_backup();
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&pause).unwrap();
    for dir in std::fs::read_dir(&case.tmp).unwrap() {
        std::fs::remove_dir_all(dir.unwrap().path()).unwrap();
    }
    assert!(case.vm.has_backup_job());

    let next = case.backup();
    let warnings = warnings(&next);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("backflow-libvirt-") && w.contains("aborted")),
        "{warnings:?}"
    );
    assert_eq!(bytes_read(&next), CHUNK);
    case.assert_nothing_left();
    case.assert_one_checkpoint();
    case.assert_restores();
}
