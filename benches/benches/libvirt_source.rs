//! The `libvirt` source on a real running domain (libvirtd at `qemu:///system`, which
//! `scripts/setup.sh` starts): what backing up a VM costs besides reading.
//! - `libvirt/job`: the source alone: connect, begin a pull-mode backup job with a checkpoint,
//!   open the export, then the cleanup (abort the job, wait until libvirt ended it, delete the
//!   uncommitted checkpoint). The fixed cost of every VM backup.
//! - `libvirt/read-64M`: source -> `full` -> `reader` (2 workers) on a 64 MiB disk that the guest
//!   wrote in full: reading through the job's copy-before-write export, to compare with
//!   `nbd-reader/qcow2-random` (a private qemu-nbd).
//!
//! Needs libvirtd and QEMU: without them the benchmark panics, it does not skip.

use std::sync::Arc;

use backflow_benches::{criterion_config, harness, run};
use backflow_pipeline::units::ByteSize;
use backflow_pipeline::{OutcomeKind, Pipeline, RunOptions};
use backflow_testkit::libvirt::{Domain, URI};
use backflow_testkit::placed;
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_discard::{Discard, DiscardOptions};
use stage_full_map::{FullMap, FullMapOptions};
use stage_libvirt::{LibvirtOptions, LibvirtSource};
use stage_reader::{Reader, ReaderOptions};

const DISK: u64 = 64 << 20;

fn source(vm: &Domain) -> LibvirtSource {
    LibvirtSource::new(LibvirtOptions {
        domain: vm.name().to_owned(),
        uri: URI.to_owned(),
        freeze: "off".into(),
        ..Default::default()
    })
    .expect("libvirt source options")
}

fn read_pipeline(vm: &Domain) -> Pipeline {
    let map = FullMap::new(FullMapOptions {
        chunk_size: Some(ByteSize(u64::from(backflow_benches::CHUNK_SIZE))),
        ..Default::default()
    })
    .unwrap();
    Pipeline {
        name: "libvirt-read".into(),
        repository: None,
        stages: vec![
            placed("libvirt", Arc::new(source(vm)), 1),
            placed("full", Arc::new(map), 1),
            placed(
                "reader",
                Arc::new(Reader::new(ReaderOptions {}).unwrap()),
                2,
            ),
            placed(
                "discard",
                Arc::new(Discard::new(DiscardOptions::default()).unwrap()),
                1,
            ),
        ],
        finaliser: None,
    }
}

fn libvirt_source(c: &mut Criterion) {
    let mut group = c.benchmark_group("libvirt");
    group.sampling_mode(SamplingMode::Flat);
    let vm = Domain::start("bench-libvirt", &[("vda", "64M")]);
    vm.guest_write("vda", &format!("write -P 0x5a 0 {DISK}"));

    group.bench_function("job", |b| {
        b.iter_batched(
            || harness(source(&vm), 1),
            |h| run(&h, Vec::new()),
            BatchSize::PerIteration,
        )
    });

    group.throughput(Throughput::Bytes(DISK));
    group.bench_function("read-64M", |b| {
        b.iter_batched(
            || read_pipeline(&vm),
            |pipeline| {
                let report = pipeline.run(RunOptions::default());
                assert_eq!(
                    report.outcome,
                    OutcomeKind::Succeeded,
                    "{:?}",
                    report.errors
                );
                assert_eq!(report.source_bytes_read, DISK);
                report
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = libvirt_source
}
criterion_main!(benches);
