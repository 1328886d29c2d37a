//! Errors of the NBD client.
//!
//! # Policy
//! - Every fallible function returns [`NbdError`]; no `anyhow`, so the backup pipeline can match on what went
//!   wrong (an export that does not exist, a dirty bitmap that is missing, a server that went away).
//! - Every message names the server (`unix:/run/backup.sock`, `tcp:127.0.0.1:10809`) and, where there is one,
//!   the option or command and the byte range.
//! - Whatever the server sends is untrusted: a malformed reply (wrong magic, unknown type, a length that does
//!   not match its type, an offset outside the request, a cookie we did not send, a payload larger than the
//!   request) is [`NbdError::Protocol`], never a panic. Every length is bounded before anything is allocated
//!   from it.
//! - After an I/O or protocol error in the middle of a reply the stream position is unknown, so the
//!   [`crate::Client`] refuses further requests with [`NbdError::Broken`]; open a new connection. A command
//!   error reported by the server ([`NbdError::Command`]) leaves the connection usable: with several
//!   requests in flight, the client sends no more and reads the replies of the others before returning it.
//! - [`NbdError::is_retryable`] says whether a new connection repeating the same operation can succeed without
//!   anyone changing the server's configuration: a timeout, a reset connection, a server shutting down.
//!   Protocol violations, refused options, missing exports or contexts and caller mistakes are not.

use std::io;

/// Result alias of this crate.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Connecting, reading or writing failed, including a read or write timeout and the server closing the
    /// connection mid-message (`UnexpectedEof`). Retryable when the kind is transient.
    #[error("cannot {op} NBD server {peer}: {source}")]
    Io {
        op: &'static str,
        peer: String,
        #[source]
        source: io::Error,
    },

    /// The server sent something the protocol does not allow. Not retryable: the server (or whatever
    /// listens on the socket) is broken or is not an NBD server.
    #[error("NBD server {peer} broke the protocol: {detail}")]
    Protocol { peer: String, detail: String },

    /// The server answered an option with an `NBD_REP_ERR_*` reply: the export does not exist
    /// (`NBD_REP_ERR_UNKNOWN`), TLS is required, policy forbids it. Retryable only for
    /// `NBD_REP_ERR_SHUTDOWN`.
    #[error("NBD server {peer} refused {option} for export {export:?} with {reply}{}", message_suffix(.message))]
    OptionRefused {
        peer: String,
        export: String,
        option: &'static str,
        reply: &'static str,
        code: u32,
        message: String,
    },

    /// A requested meta context (`base:allocation`, `qemu:dirty-bitmap:NAME`) was not granted: the bitmap
    /// does not exist or was not exported (`qemu-nbd -B`, libvirt's incremental backup). Not retryable.
    #[error("NBD server {peer} export {export:?} offers no meta context {context:?}{}", message_suffix(.reason))]
    MetaContextUnavailable {
        peer: String,
        export: String,
        context: String,
        reason: String,
    },

    /// The server reported an error for a command (an error chunk or a simple reply with an error). The
    /// connection stays usable. Retryable only for `ESHUTDOWN`.
    #[error("NBD server {peer} failed {command} at offset {offset} length {length}: {} ({errno}){}",
        crate::proto::errno_name(*.errno), message_suffix(.message))]
    Command {
        peer: String,
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    },

    /// An earlier I/O or protocol error left the stream at an unknown position. Retryable: connect again.
    #[error("connection to NBD server {peer} is unusable after an earlier error: {reason}")]
    Broken { peer: String, reason: String },

    /// A write, write zeroes or trim to an export the server offers read-only (`NBD_FLAG_READ_ONLY`). Refused
    /// before anything is sent; the connection stays usable. Not retryable: the server must be started
    /// writable.
    #[error("NBD server {peer} exports {export:?} read-only: refusing {command}")]
    ReadOnly {
        peer: String,
        export: String,
        command: &'static str,
    },

    /// TLS was required and the server answered `NBD_OPT_STARTTLS` with an error: it offers no TLS
    /// (`NBD_REP_ERR_POLICY` from a QEMU without `--tls-creds`, `NBD_REP_ERR_UNSUP` from an older
    /// server). The client closes the connection and never falls back to plain text. Not retryable.
    #[error("the server at {peer} refused STARTTLS: {reply}{}; TLS was required, so the connection is closed rather than continued in plain text",
        message_suffix(.message))]
    StartTlsRefused {
        peer: String,
        reply: &'static str,
        message: String,
    },

    /// The server requires TLS (`NBD_REP_ERR_TLS_REQD`) and the client was connected without TLS
    /// settings. Not retryable: configure the CA, certificate and key.
    #[error(
        "NBD server {peer} requires TLS (it answered {option} with NBD_REP_ERR_TLS_REQD); connect with TLS settings: the CA certificate and a client certificate and key"
    )]
    TlsRequired { peer: String, option: &'static str },

    /// The TLS handshake failed, or the server ended the session right after it: a certificate
    /// that does not verify against the CA (`detail` names the CA file and the expected name), a
    /// server refusing our client certificate or its absence. Not retryable.
    #[error("TLS with NBD server {peer} (verified as {server_name:?}) failed: {detail}")]
    Tls {
        peer: String,
        server_name: String,
        detail: String,
    },

    /// The TLS handshake did not finish within its bound. Retryable: the server may be overloaded.
    #[error("TLS with NBD server {peer} failed: the handshake did not finish within {timeout:?}")]
    TlsHandshakeTimeout {
        peer: String,
        timeout: std::time::Duration,
    },

    /// A TLS file (CA, certificate, key) cannot be read or used. Not retryable.
    #[error("TLS file {}: {detail}", .path.display())]
    TlsSetup {
        path: std::path::PathBuf,
        detail: String,
    },

    /// The caller asked for something impossible: a range past the end of the export, a context that was not
    /// negotiated at connect time. Not retryable: a bug or a bad option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl NbdError {
    /// Whether a new connection repeating the same operation can succeed without changing the server.
    pub fn is_retryable(&self) -> bool {
        match self {
            NbdError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            NbdError::OptionRefused { code, .. } => *code == crate::proto::REP_ERR_SHUTDOWN,
            NbdError::Command { errno, .. } => *errno == crate::proto::ESHUTDOWN,
            NbdError::Broken { .. } | NbdError::TlsHandshakeTimeout { .. } => true,
            NbdError::StartTlsRefused { .. }
            | NbdError::TlsRequired { .. }
            | NbdError::Tls { .. }
            | NbdError::TlsSetup { .. } => false,
            NbdError::Protocol { .. }
            | NbdError::MetaContextUnavailable { .. }
            | NbdError::ReadOnly { .. }
            | NbdError::InvalidArgument(_) => false,
        }
    }

    /// Whether the stream may be mid-message after this error, so the connection must not be reused.
    pub(crate) fn desynchronises(&self) -> bool {
        matches!(self, NbdError::Io { .. } | NbdError::Protocol { .. })
    }
}
