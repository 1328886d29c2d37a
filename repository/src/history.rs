//! Session history: one JSON record per run of a job, in `sessions/<id>.json`.
//!
//! Records are opaque to the repository (the job runner writes them, `backflow sessions` reads
//! them) and kept beside the snapshots, so that the history travels with the data it describes.
//! Each is written once, under a temporary name, fsynced and renamed, like every other file. The
//! directory is optional: a repository without it has no history yet. `verify` ignores it.

use crate::error::{IoContext, Result};
use crate::repository::Repository;

const DIR: &str = "sessions";

impl Repository {
    /// A fresh session id, `YYYYMMDDTHHMMSSZ-xxxxxx` like snapshot ids: sorts by time.
    pub fn new_session_id(unix_secs: i64) -> String {
        crate::ids::snapshot_id(unix_secs, crate::ids::random_suffix())
    }

    /// Stores the record of session `id` (durably; an existing record of that id is replaced).
    pub fn record_session(&self, id: &str, record: &serde_json::Value) -> Result<()> {
        let dir = self.path().join(DIR);
        std::fs::create_dir_all(&dir).ctx("create", &dir)?;
        let dest = dir.join(format!("{id}.json"));
        let tmp = dir.join(format!(".{id}.json.tmp"));
        let text = serde_json::to_vec_pretty(record).expect("a JSON value serialises");
        crate::format::write_durably(&tmp, &dest, &text)
    }

    /// Every session record, oldest first. A record that cannot be read is skipped with a
    /// warning in the log.
    pub fn list_sessions(&self) -> Result<Vec<serde_json::Value>> {
        let dir = self.path().join(DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("list", &dir),
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry.ctx("list", &dir)?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|id| crate::ids::valid_id(id))
                .map(str::to_owned)
            else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push((id, record)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "Skipping an unreadable session record.")
                }
            }
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(records.into_iter().map(|(_, r)| r).collect())
    }
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
        let ids: Vec<_> = repo
            .list_sessions()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, [earlier, later]);
    }
}
