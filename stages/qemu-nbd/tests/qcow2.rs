//! The `backup-qcow2` spec against a real qemu-nbd: a qcow2 image backs up reading only its
//! allocated clusters, restores to a raw file that `qemu-img compare` finds identical, and the
//! server and its socket directory are gone after the run, whether it succeeded or failed.
//!
//! These tests need `qemu-img`, `qemu-io` and `qemu-nbd` on the PATH and fail if they are missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backflow_pipeline::{OutcomeKind, Pipeline, RunOptions};
use backflow_qemu::{QemuNbdServer, ServerConfig, ServerDir};
use backflow_repository::Repository;
use backflow_stages::Stages;
use backflow_testkit::qemu::{
    assert_images_equal, assert_no_process_naming, children_of, live, make_qcow2, processes_naming,
};
use backflow_testkit::{assert_succeeded, restore_with_spec};
use stage_qemu_nbd::{QemuNbd, QemuNbdOptions};

/// 1 MiB chunks, so that rounding allocated data to whole chunks is visible.
const CHUNK: u32 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    /// Where the stage makes its private socket directory: empty after every run.
    sockets: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("web01.qcow2");
    // 256 KiB of 0xab at 1 MiB and 1 MiB of 0xcd at 40 MiB.
    make_qcow2(
        &image,
        "64M",
        &["write -P 0xab 1M 256k", "write -P 0xcd 40M 1M"],
    );
    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    Fixture {
        dir,
        image,
        sockets,
    }
}

/// The `backup-qcow2` spec as loaded from specs/, with the source's socket directory moved into
/// the test's temporary directory.
fn backup_pipeline(f: &Fixture, repo: &Path) -> Pipeline {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../specs/backup-qcow2.yaml");
    let vars = vec![
        ("source".to_owned(), f.image.display().to_string()),
        ("repo".to_owned(), repo.display().to_string()),
        ("disk".to_owned(), "vda".to_owned()),
    ];
    let mut pipeline =
        backflow_pipeline::spec::load_file(&spec, &vars, &Stages).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pipeline.stages[0].kind, stage_qemu_nbd::KIND);
    pipeline.stages[0].stage = Arc::new(
        QemuNbd::new(QemuNbdOptions {
            path: Some(f.image.clone()),
            disk: "vda".into(),
            socket_dir: Some(f.sockets.clone()),
            ..Default::default()
        })
        .unwrap(),
    );
    pipeline
}

/// No `qemu-nbd` (nor anything else) runs on the image, and the socket directory is empty.
fn assert_server_gone(f: &Fixture) {
    assert_no_process_naming(&f.image);
    let left: Vec<_> = std::fs::read_dir(&f.sockets).unwrap().collect();
    assert!(left.is_empty(), "socket directory left behind: {left:?}");
}

#[test]
fn qcow2_backs_up_its_allocated_clusters_and_restores_identical() {
    let f = fixture();
    let repo = f.dir.path().join("repo");
    Repository::init(&repo, CHUNK).unwrap();

    let report = backup_pipeline(&f, &repo).run(RunOptions::default());
    assert_succeeded(&report);
    assert!(report.snapshot.is_some());
    // 256 KiB at 1 MiB and 1 MiB at 40 MiB: two whole 1 MiB chunks, not 64 MiB.
    assert_eq!(report.source_bytes_read, 2 * u64::from(CHUNK));
    assert_server_gone(&f);

    let out = f.dir.path().join("restored.raw");
    let restored = restore_with_spec(&repo, &out, false);
    assert_succeeded(&restored);
    assert_images_equal(&f.image, "qcow2", &out, "raw");
}

#[test]
fn a_failed_run_still_stops_the_server() {
    let f = fixture();
    // A repository whose pack directories are files: no pack can be stored, so the run fails at
    // the writer, after the source started qemu-nbd and emitted its disk. (A missing repository
    // fails the run before any stage starts.)
    let repo = f.dir.path().join("repo");
    Repository::init(&repo, CHUNK).unwrap();
    for byte in 0..=255u8 {
        let sub = repo.join("packs").join(format!("{byte:02x}"));
        let _ = std::fs::remove_dir(&sub);
        std::fs::write(&sub, b"not a directory").unwrap();
    }
    let report = backup_pipeline(&f, &repo).run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.snapshot.is_none());
    // The source did start the server and emit its disk before the run failed downstream.
    assert_eq!(report.stages[0].items_out, 1, "{:?}", report.errors);
    assert_server_gone(&f);
}

#[test]
fn an_image_qemu_cannot_open_fails_naming_it() {
    let f = fixture();
    let repo = f.dir.path().join("repo");
    Repository::init(&repo, CHUNK).unwrap();
    let bogus = f.dir.path().join("not-a.qcow2");
    std::fs::write(&bogus, b"this is not a qcow2 image").unwrap();
    let mut pipeline = backup_pipeline(&f, &repo);
    pipeline.stages[0].stage = Arc::new(
        QemuNbd::new(QemuNbdOptions {
            path: Some(bogus.clone()),
            socket_dir: Some(f.sockets.clone()),
            ..Default::default()
        })
        .unwrap(),
    );
    let report = pipeline.run(RunOptions::default());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    let errors = report.errors.join("\n");
    assert!(
        errors.contains(&bogus.display().to_string()),
        "errors do not name the image: {errors}"
    );
    assert_no_process_naming(&bogus);
    assert_server_gone(&f);
}

#[test]
fn the_server_is_our_child_until_stopped_and_reaped() {
    let f = fixture();
    let dir = ServerDir::create(&f.sockets).unwrap();
    let mode = std::fs::metadata(dir.path()).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    let server =
        QemuNbdServer::start(&dir, &ServerConfig::read_only(&f.image, "qcow2", 2)).unwrap();
    let pid = server.pid().expect("qemu-nbd wrote no pid file");
    assert!(server.socket().exists());
    assert_eq!(processes_naming(&f.image), vec![pid]);
    assert!(live(pid));
    // Ours to wait for, not a daemon left to whoever adopts orphans.
    assert!(
        children_of(std::process::id()).contains(&pid),
        "qemu-nbd (pid {pid}) is not this process's child"
    );
    dir.stop_and_remove().unwrap();
    assert!(!live(pid), "pid {pid} still runs");
    // Reaped: not even a zombie is left (a pid reused since would not be our child).
    assert!(
        !children_of(std::process::id()).contains(&pid),
        "qemu-nbd (pid {pid}) was not reaped"
    );
    assert_server_gone(&f);
    // Stopping again is harmless.
    dir.stop_and_remove().unwrap();
}
