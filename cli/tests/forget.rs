//! `backflow forget` on real backups: the dry run changes nothing and lists what would go, the real
//! run removes exactly that, per VM, and what is left restores identical and verifies.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Backs `image` up as disk (and so VM) `name`; returns the snapshot id.
fn backup_as(image: &Path, repo: &Path, name: &str) -> String {
    backup_named(image, repo, name)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn forget(repo: &Path, args: &[&str]) -> std::process::Output {
    backflow()
        .args(["forget", "--repo"])
        .arg(repo)
        .args(args)
        .output()
        .unwrap()
}

fn forget_json(repo: &Path, args: &[&str]) -> serde_json::Value {
    let out = forget(repo, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (id, keep) of each decision, in output order.
fn decisions(json: &serde_json::Value) -> Vec<(String, bool)> {
    json["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                d["keep"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn forget_keeps_the_newest_per_vm_and_the_rest_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    // Two VMs: web01 backed up three times, db01 twice, each image changed between backups.
    let mut copies: Vec<(String, PathBuf)> = Vec::new();
    let mut ids = std::collections::HashMap::<&str, Vec<String>>::new();
    for (name, runs, seed) in [("web01", 3, 1), ("db01", 2, 50)] {
        let image = dir.path().join(format!("{name}.img"));
        backflow_fixtures::generate_image(&image, 4 << 20, seed).unwrap();
        for run in 0..runs {
            if run > 0 {
                backflow_fixtures::change_image(&image, 0.1, seed + run).unwrap();
            }
            let id = backup_as(&image, &repo, name);
            let copy = dir.path().join(format!("{id}.img"));
            copy_sparse(&image, &copy);
            copies.push((id.clone(), copy));
            ids.entry(name).or_default().push(id);
        }
    }
    let all = snapshot_ids(&repo);
    assert_eq!(all.len(), 5);
    let (web, db) = (&ids["web01"], &ids["db01"]);

    // No keep rule, an unknown VM, a bad number: exit 2, nothing touched.
    let out = forget(&repo, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keep rule"));
    let out = forget(&repo, &["--keep-last", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = forget(&repo, &["--keep-last", "1", "--vm", "mail01"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mail01") && stderr.contains("db01, web01"),
        "{stderr}"
    );
    let out = forget(&repo, &["--keep-last", "two"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(snapshot_ids(&repo), all);

    // Dry run: the listing says what would go (web01's oldest), nothing goes.
    let json = forget_json(&repo, &["--keep-last", "2", "--dry-run"]);
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["policy"]["keep_last"], 2);
    let expected = vec![
        (db[1].clone(), true),
        (db[0].clone(), true),
        (web[2].clone(), true),
        (web[1].clone(), true),
        (web[0].clone(), false),
    ];
    assert_eq!(decisions(&json), expected);
    assert_eq!(json["decisions"][0]["reasons"][0], "last 1");
    assert_eq!(json["forgotten"].as_array().unwrap().len(), 0);
    let out = forget(&repo, &["--keep-last", "2", "--dry-run"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dry run: nothing was removed; 1 snapshot would be forgotten"),
        "{text}"
    );
    assert!(
        text.contains("vm web01: 3 snapshots, keep 2, would forget 1"),
        "{text}"
    );
    let line = text.lines().find(|l| l.contains(&web[0])).unwrap();
    assert!(line.contains("would forget"), "{line}");
    assert_eq!(snapshot_ids(&repo), all);

    // For real.
    let json = forget_json(&repo, &["--keep-last", "2"]);
    assert_eq!(json["dry_run"], false);
    assert_eq!(decisions(&json), expected);
    assert_eq!(json["forgotten"], serde_json::json!([web[0]]));
    let left: Vec<String> = all.iter().filter(|i| *i != &web[0]).cloned().collect();
    assert_eq!(snapshot_ids(&repo), left);

    // One VM only: db01 down to its newest, web01 untouched.
    let out = forget(&repo, &["--vm", "db01", "--keep-last", "1"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("forgot 1 snapshot;"), "{text}");
    assert!(!text.contains("web01"), "{text}");
    let left: Vec<String> = left.into_iter().filter(|i| i != &db[0]).collect();
    assert_eq!(snapshot_ids(&repo), left);

    // Forgetting again with the same policy has nothing left to do.
    let json = forget_json(&repo, &["--keep-last", "2"]);
    assert!(decisions(&json).iter().all(|(_, keep)| *keep));

    // What is left restores to the images as they were, and the repository verifies.
    let left: Vec<(&str, &Path)> = copies
        .iter()
        .filter(|(id, _)| left.contains(id))
        .map(|(id, copy)| (id.as_str(), copy.as_path()))
        .collect();
    assert_restores_then_verifies(&repo, &left, dir.path());
}
