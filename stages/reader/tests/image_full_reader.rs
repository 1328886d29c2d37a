//! `image -> full -> reader` on a real sparse image: what is read is exactly what SEEK_DATA says is
//! allocated, every chunk is accounted for once, and the bytes are the file's.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use backflow_pipeline::{ByteSize, Message, OutcomeKind, Payload, Pipeline, RunOptions, RunReport};
use stage_full_map::{FullMap, FullMapOptions};
use stage_image::{ImageOptions, ImageSource, allocated_ranges};
use stage_reader::{Reader, ReaderOptions};

use backflow_testkit::{Collect, placed};

const CHUNK: u64 = 64 * 1024;
/// 16 MiB and a partial last chunk (5 blocks of 4 KiB).
const IMAGE_SIZE: u64 = (16 << 20) + 5 * 4096;

/// Runs image -> full (64 KiB chunks, no repository) -> reader (`workers`) -> collect.
fn read_image(path: &Path, reader_workers: usize) -> (RunReport, Vec<Message>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let image = ImageSource::new(ImageOptions {
        path: Some(path.to_owned()),
        disk: "vda".into(),
        vm: "web01".into(),
    })
    .unwrap();
    let full = FullMap::new(FullMapOptions {
        chunk_size: Some(ByteSize(CHUNK)),
        max_extent_chunks: 8,
    })
    .unwrap();
    let pipeline = Pipeline {
        name: "read".into(),
        repository: None,
        stages: vec![
            placed("image", Arc::new(image), 1),
            placed("full", Arc::new(full), 1),
            placed(
                "reader",
                Arc::new(Reader::new(ReaderOptions {}).unwrap()),
                reader_workers,
            ),
            placed("collect", Arc::new(Collect(out.clone())), 1),
        ],
        finaliser: None,
    };
    let report = pipeline.run(RunOptions::default());
    let messages = std::mem::take(&mut *out.lock().unwrap());
    (report, messages)
}

/// Chunk indices touching an allocated byte, computed from SEEK_DATA/SEEK_HOLE of the file.
fn allocated_chunks(path: &Path, size: u64) -> BTreeSet<u64> {
    let file = File::open(path).unwrap();
    let mut chunks = BTreeSet::new();
    for (offset, len) in allocated_ranges(&file, size).unwrap() {
        chunks.extend(offset / CHUNK..(offset + len).min(size).div_ceil(CHUNK));
    }
    chunks
}

fn file_chunk(file: &File, index: u64, size: u64) -> Vec<u8> {
    let offset = index * CHUNK;
    let mut buf = vec![0u8; (size - offset).min(CHUNK) as usize];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn reads_exactly_the_allocated_chunks_of_a_sparse_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&path, IMAGE_SIZE, 7).unwrap();
    // A chunk-aligned run of written zeros: allocated, so read, and then recognised as zero.
    let written_zeros = 200;
    let file = File::options().read(true).write(true).open(&path).unwrap();
    file.write_all_at(&vec![0u8; 2 * CHUNK as usize], written_zeros * CHUNK)
        .unwrap();
    file.sync_all().unwrap();

    let count = IMAGE_SIZE.div_ceil(CHUNK);
    let data = allocated_chunks(&path, IMAGE_SIZE);
    assert!(
        data.contains(&written_zeros) && data.contains(&(written_zeros + 1)),
        "written zeros must be allocated for this test to mean anything"
    );
    assert!(
        (data.len() as u64) < count * 9 / 10,
        "the fixture should have holes: {} of {count} chunks allocated",
        data.len()
    );

    let (report, messages) = read_image(&path, 2);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );

    let mut covered = vec![0u32; count as usize];
    let mut raw = BTreeSet::new();
    let mut read_zero = BTreeSet::new();
    for message in &messages {
        let Message::Chunk(chunk) = message else {
            panic!("reader emitted a {} message", message.variant());
        };
        assert_eq!(chunk.disk.name(), "vda");
        assert_eq!(chunk.disk.source.vm, "web01");
        assert_eq!(u64::from(chunk.disk.chunk_size), CHUNK);
        assert!(chunk.disk.parent.is_none());
        assert!(chunk.digest.is_none() && !chunk.verified);
        let run = match &chunk.payload {
            Payload::Raw(bytes) => {
                assert_eq!(
                    bytes.as_ref(),
                    file_chunk(&file, chunk.index, IMAGE_SIZE).as_slice(),
                    "chunk {} differs from the file",
                    chunk.index
                );
                raw.insert(chunk.index);
                1
            }
            Payload::Zero { count: 1 } if data.contains(&chunk.index) => {
                read_zero.insert(chunk.index);
                1
            }
            Payload::Zero { count } => {
                // A hole run: none of it may be allocated.
                for i in chunk.index..chunk.index + count {
                    assert!(!data.contains(&i), "allocated chunk {i} inside a hole run");
                }
                *count
            }
            other => panic!("unexpected payload {other:?} at chunk {}", chunk.index),
        };
        for i in chunk.index..chunk.index + run {
            covered[i as usize] += 1;
        }
    }
    let wrong: Vec<_> = (0..count).filter(|&i| covered[i as usize] != 1).collect();
    assert!(
        wrong.is_empty(),
        "chunks not covered exactly once: {wrong:?}"
    );

    // What was read is exactly the allocated chunks; of those, the all-zero ones became Zero.
    let read: BTreeSet<u64> = raw.union(&read_zero).copied().collect();
    assert_eq!(read, data);
    for &i in &read_zero {
        assert!(file_chunk(&file, i, IMAGE_SIZE).iter().all(|&b| b == 0));
    }
    assert!(read_zero.contains(&written_zeros) && read_zero.contains(&(written_zeros + 1)));
    for &i in &raw {
        assert!(file_chunk(&file, i, IMAGE_SIZE).iter().any(|&b| b != 0));
    }
    // Chunks outside the allocated ranges read as zeros (they are holes).
    for i in (0..count).filter(|i| !data.contains(i)) {
        assert!(file_chunk(&file, i, IMAGE_SIZE).iter().all(|&b| b == 0));
    }

    let data_bytes: u64 = data
        .iter()
        .map(|&i| (IMAGE_SIZE - i * CHUNK).min(CHUNK))
        .sum();
    assert_eq!(report.source_bytes_read, data_bytes);
}

#[test]
fn partial_last_chunk_is_read_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tail.raw");
    let size = 3 * CHUNK + 4096;
    let file = File::create(&path).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&[0xab; 4096], 3 * CHUNK).unwrap();
    drop(file);

    let (report, messages) = read_image(&path, 1);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let raw: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Chunk(c) => match &c.payload {
                Payload::Raw(b) => Some((c.index, b.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].0, 3);
    assert_eq!(raw[0].1.as_ref(), &[0xab; 4096][..]);
    assert_eq!(report.source_bytes_read, 4096);
}

#[test]
fn a_missing_image_fails_the_run_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.raw");
    let (report, messages) = read_image(&path, 1);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(messages.is_empty());
    assert!(
        report.errors.iter().any(|e| e.contains("absent.raw")),
        "{:?}",
        report.errors
    );
}
