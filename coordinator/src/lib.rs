//! allot's coordinator: it owns the authoritative budgets (in an embedded
//! redb file or in etcd), grants lease-based allowances to agents over one
//! bidirectional stream each, settles and prices their usage exactly once,
//! and serves the operators' `Admin` service, `grpc.health.v1` and server
//! reflection (v1 and v1alpha) on one gRPC port.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! start the real server on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod engine;
pub mod error;
pub mod ledger;
pub mod session;
pub mod store;

use crate::config::{CoordinatorConfig, StoreKind};
use crate::engine::{Engine, EngineSettings};
use crate::store::Store;
use allot::pb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

/// Opens the store the configuration names.
pub fn open_store(config: &CoordinatorConfig) -> anyhow::Result<Arc<dyn Store>> {
    match config.store {
        StoreKind::Embedded => Ok(Arc::new(store::embedded::EmbeddedStore::open(
            &config.data_path,
        )?)),
        StoreKind::Etcd => anyhow::bail!("store = etcd is not available in this build yet"),
    }
}

pub fn engine_settings(config: &CoordinatorConfig) -> EngineSettings {
    EngineSettings {
        lease_ttl: config.lease_ttl(),
        dead_after: Duration::from_millis(config.dead_after_ms),
        settle_window: Duration::from_millis(config.settle_window_ms),
        ..EngineSettings::default()
    }
}

/// Serves the coordinator on `listener` until `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let store = open_store(&config)?;
    run_with_store(config, store, listener, shutdown).await
}

/// [`run`] with a store the caller opened.
pub async fn run_with_store(
    config: CoordinatorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (engine, handle) = Engine::load(store.clone(), engine_settings(&config)).await?;
    // Background tasks live in this set: dropping `run` (a crash in tests)
    // aborts them and releases the store.
    let mut tasks = tokio::task::JoinSet::new();
    let engine_task = tasks.spawn(engine.run());

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let admin = pb::admin_server::AdminServer::with_interceptor(
        admin::AdminService::new(handle.clone()),
        admin::AdminAuth::new(config.admin_token.clone()),
    );
    let sessions = pb::agent_session_server::AgentSessionServer::new(session::SessionService::new(
        handle.clone(),
    ))
    .max_decoding_message_size(64 * 1024 * 1024);

    let health_task = tasks.spawn(report_health(health, store));
    tracing::info!(listen = %listener.local_addr()?, store = ?config.store, "coordinator serving");
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(sessions)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    drop(handle);
    let _ = engine_task;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    served?;
    Ok(())
}

const SERVICES: [&str; 3] = ["", "allot.v1.Admin", "allot.v1.AgentSession"];

/// SERVING only while the store answers.
async fn report_health(reporter: tonic_health::server::HealthReporter, store: Arc<dyn Store>) {
    let mut last = None;
    loop {
        let status = if store.ping().await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for service in SERVICES {
                reporter.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
