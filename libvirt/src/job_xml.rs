//! The XML of pull-mode backup jobs and checkpoints (libvirt's formats:
//! <https://libvirt.org/formatbackup.html>, <https://libvirt.org/formatcheckpoint.html>): written
//! for [`backup::begin_backup`](crate::backup::begin_backup), read back from
//! [`backup::backup_xml`](crate::backup::backup_xml) and
//! [`backup::checkpoint_xml`](crate::backup::checkpoint_xml).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How one disk takes part in a backup job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskMode {
    /// Exported whole (`backupmode='full'`).
    Full,
    /// Exported whole, with the changes since the checkpoint as a dirty bitmap
    /// (`backupmode='incremental' incremental='NAME'`).
    Incremental(String),
}

/// One disk of a job to begin.
#[derive(Clone, Debug)]
pub struct JobDisk {
    /// The target (`vda`).
    pub target: String,
    pub mode: DiskMode,
    /// Where libvirt keeps the copy-before-write data while the job runs (deleted when it ends).
    pub scratch: PathBuf,
}

/// `<domainbackup mode='pull'>` exporting `disks` over NBD on the unix socket `socket`. Every disk of
/// the domain that is not listed is left out of the job (`backup='no'`).
pub fn pull_backup(socket: &Path, disks: &[JobDisk], skipped: &[String]) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>\n");
    let _ = writeln!(
        xml,
        "  <server transport='unix' socket='{}'/>",
        escape(&socket.to_string_lossy())
    );
    xml.push_str("  <disks>\n");
    for disk in disks {
        let mode = match &disk.mode {
            DiskMode::Full => "backupmode='full'".to_owned(),
            DiskMode::Incremental(from) => {
                format!("backupmode='incremental' incremental='{}'", escape(from))
            }
        };
        let _ = writeln!(
            xml,
            "    <disk name='{}' backup='yes' type='file' {mode}>\n      <scratch file='{}'/>\n    </disk>",
            escape(&disk.target),
            escape(&disk.scratch.to_string_lossy())
        );
    }
    for target in skipped {
        let _ = writeln!(xml, "    <disk name='{}' backup='no'/>", escape(target));
    }
    xml.push_str("  </disks>\n</domainbackup>\n");
    xml
}

/// `<domaincheckpoint>` named `name`, with a bitmap in each of `bitmaps` and none in `without`.
pub fn checkpoint(name: &str, bitmaps: &[String], without: &[String]) -> String {
    let mut xml = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        escape(name)
    );
    for target in bitmaps {
        let _ = writeln!(
            xml,
            "    <disk name='{}' checkpoint='bitmap'/>",
            escape(target)
        );
    }
    for target in without {
        let _ = writeln!(xml, "    <disk name='{}' checkpoint='no'/>", escape(target));
    }
    xml.push_str("  </disks>\n</domaincheckpoint>\n");
    xml
}

/// A running job as libvirt describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunningJob {
    /// The NBD server's unix socket (`None`: a TCP server, or a push-mode job).
    pub socket: Option<PathBuf>,
    pub disks: Vec<ExportedDisk>,
}

/// A disk exported by a running pull-mode job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedDisk {
    pub target: String,
    /// The NBD export name.
    pub export: String,
    /// The dirty bitmap exported with it (incremental disks), read through the
    /// `qemu:dirty-bitmap:NAME` meta context.
    pub bitmap: Option<String>,
    /// The checkpoint an incremental disk's changes are counted from.
    pub incremental: Option<String>,
}

/// Reads [`backup_xml`](crate::backup::backup_xml)'s answer.
pub fn parse_running_job(xml: &str) -> Result<RunningJob, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if !root.has_tag_name("domainbackup") {
        return Err(format!(
            "expected <domainbackup>, found <{}>",
            root.tag_name().name()
        ));
    }
    let socket = root
        .children()
        .find(|n| n.has_tag_name("server"))
        .filter(|s| s.attribute("transport") == Some("unix"))
        .and_then(|s| s.attribute("socket"))
        .map(PathBuf::from);
    let disks = root
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("backup") != Some("no"))
        .filter_map(|d| {
            let target = d.attribute("name")?.to_owned();
            Some(ExportedDisk {
                export: d.attribute("exportname").unwrap_or(&target).to_owned(),
                bitmap: d.attribute("exportbitmap").map(str::to_owned),
                incremental: d.attribute("incremental").map(str::to_owned),
                target,
            })
        })
        .collect();
    Ok(RunningJob { socket, disks })
}

/// The disks a checkpoint (from [`checkpoint_xml`](crate::backup::checkpoint_xml)) holds a bitmap
/// for.
pub fn checkpoint_bitmap_disks(xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("checkpoint") == Some("bitmap"))
        .filter_map(|d| d.attribute("name").map(str::to_owned))
        .collect())
}

/// `s` with XML's special characters escaped, for attribute values and text.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_backup_lists_modes_and_escapes() {
        let xml = pull_backup(
            Path::new("/run/b'f/sock"),
            &[
                JobDisk {
                    target: "vda".into(),
                    mode: DiskMode::Incremental("backflow.1".into()),
                    scratch: "/run/bf/vda.scratch".into(),
                },
                JobDisk {
                    target: "vdb".into(),
                    mode: DiskMode::Full,
                    scratch: "/run/bf/vdb.scratch".into(),
                },
            ],
            &["vdc".into()],
        );
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let server = doc
            .descendants()
            .find(|n| n.has_tag_name("server"))
            .unwrap();
        assert_eq!(server.attribute("socket"), Some("/run/b'f/sock"));
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .map(|d| {
                (
                    d.attribute("name").unwrap(),
                    d.attribute("backup").unwrap(),
                    d.attribute("backupmode"),
                    d.attribute("incremental"),
                )
            })
            .collect();
        assert_eq!(
            disks,
            [
                ("vda", "yes", Some("incremental"), Some("backflow.1")),
                ("vdb", "yes", Some("full"), None),
                ("vdc", "no", None, None),
            ]
        );
    }

    #[test]
    fn running_job_and_checkpoint_are_read_back() {
        // As libvirt 9.0 answers virDomainBackupGetXMLDesc.
        let xml = "<domainbackup mode='pull'>
  <server transport='unix' socket='/tmp/x/sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='backflow.a' exportname='vda' exportbitmap='backup-vda' index='3'>
      <driver type='qcow2'/>
      <scratch file='/tmp/x/vda.scratch'/>
    </disk>
    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' index='4'/>
    <disk name='vdc' backup='no'/>
  </disks>
</domainbackup>";
        let job = parse_running_job(xml).unwrap();
        assert_eq!(job.socket.as_deref(), Some(Path::new("/tmp/x/sock")));
        assert_eq!(
            job.disks,
            [
                ExportedDisk {
                    target: "vda".into(),
                    export: "vda".into(),
                    bitmap: Some("backup-vda".into()),
                    incremental: Some("backflow.a".into()),
                },
                ExportedDisk {
                    target: "vdb".into(),
                    export: "vdb".into(),
                    bitmap: None,
                    incremental: None,
                },
            ]
        );
        assert!(parse_running_job("<domain/>").is_err());

        let cp = checkpoint("backflow.b", &["vda".into()], &["vdb".into()]);
        assert_eq!(checkpoint_bitmap_disks(&cp).unwrap(), ["vda"]);
    }
}
