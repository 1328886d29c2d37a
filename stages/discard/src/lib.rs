//! Sink stage `discard`: takes everything and keeps nothing, so that a spec can measure the
//! stages before it alone (for example `generate -> zstd -> discard`).

use backflow_pipeline::{InvalidOption, MessageType, Stage, StageError, StageIo, Work, Worker};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "discard";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscardOptions {}

pub const OPTION_DOCS: &[(&str, &str)] = &[];

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
