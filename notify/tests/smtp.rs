//! Notifications sent to a real SMTP server on loopback (aiosmtpd), read back and checked.
//! These tests fail, not skip, when aiosmtpd is missing: see `backflow_testkit::smtp`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backflow_notify::{
    NotifyError, Outcome, Secret, Security, Session, SmtpConfig, VmReport, notify, send,
    should_send,
};
use backflow_testkit::smtp::{Options, SmtpServer, free_port};
use serde_json::Value;

fn vm(name: &str, result: Outcome) -> VmReport {
    let mut vm = VmReport::new(name, result);
    vm.duration = Duration::from_secs(42);
    vm
}

fn success_session() -> Session {
    let mut web = vm("web01", Outcome::Success);
    web.snapshot = Some("a1b2c3d4".into());
    web.bytes_read = 3 << 30;
    web.bytes_written = 512 << 20;
    web.bottleneck = Some("reader".into());
    let mut db = vm("db01", Outcome::Success);
    db.snapshot = Some("e5f6a7b8".into());
    db.bytes_read = 1 << 30;
    db.bytes_written = 64 << 20;
    Session {
        job: "nightly".into(),
        started: 1_795_800_148,
        ended: 1_795_800_148 + 600,
        vms: vec![web, db],
    }
}

fn failure_session() -> Session {
    let mut web = vm("web01", Outcome::Success);
    web.snapshot = Some("a1b2c3d4".into());
    let mut app = vm("app01", Outcome::Warning);
    app.snapshot = Some("99887766".into());
    app.warnings = vec!["no checkpoint of the last backup: read the whole disk".into()];
    let mut db = vm("db01", Outcome::Failure);
    db.error = Some("libvirt: qemu:///system: backupBegin of VM `db01` failed: timed out".into());
    Session {
        job: "nightly".into(),
        started: 1_795_800_148,
        ended: 1_795_800_148 + 900,
        vms: vec![web, app, db],
    }
}

fn config(port: u16, when: &[Outcome]) -> SmtpConfig {
    let mut config = SmtpConfig::new(
        "127.0.0.1",
        "Backflow <backflow@example.org>",
        vec![
            "ops@example.org".into(),
            "Oncall <oncall@example.org>".into(),
        ],
    );
    config.port = Some(port);
    config.security = Security::None;
    config.timeout = 5;
    config.when = when.to_vec();
    config
}

fn text<'a>(message: &'a Value, field: &str) -> &'a str {
    message[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {message:#}"))
}

#[test]
fn success_and_failure_reports_arrive_with_their_rows_and_errors() {
    let server = SmtpServer::start(Options::default());
    let config = config(server.port, &[Outcome::Success, Outcome::Failure]);

    assert!(notify(&config, &success_session()));
    send(&config, &failure_session()).expect("send the failure report");

    let messages = server.messages();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    for message in &messages {
        assert_eq!(text(message, "mail_from"), "backflow@example.org");
        assert_eq!(
            message["rcpt_tos"],
            serde_json::json!(["ops@example.org", "oncall@example.org"])
        );
        assert_eq!(text(message, "content_type"), "text/plain");
        assert!(text(message, "from").contains("backflow@example.org"));
        assert!(text(message, "to").contains("Oncall <oncall@example.org>"));
        assert_eq!(message["tls"], false);
    }

    let success = &messages[0];
    assert_eq!(
        text(success, "subject"),
        "[backflow] job nightly: success (2 VMs backed up)"
    );
    let body = text(success, "body");
    assert!(body.contains("Started:  2026-11-27 17:22:28 UTC"), "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("web01  success  a1b2c3d4")
                && l.contains("3.0 GiB")
                && l.contains("512.0 MiB")
                && l.ends_with("reader")),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("db01   success  e5f6a7b8")),
        "{body}"
    );
    assert!(!body.contains("Errors:"), "{body}");

    let failure = &messages[1];
    assert_eq!(
        text(failure, "subject"),
        "[backflow] job nightly: failure (1 of 3 VMs failed)"
    );
    let body = text(failure, "body");
    assert!(
        body.contains("VMs:      3 total, 1 succeeded, 1 with warnings, 1 failed"),
        "{body}"
    );
    for row in [
        "web01  success  a1b2c3d4",
        "app01  warning  99887766",
        "db01   failure  -",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(row)),
            "no row `{row}` in\n{body}"
        );
    }
    assert!(
        body.contains(
            "Errors:\n  db01: libvirt: qemu:///system: backupBegin of VM `db01` failed: timed out\n"
        ),
        "{body}"
    );
    assert!(
        body.contains(
            "Warnings:\n  app01: no checkpoint of the last backup: read the whole disk\n"
        ),
        "{body}"
    );
}

#[test]
fn only_the_outcomes_listed_in_when_are_sent() {
    let server = SmtpServer::start(Options::default());
    let config = config(server.port, &[Outcome::Failure]);
    assert!(!should_send(&config, Outcome::Success));
    assert!(!should_send(&config, Outcome::Warning));
    assert!(should_send(&config, Outcome::Failure));

    assert!(
        !notify(&config, &success_session()),
        "success is not in `when`"
    );
    assert!(notify(&config, &failure_session()));
    let messages = server.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert!(text(&messages[0], "subject").ends_with("failure (1 of 3 VMs failed)"));

    // The default is warnings and failures.
    let default = SmtpConfig::new("h", "a@b.c", vec!["d@e.f".into()]);
    assert!(!should_send(&default, Outcome::Success));
    assert!(should_send(&default, Outcome::Warning));
    assert!(should_send(&default, Outcome::Failure));
}

/// Collects what `tracing` writes, to check that `notify` logged its failure.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let value = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    (value, text)
}

#[test]
fn an_unreachable_server_is_logged_and_never_fails_the_caller() {
    let port = free_port(); // closed: nothing listens there
    let config = config(port, &[Outcome::Failure]);

    let start = Instant::now();
    let error = send(&config, &failure_session()).unwrap_err();
    assert!(matches!(error, NotifyError::Connect { .. }), "{error:?}");
    assert!(error.is_transient());
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("cannot connect to SMTP server 127.0.0.1:{port}: ")),
        "{message}"
    );

    let (sent, logs) = with_logs(|| notify(&config, &failure_session()));
    assert!(!sent);
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("notification not sent"), "{logs}");
    assert!(logs.contains(&format!("127.0.0.1:{port}")), "{logs}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_server_that_never_answers_times_out() {
    // Accepts connections (the kernel does, from the backlog) but never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = config(port, &[Outcome::Failure]);
    config.timeout = 1;

    let start = Instant::now();
    let (sent, logs) = with_logs(|| notify(&config, &failure_session()));
    let elapsed = start.elapsed();
    assert!(!sent);
    assert!(
        logs.contains(&format!("cannot connect to SMTP server 127.0.0.1:{port}")),
        "{logs}"
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    drop(listener);
}

#[test]
fn a_rejected_recipient_is_named() {
    let server = SmtpServer::start(Options::default());
    let mut config = config(server.port, &[Outcome::Failure]);
    // The test server refuses every mailbox of this domain (550).
    config.to = vec!["ops@example.org".into(), "nobody@rejected.invalid".into()];
    let error = send(&config, &failure_session()).unwrap_err();
    assert!(matches!(error, NotifyError::Rejected { .. }), "{error:?}");
    assert!(!error.is_transient());
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "SMTP server 127.0.0.1:{} rejected the recipient <nobody@rejected.invalid>: ",
            server.port
        )),
        "{text}"
    );
    assert!(text.contains("No such mailbox here"), "{text}");
    assert!(server.messages().is_empty());

    // notify() logs the same and returns.
    let (sent, logs) = with_logs(|| notify(&config, &failure_session()));
    assert!(!sent);
    assert!(
        logs.contains("rejected the recipient <nobody@rejected.invalid>"),
        "{logs}"
    );
}

/// A self-signed certificate for 127.0.0.1 and localhost, as PEM files in `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn tls_config(port: u16, security: Security, ca: Option<PathBuf>) -> SmtpConfig {
    let mut config = config(
        port,
        &[Outcome::Success, Outcome::Warning, Outcome::Failure],
    );
    config.security = security;
    config.ca_file = ca;
    config
}

#[test]
fn starttls_with_authentication_from_a_password_file() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certs.path());
    let server = SmtpServer::start(Options {
        starttls: Some((&cert, &key)),
        auth: Some("backflow:s3cret-pw"),
        ..Options::default()
    });
    let password_file = server.scratch().join("password");
    let mut file = std::fs::File::create(&password_file).unwrap();
    writeln!(file, "s3cret-pw").unwrap();

    let mut config = tls_config(server.port, Security::Starttls, Some(cert.clone()));
    config.username = Some("backflow".into());
    config.password_file = Some(password_file);
    send(&config, &failure_session()).expect("send over STARTTLS with AUTH");
    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["tls"], true);
    assert_eq!(messages[0]["authenticated"], true);
    assert!(text(&messages[0], "body").contains("db01   failure"));

    // A wrong password: an authentication error naming the user and server, not the password.
    config.password_file = None;
    config.password = Some(Secret::new("wrong-pw"));
    let error = send(&config, &failure_session()).unwrap_err();
    assert!(matches!(error, NotifyError::Auth { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "authentication as `backflow` at SMTP server 127.0.0.1:{}",
            server.port
        )),
        "{text}"
    );
    assert!(!text.contains("wrong-pw") && !format!("{error:?}").contains("wrong-pw"));
    assert!(!format!("{config:?}").contains("wrong-pw"));
    assert!(!error.is_transient());

    // Without the self-signed certificate among the roots, TLS refuses the server.
    let mut untrusting = config.clone();
    untrusting.ca_file = None;
    let error = send(&untrusting, &failure_session()).unwrap_err();
    assert!(matches!(error, NotifyError::Tls { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with(&format!(
            "TLS with SMTP server 127.0.0.1:{} failed",
            server.port
        )),
        "{error}"
    );
    assert_eq!(server.messages().len(), 1);
}

#[test]
fn starttls_is_required_when_configured() {
    let server = SmtpServer::start(Options::default()); // offers no STARTTLS
    let config = tls_config(server.port, Security::Starttls, None);
    let error = send(&config, &success_session()).unwrap_err();
    assert!(
        matches!(error, NotifyError::StartTlsUnavailable { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("127.0.0.1:{}", server.port))
    );
    assert!(server.messages().is_empty(), "nothing is sent in clear");
}

#[test]
fn implicit_tls() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certs.path());
    let server = SmtpServer::start(Options {
        smtps: Some((&cert, &key)),
        ..Options::default()
    });
    let config = tls_config(server.port, Security::Tls, Some(cert));
    send(&config, &success_session()).expect("send over implicit TLS");
    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        text(&messages[0], "subject"),
        "[backflow] job nightly: success (2 VMs backed up)"
    );
}
