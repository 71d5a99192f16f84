//! The physical floor of one HTTP hop, for the benchmarks: a reverse proxy
//! with no logic (pooled keep-alive client, every request forwarded as is,
//! TCP_NODELAY on both sides), the "bare hop" of issue 8.

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// A pooled keep-alive HTTP/1.1 client with TCP_NODELAY.
pub fn pooled_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// Serves the bare hop on `listener`, forwarding to `upstream`
/// (`http://host:port`), until the task is dropped.
pub async fn serve(listener: TcpListener, upstream: String) {
    let client: Client<HttpConnector, Incoming> = pooled_client();
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let client = client.clone();
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            let uri = format!("{upstream}{path}").parse();
            async move {
                *request.uri_mut() = uri?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(client.request(request).await?)
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

/// Starts the bare hop on a free loopback port of this runtime.
pub async fn start(upstream: String) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, upstream));
    Ok(addr)
}
