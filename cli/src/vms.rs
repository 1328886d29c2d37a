//! `backflow vms`: the VMs a libvirt connection sees, with their disks.

use anyhow::Result;
use backflow_libvirt::{Connection, DiskInfo, VmInfo};

/// Lists the VMs of `uri` (libvirt's default without one) as a table or as JSON (every field but the
/// domain XML). A connection that fails is one error naming the URI.
pub fn run(uri: Option<&str>, json: bool) -> Result<()> {
    // Read-only: listing needs no more, and libvirt allows it to more users.
    let conn = Connection::open_read_only(uri)?;
    let vms = conn.list_vms()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        print!("{}", table(&vms));
    }
    Ok(())
}

fn table(vms: &[VmInfo]) -> String {
    let name_w = vms.iter().map(|v| v.name.len()).max().unwrap_or(0).max(4);
    let host_w = vms.iter().map(|v| v.host.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<name_w$}  {:<11}  {:<host_w$}  disks\n",
        "name", "state", "host"
    );
    for vm in vms {
        let state = vm.state.to_string();
        let disks: Vec<String> = vm.disks.iter().map(disk_text).collect();
        let first = disks.first().map(String::as_str).unwrap_or("-");
        out.push_str(&format!(
            "{:<name_w$}  {state:<11}  {:<host_w$}  {first}\n",
            vm.name, vm.host
        ));
        for more in disks.iter().skip(1) {
            out.push_str(&format!("{:<w$}{more}\n", "", w = name_w + 11 + host_w + 6));
        }
    }
    out
}

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
