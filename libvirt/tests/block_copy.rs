//! Block copy against the real libvirtd at `qemu:///system`, in the shape instant recovery uses it:
//! a running domain whose disk is a qcow2 overlay on a read-only NBD export (here `qemu-nbd` on a
//! unix socket), mirrored into a standalone image while the guest writes, then pivoted. Afterwards
//! the domain (live and persistent definition) runs on the new image, which holds the export's
//! bytes and every guest write, needs no export any more, and compares identical to the
//! expected image. A cancelled copy leaves the disk where it was.
//!
//! Needs libvirtd running (`scripts/setup.sh`); fails, never skips, without it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use backflow_libvirt::Connection;
use backflow_libvirt::block_copy::{begin, cancel, mirror_ready, pivot, progress};
use backflow_testkit::libvirt::{URI, try_virsh, virsh};
use backflow_testkit::qemu::{assert_images_equal, run_command};

/// One throwaway domain on an overlay of an NBD export, removed (with the export) on drop.
struct Exported {
    name: String,
    dir: tempfile::TempDir,
    nbd: Child,
}

impl Exported {
    /// `base.raw` (16 MiB, two patterned MiB) exported read-only, `overlay.qcow2` on it, and a
    /// running domain on the overlay.
    fn start(prefix: &str) -> Exported {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        // QEMU (libvirt-qemu, group kvm) opens the overlay and the socket.
        run_command(Command::new("chgrp").arg("kvm").arg(dir.path()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let base = dir.path().join("base.raw");
        run_command(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&base)
                .arg("16M"),
        );
        run_command(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 1M",
            "-c",
            "write -P 0x5c 9M 1M",
            base.to_str().unwrap(),
        ]));
        let socket = dir.path().join("export.sock");
        let nbd = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=4", "--format=raw"])
            .arg(format!("--socket={}", socket.display()))
            .arg("--export-name=vda")
            .arg(&base)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not create {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        run_command(Command::new("chgrp").arg("kvm").arg(&socket));
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        run_command(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(format!("nbd+unix:///vda?socket={}", socket.display()))
                .arg(&overlay)
                .arg("16M"),
        );
        let name = format!("{prefix}{}", std::process::id());
        let exported = Exported { name, dir, nbd };
        let kvm = Path::new("/dev/kvm").exists();
        let started = kvm && exported.define_and_start("kvm").is_ok();
        if !started {
            let _ = try_virsh(&["undefine", &exported.name]);
            exported
                .define_and_start("qemu")
                .unwrap_or_else(|e| panic!("domain {} does not start: {e}", exported.name));
        }
        exported
    }

    fn define_and_start(&self, kind: &str) -> Result<(), String> {
        // No <cpu>: host models abort QEMU on these machines (../shared/notes/libvirt-qemu.md).
        let xml = format!(
            "<domain type='{kind}'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <memballoon model='none'/></devices></domain>",
            self.name,
            self.path("overlay.qcow2").display()
        );
        let file = self.path(&format!("domain-{kind}.xml"));
        std::fs::write(&file, xml).unwrap();
        try_virsh(&["define", file.to_str().unwrap()])?;
        try_virsh(&["start", &self.name]).map(drop)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A guest write through the disk's device (QEMU's monitor), flushed.
    fn guest_write(&self, command: &str) {
        for c in [command, "flush"] {
            let hmp = format!("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"{c}\"");
            let reply = virsh(&["qemu-monitor-command", &self.name, "--hmp", &hmp]);
            assert!(reply.trim().is_empty(), "{hmp}: {reply}");
        }
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        let _ = try_virsh(&["destroy", &self.name]);
        let _ = try_virsh(&["undefine", &self.name]);
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
    }
}

fn wait_ready(domain: &virt::domain::Domain, target: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mirror_ready(domain, target).unwrap() {
        assert!(
            Instant::now() < deadline,
            "the copy of {target} is not ready after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_disk_on_an_nbd_export_moves_into_a_standalone_image_while_the_guest_writes() {
    let vm = Exported::start("bf-blockcopy-");
    let conn = Connection::open(Some(URI)).unwrap();
    let (domain, _) = conn.domain(&vm.name).unwrap();
    // Written before the move: in the overlay only.
    vm.guest_write("write -P 0xcd 4M 512k");

    let dest = vm.path("moved.qcow2");
    begin(&domain, "vda", dest.to_str().unwrap(), "qcow2").unwrap();
    let (_, end) = progress(&domain, "vda")
        .unwrap()
        .expect("a block job on vda");
    assert_eq!(end, 16 << 20, "the whole chain is copied");
    wait_ready(&domain, "vda");
    // Written while QEMU mirrors: reaches both, so it survives the pivot.
    vm.guest_write("write -P 0xef 12M 256k");
    pivot(&domain, "vda").unwrap();
    assert_eq!(progress(&domain, "vda").unwrap(), None, "the job ended");

    // The live and the persistent definition run on the new image, with no backing store.
    for flags in [0, virt::sys::VIR_DOMAIN_XML_INACTIVE] {
        let xml = domain.xml_desc(flags).unwrap();
        assert!(
            xml.contains(&format!("<source file='{}'", dest.display())),
            "{xml}"
        );
        assert!(!xml.contains("protocol='nbd'"), "{xml}");
    }
    // The export is not needed any more: the image is standalone (-U: the domain holds its lock).
    let info = run_command(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&dest),
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");

    // What the guest sees = the export's bytes + both guest writes.
    let expected = vm.path("expected.raw");
    std::fs::copy(vm.path("base.raw"), &expected).unwrap();
    run_command(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xcd 4M 512k",
        "-c",
        "write -P 0xef 12M 256k",
        expected.to_str().unwrap(),
    ]));
    // -U: the running domain holds the image's lock.
    let out = run_command(Command::new("qemu-img").args([
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        dest.to_str().unwrap(),
        expected.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{out:?}");

    // After the domain stops, the image alone (no lock) still compares identical.
    virsh(&["destroy", &vm.name]);
    assert_images_equal(&dest, "qcow2", &expected, "raw");
}

#[test]
fn a_cancelled_copy_leaves_the_disk_on_its_overlay() {
    let vm = Exported::start("bf-blockcancel-");
    let conn = Connection::open(Some(URI)).unwrap();
    let (domain, _) = conn.domain(&vm.name).unwrap();
    let dest = vm.path("never.qcow2");
    begin(&domain, "vda", dest.to_str().unwrap(), "qcow2").unwrap();
    wait_ready(&domain, "vda");
    cancel(&domain, "vda").unwrap();
    // The job goes away asynchronously after the abort returns.
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&domain, "vda").unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the cancelled job is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let xml = domain.xml_desc(0).unwrap();
    assert!(
        xml.contains(&format!(
            "<source file='{}'",
            vm.path("overlay.qcow2").display()
        )),
        "{xml}"
    );
    assert!(xml.contains("protocol='nbd'"), "{xml}");
    assert!(!xml.contains("<mirror"), "{xml}");
    // A copy of a disk that has none running is an error naming the disk, not a panic.
    let err = mirror_ready(&domain, "vda").unwrap_err().to_string();
    assert!(err.contains("no block copy running"), "{err}");
    let err = begin(&domain, "vdz", dest.to_str().unwrap(), "qcow2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("virDomainBlockCopy"), "{err}");
}
