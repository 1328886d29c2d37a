//! Driving jobs on the cluster lab (testkit::cluster): the session record, restores compared with
//! a VM's disk, variants of the lab's cluster and job files.

use std::path::{Path, PathBuf};
use std::process::Command;

use backflow_jobs::SessionRecord;
use backflow_testkit::cluster::Lab;

use super::run_ok;

/// `backflow job run FILE` with the lab's store, which must succeed: the session record.
pub fn run_job(lab: &Lab, job: &Path, report: &Path) -> SessionRecord {
    let (record, out) = run_job_any(lab, job, report);
    assert!(
        out.status.success(),
        "job run failed ({}): {}\n{record:#?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    record
}

/// `backflow job run FILE` with the lab's store: the session record and the command's output.
pub fn run_job_any(lab: &Lab, job: &Path, report: &Path) -> (SessionRecord, std::process::Output) {
    let out = job_command(lab, job, report).output().unwrap();
    (session_in(report, &out.stderr), out)
}

/// `backflow job run --quiet --report REPORT JOB` with the lab's store, to run.
pub fn job_command(lab: &Lab, job: &Path, report: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backflow"));
    lab.apply(&mut cmd)
        .env_remove("RUST_LOG")
        .args(["job", "run", "--quiet", "--report"])
        .arg(report)
        .arg(job);
    cmd
}

/// The session record a job run wrote to `report` (`stderr`: what it said, for the panic).
pub fn session_in(report: &Path, stderr: &[u8]) -> SessionRecord {
    serde_json::from_slice(&std::fs::read(report).unwrap_or_else(|e| {
        panic!(
            "no session record ({e}); job run said:\n{}",
            String::from_utf8_lossy(stderr)
        )
    }))
    .unwrap()
}

/// Restores `snapshot` of the lab's repository and compares it with the VM's disk (the VMs run no
/// guest: their disks do not change after the lab wrote them).
pub fn assert_restores_to_disk(lab: &Lab, snapshot: &str, disk: &Path, scratch: &Path) {
    assert_restores_to(lab, snapshot, disk, "qcow2", scratch);
}

/// Restores `snapshot` of the lab's repository and compares it with `image` (of `format`, read
/// with `-U`: a running VM's disk may be it).
pub fn assert_restores_to(lab: &Lab, snapshot: &str, image: &Path, format: &str, scratch: &Path) {
    let out = scratch.join(format!("{snapshot}.raw"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backflow"));
    lab.apply(&mut cmd)
        .args([
            "restore",
            "--quiet",
            "--repo",
            lab.repository(),
            "--snapshot",
            snapshot,
            "--to",
        ])
        .arg(&out);
    run_ok(&mut cmd);
    let compared = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", format])
        .arg(&out)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        compared.status.success(),
        "snapshot {snapshot} differs from {}: {}",
        image.display(),
        String::from_utf8_lossy(&compared.stdout)
    );
    std::fs::remove_file(&out).unwrap();
}

/// A copy of the lab's cluster file with `host`'s worker disabled, and a job on it.
pub fn job_without_worker(lab: &Lab, host: &str) -> PathBuf {
    let text = std::fs::read_to_string(lab.cluster_file()).unwrap();
    let needle = format!("  - name: {host}\n");
    assert!(text.contains(&needle), "{text}");
    let text = text.replace(
        &needle,
        &format!("{needle}    worker: {{enabled: false}}\n"),
    );
    let cluster = lab.dir().join(format!("cluster-no-{host}.yaml"));
    std::fs::write(&cluster, text).unwrap();
    let job = std::fs::read_to_string(lab.job_file()).unwrap().replace(
        &lab.cluster_file().display().to_string(),
        &cluster.display().to_string(),
    );
    let path = lab.dir().join(format!("job-no-{host}.yaml"));
    std::fs::write(&path, job).unwrap();
    path
}

/// A copy of the lab's job file (named `name`) that selects only `vm` and adds the YAML `extra`.
pub fn job_for(lab: &Lab, job: &Path, name: &str, vm: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(job).unwrap();
    assert!(text.contains("vms: [\"*\"]"), "{text}");
    let text = text.replace("vms: [\"*\"]", &format!("vms: [\"{vm}\"]")) + extra;
    let path = lab.dir().join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Nothing of a backup of `vm` left on the VMs' hosts: no backup job on any VM of the lab, no
/// scratch file of a job begun from another host (`/var/tmp/backflow-UUID-TARGET.scratch`; the
/// hosts share the machine's /var/tmp, with other tests' labs too), no job directory of a live or
/// dead run in any host's temporary directory (where its workers make them).
pub fn assert_nothing_left(lab: &Lab, vm: &str) {
    for v in lab.vms() {
        assert!(!lab.has_backup_job(&v.name), "{} has a backup job", v.name);
    }
    let uuid = lab
        .virsh(
            &lab.vm_host(vm).expect("the VM runs").name,
            &["domuuid", vm],
        )
        .trim()
        .to_owned();
    for host in lab.hosts() {
        let left = lab.run_on(
            &host.name,
            &format!("ls /var/tmp | grep -E '^backflow-{uuid}-.*\\.scratch$' || true"),
        );
        assert!(
            String::from_utf8_lossy(&left.stdout).trim().is_empty(),
            "{} keeps {}",
            host.name,
            String::from_utf8_lossy(&left.stdout)
        );
    }
    let dirs: Vec<PathBuf> = lab
        .hosts()
        .iter()
        .flat_map(|h| std::fs::read_dir(lab.tmp_dir(&h.name)).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("backflow-libvirt-"))
                && std::fs::read_to_string(p.join("domain")).is_ok_and(|d| d == uuid)
        })
        .collect();
    assert!(dirs.is_empty(), "job directories of {vm} left: {dirs:?}");
}
