//! The local file system backend: a key is the file `ROOT/KEY`. This is the only module that touches a
//! repository's files with `std::fs` (scratch, which is local on every backend, is the other place).
//!
//! How it keeps the promises of [`Store`]:
//! - **Durable when it returns.** [`FsStore::publish`] fsyncs the file, moves it into place and fsyncs the
//!   directory that gained the name (and the parent of a directory it had to create, such as a new
//!   `packs/XX/`); [`FsStore::delete`] and [`FsStore::rename`] fsync the directories they changed.
//! - **Whole or absent.** A file becomes visible under its key only by `rename(2)` or `link(2)` of a complete
//!   file, both atomic.
//! - **Create never replaces.** [`PutMode::Create`] publishes with `link(2)`, which fails on an existing
//!   name (then the scratch name is unlinked); on a file system without hard links, an existence check and
//!   a rename have to do, as before the storage seam existed.
//! - **Locks and registrations** are `flock`s: the kernel drops them when the process dies, however it dies,
//!   so a lock that can be taken is one nobody holds, and [`Lease::is_held`] is always true.
//! - **Listings** are `readdir`: they see every name whose rename or link returned.
//!
//! The index refresh needs no listing on a hit and, on a miss, only the directory's modification time
//! ([`FsStore::change_hint`]), as before.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::{Entry, Lease, LockMode, Object, PutMode, Stat, Store};
use crate::error::{IoContext, RepoError, Result};
use crate::store::Location;

/// The directories every local repository has; `open` refuses a directory without them.
pub(crate) const LAYOUT_DIRS: [&str; 4] = ["packs", "index", "snapshots", "tmp"];

/// A repository in a local (or POSIX cluster) directory.
#[derive(Debug)]
pub struct FsStore {
    location: Location,
    root: PathBuf,
    scratch: PathBuf,
}

impl FsStore {
    /// The store of the repository directory `root` (which need not exist yet: `init` creates it).
    pub fn new(root: &Path) -> FsStore {
        FsStore {
            location: Location::Local(root.to_owned()),
            root: root.to_owned(),
            scratch: root.join("tmp"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, key: &str) -> PathBuf {
        if key.is_empty() {
            self.root.clone()
        } else {
            self.root.join(key)
        }
    }

    /// Creates the directory `dir` (and what is missing above it) and makes the new names durable.
    fn create_dir(&self, dir: &Path) -> Result<()> {
        match std::fs::create_dir(dir) {
            Ok(()) => sync_dir(dir.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let parent = dir.parent().unwrap_or(Path::new("."));
                self.create_dir(parent)?;
                self.create_dir(dir)
            }
            Err(e) => Err(RepoError::io("create directory", dir, e)),
        }
    }

    /// Runs `op`, and when it fails because the destination's directory is missing, creates it and runs it
    /// again: directories such as `packs/XX/` or `gc/forgotten/` appear on demand, at no cost when they exist.
    fn with_parent<T>(
        &self,
        dest: &Path,
        mut op: impl FnMut() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match op() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let parent = dest.parent().unwrap_or(Path::new("."));
                if parent.is_dir() {
                    return Err(e);
                }
                self.create_dir(parent).map_err(|e| match e {
                    RepoError::Io { source, .. } => source,
                    e => std::io::Error::other(e.to_string()),
                })?;
                op()
            }
            r => r,
        }
    }

    fn publish_inner(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        let dest = self.file(key);
        File::open(local)
            .and_then(|f| f.sync_all())
            .ctx("fsync", local)?;
        match mode {
            PutMode::Replace => {
                self.with_parent(&dest, || std::fs::rename(local, &dest))
                    .ctx("rename into place", &dest)?;
            }
            PutMode::Create => {
                // A hard link never replaces an existing name, unlike rename.
                match self.with_parent(&dest, || std::fs::hard_link(local, &dest)) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(local);
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        return Err(RepoError::io("publish", dest, e));
                    }
                    // File systems without hard links: the existence check has to do.
                    Err(_) => {
                        if dest.exists() {
                            return Err(RepoError::io(
                                "publish",
                                dest,
                                std::io::Error::from(ErrorKind::AlreadyExists),
                            ));
                        }
                        std::fs::rename(local, &dest).ctx("rename into place", &dest)?;
                    }
                }
            }
        }
        sync_dir(dest.parent().unwrap_or(Path::new(".")))
    }

    fn list_dir(&self, prefix: &str, dirs: bool) -> Result<Vec<(String, std::fs::DirEntry)>> {
        let dir = self.file(prefix);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RepoError::io("list", dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx("list", &dir)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let is_dir = match entry.file_type() {
                Ok(t) => t.is_dir(),
                // Removed since it was listed.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io("stat", entry.path(), e)),
            };
            if is_dir == dirs {
                out.push((name, entry));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// fsyncs a directory so that a rename, link, unlink or create inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// An open file, read with `pread`.
#[derive(Debug)]
pub struct FsObject {
    file: File,
    len: u64,
}

impl Object for FsObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Opens a local file (scratch: a recovery index, a test's copy) as an [`Object`].
pub(crate) fn open_local(path: &Path) -> Result<Arc<dyn Object>> {
    let file = File::open(path).ctx("open", path)?;
    let len = file.metadata().ctx("stat", path)?.len();
    Ok(Arc::new(FsObject { file, len }))
}

/// A `flock`ed file: held until dropped (or the process dies).
#[derive(Debug)]
struct FsLease {
    name: String,
    /// For registrations: the file to remove when the lease is dropped.
    remove: Option<PathBuf>,
    _file: File,
}

impl Lease for FsLease {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_held(&self) -> bool {
        true
    }
}

impl Drop for FsLease {
    fn drop(&mut self) {
        if let Some(p) = &self.remove {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens (creating it if needed) a file used only for its `flock`.
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl Store for FsStore {
    fn location(&self) -> &Location {
        &self.location
    }

    fn display_key(&self, key: &str) -> PathBuf {
        self.file(key)
    }

    fn scratch_root(&self) -> &Path {
        &self.scratch
    }

    fn open(&self, key: &str) -> Result<Arc<dyn Object>> {
        let path = self.file(key);
        let file = File::open(&path).ctx("open", &path)?;
        let len = file.metadata().ctx("stat", &path)?.len();
        Ok(Arc::new(FsObject { file, len }))
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.file(key);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io("read", path, e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.file(key);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RepoError::io("stat", path, e)),
        }
    }

    fn stat(&self, key: &str) -> Result<Option<Stat>> {
        let path = self.file(key);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(Stat {
                size: m.len(),
                modified: m.modified().ok(),
                identity: m.ino(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io("stat", path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for (name, entry) in self.list_dir(prefix, false)? {
            let m = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io("stat", entry.path(), e)),
            };
            out.push(Entry {
                name,
                size: m.len(),
                modified: m.modified().ok(),
            });
        }
        Ok(out)
    }

    fn list_names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_dir(prefix, false)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_dir(prefix, true)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        let r = self.publish_inner(local, key, mode);
        if r.is_err() {
            let _ = std::fs::remove_file(local);
        }
        r
    }

    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()> {
        let tmp = self.scratch.join(format!(
            "put-{}-{}.tmp",
            std::process::id(),
            crate::format::hex(&rand::random::<[u8; 8]>())
        ));
        let written = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .ctx("write", &tmp);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(&tmp, key, mode)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.file(key);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io("remove", path, e)),
        }
    }

    fn delete_many(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.file(key);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    dirs.insert(path.parent().unwrap_or(Path::new(".")).to_owned());
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(RepoError::io("remove", path, e)),
            }
        }
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dest) = (self.file(from), self.file(to));
        self.with_parent(&dest, || std::fs::rename(&src, &dest))
            .map_err(|e| RepoError::io("move", &src, e))?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
        sync_dir(src.parent().unwrap_or(Path::new(".")))
    }

    fn lock(&self, name: &str, mode: LockMode, held_by: &str) -> Result<Box<dyn Lease>> {
        let path = self.file(name);
        let file = self
            .with_parent(&path, || open_lock_file(&path))
            .ctx("open", &path)?;
        let taken = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match taken {
            Ok(()) => Ok(Box::new(FsLease {
                name: name.to_owned(),
                remove: None,
                _file: file,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Err(RepoError::Locked {
                path: self.root.clone(),
                detail: held_by.into(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(RepoError::io("lock", path, e)),
        }
    }

    fn register(&self, prefix: &str) -> Result<Box<dyn Lease>> {
        let name = format!(
            "{}-{}",
            std::process::id(),
            crate::format::hex(&rand::random::<[u8; 6]>())
        );
        let path = self.file(&format!("{prefix}{name}"));
        let file = self
            .with_parent(&path, || File::create(&path))
            .ctx("create", &path)?;
        file.try_lock().map_err(|e| {
            RepoError::io(
                "lock",
                &path,
                match e {
                    std::fs::TryLockError::Error(e) => e,
                    std::fs::TryLockError::WouldBlock => ErrorKind::WouldBlock.into(),
                },
            )
        })?;
        Ok(Box::new(FsLease {
            name,
            remove: Some(path),
            _file: file,
        }))
    }

    fn live(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (name, entry) in self.list_dir(prefix, false)? {
            let Ok(f) = File::open(entry.path()) else {
                continue;
            };
            if f.try_lock().is_ok() {
                // Its process died without removing it.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            out.push(name);
        }
        Ok(out)
    }

    fn change_hint(&self, prefix: &str) -> Option<SystemTime> {
        std::fs::metadata(self.file(prefix))
            .and_then(|m| m.modified())
            .ok()
    }

    fn prepare(&self) -> Result<()> {
        let root = &self.root;
        match std::fs::metadata(root) {
            Ok(m) if !m.is_dir() => {
                return Err(RepoError::InitRefused {
                    path: root.clone(),
                    reason: "it is not a directory".into(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(root).ctx("create directory", root)?;
            }
            Err(e) => return Err(RepoError::io("stat", root, e)),
        }
        for dir in LAYOUT_DIRS {
            let d = root.join(dir);
            std::fs::create_dir(&d).ctx("create directory", &d)?;
        }
        let lock = root.join("lock");
        File::create(&lock)
            .and_then(|f| f.sync_all())
            .ctx("create", &lock)?;
        sync_dir(root)
    }

    fn check_layout(&self) -> Result<()> {
        for dir in LAYOUT_DIRS {
            if !self.root.join(dir).is_dir() {
                return Err(RepoError::NotARepository {
                    path: self.root.clone(),
                    reason: format!("the {dir}/ directory is missing"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::is_exists;

    #[test]
    fn publish_create_never_replaces_and_makes_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path());
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        store
            .put("packs/ab/x.pack", b"one", PutMode::Create)
            .unwrap();
        let e = store
            .put("packs/ab/x.pack", b"two", PutMode::Create)
            .unwrap_err();
        assert!(is_exists(&e), "{e}");
        assert_eq!(store.read("packs/ab/x.pack").unwrap().unwrap(), b"one");
        store
            .put("packs/ab/x.pack", b"three", PutMode::Replace)
            .unwrap();
        assert_eq!(store.read("packs/ab/x.pack").unwrap().unwrap(), b"three");
        // Scratch holds nothing afterwards: the temporary files were consumed, also on the error.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.list_dirs("packs/").unwrap(), vec!["ab".to_owned()]);
        let listed = store.list("packs/ab/").unwrap();
        assert_eq!((listed[0].name.as_str(), listed[0].size), ("x.pack", 5));
        assert!(store.list("nothing/").unwrap().is_empty());
    }

    #[test]
    fn locks_conflict_and_registrations_are_live_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path());
        let shared = store.lock("lock", LockMode::Shared, "x").unwrap();
        let _shared2 = store.lock("lock", LockMode::Shared, "x").unwrap();
        let e = store.lock("lock", LockMode::Exclusive, "held").unwrap_err();
        assert!(
            matches!(e, RepoError::Locked { ref detail, .. } if detail == "held"),
            "{e}"
        );
        drop(shared);
        let user = store.register("users/").unwrap();
        assert_eq!(store.live("users/").unwrap(), vec![user.name().to_owned()]);
        drop(user);
        assert!(store.live("users/").unwrap().is_empty());
        assert!(store.list("users/").unwrap().is_empty());
    }
}
