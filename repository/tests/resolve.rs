//! `Repository::resolve_snapshot`: whole ids, unique prefixes, `latest` per VM, and the errors that list what
//! the person may have meant.

mod common;

use backflow_repository::{RepoError, Repository};
use common::*;

/// The shortest prefix of `id` that no other id of `ids` starts with.
fn shortest_unique_prefix(id: &str, ids: &[String]) -> String {
    (1..=id.len())
        .map(|n| &id[..n])
        .find(|p| ids.iter().filter(|other| other.starts_with(p)).count() == 1)
        .unwrap()
        .to_owned()
}

fn three_snapshots(repo: &Repository) -> (String, String, String) {
    let data = image(1, "rz", 10);
    let web1 = backup(repo, "web", &[("vda", &data)]).id;
    let db = backup(repo, "db", &[("vda", &data)]).id;
    let web2 = backup(repo, "web", &[("vda", &data)]).id;
    (web1, db, web2)
}

#[test]
fn whole_ids_prefixes_and_latest_per_vm() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let (web1, db, web2) = three_snapshots(&repo);
    let ids = vec![web1.clone(), db.clone(), web2.clone()];
    for id in &ids {
        assert_eq!(&repo.resolve_snapshot(id, None).unwrap(), id);
        let short = shortest_unique_prefix(id, &ids);
        assert_eq!(&repo.resolve_snapshot(&short, None).unwrap(), id, "{short}");
        assert_eq!(repo.open_snapshot(&short).unwrap().id(), id);
    }
    assert_eq!(repo.resolve_snapshot("latest", Some("web")).unwrap(), web2);
    assert_eq!(repo.resolve_snapshot("latest", Some("db")).unwrap(), db);
    // A VM narrows a prefix: the date part names all three, only one of them is db's.
    assert_eq!(repo.resolve_snapshot(&db[..8], Some("db")).unwrap(), db);
}

#[test]
fn ambiguity_and_unknown_names_are_errors_that_say_what_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let (web1, db, web2) = three_snapshots(&repo);

    // Every id starts with the date: an error listing all three with their VM and time.
    match repo.resolve_snapshot(&web1[..8], None) {
        Err(e @ RepoError::AmbiguousSnapshot { .. }) => {
            let message = e.to_string();
            for (id, vm) in [(&web1, "web"), (&db, "db"), (&web2, "web")] {
                assert!(message.contains(&format!("{id} (vm {vm}, 20")), "{message}");
            }
            assert!(!message.contains('\n'), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Two VMs: `latest` alone is a question, not a guess.
    match repo.resolve_snapshot("latest", None) {
        Err(e @ RepoError::LatestNeedsVm { .. }) => {
            assert!(e.to_string().contains("(db, web)"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    match repo.resolve_snapshot("latest", Some("mail")) {
        Err(e @ RepoError::NoSnapshotOfVm { .. }) => {
            assert!(e.to_string().contains("VMs with snapshots: db, web"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // An id of another VM is not that VM's.
    assert!(matches!(
        repo.resolve_snapshot(&db, Some("web")),
        Err(RepoError::NoSnapshotOfVm { .. })
    ));
    for unknown in ["19990101", "", "../config", "nope"] {
        match repo.resolve_snapshot(unknown, None) {
            Err(RepoError::SnapshotNotFound { id, .. }) => assert_eq!(id, unknown),
            other => panic!("{unknown:?}: {other:?}"),
        }
    }
}

#[test]
fn latest_alone_is_the_newest_when_there_is_one_vm_and_damaged_manifests_are_reachable_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let data = image(2, "r", 4);
    let first = backup(&repo, "web", &[("vda", &data)]).id;
    let second = backup(&repo, "web", &[("vda", &data)]).id;
    assert_eq!(repo.resolve_snapshot("latest", None).unwrap(), second);
    // A damaged newest manifest is never `latest`, but its id still names it (for `forget`).
    let path = dir.path().join("snapshots").join(format!("{second}.snap"));
    std::fs::write(&path, b"not a manifest").unwrap();
    assert_eq!(repo.resolve_snapshot("latest", None).unwrap(), first);
    assert_eq!(repo.resolve_snapshot(&second, None).unwrap(), second);
    assert!(matches!(
        repo.resolve_snapshot(&second, Some("web")),
        Err(RepoError::NoSnapshotOfVm { .. })
    ));
}
