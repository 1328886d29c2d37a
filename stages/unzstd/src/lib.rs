//! Decompressor stage `unzstd` (restores): decodes stored chunks back to plaintext. The digest
//! travels along unchecked; the verifier after it checks it. A blob that does not decode is read
//! again from the repository's next good copy, if any; with none, a run that allows damage
//! (`repo-reader`'s `allow_damaged`) restores zeros there ([`RunContext::reload_or_zero`]).
//!
//! [`RunContext::reload_or_zero`]: backflow_pipeline::RunContext::reload_or_zero

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
        worker.map_chunks(KIND, |ctx, chunk| {
            if let Payload::Encoded {
                codec,
                data,
                raw_len,
            } = &chunk.payload
            {
                match backflow_repository::decode(*codec, data, *raw_len) {
                    Ok(plain) => chunk.payload = Payload::Raw(Bytes::from(plain)),
                    // Another stored copy may be good (the verifier after this stage checks it
                    // too); with none, zeros when the run allows damage.
                    Err(e) => ctx.reload_or_zero(chunk, &format!("does not decode: {e}"))?,
                }
            }
            Ok(())
        })
    }
}
