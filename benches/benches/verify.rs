//! `verify`: BLAKE3 of each restored plaintext chunk, compared with its digest.

use backflow_benches::{DATA_BYTES, Data, bench_case, case_id, criterion_config, harness};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
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
        bench_case!(group, case_id(data.name(), workers), harness, input);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = verify
}
criterion_main!(benches);
