//! A recovery's state directory: `state.json`, its lock, and the names of the files in it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{RecoveryError, Result, StartRequest, io};

/// The export's unix socket.
pub const SOCKET: &str = "export.sock";
/// What the export prints (its ready line, warnings, errors).
pub const SERVE_LOG: &str = "serve.log";
/// The serial console's output, when asked for.
pub const CONSOLE_LOG: &str = "console.log";
/// The serial console's unix socket, when asked for.
pub const CONSOLE_SOCKET: &str = "console.sock";
const STATE: &str = "state.json";
const LOCK: &str = "lock";

/// Where a recovery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `start` has not completed (or was killed): `discard` removes it.
    Starting,
    /// The VM runs on its overlays.
    Running,
    /// `finish` is moving (or was moving) the disks.
    Moving,
}

/// One disk of a recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskState {
    pub target: String,
    pub size: u64,
    pub overlay: PathBuf,
}

/// The export process as recorded: its pid and its start time (clock ticks after boot, from
/// `/proc/PID/stat`), which together name it even after its pid is reused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    pub pid: u32,
    pub start_ticks: u64,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstantState {
    pub name: String,
    pub uri: String,
    pub repository: String,
    pub snapshot: String,
    pub vm: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub phase: Phase,
    pub disks: Vec<DiskState>,
    pub server: Option<ServerRecord>,
    pub domain_uuid: Option<String>,
    /// The RTO of the start, milliseconds.
    pub rto_ms: Option<u64>,
}

impl InstantState {
    pub(crate) fn new(request: &StartRequest, dir: &Path) -> InstantState {
        InstantState {
            name: request.name.clone(),
            uri: request.uri.clone(),
            repository: request.repository.clone(),
            snapshot: request.snapshot.clone(),
            vm: request.vm.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            phase: Phase::Starting,
            disks: request
                .disks
                .iter()
                .map(|d| DiskState {
                    target: d.target.clone(),
                    size: d.size,
                    overlay: dir.join(format!("{}.qcow2", d.target)),
                })
                .collect(),
            server: None,
            domain_uuid: None,
            rto_ms: None,
        }
    }

    /// Writes `state.json` whole (a temporary file renamed over it).
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE);
        let tmp = dir.join(format!("{STATE}.tmp"));
        let text = serde_json::to_vec_pretty(self).expect("the state serialises");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    pub fn load(dir: &Path) -> Result<InstantState> {
        let path = dir.join(STATE);
        let text = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text).map_err(|e| RecoveryError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// An exclusive `flock` on the directory's lock file, held while a command works on the recovery.
pub(crate) struct Lock {
    _file: std::fs::File,
}

impl Lock {
    pub(crate) fn take(dir: &Path) -> Result<Lock> {
        let path = dir.join(LOCK);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| RecoveryError::Failed {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                message: "another command works on this recovery right now".into(),
            },
        )?;
        Ok(Lock { _file: file })
    }
}

/// Gives QEMU's group (`kvm`) access to `path` with `mode`; without that group, only the mode.
pub(crate) fn share_with_qemu(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group_id("kvm") {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io(path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1).and_then(|gid| gid.parse().ok()))
            .flatten()
    })
}
