//! `instant-restore`: a restore point running as a new VM within seconds (on overlays of its NBD
//! export, `backflow serve`), then moved to standalone images while it runs (`--to`, or later
//! `instant-restore finish`). The mechanics and what a failure leaves: `backflow_recovery`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use backflow_recovery::{
    DEFAULT_MOVE_TIMEOUT, DEFAULT_STATE_ROOT, Phase, ServeCommand, SourceDisk, StartRequest,
};

use crate::{BadInput, open_repo, repo_location};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(clap::Args)]
struct StartArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP, required = true)]
    repo: Option<OsString>,
    /// Restore point: an id, a unique prefix of one, or `latest` (of `--vm`).
    #[arg(long, default_value = "latest")]
    snapshot: String,
    /// The VM whose restore points `--snapshot` names.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The new domain's name (must not exist): the original VM is never touched.
    #[arg(long, required = true)]
    name: Option<String>,
    /// Once it runs, move every disk into this directory (NAME-DISK.qcow2) and pivot; without it
    /// the VM runs on the repository until `instant-restore finish NAME --to DIR`.
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,
    /// Format of the moved images.
    #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
    format: String,
    /// The libvirt connection of this host.
    #[arg(long, value_name = "URI", default_value = "qemu:///system")]
    uri: String,
    /// Leave out the network interfaces (an isolated copy, next to the original).
    #[arg(long)]
    no_network: bool,
    /// The first serial port on a unix socket (STATE_DIR/NAME/console.sock) instead of a pty, for
    /// a tool that drives the guest's console; its output is logged in console.log either way.
    #[arg(long)]
    console_socket: bool,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(clap::Args)]
struct StateArgs {
    /// Where instant recoveries keep their overlays, export socket and state.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_ROOT, env = "BACKFLOW_INSTANT_DIR")]
    state_dir: PathBuf,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Move a running recovery's disks into standalone images in DIR and pivot to them; the export
    /// stops, the VM no longer depends on the repository.
    Finish {
        name: String,
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// End a recovery: its VM (if it still runs on the repository) is destroyed and undefined, the
    /// export stops, its overlays and state go. A VM already moved by `finish` stays.
    Discard {
        name: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// The recoveries of this host: name, phase, restore point, RTO, whether the export runs.
    List {
        #[command(flatten)]
        state: StateArgs,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.action {
        Some(Action::Finish {
            name,
            to,
            format,
            state,
        }) => finish(&state.state_dir, &name, &to, &format),
        Some(Action::Discard { name, state }) => {
            backflow_recovery::discard(&state.state_dir, &name)?;
            println!("Instant recovery {name} discarded.");
            Ok(())
        }
        Some(Action::List { state }) => list(&state.state_dir),
        None => start(args.start),
    }
}

fn start(args: StartArgs) -> Result<()> {
    let (Some(repo), Some(name)) = (args.repo, args.name) else {
        return Err(BadInput::new("instant-restore needs --repo and --name").into());
    };
    backflow_recovery::check_name(&name).map_err(|e| BadInput::new(e.to_string()))?;
    let location = repo_location(&repo)?;
    let repository = open_repo(&location)?;
    let id = repository
        .resolve_snapshot(&args.snapshot, args.vm.as_deref())
        .map_err(|e| BadInput::new(e.to_string()))?;
    let snapshot = repository.open_snapshot(&id)?;
    let meta = snapshot.meta();
    let domain_xml = meta.domain_xml.clone().ok_or_else(|| {
        BadInput::new(format!(
            "restore point {id} holds no domain XML (it is an image's backup, not a libvirt VM's): restore its disks with `backflow restore` instead"
        ))
    })?;
    let disks: Vec<SourceDisk> = meta
        .disks
        .iter()
        .map(|d| SourceDisk {
            target: d.name.clone(),
            size: d.size,
        })
        .collect();
    drop(repository);

    let serve = ServeCommand::of_restore_point(
        std::env::current_exe().context("the path of this program")?,
        &location,
        &id,
    );
    let request = StartRequest {
        name: name.clone(),
        uri: args.uri,
        state_root: args.state.state_dir.clone(),
        serve,
        repository: location.to_string(),
        snapshot: id.clone(),
        vm: meta.vm.clone(),
        disks,
        domain_xml,
        network: !args.no_network,
        console_log: true,
        console_socket: args.console_socket,
    };
    let started = backflow_recovery::start(&request)?;
    let steps: Vec<String> = started
        .steps
        .iter()
        .map(|(step, d)| format!("{step} {}", seconds(*d)))
        .collect();
    println!(
        "VM {name} runs restore point {} of {} (RTO {}: {}).",
        short(&id),
        meta.vm,
        seconds(started.rto),
        steps.join(", ")
    );
    for note in &started.notes {
        println!("note: {note}");
    }
    match args.to {
        Some(to) => finish(&args.state.state_dir, &name, &to, &args.format),
        None => {
            println!(
                "It reads from the repository until `backflow instant-restore finish {name} --to DIR` moves its disks \
                 (or `instant-restore discard {name}` ends it). State: {}",
                started.dir.display()
            );
            Ok(())
        }
    }
}

fn finish(root: &std::path::Path, name: &str, to: &std::path::Path, format: &str) -> Result<()> {
    let mut last = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let finished = backflow_recovery::finish(
        root,
        name,
        to,
        format,
        DEFAULT_MOVE_TIMEOUT,
        &mut |cur, end| {
            if tty && last.elapsed() > Duration::from_millis(500) && end > 0 {
                last = std::time::Instant::now();
                eprint!("\rmoving: {:>3}% of {} MiB", cur * 100 / end, end >> 20);
                let _ = std::io::stderr().flush();
            }
        },
    )?;
    if tty {
        eprintln!();
    }
    let disks: Vec<String> = finished
        .disks
        .iter()
        .map(|(disk, path)| format!("{disk} -> {}", path.display()))
        .collect();
    println!(
        "VM {name} runs on its own images after {} ({} MiB moved): {}.",
        seconds(finished.move_time),
        finished.bytes >> 20,
        disks.join(", ")
    );
    Ok(())
}

fn list(root: &std::path::Path) -> Result<()> {
    let found = backflow_recovery::list(root)?;
    if found.is_empty() {
        println!("No instant recoveries in {}.", root.display());
        return Ok(());
    }
    println!(
        "{:<24} {:<9} {:<14} {:<20} {:>8}  export",
        "NAME", "PHASE", "RESTORE POINT", "VM", "RTO"
    );
    for entry in found {
        match entry {
            Ok(state) => {
                let phase = match state.phase {
                    Phase::Starting => "starting",
                    Phase::Running => "running",
                    Phase::Moving => "moving",
                };
                let export = match &state.server {
                    Some(s) if backflow_recovery::is_running(s) => format!("pid {}", s.pid),
                    Some(_) => "stopped".to_owned(),
                    None => "-".to_owned(),
                };
                let rto = state
                    .rto_ms
                    .map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
                println!(
                    "{:<24} {:<9} {:<14} {:<20} {:>8}  {export}",
                    state.name,
                    phase,
                    short(&state.snapshot),
                    state.vm,
                    rto
                );
            }
            Err((path, reason)) => println!("{}: unreadable state: {reason}", path.display()),
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
