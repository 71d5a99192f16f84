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
    // What deserves an operator's eye is logged once per batch and kind,
    // with a count and the first record: a peer that sends thousands of
    // such records a second costs the log a line per batch, not per record.
    let mut unbillable = Noted::default();
    let mut excess_usage = Noted::default();
    let mut late_usage = Noted::default();
    let mut not_held = Noted::default();
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
                    unbillable.note(usage);
                }
                if excess {
                    metrics::counter!("allot_usage_over_reservation_total").increment(1);
                    excess_usage.note(usage);
                }
                if late {
                    settled.late += 1;
                    metrics::counter!("allot_usage_late_total").increment(1);
                    late_usage.note(usage);
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
                not_held.note(usage);
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
    if let Some((seq, key_id)) = unbillable.first {
        tracing::error!(
            agent_id,
            records = unbillable.count,
            seq,
            key_id,
            "usage without a model cannot be billed"
        );
    }
    if let Some((seq, key_id)) = excess_usage.first {
        tracing::error!(
            agent_id,
            records = excess_usage.count,
            seq,
            key_id,
            "neuron reported more usage than was reserved; the excess is charged"
        );
    }
    if let Some((seq, key_id)) = late_usage.first {
        tracing::error!(
            agent_id,
            records = late_usage.count,
            seq,
            key_id,
            "late usage from an agent whose slice was released; charged"
        );
    }
    if let Some((seq, key_id)) = not_held.first {
        tracing::error!(
            agent_id,
            records = not_held.count,
            seq,
            key_id,
            "usage for a key this agent never held a slice of; not charged"
        );
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

/// Records of one kind in a batch: how many, and the first (seq, key).
#[derive(Default)]
struct Noted<'a> {
    count: usize,
    first: Option<(u64, &'a str)>,
}

impl<'a> Noted<'a> {
    fn note(&mut self, usage: &'a Usage) {
        self.count += 1;
        self.first.get_or_insert((usage.seq, &usage.key_id));
    }
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
    use crate::lease::tests::{tokens, Fleet, WALL};
    use allot::key::Purpose;

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

    /// Agent `a` holding all 10 tokens of `k`, and its settlements.
    struct Settling {
        fleet: Fleet,
        depletions: Depletions,
        out: Vec<Outgoing>,
    }

    impl Settling {
        fn new() -> Settling {
            let mut fleet = Fleet::new();
            fleet.ask("a", 10, 0);
            Settling {
                fleet,
                depletions: Depletions::default(),
                out: Vec::new(),
            }
        }

        fn batch(&mut self, records: &[Usage], ms: u64) -> Settled {
            let now = self.fleet.at(ms);
            batch(
                &mut self.fleet.ledger,
                &mut self.fleet.leases,
                &mut self.depletions,
                "a",
                SessionId(1),
                records,
                now,
                &mut Vec::new(),
                &mut self.out,
            )
        }

        fn acks(&self) -> Vec<u64> {
            self.out
                .iter()
                .filter_map(|o| match o.message {
                    ToAgent::UsageAck { high_water_seq } => Some(high_water_seq),
                    _ => None,
                })
                .collect()
        }

        fn depletion_pushes(&self) -> usize {
            self.out
                .iter()
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
        }
    }

    #[test]
    fn a_resent_record_is_acknowledged_again_but_charged_once() {
        let mut settling = Settling::new();
        let records = [usage(1, 3), usage(2, 3)];
        let first = settling.batch(&records, 0);
        let again = settling.batch(&records, 0);
        assert_eq!(first.charged.len(), 2);
        assert!(again.charged.is_empty());
        assert_eq!(again.duplicates, 2);
        assert_eq!(settling.acks(), vec![2, 2]);
        let view = &settling.fleet.ledger.limit_views("k", WALL).unwrap()[0];
        assert_eq!(view.spent, Decimal::from(6));
    }

    #[test]
    fn a_gap_stops_the_batch_and_acknowledges_only_what_came_before() {
        let mut settling = Settling::new();
        let settled = settling.batch(&[usage(1, 1), usage(3, 1)], 0);
        assert_eq!(settled.charged.len(), 1);
        assert_eq!(settling.acks(), vec![1]);
    }

    #[test]
    fn a_key_spent_to_its_cap_is_pushed_to_its_agents_once_a_second() {
        let mut settling = Settling::new();
        settling.batch(&[usage(1, 10)], 0);
        // To both agents that looked the key up.
        assert_eq!(settling.depletion_pushes(), 2, "{:?}", settling.out);
        settling.batch(&[usage(2, 0)], 10);
        assert_eq!(settling.depletion_pushes(), 2, "coalesced within a second");
        settling.batch(&[usage(3, 0)], 1_000);
        assert_eq!(
            settling.depletion_pushes(),
            4,
            "pushed again after a second"
        );
    }

    /// Log lines written while `f` runs, captured.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_batch_of_suspect_records_is_one_log_line_per_kind_not_one_per_record() {
        let mut settling = Settling::new();
        // A hostile or broken peer's flood: 300 records each over its
        // (zero) reservation, then 200 for a key the agent never held.
        let records: Vec<Usage> = (1..=300)
            .map(|seq| Usage {
                reserved: tokens(0),
                ..usage(seq, 1)
            })
            .chain((301..=500).map(|seq| Usage {
                key_id: "never-held".into(),
                ..usage(seq, 1)
            }))
            .collect();
        let log = logged(|| {
            let settled = settling.batch(&records, 0);
            assert_eq!((settled.charged.len(), settled.not_held), (300, 200));
        });
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(
            lines[0].contains("more usage than was reserved")
                && lines[0].contains("records=300")
                && lines[0].contains("seq=1 "),
            "{log}"
        );
        assert!(
            lines[1].contains("never held")
                && lines[1].contains("records=200")
                && lines[1].contains("seq=301 "),
            "{log}"
        );
    }
}
