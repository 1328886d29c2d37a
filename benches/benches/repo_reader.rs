//! `repo-reader`: reading a committed snapshot's chunks back from a repository (warm page cache):
//! chunk table, index lookups, pack reads. Throughput counts the disk's size.

use backflow_benches::{DATA_BYTES, Data, Repo, criterion_config, harness, run};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;
use stage_repo_reader::{RepoReader, RepoReaderOptions};

fn repo_reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("repo-reader");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    let repo = Repo::init();
    // Text is stored compressed (about a third of its size), random data raw.
    for mix in [Mix::Text, Mix::Random] {
        let data = Data::new(mix, DATA_BYTES);
        let snapshot = repo.commit(data.encoded(1));
        for workers in [1, 2] {
            let id = match workers {
                1 => data.name().to_owned(),
                _ => format!("{}/w{workers}", data.name()),
            };
            group.bench_function(id, |b| {
                b.iter_batched(
                    // The reader plans its snapshot once per value: a fresh one per run.
                    || {
                        let options = RepoReaderOptions {
                            snapshot: snapshot.clone(),
                            disk: String::new(),
                            ..Default::default()
                        };
                        let mut h = harness(RepoReader::new(options).unwrap(), workers);
                        h.repository = Some(repo.path().into());
                        h
                    },
                    |harness| run(&harness, Vec::new()),
                    criterion::BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = repo_reader
}
criterion_main!(benches);
