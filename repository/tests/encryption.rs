//! Encryption at rest below the seam: `SealedStore` over an in-memory store (a double of the backends: it
//! keeps the bytes it is given, so the tests can read and damage exactly what a backend would hold), and key
//! files.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backflow_repository::crypto::{MIN_SEGMENT, MasterKey, sealed_len};
use backflow_repository::keys::{self, KdfParams, WEAK_KDF};
use backflow_repository::store::sealed::SealedStore;
use backflow_repository::store::{Entry, Lease, LockMode, Object, PutMode, Store};
use backflow_repository::{Location, RepoError, Result};

/// Objects in a map; scratch in a temporary directory.
#[derive(Debug)]
struct MemStore {
    location: Location,
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    scratch: PathBuf,
}

#[derive(Debug)]
struct Bytes(Vec<u8>);

impl Object for Bytes {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

#[derive(Debug)]
struct NoLease;

impl Lease for NoLease {
    fn name(&self) -> &str {
        "none"
    }
    fn is_held(&self) -> bool {
        true
    }
}

impl MemStore {
    fn new(scratch: &Path) -> Arc<MemStore> {
        Arc::new(MemStore {
            location: Location::Local(PathBuf::from("/mem")),
            objects: Mutex::default(),
            scratch: scratch.to_owned(),
        })
    }

    fn raw(&self, key: &str) -> Vec<u8> {
        self.objects.lock().unwrap()[key].clone()
    }

    fn set_raw(&self, key: &str, bytes: Vec<u8>) {
        self.objects.lock().unwrap().insert(key.to_owned(), bytes);
    }
}

impl Store for MemStore {
    fn location(&self) -> &Location {
        &self.location
    }
    fn display_key(&self, key: &str) -> PathBuf {
        Path::new("/mem").join(key)
    }
    fn scratch_root(&self) -> &Path {
        &self.scratch
    }
    fn open(&self, key: &str) -> Result<Arc<dyn Object>> {
        match self.objects.lock().unwrap().get(key) {
            Some(b) => Ok(Arc::new(Bytes(b.clone()))),
            None => Err(RepoError::Io {
                op: "open",
                path: self.display_key(key),
                source: io::ErrorKind::NotFound.into(),
            }),
        }
    }
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.objects.lock().unwrap().get(key).cloned())
    }
    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.objects.lock().unwrap().contains_key(key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(prefix)?;
                (!name.contains('/')).then(|| Entry {
                    name: name.to_owned(),
                    size: v.len() as u64,
                    modified: None,
                })
            })
            .collect())
    }
    fn list_dirs(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        assert!(
            local.starts_with(&self.scratch),
            "{} is not in the inner store's scratch",
            local.display()
        );
        let bytes = std::fs::read(local).unwrap();
        std::fs::remove_file(local).unwrap();
        self.put(key, &bytes, mode)
    }
    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()> {
        let mut objects = self.objects.lock().unwrap();
        if mode == PutMode::Create && objects.contains_key(key) {
            return Err(RepoError::Io {
                op: "create",
                path: self.display_key(key),
                source: io::ErrorKind::AlreadyExists.into(),
            });
        }
        objects.insert(key.to_owned(), bytes.to_vec());
        Ok(())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut objects = self.objects.lock().unwrap();
        let b = objects.remove(from).expect("renamed object exists");
        objects.insert(to.to_owned(), b);
        Ok(())
    }
    fn lock(&self, _: &str, _: LockMode, _: &str) -> Result<Box<dyn Lease>> {
        Ok(Box::new(NoLease))
    }
    fn register(&self, _: &str) -> Result<Box<dyn Lease>> {
        Ok(Box::new(NoLease))
    }
    fn live(&self, _: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn is_local(&self) -> bool {
        false
    }
}

/// The smallest segment, so that a few KiB cross several boundaries.
const SEG: u32 = MIN_SEGMENT;

struct Fixture {
    _dir: tempfile::TempDir,
    mem: Arc<MemStore>,
    sealed: SealedStore,
    key: MasterKey,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStore::new(&dir.path().join("inner"));
    std::fs::create_dir(mem.scratch_root()).unwrap();
    let key = MasterKey::generate();
    let sealed = SealedStore::new(mem.clone(), &key, SEG, dir.path().join("plain")).unwrap();
    Fixture {
        _dir: dir,
        mem,
        sealed,
        key,
    }
}

/// Deterministic bytes with a visible pattern: what a scan of the sealed bytes must not find.
fn pattern(len: usize) -> Vec<u8> {
    b"PLAINTEXT-PATTERN-"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .enumerate()
        .map(|(i, b)| if i % 97 == 0 { (i / 97) as u8 } else { b })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const SIZES: [usize; 9] = [
    0,
    1,
    SEG as usize - 1,
    SEG as usize,
    SEG as usize + 1,
    2 * SEG as usize,
    3 * SEG as usize + 5,
    10 * SEG as usize,
    10 * SEG as usize + 4095,
];

#[test]
fn objects_round_trip_across_segment_boundaries_and_hold_no_plaintext() {
    let f = fixture();
    for len in SIZES {
        let plain = pattern(len);
        let key = format!("packs/ab/obj-{len}.pack");
        f.sealed.put(&key, &plain, PutMode::Create).unwrap();
        let raw = f.mem.raw(&key);
        assert_eq!(raw.len() as u64, sealed_len(len as u64, SEG), "{len}");
        assert!(
            !contains(&raw, b"PATTERN"),
            "{len}: plaintext in the sealed object"
        );
        assert_eq!(f.sealed.read(&key).unwrap().unwrap(), plain, "{len}");

        let object = f.sealed.open(&key).unwrap();
        assert_eq!(object.len(), len as u64);
        // Reads that start and end on, before and after every boundary.
        let seg = SEG as usize;
        let points: Vec<usize> = (0..=len / seg + 1)
            .flat_map(|i| [i * seg, (i * seg).saturating_sub(1), i * seg + 1])
            .filter(|&p| p <= len)
            .collect();
        for &from in &points {
            for &to in &points {
                if to < from {
                    continue;
                }
                let mut buf = vec![0u8; to - from];
                object.read_exact_at(&mut buf, from as u64).unwrap();
                assert_eq!(buf, plain[from..to], "{len}: {from}..{to}");
            }
        }
        let mut past = [0u8; 8];
        assert_eq!(object.read_at(&mut past, len as u64).unwrap(), 0);
        let mut tail = vec![0u8; 100];
        let n = object
            .read_at(&mut tail, len.saturating_sub(10) as u64)
            .unwrap();
        assert_eq!(n, len.min(10), "{len}: a read past the end is short");
        let listed = f.sealed.list("packs/ab/").unwrap();
        let entry = listed
            .iter()
            .find(|e| e.name == format!("obj-{len}.pack"))
            .unwrap();
        assert_eq!(entry.size, len as u64, "listings give the plaintext size");
    }
}

#[test]
fn publish_seals_a_scratch_file_and_consumes_it() {
    let f = fixture();
    let plain = pattern(5 * SEG as usize + 77);
    let local = f.sealed.scratch_root().join("pack.tmp");
    assert!(
        !f.sealed.scratch_root().starts_with(f.mem.scratch_root()),
        "plaintext scratch must not be the inner store's"
    );
    std::fs::write(&local, &plain).unwrap();
    f.sealed
        .publish(&local, "packs/cd/p.pack", PutMode::Create)
        .unwrap();
    assert!(!local.exists(), "the plaintext file is consumed");
    assert!(!contains(&f.mem.raw("packs/cd/p.pack"), b"PATTERN"));
    assert_eq!(f.sealed.read("packs/cd/p.pack").unwrap().unwrap(), plain);
    // Nothing sealing left behind in the inner store's scratch.
    assert_eq!(std::fs::read_dir(f.mem.scratch_root()).unwrap().count(), 0);
    std::fs::write(&local, b"again").unwrap();
    let again = f
        .sealed
        .publish(&local, "packs/cd/p.pack", PutMode::Create)
        .unwrap_err();
    assert!(backflow_repository::store::is_exists(&again), "{again}");
    assert!(!local.exists(), "consumed on error too");
}

#[test]
fn every_altered_byte_is_detected() {
    let f = fixture();
    let plain = pattern(2 * SEG as usize + 300);
    let key = "index/s.idx";
    f.sealed.put(key, &plain, PutMode::Create).unwrap();
    let good = f.mem.raw(key);
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01 << (i % 8);
        f.mem.set_raw(key, bad);
        let read = f.sealed.read(key);
        assert!(
            matches!(read, Err(RepoError::Corrupt { .. })),
            "byte {i} altered went unnoticed: {read:?}"
        );
    }
    f.mem.set_raw(key, good);
    assert_eq!(f.sealed.read(key).unwrap().unwrap(), plain);
}

#[test]
fn truncation_extension_swaps_and_foreign_keys_are_detected() {
    let f = fixture();
    let seg = SEG as usize;
    let plain = pattern(3 * seg);
    f.sealed
        .put("snapshots/a.snap", &plain, PutMode::Create)
        .unwrap();
    f.sealed
        .put("snapshots/b.snap", &pattern(3 * seg), PutMode::Create)
        .unwrap();
    let good = f.mem.raw("snapshots/a.snap");
    let sealed_seg = seg + 16;
    // Cut at a segment boundary: the new last segment was sealed as "not last".
    let mut cut = good.clone();
    cut.truncate(good.len() - sealed_seg);
    f.mem.set_raw("snapshots/a.snap", cut);
    let e = f.sealed.read("snapshots/a.snap").unwrap_err();
    assert!(e.to_string().contains("fails authentication"), "{e}");
    // Cut inside a segment: that segment's tag is cut or wrong.
    let mut cut = good.clone();
    cut.truncate(good.len() - 7);
    f.mem.set_raw("snapshots/a.snap", cut);
    let e = f.sealed.read("snapshots/a.snap").unwrap_err();
    assert!(e.to_string().contains("segment 2"), "{e}");
    // Cut to a length no plaintext seals to (a last segment shorter than its tag).
    let mut cut = good.clone();
    cut.truncate(32 + 2 * sealed_seg + 7);
    f.mem.set_raw("snapshots/a.snap", cut);
    let e = f.sealed.read("snapshots/a.snap").unwrap_err();
    assert!(e.to_string().contains("truncated or extended"), "{e}");
    // A segment appended (a copy of the last).
    let mut longer = good.clone();
    longer.extend_from_slice(&good[good.len() - sealed_seg..]);
    f.mem.set_raw("snapshots/a.snap", longer);
    assert!(f.sealed.read("snapshots/a.snap").is_err());
    // Swapped with another object: the name is bound in.
    f.mem
        .set_raw("snapshots/a.snap", f.mem.raw("snapshots/b.snap"));
    let e = f.sealed.read("snapshots/a.snap").unwrap_err();
    assert!(
        e.to_string().contains("/mem/snapshots/a.snap is damaged"),
        "{e}"
    );
    // Two segments swapped within the object.
    let mut swapped = good.clone();
    let (s0, s1) = (32..32 + sealed_seg, 32 + sealed_seg..32 + 2 * sealed_seg);
    let first = good[s0.clone()].to_vec();
    swapped[s0].copy_from_slice(&good[s1.clone()]);
    swapped[s1].copy_from_slice(&first);
    f.mem.set_raw("snapshots/a.snap", swapped);
    assert!(f.sealed.read("snapshots/a.snap").is_err());
    // Another repository's key.
    f.mem.set_raw("snapshots/a.snap", good);
    let other = SealedStore::new(
        f.mem.clone(),
        &MasterKey::generate(),
        SEG,
        f._dir.path().join("other"),
    )
    .unwrap();
    assert!(other.read("snapshots/a.snap").is_err());
    assert_eq!(f.sealed.read("snapshots/a.snap").unwrap().unwrap(), plain);
    // Positioned reads fail only on the damaged segment.
    let mut bad = f.mem.raw("snapshots/a.snap");
    bad[32 + 2 * sealed_seg + 5] ^= 1;
    f.mem.set_raw("snapshots/a.snap", bad);
    let object = f.sealed.open("snapshots/a.snap").unwrap();
    let mut buf = vec![0u8; 2 * seg];
    object.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, plain[..2 * seg]);
    let e = object.read_exact_at(&mut buf, seg as u64).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("segment 2"), "{e}");
}

#[test]
fn renames_keep_or_reseal_and_clear_objects_pass_through() {
    let f = fixture();
    let plain = pattern(SEG as usize * 2 + 1);
    f.sealed
        .put("packs/ef/x.pack", &plain, PutMode::Create)
        .unwrap();
    // gc's quarantine keeps the name: a plain move.
    f.sealed
        .rename("packs/ef/x.pack", "quarantine/packs/ef/x.pack")
        .unwrap();
    assert_eq!(
        f.sealed
            .read("quarantine/packs/ef/x.pack")
            .unwrap()
            .unwrap(),
        plain
    );
    // A new name: sealed again under it.
    f.sealed
        .rename("quarantine/packs/ef/x.pack", "packs/ef/y.pack")
        .unwrap();
    assert_eq!(f.sealed.read("packs/ef/y.pack").unwrap().unwrap(), plain);
    assert!(!f.mem.exists("quarantine/packs/ef/x.pack").unwrap());

    for key in [
        "config",
        "config.copy",
        "keys/k.key",
        "locks/gc",
        "users/1-ab",
    ] {
        f.sealed.put(key, b"clear text", PutMode::Replace).unwrap();
        assert_eq!(f.mem.raw(key), b"clear text", "{key} is stored as it is");
        assert_eq!(f.sealed.read(key).unwrap().unwrap(), b"clear text");
    }
    for key in ["damaged", "gc/state.json", "history/s.json", "index/i.idx"] {
        f.sealed.put(key, b"clear text", PutMode::Replace).unwrap();
        assert!(!contains(&f.mem.raw(key), b"clear"), "{key} is sealed");
    }
    let _ = &f.key;
}

#[test]
fn key_files_unlock_add_list_remove() {
    keys::set_new_key_params(Some(WEAK_KDF));
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStore::new(dir.path());
    let store: &dyn Store = &*mem;
    let master = MasterKey::generate();
    let first = keys::create_first(store, &master, "repo-1", b"first pass").unwrap();
    let stored = mem.raw(&format!("keys/{first}.key"));
    assert!(!contains(&stored, b"first pass"));

    let (unlocked, id) = keys::unlock(store, "repo-1", b"first pass").unwrap();
    assert_eq!(id, first);
    assert_eq!(
        unlocked.hasher().digest(b"x"),
        master.hasher().digest(b"x"),
        "the same master key"
    );
    let wrong = keys::unlock(store, "repo-1", b"wrong pass").unwrap_err();
    assert!(matches!(wrong, RepoError::Passphrase { .. }), "{wrong:?}");
    assert_eq!(
        wrong.to_string(),
        "no key in /mem opens with this passphrase (tried 1 key file)"
    );
    // A key file of this repository is no key of another one.
    let foreign = keys::unlock(store, "repo-2", b"first pass").unwrap_err();
    assert!(
        foreign.to_string().contains("belongs to repository repo-1"),
        "{foreign}"
    );

    let second = keys::add(store, &unlocked, "repo-1", b"second pass").unwrap();
    let listed = keys::list(store, Some(&first)).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|k| k.id == first && k.current));
    assert!(listed.iter().any(|k| k.id == second.id && !k.current));
    assert!(
        listed
            .iter()
            .all(|k| !k.host.is_empty() && k.created.ends_with('Z'))
    );
    let (_, id) = keys::unlock(store, "repo-1", b"second pass").unwrap();
    assert_eq!(id, second.id);
    let both_wrong = keys::unlock(store, "repo-1", b"nope").unwrap_err();
    assert!(
        both_wrong.to_string().contains("tried 2 key files"),
        "{both_wrong}"
    );

    // Refused: the key this process opened with, and the last one; unknown ids are named.
    let e = keys::remove(store, &second.id, Some(&second.id)).unwrap_err();
    assert!(e.to_string().contains("another key's passphrase"), "{e}");
    let e = keys::remove(store, "0000", Some(&second.id)).unwrap_err();
    assert!(e.to_string().contains("no key \"0000\""), "{e}");
    keys::remove(store, &first, Some(&second.id)).unwrap();
    let e = keys::unlock(store, "repo-1", b"first pass").unwrap_err();
    assert!(
        matches!(e, RepoError::Passphrase { .. }),
        "the cache forgot it: {e:?}"
    );
    let e = keys::remove(store, &second.id, None).unwrap_err();
    assert!(e.to_string().contains("last intact key"), "{e}");
    assert_eq!(keys::list(store, None).unwrap().len(), 1);
}

#[test]
fn a_damaged_key_file_is_told_apart_from_a_wrong_passphrase() {
    keys::set_new_key_params(Some(KdfParams { ..WEAK_KDF }));
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStore::new(dir.path());
    let store: &dyn Store = &*mem;
    let master = MasterKey::generate();
    let id = keys::create_first(store, &master, "repo-d", b"pass").unwrap();
    let key = format!("keys/{id}.key");
    let good = String::from_utf8(mem.raw(&key)).unwrap();
    // One hex digit of the sealed master key changed: the checksum tells, before any passphrase is tried.
    let at = good.find("\"sealed\": \"").unwrap() + 12;
    let mut bad = good.clone().into_bytes();
    bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
    for damaged in [bad, b"{ not json".to_vec(), Vec::new()] {
        mem.set_raw(&key, damaged);
        let e = keys::unlock(store, "repo-d", b"pass").unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("/mem/keys/{id}.key is damaged"))
                && text.contains("no intact key file"),
            "{text}"
        );
        let listed = keys::list(store, None).unwrap();
        assert!(listed[0].damaged.is_some());
    }
    // With another, intact key file, a wrong passphrase names the damaged one as well.
    mem.set_raw(&key, b"garbage".to_vec());
    let other = keys::create_first(store, &master, "repo-d", b"other").unwrap();
    let e = keys::unlock(store, "repo-d", b"wrong").unwrap_err();
    assert!(matches!(e, RepoError::Passphrase { .. }), "{e:?}");
    assert!(
        e.to_string().contains("tried 1 key file")
            && e.to_string().contains(&format!("{id}.key is damaged")),
        "{e}"
    );
    assert_eq!(keys::unlock(store, "repo-d", b"other").unwrap().1, other);
    mem.set_raw(&key, good.into_bytes());
    assert_eq!(keys::unlock(store, "repo-d", b"pass").unwrap().1, id);
}

#[test]
fn passphrase_files_lose_one_line_ending_and_may_not_be_empty() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pass");
    for (text, expected) in [
        (&b"secret\n"[..], &b"secret"[..]),
        (b"secret\r\n", b"secret"),
        (b"secret", b"secret"),
        (b" two words \n\n", b" two words \n"),
    ] {
        std::fs::write(&p, text).unwrap();
        assert_eq!(&keys::read_passphrase(&p).unwrap()[..], expected);
    }
    std::fs::write(&p, b"\n").unwrap();
    let e = keys::read_passphrase(&p).unwrap_err();
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = keys::read_passphrase(&dir.path().join("missing")).unwrap_err();
    assert!(
        e.to_string().contains("cannot read the passphrase file"),
        "{e}"
    );
}

#[test]
fn an_encrypted_repository_opens_sealed_with_the_process_passphrase() {
    use backflow_repository::RepositoryConfig;
    keys::set_new_key_params(Some(WEAK_KDF));
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStore::new(dir.path());
    let mut config = RepositoryConfig {
        format: "backflow-repository".into(),
        version: backflow_repository::CONFIG_VERSION,
        id: "0123456789abcdef0123456789abcdef".into(),
        chunk_size: 64 * 1024,
        pack_target_size: 1 << 20,
        encryption: None,
    };
    // No passphrase given: the error says how to give one.
    keys::set_password_file(None);
    let e = keys::init_encrypted(&*mem, &mut config).unwrap_err();
    assert!(
        e.to_string()
            == "/mem is encrypted: give its passphrase in a file with --password-file FILE or BACKFLOW_PASSWORD_FILE",
        "{e}"
    );
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "right\n").unwrap();
    keys::set_password_file(Some(pass.clone()));
    keys::init_encrypted(&*mem, &mut config).unwrap();
    assert_eq!(config.encryption, Some(Default::default()));

    let opened = keys::open_encrypted(mem.clone(), &config).unwrap();
    assert!(opened.hasher.is_keyed() && opened.key_id.is_some());
    opened
        .store
        .put("snapshots/s.snap", b"manifest text", PutMode::Create)
        .unwrap();
    assert!(!contains(&mem.raw("snapshots/s.snap"), b"manifest"));
    assert_eq!(
        opened.store.read("snapshots/s.snap").unwrap().unwrap(),
        b"manifest text"
    );
    // A second handle gets the same key (from the process's cache) and reads what the first wrote.
    let again = keys::open_encrypted(mem.clone(), &config).unwrap();
    assert_eq!(again.hasher.digest(b"c"), opened.hasher.digest(b"c"));
    assert_eq!(
        again.store.read("snapshots/s.snap").unwrap().unwrap(),
        b"manifest text"
    );

    std::fs::write(&pass, "wrong\n").unwrap();
    let e = keys::open_encrypted(mem.clone(), &config).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no key in /mem opens with this passphrase (tried 1 key file)"
    );
    // An unencrypted config leaves the store as it is.
    config.encryption = None;
    let plain = keys::open_encrypted(mem.clone(), &config).unwrap();
    assert!(!plain.hasher.is_keyed() && plain.key_id.is_none());
    keys::set_password_file(None);
}
