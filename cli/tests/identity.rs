//! Identities and snapshot names from the real binary: two images of one file name in different
//! directories are two machines (their own retention, their own `latest`), `--var name=` names an
//! image, a repository written by the previous release keeps its names, and snapshots are named by
//! unique id prefixes (an ambiguous one is bad input listing the candidates).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// A file of `len` bytes: a pattern depending on `seed`, then zeros (a hole for the sparse reader).
fn write_image(path: &Path, seed: u8, len: usize) {
    let data: Vec<u8> = (0..len)
        .map(|i| {
            if i < len * 3 / 4 {
                (i as u8).wrapping_mul(seed).wrapping_add((i >> 12) as u8)
            } else {
                0
            }
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// `backflow run specs/backup-image.yaml` of `image` with `extra` variables; the snapshot id.
fn backup_image(image: &Path, repo: &Path, extra: &[&str]) -> String {
    let report = repo.with_extension("report.json");
    let mut cmd = backflow();
    cmd.arg("run")
        .arg(spec("backup-image.yaml"))
        .arg("--var")
        .arg(format!("source={}", image.display()))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .arg("--quiet")
        .arg("--report")
        .arg(&report);
    for var in extra {
        cmd.args(["--var", var]);
    }
    run_ok(&mut cmd);
    let id = read_report(&report)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(&report).unwrap();
    id
}

/// `backflow restore` with `args` after the repository, into `to` (not quiet: a refusal must not
/// print a stage table).
fn restore_with(repo: &Path, args: &[&str], to: &Path) -> Output {
    backflow()
        .args(["restore", "--repo"])
        .arg(repo)
        .args(args)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap()
}

fn snapshots_json(repo: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(backflow().args(["snapshots", "--json", "--repo"]).arg(repo));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bad input: exit 2, one line on stderr, no stage table.
fn assert_refused(out: &Output, what: &str) -> String {
    let said = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: {said}");
    assert_eq!(said.trim_end().lines().count(), 1, "{what}: {said}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains("busy") && !printed.contains("busy"),
        "{what}: a stage table: {printed}{said}"
    );
    said
}

/// The shortest prefix of `id` that no other id of `ids` starts with.
fn unique_prefix(id: &str, ids: &[String]) -> String {
    (1..=id.len())
        .map(|n| &id[..n])
        .find(|p| ids.iter().filter(|other| other.starts_with(p)).count() == 1)
        .unwrap()
        .to_owned()
}

fn canonical(path: &Path) -> String {
    path.canonicalize().unwrap().display().to_string()
}

#[test]
fn two_images_of_one_file_name_are_two_machines() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let a = dir.path().join("a").join("disk.raw");
    let b = dir.path().join("b").join("disk.raw");
    write_image(&a, 3, 1 << 20);
    write_image(&b, 5, 768 << 10);
    let (a_id, b_id) = (canonical(&a), canonical(&b));

    let a1 = backup_image(&a, &repo, &[]);
    let b1 = backup_image(&b, &repo, &[]);
    write_image(&a, 7, 1 << 20);
    let a2 = backup_image(&a, &repo, &[]);
    // b's last backup is the newest overall: a `latest` that ignored identities would pick it for a.
    write_image(&b, 11, 768 << 10);
    let b2 = backup_image(&b, &repo, &[]);

    // Listed with their identity, source and size.
    let list = snapshots_json(&repo);
    let seen: Vec<(&str, &str, &str, u64)> = list
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap(),
                s["vm"].as_str().unwrap(),
                s["source"].as_str().unwrap(),
                s["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (a1.as_str(), a_id.as_str(), a_id.as_str(), 1 << 20),
            (b1.as_str(), b_id.as_str(), b_id.as_str(), 768 << 10),
            (a2.as_str(), a_id.as_str(), a_id.as_str(), 1 << 20),
            (b2.as_str(), b_id.as_str(), b_id.as_str(), 768 << 10),
        ]
    );
    let text = run_ok(backflow().args(["snapshots", "--repo"]).arg(&repo));
    let text = String::from_utf8_lossy(&text.stdout);
    let header = text.lines().next().unwrap();
    for column in ["id", "vm", "size", "source"] {
        assert!(header.contains(column), "{text}");
    }
    for id in [&a1, &a2] {
        let line = text.lines().find(|l| l.starts_with(id.as_str())).unwrap();
        assert!(line.contains(&a_id) && line.contains("1M"), "{text}");
    }

    // `latest` of each is its own newest; alone it is a question, and nothing is written.
    let out_a = dir.path().join("a.out");
    let restored = restore_with(&repo, &["--snapshot", "latest", "--vm", &a_id], &out_a);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_same_file(&out_a, &a);
    let out_b = dir.path().join("b.out");
    let restored = restore_with(&repo, &["--vm", &b_id], &out_b);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_same_file(&out_b, &b);
    let nowhere = dir.path().join("nowhere.out");
    let said = assert_refused(
        &restore_with(&repo, &["--snapshot", "latest"], &nowhere),
        "latest of two",
    );
    assert!(said.contains(&a_id) && said.contains(&b_id), "{said}");
    assert!(said.contains("--vm"), "{said}");
    assert!(!nowhere.exists());

    // Retention per identity: the newest of each stays.
    forget_keep_last(&repo, 1);
    assert_eq!(snapshot_ids(&repo), [a2.clone(), b2.clone()]);
    assert_verifies(&repo, "after forget");
}

#[test]
fn a_name_variable_names_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("images").join("disk.raw");
    write_image(&image, 13, 512 << 10);
    let id = backup_image(&image, &repo, &["name=web01"]);
    let list = snapshots_json(&repo);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["vm"], "web01");
    assert_eq!(list[0]["source"], canonical(&image).as_str());
    assert_eq!(list[0]["disks"][0]["name"], "disk");
    let out = dir.path().join("out.raw");
    let restored = restore_with(&repo, &["--vm", "web01"], &out);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_same_file(&out, &image);
    // A name is a name, never a path.
    let bad = backflow()
        .arg("run")
        .arg(spec("backup-image.yaml"))
        .arg("--var")
        .arg(format!("source={}", image.display()))
        .arg("--var")
        .arg(format!("repo={}", repo.display()))
        .args(["--var", "name=a/b", "--quiet"])
        .output()
        .unwrap();
    let said = stderr(&bad);
    assert_eq!(bad.status.code(), Some(2), "{said}");
    assert!(said.contains("vm: VM name \"a/b\" contains `/`"), "{said}");
}

#[test]
fn a_repository_of_the_previous_release_keeps_its_names() {
    // Written by the previous release (`backup-image.yaml` of `src/disk.raw`, chunks of 64K): its
    // snapshot is called `disk`, after the file name. The image is the one `write_fixture_image`
    // makes.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    cp_a(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/release-repo"),
        &repo,
    );
    for empty in ["users", "tmp"] {
        std::fs::create_dir_all(repo.join(empty)).unwrap();
    }
    let old_image = dir.path().join("old.raw");
    write_fixture_image(&old_image);
    const OLD_ID: &str = "20261203T210317Z-2bc9e9";
    let list = snapshots_json(&repo);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], OLD_ID);
    assert_eq!(list[0]["vm"], "disk");
    assert_eq!(list[0]["source"], "src/disk.raw");

    // This release backs up another disk.raw twice: a machine of its own, next to `disk`.
    let image = dir.path().join("new").join("disk.raw");
    write_image(&image, 17, 256 << 10);
    backup_image(&image, &repo, &[]);
    let newest = backup_image(&image, &repo, &[]);
    forget_keep_last(&repo, 1);
    assert_eq!(snapshot_ids(&repo), [OLD_ID.to_owned(), newest]);

    // The old snapshot restores by `latest` of its name and by a prefix of its id.
    let out = dir.path().join("old.out");
    let restored = restore_with(&repo, &["--snapshot", "latest", "--vm", "disk"], &out);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_same_file(&out, &old_image);
    std::fs::remove_file(&out).unwrap();
    let restored = restore_with(&repo, &["--snapshot", &OLD_ID[..19]], &out);
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_same_file(&out, &old_image);
    assert_verifies(&repo, "after the restores");
}

/// The image of the fixture repository: 192 KiB of `(i * 7 + i / 4096) % 256`, then 64 KiB of zeros.
fn write_fixture_image(path: &Path) {
    let mut data = vec![0u8; 256 << 10];
    for (i, byte) in data.iter_mut().enumerate().take(192 << 10) {
        *byte = ((i * 7 + i / 4096) % 256) as u8;
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn snapshots_are_named_by_unique_prefixes_for_restore_and_forget() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let image = dir.path().join("web.raw");
    let mut kept: Vec<(String, PathBuf)> = Vec::new();
    for seed in [19, 23, 29] {
        write_image(&image, seed, 512 << 10);
        let id = backup_image(&image, &repo, &["name=web"]);
        let copy = dir.path().join(format!("{id}.img"));
        copy_sparse(&image, &copy);
        kept.push((id, copy));
    }
    let ids: Vec<String> = kept.iter().map(|(id, _)| id.clone()).collect();

    // Each restores by its shortest unique prefix.
    for (id, copy) in &kept {
        let prefix = unique_prefix(id, &ids);
        let out = dir.path().join(format!("{prefix}.out"));
        let restored = restore_with(&repo, &["--snapshot", &prefix], &out);
        assert!(restored.status.success(), "{prefix}: {}", stderr(&restored));
        assert_same_file(&out, copy);
    }

    // All three start with the year: bad input naming each with its VM and time; nothing written.
    let out = dir.path().join("ambiguous.out");
    let said = assert_refused(
        &restore_with(&repo, &["--snapshot", &ids[0][..4]], &out),
        "ambiguous prefix",
    );
    for id in &ids {
        assert!(said.contains(&format!("{id} (vm web, 20")), "{said}");
    }
    assert!(!out.exists());
    let said = assert_refused(
        &restore_with(&repo, &["--snapshot", "19990101"], &out),
        "unknown id",
    );
    assert!(said.contains("\"19990101\""), "{said}");
    let said = assert_refused(&restore_with(&repo, &["--vm", "mail"], &out), "unknown VM");
    assert!(said.contains("\"mail\"") && said.contains("web"), "{said}");
    assert!(!out.exists());

    // forget: several at once, by prefix; an ambiguous one removes nothing.
    let forget = |args: &[&str]| {
        backflow()
            .args(["forget", "--repo"])
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    let said = assert_refused(&forget(&["--snapshot", &ids[0][..4]]), "forget ambiguous");
    assert!(ids.iter().all(|id| said.contains(id.as_str())), "{said}");
    assert_eq!(snapshot_ids(&repo), ids);
    let (p0, p2) = (unique_prefix(&ids[0], &ids), unique_prefix(&ids[2], &ids));
    let out = forget(&["--snapshot", &p0, "--snapshot", &p2]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshot_ids(&repo), [ids[1].clone()]);
    // `latest` of a VM is a name too.
    let out = forget(&["--snapshot", "latest", "--vm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(snapshot_ids(&repo).is_empty());
}
