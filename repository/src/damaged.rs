//! Damage marks: the stored chunk copies that `verify` found damaged, kept in the file `damaged` so that
//! lookups stop returning them and the next backup that still has the data stores it again.
//!
//! The file is text, one copy per line after a header, sorted and without duplicates, and ends with the
//! BLAKE3 of everything before its last line:
//! ```text
//! backflow-damaged 2
//! <digest, 64 hex> <pack id, 32 hex> <offset of the blob in the pack, decimal>
//! frame <pack id, 32 hex>
//! checksum <64 hex>
//! ```
//! A `frame` line marks a pack whose header, trailer or footer is damaged while the blobs the index points to
//! read back whole: lookups and restores go on using them, and a gc salvages them and quarantines the pack.
//! (Version 1, written by earlier releases, has no checksum and no frame lines; it is read, and written as
//! version 2 on the next change.) A mark names a *location*, not a digest: a later backup that stores the
//! same chunk again writes a new, healthy copy elsewhere, and the mark keeps pointing at the old one only. A
//! garbage collection drops the marks of the packs it deleted (`Repository::drop_marks_of_deleted_packs`),
//! and `verify --read-data` drops the marks of copies that read back whole.
//!
//! [`Repository::mark_damaged`] merges new marks into the file under an exclusive `flock` on `damaged.lock`
//! (two verifies marking at once must not lose each other's marks), writes `damaged.tmp`, fsyncs it, renames
//! it over `damaged` and fsyncs the directory: readers see the old set or the new one, never half of one.
//! Readers take no lock.
//!
//! **A damaged marks file blocks nothing.** It is a side file: lines that cannot be read are skipped, a
//! wrong header or checksum is noted, and every reader goes on with the marks it could read, with a warning.
//! `verify` reports the damage and `verify_and_mark` writes the file again from what it read and what it
//! found (repair). The price of a lost mark is what it was before marks existed: a lookup may return that
//! damaged copy until the next `verify --read-data` marks it again.
//!
//! A [`Repository`] reads the file at its first lookup and checks at most once per [`RECHECK`] whether it was
//! replaced (inode, length and modification time), so a long-running backup sees marks a verify wrote after
//! it started, while a lookup costs no system call. The set is small (damage is rare) and kept in memory.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use std::path::Path;

use crate::error::{RepoError, Result};
use crate::format::{hex, parse_hex};
use crate::store::{PutMode, Stat, Store};
use crate::verify::ChunkProblem;
use crate::{ChunkLocation, Digest, PackId, Repository, VerifyReport};

/// The marks file, in the repository's root.
pub(crate) const FILE: &str = "damaged";
/// Taken exclusively while marks are merged and written.
const LOCK_FILE: &str = "damaged.lock";
/// The first line: format name and version.
const HEADER: &str = "backflow-damaged 2";
/// The first line of files written by earlier releases (no checksum line).
const HEADER_V1: &str = "backflow-damaged 1";
/// The prefix of a pack's frame mark, followed by the pack id (hex).
const FRAME_PREFIX: &str = "frame ";
/// The last line's prefix, followed by the BLAKE3 (hex) of every byte before that line.
const CHECKSUM_PREFIX: &str = "checksum ";

/// How long a handle trusts the marks it read before it checks the file again. A backup that starts after a
/// verify marked chunks sees the marks at once (it reads them at its first lookup); one already running sees
/// them within this time.
pub const RECHECK: Duration = Duration::from_secs(1);

/// A file modified this recently may be replaced again without its modification time changing (coarse
/// timestamps), so it is read again at each check until it is older.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Largest marks file read (about 550,000 marks): a bigger one is damaged, not a list of damaged chunks, and
/// only its first this many bytes are read.
const MAX_FILE_LEN: u64 = 64 << 20;

/// One stored copy of a chunk that is damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DamagedCopy {
    pub digest: Digest,
    pub pack: PackId,
    /// Offset of the stored blob in the pack.
    pub offset: u64,
}

/// The set of damaged copies, as read from `damaged`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DamageMarks {
    copies: HashSet<DamagedCopy>,
    /// The digests of `copies`, for [`DamageMarks::is_marked`].
    digests: HashSet<Digest>,
    /// Packs whose header, trailer or footer is damaged while their blobs read back whole: nothing a lookup
    /// skips (a restore reads those blobs), but what a gc salvages and quarantines.
    frames: std::collections::BTreeSet<PackId>,
}

impl DamageMarks {
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty() && self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether the copy of `digest` at `loc` is marked damaged.
    pub fn contains(&self, digest: &Digest, loc: &ChunkLocation) -> bool {
        self.contains_at(digest, loc.pack, loc.offset)
    }

    /// Whether the copy of `digest` at `offset` in `pack` is marked damaged. Without marks, no hashing.
    pub(crate) fn contains_at(&self, digest: &Digest, pack: PackId, offset: u64) -> bool {
        !self.copies.is_empty()
            && self.copies.contains(&DamagedCopy {
                digest: *digest,
                pack,
                offset,
            })
    }

    /// Whether any copy of `digest` is marked.
    pub fn is_marked(&self, digest: &Digest) -> bool {
        self.digests.contains(digest)
    }

    /// The marks, sorted.
    pub fn copies(&self) -> Vec<DamagedCopy> {
        let mut all: Vec<DamagedCopy> = self.copies.iter().copied().collect();
        all.sort_unstable();
        all
    }

    /// The packs marked for a damaged frame, sorted.
    pub fn frames(&self) -> Vec<PackId> {
        self.frames.iter().copied().collect()
    }

    /// Marks a pack's frame damaged; returns whether it is new.
    pub fn insert_frame(&mut self, pack: PackId) -> bool {
        self.frames.insert(pack)
    }

    /// Keeps the frame marks `keep` takes; returns how many went.
    pub(crate) fn retain_frames(&mut self, mut keep: impl FnMut(&PackId) -> bool) -> usize {
        let before = self.frames.len();
        self.frames.retain(|p| keep(p));
        before - self.frames.len()
    }

    /// Adds a mark; returns whether it is new.
    pub fn insert(&mut self, copy: DamagedCopy) -> bool {
        self.digests.insert(copy.digest);
        self.copies.insert(copy)
    }

    /// Keeps the marks `keep` takes; returns how many went.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&DamagedCopy) -> bool) -> usize {
        let before = self.copies.len();
        self.copies.retain(|c| keep(c));
        self.digests = self.copies.iter().map(|c| c.digest).collect();
        before - self.copies.len()
    }

    /// Parses the file's text strictly: the first problem is an error naming its line (`path` names the
    /// file). Readers use [`DamageMarks::parse_lenient`].
    pub fn parse(text: &str, path: &Path) -> Result<DamageMarks> {
        let (marks, problems) = DamageMarks::parse_lenient(text);
        match problems.into_iter().next() {
            None => Ok(marks),
            Some(problem) => Err(RepoError::corrupt(
                path,
                format!(
                    "{problem} (the file lists damaged chunks; `backflow verify --read-data` writes it again)"
                ),
            )),
        }
    }

    /// Parses what can be parsed: the marks of every well-formed line, and a description of each problem
    /// ("line N: ..."): a wrong header, a malformed line, a missing or wrong checksum.
    pub fn parse_lenient(text: &str) -> (DamageMarks, Vec<String>) {
        let mut problems = Vec::new();
        let mut marks = DamageMarks::default();
        let mut lines = text.split_inclusive('\n');
        let checked = match lines.next().map(|l| l.trim_end_matches('\n')) {
            Some(HEADER) => true,
            Some(HEADER_V1) => false,
            Some(other) => {
                problems.push(format!(
                    "line 1: expected the header {HEADER:?}, found {:?}",
                    truncate(other)
                ));
                true
            }
            None => {
                problems.push(format!("line 1: empty; expected the header {HEADER:?}"));
                return (marks, problems);
            }
        };
        let mut hashed = text.len();
        let mut checksum = None;
        let mut offset = text.find('\n').map_or(text.len(), |i| i + 1);
        for (i, raw) in lines.enumerate() {
            let number = i + 2;
            let line = raw.trim_end_matches('\n');
            let at = offset;
            offset += raw.len();
            if line.is_empty() {
                continue;
            }
            if let Some(sum) = line.strip_prefix(CHECKSUM_PREFIX) {
                hashed = at;
                checksum = Some((number, sum.to_owned()));
                continue;
            }
            if let Some((n, _)) = &checksum {
                problems.push(format!("line {number}: a mark after the checksum line {n}"));
                checksum = None;
                hashed = text.len();
            }
            if let Some(pack) = line.strip_prefix(FRAME_PREFIX) {
                match parse_hex::<16>(pack) {
                    Some(id) => {
                        marks.insert_frame(PackId(id));
                    }
                    None => problems.push(format!(
                        "line {number}: {:?} is not a pack id (32 hex digits)",
                        truncate(pack)
                    )),
                }
                continue;
            }
            match parse_line(line) {
                Ok(copy) => {
                    marks.insert(copy);
                }
                Err(what) => problems.push(format!("line {number}: {what}")),
            }
        }
        if checked {
            match checksum {
                None => {
                    problems.push("no checksum line at the end: the file is cut short".to_owned())
                }
                Some((number, sum)) => {
                    let actual = blake3::hash(&text.as_bytes()[..hashed]);
                    if parse_hex::<32>(&sum) != Some(*actual.as_bytes()) {
                        problems.push(format!(
                            "line {number}: checksum mismatch: the file changed after it was written"
                        ));
                    }
                }
            }
        }
        (marks, problems)
    }

    /// The file's text: the header, the marks sorted, then the checksum line.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(HEADER.len() + 1 + self.copies.len() * 120 + 74);
        out.push_str(HEADER);
        out.push('\n');
        for c in self.copies() {
            out.push_str(&format!(
                "{} {} {}\n",
                hex(&c.digest.0),
                hex(&c.pack.0),
                c.offset
            ));
        }
        for p in &self.frames {
            out.push_str(FRAME_PREFIX);
            out.push_str(&hex(&p.0));
            out.push('\n');
        }
        let sum = blake3::hash(out.as_bytes()).to_hex();
        out.push_str(CHECKSUM_PREFIX);
        out.push_str(&sum);
        out.push('\n');
        out
    }
}

/// At most 80 characters of `s`, for error messages about lines that may be anything.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// One mark line: `DIGEST PACK OFFSET`.
fn parse_line(line: &str) -> std::result::Result<DamagedCopy, String> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [digest, pack, offset] = fields[..] else {
        return Err(format!(
            "expected `DIGEST PACK OFFSET`, found {:?}",
            truncate(line)
        ));
    };
    let digest = parse_hex::<32>(digest)
        .map(Digest)
        .ok_or_else(|| format!("{:?} is not a digest (64 hex digits)", truncate(digest)))?;
    let pack = parse_hex::<16>(pack)
        .map(PackId)
        .ok_or_else(|| format!("{:?} is not a pack id (32 hex digits)", truncate(pack)))?;
    let offset = offset
        .parse::<u64>()
        .map_err(|_| format!("{:?} is not an offset", truncate(offset)))?;
    Ok(DamagedCopy {
        digest,
        pack,
        offset,
    })
}

/// Reads the marks file at `path` leniently: a missing file is no marks; what cannot be read is described in
/// the second value (only I/O errors other than a missing file are errors).
fn load(store: &dyn Store) -> Result<(DamageMarks, Vec<String>)> {
    let Some(mut bytes) = crate::format::read_bounded(store, FILE, MAX_FILE_LEN)? else {
        return Ok((DamageMarks::default(), Vec::new()));
    };
    let mut extra = Vec::new();
    if bytes.len() as u64 > MAX_FILE_LEN {
        bytes.truncate(MAX_FILE_LEN as usize);
        extra.push(format!(
            "more than the {MAX_FILE_LEN} bytes a list of damaged chunks may have; only the first were read"
        ));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            extra.push("not text (invalid UTF-8); the readable lines were used".to_owned());
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    let (marks, mut problems) = DamageMarks::parse_lenient(&text);
    problems.extend(extra);
    Ok((marks, problems))
}

/// What identifies one version of the file (it is replaced whole, never modified in place): its
/// [`Store::stat`].
type Stamp = Stat;

/// A handle's copy of the marks and when it last checked the file.
#[derive(Debug, Default)]
pub(crate) struct MarksCache {
    state: RwLock<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    marks: Arc<DamageMarks>,
    stamp: Option<Stamp>,
    /// `None`: never read, or forgotten by [`MarksCache::invalidate`].
    checked: Option<Instant>,
}

impl MarksCache {
    /// The marks, read again when the file was replaced and [`RECHECK`] has passed since the last check.
    pub(crate) fn current(&self, store: &dyn Store) -> Result<Arc<DamageMarks>> {
        let fresh = |s: &CacheState| s.checked.is_some_and(|at| at.elapsed() < RECHECK);
        {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            if fresh(&s) {
                return Ok(s.marks.clone());
            }
        }
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        if fresh(&s) {
            return Ok(s.marks.clone());
        }
        let now = store.stat(FILE)?;
        let racy = now.and_then(|n| n.modified).is_some_and(|m| {
            SystemTime::now()
                .duration_since(m)
                .map_or(true, |d| d < RACY_WINDOW)
        });
        if s.checked.is_none() || now != s.stamp || racy {
            // A file that cannot be opened or read leaves the handle unchecked: the next lookup tries again.
            let (marks, problems) = load(store)?;
            if !problems.is_empty() && (s.stamp != now || s.checked.is_none()) {
                tracing::warn!(file = %store.display_key(FILE).display(), problems = %problems.join("; "),
                    "The list of damaged chunks is damaged; going on with the marks that could be read \
                     (`backflow verify --read-data` writes it again).");
            }
            s.marks = Arc::new(marks);
            s.stamp = now;
        }
        s.checked = Some(Instant::now());
        Ok(s.marks.clone())
    }

    /// Makes the next call read the file again (after this process wrote it).
    fn invalidate(&self) {
        self.state
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .checked = None;
    }
}

/// The damaged copy a problem names, if it names one (a chunk missing from the index has no location).
fn copy_of(p: &ChunkProblem) -> Option<DamagedCopy> {
    Some(DamagedCopy {
        digest: p.digest,
        pack: p.pack?,
        offset: p.offset?,
    })
}

impl Repository {
    /// The damaged copies marked in the repository (see the crate's "Damaged chunks").
    pub fn damage_marks(&self) -> Result<Arc<DamageMarks>> {
        self.marks_cache().current(&**self.store())
    }

    /// Records the damaged copies among `problems` (those with a pack and an offset) in `damaged`, merged
    /// with the marks already there, durably. Returns how many were not marked before.
    pub fn mark_damaged(&self, problems: &[ChunkProblem]) -> Result<usize> {
        let found: Vec<DamagedCopy> = problems.iter().filter_map(copy_of).collect();
        if found.is_empty() {
            return Ok(0);
        }
        let added =
            self.update_marks(|marks| found.into_iter().filter(|c| marks.insert(*c)).count())?;
        if added > 0 {
            tracing::warn!(added, "Damaged chunks marked; backups store them again.");
        }
        Ok(added)
    }

    /// Drops the marks of copies whose pack no longer exists (a garbage collection deleted it). A pack a
    /// gc moved to the quarantine keeps the marks of the chunks that have no healthy copy in the index (it
    /// could not salvage them): `verify` and the backups' re-reading go on naming them. Returns how many went.
    pub(crate) fn drop_marks_of_deleted_packs(&self) -> Result<usize> {
        let store = &**self.store();
        if !store.exists(FILE)? {
            return Ok(0);
        }
        let exists = |key: String| store.exists(&key).unwrap_or(true);
        let in_packs = |c: &DamagedCopy| exists(crate::pack::pack_key(&c.pack));
        let mut unsalvaged = HashSet::new();
        let quarantined: Vec<DamagedCopy> = self
            .damage_marks()?
            .copies()
            .into_iter()
            .filter(|c| !in_packs(c) && exists(crate::gc_state::quarantine_key(&c.pack)))
            .collect();
        if !quarantined.is_empty() {
            // The index the gc just wrote, not the files this handle opened before.
            self.reload_index()?;
            for c in quarantined {
                if self.lookup(&c.digest)?.is_none() {
                    unsalvaged.insert(c);
                }
            }
        }
        self.update_marks(|marks| {
            marks.retain(|c| in_packs(c) || unsalvaged.contains(c))
                + marks.retain_frames(|p| exists(crate::pack::pack_key(p)))
        })
    }

    /// Changes the marks under `damaged.lock`: `change` returns how many marks it changed, and only then
    /// (or when the file is damaged) is the file written again, whole and durably.
    fn update_marks(&self, change: impl FnOnce(&mut DamageMarks) -> usize) -> Result<usize> {
        let store = &**self.store();
        // Held for a read and a small write: waiting is shorter than failing and retrying.
        let _lock = crate::lock::lock_waiting(store, LOCK_FILE, crate::lock::LockMode::Exclusive)?;
        let (mut marks, problems) = load(store)?;
        let changed = change(&mut marks);
        // A damaged file is written again whole, from the marks that could be read: the repair.
        if changed > 0 || !problems.is_empty() {
            store.put(FILE, marks.render().as_bytes(), PutMode::Replace)?;
        }
        self.marks_cache().invalidate();
        Ok(changed)
    }

    /// [`Repository::verify`], then marks every damaged copy it found ([`Repository::mark_damaged`]), so that
    /// lookups skip them and the next backup of a VM that still has the data stores it again; with
    /// `read_data`, drops the marks of copies that read back whole. Packs with a damaged frame get a frame
    /// mark (for gc to salvage and quarantine them), and lose it once their frame reads back whole. A damaged
    /// marks file is written again (repaired) in the same step. The report's `marked`, `new_marks` and
    /// `cleared_marks` say what changed.
    pub fn verify_and_mark(&self, read_data: bool) -> Result<VerifyReport> {
        let (mut report, findings) = crate::verify::verify(self, read_data)?;
        if crate::config::repair(&**self.store())? {
            tracing::warn!("A damaged or missing copy of the config was written again.");
        }
        let found: Vec<DamagedCopy> = report.problems.iter().filter_map(copy_of).collect();
        let good: HashSet<DamagedCopy> = findings.good_marked.into_iter().collect();
        let mut added = 0;
        let mut cleared = 0;
        self.update_marks(|marks| {
            added = found.iter().filter(|c| marks.insert(**c)).count();
            cleared = marks.retain(|c| !good.contains(c));
            let frames = findings
                .damaged_frames
                .iter()
                .filter(|p| marks.insert_frame(**p))
                .count();
            let sound = marks.retain_frames(|p| !findings.sound_frames.contains(p));
            added + cleared + frames + sound
        })?;
        if added > 0 {
            tracing::warn!(added, "Damaged chunks marked; backups store them again.");
        }
        report.new_marks = added as u64;
        report.cleared_marks = cleared as u64;
        report.marked = found.len() as u64;
        Ok(report)
    }

    /// What is wrong with the marks file, for `verify` (empty: nothing, or no file).
    pub(crate) fn marks_problems(&self) -> Result<Vec<crate::DamagedFile>> {
        let path = self.store().display_key(FILE);
        let (_, problems) = load(&**self.store())?;
        Ok(problems
            .into_iter()
            .map(|p| crate::DamagedFile {
                path: path.display().to_string(),
                error: format!(
                    "{p}; lookups go on with the marks that could be read, and `verify_and_mark` (the \
                     `verify` command) writes the file again"
                ),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::ProblemKind;

    fn problem(d: u8, pack: Option<u8>, offset: u64) -> ChunkProblem {
        ChunkProblem {
            digest: Digest([d; 32]),
            pack: pack.map(|p| PackId([p; 16])),
            offset: pack.map(|_| offset),
            kind: ProblemKind::DigestMismatch,
            detail: String::new(),
            snapshots: Vec::new(),
            healed: false,
        }
    }

    fn loc(pack: u8, offset: u64) -> ChunkLocation {
        ChunkLocation {
            pack: PackId([pack; 16]),
            offset,
            stored_len: 1,
            raw_len: 1,
            codec: crate::Codec::None,
        }
    }

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("r"), crate::DEFAULT_CHUNK_SIZE).unwrap();
        (dir, repo)
    }

    #[test]
    fn marks_merge_and_survive_reopening() {
        let (_dir, repo) = repo();
        assert!(repo.damage_marks().unwrap().is_empty());
        // Copies without a location are not marks.
        assert_eq!(
            repo.mark_damaged(&[problem(1, Some(9), 32), problem(2, None, 0)])
                .unwrap(),
            1
        );
        assert!(
            repo.damage_marks()
                .unwrap()
                .contains(&Digest([1; 32]), &loc(9, 32))
        );
        // The same mark again adds nothing; a new one is merged with the old.
        assert_eq!(
            repo.mark_damaged(&[problem(1, Some(9), 32), problem(3, Some(9), 99)])
                .unwrap(),
            1
        );
        let reopened = Repository::open(repo.path()).unwrap();
        let marks = reopened.damage_marks().unwrap();
        assert_eq!(marks.len(), 2);
        assert!(marks.contains(&Digest([3; 32]), &loc(9, 99)));
        assert!(!marks.contains(&Digest([3; 32]), &loc(9, 98)));
        assert!(marks.is_marked(&Digest([1; 32])) && !marks.is_marked(&Digest([2; 32])));
        // Written whole: the header, the sorted marks, and no temporary file left.
        let text = std::fs::read_to_string(repo.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 4, "header, two marks, checksum");
        assert!(text.starts_with(HEADER));
        assert_eq!(DamageMarks::parse(&text, Path::new("x")).unwrap(), *marks);
        let left: Vec<_> = std::fs::read_dir(repo.path().join("tmp"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn another_handle_sees_new_marks_after_the_recheck_time() {
        let (_dir, repo) = repo();
        let other = Repository::open(repo.path()).unwrap();
        assert!(other.damage_marks().unwrap().is_empty());
        repo.mark_damaged(&[problem(1, Some(9), 32)]).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(other.damage_marks().unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_file_blocks_nothing_and_is_written_again() {
        let (_dir, repo) = repo();
        let path = repo.path().join(FILE);
        repo.mark_damaged(&[problem(1, Some(9), 32), problem(3, Some(9), 99)])
            .unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let second_mark = lines[2];
        let cases: Vec<(String, &str, usize)> = vec![
            (String::new(), "line 1: empty", 0),
            (
                good.replacen(HEADER, "something else", 1),
                "line 1: expected the header",
                2,
            ),
            (
                good.replacen(&second_mark[..3], "xyz", 1),
                "is not a digest",
                1,
            ),
            (good.replace(" 99\n", " -1\n"), "is not an offset", 1),
            (good.replace(" 99\n", " 98\n"), "checksum mismatch", 2),
            (lines[..3].join("\n") + "\n", "no checksum line", 2),
            (
                good.replacen(&lines[1][64..], "", 1),
                "expected `DIGEST PACK OFFSET`",
                1,
            ),
            // A file of an earlier release: no checksum, no problem.
            (
                good.replacen(HEADER, HEADER_V1, 1)
                    .replace(lines[3], "")
                    .trim_end()
                    .to_owned()
                    + "\n",
                "",
                2,
            ),
        ];
        for (text, expected, marks) in cases {
            std::fs::write(&path, &text).unwrap();
            let fresh = Repository::open(repo.path()).unwrap();
            // Lookups and the marks go on with what could be read.
            assert_eq!(fresh.damage_marks().unwrap().len(), marks, "{text:?}");
            assert!(fresh.lookup(&Digest([1; 32])).is_ok());
            let problems = fresh.marks_problems().unwrap();
            if expected.is_empty() {
                assert!(problems.is_empty(), "{problems:?}");
            } else {
                assert!(
                    problems.iter().any(|p| p.error.contains(expected)),
                    "{text:?}: {problems:?}"
                );
                assert!(DamageMarks::parse(&text, &path).is_err());
            }
            // The next change writes the file again whole, and it reads back clean.
            fresh.mark_damaged(&[problem(7, Some(7), 70)]).unwrap();
            let fresh = Repository::open(repo.path()).unwrap();
            assert!(fresh.marks_problems().unwrap().is_empty());
            assert_eq!(fresh.damage_marks().unwrap().len(), marks + 1);
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let fresh = Repository::open(repo.path()).unwrap();
        assert!(fresh.damage_marks().unwrap().is_empty());
        let problems = fresh.marks_problems().unwrap();
        assert!(
            problems.iter().any(|p| p.error.contains("not text")),
            "{problems:?}"
        );
    }
}
