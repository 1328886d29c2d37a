//! Terminal output: the live per-stage display.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use backflow_pipeline::Progress;

/// Redraws a small table on stderr about twice a second.
#[derive(Default)]
pub struct LiveDisplay {
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    lines: usize,
    /// At the previous draw: elapsed time, bytes moved and nanoseconds spent waiting, per stage.
    last: Option<(Duration, Vec<u64>, Vec<u64>)>,
}

impl LiveDisplay {
    pub fn into_callback(self) -> impl Fn(&Progress<'_>) + Send + Sync {
        move |p| self.draw(p)
    }

    fn draw(&self, p: &Progress<'_>) {
        let mut state = self.state.lock().unwrap();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let moved: Vec<u64> = p
            .stages
            .iter()
            .map(|s| get(&s.counters.bytes_in).max(get(&s.counters.bytes_out)))
            .collect();
        let waited: Vec<u64> = p
            .stages
            .iter()
            .map(|s| get(&s.counters.starved_ns) + get(&s.counters.backpressured_ns))
            .collect();
        let (dt, moved_before, waited_before) = match &state.last {
            Some((t, m, w)) => ((p.elapsed - *t).as_secs_f64(), m.clone(), w.clone()),
            None => (
                p.elapsed.as_secs_f64(),
                vec![0; moved.len()],
                vec![0; moved.len()],
            ),
        };
        // Busy share of each stage since the last draw: the time its workers did not wait.
        let busy: Vec<f64> = p
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let capacity = dt * 1e9 * s.workers as f64;
                let wait = waited[i].saturating_sub(waited_before[i]) as f64;
                if capacity > 0.0 && get(&s.counters.active) > 0 {
                    (1.0 - wait / capacity).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let bottleneck = busy
            .iter()
            .enumerate()
            .filter(|(_, b)| **b > 0.0)
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        let mut out = String::new();
        if state.lines > 0 {
            out.push_str(&format!("\x1b[{}A", state.lines));
        }
        out.push_str(&format!(
            "\x1b[2K{:<14} {:>10} {:>6} {:>12} {:>10}   ({:.0}s)\n",
            "stage",
            "MiB/s",
            "busy",
            "queue",
            "items",
            p.elapsed.as_secs_f64()
        ));
        for (i, s) in p.stages.iter().enumerate() {
            let rate = if dt > 0.0 {
                (moved[i].saturating_sub(moved_before[i])) as f64 / dt / (1024.0 * 1024.0)
            } else {
                0.0
            };
            let items = get(&s.counters.items_in).max(get(&s.counters.items_out));
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
            out.push_str(&format!(
                "\x1b[2K{:<14} {:>10.1} {:>5.0}% {:>12} {:>10}{mark}\n",
                s.name,
                rate,
                busy[i] * 100.0,
                queue,
                items
            ));
        }
        state.lines = p.stages.len() + 1;
        state.last = Some((p.elapsed, moved, waited));
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}

/// Leaves the live table on screen but makes sure what follows starts on a fresh line.
pub fn clear_live() {
    let _ = std::io::stderr().flush();
}
