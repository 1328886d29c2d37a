//! Bad specs: each fails before anything runs, with file:line:column, the field and the choices.

mod common;

use std::path::Path;

use common::*;

const GOOD: &str = "name: t
variables:
  source: ~
  repo: ~
repository: ${repo}
stages:
  - kind: image
    path: ${source}
  - kind: full
  - kind: reader
  - kind: dedup
  - kind: zstd
    level: 1
  - kind: repo-writer
";

/// Writes `text` as a spec, runs it and checks that it fails with every `expected` fragment on
/// stderr and without touching the repository.
fn rejects(text: &str, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(&spec, text).unwrap();
    let image = dir.path().join("d.img");
    backflow_fixtures::generate_image(&image, 1 << 20, 1).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let before = tree(&repo);
    let out = backflow()
        .arg("run")
        .arg(&spec)
        .arg("--var")
        .arg(format!("source={}", image.display()))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "expected {fragment:?} in:\n{stderr}"
        );
    }
    assert_eq!(
        tree(&repo),
        before,
        "a rejected spec changed the repository"
    );
}

fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn good_spec_validates() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("good.yaml");
    std::fs::write(&spec, GOOD).unwrap();
    run_ok(
        backflow()
            .arg("validate")
            .arg(&spec)
            .args(["--var", "source=x", "--var", "repo=y"]),
    );
}

#[test]
fn unknown_option() {
    rejects(
        &GOOD.replace("    level: 1", "    levl: 1"),
        &["bad.yaml:13:5", "levl", "level"],
    );
}

#[test]
fn unknown_kind() {
    rejects(
        &GOOD.replace("kind: zstd", "kind: zsdt"),
        &["bad.yaml:12:", "zsdt", "zstd", "dedup"],
    );
}

#[test]
fn wrong_type() {
    rejects(
        &GOOD.replace("    level: 1", "    level: fast"),
        &["bad.yaml:13:", "level", "fast"],
    );
}

#[test]
fn mismatched_stages() {
    // dedup before reader: the reader gets hashed chunks, dedup gets extents.
    let text = GOOD.replace(
        "  - kind: reader\n  - kind: dedup\n",
        "  - kind: dedup\n  - kind: reader\n",
    );
    rejects(&text, &["bad.yaml:10:", "dedup", "chunk", "extent"]);
}

#[test]
fn missing_variable() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(&spec, GOOD).unwrap();
    let out = backflow()
        .arg("run")
        .arg(&spec)
        .args(["--var", "repo=/nonexistent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.yaml:3:") && stderr.contains("source"),
        "{stderr}"
    );
    assert!(stderr.contains("--var source="), "{stderr}");
}

#[test]
fn several_errors_are_reported_together() {
    let text = GOOD
        .replace("    level: 1", "    levl: 1")
        .replace("kind: full", "kind: ful")
        .replace("  - kind: reader", "  - kind: reader\n    workers: many");
    rejects(&text, &["levl", "ful", "many"]);
}

#[test]
fn every_spec_in_specs_validates() {
    for entry in std::fs::read_dir(root().join("specs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        // Fill every required variable with a placeholder.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cmd = backflow();
        cmd.arg("validate").arg(&path);
        for var in ["source", "repo", "to", "disk", "snapshot", "name", "domain"] {
            if text.contains(&format!("  {var}: ~")) {
                cmd.args(["--var", &format!("{var}=placeholder")]);
            }
        }
        run_ok(&mut cmd);
    }
}
