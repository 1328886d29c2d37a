//! A libvirtd of one test's own, which the test may stop and restart without disturbing the
//! tests that share the system daemon (`qemu:///system`) on the same machine.
//!
//! # How it is kept apart
//! As root, libvirtd is always the privileged daemon, and its state lives in fixed places
//! (`/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`, `/etc/libvirt`); `qemu:///session`
//! as root reaches the system daemon too. So the daemon runs in a mount namespace of its own
//! (`unshare --mount`) where those four directories are bind mounts of directories in a temporary
//! directory: its domains, pid files, checkpoint metadata and configuration are private, and a
//! restart (a new namespace with the same bind mounts) finds them again, as after a package
//! upgrade. Its sockets go to `DIR/sock` (`unix_sock_dir`), reached through
//! `qemu+unix:///system?socket=DIR/sock/libvirt-sock`. QEMU's console log goes to a file
//! (`stdio_handler = "file"`), since the system's virtlogd socket is not in the namespace.
//!
//! The daemon is this process's child, stopped with SIGTERM by its pid (as `systemctl restart`
//! would): its QEMU processes keep running, and the next daemon reconnects to them and to their
//! backup jobs. Needs root, `unshare` and `mount` (util-linux), and libvirtd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::libvirt::Domain;

/// How long a daemon may take to answer after it started: the first start of a daemon whose
/// capability cache is cold probes QEMU (seconds); a restart takes well under a second.
const READY_WAIT: Duration = Duration::from_secs(60);

/// How long a daemon may take to exit after SIGTERM before the test gives up on it.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// The directories of the privileged daemon's state that each private daemon gets its own of:
/// (name under the temporary directory, mount point).
const PRIVATE_DIRS: &[(&str, &str)] = &[
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("etc", "/etc/libvirt"),
];

/// A private libvirtd (see the module docs); stopped when dropped. Drop the domains started on it
/// first.
pub struct PrivateLibvirtd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    uri: String,
}

impl PrivateLibvirtd {
    /// Starts a daemon and waits until it answers.
    pub fn start() -> PrivateLibvirtd {
        Self::start_with_qemu_conf("")
    }

    /// [`PrivateLibvirtd::start`] with `extra` lines in the daemon's own qemu.conf (such as
    /// `backup_tls_x509_cert_dir`), which the system daemon's configuration never sees.
    pub fn start_with_qemu_conf(extra: &str) -> PrivateLibvirtd {
        let dir = tempfile::Builder::new()
            .prefix("bf-libvirtd-")
            .tempdir()
            .unwrap();
        for (name, _) in PRIVATE_DIRS {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            // As the originals: QEMU (libvirt-qemu) walks into its directories under them.
            crate::libvirt::make_traversable(&dir.path().join(name));
        }
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        std::fs::write(
            dir.path().join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nlog_outputs = \"3:file:{}\"\n",
                dir.path().join("sock").display(),
                dir.path().join("libvirtd.log").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/qemu.conf"),
            format!("stdio_handler = \"file\"\n{extra}"),
        )
        .unwrap();
        seed_capabilities(&dir.path().join("cache"));
        let uri = format!(
            "qemu+unix:///system?socket={}",
            dir.path().join("sock/libvirt-sock").display()
        );
        let mut daemon = PrivateLibvirtd {
            dir,
            child: None,
            uri,
        };
        daemon.start_again();
        daemon
    }

    /// The URI that reaches this daemon.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Where the daemon keeps the pid files of its domains' QEMU processes (its
    /// `/run/libvirt/qemu`).
    pub fn qemu_run_dir(&self) -> PathBuf {
        self.dir.path().join("run/qemu")
    }

    /// Defines and starts a domain on this daemon (see [`Domain::start`]).
    pub fn start_domain(&self, name_prefix: &str, disks: &[(&str, &str)]) -> Domain {
        Domain::start_on(&self.uri, &self.qemu_run_dir(), name_prefix, disks)
    }

    /// Whether the daemon answers at its URI.
    pub fn answers(&self) -> bool {
        Command::new("virsh")
            .args(["-c", &self.uri, "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the daemon (SIGTERM, then waits for it to exit). Its domains keep running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", child.id());
        let deadline = Instant::now() + STOP_WAIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("libvirtd (pid {}) did not exit after SIGTERM", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the (stopped) daemon again on the same state and waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        let stderr = std::fs::File::create(self.dir.path().join("stderr")).unwrap();
        let mounts: String = PRIVATE_DIRS
            .iter()
            .map(|(name, at)| format!("mkdir -p {at} && mount --bind \"$1/{name}\" {at} && "))
            .collect();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "{mounts}exec libvirtd -f \"$1/etc/libvirtd.conf\" -p \"$1/libvirtd.pid\""
            ))
            .arg("sh")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("unshare is required for these tests: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + READY_WAIT;
        while !self.answers() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("the private libvirtd exited ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the private libvirtd does not answer after {READY_WAIT:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon and starts it again, as `systemctl restart libvirtd` would.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The daemon's stderr and log, for failure messages.
    fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "stderr:\n{}\nlog:\n{}",
            read("stderr"),
            read("libvirtd.log")
        )
    }

    /// The daemon's directory (state, sockets, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.stop();
        } else if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// Copies the system daemon's cache of QEMU's capabilities, when there is one, so that the first
/// start does not probe QEMU again (libvirt checks the copies against the binaries, and probes
/// when they do not match).
fn seed_capabilities(cache: &Path) {
    let system = Path::new("/var/cache/libvirt/qemu/capabilities");
    let Ok(entries) = std::fs::read_dir(system) else {
        return;
    };
    let to = cache.join("qemu/capabilities");
    std::fs::create_dir_all(&to).unwrap();
    for entry in entries.flatten() {
        let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
    }
}
