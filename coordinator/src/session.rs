//! `AgentSession.Session`: one bidirectional stream per agent. A task per
//! stream reads the agent's messages in order and turns each into an engine
//! job; the engine answers through the session's outbox once its writes are
//! durable. The stream's first message must be `Hello`.

use crate::engine::{Core, Effects, EngineHandle, EngineSource, Job, Outbox, SessionCounters};
use crate::lease::{Outgoing, SessionId, ToAgent};
use crate::placement::{LivePlacement, Served};
use crate::wire::{Command, UsageBatch};
use allot::key::KeyHash;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::pb::{self, agent_session_server::AgentSession};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
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
pub const MAX_CONCURRENT_SESSION_STARTS: usize = 2048;

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
        // A shutdown ends the wait for leadership too.
        let engine = tokio::select! {
            engine = self.engine.current_within(STANDBY_HOLD) => engine?,
            _ = until_closing(self.closing.clone()) => return Err(shutting_down()),
        };
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
            let Some((agent_id, session)) =
                accept_hello(&engine, hello, &outbox, counters_for_link).await
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
                            if engine.submit(agent_job(agent_id.clone(), session, command)).await.is_err() {
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
            let _ = engine.submit(disconnect_job(agent_id, session)).await;
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
) -> Option<(String, SessionId)> {
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
            let (session, welcome) = core.connect(
                fx,
                &hello.agent_id,
                hello.epoch,
                &hello.neuron_id,
                link_outbox.clone(),
                counters,
            )?;
            fx.send(
                &link_outbox,
                crate::wire::tariff_update(core.ledger().tariffs()),
            );
            metrics::counter!("allot_agent_sessions_total").increment(1);
            tracing::info!(
                agent_id = hello.agent_id,
                epoch = hello.epoch,
                high_water_seq = welcome.high_water_seq,
                "agent session started"
            );
            Ok(session)
        })
        .await;
    match result {
        Ok(session) => Some((agent_id, session)),
        Err(e) => {
            let _ = outbox.send(Err(Status::from(e))).await;
            None
        }
    }
}

fn disconnect_job(agent_id: String, session: SessionId) -> Job {
    Box::new(move |core: &mut Core, fx: &mut Effects| {
        if core.disconnect(fx, &agent_id, session) {
            tracing::info!(agent_id, "agent session ended");
        }
    })
}

pub(crate) fn agent_job(agent_id: String, session: SessionId, command: Command) -> Job {
    Box::new(move |core: &mut Core, fx: &mut Effects| {
        // Messages of a replaced session are ignored: the new one owns the agent.
        if !core.is_current(&agent_id, session) {
            return;
        }
        match command {
            Command::KeyLookup { hash, raw } => key_lookup(core, fx, &agent_id, session, hash, raw),
            Command::Ask(ask) => core.ask(fx, &agent_id, session, ask),
            Command::Usage(batch) => settle_batch(core, fx, &agent_id, session, batch),
            Command::GiveBack { key_id, amount } => core.give_back(fx, &agent_id, &key_id, &amount),
            Command::InFlight(keys) => core.set_in_flight(&agent_id, keys),
            Command::PromptOverheads(overheads) => core.set_prompt_overheads(&agent_id, overheads),
            Command::Reconcile(slices) => {
                let reconciled = core.ledger_mut().reconcile(&agent_id, slices, fx.now);
                if let Some(key_id) = reconciled.not_held.first() {
                    metrics::counter!("allot_reconcile_refused_total", "reason" => "key_not_held")
                        .increment(reconciled.not_held.len() as u64);
                    // One line per message, however many keys it names.
                    tracing::error!(
                        agent_id,
                        key_id,
                        keys = reconciled.not_held.len(),
                        "an agent reported slices of keys it never held; ignored"
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
    session: SessionId,
    hash: Option<KeyHash>,
    key_hash: Vec<u8>,
) {
    let key = hash
        .and_then(|hash| core.ledger().key_by_hash(&hash))
        .cloned();
    if let Some(key) = &key {
        core.watch(&key.key_id, agent_id);
    }
    let answer = Outgoing {
        agent_id: agent_id.to_string(),
        session: Some(session),
        message: ToAgent::KeyLookup { key_hash, key },
    };
    core.deliver(fx, vec![answer]);
}

/// Settles a usage batch (the decisions are [`crate::settle::batch`]'s),
/// with what only the wire records have: the settlement span's links to
/// the requests' traces, the settle lag, the usage rows and placement's
/// demand once committed.
fn settle_batch(
    core: &mut Core,
    fx: &mut Effects,
    agent_id: &str,
    session: SessionId,
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
    for record in &batch.records {
        if record.admitted_at_unix_ms > 0 {
            let finished_at = record
                .admitted_at_unix_ms
                .saturating_add(i64::try_from(record.duration_ms).unwrap_or(i64::MAX));
            metrics::histogram!("allot_usage_settle_lag_seconds")
                .record(fx.now.saturating_sub(finished_at).max(0) as f64 / 1000.0);
        }
    }
    let settled = core.settle(fx, agent_id, session, &batch.usages);
    if let Some(placement) = core.settings().placement.clone() {
        let served: Vec<Served> = settled
            .charged
            .iter()
            .filter_map(|charged| Served::of(&batch.records[charged.index]))
            .collect();
        if !served.is_empty() {
            fx.after_commit(move |outcome| {
                if outcome.is_ok() {
                    placement.record_settled(&served);
                }
            });
        }
    }
    // Analytics rows once the ledger has them: a failed commit sends
    // nothing, and the agent's resend settles (and rows) them again. The
    // rows take the records; nothing is copied.
    if let (Some(analytics), false) = (
        core.settings().analytics.clone(),
        settled.charged.is_empty(),
    ) {
        let mut records = batch.records;
        let now = fx.now;
        let rows: Vec<pb::UsageRow> = settled
            .charged
            .into_iter()
            .map(|charged| {
                let record = std::mem::take(&mut records[charged.index]);
                crate::usage::settled_row(agent_id, record, charged.price, charged.cost, now)
            })
            .collect();
        fx.after_commit(move |outcome| {
            if outcome.is_ok() {
                let _ = analytics.send(rows);
            }
        });
    }
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
