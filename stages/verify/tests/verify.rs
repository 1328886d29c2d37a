//! The verifier at the end of the real read chain (`repo-reader -> unzstd -> verify`): intact
//! chunks come out verified and equal to the image; a chunk damaged in its pack fails the run
//! naming the disk, the chunk and the digest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    Chunk, ChunkRef, Digest, Message, OutcomeKind, Payload, Pipeline, RunOptions, RunReport,
    digest_of,
};
use backflow_repository::Repository;
use stage_repo_reader::{RepoReader, RepoReaderOptions};
use stage_unzstd::{Unzstd, UnzstdOptions};
use stage_verify::{Verify, VerifyOptions};

use backflow_testkit::backup_files as backup;
use backflow_testkit::{Collect, damage_a_raw_chunk, placed};

const CHUNK: u32 = 64 * 1024;
/// 8 MiB and a partial last chunk.
const IMAGE_SIZE: u64 = (8 << 20) + 6 * 4096;

/// `repo-reader -> unzstd -> verify -> collect` on the latest snapshot.
fn read_verified(repo: &Path) -> (RunReport, Vec<Chunk>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline {
        name: "read-verified".into(),
        repository: Some(repo.to_owned().into()),
        stages: vec![
            placed(
                "repo-reader",
                Arc::new(RepoReader::new(RepoReaderOptions::default()).unwrap()),
                2,
            ),
            placed(
                "unzstd",
                Arc::new(Unzstd::new(UnzstdOptions {}).unwrap()),
                2,
            ),
            placed(
                "verify",
                Arc::new(Verify::new(VerifyOptions {}).unwrap()),
                2,
            ),
            placed("collect", Arc::new(Collect(out.clone())), 1),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    let chunks = std::mem::take(&mut *out.lock().unwrap())
        .into_iter()
        .map(|m| match m {
            Message::Chunk(c) => c,
            other => panic!("verify emitted a {}", other.variant()),
        })
        .collect();
    (report, chunks)
}

struct Backup {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    image: Vec<u8>,
    table: Vec<ChunkRef>,
}

fn backed_up_image() -> Backup {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 51).unwrap();
    let (_, mut tables) = backup(&repo, "web01", &[("vda", &image)]);
    Backup {
        repo: repo_path,
        image: std::fs::read(&image).unwrap(),
        table: tables.remove(0),
        _dir: dir,
    }
}

#[test]
fn intact_chunks_come_out_verified_and_equal_to_the_image() {
    let backup = backed_up_image();
    let (report, chunks) = read_verified(&backup.repo);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let mut covered = vec![0u32; backup.table.len()];
    for c in &chunks {
        assert!(c.verified, "chunk {} not marked verified", c.index);
        let count = match &c.payload {
            Payload::Raw(plain) => {
                let offset = c.offset() as usize;
                assert_eq!(&plain[..], &backup.image[offset..offset + plain.len()]);
                assert_eq!(
                    backup.table[c.index as usize],
                    ChunkRef::Data(digest_of(plain))
                );
                1
            }
            Payload::Zero { count } => *count,
            other => panic!("{other:?}"),
        };
        for i in c.index..c.index + count {
            covered[i as usize] += 1;
        }
    }
    assert!(covered.iter().all(|&n| n == 1), "{covered:?}");
}

#[test]
fn a_chunk_damaged_in_its_pack_fails_naming_disk_chunk_and_digest() {
    let backup = backed_up_image();
    let repo = Repository::open(&backup.repo).unwrap();
    let (index, digest) = damage_a_raw_chunk(&repo, &backup.table, 100);

    let (report, chunks) = read_verified(&backup.repo);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        chunks.iter().all(|c| c.index != index as u64),
        "the damaged chunk went on"
    );
    let error = report
        .errors
        .iter()
        .find(|e| e.starts_with("verify"))
        .expect("verify failed");
    for part in ["disk vda", &format!("chunk {index} "), &digest.to_hex()] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
}

#[test]
fn chunks_without_plaintext_or_digest_are_refused() {
    let backup = backed_up_image();
    let (_, chunks) = read_verified(&backup.repo);
    let mut raw = chunks
        .into_iter()
        .find(|c| matches!(c.payload, Payload::Raw(_)))
        .unwrap();
    raw.verified = false;
    let mut no_digest = raw.clone();
    no_digest.digest = None;
    let mut known = raw.clone();
    known.payload = Payload::Known;
    let wrong: Digest = digest_of(b"something else");
    let mut mismatched = raw.clone();
    mismatched.digest = Some(wrong);
    for bad in [no_digest, known, mismatched] {
        let harness = Harness::new(Arc::new(Verify::new(VerifyOptions {}).unwrap()));
        let (report, out) = harness.run(vec![Message::Chunk(bad)]);
        assert_eq!(report.outcome, OutcomeKind::Failed);
        assert!(out.is_empty());
        assert!(
            report.errors[0].contains(&format!("chunk {}", raw.index)),
            "{:?}",
            report.errors
        );
    }
    let harness = Harness::new(Arc::new(Verify::new(VerifyOptions {}).unwrap()));
    let (report, out) = harness.run(vec![Message::Chunk(raw)]);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert!(matches!(&out[0], Message::Chunk(c) if c.verified));
}
