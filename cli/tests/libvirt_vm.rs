//! Backing up running libvirt VMs, end to end: the real binary, `specs/backup-vm.yaml`, a real
//! libvirtd and QEMU (`scripts/setup.sh` starts them), throwaway domains with qcow2 disks, guest
//! writes through QEMU's monitor.
//!
//! Every test keeps a raw copy of each disk as it was at each backup and checks that every
//! restore point restores identical to it (`qemu-img compare`), and after every run that no
//! backup job, job directory or scratch file is left.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};

use backflow_testkit::libvirt::Domain;
use common::vm::*;
use common::*;

/// One test's VM, repository and files.
struct Case {
    vm: Domain,
    dir: tempfile::TempDir,
    repo: PathBuf,
    /// The TMPDIR of the runs: where the job directories go, checked empty after each run.
    tmp: PathBuf,
    points: Vec<Point>,
}

impl Case {
    fn new(disks: &[(&str, &str)]) -> Case {
        let vm = Domain::start("bf-vm", disks);
        let (dir, repo, tmp) = vm_dirs();
        Case {
            vm,
            dir,
            repo,
            tmp,
            points: Vec::new(),
        }
    }

    /// The VM's disks (`virsh domblklist`), running or not.
    fn targets(&self) -> Vec<String> {
        let list = backflow_testkit::libvirt::virsh(&["domblklist", self.vm.name(), "--details"]);
        list.lines()
            .filter(|l| l.contains(" disk "))
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
            .collect()
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = backup_vm_command(&self.tmp, self.vm.name(), &self.repo);
        cmd.args(extra);
        cmd
    }

    fn report_path(&self) -> PathBuf {
        self.dir.path().join("report.json")
    }

    /// Copies every disk as it is now, for the restore point about to be taken.
    fn copies(&self) -> Vec<(String, PathBuf)> {
        let n = self.points.len();
        self.targets()
            .into_iter()
            .map(|t| {
                let copy = self.dir.path().join(format!("at-{n}-{t}.raw"));
                let _ = std::fs::remove_file(&copy);
                self.vm.copy_disk(&t, &copy);
                (t, copy)
            })
            .collect()
    }

    /// Runs a backup that must succeed and keeps the disks' copies for its restore point.
    fn backup(&mut self) -> serde_json::Value {
        let disks = self.copies();
        let report = self.report_path();
        run_ok(self.command(&[]).arg("--report").arg(&report));
        let report = read_report(&report);
        self.taken(&report, disks);
        report
    }

    fn taken(&mut self, report: &serde_json::Value, disks: Vec<(String, PathBuf)>) {
        let id = report["snapshot"].as_str().expect("a snapshot").to_owned();
        self.points.push(Point { id, disks });
        self.assert_nothing_left();
    }

    /// Every restore point restores identical to the disks as they were then, and to no other.
    fn assert_restores(&self) {
        for point in &self.points {
            let out = restore_point(&self.repo, point, self.dir.path());
            let restored_disks = std::fs::read_dir(&out).unwrap().count();
            assert_eq!(restored_disks, point.disks.len(), "snapshot {}", point.id);
        }
    }

    /// No backup job on the VM, nothing in the runs' TMPDIR (job directories, scratch files,
    /// qemu-nbd sockets).
    fn assert_nothing_left(&self) {
        assert_nothing_left(&self.vm, &self.tmp);
    }

    /// The one checkpoint left is the one the newest snapshot recorded for every disk.
    fn assert_one_checkpoint(&self, report: &serde_json::Value) {
        let checkpoints = self.vm.checkpoints();
        assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
        assert!(
            checkpoints[0].starts_with("backflow."),
            "{checkpoints:?} after {report}"
        );
    }

    /// A run with the pause hook: returns the running child once the VM's snapshot exists.
    fn paused_backup(&self) -> (Child, PathBuf) {
        let pause = self.dir.path().join("pause");
        let _ = std::fs::remove_file(&pause);
        let child = spawn_paused(
            self.command(&[]).arg("--report").arg(self.report_path()),
            "BACKFLOW_PAUSE_AFTER_SNAPSHOT",
            &pause,
            60,
        );
        (child, pause)
    }
}

/// Scattered, some unaligned and some spanning two chunks.
const VDA_SECOND: &[(u64, u64)] = &[
    (4096, 4096),
    (5 * MIB + (120 << 10), 16 << 10),
    (33 * MIB, 200 << 10),
];
const VDB_SECOND: &[(u64, u64)] = &[(MIB, 64 << 10), (30 * MIB - (64 << 10), 64 << 10)];

fn two_disk_case() -> Case {
    let case = Case::new(&[("vda", "64M"), ("vdb", "32M")]);
    guest_writes(&case.vm, "vda", VDA_FIRST, 1);
    guest_writes(&case.vm, "vdb", VDB_FIRST, 2);
    case
}

#[test]
fn two_disks_full_then_incremental_reads_only_the_dirty_extents() {
    let mut case = two_disk_case();
    let full = case.backup();
    assert!(warnings(&full).is_empty(), "{full}");
    let written = chunk_bytes(VDA_FIRST) + chunk_bytes(VDB_FIRST);
    assert_eq!(bytes_read(&full), written, "the full read holds the data");
    case.assert_one_checkpoint(&full);

    guest_writes(&case.vm, "vda", VDA_SECOND, 3);
    guest_writes(&case.vm, "vdb", VDB_SECOND, 4);
    let incremental = case.backup();
    assert!(warnings(&incremental).is_empty(), "{incremental}");
    assert_eq!(
        bytes_read(&incremental),
        chunk_bytes(VDA_SECOND) + chunk_bytes(VDB_SECOND),
        "the incremental reads exactly the chunks written since the full"
    );
    case.assert_one_checkpoint(&incremental);

    // Nothing written: nothing read.
    let idle = case.backup();
    assert_eq!(bytes_read(&idle), 0, "{idle}");
    case.assert_restores();

    // The snapshots keep the domain's definition.
    let repo = backflow_repository::Repository::open(&case.repo).unwrap();
    let snapshot = repo.open_snapshot(&case.points[0].id).unwrap();
    let xml = snapshot.meta().domain_xml.as_deref().expect("domain XML");
    assert!(
        xml.contains(&format!("<name>{}</name>", case.vm.name())),
        "{xml}"
    );
}

#[test]
fn guest_writes_during_the_backup_are_not_in_it() {
    let mut case = two_disk_case();
    case.backup();
    guest_writes(&case.vm, "vda", VDA_SECOND, 5);
    let (child, pause) = case.paused_backup();
    // The job began: the disks as they are now are the restore point.
    let at_begin = case.copies();
    let during: &[(u64, u64)] = &[(0, MIB), (50 * MIB, 2 * MIB)];
    guest_writes(&case.vm, "vda", during, 6);
    guest_writes(&case.vm, "vdb", during[..1].as_ref(), 7);
    resume_ok(child, &pause);
    let report = read_report(&case.report_path());
    case.taken(&report, at_begin);
    // The writes made during the backup are in the next one.
    let next = case.backup();
    assert_eq!(
        bytes_read(&next),
        chunk_bytes(during) + chunk_bytes(&during[..1])
    );
    case.assert_restores();
}

#[test]
fn vm_destroyed_mid_backup_fails_cleanly_and_the_next_run_reads_it_offline() {
    let mut case = two_disk_case();
    case.backup();
    guest_writes(&case.vm, "vda", VDA_SECOND, 8);
    let (child, pause) = case.paused_backup();
    case.vm.destroy();
    let out = resume(child, &pause);
    assert!(!out.status.success(), "the backup of a destroyed VM failed");
    assert_eq!(snapshot_ids(&case.repo).len(), 1, "nothing committed");
    case.assert_nothing_left();

    // Shut off now: read from the images, only what changed since the last commit.
    let report = case.backup();
    assert_eq!(bytes_read(&report), chunk_bytes(VDA_SECOND), "{report}");
    case.vm.start_again();
    guest_writes(&case.vm, "vdb", VDB_SECOND, 9);
    let report = case.backup();
    assert!(
        bytes_read(&report) >= chunk_bytes(VDB_SECOND),
        "the writes after the restart are read: {report}"
    );
    case.assert_one_checkpoint(&report);
    case.assert_restores();
}

#[test]
fn killed_backup_leaves_a_job_the_next_run_ends() {
    let mut case = two_disk_case();
    case.backup();
    guest_writes(&case.vm, "vdb", VDB_SECOND, 10);
    let (mut child, pause) = case.paused_backup();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let _ = std::fs::remove_file(&pause);
    assert!(case.vm.has_backup_job(), "libvirt keeps a killed run's job");
    assert_eq!(snapshot_ids(&case.repo).len(), 1, "nothing committed");

    let report = case.backup();
    let warnings = warnings(&report);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("cleaned up after a run that was killed") && w.contains("aborted")),
        "{warnings:?}"
    );
    assert_eq!(
        bytes_read(&report),
        chunk_bytes(VDB_SECOND),
        "only what changed since the last commit"
    );
    case.assert_one_checkpoint(&report);
    case.assert_restores();
}

#[test]
fn sigterm_mid_backup_ends_the_job_and_keeps_the_chain() {
    let mut case = two_disk_case();
    case.backup();
    let checkpoints = case.vm.checkpoints();
    guest_writes(&case.vm, "vda", VDA_SECOND, 20);
    let (child, pause) = case.paused_backup();
    sigterm(&child);
    let out = resume(child, &pause);
    assert!(
        !out.status.success(),
        "an interrupted backup does not succeed"
    );
    assert_eq!(snapshot_ids(&case.repo).len(), 1, "nothing committed");
    case.assert_nothing_left();
    assert_eq!(
        case.vm.checkpoints(),
        checkpoints,
        "the run's own checkpoint is gone"
    );
    let report = case.backup();
    assert_eq!(bytes_read(&report), chunk_bytes(VDA_SECOND), "{report}");
    case.assert_restores();
}

#[test]
fn checkpoint_deleted_behind_our_back_means_a_full_read_then_incremental_again() {
    let mut case = two_disk_case();
    case.backup();
    for name in case.vm.checkpoints() {
        backflow_testkit::libvirt::virsh(&["checkpoint-delete", case.vm.name(), &name]);
    }
    guest_writes(&case.vm, "vda", VDA_SECOND, 11);
    let report = case.backup();
    let warnings = warnings(&report);
    assert_eq!(warnings.len(), 2, "one per disk: {warnings:?}");
    assert!(
        warnings
            .iter()
            .all(|w| w.contains("no longer exists") && w.contains("reading all of it")),
        "{warnings:?}"
    );
    let all = chunk_bytes(VDA_FIRST) + chunk_bytes(VDB_FIRST) + chunk_bytes(VDA_SECOND)
        - overlap(VDA_FIRST, VDA_SECOND);
    assert_eq!(bytes_read(&report), all, "a full read");
    guest_writes(&case.vm, "vdb", VDB_SECOND, 12);
    let report = case.backup();
    assert!(self::warnings(&report).is_empty(), "{report}");
    assert_eq!(bytes_read(&report), chunk_bytes(VDB_SECOND));
    case.assert_one_checkpoint(&report);
    case.assert_restores();
}

/// Chunk bytes that two sets of writes both touch.
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    chunk_bytes(a) + chunk_bytes(b) - chunk_bytes(&[a, b].concat())
}

#[test]
fn disk_added_is_read_whole_while_the_others_stay_incremental() {
    let mut case = two_disk_case();
    case.backup();
    case.vm.attach_disk("vdc", "16M");
    let vdc: &[(u64, u64)] = &[(MIB, 2 * MIB)];
    guest_writes(&case.vm, "vdc", vdc, 13);
    guest_writes(&case.vm, "vda", VDA_SECOND, 14);
    let report = case.backup();
    let warnings = warnings(&report);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("vdc") && warnings[0].contains("new since"),
        "{warnings:?}"
    );
    assert_eq!(
        bytes_read(&report),
        chunk_bytes(VDA_SECOND) + chunk_bytes(vdc)
    );
    assert_eq!(case.points[1].disks.len(), 3);
    case.assert_one_checkpoint(&report);
    // And the new disk is incremental from now on.
    guest_writes(&case.vm, "vdc", &[(8 * MIB, 4096)], 15);
    let report = case.backup();
    assert_eq!(bytes_read(&report), CHUNK, "{report}");
    case.assert_restores();
}

#[test]
fn disk_resized_is_read_whole_with_a_warning() {
    let mut case = two_disk_case();
    case.backup();
    backflow_testkit::libvirt::virsh(&["blockresize", case.vm.name(), "vda", "80M"]);
    let tail: &[(u64, u64)] = &[(70 * MIB, MIB)];
    guest_writes(&case.vm, "vda", tail, 16);
    guest_writes(&case.vm, "vdb", VDB_SECOND, 17);
    let report = case.backup();
    let warnings = warnings(&report);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("vda") && w.contains("size")),
        "{warnings:?}"
    );
    assert_eq!(
        bytes_read(&report),
        chunk_bytes(VDA_FIRST) + chunk_bytes(tail) + chunk_bytes(VDB_SECOND),
        "vda in full, vdb incremental"
    );
    let restored = case.dir.path().join("vda-80M.raw");
    let out = run_ok(
        backflow()
            .args(["restore", "--quiet", "--repo"])
            .arg(&case.repo)
            .args(["--snapshot", &case.points[1].id, "--disk", "vda", "--to"])
            .arg(&restored),
    );
    drop(out);
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), 80 * MIB);
    case.assert_restores();
}

#[test]
fn vm_shut_off_between_runs_is_read_from_its_images() {
    let mut case = two_disk_case();
    case.backup();
    guest_writes(&case.vm, "vda", VDA_SECOND, 18);
    case.vm.destroy();
    let offline = case.backup();
    assert!(warnings(&offline).is_empty(), "{offline}");
    assert_eq!(bytes_read(&offline), chunk_bytes(VDA_SECOND), "{offline}");
    // Off and untouched: nothing to read.
    let idle = case.backup();
    assert_eq!(
        bytes_read(&idle),
        chunk_bytes(VDA_SECOND),
        "the chain stays at the last running checkpoint"
    );
    case.vm.start_again();
    guest_writes(&case.vm, "vdb", VDB_SECOND, 19);
    let online = case.backup();
    assert!(warnings(&online).is_empty(), "{online}");
    assert_eq!(
        bytes_read(&online),
        chunk_bytes(VDA_SECOND) + chunk_bytes(VDB_SECOND),
        "changes since the last running checkpoint"
    );
    case.assert_one_checkpoint(&online);
    case.assert_restores();
}

#[test]
fn without_a_guest_agent_the_backup_notes_it_is_crash_consistent() {
    let case = Case::new(&[("vda", "16M")]);
    let report = case.report_path();
    run_ok(
        case.command(&["--var", "freeze=auto"])
            .arg("--report")
            .arg(&report),
    );
    // A note, not a warning: a VM without an agent is no reason to mail anyone.
    let report = read_report(&report);
    assert!(warnings(&report).is_empty(), "{report}");
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("crash-consistent")),
        "{report}"
    );
    let out = case
        .command(&["--var", "freeze=required"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be frozen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    case.assert_nothing_left();
    // The failed run's checkpoint was deleted; the first one stays.
    assert_eq!(case.vm.checkpoints().len(), 1);
}

#[test]
fn tcp_transport_reads_the_export_over_the_network() {
    let mut case = two_disk_case();
    // A port nobody listens on now (the kernel's pick), for QEMU's NBD server on loopback.
    let port = backflow_testkit::smtp::free_port().to_string();
    let tcp = ["--var", "transport=tcp", "--var", "host=127.0.0.1", "--var"];
    let port_var = format!("port={port}");
    for round in 0..2 {
        if round == 1 {
            guest_writes(&case.vm, "vda", VDA_SECOND, 21);
        }
        let disks = case.copies();
        let report = case.report_path();
        run_ok(
            case.command(&tcp)
                .arg(&port_var)
                .arg("--report")
                .arg(&report),
        );
        let report = read_report(&report);
        let expected = if round == 0 {
            chunk_bytes(VDA_FIRST) + chunk_bytes(VDB_FIRST)
        } else {
            chunk_bytes(VDA_SECOND)
        };
        assert_eq!(bytes_read(&report), expected, "{report}");
        case.taken(&report, disks);
    }
    case.assert_restores();
}
