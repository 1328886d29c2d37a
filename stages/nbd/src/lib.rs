//! Source stage `nbd`: a disk read from an NBD export that someone else serves: a `qemu-nbd` or
//! `nbdkit` started by hand, or (later) libvirt's pull-mode backup export.
//!
//! The difference from the `qemu-nbd` stage is ownership of the server: that stage starts a
//! private server and stops it when the run ends; this one only connects. It neither starts nor
//! stops anything, so a server that is missing at run time is an error naming the endpoint, and a
//! server that outlives the run is whoever started it's business.
//!
//! Reading goes through [`backflow_qemu::NbdExport`]: a pool of at most `connections` NBD
//! clients, each lent to one reader at a time (which may keep several requests in flight on it),
//! and `base:allocation` so that ranges the server reports as zeros are never read.
//!
//! # Endpoints
//! Either `socket` (a unix socket) or `host` + `port` (TCP, plain: no TLS). The manifest records
//! the export as an NBD URI (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`), and errors
//! name it the same way.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use backflow_pipeline::describe::{
    Build, KindRow, OptionDocs, RepositoryUse, build_stage, option_docs,
};
use backflow_pipeline::{
    BlockSource, DiskSource, InvalidOption, Message, MessageType, Stage, StageError, StageIo, Work,
    Worker,
};
use backflow_qemu::NbdExport;
pub use backflow_qemu::pool::NbdAddress;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "nbd";

/// Default number of NBD connections: one per reader worker of the shipped specs.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Options of the `nbd` source.
#[derive(Clone, Debug, Deserialize, Serialize, OptionDocs)]
#[serde(deny_unknown_fields)]
pub struct NbdOptions {
    /// The NBD server's unix socket; either this or `host` and `port`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The NBD server's host name or address, for TCP (plain, no TLS).
    #[serde(default)]
    pub host: String,
    /// The NBD server's TCP port, with `host`.
    #[serde(default)]
    pub port: Option<u16>,
    /// The export name to ask for; "" for a server's only export.
    #[serde(default)]
    pub export: String,
    /// The disk's name in the manifest (required): an export has no file name to take it from.
    #[serde(default)]
    pub disk: Option<String>,
    /// The machine the snapshot belongs to; empty: the disk's name.
    #[serde(default)]
    pub vm: String,
    /// Most NBD connections open at once.
    #[serde(default = "default_connections")]
    pub connections: usize,
}

fn default_connections() -> usize {
    DEFAULT_CONNECTIONS
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            socket: None,
            host: String::new(),
            port: None,
            export: String::new(),
            disk: None,
            vm: String::new(),
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// This kind as the catalog, `backflow stages` and the README list it.
pub const ROW: KindRow = KindRow {
    kind: KIND,
    summary: "source: an NBD export someone else serves (qemu-nbd, nbdkit); zero ranges are skipped; the server is left running",
    input: None,
    output: Some(MessageType::Disk),
    repository: RepositoryUse::No,
    options: option_docs::<NbdOptions>,
    build: Build::Stage(|options| build_stage(options, NbdSource::new)),
};

/// The runtime value: connects when the run starts.
#[derive(Debug)]
pub struct NbdSource {
    endpoint: NbdAddress,
    export: String,
    disk: String,
    vm: String,
    connections: usize,
}

impl NbdSource {
    pub fn new(options: NbdOptions) -> Result<Self, InvalidOption> {
        let socket = options.socket.filter(|p| !p.as_os_str().is_empty());
        let endpoint = match (socket, options.host.is_empty(), options.port) {
            (Some(_), false, _) | (Some(_), _, Some(_)) => {
                return Err(InvalidOption::new(
                    "socket",
                    "give either socket (unix) or host and port (TCP), not both",
                ));
            }
            (Some(socket), true, None) => NbdAddress::Unix(socket),
            (None, true, None) => {
                return Err(InvalidOption::new(
                    "socket",
                    "is required: the NBD server's unix socket (or host and port for TCP)",
                ));
            }
            (None, false, None) => {
                return Err(InvalidOption::new("port", "is required with host"));
            }
            (None, true, Some(_)) => {
                return Err(InvalidOption::new("host", "is required with port"));
            }
            (None, false, Some(0)) => {
                return Err(InvalidOption::new("port", "must be 1..65535"));
            }
            (None, false, Some(port)) => NbdAddress::Tcp {
                host: options.host,
                port,
            },
        };
        let disk = options.disk.filter(|d| !d.is_empty()).ok_or_else(|| {
            InvalidOption::new(
                "disk",
                "is required: the disk's name in the manifest (an export has no file name)",
            )
        })?;
        backflow_repository::check_disk_name(&disk)
            .map_err(|e| InvalidOption::new("disk", e.to_string()))?;
        if options.connections == 0 {
            return Err(InvalidOption::new("connections", "must be at least 1"));
        }
        let vm = if options.vm.is_empty() {
            disk.clone()
        } else {
            backflow_repository::check_vm_name(&options.vm)
                .map_err(|e| InvalidOption::new("vm", e.to_string()))?;
            options.vm
        };
        Ok(NbdSource {
            endpoint,
            export: options.export,
            disk,
            vm,
            connections: options.connections,
        })
    }

    pub fn endpoint(&self) -> &NbdAddress {
        &self.endpoint
    }

    /// The export as an NBD URI.
    pub fn uri(&self) -> String {
        self.endpoint.uri(&self.export)
    }

    /// Connects to the export (once, to learn its size; the pool opens the other connections as
    /// readers need them).
    pub fn open(&self) -> Result<NbdExport, StageError> {
        let uri = self.uri();
        if let NbdAddress::Unix(socket) = &self.endpoint
            && !socket.exists()
        {
            return Err(StageError::io(
                format!(
                    "NBD export {uri}: the socket {} does not exist (is the NBD server running?)",
                    socket.display()
                ),
                io::Error::from(io::ErrorKind::NotFound),
            ));
        }
        NbdExport::connect(
            self.endpoint.clone(),
            &self.export,
            format!("NBD export {uri}"),
            self.connections,
            &[],
        )
        .map_err(|e| StageError::io(format!("NBD export {uri}: connecting"), e))
    }
}

impl Stage for NbdSource {
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
        let export = self.open()?;
        tracing::debug!(export = %self.uri(), size = export.size(), "NBD export opened.");
        let disk = DiskSource {
            vm: self.vm.clone(),
            name: self.disk.clone(),
            location: PathBuf::from(self.uri()),
            reader: Arc::new(export),
            tracking: None,
            definition: None,
        };
        let _ = worker.send(Message::Disk(Arc::new(disk)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(socket: &str) -> NbdOptions {
        NbdOptions {
            socket: Some(socket.into()),
            disk: Some("vda".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let stage = NbdSource::new(unix("/run/nbd.sock")).unwrap();
        assert_eq!(stage.endpoint(), &NbdAddress::Unix("/run/nbd.sock".into()));
        assert_eq!(stage.vm, "vda");
        assert_eq!(stage.connections, DEFAULT_CONNECTIONS);
        assert_eq!(stage.uri(), "nbd+unix:///?socket=/run/nbd.sock");
        let named = NbdSource::new(NbdOptions {
            export: "vda".into(),
            vm: "web01".into(),
            ..unix("/run/nbd.sock")
        })
        .unwrap();
        assert_eq!(named.vm, "web01");
        assert_eq!(named.uri(), "nbd+unix:///vda?socket=/run/nbd.sock");
    }

    #[test]
    fn options_deserialize_with_defaults() {
        let options: NbdOptions =
            serde_json::from_str(r#"{"socket": "/s", "disk": "vda"}"#).expect("valid options");
        assert_eq!(options.connections, DEFAULT_CONNECTIONS);
        assert!(serde_json::from_str::<NbdOptions>(r#"{"sokcet": "/s"}"#).is_err());
    }

    #[test]
    fn invalid_options_name_the_option() {
        let err = |o: NbdOptions| NbdSource::new(o).unwrap_err().option;
        assert_eq!(
            err(NbdOptions {
                disk: Some("vda".into()),
                ..Default::default()
            }),
            "socket"
        );
        assert_eq!(
            err(NbdOptions {
                disk: Some(String::new()),
                ..unix("/s")
            }),
            "disk"
        );
        assert_eq!(
            err(NbdOptions {
                host: "127.0.0.1".into(),
                port: Some(10809),
                ..unix("/s")
            }),
            "socket"
        );
        assert_eq!(
            err(NbdOptions {
                socket: None,
                host: "127.0.0.1".into(),
                ..unix("/s")
            }),
            "port"
        );
        assert_eq!(
            err(NbdOptions {
                socket: None,
                port: Some(10809),
                ..unix("/s")
            }),
            "host"
        );
        assert_eq!(
            err(NbdOptions {
                connections: 0,
                ..unix("/s")
            }),
            "connections"
        );
        assert_eq!(
            err(NbdOptions {
                socket: None,
                host: "127.0.0.1".into(),
                port: Some(0),
                ..unix("/s")
            }),
            "port"
        );
    }

    #[test]
    fn tcp_endpoints() {
        let stage = NbdSource::new(NbdOptions {
            socket: None,
            host: "127.0.0.1".into(),
            port: Some(10809),
            export: "vda".into(),
            ..unix("/s")
        })
        .unwrap();
        assert_eq!(
            stage.endpoint(),
            &NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            }
        );
        assert_eq!(stage.uri(), "nbd://127.0.0.1:10809/vda");
    }

    #[test]
    fn tcp_uris() {
        let v4 = NbdAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
        };
        assert_eq!(v4.uri("vda"), "nbd://127.0.0.1:10809/vda");
        let v6 = NbdAddress::Tcp {
            host: "::1".into(),
            port: 10809,
        };
        assert_eq!(v6.uri(""), "nbd://[::1]:10809/");
    }
}
