//! The private directory of one backup job, and finding the jobs of killed runs.
//!
//! libvirt's QEMU (user `libvirt-qemu` on Debian) creates the NBD socket and the scratch files, so
//! the directory is owned by QEMU's user and group with mode 0770 (libvirt-qemu must write, we
//! are root). Besides the socket and scratch files it holds `owner` (our pid and start time),
//! `domain` (the VM's UUID) and `endpoint` (where the job's NBD server listens): a pull-mode job
//! outlives a killed backup (libvirt keeps it until it is aborted), and the next run of the same
//! VM recognises it by these files. A run whose cleanup could not end its job (libvirt
//! unreachable) keeps the directory for the same reason, and says why in `left`.
//!
//! The directory's name is the job's mark too: libvirt's description of a job names its socket
//! and scratch files, which lie in the directory ([`of_job`]). A job whose directory is gone was
//! left by a run that is over (a live run keeps its directory until its job is gone).

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backflow_libvirt::job_xml::{Endpoint, RunningJob};
use backflow_qemu::server::{is_alive, process_identity};

/// Name prefix of the job directories in the socket directory.
pub const DIR_PREFIX: &str = "backflow-libvirt-";

/// How long an aborted job may take to remove its socket (libvirt ends it asynchronously).
pub const END_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct JobDir {
    path: PathBuf,
}

/// Who a job directory belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner {
    /// A live process (this one, or another run).
    Alive(String),
    /// Gone: the run was killed before its cleanup ran.
    Gone(String),
}

impl JobDir {
    /// Creates `PARENT/backflow-libvirt-XXXX` for a job on the VM `uuid`, writable by `qemu_user`
    /// (uid, gid) and nobody else.
    pub fn create(parent: &Path, uuid: &str, qemu_user: Option<(u32, u32)>) -> io::Result<JobDir> {
        let path = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(parent)?
            .keep();
        let dir = JobDir { path };
        let written = (|| {
            std::fs::write(
                dir.owner_file(),
                process_identity(std::process::id()).unwrap_or_default(),
            )?;
            std::fs::write(dir.path.join("domain"), uuid)?;
            match qemu_user {
                Some((uid, gid)) => {
                    std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid))?;
                    std::fs::set_permissions(&dir.path, Permissions::from_mode(0o770))
                }
                None => std::fs::set_permissions(&dir.path, Permissions::from_mode(0o700)),
            }
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir.path);
            return Err(e);
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("nbd.sock")
    }

    pub fn scratch(&self, target: &str) -> PathBuf {
        self.path.join(format!("{target}.scratch"))
    }

    fn owner_file(&self) -> PathBuf {
        self.path.join("owner")
    }

    /// Records where the job's NBD server listens (as [`Endpoint`]'s `Display` writes it), so that
    /// a later run can recognise the job if this one is killed.
    pub fn record_endpoint(&self, endpoint: &Endpoint) -> io::Result<()> {
        std::fs::write(self.path.join("endpoint"), endpoint.to_string())
    }

    /// Records the libvirt URI the job was begun through (empty: libvirt's default), so that a
    /// sweep of this host can end the job after the run died ([`crate::sweep_dead_runs`]).
    pub fn record_uri(&self, uri: &str) -> io::Result<()> {
        std::fs::write(self.path.join("uri"), uri)
    }

    /// The libvirt URI the directory's job was begun through, if it was recorded.
    pub fn uri(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join("uri")).ok()
    }

    /// The job directories in `parent`, whatever their VM.
    pub fn all_in(parent: &Path) -> Vec<JobDir> {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(DIR_PREFIX))
            .map(|e| JobDir { path: e.path() })
            .collect()
    }

    /// Whether the directory's run recorded an endpoint (it does so before it begins a job).
    pub fn has_endpoint(&self) -> bool {
        self.path.join("endpoint").exists()
    }

    /// Whether `endpoint` is the one this directory's job recorded.
    pub fn is_endpoint_of_job(&self, endpoint: &Endpoint) -> bool {
        std::fs::read_to_string(self.path.join("endpoint"))
            .is_ok_and(|recorded| recorded == endpoint.to_string())
    }

    /// Says, in the directory, why the run that made it leaves it (and its job) behind.
    pub fn record_left(&self, reason: &str) -> io::Result<()> {
        std::fs::write(self.path.join("left"), reason)
    }

    /// Why the run that made the directory left it behind, if it said so (else it was killed).
    pub fn left(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join("left")).ok()
    }

    /// The VM UUID the directory's job was for.
    pub fn domain(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join("domain")).ok()
    }

    pub fn owner(&self) -> Owner {
        let recorded = std::fs::read_to_string(self.owner_file()).unwrap_or_default();
        let alive = is_alive(&recorded);
        let pid = recorded
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_owned();
        if alive {
            Owner::Alive(pid)
        } else {
            Owner::Gone(pid)
        }
    }

    /// Waits until libvirt removed the socket of an ended job (at most [`END_WAIT`]).
    pub fn wait_socket_gone(&self) -> Result<(), String> {
        let deadline = Instant::now() + END_WAIT;
        while self.socket().exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the NBD socket {} is still there {} s after the job ended",
                    self.socket().display(),
                    END_WAIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Removes the directory and what is left in it.
    pub fn remove(&self) -> Result<(), String> {
        match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(format!("removing {}: {e}", self.path.display()))
            }
            _ => Ok(()),
        }
    }

    /// The job directories in `parent` that belong to the VM `uuid`.
    pub fn of_domain(parent: &Path, uuid: &str) -> Vec<JobDir> {
        JobDir::all_in(parent)
            .into_iter()
            .filter(|d| d.domain().as_deref() == Some(uuid))
            .collect()
    }
}

/// The job directory of backflow (named `backflow-libvirt-*`) that a running job's NBD socket or
/// scratch files lie in, whether it still exists or not: the job was begun by a backflow run.
pub fn of_job(job: &RunningJob) -> Option<JobDir> {
    let socket = match &job.endpoint {
        Some(Endpoint::Unix(socket)) => Some(socket.as_path()),
        _ => None,
    };
    socket
        .into_iter()
        .chain(job.disks.iter().filter_map(|d| d.scratch.as_deref()))
        .filter_map(Path::parent)
        .find(|dir| {
            dir.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(DIR_PREFIX))
        })
        .map(|dir| JobDir {
            path: dir.to_owned(),
        })
}

/// Where a job begun from another host keeps the scratch file of disk `target` of the VM `uuid`,
/// on the VM's host: `REMOTE_SCRATCH_DIR/backflow-UUID-TARGET.scratch`.
pub fn remote_scratch(uuid: &str, target: &str) -> PathBuf {
    Path::new(crate::REMOTE_SCRATCH_DIR).join(format!("backflow-{uuid}-{target}.scratch"))
}

/// Whether a running job on the VM `uuid` was begun by a backflow run, on this host or another:
/// its socket or scratch files lie in a backflow job directory ([`of_job`]), or its scratch files
/// are named as [`remote_scratch`] names them.
pub fn is_backflows(job: &RunningJob, uuid: &str) -> bool {
    of_job(job).is_some()
        || job
            .disks
            .iter()
            .any(|d| d.scratch.as_deref() == Some(remote_scratch(uuid, &d.target).as_path()))
}

/// The uid and gid QEMU runs as for a domain: those of its running process (libvirt's pid file),
/// else of the `libvirt-qemu` user (Debian's default).
pub fn qemu_user(domain: &str) -> Option<(u32, u32)> {
    let from_process = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .ok()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok())
        .and_then(|status| {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u32>().ok())
            };
            Some((field("Uid:")?, field("Gid:")?))
        });
    from_process.or_else(|| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"libvirt-qemu"))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
                .flatten()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_knows_its_domain_and_owner() {
        let parent = tempfile::tempdir().unwrap();
        let dir = JobDir::create(parent.path(), "uuid-1", None).unwrap();
        assert_eq!(dir.domain().as_deref(), Some("uuid-1"));
        assert_eq!(dir.owner(), Owner::Alive(std::process::id().to_string()));
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(JobDir::of_domain(parent.path(), "uuid-1").len(), 1);
        assert!(JobDir::of_domain(parent.path(), "uuid-2").is_empty());
        let tcp = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
            tls: false,
        };
        assert!(!dir.is_endpoint_of_job(&tcp));
        dir.record_endpoint(&tcp).unwrap();
        assert!(dir.is_endpoint_of_job(&tcp));
        assert!(!dir.is_endpoint_of_job(&Endpoint::Unix(dir.socket())));
        assert_eq!(dir.left(), None);
        dir.record_left("libvirt unreachable").unwrap();
        assert_eq!(dir.left().as_deref(), Some("libvirt unreachable"));
        // A dead owner: a pid that cannot be alive with that start time.
        std::fs::write(dir.owner_file(), "4194304 1").unwrap();
        assert_eq!(dir.owner(), Owner::Gone("4194304".into()));
        dir.remove().unwrap();
        assert!(!dir.path().exists());
    }

    #[test]
    fn a_job_is_ours_by_the_directory_of_its_socket_or_scratch_files() {
        use backflow_libvirt::job_xml::ExportedDisk;
        let disk = |scratch: Option<&str>| ExportedDisk {
            target: "vda".into(),
            export: "vda".into(),
            bitmap: None,
            incremental: None,
            scratch: scratch.map(PathBuf::from),
        };
        let unix = RunningJob {
            endpoint: Some(Endpoint::Unix("/tmp/backflow-libvirt-Ab12/nbd.sock".into())),
            disks: vec![disk(None)],
        };
        assert_eq!(
            of_job(&unix).unwrap().path(),
            Path::new("/tmp/backflow-libvirt-Ab12")
        );
        let tcp = RunningJob {
            endpoint: Some(Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
                tls: false,
            }),
            disks: vec![disk(Some("/run/x/backflow-libvirt-Cd34/vda.scratch"))],
        };
        assert_eq!(
            of_job(&tcp).unwrap().path(),
            Path::new("/run/x/backflow-libvirt-Cd34")
        );
        let foreign = RunningJob {
            endpoint: Some(Endpoint::Unix("/var/tmp/virtnbdbackup.1/sock".into())),
            disks: vec![disk(Some("/var/lib/libvirt/qemu/vda.scratch"))],
        };
        assert!(of_job(&foreign).is_none());
        assert!(is_backflows(&unix, "u1") && is_backflows(&tcp, "u1"));
        assert!(!is_backflows(&foreign, "u1"));
        // Begun from another host: scratch files in /var/tmp, named after the VM.
        let remote = RunningJob {
            endpoint: Some(Endpoint::Tcp {
                host: "10.0.0.12".into(),
                port: 10811,
                tls: true,
            }),
            disks: vec![disk(Some("/var/tmp/backflow-u1-vda.scratch"))],
        };
        assert!(of_job(&remote).is_none());
        assert!(is_backflows(&remote, "u1"));
        assert!(!is_backflows(&remote, "u2"), "another VM's name");
        let elsewhere = RunningJob {
            endpoint: None,
            disks: vec![disk(Some("/srv/backflow-u1-vda.scratch"))],
        };
        assert!(!is_backflows(&elsewhere, "u1"));
    }
}
