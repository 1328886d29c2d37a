//! Scratch directories under the store's scratch root (`tmp/` of a local repository; a local directory per
//! repository for object storage, see [`crate::store::Store::scratch_root`]): private working space of one session (backup or index rebuild).
//!
//! Each scratch directory is locked with an exclusive `flock` on the directory itself for as long as its owner
//! lives. The kernel drops the lock when the process dies, however it dies, so "the lock can be taken" is
//! exactly "the owner is gone" and [`remove_stale`] never removes the directory of a live session, even one in
//! another process or on another host of a cluster file system that supports `flock`.
//!
//! Creating and locking are two steps, so a remover could lock a directory created an instant before its owner
//! locks it and delete it. The owner detects this (its lock attempt fails, or the path no longer leads to the
//! directory it locked) and starts over under a new name.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

use crate::error::{IoContext, RepoError, Result};

/// Creates and locks `<scratch root>/<name>`; `name` is called again for a fresh name after a collision or a
/// race.
pub(crate) fn create(tmp: &Path, mut name: impl FnMut() -> String) -> Result<(PathBuf, File)> {
    for _ in 0..16 {
        let dir = tmp.join(name());
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(RepoError::io("create scratch directory", dir, e)),
        }
        // Removed before it was locked (another process's `remove_stale` took it for abandoned): a lost
        // race, like a lock that cannot be taken.
        let handle = match File::open(&dir) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RepoError::io("open scratch directory", dir, e)),
        };
        if handle.try_lock().is_err() {
            continue;
        }
        let same = match (handle.metadata(), std::fs::metadata(&dir)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok((dir, handle));
        }
    }
    Err(RepoError::io(
        "create scratch directory",
        tmp,
        std::io::Error::other("lost the race for a fresh name 16 times"),
    ))
}

/// A small object being written ([`crate::store::Store::put`] of a local repository) lives in scratch for
/// milliseconds; one this old was left by a process killed in between and is removed by [`remove_stale`].
/// (Such files have no lock: a cluster file system's other hosts could not be asked whether they run.)
pub(crate) const STALE_PUT_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether a scratch file is a put's temporary file (`put-PID-HEX.tmp`, see `store/fs.rs`).
fn is_put_file(name: &str) -> bool {
    name.starts_with("put-") && name.ends_with(".tmp")
}

/// Removes the scratch directories of sessions that no longer run, and the temporary files of puts
/// interrupted more than [`STALE_PUT_AGE`] ago; returns how many directories.
pub(crate) fn remove_stale(tmp: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(tmp).ctx("list", tmp)? {
        let entry = entry.ctx("list", tmp)?;
        let path = entry.path();
        if !entry.file_type().ctx("stat", &path)?.is_dir() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > STALE_PUT_AGE);
            if old && entry.file_name().to_str().is_some_and(is_put_file) {
                let _ = std::fs::remove_file(&path);
                info!(file = %path.display(), "Removed the temporary file of an interrupted write.");
            }
            continue;
        }
        let Ok(handle) = File::open(&path) else {
            continue;
        };
        if handle.try_lock().is_err() {
            debug!(dir = %path.display(), "Scratch directory in use.");
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RepoError::io("remove stale scratch directory", path, e)),
        }
        info!(dir = %path.display(), "Removed the scratch directory of an interrupted session.");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_puts_are_removed_once_old_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, age: u64| {
            let f = File::create(dir.path().join(name)).unwrap();
            let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            f.set_modified(when).unwrap();
        };
        let old = STALE_PUT_AGE.as_secs() + 60;
        write("put-1-00.tmp", old);
        write("put-2-00.tmp", 5);
        write("notes.tmp", old);
        remove_stale(dir.path()).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.tmp", "put-2-00.tmp"]);
    }
}
