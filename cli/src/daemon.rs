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
//! The daemon serves its console ([`backflow_console`]: HTTP API, `/metrics`, web pages) on
//! `--http` (default `127.0.0.1:8420`; `off`: none): it shows the jobs, sessions, VMs, restore
//! points, repositories and the running pipelines' live statistics, and takes the operator's
//! requests (run a job now, enable or disable one; actions on restore points run as tasks).
//! A job's enabled state is the last `enable`/`disable` action recorded in its repository's
//! session history, read at start like its last session.
//!
//! SIGTERM or SIGINT: no run starts any more, the running ones are cancelled (their pipelines
//! stop, cleanup runs, nothing half-committed, the sessions are recorded `cancelled`), the daemon
//! waits for them and exits 0. A second signal exits at once (130).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::Result;
use backflow_console::{Console, ControlError, HttpOptions, JobState};
use backflow_jobs::schedule::Scheduler;
use backflow_jobs::{Job, JobError, RunJobOptions, SessionRecord, Source, Verdict};
use backflow_pipeline::{CancelToken, LivePipelines};

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
    /// Where the console (HTTP API, /metrics, web pages) listens: ADDR:PORT, or `off`. An address
    /// other than loopback needs --tls-cert, --tls-key and --tokens.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = backflow_console::DEFAULT_LISTEN)]
    http: String,
    /// The console's TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The console's TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The console's tokens (YAML: name, role operator|read-only, file holding the secret).
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Where restores asked through the console write (a new directory each).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/backflow/restores")]
    restore_dir: PathBuf,
}

/// A run that ended: the job's index, then its session and whether the record was stored, or
/// `None` when the run panicked (the panic message is on stderr).
type Ended = (usize, Option<(SessionRecord, Result<(), JobError>)>);

/// What wakes the daemon's loop.
enum Event {
    Ended(Box<Ended>),
    /// The console asks for a run now, by `who`.
    RunNow {
        job: String,
        who: String,
        reply: mpsc::Sender<Result<(), ControlError>>,
    },
    SetEnabled {
        job: String,
        enabled: bool,
        who: String,
        reply: mpsc::Sender<Result<(), ControlError>>,
    },
}

/// The console's view of the daemon: the jobs' state as the loop last published it, and the
/// loop's mailbox.
struct DaemonControl {
    state: Mutex<Vec<JobState>>,
    events: Mutex<mpsc::Sender<Event>>,
}

impl DaemonControl {
    fn ask(
        &self,
        event: impl FnOnce(mpsc::Sender<Result<(), ControlError>>) -> Event,
    ) -> Result<(), ControlError> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(event(tx));
        if sent.is_err() {
            return Err(ControlError::Stopping);
        }
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or(Err(ControlError::Stopping))
    }

    fn publish(&self, scheduler: &Scheduler, jobs: &[Arc<Job>]) {
        let state = jobs
            .iter()
            .enumerate()
            .map(|(i, job)| JobState {
                job: Arc::clone(job),
                enabled: scheduler.is_enabled(i),
                running: scheduler.is_running(i),
                requested_by: scheduler
                    .requested_by(i)
                    .filter(|w| *w != backflow_jobs::schedule::SCHEDULE)
                    .map(str::to_owned),
                next_run: scheduler.next_run(i),
            })
            .collect();
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

impl backflow_console::Control for DaemonControl {
    fn jobs(&self) -> Vec<JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run_now(&self, job: &str, who: &str) -> Result<(), ControlError> {
        self.ask(|reply| Event::RunNow {
            job: job.to_owned(),
            who: who.to_owned(),
            reply,
        })
    }

    fn set_enabled(&self, job: &str, enabled: bool, who: &str) -> Result<(), ControlError> {
        self.ask(|reply| Event::SetEnabled {
            job: job.to_owned(),
            enabled,
            who: who.to_owned(),
            reply,
        })
    }
}

pub fn run(args: Args) -> Result<()> {
    let jobs = load_jobs(&args.jobs)?;
    let http = http_options(&args)?;
    let cancel = CancelToken::new();
    signals::cancel_on_signals(cancel.clone());

    let now = backflow_jobs::run::now();
    let shared: Vec<Arc<Job>> = jobs.iter().cloned().map(Arc::new).collect();
    let mut enabled = Vec::with_capacity(jobs.len());
    let jobs: Vec<(Job, Option<i64>)> = jobs
        .into_iter()
        .map(|job| {
            let (last, on) = history(&job);
            enabled.push(on);
            (job, last)
        })
        .collect();
    let mut scheduler = Scheduler::new(jobs, now);
    for (i, on) in enabled.into_iter().enumerate() {
        if !on {
            scheduler.set_enabled(i, false);
        }
    }
    let live = LivePipelines::new();
    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let control = Arc::new(DaemonControl {
        state: Mutex::new(Vec::new()),
        events: Mutex::new(events_tx.clone()),
    });
    control.publish(&scheduler, &shared);
    let console = match http {
        Some(options) => {
            let console = Console::start(
                options,
                Arc::clone(&control) as Arc<dyn backflow_console::Control>,
                Arc::clone(&live),
            )
            .map_err(|e| BadInput(e.to_string()))?;
            tracing::info!(url = %console.url(), "Console listening.");
            Some(console)
        }
        None => None,
    };
    for i in 0..scheduler.len() {
        let job = scheduler.job(i);
        tracing::info!(
            job = %job.name.0,
            repository = %job.repository,
            next = %when(scheduler.next_run(i)),
            enabled = scheduler.is_enabled(i),
            "Job loaded."
        );
    }
    tracing::info!(jobs = scheduler.len(), dir = %args.jobs.display(), "Daemon started.");

    // Jobs due but refused for busy VMs: only a run ending frees VMs, so they are tried again
    // (their VMs listed again) then, not at every tick.
    let mut waiting = BTreeSet::new();
    loop {
        while let Ok(event) = events_rx.try_recv() {
            handle(&mut scheduler, event, &mut waiting);
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
            // Read before the start, which clears it.
            let requested_by = scheduler_requested(&scheduler, i);
            if !scheduler.start(i, busy_vms(selected.as_ref())) {
                tracing::debug!(job = %job.name.0, "Due, waiting for VMs another job backs up.");
                waiting.insert(i);
                continue;
            }
            tracing::info!(
                job = %job.name.0,
                sources = selected.as_ref().and_then(|s| s.as_ref().ok()).map_or(0, Vec::len),
                requested_by = %requested_by,
                "Session started."
            );
            let options = RunJobOptions {
                cancel: cancel.clone(),
                only: None,
                selected,
                live: Some(Arc::clone(&live)),
                requested_by: Some(requested_by),
            };
            let tx = events_tx.clone();
            // Not joined: its end comes through the channel (a dropped handle detaches).
            let spawned = std::thread::Builder::new()
                .name(format!("job {}", job.name.0))
                .spawn(move || {
                    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        backflow_jobs::run_job(&job, &options)
                    }));
                    let _ = tx.send(Event::Ended(Box::new((i, ended.ok()))));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start a thread for the session.");
                scheduler.finish(i);
            }
        }
        control.publish(&scheduler, &shared);
        let wait = scheduler
            .next_wake()
            .map(|t| Duration::from_secs(u64::try_from(t - backflow_jobs::run::now()).unwrap_or(0)))
            .unwrap_or(TICK)
            .min(TICK);
        if let Ok(event) = events_rx.recv_timeout(wait) {
            handle(&mut scheduler, event, &mut waiting);
        }
        control.publish(&scheduler, &shared);
    }

    if scheduler.running() > 0 {
        tracing::info!(
            running = scheduler.running(),
            "Stopping: waiting for the running sessions."
        );
    }
    // Every running session's thread sends its end, panic or not. The console still answers
    // meanwhile; what it asks now is refused.
    while scheduler.running() > 0 {
        let Ok(event) = events_rx.recv() else { break };
        match event {
            Event::Ended(ended) => finished(&mut scheduler, *ended),
            Event::RunNow { reply, .. } | Event::SetEnabled { reply, .. } => {
                let _ = reply.send(Err(ControlError::Stopping));
            }
        }
        control.publish(&scheduler, &shared);
    }
    drop(console);
    tracing::info!("Daemon stopped.");
    Ok(())
}

/// Who asked for job `i`'s owed run.
fn scheduler_requested(scheduler: &Scheduler, i: usize) -> String {
    scheduler
        .requested_by(i)
        .unwrap_or(backflow_jobs::schedule::SCHEDULE)
        .to_owned()
}

/// One event of the loop: a run's end, or a request of the console.
fn handle(scheduler: &mut Scheduler, event: Event, waiting: &mut BTreeSet<usize>) {
    let find = |scheduler: &Scheduler, name: &str| {
        (0..scheduler.len())
            .find(|&i| scheduler.job(i).name.0 == name)
            .ok_or_else(|| ControlError::UnknownJob(name.to_owned()))
    };
    match event {
        Event::Ended(ended) => {
            finished(scheduler, *ended);
            waiting.clear();
        }
        Event::RunNow { job, who, reply } => {
            let answer = find(scheduler, &job).and_then(|i| {
                if scheduler.request(i, &who) {
                    waiting.remove(&i);
                    tracing::info!(job = %job, requested_by = %who, "Run asked for.");
                    Ok(())
                } else {
                    Err(ControlError::Running(job.clone()))
                }
            });
            let _ = reply.send(answer);
        }
        Event::SetEnabled {
            job,
            enabled,
            who,
            reply,
        } => {
            let answer = find(scheduler, &job).map(|i| {
                scheduler.set_enabled(i, enabled);
                tracing::info!(job = %job, enabled, requested_by = %who, "Job schedule changed.");
            });
            let _ = reply.send(answer);
        }
    }
}

/// The console's options from the command line (`None`: `--http off`).
fn http_options(args: &Args) -> Result<Option<HttpOptions>> {
    if args.http == "off" {
        if args.tls_cert.is_some() || args.tokens.is_some() {
            return Err(BadInput(
                "--http off: --tls-cert, --tls-key and --tokens need a console".into(),
            )
            .into());
        }
        return Ok(None);
    }
    let listen = args.http.parse().map_err(|_| {
        BadInput(format!(
            "--http {}: expected ADDR:PORT (127.0.0.1:8420, [::1]:8420, 0.0.0.0:8443) or off",
            args.http
        ))
    })?;
    Ok(Some(HttpOptions {
        listen,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        tokens: args.tokens.clone(),
        restore_dir: args.restore_dir.clone(),
    }))
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

/// From the job's repository's history: the start of its latest recorded session that was not
/// cancelled (a run cut short by stopping the daemon is owed, and caught up at the next start; a
/// failed run is not: retrying it at every start could loop), and whether it is enabled (the last
/// `enable`/`disable` asked through the console; enabled when none was). A repository that cannot
/// be read counts as no session and enabled (the job waits for its next time; its run will report
/// the repository's error).
fn history(job: &Job) -> (Option<i64>, bool) {
    match backflow_jobs::sessions(&job.repository) {
        Ok(sessions) => {
            let last = sessions
                .iter()
                .filter(|s| s.job == job.name.0 && s.result != Verdict::Cancelled)
                .map(|s| s.started)
                .max();
            let enabled = sessions
                .iter()
                .filter_map(|s| s.action.as_ref().map(|a| (s.started, &s.id, a)))
                .filter(|(_, _, a)| a.job.as_deref() == Some(&job.name.0))
                .filter(|(_, _, a)| a.kind == "enable" || a.kind == "disable")
                .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)))
                .is_none_or(|(_, _, a)| a.kind == "enable");
            (last, enabled)
        }
        Err(e) => {
            tracing::warn!(job = %job.name.0, error = %e, "Cannot read the job's sessions.");
            (None, true)
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
