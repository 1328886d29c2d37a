//! The `config` file: what a reader must know before it reads anything else.

use std::path::Path;

use crate::error::{RepoError, Result};
use crate::format::FORMAT_VERSION;

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

    /// Writes `config` through a temporary name so a crash during `init` leaves no half-written config (a
    /// directory without `config` is not a repository and `init` may be retried).
    pub(crate) fn store(&self, repo: &Path) -> Result<()> {
        let tmp = repo.join("config.tmp");
        let path = repo.join("config");
        let mut text = serde_json::to_vec_pretty(self).expect("config serializes");
        text.push(b'\n');
        crate::format::write_durably(&tmp, &path, &text)
    }

    pub(crate) fn load(repo: &Path) -> Result<RepositoryConfig> {
        let path = repo.join("config");
        let not_repo = |reason: String| RepoError::NotARepository {
            path: repo.to_owned(),
            reason,
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_repo("it has no `config` file".into()));
            }
            Err(e) => return Err(RepoError::io("read", path, e)),
        };
        if text.len() > 64 * 1024 {
            return Err(not_repo(format!(
                "`config` is {} bytes, far larger than any config",
                text.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| not_repo(format!("`config` is not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(not_repo(format!(
                "`config` does not say \"format\": \"{FORMAT_NAME}\""
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
        check_chunk_size(config.chunk_size)
            .map_err(|e| RepoError::corrupt(&path, e.to_string()))?;
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
        let c = RepositoryConfig::new(&InitOptions::default()).unwrap();
        c.store(dir.path()).unwrap();
        assert_eq!(RepositoryConfig::load(dir.path()).unwrap(), c);
        std::fs::write(
            dir.path().join("config"),
            br#"{"format":"backflow-repository","version":2}"#,
        )
        .unwrap();
        assert!(matches!(
            RepositoryConfig::load(dir.path()),
            Err(RepoError::UnsupportedVersion { found: 2, .. })
        ));
        std::fs::write(dir.path().join("config"), b"\0\0").unwrap();
        assert!(matches!(
            RepositoryConfig::load(dir.path()),
            Err(RepoError::NotARepository { .. })
        ));
    }
}
