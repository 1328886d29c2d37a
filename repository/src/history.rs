//! Session history: one JSON record per run of a job, in `sessions/<id>.json`.
//!
//! Records are opaque to the repository (the job runner writes them, `backflow sessions` reads
//! them) and kept beside the snapshots, so that the history travels with the data it describes.
//! Each is written whole and durably ([`crate::store::Store::put`]), like every other file. The
//! directory is optional: a repository without it has no history yet.
//!
//! A file holds `{"checksum":"HEX","record":RECORD}`, the checksum being the BLAKE3 of the record's
//! text exactly as it stands in the file (records of earlier releases are the bare record and are
//! read as they are). A
//! record that cannot be read, or whose checksum fails, is a side file's damage: listings skip it
//! with a warning and `verify` reports it; nothing else depends on it.

use std::path::PathBuf;

use crate::error::Result;
use crate::repository::Repository;
use crate::store::{PutMode, Store};

const DIR: &str = "sessions/";

impl Repository {
    /// A fresh session id, `YYYYMMDDTHHMMSSZ-xxxxxx` like snapshot ids: sorts by time.
    pub fn new_session_id(unix_secs: i64) -> String {
        crate::ids::snapshot_id(unix_secs, crate::ids::random_suffix())
    }

    /// Stores the record of session `id` (durably; an existing record of that id is replaced).
    pub fn record_session(&self, id: &str, record: &serde_json::Value) -> Result<()> {
        let body = serde_json::to_string_pretty(record).expect("a JSON value serialises");
        let text = format!(
            "{{\"checksum\":\"{}\",\"record\":{body}}}\n",
            blake3::hash(body.as_bytes()).to_hex()
        );
        self.store().put(
            &format!("{DIR}{id}.json"),
            text.as_bytes(),
            PutMode::Replace,
        )
    }

    /// Every session record, oldest first. A record that cannot be read is skipped with a
    /// warning in the log.
    pub fn list_sessions(&self) -> Result<Vec<serde_json::Value>> {
        let mut records = Vec::new();
        for (id, path, read) in self.session_files()? {
            match read {
                Ok(record) => records.push((id, record)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "Skipping an unreadable session record.")
                }
            }
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(records.into_iter().map(|(_, r)| r).collect())
    }

    /// The session records that cannot be read, for `verify`.
    pub(crate) fn session_record_problems(&self) -> Result<Vec<crate::DamagedFile>> {
        Ok(self
            .session_files()?
            .into_iter()
            .filter_map(|(_, path, read)| {
                read.err().map(|e| crate::DamagedFile {
                    path: path.display().to_string(),
                    error: format!("{e}; `sessions` leaves it out (remove it to silence this)"),
                })
            })
            .collect())
    }

    /// Each record file: its id, path, and record or why it cannot be read.
    #[allow(clippy::type_complexity)]
    fn session_files(
        &self,
    ) -> Result<
        Vec<(
            String,
            PathBuf,
            std::result::Result<serde_json::Value, String>,
        )>,
    > {
        let store = &**self.store();
        let mut out = Vec::new();
        for name in store.list_names(DIR)? {
            let Some(id) = name
                .strip_suffix(".json")
                .filter(|id| crate::ids::valid_id(id))
                .map(str::to_owned)
            else {
                continue;
            };
            let key = format!("{DIR}{name}");
            let read = read_record(store, &key);
            out.push((id, store.display_key(&key), read));
        }
        Ok(out)
    }
}

/// Largest session record read: a job over thousands of VMs with their reports stays far below.
const MAX_RECORD_LEN: u64 = 64 << 20;

/// A record file as written by [`Repository::record_session`]: the record's text, untouched, beside its
/// checksum (parsing numbers and printing them again need not give the same text).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    checksum: String,
    record: Box<serde_json::value::RawValue>,
}

fn read_record(store: &dyn Store, key: &str) -> std::result::Result<serde_json::Value, String> {
    let bytes = crate::format::read_bounded(store, key, MAX_RECORD_LEN)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "removed while it was read".to_owned())?;
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(format!("larger than {MAX_RECORD_LEN} bytes"));
    }
    if let Ok(wrapped) = serde_json::from_slice::<Wrapped>(&bytes) {
        let text = wrapped.record.get();
        if *blake3::hash(text.as_bytes()).to_hex() != *wrapped.checksum {
            return Err("checksum mismatch: the record changed after it was written".into());
        }
        return serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"));
    }
    // A record of an earlier release, or a damaged one.
    serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_kept_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("r"), crate::DEFAULT_CHUNK_SIZE).unwrap();
        assert!(repo.list_sessions().unwrap().is_empty());
        let later = Repository::new_session_id(2_000_000_000);
        let earlier = Repository::new_session_id(1_000_000_000);
        repo.record_session(&later, &serde_json::json!({"id": later}))
            .unwrap();
        repo.record_session(&earlier, &serde_json::json!({"id": earlier}))
            .unwrap();
        std::fs::write(dir.path().join("r/sessions/junk.json"), "{").unwrap();
        // Numbers that do not print back the same after parsing keep their checksum.
        let odd = Repository::new_session_id(1_500_000_000);
        let record =
            serde_json::json!({"id": odd, "seconds": 123_456_789.123_456_79_f64, "tiny": 1e-7});
        repo.record_session(&odd, &record).unwrap();
        assert!(repo.session_record_problems().unwrap().len() == 1);
        let flipped = dir.path().join(format!("r/sessions/{odd}.json"));
        let text = std::fs::read_to_string(&flipped).unwrap();
        let listed = repo.list_sessions().unwrap();
        assert!(
            listed.iter().any(|r| r["id"] == odd && r["tiny"] == 1e-7),
            "{listed:?}"
        );
        std::fs::write(&flipped, text.replace("1e-7", "2e-7")).unwrap();
        let problems = repo.session_record_problems().unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.error.contains("checksum mismatch")),
            "{problems:?}"
        );
        std::fs::remove_file(&flipped).unwrap();
        let ids: Vec<_> = repo
            .list_sessions()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, [earlier, later]);
    }
}
