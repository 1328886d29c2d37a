//! The byte stream under a [`crate::Client`]: a unix socket (libvirt's pull-mode backup, `qemu-nbd --socket`)
//! or TCP. Both get read and write timeouts, so a server that stops answering turns into an error instead of
//! a hung backup. Any other `Read + Write` stream can be wrapped too ([`Transport::from_stream`]): an
//! in-memory script of a server's answers for tests and the fuzzer, or a tunnel the caller set up.
//!
//! After `NBD_OPT_STARTTLS` the client replaces its transport by [`Transport::Tls`], a rustls session over
//! the same stream (`Transport::start_tls`); the stream's timeouts keep bounding every read and write.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::error::{NbdError, Result};

/// How long one read or write may block before the operation fails with a timeout. Generous, because a
/// server reading a cold qcow2 over slow storage may take seconds per 32 MiB request; small enough that a
/// dead server is noticed while an operator still waits.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A connected stream with its address, kept for error messages.
pub enum Transport {
    Unix {
        stream: UnixStream,
        path: PathBuf,
    },
    Tcp {
        stream: TcpStream,
        addr: SocketAddr,
    },
    /// A stream this crate did not open: no timeouts are set (the stream's own apply) and closing only
    /// drops it. `name` stands for the server in error messages.
    Stream {
        stream: Box<dyn ByteStream>,
        name: String,
    },
    /// A TLS session over one of the others, after `NBD_OPT_STARTTLS`: everything read and written is
    /// encrypted, and the inner stream's timeouts still apply.
    Tls {
        stream: Box<StreamOwned<ClientConnection, TlsSocket>>,
    },
}

/// What [`Transport::from_stream`] accepts: any blocking byte stream that can move to another thread.
pub trait ByteStream: Read + Write + Send {}

impl<T: Read + Write + Send> ByteStream for T {}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix { stream, path } => f
                .debug_struct("Unix")
                .field("stream", stream)
                .field("path", path)
                .finish(),
            Transport::Tcp { stream, addr } => f
                .debug_struct("Tcp")
                .field("stream", stream)
                .field("addr", addr)
                .finish(),
            Transport::Stream { name, .. } => f
                .debug_struct("Stream")
                .field("name", name)
                .finish_non_exhaustive(),
            Transport::Tls { stream } => f
                .debug_struct("Tls")
                .field("inner", &stream.sock.inner)
                .field("protocol", &stream.conn.protocol_version())
                .finish_non_exhaustive(),
        }
    }
}

impl Transport {
    /// Connects to a unix socket; `timeout` bounds every later read and write.
    pub fn unix(path: &Path, timeout: Duration) -> Result<Self> {
        let peer = format!("unix:{}", path.display());
        let io = |op, source| NbdError::Io {
            op,
            peer: peer.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(|e| io("connect to", e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| io("set timeouts on", e))?;
        Ok(Transport::Unix {
            stream,
            path: path.to_path_buf(),
        })
    }

    /// Connects over TCP, trying each resolved address in turn; `timeout` bounds the connect and every later
    /// read and write.
    pub fn tcp(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Self> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| NbdError::Io {
                op: "resolve the address of",
                peer: "tcp".to_string(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        );
        let mut last_peer = "tcp:?".to_string();
        for addr in addrs {
            last_peer = format!("tcp:{addr}");
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    let setup = stream
                        .set_read_timeout(Some(timeout))
                        .and_then(|()| stream.set_write_timeout(Some(timeout)))
                        .and_then(|()| stream.set_nodelay(true));
                    setup.map_err(|source| NbdError::Io {
                        op: "set options on",
                        peer: last_peer.clone(),
                        source,
                    })?;
                    return Ok(Transport::Tcp { stream, addr });
                }
                Err(e) => last = e,
            }
        }
        Err(NbdError::Io {
            op: "connect to",
            peer: last_peer,
            source: last,
        })
    }

    /// Wraps a stream that is already connected to a server (or plays one): an in-memory script of
    /// replies in tests and fuzzing, a pipe to `nbdkit -s`, an SSH channel. A read that finds the end of
    /// the stream is an error (`UnexpectedEof`), never a wait, so a finite script cannot hang the client.
    pub fn from_stream(stream: impl ByteStream + 'static, name: impl Into<String>) -> Self {
        Transport::Stream {
            stream: Box::new(stream),
            name: name.into(),
        }
    }

    /// The server's address as written in error messages.
    pub fn peer(&self) -> String {
        match self {
            Transport::Unix { path, .. } => format!("unix:{}", path.display()),
            Transport::Tcp { addr, .. } => format!("tcp:{addr}"),
            Transport::Stream { name, .. } => name.clone(),
            Transport::Tls { stream } => stream.sock.inner.peer(),
        }
    }

    /// The TLS version in use (`"TLSv1_3"`), `None` on a plain stream.
    pub fn tls_protocol(&self) -> Option<String> {
        match self {
            Transport::Tls { stream } => stream.conn.protocol_version().map(|v| format!("{v:?}")),
            _ => None,
        }
    }

    /// The TLS cipher suite in use (`"TLS13_AES_128_GCM_SHA256"`), `None` on a plain stream.
    pub fn tls_cipher_suite(&self) -> Option<String> {
        match self {
            Transport::Tls { stream } => stream
                .conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite())),
            _ => None,
        }
    }

    pub(crate) fn shutdown(&mut self) {
        // Best effort: the connection is going away either way.
        let _ = match self {
            Transport::Unix { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
            Transport::Tcp { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
            // Dropping the client drops the stream, which is all a foreign stream offers.
            Transport::Stream { .. } => Ok(()),
            Transport::Tls { stream } => {
                // close_notify tells the server the session ended on purpose, not truncated.
                stream.conn.send_close_notify();
                let _ = stream.conn.complete_io(&mut stream.sock);
                stream.sock.inner.shutdown();
                Ok(())
            }
        };
    }

    /// The read timeout of a socket (`None`: a caller's stream, or a socket without one).
    fn read_timeout(&self) -> Option<Duration> {
        match self {
            Transport::Unix { stream, .. } => stream.read_timeout().ok().flatten(),
            Transport::Tcp { stream, .. } => stream.read_timeout().ok().flatten(),
            Transport::Stream { .. } | Transport::Tls { .. } => None,
        }
    }

    /// Sets the read and write timeouts of a socket; does nothing to other streams.
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Unix { stream, .. } => stream
                .set_read_timeout(timeout)
                .and_then(|()| stream.set_write_timeout(timeout)),
            Transport::Tcp { stream, .. } => stream
                .set_read_timeout(timeout)
                .and_then(|()| stream.set_write_timeout(timeout)),
            Transport::Stream { .. } | Transport::Tls { .. } => Ok(()),
        }
    }

    /// Runs a TLS client handshake on this stream and, when it succeeds, becomes [`Transport::Tls`].
    /// The whole handshake must end within `timeout`: each read and write is bounded by what is left
    /// of it (instead of the socket's own timeouts, which are restored afterwards; a caller's stream
    /// keeps its own, so there the deadline is checked between reads only). On failure the stream
    /// stays as it was, for the caller to shut down: after `NBD_OPT_STARTTLS` was acknowledged nothing
    /// may continue in plain text.
    ///
    /// Errors are the handshake's: `TimedOut` when the deadline passed, `InvalidData` wrapping a
    /// [`rustls::Error`] for a refused certificate or an alert, the socket's own otherwise.
    pub(crate) fn start_tls(
        &mut self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> io::Result<()> {
        if matches!(self, Transport::Tls { .. }) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already running on this connection",
            ));
        }
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let plain = std::mem::replace(
            self,
            // Stands in while the handshake runs; never read or written.
            Transport::Stream {
                stream: Box::new(io::Cursor::new(Vec::new())),
                name: String::new(),
            },
        );
        let mut sock = TlsSocket::new(plain);
        let saved = sock.inner.read_timeout();
        let result = handshake(&mut conn, &mut sock, timeout);
        let restored = sock.inner.set_timeouts(saved);
        match result.and(restored) {
            Ok(()) => {
                *self = Transport::Tls {
                    stream: Box::new(StreamOwned::new(conn, sock)),
                };
                Ok(())
            }
            Err(e) => {
                *self = sock.inner;
                Err(e)
            }
        }
    }
}

/// Drives `conn` through its handshake on `sock` until it ends, fails or `timeout` passes.
fn handshake(
    conn: &mut ClientConnection,
    sock: &mut TlsSocket,
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the TLS handshake did not finish within {timeout:?}"),
        )
    };
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        sock.inner.set_timeouts(Some(left))?;
        match conn.complete_io(sock) {
            Ok(_) => {}
            // The socket waited for the rest of the deadline (SO_RCVTIMEO reports EAGAIN).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes read from the socket at once under a TLS session. rustls asks for at most 4 KiB per read,
/// so without a buffer below it a 32 MiB reply costs 8192 system calls; records are at most 16 KiB
/// plus a few bytes, and the socket usually holds many.
const TLS_READ_BUFFER: usize = 256 << 10;

/// The stream under a TLS session: reads go through a buffer (256 KiB), writes straight
/// to the stream (rustls already hands over whole records).
pub struct TlsSocket {
    inner: Transport,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl TlsSocket {
    fn new(inner: Transport) -> Self {
        TlsSocket {
            inner,
            buf: vec![0; TLS_READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl fmt::Debug for TlsSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSocket")
            .field("inner", &self.inner)
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl Read for TlsSocket {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            self.end = self.inner.read(&mut self.buf)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.read(buf),
            Transport::Tcp { stream, .. } => stream.read(buf),
            Transport::Stream { stream, .. } => stream.read(buf),
            Transport::Tls { stream } => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.write(buf),
            Transport::Tcp { stream, .. } => stream.write(buf),
            Transport::Stream { stream, .. } => stream.write(buf),
            Transport::Tls { stream } => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix { stream, .. } => stream.flush(),
            Transport::Tcp { stream, .. } => stream.flush(),
            Transport::Stream { stream, .. } => stream.flush(),
            Transport::Tls { stream } => stream.flush(),
        }
    }
}
