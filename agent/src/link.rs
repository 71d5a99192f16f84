//! The agent's link to the coordinator: one task that keeps one
//! `AgentSession` stream open to the leader (trying each configured
//! endpoint in turn, with jittered exponential backoff), says `Hello` with
//! what this agent holds, and applies what the coordinator sends: grants,
//! denials, revocations, key updates, tariffs and usage acks.

use crate::allowance::{AllowanceTable, CachedDeny, DenyKind, LimitSeen};
use crate::keys::{KeyCache, KeyInfo};
use crate::spool::SpoolEvent;
use allot::key::KeyHash;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::pb::coordinator_message::Msg as CoordMsg;
use allot::pb::{self, agent_session_client::AgentSessionClient};
use allot::tariff::{Tariff, TariffBook};
use allot::{money, Amounts, Unit};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// What the rest of the agent uses to talk to the coordinator.
pub struct CoordinatorLink {
    outgoing: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
    connected: watch::Sender<bool>,
    lookups: Mutex<HashMap<KeyHash, Vec<oneshot::Sender<Option<KeyInfo>>>>>,
    next_ask_id: AtomicU64,
    pub tariffs: watch::Sender<Arc<TariffBook>>,
    /// Why the coordinator refuses this agent's sessions, while it does.
    refused: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("coordinator unreachable")]
pub struct Unreachable;

impl Default for CoordinatorLink {
    fn default() -> Self {
        CoordinatorLink {
            outgoing: Mutex::new(None),
            connected: watch::channel(false).0,
            lookups: Mutex::new(HashMap::new()),
            next_ask_id: AtomicU64::new(1),
            tariffs: watch::channel(Arc::new(TariffBook::default())).0,
            refused: Mutex::new(None),
        }
    }
}

impl CoordinatorLink {
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Why the coordinator refuses this agent, while it does (for
    /// `/readyz`): an epoch older than the one it knows means the spool
    /// directory was wiped or restored from an older copy.
    pub fn refusal(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_refusal(&self, refusal: Option<String>) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = refusal;
    }

    pub fn subscribe_connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Queues a message on the current session; false when there is none.
    pub fn send(&self, msg: AgentMsg) -> bool {
        let guard = self.outgoing.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.try_send(pb::AgentMessage { msg: Some(msg) }).is_ok(),
            None => false,
        }
    }

    /// Asks for an allowance for `key_id`.
    pub fn ask(&self, key_id: &str, need: &Amounts, want: &Amounts) -> bool {
        let ask_id = self.next_ask_id.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("allot_agent_allowance_asks_total").increment(1);
        self.send(AgentMsg::Ask(pb::AllowanceAsk {
            ask_id,
            key_id: key_id.to_string(),
            need: Some(need.to_pb()),
            want: Some(want.to_pb()),
        }))
    }

    /// Looks a key hash up on the coordinator.
    pub async fn lookup(
        &self,
        hash: KeyHash,
        timeout: Duration,
    ) -> Result<Option<KeyInfo>, Unreachable> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
            let waiters = lookups.entry(hash).or_default();
            waiters.push(tx);
            waiters.len() == 1
        };
        if first
            && !self.send(AgentMsg::KeyLookup(pb::KeyLookup {
                key_hash: hash.0.to_vec(),
            }))
        {
            self.lookups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&hash);
            return Err(Unreachable);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        match answer {
            Ok(Ok(info)) => Ok(info),
            _ => {
                // The answer was lost (the coordinator drops what a full
                // session outbox cannot take): forget the waiters that gave
                // up, so that the next lookup of this key asks again
                // instead of waiting on an answer that never comes.
                let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(waiters) = lookups.get_mut(&hash) {
                    waiters.retain(|waiter| !waiter.is_closed());
                    if waiters.is_empty() {
                        lookups.remove(&hash);
                    }
                }
                Err(Unreachable)
            }
        }
    }

    fn resolve_lookup(&self, hash: KeyHash, info: Option<KeyInfo>) {
        let waiters = self
            .lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash)
            .unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(info.clone());
        }
    }

    /// Ends this side of the session once what is queued is sent (the
    /// spool must have dropped its sender already): the coordinator then
    /// processes every message before it sees the end.
    pub fn close(&self) {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn set_session(&self, session: Option<mpsc::Sender<pb::AgentMessage>>) {
        let up = session.is_some();
        *self.outgoing.lock().unwrap_or_else(|p| p.into_inner()) = session;
        if !up {
            // Pending lookups will never be answered on the old stream.
            self.lookups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.connected.send_replace(up);
    }
}

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub agent_id: String,
    pub neuron_id: String,
    pub epoch: u64,
    pub endpoints: Vec<String>,
    pub lease_margin: Duration,
    pub connect_timeout: Duration,
    /// For the message that says how to recover a wiped spool.
    pub spool_dir: std::path::PathBuf,
    /// Mutual TLS towards `https://` coordinators; the files are read at
    /// every connection.
    pub tls: Option<crate::config::ClientTlsFiles>,
}

/// Everything the link task touches.
pub struct LinkContext {
    pub link: Arc<CoordinatorLink>,
    pub table: Arc<AllowanceTable>,
    pub keys: Arc<KeyCache>,
    pub spool: mpsc::UnboundedSender<SpoolEvent>,
    /// Placement directives, to the node reporter (which owns the neuron
    /// adapter).
    pub directives: mpsc::UnboundedSender<pb::PlacementDirective>,
    pub overheads: Arc<crate::overhead::LearnedOverheads>,
    pub settings: LinkSettings,
}

/// Keeps a session open until `shutdown` fires.
pub async fn run(ctx: LinkContext, mut shutdown: watch::Receiver<bool>) {
    let mut attempt: u32 = 0;
    let mut endpoint_index = 0usize;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let endpoint =
            ctx.settings.endpoints[endpoint_index % ctx.settings.endpoints.len()].clone();
        endpoint_index += 1;
        let started = Instant::now();
        tokio::select! {
            result = session(&ctx, &endpoint) => {
                if let Err(error) = result {
                    match refusal_of(&error, &ctx.settings) {
                        Some(refusal) => {
                            if ctx.link.refusal().as_ref() != Some(&refusal) {
                                tracing::error!(endpoint, "{refusal}");
                            }
                            ctx.link.set_refusal(Some(refusal));
                        }
                        None => tracing::warn!(endpoint, %error, "coordinator session ended"),
                    }
                }
            }
            _ = shutdown.changed() => {}
        }
        ctx.link.set_session(None);
        ctx.table.fail_all_asks();
        if started.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        attempt = attempt.saturating_add(1);
        let base = Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(5));
        let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 2);
        let delay = base.min(Duration::from_secs(3)) + Duration::from_millis(jitter);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The coordinator's refusal of this agent's epoch, explained for the
/// operator: it happens when the spool directory lost its `state.json`
/// (wiped, a new volume) or went back to an older copy. The agent keeps
/// trying (a newer session of the same agent may still be ending), but
/// only an operator can end this.
fn refusal_of(error: &anyhow::Error, settings: &LinkSettings) -> Option<String> {
    let status = error.downcast_ref::<tonic::Status>()?;
    if status.code() != tonic::Code::FailedPrecondition || !status.message().contains("epoch") {
        return None;
    }
    let mut message = format!("the coordinator refuses this agent: {}", status.message());
    if status.message().contains("older than") {
        message.push_str(&format!(
            "; the spool directory {dir} was wiped or restored from an older copy, and usage \
             records it held and had not sent are lost. To recover, stop the agent, then either \
             give it a new agent_id, or write {dir}/state.json as {{\"epoch\": N, \"acked\": 0}} \
             with N the current epoch named above, and start it again (docs/operations.md: \"A \
             wiped spool directory\")",
            dir = settings.spool_dir.display()
        ));
    }
    Some(message)
}

async fn session(ctx: &LinkContext, endpoint: &str) -> anyhow::Result<()> {
    let mut builder = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(ctx.settings.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if endpoint.starts_with("https://") {
        // Validated at start-up: an https:// coordinator has TLS files.
        let files = ctx
            .settings
            .tls
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("coordinator_ca: needed for {endpoint}"))?;
        let tls = crate::tls::coordinator_tls(files)?;
        builder = builder.tls_config(tls)?;
    }
    let channel = builder.connect().await?;
    let mut client = AgentSessionClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(4096);
    tx.send(pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            agent_id: ctx.settings.agent_id.clone(),
            epoch: ctx.settings.epoch,
            neuron_id: ctx.settings.neuron_id.clone(),
        })),
    })
    .await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    // After Welcome the link and the spool hold the only senders: closing
    // the link (`close`) then ends this side of the stream.
    let mut tx = Some(tx);
    while let Some(message) = inbound.message().await? {
        let Some(msg) = message.msg else { continue };
        if let CoordMsg::Welcome(welcome) = &msg {
            let Some(tx) = tx.take() else {
                anyhow::bail!("a second Welcome on one session");
            };
            ctx.link.set_refusal(None);
            ctx.table.raise_seq(welcome.high_water_seq);
            ctx.table.ack(welcome.high_water_seq);
            // What this agent holds, before anything else on the session:
            // the coordinator replaces its view with it.
            let slices = ctx.table.report(Instant::now());
            tx.send(pb::AgentMessage {
                msg: Some(AgentMsg::Reconcile(pb::Reconcile {
                    slices: slices
                        .into_iter()
                        .map(|s| pb::SliceReport {
                            key_id: s.key_id,
                            held: Some(s.held.to_pb()),
                        })
                        .collect(),
                })),
            })
            .await?;
            if !ctx.overheads.snapshot().is_empty() {
                tx.send(pb::AgentMessage {
                    msg: Some(ctx.overheads.message()),
                })
                .await?;
            }
            // Keys may have changed while we were away: look them up again,
            // before any ask can reach the session (the coordinator grants
            // only keys this agent looked up on it, or held).
            for hash in ctx.keys.cached_hashes() {
                tx.send(pb::AgentMessage {
                    msg: Some(AgentMsg::KeyLookup(pb::KeyLookup {
                        key_hash: hash.0.to_vec(),
                    })),
                })
                .await?;
            }
            let _ = ctx.spool.send(SpoolEvent::Session(tx.clone()));
            ctx.link.set_session(Some(tx));
            let _ = ctx.spool.send(SpoolEvent::Ack(welcome.high_water_seq));
            tracing::info!(
                endpoint,
                high_water_seq = welcome.high_water_seq,
                "coordinator session established"
            );
            continue;
        }
        apply(ctx, msg);
    }
    Ok(())
}

fn limits_seen(views: &[pb::LimitView], now: Instant) -> Vec<LimitSeen> {
    views
        .iter()
        .filter_map(|v| {
            let unit = Unit::from_pb("unit", v.unit).ok()?;
            Some(LimitSeen {
                unit,
                cap: money::parse_decimal("cap", &v.cap).ok()?,
                free: money::parse_decimal("remaining", &v.remaining).ok()?,
                reset_at: (v.reset_in_ms > 0).then(|| now + Duration::from_millis(v.reset_in_ms)),
            })
        })
        .collect()
}

fn apply(ctx: &LinkContext, msg: CoordMsg) {
    let now = Instant::now();
    match msg {
        CoordMsg::Welcome(_) => {}
        CoordMsg::Key(result) => {
            let Ok(hash) = KeyHash::from_slice("key_hash", &result.key_hash) else {
                return;
            };
            let info = result.key.as_ref().and_then(KeyInfo::from_pb);
            ctx.keys.put(hash, info.clone(), now);
            ctx.link.resolve_lookup(hash, info);
        }
        CoordMsg::KeyUpdate(update) => {
            let Some(info) = update.key.as_ref().and_then(KeyInfo::from_pb) else {
                return;
            };
            ctx.table.clear_deny(&info.key_id);
            if info.revoked {
                give_back(ctx, &info.key_id);
            }
            ctx.keys.update(info);
        }
        CoordMsg::Grant(grant) => {
            let amount = Amounts::from_pb("amount", grant.amount.as_ref()).unwrap_or_default();
            metrics::counter!("allot_agent_grants_total").increment(1);
            ctx.table.grant(
                &grant.key_id,
                &amount,
                Duration::from_millis(grant.ttl_ms),
                ctx.settings.lease_margin,
                limits_seen(&grant.limits, now),
                now,
            );
        }
        CoordMsg::Deny(deny) => {
            let kind = match pb::DenyReason::try_from(deny.reason) {
                Ok(pb::DenyReason::RateLimited) => DenyKind::RateLimited,
                Ok(pb::DenyReason::KeyRevoked) => DenyKind::KeyRevoked,
                Ok(pb::DenyReason::UnknownKey) => DenyKind::UnknownKey,
                Ok(pb::DenyReason::HeldElsewhere) => DenyKind::HeldElsewhere,
                _ => DenyKind::InsufficientQuota,
            };
            // Balance refusals stand until a push says the key changed; the
            // cap on their life bounds the damage of a lost push.
            let stands_for = match kind {
                DenyKind::RateLimited | DenyKind::HeldElsewhere => {
                    Duration::from_millis(deny.retry_after_ms.max(1))
                }
                _ => Duration::from_secs(30),
            };
            metrics::counter!("allot_agent_denies_total").increment(1);
            // An unsolicited refusal (ask id 0) is a pushed depletion: it
            // stands for any shortfall.
            let shortfall = if deny.ask_id == 0 {
                Amounts::zero()
            } else {
                ctx.table.pending_shortfall(&deny.key_id)
            };
            ctx.table.deny(
                &deny.key_id,
                CachedDeny {
                    kind,
                    until: now + stands_for,
                    shortfall,
                    message: deny.message,
                },
                now,
            );
        }
        CoordMsg::Revoke(revoke) => {
            tracing::info!(
                key_id = revoke.key_id,
                reason = revoke.reason,
                "coordinator revoked a slice"
            );
            give_back(ctx, &revoke.key_id);
        }
        CoordMsg::Tariffs(update) => {
            let tariffs: Vec<Tariff> = update
                .tariffs
                .iter()
                .filter_map(|t| Tariff::from_pb("tariff", t).ok())
                .collect();
            ctx.link
                .tariffs
                .send_replace(Arc::new(TariffBook::new(tariffs)));
        }
        CoordMsg::UsageAck(ack) => {
            ctx.table.ack(ack.high_water_seq);
            let _ = ctx.spool.send(SpoolEvent::Ack(ack.high_water_seq));
        }
        CoordMsg::Directive(directive) => {
            let directive_id = directive.directive_id;
            if ctx.directives.send(directive).is_err() {
                ctx.link
                    .send(AgentMsg::DirectiveResult(pb::DirectiveResult {
                        directive_id,
                        ok: false,
                        message: "this agent has no neuron adapter (neuron_adapter = none)".into(),
                    }));
            }
        }
    }
}

/// Returns a slice's unspent part to the coordinator.
pub fn give_back(ctx: &LinkContext, key_id: &str) {
    give_back_with(&ctx.link, &ctx.table, key_id);
}

pub fn give_back_with(link: &CoordinatorLink, table: &AllowanceTable, key_id: &str) {
    if let Some(amount) = table.take_available(key_id) {
        link.send(AgentMsg::GiveBack(pb::Return {
            key_id: key_id.to_string(),
            amount: Some(amount.to_pb()),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lookup_whose_answer_was_lost_is_asked_again_by_the_next_request() {
        let link = CoordinatorLink::default();
        let (tx, mut sent) = mpsc::channel(8);
        link.set_session(Some(tx));
        let hash = KeyHash([7; 32]);
        let lookups_sent = |sent: &mut mpsc::Receiver<pb::AgentMessage>| {
            let mut n = 0;
            while let Ok(message) = sent.try_recv() {
                n += usize::from(matches!(message.msg, Some(AgentMsg::KeyLookup(_))));
            }
            n
        };
        // No answer comes: the coordinator dropped it.
        assert!(link.lookup(hash, Duration::from_millis(5)).await.is_err());
        assert_eq!(lookups_sent(&mut sent), 1);
        // The next request for the key asks again rather than waiting on
        // the lost answer, and gets this one.
        let again = link.lookup(hash, Duration::from_secs(5));
        let answer = async {
            let asked = async {
                while lookups_sent(&mut sent) == 0 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(2), asked)
                .await
                .expect("the next lookup asks the coordinator again");
            link.resolve_lookup(hash, None);
        };
        let (result, ()) = tokio::join!(again, answer);
        assert!(matches!(result, Ok(None)), "{result:?}");
    }
}
