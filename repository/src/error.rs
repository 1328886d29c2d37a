//! Errors of the repository crate.
//!
//! # Policy
//! - Every fallible function returns [`RepoError`]; there is no `anyhow` here, so callers (the pipeline, the
//!   CLI) can match on what went wrong.
//! - Every message names the file (or the snapshot id) and says what is wrong with it in words an operator can
//!   act on: "pack packs/3f/3fa2….pack is truncated: 1200 bytes, footer needs 64", not "unexpected EOF".
//! - Bad on-disk data is an error, never a panic: lengths and offsets read from disk are checked before they
//!   are used to index, allocate or seek.
//! - [`RepoError::is_retryable`] says whether trying the same operation again later, without anyone repairing
//!   the repository, can succeed: a lock held by a garbage collection, a full disk, an interrupted system
//!   call. Corruption, unsupported versions and caller mistakes are never retryable.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias of this crate.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A system call on a repository file failed. Retryable when the kind is transient (interrupted, timed
    /// out, storage full, busy); not for missing files or permissions.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The directory is not a Backflow repository (no or unreadable `config`). Not retryable.
    #[error("{} is not a Backflow repository: {reason}", path.display())]
    NotARepository { path: PathBuf, reason: String },

    /// `init` on a directory that is not empty. Not retryable.
    #[error("cannot create a repository in {}: {reason}", path.display())]
    InitRefused { path: PathBuf, reason: String },

    /// A file carries a format version this build does not read. Not retryable: needs another Backflow.
    #[error("{} has format version {found}; this build reads version {supported}", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A file's contents are damaged or not what its name says: wrong magic, truncated, checksum mismatch,
    /// offsets out of bounds, unparsable metadata. Not retryable; `verify` and `rebuild_index` help.
    #[error("{} is damaged: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },

    /// A stored chunk did not decode to its recorded length. Not retryable.
    #[error("chunk at {location} cannot be decoded: {detail}")]
    Decode { location: String, detail: String },

    /// No snapshot with this id. Not retryable.
    #[error("no snapshot {id:?} in {}", repo.display())]
    SnapshotNotFound { repo: PathBuf, id: String },

    /// A prefix that several snapshot ids start with; `candidates` describes each (`ID (vm VM, TIME)`), oldest
    /// first. Not retryable: give more of the id.
    #[error("snapshot {given:?} is ambiguous in {}: {} snapshots start with it: {}; give more of the id",
        repo.display(), candidates.len(), candidates.join("; "))]
    AmbiguousSnapshot {
        repo: PathBuf,
        given: String,
        candidates: Vec<String>,
    },

    /// `latest` without a VM in a repository holding several: which one's newest is meant is not certain, and a
    /// restore of the wrong one is worse than a question. Not retryable: name the VM.
    #[error("`latest` is ambiguous in {}: it holds snapshots of {} VMs ({}); name one (`--vm NAME`, or a spec's \
        `vm` variable)", repo.display(), vms.len(), vms.join(", "))]
    LatestNeedsVm { repo: PathBuf, vms: Vec<String> },

    /// No snapshot of this VM (for `latest`, or a prefix, restricted to it). Not retryable.
    #[error("no snapshot of VM {vm:?} in {}{}", repo.display(), match &detail[..] { "" => String::new(), d => format!(" ({d})") })]
    NoSnapshotOfVm {
        repo: PathBuf,
        vm: String,
        /// What there is instead: the VMs that have snapshots, or the VM the given id belongs to.
        detail: String,
    },

    /// The repository lock is held in a mode that excludes this operation (a backup while a garbage collection
    /// or index rebuild runs, or the reverse). Retryable once the other operation ends.
    #[error("repository {} is locked: {detail}", path.display())]
    Locked { path: PathBuf, detail: String },

    /// An encrypted repository cannot be unlocked: no passphrase was given, or no key file opens with it.
    /// `detail` names the repository and says what to do. Not retryable: give the right passphrase. (A key
    /// file that is damaged is [`RepoError::Corrupt`] when no intact one opens.)
    #[error("{detail}")]
    Passphrase { path: PathBuf, detail: String },

    /// The caller passed something impossible: a chunk index past the end of a disk, a chunk size that is not
    /// a multiple of 64 KiB, a duplicate disk name. Not retryable: a bug or a bad option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The settings that reach a store are missing or wrong (no S3 credentials, a plain-HTTP endpoint off
    /// the loopback, a malformed endpoint URL). `detail` names the location and says what to set. Not
    /// retryable: fix the environment or the profile file.
    #[error("{location}: {detail}")]
    StoreSettings { location: String, detail: String },

    /// The backup session can no longer commit (a pack writer was dropped without `finish`, or an earlier
    /// write failed). Not retryable: start a new session.
    #[error("backup session {session} cannot commit: {reason}")]
    SessionFailed { session: String, reason: String },
}

impl RepoError {
    /// Whether trying the same operation again later can succeed without repairing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            RepoError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::ResourceBusy
            ),
            RepoError::Locked { .. } => true,
            RepoError::NotARepository { .. }
            | RepoError::InitRefused { .. }
            | RepoError::UnsupportedVersion { .. }
            | RepoError::Corrupt { .. }
            | RepoError::Decode { .. }
            | RepoError::SnapshotNotFound { .. }
            | RepoError::AmbiguousSnapshot { .. }
            | RepoError::LatestNeedsVm { .. }
            | RepoError::NoSnapshotOfVm { .. }
            | RepoError::InvalidArgument(_)
            | RepoError::StoreSettings { .. }
            | RepoError::Passphrase { .. }
            | RepoError::SessionFailed { .. } => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> RepoError {
        RepoError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> RepoError {
        RepoError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

/// Attaches the operation and file to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| RepoError::io(op, path, e))
    }
}

/// Positioned reads: of a stored object, or of a local scratch file (session chunk tables).
pub(crate) trait ReadAt {
    fn read_exact_at_pos(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at_pos(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at_pos(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at_pos(buf, offset)
    }
}

impl ReadAt for dyn crate::store::Object + '_ {
    fn read_exact_at_pos(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for std::sync::Arc<dyn crate::store::Object> {
    fn read_exact_at_pos(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, turning a short file into [`RepoError::Corrupt`] ("truncated")
/// rather than an I/O error, because a short repository file is damage, not a transient failure.
pub(crate) fn read_exact_at(
    file: &(impl ReadAt + ?Sized),
    buf: &mut [u8],
    offset: u64,
    path: &Path,
    what: &str,
) -> Result<()> {
    match file.read_exact_at_pos(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(RepoError::corrupt(
            path,
            format!(
                "truncated: {what} ({} bytes at offset {offset}) lies past the end of the file",
                buf.len()
            ),
        )),
        Err(e) => Err(RepoError::io("read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_follows_the_policy() {
        let full = RepoError::io(
            "write",
            "/r/packs/x",
            io::Error::from(io::ErrorKind::StorageFull),
        );
        assert!(full.is_retryable());
        let missing = RepoError::io(
            "open",
            "/r/packs/x",
            io::Error::from(io::ErrorKind::NotFound),
        );
        assert!(!missing.is_retryable());
        assert!(
            RepoError::Locked {
                path: "/r".into(),
                detail: "gc".into()
            }
            .is_retryable()
        );
        assert!(!RepoError::corrupt("/r/index/a.idx", "bad magic").is_retryable());
        let msg = RepoError::corrupt("/r/index/a.idx", "bad magic").to_string();
        assert!(
            msg.contains("/r/index/a.idx") && msg.contains("bad magic"),
            "{msg}"
        );
    }
}
