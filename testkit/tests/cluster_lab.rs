//! The cluster lab (`scripts/cluster.sh`, [`backflow_testkit::cluster`]) is what issue 14's
//! tests stand on, so it is checked here from the outside, with independent tools: that each host
//! is its own (its libvirtd, reached from the root namespace through its address, lists exactly
//! its VMs; ssh lands in its namespaces), that NBD between hosts is TLS with the lab's
//! certificates (qemu-nbd and libvirt's own backup server, read from another host), that the
//! store answers with the lab's credentials, that the fault helpers do what they say, and that
//! `down` leaves nothing behind while the machine's own libvirtd keeps answering. The two tests
//! run at once, so two labs coexist.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use backflow_testkit::cluster::{Lab, Vm};
use backflow_testkit::libvirt::{try_virsh_on, virsh_on};
use backflow_testkit::qemu::run_command;

/// The port the tests' NBD servers listen on, on a host's address.
const NBD_PORT: u16 = 10809;

/// restic's repository password (no secret: the repository is thrown away).
const RESTIC_PASSWORD: &str = "backflow-tests";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(out)
}

fn lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `nsfs` inode of a namespace file, as `/proc/PID/ns/KIND` names it (`net:[N]`).
fn ns_link(kind: &str, file: &Path) -> String {
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(file).unwrap());
    format!("{kind}:[{inode}]")
}

fn machine_libvirtd_answers() -> bool {
    try_virsh_on("qemu:///system", &["version"]).is_ok()
}

#[test]
fn hosts_are_apart_tls_crosses_them_and_down_leaves_nothing() {
    assert!(
        machine_libvirtd_answers(),
        "the machine's libvirtd does not answer (bash scripts/setup.sh starts it)"
    );
    let lab = Lab::start();
    let all_vms: BTreeSet<String> = lab.vms().iter().map(|v| v.name.clone()).collect();
    assert_eq!(all_vms.len(), 4);

    for host in lab.hosts() {
        let expected: BTreeSet<String> = lab
            .vms()
            .iter()
            .filter(|v| v.host == host.name)
            .map(|v| v.name.clone())
            .collect();
        // From the root namespace, through the address and ssh, as the controller does.
        let listed = virsh_on(&host.uri, &["list", "--name"]);
        assert_eq!(lines(&listed), expected, "virsh -c {} list", host.uri);
        assert_eq!(
            virsh_on(&host.uri, &["hostname"]).trim(),
            host.name,
            "{} reaches another libvirtd",
            host.uri
        );

        // ssh lands in the host's network and mount namespaces, where qemu:///system is the
        // host's own libvirtd.
        let out = lab.ssh(
            &host.name,
            "hostname; readlink /proc/self/ns/net /proc/self/ns/mnt; \
             virsh -q -c qemu:///system list --name",
        );
        let text = assert_ok(&out, &format!("ssh to {}", host.name));
        let mut got = text.lines();
        assert_eq!(got.next(), Some(host.name.as_str()));
        assert_eq!(
            got.next().map(str::to_owned),
            Some(ns_link("net", &Path::new("/run/netns").join(&host.netns)))
        );
        let mnt = lab.dir().join(format!("ns/{}.mnt", host.name));
        assert_eq!(got.next().map(str::to_owned), Some(ns_link("mnt", &mnt)));
        assert_eq!(lines(&got.collect::<Vec<_>>().join("\n")), expected);

        // No default route: nothing the host sends leaves the lab's /24.
        let out = lab.run_on(&host.name, "ip -4 route show table all type unicast");
        let routes: Vec<String> = assert_ok(&out, "ip route")
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        let [a, b, c, _] = host.address.octets();
        assert_eq!(routes, vec![format!("{a}.{b}.{c}.0/24")], "{}", host.name);

        // The host listens on TCP only with its sshd, on its own address: its libvirtd is
        // reached through ssh or from inside, never over the network.
        let out = lab.run_on(&host.name, "ss -Hltn");
        let listening: BTreeSet<String> = assert_ok(&out, "ss")
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect();
        assert_eq!(
            listening,
            BTreeSet::from([format!("{}:22", host.address)]),
            "{}",
            host.name
        );
    }
    // The machine's own libvirtd sees none of them.
    let own = virsh_on("qemu:///system", &["list", "--all", "--name"]);
    assert!(
        lines(&own).is_disjoint(&all_vms),
        "the machine's libvirtd lists lab VMs: {own}"
    );

    qemu_nbd_with_tls_crosses_hosts(&lab);
    backup_export_with_tls_crosses_hosts(&lab);
    store_answers_with_the_lab_credentials(&lab);

    let footprint = lab.footprint();
    assert!(
        footprint.pids.len() >= 3 * 3 + 1 + 4,
        "the daemons and QEMUs recorded: {:?}",
        footprint.pids
    );
    assert!(
        footprint.remaining().len() > 4,
        "{:?}",
        footprint.remaining()
    );
    let addresses: Vec<String> = lab.hosts().iter().map(|h| h.address.to_string()).collect();
    lab.down();
    assert_eq!(footprint.remaining(), Vec::<String>::new());
    // libvirt's ssh transport added the hosts' keys to root's known_hosts; down took them out.
    for address in addresses {
        let found = Command::new("ssh-keygen")
            .args(["-F", &address])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(!found.success(), "{address} is still in root's known_hosts");
    }
    assert!(machine_libvirtd_answers(), "the machine's libvirtd stopped");
    let own_after = virsh_on("qemu:///system", &["list", "--all", "--name"]);
    assert!(lines(&own_after).is_disjoint(&all_vms));
}

/// qemu-nbd on h1 serves an image with TLS (the host's server certificate, clients must show
/// one of the lab's); from h2, nbdinfo and qemu-img with the client certificate read it, and
/// clients without TLS or without a certificate are turned away.
fn qemu_nbd_with_tls_crosses_hosts(lab: &Lab) {
    let image = lab.dir().join("shared/tls-check.qcow2");
    backflow_testkit::qemu::make_qcow2(&image, "8M", &["write -P 0x5a 1M 1M"]);
    let h1 = lab.host("h1");
    let pid_file = lab.dir().join("shared/tls-check.pid");
    let server_dir = lab.pki_dir().join("h1");
    run_command(
        lab.command_on("h1", "qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                server_dir.display()
            ))
            .args([
                "--tls-creds",
                "tls0",
                "--read-only",
                "--persistent",
                "--fork",
            ])
            .args(["-f", "qcow2", "-x", "img", "-b", &h1.address.to_string()])
            .args(["-p", &NBD_PORT.to_string()])
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&image),
    );
    let uri = format!(
        "nbds://{}:{NBD_PORT}/img?tls-certificates={}",
        h1.address,
        lab.pki_dir().display()
    );
    let out = lab
        .command_on("h2", "nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    assert_eq!(
        assert_ok(&out, "nbdinfo with TLS from h2").trim(),
        "8388608"
    );
    let out = lab
        .command_on("h2", "qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            lab.pki_dir().display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={},server.port={NBD_PORT},export=img,\
             tls-creds=tls0",
            h1.address
        ))
        .arg(format!(
            "driver=qcow2,file.filename={},force-share=on,read-only=on",
            image.display()
        ))
        .output()
        .unwrap();
    assert_ok(&out, "qemu-img compare over NBD with TLS from h2");

    // Refused: plain NBD, and TLS without a client certificate.
    let plain = format!("nbd://{}:{NBD_PORT}/img", h1.address);
    let out = lab
        .command_on("h2", "nbdinfo")
        .args(["--size", &plain])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plain NBD was served: {}",
        stdout(&out)
    );
    let ca_only = lab.dir().join("shared/ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(
        lab.pki_dir().join("ca-cert.pem"),
        ca_only.join("ca-cert.pem"),
    )
    .unwrap();
    let anonymous = format!(
        "nbds://{}:{NBD_PORT}/img?tls-certificates={}",
        h1.address,
        ca_only.display()
    );
    let out = lab
        .command_on("h2", "nbdinfo")
        .args(["--size", &anonymous])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "served without a client certificate: {}",
        stdout(&out)
    );
    // The server stays for `down` to stop: it runs in h1's namespace.
}

/// A pull-mode backup of h2's VM with TLS: libvirt's NBD server takes the host's certificate
/// from its qemu.conf; from h3, the export reads as the VM's disk.
fn backup_export_with_tls_crosses_hosts(lab: &Lab) {
    let vm = lab.vms().iter().find(|v| v.host == "h2").unwrap();
    let h2 = lab.host("h2");
    let xml = lab.dir().join("shared/backup.xml");
    std::fs::write(
        &xml,
        format!(
            "<domainbackup mode='pull'>\n  \
             <server tls='yes' name='{}' port='{NBD_PORT}'/>\n  \
             <disks><disk name='vda' backup='yes' type='file'>\
             <scratch file='/var/lib/libvirt/qemu/{}-vda.scratch'/></disk></disks>\n\
             </domainbackup>\n",
            h2.address, vm.name
        ),
    )
    .unwrap();
    lab.virsh("h2", &["backup-begin", &vm.name, xml.to_str().unwrap()]);
    let out = lab
        .command_on("h3", "qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            lab.pki_dir().display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={},server.port={NBD_PORT},export=vda,\
             tls-creds=tls0",
            h2.address
        ))
        .arg(format!(
            "driver=qcow2,file.filename={},force-share=on,read-only=on",
            vm.disk.display()
        ))
        .output()
        .unwrap();
    assert_ok(
        &out,
        "qemu-img compare of the backup export with TLS from h3",
    );
    // The host's qemu.conf asks for clients' certificates (backup_tls_x509_verify).
    let anonymous = format!(
        "nbds://{}:{NBD_PORT}/vda?tls-certificates={}",
        h2.address,
        lab.dir().join("shared/ca-only").display()
    );
    let out = lab
        .command_on("h3", "nbdinfo")
        .args(["--size", &anonymous])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the backup export was served without a client certificate: {}",
        stdout(&out)
    );
    lab.virsh("h2", &["domjobabort", &vm.name]);
}

/// Garage at `.20` takes the lab's credentials (restic, an independent S3 client, makes a
/// repository in the lab's bucket), and refuses a wrong secret.
fn store_answers_with_the_lab_credentials(lab: &Lab) {
    assert!(
        lab.env().iter().any(|(k, v)| k == "AWS_ENDPOINT_URL"
            && *v == format!("http://{}:3900", lab.store_address()))
    );
    let restic = |secret: Option<&str>, args: &[&str]| {
        let mut command = Command::new("restic");
        lab.apply(&mut command);
        if let Some(secret) = secret {
            command.env("AWS_SECRET_ACCESS_KEY", secret);
        }
        command
            .arg("-r")
            .arg(format!(
                "s3:http://{}:3900/backflow/restic-check",
                lab.store_address()
            ))
            .args(["--no-cache"])
            .args(args)
            .env("RESTIC_PASSWORD", RESTIC_PASSWORD)
            .output()
            .unwrap_or_else(|e| panic!("restic is required for these tests: {e}"))
    };
    assert_ok(&restic(None, &["init"]), "restic init on the lab's store");
    assert_ok(&restic(None, &["snapshots"]), "restic snapshots");
    let wrong = restic(Some("0000"), &["snapshots"]);
    assert!(!wrong.status.success(), "a wrong secret was let in");
}

#[test]
fn fault_helpers_cut_stop_and_write() {
    let mut lab = Lab::start();
    // One more VM, on h2, from an image with data of its own.
    let image = lab.dir().join("shared/extra.raw");
    std::fs::write(&image, [0x77u8; 1 << 20]).unwrap();
    let extra = lab.add_vm("h2", image.to_str().unwrap());
    assert_eq!(extra.name, format!("bf-{}-vm5", lab.id()));
    assert_eq!(lab.vms().len(), 5);
    assert_eq!(
        lab.vm_host(&extra.name).map(|h| h.name.as_str()),
        Some("h2")
    );
    let copy = lab.dir().join("shared/extra-copy.raw");
    run_command(
        Command::new("qemu-img")
            .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&extra.disk)
            .arg(&copy),
    );
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());

    let vm: &Vm = &lab.vms()[0];
    assert_eq!(vm.host, "h1");

    // A guest write lands in the disk and in the checkpoint's dirty bitmap.
    lab.virsh("h1", &["checkpoint-create-as", &vm.name, "--name", "cp1"]);
    lab.write_in_vm(&vm.name, 4 << 20, 64 << 10, 0xab);
    let nodes = lab.virsh(
        "h1",
        &[
            "qemu-monitor-command",
            &vm.name,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ],
    );
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let counts: Vec<u64> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["dirty-bitmaps"].as_array())
        .flatten()
        .filter(|b| b["name"] == "cp1")
        .map(|b| b["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![64 << 10], "{nodes}");
    let raw = lab.dir().join("shared/vm1.raw");
    run_command(
        Command::new("qemu-img")
            .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&vm.disk)
            .arg(&raw),
    );
    let data = std::fs::read(&raw).unwrap();
    let mut expected = vec![0u8; 64 << 20];
    for (offset, len, byte) in Vm::known_data(1) {
        expected[offset as usize..(offset + len) as usize].fill(byte);
    }
    expected[4 << 20..(4 << 20) + (64 << 10)].fill(0xab);
    assert!(
        data == expected,
        "vm1's disk is not the known data plus the write"
    );

    // A cut cable: nothing reaches h2 until it is restored.
    assert_ok(&lab.ssh("h2", "true"), "ssh to h2");
    lab.cut_network("h2");
    let out = lab.ssh("h2", "true");
    assert_eq!(out.status.code(), Some(255), "ssh to a cut host");
    // The other hosts still reach each other and the store.
    assert_ok(
        &lab.run_on(
            "h1",
            &format!("bash -c 'exec 3<>/dev/tcp/{}/22'", lab.host("h3").address),
        ),
        "h1 to h3",
    );
    lab.restore_network("h2");
    assert_ok(&lab.ssh("h2", "true"), "ssh to h2 after restore");

    // A stopped host: its libvirt and ssh refuse, its VM runs on; started again, it is back.
    let h3_vm = &lab.vms().iter().find(|v| v.host == "h3").unwrap().name;
    let uri = lab.host("h3").uri.clone();
    lab.stop_host("h3");
    assert!(try_virsh_on(&uri, &["list"]).is_err());
    assert_eq!(lab.ssh("h3", "true").status.code(), Some(255));
    let qemu_pid =
        std::fs::read_to_string(lab.dir().join(format!("hosts/h3/run/qemu/{h3_vm}.pid"))).unwrap();
    assert!(backflow_testkit::qemu::live(
        qemu_pid.trim().parse().unwrap()
    ));
    lab.start_host("h3");
    assert_eq!(
        lines(&virsh_on(&uri, &["list", "--name"])),
        BTreeSet::from([h3_vm.clone()])
    );
    assert_eq!(lab.vm_host(h3_vm).map(|h| h.name.as_str()), Some("h3"));

    // A live migration moves vm2 (and its definition) from h1 to h3; the guest writes on.
    let vm2 = &lab.vms()[1];
    assert_eq!(vm2.host, "h1");
    lab.migrate(&vm2.name, "h3");
    assert_eq!(lab.vm_host(&vm2.name).map(|h| h.name.as_str()), Some("h3"));
    assert_eq!(
        lines(&lab.virsh("h1", &["list", "--all", "--name"])),
        BTreeSet::from([vm.name.clone()])
    );
    assert_eq!(
        lines(&lab.virsh("h3", &["list", "--name"])),
        BTreeSet::from([h3_vm.clone(), vm2.name.clone()])
    );
    lab.write_in_vm(&vm2.name, 2 << 20, 64 << 10, 0xcd);
    assert_eq!(lab.pids_on("h3", &format!("guest={},", vm2.name)).len(), 1);
    assert_eq!(
        lab.pids_on("h1", &format!("guest={},", vm2.name)),
        Vec::<u32>::new()
    );
}

/// `up` makes a lab only in a new or empty directory, and `down` removes only a lab's: a
/// directory with something else in it is left as it was, by both, and by `Lab::up`.
#[test]
fn the_script_leaves_directories_that_are_not_its_own() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
    let dir = tempfile::Builder::new()
        .prefix("bf-not-a-lab-")
        .tempdir()
        .unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, "keep").unwrap();
    for command in ["up", "down"] {
        let out = Command::new("bash")
            .arg(&script)
            .arg(command)
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}: {}", stdout(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(&dir.path().display().to_string()), "{said}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }
    let up = std::panic::catch_unwind(|| Lab::up(dir.path()));
    assert!(up.is_err(), "Lab::up took a directory in use");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // down of a directory that is gone is done already.
    let gone = dir.path().join("gone");
    let out = Command::new("bash")
        .arg(&script)
        .arg("down")
        .arg(&gone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
