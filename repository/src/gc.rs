//! Garbage collection: removes the chunks no snapshot references, next to running backups, in bounded memory,
//! and resumable after a kill at any moment. The protocol and its reasons are in the crate root ("Garbage
//! collection"); this module is its implementation.
//!
//! Memory: every set that grows with the repository (referenced digests, index records, condemned records,
//! pack ids) goes through [`Sorter`], which keeps [`SORT_BUFFER`] bytes in memory and spills sorted runs to
//! the gc's scratch directory. What stays in memory is one pack's entries at a time, the snapshot ids and the
//! packs left behind by killed sessions (orphans).

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::error::{IoContext, RepoError, Result, read_exact_at};
use crate::format::{durable_rename, hex, sync_dir};
use crate::index::{IndexFile, IndexStream};
use crate::pack::{PackEntry, PackWriter, pack_path};
use crate::repository::{LockMode, lock_repository};
use crate::session::SessionShared;
use crate::snapshot::Snapshot;
use crate::sort::{RUN_BUFFER, Sorted, Sorter};
use crate::{ChunkRef, Codec, Digest, PackId, Repository};

/// Default share of a pack's indexed bytes that must be unreferenced before the pack is rewritten.
pub const DEFAULT_REPACK_THRESHOLD: u8 = 20;

/// Test hook: with `BACKFLOW_GC_KILL_AT=STEP`, the gc SIGKILLs itself when it reaches `STEP`.
pub const KILL_AT: &str = "BACKFLOW_GC_KILL_AT";

/// The steps [`KILL_AT`] can name, in the order a gc reaches them.
pub const KILL_POINTS: &[&str] = &[
    "marked",
    "repacking",
    "indexed",
    "published",
    "old-index-removed",
    "users-listed",
    "resurrected",
    "sweeping",
    "deleting",
    "swept",
];

fn kill_point(step: &str) {
    if std::env::var(KILL_AT).is_ok_and(|v| v == step) {
        warn!(step, "Test hook: gc kills itself here.");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
}

/// What [`Repository::gc`] does.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Rewrite a pack once at least this percentage of its indexed bytes is unreferenced (0 rewrites every
    /// pack with anything unreferenced, 100 only deletes packs that are wholly unreferenced).
    pub repack_threshold: u8,
    /// Decide and report, change nothing (`bytes_written` is then the live bytes the rewrites would copy).
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
            dry_run: false,
        }
    }
}

/// Outcome of a garbage collection.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Nothing was changed: the report says what a gc would do now.
    #[serde(default)]
    pub dry_run: bool,
    /// What finishing the cycle an earlier gc had begun (and had to leave waiting, or was killed in) did
    /// first: its deletions happen in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier_cycle: Option<Box<GcReport>>,
    pub snapshots: u64,
    /// Distinct digests the snapshots reference.
    pub referenced_chunks: u64,
    /// Index records read.
    pub indexed_chunks: u64,
    /// Referenced digests no index file lists (damage that `verify` names; gc leaves it alone).
    pub missing_chunks: u64,
    pub packs_kept: u64,
    pub packs_repacked: u64,
    /// Wholly unreferenced packs.
    pub packs_removed: u64,
    /// Packs no index names (left by killed sessions), removed unless a backup that was running commits them.
    pub orphan_packs: u64,
    /// Chunks taken out of the index (and out of the repository once the cycle is swept).
    pub chunks_removed: u64,
    /// Live chunks copied out of rewritten packs.
    pub chunks_moved: u64,
    /// Chunks a backup that ran during the gc used after all, kept.
    pub chunks_kept_for_running_backups: u64,
    /// Size of the unreferenced and rewritten pack files deleted (orphans not counted).
    pub bytes_deleted: u64,
    /// Size of the pack files written (rewritten packs' live chunks).
    pub bytes_written: u64,
    /// Packs rewritten by this gc that could not be read safely and were kept as they are.
    pub damaged_packs: Vec<String>,
    /// Set when the deletion waits: repository handles (backups, restores) that were open when the chunks
    /// were condemned still run. The next gc finishes the cycle.
    pub waiting_for: Option<String>,
}

impl GcReport {
    /// Bytes freed on disk: deleted pack files minus what was written.
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_deleted.saturating_sub(self.bytes_written)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Records the gc sorts.

/// A chunk's location, as the gc files and sorts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Located {
    digest: Digest,
    pack: PackId,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
    codec: Codec,
    live: bool,
}

const LOCATED_SIZE: usize = 72;
const _: () = assert!(LOCATED_SIZE == 16 + 8 + 32 + 4 + 4 + 1 + 1 + 6);

impl Located {
    /// Sorted by pack, then offset: the order a pack is read in.
    fn by_pack(&self) -> [u8; LOCATED_SIZE] {
        let mut b = [0u8; LOCATED_SIZE];
        b[..16].copy_from_slice(&self.pack.0);
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..56].copy_from_slice(&self.digest.0);
        self.tail(&mut b[56..]);
        b
    }

    /// Sorted by digest (the condemned file).
    fn by_digest(&self) -> [u8; LOCATED_SIZE] {
        let mut b = [0u8; LOCATED_SIZE];
        b[..32].copy_from_slice(&self.digest.0);
        b[32..48].copy_from_slice(&self.pack.0);
        b[48..56].copy_from_slice(&self.offset.to_be_bytes());
        self.tail(&mut b[56..]);
        b
    }

    fn tail(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&self.stored_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8] = self.codec as u8;
        b[9] = u8::from(self.live);
    }

    fn decode(b: &[u8; LOCATED_SIZE], by_pack: bool, path: &Path) -> Result<Located> {
        let (digest, pack, offset) = if by_pack {
            (&b[24..56], &b[..16], &b[16..24])
        } else {
            (&b[..32], &b[32..48], &b[48..56])
        };
        let codec = Codec::from_u8(b[64])
            .ok_or_else(|| RepoError::corrupt(path, format!("unknown codec {}", b[64])))?;
        Ok(Located {
            digest: Digest(digest.try_into().expect("32 bytes")),
            pack: PackId(pack.try_into().expect("16 bytes")),
            offset: u64::from_be_bytes(offset.try_into().expect("8 bytes")),
            stored_len: u32::from_le_bytes(b[56..60].try_into().expect("4 bytes")),
            raw_len: u32::from_le_bytes(b[60..64].try_into().expect("4 bytes")),
            codec,
            live: b[65] == 1,
        })
    }

    fn location(&self) -> crate::ChunkLocation {
        crate::ChunkLocation {
            pack: self.pack,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
        }
    }

    fn entry(&self) -> PackEntry {
        PackEntry {
            digest: self.digest,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
        }
    }
}

/// A list of fixed-size records in `gc/`: a 16-byte header (magic, count) and the records, written whole
/// through a temporary name. Damage shows as a wrong length or magic; a gc that finds it stops.
const LIST_MAGIC: [u8; 8] = *b"BFLWGCL1";

fn write_list<const N: usize>(dest: &Path, mut records: Sorted<N>) -> Result<u64> {
    let tmp = dest.with_extension("tmp");
    let file = File::create(&tmp).ctx("create", &tmp)?;
    let mut out = BufWriter::with_capacity(RUN_BUFFER, file);
    out.write_all(&LIST_MAGIC).ctx("write", &tmp)?;
    out.write_all(&[0u8; 8]).ctx("write", &tmp)?;
    let mut n = 0u64;
    while let Some(r) = records.next_record()? {
        out.write_all(&r).ctx("write", &tmp)?;
        n += 1;
    }
    let mut file = out
        .into_inner()
        .map_err(|e| RepoError::io("write", &tmp, e.into_error()))?;
    file.seek(SeekFrom::Start(8)).ctx("write", &tmp)?;
    file.write_all(&n.to_le_bytes()).ctx("write", &tmp)?;
    file.sync_all().ctx("fsync", &tmp)?;
    durable_rename(&tmp, dest)?;
    Ok(n)
}

/// Opens a list written by [`write_list`] of `N`-byte records and checks its magic and length: the file
/// and its record count.
fn open_list<const N: usize>(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).ctx("open", path)?;
    let len = file.metadata().ctx("stat", path)?.len();
    let mut head = [0u8; 16];
    read_exact_at(&file, &mut head, 0, path, "header")?;
    let count = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if head[..8] != LIST_MAGIC
        || count.checked_mul(N as u64).and_then(|b| b.checked_add(16)) != Some(len)
    {
        return Err(RepoError::corrupt(
            path,
            "damaged gc list (bad magic or length)",
        ));
    }
    Ok((file, count))
}

/// Reads a list written by [`write_list`], record by record.
struct ListReader<const N: usize> {
    path: PathBuf,
    reader: BufReader<File>,
    remaining: u64,
}

impl<const N: usize> ListReader<N> {
    fn open(path: &Path) -> Result<Self> {
        let (file, count) = open_list::<N>(path)?;
        let mut reader = BufReader::with_capacity(RUN_BUFFER, file);
        reader.read_exact(&mut [0u8; 16]).ctx("read", path)?;
        Ok(ListReader {
            path: path.to_owned(),
            reader,
            remaining: count,
        })
    }

    fn next_record(&mut self) -> Result<Option<[u8; N]>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        let mut b = [0u8; N];
        self.reader
            .read_exact(&mut b)
            .ctx("read", self.path.as_path())?;
        Ok(Some(b))
    }
}

// ---------------------------------------------------------------------------------------------------------
// The cycle's state in `gc/`.

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Phase {
    /// The condemned chunks are out of the index; their packs still exist.
    Condemned,
    /// Chunks used meanwhile are stored again; the packs are being deleted.
    Sweeping,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct CycleState {
    version: u32,
    phase: Phase,
    /// Snapshots whose references the mark saw.
    marked: BTreeSet<String>,
    /// Index files the gc replaced by its own (removed after the state is durable).
    old_index: Vec<String>,
    /// Repository handles open once the old index was gone: the deletion waits until all have closed.
    users: Option<Vec<String>>,
    /// Packs no index named when the cycle began: left by killed sessions.
    orphans: Vec<String>,
    /// What the cycle will have done, for the report of the run that finishes it.
    report: GcReport,
}

const STATE_VERSION: u32 = 1;

struct GcPaths {
    dir: PathBuf,
}

impl GcPaths {
    fn new(root: &Path) -> GcPaths {
        GcPaths {
            dir: root.join("gc"),
        }
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn condemned(&self) -> PathBuf {
        self.dir.join("condemned")
    }
    fn doomed(&self) -> PathBuf {
        self.dir.join("doomed-packs")
    }
    fn forgotten(&self) -> PathBuf {
        self.dir.join("forgotten")
    }
}

fn load_state(paths: &GcPaths) -> Result<Option<CycleState>> {
    let path = paths.state();
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RepoError::io("read", path, e)),
    };
    let state: CycleState = serde_json::from_slice(&text)
        .map_err(|e| RepoError::corrupt(&path, format!("unreadable gc state: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(RepoError::UnsupportedVersion {
            path,
            found: state.version,
            supported: STATE_VERSION,
        });
    }
    Ok(Some(state))
}

fn store_state(paths: &GcPaths, state: &CycleState) -> Result<()> {
    let path = paths.state();
    let tmp = paths.dir.join("state.json.tmp");
    let text = serde_json::to_vec_pretty(state).expect("the state serialises");
    crate::format::write_durably(&tmp, &path, &text)
}

/// Whether a gc cycle is under way (its chunks condemned, their packs not yet deleted).
pub(crate) fn cycle_pending(root: &Path) -> bool {
    GcPaths::new(root).state().exists()
}

/// The fence between `forget` (shared) and a gc changing its cycle (exclusive): while a cycle is pending, a
/// forgotten manifest is moved to `gc/forgotten/` instead of deleted, so the end of the cycle still sees what
/// it referenced. Blocking: both sides hold it briefly.
pub(crate) fn fence(root: &Path, mode: LockMode) -> Result<File> {
    let dir = root.join("gc");
    std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let path = dir.join("fence");
    let f = crate::repository::open_lock_file(&path)?;
    match mode {
        LockMode::Shared => f.lock_shared(),
        LockMode::Exclusive => f.lock(),
    }
    .ctx("lock", &path)?;
    Ok(f)
}

/// Removes manifest `path` (of snapshot `id`) for `forget`, keeping it for the pending gc cycle if there is
/// one. The caller holds the fence shared.
pub(crate) fn remove_manifest(root: &Path, id: &str, path: &Path) -> Result<()> {
    let paths = GcPaths::new(root);
    if paths.state().exists() {
        let dir = paths.forgotten();
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        let dest = dir.join(format!("{id}.snap"));
        std::fs::rename(path, &dest).map_err(|e| RepoError::io("move snapshot", path, e))?;
        sync_dir(&dir)?;
    } else {
        std::fs::remove_file(path).map_err(|e| RepoError::io("remove snapshot", path, e))?;
    }
    Ok(())
}

/// Where a condemned chunk still is, while its cycle is pending: restores of snapshots committed by backups
/// that ran during the gc read it from there until the end of the cycle stores it again. A binary search of
/// `gc/condemned` with positioned reads. Never used for deduplication: a backup must not newly rely on a
/// condemned chunk.
pub(crate) fn find_condemned(root: &Path, digest: &Digest) -> Result<Option<crate::ChunkLocation>> {
    let path = GcPaths::new(root).condemned();
    let (file, count) = match open_list::<LOCATED_SIZE>(&path) {
        Ok(opened) => opened,
        Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut b = [0u8; LOCATED_SIZE];
        read_exact_at(
            &file,
            &mut b,
            16 + mid * LOCATED_SIZE as u64,
            &path,
            "record",
        )?;
        match b[..32].cmp(&digest.0[..]) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                return Ok(Some(Located::decode(&b, false, &path)?.location()));
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------------------
// Registered users: every open repository handle.

/// An open repository handle's entry in `users/`, flocked for its lifetime: a gc lists these after taking
/// chunks out of the index, and deletes them only once every handle listed then is gone (closed, or its
/// process dead, which frees the lock).
#[derive(Debug)]
pub(crate) struct UserEntry {
    pub name: String,
    path: PathBuf,
    _file: File,
}

impl UserEntry {
    /// Registers a handle; `None` where the repository cannot be written (a read-only mount): such a
    /// handle only reads, and a gc cannot run there either.
    pub(crate) fn register(root: &Path) -> Option<UserEntry> {
        let dir = root.join("users");
        let _ = std::fs::create_dir(&dir);
        let name = format!("{}-{}", std::process::id(), hex(&rand::random::<[u8; 6]>()));
        let path = dir.join(&name);
        let file = File::create(&path).ok()?;
        file.try_lock().ok()?;
        Some(UserEntry {
            name,
            path,
            _file: file,
        })
    }
}

impl Drop for UserEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The registered handles that are alive, other than `own`; removes the entries of dead processes.
fn live_users(root: &Path, own: Option<&str>, among: Option<&[String]>) -> Result<Vec<String>> {
    let dir = root.join("users");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(RepoError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.ctx("list", &dir)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if Some(name.as_str()) == own || among.is_some_and(|l| !l.contains(&name)) {
            continue;
        }
        let Ok(f) = File::open(entry.path()) else {
            continue;
        };
        if f.try_lock().is_ok() {
            // Its process died without removing it.
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        out.push(name);
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------
// The run.

/// Runs a garbage collection; see the crate root.
pub(crate) fn gc(repo: &Repository, options: &GcOptions) -> Result<GcReport> {
    let root = repo.path().to_owned();
    let repo_lock = lock_repository(
        &root,
        LockMode::Shared,
        "an index rebuild holds it exclusively",
    )?;
    let paths = GcPaths::new(&root);
    std::fs::create_dir_all(&paths.dir).ctx("create directory", &paths.dir)?;
    let run_lock_path = paths.dir.join("run.lock");
    let run_lock = crate::repository::open_lock_file(&run_lock_path)?;
    if run_lock.try_lock().is_err() {
        return Err(RepoError::Locked {
            path: root,
            detail: "another garbage collection runs".into(),
        });
    }
    if !options.dry_run {
        repo.remove_stale_scratch()?;
    }
    let (scratch, scratch_lock) =
        crate::scratch::create(&root, || format!("gc-{}", hex(&rand::random::<[u8; 6]>())))?;
    let ctx = Gc {
        repo,
        root: root.clone(),
        paths,
        scratch: scratch.clone(),
        scratch_lock,
        repo_lock,
        own_user: repo.user_name(),
    };
    let result = ctx.run(options);
    let _ = std::fs::remove_dir_all(&scratch);
    drop(run_lock);
    result
}

struct Gc<'a> {
    repo: &'a Repository,
    root: PathBuf,
    paths: GcPaths,
    scratch: PathBuf,
    scratch_lock: File,
    repo_lock: File,
    own_user: Option<String>,
}

impl Gc<'_> {
    fn run(&self, options: &GcOptions) -> Result<GcReport> {
        if options.dry_run {
            if let Some(state) = load_state(&self.paths)? {
                let mut report = state.report;
                report.dry_run = true;
                report.waiting_for = Some(
                    "an earlier gc condemned these chunks; the next gc deletes them once the backups \
                     that were running then have ended"
                        .into(),
                );
                return Ok(report);
            }
            let mut report = self.condemn(options)?.report;
            report.dry_run = true;
            return Ok(report);
        }
        let mut earlier = None;
        if let Some(state) = load_state(&self.paths)? {
            match self.finish_cycle(state)? {
                Some(report) if report.waiting_for.is_some() => return Ok(report),
                report => earlier = report.map(Box::new),
            }
        }
        let state = self.condemn(options)?;
        let mut report = self
            .finish_cycle(state)?
            .expect("a cycle just begun is finished or waiting");
        report.earlier_cycle = earlier;
        Ok(report)
    }

    fn writer_session(&self, what: &str) -> Result<Arc<SessionShared>> {
        Ok(SessionShared::new(
            format!("gc-{what}"),
            self.repo,
            self.scratch.clone(),
            crate::sort::SORT_BUFFER / crate::index::INDEX_RECORD_SIZE,
            self.scratch_lock.try_clone().ctx("dup", &self.scratch)?,
            self.repo_lock.try_clone().ctx("dup", &self.root)?,
        ))
    }

    /// Writes the index file of what `session`'s writers stored (plus any kept packs added to it).
    fn write_index(&self, session: &SessionShared) -> Result<Option<String>> {
        let builder = session.take_index()?;
        if builder.is_empty() {
            return Ok(None);
        }
        let name = format!("gc-{}.idx", hex(&rand::random::<[u8; 8]>()));
        let tmp = self.scratch.join("index.tmp");
        builder.write(&tmp)?;
        durable_rename(&tmp, &self.root.join("index").join(&name))?;
        Ok(Some(name))
    }

    /// Phase 1: mark, decide per pack, rewrite, index, publish the cycle. Deletes nothing. A dry run stops
    /// after the decisions, having written nothing but scratch.
    fn condemn(&self, options: &GcOptions) -> Result<CycleState> {
        let mut report = GcReport::default();

        // Index files first. A session that commits after this listing has its packs counted as orphans below,
        // and kept at the end because its own index file names them.
        let index_dir = self.root.join("index");
        let mut old_index = Vec::new();
        for entry in std::fs::read_dir(&index_dir).ctx("list", &index_dir)? {
            let entry = entry.ctx("list", &index_dir)?;
            if let Some(name) = entry.file_name().to_str()
                && name.ends_with(".idx")
            {
                old_index.push(name.to_owned());
            }
        }
        old_index.sort();

        // Mark.
        let marked = self.repo.snapshot_ids()?;
        let mut referenced = Sorter::<32>::new(&self.scratch, "referenced", true);
        for id in &marked {
            let snapshot = match self.repo.open_snapshot(id) {
                // Forgotten since the listing (retention of a job running now): nothing to keep for it.
                Err(RepoError::SnapshotNotFound { .. }) => continue,
                other => other,
            };
            let snapshot = snapshot.map_err(|e| {
                RepoError::InvalidArgument(format!(
                    "garbage collection stopped before changing anything: snapshot {id} cannot be read ({e}); \
                     a gc must know every chunk a snapshot uses. Run `backflow verify`, then forget the damaged \
                     snapshot if it cannot be repaired"
                ))
            })?;
            push_references(&snapshot, &mut referenced)?;
        }
        report.snapshots = marked.len() as u64;
        let mut referenced = referenced.finish()?;
        kill_point("marked");

        // Every index record, read one file at a time (checksum and order checked) and sorted by digest:
        // memory and open files stay bounded however many index files there are. The pack tables give the
        // packs the index names.
        let mut records = Sorter::<LOCATED_SIZE>::new(&self.scratch, "records", false);
        let mut indexed_packs = Sorter::<16>::new(&self.scratch, "indexed-packs", true);
        for name in &old_index {
            let mut stream =
                IndexStream::open(&index_dir.join(name), |id| indexed_packs.push(id.0))
                    .map_err(damaged_index)?;
            while let Some((rec, pack)) = stream.next_record().map_err(damaged_index)? {
                let located = Located {
                    digest: rec.digest,
                    pack,
                    offset: rec.offset,
                    stored_len: rec.stored_len,
                    raw_len: rec.raw_len,
                    codec: rec.codec,
                    live: false,
                };
                records.push(located.by_digest())?;
            }
        }
        let mut records = records.finish()?;
        // Packs no index names: left by killed sessions (or a killed gc). Found before this gc writes any.
        let orphans = self.find_orphans(indexed_packs.finish()?)?;
        report.orphan_packs = orphans.len() as u64;

        // Joined with the referenced digests: one copy of each referenced digest is live, never one marked
        // damaged (a health check found it bad; a later backup stored a healthy copy); other copies (two
        // sessions stored it, or damaged ones) and unreferenced chunks are dead.
        let marks = self.repo.damage_marks()?;
        let mut by_pack = Sorter::<LOCATED_SIZE>::new(&self.scratch, "by-pack", false);
        let mut next_ref = referenced.next_record()?;
        let records_path = self.scratch.join("records");
        while let Some(b) = records.next_record()? {
            let mut r = Located::decode(&b, false, &records_path)?;
            report.indexed_chunks += 1;
            while let Some(d) = next_ref
                && d < r.digest.0
            {
                report.missing_chunks += 1;
                next_ref = referenced.next_record()?;
            }
            if next_ref == Some(r.digest.0) && !marks.contains(&r.digest, &r.location()) {
                r.live = true;
                report.referenced_chunks += 1;
                next_ref = referenced.next_record()?;
            }
            by_pack.push(r.by_pack())?;
        }
        while next_ref.is_some() {
            report.missing_chunks += 1;
            next_ref = referenced.next_record()?;
        }
        drop(records);
        drop(referenced);
        if report.missing_chunks > 0 {
            warn!(
                missing = report.missing_chunks,
                "Snapshots reference chunks that no index lists; `backflow verify` names them."
            );
        }

        // Per pack: keep, rewrite or delete.
        let session = self.writer_session("repack")?;
        let mut writer = (!options.dry_run).then(|| PackWriter::new(session.clone()));
        let mut condemned = Sorter::<LOCATED_SIZE>::new(&self.scratch, "condemned", false);
        let mut doomed = Sorter::<16>::new(&self.scratch, "doomed", false);
        let mut by_pack = by_pack.finish()?;
        let mut group: Vec<Located> = Vec::new();
        let by_pack_path = self.scratch.join("by-pack");
        let mut repacked_one = false;
        loop {
            let next = by_pack
                .next_record()?
                .map(|b| Located::decode(&b, true, &by_pack_path))
                .transpose()?;
            if let Some(first) = group.first()
                && next.is_none_or(|n| n.pack != first.pack)
            {
                let outcome = self.settle_pack(
                    &group,
                    options,
                    &session,
                    writer.as_mut(),
                    &mut condemned,
                    &mut report,
                )?;
                if outcome {
                    doomed.push(group[0].pack.0)?;
                    if !repacked_one {
                        repacked_one = true;
                        kill_point("repacking");
                    }
                }
                group.clear();
            }
            match next {
                Some(n) => group.push(n),
                None => break,
            }
        }
        if let Some(writer) = writer {
            writer.finish()?;
        }
        drop(by_pack);
        if options.dry_run {
            return Ok(CycleState {
                version: STATE_VERSION,
                phase: Phase::Condemned,
                marked: BTreeSet::new(),
                old_index: Vec::new(),
                users: None,
                orphans: Vec::new(),
                report,
            });
        }

        // Publish: the new index, the condemned chunks and doomed packs, the state; then the old index goes.
        let new_index = self.write_index(&session)?;
        kill_point("indexed");
        let fence = fence(&self.root, LockMode::Exclusive)?;
        let condemned_count = write_list(&self.paths.condemned(), condemned.finish()?)?;
        debug_assert_eq!(condemned_count, report.chunks_removed);
        let doomed_count = write_list(&self.paths.doomed(), doomed.finish()?)?;
        let mut state = CycleState {
            version: STATE_VERSION,
            phase: Phase::Condemned,
            marked: marked.into_iter().collect(),
            old_index: old_index
                .into_iter()
                .filter(|n| Some(n) != new_index.as_ref())
                .collect(),
            users: None,
            orphans: orphans.iter().map(PackId::to_hex).collect(),
            report,
        };
        store_state(&self.paths, &state)?;
        kill_point("published");
        self.remove_old_index(&state)?;
        kill_point("old-index-removed");
        state.users = Some(live_users(&self.root, self.own_user.as_deref(), None)?);
        store_state(&self.paths, &state)?;
        drop(fence);
        kill_point("users-listed");
        info!(
            condemned = state.report.chunks_removed,
            packs = doomed_count,
            orphans = state.orphans.len(),
            "Garbage collection: unreferenced chunks taken out of the index."
        );
        Ok(state)
    }

    /// Decides one pack from its indexed records. Returns whether the pack file is to be deleted.
    fn settle_pack(
        &self,
        group: &[Located],
        options: &GcOptions,
        session: &SessionShared,
        writer: Option<&mut PackWriter>,
        condemned: &mut Sorter<LOCATED_SIZE>,
        report: &mut GcReport,
    ) -> Result<bool> {
        let pack = group[0].pack;
        let live: u64 = group
            .iter()
            .filter(|r| r.live)
            .map(|r| u64::from(r.stored_len))
            .sum();
        let total: u64 = group.iter().map(|r| u64::from(r.stored_len)).sum();
        let dead = total - live;
        let keep = |report: &mut GcReport| -> Result<bool> {
            session.add_pack(pack, &group.iter().map(Located::entry).collect::<Vec<_>>())?;
            report.packs_kept += 1;
            Ok(false)
        };
        let size = match std::fs::metadata(pack_path(&self.root, &pack)) {
            Ok(m) => m.len(),
            // A pack the index names but that is gone: `verify` reports it; the gc leaves its records.
            Err(_) => return keep(report),
        };
        if dead == 0 || (live > 0 && dead * 100 < u64::from(options.repack_threshold) * total) {
            return keep(report);
        }
        if live == 0 {
            report.packs_removed += 1;
        } else {
            let live_chunks = group.iter().filter(|r| r.live);
            match writer {
                // A dry run: what the rewrite would copy.
                None => report.bytes_written += live,
                Some(writer) => {
                    for r in live_chunks.clone() {
                        // Each chunk is checked against its digest before it is copied. A damaged one
                        // keeps the pack as it is (the copies already made are harmless duplicates).
                        let stored = match self.repo.read_chunk(&r.location()).and_then(|stored| {
                            self.repo.plaintext(&r.digest, &r.location(), &stored)?;
                            Ok(stored)
                        }) {
                            Ok(stored) => stored,
                            Err(e) => {
                                warn!(pack = %pack, chunk = %r.digest, error = %e,
                                      "A chunk of a pack to rewrite is damaged; the pack stays as it is.");
                                report.damaged_packs.push(pack.to_hex());
                                return keep(report);
                            }
                        };
                        writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
                        report.bytes_written += stored.data.len() as u64;
                    }
                }
            }
            report.chunks_moved += live_chunks.count() as u64;
            report.packs_repacked += 1;
        }
        for r in group.iter().filter(|r| !r.live) {
            condemned.push(r.by_digest())?;
            report.chunks_removed += 1;
        }
        report.bytes_deleted += size;
        Ok(true)
    }

    /// Packs in `packs/` that no index file named (`indexed`, sorted). A session alive now that wrote one is
    /// a registered handle, so the deletion waits for it, and by then its index names the pack.
    fn find_orphans(&self, mut indexed: Sorted<16>) -> Result<Vec<PackId>> {
        let mut orphans = Vec::new();
        let mut next = indexed.next_record()?;
        let packs = self.root.join("packs");
        for first in 0..=255u8 {
            let sub = packs.join(hex(&[first]));
            let mut ids = Vec::new();
            match std::fs::read_dir(&sub) {
                Ok(entries) => {
                    for entry in entries {
                        let entry = entry.ctx("list", &sub)?;
                        let name = entry.file_name();
                        if let Some(id) = name
                            .to_str()
                            .and_then(|n| n.strip_suffix(".pack"))
                            .and_then(|n| n.parse::<PackId>().ok())
                        {
                            ids.push(id);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(RepoError::io("list", sub, e)),
            }
            ids.sort();
            for id in ids {
                while let Some(n) = next
                    && n < id.0
                {
                    next = indexed.next_record()?;
                }
                if next != Some(id.0) {
                    orphans.push(id);
                }
            }
        }
        Ok(orphans)
    }

    fn remove_old_index(&self, state: &CycleState) -> Result<()> {
        let dir = self.root.join("index");
        for name in &state.old_index {
            remove_if_present(&dir.join(name), "remove old index")?;
        }
        sync_dir(&dir)
    }

    /// Phase 2: once every handle open at condemnation has closed, stores again what backups used meanwhile,
    /// then deletes. `None` when there was nothing to finish; a report with `waiting_for` when it must wait.
    fn finish_cycle(&self, mut state: CycleState) -> Result<Option<GcReport>> {
        if state.phase == Phase::Condemned {
            let fence = fence(&self.root, LockMode::Exclusive)?;
            if state.users.is_none() {
                // Killed between publishing and listing: finish that step.
                self.remove_old_index(&state)?;
                state.users = Some(live_users(&self.root, self.own_user.as_deref(), None)?);
                store_state(&self.paths, &state)?;
            }
            let listed = state.users.clone().unwrap_or_default();
            let alive = live_users(&self.root, self.own_user.as_deref(), Some(&listed))?;
            if !alive.is_empty() {
                let mut report = state.report.clone();
                report.waiting_for = Some(format!(
                    "{} repository handle(s) (backups or restores) that were open when the chunks were condemned \
                     still run; {} chunks and {} bytes of packs are freed by the next gc after they end",
                    alive.len(),
                    report.chunks_removed,
                    report.bytes_deleted
                ));
                info!(users = ?alive, "Garbage collection: deletion waits for running backups.");
                return Ok(Some(report));
            }
            state.report.chunks_kept_for_running_backups = self.resurrect(&state)?;
            kill_point("resurrected");
            state.phase = Phase::Sweeping;
            store_state(&self.paths, &state)?;
            let forgotten = self.paths.forgotten();
            if forgotten.exists() {
                std::fs::remove_dir_all(&forgotten).ctx("remove", &forgotten)?;
            }
            drop(fence);
            kill_point("sweeping");
        }
        self.sweep(&state)?;
        for p in [self.paths.condemned(), self.paths.doomed()] {
            remove_if_present(&p, "remove")?;
        }
        std::fs::remove_file(self.paths.state()).ctx("remove", &self.paths.state())?;
        sync_dir(&self.paths.dir)?;
        kill_point("swept");
        let unmarked = self.repo.drop_marks_of_deleted_packs()?;
        if unmarked > 0 {
            info!(marks = unmarked, "Damage marks of deleted packs dropped.");
        }
        info!(
            removed = state.report.chunks_removed,
            freed = state.report.bytes_deleted,
            "Garbage collection finished."
        );
        Ok(Some(state.report))
    }

    /// Condemned chunks that snapshots committed since the mark reference (backups that ran during the gc
    /// found them in the index they had open): copied into a new pack and indexed again. Returns how many.
    fn resurrect(&self, state: &CycleState) -> Result<u64> {
        let mut referenced = Sorter::<32>::new(&self.scratch, "remarked", true);
        let mut any = false;
        for id in self.repo.snapshot_ids()? {
            if state.marked.contains(&id) {
                continue;
            }
            any = true;
            push_references(&self.repo.open_snapshot(&id)?, &mut referenced)?;
        }
        let forgotten = self.paths.forgotten();
        if let Ok(entries) = std::fs::read_dir(&forgotten) {
            for entry in entries {
                let path = entry.ctx("list", &forgotten)?.path();
                let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                    continue;
                };
                if state.marked.contains(&id) {
                    continue;
                }
                any = true;
                push_references(&Snapshot::open_path(&path, &id)?, &mut referenced)?;
            }
        }
        if !any {
            return Ok(0);
        }
        let mut referenced = referenced.finish()?;
        let mut condemned = ListReader::<LOCATED_SIZE>::open(&self.paths.condemned())?;
        let session = self.writer_session("resurrect")?;
        let mut writer = PackWriter::new(session.clone());
        let mut next_ref = referenced.next_record()?;
        let mut count = 0u64;
        let mut last: Option<Digest> = None;
        while let Some(b) = condemned.next_record()? {
            let r = Located::decode(&b, false, &self.paths.condemned())?;
            while let Some(d) = next_ref
                && d < r.digest.0
            {
                next_ref = referenced.next_record()?;
            }
            if next_ref != Some(r.digest.0) || last == Some(r.digest) {
                continue;
            }
            let stored = self.repo.read_chunk(&r.location())?;
            if let Err(e) = self.repo.plaintext(&r.digest, &r.location(), &stored) {
                // Another copy may be healthy; this one cannot serve.
                warn!(chunk = %r.digest, pack = %r.pack, error = %e, "A condemned copy a backup used is damaged.");
                continue;
            }
            writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
            last = Some(r.digest);
            count += 1;
        }
        writer.finish()?;
        self.write_index(&session)?;
        if count > 0 {
            info!(
                chunks = count,
                "Chunks used by backups that ran during the gc were stored again."
            );
        }
        Ok(count)
    }

    /// Deletes the doomed packs and the orphans that still no index names.
    fn sweep(&self, state: &CycleState) -> Result<()> {
        let mut touched = [false; 256];
        let mut remove = |id: PackId| -> Result<()> {
            remove_if_present(&pack_path(&self.root, &id), "remove pack")?;
            touched[id.0[0] as usize] = true;
            Ok(())
        };
        if self.paths.doomed().exists() {
            let mut doomed = ListReader::<16>::open(&self.paths.doomed())?;
            let mut first = true;
            while let Some(id) = doomed.next_record()? {
                remove(PackId(id))?;
                if first {
                    first = false;
                    kill_point("deleting");
                }
            }
        }
        if !state.orphans.is_empty() {
            // A session that committed after the listing named its packs in its own index file.
            let mut named = HashSet::new();
            let dir = self.root.join("index");
            for entry in std::fs::read_dir(&dir).ctx("list", &dir)? {
                let path = entry.ctx("list", &dir)?.path();
                let is_session_index = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".idx") && !n.starts_with("gc-"));
                if is_session_index {
                    named.extend(IndexFile::open(&path)?.pack_ids()?);
                }
            }
            for hex_id in &state.orphans {
                let Ok(id) = hex_id.parse::<PackId>() else {
                    continue;
                };
                if !named.contains(&id) {
                    remove(id)?;
                }
            }
        }
        for (first, t) in touched.iter().enumerate() {
            if *t {
                sync_dir(&self.root.join("packs").join(hex(&[first as u8])))?;
            }
        }
        Ok(())
    }
}

/// Removes `path`; one already gone is fine (a gc resumed after a kill repeats its steps).
fn remove_if_present(path: &Path, what: &'static str) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RepoError::io(what, path, e)),
    }
}

/// An index file that cannot be read whole stops the gc before it changes anything: the records it holds
/// would be lost from the new index.
fn damaged_index(e: RepoError) -> RepoError {
    RepoError::InvalidArgument(format!(
        "garbage collection stopped before changing anything: {e}; run `backflow rebuild-index` first"
    ))
}

fn push_references(snapshot: &Snapshot, sorter: &mut Sorter<32>) -> Result<()> {
    for disk in 0..snapshot.meta().disks.len() {
        for r in snapshot.chunks(disk) {
            if let ChunkRef::Data(d) = r? {
                sorter.push(d.0)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn located_records_round_trip_in_both_orders() {
        let r = Located {
            digest: Digest([3; 32]),
            pack: PackId([9; 16]),
            offset: 123_456,
            stored_len: 77,
            raw_len: 65536,
            codec: Codec::Zstd,
            live: true,
        };
        let p = Path::new("x");
        assert_eq!(Located::decode(&r.by_pack(), true, p).unwrap(), r);
        assert_eq!(Located::decode(&r.by_digest(), false, p).unwrap(), r);
        // Big-endian offsets sort a pack's records in file order.
        let later = Located {
            offset: 123_457,
            ..r
        };
        assert!(r.by_pack() < later.by_pack());
    }
}
