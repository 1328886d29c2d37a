//! Starting and stopping a private `qemu-nbd`.
//!
//! The server is our own child (no `--fork`), in a process group of its own so that a Ctrl-C on
//! the terminal reaches us, not it: we stop it with SIGTERM and wait for it, so that it never
//! stays behind as a zombie. (A daemon made with `--fork` would be adopted by whoever reaps
//! orphans: where that is a process that never does, as a container's init that is not one, or
//! a `backflow daemon` running as PID 1, its corpse and its intermediate parent's stayed as
//! `qemu-nbd <defunct>` for good.) It writes a pid file once it listens, which says it is ready,
//! and lets the next run stop a server whose run was killed before its cleanup. Everything it
//! owns lives in one private directory, so removing that directory is the whole of the cleanup
//! besides stopping it.

use std::fs::{File, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The export name the server is started with and the clients ask for.
pub const EXPORT_NAME: &str = "backflow";

/// Name prefix of the private directories, in the parent given to [`ServerDir::create`].
const DIR_PREFIX: &str = "backflow-qemu-nbd-";

/// How long a stopped server may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Pause between checks of whether a signalled server is gone.
const STOP_POLL: Duration = Duration::from_millis(10);

/// How long a server may take to listen (its pid file appears) before it counts as failed.
pub const START_WAIT: Duration = Duration::from_secs(30);

/// Pause between checks of whether a starting server listens.
const START_POLL: Duration = Duration::from_millis(5);

/// The private directory of one server: socket, pid file and the server's stderr; and the server
/// process, shared by the clones (a cleanup action holds one).
#[derive(Clone, Debug)]
pub struct ServerDir {
    path: PathBuf,
    server: Arc<ServerProcess>,
}

/// The running server, our child; stopped and reaped when the last [`ServerDir`] of it goes
/// without a [`ServerDir::stop_and_remove`] (a panic unwinding through the run).
#[derive(Debug, Default)]
struct ServerProcess(Mutex<Option<Child>>);

impl ServerProcess {
    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = self.lock().take()
            && let Err(e) = stop_child(child)
        {
            tracing::warn!("{e}.");
        }
    }
}

impl ServerDir {
    /// Creates a fresh directory with mode 0700 under `parent`.
    pub fn create(parent: &Path) -> io::Result<ServerDir> {
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(parent)?
            .keep();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o700))?;
        let owner = ServerDir::at(dir);
        std::fs::write(
            owner.owner_file(),
            process_identity(std::process::id()).unwrap_or_default(),
        )?;
        Ok(owner)
    }

    /// Stops the servers, and removes the directories, that earlier runs left in `parent` when
    /// they were killed before their cleanup ran: directories whose owning process (pid and start
    /// time, recorded at creation) is gone. A server is stopped only if its command line names its
    /// directory, so a recycled pid is never signalled. Returns what was cleaned, for the log.
    pub fn sweep_orphans(parent: &Path) -> Vec<String> {
        let mut cleaned = Vec::new();
        let Ok(entries) = std::fs::read_dir(parent) else {
            return cleaned;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let dir = ServerDir::at(entry.path());
            let Ok(owner) = std::fs::read_to_string(dir.owner_file()) else {
                continue;
            };
            if is_alive(&owner) {
                continue;
            }
            let server = dir.pid().filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                    String::from_utf8_lossy(&cmd).contains(&*dir.path.to_string_lossy())
                })
            });
            let stopped = server.map_or(Ok(()), stop);
            let removed = std::fs::remove_dir_all(&dir.path);
            cleaned.push(format!(
                "{}: server {:?} {}, directory {}",
                dir.path.display(),
                server,
                if stopped.is_ok() {
                    "stopped"
                } else {
                    "not stopped"
                },
                if removed.is_ok() {
                    "removed"
                } else {
                    "not removed"
                }
            ));
        }
        cleaned
    }

    fn at(path: PathBuf) -> ServerDir {
        ServerDir {
            path,
            server: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path.join("pid")
    }

    /// The creating process's pid and start time: who may still be using the directory.
    fn owner_file(&self) -> PathBuf {
        self.path.join("owner")
    }

    fn stderr_file(&self) -> PathBuf {
        self.path.join("stderr")
    }

    /// The server's pid, once it wrote its pid file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Stops the server (if it started) and waits for it, then removes the directory. Meant for
    /// a cleanup action: runs whatever the outcome, any number of times, and says what it could
    /// not do.
    pub fn stop_and_remove(&self) -> Result<(), String> {
        let child = self.server.lock().take();
        let stopped = match child {
            Some(child) => stop_child(child),
            None => Ok(()),
        };
        let removed = match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(format!("removing {}: {e}", self.path.display()))
            }
            _ => Ok(()),
        };
        stopped.and(removed)
    }
}

/// What a server exports and how.
#[derive(Clone, Debug)]
pub struct ServerConfig<'a> {
    pub image: &'a Path,
    /// Given to `qemu-nbd --format`: `qcow2` or `raw`.
    pub format: &'a str,
    /// Most clients at once (`--shared`).
    pub connections: usize,
    /// `--read-only`: backups read; restores write.
    pub read_only: bool,
    /// Persistent dirty bitmaps exported as `qemu:dirty-bitmap:NAME` contexts (`-B NAME`, repeated).
    pub bitmaps: &'a [String],
}

impl<'a> ServerConfig<'a> {
    /// A read-only export of `image` without bitmaps.
    pub fn read_only(image: &'a Path, format: &'a str, connections: usize) -> Self {
        ServerConfig {
            image,
            format,
            connections,
            read_only: true,
            bitmaps: &[],
        }
    }
}

/// A started server.
#[derive(Debug)]
pub struct QemuNbdServer {
    socket: PathBuf,
    pid: Option<u32>,
}

impl QemuNbdServer {
    /// Starts `qemu-nbd` as `config` says in `dir`; returns once the socket is ready. The server
    /// belongs to `dir` from then on: [`ServerDir::stop_and_remove`] stops it.
    pub fn start(dir: &ServerDir, config: &ServerConfig<'_>) -> io::Result<QemuNbdServer> {
        let stderr = File::create(dir.stderr_file())?;
        let mut command = Command::new("qemu-nbd");
        if config.read_only {
            command.arg("--read-only");
        }
        for bitmap in config.bitmaps {
            command.arg("--bitmap").arg(bitmap);
        }
        let mut slot = dir.server.lock();
        if slot.is_some() {
            return Err(io::Error::other(format!(
                "a qemu-nbd runs in {} already",
                dir.path.display()
            )));
        }
        let child = command
            .arg("--persistent")
            .arg("--pid-file")
            .arg(dir.pid_file())
            .arg("--socket")
            .arg(dir.socket())
            .arg("--export-name")
            .arg(EXPORT_NAME)
            .arg("--shared")
            .arg(config.connections.to_string())
            .arg("--format")
            .arg(config.format)
            .arg(config.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("running qemu-nbd: {e}")))?;
        let pid = child.id();
        // In the slot before anything can fail: whatever happens, it is stopped and reaped.
        let child = slot.insert(child);
        let deadline = Instant::now() + START_WAIT;
        // qemu-nbd writes its pid file once it listens.
        while !dir.pid_file().exists() {
            if let Some(status) = child.try_wait()? {
                slot.take();
                let said = std::fs::read_to_string(dir.stderr_file()).unwrap_or_default();
                return Err(io::Error::other(format!(
                    "qemu-nbd exited with {status}: {}",
                    said.trim()
                )));
            }
            if Instant::now() > deadline {
                drop(slot);
                let stopped = dir.stop_and_remove();
                return Err(io::Error::other(format!(
                    "qemu-nbd did not listen within {} s{}",
                    START_WAIT.as_secs(),
                    stopped.err().map(|e| format!(" ({e})")).unwrap_or_default()
                )));
            }
            std::thread::sleep(START_POLL);
        }
        tracing::debug!(image = %config.image.display(), pid, "qemu-nbd started.");
        Ok(QemuNbdServer {
            socket: dir.socket(),
            pid: Some(pid),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

/// Our server: SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns once it is reaped.
fn stop_child(mut child: Child) -> Result<(), String> {
    let pid = child.id();
    let exited = |child: &mut Child| {
        child
            .try_wait()
            .map_err(|e| format!("waiting for qemu-nbd (pid {pid}): {e}"))
            .map(|status| status.is_some())
    };
    if exited(&mut child)? {
        return Ok(());
    }
    signal(pid, "TERM")?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if exited(&mut child)? {
            return Ok(());
        }
        std::thread::sleep(STOP_POLL);
    }
    child.kill().map_err(|e| format!("kill -KILL {pid}: {e}"))?;
    child
        .wait()
        .map(drop)
        .map_err(|e| format!("waiting for qemu-nbd (pid {pid}) after SIGKILL: {e}"))
}

/// A server that is not our child (one a killed run left): SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]; returns once the process is gone.
fn stop(pid: u32) -> Result<(), String> {
    if !alive(pid) {
        return Ok(());
    }
    signal(pid, "TERM")?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(STOP_POLL);
    }
    signal(pid, "KILL")?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(STOP_POLL);
    }
    Err(format!("qemu-nbd (pid {pid}) did not exit after SIGKILL"))
}

fn signal(pid: u32, name: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running kill -{name} {pid}: {e}"))?;
    // A failure here usually means it exited between the check and the signal.
    if !status.success() && alive(pid) {
        return Err(format!("kill -{name} {pid} failed with {status}"));
    }
    Ok(())
}

/// Whether `pid` is a running process. A zombie counts as gone: a server a killed run left is
/// not our child, and its reaping is up to whoever adopted it.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => Command::new("kill")
            .arg("-0")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    }
}

/// Whether the process a [`process_identity`] names still runs (the same pid and start time).
pub fn is_alive(identity: &str) -> bool {
    identity
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
        .and_then(process_identity)
        .is_some_and(|now| now == identity)
}

/// `"PID STARTTIME"` of a live process (start time in clock ticks since boot, field 22 of
/// `/proc/PID/stat`), which identifies it even after its pid is reused; `None` when it is gone.
pub fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); the start time is field 22.
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    Some(format!("{pid} {}", fields.get(19)?))
}
