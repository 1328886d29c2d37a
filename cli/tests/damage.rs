//! Damage never spreads (issue 11), on the real binary and real repositories:
//! - the reproduction: a flipped byte in a pack header, then verify, gc and new backups; nothing
//!   that could be saved is lost and every snapshot restores;
//! - every kind of file and field of the format damaged in turn (one row of [`CASES`] each):
//!   `verify --read-data` predicts exactly which snapshots fail to restore, gc deletes nothing
//!   that could be read, and the next backup of the intact sources restores byte-identical;
//! - no false alarms: verify in a loop beside backups, forgets and gcs reports no damage.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Size of each generated image: a few MiB of OS-like data keep dozens of cases within minutes.
const IMAGE_SIZE: u64 = 4 << 20;
/// Share of an image rewritten between two of its backups, so that snapshots differ.
const CHANGE: f64 = 0.05;
/// Longest any one command may run before the test calls it a hang (and kills it).
const HANG: Duration = Duration::from_secs(120);
/// Cases run at once (each on its own copy of the repository).
const CASE_THREADS: usize = 2;
/// How long the loops of the no-false-alarm test run side by side.
const CONCURRENT_RUN: Duration = Duration::from_secs(60);
/// Restricts the table test to the cases whose name contains one of these comma-separated words
/// (for working on one kind of damage); unset, every case runs.
const CASES_FILTER: &str = "BACKFLOW_DAMAGE_CASES";

// ---------------------------------------------------------------------------------------------
// What the test knows of the on-disk format (repository/src/lib.rs is its design document).

const PACK_ENTRY: u64 = 56;
const PACK_FOOTER: u64 = 64;
const INDEX_HEADER: u64 = 32;
const INDEX_PACK_ID: u64 = 16;
const INDEX_FANOUT: u64 = 256 * 8;
const INDEX_RECORD: u64 = 56;
const SNAP_HEADER: u64 = 32;
const SNAP_ENTRY: u64 = 32;
const CHECKSUM: u64 = 32;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A snapshot manifest as the test reads it.
struct Manifest {
    meta_len: u64,
    /// The chunk-table entries of all disks in order; `None` for a zero chunk.
    entries: Vec<Option<[u8; 32]>>,
}

fn read_manifest(path: &Path) -> Manifest {
    let b = std::fs::read(path).unwrap();
    let meta_len = u64_at(&b, 16);
    let meta_end = (SNAP_HEADER + meta_len) as usize;
    let entries = b[meta_end..b.len() - CHECKSUM as usize]
        .chunks_exact(SNAP_ENTRY as usize)
        .map(|e| (!e.iter().all(|&x| x == 0)).then(|| <[u8; 32]>::try_from(e).unwrap()))
        .collect();
    Manifest { meta_len, entries }
}

/// Where the record of `digest` is in index file `path`: (offset of the record, offset of the
/// pack-table entry it names).
fn find_record(path: &Path, digest: &[u8; 32]) -> Option<(u64, u64)> {
    let b = std::fs::read(path).unwrap();
    let records = u64_at(&b, 16);
    let packs = u64::from(u32_at(&b, 24));
    let start = INDEX_HEADER + packs * INDEX_PACK_ID + INDEX_FANOUT;
    (0..records).find_map(|j| {
        let at = (start + j * INDEX_RECORD) as usize;
        (b[at..at + 32] == digest[..]).then(|| {
            let pack = u64::from(u32_at(&b, at + 32));
            (at as u64, INDEX_HEADER + pack * INDEX_PACK_ID)
        })
    })
}

fn relative(repo: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(repo).unwrap().to_owned()
}

fn index_files(repo: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Images, backups, restores.

/// A restore point and a copy of its image as it was at that backup.
#[derive(Clone, Debug)]
struct Point {
    id: String,
    vm: String,
    copy: PathBuf,
}

/// Two generated OS-like images with distinct data, named (as VMs and disks) `a` and `b`.
fn two_images(dir: &Path, seeds: [u64; 2]) -> Vec<(String, PathBuf)> {
    ["a", "b"]
        .iter()
        .zip(seeds)
        .map(|(vm, seed)| {
            let path = dir.join(format!("{vm}.img"));
            backflow_fixtures::generate_image(&path, IMAGE_SIZE, seed).unwrap();
            ((*vm).to_owned(), path)
        })
        .collect()
}

/// `rounds` backups of every image, each image changed a little before every round but the
/// first; a copy of each image as backed up is kept in `copies`.
fn back_up_rounds(
    repo: &Path,
    sources: &[(String, PathBuf)],
    rounds: u64,
    copies: &Path,
    seed: u64,
) -> Vec<Point> {
    std::fs::create_dir_all(copies).unwrap();
    let mut points = Vec::new();
    for round in 0..rounds {
        for (i, (vm, image)) in sources.iter().enumerate() {
            if round > 0 {
                backflow_fixtures::change_image(image, CHANGE, seed + 10 * round + i as u64)
                    .unwrap();
            }
            let (id, copy) = backup_kept(copies, image, repo, vm);
            points.push(Point {
                id,
                vm: vm.clone(),
                copy,
            });
        }
    }
    points
}

fn snapshot_exists(repo: &Path, id: &str) -> bool {
    repo.join("snapshots").join(format!("{id}.snap")).exists()
}

/// A backup of `image` as VM `vm`, with a time limit; the new snapshot's id.
fn timed_backup(repo: &Path, image: &Path, vm: &str, report: &Path) -> Result<String, String> {
    let ran = run_timed(
        backup_command(image, repo, vm).arg("--report").arg(report),
        HANG,
    )?;
    if !ran.success() {
        return Err(format!("backup of {vm} failed: {}", ran.describe()));
    }
    let json = read_report(report);
    let _ = std::fs::remove_file(report);
    json["snapshot"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("backup of {vm}: no snapshot in the report {json}"))
}

fn timed_restore(repo: &Path, id: &str, to: &Path, extra: &[&str]) -> Result<Ran, String> {
    run_timed(
        backflow()
            .args(["restore", "--quiet", "--no-sync", "--repo"])
            .arg(repo)
            .args(["--snapshot", id, "--to"])
            .arg(to)
            .args(extra),
        HANG,
    )
}

/// `Ok` when `point` restores byte-identical to its copy; else what happened.
fn restores_identical(repo: &Path, point: &Point, scratch: &Path) -> Result<(), String> {
    let to = scratch.join(format!("{}.img", point.id));
    let _ = std::fs::remove_file(&to);
    let ran = timed_restore(repo, &point.id, &to, &[])?;
    let result = if !ran.success() {
        Err(format!("restore failed ({})", ran.describe()))
    } else if !same_bytes(&to, &point.copy) {
        Err("restored, but the bytes differ from the image".to_owned())
    } else {
        Ok(())
    };
    let _ = std::fs::remove_file(&to);
    result
}

/// `Ok` when a restore of `point` fails the way a damaged snapshot must: exit 1, one error line
/// that names what is damaged, no panic, no output file left; then, where `--allow-damaged`
/// exists, a restore with it succeeds.
fn fails_clearly(
    repo: &Path,
    point: &Point,
    scratch: &Path,
    allow_damaged: bool,
) -> Result<(), String> {
    let to = scratch.join(format!("{}.img", point.id));
    let _ = std::fs::remove_file(&to);
    let ran = timed_restore(repo, &point.id, &to, &[])?;
    if ran.success() {
        let same = same_bytes(&to, &point.copy);
        let _ = std::fs::remove_file(&to);
        return Err(format!(
            "verify names it, but it restores ({})",
            if same {
                "byte-identical: a false alarm"
            } else {
                "with wrong bytes and exit 0"
            }
        ));
    }
    clear_failure(&ran, repo).map_err(|e| format!("restore: {e}"))?;
    if to.exists() {
        let _ = std::fs::remove_file(&to);
        return Err("a failed restore left its output file".into());
    }
    if allow_damaged {
        let ran = timed_restore(repo, &point.id, &to, &["--allow-damaged"])?;
        let _ = std::fs::remove_file(&to);
        // Zeros stand in for damaged chunks, not for a damaged manifest (the list of chunks
        // itself): that restore still fails, clearly and naming the manifest.
        let manifest = format!("snapshots/{}.snap", point.id);
        let manifest_damaged = ran.error_lines().iter().any(|l| l.contains(&manifest));
        if !ran.success() && (!manifest_damaged || clear_failure(&ran, repo).is_err()) {
            return Err(format!(
                "restore --allow-damaged failed ({})",
                ran.describe()
            ));
        }
    }
    Ok(())
}

/// A refusal an operator can act on: exit 1, no panic, exactly one error line, naming a file of
/// the repository, a chunk digest or a snapshot.
fn clear_failure(ran: &Ran, repo: &Path) -> Result<(), String> {
    if ran.stderr.contains("panicked") {
        return Err(format!("panicked: {}", ran.stderr));
    }
    if ran.status.code() != Some(1) {
        return Err(format!(
            "exit {} (expected 1): {}",
            ran.status,
            ran.describe()
        ));
    }
    let lines = ran.error_lines();
    let [line] = lines[..] else {
        return Err(format!(
            "{} error lines, expected one: {}",
            lines.len(),
            ran.stderr
        ));
    };
    let names_digest = line
        .split(|c: char| !c.is_ascii_hexdigit())
        .any(|w| w.len() == 64);
    let names_file = line.contains(&*repo.to_string_lossy());
    let names_snapshot = line.contains("snapshot");
    if !(names_digest || names_file || names_snapshot) {
        return Err(format!("the error names nothing damaged: {line}"));
    }
    Ok(())
}

/// What `verify --read-data --json` said.
struct Verified {
    ran: Ran,
    report: serde_json::Value,
    /// Snapshots it says cannot be restored: users of damaged chunks that are not healed, and
    /// damaged manifests.
    named: BTreeSet<String>,
}

fn timed_verify(repo: &Path) -> Result<Verified, String> {
    let ran = run_timed(
        backflow()
            .args(["verify", "--read-data", "--json", "--repo"])
            .arg(repo),
        HANG,
    )?;
    if ran.stderr.contains("panicked") || !matches!(ran.status.code(), Some(0 | 1)) {
        return Err(format!("verify: {}", ran.describe()));
    }
    let report: serde_json::Value = serde_json::from_str(&ran.stdout)
        .map_err(|e| format!("verify wrote no report ({e}): {}", ran.describe()))?;
    let mut named = BTreeSet::new();
    for p in report["problems"].as_array().into_iter().flatten() {
        if p["healed"] != true {
            for s in p["snapshots"].as_array().into_iter().flatten() {
                named.insert(s.as_str().unwrap().to_owned());
            }
        }
    }
    for f in report["damaged_snapshots"].as_array().into_iter().flatten() {
        let path = Path::new(f["path"].as_str().unwrap());
        named.insert(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    Ok(Verified { ran, report, named })
}

/// A verify report in one line: what it found damaged, for failure messages.
fn summary(report: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for key in [
        "damaged_snapshots",
        "damaged_index_files",
        "damaged_packs",
        "side_files",
    ] {
        for f in report[key].as_array().into_iter().flatten() {
            parts.push(format!("{key}: {}: {}", f["path"], f["error"]));
        }
    }
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for p in &problems {
        let healed = if p["healed"] == true { " (healed)" } else { "" };
        *kinds
            .entry(format!("{}{healed}", p["kind"].as_str().unwrap_or("?")))
            .or_default() += 1;
    }
    for (kind, n) in kinds {
        parts.push(format!("{n} chunk(s) {kind}"));
    }
    if parts.is_empty() {
        "nothing damaged".to_owned()
    } else {
        parts.join("; ")
    }
}

/// Whether a verify report says anything is wrong (healed copies included).
fn reports_damage(report: &serde_json::Value) -> bool {
    [
        "damaged_snapshots",
        "damaged_index_files",
        "damaged_packs",
        "side_files",
        "problems",
    ]
    .iter()
    .any(|k| report[k].as_array().is_some_and(|a| !a.is_empty()))
}

/// The file named `name` anywhere under `dir`.
fn find_named(dir: &Path, name: &std::ffi::OsStr) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.is_dir() {
            found.extend(find_named(&path, name));
        } else if path.file_name() == Some(name) {
            found.push(path);
        }
    }
    found
}

fn allow_damaged_exists() -> bool {
    let help = run_ok(backflow().args(["restore", "--help"]));
    String::from_utf8_lossy(&help.stdout).contains("--allow-damaged")
}

// ---------------------------------------------------------------------------------------------
// 1. The reproduction of the issue.

/// Two images, five backups of each, byte 19 of one pack flipped (inside the pack id of its
/// header: the blobs are intact), `verify --read-data`, `gc` (default threshold, then on another
/// copy threshold 0), new backups of both images: every snapshot restores byte-identical (gc
/// salvaged the pack's blobs and quarantined the pack instead of deleting it) and verify then
/// passes.
#[test]
fn a_flipped_pack_header_byte_loses_nothing_and_new_backups_restore() {
    let dir = tempfile::tempdir().unwrap();
    let sources = two_images(dir.path(), [31, 32]);
    let template = dir.path().join("template");
    init_repo(&template, "64K");
    let copies = dir.path().join("copies");
    let points = back_up_rounds(&template, &sources, 5, &copies, 500);
    assert_eq!(points.len(), 10);

    // The pack holding the first data chunk of image a's first backup: every later backup of a
    // reuses most of its chunks.
    let first = read_manifest(&template.join(format!("snapshots/{}.snap", points[0].id)));
    let digest = first.entries.iter().flatten().next().unwrap();
    let pack = pack_files(&template)
        .into_iter()
        .find(|p| {
            backflow_repository::read_pack_trailer(p)
                .unwrap()
                .entries
                .iter()
                .any(|e| e.digest.0 == *digest)
        })
        .unwrap();
    let pack_rel = relative(&template, &pack);
    let pack_name = pack.file_name().unwrap().to_owned();

    let mut failures = Vec::new();
    for (label, gc_args) in [
        ("gc", &[][..]),
        ("gc --repack-threshold 0", &["--repack-threshold", "0"][..]),
    ] {
        let case = dir.path().join(label.replace(' ', "_"));
        std::fs::create_dir(&case).unwrap();
        let repo = case.join("repo");
        cp_a(&template, &repo);
        flip_byte(&repo.join(&pack_rel), 19).unwrap();
        let mut fail = |what: String| failures.push(format!("{label}: {what}"));

        if let Err(e) = timed_verify(&repo) {
            fail(e);
        }
        match run_timed(
            backflow().args(["gc", "--repo"]).arg(&repo).args(gc_args),
            HANG,
        ) {
            Err(e) => fail(e),
            Ok(ran) if !ran.success() => fail(format!("gc failed: {}", ran.describe())),
            Ok(_) => {}
        }
        // Salvaged and quarantined: out of packs/, but not deleted.
        let left: Vec<PathBuf> = find_named(&repo, &pack_name);
        if left.is_empty() {
            fail(format!(
                "gc deleted the header-damaged pack {}",
                pack_rel.display()
            ));
        } else if left.iter().any(|p| p.starts_with(repo.join("packs"))) {
            fail(format!(
                "the header-damaged pack {} is still in packs/, not quarantined",
                pack_rel.display()
            ));
        }

        let mut all = points.clone();
        for (vm, image) in &sources {
            match timed_backup(&repo, image, vm, &case.join("report.json")) {
                Ok(id) => all.push(Point {
                    id,
                    vm: vm.clone(),
                    copy: image.clone(),
                }),
                Err(e) => fail(e),
            }
        }
        for p in &all {
            let new = !points.iter().any(|q| q.id == p.id);
            if let Err(e) = restores_identical(&repo, p, &case) {
                fail(format!(
                    "{} snapshot {} of {}: {e}",
                    if new { "new" } else { "older" },
                    p.id,
                    p.vm
                ));
            }
        }
        // Everything restores, so verify must find the repository whole (a note on the
        // quarantined pack or a healed copy may remain, nothing that fails the check).
        match timed_verify(&repo) {
            Err(e) => fail(e),
            Ok(v) if !v.ran.success() || !v.named.is_empty() => fail(format!(
                "verify after the new backups fails ({}): {}",
                v.ran.status,
                summary(&v.report)
            )),
            Ok(_) => {}
        }
        std::fs::remove_dir_all(&case).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 2. Every kind of file and field damaged in turn.

/// Which prepared repository a case damages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// Ten snapshots (five of each image) and forgotten ones' garbage, one session record.
    Plain,
    /// [`Base::Plain`] with the target blob damaged and marked by a verify: a `damaged` file.
    Marked,
    /// [`Base::Plain`] after more forgets and a gc killed once its cycle was published: gc state
    /// and lists pending.
    GcPending,
}

/// The file a case damages.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The pack holding the target blob (a chunk some but not all snapshots use, in a pack that
    /// also holds chunks only forgotten snapshots used, so gc wants to rewrite it).
    Pack,
    /// The index file holding the target blob's record.
    Index,
    /// A manifest that is not the newest of its VM.
    Manifest,
    /// The newest manifest of a VM: the parent of its next backup.
    NewestManifest,
    Config,
    /// The damage marks, `damaged`.
    Marks,
    GcState,
    GcCondemned,
    GcDoomed,
    /// The session record, `sessions/ID.json`.
    Session,
}

/// Where in the file.
#[derive(Clone, Copy, Debug)]
enum At {
    /// This offset from the start.
    Byte(u64),
    /// This many bytes before the end.
    FromEnd(u64),
    Middle,
    /// This field of the target blob's trailer entry.
    TrailerEntry(u64),
    /// The middle of the target blob.
    Blob,
    /// The fanout slot of the target digest's first byte.
    Fanout,
    /// The pack-table entry the target record names.
    PackTable,
    /// This field of the target digest's index record.
    Record(u64),
    /// The middle of a manifest's metadata.
    Meta,
    /// A manifest's chunk-table entry (of the target digest where it has one).
    TableEntry,
    /// The whole file (removal).
    File,
}

#[derive(Clone, Copy, Debug)]
enum How {
    /// XOR 0x40 on the byte.
    Flip,
    /// Cut the file to this length.
    Truncate,
    /// This many zero bytes written over the data.
    Zero(u64),
    Remove,
}

/// Where the verify report must show the damage.
#[derive(Clone, Copy, Debug)]
enum Names {
    /// `damaged_packs` names the pack file, or a problem names the pack.
    PackFile,
    /// A problem (not healed) names the target chunk.
    Chunk,
    /// `damaged_index_files` names the index file.
    IndexFile,
    /// `damaged_snapshots` names the manifest.
    SnapshotFile,
    /// `side_files` names the file.
    SideFile,
    /// Something is reported (a removed file leaves nothing to name but what is missing).
    Anything,
}

/// What gc may do after the damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gc {
    /// Finish (exit 0): the damage must not stop it.
    Runs,
    /// Finish, or refuse with one clear error line (changing nothing): it cannot know what is
    /// referenced (manifest), what is indexed (index) or what its cycle was (gc state).
    MayRefuse,
}

struct Case {
    name: &'static str,
    base: Base,
    target: Target,
    at: At,
    how: How,
    names: Names,
    gc: Gc,
}

const fn case(
    name: &'static str,
    base: Base,
    target: Target,
    at: At,
    how: How,
    names: Names,
    gc: Gc,
) -> Case {
    Case {
        name,
        base,
        target,
        at,
        how,
        names,
        gc,
    }
}

use At::*;
use Base::*;
use Gc::*;
use How::*;
use Names::*;
use Target::*;

/// Every kind of file and field of the format (repository/src/lib.rs), one damage each: a table,
/// one row per line (hence no rustfmt).
#[rustfmt::skip]
const CASES: &[Case] = &[
    //   name                                base       file            where                     how                verify names  gc
    // Pack: header (magic, version, pack id), trailer entry, footer, blob data, whole file.
    case("pack header magic",                Plain,     Pack,           Byte(0),                  Flip,              PackFile,     Runs),
    case("pack header version",              Plain,     Pack,           Byte(8),                  Flip,              PackFile,     Runs),
    case("pack header pack id (byte 19)",    Plain,     Pack,           Byte(19),                 Flip,              PackFile,     Runs),
    case("pack trailer entry digest",        Plain,     Pack,           TrailerEntry(5),          Flip,              PackFile,     Runs),
    case("pack trailer entry offset",        Plain,     Pack,           TrailerEntry(32),         Flip,              PackFile,     Runs),
    case("pack trailer entry length",        Plain,     Pack,           TrailerEntry(40),         Flip,              PackFile,     Runs),
    case("pack trailer entry codec",         Plain,     Pack,           TrailerEntry(48),         Flip,              PackFile,     Runs),
    case("pack footer trailer offset",       Plain,     Pack,           FromEnd(PACK_FOOTER),     Flip,              PackFile,     Runs),
    case("pack footer entry count",          Plain,     Pack,           FromEnd(PACK_FOOTER - 8), Flip,              PackFile,     Runs),
    case("pack footer checksum",             Plain,     Pack,           FromEnd(35),              Flip,              PackFile,     Runs),
    case("pack footer magic",                Plain,     Pack,           FromEnd(1),               Flip,              PackFile,     Runs),
    case("pack footer zeroed",               Plain,     Pack,           FromEnd(PACK_FOOTER),     Zero(PACK_FOOTER), PackFile,     Runs),
    case("pack truncated (footer cut)",      Plain,     Pack,           FromEnd(10),              Truncate,          PackFile,     Runs),
    case("pack blob data",                   Plain,     Pack,           Blob,                     Flip,              Chunk,        Runs),
    case("pack removed",                     Plain,     Pack,           File,                     Remove,            PackFile,     Runs),
    // Index: header, pack table, fanout, record (digest, offset, length), checksum, whole file.
    case("index header magic",               Plain,     Index,          Byte(0),                  Flip,              IndexFile,    MayRefuse),
    case("index header record count",        Plain,     Index,          Byte(16),                 Flip,              IndexFile,    MayRefuse),
    case("index header pack count",          Plain,     Index,          Byte(24),                 Flip,              IndexFile,    MayRefuse),
    case("index pack table",                 Plain,     Index,          PackTable,                Flip,              IndexFile,    MayRefuse),
    case("index fanout",                     Plain,     Index,          Fanout,                   Flip,              IndexFile,    MayRefuse),
    case("index record digest",              Plain,     Index,          Record(5),                Flip,              IndexFile,    MayRefuse),
    case("index record offset",              Plain,     Index,          Record(40),               Flip,              IndexFile,    MayRefuse),
    case("index record length",              Plain,     Index,          Record(48),               Flip,              IndexFile,    MayRefuse),
    case("index checksum",                   Plain,     Index,          FromEnd(27),              Flip,              IndexFile,    MayRefuse),
    case("index truncated",                  Plain,     Index,          FromEnd(10),              Truncate,          IndexFile,    MayRefuse),
    case("index removed",                    Plain,     Index,          File,                     Remove,            Anything,     MayRefuse),
    // Manifest: header, metadata, chunk table, checksum; the newest one (a backup's parent).
    case("manifest header magic",            Plain,     Manifest,       Byte(0),                  Flip,              SnapshotFile, MayRefuse),
    case("manifest header meta length",      Plain,     Manifest,       Byte(16),                 Flip,              SnapshotFile, MayRefuse),
    case("manifest header entry count",      Plain,     Manifest,       Byte(24),                 Flip,              SnapshotFile, MayRefuse),
    case("manifest metadata",                Plain,     Manifest,       Meta,                     Flip,              SnapshotFile, MayRefuse),
    case("manifest chunk table",             Plain,     Manifest,       TableEntry,               Flip,              SnapshotFile, MayRefuse),
    case("manifest checksum",                Plain,     Manifest,       FromEnd(27),              Flip,              SnapshotFile, MayRefuse),
    case("manifest truncated",               Plain,     Manifest,       FromEnd(100),             Truncate,          SnapshotFile, MayRefuse),
    case("newest manifest (a parent) table", Plain,     NewestManifest, TableEntry,               Flip,              SnapshotFile, MayRefuse),
    // config: one damaged copy.
    case("config flipped",                   Plain,     Config,         Middle,                   Flip,              SideFile,     Runs),
    case("config emptied",                   Plain,     Config,         Byte(0),                  Truncate,          SideFile,     Runs),
    case("config removed",                   Plain,     Config,         File,                     Remove,            SideFile,     Runs),
    // Damage marks.
    case("marks header",                     Marked,    Marks,          Byte(3),                  Flip,              SideFile,     Runs),
    case("marks line",                       Marked,    Marks,          FromEnd(70),              Flip,              SideFile,     Runs),
    case("marks truncated mid-line",         Marked,    Marks,          FromEnd(10),              Truncate,          SideFile,     Runs),
    // gc state and lists of a pending cycle.
    case("gc state flipped",                 GcPending, GcState,        Middle,                   Flip,              SideFile,     MayRefuse),
    case("gc state truncated",               GcPending, GcState,        Middle,                   Truncate,          SideFile,     MayRefuse),
    case("gc condemned list",                GcPending, GcCondemned,    Middle,                   Flip,              SideFile,     MayRefuse),
    case("gc doomed-packs list",             GcPending, GcDoomed,       Middle,                   Flip,              SideFile,     MayRefuse),
    // Session records.
    case("session record flipped",           Plain,     Session,        Middle,                   Flip,              SideFile,     Runs),
    case("session record truncated",         Plain,     Session,        Middle,                   Truncate,          SideFile,     Runs),
];

/// A prepared repository and its snapshots.
struct Prepared {
    repo: PathBuf,
    points: Vec<Point>,
}

/// Where the targets are, found once in the plain repository (every base is a copy of it, so the
/// same paths and offsets hold there).
struct Layout {
    /// The target blob's chunk digest.
    digest: [u8; 32],
    pack: PathBuf,
    /// Offset and stored length of the target blob.
    blob: (u64, u64),
    /// Offset of the target blob's trailer entry.
    entry: u64,
    index: PathBuf,
    /// Offsets of the target record and of the pack-table entry it names.
    record: (u64, u64),
    manifest: PathBuf,
    newest_manifest: PathBuf,
    session: PathBuf,
}

struct Template {
    dir: tempfile::TempDir,
    sources: Vec<(String, PathBuf)>,
    bases: Vec<(Base, Prepared)>,
    layout: Layout,
}

impl Template {
    fn base(&self, base: Base) -> &Prepared {
        &self.bases.iter().find(|(b, _)| *b == base).unwrap().1
    }
}

fn build_template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let sources = two_images(dir.path(), [21, 22]);
    let plain = dir.path().join("plain");
    init_small_packs(&plain);
    // Six backups of each image, the oldest of each then forgotten: garbage for gc to collect.
    let all = back_up_rounds(&plain, &sources, 6, &dir.path().join("copies"), 100);
    let session = record_old_session(&plain, "nightly", 3600);
    forget_keep_last(&plain, 5);
    let points: Vec<Point> = all
        .into_iter()
        .filter(|p| snapshot_exists(&plain, &p.id))
        .collect();
    assert_eq!(points.len(), 10);
    assert!(verify(&plain, true).status.success());
    let layout = find_layout(&plain, &points, &session);

    // Marked: the target blob damaged, and marked by a verify.
    let marked = dir.path().join("marked");
    cp_a(&plain, &marked);
    flip_byte(
        &marked.join(&layout.pack),
        layout.blob.0 + layout.blob.1 / 2,
    )
    .unwrap();
    assert!(!verify(&marked, true).status.success());
    assert!(marked.join("damaged").exists(), "verify marked nothing");

    // GcPending: two more snapshots of each image forgotten, and a gc killed once its cycle is
    // published (state and lists written, nothing deleted).
    let pending = dir.path().join("pending");
    cp_a(&plain, &pending);
    forget_keep_last(&pending, 3);
    let killed = backflow()
        .args(["gc", "--repack-threshold", "0", "--repo"])
        .arg(&pending)
        .env(backflow_repository::GC_KILL_AT, "published")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    for (file, records) in [("state.json", 0), ("condemned", 1), ("doomed-packs", 1)] {
        let len = std::fs::metadata(pending.join("gc").join(file))
            .unwrap_or_else(|e| panic!("gc/{file}: {e}"))
            .len();
        assert!(len > 16 * records, "gc/{file} holds nothing");
    }
    let pending_points = points
        .iter()
        .filter(|p| snapshot_exists(&pending, &p.id))
        .cloned()
        .collect();

    Template {
        sources,
        bases: vec![
            (
                Plain,
                Prepared {
                    repo: plain,
                    points: points.clone(),
                },
            ),
            (
                Marked,
                Prepared {
                    repo: marked,
                    points,
                },
            ),
            (
                GcPending,
                Prepared {
                    repo: pending,
                    points: pending_points,
                },
            ),
        ],
        layout,
        dir,
    }
}

/// Chooses the target blob, and finds the files and offsets the cases damage.
fn find_layout(repo: &Path, points: &[Point], session: &str) -> Layout {
    let manifests: Vec<Manifest> = points
        .iter()
        .map(|p| read_manifest(&repo.join(format!("snapshots/{}.snap", p.id))))
        .collect();
    let mut users: HashMap<[u8; 32], BTreeSet<usize>> = HashMap::new();
    for (i, m) in manifests.iter().enumerate() {
        for d in m.entries.iter().flatten() {
            users.entry(*d).or_default().insert(i);
        }
    }
    // The pack: one with garbage (gc wants to rewrite it) and live chunks; the blob: its live
    // chunk with the fewest users, so some snapshots need it and others do not.
    let mut best: Option<((bool, usize), PathBuf, usize)> = None;
    for pack in pack_files(repo) {
        let trailer = backflow_repository::read_pack_trailer(&pack).unwrap();
        let dead = trailer
            .entries
            .iter()
            .any(|e| !users.contains_key(&e.digest.0));
        let live = trailer
            .entries
            .iter()
            .enumerate()
            .filter_map(|(k, e)| users.get(&e.digest.0).map(|u| (u.len(), k)))
            .min();
        if let Some((n, k)) = live {
            let score = (!dead, n);
            if best.as_ref().is_none_or(|(s, _, _)| score < *s) {
                best = Some((score, pack, k));
            }
        }
    }
    let (_, pack, k) = best.expect("a pack with live chunks");
    let trailer = backflow_repository::read_pack_trailer(&pack).unwrap();
    let entry = trailer.entries[k];
    let digest = entry.digest.0;
    let (index, record) = index_files(repo)
        .into_iter()
        .find_map(|f| find_record(&f, &digest).map(|r| (f, r)))
        .expect("an index record of the target");
    // A manifest that uses the target (if any is not its VM's newest), and its VM's newest one.
    let newest_of = |vm: &str| {
        points
            .iter()
            .rposition(|p| p.vm == vm)
            .expect("a snapshot of the VM")
    };
    let target_users = &users[&digest];
    let middle = target_users
        .iter()
        .copied()
        .find(|&i| i != newest_of(&points[i].vm))
        .unwrap_or(2);
    let newest = newest_of(&points[middle].vm);
    let manifest_path = |i: usize| PathBuf::from(format!("snapshots/{}.snap", points[i].id));
    Layout {
        digest,
        pack: relative(repo, &pack),
        blob: (entry.offset, u64::from(entry.stored_len)),
        entry: trailer.data_end + k as u64 * PACK_ENTRY,
        index: relative(repo, &index),
        record,
        manifest: manifest_path(middle),
        newest_manifest: manifest_path(newest),
        session: PathBuf::from(format!("sessions/{session}.json")),
    }
}

/// The file a case damages (relative to the repository) and the offset its `At` names in the
/// copy at `repo`.
fn resolve(layout: &Layout, repo: &Path, target: Target, at: At) -> (PathBuf, u64) {
    let rel = match target {
        Pack => layout.pack.clone(),
        Index => layout.index.clone(),
        Manifest => layout.manifest.clone(),
        NewestManifest => layout.newest_manifest.clone(),
        Config => "config".into(),
        Marks => "damaged".into(),
        GcState => "gc/state.json".into(),
        GcCondemned => "gc/condemned".into(),
        GcDoomed => "gc/doomed-packs".into(),
        Session => layout.session.clone(),
    };
    let path = repo.join(&rel);
    let len = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    let manifest = || read_manifest(&path);
    let offset = match at {
        Byte(n) => n,
        FromEnd(n) => len - n,
        Middle => len / 2,
        TrailerEntry(field) => layout.entry + field,
        Blob => layout.blob.0 + layout.blob.1 / 2,
        Fanout => {
            let packs = u64::from(u32_at(&std::fs::read(&path).unwrap(), 24));
            INDEX_HEADER + packs * INDEX_PACK_ID + 8 * u64::from(layout.digest[0])
        }
        PackTable => layout.record.1 + 3,
        Record(field) => layout.record.0 + field,
        Meta => {
            let m = manifest();
            SNAP_HEADER + m.meta_len / 2
        }
        TableEntry => {
            let m = manifest();
            let i = m
                .entries
                .iter()
                .position(|e| *e == Some(layout.digest))
                .or_else(|| m.entries.iter().position(Option::is_some))
                .unwrap();
            SNAP_HEADER + m.meta_len + i as u64 * SNAP_ENTRY + 5
        }
        File => 0,
    };
    assert!(
        offset <= len,
        "{}: offset {offset} past {len}",
        rel.display()
    );
    (rel, offset)
}

fn damage(path: &Path, offset: u64, how: How) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match how {
        Flip => flip_byte(path, offset),
        Truncate => std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(offset),
        Zero(n) => std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all_at(&vec![0; n as usize], offset),
        Remove => std::fs::remove_file(path),
    }
}

/// Whether the verify report names the damage where `names` says.
fn names_the_damage(report: &serde_json::Value, names: Names, rel: &Path, layout: &Layout) -> bool {
    let list = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| f["path"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let lists = |key: &str| list(key).iter().any(|p| Path::new(p).ends_with(rel));
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    match names {
        PackFile => {
            let id = pack_id(rel);
            lists("damaged_packs") || problems.iter().any(|p| p["pack"] == id.as_str())
        }
        Chunk => {
            let hex: String = layout.digest.iter().map(|b| format!("{b:02x}")).collect();
            problems
                .iter()
                .any(|p| p["digest"] == hex.as_str() && p["healed"] != true)
        }
        IndexFile => lists("damaged_index_files"),
        SnapshotFile => lists("damaged_snapshots"),
        SideFile => lists("side_files"),
        Anything => {
            reports_damage(report) || report["unreferenced_packs"].as_u64().unwrap_or(0) > 0
        }
    }
}

/// One case, on its own copy of its base: its failures (empty: it passed) and what happened.
fn run_case(t: &Template, case: &Case, dir: &Path, allow_damaged: bool) -> (Vec<String>, String) {
    let base = t.base(case.base);
    let repo = dir.join("repo");
    cp_a(&base.repo, &repo);
    let (rel, offset) = resolve(&t.layout, &repo, case.target, case.at);
    let mut failures = Vec::new();
    if let Err(e) = damage(&repo.join(&rel), offset, case.how) {
        return (
            vec![format!("cannot damage {}: {e}", rel.display())],
            String::new(),
        );
    }

    // verify predicts: whatever it does not name restores, whatever it names fails clearly.
    let check = |named: &BTreeSet<String>, failures: &mut Vec<String>, when: &str| {
        let mut restored = BTreeSet::new();
        // The same failure of several snapshots is one line.
        let mut by_error: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &base.points {
            let result = if named.contains(&p.id) {
                fails_clearly(&repo, p, dir, allow_damaged).map(|()| false)
            } else {
                restores_identical(&repo, p, dir)
                    .map(|()| true)
                    .map_err(|e| format!("not named by verify: {e}"))
            };
            match result {
                Ok(true) => {
                    restored.insert(p.id.clone());
                }
                Ok(false) => {}
                Err(e) => by_error
                    .entry(e.replace(&p.id, "ID"))
                    .or_default()
                    .push(format!("{} ({})", p.id, p.vm)),
            }
        }
        for (e, ids) in by_error {
            failures.push(format!(
                "{when}: {} snapshot(s) {}: {e}",
                ids.len(),
                ids.join(", ")
            ));
        }
        restored
    };
    let named = match timed_verify(&repo) {
        Ok(v) => {
            if !names_the_damage(&v.report, case.names, &rel, &t.layout) {
                failures.push(format!(
                    "verify does not report the damage in {} where expected ({:?}); it says: {}",
                    rel.display(),
                    case.names,
                    summary(&v.report)
                ));
            }
            v.named
        }
        Err(e) => {
            failures.push(e);
            BTreeSet::new()
        }
    };
    let restored = check(&named, &mut failures, "before gc");

    // gc deletes nothing that could be read.
    let gc = match run_timed(
        backflow()
            .args(["gc", "--repack-threshold", "0", "--json", "--repo"])
            .arg(&repo),
        HANG,
    ) {
        Err(e) => {
            failures.push(format!("gc: {e}"));
            "hung".to_owned()
        }
        Ok(ran) if ran.success() => "ran".to_owned(),
        Ok(ran) => {
            let why = ran.describe();
            match (case.gc, clear_failure(&ran, &repo)) {
                (MayRefuse, Ok(())) => {}
                (MayRefuse, Err(e)) => failures.push(format!("gc refused unclearly: {e}")),
                (Runs, _) => failures.push(format!("gc failed: {why}")),
            }
            format!("refused ({why})")
        }
    };
    // A pack whose header, trailer or footer is damaged still holds readable blobs: gc salvages
    // them and quarantines the pack, never deletes it.
    if matches!((case.target, case.names), (Pack, PackFile)) && !matches!(case.how, Remove) {
        let name = rel.file_name().unwrap();
        if find_named(&repo, name).is_empty() {
            failures.push(format!("gc deleted the damaged pack {}", rel.display()));
        }
    }
    let named_after = match timed_verify(&repo) {
        Ok(v) => v.named,
        Err(e) => {
            failures.push(format!("after gc: {e}"));
            BTreeSet::new()
        }
    };
    for id in &restored {
        if named_after.contains(id) {
            failures.push(format!(
                "after gc: snapshot {id} restored before gc, and verify now names it"
            ));
        }
    }
    let after = check(&named_after, &mut failures, "after gc");
    for id in restored.difference(&after) {
        failures.push(format!(
            "gc destroyed data: snapshot {id} restored before gc, not after"
        ));
    }

    // The next backup of the intact sources restores byte-identical.
    for (vm, image) in &t.sources {
        let result = timed_backup(&repo, image, vm, &dir.join("report.json")).and_then(|id| {
            let p = Point {
                id,
                vm: vm.clone(),
                copy: image.clone(),
            };
            restores_identical(&repo, &p, dir)
        });
        if let Err(e) = result {
            failures.push(format!("new backup of {vm}: {e}"));
        }
    }
    let summary = format!(
        "verify named {}/{}, gc {gc}, restored {}/{} after gc",
        named.len(),
        base.points.len(),
        after.len(),
        base.points.len()
    );
    (failures, summary)
}

/// Damages every kind of file and field in turn (see [`CASES`]) and checks, for each, that
/// `verify --read-data` predicts every restore failure, that gc then deletes nothing readable,
/// and that the next backup of the intact sources restores byte-identical.
#[test]
fn every_restore_failure_is_predicted_by_verify() {
    let filter: Vec<String> = std::env::var(CASES_FILTER)
        .map(|f| f.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    let names: BTreeSet<&str> = CASES.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), CASES.len(), "case names are unique");

    let started = Instant::now();
    let t = build_template();
    let allow_damaged = allow_damaged_exists();
    eprintln!(
        "template built in {:?}; --allow-damaged {}",
        started.elapsed(),
        if allow_damaged {
            "exists"
        } else {
            "does not exist"
        }
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<usize, (Vec<String>, String)>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..CASE_THREADS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = cases.get(i) else { break };
                    let dir = t.dir.path().join(format!("case-{i}"));
                    std::fs::create_dir(&dir).unwrap();
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_case(&t, case, &dir, allow_damaged)
                    }))
                    .unwrap_or_else(|p| {
                        let why = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_default();
                        (vec![format!("the test panicked: {why}")], String::new())
                    });
                    let _ = std::fs::remove_dir_all(&dir);
                    results.lock().unwrap().insert(i, outcome);
                }
            });
        }
    });

    let results = results.into_inner().unwrap();
    let mut table = String::new();
    let mut failed = 0;
    for (i, (failures, summary)) in &results {
        let case = cases[*i];
        let verdict = if failures.is_empty() { "pass" } else { "FAIL" };
        failed += usize::from(!failures.is_empty());
        table.push_str(&format!(
            "{verdict} {:<36} {:?}/{:?}: {summary}\n",
            case.name, case.base, case.how
        ));
        for f in failures {
            table.push_str(&format!("       - {f}\n"));
        }
    }
    let took = started.elapsed();
    assert!(
        failed == 0,
        "{failed} of {} cases fail ({took:?}):\n{table}",
        results.len()
    );
    eprintln!("{table}{} cases pass in {took:?}", results.len());
}

// ---------------------------------------------------------------------------------------------
// 3. No false alarms.

/// A clean, retryable refusal because another operation holds the repository lock.
fn locked(ran: &Ran) -> bool {
    ran.status.code() == Some(1)
        && matches!(ran.error_lines()[..], [line] if line.contains("is locked"))
}

/// Fewest runs each loop must make for the test to mean anything.
const MIN_LOOPS: usize = 3;
/// Problems listed in full when the test fails (the same false alarm can repeat hundreds of times).
const SHOWN_PROBLEMS: usize = 12;

/// On a healthy repository, for [`CONCURRENT_RUN`], four loops at once: `verify --read-data`,
/// backups of two images (changed a little between backups), `forget --keep-last 2` and `gc`.
/// No verify may report damage or fail; a backup, forget or gc may only be refused cleanly as
/// "locked". Afterwards verify is clean and every remaining snapshot restores byte-identical.
#[test]
fn verify_beside_backups_forgets_and_gcs_reports_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let sources = two_images(dir.path(), [41, 42]);
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let copies = dir.path().join("copies");
    let kept: Mutex<HashMap<String, PathBuf>> = Mutex::new(
        back_up_rounds(&repo, &sources, 1, &copies, 700)
            .into_iter()
            .map(|p| (p.id, p.copy))
            .collect(),
    );
    let stop = AtomicBool::new(false);
    let problems: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let problem = |what: String| problems.lock().unwrap().push(what);
    // Runs of each loop, and refusals as locked.
    let runs: [AtomicUsize; 4] = Default::default();
    let refusals = AtomicUsize::new(0);
    let (verifies, backups, forgets, gcs) = (&runs[0], &runs[1], &runs[2], &runs[3]);
    // A forget, gc or backup: done, or refused as locked; anything else is a problem.
    let ran_or_locked = |what: &str, result: Result<Ran, String>| -> Option<Ran> {
        match result {
            Ok(ran) if ran.success() => Some(ran),
            Ok(ran) if locked(&ran) => {
                refusals.fetch_add(1, Ordering::SeqCst);
                None
            }
            Ok(ran) => {
                problem(format!("{what} failed: {}", ran.describe()));
                None
            }
            Err(e) => {
                problem(format!("{what}: {e}"));
                None
            }
        }
    };

    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let n = verifies.fetch_add(1, Ordering::SeqCst);
                match timed_verify(&repo) {
                    Err(e) => problem(format!("verify #{n}: {e}")),
                    Ok(v) if !v.ran.success() || reports_damage(&v.report) => problem(format!(
                        "verify #{n} on a healthy repository ({}): {}",
                        v.ran.status,
                        summary(&v.report)
                    )),
                    Ok(_) => {}
                }
            }
        });
        s.spawn(|| {
            let mut round = 1u64;
            while !stop.load(Ordering::SeqCst) {
                for (i, (vm, image)) in sources.iter().enumerate() {
                    backflow_fixtures::change_image(image, 0.02, 7000 + 10 * round + i as u64)
                        .unwrap();
                    let copy = copies.join(format!("next-{vm}.img"));
                    copy_sparse(image, &copy);
                    let report = dir.path().join(format!("report-{vm}.json"));
                    backups.fetch_add(1, Ordering::SeqCst);
                    let ran = run_timed(
                        backup_command(image, &repo, vm)
                            .arg("--report")
                            .arg(&report),
                        HANG,
                    );
                    if ran_or_locked("backup", ran).is_some() {
                        let id = read_report(&report)["snapshot"]
                            .as_str()
                            .unwrap()
                            .to_owned();
                        let named = copies.join(format!("{id}.img"));
                        std::fs::rename(&copy, &named).unwrap();
                        kept.lock().unwrap().insert(id, named);
                    }
                }
                // Copies of forgotten snapshots go (a forgotten snapshot never comes back).
                kept.lock().unwrap().retain(|id, copy| {
                    let exists = snapshot_exists(&repo, id);
                    if !exists {
                        std::fs::remove_file(copy).unwrap();
                    }
                    exists
                });
                round += 1;
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                forgets.fetch_add(1, Ordering::SeqCst);
                ran_or_locked(
                    "forget",
                    run_timed(
                        backflow()
                            .args(["forget", "--keep-last", "2", "--repo"])
                            .arg(&repo),
                        HANG,
                    ),
                );
                // Pacing, not synchronisation: forget is cheap, and each one leaves gc work.
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                gcs.fetch_add(1, Ordering::SeqCst);
                ran_or_locked(
                    "gc",
                    run_timed(backflow().args(["gc", "--json", "--repo"]).arg(&repo), HANG),
                );
            }
        });
        std::thread::sleep(CONCURRENT_RUN);
        stop.store(true, Ordering::SeqCst);
    });

    let counts: Vec<usize> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    eprintln!(
        "in {CONCURRENT_RUN:?}: {} verifies, {} backups, {} forgets, {} gcs; {} refused as locked",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        refusals.load(Ordering::SeqCst)
    );
    let mut problems = problems.into_inner().unwrap();
    for (what, n) in ["verify", "backup", "forget", "gc"].iter().zip(&counts) {
        if *n < MIN_LOOPS {
            problems.push(format!("{what} ran {n} times, fewer than {MIN_LOOPS}"));
        }
    }
    match timed_verify(&repo) {
        Ok(v) if v.ran.success() && !reports_damage(&v.report) => {}
        Ok(v) => problems.push(format!(
            "the last verify ({}): {}",
            v.ran.status,
            summary(&v.report)
        )),
        Err(e) => problems.push(format!("the last verify: {e}")),
    }
    let kept = kept.into_inner().unwrap();
    let ids = snapshot_ids(&repo);
    assert!(ids.len() >= 2, "{ids:?}");
    for id in ids {
        let Some(copy) = kept.get(&id) else {
            problems.push(format!(
                "snapshot {id} was committed by no backup of this test"
            ));
            continue;
        };
        let point = Point {
            id: id.clone(),
            vm: String::new(),
            copy: copy.clone(),
        };
        if let Err(e) = restores_identical(&repo, &point, dir.path()) {
            problems.push(format!("snapshot {id}: {e}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems; the first {}:\n{}",
        problems.len(),
        problems.len().min(SHOWN_PROBLEMS),
        problems[..problems.len().min(SHOWN_PROBLEMS)].join("\n")
    );
}
