//! Index files: sorted digest -> location records, searched in place with `pread`.
//!
//! The byte layout and the reasons for it are in the crate root ("Index files"). A damaged (unsorted) file
//! can make a lookup miss; it can never make it loop, read out of bounds or allocate from a bad count.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{MAX_CHUNK_SIZE, MAX_STORED_LEN};
use crate::error::{IoContext, RepoError, Result, read_exact_at};
use crate::format::{CHECKSUM_SIZE, FORMAT_VERSION, FieldReader, FieldWriter, HashingWriter};
use crate::pack::PackEntry;
use crate::sort::{RUN_BUFFER, Sorter};
use crate::store::{Object, Store};
use crate::{ChunkLocation, Codec, Digest, PackId};

pub(crate) const INDEX_MAGIC: [u8; 8] = *b"BFLWIDX\0";
pub(crate) const INDEX_HEADER_SIZE: usize = 32;
pub(crate) const INDEX_RECORD_SIZE: usize = 56;
const FANOUT_SIZE: usize = 256 * 8;
const _: () = assert!(INDEX_HEADER_SIZE == 8 + 4 + 4 + 8 + 4 + 4);
const _: () = assert!(INDEX_RECORD_SIZE == 32 + 4 + 1 + 3 + 8 + 4 + 4);

/// Records a session's builder keeps in memory before it sorts them into a run file in scratch: 512 Ki records
/// are about 28 MiB. A full backup of a 2 TiB disk with 64 KiB chunks has 32 Mi new chunks; the runs are merged
/// as they accumulate (see `sort.rs`) and into the index file at commit.
pub(crate) const INDEX_SPILL_RECORDS: usize = 512 * 1024;

/// One index record with its pack as a position in the file's (or builder's) pack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    pub digest: Digest,
    pub pack: u32,
    pub codec: Codec,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl IndexRecord {
    fn encode(&self) -> [u8; INDEX_RECORD_SIZE] {
        let mut b = [0u8; INDEX_RECORD_SIZE];
        FieldWriter::new(&mut b)
            .bytes(self.digest.as_bytes())
            .u32(self.pack)
            .u8(self.codec as u8)
            .zeros(3)
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.raw_len)
            .finish();
        b
    }

    /// Decodes and checks what can be checked without the pack: codec, pack position, length limits.
    fn decode(b: &[u8; INDEX_RECORD_SIZE], pack_count: u32, path: &Path) -> Result<IndexRecord> {
        let mut r = FieldReader::new(b);
        let digest = Digest(r.bytes());
        let pack = r.u32();
        let codec_byte = r.u8();
        r.skip(3);
        let offset = r.u64();
        let stored_len = r.u32();
        let raw_len = r.u32();
        let codec = Codec::from_u8(codec_byte).ok_or_else(|| {
            RepoError::corrupt(
                path,
                format!("record for {digest} has unknown codec {codec_byte}"),
            )
        })?;
        if pack >= pack_count {
            return Err(RepoError::corrupt(
                path,
                format!("record for {digest} names pack #{pack} of {pack_count}"),
            ));
        }
        if raw_len > MAX_CHUNK_SIZE || stored_len > MAX_STORED_LEN {
            return Err(RepoError::corrupt(
                path,
                format!(
                    "record for {digest} has impossible lengths (stored {stored_len}, raw {raw_len})"
                ),
            ));
        }
        Ok(IndexRecord {
            digest,
            pack,
            codec,
            offset,
            stored_len,
            raw_len,
        })
    }
}

struct IndexHeader {
    record_count: u64,
    pack_count: u32,
}

impl IndexHeader {
    fn encode(&self) -> [u8; INDEX_HEADER_SIZE] {
        let mut b = [0u8; INDEX_HEADER_SIZE];
        FieldWriter::new(&mut b)
            .bytes(&INDEX_MAGIC)
            .u32(FORMAT_VERSION)
            .u32(INDEX_RECORD_SIZE as u32)
            .u64(self.record_count)
            .u32(self.pack_count)
            .u32(0)
            .finish();
        b
    }

    fn decode(b: &[u8; INDEX_HEADER_SIZE], path: &Path) -> Result<IndexHeader> {
        let mut r = FieldReader::new(b);
        if r.bytes::<8>() != INDEX_MAGIC {
            return Err(RepoError::corrupt(path, "not an index file (bad magic)"));
        }
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(RepoError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let record_size = r.u32();
        if record_size != INDEX_RECORD_SIZE as u32 {
            return Err(RepoError::corrupt(
                path,
                format!("record size {record_size}, expected {INDEX_RECORD_SIZE}"),
            ));
        }
        Ok(IndexHeader {
            record_count: r.u64(),
            pack_count: r.u32(),
        })
    }

    fn packs_offset(&self) -> u64 {
        INDEX_HEADER_SIZE as u64
    }

    fn fanout_offset(&self) -> u64 {
        self.packs_offset() + 16 * u64::from(self.pack_count)
    }

    fn records_offset(&self) -> u64 {
        self.fanout_offset() + FANOUT_SIZE as u64
    }

    /// Total file length the header implies, `None` on overflow (a damaged count).
    fn file_len(&self) -> Option<u64> {
        self.record_count
            .checked_mul(INDEX_RECORD_SIZE as u64)?
            .checked_add(self.records_offset())?
            .checked_add(CHECKSUM_SIZE as u64)
    }
}

fn decode_fanout(b: &[u8; FANOUT_SIZE], record_count: u64, path: &Path) -> Result<Box<[u64; 256]>> {
    let mut fanout = Box::new([0u64; 256]);
    let mut r = FieldReader::new(b);
    let mut prev = 0;
    for slot in fanout.iter_mut() {
        *slot = r.u64();
        if *slot < prev {
            return Err(RepoError::corrupt(path, "fanout table is not monotonic"));
        }
        prev = *slot;
    }
    if fanout[255] != record_count {
        return Err(RepoError::corrupt(
            path,
            format!(
                "fanout counts {} records, header says {record_count}",
                fanout[255]
            ),
        ));
    }
    Ok(fanout)
}

/// An index file opened for lookups.
#[derive(Debug)]
pub(crate) struct IndexFile {
    pub path: PathBuf,
    file: Arc<dyn Object>,
    pack_count: u32,
    packs_offset: u64,
    records_offset: u64,
    fanout: Box<[u64; 256]>,
}

impl IndexFile {
    /// Opens the index file `key` of the repository.
    pub(crate) fn open(store: &dyn Store, key: &str) -> Result<IndexFile> {
        IndexFile::over(store.open(key)?, &store.display_key(key))
    }

    /// Opens a local index file (a recovery index in scratch).
    pub(crate) fn open_local(path: &Path) -> Result<IndexFile> {
        IndexFile::over(crate::store::fs::open_local(path)?, path)
    }

    fn over(file: Arc<dyn Object>, path: &Path) -> Result<IndexFile> {
        let len = file.len();
        let mut hb = [0u8; INDEX_HEADER_SIZE];
        read_exact_at(&file, &mut hb, 0, path, "index header")?;
        let header = IndexHeader::decode(&hb, path)?;
        if header.file_len() != Some(len) {
            return Err(RepoError::corrupt(
                path,
                format!(
                    "truncated or extended: {len} bytes, header ({} records, {} packs) implies {}",
                    header.record_count,
                    header.pack_count,
                    header
                        .file_len()
                        .map_or("an overflow".to_owned(), |l| l.to_string())
                ),
            ));
        }
        let mut fb = [0u8; FANOUT_SIZE];
        read_exact_at(&file, &mut fb, header.fanout_offset(), path, "fanout table")?;
        let fanout = decode_fanout(&fb, header.record_count, path)?;
        Ok(IndexFile {
            path: path.to_owned(),
            file,
            pack_count: header.pack_count,
            packs_offset: header.packs_offset(),
            records_offset: header.records_offset(),
            fanout,
        })
    }

    fn record_at(&self, i: u64) -> Result<IndexRecord> {
        let mut b = [0u8; INDEX_RECORD_SIZE];
        read_exact_at(
            &self.file,
            &mut b,
            self.records_offset + i * INDEX_RECORD_SIZE as u64,
            &self.path,
            "record",
        )?;
        IndexRecord::decode(&b, self.pack_count, &self.path)
    }

    fn digest_at(&self, i: u64) -> Result<Digest> {
        let mut b = [0u8; 32];
        read_exact_at(
            &self.file,
            &mut b,
            self.records_offset + i * INDEX_RECORD_SIZE as u64,
            &self.path,
            "record",
        )?;
        Ok(Digest(b))
    }

    pub(crate) fn pack_id(&self, pack: u32) -> Result<PackId> {
        let mut b = [0u8; 16];
        read_exact_at(
            &self.file,
            &mut b,
            self.packs_offset + 16 * u64::from(pack),
            &self.path,
            "pack table",
        )?;
        Ok(PackId(b))
    }

    /// The first copy of `digest` that `accept` takes, in file order. A digest is stored twice when two
    /// writers raced, or when a later backup stored a chunk again after a copy was marked damaged and gc merged
    /// the files: all copies are adjacent. A lower-bound binary search within the digest's fanout bucket, then
    /// the equal records that follow. A damaged (unsorted) file can make this miss, never loop or read out of
    /// bounds.
    pub(crate) fn lookup_where(
        &self,
        digest: &Digest,
        mut accept: impl FnMut(&ChunkLocation) -> bool,
    ) -> Result<Option<ChunkLocation>> {
        let mut found = None;
        self.each_copy(digest, |loc| {
            if accept(&loc) {
                found = Some(loc);
                return true;
            }
            false
        })?;
        Ok(found)
    }

    /// Calls `f` with each copy of `digest` in file order until it returns true.
    fn each_copy(&self, digest: &Digest, mut f: impl FnMut(ChunkLocation) -> bool) -> Result<()> {
        let first = digest.0[0] as usize;
        let mut lo = if first == 0 {
            0
        } else {
            self.fanout[first - 1]
        };
        let end = self.fanout[first];
        let mut hi = end;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.digest_at(mid)? < *digest {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut i = lo;
        while i < end && self.digest_at(i)? == *digest {
            let r = self.record_at(i)?;
            let loc = ChunkLocation {
                pack: self.pack_id(r.pack)?,
                offset: r.offset,
                stored_len: r.stored_len,
                raw_len: r.raw_len,
                codec: r.codec,
            };
            if f(loc) {
                break;
            }
            i += 1;
        }
        Ok(())
    }

    /// The first copy of `digest` in this file.
    #[cfg(test)]
    pub(crate) fn lookup(&self, digest: &Digest) -> Result<Option<ChunkLocation>> {
        self.lookup_where(digest, |_| true)
    }

    /// A stream over this open file (which stays readable after a gc removed its name).
    pub(crate) fn stream(&self) -> Result<IndexStream> {
        IndexStream::over(self.file.clone(), &self.path, |_| Ok(()))
    }

    /// Reads the whole file through BLAKE3 and compares the trailing checksum.
    pub(crate) fn check_checksum(&self) -> Result<()> {
        crate::format::check_trailing_checksum(&self.file, self.file.len(), &self.path)
    }

    /// The pack table, read at once (16 bytes per pack).
    pub(crate) fn pack_ids(&self) -> Result<Vec<PackId>> {
        let mut b = vec![0u8; self.pack_count as usize * 16];
        read_exact_at(
            &self.file,
            &mut b,
            self.packs_offset,
            &self.path,
            "pack table",
        )?;
        Ok(b.chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("16 bytes")))
            .collect())
    }

    pub(crate) fn record_count(&self) -> u64 {
        self.fanout[255]
    }

    pub(crate) fn pack_count(&self) -> usize {
        self.pack_count as usize
    }

    /// A sequential reader of the records from record `first` on.
    pub(crate) fn reader_at(&self, first: u64) -> Result<PosReader> {
        Ok(PosReader {
            file: self.file.clone(),
            pos: self.records_offset + first * INDEX_RECORD_SIZE as u64,
        })
    }

    /// Decodes one record read from this file, with its pack id from `packs` (the pack table).
    pub(crate) fn decode_record(
        &self,
        b: &[u8; INDEX_RECORD_SIZE],
        packs: &[PackId],
    ) -> Result<(Digest, ChunkLocation)> {
        let r = IndexRecord::decode(b, self.pack_count, &self.path)?;
        let pack = match packs.get(r.pack as usize) {
            Some(id) => *id,
            None => self.pack_id(r.pack)?,
        };
        Ok((
            r.digest,
            ChunkLocation {
                pack,
                offset: r.offset,
                stored_len: r.stored_len,
                raw_len: r.raw_len,
                codec: r.codec,
            },
        ))
    }
}

/// Streams a whole index file in order, checking its checksum, sort order and every record, and calls `f` with
/// each record and its pack id. Memory: a read buffer and at most [`STREAM_PACK_TABLE_IN_MEMORY`] pack ids.
#[cfg(test)]
pub(crate) fn scan_index(path: &Path, mut f: impl FnMut(&IndexRecord, PackId)) -> Result<u64> {
    let mut stream = IndexStream::over(crate::store::fs::open_local(path)?, path, |_| Ok(()))?;
    while let Some((rec, pack)) = stream.next_record()? {
        f(&rec, pack);
    }
    Ok(stream.record_count)
}

/// Sequential reads through `pread`: streams over a descriptor that lookups share never move its offset.
#[derive(Debug)]
pub(crate) struct PosReader {
    file: Arc<dyn Object>,
    pos: u64,
}

impl Read for PosReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Pack tables up to this many entries (1 MiB) are kept in memory by [`IndexStream`]; larger ones are read
/// by position for each record, so a stream's memory does not grow with the repository.
const STREAM_PACK_TABLE_IN_MEMORY: u32 = 64 * 1024;

/// Reads an index file's records in order, one at a time. Checks every record, the sort order and each
/// record's fanout bucket as it goes, and the checksum once the last record has been read, so a consumer
/// that acts only after the stream ended never acts on a damaged file.
pub(crate) struct IndexStream {
    path: PathBuf,
    reader: BufReader<PosReader>,
    hasher: blake3::Hasher,
    record_count: u64,
    /// Records read so far; `u64::MAX` once the checksum has been checked.
    read: u64,
    fanout: Box<[u64; 256]>,
    pack_count: u32,
    packs: Vec<PackId>,
    /// The file again, for pack ids read by position when the table is large.
    table: Arc<dyn Object>,
    packs_offset: u64,
    prev: Option<Digest>,
}

impl IndexStream {
    /// Opens `path` and reads its header, pack table (each id goes to `on_pack` as it is read) and fanout.
    pub(crate) fn open(
        store: &dyn Store,
        key: &str,
        on_pack: impl FnMut(PackId) -> Result<()>,
    ) -> Result<IndexStream> {
        IndexStream::over(store.open(key)?, &store.display_key(key), on_pack)
    }

    /// [`IndexStream::open`] on a descriptor already open (`path` names it in errors).
    fn over(
        file: Arc<dyn Object>,
        path: &Path,
        mut on_pack: impl FnMut(PackId) -> Result<()>,
    ) -> Result<IndexStream> {
        let table = file.clone();
        let len = file.len();
        let mut reader = BufReader::with_capacity(RUN_BUFFER, PosReader { file, pos: 0 });
        let mut hasher = blake3::Hasher::new();
        let mut read = |buf: &mut [u8], what: &str, hasher: &mut blake3::Hasher| -> Result<()> {
            read_hashed(&mut reader, buf, what, hasher, path)
        };
        let mut hb = [0u8; INDEX_HEADER_SIZE];
        read(&mut hb, "header", &mut hasher)?;
        let header = IndexHeader::decode(&hb, path)?;
        if header.file_len() != Some(len) {
            return Err(RepoError::corrupt(
                path,
                format!("truncated or extended: {len} bytes do not match the header"),
            ));
        }
        let mut packs = Vec::new();
        for _ in 0..header.pack_count {
            let mut b = [0u8; 16];
            read(&mut b, "pack table", &mut hasher)?;
            on_pack(PackId(b))?;
            if header.pack_count <= STREAM_PACK_TABLE_IN_MEMORY {
                packs.push(PackId(b));
            }
        }
        let mut fb = [0u8; FANOUT_SIZE];
        read(&mut fb, "fanout", &mut hasher)?;
        let fanout = decode_fanout(&fb, header.record_count, path)?;
        Ok(IndexStream {
            path: path.to_owned(),
            reader,
            hasher,
            record_count: header.record_count,
            read: 0,
            fanout,
            pack_count: header.pack_count,
            packs,
            table,
            packs_offset: header.packs_offset(),
            prev: None,
        })
    }

    /// The next record and its pack id; `None` after the last one, once the checksum has been checked.
    pub(crate) fn next_record(&mut self) -> Result<Option<(IndexRecord, PackId)>> {
        if self.read == u64::MAX {
            return Ok(None);
        }
        if self.read == self.record_count {
            let mut sum = [0u8; CHECKSUM_SIZE];
            self.reader
                .read_exact(&mut sum)
                .map_err(|e| RepoError::io("read", &self.path, e))?;
            if self.hasher.finalize().as_bytes() != &sum {
                return Err(RepoError::corrupt(
                    &self.path,
                    "checksum mismatch: the index changed after it was written",
                ));
            }
            self.read = u64::MAX;
            return Ok(None);
        }
        let mut b = [0u8; INDEX_RECORD_SIZE];
        read_hashed(
            &mut self.reader,
            &mut b,
            "records",
            &mut self.hasher,
            &self.path,
        )?;
        let rec = IndexRecord::decode(&b, self.pack_count, &self.path)?;
        let i = self.read;
        let first = rec.digest.0[0] as usize;
        let bucket_start = if first == 0 {
            0
        } else {
            self.fanout[first - 1]
        };
        if self.prev.is_some_and(|p| p > rec.digest) || i < bucket_start || i >= self.fanout[first]
        {
            return Err(RepoError::corrupt(
                &self.path,
                format!("record {i} ({}) is out of order", rec.digest),
            ));
        }
        self.prev = Some(rec.digest);
        self.read += 1;
        let pack = match self.packs.get(rec.pack as usize) {
            Some(id) => *id,
            None => {
                let mut id = [0u8; 16];
                read_exact_at(
                    &self.table,
                    &mut id,
                    self.packs_offset + 16 * u64::from(rec.pack),
                    &self.path,
                    "pack table",
                )?;
                PackId(id)
            }
        };
        Ok(Some((rec, pack)))
    }
}

/// Reads exactly `buf` from `r` and adds it to `hasher`; a short file is corrupt ("truncated in the WHAT").
fn read_hashed(
    r: &mut impl Read,
    buf: &mut [u8],
    what: &str,
    hasher: &mut blake3::Hasher,
    path: &Path,
) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            RepoError::corrupt(path, format!("truncated in the {what}"))
        }
        _ => RepoError::io("read", path, e),
    })?;
    hasher.update(buf);
    Ok(())
}

/// Collects the entries of finished packs and writes them as one sorted index file. The records go through a
/// [`Sorter`], so memory is bounded by the spill size (default [`INDEX_SPILL_RECORDS`]), plus 16 bytes per pack
/// for the pack table.
#[derive(Debug)]
pub(crate) struct IndexBuilder {
    packs: Vec<PackId>,
    records: Sorter<INDEX_RECORD_SIZE>,
    /// Records per first byte of the digest: the fanout.
    counts: Box<[u64; 256]>,
}

impl IndexBuilder {
    pub(crate) fn new(scratch: PathBuf) -> IndexBuilder {
        IndexBuilder::with_spill(scratch, INDEX_SPILL_RECORDS)
    }

    pub(crate) fn with_spill(scratch: PathBuf, spill_at: usize) -> IndexBuilder {
        IndexBuilder {
            packs: Vec::new(),
            records: Sorter::with_buffer(
                &scratch,
                "index",
                false,
                spill_at.clamp(1, usize::MAX / INDEX_RECORD_SIZE) * INDEX_RECORD_SIZE,
            ),
            counts: Box::new([0; 256]),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }

    pub(crate) fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Adds a pack's entries. A digest may come twice (two writers raced to store it); both records are
    /// kept, and a lookup finds either.
    pub(crate) fn add_pack(&mut self, id: PackId, entries: &[PackEntry]) -> Result<()> {
        let pack = u32::try_from(self.packs.len())
            .map_err(|_| RepoError::InvalidArgument("more than 2^32 packs in one index".into()))?;
        self.packs.push(id);
        for e in entries {
            let record = IndexRecord {
                digest: e.digest,
                pack,
                codec: e.codec,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
            };
            self.records.push(record.encode())?;
            self.counts[e.digest.0[0] as usize] += 1;
        }
        Ok(())
    }

    /// Writes the complete index file to `dest` (a temporary name) and fsyncs it. The caller renames it.
    /// Records sort by their encoded bytes, whose first 32 are the digest: the byte order of a digest is its
    /// sort order.
    pub(crate) fn write(self, dest: &Path) -> Result<u64> {
        let mut fanout = [0u8; FANOUT_SIZE];
        let mut total = 0u64;
        {
            let mut w = FieldWriter::new(&mut fanout);
            for c in self.counts.iter() {
                total += c;
                w.u64(total);
            }
            w.finish();
        }
        let header = IndexHeader {
            record_count: total,
            pack_count: u32::try_from(self.packs.len()).expect("checked in add_pack"),
        };
        let mut records = self.records.finish()?;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(dest)
            .ctx("create index", dest)?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
        out.write_all(&header.encode()).ctx("write index", dest)?;
        for p in &self.packs {
            out.write_all(&p.0).ctx("write index", dest)?;
        }
        out.write_all(&fanout).ctx("write index", dest)?;
        while let Some(r) = records.next_record()? {
            out.write_all(&r).ctx("write index", dest)?;
        }
        debug_assert_eq!(
            Some(out.written() + CHECKSUM_SIZE as u64),
            header.file_len()
        );
        let file = out
            .finish_with_checksum()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .ctx("write index", dest)?;
        file.sync_all().ctx("fsync index", dest)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize, seed: u8) -> Vec<PackEntry> {
        (0..n)
            .map(|i| PackEntry {
                digest: Digest(*blake3::hash(&[seed, (i % 256) as u8, (i / 256) as u8]).as_bytes()),
                offset: 32 + i as u64 * 10,
                stored_len: 10,
                raw_len: 10,
                codec: Codec::None,
            })
            .collect()
    }

    fn build(spill: usize) -> (tempfile::TempDir, PathBuf, Vec<(PackId, Vec<PackEntry>)>) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = IndexBuilder::with_spill(dir.path().to_owned(), spill);
        let packs: Vec<_> = (0..5).map(|s| (PackId([s; 16]), entries(700, s))).collect();
        for (id, e) in &packs {
            b.add_pack(*id, e).unwrap();
        }
        // A digest stored twice (two writers raced): both copies are kept or deduplicated, lookups still work.
        b.add_pack(PackId([9; 16]), &packs[0].1[..3]).unwrap();
        let path = dir.path().join("x.idx");
        b.write(&path).unwrap();
        (dir, path, packs)
    }

    #[test]
    fn every_entry_is_found_with_and_without_spilling() {
        for spill in [usize::MAX, 1000, 256] {
            let (_dir, path, packs) = build(spill);
            let idx = IndexFile::open_local(&path).unwrap();
            for (id, es) in &packs {
                for e in es {
                    let loc = idx.lookup(&e.digest).unwrap().unwrap();
                    assert_eq!(loc.offset, e.offset);
                    assert!(loc.pack == *id || loc.pack == PackId([9; 16]));
                }
            }
            assert_eq!(idx.lookup(&Digest([0; 32])).unwrap(), None);
            assert_eq!(idx.lookup(&Digest([0xff; 32])).unwrap(), None);
            let mut n = 0;
            let count = scan_index(&path, |_, _| n += 1).unwrap();
            assert_eq!(n, count);
            assert!(count >= 3500, "spill {spill}: {count}");
            // No run files are left behind.
            let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
            assert_eq!(left.len(), 1);
        }
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let (_dir, path, packs) = build(usize::MAX);
        let good = std::fs::read(&path).unwrap();
        let probe = packs[2].1[5].digest;
        for cut in [0, 10, 31, 32, 100, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(
                matches!(IndexFile::open_local(&path), Err(RepoError::Corrupt { .. })),
                "cut {cut}"
            );
            assert!(scan_index(&path, |_, _| {}).is_err());
        }
        let mut rng = 12345u64;
        for _ in 0..200 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = (rng >> 33) as usize % good.len();
            let mut bad = good.clone();
            bad[pos] ^= 1 << (rng % 8);
            std::fs::write(&path, &bad).unwrap();
            assert!(
                scan_index(&path, |_, _| {}).is_err(),
                "flip at {pos} not detected"
            );
            if let Ok(idx) = IndexFile::open_local(&path) {
                let _ = idx.lookup(&probe);
            }
        }
    }
}
