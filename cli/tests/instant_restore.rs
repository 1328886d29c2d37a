//! `backflow instant-restore` against a real libvirtd (`qemu:///system`) and the real `backflow
//! serve`: a restore point of a throwaway domain (two disks, no OS) runs as a new domain on qcow2
//! overlays of the export, reads what the backup holds, takes guest writes, then moves into
//! standalone images that compare identical to what the guest sees; the export stops and the
//! state goes. Discard removes a running recovery; failures leave nothing.
//!
//! (The bootable test guest's recovery, from a local and an S3 repository, is in
//! `instant_boot.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_testkit::libvirt::{Domain, URI, domain_names, make_traversable, virsh};
use backflow_testkit::qemu::{assert_images_equal, run_command};
use common::vm::{Defined, Recovery, backup_vm};
use common::{backflow, init_repo, output_text as text};

fn traversable_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    make_traversable(&dir);
    dir
}

fn instant(state: &Path, args: &[&str]) -> Output {
    backflow()
        .arg("instant-restore")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

/// The export's pid a recovery's state records.
fn serve_pid(state: &Path, name: &str) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(name).join("state.json")).unwrap())
            .unwrap();
    state["server"]["pid"].as_u64().unwrap() as u32
}

fn alive(pid: u32) -> bool {
    backflow_testkit::qemu::live(pid)
}

/// A guest write through the new domain's n-th virtio disk (QEMU's monitor), flushed.
fn guest_write(domain: &str, index: u32, command: &str) {
    for c in [command, "flush"] {
        let hmp =
            format!("qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"{c}\"");
        let reply = virsh(&["qemu-monitor-command", domain, "--hmp", &hmp]);
        assert!(reply.trim().is_empty(), "{hmp}: {reply}");
    }
}

#[test]
fn a_restore_point_runs_at_once_then_moves_to_standalone_images() {
    let original = Domain::start("bf-instant", &[("vda", "64M"), ("vdb", "32M")]);
    original.guest_write("vda", "write -P 0x11 0 1M");
    original.guest_write("vda", "write -P 0x22 40M 512k");
    original.guest_write("vdb", "write -P 0x33 1M 2M");
    let work = tempfile::tempdir().unwrap();
    make_traversable(work.path());
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    let id = backup_vm(&repo, original.name(), &work.path().join("backup.json"));
    // What the backup holds, as raw files: the original stops so its images stay as backed up.
    virsh(&["destroy", original.name()]);
    let expected: Vec<PathBuf> = ["vda", "vdb"]
        .iter()
        .map(|disk| {
            let raw = work.path().join(format!("expected-{disk}.raw"));
            run_command(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-O", "raw"])
                    .arg(original.disk(disk))
                    .arg(&raw),
            );
            raw
        })
        .collect();

    let state = traversable_dir(work.path(), "instant");
    let name = format!("{}-instant", original.name());
    let _defined = Defined(name.clone());
    let _recovery = Recovery(state.clone(), name.clone());
    let out = instant(
        &state,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "--snapshot",
            &id,
            "--name",
            &name,
            "--uri",
            URI,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("VM {name} runs restore point")),
        "{said}"
    );
    assert!(said.contains("RTO"), "{said}");
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    let pid = serve_pid(&state, &name);
    assert!(alive(pid), "the export runs");
    let listed = text(&instant(&state, &["list"]));
    assert!(
        listed.contains(&name)
            && listed.contains("running")
            && listed.contains(&format!("pid {pid}")),
        "{listed}"
    );

    // The new domain runs on overlays in the state directory, backed by the export, and reads
    // exactly what the backup holds (-U: the running domain holds the overlays' locks).
    let xml = virsh(&["dumpxml", &name]);
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        let overlay = state.join(&name).join(format!("{disk}.qcow2"));
        assert!(
            xml.contains(&format!("<source file='{}'", overlay.display())),
            "{xml}"
        );
        let out = run_command(
            Command::new("qemu-img")
                .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
                .arg(&overlay)
                .arg(&expected[i]),
        );
        assert!(out.status.success(), "{disk}: {out:?}");
    }
    assert!(xml.contains("protocol='nbd'"), "{xml}");

    // Guest writes go to the overlays; the repository's restore point and the original's image
    // stay as they were.
    guest_write(&name, 0, "write -P 0x44 8M 1M");
    guest_write(&name, 1, "write -P 0x55 0 64k");
    run_command(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x44 8M 1M",
        expected[0].to_str().unwrap(),
    ]));
    run_command(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x55 0 64k",
        expected[1].to_str().unwrap(),
    ]));

    // The move: standalone images in `to`, the domain on them (live and persistent), no export,
    // no state.
    let to = traversable_dir(work.path(), "moved");
    let out = instant(&state, &["finish", &name, "--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("runs on its own images after"), "{said}");
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    for flags in [
        &["dumpxml", &name][..],
        &["dumpxml", "--inactive", &name][..],
    ] {
        let xml = virsh(flags);
        assert!(!xml.contains("protocol='nbd'"), "{xml}");
        for disk in ["vda", "vdb"] {
            let moved = to.join(format!("{name}-{disk}.qcow2"));
            assert!(
                xml.contains(&format!("<source file='{}'", moved.display())),
                "{xml}"
            );
        }
    }
    assert!(!state.join(&name).exists(), "the recovery's state is gone");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the export still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The moved images hold the backup and the guest's writes.
    virsh(&["destroy", &name]);
    for (i, disk) in ["vda", "vdb"].iter().enumerate() {
        assert_images_equal(
            &to.join(format!("{name}-{disk}.qcow2")),
            "qcow2",
            &expected[i],
            "raw",
        );
    }
    // The original VM was never touched.
    let original_xml = virsh(&["dumpxml", "--inactive", original.name()]);
    assert!(
        original_xml.contains(&format!(
            "<source file='{}'",
            original.disk("vda").display()
        )),
        "{original_xml}"
    );
    // The domain can start again on its own images (no export runs any more).
    virsh(&["start", &name]);
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
}

#[test]
fn discard_ends_a_recovery_and_failures_leave_nothing() {
    let original = Domain::start("bf-instant-discard", &[("vda", "32M")]);
    original.guest_write("vda", "write -P 0x66 0 1M");
    let work = tempfile::tempdir().unwrap();
    make_traversable(work.path());
    let repo = work.path().join("repo");
    init_repo(&repo, "64K");
    let id = backup_vm(&repo, original.name(), &work.path().join("backup.json"));
    let state = traversable_dir(work.path(), "instant");
    let name = format!("{}-x", original.name());
    let _defined = Defined(name.clone());
    let _recovery = Recovery(state.clone(), name.clone());
    let start = |name: &str, snapshot: &str| {
        instant(
            &state,
            &[
                "--repo",
                repo.to_str().unwrap(),
                "--snapshot",
                snapshot,
                "--name",
                name,
                "--no-network",
            ],
        )
    };
    let out = start(&name, &id);
    assert!(out.status.success(), "{}", text(&out));
    let pid = serve_pid(&state, &name);
    // A second recovery of that name is refused (the domain exists), and changes nothing.
    let out = start(&name, &id);
    assert!(!out.status.success());
    assert!(text(&out).contains("exists already"), "{}", text(&out));
    assert!(alive(pid));

    let out = instant(&state, &["discard", &name]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!domain_names().contains(&name), "the domain is gone");
    assert!(!state.join(&name).exists(), "the state is gone");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the export still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The original still runs, untouched.
    assert_eq!(virsh(&["domstate", original.name()]).trim(), "running");

    // Failures: an unknown restore point, a bad name: errors that name it, nothing left.
    let out = start(&format!("{name}-2"), "ffffffffffff");
    assert!(!out.status.success());
    assert!(text(&out).contains("ffffffffffff"), "{}", text(&out));
    let out = start("bad/name", &id);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("expected a name of letters"),
        "{}",
        text(&out)
    );
    assert!(!domain_names().contains(&format!("{name}-2")));
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "no state left"
    );

    // A failure at the last step (QEMU cannot reach the overlays: a state directory only root
    // may enter) removes what the steps before it made: the domain, the export, the overlays.
    let closed = work.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let failed_name = format!("{name}-3");
    let _failed = Defined(failed_name.clone());
    let out = instant(
        &closed,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "--snapshot",
            &id,
            "--name",
            &failed_name,
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("virDomainCreate"), "{}", text(&out));
    assert!(!domain_names().contains(&failed_name), "the domain is gone");
    assert_eq!(
        std::fs::read_dir(&closed).unwrap().count(),
        0,
        "no state left"
    );
    assert!(
        serve_processes(&closed).is_empty(),
        "the export stopped: {:?}",
        serve_processes(&closed)
    );
}

/// Processes whose command line names `dir` and `serve`: exports of recoveries under `dir`.
fn serve_processes(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("serve") && c.contains(&needle)
            })
        })
        .collect()
}
