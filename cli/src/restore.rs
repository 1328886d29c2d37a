//! `restore`: runs the built-in restore spec on a snapshot's disks.

use std::path::PathBuf;

use anyhow::Result;
use backflow_pipeline::spec;
use backflow_stages::Stages;

use crate::run::{RESTORE_SPEC, run_pipeline, spec_errors};
use crate::{open_repo, repo_location};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub point: crate::PointArgs,
    /// Only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Output file (one disk) or existing directory (DISK.raw, or DISK.qcow2, per disk).
    #[arg(long)]
    pub to: PathBuf,
    /// Image format: raw (sparse file or block device) or qcow2 (needs qemu-img and qemu-nbd).
    #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
    pub format: String,
    /// Do not fsync: report success once the data is written to the page cache.
    #[arg(long)]
    pub no_sync: bool,
    /// Replace an existing target (a file, a block device, DISK.raw in the directory). An image a
    /// running VM or a QEMU process uses is refused even so.
    #[arg(long)]
    pub force: bool,
    /// The libvirt connection whose VMs' images are never written (default: libvirt's default).
    #[arg(long, value_name = "URI")]
    pub uri: Option<String>,
    /// Disaster recovery: write zeros where no stored copy of a chunk can be read, and list every
    /// such range, instead of failing.
    #[arg(long)]
    pub allow_damaged: bool,
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, short)]
    pub quiet: bool,
    /// After the summary, the per-stage table.
    #[arg(long, conflicts_with = "quiet")]
    pub stats: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        point: crate::PointArgs { repo, snapshot, vm },
        disk,
        to,
        format,
        no_sync,
        force,
        uri,
        allow_damaged,
        report,
        quiet,
        stats,
    } = args;
    let location = repo_location(&repo)?;
    open_repo(&location)?;
    let vars = vec![
        ("repo".to_owned(), location.to_string()),
        ("snapshot".to_owned(), snapshot),
        ("vm".to_owned(), vm.unwrap_or_default()),
        ("disk".to_owned(), disk.unwrap_or_default()),
        ("to".to_owned(), to.display().to_string()),
        ("sync".to_owned(), (!no_sync).to_string()),
        ("format".to_owned(), format),
        ("force".to_owned(), force.to_string()),
        ("uri".to_owned(), uri.unwrap_or_default()),
        ("allow_damaged".to_owned(), allow_damaged.to_string()),
    ];
    let (name, text) = RESTORE_SPEC;
    let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(spec_errors)?;
    let output = crate::display::Output::new(quiet, stats);
    run_pipeline(&pipeline, report.as_deref(), output).map(|_| ())
}
