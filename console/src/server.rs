//! Listening: the socket, TLS (rustls, ring), one HTTP/1.1 connection per accepted socket, and
//! the runtime they run on. Bound before [`Console::start`] returns, so that an address in use
//! is the daemon's error at start, not a log line later.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backflow_pipeline::LivePipelines;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::{ConsoleError, Control, HttpOptions};

/// The running console. Dropping it (or [`Console::stop`]) stops listening and closes the
/// connections.
pub struct Console {
    addr: SocketAddr,
    tls: bool,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Console {
    /// Checks `options`, binds the address and serves the console on a runtime of its own.
    pub fn start(
        options: HttpOptions,
        control: Arc<dyn Control>,
        live: Arc<LivePipelines>,
    ) -> Result<Console, ConsoleError> {
        let tokens = options.check()?;
        let tls = match &options.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let listener =
            std::net::TcpListener::bind(options.listen).map_err(|source| ConsoleError::Io {
                what: format!("--http {}: cannot listen", options.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ConsoleError::Io {
            what: "the console's address".into(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ConsoleError::Io {
                what: "the console's socket".into(),
                source,
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .thread_name("console")
            .enable_all()
            .build()
            .map_err(|source| ConsoleError::Io {
                what: "the console's runtime".into(),
                source,
            })?;
        let state = crate::api::AppState::new(options, tokens, control, live, tls.is_some());
        let router = crate::api::router(state);
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let is_tls = tls.is_some();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "The console cannot listen.");
                            return;
                        }
                    };
                    loop {
                        let (socket, peer) = tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => match accepted {
                                Ok(a) => a,
                                Err(e) => {
                                    tracing::warn!(error = %e, "The console could not accept a connection.");
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            },
                        };
                        let _ = socket.set_nodelay(true);
                        let service = TowerToHyperService::new(
                            router.clone().layer(axum::Extension(crate::auth::Peer(peer))),
                        );
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let builder =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let served = match tls {
                                Some(acceptor) => match acceptor.accept(socket).await {
                                    Ok(stream) => builder
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await
                                        .map_err(|e| e.to_string()),
                                    Err(e) => Err(format!("TLS handshake: {e}")),
                                },
                                None => builder
                                    .serve_connection(TokioIo::new(socket), service)
                                    .await
                                    .map_err(|e| e.to_string()),
                            };
                            if let Err(e) = served {
                                tracing::debug!(%peer, error = %e, "A console connection ended.");
                            }
                        });
                    }
                });
                // Open connections (event streams) end with the runtime.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|source| ConsoleError::Io {
                what: "the console's thread".into(),
                source,
            })?;
        Ok(Console {
            addr,
            tls: is_tls,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stops listening and closes the connections.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The TLS side: the certificate chain and key from PEM files.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ConsoleError> {
    let bad = |path: &Path, what: &str, e: &dyn std::fmt::Display| {
        ConsoleError::Config(format!("{}: {what}: {e}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, "cannot read the certificate (PEM)", &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, "not a PEM certificate chain", &e))?;
    if chain.is_empty() {
        return Err(bad(
            cert,
            "no certificate",
            &"expected a PEM CERTIFICATE block",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(key, "cannot read the private key (PEM)", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConsoleError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            bad(
                cert,
                "the certificate and key do not make a server identity",
                &e,
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
