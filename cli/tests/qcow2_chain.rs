//! Changed block tracking on qcow2 images, end to end through the real binary and
//! `specs/backup-qcow2.yaml`: real qemu-nbd, qemu-img and qemu-io.
//!
//! Every test keeps a copy of the image as it was at each backup and checks that each restore
//! point restores identical to it (`qemu-img compare`). Needs qemu-img, qemu-io and qemu-nbd.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use backflow_testkit::qemu::{
    assert_no_process_naming, bitmaps, compare_images, qemu_io, run_command,
};
use common::*;

const CHUNK: u64 = 128 << 10;
const GRANULE: u64 = 64 << 10;

/// One test's files. Its own TMPDIR keeps the servers' socket directories apart from other
/// tests', so that "nothing left behind" can be checked.
struct Case {
    dir: tempfile::TempDir,
    image: PathBuf,
    repo: PathBuf,
    tmp: PathBuf,
    /// (snapshot id, copy of the image when it was taken)
    points: Vec<(String, PathBuf)>,
}

impl Case {
    /// A qcow2 of `size` bytes made from a generated OS-like image.
    fn new(size: u64, seed: u64) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("source.raw");
        backflow_fixtures::generate_image(&raw, size, seed).unwrap();
        let image = dir.path().join("vm1.qcow2");
        backflow_testkit::qemu::raw_to_qcow2(&raw, &image);
        std::fs::remove_file(&raw).unwrap();
        let repo = dir.path().join("repo");
        init_repo(&repo, "128K");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        Case {
            dir,
            image,
            repo,
            tmp,
            points: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = backflow();
        cmd.env("TMPDIR", &self.tmp)
            .arg("run")
            .arg(spec("backup-qcow2.yaml"))
            .arg("--var")
            .arg(format!("source={}", self.image.display()))
            .arg("--var")
            .arg(format!("repo={}", self.repo.display()))
            .args(["--var", "disk=vda", "--quiet"]);
        cmd
    }

    /// Runs a backup that must succeed; keeps a copy of the image for its restore point.
    fn backup(&mut self) -> serde_json::Value {
        let report_path = self.dir.path().join("report.json");
        run_ok(self.command().arg("--report").arg(&report_path));
        let report = read_report(&report_path);
        let id = report["snapshot"].as_str().expect("a snapshot").to_owned();
        let copy = self
            .dir
            .path()
            .join(format!("at-{}.qcow2", self.points.len()));
        copy_sparse(&self.image, &copy);
        self.points.push((id, copy));
        self.assert_nothing_left();
        report
    }

    /// qemu-io writes of 64 KiB (pattern varying per write) at each granule index.
    fn write(&self, granules: &[u64]) {
        for batch in granules.chunks(512) {
            let writes: Vec<String> = batch
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    format!(
                        "write -P {} {} {}",
                        1 + (g + i as u64) % 250,
                        g * GRANULE,
                        GRANULE
                    )
                })
                .collect();
            qemu_io(
                &self.image,
                &writes.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
    }

    /// Every restore point restores identical to the image as it was then.
    fn assert_restores(&self) {
        for (id, copy) in &self.points {
            let out = self.dir.path().join("restored.raw");
            restore_ok(&self.repo, id, &out);
            if let Err(verdict) = compare_images(&out, "raw", copy, "qcow2") {
                panic!("snapshot {id} differs from {}: {verdict}", copy.display());
            }
            std::fs::remove_file(&out).unwrap();
        }
    }

    fn bitmaps(&self) -> Vec<serde_json::Value> {
        bitmaps(&self.image)
    }

    /// No server still runs on the image and no socket directory is left.
    fn assert_nothing_left(&self) {
        assert_no_process_naming(&self.image);
        let left: Vec<_> = std::fs::read_dir(&self.tmp).unwrap().collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }
}

fn names(bitmaps: &[serde_json::Value]) -> Vec<String> {
    bitmaps
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The one tracking bitmap, which the manifest of the newest snapshot names.
fn assert_chain_bitmap(case: &Case) -> String {
    let bitmaps = case.bitmaps();
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    let name = bitmaps[0]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("backflow."), "{name}");
    assert!(
        bitmaps[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "auto"),
        "the bitmap records writes: {bitmaps:?}"
    );
    let repo = backflow_repository::Repository::open(&case.repo).unwrap();
    let snapshot = repo.open_snapshot("latest").unwrap();
    let cbt = snapshot.meta().disks[0].cbt.clone().expect("a cbt state");
    assert_eq!(cbt["bitmap"], name, "{cbt}");
    assert_eq!(cbt["method"], "qcow2-bitmap");
    name
}

/// `count` distinct granules spread over `size` bytes (a fixed LCG: the same every run).
fn scattered(size: u64, count: usize, seed: u64) -> Vec<u64> {
    let granules = size / GRANULE;
    let mut picked = BTreeSet::new();
    let mut x = seed;
    while picked.len() < count {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        picked.insert((x >> 33) % granules);
    }
    picked.into_iter().collect()
}

/// Bytes of the whole chunks that the granules touch.
fn chunk_bytes(granules: &[u64]) -> u64 {
    let chunks: BTreeSet<u64> = granules.iter().map(|g| g * GRANULE / CHUNK).collect();
    chunks.len() as u64 * CHUNK
}

#[test]
fn a_2gib_qcow2_incremental_reads_only_the_dirty_chunks() {
    const SIZE: u64 = 2 << 30;
    let mut case = Case::new(SIZE, 31);
    let full = case.backup();
    assert_eq!(warnings(&full), Vec::<String>::new());
    assert!(bytes_read(&full) > SIZE / 4, "{full}");
    let first = assert_chain_bitmap(&case);

    // 5% of the disk, at scattered 64 KiB granules.
    let dirty = scattered(SIZE, (SIZE / GRANULE / 20) as usize, 7);
    case.write(&dirty);
    let incremental = case.backup();
    assert_eq!(warnings(&incremental), Vec::<String>::new());
    assert_eq!(
        bytes_read(&incremental),
        chunk_bytes(&dirty),
        "{incremental}"
    );
    let second = assert_chain_bitmap(&case);
    assert_ne!(first, second, "the bitmap was rotated");

    // Nothing written since: nothing read.
    let idle = case.backup();
    assert_eq!(bytes_read(&idle), 0, "{idle}");
    case.assert_restores();
}

/// `qemu-img bitmap OP IMAGE NAME`.
fn bitmap_op(image: &Path, op: &str, name: &str) {
    run_command(
        Command::new("qemu-img")
            .args(["bitmap", op])
            .arg(image)
            .arg(name),
    );
}

/// A 64 MiB case with one full backup taken; returns it with its bytes read.
fn small_case(seed: u64) -> (Case, u64) {
    let mut case = Case::new(64 << 20, seed);
    let full = case.backup();
    assert_eq!(warnings(&full), Vec::<String>::new());
    (case, bytes_read(&full))
}

/// After a fallback the chain starts again: the next run is incremental, without warnings.
fn assert_incremental_again(case: &mut Case) {
    let dirty = [7, 8, 900];
    case.write(&dirty);
    let next = case.backup();
    assert_eq!(warnings(&next), Vec::<String>::new());
    assert_eq!(bytes_read(&next), chunk_bytes(&dirty));
    assert_chain_bitmap(case);
    case.assert_restores();
}

#[test]
fn a_deleted_bitmap_means_a_full_read_with_a_warning() {
    let (mut case, full) = small_case(32);
    let base = assert_chain_bitmap(&case);
    case.write(&[3, 400, 401]);
    bitmap_op(&case.image, "--remove", &base);

    let fallback = case.backup();
    let said = warnings(&fallback).join("\n");
    assert!(said.contains(&base) && said.contains("no longer"), "{said}");
    assert!(said.contains("reading all of it"), "{said}");
    // Everything allocated was read again (the writes landed in allocated or new clusters).
    assert!(bytes_read(&fallback) >= full, "{fallback}");
    assert_chain_bitmap(&case);
    assert_incremental_again(&mut case);
}

#[test]
fn a_disabled_bitmap_means_a_full_read_with_a_warning_and_is_retired() {
    let (mut case, full) = small_case(33);
    let base = assert_chain_bitmap(&case);
    bitmap_op(&case.image, "--disable", &base);
    // Written while the bitmap did not record: only a full read finds these.
    case.write(&[5, 6, 700]);

    let fallback = case.backup();
    let said = warnings(&fallback).join("\n");
    assert!(said.contains(&base) && said.contains("disabled"), "{said}");
    assert!(bytes_read(&fallback) >= full, "{fallback}");
    let now = assert_chain_bitmap(&case);
    assert_ne!(
        now, base,
        "the disabled bitmap was removed after the commit"
    );
    assert_incremental_again(&mut case);
}

#[test]
fn a_resized_disk_means_a_full_read_with_a_warning() {
    let (mut case, full) = small_case(34);
    let base = assert_chain_bitmap(&case);
    run_command(
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(&case.image)
            .arg("+16M"),
    );
    // Data in the new tail and in the old part.
    case.write(&[10, 1030]);

    let fallback = case.backup();
    let said = warnings(&fallback).join("\n");
    assert!(said.contains("size"), "{said}");
    assert!(bytes_read(&fallback) >= full, "{fallback}");
    assert_ne!(assert_chain_bitmap(&case), base);
    assert_incremental_again(&mut case);
}

#[test]
fn a_failed_run_leaves_the_chain_as_it_was() {
    let (mut case, _) = small_case(35);
    let before = names(&case.bitmaps());
    let dirty = [1, 2, 500];
    case.write(&dirty);

    // A repository that does not exist: the run fails after the server started.
    let failed = case
        .command()
        .arg("--var")
        .arg(format!(
            "repo={}",
            case.dir.path().join("nowhere").display()
        ))
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert_eq!(
        names(&case.bitmaps()),
        before,
        "the failed run's bitmap is gone"
    );
    case.assert_nothing_left();

    let next = case.backup();
    assert_eq!(warnings(&next), Vec::<String>::new());
    assert_eq!(bytes_read(&next), chunk_bytes(&dirty));
    case.assert_restores();
}

#[test]
fn sigkill_after_the_read_before_the_commit_resumes_from_the_old_base() {
    let (mut case, _) = small_case(36);
    let base = assert_chain_bitmap(&case);
    let dirty = [20, 21, 22, 800];
    case.write(&dirty);

    let pause = case.dir.path().join("paused");
    let mut child = spawn_paused(
        &mut case.command(),
        stage_repo_writer::PAUSE_BEFORE_COMMIT,
        &pause,
        120,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&pause).unwrap();

    // Nothing committed; the old base and the killed run's bitmap are both there.
    assert_eq!(snapshot_ids(&case.repo).len(), 1);
    assert_verifies(&case.repo, "after the killed run");
    let left = names(&case.bitmaps());
    assert!(left.contains(&base) && left.len() == 2, "{left:?}");

    // The next run stops the orphaned server, reads what changed since the last commit, and
    // leaves one bitmap.
    let next = case.backup();
    let said = warnings(&next).join("\n");
    assert!(said.contains("killed"), "{said}");
    assert_eq!(bytes_read(&next), chunk_bytes(&dirty));
    assert_chain_bitmap(&case);
    case.assert_restores();
}

/// A pack whose trailer is damaged is left out of a rebuilt index: its chunks have no copy the index
/// knows. The next incremental does not take them over from its parent unchanged (a snapshot born
/// broken): it reads them from the image and stores them again, says so, and restores whole.
#[test]
fn chunks_the_index_lost_are_read_again_by_the_next_incremental() {
    let (mut case, _) = small_case(35);
    assert_chain_bitmap(&case);
    let packs = pack_files(&case.repo);
    let victim = &packs[packs.len() / 2];
    flip_byte(victim, victim.metadata().unwrap().len() - 64 - 20).unwrap();
    let rebuilt = backflow()
        .args(["rebuild-index", "--repo"])
        .arg(&case.repo)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rebuilt.stdout).contains("left out"),
        "{rebuilt:?}"
    );

    let dirty = [5, 6, 700];
    case.write(&dirty);
    let next = case.backup();
    let said = warnings(&next).join("\n");
    assert!(
        said.contains("no healthy copy") && said.contains("storing them again"),
        "{said}"
    );
    assert!(bytes_read(&next) > chunk_bytes(&dirty), "{next}");
    // And the chain goes on: the next one reads only what changed.
    let dirty = [7, 8, 900];
    case.write(&dirty);
    let last = case.backup();
    assert_eq!(warnings(&last), Vec::<String>::new());
    assert_eq!(bytes_read(&last), chunk_bytes(&dirty));
    // Both new restore points restore whole; the first one lost the damaged pack's chunks.
    case.points.remove(0);
    case.assert_restores();
}
