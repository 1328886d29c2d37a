//! Email notifications of backup job sessions, over SMTP.
//!
//! When a job session ends, the job runner hands its [`Session`] (one [`VmReport`] per VM) to
//! [`notify`] together with the job's [`SmtpConfig`]. One plain-text message goes to every
//! recipient of `to`.
//!
//! # What is sent
//! - The subject states the job, the outcome and the count behind it, so a mailbox listing is
//!   enough: `[backflow] job nightly: failure (1 of 3 VMs failed)`,
//!   `[backflow] job nightly: warning (2 of 3 VMs with warnings)`,
//!   `[backflow] job nightly: success (3 VMs backed up)`.
//! - The body gives the start and end (UTC) and a table with one row per VM: result, restore point
//!   written, bytes read from the disks, bytes added to the repository, duration and the stage that
//!   limited throughput. Every error, warning and note follows in full, under its VM's name
//!   (notes, such as a crash-consistent backup, never make a VM's result a warning). See
//!   [`render`]; the same text can be printed or attached elsewhere.
//!
//! # When
//! The session's outcome is the worst of its VMs' results: `failure` when any VM failed, `warning`
//! when any warned, `success` otherwise (a session that covered no VM is a `warning`). A message is
//! sent when that outcome is listed in `when`, by default `[warning, failure]` so quiet nights stay
//! quiet; `[success, warning, failure]` also confirms every good night ([`should_send`]).
//!
//! # Failure policy
//! A report that cannot be mailed never fails the backup. [`notify`] logs the failure at `warn`
//! level (with the server, port and the step that failed) and returns; the restore points are
//! written either way. [`send`] is the same without the filter and with the error returned, for a
//! "send a test message" command. Each network step waits at most `timeout` seconds, so an
//! unreachable server delays the end of the job by a bounded time. There is no retry and no queue:
//! the next session reports again.
//!
//! # Security
//! `security: starttls` (the default, port 587) upgrades the connection before anything else is
//! said and refuses a server that does not offer STARTTLS, rather than sending in clear;
//! `tls` (port 465) speaks TLS from the first byte; `none` (port 25) is for a relay on the same host.
//! Certificates are checked against the built-in web roots (`webpki-roots`) plus `ca_file`. The
//! password, given inline or, better, in `password_file`, appears in no log and no error.
//!
//! ```yaml
//! smtp:
//!   server: mail.example.com
//!   username: backflow
//!   password_file: /etc/backflow/smtp-password
//!   from: "Backflow <backflow@example.com>"
//!   to: [ops@example.com]
//!   when: [warning, failure]
//! ```
//!
//! # Layout
//! - `config`: [`SmtpConfig`], the job file's `smtp` section.
//! - `session`: [`Session`], [`VmReport`] and [`Outcome`], what a session did.
//! - `render`: subject and body text.
//! - `send`: the SMTP conversation, one step at a time so errors name the step.
//! - `error`: [`NotifyError`] and its policy.

mod config;
mod error;
mod render;
mod send;
mod session;

pub use config::{DEFAULT_TIMEOUT_SECS, Secret, Security, SmtpConfig};
pub use error::{NotifyError, Result};
pub use render::{bytes, duration, render, utc};
pub use send::send;
pub use session::{Outcome, Session, VmReport};

/// Whether a session that ended with `outcome` is to be mailed under `config`.
pub fn should_send(config: &SmtpConfig, outcome: Outcome) -> bool {
    config.when.contains(&outcome)
}

/// Mails the report of `session` when its outcome is listed in `when`; logs, never returns, a
/// failure to do so. Returns whether a message was accepted by the server, for the caller's own
/// summary; a backup must not depend on it.
pub fn notify(config: &SmtpConfig, session: &Session) -> bool {
    let outcome = session.outcome();
    if !should_send(config, outcome) {
        tracing::debug!(job = %session.job, %outcome, "no notification: outcome not in `when`");
        return false;
    }
    match send(config, session) {
        Ok(()) => {
            tracing::info!(
                job = %session.job,
                %outcome,
                server = %config.server,
                port = config.port(),
                recipients = config.to.len(),
                "notification sent"
            );
            true
        }
        Err(error) => {
            tracing::warn!(
                job = %session.job,
                %outcome,
                transient = error.is_transient(),
                "notification not sent (the backup is unaffected): {error}"
            );
            false
        }
    }
}
