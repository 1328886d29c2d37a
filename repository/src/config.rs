//! The `config` file: what a reader must know before it reads anything else.
//!
//! It is kept twice: `config` (JSON, what earlier releases read) and `config.copy`, the same text followed by
//! a line `checksum <BLAKE3 of the text, hex>`. One damaged or missing copy does not make the repository
//! unreadable: the copy whose checksum holds wins (a `config` that parses but differs from it was changed
//! after it was written), a damaged copy is ignored with a warning, and `verify` writes the damaged one
//! again from the good one. A repository of an earlier release has no copy; `verify` adds it.

use tracing::warn;

use crate::error::{RepoError, Result};
use crate::format::FORMAT_VERSION;
use crate::store::{PutMode, Store};

/// Chunk sizes are multiples of the QEMU dirty-bitmap granularity, so a dirty extent maps to whole chunks.
pub const CHUNK_SIZE_ALIGN: u32 = 64 * 1024;
/// Smallest chunk size: one bitmap granule.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size. Bounds every allocation made from a length read from disk (a damaged index cannot make
/// a reader allocate gigabytes).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk size. In the design's measured incremental (5% of a 2 GiB image rewritten, half of it new
/// data) 128 KiB chunks grew the repository by about twice the new data (64 KiB: once, 1 MiB: seven times)
/// with half the index entries of 64 KiB; the stage benchmarks are to confirm it.
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// Largest encoded blob: a chunk that zstd expanded (incompressible data is stored with [`crate::Codec::None`]
/// instead, so real blobs stay below the raw size; the margin covers zstd's worst case).
pub const MAX_STORED_LEN: u32 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 128 + 64 * 1024;
/// Default size at which a pack writer closes its pack: tens of MiB keep the file count low (object storage
/// bills per request) while a damaged pack loses a bounded amount of data.
pub const DEFAULT_PACK_TARGET_SIZE: u64 = 32 * 1024 * 1024;
/// Bounds of the pack target size accepted by `init`.
pub const MIN_PACK_TARGET_SIZE: u64 = 64 * 1024;
pub const MAX_PACK_TARGET_SIZE: u64 = 1024 * 1024 * 1024;

/// The `format` value of every config file; anything else is not ours.
const FORMAT_NAME: &str = "backflow-repository";

/// Options of [`crate::Repository::init_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub pack_target_size: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_target_size: DEFAULT_PACK_TARGET_SIZE,
        }
    }
}

/// Contents of `config` (JSON; the file is tiny and read once per open, so readability wins).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepositoryConfig {
    /// Always `backflow-repository`.
    pub format: String,
    /// Format version of the whole repository; see [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// Random id of this repository (32 hex digits), for telling copies apart.
    pub id: String,
    /// Chunk size of new disks. Each disk records its own in the manifest, so changing it later is possible.
    pub chunk_size: u32,
    pub pack_target_size: u64,
}

pub(crate) fn check_chunk_size(chunk_size: u32) -> Result<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        || !chunk_size.is_multiple_of(CHUNK_SIZE_ALIGN)
    {
        return Err(RepoError::InvalidArgument(format!(
            "chunk size {chunk_size} is not a multiple of 64 KiB between 64 KiB and 16 MiB"
        )));
    }
    Ok(())
}

impl RepositoryConfig {
    pub(crate) fn new(options: &InitOptions) -> Result<RepositoryConfig> {
        check_chunk_size(options.chunk_size)?;
        if !(MIN_PACK_TARGET_SIZE..=MAX_PACK_TARGET_SIZE).contains(&options.pack_target_size) {
            return Err(RepoError::InvalidArgument(format!(
                "pack target size {} is outside 64 KiB..=1 GiB",
                options.pack_target_size
            )));
        }
        Ok(RepositoryConfig {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            id: crate::format::hex(&rand::random::<[u8; 16]>()),
            chunk_size: options.chunk_size,
            pack_target_size: options.pack_target_size,
        })
    }

    /// Writes `config.copy`, then `config`, each through a temporary name, so a crash during `init` leaves no
    /// half-written config (a directory without `config` is not a repository and `init` may be retried).
    pub(crate) fn store(&self, store: &dyn Store) -> Result<()> {
        let text = self.text();
        store.put(COPY, &with_checksum(&text), PutMode::Replace)?;
        store.put(FILE, &text, PutMode::Replace)
    }

    fn text(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).expect("config serializes");
        text.push(b'\n');
        text
    }

    /// Reads the config from whichever copy is intact (see the module docs), warning about the other.
    pub(crate) fn load(store: &dyn Store) -> Result<RepositoryConfig> {
        let (config, problems) = read_both(store)?;
        for p in &problems {
            warn!(repo = %store.location(), problem = %p,
                  "A copy of the repository's config is damaged; the other one is used (`backflow verify` \
                   repairs it).");
        }
        Ok(config)
    }
}

/// The main copy, read by every release.
const FILE: &str = "config";
/// The checksummed second copy.
const COPY: &str = "config.copy";

fn with_checksum(text: &[u8]) -> Vec<u8> {
    let mut out = text.to_vec();
    out.extend_from_slice(format!("checksum {}\n", blake3::hash(text).to_hex()).as_bytes());
    out
}

/// The config, and what is wrong with either copy (empty when both are intact and agree).
fn read_both(store: &dyn Store) -> Result<(RepositoryConfig, Vec<String>)> {
    let main = parse_file(store, FILE, |t| Ok(t.to_vec()));
    let copy = parse_file(store, COPY, checked_text);
    match (main, copy) {
        (Ok(m), Ok(c)) if m == c => Ok((m, Vec::new())),
        (Ok(_), Ok(c)) => Ok((
            c,
            vec![format!(
                "`{FILE}` differs from its checksummed copy `{COPY}`: it was changed after it was written; \
                 the copy is used"
            )],
        )),
        (Ok(m), Err(RepoError::NotARepository { .. })) => Ok((
            m,
            vec![format!(
                "`{COPY}` is missing (a repository of an earlier release)"
            )],
        )),
        (Ok(m), Err(e)) => Ok((m, vec![format!("`{COPY}` is damaged: {e}")])),
        // Both unreadable: the error of the main copy says the most to a user.
        (Err(e @ RepoError::UnsupportedVersion { .. }), _) => Err(e),
        (Err(e), Ok(c)) => Ok((c, vec![format!("`{FILE}` is damaged: {e}")])),
        (Err(e), Err(_)) => Err(e),
    }
}

/// The text of `config.copy` without its checksum line, if the checksum holds.
fn checked_text(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let body_end = bytes[..bytes.len().saturating_sub(1)]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let (body, last) = bytes.split_at(body_end);
    let last = std::str::from_utf8(last).map_err(|_| "its checksum line is not text".to_owned())?;
    let sum = last
        .trim_end()
        .strip_prefix("checksum ")
        .ok_or_else(|| "no checksum line at the end".to_owned())?;
    if crate::format::parse_hex::<32>(sum) != Some(*blake3::hash(body).as_bytes()) {
        return Err("checksum mismatch: it changed after it was written".to_owned());
    }
    Ok(body.to_vec())
}

/// Reads and checks one copy; `text` turns the file's bytes into the JSON text (or says why not).
fn parse_file(
    store: &dyn Store,
    name: &str,
    text: impl FnOnce(&[u8]) -> std::result::Result<Vec<u8>, String>,
) -> Result<RepositoryConfig> {
    let path = store.display_key(name);
    let not_repo = |reason: String| RepoError::NotARepository {
        path: store.display_key(""),
        reason,
    };
    let Some(bytes) = crate::format::read_bounded(store, name, MAX_LEN)? else {
        return Err(not_repo(format!("it has no `{name}` file")));
    };
    if bytes.len() as u64 > MAX_LEN {
        return Err(RepoError::corrupt(
            &path,
            format!("more than {MAX_LEN} bytes, far larger than any config"),
        ));
    }
    let json = text(&bytes).map_err(|e| RepoError::corrupt(&path, e))?;
    let value: serde_json::Value = serde_json::from_slice(&json)
        .map_err(|e| not_repo(format!("`{name}` is not JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(not_repo(format!(
            "`{name}` does not say \"format\": \"{FORMAT_NAME}\""
        )));
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != u64::from(FORMAT_VERSION) {
        return Err(RepoError::UnsupportedVersion {
            path,
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: FORMAT_VERSION,
        });
    }
    let config: RepositoryConfig = serde_json::from_value(value)
        .map_err(|e| RepoError::corrupt(&path, format!("invalid config: {e}")))?;
    check_chunk_size(config.chunk_size).map_err(|e| RepoError::corrupt(&path, e.to_string()))?;
    if !(MIN_PACK_TARGET_SIZE..=MAX_PACK_TARGET_SIZE).contains(&config.pack_target_size) {
        return Err(RepoError::corrupt(
            &path,
            format!(
                "pack_target_size {} is out of range",
                config.pack_target_size
            ),
        ));
    }
    Ok(config)
}

/// Largest config file read.
const MAX_LEN: u64 = 64 * 1024;

/// What `verify` reports about the two copies (empty: both intact and equal).
pub(crate) fn copy_problems(store: &dyn Store) -> Vec<crate::DamagedFile> {
    match read_both(store) {
        Ok((_, problems)) => problems
            .into_iter()
            .map(|p| crate::DamagedFile {
                path: store.display_key(FILE).display().to_string(),
                error: format!("{p}; `backflow verify` writes both copies again"),
            })
            .collect(),
        Err(e) => vec![crate::DamagedFile {
            path: store.display_key(FILE).display().to_string(),
            error: e.to_string(),
        }],
    }
}

/// Writes both copies again from the intact one when either is damaged or missing; returns whether it did.
pub(crate) fn repair(store: &dyn Store) -> Result<bool> {
    let (config, problems) = read_both(store)?;
    if problems.is_empty() {
        return Ok(false);
    }
    config.store(store)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_checked() {
        assert!(check_chunk_size(64 * 1024).is_ok());
        assert!(check_chunk_size(DEFAULT_CHUNK_SIZE).is_ok());
        assert!(check_chunk_size(MAX_CHUNK_SIZE).is_ok());
        assert!(check_chunk_size(0).is_err());
        assert!(check_chunk_size(96 * 1024).is_err());
        assert!(check_chunk_size(MAX_CHUNK_SIZE + CHUNK_SIZE_ALIGN).is_err());
    }

    #[test]
    fn store_then_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let store = crate::store::FsStore::new(dir.path());
        let c = RepositoryConfig::new(&InitOptions::default()).unwrap();
        c.store(&store).unwrap();
        assert_eq!(RepositoryConfig::load(&store).unwrap(), c);
        assert!(copy_problems(&store).is_empty());
        std::fs::write(
            dir.path().join(FILE),
            br#"{"format":"backflow-repository","version":2}"#,
        )
        .unwrap();
        assert!(matches!(
            RepositoryConfig::load(&store),
            Err(RepoError::UnsupportedVersion { found: 2, .. })
        ));
        std::fs::remove_file(dir.path().join(COPY)).unwrap();
        std::fs::write(dir.path().join(FILE), b"\0\0").unwrap();
        assert!(matches!(
            RepositoryConfig::load(&store),
            Err(RepoError::NotARepository { .. })
        ));
    }

    #[test]
    fn one_damaged_copy_is_survived_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("tmp")).unwrap();
        let store = crate::store::FsStore::new(root);
        let c = RepositoryConfig::new(&InitOptions::default()).unwrap();
        c.store(&store).unwrap();
        let main = std::fs::read(root.join(FILE)).unwrap();
        let copy = std::fs::read(root.join(COPY)).unwrap();
        // A changed digit that still parses: only the copy's checksum tells.
        let alter = |b: &[u8]| {
            String::from_utf8(b.to_vec())
                .unwrap()
                .replace("33554432", "33554433")
                .into_bytes()
        };
        let altered = alter(&main);
        let bad_copy = alter(&copy);
        assert!(altered != main && bad_copy != copy);
        type Case<'a> = (&'a str, Option<Vec<u8>>, Option<Vec<u8>>, &'a str);
        let cases: Vec<Case> = vec![
            (
                "config garbled",
                Some(b"{\x01".to_vec()),
                Some(copy.clone()),
                "`config` is damaged",
            ),
            (
                "config altered",
                Some(altered),
                Some(copy.clone()),
                "differs from its checksummed copy",
            ),
            (
                "config missing",
                None,
                Some(copy.clone()),
                "`config` is damaged",
            ),
            (
                "copy altered",
                Some(main.clone()),
                Some(bad_copy),
                "checksum mismatch",
            ),
            ("copy missing", Some(main.clone()), None, "is missing"),
        ];
        for (name, m, k, expected) in cases {
            for (file, bytes) in [(FILE, &m), (COPY, &k)] {
                match bytes {
                    Some(b) => std::fs::write(root.join(file), b).unwrap(),
                    None => std::fs::remove_file(root.join(file)).unwrap(),
                }
            }
            assert_eq!(RepositoryConfig::load(&store).unwrap(), c, "{name}");
            let problems = copy_problems(&store);
            assert!(
                problems.len() == 1 && problems[0].error.contains(expected),
                "{name}: {problems:?}"
            );
            assert!(repair(&store).unwrap(), "{name}");
            assert!(copy_problems(&store).is_empty(), "{name}");
            assert_eq!(std::fs::read(root.join(FILE)).unwrap(), main, "{name}");
            assert_eq!(std::fs::read(root.join(COPY)).unwrap(), copy, "{name}");
        }
    }
}
