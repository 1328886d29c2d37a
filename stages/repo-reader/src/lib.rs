//! Restore source `repo-reader`: reads the chunks of one snapshot from the repository.
//!
//! Workers take batches of chunks in turn, so several packs are read at once and the writers
//! downstream always have work (read-ahead bounded by the channel). Chunks are passed on as
//! stored (still compressed) with their digest; runs of zero chunks become one message each.
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

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, Disk, DiskSource, InvalidOption, Message, MessageType, Payload, RunContext, SizeOnly,
    Stage, StageError, StageIo, Work, Worker,
};
use backflow_repository::{ChunkRef, Snapshot};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "repo-reader";

/// Chunks a worker takes at a time: large enough to read packs sequentially, small enough to
/// spread one disk over all workers.
pub const BATCH_CHUNKS: u64 = 16;

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
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "restore source: a snapshot's chunks; workers read ahead in batches",
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
            let mut batch = me;
            while batch * BATCH_CHUNKS < chunks {
                let first = batch * BATCH_CHUNKS;
                let end = (first + BATCH_CHUNKS).min(chunks);
                let mut zeros: Option<(u64, u64)> = None;
                for index in first..end {
                    let digest = match snapshot.chunk(*slot, index)? {
                        ChunkRef::Zero => {
                            match &mut zeros {
                                Some((_, n)) => *n += 1,
                                None => zeros = Some((index, 1)),
                            }
                            continue;
                        }
                        ChunkRef::Data(d) => d,
                    };
                    if let Some((at, count)) = zeros.take()
                        && send_zeros(worker, disk, at, count).is_err()
                    {
                        return Ok(());
                    }
                    let missing = |why: String| {
                        StageError::Corrupt(format!(
                            "snapshot {}, disk {}, chunk {index}: chunk {digest} {why}",
                            snapshot.info().id,
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
                                "is damaged (every stored copy is marked damaged by verify; the \
                                 next backup of a VM that still has the data stores it again)"
                                    .into(),
                            );
                            damaged(worker.ctx(), &mut chunk, e)?
                        }
                        Ok(None) => damaged(
                            worker.ctx(),
                            &mut chunk,
                            missing("is missing from the repository".into()),
                        )?,
                        // The copy the index names cannot be read (a damaged record or pack): the next
                        // good copy, decoded and verified, if there is one.
                        Err(e) => match repo.load_chunk(&digest) {
                            Ok(plain) => {
                                worker.ctx().warn(format!(
                                    "disk {}, chunk {index}: the stored copy read first cannot be read \
                                     ({e}); restored from another copy",
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
                    if worker.send(Message::Chunk(chunk)).is_err() {
                        return Ok(());
                    }
                }
                if let Some((at, count)) = zeros
                    && send_zeros(worker, disk, at, count).is_err()
                {
                    return Ok(());
                }
                batch += all;
            }
        }
        Ok(())
    }
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
