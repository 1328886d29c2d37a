//! `backflow serve` through the real binary, read by the real NBD tools: the export of every disk
//! of a restore point (full and incremental, local and on Garage, plain and encrypted) compares
//! identical to a full `backflow restore` of it with `qemu-img compare`, `nbdcopy` (four
//! connections) and a qcow2 overlay QEMU reads through; `nbdinfo --map` shows exactly the zero
//! chunks as holes; a damaged chunk fails its reads with EIO and nothing else; a killed server
//! leaves nothing the next start trips over; bad input is refused clearly.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backflow_nbd::{Client, NbdError};
use backflow_repository::{ChunkRef, Repository};
use backflow_testkit::qemu::assert_images_equal;
use backflow_testkit::s3::Garage;
use common::*;

const CHUNK: u64 = 64 << 10;

/// A running `backflow serve`, stopped with SIGTERM (by pid) when dropped.
struct Served {
    child: Option<Child>,
    /// The ready line's address (`unix:PATH`) and exports.
    address: String,
    exports: Vec<String>,
    socket: PathBuf,
}

impl Served {
    fn start(cmd: &mut Command, socket: &Path) -> Served {
        let mut child = cmd
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve ended before it was ready ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            (words.len(), words[0], words[2]),
            (4, "listening", "exports"),
            "{line}"
        );
        Served {
            child: Some(child),
            address: words[1].to_owned(),
            exports: words[3].split(',').map(str::to_owned).collect(),
            socket: socket.to_owned(),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        sigterm(&child);
        wait_exit(&mut child, Duration::from_secs(60))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn serve_command(repo: &Path, snapshot: &str, extra: &[&str]) -> Command {
    let mut cmd = backflow();
    cmd.args(["serve", "--snapshot", snapshot, "--repo"])
        .arg(repo)
        .args(extra);
    cmd
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ranges of all-zero chunks of `image`, neighbours joined: what the export must report as
/// holes (the backup stores zero chunks as nothing).
fn zero_ranges(image: &Path, chunk: u64) -> Vec<(u64, u64)> {
    let data = std::fs::read(image).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, piece) in data.chunks(chunk as usize).enumerate() {
        if piece.iter().all(|b| *b == 0) {
            let offset = i as u64 * chunk;
            match out.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += piece.len() as u64,
                _ => out.push((offset, piece.len() as u64)),
            }
        }
    }
    out
}

/// The hole extents `nbdinfo --map --json` reports.
fn mapped_holes(uri: &str) -> Vec<(u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&tool("nbdinfo", &["--map", "--json", uri])).unwrap();
    let mut out = Vec::new();
    for e in json.as_array().unwrap() {
        let flags = e["type"].as_u64().unwrap();
        if flags != 0 {
            assert_eq!(flags, 3, "hole and zero together: {e}");
            out.push((e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()));
        }
    }
    out
}

/// Every check of one served disk against its full restore `restored`.
fn assert_export_is(served: &Served, export: &str, restored: &Path, scratch: &Path, chunk: u64) {
    let uri = served.uri(export);
    assert_images_equal(Path::new(&uri), "raw", restored, "raw");
    let copy = scratch.join(format!("{export}.nbdcopy"));
    tool(
        "nbdcopy",
        &["--connections=4", &uri, copy.to_str().unwrap()],
    );
    assert_same_file(&copy, restored);
    std::fs::remove_file(&copy).unwrap();
    // QEMU itself: a qcow2 overlay backed by the export.
    let overlay = scratch.join(format!("{export}.qcow2"));
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    assert_images_equal(&overlay, "qcow2", restored, "raw");
    std::fs::remove_file(&overlay).unwrap();
    assert_eq!(mapped_holes(&uri), zero_ranges(restored, chunk), "{export}");
}

/// 48 MiB of generated data (holes, zeros and text among it), plus a written run of zeros that
/// the backup must store as zero chunks and an odd tail.
fn make_image(path: &Path, seed: u64) {
    backflow_fixtures::generate_image(path, 48 << 20, seed).unwrap();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 3 << 20], 10 << 20).unwrap();
    f.write_all_at(&[0x5a; 1000], (48 << 20) - 1000).unwrap();
}

fn restore_disk(repo: &Path, snapshot: &str, to: &Path) {
    run_ok(
        backflow()
            .args([
                "restore",
                "--no-sync",
                "--quiet",
                "--snapshot",
                snapshot,
                "--repo",
            ])
            .arg(repo)
            .arg("--to")
            .arg(to),
    );
}

/// Full and incremental restore points of one image in `repo`: each served export equals its
/// restore; the incremental's too.
fn full_and_incremental(repo: &Path, dir: &Path) {
    let image = dir.join("disk.img");
    make_image(&image, 7);
    let full = backup_named(&image, repo, "disk0")["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    backflow_fixtures::change_image(&image, 0.05, 8).unwrap();
    let incremental = backup_named(&image, repo, "disk0")["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    for (n, id) in [full, incremental].iter().enumerate() {
        let restored = dir.join(format!("restored-{n}.img"));
        restore_disk(repo, id, &restored);
        let served = Served::start(&mut serve_command(repo, id, &[]), &dir.join("s.sock"));
        assert_eq!(served.exports, ["disk0"]);
        assert!(served.address.starts_with("unix:"));
        assert_export_is(&served, "disk0", &restored, dir, CHUNK);
        // The only disk is also the default export.
        assert_images_equal(Path::new(&served.uri("")), "raw", &restored, "raw");
        assert!(served.stop().success());
        assert!(!dir.join("s.sock").exists(), "the socket is removed");
    }
    // The latest restore point equals the image as it is now.
    assert_same_file(&dir.join("restored-1.img"), &image);
}

#[test]
fn local_full_and_incremental_exports_equal_their_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    full_and_incremental(&repo, dir.path());
    assert_eq!(
        std::fs::read_dir(repo.join("users")).unwrap().count(),
        0,
        "handle closed"
    );
}

#[test]
fn garage_full_and_incremental_exports_equal_their_restores() {
    let s3 = Garage::shared().bucket("serve");
    common::s3::use_store(&s3);
    let dir = tempfile::tempdir().unwrap();
    let repo = common::s3::repo_path(&s3, "repo");
    init_repo(&repo, "64K");
    full_and_incremental(&repo, dir.path());
}

#[test]
fn an_encrypted_repository_is_served_with_its_passphrase() {
    let env = common::keys::Passphrases::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    run_ok(
        env.bf(Some("first"))
            .args(["init", "--encryption", "--chunk-size", "64K", "--repo"])
            .arg(&repo),
    );
    let image = dir.path().join("disk.img");
    make_image(&image, 11);
    let id = report_of(backup_args(
        &mut env.bf(Some("first")),
        &image,
        &repo,
        "vda",
        "vm",
    ))["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut cmd = env.bf(Some("first"));
    cmd.args(["serve", "--snapshot", &id, "--repo"]).arg(&repo);
    let served = Served::start(&mut cmd, &dir.path().join("s.sock"));
    assert_eq!(served.exports, ["vda"]);
    let copy = dir.path().join("copy.img");
    tool("nbdcopy", &[&served.uri("vda"), copy.to_str().unwrap()]);
    assert_same_file(&copy, &image);
    assert_eq!(mapped_holes(&served.uri("vda")), zero_ranges(&image, CHUNK));
    assert!(served.stop().success());
}

#[test]
fn every_disk_of_a_vm_is_an_export_and_equals_its_restore() {
    use backflow_testkit::libvirt::Domain;
    let (dir, repo, tmp) = common::vm::vm_dirs();
    let vm = Domain::start("backflow-serve", &[("vda", "64M"), ("vdb", "32M")]);
    common::vm::guest_writes(&vm, "vda", common::vm::VDA_FIRST, 1);
    common::vm::guest_writes(&vm, "vdb", common::vm::VDB_FIRST, 2);
    run_ok(&mut common::vm::backup_vm_command(&tmp, vm.name(), &repo));
    common::vm::guest_writes(&vm, "vdb", &[(8 << 20, 1 << 20)], 3);
    run_ok(&mut common::vm::backup_vm_command(&tmp, vm.name(), &repo));
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    let mut cmd = backflow();
    run_ok(
        cmd.args([
            "restore",
            "--no-sync",
            "--quiet",
            "--vm",
            vm.name(),
            "--repo",
        ])
        .arg(&repo)
        .arg("--to")
        .arg(&restored),
    );
    let served = Served::start(
        &mut serve_command(&repo, "latest", &["--vm", vm.name()]),
        &dir.path().join("s.sock"),
    );
    assert_eq!(served.exports, ["vda", "vdb"]);
    let listed = tool("nbdinfo", &["--list", &served.uri("")]);
    assert!(
        listed.contains("export=\"vda\"") && listed.contains("export=\"vdb\""),
        "{listed}"
    );
    for disk in ["vda", "vdb"] {
        assert_export_is(
            &served,
            disk,
            &restored.join(format!("{disk}.raw")),
            dir.path(),
            common::vm::CHUNK,
        );
    }
    assert!(served.stop().success());
    // With --disk, that disk only, also as the default export.
    let served = Served::start(
        &mut serve_command(&repo, "latest", &["--vm", vm.name(), "--disk", "vdb"]),
        &dir.path().join("s.sock"),
    );
    assert_eq!(served.exports, ["vdb"]);
    let vdb = restored.join("vdb.raw");
    assert_images_equal(Path::new(&served.uri("")), "raw", &vdb, "raw");
    assert!(served.stop().success());
}

#[test]
fn a_killed_server_leaves_nothing_the_next_start_trips_over() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("disk.img");
    make_image(&image, 3);
    backup(&image, &repo);
    let socket = dir.path().join("s.sock");
    let served = Served::start(&mut serve_command(&repo, "latest", &[]), &socket);
    let pid = served.pid();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    drop(served);
    // What it could leave: the socket file and its registration (its flock freed).
    assert!(socket.exists());
    let users = || -> Vec<String> {
        std::fs::read_dir(repo.join("users"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(users().len(), 1);
    // The next start replaces the stale socket and removes the dead registration.
    let served = Served::start(&mut serve_command(&repo, "latest", &[]), &socket);
    let now = users();
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(now[0].starts_with(&format!("{}-", served.pid())), "{now:?}");
    // A second server on the live socket is refused, naming it; the first goes on serving.
    let out = serve_command(&repo, "latest", &["--listen"])
        .arg(format!("unix:{}", socket.display()))
        .output()
        .unwrap();
    assert_failed(
        &out,
        2,
        "a server accepts connections on this socket already",
    );
    let copy = dir.path().join("copy.img");
    tool("nbdcopy", &[&served.uri("disk0"), copy.to_str().unwrap()]);
    assert_same_file(&copy, &image);
    assert!(served.stop().success());
    assert!(!socket.exists());
    assert!(users().is_empty());
    // A gc runs through: nothing waits for a dead or stopped server.
    let report = gc_json(&repo, &[]);
    assert!(report["waiting_for"].is_null(), "{report:#}");
}

#[test]
fn a_damaged_chunk_fails_its_reads_with_eio_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("disk.img");
    make_image(&image, 5);
    backup(&image, &repo);
    let (index, digest) = {
        let r = Repository::open(&repo).unwrap();
        let snapshot = r.open_snapshot("latest").unwrap();
        let table: Vec<ChunkRef> = snapshot.chunks(0).map(Result::unwrap).collect();
        let (index, digest) = backflow_testkit::damage_a_raw_chunk(&r, &table, 100);
        (index as u64, digest)
    };
    let socket = dir.path().join("s.sock");
    let served = Served::start(&mut serve_command(&repo, "latest", &[]), &socket);
    let original = std::fs::read(&image).unwrap();
    let mut client = Client::connect_unix(&socket, "disk0", &[]).unwrap();
    let size = original.len() as u64;
    for chunk in 0..size.div_ceil(CHUNK) {
        let offset = chunk * CHUNK;
        let mut buf = vec![0u8; CHUNK.min(size - offset) as usize];
        match client.read_at(offset, &mut buf) {
            Ok(()) => {
                assert_ne!(chunk, index, "the damaged chunk read without error");
                assert!(
                    buf == original[offset as usize..offset as usize + buf.len()],
                    "chunk {chunk}"
                );
            }
            Err(NbdError::Command { errno, message, .. }) => {
                assert_eq!((chunk, errno), (index, 5), "{message}");
                assert!(message.contains(&digest.to_string()), "{message}");
                assert!(message.contains(&format!("offset {offset}")), "{message}");
            }
            Err(e) => panic!("chunk {chunk}: {e}"),
        }
    }
    // A whole copy fails rather than writing wrong bytes.
    let copy = dir.path().join("copy.img");
    let out = Command::new("nbdcopy")
        .arg(served.uri("disk0"))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The server logged the damage and goes on serving.
    let mut ok = vec![0u8; 4096];
    client.read_at(0, &mut ok).unwrap();
    assert!(served.stop().success());
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("disk.img");
    make_image(&image, 9);
    backup(&image, &repo);
    let sock = format!("unix:{}", dir.path().join("s.sock").display());
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let not_socket = format!("unix:{}", file.display());
    for (snapshot, extra, needle) in [
        ("nosuch", vec!["--listen", &sock], "no snapshot \"nosuch\""),
        (
            "latest",
            vec!["--listen", &sock, "--disk", "vdz"],
            "--disk vdz: restore point",
        ),
        (
            "latest",
            vec!["--listen", "/tmp/x.sock"],
            "expected unix:PATH or tcp:HOST:PORT",
        ),
        (
            "latest",
            vec!["--listen", "tcp:127.0.0.1:http"],
            "is not a number",
        ),
        (
            "latest",
            vec!["--listen", "tcp:192.0.2.1:10809"],
            "not a loopback address",
        ),
        (
            "latest",
            vec!["--listen", &not_socket],
            "exists and is not a socket",
        ),
        (
            "latest",
            vec!["--listen", "unix:/nonexistent/dir/s.sock"],
            "cannot create the socket",
        ),
    ] {
        let out = serve_command(&repo, snapshot, &extra).output().unwrap();
        assert_failed(&out, 2, needle);
        assert!(out.stdout.is_empty(), "no ready line: {extra:?}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // TCP on loopback, port 0: the ready line names the port bound.
    let mut child = serve_command(&repo, "latest", &["--listen", "tcp:127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .strip_prefix("tcp:")
        .unwrap()
        .to_owned();
    assert!(!address.ends_with(":0"), "{line}");
    let c = Client::connect_tcp(&address, "disk0", &["base:allocation"]).unwrap();
    assert_eq!(c.size(), std::fs::metadata(&image).unwrap().len());
    drop(c);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(60)).success());
}

/// On object storage the server's registration is a lease renewed in the background: after
/// several lease bounds a gc still waits for the running server (deleting nothing it could
/// read), the export still reads, and once it stopped the next gc finishes.
#[test]
fn a_long_running_server_keeps_its_s3_lease_and_gc_waits_for_it() {
    const LEASE: u64 = 10;
    let s3 = Garage::shared().bucket("serve-lease");
    common::s3::use_store(&s3);
    common::s3::set_env("BACKFLOW_LEASE_SECONDS", &LEASE.to_string());
    let dir = tempfile::tempdir().unwrap();
    let repo = common::s3::repo_path(&s3, "repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("disk.img");
    make_image(&image, 21);
    backup(&image, &repo);
    backflow_fixtures::change_image(&image, 0.3, 22).unwrap();
    let kept = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let served = Served::start(
        &mut serve_command(&repo, &kept, &[]),
        &dir.path().join("s.sock"),
    );
    forget_keep_last(&repo, 1);
    // Well past the bound: only renewals keep the lease live.
    std::thread::sleep(Duration::from_secs(LEASE * 5 / 2));
    let report = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(!report["waiting_for"].is_null(), "{report:#}");
    let copy = dir.path().join("copy.img");
    tool("nbdcopy", &[&served.uri("disk0"), copy.to_str().unwrap()]);
    assert_same_file(&copy, &image);
    assert!(served.stop().success());
    let report = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(report["waiting_for"].is_null(), "{report:#}");
    restore_disk(&repo, &kept, &dir.path().join("restored.img"));
    assert_same_file(&dir.path().join("restored.img"), &image);
}
