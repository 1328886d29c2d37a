//! Which chunks of a parent snapshot a backup may take over: those the index has a healthy copy of.
//!
//! An incremental references its parent's unchanged chunks by digest, without reading them. That is only
//! right while the repository can still read them: a copy marked damaged, a record a gc or an index rebuild
//! had to drop, an index file that can no longer be opened, or a pack that is gone would make the new
//! snapshot born broken. [`Repository::check_parent`] finds those chunks before the backup plans its reads,
//! so that they are read from the source and stored again (the source's data at an unchanged chunk is the
//! parent's: that is what unchanged means).
//!
//! It costs index lookups, never reads of chunk data. The parent's digests go through an external sort
//! (bounded memory for any disk size); then each index file either streams its records once and merges them
//! with the sorted digests, or is searched digest by digest, whichever reads less: a small incremental in a
//! large repository searches, a large disk against its own full backup's index streams. The digests no file
//! has a healthy copy of are the answer.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use crate::error::Result;
use crate::index::{INDEX_RECORD_SIZE, IndexFile};
use crate::sort::{Sorted, Sorter};
use crate::{ChunkLocation, ChunkRef, Digest, PackId, Repository, Snapshot};

/// Records read at once when an index file is streamed (about 1 MiB).
const STREAM_RECORDS: usize = 18 * 1024;

/// What a positioned read of a few bytes costs, counted in bytes of sequential reading from the page
/// cache: one binary-search step. Only the ratio matters, to choose between streaming and searching.
const SEARCH_STEP_BYTES: u64 = 4096;

/// The chunks of one disk of a parent snapshot that a backup must not take over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentCheck {
    /// Indexes of those chunks, sorted; at most the limit given to [`Repository::check_parent`].
    pub unreadable: Vec<u64>,
    /// How many there are: more than `unreadable.len()` when there are more than the limit.
    pub count: u64,
}

impl Repository {
    /// The chunks of `disk` in `snapshot` that have no healthy copy in the index: none of their copies is
    /// both unmarked (see "Damaged chunks" in the crate root) and in a pack that exists. Lists at most
    /// `limit` chunk indexes and counts them all. See the module docs for the cost.
    pub fn check_parent(
        &self,
        snapshot: &Snapshot,
        disk: usize,
        limit: usize,
    ) -> Result<ParentCheck> {
        self.refresh()?;
        let marks = self.damage_marks()?;
        let (scratch, _lock) = crate::scratch::create(self.store().scratch_root(), || {
            format!("check-{}", crate::format::hex(&rand::random::<[u8; 6]>()))
        })?;
        let result = (|| {
            let mut digests = Sorter::<32>::new(&scratch, "parent", true);
            let mut pushed = 0u64;
            for entry in snapshot.chunks(disk) {
                if let ChunkRef::Data(d) = entry? {
                    digests.push(d.0)?;
                    pushed += 1;
                }
            }
            let mut remaining = digests.finish()?;
            // Digests still without a healthy copy: an upper bound at first (the table may repeat one),
            // exact after the first file.
            let mut count = pushed;
            let mut files = self.index_files();
            files.sort_by_key(|f| std::cmp::Reverse(f.record_count()));
            let mut packs: HashMap<PackId, bool> = HashMap::new();
            for (i, file) in files.iter().enumerate() {
                if count == 0 {
                    break;
                }
                let mut healthy = |digest: &Digest, loc: &ChunkLocation| {
                    !marks.contains(digest, loc)
                        && *packs.entry(loc.pack).or_insert_with(|| {
                            self.store()
                                .exists(&crate::pack::pack_key(&loc.pack))
                                .unwrap_or(false)
                        })
                };
                let name = if i % 2 == 0 { "left-a" } else { "left-b" };
                let mut left = Sorter::<32>::new(&scratch, name, true);
                let stream = streams_cheaper(file.record_count(), count);
                count = 0;
                let mut keep = |d: Digest| -> Result<()> {
                    count += 1;
                    left.push(d.0)
                };
                if stream {
                    merge_file(file, &mut remaining, &mut keep, &mut healthy)?;
                } else {
                    while let Some(d) = remaining.next_record()? {
                        let d = Digest(d);
                        let mut accept = |loc: &ChunkLocation| healthy(&d, loc);
                        if file.lookup_where(&d, &mut accept)?.is_none() {
                            keep(d)?;
                        }
                    }
                }
                remaining = left.finish()?;
            }
            if count == 0 {
                return Ok(ParentCheck::default());
            }
            // Rare: map the digests back to chunk indexes (one more pass over the table).
            let mut lost: HashSet<Digest> = HashSet::new();
            let mut complete = true;
            while let Some(d) = remaining.next_record()? {
                if lost.len() >= limit {
                    complete = false;
                    break;
                }
                lost.insert(Digest(d));
            }
            let mut out = ParentCheck::default();
            for (index, entry) in snapshot.chunks(disk).enumerate() {
                if let ChunkRef::Data(d) = entry?
                    && lost.contains(&d)
                {
                    out.count += 1;
                    if out.unreadable.len() < limit {
                        out.unreadable.push(index as u64);
                    }
                }
            }
            if !complete {
                // Digests beyond the limit were not mapped back: there are more chunks than listed.
                out.count = out.count.max(limit as u64 + 1);
            }
            Ok(out)
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }
}

/// Whether reading all `records` of a file costs less than `queries` binary searches in it.
fn streams_cheaper(records: u64, queries: u64) -> bool {
    let steps = u64::from((records / 256 + 1).ilog2()) + 3;
    records.saturating_mul(INDEX_RECORD_SIZE as u64)
        <= queries.saturating_mul(steps * SEARCH_STEP_BYTES)
}

/// Merges the sorted `remaining` digests with the records of `file` (sorted by digest); the digests without a
/// copy that `healthy` takes go to `keep`.
fn merge_file(
    file: &Arc<IndexFile>,
    remaining: &mut Sorted<32>,
    keep: &mut dyn FnMut(Digest) -> Result<()>,
    healthy: &mut dyn FnMut(&Digest, &ChunkLocation) -> bool,
) -> Result<()> {
    let mut records = file.records()?;
    let mut next = records.next()?;
    while let Some(d) = remaining.next_record()? {
        let d = Digest(d);
        while let Some((rd, _)) = &next
            && *rd < d
        {
            next = records.next()?;
        }
        let mut found = false;
        while let Some((rd, loc)) = &next
            && *rd == d
        {
            found = found || healthy(&d, loc);
            next = records.next()?;
        }
        if !found {
            keep(d)?;
        }
    }
    Ok(())
}

/// The records of an index file in file order, read in large blocks by position, as lookups trust them: a
/// record that does not decode is skipped (a damaged file can only make a digest look missing, which makes
/// the backup store it again).
pub(crate) struct RecordReader<'a> {
    file: &'a IndexFile,
    packs: Vec<PackId>,
    buf: Vec<u8>,
    at: usize,
    next_record: u64,
}

/// Pack tables up to this many entries (1 MiB) are read into memory by a [`RecordReader`]; larger ones are
/// read by position for each record.
const PACK_TABLE_IN_MEMORY: usize = 64 * 1024;

impl IndexFile {
    pub(crate) fn records(&self) -> Result<RecordReader<'_>> {
        let packs = if self.pack_count() <= PACK_TABLE_IN_MEMORY {
            self.pack_ids()?
        } else {
            Vec::new()
        };
        Ok(RecordReader {
            file: self,
            packs,
            buf: Vec::new(),
            at: 0,
            next_record: 0,
        })
    }
}

impl RecordReader<'_> {
    fn next(&mut self) -> Result<Option<(Digest, ChunkLocation)>> {
        loop {
            if self.at >= self.buf.len() {
                let total = self.file.record_count();
                if self.next_record >= total {
                    return Ok(None);
                }
                let n = (total - self.next_record).min(STREAM_RECORDS as u64);
                self.buf.resize(n as usize * INDEX_RECORD_SIZE, 0);
                self.file
                    .reader_at(self.next_record)?
                    .read_exact(&mut self.buf)
                    .map_err(|e| crate::RepoError::io("read", &self.file.path, e))?;
                self.next_record += n;
                self.at = 0;
            }
            let b: &[u8; INDEX_RECORD_SIZE] = self.buf[self.at..self.at + INDEX_RECORD_SIZE]
                .try_into()
                .expect("one record");
            self.at += INDEX_RECORD_SIZE;
            if let Ok(record) = self.file.decode_record(b, &self.packs) {
                return Ok(Some(record));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_wins_when_the_digests_are_many_for_the_records() {
        // A disk's digests against its own full backup's index: stream.
        assert!(streams_cheaper(16_384, 16_384));
        // A 2 TiB disk (16 Mi chunks) against a repository of 100 Mi records: stream.
        assert!(streams_cheaper(100 << 20, 16 << 20));
        // A small disk against a large repository, or the few digests left after the first file: search.
        assert!(!streams_cheaper(100 << 20, 16_384));
        assert!(!streams_cheaper(20_000, 3));
        assert!(streams_cheaper(0, 0));
    }
}
