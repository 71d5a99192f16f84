//! `AgentSession.Session`: one bidirectional stream per agent. A task per
//! stream reads the agent's messages in order and turns each into an engine
//! job; the engine answers through the session's outbox once its writes are
//! durable. The stream's first message must be `Hello`.

use crate::engine::{
    Core, Effects, EngineHandle, EngineSource, Job, Outbox, ParkedAsk, SessionCounters,
    SessionLink, PARK_LIMIT, REVOKE_RESEND,
};
use crate::ledger::{DenyReason, SettleOutcome};
use crate::placement::{LivePlacement, Served};
use crate::wire::{Ask, Command, UsageBatch};
use allot::key::KeyHash;
use allot::money;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::pb::coordinator_message::Msg as CoordMsg;
use allot::pb::{self, agent_session_server::AgentSession};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// How long a session opened on a standby waits for it to lead before it
/// is refused: about one election (`election_ttl_ms` is 2 s by default).
pub const STANDBY_HOLD: Duration = Duration::from_secs(3);

/// Sessions whose `Hello` is being answered at once, at most: after a
/// fail-over every agent starts a session with the new leader within
/// moments, and the rest wait for a turn rather than flood the engine.
pub const MAX_CONCURRENT_SESSION_STARTS: usize = 256;

pub struct SessionService {
    engine: EngineSource,
    /// Turns to start a session ([`MAX_CONCURRENT_SESSION_STARTS`]).
    starts: Arc<tokio::sync::Semaphore>,
    placement: Arc<LivePlacement>,
    /// Becomes `true` when the coordinator shuts down: every session ends.
    closing: watch::Receiver<bool>,
    /// TLS is on: a session needs a client certificate naming its agent,
    /// and its `Hello` must be for that agent.
    peer_identity_required: bool,
}

impl SessionService {
    pub fn new(engine: EngineSource, placement: Arc<LivePlacement>) -> SessionService {
        SessionService {
            engine,
            starts: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SESSION_STARTS)),
            placement,
            closing: watch::channel(false).1,
            peer_identity_required: false,
        }
    }

    /// With `required` (TLS on), sessions are accepted only from a peer
    /// whose verified client certificate names an agent, for that agent.
    pub fn with_peer_identity(mut self, required: bool) -> SessionService {
        self.peer_identity_required = required;
        self
    }

    /// Ends every session, and refuses new ones, once `closing` is `true`.
    pub fn with_shutdown(mut self, closing: watch::Receiver<bool>) -> SessionService {
        self.closing = closing;
        self
    }
}

/// Resolves once `closing` is `true`; never if the coordinator is not
/// closing (its sender gone without a shutdown).
async fn until_closing(mut closing: watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The status that ends a session at shutdown: the agent moves on to
/// another coordinator.
fn shutting_down() -> Status {
    Status::unavailable("this coordinator is shutting down; try another coordinator")
}

type SessionStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSession for SessionService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if *self.closing.borrow() {
            return Err(shutting_down());
        }
        let peer = crate::identity::session_peer(&request, self.peer_identity_required)
            .inspect_err(|refused| {
                metrics::counter!("allot_session_identity_refusals_total").increment(1);
                tracing::warn!(reason = refused.message(), "agent session refused");
            })?;
        let engine = self.engine.current_within(STANDBY_HOLD).await?;
        let starts = self.starts.clone();
        let closing = self.closing.clone();
        let mut leadership = self.engine.0.clone();
        leadership.borrow_and_update();
        let mut inbound = request.into_inner();
        let (outbox, outbound) = mpsc::channel(4096);
        let counters = Arc::new(SessionCounters::default());
        let counters_for_link = counters.clone();
        let self_counters = counters.clone();
        let placement = self.placement.clone();
        let session_closing = closing.clone();
        tokio::spawn(async move {
            let closed = until_closing(session_closing);
            tokio::pin!(closed);
            let hello = tokio::select! {
                message = inbound.message() => message,
                _ = &mut closed => return,
            };
            let hello = match hello {
                Ok(Some(pb::AgentMessage {
                    msg: Some(AgentMsg::Hello(hello)),
                })) => hello,
                Ok(_) => {
                    let _ = outbox
                        .send(Err(Status::invalid_argument(
                            "the first message of a session must be hello",
                        )))
                        .await;
                    return;
                }
                Err(_) => return,
            };
            let neuron_id = hello.neuron_id.clone();
            if let Err(refused) = peer.admit_hello(&hello.agent_id) {
                metrics::counter!("allot_session_identity_refusals_total").increment(1);
                tracing::warn!(reason = refused.message(), "agent hello refused");
                let _ = outbox.send(Err(refused)).await;
                return;
            }
            let Ok(turn) = starts.acquire_owned().await else {
                return;
            };
            let Some(agent_id) = accept_hello(&engine, hello, &outbox, counters_for_link).await
            else {
                return;
            };
            drop(turn);
            placement.attach(&agent_id, outbox.clone());
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                            counters.received.fetch_add(1, Ordering::Relaxed);
                            // Placement is soft state beside the ledger: node
                            // reports never wait on the engine.
                            let msg = match msg {
                                AgentMsg::NodeStatus(status) => {
                                    // Bounded, and only for the agent's own neuron.
                                    if let Err(invalid) = crate::wire::node_status(&status, &neuron_id) {
                                        metrics::counter!("allot_session_invalid_messages_total").increment(1);
                                        tracing::warn!(agent_id, field = invalid.field, "invalid node report; ending the session");
                                        let _ = outbox.send(Err(Status::invalid_argument(invalid.to_string()))).await;
                                        break;
                                    }
                                    placement.report(&agent_id, status, allot::clock::now_ms());
                                    continue;
                                }
                                AgentMsg::DirectiveResult(result) => {
                                    placement.directive_done(&agent_id, &result);
                                    continue;
                                }
                                other => other,
                            };
                            // Checked at the edge: a message the engine
                            // cannot trust ends the session, naming the field.
                            let command = match crate::wire::command(msg) {
                                Ok(command) => command,
                                Err(invalid) => {
                                    metrics::counter!("allot_session_invalid_messages_total").increment(1);
                                    tracing::warn!(agent_id, field = invalid.field, "invalid agent message; ending the session");
                                    let _ = outbox.send(Err(Status::invalid_argument(invalid.to_string()))).await;
                                    break;
                                }
                            };
                            if engine.submit(agent_job(agent_id.clone(), outbox.clone(), command)).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    },
                    _ = outbox.closed() => break,
                    // Leadership moved: end the session so the agent follows.
                    _ = leadership.changed() => break,
                    _ = &mut closed => {
                        // Ends the stream, even with the outbox full.
                        let _ = outbox.try_send(Err(shutting_down()));
                        break;
                    }
                }
            }
            placement.agent_gone(&agent_id, &outbox);
            let _ = engine.submit(disconnect_job(agent_id, outbox)).await;
        });
        let sent = self_counters;
        // The stream ends at shutdown even while the engine or placement
        // still hold a sender of the outbox: a server waiting for open
        // streams would otherwise wait forever.
        let outbound = futures_util::StreamExt::take_until(
            ReceiverStream::new(outbound),
            until_closing(closing),
        )
        .map(move |message| {
            sent.sent.fetch_add(1, Ordering::Relaxed);
            message
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Registers the session; `None` when the Hello was refused.
async fn accept_hello(
    engine: &EngineHandle,
    hello: pb::Hello,
    outbox: &Outbox,
    counters: Arc<SessionCounters>,
) -> Option<String> {
    let neuron_id_invalid = (!hello.neuron_id.is_empty())
        .then(|| allot::key::validate_id("hello.neuron_id", &hello.neuron_id).err())
        .flatten();
    if let Some(e) = allot::key::validate_id("hello.agent_id", &hello.agent_id)
        .err()
        .or(neuron_id_invalid)
    {
        let _ = outbox
            .send(Err(Status::invalid_argument(e.to_string())))
            .await;
        return None;
    }
    let agent_id = hello.agent_id.clone();
    let link_outbox = outbox.clone();
    let result = engine
        .call(move |core: &mut Core, fx: &mut Effects| {
            if let Some(old) = core.sessions.get(&hello.agent_id) {
                if old.epoch > hello.epoch {
                    return Err(crate::ledger::LedgerError::FailedPrecondition(
                        "a newer epoch of this agent is connected".into(),
                    )
                    .into());
                }
            }
            let welcome = core.ledger.hello(
                &hello.agent_id,
                hello.epoch,
                &hello.neuron_id,
                &mut fx.writes,
            )?;
            let high_water_seq = welcome.high_water_seq;
            // A newer session of the same agent replaces the old one; the
            // old stream ends when its outbox is dropped.
            core.sessions.insert(
                hello.agent_id.clone(),
                SessionLink {
                    epoch: hello.epoch,
                    outbox: link_outbox.clone(),
                    counters,
                    prompt_overheads: Default::default(),
                    in_flight: Default::default(),
                },
            );
            core.disconnected.remove(&hello.agent_id);
            fx.send(
                &link_outbox,
                CoordMsg::Welcome(pb::Welcome {
                    high_water_seq,
                    lease_ttl_ms: core.settings.lease_ttl.as_millis() as u64,
                }),
            );
            fx.send(&link_outbox, tariff_update(core));
            metrics::counter!("allot_agent_sessions_total").increment(1);
            tracing::info!(
                agent_id = hello.agent_id,
                epoch = hello.epoch,
                high_water_seq,
                "agent session started"
            );
            Ok(())
        })
        .await;
    match result {
        Ok(()) => Some(agent_id),
        Err(e) => {
            let _ = outbox.send(Err(Status::from(e))).await;
            None
        }
    }
}

pub fn tariff_update(core: &Core) -> CoordMsg {
    CoordMsg::Tariffs(pb::TariffUpdate {
        tariffs: core.ledger.tariffs().all().map(|t| t.to_pb()).collect(),
    })
}

fn disconnect_job(agent_id: String, outbox: Outbox) -> Job {
    Box::new(move |core: &mut Core, _fx: &mut Effects| {
        let ours = core
            .sessions
            .get(&agent_id)
            .is_some_and(|link| link.outbox.same_channel(&outbox));
        if ours {
            core.sessions.remove(&agent_id);
            core.disconnected.insert(agent_id.clone(), Instant::now());
            tracing::info!(agent_id, "agent session ended");
        }
    })
}

fn is_current(core: &Core, agent_id: &str, outbox: &Outbox) -> bool {
    core.sessions
        .get(agent_id)
        .is_some_and(|link| link.outbox.same_channel(outbox))
}

pub(crate) fn agent_job(agent_id: String, outbox: Outbox, command: Command) -> Job {
    Box::new(move |core: &mut Core, fx: &mut Effects| {
        // Messages of a replaced session are ignored: the new one owns the agent.
        if !is_current(core, &agent_id, &outbox) {
            return;
        }
        match command {
            Command::KeyLookup { hash, raw } => key_lookup(core, fx, &agent_id, &outbox, hash, raw),
            Command::Ask(ask) => allowance_ask(core, fx, &agent_id, &outbox, ask, None),
            Command::Usage(batch) => settle_batch(core, fx, &agent_id, &outbox, batch),
            Command::GiveBack { key_id, amount } => {
                core.ledger.give_back(&agent_id, &key_id, &amount);
                metrics::counter!("allot_allowance_returns_total").increment(1);
                retry_parked(core, fx);
            }
            Command::InFlight(mut keys) => {
                // What requests reserved comes out of the agent's slices:
                // a key it holds no slice of has nothing in flight here.
                let held: std::collections::HashSet<&String> = core
                    .ledger
                    .slices_of(&agent_id)
                    .map(|(key_id, _)| key_id)
                    .collect();
                keys.retain(|key_id, _| held.contains(key_id));
                if let Some(link) = core.sessions.get_mut(&agent_id) {
                    link.in_flight = keys;
                }
            }
            Command::PromptOverheads(overheads) => {
                if let Some(link) = core.sessions.get_mut(&agent_id) {
                    link.prompt_overheads = overheads;
                }
            }
            Command::Reconcile(slices) => {
                let reconciled = core.ledger.reconcile(&agent_id, slices, fx.now);
                for key_id in &reconciled.not_held {
                    metrics::counter!("allot_reconcile_refused_total", "reason" => "key_not_held")
                        .increment(1);
                    tracing::error!(
                        agent_id,
                        key_id,
                        "an agent reported a slice of a key it never held; ignored"
                    );
                }
                if reconciled.late_held {
                    metrics::counter!("allot_dead_agent_returns_total").increment(1);
                    tracing::error!(
                        agent_id,
                        "an agent declared dead came back still holding usage; it counts again and may exceed a cap"
                    );
                }
            }
        }
    })
}

fn key_lookup(
    core: &mut Core,
    fx: &mut Effects,
    agent_id: &str,
    outbox: &Outbox,
    hash: Option<KeyHash>,
    key_hash: Vec<u8>,
) {
    let key = hash
        .and_then(|hash| core.ledger.key_by_hash(&hash))
        .map(key_info);
    if let Some(key) = &key {
        core.watchers
            .entry(key.key_id.clone())
            .or_default()
            .insert(agent_id.to_string());
    }
    fx.send(outbox, CoordMsg::Key(pb::KeyLookupResult { key_hash, key }));
}

pub fn key_info(key: &crate::ledger::KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        key_id: key.key_id.clone(),
        account_id: key.account_id.clone(),
        purpose: key.purpose.to_pb() as i32,
        revoked: key.revoked,
        allowed_models: key.allowed_models.clone(),
        name: key.name.clone(),
    }
}

/// Decides the asks waiting for reclaimed slices again; those that waited
/// past [`PARK_LIMIT`] are decided without further reclaim.
pub fn retry_parked(core: &mut Core, fx: &mut Effects) {
    for parked in std::mem::take(&mut core.parked) {
        if !is_current(core, &parked.agent_id, &parked.outbox) {
            continue;
        }
        let since = parked.since;
        allowance_ask(
            core,
            fx,
            &parked.agent_id,
            &parked.outbox,
            parked.ask,
            Some(since),
        );
    }
}

/// `parked_since`: when this ask was first parked (None: a fresh ask).
fn allowance_ask(
    core: &mut Core,
    fx: &mut Effects,
    agent_id: &str,
    outbox: &Outbox,
    ask: Ask,
    parked_since: Option<Instant>,
) {
    let Ask { need, want, .. } = ask;
    if parked_since.is_none() {
        metrics::counter!("allot_allowance_asks_total").increment(1);
    }
    let _span = tracing::info_span!("grant", agent_id, key_id = ask.key_id.as_str()).entered();
    if !may_ask(core, agent_id, &ask.key_id, fx.now) {
        // Knowing a key's id is not knowing its secret: an agent asks only
        // for a key a client showed it (it looked the key up by the
        // secret's hash on this leader) or one it held within the key
        // history's retention. An honest agent looks its cached keys up
        // again before anything else on a new session.
        metrics::counter!("allot_allowance_asks_refused_total", "reason" => "key_not_looked_up")
            .increment(1);
        tracing::error!(
            agent_id,
            key_id = ask.key_id,
            "an ask for a key this agent never looked up nor held; refused"
        );
        let message = format!(
            "key_id: this agent has not looked up key {:?} by its secret",
            ask.key_id
        );
        deny(fx, outbox, ask, pb::DenyReason::UnknownKey, 0, message);
        return;
    }
    match core.ledger.ask(agent_id, &ask.key_id, &need, &want, fx.now) {
        Ok(grant) => {
            metrics::counter!("allot_allowance_grants_total").increment(1);
            // A slice granted after a Revoke may be reclaimed again at once.
            core.revoked_at
                .remove(&(agent_id.to_string(), ask.key_id.clone()));
            let limits = grant
                .limits
                .iter()
                .map(|view| pb::LimitView {
                    unit: view.limit.unit.to_pb() as i32,
                    cap: money::format(view.limit.amount),
                    // Free under the cap: no agent holds it, this one's
                    // new slice included (the agent adds what it holds).
                    remaining: money::format(view.remaining),
                    reset_in_ms: view
                        .next_refill
                        .map(|at| (at - fx.now).max(0) as u64)
                        .unwrap_or(0),
                    window: Some(view.limit.window.to_pb()),
                })
                .collect();
            fx.send(
                outbox,
                CoordMsg::Grant(pb::Grant {
                    ask_id: ask.ask_id,
                    key_id: ask.key_id,
                    amount: Some(grant.amount.to_pb()),
                    ttl_ms: core.settings.lease_ttl.as_millis() as u64,
                    limits,
                }),
            );
        }
        Err(refusal)
            if !refusal.reclaim.is_empty()
                && parked_since.is_none_or(|at| at.elapsed() < PARK_LIMIT) =>
        {
            // The cap has room, but other agents hold it: take their idle
            // slices back before refusing anyone.
            tracing::debug!(
                agent_id,
                key_id = ask.key_id,
                holders = refusal.reclaim.len(),
                "ask parked; reclaiming slices"
            );
            let now = Instant::now();
            for (holder, key_id) in refusal.reclaim {
                let recently = core
                    .revoked_at
                    .get(&(holder.clone(), key_id.clone()))
                    .is_some_and(|at| now.duration_since(*at) < REVOKE_RESEND);
                if recently {
                    continue;
                }
                if let Some(link) = core.sessions.get(&holder) {
                    fx.send(
                        &link.outbox,
                        CoordMsg::Revoke(pb::Revoke {
                            key_id: key_id.clone(),
                            reason: "reclaim".into(),
                        }),
                    );
                    metrics::counter!("allot_allowance_revokes_total").increment(1);
                }
                core.revoked_at.insert((holder, key_id), now);
            }
            core.revoked_at
                .retain(|_, at| now.duration_since(*at) < PARK_LIMIT * 2);
            core.parked.push(ParkedAsk {
                agent_id: agent_id.to_string(),
                outbox: outbox.clone(),
                ask,
                since: parked_since.unwrap_or(now),
            });
        }
        Err(refusal) if !refusal.reclaim.is_empty() => {
            // Parked for PARK_LIMIT and other agents still hold the room:
            // the cap is not exhausted, so this is not a 429. The agent
            // answers 503 with Retry-After and asks again.
            tracing::warn!(
                agent_id,
                key_id = ask.key_id,
                holders = refusal.reclaim.len(),
                "reclaimed slices were not given back in time"
            );
            deny(
                fx,
                outbox,
                ask,
                pb::DenyReason::HeldElsewhere,
                1_000,
                "the budget is held by other agents that have not returned it yet".into(),
            );
        }
        Err(refusal) => {
            tracing::debug!(
                agent_id,
                key_id = ask.key_id,
                ?need,
                reclaim = refusal.reclaim.len(),
                parked = parked_since.is_some(),
                message = refusal.message,
                "ask refused"
            );
            let reason = match refusal.reason {
                DenyReason::InsufficientQuota => pb::DenyReason::InsufficientQuota,
                DenyReason::RateLimited => pb::DenyReason::RateLimited,
                DenyReason::KeyRevoked => pb::DenyReason::KeyRevoked,
                DenyReason::UnknownKey => pb::DenyReason::UnknownKey,
            };
            let retry_after_ms = refusal
                .retry_at
                .map(|at| (at - fx.now).max(1) as u64)
                .unwrap_or(0);
            deny(fx, outbox, ask, reason, retry_after_ms, refusal.message);
        }
    }
}

/// Whether `agent_id` may ask for a slice of `key_id`: it looked the key
/// up by its secret's hash on this leader, or holds or held a slice of it
/// within the key history's retention.
fn may_ask(core: &Core, agent_id: &str, key_id: &str, now: allot::clock::UnixMs) -> bool {
    core.watchers
        .get(key_id)
        .is_some_and(|agents| agents.contains(agent_id))
        || core.ledger.has_held(agent_id, key_id, now)
}

/// Answers an ask with a refusal, counted by reason.
fn deny(
    fx: &mut Effects,
    outbox: &Outbox,
    ask: Ask,
    reason: pb::DenyReason,
    retry_after_ms: u64,
    message: String,
) {
    metrics::counter!("allot_allowance_denies_total", "reason" => reason.as_str_name())
        .increment(1);
    fx.send(
        outbox,
        CoordMsg::Deny(pb::Deny {
            ask_id: ask.ask_id,
            key_id: ask.key_id,
            reason: reason as i32,
            retry_after_ms,
            message,
        }),
    );
}

fn settle_batch(
    core: &mut Core,
    fx: &mut Effects,
    agent_id: &str,
    outbox: &Outbox,
    batch: UsageBatch,
) {
    metrics::histogram!("allot_usage_batch_records").record(batch.records.len() as f64);
    if batch.clamped > 0 {
        metrics::counter!("allot_usage_clamped_total").increment(batch.clamped as u64);
        tracing::error!(
            agent_id,
            records = batch.clamped,
            "usage records with more than {} tokens are charged at that bound",
            crate::wire::MAX_RECORD_TOKENS
        );
    }
    // The settlement span links to the traces of the requests it settles.
    let span = tracing::info_span!("settle", agent_id, records = batch.records.len());
    for record in batch.records.iter().take(128) {
        if let (Ok(trace_id), Ok(span_id)) = (
            opentelemetry::trace::TraceId::from_hex(&record.trace_id),
            opentelemetry::trace::SpanId::from_hex(&record.span_id),
        ) {
            span.add_link(opentelemetry::trace::SpanContext::new(
                trace_id,
                span_id,
                opentelemetry::trace::TraceFlags::SAMPLED,
                true,
                opentelemetry::trace::TraceState::default(),
            ));
        }
    }
    let _entered = span.enter();
    let analytics = core.settings.analytics.clone();
    // Records settled now, by position, with their pricing: their usage
    // rows once the ledger commit is done.
    let mut priced = Vec::new();
    // And the requests they served, for placement's demand.
    let mut served = Vec::new();
    for (index, (record, usage)) in batch.records.iter().zip(&batch.usages).enumerate() {
        let finished_at = record
            .admitted_at_unix_ms
            .saturating_add(i64::try_from(record.duration_ms).unwrap_or(i64::MAX));
        if record.admitted_at_unix_ms > 0 {
            metrics::histogram!("allot_usage_settle_lag_seconds")
                .record(fx.now.saturating_sub(finished_at).max(0) as f64 / 1000.0);
        }
        match core.ledger.settle(agent_id, usage, fx.now, &mut fx.writes) {
            SettleOutcome::Settled {
                cost,
                price,
                free,
                excess,
                late,
            } => {
                metrics::counter!("allot_usage_settled_total").increment(1);
                if analytics.is_some() {
                    priced.push((index, price, cost));
                }
                if core.settings.placement.is_some() {
                    served.extend(Served::of(record));
                }
                if free && !usage.model.is_empty() {
                    metrics::counter!("allot_usage_free_total").increment(1);
                }
                if usage.model.is_empty() && (usage.prompt_tokens + usage.completion_tokens) > 0 {
                    tracing::error!(
                        agent_id,
                        seq = usage.seq,
                        "usage without a model cannot be billed"
                    );
                }
                if excess {
                    metrics::counter!("allot_usage_over_reservation_total").increment(1);
                    tracing::error!(agent_id, seq = usage.seq, key_id = usage.key_id, %cost,
                        "neuron reported more usage than was reserved; the excess is charged");
                }
                if late {
                    metrics::counter!("allot_usage_late_total").increment(1);
                    tracing::error!(
                        agent_id,
                        seq = usage.seq,
                        key_id = usage.key_id,
                        "late usage from an agent whose slice was released; charged"
                    );
                }
            }
            SettleOutcome::Duplicate => {
                metrics::counter!("allot_usage_duplicates_total").increment(1);
            }
            SettleOutcome::NotHeld => {
                metrics::counter!("allot_usage_refused_total", "reason" => "key_not_held")
                    .increment(1);
                tracing::error!(
                    agent_id,
                    seq = usage.seq,
                    key_id = usage.key_id,
                    "usage for a key this agent never held a slice of; not charged"
                );
            }
            SettleOutcome::Gap { expected } => {
                tracing::warn!(
                    agent_id,
                    expected,
                    got = usage.seq,
                    "usage sequence gap; waiting for a resend"
                );
                break;
            }
        }
    }
    let high_water_seq = core
        .ledger
        .agent(agent_id)
        .map(|a| a.high_water_seq)
        .unwrap_or(0);
    fx.send(outbox, CoordMsg::UsageAck(pb::UsageAck { high_water_seq }));
    if !core.parked.is_empty() {
        retry_parked(core, fx);
    }
    push_depletions(core, fx, &batch.records);
    if let (Some(placement), false) = (core.settings.placement.clone(), served.is_empty()) {
        fx.after_commit(move |outcome| {
            if outcome.is_ok() {
                placement.record_settled(&served);
            }
        });
    }
    // Analytics rows once the ledger has them: a failed commit sends
    // nothing, and the agent's resend settles (and rows) them again. The
    // rows take the records; nothing is copied.
    if let (Some(analytics), false) = (analytics, priced.is_empty()) {
        let mut records = batch.records;
        let now = fx.now;
        let rows: Vec<pb::UsageRow> = priced
            .into_iter()
            .map(|(index, price, cost)| {
                let record = std::mem::take(&mut records[index]);
                crate::usage::settled_row(agent_id, record, price, cost, now)
            })
            .collect();
        fx.after_commit(move |outcome| {
            if outcome.is_ok() {
                let _ = analytics.send(rows);
            }
        });
    }
}

/// Tells every agent interested in a key whose cap is now fully spent, at
/// most once a second per key however many records deplete it: agents then
/// refuse beyond their slice locally instead of asking.
fn push_depletions(core: &mut Core, fx: &mut Effects, records: &[pb::UsageRecord]) {
    let now = Instant::now();
    let mut keys: Vec<&str> = records.iter().map(|r| r.key_id.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key_id in keys {
        if core
            .depletion_pushed
            .get(key_id)
            .is_some_and(|at| now.duration_since(*at) < std::time::Duration::from_secs(1))
        {
            continue;
        }
        let Ok(views) = core.ledger.limit_views(key_id, fx.now) else {
            continue;
        };
        let Some(spent) = views
            .iter()
            .find(|v| v.spent > rust_decimal::Decimal::ZERO && v.spent >= v.limit.amount)
        else {
            continue;
        };
        let (reason, retry_after_ms) = if spent.limit.window.is_balance() {
            (pb::DenyReason::InsufficientQuota, 0)
        } else {
            let at = spent.next_refill.unwrap_or(fx.now + 1000);
            (pb::DenyReason::RateLimited, (at - fx.now).max(1) as u64)
        };
        let message = CoordMsg::Deny(pb::Deny {
            ask_id: 0,
            key_id: key_id.to_string(),
            reason: reason as i32,
            retry_after_ms,
            message: format!(
                "{} limit of {} is spent",
                spent.limit.unit.as_str(),
                spent.limit.amount
            ),
        });
        core.push_to(fx, core.interested_in(key_id), message);
        metrics::counter!("allot_depletion_pushes_total").increment(1);
        core.depletion_pushed.insert(key_id.to_string(), now);
    }
    core.depletion_pushed
        .retain(|_, at| now.duration_since(*at) < std::time::Duration::from_secs(10));
}

#[cfg(test)]
mod fuzz {
    //! Arbitrary agent message sequences through the real edge and session
    //! jobs (`crate::fuzzing`, also driven by `fuzz/fuzz_targets/engine_messages.rs`).
    use crate::fuzzing::{strategy, Harness};
    use proptest::prelude::*;

    fn run(
        messages: Vec<(usize, allot::pb::agent_message::Msg)>,
        within_caps: bool,
    ) -> Result<(), TestCaseError> {
        let mut harness = Harness::new();
        for (agent, msg) in messages {
            harness
                .step(agent, msg, within_caps)
                .map_err(TestCaseError::fail)?;
        }
        harness.finish().map_err(TestCaseError::fail)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_message_sequence_is_answered_without_panicking_or_negative_amounts(
            messages in prop::collection::vec((0usize..2, strategy::message(true)), 1..40)
        ) {
            run(messages, false)?;
        }

        #[test]
        fn asks_and_give_backs_never_hold_more_than_a_cap(
            messages in prop::collection::vec((0usize..2, strategy::message(false)), 1..60)
        ) {
            run(messages, true)?;
        }
    }
}
