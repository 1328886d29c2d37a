//! `reader` over NBD: reading every chunk of a fully allocated 64 MiB qcow2 (pseudo-random data,
//! nothing to skip, no zero chunks) through a `qemu-nbd` export, as the `qemu-nbd` and `nbd`
//! sources hand it to the reader. Compared with `reader/mixed` (pread from the page cache), this
//! measures the NBD round trips, each worker on its own connection from the export's pool:
//! - `qcow2-random`: what the reader does, a group of chunks per `read_chunks_at`, pipelined on
//!   one connection (several requests in flight);
//! - `qcow2-random/per-chunk`: the same export behind a source that only has `read_exact_at`
//!   (the trait's default `read_chunks_at`), so one request per chunk, each waiting for its reply.
//!
//! The server runs for the whole benchmark, its qcow2 in the page cache; connections stay open
//! between runs, as they do during one backup.
//!
//! Needs `qemu-img` and `qemu-nbd` on the PATH: without them the benchmark panics, it does not
//! skip.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use backflow_benches::{
    CHUNK_SIZE, DATA_BYTES, SEED, bench_case, case_id, criterion_config, harness,
};
use backflow_pipeline::{BlockSource, Disk, DiskSource, Extent, Message};
use backflow_qemu::{NbdExport, QemuNbdServer, ServerConfig, ServerDir, server::EXPORT_NAME};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stage_reader::{Reader, ReaderOptions};

/// Most workers a case runs: the server and the export's pool allow as many connections.
const MAX_WORKERS: usize = 2;

/// Writes `bytes` of xorshift64* output: incompressible, never a zero chunk, the same on every run.
fn write_pseudo_random(path: &Path, bytes: u64, seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = Vec::with_capacity(bytes as usize);
    while (data.len() as u64) < bytes {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    data.truncate(bytes as usize);
    std::fs::write(path, data).expect("writing the raw image");
}

fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is required for the nbd_reader benchmark (Debian: qemu-utils): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The export without its `read_chunks_at`: every chunk is its own request, as before the reader
/// read in groups.
#[derive(Debug)]
struct PerChunk(Arc<NbdExport>);

impl BlockSource for PerChunk {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn allocated(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.0.allocated()
    }
}

/// A qemu-nbd serving a fully allocated qcow2 from a temporary directory; stopped by its pid when
/// dropped.
struct Export {
    dir: tempfile::TempDir,
    server_dir: ServerDir,
    disk: Arc<Disk>,
    /// The same export read chunk by chunk ([`PerChunk`]).
    per_chunk: Arc<Disk>,
}

impl Export {
    fn start(bytes: u64) -> Export {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let raw = dir.path().join("random.raw");
        let qcow2 = dir.path().join("random.qcow2");
        write_pseudo_random(&raw, bytes, SEED);
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                qcow2.to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&raw).expect("removing the raw image");
        let server_dir = ServerDir::create(dir.path()).expect("a server directory");
        let server = QemuNbdServer::start(
            &server_dir,
            &ServerConfig::read_only(&qcow2, "qcow2", MAX_WORKERS),
        )
        .unwrap_or_else(|e| {
            panic!("qemu-nbd is required for the nbd_reader benchmark (Debian: qemu-utils): {e}")
        });
        let export = Arc::new(
            NbdExport::open(
                server.socket().to_owned(),
                EXPORT_NAME,
                qcow2.clone(),
                MAX_WORKERS,
            )
            .expect("opening the NBD export"),
        );
        let disk_over = |reader: Arc<dyn BlockSource>| {
            Arc::new(Disk {
                source: Arc::new(DiskSource {
                    vm: "bench-nbd".into(),
                    name: "random".into(),
                    location: qcow2.clone(),
                    reader,
                    tracking: None,
                    definition: None,
                }),
                chunk_size: CHUNK_SIZE,
                parent: None,
            })
        };
        Export {
            dir,
            server_dir,
            per_chunk: disk_over(Arc::new(PerChunk(export.clone()))),
            disk: disk_over(export),
        }
    }

    /// The extents the `full` map plans from the export's `base:allocation` (all data here), over
    /// `disk`.
    fn extents(&self, disk: &Arc<Disk>) -> Vec<Message> {
        let reader = &disk.source.reader;
        let allocated = reader.allocated().expect("NBD block status");
        let planned = backflow_planner::plan_chunks(
            reader.size(),
            CHUNK_SIZE,
            allocated.as_deref(),
            backflow_planner::DEFAULT_MAX_EXTENT_CHUNKS,
        );
        planned
            .into_iter()
            .map(|(first, count, class)| {
                Message::Extent(Extent {
                    disk: disk.clone(),
                    first,
                    count,
                    class,
                })
            })
            .collect()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.server_dir.stop_and_remove() {
            eprintln!("stopping qemu-nbd in {}: {e}", self.dir.path().display());
        }
    }
}

fn nbd_reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("nbd-reader");
    group.sampling_mode(SamplingMode::Flat);
    let export = Export::start(DATA_BYTES);
    group.throughput(Throughput::Bytes(export.disk.size()));
    let cases = [
        ("qcow2-random", export.extents(&export.disk)),
        ("qcow2-random/per-chunk", export.extents(&export.per_chunk)),
    ];
    for workers in [1, MAX_WORKERS] {
        for (name, extents) in &cases {
            let harness = harness(Reader::new(ReaderOptions {}).unwrap(), workers);
            bench_case!(group, case_id(name, workers), harness, extents);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config!();
    targets = nbd_reader
}
criterion_main!(benches);
