//! What can go wrong with a job before or around its pipelines (a pipeline's own failures are in
//! its run report, not here). Each message is whole: it names the file, the job, the VM or the
//! repository, so that callers print it as it is.

use std::path::PathBuf;

/// A job that cannot be read, planned or recorded.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job file cannot be read at all.
    #[error("{}: cannot read the job file: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The job file is no regular file, too large or not text.
    #[error("{}: the job file {detail}", file.display())]
    Input { file: PathBuf, detail: String },
    /// A mistake in the job file: where it is (when known) and what was expected.
    #[error("{file}:{}{message}", at.map(|(l, c)| format!("{l}:{c}: ")).unwrap_or_else(|| " ".into()))]
    Invalid {
        file: String,
        /// Line and column, from 1.
        at: Option<(u64, u64)>,
        message: String,
    },
    /// The libvirt connection cannot be opened or listed (boxed: libvirt's errors are large,
    /// and every `Result` of this crate carries the size of its largest error).
    #[error("job {job}: {source}")]
    Libvirt {
        job: String,
        source: Box<backflow_libvirt::LibvirtError>,
    },
    /// An exact VM name of `vms` that no VM of the connection has (a typo must not back up
    /// nothing).
    #[error("job {job}: no VM named `{name}` on {uri} (its VMs: {existing})")]
    NoSuchVm {
        job: String,
        name: String,
        uri: String,
        existing: String,
    },
    /// `vms` selects no VM at all.
    #[error("job {job}: no VM on {uri} matches {patterns} (its VMs: {existing})")]
    NothingSelected {
        job: String,
        uri: String,
        patterns: String,
        existing: String,
    },
    /// `exclude_disks` leaves a selected VM without a disk.
    #[error("job {job}: every disk of VM {vm} is excluded ({disks}); exclude the VM instead")]
    EveryDiskExcluded {
        job: String,
        vm: String,
        disks: String,
    },
    /// `job run --vm NAME` names nothing the job backs up.
    #[error("job {job}: it does not back up {name}")]
    NotInJob { job: String, name: String },
    /// The job's cluster file cannot be read, or a cluster-wide step failed before any VM ran.
    #[error("job {job}: {detail}")]
    Cluster { job: String, detail: String },
    /// The job's repository cannot be opened, or a record written to it.
    #[error("{what}: {source}")]
    Repository {
        what: String,
        source: backflow_repository::RepoError,
    },
}

impl JobError {
    /// A mistake at `at` (line, column) of `file`.
    pub fn invalid(file: &str, at: Option<(u64, u64)>, message: impl Into<String>) -> JobError {
        JobError::Invalid {
            file: file.to_owned(),
            at,
            message: message.into(),
        }
    }
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;
