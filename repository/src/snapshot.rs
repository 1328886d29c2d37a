//! Snapshot manifests: one file per restore point, read in place.
//!
//! The byte layout is in the crate root ("Snapshot manifests"). Listing reads the header and metadata only;
//! opening streams the whole file through BLAKE3 once; entries are then read by position.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::check_chunk_size;
use crate::error::{IoContext, RepoError, Result, read_exact_at};
use crate::format::{
    CHECKSUM_SIZE, FORMAT_VERSION, FieldReader, FieldWriter, HashingWriter, check_trailing_checksum,
};
use crate::store::{Object, Store};
use crate::{ChunkRef, Digest};

pub(crate) const SNAP_MAGIC: [u8; 8] = *b"BFLWSNAP";
pub(crate) const SNAP_HEADER_SIZE: usize = 32;
const _: () = assert!(SNAP_HEADER_SIZE == 8 + 4 + 4 + 8 + 8);
/// Size of one chunk-table entry.
pub(crate) const ENTRY_SIZE: usize = 32;
/// Largest metadata block accepted: domain XML and CBT state are kilobytes; this bounds the allocation a damaged
/// header can cause.
pub(crate) const MAX_META_LEN: u64 = 16 * 1024 * 1024;
/// Buffer of sequential table readers and of the table copy at commit.
pub(crate) const TABLE_BUFFER: usize = 64 * 1024;

/// One disk of a snapshot.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiskMeta {
    /// Name within the VM (`vda`), unique in a snapshot.
    pub name: String,
    pub size: u64,
    /// Chunk size of this disk's table; recorded per disk so a repository can change its default.
    pub chunk_size: u32,
    /// Where the disk was read from, for people (a path, a libvirt URI).
    pub location: String,
    /// Changed-block-tracking state this snapshot was taken with (checkpoint name, bitmap, disk identity);
    /// opaque to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<serde_json::Value>,
}

impl DiskMeta {
    /// Number of chunk-table entries: the last chunk may be partial.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }
}

/// Metadata block of a manifest. Readers ignore unknown keys, so adding an optional key does not need a new
/// format version; changing a key's meaning or the binary layout does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub vm: String,
    /// Seconds since the Unix epoch (UTC) when the backup began: the restore point's time.
    pub time: i64,
    /// Sub-second part of `time`, so that two snapshots begun within one second still order correctly.
    #[serde(default)]
    pub time_nanos: u32,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
    pub disks: Vec<DiskMeta>,
}

/// Disk summary in [`SnapshotInfo`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    pub name: String,
    pub size: u64,
    /// Where the disk was read from ([`DiskMeta::location`]).
    #[serde(default)]
    pub location: String,
}

/// What `snapshots` lists.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// The identity of what was backed up (see "Identities" in `names`): a libvirt VM's domain name, the
    /// name a spec gave an image, or an image's canonical path. Retention, `latest` and parents go by it.
    pub vm: String,
    /// Where it was read from, for people: the one disk's location, or `NAME=LOCATION` per disk joined by
    /// `, `. Taken from the disks' locations, which every manifest records (older ones included).
    #[serde(default)]
    pub source: String,
    /// Bytes of all disks together.
    #[serde(default)]
    pub size: u64,
    /// Seconds since the Unix epoch, UTC.
    pub time: i64,
    /// The same instant as RFC 3339 (`2026-11-27T10:40:19Z`).
    pub time_utc: String,
    pub hostname: String,
    pub disks: Vec<DiskInfo>,
    #[serde(skip)]
    pub(crate) time_nanos: u32,
}

impl SnapshotInfo {
    pub(crate) fn from_meta(meta: &SnapshotMeta) -> SnapshotInfo {
        let source = match &meta.disks[..] {
            [one] => one.location.clone(),
            disks => disks
                .iter()
                .map(|d| format!("{}={}", d.name, d.location))
                .collect::<Vec<_>>()
                .join(", "),
        };
        SnapshotInfo {
            id: meta.id.clone(),
            vm: meta.vm.clone(),
            source,
            size: meta.disks.iter().map(|d| d.size).sum(),
            time: meta.time,
            time_utc: crate::ids::rfc3339(meta.time),
            hostname: meta.hostname.clone(),
            disks: meta
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    size: d.size,
                    location: d.location.clone(),
                })
                .collect(),
            time_nanos: meta.time_nanos,
        }
    }

    /// Order of restore points: by time, then by id.
    pub(crate) fn sort_key(&self) -> (i64, u32, &str) {
        (self.time, self.time_nanos, &self.id)
    }
}

pub(crate) fn encode_ref(r: &ChunkRef) -> [u8; ENTRY_SIZE] {
    match r {
        ChunkRef::Zero => [0; ENTRY_SIZE],
        ChunkRef::Data(d) => d.0,
    }
}

pub(crate) fn decode_ref(b: &[u8]) -> ChunkRef {
    if b.iter().all(|&x| x == 0) {
        ChunkRef::Zero
    } else {
        let mut d = [0u8; 32];
        d.copy_from_slice(b);
        ChunkRef::Data(Digest(d))
    }
}

/// `snapshots/ID.snap`.
pub(crate) fn snapshot_key(id: &str) -> String {
    format!("snapshots/{id}.snap")
}

/// The manifest of a local repository, for tests that damage it.
#[cfg(test)]
pub(crate) fn snapshot_path(repo: &Path, id: &str) -> PathBuf {
    repo.join(snapshot_key(id))
}

struct Header {
    disk_count: u32,
    meta_len: u64,
    entry_count: u64,
}

impl Header {
    fn encode(&self) -> [u8; SNAP_HEADER_SIZE] {
        let mut b = [0u8; SNAP_HEADER_SIZE];
        FieldWriter::new(&mut b)
            .bytes(&SNAP_MAGIC)
            .u32(FORMAT_VERSION)
            .u32(self.disk_count)
            .u64(self.meta_len)
            .u64(self.entry_count)
            .finish();
        b
    }
}

/// Reads and checks the header and metadata, not the checksum. Returns the metadata and where each disk's
/// table starts.
pub(crate) fn read_meta(
    file: &dyn Object,
    path: &Path,
    expected_id: Option<&str>,
) -> Result<(SnapshotMeta, Vec<u64>)> {
    let len = file.len();
    let mut hb = [0u8; SNAP_HEADER_SIZE];
    read_exact_at(file, &mut hb, 0, path, "manifest header")?;
    let mut r = FieldReader::new(&hb);
    if r.bytes::<8>() != SNAP_MAGIC {
        return Err(RepoError::corrupt(
            path,
            "not a snapshot manifest (bad magic)",
        ));
    }
    let version = r.u32();
    if version != FORMAT_VERSION {
        return Err(RepoError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header = Header {
        disk_count: r.u32(),
        meta_len: r.u64(),
        entry_count: r.u64(),
    };
    if header.meta_len > MAX_META_LEN {
        return Err(RepoError::corrupt(
            path,
            format!("metadata length {} exceeds 16 MiB", header.meta_len),
        ));
    }
    let expected_len = header
        .entry_count
        .checked_mul(ENTRY_SIZE as u64)
        .and_then(|t| {
            t.checked_add(SNAP_HEADER_SIZE as u64 + header.meta_len + CHECKSUM_SIZE as u64)
        });
    if expected_len != Some(len) {
        return Err(RepoError::corrupt(
            path,
            format!(
                "truncated or extended: {len} bytes, the header ({} chunk entries) implies more or less",
                header.entry_count
            ),
        ));
    }
    let mut mb = vec![0u8; header.meta_len as usize];
    read_exact_at(file, &mut mb, SNAP_HEADER_SIZE as u64, path, "metadata")?;
    let meta: SnapshotMeta = serde_json::from_slice(&mb)
        .map_err(|e| RepoError::corrupt(path, format!("metadata is not valid: {e}")))?;
    if let Some(id) = expected_id
        && meta.id != id
    {
        return Err(RepoError::corrupt(
            path,
            format!("metadata names snapshot {:?}", meta.id),
        ));
    }
    if meta.disks.len() != header.disk_count as usize {
        return Err(RepoError::corrupt(
            path,
            format!(
                "header counts {} disks, metadata lists {}",
                header.disk_count,
                meta.disks.len()
            ),
        ));
    }
    let mut starts = Vec::with_capacity(meta.disks.len());
    let mut pos = SNAP_HEADER_SIZE as u64 + header.meta_len;
    let mut entries = 0u64;
    for d in &meta.disks {
        check_chunk_size(d.chunk_size)
            .map_err(|e| RepoError::corrupt(path, format!("disk {:?}: {e}", d.name)))?;
        starts.push(pos);
        entries = entries.saturating_add(d.chunk_count());
        pos = pos.saturating_add(d.chunk_count().saturating_mul(ENTRY_SIZE as u64));
    }
    if entries != header.entry_count {
        return Err(RepoError::corrupt(
            path,
            format!(
                "header counts {} chunk entries, the disks need {entries}",
                header.entry_count
            ),
        ));
    }
    Ok((meta, starts))
}

/// A committed snapshot opened for reading. `Send + Sync`: readers on several threads share one file handle
/// and use positioned reads.
#[derive(Debug)]
pub struct Snapshot {
    info: SnapshotInfo,
    meta: SnapshotMeta,
    path: PathBuf,
    file: Arc<dyn Object>,
    table_starts: Vec<u64>,
}

impl Snapshot {
    /// Opens a manifest and verifies its checksum (one streaming pass over the file).
    pub(crate) fn open(store: &dyn Store, key: &str, id: &str) -> Result<Snapshot> {
        let file = store.open(key)?;
        let path = &store.display_key(key);
        let (meta, table_starts) = read_meta(&*file, path, Some(id))?;
        check_trailing_checksum(&file, file.len(), path)?;
        Ok(Snapshot {
            info: SnapshotInfo::from_meta(&meta),
            meta,
            path: path.to_owned(),
            file,
            table_starts,
        })
    }

    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    pub fn id(&self) -> &str {
        &self.meta.id
    }

    pub fn disk_index(&self, name: &str) -> Option<usize> {
        self.meta.disks.iter().position(|d| d.name == name)
    }

    fn disk(&self, disk: usize) -> Result<&DiskMeta> {
        self.meta.disks.get(disk).ok_or_else(|| {
            RepoError::InvalidArgument(format!(
                "snapshot {} has {} disks, no disk #{disk}",
                self.meta.id,
                self.meta.disks.len()
            ))
        })
    }

    /// The entry of chunk `index` (chunk `index` covers bytes `index * chunk_size ..`).
    pub fn chunk(&self, disk: usize, index: u64) -> Result<ChunkRef> {
        let d = self.disk(disk)?;
        if index >= d.chunk_count() {
            return Err(RepoError::InvalidArgument(format!(
                "disk {} of snapshot {} has {} chunks, no chunk {index}",
                d.name,
                self.meta.id,
                d.chunk_count()
            )));
        }
        let mut b = [0u8; ENTRY_SIZE];
        let pos = self.table_starts[disk] + index * ENTRY_SIZE as u64;
        read_exact_at(&self.file, &mut b, pos, &self.path, "chunk entry")?;
        Ok(decode_ref(&b))
    }

    /// All entries of a disk in order, read through a 64 KiB buffer.
    pub fn chunks(&self, disk: usize) -> impl Iterator<Item = Result<ChunkRef>> + '_ {
        let (start, count) = match self.disk(disk) {
            Ok(d) => (self.table_starts[disk], d.chunk_count()),
            Err(e) => return TableReader::failed(e),
        };
        TableReader::new(&*self.file, &self.path, start, count)
    }

    /// Entries `first..first + count` of a disk, for copying an unchanged range from a parent.
    pub fn chunk_range(
        &self,
        disk: usize,
        first: u64,
        count: u64,
    ) -> Result<impl Iterator<Item = Result<ChunkRef>> + '_> {
        let d = self.disk(disk)?;
        if first
            .checked_add(count)
            .is_none_or(|end| end > d.chunk_count())
        {
            return Err(RepoError::InvalidArgument(format!(
                "chunks {first}..+{count} are outside disk {} ({} chunks)",
                d.name,
                d.chunk_count()
            )));
        }
        Ok(TableReader::new(
            &*self.file,
            &self.path,
            self.table_starts[disk] + first * ENTRY_SIZE as u64,
            count,
        ))
    }
}

/// Sequential reader of a chunk table with positioned reads (no shared cursor, so many can run at once).
pub(crate) struct TableReader<'a> {
    file: Option<&'a dyn Object>,
    path: &'a Path,
    pos: u64,
    remaining: u64,
    buf: Vec<u8>,
    at: usize,
    error: Option<RepoError>,
}

impl<'a> TableReader<'a> {
    pub(crate) fn new(
        file: &'a dyn Object,
        path: &'a Path,
        start: u64,
        count: u64,
    ) -> TableReader<'a> {
        TableReader {
            file: Some(file),
            path,
            pos: start,
            remaining: count,
            buf: Vec::new(),
            at: 0,
            error: None,
        }
    }

    fn failed(e: RepoError) -> TableReader<'a> {
        TableReader {
            file: None,
            path: Path::new(""),
            pos: 0,
            remaining: 0,
            buf: Vec::new(),
            at: 0,
            error: Some(e),
        }
    }
}

impl Iterator for TableReader<'_> {
    type Item = Result<ChunkRef>;

    fn next(&mut self) -> Option<Result<ChunkRef>> {
        if let Some(e) = self.error.take() {
            self.remaining = 0;
            self.buf.clear();
            return Some(Err(e));
        }
        if self.at == self.buf.len() {
            if self.remaining == 0 {
                return None;
            }
            let file = self.file?;
            let n = (self.remaining as usize).min(TABLE_BUFFER / ENTRY_SIZE);
            self.buf.resize(n * ENTRY_SIZE, 0);
            self.at = 0;
            if let Err(e) = read_exact_at(file, &mut self.buf, self.pos, self.path, "chunk table") {
                self.remaining = 0;
                self.buf.clear();
                return Some(Err(e));
            }
            self.pos += self.buf.len() as u64;
            self.remaining -= n as u64;
        }
        let r = decode_ref(&self.buf[self.at..self.at + ENTRY_SIZE]);
        self.at += ENTRY_SIZE;
        Some(Ok(r))
    }
}

/// Writes a complete manifest to `dest` (a temporary name) and fsyncs it: header, metadata, each disk's table
/// copied from its scratch file through a bounded buffer, checksum.
pub(crate) fn write_manifest(
    dest: &Path,
    meta: &SnapshotMeta,
    tables: &[(&File, &Path)],
) -> Result<()> {
    let json = serde_json::to_vec(meta).expect("metadata serializes");
    let header = Header {
        disk_count: u32::try_from(meta.disks.len())
            .map_err(|_| RepoError::InvalidArgument("more than 2^32 disks".into()))?,
        meta_len: json.len() as u64,
        entry_count: meta.disks.iter().map(DiskMeta::chunk_count).sum(),
    };
    if header.meta_len > MAX_META_LEN {
        return Err(RepoError::InvalidArgument(format!(
            "snapshot metadata is {} bytes, over 16 MiB",
            json.len()
        )));
    }
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .ctx("create manifest", dest)?;
    let mut out = HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
    out.write_all(&header.encode())
        .ctx("write manifest", dest)?;
    out.write_all(&json).ctx("write manifest", dest)?;
    let mut buf = vec![0u8; TABLE_BUFFER];
    for ((table, table_path), disk) in tables.iter().zip(&meta.disks) {
        let total = disk.chunk_count() * ENTRY_SIZE as u64;
        let mut pos = 0u64;
        while pos < total {
            let n = (total - pos).min(buf.len() as u64) as usize;
            read_exact_at(table, &mut buf[..n], pos, table_path, "scratch chunk table")?;
            out.write_all(&buf[..n]).ctx("write manifest", dest)?;
            pos += n as u64;
        }
    }
    let file = out
        .finish_with_checksum()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .ctx("write manifest", dest)?;
    file.sync_all().ctx("fsync manifest", dest)
}
