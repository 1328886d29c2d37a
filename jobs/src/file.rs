//! The job file: YAML, read with `serde-saphyr`, so that every mistake is reported with the file,
//! line and column, the field and what was expected. Values that need more than a type (cron
//! expressions, VM patterns, disk exclusions, stage overrides) are checked while they are read,
//! so their errors carry a position too. A job file is a regular file of at most
//! [`MAX_JOB_FILE_SIZE`] bytes: a FIFO or a device is refused before it is opened.
//!
//! ```yaml
//! name: nightly                      # required: names the job's sessions
//! uri: qemu:///system                # the libvirt connection (default)
//! cluster: /etc/backflow/cluster.yaml # or: the VMs of a cluster's hosts, each backed up by a
//!                                    #   worker on its own host (then `uri` does not apply)
//! repository: /srv/backflow          # required: a path or s3://BUCKET/PREFIX
//! vms: [web01, "db-*"]               # names or globs (* and ?); "*" is every VM
//! exclude: ["*-test"]                # names or globs left out
//! exclude_disks: [vdb, "db01:vdc"]   # TARGET on every VM, or VM:TARGET
//! images:                            # image files, block devices, qcow2 images
//!   - /var/lib/images/web01.raw      # a path; its snapshots are named as the spec names them
//!   - {path: /dev/vg0/db, name: db01}              # `name`: the spec's `name` variable
//!   - {path: /srv/tpl.img, format: qcow2}          # raw or qcow2; default: by its first bytes
//! spec: /etc/backflow/my-backup.yaml # default: built in, backup-vm, backup-image or backup-qcow2
//! variables: {checkpoint: nightly}   # the spec's variables (domain, repo, uri are set per VM)
//! freeze: auto                       # VMs' guest filesystems: auto, off or required
//! overrides:                         # stage options over the spec's, by stage name (or kind)
//!   zstd: {level: 3}
//!   reader: {workers: 4}
//! parallel: 1                        # VMs and images backed up at once
//! schedule: "0 2 * * *"              # cron (minute hour day-of-month month day-of-week), UTC;
//!                                    #   or a list of them
//! retention: {keep_last: 7, keep_daily: 14, keep_weekly: 8, keep_monthly: 12}
//! notify:                            # mail the session's report
//!   server: smtp.example.com
//!   security: starttls               # none, starttls or tls
//!   username: backflow
//!   password_file: /etc/backflow/smtp-password
//!   from: backflow@example.com
//!   to: [ops@example.com]
//!   when: [warning, failure]         # and/or success
//! ```
//!
//! A health-check job verifies the repository instead of backing up (no `vms` or `images`; `uri`,
//! `exclude`, `exclude_disks`, `spec`, `variables`, `overrides`, `parallel` and `retention` do not
//! apply):
//! ```yaml
//! name: weekly-check
//! repository: /srv/backflow
//! health_check: {read_data: true}    # read_data: decode and hash every chunk (default true)
//! schedule: ["0 3 * * 0"]
//! notify: ...
//! ```
//! or one that collects garbage (`backflow gc`), on a schedule of its own:
//! ```yaml
//! name: weekly-gc
//! repository: /srv/backflow
//! gc: {repack_threshold: 20}          # rewrite packs at least 20% unused (default)
//! schedule: ["0 4 * * 6"]
//! ```
//! or one that copies restore points into its repository from another ([`crate::copy`]):
//! ```yaml
//! name: offsite
//! repository: /mnt/offsite/backflow  # the target
//! copy: {from: /srv/backflow, vms: ["web*"]}
//! retention: {keep_daily: 7}         # applied to the target
//! schedule: "30 3 * * *"
//! ```
//! or one that proves the latest restore points boot ([`crate::verify_boot`]):
//! ```yaml
//! name: boot-check
//! repository: /srv/backflow
//! verify_boot: {vms: ["web*"], console: "login:", timeout: 300}
//! schedule: "0 5 * * 6"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backflow_repository::Location;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::copy::CopyJob;
use crate::error::JobError;

/// Largest job file, in bytes: the limit of specs ([`backflow_pipeline::input::MAX_SPEC_SIZE`]).
pub const MAX_JOB_FILE_SIZE: u64 = backflow_pipeline::input::MAX_SPEC_SIZE;

/// A job as its file says.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub name: JobName,
    #[serde(default = "default_uri")]
    pub uri: String,
    /// A cluster file (relative to the job file): the VMs are found on every host of the cluster
    /// and each is backed up by a worker on its own host, or another ([`crate::cluster_run`]);
    /// `uri` does not apply.
    #[serde(default)]
    pub cluster: Option<PathBuf>,
    /// A path (relative to the job file) or `s3://BUCKET/PREFIX`.
    #[serde(deserialize_with = "location")]
    pub repository: Location,
    /// The passphrase file of an encrypted repository (else `--password-file` or
    /// `BACKFLOW_PASSWORD_FILE` of the process): jobs of one daemon may use repositories with
    /// different passphrases.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The VMs to back up.
    #[serde(default)]
    pub vms: Vec<Pattern>,
    /// The image files, block devices and qcow2 images to back up.
    #[serde(default)]
    pub images: Vec<ImageSource>,
    #[serde(default)]
    pub exclude: Vec<Pattern>,
    #[serde(default)]
    pub exclude_disks: Vec<DiskExclusion>,
    /// A spec file; `None`: the built-in spec for each source (see [`crate::run`]).
    #[serde(default)]
    pub spec: Option<PathBuf>,
    /// The spec's variables, with where the file sets them (for `job validate`).
    #[serde(default)]
    pub variables: BTreeMap<String, Spanned<serde_json::Value>>,
    /// The VMs' guest filesystem freeze: the spec's `freeze` variable, when set.
    #[serde(default)]
    pub freeze: Option<Spanned<Freeze>>,
    #[serde(default)]
    pub overrides: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    #[serde(default = "one")]
    pub parallel: Parallel,
    /// One cron expression or a list of them.
    #[serde(default, deserialize_with = "one_or_more")]
    pub schedule: Vec<Schedule>,
    /// What to keep of each VM's (each image's) snapshots, applied after each of its successful
    /// backups.
    #[serde(default)]
    pub retention: Option<backflow_repository::KeepPolicy>,
    /// Mail the session's report (see `backflow-notify`).
    #[serde(default)]
    pub notify: Option<backflow_notify::SmtpConfig>,
    /// Verify the repository instead of backing up (a job backs up, or does one of
    /// `health_check`, `gc`).
    #[serde(default)]
    pub health_check: Option<Spanned<HealthCheck>>,
    /// Collect garbage in the repository instead of backing up.
    #[serde(default)]
    pub gc: Option<Spanned<GcJob>>,
    /// Copy restore points from another repository into this one instead of backing up.
    #[serde(default)]
    pub copy: Option<Spanned<CopyJob>>,
    /// Start the latest restore points as isolated VMs and check that they come to life, instead
    /// of backing up.
    #[serde(default)]
    pub verify_boot: Option<Spanned<crate::VerifyBootJob>>,
}

/// What a job does: its file has exactly one of these.
#[derive(Clone, Copy, Debug)]
pub enum JobKind<'a> {
    /// Back up VMs and/or images (at least one of the two lists is not empty).
    Backup {
        vms: &'a [Pattern],
        images: &'a [ImageSource],
    },
    /// Verify the repository.
    HealthCheck(&'a HealthCheck),
    /// Collect the repository's garbage.
    Gc(&'a GcJob),
    /// Copy restore points from another repository into the job's.
    Copy(&'a CopyJob),
    /// Start the latest restore points as isolated VMs and watch them boot.
    VerifyBoot(&'a crate::VerifyBootJob),
}

/// How a backup freezes the guest's filesystems through the QEMU guest agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Freeze when an agent answers; without one the backup is crash-consistent (a note, not a
    /// warning).
    Auto,
    /// Never ask.
    Off,
    /// Fail the VM's backup when no agent freezes its filesystems.
    Required,
}

impl Freeze {
    /// The `freeze` variable's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Freeze::Auto => "auto",
            Freeze::Off => "off",
            Freeze::Required => "required",
        }
    }
}

/// An image to back up: a raw file, a block device or a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    /// Relative paths are relative to the job file.
    pub path: PathBuf,
    /// Its snapshots' name (the spec's `name` variable); `None`: the spec's default.
    pub name: Option<String>,
    /// `None`: told by its first bytes when it runs (qcow2's magic, else raw).
    pub format: Option<ImageFormat>,
}

/// The formats an image source can have: each has its built-in spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl<'de> Deserialize<'de> for ImageSource {
    /// A path alone, or `{path, name, format}`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            path: PathBuf,
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            format: Option<ImageFormat>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ImageSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an image's path, or {path: PATH, name: NAME, format: raw|qcow2}")
            }
            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<ImageSource, E> {
                if path.is_empty() {
                    return Err(E::custom("an empty image path"));
                }
                Ok(ImageSource {
                    path: path.into(),
                    name: None,
                    format: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ImageSource, A::Error> {
                use serde::de::Error;
                let f = Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if f.path.as_os_str().is_empty() {
                    return Err(A::Error::custom("an empty image path"));
                }
                if let Some(name) = &f.name {
                    backflow_repository::check_vm_name(name)
                        .map_err(|e| A::Error::custom(format!("name: {e}")))?;
                }
                Ok(ImageSource {
                    path: f.path,
                    name: f.name,
                    format: f.format,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `repository:` as [`Location::parse`] reads it, so that a malformed `s3://` is this file's error
/// at its line, never a relative path.
fn location<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Location, D::Error> {
    let text = String::deserialize(d)?;
    Location::parse(&text).map_err(|e| serde::de::Error::custom(format!("repository: {e}")))
}

/// `schedule: "0 2 * * *"` or `schedule: ["0 2 * * *", "0 4 * * 0"]`.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Schedule>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<Schedule>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a cron expression or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<Schedule>, E> {
            Schedule::try_from(text.to_owned())
                .map(|s| vec![s])
                .map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Schedule>, A::Error> {
            let mut all = Vec::new();
            while let Some(s) = seq.next_element()? {
                all.push(s);
            }
            Ok(all)
        }
    }
    d.deserialize_any(Visitor)
}

/// What a garbage-collection job does: `backflow gc` on the job's repository.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcJob {
    /// Rewrite a pack once this percentage of its bytes is unreferenced (0-100).
    #[serde(default = "default_repack_threshold")]
    pub repack_threshold: Percent,
}

fn default_repack_threshold() -> Percent {
    Percent(backflow_repository::DEFAULT_REPACK_THRESHOLD)
}

/// A whole percentage, 0 to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percent(pub u8);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        u8::try_from(n)
            .ok()
            .filter(|n| *n <= 100)
            .map(Percent)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("expected a percentage from 0 to 100, not {n}"))
            })
    }
}

/// What a health-check job checks: `verify`, which marks the damaged chunks it finds so that the
/// next backup of a VM that still has the data stores it again.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Read, decode and hash every chunk (`verify --read-data`); false checks structure only.
    #[serde(default = "yes")]
    pub read_data: bool,
}

fn yes() -> bool {
    true
}

impl Job {
    /// The health check this job runs instead of backups, if it is one.
    pub fn health_check(&self) -> Option<&HealthCheck> {
        self.health_check.as_ref().map(|h| &h.value)
    }

    /// The garbage collection this job runs instead of backups, if it is one.
    pub fn gc(&self) -> Option<&GcJob> {
        self.gc.as_ref().map(|g| &g.value)
    }

    /// The copy this job runs instead of backups, if it is one.
    pub fn copy(&self) -> Option<&CopyJob> {
        self.copy.as_ref().map(|c| &c.value)
    }

    /// The boot check this job runs instead of backups, if it is one.
    pub fn verify_boot(&self) -> Option<&crate::VerifyBootJob> {
        self.verify_boot.as_ref().map(|v| &v.value)
    }

    /// Whether the job backs up nothing (a health check, a gc, a copy or a boot check): it runs beside any backup.
    pub fn is_maintenance(&self) -> bool {
        !matches!(self.kind(), JobKind::Backup { .. })
    }

    /// What the job does ([`parse`] made sure it is one thing).
    pub fn kind(&self) -> JobKind<'_> {
        match (
            self.health_check(),
            self.gc(),
            self.copy(),
            self.verify_boot(),
        ) {
            (Some(check), _, _, _) => JobKind::HealthCheck(check),
            (None, Some(gc), _, _) => JobKind::Gc(gc),
            (None, None, Some(copy), _) => JobKind::Copy(copy),
            (None, None, None, Some(boot)) => JobKind::VerifyBoot(boot),
            (None, None, None, None) => JobKind::Backup {
                vms: &self.vms,
                images: &self.images,
            },
        }
    }

    /// The spec variables the job file sets for every source: `variables`, then `freeze`.
    pub fn set_variables(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = self
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), yaml_scalar(&v.value)))
            .collect();
        if let Some(freeze) = &self.freeze {
            vars.retain(|(k, _)| k != "freeze");
            vars.push(("freeze".into(), freeze.value.as_str().into()));
        }
        vars
    }
}

/// A variable's value as `--var` would give it.
fn yaml_scalar(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "~".into(),
        other => other.to_string(),
    }
}

fn default_uri() -> String {
    "qemu:///system".to_owned()
}

fn one() -> Parallel {
    Parallel(1)
}

/// Reads and checks a job file. The file must be a regular file of at most [`MAX_JOB_FILE_SIZE`]
/// bytes: a FIFO or a device is refused before it is opened (it could block or never end).
pub fn load(path: &Path) -> Result<Job, JobError> {
    use backflow_pipeline::input::{InputError, read_text_file};
    let text = read_text_file(path, MAX_JOB_FILE_SIZE).map_err(|e| match e {
        InputError::Io(source) => JobError::Read {
            file: path.to_owned(),
            source,
        },
        other => JobError::Input {
            file: path.to_owned(),
            detail: other.to_string(),
        },
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses a job from text; `file` is what errors call it.
pub fn parse(text: &str, file: &str) -> Result<Job, JobError> {
    let job: Job = serde_saphyr::from_str(text).map_err(|e| located(&e.to_string(), file))?;
    // Exactly one of: sources to back up, a health check, a gc. The second one found is the error.
    let mut kinds: Vec<(&str, Option<(u64, u64)>)> = Vec::new();
    if !job.vms.is_empty() || !job.images.is_empty() {
        kinds.push((if job.vms.is_empty() { "images" } else { "vms" }, None));
    }
    if let Some(check) = &job.health_check {
        let at = check.referenced;
        kinds.push(("health_check", Some((at.line(), at.column()))));
    }
    if let Some(gc) = &job.gc {
        let at = gc.referenced;
        kinds.push(("gc", Some((at.line(), at.column()))));
    }
    if let Some(copy) = &job.copy {
        let at = copy.referenced;
        kinds.push(("copy", Some((at.line(), at.column()))));
    }
    if let Some(boot) = &job.verify_boot {
        let at = boot.referenced;
        kinds.push(("verify_boot", Some((at.line(), at.column()))));
        boot.value
            .check()
            .map_err(|e| JobError::invalid(file, Some((at.line(), at.column())), e))?;
    }
    match kinds.as_slice() {
        [] => {
            return Err(JobError::invalid(
                file,
                None,
                "a job needs `vms` (the VMs to back up), `images` (image files to back up), \
                 `health_check` (to verify the repository), `gc` (to collect its garbage), `copy` \
                 (to copy restore points from another repository) or `verify_boot` (to check that \
                 the latest restore points boot)",
            ));
        }
        [_] => {}
        [(first, _), (second, at), ..] => {
            return Err(JobError::invalid(
                file,
                Some(at.unwrap_or((1, 1))),
                format!(
                    "{second}: a job does one thing: back up (`vms`, `images`), check the \
                     repository (`health_check`), collect its garbage (`gc`), copy restore \
                     points into it (`copy`) or check that they boot (`verify_boot`); this one \
                     already has `{first}`; write two jobs"
                ),
            ));
        }
    }
    let relative_to = Path::new(file).parent().unwrap_or(Path::new("."));
    let repository = match &job.repository {
        Location::Local(path) => Location::Local(relative_to.join(path)),
        s3 => s3.clone(),
    };
    let password_file = job.password_file.as_ref().map(|p| relative_to.join(p));
    if let Some(p) = &password_file {
        // Whoever opens this repository in this process (the job, its pipelines) reads this file.
        backflow_repository::keys::set_password_file_for(&repository.to_string(), p.clone());
    }
    let mut job = job;
    if let Some(copy) = &mut job.copy {
        let at = copy.referenced;
        let from = copy
            .value
            .location(relative_to)
            .map_err(|e| JobError::invalid(file, Some((at.line(), at.column())), e))?;
        copy.value.from = from.to_string();
        if let Some(p) = &mut copy.value.password_file {
            *p = relative_to.join(&*p);
            // The source is opened with its own passphrase, the target with the job's.
            backflow_repository::keys::set_password_file_for(&copy.value.from, p.clone());
        }
    }
    Ok(Job {
        // Paths in a job file are relative to the file, as people expect of configuration; an
        // `s3://` location is relative to nothing.
        repository,
        password_file,
        spec: job.spec.as_ref().map(|s| relative_to.join(s)),
        cluster: job.cluster.as_ref().map(|c| relative_to.join(c)),
        images: job
            .images
            .iter()
            .map(|i| ImageSource {
                path: relative_to.join(&i.path),
                ..i.clone()
            })
            .collect(),
        ..job
    })
}

/// serde-saphyr's message with the file named: `FILE:LINE:COLUMN: message` (then its snippet).
fn located(message: &str, file: &str) -> JobError {
    let (at, message) = backflow_pipeline::input::saphyr_position(message, file);
    JobError::invalid(file, at, message)
}

/// A job name: letters, digits, `-`, `_` and `.` (it names files and subjects).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JobName(pub String);

impl TryFrom<String> for JobName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "`{name}` is not a job name: use 1 to 64 letters, digits, -, _ and ."
            ));
        }
        Ok(JobName(name))
    }
}

/// A VM name or a glob (`*` any run of characters, `?` one character).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Pattern(pub String);

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(pattern: String) -> Result<Self, String> {
        if pattern.trim().is_empty() {
            return Err("an empty VM name or pattern".into());
        }
        Ok(Pattern(pattern))
    }
}

impl Pattern {
    pub fn is_glob(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

/// `*` and `?` matching, iteratively with one backtrack point (linear for these patterns).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A disk left out: `TARGET` on every VM, or `VM:TARGET` (the VM part may be a glob).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DiskExclusion {
    pub vm: Option<Pattern>,
    pub target: String,
}

impl TryFrom<String> for DiskExclusion {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let (vm, target) = match text.rsplit_once(':') {
            Some((vm, target)) => (Some(Pattern::try_from(vm.to_owned())?), target),
            None => (None, text.as_str()),
        };
        if target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "`{text}` is not a disk exclusion: expected TARGET (vdb) or VM:TARGET (db01:vdb)"
            ));
        }
        Ok(DiskExclusion {
            vm,
            target: target.to_owned(),
        })
    }
}

impl DiskExclusion {
    pub fn excludes(&self, vm: &str, target: &str) -> bool {
        self.target == target && self.vm.as_ref().is_none_or(|p| p.matches(vm))
    }
}

/// How many VMs run at once: 1 to 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u32")]
pub struct Parallel(pub u32);

impl TryFrom<u32> for Parallel {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, String> {
        if !(1..=64).contains(&n) {
            return Err(format!("parallel must be 1 to 64, found {n}"));
        }
        Ok(Parallel(n))
    }
}

/// A cron expression: five fields (minute hour day-of-month month day-of-week), UTC, or one of
/// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. Six fields (seconds, as some cron
/// dialects have) are refused: one dialect everywhere, the one the docs describe.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub struct Schedule {
    pub text: String,
    pub cron: croner::Cron,
}

/// The fields of a cron expression, in order.
pub const CRON_FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];

impl TryFrom<String> for Schedule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        use croner::parser::{CronParser, Seconds, Year};
        let fields = text.split_whitespace().count();
        if !text.trim_start().starts_with('@') && fields != CRON_FIELDS.len() {
            return Err(format!(
                "schedule `{text}` has {fields} field{}: a cron expression has five ({}), UTC{}",
                if fields == 1 { "" } else { "s" },
                CRON_FIELDS.join(" "),
                if fields == 6 {
                    "; there is no seconds field"
                } else {
                    ""
                }
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&text)
            .map_err(|e| {
                format!(
                    "schedule `{text}` is not a cron expression ({}): {e}",
                    CRON_FIELDS.join(" ")
                )
            })?;
        Ok(Schedule { text, cron })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_shells_do() {
        let p = |s: &str| Pattern(s.into());
        assert!(p("web*").matches("web01"));
        assert!(p("*").matches(""));
        assert!(p("db-?1").matches("db-a1"));
        assert!(!p("db-?1").matches("db-a12"));
        assert!(p("*-test").matches("web-01-test"));
        assert!(!p("*-test").matches("web-01-tests"));
        assert!(p("a*b*c").matches("aXbYbZc"));
        assert!(!p("a*b*c").matches("aXbYbZ"));
        assert!(p("web01").matches("web01") && !p("web01").matches("web011"));
    }

    #[test]
    fn a_password_file_is_relative_to_the_job_and_serves_its_repository() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pass"), "job secret\n").unwrap();
        let file = dir.path().join("nightly.yaml");
        let job = parse(
            "name: nightly\nrepository: repo\npassword_file: pass\nvms: [a]\n",
            &file.display().to_string(),
        )
        .unwrap();
        assert_eq!(job.password_file, Some(dir.path().join("pass")));
        let repo = dir.path().join("repo").display().to_string();
        assert_eq!(
            &backflow_repository::keys::passphrase_for(&repo).unwrap()[..],
            b"job secret"
        );
    }

    #[test]
    fn a_copy_job_reads_with_its_source_relative_to_the_file() {
        let job = parse(
            "name: offsite\nrepository: target\ncopy: {from: ../local, vms: [\"web*\"]}\n",
            "/etc/backflow/offsite.yaml",
        )
        .unwrap();
        let JobKind::Copy(copy) = job.kind() else {
            panic!("not a copy job: {:?}", job.kind());
        };
        assert_eq!(copy.from, "/etc/backflow/../local");
        assert_eq!(copy.vms, [Pattern("web*".into())]);
        assert!(job.is_maintenance());
        assert_eq!(job.repository, Path::new("/etc/backflow/target").into());
        let job = parse(
            "name: offsite\nrepository: target\ncopy: {from: \"s3://bucket/site-a\"}\n",
            "/etc/backflow/offsite.yaml",
        )
        .unwrap();
        assert_eq!(job.copy().unwrap().from, "s3://bucket/site-a");
    }

    #[test]
    fn an_s3_repository_is_not_joined_to_the_files_directory() {
        let job = parse(
            "name: j\nrepository: s3://backups/site-a\nvms: [x]\n",
            "/etc/backflow/jobs/j.yaml",
        )
        .unwrap();
        assert_eq!(job.repository.to_string(), "s3://backups/site-a");
        assert!(!job.repository.is_local());
    }

    #[test]
    fn a_copy_jobs_source_passphrase_is_relative_to_the_file_and_serves_the_source_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("local-pass"), "source secret\n").unwrap();
        let file = dir.path().join("offsite.yaml");
        let job = parse(
            "name: offsite\nrepository: s3://offsite/site-a\n\
             copy: {from: local, password_file: local-pass}\n",
            &file.display().to_string(),
        )
        .unwrap();
        let copy = job.copy().unwrap();
        assert_eq!(copy.password_file, Some(dir.path().join("local-pass")));
        let source = dir.path().join("local").display().to_string();
        assert_eq!(
            &backflow_repository::keys::passphrase_for(&source).unwrap()[..],
            b"source secret"
        );
        // Without a process-wide passphrase the target has none: the source's is not taken.
        if std::env::var_os(backflow_repository::keys::PASSWORD_FILE_ENV).is_none() {
            assert!(backflow_repository::keys::passphrase_for("s3://offsite/site-a").is_err());
        }
    }

    #[test]
    fn a_full_job_reads() {
        let job = parse(
            "name: nightly\nrepository: repo\nvms: [web01, \"db-*\"]\nexclude: [\"*-test\"]\n\
             exclude_disks: [vdb, \"db01:vdc\"]\noverrides:\n  zstd: {level: 3}\nparallel: 2\n\
             schedule: [\"0 2 * * *\"]\nvariables: {checkpoint: nightly}\nfreeze: off\n",
            "/etc/backflow/jobs/nightly.yaml",
        )
        .unwrap();
        assert_eq!(job.name.0, "nightly");
        assert_eq!(
            job.repository,
            Location::Local("/etc/backflow/jobs/repo".into())
        );
        assert_eq!(job.uri, "qemu:///system");
        assert_eq!(job.parallel, Parallel(2));
        assert!(job.exclude_disks[0].excludes("web01", "vdb"));
        assert!(job.exclude_disks[1].excludes("db01", "vdc"));
        assert!(!job.exclude_disks[1].excludes("web01", "vdc"));
        assert_eq!(job.overrides["zstd"]["level"], 3);
        assert_eq!(job.schedule[0].text, "0 2 * * *");
        assert_eq!(
            job.freeze.unwrap().value,
            Freeze::Off,
            "YAML 1.1's `off` is the word here"
        );
    }

    #[test]
    fn an_image_job_reads_with_one_schedule_string() {
        let job = parse(
            "name: imgs\nrepository: /srv/b\nimages:\n  - a.raw\n  - {path: /dev/vg0/db, name: db01}\n  \
             - {path: t.qcow2, format: qcow2}\nschedule: \"0 2 * * *\"\nfreeze: required\n",
            "/etc/backflow/jobs/imgs.yaml",
        )
        .unwrap();
        assert!(job.vms.is_empty());
        assert!(matches!(job.kind(), JobKind::Backup { images, .. } if images.len() == 3));
        let expect = |path: &str, name: Option<&str>, format| ImageSource {
            path: path.into(),
            name: name.map(str::to_owned),
            format,
        };
        assert_eq!(
            job.images,
            [
                expect("/etc/backflow/jobs/a.raw", None, None),
                expect("/dev/vg0/db", Some("db01"), None),
                expect("/etc/backflow/jobs/t.qcow2", None, Some(ImageFormat::Qcow2)),
            ]
        );
        assert_eq!(job.schedule.len(), 1);
        assert_eq!(job.schedule[0].text, "0 2 * * *");
        assert!(
            job.set_variables()
                .contains(&("freeze".into(), "required".into()))
        );
    }

    #[test]
    fn a_six_field_cron_is_refused_naming_the_field_and_the_dialect() {
        for schedule in ["\"0 0 2 * * *\"", "[\"0 2 * * *\", \"0 0 2 * * *\"]"] {
            let e = parse(
                &format!("name: a\nrepository: r\nvms: [x]\nschedule: {schedule}\n"),
                "j.yaml",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("j.yaml:4:")
                    && e.contains("schedule `0 0 2 * * *` has 6 fields")
                    && e.contains("minute hour day-of-month month day-of-week")
                    && e.contains("no seconds field"),
                "{e}"
            );
        }
        let daily = parse(
            "name: a\nrepository: r\nvms: [x]\nschedule: \"@daily\"\n",
            "j.yaml",
        );
        assert_eq!(daily.unwrap().schedule[0].text, "@daily");
    }

    #[test]
    fn a_health_check_job_reads() {
        let job = parse(
            "name: weekly-check\nrepository: /srv/backflow\nhealth_check: {read_data: false}\n\
             schedule: [\"0 3 * * 0\"]\n",
            "j.yaml",
        )
        .unwrap();
        assert!(job.vms.is_empty());
        assert!(!job.health_check().unwrap().read_data);
        let job = parse("name: c\nrepository: r\nhealth_check: {}\n", "j.yaml").unwrap();
        assert!(job.health_check().unwrap().read_data);
    }

    #[test]
    fn a_gc_job_reads() {
        let job = parse(
            "name: weekly-gc\nrepository: /srv/backflow\ngc: {repack_threshold: 5}\n\
             schedule: [\"0 4 * * 6\"]\n",
            "j.yaml",
        )
        .unwrap();
        assert_eq!(job.gc().unwrap().repack_threshold, Percent(5));
        assert!(job.is_maintenance());
        let job = parse("name: g\nrepository: r\ngc: {}\n", "j.yaml").unwrap();
        assert_eq!(
            job.gc().unwrap().repack_threshold,
            Percent(backflow_repository::DEFAULT_REPACK_THRESHOLD)
        );
    }

    #[test]
    fn mistakes_name_file_line_column_and_what_was_expected() {
        let cases = [
            (
                "name: a\nrepository: r\nvms: [x]\nparallel: 0\n",
                "j.yaml:4:11: ",
                "parallel must be 1 to 64",
            ),
            (
                "name: a\nrepository: r\nvms: [x]\nschedule: [\"61 * * * *\"]\n",
                "j.yaml:4:",
                "is not a cron expression",
            ),
            (
                "name: a\nrepository: r\nvms: [x]\nexclude_disks: [\"db01:\"]\n",
                "j.yaml:4:",
                "expected TARGET (vdb) or VM:TARGET",
            ),
            (
                "name: a\nrepository: s3:/backups\nvms: [x]\n",
                "j.yaml:2:13: ",
                "repository: \"s3:/backups\" is not a repository location: an S3 location is \
                 written s3://BUCKET",
            ),
            (
                "name: a\nrepository: s3://Backups/x\nvms: [x]\n",
                "j.yaml:2:13: ",
                "lowercase",
            ),
            (
                "name: a b\nrepository: r\nvms: [x]\n",
                "j.yaml:1:7: ",
                "is not a job name",
            ),
            (
                "name: a\nrepository: r\nvms: [x]\nretension: {}\n",
                "j.yaml:4:1: ",
                "unknown field `retension`",
            ),
            (
                "name: a\nvms: [x]\n",
                "j.yaml:",
                "missing field `repository`",
            ),
            (
                "name: a\nrepository: r\nvms: [x]\nhealth_check: {read_data: true}\n",
                "j.yaml:4:15: ",
                "already has `vms`",
            ),
            (
                "name: a\nrepository: r\nhealth_check: {}\ngc: {}\n",
                "j.yaml:4:5: ",
                "already has `health_check`",
            ),
            (
                "name: a\nrepository: r\ngc: {repack_threshold: 101}\n",
                "j.yaml:3:",
                "expected a percentage from 0 to 100, not 101",
            ),
            (
                "name: a\nrepository: r\nhealth_check: {read_dat: true}\n",
                "j.yaml:3:",
                "unknown field `read_dat`",
            ),
            ("name: a\nrepository: r\n", "j.yaml: ", "a job needs `vms`"),
            (
                "name: a\nrepository: r\nimages: [{path: a.raw, name: \"\"}]\n",
                "j.yaml:3:",
                "name: ",
            ),
            (
                "name: a\nrepository: r\nimages: [{path: a.raw, fromat: raw}]\n",
                "j.yaml:3:",
                "unknown field `fromat`",
            ),
            (
                "name: a\nrepository: r\nvms: [x]\nfreeze: sometimes\n",
                "j.yaml:4:",
                "sometimes",
            ),
            (
                "name: a\nrepository: r\ngc: {}\ncopy: {from: s}\n",
                "j.yaml:4:7: ",
                "already has `gc`",
            ),
            (
                "name: a\nrepository: r\ncopy: {form: s}\n",
                "j.yaml:3:",
                "unknown field `form`",
            ),
            (
                "name: a\nrepository: r\ncopy: {from: \"s3:/bucket\"}\n",
                "j.yaml:3:7: ",
                "copy.from: \"s3:/bucket\" is not a repository location",
            ),
        ];
        for (text, at, what) in cases {
            let e = parse(text, "j.yaml").unwrap_err().to_string();
            assert!(e.starts_with(at) && e.contains(what), "{text:?}: {e}");
        }
    }
}
