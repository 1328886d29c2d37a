//! Bad input, found before any data moved: exit 2, no stage table, and one line on stderr that
//! names the cause and the fix (a spec's errors keep one `FILE:LINE:COLUMN:` line each, then a
//! count). One row per mistake; the real binary.

mod common;

use std::path::Path;

use common::*;

struct Case {
    /// The command line; `{dir}` is a scratch directory, `{repo}` a repository with two
    /// snapshots, `{image}` an image file.
    args: &'static str,
    /// A fragment of the error line.
    says: &'static str,
    /// How many lines stderr has.
    lines: usize,
}

const fn case(args: &'static str, says: &'static str) -> Case {
    Case {
        args,
        says,
        lines: 1,
    }
}

const CASES: &[Case] = &[
    case(
        "snapshots --repo {dir}/missing",
        "{dir}/missing does not exist; create a repository there with `backflow init --repo {dir}/missing`",
    ),
    case(
        "verify --repo {dir}/plain",
        "{dir}/plain is not a Backflow repository: it has no `config` file; create one with `backflow init --repo {dir}/plain`",
    ),
    case(
        "snapshots --repo {image}",
        "{image} is a file, not a repository",
    ),
    case(
        "snapshots --repo {image}/x",
        "{image}/x cannot be a repository: a part of the path is a file",
    ),
    case(
        "restore --repo {dir}/missing --to {dir}/out.raw",
        "{dir}/missing does not exist",
    ),
    case(
        "forget --repo {dir}/plain --keep-last 1",
        "{dir}/plain is not a Backflow repository",
    ),
    case("gc --repo {dir}/missing", "{dir}/missing does not exist"),
    // The spec's `repository:` is opened before any stage starts.
    case(
        "run backup-image --var source={image} --var repo={dir}/missing",
        "{dir}/missing does not exist; create a repository there with `backflow init --repo {dir}/missing`",
    ),
    case(
        "init --repo {dir}/new --chunk-size 1T",
        "--chunk-size 1T: expected a multiple of 64K from 64K to 16M",
    ),
    case(
        "init --repo {dir}/new --chunk-size 100K",
        "--chunk-size 100K: expected a multiple of 64K",
    ),
    case(
        "init --repo {dir}/new --pack-size 2G",
        "--pack-size 2G: expected a size from 64K to 1G",
    ),
    case(
        "init --repo {repo}",
        "cannot create a repository in {repo}: ",
    ),
    case(
        "init --repo {image}",
        "cannot create a repository in {image}: it is not a directory",
    ),
    case(
        "run backup-image --var source",
        "--var source: expected KEY=VALUE",
    ),
    case(
        "run no-such-spec --var repo={repo}",
        "no spec `no-such-spec`: no such file, and not a built-in spec",
    ),
    case("specs no-such-spec", "no built-in spec `no-such-spec`"),
    Case {
        args: "run backup-image --var source={image} --var repo={repo} --var colour=red",
        says: "specs/backup-image.yaml:7:1: --var colour: `--var colour=...` sets a variable the spec does not declare",
        lines: 2,
    },
    Case {
        args: "run backup-image --var source={image}",
        says: "variable `repo` is required",
        lines: 2,
    },
    case(
        "restore --repo {repo} --snapshot nosuch --to {dir}/out.raw",
        "no snapshot \"nosuch\" in {repo}",
    ),
    // Both snapshots' ids begin with the year.
    case(
        "restore --repo {repo} --snapshot 2 --to {dir}/out.raw",
        "is ambiguous in {repo}: 2 snapshots start with it",
    ),
];

/// The stage table's header, which a failure before any data moved must not print.
const TABLE_HEADER: &str = "starved s";

fn expand(text: &str, dir: &Path, repo: &Path, image: &Path) -> String {
    text.replace("{dir}", &dir.display().to_string())
        .replace("{repo}", &repo.display().to_string())
        .replace("{image}", &image.display().to_string())
}

#[test]
fn every_mistake_before_data_moves_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let image = dir.join("disk.img");
    backflow_fixtures::generate_image(&image, 1 << 20, 5).unwrap();
    let repo = dir.join("repo");
    init_repo(&repo, "64K");
    backup(&image, &repo);
    backup(&image, &repo);
    std::fs::create_dir(dir.join("plain")).unwrap();
    std::fs::write(dir.join("plain/file"), "not a repository").unwrap();
    let mut failures = Vec::new();
    for case in CASES {
        let args = expand(case.args, dir, &repo, &image);
        let says = expand(case.says, dir, &repo, &image);
        let out = backflow()
            .env_remove("BACKFLOW_REPOSITORY")
            .current_dir(dir)
            .args(args.split(' '))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines = stderr.lines().count();
        let ok = out.status.code() == Some(2)
            && lines == case.lines
            && stderr.contains(&says)
            && !stderr.contains("\n\n")
            && !stdout.contains(TABLE_HEADER)
            && !stderr.contains(TABLE_HEADER)
            && !stderr.contains("(os error");
        if !ok {
            failures.push(format!(
                "backflow {args}\n  exit {:?}, {lines} lines (expected 2, {} lines with {says:?})\n  \
                 stdout: {stdout:?}\n  stderr: {stderr:?}",
                out.status.code(),
                case.lines
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        !dir.join("new").exists(),
        "a refused init created the repository"
    );
}

#[test]
fn an_io_error_says_its_cause_once() {
    // A repository whose config cannot be read: directories in place of both copies.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    for name in ["config", "config.copy"] {
        std::fs::remove_file(repo.join(name)).unwrap();
        std::fs::create_dir(repo.join(name)).unwrap();
    }
    let out = backflow()
        .args(["snapshots", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
    assert!(stderr.starts_with("backflow: "), "{stderr}");
}
