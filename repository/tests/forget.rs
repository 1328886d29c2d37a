//! `Repository::forget`: removes one manifest durably, leaves every other snapshot whole, runs next to
//! backups and is refused while the lock is held exclusively.

mod common;

use backflow_repository::{KeepPolicy, RepoError, Repository, plan};
use common::*;

#[test]
fn forgetting_leaves_the_other_snapshots_whole() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let v1 = image(1, "rrtza", 100);
    let mut v2 = v1.clone();
    v2[10] ^= 0xff;
    let mut v3 = v2.clone();
    v3[CHUNK_USIZE * 3 + 5] ^= 0xff;
    let s1 = backup(&repo, "web", &[("vda", &v1)]);
    let s2 = backup(&repo, "web", &[("vda", &v2)]);
    let s3 = backup(&repo, "web", &[("vda", &v3)]);
    let db = backup(&repo, "db", &[("vda", &v1)]);

    // Keep the newest of each VM: the two older web snapshots go, db's only one stays.
    let policy = KeepPolicy {
        last: Some(1),
        ..KeepPolicy::default()
    };
    let decisions = plan(&repo.list_snapshots().unwrap(), &policy);
    let gone: Vec<&str> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(gone, [s2.id.as_str(), s1.id.as_str()]);
    for id in &gone {
        repo.forget(id).unwrap();
    }
    let left: Vec<String> = repo
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&s3.id) && left.contains(&db.id));
    assert!(
        !dir.path()
            .join("snapshots")
            .join(format!("{}.snap", s1.id))
            .exists()
    );

    // The chunks stay (no gc yet), and what is left restores and verifies.
    assert_eq!(restore(&repo, &repo.open_snapshot(&s3.id).unwrap(), 0), v3);
    assert_eq!(restore(&repo, &repo.open_snapshot(&db.id).unwrap(), 0), v1);
    let reopened = Repository::open(dir.path()).unwrap();
    assert!(reopened.verify(true).unwrap().is_ok());

    // Forgetting again, or an id that never existed, names the id.
    for id in [
        s1.id.as_str(),
        "20200101T000000Z-000000",
        "latest",
        "../config",
    ] {
        let err = repo.forget(id).unwrap_err();
        assert!(
            matches!(&err, RepoError::SnapshotNotFound { id: i, .. } if i == id)
                && !err.is_retryable(),
            "{err}"
        );
        assert!(err.to_string().contains(id), "{err}");
    }
    assert!(dir.path().join("config").exists());
}

#[test]
fn forget_runs_next_to_backups_but_not_during_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let old = backup(&repo, "vm", &[("vda", &image(2, "rt", 0))]);
    let session = repo.begin_backup("vm").unwrap();
    repo.forget(&old.id).unwrap();
    session.add_disk(disk_meta("vda", 1)).unwrap();
    session.commit(None).unwrap();
    assert_eq!(repo.list_snapshots().unwrap().len(), 1);

    let other = backup(&repo, "vm", &[("vda", &image(3, "r", 0))]);
    let lock = std::fs::File::open(dir.path().join("lock")).unwrap();
    lock.lock().unwrap();
    let err = repo.forget(&other.id).unwrap_err();
    assert!(
        matches!(err, RepoError::Locked { .. }) && err.is_retryable(),
        "{err}"
    );
    drop(lock);
    repo.forget(&other.id).unwrap();
}
