//! allot's coordinator: it owns the authoritative budgets (in an embedded
//! redb file or in etcd), grants lease-based allowances to agents over one
//! bidirectional stream each, settles and prices their usage exactly once,
//! and serves the operators' `Admin` service, `grpc.health.v1` and server
//! reflection (v1 and v1alpha) on one gRPC port.
//!
//! With etcd, several coordinators run: one leads (etcd election, every
//! write fenced by the leader's election key), the others stand by, ready,
//! and answer `UNAVAILABLE` to sessions and admin calls so that clients move
//! to the leader.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! start the real server on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod certs;
pub mod config;
pub mod election;
pub mod engine;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod grant;
pub mod identity;
pub mod lease;
pub mod ledger;
pub mod operators;
pub mod placement;
pub mod session;
pub mod settle;
pub mod standby;
pub mod store;
pub mod tls;
pub mod usage;
pub mod wire;

use crate::config::{CoordinatorConfig, StoreKind};
use crate::engine::{Engine, EngineHandle, EngineSettings, EngineSource};
use crate::store::Store;
use allot::pb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

pub fn engine_settings(config: &CoordinatorConfig) -> EngineSettings {
    EngineSettings {
        lease_ttl: config.lease_ttl(),
        dead_after: Duration::from_millis(config.dead_after_ms),
        settle_window: Duration::from_millis(config.settle_window_ms),
        max_batch: config.max_batch_jobs,
        ledger: ledger::LedgerConfig {
            audit: config.audit_retention(),
            ..ledger::LedgerConfig::default()
        },
        ..EngineSettings::default()
    }
}

/// Connects to the configured etcd cluster.
pub async fn connect_etcd(config: &CoordinatorConfig) -> anyhow::Result<etcd_client::Client> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(ca) = &config.etcd_ca {
        let read = |field: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("{field}: cannot read {}: {e}", path.display()))
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("etcd_ca", ca)?));
        if let (Some(cert), Some(key)) = (&config.etcd_cert, &config.etcd_key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("etcd_cert", cert)?,
                read("etcd_key", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(password)) = (&config.etcd_user, &config.etcd_password) {
        options = options.with_user(user.clone(), password.clone());
    }
    Ok(etcd_client::Client::connect(&config.etcd_endpoints, Some(options)).await?)
}

/// Serves the coordinator on `listener` until `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // Unreadable certificates stop the start, before any store is opened.
    if let Some(files) = config.server_tls_files() {
        tls::server_config(&files)?;
    }
    match config.store {
        StoreKind::Embedded => {
            let store = Arc::new(store::embedded::EmbeddedStore::open(&config.data_path)?);
            run_with_store(config, store, listener, shutdown).await
        }
        StoreKind::Etcd => run_etcd(config, listener, shutdown).await,
    }
}

/// One coordinator on a store the caller opened (no election).
pub async fn run_with_store(
    config: CoordinatorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let analytics = Analytics::open(&config).await?;
    let live = live_placement(&config)?;
    let mut settings = engine_settings(&config);
    settings.analytics = analytics.as_ref().map(|a| a.rows.clone());
    settings.placement = Some(live.clone());
    let (engine, handle) = Engine::load(store.clone(), settings).await?;
    let (usage, writer) = match analytics {
        Some(a) => (Some(a.store), Some(a.writer)),
        None => (None, None),
    };
    let (source, _keep) = EngineSource::fixed(handle);
    let mut tasks = tokio::task::JoinSet::new();
    let (fatal_tx, fatal) = watch::channel(None);
    tasks.spawn(async move {
        if let Err(reason) = supervise_engine(engine.run()).await {
            fatal_tx.send_replace(Some(reason.to_string()));
        }
    });
    let ready = watch::channel(true).1;
    let (closing, _) = watch::channel(false);
    let served = serve(
        config, source, store, ready, fatal, usage, live, tasks, listener, shutdown, closing,
    )
    .await;
    drain_writer(writer).await;
    served
}

/// The engine's task panicked, with this message.
#[derive(Debug, thiserror::Error)]
#[error("the engine panicked: {0}")]
pub struct EnginePanicked(String);

/// Runs the engine in a task of its own and waits for it: `Err` with the
/// panic's message when it died. A panicked engine may have left the
/// ledger half-changed, so nothing restarts it in place: the coordinator
/// turns NOT_SERVING and exits non-zero (a supervisor restarts it, and
/// with etcd another coordinator leads meanwhile).
async fn supervise_engine(
    run: impl Future<Output = ()> + Send + 'static,
) -> Result<(), EnginePanicked> {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = tokio::spawn(run);
    let _abort = AbortOnDrop(task.abort_handle());
    match task.await {
        Ok(()) => Ok(()),
        Err(error) if error.is_panic() => {
            let panic = error.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            metrics::counter!("allot_engine_panics_total").increment(1);
            tracing::error!(
                panic = message,
                "the engine panicked; the coordinator stops serving and exits"
            );
            Err(EnginePanicked(message))
        }
        Err(_) => Ok(()),
    }
}

/// The engine is gone with its sender: the writer drains what it holds.
async fn drain_writer(writer: Option<tokio::task::JoinHandle<()>>) {
    if let Some(writer) = writer {
        if tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .is_err()
        {
            tracing::error!("the usage writer did not drain within 10 s");
        }
    }
}

/// The usage analytics store and its writer, fed through `rows`.
struct Analytics {
    store: Arc<dyn usage::UsageStore>,
    rows: tokio::sync::mpsc::UnboundedSender<Vec<pb::UsageRow>>,
    writer: tokio::task::JoinHandle<()>,
}

impl Analytics {
    /// PostgreSQL when configured, else the embedded file beside the
    /// embedded budget store; none with etcd and no PostgreSQL.
    async fn open(config: &CoordinatorConfig) -> anyhow::Result<Option<Analytics>> {
        let store: Arc<dyn usage::UsageStore> = match &config.usage_postgres_url {
            // Lazy: a database that is down delays analytics, not budgets.
            Some(url) => Arc::new(usage::PostgresUsageStore::new(url).map_err(anyhow::Error::msg)?),
            None if config.store == StoreKind::Embedded => {
                Arc::new(open_usage_store(config).await?)
            }
            None => return Ok(None),
        };
        let spill = usage::Spill::open(&config.usage_spill_path()).map_err(anyhow::Error::msg)?;
        let (rows, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(usage::run_writer(
            store.clone(),
            rx,
            spill,
            config.usage_retention(),
        ));
        Ok(Some(Analytics {
            store,
            rows,
            writer,
        }))
    }
}

/// Opens the embedded usage store, waiting (at most 10 s) for a previous
/// coordinator in this process whose writer is still draining into it.
async fn open_usage_store(config: &CoordinatorConfig) -> anyhow::Result<usage::EmbeddedUsageStore> {
    let path = config.usage_path();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match usage::EmbeddedUsageStore::open(&path) {
            Ok(store) => return Ok(store),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("usage store: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Several coordinators on etcd: campaign, lead while the lease lives,
/// stand by otherwise.
async fn run_etcd(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = connect_etcd(&config).await?;
    let (source_tx, source_rx) = watch::channel::<Option<EngineHandle>>(None);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (fatal_tx, fatal) = watch::channel(None);
    let analytics = Analytics::open(&config).await?;
    let live = live_placement(&config)?;
    let tasks = tokio::task::JoinSet::new();
    let (closing, _) = watch::channel(false);
    // Not in `tasks`: at shutdown it must finish resigning, not be aborted.
    let mut leading = tokio::spawn(lead_when_elected(
        config.clone(),
        client.clone(),
        source_tx,
        ready_tx,
        fatal_tx,
        analytics.as_ref().map(|a| a.rows.clone()),
        live.clone(),
        closing.subscribe(),
    ));
    let (usage, writer) = match analytics {
        Some(a) => (Some(a.store), Some(a.writer)),
        None => (None, None),
    };
    let probe: Arc<dyn Store> = Arc::new(store::etcd::EtcdStore::new(
        client,
        &config.etcd_prefix,
        None,
    ));
    let served = serve(
        config,
        EngineSource(source_rx),
        probe,
        ready_rx,
        fatal,
        usage,
        live,
        tasks,
        listener,
        shutdown,
        closing,
    )
    .await;
    // The leadership loop saw the shutdown as it began and resigns (its
    // etcd calls are bounded); a cut one leaves the lease to its TTL.
    if tokio::time::timeout(Duration::from_secs(5), &mut leading)
        .await
        .is_err()
    {
        tracing::warn!("the leadership was not given up within 5 s");
        leading.abort();
    }
    drain_writer(writer).await;
    served
}

/// Placement's live state, with the operator's catalog if one is set. It
/// outlives leadership changes: agents' reports keep it current.
fn live_placement(config: &CoordinatorConfig) -> anyhow::Result<Arc<placement::LivePlacement>> {
    let catalog = match &config.placement_catalog {
        Some(path) => placement::load_catalog(path)?,
        None => placement::Catalog::new(),
    };
    Ok(placement::LivePlacement::new(
        catalog,
        config.placement.clone(),
    ))
}

/// The leadership loop: campaign, load, lead until the lease is lost,
/// step down, campaign again. At shutdown (`closing`) it stops campaigning
/// and resigns, so that a standby takes over at once rather than after
/// `election_ttl_ms`.
#[allow(clippy::too_many_arguments)]
async fn lead_when_elected(
    config: CoordinatorConfig,
    client: etcd_client::Client,
    source: watch::Sender<Option<EngineHandle>>,
    ready: watch::Sender<bool>,
    fatal: watch::Sender<Option<String>>,
    analytics: Option<tokio::sync::mpsc::UnboundedSender<Vec<pb::UsageRow>>>,
    live: Arc<placement::LivePlacement>,
    closing: watch::Receiver<bool>,
) {
    let ttl = Duration::from_millis(config.election_ttl_ms);
    let mut failures = 0u32;
    let closed = until_closing(closing);
    tokio::pin!(closed);
    let follow = || {
        standby::Standby::spawn(
            store::etcd::EtcdStore::new(client.clone(), &config.etcd_prefix, None),
            engine_settings(&config).ledger,
        )
    };
    // While another coordinator leads, this one keeps a warm ledger.
    let mut standby = Some(follow());
    loop {
        ready.send_replace(true);
        let campaign = election::campaign(&client, &config.etcd_prefix, &config.node_id, ttl);
        let campaigned = tokio::select! {
            campaigned = campaign => campaigned,
            _ = &mut closed => break,
        };
        let mut leadership = match campaigned {
            Ok(leadership) => leadership,
            Err(error) => {
                ready.send_replace(false);
                failures += 1;
                tracing::warn!(%error, "campaign failed; retrying");
                let backoff = Duration::from_millis(200 * u64::from(failures.min(10)));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = &mut closed => break,
                }
            }
        };
        let etcd_store = store::etcd::EtcdStore::new(
            client.clone(),
            &config.etcd_prefix,
            Some(leadership.fence.clone()),
        );
        let mut settings = engine_settings(&config);
        settings.analytics = analytics.clone();
        settings.placement = Some(live.clone());
        let took_over = std::time::Instant::now();
        let warm = tokio::select! {
            warm = take_warm_ledger(standby.take(), &etcd_store) => warm,
            _ = &mut closed => {
                leadership.resign().await;
                break;
            }
        };
        let store: Arc<dyn Store> = Arc::new(etcd_store);
        let loaded = match warm {
            Some(ledger) => {
                metrics::counter!("allot_takeovers_total", "ledger" => "warm").increment(1);
                Ok(Engine::start(store, settings, ledger))
            }
            None => {
                metrics::counter!("allot_takeovers_total", "ledger" => "loaded").increment(1);
                tokio::select! {
                    loaded = Engine::load(store, settings) => loaded,
                    _ = &mut closed => {
                        leadership.resign().await;
                        break;
                    }
                }
            }
        };
        metrics::histogram!("allot_takeover_seconds").record(took_over.elapsed().as_secs_f64());
        let (engine, handle) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(%error, "cannot load the ledger as the new leader; resigning");
                standby = Some(follow());
                leadership.resign().await;
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
                continue;
            }
        };
        failures = 0;
        tracing::info!(
            node_id = config.node_id,
            seconds = took_over.elapsed().as_secs_f64(),
            "elected leader"
        );
        metrics::counter!("allot_leader_changes_total").increment(1);
        metrics::gauge!("allot_is_leader").set(1.0);
        source.send_replace(Some(handle));
        // Boxed so that it can be dropped (the engine aborted) before the
        // resign.
        let mut engine_task = Box::pin(supervise_engine(engine.run()));
        let compaction = Duration::from_millis(config.etcd_history_ms);
        let compactor = async {
            if compaction.is_zero() {
                return std::future::pending().await;
            }
            store::etcd::compact_history(client.clone(), config.etcd_prefix.clone(), compaction)
                .await
        };
        let (stopping, died) = tokio::select! {
            never = compactor => match never {},
            _ = leadership.wait_lost() => {
                tracing::warn!("leadership lost");
                (false, None)
            }
            outcome = &mut engine_task => {
                tracing::warn!("the engine stopped");
                (false, outcome.err())
            }
            _ = &mut closed => {
                tracing::info!(node_id = config.node_id, "shutting down: resigning the leadership");
                (true, None)
            }
        };
        source.send_replace(None);
        metrics::gauge!("allot_is_leader").set(0.0);
        // A commit cut here is "maybe applied": agents resend what was not
        // acknowledged, and the next leader's fenced writes decide.
        drop(engine_task);
        leadership.resign().await;
        if let Some(reason) = died {
            // Resigned first, so that another coordinator leads at once.
            fatal.send_replace(Some(reason.to_string()));
            break;
        }
        if stopping {
            break;
        }
        // Standing by again: the ledger this coordinator led with may hold
        // writes that were never committed, so it follows from a fresh load.
        standby = Some(follow());
    }
    ready.send_replace(false);
}

/// How long a new leader waits for its standby ledger to catch up before
/// it loads instead.
const WARM_CATCH_UP: Duration = Duration::from_secs(5);

/// The standby's ledger caught up to the store as the new leader sees it
/// (after replaying any journal the last leader left), or `None`: the
/// caller loads.
async fn take_warm_ledger(
    standby: Option<standby::Standby>,
    store: &store::etcd::EtcdStore,
) -> Option<ledger::Ledger> {
    let standby = standby?;
    let revision = match store.prepare_to_lead().await {
        Ok(revision) => revision,
        Err(error) => {
            tracing::warn!(%error, "cannot read the store's revision; loading the ledger instead");
            return None;
        }
    };
    let ledger = standby.take(revision, WARM_CATCH_UP).await;
    if ledger.is_none() {
        tracing::warn!(revision, "the standby ledger is not warm; loading instead");
    }
    ledger
}

/// Resolves once `closing` is `true`; never if its sender is gone without
/// a shutdown.
async fn until_closing(mut closing: watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: CoordinatorConfig,
    source: EngineSource,
    store: Arc<dyn Store>,
    ready: watch::Receiver<bool>,
    fatal: watch::Receiver<Option<String>>,
    usage: Option<Arc<dyn usage::UsageStore>>,
    live: Arc<placement::LivePlacement>,
    mut tasks: tokio::task::JoinSet<()>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    closing: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let credentials = config.operator_sources().load()?;
    let (credentials_tx, credentials_rx) = watch::channel(Arc::new(credentials));
    tasks.spawn(operators::reload_credentials(
        config.operator_sources(),
        Duration::from_millis(config.operators_reload_ms),
        credentials_tx,
    ));
    let gatekeeper = operators::Gatekeeper::new(
        credentials_rx,
        Arc::new(operators::AuthThrottle::new(
            config.auth_max_failures,
            Duration::from_millis(config.auth_failure_window_ms),
        )),
    );
    let admin = operators::OperatorGate::new(
        pb::admin_server::AdminServer::new(admin::AdminService::new(source.clone(), usage)),
        gatekeeper.clone(),
    );
    let controller = live.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            controller.tick(allot::clock::now_ms());
        }
    });
    let placement_service = operators::OperatorGate::new(
        pb::placement_server::PlacementServer::new(placement::PlacementService::new(live.clone())),
        gatekeeper,
    );
    let server_tls = match config.server_tls_files() {
        Some(files) => {
            let tls = tls::ReloadingServerConfig::load(files)?;
            tasks.spawn(tls.clone().watch(config.tls_reload_poll()));
            Some(tls)
        }
        None => None,
    };
    let sessions = pb::agent_session_server::AgentSessionServer::new(
        session::SessionService::new(source.clone(), live)
            .with_shutdown(closing.subscribe())
            .with_peer_identity(server_tls.is_some()),
    )
    .max_decoding_message_size(wire::MAX_MESSAGE_BYTES);
    tasks.spawn(report_health(
        health.clone(),
        store,
        ready,
        fatal.clone(),
        closing.subscribe(),
    ));
    // A signal or a dead engine stops the server: NOT_SERVING first (load
    // balancers and health watchers stop sending here during the drain),
    // then no more calls.
    let mut died = fatal.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = async { died.wait_for(Option::is_some).await.is_ok() } => {}
        }
        for service in SERVICES {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    };
    tracing::info!(listen = %listener.local_addr()?, store = ?config.store, node_id = config.node_id, tls = server_tls.is_some(), "coordinator serving");
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(placement_service)
        .add_service(sessions);
    let stopped = until_closing(closing.subscribe());
    // One type for both listeners: boxed.
    let mut server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match server_tls {
        Some(tls) => {
            Box::pin(router.serve_with_incoming_shutdown(tls::incoming(listener, tls), stopped))
        }
        None => {
            Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped))
        }
    };
    tokio::pin!(shutdown);
    // At the signal, every agent session ends (the agents move to another
    // coordinator), the leadership is given up, and the server stops
    // accepting and waits for open calls: at most `shutdown_grace_ms`.
    let served = tokio::select! {
        served = &mut server => served,
        _ = &mut shutdown => {
            tracing::info!("shutting down: ending agent sessions");
            closing.send_replace(true);
            let grace = Duration::from_millis(config.shutdown_grace_ms);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!("calls outlived the shutdown grace period: cutting them");
                    Ok(())
                }
            }
        }
    };
    closing.send_replace(true);
    drop(source);
    // The engine (embedded store), health and placement ticks; with etcd
    // the leadership loop is not among them: it resigns on `closing`.
    tasks.shutdown().await;
    served?;
    let died = fatal.borrow().clone();
    if let Some(reason) = died {
        anyhow::bail!("{reason}");
    }
    Ok(())
}

const SERVICES: [&str; 4] = [
    "",
    "allot.v1.Admin",
    "allot.v1.AgentSession",
    "allot.v1.Placement",
];

/// SERVING only while the store answers and this coordinator is leader or
/// a standby able to take over.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    store: Arc<dyn Store>,
    ready: watch::Receiver<bool>,
    fatal: watch::Receiver<Option<String>>,
    closing: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let able = *ready.borrow() && fatal.borrow().is_none() && !*closing.borrow();
        let status = if able && store.ping().await {
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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
