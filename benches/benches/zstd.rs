//! `zstd`: compression of hashed plaintext chunks, per level and data, with one and two workers.

use backflow_benches::{
    DATA_BYTES, Data, Image, SEED, bench_case, criterion_config, harness, payload_bytes,
};
use backflow_pipeline::Message;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_zstd::{Zstd, ZstdOptions};

fn zstd(c: &mut Criterion) {
    let mut group = c.benchmark_group("zstd");
    group.sampling_mode(SamplingMode::Flat);
    let mut bench = |name: &str, level: i32, input: &Vec<Message>, workers: &[usize]| {
        group.throughput(Throughput::Bytes(payload_bytes(input)));
        for &workers in workers {
            let harness = harness(Zstd::new(ZstdOptions { level }).unwrap(), workers);
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
    bench("level1/text", 1, &text, &[1, 2]);
    bench("level1/random", 1, &random, &[1, 2]);
    bench("level1/mixed", 1, &mixed, &[1, 2]);
    bench("level1/image", 1, &image, &[1, 2]);
    bench("level3/text", 3, &text, &[1, 2]);
    bench("level3/random", 3, &random, &[1]);
    bench("level3/image", 3, &image, &[1]);
    // Zeros reach zstd only from a source that does not detect them; the level hardly matters.
    bench("zeros", stage_zstd::DEFAULT_LEVEL, &zeros, &[1]);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = zstd
}
criterion_main!(benches);
