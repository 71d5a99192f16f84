//! TLS of the coordinator's gRPC port (rustls, ring): the server
//! certificate, the CA client certificates are verified against, and their
//! reload from disk without a restart.
//!
//! Client certificates are optional at the handshake, so that operators can
//! call Admin with the token alone; a certificate that is presented must
//! chain to `tls_client_ca` and be valid now, or the handshake fails.
//! `AgentSession` then insists on one naming the agent
//! ([`crate::identity`]).
//!
//! Reload: every new connection is accepted with the configuration current
//! at that moment; files are read again on SIGHUP and whenever their
//! modification time or size changes (polled every `tls_reload_ms`). A
//! reload that fails keeps the previous configuration and logs why.
//! Established connections keep the certificate they were made with.

pub use allot_runtime::pem::{provider, read_certs, read_key, read_roots, TlsError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; the accept loop waits past it.
const MAX_HANDSHAKES: usize = 256;

/// The files the server's TLS configuration is read from.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Builds the server configuration from the files.
pub fn server_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let certs = read_certs("tls_cert", &files.cert)?;
    let key = read_key("tls_key", &files.key)?;
    let roots = read_roots("tls_client_ca", &files.client_ca)?;
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|source| TlsError::Verifier {
        field: "tls_client_ca",
        source,
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            field: "tls",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::KeyMismatch {
            key: "tls_key",
            cert: "tls_cert",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The server configuration new connections are accepted with, reloaded
/// from its files.
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// What the files looked like at the last (attempted) load.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ReloadingServerConfig {
    /// Loads the files once; an error names the field.
    pub fn load(files: ServerTlsFiles) -> Result<Arc<ReloadingServerConfig>, TlsError> {
        let stamp = stamp(&files);
        let config = server_config(&files)?;
        Ok(Arc::new(ReloadingServerConfig {
            files,
            current: RwLock::new(Arc::new(config)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // Never held across an await: a poisoned lock still holds a
        // complete configuration.
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the files again and, if they make a valid configuration, uses
    /// it for new connections.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&self.files);
        let config = Arc::new(server_config(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// Whether a file changed since the last load.
    fn changed(&self) -> bool {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) != stamp(&self.files)
    }

    /// Reloads on SIGHUP and, with `poll`, whenever the files change. The
    /// SIGHUP handler is installed at the call, before the future runs: a
    /// SIGHUP after `watch` returns never takes the default action (exit).
    pub fn watch(
        self: Arc<Self>,
        poll: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send {
        #[cfg(unix)]
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(
                |error| tracing::warn!(%error, "no SIGHUP reload: cannot install the handler"),
            )
            .ok();
        #[cfg(unix)]
        return self.reload_loop(poll, hangup);
        #[cfg(not(unix))]
        self.reload_loop(poll)
    }

    async fn reload_loop(
        self: Arc<Self>,
        poll: Option<Duration>,
        #[cfg(unix)] mut hangup: Option<tokio::signal::unix::Signal>,
    ) {
        let mut tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<Option<()>>();
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = signalled => true,
            };
            if !forced && (poll.is_none() || !self.changed()) {
                continue;
            }
            match self.reload() {
                Ok(()) => {
                    metrics::counter!("allot_tls_reloads_total", "outcome" => "ok").increment(1);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                }
                Err(error) => {
                    metrics::counter!("allot_tls_reloads_total", "outcome" => "error").increment(1);
                    tracing::error!(%error, "TLS reload failed; the previous certificates stay in use");
                }
            }
        }
    }
}

fn stamp(files: &ServerTlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.cert, &files.key, &files.client_ca]
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// TLS connections accepted on `listener`, each handshake in a task of its
/// own (a slow client never holds up the next), with the configuration
/// current at the accept. Failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        metrics::counter!("allot_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("allot_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
