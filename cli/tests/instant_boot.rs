//! Instant recovery of the bootable test guest (`backflow_testkit::guest`), from a local and from
//! an S3 (Garage) repository, with the real `backflow` binary and libvirtd: the restored VM boots
//! and prints its line, a file the guest wrote before the backup is read back in the copy, the
//! copy's writes made while its disks move survive the pivot, and the moved disk holds exactly what
//! the guest sees (its SHA-256 through the guest's own disk = the image's on the host).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backflow_testkit::guest::{Console, ConsolePaths, Guest, GuestDisk, ImageFormat};
use backflow_testkit::libvirt::{make_traversable, virsh};
use backflow_testkit::qemu::run_command;
use backflow_testkit::s3::Garage;
use common::s3::{repo_path, use_store};
use common::vm::{Defined, Recovery, backup_vm};
use common::{backflow, init_repo, output_text as text};

/// The guest's disk: small, the boot partition and an ext4 data partition.
const DISK_BYTES: u64 = 96 << 20;
/// A guest under TCG on two shared cores boots in 12-50 s.
const BOOT: Duration = Duration::from_secs(240);

/// Backs up a booted guest that wrote `before.txt`, instant-restores the backup as a new VM,
/// checks it, moves it, checks again. `repo` is a path or an S3 location (this thread's store).
fn instant_round_trip(work: &Path, repo: &Path) {
    make_traversable(work);
    let layout = GuestDisk::new(DISK_BYTES)
        .format(ImageFormat::Qcow2)
        .build(&work.join("guest.qcow2"))
        .unwrap();
    let mut guest = Guest::start(&layout).unwrap();
    guest.wait_booted(BOOT).unwrap();
    let before = format!("written before the backup by {}\n", guest.name());
    guest.console().write_file("before.txt", before.as_bytes());
    guest.console().run(&["sync"]).unwrap();

    init_repo(repo, "128K");
    let id = backup_vm(repo, guest.name(), &work.join("backup.json"));

    let state = work.join("instant");
    std::fs::create_dir(&state).unwrap();
    make_traversable(&state);
    let name = format!("{}-now", guest.name());
    let _defined = Defined(name.clone());
    let _recovery = Recovery(state.clone(), name.clone());
    let out = backflow()
        .arg("instant-restore")
        .args([
            "--repo",
            repo.to_str().unwrap(),
            "--snapshot",
            &id,
            "--name",
            &name,
        ])
        .args(["--no-network", "--console-socket", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("RTO"), "{}", text(&out));

    // The copy boots from the repository and prints its line on its own console (not the
    // original's: that one still runs).
    let mut console = Console::new(ConsolePaths::in_dir(&state.join(&name)));
    console.wait_booted(BOOT).unwrap();
    assert!(guest.is_active(), "the original runs on");
    assert_eq!(console.read_file("before.txt"), before.as_bytes());
    let original_xml = virsh(&["dumpxml", guest.name()]);

    // The move, while the guest writes.
    let to = work.join("moved");
    std::fs::create_dir(&to).unwrap();
    make_traversable(&to);
    let finish = backflow()
        .arg("instant-restore")
        .args(["finish", &name, "--to", to.to_str().unwrap(), "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let during = console.write_random("during.bin", 24, Duration::from_secs(300));
    let out = finish.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("runs on its own images"),
        "{}",
        text(&out)
    );
    let moved = to.join(format!("{name}-vda.qcow2"));
    let xml = virsh(&["dumpxml", &name]);
    assert!(
        xml.contains(&format!("<source file='{}'", moved.display())),
        "{xml}"
    );
    assert!(!xml.contains("protocol='nbd'"), "{xml}");
    assert!(!state.join(&name).exists(), "the recovery's state is gone");

    // What the guest wrote during the move, and before the backup, reads back after the pivot.
    assert_eq!(console.sha256("during.bin"), during);
    assert_eq!(console.read_file("before.txt"), before.as_bytes());
    // The moved disk holds exactly what the guest sees: the guest's own read of its whole disk
    // (after a sync, caches dropped) against the image read on the host.
    let seen = console.disk_sha256(0, DISK_BYTES);
    let raw = work.join("moved.raw");
    run_command(
        Command::new("qemu-img")
            .args(["convert", "-U", "-q", "-O", "raw"])
            .arg(&moved)
            .arg(&raw),
    );
    let host = run_command(Command::new("sha256sum").arg(&raw));
    let host = String::from_utf8_lossy(&host.stdout);
    assert_eq!(host.split_whitespace().next().unwrap(), seen);
    // The original was not touched.
    assert_eq!(virsh(&["dumpxml", guest.name()]), original_xml);
}

#[test]
fn the_test_guest_runs_from_a_local_repository_and_moves_while_it_writes() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    instant_round_trip(work.path(), &repo);
}

#[test]
fn the_test_guest_runs_from_an_s3_repository_and_moves_while_it_writes() {
    let s3 = Garage::shared().bucket("instant-boot");
    use_store(&s3);
    let work = tempfile::tempdir().unwrap();
    let repo = repo_path(&s3, "repo");
    instant_round_trip(work.path(), &repo);
}
