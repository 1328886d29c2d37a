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
use std::process::{Child, Command, Output, Stdio};

use backflow_testkit::libvirt::{Domain, make_traversable};
use backflow_testkit::libvirtd::PrivateLibvirtd;
use backflow_testkit::qemu::compare_images;
use common::*;

const CHUNK: u64 = 128 << 10;
const MIB: u64 = 1 << 20;

/// What the guest writes before the first backup, per disk.
const VDA_FIRST: &[(u64, u64)] = &[(0, 2 * MIB), (10 * MIB, 4 * MIB), (40 * MIB, MIB)];
const VDB_FIRST: &[(u64, u64)] = &[(MIB, 3 * MIB), (20 * MIB, 64 << 10)];
/// Written between the first and the second backup.
const VDA_SECOND: &[(u64, u64)] = &[(4096, 4096), (33 * MIB, 200 << 10)];
/// Written while the second backup is paused: not in it, in the third.
const DURING: &[(u64, u64)] = &[(0, MIB), (50 * MIB, 2 * MIB)];

/// One restore point: the snapshot, and a raw copy of each disk when its job began.
struct Point {
    id: String,
    disks: Vec<(String, PathBuf)>,
}

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
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        init_repo(&repo, "128K");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        for d in [dir.path(), tmp.as_path()] {
            make_traversable(d);
        }
        write(&vm, "vda", VDA_FIRST, 1);
        write(&vm, "vdb", VDB_FIRST, 2);
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
        let mut cmd = backflow();
        cmd.env("TMPDIR", &self.tmp)
            .arg("run")
            .arg(spec("backup-vm.yaml"))
            .arg("--var")
            .arg(format!("domain={}", self.vm.name()))
            .arg("--var")
            .arg(format!("repo={}", self.repo.display()))
            .arg("--var")
            .arg(format!("uri={}", self.libvirtd.uri()))
            .args(["--var", "freeze=off", "--quiet", "--report"])
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
        let mut child = self
            .command()
            .env("BACKFLOW_PAUSE_MID_TRANSFER", &pause)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_pause(&mut child, &pause, 120);
        (child, pause)
    }

    /// Every restore point restores identical to the disks as they were when its job began.
    fn assert_restores(&self) {
        for point in &self.points {
            let out = self.dir.path().join("restored");
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir(&out).unwrap();
            let restored = restore(&self.repo, &point.id, &out);
            assert!(
                restored.status.success(),
                "restore {}: {}",
                point.id,
                String::from_utf8_lossy(&restored.stderr)
            );
            for (target, copy) in &point.disks {
                let image = out.join(format!("{target}.raw"));
                if let Err(verdict) = compare_images(&image, "raw", copy, "raw") {
                    panic!("snapshot {} disk {target} differs: {verdict}", point.id);
                }
            }
        }
    }

    /// No backup job on the VM, nothing in the runs' TMPDIR (job directories, scratch files).
    fn assert_nothing_left(&self) {
        assert!(
            !self.vm.has_backup_job(),
            "a backup job is left on {}",
            self.vm.name()
        );
        let left: Vec<_> = std::fs::read_dir(&self.tmp).unwrap().collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }

    /// The one checkpoint left is ours: older ones went once a snapshot was committed.
    fn assert_one_checkpoint(&self) {
        let checkpoints = self.vm.checkpoints();
        assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
        assert!(checkpoints[0].starts_with("backflow."), "{checkpoints:?}");
    }
}

/// Guest writes of `(offset, len)` with a pattern per write.
fn write(vm: &Domain, target: &str, writes: &[(u64, u64)], seed: u64) {
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let pattern = 1 + (seed + i as u64) % 250;
        vm.guest_write(target, &format!("write -P {pattern} {offset} {len}"));
    }
}

/// The chunks `(offset, len)` writes touch, times the chunk size: what an exact incremental reads.
fn chunk_bytes(writes: &[(u64, u64)]) -> u64 {
    let mut chunks: Vec<u64> = writes
        .iter()
        .flat_map(|&(offset, len)| offset / CHUNK..(offset + len).div_ceil(CHUNK))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks.len() as u64 * CHUNK
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
    write(&case.vm, "vda", VDA_SECOND, 3);

    let (child, pause) = case.paused_backup();
    let at_begin = case.copies();
    case.libvirtd.restart();
    // The restarted daemon took the job over: it still runs, and QEMU still exports the disks.
    assert!(
        case.vm.has_backup_job(),
        "libvirtd recovers a pull-mode job"
    );
    // Written after the job began: not in this backup, in the next.
    write(&case.vm, "vda", DURING, 4);
    write(&case.vm, "vdb", &DURING[..1], 5);
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
    write(&case.vm, "vda", VDA_SECOND, 6);

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
    write(&case.vm, "vdb", &[(MIB, 64 << 10)], 7);
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
