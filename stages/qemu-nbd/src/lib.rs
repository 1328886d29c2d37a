//! Source stage `qemu-nbd`: any image QEMU reads (qcow2 above all), exported read-only by a private
//! `qemu-nbd` and read over NBD.
//!
//! Why a server rather than a qcow2 parser: QEMU already knows every format, backing chain,
//! compression and encryption detail; reading its NBD export gives us the guest-visible bytes and,
//! through `base:allocation`, which ranges hold data, so unallocated clusters are never read.
//!
//! # Lifetime of the server
//! At run time the stage creates a private directory (mode 0700) for the socket, pid file and
//! the server's stderr, registers a cleanup action that stops the server and removes the
//! directory whatever the outcome, and only then starts `qemu-nbd --read-only --persistent` as
//! its child, ready once it wrote its pid file. The cleanup action is registered first so that a
//! server which started but failed later (or a run that failed elsewhere) is still stopped; the
//! server is our child, waited for when stopped, so it never stays behind as a zombie. The
//! server, the pooled export and the bitmaps are the `backflow-qemu` crate's, shared with the
//! other stages that use QEMU.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::input::InputError;
use backflow_pipeline::{
    BlockSource, ChangeTracking, DiskSource, InvalidOption, Message, MessageType, Outcome, Stage,
    StageError, StageIo, Work, Worker,
};
use serde::{Deserialize, Serialize};

use backflow_qemu::server::EXPORT_NAME;
use backflow_qemu::{
    BitmapChain, BitmapTracking, NbdExport, QemuNbdServer, ServerConfig, ServerDir,
};

pub const KIND: &str = "qemu-nbd";

/// Image formats the stage passes to `qemu-nbd -f`. Probing is not offered: a raw image whose
/// first bytes look like a qcow2 header would be misread (QEMU's own advice).
pub const FORMATS: &[&str] = &["qcow2", "raw"];

/// Default number of NBD connections: one per reader worker of the shipped spec.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Options of the `qemu-nbd` source.
#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct QemuNbdOptions {
    /// Image file QEMU can read, qcow2 above all (required).
    pub path: Option<PathBuf>,
    /// Image format given to `qemu-nbd -f`: qcow2 or raw (never probed).
    #[serde(default = "default_format")]
    pub format: String,
    /// The disk's name in the manifest; empty: the file name without its extension.
    #[serde(default)]
    pub disk: String,
    /// The identity of the snapshots (retention, `latest` and parents go by it); empty: the image's
    /// canonical absolute path, so that `/a/disk.qcow2` and `/b/disk.qcow2` are never confused.
    #[serde(default)]
    pub vm: String,
    /// Most NBD connections open at once (`qemu-nbd --shared`).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Where the private socket directory is made; unset: the system's temporary directory.
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// Track changes with qcow2 persistent bitmaps named `BITMAP.*` (qcow2 only; letters, digits, -
    /// and _); empty: no tracking.
    #[serde(default)]
    pub bitmap: String,
}

fn default_format() -> String {
    "qcow2".to_owned()
}

fn default_connections() -> usize {
    DEFAULT_CONNECTIONS
}

impl Default for QemuNbdOptions {
    fn default() -> Self {
        QemuNbdOptions {
            path: None,
            format: default_format(),
            disk: String::new(),
            vm: String::new(),
            connections: DEFAULT_CONNECTIONS,
            socket_dir: None,
            bitmap: String::new(),
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "source: any image QEMU reads (qcow2), through a private read-only qemu-nbd on a unix socket; unallocated and zero clusters are never read; the server is backflow's own child, stopped and waited for when the run ends (one left by a killed run is stopped by the next); with `bitmap`, tracks changes with persistent bitmaps `BITMAP.*`",
    input: None,
    output: Some(MessageType::Disk),
    repository: RepositoryUse::No,
    options: option_docs::<QemuNbdOptions>,
    build: Build::Stage(|options| build_stage(options, QemuNbd::new)),
};

/// The runtime value: the server is started when the run starts.
#[derive(Debug)]
pub struct QemuNbd {
    path: PathBuf,
    format: String,
    disk: String,
    vm: String,
    connections: usize,
    socket_dir: PathBuf,
    bitmap: Option<String>,
}

impl QemuNbd {
    pub fn new(options: QemuNbdOptions) -> Result<Self, InvalidOption> {
        let path = options
            .path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| InvalidOption::new("path", "is required: the image file to read"))?;
        if !FORMATS.contains(&options.format.as_str()) {
            return Err(InvalidOption::new(
                "format",
                format!(
                    "`{}` is not supported; use one of: {}",
                    options.format,
                    FORMATS.join(", ")
                ),
            ));
        }
        if options.connections == 0 {
            return Err(InvalidOption::new("connections", "must be at least 1"));
        }
        let bitmap = match options.bitmap.as_str() {
            "" => None,
            name => {
                check_bitmap_prefix(name).map_err(|e| InvalidOption::new("bitmap", e))?;
                if options.format != "qcow2" {
                    return Err(InvalidOption::new(
                        "bitmap",
                        format!(
                            "needs format qcow2 (persistent bitmaps live in qcow2 images), not {}",
                            options.format
                        ),
                    ));
                }
                Some(name.to_owned())
            }
        };
        let (disk, vm) = DiskSource::checked_names_for(&path, options.disk, options.vm)?;
        let socket_dir = options
            .socket_dir
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(std::env::temp_dir);
        Ok(QemuNbd {
            path,
            format: options.format,
            disk,
            vm,
            connections: options.connections,
            socket_dir,
            bitmap,
        })
    }
}

/// Bitmap prefixes are plain names: a dot would let one spec's `a` claim another's `a.b.*`.
fn check_bitmap_prefix(name: &str) -> Result<(), String> {
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{name}` is not a bitmap name: use at most 64 letters, digits, - and _"
        ));
    }
    Ok(())
}

impl Stage for QemuNbd {
    fn io(&self) -> StageIo {
        StageIo {
            input: None,
            output: Some(MessageType::Disk),
        }
    }

    fn work(&self) -> Work {
        Work::Io
    }

    fn run(&self, worker: &mut Worker<'_>) -> Result<(), StageError> {
        if worker.index() != 0 {
            return Ok(());
        }
        let image = self.path.display().to_string();
        // Before qemu-img or qemu-nbd opens it: a FIFO would block them (and this run) for good.
        backflow_pipeline::input::check_source(&self.path).map_err(|e| match e {
            InputError::Io(e) => StageError::io(format!("image {image}"), e),
            other => StageError::Config(format!("image {image} {other}")),
        })?;
        for cleaned in ServerDir::sweep_orphans(&self.socket_dir) {
            worker
                .ctx()
                .warn(format!("cleaned up after a run that was killed: {cleaned}"));
        }
        // Tracking: inspect the image's bitmaps and add this run's before anything opens it.
        let chain = match &self.bitmap {
            Some(prefix) => {
                let chain = BitmapChain::inspect(&self.path, prefix).map_err(|e| {
                    StageError::io(format!("image {image}: reading its bitmaps"), e)
                })?;
                // Without a bitmap of its own this run cannot start the next link: it reads
                // everything (the map stage says so) rather than fail.
                match chain.add_next() {
                    Ok(()) => Some(Arc::new(chain)),
                    Err(e) => {
                        worker.ctx().warn(format!(
                            "image {image}: changes cannot be tracked: adding bitmap {}: {e}",
                            chain.next()
                        ));
                        None
                    }
                }
            }
            None => None,
        };
        let committed = Arc::new(AtomicBool::new(false));
        let dir = match ServerDir::create(&self.socket_dir) {
            Ok(dir) => dir,
            Err(e) => {
                if let Some(chain) = &chain {
                    chain.settle(false);
                }
                return Err(StageError::io(
                    format!(
                        "image {image}: creating a socket directory in {}",
                        self.socket_dir.display()
                    ),
                    e,
                ));
            }
        };
        // One action: the server must be gone before bitmaps can be removed from the image.
        let stop = dir.clone();
        let settle_chain = chain.clone();
        let settle_committed = committed.clone();
        worker.ctx().on_cleanup(
            format!("stopping qemu-nbd for {image}"),
            Box::new(move |outcome| {
                let stopped = stop.stop_and_remove();
                if let Some(chain) = settle_chain {
                    // A server that could not be stopped may still hold the image: leave the
                    // bitmaps as they are (the old base stays valid either way).
                    let committed = stopped.is_ok()
                        && *outcome == Outcome::Succeeded
                        && settle_committed.load(Ordering::SeqCst);
                    if stopped.is_ok() {
                        for left in chain.settle(committed) {
                            tracing::warn!("Left behind, removed by the next run: {left}.");
                        }
                    }
                }
                stopped
            }),
        );
        let exported = chain.as_ref().map(|c| c.exportable()).unwrap_or_default();
        let server = QemuNbdServer::start(
            &dir,
            &ServerConfig {
                bitmaps: &exported,
                ..ServerConfig::read_only(&self.path, &self.format, self.connections)
            },
        )
        .map_err(|e| StageError::io(format!("image {image}: starting qemu-nbd"), e))?;
        let export = Arc::new(
            NbdExport::open_with_bitmaps(
                server.socket().to_owned(),
                EXPORT_NAME,
                self.path.clone(),
                self.connections,
                &exported,
            )
            .map_err(|e| StageError::io(format!("image {image}: opening the NBD export"), e))?,
        );
        tracing::debug!(image = %image, size = export.size(), bitmaps = ?exported, "qemu-nbd export opened.");
        let tracking = chain.map(|chain| {
            Arc::new(BitmapTracking::new(chain, export.clone(), committed))
                as Arc<dyn ChangeTracking>
        });
        let (vm, location) = DiskSource::identity_for(&self.path, &self.vm)?;
        let disk = DiskSource {
            vm,
            name: self.disk.clone(),
            location,
            reader: export,
            tracking,
            definition: None,
        };
        let _ = worker.send(Message::Disk(Arc::new(disk)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_and_validate() {
        let stage = QemuNbd::new(QemuNbdOptions {
            path: Some("/srv/web01.qcow2".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(stage.disk, "web01");
        assert_eq!(
            stage.vm, "",
            "the identity comes from the canonical path at run time"
        );
        assert_eq!(stage.format, "qcow2");
        assert_eq!(stage.connections, DEFAULT_CONNECTIONS);

        let missing = QemuNbd::new(QemuNbdOptions::default()).unwrap_err();
        assert_eq!(missing.option, "path");
        let vmdk = QemuNbd::new(QemuNbdOptions {
            path: Some("/a.vmdk".into()),
            format: "vmdk".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(vmdk.option, "format");
        for bad in ["a.b", "has space", "ü"] {
            let err = QemuNbd::new(QemuNbdOptions {
                path: Some("/a.qcow2".into()),
                bitmap: bad.into(),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(err.option, "bitmap", "{bad}");
        }
        let raw = QemuNbd::new(QemuNbdOptions {
            path: Some("/a.img".into()),
            format: "raw".into(),
            bitmap: "backflow".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(raw.option, "bitmap");
    }
}
