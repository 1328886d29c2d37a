//! The `backflow` command line. Library crates return typed errors; here they become one line on
//! stderr and an exit code: 0 success, 1 failure, 2 bad input, 130 interrupted.
//!
//! Bad input is whatever is found wrong before any data moved: arguments, a spec or job file (its
//! `file:line:column` errors), a repository location that is malformed (an `s3:` URL that does
//! not parse, named with the flag or variable it came from), missing or no repository, a target
//! or snapshot that a stage refuses in its preflight. It is said in one line, with the fix where
//! there is one, and without the stage table of a run that never started. A cause is said once
//! (see [`error_chain`]).
//!
//! A repository is named by a [`Location`] everywhere (`--repo`, `BACKFLOW_REPOSITORY`, a spec's
//! or a job's `repository:`): a path, or `s3://BUCKET/PREFIX`, never a path made of a URL.
//!
//! Logs (`tracing`) go to stderr: text, colored only on a terminal, or JSON lines
//! (`--log-format json`); a run's warnings are logged once, when they happen, and not printed
//! again after its summary.

mod cluster;
mod copy;
mod daemon;
mod demo;
mod display;
mod files;
mod forget;
mod gc;
mod instant;
mod jobs;
mod key;
mod repo;
mod restore;
mod run;
mod serve;
mod signals;
mod specs;
mod vms;
mod worker;

pub(crate) use repo::verify_text;
pub(crate) use run::{BACKUP_VM_SPEC, RESTORE_SPEC, RESTORE_VM_SPEC, run_pipeline, spec_errors};

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use backflow_pipeline::ByteSize;
use backflow_repository::{Location, Repository};
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backflow",
    version,
    about = "Agentless, deduplicating backup of KVM/QEMU disks as YAML pipelines"
)]
struct Cli {
    /// What to log on stderr: a level (error, warn, info, debug, trace) or tracing's filter
    /// syntax (`info,backflow_repository=debug`). RUST_LOG, when set, wins. Default: warn, and
    /// for `daemon` its own lines at info.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// Log lines as text (for people) or JSON, one object per line (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// A file holding the passphrase of an encrypted repository (one trailing line ending is not
    /// part of it). Needed by every command that opens one, and by `init --encryption`.
    #[arg(long, global = true, env = backflow_repository::keys::PASSWORD_FILE_ENV, value_name = "FILE")]
    password_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline spec: a built-in one by name (`backflow specs` lists them) or a file.
    Run(run::RunArgs),
    /// Check a spec without running it: every error, with file:line:column.
    Validate(run::ValidateArgs),
    /// List the specs built into the binary with their variables, or print one (`specs NAME`).
    Specs(specs::Args),
    /// List every stage kind with its message types and options.
    Stages {
        /// JSON: an array of stage kinds with their options.
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
    /// Serve a snapshot's disks as read-only NBD exports (unix socket or loopback TCP) until
    /// SIGTERM/SIGINT; prints `listening ADDRESS exports NAME,...` once it accepts connections.
    Serve(serve::Args),
    /// Run a restore point as a new VM within seconds, on overlays of its export (`serve`), then
    /// move its disks to standalone images while it runs (`--to`, or `instant-restore finish`);
    /// `instant-restore list`, `instant-restore discard NAME`.
    InstantRestore(instant::Args),
    /// Files of a restore point's filesystems, without restoring its disk: `files ls [FS:]PATH`,
    /// `files get [FS:]PATH --to DIR` (docs/files.md).
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// The passphrases of an encrypted repository: `key list`, `key add`, `key remove ID`.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Copy restore points into another repository (same ids; only the chunks it lacks are sent).
    Copy(copy::Args),
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
    /// One VM's backup for a cluster's controller (started over SSH): the task on stdin, progress and
    /// the VM's record as JSON lines on stdout; closing stdin stops it.
    Worker(worker::Args),
    /// List the VMs of a libvirt connection, or of every host of a cluster, with their state,
    /// host and disks.
    Vms(vms::Args),
    /// Clusters of hosts: `cluster check --cluster FILE` checks each host's libvirt and worker
    /// access.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
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
    /// Print a shell completion script: `backflow completions bash > /etc/bash_completion.d/backflow`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout, or write one page per command into --dir.
    Man {
        /// Write backflow.1 and backflow-COMMAND.1 for every command into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// A restore point on the command line (`restore`, `serve`, `files`): the repository, the
/// snapshot, and the VM whose snapshots it names.
#[derive(clap::Args)]
pub struct PointArgs {
    #[arg(long, env = REPO_ENV, value_name = "LOCATION", help = REPO_HELP)]
    pub repo: std::ffi::OsString,
    /// Snapshot id, a unique prefix of one, or `latest` (of `--vm`; without it, only in a
    /// repository holding one VM).
    #[arg(long, default_value = "latest")]
    pub snapshot: String,
    /// The VM (or image identity, as `backflow snapshots` shows it) whose snapshots `--snapshot`
    /// names: its latest, or prefixes among its snapshots.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
}

/// The environment variable that names the repository wherever `--repo` is accepted.
pub const REPO_ENV: &str = "BACKFLOW_REPOSITORY";

/// The help of every `--repo`.
pub const REPO_HELP: &str =
    "The repository (made by `backflow init`): a directory, or s3://BUCKET/PREFIX";

/// Failures that map to exit code 2 (the input was wrong, nothing ran): one line, printed after
/// `backflow: `, that says what was wrong and how to put it right.
#[derive(Debug)]
struct BadInput(String);

impl BadInput {
    fn new(message: impl Into<String>) -> Self {
        BadInput(message.into())
    }
}

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// A spec that does not load: every error on its own `FILE:LINE:COLUMN:` line, then a count.
/// Exit code 2, like [`BadInput`], printed as it is.
#[derive(Debug)]
struct SpecInvalid(String);

impl std::fmt::Display for SpecInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecInvalid {}

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
    let default_log = match cli.command {
        Command::Daemon(_) => daemon::DEFAULT_LOG,
        _ => "warn",
    };
    init_logging(cli.log.as_deref().unwrap_or(default_log), cli.log_format);
    backflow_repository::keys::set_password_file(cli.password_file);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(bad) = e.downcast_ref::<BadInput>() {
                eprintln!("backflow: {bad}");
                return ExitCode::from(2);
            }
            if let Some(spec) = e.downcast_ref::<SpecInvalid>() {
                eprintln!("{spec}");
                return ExitCode::from(2);
            }
            if e.downcast_ref::<Interrupted>().is_some() {
                eprintln!("backflow: {e}");
                return ExitCode::from(130);
            }
            eprintln!("backflow: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, colored only when it is a terminal (escape codes in a file or a journal
/// are noise).
fn init_logging(log: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through the live display, which erases its frame before a log line is written.
        .with_writer(crate::display::log_writer)
        // Colours only for a person: a log file or a pipe gets no escape sequences.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// An error and its causes on one line, `: `-separated, each cause left out when the text so far
/// already ends with it: library errors often show their source in their own message (`cannot
/// read X: Not a directory (os error 20)`) and also return it as `source()`, and printing both
/// says the cause twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn execute(command: Command) -> Result<()> {
    // Commands that run pipelines or jobs hand their cancel token to the signal handling when they
    // have one (a signal before that cancels it at once); every other one can stop at any moment.
    let cancellable = matches!(
        command,
        Command::Run(_)
            | Command::Restore(_)
            | Command::Serve(_)
            | Command::Files(_)
            | Command::Job(jobs::JobCommand::Run { .. })
            | Command::Daemon(_)
            | Command::Demo { .. }
            | Command::Worker(_)
    );
    if !cancellable {
        signals::exit_on_signals();
    }
    match command {
        Command::Run(args) => run::run(args),
        Command::Validate(args) => run::validate(args),
        Command::Specs(args) => specs::run(args),
        Command::Stages { json, markdown } => {
            run::print_stages(json, markdown);
            Ok(())
        }
        Command::Init(args) => repo::init(args),
        Command::Snapshots(args) => repo::snapshots(args),
        Command::Key(command) => key::run(command),
        Command::Restore(args) => restore::run(args),
        Command::Serve(args) => serve::run(args),
        Command::InstantRestore(args) => instant::run(args),
        Command::Files(command) => files::run(command),
        Command::Copy(args) => copy::run(args),
        Command::Verify(args) => repo::verify(args),
        Command::Forget(args) => forget::run(args),
        Command::Gc(args) => gc::run(args),
        Command::RebuildIndex(args) => gc::rebuild(args),
        Command::Job(command) => jobs::run(command),
        Command::Sessions(args) => jobs::sessions(args),
        Command::Daemon(args) => daemon::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Vms(args) => vms::run(args),
        Command::Cluster(command) => cluster::run(command),
        Command::Demo { dir, size } => demo::run(&dir, size.bytes()),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "backflow",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
    }
}

/// The manual page of `backflow` (every command listed) on stdout, or with `dir` one page per
/// command there as well, `backflow-COMMAND.1`, as git's pages are laid out.
fn man(dir: Option<&Path>) -> Result<()> {
    let command = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    Ok(())
}

/// Where a `--repo` came from, for its errors: the flag when the command line has it, else the
/// variable (clap takes the variable only when the flag is absent).
fn repo_origin() -> String {
    let flag = std::env::args_os()
        .skip(1)
        .any(|a| a == "--repo" || a.to_string_lossy().starts_with("--repo="));
    if flag {
        "--repo".to_owned()
    } else {
        format!("${REPO_ENV}")
    }
}

/// The location a `--repo` (or `BACKFLOW_REPOSITORY`) names: a path, or `s3://BUCKET/PREFIX`. A
/// malformed `s3:` URL is bad input naming the flag or the variable, never a relative path (which
/// would make a directory `s3:` in the working directory). A path that is not UTF-8 cannot be a
/// URL and stays a path.
pub(crate) fn repo_location(given: &OsStr) -> Result<Location> {
    match given.to_str() {
        None => Ok(Location::Local(PathBuf::from(given))),
        Some(text) => Location::parse(text)
            .map_err(|e| BadInput::new(format!("{}: {e}", repo_origin())).into()),
    }
}

/// Opens the repository at a location (a `--repo`, or a spec's or job's `repository:`). A local
/// path that is missing, is not a directory or is not a repository is bad input, said with the
/// fix; so is a location the store says holds no repository.
pub(crate) fn open_repo(location: &Location) -> Result<Repository> {
    use backflow_repository::RepoError;
    if let Location::Local(path) = location {
        check_repo_dir(path)?;
    }
    Repository::open_at(location).map_err(|e| match e {
        RepoError::NotARepository { .. } if location.is_local() => BadInput::new(format!(
            "{e}; create one with `backflow init --repo {location}`"
        ))
        .into(),
        // No passphrase, or a wrong one: the message names the repository and the fix.
        // So is a store the environment cannot reach (no credentials, a bad endpoint).
        RepoError::Passphrase { .. }
        | RepoError::NotARepository { .. }
        | RepoError::StoreSettings { .. } => BadInput::new(e.to_string()).into(),
        other => anyhow::Error::new(other).context(format!("opening repository {location}")),
    })
}

/// A local repository's directory exists and is a directory, or the bad input says what it is.
fn check_repo_dir(path: &Path) -> Result<()> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BadInput::new(format!(
            "{shown} does not exist; create a repository there with `backflow init --repo {shown}`"
        ))
        .into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(BadInput::new(format!(
            "{shown} cannot be a repository: a part of the path is a file, not a directory"
        ))
        .into()),
        Ok(meta) if !meta.is_dir() => Err(BadInput::new(format!(
            "{shown} is a file, not a repository (a repository is a directory made by \
             `backflow init --repo DIR`)"
        ))
        .into()),
        _ => Ok(()),
    }
}

fn parse_vars(vars: &[String]) -> Result<Vec<(String, String)>> {
    vars.iter()
        .map(|v| match v.split_once('=') {
            Some((k, val)) if !k.is_empty() => Ok((k.to_owned(), val.to_owned())),
            _ => Err(BadInput::new(format!("--var {v}: expected KEY=VALUE")).into()),
        })
        .collect()
}
