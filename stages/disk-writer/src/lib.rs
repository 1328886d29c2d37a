//! Disk writer stage (restores): writes verified chunks into raw images or block devices.
//!
//! Workers write in parallel at each chunk's offset, so arrival order does not matter. A new image
//! is written as `NAME.partial`, sized first so that zero chunks stay holes (sparse output), and
//! renamed into place only when the whole run succeeded: a failed restore leaves no file that
//! looks complete. Block devices are written in place, with zero chunks written out as zeros.
//!
//! `path` names the output file when one disk is restored; when it is an existing directory each
//! disk goes to `DIR/DISK.raw`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backflow_pipeline::{
    Disk, InvalidOption, Message, MessageType, Outcome, Payload, RunContext, Stage, StageError,
    StageIo, Work, Worker, stage::unexpected,
};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "disk-writer";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskWriterOptions {
    /// Output file (one disk) or existing directory (`DIR/DISK.raw` per disk). Required.
    pub path: Option<PathBuf>,
    /// Make the data durable (fsync) before the restore reports success.
    #[serde(default = "yes")]
    pub sync: bool,
}

impl Default for DiskWriterOptions {
    fn default() -> Self {
        DiskWriterOptions {
            path: None,
            sync: true,
        }
    }
}

fn yes() -> bool {
    true
}

pub const OPTION_DOCS: &[(&str, &str)] = &[
    (
        "path",
        "output file for one disk, or an existing directory for DIR/DISK.raw per disk (required)",
    ),
    (
        "sync",
        "make the restored data durable (fsync) before reporting success; flushing starts during the restore",
    ),
];

/// While a restore runs, the data written so far is flushed every this many bytes by a background
/// thread, so that the final fsync finds little left to write: the kernel would otherwise hold
/// gigabytes of dirty pages and write them only at the end.
pub const FLUSH_EVERY: u64 = 128 << 20;

struct Output {
    file: Arc<File>,
    /// Where the data is written now, and where it goes once the run succeeded (same for devices).
    writing: PathBuf,
    final_path: PathBuf,
    /// Holes need not be written: the file was created empty and sized.
    sparse: bool,
    disk: Arc<Disk>,
    /// Bytes written, to trigger background flushes.
    written: AtomicU64,
}

pub struct DiskWriter {
    path: PathBuf,
    sync: bool,
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
            outputs: Mutex::new(HashMap::new()),
            flusher: Mutex::new(None),
        })
    }

    fn output(&self, ctx: &RunContext, disk: &Arc<Disk>) -> Result<Arc<Output>, StageError> {
        let mut outputs = self.outputs.lock().unwrap();
        if let Some(out) = outputs.get(disk.name()) {
            return Ok(out.clone());
        }
        let target = if self.path.is_dir() {
            self.path.join(format!("{}.raw", disk.name()))
        } else if outputs.is_empty() {
            self.path.clone()
        } else {
            return Err(StageError::Config(format!(
                "several disks are restored but {} is not a directory",
                self.path.display()
            )));
        };
        let is_device = std::fs::metadata(&target)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let output = if is_device {
            let file = OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| StageError::io(format!("opening {}", target.display()), e))?;
            Output {
                file: Arc::new(file),
                writing: target.clone(),
                final_path: target,
                sparse: false,
                disk: disk.clone(),
                written: AtomicU64::new(0),
            }
        } else {
            let writing = partial_path(&target);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&writing)
                .map_err(|e| StageError::io(format!("creating {}", writing.display()), e))?;
            file.set_len(disk.size())
                .map_err(|e| StageError::io(format!("sizing {}", writing.display()), e))?;
            let partial = writing.clone();
            ctx.on_cleanup(
                format!("remove {}", partial.display()),
                Box::new(move |outcome| {
                    if *outcome != Outcome::Succeeded && partial.exists() {
                        std::fs::remove_file(&partial).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }),
            );
            Output {
                file: Arc::new(file),
                writing,
                final_path: target,
                sparse: true,
                disk: disk.clone(),
                written: AtomicU64::new(0),
            }
        };
        let output = Arc::new(output);
        outputs.insert(disk.name().to_owned(), output.clone());
        Ok(output)
    }
}

impl DiskWriter {
    /// Counts `bytes` written to `out` and, each time another [`FLUSH_EVERY`] bytes were written,
    /// asks the flusher to write back what is dirty. A busy flusher is not waited for.
    fn written(&self, out: &Output, bytes: u64) {
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
            let _ = f.requests.try_send(out.file.clone());
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
            let out = self.output(worker.ctx(), &chunk.disk)?;
            let write_err = |e| {
                StageError::io(
                    format!(
                        "writing {} at offset {}",
                        out.writing.display(),
                        chunk.offset()
                    ),
                    e,
                )
            };
            match &chunk.payload {
                Payload::Raw(data) => {
                    out.file
                        .write_all_at(data, chunk.offset())
                        .map_err(write_err)?;
                    worker.count_out(data.len() as u64);
                    self.written(&out, data.len() as u64);
                }
                Payload::Zero { count } if !out.sparse => {
                    let start = chunk.offset();
                    let end = ((chunk.index + count) * u64::from(chunk.disk.chunk_size))
                        .min(chunk.disk.size());
                    let zeros = vec![0u8; ZERO_BLOCK];
                    let mut at = start;
                    while at < end {
                        let n = ((end - at) as usize).min(ZERO_BLOCK);
                        out.file.write_all_at(&zeros[..n], at).map_err(write_err)?;
                        at += n as u64;
                    }
                }
                Payload::Zero { .. } => {}
                _ => return Err(unexpected(KIND, &Message::Chunk(chunk))),
            }
        }
        Ok(())
    }

    fn finish(&self, ctx: &RunContext) -> Result<(), StageError> {
        self.stop_flusher();
        let outputs = self.outputs.lock().unwrap();
        let mut restored = Vec::new();
        for out in outputs.values() {
            if self.sync {
                out.file
                    .sync_all()
                    .map_err(|e| StageError::io(format!("syncing {}", out.writing.display()), e))?;
            }
            if out.writing != out.final_path {
                std::fs::rename(&out.writing, &out.final_path).map_err(|e| {
                    StageError::io(format!("renaming {} into place", out.writing.display()), e)
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
            }));
        }
        ctx.set_result("restored", serde_json::Value::Array(restored));
        Ok(())
    }
}
