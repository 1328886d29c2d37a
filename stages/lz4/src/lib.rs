//! Compressor stage `lz4`: compresses each new chunk into one LZ4 block.
//!
//! Why a second compressor: on two cores the `zstd` stage is the bottleneck of a full backup;
//! LZ4 costs a fraction of its CPU time for a somewhat larger repository (see
//! `docs/benchmarks.md`). It replaces `zstd` in any backup spec (`--var compressor=lz4`); the
//! codec is recorded per chunk in the repository, so restores decode either without a setting.
//!
//! Like `zstd`, chunks are compressed one by one (random access on restore, no shared state
//! between workers), and a chunk that does not shrink is stored raw, so already-compressed data
//! costs no decompression on restore. The block format is LZ4's plain block (no frame, no size
//! prefix): the repository records the raw length beside every blob.

use backflow_pipeline::Codec;
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{InvalidOption, MessageType, Stage, StageError, StageIo, Worker};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "lz4";

/// LZ4 (as lz4_flex implements it) has no levels to choose: the stage takes no options.
#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct Lz4Options {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "compresses new chunks, one LZ4 block each: less CPU time than zstd for a larger repository; a chunk that does not shrink is stored raw",
    input: Some(MessageType::HashedChunk),
    output: Some(MessageType::CompressedChunk),
    repository: RepositoryUse::No,
    options: option_docs::<Lz4Options>,
    build: Build::Stage(|options| build_stage(options, Lz4::new)),
};

#[derive(Debug, Default)]
pub struct Lz4;

impl Lz4 {
    pub fn new(_options: Lz4Options) -> Result<Self, InvalidOption> {
        Ok(Lz4)
    }

    /// A compressor for one worker.
    pub fn compressor(&self) -> ChunkCompressor {
        ChunkCompressor {
            scratch: Vec::new(),
        }
    }
}

/// One worker's output buffer, reused from chunk to chunk: LZ4 needs its worst case (a little
/// more than the input) to write into, and the stored blob is copied out at its exact size.
pub struct ChunkCompressor {
    scratch: Vec<u8>,
}

impl ChunkCompressor {
    /// Encodes one chunk: LZ4 when it shrinks, else raw.
    pub fn encode(&mut self, data: &Bytes) -> Result<(Codec, Bytes), StageError> {
        let bound = lz4_flex::block::get_maximum_output_size(data.len());
        if self.scratch.len() < bound {
            self.scratch.resize(bound, 0);
        }
        let n = lz4_flex::block::compress_into(data, &mut self.scratch)
            .map_err(|e| StageError::Internal(format!("lz4 compression failed: {e}")))?;
        if n < data.len() {
            Ok((Codec::Lz4, Bytes::copy_from_slice(&self.scratch[..n])))
        } else {
            Ok((Codec::None, data.clone()))
        }
    }
}

impl Stage for Lz4 {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::HashedChunk),
            output: Some(MessageType::CompressedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        let mut compressor = self.compressor();
        worker.encode_chunks(KIND, |data| compressor.encode(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_text_and_stores_random_raw() {
        let mut c = Lz4.compressor();
        let text = Bytes::from("backflow ".repeat(10_000));
        let (codec, out) = c.encode(&text).unwrap();
        assert_eq!(codec, Codec::Lz4);
        assert!(out.len() < text.len() / 10);
        assert_eq!(lz4_flex::block::decompress(&out, text.len()).unwrap(), text);

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
        // The scratch buffer grown for a larger chunk serves a smaller one afterwards.
        let small = Bytes::from("lz4 ".repeat(100));
        let (codec, out) = c.encode(&small).unwrap();
        assert_eq!(codec, Codec::Lz4);
        assert_eq!(
            lz4_flex::block::decompress(&out, small.len()).unwrap(),
            small
        );
    }
}
