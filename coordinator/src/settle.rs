//! Settlement: one agent's usage batch becomes charges in the ledger, an
//! acknowledgement (the agent's high-water mark), the records that need a
//! usage row, and depletion pushes to the agents of a key whose cap is now
//! spent.
//!
//! Exactly once: the ledger settles records in sequence order and moves
//! the agent's high-water mark in the same writes as the charges; a record
//! at or below the mark is a duplicate and charges nothing; a gap stops the
//! batch (the agent resends). The acknowledgement leaves only after the
//! engine committed those writes.
//!
//! Plain functions over plain data, like [`crate::lease`]: no I/O, no
//! protobuf, no waiting.

use crate::lease::{Leases, Now, Outgoing, Refused, SessionId, ToAgent};
use crate::ledger::{AppliedPrice, Ledger, SettleOutcome, Usage};
use crate::store::StoreWrite;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A key's depletion is pushed at most this often, however many records
/// deplete it.
pub const DEPLETION_PUSH_EVERY: Duration = Duration::from_secs(1);

/// When each key's depletion was last pushed. Bounded: entries older than
/// ten seconds are forgotten at every batch.
#[derive(Debug, Clone, Default)]
pub struct Depletions {
    pushed: HashMap<String, Instant>,
}

/// One record of the batch that was charged (or counted free).
#[derive(Debug, Clone, PartialEq)]
pub struct Charged {
    /// Its position in the batch.
    pub index: usize,
    pub price: Option<AppliedPrice>,
    pub cost: Decimal,
}

/// What a batch settled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settled {
    pub charged: Vec<Charged>,
    /// Records at or below the high-water mark: already settled.
    pub duplicates: usize,
    /// Charged records for a key the agent never held: not charged.
    pub not_held: usize,
    /// Records of an agent declared dead, charged late (they may take a cap
    /// past its amount: SPEC Settlement 5).
    pub late: usize,
    /// The agent's high-water mark after the batch (acknowledged).
    pub high_water_seq: u64,
}

/// Settles `usages` of `agent_id` (sent on `session`) at `now`: charges,
/// the acknowledgement, parked asks decided again (charges may have
/// released room), and depletion pushes.
#[allow(clippy::too_many_arguments)]
pub fn batch(
    ledger: &mut Ledger,
    leases: &mut Leases,
    depletions: &mut Depletions,
    agent_id: &str,
    session: SessionId,
    usages: &[Usage],
    now: Now,
    writes: &mut Vec<StoreWrite>,
    out: &mut Vec<Outgoing>,
) -> Settled {
    let mut settled = Settled::default();
    for (index, usage) in usages.iter().enumerate() {
        match ledger.settle(agent_id, usage, now.wall, writes) {
            SettleOutcome::Settled {
                cost,
                price,
                free,
                excess,
                late,
            } => {
                metrics::counter!("allot_usage_settled_total").increment(1);
                settled.charged.push(Charged { index, price, cost });
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
                    settled.late += 1;
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
                settled.duplicates += 1;
                metrics::counter!("allot_usage_duplicates_total").increment(1);
            }
            SettleOutcome::NotHeld => {
                settled.not_held += 1;
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
    settled.high_water_seq = ledger.agent(agent_id).map_or(0, |a| a.high_water_seq);
    out.push(Outgoing {
        agent_id: agent_id.to_string(),
        session: Some(session),
        message: ToAgent::UsageAck {
            high_water_seq: settled.high_water_seq,
        },
    });
    if leases.has_parked() {
        leases.retry_parked(ledger, now, out);
    }
    let mut keys: Vec<&str> = usages.iter().map(|u| u.key_id.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    depletions.push(ledger, leases, &keys, now, out);
    settled
}

impl Depletions {
    /// Tells every agent interested in a key of `keys` whose cap is now
    /// fully spent, at most once per [`DEPLETION_PUSH_EVERY`] per key:
    /// agents then refuse beyond their slice locally instead of asking.
    pub fn push(
        &mut self,
        ledger: &Ledger,
        leases: &Leases,
        keys: &[&str],
        now: Now,
        out: &mut Vec<Outgoing>,
    ) {
        for key_id in keys {
            if self
                .pushed
                .get(*key_id)
                .is_some_and(|at| now.mono.saturating_duration_since(*at) < DEPLETION_PUSH_EVERY)
            {
                continue;
            }
            let Ok(views) = ledger.limit_views(key_id, now.wall) else {
                continue;
            };
            let Some(spent) = views
                .iter()
                .find(|v| v.spent > Decimal::ZERO && v.spent >= v.limit.amount)
            else {
                continue;
            };
            let (reason, retry_after_ms) = if spent.limit.window.is_balance() {
                (Refused::InsufficientQuota, 0)
            } else {
                let at = spent.next_refill.unwrap_or(now.wall + 1000);
                (Refused::RateLimited, (at - now.wall).max(1) as u64)
            };
            let message = format!(
                "{} limit of {} is spent",
                spent.limit.unit.as_str(),
                spent.limit.amount
            );
            let mut agents: Vec<String> = leases
                .interested_in(ledger, key_id)
                .into_iter()
                .filter(|agent| leases.is_connected(agent))
                .collect();
            agents.sort();
            for agent_id in agents {
                out.push(Outgoing {
                    agent_id,
                    session: None,
                    message: ToAgent::Deny {
                        ask_id: 0,
                        key_id: key_id.to_string(),
                        reason,
                        retry_after_ms,
                        message: message.clone(),
                    },
                });
            }
            metrics::counter!("allot_depletion_pushes_total").increment(1);
            self.pushed.insert(key_id.to_string(), now.mono);
        }
        self.pushed
            .retain(|_, at| now.mono.saturating_duration_since(*at) < DEPLETION_PUSH_EVERY * 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Ask, LeaseSettings};
    use crate::ledger::{KeyRecord, LedgerConfig, Scope};
    use allot::key::{KeyHash, Purpose};
    use allot::limit::{Limit, Window};
    use allot::{Amounts, Unit};

    const WALL: allot::clock::UnixMs = 1_795_595_400_000;

    fn tokens(n: i64) -> Amounts {
        let mut amounts = Amounts::UNLIMITED;
        amounts.set(Unit::Tokens, Some(Decimal::from(n)));
        amounts
    }

    fn usage(seq: u64, used: u64) -> Usage {
        Usage {
            seq,
            key_id: "k".into(),
            model: "m".into(),
            purpose: Purpose::Realtime,
            completion_window: None,
            priced_at: WALL,
            prompt_tokens: used,
            completion_tokens: 0,
            charged: true,
            reserved: tokens(used as i64),
        }
    }

    /// Key `k` capped at 10 tokens; agent `a` connected on session 1
    /// holding all 10.
    fn holding() -> (Ledger, Leases, Now) {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut w = Vec::new();
        ledger.create_account("acme", "Acme", WALL, &mut w).unwrap();
        ledger
            .create_key(
                KeyRecord {
                    key_id: "k".into(),
                    account_id: "acme".into(),
                    hash: KeyHash::of_secret("s"),
                    purpose: Purpose::Realtime,
                    revoked: false,
                    allowed_models: vec![],
                    name: String::new(),
                    limits: vec![],
                    created_at_ms: WALL,
                },
                &mut w,
            )
            .unwrap();
        let cap = Limit {
            unit: Unit::Tokens,
            amount: Decimal::from(10),
            window: Window::Balance,
        };
        ledger
            .set_limits(&Scope::Key("k".into()), vec![cap], WALL, &mut w)
            .unwrap();
        let now = Now {
            wall: WALL,
            mono: Instant::now(),
        };
        let settings = LeaseSettings {
            lease_ttl: Duration::from_secs(30),
            dead_after: Duration::from_secs(120),
        };
        let mut leases = Leases::new(settings, &ledger, now.mono);
        leases
            .hello(
                &mut ledger,
                "a",
                1,
                "n",
                SessionId(1),
                &mut w,
                &mut Vec::new(),
            )
            .unwrap();
        leases.watch("k", "a");
        let ask = Ask {
            ask_id: 1,
            key_id: "k".into(),
            need: tokens(10),
            want: tokens(10),
        };
        leases.ask(&mut ledger, "a", SessionId(1), ask, now, &mut Vec::new());
        (ledger, leases, now)
    }

    fn acks(out: &[Outgoing]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o.message {
                ToAgent::UsageAck { high_water_seq } => Some(high_water_seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_resent_record_is_acknowledged_again_but_charged_once() {
        let (mut ledger, mut leases, now) = holding();
        let mut depletions = Depletions::default();
        let records = [usage(1, 3), usage(2, 3)];
        let mut out = Vec::new();
        let first = batch(
            &mut ledger,
            &mut leases,
            &mut depletions,
            "a",
            SessionId(1),
            &records,
            now,
            &mut Vec::new(),
            &mut out,
        );
        let again = batch(
            &mut ledger,
            &mut leases,
            &mut depletions,
            "a",
            SessionId(1),
            &records,
            now,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(first.charged.len(), 2);
        assert!(again.charged.is_empty());
        assert_eq!(again.duplicates, 2);
        assert_eq!(acks(&out), vec![2, 2]);
        let view = &ledger.limit_views("k", now.wall).unwrap()[0];
        assert_eq!(view.spent, Decimal::from(6));
    }

    #[test]
    fn a_gap_stops_the_batch_and_acknowledges_only_what_came_before() {
        let (mut ledger, mut leases, now) = holding();
        let mut out = Vec::new();
        let settled = batch(
            &mut ledger,
            &mut leases,
            &mut Depletions::default(),
            "a",
            SessionId(1),
            &[usage(1, 1), usage(3, 1)],
            now,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(settled.charged.len(), 1);
        assert_eq!(acks(&out), vec![1]);
    }

    #[test]
    fn a_key_spent_to_its_cap_is_pushed_to_its_agents_once_a_second() {
        let (mut ledger, mut leases, now) = holding();
        let mut depletions = Depletions::default();
        let mut out = Vec::new();
        batch(
            &mut ledger,
            &mut leases,
            &mut depletions,
            "a",
            SessionId(1),
            &[usage(1, 10)],
            now,
            &mut Vec::new(),
            &mut out,
        );
        let pushes = |out: &[Outgoing]| {
            out.iter()
                .filter(|o| {
                    matches!(
                        o.message,
                        ToAgent::Deny {
                            ask_id: 0,
                            reason: Refused::InsufficientQuota,
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(pushes(&out), 1, "{out:?}");
        let soon = Now {
            wall: now.wall + 10,
            mono: now.mono + Duration::from_millis(10),
        };
        batch(
            &mut ledger,
            &mut leases,
            &mut depletions,
            "a",
            SessionId(1),
            &[usage(2, 0)],
            soon,
            &mut Vec::new(),
            &mut out,
        );
        assert_eq!(pushes(&out), 1, "coalesced within a second");
    }
}
