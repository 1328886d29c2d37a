//! The export process: `backflow serve` on the recovery's socket, started, waited for, stopped.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backflow_repository::{Location, keys};
use tracing::{debug, warn};

use crate::state::ServerRecord;

/// How long a stopped export may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How to start the export: the program and its arguments up to (not including) `--listen`, and
/// environment variables to add (a password file, the S3 settings are inherited anyway).
#[derive(Debug, Clone)]
pub struct ServeCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl ServeCommand {
    /// `PROGRAM serve --repo LOCATION --snapshot ID`: the export of restore point `snapshot` (an id)
    /// of the repository at `location`, by `program` (this binary), with the passphrase file this
    /// process uses for that repository ([`backflow_repository::keys::password_file_for`]). A local
    /// repository's path and the passphrase file's are made absolute: the export may run in
    /// another directory.
    pub fn of_restore_point(program: PathBuf, location: &Location, snapshot: &str) -> ServeCommand {
        let repository = match location {
            Location::Local(path) => {
                Location::Local(std::path::absolute(path).unwrap_or_else(|_| path.clone()))
            }
            other => other.clone(),
        };
        let env = keys::password_file_for(&location.to_string())
            .map(|file| {
                (
                    OsString::from(keys::PASSWORD_FILE_ENV),
                    std::path::absolute(&file).unwrap_or(file).into_os_string(),
                )
            })
            .into_iter()
            .collect();
        ServeCommand {
            program,
            args: vec![
                "serve".into(),
                "--repo".into(),
                repository.to_string().into(),
                "--snapshot".into(),
                snapshot.into(),
            ],
            env,
        }
    }

    /// The export's command, listening on `socket`; the caller sets its standard streams.
    pub fn command(&self, socket: &Path) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts the export on `socket`, its output into `log`, and waits until the socket accepts
    /// connections (or the process exits: the error then holds the end of its log).
    pub(crate) fn spawn(
        &self,
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<ServerProcess, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = self.command(socket);
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // A group of its own: it outlives the command that started it, and a Ctrl-C on that
            // command's terminal does not reach it.
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let pid = child.id();
        let start_ticks = start_ticks(pid).unwrap_or(0);
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the export ({} serve) ended before it answered ({status}): {}",
                    self.program.display(),
                    log_tail(log)
                ));
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                debug!(
                    pid,
                    ms = began.elapsed().as_millis() as u64,
                    "The export answers."
                );
                return Ok(ServerProcess {
                    child: Some(child),
                    record: ServerRecord { pid, start_ticks },
                });
            }
            if began.elapsed() > timeout {
                let process = ServerProcess {
                    child: Some(child),
                    record: ServerRecord { pid, start_ticks },
                };
                process.stop();
                return Err(format!(
                    "the export did not answer on {} within {} s: {}",
                    socket.display(),
                    timeout.as_secs(),
                    log_tail(log)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The last lines of a log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "it printed nothing".into();
    }
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// A running export this process started.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    record: ServerRecord,
}

impl ServerProcess {
    pub(crate) fn record(&self) -> ServerRecord {
        self.record.clone()
    }

    /// Lets it run on after this process (it is not waited for here).
    pub(crate) fn release(mut self) {
        self.child = None;
    }

    /// Stops it (SIGTERM, then SIGKILL after a grace) and reaps it.
    pub(crate) fn stop(mut self) {
        stop(&self.record);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stops the export a state file records, if that process still runs (the same pid and start
    /// time: a reused pid is left alone).
    pub fn stop_recorded(record: &ServerRecord) {
        stop(record);
    }
}

/// Whether the recorded export still runs.
pub fn is_running(record: &ServerRecord) -> bool {
    start_ticks(record.pid).is_some_and(|t| t == record.start_ticks)
}

fn stop(record: &ServerRecord) {
    if !is_running(record) {
        return;
    }
    let Some(pid) = rustix::process::Pid::from_raw(record.pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let began = Instant::now();
    while is_running(record) && !is_zombie(record.pid) {
        if began.elapsed() > STOP_GRACE {
            warn!(pid = record.pid, "The export did not stop in time: killed.");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Field 22 of `/proc/PID/stat` (the process's start time), or `None` when it does not exist.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_names_this_process() {
        let me = std::process::id();
        let ticks = start_ticks(me).expect("this process has a stat");
        assert!(is_running(&ServerRecord {
            pid: me,
            start_ticks: ticks
        }));
        assert!(!is_running(&ServerRecord {
            pid: me,
            start_ticks: ticks + 1
        }));
    }

    #[test]
    fn an_export_that_exits_at_once_is_an_error_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let command = ServeCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo no such snapshot >&2; exit 3".into()],
            env: Vec::new(),
        };
        let err = command
            .spawn(
                &dir.path().join("s.sock"),
                &dir.path().join("serve.log"),
                Duration::from_secs(10),
            )
            .unwrap_err();
        assert!(err.contains("no such snapshot"), "{err}");
        assert!(err.contains("ended before it answered"), "{err}");
    }
}
