//! The `image` source against real files: one disk per run whatever the worker count, names from
//! the path, the file's bytes, and allocated ranges that cover every written block and no hole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{Message, OutcomeKind};
use stage_image::{ImageOptions, ImageSource};

const IMAGE_SIZE: u64 = 8 << 20;
const BLOCK: u64 = backflow_fixtures::BLOCK_SIZE;

#[test]
fn emits_one_disk_whose_reader_and_map_match_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db01.img");
    let stats = backflow_fixtures::generate_image(&path, IMAGE_SIZE, 3).unwrap();
    let source = ImageSource::new(ImageOptions {
        path: Some(path.clone()),
        ..Default::default()
    })
    .unwrap();
    let harness = Harness {
        workers: 3,
        ..Harness::new(Arc::new(source))
    };
    let (report, out) = harness.run(Vec::new());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    assert_eq!(out.len(), 1, "one disk whatever the worker count");
    let Message::Disk(disk) = &out[0] else {
        panic!("expected a disk, got {}", out[0].variant());
    };
    assert_eq!(disk.name, "db01");
    // Identified and located by its canonical path: another db01.img elsewhere is another machine.
    let canonical = path.canonicalize().unwrap();
    assert_eq!(disk.vm, canonical.display().to_string());
    assert_eq!(disk.location, canonical);
    assert_eq!(disk.reader.size(), IMAGE_SIZE);

    let file = File::open(&path).unwrap();
    let ranges = disk
        .reader
        .allocated()
        .unwrap()
        .expect("a regular file is sparse-aware");
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "unsorted or overlapping: {pair:?}"
        );
    }
    let allocated = |offset: u64| ranges.iter().any(|&(o, l)| o <= offset && offset < o + l);
    let mut from_reader = vec![0u8; BLOCK as usize];
    let mut from_file = vec![0u8; BLOCK as usize];
    for block in 0..IMAGE_SIZE / BLOCK {
        let offset = block * BLOCK;
        disk.reader.read_exact_at(&mut from_reader, offset).unwrap();
        file.read_exact_at(&mut from_file, offset).unwrap();
        assert_eq!(from_reader, from_file, "block at {offset}");
        if from_file.iter().any(|&b| b != 0) {
            assert!(
                allocated(offset),
                "non-zero block at {offset} reported as a hole"
            );
        }
    }
    // Every block the fixture left unwritten is a hole (ext4, XFS, tmpfs and btrfs all keep them).
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(total, IMAGE_SIZE - stats.hole, "{stats:?}");
    assert!(
        disk.reader
            .read_exact_at(&mut from_reader, IMAGE_SIZE - 1)
            .is_err()
    );
}

#[test]
fn options_name_the_disk_and_machine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.raw");
    File::create(&path).unwrap().set_len(4096).unwrap();
    let source = ImageSource::new(ImageOptions {
        path: Some(path),
        disk: "vdb".into(),
        vm: "web01".into(),
    })
    .unwrap();
    let (report, out) = Harness::new(Arc::new(source)).run(Vec::new());
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let Message::Disk(disk) = &out[0] else {
        panic!("expected a disk");
    };
    assert_eq!((disk.name.as_str(), disk.vm.as_str()), ("vdb", "web01"));
    assert_eq!(disk.reader.allocated().unwrap(), Some(Vec::new()));
}

#[test]
fn a_directory_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let source = ImageSource::new(ImageOptions {
        path: Some(dir.path().to_owned()),
        // The temporary directory's name (`.tmpXXXX`) is no disk name.
        disk: "d".into(),
        ..Default::default()
    })
    .unwrap();
    let (report, out) = Harness::new(Arc::new(source)).run(Vec::new());
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(out.is_empty());
    let shown = dir.path().display().to_string();
    assert!(report.errors[0].contains(&shown), "{:?}", report.errors);
    assert!(ImageSource::new(ImageOptions::default()).is_err());
}
