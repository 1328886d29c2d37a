//! Repository writer stage: stores new chunks in packs and commits the snapshot.
//!
//! Each worker streams into its own pack writer; chunk references go into the session's per-disk
//! chunk tables by index, so chunks may arrive in any order. Unchanged runs copy the parent's
//! references. Commit happens in [`Stage::finish`], which the runtime calls only when every stage
//! succeeded: packs and index first, the manifest last. A failed or cancelled run commits nothing
//! and every earlier snapshot stays as it was.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, Disk, InvalidOption, Message, MessageType, Payload, RunContext, Stage, StageError,
    StageIo, Work, Worker, stage::unexpected,
};
use backflow_repository::{BackupSession, ChunkRef, DiskMeta};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "repo-writer";

#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct RepoWriterOptions {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "packs new chunks into the repository, records every chunk's reference, commits the snapshot last",
    input: Some(MessageType::CompressedChunk),
    output: None,
    repository: RepositoryUse::Required,
    options: option_docs::<RepoWriterOptions>,
    build: Build::Stage(|options| build_stage(options, RepoWriter::new)),
};

const UNCHANGED_BATCH: u64 = 1024;

struct DiskState {
    slot: usize,
    disk: Arc<Disk>,
    arrived: Vec<AtomicU64>,
    chunks_seen: AtomicU64,
}

impl DiskState {
    /// Marks chunks `[first, first + count)` as arrived; errors on one that already had.
    fn mark(&self, first: u64, count: u64) -> Result<(), StageError> {
        let end = first + count;
        if end > self.disk.chunk_count() {
            return Err(StageError::Internal(format!(
                "disk {}: chunks up to {end} reached the writer, the disk has {}",
                self.disk.name(),
                self.disk.chunk_count()
            )));
        }
        let mut at = first;
        while at < end {
            let word = (at / 64) as usize;
            let bit = at % 64;
            let n = (64 - bit).min(end - at);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let before = self.arrived[word].fetch_or(mask, Ordering::Relaxed);
            if before & mask != 0 {
                let dup = at + u64::from((before & mask).trailing_zeros()) - bit;
                return Err(StageError::Internal(format!(
                    "disk {}: chunk {dup} reached the writer twice",
                    self.disk.name()
                )));
            }
            at += n;
        }
        self.chunks_seen.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Default)]
struct SessionState {
    session: Option<Arc<BackupSession>>,
    vm: String,
    disks: HashMap<String, Arc<DiskState>>,
}

#[derive(Default)]
pub struct RepoWriter {
    state: Mutex<SessionState>,
}

impl RepoWriter {
    pub fn new(_options: RepoWriterOptions) -> Result<Self, InvalidOption> {
        Ok(RepoWriter::default())
    }

    /// The session and the disk's slot, opening the session on the first chunk of the run.
    fn disk_state(
        &self,
        ctx: &RunContext,
        disk: &Arc<Disk>,
    ) -> Result<(Arc<BackupSession>, Arc<DiskState>), StageError> {
        let mut state = self.state.lock().unwrap();
        if state.session.is_none() {
            let repo = ctx.repository()?;
            state.session = Some(Arc::new(repo.begin_backup(&disk.source.vm)?));
            state.vm = disk.source.vm.clone();
        }
        let session = state.session.clone().unwrap();
        if disk.source.vm != state.vm {
            return Err(StageError::Config(format!(
                "one run backs up one machine: disk {} belongs to {}, not {}",
                disk.name(),
                disk.source.vm,
                state.vm
            )));
        }
        if let Some(existing) = state.disks.get(disk.name()) {
            if !Arc::ptr_eq(&existing.disk, disk) {
                return Err(StageError::Config(format!(
                    "two disks of {} are both named {}",
                    state.vm,
                    disk.name()
                )));
            }
            return Ok((session, existing.clone()));
        }
        let slot = session.add_disk(DiskMeta {
            name: disk.name().to_owned(),
            size: disk.size(),
            chunk_size: disk.chunk_size,
            location: disk.source.location.display().to_string(),
            cbt: disk.source.tracking.as_ref().map(|t| t.next_state()),
        })?;
        let entry = Arc::new(DiskState {
            slot,
            disk: disk.clone(),
            arrived: (0..disk.chunk_count().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks_seen: AtomicU64::new(0),
        });
        state.disks.insert(disk.name().to_owned(), entry.clone());
        Ok((session, entry))
    }

    fn store(
        &self,
        worker: &Worker<'_>,
        session: &BackupSession,
        packs: &mut backflow_repository::PackWriter,
        disk: &DiskState,
        chunk: Chunk,
    ) -> Result<(), StageError> {
        let digest = || {
            chunk.digest.ok_or_else(|| {
                StageError::Internal(format!(
                    "chunk {} of disk {} reached the writer without a digest",
                    chunk.index,
                    chunk.disk.name()
                ))
            })
        };
        let count = match &chunk.payload {
            Payload::Encoded {
                codec,
                data,
                raw_len,
            } => {
                let digest = digest()?;
                packs.add(digest, *codec, *raw_len, data)?;
                worker
                    .ctx()
                    .repo_bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                worker.count_out(data.len() as u64);
                session.set_chunk(disk.slot, chunk.index, ChunkRef::Data(digest))?;
                1
            }
            Payload::Known => {
                session.set_chunk(disk.slot, chunk.index, ChunkRef::Data(digest()?))?;
                1
            }
            // Tables start out all zero.
            Payload::Zero { count } => *count,
            Payload::Unchanged { count } => {
                let parent = chunk.disk.parent.as_ref().ok_or_else(|| {
                    StageError::Internal(format!(
                        "disk {}: unchanged chunks without a parent snapshot",
                        chunk.disk.name()
                    ))
                })?;
                // In batches: one read of the parent's table and one write of ours per batch.
                let mut refs = vec![ChunkRef::Zero; (*count).min(UNCHANGED_BATCH) as usize];
                let mut at = chunk.index;
                while at < chunk.index + count {
                    let n = (chunk.index + count - at).min(UNCHANGED_BATCH) as usize;
                    parent.get_range(at, &mut refs[..n]).map_err(|e| {
                        StageError::io(format!("reading the parent of {}", chunk.disk.name()), e)
                    })?;
                    session.set_chunks(disk.slot, at, &refs[..n])?;
                    at += n as u64;
                }
                *count
            }
            Payload::Raw(_) => {
                return Err(StageError::Internal(format!(
                    "chunk {} of disk {} reached the writer uncompressed",
                    chunk.index,
                    chunk.disk.name()
                )));
            }
        };
        disk.mark(chunk.index, count)
    }
}

/// Test hook: with `BACKFLOW_PAUSE_BEFORE_COMMIT=PATH` in the environment, the writer creates
/// `PATH` once every chunk is stored and waits (at most ten minutes) until `PATH` is removed before
/// committing. Crash tests use it to kill a backup at the one moment when everything was read and
/// nothing committed.
pub use backflow_pipeline::hooks::PAUSE_BEFORE_COMMIT;

impl Stage for RepoWriter {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::CompressedChunk),
            output: None,
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let mut packs = None;
        while let Some(message) = worker.recv() {
            let Message::Chunk(chunk) = message else {
                return Err(unexpected(KIND, &message));
            };
            let (session, disk) = self.disk_state(worker.ctx(), &chunk.disk)?;
            let writer = packs.get_or_insert_with(|| session.pack_writer());
            self.store(worker, &session, writer, &disk, chunk)?;
        }
        if let Some(packs) = packs
            && !worker.is_cancelled()
        {
            packs.finish()?;
        }
        Ok(())
    }

    fn finish(&self, ctx: &RunContext) -> Result<(), StageError> {
        let mut state = self.state.lock().unwrap();
        let Some(session) = state.session.take() else {
            return Err(StageError::Config(
                "nothing reached the repository writer: no disk to back up".into(),
            ));
        };
        for disk in state.disks.values() {
            let seen = disk.chunks_seen.load(Ordering::Relaxed);
            let expected = disk.disk.chunk_count();
            if seen != expected {
                return Err(StageError::Internal(format!(
                    "disk {}: {seen} of {expected} chunks reached the writer; not committing",
                    disk.disk.name()
                )));
            }
        }
        // Every disk of a machine carries the same definition; the first one found is stored.
        let definition = state
            .disks
            .values()
            .find_map(|d| d.disk.source.definition.as_deref().map(str::to_owned));
        let tracked: Vec<_> = state
            .disks
            .values()
            .filter_map(|d| d.disk.source.tracking.clone())
            .collect();
        // For the summary: what was backed up, in the user's terms.
        let mut disks: Vec<_> = state.disks.values().map(|d| &d.disk).collect();
        disks.sort_by(|a, b| a.name().cmp(b.name()));
        let disks: Vec<_> = disks
            .into_iter()
            .map(|d| {
                let location = d.source.location.display().to_string();
                serde_json::json!({ "name": d.name(), "size": d.size(), "location": location })
            })
            .collect();
        state.disks.clear();
        backflow_pipeline::hooks::pause_at(PAUSE_BEFORE_COMMIT, "before commit");
        let session = Arc::try_unwrap(session).map_err(|_| {
            StageError::Internal("the backup session is still in use at commit".into())
        })?;
        let info = session.commit(definition)?;
        tracing::info!(snapshot = %info.id, vm = %info.vm, "Snapshot committed.");
        for tracking in tracked {
            tracking.committed(&info.id);
        }
        ctx.set_result("snapshot", serde_json::Value::String(info.id.clone()));
        ctx.set_result("vm", serde_json::Value::String(info.vm.clone()));
        ctx.set_result("disks", serde_json::Value::Array(disks));
        Ok(())
    }
}
