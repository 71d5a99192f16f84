//! The key layout shared by every store, under a configurable prefix:
//!
//! ```text
//! {prefix}accounts/{account_id}            AccountRecord (JSON)
//! {prefix}keys/{key_id}                    KeyRecord (JSON; hash only, never the secret)
//! {prefix}counters/{key|account}/{id}      ScopeCounters (JSON): spend per unit and window
//! {prefix}slices/{agent_id}/{key_id}       Amounts held by one agent for one key
//! {prefix}held/{agent_id}/{key_id}         When that agent last held a slice of that key (ms)
//! {prefix}agents/{agent_id}                AgentRecord: epoch, usage high-water mark
//! {prefix}tariffs/{model}/{purpose}/{window or "-"}/{valid_from_ms}   Tariff
//! {prefix}txns/{account_id}/{source_id}    TransactionRecord (credits, adjustments)
//! {prefix}audit/{seq, 20 digits}           AuditEntry: operator, method, what changed
//! ```
//! Values are JSON so that `etcdctl get --prefix /allot/` is readable.

use super::{StoreError, StoreWrite, StoredState};
use crate::ledger::records::Scope;

/// The key one write goes to.
pub fn key_of(prefix: &str, write: &StoreWrite) -> String {
    match write {
        StoreWrite::PutAccount(a) => format!("{prefix}accounts/{}", a.account_id),
        StoreWrite::PutKey(k) => format!("{prefix}keys/{}", k.key_id),
        StoreWrite::PutCounters(scope, _) => counters_key(prefix, scope),
        StoreWrite::PutSlice {
            agent_id, key_id, ..
        }
        | StoreWrite::DeleteSlice { agent_id, key_id } => {
            format!("{prefix}slices/{agent_id}/{key_id}")
        }
        StoreWrite::PutHeld {
            agent_id, key_id, ..
        }
        | StoreWrite::DeleteHeld { agent_id, key_id } => {
            format!("{prefix}held/{agent_id}/{key_id}")
        }
        StoreWrite::PutAgent(a) => format!("{prefix}agents/{}", a.agent_id),
        StoreWrite::PutTariff(t) => format!(
            "{prefix}tariffs/{}/{}/{}/{}",
            t.model,
            t.purpose.as_str(),
            t.completion_window.as_deref().unwrap_or("-"),
            t.valid_from
        ),
        StoreWrite::PutTransaction(t) => format!("{prefix}txns/{}/{}", t.account_id, t.source_id),
        StoreWrite::PutAudit(entry) => audit_key(prefix, entry.seq),
        StoreWrite::DeleteAudit { seq } => audit_key(prefix, *seq),
    }
}

/// The value one write stores (`None`: delete).
pub fn value_of(write: &StoreWrite) -> Option<Vec<u8>> {
    fn json(v: &impl serde::Serialize) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(v).expect("ledger records always serialize"))
    }
    match write {
        StoreWrite::PutAccount(a) => json(a),
        StoreWrite::PutKey(k) => json(k),
        StoreWrite::PutCounters(_, counters) => json(counters),
        StoreWrite::PutSlice { held, .. } => json(held),
        StoreWrite::DeleteSlice { .. } => None,
        StoreWrite::PutHeld { at_ms, .. } => json(at_ms),
        StoreWrite::DeleteHeld { .. } => None,
        StoreWrite::PutAgent(a) => json(a),
        StoreWrite::PutTariff(t) => json(t),
        StoreWrite::PutTransaction(t) => json(t),
        StoreWrite::PutAudit(entry) => json(entry),
        StoreWrite::DeleteAudit { .. } => None,
    }
}

/// Zero-padded, so that keys sort in the order of entries.
fn audit_key(prefix: &str, seq: u64) -> String {
    format!("{prefix}audit/{seq:020}")
}

fn counters_key(prefix: &str, scope: &Scope) -> String {
    match scope {
        Scope::Key(id) => format!("{prefix}counters/key/{id}"),
        Scope::Account(id) => format!("{prefix}counters/account/{id}"),
    }
}

/// Keeps only the last write of each key, preserving first-seen order, and
/// encodes only those: a batch touching one counter a thousand times
/// encodes and writes it once.
pub fn coalesce(prefix: &str, writes: &[StoreWrite]) -> Vec<(String, Option<Vec<u8>>)> {
    let mut order: Vec<String> = Vec::new();
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    for (index, write) in writes.iter().enumerate() {
        let key = key_of(prefix, write);
        if last.insert(key.clone(), index).is_none() {
            order.push(key);
        }
    }
    order
        .into_iter()
        .map(|key| {
            let value = value_of(&writes[last[&key]]);
            (key, value)
        })
        .collect()
}

fn corrupt(key: &str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        message: message.to_string(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, e))
}

/// Decodes every key under `prefix` into the ledger's stored state.
pub fn decode<'a>(
    prefix: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<StoredState, StoreError> {
    let mut state = StoredState::default();
    for (key, value) in entries {
        let Some(path) = key.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["accounts", _] => state.accounts.push(parse(key, value)?),
            ["keys", _] => state.keys.push(parse(key, value)?),
            ["counters", "key", id] => state
                .counters
                .push((Scope::Key(id.to_string()), parse(key, value)?)),
            ["counters", "account", id] => state
                .counters
                .push((Scope::Account(id.to_string()), parse(key, value)?)),
            ["slices", agent, key_id] => {
                state
                    .slices
                    .push((agent.to_string(), key_id.to_string(), parse(key, value)?))
            }
            ["held", agent, key_id] => {
                state
                    .held
                    .push((agent.to_string(), key_id.to_string(), parse(key, value)?))
            }
            ["agents", _] => state.agents.push(parse(key, value)?),
            ["tariffs", ..] => state.tariffs.push(parse(key, value)?),
            ["txns", ..] => state.transactions.push(parse(key, value)?),
            ["audit", _] => state.audit.push(parse(key, value)?),
            // Keys of other components (the election) live under the prefix too.
            _ => {}
        }
    }
    Ok(state)
}
