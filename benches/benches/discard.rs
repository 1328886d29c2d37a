//! `discard`: the sink that keeps nothing: the runtime's cost per chunk with no work at all.

use backflow_benches::{DATA_BYTES, Data, bench_case, criterion_config, harness};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_discard::{Discard, DiscardOptions};
use stage_generate::Mix;

fn discard(c: &mut Criterion) {
    let mut group = c.benchmark_group("discard");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    let data = Data::new(Mix::Mixed, DATA_BYTES);
    let input = data.plain();
    let harness = harness(Discard::new(DiscardOptions {}).unwrap(), 1);
    bench_case!(group, data.name(), harness, input);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = discard
}
criterion_main!(benches);
