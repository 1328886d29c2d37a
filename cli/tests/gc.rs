//! `backflow gc` on real backups: it frees what forgotten snapshots used, what remains restores
//! identical, a backup running during the gc commits a snapshot that restores identical, and a gc
//! SIGKILLed at any step (named steps and random moments) loses nothing once run again.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Total size of the pack files.
fn pack_bytes(repo: &Path) -> u64 {
    pack_files(repo)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

/// Three backups of one image, 40% changed between them, each with a copy of the image as it was;
/// then all but the newest forgotten. Returns (newest id, its copy).
fn three_then_forget(dir: &Path, repo: &Path) -> (String, PathBuf) {
    init_small_packs(repo);
    let image = dir.join("disk.img");
    backflow_fixtures::generate_image(&image, 8 << 20, 7).unwrap();
    let mut last = None;
    for run in 0..3u64 {
        if run > 0 {
            backflow_fixtures::change_image(&image, 0.4, 100 + run).unwrap();
        }
        last = Some(backup_kept(dir, &image, repo, "disk0"));
    }
    forget_keep_last(repo, 1);
    assert_eq!(snapshot_ids(repo).len(), 1);
    last.unwrap()
}

#[test]
fn gc_after_forget_frees_the_space_and_what_remains_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let (newest, copy) = three_then_forget(dir.path(), &repo);
    let before = pack_bytes(&repo);
    let listing = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(repo.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let index_before = listing("index");

    // A dry run says what the gc will do and changes nothing.
    let dry = gc_json(&repo, &["--repack-threshold", "0", "--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry:#}");
    assert!(num(&dry, "chunks_removed") > 0, "{dry:#}");
    assert_eq!(pack_bytes(&repo), before);
    assert_eq!(listing("index"), index_before);
    assert!(!repo.join("gc/state.json").exists());

    // Threshold 0: every pack with anything unreferenced is rewritten, so afterwards the index
    // holds exactly the referenced chunks.
    let report = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(report["waiting_for"].is_null(), "{report:#}");
    assert!(num(&report, "chunks_removed") > 0, "{report:#}");
    assert!(
        num(&report, "packs_removed") + num(&report, "packs_repacked") > 0,
        "{report:#}"
    );
    assert_eq!(num(&report, "missing_chunks"), 0);
    for key in [
        "chunks_removed",
        "chunks_moved",
        "packs_removed",
        "packs_repacked",
        "bytes_deleted",
    ] {
        assert_eq!(
            num(&report, key),
            num(&dry, key),
            "{key}: {report:#} {dry:#}"
        );
    }
    let after = pack_bytes(&repo);
    assert!(after < before, "{after} >= {before}");

    // The space left is what the newest snapshot needs: no more than a fresh repository holding
    // only that image (plus pack headers and trailers of the rewritten packs).
    let fresh = dir.path().join("fresh");
    init_small_packs(&fresh);
    backup(&copy, &fresh);
    let needed = pack_bytes(&fresh);
    assert!(
        after <= needed + needed / 20,
        "after gc {after} bytes, a fresh repository needs {needed}"
    );

    // A second gc finds nothing more to do.
    let again = gc_json(&repo, &["--repack-threshold", "0"]);
    assert_eq!(num(&again, "chunks_removed"), 0, "{again:#}");
    assert_eq!(num(&again, "packs_removed"), 0, "{again:#}");
    assert_eq!(
        num(&again, "indexed_chunks"),
        num(&again, "referenced_chunks"),
        "{again:#}"
    );
    assert_eq!(pack_bytes(&repo), after);

    assert_restores_then_verifies(&repo, &[(&newest, &copy)], dir.path());
    // gc leaves no scratch, and no registered handle behind.
    assert_eq!(std::fs::read_dir(repo.join("tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(repo.join("users")).unwrap().count(), 0);
}

#[test]
fn the_default_threshold_deletes_unused_packs_and_keeps_mostly_used_ones() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let (newest, copy) = three_then_forget(dir.path(), &repo);
    let report = gc_json(&repo, &[]);
    assert!(num(&report, "chunks_removed") > 0, "{report:#}");
    assert!(num(&report, "packs_kept") > 0, "{report:#}");
    // Threshold 100: only wholly unused packs go, nothing is rewritten.
    let dir2 = tempfile::tempdir().unwrap();
    let repo2 = dir2.path().join("repo");
    three_then_forget(dir2.path(), &repo2);
    let only_delete = gc_json(&repo2, &["--repack-threshold", "100"]);
    assert_eq!(num(&only_delete, "packs_repacked"), 0, "{only_delete:#}");
    assert_eq!(num(&only_delete, "bytes_written"), 0, "{only_delete:#}");
    assert_restores_then_verifies(&repo, &[(&newest, &copy)], dir.path());
}

/// What the packs on disk hold that no snapshot references, counted from the pack trailers and the
/// manifests themselves: (stored bytes, packs holding any).
fn unused_in_packs(repo: &Path) -> (u64, u64) {
    let handle = backflow_repository::Repository::open(repo).unwrap();
    let mut referenced = std::collections::HashSet::new();
    for info in handle.list_snapshots().unwrap() {
        let snap = handle.open_snapshot(&info.id).unwrap();
        for disk in 0..snap.meta().disks.len() {
            for r in snap.chunks(disk) {
                if let backflow_repository::ChunkRef::Data(d) = r.unwrap() {
                    referenced.insert(d);
                }
            }
        }
    }
    let (mut bytes, mut packs) = (0, 0);
    for pack in pack_files(repo) {
        let unused: u64 = backflow_repository::read_pack_trailer(&pack)
            .unwrap()
            .entries
            .iter()
            .filter(|e| !referenced.contains(&e.digest))
            .map(|e| u64::from(e.stored_len))
            .sum();
        if unused > 0 {
            bytes += unused;
            packs += 1;
        }
    }
    (bytes, packs)
}

#[test]
fn gc_reports_the_unused_bytes_it_keeps_below_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    three_then_forget(dir.path(), &repo);
    let half = dir.path().join("half");
    cp_a(&repo, &half);

    // Threshold 100: every pack that holds a referenced chunk stays, whatever else it holds.
    let dry = gc_json(&repo, &["--repack-threshold", "100", "--dry-run"]);
    let report = gc_json(&repo, &["--repack-threshold", "100"]);
    assert!(report["waiting_for"].is_null(), "{report:#}");
    let (bytes, packs) = unused_in_packs(&repo);
    assert!(bytes > 0 && packs > 0, "nothing unused is left: {report:#}");
    for r in [&dry, &report] {
        assert_eq!(num(r, "unused_bytes_kept"), bytes, "{r:#}");
        assert_eq!(num(r, "packs_kept_with_unused"), packs, "{r:#}");
        assert_eq!(num(r, "repack_threshold"), 100, "{r:#}");
    }
    // The text report says it too (a second gc keeps the same packs).
    let out = run_ok(
        backflow()
            .args(["gc", "--repack-threshold", "100", "--repo"])
            .arg(&repo),
    );
    let line = format!(
        "{:.1} MiB unused in {packs} packs kept, below 100%",
        bytes as f64 / (1024.0 * 1024.0)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&line), "{line:?} not in:\n{text}");

    // Threshold 50: some packs are rewritten (nothing unused left in them), the others keep theirs.
    let report = gc_json(&half, &["--repack-threshold", "50"]);
    assert!(num(&report, "packs_repacked") > 0, "{report:#}");
    let (bytes, packs) = unused_in_packs(&half);
    assert_eq!(num(&report, "unused_bytes_kept"), bytes, "{report:#}");
    assert_eq!(num(&report, "packs_kept_with_unused"), packs, "{report:#}");
}

#[test]
fn a_backup_running_during_gc_commits_a_snapshot_that_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 8 << 20, 3).unwrap();
    let v1 = dir.path().join("v1.img");
    copy_sparse(&image, &v1);
    backup(&image, &repo);
    backflow_fixtures::change_image(&image, 0.5, 9).unwrap();
    let v2 = dir.path().join("v2.img");
    copy_sparse(&image, &v2);
    let second = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    // The third backup is of the first image again: it finds v1's chunks, which only the first
    // snapshot references, in the index. It pauses before its commit.
    copy_sparse(&v1, &image);
    let pause = dir.path().join("paused");
    let child = paused_backup(&image, &repo, &pause);

    // The first snapshot is forgotten and a gc runs: v1's chunks are unreferenced now, but the
    // running backup uses them. The gc condemns them and waits for the backup's handle.
    forget_keep_last(&repo, 1);
    let before = pack_bytes(&repo);
    let first = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(num(&first, "chunks_removed") > 0, "{first:#}");
    assert!(first["waiting_for"].is_string(), "{first:#}");
    assert!(pack_bytes(&repo) >= before, "nothing is deleted yet");
    // A gc meanwhile still waits.
    let waiting = gc_json(&repo, &[]);
    assert!(waiting["waiting_for"].is_string(), "{waiting:#}");

    resume_ok(child, &pause);
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 2);
    let third = ids.into_iter().find(|id| *id != second).unwrap();
    // It restores at once, before a gc finishes the cycle: its chunks are read from where the gc
    // condemned them.
    assert_restores_then_verifies(&repo, &[(&third, &v1)], dir.path());

    // The next gc sees that the committed backup used condemned chunks, stores them again, and
    // deletes the rest.
    let finish = gc_json(&repo, &["--repack-threshold", "0"]);
    assert!(finish["waiting_for"].is_null(), "{finish:#}");
    let earlier = &finish["earlier_cycle"];
    assert!(earlier["waiting_for"].is_null(), "{finish:#}");
    assert!(
        num(earlier, "chunks_kept_for_running_backups") > 0,
        "{finish:#}"
    );
    assert!(num(earlier, "bytes_deleted") > 0, "{finish:#}");
    assert_restores_then_verifies(&repo, &[(&second, &v2), (&third, &v1)], dir.path());
    // And a last gc has nothing to remove.
    let last = gc_json(&repo, &["--repack-threshold", "0"]);
    assert_eq!(num(&last, "chunks_removed"), 0, "{last:#}");
}

/// A repository with forgotten snapshots, copied for each kill; with `damaged`, one pack's header is
/// damaged too (and marked by `verify`), so that the gc salvages and quarantines as well as it deletes
/// and rewrites.
struct Template {
    dir: tempfile::TempDir,
    repo: PathBuf,
    newest: String,
    copy: PathBuf,
    /// The damaged pack, relative to the repository (`packs/XX/ID.pack`).
    damaged: Option<PathBuf>,
    /// Pack bytes after an uninterrupted gc.
    clean_bytes: u64,
}

/// Kill points reached only when the repository holds damage (see `GC_KILL_POINTS`).
const DAMAGE_ONLY_KILL_POINTS: &[&str] = &["salvaging", "quarantining"];

fn template(damaged: bool) -> Template {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("template");
    let (newest, copy) = three_then_forget(dir.path(), &repo);
    let damaged = damaged.then(|| {
        // The last pack written holds chunks only the newest snapshot uses: byte 19 is in its header.
        let pack = pack_files(&repo)
            .into_iter()
            .max_by_key(|p| p.metadata().unwrap().modified().unwrap())
            .unwrap();
        flip_byte(&pack, 19).unwrap();
        assert!(!verify(&repo, true).status.success());
        pack.strip_prefix(&repo).unwrap().to_owned()
    });
    let clean = dir.path().join("clean");
    cp_a(&repo, &clean);
    let report = gc_json(&clean, &["--repack-threshold", "0"]);
    assert_eq!(
        report["packs_quarantined"].as_array().unwrap().len(),
        usize::from(damaged.is_some()),
        "{report:#}"
    );
    Template {
        clean_bytes: pack_bytes(&clean),
        damaged,
        dir,
        repo,
        newest,
        copy,
    }
}

/// After a killed gc: a gc runs to the end, a second finds nothing left, the space is what an
/// uninterrupted gc leaves, and the newest snapshot restores and verifies.
fn assert_recovers(t: &Template, repo: &Path, what: &str) {
    gc_json(repo, &["--repack-threshold", "0"]);
    let again = gc_json(repo, &["--repack-threshold", "0"]);
    assert_eq!(num(&again, "chunks_removed"), 0, "{what}: {again:#}");
    assert_eq!(num(&again, "packs_removed"), 0, "{what}: {again:#}");
    let left = pack_bytes(repo);
    assert!(
        left <= t.clean_bytes + t.clean_bytes / 50,
        "{what}: {left} bytes of packs after recovery, {} after an uninterrupted gc",
        t.clean_bytes
    );
    assert_restores_then_verifies(repo, &[(&t.newest, &t.copy)], t.dir.path());
    assert!(!repo.join("gc/state.json").exists(), "{what}");
    if let Some(damaged) = &t.damaged {
        assert!(!repo.join(damaged).exists(), "{what}");
        assert!(
            repo.join(backflow_repository::QUARANTINE_DIR)
                .join(damaged)
                .exists(),
            "{what}: the damaged pack is not in the quarantine"
        );
    }
}

fn kill_points() -> Vec<String> {
    backflow_repository::GC_KILL_POINTS
        .iter()
        .map(|p| p.to_string())
        .collect()
}

/// Runs a gc on a copy of the template that kills itself at `point`.
fn killed_at(t: &Template, point: &str) -> PathBuf {
    let repo = t.dir.path().join(format!("kill-{point}"));
    cp_a(&t.repo, &repo);
    let out = backflow()
        .args(["gc", "--repack-threshold", "0", "--repo"])
        .arg(&repo)
        .env(backflow_repository::GC_KILL_AT, point)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "gc was to be killed at {point}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo
}

#[test]
fn sigkill_at_every_step_of_gc_loses_nothing() {
    let t = template(false);
    let points = kill_points();
    assert!(points.len() >= 10, "{points:?}");
    for point in points
        .iter()
        .filter(|p| !DAMAGE_ONLY_KILL_POINTS.contains(&p.as_str()))
    {
        let repo = killed_at(&t, point);
        // Killed, the repository still restores before any repair.
        assert_restores(&repo, &[(&t.newest, &t.copy)], t.dir.path());
        assert_recovers(&t, &repo, point);
        std::fs::remove_dir_all(&repo).unwrap();
    }
}

/// The same with a damaged pack whose chunks the newest snapshot needs (it restores only once a gc
/// salvaged them): every step, the salvage and the quarantine included, can be killed and resumed.
#[test]
fn sigkill_at_every_step_of_a_gc_that_salvages_loses_nothing() {
    let t = template(true);
    for point in kill_points() {
        let repo = killed_at(&t, &point);
        assert_recovers(&t, &repo, &point);
        std::fs::remove_dir_all(&repo).unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let t = template(true);
    let mut seed = 0x5eed_u64;
    // Kills that found the gc still running (the others came after it ended).
    let mut interrupted = 0;
    for round in 0..12 {
        let repo = t.dir.path().join(format!("random-{round}"));
        cp_a(&t.repo, &repo);
        // Several kills in a row on the same repository, each at a random moment.
        for _ in 0..3 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let delay = Duration::from_micros((seed >> 33) % 40_000);
            let mut child = backflow()
                .args(["gc", "--repack-threshold", "0", "--repo"])
                .arg(&repo)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            if child.try_wait().unwrap().is_none() {
                interrupted += 1;
            }
            let _ = child.kill();
            child.wait().unwrap();
        }
        assert_recovers(&t, &repo, &format!("round {round}"));
        std::fs::remove_dir_all(&repo).unwrap();
    }
    eprintln!("{interrupted} of 36 kills found the gc running");
    assert!(interrupted > 0, "no kill found a gc running");
}

#[test]
fn a_second_gc_and_an_index_rebuild_are_refused_while_one_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let (newest, copy) = three_then_forget(dir.path(), &repo);
    // A handle held open by a paused backup keeps the cycle pending.
    let image = dir.path().join("disk.img");
    let pause = dir.path().join("paused");
    let child = paused_backup(&image, &repo, &pause);
    let first = gc_json(&repo, &[]);
    assert!(first["waiting_for"].is_string(), "{first:#}");
    let rebuild = backflow()
        .args(["rebuild-index", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(!rebuild.status.success());
    let said = String::from_utf8_lossy(&rebuild.stderr);
    assert!(
        said.contains("backups are running") || said.contains("garbage collection"),
        "{said}"
    );
    resume_ok(child, &pause);
    // With the backup done, the rebuild is still refused until the gc finishes its cycle.
    let rebuild = backflow()
        .args(["rebuild-index", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rebuild.stderr).contains("backflow gc"),
        "{}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    gc_json(&repo, &[]);
    run_ok(backflow().args(["rebuild-index", "--repo"]).arg(&repo));
    assert_restores_then_verifies(&repo, &[(&newest, &copy)], dir.path());
}

/// A gc job file, run by `backflow job run` and then by the daemon on its schedule: each session
/// is recorded with the gc's report, and the space is freed.
#[test]
fn gc_runs_as_a_job_and_under_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    three_then_forget(dir.path(), &repo);
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let job = jobs.join("weekly-gc.yaml");
    std::fs::write(
        &job,
        format!(
            "name: weekly-gc\nrepository: {}\ngc: {{repack_threshold: 0}}\nschedule: [\"0 4 * * 6\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    let before = pack_bytes(&repo);
    let out = run_ok(backflow().args(["job", "run"]).arg(&job));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("freed"), "{said}");
    assert!(pack_bytes(&repo) < before);

    // The daemon catches a weekly job up at start when its last session is eight days old: the
    // same job under another name, whose only session is that old one. A second forget leaves
    // garbage for it.
    std::fs::write(
        &job,
        format!(
            "name: daemon-gc\nrepository: {}\ngc: {{repack_threshold: 0}}\nschedule: [\"0 4 * * 6\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::change_image(&image, 0.4, 777).unwrap();
    let latest = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let latest_copy = dir.path().join("latest.img");
    copy_sparse(&image, &latest_copy);
    forget_keep_last(&repo, 1);
    record_old_session(&repo, "daemon-gc", 8 * 86400);
    let before = pack_bytes(&repo);
    // The gc job ends "Session ended." (or "Session failed.", which the sessions check below
    // catches).
    run_daemon_until(&jobs, "Session ");
    assert!(pack_bytes(&repo) < before, "the daemon's gc freed space");

    for (name, runs) in [("weekly-gc", 1), ("daemon-gc", 2)] {
        let sessions = run_ok(
            backflow()
                .args(["sessions", "--json", "--job", name, "--repo"])
                .arg(&repo),
        );
        let sessions: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
        let recorded = sessions.as_array().unwrap();
        assert_eq!(recorded.len(), runs, "{sessions:#}");
        let run = recorded.last().unwrap();
        assert_eq!(run["result"], "success", "{run:#}");
        assert!(num(&run["gc"]["report"], "chunks_removed") > 0, "{run:#}");
    }
    assert_eq!(snapshot_ids(&repo), vec![latest.clone()]);
    assert_restores_then_verifies(&repo, &[(&latest, &latest_copy)], dir.path());
}

/// The packs of a backup killed before its commit are referenced by no index: gc removes them (and
/// nothing else).
#[test]
fn gc_removes_the_packs_of_a_killed_backup() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_small_packs(&repo);
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 8 << 20, 21).unwrap();
    let kept = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let copy = dir.path().join("kept.img");
    copy_sparse(&image, &copy);
    let clean = pack_bytes(&repo);

    let other = dir.path().join("other.img");
    backflow_fixtures::generate_image(&other, 8 << 20, 22).unwrap();
    let pause = dir.path().join("paused");
    let mut child = paused_backup(&other, &repo, &pause);
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&pause).unwrap();
    assert!(pack_bytes(&repo) > clean, "the killed backup wrote packs");

    let report = gc_json(&repo, &[]);
    assert!(num(&report, "orphan_packs") > 0, "{report:#}");
    assert!(report["waiting_for"].is_null(), "{report:#}");
    assert_eq!(pack_bytes(&repo), clean);
    assert_restores_then_verifies(&repo, &[(&kept, &copy)], dir.path());
}
