//! `backflow gc` on damaged repositories (issue 11): it never deletes what can be saved. A pack whose
//! header is damaged is salvaged and quarantined, not deleted; a damaged chunk with no other copy keeps
//! its mark until a backup stores it again; a damaged manifest is named by verify and forgotten by id
//! so that gc can run; damaged or crafted gc state stops gc, deletes nothing and never blocks restores.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// `REPO/quarantine/packs/XX/ID.pack` for a pack at `REPO/packs/XX/ID.pack`.
fn quarantined(repo: &Path, pack: &Path) -> PathBuf {
    let id = pack_id(pack);
    repo.join("quarantine/packs")
        .join(&id[..2])
        .join(format!("{id}.pack"))
}

/// The reproduction, gc part: two images, five backups, byte 19 of one pack (in its header,
/// the pack id) flipped, `verify --read-data`, then gc, with the default threshold and with 0. The
/// pack is moved to the quarantine, not deleted; every chunk it held is salvaged and every snapshot
/// restores byte-identical; verify is clean; `--drop-quarantine` removes it and everything still
/// restores; a new backup of the intact sources restores too.
#[test]
fn a_pack_with_a_damaged_header_is_salvaged_and_quarantined_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    backflow_fixtures::generate_image(&a, 6 << 20, 41).unwrap();
    backflow_fixtures::generate_image(&b, 4 << 20, 42).unwrap();
    let mut points = Vec::new();
    for (run, image, name) in [
        (0, &a, "a"),
        (0, &b, "b"),
        (1, &a, "a"),
        (1, &b, "b"),
        (2, &a, "a"),
    ] {
        if run > 0 {
            backflow_fixtures::change_image(image, 0.3, 500 + run).unwrap();
        }
        points.push(backup_kept(dir.path(), image, &repo, name));
    }
    assert!(verify(&repo, true).status.success());

    // The first pack of the first backup: every snapshot of `a` uses some of its chunks.
    let packs = pack_files(&repo);
    let pack = packs
        .iter()
        .min_by_key(|p| p.metadata().unwrap().modified().unwrap())
        .unwrap()
        .clone();
    flip_byte(&pack, 19).unwrap();
    // verify names the pack, and no snapshot: its blobs read back whole, so every snapshot restores
    // (a pack's header is not needed to read a blob the index points to).
    let (ok, report) = verify_json(&repo, true);
    assert!(!ok);
    let damaged = report["damaged_packs"].to_string();
    assert!(damaged.contains(&pack_id(&pack)), "{report:#}");
    assert_eq!(
        report["unrestorable_snapshots"],
        serde_json::json!([]),
        "{report:#}"
    );
    assert_restores(&repo, &points, dir.path());

    for threshold in [None, Some("0")] {
        let r = dir
            .path()
            .join(format!("r-{}", threshold.unwrap_or("default")));
        cp_a(&repo, &r);
        let relative = pack.strip_prefix(&repo).unwrap();
        let args: Vec<&str> = threshold
            .map(|t| vec!["--repack-threshold", t])
            .unwrap_or_default();
        let report = gc_json(&r, &args);
        assert_eq!(
            report["packs_quarantined"],
            serde_json::json!([pack_id(&pack)]),
            "{report:#}"
        );
        assert!(num(&report, "chunks_salvaged") > 0, "{report:#}");
        assert_eq!(num(&report, "chunks_unsalvageable"), 0, "{report:#}");
        assert_eq!(num(&report, "missing_chunks"), 0, "{report:#}");
        assert!(!r.join(relative).exists(), "the damaged pack left packs/");
        assert!(
            quarantined(&r, &pack).exists(),
            "the damaged pack is in the quarantine"
        );
        assert_restores_then_verifies(&r, &points, dir.path());
        // Marks of copies salvaged elsewhere are gone with the pack.
        let marks = std::fs::read_to_string(r.join("damaged")).unwrap_or_default();
        assert!(!marks.contains(&pack_id(&pack)), "{marks}");

        let size = quarantined(&r, &pack).metadata().unwrap().len();
        let dropped = gc_json(&r, &["--drop-quarantine"]);
        assert_eq!(num(&dropped, "quarantine_dropped"), 1, "{dropped:#}");
        assert_eq!(num(&dropped, "quarantine_bytes_freed"), size, "{dropped:#}");
        assert!(!quarantined(&r, &pack).exists());
        assert_restores_then_verifies(&r, &points, dir.path());

        // The next backups of the intact sources restore byte-identical.
        let mut more = points.clone();
        more.push(backup_kept(dir.path(), &a, &r, "a"));
        more.push(backup_kept(dir.path(), &b, &r, "b"));
        assert_restores_then_verifies(&r, &more, dir.path());
    }
}

/// A flipped byte inside one blob of a structurally sound pack, whose chunk has no other copy: gc keeps
/// the damaged copy (and so its pack) and its mark, so verify goes on naming the snapshots; once a backup
/// of the intact source stored the chunk again, gc removes the damaged copy and everything restores.
#[test]
fn a_damaged_chunk_without_another_copy_keeps_its_mark_until_a_backup_stores_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 6 << 20, 43).unwrap();
    let mut points = vec![backup_kept(dir.path(), &image, &repo, "disk0")];
    points.push(backup_kept(dir.path(), &image, &repo, "disk0"));

    // The middle of the largest pack is inside one of its blobs.
    let pack = pack_files(&repo)
        .into_iter()
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    flip_byte(&pack, pack.metadata().unwrap().len() / 2).unwrap();
    let (ok, before) = verify_json(&repo, true);
    assert!(!ok);
    let named = |report: &serde_json::Value| -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["healed"].as_bool().unwrap())
            .map(|p| {
                let mut snaps: Vec<String> = p["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect();
                snaps.sort();
                (p["digest"].as_str().unwrap().to_owned(), snaps)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    };
    let damaged = named(&before);
    assert!(!damaged.is_empty(), "{before:#}");
    let all: Vec<String> = {
        let mut ids: Vec<String> = points.iter().map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    };
    assert!(damaged.iter().all(|(_, s)| *s == all), "{damaged:?}");
    let marks = std::fs::read_to_string(repo.join("damaged")).unwrap();

    // Threshold 0 would rewrite any pack with a dead chunk: the damaged copy is not dead.
    let report = gc_json(&repo, &["--repack-threshold", "0"]);
    assert_eq!(
        num(&report, "chunks_unsalvageable"),
        damaged.len() as u64,
        "{report:#}"
    );
    assert_eq!(num(&report, "chunks_salvaged"), 0, "{report:#}");
    assert!(pack.exists(), "the pack holding the only copy was deleted");
    assert_eq!(
        std::fs::read_to_string(repo.join("damaged")).unwrap(),
        marks,
        "the marks changed"
    );
    let (ok, after) = verify_json(&repo, false);
    assert!(!ok, "verify reports the damaged chunk as healed: {after:#}");
    assert_eq!(named(&after), damaged, "{after:#}");

    // The intact source is backed up again: the chunk is stored again, and the next gc removes the
    // damaged copy with its pack.
    points.push(backup_kept(dir.path(), &image, &repo, "disk0"));
    let report = gc_json(&repo, &["--repack-threshold", "0"]);
    assert_eq!(num(&report, "chunks_unsalvageable"), 0, "{report:#}");
    assert!(!pack.exists());
    assert_restores_then_verifies(&repo, &points, dir.path());
    let marks = std::fs::read_to_string(repo.join("damaged")).unwrap();
    assert!(
        marks
            .lines()
            .all(|l| l.starts_with("backflow-damaged") || l.starts_with("checksum ")),
        "marks of the deleted pack are gone: {marks}"
    );
}

/// The shortest prefix of `id` that no other id shares.
fn unique_prefix(id: &str, ids: &[String]) -> String {
    (1..=id.len())
        .map(|n| &id[..n])
        .find(|p| ids.iter().filter(|o| o.starts_with(p)).count() == 1)
        .unwrap()
        .to_owned()
}

/// A manifest whose header is damaged: `verify` names it by its snapshot id (text and JSON), gc stops
/// and names the command that forgets it, `forget --snapshot` (by a unique prefix; an ambiguous one
/// lists the candidates; `--dry-run --json` changes nothing) removes it, and gc then runs.
#[test]
fn a_damaged_manifest_is_named_by_verify_and_forgotten_by_id_so_that_gc_runs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 4 << 20, 44).unwrap();
    let (first, _) = backup_kept(dir.path(), &image, &repo, "disk0");
    backflow_fixtures::change_image(&image, 0.3, 45).unwrap();
    let mut points = vec![backup_kept(dir.path(), &image, &repo, "disk0")];
    let other = dir.path().join("other.img");
    backflow_fixtures::generate_image(&other, 2 << 20, 46).unwrap();
    points.push(backup_kept(dir.path(), &other, &repo, "other"));
    let manifest = repo.join("snapshots").join(format!("{first}.snap"));
    flip_byte(&manifest, 3).unwrap();

    let out = verify(&repo, false);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let command = format!(
        "backflow forget --repo {} --snapshot {first}",
        repo.display()
    );
    assert!(
        text.contains(&format!("DAMAGED snapshot {first}")),
        "{text}"
    );
    assert!(text.contains(&command), "{text}");
    let (_, json) = verify_json(&repo, false);
    assert_eq!(
        json["damaged_snapshot_ids"],
        serde_json::json!([first]),
        "{json:#}"
    );

    let out = gc(&repo, &[]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&command), "{said}");

    let forget = |args: &[&str]| {
        backflow()
            .args(["forget", "--repo"])
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    // Every id starts with the year's first digit: ambiguous, and nothing is removed.
    let ids: Vec<String> = {
        let mut ids: Vec<String> = points.iter().map(|(id, _)| id.clone()).collect();
        ids.push(first.clone());
        ids
    };
    let out = forget(&["--snapshot", "2"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(ids.iter().all(|id| said.contains(id.as_str())), "{said}");
    let out = forget(&["--snapshot", "nosuchsnapshot"]);
    assert_eq!(out.status.code(), Some(2));

    let prefix = unique_prefix(&first, &ids);
    let out = forget(&["--snapshot", &prefix, "--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["snapshots"][0]["id"], first.as_str(), "{dry:#}");
    assert_eq!(dry["snapshots"][0]["damaged"], true, "{dry:#}");
    assert_eq!(dry["forgotten"], serde_json::json!([]), "{dry:#}");
    assert!(manifest.exists());

    let out = forget(&["--snapshot", &prefix, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["forgotten"], serde_json::json!([first]), "{done:#}");
    assert!(!manifest.exists());

    let report = gc_json(&repo, &[]);
    assert_eq!(num(&report, "snapshots"), 2, "{report:#}");
    assert_restores_then_verifies(&repo, &points, dir.path());
}

/// A repository with a gc cycle pending: backups v1 and v2 of one image, a third backup of v1 paused
/// before its commit while v1's snapshot is forgotten and a gc condemns v1's chunks (it waits for the
/// backup), then the backup commits. The third snapshot needs condemned chunks; the second does not.
struct Pending {
    dir: tempfile::TempDir,
    repo: PathBuf,
    /// (second, v2), (third, v1)
    points: Vec<(String, PathBuf)>,
}

fn pending_cycle() -> Pending {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 6 << 20, 47).unwrap();
    let v1 = dir.path().join("v1.img");
    copy_sparse(&image, &v1);
    backup(&image, &repo);
    backflow_fixtures::change_image(&image, 0.5, 48).unwrap();
    let second = backup_kept(dir.path(), &image, &repo, "disk0");
    copy_sparse(&v1, &image);
    let pause = dir.path().join("paused");
    let child = paused_backup(&image, &repo, &pause);
    forget_keep_last(&repo, 1);
    let waiting = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(waiting["waiting_for"].is_string(), "{waiting:#}");
    resume_ok(child, &pause);
    let third = snapshot_ids(&repo)
        .into_iter()
        .find(|id| *id != second.0)
        .unwrap();
    assert!(repo.join("gc/state.json").exists());
    Pending {
        points: vec![second, (third, v1)],
        dir,
        repo,
    }
}

/// Damaged gc state and lists: gc stops with an error naming the file and the repair, deletes
/// nothing, verify reports the file, restores of snapshots that need no condemned chunk go on, and
/// `gc --reset-state` repairs: afterwards every snapshot restores and verifies.
#[test]
fn damaged_gc_state_stops_gc_deletes_nothing_and_reset_state_repairs_it() {
    let t = pending_cycle();
    type Damage = fn(&Path);
    let cases: [(&str, &str, Damage); 5] = [
        ("state-flipped", "gc/state.json", |r| {
            let p = r.join("gc/state.json");
            flip_byte(&p, p.metadata().unwrap().len() / 2).unwrap()
        }),
        ("state-truncated", "gc/state.json", |r| {
            let p = r.join("gc/state.json");
            let len = p.metadata().unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("condemned-flipped", "gc/condemned", |r| {
            flip_byte(&r.join("gc/condemned"), 1).unwrap()
        }),
        ("doomed-truncated", "gc/doomed-packs", |r| {
            let p = r.join("gc/doomed-packs");
            let len = p.metadata().unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
        }),
        // Another list of the same cycle in place of the doomed packs.
        ("doomed-swapped", "gc/doomed-packs", |r| {
            std::fs::copy(r.join("gc/condemned"), r.join("gc/doomed-packs")).unwrap();
        }),
    ];
    for (name, file, damage) in cases {
        let r = t.dir.path().join(name);
        cp_a(&t.repo, &r);
        damage(&r);
        let packs = pack_files(&r);

        let out = gc(&r, &[]);
        assert!(!out.status.success(), "{name}: gc ran on damaged state");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(file) && said.contains("--reset-state"),
            "{name}: {said}"
        );
        assert_eq!(pack_files(&r), packs, "{name}: gc deleted packs");

        let (_, report) = verify_json(&r, false);
        let side = report["side_files"].to_string();
        assert!(
            side.contains(file) && side.contains("--reset-state"),
            "{name}: {report:#}"
        );

        // Restores go on: the second snapshot needs no condemned chunk; the third does, and finds
        // them in the list of condemned chunks, or, when that list is the damaged file (ignored, with
        // a warning), in the trailers of the packs no index file names any more.
        assert_restores(&r, &t.points[..1], t.dir.path());
        let third = &t.points[1];
        let out = t.dir.path().join("third.img");
        let restored = restore(&r, &third.0, &out);
        assert!(
            restored.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert_same_file(&third.1, &out);
        if file == "gc/condemned" {
            let said = String::from_utf8_lossy(&restored.stderr);
            assert!(
                said.contains("gc/condemned") && said.contains("rebuild-index"),
                "{name}: {said}"
            );
        }
        let _ = std::fs::remove_file(&out);

        let report = gc_json(&r, &["--reset-state", "--repack-threshold", "0"]);
        assert_eq!(report["state_reset"], true, "{name}: {report:#}");
        assert!(report["waiting_for"].is_null(), "{name}: {report:#}");
        assert_restores_then_verifies(&r, &t.points, t.dir.path());
        assert!(!r.join("gc/state.json").exists(), "{name}");
        // And the next gc has nothing left to remove.
        let again = gc_json(&r, &["--repack-threshold", "0"]);
        assert_eq!(num(&again, "chunks_removed"), 0, "{name}: {again:#}");
        std::fs::remove_dir_all(&r).unwrap();
    }
}
