//! `backflow vms`: the VMs a libvirt connection sees, with their disks; with `--cluster`, the
//! VMs of every host of a cluster, each once, with the host it runs on (docs/cluster.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow};
use backflow_cluster::Discovery;
use backflow_libvirt::{Connection, DiskInfo, VmState};

#[derive(clap::Args)]
pub struct Args {
    /// libvirt URI, e.g. qemu:///system or qemu+ssh://root@kvm1/system (default: libvirt's).
    #[arg(long, conflicts_with = "cluster")]
    uri: Option<String>,
    /// A cluster file: the VMs of all its hosts, each listed once with the host it runs on (or,
    /// shut off, is defined on). Exit 1 when a host did not answer or a VM runs on two hosts,
    /// after listing the rest.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// With --cluster: seconds each host has to answer (default 10).
    #[arg(long, value_name = "SECONDS", requires = "cluster",
          value_parser = crate::cluster::timeout_parser())]
    timeout: Option<u64>,
    /// JSON: an array of VMs with every field but the domain XML; with --cluster, an object of
    /// `vms`, `unreachable` hosts and `conflicts`.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match &args.cluster {
        Some(file) => cluster(
            file,
            args.timeout
                .map_or(backflow_cluster::DEFAULT_TIMEOUT, Duration::from_secs),
            args.json,
        ),
        None => single(args.uri.as_deref(), args.json),
    }
}

/// Lists the VMs of `uri` (libvirt's default without one) as a table or as JSON (every field but the
/// domain XML). A connection that fails is one error naming the URI.
fn single(uri: Option<&str>, json: bool) -> Result<()> {
    // Read-only: listing needs no more, and libvirt allows it to more users.
    let conn = Connection::open_read_only(uri)?;
    let vms = conn.list_vms()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        let rows: Vec<Row> = vms
            .iter()
            .map(|vm| Row {
                name: &vm.name,
                state: vm.state,
                host: &vm.host,
                also: None,
                disks: &vm.disks,
            })
            .collect();
        print!("{}", table(&rows));
    }
    Ok(())
}

/// Every VM of a cluster's hosts, each once; what could not be listed is said after the list
/// (on stderr), and makes the exit status 1.
fn cluster(file: &std::path::Path, timeout: Duration, json: bool) -> Result<()> {
    let cluster = crate::cluster::load(file)?;
    let found = backflow_cluster::discover_within(&cluster, timeout);
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        let rows: Vec<Row> = found
            .vms
            .iter()
            .map(|vm| Row {
                name: &vm.name,
                state: vm.state,
                host: &vm.host,
                also: Some(if vm.also_defined_on.is_empty() {
                    "-".to_owned()
                } else {
                    vm.also_defined_on.join(",")
                }),
                disks: &vm.disks,
            })
            .collect();
        print!("{}", table(&rows));
    }
    problems(&cluster.name, &found)
}

/// The hosts that did not answer and the VMs left out, one line each on stderr; an error when
/// there is any.
fn problems(cluster: &str, found: &Discovery) -> Result<()> {
    for host in &found.unreachable {
        eprintln!("backflow: host {}: {}", host.host, host.error);
    }
    for conflict in &found.conflicts {
        eprintln!("backflow: {conflict}");
    }
    if found.unreachable.is_empty() && found.conflicts.is_empty() {
        return Ok(());
    }
    let mut what = Vec::new();
    if !found.unreachable.is_empty() {
        let hosts: Vec<&str> = found.unreachable.iter().map(|h| h.host.as_str()).collect();
        what.push(format!(
            "{} host{} did not answer ({}): VMs shown shut off may run there",
            hosts.len(),
            if hosts.len() == 1 { "" } else { "s" },
            hosts.join(", ")
        ));
    }
    if !found.conflicts.is_empty() {
        what.push(format!(
            "{} VM{} running on two hosts left out",
            found.conflicts.len(),
            if found.conflicts.len() == 1 { "" } else { "s" }
        ));
    }
    Err(anyhow!("cluster {cluster}: {}", what.join("; ")))
}

/// One line of the table (and one more per further disk).
struct Row<'a> {
    name: &'a str,
    state: VmState,
    host: &'a str,
    /// With --cluster: the other hosts that define the VM.
    also: Option<String>,
    disks: &'a [DiskInfo],
}

fn table(rows: &[Row]) -> String {
    let name_w = rows.iter().map(|v| v.name.len()).max().unwrap_or(0).max(4);
    let host_w = rows.iter().map(|v| v.host.len()).max().unwrap_or(0).max(4);
    let with_also = rows.iter().any(|r| r.also.is_some());
    let also_w = rows
        .iter()
        .filter_map(|r| r.also.as_ref().map(String::len))
        .max()
        .unwrap_or(0)
        .max(ALSO.len());
    let also_cell = |text: &str| {
        if with_also {
            format!("{text:<also_w$}  ")
        } else {
            String::new()
        }
    };
    let mut out = format!(
        "{:<name_w$}  {:<11}  {:<host_w$}  {}disks\n",
        "name",
        "state",
        "host",
        also_cell(ALSO)
    );
    for vm in rows {
        let state = vm.state.to_string();
        let disks: Vec<String> = vm.disks.iter().map(disk_text).collect();
        let first = disks.first().map(String::as_str).unwrap_or("-");
        out.push_str(&format!(
            "{:<name_w$}  {state:<11}  {:<host_w$}  {}{first}\n",
            vm.name,
            vm.host,
            also_cell(vm.also.as_deref().unwrap_or("-"))
        ));
        let indent = name_w + 11 + host_w + 6 + if with_also { also_w + 2 } else { 0 };
        for more in disks.iter().skip(1) {
            out.push_str(&format!("{:<indent$}{more}\n", ""));
        }
    }
    out
}

/// The header of the column of other hosts that define a VM.
const ALSO: &str = "also defined on";

/// `vda: qcow2 20 GiB /var/lib/libvirt/images/web01.qcow2`; `?` for what is unknown, and the device
/// kind for disks that are not backed up (cdroms, floppies, luns).
fn disk_text(disk: &DiskInfo) -> String {
    let mut text = format!(
        "{}: {} {} {}",
        disk.target,
        disk.format.as_deref().unwrap_or("?"),
        disk.capacity.map(human_size).unwrap_or_else(|| "?".into()),
        disk.source
    );
    if !disk.is_backup_candidate() {
        text.push_str(&format!(" ({}, not backed up)", disk.device));
    }
    text
}

/// Binary units with at most one decimal: `20 GiB`, `1.5 TiB`, `512 B`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(20 << 30), "20 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(8 << 20), "8 MiB");
    }
}
