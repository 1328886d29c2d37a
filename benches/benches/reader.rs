//! `reader`: reading the planned extents of a generated image (warm page cache) and recognising
//! all-zero chunks. Throughput counts the whole image; its holes cost one message per run.

use backflow_benches::{DATA_BYTES, Image, SEED, bench_case, criterion_config, harness};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_reader::{Reader, ReaderOptions};

fn reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("reader");
    group.sampling_mode(SamplingMode::Flat);
    let image = Image::generate(DATA_BYTES, SEED);
    group.throughput(Throughput::Bytes(image.size()));
    let extents = image.extents();
    for workers in [1, 2] {
        let harness = harness(Reader::new(ReaderOptions {}).unwrap(), workers);
        let id = match workers {
            1 => "mixed".to_owned(),
            _ => format!("mixed/w{workers}"),
        };
        bench_case!(group, id, harness, extents);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = reader
}
criterion_main!(benches);
