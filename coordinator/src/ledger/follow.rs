//! A ledger that follows the store: a standby applies, one by one, the
//! writes the leader committed (as it reads them back from the store), so
//! that its ledger stays equal to what [`Ledger::from_stored`] would build
//! from the store at the same revision. Applying decides nothing and writes
//! nothing: it only mirrors.

use super::{Ledger, HELD_AT_UNKNOWN};
use crate::store::{StoreWrite, StoredState};

impl Ledger {
    /// Applies one committed write, as read back from the store. Applying
    /// the writes of every revision after the one a ledger was built at
    /// gives the ledger [`Ledger::from_stored`] builds at the last one.
    pub fn apply_stored(&mut self, write: StoreWrite) {
        match write {
            StoreWrite::PutAccount(account) => {
                self.accounts.insert(account.account_id.clone(), account);
            }
            StoreWrite::PutKey(key) => {
                match self.keys.get(&key.key_id) {
                    // The hash and the account of a key never change; a
                    // record that says otherwise is re-indexed.
                    Some(old) if old.hash == key.hash && old.account_id == key.account_id => {}
                    Some(old) => {
                        let (old_hash, old_account) = (old.hash, old.account_id.clone());
                        self.key_by_hash.remove(&old_hash);
                        if let Some(ids) = self.keys_by_account.get_mut(&old_account) {
                            ids.retain(|id| id != &key.key_id);
                        }
                        self.index_key(&key);
                    }
                    None => self.index_key(&key),
                }
                self.keys.insert(key.key_id.clone(), key);
            }
            StoreWrite::PutCounters(scope, counters) => {
                self.scopes.entry(scope).or_default().counters = counters;
            }
            StoreWrite::PutSlice {
                agent_id,
                key_id,
                held,
            } => {
                self.held
                    .entry(agent_id.clone())
                    .or_default()
                    .entry(key_id.clone())
                    .or_insert(HELD_AT_UNKNOWN);
                self.put_slice(&agent_id, &key_id, held);
            }
            StoreWrite::DeleteSlice { agent_id, key_id } => {
                self.delete_slice(&agent_id, &key_id);
                if self.slices.get(&agent_id).is_some_and(|s| s.is_empty()) {
                    self.slices.remove(&agent_id);
                }
            }
            StoreWrite::PutHeld {
                agent_id,
                key_id,
                at_ms,
            } => {
                self.held.entry(agent_id).or_default().insert(key_id, at_ms);
            }
            StoreWrite::DeleteHeld { agent_id, key_id } => {
                if let Some(history) = self.held.get_mut(&agent_id) {
                    history.remove(&key_id);
                    if history.is_empty() {
                        self.held.remove(&agent_id);
                    }
                }
            }
            StoreWrite::PutAgent(agent) => {
                self.agents.insert(agent.agent_id.clone(), agent);
            }
            StoreWrite::PutTariff(tariff) => self.tariffs.put(tariff),
            StoreWrite::PutTransaction(t) => {
                self.transactions.insert((t.account_id, t.source_id));
            }
            StoreWrite::PutAudit(entry) => self.audit.apply_put(entry),
            StoreWrite::DeleteAudit { seq } => self.audit.apply_delete(seq),
        }
        // Mirroring marks nothing to write: the leader wrote it already.
        self.dirty.clear();
    }

    /// What the store holds for this ledger, in a canonical order: two
    /// ledgers with equal committed state give equal values. For checks
    /// (a standby against a fresh load), not for the hot path.
    pub fn committed_state(&self) -> StoredState {
        let mut state = StoredState {
            accounts: self.accounts.values().cloned().collect(),
            keys: self.keys.values().cloned().collect(),
            counters: self
                .scopes
                .iter()
                .filter(|(_, s)| !s.counters.entries.is_empty())
                .map(|(scope, s)| (scope.clone(), s.counters.clone()))
                .collect(),
            slices: self
                .slices
                .iter()
                .flat_map(|(agent, slices)| {
                    slices
                        .iter()
                        .map(move |(key, held)| (agent.clone(), key.clone(), *held))
                })
                .collect(),
            held: self
                .held
                .iter()
                .flat_map(|(agent, history)| {
                    history
                        .iter()
                        .map(move |(key, at)| (agent.clone(), key.clone(), *at))
                })
                .collect(),
            agents: self.agents.values().cloned().collect(),
            tariffs: self.tariffs.all().cloned().collect(),
            transactions: Vec::new(),
            audit: self.audit.newest_first().cloned().collect(),
        };
        state
            .accounts
            .sort_by(|a, b| a.account_id.cmp(&b.account_id));
        state.keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        state
            .counters
            .sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        state.slices.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        state.held.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        state.agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        state.tariffs.sort_by_key(|t| format!("{:?}", t.identity()));
        state.audit.sort_by_key(|e| e.seq);
        state
    }

    /// The transactions applied, as `(account, source)` pairs, sorted.
    pub fn transaction_ids(&self) -> Vec<(String, String)> {
        let mut ids: Vec<_> = self.transactions.iter().cloned().collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::{key_record, tokens, NOW};
    use crate::ledger::{LedgerConfig, Scope, TransactionKind, Usage};
    use crate::store::layout;
    use allot::key::Purpose;
    use allot::limit::{Limit, Window};
    use allot::{Amounts, Unit};
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;

    const PREFIX: &str = "/allot/";

    /// The store as a map: what `commit` leaves behind.
    fn commit(store: &mut BTreeMap<String, Vec<u8>>, writes: &[StoreWrite]) {
        for (key, value) in layout::coalesce(PREFIX, writes) {
            match value {
                Some(value) => store.insert(key, value),
                None => store.remove(&key),
            };
        }
    }

    fn load(store: &BTreeMap<String, Vec<u8>>) -> Ledger {
        let state = layout::decode(
            PREFIX,
            store.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .unwrap();
        Ledger::from_stored(LedgerConfig::default(), state)
    }

    /// What a standby reads back: each committed write, through the key
    /// layout, as a watch delivers it.
    fn follow(standby: &mut Ledger, writes: &[StoreWrite]) {
        for (key, value) in layout::coalesce(PREFIX, writes) {
            if let Some(write) = layout::decode_entry(PREFIX, &key, value.as_deref()).unwrap() {
                standby.apply_stored(write);
            }
        }
    }

    fn usage(seq: u64, key_id: &str, prompt_tokens: u64) -> Usage {
        Usage {
            seq,
            key_id: key_id.into(),
            model: "m".into(),
            purpose: Purpose::Realtime,
            completion_window: None,
            priced_at: NOW,
            prompt_tokens,
            completion_tokens: 0,
            charged: true,
            reserved: Amounts::request(prompt_tokens, Decimal::ZERO),
        }
    }

    fn assert_same(standby: &Ledger, loaded: &Ledger, step: &str) {
        assert_eq!(
            standby.committed_state(),
            loaded.committed_state(),
            "after {step}"
        );
        assert_eq!(
            standby.transaction_ids(),
            loaded.transaction_ids(),
            "after {step}"
        );
        for key in loaded.keys() {
            assert_eq!(
                standby.limit_views(&key.key_id, NOW).unwrap(),
                loaded.limit_views(&key.key_id, NOW).unwrap(),
                "held and spent of {} after {step}",
                key.key_id
            );
        }
    }

    type Act<'a> = &'a mut dyn FnMut(&mut Ledger, &mut Vec<StoreWrite>);

    #[test]
    fn a_standby_that_applies_every_commit_equals_a_fresh_load_at_each_step() {
        let mut store = BTreeMap::new();
        let mut leader = Ledger::new(LedgerConfig::default());
        let mut standby = load(&store);
        let mut step = |name: &str, act: Act| {
            let mut writes = Vec::new();
            act(&mut leader, &mut writes);
            leader.flush(&mut writes);
            commit(&mut store, &writes);
            follow(&mut standby, &writes);
            assert_same(&standby, &load(&store), name);
        };
        let cap = Limit {
            unit: Unit::Tokens,
            amount: Decimal::from(1_000),
            window: Window::Balance,
        };
        step("an account, keys and limits", &mut |l, w| {
            l.create_account("acme", "Acme", NOW, w).unwrap();
            for (id, secret) in [("k1", "s1"), ("k2", "s2"), ("k3", "s3")] {
                l.create_key(key_record(id, secret), w).unwrap();
                l.set_limits(&Scope::Key(id.into()), vec![cap], NOW, w)
                    .unwrap();
            }
            l.credit(
                "acme",
                "invoice-1",
                TransactionKind::Purchase,
                Decimal::from(50),
                NOW,
                w,
            )
            .unwrap();
        });
        step("hellos", &mut |l, w| {
            l.hello("a1", 1, "n1", w).unwrap();
            l.hello("a2", 1, "n2", w).unwrap();
        });
        step("grants", &mut |l, _| {
            for agent in ["a1", "a2"] {
                for key in ["k1", "k2"] {
                    l.ask(agent, key, &tokens(10), &tokens(100), NOW).unwrap();
                }
            }
        });
        step("settlement", &mut |l, w| {
            for seq in 1..=5 {
                l.settle("a1", &usage(seq, "k1", 7), NOW + 10, w);
            }
        });
        step("a give-back and a revoke", &mut |l, w| {
            l.give_back("a2", "k2", &tokens(1_000));
            l.revoke_key("k3", w).unwrap();
        });
        step("a dead agent", &mut |l, _| {
            l.release_agent("a2");
        });
        step("a key history sweep past the retention", &mut |l, _| {
            l.sweep_key_history(NOW + 3 * allot::bounds::MAX_BATCH_AGE_MS);
        });
        // The standby held something all along: a check of the check.
        assert!(!standby.committed_state().slices.is_empty());
    }

    #[test]
    fn a_deleted_account_cannot_be_mirrored_and_says_so() {
        let error = layout::decode_entry(PREFIX, "/allot/accounts/acme", None).unwrap_err();
        assert!(
            error.to_string().contains("/allot/accounts/acme"),
            "{error}"
        );
        assert_eq!(
            layout::decode_entry(PREFIX, "/allot/journal", None).unwrap(),
            None
        );
    }
}
