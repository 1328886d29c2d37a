//! Backup, change, backup, restore: real files, the real binary, `cmp` as the judge.

mod common;

use common::*;

/// [`common::round_trip`] into a local repository.
fn round_trip(size: u64, chunk_size: &str) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    common::round_trip(dir.path(), &repo, size, chunk_size);
}

#[test]
fn backup_change_backup_restore_both_small_chunks() {
    round_trip(96 << 20, "64K");
}

#[test]
fn backup_change_backup_restore_both_large_chunks() {
    round_trip(64 << 20, "1M");
}

/// The acceptance case: a 2 GiB image with 5% changed at scattered offsets.
#[test]
fn two_gib_image_both_restore_points_restore_identical() {
    round_trip(2 << 30, "128K");
}

#[test]
fn report_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 16 << 20, 1).unwrap();
    init_repo(&repo, "128K");
    let report = backup(&image, &repo);
    for key in [
        "snapshot",
        "source_bytes_read",
        "repo_bytes_written",
        "wall_seconds",
        "stages",
    ] {
        assert!(report.get(key).is_some(), "report lacks {key}: {report}");
    }
    let stages = report["stages"].as_array().unwrap();
    let kinds: Vec<_> = stages.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["image", "full", "reader", "dedup", "zstd", "repo-writer"]
    );
    for s in stages {
        for key in [
            "name",
            "kind",
            "items",
            "bytes_in",
            "bytes_out",
            "busy_seconds",
            "starved_seconds",
            "backpressured_seconds",
        ] {
            assert!(s.get(key).is_some(), "stage lacks {key}: {s}");
        }
    }
    // The reader read what the image holds (holes skipped), the same bytes the dedup stage hashed.
    let read = report["source_bytes_read"].as_u64().unwrap();
    assert!(read > 0 && read <= 16 << 20);
}

#[test]
fn restore_of_one_disk_into_a_directory_and_a_missing_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 8 << 20, 3).unwrap();
    init_repo(&repo, "64K");
    backup(&image, &repo);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let restored = restore(&repo, "latest", &out_dir);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_same_file(&image, &out_dir.join("disk0.raw"));

    let missing = restore(&repo, "20000101T000000Z-000000", &dir.path().join("x.img"));
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("20000101T000000Z-000000"), "{stderr}");
    assert!(!dir.path().join("x.img").exists());
}

#[test]
fn two_backups_at_the_same_time_both_commit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    backflow_fixtures::generate_image(&a, 48 << 20, 11).unwrap();
    backflow_fixtures::generate_image(&b, 48 << 20, 12).unwrap();
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| backup(&a, &repo));
        let tb = s.spawn(|| backup(&b, &repo));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ids = [
        ra["snapshot"].as_str().unwrap(),
        rb["snapshot"].as_str().unwrap(),
    ];
    for (id, image) in ids.iter().zip([&a, &b]) {
        let out = dir.path().join(format!("{id}.img"));
        assert!(restore(&repo, id, &out).status.success());
        assert_same_file(image, &out);
    }
    assert!(verify(&repo, true).status.success());
}
