//! `backflow job run FILE`, `backflow job validate FILE` and `backflow sessions`: backup jobs run
//! by hand, checked without running, and their history.

use std::path::PathBuf;

use anyhow::{Result, bail};
use backflow_jobs::{HealthCheckRecord, JobKind, RunJobOptions, SessionRecord, Verdict};
use backflow_pipeline::{ByteSize, CancelToken};

use crate::{BadInput, Interrupted, signals};

#[derive(clap::Subcommand)]
pub enum JobCommand {
    /// Run a job now: every VM it selects and every image it names, `parallel` at a time; the
    /// session is recorded in the repository (see `backflow sessions`).
    Run {
        /// The job file (YAML).
        file: PathBuf,
        /// Only this VM, or image (its name in the job, or its path), of the job.
        #[arg(long)]
        vm: Option<String>,
        /// Write the session record as JSON to FILE.
        #[arg(long)]
        report: Option<PathBuf>,
        /// No summary table.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a job without running it: its file, the repository, the spec and the variables the
    /// job sets, the images, the VM patterns against the connection's VMs (a warning when one
    /// matches none), and the next run times of each schedule.
    Validate { file: PathBuf },
}

#[derive(clap::Args)]
pub struct SessionsArgs {
    #[arg(long, env = crate::REPO_ENV, value_name = "LOCATION", help = crate::REPO_HELP)]
    repo: std::ffi::OsString,
    /// Only this job's sessions.
    #[arg(long)]
    job: Option<String>,
    /// JSON: the records, each VM's run report included.
    #[arg(long)]
    json: bool,
}

pub fn run(command: JobCommand) -> Result<()> {
    match command {
        JobCommand::Validate { file } => validate(&file),
        JobCommand::Run {
            file,
            vm,
            report,
            quiet,
        } => {
            let job = backflow_jobs::load(&file).map_err(|e| BadInput(e.to_string()))?;
            let cancel = CancelToken::new();
            signals::cancel_on_signals(cancel.clone());
            let (record, stored) = backflow_jobs::run_job(
                &job,
                &RunJobOptions {
                    cancel: cancel.clone(),
                    only: vm,
                    ..RunJobOptions::default()
                },
            );
            if !quiet {
                print!("{}", summary(&record));
            }
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_string_pretty(&record)?)?;
            }
            if let Err(e) = stored {
                eprintln!("backflow: warning: {e}");
            }
            if let Some(e) = &record.error {
                bail!("{e}");
            }
            match record.result {
                Verdict::Success | Verdict::Warning => Ok(()),
                Verdict::Cancelled => Err(Interrupted.into()),
                Verdict::Failure if record.gc.is_some() => {
                    bail!(
                        "job {}: the garbage collection failed (see above)",
                        record.job
                    )
                }
                Verdict::Failure if record.copy.is_some() => {
                    bail!("job {}: the copy failed (see above)", record.job)
                }
                Verdict::Failure if record.verify_boot.is_some() => {
                    bail!(
                        "job {}: a restore point did not boot, or none could be checked (see above)",
                        record.job
                    )
                }
                Verdict::Failure if record.health_check.is_some() => {
                    bail!(
                        "job {}: the health check found damage (see above)",
                        record.job
                    )
                }
                Verdict::Failure => {
                    let failed: Vec<&str> = record
                        .vms
                        .iter()
                        .filter(|v| v.result == Verdict::Failure)
                        .map(|v| v.vm.as_str())
                        .collect();
                    bail!(
                        "job {}: {} of {} VMs failed: {}",
                        record.job,
                        failed.len(),
                        record.vms.len(),
                        failed.join(", ")
                    )
                }
            }
        }
    }
}

/// Checks a job without running it: errors exit 2, warnings are printed and exit 0.
fn validate(file: &std::path::Path) -> Result<()> {
    let job = backflow_jobs::load(file).map_err(|e| BadInput(e.to_string()))?;
    let found = backflow_jobs::validate::validate(
        &job,
        &file.display().to_string(),
        backflow_jobs::run::now(),
    );
    for w in &found.warnings {
        eprintln!("warning: {w}");
    }
    if !found.errors.is_empty() {
        let count = found.errors.len();
        return Err(BadInput(format!(
            "{}\n{count} error{} in the job; nothing was run",
            found.errors.join("\n"),
            if count == 1 { "" } else { "s" }
        ))
        .into());
    }
    let what = match job.kind() {
        JobKind::HealthCheck(check) if check.read_data => {
            "health check reading every chunk".to_owned()
        }
        JobKind::HealthCheck(_) => "health check of the structure".to_owned(),
        JobKind::Gc(gc) => format!(
            "garbage collection (repack threshold {}%)",
            gc.repack_threshold.0
        ),
        JobKind::Copy(copy) => format!(
            "copy from {}{}",
            copy.from,
            if copy.vms.is_empty() {
                String::new()
            } else {
                format!(" of {} VM pattern(s)", copy.vms.len())
            }
        ),
        JobKind::VerifyBoot(boot) => format!(
            "boot check of the latest restore point of {} (sign of life: {})",
            if boot.vms.is_empty() {
                "every VM".to_owned()
            } else {
                format!("{} VM pattern(s)", boot.vms.len())
            },
            match (&boot.console, boot.agent) {
                (Some(c), true) => format!("console `{c}` or the guest agent"),
                (Some(c), false) => format!("console `{c}`"),
                (None, _) => "the guest agent".to_owned(),
            }
        ),
        JobKind::Backup { vms, images } => {
            let mut what = Vec::new();
            if !vms.is_empty() {
                what.push(format!("{} VM pattern(s)", vms.len()));
            }
            if !images.is_empty() {
                what.push(format!("{} image(s)", images.len()));
            }
            format!("backup of {}", what.join(" and "))
        }
    };
    println!(
        "{}: valid: job {}, {what}, repository {}",
        file.display(),
        job.name.0,
        job.repository
    );
    for spec in &found.specs {
        println!("  spec {spec}");
    }
    if found.next_runs.is_empty() {
        println!("  no schedule: it runs only by hand (`backflow job run`)");
    }
    for (schedule, times) in &found.next_runs {
        let times: Vec<String> = times
            .iter()
            .map(|t| backflow_jobs::notify::utc(*t as u64))
            .collect();
        println!(
            "  schedule \"{schedule}\": next {}",
            if times.is_empty() {
                "never".to_owned()
            } else {
                times.join(", ")
            }
        );
    }
    Ok(())
}

/// One line per VM, then its warnings and error; or what a health check found.
fn summary(record: &SessionRecord) -> String {
    let mut out = format!(
        "job {}, session {}: {}\n",
        record.job, record.id, record.result
    );
    if let Some(check) = &record.health_check {
        out.push_str(&check_summary(check));
        return out;
    }
    if let Some(copy) = &record.copy {
        if let Some(report) = &copy.report {
            out.push_str(&crate::copy::text(report));
        }
        if !copy.forgotten.is_empty() {
            out.push_str(&format!(
                "  retention forgot in the target: {}\n",
                copy.forgotten.join(", ")
            ));
        }
        for w in &copy.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
        if let Some(e) = &copy.error {
            out.push_str(&format!("  error: {e}\n"));
        }
        return out;
    }
    if let Some(boot) = &record.verify_boot {
        out.push_str(&format!(
            "{:<24} {:<9} {:>8} {:>8}  restore point / reason\n",
            "vm", "result", "alive s", "run s"
        ));
        for vm in &boot.vms {
            out.push_str(&format!(
                "{:<24} {:<9} {:>8.1} {:>8}  {}{}\n",
                vm.vm,
                vm.result,
                vm.seconds,
                vm.rto_seconds.map_or("-".to_owned(), |s| format!("{s:.1}")),
                &vm.snapshot[..vm.snapshot.len().min(12)],
                vm.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(e) = &boot.error {
            out.push_str(&format!("  error: {e}\n"));
        }
        return out;
    }
    if let Some(gc) = &record.gc {
        if let Some(report) = &gc.report {
            out.push_str(&crate::gc::text(report));
        }
        if let Some(e) = &gc.error {
            out.push_str(&format!("  error: {e}\n"));
        }
        return out;
    }
    out.push_str(&format!(
        "{:<24} {:<9} {:>10} {:>10} {:>8}  snapshot\n",
        "vm", "result", "read", "written", "seconds"
    ));
    for vm in &record.vms {
        out.push_str(&format!(
            "{:<24} {:<9} {:>10} {:>10} {:>8.1}  {}\n",
            vm.vm,
            vm.result,
            ByteSize(vm.bytes_read).to_string(),
            ByteSize(vm.bytes_written).to_string(),
            vm.seconds,
            vm.snapshot.as_deref().unwrap_or("-")
        ));
        for w in &vm.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
        for n in &vm.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        if let Some(e) = &vm.error {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    out
}

/// What a health check read and found.
fn check_summary(check: &HealthCheckRecord) -> String {
    let mut out = format!(
        "health check: {} snapshots, {} chunks read ({}), {:.1} s\n",
        check.snapshots,
        check.chunks_read,
        ByteSize(check.bytes_read),
        check.seconds
    );
    if let Some(e) = &check.error {
        out.push_str(&format!("  error: {e}\n"));
    }
    for f in &check.damaged_files {
        out.push_str(&format!("  damaged file {f}\n"));
    }
    if check.damaged_chunks > 0 {
        out.push_str(&format!(
            "  {} damaged chunks marked ({} new); the next backup of a VM that still has the data \
             stores it again\n  snapshots affected: {}\n",
            check.damaged_chunks,
            check.new_marks,
            check.affected_snapshots.join(", ")
        ));
    }
    if check.healed_chunks > 0 {
        out.push_str(&format!(
            "  {} damaged chunk copies superseded by healthy copies stored later\n",
            check.healed_chunks
        ));
    }
    out
}

pub fn sessions(args: SessionsArgs) -> Result<()> {
    let repository = crate::open_repo(&crate::repo_location(&args.repo)?)?;
    let mut records = backflow_jobs::sessions_in(&repository)?;
    if let Some(job) = &args.job {
        records.retain(|r| &r.job == job);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!(
        "{:<25} {:<16} {:<21} {:>7} {:<9} vms",
        "session", "job", "started (UTC)", "seconds", "result"
    );
    for r in &records {
        let vms: Vec<String> = r
            .vms
            .iter()
            .map(|v| format!("{} {}", v.vm, v.result))
            .collect();
        println!(
            "{:<25} {:<16} {:<21} {:>7} {:<9} {}",
            r.id,
            r.job,
            backflow_repository::rfc3339(r.started),
            r.ended - r.started,
            r.result,
            if vms.is_empty() {
                r.error.clone().unwrap_or_default()
            } else {
                vms.join(", ")
            }
        );
    }
    Ok(())
}
