//! The connector against the real libvirt library and its in-process test driver (`test:///default`):
//! no daemon. The driver ships one running domain, `test`; the tests define their own on the same
//! connection. All connections of the process share the driver's state, so every test uses its own VM
//! names and undefines what it defined.

use std::path::Path;
use std::process::Command;

use backflow_libvirt::{Connection, DiskSource, LibvirtError, VmState};

const TEST_URI: &str = "test:///default";
const MIB: u64 = 1024 * 1024;

fn open() -> Connection {
    Connection::open(Some(TEST_URI)).expect("opening the test driver")
}

fn qemu_img_create(path: &Path, size: &str) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .output()
        .expect("running qemu-img (scripts/setup.sh installs it)");
    assert!(out.status.success(), "{out:?}");
}

/// A domain the test driver accepts, with the given `<disk>` elements.
fn domain_xml(name: &str, disks: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"
    )
}

/// Undefines (and stops) the domain when dropped, also when an assertion failed.
struct Defined<'a>(&'a Connection, String);

impl Drop for Defined<'_> {
    fn drop(&mut self) {
        if let Ok(dom) = self.0.virt().lookup_domain_by_name(&self.1) {
            let _ = dom.destroy();
            let _ = dom.undefine();
        }
    }
}

fn define<'a>(conn: &'a Connection, name: &str, disks: &str) -> Defined<'a> {
    conn.virt()
        .define_domain_xml(&domain_xml(name, disks))
        .expect("defining a domain");
    Defined(conn, name.to_owned())
}

#[test]
fn lists_the_drivers_running_domain() {
    let conn = open();
    assert_eq!(conn.uri(), TEST_URI);
    assert!(!conn.hostname().is_empty());
    let vms = conn.list_vms().unwrap();
    let test = vms
        .iter()
        .find(|v| v.name == "test")
        .expect("domain `test`");
    assert_eq!(test.state, VmState::Running);
    assert_eq!(test.state.to_string(), "running");
    assert!(test.persistent);
    assert_eq!(test.host, conn.hostname());
    assert_eq!(test.uuid, "6695eb01-f6a4-8304-79aa-97f2502e193f");
    assert!(test.definition.contains("<name>test</name>"));
    assert_eq!(test.disks.len(), 1);
    let vda = &test.disks[0];
    assert_eq!(vda.target, "vda");
    assert_eq!(vda.bus.as_deref(), Some("virtio"));
    assert_eq!(
        vda.source,
        DiskSource::File {
            path: "/guest/diskimage1".into()
        }
    );
    // The driver's image does not exist: no capacity, and the reason says why.
    assert_eq!(vda.capacity, None);
    let reason = vda.capacity_unknown.as_deref().unwrap();
    assert!(reason.contains("/guest/diskimage1"), "{reason}");
    // Sorted by name.
    assert!(vms.windows(2).all(|w| w[0].name <= w[1].name));
}

#[test]
fn describes_two_disks_and_a_cdrom() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("web01.qcow2");
    qemu_img_create(&qcow2, "20M");
    // Stands in for a block device: libvirt's test driver does not look, qemu-img reads it as raw.
    let block = dir.path().join("web01-data.raw");
    std::fs::File::create(&block)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let iso = dir.path().join("install.iso");
    let conn = open();
    let name = "backflow-two-disks";
    let _vm = define(
        &conn,
        name,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
               <source dev='{}'/><target dev='vdb' bus='virtio'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
               <source file='{}'/><target dev='sda' bus='sata'/><readonly/></disk>",
            qcow2.display(),
            block.display(),
            iso.display()
        ),
    );

    let vm = conn.vm(name).unwrap();
    assert_eq!(vm.name, name);
    assert_eq!(vm.state, VmState::ShutOff);
    assert_eq!(vm.state.to_string(), "shut off");
    assert!(vm.persistent);
    assert_eq!(vm.host, conn.hostname());
    assert_eq!(vm.uuid.len(), 36, "{}", vm.uuid);
    assert!(vm.definition.contains(&qcow2.display().to_string()));

    let [vda, vdb, sda] = &vm.disks[..] else {
        panic!("three disks expected: {:#?}", vm.disks);
    };
    assert_eq!(
        (vda.target.as_str(), vda.device.as_str(), vda.bus.as_deref()),
        ("vda", "disk", Some("virtio"))
    );
    assert_eq!(vda.format.as_deref(), Some("qcow2"));
    assert_eq!(
        vda.source,
        DiskSource::File {
            path: qcow2.display().to_string()
        }
    );
    assert_eq!(vda.capacity, Some(20 * MIB), "{:?}", vda.capacity_unknown);
    assert_eq!(vda.capacity_unknown, None);

    assert_eq!(
        (vdb.target.as_str(), vdb.device.as_str(), vdb.bus.as_deref()),
        ("vdb", "disk", Some("virtio"))
    );
    assert_eq!(vdb.format.as_deref(), Some("raw"));
    assert_eq!(
        vdb.source,
        DiskSource::Block {
            path: block.display().to_string()
        }
    );
    assert_eq!(vdb.capacity, Some(8 * MIB), "{:?}", vdb.capacity_unknown);

    assert_eq!(
        (sda.target.as_str(), sda.device.as_str(), sda.bus.as_deref()),
        ("sda", "cdrom", Some("sata"))
    );
    assert!(!sda.is_backup_candidate());
    // The ISO does not exist: unknown, with qemu-img's reason.
    assert_eq!(sda.capacity, None);
    assert!(sda.capacity_unknown.is_some());

    let candidates: Vec<_> = vm.backup_disks().map(|d| d.target.as_str()).collect();
    assert_eq!(candidates, ["vda", "vdb"]);

    // States follow the domain.
    let dom = conn.virt().lookup_domain_by_name(name).unwrap();
    dom.create().unwrap();
    assert_eq!(conn.vm(name).unwrap().state, VmState::Running);
    dom.suspend().unwrap();
    assert_eq!(conn.vm(name).unwrap().state, VmState::Paused);
    dom.destroy().unwrap();
    assert_eq!(conn.vm(name).unwrap().state, VmState::ShutOff);

    // And the listing has it too.
    assert!(conn.list_vms().unwrap().iter().any(|v| v.name == name));
}

#[test]
fn capacity_of_storage_volumes_comes_from_libvirt() {
    let conn = open();
    let pool = conn
        .virt()
        .list_all_storage_pools(0)
        .unwrap()
        .into_iter()
        .find(|p| p.name().unwrap() == "default-pool")
        .expect("the test driver's default-pool");
    let vol_name = "backflow-vol-disk.qcow2";
    let vol = virt::storage_vol::StorageVol::create_xml(
        &pool,
        &format!(
            "<volume><name>{vol_name}</name><capacity unit='MiB'>48</capacity>\
             <target><format type='qcow2'/></target></volume>"
        ),
        0,
    )
    .expect("creating a test volume");
    let path = vol.path().unwrap();
    let name = "backflow-volumes";
    let _vm = define(
        &conn,
        name,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='{path}'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
               <source pool='default-pool' volume='{vol_name}'/><target dev='vdb' bus='virtio'/></disk>\
             <disk type='network' device='disk'><driver name='qemu' type='raw'/>\
               <source protocol='nbd' name='export'><host name='10.0.0.5' port='10809'/></source>\
               <target dev='vdc' bus='virtio'/></disk>"
        ),
    );
    let vm = conn.vm(name).unwrap();
    let _ = vol.delete(0);
    assert_eq!(vm.disks[0].capacity, Some(48 * MIB), "{:?}", vm.disks[0]);
    assert_eq!(
        vm.disks[1].source,
        DiskSource::Volume {
            pool: "default-pool".into(),
            volume: vol_name.into()
        }
    );
    assert_eq!(vm.disks[1].capacity, Some(48 * MIB), "{:?}", vm.disks[1]);
    assert_eq!(
        vm.disks[2].source,
        DiskSource::Network {
            protocol: "nbd".into(),
            name: Some("export".into()),
            hosts: vec!["10.0.0.5:10809".into()]
        }
    );
    assert_eq!(vm.disks[2].capacity, None);
    assert!(
        vm.disks[2]
            .capacity_unknown
            .as_deref()
            .unwrap()
            .contains("network disk")
    );
}

#[test]
fn a_missing_vm_is_a_typed_error_naming_it() {
    let conn = open();
    let err = conn.vm("backflow-no-such-vm").unwrap_err();
    assert!(
        matches!(&err, LibvirtError::NoSuchVm { uri, name } if uri == TEST_URI && name == "backflow-no-such-vm"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "test:///default: no VM named `backflow-no-such-vm`"
    );
    assert!(!err.is_retryable());
}

#[test]
fn a_bad_uri_is_a_typed_error_naming_it() {
    let uri = "test:///nonexistent/backflow-driver-config.xml";
    let err = Connection::open(Some(uri))
        .err()
        .expect("opening must fail");
    assert!(
        matches!(&err, LibvirtError::Connect { uri: u, unreachable: false, .. } if u == uri),
        "{err:?}"
    );
    assert!(err.to_string().contains(uri), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn a_daemon_that_does_not_answer_is_named_as_such() {
    let uri = "qemu+unix:///system?socket=/nonexistent/backflow-libvirt-sock";
    let err = Connection::open_read_only(Some(uri))
        .err()
        .expect("opening must fail");
    assert!(
        matches!(
            &err,
            LibvirtError::Connect {
                unreachable: true,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("libvirtd does not answer at {uri}")),
        "{message}"
    );
    assert!(err.is_retryable());
}

#[test]
fn json_has_everything_but_the_definition() {
    let conn = open();
    let vm = conn.vm("test").unwrap();
    let json = serde_json::to_value(&vm).unwrap();
    assert_eq!(json["name"], "test");
    assert_eq!(json["state"], "running");
    assert_eq!(json["host"], conn.hostname());
    assert_eq!(json["disks"][0]["target"], "vda");
    assert_eq!(json["disks"][0]["source"]["type"], "file");
    assert_eq!(json["disks"][0]["source"]["path"], "/guest/diskimage1");
    assert!(json.get("definition").is_none(), "{json}");
}

#[test]
fn define_vm_defines_a_new_domain_and_refuses_a_name_in_use() {
    let conn = open();
    let original = define(&conn, "backflow-define-original", "");
    let xml = conn.vm(&original.1).unwrap().definition;
    let new = backflow_libvirt::new_definition(&xml, "backflow-define-copy", &[]).unwrap();
    let copy = Defined(&conn, "backflow-define-copy".to_owned());
    let vm = conn.define_vm(&new.xml).unwrap();
    assert_eq!(vm.name, copy.1);
    assert_eq!(vm.state, VmState::ShutOff);
    assert_ne!(vm.uuid, conn.vm(&original.1).unwrap().uuid);
    conn.start_vm(&vm.name).unwrap();
    assert_eq!(conn.vm(&vm.name).unwrap().state, VmState::Running);

    // The original's name (its definition unchanged, even with its own UUID): refused.
    for xml in [&xml, &new.xml.replace("backflow-define-copy", &original.1)] {
        let before = conn.vm(&original.1).unwrap().definition;
        match conn.define_vm(xml) {
            Err(LibvirtError::VmExists { name, .. }) => assert_eq!(name, original.1),
            other => panic!("expected VmExists, got {other:?}"),
        }
        assert_eq!(conn.vm(&original.1).unwrap().definition, before);
    }
    let err = conn.define_vm("<domain>").unwrap_err();
    assert!(matches!(err, LibvirtError::Definition(_)), "{err}");
    assert!(!err.is_retryable());
}
