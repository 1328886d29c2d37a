//! Running a job once: every selected VM through the job's pipeline spec, `parallel` at a time,
//! then the session's record.
//!
//! Each VM is its own pipeline run (its own snapshot, cleanup and report): one VM failing does not
//! stop the others, and the session's outcome is the worst of its VMs'.
//!
//! A health-check job runs `verify` instead ([`Repository::verify_and_mark`]): the damaged chunks
//! it finds are marked, so that the next backup of a VM that still has the data stores it again.
//! Its session is a failure when a restore point needs a damaged chunk, a warning when damage was
//! found that a later copy already heals, a success otherwise; the record holds the counts and the
//! affected snapshots.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use backflow_libvirt::Connection;
use backflow_pipeline::spec::{self, Override};
use backflow_pipeline::{CancelToken, OutcomeKind, RunOptions, RunReport};
use backflow_repository::Repository;
use backflow_stages::Stages;
use serde::Serialize;

use crate::file::Job;
use crate::select::{Selected, select};

/// The built-in spec a job runs when its file names none.
pub const BACKUP_VM_SPEC: &str = include_str!("../../specs/backup-vm.yaml");

/// How one VM's backup in a session ended. Ordered from best to worst: a session's result is
/// the greatest of its VMs'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Success,
    /// Succeeded, with warnings (a full read where an incremental was expected, no guest agent).
    Warning,
    Cancelled,
    Failure,
}

impl std::fmt::Display for Verdict {
    /// The name the session record gives it (`success`, `warning`, `cancelled`, `failure`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Verdict::Success => "success",
            Verdict::Warning => "warning",
            Verdict::Cancelled => "cancelled",
            Verdict::Failure => "failure",
        })
    }
}

/// One VM of a session.
#[derive(Clone, Debug, Serialize)]
pub struct VmRecord {
    pub vm: String,
    pub result: Verdict,
    pub snapshot: Option<String>,
    pub disks: Vec<String>,
    pub excluded_disks: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    pub bottleneck: Option<String>,
    /// Snapshots of this VM that the job's retention forgot after this backup.
    pub forgotten: Vec<String>,
    /// The run's whole report (as `backflow run --report` writes it).
    pub report: Option<serde_json::Value>,
}

/// One run of a job.
#[derive(Clone, Debug, Serialize)]
pub struct SessionRecord {
    pub id: String,
    pub job: String,
    /// Unix seconds.
    pub started: i64,
    pub ended: i64,
    pub result: Verdict,
    pub vms: Vec<VmRecord>,
    /// A failure before any VM ran (job file, libvirt connection, selection).
    pub error: Option<String>,
    /// Whether the mail server accepted the session's report (`None`: none was due).
    pub notified: Option<bool>,
    /// What a health-check job found (`None` for backups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckRecord>,
    /// What a gc job did (`None` for other jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcRecord>,
}

/// What a gc job did.
#[derive(Clone, Debug, Serialize)]
pub struct GcRecord {
    pub seconds: f64,
    /// `backflow gc --json`'s report; `None` when the gc could not run.
    pub report: Option<backflow_repository::GcReport>,
    /// Why the gc could not run.
    pub error: Option<String>,
}

/// What a health check found.
#[derive(Clone, Debug, Serialize)]
pub struct HealthCheckRecord {
    pub read_data: bool,
    pub seconds: f64,
    pub snapshots: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Damaged chunks that restore points need (no healthy copy is stored).
    pub damaged_chunks: u64,
    /// Damaged copies of chunks that a later backup stored again: no restore point needs them.
    pub healed_chunks: u64,
    /// Damaged copies this check marked that were not marked before.
    pub new_marks: u64,
    /// Manifests, index files and packs that could not be read at all.
    pub damaged_files: Vec<String>,
    /// Snapshots that need a damaged chunk: they do not restore whole until it is healed.
    pub affected_snapshots: Vec<String>,
    /// Why the check could not run.
    pub error: Option<String>,
    /// `verify`'s whole report (as `backflow verify --json` prints it).
    pub report: Option<serde_json::Value>,
}

/// What a run may be told from outside.
#[derive(Clone, Debug, Default)]
pub struct RunJobOptions {
    /// Cancels the VMs running and skips those not started (they are recorded `cancelled`).
    pub cancel: CancelToken,
    /// Only this VM (it must be one the job selects).
    pub only: Option<String>,
    /// The VMs to back up, when the caller already selected them with [`plan`] (the daemon does,
    /// to keep two jobs off one VM); `None`: the run lists and selects them itself.
    pub selected: Option<Result<Vec<Selected>, String>>,
}

/// The time now, in unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Runs `job` once and records the session in its repository (when the repository opens). The
/// record is returned whatever happened; only a repository that cannot be opened, or a record
/// that cannot be written, is an `Err` besides it.
pub fn run_job(job: &Job, options: &RunJobOptions) -> (SessionRecord, Result<(), String>) {
    let started = now();
    let mut record = SessionRecord {
        id: Repository::new_session_id(started),
        job: job.name.0.clone(),
        started,
        ended: started,
        result: Verdict::Success,
        vms: Vec::new(),
        error: None,
        notified: None,
        health_check: None,
        gc: None,
    };
    // Opened once, on first use: by a VM's retention, else to record the session.
    let repo = OnceLock::new();
    if let Some(check) = job.health_check() {
        let (result, found) = health_check(job, check.read_data, &repo);
        record.result = result;
        record.health_check = Some(found);
    } else if let Some(gc) = job.gc() {
        let (result, done) = collect(job, gc, &repo);
        record.result = result;
        record.gc = Some(done);
    } else {
        let selected = options
            .selected
            .clone()
            .unwrap_or_else(|| plan(job, options.only.as_deref()));
        match selected {
            Ok(selected) => {
                record.vms = run_all(job, &selected, options, &repo);
                record.result = worst(record.vms.iter().map(|v| v.result));
            }
            Err(e) => {
                record.error = Some(e);
                record.result = Verdict::Failure;
            }
        }
    }
    record.ended = now();
    if let Some(config) = &job.notify {
        let session = mail(&record);
        if backflow_notify::should_send(config, session.outcome()) {
            record.notified = Some(backflow_notify::notify(config, &session));
        }
    }
    let stored = open(job, &repo)
        .and_then(|repo| {
            repo.record_session(
                &record.id,
                &serde_json::to_value(&record).expect("a session record serialises"),
            )
            .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("recording session {}: {e}", record.id));
    (record, stored)
}

/// Runs the job's health check: verify, marking what it finds.
fn health_check(
    job: &Job,
    read_data: bool,
    repo: &OnceLock<Result<Repository, String>>,
) -> (Verdict, HealthCheckRecord) {
    let started = Instant::now();
    tracing::info!(job = %job.name.0, read_data, "Checking the repository.");
    let mut found = HealthCheckRecord {
        read_data,
        seconds: 0.0,
        snapshots: 0,
        chunks_read: 0,
        bytes_read: 0,
        damaged_chunks: 0,
        healed_chunks: 0,
        new_marks: 0,
        damaged_files: Vec::new(),
        affected_snapshots: Vec::new(),
        error: None,
        report: None,
    };
    let report = open(job, repo).and_then(|r| {
        r.verify_and_mark(read_data)
            .map_err(|e| format!("verify: {e}"))
    });
    found.seconds = started.elapsed().as_secs_f64();
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            found.error = Some(e);
            return (Verdict::Failure, found);
        }
    };
    found.snapshots = report.snapshots;
    found.chunks_read = report.chunks_read;
    found.bytes_read = report.bytes_read;
    found.healed_chunks = report.problems.iter().filter(|p| p.healed).count() as u64;
    found.damaged_chunks = report.problems.len() as u64 - found.healed_chunks;
    found.new_marks = report.new_marks;
    found.damaged_files = report
        .damaged_snapshots
        .iter()
        .chain(&report.damaged_index_files)
        .chain(&report.damaged_packs)
        .map(|f| format!("{}: {}", f.path, f.error))
        .collect();
    let mut affected: Vec<String> = report
        .problems
        .iter()
        .flat_map(|p| p.snapshots.iter().cloned())
        .collect();
    affected.sort();
    affected.dedup();
    found.affected_snapshots = affected;
    found.report = serde_json::to_value(&report).ok();
    let result = if !report.is_ok() {
        Verdict::Failure
    } else if found.healed_chunks > 0 {
        Verdict::Warning
    } else {
        Verdict::Success
    };
    (result, found)
}

/// Runs the job's garbage collection. A gc that must wait for backups that were running is a
/// success: the next one finishes it.
fn collect(
    job: &Job,
    gc: &crate::GcJob,
    repo: &OnceLock<Result<Repository, String>>,
) -> (Verdict, GcRecord) {
    let started = Instant::now();
    tracing::info!(job = %job.name.0, "Collecting garbage.");
    let done = open(job, repo).and_then(|r| {
        r.gc(&backflow_repository::GcOptions {
            repack_threshold: gc.repack_threshold.0,
            ..Default::default()
        })
        .map_err(|e| format!("gc: {e}"))
    });
    let seconds = started.elapsed().as_secs_f64();
    match done {
        Ok(report) => (
            Verdict::Success,
            GcRecord {
                seconds,
                report: Some(report),
                error: None,
            },
        ),
        Err(e) => (
            Verdict::Failure,
            GcRecord {
                seconds,
                report: None,
                error: Some(e),
            },
        ),
    }
}

/// The job's repository, opened at the first call of a session and shared by its VMs.
fn open<'a>(
    job: &Job,
    repo: &'a OnceLock<Result<Repository, String>>,
) -> Result<&'a Repository, String> {
    repo.get_or_init(|| Repository::open(&job.repository).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// The worst of the VMs' results: failure over cancelled over warning over success.
fn worst(results: impl Iterator<Item = Verdict>) -> Verdict {
    results.max().unwrap_or(Verdict::Success)
}

/// The VMs to back up now (only `only`, when given): the job's selection from its connection's
/// listing.
pub fn plan(job: &Job, only: Option<&str>) -> Result<Vec<Selected>, String> {
    let conn = Connection::open_read_only(Some(&job.uri)).map_err(|e| e.to_string())?;
    let vms = conn.list_vms().map_err(|e| e.to_string())?;
    let mut selected = select(job, &vms)?;
    if let Some(only) = only {
        selected.retain(|s| s.vm == only);
        if selected.is_empty() {
            return Err(format!("job {}: it does not back up VM {only}", job.name.0));
        }
    }
    Ok(selected)
}

/// Runs the selected VMs, `parallel` at a time; records come back in selection order.
fn run_all(
    job: &Job,
    selected: &[Selected],
    options: &RunJobOptions,
    repo: &OnceLock<Result<Repository, String>>,
) -> Vec<VmRecord> {
    let queue = Mutex::new(selected.iter().enumerate().collect::<VecDeque<_>>());
    let done = Mutex::new(Vec::new());
    let workers = (job.parallel.0 as usize).min(selected.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let Some((i, vm)) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    let record = if options.cancel.is_cancelled() {
                        skipped(vm)
                    } else {
                        run_vm(job, vm, &options.cancel, repo)
                    };
                    done.lock().unwrap().push((i, record));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap();
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

fn skipped(vm: &Selected) -> VmRecord {
    VmRecord {
        vm: vm.vm.clone(),
        result: Verdict::Cancelled,
        snapshot: None,
        disks: vm.disks.clone(),
        excluded_disks: vm.excluded_disks.clone(),
        bytes_read: 0,
        bytes_written: 0,
        seconds: 0.0,
        warnings: Vec::new(),
        error: Some("not started: the session was stopped".into()),
        bottleneck: None,
        forgotten: Vec::new(),
        report: None,
    }
}

/// The spec variables and overrides for one VM.
fn inputs(job: &Job, vm: &Selected) -> (Vec<(String, String)>, Vec<Override>) {
    let mut vars: Vec<(String, String)> = job
        .variables
        .iter()
        .map(|(k, v)| (k.clone(), yaml_scalar(v)))
        .collect();
    vars.push(("domain".into(), vm.vm.clone()));
    vars.push(("repo".into(), job.repository.display().to_string()));
    vars.push(("uri".into(), job.uri.clone()));
    let mut overrides: Vec<Override> = job
        .overrides
        .iter()
        .flat_map(|(stage, options)| {
            options.iter().map(move |(option, value)| Override {
                stage: stage.clone(),
                option: option.clone(),
                // JSON is YAML (flow style).
                value: value.to_string(),
            })
        })
        .collect();
    if !vm.excluded_disks.is_empty() {
        overrides.push(Override {
            stage: "libvirt".into(),
            option: "disks".into(),
            value: serde_json::to_string(&vm.disks).expect("a list of names serialises"),
        });
    }
    (vars, overrides)
}

/// A variable's value as `--var` would give it.
fn yaml_scalar(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "~".into(),
        other => other.to_string(),
    }
}

fn run_vm(
    job: &Job,
    vm: &Selected,
    cancel: &CancelToken,
    repo: &OnceLock<Result<Repository, String>>,
) -> VmRecord {
    let started = Instant::now();
    let (vars, overrides) = inputs(job, vm);
    let loaded = match &job.spec {
        Some(path) => spec::load_file_with(path, &vars, &overrides, &Stages),
        None => spec::load_str_with(
            "specs/backup-vm.yaml (built in)",
            BACKUP_VM_SPEC,
            &vars,
            &overrides,
            &Stages,
        ),
    };
    let mut record = skipped(vm);
    record.error = None;
    let pipeline = match loaded {
        Ok(p) => p,
        Err(e) => {
            record.result = Verdict::Failure;
            record.error = Some(format!("job {}: the spec: {e}", job.name.0));
            return record;
        }
    };
    tracing::info!(job = %job.name.0, vm = %vm.vm, "Backing up.");
    // A run cancels its own token when one of its stages fails: each VM gets a child of the
    // session's token, so that one VM failing never cancels the others.
    let report = pipeline.run(RunOptions {
        cancel: cancel.child(),
        on_progress: None,
    });
    record.seconds = started.elapsed().as_secs_f64();
    fill(&mut record, &report);
    if let (Some(policy), Verdict::Success | Verdict::Warning) = (&job.retention, record.result) {
        match open(job, repo).and_then(|repo| retain(repo, &vm.vm, policy)) {
            Ok(forgotten) => record.forgotten = forgotten,
            Err(e) => {
                // The backup itself is committed: retention failing makes it a warning.
                record.warnings.push(format!("retention: {e}"));
                record.result = Verdict::Warning;
            }
        }
    }
    record
}

/// Applies the retention policy to `vm`'s snapshots; returns the ids it forgot.
fn retain(
    repo: &Repository,
    vm: &str,
    policy: &backflow_repository::KeepPolicy,
) -> Result<Vec<String>, String> {
    let snapshots: Vec<_> = repo
        .list_snapshots()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|s| s.vm == vm)
        .collect();
    let mut forgotten = Vec::new();
    for decision in backflow_repository::plan(&snapshots, policy) {
        if !decision.keep {
            repo.forget(&decision.id).map_err(|e| e.to_string())?;
            tracing::info!(vm, snapshot = %decision.id, "Forgotten by the job's retention.");
            forgotten.push(decision.id);
        }
    }
    Ok(forgotten)
}

/// A result as the mail reports it: a cancelled run is a failure there.
fn outcome(result: Verdict) -> backflow_notify::Outcome {
    use backflow_notify::Outcome;
    match result {
        Verdict::Success => Outcome::Success,
        Verdict::Warning => Outcome::Warning,
        Verdict::Failure | Verdict::Cancelled => Outcome::Failure,
    }
}

/// A record's seconds as the mail's duration.
fn duration(seconds: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(seconds.max(0.0))
}

/// The session as the mail reports it.
fn mail(record: &SessionRecord) -> backflow_notify::Session {
    use backflow_notify::{Outcome, VmReport};
    let mut vms: Vec<VmReport> = record
        .vms
        .iter()
        .map(|v| VmReport {
            snapshot: v.snapshot.clone(),
            bytes_read: v.bytes_read,
            bytes_written: v.bytes_written,
            duration: duration(v.seconds),
            warnings: v.warnings.clone(),
            error: v.error.clone(),
            bottleneck: v.bottleneck.clone(),
            ..VmReport::new(v.vm.clone(), outcome(v.result))
        })
        .collect();
    if let Some(check) = &record.health_check {
        vms.push(check_row(check, record.result));
    }
    if let Some(gc) = &record.gc {
        vms.push(gc_row(gc, record.result));
    }
    if let Some(e) = &record.error {
        // Nothing ran: the session failed as a whole.
        let mut failed = VmReport::new("(job)", Outcome::Failure);
        failed.error = Some(e.clone());
        vms.push(failed);
    }
    backflow_notify::Session {
        job: record.job.clone(),
        started: record.started.max(0) as u64,
        ended: record.ended.max(0) as u64,
        vms,
    }
}

/// A gc as the mail's one row: what it freed, or what it waits for.
fn gc_row(gc: &GcRecord, result: Verdict) -> backflow_notify::VmReport {
    let mut row = backflow_notify::VmReport::new("(garbage collection)", outcome(result));
    row.duration = duration(gc.seconds);
    row.error = gc.error.clone();
    if let Some(r) = &gc.report {
        row.bytes_written = r.bytes_written;
        if let Some(why) = &r.waiting_for {
            row.warnings.push(format!("nothing deleted yet: {why}"));
        }
        for pack in &r.packs_quarantined {
            row.warnings.push(format!(
                "pack {pack} is damaged: what snapshots use was salvaged, the pack moved to the quarantine"
            ));
        }
        if r.chunks_unsalvageable > 0 {
            row.warnings.push(format!(
                "{} chunks that snapshots use have no copy that decodes to its digest; `backflow verify` \
                 names the snapshots",
                r.chunks_unsalvageable
            ));
        }
    }
    row
}

/// A health check as the mail's one row: what it read, the damage and what happens next.
fn check_row(check: &HealthCheckRecord, result: Verdict) -> backflow_notify::VmReport {
    let mut row = backflow_notify::VmReport::new("(health check)", outcome(result));
    row.bytes_read = check.bytes_read;
    row.duration = duration(check.seconds);
    if check.healed_chunks > 0 {
        row.warnings.push(format!(
            "{} damaged chunk copies are superseded by healthy copies stored later (a garbage \
             collection removes them)",
            check.healed_chunks
        ));
    }
    let mut problems = Vec::new();
    if let Some(e) = &check.error {
        problems.push(e.clone());
    }
    if check.damaged_chunks > 0 {
        problems.push(format!(
            "{} damaged chunks ({} newly marked); the next backup of a VM that still has the data \
             stores it again; snapshots affected: {}",
            check.damaged_chunks,
            check.new_marks,
            if check.affected_snapshots.is_empty() {
                "none".to_owned()
            } else {
                check.affected_snapshots.join(", ")
            }
        ));
    }
    problems.extend(
        check
            .damaged_files
            .iter()
            .map(|f| format!("damaged file {f}")),
    );
    row.error = (!problems.is_empty()).then(|| problems.join("; "));
    row
}

fn fill(record: &mut VmRecord, report: &RunReport) {
    record.result = match report.outcome {
        OutcomeKind::Succeeded if report.warnings.is_empty() => Verdict::Success,
        OutcomeKind::Succeeded => Verdict::Warning,
        OutcomeKind::Failed => Verdict::Failure,
        OutcomeKind::Cancelled => Verdict::Cancelled,
    };
    record.snapshot = report.snapshot.clone();
    record.bytes_read = report.source_bytes_read;
    record.bytes_written = report.repo_bytes_written;
    record.warnings = report.warnings.clone();
    record.error = (!report.errors.is_empty()).then(|| report.errors.join("; "));
    record.bottleneck = report.bottleneck.clone();
    record.report = serde_json::to_value(report).ok();
}

/// The sessions recorded in the repository at `path`, oldest first, as records were written.
pub fn sessions(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    Repository::open(path)
        .and_then(|r| r.list_sessions())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_result_wins() {
        use Verdict::*;
        assert_eq!(worst([].into_iter()), Success);
        assert_eq!(worst([Success, Warning].into_iter()), Warning);
        assert_eq!(worst([Warning, Cancelled, Success].into_iter()), Cancelled);
        assert_eq!(worst([Failure, Cancelled, Warning].into_iter()), Failure);
    }

    #[test]
    fn variables_and_overrides_for_a_vm() {
        let job = crate::parse(
            "name: j\nrepository: /r\nvms: [a]\nvariables: {checkpoint: nightly, freeze: off}\n\
             overrides: {zstd: {level: 3}}\n",
            "/j.yaml",
        )
        .unwrap();
        let vm = Selected {
            vm: "a".into(),
            disks: vec!["vda".into()],
            excluded_disks: vec!["vdb".into()],
        };
        let (vars, overrides) = inputs(&job, &vm);
        assert!(vars.contains(&("checkpoint".into(), "nightly".into())));
        assert!(vars.contains(&("domain".into(), "a".into())));
        assert!(vars.contains(&("repo".into(), "/r".into())));
        assert_eq!(
            overrides,
            [
                Override {
                    stage: "zstd".into(),
                    option: "level".into(),
                    value: "3".into()
                },
                Override {
                    stage: "libvirt".into(),
                    option: "disks".into(),
                    value: "[\"vda\"]".into()
                }
            ]
        );
    }
}
