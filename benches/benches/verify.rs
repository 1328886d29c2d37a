//! `verify`: BLAKE3 of each restored plaintext chunk, compared with its digest.

use backflow_benches::{DATA_BYTES, Data, criterion_config, harness, run};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_verify::{Verify, VerifyOptions};

fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    // BLAKE3 does not care about content: one mix is enough.
    let data = Data::new(Mix::Mixed, DATA_BYTES);
    let input = data.hashed();
    for workers in [1, 2] {
        let harness = harness(Verify::new(VerifyOptions {}).unwrap(), workers);
        let id = match workers {
            1 => data.name().to_owned(),
            _ => format!("{}/w{workers}", data.name()),
        };
        group.bench_function(id, |b| {
            b.iter_batched(
                || input.clone(),
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
    targets = verify
}
criterion_main!(benches);
