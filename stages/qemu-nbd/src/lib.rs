//! Source stage `qemu-nbd`: any image QEMU reads (qcow2 above all), exported read-only by a private
//! `qemu-nbd` and read over NBD.
//!
//! Why a server rather than a qcow2 parser: QEMU already knows every format, backing chain,
//! compression and encryption detail; reading its NBD export gives us the guest-visible bytes and,
//! through `base:allocation`, which ranges hold data, so unallocated clusters are never read.
//!
//! # Lifetime of the server
//! At run time the stage creates a private directory (mode 0700) for the socket, pid file and
//! the server's stderr, registers a cleanup action that stops the server by the pid in the pid file
//! and removes the directory whatever the outcome, and only then starts
//! `qemu-nbd --read-only --persistent --fork`. `--fork` returns once the socket accepts
//! connections. The cleanup action is registered first so that a server which started but failed
//! later (or a run that failed elsewhere) is still stopped.
//!
//! # Layout
//! - [`server`]: starting and stopping the `qemu-nbd` process.
//! - [`export`]: the [`BlockSource`](backflow_pipeline::BlockSource) over a pool of NBD clients.

pub mod export;
pub mod pool;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

use backflow_pipeline::{
    BlockSource, DiskSource, InvalidOption, Message, MessageType, Stage, StageError, StageIo, Work,
    Worker,
};
use serde::{Deserialize, Serialize};

pub use export::NbdExport;
pub use pool::ClientPool;
pub use server::{QemuNbdServer, ServerConfig, ServerDir};

pub const KIND: &str = "qemu-nbd";

/// Image formats the stage passes to `qemu-nbd -f`. Probing is not offered: a raw image whose
/// first bytes look like a qcow2 header would be misread (QEMU's own advice).
pub const FORMATS: &[&str] = &["qcow2", "raw"];

/// Default number of NBD connections: one per reader worker of the shipped spec.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Options of the `qemu-nbd` source.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QemuNbdOptions {
    /// Path of the image (required).
    pub path: Option<PathBuf>,
    /// The image format given to `qemu-nbd -f`.
    #[serde(default = "default_format")]
    pub format: String,
    /// The disk's name in the manifest; empty: the file name without its extension.
    #[serde(default)]
    pub disk: String,
    /// The machine the snapshot belongs to; empty: the disk's name.
    #[serde(default)]
    pub vm: String,
    /// Most NBD connections open at once (the server's `--shared`).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Where the private socket directory is created; empty: the system's temporary directory.
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
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
        }
    }
}

/// Documentation of each option, for `backflow stages`.
pub const OPTION_DOCS: &[(&str, &str)] = &[
    (
        "path",
        "image file QEMU can read, qcow2 above all (required)",
    ),
    ("format", "image format given to qemu-nbd: qcow2 or raw"),
    (
        "disk",
        "the disk's name in the manifest; empty: the file name without extension",
    ),
    (
        "vm",
        "the machine the snapshot belongs to; empty: the disk's name",
    ),
    (
        "connections",
        "most NBD connections open at once (qemu-nbd --shared)",
    ),
    (
        "socket_dir",
        "where the private socket directory is made; unset: the system's temporary directory",
    ),
];

/// The runtime value: the server is started when the run starts.
#[derive(Debug)]
pub struct QemuNbd {
    path: PathBuf,
    format: String,
    disk: String,
    vm: String,
    connections: usize,
    socket_dir: PathBuf,
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
        let (disk, vm) = DiskSource::names_for(&path, options.disk, options.vm);
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
        })
    }
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
        let dir = ServerDir::create(&self.socket_dir).map_err(|e| {
            StageError::io(
                format!(
                    "image {image}: creating a socket directory in {}",
                    self.socket_dir.display()
                ),
                e,
            )
        })?;
        let stop = dir.clone();
        worker.ctx().on_cleanup(
            format!("stopping qemu-nbd for {image}"),
            Box::new(move |_| stop.stop_and_remove()),
        );
        let server = QemuNbdServer::start(
            &dir,
            &ServerConfig::read_only(&self.path, &self.format, self.connections),
        )
        .map_err(|e| StageError::io(format!("image {image}: starting qemu-nbd"), e))?;
        let export = NbdExport::open(
            server.socket().to_owned(),
            server::EXPORT_NAME,
            self.path.clone(),
            self.connections,
        )
        .map_err(|e| StageError::io(format!("image {image}: opening the NBD export"), e))?;
        tracing::debug!(image = %image, size = export.size(), "qemu-nbd export opened.");
        let disk = DiskSource {
            vm: self.vm.clone(),
            name: self.disk.clone(),
            location: self.path.clone(),
            reader: Arc::new(export),
            tracking: None,
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
        assert_eq!(stage.vm, "web01");
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
    }
}
