//! `verify`: finds what cannot be restored, and which restore points it affects.
//!
//! Passes, each streaming so memory stays bounded whatever the repository size:
//! 1. The pack tables of all index files give the set of packs the index refers to (16 bytes per pack).
//! 2. Each of those packs: present, footer and trailer intact (checksum), and with `read_data` every blob
//!    read, decoded and hashed against its digest.
//! 3. Each index file streamed: checksum, sort order, and every record against the state of its pack.
//! 4. Only if something is damaged: the index files streamed again to find, for each damaged copy, another
//!    copy of the same chunk that is neither damaged nor marked `damaged` (a later backup stored the chunk
//!    again). Such a copy heals the problem: lookups return it, so no restore point needs the damaged one.
//! 5. Each manifest opened (checksum) and every referenced digest looked up in the index (which skips marked
//!    copies: a chunk whose every copy is marked is reported [`ProblemKind::MarkedDamaged`]).
//! 6. Only if something is damaged and not healed: a second pass over the manifests attaches to each damaged
//!    digest the ids of the snapshots that use it (the set of damaged digests is small; the set of all
//!    referenced digests would not be).

use std::collections::{HashMap, HashSet};
use std::fs::File;

use crate::error::{RepoError, Result, read_exact_at};
use crate::index::{IndexFile, scan_index};
use crate::pack::{PACK_HEADER_SIZE, pack_path, read_pack_trailer};
use crate::{ChunkRef, Digest, PackId, Repository, decode_into};

/// Digests already found in the index during the manifest pass, so that the many snapshots sharing a chunk do
/// not look it up again. Cleared when full: about 50 MiB at most.
const CONFIRMED_CACHE: usize = 1 << 20;

/// What is wrong with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A snapshot references a digest that no index file lists.
    MissingFromIndex,
    /// The index points into a pack file that does not exist.
    PackMissing,
    /// The index points past the end of a pack that is shorter than its blobs.
    PackTruncated,
    /// The pack exists but its header, footer or trailer is damaged, so it cannot be read safely.
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
    /// Another, healthy copy of the same chunk is stored (a later backup stored it again): lookups return
    /// that one, so this damaged copy affects no restore point. A garbage collection removes it.
    pub healed: bool,
}

/// A file that could not be read at all.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DamagedFile {
    pub path: String,
    pub error: String,
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
    /// Packs referenced by the index whose structure was checked.
    pub packs: u64,
    /// Blobs read, decoded and hashed (`read_data` only).
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Packs no index refers to: left by interrupted sessions (or being written right now), for gc.
    pub unreferenced_packs: u64,
    pub damaged_snapshots: Vec<DamagedFile>,
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
}

impl VerifyReport {
    /// Nothing is damaged that a restore needs: every snapshot restores. Healed problems (damaged copies with
    /// a healthy copy elsewhere) do not count.
    pub fn is_ok(&self) -> bool {
        self.problems.iter().all(|p| p.healed)
            && self.damaged_snapshots.is_empty()
            && self.damaged_index_files.is_empty()
            && self.damaged_packs.is_empty()
    }
}

enum PackState {
    Unchecked,
    Ok { data_end: u64 },
    Missing,
    Damaged { len: u64, error: String },
}

struct Problems {
    list: Vec<ChunkProblem>,
    by_digest: HashMap<Digest, Vec<usize>>,
}

impl Problems {
    fn push(&mut self, p: ChunkProblem) {
        self.by_digest
            .entry(p.digest)
            .or_default()
            .push(self.list.len());
        self.list.push(p);
    }
}

pub(crate) fn verify(repo: &Repository, read_data: bool) -> Result<VerifyReport> {
    let root = repo.path();
    repo.refresh()?;
    let mut report = VerifyReport {
        read_data,
        ..VerifyReport::default()
    };
    let mut problems = Problems {
        list: Vec::new(),
        by_digest: HashMap::new(),
    };

    // 1. Packs named by index files.
    let index_dir = root.join("index");
    let mut index_paths: Vec<_> = std::fs::read_dir(&index_dir)
        .map_err(|e| RepoError::io("list", &index_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    index_paths.sort();
    let mut packs: HashMap<PackId, PackState> = HashMap::new();
    let mut readable = Vec::new();
    for path in index_paths {
        report.index_files += 1;
        match IndexFile::open(&path).and_then(|f| f.pack_ids()) {
            Ok(ids) => {
                for id in ids {
                    packs.entry(id).or_insert(PackState::Unchecked);
                }
                readable.push(path);
            }
            Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                report.index_files -= 1;
            }
            Err(e) => report.damaged_index_files.push(DamagedFile {
                path: path.display().to_string(),
                error: e.to_string(),
            }),
        }
    }

    // 2. The packs themselves.
    let mut blob = Vec::new();
    let mut plain = Vec::new();
    let mut ids: Vec<PackId> = packs.keys().copied().collect();
    ids.sort();
    for id in ids {
        let path = pack_path(root, &id);
        let state = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report.damaged_packs.push(DamagedFile {
                    path: path.display().to_string(),
                    error: "missing".into(),
                });
                PackState::Missing
            }
            Err(e) => return Err(RepoError::io("stat", path, e)),
            Ok(meta) => match read_pack_trailer(&path) {
                Err(e) => {
                    report.damaged_packs.push(DamagedFile {
                        path: path.display().to_string(),
                        error: e.to_string(),
                    });
                    PackState::Damaged {
                        len: meta.len(),
                        error: e.to_string(),
                    }
                }
                Ok(trailer) => {
                    report.packs += 1;
                    if read_data {
                        let file =
                            File::open(&path).map_err(|e| RepoError::io("open pack", &path, e))?;
                        for e in &trailer.entries {
                            blob.resize(e.stored_len as usize, 0);
                            let read = read_exact_at(&file, &mut blob, e.offset, &path, "chunk");
                            report.chunks_read += 1;
                            report.bytes_read += u64::from(e.stored_len);
                            let fail = match read
                                .and_then(|()| decode_into(e.codec, &blob, e.raw_len, &mut plain))
                            {
                                Err(err @ RepoError::Corrupt { .. }) => {
                                    Some((ProblemKind::PackTruncated, err.to_string()))
                                }
                                Err(err @ RepoError::Io { .. }) => return Err(err),
                                Err(err) => Some((ProblemKind::DecodeFailed, err.to_string())),
                                Ok(())
                                    if blake3::hash(&plain).as_bytes() != e.digest.as_bytes() =>
                                {
                                    Some((
                                        ProblemKind::DigestMismatch,
                                        format!(
                                            "decodes to data with digest {}",
                                            blake3::hash(&plain).to_hex()
                                        ),
                                    ))
                                }
                                Ok(()) => None,
                            };
                            if let Some((kind, detail)) = fail {
                                problems.push(ChunkProblem {
                                    digest: e.digest,
                                    pack: Some(id),
                                    offset: Some(e.offset),
                                    kind,
                                    detail,
                                    snapshots: Vec::new(),
                                    healed: false,
                                });
                            }
                        }
                    }
                    PackState::Ok {
                        data_end: trailer.data_end,
                    }
                }
            },
        };
        packs.insert(id, state);
    }

    // 3. Index files against their packs.
    for path in &readable {
        let scanned = scan_index(path, |rec, pack| {
            let (kind, detail) = match packs.get(&pack) {
                Some(PackState::Ok { data_end }) => {
                    if rec.offset + u64::from(rec.stored_len) <= *data_end
                        && rec.offset >= PACK_HEADER_SIZE as u64
                    {
                        return;
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
                Some(PackState::Damaged { len, error }) => {
                    let kind = if rec.offset + u64::from(rec.stored_len) > *len {
                        ProblemKind::PackTruncated
                    } else {
                        ProblemKind::PackDamaged
                    };
                    (kind, error.clone())
                }
                Some(PackState::Unchecked) | None => return,
            };
            problems.push(ChunkProblem {
                digest: rec.digest,
                pack: Some(pack),
                offset: Some(rec.offset),
                kind,
                detail,
                snapshots: Vec::new(),
                healed: false,
            });
        });
        match scanned {
            Ok(n) => report.index_records += n,
            Err(e) => report.damaged_index_files.push(DamagedFile {
                path: path.display().to_string(),
                error: e.to_string(),
            }),
        }
    }

    // 4. Healthy copies of damaged chunks.
    let marks = repo.damage_marks()?;
    if !problems.list.is_empty() {
        let bad: HashSet<(PackId, u64)> = problems
            .list
            .iter()
            .filter_map(|p| Some((p.pack?, p.offset?)))
            .collect();
        let mut healthy: HashSet<Digest> = HashSet::new();
        for path in &readable {
            // A file that cannot be scanned was reported in pass 3; it offers no healthy copies.
            let _ = scan_index(path, |rec, pack| {
                if !problems.by_digest.contains_key(&rec.digest)
                    || bad.contains(&(pack, rec.offset))
                    || !matches!(packs.get(&pack), Some(PackState::Ok { .. }))
                {
                    return;
                }
                if !marks.contains_at(&rec.digest, pack, rec.offset) {
                    healthy.insert(rec.digest);
                }
            });
        }
        for p in &mut problems.list {
            p.healed = healthy.contains(&p.digest);
        }
    }

    // 5. Manifests against the index.
    let mut confirmed: HashSet<Digest> = HashSet::new();
    let mut good_snapshots = Vec::new();
    for id in repo.snapshot_ids()? {
        report.snapshots += 1;
        let snap = match repo.open_snapshot(&id) {
            Ok(s) => s,
            Err(e) => {
                let path = crate::snapshot::snapshot_path(root, &id);
                report.damaged_snapshots.push(DamagedFile {
                    path: path.display().to_string(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        for disk in 0..snap.meta().disks.len() {
            for r in snap.chunks(disk) {
                let ChunkRef::Data(d) = r? else { continue };
                report.chunk_refs += 1;
                if confirmed.contains(&d) || problems.by_digest.contains_key(&d) {
                    continue;
                }
                let missing = match repo.locate(&d) {
                    Ok(Some(_)) => None,
                    Ok(None) if marks.is_marked(&d) => Some((
                        ProblemKind::MarkedDamaged,
                        "every stored copy is marked damaged (in the repository's `damaged` file)"
                            .to_owned(),
                    )),
                    Ok(None) => Some((
                        ProblemKind::MissingFromIndex,
                        "no index file lists it".to_owned(),
                    )),
                    Err(e) => Some((ProblemKind::MissingFromIndex, format!("lookup failed: {e}"))),
                };
                match missing {
                    None => {
                        if confirmed.len() >= CONFIRMED_CACHE {
                            confirmed.clear();
                        }
                        confirmed.insert(d);
                    }
                    Some((kind, detail)) => problems.push(ChunkProblem {
                        digest: d,
                        pack: None,
                        offset: None,
                        kind,
                        detail,
                        snapshots: Vec::new(),
                        healed: false,
                    }),
                }
            }
        }
        good_snapshots.push(id);
    }
    for (path, error) in repo.damaged_index_files() {
        let path = path.display().to_string();
        if !report.damaged_index_files.iter().any(|d| d.path == path) {
            report.damaged_index_files.push(DamagedFile { path, error });
        }
    }

    // 6. Which snapshots use the damaged chunks that are not healed.
    if problems.list.iter().any(|p| !p.healed) {
        for id in &good_snapshots {
            let snap = repo.open_snapshot(id)?;
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
    }
    report.problems = problems.list;
    let indexed: HashSet<PackId> = packs.keys().copied().collect();
    report.unreferenced_packs = repo
        .list_packs()?
        .iter()
        .filter(|p| !indexed.contains(p))
        .count() as u64;
    report.side_files.extend(crate::gc::state_problems(root));
    Ok(report)
}
