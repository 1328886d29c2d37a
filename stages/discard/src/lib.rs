//! Sink stage `discard`: takes everything and keeps nothing, so that a spec can measure the
//! stages before it alone (for example `generate -> zstd -> discard`).

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{InvalidOption, MessageType, Stage, StageError, StageIo, Work, Worker};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "discard";

#[derive(Clone, Debug, Default, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct DiscardOptions {}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "sink: drops everything, for tuning one stage",
    input: Some(MessageType::Any),
    output: None,
    repository: RepositoryUse::No,
    options: option_docs::<DiscardOptions>,
    build: Build::Stage(|options| build_stage(options, Discard::new)),
};

#[derive(Debug, Default)]
pub struct Discard;

impl Discard {
    pub fn new(_options: DiscardOptions) -> Result<Self, InvalidOption> {
        Ok(Discard)
    }
}

impl Stage for Discard {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Any),
            output: None,
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            worker.count_out(message.payload_len());
        }
        Ok(())
    }
}
