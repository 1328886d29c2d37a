//! `backflow serve`'s read path: a restore point's disk read through the NBD server over a unix
//! socket pair with our client, 4 MiB sequential reads (the read-ahead engages). Cases: `cold`
//! (a fresh restore point per run: every chunk loaded from the repository, warm page cache),
//! `cached` (a cache holding the whole disk: the server and protocol alone), and `memory` (an
//! in-memory export of the same bytes: the protocol without the repository). Throughput counts
//! the disk's size.

use std::sync::Arc;

use backflow_benches::{DATA_BYTES, Data, Repo, criterion_config};
use backflow_nbd::server::{Exports, MemoryExport, Server, serve_pair};
use backflow_nbd::{Client, Transport};
use backflow_repository::Repository;
use backflow_serve::{RestorePoint, ServeOptions};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_generate::Mix;

/// Bytes per client read.
const READ: usize = 4 << 20;

fn read_all(server: &Arc<Server>, export: &str, buf: &mut [u8]) {
    let (stream, _) = serve_pair(server).expect("a socket pair");
    let mut client =
        Client::connect(Transport::from_stream(stream, "pair"), export, &[]).expect("connecting");
    let size = client.size() as usize;
    let mut at = 0;
    while at < size {
        let n = READ.min(size - at);
        client.read_at(at as u64, &mut buf[..n]).expect("reading");
        at += n;
    }
    client.close().expect("closing");
}

fn point(repo: &Repository, id: &str, cache: u64) -> RestorePoint {
    let options = ServeOptions {
        cache_bytes: cache,
        ..ServeOptions::default()
    };
    RestorePoint::new(repo.clone(), repo.open_snapshot(id).unwrap(), &options).unwrap()
}

fn serve(c: &mut Criterion) {
    let mut group = c.benchmark_group("serve");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(DATA_BYTES));
    let repo = Repo::init();
    let mut buf = vec![0u8; READ];
    for mix in [Mix::Text, Mix::Random] {
        let data = Data::new(mix, DATA_BYTES);
        let id = repo.commit(data.encoded(1));
        let repository = Repository::open(&repo.path()).unwrap();
        let disk = data.disk.source.name.clone();
        group.bench_function(format!("{}/cold", data.name()), |b| {
            b.iter_batched(
                || {
                    let p = point(&repository, &id, 256 << 20);
                    let server = Server::new(p.exports(None).unwrap());
                    (p, server)
                },
                |(p, server)| {
                    read_all(&server, &disk, &mut buf);
                    drop(server);
                    p.close();
                },
                criterion::BatchSize::PerIteration,
            )
        });
        let warm = point(&repository, &id, 2 * DATA_BYTES);
        let server = Server::new(warm.exports(None).unwrap());
        read_all(&server, &disk, &mut buf);
        group.bench_function(format!("{}/cached", data.name()), |b| {
            b.iter(|| read_all(&server, &disk, &mut buf))
        });
        let mut whole = vec![0u8; DATA_BYTES as usize];
        {
            let (stream, _) = serve_pair(&server).unwrap();
            let mut client =
                Client::connect(Transport::from_stream(stream, "p"), &disk, &[]).unwrap();
            client.read_at(0, &mut whole).unwrap();
        }
        let mut exports = Exports::new();
        exports.add("m", Arc::new(MemoryExport::new(whole)), true);
        let memory = Server::new(exports);
        group.bench_function(format!("{}/memory", data.name()), |b| {
            b.iter(|| read_all(&memory, "m", &mut buf))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = serve
}
criterion_main!(benches);
