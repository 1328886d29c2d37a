//! `run`, `validate` and `stages`: specs from files or built in, run with the live display, the
//! summary and the JSON report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use backflow_pipeline::spec::{self, SpecErrors};
use backflow_pipeline::{CancelToken, OutcomeKind, Pipeline, RunOptions, RunReport};
use backflow_stages::Stages;

use crate::{BadInput, Interrupted, display, parse_vars, signals};

/// Specs built into the binary, so that `restore` and `demo` need no files.
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

#[derive(clap::Args)]
pub struct RunArgs {
    pub spec: PathBuf,
    /// Set a spec variable: KEY=VALUE (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Write the run report as JSON to FILE.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No live display and no summary table.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    pub spec: PathBuf,
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let pipeline = load_spec(&args.spec, &parse_vars(&args.vars)?)?;
    run_pipeline(&pipeline, args.report.as_deref(), args.quiet).map(|_| ())
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    let pipeline = load_spec(&args.spec, &parse_vars(&args.vars)?)?;
    println!(
        "{}: valid: {}",
        args.spec.display(),
        pipeline
            .stages
            .iter()
            .map(|s| format!("{} ({}) x{}", s.name, s.kind, s.workers))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    Ok(())
}

pub fn spec_errors(errors: SpecErrors) -> anyhow::Error {
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
    if report.refused {
        // Nothing moved: the cause alone, as bad input, without a table of idle stages.
        return Err(BadInput(report.errors.join("; ")).into());
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

pub fn print_stages(json: bool, markdown: bool) {
    if markdown {
        print!("{}", backflow_stages::markdown_table());
        return;
    }
    let docs = backflow_stages::docs();
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
        let repository = match (d.needs_repository, d.needs_repository_unless) {
            (false, _) => String::new(),
            (true, None) => "  needs repository".to_owned(),
            (true, Some(option)) => format!("  needs repository unless {option}: false"),
        };
        println!(
            "{}  ({} -> {}){repository}\n    {}",
            d.kind,
            io(d.input),
            io(d.output),
            d.summary
        );
        for o in &d.options {
            println!("    {:<20} default {:<10} {}", o.name, o.default, o.doc);
        }
        if !d.finaliser {
            println!("    (every stage also takes: name, workers, capacity)");
        }
        println!();
    }
}
