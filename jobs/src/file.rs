//! The job file: YAML, read with `serde-saphyr`, so that every mistake is reported with the file,
//! line and column, the field and what was expected. Values that need more than a type (cron
//! expressions, VM patterns, disk exclusions, stage overrides) are checked while they are read,
//! so their errors carry a position too. A job file is a regular file of at most
//! [`MAX_JOB_FILE_SIZE`] bytes: a FIFO or a device is refused before it is opened.
//!
//! ```yaml
//! name: nightly                      # required: names the job's sessions
//! uri: qemu:///system                # the libvirt connection (default)
//! repository: /srv/backflow          # required
//! vms: [web01, "db-*"]               # names or globs (* and ?); "*" is every VM
//! exclude: ["*-test"]                # names or globs left out
//! exclude_disks: [vdb, "db01:vdc"]   # TARGET on every VM, or VM:TARGET
//! spec: /etc/backflow/my-backup.yaml # default: the built-in specs/backup-vm.yaml
//! variables: {checkpoint: nightly}   # the spec's variables (domain, repo, uri are set per VM)
//! overrides:                         # stage options over the spec's, by stage name (or kind)
//!   zstd: {level: 3}
//!   reader: {workers: 4}
//! parallel: 1                        # VMs backed up at once
//! schedule: ["0 2 * * *"]            # cron expressions (minute hour day month weekday), UTC
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
//! A health-check job verifies the repository instead of backing up (no `vms`; `uri`, `exclude`,
//! `exclude_disks`, `spec`, `variables`, `overrides`, `parallel` and `retention` do not apply):
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

/// Largest job file, in bytes: the limit of specs ([`backflow_pipeline::input::MAX_SPEC_SIZE`]).
pub const MAX_JOB_FILE_SIZE: u64 = backflow_pipeline::input::MAX_SPEC_SIZE;

/// A job as its file says.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub name: JobName,
    #[serde(default = "default_uri")]
    pub uri: String,
    pub repository: PathBuf,
    /// The VMs to back up; empty for a health check.
    #[serde(default)]
    pub vms: Vec<Pattern>,
    #[serde(default)]
    pub exclude: Vec<Pattern>,
    #[serde(default)]
    pub exclude_disks: Vec<DiskExclusion>,
    /// A spec file; `None`: the built-in `specs/backup-vm.yaml`.
    #[serde(default)]
    pub spec: Option<PathBuf>,
    #[serde(default)]
    pub variables: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub overrides: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    #[serde(default = "one")]
    pub parallel: Parallel,
    #[serde(default)]
    pub schedule: Vec<Schedule>,
    /// What to keep of each VM's snapshots, applied after each of its successful backups.
    #[serde(default)]
    pub retention: Option<backflow_repository::KeepPolicy>,
    /// Mail the session's report (see `backflow-notify`).
    #[serde(default)]
    pub notify: Option<backflow_notify::SmtpConfig>,
    /// Verify the repository instead of backing up (a job does one of `vms`, `health_check`, `gc`).
    #[serde(default)]
    pub health_check: Option<Spanned<HealthCheck>>,
    /// Collect garbage in the repository instead of backing up.
    #[serde(default)]
    pub gc: Option<Spanned<GcJob>>,
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

    /// Whether the job backs up no VM (a health check or a gc): it runs beside any backup.
    pub fn is_maintenance(&self) -> bool {
        self.health_check.is_some() || self.gc.is_some()
    }
}

fn default_uri() -> String {
    "qemu:///system".to_owned()
}

fn one() -> Parallel {
    Parallel(1)
}

/// Reads and checks a job file. The error is the whole message, file and position included. The file
/// must be a regular file of at most [`MAX_JOB_FILE_SIZE`] bytes: a FIFO or a device is refused before
/// it is opened (it could block or never end).
pub fn load(path: &Path) -> Result<Job, String> {
    use backflow_pipeline::input::{InputError, read_text_file};
    let text = read_text_file(path, MAX_JOB_FILE_SIZE).map_err(|e| match e {
        InputError::Io(e) => format!("{}: cannot read the job file: {e}", path.display()),
        other => format!("{}: the job file {other}", path.display()),
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses a job from text; `file` is what errors call it.
pub fn parse(text: &str, file: &str) -> Result<Job, String> {
    let job: Job = serde_saphyr::from_str(text).map_err(|e| located(&e.to_string(), file))?;
    // Exactly one of: VMs to back up, a health check, a gc. The second one found is the error.
    let mut kinds: Vec<(&str, Option<(u64, u64)>)> = Vec::new();
    if !job.vms.is_empty() {
        kinds.push(("vms", None));
    }
    if let Some(check) = &job.health_check {
        let at = check.referenced;
        kinds.push(("health_check", Some((at.line(), at.column()))));
    }
    if let Some(gc) = &job.gc {
        let at = gc.referenced;
        kinds.push(("gc", Some((at.line(), at.column()))));
    }
    match kinds.as_slice() {
        [] => {
            return Err(format!(
                "{file}: a job needs `vms` (the VMs to back up), `health_check` (to verify the \
                 repository) or `gc` (to collect its garbage)"
            ));
        }
        [_] => {}
        [(first, _), (second, at), ..] => {
            let (line, column) = at.unwrap_or((1, 1));
            return Err(format!(
                "{file}:{line}:{column}: {second}: a job does one thing: back up `vms`, check the \
                 repository (`health_check`) or collect its garbage (`gc`); this one already has \
                 `{first}`; write two jobs"
            ));
        }
    }
    let relative_to = Path::new(file).parent().unwrap_or(Path::new("."));
    Ok(Job {
        // Paths in a job file are relative to the file, as people expect of configuration.
        repository: relative_to.join(&job.repository),
        spec: job.spec.as_ref().map(|s| relative_to.join(s)),
        ..job
    })
}

/// serde-saphyr's message with the file named: `FILE:LINE:COLUMN: message`, then its snippet.
fn located(message: &str, file: &str) -> String {
    let message = message.replace("<input>", file);
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    match message.strip_prefix("line ").and_then(|rest| {
        let (line, rest) = rest.split_once(" column ")?;
        let (column, rest) = rest.split_once(": ")?;
        Some((line.to_owned(), column.to_owned(), rest.to_owned()))
    }) {
        Some((line, column, rest)) => format!("{file}:{line}:{column}: {rest}"),
        None => format!("{file}: {message}"),
    }
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

/// A cron expression (five fields: minute hour day-of-month month day-of-week; UTC).
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub struct Schedule {
    pub text: String,
    pub cron: croner::Cron,
}

impl TryFrom<String> for Schedule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let cron = text.parse::<croner::Cron>().map_err(|e| {
            format!(
                "`{text}` is not a cron expression (minute hour day-of-month month day-of-week): {e}"
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
    fn a_full_job_reads() {
        let job = parse(
            "name: nightly\nrepository: repo\nvms: [web01, \"db-*\"]\nexclude: [\"*-test\"]\n\
             exclude_disks: [vdb, \"db01:vdc\"]\noverrides:\n  zstd: {level: 3}\nparallel: 2\n\
             schedule: [\"0 2 * * *\"]\nvariables: {checkpoint: nightly}\n",
            "/etc/backflow/jobs/nightly.yaml",
        )
        .unwrap();
        assert_eq!(job.name.0, "nightly");
        assert_eq!(job.repository, Path::new("/etc/backflow/jobs/repo"));
        assert_eq!(job.uri, "qemu:///system");
        assert_eq!(job.parallel, Parallel(2));
        assert!(job.exclude_disks[0].excludes("web01", "vdb"));
        assert!(job.exclude_disks[1].excludes("db01", "vdc"));
        assert!(!job.exclude_disks[1].excludes("web01", "vdc"));
        assert_eq!(job.overrides["zstd"]["level"], 3);
        assert_eq!(job.schedule[0].text, "0 2 * * *");
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
        ];
        for (text, at, what) in cases {
            let e = parse(text, "j.yaml").unwrap_err();
            assert!(e.starts_with(at) && e.contains(what), "{text:?}: {e}");
        }
    }
}
