//! The repository's locks: `lock` (shared by backups, exclusive for gc and index rebuild) and the locks
//! other modules take for their own purposes, all through [`Store::lock`]. A leaf: every module that locks
//! uses it, it uses none.

use std::time::Duration;

use crate::error::{RepoError, Result};
pub(crate) use crate::store::LockMode;
use crate::store::{Lease, Store};

/// How often [`lock_waiting`] tries again: the locks it waits for are held for a read and a small write.
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Takes the repository lock without waiting: a conflict is a retryable [`RepoError::Locked`] whose
/// detail says who holds it (`held_by`). The lock lasts as long as the returned lease lives.
pub(crate) fn lock_repository(
    store: &dyn Store,
    mode: LockMode,
    held_by: &str,
) -> Result<Box<dyn Lease>> {
    store.lock("lock", mode, held_by)
}

/// Takes a lock that others hold only briefly (`gc/fence`, `damaged.lock`), waiting for it: waiting is
/// shorter than failing and retrying. A holder that died frees it (fs: the kernel drops the `flock`; S3: the
/// lease runs out).
pub(crate) fn lock_waiting(
    store: &dyn Store,
    name: &str,
    mode: LockMode,
) -> Result<Box<dyn Lease>> {
    loop {
        match store.lock(name, mode, "held briefly by another process") {
            Err(RepoError::Locked { .. }) => std::thread::sleep(LOCK_POLL),
            r => return r,
        }
    }
}
