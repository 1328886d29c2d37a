//! QEMU as infrastructure for the stages that read or write images through it: the `qemu-nbd`
//! source, the `libvirt` source (a shut-off VM's images), the `nbd` source (someone else's
//! server, read through the same pooled export) and the `disk-writer` (qcow2 targets).
//!
//! Why a crate of its own rather than the `qemu-nbd` stage's modules: stages depend on
//! infrastructure crates, never on each other, so that a stage can be replaced or removed
//! without touching the others; the server's lifetime rules below are shared by all of them.
//!
//! # Lifetime of a server
//! A caller creates a private directory (mode 0700) for the socket, pid file and the server's
//! stderr ([`ServerDir`]), registers a cleanup action that stops the server and removes the
//! directory whatever the outcome, and only then starts `qemu-nbd` as its child
//! ([`QemuNbdServer`]), ready once it wrote its pid file. The server is our child, waited for
//! when stopped, so it never stays behind as a zombie; one left by a killed run is stopped by the
//! next ([`ServerDir::sweep_orphans`]).
//!
//! # Layout
//! - [`server`]: starting and stopping the `qemu-nbd` process.
//! - [`pool`]: at most N NBD connections to one export, shared by a stage's workers.
//! - [`export`]: the [`BlockSource`](backflow_pipeline::BlockSource) over such a pool.
//! - [`bitmap`]: qcow2 persistent bitmaps as a chain of change-tracking links.

pub mod bitmap;
pub mod export;
pub mod pool;
pub mod server;

pub use backflow_nbd::TlsSettings;
pub use bitmap::{BitmapChain, BitmapTracking};
pub use export::NbdExport;
pub use pool::{ClientPool, NbdAddress};
pub use server::{QemuNbdServer, ServerConfig, ServerDir};
