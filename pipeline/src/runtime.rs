//! The runtime: bounded channels between stages, workers on threads, cancellation, the finaliser.
//!
//! Each edge is a bounded crossbeam channel: a full channel blocks its producer (backpressure), so
//! memory is bounded by the capacities times the item size whatever the disk size. Every worker of
//! a stage runs on its own thread and pulls from the same receiver, so items are spread over the
//! workers and their order is not kept; consumers that need order key by chunk index.
//!
//! End of stream: a stage's channel closes only when the runtime drops its own sender, which it
//! does after all of that stage's workers returned and their outcome was recorded. A consumer that
//! sees its input end can therefore trust the run state: when an upstream stage failed the run is
//! already marked failed, and sinks do not commit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use crate::context::{CancelToken, Overall, RunContext};
use crate::error::StageError;
use crate::message::Message;
use crate::stage::{Finaliser, PlacedStage};
use crate::stats::{OutcomeKind, RunReport, StageCounters, StageReport};

/// Default capacity of a channel between two stages, in items. When it is full the producer waits
/// (it is "backpressured") until the consumer takes an item; nothing is dropped. With 128 KiB
/// chunks, 16 items are 2 MiB per edge.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 16;

/// How often a blocked worker looks at the cancel flag, and the granularity of live statistics.
const TICK: Duration = Duration::from_millis(50);

/// How a run ended, as given to the finaliser and cleanup actions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The stage errors, one line each.
    Failed(Vec<String>),
    Cancelled,
}

/// The run stopped (cancelled, or nobody downstream takes items any more): the worker should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped;

/// One worker's view of the run: its input, its output, the shared context.
pub struct Worker<'a> {
    ctx: &'a RunContext,
    input: Option<Receiver<Message>>,
    output: Option<Sender<Message>>,
    counters: &'a StageCounters,
    index: usize,
    count: usize,
}

impl<'a> Worker<'a> {
    pub fn ctx(&self) -> &'a RunContext {
        self.ctx
    }

    /// This worker's number, `0..count()`: sources use it to split their work.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    /// The next input item; `None` when the input ended or the run was cancelled (and always for
    /// a source).
    pub fn recv(&mut self) -> Option<Message> {
        let input = self.input.as_ref()?;
        loop {
            if self.ctx.is_cancelled() {
                return None;
            }
            let started = Instant::now();
            let got = input.recv_timeout(TICK);
            StageCounters::add_duration(&self.counters.starved_ns, started.elapsed());
            match got {
                Ok(message) => {
                    let queued = input.len() as u64;
                    StageCounters::add(&self.counters.queued_sum, queued);
                    self.counters
                        .queued_max
                        .fetch_max(queued, Ordering::Relaxed);
                    StageCounters::add(&self.counters.items_in, 1);
                    StageCounters::add(&self.counters.bytes_in, message.payload_len());
                    return Some(message);
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Sends an item downstream, waiting while the channel is full. `Err(Stopped)` when the run
    /// was cancelled or no consumer is left; a sink's sends are counted and dropped.
    pub fn send(&mut self, message: Message) -> Result<(), Stopped> {
        let len = message.payload_len();
        let Some(output) = self.output.as_ref() else {
            StageCounters::add(&self.counters.items_out, 1);
            StageCounters::add(&self.counters.bytes_out, len);
            return Ok(());
        };
        let mut message = message;
        loop {
            if self.ctx.is_cancelled() {
                return Err(Stopped);
            }
            let started = Instant::now();
            let sent = output.send_timeout(message, TICK);
            StageCounters::add_duration(&self.counters.backpressured_ns, started.elapsed());
            match sent {
                Ok(()) => {
                    StageCounters::add(&self.counters.items_out, 1);
                    StageCounters::add(&self.counters.bytes_out, len);
                    return Ok(());
                }
                Err(SendTimeoutError::Timeout(back)) => message = back,
                Err(SendTimeoutError::Disconnected(_)) => return Err(Stopped),
            }
        }
    }

    /// The loop of a chunk-to-chunk stage: applies `f` to every chunk of the input and sends it on,
    /// until the input ends or the run stops. Any other message is an error naming `stage`.
    pub fn map_chunks(
        &mut self,
        stage: &str,
        mut f: impl FnMut(&RunContext, &mut crate::message::Chunk) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        while let Some(message) = self.recv() {
            let Message::Chunk(mut chunk) = message else {
                return Err(crate::stage::unexpected(stage, &message));
            };
            f(self.ctx, &mut chunk)?;
            if self.send(Message::Chunk(chunk)).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// The loop of a compressor stage: `encode` turns each chunk's plaintext into a codec and its
    /// stored bytes; chunks already encoded (or zero markers) pass unchanged. One loop for every
    /// codec, so that a compressor stage is its codec alone.
    pub fn encode_chunks(
        &mut self,
        stage: &str,
        mut encode: impl FnMut(
            &bytes::Bytes,
        ) -> Result<(crate::message::Codec, bytes::Bytes), StageError>,
    ) -> Result<(), StageError> {
        self.map_chunks(stage, |_, chunk| {
            if let crate::message::Payload::Raw(data) = &chunk.payload {
                let raw_len = data.len() as u32;
                let (codec, data) = encode(data)?;
                chunk.payload = crate::message::Payload::Encoded {
                    codec,
                    data,
                    raw_len,
                };
            }
            Ok(())
        })
    }

    /// Counts bytes a sink consumed (or a stage produced without sending, such as a writer).
    pub fn count_out(&self, bytes: u64) {
        StageCounters::add(&self.counters.bytes_out, bytes);
    }
}

/// A pipeline ready to run: placed stages in order, the finaliser, the repository's location.
pub struct Pipeline {
    pub name: String,
    pub repository: Option<backflow_repository::Location>,
    pub stages: Vec<PlacedStage>,
    pub finaliser: Option<Arc<dyn Finaliser>>,
}

/// A callback that receives the live statistics.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Options of one run that are not part of the spec.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub cancel: CancelToken,
    /// Called about every half second with the live statistics (for a terminal display), and once
    /// more when the stages have ended, with their final counts, before the run commits and
    /// finalises (which the caller's summary then reports).
    pub on_progress: Option<ProgressFn>,
}

/// A live view of the run, given to `RunOptions::on_progress`.
pub struct Progress<'a> {
    pub elapsed: Duration,
    /// Bytes done of bytes planned, for the whole run.
    pub overall: Overall,
    pub stages: Vec<ProgressStage<'a>>,
}

pub struct ProgressStage<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub workers: usize,
    pub counters: &'a StageCounters,
    /// Items waiting in the channel into this stage, and its capacity.
    pub queued: u64,
    pub capacity: usize,
}

impl Pipeline {
    /// Runs the pipeline to the end and returns its report. Never panics on a stage's panic: it
    /// becomes a failure of that stage.
    pub fn run(&self, options: RunOptions) -> RunReport {
        let started = Instant::now();
        let ctx = RunContext::new(self.repository.clone(), options.cancel.clone());
        let counters: Vec<StageCounters> = self
            .stages
            .iter()
            .map(|_| StageCounters::default())
            .collect();
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());

        // Channel i feeds stage i (none for the first).
        let mut senders: Vec<Option<Sender<Message>>> = vec![None];
        let mut receivers: Vec<Option<Receiver<Message>>> = vec![None];
        for stage in &self.stages[1..] {
            let (tx, rx) = crossbeam_channel::bounded(stage.capacity.max(1));
            senders.push(Some(tx));
            receivers.push(Some(rx));
        }
        // Stage i sends on channel i + 1.
        senders.remove(0);
        senders.push(None);

        let mut prepared = match &self.finaliser {
            Some(finaliser) => finaliser.prepare(&ctx).map_err(|e| {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("before the run: {e}"));
            }),
            None => Ok(()),
        };
        if prepared.is_ok() {
            for placed in &self.stages {
                if let Err(e) = placed.stage.preflight(&ctx) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {e}", placed.name));
                    prepared = Err(());
                    break;
                }
            }
        }
        let refused = prepared.is_err();
        let done = CancelToken::new();
        std::thread::scope(|scope| {
            if prepared.is_err() {
                return;
            }
            let mut supervisors = Vec::with_capacity(self.stages.len());
            for (i, placed) in self.stages.iter().enumerate() {
                let input = receivers[i].take();
                let output = senders[i].take();
                let counters = &counters[i];
                let ctx = &ctx;
                let failures = &failures;
                let handle = std::thread::Builder::new()
                    .name(format!("{}-supervisor", placed.name))
                    .spawn_scoped(scope, move || {
                        run_stage(scope, placed, ctx, input, output, counters, failures)
                    })
                    .expect("spawning a thread");
                supervisors.push(handle);
            }
            if let Some(progress) = &options.on_progress {
                let (done, counters, stages, ctx) = (&done, &counters, &self.stages, &ctx);
                scope.spawn(move || {
                    while !done.is_cancelled() {
                        std::thread::sleep(TICK);
                        let elapsed = started.elapsed();
                        // About twice a second, aligned to ticks so that the end is not delayed.
                        if elapsed.as_millis() % 500 < TICK.as_millis() {
                            progress(&snapshot_progress(stages, counters, ctx, elapsed));
                        }
                    }
                });
            }
            for handle in supervisors {
                // A supervisor does not panic: worker panics are caught at their join.
                let _ = handle.join();
            }
            done.cancel();
        });
        if let Some(progress) = options.on_progress.as_ref().filter(|_| !refused) {
            progress(&snapshot_progress(
                &self.stages,
                &counters,
                &ctx,
                started.elapsed(),
            ));
        }

        let mut errors = failures.into_inner().unwrap();
        let outcome = if !errors.is_empty() {
            Outcome::Failed(errors.clone())
        } else if ctx.is_cancelled() {
            Outcome::Cancelled
        } else {
            let mut outcome = Outcome::Succeeded;
            for placed in &self.stages {
                if let Err(e) = placed.stage.finish(&ctx) {
                    let line = format!("{}: {e}", placed.name);
                    errors.push(line.clone());
                    outcome = Outcome::Failed(vec![line]);
                    break;
                }
            }
            outcome
        };

        let mut warnings = Vec::new();
        if let Some(finaliser) = &self.finaliser
            && let Err(e) = finaliser.finalise(&ctx, &outcome)
        {
            errors.push(format!("cleanup: {e}"));
        }
        for (what, action) in ctx.take_cleanup_actions() {
            if let Err(e) = action(&outcome) {
                errors.push(format!("cleanup ({what}): {e}"));
            }
        }
        if let Some(notice) = ctx.opened_repository().and_then(|r| r.recovery_notice()) {
            ctx.warn(notice);
        }
        warnings.extend(ctx.warnings());

        let wall = started.elapsed();
        let stages: Vec<StageReport> = self
            .stages
            .iter()
            .zip(&counters)
            .enumerate()
            .map(|(i, (p, c))| {
                let capacity = if i == 0 { 0 } else { p.capacity.max(1) };
                StageReport::from_counters(&p.name, &p.kind, p.workers, capacity, c, wall)
            })
            .collect();
        let results = ctx.results();
        RunReport {
            pipeline: self.name.clone(),
            outcome: match (&outcome, errors.is_empty()) {
                (Outcome::Cancelled, _) => OutcomeKind::Cancelled,
                (Outcome::Succeeded, true) => OutcomeKind::Succeeded,
                _ => OutcomeKind::Failed,
            },
            errors,
            refused,
            warnings,
            notes: ctx.notes(),
            snapshot: results
                .get("snapshot")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            source_bytes_read: ctx.source_bytes_read.load(Ordering::Relaxed),
            repo_bytes_written: ctx.repo_bytes_written.load(Ordering::Relaxed),
            target_bytes_written: ctx.target_bytes_written.load(Ordering::Relaxed),
            wall_seconds: wall.as_secs_f64(),
            bottleneck: RunReport::find_bottleneck(&stages),
            stages,
            results,
        }
    }
}

fn snapshot_progress<'a>(
    stages: &'a [PlacedStage],
    counters: &'a [StageCounters],
    ctx: &RunContext,
    elapsed: Duration,
) -> Progress<'a> {
    let stages = stages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let queued = if i == 0 {
                0
            } else {
                StageCounters::get(&counters[i - 1].items_out)
                    .saturating_sub(StageCounters::get(&counters[i].items_in))
            };
            ProgressStage {
                name: &p.name,
                kind: &p.kind,
                workers: p.workers,
                counters: &counters[i],
                queued,
                capacity: p.capacity,
            }
        })
        .collect();
    Progress {
        elapsed,
        overall: ctx.overall(),
        stages,
    }
}

/// Runs all workers of one stage, records their failures, then closes the stage's output.
fn run_stage<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    placed: &'env PlacedStage,
    ctx: &'env RunContext,
    input: Option<Receiver<Message>>,
    output: Option<Sender<Message>>,
    counters: &'env StageCounters,
    failures: &'env Mutex<Vec<String>>,
) {
    let count = placed.workers.max(1);
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let mut worker = Worker {
            ctx,
            input: input.clone(),
            output: output.clone(),
            counters,
            index,
            count,
        };
        let stage = placed.stage.clone();
        counters.active.fetch_add(1, Ordering::Relaxed);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{index}", placed.name))
            .spawn_scoped(scope, move || {
                let started = Instant::now();
                let result = stage.run(&mut worker);
                // Input and output of this worker close here; the stage's output stays open
                // through the supervisor's sender until the outcome is recorded.
                drop(worker);
                StageCounters::add_duration(&counters.worker_ns, started.elapsed());
                counters.active.fetch_sub(1, Ordering::Relaxed);
                result
            })
            .expect("spawning a thread");
        handles.push(handle);
    }
    drop(input);
    for handle in handles {
        let result = match handle.join() {
            Ok(result) => result,
            Err(panic) => Err(StageError::Internal(format!(
                "a worker panicked: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            ))),
        };
        if let Err(e) = result {
            // The caller reports failures; this is for tracing the order of events.
            tracing::debug!(stage = %placed.name, error = %e, "Stage failed.");
            let line = format!("{}: {e}", placed.name);
            let mut failures = failures.lock().unwrap();
            // Workers of one stage often fail alike (same file, same repository): say it once.
            if !failures.contains(&line) {
                failures.push(line);
            }
            drop(failures);
            ctx.cancel_token().cancel();
        }
    }
    drop(output);
}
