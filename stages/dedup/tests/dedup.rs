//! The deduplicator against a real repository and a real parent snapshot: what is known is
//! `Known`, what is new stays `Raw` with the BLAKE3 of its bytes, and each new chunk goes on once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    Chunk, ChunkRef, Digest, Disk, DiskSource, Message, OutcomeKind, ParentChunks, Payload,
    RunReport, SizeOnly, digest_of,
};
use backflow_planner::SnapshotParent;
use backflow_repository::{Codec, DiskMeta, Repository};
use bytes::Bytes;
use stage_dedup::{Dedup, DedupOptions};

const CHUNK: u32 = 64 * 1024;

/// Distinct, deterministic chunk contents.
fn content(seed: u64) -> Bytes {
    let mut out = vec![0u8; CHUNK as usize];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    Bytes::from(out)
}

/// Commits `chunks` as disk `vda` of `vm`; returns the snapshot id.
fn commit(repo: &Repository, vm: &str, chunks: &[Bytes]) -> String {
    let session = repo.begin_backup(vm).unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: chunks.len() as u64 * u64::from(CHUNK),
            chunk_size: CHUNK,
            location: "test".into(),
            cbt: None,
        })
        .unwrap();
    let mut packs = session.pack_writer();
    for (i, data) in chunks.iter().enumerate() {
        let digest = digest_of(data);
        packs
            .add(digest, Codec::None, data.len() as u32, data)
            .unwrap();
        session
            .set_chunk(slot, i as u64, ChunkRef::Data(digest))
            .unwrap();
    }
    packs.finish().unwrap();
    session.commit(None).unwrap().id
}

fn disk(vm: &str, chunks: u64, parent: Option<Arc<dyn ParentChunks>>) -> Arc<Disk> {
    Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: vm.into(),
            name: "vda".into(),
            location: PathBuf::from("test"),
            reader: Arc::new(SizeOnly(chunks * u64::from(CHUNK))),
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK,
        parent,
    })
}

fn chunk(disk: &Arc<Disk>, index: u64, payload: Payload) -> Message {
    Message::Chunk(Chunk {
        disk: disk.clone(),
        index,
        digest: None,
        verified: false,
        payload,
    })
}

fn run_dedup(
    lookup: bool,
    repo: Option<PathBuf>,
    workers: usize,
    input: Vec<Message>,
) -> (RunReport, HashMap<u64, Chunk>) {
    let dedup = Dedup::new(DedupOptions {
        repository_lookup: lookup,
    })
    .unwrap();
    let harness = Harness {
        workers,
        repository: repo.map(backflow_repository::Location::from),
        ..Harness::new(Arc::new(dedup))
    };
    let sent = input.len();
    let (report, out) = harness.run(input);
    let mut by_index = HashMap::new();
    if report.outcome == OutcomeKind::Succeeded {
        assert_eq!(out.len(), sent, "one message out per message in");
    }
    for m in out {
        let Message::Chunk(c) = m else {
            panic!("dedup emitted a {}", m.variant())
        };
        assert!(by_index.insert(c.index, c).is_none(), "index emitted twice");
    }
    (report, by_index)
}

#[test]
fn chunks_in_the_repository_are_known_and_new_ones_stay_raw_with_their_digest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path(), CHUNK).unwrap();
    let committed: Vec<Bytes> = (0..10).map(content).collect();
    commit(&repo, "other-vm", &committed);
    let known: HashSet<Digest> = committed.iter().map(|c| digest_of(c)).collect();

    // 20 data chunks: the committed ones at other indices than in the snapshot, interleaved with
    // new ones; then a zero run and an unchanged run that have nothing to hash.
    let d = disk("web01", 30, None);
    let mut expected = HashMap::new();
    let mut input = Vec::new();
    for i in 0..20u64 {
        let data = if i % 2 == 0 {
            committed[(9 - i / 2) as usize].clone()
        } else {
            content(1000 + i)
        };
        expected.insert(i, data.clone());
        input.push(chunk(&d, i, Payload::Raw(data)));
    }
    input.push(chunk(&d, 20, Payload::Zero { count: 5 }));
    input.push(chunk(&d, 25, Payload::Unchanged { count: 5 }));

    let (report, out) = run_dedup(true, Some(dir.path().to_owned()), 2, input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    for (i, data) in &expected {
        let c = &out[i];
        let digest = digest_of(data);
        assert_eq!(c.digest, Some(digest), "chunk {i}");
        assert_eq!(Digest::from(*blake3::hash(data).as_bytes()), digest);
        match &c.payload {
            Payload::Known => assert!(known.contains(&digest), "chunk {i} is new, not known"),
            Payload::Raw(bytes) => {
                assert!(!known.contains(&digest), "chunk {i} is in the repository");
                assert_eq!(bytes, data);
            }
            other => panic!("chunk {i}: {other:?}"),
        }
    }
    assert_eq!(
        out.values()
            .filter(|c| matches!(c.payload, Payload::Known))
            .count(),
        10
    );
    assert!(matches!(out[&20].payload, Payload::Zero { count: 5 }) && out[&20].digest.is_none());
    assert!(
        matches!(out[&25].payload, Payload::Unchanged { count: 5 }) && out[&25].digest.is_none()
    );
}

#[test]
fn the_parents_chunk_at_the_same_index_is_known_without_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path(), CHUNK).unwrap();
    let old: Vec<Bytes> = (0..8).map(content).collect();
    let id = commit(&repo, "web01", &old);
    let parent = SnapshotParent {
        snapshot: Arc::new(repo.open_snapshot(&id).unwrap()),
        disk: 0,
        chunks: 8,
        store_again: Vec::new(),
    };
    let d = disk("web01", 8, Some(Arc::new(parent)));
    let input = vec![
        chunk(&d, 0, Payload::Raw(old[0].clone())), // unchanged
        chunk(&d, 1, Payload::Raw(old[2].clone())), // the parent's, but at another index
        chunk(&d, 2, Payload::Raw(content(99))),    // new
        chunk(&d, 3, Payload::Raw(old[3].clone())), // unchanged
    ];
    // No repository at all: a lookup would fail the run.
    let (report, out) = run_dedup(false, None, 1, input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert!(matches!(out[&0].payload, Payload::Known));
    assert!(matches!(out[&3].payload, Payload::Known));
    assert!(
        matches!(out[&1].payload, Payload::Raw(_)),
        "no lookup, no index match"
    );
    assert!(matches!(out[&2].payload, Payload::Raw(_)));
    assert_eq!(out[&0].digest, Some(digest_of(&old[0])));
    assert_eq!(out[&1].digest, Some(digest_of(&old[2])));
}

#[test]
fn duplicates_within_one_run_are_passed_on_once() {
    let d = disk("web01", 24, None);
    let distinct: Vec<Bytes> = (0..3).map(|s| content(500 + s)).collect();
    let input = (0..24u64)
        .map(|i| chunk(&d, i, Payload::Raw(distinct[(i % 3) as usize].clone())))
        .collect();
    let (report, out) = run_dedup(false, None, 2, input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    for data in &distinct {
        let digest = digest_of(data);
        let same: Vec<_> = out.values().filter(|c| c.digest == Some(digest)).collect();
        assert_eq!(same.len(), 8);
        let raw = same
            .iter()
            .filter(|c| matches!(c.payload, Payload::Raw(_)))
            .count();
        assert_eq!(
            raw, 1,
            "each distinct chunk goes on to be stored exactly once"
        );
    }
}

#[test]
fn lookup_without_a_repository_fails_the_run_clearly() {
    let d = disk("web01", 1, None);
    let input = vec![chunk(&d, 0, Payload::Raw(content(1)))];
    let (report, out) = run_dedup(true, None, 1, input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        out.is_empty(),
        "nothing passes as new when it could not be looked up"
    );
    assert!(
        report.errors.len() == 1 && report.errors[0].contains("`repository:`"),
        "{:?}",
        report.errors
    );
}
