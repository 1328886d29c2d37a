//! The object stores of the test harness, checked with an independent client: restic 0.14
//! (Debian's `restic`), whose S3 backend is minio-go. Each test backs a file up, checks the
//! repository where the store allows it, restores the file and compares the bytes; the cluster
//! test also looks at where the blocks landed, which is what shows the replication and the
//! stopped node are real.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_testkit::s3::{Garage, S3, S3sFs, unique_bucket_name};

/// restic's repository password (no secret: the repositories are thrown away).
const PASSWORD: &str = "backflow-tests";

/// Size of the files backed up: several of restic's packs (4 MiB minimum pack size in 0.14 is a
/// target, not a floor), and several of Garage's 1 MiB blocks.
const FILE_SIZE: usize = 6 << 20;

/// Runs restic with `args` on the repository `repo` of `s3`; returns its output, whether it
/// succeeded or not.
fn restic(s3: &S3, repo: &str, args: &[&str]) -> Output {
    let mut command = Command::new("restic");
    command
        .arg("-r")
        .arg(s3.restic_repo(repo))
        .args(args)
        .env("RESTIC_PASSWORD", PASSWORD)
        // A cache would let reads bypass the store.
        .arg("--no-cache");
    s3.apply(&mut command).output().unwrap_or_else(|e| {
        panic!("restic is required for these tests (apt-get install restic): {e}")
    })
}

/// [`restic`], which must succeed; returns stdout.
fn restic_ok(s3: &S3, repo: &str, args: &[&str]) -> String {
    let out = restic(s3, repo, args);
    assert!(
        out.status.success(),
        "restic {args:?} against {} failed ({}):\n{}{}",
        s3.endpoint,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of `FILE_SIZE` bytes that no compressor shrinks and no two seeds share.
fn random_file(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = Vec::with_capacity(FILE_SIZE);
    while data.len() < FILE_SIZE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Restores the latest snapshot of `repo` into `dir/out` and returns the restored `name`.
fn restore(s3: &S3, repo: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    restic_ok(
        s3,
        repo,
        &["restore", "latest", "--target", out.to_str().unwrap()],
    );
    // restic 0.14 recreates the file's path below the target, minus what all paths shared.
    let mut found = Vec::new();
    find(&out, name, &mut found);
    assert_eq!(found.len(), 1, "{name} restored as {found:?}");
    std::fs::read(&found[0]).unwrap()
}

fn find(dir: &Path, name: &str, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            find(&entry.path(), name, found);
        } else if entry.file_name() == name {
            found.push(entry.path());
        }
    }
}

/// The block files a Garage node holds (names only: the blocks' hashes).
fn blocks(garage: &Garage, node: usize) -> BTreeSet<String> {
    fn walk(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), found);
            } else {
                found.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut found = BTreeSet::new();
    let data = garage.node_dir(node).join("data");
    if data.is_dir() {
        walk(&data, &mut found);
    }
    found.retain(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    found
}

#[test]
fn restic_round_trip_on_the_shared_garage_node() {
    let garage = Garage::shared();
    let s3 = garage.bucket("restic-single");
    assert_ne!(
        s3.bucket,
        garage.s3().bucket,
        "each caller gets its own bucket"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), "disk.img", 1);

    restic_ok(&s3, "repo", &["init"]);
    restic_ok(&s3, "repo", &["backup", file.to_str().unwrap()]);
    restic_ok(&s3, "repo", &["check", "--read-data"]);
    assert_eq!(
        restore(&s3, "repo", dir.path(), "disk.img"),
        std::fs::read(&file).unwrap()
    );

    let ids = restic_ok(&s3, "repo", &["list", "snapshots"]);
    assert_eq!(ids.lines().count(), 1, "{ids}");
    // The blocks are on the node's disk: the store is not holding them in memory only.
    assert!(
        blocks(garage, 0).len() >= FILE_SIZE >> 20,
        "{} blocks",
        blocks(garage, 0).len()
    );
}

#[test]
fn a_bucket_holds_only_its_own_objects() {
    let garage = Garage::shared();
    let (one, two) = (garage.bucket("isolation"), garage.bucket("isolation"));
    assert_ne!(one.bucket, two.bucket);
    restic_ok(&one, "repo", &["init"]);
    let out = restic(&two, "repo", &["cat", "config"]);
    assert!(
        !out.status.success(),
        "the repository of bucket {} is visible in bucket {}",
        one.bucket,
        two.bucket
    );
}

#[test]
fn a_single_node_stopped_and_started_again_keeps_every_object() {
    let mut garage = Garage::single();
    let s3 = garage.s3().clone();
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), "disk.img", 2);
    restic_ok(&s3, "repo", &["init"]);
    restic_ok(&s3, "repo", &["backup", file.to_str().unwrap()]);

    let pid = garage.pid(0).unwrap();
    garage.stop_all();
    assert_eq!(garage.pid(0), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "garage (pid {pid}) still runs"
    );
    assert!(
        std::net::TcpStream::connect(s3.addr()).is_err(),
        "something still listens on {}",
        s3.endpoint
    );

    garage.start_all();
    assert_ne!(garage.pid(0), Some(pid));
    restic_ok(&s3, "repo", &["check", "--read-data"]);
    assert_eq!(
        restore(&s3, "repo", dir.path(), "disk.img"),
        std::fs::read(&file).unwrap()
    );
}

#[test]
fn a_paused_node_accepts_connections_but_does_not_answer_until_resumed() {
    use std::io::{Read, Write};
    let garage = Garage::single();
    let s3 = garage.s3().clone();
    restic_ok(&s3, "repo", &["init"]);
    let request = |timeout| {
        let mut stream = std::net::TcpStream::connect(s3.addr()).expect("the kernel accepts");
        stream.set_read_timeout(Some(timeout)).unwrap();
        write!(stream, "GET /{} HTTP/1.0\r\n\r\n", s3.bucket).unwrap();
        let mut first = [0u8; 1];
        stream.read(&mut first).map(|n| n == 1)
    };
    assert!(
        request(std::time::Duration::from_secs(30)).unwrap(),
        "answers"
    );

    garage.pause(0);
    let err = request(std::time::Duration::from_secs(1)).expect_err("no answer while paused");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );

    garage.resume(0);
    restic_ok(&s3, "repo", &["cat", "config"]);
}

#[test]
fn a_cluster_of_three_takes_writes_with_one_node_stopped() {
    let mut cluster = Garage::cluster3();
    assert_eq!(cluster.len(), 3);
    let s3 = cluster.s3().clone();
    let dir = tempfile::tempdir().unwrap();

    // All three up: every block lands on every node (replication factor 3).
    let first = random_file(dir.path(), "first.img", 3);
    restic_ok(&s3, "repo", &["init"]);
    restic_ok(&s3, "repo", &["backup", first.to_str().unwrap()]);
    let before: Vec<_> = (0..3).map(|i| blocks(&cluster, i)).collect();
    assert!(
        before[0].len() >= FILE_SIZE >> 20,
        "{} blocks",
        before[0].len()
    );
    assert_eq!(before[0], before[1], "nodes 0 and 1 hold different blocks");
    assert_eq!(before[0], before[2], "nodes 0 and 2 hold different blocks");

    // Node 2 stopped: writes through node 0 still reach a quorum (nodes 0 and 1).
    cluster.stop(2);
    assert_eq!(cluster.pid(2), None);
    let second = random_file(dir.path(), "second.img", 4);
    restic_ok(&s3, "repo", &["backup", second.to_str().unwrap()]);
    restic_ok(&s3, "repo", &["check"]);
    let during: Vec<_> = (0..3).map(|i| blocks(&cluster, i)).collect();
    let new: BTreeSet<_> = during[0].difference(&before[0]).cloned().collect();
    assert!(new.len() >= FILE_SIZE >> 20, "{} new blocks", new.len());
    assert!(
        new.is_subset(&during[1]),
        "node 1 lacks blocks of the second backup"
    );
    assert_eq!(during[2], before[2], "the stopped node got blocks");

    // Node 2 back, node 0 stopped: the second backup reads back through node 1 (from node 1,
    // and node 2 once it caught up).
    cluster.start(2);
    cluster.stop(0);
    let via1 = cluster.s3_via(&s3, 1);
    assert_eq!(
        restore(&via1, "repo", dir.path(), "second.img"),
        std::fs::read(&second).unwrap()
    );
    restic_ok(&via1, "repo", &["check", "--read-data"]);

    // Everything stopped and started again: both snapshots are still there.
    cluster.stop_all();
    cluster.start_all();
    let ids = restic_ok(&s3, "repo", &["list", "snapshots"]);
    assert_eq!(ids.lines().count(), 2, "{ids}");
}

#[test]
fn restic_round_trip_on_s3s_fs() {
    let server = S3sFs::start();
    let s3 = server.bucket("restic-s3s");
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), "disk.img", 5);

    restic_ok(&s3, "repo", &["init"]);
    restic_ok(&s3, "repo", &["backup", file.to_str().unwrap()]);
    assert_eq!(
        restore(&s3, "repo", dir.path(), "disk.img"),
        std::fs::read(&file).unwrap()
    );
    let ids = restic_ok(&s3, "repo", &["list", "snapshots"]);
    assert_eq!(ids.lines().count(), 1, "{ids}");

    // s3s-fs 0.14.1 takes minio-go's empty `delimiter=` for a delimiter (see the s3 module's
    // docs): a recursive listing of data/ finds none of the packs that lie in the bucket, which
    // is why `restic check` is not run here. When this fails, s3s-fs was fixed: run check, and
    // update the module docs.
    let packs_on_disk = std::fs::read_dir(server.bucket_dir(&s3).join("repo/data"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum::<usize>();
    assert!(packs_on_disk > 0);
    assert_eq!(restic_ok(&s3, "repo", &["list", "packs"]), "");
}

#[test]
fn bucket_names_are_valid_s3_names_and_unique() {
    let long = "A_Very Long/Name".repeat(8);
    let names: Vec<String> = ["restic", "Restic_Test", "--", &long, "restic"]
        .iter()
        .map(|n| unique_bucket_name(n))
        .collect();
    for name in &names {
        assert!((3..=63).contains(&name.len()), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
        assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
    }
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "{names:?}");
    assert!(names[1].starts_with("restic-test-"), "{}", names[1]);
}
