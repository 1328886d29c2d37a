//! Decoder stage `unzstd`, also called `decode` (restores): decodes stored chunks back to
//! plaintext, whatever codec each was stored with. The codec is recorded per chunk in the
//! repository (zstd, lz4 or raw, see `backflow_repository::Codec`), so one snapshot may mix them
//! and a restore needs no setting: the dispatch is [`backflow_repository::decode`]'s. The name
//! `unzstd` predates the second codec and stays for the specs that use it. The digest
//! travels along unchecked; the verifier after it checks it. A blob that does not decode is read
//! again from the repository's next good copy, if any; with none, a run that allows damage
//! (`repo-reader`'s `allow_damaged`) restores zeros there ([`RunContext::reload_or_zero`]).
//!
//! [`RunContext::reload_or_zero`]: backflow_pipeline::RunContext::reload_or_zero

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{InvalidOption, MessageType, Payload, Stage, StageError, StageIo, Worker};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "unzstd";

/// The same stage by the name that says what it does.
pub const DECODE_KIND: &str = "decode";

#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct UnzstdOptions {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "decodes stored chunks to plaintext, whatever codec each was stored with (zstd, lz4 or raw): restores need no setting",
    input: Some(MessageType::CompressedChunk),
    output: Some(MessageType::HashedChunk),
    repository: RepositoryUse::No,
    options: option_docs::<UnzstdOptions>,
    build: Build::Stage(|options| build_stage(options, Unzstd::new)),
};

/// `decode`: the same stage as `unzstd`, by a name that does not suggest one codec.
pub const DECODE_ROW: KindRow = KindRow {
    kind: DECODE_KIND,
    summary: "the same stage as `unzstd`, by a name that does not suggest one codec",
    ..ROW
};

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
