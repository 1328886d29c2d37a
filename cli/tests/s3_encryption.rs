//! Encryption at rest in object storage, through the real binary on Garage: no plaintext written
//! into the source (a marker, the VM's name, the disk's name) is in any object of the bucket, read
//! back through the S3 API (Garage's own block files are compressed and chunked, so they would
//! prove nothing); the restore is identical; a wrong passphrase and a damaged key object are clear
//! errors; keys are added and removed.

mod common;

use std::path::Path;
use std::process::Output;

use backflow_repository::store::{PutMode, Store};
use backflow_testkit::s3::{Garage, S3};
use common::keys::{Passphrases, marked_image};
use common::s3::{objects, repo_path, store, use_store};
use common::*;

/// 64 ASCII bytes written at every 4 KiB of the source.
const MARKER: &[u8; 64] = b"BACKFLOW-PLAINTEXT-MARKER:payroll/2026/ssn=078-05-1120;iban=DE89";
/// The VM's name and the disk's name, which a plain repository keeps in its manifests.
const VM: &str = "hr-payroll-db-confidential";
const DISK: &str = "vdb-salaries-volume";

/// Backs `image` up as disk [`DISK`] of VM [`VM`] (passphrase `pass`, None: none): the snapshot id.
fn backup(env: &Passphrases, image: &Path, repo: &Path, pass: Option<&str>) -> String {
    report_of(backup_args(&mut env.bf(pass), image, repo, DISK, VM))["snapshot"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `snapshots` of `repo` with passphrase `pass` (None: none).
fn snapshots(env: &Passphrases, repo: &Path, pass: Option<&str>) -> Output {
    env.bf(pass)
        .args(["snapshots", "--repo"])
        .arg(repo)
        .output()
        .unwrap()
}

/// Random data with [`MARKER`] at every 4 KiB.
fn make_image(path: &Path, size: usize) {
    marked_image(path, size, 0x9e37_79b9_7f4a_7c15, &[(MARKER, 300, 4096)]);
}

/// Every object of `s3`'s bucket, read through the S3 API, whose bytes or name hold any of
/// `needles`: which object holds which. Also how many objects were read.
fn objects_containing(s3: &S3, needles: &[&[u8]]) -> (Vec<String>, usize) {
    let bucket = store(s3, "");
    let mut found = Vec::new();
    let mut read = 0;
    for (key, _) in objects(s3, "") {
        for n in needles {
            if key.as_bytes().windows(n.len()).any(|w| w == *n) {
                found.push(format!(
                    "the name {key} holds {:?}",
                    String::from_utf8_lossy(n)
                ));
            }
        }
        // Leases come and go; whatever else is listed stays.
        let Some(bytes) = bucket.read(&key).unwrap() else {
            continue;
        };
        read += 1;
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == *n) {
                found.push(format!("{key} holds {:?}", String::from_utf8_lossy(n)));
            }
        }
    }
    (found, read)
}

#[test]
fn an_encrypted_s3_repository_holds_no_plaintext_and_its_keys_behave() {
    let env = Passphrases::new();
    let image = env.path("disk.img");
    make_image(&image, 64 << 20);
    let needles: [&[u8]; 3] = [MARKER, VM.as_bytes(), DISK.as_bytes()];

    // The control: a plain repository in a bucket of its own shows all three, so that the scan
    // below can fail.
    let plain_bucket = Garage::shared().bucket("s3-enc-control");
    use_store(&plain_bucket);
    let plain = repo_path(&plain_bucket, "plain");
    init_repo(&plain, "128K");
    backup(&env, &image, &plain, None);
    let (shown, _) = objects_containing(&plain_bucket, &needles);
    for n in needles {
        let n = format!("{:?}", String::from_utf8_lossy(n));
        assert!(
            shown.iter().any(|s| s.ends_with(&n)),
            "the plain repository should show {n}: {shown:?}"
        );
    }

    let s3 = Garage::shared().bucket("s3-enc");
    use_store(&s3);
    let repo = repo_path(&s3, "repo");
    let out = run_ok(
        env.bf(Some("first"))
            .args(["init", "--encryption", "--repo"])
            .arg(&repo),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("created encrypted repository"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let id = backup(&env, &image, &repo, Some("first"));
    let (leaks, read) = objects_containing(&s3, &needles);
    assert!(read > 5, "only {read} objects in the encrypted repository");
    assert!(
        leaks.is_empty(),
        "plaintext in the encrypted repository: {leaks:?}"
    );
    let restored = env.path("restored.img");
    run_ok(
        env.bf(Some("first"))
            .args(["restore", "--quiet", "--snapshot", &id, "--repo"])
            .arg(&repo)
            .arg("--to")
            .arg(&restored),
    );
    assert_same_file(&image, &restored);
    std::fs::remove_file(&restored).unwrap();

    // No passphrase, and a wrong one: exit 2, saying what is wrong with which repository.
    let shown = repo.display().to_string();
    assert_failed(
        &snapshots(&env, &repo, None),
        2,
        &format!("{shown} is encrypted"),
    );
    env.passphrase("wrong", "not the passphrase\n");
    assert_failed(
        &snapshots(&env, &repo, Some("wrong")),
        2,
        &format!("no key in {shown} opens with this passphrase (tried 1 key file)"),
    );

    // A damaged key object (one byte overwritten through the S3 API) is told apart from a wrong
    // passphrase, and named.
    let bucket = store(&s3, "repo");
    let keys = bucket.list_names("keys/").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = format!("keys/{}", keys[0]);
    let good = bucket.read(&key).unwrap().unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] = if bad[at] == b'a' { b'b' } else { b'a' };
    bucket.put(&key, &bad, PutMode::Replace).unwrap();
    assert_failed(
        &snapshots(&env, &repo, Some("first")),
        1,
        &format!("{shown}/{key} is damaged"),
    );
    bucket.put(&key, &good, PutMode::Replace).unwrap();
    run_ok(
        env.bf(Some("first"))
            .args(["snapshots", "--repo"])
            .arg(&repo),
    );

    // A second passphrase; the first removed with it; the first no longer opens.
    let first_id = keys[0].trim_end_matches(".key").to_owned();
    let new = env.passphrase("second", "another passphrase entirely");
    let added = run_ok(
        env.bf(Some("first"))
            .args(["key", "add", "--new-password-file"])
            .arg(&new)
            .arg("--repo")
            .arg(&repo),
    );
    assert!(
        String::from_utf8_lossy(&added.stdout).starts_with("added key "),
        "{}",
        String::from_utf8_lossy(&added.stdout)
    );
    assert_eq!(bucket.list_names("keys/").unwrap().len(), 2);
    run_ok(
        env.bf(Some("second"))
            .args(["snapshots", "--repo"])
            .arg(&repo),
    );
    run_ok(
        env.bf(Some("second"))
            .args(["key", "remove", &first_id, "--repo"])
            .arg(&repo),
    );
    assert_eq!(bucket.list_names("keys/").unwrap().len(), 1);
    assert_failed(
        &snapshots(&env, &repo, Some("first")),
        2,
        &format!("no key in {shown} opens with this passphrase (tried 1 key file)"),
    );
    run_ok(
        env.bf(Some("second"))
            .args(["restore", "--quiet", "--snapshot", &id, "--repo"])
            .arg(&repo)
            .arg("--to")
            .arg(&restored),
    );
    assert_same_file(&image, &restored);
}
