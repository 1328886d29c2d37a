//! `serve`: a restore point's disks as read-only NBD exports (`backflow_serve`), until SIGTERM or
//! SIGINT.
//!
//! Once the socket accepts connections, one line goes to stdout, for scripts and for the
//! processes that start `serve` as a child and wait for it:
//! `listening unix:/run/x.sock exports vda,vdb` (or `listening tcp:127.0.0.1:10809 exports vda`:
//! the port actually bound, so `tcp:127.0.0.1:0` works). Nothing else goes to stdout.
//!
//! What a killed server (SIGKILL) can leave, and what becomes of it:
//! - the unix socket file: the next `serve` on the same path finds that nothing accepts there
//!   (connection refused) and replaces it; a socket a live server accepts on is an error naming it;
//! - its registration in the repository's `users/`: a local one is a file whose `flock` the kernel
//!   freed, which the next `serve` or garbage collection removes (and a gc never waits for); on
//!   object storage a lease object no longer renewed, which counts as gone once older than the
//!   lease bound (`BACKFLOW_LEASE_SECONDS`): a gc waits for it until then, not longer;
//! - nothing else: the cache and the read-ahead live in memory, and the S3 store's local copies of
//!   manifests and index files are unlinked files, gone with the process.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use backflow_nbd::server::{Listener, Server};
use backflow_pipeline::CancelToken;
use backflow_repository::RepoError;
use backflow_serve::{RestorePoint, ServeOptions};
use tracing::info;

use crate::{BadInput, open_repo, repo_location};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub point: crate::PointArgs,
    /// Serve only this disk, also as the default export (the empty name). Without it every disk
    /// is an export named by its disk name.
    #[arg(long)]
    pub disk: Option<String>,
    /// Where to listen: `unix:PATH` (a stale socket file there is replaced), or `tcp:HOST:PORT`
    /// (loopback unless --allow-remote; port 0 picks a free one).
    #[arg(long, value_name = "ADDRESS")]
    pub listen: String,
    /// Decoded chunks kept in memory, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = backflow_serve::DEFAULT_CACHE_BYTES >> 20)]
    pub cache_mib: u64,
    /// Read ahead of sequential readers, in MiB (0: none; at most a quarter of the cache).
    #[arg(long, value_name = "MIB", default_value_t = backflow_serve::DEFAULT_READ_AHEAD_BYTES >> 20)]
    pub read_ahead_mib: u64,
    /// Listen on a TCP address that is not loopback. The NBD session is not encrypted and not
    /// authenticated: anyone who reaches the port reads the disks.
    #[arg(long)]
    pub allow_remote: bool,
}

/// Where `--listen` points.
enum Address {
    Unix(PathBuf),
    Tcp(Vec<SocketAddr>, String),
}

fn parse_listen(given: &str, allow_remote: bool) -> Result<Address> {
    let bad = |why: &str| BadInput::new(format!("--listen {given}: {why}"));
    if let Some(path) = given.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("expected unix:PATH, the path is empty").into());
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    let Some(rest) = given.strip_prefix("tcp:") else {
        return Err(bad("expected unix:PATH or tcp:HOST:PORT").into());
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(bad("expected tcp:HOST:PORT, there is no port").into());
    };
    let port: u16 = port.parse().map_err(|_| {
        bad(&format!(
            "the port {port:?} is not a number from 0 to 65535"
        ))
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("expected tcp:HOST:PORT, the host is empty").into());
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(bad(&format!("{host} resolves to no address")).into());
    }
    if !allow_remote && let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(bad(&format!(
            "{} is not a loopback address: NBD carries the disks unencrypted and \
             unauthenticated; listen on a unix socket or loopback, or pass --allow-remote",
            a.ip()
        ))
        .into());
    }
    Ok(Address::Tcp(addrs, host.to_owned()))
}

/// Binds the unix socket at `path`, replacing a stale socket file (one nothing accepts on).
fn bind_unix(path: &Path) -> Result<UnixListener> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(BadInput::new(format!(
                    "--listen unix:{shown}: a server accepts connections on this socket \
                     already; stop it or choose another path"
                ))
                .into());
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                info!(socket = %shown, "Replacing a stale socket (nothing accepts on it).");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {shown}"))?;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("checking the existing socket {shown}"))
                );
            }
        },
        Ok(_) => {
            return Err(BadInput::new(format!(
                "--listen unix:{shown}: the path exists and is not a socket; refusing to replace it"
            ))
            .into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("checking {shown}"))),
    }
    UnixListener::bind(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => BadInput::new(
            format!("--listen unix:{shown}: cannot create the socket: {e}"),
        )
        .into(),
        _ => anyhow::Error::new(e).context(format!("creating the socket {shown}")),
    })
}

/// The socket file this process made, removed when it ends (only if it is still that file).
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        point: crate::PointArgs { repo, snapshot, vm },
        disk,
        listen,
        cache_mib,
        read_ahead_mib,
        allow_remote,
    } = args;
    let address = parse_listen(&listen, allow_remote)?;
    let location = repo_location(&repo)?;
    let repository = open_repo(&location)?;
    // Registrations of dead processes (a killed `serve` among them) are removed by listing the
    // live ones, as a gc does; a failure here changes nothing for serving.
    if let Err(e) = repository.store().live("users/") {
        tracing::debug!(error = %e, "Listing the live registrations failed.");
    }
    let opened = match &vm {
        Some(vm) => repository
            .resolve_snapshot(&snapshot, Some(vm))
            .and_then(|id| repository.open_snapshot(&id)),
        None => repository.open_snapshot(&snapshot),
    };
    let snapshot = opened.map_err(|e| -> anyhow::Error {
        match e {
            RepoError::SnapshotNotFound { .. }
            | RepoError::AmbiguousSnapshot { .. }
            | RepoError::LatestNeedsVm { .. }
            | RepoError::NoSnapshotOfVm { .. } => BadInput::new(e.to_string()).into(),
            e => anyhow::Error::new(e).context(format!("opening snapshot {snapshot}")),
        }
    })?;
    let names: Vec<String> = snapshot
        .meta()
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    if let Some(d) = &disk
        && !names.contains(d)
    {
        return Err(BadInput::new(format!(
            "--disk {d}: restore point {} has no such disk; its disks: {}",
            snapshot.id(),
            names.join(", ")
        ))
        .into());
    }
    let options = ServeOptions {
        cache_bytes: cache_mib << 20,
        read_ahead_bytes: read_ahead_mib << 20,
        ..ServeOptions::default()
    };
    let id = snapshot.id().to_owned();
    let point = RestorePoint::new(repository, snapshot, &options)
        .context("starting the read-ahead threads")?;
    let exports = point.exports(disk.as_deref()).expect("disk checked above");
    let served = exports.names().join(",");

    let (listener, shown, _socket) = match address {
        Address::Unix(path) => {
            let l = bind_unix(&path)?;
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("checking the new socket {}", path.display()))?;
            let socket = SocketFile {
                path: path.clone(),
                id: (meta.dev(), meta.ino()),
            };
            (
                Listener::Unix(l),
                format!("unix:{}", path.display()),
                Some(socket),
            )
        }
        Address::Tcp(addrs, host) => {
            let l = TcpListener::bind(&addrs[..]).map_err(|e| {
                BadInput::new(format!("--listen {listen}: cannot listen on {host}: {e}"))
            })?;
            let bound = l.local_addr().context("the bound address")?;
            (Listener::Tcp(l), format!("tcp:{bound}"), None)
        }
    };
    let server = Server::new(exports);
    let token = CancelToken::new();
    crate::signals::cancel_on_signals(token.clone());
    info!(snapshot = id, listen = shown, exports = served, "Serving.");
    {
        // Ignore a closed stdout: the parent may not read it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening {shown} exports {served}");
        let _ = out.flush();
    }
    let served = server.serve(listener, || token.is_cancelled());
    let stats = server.stats();
    let cache = point.cache().stats();
    use std::sync::atomic::Ordering::Relaxed;
    info!(
        connections = stats.connections.load(Relaxed),
        requests = stats.requests.load(Relaxed),
        errors = stats.errors.load(Relaxed),
        cache_hits = cache.hits.load(Relaxed),
        chunk_loads = cache.loads.load(Relaxed),
        read_ahead = cache.prefetched.load(Relaxed),
        "Stopped serving."
    );
    drop(server);
    point.close();
    served.context("accepting connections")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_or_say_what_is_wrong() {
        assert!(
            matches!(parse_listen("unix:/tmp/x.sock", false), Ok(Address::Unix(p)) if p == Path::new("/tmp/x.sock"))
        );
        assert!(matches!(
            parse_listen("tcp:127.0.0.1:0", false),
            Ok(Address::Tcp(..))
        ));
        assert!(matches!(
            parse_listen("tcp:[::1]:10809", false),
            Ok(Address::Tcp(..))
        ));
        for (given, needle) in [
            ("/tmp/x.sock", "expected unix:PATH or tcp:HOST:PORT"),
            ("unix:", "the path is empty"),
            ("tcp:127.0.0.1", "there is no port"),
            ("tcp:localhost:99999", "not a number"),
            ("tcp::80", "the host is empty"),
            ("tcp:192.0.2.1:10809", "not a loopback address"),
        ] {
            let e = parse_listen(given, false).err().unwrap().to_string();
            assert!(e.contains(needle), "{given}: {e}");
        }
        assert!(parse_listen("tcp:192.0.2.1:10809", true).is_ok());
    }
}
