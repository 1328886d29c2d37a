//! Every VM of a cluster, each with the one host it belongs to.
//!
//! Hosts are listed at once, each within a timeout; a host that does not answer is reported in
//! [`Discovery::unreachable`] and the others still count. Then a VM is placed by its UUID, which
//! libvirt keeps when a VM moves between hosts (its name may differ):
//! - on the host where it runs (any state but shut off: running, paused, in shutdown, ...);
//! - shut off everywhere: on the first host of the cluster file that defines it;
//! - the other hosts that define it are its [`ClusterVm::also_defined_on`] (a live migration
//!   without `--undefinesource` leaves such a definition behind), so it is listed, and backed
//!   up, once;
//! - active on two hosts at once (two QEMU processes claim one UUID: a split brain, or two
//!   copies of one VM cloned without a new UUID) it is not placed at all, and reported in
//!   [`Discovery::conflicts`]: backing up either copy could record the wrong one.
//!
//! A VM shut off on the hosts that answered may run on one that did not: callers that act on a
//! shut-off VM while [`Discovery::unreachable`] is not empty should say so.

use std::collections::BTreeMap;
use std::time::Duration;

use backflow_libvirt::{DiskInfo, VmInfo, VmState};
use serde::Serialize;

use crate::check::{DEFAULT_TIMEOUT, on_thread};
use crate::error::HostError;
use crate::file::Cluster;

/// A VM of the cluster and the host it belongs to.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterVm {
    pub name: String,
    pub uuid: String,
    /// The cluster's name of the host where it runs, or (shut off) where it is defined.
    pub host: String,
    pub state: VmState,
    /// Its disks as that host's libvirt describes them.
    pub disks: Vec<DiskInfo>,
    /// Other hosts that have a definition of it (same UUID), in the cluster file's order.
    pub also_defined_on: Vec<String>,
    /// That host's inactive domain XML (see `backflow_libvirt`). Not in JSON listings.
    #[serde(skip)]
    pub definition: String,
}

/// A VM that runs on more than one host: not placed, never backed up twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub uuid: String,
    /// Its name on each host, when they differ; else the one name.
    pub names: Vec<String>,
    /// The hosts where it is active, in the cluster file's order.
    pub running_on: Vec<String>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM {} (UUID {}) runs on {} hosts at once ({}): left out until it runs on one",
            self.names.join(" / "),
            self.uuid,
            self.running_on.len(),
            self.running_on.join(", ")
        )
    }
}

/// A host whose VMs could not be listed.
#[derive(Debug, Serialize)]
pub struct UnreachableHost {
    pub host: String,
    pub error: HostError,
}

/// What [`discover`] found.
#[derive(Debug, Serialize)]
pub struct Discovery {
    /// Sorted by name, then host.
    pub vms: Vec<ClusterVm>,
    pub unreachable: Vec<UnreachableHost>,
    pub conflicts: Vec<Conflict>,
}

/// One host's answer: its VMs, or why there are none.
#[derive(Debug)]
pub struct HostListing {
    pub host: String,
    pub vms: Result<Vec<VmInfo>, HostError>,
}

/// Lists every host of `cluster` at once, each within [`DEFAULT_TIMEOUT`], and places each VM
/// (see the module documentation).
pub fn discover(cluster: &Cluster) -> Discovery {
    discover_within(cluster, DEFAULT_TIMEOUT)
}

/// [`discover`] with each host's listing bounded by `timeout`.
pub fn discover_within(cluster: &Cluster, timeout: Duration) -> Discovery {
    let pending: Vec<_> = cluster
        .hosts
        .iter()
        .map(|host| {
            let uri = host.uri.clone();
            let listing = on_thread(format!("libvirt at {uri}"), timeout, move || {
                Ok(crate::check::open(&uri, timeout)?.list_vms()?)
            });
            (host.name.clone(), listing)
        })
        .collect();
    resolve(
        pending
            .into_iter()
            .map(|(host, listing)| HostListing {
                host,
                vms: listing.wait(),
            })
            .collect(),
    )
}

/// Places the VMs of per-host listings, given in the cluster file's order (see the module
/// documentation). Pure: the rules, apart from libvirt.
pub fn resolve(listings: Vec<HostListing>) -> Discovery {
    let mut unreachable = Vec::new();
    // Every copy of each UUID, in host order.
    let mut by_uuid: BTreeMap<String, Vec<(String, VmInfo)>> = BTreeMap::new();
    for listing in listings {
        match listing.vms {
            Ok(vms) => {
                for vm in vms {
                    by_uuid
                        .entry(vm.uuid.clone())
                        .or_default()
                        .push((listing.host.clone(), vm));
                }
            }
            Err(error) => unreachable.push(UnreachableHost {
                host: listing.host,
                error,
            }),
        }
    }
    let mut vms = Vec::new();
    let mut conflicts = Vec::new();
    for (uuid, copies) in by_uuid {
        let active: Vec<usize> = (0..copies.len())
            .filter(|&i| is_active(copies[i].1.state))
            .collect();
        let chosen = match active[..] {
            [] => 0,
            [one] => one,
            _ => {
                let mut names: Vec<String> =
                    active.iter().map(|&i| copies[i].1.name.clone()).collect();
                names.dedup();
                conflicts.push(Conflict {
                    uuid,
                    names,
                    running_on: active.iter().map(|&i| copies[i].0.clone()).collect(),
                });
                continue;
            }
        };
        let also_defined_on = (0..copies.len())
            .filter(|&i| i != chosen)
            .map(|i| copies[i].0.clone())
            .collect();
        let mut copies = copies;
        let (host, vm) = copies.swap_remove(chosen);
        vms.push(ClusterVm {
            name: vm.name,
            uuid,
            host,
            state: vm.state,
            disks: vm.disks,
            also_defined_on,
            definition: vm.definition,
        });
    }
    vms.sort_by(|a, b| (&a.name, &a.host).cmp(&(&b.name, &b.host)));
    Discovery {
        vms,
        unreachable,
        conflicts,
    }
}

/// Whether a QEMU process holds the VM: anything but shut off. A crashed VM is counted active
/// too: its process may still hold the disks (`on_crash` preserve), and guessing it gone could
/// back up a disk another host's copy writes.
fn is_active(state: VmState) -> bool {
    state != VmState::ShutOff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uuid: &str, state: VmState) -> VmInfo {
        VmInfo {
            name: name.into(),
            uuid: uuid.into(),
            state,
            persistent: true,
            host: "libvirt's hostname".into(),
            disks: Vec::new(),
            definition: format!("<domain><name>{name}</name></domain>"),
        }
    }

    fn up(host: &str, vms: Vec<VmInfo>) -> HostListing {
        HostListing {
            host: host.into(),
            vms: Ok(vms),
        }
    }

    fn placed(d: &Discovery) -> Vec<(&str, &str, VmState, Vec<&str>)> {
        d.vms
            .iter()
            .map(|v| {
                (
                    v.name.as_str(),
                    v.host.as_str(),
                    v.state,
                    v.also_defined_on.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    use VmState::{Paused, Running, ShutOff};

    #[test]
    fn each_vm_is_on_the_host_where_it_runs_or_is_defined() {
        let d = resolve(vec![
            up(
                "h1",
                vec![vm("web", "u1", Running), vm("db", "u2", ShutOff)],
            ),
            up("h2", vec![vm("mail", "u3", Paused)]),
            up("h3", vec![]),
        ]);
        assert_eq!(
            placed(&d),
            [
                ("db", "h1", ShutOff, vec![]),
                ("mail", "h2", Paused, vec![]),
                ("web", "h1", Running, vec![]),
            ]
        );
        assert!(d.unreachable.is_empty() && d.conflicts.is_empty());
        assert_eq!(d.vms[2].definition, "<domain><name>web</name></domain>");
    }

    #[test]
    fn a_vm_defined_on_two_hosts_is_listed_once_where_it_runs() {
        // Migrated from h1 to h3 without undefining the source: h1 keeps a shut-off definition.
        for (h1, h3, host, also) in [
            (ShutOff, Running, "h3", "h1"),
            (Running, ShutOff, "h1", "h3"),
        ] {
            let d = resolve(vec![
                up("h1", vec![vm("web", "u1", h1)]),
                up("h2", vec![]),
                up("h3", vec![vm("web", "u1", h3)]),
            ]);
            assert_eq!(placed(&d), [("web", host, Running, vec![also])]);
        }
    }

    #[test]
    fn a_vm_shut_off_everywhere_is_placed_on_the_first_host_that_defines_it() {
        let d = resolve(vec![
            up("h1", vec![]),
            up("h2", vec![vm("web", "u1", ShutOff)]),
            up("h3", vec![vm("web-old-name", "u1", ShutOff)]),
        ]);
        assert_eq!(placed(&d), [("web", "h2", ShutOff, vec!["h3"])]);
    }

    #[test]
    fn a_vm_running_on_two_hosts_is_a_conflict_and_never_listed() {
        let d = resolve(vec![
            up(
                "h1",
                vec![vm("web", "u1", Running), vm("db", "u2", Running)],
            ),
            up("h2", vec![vm("web", "u1", Paused)]),
            up("h3", vec![vm("web", "u1", ShutOff)]),
        ]);
        assert_eq!(placed(&d), [("db", "h1", Running, vec![])]);
        assert_eq!(
            d.conflicts,
            [Conflict {
                uuid: "u1".into(),
                names: vec!["web".into()],
                running_on: vec!["h1".into(), "h2".into()],
            }]
        );
        assert_eq!(
            d.conflicts[0].to_string(),
            "VM web (UUID u1) runs on 2 hosts at once (h1, h2): left out until it runs on one"
        );
    }

    #[test]
    fn two_vms_of_one_name_and_different_uuids_are_two_vms() {
        let d = resolve(vec![
            up("h1", vec![vm("web", "u1", Running)]),
            up("h2", vec![vm("web", "u2", Running)]),
        ]);
        assert_eq!(
            placed(&d),
            [
                ("web", "h1", Running, vec![]),
                ("web", "h2", Running, vec![])
            ]
        );
    }

    #[test]
    fn an_unreachable_host_is_reported_and_the_others_still_count() {
        let d = resolve(vec![
            up("h1", vec![vm("web", "u1", ShutOff)]),
            HostListing {
                host: "h2".into(),
                vms: Err(HostError::TimedOut {
                    what: "libvirt at qemu+ssh://root@10.0.0.2/system".into(),
                    after: Duration::from_secs(3),
                }),
            },
        ]);
        assert_eq!(placed(&d), [("web", "h1", ShutOff, vec![])]);
        assert_eq!(d.unreachable.len(), 1);
        assert_eq!(d.unreachable[0].host, "h2");
        assert_eq!(
            d.unreachable[0].error.to_string(),
            "libvirt at qemu+ssh://root@10.0.0.2/system did not answer within 3 s"
        );
    }
}
