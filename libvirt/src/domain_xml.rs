//! What we read from a domain XML: its `<disk>` elements (libvirt's format:
//! <https://libvirt.org/formatdomain.html#hard-drives-floppy-disks-cdroms>).
//!
//! Parsed as a tree with `roxmltree`, attribute by attribute: a disk type or device we do not know is kept
//! under its name (`DiskSource::Other`, `device`), not rejected, so a VM with an unusual device still lists.

use serde::Serialize;

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    /// Guest device name (`<target dev>`): `vda`, `sda`, `hdc`. Unique within a domain, and the name
    /// libvirt's block and backup calls take.
    pub target: String,
    /// `disk`, `cdrom`, `floppy` or `lun` (`<disk device>`). Only `disk` is a backup candidate (see
    /// [`DiskInfo::is_backup_candidate`]).
    pub device: String,
    /// `virtio`, `scsi`, `sata`, `ide`, `usb`... (`<target bus>`), when the XML says.
    pub bus: Option<String>,
    /// Image format as QEMU opens it (`<driver type>`): `qcow2`, `raw`... libvirt omits it for some
    /// disks (an empty cdrom, some network disks).
    pub format: Option<String>,
    pub source: DiskSource,
    /// Size the guest sees, in bytes; `None` when it could not be found, and `capacity_unknown` says why.
    pub capacity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_unknown: Option<String>,
}

impl DiskInfo {
    /// Only `device='disk'` holds data of the VM's own. cdroms and floppies are media inserted from
    /// elsewhere (often read-only ISO images shared by many VMs), and `lun` passes a whole SCSI device
    /// through to the guest, whose SCSI commands a backup through QEMU cannot see; none of them is backed up.
    pub fn is_backup_candidate(&self) -> bool {
        self.device == "disk"
    }
}

/// Where a disk's data lives (`<disk type>` and its `<source>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DiskSource {
    /// An image file on the VM's host (`<source file>`).
    File { path: String },
    /// A block device on the VM's host (`<source dev>`): LVM volume, partition, iSCSI LUN device.
    Block { path: String },
    /// A disk QEMU reaches over the network (`<source protocol name>`, with its `<host>`s as
    /// `name:port` or `unix:socket`): rbd, iscsi, nbd, gluster, http...
    Network {
        protocol: String,
        name: Option<String>,
        hosts: Vec<String>,
    },
    /// A volume of a libvirt storage pool (`<source pool volume>`).
    Volume { pool: String, volume: String },
    /// No source at all: a cdrom or floppy drive with no media.
    Empty,
    /// Any other disk type (`dir`, `nvme`, `vhostuser`...), by name.
    Other { kind: String },
}

impl std::fmt::Display for DiskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSource::File { path } | DiskSource::Block { path } => f.write_str(path),
            DiskSource::Network {
                protocol,
                name,
                hosts,
            } => write!(
                f,
                "{protocol}://{}/{}",
                hosts.join(","),
                name.as_deref().unwrap_or("")
            ),
            DiskSource::Volume { pool, volume } => write!(f, "volume {pool}/{volume}"),
            DiskSource::Empty => f.write_str("(no media)"),
            DiskSource::Other { kind } => write!(f, "({kind} disk)"),
        }
    }
}

/// The `<disk>` elements of a domain XML, in document order, without capacities (the caller asks
/// libvirt or the image for those). `Err` holds what is wrong, for [`crate::LibvirtError::Xml`].
pub fn parse_disks(xml: &str) -> Result<Vec<DiskInfo>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let domain = doc.root_element();
    if !domain.has_tag_name("domain") {
        return Err(format!(
            "the root element is <{}>, not <domain>",
            domain.tag_name().name()
        ));
    }
    let Some(devices) = child(domain, "devices") else {
        return Ok(Vec::new());
    };
    devices
        .children()
        .filter(|n| n.has_tag_name("disk"))
        .enumerate()
        .map(|(i, disk)| parse_disk(disk).map_err(|e| format!("<disk> number {}: {e}", i + 1)))
        .collect()
}

/// Every local file and block device the `<disk>` elements of a domain XML name: each disk's
/// `<source file>` or `<source dev>` and those of its `<backingStore>` chain (which QEMU holds open
/// too, read-only, while the domain runs). Paths as the XML spells them, in document order.
pub fn image_paths(xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(Vec::new());
    };
    let mut paths = Vec::new();
    for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
        for source in disk.descendants().filter(|n| n.has_tag_name("source")) {
            // A `<source>` belongs to the disk itself or to one `<backingStore>` of its chain.
            let owner = source.parent_element();
            if !owner.is_some_and(|o| o.has_tag_name("disk") || o.has_tag_name("backingStore")) {
                continue;
            }
            if let Some(path) = source.attribute("file").or_else(|| source.attribute("dev")) {
                paths.push(path.to_owned());
            }
        }
    }
    Ok(paths)
}

/// One `<disk>` element; `Err` says what is missing.
pub(crate) fn parse_disk(disk: roxmltree::Node<'_, '_>) -> Result<DiskInfo, String> {
    let target_el = child(disk, "target").ok_or("no <target>")?;
    let target = target_el
        .attribute("dev")
        .ok_or("<target> has no dev attribute")?
        .to_owned();
    // libvirt's schema defaults both attributes: a disk without them is a file-backed `disk`.
    let kind = disk.attribute("type").unwrap_or("file");
    let device = disk.attribute("device").unwrap_or("disk").to_owned();
    let source = match child(disk, "source") {
        None => DiskSource::Empty,
        Some(src) => match kind {
            "file" => match src.attribute("file") {
                Some(p) => DiskSource::File { path: p.to_owned() },
                None => DiskSource::Empty,
            },
            "block" => match src.attribute("dev") {
                Some(p) => DiskSource::Block { path: p.to_owned() },
                None => DiskSource::Empty,
            },
            "network" => DiskSource::Network {
                protocol: src
                    .attribute("protocol")
                    .ok_or("network <source> has no protocol")?
                    .to_owned(),
                name: src.attribute("name").map(str::to_owned),
                hosts: src
                    .children()
                    .filter(|n| n.has_tag_name("host"))
                    .map(|h| match (h.attribute("socket"), h.attribute("name")) {
                        (Some(socket), _) => format!("unix:{socket}"),
                        (None, Some(name)) => match h.attribute("port") {
                            Some(port) => format!("{name}:{port}"),
                            None => name.to_owned(),
                        },
                        (None, None) => String::new(),
                    })
                    .collect(),
            },
            "volume" => DiskSource::Volume {
                pool: src
                    .attribute("pool")
                    .ok_or("volume <source> has no pool")?
                    .to_owned(),
                volume: src
                    .attribute("volume")
                    .ok_or("volume <source> has no volume")?
                    .to_owned(),
            },
            other => DiskSource::Other {
                kind: other.to_owned(),
            },
        },
    };
    Ok(DiskInfo {
        target,
        device,
        bus: target_el.attribute("bus").map(str::to_owned),
        format: child(disk, "driver")
            .and_then(|d| d.attribute("type"))
            .map(str::to_owned),
        source,
        capacity: None,
        capacity_unknown: None,
    })
}

/// The first child element named `name`.
pub(crate) fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|n| n.has_tag_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_include_backing_chains_and_devices() {
        let xml = r#"<domain><name>x</name><devices>
            <disk type='file' device='disk'><source file='/i/top.qcow2'/>
              <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/>
                <backingStore/></backingStore><target dev='vda'/></disk>
            <disk type='block' device='disk'><source dev='/dev/vg0/data'/><target dev='vdb'/></disk>
            <disk type='network' device='disk'><source protocol='nbd' name='x'>
              <host name='h'/></source><target dev='vdc'/></disk>
            <disk type='file' device='cdrom'><target dev='sda'/></disk>
            </devices></domain>"#;
        assert_eq!(
            image_paths(xml).unwrap(),
            ["/i/top.qcow2", "/i/base.qcow2", "/dev/vg0/data"]
        );
        assert!(image_paths("<domain").is_err());
    }

    #[test]
    fn parses_every_source_kind() {
        let xml = r#"<domain type='kvm'><name>x</name><devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/var/lib/libvirt/images/x.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/>
              <source dev='/dev/vg0/x-data'/><target dev='vdb' bus='virtio'/></disk>
            <disk type='network' device='disk'><driver name='qemu' type='raw'/>
              <source protocol='rbd' name='pool/x'><host name='mon1' port='6789'/><host name='mon2'/></source>
              <target dev='vdc' bus='virtio'/></disk>
            <disk type='volume' device='disk'><source pool='default' volume='x-3.qcow2'/>
              <target dev='vdd'/></disk>
            <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
              <target dev='sda' bus='sata'/><readonly/></disk>
            <disk type='dir' device='floppy'><source dir='/srv/floppy'/><target dev='fda'/></disk>
            <interface type='network'/></devices></domain>"#;
        let disks = parse_disks(xml).unwrap();
        let got: Vec<_> = disks
            .iter()
            .map(|d| {
                (
                    d.target.as_str(),
                    d.device.as_str(),
                    d.bus.as_deref(),
                    d.format.as_deref(),
                    d.source.to_string(),
                    d.is_backup_candidate(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "vda",
                    "disk",
                    Some("virtio"),
                    Some("qcow2"),
                    "/var/lib/libvirt/images/x.qcow2".into(),
                    true
                ),
                (
                    "vdb",
                    "disk",
                    Some("virtio"),
                    Some("raw"),
                    "/dev/vg0/x-data".into(),
                    true
                ),
                (
                    "vdc",
                    "disk",
                    Some("virtio"),
                    Some("raw"),
                    "rbd://mon1:6789,mon2/pool/x".into(),
                    true
                ),
                (
                    "vdd",
                    "disk",
                    None,
                    None,
                    "volume default/x-3.qcow2".into(),
                    true
                ),
                (
                    "sda",
                    "cdrom",
                    Some("sata"),
                    Some("raw"),
                    "(no media)".into(),
                    false
                ),
                ("fda", "floppy", None, None, "(dir disk)".into(), false),
            ]
        );
        assert_eq!(
            disks[1].source,
            DiskSource::Block {
                path: "/dev/vg0/x-data".into()
            }
        );
    }

    #[test]
    fn a_domain_without_devices_has_no_disks() {
        assert_eq!(
            parse_disks("<domain><name>x</name></domain>").unwrap(),
            vec![]
        );
    }

    #[test]
    fn malformed_xml_is_an_error_not_a_panic() {
        for (xml, wanted) in [
            ("<domain><devices><disk>", "never closed"),
            ("<network/>", "not <domain>"),
            (
                "<domain><devices><disk type='file'><source file='/x'/></disk></devices></domain>",
                "<disk> number 1: no <target>",
            ),
            (
                "<domain><devices><disk type='network'><source name='x'/><target dev='vda'/></disk></devices></domain>",
                "no protocol",
            ),
        ] {
            let err = parse_disks(xml).unwrap_err();
            assert!(err.contains(wanted), "{xml}: {err}");
        }
    }
}
