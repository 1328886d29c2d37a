//! Damaged files: verify names what is damaged and who uses it; readers return errors, never panic or lie.

mod common;

use std::path::PathBuf;

use backflow_repository::{ChunkRef, Digest, ProblemKind, RepoError, Repository, SnapshotInfo};
use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: Repository,
    first: SnapshotInfo,
    second: SnapshotInfo,
    data: Vec<u8>,
}

/// Two snapshots of two VMs sharing the chunks of disk `data`; the second has one more chunk of its own.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let repo = init(&root);
    let data = image(40, "rtrtrzr", 100);
    let first = backup(&repo, "one", &[("vda", &data)]);
    let extra = image(41, "r", 0);
    let second = backup(&repo, "two", &[("vda", &data), ("vdb", &extra)]);
    Fixture {
        _dir: dir,
        root,
        repo,
        first,
        second,
        data,
    }
}

fn first_data_digest(f: &Fixture) -> Digest {
    Digest(*blake3::hash(&f.data[..CHUNK_USIZE]).as_bytes())
}

fn pack_of(f: &Fixture, d: &Digest) -> (PathBuf, u64) {
    let loc = f.repo.lookup(d).unwrap().unwrap();
    (pack_file(&f.root, &loc.pack), loc.offset)
}

#[test]
fn a_flipped_byte_in_a_pack_is_found_by_reading_data_and_names_its_snapshots() {
    let f = fixture();
    let victim = first_data_digest(&f);
    let (pack, offset) = pack_of(&f, &victim);
    modify(&pack, |b| b[offset as usize + 100] ^= 0x40);

    let quick = f.repo.verify(false).unwrap();
    assert!(
        quick.is_ok(),
        "structure is intact, data is not read: {quick:#?}"
    );

    let full = f.repo.verify(true).unwrap();
    assert!(!full.is_ok());
    assert_eq!(full.problems.len(), 1, "{full:#?}");
    let p = &full.problems[0];
    assert_eq!(p.digest, victim);
    assert!(
        matches!(
            p.kind,
            ProblemKind::DigestMismatch | ProblemKind::DecodeFailed
        ),
        "{p:?}"
    );
    assert_eq!(p.offset, Some(offset));
    assert_eq!(p.snapshots, [f.first.id.clone(), f.second.id.clone()]);
    let json = serde_json::to_value(&full).unwrap();
    assert_eq!(json["problems"][0]["digest"], victim.to_hex());

    // Reading that chunk for a restore fails loudly.
    assert!(f.repo.load_chunk(&victim).is_err());
}

#[test]
fn a_truncated_pack_is_an_error_for_readers_and_verify() {
    let f = fixture();
    let victim = first_data_digest(&f);
    let (pack, offset) = pack_of(&f, &victim);
    let loc = f.repo.lookup(&victim).unwrap().unwrap();
    modify(&pack, |b| b.truncate(offset as usize + 10));

    let fresh = Repository::open(&f.root).unwrap();
    let err = fresh.read_chunk(&loc).unwrap_err();
    assert!(
        matches!(err, RepoError::Corrupt { .. }) && !err.is_retryable(),
        "{err}"
    );
    assert!(
        err.to_string().contains(&loc.pack.to_hex()),
        "names the pack: {err}"
    );

    let report = fresh.verify(false).unwrap();
    assert_eq!(report.damaged_packs.len(), 1, "{report:#?}");
    let p = report
        .problems
        .iter()
        .find(|p| p.digest == victim)
        .expect("victim reported");
    assert_eq!(p.kind, ProblemKind::PackTruncated);
    assert_eq!(p.snapshots, [f.first.id.clone(), f.second.id.clone()]);
    // Missing entirely.
    std::fs::remove_file(&pack).unwrap();
    let report = fresh.verify(false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.digest == victim && p.kind == ProblemKind::PackMissing)
    );
    assert!(fresh.read_chunk(&loc).is_err());
}

#[test]
fn a_damaged_index_is_reported_restores_from_pack_trailers_and_is_rebuilt() {
    let f = fixture();
    let victim = first_data_digest(&f);
    for idx in files(&f.root, "index", "idx") {
        modify(&idx, |b| b.truncate(b.len() - 1));
    }
    let fresh = Repository::open(&f.root).unwrap();
    assert_eq!(
        fresh.lookup(&victim).unwrap(),
        None,
        "damaged index files are skipped by lookups (deduplication)"
    );
    // Restores find every chunk in the packs' trailers, and say how to make that fast again.
    let snap = fresh.open_snapshot(&f.second.id).unwrap();
    let plain = fresh.load_chunk(&victim).unwrap();
    assert_eq!(blake3::hash(&plain).as_bytes(), victim.as_bytes());
    assert!(fresh.locate(&victim).unwrap().is_some());
    assert!(
        fresh
            .recovery_notice()
            .is_some_and(|n| n.contains("rebuild-index")),
        "{:?}",
        fresh.recovery_notice()
    );
    let report = fresh.verify(false).unwrap();
    assert_eq!(report.damaged_index_files.len(), 2, "{report:#?}");
    assert!(report.problems.is_empty(), "{report:#?}");
    assert!(report.unrestorable_snapshots.is_empty());
    assert!(
        report.unindexed_chunks > 0 && !report.is_ok(),
        "{report:#?}"
    );

    fresh.rebuild_index().unwrap();
    let report = fresh.verify(true).unwrap();
    assert!(
        report.is_ok() && report.unindexed_chunks == 0,
        "{report:#?}"
    );
    assert_eq!(restore(&fresh, &snap, 0), f.data);
}

#[test]
fn a_damaged_manifest_is_an_error_and_leaves_the_others_listed() {
    let f = fixture();
    let path = f
        .root
        .join("snapshots")
        .join(format!("{}.snap", f.first.id));
    let good = std::fs::read(&path).unwrap();
    // A flipped bit in the chunk table: only the checksum can tell.
    let mut bad = good.clone();
    let at = bad.len() - 40;
    bad[at] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let err = f.repo.open_snapshot(&f.first.id).unwrap_err();
    assert!(
        matches!(err, RepoError::Corrupt { .. }) && err.to_string().contains("checksum"),
        "{err}"
    );
    let report = f.repo.verify(false).unwrap();
    assert_eq!(report.damaged_snapshots.len(), 1);
    assert!(report.damaged_snapshots[0].path.contains(&f.first.id));
    assert!(report.problems.is_empty());

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        f.repo.open_snapshot(&f.first.id),
        Err(RepoError::Corrupt { .. })
    ));
    let listed: Vec<_> = f
        .repo
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        listed,
        std::slice::from_ref(&f.second.id),
        "an unreadable manifest does not hide the others"
    );
    assert_eq!(
        f.repo.open_snapshot("latest").unwrap().info().id,
        f.second.id
    );
}

/// Every prefix length class and many single-bit flips of every file kind: readers and verify return, never
/// panic, and never hand out wrong data silently.
#[test]
fn truncation_and_bit_flips_anywhere_never_panic() {
    let f = fixture();
    let mut targets = files(&f.root, "packs", "pack");
    targets.extend(files(&f.root, "index", "idx"));
    targets.extend(files(&f.root, "snapshots", "snap"));
    let mut rng = Rng(7);
    for path in targets {
        let good = std::fs::read(&path).unwrap();
        let mut variants: Vec<Vec<u8>> = Vec::new();
        for cut in [
            0,
            1,
            8,
            31,
            32,
            33,
            64,
            good.len() / 3,
            good.len() - 65,
            good.len() - 33,
            good.len() - 1,
        ] {
            variants.push(good[..cut.min(good.len())].to_vec());
        }
        for _ in 0..12 {
            let mut v = good.clone();
            let pos = rng.next() as usize % v.len();
            v[pos] ^= 1 << (rng.next() % 8);
            variants.push(v);
        }
        let mut grown = good.clone();
        grown.extend_from_slice(&[0; 7]);
        variants.push(grown);
        for v in variants {
            std::fs::write(&path, &v).unwrap();
            let repo = Repository::open(&f.root).unwrap();
            let _ = repo.list_snapshots();
            for id in [&f.first.id, &f.second.id] {
                if let Ok(snap) = repo.open_snapshot(id) {
                    for disk in 0..snap.meta().disks.len() {
                        for r in snap.chunks(disk) {
                            let Ok(ChunkRef::Data(d)) = r else { continue };
                            // Whatever is returned as plaintext must be the right plaintext.
                            if let Ok(plain) = repo.load_chunk(&d) {
                                assert_eq!(blake3::hash(&plain).as_bytes(), d.as_bytes());
                            }
                            if let Ok(Some(loc)) = repo.lookup(&d) {
                                let _ = repo.read_chunk(&loc);
                            }
                        }
                    }
                }
            }
            // Every byte of every file is covered by a checksum, a digest or a length check.
            let report = repo.verify(true).unwrap();
            assert!(!report.is_ok(), "damage to {} not found", path.display());
        }
        std::fs::write(&path, &good).unwrap();
    }
    assert!(f.repo.verify(true).unwrap().is_ok());
}

/// Restores that need the pack trailers (a damaged index file) and index reloads (what a restore does when
/// a gc moved a chunk) from several threads of one handle at once: each of the many interleavings ends.
/// Building the recovery index reads the index set while holding its slot; a reload once held the set and
/// waited for the slot, and two restore workers could wait for each other forever.
#[test]
fn recovery_and_index_reloads_from_many_threads_never_deadlock() {
    let f = fixture();
    let victim = first_data_digest(&f);
    for idx in files(&f.root, "index", "idx") {
        modify(&idx, |b| b.truncate(b.len() - 1));
    }
    let repo = Repository::open(&f.root).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (repo, done) = (repo.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..100 {
                repo.reload_index().unwrap();
                assert_eq!(
                    blake3::hash(&repo.load_chunk(&victim).unwrap()).as_bytes(),
                    victim.as_bytes()
                );
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..4 {
        finished
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a thread is stuck: restores and reloads deadlocked");
    }
}
