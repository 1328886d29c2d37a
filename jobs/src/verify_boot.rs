//! Verify-boot jobs: the latest restore point of each selected VM started as an isolated copy
//! (instant recovery, no network), watched for a sign of life, recorded and torn down: proof, on a
//! schedule, that what the backups hold boots.
//!
//! ```yaml
//! name: boot-check
//! repository: /srv/backflow
//! verify_boot:
//!   vms: [web01, "db-*"]          # whose latest restore points (globs); default: every VM's
//!   console: "login:"             # a string the guest prints on its serial console, and/or
//!   agent: true                   # the QEMU guest agent answering (guest-get-time)
//!   timeout: 300                  # seconds to wait for it (default 300)
//!   uri: qemu:///system           # the libvirt connection of this host (default)
//!   state_dir: /var/lib/backflow/instant   # where the copies' overlays live (default)
//! schedule: "0 5 * * 6"
//! notify: ...
//! ```
//!
//! Each VM in turn: its latest restore point (that holds a domain XML) is started with
//! `backflow_recovery::start` as `backflow-verify-VM-ID` (new name, UUID and MACs, no network
//! interfaces, its first serial console logged to a file), then the job waits for the sign of life:
//! `console` found in the console's output, or (with `agent`) the guest agent answering; whichever
//! comes first. The VM's record says success with the time from the start to the sign of life, or
//! failure with the reason (the VM stopped, nothing within the timeout: the console's last lines).
//! Then the copy is discarded (its domain destroyed and undefined, the export stopped, the overlays
//! removed) whatever happened. The repository is only read; the original VMs are never touched.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use backflow_pipeline::CancelToken;
use backflow_recovery::{ServeCommand, SourceDisk, StartRequest};
use backflow_repository::{Repository, SnapshotInfo};
use serde::{Deserialize, Serialize};

use crate::file::{Job, Pattern};
use crate::run::Verdict;

/// What a verify-boot job checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBootJob {
    /// The VMs whose latest restore points boot (names or globs); empty: every VM's.
    #[serde(default)]
    pub vms: Vec<Pattern>,
    /// A string on the serial console that says the guest is alive.
    #[serde(default)]
    pub console: Option<String>,
    /// The QEMU guest agent answering (virDomainGetTime, which asks it) says the guest is alive.
    #[serde(default)]
    pub agent: bool,
    /// Seconds to wait for the sign of life.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// The libvirt connection the copies run on (this host's: the export is a local socket).
    #[serde(default = "default_uri")]
    pub uri: String,
    /// Where the copies' overlays, export sockets and state live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_timeout() -> u64 {
    300
}

fn default_uri() -> String {
    "qemu:///system".into()
}

fn default_state_dir() -> PathBuf {
    backflow_recovery::DEFAULT_STATE_ROOT.into()
}

impl VerifyBootJob {
    /// What is wrong with the settings, for the job file's error.
    pub fn check(&self) -> Result<(), String> {
        if self.console.as_deref().is_none_or(str::is_empty) && !self.agent {
            return Err(
                "verify_boot: expected a sign of life: `console` (a string the guest prints on its serial console) and/or `agent: true` (the guest agent answering)"
                    .into(),
            );
        }
        if self.timeout == 0 {
            return Err("verify_boot.timeout: expected a number of seconds above 0".into());
        }
        Ok(())
    }
}

/// One VM's boot check.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootRecord {
    pub vm: String,
    pub snapshot: String,
    pub result: Verdict,
    /// From the start of the copy to the sign of life (or to the failure), seconds.
    pub seconds: f64,
    /// From the start of the copy to its domain running, seconds.
    pub rto_seconds: Option<f64>,
    /// What said it lives: `console` or `agent`.
    pub sign: Option<String>,
    pub error: Option<String>,
}

/// What a verify-boot job did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyBootRecord {
    pub seconds: f64,
    pub vms: Vec<BootRecord>,
    /// Why the job could not check anything (the repository, no restore point).
    pub error: Option<String>,
}

/// Runs the job's boot checks, one VM after the other.
pub fn run_verify_boot(
    job: &Job,
    check: &VerifyBootJob,
    repo: &Repository,
    cancel: &CancelToken,
) -> (Verdict, VerifyBootRecord) {
    let began = Instant::now();
    let mut record = VerifyBootRecord {
        seconds: 0.0,
        vms: Vec::new(),
        error: None,
    };
    let latest = match latest_per_vm(repo, &check.vms) {
        Ok(latest) if latest.is_empty() => {
            record.error = Some(if check.vms.is_empty() {
                "the repository holds no restore point of a libvirt VM".to_owned()
            } else {
                "no restore point of a libvirt VM matches verify_boot.vms".to_owned()
            });
            return (Verdict::Failure, record);
        }
        Ok(latest) => latest,
        Err(e) => {
            record.error = Some(e);
            return (Verdict::Failure, record);
        }
    };
    for info in latest {
        if cancel.is_cancelled() {
            record.vms.push(BootRecord {
                vm: info.vm.clone(),
                snapshot: info.id.clone(),
                result: Verdict::Cancelled,
                seconds: 0.0,
                rto_seconds: None,
                sign: None,
                error: Some("cancelled before it started".into()),
            });
            continue;
        }
        record.vms.push(boot_one(job, check, repo, &info, cancel));
    }
    record.seconds = began.elapsed().as_secs_f64();
    let verdict = record
        .vms
        .iter()
        .map(|v| v.result)
        .max()
        .unwrap_or(Verdict::Success);
    (verdict, record)
}

/// The latest restore point of each VM that `vms` selects (all when empty) and that holds a domain
/// XML (an image's backup cannot boot as a VM), by VM name.
fn latest_per_vm(repo: &Repository, vms: &[Pattern]) -> Result<Vec<SnapshotInfo>, String> {
    let listed = repo
        .list_snapshots()
        .map_err(|e| format!("listing restore points: {e}"))?;
    let mut latest: std::collections::BTreeMap<String, SnapshotInfo> = Default::default();
    for info in listed {
        if !vms.is_empty() && !vms.iter().any(|p| p.matches(&info.vm)) {
            continue;
        }
        // Oldest first: a later one replaces an earlier one.
        latest.insert(info.vm.clone(), info);
    }
    let mut found = Vec::new();
    for info in latest.into_values() {
        let snapshot = repo
            .open_snapshot(&info.id)
            .map_err(|e| format!("restore point {}: {e}", info.id))?;
        if snapshot.meta().domain_xml.is_some() {
            found.push(info);
        }
    }
    Ok(found)
}

fn boot_one(
    job: &Job,
    check: &VerifyBootJob,
    repo: &Repository,
    info: &SnapshotInfo,
    cancel: &CancelToken,
) -> BootRecord {
    let began = Instant::now();
    let mut record = BootRecord {
        vm: info.vm.clone(),
        snapshot: info.id.clone(),
        result: Verdict::Failure,
        seconds: 0.0,
        rto_seconds: None,
        sign: None,
        error: None,
    };
    let name = copy_name(&info.vm, &info.id);
    let result = (|| -> Result<(String, Option<f64>), String> {
        let snapshot = repo
            .open_snapshot(&info.id)
            .map_err(|e| format!("restore point {}: {e}", info.id))?;
        let meta = snapshot.meta();
        let program =
            std::env::current_exe().map_err(|e| format!("the path of this program: {e}"))?;
        let request = StartRequest {
            name: name.clone(),
            uri: check.uri.clone(),
            state_root: check.state_dir.clone(),
            serve: ServeCommand::of_restore_point(program, &job.repository, &info.id),
            repository: job.repository.to_string(),
            snapshot: info.id.clone(),
            vm: info.vm.clone(),
            disks: meta
                .disks
                .iter()
                .map(|d| SourceDisk {
                    target: d.name.clone(),
                    size: d.size,
                })
                .collect(),
            domain_xml: meta.domain_xml.clone().unwrap_or_default(),
            network: false,
            console_log: true,
            console_socket: false,
        };
        let started = backflow_recovery::start(&request).map_err(|e| e.to_string())?;
        let rto = started.rto.as_secs_f64();
        let outcome = wait_for_life(check, &started, cancel);
        if let Err(e) = backflow_recovery::discard(&check.state_dir, &name) {
            tracing::warn!(vm = %info.vm, copy = %name, error = %e, "Cannot discard the boot check's copy.");
        }
        outcome.map(|sign| (sign, Some(rto))).map_err(|e| {
            // The RTO is known even when the guest did not come to life.
            format!("{e} (the copy ran after {rto:.1} s)")
        })
    })();
    record.seconds = began.elapsed().as_secs_f64();
    match result {
        Ok((sign, rto)) => {
            record.result = Verdict::Success;
            record.sign = Some(sign);
            record.rto_seconds = rto;
        }
        Err(e) => {
            record.result = if cancel.is_cancelled() {
                Verdict::Cancelled
            } else {
                Verdict::Failure
            };
            record.error = Some(e);
        }
    }
    tracing::info!(vm = %record.vm, snapshot = %record.snapshot, result = ?record.result, seconds = record.seconds, "Boot check done.");
    record
}

/// The copy's domain name: `backflow-verify-VM-ID12` (only characters a recovery's name may have).
fn copy_name(vm: &str, id: &str) -> String {
    let vm: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    format!("backflow-verify-{vm}-{}", &id[..id.len().min(12)])
}

/// Waits for the sign of life of the started copy: the console string or the agent, whichever
/// comes first. Returns which.
fn wait_for_life(
    check: &VerifyBootJob,
    started: &backflow_recovery::Started,
    cancel: &CancelToken,
) -> Result<String, String> {
    let conn = backflow_libvirt::Connection::open(Some(&check.uri)).map_err(|e| e.to_string())?;
    let (domain, _) = conn
        .domain(&started.state.name)
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(check.timeout);
    let began = Instant::now();
    let needle = check.console.as_deref().filter(|n| !n.is_empty());
    let tail = || backflow_recovery::console_tail(&started.dir, 5);
    loop {
        if cancel.is_cancelled() {
            return Err("cancelled".into());
        }
        if let Some(needle) = needle
            && backflow_recovery::console_output(&started.dir).contains(needle)
        {
            return Ok("console".into());
        }
        // virDomainGetTime asks the guest agent (guest-get-time): an answer is the agent alive.
        if check.agent && domain.time(0).is_ok() {
            return Ok("agent".into());
        }
        let what = match (needle, check.agent) {
            (Some(n), true) => format!("`{n}` on the console or the guest agent answering"),
            (Some(n), false) => format!("`{n}` on the console"),
            (None, _) => "the guest agent answering".to_owned(),
        };
        if !domain.is_active().unwrap_or(false) {
            return Err(format!(
                "the VM stopped without {what}; its console showed: {}",
                tail()
            ));
        }
        if began.elapsed() > timeout {
            return Err(format!(
                "no sign of life within {} s (expected {what}); the console showed: {}",
                check.timeout,
                tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_named_after_its_vm_and_restore_point() {
        assert_eq!(
            copy_name("web01", "0123456789abcdef0123"),
            "backflow-verify-web01-0123456789ab"
        );
        assert_eq!(copy_name("a b/c", "01"), "backflow-verify-a_b_c-01");
        backflow_recovery::check_name(&copy_name("ä ö", "ff")).unwrap();
    }

    #[test]
    fn a_sign_of_life_is_required() {
        let check: VerifyBootJob = serde_saphyr::from_str("vms: [web]").unwrap();
        let e = check.check().unwrap_err();
        assert!(e.contains("expected a sign of life"), "{e}");
        let check: VerifyBootJob = serde_saphyr::from_str("console: 'login:'").unwrap();
        check.check().unwrap();
        assert_eq!(check.timeout, 300);
        let check: VerifyBootJob = serde_saphyr::from_str("agent: true\ntimeout: 0").unwrap();
        assert!(check.check().unwrap_err().contains("timeout"));
    }
}
