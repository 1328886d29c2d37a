//! The text of a notification: a subject that says the outcome at a glance, and a plain-text body
//! with one row per VM, then every error and warning in full.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{Outcome, Session};

/// Subject and plain-text body of the message reporting `session`.
pub fn render(session: &Session) -> (String, String) {
    (subject(session), body(session))
}

fn subject(session: &Session) -> String {
    let total = session.vms.len();
    // A session whose one row is not a VM (a health check, a gc, a job that failed before any VM
    // ran) is named by that row.
    let not_a_vm = match session.vms.as_slice() {
        [only] if only.vm.starts_with('(') => Some(only.vm.trim_matches(['(', ')'])),
        _ => None,
    };
    let detail = match (session.outcome(), not_a_vm) {
        (_, Some("job")) => "nothing ran".to_string(),
        (_, Some(what)) => what.to_string(),
        (outcome, None) => counted(session, outcome, total),
    };
    format!(
        "[backflow] job {}: {} ({detail})",
        session.job,
        session.outcome()
    )
}

/// "2 of 3 VMs failed", "3 VMs backed up".
fn counted(session: &Session, outcome: Outcome, total: usize) -> String {
    match outcome {
        Outcome::Failure => format!(
            "{} of {} failed",
            session.count(Outcome::Failure),
            vms(total)
        ),
        Outcome::Warning if total == 0 => "no VMs".to_string(),
        Outcome::Warning => format!(
            "{} of {} with warnings",
            session.count(Outcome::Warning),
            vms(total)
        ),
        Outcome::Success => format!("{} backed up", vms(total)),
    }
}

/// "1 VM", "3 VMs".
fn vms(n: usize) -> String {
    if n == 1 {
        "1 VM".to_string()
    } else {
        format!("{n} VMs")
    }
}

const HEADERS: [&str; 7] = [
    "VM",
    "RESULT",
    "SNAPSHOT",
    "READ",
    "WRITTEN",
    "DURATION",
    "BOTTLENECK",
];

fn body(session: &Session) -> String {
    let mut out = String::new();
    let elapsed = Duration::from_secs(session.ended.saturating_sub(session.started));
    // Writing to a String cannot fail: the results are ignored throughout.
    let _ = writeln!(out, "Job:      {}", session.job);
    let _ = writeln!(out, "Outcome:  {}", session.outcome());
    let _ = writeln!(out, "Started:  {}", utc(session.started));
    let _ = writeln!(
        out,
        "Ended:    {} (took {})",
        utc(session.ended),
        duration(elapsed)
    );
    let _ = writeln!(
        out,
        "VMs:      {} total, {} succeeded, {} with warnings, {} failed",
        session.vms.len(),
        session.count(Outcome::Success),
        session.count(Outcome::Warning),
        session.count(Outcome::Failure)
    );
    out.push('\n');

    if session.vms.is_empty() {
        out.push_str("The job covered no VM.\n");
        return out;
    }

    let rows: Vec<[String; 7]> = session
        .vms
        .iter()
        .map(|vm| {
            [
                vm.vm.clone(),
                vm.result.to_string(),
                vm.snapshot.clone().unwrap_or_else(|| "-".into()),
                bytes(vm.bytes_read),
                bytes(vm.bytes_written),
                duration(vm.duration),
                vm.bottleneck.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    table_line(&mut out, &HEADERS.map(String::from), &widths);
    for row in &rows {
        table_line(&mut out, row, &widths);
    }

    let errors = session
        .vms
        .iter()
        .filter_map(|vm| vm.error.as_deref().map(|e| (vm.vm.as_str(), e)));
    messages(&mut out, "Errors", errors);
    let warnings = session
        .vms
        .iter()
        .flat_map(|vm| vm.warnings.iter().map(|w| (vm.vm.as_str(), w.as_str())));
    messages(&mut out, "Warnings", warnings);
    let notes = session
        .vms
        .iter()
        .flat_map(|vm| vm.notes.iter().map(|n| (vm.vm.as_str(), n.as_str())));
    messages(&mut out, "Notes", notes);
    out
}

/// A titled list of `(vm, message)`, each message under its VM's name; nothing when there is none.
fn messages<'a>(out: &mut String, title: &str, items: impl Iterator<Item = (&'a str, &'a str)>) {
    for (i, (vm, message)) in items.enumerate() {
        if i == 0 {
            let _ = writeln!(out, "\n{title}:");
        }
        let _ = writeln!(out, "  {vm}: {}", indent_continuation(message));
    }
}

/// Left-aligned text columns, right-aligned numbers (READ, WRITTEN, DURATION), two spaces apart.
fn table_line(out: &mut String, cells: &[String; 7], widths: &[usize; 7]) {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        if (3..=5).contains(&i) {
            let _ = write!(line, "{cell:>width$}");
        } else {
            let _ = write!(line, "{cell:<width$}");
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// Multi-line messages stay under their VM's name.
fn indent_continuation(text: &str) -> String {
    text.trim_end().replace('\n', "\n    ")
}

/// Binary units with one decimal: "0 B", "512 B", "1.5 KiB", "3.0 GiB": also what the command
/// line's progress and summaries show, so that a mail and a terminal say the same.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// "0.4s", "42s", "3m 07s", "2h 05m 09s".
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 && d.subsec_millis() > 0 {
        return format!("{:.1}s", d.as_secs_f64());
    }
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!(
            "{}h {:02}m {:02}s",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        ),
    }
}

/// Unix seconds as "2026-11-27 17:22:28 UTC": the repository's RFC 3339 time, spelled for people.
pub fn utc(unix: u64) -> String {
    let rfc3339 = backflow_repository::rfc3339(unix.min(i64::MAX as u64) as i64);
    format!("{} UTC", rfc3339.replace('T', " ").trim_end_matches('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmReport;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_800_148), "2026-11-27 17:22:28 UTC");
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_wrote_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(400)), "0.4s");
        assert_eq!(duration(Duration::from_secs(187)), "3m 07s");
        assert_eq!(duration(Duration::from_secs(7509)), "2h 05m 09s");
    }

    #[test]
    fn a_session_of_one_non_vm_row_is_named_by_it() {
        let mut session = Session {
            job: "weekly-check".into(),
            started: 0,
            ended: 60,
            vms: vec![VmReport::new("(health check)", Outcome::Failure)],
        };
        assert_eq!(
            render(&session).0,
            "[backflow] job weekly-check: failure (health check)"
        );
        session.vms = vec![VmReport::new("(job)", Outcome::Failure)];
        assert_eq!(
            render(&session).0,
            "[backflow] job weekly-check: failure (nothing ran)"
        );
    }

    #[test]
    fn subject_counts_the_vms_behind_the_outcome() {
        let mut session = Session {
            job: "nightly".into(),
            started: 0,
            ended: 60,
            vms: vec![
                VmReport::new("web01", Outcome::Success),
                VmReport::new("web02", Outcome::Warning),
                VmReport::new("db01", Outcome::Failure),
            ],
        };
        // Each subject, then the last VM dropped for the next.
        for expected in [
            "failure (1 of 3 VMs failed)",
            "warning (1 of 2 VMs with warnings)",
            "success (1 VM backed up)",
            "warning (no VMs)",
        ] {
            assert_eq!(
                render(&session).0,
                format!("[backflow] job nightly: {expected}")
            );
            session.vms.pop();
        }
    }

    #[test]
    fn body_has_a_row_per_vm_then_errors_and_warnings() {
        let mut web = VmReport::new("web01", Outcome::Warning);
        web.snapshot = Some("5f3a9c".into());
        web.bytes_read = 2 << 30;
        web.bytes_written = 300 << 20;
        web.duration = Duration::from_secs(75);
        web.bottleneck = Some("reader".into());
        web.warnings = vec!["no checkpoint: full backup".into()];
        web.notes = vec!["crash-consistent".into()];
        let mut db = VmReport::new("db01", Outcome::Failure);
        db.error = Some("libvirt: domain not found\nsecond line".into());
        let session = Session {
            job: "nightly".into(),
            started: 1_795_800_148,
            ended: 1_795_800_148 + 3725,
            vms: vec![web, db],
        };
        let body = render(&session).1;
        let expected = "\
Job:      nightly
Outcome:  failure
Started:  2026-11-27 17:22:28 UTC
Ended:    2026-11-27 18:24:33 UTC (took 1h 02m 05s)
VMs:      2 total, 0 succeeded, 1 with warnings, 1 failed

VM     RESULT   SNAPSHOT     READ    WRITTEN  DURATION  BOTTLENECK
web01  warning  5f3a9c    2.0 GiB  300.0 MiB    1m 15s  reader
db01   failure  -             0 B        0 B        0s  -

Errors:
  db01: libvirt: domain not found
    second line

Warnings:
  web01: no checkpoint: full backup

Notes:
  web01: crash-consistent
";
        assert_eq!(body, expected);
    }
}
