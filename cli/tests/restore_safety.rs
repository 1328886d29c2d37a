//! A restore never overwrites silently (issue 12, point 1) and restores past damage when asked
//! (point 15), on the real binary, real repositories, a real `qemu-nbd` and a real libvirt domain:
//! - an existing target is refused (exit 2, one line naming it, no stage table, the file byte for
//!   byte unchanged) unless `--force`, which restores the source's bytes;
//! - an image a running domain uses, or one a `qemu-nbd` holds open (image locking), is refused
//!   even with `--force`; a shut-off domain's image needs `--force`;
//! - the same for `specs/restore-vm.yaml`; a target in a missing directory is refused naming it;
//! - `--allow-damaged` writes zeros where no copy of a chunk is readable and lists the range;
//!   without it the restore fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_repository::{ChunkRef, Repository};
use backflow_testkit::libvirt::{Domain, URI, try_virsh};
use common::*;

/// Chunk size of the test repositories.
const CHUNK: u64 = 64 << 10;

/// A repository holding one backup of a generated image; returns (dir, image, repo).
fn backed_up(size: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, size, 21).unwrap();
    init_repo(&repo, "64K");
    backup(&image, &repo);
    (dir, image, repo)
}

/// `backflow restore` of the latest snapshot to `to`, not quiet (a refusal must print no table).
fn restore_to(repo: &Path, to: &Path, extra: &[&str]) -> Output {
    backflow()
        .args(["restore", "--no-sync", "--repo"])
        .arg(repo)
        .arg("--to")
        .arg(to)
        .args(extra)
        .output()
        .unwrap()
}

/// The run was refused as bad input: exit 2, nothing on stdout (no stage table), exactly one
/// line on stderr, which names `path` and contains each of `words`. Returns that line.
fn assert_refused(out: &Output, path: &Path, words: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected a refusal (exit 2): {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "a refusal printed a table: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let [line] = lines[..] else {
        panic!("expected one line on stderr, got: {stderr}");
    };
    assert!(
        line.contains(&*path.to_string_lossy()),
        "the refusal does not name {}: {line}",
        path.display()
    );
    assert!(!line.contains(".partial"), "names an internal file: {line}");
    for w in words {
        assert!(line.contains(w), "the refusal does not say {w:?}: {line}");
    }
    line.to_owned()
}

fn copy_of(file: &Path) -> PathBuf {
    let copy = file.with_extension("copy");
    std::fs::copy(file, &copy).unwrap();
    copy
}

#[test]
fn a_restore_over_an_existing_file_is_refused_and_force_replaces_it() {
    let (dir, image, repo) = backed_up(4 << 20);
    // The reproduction: restoring over the backed-up source itself.
    let other = dir.path().join("other.img");
    backflow_fixtures::generate_image(&other, 4 << 20, 22).unwrap();
    std::fs::copy(&other, &image).unwrap();
    let before = copy_of(&image);
    assert_refused(
        &restore_to(&repo, &image, &[]),
        &image,
        &["exists", "--force"],
    );
    assert_same_file(&image, &before);

    // --force restores the snapshot's bytes (those of the first image, seed 21).
    let source = dir.path().join("source.img");
    backflow_fixtures::generate_image(&source, 4 << 20, 21).unwrap();
    let forced = restore_to(&repo, &image, &["--force", "--quiet"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_same_file(&image, &source);
}

#[test]
fn a_target_in_a_missing_directory_is_refused_naming_the_directory() {
    let (dir, _image, repo) = backed_up(1 << 20);
    let missing = dir.path().join("no-such-dir");
    let to = missing.join("disk.raw");
    let line = assert_refused(&restore_to(&repo, &to, &[]), &to, &["does not exist"]);
    assert!(line.contains(&*missing.to_string_lossy()), "{line}");
    assert!(!missing.exists());
}

/// A `qemu-nbd` serving `image` (raw, read-only), stopped by its pid when dropped.
struct NbdServer {
    pid: i32,
}

impl NbdServer {
    fn serve(image: &Path, dir: &Path) -> NbdServer {
        let pid_file = dir.join("qemu-nbd.pid");
        let status = Command::new("qemu-nbd")
            .args([
                "--fork",
                "--persistent",
                "--read-only",
                "-f",
                "raw",
                "--socket",
            ])
            .arg(dir.join("nbd.sock"))
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(image)
            .status()
            .expect("qemu-nbd is required for this test");
        assert!(status.success(), "qemu-nbd did not start");
        // --fork returns once the server is ready and its pid file written.
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        NbdServer { pid }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

#[test]
fn an_image_a_qemu_nbd_holds_is_refused_even_with_force() {
    let (dir, image, repo) = backed_up(1 << 20);
    let target = dir.path().join("served.raw");
    std::fs::write(&target, vec![7u8; 1 << 20]).unwrap();
    let before = copy_of(&target);
    let server = NbdServer::serve(&target, dir.path());
    assert_refused(
        &restore_to(&repo, &target, &["--force"]),
        &target,
        &["lock", "--force or not"],
    );
    assert_same_file(&target, &before);
    drop(server);
    let _ = image;
}

#[test]
fn an_image_a_running_domain_uses_is_refused_even_with_force_and_restore_vm_too() {
    let (dir, image, repo) = backed_up(1 << 20);
    let vm = Domain::start("bf-restore-safety", &[("vda", "16M")]);
    let disk = vm.disk("vda").to_owned();
    let before = copy_of_outside(&disk, dir.path());

    // restore --force onto the running domain's disk: refused by the domain check (it names
    // the VM), whatever the lock probe would say.
    let line = assert_refused(
        &restore_to(&repo, &disk, &["--force", "--uri", URI]),
        &disk,
        &["never writes an image in use"],
    );
    assert!(line.contains(vm.name()), "{line}");
    assert_same_file(&disk, &before);

    // restore-vm.yaml into the domain's own directory (its `vda.qcow2` is the running image).
    let name = format!("{}-copy", vm.name());
    let _defined = Undefine(name.clone());
    let (_vm_dir, vm_repo) = vm_backup(&vm);
    let out = restore_vm(&vm_repo, vm.dir(), &name, &["force=true"]);
    assert_refused(&out, &disk, &["never writes an image in use"]);
    assert_same_file(&disk, &before);

    // Into a directory holding a plain `vda.qcow2`: refused without force, replaced with it.
    let to = dir.path().join("restored-vm");
    std::fs::create_dir(&to).unwrap();
    let existing = to.join("vda.qcow2");
    std::fs::write(&existing, b"not an image").unwrap();
    let out = restore_vm(&vm_repo, &to, &name, &[]);
    assert_refused(&out, &existing, &["exists", "--force"]);
    assert_eq!(std::fs::read(&existing).unwrap(), b"not an image");
    let out = restore_vm(&vm_repo, &to, &name, &["force=true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The running image is locked: its copy stands in.
    backflow_testkit::qemu::compare_images(&existing, "qcow2", &before, "qcow2").unwrap();

    // Shut off, the domain's image is an existing file: --force replaces it.
    vm.destroy();
    // QEMU wrote the checkpoint's bitmap into the image as it stopped: a new reference copy.
    std::fs::remove_file(&before).unwrap();
    let before = copy_of_outside(&disk, dir.path());
    let line = assert_refused(
        &restore_to(&repo, &disk, &["--uri", URI]),
        &disk,
        &["shut-off VM", "--force"],
    );
    assert!(line.contains(vm.name()), "{line}");
    assert_same_file(&disk, &before);
    let forced = restore_to(&repo, &disk, &["--uri", URI, "--force", "--quiet"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_same_file(&disk, &image);
}

/// A copy of `file` in `dir` (the domain's directory belongs to the fixture).
fn copy_of_outside(file: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("domain-image.copy");
    std::fs::copy(file, &copy).unwrap();
    copy
}

/// A domain a restore may define: undefined when the test ends, passed or not.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        for args in [["destroy", &self.0], ["undefine", &self.0]] {
            let _ = try_virsh(&args);
        }
    }
}

/// A repository holding one snapshot of the running `vm` (with its definition), in a directory
/// removed with the returned guard.
fn vm_backup(vm: &Domain) -> (tempfile::TempDir, PathBuf) {
    let (dir, repo, tmp) = common::vm::vm_dirs();
    run_ok(&mut common::vm::backup_vm_command(&tmp, vm.name(), &repo));
    (dir, repo)
}

/// `backflow run specs/restore-vm.yaml` of the latest snapshot into `to` as domain `name`.
fn restore_vm(repo: &Path, to: &Path, name: &str, vars: &[&str]) -> Output {
    let mut cmd = backflow();
    cmd.arg("run")
        .arg(spec("restore-vm.yaml"))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .arg("--var")
        .arg(format!("to={}", to.display()))
        .args([
            "--var",
            &format!("name={name}"),
            "--var",
            &format!("uri={URI}"),
        ]);
    for v in vars {
        cmd.args(["--var", v]);
    }
    cmd.output().unwrap()
}

#[test]
fn allow_damaged_restores_zeros_where_no_copy_is_readable_and_lists_the_range() {
    let (dir, image, repo) = backed_up(4 << 20);
    let (index, digest) = {
        let r = Repository::open(&repo).unwrap();
        let snapshot = r.open_snapshot("latest").unwrap();
        let table: Vec<ChunkRef> = snapshot.chunks(0).map(Result::unwrap).collect();
        let (index, digest) = backflow_testkit::damage_a_raw_chunk(&r, &table, 100);
        (index as u64, digest)
    };
    // What the restore must give: the image with zeros over the damaged chunk.
    let expected = dir.path().join("expected.img");
    std::fs::copy(&image, &expected).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&expected)
            .unwrap();
        f.write_all_at(&vec![0u8; CHUNK as usize], index * CHUNK)
            .unwrap();
    }

    let to = dir.path().join("restored.img");
    let failed = restore_to(&repo, &to, &["--quiet"]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(!to.exists());

    // Found by the verify stage (the copy decodes but does not match its digest), then, once
    // `verify --read-data` marked it, by the reader (no copy left): zeros and one range both ways.
    for round in ["verify stage", "marked damaged"] {
        let report = dir.path().join("report.json");
        let _ = std::fs::remove_file(&to);
        let out = backflow()
            .args(["restore", "--no-sync", "--allow-damaged", "--repo"])
            .arg(&repo)
            .arg("--to")
            .arg(&to)
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{round}: {stderr}");
        assert_same_file(&to, &expected);
        let report = read_report(&report);
        assert_eq!(
            report["results"]["damaged"],
            serde_json::json!([{
                "disk": report["results"]["damaged"][0]["disk"],
                "offset": index * CHUNK,
                "length": CHUNK,
                "digest": digest.to_string(),
                "cause": report["results"]["damaged"][0]["cause"],
            }]),
            "{round}"
        );
        let range = format!(
            "{CHUNK} bytes at offset {} restored as zeros",
            index * CHUNK
        );
        assert!(
            warnings(&report).iter().any(|w| w.contains(&range)),
            "{round}: {:?}",
            warnings(&report)
        );
        assert!(stderr.contains(&range), "{round}: not on stderr: {stderr}");
        if round == "verify stage" {
            // Marks the chunk: the next restore finds no copy at all.
            assert!(!verify(&repo, true).status.success());
        }
    }
}

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup is required for this test");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_is_written_only_with_force() {
    let (dir, image, repo) = backed_up(2 << 20);
    let backing = dir.path().join("device.img");
    std::fs::write(&backing, vec![0x5au8; 2 << 20]).unwrap();
    let before = copy_of(&backing);
    let device = Loop::attach(&backing);
    assert_refused(
        &restore_to(&repo, &device.0, &[]),
        &device.0,
        &["block device", "--force"],
    );
    assert_same_file(&backing, &before);
    let forced = restore_to(&repo, &device.0, &["--force", "--quiet"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_same_file(&device.0, &image);
}
