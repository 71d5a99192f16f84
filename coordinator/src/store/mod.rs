//! The authoritative store behind the ledger: a small domain-level trait
//! (load everything, commit one atomic batch of writes) with two
//! implementations that share one key layout and one conformance suite.
//!
//! The store never decides anything: the leader's ledger decides, and the
//! store makes a batch of its decisions durable atomically, or not at all.
//! etcd holds small data only (counters, slices, a bounded key history,
//! high-water marks, keys, limits, tariffs, a bounded audit log); never one
//! key per request.

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod journal;
pub mod layout;

use crate::ledger::records::{
    AccountRecord, AgentRecord, KeyRecord, Scope, ScopeCounters, TransactionRecord,
};
use allot::tariff::Tariff;
use allot::Amounts;
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One durable change decided by the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreWrite {
    PutAccount(AccountRecord),
    PutKey(KeyRecord),
    PutCounters(Scope, ScopeCounters),
    PutSlice {
        agent_id: String,
        key_id: String,
        held: Amounts,
    },
    DeleteSlice {
        agent_id: String,
        key_id: String,
    },
    /// When `agent_id` last held a slice of `key_id` (its key history: the
    /// keys whose usage it may report).
    PutHeld {
        agent_id: String,
        key_id: String,
        at_ms: allot::clock::UnixMs,
    },
    /// A key history entry past its retention.
    DeleteHeld {
        agent_id: String,
        key_id: String,
    },
    PutAgent(AgentRecord),
    PutTariff(Tariff),
    PutTransaction(TransactionRecord),
    /// An audit entry, written in the commit of the change it records.
    PutAudit(crate::audit::AuditEntry),
    /// An audit entry retention no longer keeps.
    DeleteAudit {
        seq: u64,
    },
}

/// Everything the ledger needs to start: what the last leader committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredState {
    pub accounts: Vec<AccountRecord>,
    pub keys: Vec<KeyRecord>,
    pub counters: Vec<(Scope, ScopeCounters)>,
    pub slices: Vec<(String, String, Amounts)>,
    /// Key history: `(agent_id, key_id, last held ms)`.
    pub held: Vec<(String, String, allot::clock::UnixMs)>,
    pub agents: Vec<AgentRecord>,
    pub tariffs: Vec<Tariff>,
    pub transactions: Vec<TransactionRecord>,
    pub audit: Vec<crate::audit::AuditEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The batch was certainly not applied: safe to report and retry.
    #[error("store write not applied: {0}")]
    NotApplied(String),
    /// The outcome is unknown (timeout, lost connection mid-commit): the
    /// caller must reload state rather than guess.
    #[error("store write outcome unknown: {0}")]
    MaybeApplied(String),
    /// This coordinator is no longer the leader; its write was refused.
    #[error("fenced: this coordinator is not the leader")]
    Fenced,
    #[error("stored data is corrupt at {key}: {message}")]
    Corrupt { key: String, message: String },
}

/// The authoritative store of budgets.
pub trait Store: Send + Sync + 'static {
    /// Reads everything the ledger holds.
    fn load(&self) -> BoxFuture<'_, Result<StoredState, StoreError>>;
    /// Applies every write atomically (or as atomic parts that each leave a
    /// consistent state, see the etcd store), fenced by leadership.
    fn commit(&self, writes: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Whether the store answers right now (for health).
    fn ping(&self) -> BoxFuture<'_, bool>;
}
