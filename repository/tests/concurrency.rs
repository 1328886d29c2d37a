//! Several backups into one repository at once: threads, processes, dropped sessions, locks.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use backflow_repository::{RepoError, Repository};
use common::*;

/// One session written by two writer threads (even and odd chunks), committed.
fn threaded_backup(repo: &Repository, vm: &str, data: &[u8], start: &Barrier) -> String {
    let session = repo.begin_backup(vm).unwrap();
    let disk = session.add_disk(disk_meta("vda", data.len())).unwrap();
    start.wait();
    std::thread::scope(|s| {
        for part in 0..2 {
            let session = &session;
            s.spawn(move || {
                let mut writer = session.pack_writer();
                let mut seen = HashSet::new();
                for (i, chunk) in data
                    .chunks(CHUNK_USIZE)
                    .enumerate()
                    .filter(|(i, _)| i % 2 == part)
                {
                    let d = backflow_repository::Digest(*blake3::hash(chunk).as_bytes());
                    if seen.insert(d) && repo.lookup(&d).unwrap().is_none() {
                        let (codec, stored) = encode(chunk);
                        writer.add(d, codec, chunk.len() as u32, &stored).unwrap();
                    }
                    session
                        .set_chunk(disk, i as u64, backflow_repository::ChunkRef::Data(d))
                        .unwrap();
                }
                writer.finish().unwrap();
            });
        }
    });
    session.commit(None).unwrap().id
}

#[test]
fn two_sessions_on_two_threads_both_commit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    // Both disks share chunks ('a', 't' patterns): the racing sessions may both store them; that is allowed.
    let one = image(21, "rrartrrat", 77);
    let two = image(22, "artrrarrt", 0);
    let barrier = Barrier::new(2);
    let (id1, id2) = std::thread::scope(|s| {
        let a = s.spawn(|| threaded_backup(&repo, "one", &one, &barrier));
        let b = s.spawn(|| threaded_backup(&repo.clone(), "two", &two, &barrier));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(id1, id2);
    let fresh = Repository::open(dir.path()).unwrap();
    assert_eq!(restore(&fresh, &fresh.open_snapshot(&id1).unwrap(), 0), one);
    assert_eq!(restore(&fresh, &fresh.open_snapshot(&id2).unwrap(), 0), two);
    assert_eq!(fresh.list_snapshots().unwrap().len(), 2);
    let report = fresh.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "scratch removed at commit"
    );
}

const CHILD_REPO: &str = "BACKFLOW_TEST_CHILD_REPO";
const CHILD_N: &str = "BACKFLOW_TEST_CHILD_N";

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The child side of `two_processes_back_up_at_once`; does nothing in a normal test run.
#[test]
fn child_process_backup() {
    let (Ok(repo_path), Ok(n)) = (std::env::var(CHILD_REPO), std::env::var(CHILD_N)) else {
        return;
    };
    let n: u64 = n.parse().unwrap();
    let repo = Repository::open(Path::new(&repo_path)).unwrap();
    let data = image(100 + n, "rratrz", 10);
    let session = repo.begin_backup(&format!("vm{n}")).unwrap();
    // Both sessions are open before either writes: they really overlap.
    let sync = Path::new(&repo_path).parent().unwrap().to_owned();
    std::fs::write(sync.join(format!("ready-{n}")), b"").unwrap();
    wait_for(&sync.join(format!("ready-{}", 1 - n)));
    let mut writer = session.pack_writer();
    let d = session.add_disk(disk_meta("vda", data.len())).unwrap();
    write_disk(&repo, &session, &mut writer, &mut HashSet::new(), d, &data);
    writer.finish().unwrap();
    let info = session.commit(None).unwrap();
    println!("committed {}", info.id);
}

#[test]
fn two_processes_back_up_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = init(&repo_path);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|n| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_backup",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_REPO, &repo_path)
                .env(CHILD_N, n.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("committed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = repo.list_snapshots().unwrap();
    assert_eq!(list.len(), 2);
    for n in 0..2u64 {
        let info = list.iter().find(|s| s.vm == format!("vm{n}")).unwrap();
        assert_eq!(
            restore(&repo, &repo.open_snapshot(&info.id).unwrap(), 0),
            image(100 + n, "rratrz", 10)
        );
    }
    assert!(repo.verify(true).unwrap().is_ok());
}

#[test]
fn a_dropped_session_leaves_the_repository_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let data = image(30, "rrtz", 0);
    let kept = backup(&repo, "vm", &[("vda", &data)]);

    let session = repo.begin_backup("vm").unwrap();
    let d = session.add_disk(disk_meta("vda", 8 * CHUNK_USIZE)).unwrap();
    let mut writer = session.pack_writer();
    write_disk(
        &repo,
        &session,
        &mut writer,
        &mut HashSet::new(),
        d,
        &image(31, "rrrrrrrr", 0),
    );
    writer.finish().unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        1
    );
    drop(session);

    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "scratch removed on drop"
    );
    let ids: Vec<_> = repo
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&kept.id));
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    assert!(
        report.unreferenced_packs > 0,
        "the dropped session's packs stay for gc"
    );
    assert_eq!(
        restore(&repo, &repo.open_snapshot(&kept.id).unwrap(), 0),
        data
    );
}

#[test]
fn running_sessions_exclude_index_rebuild_and_keep_their_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let session = repo.begin_backup("vm").unwrap();
    let err = repo.rebuild_index().unwrap_err();
    assert!(
        matches!(err, RepoError::Locked { .. }) && err.is_retryable(),
        "{err}"
    );
    // A second backup still starts: backups share the lock.
    let other = repo.begin_backup("vm2").unwrap();
    std::fs::create_dir(dir.path().join("tmp").join("20200101T000000Z-abcdef")).unwrap();
    assert_eq!(
        repo.remove_stale_scratch().unwrap(),
        1,
        "only the abandoned directory goes"
    );
    session.add_disk(disk_meta("vda", 1)).unwrap();
    session.commit(None).unwrap();
    other.commit(None).unwrap();
    assert!(repo.rebuild_index().is_ok());
    assert_eq!(repo.list_snapshots().unwrap().len(), 2);
}
