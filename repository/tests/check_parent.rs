//! `Repository::check_parent`: the chunks of a parent snapshot that a backup must not take over are exactly
//! those without a healthy copy in the index (marked damaged, dropped from the index, in a lost index file
//! or a lost pack), found both by streaming an index file and by searching one.

mod common;

use backflow_repository::{
    ChunkProblem, ChunkRef, Codec, Digest, ParentCheck, ProblemKind, Repository, Snapshot,
};
use common::*;

/// A repository with `web`, a disk of 48 distinct chunks (its own index file, which `check_parent` streams:
/// as many records as digests asked), and `db`, a disk of 2 chunks committed with 1,500 other records
/// (an index file it searches: few digests against many records).
struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repository,
    web: Snapshot,
    db: Snapshot,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"));
    let web = backup(&repo, "web", &[("vda", &image(1, &"r".repeat(48), 0))]);
    let session = repo.begin_backup("db").unwrap();
    let data = image(2, "rr", 0);
    let disk = session.add_disk(disk_meta("vda", data.len())).unwrap();
    let mut writer = session.pack_writer();
    for i in 0..1500u32 {
        let filler = i.to_le_bytes().repeat(16);
        let digest = Digest(*blake3::hash(&filler).as_bytes());
        writer
            .add(digest, Codec::None, filler.len() as u32, &filler)
            .unwrap();
    }
    let mut seen = Default::default();
    write_disk(&repo, &session, &mut writer, &mut seen, disk, &data);
    writer.finish().unwrap();
    let db = session.commit(None).unwrap();
    Fixture {
        web: repo.open_snapshot(&web.id).unwrap(),
        db: repo.open_snapshot(&db.id).unwrap(),
        repo,
        _dir: dir,
    }
}

fn digest_at(snap: &Snapshot, index: u64) -> Digest {
    match snap.chunk(0, index).unwrap() {
        ChunkRef::Data(d) => d,
        ChunkRef::Zero => panic!("chunk {index} is zero"),
    }
}

fn check(f: &Fixture, snap: &Snapshot) -> ParentCheck {
    // A fresh handle, as a new backup would have.
    let repo = Repository::open(f.repo.path()).unwrap();
    repo.check_parent(snap, 0, 1000).unwrap()
}

fn lost(indexes: &[u64]) -> ParentCheck {
    ParentCheck {
        unreadable: indexes.to_vec(),
        count: indexes.len() as u64,
    }
}

fn mark(f: &Fixture, snap: &Snapshot, index: u64) {
    let d = digest_at(snap, index);
    let loc = f.repo.lookup(&d).unwrap().unwrap();
    f.repo
        .mark_damaged(&[ChunkProblem {
            digest: d,
            pack: Some(loc.pack),
            offset: Some(loc.offset),
            kind: ProblemKind::DigestMismatch,
            detail: String::new(),
            snapshots: Vec::new(),
            healed: false,
        }])
        .unwrap();
}

fn index_file_of(f: &Fixture, snap: &Snapshot) -> std::path::PathBuf {
    f.repo
        .path()
        .join("index")
        .join(format!("{}.idx", snap.info().id))
}

#[test]
fn a_healthy_parent_has_nothing_to_store_again() {
    let f = fixture();
    assert_eq!(check(&f, &f.web), ParentCheck::default());
    assert_eq!(check(&f, &f.db), ParentCheck::default());
}

#[test]
fn chunks_whose_only_copy_is_marked_are_listed() {
    let f = fixture();
    mark(&f, &f.web, 3);
    mark(&f, &f.web, 40);
    mark(&f, &f.db, 1);
    assert_eq!(check(&f, &f.web), lost(&[3, 40]));
    assert_eq!(check(&f, &f.db), lost(&[1]));
}

#[test]
fn a_lost_pack_or_index_file_lists_its_chunks() {
    let f = fixture();
    let victim = f.repo.lookup(&digest_at(&f.db, 0)).unwrap().unwrap().pack;
    std::fs::remove_file(pack_file(f.repo.path(), &victim)).unwrap();
    let listed = check(&f, &f.db);
    assert!(listed.unreadable.contains(&0), "{listed:?}");
    assert_eq!(check(&f, &f.web), ParentCheck::default());

    std::fs::remove_file(index_file_of(&f, &f.web)).unwrap();
    assert_eq!(check(&f, &f.web), lost(&(0..48).collect::<Vec<_>>()));
}

#[test]
fn an_index_file_that_cannot_be_opened_lists_its_chunks() {
    let f = fixture();
    modify(&index_file_of(&f, &f.web), |b| b[0] ^= 0xff);
    assert_eq!(check(&f, &f.web).count, 48);
    assert_eq!(check(&f, &f.db), ParentCheck::default());
}

#[test]
fn past_the_limit_the_count_says_there_are_more() {
    let f = fixture();
    std::fs::remove_file(index_file_of(&f, &f.web)).unwrap();
    let repo = Repository::open(f.repo.path()).unwrap();
    let c = repo.check_parent(&f.web, 0, 10).unwrap();
    assert_eq!(c.unreadable.len(), 10);
    assert!(c.count > 10, "{c:?}");
    // No scratch directory is left behind.
    assert_eq!(
        std::fs::read_dir(f.repo.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}
