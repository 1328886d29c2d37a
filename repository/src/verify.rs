//! `verify`: finds what cannot be restored, and which restore points it affects.
//!
//! Its verdicts follow the rule restores follow ([`Repository::find_copy`]: the first copy not marked
//! damaged, in the index files, the chunks a pending gc condemned, then the pack trailers of packs no intact
//! index file names), so that every restore failure is predicted: a snapshot `verify --read-data` does not
//! name restores, and one it names does not. Passes, each streaming so memory stays bounded whatever the
//! repository size:
//! 1. The index files lookups use, held open for the whole run (a gc that replaces them meanwhile cannot
//!    make them vanish from under it: the same protection restores get), each checked against its checksum.
//!    A file that fails is reported and no longer used; its chunks are found from the pack trailers.
//! 2. Every pack those index files name, and every pack none names (the recovery index's): present, footer
//!    and trailer intact (checksum), and with `read_data` every blob read, decoded and hashed against its
//!    digest.
//! 3. Each index file streamed: sort order, and every record against the state of its pack. The blobs of a
//!    pack whose header, footer or trailer is damaged are read at the records' offsets and checked (always:
//!    restores read such a pack that way, so only its blobs tell whether they can).
//! 4. Each manifest opened (checksum) and every referenced digest resolved with the restore rule, skipping
//!    the copies found bad above: a digest with no good copy is a problem (or adds its snapshots to the
//!    damaged copies'). A damaged copy of a digest that has a good copy is reported healed.
//! 5. Only if something is damaged and not healed: a second pass over the manifests attaches to each damaged
//!    digest the ids of the snapshots that use it (the set of damaged digests is small; the set of all
//!    referenced digests would not be).
//! 6. Side files that never block a restore (damage marks, gc state, session records, the copies of
//!    `config`): each problem is reported with what was done about it.
//!
//! A snapshot forgotten while verify runs is skipped, not reported: verify runs beside backups, `forget`
//! and gc, and must never call healthy data damaged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::damaged::DamagedCopy;
use crate::error::{RepoError, Result, read_exact_at};
use crate::index::IndexFile;
use crate::pack::{PACK_HEADER_SIZE, PackEntry, pack_key, read_stored_pack_trailer};
use crate::recovery::Recovery;
use crate::{
    ChunkLocation, ChunkRef, DamageMarks, DamagedFile, Digest, PackId, Repository, decode_into,
};

/// Digests already resolved during the manifest pass, so that the many snapshots sharing a chunk do not look
/// it up again. Cleared when full: about 50 MiB at most.
const CONFIRMED_CACHE: usize = 1 << 20;

/// What is wrong with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A snapshot references a digest that no index file lists and no pack holds.
    MissingFromIndex,
    /// The index points into a pack file that does not exist.
    PackMissing,
    /// The index points past the end of a pack that is shorter than its blobs.
    PackTruncated,
    /// The pack's header, footer or trailer is damaged, and the blob the index points to does not read back
    /// as its chunk.
    PackDamaged,
    /// The index record points outside the pack's data region.
    OutOfBounds,
    /// The stored blob does not decode to its recorded length.
    DecodeFailed,
    /// The blob decodes, but to bytes with another digest.
    DigestMismatch,
    /// Every stored copy of the chunk is marked `damaged` by an earlier verify, and this one did not read it
    /// again (no `read_data`); the next backup of a VM that still has the data stores it again.
    MarkedDamaged,
}

/// One damaged or missing chunk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChunkProblem {
    pub digest: Digest,
    pub pack: Option<PackId>,
    pub offset: Option<u64>,
    pub kind: ProblemKind,
    pub detail: String,
    /// Ids of the snapshots that reference the chunk (empty: no restore point is affected).
    pub snapshots: Vec<String>,
    /// Another, healthy copy of the same chunk is stored (a later backup stored it again): restores read
    /// that one, so this damaged copy affects no restore point. A garbage collection removes it.
    pub healed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub read_data: bool,
    /// Manifests checked (including damaged ones).
    pub snapshots: u64,
    /// Data chunk references across all readable manifests.
    pub chunk_refs: u64,
    pub index_files: u64,
    pub index_records: u64,
    /// Packs whose structure was checked: those the index names, and those no intact index file names.
    pub packs: u64,
    /// Blobs read, decoded and hashed (`read_data`, and the blobs of packs with a damaged frame).
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Packs no intact index file refers to: left by interrupted sessions (or being written right now), for
    /// gc; or named only by a damaged index file.
    pub unreferenced_packs: u64,
    /// Referenced chunks found only in the trailers of packs that no intact index file names (a damaged or
    /// lost index file): they restore, slowly; `rebuild-index` indexes them again.
    pub unindexed_chunks: u64,
    pub damaged_snapshots: Vec<DamagedFile>,
    /// The snapshot id of each of `damaged_snapshots`, in the same order (what `forget --snapshot` takes).
    pub damaged_snapshot_ids: Vec<String>,
    /// Ids of the snapshots that cannot be restored whole, sorted: those using a damaged chunk that has no
    /// good copy, and those whose manifest is damaged. Every other snapshot restores.
    pub unrestorable_snapshots: Vec<String>,
    pub damaged_index_files: Vec<DamagedFile>,
    pub damaged_packs: Vec<DamagedFile>,
    /// Damaged side files: damage marks, gc state and lists, session records, one copy of `config`. None of
    /// them blocks a restore or a backup; `error` says what is wrong and what was done about it (repaired,
    /// or ignored until repaired).
    pub side_files: Vec<DamagedFile>,
    pub problems: Vec<ChunkProblem>,
    /// Damaged copies of this report recorded in `damaged` ([`Repository::verify_and_mark`]; 0 otherwise).
    pub marked: u64,
    /// Of those, how many were not marked before.
    pub new_marks: u64,
    /// Marks dropped because their copy read back whole (`read_data`; [`Repository::verify_and_mark`]).
    pub cleared_marks: u64,
}

impl VerifyReport {
    /// Nothing is damaged that a restore needs, and nothing slows restores down: every snapshot restores.
    /// Healed problems (damaged copies with a healthy copy elsewhere) and repaired side files do not count.
    pub fn is_ok(&self) -> bool {
        self.problems.iter().all(|p| p.healed)
            && self.damaged_snapshots.is_empty()
            && self.damaged_index_files.is_empty()
            && self.damaged_packs.is_empty()
            && self.unindexed_chunks == 0
    }
}

enum PackState {
    Unchecked,
    Ok {
        data_end: u64,
    },
    Missing,
    /// Header, footer or trailer damaged: blobs are read at the index's offsets, bounded by the length.
    FrameDamaged {
        len: u64,
        error: String,
    },
}

struct Problems {
    list: Vec<ChunkProblem>,
    by_digest: HashMap<Digest, Vec<usize>>,
    /// Copies found bad, by location: the restore rule skips them.
    bad: HashSet<(PackId, u64)>,
}

impl Problems {
    fn push(&mut self, p: ChunkProblem) {
        if let (Some(pack), Some(offset)) = (p.pack, p.offset) {
            self.bad.insert((pack, offset));
        }
        self.by_digest
            .entry(p.digest)
            .or_default()
            .push(self.list.len());
        self.list.push(p);
    }

    fn copy(
        &mut self,
        digest: Digest,
        pack: PackId,
        offset: u64,
        kind: ProblemKind,
        detail: String,
    ) {
        self.push(ChunkProblem {
            digest,
            pack: Some(pack),
            offset: Some(offset),
            kind,
            detail,
            snapshots: Vec::new(),
            healed: false,
        });
    }
}

/// What [`Repository::verify_and_mark`] records besides the problems.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    /// Marked copies that read back whole (with `read_data`): their marks go.
    pub good_marked: Vec<DamagedCopy>,
    /// Packs whose header, trailer or footer is damaged: frame marks, for gc.
    pub damaged_frames: Vec<PackId>,
    /// Packs whose frame read back whole: frame marks they had go.
    pub sound_frames: HashSet<PackId>,
}

/// Runs the passes of the module docs, one method of [`Verifier`] each.
pub(crate) fn verify(repo: &Repository, read_data: bool) -> Result<(VerifyReport, Findings)> {
    // A fresh listing: a handle that ran a gc, or lived through one, may still hold index files it replaced.
    repo.reload_index()?;
    let mut v = Verifier {
        repo,
        report: VerifyReport {
            read_data,
            ..VerifyReport::default()
        },
        problems: Problems {
            list: Vec::new(),
            by_digest: HashMap::new(),
            bad: HashSet::new(),
        },
        marks: repo.damage_marks()?,
        good_marked: Vec::new(),
        findings: Findings::default(),
        files: Vec::new(),
        packs: HashMap::new(),
        indexed: HashSet::new(),
        recovery: repo.recovery()?,
    };
    v.index_files()?;
    v.packs()?;
    v.index_records()?;
    let good_snapshots = v.manifests()?;
    v.snapshots_of_problems(&good_snapshots)?;
    v.report.problems = std::mem::take(&mut v.problems.list);
    v.report.unreferenced_packs = repo
        .list_packs()?
        .iter()
        .filter(|p| !v.indexed.contains(p))
        .count() as u64;
    v.report.unrestorable_snapshots = unrestorable(&v.report);

    // 6. Side files.
    v.report.side_files = side_file_problems(repo)?;
    // The recovery index was built for this run; a later restore through this handle builds its own.
    let Verifier {
        report,
        mut findings,
        good_marked,
        recovery,
        ..
    } = v;
    drop(recovery);
    *repo
        .recovery_slot()
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = None;
    findings.good_marked = good_marked;
    Ok((report, findings))
}

/// One verify run: what the passes learn, each pass adding to it for the next.
struct Verifier<'a> {
    repo: &'a Repository,
    report: VerifyReport,
    problems: Problems,
    marks: Arc<DamageMarks>,
    /// Marked copies that read back whole (passes 2 and 3).
    good_marked: Vec<DamagedCopy>,
    findings: Findings,
    /// The intact index files (pass 1), held open for the whole run.
    files: Vec<Arc<IndexFile>>,
    /// Every pack the index files or the recovery index name, and what pass 2 found it to be.
    packs: HashMap<PackId, PackState>,
    /// The packs the intact index files name.
    indexed: HashSet<PackId>,
    recovery: Arc<Recovery>,
}

impl Verifier<'_> {
    /// Pass 1: the index files, held open, checksums checked; the packs they and the recovery index name.
    fn index_files(&mut self) -> Result<()> {
        for (path, error) in self.repo.check_index_checksums()? {
            self.report.damaged_index_files.push(DamagedFile {
                path: path.display().to_string(),
                error,
            });
        }
        self.files = self.repo.index_files();
        self.report.index_files = (self.files.len() + self.report.damaged_index_files.len()) as u64;
        for file in &self.files {
            for id in file.pack_ids()? {
                self.packs.entry(id).or_insert(PackState::Unchecked);
            }
        }
        self.indexed = self.packs.keys().copied().collect();
        for id in &self.recovery.packs {
            self.packs.entry(*id).or_insert(PackState::Unchecked);
        }
        Ok(())
    }

    /// Pass 2: the packs themselves: present, frame intact, and with `read_data` every blob.
    fn packs(&mut self) -> Result<()> {
        let store = self.repo.store().clone();
        let mut ids: Vec<PackId> = self.packs.keys().copied().collect();
        ids.sort();
        for id in ids {
            let key = pack_key(&id);
            let path = store.display_key(&key);
            let indexed = self.indexed.contains(&id);
            let gone = |e: &RepoError| matches!(e, RepoError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
            let state = match store.stat(&key)? {
                // A pack no index names that a gc's sweep removed meanwhile (a killed session's): not damage.
                None if !indexed => {
                    self.packs.remove(&id);
                    continue;
                }
                None => {
                    self.report.damaged_packs.push(DamagedFile {
                        path: path.display().to_string(),
                        error: "missing".into(),
                    });
                    PackState::Missing
                }
                Some(meta) => match read_stored_pack_trailer(&*store, &key) {
                    Err(e) if gone(&e) && !indexed => {
                        self.packs.remove(&id);
                        continue;
                    }
                    Err(e) => {
                        self.report.damaged_packs.push(DamagedFile {
                            path: path.display().to_string(),
                            error: e.to_string(),
                        });
                        self.findings.damaged_frames.push(id);
                        PackState::FrameDamaged {
                            len: meta.size,
                            error: e.to_string(),
                        }
                    }
                    Ok(trailer) => {
                        self.report.packs += 1;
                        self.findings.sound_frames.insert(id);
                        if self.report.read_data
                            && !self.blobs(id, &key, &trailer.entries, indexed)?
                        {
                            self.packs.remove(&id);
                            continue;
                        }
                        PackState::Ok {
                            data_end: trailer.data_end,
                        }
                    }
                },
            };
            self.packs.insert(id, state);
        }
        Ok(())
    }

    /// Pass 2 with `read_data`: every blob of a pack whose frame is intact, read, decoded and hashed. False
    /// when the pack is gone and no index names it (a gc removed a killed session's pack meanwhile).
    fn blobs(
        &mut self,
        id: PackId,
        key: &str,
        entries: &[PackEntry],
        indexed: bool,
    ) -> Result<bool> {
        let store = self.repo.store().clone();
        let path = &store.display_key(key);
        let file = match store.open(key) {
            Ok(f) => f,
            Err(RepoError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && !indexed =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let mut blob = Vec::new();
        let mut plain = Vec::new();
        for e in entries {
            blob.resize(e.stored_len as usize, 0);
            let read = read_exact_at(&file, &mut blob, e.offset, path, "chunk");
            self.report.chunks_read += 1;
            self.report.bytes_read += u64::from(e.stored_len);
            let fail = match read.and_then(|()| decode_into(e.codec, &blob, e.raw_len, &mut plain))
            {
                Err(err @ RepoError::Corrupt { .. }) => {
                    Some((ProblemKind::PackTruncated, err.to_string()))
                }
                Err(err @ RepoError::Io { .. }) => return Err(err),
                Err(err) => Some((ProblemKind::DecodeFailed, err.to_string())),
                Ok(()) if blake3::hash(&plain).as_bytes() != e.digest.as_bytes() => Some((
                    ProblemKind::DigestMismatch,
                    format!(
                        "decodes to data with digest {}",
                        blake3::hash(&plain).to_hex()
                    ),
                )),
                Ok(()) => None,
            };
            match fail {
                Some((kind, detail)) => self.problems.copy(e.digest, id, e.offset, kind, detail),
                None if self.marks.contains_at(&e.digest, id, e.offset) => {
                    self.good_marked.push(DamagedCopy {
                        digest: e.digest,
                        pack: id,
                        offset: e.offset,
                    })
                }
                None => {}
            }
        }
        Ok(true)
    }

    /// Pass 3: index records against their packs.
    fn index_records(&mut self) -> Result<()> {
        let repo = self.repo;
        for file in &self.files {
            let mut stream = file.stream()?;
            let scanned = loop {
                let (rec, pack) = match stream.next_record() {
                    Ok(Some(r)) => r,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                self.report.index_records += 1;
                let (kind, detail) = match self.packs.get(&pack) {
                    Some(PackState::Ok { data_end }) => {
                        if rec.offset + u64::from(rec.stored_len) <= *data_end
                            && rec.offset >= PACK_HEADER_SIZE as u64
                        {
                            continue;
                        }
                        (
                            ProblemKind::OutOfBounds,
                            format!("the pack's data ends at {data_end}"),
                        )
                    }
                    Some(PackState::Missing) => (
                        ProblemKind::PackMissing,
                        "the pack file does not exist".to_owned(),
                    ),
                    Some(PackState::FrameDamaged { len, error }) => {
                        let loc = ChunkLocation {
                            pack,
                            offset: rec.offset,
                            stored_len: rec.stored_len,
                            raw_len: rec.raw_len,
                            codec: rec.codec,
                        };
                        self.report.chunks_read += 1;
                        self.report.bytes_read += u64::from(rec.stored_len);
                        match repo
                            .read_chunk(&loc)
                            .and_then(|stored| repo.plaintext(&rec.digest, &loc, &stored))
                        {
                            Ok(_) => {
                                if self.marks.contains_at(&rec.digest, pack, rec.offset) {
                                    self.good_marked.push(DamagedCopy {
                                        digest: rec.digest,
                                        pack,
                                        offset: rec.offset,
                                    });
                                }
                                continue;
                            }
                            Err(e) if rec.offset + u64::from(rec.stored_len) > *len => {
                                (ProblemKind::PackTruncated, format!("{error}; {e}"))
                            }
                            Err(e) => (ProblemKind::PackDamaged, format!("{error}; {e}")),
                        }
                    }
                    Some(PackState::Unchecked) | None => continue,
                };
                self.problems
                    .copy(rec.digest, pack, rec.offset, kind, detail);
            };
            // The checksum was checked in pass 1, so this is a file that changed since, or a sort order that
            // was wrong when it was written.
            if let Err(e) = scanned {
                self.report.damaged_index_files.push(DamagedFile {
                    path: file.path.display().to_string(),
                    error: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Whether a restore finds a good copy of `d`: the restore rule, minus the copies found bad.
    fn readable(&self, d: &Digest, good_marks: &HashSet<(PackId, u64)>) -> Result<bool> {
        let found = self.repo.find_copy(d, &mut |loc| {
            let at = (loc.pack, loc.offset);
            !self.problems.bad.contains(&at)
                && !matches!(self.packs.get(&loc.pack), Some(PackState::Missing))
                && (!self.marks.contains(d, loc) || good_marks.contains(&at))
        })?;
        Ok(found.is_some())
    }

    /// Pass 4: manifests, every referenced digest resolved with the restore rule, minus the copies found bad;
    /// the problems found before are healed or not. Returns the snapshots whose manifest could be read.
    fn manifests(&mut self) -> Result<Vec<String>> {
        let repo = self.repo;
        let good_marks: HashSet<(PackId, u64)> = self
            .good_marked
            .iter()
            .map(|c| (c.pack, c.offset))
            .collect();
        let recovered_before = self.recovery.found();
        let mut confirmed: HashSet<Digest> = HashSet::new();
        let mut unreadable: Vec<ChunkProblem> = Vec::new();
        let mut unreadable_digests: HashSet<Digest> = HashSet::new();
        let mut good_snapshots = Vec::new();
        for id in repo.manifest_ids()? {
            let snap = match repo.open_snapshot(&id) {
                Ok(s) => s,
                // Forgotten since the listing: not damage.
                Err(RepoError::SnapshotNotFound { .. }) => continue,
                Err(e) => {
                    self.report.snapshots += 1;
                    let path = repo
                        .store()
                        .display_key(&crate::snapshot::snapshot_key(&id));
                    self.report.damaged_snapshots.push(DamagedFile {
                        path: path.display().to_string(),
                        error: e.to_string(),
                    });
                    self.report.damaged_snapshot_ids.push(id);
                    continue;
                }
            };
            self.report.snapshots += 1;
            for disk in 0..snap.meta().disks.len() {
                for r in snap.chunks(disk) {
                    let ChunkRef::Data(d) = r? else { continue };
                    self.report.chunk_refs += 1;
                    if confirmed.contains(&d) {
                        continue;
                    }
                    if self.readable(&d, &good_marks)? {
                        if confirmed.len() >= CONFIRMED_CACHE {
                            confirmed.clear();
                        }
                        confirmed.insert(d);
                        continue;
                    }
                    if self.problems.by_digest.contains_key(&d) || !unreadable_digests.insert(d) {
                        continue;
                    }
                    let (kind, detail) = if self.marks.is_marked(&d) {
                        (
                            ProblemKind::MarkedDamaged,
                            "every stored copy is marked damaged (in the repository's `damaged` file)",
                        )
                    } else {
                        (
                            ProblemKind::MissingFromIndex,
                            "no index file lists it and no pack holds it",
                        )
                    };
                    unreadable.push(ChunkProblem {
                        digest: d,
                        pack: None,
                        offset: None,
                        kind,
                        detail: detail.to_owned(),
                        snapshots: Vec::new(),
                        healed: false,
                    });
                }
            }
            good_snapshots.push(id);
        }
        for p in unreadable {
            self.problems.push(p);
        }
        self.report.unindexed_chunks = self.recovery.found() - recovered_before;
        let digests: Vec<Digest> = self.problems.by_digest.keys().copied().collect();
        for d in digests {
            let healed = self.readable(&d, &good_marks)?;
            for &i in &self.problems.by_digest[&d] {
                self.problems.list[i].healed = healed;
            }
        }
        Ok(good_snapshots)
    }

    /// Pass 5: which snapshots use the damaged chunks that are not healed (only if there are any).
    fn snapshots_of_problems(&mut self, good_snapshots: &[String]) -> Result<()> {
        let problems = &mut self.problems;
        if problems.list.iter().all(|p| p.healed) {
            return Ok(());
        }
        for id in good_snapshots {
            let snap = match self.repo.open_snapshot(id) {
                Ok(s) => s,
                Err(RepoError::SnapshotNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            for disk in 0..snap.meta().disks.len() {
                for r in snap.chunks(disk) {
                    let ChunkRef::Data(d) = r? else { continue };
                    if let Some(at) = problems.by_digest.get(&d) {
                        for &i in at {
                            if problems.list[i].healed {
                                continue;
                            }
                            let users = &mut problems.list[i].snapshots;
                            if users.last() != Some(id) {
                                users.push(id.clone());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The snapshots `report` says cannot be restored whole, sorted.
fn unrestorable(report: &VerifyReport) -> Vec<String> {
    let mut ids: Vec<String> = report
        .problems
        .iter()
        .filter(|p| !p.healed)
        .flat_map(|p| p.snapshots.iter().cloned())
        .chain(report.damaged_snapshot_ids.iter().cloned())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Problems of the files that never block a restore or a backup (module docs, pass 6).
fn side_file_problems(repo: &Repository) -> Result<Vec<DamagedFile>> {
    let mut out = repo.marks_problems()?;
    out.extend(repo.session_record_problems()?);
    out.extend(crate::config::copy_problems(&**repo.store()));
    out.extend(crate::gc_state::state_problems(&**repo.store()));
    Ok(out)
}
