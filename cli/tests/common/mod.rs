//! Shared helpers of the command-line tests: run the real binary on real files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn backflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backflow"));
    cmd.env_remove("RUST_LOG");
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

/// Backs `image` up with specs/backup-image.yaml as disk (and so VM) `disk0`; returns the report.
pub fn backup(image: &Path, repo: &Path) -> serde_json::Value {
    backup_named(image, repo, "disk0")
}

/// Backs `image` up with specs/backup-image.yaml as disk (and so VM) `name`; returns the report.
pub fn backup_named(image: &Path, repo: &Path, name: &str) -> serde_json::Value {
    let report = repo.with_extension(format!("report-{}.json", rand_suffix()));
    run_ok(
        backflow()
            .arg("run")
            .arg(spec("backup-image.yaml"))
            .arg("--var")
            .arg(format!("source={}", image.display()))
            .arg("--var")
            .arg(format!("repo={}", repo.display()))
            .arg("--var")
            .arg(format!("disk={name}"))
            .args(["--quiet", "--report"])
            .arg(&report),
    );
    let json = read_report(&report);
    std::fs::remove_file(&report).unwrap();
    json
}

/// Every `(snapshot, image)` restores (`backflow restore`) byte-identical to its image. Restores
/// go to `scratch` and are removed after the comparison.
pub fn assert_restores(repo: &Path, points: &[(&str, &Path)], scratch: &Path) {
    for (id, original) in points {
        let out = scratch.join(format!("restored-{id}.img"));
        let restored = restore(repo, id, &out);
        assert!(
            restored.status.success(),
            "{}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert_same_file(original, &out);
        std::fs::remove_file(&out).unwrap();
    }
}

/// [`assert_restores`], then `verify --read-data` passes.
pub fn assert_restores_then_verifies(repo: &Path, points: &[(&str, &Path)], scratch: &Path) {
    assert_restores(repo, points, scratch);
    let verified = verify(repo, true);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
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

pub fn verify(repo: &Path, read_data: bool) -> Output {
    let mut cmd = backflow();
    cmd.args(["verify", "--repo"]).arg(repo);
    if read_data {
        cmd.arg("--read-data");
    }
    cmd.output().unwrap()
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
