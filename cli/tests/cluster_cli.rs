//! `backflow cluster check` and `backflow vms --cluster` against real libvirt daemons: this
//! machine's own (`qemu:///system`), a host that takes connections and never answers, and the
//! three-host lab of `testkit::cluster` (hosts reached through their addresses only).

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backflow_testkit::cluster::Lab;
use backflow_testkit::libvirt::{Domain, virsh};
use common::backflow;

/// Longest any command here may take: far beyond every timeout the tests give, so that only a
/// command that hangs reaches it.
const HANG: Duration = Duration::from_secs(60);

/// Runs `cmd` to its end; a command still running after [`HANG`] is killed and fails the test
/// (a check that hangs on a host is the bug these tests are about).
fn output(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running backflow");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(HANG) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // Our own child, by its pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} still ran after {HANG:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_cluster(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("cluster.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

/// A TCP port on loopback where nothing listens (bound, then let go).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The lines of the block `cluster check` prints for `host` (its header and the two below).
fn block<'a>(report: &'a str, host: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = report.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&format!("{host} (")))
        .unwrap_or_else(|| panic!("no block for {host}:\n{report}"));
    lines[at..at + 3].to_vec()
}

/// What `virsh version` says of this machine's daemon: (libvirt, hypervisor name and version).
fn system_versions() -> (String, String) {
    let out = virsh(&["version", "--daemon"]);
    let after = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in virsh version:\n{out}"))
            .trim()
            .to_owned()
    };
    (
        after("Running against daemon:"),
        after("Running hypervisor:"),
    )
}

#[test]
fn check_gives_this_machines_libvirt_versions_and_says_why_the_worker_access_failed() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let file = write_cluster(
        dir.path(),
        &format!(
            "name: here\ndefaults:\n  ssh: {{port: {port}}}\nhosts:\n  \
             - {{name: local, address: 127.0.0.1, uri: \"qemu:///system\"}}\n"
        ),
    );
    let (libvirt, hypervisor) = system_versions();
    let out = output(
        backflow()
            .args(["cluster", "check", "--cluster"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = text(&out.stdout);
    let lines = block(&report, "local");
    assert_eq!(lines[0], "local (127.0.0.1): FAILED", "{report}");
    assert!(
        lines[1].starts_with(&format!("  libvirt  libvirt {libvirt}, {hypervisor}, ")),
        "{report}"
    );
    assert_eq!(
        lines[2],
        format!(
            "  worker   FAILED: ssh root@127.0.0.1 port {port} failed: ssh: connect to host \
             127.0.0.1 port {port}: Connection refused"
        ),
        "{report}"
    );
    assert_eq!(
        text(&out.stderr),
        "backflow: 1 of 1 hosts of cluster here failed: local\n"
    );

    let out = output(
        backflow()
            .args(["cluster", "check", "--json", "--cluster"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["cluster"], "here");
    let host = &report["hosts"][0];
    assert_eq!(host["host"], "local");
    assert_eq!(host["libvirt"]["ok"], true);
    assert_eq!(host["libvirt"]["libvirt_version"], libvirt.as_str());
    assert_eq!(
        format!(
            "{} {}",
            host["libvirt"]["hypervisor"].as_str().unwrap(),
            host["libvirt"]["hypervisor_version"].as_str().unwrap()
        ),
        hypervisor
    );
    assert!(host["libvirt"]["vms"].is_u64(), "{host}");
    assert_eq!(host["worker"]["ok"], false);
    assert!(
        host["worker"]["error"]
            .as_str()
            .unwrap()
            .ends_with("Connection refused"),
        "{host}"
    );
}

/// A listener on loopback that takes connections and never says a word: what a hung host looks
/// like to a client (no refusal, no banner). Its connections close when it is dropped.
struct Mute {
    port: u16,
    _stop: mpsc::Sender<()>,
}

impl Mute {
    fn start() -> Mute {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Accepts until the test drops the sender, holding every connection open.
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(20))
            {
                while let Ok((conn, _)) = listener.accept() {
                    held.push(conn);
                }
            }
        });
        Mute { port, _stop: stop }
    }
}

#[test]
fn a_host_that_never_answers_is_reported_within_the_timeout_and_the_others_still_count() {
    let mute = Mute::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    std::fs::write(&key, "not a key: never read, no host gets that far\n").unwrap();
    let file = write_cluster(
        dir.path(),
        &format!(
            "name: partly\ndefaults:\n  ssh: {{key: {}}}\nhosts:\n  \
             - {{name: local, address: 127.0.0.1, uri: \"qemu:///system\", worker: {{enabled: false}}}}\n  \
             - name: mute\n    address: 127.0.0.1\n    ssh: {{port: {}}}\n",
            key.display(),
            mute.port
        ),
    );
    let started = Instant::now();
    let out = output(
        backflow()
            .args(["cluster", "check", "--timeout", "4", "--cluster"])
            .arg(&file),
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = text(&out.stdout);
    let local = block(&report, "local");
    assert_eq!(local[0], "local (127.0.0.1): ok", "{report}");
    assert_eq!(local[2], "  worker   disabled (not checked)", "{report}");
    let mute_lines = block(&report, "mute");
    assert_eq!(mute_lines[0], "mute (127.0.0.1): FAILED", "{report}");
    let uri = format!(
        "qemu+ssh://root@127.0.0.1:{}/system?keyfile={}&no_verify=1&no_tty=1",
        mute.port,
        key.display()
    );
    assert_eq!(
        mute_lines[1],
        format!("  libvirt  FAILED: libvirt at {uri} did not answer within 4 s"),
        "{report}"
    );
    // ssh's own ConnectTimeout (the same 4 s) gives up on the missing banner first.
    assert!(
        mute_lines[2].starts_with(&format!(
            "  worker   FAILED: ssh root@127.0.0.1 port {} failed: ",
            mute.port
        )) && mute_lines[2].ends_with("timed out"),
        "{report}"
    );
    assert_eq!(
        text(&out.stderr),
        "backflow: 1 of 2 hosts of cluster partly failed: mute\n"
    );
    // Both checks of both hosts at once: about one timeout (4 s, and 1 s of grace), not one
    // per check.
    assert!(took < Duration::from_secs(20), "{took:?}");

    let out = output(
        backflow()
            .args(["vms", "--timeout", "4", "--json", "--cluster"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        found["unreachable"],
        serde_json::json!([{
            "host": "mute",
            "error": format!("libvirt at {uri} did not answer within 4 s"),
        }])
    );
    assert!(
        found["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|vm| vm["host"] == "local"),
        "{found}"
    );
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "backflow: host mute: libvirt at {uri} did not answer within 4 s\n\
             backflow: cluster partly: 1 host did not answer (mute): VMs shown shut off may run \
             there\n"
        )
    );
}

/// The VM with `name` in a `vms --json` list.
fn find<'a>(vms: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    vms.as_array().unwrap().iter().find(|v| v["name"] == name)
}

#[test]
fn vms_cluster_places_this_machines_vms_on_the_host_the_file_names() {
    let running = Domain::start("bf-clu-run", &[("vda", "16M")]);
    let stopped = Domain::start("bf-clu-off", &[("vda", "16M")]);
    stopped.destroy();
    let uuid = |d: &Domain| d.virsh(&["domuuid", d.name()]).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();

    // One host: every VM of the daemon, on it.
    let one = write_cluster(
        dir.path(),
        "name: one\nhosts:\n  - {name: here, address: 127.0.0.1, uri: \"qemu:///system\"}\n",
    );
    let out = output(backflow().args(["vms", "--json", "--cluster"]).arg(&one));
    assert!(out.status.success(), "{out:?}");
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vm = find(&found["vms"], running.name()).expect("the running VM");
    assert_eq!(vm["host"], "here");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["uuid"], uuid(&running).as_str());
    assert_eq!(vm["also_defined_on"], serde_json::json!([]));
    assert_eq!(
        vm["disks"][0]["source"]["path"],
        running.disk("vda").to_str().unwrap()
    );
    assert!(vm.get("definition").is_none());
    let vm = find(&found["vms"], stopped.name()).expect("the shut-off VM");
    assert_eq!(
        (&vm["host"], &vm["state"]),
        (&"here".into(), &"shut-off".into())
    );

    // Two hosts that are the same daemon: every VM is defined on both. The shut-off one is
    // listed once, on the first; the running one runs "on both", so it is never listed.
    let two = write_cluster(
        dir.path(),
        "name: two\nhosts:\n  - {name: a, address: 127.0.0.1, uri: \"qemu:///system\"}\n  \
         - {name: b, address: 127.0.0.2, uri: \"qemu:///system\"}\n",
    );
    let out = output(backflow().args(["vms", "--json", "--cluster"]).arg(&two));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<_> = found["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == stopped.name())
        .collect();
    assert_eq!(listed.len(), 1, "{found}");
    assert_eq!(listed[0]["host"], "a");
    assert_eq!(listed[0]["also_defined_on"], serde_json::json!(["b"]));
    assert!(find(&found["vms"], running.name()).is_none(), "{found}");
    let conflict = found["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["uuid"] == uuid(&running).as_str())
        .unwrap_or_else(|| panic!("no conflict for {}: {found}", running.name()));
    assert_eq!(conflict["running_on"], serde_json::json!(["a", "b"]));
    assert_eq!(conflict["names"], serde_json::json!([running.name()]));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "backflow: VM {} (UUID {}) runs on 2 hosts at once (a, b): left out until it runs \
             on one\n",
            running.name(),
            uuid(&running)
        )),
        "{stderr}"
    );

    // The table: the shut-off VM's row names both hosts.
    let out = output(backflow().args(["vms", "--cluster"]).arg(&two));
    let table = text(&out.stdout);
    assert!(table.starts_with("name "), "{table}");
    assert!(table.lines().next().unwrap().contains(" also defined on "));
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&format!("{} ", stopped.name())))
        .unwrap_or_else(|| panic!("no row for {}:\n{table}", stopped.name()))
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(row[..4], [stopped.name(), "shut off", "a", "b"], "{table}");
}

#[test]
fn a_bad_cluster_file_exits_2_naming_the_file_line_column_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_cluster(
        dir.path(),
        "name: lab\nhosts:\n  - name: h1\n    address: 10.0.0.1\n    worker: {max_vms: 0}\n",
    );
    for args in [&["cluster", "check"][..], &["vms"][..]] {
        let out = output(backflow().args(args).arg("--cluster").arg(&file));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty());
        let stderr = text(&out.stderr);
        assert_eq!(
            stderr.lines().next().unwrap(),
            format!(
                "backflow: {}:5:23: max_vms: expected a number of VMs, at least 1, not 0",
                file.display()
            ),
            "{args:?}"
        );
    }
    let missing = dir.path().join("missing.yaml");
    let out = output(
        backflow()
            .args(["cluster", "check", "--cluster"])
            .arg(&missing),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).starts_with(&format!(
            "backflow: {}: cannot read the cluster file: ",
            missing.display()
        )),
        "{out:?}"
    );
    // --timeout belongs to --cluster; --uri and --cluster exclude each other.
    for args in [
        &["vms", "--timeout", "3"][..],
        &["vms", "--uri", "qemu:///system", "--cluster", "c.yaml"][..],
        &["cluster", "check", "--cluster", "c.yaml", "--timeout", "0"][..],
    ] {
        let out = output(backflow().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

/// The lab: three hosts reached through their addresses, four VMs (two on h1, one each on h2
/// and h3). One lab for every step, in order: a lab takes seconds to make.
#[test]
fn the_lab_checks_green_lists_its_vms_each_on_its_host_once_and_reports_a_cut_host() {
    let lab = Lab::start();
    let file = lab.cluster_file();

    // Every host green, with versions: libvirt's and the worker's, the controller's own.
    let out = output(
        backflow()
            .args(["cluster", "check", "--json", "--cluster"])
            .arg(&file),
    );
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let own = env!("CARGO_PKG_VERSION");
    for (host, vms) in report["hosts"].as_array().unwrap().iter().zip([2, 1, 1]) {
        let name = host["host"].as_str().unwrap();
        let lab_host = lab.host(name);
        assert_eq!(host["address"], lab_host.address.to_string());
        assert_eq!(host["uri"], lab_host.uri.as_str());
        assert_eq!(host["libvirt"]["hostname"], name, "{host}");
        assert_eq!(host["libvirt"]["hypervisor"], "QEMU", "{host}");
        assert_eq!(host["libvirt"]["vms"], vms, "{host}");
        let (libvirt, hypervisor) = system_versions();
        assert_eq!(host["libvirt"]["libvirt_version"], libvirt.as_str());
        assert_eq!(
            format!(
                "QEMU {}",
                host["libvirt"]["hypervisor_version"].as_str().unwrap()
            ),
            hypervisor
        );
        assert_eq!(host["worker"]["version"], own, "{host}");
        assert_eq!(host["worker"]["warning"], serde_json::Value::Null);
    }

    // The four VMs, each on the host the lab started it on.
    let vms_json = |extra: &[&str]| {
        let out = output(
            backflow()
                .args(["vms", "--json"])
                .args(extra)
                .arg("--cluster")
                .arg(&file),
        );
        let found: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out, found)
    };
    let placed = |found: &serde_json::Value| -> Vec<(String, String, String)> {
        found["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["host"].as_str().unwrap().to_owned(),
                    v["also_defined_on"].to_string(),
                )
            })
            .collect()
    };
    let (out, found) = vms_json(&[]);
    assert!(out.status.success(), "{out:?}");
    let expected: Vec<(String, String, String)> = lab
        .vms()
        .iter()
        .map(|vm| (vm.name.clone(), vm.host.clone(), "[]".into()))
        .collect();
    assert_eq!(placed(&found), expected);
    for vm in found["vms"].as_array().unwrap() {
        assert_eq!(vm["state"], "running");
        assert_eq!(
            vm["disks"][0]["source"]["path"],
            lab.vm(vm["name"].as_str().unwrap()).disk.to_str().unwrap()
        );
    }

    // vm1 (running on h1) defined on h3 too, as a live migration that kept its source would
    // leave it: listed once, on h1, with h3 named.
    let vm1 = &lab.vms()[0];
    let xml = lab.dir().join("vm1-copy.xml");
    std::fs::write(&xml, lab.virsh("h1", &["dumpxml", "--inactive", &vm1.name])).unwrap();
    lab.virsh("h3", &["define", xml.to_str().unwrap()]);
    let (out, found) = vms_json(&[]);
    assert!(out.status.success(), "{out:?}");
    let mut expected = expected;
    expected[0].2 = "[\"h3\"]".into();
    assert_eq!(placed(&found), expected);
    lab.virsh("h3", &["undefine", &vm1.name]);

    // A host whose backflow is missing fails; one whose backflow is another version passes,
    // with a warning. (Every host sees the machine's files, so a script in the lab's directory
    // is on all of them.)
    let old = lab.dir().join("old-backflow");
    std::fs::write(&old, "#!/bin/sh\necho 'backflow 0.0.9'\n").unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (h1, h3) = (lab.host("h1"), lab.host("h3"));
    let variant_dir = lab.dir().join("variant");
    std::fs::create_dir(&variant_dir).unwrap();
    let variant = write_cluster(
        &variant_dir,
        &format!(
            "name: variant\ndefaults:\n  ssh: {{key: {}}}\nhosts:\n  \
             - {{name: h1, address: {}, uri: \"{}\", backflow: /nonexistent/backflow}}\n  \
             - {{name: h3, address: {}, uri: \"{}\", backflow: {}}}\n",
            lab.ssh_key().display(),
            h1.address,
            h1.uri,
            h3.address,
            h3.uri,
            old.display()
        ),
    );
    let out = output(
        backflow()
            .args(["cluster", "check", "--cluster"])
            .arg(&variant),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = text(&out.stdout);
    let lines = block(&report, "h1");
    assert_eq!(lines[0], format!("h1 ({}): FAILED", h1.address), "{report}");
    assert!(
        lines[2].starts_with(
            "  worker   FAILED: `/nonexistent/backflow --version` on the host was not found ("
        ),
        "{report}"
    );
    let lines = block(&report, "h3");
    assert_eq!(lines[0], format!("h3 ({}): ok", h3.address), "{report}");
    assert_eq!(
        lines[2],
        format!(
            "  worker   backflow 0.0.9; warning: its backflow is version 0.0.9, the \
             controller's {own}: install the same version on every host"
        ),
        "{report}"
    );

    // h2's cable pulled: its connections hang rather than fail. It is reported within the
    // timeout, the other hosts still answer. (The timeout leaves room for six ssh handshakes at
    // once on a loaded machine of two cores: they took 3.4 s at a load of 8.)
    lab.cut_network("h2");
    let started = Instant::now();
    let out = output(
        backflow()
            .args(["cluster", "check", "--timeout", "10", "--cluster"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(40));
    let report = text(&out.stdout);
    let h2 = lab.host("h2").address;
    let lines = block(&report, "h2");
    assert_eq!(lines[0], format!("h2 ({h2}): FAILED"), "{report}");
    // The kernel says "no route" once ARP gave up on the host, else the connection times out.
    assert!(
        lines[1].starts_with(&format!("  libvirt  FAILED: cannot reach {h2} port 22: ")),
        "{report}"
    );
    assert!(
        lines[2].starts_with(&format!("  worker   FAILED: ssh root@{h2} failed: ")),
        "{report}"
    );
    for ok in ["h1", "h3"] {
        assert!(block(&report, ok)[0].ends_with("): ok"), "{report}");
    }
    assert_eq!(
        text(&out.stderr),
        format!(
            "backflow: 1 of 3 hosts of cluster {} failed: h2\n",
            backflow_cluster::load(&file).unwrap().name
        )
    );
    let (out, found) = vms_json(&["--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let hosts: Vec<String> = placed(&found).into_iter().map(|(_, h, _)| h).collect();
    assert_eq!(hosts, ["h1", "h1", "h3"]);
    assert_eq!(found["unreachable"][0]["host"], "h2");
    assert!(
        found["unreachable"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("cannot reach {h2} port 22: ")),
        "{found}"
    );
    lab.restore_network("h2");
    lab.down();
}
