//! `backflow run specs/restore-vm.yaml` against a real libvirtd (`qemu:///system`): a snapshot of a
//! throwaway domain's two disks (with its definition) is restored as a new domain that libvirt
//! starts, on images equal to the originals; a name that exists already defines nothing.
//!
//! The snapshot is taken from the running domain with `specs/backup-vm.yaml`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use backflow_testkit::libvirt::{Domain, URI, domain_names, make_traversable, virsh};
use backflow_testkit::qemu::assert_images_equal;
use common::vm::{Defined, backup_vm};
use common::{backflow, init_repo, read_report, spec};

fn restore_vm(repo: &Path, to: &Path, name: &str, report: &Path) -> Output {
    backflow()
        .arg("run")
        .arg(spec("restore-vm.yaml"))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .arg("--var")
        .arg(format!("to={}", to.display()))
        .args([
            "--var",
            &format!("name={name}"),
            "--var",
            &format!("uri={URI}"),
        ])
        .arg("--report")
        .arg(report)
        .output()
        .unwrap()
}

/// A directory QEMU (running as libvirt-qemu) can reach the images in.
fn image_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    make_traversable(&dir);
    dir
}

fn uuid_of(name: &str) -> String {
    virsh(&["domuuid", name]).trim().to_owned()
}

#[test]
fn restore_vm_defines_a_new_domain_on_the_restored_images() {
    let original = Domain::start("backflow-restore-vm", &[("vda", "64M"), ("vdb", "32M")]);
    original.guest_write("vda", "write -P 0x11 0 1M");
    original.guest_write("vda", "write -P 0x22 40M 512k");
    original.guest_write("vdb", "write -P 0x33 1M 2M");
    let original_uuid = uuid_of(original.name());
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    // Backed up running, through libvirt's backup job; then stopped, so that its images stay as
    // they were at the backup.
    let id = backup_vm(&repo, original.name(), &work.path().join("backup.json"));
    virsh(&["destroy", original.name()]);

    let new_name = format!("{}-copy", original.name());
    let defined = Defined(new_name.clone());
    let to = image_dir(work.path(), "restored");
    let report_path = work.path().join("report.json");
    let out = restore_vm(&repo, &to, &new_name, &report_path);
    assert!(
        out.status.success(),
        "restore-vm failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_report(&report_path);
    let domain = &report["results"]["domain"];
    assert_eq!(domain["name"], new_name.as_str(), "{report}");
    assert_eq!(domain["snapshot"], id.as_str(), "{report}");
    assert_eq!(domain["started"], false, "{report}");

    // A new domain, with a UUID of its own, on the restored images only.
    assert!(domain_names().contains(&new_name));
    let new_uuid = uuid_of(&new_name);
    assert_eq!(domain["uuid"], new_uuid.as_str(), "{report}");
    // The summary says it in the user's terms.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("defined domain {new_name} (UUID {new_uuid})")),
        "{stdout}"
    );
    assert_ne!(new_uuid, original_uuid);
    assert_eq!(
        uuid_of(original.name()),
        original_uuid,
        "the original changed"
    );
    let disks =
        backflow_libvirt::parse_disks(&virsh(&["dumpxml", "--inactive", &new_name])).unwrap();
    let to = std::fs::canonicalize(&to).unwrap();
    let got: Vec<_> = disks
        .iter()
        .map(|d| (d.target.clone(), d.format.clone(), d.source.to_string()))
        .collect();
    let want: Vec<_> = ["vda", "vdb"]
        .iter()
        .map(|t| {
            (
                (*t).to_owned(),
                Some("qcow2".to_owned()),
                to.join(format!("{t}.qcow2")).display().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Equal to the originals, as QEMU reads them.
    for disk in ["vda", "vdb"] {
        assert_images_equal(
            original.disk(disk),
            "qcow2",
            &to.join(format!("{disk}.qcow2")),
            "qcow2",
        );
    }

    // libvirt starts it.
    virsh(&["start", &new_name]);
    assert_eq!(virsh(&["domstate", &new_name]).trim(), "running");
    virsh(&["destroy", &new_name]);

    // A name that exists already (the original's): the run fails before it restores anything,
    // nothing is defined or changed.
    let before = domain_names();
    let again = image_dir(work.path(), "again");
    let out = restore_vm(&repo, &again, original.name(), &report_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused in the checks before any data moved: bad input (exit 2), not a failed run.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("a VM named `{}` exists already", original.name())),
        "{stderr}"
    );
    assert_eq!(domain_names(), before);
    assert_eq!(
        std::fs::read_dir(&again).unwrap().count(),
        0,
        "the name is refused before anything is restored"
    );
    assert_eq!(
        uuid_of(original.name()),
        original_uuid,
        "the original changed"
    );
    let original_disks =
        backflow_libvirt::parse_disks(&virsh(&["dumpxml", "--inactive", original.name()])).unwrap();
    assert_eq!(
        original_disks[0].source.to_string(),
        original.disk("vda").display().to_string()
    );

    drop(defined);
    assert!(!domain_names().contains(&new_name));
}

#[test]
fn restore_vm_refuses_a_snapshot_without_a_domain_definition() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 256 << 10]).unwrap();
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    common::backup(&image, &repo);
    let name = format!("backflow-restore-vm-none-{}", std::process::id());
    let _defined = Defined(name.clone());
    let to = image_dir(work.path(), "restored");
    let out = restore_vm(&repo, &to, &name, &work.path().join("report.json"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("has no domain definition: it was not taken from a libvirt VM"),
        "{stderr}"
    );
    assert!(!domain_names().contains(&name));
}
