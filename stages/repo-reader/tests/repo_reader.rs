//! The restore source against a real repository: every chunk of the chosen snapshot and disks
//! comes out once, as stored, with its digest; zero chunks as runs; chunks whose index files are
//! lost come from the pack trailers; and a chunk no pack holds fails the run naming it.

use std::path::Path;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{Chunk, ChunkRef, Message, OutcomeKind, Payload, RunReport};
use backflow_repository::Repository;
use stage_repo_reader::{RepoReader, RepoReaderOptions};

use backflow_testkit::{assert_succeeded, backup_files as backup};

const CHUNK: u32 = 64 * 1024;
/// 8 MiB and a partial last chunk.
const IMAGE_SIZE: u64 = (8 << 20) + 6 * 4096;

fn read(repo: &Path, snapshot: &str, disk: &str, workers: usize) -> (RunReport, Vec<Chunk>) {
    read_of(repo, snapshot, "", disk, workers)
}

/// [`read`] with the reader's options as given.
fn read_with(repo: &Path, options: RepoReaderOptions, workers: usize) -> (RunReport, Vec<Chunk>) {
    let harness = Harness {
        workers,
        repository: Some(repo.to_owned().into()),
        ..Harness::new(Arc::new(RepoReader::new(options).unwrap()))
    };
    let (report, out) = harness.run(Vec::new());
    let chunks = out
        .into_iter()
        .map(|m| match m {
            Message::Chunk(c) => c,
            other => panic!("repo-reader emitted a {}", other.variant()),
        })
        .collect();
    (report, chunks)
}

/// [`read`] of a snapshot named among `vm`'s (all when empty).
fn read_of(
    repo: &Path,
    snapshot: &str,
    vm: &str,
    disk: &str,
    workers: usize,
) -> (RunReport, Vec<Chunk>) {
    let options = RepoReaderOptions {
        snapshot: snapshot.into(),
        disk: disk.into(),
        vm: vm.into(),
        ..Default::default()
    };
    read_with(repo, options, workers)
}

/// Checks that `chunks` (of one disk) restore `image` exactly and follow `table`.
fn assert_restores(repo: &Repository, chunks: &[Chunk], table: &[ChunkRef], image: &[u8]) -> u64 {
    let mut covered = vec![0u32; table.len()];
    let mut stored_bytes = 0;
    for c in chunks {
        assert!(!c.verified);
        match &c.payload {
            Payload::Zero { count } => {
                for i in c.index..c.index + count {
                    assert_eq!(table[i as usize], ChunkRef::Zero, "zero run over chunk {i}");
                    covered[i as usize] += 1;
                }
                assert!(c.digest.is_none());
            }
            Payload::Encoded {
                codec,
                data,
                raw_len,
            } => {
                let digest = c.digest.expect("a stored chunk carries its digest");
                assert_eq!(table[c.index as usize], ChunkRef::Data(digest));
                let location = repo.locate(&digest).unwrap().unwrap();
                let stored = repo.read_chunk(&location).unwrap();
                assert_eq!((stored.codec, &stored.data[..]), (*codec, &data[..]));
                let plain = backflow_repository::decode(*codec, data, *raw_len).unwrap();
                let offset = (c.index * u64::from(CHUNK)) as usize;
                assert_eq!(&plain[..], &image[offset..offset + plain.len()]);
                covered[c.index as usize] += 1;
                stored_bytes += data.len() as u64;
            }
            other => panic!("chunk {}: unexpected {other:?}", c.index),
        }
    }
    let wrong: Vec<_> = (0..table.len()).filter(|&i| covered[i] != 1).collect();
    assert!(
        wrong.is_empty(),
        "chunks not emitted exactly once: {wrong:?}"
    );
    stored_bytes
}

#[test]
fn emits_every_chunk_of_the_snapshot_once_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 31).unwrap();
    let (id, tables) = backup(&repo, "web01", &[("vda", &image)]);
    assert!(tables[0].contains(&ChunkRef::Zero));

    let (report, chunks) = read(&repo_path, &id, "", 2);
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], id.as_str());
    let disk = chunks[0].disk.clone();
    assert!(chunks.iter().all(|c| Arc::ptr_eq(&c.disk, &disk)));
    assert_eq!((disk.name(), disk.source.vm.as_str()), ("vda", "web01"));
    assert_eq!((disk.size(), disk.chunk_size), (IMAGE_SIZE, CHUNK));
    assert_eq!(disk.source.location, image);
    assert_restores(&repo, &chunks, &tables[0], &std::fs::read(&image).unwrap());
    // The disk is one region: a chunk it repeats is read once.
    assert_eq!(report.source_bytes_read, distinct_stored(&repo, &tables[0]));
}

/// The stored bytes of the distinct chunks of `table`.
fn distinct_stored(repo: &Repository, table: &[ChunkRef]) -> u64 {
    let distinct: std::collections::HashSet<_> = table.iter().collect();
    distinct
        .iter()
        .map(|r| match r {
            ChunkRef::Data(d) => u64::from(repo.locate(d).unwrap().unwrap().stored_len),
            ChunkRef::Zero => 0,
        })
        .sum()
}

/// An incremental snapshot's chunks lie in two packs, the first with holes where chunks changed,
/// and the image repeats chunks: read in regions of a few chunks by several workers, in pack order
/// with spans across the holes, every chunk still comes out exactly once with its bytes. Regions of
/// one chunk read exactly what they send; one region for the whole disk reads each distinct chunk
/// once (holes inside a span too) and no pack byte twice.
#[test]
fn regions_read_in_pack_order_still_emit_every_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 7).unwrap();
    backup(&repo, "web01", &[("vda", &image)]);
    backflow_fixtures::change_image(&image, 0.2, 8).unwrap();
    let (id, tables) = backup(&repo, "web01", &[("vda", &image)]);
    let distinct: std::collections::HashSet<_> =
        tables[0].iter().filter(|r| **r != ChunkRef::Zero).collect();
    let data_chunks = tables[0].iter().filter(|r| **r != ChunkRef::Zero).count();
    assert!(distinct.len() < data_chunks, "the image repeats no chunk");

    let distinct_stored = distinct_stored(&repo, &tables[0]);
    let packs: u64 = walk(&repo_path.join("packs"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let data = std::fs::read(&image).unwrap();
    for (region_chunks, workers) in [(1, 2), (5, 3), (40, 2), (1024, 1)] {
        let options = RepoReaderOptions {
            snapshot: id.clone(),
            region_chunks,
            ..Default::default()
        };
        let (report, chunks) = read_with(&repo_path, options, workers);
        assert_succeeded(&report);
        let stored = assert_restores(&repo, &chunks, &tables[0], &data);
        let read = report.source_bytes_read;
        match region_chunks {
            1 => assert_eq!(read, stored),
            1024 => assert!(
                (distinct_stored..=packs).contains(&read),
                "read {read} bytes: distinct chunks hold {distinct_stored}, the packs {packs}"
            ),
            _ => {}
        }
    }
}

#[test]
fn latest_and_disk_select_what_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let (vda, vdb) = (dir.path().join("vda.raw"), dir.path().join("vdb.raw"));
    backflow_fixtures::generate_image(&vda, 2 << 20, 1).unwrap();
    backflow_fixtures::generate_image(&vdb, 3 << 20, 2).unwrap();
    backup(&repo, "old", &[("vda", &vda)]);
    let (id, tables) = backup(&repo, "web01", &[("vda", &vda), ("vdb", &vdb)]);

    // Two VMs: `latest` alone is refused naming both; `latest` of one is its newest.
    let (report, chunks) = read(&repo_path, "latest", "vdb", 3);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(chunks.is_empty());
    assert!(
        report.errors[0].contains("(old, web01)"),
        "{:?}",
        report.errors
    );
    let (report, chunks) = read_of(&repo_path, "latest", "web01", "vdb", 3);
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], id.as_str());
    assert!(chunks.iter().all(|c| c.disk.name() == "vdb"));
    assert_restores(&repo, &chunks, &tables[1], &std::fs::read(&vdb).unwrap());

    // A prefix that only this snapshot's id starts with (the date part starts both; `web01` narrows).
    let (report, chunks) = read_of(&repo_path, &id[..8], "web01", "", 1);
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], id.as_str());
    let (a, b): (Vec<Chunk>, Vec<Chunk>) = chunks.into_iter().partition(|c| c.disk.name() == "vda");
    assert_restores(&repo, &a, &tables[0], &std::fs::read(&vda).unwrap());
    assert_restores(&repo, &b, &tables[1], &std::fs::read(&vdb).unwrap());

    let (report, chunks) = read(&repo_path, &id, "vdc", 2);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(chunks.is_empty());
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("vdc") && e.contains("vda, vdb")),
        "{:?}",
        report.errors
    );

    let (report, _) = read(&repo_path, "20000101T000000Z-000000", "", 1);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        report.errors[0].contains("20000101T000000Z-000000"),
        "{:?}",
        report.errors
    );
}

#[test]
fn lost_index_files_cost_speed_not_the_restore_and_a_lost_pack_fails_it_naming_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, 2 << 20, 3).unwrap();
    let (id, tables) = backup(&repo, "web01", &[("vda", &image)]);
    for entry in std::fs::read_dir(repo_path.join("index")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let first = tables[0].iter().position(|r| *r != ChunkRef::Zero).unwrap();
    let ChunkRef::Data(digest) = tables[0][first] else {
        unreachable!()
    };

    // Every chunk is found in the pack trailers; the run says how to make that fast again.
    // A prefix that only this snapshot's id starts with (the date part starts both; `web01` narrows).
    let (report, chunks) = read_of(&repo_path, &id[..8], "web01", "", 1);
    assert_succeeded(&report);
    assert_eq!(report.results["restored_snapshot"], id.as_str());
    let data = std::fs::read(&image).unwrap();
    assert_restores(&repo, &chunks, &tables[0], &data);
    assert!(
        report.warnings.iter().any(|w| w.contains("rebuild-index")),
        "{:?}",
        report.warnings
    );

    // With the packs gone too, the run fails and names what is missing.
    for entry in walk(&repo_path.join("packs")) {
        std::fs::remove_file(entry).unwrap();
    }
    let (report, chunks) = read(&repo_path, &id, "", 1);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(
        chunks
            .iter()
            .all(|c| matches!(c.payload, Payload::Zero { .. }))
    );
    let error = &report.errors[0];
    for part in [
        id.as_str(),
        "disk vda",
        &format!("chunk {first}:"),
        &digest.to_hex(),
        "missing",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
