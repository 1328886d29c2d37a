//! Decompressor stage `unzstd` (restores): decodes stored chunks back to plaintext. The digest
//! travels along unchecked; the verifier after it checks it.

use backflow_pipeline::{InvalidOption, MessageType, Payload, Stage, StageError, StageIo, Worker};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "unzstd";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnzstdOptions {}

pub const OPTION_DOCS: &[(&str, &str)] = &[];

#[derive(Debug, Default)]
pub struct Unzstd;

impl Unzstd {
    pub fn new(_options: UnzstdOptions) -> Result<Self, InvalidOption> {
        Ok(Unzstd)
    }
}

impl Stage for Unzstd {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::CompressedChunk),
            output: Some(MessageType::HashedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        worker.map_chunks(KIND, |_, chunk| {
            if let Payload::Encoded {
                codec,
                data,
                raw_len,
            } = &chunk.payload
            {
                let plain = backflow_repository::decode(*codec, data, *raw_len).map_err(|e| {
                    StageError::Corrupt(format!(
                        "disk {}, chunk {} at offset {}: {e}",
                        chunk.disk.name(),
                        chunk.index,
                        chunk.offset()
                    ))
                })?;
                chunk.payload = Payload::Raw(Bytes::from(plain));
            }
            Ok(())
        })
    }
}
