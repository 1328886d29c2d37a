//! State shared by all stages of one run.

use std::collections::BTreeMap;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use backflow_repository::{Location, Repository};

use crate::error::StageError;
use crate::runtime::Outcome;

/// Set once to stop a run: by Ctrl-C / SIGTERM, or by the runtime when a stage failed. Sources stop
/// producing, every worker's `recv`/`send` returns `None`/`Err` within a tick, and sinks do not commit.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    /// The token this one was made from by [`CancelToken::child`]: cancelling it cancels this one.
    parent: Option<Arc<CancelToken>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled when this one is, or on its own: cancelling the child (as a run does when
    /// one of its stages fails) leaves this one, and its other children, running.
    pub fn child(&self) -> CancelToken {
        CancelToken {
            flag: Arc::default(),
            parent: Some(Arc::new(self.clone())),
        }
    }

    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst) || self.parent.as_ref().is_some_and(|p| p.is_cancelled())
    }
}

/// Bytes done of bytes planned, for the whole run: what an overall progress line shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overall {
    pub measure: Measure,
    pub done: u64,
    /// 0 until a planning stage has said how much there is to do.
    pub planned: u64,
}

/// What [`Overall`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// Bytes read from the sources (a backup).
    Read,
    /// Data written to the targets (a restore).
    Written,
}

/// The run result in which a restore's source lists the disks it will restore
/// (`[{"disk": NAME, "size": BYTES}]`), recorded before any stage runs (in its preflight): what a
/// disk writer checks its targets against before any data moves.
pub const RESTORE_PLAN: &str = "restore_plan";

/// A cleanup action registered by a stage (stop a helper process, end a backup job, remove a file).
/// It runs in the finaliser whatever the outcome, in reverse order of registration.
pub type CleanupAction = Box<dyn FnOnce(&Outcome) -> Result<(), String> + Send>;

/// What all stages of one run share. Stages reach it through their worker.
pub struct RunContext {
    cancel: CancelToken,
    /// The pipeline's `repository:` (a path or `s3://BUCKET/PREFIX`), if any.
    repository_location: Option<Location>,
    repository: OnceLock<Result<Repository, String>>,
    cleanup: Mutex<Vec<(String, CleanupAction)>>,
    /// Bytes read from the source disks (what a changed-block map made us read).
    pub source_bytes_read: AtomicU64,
    /// Bytes written into the repository (packs), before index and manifest.
    pub repo_bytes_written: AtomicU64,
    /// Data written to a restore's targets (image files, block devices): the plaintext of data
    /// chunks; holes and zero runs are not counted.
    pub target_bytes_written: AtomicU64,
    /// What the planning stages said the run has to read from its sources and to write to its
    /// targets ([`RunContext::plan_read`], [`RunContext::plan_write`]).
    planned_read: AtomicU64,
    planned_write: AtomicU64,
    results: Mutex<BTreeMap<String, serde_json::Value>>,
    warnings: Mutex<Vec<String>>,
    notes: Mutex<Vec<String>>,
    /// Set by a restore's source (`repo-reader`'s `allow_damaged`): a chunk no stored copy gives
    /// back becomes zeros instead of failing the run ([`RunContext::reload_or_zero`]).
    damage_allowed: AtomicBool,
    /// The ranges restored as zeros for that reason, in the order found.
    damaged: Mutex<Vec<DamagedRange>>,
}

/// A range of a disk that a restore wrote as zeros because no stored copy of its chunk could be
/// read (allowed damage, for disaster recovery).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DamagedRange {
    pub disk: String,
    /// Byte offset in the disk (the chunk's).
    pub offset: u64,
    /// Bytes: the chunk size, less at the end of the disk.
    pub length: u64,
    /// The chunk's digest, when the snapshot names one.
    pub digest: Option<String>,
    /// Why no copy could be read.
    pub cause: String,
}

impl RunContext {
    pub fn new(repository: Option<Location>, cancel: CancelToken) -> Self {
        RunContext {
            cancel,
            repository_location: repository,
            repository: OnceLock::new(),
            cleanup: Mutex::new(Vec::new()),
            source_bytes_read: AtomicU64::new(0),
            repo_bytes_written: AtomicU64::new(0),
            target_bytes_written: AtomicU64::new(0),
            planned_read: AtomicU64::new(0),
            planned_write: AtomicU64::new(0),
            results: Mutex::new(BTreeMap::new()),
            warnings: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            damage_allowed: AtomicBool::new(false),
            damaged: Mutex::new(Vec::new()),
        }
    }

    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Where the pipeline's repository is, if it names one (without opening it).
    pub fn repository_location(&self) -> Option<&Location> {
        self.repository_location.as_ref()
    }

    /// How this pipeline names chunks: its repository's hasher (keyed BLAKE3 in an encrypted repository),
    /// or plain BLAKE3 without a repository. Stages that compute digests take it once per worker.
    pub fn chunk_hasher(&self) -> Result<backflow_repository::crypto::ChunkHasher, StageError> {
        if self.repository_location.is_none() {
            return Ok(backflow_repository::crypto::ChunkHasher::plain());
        }
        Ok(self.repository()?.chunk_hasher())
    }

    /// The pipeline's repository, opened once on first use and shared by every stage.
    pub fn repository(&self) -> Result<&Repository, StageError> {
        let Some(location) = &self.repository_location else {
            return Err(StageError::Config(
                "this stage needs the pipeline's `repository:` to be set".into(),
            ));
        };
        self.repository
            .get_or_init(|| Repository::open_at(location).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| StageError::Config(e.clone()))
    }

    /// Registers an action for the finaliser. `what` names it in logs and the report.
    pub fn on_cleanup(&self, what: impl Into<String>, action: CleanupAction) {
        self.cleanup.lock().unwrap().push((what.into(), action));
    }

    /// Takes the registered cleanup actions, newest first.
    pub fn take_cleanup_actions(&self) -> Vec<(String, CleanupAction)> {
        let mut actions = std::mem::take(&mut *self.cleanup.lock().unwrap());
        actions.reverse();
        actions
    }

    /// Adds `bytes` to what the sources will read, counted done in `source_bytes_read`. A stage that
    /// plans the reads (a changed-block map) calls it before it hands its plan on, so that the
    /// overall progress has its total long before the data has moved.
    pub fn plan_read(&self, bytes: u64) {
        self.planned_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds `bytes` to the data the run will write to its targets (a restore), counted done in
    /// `target_bytes_written`.
    pub fn plan_write(&self, bytes: u64) {
        self.planned_write.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The run's progress as a whole. A run that planned writes is measured by them: a restore
    /// also reads the repository, but what its user waits for is the data on the target.
    pub fn overall(&self) -> Overall {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        match load(&self.planned_write) {
            0 => Overall {
                measure: Measure::Read,
                done: load(&self.source_bytes_read),
                planned: load(&self.planned_read),
            },
            planned => Overall {
                measure: Measure::Written,
                done: load(&self.target_bytes_written),
                planned,
            },
        }
    }

    /// Records a result of the run for the report (for example `snapshot`).
    pub fn set_result(&self, key: &str, value: serde_json::Value) {
        self.results.lock().unwrap().insert(key.to_owned(), value);
    }

    pub fn results(&self) -> BTreeMap<String, serde_json::Value> {
        self.results.lock().unwrap().clone()
    }

    /// A warning for the report: the run goes on (for example a fallback to a full read).
    /// The repository, if a stage opened it (never opens it).
    pub fn opened_repository(&self) -> Option<&Repository> {
        self.repository.get().and_then(|r| r.as_ref().ok())
    }

    /// The plaintext of a restored chunk whose stored copy did not decode or verify (`why`): read again
    /// from the next stored copy that does ([`Repository::load_chunk`]), with a warning, so that a damaged
    /// copy fails a restore only when no other copy is good. Without a digest or a repository, the error.
    pub fn reload_chunk(
        &self,
        chunk: &crate::message::Chunk,
        why: &str,
    ) -> Result<bytes::Bytes, StageError> {
        let fail = |detail: String| {
            StageError::Corrupt(format!(
                "disk {}, chunk {} at offset {}: {detail}",
                chunk.disk.name(),
                chunk.index,
                chunk.offset()
            ))
        };
        let (Some(digest), Some(repo)) = (chunk.digest, self.opened_repository()) else {
            return Err(fail(why.to_owned()));
        };
        match repo.load_chunk(&digest) {
            Ok(plain) => {
                self.warn(format!(
                    "disk {}, chunk {}: the stored copy read first {why}; restored from another copy \
                     (`backflow verify --read-data` marks the damaged one)",
                    chunk.disk.name(),
                    chunk.index
                ));
                Ok(bytes::Bytes::from(plain))
            }
            Err(e) => Err(fail(format!("{why}, and no other copy is readable: {e}"))),
        }
    }

    /// Lets this run restore zeros where no stored copy of a chunk can be read (disaster
    /// recovery), each such range recorded ([`RunContext::damaged_ranges`]). Set by the restore's
    /// source before it sends anything.
    pub fn allow_damage(&self) {
        self.damage_allowed.store(true, Ordering::SeqCst);
    }

    pub fn damage_allowed(&self) -> bool {
        self.damage_allowed.load(Ordering::SeqCst)
    }

    /// Records that `chunk` is restored as zeros because of `cause`, and makes it a zero chunk.
    /// Only for runs that allow damage; the caller checked [`RunContext::damage_allowed`].
    pub fn restore_as_zeros(&self, chunk: &mut crate::message::Chunk, cause: String) {
        let offset = chunk.offset();
        let length = u64::from(chunk.disk.chunk_size).min(chunk.disk.size().saturating_sub(offset));
        tracing::debug!(disk = %chunk.disk.name(), offset, length, %cause, "Damaged chunk restored as zeros.");
        self.damaged.lock().unwrap().push(DamagedRange {
            disk: chunk.disk.name().to_owned(),
            offset,
            length,
            digest: chunk.digest.map(|d| d.to_string()),
            cause,
        });
        chunk.payload = crate::message::Payload::Zero { count: 1 };
    }

    /// [`RunContext::reload_chunk`] into `chunk`'s payload; when no copy is readable and the run
    /// allows damage, the chunk becomes zeros and is recorded instead of failing the run.
    pub fn reload_or_zero(
        &self,
        chunk: &mut crate::message::Chunk,
        why: &str,
    ) -> Result<(), StageError> {
        match self.reload_chunk(chunk, why) {
            Ok(plain) => chunk.payload = crate::message::Payload::Raw(plain),
            Err(e) if self.damage_allowed() => self.restore_as_zeros(chunk, e.to_string()),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The ranges restored as zeros so far, sorted by disk and offset.
    pub fn damaged_ranges(&self) -> Vec<DamagedRange> {
        let mut ranges = self.damaged.lock().unwrap().clone();
        ranges.sort_by(|a, b| (&a.disk, a.offset).cmp(&(&b.disk, b.offset)));
        ranges
    }

    pub fn warn(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!("{message}");
        self.warnings.lock().unwrap().push(message);
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap().clone()
    }

    /// A note for the report: worth knowing, nothing wrong (a backup that is crash-consistent
    /// because the VM has no guest agent). Unlike a warning it makes no session a `warning`, and
    /// so mails no one.
    pub fn note(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::info!("{message}");
        self.notes.lock().unwrap().push(message);
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::CancelToken;

    #[test]
    fn a_child_follows_its_parent_but_not_the_other_way() {
        let parent = CancelToken::new();
        let (a, b) = (parent.child(), parent.child());
        a.cancel();
        assert!(a.is_cancelled());
        assert!(!parent.is_cancelled() && !b.is_cancelled());
        parent.cancel();
        assert!(b.is_cancelled() && b.clone().is_cancelled());
    }
}
