//! One NBD connection: handshake, then one request at a time.

use std::io::{BufReader, Read, Write};
use std::net::ToSocketAddrs;
use std::path::Path;

use tracing::debug;

use crate::error::{NbdError, Result};
use crate::proto::*;
use crate::transport::{DEFAULT_IO_TIMEOUT, Transport};

/// Largest request this client sends, whatever the server advertises: 32 MiB is what QEMU's NBD server
/// allows and bounds the memory one request can make the server and us hold.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Largest block status request. Block status carries no data, so it is not bound by the maximum block
/// size; servers answer for less when they like and we loop.
pub const MAX_BLOCK_STATUS_REQUEST: u32 = 1 << 30;

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

    /// Runs the fixed newstyle handshake on an open transport (use this for other timeouts).
    ///
    /// Every context in `contexts` must be granted, or this fails with
    /// [`NbdError::MetaContextUnavailable`]: a backup that silently lost its dirty bitmap would copy the
    /// wrong data.
    pub fn connect(transport: Transport, export: &str, contexts: &[&str]) -> Result<Self> {
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
            broken: None,
            disconnected: false,
        };
        match client.handshake(contexts) {
            Ok(()) => {
                debug!(peer = %client.peer, export, size = client.size, structured = client.structured,
                    max_block = client.block.maximum, "NBD export opened.");
                Ok(client)
            }
            Err(e) => {
                // Nothing to disconnect politely from mid-handshake.
                client.disconnected = true;
                client.stream.get_ref().shutdown();
                Err(e)
            }
        }
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

    /// Fills `buf` with the export's bytes at `offset`, split into requests of at most [`Self::max_block`].
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.block.maximum as usize;
        let mut pos = offset;
        for chunk in buf.chunks_mut(max) {
            self.guarded(|c| c.read_one(pos, chunk))?;
            pos += chunk.len() as u64;
        }
        Ok(())
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
            let extents = self.guarded(|c| c.block_status_one(pos, want, id))?;
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
            self.send_request(CMD_DISC, 0, 0).map(|_| ())
        } else {
            Ok(())
        };
        self.stream.get_ref().shutdown();
        debug!(peer = %self.peer, export = %self.export, "NBD connection closed.");
        result
    }

    // ---- Handshake --------------------------------------------------------------------------------------

    fn handshake(&mut self, contexts: &[&str]) -> Result<()> {
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

        self.structured = self.negotiate_structured()?;
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

    /// Runs one request, refusing to start on a broken stream and marking it broken when the request
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

    fn send_request(&mut self, command: u16, offset: u64, len: u32) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[4..6].copy_from_slice(&0u16.to_be_bytes());
        msg[6..8].copy_from_slice(&command.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&len.to_be_bytes());
        self.write_all(&msg, "send a request to")?;
        Ok(cookie)
    }

    fn read_reply_header(&mut self, expected_cookie: u64, command: u16) -> Result<ReplyHeader> {
        let op = "read a reply from";
        let magic = self.read_u32(op)?;
        let header = match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32(op)?;
                let cookie = self.read_u64(op)?;
                (cookie, ReplyHeader::Simple { error })
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let flags = self.read_u16(op)?;
                let kind = self.read_u16(op)?;
                let cookie = self.read_u64(op)?;
                let len = self.read_u32(op)?;
                (cookie, ReplyHeader::Chunk { flags, kind, len })
            }
            STRUCTURED_REPLY_MAGIC => {
                return Err(self.protocol(
                    "structured reply chunk although structured replies were refused".into(),
                ));
            }
            _ => {
                return Err(self.protocol(format!(
                    "reply to {} has magic {magic:#010x}",
                    command_name(command)
                )));
            }
        };
        if header.0 != expected_cookie {
            return Err(self.protocol(format!(
                "reply carries cookie {}, but the only request in flight is {} with cookie {expected_cookie}",
                header.0,
                command_name(command)
            )));
        }
        Ok(header.1)
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u32;
        let cookie = self.send_request(CMD_READ, offset, len)?;
        let end = offset + u64::from(len);
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut failure = None;
        loop {
            match self.read_reply_header(cookie, CMD_READ)? {
                ReplyHeader::Simple { error: 0 } if !self.structured => {
                    return self.read_exact(buf, "read data from");
                }
                ReplyHeader::Simple { error: 0 } => {
                    return Err(self.protocol(
                        "simple reply without error to NBD_CMD_READ after structured replies were agreed".into(),
                    ));
                }
                ReplyHeader::Simple { error } => {
                    return Err(self.command_error(
                        CMD_READ,
                        offset,
                        u64::from(len),
                        error,
                        String::new(),
                    ));
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    len: chunk_len,
                } => {
                    match kind {
                        REPLY_TYPE_OFFSET_DATA => {
                            if chunk_len <= 8 || chunk_len - 8 > len {
                                return Err(self.protocol(format!(
                                    "NBD_REPLY_TYPE_OFFSET_DATA of {chunk_len} bytes for a read of {len}"
                                )));
                            }
                            let at = self.read_u64("read a reply from")?;
                            let data_len = u64::from(chunk_len - 8);
                            let start = self.check_inside(
                                at,
                                data_len,
                                offset,
                                end,
                                "NBD_REPLY_TYPE_OFFSET_DATA",
                            )?;
                            let dst = &mut buf[start..start + data_len as usize];
                            self.read_exact(dst, "read data from")?;
                            covered.push((at, at + data_len));
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            if chunk_len != 12 {
                                return Err(self.protocol(format!(
                                    "NBD_REPLY_TYPE_OFFSET_HOLE of {chunk_len} bytes, not 12"
                                )));
                            }
                            let at = self.read_u64("read a reply from")?;
                            let hole = u64::from(self.read_u32("read a reply from")?);
                            if hole == 0 {
                                return Err(
                                    self.protocol("NBD_REPLY_TYPE_OFFSET_HOLE of length 0".into())
                                );
                            }
                            let start = self.check_inside(
                                at,
                                hole,
                                offset,
                                end,
                                "NBD_REPLY_TYPE_OFFSET_HOLE",
                            )?;
                            buf[start..start + hole as usize].fill(0);
                            covered.push((at, at + hole));
                        }
                        REPLY_TYPE_NONE if chunk_len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let e = self.read_error_chunk(k, chunk_len, CMD_READ, offset, end)?;
                            failure.get_or_insert(e);
                        }
                        _ => {
                            return Err(self.protocol(format!(
                                "reply chunk of type {kind} and {chunk_len} bytes is not valid for NBD_CMD_READ"
                            )));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        covered.sort_unstable();
        let mut pos = offset;
        for (from, to) in covered {
            if from < pos {
                return Err(self.protocol(format!("read reply chunks overlap at offset {from}")));
            }
            if from > pos {
                break;
            }
            pos = to;
        }
        if pos != end {
            return Err(self.protocol(format!(
                "read of {len} bytes at {offset} finished with bytes from {pos} not sent"
            )));
        }
        Ok(())
    }

    fn block_status_one(&mut self, offset: u64, len: u32, want: u32) -> Result<Vec<Extent>> {
        let cookie = self.send_request(CMD_BLOCK_STATUS, offset, len)?;
        let end = offset + u64::from(len);
        let mut seen: Vec<u32> = Vec::new();
        let mut result = None;
        let mut failure = None;
        loop {
            match self.read_reply_header(cookie, CMD_BLOCK_STATUS)? {
                ReplyHeader::Simple { error: 0 } => {
                    return Err(
                        self.protocol("simple reply without error to NBD_CMD_BLOCK_STATUS".into())
                    );
                }
                ReplyHeader::Simple { error } => {
                    return Err(self.command_error(
                        CMD_BLOCK_STATUS,
                        offset,
                        u64::from(len),
                        error,
                        String::new(),
                    ));
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    len: chunk_len,
                } => {
                    match kind {
                        REPLY_TYPE_BLOCK_STATUS => {
                            let max = 4 + 8 * MAX_BLOCK_STATUS_DESCRIPTORS;
                            if chunk_len < 12 || (chunk_len - 4) % 8 != 0 || chunk_len > max {
                                return Err(self.protocol(format!(
                                    "NBD_REPLY_TYPE_BLOCK_STATUS of {chunk_len} bytes (needs 4 + 8n, at most {max})"
                                )));
                            }
                            let id = self.read_u32("read a reply from")?;
                            if !self.contexts.iter().any(|&(_, i)| i == id) || seen.contains(&id) {
                                return Err(self.protocol(format!(
                                    "block status for context id {id}, which was not negotiated or came twice"
                                )));
                            }
                            seen.push(id);
                            let mut raw = vec![0u8; (chunk_len - 4) as usize];
                            self.read_exact(&mut raw, "read a reply from")?;
                            let extents = self.parse_descriptors(&raw, offset, end)?;
                            if id == want {
                                result = Some(extents);
                            }
                        }
                        REPLY_TYPE_NONE if chunk_len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let e =
                                self.read_error_chunk(k, chunk_len, CMD_BLOCK_STATUS, offset, end)?;
                            failure.get_or_insert(e);
                        }
                        _ => {
                            return Err(self.protocol(format!(
                                "reply chunk of type {kind} and {chunk_len} bytes is not valid for NBD_CMD_BLOCK_STATUS"
                            )));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        result.ok_or_else(|| {
            self.protocol(format!(
                "block status at {offset} of {len} bytes finished without extents for context id {want}"
            ))
        })
    }

    /// Descriptors as extents from `offset`, clipped to `end` (a server may describe more than asked).
    fn parse_descriptors(&self, raw: &[u8], offset: u64, end: u64) -> Result<Vec<Extent>> {
        let mut extents = Vec::new();
        let mut pos = offset;
        for d in raw.chunks_exact(8) {
            if pos >= end {
                break;
            }
            let len = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
            let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
            if len == 0 {
                return Err(self.protocol(format!(
                    "block status descriptor of length 0 at offset {pos}"
                )));
            }
            let len = len.min(end - pos);
            extents.push(Extent {
                offset: pos,
                len,
                flags,
            });
            pos += len;
        }
        Ok(extents)
    }

    /// Reads an error chunk's payload (error value, message, and for `ERROR_OFFSET` an offset) into a
    /// command error.
    fn read_error_chunk(
        &mut self,
        kind: u16,
        chunk_len: u32,
        command: u16,
        offset: u64,
        end: u64,
    ) -> Result<NbdError> {
        if !(6..=MAX_ERROR_PAYLOAD).contains(&chunk_len) {
            return Err(self.protocol(format!("error chunk of {chunk_len} bytes")));
        }
        let mut raw = vec![0u8; chunk_len as usize];
        self.read_exact(&mut raw, "read a reply from")?;
        let errno = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let msg_len = usize::from(u16::from_be_bytes([raw[4], raw[5]]));
        if errno == 0 {
            return Err(self.protocol("error chunk with error value 0".into()));
        }
        let rest = raw.len() - 6;
        let (message, err_offset) = match kind {
            REPLY_TYPE_ERROR if msg_len == rest => (&raw[6..], None),
            REPLY_TYPE_ERROR_OFFSET if msg_len + 8 == rest => {
                let at = u64::from_be_bytes(raw[6 + msg_len..].try_into().expect("8 bytes"));
                if at < offset || at >= end {
                    return Err(self.protocol(format!(
                        "NBD_REPLY_TYPE_ERROR_OFFSET at {at}, outside the request [{offset}, {end})"
                    )));
                }
                (&raw[6..6 + msg_len], Some(at))
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                return Err(self.protocol(format!(
                    "error chunk of {chunk_len} bytes with a message of {msg_len}"
                )));
            }
            // Unknown error types are still errors; their payload starts the same way.
            _ => (&raw[6..6 + msg_len.min(rest)], None),
        };
        let mut message = String::from_utf8_lossy(message).into_owned();
        if let Some(at) = err_offset {
            message = format!("at offset {at}: {message}");
        }
        Ok(self.command_error(command, offset, end - offset, errno, message))
    }

    /// Index of `[at, at + len)` in the request's buffer, if the range lies inside `[offset, end)`.
    fn check_inside(&self, at: u64, len: u64, offset: u64, end: u64, what: &str) -> Result<usize> {
        match at.checked_add(len) {
            Some(to) if at >= offset && to <= end => Ok((at - offset) as usize),
            _ => Err(self.protocol(format!(
                "{what} at {at} of {len} bytes is outside the request [{offset}, {end})"
            ))),
        }
    }

    fn command_error(
        &self,
        command: u16,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    ) -> NbdError {
        NbdError::Command {
            peer: self.peer.clone(),
            command: command_name(command),
            offset,
            length,
            errno,
            message,
        }
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

enum ReplyHeader {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, len: u32 },
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
