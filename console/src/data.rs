//! What the console reads from the jobs' repositories, cached: each repository's sessions and
//! restore points for [`VIEW_TTL`], its usage for [`USAGE_TTL`], each local job's selection of
//! VMs for [`SELECTION_TTL`]. An action that changes a repository drops its cache. Everything
//! here blocks (files, object storage, libvirt): callers run it on the blocking pool. Repository
//! handles are opened for each read and dropped after it (see [`Data::repository`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backflow_jobs::{Job, JobKind, SessionRecord, Verdict};
use backflow_repository::{Location, Repository, SnapshotInfo, Usage};

use crate::JobState;

/// How long a repository's sessions and restore points are reused.
pub const VIEW_TTL: Duration = Duration::from_secs(3);
/// How long a repository's usage is reused (it lists every pack).
pub const USAGE_TTL: Duration = Duration::from_secs(60);
/// How long a job's selection of VMs (a libvirt listing) is reused.
pub const SELECTION_TTL: Duration = Duration::from_secs(60);

/// One repository's sessions and restore points, as read at one moment.
#[derive(Debug, Default)]
pub struct RepoView {
    pub location: String,
    /// Oldest first.
    pub sessions: Vec<SessionRecord>,
    /// Oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Why the repository could not be read (then the lists are empty).
    pub error: Option<String>,
}

type Cached<T> = Mutex<HashMap<String, (Instant, T)>>;

/// The caches.
#[derive(Default)]
pub struct Data {
    views: Cached<Arc<RepoView>>,
    /// With the restore points it was computed for (their count and the newest's id): a
    /// backup's commit or a forget makes it stale before [`USAGE_TTL`].
    usage: Cached<(String, Result<Usage, String>)>,
    selections: Cached<Vec<String>>,
}

impl Data {
    /// The repository at `location`, opened for one read. Never kept: an open handle is
    /// registered in the repository's `users/` until it is dropped, and a gc's sweep waits for
    /// every handle registered at its mark: a console holding one would hold every gc back.
    pub fn repository(&self, location: &Location) -> Result<Repository, String> {
        Repository::open_at(location).map_err(|e| e.to_string())
    }

    /// Its sessions and restore points.
    pub fn view(&self, location: &Location) -> Arc<RepoView> {
        let key = location.to_string();
        if let Some((at, view)) = lock(&self.views).get(&key)
            && at.elapsed() < VIEW_TTL
        {
            return Arc::clone(view);
        }
        let read = || -> Result<RepoView, String> {
            let repo = self.repository(location)?;
            let sessions = backflow_jobs::sessions_in(&repo).map_err(|e| e.to_string())?;
            let snapshots = repo.list_snapshots().map_err(|e| e.to_string())?;
            Ok(RepoView {
                location: key.clone(),
                sessions,
                snapshots,
                error: None,
            })
        };
        let view = Arc::new(read().unwrap_or_else(|e| RepoView {
            location: key.clone(),
            error: Some(e),
            ..RepoView::default()
        }));
        lock(&self.views).insert(key, (Instant::now(), Arc::clone(&view)));
        view
    }

    /// Its usage.
    pub fn usage(&self, location: &Location) -> Result<Usage, String> {
        let key = location.to_string();
        let view = self.view(location);
        let points = format!(
            "{} {}",
            view.snapshots.len(),
            view.snapshots.last().map_or("", |s| s.id.as_str())
        );
        if let Some((at, (seen, usage))) = lock(&self.usage).get(&key)
            && at.elapsed() < USAGE_TTL
            && *seen == points
        {
            return usage.clone();
        }
        let usage = self
            .repository(location)
            .and_then(|r| r.usage().map_err(|e| e.to_string()));
        lock(&self.usage).insert(key, (Instant::now(), (points, usage.clone())));
        usage
    }

    /// Forgets what was cached of `location` (after an action changed it).
    pub fn invalidate(&self, location: &Location) {
        let key = location.to_string();
        lock(&self.views).remove(&key);
        lock(&self.usage).remove(&key);
    }

    /// The VMs and images a local backup job selects now (empty for other jobs, for cluster jobs,
    /// whose listing goes over SSH, and when libvirt cannot be asked).
    pub fn selection(&self, job: &Job) -> Vec<String> {
        if !matches!(job.kind(), JobKind::Backup { .. }) || job.cluster.is_some() {
            return Vec::new();
        }
        let key = job.name.0.clone();
        if let Some((at, list)) = lock(&self.selections).get(&key)
            && at.elapsed() < SELECTION_TTL
        {
            return list.clone();
        }
        let list = match backflow_jobs::run::plan(job, None) {
            Ok(sources) => sources.iter().map(|s| s.label()).collect(),
            Err(e) => {
                tracing::debug!(job = %job.name.0, error = %e, "Cannot list the job's VMs.");
                Vec::new()
            }
        };
        lock(&self.selections).insert(key, (Instant::now(), list.clone()));
        list
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The distinct repositories of the jobs, in the jobs' order.
pub fn repositories(jobs: &[JobState]) -> Vec<Location> {
    let mut out: Vec<Location> = Vec::new();
    for j in jobs {
        if !out
            .iter()
            .any(|l| l.to_string() == j.job.repository.to_string())
        {
            out.push(j.job.repository.clone());
        }
    }
    out
}

/// One VM (or image) of a backup job, with its last backup.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct VmSummary {
    pub vm: String,
    pub job: String,
    pub repository: String,
    /// Unix seconds when its last backup ended (any outcome); `None`: never backed up.
    pub last_backup: Option<i64>,
    /// `success`, `warning`, `cancelled` or `failure`.
    pub last_result: Option<String>,
    /// Unix seconds when its last successful backup (success or warning) ended.
    pub last_success: Option<i64>,
    /// The restore point its last successful backup made.
    pub last_snapshot: Option<String>,
    /// That restore point's size (its disks' sizes).
    pub last_size: u64,
    /// Bytes the last successful backup added to the repository.
    pub last_bytes_written: u64,
    /// The last backup's error, when it failed.
    pub last_error: Option<String>,
    /// Restore points of this VM in the job's repository.
    pub restore_points: usize,
}

/// Every VM of every backup job: those its sessions name, and those its selection lists now.
pub fn vms(jobs: &[JobState], data: &Data) -> Vec<VmSummary> {
    let mut out = Vec::new();
    for state in jobs {
        let job = &state.job;
        if !matches!(job.kind(), JobKind::Backup { .. }) {
            continue;
        }
        let view = data.view(&job.repository);
        let mut by_vm: BTreeMap<String, VmSummary> = BTreeMap::new();
        for name in data.selection(job) {
            by_vm.insert(name.clone(), summary(&name, job, &view));
        }
        for session in view.sessions.iter().filter(|s| s.job == job.name.0) {
            for record in &session.vms {
                let entry = by_vm
                    .entry(record.vm.clone())
                    .or_insert_with(|| summary(&record.vm, job, &view));
                entry.last_backup = Some(session.ended);
                entry.last_result = Some(record.result.to_string());
                entry.last_error = record.error.clone();
                if matches!(record.result, Verdict::Success | Verdict::Warning) {
                    entry.last_success = Some(session.ended);
                    entry.last_snapshot = record.snapshot.clone();
                    entry.last_bytes_written = record.bytes_written;
                    entry.last_size = record
                        .snapshot
                        .as_ref()
                        .and_then(|id| view.snapshots.iter().find(|s| &s.id == id))
                        .map_or(0, |s| s.size);
                }
            }
        }
        out.extend(by_vm.into_values());
    }
    out
}

fn summary(vm: &str, job: &Job, view: &RepoView) -> VmSummary {
    VmSummary {
        vm: vm.to_owned(),
        job: job.name.0.clone(),
        repository: job.repository.to_string(),
        restore_points: view.snapshots.iter().filter(|s| s.vm == vm).count(),
        ..VmSummary::default()
    }
}

/// The views of every repository of the jobs (a repository shared by two jobs read once).
pub fn views(jobs: &[JobState], data: &Data) -> Vec<Arc<RepoView>> {
    repositories(jobs).iter().map(|l| data.view(l)).collect()
}

/// The sessions of `views`, newest first, each with its repository: borrowed, so that a list
/// of the 20 newest copies 20 records, not every one.
pub fn newest_first(views: &[Arc<RepoView>]) -> Vec<(&str, &SessionRecord)> {
    let mut out: Vec<(&str, &SessionRecord)> = views
        .iter()
        .flat_map(|v| v.sessions.iter().map(|s| (v.location.as_str(), s)))
        .collect();
    out.sort_by(|a, b| b.1.started.cmp(&a.1.started).then(b.1.id.cmp(&a.1.id)));
    out
}
