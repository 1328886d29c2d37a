//! `lz4`: compression of hashed plaintext chunks per data, with one and two workers; the same
//! cases as `zstd`'s level-1 ones, so the two compare case by case.

use backflow_benches::{
    DATA_BYTES, Data, Image, SEED, bench_case, criterion_config, harness, payload_bytes,
};
use backflow_pipeline::Message;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_lz4::{Lz4, Lz4Options};

fn lz4(c: &mut Criterion) {
    let mut group = c.benchmark_group("lz4");
    group.sampling_mode(SamplingMode::Flat);
    let mut bench = |name: &str, input: &Vec<Message>, workers: &[usize]| {
        group.throughput(Throughput::Bytes(payload_bytes(input)));
        for &workers in workers {
            let harness = harness(Lz4::new(Lz4Options {}).unwrap(), workers);
            let id = match workers {
                1 => name.to_owned(),
                _ => format!("{name}/w{workers}"),
            };
            bench_case!(group, id, harness, input);
        }
    };

    let text = Data::new(Mix::Text, DATA_BYTES).hashed();
    let random = Data::new(Mix::Random, DATA_BYTES).hashed();
    let mixed = Data::new(Mix::Mixed, DATA_BYTES).hashed();
    let zeros = Data::new(Mix::Zeros, DATA_BYTES).hashed();
    // The fixture image's data chunks (its holes and zero chunks never reach a compressor).
    let image = Image::generate(DATA_BYTES, SEED).hashed_chunks();
    bench("text", &text, &[1, 2]);
    bench("random", &random, &[1, 2]);
    bench("mixed", &mixed, &[1, 2]);
    bench("image", &image, &[1, 2]);
    bench("zeros", &zeros, &[1]);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = lz4
}
criterion_main!(benches);
