//! Garbage collection: removes the chunks no snapshot references, next to running backups, in bounded memory,
//! and resumable after a kill at any moment. The protocol and its reasons are in the crate root ("Garbage
//! collection"); this module is its implementation.
//!
//! Memory: every set that grows with the repository (referenced digests, index records, condemned records,
//! pack ids) goes through [`Sorter`], which keeps [`SORT_BUFFER`] bytes in memory and spills sorted runs to
//! the gc's scratch directory. What stays in memory is one pack's entries at a time, the copies of one digest
//! at a time, the snapshot ids, the packs left behind by killed sessions (orphans), and the few packs with
//! damage marks or a damaged frame.
//!
//! [`SORT_BUFFER`]: crate::sort::SORT_BUFFER

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::damaged::DamageMarks;
use crate::error::{IoContext, RepoError, Result};
use crate::format::hex;
#[cfg(test)]
use crate::gc_state::quarantine_path;
use crate::gc_state::{
    CycleId, CycleState, GcPaths, GcReport, LOCATED_SIZE, ListReader, Located, Phase,
    QUARANTINE_DIR, RUN_LOCK_WAIT, STATE_VERSION, check_lists, fence, live_users, load_state,
    quarantine_key, stopped, store_state, write_list,
};
use crate::index::IndexStream;
use crate::lock::{LockMode, lock_repository};
#[cfg(test)]
use crate::pack::pack_path;
use crate::pack::{pack_key, read_stored_pack_trailer, salvage_entries};
use crate::session::{PackWriter, SessionShared};
use crate::snapshot::Snapshot;
use crate::sort::{Sorted, Sorter};
use crate::store::{Lease, PutMode, Store};
use crate::{ChunkRef, Digest, PackId, Repository, StoredChunk};

/// Default share of a pack's indexed bytes that must be unreferenced before the pack is rewritten.
pub const DEFAULT_REPACK_THRESHOLD: u8 = 20;

/// Test hook: with `BACKFLOW_GC_KILL_AT=STEP`, the gc SIGKILLs itself when it reaches `STEP`. Only with
/// the `test-hooks` feature, which no user's build has.
#[cfg(feature = "test-hooks")]
pub const KILL_AT: &str = "BACKFLOW_GC_KILL_AT";

/// The steps [`KILL_AT`] can name, in the order a gc reaches them. `salvaging` and `quarantining` are
/// reached only in a repository with damaged chunks or packs.
#[cfg(feature = "test-hooks")]
pub const KILL_POINTS: &[&str] = &[
    "marked",
    "salvaging",
    "repacking",
    "indexed",
    "published",
    "old-index-removed",
    "users-listed",
    "resurrected",
    "sweeping",
    "deleting",
    "quarantining",
    "swept",
];

#[cfg(feature = "test-hooks")]
fn kill_point(step: &str) {
    if std::env::var(KILL_AT).is_ok_and(|v| v == step) {
        crate::hooks::kill_self(&format!("gc step {step}"));
    }
}

/// Without the `test-hooks` feature a kill point is nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
fn kill_point(_step: &str) {}

/// What [`Repository::gc`] does.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Rewrite a pack once at least this percentage of its indexed bytes is unreferenced (0 rewrites every
    /// pack with anything unreferenced, 100 only deletes packs that are wholly unreferenced).
    pub repack_threshold: u8,
    /// Decide and report, change nothing (`bytes_written` is then the live bytes the rewrites would copy).
    pub dry_run: bool,
    /// Also delete the packs in the quarantine ([`QUARANTINE_DIR`]). Never implied: a quarantined pack is
    /// damaged, but its blobs that did not decode may still be worth an expert's look.
    pub drop_quarantine: bool,
    /// First abandon a pending cycle whose state cannot be trusted (see "Garbage collection" in the crate
    /// root): its lists and state are removed, nothing is deleted, and the collection that follows keeps
    /// whatever snapshots use, reading the packs the abandoned cycle had taken out of the index. Refused
    /// while other repository handles (backups, restores) are open.
    pub reset_state: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
            dry_run: false,
            drop_quarantine: false,
            reset_state: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The run.

/// Runs a garbage collection; see the crate root.
pub(crate) fn gc(repo: &Repository, options: &GcOptions) -> Result<GcReport> {
    let root = repo.path().to_owned();
    let store = repo.store().clone();
    let repo_lock = lock_repository(
        &*store,
        LockMode::Shared,
        "an index rebuild holds it exclusively",
    )?;
    // `verify` holds the lock for the few milliseconds it reads the state: wait that out; another gc holds
    // it for its whole run: refuse.
    let deadline = std::time::Instant::now() + RUN_LOCK_WAIT;
    let run_lock = loop {
        match store.lock(
            GcPaths::RUN_LOCK,
            LockMode::Exclusive,
            "another garbage collection runs",
        ) {
            Err(e @ RepoError::Locked { .. }) => {
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r?,
        }
    };
    if !options.dry_run {
        repo.remove_stale_scratch()?;
    }
    let (scratch, scratch_lock) = crate::scratch::create(store.scratch_root(), || {
        format!("gc-{}", hex(&rand::random::<[u8; 6]>()))
    })?;
    let ctx = Gc {
        repo,
        root: root.clone(),
        store,
        scratch: scratch.clone(),
        scratch_lock,
        repo_lock: Arc::from(repo_lock),
        own_user: repo.user_name(),
    };
    let result = ctx.run(options);
    let _ = std::fs::remove_dir_all(&scratch);
    drop(run_lock);
    result
}

struct Gc<'a> {
    repo: &'a Repository,
    /// The repository as messages name it.
    root: PathBuf,
    store: Arc<dyn Store>,
    scratch: PathBuf,
    scratch_lock: File,
    repo_lock: Arc<dyn Lease>,
    own_user: Option<String>,
}

/// What becomes of a pack once its records are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Stays, indexed by the new index file.
    Keep,
    /// Deleted by the sweep (an indexed pack), or left to the orphan sweep (an orphan).
    Delete,
    /// Moved to the quarantine by the sweep.
    Quarantine,
    /// An orphan that is gone already.
    Gone,
}

/// Packs whose frame (header, trailer, footer) was checked during this condemnation, and those found damaged.
#[derive(Default)]
struct Frames {
    checked: HashSet<PackId>,
    damaged: HashSet<PackId>,
}

impl Gc<'_> {
    fn run(&self, options: &GcOptions) -> Result<GcReport> {
        let state_reset = options.reset_state && !options.dry_run && self.reset_state()?;
        let (dropped, dropped_bytes) = if options.drop_quarantine {
            self.drop_quarantine(options.dry_run)?
        } else {
            (0, 0)
        };
        let mut report = self.collect(options)?;
        report.state_reset = state_reset;
        report.quarantine_dropped = dropped;
        report.quarantine_bytes_freed = dropped_bytes;
        if dropped > 0 && !options.dry_run {
            self.repo.drop_marks_of_deleted_packs()?;
        }
        Ok(report)
    }

    fn collect(&self, options: &GcOptions) -> Result<GcReport> {
        if options.dry_run {
            if let Some(state) = self.load_state()? {
                let mut report = state.report;
                report.dry_run = true;
                report.waiting_for = Some(
                    "an earlier gc condemned these chunks; the next gc deletes them once the backups \
                     that were running then have ended"
                        .into(),
                );
                return Ok(report);
            }
            let mut report = self.condemn(options)?.report;
            report.dry_run = true;
            return Ok(report);
        }
        let mut earlier = None;
        if let Some(state) = self.load_state()? {
            match self.finish_cycle(state)? {
                Some(report) if report.waiting_for.is_some() => return Ok(report),
                report => earlier = report.map(Box::new),
            }
        }
        let state = self.condemn(options)?;
        let mut report = self
            .finish_cycle(state)?
            .expect("a cycle just begun is finished or waiting");
        report.earlier_cycle = earlier;
        Ok(report)
    }

    /// The pending cycle's state; one that cannot be trusted stops the gc with the repair to run.
    fn load_state(&self) -> Result<Option<CycleState>> {
        load_state(&*self.store).map_err(|e| stopped(&self.root, e))
    }

    /// Abandons a pending cycle ([`GcOptions::reset_state`]): its state, lists and forgotten manifests go,
    /// nothing else. Returns whether there was one. Safe once no other handle is open: the packs the cycle
    /// took out of the index are then orphans, which the next condemnation reads (so snapshots committed
    /// during the cycle keep what they use), and no backup can still take a forgotten manifest as its parent.
    fn reset_state(&self) -> Result<bool> {
        let store = &*self.store;
        let forgotten = self.forgotten_keys()?;
        let pending = [GcPaths::STATE, GcPaths::CONDEMNED, GcPaths::DOOMED]
            .iter()
            .map(|k| store.exists(k))
            .collect::<Result<Vec<bool>>>()?;
        if !pending.contains(&true) && forgotten.is_empty() {
            return Ok(false);
        }
        let _fence = fence(store, LockMode::Exclusive)?;
        let alive = live_users(store, self.own_user.as_deref(), None)?;
        if !alive.is_empty() {
            return Err(RepoError::Locked {
                path: self.root.clone(),
                detail: format!(
                    "{} other repository handle(s) (backups, restores) are open; a pending gc cycle is abandoned \
                     only when none is: run `backflow gc --reset-state` again once they have ended",
                    alive.len()
                ),
            });
        }
        // The state first: once it is gone the cycle is no longer pending; leftover lists are harmless (the
        // next condemnation writes new ones) and so are forgotten manifests (read by the next sweep).
        store.delete(GcPaths::STATE)?;
        store.delete(GcPaths::CONDEMNED)?;
        store.delete(GcPaths::DOOMED)?;
        store.delete_many(&forgotten)?;
        warn!(
            dir = %store.display_key("gc/").display(),
            "Pending garbage collection cycle abandoned; nothing was deleted."
        );
        Ok(true)
    }

    /// The keys of the manifests in `gc/forgotten/`.
    fn forgotten_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .store
            .list_names(GcPaths::FORGOTTEN)?
            .into_iter()
            .map(|n| format!("{}{n}", GcPaths::FORGOTTEN))
            .collect())
    }

    /// Deletes the packs in the quarantine (or, for a dry run, counts them): how many and their size.
    fn drop_quarantine(&self, dry_run: bool) -> Result<(u64, u64)> {
        let store = &*self.store;
        let top = format!("{QUARANTINE_DIR}/packs/");
        let (mut count, mut bytes) = (0u64, 0u64);
        for sub in store.list_dirs(&top)? {
            let dir = format!("{top}{sub}/");
            let mut keys = Vec::new();
            for entry in store.list(&dir)? {
                if !entry.name.ends_with(".pack") {
                    continue;
                }
                bytes += entry.size;
                count += 1;
                keys.push(format!("{dir}{}", entry.name));
            }
            if !dry_run {
                store.delete_many(&keys)?;
            }
        }
        if count > 0 && !dry_run {
            info!(
                packs = count,
                bytes, "Quarantined packs deleted on request."
            );
        }
        Ok((count, bytes))
    }

    fn writer_session(&self, what: &str) -> Result<Arc<SessionShared>> {
        Ok(SessionShared::new(
            format!("gc-{what}"),
            self.repo,
            self.scratch.clone(),
            crate::sort::SORT_BUFFER / crate::index::INDEX_RECORD_SIZE,
            self.scratch_lock.try_clone().ctx("dup", &self.scratch)?,
            self.repo_lock.clone(),
        ))
    }

    /// Writes the index file of what `session`'s writers stored (plus any kept packs added to it).
    fn write_index(&self, session: &SessionShared) -> Result<Option<String>> {
        let builder = session.take_index()?;
        if builder.is_empty() {
            return Ok(None);
        }
        let name = format!("gc-{}.idx", hex(&rand::random::<[u8; 8]>()));
        let tmp = self.scratch.join("index.tmp");
        builder.write(&tmp)?;
        self.store
            .publish(&tmp, &format!("index/{name}"), PutMode::Create)?;
        Ok(Some(name))
    }

    /// Reads a stored copy and checks it against its digest.
    fn read_checked(&self, r: &Located) -> Result<StoredChunk> {
        let stored = self.repo.read_chunk(&r.location())?;
        self.repo.plaintext(&r.digest, &r.location(), &stored)?;
        Ok(stored)
    }

    /// Phase 1: mark, decide per chunk and per pack, salvage, rewrite, index, publish the cycle. Deletes
    /// nothing. A dry run stops after the decisions, having written nothing but scratch.
    fn condemn(&self, options: &GcOptions) -> Result<CycleState> {
        let mut report = GcReport {
            repack_threshold: options.repack_threshold,
            ..GcReport::default()
        };

        // Index files first. A session that commits after this listing has its packs counted as orphans below,
        // and kept at the end because its own index file names them.
        let mut old_index: Vec<String> = self
            .store
            .list_names("index/")?
            .into_iter()
            .filter(|n| n.ends_with(".idx"))
            .collect();
        old_index.sort();

        // Mark.
        let marked = self.repo.manifest_ids()?;
        let mut referenced = Sorter::<32>::new(&self.scratch, "referenced", true);
        for id in &marked {
            let snapshot = match self.repo.open_snapshot(id) {
                // Forgotten since the listing (retention of a job running now): nothing to keep for it.
                Err(RepoError::SnapshotNotFound { .. }) => continue,
                other => other,
            };
            let snapshot = snapshot.map_err(|e| self.unreadable_snapshot(id, e))?;
            push_references(&snapshot, &mut referenced)?
                .map_err(|e| self.unreadable_snapshot(id, e))?;
        }
        report.snapshots = marked.len() as u64;
        let mut referenced = referenced.finish()?;
        kill_point("marked");

        // Every index record, read one file at a time (checksum and order checked) and sorted by digest:
        // memory and open files stay bounded however many index files there are. The pack tables give the
        // packs the index names.
        let mut records = Sorter::<LOCATED_SIZE>::new(&self.scratch, "records", false);
        let mut indexed_packs = Sorter::<16>::new(&self.scratch, "indexed-packs", true);
        for name in &old_index {
            let mut stream = IndexStream::open(&*self.store, &format!("index/{name}"), |id| {
                indexed_packs.push(id.0)
            })
            .map_err(damaged_index)?;
            while let Some((rec, pack)) = stream.next_record().map_err(damaged_index)? {
                let located = Located {
                    digest: rec.digest,
                    pack,
                    offset: rec.offset,
                    stored_len: rec.stored_len,
                    raw_len: rec.raw_len,
                    codec: rec.codec,
                    live: false,
                    indexed: true,
                    unsalvageable: false,
                };
                records.push(located.by_digest())?;
            }
        }
        // Packs no index names: left by killed sessions (or a killed gc). Found before this gc writes any. A
        // session alive now that wrote one is a registered handle, so the deletion waits for it, and by then
        // its index names the pack.
        let orphans = crate::recovery::unindexed_packs(&*self.store, indexed_packs.finish()?)?;
        report.orphan_packs = orphans.len() as u64;
        let marks = self.repo.damage_marks()?;
        let frames = self.read_suspect_trailers(&orphans, &marks, &mut records)?;
        let mut records = records.finish()?;

        // Joined with the referenced digests, one digest's copies at a time (see `settle_digest`).
        let session = self.writer_session("repack")?;
        let mut writer = (!options.dry_run).then(|| PackWriter::new(session.clone()));
        let mut by_pack = Sorter::<LOCATED_SIZE>::new(&self.scratch, "by-pack", false);
        let mut next_ref = referenced.next_record()?;
        let records_path = self.scratch.join("records");
        let mut copies: Vec<Located> = Vec::new();
        loop {
            let next = records
                .next_record()?
                .map(|b| Located::decode(&b, false, &records_path))
                .transpose()?;
            if let Some(first) = copies.first()
                && next.is_none_or(|n| n.digest != first.digest)
            {
                let digest = first.digest;
                while let Some(d) = next_ref
                    && d < digest.0
                {
                    report.missing_chunks += 1;
                    next_ref = referenced.next_record()?;
                }
                let is_referenced = next_ref == Some(digest.0);
                if is_referenced {
                    report.referenced_chunks += 1;
                    next_ref = referenced.next_record()?;
                }
                self.settle_digest(
                    &mut copies,
                    is_referenced,
                    &marks,
                    &frames,
                    writer.as_mut(),
                    &mut report,
                )?;
                for r in &copies {
                    by_pack.push(r.by_pack())?;
                }
                copies.clear();
            }
            match next {
                Some(n) => {
                    report.indexed_chunks += u64::from(n.indexed);
                    copies.push(n);
                }
                None => break,
            }
        }
        while next_ref.is_some() {
            report.missing_chunks += 1;
            next_ref = referenced.next_record()?;
        }
        drop(records);
        drop(referenced);
        if report.missing_chunks > 0 {
            warn!(
                missing = report.missing_chunks,
                "Snapshots reference chunks that no index lists; `backflow verify` names them."
            );
        }

        // Per pack: keep, rewrite, delete or quarantine.
        let mut condemned = Sorter::<LOCATED_SIZE>::new(&self.scratch, "condemned", false);
        let mut doomed = Sorter::<16>::new(&self.scratch, "doomed", false);
        let mut by_pack = by_pack.finish()?;
        let mut group: Vec<Located> = Vec::new();
        let by_pack_path = self.scratch.join("by-pack");
        let mut repacked_one = false;
        let mut adopted = HashSet::new();
        let mut quarantine = Vec::new();
        loop {
            let next = by_pack
                .next_record()?
                .map(|b| Located::decode(&b, true, &by_pack_path))
                .transpose()?;
            if let Some(first) = group.first()
                && next.is_none_or(|n| n.pack != first.pack)
            {
                let pack = first.pack;
                let orphan = group.iter().all(|r| !r.indexed);
                let fate = self.settle_pack(
                    &group,
                    options,
                    &session,
                    writer.as_mut(),
                    &mut condemned,
                    &frames,
                    &mut report,
                )?;
                match fate {
                    Fate::Keep if orphan => {
                        adopted.insert(pack);
                    }
                    Fate::Keep | Fate::Gone => {}
                    Fate::Delete if orphan => {}
                    Fate::Delete => doomed.push(pack.0)?,
                    Fate::Quarantine => {
                        adopted.insert(pack);
                        quarantine.push(pack.to_hex());
                    }
                }
                let leaves = fate == Fate::Quarantine || (fate == Fate::Delete && !orphan);
                if leaves && !repacked_one {
                    repacked_one = true;
                    kill_point("repacking");
                }
                group.clear();
            }
            match next {
                Some(n) => group.push(n),
                None => break,
            }
        }
        if let Some(writer) = writer {
            writer.finish()?;
        }
        drop(by_pack);
        if !adopted.is_empty() {
            info!(
                packs = adopted.len(),
                "Packs no index named hold chunks that snapshots use: indexed again (or quarantined)."
            );
        }
        let orphans: Vec<String> = orphans
            .iter()
            .filter(|id| !adopted.contains(id))
            .map(PackId::to_hex)
            .collect();
        let cycle: CycleId = rand::random();
        if options.dry_run {
            return Ok(CycleState {
                version: STATE_VERSION,
                cycle: hex(&cycle),
                phase: Phase::Condemned,
                marked: BTreeSet::new(),
                old_index: Vec::new(),
                new_index: None,
                users: None,
                orphans,
                quarantine,
                report,
            });
        }

        // Publish: the new index, the condemned chunks and doomed packs, the state; then the old index goes.
        let new_index = self.write_index(&session)?;
        kill_point("indexed");
        let store = &*self.store;
        let fence = fence(store, LockMode::Exclusive)?;
        write_list(
            store,
            GcPaths::CONDEMNED,
            &self.scratch.join("condemned.list"),
            &cycle,
            condemned.finish()?,
        )?;
        let doomed_count = write_list(
            store,
            GcPaths::DOOMED,
            &self.scratch.join("doomed.list"),
            &cycle,
            doomed.finish()?,
        )?;
        let mut state = CycleState {
            version: STATE_VERSION,
            cycle: hex(&cycle),
            phase: Phase::Condemned,
            marked: marked.into_iter().collect(),
            old_index: old_index
                .into_iter()
                .filter(|n| Some(n) != new_index.as_ref())
                .collect(),
            new_index,
            users: None,
            orphans,
            quarantine,
            report,
        };
        store_state(&*self.store, &state)?;
        kill_point("published");
        self.remove_old_index(&state)?;
        kill_point("old-index-removed");
        state.users = Some(live_users(&*self.store, self.own_user.as_deref(), None)?);
        store_state(&*self.store, &state)?;
        drop(fence);
        kill_point("users-listed");
        info!(
            condemned = state.report.chunks_removed,
            packs = doomed_count,
            orphans = state.orphans.len(),
            quarantined = state.quarantine.len(),
            "Garbage collection: unreferenced chunks taken out of the index."
        );
        Ok(state)
    }

    /// A snapshot the gc cannot read stops it: it must know every chunk a snapshot uses. The message names
    /// the command that removes the snapshot.
    fn unreadable_snapshot(&self, id: &str, e: RepoError) -> RepoError {
        RepoError::InvalidArgument(format!(
            "garbage collection stopped before changing anything: snapshot {id} cannot be read ({e}); a gc must \
             know every chunk a snapshot uses. If `backflow verify` confirms the damage, forget the snapshot: \
             `backflow forget --repo {} --snapshot {id}`",
            self.root.display()
        ))
    }

    /// Checks the frame (header, trailer, footer) of the packs that may be damaged or that nothing else
    /// describes: every pack with a damage mark (a copy's, or its frame's: `verify` marks a pack whose
    /// header, trailer or footer is damaged) and every orphan. The trailer entries of orphans and of damaged
    /// packs join `records` as copies the index does not list (a damaged pack's trailer is read without
    /// trusting its checksum: each copy is checked against its digest before it is used).
    fn read_suspect_trailers(
        &self,
        orphans: &[PackId],
        marks: &DamageMarks,
        records: &mut Sorter<LOCATED_SIZE>,
    ) -> Result<Frames> {
        let mut frames = Frames::default();
        let orphan_set: HashSet<PackId> = orphans.iter().copied().collect();
        let suspects: BTreeSet<PackId> = marks
            .copies()
            .iter()
            .map(|c| c.pack)
            .chain(marks.frames())
            .chain(orphans.iter().copied())
            .collect();
        for id in suspects {
            let key = pack_key(&id);
            let path = self.store.display_key(&key);
            let entries = match read_stored_pack_trailer(&*self.store, &key) {
                Ok(t) if orphan_set.contains(&id) => t.entries,
                Ok(_) => Vec::new(),
                Err(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e @ (RepoError::Corrupt { .. } | RepoError::UnsupportedVersion { .. })) => {
                    warn!(pack = %path.display(), error = %e,
                          "A pack's header, trailer or footer is damaged: what snapshots use is salvaged, the pack quarantined.");
                    frames.damaged.insert(id);
                    salvage_entries(&*self.store, &key)?
                }
                Err(e) => return Err(e),
            };
            frames.checked.insert(id);
            for e in &entries {
                records.push(Located::from_trailer(id, e).by_digest())?;
            }
        }
        Ok(frames)
    }

    /// Decides which copy of one digest is live. `copies` are all the copies of the digest the index files
    /// and the suspect trailers list. An unreferenced digest has none. A referenced one keeps one healthy copy
    /// (not marked damaged, not in a pack whose frame is damaged; one the index lists first). When it has no
    /// healthy copy, each copy is read and checked against the digest until one checks out, and that one is
    /// stored again (salvaged): the old copies are then all dead. When none checks out, the best copy stays
    /// live: nothing that might still be read is ever dropped, and its mark stays.
    fn settle_digest(
        &self,
        copies: &mut Vec<Located>,
        referenced: bool,
        marks: &DamageMarks,
        frames: &Frames,
        writer: Option<&mut PackWriter>,
        report: &mut GcReport,
    ) -> Result<()> {
        // The same copy listed twice (two index files after a killed gc, or the index and a trailer) counts
        // once, as the index's.
        copies.sort_by_key(|r| (r.pack, r.offset, !r.indexed));
        copies.dedup_by(|later, earlier| {
            later.pack == earlier.pack && later.offset == earlier.offset
        });
        if !referenced {
            return Ok(());
        }
        let marked = |r: &Located| marks.contains_at(&r.digest, r.pack, r.offset);
        let healthy = |r: &Located| {
            !marked(r) && (frames.damaged.is_empty() || !frames.damaged.contains(&r.pack))
        };
        let choice = copies
            .iter()
            .position(|r| r.indexed && healthy(r))
            .or_else(|| copies.iter().position(healthy));
        if let Some(i) = choice {
            copies[i].live = true;
            return Ok(());
        }
        // No healthy copy. Unmarked copies first (a damaged frame leaves the blobs intact), indexed first.
        let mut order: Vec<usize> = (0..copies.len()).collect();
        order.sort_by_key(|&i| (marked(&copies[i]), !copies[i].indexed));
        for &i in &order {
            let r = copies[i];
            match self.read_checked(&r) {
                Ok(stored) => {
                    if let Some(writer) = writer {
                        writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
                    }
                    report.bytes_written += stored.data.len() as u64;
                    report.chunks_salvaged += 1;
                    debug!(chunk = %r.digest, pack = %r.pack, offset = r.offset, "Chunk salvaged.");
                    if report.chunks_salvaged == 1 {
                        kill_point("salvaging");
                    }
                    return Ok(());
                }
                Err(e) => {
                    debug!(chunk = %r.digest, pack = %r.pack, offset = r.offset, error = %e,
                           "A copy to salvage does not check out.");
                }
            }
        }
        let best = copies.iter().position(|r| r.indexed).unwrap_or(0);
        copies[best].live = true;
        copies[best].unsalvageable = true;
        report.chunks_unsalvageable += 1;
        warn!(chunk = %copies[best].digest, copies = copies.len(),
              "No stored copy of a chunk that snapshots use decodes to its digest; it stays (marked) until a backup \
               of a VM that still has the data stores it again.");
        Ok(())
    }

    /// Decides one pack from its records (index records, and trailer entries of orphans and damaged packs).
    #[allow(clippy::too_many_arguments)]
    fn settle_pack(
        &self,
        group: &[Located],
        options: &GcOptions,
        session: &SessionShared,
        mut writer: Option<&mut PackWriter>,
        condemned: &mut Sorter<LOCATED_SIZE>,
        frames: &Frames,
        report: &mut GcReport,
    ) -> Result<Fate> {
        let pack = group[0].pack;
        let orphan = group.iter().all(|r| !r.indexed);
        let live: u64 = group
            .iter()
            .filter(|r| r.live)
            .map(|r| u64::from(r.stored_len))
            .sum();
        let total: u64 = group.iter().map(|r| u64::from(r.stored_len)).sum();
        let dead = total - live;
        let keep = |report: &mut GcReport| -> Result<Fate> {
            session.add_pack(pack, &group.iter().map(Located::entry).collect::<Vec<_>>())?;
            report.packs_kept += 1;
            Ok(Fate::Keep)
        };
        let key = pack_key(&pack);
        let path = self.store.display_key(&key);
        let size = match self.store.stat(&key) {
            Ok(Some(st)) => st.size,
            _ if orphan => return Ok(Fate::Gone),
            // A pack the index names but that is gone: `verify` reports it; the gc leaves its records.
            _ => return keep(report),
        };
        let keep_as_is =
            dead == 0 || (live > 0 && dead * 100 < u64::from(options.repack_threshold) * total);
        let mut damaged_frame = frames.damaged.contains(&pack);
        if !damaged_frame && !keep_as_is && !frames.checked.contains(&pack) {
            // Checked before anything leaves the pack: a damaged one is quarantined, never deleted.
            damaged_frame = match read_stored_pack_trailer(&*self.store, &key) {
                Ok(_) => false,
                Err(e @ (RepoError::Corrupt { .. } | RepoError::UnsupportedVersion { .. })) => {
                    warn!(pack = %path.display(), error = %e,
                          "A pack's header, trailer or footer is damaged: what snapshots use is salvaged, the pack quarantined.");
                    true
                }
                Err(e) => return Err(e),
            };
        }
        // Dead indexed copies leave the index; until the sweep, restores find them in `gc/condemned`.
        let condemn = |condemned: &mut Sorter<LOCATED_SIZE>, removed: &mut u64| -> Result<()> {
            for r in group.iter().filter(|r| !r.live && r.indexed) {
                condemned.push(r.by_digest())?;
                *removed += 1;
            }
            Ok(())
        };
        if damaged_frame {
            // Its live copies were taken for healthy (the frame damage was found only now): each is checked
            // and stored again. Unsalvageable copies leave the index with the pack (their marks stay).
            for r in group.iter().filter(|r| r.live && !r.unsalvageable) {
                match self.read_checked(r) {
                    Ok(stored) => {
                        if let Some(writer) = writer.as_deref_mut() {
                            writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
                        }
                        report.bytes_written += stored.data.len() as u64;
                        report.chunks_salvaged += 1;
                    }
                    Err(e) => {
                        warn!(pack = %pack, chunk = %r.digest, error = %e,
                              "A chunk of a damaged pack does not decode to its digest.");
                        report.chunks_unsalvageable += 1;
                    }
                }
            }
            // Taken out of the index, not out of the repository: not counted as removed.
            condemn(condemned, &mut 0)?;
            report.packs_quarantined.push(pack.to_hex());
            return Ok(Fate::Quarantine);
        }
        if keep_as_is {
            if dead > 0 {
                report.unused_bytes_kept += dead;
                report.packs_kept_with_unused += 1;
            }
            return keep(report);
        }
        if live == 0 {
            if !orphan {
                report.packs_removed += 1;
                report.bytes_deleted += size;
            }
            condemn(condemned, &mut report.chunks_removed)?;
            return Ok(Fate::Delete);
        }
        // Rewrite. A live copy known to be damaged keeps the pack as it is: it is the best copy there is.
        if group.iter().any(|r| r.live && r.unsalvageable) {
            report.damaged_packs.push(pack.to_hex());
            return keep(report);
        }
        let live_chunks = group.iter().filter(|r| r.live);
        match writer {
            // A dry run: what the rewrite would copy.
            None => report.bytes_written += live,
            Some(writer) => {
                for r in live_chunks.clone() {
                    // Each chunk is checked against its digest before it is copied. A damaged one keeps the
                    // pack as it is (the copies already made are harmless duplicates).
                    let stored = match self.read_checked(r) {
                        Ok(stored) => stored,
                        Err(e) => {
                            warn!(pack = %pack, chunk = %r.digest, error = %e,
                                  "A chunk of a pack to rewrite is damaged; the pack stays as it is.");
                            report.damaged_packs.push(pack.to_hex());
                            return keep(report);
                        }
                    };
                    writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
                    report.bytes_written += stored.data.len() as u64;
                }
            }
        }
        report.chunks_moved += live_chunks.count() as u64;
        report.packs_repacked += 1;
        condemn(condemned, &mut report.chunks_removed)?;
        if !orphan {
            report.bytes_deleted += size;
        }
        Ok(Fate::Delete)
    }

    /// Removes the index files the cycle replaced, once its own index file is in place.
    fn remove_old_index(&self, state: &CycleState) -> Result<()> {
        if let Some(new) = &state.new_index
            && !self.store.exists(&format!("index/{new}"))?
        {
            return Err(stopped(
                &self.root,
                RepoError::corrupt(
                    self.store.display_key(GcPaths::STATE),
                    format!(
                        "the cycle's index file index/{new} is missing; the old index files are left in place"
                    ),
                ),
            ));
        }
        let old: Vec<String> = state
            .old_index
            .iter()
            .map(|n| format!("index/{n}"))
            .collect();
        self.store.delete_many(&old)
    }

    /// Phase 2: once every handle open at condemnation has closed, stores again what backups used meanwhile,
    /// then deletes. `None` when there was nothing to finish; a report with `waiting_for` when it must wait.
    fn finish_cycle(&self, mut state: CycleState) -> Result<Option<GcReport>> {
        // The lists must be whole and of this cycle before anything is done with them.
        let store = &*self.store;
        check_lists(store, &state).map_err(|(_, e)| stopped(&self.root, e))?;
        if state.phase == Phase::Condemned {
            let fence = fence(store, LockMode::Exclusive)?;
            if state.users.is_none() {
                // Killed between publishing and listing: finish that step.
                self.remove_old_index(&state)?;
                state.users = Some(live_users(&*self.store, self.own_user.as_deref(), None)?);
                store_state(&*self.store, &state)?;
            }
            let listed = state.users.clone().unwrap_or_default();
            let alive = live_users(store, self.own_user.as_deref(), Some(&listed))?;
            if !alive.is_empty() {
                let mut report = state.report.clone();
                report.waiting_for = Some(format!(
                    "{} repository handle(s) (backups or restores) that were open when the chunks were condemned \
                     still run; {} chunks and {} bytes of packs are freed by the next gc after they end",
                    alive.len(),
                    report.chunks_removed,
                    report.bytes_deleted
                ));
                info!(users = ?alive, "Garbage collection: deletion waits for running backups.");
                return Ok(Some(report));
            }
            state.report.chunks_kept_for_running_backups = self.resurrect(&state)?;
            kill_point("resurrected");
            state.phase = Phase::Sweeping;
            store_state(&*self.store, &state)?;
            store.delete_many(&self.forgotten_keys()?)?;
            drop(fence);
            kill_point("sweeping");
        }
        self.sweep(&state)?;
        store.delete(GcPaths::CONDEMNED)?;
        store.delete(GcPaths::DOOMED)?;
        store.delete(GcPaths::STATE)?;
        kill_point("swept");
        let unmarked = self.repo.drop_marks_of_deleted_packs()?;
        if unmarked > 0 {
            info!(marks = unmarked, "Damage marks of deleted packs dropped.");
        }
        info!(
            removed = state.report.chunks_removed,
            freed = state.report.bytes_deleted,
            quarantined = state.quarantine.len(),
            "Garbage collection finished."
        );
        Ok(Some(state.report))
    }

    /// Condemned chunks that snapshots committed since the mark reference (backups that ran during the gc
    /// found them in the index they had open): copied into a new pack and indexed again. Returns how many.
    fn resurrect(&self, state: &CycleState) -> Result<u64> {
        let mut referenced = Sorter::<32>::new(&self.scratch, "remarked", true);
        let mut any = false;
        for id in self.repo.manifest_ids()? {
            if state.marked.contains(&id) {
                continue;
            }
            any = true;
            let snapshot = self
                .repo
                .open_snapshot(&id)
                .map_err(|e| self.unreadable_snapshot(&id, e))?;
            push_references(&snapshot, &mut referenced)?
                .map_err(|e| self.unreadable_snapshot(&id, e))?;
        }
        {
            for key in self.forgotten_keys()? {
                let path = self.store.display_key(&key);
                let Some(id) = key
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.strip_suffix(".snap"))
                    .map(str::to_owned)
                else {
                    continue;
                };
                if state.marked.contains(&id) {
                    continue;
                }
                any = true;
                // A manifest forgotten because it is damaged tells nothing; no backup could have taken it
                // as its parent either (opening it checks it).
                let read = match Snapshot::open(&*self.store, &key, &id) {
                    Ok(snapshot) => push_references(&snapshot, &mut referenced)?,
                    Err(e) => Err(e),
                };
                if let Err(e) = read {
                    warn!(file = %path.display(), error = %e, "A forgotten snapshot cannot be read; skipped.");
                }
            }
        }
        if !any {
            return Ok(0);
        }
        let mut referenced = referenced.finish()?;
        let mut condemned =
            ListReader::<LOCATED_SIZE>::open(&*self.store, GcPaths::CONDEMNED, &state.cycle_id())
                .map_err(|e| stopped(&self.root, e))?;
        let session = self.writer_session("resurrect")?;
        let mut writer = PackWriter::new(session.clone());
        let mut next_ref = referenced.next_record()?;
        let mut count = 0u64;
        let mut last: Option<Digest> = None;
        while let Some(b) = condemned
            .next_record()
            .map_err(|e| stopped(&self.root, e))?
        {
            let r = Located::decode(&b, false, &self.store.display_key(GcPaths::CONDEMNED))?;
            while let Some(d) = next_ref
                && d < r.digest.0
            {
                next_ref = referenced.next_record()?;
            }
            if next_ref != Some(r.digest.0) || last == Some(r.digest) {
                continue;
            }
            let stored = match self.read_checked(&r) {
                Ok(stored) => stored,
                // Another copy may be healthy; this one cannot serve. (A failed read is not skipped: the
                // sweep would then delete what this snapshot needs.)
                Err(e @ (RepoError::Corrupt { .. } | RepoError::Decode { .. })) => {
                    warn!(chunk = %r.digest, pack = %r.pack, error = %e, "A condemned copy a backup used is damaged.");
                    continue;
                }
                Err(e) => return Err(e),
            };
            writer.add(r.digest, r.codec, r.raw_len, &stored.data)?;
            last = Some(r.digest);
            count += 1;
        }
        writer.finish()?;
        self.write_index(&session)?;
        if count > 0 {
            info!(
                chunks = count,
                "Chunks used by backups that ran during the gc were stored again."
            );
        }
        Ok(count)
    }

    /// Every pack an index file names now, sorted: what a sweep must not touch. An index file that cannot
    /// be read stops the sweep, since it might name a pack the lists say to delete.
    fn named_packs(&self) -> Result<Sorted<16>> {
        let mut named = Sorter::<16>::new(&self.scratch, "named", true);
        for name in self.store.list_names("index/")? {
            if !name.ends_with(".idx") {
                continue;
            }
            match IndexStream::open(&*self.store, &format!("index/{name}"), |id| {
                named.push(id.0)
            }) {
                Ok(_) => {}
                Err(RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(stopped(&self.root, e)),
            }
        }
        named.finish()
    }

    /// Deletes the doomed packs and the orphans that still no index names, and moves the damaged packs to the
    /// quarantine. First, without changing anything: no doomed pack may be named by an index file (a list
    /// that says otherwise is not this repository's, and the gc stops), and orphans and damaged packs that
    /// an index file names (a backup that ran meanwhile committed them) stay where they are.
    fn sweep(&self, state: &CycleState) -> Result<()> {
        let cycle = state.cycle_id();
        let store = &*self.store;
        let doomed_path = store.display_key(GcPaths::DOOMED);
        let has_doomed = store.exists(GcPaths::DOOMED)?;
        let mut spared: HashSet<PackId> = HashSet::new();
        {
            let mut named = self.named_packs()?;
            let mut doomed = if has_doomed {
                Some(
                    ListReader::<16>::open(store, GcPaths::DOOMED, &cycle)
                        .map_err(|e| stopped(&self.root, e))?,
                )
            } else {
                None
            };
            let mut previous: Option<[u8; 16]> = None;
            let mut next_doomed = || -> Result<Option<[u8; 16]>> {
                let Some(list) = doomed.as_mut() else {
                    return Ok(None);
                };
                let next = list.next_record().map_err(|e| stopped(&self.root, e))?;
                if let Some(id) = next {
                    if previous.is_some_and(|p| p >= id) {
                        return Err(stopped(
                            &self.root,
                            RepoError::corrupt(&doomed_path, "the pack ids are not in order"),
                        ));
                    }
                    previous = Some(id);
                }
                Ok(next)
            };
            let mut others: Vec<PackId> = state
                .orphans
                .iter()
                .chain(&state.quarantine)
                .filter_map(|h| h.parse().ok())
                .collect();
            others.sort();
            let mut doomed_id = next_doomed()?;
            while let Some(id) = named.next_record()? {
                while let Some(d) = doomed_id
                    && d < id
                {
                    doomed_id = next_doomed()?;
                }
                if doomed_id == Some(id) {
                    return Err(stopped(
                        &self.root,
                        RepoError::corrupt(
                            &doomed_path,
                            format!(
                                "it lists pack {} for deletion, but an index file names that pack: the list does \
                                 not match this repository's index",
                                PackId(id)
                            ),
                        ),
                    ));
                }
                if others.binary_search(&PackId(id)).is_ok() {
                    spared.insert(PackId(id));
                }
            }
            while doomed_id.is_some() {
                doomed_id = next_doomed()?;
            }
        }

        // The first pack alone (a kill point follows it), then in batches: one directory fsync per batch
        // and directory rather than per pack.
        let mut batch: Vec<String> = Vec::new();
        let mut first = true;
        let mut remove = |id: PackId, batch: &mut Vec<String>| -> Result<()> {
            if first {
                first = false;
                store.delete(&pack_key(&id))?;
                kill_point("deleting");
                return Ok(());
            }
            batch.push(pack_key(&id));
            if batch.len() >= SWEEP_BATCH {
                store.delete_many(batch)?;
                batch.clear();
            }
            Ok(())
        };
        if has_doomed {
            let mut doomed = ListReader::<16>::open(store, GcPaths::DOOMED, &cycle)?;
            while let Some(id) = doomed.next_record()? {
                remove(PackId(id), &mut batch)?;
            }
        }
        // A session that committed after the listing named its packs in its own index file.
        for id in state
            .orphans
            .iter()
            .filter_map(|h| h.parse::<PackId>().ok())
        {
            if !spared.contains(&id) {
                remove(id, &mut batch)?;
            }
        }
        store.delete_many(&batch)?;
        let mut first = true;
        for id in state
            .quarantine
            .iter()
            .filter_map(|h| h.parse::<PackId>().ok())
        {
            if spared.contains(&id) {
                continue;
            }
            self.move_to_quarantine(&id)?;
            if first {
                first = false;
                kill_point("quarantining");
            }
        }
        Ok(())
    }

    /// Moves a pack to `quarantine/packs/XX/ID.pack`, durably. One already moved (a resumed sweep) is fine.
    fn move_to_quarantine(&self, id: &PackId) -> Result<()> {
        let (from, to) = (pack_key(id), quarantine_key(id));
        match self.store.rename(&from, &to) {
            Ok(()) => {}
            Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        warn!(pack = %self.store.display_key(&from).display(), to = %self.store.display_key(&to).display(),
              "Damaged pack moved to the quarantine.");
        Ok(())
    }
}

/// Packs a sweep deletes per [`Store::delete_many`] call.
const SWEEP_BATCH: usize = 1024;

/// An index file that cannot be read whole stops the gc before it changes anything: the records it holds
/// would be lost from the new index.
fn damaged_index(e: RepoError) -> RepoError {
    RepoError::InvalidArgument(format!(
        "garbage collection stopped before changing anything: {e}; run `backflow rebuild-index` first"
    ))
}

/// Pushes the digests `snapshot` references. The outer error is the sort's (the gc's scratch space), the
/// inner one the manifest's: the callers treat a manifest that cannot be read differently.
fn push_references(snapshot: &Snapshot, sorter: &mut Sorter<32>) -> Result<Result<()>> {
    for disk in 0..snapshot.meta().disks.len() {
        for r in snapshot.chunks(disk) {
            match r {
                Ok(ChunkRef::Data(d)) => sorter.push(d.0)?,
                Ok(ChunkRef::Zero) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gc_state::state_problems;
    use crate::{Codec, InitOptions};
    use std::path::Path;

    use crate::crash_tests::{CHUNK, chunk};

    fn digest(seed: u64) -> Digest {
        Digest(*blake3::hash(&chunk(seed)).as_bytes())
    }

    /// Two chunks per pack.
    fn init(dir: &Path) -> Repository {
        Repository::init_with(
            dir,
            &InitOptions {
                chunk_size: CHUNK as u32,
                pack_target_size: 2 * CHUNK as u64,
            },
        )
        .unwrap()
    }

    /// Commits a snapshot of one disk whose chunks are `seeds`.
    fn commit(repo: &Repository, seeds: &[u64]) -> String {
        let (session, writer) = crate::crash_tests::start(repo, seeds);
        writer.finish().unwrap();
        session.commit(None).unwrap().id
    }

    fn assert_restores(repo: &Repository, id: &str, seeds: &[u64]) {
        let snap = repo.open_snapshot(id).unwrap();
        for (i, &s) in seeds.iter().enumerate() {
            let ChunkRef::Data(d) = snap.chunk(0, i as u64).unwrap() else {
                panic!("zero chunk")
            };
            assert_eq!(repo.load_chunk(&d).unwrap(), chunk(s), "chunk {i} of {id}");
        }
    }

    fn flip(path: &Path, offset: u64) {
        use std::os::unix::fs::FileExt;
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    }

    #[test]
    fn located_records_round_trip_in_both_orders() {
        let r = Located {
            digest: Digest([3; 32]),
            pack: PackId([9; 16]),
            offset: 123_456,
            stored_len: 77,
            raw_len: 65536,
            codec: Codec::Zstd,
            live: true,
            indexed: true,
            unsalvageable: true,
        };
        let p = Path::new("x");
        assert_eq!(Located::decode(&r.by_pack(), true, p).unwrap(), r);
        assert_eq!(Located::decode(&r.by_digest(), false, p).unwrap(), r);
        // Big-endian offsets sort a pack's records in file order.
        let later = Located {
            offset: 123_457,
            ..r
        };
        assert!(r.by_pack() < later.by_pack());
    }

    #[test]
    fn salvage_entries_finds_the_trailer_of_a_pack_whose_frame_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_with(
            dir.path(),
            &InitOptions {
                chunk_size: CHUNK as u32,
                pack_target_size: 8 * CHUNK as u64,
            },
        )
        .unwrap();
        commit(&repo, &[1, 2, 3, 4, 5]);
        let id = repo.list_packs().unwrap()[0];
        let path = pack_path(repo.path(), &id);
        let store = &**repo.store();
        let key = pack_key(&id);
        let good = read_stored_pack_trailer(store, &key).unwrap();
        assert_eq!(good.entries.len(), 5);
        let len = path.metadata().unwrap().len();
        // A damaged header (the pack id), then a damaged footer magic (the trailer is found by walking
        // back from where the footer starts), each time every entry.
        for at in [19, len - 1] {
            flip(&path, at);
            assert!(read_stored_pack_trailer(store, &key).is_err());
            assert_eq!(
                salvage_entries(store, &key).unwrap(),
                good.entries,
                "byte {at}"
            );
            flip(&path, at);
        }
        // An entry that does not decode is left out; the others are found.
        let codec_of_third = good.data_end + 2 * crate::pack::PACK_ENTRY_SIZE as u64 + 48;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&[9], codec_of_third)
            })
            .unwrap();
        let mut expected = good.entries.clone();
        expected.remove(2);
        assert_eq!(salvage_entries(store, &key).unwrap(), expected);
        // A truncated pack has no trailer to find; nothing is made up.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(salvage_entries(store, &key).unwrap().is_empty());
    }

    /// A pack whose footer is damaged drops out of a rebuilt index (its trailer cannot be trusted), so gc
    /// sees it as an orphan, which it used to delete with the chunks snapshots use. Its trailer is found and
    /// its blobs salvaged, and the pack is quarantined.
    #[test]
    fn an_orphan_with_a_damaged_footer_is_salvaged_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(dir.path());
        let id = commit(&repo, &[1, 2, 3, 4, 5, 6]);
        let loc = repo.lookup(&digest(1)).unwrap().unwrap();
        let path = pack_path(repo.path(), &loc.pack);
        flip(&path, path.metadata().unwrap().len() - 1);
        let rebuilt = repo.rebuild_index().unwrap();
        assert_eq!(rebuilt.damaged_packs.len(), 1, "{rebuilt:?}");
        assert!(repo.lookup(&digest(1)).unwrap().is_none());

        let report = repo.gc(&GcOptions::default()).unwrap();
        assert_eq!(report.orphan_packs, 1, "{report:?}");
        assert_eq!(report.chunks_salvaged, 2, "{report:?}");
        assert_eq!(
            report.packs_quarantined,
            vec![loc.pack.to_hex()],
            "{report:?}"
        );
        assert_eq!(report.missing_chunks, 0, "{report:?}");
        assert!(!path.exists());
        assert!(quarantine_path(repo.path(), &loc.pack).exists());
        assert_restores(&repo, &id, &[1, 2, 3, 4, 5, 6]);
        assert!(repo.verify(true).unwrap().is_ok());
        // The quarantine is deleted only on request.
        let again = repo.gc(&GcOptions::default()).unwrap();
        assert_eq!(again.quarantine_dropped, 0);
        let dropped = repo
            .gc(&GcOptions {
                drop_quarantine: true,
                ..GcOptions::default()
            })
            .unwrap();
        assert_eq!(dropped.quarantine_dropped, 1, "{dropped:?}");
        assert!(!quarantine_path(repo.path(), &loc.pack).exists());
        assert_restores(&repo, &id, &[1, 2, 3, 4, 5, 6]);
    }

    /// A pack with a damaged header and, besides, one damaged blob: the intact chunk is salvaged, the
    /// damaged one cannot be. The pack goes to the quarantine, the damaged chunk keeps its mark and verify
    /// keeps naming its snapshot, until a backup that has the data stores it again.
    #[test]
    fn an_unsalvageable_chunk_of_a_quarantined_pack_keeps_its_mark() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(dir.path());
        let id = commit(&repo, &[1, 2, 3, 4]);
        let bad = repo.lookup(&digest(2)).unwrap().unwrap();
        let path = pack_path(repo.path(), &bad.pack);
        flip(&path, 19);
        flip(&path, bad.offset + 100);
        let checked = repo.verify_and_mark(true).unwrap();
        assert_eq!(
            checked.marked, 1,
            "the damaged blob only: the others read back whole {checked:?}"
        );

        let report = repo.gc(&GcOptions::default()).unwrap();
        assert_eq!(
            (report.chunks_salvaged, report.chunks_unsalvageable),
            (1, 1),
            "{report:?}"
        );
        assert_eq!(report.packs_quarantined, vec![bad.pack.to_hex()]);
        assert!(quarantine_path(repo.path(), &bad.pack).exists());
        let marks = repo.damage_marks().unwrap().copies();
        assert_eq!(marks.len(), 1, "{marks:?}");
        assert_eq!((marks[0].digest, marks[0].pack), (digest(2), bad.pack));
        let after = repo.verify(false).unwrap();
        assert!(!after.is_ok());
        let named: Vec<_> = after
            .problems
            .iter()
            .filter(|p| !p.healed)
            .map(|p| (p.digest, p.snapshots.clone()))
            .collect();
        assert_eq!(named, vec![(digest(2), vec![id.clone()])], "{after:?}");
        assert_eq!(repo.load_chunk(&digest(1)).unwrap(), chunk(1));

        // A backup that still has the data stores it again; the next gc drops the mark.
        let again = commit(&repo, &[2]);
        repo.gc(&GcOptions::default()).unwrap();
        assert!(repo.damage_marks().unwrap().is_empty());
        assert_restores(&repo, &id, &[1, 2, 3, 4]);
        assert_restores(&repo, &again, &[2]);
        assert!(repo.verify(true).unwrap().is_ok());
    }

    /// A cycle left pending by a handle open during the gc: `first` forgotten, its packs doomed.
    fn pending(dir: &Path) -> (Repository, String) {
        let repo = init(dir);
        let first = commit(&repo, &[1, 2, 3]);
        let second = commit(&repo, &[4, 5, 6, 7]);
        let stale = Repository::open(dir).unwrap();
        stale.lookup(&digest(1)).unwrap();
        repo.forget(&first).unwrap();
        let waiting = repo
            .gc(&GcOptions {
                repack_threshold: 0,
                ..GcOptions::default()
            })
            .unwrap();
        assert!(waiting.waiting_for.is_some(), "{waiting:?}");
        (repo, second)
    }

    /// A well-formed doomed list of the pending cycle (right magic, cycle id and checksum) that names the
    /// packs the index still names: the sweep stops before deleting anything.
    #[test]
    fn a_crafted_doomed_list_naming_live_packs_stops_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, second) = pending(dir.path());
        let state = load_state(&**repo.store()).unwrap().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let mut all = Sorter::<16>::new(scratch.path(), "all", true);
        for id in repo.list_packs().unwrap() {
            all.push(id.0).unwrap();
        }
        write_list(
            &**repo.store(),
            GcPaths::DOOMED,
            &scratch.path().join("list"),
            &state.cycle_id(),
            all.finish().unwrap(),
        )
        .unwrap();
        let packs = repo.list_packs().unwrap();
        let e = repo.gc(&GcOptions::default()).unwrap_err().to_string();
        assert!(
            e.contains("doomed-packs") && e.contains("an index file names that pack"),
            "{e}"
        );
        assert!(e.contains("--reset-state"), "{e}");
        assert_eq!(repo.list_packs().unwrap(), packs);
        assert_restores(&repo, &second, &[4, 5, 6, 7]);
        // Verify names the list only for what it can see (checksum and cycle are right); the repair
        // works: the abandoned cycle's doomed packs are orphans for the next collection.
        let report = repo
            .gc(&GcOptions {
                reset_state: true,
                ..GcOptions::default()
            })
            .unwrap();
        assert!(
            report.state_reset && report.waiting_for.is_none(),
            "{report:?}"
        );
        assert_restores(&repo, &second, &[4, 5, 6, 7]);
        let verified = repo.verify(true).unwrap();
        assert!(verified.is_ok(), "{verified:#?}");
    }

    /// A state with a valid checksum whose names would lead outside `index/`, or remove the cycle's own
    /// index: the gc stops and names the file.
    #[test]
    fn a_crafted_state_cannot_make_gc_remove_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, second) = pending(dir.path());
        let paths = &**repo.store();
        let original = load_state(paths).unwrap().unwrap();
        let manifest = crate::snapshot::snapshot_path(repo.path(), &second);
        let traversal = format!("../snapshots/{second}.snap");
        type Craft = fn(&mut CycleState, &str);
        let crafted: [(&str, Craft); 3] = [
            ("is not the name of an index file", |s, t| {
                s.old_index.push(t.to_owned());
                s.users = None;
            }),
            ("listed among the old ones", |s, _| {
                let own = s.new_index.clone().unwrap();
                s.old_index.push(own);
                s.users = None;
            }),
            ("is not a pack id", |s, t| s.orphans.push(t.to_owned())),
        ];
        for (expected, craft) in crafted {
            let mut state = original.clone();
            craft(&mut state, &traversal);
            store_state(paths, &state).unwrap();
            let e = repo.gc(&GcOptions::default()).unwrap_err().to_string();
            assert!(
                e.contains("state.json") && e.contains(expected),
                "{expected}: {e}"
            );
            assert!(manifest.exists());
            let problems = state_problems(&**repo.store());
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].error.contains(expected), "{problems:?}");
        }
        store_state(paths, &original).unwrap();
        assert!(state_problems(&**repo.store()).is_empty());
        let done = repo.gc(&GcOptions::default()).unwrap();
        assert!(done.earlier_cycle.is_some(), "{done:?}");
        assert_restores(&repo, &second, &[4, 5, 6, 7]);
    }
}
