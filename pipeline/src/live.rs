//! Running pipelines as a console and a metrics scrape see them: a registry that runs publish
//! their live per-stage statistics to (through [`crate::RunOptions::on_progress`], about twice a
//! second), and that readers copy out of. A run stays listed for [`KEEP_ENDED`] after it ended,
//! with its final counts, so that a page opened just after a short backup still shows it.
//!
//! Rates and the live bottleneck are measured over the last interval between two updates, not
//! since the start: a stage that was slow a minute ago and is waiting now is not the bottleneck
//! now. Memory is bounded: at most [`MAX_ENDED`] ended runs are kept.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::runtime::{Progress, ProgressFn};
use crate::stats::StageCounters;

/// How long an ended run stays listed.
pub const KEEP_ENDED: Duration = Duration::from_secs(600);
/// The most ended runs kept (the oldest go first).
pub const MAX_ENDED: usize = 32;

/// One stage of a live run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiveStage {
    pub name: String,
    pub kind: String,
    pub workers: usize,
    /// Workers still running.
    pub active: u64,
    pub items_in: u64,
    pub items_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Worker time spent working (not waiting for input or for room downstream), since the start.
    pub busy_seconds: f64,
    pub starved_seconds: f64,
    pub backpressured_seconds: f64,
    /// Bytes per second through the stage (the larger of in and out) over the last interval.
    pub bytes_per_second: f64,
    /// Share of the stage's worker time spent working over the last interval, 0.0 to 1.0.
    pub utilisation: f64,
    /// Items waiting in the channel into this stage now, and its capacity (0 for a source).
    pub queued: u64,
    pub capacity: usize,
}

/// One pipeline run, live or recently ended.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiveRun {
    /// Unique in this process, increasing.
    pub id: u64,
    /// The job that runs it, and what it backs up (a VM's name, an image's).
    pub job: String,
    pub target: String,
    /// The pipeline's (spec's) name.
    pub pipeline: String,
    /// Unix seconds.
    pub started: i64,
    pub elapsed_seconds: f64,
    /// Unix seconds; `None` while it runs.
    pub ended: Option<i64>,
    /// How it ended (`succeeded`, `warning`, `failed`, `cancelled`); `None` while it runs.
    pub outcome: Option<String>,
    /// Bytes done of bytes planned for the whole run (0 planned: not known yet).
    pub bytes_done: u64,
    pub bytes_planned: u64,
    /// The busiest stage over the last interval, relative to its workers.
    pub bottleneck: Option<String>,
    pub stages: Vec<LiveStage>,
    /// How many updates it had: a reader sees a change by this number.
    pub updates: u64,
}

struct Entry {
    run: LiveRun,
    /// When the last update came, and the summed wait times then (per stage), for the interval's
    /// rates.
    last: Option<(Instant, Vec<(u64, u64)>)>,
    ended_at: Option<Instant>,
}

/// The registry. Cheap to share: runs hold an `Arc` of it.
#[derive(Default)]
pub struct LivePipelines {
    runs: Mutex<BTreeMap<u64, Entry>>,
    next: AtomicU64,
    /// Bumped at every change: readers that poll compare it.
    version: AtomicU64,
}

impl std::fmt::Debug for LivePipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePipelines")
            .field("runs", &self.lock().len())
            .finish()
    }
}

impl LivePipelines {
    pub fn new() -> Arc<LivePipelines> {
        Arc::new(LivePipelines::default())
    }

    /// Registers a run of `pipeline` by `job` for `target`; the handle's [`LiveHandle::progress`]
    /// feeds it, [`LiveHandle::end`] (or dropping it) marks it ended.
    pub fn begin(self: &Arc<Self>, job: &str, target: &str, pipeline: &str) -> LiveHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let run = LiveRun {
            id,
            job: job.to_owned(),
            target: target.to_owned(),
            pipeline: pipeline.to_owned(),
            started: unix_now(),
            elapsed_seconds: 0.0,
            ended: None,
            outcome: None,
            bytes_done: 0,
            bytes_planned: 0,
            bottleneck: None,
            stages: Vec::new(),
            updates: 0,
        };
        let mut runs = self.lock();
        runs.insert(
            id,
            Entry {
                run,
                last: None,
                ended_at: None,
            },
        );
        drop(runs);
        self.version.fetch_add(1, Ordering::Relaxed);
        LiveHandle {
            registry: Arc::clone(self),
            id,
            ended: false,
        }
    }

    /// Every run still running and those that ended within [`KEEP_ENDED`], oldest first.
    pub fn list(&self) -> Vec<LiveRun> {
        let mut runs = self.lock();
        Self::expire(&mut runs);
        runs.values().map(|e| e.run.clone()).collect()
    }

    /// One run, by id (also an ended one still kept).
    pub fn get(&self, id: u64) -> Option<LiveRun> {
        self.lock().get(&id).map(|e| e.run.clone())
    }

    /// Changes with every update, begin and end.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expire(runs: &mut BTreeMap<u64, Entry>) {
        runs.retain(|_, e| e.ended_at.is_none_or(|t| t.elapsed() < KEEP_ENDED));
        let ended: Vec<u64> = runs
            .iter()
            .filter(|(_, e)| e.ended_at.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ended.iter().take(ended.len().saturating_sub(MAX_ENDED)) {
            runs.remove(id);
        }
    }

    fn update(&self, id: u64, progress: &Progress) {
        let now = Instant::now();
        let mut runs = self.lock();
        let Some(entry) = runs.get_mut(&id) else {
            return;
        };
        let waits: Vec<(u64, u64)> = progress
            .stages
            .iter()
            .map(|s| {
                (
                    StageCounters::get(&s.counters.starved_ns)
                        + StageCounters::get(&s.counters.backpressured_ns),
                    StageCounters::get(&s.counters.bytes_in)
                        .max(StageCounters::get(&s.counters.bytes_out)),
                )
            })
            .collect();
        let previous = entry.last.take();
        let mut stages = Vec::with_capacity(progress.stages.len());
        for (i, s) in progress.stages.iter().enumerate() {
            let c = s.counters;
            let active = StageCounters::get(&c.active);
            let starved = StageCounters::get(&c.starved_ns);
            let backpressured = StageCounters::get(&c.backpressured_ns);
            let worker_ns = StageCounters::get(&c.worker_ns);
            // Workers still running count their time so far.
            let elapsed_ns = progress.elapsed.as_nanos() as u64;
            let wall_ns = worker_ns + active * elapsed_ns;
            let busy_ns = wall_ns.saturating_sub(starved + backpressured);
            // Over the last interval while the stage's workers run; over the whole run once
            // they ended (the final update comes after every stage ended).
            let (rate, utilisation) = match &previous {
                Some((at, before)) if before.len() == waits.len() && active > 0 => {
                    let dt = now.duration_since(*at).as_secs_f64();
                    let (wait_before, bytes_before) = before[i];
                    let bytes = waits[i].1.saturating_sub(bytes_before) as f64;
                    let waited = waits[i].0.saturating_sub(wait_before) as f64 / 1e9;
                    let capacity = dt * active as f64;
                    (
                        if dt > 0.0 { bytes / dt } else { 0.0 },
                        if capacity > 0.0 {
                            ((capacity - waited) / capacity).clamp(0.0, 1.0)
                        } else {
                            0.0
                        },
                    )
                }
                _ => {
                    let secs = progress.elapsed.as_secs_f64();
                    let total = wall_ns as f64 / 1e9;
                    (
                        if secs > 0.0 {
                            waits[i].1 as f64 / secs
                        } else {
                            0.0
                        },
                        if total > 0.0 {
                            (busy_ns as f64 / 1e9 / total).clamp(0.0, 1.0)
                        } else {
                            0.0
                        },
                    )
                }
            };
            stages.push(LiveStage {
                name: s.name.to_owned(),
                kind: s.kind.to_owned(),
                workers: s.workers,
                active,
                items_in: StageCounters::get(&c.items_in),
                items_out: StageCounters::get(&c.items_out),
                bytes_in: StageCounters::get(&c.bytes_in),
                bytes_out: StageCounters::get(&c.bytes_out),
                busy_seconds: busy_ns as f64 / 1e9,
                starved_seconds: starved as f64 / 1e9,
                backpressured_seconds: backpressured as f64 / 1e9,
                bytes_per_second: rate,
                utilisation,
                queued: s.queued,
                capacity: if i == 0 { 0 } else { s.capacity.max(1) },
            });
        }
        let run = &mut entry.run;
        // While stages still run, the bottleneck is among them (a source that ended at once
        // was busy for all of its short life, and holds nothing back now); once every stage
        // ended, it is the busiest over the whole run, as the run's report says.
        let running = stages.iter().any(|s| s.active > 0);
        run.bottleneck = stages
            .iter()
            .filter(|s| s.utilisation > 0.0 && (!running || s.active > 0))
            .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation))
            .map(|s| s.name.clone());
        run.stages = stages;
        run.elapsed_seconds = progress.elapsed.as_secs_f64();
        run.bytes_done = progress.overall.done;
        run.bytes_planned = progress.overall.planned;
        run.updates += 1;
        entry.last = Some((now, waits));
        drop(runs);
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self, id: u64, outcome: &str) {
        let mut runs = self.lock();
        if let Some(entry) = runs.get_mut(&id) {
            entry.run.ended = Some(unix_now());
            entry.run.outcome = Some(outcome.to_owned());
            entry.run.updates += 1;
            entry.ended_at = Some(Instant::now());
        }
        Self::expire(&mut runs);
        drop(runs);
        self.version.fetch_add(1, Ordering::Relaxed);
    }
}

/// A run's place in the registry.
pub struct LiveHandle {
    registry: Arc<LivePipelines>,
    id: u64,
    ended: bool,
}

impl LiveHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The progress callback that feeds this run's entry: [`crate::RunOptions::on_progress`].
    pub fn progress(&self) -> ProgressFn {
        let registry = Arc::clone(&self.registry);
        let id = self.id;
        Arc::new(move |progress: &Progress| registry.update(id, progress))
    }

    /// Marks the run ended with `outcome` (`succeeded`, `warning`, `failed`, `cancelled`).
    pub fn end(mut self, outcome: &str) {
        self.registry.end(self.id, outcome);
        self.ended = true;
    }
}

impl Drop for LiveHandle {
    /// A run dropped without [`LiveHandle::end`] (its thread panicked) is not left running.
    fn drop(&mut self) {
        if !self.ended {
            self.registry.end(self.id, "failed");
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Measure, Overall};
    use crate::runtime::ProgressStage;

    fn progress<'a>(counters: &'a [StageCounters], elapsed: Duration) -> Progress<'a> {
        Progress {
            elapsed,
            overall: Overall {
                measure: Measure::Read,
                done: 10,
                planned: 100,
            },
            stages: counters
                .iter()
                .enumerate()
                .map(|(i, c)| ProgressStage {
                    name: ["read", "zstd"][i],
                    kind: ["reader", "zstd"][i],
                    workers: 1,
                    counters: c,
                    queued: 3,
                    capacity: 8,
                })
                .collect(),
        }
    }

    #[test]
    fn a_run_is_listed_updated_and_ended() {
        let live = LivePipelines::new();
        let handle = live.begin("nightly", "web1", "backup-vm");
        let v0 = live.version();
        let counters = [StageCounters::default(), StageCounters::default()];
        for c in &counters {
            c.active.store(1, Ordering::Relaxed);
        }
        counters[0].bytes_out.store(1000, Ordering::Relaxed);
        // The reader waited half of the second; zstd not at all: zstd is the bottleneck.
        counters[0].starved_ns.store(500_000_000, Ordering::Relaxed);
        (handle.progress())(&progress(&counters, Duration::from_secs(1)));
        let run = live.get(handle.id()).unwrap();
        assert!(live.version() > v0);
        assert_eq!((run.job.as_str(), run.target.as_str()), ("nightly", "web1"));
        assert_eq!(run.stages.len(), 2);
        assert_eq!(run.stages[0].bytes_out, 1000);
        assert!((run.stages[0].utilisation - 0.5).abs() < 1e-9);
        assert_eq!(run.bottleneck.as_deref(), Some("zstd"));
        assert_eq!(run.stages[1].capacity, 8);
        assert_eq!(run.stages[0].capacity, 0);
        assert_eq!((run.bytes_done, run.bytes_planned), (10, 100));
        assert!(run.ended.is_none());
        handle.end("succeeded");
        let run = live.list().pop().unwrap();
        assert_eq!(run.outcome.as_deref(), Some("succeeded"));
        assert!(run.ended.is_some());
    }

    #[test]
    fn a_dropped_run_is_marked_failed_and_ended_runs_are_bounded() {
        let live = LivePipelines::new();
        for i in 0..(MAX_ENDED + 5) {
            drop(live.begin("j", &format!("vm{i}"), "p"));
        }
        let runs = live.list();
        assert_eq!(runs.len(), MAX_ENDED);
        assert!(runs.iter().all(|r| r.outcome.as_deref() == Some("failed")));
        // The newest are kept.
        assert_eq!(runs.last().unwrap().target, format!("vm{}", MAX_ENDED + 4));
    }
}
