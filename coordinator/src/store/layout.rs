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
        let Some(write) = decode_entry(prefix, key, Some(value))? else {
            continue;
        };
        match write {
            StoreWrite::PutAccount(a) => state.accounts.push(a),
            StoreWrite::PutKey(k) => state.keys.push(k),
            StoreWrite::PutCounters(scope, counters) => state.counters.push((scope, counters)),
            StoreWrite::PutSlice {
                agent_id,
                key_id,
                held,
            } => state.slices.push((agent_id, key_id, held)),
            StoreWrite::PutHeld {
                agent_id,
                key_id,
                at_ms,
            } => state.held.push((agent_id, key_id, at_ms)),
            StoreWrite::PutAgent(a) => state.agents.push(a),
            StoreWrite::PutTariff(t) => state.tariffs.push(t),
            StoreWrite::PutTransaction(t) => state.transactions.push(t),
            StoreWrite::PutAudit(entry) => state.audit.push(entry),
            // A value is never a delete.
            StoreWrite::DeleteSlice { .. }
            | StoreWrite::DeleteHeld { .. }
            | StoreWrite::DeleteAudit { .. } => {}
        }
    }
    Ok(state)
}

/// The write one stored key and value stand for (`value` `None`: the key
/// was deleted), the inverse of [`key_of`] and [`value_of`]. `Ok(None)` for
/// keys of other components (the election, the journal) under the prefix.
/// A deleted key of a kind the ledger never deletes (an account, say) is
/// corrupt: whoever follows the store cannot mirror it and must reload.
pub fn decode_entry(
    prefix: &str,
    key: &str,
    value: Option<&[u8]>,
) -> Result<Option<StoreWrite>, StoreError> {
    let Some(path) = key.strip_prefix(prefix) else {
        return Ok(None);
    };
    let parts: Vec<&str> = path.split('/').collect();
    let Some(value) = value else {
        return match parts.as_slice() {
            ["slices", agent, key_id] => Ok(Some(StoreWrite::DeleteSlice {
                agent_id: agent.to_string(),
                key_id: key_id.to_string(),
            })),
            ["held", agent, key_id] => Ok(Some(StoreWrite::DeleteHeld {
                agent_id: agent.to_string(),
                key_id: key_id.to_string(),
            })),
            ["audit", seq] => seq
                .parse()
                .map(|seq| Some(StoreWrite::DeleteAudit { seq }))
                .map_err(|e| corrupt(key, e)),
            ["accounts" | "keys" | "agents", _]
            | ["counters", "key" | "account", _]
            | ["tariffs" | "txns", ..] => {
                Err(corrupt(key, "deleted, and the ledger never deletes it"))
            }
            _ => Ok(None),
        };
    };
    let write = match parts.as_slice() {
        ["accounts", _] => StoreWrite::PutAccount(parse(key, value)?),
        ["keys", _] => StoreWrite::PutKey(parse(key, value)?),
        ["counters", "key", id] => {
            StoreWrite::PutCounters(Scope::Key(id.to_string()), parse(key, value)?)
        }
        ["counters", "account", id] => {
            StoreWrite::PutCounters(Scope::Account(id.to_string()), parse(key, value)?)
        }
        ["slices", agent, key_id] => StoreWrite::PutSlice {
            agent_id: agent.to_string(),
            key_id: key_id.to_string(),
            held: parse(key, value)?,
        },
        ["held", agent, key_id] => StoreWrite::PutHeld {
            agent_id: agent.to_string(),
            key_id: key_id.to_string(),
            at_ms: parse(key, value)?,
        },
        ["agents", _] => StoreWrite::PutAgent(parse(key, value)?),
        ["tariffs", ..] => StoreWrite::PutTariff(parse(key, value)?),
        ["txns", ..] => StoreWrite::PutTransaction(parse(key, value)?),
        ["audit", _] => StoreWrite::PutAudit(parse(key, value)?),
        // Keys of other components (the election) live under the prefix too.
        _ => return Ok(None),
    };
    Ok(Some(write))
}
