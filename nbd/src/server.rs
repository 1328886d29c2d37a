//! A read-only NBD server: the fixed newstyle handshake, then reads and block status answered from
//! an [`Export`] (in Backflow: a disk of a restore point), on as many connections as clients open.
//!
//! # What it supports, and why not the rest
//! - Fixed newstyle only: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO` (`NBD_INFO_EXPORT`,
//!   `NBD_INFO_BLOCK_SIZE` always, `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` when asked),
//!   `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and
//!   `NBD_OPT_SET_META_CONTEXT` (`base:allocation` only). Every other option, `NBD_OPT_STARTTLS`
//!   included, is answered `NBD_REP_ERR_UNSUP`: every client in use (QEMU, libnbd, the kernel)
//!   speaks what is here, and TLS is left to the listener's policy (a unix socket, or loopback).
//! - Transmission flags: `HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN | SEND_CACHE`, and
//!   `SEND_DF` once structured replies were negotiated. The data never changes, so every
//!   connection sees the same bytes (multi-conn is trivially safe) and a flush has nothing to do.
//! - `NBD_CMD_READ`: structured replies as `NBD_REPLY_TYPE_OFFSET_DATA` for data and
//!   `NBD_REPLY_TYPE_OFFSET_HOLE` for zeros, or one data chunk with the zeros present under
//!   `NBD_CMD_FLAG_DF`; a simple reply with the data when structured replies were not negotiated.
//!   A read the export cannot answer (a damaged chunk) is an error reply (`EIO` with a message),
//!   never wrong bytes: the whole read is assembled before its first byte is sent.
//! - `NBD_CMD_BLOCK_STATUS` for `base:allocation`: zeros as `NBD_STATE_HOLE | NBD_STATE_ZERO`,
//!   data as 0; `NBD_CMD_FLAG_REQ_ONE` honoured. `NBD_CMD_FLUSH` and `NBD_CMD_CACHE` succeed.
//!   `NBD_CMD_DISC` ends the connection after the replies in flight.
//! - Writes, trims and write zeroes are answered `EPERM` (a write's payload is read and dropped,
//!   so the connection stays usable). Requests out of range, too large, with flags the command
//!   does not take, or of unknown types get `EINVAL`, as the specification says; the connection
//!   stays open. What breaks the framing (a wrong magic, a write payload larger than
//!   [`MAX_DISCARD`]) closes that connection only.
//! - Pipelining: one thread reads a connection's requests and hands reads and block status to
//!   [`WORKERS_PER_CONNECTION`] workers through a channel of [`REQUESTS_IN_FLIGHT`] (full: the
//!   reader stops reading, so a client cannot queue unbounded work); each reply is written whole
//!   under the connection's write lock as soon as its worker has it, in any order.
//! - No extended headers, no `NBD_OPT_STARTTLS`, no oldstyle: see above.
//!
//! Protocol facts come from the specification (NetworkBlockDevice/nbd, `doc/proto.md`).

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::client::{Extent, STATE_HOLE, STATE_ZERO};
use crate::proto::*;

/// Largest read or block status request served: what QEMU's server allows, and the bound of the
/// memory one request can make the server hold.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Block size advertised in `NBD_INFO_BLOCK_SIZE`: any alignment works, 4 KiB is preferred.
pub const PREFERRED_BLOCK: u32 = 4096;

/// Requests read from one connection and not yet answered. When full, the connection's reader
/// stops reading until a worker takes one (backpressure on the client, bounded memory here).
pub const REQUESTS_IN_FLIGHT: usize = 16;

/// Threads answering one connection's requests: enough to overlap repository reads of different
/// requests; more connections (multi-conn) add more.
pub const WORKERS_PER_CONNECTION: usize = 4;

/// Largest write payload read and dropped to answer `EPERM` on an open connection; a larger one
/// closes the connection (reading it would only waste time).
pub const MAX_DISCARD: u32 = 64 << 20;

/// Largest option payload accepted in the handshake (names are at most 4096 bytes); larger ones
/// up to [`MAX_DISCARD`] are read, dropped and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 64 << 10;

/// How long a client may take for each step of the handshake before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections served at once; more are closed at once (a runaway client must not exhaust threads).
pub const MAX_CONNECTIONS: usize = 64;

/// The id of `base:allocation` on every connection.
const BASE_ALLOCATION_ID: u32 = 1;
const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error values (the fixed set of the specification).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

/// A piece of a read, in order: bytes, or a run of zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Data(Bytes),
    Zero(u32),
}

impl Piece {
    pub fn len(&self) -> u32 {
        match self {
            Piece::Data(b) => b.len() as u32,
            Piece::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an export could not answer: the NBD error value and a message for the client (the
/// export logs the details itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportError {
    pub errno: u32,
    pub message: String,
}

impl ExportError {
    pub fn io(message: impl Into<String>) -> Self {
        ExportError {
            errno: EIO,
            message: message.into(),
        }
    }
}

/// What the server serves: a read-only byte range that never changes. Called from many threads.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;

    /// The bytes `offset..offset + len` (within the size, `len` at most [`MAX_REQUEST`]) as pieces
    /// whose lengths add up to `len`. An error fails the read as a whole: no byte of it is sent.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>, ExportError>;

    /// Allocation from `offset` on: consecutive extents starting at `offset`, flags
    /// [`STATE_HOLE`] | [`STATE_ZERO`] for zeros, 0 for data. They may cover less than `len` (at
    /// least one byte) or more (the server cuts them).
    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError>;

    /// `NBD_INFO_DESCRIPTION` and the detail of `NBD_REP_SERVER`.
    fn description(&self) -> String {
        String::new()
    }
}

/// The exports of a server, by name; `default` is what the name `""` selects.
#[derive(Clone, Default)]
pub struct Exports {
    named: Vec<(String, Arc<dyn Export>)>,
    default: Option<usize>,
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export; `default` also makes it the one the empty name selects.
    pub fn add(&mut self, name: &str, export: Arc<dyn Export>, default: bool) {
        self.named.push((name.to_owned(), export));
        if default {
            self.default = Some(self.named.len() - 1);
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.named.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn find(&self, name: &str) -> Option<(&str, &Arc<dyn Export>)> {
        if let Some((n, e)) = self.named.iter().find(|(n, _)| n == name) {
            return Some((n, e));
        }
        if name.is_empty() {
            return self
                .default
                .map(|i| (self.named[i].0.as_str(), &self.named[i].1));
        }
        None
    }
}

/// A connected client: a unix or TCP stream (tests use a unix socket pair).
#[derive(Debug)]
pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Connection {
    fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Connection::Unix(s) => s.shutdown(Shutdown::Both),
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(t),
            Connection::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn peer(&self) -> String {
        match self {
            Connection::Unix(_) => "unix".to_owned(),
            Connection::Tcp(s) => s
                .peer_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp".into()),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<Connection> {
        let conn = match self {
            Listener::Unix(l) => Connection::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(true);
                Connection::Tcp(s)
            }
        };
        // Accepted sockets inherit nothing from the listener on Linux, but say it.
        match &conn {
            Connection::Unix(s) => s.set_nonblocking(false)?,
            Connection::Tcp(s) => s.set_nonblocking(false)?,
        }
        Ok(conn)
    }
}

/// Counters of a server, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

/// A server of a fixed set of exports.
pub struct Server {
    exports: Exports,
    stats: Stats,
    /// Streams of the open connections, shut down to end them.
    open: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
}

impl Server {
    pub fn new(exports: Exports) -> Arc<Server> {
        Arc::new(Server {
            exports,
            stats: Stats::default(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Accepts connections until `stop` says so (asked every 50 ms), each on its own thread;
    /// then closes every connection and waits for their threads.
    pub fn serve(self: &Arc<Self>, listener: Listener, stop: impl Fn() -> bool) -> io::Result<()> {
        listener.set_nonblocking()?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        while !stop() {
            match listener.accept() {
                Ok(conn) => {
                    threads.retain(|t| !t.is_finished());
                    if threads.len() >= MAX_CONNECTIONS {
                        warn!(
                            limit = MAX_CONNECTIONS,
                            "Too many NBD connections; closing a new one."
                        );
                        conn.shutdown();
                        continue;
                    }
                    let server = self.clone();
                    threads.push(
                        std::thread::Builder::new()
                            .name("nbd-conn".into())
                            .spawn(move || server.handle(conn))?,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "Accepting an NBD connection failed.");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.close_all();
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Shuts every open connection down (their threads then end).
    pub fn close_all(&self) {
        for conn in self.open.lock().unwrap_or_else(|e| e.into_inner()).values() {
            conn.shutdown();
        }
    }

    /// Serves one connection to its end. Errors end this connection only; they are logged.
    pub fn handle(self: &Arc<Self>, conn: Connection) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let peer = conn.peer();
        match conn.try_clone() {
            Ok(c) => {
                self.open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, c);
            }
            Err(e) => {
                warn!(peer, error = %e, "Cannot register an NBD connection.");
                return;
            }
        }
        match self.connection(conn) {
            Ok(()) => debug!(peer, "NBD connection closed."),
            Err(e) if is_hangup(&e) => debug!(peer, error = %e, "NBD client went away."),
            Err(e) => info!(peer, error = %e, "NBD connection closed after an error."),
        }
        if let Some(c) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            c.shutdown();
        }
    }

    fn connection(self: &Arc<Self>, conn: Connection) -> io::Result<()> {
        conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let writer = conn.try_clone()?;
        let mut rd = BufReader::with_capacity(64 << 10, conn);
        let mut wr = BufWriter::with_capacity(256 << 10, writer);
        let Some(session) = self.handshake(&mut rd, &mut wr)? else {
            return Ok(());
        };
        rd.get_ref().set_read_timeout(None)?;
        transmission(session, rd, wr, &self.stats)
    }

    /// The handshake: `None` when the client ended it (abort, or a name `NBD_OPT_EXPORT_NAME`
    /// does not know).
    fn handshake(
        &self,
        rd: &mut impl Read,
        wr: &mut BufWriter<Connection>,
    ) -> io::Result<Option<Session>> {
        wr.write_all(&NBDMAGIC.to_be_bytes())?;
        wr.write_all(&IHAVEOPT.to_be_bytes())?;
        wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        wr.flush()?;
        let client_flags = read_u32(rd)?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(bad(format!("unknown client flags {client_flags:#x}")));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        // The export the contexts were selected for, and whether base:allocation was.
        let mut contexts: Option<(String, bool)> = None;
        loop {
            if read_u64(rd)? != IHAVEOPT {
                return Err(bad("option without IHAVEOPT".into()));
            }
            let option = read_u32(rd)?;
            let len = read_u32(rd)?;
            if len > MAX_OPTION {
                if len > MAX_DISCARD {
                    return Err(bad(format!("option of {len} bytes")));
                }
                discard(rd, len)?;
                option_reply(wr, option, REP_ERR_TOO_BIG, b"option data too large")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some((name, export)) = self.exports.find(&name) else {
                        debug!(export = name, "NBD_OPT_EXPORT_NAME of an unknown export.");
                        return Ok(None);
                    };
                    let flags = transmission_flags(structured);
                    wr.write_all(&export.size().to_be_bytes())?;
                    wr.write_all(&flags.to_be_bytes())?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124])?;
                    }
                    wr.flush()?;
                    let allocation = contexts_for(&contexts, name);
                    return Ok(Some(Session::new(name, export, structured, allocation)));
                }
                OPT_ABORT => {
                    option_reply(wr, option, REP_ACK, &[])?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        option_reply(wr, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    for (name, export) in &self.exports.named {
                        let mut d = Vec::new();
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        d.extend_from_slice(export.description().as_bytes());
                        option_reply(wr, option, REP_SERVER, &d)?;
                    }
                    option_reply(wr, option, REP_ACK, &[])?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        option_reply(
                            wr,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    structured = true;
                    option_reply(wr, option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, requests)) = parse_info(&data) else {
                        option_reply(wr, option, REP_ERR_INVALID, b"malformed request")?;
                        continue;
                    };
                    let Some((name, export)) = self.exports.find(&name) else {
                        let msg = format!("no export {name:?}; exports: {}", self.list());
                        option_reply(wr, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    };
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&export.size().to_be_bytes());
                    info.extend_from_slice(&transmission_flags(structured).to_be_bytes());
                    option_reply(wr, option, REP_INFO, &info)?;
                    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [1, PREFERRED_BLOCK, MAX_REQUEST] {
                        block.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(wr, option, REP_INFO, &block)?;
                    if requests.contains(&INFO_NAME) {
                        let mut d = INFO_NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        option_reply(wr, option, REP_INFO, &d)?;
                    }
                    let description = export.description();
                    if requests.contains(&INFO_DESCRIPTION) && !description.is_empty() {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(description.as_bytes());
                        option_reply(wr, option, REP_INFO, &d)?;
                    }
                    option_reply(wr, option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        let allocation = contexts_for(&contexts, name);
                        return Ok(Some(Session::new(name, export, structured, allocation)));
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !structured {
                        option_reply(
                            wr,
                            option,
                            REP_ERR_INVALID,
                            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                        )?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta(&data) else {
                        option_reply(wr, option, REP_ERR_INVALID, b"malformed request")?;
                        continue;
                    };
                    let Some((name, _)) = self.exports.find(&name) else {
                        let msg = format!("no export {name:?}; exports: {}", self.list());
                        option_reply(wr, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    };
                    let list = option == OPT_LIST_META_CONTEXT;
                    let matches = |q: &String| {
                        q == BASE_ALLOCATION || (list && (q == "base:" || q.is_empty()))
                    };
                    let selected = (list && queries.is_empty()) || queries.iter().any(matches);
                    if selected {
                        let id = if list { 0 } else { BASE_ALLOCATION_ID };
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        option_reply(wr, option, REP_META_CONTEXT, &d)?;
                    }
                    if !list {
                        contexts = Some((name.to_owned(), selected));
                    }
                    option_reply(wr, option, REP_ACK, &[])?;
                }
                _ => {
                    let msg = format!("{} ({option}) is not supported", option_name(option));
                    option_reply(wr, option, REP_ERR_UNSUP, msg.as_bytes())?;
                }
            }
        }
    }

    fn list(&self) -> String {
        self.exports.names().join(", ")
    }
}

/// Whether the contexts selected apply to the export chosen (a selection is for one export name).
fn contexts_for(contexts: &Option<(String, bool)>, export: &str) -> bool {
    matches!(contexts, Some((name, true)) if name == export)
}

fn transmission_flags(structured: bool) -> u16 {
    let mut flags =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// What a connection negotiated.
struct Session {
    name: String,
    export: Arc<dyn Export>,
    structured: bool,
    allocation: bool,
}

impl Session {
    fn new(name: &str, export: &Arc<dyn Export>, structured: bool, allocation: bool) -> Session {
        Session {
            name: name.to_owned(),
            export: export.clone(),
            structured,
            allocation,
        }
    }
}

/// One request, as read.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

type Writer = Arc<Mutex<BufWriter<Connection>>>;

fn transmission(
    session: Session,
    mut rd: BufReader<Connection>,
    wr: BufWriter<Connection>,
    stats: &Stats,
) -> io::Result<()> {
    debug!(
        export = session.name,
        structured = session.structured,
        allocation = session.allocation,
        "NBD transmission begins."
    );
    let session = Arc::new(session);
    let wr: Writer = Arc::new(Mutex::new(wr));
    let (tx, rx) = crossbeam_channel::bounded::<Request>(REQUESTS_IN_FLIGHT);
    let failed = Arc::new(Mutex::new(None::<io::Error>));
    let mut workers = Vec::with_capacity(WORKERS_PER_CONNECTION);
    for _ in 0..WORKERS_PER_CONNECTION {
        let (rx, session, wr, failed) = (rx.clone(), session.clone(), wr.clone(), failed.clone());
        workers.push(
            std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn(move || {
                    for req in rx {
                        if let Err(e) = answer(&session, &wr, req) {
                            // The stream is broken: end the reader too.
                            lock(&wr).get_ref().shutdown();
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                })?,
        );
    }
    // Only the workers receive: when they all stopped (a broken stream), sending fails at once.
    drop(rx);
    let result = read_requests(&session, &mut rd, &wr, &tx, stats);
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let _ = lock(&wr).flush();
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    result
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads requests until `NBD_CMD_DISC`, the end of the stream or broken framing; answers the
/// cheap ones here and queues reads and block status for the workers.
fn read_requests(
    session: &Session,
    rd: &mut BufReader<Connection>,
    wr: &Writer,
    tx: &crossbeam_channel::Sender<Request>,
    stats: &Stats,
) -> io::Result<()> {
    let size = session.export.size();
    loop {
        let mut h = [0u8; 28];
        match rd.read_exact(&mut h) {
            Ok(()) => {}
            // A client that closes without NBD_CMD_DISC (nbdinfo does so after NBD_OPT_INFO).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(bad(format!("request magic {magic:#x}")));
        }
        let req = Request {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(h[24..28].try_into().expect("4 bytes")),
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let in_range = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= size);
        let refuse = |errno: u32, message: String| {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            debug!(
                command = command_name(req.kind),
                offset = req.offset,
                len = req.len,
                errno,
                message,
                "NBD request refused."
            );
            let mut w = lock(wr);
            error_reply(&mut *w, session.structured, req.cookie, errno, &message)?;
            w.flush()
        };
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.len > MAX_DISCARD {
                    return Err(bad(format!("write payload of {} bytes", req.len)));
                }
                discard(rd, req.len)?;
                refuse(EPERM, "the export is read-only".into())?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => refuse(EPERM, "the export is read-only".into())?,
            CMD_FLUSH | CMD_CACHE => {
                if req.flags != 0 {
                    refuse(EINVAL, format!("flags {:#x} not valid here", req.flags))?;
                } else if req.kind == CMD_CACHE && !in_range {
                    refuse(EINVAL, out_of_range(&req, size))?;
                } else {
                    let mut w = lock(wr);
                    success_reply(&mut *w, session.structured, req.cookie)?;
                    w.flush()?;
                }
            }
            CMD_READ => {
                let allowed = if session.structured { CMD_FLAG_DF } else { 0 };
                if req.flags & !allowed != 0 {
                    refuse(EINVAL, format!("flags {:#x} not valid here", req.flags))?;
                } else if !in_range {
                    refuse(EINVAL, out_of_range(&req, size))?;
                } else if req.len > MAX_REQUEST {
                    refuse(
                        EINVAL,
                        format!(
                            "read of {} bytes is above the maximum {MAX_REQUEST}",
                            req.len
                        ),
                    )?;
                } else {
                    tx.send(req).map_err(|_| bad("workers stopped".into()))?;
                }
            }
            CMD_BLOCK_STATUS => {
                if req.flags & !CMD_FLAG_REQ_ONE != 0 {
                    refuse(EINVAL, format!("flags {:#x} not valid here", req.flags))?;
                } else if !session.allocation {
                    refuse(EINVAL, "no meta context was negotiated".into())?;
                } else if !in_range || req.len == 0 {
                    refuse(EINVAL, out_of_range(&req, size))?;
                } else {
                    tx.send(req).map_err(|_| bad("workers stopped".into()))?;
                }
            }
            other => refuse(EINVAL, format!("unknown command {other}"))?,
        }
    }
}

fn out_of_range(req: &Request, size: u64) -> String {
    format!(
        "{} bytes at offset {} are outside the export of {size} bytes",
        req.len, req.offset
    )
}

/// Answers a read or a block status request (a worker).
fn answer(session: &Session, wr: &Writer, req: Request) -> io::Result<()> {
    let export = &*session.export;
    match req.kind {
        CMD_READ => {
            let pieces = if req.len == 0 {
                Ok(Vec::new())
            } else {
                export.read(req.offset, req.len).and_then(|p| {
                    let total: u64 = p.iter().map(|p| u64::from(p.len())).sum();
                    if total == u64::from(req.len) {
                        Ok(p)
                    } else {
                        Err(ExportError::io(format!(
                            "the export returned {total} bytes for a read of {}",
                            req.len
                        )))
                    }
                })
            };
            let mut w = lock(wr);
            match pieces {
                Ok(pieces) => read_reply(&mut *w, session.structured, &req, &pieces)?,
                Err(e) => {
                    error_reply(&mut *w, session.structured, req.cookie, e.errno, &e.message)?
                }
            }
            w.flush()
        }
        CMD_BLOCK_STATUS => {
            let limit = req.len.min(MAX_REQUEST.max(1 << 30));
            let reply = export.extents(req.offset, limit).map(|extents| {
                descriptors(
                    req.offset,
                    limit,
                    &extents,
                    req.flags & CMD_FLAG_REQ_ONE != 0,
                )
            });
            let mut w = lock(wr);
            match reply {
                Ok(d) if !d.is_empty() => {
                    let mut payload = Vec::with_capacity(4 + 8 * d.len());
                    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    for (len, flags) in d {
                        payload.extend_from_slice(&len.to_be_bytes());
                        payload.extend_from_slice(&flags.to_be_bytes());
                    }
                    chunk_header(
                        &mut *w,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_BLOCK_STATUS,
                        req.cookie,
                        payload.len() as u32,
                    )?;
                    w.write_all(&payload)?;
                }
                Ok(_) => error_reply(&mut *w, true, req.cookie, EIO, "the export gave no extents")?,
                Err(e) => error_reply(&mut *w, true, req.cookie, e.errno, &e.message)?,
            }
            w.flush()
        }
        _ => unreachable!("only reads and block status are queued"),
    }
}

/// The extents within `offset..offset + len` as (length, flags) descriptors, neighbours with the
/// same flags joined; only the first with `one`.
fn descriptors(offset: u64, len: u32, extents: &[Extent], one: bool) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = offset;
    for e in extents {
        if at >= end {
            break;
        }
        if e.offset != at || e.len == 0 {
            break; // Not consecutive: stop at what is known.
        }
        let n = e.len.min(end - at) as u32;
        let flags = e.flags & (STATE_HOLE | STATE_ZERO);
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n,
            _ => out.push((n, flags)),
        }
        at += u64::from(n);
    }
    if one {
        out.truncate(1);
    }
    out
}

fn chunk_header(
    w: &mut impl Write,
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u32,
) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    w.write_all(&h)
}

fn simple_header(w: &mut impl Write, errno: u32, cookie: u64) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h)
}

fn success_reply(w: &mut impl Write, structured: bool, cookie: u64) -> io::Result<()> {
    if structured {
        chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
    } else {
        simple_header(w, 0, cookie)
    }
}

fn error_reply(
    w: &mut impl Write,
    structured: bool,
    cookie: u64,
    errno: u32,
    message: &str,
) -> io::Result<()> {
    if !structured {
        return simple_header(w, errno, cookie);
    }
    // Strings are at most 4096 bytes; cut at a character boundary.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    chunk_header(
        w,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    )?;
    w.write_all(&errno.to_be_bytes())?;
    w.write_all(&(message.len() as u16).to_be_bytes())?;
    w.write_all(message)
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn write_zeros(w: &mut impl Write, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn write_pieces(w: &mut impl Write, pieces: &[Piece]) -> io::Result<()> {
    for p in pieces {
        match p {
            Piece::Data(b) => w.write_all(b)?,
            Piece::Zero(n) => write_zeros(w, u64::from(*n))?,
        }
    }
    Ok(())
}

/// A successful read: a simple reply with the bytes; or structured chunks, runs of data pieces in
/// one data chunk and zeros as holes (one data chunk with everything under `NBD_CMD_FLAG_DF`).
fn read_reply(
    w: &mut impl Write,
    structured: bool,
    req: &Request,
    pieces: &[Piece],
) -> io::Result<()> {
    if !structured {
        simple_header(w, 0, req.cookie)?;
        return write_pieces(w, pieces);
    }
    if pieces.is_empty() {
        return chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
    }
    if req.flags & CMD_FLAG_DF != 0 {
        chunk_header(
            w,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            8 + req.len,
        )?;
        w.write_all(&req.offset.to_be_bytes())?;
        return write_pieces(w, pieces);
    }
    // Runs: consecutive data pieces form one chunk, consecutive zeros one hole.
    let mut runs: Vec<(bool, usize, usize, u32)> = Vec::new(); // (data, first, end, len)
    for (i, p) in pieces.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let data = matches!(p, Piece::Data(_));
        match runs.last_mut() {
            Some((d, _, end, len)) if *d == data && *end == i => {
                *end = i + 1;
                *len += p.len();
            }
            _ => runs.push((data, i, i + 1, p.len())),
        }
    }
    let mut offset = req.offset;
    let last = runs.len().saturating_sub(1);
    for (n, (data, first, end, len)) in runs.into_iter().enumerate() {
        let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
        if data {
            chunk_header(w, flags, REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len)?;
            w.write_all(&offset.to_be_bytes())?;
            write_pieces(w, &pieces[first..end])?;
        } else {
            chunk_header(w, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12)?;
            w.write_all(&offset.to_be_bytes())?;
            w.write_all(&len.to_be_bytes())?;
        }
        offset += u64::from(len);
    }
    Ok(())
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&REP_MAGIC.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: the name and the information requested.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = take_string(data)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

/// Meta context option data: the export name and the queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut rest) = take_string(data)?;
    let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let (q, r) = take_string(rest)?;
        queries.push(q);
        rest = r;
    }
    rest.is_empty().then_some((name, queries))
}

fn take_string(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if len > 4096 {
        return None;
    }
    let s = data.get(4..4 + len)?;
    Some((String::from_utf8(s.to_vec()).ok()?, &data[4 + len..]))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn discard(r: &mut impl Read, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
    if copied != u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn bad(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::NotConnected
    )
}

/// An export held in memory, zeros found per 4 KiB block: for tests and benchmarks.
pub struct MemoryExport {
    data: Bytes,
}

impl MemoryExport {
    pub fn new(data: impl Into<Bytes>) -> Self {
        MemoryExport { data: data.into() }
    }

    fn zero_block(&self, at: u64) -> bool {
        let end = (at + 4096).min(self.data.len() as u64);
        self.data[at as usize..end as usize].iter().all(|b| *b == 0)
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<Piece>, ExportError> {
        let mut pieces = Vec::new();
        let end = offset + u64::from(len);
        let mut at = offset;
        while at < end {
            let block_end = ((at / 4096 + 1) * 4096).min(end);
            let n = (block_end - at) as u32;
            if self.zero_block(at / 4096 * 4096) {
                pieces.push(Piece::Zero(n));
            } else {
                pieces.push(Piece::Data(
                    self.data.slice(at as usize..block_end as usize),
                ));
            }
            at = block_end;
        }
        Ok(pieces)
    }

    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        let end = offset + u64::from(len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let block_end = ((at / 4096 + 1) * 4096).min(end);
            let flags = if self.zero_block(at / 4096 * 4096) {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            out.push(Extent {
                offset: at,
                len: block_end - at,
                flags,
            });
            at = block_end;
        }
        Ok(out)
    }

    fn description(&self) -> String {
        "in memory".into()
    }
}

/// A server on a unix socket pair, for tests: the client's end and the serving thread.
pub fn serve_pair(server: &Arc<Server>) -> io::Result<(UnixStream, JoinHandle<()>)> {
    let (a, b) = UnixStream::pair()?;
    let server = server.clone();
    let t = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || server.handle(Connection::Unix(b)))?;
    Ok((a, t))
}
