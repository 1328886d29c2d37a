//! [`Repository`]: the handle through which everything is read and written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::config::{InitOptions, RepositoryConfig};
use crate::error::{RepoError, Result, read_exact_at};
use crate::index::{IndexBuilder, IndexFile};
use crate::lock::{LockMode, lock_repository};
use crate::pack::{PackHandle, check_blob_bounds, pack_key, read_stored_pack_trailer};
use crate::session::BackupSession;
use crate::snapshot::{Snapshot, SnapshotInfo, read_meta, snapshot_key};
use crate::store::{Lease, Location, PutMode, Store, open_store};
use crate::{ChunkLocation, Digest, PackId, StoredChunk, Usage};

/// Open pack files kept for `read_chunk`: restore reads packs in roughly the order they were written, and a
/// handful of writer threads interleave their packs, so a small cache hits almost always while bounding the
/// file descriptors a reader holds.
const PACK_CACHE_SIZE: usize = 16;

/// Packs whose presence a handle remembers (about 40 bytes each) before it starts over.
const PACK_EXISTS_CACHE: usize = 64 * 1024;

/// A directory whose modification time is this close to the moment it was listed may change again without
/// its time changing (file systems with coarse timestamps), so it is listed again on the next lookup miss.
const RACY_MTIME_WINDOW: Duration = Duration::from_secs(2);

/// On a store that cannot say whether `index/` changed ([`Store::change_hint`] is `None`: object storage), a
/// lookup that misses lists it again at most this often: a miss is a chunk the backup then stores, so one
/// listing a second bounds the cost while a long backup still dedups against sessions committed meanwhile.
const INDEX_RELIST_INTERVAL: Duration = Duration::from_secs(1);

/// Where index files are.
const INDEX_PREFIX: &str = "index/";

/// The index files known to a repository handle.
#[derive(Debug, Default)]
struct IndexSet {
    files: Vec<Arc<IndexFile>>,
    /// Names already opened or found damaged, so a listing only opens new files.
    known: HashSet<String>,
    /// Index files that could not be opened, with why; lookups skip them, `verify` reports them.
    damaged: Vec<(PathBuf, String)>,
    listed_mtime: Option<SystemTime>,
    listed_at: Option<SystemTime>,
    /// Bumped when the set is replaced rather than extended (after `rebuild_index`).
    generation: u64,
}

impl IndexSet {
    /// Whether another process may have added an index file since the last listing.
    fn may_be_stale(&self, store: &dyn Store) -> bool {
        let Some(at) = self.listed_at else {
            return true;
        };
        let Some(mtime) = self.listed_mtime else {
            return at.elapsed().map_or(true, |d| d >= INDEX_RELIST_INTERVAL);
        };
        let now = store.change_hint(INDEX_PREFIX);
        now != Some(mtime)
            || at
                .duration_since(mtime)
                .map_or(true, |d| d < RACY_MTIME_WINDOW)
    }

    /// Opens index files not seen before; returns whether any were added.
    fn rescan(&mut self, store: &dyn Store) -> Result<bool> {
        let mtime = store.change_hint(INDEX_PREFIX);
        let at = SystemTime::now();
        let mut added = false;
        for name in store.list_names(INDEX_PREFIX)? {
            if !name.ends_with(".idx") || self.known.contains(&name) {
                continue;
            }
            let key = format!("{INDEX_PREFIX}{name}");
            match IndexFile::open(store, &key) {
                Ok(f) => {
                    self.files.push(Arc::new(f));
                    added = true;
                }
                // Removed between listing and opening (an index rebuild in another process).
                Err(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                // A damaged index costs dedup and makes its chunks unfindable; it must not make the whole
                // repository unusable. `verify` names it, `rebuild_index` replaces it.
                Err(e) => {
                    let path = store.display_key(&key);
                    warn!(file = %path.display(), error = %e, "Skipping a damaged index file.");
                    self.damaged.push((path, e.to_string()));
                }
            }
            self.known.insert(name);
        }
        self.listed_mtime = mtime;
        self.listed_at = Some(at);
        Ok(added)
    }

    /// The first copy of `digest` in the files from `start` on that `accept` takes: files in the order they
    /// were listed, copies in file order.
    fn find_from(
        &self,
        start: usize,
        digest: &Digest,
        accept: &mut dyn FnMut(&ChunkLocation) -> bool,
    ) -> Result<Option<ChunkLocation>> {
        for f in self.files.iter().skip(start) {
            if let Some(loc) = f.lookup_where(digest, &mut *accept)? {
                return Ok(Some(loc));
            }
        }
        Ok(None)
    }

    /// Stops using the file at `path` for lookups (its checksum failed): its chunks are then found through
    /// the pack trailers (see [`crate::recovery`]).
    fn distrust(&mut self, path: &Path, why: String) {
        let before = self.files.len();
        self.files.retain(|f| f.path != path);
        if self.files.len() < before {
            warn!(file = %path.display(), error = %why,
                  "Index file damaged; its chunks are found from pack trailers.");
            self.damaged.push((path.to_owned(), why));
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// The directory of a local repository; for object storage, its location as text (for messages).
    path: PathBuf,
    store: Arc<dyn Store>,
    config: RepositoryConfig,
    indexes: RwLock<IndexSet>,
    /// Most recently used last.
    packs: Mutex<Vec<(PackId, Arc<PackHandle>)>>,
    /// The same for [`Repository::read_span`], opened without reading the frame.
    span_packs: Mutex<Vec<(PackId, Arc<PackHandle>)>>,
    /// Damaged copies that lookups skip (see `damaged.rs`).
    damaged: crate::damaged::MarksCache,
    /// This handle's entry in `users/`: a gc deletes nothing this handle could have seen until it closes.
    user: Option<Box<dyn Lease>>,
    /// The recovery index (`recovery.rs`), built on the first restore lookup the index cannot serve.
    recovery: Mutex<Option<Arc<crate::recovery::Recovery>>>,
    /// Packs a lookup found there or missing ([`Repository::lookup`]).
    pack_exists: RwLock<std::collections::HashMap<PackId, bool>>,
    /// Chunk ids: keyed in an encrypted repository (see `crypto.rs`).
    hasher: crate::crypto::ChunkHasher,
    /// In an encrypted repository: the key file that opened it and the master key (`keys.rs`).
    key_id: Option<String>,
    master: Option<Arc<crate::crypto::MasterKey>>,
}

/// A repository in a [`Store`]: a local (or POSIX cluster) directory or object storage. Cheap to clone: clones share open files and caches.
#[derive(Clone, Debug)]
pub struct Repository {
    inner: Arc<Inner>,
}

/// Outcome of [`Repository::rebuild_index`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    /// Packs whose trailer could not be read, with why; their chunks are not in the new index.
    pub damaged_packs: Vec<(String, String)>,
}

impl Repository {
    /// Creates a repository with the default pack size. `path` may exist if it is an empty directory.
    pub fn init(path: &Path, chunk_size: u32) -> Result<Repository> {
        Repository::init_with(
            path,
            &InitOptions {
                chunk_size,
                ..InitOptions::default()
            },
        )
    }

    pub fn init_with(path: &Path, options: &InitOptions) -> Result<Repository> {
        Repository::init_at(&Location::Local(path.to_owned()), options)
    }

    /// Opens the local repository in the directory `path`.
    pub fn open(path: &Path) -> Result<Repository> {
        Repository::open_at(&Location::Local(path.to_owned()))
    }

    /// The directory of a local repository. For object storage, the location as text (`s3://BUCKET/PREFIX`),
    /// which is only good for messages: use [`Repository::location`] and [`Repository::store`].
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Opens the repository at a location (a local path or `s3://BUCKET/PREFIX`).
    pub fn open_at(location: &Location) -> Result<Repository> {
        Repository::open_store(open_store(location)?)
    }

    /// Opens the repository in `store`.
    pub fn open_store(store: Arc<dyn Store>) -> Result<Repository> {
        let config = RepositoryConfig::load(&*store)?;
        // An encrypted repository: unlocked with the process's passphrase, everything below through the seal.
        let opened = crate::keys::open_encrypted(store, &config)?;
        let store = opened.store;
        store.check_layout()?;
        let user = match store.register("users/") {
            Ok(lease) => Some(lease),
            // A local repository on a read-only mount: such a handle only reads, and a gc cannot run there
            // either. Object storage must register: a gc cannot see a handle that did not.
            Err(e) if store.is_local() => {
                tracing::debug!(error = %e, "Not registered in users/ (read-only repository).");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Repository {
            inner: Arc::new(Inner {
                path: store.display_key(""),
                store,
                config,
                indexes: RwLock::new(IndexSet::default()),
                packs: Mutex::new(Vec::with_capacity(PACK_CACHE_SIZE)),
                span_packs: Mutex::new(Vec::with_capacity(PACK_CACHE_SIZE)),
                damaged: Default::default(),
                user,
                recovery: Mutex::new(None),
                pack_exists: RwLock::new(std::collections::HashMap::new()),
                hasher: opened.hasher,
                key_id: opened.key_id,
                master: opened.master,
            }),
        })
    }

    /// Creates a repository at a location (a local path, which may exist if it is an empty directory, or
    /// `s3://BUCKET/PREFIX`, which must hold no objects).
    pub fn init_at(location: &Location, options: &InitOptions) -> Result<Repository> {
        Repository::init_store(location, options, false)
    }

    /// Creates an encrypted repository at a location, its first key under this process's passphrase
    /// ([`crate::keys::set_password_file`]).
    pub fn init_encrypted(location: &Location, options: &InitOptions) -> Result<Repository> {
        Repository::init_store(location, options, true)
    }

    fn init_store(
        location: &Location,
        options: &InitOptions,
        encrypted: bool,
    ) -> Result<Repository> {
        let mut config = RepositoryConfig::new(options)?;
        if encrypted {
            // Before anything is created: no passphrase leaves no half-made repository behind.
            crate::keys::passphrase_for(&location.to_string())?;
        }
        let store = open_store(location)?;
        let refuse = |reason: &str| RepoError::InitRefused {
            path: store.display_key(""),
            reason: reason.to_owned(),
        };
        let not_dir = |e: RepoError| match e {
            RepoError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotADirectory => {
                refuse("it is not a directory")
            }
            e => e,
        };
        if store.exists("config").map_err(not_dir)? {
            return Err(refuse("it is already a repository"));
        }
        let names = store.list_names("").map_err(not_dir)?;
        if !names.is_empty() || !store.list_dirs("").map_err(not_dir)?.is_empty() {
            return Err(refuse(if store.is_local() {
                "the directory is not empty"
            } else {
                "objects exist under the prefix"
            }));
        }
        store.prepare()?;
        if encrypted {
            crate::keys::init_encrypted(&*store, &mut config)?;
        }
        // `config` last: a location without it is not a repository, so an interrupted init can be redone.
        config.store(&*store)?;
        info!(repo = %location, chunk_size = config.chunk_size, "Repository created.");
        Repository::open_store(store)
    }

    /// The store, the key id this handle opened with and the master key, for key management.
    pub(crate) fn key_access(&self) -> Result<crate::keys::KeyAccess> {
        match &self.inner.master {
            Some(master) => Ok((
                self.inner.store.clone(),
                self.inner.key_id.clone(),
                master.clone(),
            )),
            None => Err(RepoError::InvalidArgument(format!(
                "{} is not encrypted: it has no keys",
                self.location()
            ))),
        }
    }

    /// Where the repository is, as an operator writes it.
    pub fn location(&self) -> &Location {
        self.inner.store.location()
    }

    /// The storage the repository lives in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Whether this handle's registration in `users/` is certainly still held (see [`Lease::is_held`]); a
    /// handle that could not register (a read-only local repository) has nothing to lose.
    pub(crate) fn registration_held(&self) -> bool {
        self.inner.user.as_ref().is_none_or(|u| u.is_held())
    }

    /// The content address of a chunk's plaintext in this repository: BLAKE3, keyed in an encrypted
    /// repository so that ids reveal nothing about contents. Every stage that computes a digest for this
    /// repository asks here.
    pub fn digest_of(&self, data: &[u8]) -> Digest {
        self.inner.hasher.digest(data)
    }

    /// The hasher behind [`Repository::digest_of`], for stages that hash on their own threads.
    pub fn chunk_hasher(&self) -> crate::crypto::ChunkHasher {
        self.inner.hasher.clone()
    }

    /// This handle's name in `users/`, if it could register.
    pub(crate) fn user_name(&self) -> Option<String> {
        self.inner.user.as_ref().map(|u| u.name().to_owned())
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.config.chunk_size
    }

    pub fn config(&self) -> &RepositoryConfig {
        &self.inner.config
    }

    pub(crate) fn marks_cache(&self) -> &crate::damaged::MarksCache {
        &self.inner.damaged
    }

    /// All snapshots, oldest first. Reads each manifest's header and metadata only. A manifest that cannot be
    /// read is left out with a warning rather than failing the listing (one damaged restore point must not
    /// hide the others); `verify` reports it.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let store = &*self.inner.store;
        let mut out = Vec::new();
        for name in store.list_names("snapshots/")? {
            let Some(id) = name.strip_suffix(".snap") else {
                continue;
            };
            if !crate::ids::valid_id(id) {
                continue;
            }
            let key = snapshot_key(id);
            let path = store.display_key(&key);
            let read = store
                .open(&key)
                .and_then(|f| read_meta(&*f, &path, Some(id)));
            match read {
                Ok((meta, _)) => out.push(SnapshotInfo::from_meta(&meta)),
                // Forgotten between listing and opening.
                Err(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "Skipping an unreadable snapshot.")
                }
            }
        }
        out.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(out)
    }

    /// Removes the snapshot `id`: unlinks its manifest and fsyncs `snapshots/`, so the removal survives a crash
    /// once this returns. Only the manifest goes; its chunks stay until a garbage collection, and no other
    /// snapshot depends on it (each is a logical full). Takes the repository lock shared, like a backup: it runs
    /// next to backups and is refused with a retryable [`RepoError::Locked`] while a gc or index rebuild runs.
    /// An unknown id (or `latest`, which names no file) is [`RepoError::SnapshotNotFound`]. A damaged manifest
    /// can be forgotten too: nothing here reads it.
    pub fn forget(&self, id: &str) -> Result<()> {
        let not_found = || RepoError::SnapshotNotFound {
            repo: self.inner.path.clone(),
            id: id.to_owned(),
        };
        if !crate::ids::valid_id(id) {
            return Err(not_found());
        }
        let store = &*self.inner.store;
        let _lock = lock_repository(
            store,
            LockMode::Shared,
            "a garbage collection or index rebuild holds it exclusively",
        )?;
        let _fence = crate::gc_state::fence(store, LockMode::Shared)?;
        if !store.exists(&snapshot_key(id))? {
            return Err(not_found());
        }
        crate::gc_state::remove_manifest(store, id)?;
        info!(snapshot = id, "Snapshot forgotten.");
        Ok(())
    }

    /// The id of every manifest in `snapshots/`: readable ones oldest first, then those that cannot be read
    /// (which [`Repository::list_snapshots`] leaves out), so that `verify` names a damaged one and
    /// `forget --snapshot` reaches it.
    pub fn manifest_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.list_snapshots()?.into_iter().map(|s| s.id).collect();
        let listed: HashSet<String> = ids.iter().cloned().collect();
        let mut rest = Vec::new();
        for name in self.inner.store.list_names("snapshots/")? {
            if let Some(id) = name.strip_suffix(".snap")
                && crate::ids::valid_id(id)
                && !listed.contains(id)
            {
                rest.push(id.to_owned());
            }
        }
        rest.sort();
        ids.extend(rest);
        Ok(ids)
    }

    /// Opens a snapshot by id, or by anything else [`Repository::resolve_snapshot`] resolves without a VM (a
    /// unique prefix, `latest` in a repository of one VM). Verifies the manifest's checksum.
    pub fn open_snapshot(&self, id: &str) -> Result<Snapshot> {
        let store = &*self.inner.store;
        if crate::ids::valid_id(id) {
            let key = snapshot_key(id);
            match Snapshot::open(store, &key, id) {
                Err(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                r => return r,
            }
        }
        let id = self.resolve_snapshot(id, None)?;
        Snapshot::open(store, &snapshot_key(&id), &id)
    }

    /// The newest snapshot of `vm` (by the time its backup began), the parent of the next incremental.
    pub fn latest_snapshot(&self, vm: &str) -> Result<Option<Snapshot>> {
        match self
            .list_snapshots()?
            .into_iter()
            .rev()
            .find(|s| s.vm == vm)
        {
            Some(info) => self.open_snapshot(&info.id).map(Some),
            None => Ok(None),
        }
    }

    /// `index/`, for messages.
    fn index_dir(&self) -> PathBuf {
        self.inner.store.display_key(INDEX_PREFIX)
    }

    /// Where a committed chunk is stored, if any committed index has it: the first copy that is not marked
    /// damaged (and whose pack is there), in index files in the order they were listed, copies in file
    /// order. This one rule ("the first healthy copy wins") serves deduplication, restores
    /// ([`Repository::locate`] extends it) and `verify`.
    ///
    /// Index files are listed on the first lookup, not at open. When a lookup misses and the `index/` directory
    /// changed since it was listed (another process committed a backup), the new files are opened and searched
    /// too, so a long-running process sees other sessions' chunks without reopening. A hit never lists.
    pub fn lookup(&self, digest: &Digest) -> Result<Option<ChunkLocation>> {
        // Read first, even for a miss: a marks file that cannot be read must not let a marked copy through. The
        // cost is a lock and a clock read; the file is checked once a second.
        let marks = self.damage_marks()?;
        self.find_indexed(digest, &mut |loc| {
            !marks.contains(digest, loc) && self.pack_exists(&loc.pack)
        })
    }

    /// Whether a pack file is there, remembered per handle: a lookup must not hand deduplication a copy in
    /// a pack that was lost (a gc deletes only packs whose chunks left the index, so a remembered "there"
    /// stays true for every copy a lookup can still find).
    fn pack_exists(&self, id: &PackId) -> bool {
        if let Some(there) = self
            .inner
            .pack_exists
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return *there;
        }
        let mut known = self
            .inner
            .pack_exists
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if known.len() >= PACK_EXISTS_CACHE {
            known.clear();
        }
        // An error (the store unreachable) counts as missing: dedup then stores the chunk again.
        let there = self.inner.store.exists(&pack_key(id)).unwrap_or(false);
        known.insert(*id, there);
        there
    }

    /// The first copy of `digest` in the index files that `accept` takes (see [`Repository::lookup`]).
    fn find_indexed(
        &self,
        digest: &Digest,
        accept: &mut dyn FnMut(&ChunkLocation) -> bool,
    ) -> Result<Option<ChunkLocation>> {
        let store = &*self.inner.store;
        let (seen, generation) = {
            let set = self.inner.indexes.read().unwrap_or_else(|e| e.into_inner());
            if let Some(loc) = set.find_from(0, digest, accept)? {
                return Ok(Some(loc));
            }
            if !set.may_be_stale(store) {
                return Ok(None);
            }
            (set.files.len(), set.generation)
        };
        {
            let mut set = self
                .inner
                .indexes
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if set.may_be_stale(store) {
                set.rescan(store)?;
            }
        }
        let set = self.inner.indexes.read().unwrap_or_else(|e| e.into_inner());
        let start = if set.generation == generation {
            seen
        } else {
            0
        };
        set.find_from(start, digest, accept)
    }

    /// The first copy of `digest` that `accept` takes, where restores look: the index files (as
    /// [`Repository::lookup`]); while a garbage collection cycle is pending, the chunks it condemned (a
    /// snapshot committed by a backup that ran during the gc may use them; the end of the cycle stores them
    /// again); and when neither has one, the pack trailers of packs that no intact index file names
    /// ([`crate::recovery`]: a damaged or lost index file must not make restores fail). Never for
    /// deduplication: a backup must not newly rely on a condemned chunk or on an unindexed pack, which a gc
    /// may be about to delete.
    pub(crate) fn find_copy(
        &self,
        digest: &Digest,
        accept: &mut dyn FnMut(&ChunkLocation) -> bool,
    ) -> Result<Option<ChunkLocation>> {
        if let Some(loc) = self.find_indexed(digest, accept)? {
            return Ok(Some(loc));
        }
        if let Some(loc) = crate::gc_state::find_condemned(&*self.inner.store, digest)?
            && accept(&loc)
        {
            return Ok(Some(loc));
        }
        self.recovery()?.find(digest, accept)
    }

    /// Where to read a chunk from, for restores and `verify`: the first copy not marked damaged, in the order
    /// of the crate root's "Reading after damage". Not for deduplication.
    pub fn locate(&self, digest: &Digest) -> Result<Option<ChunkLocation>> {
        let marks = self.damage_marks()?;
        self.find_copy(digest, &mut |loc| !marks.contains(digest, loc))
    }

    /// [`Repository::read_chunk`] of the chunk `digest`, found with [`Repository::locate`]. A pack that a
    /// garbage collection removed after the lookup (it moved the chunk) makes it list the index afresh and
    /// try once more. `None`: no copy is known. The bytes are not verified here: a reader that finds them
    /// damaged asks [`Repository::load_chunk`], which tries every copy.
    pub fn read_digest(&self, digest: &Digest) -> Result<Option<(ChunkLocation, StoredChunk)>> {
        let Some(loc) = self.locate(digest)? else {
            return Ok(None);
        };
        match self.read_chunk(&loc) {
            Ok(stored) => Ok(Some((loc, stored))),
            Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                self.reload_index()?;
                let Some(loc) = self.locate(digest)? else {
                    return Ok(None);
                };
                Ok(Some((loc, self.read_chunk(&loc)?)))
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets every open index file and lists `index/` again: index files a gc replaced are dropped, and the
    /// recovery index is built again when next needed.
    pub fn reload_index(&self) -> Result<()> {
        // The recovery slot is never locked while the index set is: building a recovery index reads the set
        // with the slot held (lock order: slot, then set).
        *self
            .recovery_slot()
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let mut set = self
            .inner
            .indexes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let generation = set.generation + 1;
        *set = IndexSet {
            generation,
            ..IndexSet::default()
        };
        set.rescan(&*self.inner.store).map(|_| ())
    }

    pub(crate) fn recovery_slot(&self) -> &Mutex<Option<Arc<crate::recovery::Recovery>>> {
        &self.inner.recovery
    }

    /// The index files lookups use now (opened, not found damaged), in lookup order. Holding them keeps them
    /// readable even after a gc replaced them: `verify` reads one consistent set this way.
    pub(crate) fn index_files(&self) -> Vec<Arc<IndexFile>> {
        self.inner
            .indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .files
            .clone()
    }

    /// Checks every index file lookups use against its checksum (reading each whole); those that fail are no
    /// longer used, and are returned with why (with the ones already known damaged).
    pub(crate) fn check_index_checksums(&self) -> Result<Vec<(PathBuf, String)>> {
        for file in self.index_files() {
            match file.check_checksum() {
                Ok(()) => {}
                Err(e @ RepoError::Corrupt { .. }) => {
                    self.inner
                        .indexes
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .distrust(&file.path, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.damaged_index_files())
    }

    /// Lists `index/` now rather than at the next lookup miss.
    pub fn refresh(&self) -> Result<()> {
        let mut set = self
            .inner
            .indexes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        set.rescan(&*self.inner.store).map(|_| ())
    }

    /// Index files that could not be opened (path, why), as of the last listing.
    pub(crate) fn damaged_index_files(&self) -> Vec<(PathBuf, String)> {
        self.inner
            .indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .damaged
            .clone()
    }

    fn pack(&self, id: PackId) -> Result<Arc<PackHandle>> {
        cached_pack(&self.inner.packs, id, || {
            PackHandle::open(&*self.inner.store, id)
        })
    }

    /// Reads a stored blob, checked against the pack's data region; a short pack is an error, never short data.
    /// The bytes are not verified against the digest here: decode and hash them (the restore pipeline does),
    /// or use [`Repository::load_chunk`].
    pub fn read_chunk(&self, loc: &ChunkLocation) -> Result<StoredChunk> {
        let pack = self.pack(loc.pack)?;
        check_in_pack(loc, &pack)?;
        let mut data = vec![0u8; loc.stored_len as usize];
        read_exact_at(&pack.file, &mut data, loc.offset, &pack.path, "chunk")?;
        Ok(StoredChunk {
            codec: loc.codec,
            data,
            raw_len: loc.raw_len,
        })
    }

    /// Reads the stored blobs `locs`, all in one pack and sorted by offset, and hands each to `each` (its
    /// position in `locs` and its bytes) as soon as it has arrived, in order. On object storage with one
    /// read of the range from the first to the end of the last (the bytes between them included): one
    /// ranged GET instead of one per blob, which is what the store's cost follows, streamed, so that the
    /// first blobs are decoded while the rest arrive; on a local filesystem blob by blob. Each blob is
    /// checked against the pack's data region as [`Repository::read_chunk`] checks it, and is not verified
    /// against its digest here either. Returns the bytes read from the store (a span's gaps included;
    /// 0 when stopped). `each` returning false stops the read (`Ok`). An error may come
    /// after some blobs were handed over: a reader then reads the rest one by one (which knows about
    /// damage and moved packs); how many were handed over, it counted.
    pub fn read_span(
        &self,
        locs: &[ChunkLocation],
        mut each: impl FnMut(usize, bytes::Bytes) -> bool,
    ) -> Result<u64> {
        let (Some(first), Some(pack_id)) = (locs.first(), locs.first().map(|l| l.pack)) else {
            return Ok(0);
        };
        // Not framed: reading a pack's header and footer costs object storage two more requests (of a
        // read-ahead window each) per pack; blobs are then bounded by the object's length, which is safe
        // for the same reason as in a pack with a damaged frame (every blob is checked against its digest).
        let pack = cached_pack(&self.inner.span_packs, pack_id, || {
            PackHandle::open_unframed(&*self.inner.store, pack_id)
        })?;
        let mut end = first.offset;
        for (i, loc) in locs.iter().enumerate() {
            // Sorted, and apart: a blob that overlaps the one before (a damaged index record) cannot be cut
            // from one pass over the bytes; the caller reads such blobs one by one.
            let apart = i == 0
                || loc.offset >= end
                || (loc.offset == locs[i - 1].offset && loc.stored_len == locs[i - 1].stored_len);
            if loc.pack != pack_id || !apart {
                return Err(RepoError::InvalidArgument(format!(
                    "read_span: blobs of one pack, sorted by offset and apart (blob {i} at offset {})",
                    loc.offset
                )));
            }
            check_in_pack(loc, &pack)?;
            end = end.max(loc.offset + u64::from(loc.stored_len));
        }
        if self.inner.store.is_local() {
            // A local file costs nothing per read: each blob alone (the bytes between them are not read).
            let mut read = 0;
            for (i, loc) in locs.iter().enumerate() {
                let mut data = vec![0u8; loc.stored_len as usize];
                read_exact_at(&pack.file, &mut data, loc.offset, &pack.path, "chunk")?;
                read += data.len() as u64;
                if !each(i, data.into()) {
                    break;
                }
            }
            return Ok(read);
        }
        let len = (end - first.offset) as usize;
        let mut cut = SpanCutter::new(first.offset, locs);
        let mut stopped = false;
        let read = pack.file.read_stream(first.offset, len, &mut |piece| {
            if cut.feed(piece, &mut each) {
                Ok(())
            } else {
                stopped = true;
                Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the reader stopped",
                ))
            }
        });
        match read {
            Ok(()) => Ok(len as u64),
            Err(_) if stopped => Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(RepoError::corrupt(
                &pack.path,
                format!(
                    "truncated: chunks ({len} bytes at offset {}) lie past the end of the file ({e})",
                    first.offset
                ),
            )),
            Err(e) => Err(RepoError::io("read", &pack.path, e)),
        }
    }

    /// Looks up, reads, decodes and verifies one chunk: the plaintext whose BLAKE3 is `digest`, or an error.
    /// Every copy not marked damaged is tried in the order of the crate root's "Reading after damage" until
    /// one reads back whole, so a damaged index record or blob costs a restore nothing while another copy is
    /// good (the restore stages call this when the copy they read first does not decode or verify).
    pub fn load_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut moved = false;
        loop {
            let marks = self.damage_marks()?;
            let mut plain = None;
            let mut failed: Option<RepoError> = None;
            self.find_copy(digest, &mut |loc| {
                if marks.contains(digest, loc) {
                    return false;
                }
                match self
                    .read_chunk(loc)
                    .and_then(|stored| self.plaintext(digest, loc, &stored))
                {
                    Ok(p) => {
                        plain = Some(p);
                        true
                    }
                    Err(e) => {
                        warn!(chunk = %digest, pack = %loc.pack, offset = loc.offset, error = %e,
                              "A stored copy of a chunk cannot be read; trying the next one.");
                        failed.get_or_insert(e);
                        false
                    }
                }
            })?;
            if let Some(p) = plain {
                return Ok(p);
            }
            match failed {
                // A garbage collection moved the chunk after the index was listed: list it again, once.
                Some(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && !moved =>
                {
                    moved = true;
                    self.reload_index()?;
                }
                Some(e) => return Err(e),
                None if marks.is_marked(digest) => {
                    return Err(RepoError::corrupt(
                        self.index_dir(),
                        format!(
                            "chunk {digest} is damaged: every stored copy is marked damaged by verify (the \
                             next backup of a VM that still has the data stores it again)"
                        ),
                    ));
                }
                None => {
                    return Err(RepoError::corrupt(
                        self.index_dir(),
                        format!("chunk {digest} is in no index file and no pack"),
                    ));
                }
            }
        }
    }

    /// Decodes a blob read from `loc` and checks it against `digest`: the plaintext, or an error naming the
    /// pack and offset.
    pub(crate) fn plaintext(
        &self,
        digest: &Digest,
        loc: &ChunkLocation,
        stored: &StoredChunk,
    ) -> Result<Vec<u8>> {
        let plain =
            crate::decode(stored.codec, &stored.data, stored.raw_len).map_err(|e| match e {
                RepoError::Decode { detail, .. } => RepoError::Decode {
                    location: format!("pack {} offset {}", loc.pack, loc.offset),
                    detail,
                },
                e => e,
            })?;
        if self.digest_of(&plain) != *digest {
            return Err(RepoError::corrupt(
                self.inner.store.display_key(&pack_key(&loc.pack)),
                format!(
                    "chunk {digest} at offset {} does not match its digest",
                    loc.offset
                ),
            ));
        }
        Ok(plain)
    }

    pub fn begin_backup(&self, vm: &str) -> Result<BackupSession> {
        BackupSession::begin(self, vm)
    }

    /// Removes scratch directories left by killed sessions (whose lock is free); returns how many.
    pub fn remove_stale_scratch(&self) -> Result<usize> {
        crate::scratch::remove_stale(self.inner.store.scratch_root())
    }

    /// What the repository holds and what it costs: restore points, their logical size, the pack
    /// files' size and the chunks indexed. Lists `packs/` and `snapshots/` and reads the index files'
    /// headers (already open for lookups), nothing else: cheap enough for a console to ask every
    /// minute.
    pub fn usage(&self) -> Result<Usage> {
        let snapshots = self.list_snapshots()?;
        let store = &*self.inner.store;
        let (mut packs, mut stored_bytes) = (0u64, 0u64);
        for sub in store.list_dirs("packs/")? {
            for entry in store.list(&format!("packs/{sub}/"))? {
                if entry.name.ends_with(".pack") {
                    packs += 1;
                    stored_bytes += entry.size;
                }
            }
        }
        self.refresh()?;
        let chunks = self.index_files().iter().map(|f| f.record_count()).sum();
        let logical_bytes: u64 = snapshots.iter().map(|s| s.size).sum();
        Ok(Usage {
            snapshots: snapshots.len() as u64,
            logical_bytes,
            stored_bytes,
            packs,
            chunks,
        })
    }

    /// All pack files present, from the directory listing.
    pub fn list_packs(&self) -> Result<Vec<PackId>> {
        let store = &*self.inner.store;
        let mut out = Vec::new();
        for sub in store.list_dirs("packs/")? {
            for name in store.list_names(&format!("packs/{sub}/"))? {
                if let Some(id) = name.strip_suffix(".pack").and_then(|n| n.parse().ok()) {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Replaces every index file by one built from the pack trailers alone: the repair for lost or damaged
    /// index files. Takes the repository lock exclusively (no backup may run: a session's packs are durable
    /// before its index exists, and they must not be indexed twice or half). Memory is bounded like a
    /// session's index. The new index is in place before the old files are removed, so a crash leaves both
    /// (duplicates are harmless).
    pub fn rebuild_index(&self) -> Result<RebuildReport> {
        let store = &*self.inner.store;
        let _lock = lock_repository(store, LockMode::Exclusive, "backups are running")?;
        if crate::gc_state::cycle_pending(store)? {
            return Err(RepoError::Locked {
                path: self.inner.path.clone(),
                detail: "a garbage collection has condemned chunks and not yet deleted them; run `backflow gc` \
                         to finish it first"
                    .into(),
            });
        }
        let (scratch, _scratch_lock) = crate::scratch::create(store.scratch_root(), || {
            format!("rebuild-{}", crate::format::hex(&rand::random::<[u8; 6]>()))
        })?;
        let result = self.rebuild_into(&scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    fn rebuild_into(&self, scratch: &Path) -> Result<RebuildReport> {
        let store = &*self.inner.store;
        let old: Vec<String> = store
            .list_names(INDEX_PREFIX)?
            .into_iter()
            .filter(|n| n.ends_with(".idx"))
            .map(|n| format!("{INDEX_PREFIX}{n}"))
            .collect();
        let mut report = RebuildReport::default();
        let mut builder = IndexBuilder::new(scratch.to_owned());
        for id in self.list_packs()? {
            let key = pack_key(&id);
            match read_stored_pack_trailer(store, &key) {
                Ok(t) => {
                    report.packs += 1;
                    report.chunks += t.entries.len() as u64;
                    builder.add_pack(t.id, &t.entries)?;
                }
                Err(e) => {
                    warn!(pack = %store.display_key(&key).display(), error = %e,
                          "Pack left out of the rebuilt index.");
                    report.damaged_packs.push((id.to_hex(), e.to_string()));
                }
            }
        }
        let name = format!(
            "rebuild-{}.idx",
            crate::format::hex(&rand::random::<[u8; 8]>())
        );
        if !builder.is_empty() {
            let tmp = scratch.join("index.tmp");
            builder.write(&tmp)?;
            store.publish(&tmp, &format!("{INDEX_PREFIX}{name}"), PutMode::Create)?;
        }
        store.delete_many(&old)?;
        self.reload_index()?;
        info!(
            packs = report.packs,
            chunks = report.chunks,
            damaged = report.damaged_packs.len(),
            "Index rebuilt from packs."
        );
        Ok(report)
    }
}

/// [`check_blob_bounds`] of the blob `loc` in `pack`.
fn check_in_pack(loc: &ChunkLocation, pack: &PackHandle) -> Result<()> {
    check_blob_bounds(
        &format!("chunk at offset {}", loc.offset),
        loc.offset,
        loc.stored_len,
        loc.raw_len,
        loc.codec,
        pack.data_end,
        &pack.path,
    )
}

/// The most recently used packs' handles in `cache`, `open`ing one that is not there (the oldest goes).
fn cached_pack(
    cache: &Mutex<Vec<(PackId, Arc<PackHandle>)>>,
    id: PackId,
    open: impl FnOnce() -> Result<PackHandle>,
) -> Result<Arc<PackHandle>> {
    {
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = cache.iter().position(|(p, _)| *p == id) {
            let entry = cache.remove(pos);
            let handle = entry.1.clone();
            cache.push(entry);
            return Ok(handle);
        }
    }
    let handle = Arc::new(open()?);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= PACK_CACHE_SIZE {
        cache.remove(0);
    }
    cache.push((id, handle.clone()));
    Ok(handle)
}

/// Cuts the blobs of a span out of the pieces a streamed read delivers: a blob inside one piece is a
/// slice of it (no copy); one across pieces is gathered.
struct SpanCutter<'a> {
    /// The span's offset in the pack of the next byte to arrive.
    at: u64,
    locs: &'a [ChunkLocation],
    /// The next blob to hand over.
    next: usize,
    /// Bytes of the next blob gathered so far (from its offset on).
    partial: bytes::BytesMut,
}

impl<'a> SpanCutter<'a> {
    fn new(start: u64, locs: &'a [ChunkLocation]) -> Self {
        SpanCutter {
            at: start,
            locs,
            next: 0,
            partial: bytes::BytesMut::new(),
        }
    }

    /// Takes the next piece; false when `each` asked to stop.
    fn feed(
        &mut self,
        mut piece: bytes::Bytes,
        each: &mut impl FnMut(usize, bytes::Bytes) -> bool,
    ) -> bool {
        while !piece.is_empty() && self.next < self.locs.len() {
            let loc = &self.locs[self.next];
            let (start, end) = (loc.offset, loc.offset + u64::from(loc.stored_len));
            if self.at < start {
                // Bytes between blobs (or of a blob read again: offsets may repeat) are skipped.
                let skip = ((start - self.at) as usize).min(piece.len());
                let _ = piece.split_to(skip);
                self.at += skip as u64;
                continue;
            }
            let want = (end - self.at) as usize;
            let take = want.min(piece.len());
            let bytes = piece.split_to(take);
            self.at += take as u64;
            let blob = if self.partial.is_empty() && take == want {
                bytes
            } else {
                self.partial.extend_from_slice(&bytes);
                if take < want {
                    continue;
                }
                self.partial.split().freeze()
            };
            if !self.hand_over(blob, each) {
                return false;
            }
        }
        true
    }

    /// Hands `blob` over for the next blob and every following one at the same offset.
    fn hand_over(
        &mut self,
        blob: bytes::Bytes,
        each: &mut impl FnMut(usize, bytes::Bytes) -> bool,
    ) -> bool {
        let offset = self.locs[self.next].offset;
        while self.next < self.locs.len() && self.locs[self.next].offset == offset {
            if !each(self.next, blob.clone()) {
                return false;
            }
            self.next += 1;
        }
        true
    }
}

#[cfg(test)]
mod span_tests {
    use super::*;
    use crate::types::Codec;

    fn loc(offset: u64, len: u32) -> ChunkLocation {
        ChunkLocation {
            pack: PackId([7; 16]),
            offset,
            stored_len: len,
            raw_len: len,
            codec: Codec::None,
        }
    }

    /// Every way of cutting a span into pieces gives the same blobs: gaps skipped, a blob inside one
    /// piece or across several, two entries at one offset both handed the blob.
    #[test]
    fn blobs_are_cut_the_same_whatever_the_pieces() {
        let span: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        let start = 1000;
        let locs = [
            loc(1000, 10),
            loc(1010, 30),
            loc(1050, 1),
            loc(1050, 1),
            loc(1100, 100),
        ];
        let expected: Vec<(usize, Vec<u8>)> = locs
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let at = (l.offset - start) as usize;
                (i, span[at..at + l.stored_len as usize].to_vec())
            })
            .collect();
        for piece_len in [1, 3, 10, 17, 64, 200] {
            let mut cut = SpanCutter::new(start, &locs);
            let mut got = Vec::new();
            for piece in span.chunks(piece_len) {
                assert!(cut.feed(
                    bytes::Bytes::copy_from_slice(piece),
                    &mut |i, b: bytes::Bytes| {
                        got.push((i, b.to_vec()));
                        true
                    }
                ));
            }
            assert_eq!(got, expected, "pieces of {piece_len}");
        }
        // Stopping hands nothing more over.
        let mut cut = SpanCutter::new(start, &locs);
        let mut n = 0;
        let go_on = cut.feed(bytes::Bytes::from(span.clone()), &mut |_, _| {
            n += 1;
            n < 2
        });
        assert!(!go_on);
        assert_eq!(n, 2);
    }
}
