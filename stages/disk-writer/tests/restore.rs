//! The disk writer at the end of the real restore chain, after the real backup chain: the restored
//! image equals the original byte for byte with zero chunks left as holes, and a failed restore
//! leaves neither a `.partial` nor a final file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{ChunkRef, Message, OutcomeKind, Payload, Pipeline, RunOptions};
use backflow_repository::Repository;
use bytes::Bytes;
use stage_dedup::{Dedup, DedupOptions};
use stage_disk_writer::{DiskWriter, DiskWriterOptions};
use stage_full_map::{FullMap, FullMapOptions};
use stage_image::{ImageOptions, ImageSource};
use stage_reader::{Reader, ReaderOptions};
use stage_repo_writer::{RepoWriter, RepoWriterOptions};
use stage_zstd::{Zstd, ZstdOptions};

use backflow_testkit::{
    assert_succeeded, damage_a_raw_chunk, partial_path, placed, restore_with_spec, synthetic_disk,
    verified_chunk,
};

const CHUNK: u32 = 64 * 1024;
/// 16 MiB and a partial last chunk.
const IMAGE_SIZE: u64 = (16 << 20) + 5 * 4096;

/// The `backup-image` spec's stages, built directly.
fn back_up(repo: &Path, image: &Path) -> String {
    let pipeline = Pipeline {
        name: "backup".into(),
        repository: Some(repo.to_owned().into()),
        stages: vec![
            placed(
                "image",
                Arc::new(
                    ImageSource::new(ImageOptions {
                        path: Some(image.to_owned()),
                        disk: "vda".into(),
                        vm: "web01".into(),
                    })
                    .unwrap(),
                ),
                1,
            ),
            placed(
                "full",
                Arc::new(FullMap::new(FullMapOptions::default()).unwrap()),
                1,
            ),
            placed(
                "reader",
                Arc::new(Reader::new(ReaderOptions {}).unwrap()),
                2,
            ),
            placed(
                "dedup",
                Arc::new(Dedup::new(DedupOptions::default()).unwrap()),
                2,
            ),
            placed(
                "zstd",
                Arc::new(Zstd::new(ZstdOptions::default()).unwrap()),
                2,
            ),
            placed(
                "writer",
                Arc::new(RepoWriter::new(RepoWriterOptions {}).unwrap()),
                2,
            ),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    assert_succeeded(&report);
    report.snapshot.unwrap()
}

/// Bytes the file system allocated to `path`.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

struct BackedUp {
    dir: tempfile::TempDir,
    repo: PathBuf,
    image: PathBuf,
    snapshot: String,
}

fn backed_up() -> BackedUp {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    Repository::init(&repo, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 61).unwrap();
    let snapshot = back_up(&repo, &image);
    BackedUp {
        dir,
        repo,
        image,
        snapshot,
    }
}

#[test]
fn restored_image_equals_the_original_with_zero_chunks_as_holes() {
    let b = backed_up();
    let out = b.dir.path().join("restored.raw");
    let report = restore_with_spec(&b.repo, &out, true);
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], b.snapshot.as_str());
    let restored = &report.results["restored"][0];
    assert_eq!(restored["disk"], "vda");
    assert_eq!(restored["path"], out.display().to_string().as_str());
    assert_eq!(restored["size"], IMAGE_SIZE);

    let original = std::fs::read(&b.image).unwrap();
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len(), original.len());
    assert!(
        copy == original,
        "the restored image differs from the original"
    );
    assert!(!partial_path(&out).exists());

    // Holes: only the non-zero chunks take space (plus a little extent metadata).
    let data_chunks = original
        .chunks(CHUNK as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    let data_bytes = data_chunks * u64::from(CHUNK);
    assert!(
        data_bytes < IMAGE_SIZE * 3 / 4,
        "the fixture should have zero chunks"
    );
    assert!(
        allocated(&out) <= data_bytes + 64 * 1024,
        "{} bytes allocated for {data_bytes} bytes of non-zero chunks",
        allocated(&out)
    );
}

#[test]
fn restoring_into_a_directory_names_the_file_after_the_disk() {
    let b = backed_up();
    let to = b.dir.path().join("out");
    std::fs::create_dir(&to).unwrap();
    let report = restore_with_spec(&b.repo, &to, true);
    assert_succeeded(&report);
    let names: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["vda.raw"]);
    assert!(std::fs::read(to.join("vda.raw")).unwrap() == std::fs::read(&b.image).unwrap());
}

#[test]
fn a_damaged_chunk_fails_the_restore_and_leaves_no_file() {
    let b = backed_up();
    let repo = Repository::open(&b.repo).unwrap();
    let snapshot = repo.open_snapshot(&b.snapshot).unwrap();
    let table: Vec<ChunkRef> = snapshot.chunks(0).map(Result::unwrap).collect();
    let (index, digest) = damage_a_raw_chunk(&repo, &table, 7);

    let out = b.dir.path().join("restored.raw");
    let report = restore_with_spec(&b.repo, &out, true);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    let error = report
        .errors
        .iter()
        .find(|e| e.starts_with("verify"))
        .expect("verify failed");
    for part in ["disk vda", &format!("chunk {index} "), &digest.to_hex()] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    assert!(!out.exists(), "a failed restore left the final file");
    assert!(
        !partial_path(&out).exists(),
        "a failed restore left the partial file"
    );
}

fn writer(to: &Path) -> Harness {
    Harness {
        workers: 2,
        ..Harness::new(Arc::new(
            DiskWriter::new(DiskWriterOptions {
                path: Some(to.to_owned()),
                sync: false,
                ..Default::default()
            })
            .unwrap(),
        ))
    }
}

#[test]
fn a_mostly_empty_disk_is_restored_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("sparse.raw");
    let size = 64 << 20;
    let disk = synthetic_disk(size, CHUNK);
    let a = Bytes::from(vec![0xa5u8; CHUNK as usize]);
    let b = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8 + 1).collect::<Vec<u8>>());
    let last = disk.chunk_count() - 1;
    let input = vec![
        verified_chunk(&disk, 0, Payload::Zero { count: 10 }),
        verified_chunk(&disk, 10, Payload::Raw(a.clone())),
        verified_chunk(&disk, 11, Payload::Zero { count: 500 }),
        verified_chunk(&disk, 511, Payload::Raw(b.clone())),
        verified_chunk(&disk, 512, Payload::Zero { count: last - 512 }),
        verified_chunk(&disk, last, Payload::Zero { count: 1 }),
    ];
    let (report, _) = writer(&to).run(input);
    assert_succeeded(&report);
    let data = std::fs::read(&to).unwrap();
    assert_eq!(data.len() as u64, size);
    let at = |i: u64| &data[(i * u64::from(CHUNK)) as usize..((i + 1) * u64::from(CHUNK)) as usize];
    assert_eq!(at(10), &a[..]);
    assert_eq!(at(511), &b[..]);
    let nonzero = data.iter().filter(|&&x| x != 0).count();
    assert_eq!(nonzero, 2 * CHUNK as usize);
    assert!(
        allocated(&to) <= 4 * u64::from(CHUNK),
        "{} bytes allocated for a 64 MiB disk with two 64 KiB chunks",
        allocated(&to)
    );
}

#[test]
fn an_unverified_chunk_fails_the_run_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("out.raw");
    let disk = synthetic_disk(40 * u64::from(CHUNK), CHUNK);
    let mut input: Vec<Message> = (0..30)
        .map(|i| {
            verified_chunk(
                &disk,
                i,
                Payload::Raw(Bytes::from(vec![i as u8 + 1; CHUNK as usize])),
            )
        })
        .collect();
    let Message::Chunk(mut bad) = input[20].clone() else {
        unreachable!()
    };
    bad.index = 35;
    bad.verified = false;
    input.push(Message::Chunk(bad));
    let (report, _) = writer(&to).run(input);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(report.errors[0].contains("chunk 35"), "{:?}", report.errors);
    assert!(
        report.errors[0].contains("unverified"),
        "{:?}",
        report.errors
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed restore left {left:?}");
}
