//! `full`: planning a full read from the allocated ranges of an image (SEEK_DATA / SEEK_HOLE) into
//! chunk-aligned extents. Throughput counts the disk's size: what the plan covers.

use std::sync::Arc;

use backflow_benches::{
    CHUNK_SIZE, DATA_BYTES, Image, SEED, bench_case, criterion_config, fragmented_sparse_file,
    harness,
};
use backflow_pipeline::{ByteSize, DiskSource, Message};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_full_map::{FullMap, FullMapOptions};
use stage_image::ImageFile;

/// A large disk with many small allocated ranges: 16 GiB, one 4 KiB block every 4 MiB.
const SPARSE_SIZE: u64 = 16 << 30;
const SPARSE_EXTENTS: u64 = 4096;

fn disk(path: &std::path::Path) -> Message {
    Message::Disk(Arc::new(DiskSource {
        vm: "bench".into(),
        name: "sparse".into(),
        location: path.to_owned(),
        reader: Arc::new(ImageFile::open(path).expect("opening the image")),
        tracking: None,
        definition: None,
    }))
}

fn full_map(c: &mut Criterion) {
    let mut group = c.benchmark_group("full");
    group.sampling_mode(SamplingMode::Flat);
    let options = || FullMapOptions {
        chunk_size: Some(ByteSize(u64::from(CHUNK_SIZE))),
        ..FullMapOptions::default()
    };
    let harness = harness(FullMap::new(options()).unwrap(), 1);

    let dir = tempfile::tempdir().unwrap();
    let sparse = vec![disk(&fragmented_sparse_file(
        dir.path(),
        SPARSE_SIZE,
        SPARSE_EXTENTS,
    ))];
    group.throughput(Throughput::Bytes(SPARSE_SIZE));
    bench_case!(group, "sparse-map", harness, sparse);

    let image = Image::generate(DATA_BYTES, SEED);
    let mixed = vec![disk(&image.path)];
    group.throughput(Throughput::Bytes(image.size()));
    bench_case!(group, "mixed", harness, mixed);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = full_map
}
criterion_main!(benches);
