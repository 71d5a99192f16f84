//! The audit log of Admin mutations: who (the operator's credential name,
//! and whether a token or a client certificate authenticated it, with the
//! certificate's URI SAN), when, which method, and what changed. The ledger
//! writes an entry in the same engine job as the change
//! ([`crate::ledger::Ledger::audit`]), so it is in the same store commit: a
//! change is never durable without its entry, nor an entry without its
//! change. A refused call (invalid input, denied, not found) records
//! nothing. Summaries never hold a secret or a key hash, and no entry holds
//! a token or a certificate.
//!
//! The log is bounded: at most `max_entries` entries, none older than
//! `max_age_ms`; the oldest are deleted in the commit that adds a new one.

use crate::operators::{Operator, Via};
use allot::clock::UnixMs;
use std::collections::VecDeque;

/// One recorded mutation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Increases with every entry, also across restarts and fail-overs.
    pub seq: u64,
    pub at_ms: UnixMs,
    pub operator: String,
    /// How the operator authenticated (entries stored before certificates
    /// existed were all by token).
    #[serde(default)]
    pub via: Via,
    pub method: String,
    /// What changed: a small JSON object.
    pub change: serde_json::Value,
}

impl AuditEntry {
    pub fn to_pb(&self) -> allot::pb::AuditEntry {
        allot::pb::AuditEntry {
            seq: self.seq,
            at: Some(allot::clock::to_pb(self.at_ms)),
            operator: self.operator.clone(),
            method: self.method.clone(),
            change: self.change.to_string(),
            via: self.via.as_str().to_string(),
            certificate_uri: match &self.via {
                Via::Token => String::new(),
                Via::Certificate { uri } => uri.clone(),
            },
        }
    }
}

/// How much of the log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    pub max_entries: usize,
    /// `None`: entries are kept until `max_entries` pushes them out.
    pub max_age_ms: Option<i64>,
}

impl Default for AuditRetention {
    fn default() -> Self {
        AuditRetention {
            max_entries: 10_000,
            max_age_ms: Some(365 * 86_400_000),
        }
    }
}

/// What one [`AuditLog::record`] changed: the entry added, and the entries
/// retention dropped (their `seq`, oldest first).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub added: AuditEntry,
    pub deleted: Vec<u64>,
}

/// The log as the leader holds it: oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditLog {
    retention: AuditRetention,
    entries: VecDeque<AuditEntry>,
    next_seq: u64,
}

impl AuditLog {
    pub fn new(retention: AuditRetention) -> AuditLog {
        AuditLog {
            retention,
            entries: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// The log as the store holds it (in any order).
    pub fn from_stored(retention: AuditRetention, mut stored: Vec<AuditEntry>) -> AuditLog {
        stored.sort_by_key(|e| e.seq);
        let next_seq = stored.last().map_or(1, |e| e.seq + 1);
        AuditLog {
            retention,
            entries: stored.into(),
            next_seq,
        }
    }

    /// Records a mutation and drops what retention no longer keeps; the
    /// caller writes both in its commit.
    pub fn record(
        &mut self,
        now: UnixMs,
        operator: &Operator,
        method: &str,
        change: serde_json::Value,
    ) -> Recorded {
        let entry = AuditEntry {
            seq: self.next_seq,
            at_ms: now,
            operator: operator.name.clone(),
            via: operator.via.clone(),
            method: method.to_string(),
            change,
        };
        self.next_seq += 1;
        let mut recorded = Recorded {
            added: entry.clone(),
            deleted: Vec::new(),
        };
        self.entries.push_back(entry);
        let oldest_kept = self.retention.max_age_ms.map(|age| now.saturating_sub(age));
        while let Some(front) = self.entries.front() {
            let too_many = self.entries.len() > self.retention.max_entries.max(1);
            let too_old = oldest_kept.is_some_and(|t| front.at_ms < t) && self.entries.len() > 1;
            if !(too_many || too_old) {
                break;
            }
            recorded.deleted.push(front.seq);
            self.entries.pop_front();
        }
        recorded
    }

    /// Mirrors an entry the leader wrote (a standby following the store).
    pub fn apply_put(&mut self, entry: AuditEntry) {
        self.next_seq = self.next_seq.max(entry.seq + 1);
        match self.entries.binary_search_by_key(&entry.seq, |e| e.seq) {
            Ok(at) => self.entries[at] = entry,
            Err(at) => self.entries.insert(at, entry),
        }
    }

    /// Mirrors an entry the leader's retention deleted.
    pub fn apply_delete(&mut self, seq: u64) {
        if let Ok(at) = self.entries.binary_search_by_key(&seq, |e| e.seq) {
            self.entries.remove(at);
        }
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &AuditEntry> {
        self.entries.iter().rev()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator(name: &str, via: Via) -> Operator {
        Operator {
            name: name.into(),
            scopes: Default::default(),
            via,
        }
    }

    #[test]
    fn an_entry_says_whether_a_token_or_a_certificate_authenticated_its_author() {
        let mut log = AuditLog::new(AuditRetention::default());
        let uri = "spiffe://allot/operator/alice".to_string();
        let alice = operator("alice", Via::Certificate { uri: uri.clone() });
        let first = log.record(10, &alice, "Credit", serde_json::json!({}));
        log.record(
            20,
            &operator("ops", Via::Token),
            "Credit",
            serde_json::json!({}),
        );
        let listed: Vec<_> = log.newest_first().map(AuditEntry::to_pb).collect();
        assert_eq!(
            (
                listed[1].operator.as_str(),
                listed[1].via.as_str(),
                listed[1].certificate_uri.as_str()
            ),
            ("alice", "certificate", uri.as_str())
        );
        assert_eq!(
            (
                listed[0].operator.as_str(),
                listed[0].via.as_str(),
                listed[0].certificate_uri.as_str()
            ),
            ("ops", "token", "")
        );
        assert_eq!(&first.added, log.newest_first().nth(1).unwrap());
        // An entry stored before certificates existed reads as by token.
        let old: AuditEntry = serde_json::from_str(
            r#"{"seq": 1, "at_ms": 5, "operator": "admin", "method": "Credit", "change": {}}"#,
        )
        .unwrap();
        assert_eq!(old.via, Via::Token);
    }

    #[test]
    fn entries_number_on_and_the_oldest_go_in_the_same_writes() {
        let retention = AuditRetention {
            max_entries: 2,
            max_age_ms: Some(1_000),
        };
        let mut log = AuditLog::new(retention);
        let ops = operator("ops", Via::Token);
        let recorded: Vec<Recorded> = [10, 20, 30]
            .map(|at| log.record(at, &ops, "Credit", serde_json::json!({})))
            .into();
        let seqs: Vec<u64> = log.newest_first().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 2]);
        assert_eq!(recorded[2].deleted, vec![1]);
        let stored: Vec<AuditEntry> = log.newest_first().cloned().collect();
        let mut again = AuditLog::from_stored(retention, stored);
        let recorded = again.record(5_000, &ops, "Credit", serde_json::json!({}));
        assert_eq!(
            again.newest_first().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4],
            "numbering goes on after a reload; entries past max_age are deleted"
        );
        assert_eq!(recorded.deleted, vec![2, 3]);
    }
}
