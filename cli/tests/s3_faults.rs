//! Faults while the real binary works on a real S3 store (Garage): backups killed with SIGKILL at
//! random moments and at the test hook's moments, a gc killed mid-sweep, one node of a three-node
//! cluster stopped mid-backup, the whole store stopped mid-backup (back within the retry bound, and
//! down longer than it), and two backups and a gc running at once. After each fault every restore
//! point committed before restores identical (against sparse copies of the image as it was),
//! `verify --read-data` passes, `snapshots` lists only committed restore points, and the next
//! backup succeeds and restores identical.
//!
//! The tests run one at a time (a mutex): the random kill moments are drawn from a backup timed in
//! the same test, which only means something when the machine is not shared with another fault.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backflow_repository::store::s3::{S3Settings, S3Store};
use backflow_repository::store::{S3Location, Store};
use backflow_testkit::s3::{Garage, S3};
use common::s3::{repo_path, set_env, unset_env, use_store};
use common::*;

/// The repositories' prefix in their bucket.
const PREFIX: &str = "repo";

/// Size of the images. Each faulted backup is of an image with new contents (a new seed), so that
/// it uploads all of it: some 20 MB compressed, about 80 packs of 256 KiB, over a few seconds in
/// which the fault lands.
const IMAGE_SIZE: u64 = 64 << 20;

/// Share of an image's chunks changed between the backups that build a repository's history.
const CHANGE: f64 = 0.25;

/// How long any one command of these tests may take before it counts as hung.
const HANG: Duration = Duration::from_secs(180);

/// How often a test looks at a running backup or the store.
const POLL: Duration = Duration::from_millis(50);

/// The short lease bound of the tests that must see the leases of killed processes expire
/// (`BACKFLOW_LEASE_SECONDS`; the default is 60).
const SHORT_LEASE_SECONDS: u64 = 10;

static SERIAL: Mutex<()> = Mutex::new(());

/// One fault test at a time (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test's repository on `s3`, its images and the restore points it committed with a copy of
/// the image each was taken of.
struct Case {
    dir: tempfile::TempDir,
    s3: S3,
    repo: PathBuf,
    kept: Vec<(String, PathBuf)>,
    started: Instant,
    /// Changes made for the backups after faults (their seeds).
    changes: u64,
}

impl Case {
    /// A new repository of small packs under [`PREFIX`] of `s3`; every `backflow()` of this thread
    /// reaches it, with a scratch directory of the test's own.
    fn new(s3: &S3) -> Case {
        let dir = tempfile::tempdir().unwrap();
        use_store(s3);
        set_env(
            "BACKFLOW_SCRATCH_DIR",
            dir.path().join("scratch").to_str().unwrap(),
        );
        let repo = repo_path(s3, PREFIX);
        init_small_packs(&repo);
        Case {
            dir,
            s3: s3.clone(),
            repo,
            kept: Vec::new(),
            started: Instant::now(),
            changes: 0,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new image `name` of [`IMAGE_SIZE`].
    fn image(&self, name: &str, seed: u64) -> PathBuf {
        let image = self.path(name);
        backflow_fixtures::generate_image(&image, IMAGE_SIZE, seed).unwrap();
        image
    }

    /// An uninterrupted backup of `image` as `vm`, kept; returns its id.
    fn backup(&mut self, image: &Path, vm: &str) -> String {
        let report = backup_named(image, &self.repo, vm);
        let id = report["snapshot"].as_str().unwrap().to_owned();
        eprintln!(
            "backup {id} of {vm}: {} bytes read, {} bytes written in {:.1} s",
            report["source_bytes_read"], report["repo_bytes_written"], report["wall_seconds"]
        );
        self.keep(&id, image);
        id
    }

    /// Keeps `id` as a restore point of `image` as it is now.
    fn keep(&mut self, id: &str, image: &Path) {
        let copy = self.path(&format!("{id}.img"));
        copy_sparse(image, &copy);
        self.kept.push((id.to_owned(), copy));
    }

    /// The restore points `snapshots` lists now, which must be the kept ones and at most those of
    /// `pending` (a faulted backup of that image, which may or may not have committed): those are
    /// kept too. Returns how many of `pending` committed.
    fn settle(&mut self, what: &str, pending: &[&Path]) -> usize {
        let listed = snapshot_ids(&self.repo);
        for (id, _) in &self.kept {
            assert!(
                listed.contains(id),
                "{what}: restore point {id} vanished; listed: {listed:?}"
            );
        }
        let new: Vec<String> = listed
            .iter()
            .filter(|id| !self.kept.iter().any(|(k, _)| k == *id))
            .cloned()
            .collect();
        assert!(
            new.len() <= pending.len(),
            "{what}: restore points nobody committed are listed: {new:?}"
        );
        match (new.len(), pending) {
            (0, _) => {}
            (1, [image]) => self.keep(&new[0], image),
            _ => panic!("{what}: {new:?} committed of {pending:?}: tell them apart by report"),
        }
        new.len()
    }

    /// Every kept restore point restores identical and `verify --read-data` passes.
    fn check(&self, what: &str) {
        let started = Instant::now();
        assert_restores(&self.repo, &self.kept, self.dir.path());
        let restored = started.elapsed();
        assert_verifies(&self.repo, what);
        eprintln!(
            "{what}: {} restore points restore identical ({restored:.1?}), verify --read-data clean ({:.1?}); {:.1?} into the test",
            self.kept.len(),
            started.elapsed() - restored,
            self.started.elapsed()
        );
    }

    /// After a fault: what is listed is what was committed ([`Case::settle`]), all of it restores
    /// and verifies, and the next backup of `image` as `vm` succeeds and restores identical.
    fn after_fault(&mut self, what: &str, pending: &[&Path], image: &Path, vm: &str) {
        self.settle(what, pending);
        self.check(what);
        self.changes += 1;
        backflow_fixtures::change_image(image, CHANGE, 1000 + self.changes).unwrap();
        let id = self.backup(image, vm);
        let last = self.kept.last().unwrap().clone();
        assert_restores(&self.repo, &[last], self.dir.path());
        eprintln!("{what}: the next backup {id} restores identical");
    }

    /// A handle on the repository's objects, for looking at what the binary did.
    fn store(&self) -> S3Store {
        open_store(&self.s3, &self.path("test-scratch"), &[])
    }
}

/// The repository under [`PREFIX`] of `s3` as the tests' own store handle; `extra` variables on
/// top of the store's (a lease bound).
fn open_store(s3: &S3, scratch: &Path, extra: &[(&str, &str)]) -> S3Store {
    let mut vars: HashMap<String, String> = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    vars.insert(
        "BACKFLOW_SCRATCH_DIR".into(),
        scratch.to_str().unwrap().into(),
    );
    for (k, v) in extra {
        vars.insert((*k).into(), (*v).into());
    }
    let settings = S3Settings::from_map(&vars).unwrap();
    let location = S3Location {
        bucket: s3.bucket.clone(),
        prefix: PREFIX.into(),
    };
    S3Store::open_with(&location, &settings).unwrap()
}

/// Packs in `packs/00/` to `packs/0f/`: a sixteenth of them, in sixteen listings, to watch a
/// backup upload.
fn sampled_packs(store: &S3Store) -> usize {
    (0..16)
        .map(|i| store.list(&format!("packs/0{i:x}/")).map_or(0, |l| l.len()))
        .sum()
}

/// Waits until `child` uploaded about `packs` packs (`packs / 16` more in the sample); fails the
/// test if it ends first or takes longer than [`HANG`].
fn wait_for_uploads(child: &mut Child, store: &S3Store, packs: usize) {
    let before = sampled_packs(store);
    let deadline = Instant::now() + HANG;
    while sampled_packs(store) < before + packs.div_ceil(16) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the backup ended ({status}) before it uploaded {packs} packs");
        }
        assert!(Instant::now() < deadline, "no uploads within {HANG:?}");
        std::thread::sleep(POLL);
    }
}

/// Waits until no lease is live under `prefixes` (registrations, locks of processes that were
/// killed or cut off), at most `bound` (and the store's one-second resolution and a margin) after
/// `since`, when their holders last could renew them; returns how long after `since` that was.
fn wait_leases_gone(
    store: &S3Store,
    prefixes: &[&str],
    since: Instant,
    bound: Duration,
) -> Duration {
    let deadline = since + bound + Duration::from_secs(1) + LEASE_MARGIN;
    loop {
        let live: Vec<String> = prefixes
            .iter()
            .flat_map(|p| {
                store
                    .live(p)
                    .unwrap()
                    .into_iter()
                    .map(move |n| format!("{p}{n}"))
            })
            .collect();
        if live.is_empty() {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "leases still live {:?} after their holders last could renew them (bound {bound:?}): {live:?}",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Slack for [`wait_leases_gone`]: the listing's and the clocks' delays on a loaded machine.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// The leases of repository handles and of the locks a backup or gc takes.
const LEASES: &[&str] = &[
    "users/",
    "locks/lock/",
    "locks/gc/run.lock/",
    "locks/gc/fence/",
];

/// A backup of `image` as `vm` with a report, started; stderr piped.
fn spawn_backup(image: &Path, repo: &Path, vm: &str, report: &Path) -> Child {
    backup_command(image, repo, vm)
        .arg("--report")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`spawn_backup`] of `image` as `disk0`, returned once it has uploaded some packs and is still
/// running: the moment a fault test breaks the store.
fn spawn_uploading(image: &Path, repo: &Path, report: &Path, store: &S3Store) -> Child {
    let mut child = spawn_backup(image, repo, "disk0", report);
    wait_for_uploads(&mut child, store, 16);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup ended before the fault"
    );
    child
}

/// Waits for `child` (at most [`HANG`]): its exit status and stderr.
fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_exit(&mut child, HANG);
    (status, reader.join().unwrap())
}

/// The snapshot id in a run report, if the run wrote one.
fn reported_snapshot(report: &Path) -> Option<String> {
    let text = std::fs::read_to_string(report).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["snapshot"].as_str().map(str::to_owned)
}

/// A small deterministic generator for the kill moments (xorshift64*), seeded from the clock; the
/// seed is logged, and `BACKFLOW_FAULT_SEED` replays one.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("BACKFLOW_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill moments: seed {seed} (replay with BACKFLOW_FAULT_SEED={seed})");
        Rng(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Whether `status` is a death by SIGKILL.
fn killed(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(9)
}

// -------------------------------------------------------------------------------------------------
// 1. SIGKILL.

/// Backups killed at random moments of their run (drawn from the time an uninterrupted one took),
/// one killed while paused right before its commit (every pack uploaded, nothing committed), and a
/// gc killed right after it deleted its first pack: after each, what was committed restores, and
/// the next run succeeds.
#[test]
fn backups_and_a_gc_killed_at_any_moment_lose_nothing_committed() {
    let _serial = serial();
    let s3 = Garage::shared().bucket("faults-kill");
    let mut case = Case::new(&s3);
    // Killed processes leave their leases; the gc at the end must see them expire.
    let lease = SHORT_LEASE_SECONDS.to_string();
    set_env("BACKFLOW_LEASE_SECONDS", &lease);
    let image = case.image("disk.img", 31);
    case.backup(&image, "disk0");

    // One uninterrupted backup of new contents, like the ones to kill: their typical length.
    case.image("disk.img", 32);
    let timed = Instant::now();
    case.backup(&image, "disk0");
    let typical = timed.elapsed();
    eprintln!("an uninterrupted backup of {IMAGE_SIZE} new bytes takes {typical:.1?}");

    const ROUNDS: u64 = 4;
    let mut rng = Rng::seeded();
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        case.image("disk.img", 100 + round);
        let delay = typical.mul_f64(rng.unit());
        let report = case.path(&format!("killed-{round}.json"));
        let mut child = spawn_backup(&image, &case.repo, "disk0", &report);
        std::thread::sleep(delay);
        let _ = child.kill();
        let (status, _) = finish(child);
        let what = format!("round {round} (SIGKILL after {delay:.2?}: {status})");
        let committed = case.settle(&what, &[&image]);
        eprintln!("{what}: committed {committed}");
        outcomes.push((delay, status.success(), committed));
        case.after_fault(&what, &[], &image, "disk0");
    }
    eprintln!("kill rounds (delay, exited 0, committed): {outcomes:?}");

    // The hook's moment: every pack uploaded, the commit not begun.
    case.image("disk.img", 120);
    let pause = case.path("pause-before-commit");
    let mut child = paused_backup(&image, &case.repo, &pause);
    let _ = child.kill();
    let status = child.wait().unwrap();
    let last_kill = Instant::now();
    assert!(killed(&status), "{status}");
    let _ = std::fs::remove_file(&pause);
    case.after_fault("killed before its commit", &[], &image, "disk0");

    // A gc with real work (the forgotten restore points' packs), killed after its first deletion.
    forget_keep_last(&case.repo, 2);
    let listed = snapshot_ids(&case.repo);
    case.kept.retain(|(id, _)| listed.contains(id));
    assert_eq!(case.kept.len(), 2);
    let bound = Duration::from_secs(SHORT_LEASE_SECONDS);
    let store = open_store(
        &s3,
        &case.path("test-scratch"),
        &[("BACKFLOW_LEASE_SECONDS", &lease)],
    );
    let waited = wait_leases_gone(&store, LEASES, last_kill, bound);
    eprintln!("the killed backups' leases were gone {waited:.1?} after the last kill");
    let killed_gc = gc_command_env(&case.repo, &[(backflow_repository::GC_KILL_AT, "deleting")]);
    let gc_died = Instant::now();
    assert!(killed(&killed_gc.status), "{}", killed_gc.describe());
    // Its run lock is a lease nobody deletes: a gc now is refused, naming it, until it expires.
    let refused = gc_command_env(&case.repo, &[]);
    eprintln!(
        "a gc {:.1?} after the kill: {}",
        gc_died.elapsed(),
        refused.describe()
    );
    if gc_died.elapsed() < bound / 2 {
        assert!(
            !refused.success() && refused.stderr.contains("another garbage collection runs"),
            "a gc right after the killed one: {}",
            refused.describe()
        );
    }
    let waited = wait_leases_gone(&store, LEASES, gc_died, bound);
    eprintln!("the killed gc's leases were gone {waited:.1?} after its kill");
    case.settle("gc killed while deleting", &[]);
    case.check("gc killed while deleting");
    let report = gc_json(&case.repo, &[]);
    assert!(report["waiting_for"].is_null(), "{report:#}");
    let earlier = &report["earlier_cycle"];
    assert!(
        num(earlier, "packs_removed") + num(earlier, "packs_repacked") > 0,
        "the killed gc's cycle had no packs to delete or rewrite: {report:#}"
    );
    case.after_fault("gc finished after its kill", &[], &image, "disk0");
}

/// `gc --json` with `env`, however it ends (within [`HANG`]).
fn gc_command_env(repo: &Path, env: &[(&str, &str)]) -> Ran {
    let mut cmd = backflow();
    cmd.args(["gc", "--json", "--repo"]).arg(repo);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_timed(&mut cmd, HANG).unwrap()
}

// -------------------------------------------------------------------------------------------------
// 2. One node of three.

/// A backup into a three-node cluster (replication factor 3, reached through node 0) during which
/// node 2 is stopped: writes still reach a quorum of two, so it completes and restores identical,
/// as does everything before it, with the node down and after it is back.
#[test]
fn a_backup_completes_when_one_node_of_three_stops() {
    let _serial = serial();
    let mut cluster = Garage::cluster3();
    let s3 = cluster.bucket("faults-node");
    let mut case = Case::new(&s3);
    let image = case.image("disk.img", 41);
    case.backup(&image, "disk0");

    case.image("disk.img", 42);
    let report = case.path("node-down.json");
    let store = case.store();
    let child = spawn_uploading(&image, &case.repo, &report, &store);
    cluster.stop(2);
    let stopped = Instant::now();
    let (status, stderr) = finish(child);
    assert!(
        status.success(),
        "with node 2 of 3 stopped the backup failed ({status}):\n{stderr}"
    );
    eprintln!(
        "node 2 stopped mid-backup: the backup completed {:.1?} later",
        stopped.elapsed()
    );
    let id = reported_snapshot(&report).expect("the report names the snapshot");
    case.keep(&id, &image);
    case.after_fault("node 2 of 3 stopped mid-backup", &[], &image, "disk0");

    cluster.start(2);
    case.settle("node 2 back", &[]);
    case.check("node 2 back");
}

// -------------------------------------------------------------------------------------------------
// 3. The whole store.

/// How long the whole store stays down in the first case: a few seconds, well within the default
/// retry bound (120 s). This sleep is the fault's length, not a wait for a condition.
const OUTAGE: Duration = Duration::from_secs(4);

/// The retry bound of the second case (`BACKFLOW_S3_RETRY_SECONDS`).
const SHORT_RETRY_SECONDS: u64 = 5;

/// Whether a failed run said why in the binary's words and did not panic.
fn assert_clean_failure(what: &str, status: &std::process::ExitStatus, stderr: &str) {
    assert!(!status.success(), "{what}");
    assert!(
        status.code().is_some_and(|c| c != 0 && c != 101),
        "{what}: not a clean exit ({status}):\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: a panic:\n{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("backflow: ")),
        "{what}: no error line:\n{stderr}"
    );
}

/// The whole three-node store stopped mid-backup: once for a few seconds (the backup retries and
/// completes, or fails cleanly), once for longer than a short retry bound (the backup fails
/// cleanly). Either way nothing half-committed is listed, everything before restores, the leases
/// of the failed run expire within their bound, and the next backup and a gc succeed.
#[test]
fn a_backup_when_the_whole_store_stops_completes_or_fails_cleanly() {
    let _serial = serial();
    let mut cluster = Garage::cluster3();
    let s3 = cluster.bucket("faults-store");
    let mut case = Case::new(&s3);
    let image = case.image("disk.img", 61);
    case.backup(&image, "disk0");
    let store = case.store();

    // Down for a few seconds, the default retry bound.
    case.image("disk.img", 62);
    let report = case.path("outage.json");
    let mut child = spawn_uploading(&image, &case.repo, &report, &store);
    cluster.stop_all();
    std::thread::sleep(OUTAGE);
    let still_running = child.try_wait().unwrap().is_none();
    let restarting = Instant::now();
    cluster.start_all();
    eprintln!(
        "store down for {OUTAGE:?} and {:.1?} to restart; the backup still ran: {still_running}",
        restarting.elapsed()
    );
    let (status, stderr) = finish(child);
    let what = format!("store down {OUTAGE:?} mid-backup ({status})");
    if status.success() {
        let id = reported_snapshot(&report).expect("the report names the snapshot");
        case.keep(&id, &image);
        eprintln!("{what}: the backup completed");
        case.after_fault(&what, &[], &image, "disk0");
    } else {
        assert_clean_failure(&what, &status, &stderr);
        eprintln!("{what}: the backup failed cleanly: {}", last_error(&stderr));
        case.after_fault(&what, &[&image], &image, "disk0");
    }

    // Down for longer than a short retry bound: the backup must give up, cleanly. It cannot delete
    // its leases while the store is down; their bound is a little longer than the failure takes,
    // so that they are still live when the store is back: they must not outlive it.
    let retry = SHORT_RETRY_SECONDS.to_string();
    let lease = OUTAGE_LEASE_SECONDS.to_string();
    set_env("BACKFLOW_S3_RETRY_SECONDS", &retry);
    set_env("BACKFLOW_LEASE_SECONDS", &lease);
    case.image("disk.img", 63);
    let report = case.path("long-outage.json");
    let child = spawn_uploading(&image, &case.repo, &report, &store);
    cluster.stop_all();
    let stopped = Instant::now();
    let (status, stderr) = finish(child);
    let failed_after = stopped.elapsed();
    let what = format!("store down past BACKFLOW_S3_RETRY_SECONDS={retry} ({status})");
    assert_clean_failure(&what, &status, &stderr);
    eprintln!(
        "{what}: failed cleanly {failed_after:.1?} after the stop: {}",
        last_error(&stderr)
    );
    assert!(
        reported_snapshot(&report).is_none(),
        "{what}: the failed run reports a snapshot"
    );
    cluster.start_all();
    unset_env("BACKFLOW_S3_RETRY_SECONDS");
    let leases = open_store(
        &s3,
        &case.path("test-scratch"),
        &[("BACKFLOW_LEASE_SECONDS", &lease)],
    );
    let left = leases.live("users/").unwrap();
    eprintln!(
        "{what}: the store is back {:.1?} after the stop; the failed run's live registrations: {left:?}",
        stopped.elapsed()
    );
    assert_eq!(case.settle(&what, &[&image]), 0, "{what}: committed");
    // Its leases do not stop the next backup, nor a gc, which waits for the dead registration
    // while it is live and not after.
    case.changes += 1;
    backflow_fixtures::change_image(&image, CHANGE, 1000 + case.changes).unwrap();
    case.backup(&image, "disk0");
    if !leases.live("users/").unwrap().is_empty() {
        let gc = gc_json(&case.repo, &[]);
        eprintln!(
            "{what}: a gc while the failed run's lease is live: waiting for {}",
            gc["waiting_for"]
        );
    }
    let waited = wait_leases_gone(
        &leases,
        LEASES,
        stopped,
        Duration::from_secs(OUTAGE_LEASE_SECONDS),
    );
    eprintln!("{what}: its leases were gone {waited:.1?} after the stop");
    let gc = gc_json(&case.repo, &[]);
    assert!(gc["waiting_for"].is_null(), "{gc:#}");
    case.after_fault(&what, &[], &image, "disk0");
}

/// The lease bound of the backup the store fails under for longer than its retry bound: longer
/// than the backup takes to fail (some 25 s here), so that its leases outlive the outage.
const OUTAGE_LEASE_SECONDS: u64 = 30;

/// The last error line of a run's stderr.
fn last_error(stderr: &str) -> &str {
    stderr
        .lines()
        .rfind(|l| l.starts_with("backflow: "))
        .unwrap_or("")
}

// -------------------------------------------------------------------------------------------------
// 4. Two backups and a gc at once.

/// One round of two backups (`images[i]` as `vms[i]`) from two processes and a gc, all at once,
/// over a repository where forgotten restore points left the gc work: all three succeed, and every
/// restore point restores. With `hold`, the backups pause before their commits (a test hook), so
/// that the gc, started once they upload, surely runs while both are open: it must then defer its
/// deletions to the next gc. Without, all three start together and race. Returns the gc's report.
fn concurrent_round(
    case: &mut Case,
    what: &str,
    images: [&Path; 2],
    vms: [&str; 2],
    hold: bool,
) -> serde_json::Value {
    let store = case.store();
    let mut backups = Vec::new();
    for i in 0..2 {
        let report = case.path(&format!("{what}-{i}.json"));
        let pause = case.path(&format!("{what}-{i}.pause"));
        let mut cmd = backup_command(images[i], &case.repo, vms[i]);
        cmd.arg("--report").arg(&report);
        if hold {
            cmd.env(stage_repo_writer::PAUSE_BEFORE_COMMIT, &pause);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        backups.push((child, report, pause));
    }
    if hold {
        wait_for_uploads(&mut backups[0].0, &store, 8);
    }
    let mut gc = backflow();
    gc.args(["gc", "--json", "--repo"]).arg(&case.repo);
    let gc = std::thread::spawn(move || run_timed(&mut gc, HANG));
    let mut reports = Vec::new();
    for (i, (mut child, report, pause)) in backups.into_iter().enumerate() {
        if hold {
            wait_for_pause(&mut child, &pause, HANG.as_secs());
        }
        reports.push((child, report, pause, i));
    }
    let gc = gc.join().unwrap().unwrap();
    assert!(gc.success(), "{what}: the gc failed: {}", gc.describe());
    let report: serde_json::Value = serde_json::from_str(&gc.stdout).unwrap();
    for (child, backup_report, pause, i) in reports {
        let _ = std::fs::remove_file(&pause);
        let (status, stderr) = finish(child);
        assert!(
            status.success(),
            "{what}: backup {i} of {} failed ({status}):\n{stderr}",
            vms[i]
        );
        let id = reported_snapshot(&backup_report).expect("the report names the snapshot");
        case.keep(&id, images[i]);
    }
    eprintln!(
        "{what}: both backups and the gc succeeded; gc: {} packs removed, {} repacked, {} chunks removed, waiting for: {}",
        report["packs_removed"],
        report["packs_repacked"],
        report["chunks_removed"],
        report["waiting_for"]
    );
    if hold {
        let waiting = report["waiting_for"].as_str().unwrap_or_else(|| {
            panic!("{what}: the gc did not wait for the two open backups: {report:#}")
        });
        assert!(
            waiting.starts_with("2 repository handle(s)"),
            "{what}: {waiting}"
        );
    }
    case.settle(what, &[]);
    case.check(what);
    report
}

/// Two backups from two processes (two VMs, then both as one VM) and a gc at once on one
/// repository that holds restore points, some forgotten: everything succeeds, the gc either
/// finishes or says it waits for the running backups (and the next gc then finishes its cycle),
/// and every new and every kept restore point restores identical.
#[test]
fn two_backups_and_a_gc_at_once_on_one_repository() {
    let _serial = serial();
    let s3 = Garage::shared().bucket("faults-concurrent");
    let mut case = Case::new(&s3);
    let a = case.image("a.img", 71);
    let b = case.image("b.img", 72);
    for round in 0..3 {
        if round > 0 {
            backflow_fixtures::change_image(&a, CHANGE, 200 + round).unwrap();
        }
        case.backup(&a, "alpha");
    }
    for round in 0..2 {
        if round > 0 {
            backflow_fixtures::change_image(&b, CHANGE, 300 + round).unwrap();
        }
        case.backup(&b, "beta");
    }

    for (round, vms) in [["alpha", "beta"], ["alpha", "alpha"]]
        .into_iter()
        .enumerate()
    {
        let what = format!("round {round} ({} and {})", vms[0], vms[1]);
        // Forgotten restore points leave packs to delete and rewrite.
        forget_keep_last(&case.repo, 1);
        let listed = snapshot_ids(&case.repo);
        case.kept.retain(|(id, _)| listed.contains(id));
        case.image("a.img", 400 + round as u64);
        case.image("b.img", 500 + round as u64);
        let first = concurrent_round(&mut case, &what, [&a, &b], vms, round == 0);
        assert!(
            num(&first, "packs_removed") + num(&first, "packs_repacked") > 0,
            "{what}: the gc found nothing to delete or rewrite: {first:#}"
        );
        // A second gc afterwards: it finishes what the first deferred.
        let second = gc_json(&case.repo, &[]);
        assert!(second["waiting_for"].is_null(), "{what}: {second:#}");
        if first["waiting_for"].is_string() {
            let earlier = &second["earlier_cycle"];
            assert!(
                earlier.is_object(),
                "{what}: the deferred cycle was not finished: {second:#}"
            );
            assert_eq!(
                num(earlier, "packs_removed"),
                num(&first, "packs_removed"),
                "{what}: {second:#}"
            );
        }
        case.settle(&format!("{what}, second gc"), &[]);
        case.check(&format!("{what}, second gc"));
    }
    case.after_fault("after the concurrent rounds", &[], &a, "alpha");
}

// -------------------------------------------------------------------------------------------------
// 5. Lease bounds that differ between processes.

/// A backup holds its repository handle (lease bound 60 s, the default: renewed every 15 s) paused
/// before its commit, having deduplicated every chunk against a forgotten restore point; a gc on
/// another host runs with `BACKFLOW_LEASE_SECONDS=2`. The gc must not count the backup's
/// registration as gone while its holder keeps it under its own bound (the lease records that
/// bound), or the backup commits a restore point whose chunks the sweep deleted. Either the gc
/// waits for it, or the backup refuses to commit; what is committed restores identical.
#[test]
fn a_gc_with_a_shorter_lease_bound_never_sweeps_under_a_running_backup() {
    let _serial = serial();
    let s3 = Garage::shared().bucket("faults-bounds");
    let mut case = Case::new(&s3);
    let image = case.path("disk.img");
    backflow_fixtures::generate_image(&image, 16 << 20, 81).unwrap();
    let first = case.backup(&image, "disk0");
    run_ok(
        backflow()
            .args(["forget", "--snapshot", &first, "--repo"])
            .arg(&case.repo),
    );
    case.kept.clear();

    let pause = case.path("pause");
    let report = case.path("held.json");
    let mut cmd = backup_command(&image, &case.repo, "disk1");
    cmd.arg("--report").arg(&report);
    let child = spawn_paused(
        &mut cmd,
        stage_repo_writer::PAUSE_BEFORE_COMMIT,
        &pause,
        120,
    );

    // Once the backup's registration is older than the short bound, to a gc with that bound it
    // looks like the lease of a dead process.
    const SHORT: u64 = 2;
    let store = case.store();
    let deadline = Instant::now() + HANG;
    loop {
        let users = store.list("users/").unwrap();
        assert_eq!(users.len(), 1, "{users:?}");
        let age = users[0].modified.unwrap().elapsed().unwrap_or_default();
        if age > Duration::from_secs(SHORT + 2) {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(POLL);
    }
    let short = SHORT.to_string();
    let gc = gc_command_env(&case.repo, &[("BACKFLOW_LEASE_SECONDS", &short)]);
    assert!(gc.success(), "{}", gc.describe());
    let gc: serde_json::Value = serde_json::from_str(&gc.stdout).unwrap();
    eprintln!(
        "gc with BACKFLOW_LEASE_SECONDS={short} beside a backup with the default bound: {} packs removed, waiting for {}",
        gc["packs_removed"], gc["waiting_for"]
    );
    let out = resume(child, &pause);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let id = reported_snapshot(&report).expect("the report names the snapshot");
        case.keep(&id, &image);
        if gc["waiting_for"].is_null() {
            let restored = restore(&case.repo, &id, &case.path("restored.img"));
            panic!(
                "the gc (lease bound {short} s) swept while a backup (bound 60 s, renewed every 15 s) \
                 was open, and the backup then committed {id}; its restore: {} {}\ngc: {gc:#}",
                restored.status,
                String::from_utf8_lossy(&restored.stderr).trim()
            );
        }
    } else {
        assert_clean_failure("the backup refused to commit", &out.status, &stderr);
    }
    case.settle("a gc with a shorter lease bound", &[]);
    case.check("a gc with a shorter lease bound");
    // The next gc finishes the cycle, keeping what the backup committed meanwhile.
    let finish = gc_command_env(&case.repo, &[("BACKFLOW_LEASE_SECONDS", &short)]);
    assert!(finish.success(), "{}", finish.describe());
    let finish: serde_json::Value = serde_json::from_str(&finish.stdout).unwrap();
    assert!(finish["waiting_for"].is_null(), "{finish:#}");
    if !case.kept.is_empty() {
        let earlier = &finish["earlier_cycle"];
        assert!(
            num(earlier, "chunks_kept_for_running_backups") > 0,
            "the chunks the backup committed were not kept: {finish:#}"
        );
    }
    case.check("the cycle finished");
}
