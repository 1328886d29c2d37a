//! What can go wrong: a cluster file that cannot be used ([`ClusterError`]), and a host that
//! cannot be reached or checked ([`HostError`]).
//!
//! # Policy
//! - Typed errors, no `anyhow`: the command line maps a bad file to its exit code 2, and the job
//!   runner tells a host that does not answer (retry later, place its VMs elsewhere) from one
//!   that answers wrongly.
//! - A file's error names the file, and where known the line and column, the field and what was
//!   expected. A host's error names the host and what was tried (the URI, the ssh command's
//!   target), so that a report line needs nothing else.
//! - Nothing a host answers is trusted: a version line that is not `backflow X`, an ssh that
//!   never returns, are errors, never a panic or a hang.

use std::path::PathBuf;
use std::time::Duration;

/// A cluster file that cannot be read or is not a valid cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file cannot be read at all.
    #[error("{}: cannot read the cluster file: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file is no regular file, too large or not text.
    #[error("{}: the cluster file {detail}", file.display())]
    Input { file: PathBuf, detail: String },
    /// A mistake in the file: where it is (when known) and what was expected.
    #[error("{file}:{}{message}", at.map(|(l, c)| format!("{l}:{c}: ")).unwrap_or_else(|| " ".into()))]
    Invalid {
        file: String,
        /// Line and column, from 1.
        at: Option<(u64, u64)>,
        message: String,
    },
}

impl ClusterError {
    /// A mistake at `at` (line, column) of `file`.
    pub fn invalid(file: &str, at: Option<(u64, u64)>, message: impl Into<String>) -> ClusterError {
        ClusterError::Invalid {
            file: file.to_owned(),
            at,
            message: message.into(),
        }
    }
}

/// Why a host's libvirt or its worker access did not answer as it should. The host's name is
/// not part of the message: reports put it first.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Nothing came back in time: the host is down, cut off, or its daemon hangs. Retryable.
    #[error("{what} did not answer within {}", seconds(*after))]
    TimedOut { what: String, after: Duration },
    /// The host does not take TCP connections on the port of its libvirt transport: down, cut
    /// off, or its daemon (sshd) not running.
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    /// The thread that was to ask the host could not be started, or ended without an answer.
    #[error("{what} was not asked: no thread could ask it")]
    NoThread { what: String },
    /// libvirt refused or failed (its message names the URI; put on one line: libvirt's ssh
    /// transport passes on every line ssh printed).
    #[error("{}", one_line(&.0.to_string()))]
    Libvirt(Box<backflow_libvirt::LibvirtError>),
    /// A libvirt call on an open connection failed.
    #[error("{uri}: {call}: {message}")]
    LibvirtCall {
        uri: String,
        call: &'static str,
        message: String,
    },
    /// ssh could not log in: no route, refused, host key changed, key refused (ssh's exit 255).
    #[error("ssh {target} failed: {message}")]
    Ssh { target: String, message: String },
    /// ssh itself could not be started on this machine.
    #[error("cannot run ssh: {0}")]
    SshMissing(std::io::Error),
    /// The controller's own file (the ssh key) is missing: no point in asking the host.
    #[error("{what} {} does not exist", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    /// Logged in, but `BACKFLOW --version` did not answer with a version.
    #[error("`{command}` on the host {problem}")]
    Backflow { command: String, problem: String },
}

impl HostError {
    /// Whether trying again later, without changing the configuration, can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HostError::TimedOut { .. }
            | HostError::Unreachable { .. }
            | HostError::NoThread { .. } => true,
            HostError::Libvirt(e) => e.is_retryable(),
            // ssh says 255 for a network failure and for a refused key alike.
            HostError::Ssh { .. } | HostError::LibvirtCall { .. } => true,
            HostError::SshMissing(_)
            | HostError::MissingFile { .. }
            | HostError::Backflow { .. } => false,
        }
    }
}

impl From<backflow_libvirt::LibvirtError> for HostError {
    fn from(e: backflow_libvirt::LibvirtError) -> Self {
        HostError::Libvirt(Box::new(e))
    }
}

impl serde::Serialize for HostError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Lines joined with `; `, blank ones left out.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `10 s`, `2.5 s`.
pub(crate) fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
