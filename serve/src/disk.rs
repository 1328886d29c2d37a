//! One disk of a restore point as an [`Export`]: its chunk table read in pages, zero chunks
//! answered without reading, data chunks from the shared [`ChunkCache`] or the repository (every
//! one verified against its digest), and read-ahead once reads run sequentially.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use backflow_nbd::server::{Export, ExportError, Piece};
use backflow_nbd::{Extent, STATE_HOLE, STATE_ZERO};
use backflow_repository::{ChunkLocation, ChunkRef, Digest, Repository, Snapshot};
use bytes::Bytes;
use tracing::{debug, warn};

use crate::cache::{ChunkCache, Claim};

/// Chunk-table entries read at a time.
const TABLE_PAGE: u64 = 4096;

/// Table pages kept per disk (each [`TABLE_PAGE`] entries of some 40 bytes: 10 MiB at most).
const TABLE_PAGES: usize = 64;

/// Streams of sequential reads followed at once per disk (a multi-conn reader is one or several).
const STREAMS: usize = 16;

/// A read starting at most this far past where a stream ended continues it: requests of several
/// connections arrive slightly out of order.
const STREAM_SLACK: u64 = 8 << 20;

/// The most bytes of a pack one read-ahead read takes (neighbouring chunks of one pack join while
/// the bytes between them are at most [`SPAN_GAP`]): object storage then serves the read-ahead
/// with a few large ranged GETs.
pub const SPAN_MAX: u64 = 8 << 20;
/// The most bytes between two chunks of one read-ahead span (read and dropped).
pub const SPAN_GAP: u64 = 1 << 20;

/// Work for the read-ahead threads: chunks `first..first + count` of a disk.
pub(crate) struct Job {
    pub(crate) disk: Arc<DiskShared>,
    pub(crate) first: u64,
    pub(crate) count: u64,
}

pub(crate) struct DiskShared {
    pub(crate) repo: Repository,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) chunk_size: u64,
    pub(crate) cache: Arc<ChunkCache>,
    pages: Mutex<Pages>,
}

#[derive(Default)]
struct Pages {
    pages: HashMap<u64, Arc<Vec<ChunkRef>>>,
    order: VecDeque<u64>,
}

impl DiskShared {
    pub(crate) fn new(
        repo: Repository,
        snapshot: Arc<Snapshot>,
        index: usize,
        cache: Arc<ChunkCache>,
    ) -> DiskShared {
        let meta = &snapshot.meta().disks[index];
        DiskShared {
            name: meta.name.clone(),
            size: meta.size,
            chunk_size: u64::from(meta.chunk_size),
            repo,
            snapshot: snapshot.clone(),
            index,
            cache,
            pages: Mutex::new(Pages::default()),
        }
    }

    fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The table page holding entry `page * TABLE_PAGE`.
    fn page(&self, page: u64) -> Result<Arc<Vec<ChunkRef>>, ExportError> {
        if let Some(p) = self.lock_pages().pages.get(&page) {
            return Ok(p.clone());
        }
        let first = page * TABLE_PAGE;
        let count = TABLE_PAGE.min(self.chunk_count() - first);
        let entries = self
            .snapshot
            .chunk_range(self.index, first, count)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                warn!(disk = %self.name, snapshot = self.snapshot.id(), first, error = %e,
                    "The chunk table cannot be read.");
                ExportError::io(format!("disk {}: chunk table: {e}", self.name))
            })?;
        let entries = Arc::new(entries);
        let mut pages = self.lock_pages();
        if pages.pages.len() >= TABLE_PAGES
            && let Some(old) = pages.order.pop_front()
        {
            pages.pages.remove(&old);
        }
        pages.order.push_back(page);
        pages.pages.insert(page, entries.clone());
        Ok(entries)
    }

    fn lock_pages(&self) -> std::sync::MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries `first..first + count` with their chunk numbers.
    fn entries(&self, first: u64, count: u64) -> Result<Vec<(u64, ChunkRef)>, ExportError> {
        let mut out = Vec::with_capacity(count as usize);
        let mut i = first;
        while i < first + count {
            let page = self.page(i / TABLE_PAGE)?;
            let start = i % TABLE_PAGE;
            let n = (TABLE_PAGE - start).min(first + count - i);
            for k in 0..n {
                out.push((i + k, page[(start + k) as usize]));
            }
            i += n;
        }
        Ok(out)
    }

    /// The verified plaintext of chunk `index` (digest `digest`).
    fn chunk(&self, index: u64, digest: &Digest) -> Result<Bytes, ExportError> {
        self.cache.get_or_load(digest, || {
            self.repo.load_chunk(digest).map(Bytes::from).map_err(|e| {
                let offset = index * self.chunk_size;
                warn!(disk = %self.name, snapshot = self.snapshot.id(), offset, chunk = %digest,
                    error = %e, "A chunk cannot be read or does not verify; the read fails with EIO.");
                ExportError::io(format!(
                    "disk {} offset {offset}: chunk {digest} cannot be read: {e}",
                    self.name
                ))
            })
        })
    }

    /// Reads chunks ahead into the cache: those neither cached nor being loaded, located, grouped
    /// by pack into spans, each span read at once, every chunk decoded and verified. A chunk that
    /// fails here is left to the read that wants it, which reads it alone (through every copy)
    /// and reports it.
    pub(crate) fn read_ahead(&self, first: u64, count: u64) {
        let Ok(entries) = self.entries(first, count.min(self.chunk_count() - first)) else {
            return;
        };
        let mut claims: Vec<(ChunkLocation, Claim)> = Vec::new();
        for (_, entry) in entries {
            let ChunkRef::Data(digest) = entry else {
                continue;
            };
            let Some(claim) = self.cache.try_claim(&digest) else {
                continue;
            };
            match self.repo.locate(&digest) {
                Ok(Some(loc)) => claims.push((loc, claim)),
                _ => drop(claim),
            }
        }
        claims.sort_by_key(|(loc, _)| (loc.pack, loc.offset));
        let mut rest = claims.into_iter().peekable();
        while let Some(first) = rest.next() {
            let mut span = vec![first];
            while let Some((next, _)) = rest.peek() {
                let (last, _) = span.last().expect("not empty");
                let (start, _) = &span[0];
                let end = last.offset + u64::from(last.stored_len);
                let apart = next.offset >= end;
                if next.pack != last.pack
                    || !apart
                    || next.offset - end > SPAN_GAP
                    || next.offset + u64::from(next.stored_len) - start.offset > SPAN_MAX
                {
                    break;
                }
                span.push(rest.next().expect("peeked"));
            }
            self.read_span(span);
        }
    }

    fn read_span(&self, span: Vec<(ChunkLocation, Claim)>) {
        let locs: Vec<ChunkLocation> = span.iter().map(|(l, _)| *l).collect();
        let mut claims: Vec<Option<Claim>> = span.into_iter().map(|(_, c)| Some(c)).collect();
        let hasher = self.repo.chunk_hasher();
        let result = self.repo.read_span(&locs, |i, stored| {
            let loc = &locs[i];
            let Some(claim) = claims[i].take() else {
                return true;
            };
            match backflow_repository::decode(loc.codec, &stored, loc.raw_len) {
                Ok(plain) if hasher.digest(&plain) == *claim.digest() => {
                    self.cache
                        .stats()
                        .prefetched
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    claim.fulfill(Bytes::from(plain));
                }
                // Left to the read that wants it (it tries every copy and reports).
                _ => debug!(disk = %self.name, chunk = %claim.digest(), pack = %loc.pack,
                    "A chunk read ahead does not decode or verify."),
            }
            true
        });
        if let Err(e) = result {
            debug!(disk = %self.name, error = %e, "A read-ahead span failed; reads load its chunks alone.");
        }
    }
}

/// A disk of a served restore point.
pub struct DiskExport {
    shared: Arc<DiskShared>,
    /// Where the read-ahead threads take their work; full: the read-ahead is skipped.
    read_ahead: crossbeam_channel::Sender<Job>,
    /// Bytes read ahead of a sequential stream.
    window: u64,
    /// Sequential streams: (where the last read ended, how far ahead was scheduled).
    streams: Mutex<VecDeque<(u64, u64)>>,
}

impl DiskExport {
    pub(crate) fn new(
        shared: Arc<DiskShared>,
        read_ahead: crossbeam_channel::Sender<Job>,
        window: u64,
    ) -> DiskExport {
        DiskExport {
            shared,
            read_ahead,
            window,
            streams: Mutex::new(VecDeque::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Follows sequential streams and hands the read-ahead threads the chunks of the window
    /// ahead of one, half a window at a time.
    fn note_read(&self, offset: u64, end: u64) {
        if self.window == 0 {
            return;
        }
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let hit = streams
            .iter()
            .position(|(last, _)| offset >= *last && offset - *last <= STREAM_SLACK);
        let Some(i) = hit else {
            if streams.len() >= STREAMS {
                streams.pop_front();
            }
            streams.push_back((end, end));
            return;
        };
        let (last, ahead) = streams[i];
        let end = end.max(last);
        let mut ahead = ahead.max(end);
        if ahead < end + self.window / 2 && ahead < self.shared.size {
            let target = (end + self.window).min(self.shared.size);
            let cs = self.shared.chunk_size;
            let first = ahead / cs;
            let last_chunk = target.div_ceil(cs);
            if last_chunk > first {
                let job = Job {
                    disk: self.shared.clone(),
                    first,
                    count: last_chunk - first,
                };
                // Full: the read-ahead threads are behind; reads load what they need.
                if self.read_ahead.try_send(job).is_ok() {
                    ahead = target;
                }
            }
        }
        streams[i] = (end, ahead);
    }
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>, ExportError> {
        let disk = &*self.shared;
        let end = offset + u64::from(len);
        self.note_read(offset, end);
        let cs = disk.chunk_size;
        let first = offset / cs;
        let entries = disk.entries(first, end.div_ceil(cs) - first)?;
        let mut pieces: Vec<Piece> = Vec::with_capacity(entries.len());
        for (index, entry) in entries {
            let start = (index * cs).max(offset);
            let stop = ((index + 1) * cs).min(end);
            let n = (stop - start) as u32;
            match entry {
                ChunkRef::Zero => match pieces.last_mut() {
                    Some(Piece::Zero(z)) => *z += n,
                    _ => pieces.push(Piece::Zero(n)),
                },
                ChunkRef::Data(digest) => {
                    let data = disk.chunk(index, &digest)?;
                    let from = (start - index * cs) as usize;
                    let to = (stop - index * cs) as usize;
                    if data.len() < to {
                        return Err(ExportError::io(format!(
                            "disk {} chunk {digest} holds {} bytes, not {to}",
                            disk.name,
                            data.len()
                        )));
                    }
                    pieces.push(Piece::Data(data.slice(from..to)));
                }
            }
        }
        Ok(pieces)
    }

    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        let disk = &*self.shared;
        let end = offset + u64::from(len);
        let cs = disk.chunk_size;
        let first = offset / cs;
        let mut out: Vec<Extent> = Vec::new();
        for (index, entry) in disk.entries(first, end.div_ceil(cs) - first)? {
            let start = (index * cs).max(offset);
            let stop = ((index + 1) * cs).min(end);
            let flags = match entry {
                ChunkRef::Zero => STATE_HOLE | STATE_ZERO,
                ChunkRef::Data(_) => 0,
            };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.len += stop - start,
                _ => out.push(Extent {
                    offset: start,
                    len: stop - start,
                    flags,
                }),
            }
        }
        Ok(out)
    }

    fn description(&self) -> String {
        let meta = self.shared.snapshot.meta();
        format!(
            "disk {} of restore point {} of {}",
            self.shared.name, meta.id, meta.vm
        )
    }
}
