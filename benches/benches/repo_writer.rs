//! `repo-writer`: storing chunks into a fresh repository and committing the snapshot (packs,
//! fsyncs, index, manifest), all inside the timed part.

use backflow_benches::{DATA_BYTES, Data, Repo, criterion_config, harness, payload_bytes, run};
use backflow_pipeline::Message;
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_repo_writer::RepoWriter;

fn repo_writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("repo-writer");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    let random = Data::new(Mix::Random, DATA_BYTES);
    // Incompressible chunks are stored raw: the stored bytes are the disk bytes.
    let new_chunks = random.encoded(1);
    assert_eq!(payload_bytes(&new_chunks), DATA_BYTES);
    let known_chunks = random.known();

    let cases: [(&str, &Vec<Message>, &[usize]); 2] = [
        ("new-chunks", &new_chunks, &[1, 2]),
        ("known-chunks", &known_chunks, &[1]),
    ];
    for (name, input, workers) in cases {
        for &workers in workers {
            let id = match workers {
                1 => name.to_owned(),
                _ => format!("{name}/w{workers}"),
            };
            group.bench_function(id, |b| {
                b.iter_batched(
                    || {
                        let repo = Repo::init();
                        let mut h = harness(RepoWriter::new(Default::default()).unwrap(), workers);
                        h.repository = Some(repo.path().into());
                        (repo, h, input.clone())
                    },
                    // The repository is removed after timing.
                    |(repo, harness, input)| (run(&harness, input), repo),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = repo_writer
}
criterion_main!(benches);
