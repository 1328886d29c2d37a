//! `dedup`: BLAKE3 of each plaintext chunk and the "already stored?" decision, without and with
//! lookups in a repository's index.

use backflow_benches::{
    DATA_BYTES, Data, Repo, bench_fresh_case, case_id, criterion_config, harness,
};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
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
            bench_fresh_case!(
                group,
                case_id(data.name(), workers),
                || harness(no_lookup(), workers),
                input
            );
        }
    }

    // Every chunk looked up in an index of 512 other chunks (a miss), or of the same chunks (a hit).
    let other = Repo::init();
    other.commit(text.encoded(1));
    let same = Repo::init();
    same.commit(random.encoded(1));
    let input = random.plain();
    for (case, repo) in [("random/repo-new", &other), ("random/repo-known", &same)] {
        let lookup = || {
            let mut h = harness(Dedup::new(DedupOptions::default()).unwrap(), 1);
            h.repository = Some(repo.path().into());
            h
        };
        bench_fresh_case!(group, case, lookup, input);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = dedup
}
criterion_main!(benches);
