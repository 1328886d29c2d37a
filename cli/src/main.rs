//! The `backflow` command line. Library crates return typed errors; here they become one line on
//! stderr and an exit code: 0 success, 1 failure, 2 bad input (spec, arguments), 130 interrupted.

mod daemon;
mod demo;
mod display;
mod forget;
mod gc;
mod jobs;
mod repo;
mod restore;
mod run;
mod signals;
mod vms;

pub(crate) use repo::verify_text;
pub(crate) use run::{BACKUP_VM_SPEC, RESTORE_SPEC, RESTORE_VM_SPEC, run_pipeline, spec_errors};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use backflow_pipeline::ByteSize;
use backflow_repository::Repository;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backflow",
    version,
    about = "Agentless, deduplicating backup of KVM/QEMU disks as YAML pipelines"
)]
struct Cli {
    /// Log level filter (also RUST_LOG), e.g. info, debug, backflow=debug.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline spec.
    Run(run::RunArgs),
    /// Check a spec without running it: every error, with file:line:column.
    Validate(run::ValidateArgs),
    /// List every stage kind with its message types and options.
    Stages {
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// The README's stage table, generated from the same rows.
        #[arg(long)]
        markdown: bool,
    },
    /// Create an empty repository.
    Init(repo::InitArgs),
    /// List the snapshots (restore points) of a repository.
    Snapshots(repo::SnapshotsArgs),
    /// Restore a snapshot's disks as raw or qcow2 images (runs specs/restore.yaml).
    Restore(restore::Args),
    /// Check the repository: structure, and with --read-data every chunk's content.
    Verify(repo::VerifyArgs),
    /// Remove what no snapshot references (after `forget`), rewriting partly used packs. Runs next
    /// to backups; deletion waits for backups that were running when it began (the next gc
    /// finishes it). Can be killed and run again at any moment.
    Gc(gc::Args),
    /// Rebuild the index from the packs alone (repair; no backup may run meanwhile).
    RebuildIndex(gc::RebuildArgs),
    /// Forget snapshots by a keep policy (keep-last, daily/weekly/monthly/yearly), each VM on its
    /// own, or by id (--snapshot ID, damaged ones too); --dry-run lists what would go. Chunks stay
    /// until a garbage collection.
    Forget(forget::Args),
    /// Backup jobs: `job run FILE` runs one now, `job validate FILE` checks its file.
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// The sessions (runs of jobs) recorded in a repository, oldest first.
    Sessions(jobs::SessionsArgs),
    /// Run the jobs of a directory (every *.yaml) on their schedules, until SIGTERM/SIGINT: one
    /// run per job and per VM at a time, a run missed while stopped caught up once at start.
    Daemon(daemon::Args),
    /// List the VMs of a libvirt connection with their state, host and disks.
    Vms {
        /// libvirt URI, e.g. qemu:///system or qemu+ssh://root@kvm1/system (default: libvirt's).
        #[arg(long)]
        uri: Option<String>,
        /// JSON: an array of VMs with every field but the domain XML.
        #[arg(long)]
        json: bool,
    },
    /// Run a throwaway VM (backflow-demo on qemu:///system) on a generated disk, back it up, write
    /// 5% of its disk through the guest, back it up again (incrementally), restore both restore
    /// points and compare, restore the second as a new VM, then remove both VMs.
    Demo {
        /// Working directory (disk image, repository, restores); default ./backflow-demo. QEMU
        /// (user libvirt-qemu) must be able to traverse it.
        #[arg(long, default_value = "backflow-demo")]
        dir: PathBuf,
        /// Size of the VM's generated disk.
        #[arg(long, default_value = "256M")]
        size: ByteSize,
    },
}

/// The environment variable that names the repository wherever `--repo` is accepted.
pub const REPO_ENV: &str = "BACKFLOW_REPOSITORY";

/// The help of every `--repo`.
pub const REPO_HELP: &str = "The repository's directory (made by `backflow init`)";

/// Failures that map to exit code 2 (the input was wrong, nothing ran).
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// The run ended on Ctrl-C / SIGTERM: exit code 130.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; nothing was committed by this run, earlier snapshots are intact")
    }
}

impl std::error::Error for Interrupted {}

fn main() -> ExitCode {
    // Before anything else: a signal from here on ends the process with 130, never by the signal.
    signals::install();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(bad) = e.downcast_ref::<BadInput>() {
                eprintln!("{bad}");
                return ExitCode::from(2);
            }
            if e.downcast_ref::<Interrupted>().is_some() {
                eprintln!("backflow: {e}");
                return ExitCode::from(130);
            }
            eprintln!("backflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    // Commands that run pipelines or jobs hand their cancel token to the signal handling when they
    // have one (a signal before that cancels it at once); every other one can stop at any moment.
    let cancellable = matches!(
        command,
        Command::Run(_)
            | Command::Restore(_)
            | Command::Job(jobs::JobCommand::Run { .. })
            | Command::Daemon(_)
            | Command::Demo { .. }
    );
    if !cancellable {
        signals::exit_on_signals();
    }
    match command {
        Command::Run(args) => run::run(args),
        Command::Validate(args) => run::validate(args),
        Command::Stages { json, markdown } => {
            run::print_stages(json, markdown);
            Ok(())
        }
        Command::Init(args) => repo::init(args),
        Command::Snapshots(args) => repo::snapshots(args),
        Command::Restore(args) => restore::run(args),
        Command::Verify(args) => repo::verify(args),
        Command::Forget(args) => forget::run(args),
        Command::Gc(args) => gc::run(args),
        Command::RebuildIndex(args) => gc::rebuild(args),
        Command::Job(command) => jobs::run(command),
        Command::Sessions(args) => jobs::sessions(args),
        Command::Daemon(args) => daemon::run(args),
        Command::Vms { uri, json } => vms::run(uri.as_deref(), json),
        Command::Demo { dir, size } => demo::run(&dir, size.bytes()),
    }
}

pub(crate) fn open_repo(path: &Path) -> Result<Repository> {
    Repository::open(path).with_context(|| format!("opening repository {}", path.display()))
}

fn parse_vars(vars: &[String]) -> Result<Vec<(String, String)>> {
    vars.iter()
        .map(|v| match v.split_once('=') {
            Some((k, val)) if !k.is_empty() => Ok((k.to_owned(), val.to_owned())),
            _ => Err(BadInput(format!("--var {v:?}: expected KEY=VALUE")).into()),
        })
        .collect()
}
