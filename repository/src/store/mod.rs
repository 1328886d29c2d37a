//! The storage seam: the few operations the format needs, behind one trait, with a backend per kind of
//! storage. Everything above this module speaks in *keys* (`packs/3f/3fa2….pack`, `index/ID.idx`,
//! `snapshots/ID.snap`, `config`): `/`-separated, relative to the repository's root, never starting with `/`
//! and never containing `..`. The backends map keys to files under a directory (`fs::FsStore`) or to objects
//! under a bucket and prefix (`s3::S3Store`).
//!
//! What a backend promises (each says how it keeps the promise in its own module's documentation):
//! - **Durable when it returns.** [`Store::publish`] and [`Store::put`] return only once the object survives a
//!   crash of this host (fs: fsync of the file and its directory; S3: the PUT or CompleteMultipartUpload was
//!   acknowledged).
//! - **Whole or absent.** A reader never sees part of an object: fs writes under a temporary name and renames
//!   or links; S3 objects appear atomically.
//! - **Create never replaces.** [`PutMode::Create`] fails with an error for which [`is_exists`] holds when the key exists. fs: `link(2)`
//!   (or `O_EXCL`). S3: `If-None-Match: *` where the store honours it, plus a HEAD before the upload; a store
//!   that ignores the header (Garage 2.5 does) can then let a racing writer replace an object, so no
//!   guarantee of the format rests on it: every key a session creates carries fresh random bits, and mutual
//!   exclusion comes from leases ([`Store::lock`]), which need only read-after-write consistency of PUT and
//!   LIST.
//! - **Listing sees every object whose write returned before the listing began** (read-after-write). AWS S3
//!   documents it; Garage gives it with its default `consistency_mode = "consistent"` (read and write
//!   quorums chosen for it), not in its `degraded` or `dangerous` modes. Other stores are assumed to, not
//!   checked.
//!
//! Scratch space (session chunk tables, spilled sort runs, packs being filled, objects fetched whole) is
//! always a local directory, [`Store::scratch_root`]: under the repository for fs, under
//! `$BACKFLOW_SCRATCH_DIR` (default `/var/tmp/backflow`) for S3.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::Result;

pub mod fs;
pub mod location;
pub mod s3;
pub mod sealed;

pub use fs::FsStore;
pub use location::{BadLocation, Location, S3Location};

/// Opens the store of a repository location: a local directory ([`FsStore`]) or an S3 bucket and prefix.
/// Nothing is created or checked here; [`crate::Repository::open_at`] and [`crate::Repository::init_at`] do.
pub fn open_store(location: &Location) -> Result<Arc<dyn Store>> {
    match location {
        Location::Local(path) => Ok(Arc::new(FsStore::new(path))),
        Location::S3(s3) => Ok(Arc::new(s3::S3Store::open(s3)?)),
    }
}

/// What a backend can say about one object cheaply: enough to tell that it was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// A backend's identity of this version of the object (fs: the inode number; 0 where there is none).
    pub identity: u64,
}

/// How [`Store::publish`] and [`Store::put`] treat an existing object of the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with an error for which [`is_exists`] holds when the key exists (write-once files: packs, index
    /// files, manifests).
    Create,
    /// Replace atomically (side files rewritten whole: `damaged`, gc state, leases, `config.copy`).
    Replace,
}

/// How [`Store::lock`] takes a named lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Any number of holders at once (backups, forget).
    Shared,
    /// One holder and no shared ones (gc's publication, index rebuild).
    Exclusive,
}

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The object's key relative to the listed prefix (`3fa2….pack` for a listing of `packs/3f/`).
    pub name: String,
    pub size: u64,
    /// When it was last written, by the store's clock (used for leases and for "older than" decisions).
    pub modified: Option<SystemTime>,
}

/// An object opened for positioned reads. fs: the open file. S3: ranged GETs (a small object may be fetched
/// whole at open).
pub trait Object: Send + Sync + fmt::Debug {
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at `offset`; short only at the end of the object.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads exactly `len` bytes at `offset` as one request where the store has requests, bypassing
    /// read-ahead, and hands them to `each` piece by piece in order as they arrive (without copying
    /// them), so that a reader can use the first bytes while the rest are on their way: for a reader
    /// that asks at once for everything it wants from a region (a restore's span of chunks). An error
    /// from `each` ends the read with that error; fewer bytes than asked is an `UnexpectedEof` error.
    /// fs: one [`Object::read_exact_at`], one piece.
    fn read_stream(
        &self,
        offset: u64,
        len: usize,
        each: &mut dyn FnMut(bytes::Bytes) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = vec![0; len];
        self.read_exact_at(&mut buf, offset)?;
        each(buf.into())
    }
}

/// A lock or registration held for as long as the value lives. fs: a `flock`ed file (the kernel drops it
/// when the process dies). S3: a lease object renewed in the background; it is gone when deleted or when
/// older than the lease bound.
pub trait Lease: Send + Sync + fmt::Debug {
    /// The lease's name (its file or object name, without the prefix): how other processes see it.
    fn name(&self) -> &str;

    /// Whether the lease is certainly still held: on S3, renewed within the bound (minus a margin). A
    /// session checks this right before its commit point; on fs it is always true.
    fn is_held(&self) -> bool;
}

/// The storage a repository lives in. Implementations are cheap to share (`Arc<dyn Store>`) and safe to call
/// from many threads.
pub trait Store: Send + Sync + fmt::Debug {
    /// Where the repository is, as an operator writes it: a path or `s3://BUCKET/PREFIX`.
    fn location(&self) -> &Location;

    /// A key as a path-like value for messages and errors (`/srv/repo/packs/3f/…` or
    /// `s3://bucket/prefix/packs/3f/…`).
    fn display_key(&self, key: &str) -> PathBuf;

    /// A local directory for this handle's scratch; exists once the store is open.
    fn scratch_root(&self) -> &Path;

    /// Opens an object for positioned reads. A missing object is an `Io` error of kind `NotFound`.
    fn open(&self, key: &str) -> Result<Arc<dyn Object>>;

    /// Reads a whole small object (config, side files, lists); `None` when it does not exist.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;

    /// The objects directly under `prefix` (which ends with `/`, or is empty for the root), in name order.
    /// "Directly": a listing of `packs/` returns nothing; packs are listed per `packs/XX/`.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;

    /// The names of [`Store::list`], where sizes and times are not needed (fs: no `stat` per file).
    fn list_names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.list(prefix)?.into_iter().map(|e| e.name).collect())
    }

    /// Size and modification time of one object; `None` when it does not exist. The default lists the
    /// object's "directory".
    fn stat(&self, key: &str) -> Result<Option<Stat>> {
        let (dir, name) = match key.rfind('/') {
            Some(i) => (&key[..=i], &key[i + 1..]),
            None => ("", key),
        };
        Ok(self
            .list(dir)?
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| Stat {
                size: e.size,
                modified: e.modified,
                identity: 0,
            }))
    }

    /// The "subdirectories" of `prefix` (names without the trailing `/`), for `packs/` and `tmp/`.
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>>;

    /// Makes the complete local file `local` (in [`Store::scratch_root`]) the object `key`, durably. The local
    /// file is consumed: moved (fs) or uploaded and removed (S3), also when an error is returned.
    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()>;

    /// Writes a small object from memory, durably.
    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()>;

    /// Removes an object; a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Removes many objects (a gc's sweep); missing ones are not errors. fs: one directory fsync per
    /// directory rather than per file.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }

    /// Moves an object to another key (gc's quarantine). fs: rename. S3: copy, then delete.
    fn rename(&self, from: &str, to: &str) -> Result<()>;

    /// Takes the lock `name` (`lock`, `gc/fence`, `gc/run.lock`, `damaged.lock`) without waiting: a conflict
    /// is a retryable `RepoError::Locked` whose detail says `held_by` of the holder when known.
    fn lock(&self, name: &str, mode: LockMode, held_by: &str) -> Result<Box<dyn Lease>>;

    /// Registers a live participant under `prefix` (`users/`): a fresh name, held until dropped.
    fn register(&self, prefix: &str) -> Result<Box<dyn Lease>>;

    /// The names under `prefix` whose registration is live (fs: the file's `flock` is held; S3: the lease was
    /// renewed within its bound).
    fn live(&self, prefix: &str) -> Result<Vec<String>>;

    /// A value that changes whenever an object is added under `prefix`, for the index refresh: a lookup that
    /// misses lists `index/` again only when it changed. fs: the directory's modification time. `None`: the
    /// backend cannot say, and a miss lists again at most once per second
    /// ([`crate::Repository::lookup`]).
    fn change_hint(&self, _prefix: &str) -> Option<SystemTime> {
        None
    }

    /// Makes an empty location ready to hold a repository, before `config` is written (fs: the directory,
    /// its fixed subdirectories and the lock file). Object stores need nothing.
    fn prepare(&self) -> Result<()> {
        Ok(())
    }

    /// Checks, at open, what a repository needs beyond `config` (fs: its fixed subdirectories).
    fn check_layout(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the backend is a local file system (some operations, such as hard links of scratch files,
    /// are only offered there): what the location says.
    fn is_local(&self) -> bool {
        self.location().is_local()
    }
}

/// Whether an error says that [`PutMode::Create`] met an existing object.
pub fn is_exists(e: &crate::RepoError) -> bool {
    matches!(e, crate::RepoError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
}
