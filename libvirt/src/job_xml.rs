//! The XML of pull-mode backup jobs and checkpoints (libvirt's formats:
//! <https://libvirt.org/formatbackup.html>, <https://libvirt.org/formatcheckpoint.html>): written
//! for [`backup::begin_backup`](crate::backup::begin_backup), read back from
//! [`backup::backup_xml`](crate::backup::backup_xml) and
//! [`backup::checkpoint_xml`](crate::backup::checkpoint_xml).

use std::fmt::Write as _;
use std::path::PathBuf;

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
    /// Where libvirt keeps the copy-before-write data while the job runs (deleted when it ends);
    /// `None`: libvirt's choice, in its own directory on the VM's host.
    ///
    /// libvirt 9.0 refuses `None` for a pull-mode job: its schema (domainbackup.rng, which
    /// `virDomainBackupBegin` always validates against) wants `type` next to `backup='yes'`, and
    /// with `type='file'` but no `<scratch>` QEMU's blockdev gets no file name ("argument key
    /// 'filename' must not have null value"); only disks left out of `<disks>` get a generated
    /// scratch name. A job on another host needs a path on that host.
    pub scratch: Option<PathBuf>,
}

/// Where the job's NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket on the VM's host.
    Unix(PathBuf),
    /// TCP: `host` is the address QEMU listens on and clients connect to. With `tls`
    /// (`<server ... tls='yes'/>`) QEMU requires NBD_OPT_STARTTLS and, with
    /// `backup_tls_x509_verify = 1` (libvirt's default), a client certificate signed by the CA of
    /// `backup_tls_x509_cert_dir` in the host's qemu.conf; its server certificate must name `host`.
    Tcp { host: String, port: u16, tls: bool },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(socket) => write!(f, "unix:{}", socket.display()),
            Endpoint::Tcp {
                host,
                port,
                tls: false,
            } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Tcp {
                host,
                port,
                tls: true,
            } => write!(f, "tcp+tls:{host}:{port}"),
        }
    }
}

/// `<domainbackup mode='pull'>` exporting `disks` over NBD at `endpoint`. Every disk of the domain
/// in `skipped` is left out of the job (`backup='no'`).
pub fn pull_backup(endpoint: &Endpoint, disks: &[JobDisk], skipped: &[String]) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>\n");
    let _ = match endpoint {
        Endpoint::Unix(socket) => writeln!(
            xml,
            "  <server transport='unix' socket='{}'/>",
            escape(&socket.to_string_lossy())
        ),
        Endpoint::Tcp { host, port, tls } => writeln!(
            xml,
            "  <server transport='tcp'{} name='{}' port='{port}'/>",
            if *tls { " tls='yes'" } else { "" },
            escape(host)
        ),
    };
    xml.push_str("  <disks>\n");
    for disk in disks {
        let mode = match &disk.mode {
            DiskMode::Full => "backupmode='full'".to_owned(),
            DiskMode::Incremental(from) => {
                format!("backupmode='incremental' incremental='{}'", escape(from))
            }
        };
        let _ = match &disk.scratch {
            Some(scratch) => writeln!(
                xml,
                "    <disk name='{}' backup='yes' type='file' {mode}>\n      <scratch file='{}'/>\n    </disk>",
                escape(&disk.target),
                escape(&scratch.to_string_lossy())
            ),
            None => writeln!(
                xml,
                "    <disk name='{}' backup='yes' {mode}/>",
                escape(&disk.target)
            ),
        };
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

/// `<domaincheckpoint>` redefining checkpoint `name`, made at `created` (Unix seconds; libvirt
/// requires a creation time to redefine), whose bitmap, named after it, is in each of `bitmaps`
/// (see [`crate::backup::redefine_checkpoint`]). No `<domain>`: libvirt needs none to count
/// changes from a checkpoint, only the checkpoint's name and each disk's bitmap.
pub fn redefined_checkpoint(name: &str, created: i64, bitmaps: &[String]) -> String {
    let mut xml = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <creationTime>{created}</creationTime>\n  <disks>\n",
        escape(name)
    );
    for target in bitmaps {
        let _ = writeln!(
            xml,
            "    <disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
            escape(target),
            escape(name)
        );
    }
    xml.push_str("  </disks>\n</domaincheckpoint>\n");
    xml
}

/// A running job as libvirt describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunningJob {
    /// Where the NBD server listens (`None`: a push-mode job).
    pub endpoint: Option<Endpoint>,
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
    /// Where libvirt keeps the disk's copy-before-write data while the job runs.
    pub scratch: Option<PathBuf>,
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
    let endpoint = root
        .children()
        .find(|n| n.has_tag_name("server"))
        .and_then(|s| match s.attribute("transport").unwrap_or("tcp") {
            "unix" => s.attribute("socket").map(|p| Endpoint::Unix(p.into())),
            "tcp" => Some(Endpoint::Tcp {
                host: s.attribute("name")?.to_owned(),
                port: s.attribute("port")?.parse().ok()?,
                // libvirt writes the attribute as given (absent, 'yes' or 'no'): only 'yes' is TLS.
                tls: s.attribute("tls") == Some("yes"),
            }),
            _ => None,
        });
    let disks = root
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("backup") != Some("no"))
        .filter_map(|d| {
            let target = d.attribute("name")?.to_owned();
            Some(ExportedDisk {
                export: d.attribute("exportname").unwrap_or(&target).to_owned(),
                bitmap: d.attribute("exportbitmap").map(str::to_owned),
                incremental: d.attribute("incremental").map(str::to_owned),
                scratch: d
                    .children()
                    .find(|n| n.has_tag_name("scratch"))
                    .and_then(|n| n.attribute("file"))
                    .map(PathBuf::from),
                target,
            })
        })
        .collect();
    Ok(RunningJob { endpoint, disks })
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

/// `s` with XML's special characters escaped, for attribute values (in either quotes) and text.
pub(crate) fn escape(s: &str) -> String {
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
            &Endpoint::Unix("/run/b'f/sock".into()),
            &[
                JobDisk {
                    target: "vda".into(),
                    mode: DiskMode::Incremental("backflow.1".into()),
                    scratch: Some("/run/bf/vda.scratch".into()),
                },
                JobDisk {
                    target: "vdb".into(),
                    mode: DiskMode::Full,
                    scratch: None,
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
        assert_eq!(job.endpoint, Some(Endpoint::Unix("/tmp/x/sock".into())));
        assert_eq!(
            job.disks,
            [
                ExportedDisk {
                    target: "vda".into(),
                    export: "vda".into(),
                    bitmap: Some("backup-vda".into()),
                    incremental: Some("backflow.a".into()),
                    scratch: Some("/tmp/x/vda.scratch".into()),
                },
                ExportedDisk {
                    target: "vdb".into(),
                    export: "vdb".into(),
                    bitmap: None,
                    incremental: None,
                    scratch: None,
                },
            ]
        );
        assert!(parse_running_job("<domain/>").is_err());
        let tcp = parse_running_job(
            "<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='10809'/></domainbackup>",
        )
        .unwrap();
        assert_eq!(
            tcp.endpoint,
            Some(Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
                tls: false,
            })
        );
        let xml = pull_backup(
            &Endpoint::Tcp {
                host: "kvm1".into(),
                port: 10900,
                tls: false,
            },
            &[],
            &[],
        );
        assert!(
            xml.contains("<server transport='tcp' name='kvm1' port='10900'/>"),
            "{xml}"
        );

        let cp = checkpoint("backflow.b", &["vda".into()], &["vdb".into()]);
        assert_eq!(checkpoint_bitmap_disks(&cp).unwrap(), ["vda"]);

        let cp = redefined_checkpoint("backflow.<1>", 1_700_000_000, &["vda".into(), "vdb".into()]);
        assert!(
            cp.contains("<name>backflow.&lt;1&gt;</name>")
                && cp.contains("<creationTime>1700000000</creationTime>")
                && cp
                    .contains("<disk name='vdb' checkpoint='bitmap' bitmap='backflow.&lt;1&gt;'/>"),
            "{cp}"
        );
        assert_eq!(checkpoint_bitmap_disks(&cp).unwrap(), ["vda", "vdb"]);
    }

    #[test]
    fn tls_endpoints_are_written_and_read_back() {
        let tls = Endpoint::Tcp {
            host: "10.77.3.11".into(),
            port: 10809,
            tls: true,
        };
        let xml = pull_backup(
            &tls,
            &[JobDisk {
                target: "vda".into(),
                mode: DiskMode::Full,
                scratch: None,
            }],
            &[],
        );
        assert!(
            xml.contains("<server transport='tcp' tls='yes' name='10.77.3.11' port='10809'/>"),
            "{xml}"
        );
        assert_eq!(parse_running_job(&xml).unwrap().endpoint, Some(tls.clone()));
        assert_eq!(tls.to_string(), "tcp+tls:10.77.3.11:10809");

        // As libvirt 9.0 formats a running job begun with tls='yes' (backup_conf.c writes tls
        // right after transport), and with an explicit tls='no'.
        let running = "<domainbackup mode='pull'>
  <server transport='tcp' tls='yes' name='10.77.3.11' port='10809'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='full' exportname='vda' index='1'/>
  </disks>
</domainbackup>";
        let job = parse_running_job(running).unwrap();
        assert_eq!(job.endpoint, Some(tls));
        assert_eq!(job.disks.len(), 1);
        let plain = parse_running_job(
            "<domainbackup mode='pull'><server transport='tcp' tls='no' name='h1' port='1'/></domainbackup>",
        )
        .unwrap();
        assert_eq!(
            plain.endpoint,
            Some(Endpoint::Tcp {
                host: "h1".into(),
                port: 1,
                tls: false,
            })
        );
    }

    #[test]
    fn checkpoint_lists_bitmap_disks() {
        let cp = checkpoint("backflow.b", &["vda".into()], &["vdb".into()]);
        assert_eq!(checkpoint_bitmap_disks(&cp).unwrap(), ["vda"]);
    }
}
