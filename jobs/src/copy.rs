//! Copy jobs: restore points copied from another repository into the job's, on a schedule of their own
//! (the 3-2-1 rule: a local repository for fast restores, a copy off the hypervisors).
//!
//! ```yaml
//! name: offsite
//! repository: /mnt/offsite/backflow   # the target: copies go here, the session is recorded here
//! copy:
//!   from: /srv/backflow               # the source repository
//!   vms: [web01, "db-*"]              # identities (VM names, image names), globs; default: all
//!   password_file: /etc/backflow/local-passphrase   # the source's passphrase, when it is encrypted
//!                                     # with another one than the job's `password_file`
//! retention: {keep_daily: 7, keep_weekly: 8}   # applied to the target, each VM on its own
//! schedule: "30 3 * * *"
//! ```
//!
//! The job's `repository` is the target, as every job's `repository` is what it writes into, records its
//! sessions in and applies its retention to. With `retention`, a snapshot is copied only when the policy
//! keeps it among the target's snapshots of its VM and the source's: a snapshot the target's retention
//! would forget right after is never sent, so a target that keeps less than the source does not copy and
//! forget the same snapshots at every run. After the copy the policy is applied to the target's snapshots of
//! each VM the job copies.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use backflow_pipeline::CancelToken;
use backflow_repository::{
    ChunkEncoder, Codec, CopyOptions, CopyReport, KeepPolicy, Location, Repository, SnapshotInfo,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::file::{Job, Pattern};

/// What a copy job copies.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyJob {
    /// The repository copied from: a directory (relative to the job file) or `s3://BUCKET/PREFIX`.
    pub from: String,
    /// The identities whose snapshots are copied (names or globs); empty: every snapshot.
    #[serde(default)]
    pub vms: Vec<Pattern>,
    /// The passphrase file of the source, when it is encrypted under another passphrase than the
    /// target's (relative to the job file).
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
}

impl CopyJob {
    /// The source's location; a relative path is relative to the directory of the job file.
    pub fn location(&self, relative_to: &Path) -> Result<Location, String> {
        match Location::parse(&self.from).map_err(|e| format!("copy.from: {e}"))? {
            Location::Local(p) => Ok(Location::Local(relative_to.join(p))),
            other => Ok(other),
        }
    }
}

/// What a copy job did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyRecord {
    pub from: String,
    pub seconds: f64,
    /// `backflow copy --json`'s report; `None` when the copy could not run or failed.
    pub report: Option<CopyReport>,
    /// Snapshots of the target that the job's retention forgot after the copy.
    #[serde(default)]
    pub forgotten: Vec<String>,
    /// Retention that could not be applied (the copies are committed: a warning).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Why the copy could not run, or failed.
    pub error: Option<String>,
}

/// The zstd stage's compressor at its default level: what backups store chunks with.
pub struct ZstdEncoder(stage_zstd::ChunkCompressor);

impl ZstdEncoder {
    pub fn new() -> Result<ZstdEncoder, String> {
        stage_zstd::Zstd::new(stage_zstd::ZstdOptions::default())
            .map_err(|e| e.to_string())?
            .compressor()
            .map(ZstdEncoder)
            .map_err(|e| e.to_string())
    }

    /// An encoder per copy worker, as [`backflow_repository::copy`] asks for them. A context that cannot be
    /// created (out of memory) stores chunks raw, which is still valid.
    pub fn factory() -> impl Fn() -> Box<dyn ChunkEncoder> + Sync {
        || match ZstdEncoder::new() {
            Ok(e) => Box::new(e) as Box<dyn ChunkEncoder>,
            Err(e) => {
                tracing::warn!(error = %e, "No zstd context; chunks are copied uncompressed.");
                Box::new(Raw)
            }
        }
    }
}

impl ChunkEncoder for ZstdEncoder {
    fn encode(&mut self, plain: &[u8]) -> Result<(Codec, Vec<u8>), String> {
        let (codec, data) = self
            .0
            .encode(&Bytes::copy_from_slice(plain))
            .map_err(|e| e.to_string())?;
        Ok((codec, data.to_vec()))
    }
}

struct Raw;

impl ChunkEncoder for Raw {
    fn encode(&mut self, plain: &[u8]) -> Result<(Codec, Vec<u8>), String> {
        Ok((Codec::None, plain.to_vec()))
    }
}

/// The source snapshots the job copies: those of the identities its `vms` match (all without `vms`),
/// and with a retention policy only those it keeps among the source's and the target's snapshots of
/// their VM.
pub fn plan_copy(
    source: &[SnapshotInfo],
    target: &[SnapshotInfo],
    vms: &[Pattern],
    retention: Option<&KeepPolicy>,
) -> Vec<String> {
    let selected: Vec<&SnapshotInfo> = source
        .iter()
        .filter(|s| vms.is_empty() || vms.iter().any(|p| p.matches(&s.vm)))
        .collect();
    let Some(policy) = retention.filter(|p| !p.is_empty()) else {
        return selected.iter().map(|s| s.id.clone()).collect();
    };
    let copied: HashSet<&str> = selected.iter().map(|s| s.vm.as_str()).collect();
    let mut union: HashMap<&str, SnapshotInfo> = target
        .iter()
        .filter(|s| copied.contains(s.vm.as_str()))
        .map(|s| (s.id.as_str(), s.clone()))
        .collect();
    for s in &selected {
        union.entry(s.id.as_str()).or_insert_with(|| (*s).clone());
    }
    let union: Vec<SnapshotInfo> = union.into_values().collect();
    let kept: HashSet<String> = backflow_repository::plan(&union, policy)
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
    selected
        .iter()
        .filter(|s| kept.contains(&s.id))
        .map(|s| s.id.clone())
        .collect()
}

/// Runs the job's copy into `target` (the job's repository), then its retention on the target.
pub fn run_copy(
    job: &Job,
    copy: &CopyJob,
    target: &Repository,
    cancel: &CancelToken,
) -> CopyRecord {
    let started = Instant::now();
    let mut record = CopyRecord {
        from: copy.from.clone(),
        seconds: 0.0,
        report: None,
        forgotten: Vec::new(),
        warnings: Vec::new(),
        error: None,
    };
    tracing::info!(job = %job.name.0, from = %copy.from, "Copying restore points.");
    let done = copy_into(job, copy, target, cancel, &mut record);
    record.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = done {
        record.error = Some(e);
    }
    record
}

fn copy_into(
    job: &Job,
    copy: &CopyJob,
    target: &Repository,
    cancel: &CancelToken,
    record: &mut CopyRecord,
) -> Result<(), String> {
    // `parse` made `from` relative to the job file already.
    let location = copy.location(Path::new(""))?;
    let source = Repository::open_at(&location).map_err(|e| format!("copy.from: {e}"))?;
    let listed = source
        .list_snapshots()
        .map_err(|e| format!("listing the source: {e}"))?;
    let present = target
        .list_snapshots()
        .map_err(|e| format!("listing the target: {e}"))?;
    let ids = plan_copy(&listed, &present, &copy.vms, job.retention.as_ref());
    let vms: HashSet<String> = listed
        .iter()
        .filter(|s| ids.contains(&s.id))
        .map(|s| s.vm.clone())
        .collect();
    if !ids.is_empty() {
        let options = CopyOptions {
            snapshots: ids,
            ..CopyOptions::default()
        };
        let report =
            backflow_repository::copy(&source, target, &options, &ZstdEncoder::factory(), &|| {
                cancel.is_cancelled()
            })
            .map_err(|e| e.to_string())?;
        record.report = Some(report);
    } else {
        record.report = Some(CopyReport {
            from: source.location().to_string(),
            to: target.location().to_string(),
            ..CopyReport::default()
        });
    }
    if let Some(policy) = job.retention.as_ref().filter(|p| !p.is_empty()) {
        let mut vms: Vec<String> = vms.into_iter().collect();
        vms.sort();
        for vm in vms {
            match crate::run::retain(target, &vm, policy) {
                Ok(gone) => record.forgotten.extend(gone),
                Err(e) => record.warnings.push(format!("retention of {vm}: {e}")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, vm: &str, time: i64) -> SnapshotInfo {
        serde_json::from_value(serde_json::json!({
            "id": id, "vm": vm, "time": time, "time_utc": "", "hostname": "h", "disks": []
        }))
        .unwrap()
    }

    const DAY: i64 = 86_400;

    #[test]
    fn without_retention_every_selected_snapshot_is_planned() {
        let source = [
            snap("a1", "a", DAY),
            snap("b1", "b", DAY),
            snap("a2", "a", 2 * DAY),
        ];
        let vms = [Pattern("a".into())];
        assert_eq!(plan_copy(&source, &[], &vms, None), ["a1", "a2"]);
        assert_eq!(plan_copy(&source, &[], &[], None), ["a1", "b1", "a2"]);
    }

    #[test]
    fn a_snapshot_the_target_would_forget_is_not_planned() {
        // The source keeps three days; the target keeps two: the oldest is never sent, also when the
        // target already holds the two newest.
        let source = [
            snap("d1", "a", DAY),
            snap("d2", "a", 2 * DAY),
            snap("d3", "a", 3 * DAY),
        ];
        let policy = KeepPolicy {
            daily: Some(2),
            ..KeepPolicy::default()
        };
        assert_eq!(plan_copy(&source, &[], &[], Some(&policy)), ["d2", "d3"]);
        let target = [snap("d2", "a", 2 * DAY), snap("d3", "a", 3 * DAY)];
        assert_eq!(
            plan_copy(&source, &target, &[], Some(&policy)),
            ["d2", "d3"]
        );
        // A newer snapshot in the target (its own backup) pushes the older copies out of the plan.
        let target = [snap("t4", "a", 4 * DAY), snap("t5", "a", 5 * DAY)];
        assert!(plan_copy(&source, &target, &[], Some(&policy)).is_empty());
    }
}
