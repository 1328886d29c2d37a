//! Compressor stage `zstd`: compresses each new chunk into one zstd frame.
//!
//! Chunks are compressed one by one (random access on restore, no shared state between workers);
//! each worker keeps its own compression context. A chunk that does not shrink is stored raw, so
//! already-compressed data costs no decompression on restore.

use backflow_pipeline::Codec;
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{InvalidOption, MessageType, Stage, StageError, StageIo, Worker};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "zstd";

/// zstd level 1: measured fastest at a ratio close to level 3 on disk images (see README).
pub const DEFAULT_LEVEL: i32 = 1;

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct ZstdOptions {
    /// zstd level: -7 (fastest) to 19 (smallest).
    #[serde(default = "default_level")]
    pub level: i32,
}

impl Default for ZstdOptions {
    fn default() -> Self {
        ZstdOptions {
            level: DEFAULT_LEVEL,
        }
    }
}

fn default_level() -> i32 {
    DEFAULT_LEVEL
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "compresses new chunks, one zstd frame each; a chunk that does not shrink is stored raw",
    input: Some(MessageType::HashedChunk),
    output: Some(MessageType::CompressedChunk),
    repository: RepositoryUse::No,
    options: option_docs::<ZstdOptions>,
    build: Build::Stage(|options| build_stage(options, Zstd::new)),
};

#[derive(Debug)]
pub struct Zstd {
    level: i32,
}

impl Zstd {
    pub fn new(options: ZstdOptions) -> Result<Self, InvalidOption> {
        if !(-7..=19).contains(&options.level) {
            return Err(InvalidOption::new(
                "level",
                format!("must be between -7 and 19, found {}", options.level),
            ));
        }
        Ok(Zstd {
            level: options.level,
        })
    }

    /// A compressor for one worker.
    pub fn compressor(&self) -> Result<ChunkCompressor, StageError> {
        let inner = zstd::bulk::Compressor::new(self.level)
            .map_err(|e| StageError::Internal(format!("creating a zstd context: {e}")))?;
        Ok(ChunkCompressor { inner })
    }
}

/// One worker's compression context.
pub struct ChunkCompressor {
    inner: zstd::bulk::Compressor<'static>,
}

impl ChunkCompressor {
    /// Encodes one chunk: zstd when it shrinks, else raw.
    pub fn encode(&mut self, data: &Bytes) -> Result<(Codec, Bytes), StageError> {
        let compressed = self
            .inner
            .compress(data)
            .map_err(|e| StageError::Internal(format!("zstd compression failed: {e}")))?;
        if compressed.len() < data.len() {
            Ok((Codec::Zstd, Bytes::from(compressed)))
        } else {
            Ok((Codec::None, data.clone()))
        }
    }
}

impl Stage for Zstd {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::HashedChunk),
            output: Some(MessageType::CompressedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let mut compressor = self.compressor()?;
        worker.encode_chunks(KIND, |data| compressor.encode(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_text_and_stores_random_raw() {
        let zstd = Zstd::new(ZstdOptions::default()).unwrap();
        let mut c = zstd.compressor().unwrap();
        let text = Bytes::from("backflow ".repeat(10_000));
        let (codec, out) = c.encode(&text).unwrap();
        assert_eq!(codec, Codec::Zstd);
        assert!(out.len() < text.len() / 10);
        assert_eq!(zstd::bulk::decompress(&out, text.len()).unwrap(), text);

        let mut state = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let random = Bytes::from(random);
        let (codec, out) = c.encode(&random).unwrap();
        assert_eq!(codec, Codec::None);
        assert_eq!(out, random);
    }

    #[test]
    fn rejects_bad_levels() {
        assert!(Zstd::new(ZstdOptions { level: 30 }).is_err());
    }
}
