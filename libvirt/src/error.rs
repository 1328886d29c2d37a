//! Errors of the libvirt connector.
//!
//! # Policy
//! - Every fallible function returns [`LibvirtError`]; no `anyhow`, so callers (the CLI, later the job
//!   runner) can match on what went wrong: a daemon that does not answer, a VM that does not exist, a call
//!   libvirt refused, a definition we cannot read.
//! - Every message names the connection URI and, where there is one, the VM and the libvirt call that
//!   failed. libvirt's own message is part of ours; its error code and domain are kept in the value
//!   ([`virt::error::Error`]) for callers that need them, not printed.
//! - Nothing libvirt returns is trusted to be well formed: a domain XML we cannot parse is
//!   [`LibvirtError::Xml`], never a panic.
//! - [`LibvirtError::is_retryable`] says whether trying again later, without anyone changing the
//!   configuration, can succeed: a daemon that does not answer (yet), a connection that broke. A VM that
//!   does not exist, a refused call or a bad definition is not; nor is a name already taken.

use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};

/// Result alias of this crate.
pub type Result<T, E = LibvirtError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Opening the connection failed. `unreachable` when no daemon answered at the URI (its socket
    /// is missing or refuses connections, or the remote transport failed): retryable.
    #[error("{}", connect_message(uri, *unreachable, cause))]
    Connect {
        uri: String,
        unreachable: bool,
        cause: VirtError,
    },

    /// No domain of that name on this connection (never defined, or undefined meanwhile).
    #[error("{uri}: no VM named `{name}`")]
    NoSuchVm { uri: String, name: String },

    /// A libvirt call failed. `vm` is the VM it was about, when there is one.
    #[error("{uri}: {call}{}: {}", vm.as_deref().map(|v| format!(" of VM `{v}`")).unwrap_or_default(), cause.message())]
    Call {
        uri: String,
        vm: Option<String>,
        /// The libvirt function, e.g. `virDomainGetXMLDesc`.
        call: &'static str,
        cause: VirtError,
    },

    /// An argument libvirt cannot take (a string holding a NUL byte), refused before `call`.
    #[error("{uri}: {call}{}: {detail}", vm.as_deref().map(|v| format!(" of VM `{v}`")).unwrap_or_default())]
    Argument {
        uri: String,
        vm: Option<String>,
        call: &'static str,
        detail: String,
    },

    /// The domain XML libvirt returned is not what its schema promises.
    #[error("{uri}: VM `{vm}`: cannot read the domain XML: {detail}")]
    Xml {
        uri: String,
        vm: String,
        detail: String,
    },

    /// A domain of that name exists already: defining another would replace or clash with it.
    #[error("{uri}: a VM named `{name}` exists already; choose another name for the new one")]
    VmExists { uri: String, name: String },

    /// A backed-up definition that cannot become a new domain's (see [`crate::define`]).
    #[error("cannot make a new domain from the backed-up definition: {0}")]
    Definition(#[from] crate::define::DefinitionError),
}

impl LibvirtError {
    /// Whether repeating the operation later can succeed without a configuration change.
    pub fn is_retryable(&self) -> bool {
        match self {
            LibvirtError::Connect { unreachable, .. } => *unreachable,
            LibvirtError::Call { cause, .. } => is_transport(cause),
            LibvirtError::NoSuchVm { .. }
            | LibvirtError::Xml { .. }
            | LibvirtError::Argument { .. }
            | LibvirtError::VmExists { .. }
            | LibvirtError::Definition(_) => false,
        }
    }

    /// The libvirt error behind this one, for callers that match on its code.
    pub fn libvirt_error(&self) -> Option<&VirtError> {
        match self {
            LibvirtError::Connect { cause, .. } | LibvirtError::Call { cause, .. } => Some(cause),
            LibvirtError::NoSuchVm { .. }
            | LibvirtError::Xml { .. }
            | LibvirtError::Argument { .. }
            | LibvirtError::VmExists { .. }
            | LibvirtError::Definition(_) => None,
        }
    }
}

fn connect_message(uri: &str, unreachable: bool, cause: &VirtError) -> String {
    if unreachable {
        format!(
            "libvirtd does not answer at {uri} (is it running, and is its socket reachable?): {}",
            cause.message()
        )
    } else {
        format!("cannot connect to libvirt at {uri}: {}", cause.message())
    }
}

/// Errors of libvirt's RPC layer: the client could not reach the daemon, or lost it.
pub(crate) fn is_transport(e: &VirtError) -> bool {
    e.domain().is_known_and(|d| d == ErrorDomain::Rpc)
        || e.code().is_known_and(|c| c == ErrorNumber::Rpc)
}

pub(crate) fn is_no_domain(e: &VirtError) -> bool {
    e.code().is_known_and(|c| c == ErrorNumber::NoDomain)
}
