//! The backup and checkpoint API against the real libvirtd at `qemu:///system` (a throwaway domain
//! from `backflow_testkit::libvirt`), read back with our NBD client: a full pull-mode backup with a
//! checkpoint, then an incremental one whose dirty bitmap holds exactly the write made in between.
//!
//! Needs libvirtd running (`scripts/setup.sh`); fails, never skips, without it.

use std::path::Path;
use std::process::Command;

use backflow_libvirt::backup::{
    abort_job, backup_xml, begin_backup, create_checkpoint, delete_checkpoint, list_checkpoints,
};
use backflow_libvirt::{Connection, LibvirtError};
use backflow_nbd::{Client, STATE_DIRTY};
use backflow_testkit::libvirt::{Domain, URI};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BITMAP: &str = "qemu:dirty-bitmap:backup-vda";

/// A directory QEMU (user libvirt-qemu) can create the NBD socket and the scratch file in.
fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("backflow-backup-")
        .tempdir()
        .unwrap();
    let out = Command::new("chown")
        .arg("libvirt-qemu:kvm")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "chown: {out:?}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
    dir
}

fn pull_backup_xml(dir: &Path, incremental: Option<&str>) -> String {
    let incremental = incremental
        .map(|c| format!("<incremental>{c}</incremental>"))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='pull'>{incremental}\
         <server transport='unix' socket='{dir}/sock'/>\
         <disks><disk name='vda' backup='yes' type='file'>\
         <scratch file='{dir}/scratch-vda.qcow2'/></disk></disks></domainbackup>",
        dir = dir.display()
    )
}

fn checkpoint_xml(name: &str) -> String {
    format!(
        "<domaincheckpoint><name>{name}</name>\
         <disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
    )
}

/// Polls `done` for up to 10 s: libvirt finishes an aborted job's clean-up asynchronously.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn full_then_incremental_pull_backup_with_checkpoints() {
    let fixture = Domain::start("backflow-backup", &[("vda", "64M")]);
    let conn = Connection::open(Some(URI)).unwrap();
    let domain = conn.virt().lookup_domain_by_name(fixture.name()).unwrap();
    fixture.guest_write("vda", "write -P 0xab 1M 1M");

    // A bad backup XML: a typed error naming the call and the VM, no panic.
    let err = begin_backup(&domain, "<domainbackup", None).unwrap_err();
    match &err {
        LibvirtError::Call { call, vm, .. } => {
            assert_eq!(*call, "virDomainBackupBegin");
            assert_eq!(vm.as_deref(), Some(fixture.name()));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("virDomainBackupBegin"), "{err}");
    // No job runs after the failure.
    assert!(backup_xml(&domain).is_err());
    // A NUL byte is refused before libvirt is called.
    assert!(matches!(
        begin_backup(&domain, "<a>\0</a>", None),
        Err(LibvirtError::Argument { .. })
    ));

    // Full backup, creating cp1.
    let dir = socket_dir();
    let socket = dir.path().join("sock");
    begin_backup(
        &domain,
        &pull_backup_xml(dir.path(), None),
        Some(&checkpoint_xml("cp1")),
    )
    .unwrap();
    let job = backup_xml(&domain).unwrap();
    assert!(
        job.contains("<domainbackup") && job.contains("sock"),
        "{job}"
    );
    {
        let mut nbd = Client::connect_unix(&socket, "vda", &["base:allocation"]).unwrap();
        let mut buf = vec![0xff; (2 * MIB) as usize];
        nbd.read_at(0, &mut buf).unwrap();
        let (zeros, written) = buf.split_at(MIB as usize);
        assert!(zeros.iter().all(|&b| b == 0), "the first MiB is not zeros");
        assert!(
            written.iter().all(|&b| b == 0xab),
            "the second MiB is not 0xab"
        );
        // A full backup has no dirty bitmap to offer.
        assert!(Client::connect_unix(&socket, "vda", &[BITMAP]).is_err());
    }
    abort_job(&domain).unwrap();
    wait_until("the job ends and its socket goes", || {
        backup_xml(&domain).is_err() && !socket.exists()
    });
    assert_eq!(list_checkpoints(&domain).unwrap(), ["cp1"]);
    // Aborting when no job runs is an error naming the call.
    match abort_job(&domain) {
        Err(LibvirtError::Call { call, .. }) => assert_eq!(call, "virDomainAbortJob"),
        other => panic!("unexpected {other:?}"),
    }

    // Incremental backup from cp1, creating cp2: exactly the 64 KiB written since is dirty.
    fixture.guest_write("vda", "write -P 0xcd 8M 64K");
    begin_backup(
        &domain,
        &pull_backup_xml(dir.path(), Some("cp1")),
        Some(&checkpoint_xml("cp2")),
    )
    .unwrap();
    {
        let mut nbd = Client::connect_unix(&socket, "vda", &[BITMAP]).unwrap();
        let dirty: Vec<(u64, u64)> = nbd
            .block_status(0, 64 * MIB, BITMAP)
            .unwrap()
            .into_iter()
            .filter(|e| e.flags & STATE_DIRTY != 0)
            .map(|e| (e.offset, e.len))
            .collect();
        assert_eq!(dirty, [(8 * MIB, 64 * KIB)]);
        let mut buf = vec![0; (64 * KIB) as usize];
        nbd.read_at(8 * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xcd));
    }
    abort_job(&domain).unwrap();
    wait_until("the incremental job ends", || backup_xml(&domain).is_err());
    let mut names = list_checkpoints(&domain).unwrap();
    names.sort();
    assert_eq!(names, ["cp1", "cp2"]);

    // A checkpoint made on its own, then all deleted, newest first.
    assert_eq!(
        create_checkpoint(&domain, &checkpoint_xml("cp3")).unwrap(),
        "cp3"
    );
    match delete_checkpoint(&domain, "nope") {
        Err(LibvirtError::Call { call, .. }) => {
            assert_eq!(call, "virDomainCheckpointLookupByName")
        }
        other => panic!("unexpected {other:?}"),
    }
    for name in ["cp3", "cp2", "cp1"] {
        delete_checkpoint(&domain, name).unwrap();
    }
    assert!(list_checkpoints(&domain).unwrap().is_empty());
}
