//! `backflow vms` against a real libvirtd (`qemu:///system`, started by `scripts/setup.sh`) running
//! a throwaway domain of the test's own, and the domain fixture's guest writes and clean-up.

mod common;

use std::process::Command;

use backflow_testkit::libvirt::{Domain, URI, domain_names};
use backflow_testkit::qemu::{live, run_command};
use common::{backflow, run_ok};

#[test]
fn vms_lists_a_running_domain_with_its_qcow2_disks_and_guest_writes_reach_the_image() {
    let domain = Domain::start("backflow-vms", &[("vda", "64M"), ("vdb", "32M")]);
    let name = domain.name().to_owned();
    let pid = domain.started_pid();
    assert!(live(pid), "QEMU of {name} (pid {pid}) is not running");

    let out = run_ok(backflow().args(["vms", "--uri", URI, "--json"]));
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vm = vms
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap_or_else(|| panic!("no VM {name} in {vms}"));
    assert_eq!(vm["state"], "running", "{vm}");
    let disks = vm["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{vm}");
    for (disk, (target, capacity)) in disks.iter().zip([("vda", 67108864u64), ("vdb", 33554432)]) {
        assert_eq!(disk["target"], target, "{vm}");
        assert_eq!(disk["device"], "disk", "{vm}");
        assert_eq!(disk["format"], "qcow2", "{vm}");
        assert_eq!(disk["source"]["type"], "file", "{vm}");
        assert_eq!(
            disk["source"]["path"],
            domain.disk(target).to_str().unwrap(),
            "{vm}"
        );
        assert_eq!(disk["capacity"], capacity, "{vm}");
    }

    // The second disk, through its guest device: the image (read while QEMU holds it, -U)
    // shows the pattern where nothing was before.
    let image = domain.disk("vdb");
    let read = |pattern: &str| {
        Command::new("qemu-io")
            .args(["-r", "-U", "-f", "qcow2", "-c"])
            .arg(format!("read -P {pattern} 1M 64k"))
            .arg(image)
            .output()
            .unwrap()
    };
    let pattern_absent = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
    };
    assert!(
        pattern_absent(&read("0xab")),
        "vdb holds the pattern before the write"
    );
    domain.guest_write("vdb", "write -P 0xab 1M 64k");
    let after = read("0xab");
    assert!(
        after.status.success() && !pattern_absent(&after),
        "the guest write did not reach {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&after.stdout),
        String::from_utf8_lossy(&after.stderr)
    );
    // vda is untouched.
    run_command(
        Command::new("qemu-io")
            .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0 1M 64k"])
            .arg(domain.disk("vda")),
    );

    let dir = domain.dir().to_owned();
    drop(domain);
    assert!(
        !domain_names().contains(&name),
        "domain {name} is still defined after drop"
    );
    assert!(
        !live(pid),
        "QEMU of {name} (pid {pid}) still runs after drop"
    );
    assert!(!dir.exists(), "{} is still there after drop", dir.display());
}
