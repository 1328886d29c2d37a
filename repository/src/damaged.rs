//! Damage marks: the stored chunk copies that `verify` found damaged, kept in the file `damaged` so that
//! lookups stop returning them and the next backup that still has the data stores it again.
//!
//! The file is text, one copy per line after a header, sorted and without duplicates:
//! ```text
//! backflow-damaged 1
//! <digest, 64 hex> <pack id, 32 hex> <offset of the blob in the pack, decimal>
//! ```
//! A mark names a *location*, not a digest: a later backup that stores the same chunk again writes a new,
//! healthy copy elsewhere, and the mark keeps pointing at the old one only. A garbage collection drops the
//! marks of the packs it deleted (`Repository::drop_marks_of_deleted_packs`); nothing else removes one.
//!
//! [`Repository::mark_damaged`] merges new marks into the file under an exclusive `flock` on `damaged.lock`
//! (two verifies marking at once must not lose each other's marks), writes `damaged.tmp`, fsyncs it, renames
//! it over `damaged` and fsyncs the directory: readers see the old set or the new one, never half of one.
//! Readers take no lock.
//!
//! A [`Repository`] reads the file at its first lookup and checks at most once per [`RECHECK`] whether it was
//! replaced (inode, length and modification time), so a long-running backup sees marks a verify wrote after
//! it started, while a lookup costs no system call. The set is small (damage is rare) and kept in memory.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{IoContext, RepoError, Result};
use crate::format::{hex, parse_hex, write_durably};
use crate::verify::ChunkProblem;
use crate::{ChunkLocation, Digest, PackId, Repository, VerifyReport};

/// The marks file, in the repository's root.
pub(crate) const FILE: &str = "damaged";
/// Taken exclusively while marks are merged and written.
const LOCK_FILE: &str = "damaged.lock";
/// Where a new version of the file is written before its rename.
const TMP_FILE: &str = "damaged.tmp";
/// The first line: format name and version.
const HEADER: &str = "backflow-damaged 1";

/// How long a handle trusts the marks it read before it checks the file again. A backup that starts after a
/// verify marked chunks sees the marks at once (it reads them at its first lookup); one already running sees
/// them within this time.
pub const RECHECK: Duration = Duration::from_secs(1);

/// A file modified this recently may be replaced again without its modification time changing (coarse
/// timestamps), so it is read again at each check until it is older.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Largest marks file read (about 550,000 marks): a bigger one is damaged, not a list of damaged chunks, and
/// is refused rather than read into memory.
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
}

impl DamageMarks {
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
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
        self.copies.iter().any(|c| c.digest == *digest)
    }

    /// The marks, sorted.
    pub fn copies(&self) -> Vec<DamagedCopy> {
        let mut all: Vec<DamagedCopy> = self.copies.iter().copied().collect();
        all.sort_unstable();
        all
    }

    /// Adds a mark; returns whether it is new.
    pub fn insert(&mut self, copy: DamagedCopy) -> bool {
        self.copies.insert(copy)
    }

    /// Parses the file's text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<DamageMarks> {
        let bad = |line: usize, what: String| {
            RepoError::corrupt(
                path,
                format!(
                    "line {line}: {what} (the file lists damaged chunks; remove it and run `verify --read-data` \
                     to mark them again)"
                ),
            )
        };
        let mut lines = text.lines();
        match lines.next() {
            Some(HEADER) => {}
            Some(other) => {
                return Err(bad(
                    1,
                    format!("expected the header {HEADER:?}, found {other:?}"),
                ));
            }
            None => return Err(bad(1, format!("empty; expected the header {HEADER:?}"))),
        }
        let mut marks = DamageMarks::default();
        for (i, line) in lines.enumerate() {
            let number = i + 2;
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            let [digest, pack, offset] = fields[..] else {
                return Err(bad(
                    number,
                    format!("expected `DIGEST PACK OFFSET`, found {line:?}"),
                ));
            };
            let digest = parse_hex::<32>(digest).map(Digest).ok_or_else(|| {
                bad(
                    number,
                    format!("{digest:?} is not a digest (64 hex digits)"),
                )
            })?;
            let pack = parse_hex::<16>(pack)
                .map(PackId)
                .ok_or_else(|| bad(number, format!("{pack:?} is not a pack id (32 hex digits)")))?;
            let offset = offset
                .parse::<u64>()
                .map_err(|_| bad(number, format!("{offset:?} is not an offset")))?;
            marks.insert(DamagedCopy {
                digest,
                pack,
                offset,
            });
        }
        Ok(marks)
    }

    /// The file's text: the header, then the marks sorted.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(HEADER.len() + 1 + self.copies.len() * 120);
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
        out
    }
}

/// Reads the marks file at `path`; a missing file is no marks.
fn load(path: &Path) -> Result<DamageMarks> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DamageMarks::default()),
        Err(e) => return Err(RepoError::io("open", path, e)),
    };
    let len = file.metadata().ctx("stat", path)?.len();
    if len > MAX_FILE_LEN {
        return Err(RepoError::corrupt(
            path,
            format!(
                "{len} bytes, more than the {MAX_FILE_LEN} a list of damaged chunks may have; remove it and run \
                 `verify --read-data` to mark them again"
            ),
        ));
    }
    let text = std::io::read_to_string(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            RepoError::corrupt(path, "not text (invalid UTF-8)")
        } else {
            RepoError::io("read", path, e)
        }
    })?;
    DamageMarks::parse(&text, path)
}

/// What identifies one version of the file: it is replaced by a rename, never modified in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

fn stamp(path: &Path) -> Result<Option<Stamp>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            ino: m.ino(),
            len: m.len(),
            mtime: m.modified().ok(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RepoError::io("stat", path, e)),
    }
}

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
    pub(crate) fn current(&self, root: &Path) -> Result<Arc<DamageMarks>> {
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
        let path = root.join(FILE);
        let now = stamp(&path)?;
        let racy = now.and_then(|n| n.mtime).is_some_and(|m| {
            SystemTime::now()
                .duration_since(m)
                .map_or(true, |d| d < RACY_WINDOW)
        });
        if s.checked.is_none() || now != s.stamp || racy {
            // A file that cannot be read leaves the handle unchecked: the next lookup tries again.
            s.marks = Arc::new(load(&path)?);
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
        self.marks_cache().current(self.path())
    }

    /// Records the damaged copies among `problems` (those with a pack and an offset) in `damaged`, merged
    /// with the marks already there, durably. Returns how many were not marked before. A marks file that
    /// cannot be parsed is an error and is left as it is.
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
        if !self.path().join(FILE).exists() {
            return Ok(0);
        }
        let root = self.path().to_owned();
        let in_packs = |c: &DamagedCopy| crate::pack::pack_path(&root, &c.pack).exists();
        let mut unsalvaged = HashSet::new();
        let quarantined: Vec<DamagedCopy> = self
            .damage_marks()?
            .copies()
            .into_iter()
            .filter(|c| !in_packs(c) && crate::gc::quarantine_path(&root, &c.pack).exists())
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
            let before = marks.copies.len();
            marks
                .copies
                .retain(|c| in_packs(c) || unsalvaged.contains(c));
            before - marks.copies.len()
        })
    }

    /// Changes the marks under `damaged.lock`: `change` returns how many marks it changed, and only then
    /// is the file written again (temporary name, fsync, rename). A file that cannot be parsed is an error
    /// and is left as it is.
    fn update_marks(&self, change: impl FnOnce(&mut DamageMarks) -> usize) -> Result<usize> {
        let root = self.path();
        let lock_path = root.join(LOCK_FILE);
        let lock = crate::repository::open_lock_file(&lock_path)?;
        // Held for a read and a small write: waiting is shorter than failing and retrying.
        lock.lock().ctx("lock", &lock_path)?;
        let path = root.join(FILE);
        let mut marks = load(&path)?;
        let changed = change(&mut marks);
        if changed > 0 {
            write_durably(&root.join(TMP_FILE), &path, marks.render().as_bytes())?;
        }
        self.marks_cache().invalidate();
        Ok(changed)
    }

    /// Digests marked damaged that have no healthy copy in the index: the chunks a backup must read and store
    /// again rather than reference. Empty, at the cost of one check, when nothing is marked.
    pub fn damaged_digests(&self) -> Result<HashSet<Digest>> {
        let marks = self.damage_marks()?;
        let mut out = HashSet::new();
        for digest in marks.copies.iter().map(|c| c.digest) {
            if !out.contains(&digest) && self.lookup(&digest)?.is_none() {
                out.insert(digest);
            }
        }
        Ok(out)
    }

    /// [`Repository::verify`], then marks every damaged copy it found ([`Repository::mark_damaged`]), so that
    /// lookups skip them and the next backup of a VM that still has the data stores it again. The report's
    /// `marked` and `new_marks` say what was marked.
    pub fn verify_and_mark(&self, read_data: bool) -> Result<VerifyReport> {
        let mut report = self.verify(read_data)?;
        report.new_marks = self.mark_damaged(&report.problems)? as u64;
        report.marked = report.problems.iter().filter_map(copy_of).count() as u64;
        Ok(report)
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
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with(HEADER));
        assert_eq!(DamageMarks::parse(&text, Path::new("x")).unwrap(), *marks);
        assert!(!repo.path().join(TMP_FILE).exists());
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
    fn a_bad_file_is_a_clear_error_and_is_not_overwritten() {
        let (_dir, repo) = repo();
        let path = repo.path().join(FILE);
        let cases = [
            ("", "line 1: empty"),
            ("something else\n", "line 1: expected the header"),
            (
                "backflow-damaged 1\nabc 00 1\n",
                "line 2: \"abc\" is not a digest",
            ),
            (
                &format!("backflow-damaged 1\n{} zz 1\n", "ab".repeat(32)),
                "line 2: \"zz\" is not a pack id",
            ),
            (
                &format!(
                    "backflow-damaged 1\n{} {} -1\n",
                    "ab".repeat(32),
                    "cd".repeat(16)
                ),
                "line 2: \"-1\" is not an offset",
            ),
            (
                "backflow-damaged 1\none two\n",
                "expected `DIGEST PACK OFFSET`",
            ),
        ];
        for (text, expected) in cases {
            std::fs::write(&path, text).unwrap();
            let fresh = Repository::open(repo.path()).unwrap();
            let e = fresh.damage_marks().unwrap_err().to_string();
            assert!(
                e.contains(expected) && e.contains("damaged"),
                "{text:?}: {e}"
            );
            // Lookups refuse too, rather than return copies that may be marked.
            assert!(fresh.lookup(&Digest([1; 32])).is_err());
            let marked = fresh.mark_damaged(&[problem(1, Some(9), 32)]);
            assert!(marked.is_err());
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let e = Repository::open(repo.path())
            .unwrap()
            .damage_marks()
            .unwrap_err();
        assert!(e.to_string().contains("not text"), "{e}");
    }
}
