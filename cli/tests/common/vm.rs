//! Helpers of the tests that back up libvirt domains with `specs/backup-vm.yaml`: their files,
//! the command, guest writes and what an exact incremental reads of them, and the check that a
//! restore point restores identical to raw copies of the disks taken when its job began.

use std::path::{Path, PathBuf};
use std::process::Command;

use backflow_testkit::libvirt::{Domain, make_traversable};
use backflow_testkit::qemu::compare_images;

use super::{backflow, init_repo, read_report, restore_ok, run_ok, spec};

/// The chunk size of the repositories of [`vm_dirs`].
pub const CHUNK: u64 = 128 << 10;
pub const MIB: u64 = 1 << 20;

/// What the guest of a two-disk VM (vda of 64 MiB, vdb of 32 MiB) writes before its first backup,
/// per disk.
pub const VDA_FIRST: &[(u64, u64)] = &[(0, 2 * MIB), (10 * MIB, 4 * MIB), (40 * MIB, MIB)];
pub const VDB_FIRST: &[(u64, u64)] = &[(MIB, 3 * MIB), (20 * MIB, 64 << 10)];

/// One restore point: the snapshot, and a raw copy of each disk (by target) when its job began.
pub struct Point {
    pub id: String,
    pub disks: Vec<(String, PathBuf)>,
}

/// A VM test's files: a temporary directory, a repository of [`CHUNK`] chunks in it, and the
/// TMPDIR of the runs, where the job directories go. QEMU (user libvirt-qemu) creates the NBD
/// socket in a job directory, so it must be able to traverse both directories.
pub fn vm_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "128K");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for d in [dir.path(), tmp.as_path()] {
        make_traversable(d);
    }
    (dir, repo, tmp)
}

/// `backflow run specs/backup-vm.yaml` of `domain` into `repo`, quiet, without freezing the guest,
/// with TMPDIR `tmp`. Further `--var`s (a `uri`, a transport) and `--report` go after it.
pub fn backup_vm_command(tmp: &Path, domain: &str, repo: &Path) -> Command {
    let mut cmd = backflow();
    cmd.env("TMPDIR", tmp)
        .arg("run")
        .arg(spec("backup-vm.yaml"))
        .arg("--var")
        .arg(format!("domain={domain}"))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .args(["--var", "freeze=off", "--quiet"]);
    cmd
}

/// Backs the running `domain` up with `specs/backup-vm.yaml` into `repo` (without freezing the
/// guest), its report in `report`; returns the snapshot id.
pub fn backup_vm(repo: &Path, domain: &str, report: &Path) -> String {
    run_ok(
        backflow()
            .arg("run")
            .arg(spec("backup-vm.yaml"))
            .arg("--var")
            .arg(format!("repo={}", repo.display()))
            .args(["--var", &format!("domain={domain}"), "--var", "freeze=off"])
            .args(["--quiet", "--report"])
            .arg(report),
    );
    read_report(report)["snapshot"].as_str().unwrap().to_owned()
}

/// A domain a test may define (a restore's, an instant recovery's): destroyed and undefined when
/// the test ends, passed or not.
pub struct Defined(pub String);

impl Drop for Defined {
    fn drop(&mut self) {
        for args in [["destroy", &self.0], ["undefine", &self.0]] {
            let _ = backflow_testkit::libvirt::try_virsh(&args);
        }
    }
}

/// An instant recovery a test started under the state directory `.0`: discarded (its export
/// stopped) when the test ends, also when it failed midway.
pub struct Recovery(pub PathBuf, pub String);

impl Drop for Recovery {
    fn drop(&mut self) {
        if self.0.join(&self.1).exists() {
            let _ = backflow()
                .args(["instant-restore", "discard", &self.1, "--state-dir"])
                .arg(&self.0)
                .output();
        }
    }
}

/// Guest writes of `(offset, len)` with a pattern per write.
pub fn guest_writes(vm: &Domain, target: &str, writes: &[(u64, u64)], seed: u64) {
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let pattern = 1 + (seed + i as u64) % 250;
        vm.guest_write(target, &format!("write -P {pattern} {offset} {len}"));
    }
}

/// The chunks `(offset, len)` writes touch, times the chunk size: what an exact incremental reads.
pub fn chunk_bytes(writes: &[(u64, u64)]) -> u64 {
    let mut chunks: Vec<u64> = writes
        .iter()
        .flat_map(|&(offset, len)| offset / CHUNK..(offset + len).div_ceil(CHUNK))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks.len() as u64 * CHUNK
}

/// Restores `point` into `scratch/restored` (emptied first) and fails the test unless each of its
/// disks restored identical to its copy (`qemu-img compare`). Returns that directory.
pub fn restore_point(repo: &Path, point: &Point, scratch: &Path) -> PathBuf {
    let out = scratch.join("restored");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir(&out).unwrap();
    restore_ok(repo, &point.id, &out);
    for (target, copy) in &point.disks {
        let image = out.join(format!("{target}.raw"));
        if let Err(verdict) = compare_images(&image, "raw", copy, "raw") {
            panic!(
                "snapshot {} disk {target} differs from {}: {verdict}",
                point.id,
                copy.display()
            );
        }
    }
    out
}

/// No backup job on `vm`, nothing in the runs' TMPDIR `tmp` (job directories, scratch files,
/// qemu-nbd sockets).
pub fn assert_nothing_left(vm: &Domain, tmp: &Path) {
    assert!(
        !vm.has_backup_job(),
        "a backup job is left on {}",
        vm.name()
    );
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
