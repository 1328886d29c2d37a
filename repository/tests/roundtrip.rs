//! Backups and restores through the public API: dedup, zero and partial chunks, several disks, incrementals.

mod common;

use std::collections::HashSet;

use backflow_repository::{ChunkRef, Digest, RepoError, Repository, read_pack_trailer};
use common::*;

#[test]
fn sessions_round_trip_with_dedup_zero_chunks_and_partial_last_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let vda = image(1, "rrtzzrarattz", 1000);
    let vdb = image(2, "tzr", 5);
    let first = backup(&repo, "web", &[("vda", &vda), ("vdb", &vdb)]);
    assert_eq!(first.vm, "web");
    assert_eq!(first.disks.len(), 2);
    assert_eq!(first.disks[0].size, vda.len() as u64);

    let snap = repo.open_snapshot(&first.id).unwrap();
    assert_eq!(snap.meta().disks[0].chunk_count(), 13);
    assert_eq!(snap.chunk(0, 3).unwrap(), ChunkRef::Zero);
    assert_eq!(
        snap.chunk(0, 6).unwrap(),
        snap.chunk(0, 8).unwrap(),
        "repeated chunk has one digest"
    );
    assert_eq!(restore(&repo, &snap, 0), vda);
    assert_eq!(restore(&repo, &snap, 1), vdb);
    assert_eq!(
        snap.meta().domain_xml.as_deref(),
        Some("<domain><name>web</name></domain>")
    );
    assert_eq!(snap.disk_index("vdb"), Some(1));
    assert_eq!(snap.disk_index("vdc"), None);

    // A second VM whose disk shares most chunks with the first: only new chunks are written.
    let mut other = vda.clone();
    Rng(77).fill(&mut other[CHUNK_USIZE * 2..CHUNK_USIZE * 3]);
    let session = repo.begin_backup("db").unwrap();
    let mut writer = session.pack_writer();
    let d = session.add_disk(disk_meta("vda", other.len())).unwrap();
    write_disk(&repo, &session, &mut writer, &mut HashSet::new(), d, &other);
    let written = writer.bytes_written();
    writer.finish().unwrap();
    let second = session.commit(None).unwrap();
    assert!(
        written < 2 * CHUNK as u64,
        "only the changed chunk is stored, wrote {written} bytes"
    );
    let snap2 = repo.open_snapshot(&second.id).unwrap();
    assert_eq!(restore(&repo, &snap2, 0), other);
    assert_eq!(
        restore(&repo, &repo.open_snapshot(&first.id).unwrap(), 0),
        vda,
        "older snapshot unchanged"
    );

    let list = repo.list_snapshots().unwrap();
    assert_eq!(
        list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [first.id.as_str(), second.id.as_str()]
    );
    // Two VMs: `latest` alone names neither (resolve.rs has the rules).
    assert!(matches!(
        repo.open_snapshot("latest"),
        Err(RepoError::LatestNeedsVm { .. })
    ));
    assert_eq!(
        repo.latest_snapshot("web").unwrap().unwrap().info().id,
        first.id
    );
    assert!(repo.latest_snapshot("mail").unwrap().is_none());
    let json = serde_json::to_value(&list).unwrap();
    assert_eq!(json[0]["vm"], "web");
    assert!(json[0]["time_utc"].as_str().unwrap().ends_with('Z'));

    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!(report.snapshots, 2);
    assert!(report.packs >= 2 && report.chunks_read > 0);
}

#[test]
fn incremental_references_parent_chunks_and_keeps_cbt_state() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let base = image(3, "rrrrrrrrrr", 0);
    let full = backup(&repo, "vm", &[("vda", &base)]);
    let parent = repo.latest_snapshot("vm").unwrap().unwrap();
    assert_eq!(parent.info().id, full.id);

    // Chunks 4 and 5 changed; everything else is taken from the parent without reading or looking up.
    let mut changed = base.clone();
    Rng(5).fill(&mut changed[4 * CHUNK_USIZE..6 * CHUNK_USIZE]);
    let session = repo.begin_backup("vm").unwrap();
    let d = session.add_disk(disk_meta("vda", changed.len())).unwrap();
    session.copy_chunks(d, &parent, 0, 0, 4).unwrap();
    session.copy_chunks(d, &parent, 0, 6, 4).unwrap();
    let mut writer = session.pack_writer();
    let mut refs = Vec::new();
    for i in 4..6 {
        let chunk = &changed[i * CHUNK_USIZE..(i + 1) * CHUNK_USIZE];
        let digest = Digest(*blake3::hash(chunk).as_bytes());
        let (codec, stored) = encode(chunk);
        writer.add(digest, codec, CHUNK, &stored).unwrap();
        refs.push(ChunkRef::Data(digest));
    }
    session.set_chunks(d, 4, &refs).unwrap();
    session
        .set_cbt(
            d,
            serde_json::json!({"checkpoint": "backflow-2", "size": changed.len()}),
        )
        .unwrap();
    assert!(
        session.copy_chunks(d, &parent, 0, 8, 3).is_err(),
        "range past the end is refused"
    );
    writer.finish().unwrap();
    let inc = session.commit(None).unwrap();

    let snap = repo.open_snapshot(&inc.id).unwrap();
    assert_eq!(restore(&repo, &snap, 0), changed);
    assert_eq!(
        snap.meta().disks[0].cbt.as_ref().unwrap()["checkpoint"],
        "backflow-2"
    );
    assert_eq!(restore(&repo, &parent, 0), base);
    assert_eq!(
        repo.latest_snapshot("vm").unwrap().unwrap().info().id,
        inc.id
    );
    assert!(repo.verify(false).unwrap().is_ok());
}

#[test]
fn empty_and_unwritten_disks_restore_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let session = repo.begin_backup("vm").unwrap();
    session.add_disk(disk_meta("empty", 0)).unwrap();
    let sparse = session
        .add_disk(disk_meta("sparse", 5 * CHUNK_USIZE + 7))
        .unwrap();
    assert!(
        session.add_disk(disk_meta("sparse", 1)).is_err(),
        "duplicate disk name"
    );
    assert!(
        session.set_chunk(sparse, 6, ChunkRef::Zero).is_err(),
        "index past the end"
    );
    assert!(
        session
            .set_chunk(sparse, 0, ChunkRef::Data(Digest([0; 32])))
            .is_err(),
        "reserved digest"
    );
    assert!(
        session.set_chunk(7, 0, ChunkRef::Zero).is_err(),
        "no such disk"
    );
    let info = session.commit(None).unwrap();
    let snap = repo.open_snapshot(&info.id).unwrap();
    assert_eq!(restore(&repo, &snap, 0), Vec::<u8>::new());
    assert_eq!(restore(&repo, &snap, 1), vec![0u8; 5 * CHUNK_USIZE + 7]);
    assert!(matches!(
        snap.chunk(1, 6),
        Err(RepoError::InvalidArgument(_))
    ));
    assert!(matches!(
        snap.chunk(2, 0),
        Err(RepoError::InvalidArgument(_))
    ));
    assert!(snap.chunks(5).next().unwrap().is_err());
    assert!(repo.verify(true).unwrap().is_ok());
}

#[test]
fn init_and_open_refuse_what_is_not_theirs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    assert!(matches!(
        Repository::init(dir.path(), CHUNK),
        Err(RepoError::InitRefused { .. })
    ));
    assert!(matches!(
        Repository::open(dir.path()),
        Err(RepoError::NotARepository { .. })
    ));
    let repo_dir = dir.path().join("repo");
    assert!(
        Repository::init(&repo_dir, 100_000).is_err(),
        "chunk size not a multiple of 64 KiB"
    );
    let repo = Repository::init(&repo_dir, CHUNK).unwrap();
    assert_eq!(repo.chunk_size(), CHUNK);
    assert!(matches!(
        Repository::init(&repo_dir, CHUNK),
        Err(RepoError::InitRefused { .. })
    ));
    assert_eq!(
        Repository::open(&repo_dir).unwrap().config().id,
        repo.config().id
    );
    assert!(matches!(
        repo.open_snapshot("20260101T000000Z-000000"),
        Err(RepoError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        repo.open_snapshot("../config"),
        Err(RepoError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        repo.open_snapshot("latest"),
        Err(RepoError::SnapshotNotFound { .. })
    ));
    assert!(repo.list_snapshots().unwrap().is_empty());
    assert!(repo.verify(true).unwrap().is_ok());
}

#[test]
fn index_rebuilt_from_packs_alone_gives_the_same_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let a = image(10, "rrtrtrrzt", 300);
    let b = image(11, "trrrr", 0);
    backup(&repo, "a", &[("vda", &a)]);
    backup(&repo, "b", &[("vda", &b), ("vdb", &a)]);

    let mut digests = Vec::new();
    for info in repo.list_snapshots().unwrap() {
        let snap = repo.open_snapshot(&info.id).unwrap();
        for disk in 0..snap.meta().disks.len() {
            for r in snap.chunks(disk) {
                if let ChunkRef::Data(d) = r.unwrap() {
                    digests.push(d);
                }
            }
        }
    }
    let before: Vec<_> = digests
        .iter()
        .map(|d| repo.lookup(d).unwrap().unwrap())
        .collect();

    // Every pack's trailer lists exactly what the index says is in it.
    let mut from_trailers = 0;
    for id in repo.list_packs().unwrap() {
        let t = read_pack_trailer(
            &dir.path()
                .join("packs")
                .join(&id.to_hex()[..2])
                .join(format!("{id}.pack")),
        )
        .unwrap();
        assert_eq!(t.id, id);
        for e in &t.entries {
            let loc = repo.lookup(&e.digest).unwrap().unwrap();
            assert_eq!(
                (loc.pack, loc.offset, loc.stored_len, loc.raw_len, loc.codec),
                (id, e.offset, e.stored_len, e.raw_len, e.codec)
            );
            from_trailers += 1;
        }
    }
    assert!(from_trailers > 5);

    for f in files(dir.path(), "index", "idx") {
        std::fs::remove_file(f).unwrap();
    }
    let fresh = Repository::open(dir.path()).unwrap();
    assert!(
        fresh.lookup(&digests[0]).unwrap().is_none(),
        "no index, no lookups"
    );
    let report = fresh.rebuild_index().unwrap();
    assert_eq!(report.chunks, from_trailers);
    assert!(report.damaged_packs.is_empty());
    let after: Vec<_> = digests
        .iter()
        .map(|d| fresh.lookup(d).unwrap().unwrap())
        .collect();
    assert_eq!(before, after);
    assert_eq!(files(dir.path(), "index", "idx").len(), 1);
    assert!(fresh.verify(true).unwrap().is_ok());
    // A handle opened before the rebuild sees the new index after a refresh.
    repo.refresh().unwrap();
    assert_eq!(
        digests
            .iter()
            .map(|d| repo.lookup(d).unwrap().unwrap())
            .collect::<Vec<_>>(),
        before
    );
}

#[test]
fn load_chunk_returns_verified_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path());
    let data = image(4, "tr", 0);
    backup(&repo, "vm", &[("vda", &data)]);
    let d = Digest(*blake3::hash(&data[..CHUNK_USIZE]).as_bytes());
    assert_eq!(repo.load_chunk(&d).unwrap(), &data[..CHUNK_USIZE]);
    assert!(repo.load_chunk(&Digest([1; 32])).is_err());
}
