//! One SMTP conversation per notification, step by step, so a failure names the step.
//!
//! lettre's `SmtpTransport::send` reports any failure as one error; we drive its
//! [`SmtpConnection`] ourselves (connect, STARTTLS, AUTH, MAIL, RCPT each, DATA) so that the error
//! says whether the server was unreachable, the certificate untrusted, the password wrong or a
//! recipient refused.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, SmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, MailBodyParameter, MailParameter};

use crate::config::{Security, SmtpConfig};
use crate::error::{NotifyError, Result};
use crate::{Session, render};

/// Sends the report of `session` now, whatever `when` says. Blocks for at most a few times
/// `config.timeout` (connect, then each reply).
pub fn send(config: &SmtpConfig, session: &Session) -> Result<()> {
    let (subject, body) = render(session);
    let message = build_message(config, subject, body)?;
    let password = password(config)?;
    let tls = tls_parameters(config)?;
    Conversation::new(config).run(&message, password.as_deref(), tls.as_ref())
}

fn build_message(config: &SmtpConfig, subject: String, body: String) -> Result<Message> {
    let from: Mailbox = config
        .from
        .parse()
        .map_err(|e| NotifyError::Config(format!("sender `{}`: {e}", config.from)))?;
    if config.to.is_empty() {
        return Err(NotifyError::Config("no recipient (`to` is empty)".into()));
    }
    let mut builder = Message::builder().from(from).subject(subject);
    for to in &config.to {
        let to: Mailbox = to
            .parse()
            .map_err(|e| NotifyError::Config(format!("recipient `{to}`: {e}")))?;
        builder = builder.to(to);
    }
    builder
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| NotifyError::Config(format!("cannot build the message: {e}")))
}

/// The password to authenticate with, or `None` when no username is configured.
fn password(config: &SmtpConfig) -> Result<Option<String>> {
    match (&config.username, &config.password, &config.password_file) {
        (_, Some(_), Some(_)) => Err(NotifyError::Config(
            "both `password` and `password_file` are set; keep one".into(),
        )),
        (None, Some(_), None) | (None, None, Some(_)) => Err(NotifyError::Config(
            "a password is set but no `username`".into(),
        )),
        (None, None, None) => Ok(None),
        (Some(user), None, None) => Err(NotifyError::Config(format!(
            "`username: {user}` needs `password` or `password_file`"
        ))),
        (Some(_), Some(password), None) => Ok(Some(password.expose().to_owned())),
        (Some(_), None, Some(path)) => {
            let text = read_small_file(path)
                .and_then(|b| String::from_utf8(b).map_err(std::io::Error::other))
                .map_err(|source| NotifyError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()))
        }
    }
}

/// Largest password or CA file read, in bytes: far above any real one.
const MAX_SECRET_FILE_SIZE: u64 = 1 << 20;

/// Reads a password or CA file: a regular file (checked before it is opened, so that a FIFO cannot
/// block the mail, and the session with it) of at most [`MAX_SECRET_FILE_SIZE`] bytes.
fn read_small_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE_SIZE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_SIZE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {MAX_SECRET_FILE_SIZE} bytes"),
        ));
    }
    Ok(bytes)
}

fn tls_parameters(config: &SmtpConfig) -> Result<Option<TlsParameters>> {
    if config.security == Security::None {
        return Ok(None);
    }
    let mut builder = TlsParameters::builder(config.server.clone());
    if let Some(path) = &config.ca_file {
        let ca_error = |reason: String| NotifyError::CaFile {
            path: path.clone(),
            reason,
        };
        let pem = read_small_file(path).map_err(|e| ca_error(e.to_string()))?;
        let cert = Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))?;
        builder = builder.add_root_certificate(cert);
    }
    let parameters = builder.build().map_err(|cause| NotifyError::Tls {
        server: config.server.clone(),
        port: config.port(),
        cause,
    })?;
    Ok(Some(parameters))
}

struct Conversation<'a> {
    config: &'a SmtpConfig,
    port: u16,
    hello: ClientId,
}

impl<'a> Conversation<'a> {
    fn new(config: &'a SmtpConfig) -> Self {
        Conversation {
            config,
            port: config.port(),
            hello: ClientId::default(),
        }
    }

    fn server(&self) -> String {
        self.config.server.clone()
    }

    fn run(
        &self,
        message: &Message,
        password: Option<&str>,
        tls: Option<&TlsParameters>,
    ) -> Result<()> {
        let timeout = Some(Duration::from_secs(self.config.timeout.max(1)));
        // Implicit TLS wraps the socket at connect; STARTTLS upgrades it after the greeting.
        let implicit = tls.filter(|_| self.config.security == Security::Tls);
        let mut conn = SmtpConnection::connect(
            (self.config.server.as_str(), self.port),
            timeout,
            &self.hello,
            implicit,
            None,
        )
        .map_err(|cause| {
            if cause.is_tls() {
                NotifyError::Tls {
                    server: self.server(),
                    port: self.port,
                    cause,
                }
            } else {
                NotifyError::Connect {
                    server: self.server(),
                    port: self.port,
                    cause,
                }
            }
        })?;
        let result = self.converse(&mut conn, message, password, tls);
        match result {
            Ok(()) => {
                // The message is accepted; a failed goodbye changes nothing.
                let _ = conn.quit();
            }
            Err(_) => conn.abort(),
        }
        result
    }

    fn converse(
        &self,
        conn: &mut SmtpConnection,
        message: &Message,
        password: Option<&str>,
        tls: Option<&TlsParameters>,
    ) -> Result<()> {
        if self.config.security == Security::Starttls {
            if !conn.can_starttls() {
                return Err(NotifyError::StartTlsUnavailable {
                    server: self.server(),
                    port: self.port,
                });
            }
            // Built for every security but `none`; a missing one is reported, not unwrapped.
            let Some(tls) = tls else {
                return Err(NotifyError::Config(
                    "STARTTLS without TLS parameters".into(),
                ));
            };
            conn.starttls(tls, &self.hello)
                .map_err(|cause| NotifyError::Tls {
                    server: self.server(),
                    port: self.port,
                    cause,
                })?;
        }
        if let (Some(username), Some(password)) = (&self.config.username, password) {
            let credentials = Credentials::new(username.clone(), password.to_owned());
            conn.auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .map_err(|cause| NotifyError::Auth {
                    server: self.server(),
                    port: self.port,
                    username: username.clone(),
                    cause,
                })?;
        }

        let envelope = message.envelope();
        let email = message.formatted();
        let rejected = |what: String| {
            move |cause| NotifyError::Rejected {
                server: self.server(),
                port: self.port,
                what,
                cause,
            }
        };
        let sender = envelope.from().cloned();
        let mut parameters = Vec::new();
        if !email.is_ascii() {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        conn.command(Mail::new(sender.clone(), parameters))
            .map_err(rejected(format!(
                "sender <{}>",
                sender.map(|a| a.to_string()).unwrap_or_default()
            )))?;
        for recipient in envelope.to() {
            conn.command(Rcpt::new(recipient.clone(), Vec::new()))
                .map_err(rejected(format!("recipient <{recipient}>")))?;
        }
        conn.command(Data).map_err(rejected("message".into()))?;
        conn.message(&email).map_err(rejected("message".into()))?;
        Ok(())
    }
}
