//! What an operator sees: the live progress on a real terminal (tmux), no escape sequence when
//! the output is not a terminal, and summaries in the user's terms that match what was done.
//!
//! The terminal test reads the source from `nbdkit` through its `rate` filter, so that the backup
//! lasts several redraws however fast the machine is, without hooks or sleeps. It needs `tmux` and
//! `nbdkit` (scripts/setup.sh installs them) and fails without them.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backflow_pipeline::{Measure, Overall, RunOptions, RunReport};
use common::{backflow, init_repo, read_report, run_ok, snapshot_ids, spec};

/// The repositories' chunk size here, for counting the data chunks of an image.
const CHUNK: u64 = 64 * 1024;

/// An image that looks like a used disk: data, duplicates and holes.
fn image(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    backflow_fixtures::generate_image(&path, size, seed).unwrap();
    path
}

/// Bytes of the image's chunks that hold anything but zeros: what a restore writes.
fn data_bytes(image: &Path) -> u64 {
    let file = std::fs::File::open(image).unwrap();
    let size = file.metadata().unwrap().len();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut data = 0;
    let mut at = 0;
    while at < size {
        let n = (size - at).min(CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], at).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            data += n as u64;
        }
        at += n as u64;
    }
    data
}

/// A byte count as the summary writes it: binary units, one decimal.
fn human(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backup_image_command(image: &Path, repo: &Path, report: &Path) -> Command {
    let mut cmd = backflow();
    cmd.arg("run")
        .arg(spec("backup-image.yaml"))
        .arg("--var")
        .arg(format!("source={}", image.display()))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .arg("--report")
        .arg(report);
    cmd
}

#[test]
fn a_backups_summary_names_the_vm_the_snapshot_and_the_bytes_read_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), 16 << 20, 31);
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let report_path = dir.path().join("report.json");
    let out = run_ok(&mut backup_image_command(&image, &repo, &report_path));
    let (stdout, stderr) = text(&out);
    let report = read_report(&report_path);

    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 1);
    let listed = run_ok(
        backflow()
            .args(["snapshots", "--json", "--repo"])
            .arg(&repo),
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let vm = listed[0]["vm"].as_str().unwrap().to_owned();
    let read = report["source_bytes_read"].as_u64().unwrap();
    let stored = report["repo_bytes_written"].as_u64().unwrap();
    assert!(read > 0 && stored > 0, "{report}");

    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("backup of {vm} saved as snapshot {}", ids[0])),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("read {} from its disk", human(read)))
            && stdout.contains(&format!("stored {} new in the repository", human(stored))),
        "{stdout}"
    );
    // The per-stage table only when asked for.
    assert!(
        !stdout.contains("bottleneck") && !stdout.contains("busy"),
        "{stdout}"
    );
    // Not a terminal: no live display, and no escape sequence anywhere.
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stdout:?} {stderr:?}"
    );

    let stats = run_ok(backup_image_command(&image, &repo, &report_path).arg("--stats"));
    let (stdout, stderr) = text(&stats);
    let table = stdout.find("stage ").expect("the table with --stats");
    assert!(
        stdout.find("saved as snapshot").unwrap() < table,
        "the summary first: {stdout}"
    );
    for header in ["items", "in MiB", "out MiB", "MiB/s", "busy"] {
        assert!(stdout[table..].contains(header), "{header}: {stdout}");
    }
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stdout:?} {stderr:?}"
    );
}

#[test]
fn a_warning_off_a_terminal_carries_no_escape_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), 8 << 20, 35);
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let report_path = dir.path().join("report.json");
    run_ok(&mut backup_image_command(&image, &repo, &report_path));
    // A larger disk has no parent to compare with: the second backup warns, in the log too.
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(12 << 20)
        .unwrap();
    let out = run_ok(&mut backup_image_command(&image, &repo, &report_path));
    let (stdout, stderr) = text(&out);
    assert!(stderr.contains("size or chunk size changed"), "{stderr}");
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stdout:?} {stderr:?}"
    );
}

#[test]
fn a_restores_summary_names_the_snapshot_the_target_and_the_data_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), 16 << 20, 32);
    let expected = data_bytes(&image);
    assert!(expected > 0);
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    run_ok(&mut backup_image_command(
        &image,
        &repo,
        &dir.path().join("b.json"),
    ));
    let id = snapshot_ids(&repo).pop().unwrap();

    for format in ["raw", "qcow2"] {
        let to = dir.path().join(format!("restored.{format}"));
        let report_path = dir.path().join(format!("restore-{format}.json"));
        let out = run_ok(
            backflow()
                .args(["restore", "--repo"])
                .arg(&repo)
                .args(["--snapshot", &id, "--format", format, "--to"])
                .arg(&to)
                .arg("--report")
                .arg(&report_path),
        );
        let (stdout, stderr) = text(&out);
        let report = read_report(&report_path);
        assert_eq!(report["target_bytes_written"], expected, "{report}");
        assert_eq!(
            report["results"]["restored"][0]["written"], expected,
            "{report}"
        );
        assert!(
            stdout.contains(&format!("restored snapshot {id}"))
                && stdout.contains(&format!(
                    "-> {} ({format}, 16.0 MiB disk): wrote {}",
                    to.display(),
                    human(expected)
                )),
            "{stdout}"
        );
        assert!(!stdout.contains("to the repository"), "{stdout}");
        assert!(
            !stdout.contains('\x1b') && !stderr.contains('\x1b'),
            "{stdout:?} {stderr:?}"
        );
    }
    let status = Command::new("cmp")
        .arg(&image)
        .arg(dir.path().join("restored.raw"))
        .status()
        .unwrap();
    assert!(status.success(), "the restored image differs");
}

/// Runs a built-in spec through the library, keeping the last progress the run reported.
fn run_spec(name: &str, vars: &[(&str, String)]) -> (RunReport, Overall) {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let pipeline =
        backflow_pipeline::spec::load_file(&spec(name), &vars, &backflow_stages::Stages).unwrap();
    let last: Arc<Mutex<Option<Overall>>> = Arc::default();
    let seen = last.clone();
    let report = pipeline.run(RunOptions {
        on_progress: Some(Arc::new(move |p: &backflow_pipeline::Progress<'_>| {
            *seen.lock().unwrap() = Some(p.overall);
        })),
        ..RunOptions::default()
    });
    backflow_testkit::assert_succeeded(&report);
    let last = last.lock().unwrap().expect("a progress report at the end");
    (report, last)
}

#[test]
fn the_planned_total_is_what_the_run_then_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), 16 << 20, 33);
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let (backup, overall) = run_spec(
        "backup-image.yaml",
        &[
            ("source", image.display().to_string()),
            ("repo", repo.display().to_string()),
        ],
    );
    assert_eq!(overall.measure, Measure::Read);
    assert!(overall.planned > 0);
    assert_eq!(overall.planned, backup.source_bytes_read);
    assert_eq!(overall.done, overall.planned);

    let to = dir.path().join("out.raw");
    let (restore, overall) = run_spec(
        "restore.yaml",
        &[
            ("repo", repo.display().to_string()),
            ("to", to.display().to_string()),
        ],
    );
    assert_eq!(overall.measure, Measure::Written);
    assert_eq!(overall.planned, data_bytes(&image));
    assert_eq!(overall.done, overall.planned);
    assert_eq!(restore.target_bytes_written, overall.planned);
}

/// A process of this test, stopped by pid when the test ends however it ends.
struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmux server of this test's own (its own socket), killed when the test ends.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.0, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("running tmux (scripts/setup.sh installs it)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "progress"])
    }

    /// Polls the screen until `found` holds for it.
    fn wait_for(&self, what: &str, limit: Duration, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if found(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .output();
    }
}

/// A backup from an NBD server (`nbdkit`, slowed down by its `rate` filter).
const NBD_SPEC: &str = r#"
name: backup-nbd
variables:
  socket: ~
  repo: ~
repository: ${repo}
stages:
  - kind: nbd
    socket: ${socket}
    disk: vda
    vm: web01
    connections: 2
  - kind: full
  - kind: reader
    workers: 2
  - kind: dedup
  - kind: zstd
    level: 1
  - kind: repo-writer
cleanup:
  kind: cleanup
"#;

/// `read 12.0 MiB of 45.3 MiB  26.5%  8.0 MiB/s  ETA 0:04  (0:01)`, with a figure for the time left.
fn is_progress_line(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(eta) = words.iter().position(|w| *w == "ETA") else {
        return false;
    };
    let clock = words.get(eta + 1).is_some_and(|t| {
        t.split(':').count() >= 2 && t.split(':').all(|p| p.parse::<u32>().is_ok())
    });
    let percent = words.iter().any(|w| {
        w.strip_suffix('%')
            .is_some_and(|p| p.parse::<f64>().is_ok())
    });
    line.starts_with("read ") && line.contains(" of ") && percent && clock
}

#[test]
fn a_terminal_shows_the_progress_then_the_summary_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), 64 << 20, 34);
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    // 48 Mbit/s, 6 MB/s: the image's data takes seconds to read, many redraws.
    let socket = dir.path().join("nbd.sock");
    let nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--unix"])
        .arg(&socket)
        .args(["--filter=rate", "file"])
        .arg(&image)
        .arg("rate=48M")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting nbdkit (scripts/setup.sh installs it)");
    let _nbdkit = Stop(nbdkit);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let spec_path = dir.path().join("backup-nbd.yaml");
    std::fs::write(&spec_path, NBD_SPEC).unwrap();
    let exit_file = dir.path().join("exit");
    let command = format!(
        // The shell then waits for input, keeping the screen as the run left it (a dead pane
        // would get a line of tmux's own).
        "'{}' run '{}' --var socket='{}' --var repo='{}'; echo $? > '{}'; read _",
        env!("CARGO_BIN_EXE_backflow"),
        spec_path.display(),
        socket.display(),
        repo.display(),
        exit_file.display()
    );
    let tmux = Tmux(format!("backflow-progress-{}", std::process::id()));
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "progress",
        "-x",
        "160",
        "-y",
        "50",
        &command,
    ]);

    let live = tmux.wait_for("progress line", Duration::from_secs(120), |screen| {
        screen.lines().any(is_progress_line)
    });
    assert!(live.contains("queue (items)"), "the stage table: {live}");

    let deadline = Instant::now() + Duration::from_secs(300);
    while !exit_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the backup did not end:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = std::fs::read_to_string(&exit_file).unwrap();
    let end = tmux.screen();
    assert_eq!(code.trim(), "0", "{end}");
    let id = snapshot_ids(&repo).pop().unwrap();
    assert!(end.contains(&format!("saved as snapshot {id}")), "{end}");
    // The last frame gave way to the summary: nothing of it is left above.
    assert!(
        !end.contains("ETA") && !end.contains("queue (items)"),
        "a live frame is left on the screen:\n{end}"
    );
}
