//! What `backflow job validate` checks of a job without running it, beyond its file (which
//! [`crate::load`] checks): the repository is one, the spec exists and declares every variable
//! the job sets (and loads with them), the images exist, the VM patterns match a VM on the
//! connection (a warning when one does not: VMs come and go), and when the schedules run next.

use std::collections::BTreeMap;

use backflow_libvirt::Connection;
use backflow_repository::Repository;
use serde::Deserialize;

use crate::file::{Job, JobKind};
use crate::run::{Source, load_spec};
use crate::schedule::next_times;
use crate::select::Selected;

/// How many run times `job validate` shows per schedule.
pub const NEXT_RUNS: usize = 3;

/// What the checks found.
#[derive(Debug, Default)]
pub struct Validation {
    /// Mistakes that would make the job fail: `FILE[:LINE:COLUMN]: field: what is wrong`.
    pub errors: Vec<String>,
    /// What may be intended, or may change before the job runs (a pattern matching no VM now).
    pub warnings: Vec<String>,
    /// The specs the job's sources run, by name.
    pub specs: Vec<String>,
    /// Each schedule's text and its next [`NEXT_RUNS`] times (unix seconds, UTC).
    pub next_runs: Vec<(String, Vec<i64>)>,
}

/// Checks `job` (read from `file`) at time `now`.
pub fn validate(job: &Job, file: &str, now: i64) -> Validation {
    let mut found = Validation::default();
    let target = Repository::open_at(&job.repository);
    if let Err(e) = &target {
        // The fix is `init` where a directory is missing; a store's own error says what is wrong.
        found.errors.push(if job.repository.is_local() {
            format!(
                "{file}: repository: {e} (create one with `backflow init --repo {}`)",
                job.repository
            )
        } else {
            format!("{file}: repository: {e}")
        });
    }
    if let JobKind::Copy(copy) = job.kind() {
        check_copy(copy, target.ok().as_ref(), file, &mut found);
    }
    if let JobKind::Backup { vms, images } = job.kind() {
        let mut sources = Vec::new();
        if !vms.is_empty() {
            let selected = check_patterns(job, &mut found);
            sources.push(Source::Vm(selected.unwrap_or_else(|| Selected {
                // Only for loading the spec: a name that passes the stage's checks.
                vm: "validate".into(),
                disks: Vec::new(),
                excluded_disks: Vec::new(),
            })));
        }
        for image in images {
            if let Err(e) = std::fs::metadata(&image.path) {
                found
                    .errors
                    .push(format!("{file}: images: {}: {e}", image.path.display()));
                continue;
            }
            sources.push(Source::Image(image.clone()));
        }
        check_specs(job, file, &sources, &mut found);
    }
    for schedule in &job.schedule {
        found
            .next_runs
            .push((schedule.text.clone(), next_times(schedule, now, NEXT_RUNS)));
    }
    found
}

/// A copy's source opens, has the target's chunk size, and holds snapshots of each of `vms` (a
/// warning when a pattern matches none: they may come).
fn check_copy(
    copy: &crate::CopyJob,
    target: Option<&Repository>,
    file: &str,
    found: &mut Validation,
) {
    let source = match copy
        .location(std::path::Path::new(""))
        .and_then(|l| Repository::open_at(&l).map_err(|e| format!("copy.from: {e}")))
    {
        Ok(source) => source,
        Err(e) => {
            found.errors.push(format!("{file}: {e}"));
            return;
        }
    };
    if let Some(target) = target
        && source.chunk_size() != target.chunk_size()
    {
        found.errors.push(format!(
            "{file}: copy.from: {} has {}-byte chunks, the job's repository {}-byte chunks; copies \
             between them are refused (make the target with `backflow init --chunk-size {}`)",
            copy.from,
            source.chunk_size(),
            target.chunk_size(),
            source.chunk_size()
        ));
    }
    let identities: Vec<String> = match source.list_snapshots() {
        Ok(list) => list.into_iter().map(|s| s.vm).collect(),
        Err(e) => {
            found.errors.push(format!("{file}: copy.from: {e}"));
            return;
        }
    };
    for pattern in &copy.vms {
        if !identities.iter().any(|vm| pattern.matches(vm)) {
            found.warnings.push(format!(
                "copy.vms: `{}` matches no snapshot in {} now",
                pattern.0, copy.from
            ));
        }
    }
}

/// Warns about each pattern that matches no VM; returns the first VM selected, to load the spec
/// with (`None` when none is, or libvirt cannot be asked).
fn check_patterns(job: &Job, found: &mut Validation) -> Option<Selected> {
    // Where the VMs are: the cluster's hosts, or the connection.
    let (listed, source) = match &job.cluster {
        Some(file) => {
            let source = format!("the hosts of {}", file.display());
            let listed = backflow_cluster::load(file)
                .map(|cluster| {
                    let discovery = backflow_cluster::discover(&cluster);
                    for u in &discovery.unreachable {
                        found.warnings.push(format!(
                            "cluster host {} does not answer, so its VMs are not checked: {}",
                            u.host, u.error
                        ));
                    }
                    crate::cluster_run::listing(&discovery)
                })
                .map_err(|e| e.to_string());
            (listed, source)
        }
        None => (
            Connection::open_read_only(Some(&job.uri))
                .and_then(|c| c.list_vms())
                .map_err(|e| e.to_string()),
            job.uri.clone(),
        ),
    };
    let vms = match listed {
        Ok(vms) => vms,
        Err(e) => {
            found.warnings.push(format!(
                "the VMs of {source} cannot be listed, so `vms` is not checked: {e}"
            ));
            return None;
        }
    };
    for pattern in &job.vms {
        if !vms.iter().any(|vm| pattern.matches(&vm.name)) {
            found.warnings.push(format!(
                "vms: `{}` matches no VM on {source} now",
                pattern.0
            ));
        }
    }
    match crate::select::select(job, &vms) {
        Ok(selected) => selected.into_iter().next(),
        // A pattern matching nothing is warned about above, VM by VM.
        Err(e @ crate::JobError::EveryDiskExcluded { .. }) => {
            found.warnings.push(e.to_string());
            None
        }
        Err(_) => None,
    }
}

/// The spec's `variables:` keys (the rest of the spec is the pipeline's to check).
#[derive(Deserialize)]
struct Declared {
    #[serde(default)]
    variables: BTreeMap<String, serde_json::Value>,
}

/// Each source's spec: it must exist, declare every variable the job sets and load with them.
fn check_specs(job: &Job, file: &str, sources: &[Source], found: &mut Validation) {
    for source in sources {
        let (name, text) = match &job.spec {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (path.display().to_string(), text),
                Err(e) => {
                    found
                        .errors
                        .push(format!("{file}: spec: {}: {e}", path.display()));
                    return;
                }
            },
            None => {
                let (name, text) = source.built_in_spec();
                (format!("{name} (built in)"), text.to_owned())
            }
        };
        if found.specs.contains(&name) {
            continue;
        }
        found.specs.push(name.clone());
        let declared = match serde_saphyr::from_str::<Declared>(&text) {
            Ok(d) => d.variables,
            // Not YAML, or variables that are not a map: loading it below says where.
            Err(_) => BTreeMap::new(),
        };
        let before = found.errors.len();
        let undeclared = |var: &str| !declared.contains_key(var);
        let list = declared.keys().cloned().collect::<Vec<_>>().join(", ");
        for (var, value) in &job.variables {
            if undeclared(var) {
                let at = value.referenced;
                found.errors.push(format!(
                    "{file}:{}:{}: variables.{var}: the spec {name} declares no variable `{var}` \
                     (it declares: {list})",
                    at.line(),
                    at.column()
                ));
            }
        }
        if let Some(freeze) = &job.freeze
            && undeclared("freeze")
        {
            let at = freeze.referenced;
            found.errors.push(format!(
                "{file}:{}:{}: freeze: the spec {name} declares no variable `freeze` (it \
                 declares: {list})",
                at.line(),
                at.column()
            ));
        }
        if let Source::Image(image) = source
            && image.name.is_some()
            && undeclared("name")
        {
            found.errors.push(format!(
                "{file}: images: {}: `name` is set, and the spec {name} declares no variable \
                 `name` (it declares: {list})",
                image.path.display()
            ));
        }
        if found.errors.len() == before
            && let Err(e) = load_spec(job, source)
        {
            found.errors.push(e.to_string());
        }
    }
}
