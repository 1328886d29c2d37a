//! Crash simulation: a session stopped at every step of its life leaves the repository valid.
//!
//! A simulated crash drops the session's file handles (so the kernel releases its locks, as it would for a
//! killed process) but leaves its scratch directory and everything already renamed into place.

use std::collections::HashSet;

use crate::session::CrashPoint;
use crate::*;

pub(crate) const CHUNK: usize = 64 * 1024;

/// 64 KiB of pseudo-random bytes from `seed`.
pub(crate) fn chunk(seed: u64) -> Vec<u8> {
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
pub(crate) fn start(repo: &Repository, seeds: &[u64]) -> (BackupSession, PackWriter) {
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

/// The garbage collection's hardest case: a backup (the "stale" one) finds condemned chunks in the index it
/// had open, commits, and its snapshot is forgotten while the cycle is pending; a later backup, begun after
/// the chunks were condemned, copies the forgotten snapshot's references as its parent. The chunks must
/// survive, because the forgotten manifest waits in `gc/forgotten/` for the end of the cycle.
#[test]
fn gc_keeps_chunks_that_running_and_later_backups_took_from_a_forgotten_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // `admin` commits, forgets and collects; a gc never waits for its own handle.
    let admin = Repository::init(dir.path(), CHUNK as u32).unwrap();
    let first = commit(&admin, &[1, 2, 3]);
    commit(&admin, &[4, 5]);

    // A handle opened before the gc: its backup will use chunks 1-3 without storing them.
    let stale = Repository::open(dir.path()).unwrap();
    stale.lookup(&digest(&chunk(1))).unwrap();
    admin.forget(&first).unwrap();
    let pending = admin.gc(&GcOptions::default()).unwrap();
    assert!(pending.waiting_for.is_some(), "{pending:?}");
    assert_eq!(pending.chunks_removed, 3);

    // The stale backup still finds the condemned chunks in the index files it opened before.
    let (session, writer) = start(&stale, &[1, 2, 3, 6]);
    writer.finish().unwrap();
    let stale_id = session.commit(None).unwrap().id;
    // Its snapshot is opened as a parent by a backup that begins now, then forgotten.
    let later = Repository::open(dir.path()).unwrap();
    let parent = later.open_snapshot(&stale_id).unwrap();
    admin.forget(&stale_id).unwrap();
    assert!(
        dir.path()
            .join("gc/forgotten")
            .join(format!("{stale_id}.snap"))
            .exists()
    );
    let session = later.begin_backup("vm").unwrap();
    let disk = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: 4 * CHUNK as u64,
            chunk_size: CHUNK as u32,
            location: "test".into(),
            cbt: None,
        })
        .unwrap();
    session.copy_chunks(disk, &parent, 0, 0, 4).unwrap();
    // While the stale handle is open, the deletion still waits.
    assert!(
        admin
            .gc(&GcOptions::default())
            .unwrap()
            .waiting_for
            .is_some()
    );
    drop(stale);
    let finished = admin.gc(&GcOptions::default()).unwrap();
    let earlier = finished.earlier_cycle.expect("the pending cycle finished");
    assert_eq!(earlier.waiting_for, None);
    assert_eq!(earlier.chunks_kept_for_running_backups, 3);
    let later_id = session.commit(None).unwrap().id;
    restores(&later, &later_id, &[1, 2, 3, 6]);
    assert!(
        std::fs::read_dir(dir.path().join("gc/forgotten")).map_or(true, |mut d| d.next().is_none())
    );
    assert!(later.verify(true).unwrap().is_ok());
}

fn commit(repo: &Repository, seeds: &[u64]) -> String {
    let (session, writer) = start(repo, seeds);
    writer.finish().unwrap();
    session.commit(None).unwrap().id
}

/// Every index record a gc reads is checked: a flipped bit in an index file stops the gc before it changes
/// anything.
#[test]
fn gc_refuses_a_damaged_index_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path(), CHUNK as u32).unwrap();
    let first = commit(&repo, &[1, 2, 3]);
    commit(&repo, &[4]);
    repo.forget(&first).unwrap();
    let index = std::fs::read_dir(dir.path().join("index"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&index).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x10;
    std::fs::write(&index, &bytes).unwrap();
    let packs_before = repo.list_packs().unwrap();
    let err = repo.gc(&GcOptions::default()).unwrap_err().to_string();
    assert!(err.contains("stopped before changing anything"), "{err}");
    assert_eq!(repo.list_packs().unwrap(), packs_before);
    assert!(!dir.path().join("gc/state.json").exists());
}
