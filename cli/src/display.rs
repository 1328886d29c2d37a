//! What a run prints: the live progress on a terminal while the data moves, then the summary.
//!
//! # Live progress
//! Only when stderr is a terminal (nothing else ever sees an escape sequence): one overall line,
//! bytes done of bytes planned with a percentage, the rate and the time left, above a table with
//! one line per stage, redrawn in place about twice a second. The total comes from the planning
//! stages ([`backflow_pipeline::RunContext::plan_read`] for a backup's changed-block maps,
//! [`backflow_pipeline::RunContext::plan_write`] for a restore's repository reader). Rates are
//! taken over the last few seconds ([`RateWindow`]): stages move data in lumps (a reader's batch,
//! a writer's pack), and a rate over one redraw would flip between 0 and twice the true rate.
//! When the run ends the frame is erased and the summary printed in its place.
//!
//! # Summary
//! On stdout, in the user's terms, from the results the stages recorded: for a backup the machine,
//! the snapshot, the bytes read and the bytes stored; for a restore the snapshot, each target and
//! the data written to it; for `restore-vm` also the new domain. The per-stage table (items and
//! bytes, rates, busy time, the bottleneck) follows with `--stats`, as restic and Proxmox Backup
//! Server users expect a short summary by default; `--report FILE` has all of it as JSON.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backflow_pipeline::{Measure, OutcomeKind, Progress, RunReport};
use serde_json::Value;

/// How much the overall line's rate (and so the time left) looks back: long enough to even out a
/// stage that stalls for a second (a pack being fsynced), short enough to follow a real change.
pub const OVERALL_RATE_WINDOW: Duration = Duration::from_secs(5);

/// How much a stage's rate and busy share look back: a few redraws, so that a stage that moves
/// data in lumps at a steady pace shows a steady figure.
pub const STAGE_RATE_WINDOW: Duration = Duration::from_secs(3);

const MIB: f64 = 1024.0 * 1024.0;

/// What a run prints on its way and at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Nothing but errors (and the report file, if asked for).
    Quiet,
    /// Live progress on a terminal, then the summary.
    Summary,
    /// As `Summary`, then the per-stage table.
    Stats,
}

impl Output {
    pub fn new(quiet: bool, stats: bool) -> Self {
        match (quiet, stats) {
            (true, _) => Output::Quiet,
            (false, false) => Output::Summary,
            (false, true) => Output::Stats,
        }
    }
}

/// The rate of a growing counter over about the last `window`. The oldest sample kept is the
/// newest one at least `window` old, so the span covers the whole window: a counter that grows in
/// lumps at least once per window never shows 0.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Duration, u64)>,
}

impl RateWindow {
    /// A counter that was 0 when the run began.
    pub fn new(window: Duration) -> Self {
        RateWindow {
            window,
            samples: VecDeque::from([(Duration::ZERO, 0)]),
        }
    }

    /// Records `total` at `at` (time since the run began) and returns the rate per second.
    pub fn update(&mut self, at: Duration, total: u64) -> f64 {
        self.samples.push_back((at, total));
        while self.samples.len() > 2 && at.saturating_sub(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        let (then, before) = self.samples[0];
        let span = at.saturating_sub(then).as_secs_f64();
        if span > 0.0 {
            total.saturating_sub(before) as f64 / span
        } else {
            0.0
        }
    }
}

/// The live display: draws frames on stderr, and erases the last one before the summary.
#[derive(Default)]
pub struct LiveDisplay {
    state: Mutex<LiveState>,
}

/// The live display being drawn, if any, for [`log_writer`].
static ON_SCREEN: Mutex<Option<Arc<LiveDisplay>>> = Mutex::new(None);

/// Where log lines go: stderr, after the live frame (if one is on screen) is erased. A log line
/// written under a frame would be drawn over by the next frame, and leave that frame's first line
/// behind; erased first, the line stays and the next frame is drawn below it.
pub fn log_writer() -> LogWriter {
    LogWriter
}

pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let live = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(live) = live {
            live.clear();
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[derive(Default)]
struct LiveState {
    /// Lines of the frame on screen.
    lines: usize,
    overall: Option<RateWindow>,
    /// Per stage: bytes moved, and nanoseconds its workers waited.
    moved: Vec<RateWindow>,
    waited: Vec<RateWindow>,
}

impl LiveDisplay {
    /// A display that log lines make room for until [`LiveDisplay::finish`].
    pub fn start() -> Arc<LiveDisplay> {
        let live = Arc::new(LiveDisplay::default());
        *ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(live.clone());
        live
    }

    /// Erases the frame on screen for what follows, and draws no more.
    pub fn finish(&self) {
        ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.clear();
    }

    pub fn draw(&self, p: &Progress<'_>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let frame = state.frame(p);
        let mut out = String::new();
        if state.lines > 0 {
            // Back to the first line of the previous frame; each line is cleared as it is drawn.
            let _ = write!(out, "\x1b[{}A", state.lines);
        }
        for line in frame.lines() {
            let _ = writeln!(out, "\x1b[2K{line}");
        }
        state.lines = frame.lines().count();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }

    /// Erases the frame on screen, so that what follows takes its place.
    fn clear(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.lines > 0 {
            let mut err = std::io::stderr().lock();
            // The frame's own lines, upwards, ending on its first line: nothing else is touched.
            let _ = write!(err, "{}", "\x1b[1A\x1b[2K".repeat(state.lines));
            let _ = err.flush();
            state.lines = 0;
        }
    }
}

impl LiveState {
    /// One frame as plain text: the overall line, then the stage table.
    fn frame(&mut self, p: &Progress<'_>) -> String {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let at = p.elapsed;
        let o = p.overall;
        let rate = self
            .overall
            .get_or_insert_with(|| RateWindow::new(OVERALL_RATE_WINDOW))
            .update(at, o.done);
        let mut out = overall_line(o.measure, o.done, o.planned, rate, at);
        out.push('\n');

        if self.moved.len() != p.stages.len() {
            self.moved = (0..p.stages.len())
                .map(|_| RateWindow::new(STAGE_RATE_WINDOW))
                .collect();
            self.waited = (0..p.stages.len())
                .map(|_| RateWindow::new(STAGE_RATE_WINDOW))
                .collect();
        }
        let mut rows = Vec::with_capacity(p.stages.len());
        for (i, s) in p.stages.iter().enumerate() {
            let c = s.counters;
            let moved = get(&c.bytes_in).max(get(&c.bytes_out));
            let rate = self.moved[i].update(at, moved);
            // Nanoseconds waited per second, over all workers: the rest of their time was work.
            let waiting = self.waited[i].update(at, get(&c.starved_ns) + get(&c.backpressured_ns));
            let busy = if get(&c.active) > 0 && s.workers > 0 {
                (1.0 - waiting / 1e9 / s.workers as f64).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let items = get(&c.items_in).max(get(&c.items_out));
            rows.push((s, rate, busy, items));
        }
        let bottleneck = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.2 > 0.0)
            .max_by(|a, b| a.1.2.total_cmp(&b.1.2))
            .map(|(i, _)| i);
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>5} {:>13} {:>10}",
            "stage", "MiB/s", "busy", "queue (items)", "items"
        );
        for (i, (s, rate, busy, items)) in rows.into_iter().enumerate() {
            let queue = if i == 0 {
                "-".to_owned()
            } else {
                format!("{}/{}", s.queued, s.capacity)
            };
            let mark = if bottleneck == Some(i) {
                "  <- bottleneck"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<14} {:>9.1} {:>4.0}% {:>13} {:>10}{mark}",
                s.name,
                rate / MIB,
                busy * 100.0,
                queue,
                items
            );
        }
        out
    }
}

/// `read 1.2 GiB of 2.0 GiB  60.0%  148.0 MiB/s  ETA 0:05  (0:08)`; before anything is planned,
/// only what was done and the rate.
pub fn overall_line(
    measure: Measure,
    done: u64,
    planned: u64,
    rate: f64,
    elapsed: Duration,
) -> String {
    let verb = match measure {
        Measure::Read => "read",
        Measure::Written => "wrote",
    };
    let rate_text = format!("{}/s", bytes(rate as u64));
    let elapsed = clock(elapsed.as_secs_f64());
    if planned == 0 {
        return format!("{verb} {}  {rate_text}  ({elapsed})", bytes(done));
    }
    let left = planned.saturating_sub(done);
    let eta = if left == 0 {
        "0:00".to_owned()
    } else if rate >= 1.0 {
        clock(left as f64 / rate)
    } else {
        "-".to_owned()
    };
    format!(
        "{verb} {} of {}  {:.1}%  {rate_text}  ETA {eta}  ({elapsed})",
        bytes(done),
        bytes(planned),
        (done as f64 * 100.0 / planned as f64).min(100.0)
    )
}

/// A byte count in binary units, one decimal (`512 B`, `1.5 KiB`): the mail's rendering.
pub use backflow_jobs::notify::bytes;

/// Seconds as `M:SS`, or `H:MM:SS` from an hour on.
pub fn clock(seconds: f64) -> String {
    let s = seconds.round().min(u64::MAX as f64) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The end of a successful run in the user's terms, from the results its stages recorded.
pub fn summary(report: &RunReport) -> String {
    let r = &report.results;
    let text = |key: &str| r.get(key).and_then(Value::as_str);
    let took = format!("{:.1}s", report.wall_seconds);
    let mut out = String::new();
    if let Some(id) = text("restored_snapshot") {
        let _ = writeln!(
            out,
            "restored snapshot {id} in {took}: wrote {} of data",
            bytes(report.target_bytes_written)
        );
        for disk in r
            .get("restored")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |k: &str| disk.get(k).and_then(Value::as_str).unwrap_or("?");
            let number = |k: &str| disk.get(k).and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(
                out,
                "  disk {} -> {} ({}, {} disk): wrote {}",
                field("disk"),
                field("path"),
                field("format"),
                bytes(number("size")),
                bytes(number("written"))
            );
        }
        if let Some(domain) = r.get("domain") {
            let field = |k: &str| domain.get(k).and_then(Value::as_str).unwrap_or("?");
            let started = domain.get("started").and_then(Value::as_bool) == Some(true);
            let _ = writeln!(
                out,
                "defined domain {} (UUID {}) on {}{}",
                field("name"),
                field("uuid"),
                field("uri"),
                if started { ", started" } else { "" }
            );
        }
    } else if let Some(id) = text("snapshot") {
        let _ = writeln!(
            out,
            "backup of {} saved as snapshot {id} in {took}",
            text("vm").unwrap_or("?")
        );
        let disks: Vec<String> = r
            .get("disks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|d| {
                let name = d.get("name").and_then(Value::as_str).unwrap_or("?");
                let size = d.get("size").and_then(Value::as_u64).unwrap_or(0);
                format!("{name} {}", bytes(size))
            })
            .collect();
        let _ = writeln!(
            out,
            "  read {} from {} ({}), stored {} new in the repository",
            bytes(report.source_bytes_read),
            if disks.len() == 1 {
                "its disk"
            } else {
                "its disks"
            },
            disks.join(", "),
            bytes(report.repo_bytes_written)
        );
    } else {
        let _ = writeln!(
            out,
            "{} finished in {took}: read {}",
            report.pipeline,
            bytes(report.source_bytes_read)
        );
    }
    out
}

/// What is printed after a run: the summary when it succeeded (a failure is the error's line,
/// printed by the caller), then with [`Output::Stats`] the per-stage table.
pub fn after_run(report: &RunReport, output: Output) -> String {
    let mut out = String::new();
    if output == Output::Quiet {
        return out;
    }
    if report.outcome == OutcomeKind::Succeeded {
        out.push_str(&summary(report));
    }
    // Notes (a crash-consistent backup) are facts about the run, not warnings: said with it.
    for n in &report.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if output == Output::Stats {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&report.summary_table());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_steady_source_in_lumps_never_shows_zero() {
        // 64 MiB arrive at once every 1.5 s (a batch of reads): 42.7 MiB/s on average. Redraws
        // every half second see the counter still for two redraws out of three.
        let mut meter = RateWindow::new(STAGE_RATE_WINDOW);
        let lump = 64 << 20;
        let mean = lump as f64 / 1.5;
        let mut total = 0;
        for draw in 1..=40u64 {
            let at = SECOND * draw as u32 / 2;
            if draw % 3 == 0 {
                total += lump;
            }
            let rate = meter.update(at, total);
            if draw >= 3 {
                assert!(rate > 0.0, "draw {draw}: 0 on a steady source");
            }
            if draw >= 9 {
                assert!(
                    (rate - mean).abs() <= mean * 0.34,
                    "draw {draw}: {:.1} MiB/s, the mean is {:.1}",
                    rate / MIB,
                    mean / MIB
                );
            }
        }
    }

    #[test]
    fn a_rate_over_one_redraw_would_have_shown_zero() {
        // The same lumps measured over one redraw only: the flicker the window removes.
        let mut meter = RateWindow::new(Duration::from_millis(500));
        let rates: Vec<f64> = (1..=12u64)
            .map(|draw| meter.update(SECOND * draw as u32 / 2, (draw / 3) * (64 << 20)))
            .collect();
        assert!(rates[3..].contains(&0.0), "{rates:?}");
    }

    #[test]
    fn a_stopped_source_drops_to_zero_once_the_window_has_passed() {
        let mut meter = RateWindow::new(STAGE_RATE_WINDOW);
        assert!(meter.update(SECOND, 100 << 20) > 0.0);
        assert!(meter.update(SECOND * 3, 100 << 20) > 0.0);
        assert_eq!(meter.update(SECOND * 5, 100 << 20), 0.0);
    }

    #[test]
    fn the_overall_line_has_a_percentage_a_rate_and_the_time_left() {
        let line = overall_line(
            Measure::Read,
            3 << 30,
            4 << 30,
            (100 << 20) as f64,
            SECOND * 31,
        );
        assert_eq!(
            line,
            "read 3.0 GiB of 4.0 GiB  75.0%  100.0 MiB/s  ETA 0:10  (0:31)"
        );
        let restore = overall_line(Measure::Written, 0, 1 << 20, 0.0, SECOND);
        assert_eq!(restore, "wrote 0 B of 1.0 MiB  0.0%  0 B/s  ETA -  (0:01)");
        let unplanned = overall_line(Measure::Read, 1536, 0, 0.0, SECOND * 4000);
        assert_eq!(unplanned, "read 1.5 KiB  0 B/s  (1:06:40)");
    }
}
