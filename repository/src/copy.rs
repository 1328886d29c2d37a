//! Copies of restore points between repositories (`backflow copy`, copy jobs): the 3-2-1 rule's second
//! repository, off the hypervisors.
//!
//! A copy is a backup whose source is another repository. For each selected snapshot that the target does
//! not hold (by id: copies keep ids, so copying again skips what is there), a session in the target records
//! every disk's chunk table and commits a manifest with the snapshot's id, VM, time, host, disks and domain
//! XML. Until that commit nothing of the copy is visible: a copy killed at any moment leaves the target as
//! valid as a killed backup does (at worst packs that nothing references, which a gc removes).
//!
//! **Only what the target lacks is sent.** When both repositories name a chunk by the same digest (both
//! plain BLAKE3), each source digest is looked up in the target as it is, and only the chunks the target
//! lacks are read from the source. When the digests differ (a repository whose chunk ids are keyed), every
//! chunk is read from the source, hashed for the target ([`Repository::digest_of`]) and looked up by that.
//! Every chunk read is verified against its source digest, and a chunk sent under the source's digest is
//! hashed again for the target, so a pair of repositories wrongly taken for "same digests" fails the copy
//! instead of storing chunks under wrong names. Chunks are compressed again for the target by the encoder
//! the caller gives ([`ChunkEncoder`]: the zstd stage's, for the command and the jobs). Zero chunks stay
//! zero, stored as nothing.
//!
//! **Chunk sizes must match.** A disk whose chunk size is not the target's is refused before anything is
//! written ([`CopyError::ChunkSizeMismatch`]): the target's own backups of that VM would otherwise find a
//! parent they cannot take unchanged chunks from.
//!
//! **Changed-block tracking state is not copied.** A disk's CBT state names a checkpoint of the source's
//! chain; an incremental backup into the target that took a copy as its parent would read only what changed
//! since a checkpoint the target never saw committed (and the source's backups may delete it). Without the
//! state, a backup into the target whose newest snapshot is a copy reads its disks whole, deduplicated
//! against the copy, with the usual warning.
//!
//! Memory is bounded: chunk tables are streamed in batches ([`COPY_BATCH`]) through a bounded channel
//! ([`COPY_QUEUE_BATCHES`] per worker) to [`CopyOptions::workers`] threads, each holding one chunk and its
//! own pack writer; the set of digests sent in this run is bounded ([`RECENT_SENT`]).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use tracing::{info, warn};

use crate::error::RepoError;
use crate::snapshot::{DiskMeta, read_meta, snapshot_key};
use crate::{ChunkRef, Codec, Digest, PackWriter, Repository, Snapshot, SnapshotInfo};

/// Worker threads of a copy by default: each reads, verifies, hashes and compresses one chunk at a time, so
/// a few keep the source's reads and the target's writes overlapping without holding much memory.
pub const DEFAULT_COPY_WORKERS: usize = 4;

/// Chunk-table entries handed to a worker at once: one table write per batch, and few channel messages.
pub const COPY_BATCH: usize = 64;

/// Batches queued per worker. When the queue is full the table reader waits: the tables are never read
/// far ahead of the chunks being copied.
pub const COPY_QUEUE_BATCHES: usize = 2;

/// Digests sent in this run that are remembered, so that a chunk repeated within a snapshot (or in the next
/// snapshot, before the index lists it) is sent once: 256 Ki digests, 8 MiB and a little more. A chunk
/// repeated after more new chunks than that is sent again (stored twice, which is harmless), as in the
/// backups' deduplicator.
pub const RECENT_SENT: usize = 256 * 1024;

/// Test hook: with `BACKFLOW_COPY_KILL_AFTER=N`, a copy SIGKILLs itself once it has stored N chunks in the
/// target (packs written, some published, nothing committed): a copy killed midway. Only with the
/// `test-hooks` feature, which no user's build has.
#[cfg(feature = "test-hooks")]
pub const KILL_AFTER: &str = "BACKFLOW_COPY_KILL_AFTER";

#[cfg(feature = "test-hooks")]
fn kill_point() {
    use std::sync::atomic::AtomicU64;
    static SENT: AtomicU64 = AtomicU64::new(0);
    let sent = SENT.fetch_add(1, Ordering::SeqCst) + 1;
    if std::env::var(KILL_AFTER).is_ok_and(|v| v.parse() == Ok(sent)) {
        crate::hooks::kill_self(&format!("copy, after {sent} chunks stored"));
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
fn kill_point() {}

/// Compresses one chunk for the target: what the compressor stages do for a backup.
pub trait ChunkEncoder: Send {
    /// The codec and the stored bytes of `plain`; an error is a sentence saying why.
    fn encode(&mut self, plain: &[u8]) -> std::result::Result<(Codec, Vec<u8>), String>;
}

/// Which restore points to copy. Both lists empty: every snapshot of the source.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Every snapshot of each of these identities (VM names, image names or paths, exactly).
    pub vms: Vec<String>,
    /// These snapshots, each as [`Repository::resolve_snapshot`] names one (an id, a unique prefix,
    /// `latest` of the one VM in `vms` or of a repository of one VM).
    pub snapshots: Vec<String>,
    /// Threads copying chunks; 0 means [`DEFAULT_COPY_WORKERS`].
    pub workers: usize,
}

/// What went wrong with a copy. The policy is the crate's ([`RepoError`]); a copy adds the refusals that
/// are decided before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A disk's chunk size differs from the target's. Not retryable: copy into a repository made with
    /// `--chunk-size` of the disk's.
    #[error(
        "cannot copy snapshot {snapshot} into {target}: its disk {disk:?} has {disk_chunk_size}-byte chunks, \
         the target repository {target_chunk_size}-byte chunks; copy into a repository made with `backflow \
         init --chunk-size {disk_chunk_size}`"
    )]
    ChunkSizeMismatch {
        snapshot: String,
        disk: String,
        disk_chunk_size: u32,
        target: String,
        target_chunk_size: u32,
    },
    /// A chunk could not be compressed. Not retryable.
    #[error("cannot compress chunk {digest} for the target: {detail}")]
    Encode { digest: Digest, detail: String },
    /// A chunk sent under the source's digest hashes to something else in the target: the two
    /// repositories do not name chunks alike. Nothing is committed.
    #[error(
        "chunk {source_digest} hashes to {target_digest} in the target: the repositories do not name chunks \
         alike, and the copy stopped before committing anything that used it"
    )]
    DigestsDiffer {
        source_digest: Digest,
        target_digest: Digest,
    },
    /// The caller cancelled the copy; the snapshots committed before stay.
    #[error("the copy was cancelled; {committed} snapshots were copied before")]
    Cancelled { committed: usize },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl CopyError {
    /// Whether the input was wrong and nothing was written (the command's exit code 2).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            CopyError::ChunkSizeMismatch { .. }
                | CopyError::Repo(
                    RepoError::SnapshotNotFound { .. }
                        | RepoError::AmbiguousSnapshot { .. }
                        | RepoError::LatestNeedsVm { .. }
                        | RepoError::NoSnapshotOfVm { .. }
                )
        )
    }
}

/// What was moved: per worker, per snapshot and for the whole copy (flattened into the JSON of both
/// reports, so `chunks_sent` stands beside `id` or `snapshots_copied`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopyCounts {
    /// Chunks read from the source and stored in the target.
    pub chunks_sent: u64,
    /// Chunks the target already had (found by digest).
    pub chunks_present: u64,
    /// Zero chunks (stored as nothing on both sides).
    pub chunks_zero: u64,
    /// Bytes read from the source's packs (as stored there).
    pub bytes_read: u64,
    /// Bytes written into the target's packs (as stored there, compressed).
    pub bytes_sent: u64,
    /// Plaintext bytes of the chunks sent.
    pub plain_bytes_sent: u64,
}

impl std::ops::AddAssign for CopyCounts {
    fn add_assign(&mut self, o: CopyCounts) {
        self.chunks_sent += o.chunks_sent;
        self.chunks_present += o.chunks_present;
        self.chunks_zero += o.chunks_zero;
        self.bytes_read += o.bytes_read;
        self.bytes_sent += o.bytes_sent;
        self.plain_bytes_sent += o.plain_bytes_sent;
    }
}

/// One snapshot of a copy.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopiedSnapshot {
    pub id: String,
    pub vm: String,
    /// False: the target already held it, and nothing was done.
    pub copied: bool,
    #[serde(flatten)]
    pub counts: CopyCounts,
    pub seconds: f64,
}

/// What a copy did, per snapshot (oldest first) and in total.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    /// Whether source digests were looked up in the target as they are (both repositories plain).
    pub same_digests: bool,
    pub snapshots: Vec<CopiedSnapshot>,
    pub snapshots_copied: u64,
    pub snapshots_skipped: u64,
    #[serde(flatten)]
    pub counts: CopyCounts,
    pub seconds: f64,
}

impl CopyReport {
    fn add(&mut self, s: CopiedSnapshot) {
        if s.copied {
            self.snapshots_copied += 1;
        } else {
            self.snapshots_skipped += 1;
        }
        self.counts += s.counts;
        self.snapshots.push(s);
    }
}

/// Whether a digest names the same plaintext in both repositories, so that the target can be asked for a
/// source digest as it is: both hash with plain BLAKE3 (unencrypted repositories), or both with the same
/// chunk-id key (two repositories sharing a master key). A plain and an encrypted repository, or two
/// encrypted ones with their own keys, never agree. The copy still checks the answer on every chunk it
/// sends ([`CopyError::DigestsDiffer`]).
fn same_digests(from: &Repository, to: &Repository) -> bool {
    from.chunk_hasher() == to.chunk_hasher()
}

/// Copies the selected snapshots of `from` that `to` does not hold into `to`. `encoder` makes one
/// [`ChunkEncoder`] per worker; `cancelled` is polled between batches (a cancelled copy commits nothing
/// more; the snapshots committed before stay).
pub fn copy(
    from: &Repository,
    to: &Repository,
    options: &CopyOptions,
    encoder: &(dyn Fn() -> Box<dyn ChunkEncoder> + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<CopyReport, CopyError> {
    copy_with(
        from,
        to,
        options,
        encoder,
        cancelled,
        same_digests(from, to),
    )
}

/// [`copy`], with whether source digests are the target's given (tests take the path of keyed digests
/// between plain repositories).
fn copy_with(
    from: &Repository,
    to: &Repository,
    options: &CopyOptions,
    encoder: &(dyn Fn() -> Box<dyn ChunkEncoder> + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
    same_digests: bool,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let selected = select(from, options)?;
    let present: HashSet<String> = to.manifest_ids()?.into_iter().collect();
    let todo: Vec<&SnapshotInfo> = selected
        .iter()
        .filter(|s| !present.contains(&s.id))
        .collect();
    check_chunk_sizes(from, to, &todo)?;
    let mut report = CopyReport {
        from: from.location().to_string(),
        to: to.location().to_string(),
        same_digests,
        ..CopyReport::default()
    };
    if !todo.is_empty() {
        // Scratch that killed copies (and backups) left in the target.
        to.remove_stale_scratch()?;
    }
    let recent = Mutex::new(Recent::default());
    for info in &selected {
        if present.contains(&info.id) {
            info!(snapshot = %info.id, "Snapshot already in the target; skipped.");
            report.add(CopiedSnapshot {
                id: info.id.clone(),
                vm: info.vm.clone(),
                ..CopiedSnapshot::default()
            });
            continue;
        }
        if cancelled() {
            return Err(CopyError::Cancelled {
                committed: report.snapshots_copied as usize,
            });
        }
        let copied = copy_one(
            from,
            to,
            info,
            report.same_digests,
            options.workers,
            encoder,
            cancelled,
            &recent,
        )
        .map_err(|e| match e {
            CopyError::Cancelled { .. } => CopyError::Cancelled {
                committed: report.snapshots_copied as usize,
            },
            e => e,
        })?;
        report.add(copied);
    }
    report.seconds = started.elapsed().as_secs_f64();
    info!(
        copied = report.snapshots_copied,
        skipped = report.snapshots_skipped,
        chunks_sent = report.counts.chunks_sent,
        chunks_present = report.counts.chunks_present,
        "Copy finished."
    );
    Ok(report)
}

/// The snapshots the options name, oldest first, each once.
fn select(from: &Repository, options: &CopyOptions) -> Result<Vec<SnapshotInfo>, CopyError> {
    let listed = from.list_snapshots()?;
    if options.vms.is_empty() && options.snapshots.is_empty() {
        return Ok(listed);
    }
    let mut wanted: HashSet<String> = HashSet::new();
    for vm in &options.vms {
        let before = wanted.len();
        wanted.extend(listed.iter().filter(|s| &s.vm == vm).map(|s| s.id.clone()));
        if wanted.len() == before && !listed.iter().any(|s| &s.vm == vm) {
            let mut vms: Vec<&str> = listed.iter().map(|s| s.vm.as_str()).collect();
            vms.sort();
            vms.dedup();
            return Err(RepoError::NoSnapshotOfVm {
                repo: from.path().to_owned(),
                vm: vm.clone(),
                detail: if vms.is_empty() {
                    "the repository holds no snapshots".into()
                } else {
                    format!("it holds snapshots of {}", vms.join(", "))
                },
            }
            .into());
        }
    }
    let vm = match &options.vms[..] {
        [one] => Some(one.as_str()),
        _ => None,
    };
    let ids: HashSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    for given in &options.snapshots {
        // A whole id needs no resolving (a job passes hundreds; each resolve lists the repository).
        if ids.contains(given.as_str()) {
            wanted.insert(given.clone());
        } else {
            wanted.insert(from.resolve_snapshot(given, vm)?);
        }
    }
    Ok(listed
        .into_iter()
        .filter(|s| wanted.contains(&s.id))
        .collect())
}

/// Refuses the copy, before anything is written, when a disk to copy has another chunk size than the
/// target's. Reads each manifest's metadata only.
fn check_chunk_sizes(
    from: &Repository,
    to: &Repository,
    todo: &[&SnapshotInfo],
) -> Result<(), CopyError> {
    let target_chunk_size = to.chunk_size();
    for info in todo {
        let key = snapshot_key(&info.id);
        let path = from.store().display_key(&key);
        let object = from.store().open(&key)?;
        let (meta, _) = read_meta(&*object, &path, Some(&info.id))?;
        if let Some(disk) = meta
            .disks
            .iter()
            .find(|d| d.chunk_size != target_chunk_size)
        {
            return Err(CopyError::ChunkSizeMismatch {
                snapshot: info.id.clone(),
                disk: disk.name.clone(),
                disk_chunk_size: disk.chunk_size,
                target: to.location().to_string(),
                target_chunk_size,
            });
        }
    }
    Ok(())
}

/// Digests sent in this run, the oldest forgotten first beyond [`RECENT_SENT`].
#[derive(Default)]
struct Recent {
    set: HashSet<Digest>,
    order: VecDeque<Digest>,
}

impl Recent {
    /// Takes `d` for the caller to store; false when another worker already took it (and stores it in
    /// the same session, or found it in the target).
    fn claim(&mut self, d: Digest) -> bool {
        if !self.set.insert(d) {
            return false;
        }
        self.order.push_back(d);
        if self.order.len() > RECENT_SENT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Consecutive entries of one disk's chunk table.
struct Batch {
    disk: usize,
    first: u64,
    refs: Vec<ChunkRef>,
}

/// Everything a worker shares with the others while one snapshot is copied.
struct Shared<'a> {
    from: &'a Repository,
    to: &'a Repository,
    session: &'a crate::BackupSession,
    same_digests: bool,
    recent: &'a Mutex<Recent>,
    /// Set by the first worker that fails (or by a cancel): the others and the table reader stop.
    stop: AtomicBool,
}

#[allow(clippy::too_many_arguments)]
fn copy_one(
    from: &Repository,
    to: &Repository,
    info: &SnapshotInfo,
    same_digests: bool,
    workers: usize,
    encoder: &(dyn Fn() -> Box<dyn ChunkEncoder> + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
    recent: &Mutex<Recent>,
) -> Result<CopiedSnapshot, CopyError> {
    let started = Instant::now();
    let snapshot = from.open_snapshot(&info.id)?;
    let meta = snapshot.meta();
    let mut session = to.begin_backup(&meta.vm)?;
    session.keep_identity(&meta.id, meta.time, meta.time_nanos, &meta.hostname);
    for d in &meta.disks {
        session.add_disk(DiskMeta {
            cbt: None,
            ..d.clone()
        })?;
    }
    info!(snapshot = %meta.id, vm = %meta.vm, "Copying a snapshot.");
    let shared = Shared {
        from,
        to,
        session: &session,
        same_digests,
        recent,
        stop: AtomicBool::new(false),
    };
    let workers = if workers == 0 {
        DEFAULT_COPY_WORKERS
    } else {
        workers
    };
    let (tx, rx) = sync_channel::<Batch>(workers * COPY_QUEUE_BATCHES);
    // Taken out and dropped by a worker that fails, so that a table reader waiting on a full queue wakes.
    let rx = Mutex::new(Some(rx));
    let (fed, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let shared = &shared;
                let rx = &rx;
                scope.spawn(move || {
                    let mut writer = shared.session.pack_writer();
                    let mut enc = encoder();
                    let done = work(shared, rx, &mut writer, enc.as_mut());
                    if done.is_err() {
                        shared.stop.store(true, Ordering::SeqCst);
                        drop(rx.lock().unwrap_or_else(|e| e.into_inner()).take());
                        // The session is poisoned by the dropped writer; nothing of it commits.
                        return done;
                    }
                    writer.finish()?;
                    done
                })
            })
            .collect();
        let fed = feed(&snapshot, &tx, &shared.stop, cancelled);
        if fed.is_err() {
            shared.stop.store(true, Ordering::SeqCst);
        }
        drop(tx);
        let results: Vec<Result<CopyCounts, CopyError>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (fed, results)
    });
    let mut tally = CopyCounts::default();
    let mut first_error = fed.err();
    for r in results {
        match r {
            Ok(t) => tally += t,
            Err(e) => {
                // A cancel is the reason only when nothing else went wrong.
                if first_error
                    .as_ref()
                    .is_none_or(|f| matches!(f, CopyError::Cancelled { .. }))
                {
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let copied = match session.commit(meta.domain_xml.clone()) {
        Ok(committed) => {
            info!(snapshot = %committed.id, sent = tally.chunks_sent, present = tally.chunks_present,
                  "Snapshot copied.");
            true
        }
        // Another copy committed it meanwhile: the target holds it, which is what was wanted.
        Err(RepoError::SessionFailed { .. }) if to.manifest_ids()?.contains(&meta.id) => {
            warn!(snapshot = %meta.id, "Another copy committed this snapshot first; keeping that one.");
            false
        }
        Err(e) => return Err(e.into()),
    };
    Ok(CopiedSnapshot {
        id: meta.id.clone(),
        vm: meta.vm.clone(),
        copied,
        counts: tally,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Streams every disk's table into batches for the workers.
fn feed(
    snapshot: &Snapshot,
    tx: &SyncSender<Batch>,
    stop: &AtomicBool,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<(), CopyError> {
    for disk in 0..snapshot.meta().disks.len() {
        let mut batch = Batch {
            disk,
            first: 0,
            refs: Vec::with_capacity(COPY_BATCH),
        };
        for (at, r) in (1u64..).zip(snapshot.chunks(disk)) {
            batch.refs.push(r?);
            if batch.refs.len() == COPY_BATCH {
                // `at` entries are batched so far: the next batch starts there.
                let next = Batch {
                    disk,
                    first: at,
                    refs: Vec::with_capacity(COPY_BATCH),
                };
                if !send(tx, std::mem::replace(&mut batch, next), stop, cancelled)? {
                    return Ok(());
                }
            }
        }
        if !batch.refs.is_empty() && !send(tx, batch, stop, cancelled)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Hands a batch to the workers; `false` when they stopped (one failed: its error is the copy's).
fn send(
    tx: &SyncSender<Batch>,
    batch: Batch,
    stop: &AtomicBool,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<bool, CopyError> {
    if cancelled() {
        return Err(CopyError::Cancelled { committed: 0 });
    }
    if stop.load(Ordering::SeqCst) {
        return Ok(false);
    }
    Ok(tx.send(batch).is_ok())
}

/// One worker: batches until the table reader is done or someone failed.
fn work(
    shared: &Shared<'_>,
    rx: &Mutex<Option<Receiver<Batch>>>,
    writer: &mut PackWriter,
    encoder: &mut dyn ChunkEncoder,
) -> Result<CopyCounts, CopyError> {
    let mut tally = CopyCounts::default();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(tally);
        }
        let next = rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Receiver::recv);
        let Some(Ok(batch)) = next else {
            return Ok(tally);
        };
        let mut out = Vec::with_capacity(batch.refs.len());
        for r in &batch.refs {
            out.push(match r {
                ChunkRef::Zero => {
                    tally.chunks_zero += 1;
                    ChunkRef::Zero
                }
                ChunkRef::Data(d) => {
                    ChunkRef::Data(copy_chunk(shared, d, writer, encoder, &mut tally)?)
                }
            });
        }
        shared.session.set_chunks(batch.disk, batch.first, &out)?;
    }
}

/// Makes sure the target has the chunk `digest` names in the source; returns its digest in the target.
fn copy_chunk(
    shared: &Shared<'_>,
    digest: &Digest,
    writer: &mut PackWriter,
    encoder: &mut dyn ChunkEncoder,
    tally: &mut CopyCounts,
) -> Result<Digest, CopyError> {
    // Claimed before the lookup, so that two workers meeting one new chunk at once send it once (the
    // counts are exact). A claimed chunk is in the target, or stored in this session before it commits.
    let known = |d: &Digest| -> Result<bool, CopyError> {
        if !shared
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claim(*d)
        {
            return Ok(true);
        }
        Ok(shared.to.lookup(d)?.is_some())
    };
    if shared.same_digests && known(digest)? {
        tally.chunks_present += 1;
        return Ok(*digest);
    }
    let (plain, stored_len) = read_verified(shared.from, digest)?;
    tally.bytes_read += stored_len;
    let target = shared.to.digest_of(&plain);
    if shared.same_digests {
        if target != *digest {
            return Err(CopyError::DigestsDiffer {
                source_digest: *digest,
                target_digest: target,
            });
        }
    } else if known(&target)? {
        tally.chunks_present += 1;
        return Ok(target);
    }
    let (codec, data) = encoder.encode(&plain).map_err(|detail| CopyError::Encode {
        digest: *digest,
        detail,
    })?;
    let raw_len = u32::try_from(plain.len()).unwrap_or(u32::MAX);
    writer.add(target, codec, raw_len, &data)?;
    kill_point();
    tally.chunks_sent += 1;
    tally.bytes_sent += data.len() as u64;
    tally.plain_bytes_sent += plain.len() as u64;
    Ok(target)
}

/// The plaintext of a source chunk, checked against its digest, and the bytes read for it: the first copy
/// the source's rule finds, and when that one does not decode or verify, every other copy
/// ([`Repository::load_chunk`]), as restores do.
fn read_verified(from: &Repository, digest: &Digest) -> Result<(Vec<u8>, u64), CopyError> {
    if let Ok(Some((loc, stored))) = from.read_digest(digest)
        && let Ok(plain) = from.plaintext(digest, &loc, &stored)
    {
        return Ok((plain, stored.data.len() as u64));
    }
    let plain = from.load_chunk(digest)?;
    let len = plain.len() as u64;
    Ok((plain, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;

    impl ChunkEncoder for Plain {
        fn encode(&mut self, plain: &[u8]) -> std::result::Result<(Codec, Vec<u8>), String> {
            Ok((Codec::None, plain.to_vec()))
        }
    }

    struct Failing;

    impl ChunkEncoder for Failing {
        fn encode(&mut self, _: &[u8]) -> std::result::Result<(Codec, Vec<u8>), String> {
            Err("no codec today".into())
        }
    }

    const CHUNK: u32 = 64 * 1024;

    fn chunk(seed: u8) -> Vec<u8> {
        let mut data = vec![0u8; CHUNK as usize];
        let mut hasher = blake3::Hasher::new();
        hasher.update(&[seed]);
        hasher.finalize_xof().fill(&mut data);
        data
    }

    /// A snapshot of one disk whose chunks are `seeds` (`None`: a zero chunk), with CBT state.
    fn backup(repo: &Repository, seeds: &[Option<u8>]) -> String {
        let session = repo.begin_backup("web01").unwrap();
        let disk = session
            .add_disk(DiskMeta {
                name: "vda".into(),
                size: seeds.len() as u64 * u64::from(CHUNK),
                chunk_size: CHUNK,
                location: "/images/web01.raw".into(),
                cbt: Some(serde_json::json!({"checkpoint": "backflow.1"})),
            })
            .unwrap();
        let mut writer = session.pack_writer();
        let mut stored = HashSet::new();
        for (i, seed) in seeds.iter().enumerate() {
            let r = match seed {
                None => ChunkRef::Zero,
                Some(seed) => {
                    let data = chunk(*seed);
                    let digest = repo.digest_of(&data);
                    if stored.insert(digest) {
                        writer.add(digest, Codec::None, CHUNK, &data).unwrap();
                    }
                    ChunkRef::Data(digest)
                }
            };
            session.set_chunk(disk, i as u64, r).unwrap();
        }
        writer.finish().unwrap();
        session.commit(Some("<domain/>".into())).unwrap().id
    }

    fn repos() -> (tempfile::TempDir, Repository, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let from = Repository::init(&dir.path().join("a"), CHUNK).unwrap();
        let to = Repository::init(&dir.path().join("b"), CHUNK).unwrap();
        (dir, from, to)
    }

    fn plain() -> Box<dyn ChunkEncoder> {
        Box::new(Plain)
    }

    #[test]
    fn with_keyed_digests_every_chunk_is_read_hashed_for_the_target_and_sent_once() {
        let (_dir, from, to) = repos();
        let seeds = [
            Some(1),
            Some(2),
            None,
            Some(1),
            Some(3),
            None,
            Some(2),
            Some(4),
        ];
        let first = backup(&from, &seeds);
        let options = CopyOptions {
            workers: 3,
            ..CopyOptions::default()
        };
        let r = copy_with(&from, &to, &options, &plain, &|| false, false).unwrap();
        assert_eq!((r.snapshots_copied, r.counts.chunks_sent), (1, 4));
        assert_eq!((r.counts.chunks_present, r.counts.chunks_zero), (2, 2));
        // Keyed digests cannot be looked up before reading: all six data chunks are read.
        assert_eq!(r.counts.bytes_read, 6 * u64::from(CHUNK));
        assert_eq!(r.counts.bytes_sent, 4 * u64::from(CHUNK));

        let (a, b) = (
            from.open_snapshot(&first).unwrap(),
            to.open_snapshot(&first).unwrap(),
        );
        let (ma, mb) = (a.meta(), b.meta());
        assert_eq!(
            (
                &mb.id,
                &mb.vm,
                mb.time,
                mb.time_nanos,
                &mb.hostname,
                &mb.domain_xml
            ),
            (
                &ma.id,
                &ma.vm,
                ma.time,
                ma.time_nanos,
                &ma.hostname,
                &ma.domain_xml
            )
        );
        assert_eq!(mb.disks[0].cbt, None, "CBT state is the source's own");
        assert_eq!(mb.disks[0].location, ma.disks[0].location);
        let entries = |s: &Snapshot| s.chunks(0).collect::<crate::Result<Vec<_>>>().unwrap();
        assert_eq!(entries(&b), entries(&a));
        for (r, seed) in entries(&b).iter().zip(seeds) {
            if let (ChunkRef::Data(d), Some(seed)) = (r, seed) {
                assert_eq!(to.load_chunk(d).unwrap(), chunk(seed));
            }
        }

        // A second snapshot sharing chunks: what the target has is not sent again.
        let second = backup(&from, &[Some(1), Some(5), None, Some(4)]);
        let r = copy_with(&from, &to, &options, &plain, &|| false, false).unwrap();
        assert_eq!((r.snapshots_copied, r.snapshots_skipped), (1, 1));
        assert_eq!((r.counts.chunks_sent, r.counts.chunks_present), (1, 2));
        assert_eq!(r.snapshots[1].id, second);
    }

    #[test]
    fn a_failing_worker_stops_the_copy_and_commits_nothing() {
        let (_dir, from, to) = repos();
        // More batches than the queue holds: the table reader is waiting when the workers fail.
        let seeds: Vec<Option<u8>> = (0..=255u8).map(Some).collect();
        let big = seeds.repeat(3);
        backup(&from, &big);
        let options = CopyOptions {
            workers: 2,
            ..CopyOptions::default()
        };
        let failing = || Box::new(Failing) as Box<dyn ChunkEncoder>;
        let e = copy(&from, &to, &options, &failing, &|| false).unwrap_err();
        assert!(matches!(e, CopyError::Encode { .. }), "{e}");
        assert!(to.manifest_ids().unwrap().is_empty());
        let e = copy(&from, &to, &options, &plain, &|| true).unwrap_err();
        assert!(matches!(e, CopyError::Cancelled { committed: 0 }), "{e}");
        assert!(to.manifest_ids().unwrap().is_empty());
        let r = copy(&from, &to, &options, &plain, &|| false).unwrap();
        assert_eq!((r.counts.chunks_sent, r.counts.chunks_present), (256, 512));
    }
}
