//! Backflow's dataflow engine.
//!
//! A pipeline is a list of stages joined by bounded channels; a YAML spec says which stages, with
//! which options, how many workers each and how large each channel is. This crate knows nothing
//! about particular stage kinds: the closed set of kinds lives in `backflow-stages`, which gives
//! the spec loader a [`spec::Catalog`].
//!
//! # Layout
//! - [`message`]: what travels on the edges, and the message types stages declare.
//! - [`stage`]: the [`Stage`] trait (a stage's runtime value) and the [`Finaliser`].
//! - [`runtime`]: channels, workers, cancellation, the finaliser; [`Pipeline::run`].
//! - [`describe`]: how a stage kind describes itself to the catalog and `backflow stages`.
//! - [`context`]: what the stages of one run share (repository, cleanup actions, results, the
//!   bytes planned and done that the overall progress shows).
//! - [`stats`]: counters measured around every send and receive, and the run report.
//! - [`spec`]: loading, substituting and validating YAML specs, with file:line:column errors.
//! - [`units`]: sizes with suffixes (`128K`), for options and the command line.
//! - [`harness`]: one stage alone on prepared input, for stage tests and benchmarks.
//! - [`input`]: specs, job files and sources checked for what they are before they are read, and
//!   bounded: nothing people hand a run can block it or fill its memory.
//! - [`live`]: the registry of running pipelines and their live per-stage statistics, for the
//!   daemon's console and metrics.
//! - [`hooks`]: test hooks that pause a run at a named moment, for crash tests (only with the
//!   `test-hooks` feature; empty otherwise).
//! - [`error`]: the stage error type and the error policy.

pub mod context;
pub mod describe;
pub mod error;
pub mod harness;
pub mod hooks;
pub mod input;
pub mod live;
pub mod message;
pub mod runtime;
pub mod spec;
pub mod stage;
pub mod stats;
pub mod units;

/// How a repository names chunks ([`RunContext::chunk_hasher`]).
pub use backflow_repository::crypto::ChunkHasher;
pub use context::{CancelToken, DamagedRange, Measure, Overall, RESTORE_PLAN, RunContext};
pub use error::StageError;
pub use live::{LiveHandle, LivePipelines, LiveRun, LiveStage};
pub use message::{
    BlockSource, ChangeTracking, Changes, Chunk, ChunkRef, Codec, Digest, Disk, DiskSource, Extent,
    ExtentClass, Message, MessageType, ParentChunks, Payload, SizeOnly, digest_of,
};
pub use runtime::{
    DEFAULT_CHANNEL_CAPACITY, Outcome, Pipeline, Progress, ProgressFn, RunOptions, Stopped, Worker,
};
pub use stage::{Finaliser, InvalidOption, PlacedStage, Stage, StageIo, Work};
pub use stats::{OutcomeKind, RunReport, StageReport};
pub use units::ByteSize;
