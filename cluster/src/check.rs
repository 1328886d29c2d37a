//! `backflow cluster check`: for each host, whether its libvirt answers through its `uri`, and
//! whether the worker access works (ssh logs in and runs `BACKFLOW --version`). Every host and
//! both checks of a host run at once, each bounded by the same timeout, so the whole check takes
//! about one timeout however many hosts do not answer.
//!
//! A remote libvirt URI is opened only after a TCP connection to its transport's port succeeded
//! ([`remote_endpoint`]): a host that is down or cut off is reported with the kernel's reason,
//! and libvirt never starts an ssh towards it that would outlive the check.

use std::sync::mpsc;
use std::time::Duration;

use backflow_libvirt::Connection;
use serde::Serialize;

use crate::error::HostError;
use crate::file::{Cluster, Host};

/// How long one check waits for a host when the caller does not say: a host on the same network
/// answers in well under a second; ten leaves room for a loaded host and a slow DNS.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one host answered. (Not `Serialize`: callers choose how to show a failure; the command
/// line's JSON is in docs/cluster.md.)
#[derive(Debug)]
pub struct HostCheck {
    /// The host's name in the cluster file.
    pub host: String,
    pub address: String,
    pub uri: String,
    pub libvirt: Result<LibvirtFacts, HostError>,
    pub worker: WorkerCheck,
}

impl HostCheck {
    /// Whether the host can serve: its libvirt answers, and its worker (when enabled) too.
    pub fn ok(&self) -> bool {
        self.libvirt.is_ok() && !matches!(self.worker, WorkerCheck::Failed(_))
    }
}

/// What a host's libvirt says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LibvirtFacts {
    /// The daemon's libvirt version (`9.0.0`).
    pub libvirt_version: String,
    /// The hypervisor driver (`QEMU`).
    pub hypervisor: String,
    /// The hypervisor's version (`7.2.0`).
    pub hypervisor_version: String,
    /// The host's name as libvirt reports it.
    pub hostname: String,
    /// VMs defined or running there.
    pub vms: usize,
}

/// The worker access of a host.
#[derive(Debug)]
pub enum WorkerCheck {
    /// `worker.enabled: false`: nothing is started there, so nothing was tried.
    Disabled,
    /// ssh ran `BACKFLOW --version`; `warning` when its version is not the controller's (a
    /// worker of another version may not understand the controller's tasks).
    Ok {
        version: String,
        warning: Option<String>,
    },
    Failed(HostError),
}

/// Checks every host of `cluster` at once; `own_version` is the controller's version, which
/// each worker's is compared with. Returns one answer per host, in the file's order.
pub fn check(cluster: &Cluster, own_version: &str, timeout: Duration) -> Vec<HostCheck> {
    std::thread::scope(|s| {
        let running: Vec<_> = cluster
            .hosts
            .iter()
            .map(|host| {
                let worker = s.spawn(move || worker_check(host, own_version, timeout));
                let libvirt = libvirt_facts(host, timeout);
                (host, libvirt, worker)
            })
            .collect();
        running
            .into_iter()
            .map(|(host, libvirt, worker)| HostCheck {
                host: host.name.clone(),
                address: host.address.to_string(),
                uri: host.uri.clone(),
                libvirt: libvirt.wait(),
                worker: worker.join().unwrap_or_else(|_| {
                    WorkerCheck::Failed(HostError::Backflow {
                        command: format!("{} --version", host.backflow),
                        problem: "check panicked".into(),
                    })
                }),
            })
            .collect()
    })
}

fn worker_check(host: &Host, own_version: &str, timeout: Duration) -> WorkerCheck {
    if !host.worker.enabled {
        return WorkerCheck::Disabled;
    }
    match host.remote_version(timeout) {
        Ok(version) => {
            let warning = (version != own_version).then(|| {
                format!(
                    "its backflow is version {version}, the controller's {own_version}: \
                     install the same version on every host"
                )
            });
            WorkerCheck::Ok { version, warning }
        }
        Err(e) => WorkerCheck::Failed(e),
    }
}

/// The host's libvirt facts, asked on a thread of its own (started now) and waited for with
/// [`Pending::wait`].
fn libvirt_facts(host: &Host, timeout: Duration) -> Pending<LibvirtFacts> {
    let uri = host.uri.clone();
    on_thread(format!("libvirt at {uri}"), timeout, move || {
        let conn = open(&uri, timeout)?;
        let virt = conn.virt();
        let call = |call: &'static str| {
            let uri = conn.uri().to_owned();
            move |e: virt::error::Error| HostError::LibvirtCall {
                uri,
                call,
                message: e.message().to_owned(),
            }
        };
        let libvirt_version = virt
            .lib_version()
            .map_err(call("virConnectGetLibVersion"))?;
        let hypervisor = virt.driver_type().map_err(call("virConnectGetType"))?;
        let hypervisor_version = virt.hyp_version().map_err(call("virConnectGetVersion"))?;
        let vms = virt
            .list_all_domains(0)
            .map_err(call("virConnectListAllDomains"))?
            .len();
        Ok(LibvirtFacts {
            libvirt_version: version_text(libvirt_version),
            hypervisor,
            hypervisor_version: version_text(hypervisor_version),
            hostname: conn.hostname().to_owned(),
            vms,
        })
    })
}

/// Opens `uri` read-only, after making sure that its host takes TCP connections on the
/// transport's port, within `timeout`. libvirt cannot cancel a connection attempt: through its
/// ssh transport it starts an ssh of its own, which a host that is down or cut off would keep
/// waiting for minutes after this process gave up on it. A host that does not accept the
/// connection is never handed to libvirt.
pub(crate) fn open(uri: &str, timeout: Duration) -> Result<Connection, HostError> {
    if let Some((host, port)) = remote_endpoint(uri) {
        probe(&host, port, timeout)?;
    }
    Ok(Connection::open_read_only(Some(uri))?)
}

/// Whether the host of the libvirt URI `uri` takes TCP connections on its transport's port
/// within `timeout` (a local URI: always): the quick look a controller takes before it hands the
/// host to libvirt again.
pub fn reachable(uri: &str, timeout: Duration) -> Result<(), HostError> {
    match remote_endpoint(uri) {
        Some((host, port)) => probe(&host, port, timeout),
        None => Ok(()),
    }
}

/// The host and TCP port a libvirt URI's transport connects to: `None` for local transports
/// (no host, `+unix`, `+ext`) and drivers without a daemon (`test:`).
pub fn remote_endpoint(uri: &str) -> Option<(String, u16)> {
    let (scheme, rest) = uri.split_once("://")?;
    let transport = scheme.split_once('+').map(|(_, t)| t);
    let default_port = match transport {
        Some("ssh" | "libssh" | "libssh2") => 22,
        Some("tls") | None => 16514,
        Some("tcp") => 16509,
        Some(_) => return None,
    };
    if scheme.starts_with("test") {
        return None;
    }
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.is_empty() {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    Some((host.to_owned(), port))
}

/// Whether `host:port` accepts a TCP connection within `timeout`.
fn probe(host: &str, port: u16, timeout: Duration) -> Result<(), HostError> {
    use std::net::{TcpStream, ToSocketAddrs};
    let unreachable = |message: String| HostError::Unreachable {
        endpoint: format!("{host} port {port}"),
        message,
    };
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve the name: {e}")))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(unreachable(match last {
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            format!("no answer within {}", crate::error::seconds(timeout))
        }
        Some(e) => e.to_string(),
        None => "the name has no address".into(),
    }))
}

/// libvirt's `major * 1,000,000 + minor * 1,000 + release` as `major.minor.release`.
pub fn version_text(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

/// Work on a thread of its own that may not come back in time.
pub(crate) struct Pending<T> {
    what: String,
    timeout: Duration,
    started: std::time::Instant,
    rx: mpsc::Receiver<Result<T, HostError>>,
}

/// Runs `work` on a detached thread; [`Pending::wait`] gives its result, or
/// [`HostError::TimedOut`] naming `what` once `timeout` (and a grace) has passed since now. libvirt cannot
/// cancel a connection attempt: a thread that does not come back is left to end by itself (its
/// transport fails eventually: TCP gives up, or libvirt's keepalive does) and its answer is
/// dropped.
pub(crate) fn on_thread<T: Send + 'static>(
    what: String,
    timeout: Duration,
    work: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Pending<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("cluster-host".into())
        .spawn(move || {
            let _ = tx.send(work());
        });
    if let Err(e) = spawned {
        // No thread: the receiver sees a closed channel, reported below as an error.
        tracing::warn!(error = %e, "Cannot start a thread for a host check.");
    }
    Pending {
        what,
        timeout,
        started: std::time::Instant::now(),
        rx,
    }
}

impl<T> Pending<T> {
    /// Waits for the answer: `timeout` from the start, and [`crate::ssh::KILL_GRACE`] more, so
    /// that a step bounded by `timeout` itself (the TCP probe) reports its own reason first.
    pub(crate) fn wait(self) -> Result<T, HostError> {
        let left = (self.timeout + crate::ssh::KILL_GRACE).saturating_sub(self.started.elapsed());
        match self.rx.recv_timeout(left) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(HostError::TimedOut {
                what: self.what,
                after: self.timeout,
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(HostError::NoThread { what: self.what })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_name_the_endpoint_their_transport_connects_to() {
        let e = |h: &str, p| Some((h.to_owned(), p));
        assert_eq!(
            remote_endpoint("qemu+ssh://root@10.0.0.1/system?keyfile=/k&no_tty=1"),
            e("10.0.0.1", 22)
        );
        assert_eq!(
            remote_endpoint("qemu+ssh://root@kvm1:2222/system"),
            e("kvm1", 2222)
        );
        assert_eq!(
            remote_endpoint("qemu+ssh://[fd00::1]:2222/system"),
            e("fd00::1", 2222)
        );
        assert_eq!(remote_endpoint("qemu+libssh2://kvm1/system"), e("kvm1", 22));
        assert_eq!(remote_endpoint("qemu://kvm1/system"), e("kvm1", 16514));
        assert_eq!(remote_endpoint("qemu+tcp://kvm1/system"), e("kvm1", 16509));
        for local in [
            "qemu:///system",
            "qemu+unix:///system?socket=/x",
            "test:///default",
            "test:///tmp/h1.xml",
            "qemu+ext://kvm1/system?command=/bin/x",
        ] {
            assert_eq!(remote_endpoint(local), None, "{local}");
        }
    }

    #[test]
    fn a_refused_port_is_unreachable_before_libvirt_is_asked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let e = open(
            &format!("qemu+ssh://root@127.0.0.1:{port}/system"),
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(matches!(e, HostError::Unreachable { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach 127.0.0.1 port {port}: ")),
            "{e}"
        );
    }

    #[test]
    fn libvirt_versions_read_as_people_write_them() {
        assert_eq!(version_text(9_000_000), "9.0.0");
        assert_eq!(version_text(7_002_015), "7.2.15");
    }

    #[test]
    fn work_that_does_not_come_back_in_time_is_a_timeout_naming_it() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let pending = on_thread(
            "libvirt at qemu+ssh://h9/system".into(),
            Duration::from_millis(200),
            move || {
                let _ = release_rx.recv();
                Ok(())
            },
        );
        let e = pending.wait().unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200) + crate::ssh::KILL_GRACE);
        assert_eq!(
            e.to_string(),
            "libvirt at qemu+ssh://h9/system did not answer within 0.2 s"
        );
        assert!(e.is_retryable());
        drop(release_tx);
    }
}
