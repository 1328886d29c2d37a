//! Notification settings, as a job file states them.

use std::path::PathBuf;

use serde::Deserialize;

use crate::Outcome;

/// Seconds a network step may take when the job file does not say (`timeout`).
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// How the connection to the server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain SMTP, nothing encrypted (port 25). Only for a relay on the same host or network.
    None,
    /// Plain connection upgraded with STARTTLS before anything else is sent (port 587). A server
    /// that does not offer STARTTLS is an error, never a fallback to clear text.
    #[default]
    Starttls,
    /// TLS from the first byte, "SMTPS" (port 465).
    Tls,
}

impl Security {
    /// The port of this kind of submission when the job file names none.
    pub fn default_port(self) -> u16 {
        match self {
            Security::None => 25,
            Security::Starttls => 587,
            Security::Tls => 465,
        }
    }
}

/// The `smtp` section of a job file: where to send reports of its sessions, and which.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Host name or address of the mail server. Also the name its TLS certificate must carry.
    pub server: String,
    /// Defaults by `security`: 25, 587 (starttls) or 465 (tls).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub security: Security,
    /// Authenticates (PLAIN or LOGIN) when set; needs `password` or `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// Kept out of `Debug` output and every message. Prefer `password_file` so job files can be
    /// readable by more people than the password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (trailing newline ignored), read at each sending.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM certificates to trust besides the built-in web roots: a private CA, or a server's
    /// self-signed certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Sender, `backup@example.com` or `Backflow <backup@example.com>`.
    pub from: String,
    /// Recipients, in the same forms as `from`. At least one.
    pub to: Vec<String>,
    /// Seconds each network step (connect, each reply) may take.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// Which session outcomes are mailed. The default leaves quiet nights quiet.
    #[serde(default = "default_when")]
    pub when: Vec<Outcome>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

fn default_when() -> Vec<Outcome> {
    vec![Outcome::Warning, Outcome::Failure]
}

impl SmtpConfig {
    /// Settings with the defaults of a job file that names only server, sender and recipients.
    pub fn new(server: impl Into<String>, from: impl Into<String>, to: Vec<String>) -> Self {
        SmtpConfig {
            server: server.into(),
            port: None,
            security: Security::default(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            from: from.into(),
            to,
            timeout: DEFAULT_TIMEOUT_SECS,
            when: default_when(),
        }
    }

    /// The port to connect to: the configured one, or the usual one of `security`.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or_else(|| self.security.default_port())
    }
}

/// A password: deserialises from a plain string, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The password itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
