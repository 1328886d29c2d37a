//! The `backflow` command line. Library crates return typed errors; here they become one line on
//! stderr and an exit code: 0 success, 1 failure, 2 bad input (spec, arguments), 130 interrupted.

mod daemon;
mod demo;
mod display;
mod forget;
mod gc;
mod jobs;
mod signals;
mod vms;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use backflow_pipeline::spec::{self, SpecErrors};
use backflow_pipeline::{ByteSize, CancelToken, OutcomeKind, Pipeline, RunOptions, RunReport};
use backflow_repository::Repository;
use backflow_stages::Stages;
use clap::{Parser, Subcommand};

/// Specs built into the binary, so that `restore` and `demo` need no files.
pub const BACKUP_IMAGE_SPEC: (&str, &str) = (
    "specs/backup-image.yaml",
    include_str!("../../specs/backup-image.yaml"),
);
pub const RESTORE_SPEC: (&str, &str) = (
    "specs/restore.yaml",
    include_str!("../../specs/restore.yaml"),
);
pub const BACKUP_VM_SPEC: (&str, &str) = (
    "specs/backup-vm.yaml",
    include_str!("../../specs/backup-vm.yaml"),
);
pub const RESTORE_VM_SPEC: (&str, &str) = (
    "specs/restore-vm.yaml",
    include_str!("../../specs/restore-vm.yaml"),
);

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
    Run {
        spec: PathBuf,
        /// Set a spec variable: KEY=VALUE (repeatable).
        #[arg(long = "var", value_name = "KEY=VALUE")]
        vars: Vec<String>,
        /// Write the run report as JSON to FILE.
        #[arg(long)]
        report: Option<PathBuf>,
        /// No live display and no summary table.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a spec without running it: every error, with file:line:column.
    Validate {
        spec: PathBuf,
        #[arg(long = "var", value_name = "KEY=VALUE")]
        vars: Vec<String>,
    },
    /// List every stage kind with its message types and options.
    Stages {
        #[arg(long)]
        json: bool,
    },
    /// Create an empty repository.
    Init {
        #[arg(long)]
        repo: PathBuf,
        /// Chunk size: a multiple of 64K (default 128K).
        #[arg(long)]
        chunk_size: Option<ByteSize>,
        /// Size at which pack files are closed (default 32M; 64K to 1G).
        #[arg(long)]
        pack_size: Option<ByteSize>,
    },
    /// List the snapshots (restore points) of a repository.
    Snapshots {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot's disks as raw or qcow2 images (runs specs/restore.yaml).
    Restore {
        #[arg(long)]
        repo: PathBuf,
        /// Snapshot id, or `latest`.
        #[arg(long, default_value = "latest")]
        snapshot: String,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        /// Output file (one disk) or existing directory (DISK.raw, or DISK.qcow2, per disk).
        #[arg(long)]
        to: PathBuf,
        /// Image format: raw (sparse file or block device) or qcow2 (needs qemu-img and qemu-nbd).
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
        format: String,
        /// Do not fsync: report success once the data is written to the page cache.
        #[arg(long)]
        no_sync: bool,
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check the repository: structure, and with --read-data every chunk's content.
    Verify {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
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
        Command::Run { .. }
            | Command::Restore { .. }
            | Command::Job(jobs::JobCommand::Run { .. })
            | Command::Daemon(_)
            | Command::Demo { .. }
    );
    if !cancellable {
        signals::exit_on_signals();
    }
    match command {
        Command::Run {
            spec,
            vars,
            report,
            quiet,
        } => {
            let pipeline = load_spec(&spec, &parse_vars(&vars)?)?;
            run_pipeline(&pipeline, report.as_deref(), quiet).map(|_| ())
        }
        Command::Validate { spec, vars } => {
            let pipeline = load_spec(&spec, &parse_vars(&vars)?)?;
            println!(
                "{}: valid: {}",
                spec.display(),
                pipeline
                    .stages
                    .iter()
                    .map(|s| format!("{} ({}) x{}", s.name, s.kind, s.workers))
                    .collect::<Vec<_>>()
                    .join(" -> ")
            );
            Ok(())
        }
        Command::Stages { json } => {
            print_stages(json);
            Ok(())
        }
        Command::Init {
            repo,
            chunk_size,
            pack_size,
        } => {
            let chunk_size = chunk_size
                .map(|c| u32::try_from(c.bytes()).unwrap_or(u32::MAX))
                .unwrap_or(backflow_repository::DEFAULT_CHUNK_SIZE);
            let options = backflow_repository::InitOptions {
                chunk_size,
                pack_target_size: pack_size
                    .map(|p| p.bytes())
                    .unwrap_or(backflow_repository::DEFAULT_PACK_TARGET_SIZE),
            };
            Repository::init_with(&repo, &options)
                .with_context(|| format!("creating a repository in {}", repo.display()))?;
            println!(
                "created repository {} (chunk size {})",
                repo.display(),
                ByteSize(u64::from(chunk_size))
            );
            Ok(())
        }
        Command::Snapshots { repo, json } => {
            let repository = open_repo(&repo)?;
            let snapshots = repository.list_snapshots()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshots)?);
            } else {
                println!("{:<28} {:<20} {:<22} disks", "id", "vm", "time (UTC)");
                for s in &snapshots {
                    let disks: Vec<String> = s
                        .disks
                        .iter()
                        .map(|d| format!("{} ({})", d.name, ByteSize(d.size)))
                        .collect();
                    println!(
                        "{:<28} {:<20} {:<22} {}",
                        s.id,
                        s.vm,
                        s.time_utc,
                        disks.join(", ")
                    );
                }
            }
            Ok(())
        }
        Command::Restore {
            repo,
            snapshot,
            disk,
            to,
            format,
            no_sync,
            report,
            quiet,
        } => {
            open_repo(&repo)?;
            let vars = vec![
                ("repo".to_owned(), repo.display().to_string()),
                ("snapshot".to_owned(), snapshot),
                ("disk".to_owned(), disk.unwrap_or_default()),
                ("to".to_owned(), to.display().to_string()),
                ("sync".to_owned(), (!no_sync).to_string()),
                ("format".to_owned(), format),
            ];
            let (name, text) = RESTORE_SPEC;
            let pipeline = spec::load_str(name, text, &vars, &Stages).map_err(spec_errors)?;
            run_pipeline(&pipeline, report.as_deref(), quiet).map(|_| ())
        }
        Command::Verify {
            repo,
            read_data,
            json,
        } => {
            let repository = open_repo(&repo)?;
            let report = repository.verify_and_mark(read_data)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", verify_text(&report));
            }
            if !report.is_ok() {
                bail!("the repository has damaged or missing data (see above)");
            }
            Ok(())
        }
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

fn spec_errors(errors: SpecErrors) -> anyhow::Error {
    let count = errors.0.len();
    BadInput(format!(
        "{errors}\n{count} error{} in the spec; nothing was run",
        if count == 1 { "" } else { "s" }
    ))
    .into()
}

pub fn load_spec(path: &Path, vars: &[(String, String)]) -> Result<Pipeline> {
    spec::load_file(path, vars, &Stages).map_err(spec_errors)
}

/// Runs a pipeline with Ctrl-C/SIGTERM handling, the live display on a terminal, the summary
/// table and the JSON report. Errors when the run did not succeed.
pub fn run_pipeline(
    pipeline: &Pipeline,
    report_path: Option<&Path>,
    quiet: bool,
) -> Result<RunReport> {
    let cancel = CancelToken::new();
    signals::cancel_on_signals(cancel.clone());
    let live = !quiet && std::io::stderr().is_terminal();
    let on_progress = live.then(|| Arc::new(display::LiveDisplay::default().into_callback()) as _);
    let report = pipeline.run(RunOptions {
        cancel,
        on_progress,
    });
    if live {
        display::clear_live();
    }
    if !quiet {
        print!("{}", report.summary_table());
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
    }
    if let Some(path) = report_path {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json)
            .with_context(|| format!("writing the report {}", path.display()))?;
    }
    match report.outcome {
        OutcomeKind::Succeeded => Ok(report),
        OutcomeKind::Cancelled => Err(Interrupted.into()),
        OutcomeKind::Failed => bail!("{}", report.errors.join("; ")),
    }
}

fn print_stages(json: bool) {
    let mut docs: Vec<_> = backflow_stages::Kind::ALL.iter().map(|k| k.doc()).collect();
    docs.extend(backflow_stages::finaliser_docs());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&docs).unwrap_or_default()
        );
        return;
    }
    for d in docs {
        let io = |t: Option<backflow_pipeline::MessageType>| {
            t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
        };
        println!(
            "{}  ({} -> {}){}\n    {}",
            d.kind,
            io(d.input),
            io(d.output),
            if d.needs_repository {
                "  needs repository"
            } else {
                ""
            },
            d.summary
        );
        for o in &d.options {
            println!("    {:<20} default {:<10} {}", o.name, o.default, o.doc);
        }
        if !backflow_stages::FINALISER_KINDS.contains(&d.kind) {
            println!("    (every stage also takes: name, workers, capacity)");
        }
        println!();
    }
}

/// The verify report for people: counts, then one block per problem naming the chunk, where it
/// is stored and the restore points that need it.
pub fn verify_text(report: &backflow_repository::VerifyReport) -> String {
    let mut out = format!(
        "checked {} snapshots, {} chunk references, {} index files ({} records), {} packs",
        report.snapshots, report.chunk_refs, report.index_files, report.index_records, report.packs
    );
    if report.read_data {
        out.push_str(&format!(
            "; read {} chunks ({:.1} MiB)",
            report.chunks_read,
            report.bytes_read as f64 / (1024.0 * 1024.0)
        ));
    }
    out.push('\n');
    if report.unreferenced_packs > 0 {
        out.push_str(&format!(
            "{} packs are not referenced by any index (left by interrupted runs; harmless)\n",
            report.unreferenced_packs
        ));
    }
    for (f, id) in report
        .damaged_snapshots
        .iter()
        .zip(&report.damaged_snapshot_ids)
    {
        // The manifest is REPO/snapshots/ID.snap.
        let repo = Path::new(&f.path)
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("REPO"));
        out.push_str(&format!(
            "DAMAGED snapshot {id} (manifest {}): {}\n    if it cannot be repaired, `backflow forget \
             --repo {} --snapshot {id}` removes it (a gc stops until then)\n",
            f.path,
            f.error,
            repo.display()
        ));
    }
    for (what, files) in [
        ("index file", &report.damaged_index_files),
        ("pack", &report.damaged_packs),
    ] {
        for f in files {
            out.push_str(&format!("DAMAGED {what} {}: {}\n", f.path, f.error));
        }
    }
    for p in &report.problems {
        out.push_str(&format!(
            "{} chunk {} ({:?}): {}\n",
            if p.healed { "HEALED" } else { "DAMAGED" },
            p.digest,
            p.kind,
            p.detail
        ));
        if let Some(pack) = &p.pack {
            out.push_str(&format!(
                "    stored in pack {} at offset {}\n",
                pack.to_hex(),
                p.offset.unwrap_or(0)
            ));
        }
        if p.healed {
            out.push_str(
                "    superseded by a healthy copy stored later: no restore point needs this one\n",
            );
        } else if p.snapshots.is_empty() {
            out.push_str("    no snapshot uses it\n");
        } else {
            out.push_str(&format!(
                "    used by snapshots: {}\n",
                p.snapshots.join(", ")
            ));
        }
    }
    if report.unindexed_chunks > 0 {
        out.push_str(&format!(
            "{} referenced chunks were found only in pack trailers (an index file is damaged or lost): \
             they restore, slowly; `backflow rebuild-index` indexes them again\n",
            report.unindexed_chunks
        ));
    }
    for f in &report.side_files {
        out.push_str(&format!("WARNING side file {}: {}\n", f.path, f.error));
    }
    if report.cleared_marks > 0 {
        out.push_str(&format!(
            "{} chunks marked damaged earlier read back whole: their marks were dropped\n",
            report.cleared_marks
        ));
    }
    let unhealed = report
        .problems
        .iter()
        .filter(|p| !p.healed && p.pack.is_some())
        .count();
    if report.marked > 0 && unhealed > 0 {
        out.push_str(&format!(
            "{unhealed} damaged chunks marked; the next backup of a VM that still has the data \
             stores it again\n"
        ));
    }
    if !report.unrestorable_snapshots.is_empty() {
        out.push_str(&format!(
            "snapshots that cannot be restored whole: {}\n",
            report.unrestorable_snapshots.join(", ")
        ));
    }
    out.push_str(if report.is_ok() {
        "repository OK\n"
    } else {
        "repository DAMAGED\n"
    });
    out
}
