//! Byte-level helpers shared by the binary formats: little-endian fields in fixed-size headers, a writer that
//! hashes what it writes, and helpers for small objects and scratch files. The layouts themselves are documented in the crate root
//! and next to each header type.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::store::Store;

/// Version written into every binary header and into `config`; readers refuse anything else.
pub const FORMAT_VERSION: u32 = 1;

/// Reads fields front to back from a fixed-size header whose length was checked before.
pub(crate) struct FieldReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> FieldReader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        FieldReader { buf, pos: 0 }
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        out
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    pub(crate) fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Writes fields front to back into a fixed-size header; [`FieldWriter::finish`] checks that the layout filled
/// the buffer exactly, which the unit tests of every header exercise.
pub(crate) struct FieldWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> FieldWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        FieldWriter { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
        self
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf[self.pos..self.pos + n].fill(0);
        self.pos += n;
        self
    }

    pub(crate) fn finish(&self) {
        debug_assert_eq!(
            self.pos,
            self.buf.len(),
            "header layout does not fill its fixed size"
        );
    }
}

/// A writer that feeds everything it writes into a BLAKE3 hasher, so trailing checksums are computed in the
/// same pass that writes the file.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
            written: 0,
        }
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Appends the checksum of everything written so far (unhashed) and returns the inner writer.
    pub(crate) fn finish_with_checksum(mut self) -> io::Result<W> {
        let sum = *self.hasher.finalize().as_bytes();
        self.inner.write_all(&sum)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Size of the trailing BLAKE3 checksum of index files and manifests.
pub(crate) const CHECKSUM_SIZE: usize = 32;

/// Streams `len` bytes of `file` from `offset` through BLAKE3 with a bounded buffer and compares the result
/// with the 32 bytes that follow. Used for index files and manifests, whose bodies can be gigabytes.
pub(crate) fn check_trailing_checksum(
    file: &(impl crate::error::ReadAt + ?Sized),
    len: u64,
    path: &Path,
) -> Result<()> {
    let body = len.checked_sub(CHECKSUM_SIZE as u64).ok_or_else(|| {
        crate::RepoError::corrupt(
            path,
            format!("truncated: {len} bytes, too short for a checksum"),
        )
    })?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    while pos < body {
        let n = (body - pos).min(buf.len() as u64) as usize;
        crate::error::read_exact_at(file, &mut buf[..n], pos, path, "body")?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    let mut stored = [0u8; CHECKSUM_SIZE];
    crate::error::read_exact_at(file, &mut stored, body, path, "checksum")?;
    if hasher.finalize().as_bytes() != &stored {
        return Err(crate::RepoError::corrupt(
            path,
            "checksum mismatch: the contents changed after they were written",
        ));
    }
    Ok(())
}

/// Reads a small object whole, at most `max + 1` bytes of it (so a caller can tell "too large" without
/// reading a huge damaged file into memory); `None` when it does not exist.
pub(crate) fn read_bounded(store: &dyn Store, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
    let obj = match store.open(key) {
        Ok(o) => o,
        Err(crate::RepoError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let n = obj.len().min(max + 1) as usize;
    let mut buf = vec![0u8; n];
    crate::error::read_exact_at(&obj, &mut buf, 0, &store.display_key(key), "contents")?;
    Ok(Some(buf))
}

/// A local scratch file created for writing (`create_new`: scratch names are fresh).
pub(crate) fn create_scratch_file(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx("create", path)
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly `N` bytes of lower- or upper-case hex.
pub(crate) fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Sequential reads of a stored object through positioned reads (no shared cursor).
#[derive(Debug)]
pub(crate) struct ObjectReader {
    obj: std::sync::Arc<dyn crate::store::Object>,
    pos: u64,
}

impl ObjectReader {
    pub(crate) fn new(obj: std::sync::Arc<dyn crate::store::Object>, pos: u64) -> ObjectReader {
        ObjectReader { obj, pos }
    }
}

impl io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.obj.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
