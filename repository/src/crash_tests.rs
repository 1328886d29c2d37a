//! Crash simulation: a session stopped at every step of its life leaves the repository valid.
//!
//! A simulated crash drops the session's file handles (so the kernel releases its locks, as it would for a
//! killed process) but leaves its scratch directory and everything already renamed into place.

use std::collections::HashSet;

use crate::session::CrashPoint;
use crate::*;

const CHUNK: usize = 64 * 1024;

fn chunk(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK);
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut xof = h.finalize_xof();
    out.resize(CHUNK, 0);
    xof.fill(&mut out);
    out
}

fn digest(data: &[u8]) -> Digest {
    Digest(*blake3::hash(data).as_bytes())
}

/// A session with one disk of `seeds.len()` chunks; chunks not yet in the repository go through `writer`.
fn start(repo: &Repository, seeds: &[u64]) -> (BackupSession, PackWriter) {
    let session = repo.begin_backup("vm").unwrap();
    let mut writer = session.pack_writer();
    let disk = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: (seeds.len() * CHUNK) as u64,
            chunk_size: CHUNK as u32,
            location: "test".into(),
            cbt: None,
        })
        .unwrap();
    let mut seen = HashSet::new();
    for (i, &s) in seeds.iter().enumerate() {
        let data = chunk(s);
        let d = digest(&data);
        if repo.lookup(&d).unwrap().is_none() && seen.insert(d) {
            writer.add(d, Codec::None, CHUNK as u32, &data).unwrap();
        }
        session
            .set_chunk(disk, i as u64, ChunkRef::Data(d))
            .unwrap();
    }
    (session, writer)
}

fn restores(repo: &Repository, id: &str, seeds: &[u64]) {
    let snap = repo.open_snapshot(id).unwrap();
    let got: Vec<ChunkRef> = snap.chunks(0).collect::<Result<_>>().unwrap();
    assert_eq!(got.len(), seeds.len());
    for (r, &s) in got.iter().zip(seeds) {
        let ChunkRef::Data(d) = r else {
            panic!("zero chunk")
        };
        assert_eq!(repo.load_chunk(d).unwrap(), chunk(s));
    }
}

fn scratch_dirs(repo: &Repository) -> usize {
    std::fs::read_dir(repo.path().join("tmp")).unwrap().count()
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Killed while a pack writer had an unfinished pack open (after some packs were complete).
    MidPack,
    Commit(CrashPoint),
}

#[test]
fn a_crash_at_any_step_leaves_earlier_snapshots_readable_and_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init_with(
        dir.path(),
        &InitOptions {
            chunk_size: CHUNK as u32,
            pack_target_size: 128 * 1024,
        },
    )
    .unwrap();
    let base_seeds: Vec<u64> = (0..6).collect();
    let (session, writer) = start(&repo, &base_seeds);
    writer.finish().unwrap();
    let base = session.commit(None).unwrap();

    let stops = [
        Stop::MidPack,
        Stop::Commit(CrashPoint::BeforeIndex),
        Stop::Commit(CrashPoint::AfterIndex),
        Stop::Commit(CrashPoint::BeforeManifestRename),
    ];
    for (n, stop) in stops.into_iter().enumerate() {
        // Half the chunks are the base's, five are new: three packs of two, one pack left open.
        let mut seeds: Vec<u64> = (0..3).collect();
        seeds.extend((0..5).map(|i| 100 * (n as u64 + 1) + i));
        let (session, writer) = start(&repo, &seeds);
        match stop {
            Stop::MidPack => {
                writer.crash();
                session.crash();
            }
            Stop::Commit(point) => {
                writer.finish().unwrap();
                assert!(session.commit_crashing(point).is_err());
            }
        }
        let reopened = Repository::open(dir.path()).unwrap();
        for r in [&repo, &reopened] {
            let ids: Vec<_> = r
                .list_snapshots()
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect();
            assert_eq!(
                ids,
                std::slice::from_ref(&base.id),
                "{stop:?}: no snapshot appears before the manifest is in place"
            );
            restores(r, &base.id, &base_seeds);
            let report = r.verify(true).unwrap();
            assert!(report.is_ok(), "{stop:?}: {report:#?}");
        }
        assert_eq!(
            scratch_dirs(&repo),
            1,
            "{stop:?}: the killed session's scratch stays until cleaned"
        );
        assert_eq!(repo.remove_stale_scratch().unwrap(), 1);
        assert_eq!(scratch_dirs(&repo), 0);
        let written = matches!(
            stop,
            Stop::Commit(CrashPoint::AfterIndex | CrashPoint::BeforeManifestRename)
        );
        let orphan = digest(&chunk(100 * (n as u64 + 1)));
        assert_eq!(
            reopened.lookup(&orphan).unwrap().is_some(),
            written,
            "{stop:?}: index of the crashed session"
        );
    }

    // The repository keeps working: a new backup commits, reusing whatever the crashed sessions indexed.
    let seeds: Vec<u64> = (0..3).chain(300..305).collect();
    let (session, writer) = start(&repo, &seeds);
    assert_eq!(
        writer.bytes_written(),
        0,
        "chunks of the crashed-after-index session are dedup targets"
    );
    writer.finish().unwrap();
    let next = session.commit(None).unwrap();
    restores(&repo, &next.id, &seeds);
    restores(&repo, &base.id, &base_seeds);
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    assert!(
        report.unreferenced_packs >= 2,
        "packs of the sessions killed before their index: {report:#?}"
    );
}

#[test]
fn a_session_does_not_commit_chunks_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path(), CHUNK as u32).unwrap();
    let (session, writer) = start(&repo, &[1, 2]);
    let still_open = session.pack_writer();
    writer.finish().unwrap();
    drop(still_open); // never used: nothing lost
    let (session2, writer2) = start(&repo, &[3, 4]);
    drop(writer2); // holds chunks 3 and 4 in its open pack
    assert!(matches!(
        session2.commit(None),
        Err(RepoError::SessionFailed { .. })
    ));
    let open = session.pack_writer();
    let err = session.commit(None);
    drop(open);
    assert!(
        matches!(err, Err(RepoError::SessionFailed { .. })),
        "a writer was still open: {err:?}"
    );
    assert!(repo.list_snapshots().unwrap().is_empty());
    assert!(repo.verify(true).unwrap().is_ok());
}
