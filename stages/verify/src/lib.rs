//! Verifier stage: checks every plaintext chunk against its digest before anything writes it, so
//! a restore never writes silently wrong data. A mismatch reads the chunk again from the
//! repository's next good copy (verified there), and fails the run naming the chunk when there is
//! none, unless the run allows damage (`repo-reader`'s `allow_damaged`): then the chunk is restored
//! as zeros and listed at the end.

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{InvalidOption, MessageType, Payload, Stage, StageError, StageIo, Worker};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "verify";

#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct VerifyOptions {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "BLAKE3 check of every chunk before it is written; a mismatch fails the restore and names the chunk",
    input: Some(MessageType::HashedChunk),
    output: Some(MessageType::VerifiedChunk),
    repository: RepositoryUse::No,
    options: option_docs::<VerifyOptions>,
    build: Build::Stage(|options| build_stage(options, Verify::new)),
};

#[derive(Debug, Default)]
pub struct Verify;

impl Verify {
    pub fn new(_options: VerifyOptions) -> Result<Self, InvalidOption> {
        Ok(Verify)
    }
}

impl Stage for Verify {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::HashedChunk),
            output: Some(MessageType::VerifiedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        // The repository's hasher: chunk ids are keyed in an encrypted repository.
        let hasher = worker.ctx().chunk_hasher()?;
        worker.map_chunks(KIND, |ctx, chunk| {
            match &chunk.payload {
                Payload::Raw(data) => {
                    let Some(expected) = chunk.digest else {
                        return Err(StageError::Internal(format!(
                            "chunk {} of disk {} has no digest to verify",
                            chunk.index,
                            chunk.disk.name()
                        )));
                    };
                    if hasher.digest(data) != expected {
                        // Another stored copy may be good (what it returns is verified by the
                        // repository); with none, zeros when the run allows damage.
                        ctx.reload_or_zero(
                            chunk,
                            &format!(
                                "does not match its digest {expected} (the stored chunk is damaged)"
                            ),
                        )?;
                    }
                }
                Payload::Zero { .. } => {}
                _ => {
                    return Err(StageError::Internal(format!(
                        "chunk {} of disk {}: only plaintext and zero chunks can be verified",
                        chunk.index,
                        chunk.disk.name()
                    )));
                }
            }
            chunk.verified = true;
            Ok(())
        })
    }
}
