//! Which VMs, and which of their disks, a job backs up.

use backflow_libvirt::VmInfo;

use crate::error::JobError;
use crate::file::Job;

/// One VM to back up and the disks to read (every backup candidate not excluded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub vm: String,
    pub disks: Vec<String>,
    /// Disks left out by `exclude_disks`, for the session record.
    pub excluded_disks: Vec<String>,
}

/// The VMs of `vms` (a connection's listing) the job selects, in name order. An exact name that
/// matches no VM is an error (a typo must not silently back up nothing); a glob may match none.
/// A VM whose every disk is excluded is an error too.
/// A job without `vms` selects none (it backs up images only).
pub fn select(job: &Job, vms: &[VmInfo]) -> Result<Vec<Selected>, JobError> {
    if job.vms.is_empty() {
        return Ok(Vec::new());
    }
    for pattern in job.vms.iter().filter(|p| !p.is_glob()) {
        if !vms.iter().any(|vm| vm.name == pattern.0) {
            return Err(JobError::NoSuchVm {
                job: job.name.0.clone(),
                name: pattern.0.clone(),
                uri: job.uri.clone(),
                existing: names(vms),
            });
        }
    }
    let mut selected = Vec::new();
    for vm in vms {
        let wanted = job.vms.iter().any(|p| p.matches(&vm.name));
        let excluded = job.exclude.iter().any(|p| p.matches(&vm.name));
        if !wanted || excluded {
            continue;
        }
        let (excluded_disks, disks): (Vec<String>, Vec<String>) = vm
            .backup_disks()
            .map(|d| d.target.clone())
            .partition(|t| job.exclude_disks.iter().any(|x| x.excludes(&vm.name, t)));
        if disks.is_empty() {
            return Err(JobError::EveryDiskExcluded {
                job: job.name.0.clone(),
                vm: vm.name.clone(),
                disks: excluded_disks.join(", "),
            });
        }
        selected.push(Selected {
            vm: vm.name.clone(),
            disks,
            excluded_disks,
        });
    }
    if selected.is_empty() {
        return Err(JobError::NothingSelected {
            job: job.name.0.clone(),
            uri: job.uri.clone(),
            patterns: job
                .vms
                .iter()
                .map(|p| p.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            existing: names(vms),
        });
    }
    selected.sort_by(|a, b| a.vm.cmp(&b.vm));
    Ok(selected)
}

fn names(vms: &[VmInfo]) -> String {
    if vms.is_empty() {
        return "none".into();
    }
    vms.iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use backflow_libvirt::{DiskInfo, DiskSource, VmState};

    fn vm(name: &str, disks: &[(&str, &str)]) -> VmInfo {
        VmInfo {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            state: VmState::Running,
            persistent: true,
            host: "kvm1".into(),
            disks: disks
                .iter()
                .map(|(target, device)| DiskInfo {
                    target: (*target).into(),
                    device: (*device).into(),
                    bus: Some("virtio".into()),
                    format: Some("qcow2".into()),
                    source: DiskSource::File {
                        path: format!("/img/{name}-{target}.qcow2"),
                    },
                    capacity: Some(1 << 30),
                    capacity_unknown: None,
                })
                .collect(),
            definition: String::new(),
        }
    }

    fn job(extra: &str) -> Job {
        crate::parse(&format!("name: j\nrepository: /r\n{extra}"), "/j.yaml").unwrap()
    }

    fn names(selected: &[Selected]) -> Vec<&str> {
        selected.iter().map(|s| s.vm.as_str()).collect()
    }

    #[test]
    fn globs_exclusions_and_disks() {
        let vms = [
            vm("web02", &[("vda", "disk"), ("hdc", "cdrom")]),
            vm("web01", &[("vda", "disk"), ("vdb", "disk")]),
            vm("web01-test", &[("vda", "disk")]),
            vm("db01", &[("vda", "disk"), ("vdb", "disk"), ("vdc", "disk")]),
        ];
        let all = select(&job("vms: [\"*\"]\n"), &vms).unwrap();
        assert_eq!(names(&all), ["db01", "web01", "web01-test", "web02"]);
        assert_eq!(all[3].disks, ["vda"], "cdroms are never backed up");

        let some = select(
            &job(
                "vms: [\"web*\", db01]\nexclude: [\"*-test\"]\nexclude_disks: [vdb, \"db*:vdc\"]\n",
            ),
            &vms,
        )
        .unwrap();
        assert_eq!(names(&some), ["db01", "web01", "web02"]);
        assert_eq!(some[0].disks, ["vda"]);
        assert_eq!(some[0].excluded_disks, ["vdb", "vdc"]);
        assert_eq!(some[1].disks, ["vda"]);
    }

    #[test]
    fn nothing_selected_is_an_error_that_says_what_exists() {
        let vms = [vm("web01", &[("vda", "disk")])];
        let typo = select(&job("vms: [web1]\n"), &vms).unwrap_err().to_string();
        assert!(
            typo.contains("no VM named `web1`") && typo.contains("web01"),
            "{typo}"
        );
        let none = select(&job("vms: [\"db*\"]\n"), &vms)
            .unwrap_err()
            .to_string();
        assert!(
            none.contains("no VM on qemu:///system matches db*"),
            "{none}"
        );
        let empty = select(&job("vms: [web01]\nexclude_disks: [vda]\n"), &vms)
            .unwrap_err()
            .to_string();
        assert!(
            empty.contains("every disk of VM web01 is excluded"),
            "{empty}"
        );
    }
}
