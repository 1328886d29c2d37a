//! The repository's locks: `lock` (shared by backups, exclusive for gc and index rebuild) and the files
//! other modules `flock` for their own purposes. A leaf: every module that locks uses it, it uses none.

use std::fs::File;
use std::path::Path;

use crate::error::{IoContext, RepoError, Result};

/// How [`lock_repository`] takes the repository's `lock` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockMode {
    /// Backups: any number at once.
    Shared,
    /// gc and index rebuild: alone.
    Exclusive,
}

/// Takes the repository lock without waiting: a conflict is a retryable [`RepoError::Locked`] whose
/// detail says who holds it (`held_by`). The lock lasts as long as the returned file is open.
pub(crate) fn lock_repository(root: &Path, mode: LockMode, held_by: &str) -> Result<File> {
    let lock_path = root.join("lock");
    let lock = open_lock_file(&lock_path)?;
    let taken = match mode {
        LockMode::Shared => lock.try_lock_shared(),
        LockMode::Exclusive => lock.try_lock(),
    };
    match taken {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(RepoError::Locked {
            path: root.to_path_buf(),
            detail: held_by.into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(RepoError::io("lock", lock_path, e)),
    }
}

/// Opens (creating it if needed) a file used only for its `flock`.
pub(crate) fn open_lock_file(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx("open", path)
}
