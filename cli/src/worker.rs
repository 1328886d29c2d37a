//! `backflow worker`: one VM's backup on a cluster's host, for a controller that started it over SSH
//! (the protocol: [`backflow_jobs::worker`]).
//!
//! Two processes: this one reads the task from stdin and starts `backflow worker --run` with the
//! task's environment (the store's credentials become that process's environment, never a command
//! line; a passphrase goes into a private file for the run), hands it the task and passes its events
//! straight through on stdout. Meanwhile it watches stdin: when the controller closes it (the session
//! ended, or the SSH connection died with the controller's host), the run is told to stop (SIGTERM:
//! it cancels and cleans up as any cancelled run does). So does a controller that goes silent
//! longer than the task's heartbeat allows (its host or the network between them dropped: a TCP
//! connection may not notice for hours). A run that does not end within
//! [`worker::STOP_GRACE`] of being told is killed. It exits with
//! the run's status. A run that is killed cannot clean up: this process then ends the backup job
//! and removes the job directory it left for the VM.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use backflow_jobs::Verdict;
use backflow_jobs::worker::{self, Task};
use backflow_pipeline::CancelToken;

use crate::{BadInput, Interrupted, signals};

/// How often the worker looks whether its run ended.
const POLL: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct Args {
    /// Run the task on stdin in this process (what the worker starts; not for direct use).
    #[arg(long, hide = true)]
    run: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.run {
        return run_here();
    }
    // SIGTERM/SIGINT, or the controller closing stdin: the run is asked to stop, and waited for.
    let stop = CancelToken::default();
    signals::cancel_on_signals(stop.clone());
    let task = worker::read_task(&mut std::io::stdin().lock())
        .map_err(|e| BadInput::new(format!("worker: {e}")))?;

    // What lost runs of this host left (a run cut off from its VM's host cannot end its job).
    for done in worker::sweep_dead_runs() {
        tracing::warn!("{done}");
    }
    // Private to this run: the directory is created 0700, the passphrase file in it 0600.
    let private = tempfile::Builder::new()
        .prefix("backflow-worker-")
        .tempdir()
        .context("creating the worker's private directory")?;
    let mut command = Command::new(std::env::current_exe().context("finding backflow itself")?);
    command.arg("worker").arg("--run");
    if let Some(password) = &task.password {
        let path = private.path().join("password");
        write_private(&path, password.as_bytes())?;
        command.arg("--password-file").arg(&path);
    }
    let mut child = command
        .envs(&task.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the worker's run")?;
    {
        let mut to_child = child.stdin.take().expect("stdin is piped");
        let mut line = serde_json::to_string(&task)?;
        line.push('\n');
        to_child
            .write_all(line.as_bytes())
            .context("handing the task to the worker's run")?;
    }
    let heard = watch_controller(stop.clone());
    let silence = task
        .heartbeat
        .map(|s| Duration::from_secs(s.max(1)) * worker::SILENT_HEARTBEATS);
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(limit) = silence
            && !stop.is_cancelled()
            && heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed() > limit
        {
            tracing::warn!(
                "No word from the controller for {} s: taking it for gone.",
                limit.as_secs()
            );
            stop.cancel();
        }
        // Not reaped yet (try_wait said so), so the pid is still the run's.
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        match stopping {
            None if stop.is_cancelled() => {
                stopping = Some(Instant::now());
                tracing::warn!(
                    "Stopping the run: the controller closed the session or went silent, or a signal came."
                );
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            Some(since) if !killed && since.elapsed() > worker::STOP_GRACE => {
                killed = true;
                tracing::warn!(
                    "The run did not stop within {} s: killing it.",
                    worker::STOP_GRACE.as_secs()
                );
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    };
    drop(private);
    if status.code().is_none() {
        // Killed (SIGKILL, a crash): its cleanup never ran. End what it left on this host, so that
        // neither its backup job nor its job directory outlives it (the controller retries the VM
        // elsewhere, and that retry needs the VM free of this run's job).
        for done in worker::sweep_dead_runs() {
            tracing::warn!("{done}");
        }
    }
    match status.code() {
        Some(0) => Ok(()),
        Some(130) => Err(Interrupted.into()),
        Some(code) => bail!("the worker's run ended with status {code}"),
        None => bail!("the worker's run was killed ({status})"),
    }
}

/// On a thread: reads stdin to its end (the controller closing it), then cancels `stop`; the
/// returned instant is when the controller was last heard (a heartbeat line, or anything).
/// (Stdin's buffer is the process's: what the task's read took beyond its line is read here.)
fn watch_controller(stop: CancelToken) -> Arc<Mutex<Instant>> {
    let heard = Arc::new(Mutex::new(Instant::now()));
    let last = heard.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        while let Ok(1..) = std::io::stdin().read(&mut sink) {
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        stop.cancel();
    });
    heard
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// The worker's run: the task from stdin, events to stdout; SIGTERM cancels it.
fn run_here() -> Result<()> {
    let cancel = CancelToken::default();
    signals::cancel_on_signals(cancel.clone());
    let task: Task = worker::read_task(&mut std::io::stdin().lock())
        .map_err(|e| BadInput::new(format!("worker: {e}")))?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let emit: worker::Emit = Arc::new(move |event| {
        let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
        // A controller that went away is noticed by the parent (stdin closes), which stops this run.
        let _ = worker::send(&mut *out, event);
    });
    let record = worker::run_task(&task, cancel, emit);
    match record.result {
        Verdict::Success | Verdict::Warning => Ok(()),
        Verdict::Cancelled => Err(Interrupted.into()),
        Verdict::Failure => bail!(
            "{}: {}",
            record.vm,
            record.error.as_deref().unwrap_or("failed")
        ),
    }
}
