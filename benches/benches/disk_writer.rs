//! `disk-writer`: restoring a generated image's verified chunks into a sparse file (holes and zero
//! chunks are not written), including the final fsync and rename. Throughput counts the image size.

use backflow_benches::{
    DATA_BYTES, Image, SEED, bench_fresh_case, case_id, criterion_config, harness,
};
use backflow_pipeline::Message;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_disk_writer::{DiskWriter, DiskWriterOptions};

fn disk_writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("disk-writer");
    group.sampling_mode(SamplingMode::Flat);
    let image = Image::generate(DATA_BYTES, SEED);
    group.throughput(Throughput::Bytes(image.size()));
    let input: Vec<Message> = image
        .chunks()
        .into_iter()
        .map(|message| match message {
            Message::Chunk(mut chunk) => {
                chunk.verified = true;
                Message::Chunk(chunk)
            }
            other => other,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("restored.raw");
    for workers in [1, 2] {
        let fresh = || {
            // Removing the previous restore is not part of the measurement.
            let _ = std::fs::remove_file(&target);
            let options = DiskWriterOptions {
                path: Some(target.clone()),
                sync: true,
                ..Default::default()
            };
            harness(DiskWriter::new(options).unwrap(), workers)
        };
        bench_fresh_case!(group, case_id("sparse", workers), fresh, input);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = disk_writer
}
criterion_main!(benches);
