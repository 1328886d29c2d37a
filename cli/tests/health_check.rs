//! Health checks as jobs, and self-healing: a damaged chunk found by a health-check job is marked
//! in the repository, the next backup of the unchanged disk stores it again, and from then on every
//! snapshot restores, the old one included (it references the same digest). Real binary, real
//! files; the incremental case runs real qemu-nbd and qemu-img with a persistent dirty bitmap.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use backflow_repository::{PackEntry, read_pack_trailer};
use common::*;

/// Flips one byte in the middle of the largest blob of the repository's first pack; returns the
/// pack's path and the blob's trailer entry.
fn damage_a_blob(repo: &Path) -> (PathBuf, PackEntry) {
    let pack = pack_files(repo).into_iter().next().expect("a pack");
    let trailer = read_pack_trailer(&pack).unwrap();
    let entry = trailer
        .entries
        .iter()
        .max_by_key(|e| e.stored_len)
        .copied()
        .expect("a blob");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let at = entry.offset + u64::from(entry.stored_len) / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    (pack, entry)
}

/// A health-check job file for `repo`, in `dir`.
fn check_job(dir: &Path, repo: &Path) -> PathBuf {
    let path = dir.join("weekly-check.yaml");
    std::fs::write(
        &path,
        format!(
            "name: weekly-check\nrepository: {}\nhealth_check: {{read_data: true}}\n\
             schedule: [\"0 3 * * 0\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    path
}

/// Runs the job; returns whether it exited 0 and the session record it wrote.
fn run_check(job: &Path) -> (std::process::Output, serde_json::Value) {
    let report = job.with_extension(format!("session-{}.json", std::process::id()));
    let out = backflow()
        .args(["job", "run", "--report"])
        .arg(&report)
        .arg(job)
        .output()
        .unwrap();
    let record = read_report(&report);
    std::fs::remove_file(&report).unwrap();
    (out, record)
}

fn pack_id(pack: &Path) -> String {
    pack.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The check fails, names the old snapshot, and marks exactly the damaged blob.
fn check_finds_and_marks(job: &Path, repo: &Path, pack: &Path, entry: &PackEntry, old: &str) {
    let (out, record) = run_check(job);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a failed check exited 0:\n{stdout}");
    assert_eq!(record["result"], "failure", "{record:#}");
    let check = &record["health_check"];
    assert_eq!(check["damaged_chunks"], 1, "{record:#}");
    assert_eq!(check["new_marks"], 1, "{record:#}");
    assert_eq!(check["affected_snapshots"], serde_json::json!([old]));
    assert!(
        stdout.contains("1 damaged chunks marked") && stdout.contains(old),
        "{stdout}"
    );
    // Recorded in the repository like backup sessions.
    let sessions = run_ok(backflow().args(["sessions", "--json", "--repo"]).arg(repo));
    let sessions: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    let last = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == record["id"])
        .expect("the session is recorded");
    assert_eq!(last["job"], "weekly-check");
    assert_eq!(last["result"], "failure");
    assert_eq!(last["health_check"]["damaged_chunks"], 1);

    let marks = std::fs::read_to_string(repo.join("damaged")).unwrap();
    let expected = format!(
        "{} {} {}",
        entry.digest.to_hex(),
        pack_id(pack),
        entry.offset
    );
    let lines: Vec<&str> = marks.lines().collect();
    assert_eq!(
        lines[..2],
        ["backflow-damaged 2", expected.as_str()],
        "{marks}"
    );
    assert!(
        lines.len() == 3 && lines[2].starts_with("checksum "),
        "{marks}"
    );
}

/// After the heal: verify passes and calls the damaged copy healed; the check is a warning.
fn check_calls_it_healed(job: &Path, repo: &Path, pack: &Path) {
    let verified = verify(repo, true);
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{text}");
    assert!(
        text.contains("HEALED chunk") && text.contains(&pack_id(pack)),
        "{text}"
    );
    assert!(text.contains("superseded by a healthy copy"), "{text}");
    assert!(
        !text.contains("DAMAGED") && !text.contains("used by snapshots"),
        "{text}"
    );
    assert!(text.contains("repository OK"), "{text}");

    let (out, record) = run_check(job);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(record["result"], "warning", "{record:#}");
    assert_eq!(record["health_check"]["damaged_chunks"], 0);
    assert_eq!(record["health_check"]["healed_chunks"], 1);
    assert_eq!(record["health_check"]["new_marks"], 0);
}

#[test]
fn a_damaged_chunk_is_marked_by_the_check_and_stored_again_by_the_next_backup() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 32 << 20, 11).unwrap();
    init_repo(&repo, "64K");
    let old = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = check_job(dir.path(), &repo);
    let (out, record) = run_check(&job);
    assert!(out.status.success(), "{record:#}");
    assert_eq!(record["result"], "success");
    assert!(!repo.join("damaged").exists());

    let (pack, entry) = damage_a_blob(&repo);
    check_finds_and_marks(&job, &repo, &pack, &entry, &old);
    // Marked, the chunk is not served any more: the restore says why.
    let target = dir.path().join("before-heal.img");
    let restored = restore(&repo, &old, &target);
    assert!(!restored.status.success());
    let stderr = String::from_utf8_lossy(&restored.stderr);
    assert!(
        stderr.contains(&entry.digest.to_hex()) && stderr.contains("marked damaged"),
        "{stderr}"
    );

    // The same, unchanged image again: the damaged chunk is read and stored anew.
    let report = backup(&image, &repo);
    let new = report["snapshot"].as_str().unwrap().to_owned();
    // The damaged content may occur at several places of the image: each is one chunk to store.
    let image_bytes = std::fs::read(&image).unwrap();
    let occurrences = image_bytes
        .chunks(64 << 10)
        .filter(|c| blake3::hash(c).as_bytes() == entry.digest.as_bytes())
        .count();
    assert!(occurrences > 0);
    assert!(
        warnings(&report)
            .iter()
            .any(|w| w.contains(&format!("{occurrences} chunks of snapshot"))
                && w.contains("marked damaged")),
        "{report:#}"
    );
    assert!(report["repo_bytes_written"].as_u64().unwrap() > 0);

    check_calls_it_healed(&job, &repo, &pack);
    // Both restore points restore whole: the old one from the new copy.
    assert_restores(
        &repo,
        &[
            (old.as_str(), image.as_path()),
            (new.as_str(), image.as_path()),
        ],
        dir.path(),
    );
    // The damaged blob is still on disk; nothing but the marks file changed it.
    let file = std::fs::File::open(&pack).unwrap();
    let mut blob = vec![0u8; entry.stored_len as usize];
    file.read_exact_at(&mut blob, entry.offset).unwrap();
    assert!(
        backflow_repository::decode(entry.codec, &blob, entry.raw_len)
            .map_or(true, |plain| backflow_pipeline::digest_of(&plain)
                != entry.digest)
    );
    drop(file);

    // A gc keeps the healthy copy and drops the damaged one: the damaged pack is rewritten without
    // it, and verify finds nothing wrong any more.
    let out = run_ok(
        backflow()
            .args(["gc", "--repack-threshold", "0", "--json", "--repo"])
            .arg(&repo),
    );
    let gc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(gc["chunks_removed"].as_u64().unwrap() >= 1, "{gc:#}");
    assert!(!pack.exists(), "the damaged pack is gone");
    let marks = std::fs::read_to_string(repo.join("damaged")).unwrap();
    assert!(
        !marks.contains(&entry.digest.to_hex()),
        "the deleted copy's mark went with it: {marks}"
    );
    assert_restores_then_verifies(
        &repo,
        &[
            (old.as_str(), image.as_path()),
            (new.as_str(), image.as_path()),
        ],
        dir.path(),
    );
}

/// The incremental case: qcow2 through qemu-nbd with a dirty bitmap. Nothing changes between the
/// two backups, so every chunk would be referenced from the parent unread, except the damaged one,
/// which the map reads again.
#[test]
fn an_incremental_backup_reads_the_damaged_chunk_again() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("source.raw");
    backflow_fixtures::generate_image(&raw, 16 << 20, 12).unwrap();
    let image = dir.path().join("vm1.qcow2");
    backflow_testkit::qemu::raw_to_qcow2(&raw, &image);
    let repo = dir.path().join("repo");
    init_repo(&repo, "128K");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let backup_qcow2 = || {
        let report = dir.path().join("report.json");
        run_ok(
            backflow()
                .env("TMPDIR", &tmp)
                .arg("run")
                .arg(spec("backup-qcow2.yaml"))
                .arg("--var")
                .arg(format!("source={}", image.display()))
                .arg("--var")
                .arg(format!("repo={}", repo.display()))
                .args(["--var", "disk=vda", "--quiet", "--report"])
                .arg(&report),
        );
        read_report(&report)
    };
    let old = backup_qcow2()["snapshot"].as_str().unwrap().to_owned();
    let job = check_job(dir.path(), &repo);
    let (pack, entry) = damage_a_blob(&repo);
    check_finds_and_marks(&job, &repo, &pack, &entry, &old);

    let report = backup_qcow2();
    let new = report["snapshot"].as_str().unwrap().to_owned();
    // An incremental: only the damaged chunk (128 KiB at most) was read.
    assert!(
        !warnings(&report)
            .iter()
            .any(|w| w.contains("reading all of it")),
        "{report:#}"
    );
    let read = bytes_read(&report);
    assert!(
        read > 0 && read <= 128 << 10,
        "read {read} bytes: {report:#}"
    );

    check_calls_it_healed(&job, &repo, &pack);
    assert_restores(
        &repo,
        &[(old.as_str(), raw.as_path()), (new.as_str(), raw.as_path())],
        dir.path(),
    );
}

/// The daemon runs a health-check job on its schedule: a weekly check whose last session was eight
/// days ago is caught up at start, fails, marks the damage and is recorded.
#[test]
fn the_daemon_runs_a_health_check_job() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let repo = dir.path().join("repo");
    backflow_fixtures::generate_image(&image, 8 << 20, 13).unwrap();
    init_repo(&repo, "64K");
    let old = backup(&image, &repo)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (pack, entry) = damage_a_blob(&repo);
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    check_job(&jobs, &repo);
    let id = record_old_session(&repo, "weekly-check", 8 * 86400);
    run_daemon_until(&jobs, "Session ended.");

    let sessions = run_ok(
        backflow()
            .args(["sessions", "--json", "--job", "weekly-check", "--repo"])
            .arg(&repo),
    );
    let sessions: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    let ran = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] != id.as_str())
        .expect("the daemon's session is recorded");
    assert_eq!(ran["result"], "failure", "{ran:#}");
    assert_eq!(ran["health_check"]["damaged_chunks"], 1);
    assert_eq!(
        ran["health_check"]["affected_snapshots"],
        serde_json::json!([old])
    );
    let marks = std::fs::read_to_string(repo.join("damaged")).unwrap();
    assert!(
        marks.contains(&format!(
            "{} {} {}",
            entry.digest.to_hex(),
            pack_id(&pack),
            entry.offset
        )),
        "{marks}"
    );
}
