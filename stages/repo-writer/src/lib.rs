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

use backflow_pipeline::{
    Chunk, Disk, InvalidOption, Message, MessageType, Payload, RunContext, Stage, StageError,
    StageIo, Work, Worker, stage::unexpected,
};
use backflow_repository::{BackupSession, ChunkRef, DiskMeta};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "repo-writer";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepoWriterOptions {}

pub const OPTION_DOCS: &[(&str, &str)] = &[];

/// One disk being written: its slot in the session and how many chunks arrived.
struct DiskState {
    slot: usize,
    disk: Arc<Disk>,
    chunks_seen: AtomicU64,
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
            cbt: None,
        })?;
        let entry = Arc::new(DiskState {
            slot,
            disk: disk.clone(),
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
                for index in chunk.index..chunk.index + count {
                    let r = parent.get(index).map_err(|e| {
                        StageError::io(format!("reading the parent of {}", chunk.disk.name()), e)
                    })?;
                    if r != ChunkRef::Zero {
                        session.set_chunk(disk.slot, index, r)?;
                    }
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
        disk.chunks_seen.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }
}

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
        state.disks.clear();
        let session = Arc::try_unwrap(session).map_err(|_| {
            StageError::Internal("the backup session is still in use at commit".into())
        })?;
        let info = session.commit(None)?;
        tracing::info!(snapshot = %info.id, vm = %info.vm, "Snapshot committed.");
        ctx.set_result("snapshot", serde_json::Value::String(info.id.clone()));
        Ok(())
    }
}
