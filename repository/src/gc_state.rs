//! The state garbage collection shares with every repository handle: the registry of open handles
//! (`users/`), the pending cycle in `gc/` (its state, lists, the fence `forget` takes, the chunks it
//! condemned) and the quarantine. Handles read and write it (registering, forgetting, finding a condemned
//! chunk); the gc run (`gc.rs`) drives it. It uses no handle or gc code, so that neither depends on the
//! other through it.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::error::{IoContext, RepoError, Result, read_exact_at};
use crate::format::{ObjectReader, hex, parse_hex};
use crate::lock::LockMode;
use crate::pack::{PackEntry, pack_key};
use crate::sort::{RUN_BUFFER, Sorted};
use crate::store::{Lease, Object, PutMode, Store};
use crate::{Codec, DamagedFile, Digest, PackId};

/// Where a gc moves the packs whose header, trailer or footer is damaged, once it has stored again what
/// snapshots use from them: `quarantine/packs/XX/ID.pack`, the pack's own relative name. Nothing reads them
/// there; they stay until `backflow gc --drop-quarantine` ([`GcOptions::drop_quarantine`]) deletes them.
///
/// [`GcOptions::drop_quarantine`]: crate::GcOptions::drop_quarantine
pub const QUARANTINE_DIR: &str = "quarantine";

/// Outcome of a garbage collection.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Nothing was changed: the report says what a gc would do now.
    #[serde(default)]
    pub dry_run: bool,
    /// What finishing the cycle an earlier gc had begun (and had to leave waiting, or was killed in) did
    /// first: its deletions happen in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier_cycle: Option<Box<GcReport>>,
    pub snapshots: u64,
    /// Distinct digests the snapshots reference that some index record or pack trailer lists.
    pub referenced_chunks: u64,
    /// Index records read.
    pub indexed_chunks: u64,
    /// Referenced digests no index file and no trailer of a pack outside the index lists (damage that
    /// `verify` names; gc leaves it alone).
    pub missing_chunks: u64,
    pub packs_kept: u64,
    pub packs_repacked: u64,
    /// Wholly unreferenced packs.
    pub packs_removed: u64,
    /// Packs no index names (left by killed sessions), removed unless a backup that was running commits them
    /// or snapshots use their chunks (then they are indexed again).
    pub orphan_packs: u64,
    /// Chunks taken out of the index (and out of the repository once the cycle is swept).
    pub chunks_removed: u64,
    /// Live chunks copied out of rewritten packs.
    pub chunks_moved: u64,
    /// Chunks a backup that ran during the gc used after all, kept.
    pub chunks_kept_for_running_backups: u64,
    /// Size of the unreferenced and rewritten pack files deleted (orphans and quarantined packs not counted).
    pub bytes_deleted: u64,
    /// Size of the pack files written (rewritten packs' live chunks, salvaged chunks).
    pub bytes_written: u64,
    /// Packs rewritten by this gc that could not be read safely and were kept as they are.
    pub damaged_packs: Vec<String>,
    /// Referenced chunks that had no healthy copy (every copy marked damaged, or in a pack whose header,
    /// trailer or footer is damaged) and whose blob still decoded to its digest: stored again in new packs.
    #[serde(default)]
    pub chunks_salvaged: u64,
    /// Referenced chunks of which no stored copy decodes to the digest. Their copies stay where they were
    /// (with their damage marks, so that the next backup of a VM that still has the data stores them again),
    /// or in the quarantine; `verify` names the snapshots that need them.
    #[serde(default)]
    pub chunks_unsalvageable: u64,
    /// The `--repack-threshold` of the run, in percent
    /// ([`GcOptions::repack_threshold`](crate::GcOptions::repack_threshold)).
    #[serde(default)]
    pub repack_threshold: u8,
    /// Unreferenced bytes left in the packs kept because their unreferenced share is below the repack
    /// threshold (restic's "unused size after prune"): what a gc with a lower threshold would free. Packs
    /// kept for another reason (missing, or with a damaged chunk to copy) are not counted.
    #[serde(default)]
    pub unused_bytes_kept: u64,
    /// The packs holding [`GcReport::unused_bytes_kept`].
    #[serde(default)]
    pub packs_kept_with_unused: u64,
    /// Packs whose header, trailer or footer is damaged: what snapshots use was salvaged, and the pack is
    /// moved to the quarantine ([`QUARANTINE_DIR`]) when the cycle is swept, never deleted.
    #[serde(default)]
    pub packs_quarantined: Vec<String>,
    /// Packs deleted from the quarantine ([`GcOptions::drop_quarantine`]), and their size.
    ///
    /// [`GcOptions::drop_quarantine`]: crate::GcOptions::drop_quarantine
    #[serde(default)]
    pub quarantine_dropped: u64,
    #[serde(default)]
    pub quarantine_bytes_freed: u64,
    /// A pending cycle was abandoned first ([`GcOptions::reset_state`](crate::GcOptions::reset_state)).
    #[serde(default)]
    pub state_reset: bool,
    /// Set when the deletion waits: repository handles (backups, restores) that were open when the chunks
    /// were condemned still run. The next gc finishes the cycle.
    pub waiting_for: Option<String>,
}

impl GcReport {
    /// Bytes freed on disk by the collection: deleted pack files minus what was written (the quarantine
    /// dropped is `quarantine_bytes_freed`).
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_deleted.saturating_sub(self.bytes_written)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Records the gc sorts.

/// A stored copy of a chunk, as the gc files and sorts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Located {
    pub(crate) digest: Digest,
    pub(crate) pack: PackId,
    pub(crate) offset: u64,
    pub(crate) stored_len: u32,
    pub(crate) raw_len: u32,
    pub(crate) codec: Codec,
    pub(crate) live: bool,
    /// Listed by an index file; otherwise only by the trailer of a pack (an orphan, or a damaged pack whose
    /// trailer lists more than the index).
    pub(crate) indexed: bool,
    /// Live although no copy of the chunk decodes to its digest (see [`GcReport::chunks_unsalvageable`]).
    pub(crate) unsalvageable: bool,
}

pub(crate) const LOCATED_SIZE: usize = 72;
const _: () = assert!(LOCATED_SIZE == 16 + 8 + 32 + 4 + 4 + 1 + 1 + 1 + 1 + 4);

impl Located {
    /// Sorted by pack, then offset: the order a pack is read in.
    pub(crate) fn by_pack(&self) -> [u8; LOCATED_SIZE] {
        let mut b = [0u8; LOCATED_SIZE];
        b[..16].copy_from_slice(&self.pack.0);
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..56].copy_from_slice(&self.digest.0);
        self.tail(&mut b[56..]);
        b
    }

    /// Sorted by digest, then pack and offset (the condemned file).
    pub(crate) fn by_digest(&self) -> [u8; LOCATED_SIZE] {
        let mut b = [0u8; LOCATED_SIZE];
        b[..32].copy_from_slice(&self.digest.0);
        b[32..48].copy_from_slice(&self.pack.0);
        b[48..56].copy_from_slice(&self.offset.to_be_bytes());
        self.tail(&mut b[56..]);
        b
    }

    pub(crate) fn tail(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&self.stored_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8] = self.codec as u8;
        b[9] = u8::from(self.live);
        b[10] = u8::from(self.indexed);
        b[11] = u8::from(self.unsalvageable);
    }

    pub(crate) fn decode(b: &[u8; LOCATED_SIZE], by_pack: bool, path: &Path) -> Result<Located> {
        let (digest, pack, offset) = if by_pack {
            (&b[24..56], &b[..16], &b[16..24])
        } else {
            (&b[..32], &b[32..48], &b[48..56])
        };
        let codec = Codec::from_u8(b[64])
            .ok_or_else(|| RepoError::corrupt(path, format!("unknown codec {}", b[64])))?;
        Ok(Located {
            digest: Digest(digest.try_into().expect("32 bytes")),
            pack: PackId(pack.try_into().expect("16 bytes")),
            offset: u64::from_be_bytes(offset.try_into().expect("8 bytes")),
            stored_len: u32::from_le_bytes(b[56..60].try_into().expect("4 bytes")),
            raw_len: u32::from_le_bytes(b[60..64].try_into().expect("4 bytes")),
            codec,
            live: b[65] == 1,
            indexed: b[66] == 1,
            unsalvageable: b[67] == 1,
        })
    }

    /// A copy listed by a pack trailer.
    pub(crate) fn from_trailer(pack: PackId, e: &PackEntry) -> Located {
        Located {
            digest: e.digest,
            pack,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
            codec: e.codec,
            live: false,
            indexed: false,
            unsalvageable: false,
        }
    }

    pub(crate) fn location(&self) -> crate::ChunkLocation {
        crate::ChunkLocation {
            pack: self.pack,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
        }
    }

    pub(crate) fn entry(&self) -> PackEntry {
        PackEntry {
            digest: self.digest,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Lists of records in `gc/`.

/// A list of fixed-size records in `gc/`, written whole through a temporary name:
/// ```text
/// 0      header (32): magic "BFLWGCL2" | record_size u32 | reserved u32 | cycle id [16]
/// 32     count records of record_size bytes
/// end-40 footer (40): count u64 | BLAKE3 of everything before the checksum [32]
/// ```
/// The cycle id is the one in `gc/state.json`: a list of another cycle (or repository) is refused, and so is
/// a damaged one (checksum, length), before the gc acts on it.
pub(crate) const LIST_MAGIC: [u8; 8] = *b"BFLWGCL2";
/// The magic of version 1 lists, which had no checksum: refused with a clear message.
pub(crate) const LIST_MAGIC_V1: [u8; 8] = *b"BFLWGCL1";
pub(crate) const LIST_HEADER_SIZE: usize = 32;
pub(crate) const LIST_FOOTER_SIZE: usize = 40;
const _: () = assert!(LIST_HEADER_SIZE == 8 + 4 + 4 + 16);
const _: () = assert!(LIST_FOOTER_SIZE == 8 + 32);

/// A cycle's random id, in its state and in the header of its lists.
pub(crate) type CycleId = [u8; 16];

pub(crate) fn list_header<const N: usize>(cycle: &CycleId) -> [u8; LIST_HEADER_SIZE] {
    let mut h = [0u8; LIST_HEADER_SIZE];
    h[..8].copy_from_slice(&LIST_MAGIC);
    h[8..12].copy_from_slice(&(N as u32).to_le_bytes());
    h[16..].copy_from_slice(cycle);
    h
}

/// Writes the list `key` through the local file `tmp` (in the gc's scratch), published durably.
pub(crate) fn write_list<const N: usize>(
    store: &dyn Store,
    key: &str,
    tmp: &Path,
    cycle: &CycleId,
    mut records: Sorted<N>,
) -> Result<u64> {
    let file = crate::format::create_scratch_file(tmp)?;
    let mut out = BufWriter::with_capacity(RUN_BUFFER, file);
    let mut hasher = blake3::Hasher::new();
    let header = list_header::<N>(cycle);
    hasher.update(&header);
    out.write_all(&header).ctx("write", tmp)?;
    let mut n = 0u64;
    while let Some(r) = records.next_record()? {
        hasher.update(&r);
        out.write_all(&r).ctx("write", tmp)?;
        n += 1;
    }
    hasher.update(&n.to_le_bytes());
    out.write_all(&n.to_le_bytes()).ctx("write", tmp)?;
    out.write_all(hasher.finalize().as_bytes())
        .ctx("write", tmp)?;
    let file = out
        .into_inner()
        .map_err(|e| RepoError::io("write", tmp, e.into_error()))?;
    drop(file);
    store.publish(tmp, key, PutMode::Replace)?;
    Ok(n)
}

/// Opens a list written by [`write_list`] of `N`-byte records and checks its header (of cycle `cycle`,
/// when given) and length, not its checksum: the file and its record count.
pub(crate) fn open_list<const N: usize>(
    store: &dyn Store,
    key: &str,
    cycle: Option<&CycleId>,
) -> Result<(Arc<dyn Object>, u64)> {
    let file = store.open(key)?;
    let path = &store.display_key(key);
    let len = file.len();
    let bad = |what: String| RepoError::corrupt(path, what);
    if len < (LIST_HEADER_SIZE + LIST_FOOTER_SIZE) as u64 {
        return Err(bad(format!(
            "truncated gc list: {len} bytes, a list has at least {}",
            LIST_HEADER_SIZE + LIST_FOOTER_SIZE
        )));
    }
    let mut head = [0u8; LIST_HEADER_SIZE];
    read_exact_at(&file, &mut head, 0, path, "header")?;
    if head[..8] == LIST_MAGIC_V1 {
        return Err(bad(
            "a gc list of version 1 (written by an earlier backflow, without a checksum)".into(),
        ));
    }
    if head[..8] != LIST_MAGIC {
        return Err(bad("not a gc list (bad magic)".into()));
    }
    let size = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if size as usize != N {
        return Err(bad(format!("records of {size} bytes, expected {N}")));
    }
    if let Some(cycle) = cycle
        && head[16..] != cycle[..]
    {
        return Err(bad(format!(
            "the list belongs to gc cycle {}, not to the pending cycle {} of gc/state.json",
            hex(&head[16..]),
            hex(cycle)
        )));
    }
    let mut count = [0u8; 8];
    read_exact_at(
        &file,
        &mut count,
        len - LIST_FOOTER_SIZE as u64,
        path,
        "footer",
    )?;
    let count = u64::from_le_bytes(count);
    if count
        .checked_mul(N as u64)
        .and_then(|b| b.checked_add((LIST_HEADER_SIZE + LIST_FOOTER_SIZE) as u64))
        != Some(len)
    {
        return Err(bad(format!(
            "truncated or extended gc list: {len} bytes do not hold the {count} records its footer counts"
        )));
    }
    Ok((file, count))
}

/// Reads a list written by [`write_list`], record by record, and checks its checksum after the last record:
/// a consumer that acts only once the list is read to its end never acts on a damaged list.
pub(crate) struct ListReader<const N: usize> {
    path: PathBuf,
    reader: BufReader<ObjectReader>,
    hasher: blake3::Hasher,
    count: u64,
    remaining: u64,
}

impl<const N: usize> ListReader<N> {
    pub(crate) fn open(store: &dyn Store, key: &str, cycle: &CycleId) -> Result<Self> {
        let (file, count) = open_list::<N>(store, key, Some(cycle))?;
        let path = &store.display_key(key);
        let mut reader = BufReader::with_capacity(RUN_BUFFER, ObjectReader::new(file, 0));
        let mut head = [0u8; LIST_HEADER_SIZE];
        reader.read_exact(&mut head).ctx("read", path)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        let mut list = ListReader {
            path: path.to_owned(),
            reader,
            hasher,
            count,
            remaining: count,
        };
        if count == 0 {
            list.check_sum()?;
        }
        Ok(list)
    }

    pub(crate) fn next_record(&mut self) -> Result<Option<[u8; N]>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let mut b = [0u8; N];
        self.reader
            .read_exact(&mut b)
            .ctx("read", self.path.as_path())?;
        self.hasher.update(&b);
        self.remaining -= 1;
        if self.remaining == 0 {
            self.check_sum()?;
        }
        Ok(Some(b))
    }

    pub(crate) fn check_sum(&mut self) -> Result<()> {
        let mut footer = [0u8; LIST_FOOTER_SIZE];
        self.reader
            .read_exact(&mut footer)
            .ctx("read", self.path.as_path())?;
        self.hasher.update(&footer[..8]);
        if self.hasher.finalize().as_bytes()[..] != footer[8..] {
            return Err(RepoError::corrupt(
                &self.path,
                "checksum mismatch: the gc list changed after it was written",
            ));
        }
        Ok(())
    }

    /// Reads the list to its end (checksum included); returns its record count.
    pub(crate) fn check_whole(mut self) -> Result<u64> {
        while self.next_record()?.is_some() {}
        Ok(self.count)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The cycle's state in `gc/`.

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Phase {
    /// The condemned chunks are out of the index; their packs still exist.
    Condemned,
    /// Chunks used meanwhile are stored again; the packs are being deleted.
    Sweeping,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CycleState {
    pub(crate) version: u32,
    /// Random id of the cycle (32 hex digits), also in the header of its lists.
    pub(crate) cycle: String,
    pub(crate) phase: Phase,
    /// Snapshots whose references the mark saw.
    pub(crate) marked: BTreeSet<String>,
    /// Index files the gc replaced by its own (removed after the state is durable).
    pub(crate) old_index: Vec<String>,
    /// The index file the cycle wrote (kept records, moved and salvaged chunks): the old index files go
    /// only while it exists.
    pub(crate) new_index: Option<String>,
    /// Repository handles open once the old index was gone: the deletion waits until all have closed.
    pub(crate) users: Option<Vec<String>>,
    /// Packs no index named when the cycle began: left by killed sessions.
    pub(crate) orphans: Vec<String>,
    /// Packs whose header, trailer or footer is damaged, moved to the quarantine by the sweep.
    pub(crate) quarantine: Vec<String>,
    /// What the cycle will have done, for the report of the run that finishes it.
    pub(crate) report: GcReport,
}

/// Version of `gc/state.json`. Version 1 (no checksums, in the state or its lists) is refused with the
/// repair to run; see [`load_state`].
pub(crate) const STATE_VERSION: u32 = 2;
/// First word of `gc/state.json`: `backflow-gc-state VERSION CHECKSUM`, then the state as JSON. The checksum
/// (BLAKE3, hex) covers the JSON bytes exactly as written.
pub(crate) const STATE_HEADER: &str = "backflow-gc-state";

impl CycleState {
    pub(crate) fn cycle_id(&self) -> CycleId {
        parse_hex::<16>(&self.cycle).expect("checked when loaded or created")
    }

    /// Checks what a damaged or crafted state could misuse: every name it holds must be what the gc
    /// writes, so that no path it forms leaves the directory it belongs in.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| RepoError::corrupt(path, what);
        if parse_hex::<16>(&self.cycle).is_none() {
            return Err(bad(format!("cycle {:?} is not 32 hex digits", self.cycle)));
        }
        for name in self.old_index.iter().chain(&self.new_index) {
            if !valid_index_name(name) {
                return Err(bad(format!("{name:?} is not the name of an index file")));
            }
        }
        if let Some(new) = &self.new_index
            && self.old_index.contains(new)
        {
            return Err(bad(format!(
                "the cycle's own index file {new} is listed among the old ones to remove"
            )));
        }
        for id in self.orphans.iter().chain(&self.quarantine) {
            if id.parse::<PackId>().is_err() {
                return Err(bad(format!("{id:?} is not a pack id")));
            }
        }
        for name in self.marked.iter().chain(self.users.iter().flatten()) {
            if !crate::ids::valid_id(name) {
                return Err(bad(format!("{name:?} is not a snapshot or handle name")));
            }
        }
        Ok(())
    }
}

/// Index file names a gc may remove: `NAME.idx` with NAME made of `[A-Za-z0-9_-]`.
pub(crate) fn valid_index_name(name: &str) -> bool {
    name.strip_suffix(".idx").is_some_and(crate::ids::valid_id)
}

/// The keys of the gc's files.
pub(crate) struct GcPaths;

impl GcPaths {
    pub(crate) const STATE: &str = "gc/state.json";
    /// Held by a running gc for its whole run (and by `verify` while it reads the state).
    pub(crate) const RUN_LOCK: &str = "gc/run.lock";
    pub(crate) const FENCE: &str = "gc/fence";
    pub(crate) const CONDEMNED: &str = "gc/condemned";
    pub(crate) const DOOMED: &str = "gc/doomed-packs";
    /// A prefix: `gc/forgotten/ID.snap`.
    pub(crate) const FORGOTTEN: &str = "gc/forgotten/";
}

/// Largest `gc/state.json` read: the snapshot ids and orphans it lists are a few MiB in a huge repository;
/// a bigger file is damaged and is not read into memory.
pub(crate) const MAX_STATE_LEN: u64 = 256 << 20;

/// Reads `gc/state.json`: `None` when no cycle is pending. A state that is damaged (checksum, JSON, names
/// that are not what a gc writes), or of version 1, is an error naming the file.
pub(crate) fn load_state(store: &dyn Store) -> Result<Option<CycleState>> {
    let path = store.display_key(GcPaths::STATE);
    let Some(text) = crate::format::read_bounded(store, GcPaths::STATE, MAX_STATE_LEN)? else {
        return Ok(None);
    };
    if text.len() as u64 > MAX_STATE_LEN {
        return Err(RepoError::corrupt(
            &path,
            format!("more than the {MAX_STATE_LEN} bytes a gc state can have"),
        ));
    }
    let bad = |what: String| RepoError::corrupt(&path, what);
    if text.first() == Some(&b'{') {
        return Err(RepoError::UnsupportedVersion {
            path: path.clone(),
            found: 1,
            supported: STATE_VERSION,
        });
    }
    let newline = text.iter().position(|&b| b == b'\n').ok_or_else(|| {
        bad(format!(
            "truncated: no header line `{STATE_HEADER} VERSION CHECKSUM`"
        ))
    })?;
    let (head, body) = (&text[..newline], &text[newline + 1..]);
    let head = std::str::from_utf8(head).unwrap_or("");
    let fields: Vec<&str> = head.split(' ').collect();
    let [STATE_HEADER, version, sum] = fields[..] else {
        return Err(bad(format!(
            "line 1: expected `{STATE_HEADER} VERSION CHECKSUM`, found {head:?}"
        )));
    };
    let version: u32 = version
        .parse()
        .map_err(|_| bad(format!("line 1: {version:?} is not a version")))?;
    if version != STATE_VERSION {
        return Err(RepoError::UnsupportedVersion {
            path: path.clone(),
            found: version,
            supported: STATE_VERSION,
        });
    }
    if parse_hex::<32>(sum) != Some(*blake3::hash(body).as_bytes()) {
        return Err(bad(
            "checksum mismatch: the gc state changed after it was written".into(),
        ));
    }
    let state: CycleState =
        serde_json::from_slice(body).map_err(|e| bad(format!("unreadable gc state: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(bad(format!(
            "the JSON says version {}, its header {STATE_VERSION}",
            state.version
        )));
    }
    state.check(&path)?;
    Ok(Some(state))
}

pub(crate) fn store_state(store: &dyn Store, state: &CycleState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).expect("the state serialises");
    let mut text = format!(
        "{STATE_HEADER} {STATE_VERSION} {}\n",
        blake3::hash(&json).to_hex()
    )
    .into_bytes();
    text.extend_from_slice(&json);
    store.put(GcPaths::STATE, &text, PutMode::Replace)
}

/// The repair for gc state that cannot be trusted, for error messages and `verify`.
pub(crate) fn reset_hint(root: &Path) -> String {
    format!(
        "run `backflow gc --repo {} --reset-state` once no backup or restore runs: it abandons the pending gc \
         cycle without deleting anything, then collects again, keeping whatever snapshots use",
        root.display()
    )
}

/// A gc that stopped on gc state or lists it cannot trust.
pub(crate) fn stopped(root: &Path, e: RepoError) -> RepoError {
    RepoError::InvalidArgument(format!(
        "garbage collection stopped; nothing was deleted: {e}; {}",
        reset_hint(root)
    ))
}

/// Whether a gc cycle is under way (its chunks condemned, their packs not yet deleted).
pub(crate) fn cycle_pending(store: &dyn Store) -> Result<bool> {
    store.exists(GcPaths::STATE)
}

/// Problems with the gc state files, for `verify` (`side_files`): each names the file, what is wrong and the
/// repair. A damaged state stops garbage collection only; restores and backups go on (a restore that needs a
/// chunk the pending cycle condemned ignores a damaged `gc/condemned`, with a warning).
pub(crate) fn state_problems(store: &dyn Store) -> Vec<DamagedFile> {
    let root = &store.display_key("");
    let problem = |path: PathBuf, e: RepoError| DamagedFile {
        path: path.display().to_string(),
        error: format!(
            "{e}; garbage collection stops on it (restores and backups go on); {}",
            reset_hint(root)
        ),
    };
    // A gc that runs moves its cycle on (and removes the lists, then the state) and checks both itself
    // before it acts: only the state of a gc that does not run is read, holding its run lock meanwhile.
    let Ok(_run_lock) = store.lock(GcPaths::RUN_LOCK, LockMode::Exclusive, "a gc runs") else {
        return Vec::new();
    };
    let state = match load_state(store) {
        Ok(Some(state)) => state,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![problem(store.display_key(GcPaths::STATE), e)],
    };
    check_lists(store, &state)
        .err()
        .map(|(path, e)| problem(path, e))
        .into_iter()
        .collect()
}

/// How long a gc waits for `gc/run.lock` before it refuses: `verify` holds it for a moment.
pub(crate) const RUN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads the pending cycle's lists to their ends: whole (checksums), of this cycle, and present while the
/// cycle needs them (a kill after the sweep removed them leaves the state alone, which is fine).
pub(crate) fn check_lists(
    store: &dyn Store,
    state: &CycleState,
) -> std::result::Result<(), (PathBuf, RepoError)> {
    let cycle = state.cycle_id();
    let needed = state.phase == Phase::Condemned;
    let check = |key: &str, read: &dyn Fn(&str) -> Result<u64>| {
        let path = store.display_key(key);
        if !needed && !store.exists(key).map_err(|e| (path.clone(), e))? {
            return Ok(());
        }
        read(key).map(|_| ()).map_err(|e| (path, e))
    };
    check(GcPaths::CONDEMNED, &|k| {
        ListReader::<LOCATED_SIZE>::open(store, k, &cycle)?.check_whole()
    })?;
    check(GcPaths::DOOMED, &|k| {
        ListReader::<16>::open(store, k, &cycle)?.check_whole()
    })
}

/// The fence between `forget` (shared) and a gc changing its cycle (exclusive): while a cycle is pending, a
/// forgotten manifest is moved to `gc/forgotten/` instead of deleted, so the end of the cycle still sees what
/// it referenced. Waits: both sides hold it briefly.
pub(crate) fn fence(store: &dyn Store, mode: LockMode) -> Result<Box<dyn Lease>> {
    crate::lock::lock_waiting(store, GcPaths::FENCE, mode)
}

/// Removes the manifest of snapshot `id` for `forget`, keeping it for the pending gc cycle if there is
/// one. The caller holds the fence shared.
pub(crate) fn remove_manifest(store: &dyn Store, id: &str) -> Result<()> {
    let key = crate::snapshot::snapshot_key(id);
    if cycle_pending(store)? {
        store.rename(&key, &format!("{}{id}.snap", GcPaths::FORGOTTEN))
    } else {
        store.delete(&key)
    }
}

/// Where a condemned chunk still is, while its cycle is pending: restores of snapshots committed by backups
/// that ran during the gc read it from there until the end of the cycle stores it again. A binary search of
/// `gc/condemned` with positioned reads. Never used for deduplication: a backup must not newly rely on a
/// condemned chunk. A list that cannot be read (damaged, or of version 1) is ignored with a warning: the
/// restore goes on, and only a chunk that is nowhere else is then missing. Its checksum is not checked here
/// (that would read the whole list for each miss): whatever is read from a location it gives is checked
/// against the digest like every read.
pub(crate) fn find_condemned(
    store: &dyn Store,
    digest: &Digest,
) -> Result<Option<crate::ChunkLocation>> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let path = store.display_key(GcPaths::CONDEMNED);
    let ignore = |e: RepoError| {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(file = %path.display(), error = %e,
                  "The list of chunks a pending garbage collection condemned cannot be read; it is ignored \
                   (`backflow verify` says how to repair it).");
        }
        Ok(None)
    };
    let (file, count) = match open_list::<LOCATED_SIZE>(store, GcPaths::CONDEMNED, None) {
        Ok(opened) => opened,
        Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return ignore(e),
    };
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut b = [0u8; LOCATED_SIZE];
        read_exact_at(
            &file,
            &mut b,
            LIST_HEADER_SIZE as u64 + mid * LOCATED_SIZE as u64,
            &path,
            "record",
        )?;
        match b[..32].cmp(&digest.0[..]) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                return match Located::decode(&b, false, &path) {
                    Ok(r) => Ok(Some(r.location())),
                    Err(e) => ignore(e),
                };
            }
        }
    }
    Ok(None)
}

/// `quarantine/packs/XX/ID.pack`: where a damaged pack is moved.
pub(crate) fn quarantine_key(id: &PackId) -> String {
    format!("{QUARANTINE_DIR}/{}", pack_key(id))
}

/// The quarantined pack of a local repository, for tests.
#[cfg(test)]
pub(crate) fn quarantine_path(root: &Path, id: &PackId) -> PathBuf {
    root.join(quarantine_key(id))
}

// ---------------------------------------------------------------------------------------------------------
// Registered users: every open repository handle (`Store::register` under `users/`).

/// Where handles register.
pub(crate) const USERS: &str = "users/";

/// The registered handles that are alive, other than `own` (and, when `among` is given, only those in it).
/// A registration that is not live (its process died, or its lease ran out) counts as gone.
pub(crate) fn live_users(
    store: &dyn Store,
    own: Option<&str>,
    among: Option<&[String]>,
) -> Result<Vec<String>> {
    let mut out: Vec<String> = store
        .live(USERS)?
        .into_iter()
        .filter(|name| Some(name.as_str()) != own && among.is_none_or(|l| l.contains(name)))
        .collect();
    out.sort();
    Ok(out)
}
