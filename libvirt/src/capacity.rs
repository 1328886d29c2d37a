//! A disk's capacity (the size the guest sees), found without unsafe code.
//!
//! In order:
//! 1. libvirt's storage volume of the source (`virStorageVolLookupByPath`, or the pool and volume of a
//!    `type='volume'` disk) and its info: works for remote connections and in every domain state, but only
//!    for images inside a storage pool libvirt manages.
//! 2. On a local connection (a URI without a host), `qemu-img info -U` on a file or block source: reads
//!    the image header (or the device size) without taking QEMU's image lock, which a running VM holds;
//!    the virtual size it reads only changes through a resize, which libvirt would show anyway.
//! 3. Otherwise unknown, with the reason: a remote host's file outside any pool, a network disk, an empty
//!    drive. The backup job learns the size from its export (NBD) in any case; this is for listing.
//!
//! `virDomainGetBlockInfo` would answer for every disk of a running domain, remote ones included, but the
//! `virt` 0.5 wrapper (`Domain::block_info`) ignores libvirt's failure status and returns an uninitialised
//! struct when the call fails (e.g. a shut-off domain whose image is gone, or a driver without it): not
//! usable from safe code. It comes back with the FFI module of the backup API.

use std::process::Command;

use virt::connect::Connect;

use crate::DiskSource;

/// Capacity in bytes, or why it is unknown.
pub(crate) fn find(conn: &Connect, local: bool, source: &DiskSource) -> Result<u64, String> {
    let path = match source {
        DiskSource::Volume { pool, volume } => {
            return conn
                .lookup_storage_pool_by_name(pool)
                .and_then(|p| p.lookup_storage_vol_by_name(volume))
                .and_then(|v| v.info())
                .map(|i| i.capacity)
                .map_err(|e| format!("storage volume {pool}/{volume}: {}", e.message()));
        }
        DiskSource::File { path } | DiskSource::Block { path } => path,
        DiskSource::Network { protocol, .. } => {
            return Err(format!(
                "a {protocol} network disk: its size comes from the backup export"
            ));
        }
        DiskSource::Empty => return Err("no media".to_owned()),
        DiskSource::Other { kind } => return Err(format!("a `{kind}` disk")),
    };
    if let Ok(info) = conn.lookup_storage_vol_by_path(path).and_then(|v| v.info()) {
        return Ok(info.capacity);
    }
    if !local {
        return Err(format!(
            "{path} is on a remote host and in no libvirt storage pool"
        ));
    }
    qemu_img_virtual_size(path, source)
}

fn qemu_img_virtual_size(path: &str, source: &DiskSource) -> Result<u64, String> {
    // qemu-img would wait forever to open a FIFO (and this listing with it).
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)
        .map_err(|e| format!("{path}: {e}"))?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(format!("{path} is not a regular file or a block device"));
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json", "-U"]);
    // A block device is read as raw: probing the format of a device a guest writes is what libvirt and
    // QEMU warn against (a guest could write a qcow2 header into it).
    if matches!(source, DiskSource::Block { .. }) {
        cmd.args(["-f", "raw"]);
    }
    let out = cmd.arg(path).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "qemu-img is not installed".to_owned()
        } else {
            format!("running qemu-img: {e}")
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let line = line.trim().trim_start_matches("qemu-img: ");
        return Err(format!("qemu-img info {path}: {line}"));
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("virtual-size").and_then(|s| s.as_u64()))
        .ok_or_else(|| format!("qemu-img info {path}: no virtual-size in its JSON"))
}

/// Whether a canonical libvirt URI names this machine: no host between `//` and the path
/// (`qemu:///system`, `qemu+unix:///system`, `test:///default`). `qemu+ssh://host/system` is remote, and
/// so, conservatively, is any URI with a host, `localhost` included.
pub(crate) fn is_local_uri(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((_, rest)) => rest.starts_with('/'),
        // A bare driver name ("qemu") is local.
        None => !uri.contains('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::is_local_uri;

    #[test]
    fn local_uris() {
        for uri in [
            "qemu:///system",
            "qemu+unix:///system",
            "test:///default",
            "qemu:///session",
        ] {
            assert!(is_local_uri(uri), "{uri}");
        }
        for uri in [
            "qemu+ssh://root@kvm1/system",
            "qemu+tcp://kvm2:16509/system",
            "qemu://localhost/system",
        ] {
            assert!(!is_local_uri(uri), "{uri}");
        }
    }
}
