//! Source stage `generate`: seeded synthetic chunks, for measuring one stage by itself.
//!
//! A pool of distinct chunks is generated once per mix (random, text-like, structured binary,
//! zeros) and emitted again and again as shared buffers, so generating costs next to nothing and
//! the stages downstream are what is measured. The same seed gives the same stream.

use std::sync::Arc;

use backflow_pipeline::Digest;
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    ByteSize, Chunk, ChunkHasher, Disk, DiskSource, InvalidOption, Message, MessageType, Payload,
    SizeOnly, Stage, StageError, StageIo, Work, Worker, digest_of,
};
use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "generate";

/// Distinct chunks in the pool: enough that caches do not flatter the stage under test.
const POOL_CHUNKS: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// Incompressible bytes.
    Random,
    /// Words and lines: compresses about 3-4x.
    Text,
    /// Structured binary (instruction-like patterns): compresses about 2x.
    Binary,
    /// All zeros.
    Zeros,
    /// A disk-like blend: a third random, a third text, a sixth binary, a sixth zeros.
    #[default]
    Mixed,
}

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct GenerateOptions {
    /// Total bytes to produce.
    #[serde(default = "default_size")]
    pub size: ByteSize,
    /// Bytes per chunk.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    /// random, text, binary, zeros or mixed (a disk-like blend).
    #[serde(default)]
    pub data: Mix,
    /// Seed of the generator: the same seed gives the same data.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Emit hashed chunks (digest set), to feed a compressor without a deduplicator.
    #[serde(default)]
    pub hashed: bool,
}

fn default_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_chunk_size() -> ByteSize {
    ByteSize(128 << 10)
}
fn default_seed() -> u64 {
    1
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            size: default_size(),
            chunk_size: default_chunk_size(),
            data: Mix::default(),
            seed: default_seed(),
            hashed: false,
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "source: seeded synthetic chunks, for tuning one stage",
    input: None,
    output: Some(MessageType::Chunk),
    repository: RepositoryUse::No,
    options: option_docs::<GenerateOptions>,
    build: Build::Stage(|options| build_stage(options, Generate::new)),
};

pub struct Generate {
    options: GenerateOptions,
    pool: Vec<(Bytes, Digest)>,
    disk: Arc<Disk>,
}

impl Generate {
    pub fn new(options: GenerateOptions) -> Result<Self, InvalidOption> {
        let chunk_size = options.chunk_size.bytes();
        if chunk_size == 0 || chunk_size > 64 << 20 {
            return Err(InvalidOption::new(
                "chunk_size",
                "must be between 1 and 64M",
            ));
        }
        let pool = make_pool(options.data, chunk_size as usize, options.seed);
        let disk = Arc::new(Disk {
            source: Arc::new(DiskSource {
                vm: "generated".into(),
                name: "generated".into(),
                location: "generate".into(),
                reader: Arc::new(SizeOnly(options.size.bytes())),
                tracking: None,
                definition: None,
            }),
            chunk_size: chunk_size as u32,
            parent: None,
        });
        Ok(Generate {
            options,
            pool,
            disk,
        })
    }

    /// The chunks of this stream, for benchmarks that feed a stage directly (digests of plain BLAKE3).
    pub fn chunk(&self, index: u64) -> Chunk {
        self.chunk_named(index, None)
    }

    /// Chunk `index`; with `keyed`, its digest comes from that hasher and `digests` (the pool's under it).
    fn chunk_named(&self, index: u64, keyed: Option<(&ChunkHasher, &[Digest])>) -> Chunk {
        let at = (index as usize) % self.pool.len();
        let (data, plain_digest) = &self.pool[at];
        let digest = keyed.map_or(plain_digest, |(_, d)| &d[at]);
        let len = self.disk.chunk_len(index) as usize;
        // The short last chunk is a prefix of a pool chunk: its digest is its own.
        let digest = match (len == data.len(), keyed) {
            (true, _) => *digest,
            (false, None) => digest_of(&data[..len]),
            (false, Some((h, _))) => h.digest(&data[..len]),
        };
        let data = data.slice(..len);
        Chunk {
            disk: self.disk.clone(),
            index,
            digest: self.options.hashed.then_some(digest),
            verified: false,
            payload: Payload::Raw(data),
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.disk.chunk_count()
    }
}

fn make_pool(mix: Mix, chunk_size: usize, seed: u64) -> Vec<(Bytes, Digest)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..POOL_CHUNKS)
        .map(|i| {
            let kind = match mix {
                Mix::Mixed => [
                    Mix::Random,
                    Mix::Random,
                    Mix::Text,
                    Mix::Text,
                    Mix::Binary,
                    Mix::Zeros,
                ][i % 6],
                other => other,
            };
            let data = fill(kind, chunk_size, &mut rng);
            let digest = digest_of(&data);
            (Bytes::from(data), digest)
        })
        .collect()
}

const WORDS: &[&str] = &[
    "backup",
    "restore",
    "disk",
    "the",
    "of",
    "kernel",
    "error",
    "info",
    "service",
    "started",
    "user",
    "session",
    "opened",
    "closed",
    "for",
    "connection",
    "from",
    "port",
    "GET",
    "/index.html",
    "200",
    "404",
    "debug",
    "warning",
    "systemd",
    "cron",
    "job",
    "completed",
    "in",
    "ms",
];

fn fill(kind: Mix, len: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut out = vec![0u8; len];
    match kind {
        Mix::Random => rng.fill_bytes(&mut out),
        Mix::Zeros | Mix::Mixed => {}
        Mix::Text => {
            let mut at = 0;
            while at < len {
                let word = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
                let sep: &[u8] = if rng.random_range(0..12) == 0 {
                    b"\n"
                } else {
                    b" "
                };
                for &b in word.iter().chain(sep) {
                    if at < len {
                        out[at] = b;
                        at += 1;
                    }
                }
            }
        }
        Mix::Binary => {
            for (i, b) in out.iter_mut().enumerate() {
                let r: u8 = rng.random();
                *b = if i % 4 == 0 {
                    r
                } else {
                    (i as u8 & 0x0f) ^ (r & 0x03)
                };
            }
        }
    }
    out
}

impl Stage for Generate {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(if self.options.hashed {
                MessageType::HashedChunk
            } else {
                MessageType::Chunk
            }),
        }
    }

    fn work(&self) -> Work {
        Work::Cpu
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let (me, all) = (worker.index() as u64, worker.count() as u64);
        // Hashed chunks carry the digest the pipeline's repository gives them (keyed when encrypted).
        let hasher = match self.options.hashed {
            true => worker.ctx().chunk_hasher()?,
            false => ChunkHasher::plain(),
        };
        let keyed: Vec<Digest> = match hasher.is_keyed() {
            true => self.pool.iter().map(|(d, _)| hasher.digest(d)).collect(),
            false => Vec::new(),
        };
        let keyed = hasher.is_keyed().then_some((&hasher, &keyed[..]));
        let mut index = me;
        while index < self.chunk_count() {
            if worker
                .send(Message::Chunk(self.chunk_named(index, keyed)))
                .is_err()
            {
                return Ok(());
            }
            index += all;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_exact_size() {
        let options = GenerateOptions {
            size: ByteSize(1_000_000),
            chunk_size: ByteSize(65536),
            ..Default::default()
        };
        let a = Generate::new(options.clone()).unwrap();
        let b = Generate::new(options).unwrap();
        let total: u64 = (0..a.chunk_count()).map(|i| a.chunk(i).payload_len()).sum();
        assert_eq!(total, 1_000_000);
        for i in 0..a.chunk_count() {
            let (Payload::Raw(x), Payload::Raw(y)) = (a.chunk(i).payload, b.chunk(i).payload)
            else {
                panic!("raw chunks expected");
            };
            assert_eq!(x, y);
        }
    }
}
