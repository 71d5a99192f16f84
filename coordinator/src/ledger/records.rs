//! The records the ledger keeps and the store makes durable: accounts,
//! keys, agents, spend counters and credit transactions. Plain data; this
//! module knows nothing of the store or of the ledger's decisions, so both
//! can depend on it.

use allot::clock::UnixMs;
use allot::key::{KeyHash, Purpose};
use allot::limit::{Limit, Window};
use allot::window::SpendCounter;
use allot::{Amounts, Unit};
use rust_decimal::Decimal;

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
    pub(super) fn get(&self, unit: Unit, window: Window) -> Option<&SpendCounter> {
        self.entries
            .iter()
            .find(|e| e.unit == unit && e.counter.window() == window)
            .map(|e| &e.counter)
    }

    pub(super) fn ensure(&mut self, unit: Unit, window: Window, now: UnixMs) -> bool {
        if self.get(unit, window).is_some() {
            return false;
        }
        self.entries.push(CounterEntry {
            unit,
            counter: SpendCounter::new(window, now),
        });
        true
    }

    pub(super) fn record(&mut self, amounts: &Amounts, now: UnixMs) {
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
