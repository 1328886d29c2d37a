//! `backflow demo` against a real libvirtd (`qemu:///system`): the README's first command runs a
//! throwaway VM, backs it up twice (full, then incremental from its checkpoint), restores both
//! restore points identical, restores the second as a running VM, and leaves no domain behind. A
//! domain named `backflow-demo` that is not a demo's stops it, untouched.
//!
//! One test: the demo's domain names are fixed, so its runs cannot overlap.

mod common;

use std::path::Path;

use backflow_testkit::libvirt::{domain_names, try_virsh, virsh};
use common::backflow;

const DOMAIN: &str = "backflow-demo";
const RESTORED: &str = "backflow-demo-restored";

/// Undefines the foreign `backflow-demo` the test defines, whatever happens.
struct Foreign;

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = try_virsh(&["undefine", DOMAIN]);
    }
}

/// Defines (does not start) a domain named [`DOMAIN`] whose `vda` is the `format` image `source`;
/// its XML goes in `dir`.
fn define_shut_off(dir: &Path, format: &str, source: &Path) {
    let xml = dir.join(format!("{DOMAIN}-{format}.xml"));
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            source.display()
        ),
    )
    .unwrap();
    virsh(&["define", xml.to_str().unwrap()]);
}

fn demo(dir: &Path) -> std::process::Output {
    backflow()
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .args(["--size", "32M"])
        .output()
        .unwrap()
}

#[test]
fn demo_backs_up_and_restores_a_running_vm_and_removes_its_domains() {
    let names = domain_names();
    assert!(
        !names.iter().any(|n| n == DOMAIN || n == RESTORED),
        "a {DOMAIN} domain exists already: {names:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");

    // A shut-off domain of the demo's name whose disk is elsewhere is the user's: refused, kept.
    {
        let foreign = Foreign;
        define_shut_off(tmp.path(), "raw", Path::new("/nonexistent/foreign.raw"));
        let out = demo(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the demo ran over a foreign domain");
        assert!(
            stderr.contains("was not made by a demo") && stderr.contains("--checkpoints-metadata"),
            "{stderr}"
        );
        assert!(domain_names().iter().any(|n| n == DOMAIN));
        drop(foreign);
    }

    let out = demo(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Both raw restores and the restored VM's disk equal the disk at each backup.
    assert_eq!(stdout.matches(": identical").count(), 3, "{stdout}");
    assert!(
        stdout.contains(&format!("virsh domstate {RESTORED}: running")),
        "{stdout}"
    );
    // The second backup read only around the guest's writes (about 5% of the disk).
    let line = stdout
        .lines()
        .find(|l| l.starts_with("backup 2 (incremental): read "))
        .unwrap_or_else(|| panic!("no summary of backup 2:\n{stdout}"));
    let mib: f64 = line["backup 2 (incremental): read ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(mib > 0.0 && mib < 4.0, "{line}");
    assert!(stdout.contains("demo done"), "{stdout}");
    let names = domain_names();
    assert!(
        !names.iter().any(|n| n == DOMAIN || n == RESTORED),
        "the demo left domains: {names:?}"
    );

    // A domain a previous demo in this directory left (its disk is there) is removed by the next.
    let leftover = Foreign;
    define_shut_off(tmp.path(), "qcow2", &dir.join("disk.qcow2"));
    let out = demo(&dir);
    assert!(
        out.status.success(),
        "the demo after a leftover failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("left by a previous demo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(leftover);
    assert!(!domain_names().iter().any(|n| n == DOMAIN || n == RESTORED));
}
