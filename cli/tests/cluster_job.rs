//! Backup jobs over a cluster, on the three-host lab (testkit::cluster): each VM backed up by the
//! worker on its own host; with one host's worker disabled, that host's VM backed up by another
//! host's worker over NBD with TLS; every restore point restores identical to the VM's disk.

mod common;

use std::path::Path;
use std::process::Command;

use backflow_jobs::Verdict;
use backflow_jobs::placement::Transport;
use backflow_testkit::cluster::Lab;
use common::cluster::*;

/// The byte the guest writes before the backup over TLS.
const MARK: u8 = 0x5a;

/// Waits until tcpdump listens (it says so on stderr).
fn wait_for_capture(tcpdump: &mut std::process::Child) {
    use std::io::{BufRead, BufReader};
    let stderr = BufReader::new(tcpdump.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains("listening on") {
            return;
        }
    }
    panic!("tcpdump ended before it listened");
}

/// Packets and TCP payload bytes in `capture` between `a` and `b` (either way).
fn tcp_between(capture: &Path, a: std::net::Ipv4Addr, b: std::net::Ipv4Addr) -> (u64, u64) {
    let out = Command::new("tcpdump")
        .args(["-nn", "-q", "-r"])
        .arg(capture)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut packets, mut payload) = (0, 0);
    for line in text.lines() {
        let has = |ip: std::net::Ipv4Addr| line.contains(&format!(" {ip}."));
        if has(a) && has(b) {
            packets += 1;
            payload += line
                .rsplit_once("tcp ")
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (packets, payload)
}

#[test]
fn each_vm_is_backed_up_on_its_host_and_over_tls_when_that_worker_is_off() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();

    let session = run_job(&lab, &lab.job_file(), &scratch.path().join("first.json"));
    assert_eq!(session.result, Verdict::Success, "{session:#?}");
    assert_eq!(session.vms.len(), lab.vms().len(), "{session:#?}");
    for vm in lab.vms() {
        let record = session.vms.iter().find(|r| r.vm == vm.name).unwrap();
        let placement = record
            .placement
            .as_ref()
            .expect("a cluster VM records its placement");
        assert_eq!(
            (placement.vm_host.as_str(), placement.worker_host.as_str()),
            (vm.host.as_str(), vm.host.as_str()),
            "{record:#?}"
        );
        assert_eq!(placement.transport, Transport::Local);
        assert!(record.attempts.is_empty());
        assert_restores_to_disk(
            &lab,
            record.snapshot.as_deref().unwrap(),
            &vm.disk,
            scratch.path(),
        );
    }

    // h2's worker off: its VM is read from another host, over TLS, and still restores identical.
    // The guest writes a MiB of one byte first, so that the incremental has data to move; a
    // capture on the lab's bridge sees that data cross between the hosts, and never in clear.
    let h2_vm = lab.vms().iter().find(|v| v.host == "h2").unwrap();
    lab.write_in_vm(&h2_vm.name, 16 << 20, 1 << 20, MARK);
    let capture = scratch.path().join("nbd.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.hub_netns(),
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&capture)
        .args(["tcp", "portrange", "10810-11809"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump (scripts/setup.sh installs it)");
    wait_for_capture(&mut tcpdump);
    let job = job_without_worker(&lab, "h2");
    let session = run_job(&lab, &job, &scratch.path().join("second.json"));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&tcpdump),
        rustix::process::Signal::INT,
    );
    tcpdump.wait().unwrap();
    assert_eq!(session.result, Verdict::Success, "{session:#?}");
    let record = session.vms.iter().find(|r| r.vm == h2_vm.name).unwrap();
    let worker = lab
        .host(&record.placement.as_ref().unwrap().worker_host)
        .address;
    let h2 = lab.host("h2").address;
    let (between, payload) = tcp_between(&capture, h2, worker);
    // The MiB the guest wrote, read across; a loaded machine's capture may drop a few packets.
    assert!(
        payload >= 512 << 10,
        "{payload} bytes of NBD payload between h2 ({h2}) and {worker} ({between} packets): the \
         data did not cross the hosts"
    );
    let bytes = std::fs::read(&capture).unwrap();
    assert!(
        !bytes.windows(4096).any(|w| w.iter().all(|&b| b == MARK)),
        "the guest's data crossed the network in clear"
    );
    for vm in lab.vms() {
        let record = session.vms.iter().find(|r| r.vm == vm.name).unwrap();
        let placement = record.placement.as_ref().unwrap();
        if vm.host == "h2" {
            assert_ne!(placement.worker_host, "h2", "{record:#?}");
            assert_eq!(placement.transport, Transport::NbdTls);
            assert!(
                placement.reason.contains("h2's worker is disabled"),
                "{placement:?}"
            );
        } else {
            assert_eq!(placement.worker_host, vm.host, "{record:#?}");
        }
        assert_restores_to_disk(
            &lab,
            record.snapshot.as_deref().unwrap(),
            &vm.disk,
            scratch.path(),
        );
    }
    // Nothing is left on the VMs' hosts: no backup job, no scratch file, no job directory.
    for vm in lab.vms() {
        assert_nothing_left(&lab, &vm.name);
    }
}

/// A host down before the job: the VM the job backed up there before is reported failed, naming the
/// host; the others are backed up as usual, and the session says the job failed.
#[test]
fn a_host_down_before_the_job_fails_its_vms_and_the_rest_succeed() {
    let lab = Lab::start();
    let scratch = tempfile::tempdir().unwrap();
    let first = run_job(&lab, &lab.job_file(), &scratch.path().join("first.json"));
    assert_eq!(first.vms.len(), lab.vms().len(), "{first:#?}");

    lab.stop_host("h3");
    let (session, out) = run_job_any(&lab, &lab.job_file(), &scratch.path().join("second.json"));
    lab.start_host("h3");
    assert!(!out.status.success(), "{session:#?}");
    assert_eq!(session.result, Verdict::Failure, "{session:#?}");
    assert_eq!(session.vms.len(), lab.vms().len(), "{session:#?}");
    for vm in lab.vms() {
        let record = session.vms.iter().find(|r| r.vm == vm.name).unwrap();
        if vm.host == "h3" {
            assert_eq!(record.result, Verdict::Failure, "{record:#?}");
            let error = record.error.as_deref().unwrap();
            assert!(
                error.contains("unreachable") && error.contains("h3"),
                "{error}"
            );
            assert!(record.snapshot.is_none());
        } else {
            assert_eq!(record.result, Verdict::Success, "{record:#?}");
            assert_eq!(record.placement.as_ref().unwrap().worker_host, vm.host);
            assert_restores_to_disk(
                &lab,
                record.snapshot.as_deref().unwrap(),
                &vm.disk,
                scratch.path(),
            );
        }
    }
}
