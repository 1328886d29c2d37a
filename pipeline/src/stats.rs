//! Per-stage statistics and the run report.
//!
//! Counters are updated by the runtime around every `recv` and `send` (never by the stage), so
//! every stage is measured the same way. A worker's busy time is its wall time minus the time it
//! waited for input (starved) and for room downstream (backpressured). The bottleneck is the stage
//! whose workers are busiest relative to their count: upstream of it channels stay full, downstream
//! of it they stay empty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Live counters of one stage, shared by its workers and read by the display.
#[derive(Debug, Default)]
pub struct StageCounters {
    pub items_in: AtomicU64,
    pub items_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub starved_ns: AtomicU64,
    pub backpressured_ns: AtomicU64,
    /// Summed wall time of the workers that finished.
    pub worker_ns: AtomicU64,
    /// Items waiting in the input channel, sampled at every receive: sum and maximum.
    pub queued_sum: AtomicU64,
    pub queued_max: AtomicU64,
    /// Workers still running.
    pub active: AtomicU64,
}

impl StageCounters {
    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub(crate) fn add_duration(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One stage's line in the report.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub workers: usize,
    /// Items handled: received, or produced for a source.
    pub items: u64,
    pub items_in: u64,
    pub items_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub busy_seconds: f64,
    pub starved_seconds: f64,
    pub backpressured_seconds: f64,
    /// Busy time over (wall time x workers): 1.0 means every worker worked all the time.
    pub utilisation: f64,
    /// Capacity of the channel into this stage (0 for a source).
    pub queue_capacity: usize,
    /// Average fill of that channel when this stage took an item, 0.0 (always waiting for input)
    /// to 1.0 (always full: the stage holds its upstream back).
    pub queue_fill: f64,
    /// Most items seen waiting in that channel.
    pub queue_max: u64,
}

impl StageReport {
    pub(crate) fn from_counters(
        name: &str,
        kind: &str,
        workers: usize,
        queue_capacity: usize,
        c: &StageCounters,
        wall: Duration,
    ) -> Self {
        let is_source = queue_capacity == 0;
        let secs = |ns: u64| ns as f64 / 1e9;
        let starved = StageCounters::get(&c.starved_ns);
        let backpressured = StageCounters::get(&c.backpressured_ns);
        let worker_ns = StageCounters::get(&c.worker_ns);
        let busy = worker_ns.saturating_sub(starved + backpressured);
        let items_in = StageCounters::get(&c.items_in);
        let items_out = StageCounters::get(&c.items_out);
        let capacity = wall.as_secs_f64() * workers as f64;
        StageReport {
            name: name.to_owned(),
            kind: kind.to_owned(),
            workers,
            items: if is_source { items_out } else { items_in },
            items_in,
            items_out,
            bytes_in: StageCounters::get(&c.bytes_in),
            bytes_out: StageCounters::get(&c.bytes_out),
            busy_seconds: secs(busy),
            starved_seconds: secs(starved),
            backpressured_seconds: secs(backpressured),
            utilisation: if capacity > 0.0 {
                (secs(busy) / capacity).min(1.0)
            } else {
                0.0
            },
            queue_capacity,
            queue_fill: if items_in > 0 && queue_capacity > 0 {
                StageCounters::get(&c.queued_sum) as f64 / items_in as f64 / queue_capacity as f64
            } else {
                0.0
            },
            queue_max: StageCounters::get(&c.queued_max),
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeKind {
    Succeeded,
    Failed,
    Cancelled,
}

/// The report of one run, as printed at the end and written by `--report FILE`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub outcome: OutcomeKind,
    /// One line per failure (stage errors, then cleanup errors).
    pub errors: Vec<String>,
    /// The run failed before any data moved, in a check of its input (a finaliser's `prepare`,
    /// a stage's `preflight`): bad input, not a failed run.
    pub refused: bool,
    pub warnings: Vec<String>,
    /// What is worth knowing without being wrong ([`crate::RunContext::note`]).
    pub notes: Vec<String>,
    /// The id of the snapshot the run committed, if it committed one.
    pub snapshot: Option<String>,
    pub source_bytes_read: u64,
    pub repo_bytes_written: u64,
    /// Data written to a restore's targets (image files, block devices): the plaintext of the
    /// snapshot's data chunks, without holes and zero runs.
    pub target_bytes_written: u64,
    pub wall_seconds: f64,
    /// The stage that limited throughput (highest utilisation), if any did work.
    pub bottleneck: Option<String>,
    pub stages: Vec<StageReport>,
    /// Other results stages recorded.
    pub results: std::collections::BTreeMap<String, serde_json::Value>,
}

impl RunReport {
    /// The busiest stage relative to its workers.
    pub(crate) fn find_bottleneck(stages: &[StageReport]) -> Option<String> {
        stages
            .iter()
            .filter(|s| s.busy_seconds > 0.0)
            .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation))
            .map(|s| s.name.clone())
    }

    /// The per-stage table for a terminal: what each stage handled, in items (messages: disks,
    /// extents, chunks) and in bytes, and how its time went. The outcome in the user's terms is the
    /// caller's summary; this is for tuning a spec.
    pub fn summary_table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut out = format!(
            "{:<14} {:<18} {:>7} {:>9} {:>10} {:>10} {:>9} {:>5} {:>9} {:>9}\n",
            "stage",
            "kind",
            "workers",
            "items",
            "in MiB",
            "out MiB",
            "MiB/s",
            "busy",
            "starved s",
            "backpr. s"
        );
        for s in &self.stages {
            let rate = if self.wall_seconds > 0.0 {
                mib(s.bytes_in.max(s.bytes_out)) / self.wall_seconds
            } else {
                0.0
            };
            let mark = if self.bottleneck.as_deref() == Some(s.name.as_str()) {
                "  <- bottleneck"
            } else {
                ""
            };
            out.push_str(&format!(
                "{:<14} {:<18} {:>7} {:>9} {:>10.1} {:>10.1} {:>9.1} {:>4.0}% {:>9.2} {:>9.2}{mark}\n",
                s.name,
                s.kind,
                s.workers,
                s.items,
                mib(s.bytes_in),
                mib(s.bytes_out),
                rate,
                s.utilisation * 100.0,
                s.starved_seconds,
                s.backpressured_seconds,
            ));
        }
        out
    }
}
