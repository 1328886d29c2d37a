//! Discovery and the libvirt check through real libvirt connections: each "host" is libvirt's
//! test driver on a node file of its own (`test:///PATH`, no daemon), so the listings, states and
//! UUIDs come through libvirt's client library exactly as from a remote host.

use std::path::Path;
use std::time::Duration;

use backflow_cluster::{HostError, VmState, WorkerCheck};

const UUID_WEB: &str = "11111111-1111-4111-8111-111111111111";
const UUID_DB: &str = "22222222-2222-4222-8222-222222222222";
const UUID_MAIL: &str = "33333333-3333-4333-8333-333333333333";

/// A domain of a test driver node file; shut off unless `running`.
fn domain(name: &str, uuid: &str, running: bool) -> String {
    // The test driver's own namespace sets the state: 5 is VIR_DOMAIN_SHUTOFF.
    let state = if running {
        String::new()
    } else {
        "<test:runstate>5</test:runstate>".into()
    };
    format!(
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><vcpu>1</vcpu>\
         <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='/shared/{name}.qcow2'/>\
         <target dev='vda' bus='virtio'/></disk></devices>{state}</domain>"
    )
}

/// Writes a node file holding `domains` and returns its test driver URI.
fn host_file(dir: &Path, host: &str, domains: &[String]) -> String {
    let path = dir.join(format!("{host}.xml"));
    std::fs::write(
        &path,
        format!(
            "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>\
             <active>2</active><mhz>2000</mhz><model>test</model></cpu><memory>8388608</memory>\
             {}</node>",
            domains.concat()
        ),
    )
    .unwrap();
    format!("test://{}", path.display())
}

/// Three hosts: `web` migrated from h1 to h2 (h1 keeps its definition), `mail` shut off and
/// defined on h2 and h3, `db` running on h1 and h3 at once; h4's libvirt is not there.
fn lab(dir: &Path) -> backflow_cluster::Cluster {
    let h1 = host_file(
        dir,
        "h1",
        &[domain("web", UUID_WEB, false), domain("db", UUID_DB, true)],
    );
    let h2 = host_file(
        dir,
        "h2",
        &[
            domain("web", UUID_WEB, true),
            domain("mail", UUID_MAIL, false),
        ],
    );
    let h3 = host_file(
        dir,
        "h3",
        &[
            domain("db", UUID_DB, true),
            domain("mail", UUID_MAIL, false),
        ],
    );
    let missing = dir.join("no-libvirtd.sock");
    let text = format!(
        "name: fake\ndefaults:\n  worker: {{enabled: false}}\nhosts:\n\
         - {{name: h1, address: 10.0.0.1, uri: \"{h1}\"}}\n\
         - {{name: h2, address: 10.0.0.2, uri: \"{h2}\"}}\n\
         - {{name: h3, address: 10.0.0.3, uri: \"{h3}\"}}\n\
         - {{name: h4, address: 10.0.0.4, uri: \"qemu+unix:///system?socket={}\"}}\n",
        missing.display()
    );
    backflow_cluster::parse(&text, "fake.yaml").unwrap()
}

#[test]
fn discovery_lists_each_vm_once_on_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = lab(dir.path());
    let found = backflow_cluster::discover_within(&cluster, Duration::from_secs(10));
    let vms: Vec<(&str, &str, &str, VmState, Vec<&str>)> = found
        .vms
        .iter()
        .map(|v| {
            (
                v.name.as_str(),
                v.uuid.as_str(),
                v.host.as_str(),
                v.state,
                v.also_defined_on.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        vms,
        [
            ("mail", UUID_MAIL, "h2", VmState::ShutOff, vec!["h3"]),
            ("web", UUID_WEB, "h2", VmState::Running, vec!["h1"]),
        ]
    );
    assert_eq!(found.vms[1].disks[0].target, "vda");
    assert!(found.vms[1].definition.contains(UUID_WEB));
    assert_eq!(found.conflicts.len(), 1, "{:?}", found.conflicts);
    assert_eq!(found.conflicts[0].uuid, UUID_DB);
    assert_eq!(found.conflicts[0].running_on, ["h1", "h3"]);
    assert_eq!(found.unreachable.len(), 1);
    assert_eq!(found.unreachable[0].host, "h4");
    let e = found.unreachable[0].error.to_string();
    assert!(
        e.starts_with("libvirtd does not answer at qemu+unix:///system?socket=")
            && !e.contains('\n'),
        "{e}"
    );
    assert!(matches!(found.unreachable[0].error, HostError::Libvirt(_)));
    assert!(found.unreachable[0].error.is_retryable());
}

#[test]
fn the_check_reports_each_hosts_libvirt_with_versions() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = lab(dir.path());
    let checks = backflow_cluster::check(&cluster, "0.1.0", Duration::from_secs(10));
    assert_eq!(checks.len(), 4);
    for (check, vms) in checks[..3].iter().zip([2, 2, 2]) {
        let facts = check.libvirt.as_ref().unwrap();
        assert_eq!(facts.hypervisor, "TEST");
        assert_eq!(facts.vms, vms);
        assert!(
            facts.libvirt_version.split('.').count() == 3
                && !facts.libvirt_version.starts_with("0."),
            "{facts:?}"
        );
        assert!(matches!(check.worker, WorkerCheck::Disabled));
        assert!(check.ok(), "{check:?}");
    }
    assert_eq!(checks[3].host, "h4");
    assert!(!checks[3].ok());
    assert!(checks[3].libvirt.is_err());
}
