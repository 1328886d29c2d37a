//! Killed and interrupted backups: nothing committed is ever lost.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// How long an uninterrupted backup of `image` takes here, to spread kills over its whole run.
fn time_backup(image: &Path, repo: &Path) -> Duration {
    let started = Instant::now();
    let status = start_backup(image, repo).wait().unwrap();
    assert!(status.success());
    started.elapsed()
}

#[test]
fn sigkill_at_many_moments_never_loses_a_committed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 128 << 20, 21).unwrap();
    init_repo(&repo, "64K");

    // A first snapshot to protect, and the time a backup takes.
    let full = time_backup(&image, &repo);
    let first = snapshot_ids(&repo).pop().unwrap();
    let kept = dir.path().join("kept-0.img");
    copy_sparse(&image, &kept);
    let mut committed = vec![(first, kept)];

    const KILLS: u32 = 16;
    for round in 0..KILLS {
        backflow_fixtures::change_image(&image, 0.05, 100 + u64::from(round)).unwrap();
        // From right after start to a little past the typical end: some kills land while the
        // process starts, some mid-stream, some during commit, some after it finished.
        let delay = full.mul_f64(f64::from(round) / f64::from(KILLS - 4));
        let mut child = start_backup(&image, &repo);
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();

        let ids = snapshot_ids(&repo);
        for (id, _) in &committed {
            assert!(ids.contains(id), "round {round}: snapshot {id} vanished");
        }
        if status.success() || ids.len() > committed.len() {
            // The run finished (or committed just before the kill): the new snapshot is complete.
            let new = ids.last().unwrap().clone();
            let copy = dir.path().join(format!("kept-{}.img", round + 1));
            copy_sparse(&image, &copy);
            committed.push((new, copy));
        }
        assert_verifies(&repo, &format!("round {round} (killed after {delay:?})"));
    }
    assert!(
        committed.len() < KILLS as usize + 1,
        "no kill landed mid-run"
    );
    assert_restores(&repo, &committed, dir.path());

    // The next backup after all this succeeds and restores identical.
    let report = backup(&image, &repo);
    let id = report["snapshot"].as_str().unwrap().to_owned();
    assert_restores(&repo, &[(id, image.clone())], dir.path());
}

#[test]
fn sigterm_stops_cleanly_commits_nothing_and_leaves_no_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 1 << 30, 5).unwrap();
    init_repo(&repo, "64K");
    let child = start_backup(&image, &repo);
    // The backup session's scratch directory appears with the first chunk the writer gets: from
    // then on the run is mid-stream (a 1 GiB image takes far longer than this poll's 2 ms).
    let scratch = repo.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the backup never started writing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(snapshot_ids(&repo).is_empty());
    let leftovers = std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "scratch files left in {}", scratch.display());
    assert!(verify(&repo, true).status.success());
    // And the next backup succeeds and restores identical.
    let report = backup(&image, &repo);
    let id = report["snapshot"].as_str().unwrap().to_owned();
    assert_restores(&repo, &[(id, image.clone())], dir.path());
}
