//! The byte stream under a [`crate::Client`]: a unix socket (libvirt's pull-mode backup, `qemu-nbd --socket`)
//! or TCP. Both get read and write timeouts, so a server that stops answering turns into an error instead of
//! a hung backup. Any other `Read + Write` stream can be wrapped too ([`Transport::from_stream`]): an
//! in-memory script of a server's answers for tests and the fuzzer, or a tunnel the caller set up.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        }
    }

    pub(crate) fn shutdown(&self) {
        // Best effort: the connection is going away either way.
        let _ = match self {
            Transport::Unix { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
            Transport::Tcp { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
            // Dropping the client drops the stream, which is all a foreign stream offers.
            Transport::Stream { .. } => Ok(()),
        };
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.read(buf),
            Transport::Tcp { stream, .. } => stream.read(buf),
            Transport::Stream { stream, .. } => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.write(buf),
            Transport::Tcp { stream, .. } => stream.write(buf),
            Transport::Stream { stream, .. } => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix { stream, .. } => stream.flush(),
            Transport::Tcp { stream, .. } => stream.flush(),
            Transport::Stream { stream, .. } => stream.flush(),
        }
    }
}
