//! `backflow copy` between a local repository and S3 (Garage), through the real binary: local to
//! S3 and back, a second copy sending exactly the chunks the target lacks (counted from the
//! images' chunks), every restore point of both targets restoring identical; a copy into an
//! encrypted S3 repository; a chunk-size mismatch refused with nothing written.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_testkit::s3::Garage;
use common::s3::{objects, repo_path, use_store};
use common::*;

/// The chunk size of every repository here but the mismatched one.
const CHUNK: usize = 64 * 1024;

fn copy_cmd(from: &Path, to: &Path, extra: &[&str]) -> Command {
    let mut cmd = backflow();
    cmd.arg("copy")
        .arg("--from")
        .arg(from)
        .arg("--to")
        .arg(to)
        .args(extra);
    cmd
}

/// `copy --json` (with `cmd`'s extra settings), which must succeed: its report.
fn copy_json(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The distinct non-zero [`CHUNK`]-sized chunks of `image` (by content hash): what a repository
/// of that chunk size holds for it.
fn chunks(image: &Path) -> HashSet<[u8; 32]> {
    let mut file = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut out = HashSet::new();
    loop {
        buf.fill(0);
        let mut filled = 0;
        while filled < CHUNK {
            let n = file.read(&mut buf[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf.iter().any(|&b| b != 0) {
            out.insert(*blake3::hash(&buf[..filled]).as_bytes());
        }
        if filled < CHUNK {
            break;
        }
    }
    out
}

fn failed(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
}

#[test]
fn local_to_s3_and_back_sends_only_new_chunks_and_every_point_restores() {
    let s3 = Garage::shared().bucket("s3-copy");
    use_store(&s3);
    let dir = tempfile::tempdir().unwrap();
    // A local repository with two restore points of one image, the second 5% changed (the first
    // copy runs between them): their ids, with copies of the image as it was at each.
    let local = dir.path().join("local");
    let mut points: Vec<(String, PathBuf)> = Vec::new();
    init_repo(&local, "64K");
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 128 << 20, 51).unwrap();
    points.push(backup_kept(dir.path(), &image, &local, "web01"));
    let remote = repo_path(&s3, "offsite");
    init_repo(&remote, "64K");

    // The first copy: every distinct non-zero chunk of the first image, once.
    let first_chunks = chunks(&points[0].1);
    let r = copy_json(&mut copy_cmd(&local, &remote, &[]));
    assert_eq!(r["snapshots_copied"], 1, "{r:#}");
    assert_eq!(r["same_digests"], true, "{r:#}");
    assert_eq!(num(&r, "chunks_sent"), first_chunks.len() as u64, "{r:#}");

    // The second restore point, then the second copy: exactly the chunks of the second image the
    // first did not have.
    backflow_fixtures::change_image(&image, 0.05, 52).unwrap();
    points.push(backup_kept(dir.path(), &image, &local, "web01"));
    let second_chunks = chunks(&points[1].1);
    let new = second_chunks.difference(&first_chunks).count() as u64;
    assert!(new > 0);
    let r = copy_json(&mut copy_cmd(&local, &remote, &[]));
    assert_eq!(r["snapshots_copied"], 1, "{r:#}");
    assert_eq!(r["snapshots_skipped"], 1, "{r:#}");
    assert_eq!(num(&r, "chunks_sent"), new, "{r:#}");
    let ids: Vec<String> = points.iter().map(|p| p.0.clone()).collect();
    assert_eq!(snapshot_ids(&remote), ids);

    // Back from S3 into a new local repository: the union, once.
    let back = dir.path().join("back");
    init_repo(&back, "64K");
    let r = copy_json(&mut copy_cmd(&remote, &back, &[]));
    assert_eq!(r["snapshots_copied"], 2, "{r:#}");
    let all = first_chunks.union(&second_chunks).count() as u64;
    assert_eq!(num(&r, "chunks_sent"), all, "{r:#}");
    assert_eq!(snapshot_ids(&back), ids);

    assert_restores(&remote, &points, dir.path());
    assert_restores(&back, &points, dir.path());

    // Plain into an encrypted S3 repository: chunk ids are keyed there, so every chunk is
    // rehashed; what arrives restores identical.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "an off-site passphrase\n").unwrap();
    let sealed = |cmd: &mut Command| {
        cmd.env("BACKFLOW_TEST_WEAK_KDF", "1")
            .env("BACKFLOW_PASSWORD_FILE", &pass);
    };
    let encrypted = repo_path(&s3, "sealed");
    let mut init = backflow();
    sealed(&mut init);
    run_ok(
        init.args(["init", "--encryption", "--chunk-size", "64K", "--repo"])
            .arg(&encrypted),
    );
    let mut copy = copy_cmd(&local, &encrypted, &[]);
    sealed(&mut copy);
    let r = copy_json(&mut copy);
    assert_eq!(r["snapshots_copied"], 2, "{r:#}");
    assert_eq!(r["same_digests"], false, "{r:#}");
    assert_eq!(num(&r, "chunks_sent"), all, "{r:#}");
    for (id, original) in &points {
        let out = dir.path().join(format!("sealed-{id}.img"));
        let mut restore = backflow();
        sealed(&mut restore);
        run_ok(
            restore
                .args(["restore", "--quiet", "--snapshot", id, "--repo"])
                .arg(&encrypted)
                .arg("--to")
                .arg(&out),
        );
        assert_same_file(original, &out);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn a_chunk_size_mismatch_into_s3_is_refused_with_nothing_written() {
    let s3 = Garage::shared().bucket("s3-copy-mismatch");
    use_store(&s3);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    init_repo(&local, "64K");
    let image = dir.path().join("web01.img");
    backflow_fixtures::generate_image(&image, 4 << 20, 53).unwrap();
    backup_named(&image, &local, "web01");
    let remote = repo_path(&s3, "big");
    init_repo(&remote, "128K");
    let before = objects(&s3, "big");
    let out = copy_cmd(&local, &remote, &[]).output().unwrap();
    failed(
        &out,
        2,
        &["65536-byte chunks", "131072-byte chunks", "disk \"web01\""],
    );
    assert_eq!(objects(&s3, "big"), before);
    assert!(snapshot_ids(&remote).is_empty());
}
