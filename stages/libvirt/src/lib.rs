//! Snapshot stage `libvirt`: every disk of one libvirt VM, as one point-in-time view, read over NBD.
//!
//! # A running VM: a pull-mode backup job
//! The stage asks libvirt for a pull-mode backup job (`virDomainBackupBegin`) covering the chosen
//! disks. QEMU then exports each disk over NBD, as it was at the instant the job began: guest
//! writes made while we read go to the disk, and the data they overwrite is first copied to a
//! scratch file (copy-before-write), so what we read never changes. All disks share that instant.
//! At the same instant the job creates a checkpoint `PREFIX.TOKEN` (`checkpoint` option): a
//! persistent dirty bitmap in each qcow2 disk that records every later guest write.
//!
//! With `freeze` (default `auto`) the guest's filesystems are frozen through the QEMU guest agent
//! for the instant the job begins, and thawed right after: the backup is then consistent as the
//! filesystems see it. Without an agent the run goes on crash-consistent, with a note in the
//! report (not a warning: a VM without an agent is normal, and a warning would mail every night;
//! `freeze: required` fails instead; `off` does not ask).
//!
//! # Changed blocks
//! Each disk carries a [`CheckpointTracking`] for the map stage
//! (`libvirt-checkpoint`). The job is begun incremental per disk: from the checkpoint the
//! parent snapshot recorded, when [`tracking::base_for`] trusts it (same VM UUID, host, image
//! and size, the checkpoint still there with a bitmap of the disk); QEMU then exports the changes
//! since as the `qemu:dirty-bitmap:backup-DISK` context. Any doubt begins that disk full instead,
//! and the map stage reads all of it, deduplicated against the parent, with the reason as a
//! warning. Disks never share a fate: one resized disk is read whole while the others stay
//! incremental.
//!
//! libvirt keeps a checkpoint's metadata on the host that made it; its bitmaps live in the qcow2
//! images. When the VM moved to another host since the parent snapshot (or libvirt here no longer
//! knows the checkpoint), the recorded checkpoint is redefined on this host from the snapshot's
//! record (`virDomainCheckpointCreateXML` with `REDEFINE`, and `REDEFINE_VALIDATE` on a running
//! VM: libvirt checks each disk's bitmap in its image; a shut-off VM's images are read here): the
//! disks whose bitmaps survived stay incremental, with a note; the others are read whole,
//! deduplicated against the parent, with a warning that the VM moved and lost them.
//!
//! The new checkpoint becomes the base only once the snapshot is committed (the repository
//! writer tells the tracking). Then the cleanup deletes every older `PREFIX.*` checkpoint, which
//! no future run needs (each bitmap costs the guest some write speed). A run that fails, is
//! cancelled or killed keeps the parent's checkpoint as the base: its own checkpoint is deleted
//! by its cleanup, or, if it was killed, by the next successful run.
//!
//! # A shut-off VM: the offline path
//! libvirt cannot back up, nor create checkpoints of, an inactive VM. The stage then reads the
//! disk images directly through a private read-only `qemu-nbd` per disk (on the VM's host only).
//! The checkpoint bitmaps libvirt left in the qcow2 images still hold every write since their
//! checkpoint: the parent's checkpoint bitmap is exported (`-B`) and answers for the changes,
//! under the same rules. The chain does not move: nothing can write to the disks while the VM is
//! off (and `qemu-nbd` holds the images' lock, so the VM cannot start while we read), so the
//! snapshot records the same checkpoint as its parent, and the next run counts from there.
//!
//! # Cleanup
//! One cleanup action, registered before the job begins, runs whatever happens (success,
//! failure, SIGINT/SIGTERM, the VM gone): it aborts the job if it is still there (libvirt then
//! removes the socket and scratch files), settles the checkpoints as above, and removes the job
//! directory. A run killed with SIGKILL leaves its job running on the VM: the next run of the same
//! VM finds it by its directory (whose owner is gone), aborts it and says so in a warning. On the
//! VM's host a job whose directory is gone is still known as ours: libvirt's description of it
//! names its socket and scratch files, in a directory named as ours ([`job::of_job`]).
//!
//! # libvirtd restarting mid-backup
//! The reads go to QEMU, which keeps exporting when libvirtd restarts; the restarted daemon takes
//! the job over (libvirt 9.0 does), and our connection breaks. A backup is committed only if its
//! job outlived the reads: the source's `finish`, which runs before the repository writer
//! commits, asks libvirt for the job, connecting again if it must ([`live::LiveDomain`]). Every
//! read succeeded, and came from the job's view as long as the job ran (libvirt removes the
//! export, and QEMU drops its clients, only when the job ends): so a job still there vouches for
//! the data, and the run commits with a warning that the connection broke. A job that is gone,
//! or a libvirt that does not answer again, vouches for nothing: the run fails and commits
//! nothing. The cleanup ends the job through the new connection; when it cannot reach libvirt, it
//! keeps the job directory (saying why, in `left`) so that the next run ends the job.
//!
//! # Layout
//! - [`tracking`]: the chain rules and the [`ChangeTracking`].
//! - [`job`]: the job's private directory and finding the jobs of killed runs.
//! - [`live`]: the VM's handle that survives a libvirtd restart.

pub mod job;
pub mod live;
pub mod tracking;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use backflow_libvirt::backup;
use backflow_libvirt::job_xml::{self, DiskMode, Endpoint, JobDisk};
use backflow_libvirt::{Connection, DiskInfo, LibvirtError, VmInfo};
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::hooks::{PAUSE_AFTER_SNAPSHOT, pause_at};
use backflow_pipeline::{
    BlockSource, ChangeTracking, DiskSource, InvalidOption, Message, MessageType, RunContext,
    Stage, StageError, StageIo, Work, Worker,
};
use backflow_qemu::{NbdAddress, NbdExport, QemuNbdServer, ServerConfig, ServerDir};
use serde::{Deserialize, Serialize};
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::job::{JobDir, Owner};
use crate::live::LiveDomain;
use crate::tracking::{CheckpointTracking, Checkpoints, Committed, DiskNow, METHOD, State};

pub const KIND: &str = "libvirt";

/// Default number of NBD connections per disk: one per reader worker of the shipped spec.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Values of the `freeze` option.
pub const FREEZE: &[&str] = &["auto", "off", "required"];

/// Options of the `libvirt` source.
#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct LibvirtOptions {
    /// The VM's name (required).
    #[serde(default)]
    pub domain: String,
    /// libvirt connection URI (such as qemu:///system); empty: libvirt's default.
    #[serde(default)]
    pub uri: String,
    /// The disks to back up, by target (`vda`); empty: every disk of device type `disk`.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Name prefix of the checkpoints (`PREFIX.TOKEN`); empty: none, every run reads everything.
    #[serde(default = "default_checkpoint")]
    pub checkpoint: String,
    /// Freeze the guest's filesystems through the guest agent: auto (warn when none answers), off
    /// or required.
    #[serde(default = "default_freeze")]
    pub freeze: String,
    /// Where the job's private directory (NBD socket, scratch files) is made; unset: the system's
    /// temporary directory.
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// How the job's NBD server is reached: unix (a socket, backflow on the VM's host), tls (TCP
    /// with TLS: libvirt's backup TLS environment on the VM's host, `tls_ca`, `tls_cert` and
    /// `tls_key` here), or tcp (plain NBD, no TLS: a trusted network only).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// tcp: the address QEMU listens on and backflow connects to; empty: 127.0.0.1 on a local
    /// connection, else the VM's host as libvirt names it.
    #[serde(default)]
    pub host: String,
    /// tcp: the port QEMU listens on (libvirt 9.0 needs one).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Most NBD connections open at once, per disk.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// tls: the CA that signed the VM's host's server certificate (which must name `host`).
    #[serde(default)]
    pub tls_ca: String,
    /// tls: the client certificate presented to the host (libvirt's `backup_tls_x509_verify`).
    #[serde(default)]
    pub tls_cert: String,
    /// tls: the client certificate's private key.
    #[serde(default)]
    pub tls_key: String,
    /// Take over from a lost run: a backup job on the VM that a backflow run began (its socket or
    /// scratch files say so) is aborted even when that run cannot be seen from here. A cluster's
    /// controller sets it when it retries a VM whose worker died or dropped off the network.
    #[serde(default)]
    pub take_over: bool,
}

fn default_checkpoint() -> String {
    "backflow".to_owned()
}

fn default_freeze() -> String {
    "auto".to_owned()
}

fn default_connections() -> usize {
    DEFAULT_CONNECTIONS
}

fn default_transport() -> String {
    "unix".to_owned()
}

/// Where a job begun on another host keeps its scratch files (copy-before-write data), on the VM's
/// host: a directory every Linux host has, kept across reboots, writable by libvirt.
pub const REMOTE_SCRATCH_DIR: &str = "/var/tmp";

/// NBD's registered port.
pub const DEFAULT_PORT: u16 = 10809;

fn default_port() -> u16 {
    DEFAULT_PORT
}

/// Values of the `transport` option.
pub const TRANSPORTS: &[&str] = &["unix", "tls", "tcp"];

impl Default for LibvirtOptions {
    fn default() -> Self {
        LibvirtOptions {
            domain: String::new(),
            uri: String::new(),
            disks: Vec::new(),
            checkpoint: default_checkpoint(),
            freeze: default_freeze(),
            socket_dir: None,
            transport: default_transport(),
            host: String::new(),
            port: DEFAULT_PORT,
            connections: DEFAULT_CONNECTIONS,
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            take_over: false,
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "snapshot source: every disk of a libvirt VM at one instant: a pull-mode backup job with a checkpoint `CHECKPOINT.TOKEN` when it runs, a private qemu-nbd per image when it is shut off; the job is ended, scratch files and sockets removed, whatever the outcome",
    input: None,
    output: Some(MessageType::Disk),
    repository: RepositoryUse::No,
    options: option_docs::<LibvirtOptions>,
    build: Build::Stage(|options| build_stage(options, LibvirtSource::new)),
};

/// The runtime value: connects to libvirt when the run starts.
#[derive(Debug)]
pub struct LibvirtSource {
    domain: String,
    uri: Option<String>,
    disks: Vec<String>,
    checkpoint: Option<String>,
    freeze: String,
    socket_dir: PathBuf,
    /// The job's NBD server on TCP (host, port), with TLS when set.
    tcp: Option<(String, u16, Option<Arc<backflow_qemu::TlsSettings>>)>,
    connections: usize,
    /// Abort a backflow-made job on the VM whatever its run ([`LibvirtOptions::take_over`]).
    take_over: bool,
    /// The running VM's job of this run, for the check before the commit.
    job: Mutex<Option<Arc<OnlineJob>>>,
}

impl LibvirtSource {
    pub fn new(options: LibvirtOptions) -> Result<Self, InvalidOption> {
        if options.domain.is_empty() {
            return Err(InvalidOption::new(
                "domain",
                "is required: the name of the VM to back up",
            ));
        }
        backflow_repository::check_vm_name(&options.domain)
            .map_err(|e| InvalidOption::new("domain", e.to_string()))?;
        for target in &options.disks {
            backflow_repository::check_disk_name(target)
                .map_err(|e| InvalidOption::new("disks", e.to_string()))?;
        }
        if !FREEZE.contains(&options.freeze.as_str()) {
            return Err(InvalidOption::new(
                "freeze",
                format!("`{}` is not one of: {}", options.freeze, FREEZE.join(", ")),
            ));
        }
        let checkpoint = match options.checkpoint.as_str() {
            "" => None,
            prefix => {
                if prefix.len() > 64
                    || !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(InvalidOption::new(
                        "checkpoint",
                        format!(
                            "`{prefix}` is not a checkpoint prefix: use at most 64 letters, digits, - and _"
                        ),
                    ));
                }
                Some(prefix.to_owned())
            }
        };
        if options.connections == 0 {
            return Err(InvalidOption::new("connections", "must be at least 1"));
        }
        let tcp = match options.transport.as_str() {
            "unix" => None,
            "tcp" | "tls" if options.port == 0 => {
                return Err(InvalidOption::new("port", "must be 1..65535"));
            }
            "tcp" => Some((options.host, options.port, None)),
            "tls" => {
                for (name, value) in [
                    ("tls_ca", &options.tls_ca),
                    ("tls_cert", &options.tls_cert),
                    ("tls_key", &options.tls_key),
                ] {
                    if !value.starts_with('/') {
                        return Err(InvalidOption::new(
                            name,
                            "transport tls needs the absolute path of a PEM file here",
                        ));
                    }
                }
                let tls = backflow_qemu::TlsSettings::new(
                    &options.tls_ca,
                    &options.tls_cert,
                    &options.tls_key,
                );
                Some((options.host, options.port, Some(Arc::new(tls))))
            }
            other => {
                return Err(InvalidOption::new(
                    "transport",
                    format!("`{other}` is not one of: {}", TRANSPORTS.join(", ")),
                ));
            }
        };
        Ok(LibvirtSource {
            domain: options.domain,
            uri: Some(options.uri).filter(|u| !u.is_empty()),
            disks: options.disks,
            checkpoint,
            freeze: options.freeze,
            socket_dir: options
                .socket_dir
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(std::env::temp_dir),
            tcp,
            connections: options.connections,
            take_over: options.take_over,
            job: Mutex::default(),
        })
    }

    /// The disks to read: every backup candidate, or those named in `disks` (each must exist).
    /// The VM's name and the targets read from its XML become names in the manifest (and file names
    /// at restore): one outside their alphabet fails the run before anything is read.
    fn chosen<'a>(&self, vm: &'a VmInfo) -> Result<Vec<&'a DiskInfo>, StageError> {
        let chosen = self.chosen_unchecked(vm)?;
        backflow_repository::check_vm_name(&vm.name)
            .map_err(|e| StageError::Config(format!("cannot back up this VM: {e}")))?;
        for disk in &chosen {
            backflow_repository::check_disk_name(&disk.target).map_err(|e| {
                StageError::Config(format!(
                    "VM {}: cannot back up the disk whose <target dev> is {:?}: {e}",
                    vm.name, disk.target
                ))
            })?;
        }
        Ok(chosen)
    }

    fn chosen_unchecked<'a>(&self, vm: &'a VmInfo) -> Result<Vec<&'a DiskInfo>, StageError> {
        let candidates: Vec<&DiskInfo> = vm.backup_disks().collect();
        if self.disks.is_empty() {
            if candidates.is_empty() {
                return Err(StageError::Config(format!(
                    "VM {} has no disk to back up",
                    vm.name
                )));
            }
            return Ok(candidates);
        }
        self.disks
            .iter()
            .map(|name| {
                candidates
                    .iter()
                    .find(|d| &d.target == name)
                    .copied()
                    .ok_or_else(|| {
                        StageError::Config(format!(
                            "VM {} has no disk {name}; its disks: {}",
                            vm.name,
                            candidates
                                .iter()
                                .map(|d| d.target.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            })
            .collect()
    }
}

/// A libvirt error as a stage error: transport failures may pass on a retry, the rest do not.
fn libvirt_error(e: LibvirtError) -> StageError {
    if e.is_retryable() {
        StageError::io("libvirt", io::Error::other(e.to_string()))
    } else {
        StageError::Config(e.to_string())
    }
}

/// The newest snapshot of the VM in the repository, and each of its disks' tracking state.
struct Parent {
    id: String,
    /// When it was taken (Unix seconds): a redefined checkpoint's creation time (its job made the
    /// checkpoint at that instant).
    time: i64,
    disks: BTreeMap<String, Option<serde_json::Value>>,
}

fn parent_of(ctx: &RunContext, vm: &str) -> Result<Option<Parent>, StageError> {
    let Ok(repo) = ctx.repository() else {
        return Ok(None);
    };
    let Some(info) = repo
        .list_snapshots()?
        .into_iter()
        .rev()
        .find(|s| s.vm == vm)
    else {
        return Ok(None);
    };
    // A damaged newest manifest cannot be the base of an incremental (nor can an older snapshot stand in
    // for it: the newest checkpoint is its): the backup is full, and the map stage says why.
    let snapshot = match repo.open_snapshot(&info.id) {
        Ok(s) => s,
        Err(
            e @ (backflow_repository::RepoError::Corrupt { .. }
            | backflow_repository::RepoError::SnapshotNotFound { .. }),
        ) => {
            tracing::warn!(vm, snapshot = %info.id, error = %e, "The newest snapshot cannot be read; a full backup.");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Some(Parent {
        id: info.id,
        time: info.time,
        disks: snapshot
            .meta()
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.cbt.clone()))
            .collect(),
    }))
}

/// Warns about disks added to or removed from the VM since the parent snapshot.
fn warn_disk_changes(ctx: &RunContext, vm: &str, parent: &Parent, disks: &[&DiskInfo]) {
    for disk in disks {
        if !parent.disks.contains_key(&disk.target) {
            ctx.warn(format!(
                "disk {}: new since snapshot {} of VM {vm}; reading all of it",
                disk.target, parent.id
            ));
        }
    }
    for name in parent.disks.keys() {
        if !disks.iter().any(|d| &d.target == name) {
            ctx.warn(format!(
                "disk {name} of snapshot {} is no longer backed up from VM {vm} (removed, or not chosen); this snapshot leaves it out",
                parent.id
            ));
        }
    }
}

/// A new checkpoint's name: the prefix, then seconds since the epoch and a random part, so names
/// sort by age and never repeat.
fn new_checkpoint_name(prefix: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{prefix}.{secs}-{:04x}", rand::random::<u16>())
}

/// Per disk (target): whether its bitmap of a checkpoint is there, or why not.
type PerDisk = BTreeMap<String, Result<(), String>>;

/// Checkpoints as libvirt knows them for a VM (both paths), plus the image's own bitmaps when the
/// VM is off (libvirt's metadata and the image can disagree after a crash).
struct LibvirtCheckpoints<'a> {
    domain: &'a Domain,
    /// The checkpoints libvirt knew before this run redefined any: every disk of a checkpoint it
    /// did not know gets the redefinition's verdict, not just the first one asking.
    known_before: Vec<String>,
    /// The checkpoints libvirt knows now.
    names: RefCell<Vec<String>>,
    /// Offline: the images, to check that the bitmap is there, enabled and consistent.
    images: Option<&'a BTreeMap<String, PathBuf>>,
    /// The disks each checkpoint holds a bitmap of (or why that is not known), read once per
    /// checkpoint: the disks of one VM usually share their base.
    covered: RefCell<BTreeMap<String, Result<Vec<String>, String>>>,
    /// The chosen disks that recorded each checkpoint: a redefinition holds all their bitmaps.
    sharing: BTreeMap<String, Vec<String>>,
    /// The creation time of a redefined checkpoint: when the parent snapshot was taken.
    created: i64,
    /// What redefining each checkpoint did for each of its disks; done once per checkpoint.
    redefined: RefCell<BTreeMap<String, PerDisk>>,
    /// The checkpoints redefined here, and the host the VM moved from (for the report's notes).
    adopted: RefCell<Vec<(String, Option<String>)>>,
}

impl LibvirtCheckpoints<'_> {
    fn bitmap_disks(&self, checkpoint: &str) -> Result<Vec<String>, String> {
        self.covered
            .borrow_mut()
            .entry(checkpoint.to_owned())
            .or_insert_with(|| {
                let xml = backup::checkpoint_xml(self.domain, checkpoint)
                    .map_err(|e| format!("checkpoint {checkpoint} cannot be read ({e})"))?;
                job_xml::checkpoint_bitmap_disks(&xml)
                    .map_err(|e| format!("checkpoint {checkpoint} is not understood ({e})"))
            })
            .clone()
    }

    /// Redefines `checkpoint` with a bitmap in each of `disks` that still holds one, and says per
    /// disk whether it does. Running VM: libvirt checks the bitmaps (REDEFINE_VALIDATE), all
    /// disks at once, then, if one lacks its bitmap, each on its own to find which, and the
    /// survivors together. Shut-off VM: libvirt cannot check, the images are read here first.
    fn redefine_all(&self, checkpoint: &str, disks: &[String]) -> PerDisk {
        let define = |with: &[String], validate: bool| {
            let xml = job_xml::redefined_checkpoint(checkpoint, self.created, with);
            backup::redefine_checkpoint(self.domain, &xml, validate)
                .map(|_| ())
                .map_err(|e| match e.libvirt_error() {
                    // libvirt's own words ("missing or broken bitmap 'NAME' for disk 'vda'").
                    Some(cause) if !e.is_retryable() => (
                        cause.message().to_owned(),
                        cause
                            .code()
                            .is_known_and(|c| c == ErrorNumber::CheckpointInconsistent),
                    ),
                    _ => (e.to_string(), false),
                })
        };
        let all = |result: Result<(), String>| -> PerDisk {
            disks.iter().map(|d| (d.clone(), result.clone())).collect()
        };
        let Some(images) = self.images else {
            // Whether every failure was libvirt's check finding a bitmap missing or broken.
            let mut lost = true;
            let mut results = match define(disks, true) {
                Ok(()) => return all(Ok(())),
                Err((e, inconsistent)) if disks.len() == 1 => {
                    lost = inconsistent;
                    all(Err(e))
                }
                Err(_) => disks
                    .iter()
                    .map(|d| {
                        let result = define(std::slice::from_ref(d), true).map_err(|(e, i)| {
                            lost &= i;
                            e
                        });
                        (d.clone(), result)
                    })
                    .collect(),
            };
            let survivors: Vec<String> = results
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(d, _)| d.clone())
                .collect();
            if survivors.len() > 1
                && let Err((e, _)) = define(&survivors, true)
            {
                for disk in &survivors {
                    results.insert(disk.clone(), Err(e.clone()));
                }
            }
            // Metadata here of a checkpoint whose bitmaps are all gone (left by an earlier stay of
            // the VM on this host) can never be deleted with its bitmaps, nor serve: forgotten.
            if survivors.is_empty() && lost && self.known(checkpoint) {
                match backup::delete_checkpoint_metadata(self.domain, checkpoint) {
                    Ok(()) => self.names.borrow_mut().retain(|n| n != checkpoint),
                    Err(e) => tracing::warn!(
                        checkpoint,
                        "Cannot forget a checkpoint whose bitmaps are gone: {e}."
                    ),
                }
            }
            return results;
        };
        let mut results: PerDisk = disks
            .iter()
            .map(|d| {
                let result = match images.get(d) {
                    Some(image) => image_bitmap(image, checkpoint),
                    None => Err(format!("the image of disk {d} is not known")),
                };
                (d.clone(), result)
            })
            .collect();
        let survivors: Vec<String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(d, _)| d.clone())
            .collect();
        if !survivors.is_empty()
            && let Err((e, _)) = define(&survivors, false)
        {
            for disk in &survivors {
                results.insert(disk.clone(), Err(e.clone()));
            }
        }
        results
    }
}

/// Whether `image` holds checkpoint `checkpoint`'s bitmap, enabled and consistent (a shut-off
/// VM's image, read with `qemu-img info`).
fn image_bitmap(image: &Path, checkpoint: &str) -> Result<(), String> {
    let info = backflow_qemu::bitmap::image_info(image)
        .map_err(|e| format!("the bitmaps of {} cannot be read ({e})", image.display()))?;
    match info.bitmaps.iter().find(|b| b.name == checkpoint) {
        None => Err(format!(
            "bitmap {checkpoint} is no longer in {}",
            image.display()
        )),
        Some(b) if !b.consistent() => Err(format!(
            "bitmap {checkpoint} in {} is inconsistent (QEMU did not close it cleanly)",
            image.display()
        )),
        Some(b) if !b.enabled() => Err(format!(
            "bitmap {checkpoint} in {} is disabled",
            image.display()
        )),
        Some(_) => Ok(()),
    }
}

impl Checkpoints for LibvirtCheckpoints<'_> {
    fn known(&self, checkpoint: &str) -> bool {
        self.known_before.iter().any(|n| n == checkpoint)
    }

    fn redefine(
        &self,
        checkpoint: &str,
        disk: &str,
        moved_from: Option<&str>,
    ) -> Result<(), String> {
        if !self.redefined.borrow().contains_key(checkpoint) {
            let mut disks = self.sharing.get(checkpoint).cloned().unwrap_or_default();
            if !disks.iter().any(|d| d == disk) {
                disks.push(disk.to_owned());
            }
            let results = self.redefine_all(checkpoint, &disks);
            // What libvirt holds of the checkpoint changed: read it again.
            self.covered.borrow_mut().remove(checkpoint);
            if results.values().any(Result::is_ok) {
                if !self.names.borrow().iter().any(|n| n == checkpoint) {
                    self.names.borrow_mut().push(checkpoint.to_owned());
                }
                self.adopted
                    .borrow_mut()
                    .push((checkpoint.to_owned(), moved_from.map(str::to_owned)));
            }
            tracing::info!(
                checkpoint,
                ?results,
                "Checkpoint redefined from the parent snapshot's record."
            );
            self.redefined
                .borrow_mut()
                .insert(checkpoint.to_owned(), results);
        }
        self.redefined.borrow()[checkpoint]
            .get(disk)
            .cloned()
            .unwrap_or_else(|| Err(format!("disk {disk} was not redefined")))
    }

    fn covers(&self, checkpoint: &str, disk: &str) -> Result<(), String> {
        if !self.names.borrow().iter().any(|n| n == checkpoint) {
            return Err(format!("checkpoint {checkpoint} no longer exists"));
        }
        let covered = self.bitmap_disks(checkpoint)?;
        if !covered.iter().any(|d| d == disk) {
            return Err(format!(
                "checkpoint {checkpoint} holds no bitmap of this disk"
            ));
        }
        if let Some(image) = self.images.and_then(|i| i.get(disk)) {
            image_bitmap(image, checkpoint)?;
        }
        Ok(())
    }
}

impl LibvirtSource {
    /// The base checkpoint of each chosen disk (or why there is none). `images`: the VM is off,
    /// and the bitmaps are checked in its images too.
    #[allow(clippy::too_many_arguments)]
    fn bases(
        &self,
        ctx: &RunContext,
        domain: &Domain,
        vm: &VmInfo,
        host: &str,
        disks: &[&DiskInfo],
        parent: Option<&Parent>,
        images: Option<&BTreeMap<String, PathBuf>>,
    ) -> Result<Vec<Result<String, String>>, StageError> {
        if self.checkpoint.is_none() {
            return Ok(disks.iter().map(|_| Err(String::new())).collect());
        }
        let mut sharing: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for disk in disks {
            if let Some(checkpoint) = parent
                .and_then(|p| p.disks.get(&disk.target))
                .and_then(|recorded| recorded.as_ref())
                .and_then(tracking::recorded_checkpoint)
            {
                sharing
                    .entry(checkpoint)
                    .or_default()
                    .push(disk.target.clone());
            }
        }
        let known = backup::list_checkpoints(domain).map_err(libvirt_error)?;
        let libvirt = LibvirtCheckpoints {
            domain,
            names: RefCell::new(known.clone()),
            known_before: known,
            images,
            covered: RefCell::default(),
            sharing,
            created: parent.map_or(0, |p| p.time),
            redefined: RefCell::default(),
            adopted: RefCell::default(),
        };
        let checkpoints: &dyn Checkpoints = &libvirt;
        let bases = disks
            .iter()
            .map(|disk| {
                let Some(parent) = parent else {
                    return Err(String::new());
                };
                let Some(recorded) = parent.disks.get(&disk.target) else {
                    return Err(String::new()); // new disk: warned about already
                };
                let Some(recorded) = recorded else {
                    return Err(format!(
                        "snapshot {} recorded no change tracking for it",
                        parent.id
                    ));
                };
                let Some(size) = disk.capacity else {
                    return Err(format!(
                        "its size cannot be read ({})",
                        disk.capacity_unknown.as_deref().unwrap_or("unknown")
                    ));
                };
                let source = disk.source.to_string();
                let now = DiskNow {
                    domain_uuid: &vm.uuid,
                    host,
                    disk: &disk.target,
                    source: &source,
                    size,
                    bitmaps: disk.format.as_deref() == Some("qcow2"),
                };
                let base = tracking::base_for(recorded, &parent.id, &now, checkpoints);
                if let Ok(base) = &base {
                    tracing::debug!(disk = %disk.target, %base, "Incremental from checkpoint.");
                }
                base
            })
            .collect::<Vec<_>>();
        // A redefined checkpoint serves only the disks whose bitmap survived: say which.
        let redefined = libvirt.redefined.borrow();
        for (checkpoint, moved_from) in libvirt.adopted.borrow().iter() {
            let kept: Vec<&str> = redefined[checkpoint]
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(d, _)| d.as_str())
                .collect();
            let why = match moved_from {
                Some(from) => format!("the VM moved from host {from} to {host}"),
                None => format!("libvirt on host {host} no longer knew it"),
            };
            ctx.note(format!(
                "VM {}: {why} since snapshot {}: checkpoint {checkpoint} redefined there from the snapshot's record, its bitmaps checked in the disks ({}), which stay incremental",
                vm.name,
                parent.map_or("", |p| p.id.as_str()),
                kept.join(", ")
            ));
        }
        Ok(bases)
    }

    fn state(
        &self,
        vm: &VmInfo,
        host: &str,
        disk: &DiskInfo,
        size: u64,
        checkpoint: Option<String>,
    ) -> State {
        State {
            method: METHOD.to_owned(),
            checkpoint,
            domain_uuid: vm.uuid.clone(),
            host: host.to_owned(),
            disk: disk.target.clone(),
            source: disk.source.to_string(),
            size,
        }
    }

    /// Ends the jobs that earlier runs left on this VM (killed, or unable to reach libvirt to end
    /// them), and refuses to start while another live run, or someone else's job, holds the VM.
    ///
    /// A job is an earlier run's when its job directory in `socket_dir` recorded its endpoint and
    /// the directory's owner is gone; or, on this host, when its socket or scratch files lie in a
    /// backflow job directory ([`job::of_job`]) that is gone or whose owner is gone.
    fn end_orphaned_jobs(
        &self,
        ctx: &RunContext,
        conn: &Connection,
        domain: &Domain,
        vm: &VmInfo,
    ) -> Result<(), StageError> {
        let mut running = find_job(domain).map_err(libvirt_error)?;
        for dir in JobDir::of_domain(&self.socket_dir, &vm.uuid) {
            let pid = match dir.owner() {
                Owner::Alive(pid) => {
                    return Err(StageError::Config(format!(
                        "VM {} is being backed up by another backflow run (pid {pid}, job directory {})",
                        vm.name,
                        dir.path().display()
                    )));
                }
                Owner::Gone(pid) => pid,
            };
            let (what, aborted) = end_dead_run(domain, &vm.name, &running, &dir, &pid)?;
            if aborted {
                running = Found::Nothing;
            }
            ctx.warn(what);
        }
        if let Found::Job(job) = &running
            && conn.is_local()
            && let Some(dir) = job::of_job(job)
        {
            let endpoint = job
                .endpoint
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |e| e.to_string());
            let earlier = if dir.path().exists() {
                match dir.owner() {
                    Owner::Alive(pid) => {
                        return Err(StageError::Config(format!(
                            "VM {} is being backed up by another backflow run (pid {pid}, job directory {})",
                            vm.name,
                            dir.path().display()
                        )));
                    }
                    Owner::Gone(pid) => earlier_run(&dir, &pid),
                }
            } else {
                "an earlier run".to_owned()
            };
            abort_orphan(domain, &dir)?;
            dir.remove().map_err(StageError::Config)?;
            ctx.warn(format!(
                "cleaned up after {earlier}: its backup job on VM {} (NBD server at {endpoint}, job directory {}) aborted",
                vm.name,
                dir.path().display()
            ));
            running = Found::Nothing;
        }
        if let Found::Job(job) = &running
            && self.take_over
            && job::is_backflows(job, &vm.uuid)
        {
            let endpoint = job
                .endpoint
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |e| e.to_string());
            backup::abort_job(domain).map_err(libvirt_error)?;
            wait_job_gone(|| find_job(domain)).map_err(StageError::Config)?;
            ctx.warn(format!(
                "took over from a lost run: its backup job on VM {} (NBD server at {endpoint}) aborted",
                vm.name
            ));
            running = Found::Nothing;
        }
        match running {
            Found::Nothing => Ok(()),
            found => {
                let endpoint = match found {
                    Found::Job(job) => job.endpoint.map(|e| e.to_string()),
                    _ => None,
                };
                Err(StageError::Config(format!(
                    "VM {} already has a backup job that backflow did not start (NBD server at {}); end it with `virsh domjobabort {}` once its owner is done",
                    vm.name,
                    endpoint.as_deref().unwrap_or("unknown"),
                    vm.name
                )))
            }
        }
    }

    /// A running VM: one pull-mode backup job for every chosen disk.
    fn online(
        &self,
        worker: &mut Worker<'_>,
        conn: &Connection,
        domain: Domain,
        vm: &VmInfo,
        disks: &[&DiskInfo],
        parent: Option<&Parent>,
    ) -> Result<(), StageError> {
        let ctx = worker.ctx();
        if self.tcp.is_none() && !conn.is_local() {
            return Err(StageError::Config(format!(
                "VM {} runs on host {}, not here: set `transport: tcp` (with `host` and `port`) to read its disks over the network, or run backflow on that host",
                vm.name,
                conn.hostname()
            )));
        }
        self.end_orphaned_jobs(ctx, conn, &domain, vm)?;
        let host = conn.hostname().to_owned();
        let bases = self.bases(ctx, &domain, vm, &host, disks, parent, None)?;
        // The new checkpoint: a bitmap in every chosen qcow2 disk, none elsewhere.
        let new_checkpoint = self.checkpoint.as_deref().map(new_checkpoint_name);
        let bitmapped: Vec<String> = disks
            .iter()
            .filter(|d| d.format.as_deref() == Some("qcow2"))
            .map(|d| d.target.clone())
            .collect();
        let others: Vec<String> = vm
            .disks
            .iter()
            .map(|d| d.target.clone())
            .filter(|t| !bitmapped.contains(t))
            .collect();
        let skipped: Vec<String> = vm
            .disks
            .iter()
            .map(|d| d.target.clone())
            .filter(|t| !disks.iter().any(|d| &d.target == t))
            .collect();
        // Only made when some disk holds its bitmap.
        let new_checkpoint = new_checkpoint.filter(|_| !bitmapped.is_empty());
        let checkpoint_xml = new_checkpoint
            .as_deref()
            .map(|name| job_xml::checkpoint(name, &bitmapped, &others));

        let dir =
            JobDir::create(&self.socket_dir, &vm.uuid, job::qemu_user(&vm.name)).map_err(|e| {
                StageError::io(
                    format!(
                        "VM {}: creating a job directory in {}",
                        vm.name,
                        self.socket_dir.display()
                    ),
                    e,
                )
            })?;
        let endpoint = match &self.tcp {
            None => Endpoint::Unix(dir.socket()),
            Some((host, port, tls)) => Endpoint::Tcp {
                host: match host.as_str() {
                    "" if conn.is_local() => "127.0.0.1".to_owned(),
                    "" => conn.hostname().to_owned(),
                    host => host.to_owned(),
                },
                port: *port,
                tls: tls.is_some(),
            },
        };
        // The cleanup first, so that whatever fails from here on leaves nothing behind.
        let committed = Committed::default();
        let job = Arc::new(OnlineJob {
            live: LiveDomain::new(self.uri.clone(), &vm.uuid, domain.clone()),
            vm: vm.name.clone(),
            dir: dir.clone(),
            endpoint: endpoint.clone(),
            begun: AtomicBool::new(false),
            prefix: self.checkpoint.clone(),
            new_checkpoint: new_checkpoint.clone(),
            committed: committed.clone(),
        });
        ctx.on_cleanup(
            format!("ending the backup job of VM {}", vm.name),
            Box::new({
                let job = job.clone();
                move |_outcome| job.end()
            }),
        );
        *self.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(job.clone());
        dir.record_endpoint(&endpoint)
            .and_then(|()| dir.record_uri(self.uri.as_deref().unwrap_or_default()))
            .map_err(|e| {
                StageError::io(
                    format!("VM {}: writing into {}", vm.name, dir.path().display()),
                    e,
                )
            })?;
        let job_disks: Vec<JobDisk> = disks
            .iter()
            .zip(&bases)
            .map(|(disk, base)| JobDisk {
                target: disk.target.clone(),
                mode: match base {
                    Ok(from) => DiskMode::Incremental(from.clone()),
                    Err(_) => DiskMode::Full,
                },
                // Scratch files in our directory when it is on the VM's host; else in
                // REMOTE_SCRATCH_DIR there (libvirt 9.0 needs a path: see JobDisk::scratch). libvirt
                // creates the file and deletes it when the job ends, however it ends.
                scratch: Some(if conn.is_local() {
                    dir.scratch(&disk.target)
                } else {
                    job::remote_scratch(&vm.uuid, &disk.target)
                }),
            })
            .collect();
        let backup_xml = job_xml::pull_backup(&endpoint, &job_disks, &skipped);

        // The instant of the backup: freeze, begin (checkpoint included), thaw.
        let frozen = self.freeze(ctx, &domain, vm)?;
        let result = backup::begin_backup(&domain, &backup_xml, checkpoint_xml.as_deref());
        if frozen && let Err(e) = backup::fs_thaw(&domain) {
            ctx.warn(format!(
                "VM {}: thawing its filesystems failed: {e}",
                vm.name
            ));
        }
        // A call cut off with the connection may have begun the job, checkpoint included.
        let maybe_begun = result.as_ref().err().is_none_or(LibvirtError::is_retryable);
        job.begun.store(maybe_begun, Ordering::SeqCst);
        result.map_err(libvirt_error)?;
        tracing::info!(vm = %vm.name, checkpoint = ?new_checkpoint, "Backup job begun.");
        pause_at(PAUSE_AFTER_SNAPSHOT, "after the snapshot");

        let running = match job.live.call(find_job).map_err(libvirt_error)? {
            Found::Job(running) => running,
            Found::Unreadable(e) => {
                return Err(StageError::Internal(format!(
                    "libvirt's backup job XML is not understood: {e}"
                )));
            }
            Found::Nothing => {
                return Err(StageError::io(
                    "libvirt",
                    io::Error::other(format!(
                        "VM {}: its backup job is gone right after it began (the VM stopped, or someone aborted the job)",
                        vm.name
                    )),
                ));
            }
        };
        let address = match &endpoint {
            Endpoint::Unix(socket) => NbdAddress::Unix(socket.clone()),
            Endpoint::Tcp { host, port, .. } => match self.tcp.as_ref().and_then(|t| t.2.clone()) {
                Some(tls) => NbdAddress::TcpTls {
                    host: host.clone(),
                    port: *port,
                    tls,
                },
                None => NbdAddress::Tcp {
                    host: host.clone(),
                    port: *port,
                },
            },
        };
        for (disk, base) in disks.iter().zip(bases) {
            let exported = running
                .disks
                .iter()
                .find(|d| d.target == disk.target)
                .ok_or_else(|| {
                    StageError::Internal(format!(
                        "the backup job of VM {} does not export disk {}",
                        vm.name, disk.target
                    ))
                })?;
            let bitmaps: Vec<String> = exported.bitmap.iter().cloned().collect();
            let label = format!(
                "VM {} disk {} ({})",
                vm.name,
                disk.target,
                address.uri(&exported.export)
            );
            let export = Arc::new(
                NbdExport::connect(
                    address.clone(),
                    &exported.export,
                    label.clone(),
                    self.connections,
                    &bitmaps,
                )
                .map_err(|e| StageError::io(format!("{label}: connecting"), e))?,
            );
            let tracking = self.checkpoint.as_ref().map(|_| {
                let checkpoint = bitmapped
                    .contains(&disk.target)
                    .then(|| new_checkpoint.clone())
                    .flatten();
                Arc::new(CheckpointTracking {
                    next: self.state(vm, &host, disk, export.size(), checkpoint),
                    base,
                    export: export.clone(),
                    bitmap: exported.bitmap.clone(),
                    committed: committed.clone(),
                }) as Arc<dyn ChangeTracking>
            });
            let location = PathBuf::from(disk.source.to_string());
            if !send_disk(worker, vm, disk, location, export, tracking) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Freezes the guest's filesystems when asked to and possible; `true` when they are frozen.
    fn freeze(&self, ctx: &RunContext, domain: &Domain, vm: &VmInfo) -> Result<bool, StageError> {
        if self.freeze == "off" {
            return Ok(false);
        }
        match backup::fs_freeze(domain) {
            Ok(n) => {
                tracing::info!(vm = %vm.name, filesystems = n, "Guest filesystems frozen.");
                Ok(true)
            }
            Err(e) if self.freeze == "required" => Err(StageError::Config(format!(
                "VM {}: its filesystems cannot be frozen (freeze: required): {e}",
                vm.name
            ))),
            Err(e) => {
                // Many VMs have no agent, and a crash-consistent backup is what they get every
                // night: a note, so that a job mailing warnings does not mail every night.
                ctx.note(format!(
                    "VM {}: crash-consistent: no guest agent froze its filesystems ({}); the backup is as after a power cut (`freeze: required` makes this a failure)",
                    vm.name,
                    e.libvirt_error().map(|c| c.message().to_owned()).unwrap_or_else(|| e.to_string())
                ));
                Ok(false)
            }
        }
    }

    /// A shut-off VM: a private read-only `qemu-nbd` per disk image.
    fn offline(
        &self,
        worker: &mut Worker<'_>,
        conn: &Connection,
        domain: Domain,
        vm: &VmInfo,
        disks: &[&DiskInfo],
        parent: Option<&Parent>,
    ) -> Result<(), StageError> {
        let ctx = worker.ctx();
        if !conn.is_local() {
            return Err(StageError::Config(format!(
                "VM {} is shut off on host {}: its images are read directly, which needs backflow to run on that host",
                vm.name,
                conn.hostname()
            )));
        }
        let mut images = BTreeMap::new();
        for disk in disks {
            let path = match &disk.source {
                backflow_libvirt::DiskSource::File { path }
                | backflow_libvirt::DiskSource::Block { path } => PathBuf::from(path),
                other => {
                    return Err(StageError::Config(format!(
                        "VM {} is shut off and disk {} reads from {other}: a shut-off VM's disks are read from local files and devices only",
                        vm.name, disk.target
                    )));
                }
            };
            images.insert(disk.target.clone(), path);
        }
        // A job a killed run left ended with the VM; its directory may still be there.
        self.end_orphaned_jobs(ctx, conn, &domain, vm)?;
        tracing::info!(vm = %vm.name, "VM is shut off: reading its images directly.");
        let host = conn.hostname().to_owned();
        let bases = self.bases(ctx, &domain, vm, &host, disks, parent, Some(&images))?;
        for cleaned in ServerDir::sweep_orphans(&self.socket_dir) {
            ctx.warn(format!("cleaned up after a run that was killed: {cleaned}"));
        }
        let committed = Committed::default();
        for (disk, base) in disks.iter().zip(bases) {
            let image = &images[&disk.target];
            // Before qemu-nbd opens it: a FIFO would block it, and this run, for good.
            backflow_pipeline::input::check_source(image).map_err(|e| {
                let what = format!(
                    "VM {} disk {}: image {}",
                    vm.name,
                    disk.target,
                    image.display()
                );
                match e {
                    backflow_pipeline::input::InputError::Io(e) => StageError::io(what, e),
                    other => StageError::Config(format!("{what} {other}")),
                }
            })?;
            let format = match disk.format.as_deref() {
                Some(f @ ("qcow2" | "raw")) => f,
                other => {
                    return Err(StageError::Config(format!(
                        "VM {} disk {}: format {} cannot be read offline (qcow2 or raw)",
                        vm.name,
                        disk.target,
                        other.unwrap_or("unknown")
                    )));
                }
            };
            let dir = ServerDir::create(&self.socket_dir).map_err(|e| {
                StageError::io(
                    format!(
                        "creating a socket directory in {}",
                        self.socket_dir.display()
                    ),
                    e,
                )
            })?;
            let stop = dir.clone();
            ctx.on_cleanup(
                format!("stopping qemu-nbd for {}", image.display()),
                Box::new(move |_| stop.stop_and_remove()),
            );
            let bitmaps: Vec<String> = base.iter().cloned().collect();
            let label = format!("VM {} disk {} ({})", vm.name, disk.target, image.display());
            let server = QemuNbdServer::start(
                &dir,
                &ServerConfig {
                    bitmaps: &bitmaps,
                    ..ServerConfig::read_only(image, format, self.connections)
                },
            )
            .map_err(|e| StageError::io(format!("{label}: starting qemu-nbd"), e))?;
            let export = Arc::new(
                NbdExport::open_with_bitmaps(
                    server.socket().to_owned(),
                    backflow_qemu::server::EXPORT_NAME,
                    image.clone(),
                    self.connections,
                    &bitmaps,
                )
                .map_err(|e| StageError::io(format!("{label}: opening the NBD export"), e))?,
            );
            let tracking = self.checkpoint.as_ref().map(|_| {
                Arc::new(CheckpointTracking {
                    // The chain does not move while the VM is off: the parent's checkpoint still
                    // counts every change after this snapshot.
                    next: self.state(vm, &host, disk, export.size(), base.clone().ok()),
                    bitmap: base.clone().ok(),
                    base,
                    export: export.clone(),
                    committed: committed.clone(),
                }) as Arc<dyn ChangeTracking>
            });
            if !send_disk(worker, vm, disk, image.clone(), export, tracking) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Sends one disk of the VM, with its definition, to the map stage; `false` when the pipeline
/// stopped.
fn send_disk(
    worker: &mut Worker<'_>,
    vm: &VmInfo,
    disk: &DiskInfo,
    location: PathBuf,
    export: Arc<NbdExport>,
    tracking: Option<Arc<dyn ChangeTracking>>,
) -> bool {
    let source = DiskSource {
        vm: vm.name.clone(),
        name: disk.target.clone(),
        location,
        reader: export,
        tracking,
        definition: Some(Arc::from(vm.definition.as_str())),
    };
    worker.send(Message::Disk(Arc::new(source))).is_ok()
}

/// What the final check and the cleanup of a running VM's backup job need.
#[derive(Debug)]
struct OnlineJob {
    /// The VM, through a connection that survives a libvirtd restart.
    live: LiveDomain,
    vm: String,
    dir: JobDir,
    /// Where the job's NBD server listens: the job on the VM with this endpoint is ours.
    endpoint: Endpoint,
    /// The job began (or may have: the call was cut off), and with it the new checkpoint.
    begun: AtomicBool,
    prefix: Option<String>,
    new_checkpoint: Option<String>,
    committed: Committed,
}

impl OnlineJob {
    /// Before the snapshot is committed, every disk read: the job must still run. All reads
    /// succeeded, and they came from the job's point-in-time view as long as the job ran (libvirt
    /// removes the export, and QEMU drops its clients, only when the job ends); a job that ran to
    /// the end vouches for every read, through a libvirtd restart too. When the job is gone, or
    /// libvirt cannot be asked, nothing vouches for the data and nothing is committed.
    fn confirm(&self, ctx: &RunContext) -> Result<(), StageError> {
        let fail = |detail: String, then: &str| {
            Err(StageError::io(
                format!("VM {}", self.vm),
                io::Error::other(format!(
                    "{detail}: what was read cannot be vouched for, so nothing is committed{then}"
                )),
            ))
        };
        match self.live.call(find_job) {
            Ok(Found::Job(job)) if job.endpoint.as_ref() == Some(&self.endpoint) => {
                if let Some(lost) = self.live.lost() {
                    ctx.warn(format!(
                        "VM {}: the connection to libvirt broke during the backup ({lost}); connected again, the backup job was still running, so every read came from its point-in-time view",
                        self.vm
                    ));
                }
                Ok(())
            }
            Ok(_) => fail(
                match self.live.lost() {
                    Some(lost) => format!(
                        "the connection to libvirt broke during the backup ({lost}), and the backup job did not outlive it"
                    ),
                    None => {
                        "the backup job ended before the backup did (someone aborted it)".into()
                    }
                },
                "",
            ),
            Err(e) if e.is_retryable() => fail(
                format!(
                    "the connection to libvirt broke during the backup and libvirt did not answer again within {} s ({e}): nothing tells whether the backup job ran to the end",
                    live::RECONNECT_WAIT.as_secs()
                ),
                "; the next run ends the job if it is still there",
            ),
            Err(e) => fail(
                format!("the VM is not found again after the connection to libvirt broke ({e})"),
                "",
            ),
        }
    }

    /// The cleanup: aborts the job if it is still there, settles the checkpoints, removes the
    /// directory. Every step is tried; says what it could not do. When the job may still run
    /// (libvirt unreachable, the abort failed) the directory stays, saying why, so that the next
    /// run ends the job.
    fn end(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        // Why the job may still run, if it may.
        let mut left = None;
        match self.live.call(find_job) {
            Ok(Found::Job(job)) if job.endpoint.as_ref() == Some(&self.endpoint) => {
                match self.live.call(backup::abort_job) {
                    Ok(()) => {
                        if let Err(e) = self.wait_gone() {
                            problems.push(e);
                            left = Some("the job did not end when aborted");
                        }
                    }
                    Err(e) => {
                        problems.push(format!("aborting the backup job: {e}"));
                        left = Some("aborting the job failed");
                    }
                }
            }
            Err(e) if e.is_retryable() => {
                problems.push(format!(
                    "libvirt cannot be reached to end the backup job: {e}"
                ));
                left = Some("libvirt could not be reached");
            }
            // No job to end: none of ours, or the VM is gone (not found again by its UUID).
            Ok(_) | Err(_) => {}
        }
        if self.begun.load(Ordering::SeqCst)
            && let (Some(prefix), Some(new)) = (&self.prefix, &self.new_checkpoint)
        {
            self.settle_checkpoints(prefix, new);
        }
        match left {
            None => {
                if let Err(e) = self.dir.remove() {
                    problems.push(e);
                }
            }
            Some(reason) => {
                if let Err(e) = self.dir.record_left(reason) {
                    tracing::warn!(dir = %self.dir.path().display(), "Cannot record why the job directory stays: {e}.");
                }
                problems.push(format!(
                    "the job directory {} stays, so that the next run of VM {} ends the job",
                    self.dir.path().display(),
                    self.vm
                ));
            }
        }
        if problems.is_empty() {
            if self.live.lost().is_some() {
                tracing::warn!(vm = %self.vm, "Connected to libvirt again to end the backup job.");
            }
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Committed: the new checkpoint is the base, every older one of ours can go. Not
    /// committed: the new one goes, and the parent's stays the base.
    fn settle_checkpoints(&self, prefix: &str, new: &str) {
        if self.committed.load(Ordering::SeqCst) {
            let names = match self.live.call(backup::list_checkpoints) {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!("Older checkpoints left, the next run removes them: {e}.");
                    return;
                }
            };
            for old in names.iter().filter(|n| *n != new && is_ours(n, prefix)) {
                match self.live.call(|d| backup::delete_checkpoint(d, old)) {
                    Ok(()) => {}
                    // libvirt deletes a checkpoint with its bitmaps, and refuses when one is gone:
                    // metadata an earlier stay of the VM on this host left behind.
                    Err(e) if !e.is_retryable() && self.bitmaps_gone(old) => {
                        match self
                            .live
                            .call(|d| backup::delete_checkpoint_metadata(d, old))
                        {
                            Ok(()) => tracing::info!(
                                "Checkpoint {old} forgotten: its bitmaps are gone ({e})."
                            ),
                            Err(e) => tracing::warn!("Checkpoint {old} left: {e}."),
                        }
                    }
                    Err(e) => {
                        tracing::warn!("Checkpoint {old} left, the next run removes it: {e}.")
                    }
                }
            }
            return;
        }
        match self.live.call(backup::is_active) {
            Ok(true) => {
                if let Err(e) = self.live.call(|d| backup::delete_checkpoint(d, new)) {
                    tracing::warn!(
                        "Checkpoint {new} left, the next successful run removes it: {e}."
                    );
                }
            }
            Ok(false) => tracing::warn!(
                "Checkpoint {new} left: libvirt deletes checkpoints of running VMs only; the next successful run removes it."
            ),
            Err(e) => {
                tracing::warn!("Checkpoint {new} left, the next successful run removes it: {e}.")
            }
        }
    }

    /// Whether libvirt finds a bitmap of checkpoint `name` missing or broken: redefining it as it
    /// is, with REDEFINE_VALIDATE, checks its bitmaps and changes nothing else.
    fn bitmaps_gone(&self, name: &str) -> bool {
        let Ok(xml) = self.live.call(|d| backup::checkpoint_xml(d, name)) else {
            return false;
        };
        match self
            .live
            .call(|d| backup::redefine_checkpoint(d, &xml, true))
        {
            Ok(_) => false,
            Err(e) => e.libvirt_error().is_some_and(|c| {
                c.code()
                    .is_known_and(|c| c == ErrorNumber::CheckpointInconsistent)
            }),
        }
    }

    /// Waits until the aborted job is gone: libvirt ends it asynchronously, first the NBD socket,
    /// then the job itself (until then a new job cannot begin).
    fn wait_gone(&self) -> Result<(), String> {
        self.dir.wait_socket_gone()?; // a tcp job has no socket there: returns at once
        wait_job_gone(|| self.live.call(find_job))
    }
}

/// A VM's backup job as libvirt describes it.
#[derive(Debug)]
enum Found {
    /// None (or the VM cannot have one: it does not run, or is gone).
    Nothing,
    Job(job_xml::RunningJob),
    /// A job whose XML is not understood: not ours.
    Unreadable(String),
}

/// The VM's backup job. Only a broken connection is an error: any other failure of the call
/// means there is no job to see.
fn find_job(domain: &Domain) -> Result<Found, LibvirtError> {
    match backup::backup_xml(domain) {
        Ok(xml) => Ok(match job_xml::parse_running_job(&xml) {
            Ok(job) => Found::Job(job),
            Err(e) => Found::Unreadable(e),
        }),
        Err(e) if e.is_retryable() => Err(e),
        Err(_) => Ok(Found::Nothing),
    }
}

/// Polls `find` until the job is gone (at most [`job::END_WAIT`]).
fn wait_job_gone(find: impl Fn() -> Result<Found, LibvirtError>) -> Result<(), String> {
    let deadline = std::time::Instant::now() + job::END_WAIT;
    loop {
        match find() {
            Ok(Found::Nothing) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("cannot tell whether the backup job ended: {e}")),
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the backup job is still there {} s after it was aborted",
                job::END_WAIT.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Aborts the job an earlier run left (in `dir`) and waits until it is gone.
fn abort_orphan(domain: &Domain, dir: &JobDir) -> Result<(), StageError> {
    backup::abort_job(domain).map_err(libvirt_error)?;
    dir.wait_socket_gone().map_err(StageError::Config)?;
    wait_job_gone(|| find_job(domain)).map_err(StageError::Config)
}

/// Ends what the run of `dir` left, that run being over (its owner `pid` gone): aborts the job
/// `running` on the VM if it is the one the directory recorded, and removes the directory. The
/// warning saying what was done, and whether a job was aborted.
fn end_dead_run(
    domain: &Domain,
    vm: &str,
    running: &Found,
    dir: &JobDir,
    pid: &str,
) -> Result<(String, bool), StageError> {
    let mut what = format!("job directory {} removed", dir.path().display());
    let aborted = matches!(running, Found::Job(job)
        if job.endpoint.as_ref().is_some_and(|e| dir.is_endpoint_of_job(e)));
    if aborted {
        abort_orphan(domain, dir)?;
        what = format!("its backup job on VM {vm} aborted, {what}");
    }
    let earlier = earlier_run(dir, pid);
    dir.remove().map_err(StageError::Config)?;
    Ok((format!("cleaned up after {earlier}: {what}"), aborted))
}

/// Ends what runs of this host that are over (killed, crashed, or cut off from the VM's host and
/// unable to end their job, which they said in `left`) left for any VM: each job directory in
/// `socket_dir` whose owner is gone is removed, and the job it recorded aborted if it still runs
/// (found through the libvirt URI the directory recorded). A directory whose VM's libvirt does not
/// answer stays for the next sweep; one that recorded no endpoint had no job begun. What `backflow
/// worker` does before it runs a task and after its run was killed, so that a host keeps nothing
/// of a lost run even if that VM is never backed up here again. Says what it did, one line each.
pub fn sweep_dead_runs(socket_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for dir in JobDir::all_in(socket_dir) {
        let Owner::Gone(pid) = dir.owner() else {
            continue;
        };
        let ended = if !dir.has_endpoint() {
            dir.remove().map(|()| {
                format!(
                    "cleaned up after {}: job directory {} removed (no job was begun)",
                    earlier_run(&dir, &pid),
                    dir.path().display()
                )
            })
        } else {
            let (Some(uri), Some(uuid)) = (dir.uri(), dir.domain()) else {
                continue; // an older release's: the VM's next run here ends it
            };
            (|| {
                let conn = Connection::open(Some(uri.as_str()).filter(|u| !u.is_empty()))
                    .map_err(|e| e.to_string())?;
                let domain = conn.domain_by_uuid(&uuid).map_err(|e| e.to_string())?;
                let running = find_job(&domain).map_err(|e| e.to_string())?;
                end_dead_run(&domain, &uuid, &running, &dir, &pid)
                    .map(|(what, _)| what)
                    .map_err(|e| e.to_string())
            })()
        };
        match ended {
            Ok(what) => done.push(what),
            Err(e) => tracing::debug!(dir = %dir.path().display(), "Left for a later sweep: {e}."),
        }
    }
    done
}

/// How a warning names the run that made `dir` (its owner `pid`, gone).
fn earlier_run(dir: &JobDir, pid: &str) -> String {
    match dir.left() {
        Some(reason) => format!("a run that could not end its backup job (pid {pid}: {reason})"),
        None => format!("a run that was killed (pid {pid})"),
    }
}

/// Whether a checkpoint name belongs to the chain of `prefix` (`PREFIX.anything`).
fn is_ours(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

impl Stage for LibvirtSource {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::Disk),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    /// A running VM's job must have outlived the reads (`OnlineJob::confirm`); the source
    /// finishes before the repository writer commits.
    fn finish(&self, ctx: &RunContext) -> Result<(), StageError> {
        let job = self
            .job
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        job.map_or(Ok(()), |job| job.confirm(ctx))
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        if worker.index() != 0 {
            return Ok(());
        }
        let conn = Connection::open(self.uri.as_deref()).map_err(libvirt_error)?;
        let (domain, vm) = conn.domain(&self.domain).map_err(libvirt_error)?;
        let disks = self.chosen(&vm)?;
        let parent = parent_of(worker.ctx(), &vm.name)?;
        if let Some(parent) = &parent {
            warn_disk_changes(worker.ctx(), &vm.name, parent, &disks);
        }
        let active = domain.is_active().map_err(|cause| {
            libvirt_error(LibvirtError::Call {
                uri: conn.uri().to_owned(),
                vm: Some(vm.name.clone()),
                call: "virDomainIsActive",
                cause,
            })
        })?;
        if active {
            self.online(worker, &conn, domain, &vm, &disks, parent.as_ref())
        } else {
            self.offline(worker, &conn, domain, &vm, &disks, parent.as_ref())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_and_validate() {
        let missing = LibvirtSource::new(LibvirtOptions::default()).unwrap_err();
        assert_eq!(missing.option, "domain");
        let ok = LibvirtSource::new(LibvirtOptions {
            domain: "web01".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.checkpoint.as_deref(), Some("backflow"));
        assert_eq!(ok.uri, None);
        for (field, options) in [
            (
                "freeze",
                LibvirtOptions {
                    domain: "a".into(),
                    freeze: "sometimes".into(),
                    ..Default::default()
                },
            ),
            (
                "checkpoint",
                LibvirtOptions {
                    domain: "a".into(),
                    checkpoint: "a.b".into(),
                    ..Default::default()
                },
            ),
            (
                "domain",
                LibvirtOptions {
                    domain: "../web01".into(),
                    ..Default::default()
                },
            ),
            (
                "disks",
                LibvirtOptions {
                    domain: "a".into(),
                    disks: vec!["vda".into(), "/dev/sda".into()],
                    ..Default::default()
                },
            ),
            (
                "connections",
                LibvirtOptions {
                    domain: "a".into(),
                    connections: 0,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(LibvirtSource::new(options).unwrap_err().option, field);
        }
    }

    #[test]
    fn checkpoint_names_belong_to_their_prefix() {
        let name = new_checkpoint_name("backflow");
        assert!(is_ours(&name, "backflow"), "{name}");
        assert!(!is_ours(&name, "backflo"));
        assert!(!is_ours("backflow-other.1", "backflow"));
        assert!(!is_ours("virtnbdbackup.0", "backflow"));
    }
}
