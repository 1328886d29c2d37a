//! Encryption at rest with the real binary: nothing written into the source is readable in the
//! repository, restores are identical, and passphrases and key files behave as documented.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::keys::{Passphrases, marked_image};
use common::*;

/// 16 bytes written thousands of times into the source, and a sentence, and the VM's name: none
/// may appear in any file of an encrypted repository.
const PATTERN: &[u8; 16] = b"Q7#backflow-PAT!";
const SENTENCE: &[u8] = b"the quarterly salaries of every employee are in this sentence";
const VM: &str = "confidential-vm-name";

/// A source of `size` bytes holding [`PATTERN`] every 4 KiB and [`SENTENCE`] every 64 KiB.
fn make_image(path: &Path, size: usize) {
    marked_image(
        path,
        size,
        0x2545_f491_4f6c_dd1d,
        &[(PATTERN, 100, 4096), (SENTENCE, 1000, 64 * 1024)],
    );
}

/// Every file under `dir` (recursively) that contains any of `needles`, with which.
fn files_containing(dir: &Path, needles: &[&[u8]]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for n in needles {
                if bytes.windows(n.len()).any(|w| w == *n) {
                    found.push(format!(
                        "{} holds {:?}",
                        path.display(),
                        String::from_utf8_lossy(n)
                    ));
                }
            }
        }
    }
    found
}

/// Backs `image` up as disk `vda` of VM [`VM`] with passphrase `pass`: the snapshot id.
fn backup(env: &Passphrases, image: &Path, repo: &Path, pass: &str) -> String {
    report_of(backup_args(&mut env.bf(Some(pass)), image, repo, "vda", VM))["snapshot"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_encrypted_repository_hides_the_data_and_restores_it() {
    let env = Passphrases::new();
    let image = env.path("disk.img");
    make_image(&image, 4 << 20);
    let needles: [&[u8]; 3] = [PATTERN, SENTENCE, VM.as_bytes()];

    // The control: a plain repository shows all three, so the scan below can fail.
    let plain = env.path("plain");
    init_repo(&plain, "128K");
    backup(&env, &image, &plain, "first");
    let shown = files_containing(&plain, &needles);
    for n in needles {
        let n = String::from_utf8_lossy(n).into_owned();
        assert!(
            shown.iter().any(|s| s.contains(&format!("{n:?}"))),
            "the plain repository should show {n:?}: {shown:?}"
        );
    }

    let repo = env.path("repo");
    let out = run_ok(
        env.bf(Some("first"))
            .args(["init", "--encryption", "--repo"])
            .arg(&repo),
    );
    assert!(stdout(&out).contains("created encrypted repository"));
    let first = backup(&env, &image, &repo, "first");
    let leaks = files_containing(&repo, &needles);
    assert!(
        leaks.is_empty(),
        "plaintext in the encrypted repository: {leaks:?}"
    );
    // Chunk ids are keyed: the manifest's digests are not those of the plain repository, so
    // nobody can tell from the outside that both hold the same data.
    let restored = env.path("restored.img");
    run_ok(
        env.bf(Some("first"))
            .args(["restore", "--quiet", "--snapshot", &first, "--repo"])
            .arg(&repo)
            .arg("--to")
            .arg(&restored),
    );
    assert_same_file(&image, &restored);
    let verified = run_ok(
        env.bf(Some("first"))
            .args(["verify", "--read-data", "--json", "--repo"])
            .arg(&repo),
    );
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert!(
        report["chunks_read"].as_u64().unwrap() > 0,
        "verify read the chunks: {report}"
    );
}

#[test]
fn passphrases_and_key_files() {
    let env = Passphrases::new();
    let repo = env.path("repo");
    let snapshots = |pass: Option<&str>| {
        env.bf(pass)
            .args(["snapshots", "--repo"])
            .arg(&repo)
            .output()
            .unwrap()
    };
    // init needs a passphrase.
    let out = env
        .bf(None)
        .args(["init", "--encryption", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert_failed(&out, 2, "--password-file");
    run_ok(
        env.bf(Some("first"))
            .args(["init", "--encryption", "--repo"])
            .arg(&repo),
    );
    run_ok(
        env.bf(Some("first"))
            .args(["snapshots", "--repo"])
            .arg(&repo),
    );
    let repo_shown = repo.display().to_string();

    assert_failed(&snapshots(None), 2, &format!("{repo_shown} is encrypted"));
    env.passphrase("wrong", "not the passphrase\n");
    assert_failed(
        &snapshots(Some("wrong")),
        2,
        &format!("no key in {repo_shown} opens with this passphrase (tried 1 key file)"),
    );

    // A damaged key file is told apart from a wrong passphrase, and named.
    let keys: Vec<PathBuf> = std::fs::read_dir(repo.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keys.len(), 1);
    let key_file = keys[0].clone();
    let good = std::fs::read(&key_file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] = if bad[at] == b'a' { b'b' } else { b'a' };
    std::fs::write(&key_file, &bad).unwrap();
    assert_failed(
        &snapshots(Some("first")),
        1,
        &format!("{} is damaged", key_file.display()),
    );
    std::fs::write(&key_file, &good).unwrap();

    // A second passphrase; the first one removed with it; the first no longer opens.
    let first_id = key_file.file_stem().unwrap().to_str().unwrap().to_owned();
    let new = env.passphrase("second", "another passphrase");
    let added = run_ok(
        env.bf(Some("first"))
            .args(["key", "add", "--new-password-file"])
            .arg(&new)
            .arg("--repo")
            .arg(&repo),
    );
    assert!(
        stdout(&added).starts_with("added key "),
        "{}",
        stdout(&added)
    );
    let listed = run_ok(
        env.bf(Some("second"))
            .args(["key", "list", "--json", "--repo"])
            .arg(&repo),
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let current: Vec<&str> = listed
        .iter()
        .filter(|k| k["current"] == true)
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(current.len(), 1);
    assert_ne!(
        current[0], first_id,
        "the second passphrase opened the second key"
    );
    assert!(
        listed
            .iter()
            .all(|k| !k["host"].as_str().unwrap().is_empty())
    );

    let refused = env
        .bf(Some("second"))
        .args(["key", "remove", current[0], "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    assert_failed(&refused, 2, "another key's passphrase");
    run_ok(
        env.bf(Some("second"))
            .args(["key", "remove", &first_id, "--repo"])
            .arg(&repo),
    );
    assert_failed(
        &snapshots(Some("first")),
        2,
        "opens with this passphrase (tried 1 key file)",
    );
    run_ok(
        env.bf(Some("second"))
            .args(["snapshots", "--repo"])
            .arg(&repo),
    );

    // Keys of a plain repository are a mistake of the command line.
    let plain = env.path("plain");
    init_repo(&plain, "128K");
    let out = env
        .bf(Some("first"))
        .args(["key", "list", "--repo"])
        .arg(&plain)
        .output()
        .unwrap();
    assert_failed(&out, 2, "is not encrypted");
}

#[test]
fn forget_and_gc_work_through_the_seal() {
    let env = Passphrases::new();
    let image = env.path("disk.img");
    make_image(&image, 4 << 20);
    let repo = env.path("repo");
    run_ok(
        env.bf(Some("first"))
            .args([
                "init",
                "--encryption",
                "--chunk-size",
                "64K",
                "--pack-size",
                "256K",
                "--repo",
            ])
            .arg(&repo),
    );
    backup(&env, &image, &repo, "first");
    // Half the image rewritten: the first snapshot's chunks of that half become garbage.
    let mut data = std::fs::read(&image).unwrap();
    for (i, b) in data[..2 << 20].iter_mut().enumerate() {
        *b = b.wrapping_add(1 + (i % 7) as u8);
    }
    std::fs::write(&image, &data).unwrap();
    let second = backup(&env, &image, &repo, "first");
    run_ok(
        env.bf(Some("first"))
            .args(["forget", "--keep-last", "1", "--repo"])
            .arg(&repo),
    );
    let gc = run_ok(
        env.bf(Some("first"))
            .args(["gc", "--json", "--repo"])
            .arg(&repo),
    );
    let gc: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(
        gc["packs_removed"].as_u64().unwrap() + gc["packs_repacked"].as_u64().unwrap() > 0
            && gc["chunks_removed"].as_u64().unwrap() > 0,
        "the gc freed nothing: {gc}"
    );
    let restored = env.path("restored.img");
    run_ok(
        env.bf(Some("first"))
            .args(["restore", "--quiet", "--snapshot", &second, "--repo"])
            .arg(&repo)
            .arg("--to")
            .arg(&restored),
    );
    assert_same_file(&image, &restored);
    run_ok(
        env.bf(Some("first"))
            .args(["verify", "--read-data", "--repo"])
            .arg(&repo),
    );
    let leaks = files_containing(&repo, &[PATTERN, SENTENCE]);
    assert!(leaks.is_empty(), "{leaks:?}");
}
