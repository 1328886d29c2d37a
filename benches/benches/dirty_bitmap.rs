//! `dirty-bitmap`: planning an incremental read of a large disk from its parent snapshot and the
//! changes its tracking reports (a test double here: the NBD block status query itself is
//! measured by the NBD benchmarks). Throughput counts the disk's size: what the plan covers.

use std::sync::Arc;

use backflow_benches::{bench_case, criterion_config, harness};
use backflow_pipeline::{ChangeTracking, Changes, DiskSource, Message, SizeOnly};
use backflow_repository::{ChunkRef, DiskMeta, Repository};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_dirty_bitmap::{DirtyBitmap, DirtyBitmapOptions};

/// 16 GiB in 128 KiB chunks, with 5% of it dirty in 64 KiB granules spread evenly.
const SIZE: u64 = 16 << 30;
const CHUNK: u32 = 128 << 10;
const GRANULE: u64 = 64 << 10;

#[derive(Debug)]
struct Dirty(Vec<(u64, u64)>);

impl ChangeTracking for Dirty {
    fn next_state(&self) -> serde_json::Value {
        serde_json::json!({"method": "bench"})
    }

    fn changed_since(&self, _state: &serde_json::Value) -> std::io::Result<Changes> {
        Ok(Changes::Since(self.0.clone()))
    }

    fn committed(&self, _snapshot: &str) {}
}

fn dirty_bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirty-bitmap");
    group.sampling_mode(SamplingMode::Flat);

    // The parent: one snapshot of the disk, every chunk zero, recording a tracking state.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Repository::init(&root, CHUNK).unwrap();
    let session = repo.begin_backup("bench").unwrap();
    let slot = session
        .add_disk(DiskMeta {
            name: "vda".into(),
            size: SIZE,
            chunk_size: CHUNK,
            location: "bench".into(),
            cbt: Some(serde_json::json!({"method": "bench"})),
        })
        .unwrap();
    let chunks = SIZE / u64::from(CHUNK);
    session
        .set_chunks(slot, 0, &vec![ChunkRef::Zero; chunks as usize])
        .unwrap();
    session.pack_writer().finish().unwrap();
    session.commit(None).unwrap();

    let granules = SIZE / GRANULE;
    let dirty: Vec<(u64, u64)> = (0..granules / 20)
        .map(|i| (i * 20 * GRANULE, GRANULE))
        .collect();
    let disk = vec![Message::Disk(Arc::new(DiskSource {
        vm: "bench".into(),
        name: "vda".into(),
        location: "bench".into(),
        reader: Arc::new(SizeOnly(SIZE)),
        tracking: Some(Arc::new(Dirty(dirty))),
        definition: None,
    }))];
    let mut harness = harness(DirtyBitmap::new(DirtyBitmapOptions::default()).unwrap(), 1);
    harness.repository = Some(root.clone().into());
    group.throughput(Throughput::Bytes(SIZE));
    bench_case!(group, "scattered-5pct", harness, disk);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = dirty_bitmap
}
criterion_main!(benches);
