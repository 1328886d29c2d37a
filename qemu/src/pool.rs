//! A pool of NBD connections to one export, shared by the workers of a stage.
//!
//! An NBD [`Client`] serves one request at a time (`&mut self`), while a stage reads or writes with
//! several workers. [`ClientPool::with_client`] lends a client for one closure: an idle one, or a
//! new connection while fewer than `max_connections` exist, or else it waits until one comes back.
//! A client comes back only if the closure succeeded: after a failed request its stream may be out
//! of step, so it is dropped and a later call connects afresh.
//!
//! The pool knows nothing of reads or writes: the export reader (`base:allocation` reads) and the
//! disk writer (writes into a qcow2) both use it. It connects over a unix socket, TCP, or TCP with
//! TLS ([`NbdAddress`]).

use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use backflow_nbd::{Client, Result};

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    /// `host` is a name or an address (IPv6 without brackets); every address it resolves to is
    /// tried in turn.
    Tcp {
        host: String,
        port: u16,
    },
    /// TCP with TLS (STARTTLS): the server is verified against `tls`'s CA and `host` as its name
    /// (a DNS name or an IP address, which its certificate must name), and `tls`'s client
    /// certificate is presented. Never plain text.
    TcpTls {
        host: String,
        port: u16,
        tls: std::sync::Arc<backflow_nbd::TlsSettings>,
    },
}

impl NbdAddress {
    /// Opens a connection with the client's default timeout and negotiates `export` and `contexts`.
    pub fn connect(&self, export: &str, contexts: &[&str]) -> Result<Client> {
        match self {
            NbdAddress::Unix(socket) => Client::connect_unix(socket, export, contexts),
            NbdAddress::Tcp { host, port } => {
                Client::connect_tcp((host.as_str(), *port), export, contexts)
            }
            NbdAddress::TcpTls { host, port, tls } => {
                Client::connect_tcp_tls((host.as_str(), *port), host, tls, export, contexts)
            }
        }
    }

    /// `export` at this address as an NBD URI (the syntax of qemu, libnbd and nbdcopy), for
    /// manifests and error messages.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddress::Unix(socket) => {
                format!("nbd+unix:///{export}?socket={}", socket.display())
            }
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export}")
            }
            NbdAddress::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
            NbdAddress::TcpTls { host, port, .. } if host.contains(':') => {
                format!("nbds://[{host}]:{port}/{export}")
            }
            NbdAddress::TcpTls { host, port, .. } => format!("nbds://{host}:{port}/{export}"),
        }
    }
}

#[derive(Debug)]
pub struct ClientPool {
    address: NbdAddress,
    export: String,
    /// Meta contexts every connection negotiates (none for plain reads and writes).
    contexts: Vec<String>,
    state: Mutex<State>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct State {
    idle: Vec<Client>,
    /// Clients in existence: idle, lent out, or being connected.
    open: usize,
    /// Most clients at once: as asked, or one once the server turns out not to allow multi-conn.
    limit: usize,
}

impl State {
    /// A server that does not advertise `NBD_FLAG_CAN_MULTI_CONN` gets one connection only:
    /// without the flag, what one connection writes or flushes need not be seen by another.
    fn learn(&mut self, client: &Client) {
        if !client.can_multi_conn() && self.limit > 1 {
            tracing::debug!("The server does not allow multi-conn: one connection.");
            self.limit = 1;
        }
    }
}

impl ClientPool {
    /// A pool of at most `max_connections` (at least one) connections to `export` on the unix
    /// socket `socket`: [`with_address`](Self::with_address) with [`NbdAddress::Unix`].
    pub fn new(
        socket: PathBuf,
        export: &str,
        contexts: &[&str],
        max_connections: usize,
        first: Option<Client>,
    ) -> ClientPool {
        Self::with_address(
            NbdAddress::Unix(socket),
            export,
            contexts,
            max_connections,
            first,
        )
    }

    /// A pool of at most `max_connections` (at least one) connections to `export` at `address`.
    /// `first` is a client the caller already connected (to learn the export's size, say); it
    /// joins the pool as an idle client and counts against the maximum. The maximum drops to one as
    /// soon as any connection shows that the server does not allow multi-conn.
    pub fn with_address(
        address: NbdAddress,
        export: &str,
        contexts: &[&str],
        max_connections: usize,
        first: Option<Client>,
    ) -> ClientPool {
        let mut state = State {
            idle: Vec::new(),
            open: 0,
            limit: max_connections.max(1),
        };
        if let Some(first) = first {
            state.learn(&first);
            state.idle.push(first);
            state.open = 1;
        }
        ClientPool {
            address,
            export: export.to_owned(),
            contexts: contexts.iter().map(|c| (*c).to_owned()).collect(),
            state: Mutex::new(state),
            returned: Condvar::new(),
        }
    }

    /// Connects the first client now, so that a server that cannot be reached fails here, and
    /// keeps it in the pool: [`connect_to`](Self::connect_to) a unix socket.
    pub fn connect(
        socket: PathBuf,
        export: &str,
        contexts: &[&str],
        max_connections: usize,
    ) -> Result<ClientPool> {
        Self::connect_to(NbdAddress::Unix(socket), export, contexts, max_connections)
    }

    /// Connects the first client now, so that a server that cannot be reached fails here, and
    /// keeps it in the pool.
    pub fn connect_to(
        address: NbdAddress,
        export: &str,
        contexts: &[&str],
        max_connections: usize,
    ) -> Result<ClientPool> {
        let first = address.connect(export, contexts)?;
        Ok(ClientPool::with_address(
            address,
            export,
            contexts,
            max_connections,
            Some(first),
        ))
    }

    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// The export as an NBD URI.
    pub fn uri(&self) -> String {
        self.address.uri(&self.export)
    }

    pub fn export(&self) -> &str {
        &self.export
    }

    pub fn max_connections(&self) -> usize {
        self.lock().limit
    }

    /// Connections that exist now: idle or lent out.
    pub fn open_connections(&self) -> usize {
        self.lock().open
    }

    /// Runs `f` on a pooled client. The client goes back to the pool only if `f` succeeded; a
    /// failed one (or one whose closure panicked) is dropped and its slot freed.
    pub fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut lent = Lent {
            pool: self,
            client: Some(self.take()?),
        };
        let value = f(lent.client.as_mut().expect("a lent client"))?;
        lent.give_back();
        Ok(value)
    }

    /// Runs `f` on every idle client, one after the other (for example a flush on each connection
    /// once the writers are done: NBD promises a flush only for the writes of its own connection).
    /// Clients for which `f` failed are dropped; every client is tried, the first error returned.
    pub fn for_each_idle(&self, mut f: impl FnMut(&mut Client) -> Result<()>) -> Result<()> {
        let clients = std::mem::take(&mut self.lock().idle);
        let mut first_error = None;
        let mut lent: Vec<Lent<'_>> = clients
            .into_iter()
            .map(|client| Lent {
                pool: self,
                client: Some(client),
            })
            .collect();
        for mut one in lent.drain(..) {
            match f(one.client.as_mut().expect("a lent client")) {
                Ok(()) => one.give_back(),
                // Dropping `one` forgets the client.
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Disconnects every idle client politely (`NBD_CMD_DISC`) and returns the first error.
    /// Clients lent out at the time are not touched; the pool stays usable and would connect again.
    pub fn close_all(&self) -> Result<()> {
        let clients = {
            let mut state = self.lock();
            let clients = std::mem::take(&mut state.idle);
            state.open -= clients.len();
            clients
        };
        self.returned.notify_all();
        let mut first_error = None;
        for client in clients {
            if let Err(e) = client.close() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn take(&self) -> Result<Client> {
        let mut state = self.lock();
        loop {
            if let Some(client) = state.idle.pop() {
                return Ok(client);
            }
            if state.open < state.limit {
                state.open += 1;
                drop(state);
                let contexts: Vec<&str> = self.contexts.iter().map(String::as_str).collect();
                let client = self
                    .address
                    .connect(&self.export, &contexts)
                    .inspect_err(|_| self.forget_one())?;
                self.lock().learn(&client);
                return Ok(client);
            }
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn forget_one(&self) {
        self.lock().open -= 1;
        self.returned.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A client lent out by [`ClientPool::with_client`]: given back explicitly on success, forgotten
/// (its slot freed) when dropped otherwise, so that a failing or panicking closure cannot leak a
/// slot and leave the other workers waiting forever.
struct Lent<'a> {
    pool: &'a ClientPool,
    client: Option<Client>,
}

impl Lent<'_> {
    fn give_back(mut self) {
        if let Some(client) = self.client.take() {
            self.pool.lock().idle.push(client);
            self.pool.returned.notify_one();
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(client);
            self.pool.forget_one();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a real read-only `qemu-nbd` on a small raw image (needs `qemu-nbd` on the PATH).

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::server::{EXPORT_NAME, QemuNbdServer, ServerConfig, ServerDir};

    const SIZE: u64 = 1 << 20;

    /// A server on a 1 MiB raw image whose byte `i` is `i % 251`; stopped when dropped.
    struct Served {
        _tmp: tempfile::TempDir,
        dir: ServerDir,
        socket: PathBuf,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.dir.stop_and_remove().unwrap();
        }
    }

    fn served(connections: usize) -> Served {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.raw");
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, data).unwrap();
        let dir = ServerDir::create(tmp.path()).unwrap();
        let server =
            QemuNbdServer::start(&dir, &ServerConfig::read_only(&image, "raw", connections))
                .unwrap();
        Served {
            socket: server.socket().to_owned(),
            dir,
            _tmp: tmp,
        }
    }

    #[test]
    fn never_more_connections_than_the_maximum_and_reused_after() {
        let s = served(4);
        let pool = ClientPool::new(s.socket.clone(), EXPORT_NAME, &[], 2, None);
        let busy = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..6u64 {
                let (pool, busy, most) = (&pool, &busy, &most);
                scope.spawn(move || {
                    for i in 0..5u64 {
                        let at = (t * 5 + i) * 4096;
                        let mut buf = [0u8; 16];
                        pool.with_client(|c| {
                            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            let r = c.read_at(at, &mut buf);
                            busy.fetch_sub(1, Ordering::SeqCst);
                            r
                        })
                        .unwrap();
                        assert_eq!(buf[0], (at % 251) as u8);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(pool.open_connections(), 2);
        pool.close_all().unwrap();
        assert_eq!(pool.open_connections(), 0);
    }

    #[test]
    fn several_connections_only_where_the_server_allows_multi_conn() {
        // qemu-nbd advertises multi-conn with --shared 2 or more, not with 1.
        for (shared, expected) in [(1, 1), (4, 3)] {
            let s = served(shared);
            let first = Client::connect_unix(&s.socket, EXPORT_NAME, &[]).unwrap();
            assert_eq!(first.can_multi_conn(), shared > 1);
            let pool = ClientPool::new(s.socket.clone(), EXPORT_NAME, &[], 3, Some(first));
            assert_eq!(pool.max_connections(), expected, "--shared {shared}");
            pool.close_all().unwrap();
            // The same when the pool makes its first connection itself.
            let lazy = ClientPool::new(s.socket.clone(), EXPORT_NAME, &[], 3, None);
            assert_eq!(lazy.max_connections(), 3);
            lazy.with_client(|c| c.read_at(0, &mut [0u8; 16])).unwrap();
            assert_eq!(
                lazy.max_connections(),
                expected,
                "--shared {shared}, lazily"
            );
            lazy.close_all().unwrap();
        }
    }

    #[test]
    fn a_first_client_is_used_and_a_failed_client_is_dropped() {
        let s = served(2);
        let first = Client::connect_unix(&s.socket, EXPORT_NAME, &[]).unwrap();
        assert_eq!(first.size(), SIZE);
        let pool = ClientPool::new(s.socket.clone(), EXPORT_NAME, &[], 1, Some(first));
        assert_eq!(pool.open_connections(), 1);

        // A read past the end fails: that client is not given back.
        let mut buf = [0u8; 8];
        assert!(pool.with_client(|c| c.read_at(SIZE, &mut buf)).is_err());
        assert_eq!(pool.open_connections(), 0);

        // The only slot is free again: the next call connects a new client.
        pool.with_client(|c| c.read_at(251, &mut buf)).unwrap();
        assert_eq!(buf[0], 0);
        assert_eq!(pool.open_connections(), 1);

        // A panicking closure frees its slot too.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.with_client(|_| -> Result<()> { panic!("boom") })
        }));
        assert!(caught.is_err());
        assert_eq!(pool.open_connections(), 0);

        pool.with_client(|c| c.read_at(0, &mut buf)).unwrap();
        let mut calls = 0;
        pool.for_each_idle(|c| {
            calls += 1;
            c.read_at(8, &mut buf)
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(buf[0], 8);
        pool.close_all().unwrap();
        assert_eq!(pool.open_connections(), 0);
    }

    #[test]
    fn connect_fails_when_nothing_listens() {
        let tmp = tempfile::tempdir().unwrap();
        let err = ClientPool::connect(tmp.path().join("sock"), EXPORT_NAME, &[], 2).unwrap_err();
        assert!(err.to_string().contains("sock"), "{err}");
    }
}
