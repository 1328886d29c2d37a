//! One NBD connection: the handshake, then requests, several in flight at once (module `inflight`:
//! replies matched to requests by cookie).

mod inflight;

use std::io::{BufReader, Read, Write};
use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use tracing::debug;

use crate::error::{NbdError, Result};
use crate::proto::*;
use crate::tls::{self, TlsSettings};
use crate::transport::{DEFAULT_IO_TIMEOUT, Transport};
use inflight::{Request, Target};

/// Largest request this client sends, whatever the server advertises: 32 MiB is what QEMU's NBD server
/// allows and bounds the memory one request can make the server and us hold.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Largest block status request. Block status carries no data, so it is not bound by the maximum block
/// size; servers answer for less when they like and we loop.
pub const MAX_BLOCK_STATUS_REQUEST: u32 = 1 << 30;

/// Largest `NBD_CMD_WRITE_ZEROES` request: it carries no payload either, so it is not bound by the maximum
/// block size. A multiple of every block size a server may require (they are powers of two).
pub const MAX_ZEROES_REQUEST: u32 = 1 << 30;

/// Requests a client keeps in flight unless told otherwise ([`Client::set_max_in_flight`]). Eight 32 MiB
/// reads keep a server busy across the round trips of a TCP link; the replies go straight into the
/// caller's buffers, so the number costs no memory here.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// Upper bound of [`Client::set_max_in_flight`]. Requests are written before their replies are read, so
/// the unread requests must fit in the socket buffers (28 bytes each for reads); servers also limit
/// how many they work on at once (QEMU: 16), so more would only queue.
pub const MAX_IN_FLIGHT: usize = 256;

/// Largest option reply payload accepted during the handshake. The longest legitimate one is a meta
/// context name (at most 4096 bytes by the specification) plus its id.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Largest error chunk payload: error value, message length, message (at most 4096 bytes) and an offset.
pub const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + 4096 + 8;

/// Most descriptors accepted in one block status chunk (8 bytes each). QEMU sends at most one per
/// granule of a 1 GiB request; this leaves room and bounds the allocation to 8 MiB.
pub const MAX_BLOCK_STATUS_DESCRIPTORS: u32 = 1 << 20;

/// `base:allocation` flag: the range is not allocated in the exported image (for qcow2: no cluster).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the range changed since the bitmap was enabled.
pub const STATE_DIRTY: u32 = 1;

/// One range with the same status flags, as reported for one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// Meaning depends on the context: [`STATE_HOLE`] | [`STATE_ZERO`] for `base:allocation`,
    /// [`STATE_DIRTY`] for a dirty bitmap.
    pub flags: u32,
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`, or the specification's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    /// Already capped at [`MAX_REQUEST`].
    pub maximum: u32,
}

/// A connected NBD client for one export, past the handshake.
#[derive(Debug)]
pub struct Client {
    stream: BufReader<Transport>,
    peer: String,
    export: String,
    size: u64,
    transmission_flags: u16,
    block: BlockSize,
    structured: bool,
    /// Context names as requested, with the id the server assigned.
    contexts: Vec<(String, u32)>,
    next_cookie: u64,
    /// Most requests sent before their replies are read, at least 1.
    max_in_flight: usize,
    /// Why the stream can no longer be trusted, once it cannot.
    broken: Option<String>,
    disconnected: bool,
}

impl Client {
    /// Connects to a unix socket with [`DEFAULT_IO_TIMEOUT`] and negotiates `export` and `contexts`.
    pub fn connect_unix(path: impl AsRef<Path>, export: &str, contexts: &[&str]) -> Result<Self> {
        let transport = Transport::unix(path.as_ref(), DEFAULT_IO_TIMEOUT)?;
        Self::connect(transport, export, contexts)
    }

    /// Connects over TCP with [`DEFAULT_IO_TIMEOUT`] and negotiates `export` and `contexts`.
    pub fn connect_tcp(addr: impl ToSocketAddrs, export: &str, contexts: &[&str]) -> Result<Self> {
        let transport = Transport::tcp(addr, DEFAULT_IO_TIMEOUT)?;
        Self::connect(transport, export, contexts)
    }

    /// Connects over TCP with [`DEFAULT_IO_TIMEOUT`], upgrades the connection to TLS with `tls`
    /// (see [`Self::connect_tls`]) and negotiates `export` and `contexts`. `server_name` is the IP
    /// address or DNS name the server's certificate must carry: usually the host part of `addr`.
    ///
    /// The TLS files are read before anything is sent, so a missing file fails without touching the
    /// network.
    pub fn connect_tcp_tls(
        addr: impl ToSocketAddrs,
        server_name: &str,
        tls: &TlsSettings,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        let start = StartTls::new(tls, server_name)?;
        let transport = Transport::tcp(addr, DEFAULT_IO_TIMEOUT)?;
        Self::open(transport, export, contexts, Some(start))
    }

    /// Runs the fixed newstyle handshake on an open transport with TLS: `NBD_OPT_STARTTLS` as the first
    /// option, then the TLS handshake (the server verified against `tls.ca` and `server_name`, our
    /// certificate presented), then every other option and all transmission inside TLS. A server that
    /// refuses STARTTLS fails the connect ([`NbdError::StartTlsRefused`]): there is no fallback to plain
    /// text, which a man in the middle could otherwise force.
    pub fn connect_tls(
        transport: Transport,
        server_name: &str,
        tls: &TlsSettings,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        let start = StartTls::new(tls, server_name)?;
        Self::open(transport, export, contexts, Some(start))
    }

    /// Runs the fixed newstyle handshake on an open transport (use this for other timeouts).
    ///
    /// Every context in `contexts` must be granted, or this fails with
    /// [`NbdError::MetaContextUnavailable`]: a backup that silently lost its dirty bitmap would copy the
    /// wrong data. A server that requires TLS fails it with [`NbdError::TlsRequired`].
    pub fn connect(transport: Transport, export: &str, contexts: &[&str]) -> Result<Self> {
        Self::open(transport, export, contexts, None)
    }

    fn open(
        transport: Transport,
        export: &str,
        contexts: &[&str],
        tls: Option<StartTls<'_>>,
    ) -> Result<Self> {
        let peer = transport.peer();
        let mut client = Client {
            stream: BufReader::with_capacity(64 << 10, transport),
            peer,
            export: export.to_string(),
            size: 0,
            transmission_flags: 0,
            block: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_REQUEST,
            },
            structured: false,
            contexts: Vec::new(),
            next_cookie: 1,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            broken: None,
            disconnected: false,
        };
        match client.handshake(contexts, tls) {
            Ok(()) => {
                debug!(peer = %client.peer, export, size = client.size, structured = client.structured,
                    max_block = client.block.maximum, tls = ?client.tls_protocol(), "NBD export opened.");
                Ok(client)
            }
            Err(e) => {
                // Nothing to disconnect politely from mid-handshake.
                client.disconnected = true;
                client.stream.get_mut().shutdown();
                Err(e)
            }
        }
    }

    /// The TLS version of this connection (`"TLSv1_3"`, `"TLSv1_2"`), `None` without TLS.
    pub fn tls_protocol(&self) -> Option<String> {
        self.stream.get_ref().tls_protocol()
    }

    /// The TLS cipher suite of this connection, `None` without TLS.
    pub fn tls_cipher_suite(&self) -> Option<String> {
        self.stream.get_ref().tls_cipher_suite()
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server allows spreading requests over several connections to this export.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & FLAG_CAN_MULTI_CONN != 0
    }

    pub fn is_read_only(&self) -> bool {
        self.transmission_flags & FLAG_READ_ONLY != 0
    }

    /// Largest read this client sends in one request; longer reads are split.
    pub fn max_block(&self) -> u32 {
        self.block.maximum
    }

    pub fn block_size(&self) -> BlockSize {
        self.block
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Whether the server agreed to structured replies (required for block status and hole-aware reads).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The id the server assigned to a negotiated context.
    pub fn context_id(&self, context: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|&(_, id)| id)
    }

    /// How many requests [`Self::read_vectored_at`] and the writes keep in flight on this connection.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Sets how many requests may be in flight at once, clamped to `1..=`[`MAX_IN_FLIGHT`]. One means
    /// strictly one request after the other.
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.max_in_flight = n.clamp(1, MAX_IN_FLIGHT);
    }

    /// Fills `buf` with the export's bytes at `offset`, split into requests of at most [`Self::max_block`]
    /// that are pipelined like [`Self::read_vectored_at`].
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored_at(offset, &mut [buf])
    }

    /// Fills consecutive buffers from `offset`: `bufs[i]` receives the bytes right after those of
    /// `bufs[i - 1]`. Each buffer is read by requests of at most [`Self::max_block`], up to
    /// [`Self::max_in_flight`] of them outstanding; the server may answer them in any order.
    ///
    /// On a command error nothing more is sent, the requests in flight are read to their end and the first
    /// error is returned; the buffers then hold partial data.
    pub fn read_vectored_at(&mut self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let total = bufs
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(b.len() as u64));
        let Some(total) = total else {
            return Err(NbdError::InvalidArgument(
                "buffers add up to more than 2^64 bytes".into(),
            ));
        };
        self.check_range(offset, total)?;
        // Requests are made as the window takes them: a server allowing only tiny blocks must not make
        // us build a list of millions first.
        let max = self.block.maximum as usize;
        let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
        let starts: Vec<u64> = lens
            .iter()
            .scan(offset, |pos, &len| {
                let start = *pos;
                *pos += len as u64;
                Some(start)
            })
            .collect();
        let requests = lens.into_iter().enumerate().flat_map(move |(buf, len)| {
            let start = starts[buf];
            (0..len).step_by(max).map(move |at| Request {
                command: CMD_READ,
                flags: 0,
                offset: start + at as u64,
                len: (len - at).min(max) as u32,
                payload: &[],
                target: Target::Read { buf, at },
            })
        });
        self.guarded(|c| c.pipeline(requests, bufs, |_| ()))
    }

    /// Writes `data` at `offset` with `NBD_CMD_WRITE`, split at [`Self::max_block`] and pipelined like
    /// reads. The data is durable only after [`Self::flush`].
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable(CMD_WRITE)?;
        self.check_range(offset, data.len() as u64)?;
        self.guarded(|c| c.write_pieces(offset, data))
    }

    /// Makes `[offset, offset + len)` read as zeros: `NBD_CMD_WRITE_ZEROES` when the export offers it
    /// (without `NBD_CMD_FLAG_NO_HOLE`, so the server may punch a hole and keep a qcow2 sparse), otherwise
    /// writes of zero-filled buffers.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(CMD_WRITE_ZEROES)?;
        self.check_range(offset, len)?;
        if self.transmission_flags & FLAG_SEND_WRITE_ZEROES != 0 {
            let step = u64::from(MAX_ZEROES_REQUEST);
            let requests = (0..len.div_ceil(step)).map(|i| Request {
                command: CMD_WRITE_ZEROES,
                flags: 0,
                offset: offset + i * step,
                len: (len - i * step).min(step) as u32,
                payload: &[],
                target: Target::Ack,
            });
            return self.guarded(|c| c.pipeline(requests, &mut [], |_| ()));
        }
        let zeros = vec![0u8; len.min(u64::from(self.block.maximum)) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64);
            self.guarded(|c| c.write_pieces(pos, &zeros[..n as usize]))?;
            pos += n;
        }
        Ok(())
    }

    /// Asks the server to make every completed write durable (`NBD_CMD_FLUSH`). Does nothing when the
    /// export does not offer flush (`NBD_FLAG_SEND_FLUSH`): such a server has nothing it would flush.
    pub fn flush(&mut self) -> Result<()> {
        if self.transmission_flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let request = Request {
            command: CMD_FLUSH,
            flags: 0,
            offset: 0,
            len: 0,
            payload: &[],
            target: Target::Ack,
        };
        self.guarded(|c| c.pipeline([request], &mut [], |_| ()))
    }

    /// Status of `[offset, offset + len)` in `context`, coalesced into maximal extents of equal flags that
    /// exactly cover the range. Repeats the request until the server has described the whole range.
    pub fn block_status(&mut self, offset: u64, len: u64, context: &str) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let id = self.context_id(context).ok_or_else(|| {
            NbdError::InvalidArgument(format!(
                "meta context {context:?} was not negotiated with {} (negotiated: {:?})",
                self.peer,
                self.contexts.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ))
        })?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let want = (end - pos).min(u64::from(MAX_BLOCK_STATUS_REQUEST)) as u32;
            let request = Request {
                command: CMD_BLOCK_STATUS,
                flags: 0,
                offset: pos,
                len: want,
                payload: &[],
                target: Target::BlockStatus { context: id },
            };
            let mut extents = Vec::new();
            self.guarded(|c| {
                c.pipeline([request], &mut [], |done| {
                    extents = done.extents.unwrap_or_default()
                })
            })?;
            for e in extents {
                pos = e.offset + e.len;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => {
                        last.len += e.len
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection. Dropping a client does the same, ignoring errors.
    pub fn close(mut self) -> Result<()> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> Result<()> {
        if self.disconnected {
            return Ok(());
        }
        self.disconnected = true;
        let result = if self.broken.is_none() {
            self.send_request(CMD_DISC, 0, 0, 0, &[]).map(|_| ())
        } else {
            Ok(())
        };
        self.stream.get_mut().shutdown();
        debug!(peer = %self.peer, export = %self.export, "NBD connection closed.");
        result
    }

    // ---- Handshake --------------------------------------------------------------------------------------

    fn handshake(&mut self, contexts: &[&str], tls: Option<StartTls<'_>>) -> Result<()> {
        let magic = self.read_u64("read the greeting of")?;
        if magic != NBDMAGIC {
            return Err(self.protocol(format!("greeting starts with {magic:#018x}, not NBDMAGIC")));
        }
        let magic = self.read_u64("read the greeting of")?;
        if magic == OLDSTYLE_MAGIC {
            return Err(self
                .protocol("server speaks the oldstyle handshake, which is not supported".into()));
        }
        if magic != IHAVEOPT {
            return Err(self.protocol(format!("greeting has {magic:#018x}, not IHAVEOPT")));
        }
        let flags = self.read_u16("read the greeting of")?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("server does not offer the fixed newstyle handshake".into()));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.write_all(&client_flags.to_be_bytes(), "send client flags to")?;

        match tls {
            None => self.structured = self.negotiate_structured()?,
            Some(tls) => {
                self.start_tls(&tls)?;
                // The first answer inside TLS is where a server that checks client certificates only
                // after its handshake (QEMU) shows that it refused ours: by closing the connection.
                self.structured = self.negotiate_structured().map_err(|e| match &e {
                    NbdError::Io { source, .. } => {
                        match tls::describe_after_handshake(source, tls.settings) {
                            Some(detail) => NbdError::Tls {
                                peer: self.peer.clone(),
                                server_name: tls.server_name.to_string(),
                                detail,
                            },
                            None => e,
                        }
                    }
                    _ => e,
                })?;
            }
        }
        if !contexts.is_empty() {
            if !self.structured {
                return Err(NbdError::MetaContextUnavailable {
                    peer: self.peer.clone(),
                    export: self.export.clone(),
                    context: contexts[0].to_string(),
                    reason: "the server refused structured replies, which meta contexts need"
                        .into(),
                });
            }
            self.negotiate_contexts(contexts)?;
        }
        self.negotiate_go()
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake on the same stream.
    fn start_tls(&mut self, tls: &StartTls<'_>) -> Result<()> {
        self.send_option(OPT_STARTTLS, &[])?;
        let (kind, data) = self.read_option_reply(OPT_STARTTLS)?;
        match kind {
            REP_ACK if data.is_empty() => {}
            REP_ACK => {
                return Err(self.protocol(format!(
                    "NBD_REP_ACK to NBD_OPT_STARTTLS carries {} bytes, not 0",
                    data.len()
                )));
            }
            _ if kind & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::StartTlsRefused {
                    peer: self.peer.clone(),
                    reply: reply_name(kind),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => {
                return Err(self.protocol(format!(
                    "unexpected {} ({kind:#x}) to NBD_OPT_STARTTLS",
                    reply_name(kind)
                )));
            }
        }
        // Whatever arrived after the acknowledgement, before our TLS hello, came in plain text and may
        // be injected by anyone on the path: it must not be read as part of the session.
        if !self.stream.buffer().is_empty() {
            return Err(self.protocol(format!(
                "{} bytes arrived after the acknowledgement of NBD_OPT_STARTTLS, before the TLS handshake",
                self.stream.buffer().len()
            )));
        }
        let timeout = tls.settings.handshake_timeout;
        let started =
            self.stream
                .get_mut()
                .start_tls(tls.config.clone(), tls.name.clone(), timeout);
        match started {
            Ok(()) => {
                debug!(peer = %self.peer, server_name = tls.server_name, tls = ?self.tls_protocol(),
                    suite = ?self.tls_cipher_suite(), "NBD TLS session established.");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Err(NbdError::TlsHandshakeTimeout {
                    peer: self.peer.clone(),
                    timeout,
                })
            }
            Err(e) => Err(NbdError::Tls {
                peer: self.peer.clone(),
                server_name: tls.server_name.to_string(),
                detail: tls::describe_failure(&e, tls.settings, tls.server_name),
            }),
        }
    }

    fn negotiate_structured(&mut self) -> Result<bool> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, data) = self.read_option_reply(OPT_STRUCTURED_REPLY)?;
        match kind {
            REP_ACK => Ok(true),
            REP_ERR_UNSUP => Ok(false),
            _ => Err(self.option_failure(OPT_STRUCTURED_REPLY, kind, &data)),
        }
    }

    fn negotiate_contexts(&mut self, contexts: &[&str]) -> Result<()> {
        let mut data = Vec::new();
        push_string(&mut data, &self.export)?;
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for context in contexts {
            push_string(&mut data, context)?;
        }
        self.send_option(OPT_SET_META_CONTEXT, &data)?;
        loop {
            let (kind, data) = self.read_option_reply(OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(self.protocol(format!(
                            "NBD_REP_META_CONTEXT of {} bytes has no room for a context id",
                            data.len()
                        )));
                    }
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let name = String::from_utf8(data[4..].to_vec())
                        .map_err(|_| self.protocol("meta context name is not UTF-8".into()))?;
                    if !contexts.contains(&name.as_str()) {
                        return Err(self.protocol(format!(
                            "granted meta context {name:?}, which was not requested"
                        )));
                    }
                    if self.contexts.iter().any(|(n, i)| *n == name || *i == id) {
                        return Err(
                            self.protocol(format!("granted meta context {name:?} (id {id}) twice"))
                        );
                    }
                    debug!(peer = %self.peer, context = %name, id, "NBD meta context granted.");
                    self.contexts.push((name, id));
                }
                REP_ACK => break,
                _ if kind & REP_FLAG_ERROR != 0 => {
                    let refused = self.option_failure(OPT_SET_META_CONTEXT, kind, &data);
                    return Err(NbdError::MetaContextUnavailable {
                        peer: self.peer.clone(),
                        export: self.export.clone(),
                        context: contexts.join(","),
                        reason: refused.to_string(),
                    });
                }
                _ => {
                    return Err(self.protocol(format!(
                        "unexpected {} ({kind:#x}) to NBD_OPT_SET_META_CONTEXT",
                        reply_name(kind)
                    )));
                }
            }
        }
        if let Some(missing) = contexts.iter().find(|c| self.context_id(c).is_none()) {
            return Err(NbdError::MetaContextUnavailable {
                peer: self.peer.clone(),
                export: self.export.clone(),
                context: missing.to_string(),
                reason: String::new(),
            });
        }
        Ok(())
    }

    fn negotiate_go(&mut self) -> Result<()> {
        let mut data = Vec::new();
        push_string(&mut data, &self.export)?;
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut export_info = None;
        loop {
            let (kind, data) = self.read_option_reply(OPT_GO)?;
            match kind {
                REP_INFO => {
                    if data.len() < 2 {
                        return Err(
                            self.protocol("NBD_REP_INFO without an information type".into())
                        );
                    }
                    match u16::from_be_bytes([data[0], data[1]]) {
                        INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_EXPORT is {} bytes, not 12",
                                    data.len()
                                )));
                            }
                            let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            export_info = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE is {} bytes, not 14",
                                    data.len()
                                )));
                            }
                            let word = |i: usize| {
                                u32::from_be_bytes(data[i..i + 4].try_into().expect("4 bytes"))
                            };
                            let (minimum, preferred, maximum) = (word(2), word(6), word(10));
                            if minimum == 0 || preferred == 0 || maximum == 0 || minimum > maximum {
                                return Err(self.protocol(format!(
                                    "impossible block sizes: minimum {minimum}, preferred {preferred}, maximum {maximum}"
                                )));
                            }
                            // Requests are split at `maximum`; keep it a multiple of the minimum so every
                            // split request stays aligned.
                            let capped = maximum.min(MAX_REQUEST);
                            let maximum = (capped / minimum).max(1) * minimum;
                            self.block = BlockSize {
                                minimum,
                                preferred,
                                maximum,
                            };
                        }
                        // Names and descriptions are not needed; unknown types must be ignored.
                        _ => {}
                    }
                }
                REP_ACK => break,
                _ => return Err(self.option_failure(OPT_GO, kind, &data)),
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(self.protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()));
        };
        self.size = size;
        self.transmission_flags = flags;
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.write_all(&msg, "send an option to")
    }

    /// One option reply: its type and payload, after checking magic, option and length bound.
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let magic = self.read_u64("read an option reply from")?;
        if magic != REP_MAGIC {
            return Err(self.protocol(format!(
                "reply to {} has magic {magic:#018x}",
                option_name(option)
            )));
        }
        let replied = self.read_u32("read an option reply from")?;
        if replied != option {
            return Err(self.protocol(format!(
                "reply to {} is for option {replied}",
                option_name(option)
            )));
        }
        let kind = self.read_u32("read an option reply from")?;
        let len = self.read_u32("read an option reply from")?;
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!(
                "reply to {} announces {len} bytes, more than the {MAX_OPTION_REPLY} accepted",
                option_name(option)
            )));
        }
        let mut data = vec![0; len as usize];
        self.read_exact(&mut data, "read an option reply from")?;
        Ok((kind, data))
    }

    fn option_failure(&self, option: u32, kind: u32, data: &[u8]) -> NbdError {
        if kind == REP_ERR_TLS_REQD {
            if self.tls_protocol().is_some() {
                return self.protocol(format!(
                    "NBD_REP_ERR_TLS_REQD to {} inside TLS",
                    option_name(option)
                ));
            }
            return NbdError::TlsRequired {
                peer: self.peer.clone(),
                option: option_name(option),
            };
        }
        if kind & REP_FLAG_ERROR == 0 {
            return self.protocol(format!(
                "unexpected {} ({kind:#x}) to {}",
                reply_name(kind),
                option_name(option)
            ));
        }
        NbdError::OptionRefused {
            peer: self.peer.clone(),
            export: self.export.clone(),
            option: option_name(option),
            reply: reply_name(kind),
            code: kind,
            message: String::from_utf8_lossy(data).into_owned(),
        }
    }

    // ---- Transmission -----------------------------------------------------------------------------------

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::InvalidArgument(format!(
                "range at {offset} of {len} bytes is past the end of export {:?} ({} bytes) on {}",
                self.export, self.size, self.peer
            ))),
        }
    }

    fn check_writable(&self, command: u16) -> Result<()> {
        if self.is_read_only() {
            return Err(NbdError::ReadOnly {
                peer: self.peer.clone(),
                export: self.export.clone(),
                command: command_name(command),
            });
        }
        Ok(())
    }

    /// `NBD_CMD_WRITE`s of `data` at `offset`, each at most the maximum block size.
    fn write_pieces(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let max = self.block.maximum as usize;
        let requests = data.chunks(max).enumerate().map(|(i, piece)| Request {
            command: CMD_WRITE,
            flags: 0,
            offset: offset + (i * max) as u64,
            len: piece.len() as u32,
            payload: piece,
            target: Target::Ack,
        });
        self.pipeline(requests, &mut [], |_| ())
    }

    /// Runs one operation, refusing to start on a broken stream and marking it broken when the request
    /// leaves it mid-message.
    fn guarded<T>(&mut self, request: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some(reason) = &self.broken {
            return Err(NbdError::Broken {
                peer: self.peer.clone(),
                reason: reason.clone(),
            });
        }
        if self.disconnected {
            return Err(NbdError::Broken {
                peer: self.peer.clone(),
                reason: "the connection was closed".into(),
            });
        }
        let result = request(self);
        if let Err(e) = &result
            && e.desynchronises()
        {
            self.broken = Some(e.to_string());
        }
        result
    }

    // ---- Bytes ------------------------------------------------------------------------------------------

    fn protocol(&self, detail: String) -> NbdError {
        NbdError::Protocol {
            peer: self.peer.clone(),
            detail,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], op: &'static str) -> Result<()> {
        self.stream.read_exact(buf).map_err(|source| NbdError::Io {
            op,
            peer: self.peer.clone(),
            source,
        })
    }

    fn read_u16(&mut self, op: &'static str) -> Result<u16> {
        let mut b = [0; 2];
        self.read_exact(&mut b, op)?;
        Ok(u16::from_be_bytes(b))
    }

    fn read_u32(&mut self, op: &'static str) -> Result<u32> {
        let mut b = [0; 4];
        self.read_exact(&mut b, op)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self, op: &'static str) -> Result<u64> {
        let mut b = [0; 8];
        self.read_exact(&mut b, op)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Writes a request header and its payload, then flushes once.
    fn write_parts(&mut self, head: &[u8], payload: &[u8], op: &'static str) -> Result<()> {
        let stream = self.stream.get_mut();
        stream
            .write_all(head)
            .and_then(|()| stream.write_all(payload))
            .and_then(|()| stream.flush())
            .map_err(|source| NbdError::Io {
                op,
                peer: self.peer.clone(),
                source,
            })
    }

    fn write_all(&mut self, bytes: &[u8], op: &'static str) -> Result<()> {
        let stream = self.stream.get_mut();
        stream
            .write_all(bytes)
            .and_then(|()| stream.flush())
            .map_err(|source| NbdError::Io {
                op,
                peer: self.peer.clone(),
                source,
            })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

/// What [`Client::open`] needs to start TLS: the prepared configuration and the name to verify, with the
/// settings and the name as given, for messages.
struct StartTls<'a> {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    settings: &'a TlsSettings,
    server_name: &'a str,
}

impl<'a> StartTls<'a> {
    /// Reads the TLS files and checks the name, before anything touches the network.
    fn new(settings: &'a TlsSettings, server_name: &'a str) -> Result<Self> {
        Ok(StartTls {
            config: settings.client_config()?,
            name: tls::server_name(server_name)?,
            settings,
            server_name,
        })
    }
}

/// Appends a length-prefixed string, refusing the lengths the specification forbids.
fn push_string(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > 4096 {
        return Err(NbdError::InvalidArgument(format!(
            "NBD strings are at most 4096 bytes; {:?}… has {}",
            s.chars().take(32).collect::<String>(),
            s.len()
        )));
    }
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}
