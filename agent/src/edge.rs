//! The agent's HTTP edge: accepts client connections (HTTP/1.1 and h2c) and
//! bounds what each may hold, so that hostile or broken clients cannot
//! starve real requests or the process's file descriptors. It owns the
//! connection count and each connection's idle clock; it never looks into
//! requests (the proxy does).
//!
//! A connection's life:
//!
//! ```text
//!  accept ──▶ awaiting headers ──(headers in)──▶ serving ──(response done)──▶ idle
//!               │  header_read_timeout              ▲                          │
//!               │  or evicted                       └────(next request)────────┤
//!               ▼                                                              │
//!            closing ◀──────────── connection_idle_timeout or evicted ─────────┘
//! ```
//!
//! - From the accept to complete request headers a client has
//!   `header_read_timeout`; between requests `connection_idle_timeout`.
//!   Either way a connection with no request in flight is closed (so also
//!   one that sends nothing, half a header line, or only the HTTP/2
//!   preface).
//! - At most `max_connections` are open. A new one past the bound closes
//!   the oldest connection with no request in flight; when every one is
//!   serving, the newcomer gets `503 too_many_connections` and is closed.
//! - HTTP/2 peers are pinged, and their concurrent streams bounded.

use crate::api_error::ApiError;
use crate::config::AgentConfig;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// The edge's bounds, from the agent's configuration.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub http2_keep_alive_interval: Duration,
    pub http2_max_concurrent_streams: u32,
    /// Time open requests get at shutdown.
    pub grace: Duration,
}

impl EdgeSettings {
    pub fn of(config: &AgentConfig) -> EdgeSettings {
        EdgeSettings {
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.connection_idle_timeout_ms),
            max_connections: config.max_connections,
            http2_keep_alive_interval: Duration::from_millis(config.http2_keep_alive_interval_ms),
            http2_max_concurrent_streams: config.http2_max_concurrent_streams,
            grace: Duration::from_millis(config.shutdown_grace_ms),
        }
    }
}

/// A closing connection gets this long to finish what it is writing (an
/// HTTP/2 GOAWAY, the end of a response) before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Refusals past `max_connections` being written at once; past this, new
/// connections are closed without a word.
const MAX_REFUSING: usize = 64;

/// One open connection, as its task and the accept loop see it.
#[derive(Default)]
struct Activity {
    /// Requests whose headers are in and whose response is not done.
    requests: AtomicUsize,
    /// Set by the accept loop to make room for a newer connection; it then
    /// closes as soon as no request is in flight.
    evicted: AtomicBool,
    changed: Notify,
}

/// Why a connection with no request in flight is closed.
#[derive(Debug, Clone, Copy)]
enum Closing {
    HeaderTimeout,
    IdleTimeout,
    Evicted,
}

impl Closing {
    fn label(self) -> &'static str {
        match self {
            Closing::HeaderTimeout => "header_timeout",
            Closing::IdleTimeout => "idle_timeout",
            Closing::Evicted => "evicted",
        }
    }
}

impl Activity {
    /// Resolves once the connection has had no request in flight for
    /// `first` (no request yet) or `idle` (after one), or is evicted while
    /// it has none.
    async fn until_idle(&self, first: Duration, idle: Duration) -> Closing {
        let mut served = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.requests.load(Ordering::Acquire) > 0 {
                changed.await;
                served = true;
                continue;
            }
            if self.evicted.load(Ordering::Acquire) {
                return Closing::Evicted;
            }
            let (timeout, why) = if served {
                (idle, Closing::IdleTimeout)
            } else {
                (first, Closing::HeaderTimeout)
            };
            tokio::select! {
                _ = changed => served = true,
                _ = tokio::time::sleep(timeout) => return why,
            }
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// A request in flight on a connection, from its complete headers to the
/// end (or drop) of its response body.
struct InFlightRequest(Arc<Activity>);

impl InFlightRequest {
    fn start(activity: &Arc<Activity>) -> InFlightRequest {
        activity.requests.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_waiters();
        InFlightRequest(activity.clone())
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// The router, counting each request on its connection's [`Activity`].
#[derive(Clone)]
struct Counted {
    router: hyper_util::service::TowerToHyperService<axum::Router>,
    activity: Arc<Activity>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for Counted {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<Incoming>) -> ResponseFuture {
        let held = InFlightRequest::start(&self.activity);
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await?;
            // Held until the body has been relayed, or dropped.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _held = &held;
                    frame
                }))
            }))
        })
    }
}

/// Open connections by accept order, so the oldest idle one is found first.
#[derive(Default)]
struct Registry {
    /// No `.await` is ever held under this lock.
    open: Mutex<BTreeMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Activity>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection if there is room, making room by evicting
    /// the oldest connection with no request in flight if need be; `None`
    /// when every connection is serving a request.
    fn admit(&self, id: u64, max: usize) -> Option<Arc<Activity>> {
        let mut open = self.lock();
        // Connections already told to close are on their way out.
        let staying = open
            .values()
            .filter(|a| !a.evicted.load(Ordering::Acquire))
            .count();
        if staying >= max {
            let oldest_idle = open.values().find(|a| {
                a.requests.load(Ordering::Acquire) == 0 && !a.evicted.load(Ordering::Acquire)
            })?;
            // Counted in `allot_agent_connections_closed_total` as it closes.
            oldest_idle.evict();
        }
        let activity = Arc::new(Activity::default());
        open.insert(id, activity.clone());
        metrics::gauge!("allot_agent_connections_open").set(open.len() as f64);
        Some(activity)
    }

    fn remove(&self, id: u64) {
        let mut open = self.lock();
        open.remove(&id);
        metrics::gauge!("allot_agent_connections_open").set(open.len() as f64);
    }
}

/// Accepts connections until `shutdown`, then stops accepting and gives
/// open requests, streams included, `grace` to finish. Connections still
/// open after that are cut, and this returns only once they are gone: their
/// requests settle (at what was delivered) while the spool still runs, so
/// no usage is lost to a stop.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    settings: EdgeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.http2_keep_alive_interval)
        .keep_alive_timeout(settings.http2_keep_alive_interval)
        .max_concurrent_streams(settings.http2_max_concurrent_streams);
    let router = hyper_util::service::TowerToHyperService::new(app);
    let registry = Arc::new(Registry::default());
    let refusing = Arc::new(AtomicUsize::new(0));
    let (closing_tx, closing) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let (tcp, _) = tokio::select! {
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        next_id += 1;
        let id = next_id;
        let Some(activity) = registry.admit(id, settings.max_connections) else {
            metrics::counter!("allot_agent_connections_refused_total").increment(1);
            if refusing.load(Ordering::Acquire) < MAX_REFUSING {
                refusing.fetch_add(1, Ordering::AcqRel);
                let (refusing, max) = (refusing.clone(), settings.max_connections);
                connections.spawn(async move {
                    refuse(tcp, max).await;
                    refusing.fetch_sub(1, Ordering::AcqRel);
                });
            }
            continue;
        };
        // No Nagle: SSE chunks and small JSON answers leave at once.
        let _ = tcp.set_nodelay(true);
        let service = Counted {
            router: router.clone(),
            activity: activity.clone(),
        };
        let (registry, closing) = (registry.clone(), closing.clone());
        let (first, idle) = (settings.header_read_timeout, settings.idle_timeout);
        let (builder, tls) = (builder.clone(), tls.clone());
        connections.spawn(async move {
            // The handshake counts against the time to send headers.
            let io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
                    match tokio::time::timeout(first, accept).await {
                        Ok(Ok(stream)) => Box::new(stream),
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "client TLS handshake failed");
                            registry.remove(id);
                            return;
                        }
                        Err(_) => {
                            registry.remove(id);
                            return;
                        }
                    }
                }
            };
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            drive(connection, &activity, first, idle, closing).await;
            registry.remove(id);
        });
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "shutting down: draining open connections"
    );
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(settings.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "in-flight requests outlived the shutdown grace period: cutting them"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// A client connection's byte stream: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// One client connection, as hyper serves it.
type Connection = hyper_util::server::conn::auto::UpgradeableConnection<
    'static,
    TokioIo<Box<dyn Io>>,
    Counted,
    TokioExecutor,
>;

/// Drives one connection until it ends, closing it once it has had no
/// request in flight for its timeout, when it is evicted, or at shutdown.
async fn drive(
    connection: Connection,
    activity: &Activity,
    first: Duration,
    idle: Duration,
    mut closing: watch::Receiver<bool>,
) {
    tokio::pin!(connection);
    let (mut first, mut idle) = (first, idle);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            why = activity.until_idle(first, idle) => {
                if draining {
                    // Nothing in flight and still open: cut it.
                    return;
                }
                metrics::counter!("allot_agent_connections_closed_total", "reason" => why.label())
                    .increment(1);
            }
            _ = closing.wait_for(|closing| *closing), if !draining => {}
        }
        // Politely first (HTTP/2 GOAWAY, HTTP/1 close after the response in
        // flight), then cut once nothing is in flight for a moment.
        connection.as_mut().graceful_shutdown();
        draining = true;
        (first, idle) = (CLOSE_GRACE, CLOSE_GRACE);
    }
}

/// Answers a connection past `max_connections` with an HTTP/1.1 503 in
/// OpenAI's shape and closes it. The answer goes out once the client has
/// sent something (a client reading an answer before it asked would take
/// it for a broken connection), and what it sends is read meanwhile so
/// that the close does not reset the answer away. At most about two
/// [`CLOSE_GRACE`]s in all.
async fn refuse(mut tcp: TcpStream, max: usize) {
    let error = ApiError::too_many_connections(max);
    let body = error.body().to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_GRACE, tcp.read(&mut sink)).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_the_oldest_idle_connection_is_evicted_and_busy_ones_never_are() {
        let registry = Registry::default();
        let first = registry.admit(1, 2).unwrap();
        let second = registry.admit(2, 2).unwrap();
        let _busy = InFlightRequest::start(&first);
        // Full: the oldest idle one (the second) makes room.
        let third = registry.admit(3, 2).unwrap();
        assert!(!first.evicted.load(Ordering::Acquire));
        assert!(second.evicted.load(Ordering::Acquire));
        // Full again, and the only idle one is already going: refused.
        let _busy_third = InFlightRequest::start(&third);
        assert!(registry.admit(4, 2).is_none());
        registry.remove(2);
        assert!(registry.admit(5, 2).is_none(), "both open ones are busy");
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_with_no_request_in_flight() {
        let activity = Arc::new(Activity::default());
        let (first, idle) = (Duration::from_millis(50), Duration::from_millis(80));
        let why = tokio::time::timeout(Duration::from_secs(5), activity.until_idle(first, idle))
            .await
            .expect("closed");
        assert!(matches!(why, Closing::HeaderTimeout));

        let request = InFlightRequest::start(&activity);
        let waiting = activity.until_idle(first, idle);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(300), waiting.as_mut()).await;
        assert!(early.is_err(), "a request in flight keeps it open");
        drop(request);
        let why = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("closed once the request is done");
        assert!(matches!(why, Closing::IdleTimeout));

        activity.evict();
        let why = tokio::time::timeout(
            Duration::from_secs(5),
            activity.until_idle(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .await
        .expect("closed at once");
        assert!(matches!(why, Closing::Evicted));
    }
}
