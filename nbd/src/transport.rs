//! The byte stream under a [`crate::Client`]: a unix socket (libvirt's pull-mode backup, `qemu-nbd --socket`)
//! or TCP. Both get read and write timeouts, so a server that stops answering turns into an error instead of
//! a hung backup.

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
#[derive(Debug)]
pub enum Transport {
    Unix { stream: UnixStream, path: PathBuf },
    Tcp { stream: TcpStream, addr: SocketAddr },
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

    /// The server's address as written in error messages.
    pub fn peer(&self) -> String {
        match self {
            Transport::Unix { path, .. } => format!("unix:{}", path.display()),
            Transport::Tcp { addr, .. } => format!("tcp:{addr}"),
        }
    }

    pub(crate) fn shutdown(&self) {
        // Best effort: the connection is going away either way.
        let _ = match self {
            Transport::Unix { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
            Transport::Tcp { stream, .. } => stream.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.read(buf),
            Transport::Tcp { stream, .. } => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix { stream, .. } => stream.write(buf),
            Transport::Tcp { stream, .. } => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix { stream, .. } => stream.flush(),
            Transport::Tcp { stream, .. } => stream.flush(),
        }
    }
}
