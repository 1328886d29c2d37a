//! The S3 backend against real object stores on loopback: a Garage node per test (Garage ignores
//! `If-None-Match`, which is why leases are written then listed), and s3s-fs for a second implementation of
//! the basic round trip. Failures of the store are real too: a small TCP proxy in front of Garage answers
//! 503 SlowDown or cuts connections when told.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use backflow_repository::store::s3::{MULTIPART_THRESHOLD, S3Settings, S3Store};
use backflow_repository::store::{LockMode, PutMode, S3Location, Store, is_exists};
use backflow_repository::{Location, RepoError};
use backflow_testkit::s3::{Garage, S3, S3sFs};

/// How long a test waits for a server to answer or a lease to lapse before failing.
const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, for at most `PATIENCE`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bucket of its own on the process's shared Garage node (or another store), with a scratch directory of
/// its own, removed when dropped.
struct Bucket {
    s3: S3,
    endpoint: String,
    bucket: String,
    scratch: tempfile::TempDir,
}

impl Bucket {
    fn on_garage(name: &str) -> Bucket {
        Bucket::new(Garage::shared().bucket(name))
    }

    fn new(s3: S3) -> Bucket {
        Bucket {
            endpoint: s3.endpoint.clone(),
            bucket: s3.bucket.clone(),
            s3,
            scratch: tempfile::tempdir().unwrap(),
        }
    }

    /// The variables a process would have: the store's, a scratch directory and a home without AWS files.
    fn vars(&self, endpoint: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut vars: HashMap<String, String> = self
            .s3
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        vars.insert("AWS_ENDPOINT_URL".into(), endpoint.into());
        let dir = self.scratch.path();
        vars.insert(
            "BACKFLOW_SCRATCH_DIR".into(),
            dir.join("scratch").to_str().unwrap().into(),
        );
        vars.insert("HOME".into(), dir.to_str().unwrap().into());
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        vars
    }

    fn store_at(&self, endpoint: &str, prefix: &str, extra: &[(&str, &str)]) -> S3Store {
        let settings = S3Settings::from_map(&self.vars(endpoint, extra)).unwrap();
        S3Store::open_with(&self.location(prefix), &settings).unwrap()
    }

    fn store(&self, prefix: &str) -> S3Store {
        self.store_at(&self.endpoint, prefix, &[])
    }

    fn location(&self, prefix: &str) -> S3Location {
        S3Location {
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
        }
    }
}

/// Pseudo-random bytes, different for each seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn scratch_file(store: &S3Store, name: &str, bytes: &[u8]) -> PathBuf {
    let p = store.scratch_root().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn read_all(store: &S3Store, key: &str) -> Vec<u8> {
    let object = store.open(key).unwrap();
    let mut buf = vec![0u8; object.len() as usize];
    object.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// Every method of the trait once, on one store: what was written reads back byte for byte.
fn round_trip(store: &S3Store) {
    let small = data(1000, 1);
    store.put("config", &small, PutMode::Create).unwrap();
    assert_eq!(store.read("config").unwrap().unwrap(), small);
    assert_eq!(store.read("nothing").unwrap(), None);
    assert!(store.exists("config").unwrap());
    assert!(!store.exists("nothing").unwrap());

    // A pack (ranged reads) and an index file (fetched whole), both published from scratch files.
    let pack = data(3 << 20, 2);
    let index = data(70_000, 3);
    let p = scratch_file(store, "p.tmp", &pack);
    store
        .publish(&p, "packs/3f/3fa2.pack", PutMode::Create)
        .unwrap();
    assert!(!p.exists(), "publish consumes the local file");
    let i = scratch_file(store, "i.tmp", &index);
    store.publish(&i, "index/abc.idx", PutMode::Create).unwrap();
    assert_eq!(read_all(store, "packs/3f/3fa2.pack"), pack);
    assert_eq!(read_all(store, "index/abc.idx"), index);
    let e = store.open("packs/3f/none.pack").unwrap_err();
    assert!(
        matches!(&e, RepoError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
    let e = store.open("index/none.idx").unwrap_err();
    assert!(
        matches!(&e, RepoError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );

    store
        .put("packs/41/41aa.pack", b"x", PutMode::Create)
        .unwrap();
    assert_eq!(store.list_dirs("packs/").unwrap(), ["3f", "41"]);
    assert!(
        store.list("packs/").unwrap().is_empty(),
        "listings are not recursive"
    );
    let listed = store.list("packs/3f/").unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (&listed[0].name[..], listed[0].size),
        ("3fa2.pack", pack.len() as u64)
    );
    assert!(listed[0].modified.is_some());
    let root: Vec<String> = store
        .list("")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(root, ["config"]);
    let mut dirs = store.list_dirs("").unwrap();
    dirs.sort();
    assert_eq!(dirs, ["index", "packs"]);

    store
        .rename("packs/41/41aa.pack", "quarantine/packs/41/41aa.pack")
        .unwrap();
    assert!(!store.exists("packs/41/41aa.pack").unwrap());
    assert_eq!(
        store
            .read("quarantine/packs/41/41aa.pack")
            .unwrap()
            .unwrap(),
        b"x"
    );
    store.delete("quarantine/packs/41/41aa.pack").unwrap();
    store.delete("quarantine/packs/41/41aa.pack").unwrap();
    let stat = store.stat("config").unwrap().unwrap();
    assert_eq!(stat.size, 1000);
    assert!(stat.modified.is_some());
    assert_eq!(store.stat("nothing").unwrap(), None);
    let many: Vec<String> = (0..5).map(|i| format!("tmp/d/{i}")).collect();
    for k in &many[..4] {
        store.put(k, b"d", PutMode::Create).unwrap();
    }
    store.delete_many(&many).unwrap();
    assert!(store.list("tmp/d/").unwrap().is_empty());
    assert!(!store.exists("quarantine/packs/41/41aa.pack").unwrap());
    assert!(!store.is_local());
}

#[test]
fn every_method_round_trips_on_garage() {
    let g = Bucket::on_garage("s3-store");
    let store = g.store("site-a/repo");
    assert_eq!(
        store.location(),
        &Location::parse(&format!("s3://{}/site-a/repo", g.bucket)).unwrap()
    );
    assert_eq!(
        store.display_key("config"),
        PathBuf::from(format!("s3://{}/site-a/repo/config", g.bucket))
    );
    assert!(store.scratch_root().is_dir());
    round_trip(&store);
    // Under the prefix and nowhere else.
    let root = g.store("");
    assert_eq!(root.list_dirs("").unwrap(), ["site-a"]);
    assert_eq!(
        root.read("site-a/repo/config").unwrap().unwrap(),
        data(1000, 1)
    );
}

#[test]
fn large_files_go_up_in_parts_and_read_back() {
    let g = Bucket::on_garage("s3-store");
    let store = g.store("big");
    let big = data(MULTIPART_THRESHOLD as usize * 2 + 12_345, 9);
    let p = scratch_file(&store, "big.tmp", &big);
    store
        .publish(&p, "packs/00/big.pack", PutMode::Create)
        .unwrap();
    assert!(!p.exists());
    assert_eq!(read_all(&store, "packs/00/big.pack"), big);
    // Create refuses an existing key for large files too, and still consumes the local file.
    let p = scratch_file(&store, "big2.tmp", &big[..1000]);
    let e = store
        .publish(&p, "packs/00/big.pack", PutMode::Create)
        .unwrap_err();
    assert!(is_exists(&e), "{e}");
    assert!(!p.exists());
}

#[test]
fn create_never_replaces_and_replace_does() {
    let g = Bucket::on_garage("s3-store");
    let store = g.store("modes");
    store
        .put("snapshots/a.snap", b"first", PutMode::Create)
        .unwrap();
    let e = store
        .put("snapshots/a.snap", b"second", PutMode::Create)
        .unwrap_err();
    assert!(is_exists(&e), "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("snapshots/a.snap"), "{e}");
    let p = scratch_file(&store, "a.tmp", b"third");
    let e = store
        .publish(&p, "snapshots/a.snap", PutMode::Create)
        .unwrap_err();
    assert!(is_exists(&e), "{e}");
    assert!(!p.exists(), "the local file is consumed on error too");
    assert_eq!(store.read("snapshots/a.snap").unwrap().unwrap(), b"first");
    store
        .put("snapshots/a.snap", b"fourth", PutMode::Replace)
        .unwrap();
    assert_eq!(store.read("snapshots/a.snap").unwrap().unwrap(), b"fourth");
    let p = scratch_file(&store, "b.tmp", b"fifth");
    store
        .publish(&p, "snapshots/a.snap", PutMode::Replace)
        .unwrap();
    assert_eq!(read_all(&store, "snapshots/a.snap"), b"fifth");
}

#[test]
fn ranged_reads_at_the_end_and_across_windows() {
    let g = Bucket::on_garage("s3-store");
    let store = g.store("ranges");
    let len = (5 << 20) + 13;
    let bytes = data(len, 4);
    let p = scratch_file(&store, "r.tmp", &bytes);
    store
        .publish(&p, "packs/aa/r.pack", PutMode::Create)
        .unwrap();
    let object = store.open("packs/aa/r.pack").unwrap();
    assert_eq!(object.len(), len as u64);

    let mut buf = vec![0u8; 100];
    assert_eq!(object.read_at(&mut buf, len as u64 - 10).unwrap(), 10);
    assert_eq!(&buf[..10], &bytes[len - 10..]);
    assert_eq!(object.read_at(&mut buf, len as u64).unwrap(), 0);
    assert_eq!(object.read_at(&mut buf, len as u64 + 5).unwrap(), 0);
    let e = object.read_exact_at(&mut buf, len as u64 - 10).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);

    // Front to back in odd sizes, then backwards, then reads larger than the read-ahead window.
    let mut at = 0;
    let mut step = 1;
    while at < len {
        let n = step.min(len - at);
        let mut b = vec![0u8; n];
        object.read_exact_at(&mut b, at as u64).unwrap();
        assert_eq!(b, bytes[at..at + n], "at {at}");
        at += n;
        step = step * 3 % 700_001 + 1;
    }
    for at in (0..len).rev().step_by(999_983) {
        let mut b = vec![0u8; 4096.min(len - at)];
        object.read_exact_at(&mut b, at as u64).unwrap();
        assert_eq!(b, bytes[at..at + b.len()], "at {at}");
    }
    let mut b = vec![0u8; 3 << 20];
    object.read_exact_at(&mut b, 1).unwrap();
    assert_eq!(b, bytes[1..1 + (3 << 20)]);

    // Objects fetched whole read the same way.
    store
        .put("index/r.idx", &bytes[..1_000_000], PutMode::Create)
        .unwrap();
    let whole = store.open("index/r.idx").unwrap();
    assert_eq!(whole.read_at(&mut buf, 999_990).unwrap(), 10);
    assert_eq!(&buf[..10], &bytes[999_990..1_000_000]);
    assert_eq!(whole.read_at(&mut buf, 1_000_000).unwrap(), 0);
}

#[test]
fn listings_page_past_a_thousand_keys() {
    let g = Bucket::on_garage("s3-store");
    let store = Arc::new(g.store("many"));
    const KEYS: usize = 1100;
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= KEYS {
                        break;
                    }
                    store
                        .put(&format!("index/{i:05}.idx"), b"i", PutMode::Create)
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    store
        .put("index/sub/deeper.idx", b"d", PutMode::Create)
        .unwrap();
    let listed = store.list("index/").unwrap();
    assert_eq!(listed.len(), KEYS);
    let expected: Vec<String> = (0..KEYS).map(|i| format!("{i:05}.idx")).collect();
    let names: Vec<String> = listed.into_iter().map(|e| e.name).collect();
    assert_eq!(names, expected);
    assert_eq!(store.list_dirs("index/").unwrap(), ["sub"]);
}

fn is_locked(r: &Result<Box<dyn backflow_repository::store::Lease>, RepoError>) -> bool {
    matches!(r, Err(RepoError::Locked { .. }))
}

#[test]
fn exclusive_and_shared_leases_exclude_each_other() {
    let g = Bucket::on_garage("s3-store");
    let a = g.store("locks");
    let b = g.store("locks");
    let s1 = a.lock("lock", LockMode::Shared, "backup of vm1").unwrap();
    let s2 = b.lock("lock", LockMode::Shared, "backup of vm2").unwrap();
    assert!(s1.is_held() && s2.is_held());
    assert!(s1.name().starts_with("shared-"), "{}", s1.name());
    let e = b.lock("lock", LockMode::Exclusive, "gc").unwrap_err();
    assert!(e.is_retryable());
    let msg = e.to_string();
    assert!(msg.contains("backup of vm"), "{msg}");
    drop(s1);
    assert!(is_locked(&a.lock("lock", LockMode::Exclusive, "gc")));
    drop(s2);
    let x = a.lock("lock", LockMode::Exclusive, "gc").unwrap();
    assert!(x.name().starts_with("exclusive-"));
    let e = b.lock("lock", LockMode::Shared, "backup").unwrap_err();
    assert!(e.to_string().contains("held exclusively by gc"), "{e}");
    assert!(is_locked(&b.lock("lock", LockMode::Exclusive, "gc2")));
    // Other names are other locks.
    let _fence = b.lock("gc/fence", LockMode::Exclusive, "gc2").unwrap();
    drop(x);
    // Nothing is left behind but the live fence.
    assert!(a.list("locks/lock/").unwrap().is_empty());
    assert_eq!(a.list("locks/gc/fence/").unwrap().len(), 1);

    // Registrations: live while held, gone when dropped.
    let r1 = a.register("users/").unwrap();
    let r2 = b.register("users/").unwrap();
    let mut live = a.live("users/").unwrap();
    live.sort();
    let mut expected = vec![r1.name().to_owned(), r2.name().to_owned()];
    expected.sort();
    assert_eq!(live, expected);
    drop(r1);
    assert_eq!(a.live("users/").unwrap(), [r2.name()]);
    assert!(a.clock_skew().unwrap() < Duration::from_secs(2));
}

#[test]
fn of_two_racing_exclusive_locks_at_most_one_wins() {
    let g = Bucket::on_garage("s3-store");
    let stores = [Arc::new(g.store("race")), Arc::new(g.store("race"))];
    let mut winners_total = 0;
    for round in 0..20 {
        let start = Arc::new(Barrier::new(2));
        let done = Arc::new(Barrier::new(2));
        let name = format!("race{round}");
        let threads: Vec<_> = stores
            .iter()
            .map(|s| {
                let (s, start, done, name) = (s.clone(), start.clone(), done.clone(), name.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let got = s.lock(&name, LockMode::Exclusive, "racer");
                    // Both tried before either lets go.
                    done.wait();
                    match got {
                        Ok(_) => true,
                        Err(RepoError::Locked { .. }) => false,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        let winners = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|w| *w)
            .count();
        assert!(
            winners <= 1,
            "round {round}: {winners} holders of one exclusive lock"
        );
        winners_total += winners;
    }
    eprintln!("{winners_total} of 20 rounds had a winner");
}

/// In a child test process started by its parent test (`S3_TEST_CHILD_VARS` set), the parent's
/// bucket under `prefix`, and the parent's variables; `None` when run on its own (the child tests are
/// `#[ignore]`d and return).
fn child_store(prefix: &str) -> Option<(S3Store, HashMap<String, String>)> {
    let vars = std::env::var("S3_TEST_CHILD_VARS").ok()?;
    let vars: HashMap<String, String> = serde_json::from_str(&vars).unwrap();
    let settings = S3Settings::from_map(&vars).unwrap();
    let loc = S3Location {
        bucket: vars["TEST_BUCKET"].clone(),
        prefix: prefix.into(),
    };
    Some((S3Store::open_with(&loc, &settings).unwrap(), vars))
}

/// Not a test on its own: the child process of `a_lease_no_longer_renewed_expires`. Takes the lock, says
/// so, and waits to be killed.
#[test]
#[ignore = "run by a_lease_no_longer_renewed_expires"]
fn child_holding_a_lease() {
    let Some((store, _)) = child_store("expiry") else {
        return;
    };
    let _lease = store
        .lock("lock", LockMode::Exclusive, "the child")
        .unwrap();
    println!("HELD");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

#[test]
fn a_lease_no_longer_renewed_expires() {
    let g = Bucket::on_garage("s3-store");
    let bound = 3;
    let mut vars = g.vars(
        &g.endpoint,
        &[("BACKFLOW_LEASE_SECONDS", &bound.to_string())],
    );
    vars.insert("TEST_BUCKET".into(), g.bucket.clone());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holding_a_lease",
            "--ignored",
            "--nocapture",
        ])
        .env("S3_TEST_CHILD_VARS", serde_json::to_string(&vars).unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("HELD") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended before holding the lease"
        );
    }
    let settings = S3Settings::from_map(&vars).unwrap();
    let store = S3Store::open_with(&g.location("expiry"), &settings).unwrap();
    // Renewed by the living child: still held after more than the bound.
    let alive_until = Instant::now() + Duration::from_secs(bound + 2);
    while Instant::now() < alive_until {
        let r = store.lock("lock", LockMode::Exclusive, "the parent");
        assert!(
            is_locked(&r),
            "the child's renewed lease must exclude the parent"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let lease = wait_for("the dead child's lease to lapse", || {
        store.lock("lock", LockMode::Exclusive, "the parent").ok()
    });
    let waited = killed.elapsed();
    assert!(lease.is_held());
    // Not before the bound (less the renewal period the child may have just used), not much after it.
    assert!(
        waited
            >= Duration::from_secs(bound)
                - Duration::from_secs(bound) / 4
                - Duration::from_millis(200),
        "lapsed after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(bound + 3),
        "lapsed after {waited:?}"
    );
}

/// A TCP proxy in front of a server: passes connections through, answers `fail_next` of them with 503
/// SlowDown, and when `down` cuts every connection and answers all with 503.
struct Proxy {
    endpoint: String,
    fail_next: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    /// Connections to close as soon as the request arrived, without an answer (a server going away).
    drop_next: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    /// When not zero, each connection carries one request and `Last-Modified` in answers is moved by this
    /// many seconds (a store whose clock is off).
    skew_seconds: Arc<AtomicI64>,
    clients: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let proxy = Proxy {
            endpoint,
            fail_next: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(AtomicUsize::new(0)),
            drop_next: Arc::new(AtomicUsize::new(0)),
            down: Arc::new(AtomicBool::new(false)),
            skew_seconds: Arc::new(AtomicI64::new(0)),
            clients: Arc::new(Mutex::new(Vec::new())),
        };
        let skew = proxy.skew_seconds.clone();
        let (fail_next, failed, drop_next, down, clients) = (
            proxy.fail_next.clone(),
            proxy.failed.clone(),
            proxy.drop_next.clone(),
            proxy.down.clone(),
            proxy.clients.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                if drop_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    failed.fetch_add(1, Ordering::SeqCst);
                    let _ = client.read(&mut [0u8; 1]);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let fail = down.load(Ordering::SeqCst)
                    || fail_next
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                if fail {
                    failed.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || answer_503(client));
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let seconds = skew.load(Ordering::SeqCst);
                if seconds != 0 {
                    std::thread::spawn(move || skewed_exchange(client, server, seconds));
                    continue;
                }
                clients.lock().unwrap().push(client.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        proxy
    }

    /// Cuts the connections passed through so far and fails every new one.
    fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        for c in self.clients.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Reads a request's head and body from `from`.
fn read_request(from: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match from.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = Vec::new();
    from.take(length).read_to_end(&mut body).ok()?;
    Some((head, body))
}

/// Passes one request to `server` (asking it to close the connection after answering) and its answer back
/// with `Last-Modified` moved by `seconds`.
fn skewed_exchange(mut client: TcpStream, mut server: TcpStream, seconds: i64) {
    let Some((head, body)) = read_request(&mut client) else {
        return;
    };
    let head = String::from_utf8_lossy(&head).replacen("\r\n", "\r\nConnection: close\r\n", 1);
    if server.write_all(head.as_bytes()).is_err() || server.write_all(&body).is_err() {
        return;
    }
    let mut answer = Vec::new();
    if server.read_to_end(&mut answer).is_err() {
        return;
    }
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    let (head, rest) = answer.split_at(split);
    let head: Vec<String> = String::from_utf8_lossy(head)
        .split("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("last-modified") => {
                let t = httpdate::parse_http_date(value.trim()).unwrap();
                let moved = if seconds >= 0 {
                    t + Duration::from_secs(seconds as u64)
                } else {
                    t - Duration::from_secs(seconds.unsigned_abs())
                };
                format!("{name}: {}", httpdate::fmt_http_date(moved))
            }
            _ => line.to_owned(),
        })
        .collect();
    let _ = client.write_all(head.join("\r\n").as_bytes());
    let _ = client.write_all(rest);
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads one request (head and body) and answers 503 SlowDown, closing the connection.
fn answer_503(mut client: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::io::copy(&mut (&mut client).take(length), &mut std::io::sink());
    let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.shutdown(Shutdown::Both);
}

#[test]
fn requests_are_retried_through_503_slowdown() {
    let g = Bucket::on_garage("s3-store");
    let proxy = Proxy::start(&g.endpoint);
    let store = g.store_at(&proxy.endpoint, "retry", &[]);
    proxy.fail_next.store(3, Ordering::SeqCst);
    store.put("config", b"through", PutMode::Create).unwrap();
    assert_eq!(
        proxy.failed.load(Ordering::SeqCst),
        3,
        "the first three attempts met 503"
    );
    assert_eq!(
        g.store("retry").read("config").unwrap().unwrap(),
        b"through"
    );

    // Without retry time the 503 reaches the caller, as a retryable error naming the object.
    let impatient = g.store_at(
        &proxy.endpoint,
        "retry",
        &[("BACKFLOW_S3_RETRY_SECONDS", "0")],
    );
    proxy.fail_next.store(1, Ordering::SeqCst);
    let e = impatient.read("config").unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("retry/config"), "{e}");
    assert_eq!(impatient.read("config").unwrap().unwrap(), b"through");
}

#[test]
fn requests_are_retried_when_the_server_drops_connections() {
    let g = Bucket::on_garage("s3-store");
    let proxy = Proxy::start(&g.endpoint);
    let store = g.store_at(&proxy.endpoint, "dropped", &[]);
    let bytes = data(300_000, 5);
    proxy.drop_next.store(2, Ordering::SeqCst);
    store.put("index/a.idx", &bytes, PutMode::Replace).unwrap();
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 2);
    // A new handle: new connections (the first handle's stay open in its pool).
    let reader = g.store_at(&proxy.endpoint, "dropped", &[]);
    proxy.drop_next.store(2, Ordering::SeqCst);
    assert_eq!(read_all(&reader, "index/a.idx"), bytes);
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 4);
    proxy.go_down();
    let impatient = g.store_at(
        &proxy.endpoint,
        "dropped",
        &[("BACKFLOW_S3_RETRY_SECONDS", "0")],
    );
    proxy.down.store(false, Ordering::SeqCst);
    proxy.drop_next.store(1, Ordering::SeqCst);
    let e = impatient.read("index/a.idx").unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

/// Packs read at once by the memory test, each this large.
const MEMORY_PACKS: usize = 16;
const MEMORY_PACK_SIZE: usize = 8 << 20;

/// Not a test on its own: the child process of `sixteen_packs_read_at_once_stay_under_128_mib`, so that the
/// high-water mark of its memory is its own.
#[test]
#[ignore = "run by sixteen_packs_read_at_once_stay_under_128_mib"]
fn child_reading_packs() {
    let Some((store, vars)) = child_store("memory") else {
        return;
    };
    let store = Arc::new(store);
    let objects: Vec<_> = (0..MEMORY_PACKS)
        .map(|i| store.open(&format!("packs/00/{i:02}.pack")).unwrap())
        .collect();
    let threads: Vec<_> = objects
        .into_iter()
        .enumerate()
        .map(|(i, object)| {
            let expected = vars[&format!("HASH_{i}")].clone();
            std::thread::spawn(move || {
                // Hashed as read: the expected bytes in memory would dwarf what is measured.
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; 64 << 10];
                let mut at = 0;
                while at < MEMORY_PACK_SIZE {
                    let n = buf.len().min(MEMORY_PACK_SIZE - at);
                    object.read_exact_at(&mut buf[..n], at as u64).unwrap();
                    hasher.update(&buf[..n]);
                    at += n;
                }
                assert_eq!(hasher.finalize().to_hex().to_string(), expected, "pack {i}");
                object
            })
        })
        .collect();
    // All still open when the high-water mark is read.
    let objects: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    println!("{hwm}");
    drop(objects);
}

#[test]
fn sixteen_packs_read_at_once_stay_under_128_mib() {
    let g = Bucket::on_garage("s3-store");
    let store = g.store("memory");
    let mut vars = g.vars(&g.endpoint, &[]);
    for i in 0..MEMORY_PACKS {
        let bytes = data(MEMORY_PACK_SIZE, 100 + i as u64);
        vars.insert(
            format!("HASH_{i}"),
            blake3::hash(&bytes).to_hex().to_string(),
        );
        let p = scratch_file(&store, "m.tmp", &bytes);
        store
            .publish(&p, &format!("packs/00/{i:02}.pack"), PutMode::Create)
            .unwrap();
    }
    vars.insert("TEST_BUCKET".into(), g.bucket.clone());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reading_packs", "--ignored", "--nocapture"])
        .env("S3_TEST_CHILD_VARS", serde_json::to_string(&vars).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {stdout}"));
    eprintln!(
        "reading {MEMORY_PACKS} packs at once: peak RSS {} MiB",
        kib / 1024
    );
    assert!(kib < 128 * 1024, "peak RSS {kib} KiB");
}

#[test]
fn a_store_whose_clock_is_off_is_refused_for_leases() {
    let g = Bucket::on_garage("s3-store");
    let proxy = Proxy::start(&g.endpoint);
    proxy.skew_seconds.store(120, Ordering::SeqCst);
    let store = g.store_at(&proxy.endpoint, "skew", &[]);
    let e = store
        .lock("lock", LockMode::Exclusive, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("BACKFLOW_MAX_CLOCK_SKEW_SECONDS=30"), "{e}");
    let measured: f64 = e
        .split("differs from this host's by ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no measured skew in {e}"));
    assert!((118.0..122.0).contains(&measured), "{e}");
    // Refused leases are not left behind.
    assert!(g.store("skew").list("locks/lock/").unwrap().is_empty());
    // Within the bound it is measured, and the lease taken.
    let tolerant = g.store_at(
        &proxy.endpoint,
        "skew",
        &[("BACKFLOW_MAX_CLOCK_SKEW_SECONDS", "300")],
    );
    let _lease = tolerant.lock("lock", LockMode::Exclusive, "x").unwrap();
    let skew = tolerant.clock_skew().unwrap();
    assert!(
        skew > Duration::from_secs(118) && skew < Duration::from_secs(122),
        "{skew:?}"
    );
}

#[test]
fn a_lease_that_cannot_be_renewed_stops_being_held() {
    let g = Bucket::on_garage("s3-store");
    let proxy = Proxy::start(&g.endpoint);
    let store = g.store_at(
        &proxy.endpoint,
        "lapse",
        &[
            ("BACKFLOW_LEASE_SECONDS", "2"),
            ("BACKFLOW_S3_RETRY_SECONDS", "0"),
        ],
    );
    let lease = store.lock("lock", LockMode::Exclusive, "cut off").unwrap();
    assert!(lease.is_held());
    proxy.go_down();
    let start = Instant::now();
    wait_for("the lease to stop being held", || {
        (!lease.is_held()).then_some(())
    });
    // 3/4 of the bound after the last renewal, which was at most a quarter of it before the cut.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Others can take it once it is older than the bound.
    let other = g.store_at(&g.endpoint, "lapse", &[("BACKFLOW_LEASE_SECONDS", "2")]);
    wait_for("the lapsed lease to stop excluding", || {
        other.lock("lock", LockMode::Exclusive, "next").ok()
    });
    // Once lost, a lease stays lost even when the store comes back.
    proxy.down.store(false, Ordering::SeqCst);
    assert!(!lease.is_held());
}

#[test]
fn plain_http_is_refused_for_remote_endpoints_and_credentials_are_required() {
    let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("HOME".to_string(), "/nonexistent".to_string())])
            .collect()
    };
    let keys = [("AWS_ACCESS_KEY_ID", "GKx"), ("AWS_SECRET_ACCESS_KEY", "s")];
    let e = S3Settings::from_map(&vars(&[
        keys[0],
        keys[1],
        ("AWS_ENDPOINT_URL", "http://192.0.2.7:3900"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("AWS_ENDPOINT_URL") && e.contains("AWS_ALLOW_HTTP=true"),
        "{e}"
    );
    let s = S3Settings::from_map(&vars(&[
        keys[0],
        keys[1],
        ("AWS_ENDPOINT_URL", "http://192.0.2.7:3900"),
        ("AWS_ALLOW_HTTP", "true"),
    ]))
    .unwrap();
    assert!(s.allow_http);
    let e = S3Settings::from_map(&vars(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:3900")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AWS_ACCESS_KEY_ID") && e.contains("AWS_SECRET_ACCESS_KEY"),
        "{e}"
    );
}

#[test]
fn every_method_round_trips_on_s3s_fs() {
    let server = S3sFs::start();
    let b = Bucket::new(server.bucket("s3-store"));
    let store = b.store("repo");
    round_trip(&store);
    let lease = store.lock("lock", LockMode::Exclusive, "fs").unwrap();
    assert!(is_locked(&store.lock("lock", LockMode::Shared, "b")));
    drop(lease);
    store.lock("lock", LockMode::Shared, "b").unwrap();
}

#[test]
fn a_call_made_while_garage_is_down_completes_once_it_is_back() {
    let mut garage = Garage::single();
    let b = Bucket::new(garage.s3().clone());
    let store = Arc::new(b.store("restart"));
    store.put("config", b"before", PutMode::Create).unwrap();
    garage.stop(0);
    let started = Arc::new(AtomicBool::new(false));
    let call = {
        let (store, started) = (store.clone(), started.clone());
        std::thread::spawn(move || {
            started.store(true, Ordering::SeqCst);
            store.put("snapshots/a.snap", b"during", PutMode::Create)?;
            store.read("config")
        })
    };
    wait_for("the call to start", || {
        started.load(Ordering::SeqCst).then_some(())
    });
    garage.start(0);
    let read = call.join().unwrap().unwrap();
    assert_eq!(read.unwrap(), b"before");
    assert_eq!(store.read("snapshots/a.snap").unwrap().unwrap(), b"during");
}

/// Not a test on its own: the child process of `a_repository_round_trips_in_a_bucket`, which opens the
/// repository by its `s3://` location with the settings in its real environment, as the program does.
#[test]
#[ignore = "run by a_repository_round_trips_in_a_bucket"]
fn child_repository_round_trip() {
    use backflow_repository::{GcOptions, InitOptions, Repository};
    let Ok(url) = std::env::var("S3_TEST_REPOSITORY") else {
        return;
    };
    let location = Location::parse(&url).unwrap();
    let options = InitOptions {
        chunk_size: common::CHUNK,
        pack_target_size: 192 * 1024,
    };
    let repo = Repository::init_at(&location, &options).unwrap();
    assert_eq!(repo.location(), &location);
    let again = Repository::init_at(&location, &options).unwrap_err();
    assert!(matches!(again, RepoError::InitRefused { .. }), "{again}");

    let vda = common::image(1, "rrtzzrarattzrrr", 1000);
    let vdb = common::image(2, "tzr", 5);
    let web = common::backup(&repo, "web", &[("vda", &vda), ("vdb", &vdb)]);
    let db_disk = common::image(3, "rrrrrrrr", 0);
    let db = common::backup(&repo, "db", &[("vda", &db_disk)]);
    drop(repo);

    // A second handle, as a restore would open it.
    let repo = Repository::open_at(&location).unwrap();
    let snap = repo.open_snapshot(&web.id).unwrap();
    assert_eq!(common::restore(&repo, &snap, 0), vda);
    assert_eq!(common::restore(&repo, &snap, 1), vdb);
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");

    // Forget db; the collection removes its chunks and keeps web whole.
    repo.forget(&db.id).unwrap();
    let mut removed = 0;
    for _cycle in 0..3 {
        let report = repo.gc(&GcOptions::default()).unwrap();
        removed += report.chunks_removed;
    }
    assert_eq!(removed, 8, "db's eight random chunks");
    let snap = repo.open_snapshot(&web.id).unwrap();
    assert_eq!(common::restore(&repo, &snap, 0), vda);
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:#?}");
    println!("ROUND TRIP DONE");
}

#[test]
fn a_repository_round_trips_in_a_bucket() {
    let b = Bucket::on_garage("s3-repo");
    let vars = b.vars(&b.endpoint, &[]);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_repository_round_trip",
            "--ignored",
            "--nocapture",
        ])
        .env_clear()
        .envs(&vars)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("S3_TEST_REPOSITORY", b.s3.url("backups/site-a"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ROUND TRIP DONE"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Everything under the prefix, nothing left in scratch but the per-repository directory.
    let root = b.store("");
    assert_eq!(root.list_dirs("").unwrap(), ["backups"]);
    let store = b.store("backups/site-a");
    assert!(store.exists("config").unwrap());
    assert_eq!(store.list("snapshots/").unwrap().len(), 1);
    assert!(store.live("users/").unwrap().is_empty());
    assert!(store.list("locks/lock/").unwrap().is_empty());
}

/// Not a check: throughput of a 256 MiB multipart upload and of reading it back front to back in 1 MiB
/// reads, against the loopback Garage (`--ignored --nocapture measure_throughput`). Numbers in the report
/// of the S3 backend; speed is never asserted.
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_throughput() {
    let b = Bucket::on_garage("s3-measure");
    let store = b.store("measure");
    let size = 256 << 20;
    let bytes = data(size, 42);
    let p = scratch_file(&store, "big.tmp", &bytes);
    let start = Instant::now();
    store
        .publish(&p, "packs/00/big.pack", PutMode::Create)
        .unwrap();
    let up = start.elapsed();
    let object = store.open("packs/00/big.pack").unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    for at in (0..size).step_by(buf.len()) {
        object.read_exact_at(&mut buf, at as u64).unwrap();
        hasher.update(&buf);
    }
    let down = start.elapsed();
    assert_eq!(hasher.finalize(), blake3::hash(&bytes));
    let start = Instant::now();
    let p = scratch_file(&store, "idx.tmp", &bytes[..64 << 20]);
    store.publish(&p, "index/big.idx", PutMode::Create).unwrap();
    let whole_up = start.elapsed();
    let start = Instant::now();
    let whole = store.open("index/big.idx").unwrap();
    let fetch = start.elapsed();
    assert_eq!(whole.len(), 64 << 20);
    let mib = |n: usize, d: Duration| n as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "upload 256 MiB (multipart): {:.0} MiB/s; ranged read 1 MiB at a time: {:.0} MiB/s; \
         upload 64 MiB: {:.0} MiB/s; fetch 64 MiB whole: {:.0} MiB/s",
        mib(size, up),
        mib(size, down),
        mib(64 << 20, whole_up),
        mib(64 << 20, fetch)
    );
}
