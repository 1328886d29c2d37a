//! Shared helpers of the command-line tests: run the real binary on real files.
#![allow(dead_code)]

pub mod cluster;
pub mod console;
pub mod keys;
pub mod s3;
pub mod vm;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, with the S3 settings of the store this thread uses, if any
/// ([`s3::use_store`]): a repository location `s3://BUCKET/PREFIX` can then stand wherever these
/// helpers take a repository path (`Path::new(&s3.url("repo"))`).
pub fn backflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backflow"));
    cmd.env_remove("RUST_LOG");
    s3::apply_store(&mut cmd);
    cmd
}

/// The workspace root, where specs/ lives.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn spec(name: &str) -> PathBuf {
    root().join("specs").join(name)
}

/// A command's stdout, then its stderr, as text (for an assertion's message or a search).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running backflow");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn init_repo(repo: &Path, chunk_size: &str) {
    run_ok(
        backflow()
            .args(["init", "--repo"])
            .arg(repo)
            .args(["--chunk-size", chunk_size]),
    );
}

/// A repository of 64 KiB chunks in packs of 256 KiB: many packs for gc to delete and rewrite, many
/// index files for it to merge.
pub fn init_small_packs(repo: &Path) {
    run_ok(
        backflow()
            .args([
                "init",
                "--chunk-size",
                "64K",
                "--pack-size",
                "256K",
                "--repo",
            ])
            .arg(repo),
    );
}

/// Backs `image` up with specs/backup-image.yaml as disk (and so VM) `disk0`; returns the report.
pub fn backup(image: &Path, repo: &Path) -> serde_json::Value {
    backup_named(image, repo, "disk0")
}

/// `backflow run specs/backup-image.yaml` of `image` as disk `name`, identified as `name` too
/// (`--var name=`; without it the identity would be the image's canonical path), quiet.
pub fn backup_command(image: &Path, repo: &Path, name: &str) -> Command {
    let mut cmd = backflow();
    backup_args(&mut cmd, image, repo, name, name);
    cmd
}

/// Makes `cmd` (a `backflow` with what a test needs) run specs/backup-image.yaml of `image` into
/// `repo` as disk `disk` of identity `vm`, quiet.
pub fn backup_args<'c>(
    cmd: &'c mut Command,
    image: &Path,
    repo: &Path,
    disk: &str,
    vm: &str,
) -> &'c mut Command {
    cmd.arg("run")
        .arg(spec("backup-image.yaml"))
        .arg("--var")
        .arg(format!("source={}", image.display()))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .arg("--var")
        .arg(format!("disk={disk}"))
        .arg("--var")
        .arg(format!("name={vm}"))
        .arg("--quiet")
}

/// Backs `image` up with specs/backup-image.yaml as disk (and so VM) `name`; returns the report.
pub fn backup_named(image: &Path, repo: &Path, name: &str) -> serde_json::Value {
    report_of(&mut backup_command(image, repo, name))
}

/// Runs `cmd` (a `backflow run`) with `--report`, which must succeed: the report.
pub fn report_of(cmd: &mut Command) -> serde_json::Value {
    let report = std::env::temp_dir().join(format!("backflow-report-{}.json", rand_suffix()));
    run_ok(cmd.arg("--report").arg(&report));
    let json = read_report(&report);
    std::fs::remove_file(&report).unwrap();
    json
}

/// The command failed with exit `code`, and its stderr holds `needle`.
pub fn assert_failed(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

/// A backup of `image` (as `disk0`), running: its stderr piped, its stdout discarded.
pub fn start_backup(image: &Path, repo: &Path) -> Child {
    backup_command(image, repo, "disk0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A backup of `image` as `name`; returns the snapshot id and a copy of the image as it was
/// (`dir/ID.img`).
pub fn backup_kept(dir: &Path, image: &Path, repo: &Path, name: &str) -> (String, PathBuf) {
    let id = backup_named(image, repo, name)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let copy = dir.join(format!("{id}.img"));
    copy_sparse(image, &copy);
    (id, copy)
}

/// Starts `cmd` with the pause hook `hook` (an environment variable naming the file the run
/// creates, then waits for, at that point) set to `pause`; returns the child once it paused.
/// Its stderr is piped for [`resume`].
pub fn spawn_paused(cmd: &mut Command, hook: &str, pause: &Path, secs: u64) -> Child {
    let mut child = cmd
        .env(hook, pause)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_pause(&mut child, pause, secs);
    child
}

/// Starts a backup of `image` (as `disk0`) that pauses before its commit; returns once it is
/// paused.
pub fn paused_backup(image: &Path, repo: &Path, pause: &Path) -> Child {
    spawn_paused(
        &mut backup_command(image, repo, "disk0"),
        stage_repo_writer::PAUSE_BEFORE_COMMIT,
        pause,
        120,
    )
}

/// Every `(snapshot, image)` restores (`backflow restore`) byte-identical to its image. Restores
/// go to `scratch` and are removed after the comparison.
pub fn assert_restores<S: AsRef<str>, P: AsRef<Path>>(
    repo: &Path,
    points: &[(S, P)],
    scratch: &Path,
) {
    for (id, original) in points {
        let id = id.as_ref();
        let out = scratch.join(format!("restored-{id}.img"));
        restore_ok(repo, id, &out);
        assert_same_file(original.as_ref(), &out);
        std::fs::remove_file(&out).unwrap();
    }
}

/// [`assert_restores`], then `verify --read-data` passes.
pub fn assert_restores_then_verifies<S: AsRef<str>, P: AsRef<Path>>(
    repo: &Path,
    points: &[(S, P)],
    scratch: &Path,
) {
    assert_restores(repo, points, scratch);
    assert_verifies(repo, "after the restores");
}

pub fn restore(repo: &Path, snapshot: &str, to: &Path) -> Output {
    backflow()
        .args(["restore", "--quiet", "--repo"])
        .arg(repo)
        .args(["--snapshot", snapshot, "--to"])
        .arg(to)
        .output()
        .unwrap()
}

/// [`restore`], and it succeeded.
pub fn restore_ok(repo: &Path, snapshot: &str, to: &Path) {
    let restored = restore(repo, snapshot, to);
    assert!(
        restored.status.success(),
        "restore {snapshot}: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
}

pub fn assert_same_file(a: &Path, b: &Path) {
    let status = Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .expect("running cmp");
    assert!(
        status.success(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

pub fn snapshot_ids(repo: &Path) -> Vec<String> {
    let out = run_ok(backflow().args(["snapshots", "--json", "--repo"]).arg(repo));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn verify_command(repo: &Path, read_data: bool) -> Command {
    let mut cmd = backflow();
    cmd.args(["verify", "--repo"]).arg(repo);
    if read_data {
        cmd.arg("--read-data");
    }
    cmd
}

pub fn verify(repo: &Path, read_data: bool) -> Output {
    verify_command(repo, read_data).output().unwrap()
}

/// `verify --read-data` passes; `what` says when, should it fail.
pub fn assert_verifies(repo: &Path, what: &str) {
    let verified = verify(repo, true);
    assert!(
        verified.status.success(),
        "{what}: verify --read-data failed:\n{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}

/// `verify --json`: whether it passed, and its report.
pub fn verify_json(repo: &Path, read_data: bool) -> (bool, serde_json::Value) {
    let out = verify_command(repo, read_data)
        .arg("--json")
        .output()
        .unwrap();
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

fn gc_command(repo: &Path, extra: &[&str]) -> Command {
    let mut cmd = backflow();
    cmd.args(["gc", "--json", "--repo"]).arg(repo).args(extra);
    cmd
}

/// `gc --json` with `extra` arguments, whatever its outcome.
pub fn gc(repo: &Path, extra: &[&str]) -> Output {
    gc_command(repo, extra).output().unwrap()
}

/// `gc --json` with `extra` arguments, which must succeed: its report.
pub fn gc_json(repo: &Path, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(&mut gc_command(repo, extra));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `forget --keep-last N`, which must succeed.
pub fn forget_keep_last(repo: &Path, n: u32) {
    run_ok(
        backflow()
            .args(["forget", "--keep-last", &n.to_string(), "--repo"])
            .arg(repo),
    );
}

/// The number `key` of a JSON report; fails the test, showing the report, when it has none.
pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v:#}"))
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ u64::from(std::process::id())
}

/// Copies a file keeping holes, to keep what an image looked like at a backup.
pub fn copy_sparse(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A run report written with `--report`.
pub fn read_report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The warnings of a run report.
pub fn warnings(report: &serde_json::Value) -> Vec<String> {
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect()
}

/// What a run read from its source.
pub fn bytes_read(report: &serde_json::Value) -> u64 {
    report["source_bytes_read"].as_u64().unwrap()
}

/// A pack's id: the name of its file (`packs/XX/ID.pack`) without the extension.
pub fn pack_id(pack: &Path) -> String {
    pack.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Every pack file of a repository, sorted.
pub fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(repo.join("packs")).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|e| e == "pack") {
                    out.push(f);
                }
            }
        }
    }
    out.sort();
    out
}

/// Waits (at most `secs` seconds) until a run started with a pause hook creates `pause`; fails
/// the test if `child` ends first.
pub fn wait_for_pause(child: &mut Child, pause: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pause.exists() {
        assert!(Instant::now() < deadline, "the run never reached its pause");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before its pause: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets a run paused by a pause hook go on (removes `pause`) and waits for it: its output.
pub fn resume(child: Child, pause: &Path) -> Output {
    std::fs::remove_file(pause).unwrap();
    child.wait_with_output().unwrap()
}

/// [`resume`], and the run succeeded.
pub fn resume_ok(child: Child, pause: &Path) -> Output {
    let out = resume(child, pause);
    assert!(
        out.status.success(),
        "the resumed run failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Records a finished session of job `job` that started `seconds` seconds ago, so that a daemon
/// started now owes the job its next run. Returns the session id. `repo` may be an `s3://`
/// location of this thread's store ([`s3::open_repository`]).
pub fn record_old_session(repo: &Path, job: &str, seconds: i64) -> String {
    let then = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - seconds;
    let id = backflow_repository::Repository::new_session_id(then);
    s3::open_repository(repo)
        .record_session(
            &id,
            &serde_json::json!({
                "id": id, "job": job, "started": then, "ended": then,
                "result": "success", "vms": [], "error": null,
            }),
        )
        .unwrap();
    id
}

/// `backflow daemon --jobs DIR`, with its log lines (info) sent to the returned channel as they
/// come (and echoed to the test's output).
pub fn start_daemon(jobs: &Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = backflow();
    cmd.args(["--log", "info", "daemon", "--http", "127.0.0.1:0", "--jobs"])
        .arg(jobs);
    spawn_logged(cmd, "daemon")
}

/// Starts `cmd` with its stderr lines sent to the returned channel as they come (and echoed to
/// the test's output, after `who: `); its stdout goes nowhere.
pub fn spawn_logged(
    mut cmd: Command,
    who: &'static str,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{who}: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a log line containing `what`; returns it. Fails the test after `timeout`.
pub fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(what) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line with {what:?} within {timeout:?}: {e}"),
        }
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for `child` to exit; kills it and fails the test after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the daemon on `jobs` until it logs a line containing `until` (at most a minute), then
/// stops it with SIGTERM and checks that it exits 0 (within a minute). Returns that line.
pub fn run_daemon_until(jobs: &Path, until: &str) -> String {
    let (mut daemon, lines) = start_daemon(jobs);
    let line = wait_for_line(&lines, until, Duration::from_secs(60));
    sigterm(&daemon);
    assert_eq!(
        wait_exit(&mut daemon, Duration::from_secs(60)).code(),
        Some(0)
    );
    line
}

/// `cp -a`: a repository copied with its permissions and timestamps, for one test case each.
pub fn cp_a(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// Whether two files have the same bytes (`cmp -s`), for tests that collect failures instead of
/// stopping at the first.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .expect("running cmp")
        .success()
}

/// Flips bits of the byte at `offset` of `path` (XOR 0x40: a letter changes case or becomes a
/// control character, a digit becomes a letter, so text and binary fields both change).
pub fn flip_byte(path: &Path, offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset)?;
    file.write_all_at(&[byte[0] ^ 0x40], offset)?;
    file.sync_all()
}

/// What a command run by [`run_timed`] did.
#[derive(Debug)]
pub struct Ran {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The lines of stderr the binary writes for a failure (`backflow: …`), without log lines.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("backflow: "))
            .collect()
    }

    /// The exit status and the error lines (or, without any, the last lines of stderr), for
    /// messages.
    pub fn describe(&self) -> String {
        let errors = self.error_lines();
        let said = if errors.is_empty() {
            let lines: Vec<&str> = self.stderr.lines().collect();
            lines[lines.len().saturating_sub(3)..].join(" | ")
        } else {
            errors.join(" | ")
        };
        format!("{}: {said}", self.status)
    }
}

/// Runs `cmd` with its output captured; `Err` (after killing it) when it runs longer than `limit`:
/// a hang is a failure of its own, not a test that never ends.
pub fn run_timed(cmd: &mut Command, limit: Duration) -> Result<Ran, String> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let drain = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = from.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "hung: {:?} did not end within {limit:?}",
                cmd.get_args().collect::<Vec<_>>()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Ran {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

/// The round trip of the acceptance tests: generates an image in `dir`, backs it up into `repo`
/// (a path or an `s3://` location of this thread's store), changes 5% of it, backs it up again,
/// checks that the second backup stored about the changed data only, and restores both restore
/// points; each must equal the image as it was at its backup, and `verify --read-data` passes.
pub fn round_trip(dir: &Path, repo: &Path, size: u64, chunk_size: &str) {
    let image = dir.join("disk.img");
    backflow_fixtures::generate_image(&image, size, 7).unwrap();
    init_repo(repo, chunk_size);

    let first = backup(&image, repo);
    let first_id = first["snapshot"].as_str().unwrap().to_owned();
    let at_first = dir.join("at-first.img");
    copy_sparse(&image, &at_first);

    let ranges = backflow_fixtures::change_image(&image, 0.05, 8).unwrap();
    assert!(!ranges.is_empty());
    let second = backup(&image, repo);
    let second_id = second["snapshot"].as_str().unwrap().to_owned();
    assert_ne!(first_id, second_id);
    assert_eq!(
        snapshot_ids(repo),
        vec![first_id.clone(), second_id.clone()]
    );

    // The second backup stores about the changed data, not the image again.
    let changed: u64 = ranges.iter().map(|r| r.len).sum();
    let grown = num(&second, "repo_bytes_written");
    assert!(
        grown <= changed * 2,
        "the incremental stored {grown} bytes for {changed} changed"
    );
    assert!(num(&first, "repo_bytes_written") > grown);

    assert_restores_then_verifies(repo, &[(&first_id, &at_first), (&second_id, &image)], dir);
}
