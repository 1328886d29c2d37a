//! A synchronous NBD client for VM disks exported by QEMU (`qemu-nbd`, libvirt's pull-mode backup): reads
//! and block status for backups, writes for restoring into an image through a writable `qemu-nbd`.
//! And a read-only NBD server ([`server`]) of anything that implements [`server::Export`]: `backflow
//! serve` exports the disks of a restore point with it (fixed newstyle, structured replies with holes,
//! `base:allocation`, multi-conn, pipelined requests; what it leaves out and why is in its module docs).
//!
//! The rest of this page is about the client.
//!
//! # What it supports
//! - The fixed newstyle handshake only (`NBDMAGIC`, `IHAVEOPT`), over a unix socket or TCP
//!   ([`Transport`]), with read and write timeouts so a silent server becomes an error, not a hang. Any
//!   other blocking `Read + Write` stream works too ([`Transport::from_stream`]): in-memory scripts in
//!   tests and the fuzzer, where the end of the script is an error rather than a wait.
//! - TLS ([`Client::connect_tcp_tls`], [`Client::connect_tls`], [`TlsSettings`]; module [`tls`]), for
//!   exports read from another host (libvirt's pull-mode backup with `<server transport='tcp'
//!   tls='yes'/>`, `qemu-nbd --tls-creds`). `NBD_OPT_STARTTLS` is the first option, so no option or
//!   export name travels in plain text; after the server's `NBD_REP_ACK` the rest of the session, the
//!   handshake's options and every request and reply, runs inside TLS 1.3 or 1.2 (rustls with ring).
//!   The server's certificate must chain to the given CA (and only it) and carry the expected IP
//!   address or DNS name; the client presents its certificate and key, which QEMU's `verify-peer=on`
//!   (libvirt's default `backup_tls_x509_verify = 1`) demands. The handshake has a deadline of its own
//!   ([`DEFAULT_TLS_HANDSHAKE_TIMEOUT`]); the transport's read and write timeouts still bound every
//!   later operation. When TLS was asked for there is no fallback: a server that refuses STARTTLS
//!   fails the connect ([`NbdError::StartTlsRefused`]), as the specification recommends against
//!   downgrade attacks, and bytes that arrive between the acknowledgement and the TLS hello (which
//!   anyone on the path could inject) are a protocol error. A plain connect to a server that requires
//!   TLS fails with [`NbdError::TlsRequired`]; certificates that do not verify, a client certificate
//!   missing or refused, with [`NbdError::Tls`] naming the CA file and the expected name.
//! - `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_SET_META_CONTEXT` for the contexts the caller names
//!   (`base:allocation`, `qemu:dirty-bitmap:NAME`) and `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`. A
//!   requested context that is not granted fails the connect: an incremental backup must not quietly fall
//!   back to copying nothing.
//! - Pipelining: up to [`Client::max_in_flight`] requests outstanding on one connection (default
//!   [`DEFAULT_MAX_IN_FLIGHT`], set with [`Client::set_max_in_flight`]). Replies are matched to requests
//!   by cookie in whatever order the server sends them, structured chunks of different requests may
//!   interleave; see [`client`]'s `inflight` module for the invariants.
//! - [`Client::read_at`] and [`Client::read_vectored_at`] (consecutive buffers from one offset):
//!   `NBD_CMD_READ`, split at the server's maximum block size (capped at 32 MiB) and pipelined, accepting
//!   structured replies (data chunks, holes filled with zeros, error chunks) and, when the server refused
//!   structured replies, simple replies.
//! - [`Client::write_at`] (`NBD_CMD_WRITE`, split and pipelined like reads), [`Client::write_zeroes`]
//!   (`NBD_CMD_WRITE_ZEROES` allowing holes when the export offers it, zero-filled writes otherwise) and
//!   [`Client::flush`] (`NBD_CMD_FLUSH` when offered). Writes to a read-only export are refused before
//!   anything is sent ([`NbdError::ReadOnly`]).
//! - [`Client::block_status`]: `NBD_CMD_BLOCK_STATUS`, repeated until the range is covered, returning
//!   coalesced extents of one context. Flags: [`STATE_HOLE`], [`STATE_ZERO`], [`STATE_DIRTY`].
//! - Every reply is checked against the request it answers (cookie, type, offsets, lengths that add up,
//!   ranges covered exactly once); see the policy in [`error`]. The reply parser is fuzzed
//!   (`scripts/fuzz.sh`, target `fuzz/fuzz_targets/replies.rs`).
//!
//! # What it does not do yet, and why
//! - No connection pool for `NBD_FLAG_CAN_MULTI_CONN` exports: [`Client::can_multi_conn`] reports the flag
//!   and a caller may open several clients itself. One pipelined connection already keeps a local
//!   server busy.
//! - Block status is one request at a time: each request starts where the previous answer ended, which
//!   the client learns only from that answer.
//! - No `NBD_CMD_TRIM`, `NBD_CMD_CACHE`, `NBD_CMD_FLAG_FUA` or fast zero: a restore writes, zeroes and
//!   flushes once at the end, which is all it needs.
//! - No TLS over unix sockets and no TLS-PSK: a unix socket stays on its host, where TLS protects
//!   nothing; between hosts x509 certificates are what libvirt's backup TLS environment uses.
//! - No extended headers (64-bit lengths), no `NBD_OPT_EXPORT_NAME` fallback for servers without
//!   `NBD_OPT_GO`, no oldstyle handshake: QEMU since 2.x and nbdkit all speak what is here.
//!
//! # Layout
//! - [`client`]: the handshake and the public operations; its `inflight` module sends requests and
//!   matches replies to them.
//! - [`transport`]: unix or TCP stream with timeouts, or a caller's stream, or TLS over one of them.
//! - [`tls`]: the TLS settings, the rustls configuration and why rustls with ring.
//! - [`proto`]: wire constants, named as in the specification, shared by client and server.
//! - [`server`]: the read-only server, its [`server::Export`] trait and an in-memory export.
//! - [`error`]: the error type and policy.

pub mod client;
pub mod error;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transport;

pub use client::{
    BlockSize, Client, DEFAULT_MAX_IN_FLIGHT, Extent, MAX_IN_FLIGHT, MAX_REQUEST, STATE_DIRTY,
    STATE_HOLE, STATE_ZERO,
};
pub use error::{NbdError, Result};
pub use tls::{DEFAULT_TLS_HANDSHAKE_TIMEOUT, TlsSettings};
pub use transport::{ByteStream, DEFAULT_IO_TIMEOUT, Transport};
