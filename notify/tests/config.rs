//! The `smtp` section of a job file: defaults, refusals, and secrets kept out of output.

use std::path::PathBuf;
use std::time::Duration;

use backflow_notify::{
    NotifyError, Outcome, Secret, Security, Session, SmtpConfig, VmReport, render, send,
};

fn parse(yaml: &str) -> Result<SmtpConfig, serde_saphyr::Error> {
    serde_saphyr::from_str(yaml)
}

#[test]
fn a_minimal_section_gets_the_documented_defaults() {
    let config =
        parse("server: mail.example.org\nfrom: backflow@example.org\nto: [ops@example.org]\n")
            .unwrap();
    assert_eq!(config.security, Security::Starttls);
    assert_eq!(config.port(), 587);
    assert_eq!(config.timeout, 30);
    assert_eq!(config.when, [Outcome::Warning, Outcome::Failure]);
    assert_eq!(
        config,
        SmtpConfig::new(
            "mail.example.org",
            "backflow@example.org",
            vec!["ops@example.org".into()]
        )
    );
}

#[test]
fn every_field_parses_and_the_port_follows_security() {
    let config = parse(
        "server: smtp.example.org
security: tls
username: backflow
password_file: /etc/backflow/smtp-password
ca_file: /etc/backflow/ca.pem
from: Backflow <backflow@example.org>
to: [ops@example.org, Oncall <oncall@example.org>]
timeout: 10
when: [success, warning, failure]
",
    )
    .unwrap();
    assert_eq!(config.port(), 465);
    assert_eq!(config.username.as_deref(), Some("backflow"));
    assert_eq!(
        config.password_file,
        Some(PathBuf::from("/etc/backflow/smtp-password"))
    );
    assert_eq!(config.to.len(), 2);
    assert_eq!(config.when.len(), 3);

    let plain = parse("server: localhost\nsecurity: none\nfrom: a@b.c\nto: [d@e.f]\n").unwrap();
    assert_eq!(plain.port(), 25);
    let explicit = parse("server: localhost\nport: 2525\nfrom: a@b.c\nto: [d@e.f]\n").unwrap();
    assert_eq!(explicit.port(), 2525);
}

#[test]
fn unknown_fields_and_values_are_refused() {
    let error = parse("server: h\nfrom: a@b.c\nto: [d@e.f]\nsecurty: tls\n").unwrap_err();
    assert!(error.to_string().contains("securty"), "{error}");
    let error = parse("server: h\nfrom: a@b.c\nto: [d@e.f]\nsecurity: ssl\n").unwrap_err();
    assert!(error.to_string().contains("ssl"), "{error}");
    let error = parse("server: h\nfrom: a@b.c\nto: [d@e.f]\nwhen: [always]\n").unwrap_err();
    assert!(error.to_string().contains("always"), "{error}");
}

#[test]
fn the_password_never_shows_in_debug_output() {
    let config =
        parse("server: h\nusername: u\npassword: hunter2-xyz\nfrom: a@b.c\nto: [d@e.f]\n").unwrap();
    assert_eq!(
        config.password.as_ref().map(Secret::expose),
        Some("hunter2-xyz")
    );
    assert!(!format!("{config:?}").contains("hunter2-xyz"));
}

fn session() -> Session {
    let mut vm = VmReport::new("web01", Outcome::Success);
    vm.duration = Duration::from_secs(1);
    Session {
        job: "j".into(),
        started: 0,
        ended: 1,
        vms: vec![vm],
    }
}

/// Mistakes of the configuration are found before any connection (the server does not exist).
#[test]
fn configuration_mistakes_are_named_before_connecting() {
    let base = SmtpConfig::new(
        "mail.invalid",
        "backflow@example.org",
        vec!["ops@example.org".into()],
    );
    let cases: Vec<(SmtpConfig, &str)> = vec![
        (
            SmtpConfig {
                from: "not an address".into(),
                ..base.clone()
            },
            "sender `not an address`",
        ),
        (
            SmtpConfig {
                to: vec![],
                ..base.clone()
            },
            "no recipient",
        ),
        (
            SmtpConfig {
                to: vec!["ops@".into()],
                ..base.clone()
            },
            "recipient `ops@`",
        ),
        (
            SmtpConfig {
                username: Some("u".into()),
                ..base.clone()
            },
            "needs `password` or `password_file`",
        ),
        (
            SmtpConfig {
                password: Some(Secret::new("p")),
                ..base.clone()
            },
            "no `username`",
        ),
        (
            SmtpConfig {
                username: Some("u".into()),
                password: Some(Secret::new("p")),
                password_file: Some("/nonexistent".into()),
                ..base.clone()
            },
            "both `password` and `password_file`",
        ),
    ];
    for (config, expected) in cases {
        let error = send(&config, &session()).unwrap_err();
        assert!(matches!(error, NotifyError::Config(_)), "{error:?}");
        assert!(
            error.to_string().contains(expected),
            "{error} lacks {expected}"
        );
        assert!(!error.is_transient());
    }

    let missing = SmtpConfig {
        username: Some("u".into()),
        password_file: Some("/nonexistent/smtp-password".into()),
        ..base.clone()
    };
    let error = send(&missing, &session()).unwrap_err();
    assert!(
        matches!(error, NotifyError::PasswordFile { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("/nonexistent/smtp-password"),
        "{error}"
    );
}

#[test]
fn the_session_serializes_with_its_outcome() {
    let json = serde_json::to_value(session()).unwrap();
    assert_eq!(json["outcome"], "success");
    assert_eq!(json["vms"][0]["result"], "success");
    assert_eq!(json["vms"][0]["duration_secs"], 1.0);
    assert!(json["vms"][0].get("error").is_none());
    assert_eq!(
        render(&session()).0,
        "[backflow] job j: success (1 VM backed up)"
    );
}
