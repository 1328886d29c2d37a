//! The manager connector for libvirt: finds VMs, the host that runs them, their disks and their
//! definitions, through libvirt's client library (the `virt` crate: its safe API, and in [`backup`] a few raw calls
//! it does not wrap).
//!
//! # Layout
//! - this file: [`Connection`] (open a URI, list and describe VMs), [`VmInfo`], [`VmState`];
//! - `domain_xml`: the `<disk>` elements of a domain XML ([`DiskInfo`], [`DiskSource`]);
//! - [`define`]: a backed-up domain XML rewritten into a new domain's definition on restored
//!   images ([`new_definition`]), which [`Connection::define_vm`] defines;
//! - `capacity`: a disk's size without unsafe code (storage volume, or `qemu-img` on local
//!   connections);
//! - `error`: [`LibvirtError`] and the error policy;
//! - [`backup`]: the incremental backup API (pull mode) and checkpoints, over raw `virt::sys` calls
//!   (with [`block_copy`], the only modules allowed unsafe code);
//! - [`block_copy`]: a running disk mirrored into a new image, then pivoted (instant recovery);
//! - [`job_xml`]: the XML of pull-mode backup jobs and checkpoints, written and read back.
//!
//! # Which XML
//! A VM is described from two documents. Its disks come from the live XML (`virDomainGetXMLDesc` with
//! no flags): for a running VM that is what QEMU has open now, hot-plugged disks and the current top of
//! an external snapshot chain included, and what a backup must read; the next boot's definition can
//! differ. [`VmInfo::definition`] is the inactive XML (`VIR_DOMAIN_XML_INACTIVE`): what a restore
//! defines again, without the runtime-only parts (domain id, device aliases, generated security labels,
//! transient hot-plugs). For a shut-off VM both are the same document.
//!
//! # Connections
//! A URI is libvirt's: `qemu:///system` (local daemon), `qemu+ssh://root@kvm1/system` (remote), or
//! `test:///default` (libvirt's in-process test driver, which tests use: no daemon; its state lives as
//! long as a connection to it is open in the process, and all such connections share it). No URI means
//! libvirt's default (`LIBVIRT_DEFAULT_URI`, `uri_default` in libvirt.conf, else probing: `qemu:///system`
//! for root).

pub mod backup;
pub mod block_copy;
mod capacity;
pub mod define;
mod domain_xml;
mod error;
pub mod job_xml;

use serde::Serialize;
use tracing::debug;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;

pub use define::{
    DefinitionError, NewDefinition, RestoredDisk, new_definition, serial_element, with_serial,
    without_network,
};
pub use domain_xml::{DiskInfo, DiskSource, image_paths, parse_disks};
pub use error::{LibvirtError, Result};

/// How a connection without a URI is named in messages.
const DEFAULT_URI_NAME: &str = "libvirt's default URI";

/// An open libvirt connection. Closed when dropped.
pub struct Connection {
    conn: Connect,
    /// The canonical URI libvirt reports (the default resolved), for messages.
    uri: String,
    /// The host the hypervisor runs on, as libvirt reports it: where the VMs of this connection run.
    hostname: String,
    /// Whether the hypervisor is this machine, so its image files can be read here.
    local: bool,
}

impl Connection {
    /// Opens a read-write connection (needed later for snapshots and checkpoints).
    pub fn open(uri: Option<&str>) -> Result<Connection> {
        Self::open_with(uri, false)
    }

    /// Opens a read-only connection: enough to list and describe VMs, and allowed to users libvirt
    /// does not let manage domains.
    pub fn open_read_only(uri: Option<&str>) -> Result<Connection> {
        Self::open_with(uri, true)
    }

    fn open_with(uri: Option<&str>, read_only: bool) -> Result<Connection> {
        silence_libvirt_stderr();
        let named = uri.unwrap_or(DEFAULT_URI_NAME);
        let opened = if read_only {
            Connect::open_read_only(uri)
        } else {
            Connect::open(uri)
        };
        let conn = opened.map_err(|cause| LibvirtError::Connect {
            uri: named.to_owned(),
            unreachable: error::is_transport(&cause),
            cause,
        })?;
        let call_error = |call, cause| LibvirtError::Call {
            uri: named.to_owned(),
            vm: None,
            call,
            cause,
        };
        let canonical = conn.uri().map_err(|e| call_error("virConnectGetURI", e))?;
        let hostname = conn
            .hostname()
            .map_err(|e| call_error("virConnectGetHostname", e))?;
        debug!(uri = %canonical, %hostname, read_only, "Connected to libvirt.");
        Ok(Connection {
            local: capacity::is_local_uri(&canonical),
            conn,
            uri: canonical,
            hostname,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The underlying `virt` connection, for calls this crate does not wrap yet (tests define domains
    /// through it: the test driver's state belongs to the connections open in the process).
    pub fn virt(&self) -> &Connect {
        &self.conn
    }

    /// Every VM of the connection, running or not, sorted by name. A VM undefined while the list is
    /// built is left out.
    pub fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|cause| self.call_error("virConnectListAllDomains", None, cause))?;
        let mut vms = Vec::with_capacity(domains.len());
        for domain in &domains {
            match self.describe(domain) {
                Ok(vm) => vms.push(vm),
                Err(LibvirtError::Call { cause, vm, .. }) if error::is_no_domain(&cause) => {
                    debug!(uri = %self.uri, vm = ?vm, "VM went away while listing.");
                }
                Err(e) => return Err(e),
            }
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    /// Every domain with the local files and block devices its disks use now (live XML: backing
    /// chains included), without describing capacities: cheap enough for a check before each
    /// restore that it writes no image a VM uses. A domain undefined meanwhile is left out.
    pub fn domain_images(&self) -> Result<Vec<DomainImages>> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|cause| self.call_error("virConnectListAllDomains", None, cause))?;
        let mut found = Vec::with_capacity(domains.len());
        for domain in &domains {
            let described = (|| {
                let name = domain
                    .name()
                    .map_err(|cause| self.call_error("virDomainGetName", None, cause))?;
                let err = |call: &'static str| {
                    let name = name.clone();
                    move |cause| self.call_error(call, Some(&name), cause)
                };
                let state = VmState::from(domain.info().map_err(err("virDomainGetInfo"))?.state);
                let xml = domain.xml_desc(0).map_err(err("virDomainGetXMLDesc"))?;
                let images = image_paths(&xml).map_err(|detail| LibvirtError::Xml {
                    uri: self.uri.clone(),
                    vm: name.clone(),
                    detail,
                })?;
                Ok(DomainImages {
                    name,
                    state,
                    images,
                })
            })();
            match described {
                Ok(d) => found.push(d),
                Err(LibvirtError::Call { cause, vm, .. }) if error::is_no_domain(&cause) => {
                    debug!(uri = %self.uri, vm = ?vm, "VM went away while listing.");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }

    /// One VM by name.
    pub fn vm(&self, name: &str) -> Result<VmInfo> {
        let domain = self.conn_lookup(name)?;
        self.describe(&domain)
    }

    /// Defines a new persistent domain from `xml` (not started) and describes it. Refuses, without
    /// calling libvirt's define, when a domain of the XML's `<name>` exists: libvirt would replace
    /// its definition when the UUIDs match, and a restore must never change an existing VM.
    pub fn define_vm(&self, xml: &str) -> Result<VmInfo> {
        let doc = roxmltree::Document::parse(xml)
            .map_err(|e| define::DefinitionError::Malformed(e.to_string()))?;
        let name = doc
            .root_element()
            .children()
            .find(|n| n.has_tag_name("name"))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
            .ok_or(define::DefinitionError::NoName)?;
        match self.conn_lookup(&name) {
            Ok(_) => {
                return Err(LibvirtError::VmExists {
                    uri: self.uri.clone(),
                    name,
                });
            }
            Err(LibvirtError::NoSuchVm { .. }) => {}
            Err(e) => return Err(e),
        }
        if xml.contains('\0') {
            return Err(LibvirtError::Argument {
                uri: self.uri.clone(),
                vm: Some(name),
                call: "virDomainDefineXMLFlags",
                detail: "the domain XML holds a NUL byte".into(),
            });
        }
        let domain = self
            .conn
            .define_domain_xml_flags(xml, virt::sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(|cause| self.call_error("virDomainDefineXMLFlags", Some(&name), cause))?;
        debug!(uri = %self.uri, vm = %name, "Domain defined.");
        self.describe(&domain)
    }

    /// Starts the defined, shut-off domain `name`.
    pub fn start_vm(&self, name: &str) -> Result<()> {
        let domain = self.conn_lookup(name)?;
        domain
            .create()
            .map_err(|cause| self.call_error("virDomainCreate", Some(name), cause))?;
        debug!(uri = %self.uri, vm = %name, "Domain started.");
        Ok(())
    }

    /// Whether the hypervisor runs on this machine, so that its image files can be opened here.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// The libvirt handle of VM `name`, for the calls of [`backup`], and its description.
    pub fn domain(&self, name: &str) -> Result<(Domain, VmInfo)> {
        let domain = self.conn_lookup(name)?;
        let info = self.describe(&domain)?;
        Ok((domain, info))
    }

    /// The libvirt handle of the VM with this UUID: the same VM even if it was renamed (a new
    /// connection finds a VM again by it).
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Domain> {
        self.conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|cause| self.call_error("virDomainLookupByUUIDString", None, cause))
    }

    fn conn_lookup(&self, name: &str) -> Result<Domain> {
        self.conn.lookup_domain_by_name(name).map_err(|cause| {
            if error::is_no_domain(&cause) {
                LibvirtError::NoSuchVm {
                    uri: self.uri.clone(),
                    name: name.to_owned(),
                }
            } else {
                self.call_error("virDomainLookupByName", Some(name), cause)
            }
        })
    }

    fn describe(&self, domain: &Domain) -> Result<VmInfo> {
        let name = domain
            .name()
            .map_err(|cause| self.call_error("virDomainGetName", None, cause))?;
        let err = |call: &'static str| {
            let name = name.clone();
            move |cause| self.call_error(call, Some(&name), cause)
        };
        let uuid = domain
            .uuid_string()
            .map_err(err("virDomainGetUUIDString"))?;
        let state = VmState::from(domain.info().map_err(err("virDomainGetInfo"))?.state);
        let persistent = domain
            .is_persistent()
            .map_err(err("virDomainIsPersistent"))?;
        let live = domain.xml_desc(0).map_err(err("virDomainGetXMLDesc"))?;
        let definition = domain
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(err("virDomainGetXMLDesc(INACTIVE)"))?;
        let mut disks = parse_disks(&live).map_err(|detail| LibvirtError::Xml {
            uri: self.uri.clone(),
            vm: name.clone(),
            detail,
        })?;
        for disk in &mut disks {
            // The image itself (a local file, or a volume of a pool); on another host, else
            // libvirt's view of the disk there (virDomainGetBlockInfo: a cluster's images are in no
            // pool). Locally the file was looked at already: libvirt would know no better.
            match capacity::find(&self.conn, self.local, &disk.source).or_else(|reason| {
                if self.local {
                    return Err(reason);
                }
                domain
                    .block_info(&disk.target, 0)
                    .map(|info| info.capacity)
                    .map_err(|e| format!("{reason}; virDomainGetBlockInfo: {e}"))
            }) {
                Ok(bytes) => disk.capacity = Some(bytes),
                Err(reason) => {
                    debug!(vm = %name, disk = %disk.target, %reason, "Capacity unknown.");
                    disk.capacity_unknown = Some(reason);
                }
            }
        }
        Ok(VmInfo {
            name,
            uuid,
            state,
            persistent,
            host: self.hostname.clone(),
            disks,
            definition,
        })
    }

    fn call_error(
        &self,
        call: &'static str,
        vm: Option<&str>,
        cause: virt::error::Error,
    ) -> LibvirtError {
        LibvirtError::Call {
            uri: self.uri.clone(),
            vm: vm.map(str::to_owned),
            call,
            cause,
        }
    }
}

/// libvirt prints every error on stderr unless an error function is set; ours are returned as values
/// and printed once by whoever handles them.
fn silence_libvirt_stderr() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

/// A domain and the images it uses ([`Connection::domain_images`]).
#[derive(Debug, Clone, Serialize)]
pub struct DomainImages {
    pub name: String,
    pub state: VmState,
    /// Local files and block devices, as the domain XML names them (see [`image_paths`]).
    pub images: Vec<String>,
}

/// A VM as libvirt describes it.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    /// Defined (survives shutdown) rather than transient (exists only while it runs).
    pub persistent: bool,
    /// The connection's hostname: the host whose hypervisor runs (or would run) the VM.
    pub host: String,
    /// From the live XML (see the crate documentation), in document order.
    pub disks: Vec<DiskInfo>,
    /// The inactive domain XML (see the crate documentation). Not in JSON listings.
    #[serde(skip)]
    pub definition: String,
}

impl VmInfo {
    /// The disks a backup reads: `device='disk'` only.
    pub fn backup_disks(&self) -> impl Iterator<Item = &DiskInfo> {
        self.disks.iter().filter(|d| d.is_backup_candidate())
    }
}

/// A domain's state (`virDomainState`); `Display` prints it the way `virsh list` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    NoState,
    Running,
    /// Blocked on a resource (virsh says `idle`).
    Blocked,
    Paused,
    /// Being shut down.
    ShuttingDown,
    ShutOff,
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// A state newer than the `virt` bindings.
    Unknown,
}

impl From<virt::domain::DomainStateEnum> for VmState {
    fn from(state: virt::domain::DomainStateEnum) -> Self {
        match state {
            Enum::Known(DomainState::NoState) => VmState::NoState,
            Enum::Known(DomainState::Running) => VmState::Running,
            Enum::Known(DomainState::Blocked) => VmState::Blocked,
            Enum::Known(DomainState::Paused) => VmState::Paused,
            Enum::Known(DomainState::Shutdown) => VmState::ShuttingDown,
            Enum::Known(DomainState::Shutoff) => VmState::ShutOff,
            Enum::Known(DomainState::Crashed) => VmState::Crashed,
            Enum::Known(DomainState::PMSuspended) => VmState::PmSuspended,
            Enum::Unknown(_) => VmState::Unknown,
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::NoState => "no state",
            VmState::Running => "running",
            VmState::Blocked => "idle",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "in shutdown",
            VmState::ShutOff => "shut off",
            VmState::Crashed => "crashed",
            VmState::PmSuspended => "pmsuspended",
            VmState::Unknown => "unknown",
        })
    }
}
