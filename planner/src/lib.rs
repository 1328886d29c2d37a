//! The changed-block planner shared by the map stages (`full`, `dirty-bitmap`,
//! `libvirt-checkpoint`): which chunks of a disk are read, which are zero without reading and
//! which are taken over from the parent snapshot unchanged.
//!
//! Why a crate of its own: the maps differ only in where the changes come from (nothing: read all
//! that is allocated; a change-tracking source: read what changed); the chunk size, the parent
//! lookup and the rules that keep a backup from taking over a chunk the repository cannot read
//! are the same, and stages depend on infrastructure crates, never on each other.
//!
//! The chunk size comes from the pipeline's repository (or the `chunk_size` option without one),
//! and the disk's parent (the same disk in the machine's latest snapshot, when its size and chunk
//! size match) is attached so that the deduplicator can compare with it first.
//!
//! A backup never takes over a parent's chunk the repository cannot read. Before planning, the
//! parent's chunks are checked against the index (index lookups, no reads of chunk data:
//! [`backflow_repository::Repository::check_parent`]); those missing from the index or whose every
//! copy is marked damaged are read from the source and stored again: the deduplicator does not
//! trust the parent's digest for them, and incremental maps read them instead of referencing them
//! unchanged ([`reread_damaged`]). Past [`STORE_AGAIN_LIMIT`] such chunks the parent is dropped and
//! the disk read in full, with a warning.

use std::sync::Arc;

use backflow_pipeline::describe::OptionDocs;
use backflow_pipeline::{
    ByteSize, Disk, DiskSource, Extent, ExtentClass, InvalidOption, Message, ParentChunks,
    StageError, Worker,
};
use backflow_repository::{ChunkRef, Snapshot};
use serde::{Deserialize, Serialize};

/// Extents handed to readers are at most this many chunks, so that several reader workers share
/// one large allocated range.
pub const DEFAULT_MAX_EXTENT_CHUNKS: u64 = 32;

/// Most chunks of a parent that a backup reads again one by one because the repository has no
/// healthy copy of them (512 KiB of chunk indexes). Beyond this the parent is not used at all: the
/// disk is read in full and deduplicated against the index, which costs a full read but never
/// memory that grows with the damage.
pub const STORE_AGAIN_LIMIT: usize = 64 * 1024;

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct MapOptions {
    /// Chunk size without a repository; with one, the repository's chunk size is used.
    #[serde(default)]
    pub chunk_size: Option<ByteSize>,
    /// Largest extent handed to one reader worker, in chunks, so that several workers share one
    /// large allocated range.
    #[serde(default = "default_max_extent_chunks")]
    pub max_extent_chunks: u64,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            chunk_size: None,
            max_extent_chunks: DEFAULT_MAX_EXTENT_CHUNKS,
        }
    }
}

fn default_max_extent_chunks() -> u64 {
    DEFAULT_MAX_EXTENT_CHUNKS
}

/// The validated options of a changed-block map (`full`, `dirty-bitmap`).
#[derive(Clone, Copy, Debug)]
pub struct MapSettings {
    chunk_size: Option<u32>,
    pub max_extent_chunks: u64,
}

impl MapSettings {
    pub fn new(options: MapOptions) -> Result<Self, InvalidOption> {
        let chunk_size = match options.chunk_size {
            Some(size) => Some(
                check_chunk_size(size.bytes()).map_err(|e| InvalidOption::new("chunk_size", e))?,
            ),
            None => None,
        };
        if options.max_extent_chunks == 0 {
            return Err(InvalidOption::new(
                "max_extent_chunks",
                "must be at least 1",
            ));
        }
        Ok(MapSettings {
            chunk_size,
            max_extent_chunks: options.max_extent_chunks,
        })
    }

    /// The repository's chunk size, or the option's when the pipeline has no repository.
    pub fn chunk_size(&self, worker: &Worker<'_>) -> Result<u32, StageError> {
        match worker.ctx().repository() {
            Ok(repo) => Ok(repo.chunk_size()),
            Err(e) => self.chunk_size.ok_or(e),
        }
    }
}

/// What a map stage knows of a disk before it plans: the chunk size, the parent snapshot's disk
/// (when its geometry matches) and the ranges that may hold data.
pub struct OpenedDisk {
    pub chunk_size: u32,
    pub parent: Option<Arc<SnapshotParent>>,
    pub allocated: Option<Vec<(u64, u64)>>,
}

impl MapSettings {
    /// Looks up the parent of `source` and asks it for its allocated ranges.
    pub fn open(&self, worker: &Worker<'_>, source: &DiskSource) -> Result<OpenedDisk, StageError> {
        let chunk_size = self.chunk_size(worker)?;
        let parent = find_parent(worker, source, chunk_size)?;
        let allocated = source.reader.allocated().map_err(|e| {
            StageError::io(format!("mapping allocated ranges of {}", source.name), e)
        })?;
        Ok(OpenedDisk {
            chunk_size,
            parent,
            allocated,
        })
    }
}

/// Chunk sizes are multiples of the dirty-bitmap granularity (64 KiB) so that a dirty extent maps
/// to whole chunks.
pub fn check_chunk_size(bytes: u64) -> Result<u32, String> {
    const GRANULE: u64 = 64 * 1024;
    if bytes == 0 || !bytes.is_multiple_of(GRANULE) || bytes > 16 << 20 {
        return Err(format!(
            "chunk size must be a multiple of 64K between 64K and 16M, found {bytes}"
        ));
    }
    Ok(bytes as u32)
}

/// A parent snapshot's chunk table for one disk.
#[derive(Debug)]
pub struct SnapshotParent {
    pub snapshot: Arc<Snapshot>,
    pub disk: usize,
    pub chunks: u64,
    /// Indexes of the parent's chunks that the repository has no healthy copy of (missing from the
    /// index, or every copy marked damaged), sorted: they are read and stored again, never
    /// referenced ([`backflow_repository::Repository::check_parent`]).
    pub store_again: Vec<u64>,
}

impl SnapshotParent {
    /// The changed-block-tracking state recorded with this disk, if any.
    pub fn cbt(&self) -> Option<&serde_json::Value> {
        self.snapshot.meta().disks[self.disk].cbt.as_ref()
    }
}

impl ParentChunks for SnapshotParent {
    fn snapshot_id(&self) -> &str {
        &self.snapshot.info().id
    }

    fn chunk_count(&self) -> u64 {
        self.chunks
    }

    fn get(&self, index: u64) -> std::io::Result<ChunkRef> {
        self.snapshot
            .chunk(self.disk, index)
            .map_err(std::io::Error::other)
    }

    fn must_store_again(&self, index: u64) -> bool {
        self.store_again.binary_search(&index).is_ok()
    }

    fn get_range(&self, first: u64, out: &mut [ChunkRef]) -> std::io::Result<()> {
        let entries = self
            .snapshot
            .chunk_range(self.disk, first, out.len() as u64)
            .map_err(std::io::Error::other)?;
        for (slot, entry) in out.iter_mut().zip(entries) {
            *slot = entry.map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// Finds the parent of `source` in the repository: the machine's latest snapshot holding a disk of
/// the same name, size and chunk size. Anything else means no parent (a full, un-referenced read).
pub fn find_parent(
    worker: &Worker<'_>,
    source: &DiskSource,
    chunk_size: u32,
) -> Result<Option<Arc<SnapshotParent>>, StageError> {
    let Ok(repo) = worker.ctx().repository() else {
        return Ok(None);
    };
    // The newest snapshot of the machine that has this disk: another disk of the same machine may
    // have been backed up alone since. The listing has the disk names, so only one manifest opens.
    let newest = repo
        .list_snapshots()?
        .into_iter()
        .rev()
        .find(|s| s.vm == source.vm && s.disks.iter().any(|d| d.name == source.name));
    let Some(info) = newest else {
        return Ok(None);
    };
    // A damaged newest manifest is no parent, and no older snapshot may stand in for it: the changes
    // the source reports are relative to the newest one. The disk is read in full.
    let snapshot = match repo.open_snapshot(&info.id) {
        Ok(s) => s,
        Err(
            e @ (backflow_repository::RepoError::Corrupt { .. }
            | backflow_repository::RepoError::SnapshotNotFound { .. }),
        ) => {
            worker.ctx().warn(format!(
                "disk {}: snapshot {}, the parent, cannot be read ({e}); reading all of the disk",
                source.name, info.id
            ));
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let size = source.reader.size();
    let Some(disk) = snapshot.disk_index(&source.name) else {
        return Ok(None);
    };
    let meta = &snapshot.meta().disks[disk];
    if meta.size != size || meta.chunk_size != chunk_size {
        worker.ctx().warn(format!(
            "disk {}: size or chunk size changed since snapshot {}; no parent to compare with",
            source.name,
            snapshot.info().id
        ));
        return Ok(None);
    }
    let chunks = size.div_ceil(u64::from(chunk_size));
    let check = repo.check_parent(&snapshot, disk, STORE_AGAIN_LIMIT)?;
    if check.count > check.unreadable.len() as u64 {
        worker.ctx().warn(format!(
            "disk {}: {} or more chunks of snapshot {} have no healthy copy in the repository (missing \
             from the index or marked damaged); reading the whole disk again, deduplicated, instead of \
             taking chunks over from it",
            source.name,
            check.count,
            snapshot.info().id
        ));
        return Ok(None);
    }
    if !check.unreadable.is_empty() {
        worker.ctx().warn(format!(
            "disk {}: {} chunks of snapshot {} have no healthy copy in the repository (missing from the \
             index or marked damaged); reading them from the disk and storing them again",
            source.name,
            check.count,
            snapshot.info().id
        ));
    }
    Ok(Some(Arc::new(SnapshotParent {
        snapshot: Arc::new(snapshot),
        disk,
        chunks,
        store_again: check.unreadable,
    })))
}

/// Makes the chunks of `store_again` (sorted indexes) that a plan marks `Unchanged` into `Data`, so
/// that they are read and stored again instead of referenced from the parent; runs of data are
/// split at `max_run` chunks.
pub fn reread_damaged(
    plan: Vec<(u64, u64, ExtentClass)>,
    store_again: &[u64],
    max_run: u64,
) -> Vec<(u64, u64, ExtentClass)> {
    if store_again.is_empty() {
        return plan;
    }
    let mut out: Vec<(u64, u64, ExtentClass)> = Vec::with_capacity(plan.len());
    for (first, count, class) in plan {
        if class != ExtentClass::Unchanged {
            push_run(&mut out, first, count, class);
            continue;
        }
        let end = first + count;
        let mut at = first;
        let from = store_again.partition_point(|&i| i < first);
        for &index in store_again[from..].iter().take_while(|&&i| i < end) {
            if index > at {
                push_run(&mut out, at, index - at, ExtentClass::Unchanged);
            }
            push_run(&mut out, index, 1, ExtentClass::Data);
            at = index + 1;
        }
        if at < end {
            push_run(&mut out, at, end - at, ExtentClass::Unchanged);
        }
    }
    split_data_runs(out, max_run)
}

/// Appends the run `[first, first + count)` of `class` to a plan, merged into the last run when
/// that one has the same class and ends at `first`.
fn push_run(plan: &mut Vec<(u64, u64, ExtentClass)>, first: u64, count: u64, class: ExtentClass) {
    match plan.last_mut() {
        Some(last) if last.2 == class && last.0 + last.1 == first => last.1 += count,
        _ => plan.push((first, count, class)),
    }
}

/// Turns allocated byte ranges into chunk classes, merged into runs: a chunk touching any
/// allocated byte is `Data`, the others `Zero`. Runs of data are split at `max_run` chunks.
pub fn plan_chunks(
    size: u64,
    chunk_size: u32,
    allocated: Option<&[(u64, u64)]>,
    max_run: u64,
) -> Vec<(u64, u64, ExtentClass)> {
    let chunk_size = u64::from(chunk_size);
    let count = size.div_ceil(chunk_size);
    let mut plan = Vec::new();
    let mut next = 0;
    for (first, end) in chunk_runs(size, chunk_size, allocated) {
        if first > next {
            plan.push((next, first - next, ExtentClass::Zero));
        }
        plan.push((first, end - first, ExtentClass::Data));
        next = end;
    }
    if next < count {
        plan.push((next, count - next, ExtentClass::Zero));
    }
    split_data_runs(plan, max_run)
}

/// Splits the `Data` runs of a plan into runs of at most `max_run` chunks, so that several reader
/// workers share one long run; other runs travel whole.
fn split_data_runs(
    plan: Vec<(u64, u64, ExtentClass)>,
    max_run: u64,
) -> Vec<(u64, u64, ExtentClass)> {
    let mut split = Vec::with_capacity(plan.len());
    for (first, count, class) in plan {
        if class != ExtentClass::Data {
            split.push((first, count, class));
            continue;
        }
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(max_run);
            split.push((at, n, class));
            at += n;
        }
    }
    split
}

/// The chunk runs `[first, end)` touched by byte ranges, merged; `None` means every chunk.
fn chunk_runs(size: u64, chunk_size: u64, ranges: Option<&[(u64, u64)]>) -> Vec<(u64, u64)> {
    let count = size.div_ceil(chunk_size);
    let Some(ranges) = ranges else {
        return vec![(0, count)];
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(offset, len) in ranges {
        if len == 0 || offset >= size {
            continue;
        }
        let first = offset / chunk_size;
        let end = (offset + len).min(size).div_ceil(chunk_size);
        match runs.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => runs.push((first, end)),
        }
    }
    runs
}

/// Plans an incremental read: chunks touched by a `dirty` range are read when they touch an
/// `allocated` range and marked zero when they do not (written since, but now reading as zeros:
/// trimmed or zeroed); every other chunk is unchanged since the parent. Runs of data are split at
/// `max_run` chunks.
pub fn plan_incremental(
    size: u64,
    chunk_size: u32,
    dirty: &[(u64, u64)],
    allocated: Option<&[(u64, u64)]>,
    max_run: u64,
) -> Vec<(u64, u64, ExtentClass)> {
    let chunk_size = u64::from(chunk_size);
    let count = size.div_ceil(chunk_size);
    let dirty = chunk_runs(size, chunk_size, Some(dirty));
    let allocated = chunk_runs(size, chunk_size, allocated);
    let mut cuts: Vec<u64> = [0, count]
        .into_iter()
        .chain(dirty.iter().flat_map(|&(a, b)| [a, b]))
        .chain(allocated.iter().flat_map(|&(a, b)| [a, b]))
        .filter(|&c| c <= count)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let inside = |runs: &[(u64, u64)], at: u64| {
        let i = runs.partition_point(|&(_, end)| end <= at);
        runs.get(i).is_some_and(|&(first, _)| first <= at)
    };
    let mut plan: Vec<(u64, u64, ExtentClass)> = Vec::new();
    for pair in cuts.windows(2) {
        let (first, end) = (pair[0], pair[1]);
        let class = if !inside(&dirty, first) {
            ExtentClass::Unchanged
        } else if inside(&allocated, first) {
            ExtentClass::Data
        } else {
            ExtentClass::Zero
        };
        push_run(&mut plan, first, end - first, class);
    }
    split_data_runs(plan, max_run)
}

/// Sends a plan as extents of `disk`, its data runs added to the bytes the run plans to read;
/// stops early when nobody downstream takes them.
pub fn send_plan(
    worker: &mut Worker<'_>,
    disk: &Arc<Disk>,
    plan: Vec<(u64, u64, ExtentClass)>,
) -> Result<(), backflow_pipeline::Stopped> {
    worker.ctx().plan_read(
        plan.iter()
            .filter(|run| run.2 == ExtentClass::Data)
            .map(|&(first, count, _)| disk.run_len(first, count))
            .sum(),
    );
    for (first, count, class) in plan {
        let extent = Extent {
            disk: disk.clone(),
            first,
            count,
            class,
        };
        worker.send(Message::Extent(extent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ExtentClass::{Data, Zero};

    const C: u64 = 65536;

    #[test]
    fn holes_become_zero_runs_and_data_is_chunk_aligned() {
        // 10 chunks; data in the middle of chunk 2 and spanning chunks 5..=6.
        let plan = plan_chunks(
            10 * C,
            C as u32,
            Some(&[(2 * C + 10, 100), (5 * C + 1, C)]),
            32,
        );
        assert_eq!(
            plan,
            vec![
                (0, 2, Zero),
                (2, 1, Data),
                (3, 2, Zero),
                (5, 2, Data),
                (7, 3, Zero)
            ]
        );
    }

    #[test]
    fn unknown_allocation_reads_everything_in_bounded_runs() {
        let plan = plan_chunks(10 * C + 5, C as u32, None, 4);
        assert_eq!(plan, vec![(0, 4, Data), (4, 4, Data), (8, 3, Data)]);
    }

    #[test]
    fn plan_covers_every_chunk_exactly_once() {
        let ranges = [
            (0, 1),
            (C - 1, 2),
            (7 * C, 3 * C),
            (9 * C, 10),
            (20 * C, 100),
        ];
        let plan = plan_chunks(12 * C, C as u32, Some(&ranges), 3);
        let mut next = 0;
        for (first, count, _) in &plan {
            assert_eq!(*first, next);
            next += count;
        }
        assert_eq!(next, 12);
    }

    #[test]
    fn incremental_reads_dirty_allocated_chunks_only() {
        use ExtentClass::Unchanged;
        // 12 chunks. Dirty: inside chunk 1, chunks 4..=6 (6 only by one byte), chunk 10.
        // Allocated: chunks 0..=5 and 10; so chunk 6 was written but now reads as zeros.
        let dirty = [(C + 5, 10), (4 * C, 2 * C + 1), (10 * C, C)];
        let allocated = [(0, 6 * C), (10 * C, C)];
        let plan = plan_incremental(12 * C, C as u32, &dirty, Some(&allocated), 2);
        assert_eq!(
            plan,
            vec![
                (0, 1, Unchanged),
                (1, 1, Data),
                (2, 2, Unchanged),
                (4, 2, Data),
                (6, 1, Zero),
                (7, 3, Unchanged),
                (10, 1, Data),
                (11, 1, Unchanged),
            ]
        );
        // Without allocation information every dirty chunk is read; long runs are split.
        let plan = plan_incremental(12 * C, C as u32, &[(0, 5 * C)], None, 2);
        assert_eq!(
            plan,
            vec![(0, 2, Data), (2, 2, Data), (4, 1, Data), (5, 7, Unchanged)]
        );
        // Nothing dirty: one unchanged run.
        assert_eq!(
            plan_incremental(12 * C + 1, C as u32, &[], None, 2),
            vec![(0, 13, Unchanged)]
        );
    }

    #[test]
    fn damaged_parent_chunks_are_read_again() {
        use ExtentClass::Unchanged;
        let plan = vec![(0, 4, Unchanged), (4, 2, Data), (6, 6, Unchanged)];
        // Chunk 0 (a run's first), 6 and 7 (adjacent to each other), 11 (a run's last); 5 is read
        // anyway.
        assert_eq!(
            reread_damaged(plan.clone(), &[0, 5, 6, 7, 11], 3),
            vec![
                (0, 1, Data),
                (1, 3, Unchanged),
                (4, 3, Data),
                (7, 1, Data),
                (8, 3, Unchanged),
                (11, 1, Data),
            ]
        );
        // Without marks the plan is returned as it was.
        assert_eq!(reread_damaged(plan.clone(), &[], 3), plan);
    }

    #[test]
    fn rejects_bad_chunk_sizes() {
        assert!(check_chunk_size(64 * 1024).is_ok());
        assert!(check_chunk_size(100_000).is_err());
        assert!(check_chunk_size(0).is_err());
        assert!(check_chunk_size(32 << 20).is_err());
    }
}
