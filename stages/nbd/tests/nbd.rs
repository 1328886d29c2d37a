//! The `nbd` source against servers the test starts itself, as an operator or libvirt would: a
//! `qemu-nbd` on a qcow2 (on a unix socket, and on TCP over loopback) and an `nbdkit` `data`
//! export. Each backs up through a spec
//! (`nbd -> full -> reader -> dedup -> zstd -> repo-writer`), restores with `specs/restore.yaml`
//! and compares the result with the source. The stage never stops a server: each test stops its
//! own by pid, and checks the server survived the run.
//!
//! These tests need `qemu-img`, `qemu-io`, `qemu-nbd` and `nbdkit` on the PATH and fail if they
//! are missing.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backflow_pipeline::{OutcomeKind, RunOptions, RunReport};
use backflow_repository::Repository;
use backflow_stages::Stages;
use backflow_testkit::qemu::{assert_images_equal, live, make_qcow2, run_tool};
use backflow_testkit::{assert_succeeded, restore_with_spec};

/// 1 MiB chunks, so that reading only the allocated ranges is visible in whole chunks.
const CHUNK: u32 = 1 << 20;

/// How long a server may take to write its pid file, or to exit once signalled.
const SERVER_WAIT: Duration = Duration::from_secs(10);

const SPEC: &str = r#"
name: backup-nbd
variables:
  socket: ~
  repo: ~
  export: ""
repository: ${repo}
stages:
  - kind: nbd
    socket: ${socket}
    export: ${export}
    disk: vda
    vm: web01
  - kind: full
  - kind: reader
    workers: 2
  - kind: dedup
    workers: 2
  - kind: zstd
    workers: 2
  - kind: repo-writer
cleanup:
  kind: cleanup
"#;

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SERVER_WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon the test started, stopped by the pid in its pid file when dropped.
struct Server {
    pid: u32,
    /// The unix socket it listens on (unused for a TCP server).
    socket: PathBuf,
}

impl Server {
    /// Runs `program` (which forks into the background), then waits for its pid file and socket.
    fn start(program: &str, args: &[&str], pid_file: &Path, socket: &Path) -> Server {
        let mut server = Server::start_then(program, args, pid_file);
        wait_until(&format!("{program}'s socket"), || socket.exists());
        server.socket = socket.to_owned();
        server
    }

    /// Runs `program` (which forks into the background), then waits for its pid file.
    fn start_then(program: &str, args: &[&str], pid_file: &Path) -> Server {
        run_tool(program, args);
        wait_until(&format!("{program}'s pid file"), || {
            std::fs::read_to_string(pid_file).is_ok_and(|s| s.ends_with('\n'))
        });
        let pid = std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Server {
            pid,
            socket: PathBuf::new(),
        }
    }

    /// `qemu-nbd` exporting `image` (qcow2) read-only as `export`.
    fn qemu_nbd(dir: &Path, image: &Path, export: &str) -> Server {
        let socket = dir.join("qemu-nbd.sock");
        let pid_file = dir.join("qemu-nbd.pid");
        Server::start(
            "qemu-nbd",
            &[
                "--read-only",
                "--persistent",
                "--shared=4",
                "--fork",
                "--format=qcow2",
                "--export-name",
                export,
                "--pid-file",
                pid_file.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
                image.to_str().unwrap(),
            ],
            &pid_file,
            &socket,
        )
    }

    /// `qemu-nbd` exporting `image` (qcow2) read-only as `export` on TCP `127.0.0.1:port`.
    fn qemu_nbd_tcp(dir: &Path, image: &Path, export: &str, port: u16) -> Server {
        let pid_file = dir.join("qemu-nbd-tcp.pid");
        let port_arg = port.to_string();
        let server = Server::start_then(
            "qemu-nbd",
            &[
                "--read-only",
                "--persistent",
                "--shared=4",
                "--fork",
                "--format=qcow2",
                "--export-name",
                export,
                "--pid-file",
                pid_file.to_str().unwrap(),
                "--bind",
                "127.0.0.1",
                "--port",
                &port_arg,
                image.to_str().unwrap(),
            ],
            &pid_file,
        );
        wait_until("qemu-nbd's TCP port", || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        server
    }

    /// `nbdkit` serving its only export ("") with `plugin_args`.
    fn nbdkit(dir: &Path, plugin_args: &[&str]) -> Server {
        let socket = dir.join("nbdkit.sock");
        let pid_file = dir.join("nbdkit.pid");
        let mut args = vec![
            "--unix",
            socket.to_str().unwrap(),
            "--pidfile",
            pid_file.to_str().unwrap(),
        ];
        args.extend_from_slice(plugin_args);
        Server::start("nbdkit", &args, &pid_file, &socket)
    }

    fn alive(&self) -> bool {
        live(self.pid)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for signal in ["TERM", "KILL"] {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), self.pid.to_string()])
                .status();
            let deadline = Instant::now() + SERVER_WAIT;
            while live(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !live(self.pid) {
                return;
            }
        }
        if !std::thread::panicking() {
            panic!("server pid {} still runs after SIGKILL", self.pid);
        }
    }
}

fn backup(socket: &Path, export: &str, repo: &Path) -> RunReport {
    let vars = [
        ("socket", socket.display().to_string()),
        ("repo", repo.display().to_string()),
        ("export", export.to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let pipeline = backflow_pipeline::spec::load_str("backup-nbd.yaml", SPEC, &vars, &Stages)
        .unwrap_or_else(|e| panic!("{e}"));
    pipeline.run(RunOptions::default())
}

/// A loopback port nothing listened on a moment ago (the kernel's pick; a race with other
/// programs is possible but unlikely).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// [`backup`] through `kind: nbd` with `host` and `port` instead of `socket`.
fn backup_tcp(host: &str, port: u16, export: &str, repo: &Path) -> RunReport {
    let spec = SPEC.replace(
        "socket: ${socket}",
        "host: ${host}\n    port: ${port}\n    connections: 2",
    );
    let spec = spec.replace("  socket: ~\n", "  host: ~\n  port: ~\n");
    let vars = [
        ("host", host.to_owned()),
        ("port", port.to_string()),
        ("repo", repo.display().to_string()),
        ("export", export.to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let pipeline = backflow_pipeline::spec::load_str("backup-nbd-tcp.yaml", &spec, &vars, &Stages)
        .unwrap_or_else(|e| panic!("{e}"));
    pipeline.run(RunOptions::default())
}

/// Restores the latest snapshot of `repo` into `dir/restored.raw`.
fn restore(dir: &Path, repo: &Path) -> PathBuf {
    let out = dir.join("restored.raw");
    assert_succeeded(&restore_with_spec(repo, &out, false));
    out
}

fn init_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    Repository::init(&repo, CHUNK).unwrap();
    repo
}

#[test]
fn backs_up_a_qcow2_served_by_qemu_nbd_and_leaves_the_server_running() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("web01.qcow2");
    make_qcow2(
        &image,
        "64M",
        &[
            "write -P 0xab 1M 256k",
            "write -P 0xcd 40M 1M",
            "write -z 50M 1M",
        ],
    );
    let server = Server::qemu_nbd(dir.path(), &image, "vda");
    let repo = init_repo(dir.path());

    let report = backup(&server.socket, "vda", &repo);
    assert_succeeded(&report);
    assert!(report.snapshot.is_some());
    // 256 KiB at 1 MiB and 1 MiB at 40 MiB: two whole chunks. The zeroed MiB is not read.
    assert_eq!(report.source_bytes_read, 2 * u64::from(CHUNK));
    assert!(
        server.alive(),
        "the stage stopped a server it did not start"
    );

    let out = restore(dir.path(), &repo);
    assert_images_equal(&image, "qcow2", &out, "raw");

    // The snapshot belongs to the named machine and records the export it came from.
    let snapshot = Repository::open(&repo)
        .unwrap()
        .open_snapshot("latest")
        .unwrap();
    assert_eq!(snapshot.info().vm, "web01");
    let disk = &snapshot.meta().disks[0];
    assert_eq!(disk.name, "vda");
    assert!(
        disk.location.starts_with("nbd+unix:///vda?socket="),
        "{}",
        disk.location
    );
    drop(server);
}

#[test]
fn backs_up_an_nbdkit_export() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB: 256 KiB of 0xab at 1 MiB, 1 MiB of 0xcd 0xef at 40 MiB, the rest unwritten.
    let server = Server::nbdkit(
        dir.path(),
        &[
            "data",
            "data=@0x100000 ( 0xab )*262144 @0x2800000 ( 0xcd 0xef )*524288",
            "size=64M",
        ],
    );
    let expected = dir.path().join("expected.raw");
    let file = std::fs::File::create(&expected).unwrap();
    file.set_len(64 << 20).unwrap();
    file.write_all_at(&[0xab; 256 << 10], 1 << 20).unwrap();
    file.write_all_at(&[0xcd, 0xef].repeat(512 << 10), 40 << 20)
        .unwrap();
    let repo = init_repo(dir.path());

    let report = backup(&server.socket, "", &repo);
    assert_succeeded(&report);
    assert_eq!(report.source_bytes_read, 2 * u64::from(CHUNK));
    assert!(server.alive());

    let out = restore(dir.path(), &repo);
    run_tool("cmp", &[expected.to_str().unwrap(), out.to_str().unwrap()]);
    drop(server);
}

#[test]
fn nbdkit_memory_export_reads_as_zeros_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["memory", "64M"]);
    let repo = init_repo(dir.path());
    let report = backup(&server.socket, "", &repo);
    assert_succeeded(&report);
    assert_eq!(report.source_bytes_read, 0);
    let out = restore(dir.path(), &repo);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 64 << 20);
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0));
    drop(server);
}

#[test]
fn a_missing_socket_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path());
    let socket = dir.path().join("no-server.sock");
    let report = backup(&socket, "", &repo);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.snapshot.is_none());
    let errors = report.errors.join("\n");
    assert!(
        errors.contains(&socket.display().to_string()) && errors.contains("does not exist"),
        "{errors}"
    );
}

#[test]
fn an_unknown_export_name_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("web01.qcow2");
    make_qcow2(&image, "1M", &[]);
    let server = Server::qemu_nbd(dir.path(), &image, "vda");
    let repo = init_repo(dir.path());
    let report = backup(&server.socket, "vdb", &repo);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    let errors = report.errors.join("\n");
    assert!(errors.contains("nbd+unix:///vdb?socket="), "{errors}");
    assert!(server.alive());
    drop(server);
}

/// A 64 MiB qcow2 with data in three chunks, a zeroed MiB and unwritten space.
fn written_qcow2(dir: &Path) -> PathBuf {
    let image = dir.join("web01.qcow2");
    make_qcow2(
        &image,
        "64M",
        &[
            "write -P 0xab 1M 256k",
            "write -P 0xcd 40M 1M",
            "write -z 50M 1M",
            "write -P 0x5a 63M 1M",
        ],
    );
    image
}

#[test]
fn backs_up_a_qcow2_served_by_qemu_nbd_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let image = written_qcow2(dir.path());
    let port = free_port();
    let server = Server::qemu_nbd_tcp(dir.path(), &image, "vda", port);
    let repo = init_repo(dir.path());

    let report = backup_tcp("127.0.0.1", port, "vda", &repo);
    assert_succeeded(&report);
    // Three whole chunks of data; the zeroed MiB is not read.
    assert_eq!(report.source_bytes_read, 3 * u64::from(CHUNK));
    assert!(server.alive());

    let out = restore(dir.path(), &repo);
    assert_images_equal(&image, "qcow2", &out, "raw");
    let snapshot = Repository::open(&repo)
        .unwrap()
        .open_snapshot("latest")
        .unwrap();
    assert_eq!(
        snapshot.meta().disks[0].location,
        format!("nbd://127.0.0.1:{port}/vda")
    );
    drop(server);
}

#[test]
fn nothing_listening_on_tcp_fails_naming_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path());
    let port = free_port();
    let report = backup_tcp("127.0.0.1", port, "vda", &repo);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.snapshot.is_none());
    let errors = report.errors.join("\n");
    assert!(
        errors.contains(&format!("nbd://127.0.0.1:{port}/vda")),
        "{errors}"
    );
}
