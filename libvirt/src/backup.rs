//! libvirt's incremental backup API (pull mode) and checkpoints, which the `virt` crate (0.5) does not
//! wrap: a small safe API over the raw `virt::sys` calls.
//!
//! # What is here
//! - [`begin_backup`] (`virDomainBackupBegin`): starts a backup job; in pull mode libvirt makes QEMU
//!   export each disk (a point-in-time view) over NBD, optionally creating a checkpoint at the same
//!   instant. [`backup_xml`] (`virDomainBackupGetXMLDesc`) describes the running job; [`abort_job`]
//!   (`virDomainAbortJob`) ends it (a pull-mode job only ends that way: the socket and scratch files go).
//! - [`create_checkpoint`], [`list_checkpoints`], [`checkpoint_xml`], [`delete_checkpoint`]:
//!   checkpoints by name (libvirt refuses to create or delete them while the VM is shut off).
//!   [`redefine_checkpoint`] gives libvirt back the metadata of a checkpoint whose bitmaps are in
//!   the images (a VM that moved to another host), checking them when asked;
//!   [`delete_checkpoint_metadata`] forgets one whose bitmaps are gone.
//! - [`fs_freeze`], [`fs_thaw`]: the guest's filesystems, through the QEMU guest agent.
//!
//! The XML these calls take and return is written and read in [`crate::job_xml`].
//!
//! Every failure is a [`LibvirtError::Call`] naming the libvirt function, the connection URI and the
//! VM, with libvirt's own error (fetched right after the failing call, before any other libvirt call
//! can overwrite this thread's last error).
//!
//! # Unsafe code: invariants and ownership
//! This is the only module of the crate allowed unsafe code (the crate denies it elsewhere).
//! - The `virDomainPtr` comes from [`Domain::as_ptr`] on a `&Domain` the caller lends us: it stays
//!   valid (the `Domain` holds a reference) for the whole call, and we never keep it or free it.
//! - Strings passed in are `CString`s that outlive the call; a NUL byte inside is refused before any
//!   call ([`LibvirtError::Argument`]).
//! - What libvirt returns, and who frees it:
//!   - `virDomainBackupGetXMLDesc`, `virDomainCheckpointGetXMLDesc` and `virConnectGetURI` return a
//!     heap string the caller owns: copied
//!     into a `String`, then `libc::free`d.
//!   - `virDomainCheckpointCreateXML` and `virDomainCheckpointLookupByName` return a checkpoint the
//!     caller holds a reference to: released with `virDomainCheckpointFree` by `CheckpointRef`'s
//!     `Drop`, on every path.
//!   - `virDomainCheckpointGetName` returns a string owned by the checkpoint object: copied, never
//!     freed, and only read while the checkpoint is held.
//!   - `virDomainListAllCheckpoints` returns a heap array of `n` checkpoints: each one is wrapped in a
//!     `CheckpointRef` (so each is freed), then the array itself is `libc::free`d.
//!   - `virDomainGetConnect` returns the domain's connection without a new reference: used only while
//!     the domain is borrowed, never freed.
//! - Null pointers are checked before use; a null or negative return is an error.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};

use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

use crate::{LibvirtError, Result};

/// Starts a backup job described by `backup_xml` (`<domainbackup>`), and when `checkpoint_xml`
/// (`<domaincheckpoint>`) is given, creates that checkpoint at the instant the backup starts.
/// In pull mode the job runs until [`abort_job`].
pub fn begin_backup(domain: &Domain, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
    const CALL: &str = "virDomainBackupBegin";
    let backup = c_string(domain, CALL, backup_xml)?;
    let checkpoint = checkpoint_xml
        .map(|x| c_string(domain, CALL, x))
        .transpose()?;
    let checkpoint_ptr = checkpoint.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: the domain pointer is valid while `domain` is borrowed; both strings are NUL-terminated
    // and live until after the call (or the checkpoint pointer is null, which libvirt accepts).
    let rc =
        unsafe { sys::virDomainBackupBegin(domain.as_ptr(), backup.as_ptr(), checkpoint_ptr, 0) };
    if rc < 0 {
        return Err(call_error(domain, CALL));
    }
    Ok(())
}

/// The XML of the domain's running backup job (with what libvirt filled in: export names, scratch
/// files, the incremental checkpoint).
pub fn backup_xml(domain: &Domain) -> Result<String> {
    // SAFETY: the domain pointer is valid while `domain` is borrowed.
    let ptr = unsafe { sys::virDomainBackupGetXMLDesc(domain.as_ptr(), 0) };
    if ptr.is_null() {
        return Err(call_error(domain, "virDomainBackupGetXMLDesc"));
    }
    // SAFETY: a non-null return is a NUL-terminated heap string the caller owns; freed once, here.
    Ok(unsafe { owned_string(ptr) })
}

/// Aborts the domain's current job: for a pull-mode backup, ends it (libvirt stops the NBD server and
/// removes the scratch files). The `virt` crate has no safe wrapper for this call.
pub fn abort_job(domain: &Domain) -> Result<()> {
    // SAFETY: the domain pointer is valid while `domain` is borrowed.
    let rc = unsafe { sys::virDomainAbortJob(domain.as_ptr()) };
    if rc < 0 {
        return Err(call_error(domain, "virDomainAbortJob"));
    }
    Ok(())
}

/// Creates a checkpoint from `xml` (`<domaincheckpoint>`) and returns its name (libvirt picks one
/// when the XML names none).
pub fn create_checkpoint(domain: &Domain, xml: &str) -> Result<String> {
    checkpoint_create_xml(domain, xml, 0)
}

/// Redefines the metadata of a checkpoint whose bitmaps are already in the disks' images, from
/// `xml` ([`crate::job_xml::redefined_checkpoint`]: its name, creation time and the disks holding
/// its bitmap): `virDomainCheckpointCreateXML` with `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`, which
/// makes no bitmap, only the metadata libvirt keeps per host (a VM migrated to another host arrives
/// without it). A checkpoint of that name that libvirt knows already is replaced. Returns its name.
///
/// With `validate` (`VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE`, libvirt 6.10 and later; the
/// VM must run) libvirt first checks each listed disk: a bitmap named after the checkpoint in its
/// top image, recording, persistent and consistent; otherwise it refuses with
/// `VIR_ERR_CHECKPOINT_INCONSISTENT` ("missing or broken bitmap") and defines nothing.
pub fn redefine_checkpoint(domain: &Domain, xml: &str, validate: bool) -> Result<String> {
    let mut flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;
    if validate {
        flags |= sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
    }
    checkpoint_create_xml(domain, xml, flags)
}

fn checkpoint_create_xml(domain: &Domain, xml: &str, flags: u32) -> Result<String> {
    const CALL: &str = "virDomainCheckpointCreateXML";
    let xml = c_string(domain, CALL, xml)?;
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `xml` outlives the call.
    let ptr = unsafe { sys::virDomainCheckpointCreateXML(domain.as_ptr(), xml.as_ptr(), flags) };
    let checkpoint = CheckpointRef::new(ptr).ok_or_else(|| call_error(domain, CALL))?;
    checkpoint.name(domain)
}

/// The names of the domain's checkpoints, in libvirt's order.
pub fn list_checkpoints(domain: &Domain) -> Result<Vec<String>> {
    let mut array: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `array` is a valid place for
    // libvirt to store the address of the array it allocates.
    let n = unsafe { sys::virDomainListAllCheckpoints(domain.as_ptr(), &mut array, 0) };
    if n < 0 {
        return Err(call_error(domain, "virDomainListAllCheckpoints"));
    }
    let checkpoints: Vec<CheckpointRef> = if array.is_null() {
        Vec::new()
    } else {
        // SAFETY: on success `array` holds `n` checkpoint pointers (n >= 0 checked above), each one a
        // reference we own: each goes into a CheckpointRef, which frees it; the array itself is ours
        // to free, once, after its elements are taken.
        unsafe {
            let taken = std::slice::from_raw_parts(array, n as usize)
                .iter()
                .filter_map(|&p| CheckpointRef::new(p))
                .collect();
            libc::free(array.cast::<c_void>());
            taken
        }
    };
    checkpoints.iter().map(|c| c.name(domain)).collect()
}

/// Deletes the checkpoint `name`: its metadata and its bitmaps in the disks. Checkpoints made after it
/// are kept (no flags: libvirt reparents them to its parent).
pub fn delete_checkpoint(domain: &Domain, name: &str) -> Result<()> {
    delete_checkpoint_flags(domain, name, 0)
}

/// Deletes only libvirt's metadata of checkpoint `name`
/// (`VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`), leaving the disks' bitmaps as they are: for a
/// checkpoint whose bitmaps are gone, which [`delete_checkpoint`] cannot delete (libvirt refuses
/// when a bitmap is missing).
pub fn delete_checkpoint_metadata(domain: &Domain, name: &str) -> Result<()> {
    delete_checkpoint_flags(
        domain,
        name,
        sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
    )
}

fn delete_checkpoint_flags(domain: &Domain, name: &str, flags: u32) -> Result<()> {
    const LOOKUP: &str = "virDomainCheckpointLookupByName";
    let c_name = c_string(domain, LOOKUP, name)?;
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `c_name` outlives the call.
    let ptr = unsafe { sys::virDomainCheckpointLookupByName(domain.as_ptr(), c_name.as_ptr(), 0) };
    let checkpoint = CheckpointRef::new(ptr).ok_or_else(|| call_error(domain, LOOKUP))?;
    // SAFETY: `checkpoint` holds a valid reference until it is dropped, after the call.
    let rc = unsafe { sys::virDomainCheckpointDelete(checkpoint.0, flags) };
    if rc < 0 {
        return Err(call_error(domain, "virDomainCheckpointDelete"));
    }
    Ok(())
}

/// The XML of checkpoint `name` without the domain definition it embeds: which disks it covers
/// (`<disk name='vda' checkpoint='bitmap' bitmap='NAME'/>`).
pub fn checkpoint_xml(domain: &Domain, name: &str) -> Result<String> {
    const LOOKUP: &str = "virDomainCheckpointLookupByName";
    let c_name = c_string(domain, LOOKUP, name)?;
    // SAFETY: the domain pointer is valid while `domain` is borrowed; `c_name` outlives the call.
    let ptr = unsafe { sys::virDomainCheckpointLookupByName(domain.as_ptr(), c_name.as_ptr(), 0) };
    let checkpoint = CheckpointRef::new(ptr).ok_or_else(|| call_error(domain, LOOKUP))?;
    // SAFETY: `checkpoint` holds a valid reference until it is dropped, after the call.
    let xml = unsafe {
        sys::virDomainCheckpointGetXMLDesc(checkpoint.0, sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    };
    if xml.is_null() {
        return Err(call_error(domain, "virDomainCheckpointGetXMLDesc"));
    }
    // SAFETY: a non-null return is a NUL-terminated heap string the caller owns; freed once, here.
    Ok(unsafe { owned_string(xml) })
}

/// Whether the domain runs (`virDomainIsActive`).
pub fn is_active(domain: &Domain) -> Result<bool> {
    domain.is_active().map_err(|cause| {
        let (uri, vm) = describe(domain);
        LibvirtError::Call {
            uri,
            vm,
            call: "virDomainIsActive",
            cause,
        }
    })
}

/// Freezes the guest's filesystems through the QEMU guest agent (`virDomainFSFreeze`, all mounted
/// filesystems); returns how many were frozen. Fails when no agent answers.
pub fn fs_freeze(domain: &Domain) -> Result<u32> {
    // SAFETY: the domain pointer is valid while `domain` is borrowed; a null list with count 0 means
    // every filesystem.
    let n = unsafe { sys::virDomainFSFreeze(domain.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(call_error(domain, "virDomainFSFreeze"));
    }
    Ok(n as u32)
}

/// Thaws the filesystems [`fs_freeze`] froze; returns how many were thawed.
pub fn fs_thaw(domain: &Domain) -> Result<u32> {
    // SAFETY: as in fs_freeze.
    let n = unsafe { sys::virDomainFSThaw(domain.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(call_error(domain, "virDomainFSThaw"));
    }
    Ok(n as u32)
}

/// A checkpoint reference we own (non-null), released with `virDomainCheckpointFree` when dropped.
struct CheckpointRef(sys::virDomainCheckpointPtr);

impl CheckpointRef {
    /// Takes ownership of `ptr`, a reference returned by libvirt; `None` when it is null (failure).
    fn new(ptr: sys::virDomainCheckpointPtr) -> Option<CheckpointRef> {
        // Not `then_some(CheckpointRef(ptr))`: that makes the value first, and dropping a null one
        // calls virDomainCheckpointFree(NULL), whose error replaces the failed call's.
        if ptr.is_null() {
            None
        } else {
            Some(CheckpointRef(ptr))
        }
    }

    fn name(&self, domain: &Domain) -> Result<String> {
        // SAFETY: self.0 is a valid checkpoint while self lives.
        let ptr = unsafe { sys::virDomainCheckpointGetName(self.0) };
        if ptr.is_null() {
            return Err(call_error(domain, "virDomainCheckpointGetName"));
        }
        // SAFETY: the name belongs to the checkpoint object, valid while it is held: copied, not freed.
        Ok(unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned())
    }
}

impl Drop for CheckpointRef {
    fn drop(&mut self) {
        // SAFETY: self.0 is a non-null reference we own, released exactly once, here.
        unsafe {
            sys::virDomainCheckpointFree(self.0);
        }
    }
}

/// Copies and frees a heap string libvirt returned.
///
/// # Safety
/// `ptr` is a non-null NUL-terminated string allocated by libvirt (malloc) that the caller owns and
/// does not use afterwards.
unsafe fn owned_string(ptr: *mut c_char) -> String {
    // SAFETY: per this function's contract.
    unsafe {
        let s = CStr::from_ptr(ptr).to_string_lossy().into_owned();
        libc::free(ptr.cast::<c_void>());
        s
    }
}

/// `s` as a C string; an interior NUL is an error of `call`, before libvirt is called.
pub(crate) fn c_string(domain: &Domain, call: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|e| {
        let (uri, vm) = describe(domain);
        LibvirtError::Argument {
            uri,
            vm,
            call,
            detail: format!("a NUL byte at {} of the argument", e.nul_position()),
        }
    })
}

/// The error of a libvirt `call` that just failed on `domain`: libvirt's last error, taken before
/// anything else is called, then the URI and VM name for the message.
pub(crate) fn call_error(domain: &Domain, call: &'static str) -> LibvirtError {
    let cause = VirtError::last_error();
    let (uri, vm) = describe(domain);
    LibvirtError::Call {
        uri,
        vm,
        call,
        cause,
    }
}

/// The URI of the domain's connection and the domain's name, for messages; placeholders when libvirt
/// cannot tell.
pub(crate) fn describe(domain: &Domain) -> (String, Option<String>) {
    let vm = domain.name().ok();
    // SAFETY: the domain pointer is valid while `domain` is borrowed; virDomainGetConnect returns its
    // connection without a new reference (valid as long as the domain), which we do not free.
    let conn = unsafe { sys::virDomainGetConnect(domain.as_ptr()) };
    let uri = if conn.is_null() {
        None
    } else {
        // SAFETY: `conn` is valid (above); a non-null result is a heap string we own.
        let ptr = unsafe { sys::virConnectGetURI(conn) };
        // SAFETY: non-null, owned, not used afterwards.
        (!ptr.is_null()).then(|| unsafe { owned_string(ptr) })
    };
    (uri.unwrap_or_else(|| "unknown libvirt URI".to_owned()), vm)
}
