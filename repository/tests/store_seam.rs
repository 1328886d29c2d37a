//! What the repository does with what a store tells it, where a local file system always gives the same
//! answer: a registration that lapsed (an object store's lease not renewed in time), a store that cannot
//! say whether `index/` changed. The store here is the real [`FsStore`] with those two answers changed.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backflow_repository::store::{Entry, FsStore, Lease, LockMode, Object, PutMode, Stat, Store};
use backflow_repository::{Digest, GcOptions, Location, RepoError, Repository, Result};
use common::{CHUNK_USIZE, backup, image, init, restore};

/// An [`FsStore`] whose registrations can be made to lapse, and which can hide `index/`'s change hint.
#[derive(Debug)]
struct Leases {
    inner: FsStore,
    /// Registrations that lapsed: their leases say so, and `live` leaves them out.
    lapsed: Arc<Mutex<HashSet<String>>>,
    hint: bool,
}

#[derive(Debug)]
struct TestLease {
    inner: Box<dyn Lease>,
    lapsed: Arc<Mutex<HashSet<String>>>,
}

impl Lease for TestLease {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn is_held(&self) -> bool {
        !self.lapsed.lock().unwrap().contains(self.inner.name())
    }
}

impl Store for Leases {
    fn location(&self) -> &Location {
        self.inner.location()
    }
    fn display_key(&self, key: &str) -> PathBuf {
        self.inner.display_key(key)
    }
    fn scratch_root(&self) -> &Path {
        self.inner.scratch_root()
    }
    fn open(&self, key: &str) -> Result<Arc<dyn Object>> {
        self.inner.open(key)
    }
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.read(key)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn stat(&self, key: &str) -> Result<Option<Stat>> {
        self.inner.stat(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        self.inner.list(prefix)
    }
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list_dirs(prefix)
    }
    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        self.inner.publish(local, key, mode)
    }
    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()> {
        self.inner.put(key, bytes, mode)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.inner.rename(from, to)
    }
    fn lock(&self, name: &str, mode: LockMode, held_by: &str) -> Result<Box<dyn Lease>> {
        self.inner.lock(name, mode, held_by)
    }
    fn register(&self, prefix: &str) -> Result<Box<dyn Lease>> {
        Ok(Box::new(TestLease {
            inner: self.inner.register(prefix)?,
            lapsed: self.lapsed.clone(),
        }))
    }
    fn live(&self, prefix: &str) -> Result<Vec<String>> {
        let lapsed = self.lapsed.lock().unwrap();
        Ok(self
            .inner
            .live(prefix)?
            .into_iter()
            .filter(|n| !lapsed.contains(n))
            .collect())
    }
    fn change_hint(&self, prefix: &str) -> Option<SystemTime> {
        self.hint.then(|| self.inner.change_hint(prefix)).flatten()
    }
    fn check_layout(&self) -> Result<()> {
        self.inner.check_layout()
    }
}

fn open(dir: &Path, lapsed: &Arc<Mutex<HashSet<String>>>, hint: bool) -> Repository {
    Repository::open_store(Arc::new(Leases {
        inner: FsStore::new(dir),
        lapsed: lapsed.clone(),
        hint,
    }))
    .unwrap()
}

/// The name the handle registered under: the one registration in `users/` that another handle did not make.
fn registration(dir: &Path, others: &[String]) -> String {
    let names: Vec<String> = std::fs::read_dir(dir.join("users"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !others.contains(n))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0].clone()
}

#[test]
fn a_session_whose_registration_lapsed_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    drop(init(dir.path()));
    let lapsed = Arc::new(Mutex::new(HashSet::new()));
    let repo = open(dir.path(), &lapsed, true);
    let name = registration(dir.path(), &[]);
    let data = image(1, "rrtz", 0);
    let session = repo.begin_backup("vm").unwrap();
    let mut writer = session.pack_writer();
    let disk = session
        .add_disk(common::disk_meta("vda", data.len()))
        .unwrap();
    common::write_disk(
        &repo,
        &session,
        &mut writer,
        &mut HashSet::new(),
        disk,
        &data,
    );
    writer.finish().unwrap();
    // A gc that no longer sees this handle may delete what the manifest would reference.
    lapsed.lock().unwrap().insert(name);
    let e = session.commit(None).unwrap_err();
    assert!(
        matches!(e, RepoError::SessionFailed { ref reason, .. } if reason.contains("lapsed")),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    assert!(repo.list_snapshots().unwrap().is_empty());
    // The manifest's scratch is gone with the session.
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn gc_waits_for_live_registrations_and_not_for_lapsed_ones() {
    let dir = tempfile::tempdir().unwrap();
    drop(init(dir.path()));
    let lapsed = Arc::new(Mutex::new(HashSet::new()));
    let admin = open(dir.path(), &lapsed, true);
    let own = registration(dir.path(), &[]);
    let gone = backup(&admin, "vm", &[("vda", &image(1, "rrrr", 0))]);
    let gone_packs = admin.list_packs().unwrap();
    let kept_data = image(2, "rrrr", 0);
    let kept = backup(&admin, "vm", &[("vda", &kept_data)]);
    let kept_packs: Vec<_> = admin
        .list_packs()
        .unwrap()
        .into_iter()
        .filter(|p| !gone_packs.contains(p))
        .collect();
    admin.forget(&gone.id).unwrap();
    let backup_handle = open(dir.path(), &lapsed, true);
    let other = registration(dir.path(), std::slice::from_ref(&own));

    let first = admin.gc(&GcOptions::default()).unwrap();
    assert!(first.waiting_for.is_some(), "{first:?}");
    let second = admin.gc(&GcOptions::default()).unwrap();
    assert!(second.waiting_for.is_some(), "{second:?}");
    assert_eq!(
        admin.list_packs().unwrap().len(),
        gone_packs.len() + kept_packs.len()
    );

    // The open handle's lease ran out: it counts as gone, and the cycle finishes.
    lapsed.lock().unwrap().insert(other);
    let done = admin.gc(&GcOptions::default()).unwrap();
    assert!(done.waiting_for.is_none(), "{done:?}");
    let finished = done
        .earlier_cycle
        .as_ref()
        .expect("the pending cycle finished");
    assert_eq!(finished.packs_removed, gone_packs.len() as u64, "{done:?}");
    assert_eq!(admin.list_packs().unwrap(), kept_packs);
    let snap = admin.open_snapshot(&kept.id).unwrap();
    assert_eq!(restore(&admin, &snap, 0), kept_data);
    drop(backup_handle);
}

/// Without a change hint (object storage), a lookup that misses lists `index/` again, at most once a
/// second: a long backup still dedups against what other processes committed after it started.
#[test]
fn without_a_change_hint_a_miss_lists_the_index_again() {
    let dir = tempfile::tempdir().unwrap();
    drop(init(dir.path()));
    let lapsed = Arc::new(Mutex::new(HashSet::new()));
    let reader = open(dir.path(), &lapsed, false);
    let data = image(3, "r", 0);
    let digest = Digest(*blake3::hash(&data[..CHUNK_USIZE]).as_bytes());
    assert!(reader.lookup(&digest).unwrap().is_none());
    let writer = open(dir.path(), &lapsed, false);
    backup(&writer, "vm", &[("vda", &data)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.lookup(&digest).unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the index was never listed again"
        );
        std::thread::yield_now();
    }
}
