//! SIGTERM at any moment of a backup ends it cleanly: exit 130 with nothing committed, or exit 0
//! with a committed snapshot that restores; never death by the signal, never scratch left behind.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{Pid, Signal, kill_process};

/// Moments at which SIGTERM is sent, counted from when the program's own code starts.
const MOMENTS: usize = 30;

/// The first moments, in milliseconds after start (after moment 0): where the process parses its
/// arguments, loads the spec and opens the repository, before any pipeline runs.
const STARTUP_MS: [u64; 5] = [1, 2, 4, 8, 16];

/// How long a process may take to start, or to exit after the signal, before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// CPU time after the program's start by which its SIGTERM handler must be in place: the first
/// line of `main` installs it, so a few microseconds would do; CPU time, unlike wall time, does
/// not run on while a loaded machine lets the process wait.
const HANDLER_CPU_BUDGET: Duration = Duration::from_millis(40);

/// The signals a process has handlers for (`SigCgt` of /proc/PID/status), or `None` once it is
/// gone.
fn caught_signals(child: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
    u64::from_str_radix(mask.trim(), 16).ok()
}

/// Whether bit `signal` is set in a `SigCgt` mask.
fn has(mask: u64, signal: Signal) -> bool {
    mask & (1 << (signal.as_raw() - 1)) != 0
}

/// CPU time the main thread of a process has used (/proc/PID/schedstat), or `None` once it is gone.
fn cpu_time(child: &Child) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/schedstat", child.id())).ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// Polls `/proc` until `done` says so (or the test's patience ends).
fn poll(child: &Child, what: &str, mut done: impl FnMut(u64) -> bool) -> Instant {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if caught_signals(child).is_some_and(&mut done) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Waits until the program's own code runs, which is when its SIGTERM handler shows: the first
/// line of `main` installs it. (Before that the dynamic loader maps and relocates the shared
/// libraries, some milliseconds in which no program can handle a signal.)
fn wait_for_start(child: &Child) -> Instant {
    poll(child, "the SIGTERM handler", |mask| has(mask, Signal::TERM))
}

fn send_sigterm(child: &Child) {
    // A process that already exited (not yet reaped) takes the signal without effect.
    let _ = kill_process(Pid::from_child(child), Signal::TERM);
}

/// Files a run leaves when it did not clean up: anything in `tmp/`, any `*.tmp` in the repository.
fn scratch_left(repo: &Path) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir(repo.join("tmp"))
        .map(|d| d.map(|e| e.unwrap().path().display().to_string()).collect())
        .unwrap_or_default();
    let mut dirs = vec![repo.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "tmp") {
                left.push(path.display().to_string());
            }
        }
    }
    left
}

#[test]
fn sigterm_at_any_moment_exits_130_or_commits_and_leaves_no_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 256 << 20, 31).unwrap();
    let repo = dir.path().join("repo");

    // Each run is a full backup into a fresh repository, so that every phase (start, reading,
    // compression, packs, index, manifest, cleanup) takes as long as it does the first time.
    let fresh_repo = || {
        if repo.exists() {
            std::fs::remove_dir_all(&repo).unwrap();
        }
        init_repo(&repo, "64K");
    };
    fresh_repo();
    let mut child = start_backup(&image, &repo);
    let started = wait_for_start(&child);
    let status = child.wait().unwrap();
    let duration = started.elapsed();
    assert!(status.success(), "the timing backup failed: {status}");

    let mut moments: Vec<Duration> = vec![Duration::ZERO];
    moments.extend(STARTUP_MS.iter().map(|&ms| Duration::from_millis(ms)));
    let spread = MOMENTS - moments.len() - 1;
    // From early in the run to half again its typical length (runs vary on a busy machine), then
    // one long after its end.
    moments.extend((1..=spread).map(|i| duration.mul_f64(1.5 * i as f64 / spread as f64)));
    moments.push(duration * 3);
    assert_eq!(moments.len(), MOMENTS);

    let (mut interrupted, mut committed) = (0, 0);
    for (round, &moment) in moments.iter().enumerate() {
        fresh_repo();
        let mut child = start_backup(&image, &repo);
        let started = wait_for_start(&child);
        if let Some(wait) = (started + moment).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send_sigterm(&child);
        let status = wait_exit(&mut child, PATIENCE);
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let at = format!("round {round}, SIGTERM {moment:?} after start");
        assert_eq!(
            status.signal(),
            None,
            "{at}: the process died by a signal\n{stderr}"
        );
        let ids = snapshot_ids(&repo);
        match status.code() {
            Some(130) => {
                interrupted += 1;
                assert!(ids.is_empty(), "{at}: exit 130 but committed {ids:?}");
                assert!(stderr.contains("interrupted"), "{at}: {stderr}");
            }
            Some(0) => {
                committed += 1;
                assert_eq!(ids.len(), 1, "{at}: exit 0 but snapshots {ids:?}");
                assert_restores(&repo, &[(ids[0].as_str(), &image)], dir.path());
            }
            other => panic!("{at}: exit code {other:?}, expected 130 or 0\n{stderr}"),
        }
        let left = scratch_left(&repo);
        assert!(left.is_empty(), "{at}: scratch left: {left:?}");
        assert_verifies(&repo, &at);
    }
    println!(
        "backup of {duration:?}; {interrupted} runs interrupted (130), {committed} committed (0)"
    );
    // The moments covered both outcomes: runs stopped mid-way, runs that had finished.
    assert!(
        interrupted > 0 && committed > 0,
        "{interrupted} interrupted, {committed} committed"
    );
}

/// A spec near the size limit takes a good part of a second to load, before any pipeline (and,
/// before the fix, before any signal handling): a SIGTERM then must end the run with 130 too.
#[test]
fn sigterm_while_a_large_spec_loads_exits_130_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    // The shipped backup spec with 80,000 unused variables: 950 KB, under the 1 MiB limit.
    let shipped = std::fs::read_to_string(spec("backup-image.yaml")).unwrap();
    let unused: String = (0..80_000).map(|i| format!("  u{i}: x\n")).collect();
    let large = shipped.replacen("variables:\n", &format!("variables:\n{unused}"), 1);
    assert!(large.len() < 1 << 20);
    let spec_path = dir.path().join("large.yaml");
    std::fs::write(&spec_path, large).unwrap();

    for command in ["run", "validate"] {
        let mut child = backflow()
            .arg(command)
            .arg(&spec_path)
            .arg("--var")
            .arg(format!("source={}", image.display()))
            .arg("--var")
            .arg(format!("repo={}", repo.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Rust's runtime installs its SIGSEGV handler right before `main`.
        poll(&child, "the start of main", |mask| has(mask, Signal::SEGV));
        let at_start = cpu_time(&child).unwrap_or_default();
        // The signal goes as soon as the handler shows, or once the process has spent
        // HANDLER_CPU_BUDGET of CPU time since (loading the spec) without one.
        poll(&child, "the SIGTERM handler or the CPU budget", |mask| {
            has(mask, Signal::TERM)
                || cpu_time(&child).is_some_and(|t| t > at_start + HANDLER_CPU_BUDGET)
        });
        send_sigterm(&child);
        let status = wait_exit(&mut child, PATIENCE);
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            status.signal(),
            None,
            "{command}: the process died by a signal\n{stderr}"
        );
        assert_eq!(status.code(), Some(130), "{command}: {stderr}");
        assert!(snapshot_ids(&repo).is_empty());
        let left = scratch_left(&repo);
        assert!(left.is_empty(), "{command}: scratch left: {left:?}");
    }
}
