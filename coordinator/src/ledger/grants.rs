//! Allowances: an agent's hello and reconcile, asks carved from what is
//! left under every limit (reclaiming from idle holders when others wait),
//! slices given back or released, and each agent's key history. Nothing
//! here charges spend; that is [`super::settlement`].

use super::*;

/// Demand older than this no longer counts in anyone's share.
pub const DEMAND_FRESH_MS: i64 = 10_000;

/// How far one `Hello` may move an agent's epoch ahead: an agent adds one
/// at each start, so this allows a million restarts between two sessions.
pub const MAX_EPOCH_STEP: u64 = 1_000_000;

/// Why an ask was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A balance limit or the account balance is exhausted.
    InsufficientQuota,
    /// A rolling or calendar limit is exhausted until `retry_at`.
    RateLimited,
    KeyRevoked,
    UnknownKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: DenyReason,
    /// When the ask could fit, for rate limits.
    pub retry_at: Option<UnixMs>,
    pub message: String,
    /// `(agent, key)` slices whose return would make room; empty when the
    /// refusal is final.
    pub reclaim: Vec<(String, String)>,
}

/// What the ledger answers a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// Every usage record of the agent up to here is settled.
    pub high_water_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantDecision {
    pub amount: Amounts,
    pub limits: Vec<LimitView>,
}

/// What a reconcile changed that the caller reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// The agent had been declared dead and still holds something: that
    /// counts again and may take a cap past its amount (the documented
    /// exception, counted and alarmed by the caller).
    pub late_held: bool,
    /// Keys reported held that are not in the agent's key history: ignored.
    pub not_held: Vec<String>,
}

/// Most key history writes one sweep makes; the rest wait for the next.
pub const MAX_KEY_HISTORY_SWEEP_WRITES: usize = 1_000;
/// Most key history entries one sweep looks at (an agent's whole history
/// is looked at in one sweep, however long): a pass over a large ledger
/// spans several sweeps, so the engine never stops for a whole scan.
pub const MAX_KEY_HISTORY_SWEEP_VISITS: usize = 100_000;

impl Ledger {
    /// Adds `sign × amounts` to what is held under the key's scopes.
    pub(super) fn add_held(&mut self, key_id: &str, amounts: &Amounts, sign: i64) {
        let Some(account_id) = self.keys.get(key_id).map(|k| k.account_id.clone()) else {
            return;
        };
        let sign = Decimal::from(sign);
        for scope in [Scope::Key(key_id.to_string()), Scope::Account(account_id)] {
            let state = self.scopes.entry(scope).or_default();
            for unit in Unit::ALL {
                if let Some(v) = amounts.get(unit) {
                    let held = &mut state.held[unit.index()];
                    *held = held.saturating_add(sign * v).max(Decimal::ZERO);
                }
            }
        }
    }

    pub(super) fn put_slice(&mut self, agent_id: &str, key_id: &str, held: Amounts) {
        let old = self
            .slices
            .get(agent_id)
            .and_then(|s| s.get(key_id))
            .copied();
        if let Some(old) = old {
            self.add_held(key_id, &old, -1);
        }
        self.add_held(key_id, &held, 1);
        self.slices
            .entry(agent_id.to_string())
            .or_default()
            .insert(key_id.to_string(), held);
        self.dirty
            .insert(Dirty::Slice(agent_id.to_string(), key_id.to_string()));
    }

    /// Notes that `agent_id` holds a slice of `key_id` at `now`: written
    /// when the key is new to its history or its stored time is older than
    /// the refresh interval, so that settling writes nothing more.
    pub(super) fn note_held(&mut self, agent_id: &str, key_id: &str, now: UnixMs) {
        let refresh = self.config.key_history_refresh_ms;
        if let Some(at) = self.held.get_mut(agent_id).and_then(|h| h.get_mut(key_id)) {
            if *at != HELD_AT_UNKNOWN && now.saturating_sub(*at) < refresh {
                return;
            }
            *at = now;
        } else {
            self.held
                .entry(agent_id.to_string())
                .or_default()
                .insert(key_id.to_string(), now);
        }
        self.dirty
            .insert(Dirty::Held(agent_id.to_string(), key_id.to_string()));
    }

    /// Keeps the key history bounded and fresh: forgets entries without a
    /// slice last held more than the retention ago, and rewrites the stored
    /// time of slices still held (idle ones too) once it is older than the
    /// refresh interval. Goes on with the current pass over the agents (a
    /// new pass starts when the last one ended), looking at up to
    /// [`MAX_KEY_HISTORY_SWEEP_VISITS`] entries and writing up to
    /// [`MAX_KEY_HISTORY_SWEEP_WRITES`]; the rest wait for the next sweep.
    /// Returns how many entries it forgot.
    pub fn sweep_key_history(&mut self, now: UnixMs) -> usize {
        let retention = self.config.key_history_retention_ms;
        let refresh = self.config.key_history_refresh_ms;
        if self.sweep_queue.is_empty() {
            self.sweep_queue = self.held.keys().cloned().collect();
        }
        let mut changed: Vec<(String, String, bool)> = Vec::new();
        let mut visits = 0;
        while let Some(agent_id) = self.sweep_queue.pop() {
            let Some(history) = self.held.get(&agent_id) else {
                continue;
            };
            if visits > 0 && visits + history.len() > MAX_KEY_HISTORY_SWEEP_VISITS {
                self.sweep_queue.push(agent_id);
                break;
            }
            let slices = self.slices.get(&agent_id);
            let mut full = false;
            for (key_id, at) in history {
                if changed.len() >= MAX_KEY_HISTORY_SWEEP_WRITES {
                    full = true;
                    break;
                }
                visits += 1;
                let age = now.saturating_sub(*at);
                let holds = slices.is_some_and(|s| s.contains_key(key_id));
                if *at == HELD_AT_UNKNOWN || (holds && age >= refresh) {
                    changed.push((agent_id.clone(), key_id.clone(), true));
                } else if !holds && age > retention {
                    changed.push((agent_id.clone(), key_id.clone(), false));
                }
            }
            if full {
                // Visited again next time; what changed is fresh by then.
                self.sweep_queue.push(agent_id);
                break;
            }
        }
        let mut forgotten = 0;
        for (agent_id, key_id, keep) in changed {
            let Some(history) = self.held.get_mut(&agent_id) else {
                continue;
            };
            if keep {
                history.insert(key_id.clone(), now);
            } else {
                history.remove(&key_id);
                forgotten += 1;
                if history.is_empty() {
                    self.held.remove(&agent_id);
                }
            }
            self.dirty.insert(Dirty::Held(agent_id, key_id));
        }
        forgotten
    }

    pub(super) fn delete_slice(&mut self, agent_id: &str, key_id: &str) {
        let Some(old) = self.slices.get_mut(agent_id).and_then(|s| s.remove(key_id)) else {
            return;
        };
        self.add_held(key_id, &old, -1);
        self.dirty
            .insert(Dirty::Slice(agent_id.to_string(), key_id.to_string()));
    }

    /// An agent (re)connects: checks its epoch and answers its usage
    /// high-water mark. Its slices are replaced by [`Ledger::reconcile`].
    /// An operator's reset of an agent whose spool was lost: its epoch
    /// goes back to 0 (the next Hello of any epoch up to
    /// [`MAX_EPOCH_STEP`] is accepted); its high-water mark stays.
    pub fn reset_agent(
        &mut self,
        agent_id: &str,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<AgentRecord, LedgerError> {
        let record = self
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| not_found("agent", agent_id))?;
        record.epoch = 0;
        writes.push(StoreWrite::PutAgent(record.clone()));
        Ok(record.clone())
    }

    /// An agent's `Hello`: its epoch may not go back, nor jump more than
    /// [`MAX_EPOCH_STEP`] ahead.
    pub fn hello(
        &mut self,
        agent_id: &str,
        epoch: u64,
        neuron_id: &str,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<Welcome, LedgerError> {
        // Checked before anything changes: a refused Hello leaves no
        // record behind (a new agent's starts at epoch 0).
        let current = self.agents.get(agent_id).map_or(0, |r| r.epoch);
        if epoch < current {
            return Err(LedgerError::FailedPrecondition(format!(
                "agent {agent_id} epoch {epoch} is older than the current epoch {current}"
            )));
        }
        // An agent's epoch grows by one at each start: a Hello may not
        // jump it far ahead (to u64::MAX, say), which would lock the real
        // agent out.
        if epoch - current > MAX_EPOCH_STEP {
            return Err(LedgerError::Invalid(allot::error::InvalidArgument::new(
                "hello.epoch",
                format!(
                    "may be at most {MAX_EPOCH_STEP} above the current epoch {current} of agent {agent_id}"
                ),
            )));
        }
        let mut new = false;
        let record = self.agents.entry(agent_id.to_string()).or_insert_with(|| {
            new = true;
            AgentRecord {
                agent_id: agent_id.to_string(),
                epoch: 0,
                high_water_seq: 0,
                neuron_id: neuron_id.to_string(),
            }
        });
        // A reconnect of the same agent changes nothing: after a fail-over
        // every agent says Hello at once, and none of them costs a write.
        if new || record.epoch != epoch || record.neuron_id != neuron_id {
            record.epoch = epoch;
            record.neuron_id = neuron_id.to_string();
            writes.push(StoreWrite::PutAgent(record.clone()));
        }
        Ok(Welcome {
            high_water_seq: record.high_water_seq,
        })
    }

    /// An agent's report of what it holds, sent once it knows its
    /// high-water mark: unspent allowance, reservations in flight, and the
    /// usage of its records above the mark. It replaces whatever the ledger
    /// thought: only the agent knows what it admitted, but only for keys
    /// in its key history: a slice of a key it was never granted one of is
    /// refused (named in [`Reconciled::not_held`]).
    pub fn reconcile(
        &mut self,
        agent_id: &str,
        reported: Vec<(String, Amounts)>,
        now: UnixMs,
    ) -> Reconciled {
        let mut not_held = Vec::new();
        let reported: HashMap<String, Amounts> = reported
            .into_iter()
            .filter(|(key_id, held)| {
                if !self.keys.contains_key(key_id) {
                    return false;
                }
                if !held.is_zero() && !self.has_held(agent_id, key_id, now) {
                    not_held.push(key_id.clone());
                    return false;
                }
                true
            })
            .collect();
        let known: Vec<String> = self.slices_of(agent_id).map(|(k, _)| k.clone()).collect();
        for key_id in known {
            if !reported.contains_key(&key_id) {
                self.delete_slice(agent_id, &key_id);
            }
        }
        let returned_from_dead = self.released.remove(agent_id);
        let mut late_held = false;
        for (key_id, held) in reported {
            if held.is_zero() {
                self.delete_slice(agent_id, &key_id);
            } else {
                late_held |= returned_from_dead;
                self.put_slice(agent_id, &key_id, held);
                self.note_held(agent_id, &key_id, now);
            }
        }
        Reconciled {
            late_held,
            not_held,
        }
    }

    /// Releases every slice of an agent declared dead.
    pub fn release_agent(&mut self, agent_id: &str) -> usize {
        self.released.insert(agent_id.to_string());
        let keys: Vec<String> = self.slices_of(agent_id).map(|(k, _)| k.clone()).collect();
        for key_id in &keys {
            self.delete_slice(agent_id, key_id);
        }
        keys.len()
    }

    /// An agent gives back part of its slice.
    pub fn give_back(&mut self, agent_id: &str, key_id: &str, amount: &Amounts) {
        let Some(current) = self
            .slices
            .get(agent_id)
            .and_then(|s| s.get(key_id))
            .copied()
        else {
            return;
        };
        let left = current.saturating_sub(amount);
        if left.is_zero() {
            self.delete_slice(agent_id, key_id);
        } else {
            self.put_slice(agent_id, key_id, left);
        }
    }

    /// Demand other agents reported for `key_id` within the last
    /// [`DEMAND_FRESH_MS`], per unit.
    fn others_demand(&self, agent_id: &str, key_id: &str, now: UnixMs) -> Amounts {
        let mut total = Amounts::zero();
        if let Some(agents) = self.demand.get(key_id) {
            for (agent, (want, at)) in agents {
                if agent != agent_id && now - at <= DEMAND_FRESH_MS {
                    total = total.add(want);
                }
            }
        }
        total
    }

    /// Slices of other agents under `scope` (and their amounts) that could
    /// be given back to make room.
    fn reclaimable(
        &self,
        agent_id: &str,
        key_id: &str,
        scope: &Scope,
    ) -> Vec<(String, String, Amounts)> {
        let mut found = Vec::new();
        for (agent, slices) in &self.slices {
            for (slice_key, held) in slices {
                if agent == agent_id && slice_key == key_id {
                    continue;
                }
                let under = match scope {
                    Scope::Key(k) => slice_key == k,
                    Scope::Account(a) => {
                        self.keys.get(slice_key).is_some_and(|k| &k.account_id == a)
                    }
                };
                if under {
                    found.push((agent.clone(), slice_key.clone(), *held));
                }
            }
        }
        // A stable order keeps decisions reproducible (the simulation
        // replays schedules by seed).
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        found
    }

    /// Decides an allowance ask: what to add to the agent's slice for
    /// `key_id`, or why not. `need` is what a waiting request lacks (zero
    /// when the agent asks ahead); `want` is its demand over one refresh
    /// interval. When the cap still has room but other agents' slices hold
    /// it, the refusal names those slices (`reclaim`): the caller revokes
    /// them and asks again once they are given back. A refusal without
    /// `reclaim` is final: the cap itself is exhausted.
    pub fn ask(
        &mut self,
        agent_id: &str,
        key_id: &str,
        need: &Amounts,
        want: &Amounts,
        now: UnixMs,
    ) -> Result<GrantDecision, Refusal> {
        let Some(key) = self.keys.get(key_id) else {
            return Err(Refusal {
                reason: DenyReason::UnknownKey,
                retry_at: None,
                message: format!("key {key_id} does not exist"),
                reclaim: Vec::new(),
            });
        };
        if key.revoked {
            return Err(Refusal {
                reason: DenyReason::KeyRevoked,
                retry_at: None,
                message: "the key was revoked".into(),
                reclaim: Vec::new(),
            });
        }
        let views: Vec<LimitView> = self
            .applicable_limits(key)
            .iter()
            .map(|(scope, limit)| self.view(scope, limit, now))
            .collect();
        self.demand
            .entry(key_id.to_string())
            .or_default()
            .insert(agent_id.to_string(), (want.add(&Amounts::zero()), now));
        let others = self.others_demand(agent_id, key_id, now);
        let mut grant = Amounts::UNLIMITED;
        for unit in Unit::ALL {
            let in_unit: Vec<&LimitView> = views.iter().filter(|v| v.limit.unit == unit).collect();
            if in_unit.is_empty() {
                continue;
            }
            let need_u = need.value(unit);
            let room = in_unit
                .iter()
                .map(|v| v.remaining)
                .min()
                .unwrap_or_default();
            let Some(mut amount) = grant::size(
                need_u,
                want.value(unit),
                room,
                others.value(unit),
                self.config.grant_share,
            ) else {
                let mut refusal = self.refusal(&in_unit, need_u, now);
                refusal.reclaim = self.reclaim_plan(agent_id, key_id, &in_unit, need_u, unit);
                return Err(refusal);
            };
            if unit.is_integral() {
                amount = amount.floor();
            }
            grant.set(unit, Some(amount));
        }
        let current = self
            .slices
            .get(agent_id)
            .and_then(|s| s.get(key_id))
            .copied();
        let held = match current {
            Some(current) => {
                let mut merged = current;
                for unit in Unit::ALL {
                    merged.set(
                        unit,
                        match (current.get(unit), grant.get(unit)) {
                            (_, None) => None,
                            (c, Some(g)) => Some(c.unwrap_or_default().saturating_add(g)),
                        },
                    );
                }
                merged
            }
            None => grant,
        };
        if !grant.is_zero() || current.is_none() {
            self.put_slice(agent_id, key_id, held);
            self.note_held(agent_id, key_id, now);
        }
        let limits = views
            .iter()
            .map(|v| self.view(&v.scope, &v.limit, now))
            .collect();
        Ok(GrantDecision {
            amount: grant,
            limits,
        })
    }

    /// Slices to revoke so that `need` fits under every exhausted limit, or
    /// nothing when even all of them would not make room (the cap, not the
    /// slicing, is exhausted).
    fn reclaim_plan(
        &self,
        agent_id: &str,
        key_id: &str,
        in_unit: &[&LimitView],
        need: Decimal,
        unit: Unit,
    ) -> Vec<(String, String)> {
        let mut plan: Vec<(String, String)> = Vec::new();
        for view in in_unit.iter().filter(|v| v.remaining < need) {
            let candidates = self.reclaimable(agent_id, key_id, &view.scope);
            let available = candidates.iter().fold(Decimal::ZERO, |sum, (_, _, held)| {
                sum.saturating_add(held.value(unit))
            });
            if view.remaining.saturating_add(available) < need {
                return Vec::new();
            }
            for (agent, key, held) in candidates {
                if held.value(unit) > Decimal::ZERO && !plan.contains(&(agent.clone(), key.clone()))
                {
                    plan.push((agent, key));
                }
            }
        }
        plan
    }

    fn refusal(&self, failing: &[&LimitView], need: Decimal, now: UnixMs) -> Refusal {
        let exhausted: Vec<&&LimitView> = failing.iter().filter(|v| v.remaining < need).collect();
        if let Some(balance) = exhausted.iter().find(|v| v.limit.window.is_balance()) {
            return Refusal {
                reason: DenyReason::InsufficientQuota,
                retry_at: None,
                reclaim: Vec::new(),
                message: format!(
                    "{} {} balance exhausted: {} of {} left, {} needed",
                    scope_label(&balance.scope),
                    balance.limit.unit.as_str(),
                    balance.remaining,
                    balance.limit.amount,
                    need
                ),
            };
        }
        let mut retry_at = now;
        let mut message = String::new();
        for view in &exhausted {
            let counter = self.counter(&view.scope, view.limit.unit, view.limit.window);
            let fits = counter.and_then(|c| c.fits_at(now, view.limit.amount, view.held, need));
            let at = fits.unwrap_or_else(|| match view.limit.window {
                // Never fits while this much is held or asked: the longest
                // wait this window can impose.
                Window::Rolling { seconds } => now + (seconds * 1000) as i64,
                _ => counter
                    .and_then(|c| c.next_refill(now))
                    .unwrap_or(now + 1000),
            });
            if at >= retry_at {
                retry_at = at;
                message = format!(
                    "{} {} limit of {} reached: {} left, {} needed",
                    scope_label(&view.scope),
                    view.limit.unit.as_str(),
                    view.limit.amount,
                    view.remaining,
                    need
                );
            }
        }
        Refusal {
            reason: DenyReason::RateLimited,
            retry_at: Some(retry_at.max(now + 1)),
            message,
            reclaim: Vec::new(),
        }
    }
}

fn scope_label(scope: &Scope) -> String {
    match scope {
        Scope::Key(id) => format!("key {id}"),
        Scope::Account(id) => format!("account {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::*;
    use allot::limit::CalendarPeriod;

    #[test]
    fn a_grant_is_carved_from_what_is_left_and_never_exceeds_the_cap() {
        let mut ledger = ledger_with_key(vec![token_limit(100, Window::Balance)]);
        let first = ledger
            .ask("a1", "k1", &tokens(30), &tokens(1000), NOW)
            .unwrap();
        let second = ledger
            .ask("a2", "k1", &tokens(30), &tokens(1000), NOW)
            .unwrap();
        let granted = first.amount.value(Unit::Tokens) + second.amount.value(Unit::Tokens);
        assert!(granted <= dec(100), "{granted}");
        assert!(ledger.overspent(NOW).is_empty());
    }

    #[test]
    fn units_without_a_limit_are_granted_unlimited() {
        let mut ledger = ledger_with_key(vec![token_limit(100, Window::Balance)]);
        let grant = ledger
            .ask("a1", "k1", &tokens(10), &tokens(10), NOW)
            .unwrap();
        assert_eq!(grant.amount.get(Unit::Requests), None);
        assert!(grant.amount.get(Unit::Tokens).is_some());
        // The account balance always limits credits.
        assert!(grant.amount.get(Unit::Credits).is_some());
    }

    #[test]
    fn an_exhausted_balance_is_insufficient_quota_without_retry() {
        let mut ledger = ledger_with_key(vec![token_limit(10, Window::Balance)]);
        let refusal = ledger
            .ask("a1", "k1", &tokens(1000), &tokens(1000), NOW)
            .unwrap_err();
        assert_eq!(refusal.reason, DenyReason::InsufficientQuota);
        assert_eq!(refusal.retry_at, None);
    }

    #[test]
    fn an_exhausted_rolling_window_is_rate_limited_until_spend_ages_out() {
        let mut ledger = ledger_with_key(vec![token_limit(100, Window::Rolling { seconds: 60 })]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(80), &tokens(80), NOW)
            .unwrap();
        ledger.settle("a1", &usage(1, 80, 80), NOW, &mut w);
        let refusal = ledger
            .ask("a1", "k1", &tokens(50), &tokens(50), NOW)
            .unwrap_err();
        assert_eq!(refusal.reason, DenyReason::RateLimited);
        // Spend at NOW counts until NOW + 1 s bucket + 60 s window.
        assert_eq!(refusal.retry_at, Some(NOW - NOW.rem_euclid(1000) + 61_000));
    }

    #[test]
    fn a_calendar_window_is_rate_limited_until_midnight_utc() {
        let mut ledger = ledger_with_key(vec![token_limit(
            100,
            Window::Calendar {
                period: CalendarPeriod::Day,
            },
        )]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(90), &tokens(90), NOW)
            .unwrap();
        ledger.settle("a1", &usage(1, 90, 90), NOW, &mut w);
        let refusal = ledger
            .ask("a1", "k1", &tokens(20), &tokens(20), NOW)
            .unwrap_err();
        assert_eq!(refusal.retry_at, Some(allot::clock::next_day_start(NOW)));
    }

    #[test]
    fn account_limits_bind_every_key_of_the_account() {
        let mut ledger = ledger_with_key(vec![]);
        let mut w = Vec::new();
        ledger
            .set_limits(
                &Scope::Account("acme".into()),
                vec![token_limit(50, Window::Balance)],
                NOW,
                &mut w,
            )
            .unwrap();
        let refusal = ledger
            .ask("a1", "k1", &tokens(60), &tokens(60), NOW)
            .unwrap_err();
        assert_eq!(refusal.reason, DenyReason::InsufficientQuota);
        assert!(
            refusal.message.contains("account acme"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn reconcile_replaces_what_the_ledger_thought_an_agent_held() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.hello("a1", 2, "n1", &mut w).unwrap();
        ledger.reconcile("a1", vec![("k1".into(), tokens(40))], NOW);
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].held, dec(40));
        ledger.hello("a1", 3, "n1", &mut w).unwrap();
        ledger.reconcile("a1", vec![], NOW);
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].held, dec(0));
        assert!(
            ledger.hello("a1", 2, "n1", &mut w).is_err(),
            "an older epoch is refused"
        );
    }

    #[test]
    fn a_dead_agents_slices_are_released_and_its_late_usage_still_charged() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        assert_eq!(ledger.release_agent("a1"), 1);
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].held, dec(0));
        let outcome = ledger.settle("a1", &usage(1, 10, 20), NOW, &mut w);
        assert!(matches!(outcome, SettleOutcome::Settled { late: true, .. }));
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].spent, dec(10));
    }

    #[test]
    fn the_key_history_is_written_with_the_grant_and_not_at_every_settlement() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.flush(&mut w);
        assert_eq!(
            held_writes(&w),
            vec![StoreWrite::PutHeld {
                agent_id: "a1".into(),
                key_id: "k1".into(),
                at_ms: NOW
            }]
        );
        let mut w = Vec::new();
        ledger.settle("a1", &usage(1, 10, 10), NOW + 1_000, &mut w);
        ledger
            .ask("a1", "k1", &tokens(10), &tokens(10), NOW + 2_000)
            .unwrap();
        ledger.flush(&mut w);
        assert!(held_writes(&w).is_empty(), "{w:?}");
        // Past the refresh interval, the next settlement refreshes it.
        let later = NOW + LedgerConfig::default().key_history_refresh_ms;
        ledger.settle("a1", &usage(2, 10, 10), later, &mut w);
        ledger.flush(&mut w);
        assert_eq!(
            held_writes(&w),
            vec![StoreWrite::PutHeld {
                agent_id: "a1".into(),
                key_id: "k1".into(),
                at_ms: later
            }]
        );
    }

    #[test]
    fn the_key_history_is_forgotten_after_its_retention_unless_still_held() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let retention = LedgerConfig::default().key_history_retention_ms;
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger
            .ask("a2", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.give_back("a1", "k1", &tokens(100));
        ledger.flush(&mut w);
        // At the retention, both are kept: a1's late usage still counts;
        // a2 still holds its slice, so its stored time is refreshed.
        let at_retention = NOW + retention;
        assert_eq!(ledger.sweep_key_history(at_retention), 0);
        assert!(ledger.has_held("a1", "k1", at_retention));
        let mut w = Vec::new();
        ledger.flush(&mut w);
        assert_eq!(
            held_writes(&w),
            vec![StoreWrite::PutHeld {
                agent_id: "a2".into(),
                key_id: "k1".into(),
                at_ms: at_retention
            }]
        );
        // Past it, a1 (no slice) is forgotten.
        let past = at_retention + 1;
        assert!(
            !ledger.has_held("a1", "k1", past),
            "expired before the sweep"
        );
        assert_eq!(ledger.sweep_key_history(past), 1);
        let mut w = Vec::new();
        ledger.flush(&mut w);
        assert_eq!(
            held_writes(&w),
            vec![StoreWrite::DeleteHeld {
                agent_id: "a1".into(),
                key_id: "k1".into()
            }]
        );
        // A slice held longer than the retention is never forgotten.
        let much_later = past + 2 * retention;
        assert_eq!(ledger.sweep_key_history(much_later), 0);
        assert!(ledger.has_held("a2", "k1", much_later));
        assert_eq!(ledger.key_history_of("a1").count(), 0);
        assert_eq!(
            ledger.settle("a1", &usage(1, 10, 10), past, &mut w),
            SettleOutcome::NotHeld
        );
        assert!(matches!(
            ledger.settle("a2", &usage(1, 10, 10), much_later, &mut w),
            SettleOutcome::Settled { late: false, .. }
        ));
    }

    #[test]
    fn a_sweep_writes_a_bounded_number_of_entries() {
        let mut ledger = ledger_with_key(vec![]);
        let mut w = Vec::new();
        let agents = MAX_KEY_HISTORY_SWEEP_WRITES + 5;
        for i in 0..agents {
            let agent = format!("x{i}");
            ledger.hello(&agent, 1, "n", &mut w).unwrap();
            ledger
                .ask(&agent, "k1", &tokens(1), &tokens(1), NOW)
                .unwrap();
            ledger.give_back(&agent, "k1", &tokens(1));
        }
        let past = NOW + LedgerConfig::default().key_history_retention_ms + 1;
        assert_eq!(ledger.sweep_key_history(past), MAX_KEY_HISTORY_SWEEP_WRITES);
        assert_eq!(ledger.sweep_key_history(past), 5);
        assert_eq!(ledger.sweep_key_history(past), 0);
    }

    #[test]
    fn a_sweep_looks_at_a_bounded_number_of_entries_and_the_next_goes_on_from_there() {
        let mut ledger = ledger_with_key(vec![]);
        let mut w = Vec::new();
        // Three agents, each with a history of more than a third of what one
        // sweep may look at, all within the retention: nothing to write.
        let per_agent = MAX_KEY_HISTORY_SWEEP_VISITS / 3 + 1;
        for agent in ["a", "b", "c"] {
            ledger.hello(agent, 1, "n", &mut w).unwrap();
            let history = ledger.held.entry(agent.to_string()).or_default();
            for i in 0..per_agent {
                history.insert(format!("k{i}"), NOW);
            }
        }
        assert_eq!(ledger.sweep_key_history(NOW + 1), 0);
        assert_eq!(
            ledger.sweep_queue.len(),
            1,
            "two agents looked at, one left"
        );
        ledger.sweep_key_history(NOW + 1);
        assert!(
            ledger.sweep_queue.is_empty(),
            "the pass ends where it stopped"
        );
        // Past the retention, passes forget everything, a bounded part a sweep.
        let past = NOW + LedgerConfig::default().key_history_retention_ms + 1;
        let mut forgotten = 0;
        for _ in 0..1_000 {
            forgotten += ledger.sweep_key_history(past);
        }
        assert_eq!(forgotten, 3 * per_agent);
        assert!(ledger.held.is_empty());
    }

    #[test]
    fn resetting_an_agent_keeps_its_key_history() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.release_agent("a1");
        ledger.reset_agent("a1", &mut w).unwrap();
        assert!(held_writes(&w).is_empty());
        ledger.hello("a1", 1, "n1", &mut w).unwrap();
        assert!(matches!(
            ledger.settle("a1", &usage(1, 10, 10), NOW, &mut w),
            SettleOutcome::Settled { late: true, .. }
        ));
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].spent, dec(10));
    }

    #[test]
    fn a_reconcile_cannot_claim_a_slice_of_a_key_the_agent_never_held() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let reconciled = ledger.reconcile("a2", vec![("k1".into(), tokens(500))], NOW);
        assert_eq!(reconciled.not_held, vec!["k1".to_string()]);
        assert_eq!(ledger.slices_of("a2").count(), 0);
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].held, dec(0));
        // An agent that was granted one reports it as it likes.
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        let reconciled = ledger.reconcile("a1", vec![("k1".into(), tokens(40))], NOW);
        assert!(reconciled.not_held.is_empty());
        assert_eq!(ledger.limit_views("k1", NOW).unwrap()[0].held, dec(40));
    }

    #[test]
    fn a_refused_hello_leaves_no_agent_behind() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut writes = Vec::new();
        let refused = ledger.hello("stranger", u64::MAX, "n", &mut writes);
        assert!(matches!(refused, Err(LedgerError::Invalid(_))));
        assert!(ledger.agent("stranger").is_none());
        assert!(writes.is_empty());
        ledger.hello("stranger", 1, "n", &mut writes).unwrap();
        assert_eq!(ledger.agent("stranger").map(|a| a.epoch), Some(1));
    }
}
