//! Which VMs, and which of their disks, a job backs up.

use backflow_libvirt::VmInfo;

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
pub fn select(job: &Job, vms: &[VmInfo]) -> Result<Vec<Selected>, String> {
    for pattern in job.vms.iter().filter(|p| !p.is_glob()) {
        if !vms.iter().any(|vm| vm.name == pattern.0) {
            return Err(format!(
                "job {}: no VM named `{}` on {} (its VMs: {})",
                job.name.0,
                pattern.0,
                job.uri,
                names(vms)
            ));
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
            return Err(format!(
                "job {}: every disk of VM {} is excluded ({}); exclude the VM instead",
                job.name.0,
                vm.name,
                excluded_disks.join(", ")
            ));
        }
        selected.push(Selected {
            vm: vm.name.clone(),
            disks,
            excluded_disks,
        });
    }
    if selected.is_empty() {
        return Err(format!(
            "job {}: no VM on {} matches {} (its VMs: {})",
            job.name.0,
            job.uri,
            job.vms
                .iter()
                .map(|p| p.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            names(vms)
        ));
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
