//! Damage marks through the public API: verify marks a damaged copy, lookups skip it, storing the chunk
//! again heals every snapshot that references it, and verify then calls the old copy healed.

mod common;

use backflow_repository::{ChunkRef, DamagedCopy};
use common::*;

#[test]
fn a_marked_copy_is_skipped_and_a_new_copy_heals_the_old_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let data = image(5, "rtrzat", 100);
    let first = backup(&repo, "web", &[("vda", &data)]);
    let snap = repo.open_snapshot(&first.id).unwrap();
    let ChunkRef::Data(victim) = snap.chunk(0, 1).unwrap() else {
        panic!("chunk 1 is data")
    };
    let old = repo.lookup(&victim).unwrap().unwrap();

    // One flipped byte in the middle of the blob.
    let at = (old.offset + u64::from(old.stored_len) / 2) as usize;
    modify(&pack_file(repo.path(), &old.pack), |b| b[at] = !b[at]);

    let report = repo.verify_and_mark(true).unwrap();
    assert!(!report.is_ok());
    assert_eq!((report.marked, report.new_marks), (1, 1), "{report:#?}");
    assert_eq!(
        report.problems[0].snapshots,
        std::slice::from_ref(&first.id)
    );
    assert!(!report.problems[0].healed);
    let marks = repo.damage_marks().unwrap();
    assert_eq!(
        marks.copies(),
        [DamagedCopy {
            digest: victim,
            pack: old.pack,
            offset: old.offset
        }]
    );
    // The only copy is marked: lookups miss it, so a backup stores it again.
    assert_eq!(repo.lookup(&victim).unwrap(), None);
    assert_eq!(repo.check_parent(&snap, 0, 100).unwrap().unreadable, [1]);
    // Without reading data, verify still says what is wrong with it.
    let quick = repo.verify(false).unwrap();
    assert!(!quick.is_ok());
    assert!(
        quick.problems.iter().any(
            |p| p.digest == victim && p.kind == backflow_repository::ProblemKind::MarkedDamaged
        ),
        "{quick:#?}"
    );

    let second = backup(&repo, "web", &[("vda", &data)]);
    let new = repo.lookup(&victim).unwrap().expect("stored again");
    assert_ne!((new.pack, new.offset), (old.pack, old.offset));
    assert_eq!(repo.check_parent(&snap, 0, 100).unwrap().count, 0);
    // Both snapshots restore, the old one from the new copy.
    for id in [&first.id, &second.id] {
        assert_eq!(restore(&repo, &repo.open_snapshot(id).unwrap(), 0), data);
    }
    let report = repo.verify_and_mark(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!(report.problems.len(), 1);
    assert!(report.problems[0].healed && report.problems[0].snapshots.is_empty());
    assert_eq!((report.marked, report.new_marks), (1, 0));
}

/// Two copies of one chunk in one index file (two writers stored it; or a later backup stored it again and
/// gc merged the index files), the first marked damaged: lookups, restores and verify all take the healthy
/// second copy (one rule: the first healthy copy wins).
#[test]
fn the_first_healthy_copy_in_a_file_wins_for_lookups_restores_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let data = image(6, "r", 0);
    let digest = backflow_repository::Digest(*blake3::hash(&data).as_bytes());
    let session = repo.begin_backup("web").unwrap();
    let disk = session.add_disk(disk_meta("vda", data.len())).unwrap();
    for _ in 0..2 {
        let mut w = session.pack_writer();
        w.add(digest, backflow_repository::Codec::None, CHUNK, &data)
            .unwrap();
        w.finish().unwrap();
    }
    session.set_chunk(disk, 0, ChunkRef::Data(digest)).unwrap();
    let snap = session.commit(None).unwrap();
    let first = repo.lookup(&digest).unwrap().unwrap();
    // Damage the first copy and mark it, as verify would.
    let at = first.offset as usize + 100;
    modify(&pack_file(repo.path(), &first.pack), |b| {
        b[at..at + 16].fill(0xff)
    });
    let report = repo.verify_and_mark(true).unwrap();
    assert_eq!(report.new_marks, 1, "{report:#?}");
    assert!(report.is_ok(), "the other copy heals it: {report:#?}");
    assert!(report.problems.iter().all(|p| p.healed));

    let second = repo.lookup(&digest).unwrap().expect("the healthy copy");
    assert_ne!((second.pack, second.offset), (first.pack, first.offset));
    assert_eq!(repo.locate(&digest).unwrap(), Some(second));
    assert_eq!(repo.load_chunk(&digest).unwrap(), data);
    assert_eq!(
        restore(&repo, &repo.open_snapshot(&snap.id).unwrap(), 0),
        data
    );
    let snap = repo.open_snapshot(&snap.id).unwrap();
    assert_eq!(repo.check_parent(&snap, 0, 100).unwrap().count, 0);
}
