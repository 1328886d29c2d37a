//! libvirt's block copy (`virDomainBlockCopy`), which the `virt` crate (0.5) does not wrap: a running
//! VM's disk mirrored into a new image while the guest keeps writing, then switched over (pivot).
//!
//! Instant recovery moves the disks of a VM that runs on overlays of a restore point (a qcow2 over
//! an NBD export of the repository) into standalone images this way, without stopping it:
//! - [`begin`] starts the copy of the whole chain (overlay and backing: the destination holds no
//!   reference to the export) into a new image libvirt creates, as a transient job, which libvirt
//!   requires on a persistent domain (`VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB`: the job does not
//!   survive a restart of the VM, which loses nothing: the source stays whole until the pivot);
//! - the copy is *ready* when the destination has caught up and QEMU mirrors every new write to
//!   both: [`mirror_ready`] reads that from the live domain XML (`<mirror ... ready='yes'>`), which
//!   is what libvirt itself reports and avoids racing its events;
//! - [`pivot`] switches the disk to the destination (`virDomainBlockJobAbort` with
//!   `VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT`); libvirt 9 then also rewrites the persistent definition to
//!   the new image (checked in `tests/block_copy.rs`); [`cancel`] ends the job without pivoting (the
//!   disk stays where it was, the destination is left for the caller to remove);
//! - [`progress`] (`virDomainGetBlockJobInfo`): bytes copied of bytes to copy, for progress reports.
//!
//! Unsafe code follows the invariants of [`crate::backup`] (the domain pointer borrowed for the call,
//! strings as `CString`s that outlive it, libvirt's last error read right after a failure).

#![allow(unsafe_code)]

use virt::domain::Domain;
use virt::sys;

use crate::backup::{c_string, call_error, describe};
use crate::{LibvirtError, Result};

/// Starts copying the disk `target` (its `<target dev>`) of the running `domain` into a new image
/// at `dest` of format `format` (`qcow2` or `raw`), flattening the whole backing chain into it. The
/// file must not exist (libvirt creates it; QEMU must be able to write its directory).
pub fn begin(domain: &Domain, target: &str, dest: &str, format: &str) -> Result<()> {
    const CALL: &str = "virDomainBlockCopy";
    if format != "qcow2" && format != "raw" {
        let (uri, vm) = describe(domain);
        return Err(LibvirtError::Argument {
            uri,
            vm,
            call: CALL,
            detail: format!("expected the format qcow2 or raw, got `{format}`"),
        });
    }
    let xml = format!(
        "<disk type='file'><source file='{}'/><driver type='{}'/></disk>",
        crate::job_xml::escape(dest),
        format
    );
    let disk = c_string(domain, CALL, target)?;
    let xml = c_string(domain, CALL, &xml)?;
    // SAFETY: the domain pointer is valid while `domain` is borrowed; both strings outlive the call;
    // no typed parameters (a null array with a count of 0, which libvirt accepts).
    let rc = unsafe {
        sys::virDomainBlockCopy(
            domain.as_ptr(),
            disk.as_ptr(),
            xml.as_ptr(),
            std::ptr::null_mut(),
            0,
            sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
    };
    if rc < 0 {
        return Err(call_error(domain, CALL));
    }
    Ok(())
}

/// Bytes copied and bytes to copy of the block job on disk `target`; `None` when it has none.
pub fn progress(domain: &Domain, target: &str) -> Result<Option<(u64, u64)>> {
    const CALL: &str = "virDomainGetBlockJobInfo";
    let disk = c_string(domain, CALL, target)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `disk` outlives the call and
    // `info` is a valid place for libvirt to fill.
    let rc = unsafe { sys::virDomainGetBlockJobInfo(domain.as_ptr(), disk.as_ptr(), &mut info, 0) };
    match rc {
        0 => Ok(None),
        1 => Ok(Some((info.cur, info.end))),
        _ => Err(call_error(domain, CALL)),
    }
}

/// Whether the copy of disk `target` is ready to pivot, from the live XML: the disk's `<mirror>`
/// has `ready='yes'`. An error when the disk has no copy running (it failed, or never began).
pub fn mirror_ready(domain: &Domain, target: &str) -> Result<bool> {
    let xml = domain.xml_desc(0).map_err(|cause| {
        let (uri, vm) = describe(domain);
        LibvirtError::Call {
            uri,
            vm,
            call: "virDomainGetXMLDesc",
            cause,
        }
    })?;
    mirror_state(&xml, target).map_err(|detail| {
        let (uri, vm) = describe(domain);
        LibvirtError::Xml {
            uri,
            vm: vm.unwrap_or_default(),
            detail,
        }
    })
}

/// The `ready` state of disk `target`'s `<mirror>` in a live domain XML.
fn mirror_state(xml: &str, target: &str) -> std::result::Result<bool, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("live domain XML: {e}"))?;
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
        })
        .ok_or_else(|| format!("the VM has no disk `{target}`"))?;
    let mirror = disk
        .children()
        .find(|c| c.has_tag_name("mirror"))
        .ok_or_else(|| format!("disk `{target}` has no block copy running (it failed or ended)"))?;
    Ok(mirror.attribute("ready") == Some("yes"))
}

/// Switches disk `target` to the copy's destination (the copy must be ready).
pub fn pivot(domain: &Domain, target: &str) -> Result<()> {
    abort(domain, target, sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
}

/// Ends the block job on disk `target` without pivoting: the disk stays on its source.
pub fn cancel(domain: &Domain, target: &str) -> Result<()> {
    abort(domain, target, 0)
}

fn abort(domain: &Domain, target: &str, flags: u32) -> Result<()> {
    const CALL: &str = "virDomainBlockJobAbort";
    let disk = c_string(domain, CALL, target)?;
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `disk` outlives the call.
    let rc = unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), disk.as_ptr(), flags) };
    if rc < 0 {
        return Err(call_error(domain, CALL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mirror_state;

    #[test]
    fn mirror_state_reads_ready_of_the_named_disk() {
        let xml = "<domain><devices>\
            <disk><source file='/a'/><mirror type='file' job='copy' ready='yes'/><target dev='vda'/></disk>\
            <disk><source file='/b'/><mirror type='file' job='copy'/><target dev='vdb'/></disk>\
            <disk><source file='/c'/><target dev='vdc'/></disk>\
            </devices></domain>";
        assert_eq!(mirror_state(xml, "vda"), Ok(true));
        assert_eq!(mirror_state(xml, "vdb"), Ok(false));
        assert!(
            mirror_state(xml, "vdc")
                .unwrap_err()
                .contains("no block copy")
        );
        assert!(
            mirror_state(xml, "vdd")
                .unwrap_err()
                .contains("no disk `vdd`")
        );
    }
}
