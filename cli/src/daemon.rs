//! `backflow daemon --jobs DIR`: runs the jobs of DIR (every `*.yaml`) on their schedules.
//!
//! The job files are read once, at start (a bad one stops the daemon before anything runs: exit
//! 2 with file:line:column); restart the daemon after changing them. Each job's last session is
//! read from its repository, so that a run missed while the daemon was down, or cancelled by its
//! stop, is caught up once at start (see `backflow_jobs::schedule` for the rules). Each run is a
//! thread calling `backflow_jobs::run_job`; its session is recorded in the repository and logged
//! here.
//!
//! The daemon's own lines (each job loaded with its next run; each session's start; its end with
//! the outcome, the time it took and the job's next run) are logged at `info`, and shown at the
//! default log level ([`DEFAULT_LOG`]): a daemon's log is its operator's record of what ran.
//! Values are written for people: times in UTC, durations as `3m 07s`, `never` for a job
//! without a schedule.
//!
//! SIGTERM or SIGINT: no run starts any more, the running ones are cancelled (their pipelines
//! stop, cleanup runs, nothing half-committed, the sessions are recorded `cancelled`), the daemon
//! waits for them and exits 0. A second signal exits at once (130).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use backflow_jobs::schedule::Scheduler;
use backflow_jobs::{Job, JobError, RunJobOptions, SessionRecord, Source, Verdict};
use backflow_pipeline::CancelToken;

use crate::{BadInput, signals};

/// The longest sleep between two checks: how late a signal or a run's end may be noticed
/// (a run's end usually wakes the daemon at once).
const TICK: Duration = Duration::from_secs(1);

/// The log filter of `backflow daemon` when neither `--log` nor `RUST_LOG` says otherwise: the
/// global default (`warn`), and the daemon's own lines at `info`.
pub const DEFAULT_LOG: &str = "warn,backflow::daemon=info";

#[derive(clap::Args)]
pub struct Args {
    /// The directory of job files: every `*.yaml` in it is a job (read at start).
    #[arg(long)]
    jobs: PathBuf,
}

/// A run that ended: the job's index, then its session and whether the record was stored, or
/// `None` when the run panicked (the panic message is on stderr).
type Ended = (usize, Option<(SessionRecord, Result<(), JobError>)>);

pub fn run(args: Args) -> Result<()> {
    let jobs = load_jobs(&args.jobs)?;
    let cancel = CancelToken::new();
    signals::cancel_on_signals(cancel.clone());

    let now = backflow_jobs::run::now();
    let jobs: Vec<(Job, Option<i64>)> = jobs
        .into_iter()
        .map(|job| {
            let last = last_started(&job);
            (job, last)
        })
        .collect();
    let mut scheduler = Scheduler::new(jobs, now);
    for i in 0..scheduler.len() {
        let job = scheduler.job(i);
        tracing::info!(
            job = %job.name.0,
            repository = %job.repository,
            next = %when(backflow_jobs::schedule::next_due(job, now)),
            "Job loaded."
        );
    }
    tracing::info!(jobs = scheduler.len(), dir = %args.jobs.display(), "Daemon started.");

    let (ended_tx, ended_rx) = mpsc::channel::<Ended>();
    // Jobs due but refused for busy VMs: only a run ending frees VMs, so they are tried again
    // (their VMs listed again) then, not at every tick.
    let mut waiting = BTreeSet::new();
    loop {
        while let Ok(ended) = ended_rx.try_recv() {
            finished(&mut scheduler, ended);
            waiting.clear();
        }
        if cancel.is_cancelled() {
            break;
        }
        let now = backflow_jobs::run::now();
        for i in scheduler.due(now) {
            if waiting.contains(&i) {
                continue;
            }
            let job = scheduler.job(i).clone();
            // Listed once: the selection marks the VMs busy and is what the run backs up. A health
            // check or a gc backs up no VM: it runs beside any backup.
            let selected = (!job.is_maintenance()).then(|| backflow_jobs::run::plan(&job, None));
            if !scheduler.start(i, busy_vms(selected.as_ref())) {
                tracing::debug!(job = %job.name.0, "Due, waiting for VMs another job backs up.");
                waiting.insert(i);
                continue;
            }
            tracing::info!(
                job = %job.name.0,
                sources = selected.as_ref().and_then(|s| s.as_ref().ok()).map_or(0, Vec::len),
                "Session started."
            );
            let options = RunJobOptions {
                cancel: cancel.clone(),
                only: None,
                selected,
            };
            let tx = ended_tx.clone();
            // Not joined: its end comes through the channel (a dropped handle detaches).
            let spawned = std::thread::Builder::new()
                .name(format!("job {}", job.name.0))
                .spawn(move || {
                    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        backflow_jobs::run_job(&job, &options)
                    }));
                    let _ = tx.send((i, ended.ok()));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start a thread for the session.");
                scheduler.finish(i);
            }
        }
        let wait = scheduler
            .next_wake()
            .map(|t| Duration::from_secs(u64::try_from(t - backflow_jobs::run::now()).unwrap_or(0)))
            .unwrap_or(TICK)
            .min(TICK);
        if let Ok(ended) = ended_rx.recv_timeout(wait) {
            finished(&mut scheduler, ended);
            waiting.clear();
        }
    }

    if scheduler.running() > 0 {
        tracing::info!(
            running = scheduler.running(),
            "Stopping: waiting for the running sessions."
        );
    }
    // Every running session's thread sends its end, panic or not.
    while scheduler.running() > 0 {
        let Ok(ended) = ended_rx.recv() else { break };
        finished(&mut scheduler, ended);
    }
    tracing::info!("Daemon stopped.");
    Ok(())
}

/// Every `*.yaml` of `dir`, in name order. Any bad file, or two jobs of one name, is bad input.
fn load_jobs(dir: &Path) -> Result<Vec<Job>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| BadInput(format!("{}: cannot list the job files: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(BadInput(format!("{}: no job files (*.yaml)", dir.display())).into());
    }
    let mut jobs: Vec<Job> = Vec::new();
    for file in &files {
        let job = backflow_jobs::load(file).map_err(|e| BadInput(e.to_string()))?;
        if jobs.iter().any(|j| j.name == job.name) {
            return Err(BadInput(format!(
                "{}: a second job named {} in {}",
                file.display(),
                job.name.0,
                dir.display()
            ))
            .into());
        }
        if job.schedule.is_empty() {
            tracing::warn!(job = %job.name.0, file = %file.display(), "The job has no schedule: it never runs here.");
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// The start of the job's latest recorded session that was not cancelled: a run cut short by
/// stopping the daemon is owed, and caught up at the next start. (A failed run is not: retrying
/// it at every start could loop.) A repository that cannot be read counts as no session (the job
/// waits for its next time; its run will report the repository's error).
fn last_started(job: &Job) -> Option<i64> {
    match backflow_jobs::sessions(&job.repository) {
        Ok(sessions) => sessions
            .iter()
            .filter(|s| s.job == job.name.0 && s.result != Verdict::Cancelled)
            .map(|s| s.started)
            .max(),
        Err(e) => {
            tracing::warn!(job = %job.name.0, error = %e, "Cannot read the job's sessions.");
            None
        }
    }
}

/// The VMs and images a run selected, to keep two jobs off one. When the selection failed the
/// run goes ahead with none marked busy: it records why.
fn busy_vms(selected: Option<&Result<Vec<Source>, JobError>>) -> Vec<String> {
    match selected {
        Some(Ok(selected)) => selected.iter().map(Source::key).collect(),
        _ => Vec::new(),
    }
}

/// A scheduled time as the log shows it: `2026-12-04 02:00:00 UTC`, or `never`.
fn when(time: Option<i64>) -> String {
    time.map(|t| backflow_jobs::notify::utc(t.max(0) as u64))
        .unwrap_or_else(|| "never".into())
}

fn finished(scheduler: &mut Scheduler, (index, ended): Ended) {
    scheduler.finish(index);
    let Some((record, stored)) = ended else {
        tracing::error!(job = %scheduler.job(index).name.0, "Session panicked; not recorded.");
        return;
    };
    let sources = record.vms.len();
    let failed = record
        .vms
        .iter()
        .filter(|v| v.result == Verdict::Failure)
        .count();
    let took = backflow_jobs::notify::duration(Duration::from_secs(
        u64::try_from(record.ended - record.started).unwrap_or(0),
    ));
    let next = when(scheduler.next_run(index));
    let (job, session, outcome) = (&record.job, &record.id, record.result);
    match (record.result, &record.error) {
        (Verdict::Success, _) => tracing::info!(
            job = %job, session = %session, %outcome, sources, %took, %next, "Session ended."
        ),
        (Verdict::Warning | Verdict::Cancelled, _) => tracing::warn!(
            job = %job, session = %session, %outcome, sources, %took, %next, "Session ended."
        ),
        (Verdict::Failure, Some(error)) => tracing::error!(
            job = %job, session = %session, %outcome, %error, %took, %next, "Session ended."
        ),
        (Verdict::Failure, None) => tracing::error!(
            job = %job, session = %session, %outcome, sources, failed, %took, %next,
            "Session ended."
        ),
    }
    if let Err(e) = stored {
        tracing::error!(job = %record.job, error = %e, "The session was not recorded.");
    }
}
