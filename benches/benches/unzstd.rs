//! `unzstd`: decoding stored chunks back to plaintext (zstd frames, or a copy of raw ones).

use backflow_benches::{DATA_BYTES, Data, bench_case, case_id, criterion_config, harness};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_unzstd::{Unzstd, UnzstdOptions};

fn unzstd(c: &mut Criterion) {
    let mut group = c.benchmark_group("unzstd");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    // Text compresses (zstd level 1), random data is stored raw.
    for mix in [Mix::Text, Mix::Random] {
        let data = Data::new(mix, DATA_BYTES);
        let input = data.encoded(1);
        for workers in [1, 2] {
            let harness = harness(Unzstd::new(UnzstdOptions {}).unwrap(), workers);
            bench_case!(group, case_id(data.name(), workers), harness, input);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = unzstd
}
criterion_main!(benches);
