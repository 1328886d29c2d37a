//! External sort of fixed-size records in bounded memory, for everything that grows with the repository:
//! a session's index records, and the garbage collection's referenced digests, index records and condemned
//! chunks.
//!
//! A [`Sorter`] keeps a fixed buffer of records; a full buffer is sorted and written as a run file in a scratch
//! directory. Runs are merged in tiers, like a log-structured merge tree: [`MAX_RUNS`] runs of one tier become
//! one run of the next. Each record is rewritten once per tier, so very large inputs cost one more pass per
//! factor of `MAX_RUNS` (1 Gi records of 2 MiB runs: 3 tiers), and reading back merges at most
//! `MAX_RUNS - 1` runs per tier: memory is the buffer plus a read buffer per run, a few MiB however many
//! records went in.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, RepoError, Result};

/// Default bytes of records a [`Sorter`] holds before it spills a sorted run.
pub(crate) const SORT_BUFFER: usize = 2 * 1024 * 1024;
/// Read buffer of each run during a merge.
pub(crate) const RUN_BUFFER: usize = 64 * 1024;
/// Runs merged into one as soon as there are this many.
pub(crate) const MAX_RUNS: usize = 32;

/// Sorts fixed-size records in bounded memory: a buffer in memory, beyond it sorted runs in a scratch
/// directory, merged when read back. Records sort by their bytes.
#[derive(Debug)]
pub(crate) struct Sorter<const N: usize> {
    dir: PathBuf,
    name: &'static str,
    buf: Vec<[u8; N]>,
    cap: usize,
    /// Sorted runs with their tier, tiers decreasing from the first: the tail is the lowest tier.
    runs: Vec<(u32, PathBuf)>,
    /// Runs written so far, for fresh names.
    written: usize,
    unique: bool,
}

impl<const N: usize> Sorter<N> {
    /// `unique`: equal records come out once.
    pub(crate) fn new(dir: &Path, name: &'static str, unique: bool) -> Self {
        Sorter::with_buffer(dir, name, unique, SORT_BUFFER)
    }

    pub(crate) fn with_buffer(dir: &Path, name: &'static str, unique: bool, bytes: usize) -> Self {
        Sorter {
            dir: dir.to_owned(),
            name,
            buf: Vec::new(),
            cap: (bytes / N).max(1),
            runs: Vec::new(),
            written: 0,
            unique,
        }
    }

    pub(crate) fn push(&mut self, record: [u8; N]) -> Result<()> {
        self.buf.push(record);
        if self.buf.len() >= self.cap {
            self.spill()?;
        }
        Ok(())
    }

    fn sort(&mut self) {
        self.buf.sort_unstable();
        if self.unique {
            self.buf.dedup();
        }
    }

    fn run_path(&mut self) -> PathBuf {
        self.written += 1;
        self.dir.join(format!("{}-run-{}", self.name, self.written))
    }

    fn spill(&mut self) -> Result<()> {
        self.sort();
        let path = self.run_path();
        let file = File::create(&path).ctx("create sort run", &path)?;
        let mut out = BufWriter::with_capacity(RUN_BUFFER, file);
        for r in &self.buf {
            out.write_all(r).ctx("write sort run", &path)?;
        }
        out.flush().ctx("write sort run", &path)?;
        self.runs.push((0, path));
        self.buf.clear();
        self.compact()
    }

    /// While the lowest tier has `MAX_RUNS` runs, merges them into one run of the next tier.
    fn compact(&mut self) -> Result<()> {
        loop {
            let Some(&(tier, _)) = self.runs.last() else {
                return Ok(());
            };
            let same = self
                .runs
                .iter()
                .rev()
                .take_while(|(t, _)| *t == tier)
                .count();
            if same < MAX_RUNS {
                return Ok(());
            }
            let group: Vec<PathBuf> = self
                .runs
                .split_off(self.runs.len() - same)
                .into_iter()
                .map(|(_, p)| p)
                .collect();
            let merged = self.merge_into_run(group)?;
            self.runs.push((tier + 1, merged));
        }
    }

    fn merge_into_run(&mut self, runs: Vec<PathBuf>) -> Result<PathBuf> {
        let path = self.run_path();
        let mut merged = Sorted::<N>::merge(runs, self.unique)?;
        let file = File::create(&path).ctx("create sort run", &path)?;
        let mut out = BufWriter::with_capacity(RUN_BUFFER, file);
        while let Some(r) = merged.next_record()? {
            out.write_all(&r).ctx("write sort run", &path)?;
        }
        out.flush().ctx("write sort run", &path)?;
        drop(merged);
        Ok(path)
    }

    /// The records in order.
    pub(crate) fn finish(mut self) -> Result<Sorted<N>> {
        if self.runs.is_empty() {
            self.sort();
            return Ok(Sorted {
                memory: std::mem::take(&mut self.buf).into_iter(),
                readers: Vec::new(),
                heap: BinaryHeap::new(),
                unique: self.unique,
                last: None,
                paths: Vec::new(),
            });
        }
        if !self.buf.is_empty() {
            self.spill()?;
        }
        self.buf = Vec::new();
        let runs = std::mem::take(&mut self.runs);
        Sorted::merge(runs.into_iter().map(|(_, p)| p).collect(), self.unique)
    }
}

fn read_record<const N: usize>(r: &mut impl Read, path: &Path) -> Result<Option<[u8; N]>> {
    let mut b = [0u8; N];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(RepoError::io("read", path, e)),
    }
}

/// The output of a [`Sorter`]; removes its run files when dropped.
pub(crate) struct Sorted<const N: usize> {
    memory: std::vec::IntoIter<[u8; N]>,
    readers: Vec<(BufReader<File>, PathBuf)>,
    heap: BinaryHeap<Reverse<([u8; N], usize)>>,
    unique: bool,
    last: Option<[u8; N]>,
    paths: Vec<PathBuf>,
}

impl<const N: usize> Sorted<N> {
    /// Merges sorted run files (removed when the result is dropped).
    fn merge(runs: Vec<PathBuf>, unique: bool) -> Result<Sorted<N>> {
        let mut readers = Vec::with_capacity(runs.len());
        let mut heap = BinaryHeap::with_capacity(runs.len());
        for (i, path) in runs.iter().enumerate() {
            let f = File::open(path).ctx("open sort run", path)?;
            let mut r = BufReader::with_capacity(RUN_BUFFER, f);
            if let Some(rec) = read_record::<N>(&mut r, path)? {
                heap.push(Reverse((rec, i)));
            }
            readers.push((r, path.clone()));
        }
        Ok(Sorted {
            memory: Vec::new().into_iter(),
            readers,
            heap,
            unique,
            last: None,
            paths: runs,
        })
    }

    pub(crate) fn next_record(&mut self) -> Result<Option<[u8; N]>> {
        if self.readers.is_empty() {
            return Ok(self.memory.next());
        }
        loop {
            let Some(Reverse((rec, i))) = self.heap.pop() else {
                return Ok(None);
            };
            let (r, path) = &mut self.readers[i];
            if let Some(next) = read_record::<N>(r, path)? {
                self.heap.push(Reverse((next, i)));
            }
            if self.unique && self.last == Some(rec) {
                continue;
            }
            self.last = Some(rec);
            return Ok(Some(rec));
        }
    }
}

impl<const N: usize> Drop for Sorted<N> {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_in_tiers_so_few_stay_open() {
        let dir = tempfile::tempdir().unwrap();
        // One record per run: 5000 runs merge into tiers of 32 (1, 32, 1024 records per run).
        let mut s = Sorter::<8>::with_buffer(dir.path(), "t", false, 8);
        for i in 0..5000u64 {
            s.push((5000 - i).to_be_bytes()).unwrap();
        }
        let tiers: Vec<u32> = s.runs.iter().map(|(t, _)| *t).collect();
        assert!(tiers.windows(2).all(|w| w[0] >= w[1]), "{tiers:?}");
        // 5000 = 4 * 1024 + 28 * 32 + 8
        assert_eq!(tiers.iter().filter(|t| **t == 2).count(), 4);
        assert_eq!(tiers.iter().filter(|t| **t == 1).count(), 28);
        assert_eq!(tiers.iter().filter(|t| **t == 0).count(), 8);
        let mut sorted = s.finish().unwrap();
        for i in 1..=5000u64 {
            assert_eq!(sorted.next_record().unwrap(), Some(i.to_be_bytes()));
        }
        assert_eq!(sorted.next_record().unwrap(), None);
    }

    #[test]
    fn the_sorter_sorts_and_deduplicates_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        for (unique, buffer) in [(true, 64 * 8), (false, 64 * 8), (true, 1 << 20), (false, 8)] {
            let mut s = Sorter::<8>::with_buffer(dir.path(), "t", unique, buffer);
            let mut expected = Vec::new();
            let mut x = 7u64;
            for _ in 0..5000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                let v = (x >> 54).to_be_bytes();
                s.push(v).unwrap();
                expected.push(v);
            }
            expected.sort();
            if unique {
                expected.dedup();
            }
            let mut out = Vec::new();
            let mut sorted = s.finish().unwrap();
            while let Some(r) = sorted.next_record().unwrap() {
                out.push(r);
            }
            assert_eq!(out, expected, "unique {unique}, buffer {buffer}");
            drop(sorted);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
