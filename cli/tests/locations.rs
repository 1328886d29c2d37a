//! Repository locations: every command, spec and job takes a path or `s3://BUCKET/PREFIX`. A
//! malformed `s3:` location is bad input: exit 2, one line naming the flag, the variable, or the
//! file, line and field (then the file's lines around it, as every job error has). An `s3://` URL
//! is never taken for a local path: each command runs in an empty working directory, which must
//! stay empty (no `s3:` directory made by `init`, no relative path resolved against it). Without
//! S3 credentials in the environment or a profile file, a well-formed `s3://` location is refused
//! as bad input naming it and what to set, before any request is sent.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// What the S3 backend says when nothing gives it credentials.
const NO_CREDENTIALS: &str = "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY";

/// Every command that takes `--repo`, with what else it needs (`{img}`: an image file outside the
/// working directory).
const REPO_COMMANDS: &[&str] = &[
    "init",
    "snapshots",
    "verify",
    "verify --read-data",
    "forget --keep-last 1",
    "forget --snapshot 0123abcd",
    "gc",
    "rebuild-index",
    "restore --to out.raw",
    "sessions",
];

/// `backflow` in `cwd`, with no repository and no S3 settings from the test's environment.
fn backflow_in(cwd: &Path) -> Command {
    let mut cmd = backflow();
    cmd.current_dir(cwd).env_remove("BACKFLOW_REPOSITORY");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env(
        "AWS_SHARED_CREDENTIALS_FILE",
        cwd.join("no-such-credentials"),
    )
    .env("AWS_CONFIG_FILE", cwd.join("no-such-config"));
    cmd
}

fn args(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// The command failed as bad input: exit 2 and exactly one line on stderr, which is returned.
fn bad_input_line(cmd: &mut Command) -> String {
    let out: Output = cmd.output().expect("running backflow");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{cmd:?}: expected exit 2, got {}\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{cmd:?}: one line expected:\n{stderr}"
    );
    stderr.trim_end().to_owned()
}

/// `command` given the repository `given` once as `--repo` and once as `BACKFLOW_REPOSITORY`, each
/// failing as bad input and leaving the working directory empty: (how it was given, as the error
/// names it; the error line), for each.
fn bad_input_both_ways(cwd: &Path, command: &str, given: &str) -> [(&'static str, String); 2] {
    let flag = bad_input_line(backflow_in(cwd).args(args(command)).args(["--repo", given]));
    assert_empty(cwd, command);
    let variable = bad_input_line(
        backflow_in(cwd)
            .args(args(command))
            .env("BACKFLOW_REPOSITORY", given),
    );
    assert_empty(cwd, command);
    [("--repo", flag), ("$BACKFLOW_REPOSITORY", variable)]
}

/// The working directory is as empty as the test left it.
fn assert_empty(cwd: &Path, after: &str) {
    let left: Vec<_> = std::fs::read_dir(cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{after} left {left:?} in the working directory"
    );
}

#[test]
fn a_malformed_s3_location_is_bad_input_naming_the_flag_or_the_variable() {
    let cwd = tempfile::tempdir().unwrap();
    for given in [
        "s3:/backups/x",
        "s3:backups",
        "s3://",
        "s3://Backups/x",
        "S3://backups/a//b",
    ] {
        for command in REPO_COMMANDS {
            for (origin, line) in bad_input_both_ways(cwd.path(), command, given) {
                assert!(
                    line.starts_with(&format!(
                        "backflow: {origin}: {given:?} is not a repository location: "
                    )),
                    "{command} with {origin} {given}: {line}"
                );
            }
        }
    }
}

#[test]
fn a_malformed_s3_location_for_a_spec_names_the_variable_or_the_specs_line() {
    let cwd = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 65536]).unwrap();
    let source = format!("source={}", image.display());
    for command in ["run", "validate"] {
        // From the environment: the variable is named.
        let line = bad_input_line(
            backflow_in(cwd.path())
                .args([command, "backup-image", "--var", &source])
                .env("BACKFLOW_REPOSITORY", "s3:/backups"),
        );
        assert_eq!(
            line,
            "backflow: $BACKFLOW_REPOSITORY: \"s3:/backups\" is not a repository location: an S3 \
             location is written s3://BUCKET or s3://BUCKET/PREFIX",
            "{command}"
        );
        // From `--var repo=`: the spec's `repository:` line, as every spec error is said.
        let out = backflow_in(cwd.path())
            .args([
                command,
                "backup-image",
                "--var",
                &source,
                "--var",
                "repo=s3:/backups",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        let line = repository_line(&common::spec("backup-image.yaml"));
        assert!(
            first.starts_with(&format!("specs/backup-image.yaml:{line}:"))
                && first.contains(": repository: \"s3:/backups\" is not a repository location"),
            "{command}: {stderr}"
        );
        assert_empty(cwd.path(), command);
    }
}

/// The line of a spec's `repository:` key.
fn repository_line(spec: &Path) -> usize {
    let text = std::fs::read_to_string(spec).unwrap();
    1 + text
        .lines()
        .position(|l| l.starts_with("repository:"))
        .expect("the spec has a repository")
}

#[test]
fn an_s3_location_is_never_a_local_path() {
    let cwd = tempfile::tempdir().unwrap();
    for command in REPO_COMMANDS {
        for (origin, line) in bad_input_both_ways(cwd.path(), command, "s3://bucket/x") {
            assert!(
                line.contains("s3://bucket/x") && line.contains(NO_CREDENTIALS),
                "{command} with {origin}: {line}"
            );
        }
    }
}

#[test]
fn a_spec_with_an_s3_repository_validates_and_its_run_is_refused_before_any_data_moved() {
    let cwd = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 65536]).unwrap();
    let source = format!("source={}", image.display());
    let valid = run_ok(backflow_in(cwd.path()).args([
        "validate",
        "backup-image",
        "--var",
        &source,
        "--var",
        "repo=s3://bucket/x",
    ]));
    assert!(
        String::from_utf8_lossy(&valid.stdout).starts_with("backup-image: valid: "),
        "{valid:?}"
    );
    // From the environment too, for a spec file given by path.
    let valid = run_ok(
        backflow_in(cwd.path())
            .arg("validate")
            .arg(common::spec("backup-image.yaml"))
            .args(["--var", &source])
            .env("BACKFLOW_REPOSITORY", "s3://bucket/x"),
    );
    assert!(valid.status.success());
    let line = bad_input_line(backflow_in(cwd.path()).args([
        "run",
        "backup-image",
        "--var",
        &source,
        "--var",
        "repo=s3://bucket/x",
    ]));
    assert!(
        line.starts_with(&format!("backflow: s3://bucket/x: {NO_CREDENTIALS}")),
        "{line}"
    );
    assert_empty(cwd.path(), "run");
}

#[test]
fn a_job_with_an_s3_repository_reads_and_is_refused_naming_it() {
    let cwd = tempfile::tempdir().unwrap();
    let jobs = tempfile::tempdir().unwrap();
    let file = jobs.path().join("check.yaml");
    std::fs::write(
        &file,
        "name: check\nrepository: s3://bucket/site-a\nhealth_check: {}\n",
    )
    .unwrap();
    let out = backflow_in(cwd.path())
        .args(["job", "validate"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "backflow: {}: repository: s3://bucket/site-a: {NO_CREDENTIALS}",
            file.display()
        )),
        "{stderr}"
    );
    assert_eq!(lines[1], "1 error in the job; nothing was run");
    // `job run`: the session cannot be recorded where the repository is not, and says so.
    let out = backflow_in(cwd.path())
        .args(["job", "run", "--quiet"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("s3://bucket/site-a") && stderr.contains(NO_CREDENTIALS),
        "{stderr}"
    );
    assert_empty(cwd.path(), "job run");
    assert_empty_but(jobs.path(), "check.yaml");
}

/// `dir` holds only `name` (nothing was made beside the job file).
fn assert_empty_but(dir: &Path, name: &str) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, [name], "{}", dir.display());
}

#[test]
fn a_malformed_s3_repository_in_a_job_is_its_files_error_at_the_line() {
    let cwd = tempfile::tempdir().unwrap();
    let jobs = tempfile::tempdir().unwrap();
    let file = jobs.path().join("check.yaml");
    std::fs::write(
        &file,
        "name: check\nrepository: s3:/bucket/site-a\nhealth_check: {}\n",
    )
    .unwrap();
    let expected = format!(
        "backflow: {}:2:13: repository: \"s3:/bucket/site-a\" is not a repository location: an \
         S3 location is written s3://BUCKET or s3://BUCKET/PREFIX",
        file.display()
    );
    for command in [&["job", "validate"][..], &["job", "run"], &["daemon"]] {
        let mut cmd = backflow_in(cwd.path());
        cmd.args(command);
        if command == ["daemon"] {
            cmd.arg("--jobs").arg(jobs.path());
        } else {
            cmd.arg(&file);
        }
        // Job files' errors are said as all of them are: the located line, then the file's
        // lines around it.
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert_eq!(
            stderr.lines().next(),
            Some(expected.as_str()),
            "{command:?}"
        );
    }
    assert_empty(cwd.path(), "job");
    assert_empty_but(jobs.path(), "check.yaml");
}
