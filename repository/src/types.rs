//! Value types shared with the pipeline: digests, chunk references, codecs.

use std::fmt;
use std::str::FromStr;

/// BLAKE3 digest of a plaintext chunk: the chunk's content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl From<[u8; 32]> for Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

/// Error of [`Digest::from_str`].
#[derive(Debug, thiserror::Error)]
#[error("a digest is 64 hexadecimal characters, got {0:?}")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(BadDigest(s.to_owned()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| BadDigest(s.to_owned()))?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| BadDigest(s.to_owned()))?;
        }
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a manifest records for one chunk of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkRef {
    /// The chunk reads as zeros: nothing is stored, restore leaves a hole.
    Zero,
    /// The chunk's plaintext has this digest.
    Data(Digest),
}

/// How a stored chunk is encoded. The numbers are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Codec {
    /// Stored as plaintext (incompressible data).
    None = 0,
    /// One zstd frame.
    Zstd = 1,
    /// One LZ4 block (block format: no frame, no size prefix; the entry's raw length is the size).
    Lz4 = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }
}

/// Name of a pack file: 128 random bits, written as 32 hex digits. Random rather than content-derived so that a
/// writer can name its pack before it knows the contents and two writers never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub(crate) fn random() -> PackId {
        PackId(rand::random())
    }

    pub fn to_hex(&self) -> String {
        crate::format::hex(&self.0)
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}

impl FromStr for PackId {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::format::parse_hex::<16>(s)
            .map(PackId)
            .ok_or_else(|| BadDigest(s.to_owned()))
    }
}

impl serde::Serialize for PackId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Where a committed chunk is stored, as the index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ChunkLocation {
    pub pack: PackId,
    /// Byte offset of the stored blob in the pack file.
    pub offset: u64,
    /// Length of the stored (encoded) blob.
    pub stored_len: u32,
    /// Length of the plaintext, which decoding must reproduce exactly.
    pub raw_len: u32,
    pub codec: Codec,
}

/// A chunk as read from a pack: still encoded; [`crate::decode`] turns it into plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub codec: Codec,
    pub data: Vec<u8>,
    pub raw_len: u32,
}

/// A file that could not be read at all.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DamagedFile {
    pub path: String,
    pub error: String,
}

/// What a repository holds and what it costs ([`crate::Repository::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Restore points.
    pub snapshots: u64,
    /// The restore points' disks' sizes, summed: what restoring every one of them would write.
    pub logical_bytes: u64,
    /// The pack files' size: the data as stored (deduplicated, compressed, encrypted).
    pub stored_bytes: u64,
    pub packs: u64,
    /// Chunk records in the index files (a chunk stored twice by concurrent backups counts twice
    /// until a gc).
    pub chunks: u64,
}

impl Usage {
    /// Logical over stored bytes, as Proxmox Backup Server's "deduplication factor" counts it: the
    /// data the restore points describe (holes and zeros included) for each byte stored; 0 when
    /// nothing is stored.
    pub fn deduplication_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}
