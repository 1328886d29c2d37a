//! Backup sessions: everything one backup writes, and its commit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::config::check_chunk_size;
use crate::error::{IoContext, RepoError, Result};
use crate::ids::{random_suffix, snapshot_id};
use crate::index::IndexBuilder;
use crate::pack::PackEntry;
use crate::snapshot::{
    DiskMeta, ENTRY_SIZE, Snapshot, SnapshotInfo, SnapshotMeta, TABLE_BUFFER, encode_ref,
    snapshot_key, write_manifest,
};
use crate::store::{Lease, PutMode, Store, is_exists};
use crate::{ChunkRef, PackId, Repository};

mod pack_writer;
pub use pack_writer::PackWriter;

/// State shared by a session and its pack writers.
#[derive(Debug)]
pub(crate) struct SessionShared {
    pub id: String,
    pub store: Arc<dyn Store>,
    pub scratch: PathBuf,
    pub pack_target_size: u64,
    index: Mutex<IndexBuilder>,
    live_writers: AtomicUsize,
    /// Why the session may not commit, once something went wrong that could leave the manifest pointing at
    /// chunks that were never stored.
    poisoned: Mutex<Option<String>>,
    /// Exclusive `flock` on the scratch directory: marks the session as alive for `remove_stale_scratch`.
    _scratch_lock: File,
    /// The repository lock, shared: keeps a garbage collection (exclusive) out while the session runs.
    _repo_lock: Arc<dyn Lease>,
}

impl SessionShared {
    pub(crate) fn writer_opened(&self) {
        self.live_writers.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn writer_closed(&self) {
        self.live_writers.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn poison(&self, reason: String) {
        warn!(session = %self.id, %reason, "Backup session can no longer commit.");
        let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        p.get_or_insert(reason);
    }

    /// The shared state of a session writing packs into `scratch`, with an index builder that spills beyond
    /// `spill_at` records. The locks are the caller's: for a gc, a clone of its scratch descriptor (which
    /// shares its `flock`) and its repository lock.
    pub(crate) fn new(
        id: String,
        repo: &Repository,
        scratch: PathBuf,
        spill_at: usize,
        scratch_lock: File,
        repo_lock: Arc<dyn Lease>,
    ) -> Arc<SessionShared> {
        Arc::new(SessionShared {
            id,
            store: repo.store().clone(),
            index: Mutex::new(IndexBuilder::with_spill(scratch.clone(), spill_at)),
            scratch,
            pack_target_size: repo.config().pack_target_size,
            live_writers: AtomicUsize::new(0),
            poisoned: Mutex::new(None),
            _scratch_lock: scratch_lock,
            _repo_lock: repo_lock,
        })
    }

    /// Takes the index entries collected so far, once every pack writer is finished and nothing failed.
    pub(crate) fn take_index(&self) -> Result<IndexBuilder> {
        let failed = |reason: String| RepoError::SessionFailed {
            session: self.id.clone(),
            reason,
        };
        if let Some(reason) = self
            .poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(failed(reason));
        }
        let live = self.live_writers.load(Ordering::SeqCst);
        if live > 0 {
            return Err(failed(format!(
                "{live} pack writers are still open; finish them first"
            )));
        }
        Ok(std::mem::replace(
            &mut *self.index.lock().unwrap_or_else(|e| e.into_inner()),
            IndexBuilder::new(self.scratch.clone()),
        ))
    }

    /// Records a durable pack's entries for the session's index file.
    pub(crate) fn add_pack(&self, id: PackId, entries: &[PackEntry]) -> Result<()> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .add_pack(id, entries)
            .inspect_err(|e| self.poison(format!("cannot record pack {id}: {e}")))
    }
}

struct DiskSlot {
    meta: DiskMeta,
    path: PathBuf,
    file: File,
}

/// Where a simulated crash stops a commit (tests only; production passes `None`).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// Packs are durable; no index file, no manifest.
    BeforeIndex,
    /// The index file is in place; no manifest.
    AfterIndex,
    /// The manifest is complete and fsynced under its temporary name, not yet renamed.
    BeforeManifestRename,
}

/// One backup in progress. `Send + Sync`: writer threads call [`BackupSession::set_chunk`] and own a
/// [`PackWriter`] each.
///
/// Nothing the session writes is visible to readers before [`BackupSession::commit`] renames the manifest into
/// `snapshots/`. Dropping the session without committing removes its scratch directory (chunk tables,
/// unfinished packs); packs it already moved to `packs/` stay as unreferenced data that a garbage collection
/// removes later (and that no index names, so nothing reads them).
pub struct BackupSession {
    shared: Arc<SessionShared>,
    /// The handle the session began on: its registration in `users/` must still be held at the commit point.
    repo: Repository,
    vm: String,
    time: i64,
    time_nanos: u32,
    hostname: String,
    disks: RwLock<Vec<DiskSlot>>,
    leave_scratch: AtomicBool,
    /// The snapshot id a copy keeps ([`BackupSession::keep_identity`]); `None`: the session's own id.
    kept_id: Option<String>,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("id", &self.shared.id)
            .field("vm", &self.vm)
            .finish()
    }
}

pub(crate) fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl BackupSession {
    pub(crate) fn begin(repo: &Repository, vm: &str) -> Result<BackupSession> {
        crate::names::check_identity(vm).map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
        let repo_lock = crate::lock::lock_repository(
            &**repo.store(),
            crate::lock::LockMode::Shared,
            "a garbage collection or index rebuild holds it exclusively",
        )?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let time = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let (scratch, scratch_lock) = crate::scratch::create(repo.store().scratch_root(), || {
            snapshot_id(time, random_suffix())
        })?;
        let id = scratch
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        info!(session = %id, vm, "Backup session started.");
        let shared = SessionShared::new(
            id,
            repo,
            scratch,
            crate::index::INDEX_SPILL_RECORDS,
            scratch_lock,
            Arc::from(repo_lock),
        );
        Ok(BackupSession {
            shared,
            repo: repo.clone(),
            vm: vm.to_owned(),
            time,
            time_nanos: now.subsec_nanos(),
            hostname: hostname(),
            disks: RwLock::new(Vec::new()),
            leave_scratch: AtomicBool::new(false),
            kept_id: None,
        })
    }

    /// Makes the commit keep the identity of a restore point copied from another repository: its id, time
    /// and host (`crate::copy`). The id is never exchanged for a fresh one: a commit that finds it taken
    /// fails, so one restore point never exists under two ids in one repository.
    pub(crate) fn keep_identity(&mut self, id: &str, time: i64, time_nanos: u32, hostname: &str) {
        self.kept_id = Some(id.to_owned());
        self.time = time;
        self.time_nanos = time_nanos;
        self.hostname = hostname.to_owned();
    }

    /// The session's id, which is also the snapshot id at commit (unless that name was taken meanwhile).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Adds a disk whose chunk table starts all [`ChunkRef::Zero`]: a chunk never set restores as zeros. The
    /// table lives in a sparse scratch file, so a 2 TiB disk costs no memory and little space until written.
    pub fn add_disk(&self, meta: DiskMeta) -> Result<usize> {
        check_chunk_size(meta.chunk_size)?;
        crate::names::check_disk_name(&meta.name)
            .map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
        let mut disks = self.disks.write().unwrap_or_else(|e| e.into_inner());
        if disks.iter().any(|d| d.meta.name == meta.name) {
            return Err(RepoError::InvalidArgument(format!(
                "disk {:?} was added twice",
                meta.name
            )));
        }
        let table_len = meta
            .chunk_count()
            .checked_mul(ENTRY_SIZE as u64)
            .ok_or_else(|| {
                RepoError::InvalidArgument(format!("disk {:?} is impossibly large", meta.name))
            })?;
        let path = self
            .shared
            .scratch
            .join(format!("disk-{}.table", disks.len()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create chunk table", &path)?;
        file.set_len(table_len).ctx("size chunk table", &path)?;
        disks.push(DiskSlot { meta, path, file });
        Ok(disks.len() - 1)
    }

    fn with_disk<T>(&self, disk: usize, f: impl FnOnce(&DiskSlot) -> Result<T>) -> Result<T> {
        let disks = self.disks.read().unwrap_or_else(|e| e.into_inner());
        let slot = disks.get(disk).ok_or_else(|| {
            RepoError::InvalidArgument(format!("session {} has no disk #{disk}", self.shared.id))
        })?;
        f(slot)
    }

    fn check_range(slot: &DiskSlot, first: u64, count: u64) -> Result<()> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > slot.meta.chunk_count())
        {
            return Err(RepoError::InvalidArgument(format!(
                "chunks {first}..+{count} are outside disk {:?} ({} chunks)",
                slot.meta.name,
                slot.meta.chunk_count()
            )));
        }
        Ok(())
    }

    fn write_table(&self, slot: &DiskSlot, first: u64, bytes: &[u8]) -> Result<()> {
        slot.file
            .write_all_at(bytes, first * ENTRY_SIZE as u64)
            .ctx("write chunk table", &slot.path)
            .inspect_err(|e| {
                self.shared
                    .poison(format!("a chunk table write failed: {e}"))
            })
    }

    /// Records what chunk `index` of a disk is. Chunks may be set in any order and from any thread.
    pub fn set_chunk(&self, disk: usize, index: u64, r: ChunkRef) -> Result<()> {
        check_ref(&r)?;
        self.with_disk(disk, |slot| {
            Self::check_range(slot, index, 1)?;
            self.write_table(slot, index, &encode_ref(&r))
        })
    }

    /// Records consecutive chunks `first..first + refs.len()` with one write.
    pub fn set_chunks(&self, disk: usize, first: u64, refs: &[ChunkRef]) -> Result<()> {
        let mut bytes = Vec::with_capacity(refs.len() * ENTRY_SIZE);
        for r in refs {
            check_ref(r)?;
            bytes.extend_from_slice(&encode_ref(r));
        }
        self.with_disk(disk, |slot| {
            Self::check_range(slot, first, refs.len() as u64)?;
            self.write_table(slot, first, &bytes)
        })
    }

    /// Copies entries `first..first + count` of a parent snapshot's disk to the same positions of this session's
    /// disk: the unchanged part of an incremental, without a lookup per chunk. The parent's chunks are
    /// committed, so referencing them is always valid.
    pub fn copy_chunks(
        &self,
        disk: usize,
        parent: &Snapshot,
        parent_disk: usize,
        first: u64,
        count: u64,
    ) -> Result<()> {
        let parent_chunk_size = parent.meta().disks.get(parent_disk).map(|d| d.chunk_size);
        self.with_disk(disk, |slot| {
            if parent_chunk_size != Some(slot.meta.chunk_size) {
                return Err(RepoError::InvalidArgument(format!(
                    "disk {:?} of snapshot {} does not have the chunk size of disk {:?}",
                    parent_disk,
                    parent.id(),
                    slot.meta.name
                )));
            }
            Self::check_range(slot, first, count)?;
            let mut buf = Vec::with_capacity(TABLE_BUFFER);
            let mut at = first;
            for r in parent.chunk_range(parent_disk, first, count)? {
                buf.extend_from_slice(&encode_ref(&r?));
                if buf.len() == TABLE_BUFFER {
                    self.write_table(slot, at, &buf)?;
                    at += (buf.len() / ENTRY_SIZE) as u64;
                    buf.clear();
                }
            }
            self.write_table(slot, at, &buf)
        })
    }

    /// Stores the changed-block-tracking state a later incremental of this disk will start from.
    pub fn set_cbt(&self, disk: usize, cbt: serde_json::Value) -> Result<()> {
        let mut disks = self.disks.write().unwrap_or_else(|e| e.into_inner());
        let slot = disks.get_mut(disk).ok_or_else(|| {
            RepoError::InvalidArgument(format!("session {} has no disk #{disk}", self.shared.id))
        })?;
        slot.meta.cbt = Some(cbt);
        Ok(())
    }

    /// A writer for one thread. Every writer must be [`PackWriter::finish`]ed before `commit`.
    pub fn pack_writer(&self) -> PackWriter {
        PackWriter::new(self.shared.clone())
    }

    /// Makes the backup a snapshot: writes the index file of the session's packs, then the manifest, each to a
    /// temporary name, fsynced, renamed, directory fsynced. The manifest is last, so a crash at any point
    /// leaves either no snapshot or a complete one whose chunks are all durable.
    pub fn commit(self, domain_xml: Option<String>) -> Result<SnapshotInfo> {
        self.commit_inner(domain_xml, None)
    }

    #[cfg(test)]
    pub(crate) fn commit_crashing(self, at: CrashPoint) -> Result<SnapshotInfo> {
        self.commit_inner(None, Some(at))
    }

    /// Simulates `kill -9` of a session that is not committing: scratch stays, locks go.
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.leave_scratch.store(true, Ordering::SeqCst);
    }

    /// Simulates `kill -9` at `now` if asked: returns an error and leaves the scratch directory behind; the
    /// locks go away with the file handles, as they would with the process.
    fn crash_here(&self, now: CrashPoint, at: Option<CrashPoint>) -> Result<()> {
        if at == Some(now) {
            self.leave_scratch.store(true, Ordering::SeqCst);
            return Err(RepoError::SessionFailed {
                session: self.shared.id.clone(),
                reason: format!("simulated crash {now:?}"),
            });
        }
        Ok(())
    }

    fn commit_inner(
        self,
        domain_xml: Option<String>,
        crash: Option<CrashPoint>,
    ) -> Result<SnapshotInfo> {
        let failed = |reason: String| RepoError::SessionFailed {
            session: self.shared.id.clone(),
            reason,
        };
        let builder = self.shared.take_index()?;
        self.crash_here(CrashPoint::BeforeIndex, crash)?;

        let store = &*self.shared.store;
        if !builder.is_empty() {
            let packs = builder.pack_count();
            let tmp = self.shared.scratch.join("index.tmp");
            let records = builder.write(&tmp)?;
            let key = format!("index/{}.idx", self.shared.id);
            store.publish(&tmp, &key, PutMode::Create)?;
            info!(session = %self.shared.id, packs, records, "Index file written.");
        }
        self.crash_here(CrashPoint::AfterIndex, crash)?;

        let disks = self.disks.read().unwrap_or_else(|e| e.into_inner());
        let mut meta = SnapshotMeta {
            id: self
                .kept_id
                .clone()
                .unwrap_or_else(|| self.shared.id.clone()),
            vm: self.vm.clone(),
            time: self.time,
            time_nanos: self.time_nanos,
            hostname: self.hostname.clone(),
            domain_xml,
            disks: disks.iter().map(|d| d.meta.clone()).collect(),
        };
        let tables: Vec<(&File, &Path)> =
            disks.iter().map(|d| (&d.file, d.path.as_path())).collect();
        let tmp = self.shared.scratch.join("manifest.tmp");
        let mut placed = false;
        for _ in 0..16 {
            let key = snapshot_key(&meta.id);
            let taken = |id: &str| failed(format!("snapshot {id} already exists"));
            if store.exists(&key)? {
                if self.kept_id.is_some() {
                    return Err(taken(&meta.id));
                }
                meta.id = snapshot_id(self.time, random_suffix());
                continue;
            }
            write_manifest(&tmp, &meta, &tables)?;
            self.crash_here(CrashPoint::BeforeManifestRename, crash)?;
            // A gc counts on every live handle being registered; a handle whose registration lapsed (an S3
            // lease not renewed in time) may have been given up by a gc that then deleted chunks this
            // manifest references.
            if !self.repo.registration_held() {
                let _ = std::fs::remove_file(&tmp);
                return Err(failed(
                    "this process's registration in users/ lapsed (its lease was not renewed in time), so a \
                     garbage collection may have removed chunks the snapshot uses; nothing was committed"
                        .into(),
                ));
            }
            // Create never replaces an existing name: two sessions can never overwrite each other's snapshot,
            // even if their ids collided.
            match store.publish(&tmp, &key, PutMode::Create) {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {
                    if self.kept_id.is_some() {
                        return Err(taken(&meta.id));
                    }
                    meta.id = snapshot_id(self.time, random_suffix());
                    continue;
                }
                Err(e) => return Err(e),
            }
            placed = true;
            break;
        }
        if !placed {
            return Err(failed("found no free snapshot name in 16 attempts".into()));
        }
        let info = SnapshotInfo::from_meta(&meta);
        info!(snapshot = %info.id, vm = %info.vm, disks = info.disks.len(), "Snapshot committed.");
        drop(disks);
        drop(self);
        Ok(info)
    }
}

fn check_ref(r: &ChunkRef) -> Result<()> {
    if let ChunkRef::Data(d) = r
        && d.0 == [0; 32]
    {
        return Err(RepoError::InvalidArgument(
            "the all-zero digest is reserved for zero chunks (BLAKE3 never produces it in practice)".into(),
        ));
    }
    Ok(())
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        if !self.leave_scratch.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.shared.scratch);
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<BackupSession>();
    is::<PackWriter>();
    is::<Snapshot>();
    is::<Repository>();
}
