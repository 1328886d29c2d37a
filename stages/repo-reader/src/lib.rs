//! Restore source `repo-reader`: reads the chunks of one snapshot from the repository.
//!
//! Workers take regions of the disk ([`REGION_CHUNKS`] chunks) in turn, so several packs are read
//! at once and the writers downstream always have work (read-ahead bounded by the channel). Within a
//! region, chunks are read in the order they lie in their packs, not in disk order: the region's
//! chunks are located, grouped by pack and sorted by offset, and neighbours are read as one span
//! ([`SPAN_MAX`], [`SPAN_GAP`]; [`backflow_repository::Repository::read_span`]), so that object
//! storage serves a restore with a few large ranged GETs rather than one small one per chunk (its
//! cost follows the number of requests), and a chunk that occurs several times in a region is read
//! once. The disk writers write at each chunk's offset, so the order does not matter to them.
//! Chunks are passed on as stored (still compressed) with their digest; runs of zero chunks become
//! one message each. Memory: a worker holds one span (at most [`SPAN_MAX`]) while its chunks are in
//! the channels, and a region's plan (a few dozen bytes per chunk).
//!
//! The snapshot is opened in the preflight, before anything runs; the disks it will restore are
//! recorded for the stages after it ([`PLAN_RESULT`]), so that a disk writer can check its targets
//! before any data moves. A snapshot that cannot be opened fails the run when the workers start,
//! as it did before there was a preflight.
//!
//! # Damage (`allow_damaged`)
//! A chunk that no stored copy gives back (missing, marked damaged, unreadable here; or, in the
//! stages after this one, undecodable or not matching its digest) fails the restore, naming it.
//! With `allow_damaged`, for disaster recovery, the run restores zeros there instead
//! ([`RunContext::allow_damage`]) and, at the end, lists every such range (disk, offset, length)
//! as a warning and in the report's results ([`DAMAGED_RESULT`]).

use std::collections::HashMap;
use std::ops::{ControlFlow, Range};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, Disk, DiskSource, InvalidOption, Message, MessageType, Payload, RunContext, SizeOnly,
    Stage, StageError, StageIo, Work, Worker,
};
use backflow_repository::{ChunkLocation, ChunkRef, Digest, Repository, Snapshot};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "repo-reader";

/// Chunks a worker takes at a time (a region of the disk), unless `region_chunks` says: enough that the chunks a region finds in one
/// pack make long spans, few enough that its plan is small and one disk spreads over all workers.
pub const REGION_CHUNKS: u64 = 1024;

/// The most bytes of a pack one read of a region takes at once (neighbouring chunks of one pack
/// join a span while the bytes between them are at most [`SPAN_GAP`]).
pub const SPAN_MAX: u64 = 8 << 20;

/// The most bytes between two chunks of one span (read and dropped).
pub const SPAN_GAP: u64 = 1 << 20;

/// The run result listing the disks this restore reads (`[{"disk", "size"}]`), recorded in the
/// preflight: what a disk writer restoring into a directory checks its targets against.
pub const PLAN_RESULT: &str = backflow_pipeline::RESTORE_PLAN;

/// The run result listing the ranges restored as zeros under `allow_damaged`
/// (`[{"disk", "offset", "length", "digest", "cause"}]`).
pub const DAMAGED_RESULT: &str = "damaged";

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct RepoReaderOptions {
    /// Snapshot id, a unique prefix of one, or `latest` (of `vm`; without `vm` only in a repository
    /// of one VM).
    #[serde(default = "latest")]
    pub snapshot: String,
    /// Restore only this disk; empty: every disk of the snapshot.
    #[serde(default)]
    pub disk: String,
    /// The VM (identity) whose snapshots `snapshot` names: its `latest`, and prefixes among its
    /// snapshots only; empty: any.
    #[serde(default)]
    pub vm: String,
    /// Restore zeros where no stored copy of a chunk can be read, and list those ranges, instead
    /// of failing (disaster recovery).
    #[serde(default)]
    pub allow_damaged: bool,
    /// Chunks a worker reads as one region: its chunks are read in pack order, neighbours in one
    /// request. Larger: longer spans, fewer requests; smaller: the disk spreads over more workers.
    #[serde(default = "region_chunks")]
    pub region_chunks: u64,
}

fn region_chunks() -> u64 {
    REGION_CHUNKS
}

fn latest() -> String {
    "latest".into()
}

impl Default for RepoReaderOptions {
    fn default() -> Self {
        RepoReaderOptions {
            snapshot: latest(),
            disk: String::new(),
            vm: String::new(),
            allow_damaged: false,
            region_chunks: REGION_CHUNKS,
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "restore source: a snapshot's chunks; each worker reads a region of the disk in pack order, neighbouring chunks in one read",
    input: None,
    output: Some(MessageType::CompressedChunk),
    repository: RepositoryUse::Required,
    options: option_docs::<RepoReaderOptions>,
    build: Build::Stage(|options| build_stage(options, RepoReader::new)),
};

type Plan = (Arc<Snapshot>, Vec<(usize, Arc<Disk>)>);

pub struct RepoReader {
    options: RepoReaderOptions,
    /// The id `snapshot` names, resolved once (in preflight, before anything runs).
    resolved: OnceLock<Result<String, String>>,
    plan: OnceLock<Result<Plan, String>>,
}

impl RepoReader {
    pub fn new(options: RepoReaderOptions) -> Result<Self, InvalidOption> {
        if options.snapshot.is_empty() {
            return Err(InvalidOption::new(
                "snapshot",
                "must be a snapshot id or `latest`",
            ));
        }
        if options.region_chunks == 0 {
            return Err(InvalidOption::new(
                "region_chunks",
                "must be at least 1 (chunks per region)",
            ));
        }
        if !options.vm.is_empty() {
            backflow_repository::check_identity(&options.vm)
                .map_err(|e| InvalidOption::new("vm", e.to_string()))?;
        }
        Ok(RepoReader {
            options,
            resolved: OnceLock::new(),
            plan: OnceLock::new(),
        })
    }

    /// The snapshot id the options name ([`backflow_repository::Repository::resolve_snapshot`]):
    /// an unknown or ambiguous name is an error listing what there is.
    fn resolved(&self, ctx: &RunContext) -> Result<&str, StageError> {
        self.resolved
            .get_or_init(|| {
                let repo = ctx.repository().map_err(|e| e.to_string())?;
                let vm = Some(self.options.vm.as_str()).filter(|vm| !vm.is_empty());
                repo.resolve_snapshot(&self.options.snapshot, vm)
                    .map_err(|e| e.to_string())
            })
            .as_deref()
            .map_err(|e| StageError::Config(e.clone()))
    }

    fn plan(&self, ctx: &RunContext) -> Result<&Plan, StageError> {
        let id = self.resolved(ctx)?;
        self.plan
            .get_or_init(|| {
                let repo = ctx.repository().map_err(|e| e.to_string())?;
                let snapshot = repo.open_snapshot(id).map_err(|e| e.to_string())?;
                let mut disks = Vec::new();
                for (i, meta) in snapshot.meta().disks.iter().enumerate() {
                    if !self.options.disk.is_empty() && meta.name != self.options.disk {
                        continue;
                    }
                    let source = DiskSource {
                        vm: snapshot.info().vm.clone(),
                        name: meta.name.clone(),
                        location: meta.location.clone().into(),
                        reader: Arc::new(SizeOnly(meta.size)),
                        tracking: None,
                        definition: None,
                    };
                    let disk = Disk {
                        source: Arc::new(source),
                        chunk_size: meta.chunk_size,
                        parent: None,
                    };
                    disks.push((i, Arc::new(disk)));
                }
                if disks.is_empty() {
                    let names: Vec<_> = snapshot
                        .meta()
                        .disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect();
                    return Err(format!(
                        "snapshot {} has no disk named {:?}; its disks: {}",
                        snapshot.info().id,
                        self.options.disk,
                        names.join(", ")
                    ));
                }
                // The data to restore, for the overall progress: one pass over the chunk tables.
                let mut data = 0;
                for (slot, disk) in &disks {
                    for (index, entry) in snapshot.chunks(*slot).enumerate() {
                        if let ChunkRef::Data(_) = entry.map_err(|e| e.to_string())? {
                            data += disk.run_len(index as u64, 1);
                        }
                    }
                }
                ctx.plan_write(data);
                ctx.set_result(
                    "restored_snapshot",
                    serde_json::Value::String(snapshot.info().id.clone()),
                );
                ctx.set_result(
                    PLAN_RESULT,
                    disks
                        .iter()
                        .map(|(_, d)| serde_json::json!({"disk": d.name(), "size": d.size()}))
                        .collect(),
                );
                if self.options.allow_damaged {
                    ctx.allow_damage();
                }
                Ok((Arc::new(snapshot), disks))
            })
            .as_ref()
            .map_err(|e| StageError::Config(e.clone()))
    }
}

impl Stage for RepoReader {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::CompressedChunk),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    /// Resolves the snapshot before anything runs: an unknown id, an ambiguous prefix or `latest`
    /// among several VMs refuses the run (bad input), and no target is touched. Then opens it and
    /// records the plan for the stages after this one; a snapshot that cannot be opened is not
    /// refused here: the workers fail with the same error, as a failed run (a damaged manifest is
    /// damage, not bad input).
    fn preflight(&self, ctx: &RunContext) -> Result<(), StageError> {
        self.resolved(ctx)?;
        if let Err(e) = self.plan(ctx) {
            tracing::debug!(error = %e, "No restore plan: the snapshot cannot be opened.");
        }
        Ok(())
    }
    /// Lists the ranges restored as zeros (allowed damage), once every stage is done with them.
    fn finish(&self, ctx: &RunContext) -> Result<(), StageError> {
        let damaged = ctx.damaged_ranges();
        if damaged.is_empty() {
            return Ok(());
        }
        let bytes: u64 = damaged.iter().map(|r| r.length).sum();
        for r in &damaged {
            ctx.warn(format!(
                "disk {}: {} bytes at offset {} restored as zeros: {}",
                r.disk, r.length, r.offset, r.cause
            ));
        }
        ctx.warn(format!(
            "{} damaged range(s), {bytes} bytes in all, were restored as zeros (--allow-damaged): \
             the restored data is incomplete there",
            damaged.len()
        ));
        ctx.set_result(
            DAMAGED_RESULT,
            serde_json::to_value(&damaged).map_err(|e| StageError::Internal(e.to_string()))?,
        );
        Ok(())
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let (snapshot, disks) = self.plan(worker.ctx())?;
        let repo = worker.ctx().repository()?;
        let (me, all) = (worker.index() as u64, worker.count() as u64);
        for (slot, disk) in disks {
            let chunks = disk.chunk_count();
            let size = self.options.region_chunks;
            let mut region = me;
            while region.saturating_mul(size) < chunks {
                let first = region * size;
                let end = first.saturating_add(size).min(chunks);
                let reader = RegionReader {
                    repo,
                    snapshot,
                    disk,
                };
                if reader.read(worker, *slot, first, end)?.is_break() {
                    return Ok(());
                }
                region += all;
            }
        }
        Ok(())
    }
}

/// Sending stopped: the run is ending, the worker returns.
type Sent = ControlFlow<()>;

/// One worker's reading of one region of a disk.
struct RegionReader<'a> {
    repo: &'a Repository,
    snapshot: &'a Snapshot,
    disk: &'a Arc<Disk>,
}

impl RegionReader<'_> {
    /// Sends the chunks `first..end` of the disk in slot `slot`: runs of zero chunks as they come, then
    /// the data chunks grouped into spans (`plan_spans`), each span read at once; a chunk that appears
    /// several times in the region is read once and sent for each of its places.
    fn read(
        &self,
        worker: &mut Worker<'_>,
        slot: usize,
        first: u64,
        end: u64,
    ) -> Result<Sent, StageError> {
        // Each distinct chunk once, with every place it fills, in the order chunks first appear (so that
        // what is read alone, and the error a missing chunk gives, follow the disk).
        let mut places: Vec<(Digest, Vec<u64>)> = Vec::new();
        let mut slot_of: HashMap<Digest, usize> = HashMap::new();
        let mut zeros: Option<(u64, u64)> = None;
        for (index, entry) in
            (first..end).zip(self.snapshot.chunk_range(slot, first, end - first)?)
        {
            match entry? {
                ChunkRef::Zero => match &mut zeros {
                    Some((at, n)) if *at + *n == index => *n += 1,
                    _ => {
                        if let Some((at, count)) = zeros.replace((index, 1))
                            && send_zeros(worker, self.disk, at, count).is_err()
                        {
                            return Ok(Sent::Break(()));
                        }
                    }
                },
                ChunkRef::Data(digest) => {
                    let slot = *slot_of.entry(digest).or_insert_with(|| {
                        places.push((digest, Vec::new()));
                        places.len() - 1
                    });
                    places[slot].1.push(index);
                }
            }
        }
        if let Some((at, count)) = zeros
            && send_zeros(worker, self.disk, at, count).is_err()
        {
            return Ok(Sent::Break(()));
        }
        // Where each chunk is; one that cannot be located is read alone (which names why).
        let mut located = Vec::with_capacity(places.len());
        for (slot, (digest, indexes)) in places.iter().enumerate() {
            match self.repo.locate(digest) {
                Ok(Some(loc)) => located.push((loc, slot)),
                _ => {
                    for &index in indexes {
                        if self.read_one(worker, index, *digest)?.is_break() {
                            return Ok(Sent::Break(()));
                        }
                    }
                }
            }
        }
        located.sort_by_key(|(loc, _)| (loc.pack, loc.offset));
        let located: Vec<(ChunkLocation, Digest, &[u64])> = located
            .into_iter()
            .map(|(loc, slot)| (loc, places[slot].0, &places[slot].1[..]))
            .collect();
        for span in plan_spans(&located) {
            let span = &located[span];
            let locs: Vec<ChunkLocation> = span.iter().map(|(loc, _, _)| *loc).collect();
            // Chunks are sent as they arrive; `sent` counts those handed over, for a fallback after an
            // error midway.
            let (mut sent, mut stopped) = (0, false);
            let read = self.repo.read_span(&locs, |i, data| {
                let (loc, digest, indexes) = &span[i];
                for &index in *indexes {
                    let chunk = Chunk {
                        disk: self.disk.clone(),
                        index,
                        digest: Some(*digest),
                        verified: false,
                        payload: Payload::Encoded {
                            codec: loc.codec,
                            data: data.clone(),
                            raw_len: loc.raw_len,
                        },
                    };
                    if worker.send(Message::Chunk(chunk)).is_err() {
                        stopped = true;
                        return false;
                    }
                }
                sent = i + 1;
                true
            });
            if stopped {
                return Ok(Sent::Break(()));
            }
            match read {
                Ok(read) => {
                    worker
                        .ctx()
                        .source_bytes_read
                        .fetch_add(read, Ordering::Relaxed);
                }
                // Damage, or a pack a gc moved the chunks out of: the rest one by one, as the index says now.
                Err(e) => {
                    tracing::debug!(error = %e, "A span of chunks cannot be read at once; reading the rest one by one.");
                    for (_, digest, indexes) in &span[sent..] {
                        for &index in *indexes {
                            if self.read_one(worker, index, *digest)?.is_break() {
                                return Ok(Sent::Break(()));
                            }
                        }
                    }
                }
            }
        }
        Ok(Sent::Continue(()))
    }

    /// Reads and sends the chunk at `index` alone, with everything damage needs: another copy when the
    /// one found first cannot be read, zeros where the run allows damage, an error naming the chunk.
    fn read_one(
        &self,
        worker: &mut Worker<'_>,
        index: u64,
        digest: Digest,
    ) -> Result<Sent, StageError> {
        let (repo, disk) = (self.repo, self.disk);
        let missing = |why: String| {
            StageError::Corrupt(format!(
                "snapshot {}, disk {}, chunk {index}: chunk {digest} {why}",
                self.snapshot.info().id,
                disk.name()
            ))
        };
        let mut chunk = Chunk {
            disk: disk.clone(),
            index,
            digest: Some(digest),
            verified: false,
            payload: Payload::Zero { count: 1 },
        };
        let payload = match repo.read_digest(&digest) {
            Ok(Some((_, stored))) => {
                worker
                    .ctx()
                    .source_bytes_read
                    .fetch_add(stored.data.len() as u64, Ordering::Relaxed);
                Payload::Encoded {
                    codec: stored.codec,
                    data: Bytes::from(stored.data),
                    raw_len: stored.raw_len,
                }
            }
            Ok(None) if repo.damage_marks()?.is_marked(&digest) => {
                let e = missing(
                    "is damaged (every stored copy is marked damaged by verify; the next backup of \
                     a VM that still has the data stores it again)"
                        .into(),
                );
                damaged(worker.ctx(), &mut chunk, e)?
            }
            Ok(None) => damaged(
                worker.ctx(),
                &mut chunk,
                missing("is missing from the repository".into()),
            )?,
            // The copy the index names cannot be read (a damaged record or pack): the next good copy,
            // decoded and verified, if there is one.
            Err(e) => match repo.load_chunk(&digest) {
                Ok(plain) => {
                    worker.ctx().warn(format!(
                        "disk {}, chunk {index}: the stored copy read first cannot be read ({e}); \
                         restored from another copy",
                        disk.name()
                    ));
                    Payload::Raw(Bytes::from(plain))
                }
                Err(again) => damaged(
                    worker.ctx(),
                    &mut chunk,
                    missing(format!(
                        "cannot be read ({e}), and no other copy is readable ({again})"
                    )),
                )?,
            },
        };
        chunk.payload = payload;
        Ok(match worker.send(Message::Chunk(chunk)) {
            Ok(()) => Sent::Continue(()),
            Err(_) => Sent::Break(()),
        })
    }
}

fn loc_end(loc: &ChunkLocation) -> u64 {
    loc.offset + u64::from(loc.stored_len)
}

/// Splits chunks sorted by pack and offset into spans read at once: neighbours in one pack join a span
/// while the bytes between them are at most [`SPAN_GAP`] and the span stays within [`SPAN_MAX`] (a chunk
/// alone may be longer). Object storage charges per request more than per byte, so reading a little
/// that is not needed is cheaper than another GET; the bound keeps a worker's buffer small.
fn plan_spans<T>(located: &[(ChunkLocation, Digest, T)]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut start = 0;
    let mut end_byte = 0;
    for (i, (loc, _, _)) in located.iter().enumerate() {
        if i > start {
            let head = &located[start].0;
            let joins = loc.pack == head.pack
                && loc.offset <= end_byte + SPAN_GAP
                && loc_end(loc).max(end_byte) - head.offset <= SPAN_MAX;
            if !joins {
                spans.push(start..i);
                start = i;
                end_byte = 0;
            }
        }
        end_byte = end_byte.max(loc_end(loc));
    }
    if start < located.len() {
        spans.push(start..located.len());
    }
    spans
}

/// A chunk no stored copy gives back: its error, or zeros where the run allows damage.
fn damaged(ctx: &RunContext, chunk: &mut Chunk, error: StageError) -> Result<Payload, StageError> {
    if !ctx.damage_allowed() {
        return Err(error);
    }
    ctx.restore_as_zeros(chunk, error.to_string());
    Ok(Payload::Zero { count: 1 })
}

fn send_zeros(
    worker: &mut Worker<'_>,
    disk: &Arc<Disk>,
    index: u64,
    count: u64,
) -> Result<(), backflow_pipeline::Stopped> {
    worker.send(Message::Chunk(Chunk {
        disk: disk.clone(),
        index,
        digest: None,
        verified: false,
        payload: Payload::Zero { count },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backflow_repository::{Codec, PackId};

    fn at(pack: u8, offset: u64, len: u32) -> (ChunkLocation, Digest, ()) {
        let loc = ChunkLocation {
            pack: PackId([pack; 16]),
            offset,
            stored_len: len,
            raw_len: len,
            codec: Codec::None,
        };
        (loc, Digest([offset as u8; 32]), ())
    }

    #[test]
    fn spans_join_neighbours_of_one_pack_within_the_gap_and_the_bound() {
        let k = 64 * 1024;
        let located = vec![
            at(1, 32, k),
            at(1, 32 + u64::from(k), k),
            // A gap of exactly SPAN_GAP still joins; one byte more does not.
            at(1, 32 + 2 * u64::from(k) + SPAN_GAP, k),
            at(1, 32 + 3 * u64::from(k) + 2 * SPAN_GAP + 1, k),
            // Another pack starts another span; a span may reach SPAN_MAX exactly...
            at(2, 32, k),
            at(2, 32 + u64::from(k), (SPAN_MAX - u64::from(k)) as u32),
            // ...and not one byte more.
            at(2, 32 + SPAN_MAX, 1),
            // A chunk longer than SPAN_MAX is a span alone.
            at(3, 32, (SPAN_MAX + 1) as u32),
            at(3, 32 + SPAN_MAX + 1, k),
        ];
        assert_eq!(
            plan_spans(&located),
            vec![0..3, 3..4, 4..6, 6..7, 7..8, 8..9]
        );
        assert_eq!(plan_spans::<()>(&[]), Vec::<Range<usize>>::new());
    }
}
