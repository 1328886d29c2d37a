//! `backflow copy` and copy jobs through the real binary, between real repositories: copies keep ids,
//! send exactly the chunks the target lacks, restore byte-identical; a chunk-size mismatch writes
//! nothing; a copy killed midway leaves the target's restore points restoring and the next copy
//! succeeds; a copy job records its session in the target and applies retention there.

mod common;

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

const CHUNK: u64 = 64 * 1024;

fn copy_cmd(from: &Path, to: &Path, extra: &[&str]) -> Output {
    backflow()
        .arg("copy")
        .arg("--from")
        .arg(from)
        .arg("--to")
        .arg(to)
        .args(extra)
        .output()
        .unwrap()
}

/// `backflow copy --json`, which must succeed; its report.
fn copy_json(from: &Path, to: &Path, extra: &[&str]) -> serde_json::Value {
    let out = copy_cmd(from, to, &[extra, &["--json"]].concat());
    assert!(
        out.status.success(),
        "copy failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Distinct non-zero chunks of `image`, and its zero chunks.
fn chunk_census(image: &Path) -> (u64, u64) {
    let mut file = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut distinct = HashSet::new();
    let mut zero = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        file.read_exact(&mut buf[n..]).ok();
        if buf.iter().all(|&b| b == 0) {
            zero += 1;
        } else {
            distinct.insert(*blake3::hash(&buf).as_bytes());
        }
    }
    (distinct.len() as u64, zero)
}

/// Overwrites the chunks at `indexes` with fresh random data (seeded, unlike any other chunk): each
/// is one chunk no repository has.
fn rewrite_chunks(image: &Path, indexes: &[u64], seed: &str) {
    let mut file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    for i in indexes {
        let mut data = vec![0u8; CHUNK as usize];
        let mut hasher = blake3::Hasher::new();
        hasher.update(format!("{seed}-{i}").as_bytes());
        hasher.finalize_xof().fill(&mut data);
        file.seek(SeekFrom::Start(i * CHUNK)).unwrap();
        file.write_all(&data).unwrap();
    }
    file.sync_all().unwrap();
}

/// Every file under `dir`, with its length (what "nothing was written" compares).
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                todo.push(e.path());
                out.push((e.path(), 0));
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_second_copy_sends_only_the_chunks_an_incremental_changed_and_both_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_repo(&a, "64K");
    init_repo(&b, "64K");
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 8 << 20, 7).unwrap();
    let (first, first_image) = backup_kept(dir.path(), &image, &a, "web01");
    let (distinct, zero) = chunk_census(&image);
    assert!(
        distinct > 20 && zero > 0,
        "{distinct} distinct, {zero} zero"
    );

    // Everything the target lacks: each distinct chunk once, the zero chunks as nothing.
    let r = copy_json(&a, &b, &[]);
    assert_eq!(r["snapshots_copied"], 1);
    assert_eq!(r["snapshots_skipped"], 0);
    assert_eq!(r["same_digests"], true);
    assert_eq!(num(&r, "chunks_sent"), distinct);
    assert_eq!(num(&r, "chunks_zero"), zero);
    assert_eq!(
        num(&r, "chunks_sent") + num(&r, "chunks_present") + num(&r, "chunks_zero"),
        128
    );
    assert_eq!(snapshot_ids(&b), vec![first.clone()]);

    // Again: the snapshot is there (same id); nothing is read or sent.
    let r = copy_json(&a, &b, &[]);
    assert_eq!(r["snapshots_copied"], 0);
    assert_eq!(r["snapshots_skipped"], 1);
    assert_eq!(num(&r, "chunks_sent"), 0);
    assert_eq!(num(&r, "bytes_read"), 0);

    // An incremental that changed K chunks: the next copy sends exactly those K, reading only them.
    // Random data does not compress, so each is stored (and read, and sent) as its 64 KiB.
    let changed = [3, 17, 40, 41, 100];
    rewrite_chunks(&image, &changed, "incremental");
    let (second, second_image) = backup_kept(dir.path(), &image, &a, "web01");
    let r = copy_json(&a, &b, &[]);
    assert_eq!(r["snapshots_copied"], 1);
    assert_eq!(r["snapshots_skipped"], 1);
    let k = changed.len() as u64;
    assert_eq!(num(&r, "chunks_sent"), k);
    assert_eq!(num(&r, "bytes_read"), k * CHUNK);
    assert_eq!(num(&r, "bytes_sent"), k * CHUNK);
    assert_eq!(
        num(&r, "chunks_sent") + num(&r, "chunks_present") + num(&r, "chunks_zero"),
        128
    );
    assert_eq!(snapshot_ids(&b), snapshot_ids(&a));
    assert_eq!(snapshot_ids(&b), vec![first.clone(), second.clone()]);

    assert_restores_then_verifies(
        &b,
        &[(&first, &first_image), (&second, &second_image)],
        dir.path(),
    );

    // The text summary names what was done; copying into itself is refused.
    let out = copy_cmd(&a, &b, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("copied 0 snapshots") && text.contains("(2 already there)"),
        "{text}"
    );
    let out = copy_cmd(&a, &a, &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn copies_select_by_vm_and_snapshot_and_refuse_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_repo(&a, "64K");
    init_repo(&b, "64K");
    let mut ids = Vec::new();
    for (name, seed) in [("web01", 1), ("db01", 2), ("web01", 3)] {
        let image = dir.path().join(format!("{name}-{seed}.img"));
        backflow_fixtures::generate_image(&image, 2 << 20, seed).unwrap();
        ids.push(backup_kept(dir.path(), &image, &a, name).0);
    }
    for (args, code) in [
        (vec!["--vm", "mail01"], "mail01"),
        (vec!["--snapshot", "20000101"], "20000101"),
    ] {
        let out = copy_cmd(&a, &b, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(code));
    }
    assert!(snapshot_ids(&b).is_empty());

    // One snapshot by a prefix of its id, then every snapshot of one VM.
    let r = copy_json(&a, &b, &["--snapshot", &ids[1][..20]]);
    assert_eq!(r["snapshots_copied"], 1);
    assert_eq!(snapshot_ids(&b), vec![ids[1].clone()]);
    let r = copy_json(&a, &b, &["--vm", "web01"]);
    assert_eq!(r["snapshots_copied"], 2);
    assert_eq!(snapshot_ids(&b), ids);
}

#[test]
fn a_chunk_size_mismatch_is_refused_with_both_sizes_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_repo(&a, "64K");
    init_repo(&b, "128K");
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 2 << 20, 3).unwrap();
    backup_named(&image, &a, "web01");
    let before = tree(&b);
    let out = copy_cmd(&a, &b, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("65536-byte chunks") && stderr.contains("131072-byte chunks"),
        "{stderr}"
    );
    assert!(stderr.contains("disk \"web01\""), "{stderr}");
    assert_eq!(tree(&b), before);
}

#[test]
fn a_copy_killed_midway_leaves_the_target_restoring_and_the_next_copy_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_repo(&a, "64K");
    // Small packs: the killed copy has published some packs and is filling others.
    init_small_packs(&b);
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 16 << 20, 11).unwrap();
    let (first, first_image) = backup_kept(dir.path(), &image, &a, "web01");
    copy_json(&a, &b, &[]);
    let packs_before = pack_files(&b).len();

    let changed: Vec<u64> = (0..64).map(|i| i * 4).collect();
    rewrite_chunks(&image, &changed, "killed");
    let (second, second_image) = backup_kept(dir.path(), &image, &a, "web01");
    let killed = backflow()
        .env(backflow_repository::COPY_KILL_AFTER, "40")
        .args(["copy", "--from"])
        .arg(&a)
        .arg("--to")
        .arg(&b)
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(killed.status.signal(), Some(9), "{killed:?}");
    // Killed with 40 chunks stored: its scratch (packs being filled, its chunk table) is left, and
    // packs it sealed may be published; none of it is referenced.
    assert!(
        std::fs::read_dir(b.join("tmp")).unwrap().next().is_some(),
        "the killed copy left no scratch"
    );
    assert!(pack_files(&b).len() >= packs_before);
    // Nothing of the killed copy is visible; what was there restores.
    assert_eq!(snapshot_ids(&b), vec![first.clone()]);
    assert_restores(&b, &[(&first, &first_image)], dir.path());

    let r = copy_json(&a, &b, &[]);
    assert_eq!(r["snapshots_copied"], 1);
    // The killed copy's packs are in no index: the chunks are sent again (a gc removes the orphans).
    assert_eq!(num(&r, "chunks_sent"), changed.len() as u64);
    assert_eq!(snapshot_ids(&b), vec![first.clone(), second.clone()]);
    assert_restores_then_verifies(
        &b,
        &[(&first, &first_image), (&second, &second_image)],
        dir.path(),
    );
    assert!(
        std::fs::read_dir(b.join("tmp")).unwrap().next().is_none(),
        "the killed copy's scratch is left"
    );
}

#[test]
fn a_copy_job_copies_what_its_retention_keeps_records_its_session_in_the_target_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    init_repo(&a, "64K");
    init_repo(&b, "64K");
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 2 << 20, 21).unwrap();
    let mut kept = Vec::new();
    for run in 0..3 {
        if run > 0 {
            rewrite_chunks(&image, &[run], "job");
        }
        kept.push(backup_kept(dir.path(), &image, &a, "web01"));
    }
    let other = dir.path().join("db01.img");
    backflow_fixtures::generate_image(&other, 2 << 20, 22).unwrap();
    backup_named(&other, &a, "db01");

    // Relative paths are relative to the job file.
    let file = dir.path().join("offsite.yaml");
    std::fs::write(
        &file,
        "name: offsite\nrepository: b\ncopy: {from: a, vms: [\"web*\"]}\n\
         retention: {keep_last: 2}\nschedule: \"30 3 * * *\"\n",
    )
    .unwrap();
    let out = run_ok(backflow().args(["job", "validate"]).arg(&file));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("valid: job offsite, copy from"), "{text}");

    let report = dir.path().join("session.json");
    run_ok(
        backflow()
            .args(["job", "run", "--quiet", "--report"])
            .arg(&report)
            .arg(&file),
    );
    let record = read_report(&report);
    assert_eq!(record["result"], "success");
    // The oldest web01 snapshot is one the target's retention would forget: it is never sent.
    assert_eq!(record["copy"]["report"]["snapshots_copied"], 2);
    let ids: Vec<String> = kept[1..].iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(snapshot_ids(&b), ids);
    let sessions = run_ok(backflow().args(["sessions", "--json", "--repo"]).arg(&b));
    let sessions: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    assert_eq!(sessions[0]["job"], "offsite");
    assert_restores(&b, &kept[1..], dir.path());

    // A new backup: the next run copies it and forgets the oldest copy in the target.
    rewrite_chunks(&image, &[9], "job-next");
    let newest = backup_kept(dir.path(), &image, &a, "web01");
    run_ok(
        backflow()
            .args(["job", "run", "--quiet", "--report"])
            .arg(&report)
            .arg(&file),
    );
    let record = read_report(&report);
    assert_eq!(record["copy"]["report"]["snapshots_copied"], 1);
    assert_eq!(record["copy"]["report"]["chunks_sent"], 1);
    assert_eq!(record["copy"]["forgotten"], serde_json::json!([kept[1].0]));
    assert_eq!(snapshot_ids(&b), vec![kept[2].0.clone(), newest.0.clone()]);
    assert_eq!(snapshot_ids(&a).len(), 5);
}

/// Two encrypted repositories with their own passphrases: `--password-file` opens the target,
/// `--from-password-file` the source; without the latter the copy is refused naming the source,
/// with nothing written. Every chunk is hashed again for the target (keys differ), and the copy
/// restores identical with the target's passphrase alone.
#[test]
fn a_copy_between_two_encrypted_repositories_takes_each_ones_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let (pass_a, pass_b) = (dir.path().join("pass-a"), dir.path().join("pass-b"));
    std::fs::write(&pass_a, "source passphrase\n").unwrap();
    std::fs::write(&pass_b, "target passphrase\n").unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let with = |cmd: &mut std::process::Command, pass: &Path| {
        cmd.env("BACKFLOW_TEST_WEAK_KDF", "1")
            .arg("--password-file")
            .arg(pass);
    };
    for (repo, pass) in [(&a, &pass_a), (&b, &pass_b)] {
        let mut cmd = backflow();
        cmd.args(["init", "--encryption", "--chunk-size", "64K", "--repo"])
            .arg(repo);
        with(&mut cmd, pass);
        run_ok(&mut cmd);
    }
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 16 << 20, 31).unwrap();
    let mut cmd = backup_command(&image, &a, "disk0");
    with(&mut cmd, &pass_a);
    run_ok(&mut cmd);
    let before = tree(&b);

    // The target's passphrase does not open the source.
    let mut cmd = backflow();
    cmd.arg("copy").arg("--from").arg(&a).arg("--to").arg(&b);
    with(&mut cmd, &pass_b);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&a.display().to_string()), "{stderr}");
    assert_eq!(tree(&b), before, "a refused copy wrote into the target");

    let mut cmd = backflow();
    cmd.arg("copy")
        .arg("--from")
        .arg(&a)
        .arg("--to")
        .arg(&b)
        .arg("--from-password-file")
        .arg(&pass_a)
        .arg("--json");
    with(&mut cmd, &pass_b);
    let report: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    assert_eq!(report["same_digests"], false, "{report:#}");
    assert_eq!(report["snapshots_copied"], 1, "{report:#}");
    let (distinct, _) = chunk_census(&image);
    assert_eq!(num(&report, "chunks_sent"), distinct, "{report:#}");

    let out = dir.path().join("restored.img");
    let mut cmd = backflow();
    cmd.args(["restore", "--quiet", "--repo"])
        .arg(&b)
        .args(["--vm", "disk0", "--to"])
        .arg(&out);
    with(&mut cmd, &pass_b);
    run_ok(&mut cmd);
    assert_same_file(&image, &out);
}
