//! `backflow cluster check`: whether each host of a cluster file can serve, its libvirt and its
//! worker access, with versions (docs/cluster.md). Exit status 0 when every host is good, 1 when
//! any failed (after the whole report), 2 when the file is bad.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow};
use backflow_cluster::{Cluster, HostCheck, WorkerCheck};
use serde_json::json;

use crate::BadInput;

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// For each host of a cluster file: does its libvirt answer (versions, VMs), and does the
    /// worker access work (ssh runs `BACKFLOW --version` there)? Every host at once, each check
    /// within --timeout. Exit 0: all good; 1: a host failed; 2: a bad file.
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The cluster file (YAML: its hosts and how to reach them; docs/cluster.md).
    #[arg(long, value_name = "FILE")]
    cluster: PathBuf,
    /// Seconds each host has to answer each check: a host that does not is reported, never
    /// waited for longer.
    #[arg(long, value_name = "SECONDS", default_value_t = backflow_cluster::DEFAULT_TIMEOUT.as_secs(),
          value_parser = timeout_parser())]
    timeout: u64,
    /// JSON: the cluster, `ok`, and each host's libvirt and worker answers.
    #[arg(long)]
    json: bool,
}

/// What `--timeout` accepts: whole seconds, 1 to an hour.
pub fn timeout_parser() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::new().range(1..=3600)
}

pub fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Check(args) => check(args),
    }
}

/// A cluster file, or bad input naming the file, line, column and field.
pub fn load(path: &Path) -> Result<Cluster> {
    backflow_cluster::load(path).map_err(|e| BadInput::new(e.to_string()).into())
}

fn check(args: CheckArgs) -> Result<()> {
    let cluster = load(&args.cluster)?;
    let own = env!("CARGO_PKG_VERSION");
    let checks = backflow_cluster::check(&cluster, own, Duration::from_secs(args.timeout));
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.host.as_str())
        .collect();
    if args.json {
        let hosts: Vec<_> = checks.iter().map(host_json).collect();
        let report = json!({
            "cluster": cluster.name,
            "ok": failed.is_empty(),
            "controller_version": own,
            "hosts": hosts,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&cluster, &checks));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} of {} hosts of cluster {} failed: {}",
            failed.len(),
            checks.len(),
            cluster.name,
            failed.join(", ")
        ))
    }
}

fn host_json(c: &HostCheck) -> serde_json::Value {
    let libvirt = match &c.libvirt {
        Ok(facts) => {
            let mut v = serde_json::to_value(facts).unwrap_or_default();
            v["ok"] = true.into();
            v
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let worker = match &c.worker {
        WorkerCheck::Disabled => json!({"ok": true, "enabled": false}),
        WorkerCheck::Ok { version, warning } => {
            json!({"ok": true, "enabled": true, "version": version, "warning": warning})
        }
        WorkerCheck::Failed(e) => json!({"ok": false, "enabled": true, "error": e.to_string()}),
    };
    json!({
        "host": c.host,
        "address": c.address,
        "uri": c.uri,
        "ok": c.ok(),
        "libvirt": libvirt,
        "worker": worker,
    })
}

/// One block per host:
/// ```text
/// h1 (10.77.3.11): ok
///   libvirt  libvirt 9.0.0, QEMU 7.2.0, 2 VMs, hostname kvm1
///   worker   backflow 0.1.0
/// ```
fn text(cluster: &Cluster, checks: &[HostCheck]) -> String {
    let mut out = format!("cluster {}: {} hosts\n", cluster.name, checks.len());
    for c in checks {
        out.push_str(&format!(
            "{} ({}): {}\n",
            c.host,
            c.address,
            if c.ok() { "ok" } else { "FAILED" }
        ));
        let libvirt = match &c.libvirt {
            Ok(f) => format!(
                "libvirt {}, {} {}, {} VM{}, hostname {}",
                f.libvirt_version,
                f.hypervisor,
                f.hypervisor_version,
                f.vms,
                if f.vms == 1 { "" } else { "s" },
                f.hostname
            ),
            Err(e) => format!("FAILED: {e}"),
        };
        out.push_str(&format!("  libvirt  {libvirt}\n"));
        let worker = match &c.worker {
            WorkerCheck::Disabled => "disabled (not checked)".to_owned(),
            WorkerCheck::Ok {
                version,
                warning: None,
            } => format!("backflow {version}"),
            WorkerCheck::Ok {
                version,
                warning: Some(w),
            } => format!("backflow {version}; warning: {w}"),
            WorkerCheck::Failed(e) => format!("FAILED: {e}"),
        };
        out.push_str(&format!("  worker   {worker}\n"));
    }
    out
}
