//! Pack files: immutable containers of encoded chunks, self-describing through a trailer.
//!
//! The byte layout is in the crate root ("Pack files"); the constants below are its sizes, checked at compile
//! time against the field lists of the encoders.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

use crate::config::{MAX_CHUNK_SIZE, MAX_STORED_LEN};
use crate::error::{RepoError, Result, read_exact_at};
use crate::format::{FORMAT_VERSION, FieldReader, FieldWriter};
use crate::store::{Object, Store};
use crate::{Codec, Digest, PackId};

pub(crate) const PACK_MAGIC: [u8; 8] = *b"BFLWPACK";
pub(crate) const PACK_FOOTER_MAGIC: [u8; 8] = *b"BFLWPEND";
pub(crate) const PACK_HEADER_SIZE: usize = 32;
pub(crate) const PACK_ENTRY_SIZE: usize = 56;
pub(crate) const PACK_FOOTER_SIZE: usize = 64;
const _: () = assert!(PACK_HEADER_SIZE == 8 + 4 + 4 + 16);
const _: () = assert!(PACK_ENTRY_SIZE == 32 + 8 + 4 + 4 + 1 + 7);
const _: () = assert!(PACK_FOOTER_SIZE == 8 + 8 + 4 + 4 + 32 + 8);
/// Bytes of the footer covered by the checksum (everything before it).
pub(crate) const FOOTER_HASHED: usize = 24;

/// One blob as listed in a pack trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackEntry {
    pub digest: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

impl PackEntry {
    pub(crate) fn encode(&self) -> [u8; PACK_ENTRY_SIZE] {
        let mut b = [0u8; PACK_ENTRY_SIZE];
        FieldWriter::new(&mut b)
            .bytes(self.digest.as_bytes())
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.raw_len)
            .u8(self.codec as u8)
            .zeros(7)
            .finish();
        b
    }

    fn decode(b: &[u8], path: &Path, data_end: u64) -> Result<PackEntry> {
        let mut r = FieldReader::new(b);
        let digest = Digest(r.bytes());
        let offset = r.u64();
        let stored_len = r.u32();
        let raw_len = r.u32();
        let codec_byte = r.u8();
        let codec = Codec::from_u8(codec_byte).ok_or_else(|| {
            RepoError::corrupt(
                path,
                format!("trailer entry for {digest} has unknown codec {codec_byte}"),
            )
        })?;
        let entry = PackEntry {
            digest,
            offset,
            stored_len,
            raw_len,
            codec,
        };
        check_blob_bounds(
            &entry.location_in(path),
            offset,
            stored_len,
            raw_len,
            codec,
            data_end,
            path,
        )?;
        Ok(entry)
    }

    fn location_in(&self, path: &Path) -> String {
        format!("{} offset {}", path.display(), self.offset)
    }
}

/// Checks a blob's position and lengths against the pack's data region and the format's limits, so no read or
/// allocation is driven by an absurd value from a damaged index or trailer.
pub(crate) fn check_blob_bounds(
    what: &str,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
    codec: Codec,
    data_end: u64,
    path: &Path,
) -> Result<()> {
    let end = offset.checked_add(u64::from(stored_len));
    if offset < PACK_HEADER_SIZE as u64 || end.is_none_or(|e| e > data_end) {
        return Err(RepoError::corrupt(
            path,
            format!(
                "{what}: blob of {stored_len} bytes at offset {offset} lies outside the data region ..{data_end}"
            ),
        ));
    }
    if raw_len > MAX_CHUNK_SIZE
        || stored_len > MAX_STORED_LEN
        || (codec == Codec::None && stored_len != raw_len)
    {
        return Err(RepoError::corrupt(
            path,
            format!(
                "{what}: impossible lengths (stored {stored_len}, raw {raw_len}, codec {codec:?})"
            ),
        ));
    }
    Ok(())
}

/// The parsed fixed parts of a pack: what a reader needs before trusting any offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackFooter {
    pub trailer_offset: u64,
    pub entry_count: u64,
    pub checksum: [u8; 32],
    raw: [u8; PACK_FOOTER_SIZE],
    header: [u8; PACK_HEADER_SIZE],
}

/// Reads and checks the header and footer of an open pack (two small reads).
pub(crate) fn read_frame(
    file: &dyn Object,
    path: &Path,
    expected: Option<PackId>,
) -> Result<PackFooter> {
    let len = file.len();
    let min = (PACK_HEADER_SIZE + PACK_FOOTER_SIZE) as u64;
    if len < min {
        return Err(RepoError::corrupt(
            path,
            format!("truncated: {len} bytes, a pack has at least {min}"),
        ));
    }
    let mut header = [0u8; PACK_HEADER_SIZE];
    read_exact_at(file, &mut header, 0, path, "pack header")?;
    let mut h = FieldReader::new(&header);
    if h.bytes::<8>() != PACK_MAGIC {
        return Err(RepoError::corrupt(path, "not a pack file (bad magic)"));
    }
    let version = h.u32();
    if version != FORMAT_VERSION {
        return Err(RepoError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    h.skip(4);
    let id = PackId(h.bytes());
    if let Some(expected) = expected
        && id != expected
    {
        return Err(RepoError::corrupt(
            path,
            format!("header names pack {id}, not {expected}"),
        ));
    }
    let mut raw = [0u8; PACK_FOOTER_SIZE];
    read_exact_at(
        file,
        &mut raw,
        len - PACK_FOOTER_SIZE as u64,
        path,
        "pack footer",
    )?;
    let mut r = FieldReader::new(&raw);
    let trailer_offset = r.u64();
    let entry_count = r.u64();
    let fversion = r.u32();
    r.skip(4);
    let checksum = r.bytes::<32>();
    let magic = r.bytes::<8>();
    if magic != PACK_FOOTER_MAGIC {
        return Err(RepoError::corrupt(
            path,
            "truncated or damaged: no pack footer at the end of the file",
        ));
    }
    if fversion != FORMAT_VERSION {
        return Err(RepoError::UnsupportedVersion {
            path: path.to_owned(),
            found: fversion,
            supported: FORMAT_VERSION,
        });
    }
    let expected_len = entry_count
        .checked_mul(PACK_ENTRY_SIZE as u64)
        .and_then(|t| t.checked_add(trailer_offset))
        .and_then(|t| t.checked_add(PACK_FOOTER_SIZE as u64));
    if trailer_offset < PACK_HEADER_SIZE as u64 || expected_len != Some(len) {
        return Err(RepoError::corrupt(
            path,
            format!(
                "footer (trailer at {trailer_offset}, {entry_count} entries) does not match the file length {len}"
            ),
        ));
    }
    Ok(PackFooter {
        trailer_offset,
        entry_count,
        checksum,
        raw,
        header,
    })
}

/// Everything a pack says about itself.
#[derive(Clone, Debug)]
pub struct PackTrailer {
    pub id: PackId,
    /// End of the blob region (= offset of the trailer).
    pub data_end: u64,
    pub entries: Vec<PackEntry>,
}

/// Reads a pack's trailer and checks its checksum: the pack's table of contents, from the pack alone. This is
/// what [`crate::Repository::rebuild_index`] and `verify` use. Memory is proportional to the pack's entry
/// count (56 bytes per blob), never to its data.
pub fn read_stored_pack_trailer(store: &dyn Store, key: &str) -> Result<PackTrailer> {
    trailer_of(&*store.open(key)?, &store.display_key(key))
}

/// [`read_stored_pack_trailer`] of a pack file on a local file system (a copy, or a local repository's).
pub fn read_pack_trailer(path: &Path) -> Result<PackTrailer> {
    trailer_of(&*crate::store::fs::open_local(path)?, path)
}

fn trailer_of(file: &dyn Object, path: &Path) -> Result<PackTrailer> {
    let expected = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok());
    let footer = read_frame(file, path, expected)?;
    let id = PackId(footer.header[16..32].try_into().expect("16 bytes"));
    let len = footer.entry_count as usize * PACK_ENTRY_SIZE;
    let mut trailer = vec![0u8; len];
    read_exact_at(
        &file,
        &mut trailer,
        footer.trailer_offset,
        path,
        "pack trailer",
    )?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&footer.header);
    hasher.update(&trailer);
    hasher.update(&footer.raw[..FOOTER_HASHED]);
    if hasher.finalize().as_bytes() != &footer.checksum {
        return Err(RepoError::corrupt(
            path,
            "trailer checksum mismatch: the table of contents is damaged",
        ));
    }
    let entries = trailer
        .chunks_exact(PACK_ENTRY_SIZE)
        .map(|b| PackEntry::decode(b, path, footer.trailer_offset))
        .collect::<Result<Vec<_>>>()?;
    Ok(PackTrailer {
        id,
        data_end: footer.trailer_offset,
        entries,
    })
}

/// `packs/XX/ID.pack`, XX being the first two hex digits: 256 directories keep each one small.
pub(crate) fn pack_key(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{hex}.pack", &hex[..2])
}

/// The file of a pack in a local repository, for tests that damage it.
#[cfg(test)]
pub(crate) fn pack_path(repo: &Path, id: &PackId) -> PathBuf {
    repo.join(pack_key(id))
}

/// An open pack file, checked once on open, kept in the repository's small cache for reads.
#[derive(Debug)]
pub(crate) struct PackHandle {
    pub file: Arc<dyn Object>,
    pub path: PathBuf,
    /// Where blobs end: the trailer's offset, or where the footer begins when the frame is damaged.
    pub data_end: u64,
}

impl PackHandle {
    /// Opens a pack for reading blobs at offsets the index gives. A pack whose header or footer is damaged
    /// stays readable: blobs are then bounded by the file's length instead of the trailer's offset. That is
    /// safe because every blob read is checked against its digest before its bytes are used, and it keeps
    /// a flipped byte in a 32-byte header from making every chunk of a 32 MiB pack unreadable. A pack that
    /// cannot be opened, or that is too short to hold a header and a footer, is still an error.
    pub(crate) fn open(store: &dyn Store, id: PackId) -> Result<PackHandle> {
        let key = pack_key(&id);
        let path = store.display_key(&key);
        let file = store.open(&key)?;
        let data_end = match read_frame(&*file, &path, Some(id)) {
            Ok(footer) => footer.trailer_offset,
            Err(e @ RepoError::Corrupt { .. }) | Err(e @ RepoError::UnsupportedVersion { .. }) => {
                let len = file.len();
                if len < (PACK_HEADER_SIZE + PACK_FOOTER_SIZE) as u64 {
                    return Err(e);
                }
                debug!(pack = %path.display(), error = %e, "Reading blobs of a pack with a damaged frame.");
                len - PACK_FOOTER_SIZE as u64
            }
            Err(e) => return Err(e),
        };
        Ok(PackHandle {
            file,
            path,
            data_end,
        })
    }

    /// Opens a pack without reading its header and footer: blobs are bounded by the object's length, as in
    /// a pack whose frame is damaged (and as safe: every blob read is checked against its digest). For
    /// readers of many blobs at once, to whom the frame would cost more reads than the blobs.
    pub(crate) fn open_unframed(store: &dyn Store, id: PackId) -> Result<PackHandle> {
        let key = pack_key(&id);
        let path = store.display_key(&key);
        let file = store.open(&key)?;
        let len = file.len();
        if len < (PACK_HEADER_SIZE + PACK_FOOTER_SIZE) as u64 {
            return Err(RepoError::corrupt(
                &path,
                format!("truncated: {len} bytes, too short for a pack's header and footer"),
            ));
        }
        Ok(PackHandle {
            file,
            path,
            data_end: len - PACK_FOOTER_SIZE as u64,
        })
    }
}

thread_local! {
    /// One zstd decompression context per thread: creating one per chunk would allocate its state every time.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Turns a stored blob back into exactly `raw_len` bytes of plaintext. zstd output is bounded by `raw_len`, so a
/// damaged blob cannot make it allocate more; any length other than `raw_len` is an error.
pub fn decode(codec: Codec, data: &[u8], raw_len: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_into(codec, data, raw_len, &mut out)?;
    Ok(out)
}

/// [`decode`] into a caller's buffer (resized to `raw_len`), for loops that decode many chunks.
pub fn decode_into(codec: Codec, data: &[u8], raw_len: u32, out: &mut Vec<u8>) -> Result<()> {
    let fail = |detail: String| RepoError::Decode {
        location: format!("{codec:?} blob of {} bytes", data.len()),
        detail,
    };
    if raw_len > MAX_CHUNK_SIZE {
        return Err(fail(format!(
            "raw length {raw_len} exceeds the 16 MiB chunk limit"
        )));
    }
    out.clear();
    match codec {
        Codec::None => {
            if data.len() != raw_len as usize {
                return Err(fail(format!(
                    "stored {} bytes but the raw length is {raw_len}",
                    data.len()
                )));
            }
            out.extend_from_slice(data);
        }
        Codec::Zstd => {
            // Decoded into the spare capacity: no zero-filling of a buffer about to be overwritten.
            out.reserve_exact(raw_len as usize);
            let n = DECOMPRESSOR.with(|cell| -> std::io::Result<usize> {
                let mut slot = cell.borrow_mut();
                let d = match slot.as_mut() {
                    Some(d) => d,
                    None => slot.insert(zstd::bulk::Decompressor::new()?),
                };
                d.decompress_to_buffer(data, out)
            });
            match n {
                Ok(n) if n == raw_len as usize => {}
                Ok(n) => return Err(fail(format!("decoded to {n} bytes, expected {raw_len}"))),
                Err(e) => return Err(fail(format!("zstd: {e} (or longer than {raw_len} bytes)"))),
            }
        }
        Codec::Lz4 => {
            out.resize(raw_len as usize, 0);
            match lz4_flex::block::decompress_into(data, out) {
                Ok(n) if n == raw_len as usize => {}
                Ok(n) => return Err(fail(format!("decoded to {n} bytes, expected {raw_len}"))),
                Err(e) => return Err(fail(format!("lz4: {e} (or longer than {raw_len} bytes)"))),
            }
        }
    }
    Ok(())
}

pub(crate) fn encode_header(id: PackId) -> [u8; PACK_HEADER_SIZE] {
    let mut b = [0u8; PACK_HEADER_SIZE];
    FieldWriter::new(&mut b)
        .bytes(&PACK_MAGIC)
        .u32(FORMAT_VERSION)
        .u32(0)
        .bytes(&id.0)
        .finish();
    b
}

/// The trailer entries of a pack whose trailer checksum, header or footer cannot be trusted: the candidates a
/// garbage collection checks when it salvages a damaged pack. Nothing here is trusted: each entry is only a
/// place to look, and the caller checks every blob read from it against the digest a snapshot references.
/// With an intact footer (magic, and lengths that match the file), its entries are read where it says;
/// otherwise the trailer is searched backwards from where the footer would start, entry by entry, as long
/// as the entries chain (each blob ends where the next begins) and decode; the scan stops at the blob at
/// offset 32. Entries that do not decode (unknown codec, out of bounds) are skipped. Memory is proportional
/// to the entry count the file can hold (56 bytes per blob). Only a pack that cannot be opened is an error.
pub(crate) fn salvage_entries(store: &dyn Store, key: &str) -> Result<Vec<PackEntry>> {
    let file = store.open(key)?;
    let path = &store.display_key(key);
    let len = file.len();
    let min = (PACK_HEADER_SIZE + PACK_FOOTER_SIZE) as u64;
    if len < min {
        return Ok(Vec::new());
    }
    let trailer_end = len - PACK_FOOTER_SIZE as u64;
    let mut raw = [0u8; PACK_FOOTER_SIZE];
    read_exact_at(&file, &mut raw, trailer_end, path, "pack footer")?;
    let mut r = FieldReader::new(&raw);
    let trailer_offset = r.u64();
    let entry_count = r.u64();
    let footer_fits = raw[PACK_FOOTER_SIZE - 8..] == PACK_FOOTER_MAGIC
        && trailer_offset >= PACK_HEADER_SIZE as u64
        && entry_count
            .checked_mul(PACK_ENTRY_SIZE as u64)
            .and_then(|t| t.checked_add(trailer_offset))
            == Some(trailer_end);
    if footer_fits {
        let mut trailer = vec![0u8; entry_count as usize * PACK_ENTRY_SIZE];
        read_exact_at(&file, &mut trailer, trailer_offset, path, "pack trailer")?;
        return Ok(trailer
            .chunks_exact(PACK_ENTRY_SIZE)
            .filter_map(|b| PackEntry::decode(b, path, trailer_offset).ok())
            .collect());
    }
    // No usable footer: walk back from its place. Each entry's blob ends where the next entry's begins, and
    // the first blob begins right after the header.
    let mut found: Vec<PackEntry> = Vec::new();
    let mut pos = trailer_end;
    let mut b = [0u8; PACK_ENTRY_SIZE];
    while pos >= PACK_HEADER_SIZE as u64 + PACK_ENTRY_SIZE as u64 {
        pos -= PACK_ENTRY_SIZE as u64;
        read_exact_at(&file, &mut b, pos, path, "pack trailer")?;
        let Ok(entry) = PackEntry::decode(&b, path, pos) else {
            break;
        };
        if found
            .last()
            .is_some_and(|next| entry.offset + u64::from(entry.stored_len) != next.offset)
        {
            break;
        }
        found.push(entry);
        if entry.offset == PACK_HEADER_SIZE as u64 {
            break;
        }
    }
    found.reverse();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_checks_lengths() {
        let plain = vec![7u8; 100_000];
        let z = zstd::bulk::compress(&plain, 1).unwrap();
        assert_eq!(decode(Codec::Zstd, &z, 100_000).unwrap(), plain);
        assert!(matches!(
            decode(Codec::Zstd, &z, 99_999),
            Err(RepoError::Decode { .. })
        ));
        assert!(matches!(
            decode(Codec::Zstd, &z, 100_001),
            Err(RepoError::Decode { .. })
        ));
        assert!(matches!(
            decode(Codec::Zstd, &z[..z.len() / 2], 100_000),
            Err(RepoError::Decode { .. })
        ));
        assert!(matches!(
            decode(Codec::None, &plain, 5),
            Err(RepoError::Decode { .. })
        ));
        assert!(decode(Codec::Zstd, b"garbage", 10).is_err());
        assert!(decode(Codec::Zstd, &z, MAX_CHUNK_SIZE + 1).is_err());
    }

    #[test]
    fn lz4_decode_checks_lengths() {
        let plain: Vec<u8> = b"backflow ".iter().copied().cycle().take(100_000).collect();
        let z = lz4_flex::block::compress(&plain);
        assert!(z.len() < plain.len() / 10);
        assert_eq!(decode(Codec::Lz4, &z, 100_000).unwrap(), plain);
        for (data, raw_len) in [
            (&z[..], 99_999),
            (&z[..], 100_001),
            (&z[..z.len() / 2], 100_000),
            (&b"garbage"[..], 10),
            (&z[..], MAX_CHUNK_SIZE + 1),
        ] {
            assert!(
                matches!(
                    decode(Codec::Lz4, data, raw_len),
                    Err(RepoError::Decode { .. })
                ),
                "{} bytes as {raw_len}",
                data.len()
            );
        }
        assert_eq!(Codec::from_u8(Codec::Lz4 as u8), Some(Codec::Lz4));
    }

    #[test]
    fn entry_round_trips() {
        let e = PackEntry {
            digest: Digest([9; 32]),
            offset: 32,
            stored_len: 10,
            raw_len: 10,
            codec: Codec::None,
        };
        let got = PackEntry::decode(&e.encode(), Path::new("p"), 42).unwrap();
        assert_eq!(got, e);
        assert!(PackEntry::decode(&e.encode(), Path::new("p"), 41).is_err());
    }
}
