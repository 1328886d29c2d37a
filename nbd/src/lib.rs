//! A synchronous NBD client for reading VM disks exported by QEMU (`qemu-nbd`, libvirt's pull-mode backup).
//!
//! # What it supports
//! - The fixed newstyle handshake only (`NBDMAGIC`, `IHAVEOPT`), over a unix socket or TCP
//!   ([`Transport`]), with read and write timeouts so a silent server becomes an error, not a hang.
//! - `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_SET_META_CONTEXT` for the contexts the caller names
//!   (`base:allocation`, `qemu:dirty-bitmap:NAME`) and `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`. A
//!   requested context that is not granted fails the connect: an incremental backup must not quietly fall
//!   back to copying nothing.
//! - [`Client::read_at`]: `NBD_CMD_READ`, split at the server's maximum block size (capped at 32 MiB),
//!   accepting structured replies (data chunks, holes filled with zeros, error chunks) and, when the server
//!   refused structured replies, simple replies.
//! - [`Client::block_status`]: `NBD_CMD_BLOCK_STATUS`, repeated until the range is covered, returning
//!   coalesced extents of one context. Flags: [`STATE_HOLE`], [`STATE_ZERO`], [`STATE_DIRTY`].
//! - Every reply is checked against the request it answers (cookie, type, offsets, lengths that add up);
//!   see the policy in [`error`].
//!
//! # What it does not do yet, and why
//! - One request at a time per connection (`&mut self`). Pipelining several requests needs cookie-keyed
//!   reassembly of interleaved chunks; the first consumer reads 32 MiB requests, where one round trip per
//!   request costs little on a local socket. It is the next step for TCP.
//! - No connection pool for `NBD_FLAG_CAN_MULTI_CONN` exports: [`Client::can_multi_conn`] reports the flag
//!   and a caller may open several clients itself.
//! - No TLS (`NBD_OPT_STARTTLS`): libvirt's pull-mode exports used by Backflow are local unix sockets.
//! - No writes, trims or flushes: this crate reads sources of backups. Restore writes go elsewhere.
//! - No extended headers (64-bit lengths), no `NBD_OPT_EXPORT_NAME` fallback for servers without
//!   `NBD_OPT_GO`, no oldstyle handshake: QEMU since 2.x and nbdkit all speak what is here.
//!
//! # Layout
//! - [`client`]: the handshake and the requests.
//! - [`transport`]: unix or TCP stream with timeouts.
//! - [`proto`]: wire constants, named as in the specification.
//! - [`error`]: the error type and policy.

pub mod client;
pub mod error;
pub mod proto;
pub mod transport;

pub use client::{BlockSize, Client, Extent, MAX_REQUEST, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
pub use error::{NbdError, Result};
pub use transport::{DEFAULT_IO_TIMEOUT, Transport};
