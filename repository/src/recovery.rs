//! Finding chunks without the index: the pack trailers of packs that no intact index file names.
//!
//! The index is a cache of what the packs say about themselves (crate root, "Goals"). When it fails a
//! restore (a lookup misses, or the copy it names does not read back whole), a damaged or lost index file
//! must not turn into a failed restore while the packs are intact. The first such miss of a repository
//! handle builds a *recovery index*:
//! 1. Every index file the handle uses is checked against its checksum (read whole: this happens only
//!    after a miss, never on the way of a healthy restore). A file that fails is no longer used for lookups.
//! 2. The packs that no intact index file names are listed: those of damaged or lost index files, and
//!    packs of sessions that never committed (their chunks are harmless to read: every chunk is checked
//!    against its digest).
//! 3. Their trailers (checksummed) go into an index file in the handle's scratch directory, which
//!    [`Repository::find_copy`] searches last.
//!
//! Only restores and `verify` look here, never deduplication: a gc may delete an unindexed pack, so a
//! backup must not come to rely on one. `rebuild-index` makes such chunks findable by every reader again,
//! and fast: a run that found chunks here says so ([`Repository::recovery_notice`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use crate::error::Result;
use crate::format::hex;
use crate::index::{IndexBuilder, IndexFile};
use crate::pack::{pack_key, read_stored_pack_trailer};
use crate::repository::Repository;
use crate::sort::{Sorted, Sorter};
use crate::store::Store;
use crate::{ChunkLocation, Digest, PackId};

/// The recovery index of one repository handle, built on its first need.
#[derive(Debug)]
pub(crate) struct Recovery {
    index: Option<IndexFile>,
    /// Unindexed packs whose trailers went into `index`.
    pub(crate) packs: Vec<PackId>,
    /// Index files whose checksum failed when the recovery was built.
    pub(crate) damaged_index: Vec<(PathBuf, String)>,
    /// Copies found here so far: each is a chunk the index did not deliver.
    found: AtomicU64,
    dir: Option<(PathBuf, File)>,
}

impl Drop for Recovery {
    fn drop(&mut self) {
        if let Some((dir, _lock)) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Recovery {
    /// The first copy of `digest` here that `accept` takes.
    pub(crate) fn find(
        &self,
        digest: &Digest,
        accept: &mut dyn FnMut(&ChunkLocation) -> bool,
    ) -> Result<Option<ChunkLocation>> {
        let Some(index) = &self.index else {
            return Ok(None);
        };
        let found = index.lookup_where(digest, accept)?;
        if found.is_some() {
            self.found.fetch_add(1, Ordering::Relaxed);
        }
        Ok(found)
    }

    /// Copies found here so far.
    pub(crate) fn found(&self) -> u64 {
        self.found.load(Ordering::Relaxed)
    }

    /// Builds the recovery index of `repo`; see the module's docs.
    pub(crate) fn build(repo: &Repository) -> Result<Recovery> {
        let store = &**repo.store();
        let damaged_index = repo.check_index_checksums()?;
        let (dir, lock) = crate::scratch::create(store.scratch_root(), || {
            format!("recovery-{}", hex(&rand::random::<[u8; 6]>()))
        })?;
        let mut recovery = Recovery {
            index: None,
            packs: Vec::new(),
            damaged_index,
            found: AtomicU64::new(0),
            dir: Some((dir.clone(), lock)),
        };
        let mut named = Sorter::<16>::new(&dir, "named-packs", true);
        for file in repo.index_files() {
            for id in file.pack_ids()? {
                named.push(id.0)?;
            }
        }
        let mut builder = IndexBuilder::new(dir.clone());
        for id in unindexed_packs(store, named.finish()?)? {
            let key = pack_key(&id);
            match read_stored_pack_trailer(store, &key) {
                Ok(trailer) => {
                    builder.add_pack(id, &trailer.entries)?;
                    recovery.packs.push(id);
                }
                // Removed meanwhile (a gc's sweep), or damaged: nothing to find there.
                Err(e) => {
                    debug!(pack = %store.display_key(&key).display(), error = %e,
                           "Pack left out of the recovery index.")
                }
            }
        }
        if builder.is_empty() {
            // Nothing to find: no scratch directory stays behind for the handle's lifetime.
            drop(builder);
            if let Some((dir, _lock)) = recovery.dir.take() {
                let _ = std::fs::remove_dir_all(dir);
            }
        } else {
            let path = dir.join("recovery.idx");
            builder.write(&path)?;
            recovery.index = Some(IndexFile::open_local(&path)?);
        }
        if !recovery.damaged_index.is_empty() || !recovery.packs.is_empty() {
            warn!(
                damaged_index_files = recovery.damaged_index.len(),
                unindexed_packs = recovery.packs.len(),
                "Looking for chunks in the trailers of packs that no intact index file names."
            );
        }
        Ok(recovery)
    }
}

/// The packs in `packs/` that `named` (sorted pack ids) does not hold, sorted. One directory of the 256 is
/// listed at a time, so memory holds one directory's names and the result.
pub(crate) fn unindexed_packs(store: &dyn Store, mut named: Sorted<16>) -> Result<Vec<PackId>> {
    let mut out = Vec::new();
    let mut next = named.next_record()?;
    // Listed in name order, which for two hex digits is the order of the ids they start.
    for sub in store.list_dirs("packs/")? {
        let mut ids: Vec<PackId> = store
            .list_names(&format!("packs/{sub}/"))?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".pack").and_then(|n| n.parse().ok()))
            .collect();
        ids.sort();
        for id in ids {
            while let Some(n) = next
                && n < id.0
            {
                next = named.next_record()?;
            }
            if next != Some(id.0) {
                out.push(id);
            }
        }
    }
    Ok(out)
}

impl Repository {
    /// The recovery index, built on the first call (and again after [`Repository::reload_index`]).
    pub(crate) fn recovery(&self) -> Result<Arc<Recovery>> {
        let mut slot = self
            .recovery_slot()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*slot {
            return Ok(r.clone());
        }
        let built = Arc::new(Recovery::build(self)?);
        *slot = Some(built.clone());
        Ok(built)
    }

    /// What a run that restored or checked chunks should tell its user when some were found only through
    /// the pack trailers: which index files are damaged, and that `rebuild-index` makes it fast again.
    pub fn recovery_notice(&self) -> Option<String> {
        let slot = self
            .recovery_slot()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let r = slot.as_ref()?;
        let found = r.found.load(Ordering::Relaxed);
        if found == 0 {
            return None;
        }
        let damaged: Vec<String> = r
            .damaged_index
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        let why = if damaged.is_empty() {
            "no index file names their packs".to_owned()
        } else {
            format!("index files are damaged ({})", damaged.join(", "))
        };
        Some(format!(
            "{found} chunks were found in pack trailers because {why}; `backflow rebuild-index` makes them \
             fast to find again"
        ))
    }
}
