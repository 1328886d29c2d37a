//! A generated repository for the garbage-collection scaling benchmark (`benches/gc-scale.sh`).
//!
//! [`generate`] writes, through the public repository API, `snapshots` restore points of one VM with one
//! disk, like daily incrementals: the first snapshot stores every chunk of the disk, each later one
//! changes `change_percent` of the disk's chunks and shares the rest with its parent. Of the changed
//! chunks, `hot_percent` of the disk is a hot band (the same contiguous range every day, like a database
//! or a log) and the rest is scattered at random positions. New chunks are written in disk order, so a
//! session's band chunks fill whole packs. Forgetting the older half of the snapshots then leaves:
//! - packs where no chunk is referenced any more (the band of the forgotten days, and of the first
//!   snapshot), which gc deletes whole;
//! - packs where some chunks are dead (the scattered changes), which gc repacks;
//! - packs that stay as they are.
//!
//! Chunks are 64 KiB of plaintext (the smallest chunk size), each unique: 256 pseudo-random bytes
//! derived from the seed and the chunk's number, then zeros. They are stored zstd-compressed (level
//! 1), a few hundred bytes each, and the digest is the BLAKE3 of the plaintext, so `verify
//! --read-data` and gc's checks see real chunks. With the default pack target (128 KiB) a pack holds
//! about 450 chunks, the count of a real 32 MiB pack of 64 KiB compressed chunks, so the repository
//! has the pack and chunk counts of a large one at a few hundred bytes per chunk.

use std::path::Path;
use std::time::Instant;

use backflow_repository::{
    ChunkRef, Codec, Digest, DiskMeta, InitOptions, MIN_CHUNK_SIZE, RepoError, Repository,
};

/// Plaintext size of every chunk, and the disk's chunk size.
pub const CHUNK_SIZE: u32 = MIN_CHUNK_SIZE;

/// Bytes at the start of a chunk that make it unique; the rest is zeros.
const NOISE: usize = 256;

/// Chunk-table entries written per `set_chunks` call.
const TABLE_BATCH: usize = 1 << 16;

/// What to generate; see the module documentation.
#[derive(Clone, Debug)]
pub struct GcRepoOptions {
    /// Distinct chunks to store in all, approximately (scattered changes are drawn at random).
    pub chunks: u64,
    /// Restore points of the VM, oldest first.
    pub snapshots: u32,
    /// Share of the disk's chunks each incremental changes, in percent.
    pub change_percent: u32,
    /// Part of `change_percent` that is the same contiguous band every time.
    pub hot_percent: u32,
    /// Pack target size of the repository (64 KiB at least).
    pub pack_target_size: u64,
    /// Same seed, same plaintexts and the same changed positions.
    pub seed: u64,
    /// Threads compressing and writing chunks (one pack writer each).
    pub threads: usize,
}

impl Default for GcRepoOptions {
    fn default() -> Self {
        GcRepoOptions {
            chunks: 20_000,
            snapshots: 10,
            change_percent: 10,
            hot_percent: 5,
            pack_target_size: 128 << 10,
            seed: 1,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct GcRepoReport {
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Chunks per disk (every snapshot's disk has this many).
    pub disk_chunks: u64,
    pub snapshots: u32,
    pub packs: u64,
    /// Bytes of the pack files.
    pub pack_bytes: u64,
    /// Bytes of every file in the repository.
    pub repo_bytes: u64,
    pub seconds: f64,
}

impl GcRepoReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "chunks": self.chunks,
            "disk_chunks": self.disk_chunks,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "pack_bytes": self.pack_bytes,
            "repo_bytes": self.repo_bytes,
            "seconds": self.seconds,
        })
    }
}

/// The `splitmix64` step: a good 64-bit mix, so consecutive inputs give unrelated outputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the plaintext of chunk `number` into `buf` (64 KiB; only the first bytes change).
fn fill_chunk(buf: &mut [u8], seed: u64, number: u64) {
    let mut state = mix(seed ^ mix(number));
    for word in buf[..NOISE].chunks_exact_mut(8) {
        state = mix(state);
        word.copy_from_slice(&state.to_le_bytes());
    }
}

/// The disk positions snapshot `snapshot` (1 or more) changes, in increasing order.
fn changed_positions(opts: &GcRepoOptions, disk_chunks: u64, snapshot: u32) -> Vec<u64> {
    let hot = disk_chunks * u64::from(opts.hot_percent) / 100;
    let hot_start = (disk_chunks - hot) / 2;
    let scattered = opts.change_percent.saturating_sub(opts.hot_percent);
    // Probability (out of 2^32) that a position outside the band changes.
    let threshold = (u64::from(scattered) << 32) / u64::from(100 - opts.hot_percent.min(99));
    let salt = mix(opts.seed ^ mix(u64::from(snapshot) << 40));
    (0..disk_chunks)
        .filter(|&p| {
            (hot_start..hot_start + hot).contains(&p) || (mix(salt ^ p) & 0xffff_ffff) < threshold
        })
        .collect()
}

/// Compresses and stores the chunks numbered `first..first + count` with one pack writer; returns their
/// digests in order.
fn store_chunks(
    session: &backflow_repository::BackupSession,
    seed: u64,
    first: u64,
    count: u64,
) -> Result<Vec<Digest>, RepoError> {
    let mut writer = session.pack_writer();
    let mut compressor = zstd::bulk::Compressor::new(1)
        .map_err(|e| RepoError::InvalidArgument(format!("zstd: {e}")))?;
    let mut plain = vec![0u8; CHUNK_SIZE as usize];
    let mut digests = Vec::with_capacity(count as usize);
    for number in first..first + count {
        fill_chunk(&mut plain, seed, number);
        let digest = Digest(*blake3::hash(&plain).as_bytes());
        let stored = compressor
            .compress(&plain)
            .map_err(|e| RepoError::InvalidArgument(format!("zstd: {e}")))?;
        writer.add(digest, Codec::Zstd, CHUNK_SIZE, &stored)?;
        digests.push(digest);
    }
    writer.finish()?;
    Ok(digests)
}

/// Stores chunks `first..first + count` over `threads` writers, each a contiguous part.
fn store_parallel(
    session: &backflow_repository::BackupSession,
    opts: &GcRepoOptions,
    first: u64,
    count: u64,
) -> Result<Vec<Digest>, RepoError> {
    let threads = opts.threads.max(1) as u64;
    let per = count.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = first + (t * per).min(count);
                let n = per.min(count - (t * per).min(count));
                scope.spawn(move || store_chunks(session, opts.seed, start, n))
            })
            .collect();
        let mut all = Vec::with_capacity(count as usize);
        for h in handles {
            all.extend(h.join().expect("a chunk writer panicked")?);
        }
        Ok(all)
    })
}

/// Sum of the lengths of the files under `dir` whose name ends with `suffix`, and their number.
fn files_under(dir: &Path, suffix: &str) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut count = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (b, c) = files_under(&entry.path(), suffix)?;
            bytes += b;
            count += c;
        } else if entry.file_name().to_string_lossy().ends_with(suffix) {
            bytes += meta.len();
            count += 1;
        }
    }
    Ok((bytes, count))
}

/// Creates a repository at `path` (absent or an empty directory) and fills it; see the module
/// documentation.
pub fn generate(path: &Path, opts: &GcRepoOptions) -> Result<GcRepoReport, RepoError> {
    if opts.snapshots == 0 || opts.change_percent > 100 || opts.hot_percent > opts.change_percent {
        return Err(RepoError::InvalidArgument(
            "need at least one snapshot and hot_percent <= change_percent <= 100".into(),
        ));
    }
    let started = Instant::now();
    let repo = Repository::init_with(
        path,
        &InitOptions {
            chunk_size: CHUNK_SIZE,
            pack_target_size: opts.pack_target_size,
        },
    )?;
    // chunks = disk * (1 + (snapshots - 1) * change): the first snapshot is all new.
    let disk_chunks = (opts.chunks * 100
        / (100 + u64::from(opts.snapshots - 1) * u64::from(opts.change_percent)))
    .max(1);
    let mut table: Vec<Digest> = Vec::new();
    let mut next_number = 0u64;
    for snapshot in 0..opts.snapshots {
        let session = repo.begin_backup("gc-bench")?;
        let disk = session.add_disk(DiskMeta {
            name: "vda".into(),
            size: disk_chunks * u64::from(CHUNK_SIZE),
            chunk_size: CHUNK_SIZE,
            location: "generated".into(),
            cbt: None,
        })?;
        if snapshot == 0 {
            table = store_parallel(&session, opts, 0, disk_chunks)?;
            next_number = disk_chunks;
        } else {
            let changed = changed_positions(opts, disk_chunks, snapshot);
            let count = changed.len() as u64;
            let digests = store_parallel(&session, opts, next_number, count)?;
            next_number += count;
            for (p, d) in changed.into_iter().zip(digests) {
                table[p as usize] = d;
            }
        }
        for (i, batch) in table.chunks(TABLE_BATCH).enumerate() {
            let refs: Vec<ChunkRef> = batch.iter().map(|d| ChunkRef::Data(*d)).collect();
            session.set_chunks(disk, (i * TABLE_BATCH) as u64, &refs)?;
        }
        session.commit(None)?;
    }
    let io = |source| RepoError::Io {
        op: "measure",
        path: path.to_owned(),
        source,
    };
    let (pack_bytes, packs) = files_under(&path.join("packs"), ".pack").map_err(io)?;
    let (repo_bytes, _) = files_under(path, "").map_err(io)?;
    Ok(GcRepoReport {
        chunks: next_number,
        disk_chunks,
        snapshots: opts.snapshots,
        packs,
        pack_bytes,
        repo_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_repository_verifies_and_counts_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo");
        let opts = GcRepoOptions {
            chunks: 1900,
            threads: 2,
            pack_target_size: 64 << 10,
            ..GcRepoOptions::default()
        };
        let report = generate(&path, &opts).unwrap();
        assert_eq!(report.disk_chunks, 1000);
        // About 10% of the disk changes per incremental: 1000 + 9 * ~100.
        assert!((1700..2100).contains(&report.chunks), "{report:?}");
        assert!(report.packs > 2, "{report:?}");
        let repo = Repository::open(&path).unwrap();
        assert_eq!(repo.list_snapshots().unwrap().len(), 10);
        let verified = repo.verify(true).unwrap();
        assert!(verified.is_ok(), "{verified:?}");
    }

    #[test]
    fn chunks_are_distinct_and_changes_include_the_hot_band() {
        let mut a = vec![0u8; CHUNK_SIZE as usize];
        let mut b = a.clone();
        fill_chunk(&mut a, 1, 0);
        fill_chunk(&mut b, 1, 1);
        assert_ne!(a, b);
        let opts = GcRepoOptions::default();
        let changed = changed_positions(&opts, 10_000, 1);
        assert!((800..1200).contains(&changed.len()), "{}", changed.len());
        assert!((4750..5250).all(|p| changed.binary_search(&p).is_ok()));
    }
}
