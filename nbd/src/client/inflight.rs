//! Requests on the wire and the replies that answer them, matched by cookie.
//!
//! A batch of requests goes out through a window of at most `max_in_flight` outstanding requests: the
//! client sends until the window is full, then reads one reply message (a simple reply or one structured
//! chunk), hands it to the request whose cookie it carries, and refills the window when a request is
//! complete. Servers may answer in any order and interleave the chunks of different requests; each
//! request keeps its own state (ranges covered, contexts seen, first error) until its last chunk.
//!
//! Invariants that keep the stream in step with the server:
//! - A reply whose cookie matches no request in flight (never sent, or already complete) is a protocol
//!   error: nothing can say how long its payload is meant to be.
//! - A command error (simple reply with an error, error chunk) completes or marks only its request. No new
//!   request is sent after one, but every request already in flight is read to its end before the error
//!   is returned, so the connection stays usable.
//! - Every length is checked against the request before a byte of payload is read or allocated.

use crate::client::{Client, Extent, MAX_BLOCK_STATUS_DESCRIPTORS, MAX_ERROR_PAYLOAD};
use crate::error::{NbdError, Result};
use crate::proto::*;

/// Where the answer of a request goes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// Bytes go to `bufs[buf][at..at + len]` of the batch's buffers.
    Read { buf: usize, at: usize },
    /// Extents of the context with this id are kept.
    BlockStatus { context: u32 },
    /// Only success or failure comes back: write, write zeroes, flush.
    Ack,
}

/// A request to send.
pub(super) struct Request<'d> {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    /// Sent after the header: the data of `NBD_CMD_WRITE`, empty otherwise.
    pub payload: &'d [u8],
    pub target: Target,
}

/// A request that was sent and is waiting for (the rest of) its reply.
#[derive(Debug)]
pub(super) struct InFlight {
    cookie: u64,
    command: u16,
    offset: u64,
    len: u32,
    target: Target,
    /// Whether a structured chunk arrived already (a simple reply may no longer follow).
    chunked: bool,
    /// Byte ranges of a read filled so far, as `[from, to)`.
    covered: Vec<(u64, u64)>,
    /// Context ids that sent block status for this request.
    contexts_seen: Vec<u32>,
    /// The extents of the wanted context, once they came.
    pub extents: Option<Vec<Extent>>,
    /// The first error the server reported for this request.
    failure: Option<NbdError>,
}

impl InFlight {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

impl Client {
    /// Sends `requests` through the window, reads every reply and passes each complete request to
    /// `done`. Returns the first command error once every request in flight has been answered.
    pub(super) fn pipeline<'d>(
        &mut self,
        requests: impl IntoIterator<Item = Request<'d>>,
        bufs: &mut [&mut [u8]],
        mut done: impl FnMut(InFlight),
    ) -> Result<()> {
        let mut queue = requests.into_iter();
        let mut inflight: Vec<InFlight> = Vec::new();
        let mut first_error = None;
        loop {
            while first_error.is_none() && inflight.len() < self.max_in_flight {
                let Some(request) = queue.next() else { break };
                let cookie = self.send_request(
                    request.command,
                    request.flags,
                    request.offset,
                    request.len,
                    request.payload,
                )?;
                inflight.push(InFlight {
                    cookie,
                    command: request.command,
                    offset: request.offset,
                    len: request.len,
                    target: request.target,
                    chunked: false,
                    covered: Vec::new(),
                    contexts_seen: Vec::new(),
                    extents: None,
                    failure: None,
                });
            }
            if inflight.is_empty() {
                break;
            }
            if let Some(mut complete) = self.receive(&mut inflight, bufs)? {
                match complete.failure.take() {
                    Some(e) => {
                        first_error.get_or_insert(e);
                    }
                    None => done(complete),
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[4..6].copy_from_slice(&flags.to_be_bytes());
        msg[6..8].copy_from_slice(&command.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&len.to_be_bytes());
        if payload.is_empty() {
            self.write_all(&msg, "send a request to")?;
        } else {
            self.write_parts(&msg, payload, "send a request to")?;
        }
        Ok(cookie)
    }

    /// Reads one reply message and applies it to its request. Returns the request when that message was
    /// its last.
    fn receive(
        &mut self,
        inflight: &mut Vec<InFlight>,
        bufs: &mut [&mut [u8]],
    ) -> Result<Option<InFlight>> {
        let op = "read a reply from";
        let magic = self.read_u32(op)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32(op)?;
                let cookie = self.read_u64(op)?;
                let index = self.find(inflight, cookie)?;
                let mut request = inflight.swap_remove(index);
                self.simple_reply(&mut request, error, bufs)?;
                Ok(Some(request))
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let flags = self.read_u16(op)?;
                let kind = self.read_u16(op)?;
                let cookie = self.read_u64(op)?;
                let len = self.read_u32(op)?;
                let index = self.find(inflight, cookie)?;
                let request = &mut inflight[index];
                request.chunked = true;
                self.chunk(request, kind, len, bufs)?;
                if flags & REPLY_FLAG_DONE == 0 {
                    return Ok(None);
                }
                let request = inflight.swap_remove(index);
                self.finish(&request)?;
                Ok(Some(request))
            }
            STRUCTURED_REPLY_MAGIC => Err(self.protocol(
                "structured reply chunk although structured replies were refused".into(),
            )),
            _ => Err(self.protocol(format!("reply has magic {magic:#010x}"))),
        }
    }

    fn find(&self, inflight: &[InFlight], cookie: u64) -> Result<usize> {
        inflight
            .iter()
            .position(|r| r.cookie == cookie)
            .ok_or_else(|| {
                let sent: Vec<u64> = inflight.iter().map(|r| r.cookie).collect();
                self.protocol(format!(
                    "reply carries cookie {cookie}, which matches no request in flight (cookies {sent:?})"
                ))
            })
    }

    fn simple_reply(
        &mut self,
        request: &mut InFlight,
        error: u32,
        bufs: &mut [&mut [u8]],
    ) -> Result<()> {
        let name = command_name(request.command);
        if request.chunked {
            return Err(self.protocol(format!(
                "simple reply to {name} (cookie {}) after structured chunks for it",
                request.cookie
            )));
        }
        if error != 0 {
            let e = self.command_error(request, error, String::new());
            request.failure = Some(e);
            return Ok(());
        }
        match (request.command, request.target) {
            (CMD_READ, Target::Read { buf, at }) if !self.structured => {
                let dst = &mut bufs[buf][at..at + request.len as usize];
                self.read_exact(dst, "read data from")
            }
            (CMD_READ, _) => Err(self.protocol(
                "simple reply without error to NBD_CMD_READ after structured replies were agreed"
                    .into(),
            )),
            (_, Target::BlockStatus { .. }) => Err(self.protocol(format!(
                "simple reply without error to {name}, which needs block status chunks"
            ))),
            _ => Ok(()),
        }
    }

    fn chunk(
        &mut self,
        request: &mut InFlight,
        kind: u16,
        chunk_len: u32,
        bufs: &mut [&mut [u8]],
    ) -> Result<()> {
        let (offset, end, len) = (request.offset, request.end(), request.len);
        let name = command_name(request.command);
        match (kind, request.target) {
            (REPLY_TYPE_OFFSET_DATA, Target::Read { buf, at: buf_at }) => {
                if chunk_len <= 8 || chunk_len - 8 > len {
                    return Err(self.protocol(format!(
                        "NBD_REPLY_TYPE_OFFSET_DATA of {chunk_len} bytes for a read of {len}"
                    )));
                }
                let at = self.read_u64("read a reply from")?;
                let data_len = u64::from(chunk_len - 8);
                let start =
                    self.check_inside(at, data_len, offset, end, "NBD_REPLY_TYPE_OFFSET_DATA")?;
                let dst = &mut bufs[buf][buf_at + start..][..data_len as usize];
                self.read_exact(dst, "read data from")?;
                request.covered.push((at, at + data_len));
            }
            (REPLY_TYPE_OFFSET_HOLE, Target::Read { buf, at: buf_at }) => {
                if chunk_len != 12 {
                    return Err(self.protocol(format!(
                        "NBD_REPLY_TYPE_OFFSET_HOLE of {chunk_len} bytes, not 12"
                    )));
                }
                let at = self.read_u64("read a reply from")?;
                let hole = u64::from(self.read_u32("read a reply from")?);
                if hole == 0 {
                    return Err(self.protocol("NBD_REPLY_TYPE_OFFSET_HOLE of length 0".into()));
                }
                let start =
                    self.check_inside(at, hole, offset, end, "NBD_REPLY_TYPE_OFFSET_HOLE")?;
                bufs[buf][buf_at + start..][..hole as usize].fill(0);
                request.covered.push((at, at + hole));
            }
            (REPLY_TYPE_BLOCK_STATUS, Target::BlockStatus { context }) => {
                self.block_status_chunk(request, context, chunk_len)?;
            }
            (k, _) if k & REPLY_TYPE_ERROR_BIT != 0 => {
                let e = self.read_error_chunk(k, chunk_len, request)?;
                request.failure.get_or_insert(e);
            }
            (REPLY_TYPE_NONE, _) if chunk_len == 0 => {}
            _ => {
                return Err(self.protocol(format!(
                    "reply chunk of type {kind} and {chunk_len} bytes is not valid for {name}"
                )));
            }
        }
        Ok(())
    }

    /// Checks a request whose last chunk came: a successful read must be covered exactly once, a block
    /// status must have brought the wanted context.
    fn finish(&self, request: &InFlight) -> Result<()> {
        if request.failure.is_some() {
            return Ok(());
        }
        let (offset, end) = (request.offset, request.end());
        match request.target {
            Target::Read { .. } => {
                let mut covered = request.covered.clone();
                covered.sort_unstable();
                let mut pos = offset;
                for (from, to) in covered {
                    if from < pos {
                        return Err(
                            self.protocol(format!("read reply chunks overlap at offset {from}"))
                        );
                    }
                    if from > pos {
                        break;
                    }
                    pos = to;
                }
                if pos != end {
                    return Err(self.protocol(format!(
                        "read of {} bytes at {offset} finished with bytes from {pos} not sent",
                        request.len
                    )));
                }
            }
            Target::BlockStatus { context } if request.extents.is_none() => {
                return Err(self.protocol(format!(
                    "block status at {offset} of {} bytes finished without extents for context id {context}",
                    request.len
                )));
            }
            Target::BlockStatus { .. } | Target::Ack => {}
        }
        Ok(())
    }

    /// Reads a block status chunk descriptor by descriptor (nothing allocated from the announced length),
    /// keeping the extents of `want`, clipped to the request (a server may describe more than asked).
    fn block_status_chunk(
        &mut self,
        request: &mut InFlight,
        want: u32,
        chunk_len: u32,
    ) -> Result<()> {
        let max = 4 + 8 * MAX_BLOCK_STATUS_DESCRIPTORS;
        if chunk_len < 12 || !(chunk_len - 4).is_multiple_of(8) || chunk_len > max {
            return Err(self.protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS of {chunk_len} bytes (needs 4 + 8n, at most {max})"
            )));
        }
        let op = "read a reply from";
        let id = self.read_u32(op)?;
        if !self.contexts.iter().any(|&(_, i)| i == id) || request.contexts_seen.contains(&id) {
            return Err(self.protocol(format!(
                "block status for context id {id}, which was not negotiated or came twice"
            )));
        }
        request.contexts_seen.push(id);
        let end = request.end();
        let mut pos = request.offset;
        let mut extents = Vec::new();
        for _ in 0..(chunk_len - 4) / 8 {
            let len = u64::from(self.read_u32(op)?);
            let flags = self.read_u32(op)?;
            if pos >= end {
                // Descriptors past the request are read (to stay in step) and ignored.
                continue;
            }
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
        if id == want {
            request.extents = Some(extents);
        }
        Ok(())
    }

    /// Reads an error chunk's payload (error value, message, and for `ERROR_OFFSET` an offset) into a
    /// command error.
    fn read_error_chunk(
        &mut self,
        kind: u16,
        chunk_len: u32,
        request: &InFlight,
    ) -> Result<NbdError> {
        if !(6..=MAX_ERROR_PAYLOAD).contains(&chunk_len) {
            return Err(self.protocol(format!("error chunk of {chunk_len} bytes")));
        }
        let (offset, end) = (request.offset, request.end());
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
                let mut at = [0u8; 8];
                at.copy_from_slice(&raw[6 + msg_len..]);
                let at = u64::from_be_bytes(at);
                // A zero-length request (flush) has no byte an error could point at.
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
        Ok(self.command_error(request, errno, message))
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

    fn command_error(&self, request: &InFlight, errno: u32, message: String) -> NbdError {
        NbdError::Command {
            peer: self.peer.clone(),
            command: command_name(request.command),
            offset: request.offset,
            length: u64::from(request.len),
            errno,
            message,
        }
    }
}
