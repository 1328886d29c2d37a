//! Inputs and settings shared by the stage benchmarks in `benches/`, one file per stage.
//!
//! Every benchmark measures a stage's runtime value, built with its `new(Options)` constructor,
//! through [`Harness`]: the stage alone between a feeding thread and a counting sink, with the real
//! bounded channels and one thread per worker, so what is measured is what a pipeline gets. Inputs
//! are prepared here once, outside the timed part; messages hold shared buffers, so the copy of the
//! input each iteration takes costs next to nothing. Throughput is counted in disk bytes: the
//! plaintext the input stands for, zero runs and holes included.
//!
//! This library does not depend on criterion (building the workspace does not build it); the
//! benchmarks take their settings from [`criterion_config!`].

pub mod gc_repo;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backflow_pipeline::harness::Harness;
use backflow_pipeline::{
    ByteSize, Chunk, Digest, Disk, DiskSource, Message, OutcomeKind, Payload, RunReport, SizeOnly,
    Stage, digest_of,
};
use backflow_repository::Repository;
use bytes::Bytes;
use stage_generate::{Generate, GenerateOptions, Mix};
use tempfile::TempDir;

/// Bytes each iteration moves through a stage: large against the cost of starting the threads of
/// a run (well under a millisecond), small enough for a full `cargo bench` in minutes.
pub const DATA_BYTES: u64 = 64 << 20;

/// The repository's default chunk size, and the chunk size of every input.
pub const CHUNK_SIZE: u32 = backflow_repository::DEFAULT_CHUNK_SIZE;

/// Samples per case. Each sample runs the stage at least once over [`DATA_BYTES`], so ten samples
/// of a 100 MiB/s stage already take six seconds; the whole suite takes about two and a half
/// minutes on two cores.
pub const SAMPLES: usize = 10;

pub const WARM_UP: Duration = Duration::from_millis(500);

/// Target time of the samples of one case; slow cases take longer (one run per sample at least).
pub const MEASUREMENT: Duration = Duration::from_millis(2500);

/// The seed of every input: the same bytes on every machine and every run.
pub const SEED: u64 = 1;

/// Chunks the `generate` stage keeps in its pool: taking this many from each seed gives distinct
/// chunks, so that neither caches nor the repository see the same chunk twice.
const CHUNKS_PER_SEED: u64 = 64;

/// The criterion settings of every stage benchmark. A macro so that this library need not depend
/// on criterion; it expands in a benchmark target, which does. Each benchmark also sets flat
/// sampling on its group (the same number of runs per sample): one run already takes tens or
/// hundreds of milliseconds, and linear sampling would need 55 runs for ten samples.
#[macro_export]
macro_rules! criterion_config {
    () => {
        ::criterion::Criterion::default()
            .sample_size($crate::SAMPLES)
            .warm_up_time($crate::WARM_UP)
            .measurement_time($crate::MEASUREMENT)
            .without_plots()
    };
}

/// Times one case: `harness` on a fresh copy of `input` per iteration (the copy is not timed).
#[macro_export]
macro_rules! bench_case {
    ($group:expr, $id:expr, $harness:expr, $input:expr) => {
        $group.bench_function($id, |b| {
            b.iter_batched(
                || $input.clone(),
                |input| $crate::run(&$harness, input),
                ::criterion::BatchSize::PerIteration,
            )
        })
    };
}

/// Times one case whose stage value must be fresh for each run (a stage that keeps state between
/// runs, or one whose setup must be redone): `make_harness()` and a copy of `input` are built per
/// iteration, outside the timed part; the run, and dropping the harness, are timed.
#[macro_export]
macro_rules! bench_fresh_case {
    ($group:expr, $id:expr, $make_harness:expr, $input:expr) => {
        $group.bench_function($id, |b| {
            b.iter_batched(
                || (($make_harness)(), $input.clone()),
                |(harness, input)| $crate::run(&harness, input),
                ::criterion::BatchSize::PerIteration,
            )
        })
    };
}

/// A case's name: the data's name, with `/wN` when more than one worker runs.
pub fn case_id(name: &str, workers: usize) -> String {
    match workers {
        1 => name.to_owned(),
        _ => format!("{name}/w{workers}"),
    }
}

/// A harness that runs `stage` with `workers` workers and only counts its output.
pub fn harness(stage: impl Stage, workers: usize) -> Harness {
    Harness {
        workers,
        keep_output: false,
        ..Harness::new(Arc::new(stage))
    }
}

/// Runs the harness and checks that the run succeeded: a failing stage stops early and would
/// otherwise be reported as a fast one. The report is returned so that it is dropped after timing.
pub fn run(harness: &Harness, input: Vec<Message>) -> RunReport {
    let (report, _) = harness.run(input);
    assert_eq!(
        report.outcome,
        OutcomeKind::Succeeded,
        "the benchmarked run failed: {:?}",
        report.errors
    );
    report
}

/// The name of a data mix in case names.
pub fn mix_name(mix: Mix) -> &'static str {
    match mix {
        Mix::Random => "random",
        Mix::Text => "text",
        Mix::Binary => "binary",
        Mix::Zeros => "zeros",
        Mix::Mixed => "mixed",
    }
}

/// A disk that has only a size, as the synthetic sources and restores use.
fn synthetic_disk(vm: &str, name: &str, size: u64) -> Arc<Disk> {
    Arc::new(Disk {
        source: Arc::new(DiskSource {
            vm: vm.to_owned(),
            name: name.to_owned(),
            location: PathBuf::from("benchmark"),
            reader: Arc::new(SizeOnly(size)),
            tracking: None,
            definition: None,
        }),
        chunk_size: CHUNK_SIZE,
        parent: None,
    })
}

/// A seeded set of chunks of one data mix, from the `generate` stage's generator, forming one disk.
pub struct Data {
    pub mix: Mix,
    pub disk: Arc<Disk>,
    chunks: Vec<(Bytes, Digest)>,
}

impl Data {
    /// `bytes` of `mix`, in [`CHUNK_SIZE`] chunks that are all distinct (but for zeros).
    pub fn new(mix: Mix, bytes: u64) -> Data {
        let name = mix_name(mix);
        let disk = synthetic_disk(&format!("bench-{name}"), name, bytes);
        let mut chunks = Vec::with_capacity(disk.chunk_count() as usize);
        let mut seed = SEED;
        while (chunks.len() as u64) < disk.chunk_count() {
            let generate = Generate::new(GenerateOptions {
                size: ByteSize(CHUNKS_PER_SEED * u64::from(CHUNK_SIZE)),
                chunk_size: ByteSize(u64::from(CHUNK_SIZE)),
                data: mix,
                seed,
                hashed: true,
            })
            .expect("valid generate options");
            for index in 0..generate.chunk_count() {
                let at = chunks.len() as u64;
                if at == disk.chunk_count() {
                    break;
                }
                let Payload::Raw(data) = generate.chunk(index).payload else {
                    unreachable!("generate emits plaintext chunks");
                };
                let data = data.slice(..disk.chunk_len(at) as usize);
                let digest = digest_of(&data);
                chunks.push((data, digest));
            }
            seed += 1;
        }
        Data { mix, disk, chunks }
    }

    pub fn name(&self) -> &'static str {
        mix_name(self.mix)
    }

    /// Plaintext bytes: the disk's size.
    pub fn bytes(&self) -> u64 {
        self.disk.size()
    }

    fn messages(
        &self,
        mut make: impl FnMut(&Bytes, Digest) -> (Option<Digest>, Payload),
    ) -> Vec<Message> {
        self.chunks
            .iter()
            .enumerate()
            .map(|(index, (data, digest))| {
                let (digest, payload) = make(data, *digest);
                Message::Chunk(Chunk {
                    disk: self.disk.clone(),
                    index: index as u64,
                    digest,
                    verified: false,
                    payload,
                })
            })
            .collect()
    }

    /// Plaintext chunks as a reader emits them (no digest yet): the input of `dedup`.
    pub fn plain(&self) -> Vec<Message> {
        self.messages(|data, _| (None, Payload::Raw(data.clone())))
    }

    /// Plaintext chunks with their digest: the input of `zstd` and `verify`.
    pub fn hashed(&self) -> Vec<Message> {
        self.messages(|data, digest| (Some(digest), Payload::Raw(data.clone())))
    }

    /// Chunks encoded by the `zstd` stage's compressor at `level` (raw where zstd does not shrink
    /// them): the input of `repo-writer` and `unzstd`.
    pub fn encoded(&self, level: i32) -> Vec<Message> {
        let zstd = stage_zstd::Zstd::new(stage_zstd::ZstdOptions { level }).expect("valid level");
        let mut compressor = zstd.compressor().expect("a zstd context");
        self.messages(|data, digest| {
            let (codec, encoded) = compressor.encode(data).expect("compressing");
            let payload = Payload::Encoded {
                codec,
                data: encoded,
                raw_len: data.len() as u32,
            };
            (Some(digest), payload)
        })
    }

    /// Chunks the deduplicator found in the repository: only a reference to record.
    pub fn known(&self) -> Vec<Message> {
        self.messages(|_, digest| (Some(digest), Payload::Known))
    }
}

/// Bytes that `messages` carry once stored (payload lengths).
pub fn payload_bytes(messages: &[Message]) -> u64 {
    messages.iter().map(Message::payload_len).sum()
}

/// A generated disk image (`backflow_fixtures`: holes, zeros, text, binaries, compressed and
/// duplicated files, random data) in a temporary directory, opened as the `image` source opens it.
pub struct Image {
    _dir: TempDir,
    pub path: PathBuf,
    pub disk: Arc<Disk>,
    pub stats: backflow_fixtures::ImageStats,
}

impl Image {
    pub fn generate(size: u64, seed: u64) -> Image {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("mixed.raw");
        let stats = backflow_fixtures::generate_image(&path, size, seed).expect("generating");
        let file = stage_image::ImageFile::open(&path).expect("opening the image");
        let disk = Arc::new(Disk {
            source: Arc::new(DiskSource {
                vm: "bench-image".into(),
                name: DiskSource::names_for(&path, String::new(), String::new()).0,
                location: path.clone(),
                reader: Arc::new(file),
                tracking: None,
                definition: None,
            }),
            chunk_size: CHUNK_SIZE,
            parent: None,
        });
        Image {
            _dir: dir,
            path,
            disk,
            stats,
        }
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// The extents the `full` map plans: holes as zero runs, data in runs of at most
    /// `DEFAULT_MAX_EXTENT_CHUNKS`.
    pub fn extents(&self) -> Vec<Message> {
        let allocated = self.disk.source.reader.allocated().expect("mapping holes");
        backflow_planner::plan_chunks(
            self.size(),
            CHUNK_SIZE,
            allocated.as_deref(),
            backflow_planner::DEFAULT_MAX_EXTENT_CHUNKS,
        )
        .into_iter()
        .map(|(first, count, class)| {
            Message::Extent(backflow_pipeline::Extent {
                disk: self.disk.clone(),
                first,
                count,
                class,
            })
        })
        .collect()
    }

    /// The image's chunks as the `reader` stage emits them (plaintext and zero runs), in order.
    pub fn chunks(&self) -> Vec<Message> {
        let reader = stage_reader::Reader::new(stage_reader::ReaderOptions {}).expect("reader");
        let harness = Harness::new(Arc::new(reader));
        let (report, mut chunks) = harness.run(self.extents());
        assert_eq!(
            report.outcome,
            OutcomeKind::Succeeded,
            "{:?}",
            report.errors
        );
        chunks.sort_by_key(|message| match message {
            Message::Chunk(chunk) => chunk.index,
            _ => unreachable!("the reader emits chunks"),
        });
        chunks
    }

    /// The image's plaintext chunks with their digest, as a compressor receives them when nothing
    /// is deduplicated (zero chunks left out).
    pub fn hashed_chunks(&self) -> Vec<Message> {
        self.chunks()
            .into_iter()
            .filter_map(|message| match message {
                Message::Chunk(mut chunk) => {
                    let Payload::Raw(data) = &chunk.payload else {
                        return None;
                    };
                    chunk.digest = Some(digest_of(data));
                    Some(Message::Chunk(chunk))
                }
                _ => None,
            })
            .collect()
    }
}

/// A repository in a temporary directory, removed on drop.
pub struct Repo {
    dir: TempDir,
}

impl Repo {
    /// An empty repository with [`CHUNK_SIZE`] chunks.
    pub fn init() -> Repo {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Repository::init(&dir.path().join("repo"), CHUNK_SIZE).expect("creating a repository");
        Repo { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Commits one snapshot of `encoded` chunks (all chunks of their disk) with the
    /// `repo-writer` stage, and returns its id.
    pub fn commit(&self, encoded: Vec<Message>) -> String {
        let writer = stage_repo_writer::RepoWriter::new(Default::default()).expect("writer");
        let harness = Harness {
            repository: Some(self.path().into()),
            ..harness(writer, 1)
        };
        run(&harness, encoded)
            .snapshot
            .expect("the writer committed a snapshot")
    }
}

/// A sparse file of `size` bytes with `extents` blocks of 4 KiB written at even distances: a map
/// with many small data ranges between holes, for the planner.
pub fn fragmented_sparse_file(dir: &Path, size: u64, extents: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("sparse.raw");
    let file = std::fs::File::create(&path).expect("creating a sparse file");
    file.set_len(size).expect("sizing the sparse file");
    let stride = size / extents;
    for i in 0..extents {
        file.write_all_at(&[0xa5; 4096], i * stride + stride / 2)
            .expect("writing a block");
    }
    path
}
