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

/// Demand older than this no longer counts in anyone's share.
pub const DEMAND_FRESH_MS: i64 = 10_000;

/// Whose spend a counter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Key(String),
    Account(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    pub account_id: String,
    pub name: String,
    /// Sum of every credit transaction.
    #[serde(with = "rust_decimal::serde::str")]
    pub credited: Decimal,
    pub limits: Vec<Limit>,
    pub created_at_ms: UnixMs,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub account_id: String,
    pub hash: KeyHash,
    pub purpose: Purpose,
    pub revoked: bool,
    pub allowed_models: Vec<String>,
    pub name: String,
    pub limits: Vec<Limit>,
    pub created_at_ms: UnixMs,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterEntry {
    pub unit: Unit,
    pub counter: SpendCounter,
}

/// Every spend counter of one scope, stored as one value so that settling a
/// request writes one key per scope, whatever the number of limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScopeCounters {
    pub entries: Vec<CounterEntry>,
}

impl ScopeCounters {
    fn get(&self, unit: Unit, window: Window) -> Option<&SpendCounter> {
        self.entries
            .iter()
            .find(|e| e.unit == unit && e.counter.window() == window)
            .map(|e| &e.counter)
    }

    fn ensure(&mut self, unit: Unit, window: Window, now: UnixMs) -> bool {
        if self.get(unit, window).is_some() {
            return false;
        }
        self.entries.push(CounterEntry {
            unit,
            counter: SpendCounter::new(window, now),
        });
        true
    }

    fn record(&mut self, amounts: &Amounts, now: UnixMs) {
        for entry in &mut self.entries {
            let amount = amounts.value(entry.unit);
            if !amount.is_zero() {
                entry.counter.record(now, amount);
            }
        }
    }

    /// All-time spend in `unit`.
    pub fn total(&self, unit: Unit) -> Decimal {
        self.get(unit, Window::Balance)
            .map(|c| c.spent(0))
            .unwrap_or_default()
    }
}

/// How far one `Hello` may move an agent's epoch ahead: an agent adds one
/// at each start, so this allows a million restarts between two sessions.
pub const MAX_EPOCH_STEP: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRecord {
    pub agent_id: String,
    pub epoch: u64,
    /// Every usage record of this agent up to here is settled.
    pub high_water_seq: u64,
    pub neuron_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionKind {
    Purchase,
    Adjustment,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransactionRecord {
    pub account_id: String,
    pub source_id: String,
    pub kind: TransactionKind,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub at_ms: UnixMs,
}

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

/// Most key history writes one sweep makes; the rest wait for the next.
pub const MAX_KEY_HISTORY_SWEEP_WRITES: usize = 1_000;

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
        self.audit.record(now, operator, method, change, writes);
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

    // ----- operator changes -------------------------------------------

    pub fn create_account(
        &mut self,
        account_id: &str,
        name: &str,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<AccountRecord, LedgerError> {
        if self.accounts.contains_key(account_id) {
            return Err(LedgerError::AlreadyExists {
                what: "account",
                id: account_id.to_string(),
            });
        }
        let account = AccountRecord {
            account_id: account_id.to_string(),
            name: name.to_string(),
            credited: Decimal::ZERO,
            limits: Vec::new(),
            created_at_ms: now,
        };
        self.accounts
            .insert(account_id.to_string(), account.clone());
        self.ensure_counters(&Scope::Account(account_id.to_string()), now, writes);
        writes.push(StoreWrite::PutAccount(account.clone()));
        Ok(account)
    }

    /// Applies a credit transaction once per `(account, source_id)`.
    /// Returns `true` when it was a duplicate (nothing changed).
    pub fn credit(
        &mut self,
        account_id: &str,
        source_id: &str,
        kind: TransactionKind,
        amount: Decimal,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<bool, LedgerError> {
        let Some(account) = self.accounts.get_mut(account_id) else {
            return Err(not_found("account", account_id));
        };
        let txn_id = (account_id.to_string(), source_id.to_string());
        if self.transactions.contains(&txn_id) {
            return Ok(true);
        }
        account.credited += amount;
        writes.push(StoreWrite::PutAccount(account.clone()));
        writes.push(StoreWrite::PutTransaction(TransactionRecord {
            account_id: account_id.to_string(),
            source_id: source_id.to_string(),
            kind,
            amount,
            at_ms: now,
        }));
        self.transactions.insert(txn_id);
        Ok(false)
    }

    pub fn create_key(
        &mut self,
        key: KeyRecord,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<KeyRecord, LedgerError> {
        if !self.accounts.contains_key(&key.account_id) {
            return Err(not_found("account", &key.account_id));
        }
        if self.keys.contains_key(&key.key_id) {
            return Err(LedgerError::AlreadyExists {
                what: "key",
                id: key.key_id.clone(),
            });
        }
        if self.key_by_hash.contains_key(&key.hash) {
            return Err(LedgerError::FailedPrecondition(
                "a key with this secret already exists".into(),
            ));
        }
        self.index_key(&key);
        self.keys.insert(key.key_id.clone(), key.clone());
        self.ensure_counters(&Scope::Key(key.key_id.clone()), key.created_at_ms, writes);
        writes.push(StoreWrite::PutKey(key.clone()));
        Ok(key)
    }

    pub fn revoke_key(
        &mut self,
        key_id: &str,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<KeyRecord, LedgerError> {
        let key = self
            .keys
            .get_mut(key_id)
            .ok_or_else(|| not_found("key", key_id))?;
        if !key.revoked {
            key.revoked = true;
            writes.push(StoreWrite::PutKey(key.clone()));
        }
        Ok(key.clone())
    }

    /// Replaces the limits of a scope. Spend already counted in a unit and
    /// window that stays keeps counting.
    pub fn set_limits(
        &mut self,
        scope: &Scope,
        limits: Vec<Limit>,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<(), LedgerError> {
        match scope {
            Scope::Key(id) => {
                let key = self.keys.get_mut(id).ok_or_else(|| not_found("key", id))?;
                key.limits = limits;
                writes.push(StoreWrite::PutKey(key.clone()));
            }
            Scope::Account(id) => {
                let account = self
                    .accounts
                    .get_mut(id)
                    .ok_or_else(|| not_found("account", id))?;
                account.limits = limits;
                writes.push(StoreWrite::PutAccount(account.clone()));
            }
        }
        self.ensure_counters(scope, now, writes);
        Ok(())
    }

    pub fn put_tariff(&mut self, tariff: Tariff, writes: &mut Vec<StoreWrite>) {
        writes.push(StoreWrite::PutTariff(tariff.clone()));
        self.tariffs.put(tariff);
    }

    /// Makes sure the scope counts all-time spend per unit and every window
    /// its limits use.
    fn ensure_counters(&mut self, scope: &Scope, now: UnixMs, writes: &mut Vec<StoreWrite>) {
        let limits: Vec<Limit> = match scope {
            Scope::Key(id) => self.keys.get(id).map(|k| k.limits.clone()),
            Scope::Account(id) => self.accounts.get(id).map(|a| a.limits.clone()),
        }
        .unwrap_or_default();
        let state = self.scopes.entry(scope.clone()).or_default();
        let mut changed = false;
        for unit in Unit::ALL {
            changed |= state.counters.ensure(unit, Window::Balance, now);
        }
        for limit in limits {
            changed |= state.counters.ensure(limit.unit, limit.window, now);
        }
        if changed {
            writes.push(StoreWrite::PutCounters(
                scope.clone(),
                state.counters.clone(),
            ));
        }
    }

    // ----- agents ------------------------------------------------------

    /// Adds `sign × amounts` to what is held under the key's scopes.
    fn add_held(&mut self, key_id: &str, amounts: &Amounts, sign: i64) {
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

    fn put_slice(&mut self, agent_id: &str, key_id: &str, held: Amounts) {
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
    fn note_held(&mut self, agent_id: &str, key_id: &str, now: UnixMs) {
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
    /// refresh interval. At most [`MAX_KEY_HISTORY_SWEEP_WRITES`] writes;
    /// the rest wait for the next sweep. Returns how many entries it forgot.
    pub fn sweep_key_history(&mut self, now: UnixMs) -> usize {
        let retention = self.config.key_history_retention_ms;
        let refresh = self.config.key_history_refresh_ms;
        let mut changed: Vec<(String, String, bool)> = Vec::new();
        'agents: for (agent_id, history) in &self.held {
            let slices = self.slices.get(agent_id);
            for (key_id, at) in history {
                if changed.len() >= MAX_KEY_HISTORY_SWEEP_WRITES {
                    break 'agents;
                }
                let age = now.saturating_sub(*at);
                let holds = slices.is_some_and(|s| s.contains_key(key_id));
                if *at == HELD_AT_UNKNOWN || (holds && age >= refresh) {
                    changed.push((agent_id.clone(), key_id.clone(), true));
                } else if !holds && age > retention {
                    changed.push((agent_id.clone(), key_id.clone(), false));
                }
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

    fn delete_slice(&mut self, agent_id: &str, key_id: &str) {
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
        let record = self
            .agents
            .entry(agent_id.to_string())
            .or_insert_with(|| AgentRecord {
                agent_id: agent_id.to_string(),
                epoch: 0,
                high_water_seq: 0,
                neuron_id: neuron_id.to_string(),
            });
        record.epoch = epoch;
        record.neuron_id = neuron_id.to_string();
        writes.push(StoreWrite::PutAgent(record.clone()));
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

fn scope_label(scope: &Scope) -> String {
    match scope {
        Scope::Key(id) => format!("key {id}"),
        Scope::Account(id) => format!("account {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot::limit::{CalendarPeriod, Window};

    const NOW: UnixMs = 1_795_595_400_000;

    fn dec(n: i64) -> Decimal {
        Decimal::from(n)
    }

    fn tokens(n: i64) -> Amounts {
        Amounts([Some(Decimal::ZERO), Some(dec(n)), Some(Decimal::ZERO)])
    }

    fn ledger_with_key(limits: Vec<Limit>) -> Ledger {
        ledger_with_key_and_writes(limits).0
    }

    /// A ledger with account `acme`, key `k1` with `limits`, agents `a1`
    /// and `a2`, and the writes that made it.
    fn ledger_with_key_and_writes(limits: Vec<Limit>) -> (Ledger, Vec<StoreWrite>) {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let mut w = Vec::new();
        ledger.create_account("acme", "Acme", NOW, &mut w).unwrap();
        ledger
            .create_key(
                KeyRecord {
                    key_id: "k1".into(),
                    account_id: "acme".into(),
                    hash: KeyHash::of_secret("s1"),
                    purpose: Purpose::Realtime,
                    revoked: false,
                    allowed_models: vec![],
                    name: String::new(),
                    limits: vec![],
                    created_at_ms: NOW,
                },
                &mut w,
            )
            .unwrap();
        ledger
            .set_limits(&Scope::Key("k1".into()), limits, NOW, &mut w)
            .unwrap();
        ledger.hello("a1", 1, "n1", &mut w).unwrap();
        ledger.hello("a2", 1, "n2", &mut w).unwrap();
        ledger.flush(&mut w);
        (ledger, w)
    }

    fn token_limit(amount: i64, window: Window) -> Limit {
        Limit {
            unit: Unit::Tokens,
            amount: dec(amount),
            window,
        }
    }

    fn usage(seq: u64, tokens: u64, reserved: i64) -> Usage {
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
    fn a_credit_is_applied_once_per_source_id() {
        let mut ledger = ledger_with_key(vec![]);
        let mut w = Vec::new();
        assert!(!ledger
            .credit("acme", "p1", TransactionKind::Purchase, dec(5), NOW, &mut w)
            .unwrap());
        assert!(ledger
            .credit("acme", "p1", TransactionKind::Purchase, dec(5), NOW, &mut w)
            .unwrap());
        assert_eq!(ledger.account("acme").unwrap().credited, dec(5));
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

    fn held_writes(writes: &[StoreWrite]) -> Vec<StoreWrite> {
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
