//! `dedup`: BLAKE3 of each plaintext chunk and the "already stored?" decision, without and with
//! lookups in a repository's index.

use backflow_benches::{DATA_BYTES, Data, Repo, criterion_config, harness, run};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_dedup::{Dedup, DedupOptions};
use stage_generate::Mix;

fn dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    let random = Data::new(Mix::Random, DATA_BYTES);
    let text = Data::new(Mix::Text, DATA_BYTES);

    // The set of digests seen in this run lives in the stage value: a fresh one per run.
    let no_lookup = || {
        Dedup::new(DedupOptions {
            repository_lookup: false,
        })
        .unwrap()
    };
    // BLAKE3 does not care about content: text only shows that, with one worker.
    for (data, workers) in [(&random, &[1, 2][..]), (&text, &[1][..])] {
        let input = data.plain();
        for &workers in workers {
            let id = match workers {
                1 => data.name().to_owned(),
                _ => format!("{}/w{workers}", data.name()),
            };
            group.bench_function(id, |b| {
                b.iter_batched(
                    || (harness(no_lookup(), workers), input.clone()),
                    |(harness, input)| run(&harness, input),
                    BatchSize::PerIteration,
                )
            });
        }
    }

    // Every chunk looked up in an index of 512 other chunks (a miss), or of the same chunks (a hit).
    let other = Repo::init();
    other.commit(text.encoded(1));
    let same = Repo::init();
    same.commit(random.encoded(1));
    let input = random.plain();
    for (case, repo) in [("random/repo-new", &other), ("random/repo-known", &same)] {
        group.bench_function(case, |b| {
            b.iter_batched(
                || {
                    let mut h = harness(Dedup::new(DedupOptions::default()).unwrap(), 1);
                    h.repository = Some(repo.path());
                    (h, input.clone())
                },
                |(harness, input)| run(&harness, input),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = dedup
}
criterion_main!(benches);
