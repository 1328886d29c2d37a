//! The worker protocol: what a controller hands a worker for one VM (a [`Task`]) and what the
//! worker sends back while it runs ([`Event`]s), as one JSON document on the worker's stdin and
//! JSON lines on its stdout.
//!
//! A worker is `backflow worker` on the host chosen for the VM, started by the controller over SSH
//! for the session. It reads one task, runs its pipeline, streams progress, and ends with exactly
//! one [`Event::Record`]: the VM's record as the session stores it (without retention, which the
//! controller applies once after every VM). A stream that ends without a record means the worker
//! died (or its host dropped off the network): the controller fails that VM cleanly and may retry it
//! elsewhere. The worker watches its stdin after the task: when it closes (the controller ended the
//! session, or its SSH connection died), or stays silent longer than the task's heartbeat allows
//! (the controller's host or the network dropped), the run is cancelled and cleans up as a
//! cancelled run does; one that does not end within [`STOP_GRACE`] is killed, and the worker ends
//! what it left ([`sweep_dead_runs`]).
//!
//! Secrets (the store's credentials, an encryption passphrase) travel in the task, never on a
//! command line: [`Task::env`] becomes the pipeline process's environment, and a passphrase is
//! written to a private file for the run only.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use backflow_pipeline::spec::{self, Override};
use backflow_pipeline::{CancelToken, RunOptions};
use backflow_stages::Stages;
use serde::{Deserialize, Serialize};

use crate::run::{Verdict, VmRecord, fill};

/// The protocol's version: a worker refuses a task of another (the controller and the workers of
/// one cluster run one release).
pub const PROTOCOL: u32 = 1;

/// The largest task a worker reads (a spec, its variables and a few credentials).
pub const MAX_TASK_SIZE: u64 = 1 << 20;

/// How often a worker reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One VM's backup, as the controller hands it to a worker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub protocol: u32,
    /// The job's name (for logs).
    pub job: String,
    /// The cluster's name for the host this worker runs on (echoed in [`Event::Started`]).
    pub host: String,
    /// The VM (or image) this task backs up, as its record names it before it ran.
    pub label: String,
    /// The spec's name in errors, and its text (the controller reads the file: the worker's host
    /// need not have it).
    pub spec_name: String,
    pub spec: String,
    /// The spec's variables, and stage overrides, as the job resolved them for this VM.
    pub variables: Vec<(String, String)>,
    #[serde(default)]
    pub overrides: Vec<(String, String, String)>,
    /// Environment of the pipeline process: the store's settings and credentials (`AWS_*`,
    /// `BACKFLOW_S3_*`). Never logged.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The repository's passphrase, when it is encrypted. Never logged.
    #[serde(default)]
    pub password: Option<String>,
    /// The controller writes a line on the worker's stdin at least this often (seconds): a worker
    /// that hears nothing for [`SILENT_HEARTBEATS`] of them takes the controller for gone (its host
    /// or the network between them dropped, which a TCP connection may not notice for hours) and
    /// stops its run. `None`: no heartbeat, the worker stops only when stdin closes.
    #[serde(default)]
    pub heartbeat: Option<u64>,
}

/// How many heartbeats a worker may miss before it stops its run.
pub const SILENT_HEARTBEATS: u32 = 4;

/// How long a worker's run may take to end after it was told to stop before the worker kills it and
/// cleans up after it ([`sweep_dead_runs`]): a run whose store does not answer may
/// otherwise retry a request for minutes.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

impl Task {
    /// The overrides as the spec loader takes them.
    pub fn overrides(&self) -> Vec<Override> {
        self.overrides
            .iter()
            .map(|(stage, option, value)| Override {
                stage: stage.clone(),
                option: option.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// The environment names a task may set: the store's settings only (a task cannot change
    /// `PATH`, `LD_PRELOAD` or anything else of the worker's host).
    pub fn allowed_env(name: &str) -> bool {
        name.starts_with("AWS_")
            || name.starts_with("BACKFLOW_S3_")
            || (backflow_pipeline::hooks::ENABLED && name.starts_with("BACKFLOW_PAUSE_"))
    }
}

/// What a worker sends, one JSON object per line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The pipeline started on this host.
    Started { host: String, version: String },
    /// Bytes done of bytes planned so far.
    Progress {
        elapsed: f64,
        done: u64,
        planned: u64,
    },
    /// The VM's record: the last event.
    Record { record: Box<VmRecord> },
}

/// Reads a task from `input` (at most [`MAX_TASK_SIZE`] bytes, one JSON document on one line):
/// the error says what was wrong, for the controller to report.
pub fn read_task(input: &mut impl BufRead) -> Result<Task, String> {
    let mut line = String::new();
    let mut limited = input.by_ref().take(MAX_TASK_SIZE);
    limited
        .read_line(&mut line)
        .map_err(|e| format!("reading the task: {e}"))?;
    if line.is_empty() {
        return Err("no task: stdin closed before a task was sent".into());
    }
    if !line.ends_with('\n') && line.len() as u64 >= MAX_TASK_SIZE {
        return Err(format!("the task is larger than {MAX_TASK_SIZE} bytes"));
    }
    let task: Task =
        serde_json::from_str(&line).map_err(|e| format!("the task is not valid: {e}"))?;
    if task.protocol != PROTOCOL {
        return Err(format!(
            "the task speaks worker protocol {}, this backflow ({}) speaks {PROTOCOL}: run the same \
             release on the controller and the hosts",
            task.protocol,
            env!("CARGO_PKG_VERSION")
        ));
    }
    if let Some(name) = task.env.keys().find(|k| !Task::allowed_env(k)) {
        return Err(format!(
            "the task sets {name}: a task may set only AWS_* and BACKFLOW_S3_* variables"
        ));
    }
    Ok(task)
}

/// Where a worker's events go (its stdout, in `backflow worker`).
pub type Emit = std::sync::Arc<dyn Fn(&Event) + Send + Sync>;

/// Runs `task`'s pipeline in this process, sending events to `emit`; returns the record (also
/// sent). The process's environment must already hold the task's (the worker starts the process
/// that calls this with it).
pub fn run_task(task: &Task, cancel: CancelToken, emit: Emit) -> VmRecord {
    let started = Instant::now();
    let mut record = crate::run::record_for(&task.label);
    emit(&Event::Started {
        host: task.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    let pipeline = match spec::load_str_with(
        &task.spec_name,
        &task.spec,
        &task.variables,
        &task.overrides(),
        &Stages,
    ) {
        Ok(p) => p,
        Err(e) => {
            record.result = Verdict::Failure;
            record.error = Some(format!("job {}: the spec: {e}", task.job));
            emit(&Event::Record {
                record: Box::new(record.clone()),
            });
            return record;
        }
    };
    let last = std::sync::Mutex::new(None::<Instant>);
    let progress_emit = emit.clone();
    let report = pipeline.run(RunOptions {
        cancel,
        on_progress: Some(std::sync::Arc::new(
            move |p: &backflow_pipeline::Progress<'_>| {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                progress_emit(&Event::Progress {
                    elapsed: p.elapsed.as_secs_f64(),
                    done: p.overall.done,
                    planned: p.overall.planned,
                });
            },
        )),
    });
    record.seconds = started.elapsed().as_secs_f64();
    fill(&mut record, &report);
    emit(&Event::Record {
        record: Box::new(record.clone()),
    });
    record
}

/// What `backflow worker` does before it runs a task, and after its run died without a record
/// (killed, crashed): ends what runs of this host that are over left, for any VM
/// ([`stage_libvirt::sweep_dead_runs`], in the system's temporary directory, where runs make their
/// job directories).
pub fn sweep_dead_runs() -> Vec<String> {
    stage_libvirt::sweep_dead_runs(&std::env::temp_dir())
}

/// Writes one event as a line and flushes it (the controller reads as it comes).
pub fn send(out: &mut impl Write, event: &Event) -> std::io::Result<()> {
    let mut line = serde_json::to_string(event).map_err(std::io::Error::other)?;
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()
}
