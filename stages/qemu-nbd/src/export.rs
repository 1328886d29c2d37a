//! A [`BlockSource`] over an NBD export, with a small pool of connections.
//!
//! An NBD [`Client`] serves one request at a time (`&mut self`), while the reader stage reads
//! with several workers: each read takes an idle client, or opens one while fewer than
//! `connections` are open, or waits for one to come back. A client whose request failed is
//! dropped, not returned, since its stream may be out of step.

use std::io;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use backflow_nbd::{Client, NbdError, STATE_DIRTY, STATE_ZERO};
use backflow_pipeline::BlockSource;

/// The meta context whose flags say which ranges read as zeros.
pub const ALLOCATION_CONTEXT: &str = "base:allocation";

#[derive(Debug)]
pub struct NbdExport {
    socket: PathBuf,
    export: String,
    /// The image behind the export, for error messages.
    image: PathBuf,
    size: u64,
    /// Meta contexts every connection negotiates: `base:allocation` first, then dirty bitmaps.
    contexts: Vec<String>,
    max_connections: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<Client>,
    /// Clients in existence: idle, lent out, or being connected.
    open: usize,
}

impl NbdExport {
    /// Connects once, to learn the size and check `base:allocation` is offered; the connection
    /// stays in the pool.
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
        let mut contexts = vec![ALLOCATION_CONTEXT.to_owned()];
        contexts.extend(bitmaps.iter().map(|b| bitmap_context(b)));
        let first = connect(&socket, export, &contexts).map_err(to_io)?;
        Ok(NbdExport {
            socket,
            export: export.to_owned(),
            image,
            size: first.size(),
            contexts,
            max_connections: max_connections.max(1),
            pool: Mutex::new(Pool {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
        })
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

    /// Runs `f` on a pooled client; the client goes back to the pool only if `f` succeeded.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> backflow_nbd::Result<T>,
    ) -> io::Result<T> {
        let mut client = self.take()?;
        match f(&mut client) {
            Ok(value) => {
                self.pool.lock().unwrap().idle.push(client);
                self.returned.notify_one();
                Ok(value)
            }
            Err(e) => {
                drop(client);
                self.forget_one();
                Err(self.context(e))
            }
        }
    }

    fn take(&self) -> io::Result<Client> {
        let mut pool = self.pool.lock().unwrap();
        loop {
            if let Some(client) = pool.idle.pop() {
                return Ok(client);
            }
            if pool.open < self.max_connections {
                pool.open += 1;
                drop(pool);
                return connect(&self.socket, &self.export, &self.contexts).map_err(|e| {
                    self.forget_one();
                    self.context(e)
                });
            }
            pool = self.returned.wait(pool).unwrap();
        }
    }

    fn forget_one(&self) {
        self.pool.lock().unwrap().open -= 1;
        self.returned.notify_one();
    }

    fn context(&self, e: NbdError) -> io::Error {
        let kind = match &e {
            NbdError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("image {}: {e}", self.image.display()))
    }
}

/// The meta context name of a persistent dirty bitmap.
pub fn bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

fn connect(
    socket: &std::path::Path,
    export: &str,
    contexts: &[String],
) -> backflow_nbd::Result<Client> {
    let contexts: Vec<&str> = contexts.iter().map(String::as_str).collect();
    Client::connect_unix(socket, export, &contexts)
}

fn to_io(e: NbdError) -> io::Error {
    io::Error::other(e)
}

impl BlockSource for NbdExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "image {}: read of {} bytes at {offset} past the end ({} bytes)",
                    self.image.display(),
                    buf.len(),
                    self.size
                ),
            ));
        }
        self.with_client(|c| c.read_at(offset, buf))
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
    use backflow_nbd::STATE_HOLE;

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
