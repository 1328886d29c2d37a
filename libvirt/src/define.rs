//! A backed-up domain XML turned into the definition of a new domain that runs on restored images.
//!
//! The copy must never touch the original VM, which may still exist (the usual case: a restore to
//! look at last week's state next to today's VM). So the new definition:
//! - has the new `<name>`, and no `<uuid>` (libvirt makes one);
//! - has no `<mac address>` in its `<interface>`s (libvirt makes new ones: two guests with one MAC
//!   on a network break both), and an empty `<genid/>` where there was a VM generation ID (libvirt
//!   makes a new one, which tells the guest it runs from a copy);
//! - points each restored disk (by `<target dev>`) at its restored image: `<disk type='file'>`,
//!   `<source file>` the image, `<driver type>` its format, no `<backingStore>` (the restored image
//!   is whole);
//! - leaves out every other `device='disk'` disk, with a note: its `<source>` is the original VM's
//!   image, which the copy would otherwise open, and write.
//!
//! cdroms, floppies, `lun` disks and every other device are left as they are.
//!
//! The edits are made on the original text, by the byte ranges of the elements and attributes
//! concerned, so that everything else (comments, formatting, elements this code does not know)
//! stays byte for byte what the backup holds. A removed element takes the whitespace before it
//! with it, so that no blank line is left.

use std::collections::BTreeMap;
use std::ops::Range;

use roxmltree::Node;

use crate::domain_xml::child;
use crate::job_xml::escape;

/// One disk of the snapshot as the restore wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// The disk's `<target dev>` in the backed-up definition (its name in the repository).
    pub target: String,
    /// The restored image, as the new domain's host sees it.
    pub path: String,
    /// `qcow2` or `raw`: what the image is, for `<driver type>`.
    pub format: String,
}

/// The new domain's definition, and what a person should know about how it differs from the
/// original beyond the name, UUID and MACs (disks left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDefinition {
    pub xml: String,
    pub notes: Vec<String>,
}

/// Why a backed-up definition cannot become a new domain's. Never retryable: the same input
/// fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("the backed-up domain XML is not well formed: {0}")]
    Malformed(String),
    #[error("expected <domain> as the root element of the backed-up definition, found <{0}>")]
    NotADomain(String),
    #[error("expected a <name> element in the backed-up <domain>, found none")]
    NoName,
    #[error("the new domain's name must not be empty")]
    EmptyName,
    #[error("<disk> number {index} of the backed-up definition: expected a <target dev='...'>")]
    DiskWithoutTarget { index: usize },
    #[error(
        "restored disk `{target}`: expected a <disk> with <target dev='{target}'> in the backed-up definition; it has: {}",
        if known.is_empty() { "no disks".to_owned() } else { known.join(", ") }
    )]
    UnknownDisk { target: String, known: Vec<String> },
    #[error(
        "restored disk `{target}` is a `{device}` in the backed-up definition, expected device='disk'"
    )]
    NotADisk { target: String, device: String },
    #[error("restored disk `{target}`: expected format qcow2 or raw, got `{format}`")]
    BadFormat { target: String, format: String },
    #[error("disk `{0}` was restored twice")]
    DuplicateDisk(String),
}

/// The definition of a new domain named `name` from the backed-up `xml`, running on `restored`.
pub fn new_definition(
    xml: &str,
    name: &str,
    restored: &[RestoredDisk],
) -> Result<NewDefinition, DefinitionError> {
    if name.trim().is_empty() {
        return Err(DefinitionError::EmptyName);
    }
    let mut wanted: BTreeMap<&str, &RestoredDisk> = BTreeMap::new();
    for disk in restored {
        if !matches!(disk.format.as_str(), "qcow2" | "raw") {
            return Err(DefinitionError::BadFormat {
                target: disk.target.clone(),
                format: disk.format.clone(),
            });
        }
        if wanted.insert(&disk.target, disk).is_some() {
            return Err(DefinitionError::DuplicateDisk(disk.target.clone()));
        }
    }

    let doc =
        roxmltree::Document::parse(xml).map_err(|e| DefinitionError::Malformed(e.to_string()))?;
    let domain = doc.root_element();
    if !domain.has_tag_name("domain") {
        return Err(DefinitionError::NotADomain(
            domain.tag_name().name().to_owned(),
        ));
    }
    let mut edits = Edits::new(xml);
    let mut notes = Vec::new();

    let name_el = child(domain, "name").ok_or(DefinitionError::NoName)?;
    edits.replace(name_el.range(), format!("<name>{}</name>", escape(name)));
    for uuid in children(domain, "uuid") {
        edits.remove_element(uuid);
    }
    for genid in children(domain, "genid") {
        edits.replace(genid.range(), "<genid/>".to_owned());
    }

    let mut found = Vec::new();
    if let Some(devices) = child(domain, "devices") {
        for interface in children(devices, "interface") {
            for mac in children(interface, "mac") {
                edits.remove_element(mac);
            }
        }
        for (i, disk) in children(devices, "disk").enumerate() {
            let target = child(disk, "target")
                .and_then(|t| t.attribute("dev"))
                .ok_or(DefinitionError::DiskWithoutTarget { index: i + 1 })?;
            let device = disk.attribute("device").unwrap_or("disk");
            found.push(target.to_owned());
            match wanted.get(target) {
                Some(_) if device != "disk" => {
                    return Err(DefinitionError::NotADisk {
                        target: target.to_owned(),
                        device: device.to_owned(),
                    });
                }
                Some(restored) => point_at_image(&mut edits, disk, restored),
                None if device == "disk" => {
                    edits.remove_element(disk);
                    notes.push(format!(
                        "disk `{target}` was not restored: it is left out of the new domain's \
                         definition, which would otherwise use the original VM's image ({})",
                        crate::domain_xml::parse_disk(disk)
                            .map(|d| d.source.to_string())
                            .unwrap_or_else(|_| "unknown source".into())
                    ));
                }
                None => {}
            }
        }
    }
    if let Some(missing) = wanted.keys().find(|t| !found.iter().any(|f| f == *t)) {
        return Err(DefinitionError::UnknownDisk {
            target: (*missing).to_owned(),
            known: found,
        });
    }
    Ok(NewDefinition {
        xml: edits.apply(),
        notes,
    })
}

/// `xml` (a domain definition) without its network interfaces: a copy that must not reach any
/// network (a restore point proven to boot next to the VM it comes from, which still runs with the
/// same addresses). Everything else stays byte for byte.
pub fn without_network(xml: &str) -> Result<String, DefinitionError> {
    let doc =
        roxmltree::Document::parse(xml).map_err(|e| DefinitionError::Malformed(e.to_string()))?;
    let mut edits = Edits::new(xml);
    if let Some(devices) = child(doc.root_element(), "devices") {
        for interface in children(devices, "interface") {
            edits.remove_element(interface);
        }
    }
    Ok(edits.apply())
}

/// `xml` (a domain definition) with its first serial port replaced by `serial` (a whole
/// `<serial>` element; added when the domain has none), its other serial ports that have a
/// `<source>` and every `<console>` that has one or mirrors a serial port removed (libvirt adds the
/// console of the first serial port again). The serial ports of a backed-up definition name the
/// original's files and sockets: a copy that kept them would take them from the original, or fail
/// once they are gone.
pub fn with_serial(xml: &str, serial: &str) -> Result<String, DefinitionError> {
    let doc =
        roxmltree::Document::parse(xml).map_err(|e| DefinitionError::Malformed(e.to_string()))?;
    let domain = doc.root_element();
    let mut edits = Edits::new(xml);
    match child(domain, "devices") {
        Some(devices) => {
            let mut ports = children(devices, "serial");
            match ports.next() {
                Some(first) => edits.replace(first.range(), serial.to_owned()),
                None => append_child(&mut edits, devices, serial.to_owned()),
            }
            for other in ports.filter(|p| child(*p, "source").is_some()) {
                edits.remove_element(other);
            }
            for console in children(devices, "console") {
                let mirrors = child(console, "target")
                    .is_none_or(|t| t.attribute("type").is_none_or(|k| k == "serial"));
                if mirrors || child(console, "source").is_some() {
                    edits.remove_element(console);
                }
            }
        }
        None => append_child(&mut edits, domain, format!("<devices>{serial}</devices>")),
    }
    Ok(edits.apply())
}

/// A `<serial>` element for port 0: on a unix socket libvirt listens on when `socket` is given
/// (a tool drives the console), else a pty (`virsh console`); with `log`, its output also goes to
/// that file, rewritten at each start.
pub fn serial_element(socket: Option<&str>, log: Option<&str>) -> String {
    let log = log
        .map(|l| format!("<log file='{}' append='off'/>", escape(l)))
        .unwrap_or_default();
    match socket {
        Some(path) => format!(
            "<serial type='unix'><source mode='bind' path='{}'/>{log}<target port='0'/></serial>",
            escape(path)
        ),
        None => format!("<serial type='pty'>{log}<target port='0'/></serial>"),
    }
}

/// The edit that adds `text` as the last child of `element` (written `<e/>` or `<e>...</e>`).
fn append_child(edits: &mut Edits<'_>, element: Node<'_, '_>, text: String) {
    let range = element.range();
    let whole = &edits.text[range.clone()];
    if let Some(open) = whole.strip_suffix("/>") {
        let name = element.tag_name().name();
        edits.replace(range, format!("{open}>{text}</{name}>"));
    } else {
        let close = whole.rfind("</").map_or(range.end, |i| range.start + i);
        edits.insert(close, text);
    }
}

/// The edits that make `disk` a file-backed disk on `restored`'s image.
fn point_at_image(edits: &mut Edits<'_>, disk: Node<'_, '_>, restored: &RestoredDisk) {
    let file = escape(&restored.path);
    let kind = disk.attribute("type").unwrap_or("file");
    if kind != "file" {
        // A block device, network or pool volume disk becomes a file disk: its source and the
        // credentials of its old transport go.
        match disk.attributes().find(|a| a.name() == "type") {
            Some(attr) => edits.replace(attr.range(), "type='file'".to_owned()),
            None => edits.insert(after_tag_name(edits.text, disk), " type='file'".to_owned()),
        }
        for auth in children(disk, "auth") {
            edits.remove_element(auth);
        }
    }
    let source = child(disk, "source");
    match source {
        Some(src) if kind == "file" => match src.attributes().find(|a| a.name() == "file") {
            Some(attr) => edits.replace(attr.range(), format!("file='{file}'")),
            None => edits.insert(after_tag_name(edits.text, src), format!(" file='{file}'")),
        },
        Some(src) => edits.replace(src.range(), format!("<source file='{file}'/>")),
        None => {
            // A disk without media cannot have been backed up, but the target is known: put
            // the source before it.
            let at = child(disk, "target").map_or(disk.range().end, |t| t.range().start);
            edits.insert(at, format!("<source file='{file}'/>"));
        }
    }
    let format = escape(&restored.format);
    match child(disk, "driver") {
        Some(driver) => match driver.attributes().find(|a| a.name() == "type") {
            Some(attr) => edits.replace(attr.range(), format!("type='{format}'")),
            None => edits.insert(
                after_tag_name(edits.text, driver),
                format!(" type='{format}'"),
            ),
        },
        None => {
            let first = disk
                .children()
                .find(|n| n.is_element())
                .map_or(disk.range().end, |n| n.range().start);
            edits.insert(first, format!("<driver name='qemu' type='{format}'/>"));
        }
    }
    for backing in children(disk, "backingStore") {
        edits.remove_element(backing);
    }
}

/// Where an attribute can be inserted into `element`'s start tag: right after its name.
fn after_tag_name(text: &str, element: Node<'_, '_>) -> usize {
    let start = element.range().start + 1;
    let len = text[start..]
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(0);
    start + len
}

/// Replacements of byte ranges of the original text, applied at once.
struct Edits<'a> {
    text: &'a str,
    edits: Vec<(Range<usize>, String)>,
}

impl<'a> Edits<'a> {
    fn new(text: &'a str) -> Self {
        Edits {
            text,
            edits: Vec::new(),
        }
    }

    fn replace(&mut self, range: Range<usize>, with: String) {
        self.edits.push((range, with));
    }

    fn insert(&mut self, at: usize, text: String) {
        self.edits.push((at..at, text));
    }

    /// Removes `element` and the whitespace-only text just before it (its indentation).
    fn remove_element(&mut self, element: Node<'_, '_>) {
        let mut range = element.range();
        if let Some(prev) = element.prev_sibling()
            && prev.is_text()
            && prev.text().is_some_and(|t| t.trim().is_empty())
        {
            range.start = prev.range().start;
        }
        self.edits.push((range, String::new()));
    }

    /// The text with every edit made. Edits never overlap: each one is inside a different element
    /// or attribute, and a removed element's edits are not made (its subtree is not visited).
    fn apply(mut self) -> String {
        self.edits.sort_by_key(|(r, _)| (r.start, r.end));
        let mut out = String::with_capacity(self.text.len());
        let mut at = 0;
        for (range, with) in &self.edits {
            debug_assert!(range.start >= at, "overlapping edits at {range:?}");
            out.push_str(&self.text[at..range.start.max(at)]);
            out.push_str(with);
            at = at.max(range.end);
        }
        out.push_str(&self.text[at..]);
        out
    }
}

fn children<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
    node.children().filter(move |n| n.has_tag_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSource, parse_disks};

    #[test]
    fn without_network_removes_every_interface_and_nothing_else() {
        let xml = "<domain><name>a</name><devices>\n  <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>\n  <disk type='file'><target dev='vda'/></disk>\n  <interface type='bridge'><source bridge='br0'/></interface>\n</devices></domain>";
        let out = without_network(xml).unwrap();
        assert_eq!(
            out,
            "<domain><name>a</name><devices>\n  <disk type='file'><target dev='vda'/></disk>\n</devices></domain>"
        );
    }

    #[test]
    fn the_first_serial_port_is_replaced_and_the_original_s_files_go() {
        let serial = serial_element(Some("/s/c&.sock"), Some("/s/c.log"));
        assert_eq!(
            serial,
            "<serial type='unix'><source mode='bind' path='/s/c&amp;.sock'/><log file='/s/c.log' append='off'/><target port='0'/></serial>"
        );
        let original = "<domain><devices><serial type='unix'><source mode='bind' path='/orig.sock'/><log file='/orig.log'/><target port='0'/></serial><serial type='file'><source path='/orig2'/><target port='1'/></serial><serial type='pty'><target port='2'/></serial><console type='unix'><source mode='bind' path='/orig.sock'/><target type='serial' port='0'/></console><console type='pty'><target type='virtio' port='1'/></console></devices></domain>";
        assert_eq!(
            with_serial(original, &serial_element(None, Some("/c"))).unwrap(),
            "<domain><devices><serial type='pty'><log file='/c' append='off'/><target port='0'/></serial><serial type='pty'><target port='2'/></serial><console type='pty'><target type='virtio' port='1'/></console></devices></domain>"
        );
        let no_port = "<domain><devices><disk/></devices></domain>";
        assert_eq!(
            with_serial(no_port, "<serial/>").unwrap(),
            "<domain><devices><disk/><serial/></devices></domain>"
        );
        let no_devices = "<domain><name>a</name></domain>";
        assert_eq!(
            with_serial(no_devices, "<serial/>").unwrap(),
            "<domain><name>a</name><devices><serial/></devices></domain>"
        );
        let empty_devices = "<domain><devices/></domain>";
        assert_eq!(
            with_serial(empty_devices, "<serial/>").unwrap(),
            "<domain><devices><serial/></devices></domain>"
        );
        assert!(matches!(
            with_serial("<domain>", "<serial/>"),
            Err(DefinitionError::Malformed(_))
        ));
    }

    /// An inactive definition as libvirt writes it, with one disk of each kind a restore meets.
    const BACKED_UP: &str = r#"<domain type='kvm'>
  <name>web01</name>
  <uuid>5b7ad3a1-2f8c-4c4e-9d0e-3c1f1a2b3c4d</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <memory unit='KiB'>1048576</memory>
  <!-- kept as it is -->
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type="block" device="disk">
      <driver name="qemu" type="raw" cache="none"/>
      <source dev="/dev/vg0/web01-data"/>
      <target dev="vdb" bus="virtio"/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='libvirt'><secret type='ceph' usage='ceph'/></auth>
      <source protocol='rbd' name='pool/web01-logs'><host name='mon1' port='6789'/></source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01-scratch.qcow2'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"#;

    fn restored(target: &str, path: &str, format: &str) -> RestoredDisk {
        RestoredDisk {
            target: target.into(),
            path: path.into(),
            format: format.into(),
        }
    }

    #[test]
    fn restored_disks_point_at_their_images_and_the_rest_is_left_out() {
        let new = new_definition(
            BACKED_UP,
            "web01-restored",
            &[
                restored("vda", "/srv/restore/vda.raw", "raw"),
                restored("vdb", "/srv/restore/vdb.qcow2", "qcow2"),
                restored("vdc", "/srv/restore/vdc.qcow2", "qcow2"),
            ],
        )
        .unwrap();
        let disks = parse_disks(&new.xml).unwrap();
        let got: Vec<_> = disks
            .iter()
            .map(|d| {
                (
                    d.target.as_str(),
                    d.device.as_str(),
                    d.format.as_deref(),
                    d.source.clone(),
                )
            })
            .collect();
        let file = |p: &str| DiskSource::File { path: p.into() };
        assert_eq!(
            got,
            vec![
                ("vda", "disk", Some("raw"), file("/srv/restore/vda.raw")),
                ("vdb", "disk", Some("qcow2"), file("/srv/restore/vdb.qcow2")),
                ("vdc", "disk", Some("qcow2"), file("/srv/restore/vdc.qcow2")),
                ("sda", "cdrom", Some("raw"), file("/srv/iso/debian.iso")),
            ],
            "{}",
            new.xml
        );
        assert_eq!(new.notes.len(), 1, "{:?}", new.notes);
        assert!(
            new.notes[0].contains("`vdd` was not restored")
                && new.notes[0].contains("/var/lib/libvirt/images/web01-scratch.qcow2"),
            "{:?}",
            new.notes
        );

        let doc = roxmltree::Document::parse(&new.xml).unwrap();
        let root = doc.root_element();
        assert_eq!(child(root, "name").unwrap().text(), Some("web01-restored"));
        assert!(child(root, "uuid").is_none(), "{}", new.xml);
        assert_eq!(child(root, "genid").unwrap().text(), None, "{}", new.xml);
        for gone in [
            "52:54:00",
            "backingStore",
            "base.qcow2",
            "web01.qcow2",
            "/dev/vg0",
            "rbd",
            "<auth",
            "scratch",
        ] {
            assert!(!new.xml.contains(gone), "`{gone}` is left in:\n{}", new.xml);
        }
        // What the restore does not concern stays as it was, down to the quotes and comments.
        for kept in [
            "<driver name='qemu' type='raw' discard='unmap'/>",
            "<driver name=\"qemu\" type='qcow2' cache=\"none\"/>",
            "<!-- kept as it is -->",
            "<memory unit='KiB'>1048576</memory>",
            "<interface type='network'>\n      <source network='default'/>",
        ] {
            assert!(new.xml.contains(kept), "`{kept}` is not in:\n{}", new.xml);
        }
    }

    #[test]
    fn only_the_name_uuid_and_macs_change_when_there_is_nothing_else_to_do() {
        let xml = "<domain type='kvm'>\n  <name>a</name>\n  <uuid>x</uuid>\n  <devices>\n    \
                   <interface type='bridge'>\n      <mac address='52:54:00:00:00:01'/>\n      \
                   <source bridge='br0'/>\n    </interface>\n    <disk type='file' device='cdrom'>\
                   <target dev='hdc'/></disk>\n  </devices>\n</domain>";
        let new = new_definition(xml, "b&<c>", &[]).unwrap();
        assert_eq!(
            new.xml,
            "<domain type='kvm'>\n  <name>b&amp;&lt;c&gt;</name>\n  <devices>\n    \
             <interface type='bridge'>\n      <source bridge='br0'/>\n    </interface>\n    \
             <disk type='file' device='cdrom'><target dev='hdc'/></disk>\n  </devices>\n</domain>"
        );
        assert!(new.notes.is_empty());
        assert_eq!(
            roxmltree::Document::parse(&new.xml)
                .unwrap()
                .root_element()
                .children()
                .find(|n| n.has_tag_name("name"))
                .unwrap()
                .text(),
            Some("b&<c>")
        );
    }

    #[test]
    fn missing_driver_source_and_type_are_added() {
        let xml = "<domain><name>a</name><devices><disk device='disk'>\
                   <target dev='vda'/></disk></devices></domain>";
        let new = new_definition(xml, "b", &[restored("vda", "/r/it's.qcow2", "qcow2")]).unwrap();
        let disks = parse_disks(&new.xml).unwrap();
        assert_eq!(disks[0].format.as_deref(), Some("qcow2"), "{}", new.xml);
        assert_eq!(
            disks[0].source,
            DiskSource::File {
                path: "/r/it's.qcow2".into()
            },
            "{}",
            new.xml
        );
    }

    #[test]
    fn errors_say_what_was_expected() {
        let vda = [restored("vda", "/r/vda.raw", "raw")];
        for (xml, name, disks, wanted) in [
            ("<domain><name>a</name>", "b", &vda[..], "not well formed"),
            (
                "<network><name>a</name></network>",
                "b",
                &vda[..],
                "expected <domain>",
            ),
            ("<domain></domain>", "b", &vda[..], "expected a <name>"),
            (
                "<domain><name>a</name></domain>",
                " ",
                &vda[..],
                "must not be empty",
            ),
            (
                BACKED_UP,
                "b",
                &[restored("vdz", "/r", "raw")][..],
                "expected a <disk> with <target dev='vdz'>",
            ),
            (
                BACKED_UP,
                "b",
                &[restored("sda", "/r", "raw")][..],
                "is a `cdrom`",
            ),
            (
                BACKED_UP,
                "b",
                &[restored("vda", "/r", "vmdk")][..],
                "expected format qcow2 or raw, got `vmdk`",
            ),
            (
                "<domain><name>a</name><devices><disk><source file='/x'/></disk></devices></domain>",
                "b",
                &vda[..],
                "<disk> number 1",
            ),
        ] {
            let err = new_definition(xml, name, disks).unwrap_err().to_string();
            assert!(err.contains(wanted), "{xml}: {err}");
        }
        let err = new_definition(BACKED_UP, "b", &[restored("vdz", "/r", "raw")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("it has: vda, vdb, vdc, vdd, sda"), "{err}");
    }
}
