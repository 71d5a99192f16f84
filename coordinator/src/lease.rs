//! Leases: who is connected, who may ask for which key, and how an
//! allowance ask is decided: granted, parked while other agents' idle
//! slices are reclaimed, or denied. Also the agents that went silent for
//! too long (declared dead, their slices released).
//!
//! Plain functions over plain data: they take the [`Ledger`], the agent and
//! a time ([`Now`]) and push what to send as [`Outgoing`] domain values.
//! This module never does I/O, never sees a protobuf type and never waits:
//! the engine commits the ledger's writes and `wire` turns the messages
//! into `CoordinatorMessage`s.
//!
//! An ask, from the coordinator's side:
//! ```text
//!             ask
//!              │
//!        may_ask? ──no──▶ Deny(UnknownKey)
//!              │yes
//!        ledger.ask ──ok──▶ Grant (ttl)
//!              │refused
//!   reclaim empty? ──yes──▶ Deny(reason of the ledger)
//!              │no
//!   parked < PARK_LIMIT? ──no──▶ Deny(HeldElsewhere, retry 1 s)
//!              │yes
//!   Revoke each holder (once per REVOKE_RESEND), park
//!              │ a give-back, a settlement or the 50 ms tick
//!              └──────────▶ decided again (retry_parked)
//! ```

use crate::ledger::{DenyReason, GrantDecision, Ledger, LedgerError, LimitView, Welcome};
use crate::store::StoreWrite;
use allot::clock::UnixMs;
use allot::Amounts;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long an ask waits for reclaimed slices. A holder that has not given
/// its slice back by then is slow or cut off: the ask is refused as
/// temporarily unavailable (never as an exhausted cap, which it is not).
pub const PARK_LIMIT: Duration = Duration::from_secs(2);

/// A holder still holding a reclaimable slice this long after a Revoke is
/// sent another (the first may have crossed a fresh grant to it).
pub const REVOKE_RESEND: Duration = Duration::from_millis(300);

/// Most asks parked at once; a further ask that would park is refused as
/// held elsewhere (the agent retries after a second).
pub const MAX_PARKED: usize = 65_536;

/// The time of a decision: the wall clock the ledger's windows and records
/// use, and the monotonic clock of the coordinator's own timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: UnixMs,
    pub mono: Instant,
}

/// One session of an agent: a newer session of the same agent replaces
/// it, and what was addressed to the old one is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// An allowance ask, checked (by `wire`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub ask_id: u64,
    pub key_id: String,
    /// What the waiting request lacks (zero when the agent asks ahead).
    pub need: Amounts,
    /// What the agent would like to hold.
    pub want: Amounts,
}

/// Why an ask is refused, as the agent is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    InsufficientQuota,
    RateLimited,
    KeyRevoked,
    UnknownKey,
    /// The cap has room but other agents hold it and did not give it back
    /// within [`PARK_LIMIT`].
    HeldElsewhere,
}

impl From<DenyReason> for Refused {
    fn from(reason: DenyReason) -> Refused {
        match reason {
            DenyReason::InsufficientQuota => Refused::InsufficientQuota,
            DenyReason::RateLimited => Refused::RateLimited,
            DenyReason::KeyRevoked => Refused::KeyRevoked,
            DenyReason::UnknownKey => Refused::UnknownKey,
        }
    }
}

/// A message to an agent, as a domain value (`wire` makes it protobuf).
#[derive(Debug, Clone, PartialEq)]
pub enum ToAgent {
    Welcome {
        high_water_seq: u64,
        lease_ttl: Duration,
    },
    Grant {
        ask_id: u64,
        key_id: String,
        amount: Amounts,
        ttl: Duration,
        /// Each limit over the key, at `at`.
        limits: Vec<LimitView>,
        at: UnixMs,
    },
    /// `ask_id` 0: a push (a depleted key), not the answer to an ask.
    Deny {
        ask_id: u64,
        key_id: String,
        reason: Refused,
        retry_after_ms: u64,
        message: String,
    },
    Revoke {
        key_id: String,
        reason: &'static str,
    },
    UsageAck {
        high_water_seq: u64,
    },
    /// The answer to a key lookup by the secret's hash: the key, if any.
    KeyLookup {
        key_hash: Vec<u8>,
        key: Option<crate::ledger::KeyRecord>,
    },
}

/// A message and who it is for: the agent's session `session` (dropped if
/// that session was replaced), or whichever session the agent has.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub agent_id: String,
    pub session: Option<SessionId>,
    pub message: ToAgent,
}

/// An ask waiting for other agents to give back revoked slices.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedAsk {
    pub agent_id: String,
    pub session: SessionId,
    pub ask: Ask,
    pub since: Instant,
}

/// Lease settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The time-to-live of every grant, counted by the agent from receipt.
    pub lease_ttl: Duration,
    /// An agent disconnected this long is declared dead.
    pub dead_after: Duration,
}

/// The coordinator's lease state beside the ledger. Bounds: one entry per
/// known agent in `sessions`/`disconnected`, at most [`MAX_PARKED`] parked
/// asks, `revoked_at` forgets entries after `2 × PARK_LIMIT`, `watchers`
/// holds at most one entry per (key, agent that looked it up).
#[derive(Debug, Clone)]
pub struct Leases {
    settings: LeaseSettings,
    /// Connected agents: their session and its epoch.
    sessions: HashMap<String, (SessionId, u64)>,
    /// Agents known but not connected, since when.
    disconnected: HashMap<String, Instant>,
    /// Asks waiting for reclaimed slices.
    parked: Vec<ParkedAsk>,
    /// When each `(agent, key)` slice was last revoked, so a storm of asks
    /// revokes it once.
    revoked_at: HashMap<(String, String), Instant>,
    /// Agents that looked a key up, to push changes of that key to.
    watchers: HashMap<String, HashSet<String>>,
}

impl Leases {
    /// The lease state of a freshly loaded ledger: every agent it knows is
    /// disconnected from `now` on.
    pub fn new(settings: LeaseSettings, ledger: &Ledger, now: Instant) -> Leases {
        Leases {
            settings,
            sessions: HashMap::new(),
            disconnected: ledger.agents().map(|a| (a.agent_id.clone(), now)).collect(),
            parked: Vec::new(),
            revoked_at: HashMap::new(),
            watchers: HashMap::new(),
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// An agent's Hello on `session`: refused when a newer epoch of the
    /// agent is connected or the ledger refuses the epoch; otherwise the
    /// session replaces any older one of the agent.
    #[allow(clippy::too_many_arguments)]
    pub fn hello(
        &mut self,
        ledger: &mut Ledger,
        agent_id: &str,
        epoch: u64,
        neuron_id: &str,
        session: SessionId,
        writes: &mut Vec<StoreWrite>,
        out: &mut Vec<Outgoing>,
    ) -> Result<Welcome, LedgerError> {
        if let Some((_, connected_epoch)) = self.sessions.get(agent_id) {
            if *connected_epoch > epoch {
                return Err(LedgerError::FailedPrecondition(
                    "a newer epoch of this agent is connected".into(),
                ));
            }
        }
        let welcome = ledger.hello(agent_id, epoch, neuron_id, writes)?;
        self.sessions.insert(agent_id.to_string(), (session, epoch));
        self.disconnected.remove(agent_id);
        out.push(Outgoing {
            agent_id: agent_id.to_string(),
            session: Some(session),
            message: ToAgent::Welcome {
                high_water_seq: welcome.high_water_seq,
                lease_ttl: self.settings.lease_ttl,
            },
        });
        Ok(welcome)
    }

    /// The session ended; `false` when it was not the agent's current one
    /// (a newer session replaced it).
    pub fn disconnect(&mut self, agent_id: &str, session: SessionId, now: Now) -> bool {
        if !self.is_current(agent_id, session) {
            return false;
        }
        self.sessions.remove(agent_id);
        self.disconnected.insert(agent_id.to_string(), now.mono);
        true
    }

    /// Every session ends (the ledger was reloaded): each agent's Hello on
    /// reconnect is the truth for its slices. Returns the agents.
    pub fn disconnect_all(&mut self, now: Now) -> Vec<String> {
        let agents: Vec<String> = self.sessions.drain().map(|(agent, _)| agent).collect();
        for agent in &agents {
            self.disconnected.insert(agent.clone(), now.mono);
        }
        self.parked.clear();
        agents
    }

    /// Whether `session` is the agent's current session.
    pub fn is_current(&self, agent_id: &str, session: SessionId) -> bool {
        self.sessions
            .get(agent_id)
            .is_some_and(|(current, _)| *current == session)
    }

    /// The agent's current session.
    pub fn session_of(&self, agent_id: &str) -> Option<SessionId> {
        self.sessions.get(agent_id).map(|(session, _)| *session)
    }

    /// Connected agents.
    pub fn connected(&self) -> impl Iterator<Item = &String> {
        self.sessions.keys()
    }

    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.sessions.contains_key(agent_id)
    }

    /// Asks waiting for reclaimed slices.
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    pub fn parked(&self) -> &[ParkedAsk] {
        &self.parked
    }

    /// A canonical print of the timers and watchers (sorted; sessions and
    /// parked asks have their own accessors), for the model check's
    /// fingerprints of states.
    pub fn fingerprint(&self) -> String {
        let mut disconnected: Vec<_> = self.disconnected.iter().collect();
        disconnected.sort();
        let mut revoked: Vec<_> = self.revoked_at.iter().collect();
        revoked.sort();
        let mut watchers: Vec<(&String, Vec<&String>)> = self
            .watchers
            .iter()
            .map(|(key, agents)| {
                let mut agents: Vec<&String> = agents.iter().collect();
                agents.sort();
                (key, agents)
            })
            .collect();
        watchers.sort();
        format!("{disconnected:?}{revoked:?}{watchers:?}")
    }

    /// `agent_id` looked `key_id` up by its secret's hash: it may ask for
    /// it, and hears of its changes.
    pub fn watch(&mut self, key_id: &str, agent_id: &str) {
        self.watchers
            .entry(key_id.to_string())
            .or_default()
            .insert(agent_id.to_string());
    }

    /// Every agent that should hear about a change of `key_id`: those that
    /// looked it up and those holding a slice of it.
    pub fn interested_in(&self, ledger: &Ledger, key_id: &str) -> HashSet<String> {
        let mut agents: HashSet<String> = self.watchers.get(key_id).cloned().unwrap_or_default();
        agents.extend(ledger.holders_of(key_id));
        agents
    }

    /// Whether `agent_id` may ask for a slice of `key_id`: it looked the key
    /// up by its secret's hash on this leader, or holds or held a slice of it
    /// within the key history's retention.
    pub fn may_ask(&self, ledger: &Ledger, agent_id: &str, key_id: &str, now: UnixMs) -> bool {
        self.watchers
            .get(key_id)
            .is_some_and(|agents| agents.contains(agent_id))
            || ledger.has_held(agent_id, key_id, now)
    }

    /// Decides a fresh ask of `agent_id` on `session`.
    pub fn ask(
        &mut self,
        ledger: &mut Ledger,
        agent_id: &str,
        session: SessionId,
        ask: Ask,
        now: Now,
        out: &mut Vec<Outgoing>,
    ) {
        metrics::counter!("allot_allowance_asks_total").increment(1);
        self.decide(ledger, agent_id, session, ask, None, now, out);
    }

    /// The agent gives back part of its slice; parked asks may fit now.
    pub fn give_back(
        &mut self,
        ledger: &mut Ledger,
        agent_id: &str,
        key_id: &str,
        amount: &Amounts,
        now: Now,
        out: &mut Vec<Outgoing>,
    ) {
        ledger.give_back(agent_id, key_id, amount);
        metrics::counter!("allot_allowance_returns_total").increment(1);
        self.retry_parked(ledger, now, out);
    }

    /// Decides the asks waiting for reclaimed slices again; those that
    /// waited past [`PARK_LIMIT`] are decided without further reclaim.
    pub fn retry_parked(&mut self, ledger: &mut Ledger, now: Now, out: &mut Vec<Outgoing>) {
        for parked in std::mem::take(&mut self.parked) {
            if !self.is_current(&parked.agent_id, parked.session) {
                continue;
            }
            self.decide(
                ledger,
                &parked.agent_id,
                parked.session,
                parked.ask,
                Some(parked.since),
                now,
                out,
            );
        }
    }

    /// Agents disconnected for at least `dead_after` at `now`.
    pub fn dead_agents(&self, now: Now) -> Vec<String> {
        let mut dead: Vec<String> = self
            .disconnected
            .iter()
            .filter(|(_, since)| {
                now.mono.saturating_duration_since(**since) >= self.settings.dead_after
            })
            .map(|(agent, _)| agent.clone())
            .collect();
        dead.sort();
        dead
    }

    /// Declares `agent_id` dead unless it reconnected: its slices are
    /// released. Returns how many slices were released.
    pub fn declare_dead(&mut self, ledger: &mut Ledger, agent_id: &str) -> usize {
        self.disconnected.remove(agent_id);
        if self.sessions.contains_key(agent_id) {
            return 0;
        }
        let released = ledger.release_agent(agent_id);
        if released > 0 {
            tracing::warn!(
                agent_id,
                slices = released,
                "agent declared dead; its slices are released"
            );
            metrics::counter!("allot_agents_declared_dead_total").increment(1);
        }
        released
    }

    /// `parked_since`: when this ask was first parked (None: a fresh ask).
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        ledger: &mut Ledger,
        agent_id: &str,
        session: SessionId,
        ask: Ask,
        parked_since: Option<Instant>,
        now: Now,
        out: &mut Vec<Outgoing>,
    ) {
        let _span = tracing::info_span!("grant", agent_id, key_id = ask.key_id.as_str()).entered();
        let reply = |message: ToAgent| Outgoing {
            agent_id: agent_id.to_string(),
            session: Some(session),
            message,
        };
        if !self.may_ask(ledger, agent_id, &ask.key_id, now.wall) {
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
            out.push(reply(deny(ask, Refused::UnknownKey, 0, message)));
            return;
        }
        match ledger.ask(agent_id, &ask.key_id, &ask.need, &ask.want, now.wall) {
            Ok(GrantDecision { amount, limits }) => {
                metrics::counter!("allot_allowance_grants_total").increment(1);
                // A slice granted after a Revoke may be reclaimed again at once.
                self.revoked_at
                    .remove(&(agent_id.to_string(), ask.key_id.clone()));
                out.push(reply(ToAgent::Grant {
                    ask_id: ask.ask_id,
                    key_id: ask.key_id,
                    amount,
                    ttl: self.settings.lease_ttl,
                    limits,
                    at: now.wall,
                }));
            }
            Err(refusal)
                if !refusal.reclaim.is_empty()
                    && parked_since
                        .is_none_or(|at| now.mono.saturating_duration_since(at) < PARK_LIMIT)
                    && (parked_since.is_some() || self.parked.len() < MAX_PARKED) =>
            {
                // The cap has room, but other agents hold it: take their idle
                // slices back before refusing anyone.
                tracing::debug!(
                    agent_id,
                    key_id = ask.key_id,
                    holders = refusal.reclaim.len(),
                    "ask parked; reclaiming slices"
                );
                for (holder, key_id) in refusal.reclaim {
                    let recently = self
                        .revoked_at
                        .get(&(holder.clone(), key_id.clone()))
                        .is_some_and(|at| now.mono.saturating_duration_since(*at) < REVOKE_RESEND);
                    if recently {
                        continue;
                    }
                    if let Some((holder_session, _)) = self.sessions.get(&holder) {
                        out.push(Outgoing {
                            agent_id: holder.clone(),
                            session: Some(*holder_session),
                            message: ToAgent::Revoke {
                                key_id: key_id.clone(),
                                reason: "reclaim",
                            },
                        });
                        metrics::counter!("allot_allowance_revokes_total").increment(1);
                    }
                    self.revoked_at.insert((holder, key_id), now.mono);
                }
                self.revoked_at
                    .retain(|_, at| now.mono.saturating_duration_since(*at) < PARK_LIMIT * 2);
                self.parked.push(ParkedAsk {
                    agent_id: agent_id.to_string(),
                    session,
                    ask,
                    since: parked_since.unwrap_or(now.mono),
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
                out.push(reply(deny(
                    ask,
                    Refused::HeldElsewhere,
                    1_000,
                    "the budget is held by other agents that have not returned it yet".into(),
                )));
            }
            Err(refusal) => {
                tracing::debug!(
                    agent_id,
                    key_id = ask.key_id,
                    need = ?ask.need,
                    parked = parked_since.is_some(),
                    message = refusal.message,
                    "ask refused"
                );
                let retry_after_ms = refusal
                    .retry_at
                    .map(|at| (at - now.wall).max(1) as u64)
                    .unwrap_or(0);
                out.push(reply(deny(
                    ask,
                    refusal.reason.into(),
                    retry_after_ms,
                    refusal.message,
                )));
            }
        }
    }
}

/// The refusal of `ask`, counted by reason.
fn deny(ask: Ask, reason: Refused, retry_after_ms: u64, message: String) -> ToAgent {
    metrics::counter!("allot_allowance_denies_total", "reason" => reason.as_str()).increment(1);
    ToAgent::Deny {
        ask_id: ask.ask_id,
        key_id: ask.key_id,
        reason,
        retry_after_ms,
        message,
    }
}

impl Refused {
    /// The reason's name, as the wire and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::InsufficientQuota => "DENY_REASON_INSUFFICIENT_QUOTA",
            Refused::RateLimited => "DENY_REASON_RATE_LIMITED",
            Refused::KeyRevoked => "DENY_REASON_KEY_REVOKED",
            Refused::UnknownKey => "DENY_REASON_UNKNOWN_KEY",
            Refused::HeldElsewhere => "DENY_REASON_HELD_ELSEWHERE",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ledger::{KeyRecord, LedgerConfig, Scope};
    use allot::key::{KeyHash, Purpose};
    use allot::limit::{Limit, Window};
    use allot::Unit;
    use rust_decimal::Decimal;

    pub(crate) const WALL: UnixMs = 1_795_595_400_000;

    pub(crate) fn tokens(n: i64) -> Amounts {
        let mut amounts = Amounts::UNLIMITED;
        amounts.set(Unit::Tokens, Some(Decimal::from(n)));
        amounts
    }

    /// Key `k` capped at 10 tokens; agents `a` (session 1) and `b`
    /// (session 2) connected, both having looked `k` up.
    pub(crate) struct Fleet {
        pub ledger: Ledger,
        pub leases: Leases,
        pub start: Instant,
    }

    impl Fleet {
        pub fn new() -> Fleet {
            let mut ledger = Ledger::new(LedgerConfig::default());
            let mut w = Vec::new();
            ledger.create_account("acme", "Acme", WALL, &mut w).unwrap();
            let key = KeyRecord {
                key_id: "k".into(),
                account_id: "acme".into(),
                hash: KeyHash::of_secret("s"),
                purpose: Purpose::Realtime,
                revoked: false,
                allowed_models: vec![],
                name: String::new(),
                limits: vec![],
                created_at_ms: WALL,
            };
            ledger.create_key(key, &mut w).unwrap();
            let cap = Limit {
                unit: Unit::Tokens,
                amount: Decimal::from(10),
                window: Window::Balance,
            };
            ledger
                .set_limits(&Scope::Key("k".into()), vec![cap], WALL, &mut w)
                .unwrap();
            let start = Instant::now();
            let settings = LeaseSettings {
                lease_ttl: Duration::from_secs(30),
                dead_after: Duration::from_secs(120),
            };
            let leases = Leases::new(settings, &ledger, start);
            let mut fleet = Fleet {
                ledger,
                leases,
                start,
            };
            fleet.hello("a", 1, 1).unwrap();
            fleet.hello("b", 1, 2).unwrap();
            fleet
        }

        pub fn at(&self, ms: u64) -> Now {
            Now {
                wall: WALL + ms as i64,
                mono: self.start + Duration::from_millis(ms),
            }
        }

        pub fn hello(
            &mut self,
            agent: &str,
            epoch: u64,
            session: u64,
        ) -> Result<Welcome, LedgerError> {
            let welcome = self.leases.hello(
                &mut self.ledger,
                agent,
                epoch,
                "n",
                SessionId(session),
                &mut Vec::new(),
                &mut Vec::new(),
            )?;
            self.leases.watch("k", agent);
            Ok(welcome)
        }

        /// `agent` asks on its first session (`a` 1, `b` 2) for `need`
        /// tokens of `key_id` at `ms`.
        pub fn ask_for(&mut self, agent: &str, key_id: &str, need: i64, ms: u64) -> Vec<Outgoing> {
            let session = SessionId(if agent == "a" { 1 } else { 2 });
            let ask = Ask {
                ask_id: 7,
                key_id: key_id.into(),
                need: tokens(need),
                want: tokens(need),
            };
            let mut out = Vec::new();
            let now = self.at(ms);
            self.leases
                .ask(&mut self.ledger, agent, session, ask, now, &mut out);
            out
        }

        pub fn ask(&mut self, agent: &str, need: i64, ms: u64) -> Vec<Outgoing> {
            self.ask_for(agent, "k", need, ms)
        }

        pub fn retry(&mut self, ms: u64) -> Vec<Outgoing> {
            let mut out = Vec::new();
            let now = self.at(ms);
            self.leases.retry_parked(&mut self.ledger, now, &mut out);
            out
        }

        pub fn give_back(&mut self, agent: &str, amount: i64, ms: u64) -> Vec<Outgoing> {
            let mut out = Vec::new();
            let now = self.at(ms);
            self.leases
                .give_back(&mut self.ledger, agent, "k", &tokens(amount), now, &mut out);
            out
        }

        /// `a` holds the whole cap; `b` asks for 4 at 0 ms and is parked.
        pub fn b_parked_behind_a() -> Fleet {
            let mut fleet = Fleet::new();
            let granted = fleet.ask("a", 10, 0);
            assert!(
                matches!(granted[0].message, ToAgent::Grant { .. }),
                "{granted:?}"
            );
            fleet.ask("b", 4, 0);
            assert_eq!(fleet.leases.parked().len(), 1);
            fleet
        }
    }

    fn revokes(out: &[Outgoing]) -> usize {
        out.iter()
            .filter(|o| matches!(o.message, ToAgent::Revoke { .. }))
            .count()
    }

    #[test]
    fn an_ask_for_a_key_never_looked_up_nor_held_is_denied_unknown_key() {
        let mut fleet = Fleet::new();
        let out = fleet.ask_for("a", "other", 1, 0);
        assert!(matches!(
            &out[..],
            [Outgoing {
                message: ToAgent::Deny {
                    reason: Refused::UnknownKey,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn an_ask_others_hold_the_room_for_is_parked_and_their_slices_revoked() {
        let mut fleet = Fleet::new();
        fleet.ask("a", 10, 0);
        let out = fleet.ask("b", 4, 10);
        assert_eq!(
            out,
            vec![Outgoing {
                agent_id: "a".into(),
                session: Some(SessionId(1)),
                message: ToAgent::Revoke {
                    key_id: "k".into(),
                    reason: "reclaim"
                },
            }]
        );
        assert_eq!(fleet.leases.parked().len(), 1);
        // The holder gives its slice back: the parked ask is granted.
        let out = fleet.give_back("a", 10, 20);
        assert!(matches!(
            &out[..],
            [Outgoing { agent_id, message: ToAgent::Grant { .. }, .. }] if agent_id == "b"
        ));
        assert!(!fleet.leases.has_parked());
    }

    #[test]
    fn a_revoke_is_sent_again_only_after_revoke_resend() {
        let mut fleet = Fleet::b_parked_behind_a();
        assert_eq!(revokes(&fleet.retry(100)), 0);
        let resend = 100 + REVOKE_RESEND.as_millis() as u64;
        assert_eq!(revokes(&fleet.retry(resend)), 1);
    }

    #[test]
    fn an_ask_parked_past_park_limit_is_denied_held_elsewhere_not_insufficient_quota() {
        let mut fleet = Fleet::b_parked_behind_a();
        let out = fleet.retry(PARK_LIMIT.as_millis() as u64);
        assert!(matches!(
            &out[..],
            [Outgoing {
                message: ToAgent::Deny {
                    reason: Refused::HeldElsewhere,
                    retry_after_ms: 1_000,
                    ..
                },
                ..
            }]
        ));
        assert!(!fleet.leases.has_parked());
    }

    #[test]
    fn a_parked_ask_of_a_replaced_session_is_dropped() {
        let mut fleet = Fleet::b_parked_behind_a();
        fleet.hello("b", 1, 3).unwrap();
        let out = fleet.give_back("a", 10, 10);
        assert!(out.is_empty(), "{out:?}");
        assert!(!fleet.leases.has_parked());
    }

    #[test]
    fn an_agent_disconnected_for_dead_after_is_declared_dead_and_its_slices_released() {
        let mut fleet = Fleet::new();
        fleet.ask("a", 10, 0);
        assert!(fleet.leases.disconnect("a", SessionId(1), fleet.at(0)));
        assert!(fleet.leases.dead_agents(fleet.at(119_999)).is_empty());
        assert_eq!(
            fleet.leases.dead_agents(fleet.at(120_000)),
            vec!["a".to_string()]
        );
        assert_eq!(fleet.leases.declare_dead(&mut fleet.ledger, "a"), 1);
        assert_eq!(fleet.ledger.slices_of("a").count(), 0);
    }

    #[test]
    fn a_hello_older_than_the_connected_epoch_is_refused() {
        let mut fleet = Fleet::new();
        fleet.hello("a", 2, 9).unwrap();
        assert!(fleet.hello("a", 1, 10).is_err());
        assert!(fleet.leases.is_current("a", SessionId(9)));
    }
}
