//! Disk writer stage (restores): writes verified chunks into raw images, block devices or qcow2
//! images.
//!
//! Workers write in parallel at each chunk's offset, so arrival order does not matter. A new image
//! is written as `NAME.partial` and renamed into place only when the whole run succeeded: a failed
//! or interrupted restore leaves no file that looks complete (the cleanup action removes the
//! `.partial`).
//!
//! `path` names the output file when one disk is restored; when it is an existing directory each
//! disk goes to `DIR/DISK.raw` (`DIR/DISK.qcow2` with `format: qcow2`). A disk name read from the
//! manifest that is not a valid name ([`backflow_repository::check_disk_name`]: `../x`, `/etc/x`,
//! `.`) fails the run before any file of that disk is made, naming the snapshot and the disk.
//!
//! # Never over something
//! Every target is checked before any data is read (the preflight, with the disks the
//! `repo-reader` recorded: [`backflow_pipeline::RESTORE_PLAN`]) and again just before its image
//! is made (`target` module): its directory exists and is writable; it is not an image that a
//! running or paused libvirt domain of `uri` uses, nor one a QEMU or `qemu-nbd` holds open with
//! image locking, `force` or not; and it does not exist (a file, a block device, a shut-off
//! domain's image) unless `force` is set. A refusal in the preflight ends the run before anything
//! moved, naming the path the user gave (never the `.partial`); without `force` the final rename
//! also refuses to replace a file that appeared while the restore ran. When no libvirt daemon
//! answers at `uri`, the lock probe still runs and a warning says the domain check was skipped.
//!
//! # Raw (`format: raw`, the default)
//! The `.partial` file is sized first so that zero chunks stay holes (sparse output) and written
//! with `pwrite`; a background thread flushes what was written every [`FLUSH_EVERY`] bytes when
//! `sync` is on. Block devices are written in place, with zero chunks written out as zeros.
//!
//! # qcow2 (`format: qcow2`)
//! QEMU writes the format, so that the images are what QEMU itself would make: `qemu-img create`
//! makes an empty `.partial` qcow2 of the disk's size (rounded up to 512 bytes: qcow2 sizes are
//! whole sectors), and a private writable `qemu-nbd` serves it on a unix socket in a 0700
//! directory under the system's temporary directory. The workers write every non-zero chunk over
//! a pool of NBD connections (one per worker at most); zero chunks are not written at all, since
//! a fresh qcow2 reads as zeros, so the image allocates only what holds data. The cleanup action
//! that stops the server by its pid and removes its directory is registered before the server
//! starts, so no `qemu-nbd` outlives the run whatever happens. When every stage succeeded, the
//! stage flushes each connection (`sync`), disconnects, stops the server (which closes the image
//! cleanly), fsyncs the file (`sync`) and renames it into place. qcow2 is written to files only,
//! not to block devices.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

mod target;

use backflow_nbd::{Client, NbdError};
use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    Disk, InvalidOption, Message, MessageType, Outcome, Payload, RESTORE_PLAN, RunContext, Stage,
    StageError, StageIo, Work, Worker, stage::unexpected,
};
use backflow_qemu::server::EXPORT_NAME;
use backflow_qemu::{ClientPool, QemuNbdServer, ServerConfig, ServerDir};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "disk-writer";

/// The format restored images are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A plain image (sparse file) or a block device, written with `pwrite`.
    #[default]
    Raw,
    /// A qcow2 image made by `qemu-img` and written through a private `qemu-nbd`.
    Qcow2,
}

impl ImageFormat {
    /// The name in specs and on the command line, also the extension of `DIR/DISK.EXT` files.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct DiskWriterOptions {
    /// Output file for one disk, or an existing directory for `DIR/DISK.raw` (`DIR/DISK.qcow2`) per
    /// disk (required).
    pub path: Option<PathBuf>,
    /// Make the restored data durable (fsync) before reporting success; flushing starts during the
    /// restore.
    #[serde(default = "yes")]
    pub sync: bool,
    /// raw (sparse file or block device) or qcow2 (through a private writable qemu-nbd; files
    /// only).
    #[serde(default)]
    pub format: ImageFormat,
    /// Replace an existing target (never one in use).
    #[serde(default)]
    pub force: bool,
    /// The libvirt connection whose domains' images are never written; empty: libvirt's default.
    #[serde(default)]
    pub uri: String,
}

impl Default for DiskWriterOptions {
    fn default() -> Self {
        DiskWriterOptions {
            path: None,
            sync: true,
            format: ImageFormat::Raw,
            force: false,
            uri: String::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "writes chunks into sparse raw images, devices or qcow2 images, in parallel: into `NAME.partial`, renamed into place only on success; qcow2 through a private writable qemu-nbd, stopped before the rename",
    input: Some(MessageType::VerifiedChunk),
    output: None,
    repository: RepositoryUse::No,
    options: option_docs::<DiskWriterOptions>,
    build: Build::Stage(|options| build_stage(options, DiskWriter::new)),
};

/// While a restore runs, the data written so far is flushed every this many bytes by a background
/// thread, so that the final fsync finds little left to write: the kernel would otherwise hold
/// gigabytes of dirty pages and write them only at the end.
pub const FLUSH_EVERY: u64 = 128 << 20;

struct Output {
    sink: Sink,
    /// Where the data is written now, and where it goes once the run succeeded (same for devices).
    writing: PathBuf,
    final_path: PathBuf,
    disk: Arc<Disk>,
    /// Bytes written, to trigger background flushes.
    written: AtomicU64,
    /// Data written, for the report (counted whether or not `sync` is on).
    data: AtomicU64,
}

enum Sink {
    /// A raw image or a block device.
    File {
        file: Arc<File>,
        /// Holes need not be written: the file was created empty and sized.
        sparse: bool,
    },
    /// A fresh qcow2 image served by a private writable `qemu-nbd`: reads as zeros until written.
    Qcow2 { pool: ClientPool, server: ServerDir },
}

pub struct DiskWriter {
    path: PathBuf,
    sync: bool,
    format: ImageFormat,
    force: bool,
    /// `None`: libvirt's default connection.
    uri: Option<String>,
    /// The images the libvirt domains use, listed once, when the first target that exists is
    /// checked.
    domains: OnceLock<target::Domains>,
    outputs: Mutex<HashMap<String, Arc<Output>>>,
    flusher: Mutex<Option<Flusher>>,
}

/// A thread that runs `fdatasync` on outputs while the workers go on writing.
struct Flusher {
    requests: crossbeam_channel::Sender<Arc<File>>,
    thread: std::thread::JoinHandle<()>,
}

impl DiskWriter {
    pub fn new(options: DiskWriterOptions) -> Result<Self, InvalidOption> {
        let path = options
            .path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                InvalidOption::new("path", "is required: the file or directory to restore into")
            })?;
        Ok(DiskWriter {
            path,
            sync: options.sync,
            format: options.format,
            force: options.force,
            uri: Some(options.uri).filter(|u| !u.trim().is_empty()),
            domains: OnceLock::new(),
            outputs: Mutex::new(HashMap::new()),
            flusher: Mutex::new(None),
        })
    }

    /// The output of `disk`, created by the first worker that gets one of its chunks. `workers`
    /// is the stage's worker count: the most NBD connections a qcow2 output needs.
    fn output(
        &self,
        ctx: &RunContext,
        workers: usize,
        disk: &Arc<Disk>,
    ) -> Result<Arc<Output>, StageError> {
        let mut outputs = self.outputs.lock().unwrap();
        if let Some(out) = outputs.get(disk.name()) {
            return Ok(out.clone());
        }
        let target = if self.path.is_dir() {
            self.target_in_dir(ctx, disk.name())?
        } else if outputs.is_empty() {
            self.path.clone()
        } else {
            return Err(StageError::Config(format!(
                "several disks are restored but {} is not a directory",
                self.path.display()
            )));
        };
        // Checked in the preflight already; again now, just before it is made.
        self.check_target(ctx, &target)?;
        let is_device = std::fs::metadata(&target)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let output = if self.format == ImageFormat::Qcow2 {
            if is_device {
                return Err(qcow2_on_device(&target));
            }
            qcow2_output(ctx, workers, disk, target)?
        } else if is_device {
            let file = OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| StageError::io(format!("opening {}", target.display()), e))?;
            Output {
                sink: Sink::File {
                    file: Arc::new(file),
                    sparse: false,
                },
                writing: target.clone(),
                final_path: target,
                disk: disk.clone(),
                written: AtomicU64::new(0),
                data: AtomicU64::new(0),
            }
        } else {
            let writing = partial_path(&target);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&writing)
                .map_err(|e| StageError::io(format!("creating {}", target.display()), e))?;
            file.set_len(disk.size())
                .map_err(|e| StageError::io(format!("sizing {}", target.display()), e))?;
            remove_on_failure(ctx, &writing);
            Output {
                sink: Sink::File {
                    file: Arc::new(file),
                    sparse: true,
                },
                writing,
                final_path: target,
                disk: disk.clone(),
                written: AtomicU64::new(0),
                data: AtomicU64::new(0),
            }
        };
        let output = Arc::new(output);
        outputs.insert(disk.name().to_owned(), output.clone());
        Ok(output)
    }

    /// `DIR/DISK.EXT` for a disk restored into the directory `path`.
    fn target_in_dir(&self, ctx: &RunContext, disk: &str) -> Result<PathBuf, StageError> {
        // The name comes from a manifest, which an older or hostile tool may have written:
        // `../x` or `/etc/x` must never become a path outside the directory.
        backflow_repository::check_disk_name(disk).map_err(|e| {
            let snapshot = ctx
                .results()
                .get("restored_snapshot")
                .and_then(|v| v.as_str().map(str::to_owned))
                .map_or_else(String::new, |id| format!("snapshot {id}: "));
            StageError::Config(format!(
                "{snapshot}refusing to restore into {}: {e}; restore that disk alone to a \
                 file instead",
                self.path.display()
            ))
        })?;
        Ok(self.path.join(format!("{disk}.{}", self.format.name())))
    }

    /// [`target::check`] with this stage's `force` and the domains of its connection, listed
    /// the first time a target exists (a new file needs no libvirt).
    fn check_target(&self, ctx: &RunContext, target: &Path) -> Result<(), StageError> {
        static NO_DOMAINS: target::Domains = target::Domains::Unavailable(String::new());
        let exists = std::fs::symlink_metadata(target).is_ok();
        let domains = if exists {
            self.domains.get_or_init(|| {
                let domains = target::Domains::list(self.uri.as_deref());
                if let Some(note) = domains.skipped_note() {
                    ctx.warn(note);
                }
                domains
            })
        } else {
            &NO_DOMAINS
        };
        if self.format == ImageFormat::Qcow2
            && std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device())
        {
            return Err(qcow2_on_device(target));
        }
        target::check(target, self.force, domains)
    }

    /// The targets this run will write, from the disks the restore's source planned
    /// ([`RESTORE_PLAN`]); `None` when no source recorded a plan (they are checked as they come).
    fn planned_targets(&self, ctx: &RunContext) -> Result<Option<Vec<PathBuf>>, StageError> {
        let results = ctx.results();
        let Some(plan) = results.get(RESTORE_PLAN).and_then(|p| p.as_array()) else {
            return Ok(None);
        };
        let disks: Vec<&str> = plan
            .iter()
            .filter_map(|d| d.get("disk").and_then(|n| n.as_str()))
            .collect();
        if self.path.is_dir() {
            return disks
                .iter()
                .map(|d| self.target_in_dir(ctx, d))
                .collect::<Result<_, _>>()
                .map(Some);
        }
        if disks.len() > 1 {
            return Err(StageError::Config(format!(
                "refusing to restore to {}: the snapshot has {} disks ({}), which are restored \
                 into a directory (DIR/DISK.{}): create it, or restore one disk with --disk",
                self.path.display(),
                disks.len(),
                disks.join(", "),
                self.format.name()
            )));
        }
        Ok(Some(vec![self.path.clone()]))
    }
}

fn qcow2_on_device(target: &Path) -> StageError {
    StageError::Config(format!(
        "{} is a block device: qcow2 images are written to files (use format raw)",
        target.display()
    ))
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with `RENAME_NOREPLACE`; on a
/// filesystem without it, a hard link, which also fails when `to` exists, and an unlink).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Registers the removal of `partial` for when the run did not succeed.
fn remove_on_failure(ctx: &RunContext, partial: &Path) {
    let partial = partial.to_owned();
    ctx.on_cleanup(
        format!("remove {}", partial.display()),
        Box::new(move |outcome| {
            if *outcome != Outcome::Succeeded && partial.exists() {
                std::fs::remove_file(&partial).map_err(|e| e.to_string())?;
            }
            Ok(())
        }),
    );
}

/// Creates `TARGET.partial` as an empty qcow2 of the disk's size and serves it writable through a
/// private `qemu-nbd` with at most `connections` clients. The cleanup actions (remove the
/// `.partial` unless the run succeeded; stop the server) are registered before either exists, so
/// that a failure at any later step leaves nothing behind.
fn qcow2_output(
    ctx: &RunContext,
    connections: usize,
    disk: &Arc<Disk>,
    target: PathBuf,
) -> Result<Output, StageError> {
    let writing = partial_path(&target);
    // Absolute, so that QEMU never reads a `name:` prefix of a relative path as a protocol.
    let image = std::path::absolute(&writing)
        .map_err(|e| StageError::io(format!("resolving {}", target.display()), e))?;
    remove_on_failure(ctx, &writing);
    if !disk.size().is_multiple_of(QCOW2_SECTOR) {
        ctx.warn(format!(
            "disk {} is {} bytes, not a multiple of {QCOW2_SECTOR}: its qcow2 image {} has a virtual size rounded up to {}",
            disk.name(),
            disk.size(),
            target.display(),
            disk.size().next_multiple_of(QCOW2_SECTOR)
        ));
    }
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(disk.size().to_string())
        .output()
        .map_err(|e| {
            StageError::io(
                format!("creating {}: running qemu-img", target.display()),
                e,
            )
        })?;
    if !created.status.success() {
        return Err(StageError::io(
            format!("creating {} with qemu-img", target.display()),
            io::Error::other(format!(
                "qemu-img exited with {}: {}",
                created.status,
                String::from_utf8_lossy(&created.stderr).trim()
            )),
        ));
    }

    let parent = std::env::temp_dir();
    let server = ServerDir::create(&parent).map_err(|e| {
        StageError::io(
            format!(
                "{}: creating a socket directory in {}",
                target.display(),
                parent.display()
            ),
            e,
        )
    })?;
    let stop = server.clone();
    ctx.on_cleanup(
        format!("stopping qemu-nbd for {}", target.display()),
        Box::new(move |_| stop.stop_and_remove()),
    );
    let started = QemuNbdServer::start(
        &server,
        &ServerConfig {
            image: &image,
            format: ImageFormat::Qcow2.name(),
            connections,
            read_only: false,
            bitmaps: &[],
        },
    )
    .map_err(|e| StageError::io(format!("{}: starting qemu-nbd", target.display()), e))?;
    let first = Client::connect_unix(started.socket(), EXPORT_NAME, &[])
        .map_err(|e| nbd_error(format!("{}: connecting to qemu-nbd", target.display()), e))?;
    if first.is_read_only() {
        return Err(StageError::Internal(format!(
            "qemu-nbd serves {} read-only",
            target.display()
        )));
    }
    if first.size() < disk.size() {
        return Err(StageError::Internal(format!(
            "qemu-nbd serves {} with {} bytes for a disk of {} bytes",
            target.display(),
            first.size(),
            disk.size()
        )));
    }
    tracing::debug!(
        disk = %disk.name(),
        path = %writing.display(),
        pid = started.pid(),
        "qcow2 output served."
    );
    Ok(Output {
        sink: Sink::Qcow2 {
            pool: ClientPool::new(
                started.socket().to_owned(),
                EXPORT_NAME,
                &[],
                connections,
                Some(first),
            ),
            server,
        },
        writing,
        final_path: target,
        disk: disk.clone(),
        written: AtomicU64::new(0),
        data: AtomicU64::new(0),
    })
}

/// qcow2 virtual sizes are whole 512-byte sectors; `qemu-img create` rounds up.
const QCOW2_SECTOR: u64 = 512;

fn nbd_error(context: String, e: NbdError) -> StageError {
    StageError::io(context, io::Error::other(e))
}

impl DiskWriter {
    /// Counts `bytes` written to `out` and, each time another [`FLUSH_EVERY`] bytes were written,
    /// asks the flusher to write back what is dirty. A busy flusher is not waited for.
    fn written(&self, out: &Output, file: &Arc<File>, bytes: u64) {
        if !self.sync {
            return;
        }
        let before = out.written.fetch_add(bytes, Ordering::Relaxed);
        if before / FLUSH_EVERY == (before + bytes) / FLUSH_EVERY {
            return;
        }
        let mut flusher = self.flusher.lock().unwrap();
        if flusher.is_none() {
            let (tx, rx) = crossbeam_channel::bounded::<Arc<File>>(1);
            let thread = std::thread::Builder::new()
                .name("disk-flusher".into())
                .spawn(move || {
                    for file in rx {
                        // Errors surface again at the final fsync, which is checked.
                        let _ = file.sync_data();
                    }
                });
            let Ok(thread) = thread else { return };
            *flusher = Some(Flusher {
                requests: tx,
                thread,
            });
        }
        if let Some(f) = flusher.as_ref() {
            let _ = f.requests.try_send(file.clone());
        }
    }

    fn stop_flusher(&self) {
        if let Some(f) = self.flusher.lock().unwrap().take() {
            drop(f.requests);
            let _ = f.thread.join();
        }
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

/// Counts data written to an output: for the stage, the output's line in the report and the
/// run's overall progress.
fn count_data(worker: &Worker<'_>, out: &Output, bytes: u64) {
    worker.count_out(bytes);
    out.data.fetch_add(bytes, Ordering::Relaxed);
    worker
        .ctx()
        .target_bytes_written
        .fetch_add(bytes, Ordering::Relaxed);
}

fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

/// Zeros written at a time on devices, where holes cannot be left.
const ZERO_BLOCK: usize = 1 << 20;

impl Stage for DiskWriter {
    fn io(&self) -> StageIo {
        StageIo {
            input: Some(MessageType::VerifiedChunk),
            output: None,
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        while let Some(message) = worker.recv() {
            let Message::Chunk(chunk) = message else {
                return Err(unexpected(KIND, &message));
            };
            if !chunk.verified {
                return Err(StageError::Internal(format!(
                    "chunk {} of disk {} reached the disk writer unverified",
                    chunk.index,
                    chunk.disk.name()
                )));
            }
            let out = self.output(worker.ctx(), worker.count(), &chunk.disk)?;
            let context = || {
                format!(
                    "writing {} at offset {}",
                    out.final_path.display(),
                    chunk.offset()
                )
            };
            let write_err = |e| StageError::io(context(), e);
            match (&chunk.payload, &out.sink) {
                (Payload::Raw(data), Sink::File { file, .. }) => {
                    file.write_all_at(data, chunk.offset()).map_err(write_err)?;
                    count_data(worker, &out, data.len() as u64);
                    self.written(&out, file, data.len() as u64);
                }
                (Payload::Raw(data), Sink::Qcow2 { pool, .. }) => {
                    pool.with_client(|c| c.write_at(chunk.offset(), data))
                        .map_err(|e| nbd_error(context(), e))?;
                    count_data(worker, &out, data.len() as u64);
                }
                (
                    Payload::Zero { count },
                    Sink::File {
                        file,
                        sparse: false,
                    },
                ) => {
                    let start = chunk.offset();
                    let end = ((chunk.index + count) * u64::from(chunk.disk.chunk_size))
                        .min(chunk.disk.size());
                    let zeros = vec![0u8; ZERO_BLOCK];
                    let mut at = start;
                    while at < end {
                        let n = ((end - at) as usize).min(ZERO_BLOCK);
                        file.write_all_at(&zeros[..n], at).map_err(write_err)?;
                        at += n as u64;
                    }
                }
                // Holes of a sized file, or a fresh qcow2: both read as zeros already.
                (Payload::Zero { .. }, _) => {}
                _ => return Err(unexpected(KIND, &Message::Chunk(chunk))),
            }
        }
        Ok(())
    }

    /// Refuses, before any data moves, a target this run must not write (`target` module).
    fn preflight(&self, ctx: &RunContext) -> Result<(), StageError> {
        if let Some(targets) = self.planned_targets(ctx)? {
            for target in &targets {
                self.check_target(ctx, target)?;
            }
        }
        Ok(())
    }

    fn finish(&self, ctx: &RunContext) -> Result<(), StageError> {
        self.stop_flusher();
        let outputs = self.outputs.lock().unwrap();
        let mut restored = Vec::new();
        for out in outputs.values() {
            match &out.sink {
                Sink::File { file, .. } => {
                    if self.sync {
                        file.sync_all().map_err(|e| {
                            StageError::io(format!("syncing {}", out.final_path.display()), e)
                        })?;
                    }
                }
                Sink::Qcow2 { pool, server } => self.close_qcow2(out, pool, server)?,
            }
            if out.writing != out.final_path {
                let renamed = if self.force {
                    std::fs::rename(&out.writing, &out.final_path)
                } else {
                    rename_no_replace(&out.writing, &out.final_path)
                };
                renamed.map_err(|e| {
                    let why = if e.kind() == io::ErrorKind::AlreadyExists {
                        " (it was created while the restore ran; --force replaces it)"
                    } else {
                        ""
                    };
                    StageError::io(
                        format!("putting {} in place{why}", out.final_path.display()),
                        e,
                    )
                })?;
                if self.sync {
                    let dir = out
                        .final_path
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty());
                    let dir = dir.unwrap_or(Path::new("."));
                    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
                        StageError::io(format!("syncing directory {}", dir.display()), e)
                    })?;
                }
            }
            tracing::info!(disk = %out.disk.name(), path = %out.final_path.display(), "Disk restored.");
            restored.push(serde_json::json!({
                "disk": out.disk.name(),
                "path": out.final_path.display().to_string(),
                "size": out.disk.size(),
                "written": out.data.load(Ordering::Relaxed),
                "format": self.format.name(),
            }));
        }
        ctx.set_result("restored", serde_json::Value::Array(restored));
        Ok(())
    }
}

impl DiskWriter {
    /// Ends a qcow2 output before its rename: every write made durable over NBD (`sync`), the
    /// clients disconnected, the server stopped (it closes the image, writing its metadata out),
    /// then the file fsynced (`sync`) for what the close wrote.
    fn close_qcow2(
        &self,
        out: &Output,
        pool: &ClientPool,
        server: &ServerDir,
    ) -> Result<(), StageError> {
        let path = out.final_path.display();
        if self.sync {
            pool.for_each_idle(Client::flush)
                .map_err(|e| nbd_error(format!("flushing {path} over NBD"), e))?;
        }
        pool.close_all()
            .map_err(|e| nbd_error(format!("disconnecting from qemu-nbd for {path}"), e))?;
        server.stop_and_remove().map_err(|e| {
            StageError::io(format!("stopping qemu-nbd for {path}"), io::Error::other(e))
        })?;
        if self.sync {
            File::open(&out.writing)
                .and_then(|f| f.sync_all())
                .map_err(|e| StageError::io(format!("syncing {path}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: &str) -> Result<DiskWriterOptions, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn format_defaults_to_raw_and_accepts_only_raw_and_qcow2() {
        assert_eq!(
            options(r#"{"path": "a"}"#).unwrap().format,
            ImageFormat::Raw
        );
        assert_eq!(
            options(r#"{"path": "a", "format": "qcow2"}"#)
                .unwrap()
                .format,
            ImageFormat::Qcow2
        );
        let vmdk = options(r#"{"path": "a", "format": "vmdk"}"#)
            .unwrap_err()
            .to_string();
        assert!(vmdk.contains("raw") && vmdk.contains("qcow2"), "{vmdk}");
        assert_eq!(
            serde_json::to_value(DiskWriterOptions::default()).unwrap()["format"],
            "raw"
        );
    }
}
