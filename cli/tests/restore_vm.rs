//! `backflow run specs/restore-vm.yaml` against a real libvirtd (`qemu:///system`): a snapshot of a
//! throwaway domain's two disks (with its definition) is restored as a new domain that libvirt
//! starts, on images equal to the originals; a name that exists already defines nothing.
//!
//! The snapshot is written through the repository API from the domain's real images (converted
//! to raw), so that this test does not depend on the VM backup stage.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_pipeline::digest_of;
use backflow_repository::{ChunkRef, Codec, DiskMeta, Repository};
use backflow_testkit::libvirt::{Domain, URI, domain_names, virsh};
use backflow_testkit::qemu::{assert_images_equal, run_command};
use common::{backflow, init_repo, spec};

/// A domain the restore may define: destroyed and undefined when the test ends, passed or not.
struct Defined(String);

impl Drop for Defined {
    fn drop(&mut self) {
        for args in [["destroy", &self.0], ["undefine", &self.0]] {
            let _ = Command::new("virsh").arg("-c").arg(URI).args(args).output();
        }
    }
}

/// Stores the images (raw) as one snapshot of `vm`, chunks uncompressed, with `domain_xml`.
fn snapshot_of(repo: &Path, vm: &str, disks: &[(&str, &Path)], domain_xml: String) -> String {
    let repo = Repository::open(repo).unwrap();
    let session = repo.begin_backup(vm).unwrap();
    let mut packs = session.pack_writer();
    let chunk = repo.chunk_size() as usize;
    for (name, path) in disks {
        let data = std::fs::read(path).unwrap();
        let slot = session
            .add_disk(DiskMeta {
                name: (*name).into(),
                size: data.len() as u64,
                chunk_size: repo.chunk_size(),
                location: path.display().to_string(),
                cbt: None,
            })
            .unwrap();
        let mut stored = std::collections::HashSet::new();
        for (i, plain) in data.chunks(chunk).enumerate() {
            let r = if plain.iter().all(|&b| b == 0) {
                ChunkRef::Zero
            } else {
                let digest = digest_of(plain);
                if stored.insert(digest) && repo.lookup(&digest).unwrap().is_none() {
                    packs
                        .add(digest, Codec::None, plain.len() as u32, plain)
                        .unwrap();
                }
                ChunkRef::Data(digest)
            };
            session.set_chunk(slot, i as u64, r).unwrap();
        }
    }
    packs.finish().unwrap();
    session.commit(Some(domain_xml)).unwrap().id
}

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
        .args(["--quiet", "--report"])
        .arg(report)
        .output()
        .unwrap()
}

/// A directory QEMU (running as libvirt-qemu) can reach the images in.
fn image_dir(parent: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
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
    virsh(&["destroy", original.name()]);
    let xml = virsh(&["dumpxml", "--inactive", original.name()]);
    let original_uuid = uuid_of(original.name());

    let work = tempfile::tempdir().unwrap();
    let mut raws = Vec::new();
    for disk in ["vda", "vdb"] {
        let raw = work.path().join(format!("{disk}.raw"));
        run_command(
            Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(original.disk(disk))
                .arg(&raw),
        );
        raws.push(raw);
    }
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    let id = snapshot_of(
        &repo,
        original.name(),
        &[("vda", &raws[0]), ("vdb", &raws[1])],
        xml,
    );

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
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let domain = &report["results"]["domain"];
    assert_eq!(domain["name"], new_name.as_str(), "{report}");
    assert_eq!(domain["snapshot"], id.as_str(), "{report}");
    assert_eq!(domain["started"], false, "{report}");

    // A new domain, with a UUID of its own, on the restored images only.
    assert!(domain_names().contains(&new_name));
    let new_uuid = uuid_of(&new_name);
    assert_eq!(domain["uuid"], new_uuid.as_str(), "{report}");
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

    // A name that exists already (the original's): the run fails, nothing is defined or changed.
    let before = domain_names();
    let again = image_dir(work.path(), "again");
    let out = restore_vm(&repo, &again, original.name(), &report_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("a VM named `{}` exists already", original.name())),
        "{stderr}"
    );
    assert_eq!(domain_names(), before);
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
