//! The `full` map against a real repository and real images: the plan covers every chunk once,
//! data where the file is allocated, and the parent is the same disk of the machine's latest
//! snapshot, or none (with a warning) when the disk was resized.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ByteSize, ChunkRef, Disk, DiskSource, ExtentClass, Message, OutcomeKind, RunReport, digest_of,
};
use backflow_repository::{Codec, DiskMeta, Location, Repository};
use stage_full_map::{FullMap, FullMapOptions};
use stage_image::ImageFile;

const CHUNK: u32 = 64 * 1024;
const IMAGE_SIZE: u64 = 4 << 20;

/// Commits a snapshot of the image at `path` as disk `disk` of `vm` through the repository API;
/// returns its id and chunk table.
fn commit_image(repo: &Repository, vm: &str, disk: &str, path: &Path) -> (String, Vec<ChunkRef>) {
    let data = std::fs::read(path).unwrap();
    let session = repo.begin_backup(vm).unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: disk.into(),
            size: data.len() as u64,
            chunk_size: repo.chunk_size(),
            location: path.display().to_string(),
            cbt: None,
        })
        .unwrap();
    let mut packs = session.pack_writer();
    let mut stored = HashSet::new();
    let mut table = Vec::new();
    for (index, chunk) in data.chunks(repo.chunk_size() as usize).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            table.push(ChunkRef::Zero);
            continue;
        }
        let digest = digest_of(chunk);
        if stored.insert(digest) && repo.lookup(&digest).unwrap().is_none() {
            packs
                .add(digest, Codec::None, chunk.len() as u32, chunk)
                .unwrap();
        }
        session
            .set_chunk(slot, index as u64, ChunkRef::Data(digest))
            .unwrap();
        table.push(ChunkRef::Data(digest));
    }
    packs.finish().unwrap();
    (session.commit(None).unwrap().id, table)
}

fn disk_message(vm: &str, name: &str, path: &Path) -> Message {
    Message::Disk(Arc::new(DiskSource {
        vm: vm.into(),
        name: name.into(),
        location: path.to_owned(),
        reader: Arc::new(ImageFile::open(path).unwrap()),
        tracking: None,
        definition: None,
    }))
}

/// Runs the map on one disk; returns the report and the disk all extents share, after checking
/// that the extents cover every chunk exactly once.
fn plan(repo: Option<&Path>, option_chunk: Option<u64>, disk: Message) -> (RunReport, Arc<Disk>) {
    let map = FullMap::new(FullMapOptions {
        chunk_size: option_chunk.map(ByteSize),
        max_extent_chunks: 5,
    })
    .unwrap();
    let harness = Harness {
        repository: repo.map(Location::from),
        ..Harness::new(Arc::new(map))
    };
    let (report, out) = harness.run(vec![disk]);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let extents: Vec<_> = out
        .into_iter()
        .map(|m| match m {
            Message::Extent(e) => e,
            other => panic!("expected extents, got {}", other.variant()),
        })
        .collect();
    let disk = extents[0].disk.clone();
    let mut next = 0;
    for e in &extents {
        assert!(Arc::ptr_eq(&e.disk, &disk), "one Disk per source");
        assert_eq!(e.first, next, "extents in order, without gap or overlap");
        assert!(e.count >= 1 && (e.class != ExtentClass::Data || e.count <= 5));
        assert_ne!(
            e.class,
            ExtentClass::Unchanged,
            "a full map reads everything"
        );
        next += e.count;
    }
    assert_eq!(next, disk.chunk_count());
    (report, disk)
}

fn assert_parent_is(disk: &Disk, id: &str, table: &[ChunkRef]) {
    let parent = disk.parent.as_ref().expect("a parent snapshot");
    assert_eq!(parent.snapshot_id(), id);
    assert_eq!(parent.chunk_count(), table.len() as u64);
    for (i, expected) in table.iter().enumerate() {
        assert_eq!(parent.get(i as u64).unwrap(), *expected, "parent chunk {i}");
    }
}

#[test]
fn parent_is_the_latest_snapshot_of_the_same_disk() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 11).unwrap();
    let (first, _) = commit_image(&repo, "web01", "vda", &image);
    backflow_fixtures::change_image(&image, 0.2, 12).unwrap();
    let (second, table) = commit_image(&repo, "web01", "vda", &image);
    // Another machine's later snapshot of a disk with the same name is not a parent.
    commit_image(&repo, "db01", "vda", &image);
    assert_ne!(first, second);

    // The option's chunk size gives way to the repository's.
    let (report, disk) = plan(
        Some(&repo_path),
        Some(128 * 1024),
        disk_message("web01", "vda", &image),
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(disk.chunk_size, CHUNK);
    assert_parent_is(&disk, &second, &table);
}

#[test]
fn resized_disk_gets_no_parent_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 5).unwrap();
    let (id, _) = commit_image(&repo, "web01", "vda", &image);
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(IMAGE_SIZE + u64::from(CHUNK))
        .unwrap();

    let (report, disk) = plan(Some(&repo_path), None, disk_message("web01", "vda", &image));
    assert!(disk.parent.is_none());
    assert_eq!(disk.chunk_count(), IMAGE_SIZE / u64::from(CHUNK) + 1);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains("vda") && report.warnings[0].contains(&id),
        "the warning names the disk and the snapshot: {}",
        report.warnings[0]
    );
}

#[test]
fn other_machine_or_disk_name_means_no_parent_silently() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 5).unwrap();
    commit_image(&repo, "web01", "vda", &image);
    for (vm, name) in [("web02", "vda"), ("web01", "vdb")] {
        let (report, disk) = plan(Some(&repo_path), None, disk_message(vm, name, &image));
        assert!(disk.parent.is_none(), "{vm}/{name}");
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }
}

#[test]
fn data_extents_are_exactly_the_allocated_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.raw");
    backflow_fixtures::generate_image(&image, IMAGE_SIZE, 9).unwrap();
    let file = std::fs::File::open(&image).unwrap();
    let mut allocated = HashSet::new();
    for (offset, len) in stage_image::allocated_ranges(&file, IMAGE_SIZE).unwrap() {
        allocated.extend(offset / 65536..(offset + len).div_ceil(65536));
    }
    let map = FullMap::new(FullMapOptions {
        chunk_size: Some(ByteSize(65536)),
        max_extent_chunks: 5,
    })
    .unwrap();
    let (report, out) = Harness::new(Arc::new(map)).run(vec![disk_message("m", "vda", &image)]);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "{:?}",
        report.errors
    );
    let mut data = HashSet::new();
    for m in out {
        let Message::Extent(e) = m else { panic!() };
        if e.class == ExtentClass::Data {
            data.extend(e.first..e.first + e.count);
        }
    }
    assert_eq!(data, allocated);
    assert!(!data.is_empty() && (data.len() as u64) < IMAGE_SIZE / 65536);
}

#[test]
fn no_repository_and_no_chunk_size_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vda.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let map = FullMap::new(FullMapOptions::default()).unwrap();
    let (report, out) = Harness::new(Arc::new(map)).run(vec![disk_message("m", "vda", &image)]);
    assert_eq!(report.outcome, OutcomeKind::Failed);
    assert!(out.is_empty());
    assert!(
        report.errors[0].contains("repository"),
        "{:?}",
        report.errors
    );
}

/// `find_parent` documents "the machine's latest snapshot holding a disk of the same name", but
/// only looks at the machine's latest snapshot: backing up the disks of one VM in separate runs
/// (the `image` source reads one disk per run) leaves each disk without a parent.
#[test]
fn parent_is_found_past_a_later_snapshot_of_another_disk_of_the_machine() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = Repository::init(&repo_path, CHUNK).unwrap();
    let vda = dir.path().join("vda.raw");
    let vdb = dir.path().join("vdb.raw");
    backflow_fixtures::generate_image(&vda, IMAGE_SIZE, 1).unwrap();
    backflow_fixtures::generate_image(&vdb, IMAGE_SIZE, 2).unwrap();
    let (vda_id, vda_table) = commit_image(&repo, "web01", "vda", &vda);
    commit_image(&repo, "web01", "vdb", &vdb);

    let (_, disk) = plan(Some(&repo_path), None, disk_message("web01", "vda", &vda));
    assert_parent_is(&disk, &vda_id, &vda_table);
}
