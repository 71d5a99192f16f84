//! A harness that drives agent messages through the real edge
//! (`wire::command`) and the real session jobs into a ledger, checking the
//! ledger's invariants after each one. Used by the property tests and by
//! the cargo-fuzz target `engine_messages` (feature `fuzzing`); never
//! compiled into the coordinator binary.
//!
//! Invariants checked after every message:
//! - nothing panics (the caller sees the panic);
//! - every spent, held and remaining amount is non-negative, and every
//!   slice holds non-negative amounts;
//! - only connected agents hold slices;
//! - with `within_caps` (sequences of asks and give-backs only, where no
//!   usage can exceed a reservation): spent + held ≤ cap for every limit.

use crate::engine::{Core, Effects, EngineSettings, SessionCounters};
use crate::lease::SessionId;
use crate::ledger::{KeyRecord, Ledger, LedgerConfig, Scope};
use allot::key::{KeyHash, Purpose};
use allot::limit::{Limit, Window};
use allot::pb;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::Unit;
use rust_decimal::Decimal;
use std::sync::Arc;

const NOW: i64 = 1_795_595_400_000;
/// The connected agents messages come from.
pub const AGENTS: [&str; 2] = ["a1", "a2"];
/// `k1`'s token, request and credit caps.
pub const CAP: i64 = 1_000;

/// A ledger with account `acme`, keys `k1` (caps of [`CAP`] in every
/// unit) and `k2` (the largest token cap Admin accepts), and both
/// [`AGENTS`] connected.
pub struct Harness {
    core: Core,
    sessions: Vec<SessionId>,
    /// Kept so that the outboxes stay open (messages are dropped unread).
    _receivers: Vec<tokio::sync::mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>>,
    step: i64,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut w = Vec::new();
        ledger
            .create_account("acme", "Acme", NOW, &mut w)
            .expect("a new account");
        for (i, key_id) in ["k1", "k2"].into_iter().enumerate() {
            ledger
                .create_key(
                    KeyRecord {
                        key_id: key_id.into(),
                        account_id: "acme".into(),
                        hash: KeyHash::of_secret(&format!("s{i}")),
                        purpose: Purpose::Realtime,
                        revoked: false,
                        allowed_models: vec![],
                        name: String::new(),
                        limits: vec![],
                        created_at_ms: NOW,
                    },
                    &mut w,
                )
                .expect("a new key");
        }
        let caps = [Unit::Tokens, Unit::Requests, Unit::Credits]
            .into_iter()
            .map(|unit| Limit {
                unit,
                amount: Decimal::from(CAP),
                window: Window::Balance,
            })
            .collect();
        ledger
            .set_limits(&Scope::Key("k1".into()), caps, NOW, &mut w)
            .expect("limits");
        // The largest cap Admin accepts: products of it and an ask must
        // stay inside Decimal's range.
        let largest = Limit {
            unit: Unit::Tokens,
            amount: Decimal::from(allot::bounds::MAX_AMOUNT),
            window: Window::Balance,
        };
        ledger
            .set_limits(&Scope::Key("k2".into()), vec![largest], NOW, &mut w)
            .expect("limits");
        ledger.flush(&mut w);
        let mut core = Core::new(ledger, EngineSettings::default());
        let mut sessions = Vec::new();
        let mut receivers = Vec::new();
        let mut fx = Effects::new(NOW);
        for agent in AGENTS {
            let (outbox, receiver) = tokio::sync::mpsc::channel(1);
            let (session, _) = core
                .connect(
                    &mut fx,
                    agent,
                    1,
                    "n",
                    outbox,
                    Arc::new(SessionCounters::default()),
                )
                .expect("hello");
            sessions.push(session);
            receivers.push(receiver);
        }
        core.ledger_mut().flush(&mut fx.writes);
        Harness {
            core,
            sessions,
            _receivers: receivers,
            step: 0,
        }
    }

    /// Handles one message from agent `agent % 2` as the engine would (a
    /// message the edge refuses ends the session: nothing reaches the
    /// ledger), then checks the invariants.
    pub fn step(&mut self, agent: usize, msg: AgentMsg, within_caps: bool) -> Result<(), String> {
        let agent = agent % AGENTS.len();
        self.step += 1;
        let Ok(command) = crate::wire::command(msg) else {
            return Ok(());
        };
        let mut fx = Effects::new(NOW + self.step);
        let job =
            crate::session::agent_job(AGENTS[agent].to_string(), self.sessions[agent], command);
        job(&mut self.core, &mut fx);
        self.core.ledger_mut().flush(&mut fx.writes);
        self.check(fx.now, within_caps)
    }

    /// Retries the parked asks as the engine's tick does, and checks again.
    pub fn finish(&mut self) -> Result<(), String> {
        let now = NOW + self.step + crate::lease::PARK_LIMIT.as_millis() as i64;
        let mut fx = Effects::new(now);
        self.core.retry_parked(&mut fx);
        self.core.ledger_mut().flush(&mut fx.writes);
        self.check(now, false)
    }

    fn check(&self, now: i64, within_caps: bool) -> Result<(), String> {
        for key_id in ["k1", "k2"] {
            let views = self
                .core
                .ledger()
                .limit_views(key_id, now)
                .map_err(|e| e.to_string())?;
            for view in views {
                if view.remaining < Decimal::ZERO
                    || view.held < Decimal::ZERO
                    || view.spent < Decimal::ZERO
                {
                    return Err(format!("step {}: a negative amount: {view:?}", self.step));
                }
                if within_caps && view.spent + view.held > view.limit.amount {
                    return Err(format!("step {}: over the cap: {view:?}", self.step));
                }
            }
            for holder in self.core.ledger().holders_of(key_id) {
                if !AGENTS.contains(&holder.as_str()) {
                    return Err(format!("an unknown agent {holder} holds {key_id}"));
                }
            }
        }
        for agent in AGENTS {
            for (key_id, held) in self.core.ledger().slices_of(agent) {
                if held.0.iter().flatten().any(|v| *v < Decimal::ZERO) {
                    return Err(format!(
                        "{agent} holds a negative slice of {key_id}: {held:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Proptest strategies for agent messages, with the values that break
/// naive arithmetic (u64::MAX, one past each bound, malformed decimals).
#[cfg(test)]
pub mod strategy {
    use super::*;
    use proptest::prelude::*;

    fn count() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![
            Just(None),
            (0u64..2_000).prop_map(Some),
            Just(Some(crate::wire::MAX_UNITS)),
            Just(Some(crate::wire::MAX_UNITS + 1)),
            Just(Some(u64::MAX)),
        ]
    }

    fn credits() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("1.5".to_string())),
            Just(Some("0".to_string())),
            Just(Some("-1".to_string())),
            Just(Some("1e9".to_string())),
            Just(Some("99999999999999999999999999999".to_string())),
            Just(Some("lots".to_string())),
        ]
    }

    fn amounts() -> impl Strategy<Value = Option<pb::Amounts>> {
        prop_oneof![
            1 => Just(None),
            6 => (count(), count(), credits()).prop_map(|(requests, tokens, credits)| Some(pb::Amounts {
                requests,
                tokens,
                credits,
            })),
        ]
    }

    fn key_id() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("k1".to_string()),
            Just("k2".to_string()),
            Just("nokey".to_string()),
            Just("bad id!".to_string()),
        ]
    }

    fn record() -> impl Strategy<Value = pb::UsageRecord> {
        (
            prop_oneof![Just(0u64), 1u64..12, Just(u64::MAX)],
            key_id(),
            prop_oneof![
                0u64..500,
                Just(crate::wire::MAX_RECORD_TOKENS + 1),
                Just(u64::MAX)
            ],
            prop_oneof![0u64..500, Just(u64::MAX)],
            prop_oneof![0i32..4, Just(99)],
            any::<bool>(),
            amounts(),
        )
            .prop_map(
                |(seq, key_id, prompt_tokens, completion_tokens, purpose, charged, reserved)| {
                    pb::UsageRecord {
                        seq,
                        key_id,
                        prompt_tokens,
                        completion_tokens,
                        purpose,
                        charged,
                        reserved,
                        model_requested: "m".into(),
                        ..Default::default()
                    }
                },
            )
    }

    /// Any agent message the engine handles; only asks and give-backs
    /// without `with_usage`.
    pub fn message(with_usage: bool) -> BoxedStrategy<AgentMsg> {
        let ask = (any::<u64>(), key_id(), amounts(), amounts()).prop_map(
            |(ask_id, key_id, need, want)| {
                AgentMsg::Ask(pb::AllowanceAsk {
                    ask_id,
                    key_id,
                    need,
                    want,
                })
            },
        );
        let give_back = (key_id(), amounts())
            .prop_map(|(key_id, amount)| AgentMsg::GiveBack(pb::Return { key_id, amount }));
        if !with_usage {
            return prop_oneof![3 => ask, 1 => give_back].boxed();
        }
        prop_oneof![
            3 => ask,
            1 => give_back,
            2 => prop::collection::vec(record(), 0..4)
                .prop_map(|records| AgentMsg::Usage(pb::UsageBatch { records })),
            1 => prop::collection::vec((key_id(), amounts()), 0..3).prop_map(|slices| {
                AgentMsg::Reconcile(pb::Reconcile {
                    slices: slices
                        .into_iter()
                        .map(|(key_id, held)| pb::SliceReport { key_id, held })
                        .collect(),
                })
            }),
            1 => prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|key_hash| AgentMsg::KeyLookup(pb::KeyLookup { key_hash })),
        ]
        .boxed()
    }
}
