//! Deduplicator stage: hashes each new chunk (BLAKE3 of the plaintext) and lets through only the
//! chunks nobody has stored yet.
//!
//! Hashing comes before compression, so digests do not depend on the compression level and a
//! known chunk costs no compression at all. A chunk is known when the parent snapshot has the same
//! digest at the same index (the common case for an unchanged chunk: no index lookup), when the
//! repository's index has it (dedup across disks, machines and hosts), or when another chunk of
//! this run already carried it. A parent's chunk whose stored copies are marked damaged (and that
//! has no healthy copy) is not known: the index lookup skips damaged copies too, so the chunk is
//! stored again and heals every snapshot that references it.

use std::collections::HashSet;
use std::sync::Mutex;

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Chunk, InvalidOption, MessageType, Payload, RunContext, Stage, StageError, StageIo, Worker,
};
use backflow_repository::{ChunkRef, Digest};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "dedup";

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct DedupOptions {
    /// Look chunks up in the repository's index; false: compare only with the parent snapshot and
    /// this run (and run without a repository).
    #[serde(default = "yes")]
    pub repository_lookup: bool,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            repository_lookup: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "BLAKE3 of each chunk; known chunks (same digest at the same index in the parent, in the index, or earlier in this run) go no further",
    input: Some(MessageType::Chunk),
    output: Some(MessageType::HashedChunk),
    repository: RepositoryUse::RequiredUnless("repository_lookup"),
    options: option_docs::<DedupOptions>,
    build: Build::Stage(|options| {
        let has_repository = options.has_repository();
        build_stage(options, |o| Dedup::in_pipeline(o, has_repository))
    }),
};

/// Most digests of this run's new chunks remembered at once (about 40 bytes each: 10 MiB). When
/// full the set starts over: memory stays bounded whatever the disk size, and the price is that a
/// chunk repeated more than this many new chunks later (32 GiB of new data at 128 KiB chunks) may be
/// stored twice, which is harmless.
pub const RUN_DIGESTS_LIMIT: usize = 256 * 1024;

#[derive(Debug)]
pub struct Dedup {
    repository_lookup: bool,
    /// Digests of chunks this run passes on to be stored, so that each is stored once. Bounded by
    /// [`RUN_DIGESTS_LIMIT`].
    this_run: Mutex<HashSet<Digest>>,
}

impl Dedup {
    pub fn new(options: DedupOptions) -> Result<Self, InvalidOption> {
        Ok(Dedup {
            repository_lookup: options.repository_lookup,
            this_run: Mutex::new(HashSet::new()),
        })
    }

    /// The stage as a spec builds it: refused at validation when it would look chunks up in a
    /// repository the pipeline does not have, rather than failing once data moves.
    pub fn in_pipeline(options: DedupOptions, has_repository: bool) -> Result<Self, InvalidOption> {
        if options.repository_lookup && !has_repository {
            return Err(InvalidOption::new(
                "kind",
                format!(
                    "stage kind `{KIND}` needs the pipeline's `repository:` to be set (or `repository_lookup: false`)"
                ),
            ));
        }
        Dedup::new(options)
    }

    /// Whether the chunk with `digest` at `chunk.index` is already stored or on its way.
    fn is_known(
        &self,
        ctx: &RunContext,
        chunk: &Chunk,
        digest: &Digest,
    ) -> Result<bool, StageError> {
        if let Some(parent) = &chunk.disk.parent
            && chunk.index < parent.chunk_count()
        {
            let parent_ref = parent.get(chunk.index).map_err(|e| {
                StageError::io(
                    format!("reading the parent's chunk table of {}", chunk.disk.name()),
                    e,
                )
            })?;
            if parent_ref == ChunkRef::Data(*digest) && !parent.must_store_again(chunk.index) {
                return Ok(true);
            }
        }
        // With lookups on, a missing or unreadable repository is an error, never a silent
        // fallback to storing everything again.
        if self.repository_lookup && ctx.repository()?.lookup(digest)?.is_some() {
            return Ok(true);
        }
        let mut this_run = self.this_run.lock().unwrap();
        if this_run.len() >= RUN_DIGESTS_LIMIT && !this_run.contains(digest) {
            this_run.clear();
        }
        Ok(!this_run.insert(*digest))
    }
}

impl Stage for Dedup {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::Chunk),
            output: Some(MessageType::HashedChunk),
        }
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        // The repository's hasher: chunk ids are keyed in an encrypted repository.
        let hasher = worker.ctx().chunk_hasher()?;
        worker.map_chunks(KIND, |ctx, chunk| {
            if let Payload::Raw(data) = &chunk.payload {
                let digest = hasher.digest(data);
                if self.is_known(ctx, chunk, &digest)? {
                    chunk.payload = Payload::Known;
                }
                chunk.digest = Some(digest);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use backflow_pipeline::{CancelToken, Disk, DiskSource, SizeOnly, digest_of};

    use super::*;

    fn chunk(index: u64) -> Chunk {
        let disk = Arc::new(Disk {
            source: Arc::new(DiskSource {
                vm: "vm".into(),
                name: "vda".into(),
                location: "test".into(),
                reader: Arc::new(SizeOnly(u64::MAX / 2)),
                tracking: None,
                definition: None,
            }),
            chunk_size: 65536,
            parent: None,
        });
        Chunk {
            disk,
            index,
            digest: None,
            verified: false,
            payload: Payload::Zero { count: 1 },
        }
    }

    #[test]
    fn the_digests_of_one_run_stay_bounded() {
        let dedup = Dedup::new(DedupOptions {
            repository_lookup: false,
        })
        .unwrap();
        let ctx = RunContext::new(None, CancelToken::new());
        let c = chunk(0);
        let digest = |i: u64| digest_of(&i.to_le_bytes());
        for i in 0..RUN_DIGESTS_LIMIT as u64 {
            assert!(!dedup.is_known(&ctx, &c, &digest(i)).unwrap());
        }
        // Repeats are known while the set has room for them...
        assert!(dedup.is_known(&ctx, &c, &digest(7)).unwrap());
        assert_eq!(dedup.this_run.lock().unwrap().len(), RUN_DIGESTS_LIMIT);
        // ...and one more new digest starts the set over instead of growing it.
        assert!(!dedup.is_known(&ctx, &c, &digest(u64::MAX)).unwrap());
        assert_eq!(dedup.this_run.lock().unwrap().len(), 1);
    }
}
