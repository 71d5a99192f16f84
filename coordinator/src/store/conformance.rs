//! The conformance suite every store must pass: the same cases and the
//! same assertions, run against the embedded store here and against a real
//! etcd by the end-to-end tests.

use super::{Store, StoreWrite};
use crate::ledger::records::{
    AccountRecord, AgentRecord, CounterEntry, Scope, ScopeCounters, TransactionKind,
    TransactionRecord,
};
use allot::limit::Window;
use allot::tariff::Tariff;
use allot::window::SpendCounter;
use allot::{Amounts, Unit};
use rust_decimal::Decimal;

fn account(id: &str, credited: i64) -> AccountRecord {
    AccountRecord {
        account_id: id.into(),
        name: id.into(),
        credited: Decimal::from(credited),
        limits: vec![],
        created_at_ms: 1,
    }
}

/// Runs every case against an empty store; panics on the first failure.
pub async fn check_store(store: &dyn Store) {
    let empty = store.load().await.expect("an empty store loads");
    assert!(
        empty.accounts.is_empty() && empty.slices.is_empty(),
        "the store starts empty"
    );

    // One batch of every kind of write is applied as a whole.
    let mut counter = SpendCounter::new(Window::Rolling { seconds: 60 }, 1_000);
    counter.record(1_000, Decimal::from(7));
    let counters = ScopeCounters {
        entries: vec![CounterEntry {
            unit: Unit::Tokens,
            counter,
        }],
    };
    let tariff = Tariff {
        model: "org/model-7b".into(),
        purpose: allot::key::Purpose::Batch,
        completion_window: Some("24h".into()),
        input_price: Decimal::new(1, 6),
        output_price: Decimal::new(2, 6),
        valid_from: 5,
        valid_until: None,
    };
    let held = Amounts([None, Some(Decimal::from(40)), Some(Decimal::new(125, 2))]);
    store
        .commit(vec![
            StoreWrite::PutAccount(account("acme", 5)),
            StoreWrite::PutCounters(Scope::Account("acme".into()), counters.clone()),
            StoreWrite::PutSlice {
                agent_id: "agent-1".into(),
                key_id: "k1".into(),
                held,
            },
            StoreWrite::PutSlice {
                agent_id: "agent-1".into(),
                key_id: "k2".into(),
                held,
            },
            StoreWrite::PutHeld {
                agent_id: "agent-1".into(),
                key_id: "k1".into(),
                at_ms: 1_000,
            },
            StoreWrite::PutHeld {
                agent_id: "agent-1".into(),
                key_id: "k2".into(),
                at_ms: 2_000,
            },
            StoreWrite::PutAgent(AgentRecord {
                agent_id: "agent-1".into(),
                epoch: 3,
                high_water_seq: 42,
                neuron_id: "n".into(),
            }),
            StoreWrite::PutTariff(tariff.clone()),
            StoreWrite::PutTransaction(TransactionRecord {
                account_id: "acme".into(),
                source_id: "pay/1".into(),
                kind: TransactionKind::Purchase,
                amount: Decimal::from(5),
                at_ms: 2,
            }),
        ])
        .await
        .expect("a batch commits");
    let loaded = store.load().await.expect("loads");
    assert_eq!(loaded.accounts, vec![account("acme", 5)]);
    assert_eq!(
        loaded.counters,
        vec![(Scope::Account("acme".into()), counters)]
    );
    assert_eq!(loaded.slices.len(), 2);
    assert!(
        loaded.slices.iter().all(|(_, _, h)| *h == held),
        "slices round-trip exactly"
    );
    let mut held = loaded.held.clone();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("agent-1".into(), "k1".into(), 1_000),
            ("agent-1".into(), "k2".into(), 2_000)
        ],
        "key history round-trips"
    );
    assert_eq!(loaded.agents[0].high_water_seq, 42);
    assert_eq!(loaded.tariffs, vec![tariff]);
    assert_eq!(
        loaded.transactions[0].source_id, "pay/1",
        "source ids may hold '/'"
    );

    // Later writes of the same key win, deletes remove, within one batch.
    store
        .commit(vec![
            StoreWrite::PutAccount(account("acme", 6)),
            StoreWrite::PutAccount(account("acme", 9)),
            StoreWrite::DeleteSlice {
                agent_id: "agent-1".into(),
                key_id: "k2".into(),
            },
            StoreWrite::PutHeld {
                agent_id: "agent-1".into(),
                key_id: "k1".into(),
                at_ms: 3_000,
            },
            StoreWrite::DeleteHeld {
                agent_id: "agent-1".into(),
                key_id: "k2".into(),
            },
        ])
        .await
        .expect("commits");
    let loaded = store.load().await.expect("loads");
    assert_eq!(loaded.accounts, vec![account("acme", 9)]);
    assert_eq!(loaded.slices.len(), 1);
    assert_eq!(loaded.slices[0].1, "k1");
    assert_eq!(
        loaded.held,
        vec![("agent-1".into(), "k1".into(), 3_000)],
        "a later key history write wins; a delete removes"
    );

    // Audit entries are kept with the batch that records them, loaded in
    // full, and deleted by retention.
    let entry = |seq: u64| crate::audit::AuditEntry {
        seq,
        at_ms: 1_000 + seq as i64,
        operator: "ops".into(),
        via: crate::operators::Via::Certificate {
            uri: "spiffe://allot/operator/ops".into(),
        },
        method: "Credit".into(),
        change: serde_json::json!({"account_id": "acme", "amount": "5"}),
    };
    store
        .commit(vec![
            StoreWrite::PutAccount(account("acme", 10)),
            StoreWrite::PutAudit(entry(1)),
            StoreWrite::PutAudit(entry(2)),
        ])
        .await
        .expect("commits");
    let loaded = store.load().await.expect("loads");
    assert_eq!(loaded.accounts, vec![account("acme", 10)]);
    let mut audit = loaded.audit.clone();
    audit.sort_by_key(|e| e.seq);
    assert_eq!(audit, vec![entry(1), entry(2)], "audit entries round-trip");
    store
        .commit(vec![
            StoreWrite::PutAudit(entry(3)),
            StoreWrite::DeleteAudit { seq: 1 },
        ])
        .await
        .expect("commits");
    let mut seqs: Vec<u64> = store
        .load()
        .await
        .expect("loads")
        .audit
        .iter()
        .map(|e| e.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![2, 3]);

    // An empty batch is a no-op.
    store.commit(Vec::new()).await.expect("empty batch");
    assert!(store.ping().await);
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_embedded_store_passes_the_conformance_suite() {
        let dir = std::env::temp_dir().join(format!("allot-conformance-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = super::super::embedded::EmbeddedStore::open(&dir.join("store.redb")).unwrap();
        super::check_store(&store).await;
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
