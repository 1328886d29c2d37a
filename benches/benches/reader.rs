//! `reader`: reading the planned extents of a generated image (warm page cache) and recognising
//! all-zero chunks. Throughput counts the whole image; its holes cost one message per run.

use backflow_benches::{DATA_BYTES, Image, SEED, criterion_config, harness, run};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
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
        group.bench_function(id, |b| {
            b.iter_batched(
                || extents.clone(),
                |input| run(&harness, input),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = reader
}
criterion_main!(benches);
