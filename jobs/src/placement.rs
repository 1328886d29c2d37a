//! Which worker backs up which VM of a cluster, and why: the rules of issue 14's placement, kept
//! apart from SSH and libvirt so that they can be tested alone.
//!
//! - A VM goes to the worker on its own host (the host where it runs, or, shut off, where it is
//!   defined): the disks are read there through a unix socket, nothing crosses the network.
//! - When that host has no usable worker (disabled in the cluster file, or its check failed), the
//!   VM goes at once to the least busy usable worker of another host, which reads the VM's export
//!   over NBD on TCP with TLS.
//! - When the own worker is usable but full (`max_vms` running), the VM waits for it, at most
//!   [`Placer::wait`]; after that, a free worker elsewhere takes it.
//! - A retry (the worker died, or its host dropped off the network) never goes back to the worker
//!   that failed.
//! - With no usable worker anywhere (or none but those excluded), the VM fails, naming why.
//!
//! Each decision carries its reason, which the session records beside the VM.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a VM waits for its own host's worker to have room before another host's takes it.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// How a worker reaches the VM's disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// On the VM's own host: NBD on a unix socket.
    Local,
    /// From another host: the VM's host serves the export on TCP with TLS.
    NbdTls,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Local => "local",
            Transport::NbdTls => "nbd+tls",
        })
    }
}

/// Where a VM runs and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The VM's host.
    pub vm_host: String,
    /// The host whose worker backs it up.
    pub worker_host: String,
    pub transport: Transport,
    pub reason: String,
}

/// What [`Placer::place`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start it now (the worker's slot is taken: [`Placer::release`] it when the VM ends).
    Start(Placement),
    /// Ask again when a worker has room (or the wait ran out).
    Wait,
    /// No worker can back it up.
    Impossible(String),
}

/// One host's worker as the placer sees it.
#[derive(Clone, Debug)]
pub struct WorkerState {
    pub host: String,
    /// `Err`: why it cannot take VMs (disabled, or its check failed).
    pub usable: Result<(), String>,
    pub max_vms: u32,
    pub running: u32,
}

impl WorkerState {
    fn free(&self) -> bool {
        self.usable.is_ok() && self.running < self.max_vms
    }
}

/// The workers of one session and the VMs they run.
#[derive(Clone, Debug)]
pub struct Placer {
    workers: BTreeMap<String, WorkerState>,
    /// How long a VM waits for its own host's worker to have room.
    pub wait: Duration,
}

impl Placer {
    pub fn new(workers: impl IntoIterator<Item = WorkerState>, wait: Duration) -> Placer {
        Placer {
            workers: workers.into_iter().map(|w| (w.host.clone(), w)).collect(),
            wait,
        }
    }

    /// Where a VM of `vm_host` goes now, having waited `waited` so far, never to a worker of
    /// `exclude` (those that failed it before).
    pub fn place(&mut self, vm_host: &str, waited: Duration, exclude: &[String]) -> Decision {
        let own = self
            .workers
            .get(vm_host)
            .filter(|_| !exclude.iter().any(|h| h == vm_host));
        let why_not_own = match own {
            Some(w) if w.free() => return self.start(vm_host, vm_host, "its own host".into()),
            Some(w) => match &w.usable {
                Ok(()) if waited < self.wait => return Decision::Wait,
                Ok(()) => format!(
                    "{vm_host}'s worker had no room for {} s ({} VMs running)",
                    waited.as_secs(),
                    w.running
                ),
                Err(why) => format!("{vm_host}'s worker {why}"),
            },
            None if exclude.iter().any(|h| h == vm_host) => {
                format!("{vm_host}'s worker failed it")
            }
            None => format!("{vm_host} is not a host of the cluster file"),
        };
        let others: Vec<&WorkerState> = self
            .workers
            .values()
            .filter(|w| w.host != vm_host && !exclude.contains(&w.host) && w.usable.is_ok())
            .collect();
        if others.is_empty() {
            // Only the own worker can take it, and it is merely full: wait for it, however long.
            if own.is_some_and(|w| w.usable.is_ok()) {
                return Decision::Wait;
            }
            let mut why = vec![why_not_own];
            why.extend(
                self.workers
                    .values()
                    .filter(|w| w.host != vm_host)
                    .map(|w| match (&w.usable, exclude.contains(&w.host)) {
                        (_, true) => format!("{}'s worker failed it", w.host),
                        (Err(e), _) => format!("{}'s worker {e}", w.host),
                        (Ok(()), _) => unreachable!("a usable worker is among the others"),
                    }),
            );
            return Decision::Impossible(format!("no worker can back it up: {}", why.join("; ")));
        }
        // The least busy (fewest running, then most room), then by name: spread, and stable.
        match others
            .iter()
            .filter(|w| w.free())
            .min_by_key(|w| (w.running, std::cmp::Reverse(w.max_vms), w.host.clone()))
        {
            Some(w) => {
                let host = w.host.clone();
                self.start(vm_host, &host, why_not_own)
            }
            None => Decision::Wait,
        }
    }

    fn start(&mut self, vm_host: &str, worker_host: &str, reason: String) -> Decision {
        let w = self
            .workers
            .get_mut(worker_host)
            .expect("placed on a known worker");
        w.running += 1;
        Decision::Start(Placement {
            vm_host: vm_host.to_owned(),
            worker_host: worker_host.to_owned(),
            transport: if vm_host == worker_host {
                Transport::Local
            } else {
                Transport::NbdTls
            },
            reason,
        })
    }

    /// A VM placed on `worker_host` ended: its slot is free again.
    pub fn release(&mut self, worker_host: &str) {
        if let Some(w) = self.workers.get_mut(worker_host) {
            w.running = w.running.saturating_sub(1);
        }
    }

    /// A worker that stopped answering mid-session takes no more VMs.
    pub fn mark_unusable(&mut self, worker_host: &str, why: String) {
        if let Some(w) = self.workers.get_mut(worker_host) {
            w.usable = Err(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(host: &str, usable: Result<(), &str>, max_vms: u32) -> WorkerState {
        WorkerState {
            host: host.into(),
            usable: usable.map_err(str::to_owned),
            max_vms,
            running: 0,
        }
    }

    fn lab(h2: Result<(), &str>) -> Placer {
        Placer::new(
            [
                worker("h1", Ok(()), 2),
                worker("h2", h2, 1),
                worker("h3", Ok(()), 1),
            ],
            DEFAULT_WAIT,
        )
    }

    fn started(d: Decision) -> Placement {
        match d {
            Decision::Start(p) => p,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn a_vm_goes_to_its_own_host_while_it_has_room() {
        let mut p = lab(Ok(()));
        let a = started(p.place("h1", Duration::ZERO, &[]));
        assert_eq!(
            (a.worker_host.as_str(), &a.transport, a.reason.as_str()),
            ("h1", &Transport::Local, "its own host")
        );
        started(p.place("h1", Duration::ZERO, &[]));
        // h1 is full (2): the third waits for it, then goes elsewhere once the wait is over.
        assert_eq!(p.place("h1", Duration::from_secs(5), &[]), Decision::Wait);
        let c = started(p.place("h1", DEFAULT_WAIT, &[]));
        assert_eq!(c.transport, Transport::NbdTls);
        assert_eq!(c.worker_host, "h2");
        assert!(
            c.reason.contains("h1's worker had no room for 30 s"),
            "{}",
            c.reason
        );
        // Released, h1 takes its own again.
        p.release("h1");
        assert_eq!(
            started(p.place("h1", Duration::ZERO, &[])).worker_host,
            "h1"
        );
    }

    #[test]
    fn a_disabled_or_unreachable_worker_sends_its_vms_elsewhere_at_once() {
        let mut p = lab(Err("is disabled in the cluster file"));
        let a = started(p.place("h2", Duration::ZERO, &[]));
        assert_eq!(a.transport, Transport::NbdTls);
        // The least busy of h1 (0 of 2) and h3 (0 of 1): h1 has more room.
        assert_eq!(a.worker_host, "h1");
        assert_eq!(a.reason, "h2's worker is disabled in the cluster file");
        let b = started(p.place("h2", Duration::ZERO, &[]));
        assert_eq!(b.worker_host, "h3", "h1 runs one already");
    }

    #[test]
    fn a_retry_never_goes_back_to_the_worker_that_failed() {
        let mut p = lab(Ok(()));
        let a = started(p.place("h3", Duration::ZERO, &[]));
        assert_eq!(a.worker_host, "h3");
        p.release("h3");
        let again = started(p.place("h3", Duration::ZERO, &["h3".into()]));
        assert_ne!(again.worker_host, "h3");
        assert_eq!(again.transport, Transport::NbdTls);
        assert!(
            again.reason.contains("h3's worker failed it"),
            "{}",
            again.reason
        );
    }

    #[test]
    fn with_no_usable_worker_the_vm_fails_naming_each_reason() {
        let mut p = Placer::new(
            [
                worker("h1", Err("is disabled in the cluster file"), 1),
                worker("h2", Err("is unreachable: connection timed out"), 1),
            ],
            DEFAULT_WAIT,
        );
        match p.place("h1", Duration::ZERO, &[]) {
            Decision::Impossible(why) => {
                assert!(why.contains("h1's worker is disabled"), "{why}");
                assert!(why.contains("h2's worker is unreachable"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // Busy elsewhere is not impossible: it waits.
        let mut p = Placer::new(
            [worker("h1", Err("is disabled"), 1), worker("h2", Ok(()), 1)],
            DEFAULT_WAIT,
        );
        started(p.place("h1", Duration::ZERO, &[]));
        assert_eq!(p.place("h1", Duration::ZERO, &[]), Decision::Wait);
        assert!(matches!(
            p.place("h9", Duration::ZERO, &["h2".into()]),
            Decision::Impossible(why) if why.contains("h9 is not a host")
        ));
    }

    #[test]
    fn a_full_own_worker_with_no_other_is_waited_for_however_long() {
        let mut p = Placer::new(
            [worker("h1", Ok(()), 1), worker("h2", Err("is disabled"), 1)],
            DEFAULT_WAIT,
        );
        started(p.place("h1", Duration::ZERO, &[]));
        assert_eq!(
            p.place("h1", DEFAULT_WAIT * 10, &[]),
            Decision::Wait,
            "a one-worker cluster queues its VMs"
        );
        p.release("h1");
        assert_eq!(
            started(p.place("h1", DEFAULT_WAIT * 10, &[])).worker_host,
            "h1"
        );
    }
}
