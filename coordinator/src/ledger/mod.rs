//! The ledger: accounts, keys, limits, spend counters, agents' slices and
//! usage high-water marks, as plain data with the decisions that change them
//! (grants, denials, settlement, credits). No I/O: every mutation appends the
//! [`StoreWrite`]s that make it durable, and the engine commits them before
//! anyone hears of the change.
//!
//! The invariant, for every limit of every scope (key or account):
//! `spent(now) + held(scope, unit) <= cap`, where `held` is the sum of what
//! agents hold for keys under that scope (their unspent allowance plus their
//! in-flight reservations). A grant is carved only from what is left, so the
//! invariant holds whatever agents do with their slices. The only exception
//! is usage larger than its reservation (a neuron reporting more than was
//! reserved) or reported late by an agent declared dead: it is charged
//! anyway, never lost, and counted.
//!
//! An agent's messages count only for what it holds. Each agent has a key
//! history: the keys it was granted a slice of, and when it last held one
//! (stored under `held/`, in the commit of the grant). Charged usage for a
//! key outside that history is refused: nothing is charged, and the
//! agent's high-water mark moves past it so its stream goes on. Usage that
//! arrives after its slice is gone (returned, reclaimed, released, or
//! across a restart) is in the history and charged, for
//! [`LedgerConfig::key_history_retention_ms`] after the slice was last held.

mod accounts;
mod follow;
mod grants;
pub mod records;
mod settlement;

pub use grants::{
    DenyReason, GrantDecision, Reconciled, Refusal, Welcome, DEMAND_FRESH_MS, MAX_EPOCH_STEP,
    MAX_KEY_HISTORY_SWEEP_WRITES,
};
pub use records::{
    AccountRecord, AgentRecord, CounterEntry, KeyRecord, Scope, ScopeCounters, TransactionKind,
    TransactionRecord,
};
pub use settlement::{AppliedPrice, SettleOutcome, Usage};

use crate::grant;
use crate::store::{StoreWrite, StoredState};
use allot::clock::UnixMs;
use allot::key::{KeyHash, Purpose};
use allot::limit::{Limit, Window};
use allot::tariff::{Price, Tariff, TariffBook};
use allot::window::SpendCounter;
use allot::{Amounts, Unit};
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error(transparent)]
    Invalid(#[from] allot::InvalidArgument),
    #[error("{0}")]
    FailedPrecondition(String),
}

/// One limit as seen from a grant or a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitView {
    pub scope: Scope,
    pub limit: Limit,
    pub spent: Decimal,
    /// What all agents hold under this limit's scope.
    pub held: Decimal,
    pub remaining: Decimal,
    pub next_refill: Option<UnixMs>,
}

/// Tunables of the ledger's decisions.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Fraction of what is left that one grant may take beyond its need.
    pub grant_share: Decimal,
    /// How much of the audit log is kept.
    pub audit: crate::audit::AuditRetention,
    /// How long after an agent last held a slice of a key its usage for
    /// that key is still charged (and the key history entry kept): 7 days,
    /// the longest a batch request may wait to be priced.
    pub key_history_retention_ms: i64,
    /// The stored time of a slice still held is rewritten once it is this
    /// old, not at every settlement: the history is at most this stale.
    pub key_history_refresh_ms: i64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            grant_share: Decimal::new(5, 1),
            audit: crate::audit::AuditRetention::default(),
            key_history_retention_ms: allot::bounds::MAX_BATCH_AGE_MS,
            key_history_refresh_ms: 3_600_000,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ScopeState {
    counters: ScopeCounters,
    /// What agents hold under this scope, per unit.
    held: [Decimal; 3],
}

/// State changed by hot-path decisions, written once per batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dirty {
    Counters(Scope),
    Slice(String, String),
    Held(String, String),
    Agent(String),
}

/// The key history time of a slice loaded without one (stored before key
/// histories were): it counts as held now until a sweep writes the time.
const HELD_AT_UNKNOWN: UnixMs = UnixMs::MAX;

#[derive(Debug, Clone, Default)]
pub struct Ledger {
    config: LedgerConfig,
    /// What changed since the last [`Ledger::flush`]: written once per
    /// batch however many records touched it.
    dirty: HashSet<Dirty>,
    accounts: HashMap<String, AccountRecord>,
    keys: HashMap<String, KeyRecord>,
    key_by_hash: HashMap<KeyHash, String>,
    keys_by_account: HashMap<String, Vec<String>>,
    scopes: HashMap<Scope, ScopeState>,
    slices: HashMap<String, HashMap<String, Amounts>>,
    /// Key history: agent -> key -> when it last held a slice of it, as
    /// stored. Every slice has an entry; an entry without a slice is kept
    /// for the retention.
    held: HashMap<String, HashMap<String, UnixMs>>,
    /// Agents the current key history sweep has still to visit (a pass
    /// spans several sweeps on a large ledger); at most one id per agent.
    sweep_queue: Vec<String>,
    /// Agents declared dead since they last said Hello.
    released: HashSet<String>,
    /// Demand each agent last reported per key, and when.
    demand: HashMap<String, HashMap<String, (Amounts, UnixMs)>>,
    agents: HashMap<String, AgentRecord>,
    tariffs: TariffBook,
    transactions: HashSet<(String, String)>,
    /// Admin mutations, written in the commit of each change.
    audit: crate::audit::AuditLog,
}

fn not_found(what: &'static str, id: &str) -> LedgerError {
    LedgerError::NotFound {
        what,
        id: id.to_string(),
    }
}

impl Ledger {
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger {
            audit: crate::audit::AuditLog::new(config.audit),
            config,
            ..Ledger::default()
        }
    }

    /// Rebuilds the ledger from what the store holds.
    pub fn from_stored(config: LedgerConfig, state: StoredState) -> Ledger {
        let mut ledger = Ledger::new(config);
        for account in state.accounts {
            ledger.accounts.insert(account.account_id.clone(), account);
        }
        for key in state.keys {
            ledger.index_key(&key);
            ledger.keys.insert(key.key_id.clone(), key);
        }
        for (scope, counters) in state.counters {
            ledger.scopes.entry(scope).or_default().counters = counters;
        }
        for (agent_id, key_id, at_ms) in state.held {
            ledger
                .held
                .entry(agent_id)
                .or_default()
                .insert(key_id, at_ms);
        }
        for (agent_id, key_id, held) in state.slices {
            // A slice stored before key histories were: held now, at a
            // time the next sweep writes.
            ledger
                .held
                .entry(agent_id.clone())
                .or_default()
                .entry(key_id.clone())
                .or_insert(HELD_AT_UNKNOWN);
            ledger.add_held(&key_id, &held, 1);
            ledger
                .slices
                .entry(agent_id)
                .or_default()
                .insert(key_id, held);
        }
        for agent in state.agents {
            ledger.agents.insert(agent.agent_id.clone(), agent);
        }
        ledger.tariffs = TariffBook::new(state.tariffs);
        for t in state.transactions {
            ledger.transactions.insert((t.account_id, t.source_id));
        }
        ledger.audit = crate::audit::AuditLog::from_stored(ledger.config.audit, state.audit);
        ledger
    }

    fn index_key(&mut self, key: &KeyRecord) {
        self.key_by_hash.insert(key.hash, key.key_id.clone());
        self.keys_by_account
            .entry(key.account_id.clone())
            .or_default()
            .push(key.key_id.clone());
    }

    // ----- reads -------------------------------------------------------

    pub fn account(&self, account_id: &str) -> Option<&AccountRecord> {
        self.accounts.get(account_id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &AccountRecord> {
        self.accounts.values()
    }

    pub fn key(&self, key_id: &str) -> Option<&KeyRecord> {
        self.keys.get(key_id)
    }

    pub fn keys(&self) -> impl Iterator<Item = &KeyRecord> {
        self.keys.values()
    }

    pub fn keys_of_account(&self, account_id: &str) -> &[String] {
        self.keys_by_account
            .get(account_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The key whose secret hashes to `hash`, compared in constant time.
    pub fn key_by_hash(&self, hash: &KeyHash) -> Option<&KeyRecord> {
        let key_id = self.key_by_hash.get(hash)?;
        let key = self.keys.get(key_id)?;
        key.hash.ct_eq(hash).then_some(key)
    }

    pub fn tariffs(&self) -> &TariffBook {
        &self.tariffs
    }

    pub fn audit_log(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    /// Records an Admin mutation in the audit log, as writes of the same
    /// commit as the change. Call it once the change succeeded.
    pub fn audit(
        &mut self,
        now: UnixMs,
        operator: &crate::operators::Operator,
        method: &str,
        change: serde_json::Value,
        writes: &mut Vec<StoreWrite>,
    ) {
        let recorded = self.audit.record(now, operator, method, change);
        writes.push(StoreWrite::PutAudit(recorded.added));
        writes.extend((recorded.deleted.into_iter()).map(|seq| StoreWrite::DeleteAudit { seq }));
    }

    pub fn agents(&self) -> impl Iterator<Item = &AgentRecord> {
        self.agents.values()
    }

    pub fn agent(&self, agent_id: &str) -> Option<&AgentRecord> {
        self.agents.get(agent_id)
    }

    pub fn slices_of(&self, agent_id: &str) -> impl Iterator<Item = (&String, &Amounts)> {
        self.slices.get(agent_id).into_iter().flatten()
    }

    /// The keys `agent_id` holds or held a slice of, with when it last
    /// held one (as stored).
    pub fn key_history_of(&self, agent_id: &str) -> impl Iterator<Item = (&String, &UnixMs)> {
        self.held.get(agent_id).into_iter().flatten()
    }

    /// Whether `agent_id` may report charged usage for `key_id`: it holds
    /// a slice of it, or held one within the key history's retention.
    pub fn has_held(&self, agent_id: &str, key_id: &str, now: UnixMs) -> bool {
        let Some(at) = self.held.get(agent_id).and_then(|h| h.get(key_id)) else {
            return false;
        };
        now.saturating_sub(*at) <= self.config.key_history_retention_ms
            || self
                .slices
                .get(agent_id)
                .is_some_and(|s| s.contains_key(key_id))
    }

    /// Agents holding a slice for `key_id`.
    pub fn holders_of(&self, key_id: &str) -> Vec<String> {
        self.slices
            .iter()
            .filter(|(_, slices)| slices.contains_key(key_id))
            .map(|(agent, _)| agent.clone())
            .collect()
    }

    fn scope_held(&self, scope: &Scope, unit: Unit) -> Decimal {
        self.scopes
            .get(scope)
            .map(|s| s.held[unit.index()])
            .unwrap_or_default()
    }

    fn counter(&self, scope: &Scope, unit: Unit, window: Window) -> Option<&SpendCounter> {
        self.scopes.get(scope)?.counters.get(unit, window)
    }

    /// Every limit that applies to requests of `key`: its own, its
    /// account's, and the account balance (credits, cap = credited).
    fn applicable_limits(&self, key: &KeyRecord) -> Vec<(Scope, Limit)> {
        let mut limits: Vec<(Scope, Limit)> = key
            .limits
            .iter()
            .map(|l| (Scope::Key(key.key_id.clone()), *l))
            .collect();
        if let Some(account) = self.accounts.get(&key.account_id) {
            let scope = Scope::Account(account.account_id.clone());
            limits.extend(account.limits.iter().map(|l| (scope.clone(), *l)));
            limits.push((
                scope,
                Limit {
                    unit: Unit::Credits,
                    amount: account.credited,
                    window: Window::Balance,
                },
            ));
        }
        limits
    }

    fn view(&self, scope: &Scope, limit: &Limit, now: UnixMs) -> LimitView {
        let counter = self.counter(scope, limit.unit, limit.window);
        let spent = counter.map(|c| c.spent(now)).unwrap_or_default();
        let held = self.scope_held(scope, limit.unit);
        LimitView {
            scope: scope.clone(),
            limit: *limit,
            spent,
            held,
            remaining: limit
                .amount
                .saturating_sub(spent.saturating_add(held))
                .max(Decimal::ZERO),
            next_refill: counter.and_then(|c| c.next_refill(now)),
        }
    }

    /// Spent, held and remaining for every limit that applies to `key_id`.
    pub fn limit_views(&self, key_id: &str, now: UnixMs) -> Result<Vec<LimitView>, LedgerError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| not_found("key", key_id))?;
        Ok(self
            .applicable_limits(key)
            .iter()
            .map(|(scope, limit)| self.view(scope, limit, now))
            .collect())
    }

    /// Settled credits, held credits of an account.
    pub fn account_spend(&self, account_id: &str) -> (Decimal, Decimal) {
        let scope = Scope::Account(account_id.to_string());
        let spent = self
            .scopes
            .get(&scope)
            .map(|s| s.counters.total(Unit::Credits))
            .unwrap_or_default();
        (spent, self.scope_held(&scope, Unit::Credits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const NOW: UnixMs = 1_795_595_400_000;

    pub(super) fn dec(n: i64) -> Decimal {
        Decimal::from(n)
    }

    pub(super) fn tokens(n: i64) -> Amounts {
        Amounts([Some(Decimal::ZERO), Some(dec(n)), Some(Decimal::ZERO)])
    }

    /// Key `key_id` of account `acme`, with the hash of `secret`.
    pub(super) fn key_record(key_id: &str, secret: &str) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            account_id: "acme".into(),
            hash: KeyHash::of_secret(secret),
            purpose: Purpose::Realtime,
            revoked: false,
            allowed_models: vec![],
            name: String::new(),
            limits: vec![],
            created_at_ms: NOW,
        }
    }

    pub(super) fn ledger_with_key(limits: Vec<Limit>) -> Ledger {
        ledger_with_key_and_writes(limits).0
    }

    /// A ledger with account `acme`, key `k1` with `limits`, agents `a1`
    /// and `a2`, and the writes that made it.
    pub(super) fn ledger_with_key_and_writes(limits: Vec<Limit>) -> (Ledger, Vec<StoreWrite>) {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut w = Vec::new();
        ledger.create_account("acme", "Acme", NOW, &mut w).unwrap();
        ledger.create_key(key_record("k1", "s1"), &mut w).unwrap();
        ledger
            .set_limits(&Scope::Key("k1".into()), limits, NOW, &mut w)
            .unwrap();
        ledger.hello("a1", 1, "n1", &mut w).unwrap();
        ledger.hello("a2", 1, "n2", &mut w).unwrap();
        ledger.flush(&mut w);
        (ledger, w)
    }

    pub(super) fn token_limit(amount: i64, window: Window) -> Limit {
        Limit {
            unit: Unit::Tokens,
            amount: dec(amount),
            window,
        }
    }

    pub(super) fn usage(seq: u64, tokens: u64, reserved: i64) -> Usage {
        Usage {
            seq,
            key_id: "k1".into(),
            model: "m".into(),
            purpose: Purpose::Realtime,
            completion_window: None,
            priced_at: NOW,
            prompt_tokens: tokens,
            completion_tokens: 0,
            charged: true,
            reserved: Amounts::request(reserved as u64, Decimal::ZERO),
        }
    }

    pub(super) fn held_writes(writes: &[StoreWrite]) -> Vec<StoreWrite> {
        writes
            .iter()
            .filter(|w| {
                matches!(
                    w,
                    StoreWrite::PutHeld { .. } | StoreWrite::DeleteHeld { .. }
                )
            })
            .cloned()
            .collect()
    }

    #[test]
    fn an_audit_entry_and_what_retention_drops_are_writes_of_the_callers_commit() {
        let mut ledger = Ledger::new(LedgerConfig {
            audit: crate::audit::AuditRetention {
                max_entries: 1,
                max_age_ms: None,
            },
            ..LedgerConfig::default()
        });
        let ops = crate::operators::Operator {
            name: "ops".into(),
            scopes: Default::default(),
            via: crate::operators::Via::Token,
        };
        let mut first = Vec::new();
        ledger.audit(NOW, &ops, "Credit", serde_json::json!({}), &mut first);
        let entry = ledger.audit_log().newest_first().next().unwrap().clone();
        assert_eq!(first, vec![StoreWrite::PutAudit(entry)]);
        let mut second = Vec::new();
        ledger.audit(NOW, &ops, "Credit", serde_json::json!({}), &mut second);
        let entry = ledger.audit_log().newest_first().next().unwrap().clone();
        assert_eq!(
            second,
            vec![
                StoreWrite::PutAudit(entry),
                StoreWrite::DeleteAudit { seq: 1 }
            ]
        );
    }

    #[test]
    fn the_ledger_rebuilds_from_what_it_wrote() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        let mut w = Vec::new();
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        ledger.settle("a1", &usage(1, 10, 20), NOW, &mut w);
        ledger.flush(&mut w);
        // Replay every write into a stored state, as a store would.
        let mut kv = std::collections::BTreeMap::new();
        let (_, mut all) = ledger_with_key_and_writes(vec![token_limit(1000, Window::Balance)]);
        all.extend(w);
        for (k, v) in crate::store::layout::coalesce("/allot/", &all) {
            match v {
                Some(v) => kv.insert(k, v),
                None => kv.remove(&k),
            };
        }
        let state = crate::store::layout::decode(
            "/allot/",
            kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .unwrap();
        let rebuilt = Ledger::from_stored(LedgerConfig::default(), state);
        assert_eq!(
            rebuilt.limit_views("k1", NOW).unwrap(),
            ledger.limit_views("k1", NOW).unwrap()
        );
        assert_eq!(rebuilt.agent("a1").unwrap().high_water_seq, 1);
        assert!(
            rebuilt.has_held("a1", "k1", NOW) && !rebuilt.has_held("a2", "k1", NOW),
            "the key history is rebuilt"
        );
    }

    #[test]
    fn a_slice_stored_before_key_histories_counts_as_held_and_gets_its_entry() {
        let mut ledger = ledger_with_key(vec![token_limit(1000, Window::Balance)]);
        ledger
            .ask("a1", "k1", &tokens(100), &tokens(100), NOW)
            .unwrap();
        let mut w = Vec::new();
        ledger.flush(&mut w);
        let (_, mut all) = ledger_with_key_and_writes(vec![token_limit(1000, Window::Balance)]);
        all.extend(w);
        // As a store written by a coordinator without key histories.
        all.retain(|w| !matches!(w, StoreWrite::PutHeld { .. }));
        let mut kv = std::collections::BTreeMap::new();
        for (k, v) in crate::store::layout::coalesce("/allot/", &all) {
            if let Some(v) = v {
                kv.insert(k, v);
            }
        }
        let state = crate::store::layout::decode(
            "/allot/",
            kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .unwrap();
        assert!(state.held.is_empty());
        let mut rebuilt = Ledger::from_stored(LedgerConfig::default(), state);
        let later = NOW + 60_000;
        assert!(rebuilt.has_held("a1", "k1", later));
        assert_eq!(rebuilt.sweep_key_history(later), 0);
        let mut w = Vec::new();
        rebuilt.flush(&mut w);
        assert_eq!(
            held_writes(&w),
            vec![StoreWrite::PutHeld {
                agent_id: "a1".into(),
                key_id: "k1".into(),
                at_ms: later
            }]
        );
        // Given back, its late usage is charged from that time on.
        rebuilt.give_back("a1", "k1", &tokens(100));
        assert!(matches!(
            rebuilt.settle("a1", &usage(1, 10, 10), later + 1_000, &mut w),
            SettleOutcome::Settled { .. }
        ));
    }
}
