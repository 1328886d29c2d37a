//! Restore source `repo-reader`: reads the chunks of one snapshot from the repository.
//!
//! Workers take batches of chunks in turn, so several packs are read at once and the writers
//! downstream always have work (read-ahead bounded by the channel). Chunks are passed on as
//! stored (still compressed) with their digest; runs of zero chunks become one message each.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, Disk, DiskSource, InvalidOption, Message, MessageType, Payload, SizeOnly, Stage,
    StageError, StageIo, Work, Worker,
};
use backflow_repository::{ChunkRef, Snapshot};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "repo-reader";

/// Chunks a worker takes at a time: large enough to read packs sequentially, small enough to
/// spread one disk over all workers.
pub const BATCH_CHUNKS: u64 = 16;

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct RepoReaderOptions {
    /// Snapshot id, or `latest`.
    #[serde(default = "latest")]
    pub snapshot: String,
    /// Restore only this disk; empty: every disk of the snapshot.
    #[serde(default)]
    pub disk: String,
}

fn latest() -> String {
    "latest".into()
}

impl Default for RepoReaderOptions {
    fn default() -> Self {
        RepoReaderOptions {
            snapshot: latest(),
            disk: String::new(),
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
        Ok(RepoReader {
            options,
            plan: OnceLock::new(),
        })
    }

    fn plan(&self, worker: &Worker<'_>) -> Result<&Plan, StageError> {
        self.plan
            .get_or_init(|| {
                let repo = worker.ctx().repository().map_err(|e| e.to_string())?;
                let snapshot = repo
                    .open_snapshot(&self.options.snapshot)
                    .map_err(|e| e.to_string())?;
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
