//! Running a job once: every selected VM and every image through the job's pipeline spec,
//! `parallel` at a time, then the session's record.
//!
//! Each VM and each image is its own pipeline run (its own snapshot, cleanup and report), and has
//! its own record in the session: one failing does not stop the others, and the session's outcome
//! is the worst of theirs. Without a `spec` in the job file, a VM runs the built-in
//! `specs/backup-vm.yaml`, a raw image or block device `specs/backup-image.yaml`, a qcow2 image
//! `specs/backup-qcow2.yaml` (an image's format is its `format`, else told by its first bytes).
//! Each gets the job's `variables` and `freeze`, then its own: `domain`, `repo` and `uri` for a VM;
//! `source`, `repo` and, when the job names the image, `name` for an image. Retention is applied
//! after each successful backup to the snapshots of the name the backup was stored under.
//!
//! A health-check job runs `verify` instead ([`Repository::verify_and_mark`]): the damaged chunks
//! it finds are marked, so that the next backup of a VM that still has the data stores it again.
//! Its session is a failure when a restore point needs a damaged chunk, a warning when damage was
//! found that a later copy already heals, a success otherwise; the record holds the counts and the
//! affected snapshots.

use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use backflow_libvirt::Connection;
use backflow_pipeline::spec::{self, Override};
use backflow_pipeline::{
    CancelToken, LiveHandle, LivePipelines, OutcomeKind, RunOptions, RunReport,
};
use backflow_repository::{Location, Repository};
use backflow_stages::Stages;
use serde::{Deserialize, Serialize};

use crate::error::JobError;
use crate::file::{ImageFormat, ImageSource, Job};
use crate::select::{Selected, select};

/// The built-in spec a job runs for a VM when its file names none: (name, text).
pub const BACKUP_VM_SPEC: (&str, &str) = (
    "specs/backup-vm.yaml",
    include_str!("../../specs/backup-vm.yaml"),
);
/// The built-in spec for a raw image or a block device.
pub const BACKUP_IMAGE_SPEC: (&str, &str) = (
    "specs/backup-image.yaml",
    include_str!("../../specs/backup-image.yaml"),
);
/// The built-in spec for a qcow2 image.
pub const BACKUP_QCOW2_SPEC: (&str, &str) = (
    "specs/backup-qcow2.yaml",
    include_str!("../../specs/backup-qcow2.yaml"),
);

/// The first bytes of every qcow2 image ("QFI\xfb").
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// One thing a backup job backs up: a VM (with the disks it selects) or an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Vm(Selected),
    Image(ImageSource),
}

impl Source {
    /// What keeps two runs off one source at once: the VM's name, or the image's path.
    pub fn key(&self) -> String {
        match self {
            Source::Vm(vm) => vm.vm.clone(),
            Source::Image(image) => image.path.display().to_string(),
        }
    }

    /// Its record's name before it ran: the VM's, or the image's name or path.
    pub fn label(&self) -> String {
        match self {
            Source::Vm(vm) => vm.vm.clone(),
            Source::Image(image) => image
                .name
                .clone()
                .unwrap_or_else(|| image.path.display().to_string()),
        }
    }

    /// The spec it runs when the job names none: (name, text).
    pub fn built_in_spec(&self) -> (&'static str, &'static str) {
        match self {
            Source::Vm(_) => BACKUP_VM_SPEC,
            Source::Image(image) => match image.format.unwrap_or_else(|| detect(&image.path)) {
                ImageFormat::Raw => BACKUP_IMAGE_SPEC,
                ImageFormat::Qcow2 => BACKUP_QCOW2_SPEC,
            },
        }
    }
}

/// qcow2 when the image starts with qcow2's magic, raw otherwise (a file that cannot be read is
/// raw here: the image stage then says why it cannot be read).
pub fn detect(path: &Path) -> ImageFormat {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if magic == QCOW2_MAGIC => ImageFormat::Qcow2,
        _ => ImageFormat::Raw,
    }
}

/// How one VM's backup in a session ended. Ordered from best to worst: a session's result is
/// the greatest of its VMs'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Succeeded (notes, such as a crash-consistent backup without a guest agent, allowed).
    Success,
    /// Succeeded, with warnings (a full read where an incremental was expected, retention failed).
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

/// One VM, or one image, of a session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name; for an image, the name its snapshot was stored under (before it ran, or
    /// when it failed: the job's name for it, else its path).
    pub vm: String,
    /// An image's path (`None` for a VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub result: Verdict,
    pub snapshot: Option<String>,
    #[serde(default)]
    pub disks: Vec<String>,
    #[serde(default)]
    pub excluded_disks: Vec<String>,
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default)]
    pub bytes_written: u64,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// What deserves knowing without being wrong (a crash-consistent backup): not warnings.
    #[serde(default)]
    pub notes: Vec<String>,
    pub error: Option<String>,
    pub bottleneck: Option<String>,
    /// Snapshots of this VM (image) that the job's retention forgot after this backup.
    #[serde(default)]
    pub forgotten: Vec<String>,
    /// The run's whole report (as `backflow run --report` writes it).
    pub report: Option<serde_json::Value>,
    /// In a cluster job: the VM's host, the worker's, how the disks were read and why there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::placement::Placement>,
    /// In a cluster job: what became of earlier attempts (a worker that died, a host that dropped
    /// off the network) before this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<String>,
}

/// One run of a job. Records written by earlier releases read too: what they lack is empty.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub job: String,
    /// Unix seconds.
    pub started: i64,
    pub ended: i64,
    pub result: Verdict,
    /// The VMs' and images' records.
    #[serde(default)]
    pub vms: Vec<VmRecord>,
    /// A failure before any VM ran (job file, libvirt connection, selection).
    pub error: Option<String>,
    /// Whether the mail server accepted the session's report (`None`: none was due).
    pub notified: Option<bool>,
    /// What a health-check job found (`None` for backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckRecord>,
    /// What a gc job did (`None` for other jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcRecord>,
    /// What a copy job did (`None` for other jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<crate::CopyRecord>,
    /// What a verify-boot job found (`None` for other jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_boot: Option<crate::VerifyBootRecord>,
    /// Who asked for the run: `schedule` (the daemon's clock), or the console's user
    /// (`token:NAME`, `local` on a loopback console without tokens); `None` for runs from the
    /// command line and records of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// An action on a restore point asked for through the console or its API (`None` for job
    /// runs): what, on which restore point, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionRecord>,
}

/// An action asked for through the daemon's console or API (on a restore point, or enabling or
/// disabling a job): recorded as a session of its own (job `console`), with who asked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionRecord {
    /// `verify`, `forget`, `restore` or `instant-restore` (on a restore point), `enable` or
    /// `disable` (a job).
    pub kind: String,
    /// The job enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The restore point's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Its VM (or image identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Where a restore wrote, or the name of an instant recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub seconds: f64,
    /// The last lines the action printed (its summary, or why it failed).
    #[serde(default)]
    pub output: String,
    pub error: Option<String>,
}

/// What a gc job did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcRecord {
    pub seconds: f64,
    /// `backflow gc --json`'s report; `None` when the gc could not run.
    pub report: Option<backflow_repository::GcReport>,
    /// Why the gc could not run.
    pub error: Option<String>,
}

/// What a health check found.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
#[derive(Debug, Default)]
pub struct RunJobOptions {
    /// Cancels the sources running and skips those not started (they are recorded `cancelled`).
    pub cancel: CancelToken,
    /// Only this VM or image (by its name in the job, or its path; it must be one the job backs
    /// up).
    pub only: Option<String>,
    /// What to back up, when the caller already planned it with [`plan`] (the daemon does, to
    /// keep two jobs off one VM); `None`: the run lists and selects itself.
    pub selected: Option<Result<Vec<Source>, JobError>>,
    /// Where the pipelines publish their live statistics (the daemon's console); `None`: nowhere.
    pub live: Option<Arc<LivePipelines>>,
    /// Who asked for the run, recorded in the session ([`SessionRecord::requested_by`]).
    pub requested_by: Option<String>,
}

/// The time now, in unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The job's repository, opened at most once per session and shared by its runs.
pub(crate) type SharedRepo = OnceLock<Result<Repository, JobError>>;

/// Runs `job` once and records the session in its repository (when the repository opens). The
/// record is returned whatever happened; only a repository that cannot be opened, or a record
/// that cannot be written, is an `Err` besides it.
pub fn run_job(job: &Job, options: &RunJobOptions) -> (SessionRecord, Result<(), JobError>) {
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
        copy: None,
        verify_boot: None,
        requested_by: options.requested_by.clone(),
        action: None,
    };
    // Opened once, on first use: by a source's retention, else to record the session.
    let repo = OnceLock::new();
    match job.kind() {
        crate::JobKind::HealthCheck(check) => {
            let (result, found) = health_check(job, check.read_data, &repo);
            record.result = result;
            record.health_check = Some(found);
        }
        crate::JobKind::Gc(gc) => {
            let (result, done) = collect(job, gc, &repo);
            record.result = result;
            record.gc = Some(done);
        }
        crate::JobKind::Copy(copy) => {
            let done = match open(job, &repo) {
                Ok(target) => crate::copy::run_copy(job, copy, target, &options.cancel),
                Err(e) => crate::CopyRecord {
                    from: copy.from.clone(),
                    seconds: 0.0,
                    report: None,
                    forgotten: Vec::new(),
                    warnings: Vec::new(),
                    error: Some(e.to_string()),
                },
            };
            record.result = match (&done.error, done.warnings.is_empty()) {
                (Some(_), _) if options.cancel.is_cancelled() => Verdict::Cancelled,
                (Some(_), _) => Verdict::Failure,
                (None, false) => Verdict::Warning,
                (None, true) => Verdict::Success,
            };
            record.copy = Some(done);
        }
        crate::JobKind::VerifyBoot(check) => {
            let (result, found) = match open(job, &repo) {
                Ok(source) => {
                    crate::verify_boot::run_verify_boot(job, check, source, &options.cancel)
                }
                Err(e) => (
                    Verdict::Failure,
                    crate::VerifyBootRecord {
                        seconds: 0.0,
                        vms: Vec::new(),
                        error: Some(e.to_string()),
                    },
                ),
            };
            record.result = result;
            record.verify_boot = Some(found);
        }
        crate::JobKind::Backup { .. } if job.cluster.is_some() => {
            let cluster = job.cluster.as_deref().expect("checked");
            match crate::cluster_run::run_cluster(
                job,
                cluster,
                options.only.as_deref(),
                &options.cancel,
                &repo,
            ) {
                Ok(vms) => {
                    record.vms = vms;
                    record.result = worst(record.vms.iter().map(|v| v.result));
                }
                Err(e) => {
                    record.error = Some(e.to_string());
                    record.result = Verdict::Failure;
                }
            }
        }
        crate::JobKind::Backup { .. } => {
            let planned;
            let selected = match &options.selected {
                Some(selected) => selected.as_ref(),
                None => {
                    planned = plan(job, options.only.as_deref());
                    planned.as_ref()
                }
            };
            match selected {
                Ok(selected) => {
                    record.vms = run_all(job, selected, options, &repo);
                    record.result = worst(record.vms.iter().map(|v| v.result));
                }
                Err(e) => {
                    record.error = Some(e.to_string());
                    record.result = Verdict::Failure;
                }
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
    let stored = match open(job, &repo) {
        Ok(repo) => Some(repo.record_session(
            &record.id,
            &serde_json::to_value(&record).expect("a session record serialises"),
        )),
        Err(_) => None,
    };
    let stored = match stored {
        Some(written) => written.map_err(|source| JobError::Repository {
            what: format!("recording session {}", record.id),
            source,
        }),
        // Not recorded: the repository did not open, and that error says why.
        None => match repo.into_inner() {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        },
    };
    (record, stored)
}

/// Runs the job's health check: verify, marking what it finds.
fn health_check(job: &Job, read_data: bool, repo: &SharedRepo) -> (Verdict, HealthCheckRecord) {
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
    let report = open(job, repo).map_err(|e| e.to_string()).and_then(|r| {
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
fn collect(job: &Job, gc: &crate::GcJob, repo: &SharedRepo) -> (Verdict, GcRecord) {
    let started = Instant::now();
    tracing::info!(job = %job.name.0, "Collecting garbage.");
    let done = open(job, repo).map_err(|e| e.to_string()).and_then(|r| {
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

/// The job's repository, opened at the first call of a session and shared by its runs.
pub(crate) fn open<'a>(job: &Job, repo: &'a SharedRepo) -> Result<&'a Repository, &'a JobError> {
    repo.get_or_init(|| {
        Repository::open_at(&job.repository).map_err(|source| JobError::Repository {
            what: format!("job {}", job.name.0),
            source,
        })
    })
    .as_ref()
}

/// The worst of the VMs' results: failure over cancelled over warning over success.
fn worst(results: impl Iterator<Item = Verdict>) -> Verdict {
    results.max().unwrap_or(Verdict::Success)
}

/// What to back up now (only `only`, when given): the job's selection from its connection's
/// listing (libvirt is asked only when the job has `vms`), then its images.
pub fn plan(job: &Job, only: Option<&str>) -> Result<Vec<Source>, JobError> {
    let mut sources = Vec::new();
    if let Some(cluster) = job.cluster.as_deref().filter(|_| !job.vms.is_empty()) {
        // Which VMs (by name) the run will take: what keeps two jobs off one VM. Where each runs
        // is the run's own business (crate::cluster_run).
        let cluster = backflow_cluster::load(cluster).map_err(|e| JobError::Cluster {
            job: job.name.0.clone(),
            detail: e.to_string(),
        })?;
        let listing = crate::cluster_run::listing(&backflow_cluster::discover(&cluster));
        sources.extend(select(job, &listing)?.into_iter().map(Source::Vm));
    } else if !job.vms.is_empty() {
        let libvirt = |source| JobError::Libvirt {
            job: job.name.0.clone(),
            source: Box::new(source),
        };
        let conn = Connection::open_read_only(Some(&job.uri)).map_err(libvirt)?;
        let vms = conn.list_vms().map_err(libvirt)?;
        sources.extend(select(job, &vms)?.into_iter().map(Source::Vm));
    }
    sources.extend(job.images.iter().cloned().map(Source::Image));
    if let Some(only) = only {
        sources.retain(|s| s.label() == only || s.key() == only);
        if sources.is_empty() {
            return Err(JobError::NotInJob {
                job: job.name.0.clone(),
                name: only.to_owned(),
            });
        }
    }
    Ok(sources)
}

/// Runs the selected sources, `parallel` at a time; records come back in selection order.
fn run_all(
    job: &Job,
    selected: &[Source],
    options: &RunJobOptions,
    repo: &SharedRepo,
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
                        run_source(job, vm, options, repo)
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

/// A record for `label` before its run: nothing done yet, no error.
pub(crate) fn record_for(label: &str) -> VmRecord {
    VmRecord {
        vm: label.to_owned(),
        source: None,
        result: Verdict::Cancelled,
        snapshot: None,
        disks: Vec::new(),
        excluded_disks: Vec::new(),
        bytes_read: 0,
        bytes_written: 0,
        seconds: 0.0,
        warnings: Vec::new(),
        notes: Vec::new(),
        error: None,
        bottleneck: None,
        forgotten: Vec::new(),
        report: None,
        placement: None,
        attempts: Vec::new(),
    }
}

pub(crate) fn skipped(source: &Source) -> VmRecord {
    let mut record = record_for(&source.label());
    match source {
        Source::Vm(vm) => {
            record.disks = vm.disks.clone();
            record.excluded_disks = vm.excluded_disks.clone();
        }
        Source::Image(image) => record.source = Some(image.path.display().to_string()),
    }
    record.error = Some("not started: the session was stopped".into());
    record
}

/// The spec variables and overrides for one source: the job's, then the source's own.
pub fn inputs(job: &Job, source: &Source) -> (Vec<(String, String)>, Vec<Override>) {
    let mut vars = job.set_variables();
    let mut own = |k: &str, v: String| {
        vars.retain(|(key, _)| key != k);
        vars.push((k.to_owned(), v));
    };
    own("repo", job.repository.to_string());
    match source {
        Source::Vm(vm) => {
            own("domain", vm.vm.clone());
            own("uri", job.uri.clone());
        }
        Source::Image(image) => {
            own("source", image.path.display().to_string());
            if let Some(name) = &image.name {
                own("name", name.clone());
            }
        }
    }
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
    if let Source::Vm(vm) = source
        && !vm.excluded_disks.is_empty()
    {
        overrides.push(Override {
            stage: "libvirt".into(),
            option: "disks".into(),
            value: serde_json::to_string(&vm.disks).expect("a list of names serialises"),
        });
    }
    (vars, overrides)
}

/// Loads the pipeline `source` runs: the job's spec, or the built-in one for it.
pub fn load_spec(
    job: &Job,
    source: &Source,
) -> Result<backflow_pipeline::Pipeline, backflow_pipeline::spec::SpecErrors> {
    let (vars, overrides) = inputs(job, source);
    match &job.spec {
        Some(path) => spec::load_file_with(path, &vars, &overrides, &Stages),
        None => {
            let (name, text) = source.built_in_spec();
            spec::load_str_with(
                &format!("{name} (built in)"),
                text,
                &vars,
                &overrides,
                &Stages,
            )
        }
    }
}

fn run_source(job: &Job, source: &Source, options: &RunJobOptions, repo: &SharedRepo) -> VmRecord {
    let started = Instant::now();
    let loaded = load_spec(job, source);
    let mut record = skipped(source);
    record.error = None;
    let pipeline = match loaded {
        Ok(p) => p,
        Err(e) => {
            record.result = Verdict::Failure;
            record.error = Some(format!("job {}: the spec: {e}", job.name.0));
            return record;
        }
    };
    tracing::info!(job = %job.name.0, source = %source.label(), "Backing up.");
    // A run cancels its own token when one of its stages fails: each source gets a child of the
    // session's token, so that one failing never cancels the others.
    let live = options
        .live
        .as_ref()
        .map(|live| live.begin(&job.name.0, &source.label(), &pipeline.name));
    let report = pipeline.run(RunOptions {
        cancel: options.cancel.child(),
        on_progress: live.as_ref().map(LiveHandle::progress),
    });
    record.seconds = started.elapsed().as_secs_f64();
    fill(&mut record, &report);
    if let Some(live) = live {
        live.end(match record.result {
            Verdict::Success => "succeeded",
            Verdict::Warning => "warning",
            Verdict::Cancelled => "cancelled",
            Verdict::Failure => "failed",
        });
    }
    let Some(snapshot) = record.snapshot.clone() else {
        return record;
    };
    // The name it was stored under: what `snapshots` shows and retention goes by.
    let stored_as = open(job, repo)
        .ok()
        .and_then(|r| r.list_snapshots().ok())
        .and_then(|list| list.into_iter().find(|s| s.id == snapshot))
        .map(|s| s.vm);
    if let Some(name) = &stored_as {
        record.vm = name.clone();
    }
    apply_retention(job, repo, &mut record);
    record
}

/// Applies the retention policy to `vm`'s snapshots; returns the ids it forgot.
pub(crate) fn retain(
    repo: &Repository,
    vm: &str,
    policy: &backflow_repository::KeepPolicy,
) -> Result<Vec<String>, backflow_repository::RepoError> {
    let snapshots: Vec<_> = repo
        .list_snapshots()?
        .into_iter()
        .filter(|s| s.vm == vm)
        .collect();
    let mut forgotten = Vec::new();
    for decision in backflow_repository::plan(&snapshots, policy) {
        if !decision.keep {
            repo.forget(&decision.id)?;
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
            notes: v.notes.clone(),
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
    if let Some(copy) = &record.copy {
        vms.push(copy_row(copy, record.result));
    }
    if let Some(boot) = &record.verify_boot {
        vms.extend(boot_rows(boot));
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

/// A copy as the mail's one row: what it sent, and what retention forgot in the target.
fn copy_row(copy: &crate::CopyRecord, result: Verdict) -> backflow_notify::VmReport {
    let mut row =
        backflow_notify::VmReport::new(format!("(copy from {})", copy.from), outcome(result));
    row.duration = duration(copy.seconds);
    row.error = copy.error.clone();
    row.warnings = copy.warnings.clone();
    if let Some(r) = &copy.report {
        row.bytes_read = r.counts.bytes_read;
        row.bytes_written = r.counts.bytes_sent;
        row.notes.push(format!(
            "{} snapshots copied, {} already there; {} chunks sent, {} already there",
            r.snapshots_copied, r.snapshots_skipped, r.counts.chunks_sent, r.counts.chunks_present
        ));
    }
    if !copy.forgotten.is_empty() {
        row.notes.push(format!(
            "retention forgot {} in the target",
            copy.forgotten.join(", ")
        ));
    }
    row
}

/// A verify-boot job as the mail's rows: one per VM (its restore point, how long it took to come
/// to life, or why it did not), and one for a job that could not check anything.
fn boot_rows(boot: &crate::VerifyBootRecord) -> Vec<backflow_notify::VmReport> {
    let mut rows: Vec<backflow_notify::VmReport> = boot
        .vms
        .iter()
        .map(|v| {
            let mut row =
                backflow_notify::VmReport::new(format!("{} (boot check)", v.vm), outcome(v.result));
            row.snapshot = Some(v.snapshot.clone());
            row.duration = duration(v.seconds);
            row.error = v.error.clone();
            if let Some(sign) = &v.sign {
                row.notes.push(format!(
                    "alive ({sign}) {:.1} s after the start; running after {:.1} s",
                    v.seconds,
                    v.rto_seconds.unwrap_or_default()
                ));
            }
            row
        })
        .collect();
    if let Some(e) = &boot.error {
        let mut row =
            backflow_notify::VmReport::new("(boot check)", backflow_notify::Outcome::Failure);
        row.error = Some(e.clone());
        rows.push(row);
    }
    rows
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

pub(crate) fn fill(record: &mut VmRecord, report: &RunReport) {
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
    record.notes = report.notes.clone();
    record.error = (!report.errors.is_empty()).then(|| report.errors.join("; "));
    record.bottleneck = report.bottleneck.clone();
    record.report = serde_json::to_value(report).ok();
}

/// The sessions recorded in the repository at `location`, oldest first (see [`sessions_in`]).
pub fn sessions(location: &Location) -> Result<Vec<SessionRecord>, JobError> {
    let repository = Repository::open_at(location).map_err(|source| JobError::Repository {
        what: format!("reading the sessions of {location}"),
        source,
    })?;
    sessions_in(&repository)
}

/// The sessions recorded in an open repository, oldest first. A record that is not a session
/// record (written by something else) is skipped with a warning naming it.
pub fn sessions_in(repository: &Repository) -> Result<Vec<SessionRecord>, JobError> {
    let location = repository.location();
    let values = repository
        .list_sessions()
        .map_err(|source| JobError::Repository {
            what: format!("reading the sessions of {location}"),
            source,
        })?;
    Ok(values
        .into_iter()
        .filter_map(|value| {
            let id = value["id"].as_str().unwrap_or("?").to_owned();
            serde_json::from_value(value)
                .map_err(|e| {
                    tracing::warn!(repository = %location, session = %id, error = %e, "Skipping a session record that does not read.");
                })
                .ok()
        })
        .collect())
}

/// The job's retention for `record`'s VM, once its backup succeeded: what was forgotten goes into
/// the record; retention failing makes the record a warning (the backup itself is committed).
pub(crate) fn apply_retention(job: &Job, repo: &SharedRepo, record: &mut VmRecord) {
    let (Some(policy), Verdict::Success | Verdict::Warning) = (&job.retention, record.result)
    else {
        return;
    };
    let retained = match open(job, repo) {
        Ok(repo) => retain(repo, &record.vm, policy).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match retained {
        Ok(forgotten) => record.forgotten = forgotten,
        Err(e) => {
            record.warnings.push(format!("retention: {e}"));
            record.result = Verdict::Warning;
        }
    }
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
        let vm = Source::Vm(Selected {
            vm: "a".into(),
            disks: vec!["vda".into()],
            excluded_disks: vec!["vdb".into()],
        });
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

    #[test]
    fn variables_for_an_image_name_it_only_when_the_job_does() {
        let job = crate::parse(
            "name: j\nrepository: /r\nimages: [/i/a.raw, {path: /i/b.qcow2, name: web01}]\n\
             freeze: \"off\"\nvariables: {bitmap: nightly, repo: ignored}\n",
            "/j.yaml",
        )
        .unwrap();
        let sources: Vec<Source> = job.images.iter().cloned().map(Source::Image).collect();
        let (a, _) = inputs(&job, &sources[0]);
        let (b, _) = inputs(&job, &sources[1]);
        for vars in [&a, &b] {
            assert!(vars.contains(&("bitmap".into(), "nightly".into())));
            assert!(vars.contains(&("repo".into(), "/r".into())), "{vars:?}");
            assert!(!vars.iter().any(|(k, _)| k == "domain" || k == "uri"));
            assert_eq!(vars.iter().filter(|(k, _)| k == "repo").count(), 1);
        }
        assert!(a.contains(&("source".into(), "/i/a.raw".into())));
        assert!(!a.iter().any(|(k, _)| k == "name"));
        assert!(b.contains(&("name".into(), "web01".into())));
        assert_eq!(sources[1].label(), "web01");
        assert_eq!(sources[0].label(), "/i/a.raw");
    }

    #[test]
    fn qcow2_is_told_by_its_magic() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.img");
        let qcow2 = dir.path().join("b.img");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        let mut header = QCOW2_MAGIC.to_vec();
        header.resize(512, 0);
        std::fs::write(&qcow2, header).unwrap();
        assert_eq!(detect(&raw), ImageFormat::Raw);
        assert_eq!(detect(&qcow2), ImageFormat::Qcow2);
        assert_eq!(detect(&dir.path().join("missing")), ImageFormat::Raw);
    }
}
