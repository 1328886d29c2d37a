//! Errors of stages and runs.
//!
//! Policy: libraries return typed errors (thiserror); only the binary and tests use anyhow. Each
//! error says whether retrying the run can help ([`StageError::is_retryable`]): I/O and repository
//! errors may be transient (a full disk freed, a lost connection back); bad data, bad options and
//! internal errors are not. Messages name the disk, file or chunk concerned so that one line on
//! stderr is enough to act on.

use backflow_repository::RepoError;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Reading or writing a file, device or socket failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The repository refused or failed an operation.
    #[error(transparent)]
    Repository(#[from] RepoError),
    /// Data read back does not match what was stored (damaged chunk, bad digest).
    #[error("{0}")]
    Corrupt(String),
    /// A stage was set up with options that cannot work (found only at run time).
    #[error("{0}")]
    Config(String),
    /// A bug: something validation should have excluded.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether running again may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            StageError::Io { .. } => true,
            StageError::Repository(e) => e.is_retryable(),
            StageError::Corrupt(_) | StageError::Config(_) | StageError::Internal(_) => false,
        }
    }
}
