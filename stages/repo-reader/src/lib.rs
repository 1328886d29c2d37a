//! Restore source `repo-reader`: reads the chunks of one snapshot from the repository.
//!
//! Workers take batches of chunks in turn, so several packs are read at once and the writers
//! downstream always have work (read-ahead bounded by the channel). Chunks are passed on as
//! stored (still compressed) with their digest; runs of zero chunks become one message each.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepoReaderOptions {
    /// Snapshot id, a unique prefix of one, or `latest` (of `vm`; without `vm` only in a repository
    /// of one VM).
    #[serde(default = "latest")]
    pub snapshot: String,
    /// Only this disk; empty: every disk of the snapshot.
    #[serde(default)]
    pub disk: String,
    /// The VM (identity) whose snapshots `snapshot` names: its `latest`, and prefixes among its
    /// snapshots only; empty: any.
    #[serde(default)]
    pub vm: String,
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
        }
    }
}

pub const OPTION_DOCS: &[(&str, &str)] = &[
    (
        "snapshot",
        "snapshot id, a unique prefix of one, or latest (of vm; without vm only when the repository holds one VM)",
    ),
    ("disk", "restore only this disk; empty: every disk"),
    (
        "vm",
        "the VM whose snapshots snapshot names (its latest; prefixes among its snapshots); empty: any",
    ),
];

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

    fn plan(&self, worker: &Worker<'_>) -> Result<&Plan, StageError> {
        let id = self.resolved(worker.ctx())?;
        self.plan
            .get_or_init(|| {
                let repo = worker.ctx().repository().map_err(|e| e.to_string())?;
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
                worker.ctx().plan_write(data);
                worker.ctx().set_result(
                    "restored_snapshot",
                    serde_json::Value::String(snapshot.info().id.clone()),
                );
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
    /// among several VMs refuses the run (bad input), and no target is touched.
    fn preflight(&self, ctx: &RunContext) -> Result<(), StageError> {
        self.resolved(ctx).map(|_| ())
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let (snapshot, disks) = self.plan(worker)?;
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
                            return Err(missing(
                                "is damaged (every stored copy is marked damaged by verify; the \
                                 next backup of a VM that still has the data stores it again)"
                                    .into(),
                            ));
                        }
                        Ok(None) => return Err(missing("is missing from the repository".into())),
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
                            Err(again) => {
                                return Err(missing(format!(
                                    "cannot be read ({e}), and no other copy is readable ({again})"
                                )));
                            }
                        },
                    };
                    let chunk = Chunk {
                        disk: disk.clone(),
                        index,
                        digest: Some(digest),
                        verified: false,
                        payload,
                    };
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
