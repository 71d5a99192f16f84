//! allot's agent: a sidecar beside one inference node ("neuron"). Clients
//! send it OpenAI-style requests; it authenticates them by key hash, admits
//! each one locally against the allowance the coordinator leased to it
//! (reserve before dispatch, settle after), refuses over-cap requests with
//! 429 before the neuron sees them, forwards the rest, and streams usage back
//! to the coordinator over one bidirectional gRPC stream, spooled on disk
//! until acknowledged.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! start the real agent on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod allowance;
pub mod api_error;
pub mod config;
pub mod edge;
pub mod family;
pub mod keys;
pub mod link;
pub mod neuron;
pub mod overhead;
pub mod path;
pub mod proxy;
pub mod refusals;
pub mod spool;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod usage;

use crate::allowance::AllowanceTable;
use crate::config::{AgentConfig, NeuronAdapterKind};
use crate::keys::KeyCache;
use crate::link::{CoordinatorLink, LinkContext, LinkSettings};
use allot::pb;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// What every request handler shares, by concern.
pub struct AgentState {
    pub config: AgentConfig,
    /// The `pass_through` allow-list, parsed.
    pub pass_through: Vec<config::PassThroughRule>,
    pub coordinator: Coordinator,
    pub neuron: Neuron,
    pub records: Records,
}

/// What the coordinator leases to this agent (keys and allowance slices)
/// and the link they come over.
pub struct Coordinator {
    pub link: Arc<CoordinatorLink>,
    pub keys: Arc<KeyCache>,
    pub table: Arc<AllowanceTable>,
}

/// The inference node this agent fronts: how to reach it, how busy it is
/// and what it was seen to bill.
pub struct Neuron {
    pub client: upstream::HttpClient,
    pub upstreams: upstream::Upstreams,
    pub in_flight: Arc<path::concurrency::InFlight>,
    /// Requests in flight and last use per model, for node reports: only
    /// kept when a neuron adapter reports them.
    pub models: Option<Arc<neuron::ModelActivity>>,
    /// Prompt overheads learned from the neuron, per model.
    pub overheads: Arc<overhead::LearnedOverheads>,
}

/// Where what the agent served and refused is recorded.
pub struct Records {
    /// Settled usage records, to the spool.
    pub usage: mpsc::UnboundedSender<pb::UsageRecord>,
    pub epoch: u64,
    /// How many refusals per key and minute are still recorded.
    pub refusals: refusals::RefusalRecords,
    /// The spool's durable mark: a response ends only once its record is
    /// on disk, and admission stops while the spool cannot write.
    pub durability: Arc<spool::Durability>,
}

/// The neuron client: `http://` and `https://` (system roots and
/// `upstream_ca`) upstreams.
pub(crate) fn http_client(config: &AgentConfig) -> Result<upstream::HttpClient, tls::TlsError> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(
        config.upstream_connect_timeout_ms,
    )));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let tls = tls::upstream_client_config(config.upstream_ca.as_deref())?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .http2_only(config.upstream_http2)
            .build(connector),
    )
}

/// Serves the agent on `listener` until `shutdown` completes, then lets
/// in-flight requests finish (within the grace period), spools their usage
/// and gives the coordinator a moment to acknowledge it.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // Unreadable TLS files stop the start, naming the field.
    if let Some(files) = config.coordinator_tls() {
        tls::coordinator_tls(&files)?;
    }
    let client = http_client(&config)?;
    let listener_tls = match (&config.listen_tls_cert, &config.listen_tls_key) {
        (Some(cert), Some(key)) => Some(tls::listener_config(cert, key)?),
        _ => None,
    };
    let (spool, recovered) = spool::Spool::open(&config.spool_dir, config.spool_max_records)?;
    let durability = spool.durability();
    let table = Arc::new(AllowanceTable::new(recovered.last_seq));
    for record in recovered.pending.values() {
        table.recover(record.seq, &record.key_id, recorded_usage(record));
    }
    let link = Arc::new(CoordinatorLink::default());
    let keys = Arc::new(KeyCache::new(config.unknown_key_cache_max));
    let overheads = Arc::new(overhead::LearnedOverheads::open(&config.spool_dir));
    let (usage_tx, usage_rx) = mpsc::unbounded_channel();
    let (spool_events_tx, spool_events_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (directives_tx, directives_rx) = mpsc::unbounded_channel();

    // Every background task lives in this set: dropping `run` (a crash in
    // tests) aborts them all.
    let mut tasks = tokio::task::JoinSet::new();
    let spool_depth = spool.depth();
    // The spool writes and fsyncs: on its own thread, so a slow disk never
    // stalls a request worker.
    let (resend, flush) = (
        Duration::from_millis(config.usage_resend_ms),
        Duration::from_millis(config.usage_flush_ms),
    );
    // The spool stops before the link, so that its last records go out on
    // the session the link then closes.
    let (spool_stop_tx, spool_stop) = watch::channel(false);
    let (spool_done_tx, spool_done_rx) = tokio::sync::oneshot::channel::<()>();
    let spool_durability = durability.clone();
    tasks.spawn_blocking(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => {
                runtime.block_on(spool.run(usage_rx, spool_events_rx, resend, flush, spool_stop))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the spool's runtime");
                spool_durability.set_failing(format!("cannot start the spool's runtime: {e}"));
            }
        }
        let _ = spool_done_tx.send(());
    });
    tasks.spawn(link::run(
        LinkContext {
            link: link.clone(),
            table: table.clone(),
            keys: keys.clone(),
            spool: spool_events_tx,
            directives: directives_tx,
            overheads: overheads.clone(),
            settings: LinkSettings {
                agent_id: config.agent_id.clone(),
                neuron_id: config.neuron_id.clone(),
                epoch: recovered.epoch,
                endpoints: config.coordinators.clone(),
                lease_margin: Duration::from_millis(config.lease_margin_ms),
                connect_timeout: Duration::from_millis(config.coordinator_connect_timeout_ms),
                spool_dir: config.spool_dir.clone(),
                tls: config.coordinator_tls(),
            },
        },
        stop_rx.clone(),
    ));
    tasks.spawn(housekeeping(
        table.clone(),
        link.clone(),
        Duration::from_millis(config.idle_return_ms),
        stop_rx.clone(),
    ));

    let state = Arc::new(AgentState {
        pass_through: config.pass_through_rules(),
        coordinator: Coordinator { link, keys, table },
        neuron: Neuron {
            client,
            upstreams: upstream::Upstreams::new(&config),
            in_flight: path::concurrency::InFlight::new(
                config.max_concurrent_requests,
                config.max_concurrent_per_key,
            ),
            models: (config.neuron_adapter != NeuronAdapterKind::None).then(Arc::default),
            overheads,
        },
        records: Records {
            usage: usage_tx,
            epoch: recovered.epoch,
            refusals: refusals::RefusalRecords::new(config.refusal_records_per_key_per_minute),
            durability,
        },
        config: config.clone(),
    });
    {
        let state = state.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            upstream::detect_family(&state.neuron.upstreams, &state.neuron.client, stop).await;
        });
    }
    match config.neuron_adapter {
        // Directives are refused: their receiver is gone.
        NeuronAdapterKind::None => drop(directives_rx),
        NeuronAdapterKind::Fake => {
            let adapter = neuron::FakeAdapter::new(
                &state.neuron.upstreams.default_url(),
                state.neuron.client.clone(),
            );
            tasks.spawn(neuron::report_loop(
                adapter,
                state.clone(),
                directives_rx,
                stop_rx.clone(),
            ));
        }
        NeuronAdapterKind::Ollama => {
            let adapter = neuron::OllamaAdapter::new(
                &state.neuron.upstreams.default_url(),
                state.neuron.client.clone(),
                config.gpu_vram_bytes.clone(),
            );
            tasks.spawn(neuron::report_loop(
                adapter,
                state.clone(),
                directives_rx,
                stop_rx.clone(),
            ));
        }
    }
    tracing::info!(listen = %listener.local_addr()?, agent_id = config.agent_id, epoch = recovered.epoch, "agent serving");
    let app = proxy::router(state.clone());
    edge::serve(
        listener,
        listener_tls,
        app,
        edge::EdgeSettings::of(&config),
        shutdown,
    )
    .await;
    // Give every slice back, then let the coordinator acknowledge what is
    // spooled, briefly.
    for key_id in state
        .coordinator
        .table
        .idle_keys(Duration::ZERO, Instant::now())
    {
        link::give_back_with(&state.coordinator.link, &state.coordinator.table, &key_id);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && state.coordinator.link.is_connected()
        && spool_depth.load(std::sync::atomic::Ordering::Relaxed) > 0
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stop the spool, then close the session: the give-backs and the last
    // usage reach the coordinator before the end of the stream does; wait
    // (briefly) for the coordinator to end its side.
    let _ = spool_stop_tx.send(true);
    let mut connected = state.coordinator.link.subscribe_connected();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // The spool drops its sender of the session as it ends.
        let _ = spool_done_rx.await;
        state.coordinator.link.close();
        let _ = connected.wait_for(|up| !*up).await;
    })
    .await;
    let _ = stop_tx.send(true);
    drop(state);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The usage a spooled record charges, as the agent counted it when it
/// settled the request.
fn recorded_usage(record: &pb::UsageRecord) -> allot::Amounts {
    if !record.charged {
        return allot::Amounts::zero();
    }
    let cost = allot::money::parse_non_negative("cost", &record.cost).unwrap_or_default();
    allot::Amounts::request(record.prompt_tokens + record.completion_tokens, cost)
}

/// Renews leases in use before they lapse and gives back idle slices.
async fn housekeeping(
    table: Arc<AllowanceTable>,
    link: Arc<CoordinatorLink>,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // The last in-flight report the coordinator got: sent again when it
    // changes, at most once a second under load but at the next tick once
    // nothing is in flight (operators see 0 soon after a burst), and after
    // a reconnect.
    let mut reported: Option<Vec<allowance::SliceHeld>> = None;
    let mut reported_at = Instant::now();
    let mut connected = link.subscribe_connected();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if connected.has_changed().unwrap_or(false) {
            connected.borrow_and_update();
            reported = None;
        }
        let in_flight = table.in_flight_report();
        let due = in_flight.is_empty() || reported_at.elapsed() >= Duration::from_secs(1);
        if reported.as_ref() != Some(&in_flight) && (due || reported.is_none()) {
            let message = pb::agent_message::Msg::InFlight(pb::InFlight {
                keys: in_flight
                    .iter()
                    .map(|s| pb::SliceReport {
                        key_id: s.key_id.clone(),
                        held: Some(s.held.to_pb()),
                    })
                    .collect(),
            });
            if link.send(message) {
                reported = Some(in_flight);
                reported_at = Instant::now();
            }
        }
        let now = Instant::now();
        for key_id in table.leases_to_renew(now) {
            if !link.ask(&key_id, &allot::Amounts::zero(), &allot::Amounts::zero()) {
                table.ask_failed(&key_id);
            }
        }
        if link.is_connected() {
            for key_id in table.idle_keys(idle, now) {
                link::give_back_with(&link, &table, &key_id);
            }
        }
    }
}
