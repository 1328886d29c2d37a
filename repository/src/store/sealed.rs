//! [`SealedStore`]: encryption at rest as a [`Store`] wrapper, so that the format above the seam does not
//! change for it and every backend gets it.
//!
//! Every object is stored sealed ([`crate::crypto`] describes the layout) except those a reader needs
//! before it has the master key or that carry nothing of the data: `config` and `config.copy` (what the
//! repository is and that it is encrypted), `keys/` (the master key, sealed under passphrases by
//! [`crate::keys`]), and the coordination objects `locks/` and `users/` (names and timestamps; on a local
//! file system these are `flock`ed files that hold nothing). Listings, existence, deletion and locks pass
//! through; a listing reports the plaintext size of sealed objects.
//!
//! Writing: [`Store::publish`] takes a plaintext file from this store's scratch, seals it segment by segment
//! into a file in the inner store's scratch and publishes that; [`Store::put`] seals in memory. Reading:
//! [`Store::open`] reads the header and gives an [`Object`] whose length is the plaintext's and whose
//! positioned reads decrypt only the segments they cover (the last two stay decrypted, for the small
//! sequential reads of index searches and manifests). A segment that fails authentication is an
//! `InvalidData` error naming the object and segment: damage, an object moved under another name, or one
//! from another repository.
//!
//! Plaintext scratch: [`Store::scratch_root`] is a local directory outside the repository,
//! `$BACKFLOW_SCRATCH_DIR/<repository id>` (default `/var/tmp/backflow/<repository id>`), so that packs being
//! filled and session tables are never in plaintext inside a repository directory that may be copied off
//! site. For object storage it is the inner store's scratch, which is already such a directory.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chacha20poly1305::XChaCha20Poly1305;

use super::{Entry, Lease, Location, LockMode, Object, PutMode, Store};
use crate::crypto::{
    MasterKey, SEALED_HEADER_LEN, SealedHeader, plain_len, sealed_len, segment_count,
};
use crate::error::{IoContext, RepoError, Result};

/// Where plaintext scratch goes unless `BACKFLOW_SCRATCH_DIR` says otherwise.
pub const DEFAULT_SCRATCH_BASE: &str = "/var/tmp/backflow";
/// The variable that moves scratch space (shared with the S3 backend).
pub const SCRATCH_ENV: &str = "BACKFLOW_SCRATCH_DIR";
/// Decrypted segments an open object keeps: an index search and a manifest's sequential reads touch one or
/// two segments in a row; more would cost 64 KiB each for every open index file and pack.
const SEGMENT_CACHE: usize = 2;

/// Whether the object `key` is stored sealed.
pub fn is_sealed(key: &str) -> bool {
    !(matches!(key, "config" | "config.copy")
        || ["keys/", "locks/", "users/"]
            .iter()
            .any(|p| key.starts_with(p)))
}

/// The part of a key bound into each segment: its last component (see [`crate::crypto`]).
fn name_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// A store whose objects are sealed with the repository's master key.
pub struct SealedStore {
    inner: Arc<dyn Store>,
    cipher: Arc<XChaCha20Poly1305>,
    segment: u32,
    scratch: PathBuf,
}

impl fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedStore")
            .field("inner", &self.inner)
            .field("segment", &self.segment)
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl SealedStore {
    /// Wraps `inner`, with plaintext scratch in `scratch` (created; [`SealedStore::scratch_for`] says where
    /// a repository's goes).
    pub fn new(
        inner: Arc<dyn Store>,
        key: &MasterKey,
        segment: u32,
        scratch: PathBuf,
    ) -> Result<SealedStore> {
        std::fs::create_dir_all(&scratch).ctx("create directory", &scratch)?;
        Ok(SealedStore {
            inner,
            cipher: Arc::new(key.aead()),
            segment,
            scratch,
        })
    }

    /// The plaintext scratch of the repository `repo_id` in `inner` (see the module docs).
    pub fn scratch_for(inner: &dyn Store, repo_id: &str) -> PathBuf {
        if !inner.is_local() {
            return inner.scratch_root().to_owned();
        }
        let base = std::env::var_os(SCRATCH_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SCRATCH_BASE), PathBuf::from);
        base.join(repo_id)
    }

    /// The store underneath (for what passes through unchanged: key files, locks).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn damaged(&self, key: &str, detail: impl Into<String>) -> RepoError {
        RepoError::corrupt(self.inner.display_key(key), detail)
    }

    /// Seals everything `source` yields (exactly `len` bytes) into a new file in the inner store's scratch
    /// and publishes it as `key`.
    fn seal_and_publish(
        &self,
        source: &mut dyn Read,
        len: u64,
        key: &str,
        mode: PutMode,
    ) -> Result<()> {
        let dir = self.inner.scratch_root();
        let sealed = dir.join(format!(
            "sealing-{}.tmp",
            crate::format::hex(&rand::random::<[u8; 8]>())
        ));
        let written = (|| -> Result<()> {
            let mut out = io::BufWriter::new(File::create(&sealed).ctx("create", &sealed)?);
            self.seal_stream(source, len, key, &mut out)
                .map_err(|e| match e {
                    SealError::Read(e) => RepoError::io("read", &self.scratch, e),
                    SealError::Write(e) => RepoError::io("write", &sealed, e),
                })?;
            let f = out
                .into_inner()
                .map_err(|e| RepoError::io("write", &sealed, e.into_error()))?;
            f.sync_all().ctx("fsync", &sealed)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&sealed);
            return Err(e);
        }
        self.inner.publish(&sealed, key, mode)
    }

    fn seal_stream(
        &self,
        source: &mut dyn Read,
        len: u64,
        key: &str,
        out: &mut dyn Write,
    ) -> std::result::Result<(), SealError> {
        let header = SealedHeader::new(self.segment);
        out.write_all(&header.encode()).map_err(SealError::Write)?;
        let count = segment_count(len, self.segment);
        let mut buf = Vec::with_capacity(self.segment as usize + crate::crypto::TAG_LEN);
        for i in 0..count {
            let (_, sealed, last) = header.segment_span(i, len);
            buf.clear();
            buf.resize(sealed - crate::crypto::TAG_LEN, 0);
            source.read_exact(&mut buf).map_err(SealError::Read)?;
            header.seal(&self.cipher, name_of(key), i, last, &mut buf);
            out.write_all(&buf).map_err(SealError::Write)?;
        }
        Ok(())
    }

    fn seal_bytes(&self, key: &str, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(sealed_len(bytes.len() as u64, self.segment) as usize);
        self.seal_stream(&mut &bytes[..], bytes.len() as u64, key, &mut out)
            .map_err(|_| ())
            .expect("sealing from memory into memory cannot fail");
        out
    }

    fn open_sealed(&self, key: &str, inner: Arc<dyn Object>) -> Result<SealedObject> {
        let mut h = [0u8; SEALED_HEADER_LEN];
        let n = inner.len().min(SEALED_HEADER_LEN as u64) as usize;
        inner
            .read_exact_at(&mut h[..n], 0)
            .map_err(|e| RepoError::io("read", self.inner.display_key(key), e))?;
        let header = SealedHeader::decode(&h[..n]).map_err(|d| self.damaged(key, d))?;
        let plain = plain_len(inner.len(), header.segment).ok_or_else(|| {
            self.damaged(
                key,
                format!(
                    "truncated or extended: {} bytes is no sealed object's length",
                    inner.len()
                ),
            )
        })?;
        Ok(SealedObject {
            inner,
            header,
            plain_len: plain,
            name: name_of(key).to_owned(),
            shown: self.inner.display_key(key),
            cipher: self.cipher.clone(),
            cache: Mutex::new(Vec::with_capacity(SEGMENT_CACHE)),
        })
    }
}

enum SealError {
    Read(io::Error),
    Write(io::Error),
}

impl Store for SealedStore {
    fn location(&self) -> &Location {
        self.inner.location()
    }

    fn display_key(&self, key: &str) -> PathBuf {
        self.inner.display_key(key)
    }

    fn scratch_root(&self) -> &Path {
        &self.scratch
    }

    fn open(&self, key: &str) -> Result<Arc<dyn Object>> {
        let inner = self.inner.open(key)?;
        if !is_sealed(key) {
            return Ok(inner);
        }
        Ok(Arc::new(self.open_sealed(key, inner)?))
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(bytes) = self.inner.read(key)? else {
            return Ok(None);
        };
        if !is_sealed(key) {
            return Ok(Some(bytes));
        }
        let object = self.open_sealed(key, Arc::new(InMemory(bytes)))?;
        let mut plain = vec![0u8; object.plain_len as usize];
        object
            .read_exact_at(&mut plain, 0)
            .map_err(|e| self.damaged(key, e.to_string()))?;
        Ok(Some(plain))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut entries = self.inner.list(prefix)?;
        if is_sealed(prefix) {
            for e in &mut entries {
                // An impossible length is reported as it is; opening the object names the damage.
                if let Some(p) = plain_len(e.size, self.segment) {
                    e.size = p;
                }
            }
        }
        Ok(entries)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list_dirs(prefix)
    }

    fn list_names(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list_names(prefix)
    }

    fn stat(&self, key: &str) -> Result<Option<super::Stat>> {
        let mut stat = self.inner.stat(key)?;
        if is_sealed(key)
            && let Some(s) = &mut stat
            && let Some(p) = plain_len(s.size, self.segment)
        {
            s.size = p;
        }
        Ok(stat)
    }

    fn delete_many(&self, keys: &[String]) -> Result<()> {
        self.inner.delete_many(keys)
    }

    fn change_hint(&self, prefix: &str) -> Option<std::time::SystemTime> {
        self.inner.change_hint(prefix)
    }

    fn prepare(&self) -> Result<()> {
        self.inner.prepare()
    }

    fn check_layout(&self) -> Result<()> {
        self.inner.check_layout()
    }

    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        if !is_sealed(key) {
            // The inner store publishes only from its own scratch.
            let staged = self.inner.scratch_root().join(format!(
                "staging-{}.tmp",
                crate::format::hex(&rand::random::<[u8; 8]>())
            ));
            let copied = std::fs::copy(local, &staged).ctx("copy", local);
            let _ = std::fs::remove_file(local);
            copied?;
            return self.inner.publish(&staged, key, mode);
        }
        let sealed = (|| {
            let mut f = File::open(local).ctx("open", local)?;
            let len = f.metadata().ctx("stat", local)?.len();
            self.seal_and_publish(&mut io::BufReader::new(&mut f), len, key, mode)
        })();
        let _ = std::fs::remove_file(local);
        sealed
    }

    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()> {
        if !is_sealed(key) {
            return self.inner.put(key, bytes, mode);
        }
        self.inner.put(key, &self.seal_bytes(key, bytes), mode)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        if is_sealed(from) == is_sealed(to) && (!is_sealed(to) || name_of(from) == name_of(to)) {
            return self.inner.rename(from, to);
        }
        // The name is bound into every segment: a new name needs the object sealed again.
        let object = self.open(from)?;
        let mut reader = ObjectReader {
            object: &*object,
            offset: 0,
        };
        if is_sealed(to) {
            self.seal_and_publish(&mut reader, object.len(), to, PutMode::Replace)?;
        } else {
            let mut plain = vec![0u8; object.len() as usize];
            reader
                .read_exact(&mut plain)
                .map_err(|e| RepoError::io("read", self.inner.display_key(from), e))?;
            self.inner.put(to, &plain, PutMode::Replace)?;
        }
        self.inner.delete(from)
    }

    fn lock(&self, name: &str, mode: LockMode, held_by: &str) -> Result<Box<dyn Lease>> {
        self.inner.lock(name, mode, held_by)
    }

    fn register(&self, prefix: &str) -> Result<Box<dyn Lease>> {
        self.inner.register(prefix)
    }

    fn live(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.live(prefix)
    }
}

/// An open sealed object: positioned reads of its plaintext.
pub struct SealedObject {
    inner: Arc<dyn Object>,
    header: SealedHeader,
    plain_len: u64,
    name: String,
    shown: PathBuf,
    cipher: Arc<XChaCha20Poly1305>,
    /// Most recently used last.
    cache: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl fmt::Debug for SealedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedObject")
            .field("object", &self.shown)
            .field("plain_len", &self.plain_len)
            .finish_non_exhaustive()
    }
}

impl SealedObject {
    fn segment(&self, index: u64) -> io::Result<Arc<Vec<u8>>> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = cache.iter().position(|(i, _)| *i == index) {
                let hit = cache.remove(pos);
                let plain = hit.1.clone();
                cache.push(hit);
                return Ok(plain);
            }
        }
        let (offset, len, last) = self.header.segment_span(index, self.plain_len);
        let mut buf = vec![0u8; len];
        self.inner.read_exact_at(&mut buf, offset)?;
        if !self
            .header
            .open(&self.cipher, &self.name, index, last, &mut buf)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "segment {index} (sealed bytes {offset}..{}) fails authentication: the object was \
                     altered, moved under another name, or not sealed with this repository's key",
                    offset + len as u64
                ),
            ));
        }
        let plain = Arc::new(buf);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() == SEGMENT_CACHE {
            cache.remove(0);
        }
        cache.push((index, plain.clone()));
        Ok(plain)
    }
}

impl Object for SealedObject {
    fn len(&self) -> u64 {
        self.plain_len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.plain_len || buf.is_empty() {
            return Ok(0);
        }
        let seg = u64::from(self.header.segment);
        let end = (offset + buf.len() as u64).min(self.plain_len);
        let mut done = 0usize;
        let mut at = offset;
        while at < end {
            let index = at / seg;
            let plain = self.segment(index)?;
            let from = (at - index * seg) as usize;
            let n = (plain.len() - from).min((end - at) as usize);
            buf[done..done + n].copy_from_slice(&plain[from..from + n]);
            done += n;
            at += n as u64;
        }
        Ok(done)
    }
}

/// A whole object already in memory (what [`Store::read`] returned).
#[derive(Debug)]
struct InMemory(Vec<u8>);

impl Object for InMemory {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset.min(self.0.len() as u64)) as usize;
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

/// An object read from start to end.
struct ObjectReader<'a> {
    object: &'a dyn Object,
    offset: u64,
}

impl Read for ObjectReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.object.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}
