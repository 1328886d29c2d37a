//! What a stage is to the runtime.
//!
//! A stage kind has two types: its options (serde, from the spec) and its runtime value built from
//! them, which implements [`Stage`]. Tests and benchmarks build the runtime value directly.

use std::sync::Arc;

use crate::context::RunContext;
use crate::error::StageError;
use crate::message::{Message, MessageType};
use crate::runtime::Worker;

/// The message types a stage consumes and produces. `None` input: a source; `None` output: a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageIo {
    pub input: Option<MessageType>,
    pub output: Option<MessageType>,
}

/// Whether a stage's work is CPU-bound (hashing, compression) or waits on I/O. Informational for
/// now: every worker runs on its own thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Work {
    Cpu,
    Io,
}

/// The runtime value of a stage. One value serves all of the stage's workers, so per-run state
/// lives behind `&self` (a `Mutex` where workers share it).
pub trait Stage: Send + Sync + 'static {
    fn io(&self) -> StageIo;

    fn work(&self) -> Work {
        Work::Cpu
    }

    /// Runs one worker until its input ends (or, for a source, until it has produced everything).
    /// Called once per worker, each on its own thread. A worker returns `Ok(())` when
    /// [`Worker::send`] reports that the run stopped.
    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError>;

    /// Called once before any worker of any stage starts, in pipeline order: where a stage checks
    /// what it can check without moving data (a restore's target, the snapshot a reader names).
    /// An error here ends the run as refused ([`crate::RunReport::refused`]): nothing was read or
    /// written, and the command line reports it as bad input.
    fn preflight(&self, _ctx: &RunContext) -> Result<(), StageError> {
        Ok(())
    }

    /// Called once after every stage's workers finished and only when the run succeeded so far,
    /// in pipeline order: where a sink commits what it wrote. An error here fails the run.
    fn finish(&self, _ctx: &RunContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// Convenience for stages: the error for a message variant that validation should have excluded.
pub fn unexpected(stage: &str, message: &Message) -> StageError {
    StageError::Internal(format!(
        "stage {stage} received an unexpected {} message",
        message.variant()
    ))
}

/// The finaliser a pipeline runs after its data stages stopped, whatever the outcome.
pub trait Finaliser: Send + Sync + 'static {
    /// Called once before any stage starts: a check that would otherwise fail only after all the
    /// data moved (a restore's target name taken) fails the run here, before anything ran.
    fn prepare(&self, _ctx: &RunContext) -> Result<(), StageError> {
        Ok(())
    }

    fn finalise(
        &self,
        ctx: &RunContext,
        outcome: &crate::runtime::Outcome,
    ) -> Result<(), StageError>;
}

/// A stage as placed in a pipeline: its name (unique in the pipeline), kind, worker count and the
/// capacity of the channel that feeds it.
pub struct PlacedStage {
    pub name: String,
    pub kind: String,
    pub workers: usize,
    /// Capacity of the channel into this stage; ignored for a source.
    pub capacity: usize,
    pub stage: Arc<dyn Stage>,
}

/// An option value that a stage's constructor rejects; the spec loader reports it at that option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("option `{option}`: {message}")]
pub struct InvalidOption {
    pub option: &'static str,
    pub message: String,
}

impl InvalidOption {
    pub fn new(option: &'static str, message: impl Into<String>) -> Self {
        InvalidOption {
            option,
            message: message.into(),
        }
    }
}
