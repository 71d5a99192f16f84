//! Settlement: pricing a usage record with the tariff in force at its
//! admission, charging it exactly once (in sequence order per agent: a
//! duplicate is acknowledged, a gap is refused), flushing changed counters
//! and marks as writes, and the cap invariant check (`overspent`).

use super::*;

/// A usage record, validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub seq: u64,
    pub key_id: String,
    pub model: String,
    pub purpose: Purpose,
    pub completion_window: Option<String>,
    /// Tariffs in force at this time price it: the admission time, or a
    /// batch request's creation time (SPEC Pricing 1).
    pub priced_at: UnixMs,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The request reached a neuron and produced output: it counts as a
    /// request. A request that failed before any output costs nothing.
    pub charged: bool,
    /// What admission reserved for it.
    pub reserved: Amounts,
}

/// The tariff that priced a settled record, as its usage row shows it:
/// plain values, so settling copies nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedPrice {
    pub input_price: Decimal,
    pub output_price: Decimal,
    pub purpose: Purpose,
    /// The tariff of the record's own completion window (the tariff rules
    /// take a windowed tariff only when the window matches exactly).
    pub windowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled {
        cost: Decimal,
        /// The tariff that priced it (none: free, or not charged).
        price: Option<AppliedPrice>,
        free: bool,
        /// Usage beyond what the slice held (over-reporting neuron).
        excess: bool,
        /// The agent's slice was gone (agent declared dead): late usage.
        late: bool,
    },
    Duplicate,
    /// Charged usage for a key this agent never held a slice of (or not
    /// within the key history's retention): nothing is charged, and the
    /// high-water mark moves past it like a settled record.
    NotHeld,
    /// A record is missing before this one; nothing settled.
    Gap {
        expected: u64,
    },
}

impl Ledger {
    /// Prices a record with the tariff in force at its admission time.
    pub fn price(&self, usage: &Usage) -> Price<'_> {
        self.tariffs.choose(
            &usage.model,
            usage.purpose,
            usage.completion_window.as_deref(),
            usage.priced_at,
        )
    }

    /// Settles one usage record exactly once, out of the agent's slice
    /// for its key (which holds the record's usage: as a reservation in
    /// flight, or as reported at reconcile).
    pub fn settle(
        &mut self,
        agent_id: &str,
        usage: &Usage,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> SettleOutcome {
        let Some(agent) = self.agents.get(agent_id) else {
            return SettleOutcome::Gap { expected: 1 };
        };
        if usage.seq <= agent.high_water_seq {
            return SettleOutcome::Duplicate;
        }
        if usage.seq != agent.high_water_seq + 1 {
            return SettleOutcome::Gap {
                expected: agent.high_water_seq + 1,
            };
        }
        // Charged usage counts only for a key this agent holds or held a
        // slice of: an agent cannot charge someone else's key. The record
        // still moves the high-water mark, or it would block the stream.
        // One lookup on the hot path: a fresh entry needs no other check
        // and no write.
        let fresh = usage.charged
            && self
                .held
                .get(agent_id)
                .and_then(|h| h.get(&usage.key_id))
                .is_some_and(|at| {
                    *at != HELD_AT_UNKNOWN
                        && now.saturating_sub(*at) < self.config.key_history_refresh_ms
                });
        if usage.charged && !fresh && !self.has_held(agent_id, &usage.key_id, now) {
            let agent = self.agents.get_mut(agent_id).expect("checked above");
            agent.high_water_seq = usage.seq;
            self.dirty.insert(Dirty::Agent(agent_id.to_string()));
            return SettleOutcome::NotHeld;
        }
        // A record that was not charged (a refusal, a request that failed
        // before any output) is not priced.
        let (cost, free, applied) = match (usage.charged, self.price(usage)) {
            (false, _) => (Decimal::ZERO, false, None),
            (true, Price::Tariff(t)) => (
                t.cost(usage.prompt_tokens, usage.completion_tokens),
                false,
                Some(AppliedPrice {
                    input_price: t.input_price,
                    output_price: t.output_price,
                    purpose: t.purpose,
                    windowed: t.completion_window.is_some(),
                }),
            ),
            (true, Price::Free) => (Decimal::ZERO, true, None),
        };
        let actual = if usage.charged {
            Amounts::request(usage.prompt_tokens + usage.completion_tokens, cost)
        } else {
            Amounts::zero()
        };
        let excess = Unit::ALL
            .iter()
            .any(|u| usage.reserved.get(*u).is_some_and(|r| actual.value(*u) > r));
        let mut late = false;
        // A record that costs nothing (a refusal, a request that failed
        // before any output) changes no counter and no slice: it only
        // moves the agent's high-water mark.
        let account_id = match usage.charged {
            true => self.keys.get(&usage.key_id).map(|k| k.account_id.clone()),
            false => None,
        };
        if let Some(account_id) = account_id {
            for scope in [Scope::Key(usage.key_id.clone()), Scope::Account(account_id)] {
                self.ensure_counters(&scope, now, writes);
                let state = self.scopes.entry(scope.clone()).or_default();
                state.counters.record(&actual, now);
                self.dirty.insert(Dirty::Counters(scope));
            }
            match self
                .slices
                .get(agent_id)
                .and_then(|s| s.get(&usage.key_id))
                .copied()
            {
                Some(held) => {
                    let left = held.saturating_sub(&actual);
                    self.put_slice(agent_id, &usage.key_id, left);
                    if !fresh {
                        self.note_held(agent_id, &usage.key_id, now);
                    }
                }
                // No slice: nothing held to take it from. Late when the
                // agent's slices were released because it was declared dead.
                None => late = self.released.contains(agent_id),
            }
        }
        let agent = self.agents.get_mut(agent_id).expect("checked above");
        agent.high_water_seq = usage.seq;
        self.dirty.insert(Dirty::Agent(agent_id.to_string()));
        SettleOutcome::Settled {
            cost,
            price: applied,
            free,
            excess,
            late,
        }
    }

    /// Appends the current value of everything changed since the last
    /// flush. The engine calls it once per batch, before committing.
    pub fn flush(&mut self, writes: &mut Vec<StoreWrite>) {
        for dirty in self.dirty.drain() {
            match dirty {
                Dirty::Counters(scope) => {
                    if let Some(state) = self.scopes.get(&scope) {
                        writes.push(StoreWrite::PutCounters(scope, state.counters.clone()));
                    }
                }
                Dirty::Slice(agent_id, key_id) => {
                    match self.slices.get(&agent_id).and_then(|s| s.get(&key_id)) {
                        Some(held) => writes.push(StoreWrite::PutSlice {
                            agent_id,
                            key_id,
                            held: *held,
                        }),
                        None => writes.push(StoreWrite::DeleteSlice { agent_id, key_id }),
                    }
                }
                Dirty::Held(agent_id, key_id) => {
                    match self.held.get(&agent_id).and_then(|h| h.get(&key_id)) {
                        Some(at_ms) => writes.push(StoreWrite::PutHeld {
                            agent_id,
                            key_id,
                            at_ms: *at_ms,
                        }),
                        None => writes.push(StoreWrite::DeleteHeld { agent_id, key_id }),
                    }
                }
                Dirty::Agent(agent_id) => {
                    if let Some(agent) = self.agents.get(&agent_id) {
                        writes.push(StoreWrite::PutAgent(agent.clone()));
                    }
                }
            }
        }
    }

    /// Checks the cap invariant for every limit; used by tests and debug
    /// builds. Returns the limits that are over (spent + held > cap).
    pub fn overspent(&self, now: UnixMs) -> Vec<LimitView> {
        self.keys
            .keys()
            .flat_map(|key_id| self.limit_views(key_id, now).unwrap_or_default())
            .filter(|v| v.spent + v.held > v.limit.amount)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::*;

    #[test]
    fn settlement_is_exactly_once_and_in_order() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        assert!(matches!(
            ledger.settle("a1", &usage(1, 10, 20), NOW, &mut w),
            SettleOutcome::Settled { .. }
        ));
        assert_eq!(
            ledger.settle("a1", &usage(1, 10, 20), NOW, &mut w),
            SettleOutcome::Duplicate
        );
        assert_eq!(
            ledger.settle("a1", &usage(3, 10, 20), NOW, &mut w),
            SettleOutcome::Gap { expected: 2 }
        );
        let views = ledger.limit_views("k1", NOW).unwrap();
        assert_eq!(views[0].spent, dec(10));
        // The slice shrank by what was settled.
        assert_eq!(views[0].held, dec(90));
    }

    #[test]
    fn usage_over_its_reservation_is_charged_and_flagged() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        let outcome = ledger.settle("a1", &usage(1, 30, 20), NOW, &mut w);
        assert!(matches!(
            outcome,
            SettleOutcome::Settled { excess: true, .. }
        ));
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].spent, dec(30));
    }

    #[test]
    fn usage_for_a_key_the_agent_never_held_is_not_charged_but_moves_its_mark() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        // a2 never held a slice of k1.
        assert_eq!(
            ledger.settle("a2", &usage(1, 90, 90), NOW, &mut w),
            SettleOutcome::NotHeld
        );
        let views = ledger.limit_views("k1", NOW).unwrap();
        assert_eq!(views[0].spent, dec(0), "nothing charged to k1");
        assert_eq!(views[0].held, dec(100), "a1's slice is untouched");
        assert_eq!(ledger.agent("a2").unwrap().high_water_seq, 1);
        assert_eq!(
            ledger.settle("a2", &usage(1, 90, 90), NOW, &mut w),
            SettleOutcome::Duplicate,
            "exactly once: the refused record is behind the mark"
        );
        // A record that costs nothing is not refused.
        let mut free = usage(2, 0, 0);
        free.charged = false;
        assert!(matches!(
            ledger.settle("a2", &free, NOW, &mut w),
            SettleOutcome::Settled { .. }
        ));
        // Once granted a slice, a2's usage of k1 is charged.
        ledger
            .ask("a2", "k1", &tokens(50), &tokens(50), NOW)
            .unwrap();
        assert!(matches!(
            ledger.settle("a2", &usage(3, 20, 20), NOW, &mut w),
            SettleOutcome::Settled { .. }
        ));
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].spent, dec(20));
    }

    #[test]
    fn late_usage_after_the_slice_was_given_back_is_charged() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.give_back("a1", "k1", &tokens(100));
        assert_eq!(ledger.slices_of("a1").count(), 0);
        let later = NOW + 3_600_000;
        assert!(matches!(
            ledger.settle("a1", &usage(1, 10, 20), later, &mut w),
            SettleOutcome::Settled { .. }
        ));
        assert_eq!(ledger.limit_views("k1", later).unwrap()[0].spent, dec(10));
    }
}
