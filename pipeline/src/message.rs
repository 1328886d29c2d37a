//! The messages that travel between stages.
//!
//! Every edge of a pipeline carries [`Message`] values; which variant (and which state of a chunk) a
//! stage consumes or produces is declared as a [`MessageType`], and the spec validator checks that
//! neighbouring stages agree before anything runs. The runtime never looks inside a message except
//! to count its payload bytes.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub use backflow_repository::{ChunkRef, Codec, Digest};

/// What a stage consumes or produces, as declared to the spec validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageType {
    /// A disk opened by a source: [`Message::Disk`].
    Disk,
    /// A chunk-aligned range of a disk with what to do with it: [`Message::Extent`].
    Extent,
    /// A chunk of plaintext (or a run of zero / unchanged chunks) without a digest yet.
    Chunk,
    /// A chunk whose BLAKE3 digest is known, payload plaintext or known to the repository.
    HashedChunk,
    /// A hashed chunk whose payload is encoded for storage (compressed or stored raw).
    CompressedChunk,
    /// A chunk whose plaintext was checked against its digest.
    VerifiedChunk,
    /// Anything: only for sinks that accept every message (such as `discard`).
    Any,
}

impl MessageType {
    /// Whether a stage declaring `self` as input accepts messages declared as `produced`.
    pub fn accepts(self, produced: MessageType) -> bool {
        self == MessageType::Any || self == produced
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageType::Disk => "disk",
            MessageType::Extent => "extent",
            MessageType::Chunk => "chunk",
            MessageType::HashedChunk => "hashed-chunk",
            MessageType::CompressedChunk => "compressed-chunk",
            MessageType::VerifiedChunk => "verified-chunk",
            MessageType::Any => "any",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Random access to the bytes of one disk: an image file, a block device, later an NBD export.
pub trait BlockSource: Send + Sync + fmt::Debug {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fills consecutive buffers from `offset`: `bufs[i]` receives the bytes right after those of
    /// `bufs[i - 1]`. A source that can keep several requests in flight (NBD) overrides this so that
    /// a run of chunks costs one round trip's latency instead of one per chunk; the default reads
    /// the buffers one after the other.
    fn read_chunks_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs.iter_mut() {
            self.read_exact_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// The allocated (possibly non-zero) ranges as `(offset, len)`, sorted and disjoint, when the
    /// source can tell cheaply; `None` means "assume everything is allocated".
    fn allocated(&self) -> io::Result<Option<Vec<(u64, u64)>>>;
}

/// Changed block tracking a source offers for one disk: a qcow2 persistent dirty bitmap, later a
/// libvirt checkpoint.
///
/// The chain state travels through the repository: the repository writer stores
/// [`next_state`](ChangeTracking::next_state) in the manifest with the snapshot, and the next run's
/// changed-block map hands the parent's stored state back to
/// [`changed_since`](ChangeTracking::changed_since). The source decides what a state means and when
/// it cannot be trusted; the map stage decides what to read.
pub trait ChangeTracking: Send + Sync + fmt::Debug {
    /// The state to record with the snapshot this run takes: what the next run will ask about.
    fn next_state(&self) -> serde_json::Value;

    /// The byte ranges written since the run that recorded `state`, sorted and disjoint, or why
    /// they cannot be known for certain (a full read follows). An error is an I/O failure of the
    /// source itself.
    fn changed_since(&self, state: &serde_json::Value) -> io::Result<Changes>;

    /// Called by the repository writer once the snapshot recording [`next_state`] is committed:
    /// only from then on may the source retire the state the parent recorded.
    ///
    /// [`next_state`]: ChangeTracking::next_state
    fn committed(&self, snapshot: &str);
}

/// The answer of [`ChangeTracking::changed_since`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Every byte written since, as `(offset, len)`; everything else is as it was.
    Since(Vec<(u64, u64)>),
    /// The tracking cannot vouch for the changes; the reason, for the run's warnings.
    Unknown(String),
}

/// A disk as opened by a source stage.
#[derive(Debug)]
pub struct DiskSource {
    /// The machine (VM or image set) the disk belongs to; one snapshot is taken per machine.
    pub vm: String,
    /// The disk's name in the manifest (`vda`, or an image's file stem).
    pub name: String,
    /// Where it came from, for messages and the manifest.
    pub location: PathBuf,
    pub reader: Arc<dyn BlockSource>,
    /// Changed block tracking the source offers for this disk, if any.
    pub tracking: Option<Arc<dyn ChangeTracking>>,
    /// The machine's definition (a libvirt domain XML) when the source knows it; the repository
    /// writer stores it with the snapshot, so that a restore can define the machine again.
    pub definition: Option<Arc<str>>,
}

impl DiskSource {
    /// The names a file-backed source gives its disk: `disk` as set, else the file name without its
    /// last extension (`/srv/web01.qcow2` -> `web01`); `vm` as set, else empty: the source's identity
    /// then comes from its canonical path when it opens ([`DiskSource::identity_for`]), so that two
    /// images of one file name in different directories never share restore points. Returns
    /// `(disk, vm)`.
    pub fn names_for(path: &Path, disk: String, vm: String) -> (String, String) {
        let disk = if disk.is_empty() {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "disk".to_owned())
        } else {
            disk
        };
        (disk, vm)
    }

    /// The identity (the snapshot's `vm`) and location of a file-backed source, once it opened: `vm`
    /// when the spec set one, else the canonical absolute path of `path`
    /// ([`backflow_repository::identity_for_path`]); and that canonical path, which the manifest
    /// records as the disk's location (the source column of `backflow snapshots`).
    pub fn identity_for(path: &Path, vm: &str) -> Result<(String, PathBuf), crate::StageError> {
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| crate::StageError::io(format!("resolving {}", path.display()), e))?;
        if !vm.is_empty() {
            return Ok((vm.to_owned(), canonical));
        }
        let identity = backflow_repository::identity_for_path(&canonical).map_err(|e| {
            crate::StageError::Config(format!(
                "{}: its path cannot identify it ({e}); give it a name (the spec variable `name`, \
                 option `vm`)",
                path.display()
            ))
        })?;
        Ok((identity, canonical))
    }

    /// [`DiskSource::names_for`], each name checked against the alphabet of disk and VM names
    /// ([`backflow_repository::check_disk_name`]): for the options of a file-backed source, so that a
    /// bad name is reported at the option that gave it (`disk`, `vm`, or `path` when the name comes
    /// from the file name).
    pub fn checked_names_for(
        path: &Path,
        disk: String,
        vm: String,
    ) -> Result<(String, String), crate::InvalidOption> {
        use backflow_repository::{check_disk_name, check_vm_name};
        let (disk_given, vm_given) = (!disk.is_empty(), !vm.is_empty());
        let (disk, vm) = Self::names_for(path, disk, vm);
        if let Err(e) = check_disk_name(&disk) {
            return Err(if disk_given {
                crate::InvalidOption::new("disk", e.to_string())
            } else {
                crate::InvalidOption::new(
                    "path",
                    format!(
                        "the file name gives the disk its name, but {e}; set `disk` to a valid name"
                    ),
                )
            });
        }
        if vm_given && let Err(e) = check_vm_name(&vm) {
            return Err(crate::InvalidOption::new("vm", e.to_string()));
        }
        Ok((disk, vm))
    }
}

/// The chunk table of the same disk in the parent snapshot, for dedup and for unchanged chunks.
pub trait ParentChunks: Send + Sync + fmt::Debug {
    /// The snapshot the table belongs to.
    fn snapshot_id(&self) -> &str;
    fn chunk_count(&self) -> u64;
    fn get(&self, index: u64) -> io::Result<ChunkRef>;

    /// Whether the parent's chunk at `index` must not be referenced: the repository marked its stored copies
    /// damaged and holds no healthy one, so the chunk is read and stored again even when it did not change.
    fn must_store_again(&self, _index: u64) -> bool {
        false
    }

    /// Entries `[first, first + out.len())`, for copying unchanged runs in bulk.
    fn get_range(&self, first: u64, out: &mut [ChunkRef]) -> io::Result<()> {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.get(first + i as u64)?;
        }
        Ok(())
    }
}

/// A disk as planned for this run: the source plus the chunk geometry and the parent to refer to.
#[derive(Debug)]
pub struct Disk {
    pub source: Arc<DiskSource>,
    /// Bytes per chunk: a multiple of 64 KiB, fixed per repository. The last chunk may be shorter.
    pub chunk_size: u32,
    /// The same disk in the previous snapshot of the same machine, when its geometry matches.
    pub parent: Option<Arc<dyn ParentChunks>>,
}

impl Disk {
    pub fn size(&self) -> u64 {
        self.source.reader.size()
    }

    pub fn chunk_count(&self) -> u64 {
        self.size().div_ceil(u64::from(self.chunk_size))
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u32 {
        let start = index * u64::from(self.chunk_size);
        (self.size() - start).min(u64::from(self.chunk_size)) as u32
    }

    /// Bytes of the chunks `[first, first + count)` (the last chunk may be short).
    pub fn run_len(&self, first: u64, count: u64) -> u64 {
        let chunk_size = u64::from(self.chunk_size);
        let size = self.size();
        ((first + count) * chunk_size)
            .min(size)
            .saturating_sub(first * chunk_size)
    }

    pub fn name(&self) -> &str {
        &self.source.name
    }
}

/// What the changed-block map says about a run of chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentClass {
    /// Must be read.
    Data,
    /// Known to read as zeros (a hole): stored as nothing.
    Zero,
    /// Unchanged since the parent snapshot: referenced from it, not read.
    Unchanged,
}

/// A chunk-aligned run of chunks `[first, first + count)` of one disk.
#[derive(Clone, Debug)]
pub struct Extent {
    pub disk: Arc<Disk>,
    pub first: u64,
    pub count: u64,
    pub class: ExtentClass,
}

/// What a chunk message carries.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Plaintext bytes of one chunk.
    Raw(Bytes),
    /// The chunk as stored in the repository: `data` decodes with `codec` to `raw_len` bytes.
    Encoded {
        codec: Codec,
        data: Bytes,
        raw_len: u32,
    },
    /// One chunk the repository already holds under the chunk's digest: nothing to store.
    Known,
    /// `count` all-zero chunks: stored as nothing, restored as holes.
    Zero { count: u64 },
    /// `count` chunks unchanged since the parent snapshot: their references are copied from it.
    Unchanged { count: u64 },
}

/// One chunk (or one run of data-less chunks) of a disk.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub disk: Arc<Disk>,
    /// Chunk index within the disk: the byte offset is `index * disk.chunk_size`.
    pub index: u64,
    /// BLAKE3 of the plaintext, once a deduplicator (or the repository reader) set it.
    pub digest: Option<Digest>,
    /// Set by a verifier once the plaintext was checked against `digest`.
    pub verified: bool,
    pub payload: Payload,
}

impl Chunk {
    pub fn offset(&self) -> u64 {
        self.index * u64::from(self.disk.chunk_size)
    }

    /// Bytes this message carries (what the statistics count).
    pub fn payload_len(&self) -> u64 {
        match &self.payload {
            Payload::Raw(b) => b.len() as u64,
            Payload::Encoded { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// Everything that can travel on an edge.
#[derive(Clone, Debug)]
pub enum Message {
    Disk(Arc<DiskSource>),
    Extent(Extent),
    Chunk(Chunk),
}

impl Message {
    /// Payload bytes, for statistics.
    pub fn payload_len(&self) -> u64 {
        match self {
            Message::Chunk(c) => c.payload_len(),
            _ => 0,
        }
    }

    /// A short name of the variant, for "unexpected message" errors.
    pub fn variant(&self) -> &'static str {
        match self {
            Message::Disk(_) => "disk",
            Message::Extent(_) => "extent",
            Message::Chunk(_) => "chunk",
        }
    }
}

/// Plain BLAKE3 of a plaintext chunk: the content address of an unencrypted repository. Stages that
/// hash for a repository use [`crate::RunContext::chunk_hasher`] (keyed when it is encrypted).
pub fn digest_of(data: &[u8]) -> Digest {
    Digest::from(*blake3::hash(data).as_bytes())
}

/// A disk that only has a size: for synthetic sources and for restores, where nothing is read
/// from the disk itself.
#[derive(Debug)]
pub struct SizeOnly(pub u64);

impl BlockSource for SizeOnly {
    fn size(&self) -> u64 {
        self.0
    }

    fn read_exact_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::other("this disk has no data to read"))
    }

    fn allocated(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_file_backed_sources_are_checked_where_they_come_from() {
        let named = |path: &str, disk: &str, vm: &str| {
            DiskSource::checked_names_for(Path::new(path), disk.into(), vm.into())
        };
        // No `vm`: the identity comes from the canonical path once the source opens.
        assert_eq!(
            named("/srv/web01.qcow2", "", "").unwrap(),
            ("web01".into(), String::new())
        );
        assert_eq!(
            named("/srv/x.raw", "vdb", "db-2.prod").unwrap(),
            ("vdb".into(), "db-2.prod".into())
        );
        let error = named("/srv/x.raw", "../x", "").unwrap_err();
        assert_eq!(error.option, "disk");
        assert!(error.message.contains("contains `/`"), "{}", error.message);
        let error = named("/srv/.hidden.raw", "", "").unwrap_err();
        assert_eq!(error.option, "path");
        assert!(error.message.contains("set `disk`"), "{}", error.message);
        let error = named("/srv/x.raw", "", "web\n01").unwrap_err();
        assert_eq!(error.option, "vm");
    }
}
