//! Errors of sending a notification.
//!
//! # Policy
//! - [`send`](crate::send) returns [`NotifyError`]; no `anyhow`, so a caller can tell a wrong
//!   configuration from a mail server that is down. [`notify`](crate::notify) never returns one: it
//!   logs it, because a backup must not fail when its report cannot be mailed.
//! - Every error of a conversation names the server as `host:port` and the step that failed:
//!   connecting, TLS, authentication, the sender, a recipient or the message. The SMTP library's
//!   message is part of ours; its value is kept in the variant for callers that need the reply code.
//! - No message ever contains the password, nor the password file's contents.
//! - [`NotifyError::is_transient`] says whether trying again later, with the same configuration, can
//!   succeed: a server that does not answer (yet), a connection that broke, a 4xx reply. A wrong
//!   address, a rejected password or a certificate we do not trust is not.

use std::path::PathBuf;

use lettre::transport::smtp::Error as SmtpError;

/// Result alias of this crate.
pub type Result<T, E = NotifyError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The configuration cannot describe a message: an address that does not parse, no
    /// recipient, both `password` and `password_file`, a username without a password.
    #[error("invalid notification settings: {0}")]
    Config(String),

    /// The password file could not be read. Only its path is named, never its contents.
    #[error("cannot read the SMTP password file {}: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The CA file (`ca_file`) could not be read or holds no PEM certificate.
    #[error("cannot use the CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },

    /// No TCP connection, or no greeting, within the timeout: the server is down, the port is
    /// closed or filtered, or the name does not resolve.
    #[error("cannot connect to SMTP server {server}:{port}: {cause}")]
    Connect {
        server: String,
        port: u16,
        cause: SmtpError,
    },

    /// The TLS handshake (implicit TLS, or after STARTTLS) failed: an untrusted or expired
    /// certificate, a name that does not match, no common protocol version.
    #[error("TLS with SMTP server {server}:{port} failed: {cause}")]
    Tls {
        server: String,
        port: u16,
        cause: SmtpError,
    },

    /// `security: starttls` but the server does not offer STARTTLS. We do not fall back to
    /// sending in clear.
    #[error(
        "SMTP server {server}:{port} does not offer STARTTLS (security: starttls); not sending in clear"
    )]
    StartTlsUnavailable { server: String, port: u16 },

    /// The server refused the credentials, or offers no mechanism we speak (PLAIN, LOGIN).
    #[error("authentication as `{username}` at SMTP server {server}:{port} failed: {cause}")]
    Auth {
        server: String,
        port: u16,
        username: String,
        cause: SmtpError,
    },

    /// The server refused a step of the transaction: `what` is `sender <a@b>`, `recipient <c@d>`
    /// or `message`.
    #[error("SMTP server {server}:{port} rejected the {what}: {cause}")]
    Rejected {
        server: String,
        port: u16,
        what: String,
        cause: SmtpError,
    },
}

impl NotifyError {
    /// Whether trying again later, without changing the configuration, can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Config(_) | Self::PasswordFile { .. } | Self::CaFile { .. } => false,
            Self::StartTlsUnavailable { .. } => false,
            Self::Connect { .. } => true,
            Self::Tls { cause, .. } => cause.is_timeout() || cause.is_transient(),
            Self::Auth { cause, .. } | Self::Rejected { cause, .. } => {
                cause.is_transient() || cause.is_timeout() || cause.is_transport_shutdown()
            }
        }
    }
}
