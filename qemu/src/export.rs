//! A [`BlockSource`] over an NBD export, read through a [`ClientPool`].
//!
//! Every connection of the pool negotiates `base:allocation` (so that [`BlockSource::allocated`]
//! can skip what reads as zeros) and any dirty bitmaps asked for. Errors name the export by a label
//! the caller chooses (the image behind a private server, or the export's NBD URI), since the
//! socket of a private server means nothing to the operator.

use std::io;
use std::path::PathBuf;

use backflow_nbd::{Client, NbdError, STATE_DIRTY, STATE_ZERO};
use backflow_pipeline::BlockSource;

use crate::pool::{ClientPool, NbdAddress};

/// The meta context whose flags say which ranges read as zeros.
pub const ALLOCATION_CONTEXT: &str = "base:allocation";

#[derive(Debug)]
pub struct NbdExport {
    pool: ClientPool,
    /// What error messages call the export: `image PATH`, or an NBD URI.
    label: String,
    size: u64,
}

impl NbdExport {
    /// Connects once to the unix socket `socket`, to learn the size and check `base:allocation`
    /// is offered; the connection stays in the pool. Errors name `image`.
    pub fn open(
        socket: PathBuf,
        export: &str,
        image: PathBuf,
        max_connections: usize,
    ) -> io::Result<NbdExport> {
        Self::open_with_bitmaps(socket, export, image, max_connections, &[])
    }

    /// Like [`open`](Self::open), also negotiating `qemu:dirty-bitmap:NAME` for each of `bitmaps`
    /// (every one must be granted).
    pub fn open_with_bitmaps(
        socket: PathBuf,
        export: &str,
        image: PathBuf,
        max_connections: usize,
        bitmaps: &[String],
    ) -> io::Result<NbdExport> {
        Self::connect(
            NbdAddress::Unix(socket),
            export,
            format!("image {}", image.display()),
            max_connections,
            bitmaps,
        )
    }

    /// Connects once to `export` at `address` (a unix socket or TCP), to learn the size and check
    /// that `base:allocation` and every one of `bitmaps` are granted; the connection stays in the
    /// pool of at most `max_connections`. Later errors start with `label`; this one names the
    /// endpoint only, the caller says what it was opening.
    pub fn connect(
        address: NbdAddress,
        export: &str,
        label: String,
        max_connections: usize,
        bitmaps: &[String],
    ) -> io::Result<NbdExport> {
        let mut contexts = vec![ALLOCATION_CONTEXT.to_owned()];
        contexts.extend(bitmaps.iter().map(|b| bitmap_context(b)));
        let contexts: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let first = address.connect(export, &contexts).map_err(to_io)?;
        Ok(NbdExport {
            size: first.size(),
            pool: ClientPool::with_address(
                address,
                export,
                &contexts,
                max_connections,
                Some(first),
            ),
            label,
        })
    }

    /// What error messages call the export.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The pool the export reads through.
    pub fn pool(&self) -> &ClientPool {
        &self.pool
    }

    /// The ranges a dirty bitmap exported by the server marks dirty, coalesced.
    pub fn dirty_ranges(&self, bitmap: &str) -> io::Result<Vec<(u64, u64)>> {
        if self.size == 0 {
            return Ok(Vec::new());
        }
        let context = bitmap_context(bitmap);
        let extents = self.with_client(|c| c.block_status(0, self.size, &context))?;
        Ok(coalesce(
            extents
                .iter()
                .filter(|e| e.flags & STATE_DIRTY != 0)
                .map(|e| (e.offset, e.len)),
        ))
    }

    /// [`ClientPool::with_client`], its error named after the export.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> backflow_nbd::Result<T>,
    ) -> io::Result<T> {
        self.pool
            .with_client(f)
            .map_err(|e| with_label(&self.label, e))
    }

    /// An error for a read of `len` bytes at `offset` that would pass the end, if it would.
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: read of {len} bytes at {offset} past the end ({} bytes)",
                    self.label, self.size
                ),
            ));
        }
        Ok(())
    }
}

/// The meta context name of a persistent dirty bitmap.
pub fn bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// `e` as an I/O error whose message starts with `label`.
fn with_label(label: &str, e: NbdError) -> io::Error {
    io::Error::new(io_kind(&e), format!("{label}: {e}"))
}

fn to_io(e: NbdError) -> io::Error {
    io::Error::new(io_kind(&e), e)
}

/// The kind of the underlying I/O error, if `e` is one.
fn io_kind(e: &NbdError) -> io::ErrorKind {
    match e {
        NbdError::Io { source, .. } => source.kind(),
        _ => io::ErrorKind::Other,
    }
}

impl BlockSource for NbdExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.with_client(|c| c.read_at(offset, buf))?;
        backflow_pipeline::hooks::mid_transfer();
        Ok(())
    }

    /// All buffers on one connection, with several requests in flight
    /// ([`Client::read_vectored_at`]).
    fn read_chunks_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let len = bufs
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(b.len() as u64))
            .unwrap_or(u64::MAX);
        self.check_range(offset, len)?;
        self.with_client(|c| c.read_vectored_at(offset, bufs))?;
        backflow_pipeline::hooks::mid_transfer();
        Ok(())
    }

    /// Ranges whose `base:allocation` flags lack `NBD_STATE_ZERO`. Data that reads as zeros
    /// (zero clusters, unallocated ones) is left out whether or not it is a hole: reading it
    /// would only find zeros.
    fn allocated(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        if self.size == 0 {
            return Ok(Some(Vec::new()));
        }
        let extents = self.with_client(|c| c.block_status(0, self.size, ALLOCATION_CONTEXT))?;
        Ok(Some(non_zero_ranges(
            extents.iter().map(|e| (e.offset, e.len, e.flags)),
        )))
    }
}

/// Coalesced `(offset, len)` of the extents without [`STATE_ZERO`].
fn non_zero_ranges(extents: impl Iterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64)> {
    coalesce(
        extents
            .filter(|&(_, _, flags)| flags & STATE_ZERO == 0)
            .map(|(offset, len, _)| (offset, len)),
    )
}

/// Sorted ranges with neighbours merged and empty ones dropped.
fn coalesce(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in ranges {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += len,
            _ => out.push((offset, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{EXPORT_NAME, QemuNbdServer, ServerConfig, ServerDir};
    use backflow_nbd::STATE_HOLE;

    /// Reads through a real read-only `qemu-nbd` (needs it on the PATH): several buffers in one
    /// call read what one read each does, and a read past the end fails naming the label.
    #[test]
    fn chunks_read_in_one_call_are_the_exports_bytes() {
        const SIZE: u64 = 1 << 20;
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.raw");
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let dir = ServerDir::create(tmp.path()).unwrap();
        let server =
            QemuNbdServer::start(&dir, &ServerConfig::read_only(&image, "raw", 2)).unwrap();
        let export = NbdExport::connect(
            NbdAddress::Unix(server.socket().to_owned()),
            EXPORT_NAME,
            "image disk.raw".into(),
            2,
            &[],
        )
        .unwrap();
        assert_eq!(export.size(), SIZE);

        let lens = [4096usize, 100_000, 1, 65536];
        let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        export.read_chunks_at(&mut slices, 777).unwrap();
        let mut at = 777usize;
        for buf in &bufs {
            assert_eq!(buf.as_slice(), &data[at..at + buf.len()]);
            at += buf.len();
        }
        assert_eq!(export.pool().open_connections(), 1);

        let mut tail = [vec![0u8; 10], vec![0u8; 10]];
        let mut slices: Vec<&mut [u8]> = tail.iter_mut().map(Vec::as_mut_slice).collect();
        let err = export.read_chunks_at(&mut slices, SIZE - 15).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().starts_with("image disk.raw: "), "{err}");
        drop(export);
        dir.stop_and_remove().unwrap();
    }

    #[test]
    fn zero_ranges_are_not_allocated() {
        let extents = [
            (0, 10, STATE_HOLE | STATE_ZERO),
            (10, 5, 0),
            (15, 5, STATE_HOLE),
            (20, 5, STATE_ZERO),
            (25, 5, 0),
        ];
        assert_eq!(
            non_zero_ranges(extents.into_iter()),
            vec![(10, 10), (25, 5)]
        );
    }
}
