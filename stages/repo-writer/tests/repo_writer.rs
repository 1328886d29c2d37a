//! The repository writer against a real repository: what it commits is exactly the chunk table it
//! was fed, and a run that is short, fails or is cancelled commits nothing and leaves the
//! repository valid.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    CancelToken, Chunk, ChunkRef, Digest, Disk, DiskSource, Message, MessageType, OutcomeKind,
    ParentChunks, Payload, Pipeline, PlacedStage, RunOptions, RunReport, SizeOnly, Stage,
    StageError, StageIo, Worker, digest_of,
};
use backflow_planner::SnapshotParent;
use backflow_repository::{Codec, DiskMeta, Repository};
use bytes::Bytes;
use stage_repo_writer::{RepoWriter, RepoWriterOptions};
use stage_zstd::{Zstd, ZstdOptions};

const CHUNK: u32 = 64 * 1024;
/// 40 full chunks and a last one of 8 KiB.
const CHUNKS: u64 = 41;
const DISK_SIZE: u64 = 40 * CHUNK as u64 + 8192;

fn random(seed: u64, len: usize) -> Bytes {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    Bytes::from(out)
}

fn text(seed: u64, len: usize) -> Bytes {
    let line = format!(
        "{seed}: session opened for user backup from port {}\n",
        seed * 7
    );
    Bytes::from(line.repeat(len / line.len() + 1)[..len].to_owned())
}

fn chunk_len(index: u64) -> usize {
    (DISK_SIZE - index * u64::from(CHUNK)).min(u64::from(CHUNK)) as usize
}

/// Commits a parent snapshot of `web01`/`vda` with the given plaintexts (`None`: a zero chunk).
fn commit_parent(repo: &Repository, chunks: &[Option<Bytes>]) -> (String, Vec<ChunkRef>) {
    let session = repo.begin_backup("web01").unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: DISK_SIZE,
            chunk_size: CHUNK,
            location: "parent".into(),
            cbt: None,
        })
        .unwrap();
    let mut packs = session.pack_writer();
    let mut table = Vec::new();
    for (i, data) in chunks.iter().enumerate() {
        let Some(data) = data else {
            table.push(ChunkRef::Zero);
            continue;
        };
        let digest = digest_of(data);
        packs
            .add(digest, Codec::None, data.len() as u32, data)
            .unwrap();
        session
            .set_chunk(slot, i as u64, ChunkRef::Data(digest))
            .unwrap();
        table.push(ChunkRef::Data(digest));
    }
    packs.finish().unwrap();
    (session.commit(None).unwrap().id, table)
}

fn disk(vm: &str, parent: Option<Arc<dyn ParentChunks>>) -> Arc<Disk> {
    Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: vm.into(),
            name: "vda".into(),
            location: PathBuf::from("/dev/vda"),
            reader: Arc::new(SizeOnly(DISK_SIZE)),
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK,
        parent,
    })
}

fn msg(disk: &Arc<Disk>, index: u64, digest: Option<Digest>, payload: Payload) -> Message {
    Message::Chunk(Chunk {
        disk: disk.clone(),
        index,
        digest,
        verified: false,
        payload,
    })
}

/// A repository with a parent snapshot, and an incremental of it that uses every kind of payload:
/// the messages (shuffled), the table they must produce, and the plaintext of each new chunk.
struct Case {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    parent_id: String,
    disk: Arc<Disk>,
    input: Vec<Message>,
    table: Vec<ChunkRef>,
    new_chunks: Vec<(Digest, Bytes)>,
    stored_bytes: u64,
}

fn case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let parent_chunks: Vec<Option<Bytes>> = (0..CHUNKS)
        .map(|i| (i != 7).then(|| random(i, chunk_len(i))))
        .collect();
    let (parent_id, parent_table) = commit_parent(&repo, &parent_chunks);
    let parent = SnapshotParent {
        snapshot: Arc::new(repo.open_snapshot(&parent_id).unwrap()),
        disk: 0,
        chunks: CHUNKS,
        store_again: Vec::new(),
    };
    let disk = disk("web01", Some(Arc::new(parent)));
    let mut compressor = Zstd::new(ZstdOptions::default())
        .unwrap()
        .compressor()
        .unwrap();

    let mut table = vec![ChunkRef::Zero; CHUNKS as usize];
    let mut input = Vec::new();
    let mut new_chunks = Vec::new();
    let mut stored_bytes = 0;
    // 0..5: one zero run.
    input.push(msg(&disk, 0, None, Payload::Zero { count: 5 }));
    // 5..10: unchanged, copied from the parent (which has a zero chunk at 7).
    input.push(msg(&disk, 5, None, Payload::Unchanged { count: 5 }));
    table[5..10].copy_from_slice(&parent_table[5..10]);
    // 10..15: chunks the repository has (the parent's chunks 0..5, moved).
    for i in 10..15u64 {
        let digest = digest_of(parent_chunks[(i - 10) as usize].as_ref().unwrap());
        input.push(msg(&disk, i, Some(digest), Payload::Known));
        table[i as usize] = ChunkRef::Data(digest);
    }
    // 15..35, 36 and the short 40: new chunks, text (zstd) and random (stored raw).
    for i in (15..35).chain([36, 40]) {
        let plain = if i % 2 == 0 {
            text(i, chunk_len(i))
        } else {
            random(1000 + i, chunk_len(i))
        };
        let digest = digest_of(&plain);
        let (codec, data) = compressor.encode(&plain).unwrap();
        assert_eq!(codec == Codec::Zstd, i % 2 == 0);
        stored_bytes += data.len() as u64;
        input.push(msg(
            &disk,
            i,
            Some(digest),
            Payload::Encoded {
                codec,
                data,
                raw_len: plain.len() as u32,
            },
        ));
        table[i as usize] = ChunkRef::Data(digest);
        new_chunks.push((digest, plain));
    }
    // 35, 37..40: zero chunks, one alone and a run.
    input.push(msg(&disk, 35, None, Payload::Zero { count: 1 }));
    input.push(msg(&disk, 37, None, Payload::Zero { count: 3 }));
    // Arrival order must not matter.
    input.reverse();
    let n = input.len();
    input.swap(3, n - 3);
    Case {
        _dir: dir,
        repo: repo_path,
        parent_id,
        disk,
        input,
        table,
        new_chunks,
        stored_bytes,
    }
}

fn write(repo: &Path, workers: usize, input: Vec<Message>) -> RunReport {
    let harness = Harness {
        workers,
        repository: Some(repo.to_owned().into()),
        ..Harness::new(Arc::new(RepoWriter::new(RepoWriterOptions {}).unwrap()))
    };
    // The harness (and the writer in it) is dropped here, as a finished process would be.
    harness.run(input).0
}

fn scratch_entries(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Only the parent is there, the repository is intact and no scratch directory was left.
fn assert_nothing_committed(case: &Case) {
    let repo = Repository::open(&case.repo).unwrap();
    let ids: Vec<String> = repo
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec![case.parent_id.clone()]);
    let verify = repo.verify(true).unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(scratch_entries(&case.repo), Vec::<PathBuf>::new());
}

#[test]
fn commits_exactly_the_chunk_table_it_was_fed() {
    let case = case();
    let report = write(&case.repo, 2, case.input.clone());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let id = report
        .snapshot
        .clone()
        .expect("the snapshot id is reported");
    assert_eq!(report.repo_bytes_written, case.stored_bytes);

    let repo = Repository::open(&case.repo).unwrap();
    let snapshot = repo.open_snapshot(&id).unwrap();
    assert_eq!(snapshot.info().vm, "web01");
    let meta = &snapshot.meta().disks;
    assert_eq!(meta.len(), 1);
    assert_eq!(
        (meta[0].name.as_str(), meta[0].size, meta[0].chunk_size),
        ("vda", DISK_SIZE, CHUNK)
    );
    assert_eq!(meta[0].location, "/dev/vda");
    let table: Vec<ChunkRef> = snapshot.chunks(0).map(Result::unwrap).collect();
    assert_eq!(table, case.table);
    for (digest, plain) in &case.new_chunks {
        assert_eq!(&repo.load_chunk(digest).unwrap()[..], &plain[..]);
    }
    let verify = repo.verify(true).unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.snapshots, 2);
    assert_eq!(scratch_entries(&case.repo), Vec::<PathBuf>::new());
    assert!(case.disk.parent.is_some());
}

#[test]
fn a_run_missing_a_chunk_commits_nothing() {
    let case = case();
    let mut input = case.input.clone();
    input.retain(|m| !matches!(m, Message::Chunk(c) if c.index == 20));
    let report = write(&case.repo, 2, input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.snapshot.is_none());
    assert!(
        report.errors.iter().any(|e| e.contains("40 of 41 chunks")),
        "{:?}",
        report.errors
    );
    assert_nothing_committed(&case);
}

#[test]
fn a_failed_run_commits_nothing() {
    let case = case();
    let mut input = case.input.clone();
    // A plaintext chunk is a bug upstream: the writer fails the run.
    input.insert(
        10,
        msg(
            &case.disk,
            20,
            Some(digest_of(b"x")),
            Payload::Raw(Bytes::from_static(b"x")),
        ),
    );
    let report = write(&case.repo, 2, input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.snapshot.is_none());
    assert!(
        report.errors.iter().any(|e| e.contains("uncompressed")),
        "{:?}",
        report.errors
    );
    assert_nothing_committed(&case);
}

/// Feeds prepared messages and cancels the run (as Ctrl-C would) after `cancel_after` of them.
struct FeedThenCancel {
    items: Mutex<Vec<Message>>,
    cancel_after: usize,
}

impl Stage for FeedThenCancel {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::CompressedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let items = std::mem::take(&mut *self.items.lock().unwrap());
        for (sent, message) in items.into_iter().enumerate() {
            if sent == self.cancel_after {
                worker.ctx().cancel_token().cancel();
            }
            if worker.send(message).is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[test]
fn a_cancelled_run_commits_nothing() {
    let case = case();
    let pipeline = Pipeline {
        name: "cancelled".into(),
        repository: Some(case.repo.clone().into()),
        stages: vec![
            PlacedStage {
                name: "feed".into(),
                kind: "feed".into(),
                workers: 1,
                capacity: 0,
                stage: Arc::new(FeedThenCancel {
                    items: Mutex::new(case.input.clone()),
                    cancel_after: 20,
                }),
            },
            PlacedStage {
                name: "writer".into(),
                kind: "repo-writer".into(),
                workers: 2,
                capacity: 4,
                stage: Arc::new(RepoWriter::new(RepoWriterOptions {}).unwrap()),
            },
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions {
        cancel: CancelToken::new(),
        on_progress: None,
    });
    drop(pipeline);
    assert_eq!(
        report.outcome,
        OutcomeKind::Cancelled,
        "{:?}",
        report.errors
    );
    assert!(report.snapshot.is_none());
    assert_nothing_committed(&case);
}

#[test]
fn disks_of_two_machines_in_one_run_are_refused() {
    let case = case();
    let other = disk("db01", None);
    let mut input = case.input.clone();
    input.push(msg(&other, 0, None, Payload::Zero { count: CHUNKS }));
    let report = write(&case.repo, 1, input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("db01") && e.contains("web01")),
        "{:?}",
        report.errors
    );
    assert_nothing_committed(&case);
}

#[test]
fn an_empty_run_commits_nothing() {
    let case = case();
    let report = write(&case.repo, 1, Vec::new());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        report.errors[0].contains("nothing reached"),
        "{:?}",
        report.errors
    );
    assert_nothing_committed(&case);
}

/// Completeness is checked by counting chunks, not by which indices arrived: a chunk delivered
/// twice hides a missing one, and the snapshot records the missing chunk as zeros.
#[test]
fn a_run_missing_a_chunk_but_repeating_another_commits_nothing() {
    let case = case();
    let mut input = case.input.clone();
    input.retain(|m| !matches!(m, Message::Chunk(c) if c.index == 20));
    let repeated = input
        .iter()
        .find(|m| matches!(m, Message::Chunk(c) if c.index == 21))
        .unwrap()
        .clone();
    input.push(repeated);
    let report = write(&case.repo, 1, input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Failed,
        "snapshot {:?}",
        report.snapshot
    );
    assert_nothing_committed(&case);
}

/// An unchanged run longer than the writer's copy batch: every reference of the parent, at batch
/// edges too, lands at the same index of the new snapshot.
#[test]
fn a_long_unchanged_run_copies_the_parent_table_exactly() {
    const LONG: u64 = 2500;
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let size = LONG * u64::from(CHUNK);
    // A sparse parent: data at the edges of the 1024-entry batches and a few places between.
    let data_at = [
        0,
        1,
        1022,
        1023,
        1024,
        1025,
        2047,
        2048,
        2049,
        2400,
        LONG - 1,
    ];
    let session = repo.begin_backup("web01").unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size,
            chunk_size: CHUNK,
            location: "parent".into(),
            cbt: None,
        })
        .unwrap();
    let mut packs = session.pack_writer();
    let mut expected = vec![ChunkRef::Zero; LONG as usize];
    for &i in &data_at {
        let data = random(i, CHUNK as usize);
        let digest = digest_of(&data);
        packs.add(digest, Codec::None, CHUNK, &data).unwrap();
        session.set_chunk(slot, i, ChunkRef::Data(digest)).unwrap();
        expected[i as usize] = ChunkRef::Data(digest);
    }
    packs.finish().unwrap();
    let parent_id = session.commit(None).unwrap().id;
    let parent = SnapshotParent {
        snapshot: Arc::new(repo.open_snapshot(&parent_id).unwrap()),
        disk: 0,
        chunks: LONG,
        store_again: Vec::new(),
    };
    let disk = Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: "web01".into(),
            name: "vda".into(),
            location: PathBuf::from("/dev/vda"),
            reader: Arc::new(SizeOnly(size)),
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK,
        parent: Some(Arc::new(parent)),
    });
    let harness = Harness {
        repository: Some(repo_path.clone().into()),
        ..Harness::new(Arc::new(RepoWriter::new(RepoWriterOptions {}).unwrap()))
    };
    let (report, _) = harness.run(vec![msg(
        &disk,
        0,
        None,
        Payload::Unchanged { count: LONG },
    )]);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let id = report.snapshot.expect("a snapshot");
    let repo = Repository::open(&repo_path).unwrap();
    let snapshot = repo.open_snapshot(&id).unwrap();
    let table: Vec<ChunkRef> = snapshot.chunks(0).map(Result::unwrap).collect();
    assert_eq!(table, expected);
}
