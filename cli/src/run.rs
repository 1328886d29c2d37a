//! `run`, `validate` and `stages`: specs from files or built in, run with the live display, the
//! summary and the JSON report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use backflow_pipeline::spec::{self, SpecErrors};
use backflow_pipeline::{CancelToken, OutcomeKind, Pipeline, RunOptions, RunReport};
use backflow_stages::Stages;

use backflow_pipeline::input::{MAX_SPEC_SIZE, read_text_file};

use crate::specs::{self, SpecSource};
use crate::{BadInput, Interrupted, SpecInvalid, display, parse_vars, signals};

/// Specs built into the binary, so that `restore` and `demo` need no files: (file, text).
pub const RESTORE_SPEC: (&str, &str) = (specs::RESTORE.file, specs::RESTORE.text);
pub const BACKUP_VM_SPEC: (&str, &str) = (specs::BACKUP_VM.file, specs::BACKUP_VM.text);
pub const RESTORE_VM_SPEC: (&str, &str) = (specs::RESTORE_VM.file, specs::RESTORE_VM.text);

#[derive(clap::Args)]
pub struct RunArgs {
    /// A built-in spec's name (`backflow specs` lists them) or a spec file: a path wins when the
    /// argument names an existing file, contains `/` or ends in `.yaml`.
    #[arg(value_name = "SPEC")]
    pub spec: String,
    /// Set a spec variable: KEY=VALUE (repeatable). `repo` defaults to $BACKFLOW_REPOSITORY.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Write the run report as JSON to FILE.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No live progress and no summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// After the summary, the per-stage table: items and bytes each stage handled, its rate, how
    /// its time went, and the bottleneck.
    #[arg(long, conflicts_with = "quiet")]
    pub stats: bool,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// A built-in spec's name or a spec file, as for `run`.
    #[arg(value_name = "SPEC")]
    pub spec: String,
    /// Set a spec variable: KEY=VALUE (repeatable). `repo` defaults to $BACKFLOW_REPOSITORY.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let pipeline = load_spec(&specs::resolve(&args.spec)?, parse_vars(&args.vars)?)?;
    let output = display::Output::new(args.quiet, args.stats);
    run_pipeline(&pipeline, args.report.as_deref(), output).map(|_| ())
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    let source = specs::resolve(&args.spec)?;
    let pipeline = load_spec(&source, parse_vars(&args.vars)?)?;
    println!(
        "{}: valid: {}",
        source.display(),
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
    SpecInvalid(format!(
        "{errors}\n{count} error{} in the spec; nothing was run",
        if count == 1 { "" } else { "s" }
    ))
    .into()
}

/// Loads a spec with the `--var` pairs, `repo` defaulting to `BACKFLOW_REPOSITORY`.
pub fn load_spec(source: &SpecSource, vars: Vec<(String, String)>) -> Result<Pipeline> {
    match source {
        SpecSource::File(path) => {
            // Read here only to see whether it declares `repo`; the loader reads it again and
            // reports what is wrong with it.
            let text = read_text_file(path, MAX_SPEC_SIZE).ok();
            let vars = specs::with_repo_default(text.as_deref(), vars)?;
            spec::load_file(path, &vars, &Stages).map_err(spec_errors)
        }
        SpecSource::Builtin(builtin) => {
            let vars = specs::with_repo_default(Some(builtin.text), vars)?;
            spec::load_str(builtin.file, builtin.text, &vars, &Stages).map_err(spec_errors)
        }
    }
}

/// Runs a pipeline with Ctrl-C/SIGTERM handling, the live progress on a terminal, the summary
/// (and with `--stats` the per-stage table) and the JSON report. Errors when the run did not
/// succeed.
pub fn run_pipeline(
    pipeline: &Pipeline,
    report_path: Option<&Path>,
    output: display::Output,
) -> Result<RunReport> {
    if let Some(repo) = &pipeline.repository {
        // A missing or foreign repository is bad input found before any data moved: said here
        // once, with the fix, rather than by the first stage that needs it, after a source was
        // opened and beside a table of idle stages.
        crate::open_repo(repo)?;
    }
    let cancel = CancelToken::new();
    signals::cancel_on_signals(cancel.clone());
    let live = (output != display::Output::Quiet && std::io::stderr().is_terminal())
        .then(display::LiveDisplay::start);
    let on_progress = live
        .clone()
        .map(|live| Arc::new(move |p: &backflow_pipeline::Progress<'_>| live.draw(p)) as _);
    let report = pipeline.run(RunOptions {
        cancel,
        on_progress,
    });
    if let Some(live) = &live {
        live.finish();
    }
    if report.refused {
        // Nothing moved: the cause alone, as bad input, without a table of idle stages.
        // One line, whatever the stages' messages hold.
        let cause = report.errors.join("; ").replace('\n', " ");
        return Err(BadInput(cause).into());
    }
    // The report's warnings were logged when they happened (`RunContext::warn`), at the
    // default log level: not repeated here.
    print!("{}", display::after_run(&report, output));
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
