//! A restore point's disks as NBD exports (`backflow serve`): the [`backflow_nbd::server`] on
//! one side, the repository on the other.
//!
//! # Reading
//! - A read asks the disk's chunk table (read in pages of 4096 entries, a few pages kept) which
//!   chunks it covers. Zero chunks are answered as zeros (holes in a structured reply, `HOLE |
//!   ZERO` in block status) without reading anything.
//! - Data chunks come from a [`ChunkCache`] of decoded chunks shared by every disk and connection,
//!   keyed by digest, bounded in bytes ([`ServeOptions::cache_bytes`]), least recently used out
//!   first. A chunk missing there is loaded with [`Repository::load_chunk`], which tries every
//!   stored copy and verifies the plaintext against its digest. A chunk wanted by several
//!   requests at once is loaded once; the others wait for it.
//! - Read-ahead: a read that continues where an earlier one ended (within 8 MiB: several
//!   connections' requests arrive out of order) marks a sequential stream; the chunks of the next
//!   [`ServeOptions::read_ahead_bytes`] are then handed to [`ServeOptions::read_ahead_threads`]
//!   threads through a bounded queue (full: skipped). They read the chunks not yet cached grouped
//!   by pack into spans ([`Repository::read_span`]: one ranged GET per span on object storage),
//!   decode each and check it against its digest before it enters the cache. Whatever fails there
//!   is left to the read that wants it.
//!
//! # Damage
//! A chunk that no stored copy gives back whole (missing, unreadable, not decoding, not matching
//! its digest) fails the NBD read that covers it with `EIO` and a message naming the disk, the
//! offset and the digest (logged as a warning too); never wrong bytes. Other reads go on.
//!
//! # Memory
//! Bounded by the settings, not by the disk: the cache (`cache_bytes`), the read-ahead window
//! per stream (at most a quarter of the cache, so read-ahead cannot push out what it fetched
//! before it is read), the table pages (10 MiB per disk at most) and the requests in flight
//! (`backflow_nbd::server`: 16 per connection, 32 MiB each at most).
//!
//! # The repository handle
//! The [`Repository`] stays open, and so registered in `users/`, while the restore point is
//! served: a garbage collection that begins meanwhile publishes its cycle but deletes nothing
//! until the handle is closed (the next gc after it finishes), so the packs of the served restore
//! point stay readable. On object storage the registration is a lease the store renews in the
//! background for as long as the handle lives.

mod cache;
mod disk;

use std::sync::Arc;
use std::thread::JoinHandle;

use backflow_nbd::server::Exports;
use backflow_repository::{Repository, Snapshot};

pub use cache::{CacheStats, ChunkCache};
pub use disk::{DiskExport, SPAN_GAP, SPAN_MAX};

/// Default bound of the decoded chunks kept.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Default bytes read ahead of a sequential reader.
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 32 << 20;
/// Default read-ahead threads: two keep a local pack file or an S3 endpoint busy while the
/// connections' workers decode.
pub const DEFAULT_READ_AHEAD_THREADS: usize = 2;
/// Read-ahead jobs queued; when full, a stream's read-ahead is skipped (the reads load what
/// they need themselves).
pub const READ_AHEAD_QUEUE: usize = 8;

/// How a restore point is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub cache_bytes: u64,
    /// Bytes read ahead of a sequential stream; 0: no read-ahead. Capped at a quarter of the cache.
    pub read_ahead_bytes: u64,
    pub read_ahead_threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
            read_ahead_threads: DEFAULT_READ_AHEAD_THREADS,
        }
    }
}

/// The disks of one restore point, ready to serve.
pub struct RestorePoint {
    snapshot: Arc<Snapshot>,
    disks: Vec<Arc<DiskExport>>,
    cache: Arc<ChunkCache>,
    threads: Vec<JoinHandle<()>>,
}

impl RestorePoint {
    /// Serves `snapshot` of `repo`. The read-ahead threads start now; [`RestorePoint::close`]
    /// (or dropping every export and this) ends them.
    pub fn new(
        repo: Repository,
        snapshot: Snapshot,
        options: &ServeOptions,
    ) -> std::io::Result<RestorePoint> {
        let snapshot = Arc::new(snapshot);
        let cache = ChunkCache::new(options.cache_bytes);
        let window = options.read_ahead_bytes.min(options.cache_bytes / 4);
        let (tx, rx) = crossbeam_channel::bounded::<disk::Job>(READ_AHEAD_QUEUE);
        let mut threads = Vec::new();
        if window > 0 {
            for _ in 0..options.read_ahead_threads.max(1) {
                let rx = rx.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name("read-ahead".into())
                        .spawn(move || {
                            for job in rx {
                                job.disk.read_ahead(job.first, job.count);
                            }
                        })?,
                );
            }
        }
        let disks = (0..snapshot.meta().disks.len())
            .map(|i| {
                let shared = Arc::new(disk::DiskShared::new(
                    repo.clone(),
                    snapshot.clone(),
                    i,
                    cache.clone(),
                ));
                Arc::new(DiskExport::new(shared, tx.clone(), window))
            })
            .collect();
        Ok(RestorePoint {
            snapshot,
            disks,
            cache,
            threads,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Every disk, in the manifest's order.
    pub fn disks(&self) -> &[Arc<DiskExport>] {
        &self.disks
    }

    pub fn disk(&self, name: &str) -> Option<&Arc<DiskExport>> {
        self.disks.iter().find(|d| d.name() == name)
    }

    /// The exports: every disk by its name, or only `only` (also as the default export `""`).
    /// `None` when `only` names no disk.
    pub fn exports(&self, only: Option<&str>) -> Option<Exports> {
        let mut exports = Exports::new();
        match only {
            Some(name) => exports.add(name, self.disk(name)?.clone(), true),
            None => {
                let single = self.disks.len() == 1;
                for d in &self.disks {
                    exports.add(d.name(), d.clone(), single);
                }
            }
        }
        Some(exports)
    }

    /// Drops the exports held here and waits for the read-ahead threads, which end once every
    /// export (the server's too) is gone: after this, with the server dropped, nothing holds the
    /// repository handle.
    pub fn close(self) {
        let RestorePoint { disks, threads, .. } = self;
        drop(disks);
        for t in threads {
            let _ = t.join();
        }
    }
}
