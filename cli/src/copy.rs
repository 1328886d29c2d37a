//! `backflow copy`: restore points copied into another repository (see the repository crate's `copy`
//! module for what a copy keeps and sends).
//!
//! `--from` defaults to `BACKFLOW_REPOSITORY`, the repository an operator works with day to day: the
//! local one, which off-site copies are taken from. `--to` is always given: a copy's destination is
//! never implied.

use std::fmt::Write as _;

use anyhow::Result;
use backflow_jobs::copy::ZstdEncoder;
use backflow_repository::{CopyOptions, CopyReport, DEFAULT_COPY_WORKERS, Location};

use crate::BadInput;
use crate::display::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// The repository copied from: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = crate::REPO_ENV, value_name = "REPO")]
    from: String,
    /// The repository copied into (made by `backflow init` with the chunk size of the disks
    /// copied): a directory or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "REPO")]
    to: String,
    /// Every snapshot of this VM (image name or path); repeat for more. With neither --vm nor
    /// --snapshot: every snapshot.
    #[arg(long = "vm", value_name = "NAME")]
    vms: Vec<String>,
    /// This snapshot (an id, a unique prefix, or `latest` with one --vm); repeat for more.
    #[arg(long = "snapshot", value_name = "ID")]
    snapshots: Vec<String>,
    /// Threads reading, verifying, compressing and storing chunks.
    #[arg(long, default_value_t = DEFAULT_COPY_WORKERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// The passphrase file of --from, when it is encrypted under another passphrase than the one
    /// of --password-file (which then opens --to).
    #[arg(long, value_name = "FILE")]
    from_password_file: Option<std::path::PathBuf>,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let from_at = location("--from", &args.from)?;
    let to_at = location("--to", &args.to)?;
    let same = match (&from_at, &to_at) {
        (Location::Local(a), Location::Local(b)) => a
            .canonicalize()
            .ok()
            .is_some_and(|a| b.canonicalize().ok() == Some(a)),
        (a, b) => a == b,
    };
    if same {
        return Err(BadInput::new(format!(
            "--from and --to are the same repository ({to_at}); a copy needs two"
        ))
        .into());
    }
    if let Some(file) = &args.from_password_file {
        backflow_repository::keys::set_password_file_for(&from_at.to_string(), file.clone());
    }
    let from = crate::open_repo(&from_at)?;
    let to = crate::open_repo(&to_at)?;
    let options = CopyOptions {
        vms: args.vms,
        snapshots: args.snapshots,
        workers: usize::from(args.workers),
    };
    let report =
        backflow_repository::copy(&from, &to, &options, &ZstdEncoder::factory(), &|| false)
            .map_err(|e| -> anyhow::Error {
                if e.is_refusal() {
                    BadInput::new(e.to_string()).into()
                } else {
                    e.into()
                }
            })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

/// The location `--from` or `--to` names (a malformed `s3:` one is bad input naming the flag).
fn location(flag: &str, given: &str) -> Result<Location> {
    Location::parse(given).map_err(|e| BadInput::new(format!("{flag}: {e}")).into())
}

/// The report for people: one line per snapshot copied, then the totals, as `backflow run` ends.
pub fn text(r: &CopyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "copied {} snapshots from {} to {} in {:.1}s ({} already there)",
        r.snapshots_copied, r.from, r.to, r.seconds, r.snapshots_skipped
    );
    for s in r.snapshots.iter().filter(|s| s.copied) {
        let _ = writeln!(
            out,
            "  snapshot {} of {}: sent {} chunks ({} stored), {} already there, {} zero",
            s.id,
            s.vm,
            s.counts.chunks_sent,
            bytes(s.counts.bytes_sent),
            s.counts.chunks_present,
            s.counts.chunks_zero
        );
    }
    let _ = writeln!(
        out,
        "  read {} from {}, sent {} ({} of data) to {}; {} chunks sent, {} already there",
        bytes(r.counts.bytes_read),
        r.from,
        bytes(r.counts.bytes_sent),
        bytes(r.counts.plain_bytes_sent),
        r.to,
        r.counts.chunks_sent,
        r.counts.chunks_present
    );
    out
}
