//! The cases every usage store must pass, run against each implementation
//! (the embedded store in this crate's tests, PostgreSQL in the end-to-end
//! tests). Each run needs an empty store.

use super::*;

fn row(agent: &str, seq: u64, key: &str, model: &str, at: i64, charged: bool) -> pb::UsageRow {
    pb::UsageRow {
        agent_id: agent.into(),
        record: Some(pb::UsageRecord {
            seq,
            epoch: 1,
            key_id: key.into(),
            account_id: format!("acct-{key}"),
            model_requested: model.into(),
            admitted_at_unix_ms: at,
            prompt_tokens: 10,
            completion_tokens: seq,
            charged,
            batch_id: if seq.is_multiple_of(2) {
                "b1".into()
            } else {
                String::new()
            },
            origin: if seq.is_multiple_of(2) {
                pb::Origin::Batch as i32
            } else {
                pb::Origin::Api as i32
            },
            ..Default::default()
        }),
        cost: if charged {
            format!("0.{seq}")
        } else {
            "0".into()
        },
        settled_at_unix_ms: at,
        ..Default::default()
    }
}

pub fn sample() -> Vec<pb::UsageRow> {
    let hour = 3_600_000;
    vec![
        row("a1", 1, "k1", "m1", 10 * hour, true),
        row("a1", 2, "k1", "m2", 10 * hour + 5, true),
        row("a1", 3, "k2", "m1", 11 * hour, false),
        row("a2", 1, "k1", "m1", 10 * hour + 7, true),
        row("a2", 2, "k2", "m1", 35 * hour, true),
    ]
}

pub async fn all(
    store: &dyn UsageStore,
    filter: pb::UsageFilter,
    page: usize,
) -> Vec<pb::UsageRow> {
    let (mut rows, mut after) = (Vec::new(), None);
    loop {
        let (got, next) = store.list(filter.clone(), after, page).await.unwrap();
        assert!(got.len() <= page);
        rows.extend(got);
        match next {
            Some(next) => after = Some(next),
            None => return rows,
        }
    }
}

/// The cases every usage store must pass.
pub async fn run(store: &dyn UsageStore) {
    assert_eq!(store.insert(sample()).await.unwrap(), 5);
    // A re-sent record is the same row, written once.
    assert_eq!(store.insert(sample()[..2].to_vec()).await.unwrap(), 0);
    let everything = all(store, pb::UsageFilter::default(), 2).await;
    assert_eq!(everything.len(), 5, "paged by 2, nothing lost or repeated");
    let seqs: Vec<(String, u64)> = everything
        .iter()
        .map(|r| (r.agent_id.clone(), r.record.as_ref().unwrap().seq))
        .collect();
    assert_eq!(
        seqs,
        vec![
            ("a1".into(), 1),
            ("a1".into(), 2),
            ("a1".into(), 3),
            ("a2".into(), 1),
            ("a2".into(), 2)
        ]
    );
    let count = |filter: pb::UsageFilter| async move { all(store, filter, 100).await.len() };
    let base = pb::UsageFilter::default;
    assert_eq!(
        count(pb::UsageFilter {
            key_id: "k1".into(),
            ..base()
        })
        .await,
        3
    );
    assert_eq!(
        count(pb::UsageFilter {
            account_id: "acct-k2".into(),
            ..base()
        })
        .await,
        2
    );
    assert_eq!(
        count(pb::UsageFilter {
            model: "m2".into(),
            ..base()
        })
        .await,
        1
    );
    assert_eq!(
        count(pb::UsageFilter {
            batch_id: "b1".into(),
            ..base()
        })
        .await,
        2
    );
    assert_eq!(
        count(pb::UsageFilter {
            origin: pb::Origin::Batch as i32,
            ..base()
        })
        .await,
        2
    );
    assert_eq!(
        count(pb::UsageFilter {
            status: pb::UsageStatus::NotCharged as i32,
            ..base()
        })
        .await,
        1
    );
    assert_eq!(
        count(pb::UsageFilter {
            status: pb::UsageStatus::Charged as i32,
            ..base()
        })
        .await,
        4
    );
    let hour = 3_600_000;
    assert_eq!(
        count(pb::UsageFilter {
            from_unix_ms: 10 * hour + 5,
            to_unix_ms: 11 * hour,
            ..base()
        })
        .await,
        2,
        "[from, to)"
    );
    // Summaries add up to the rows they summarize.
    let buckets = summarize(everything.clone(), pb::Granularity::Hour);
    let requests: u64 = buckets.iter().map(|b| b.requests).sum();
    let completion: u64 = buckets.iter().map(|b| b.completion_tokens).sum();
    assert_eq!(requests, 5);
    assert_eq!(completion, 1 + 2 + 3 + 1 + 2);
    let k1_m1 = buckets
        .iter()
        .find(|b| b.key_id == "k1" && b.model == "m1")
        .unwrap();
    assert_eq!((k1_m1.requests, k1_m1.cost.as_str()), (2, "0.2"));
    let days = summarize(everything, pb::Granularity::Day);
    assert_eq!(
        days.iter().filter(|b| b.bucket_start_unix_ms == 0).count(),
        3
    );
    assert_eq!(
        days.iter()
            .filter(|b| b.bucket_start_unix_ms == 24 * hour)
            .count(),
        1
    );
    // A batch mixing rows already there with a new one writes the new
    // one only.
    let mut mixed = sample()[3..].to_vec();
    mixed.push(row("a3", 1, "k3", "m1", 12 * hour, true));
    assert_eq!(store.insert(mixed).await.unwrap(), 1);
    assert_eq!(all(store, pb::UsageFilter::default(), 100).await.len(), 6);
}

/// Retention deletes the rows settled before the cutoff, and only
/// those, from every filter's view; at most `limit` per call. Runs on
/// the six rows [`run`] leaves.
pub async fn retention(store: &dyn UsageStore) {
    let hour = 3_600_000;
    let seqs = |rows: Vec<pb::UsageRow>| -> Vec<(String, u64)> {
        rows.iter()
            .map(|r| (r.agent_id.clone(), r.record.as_ref().unwrap().seq))
            .collect()
    };
    // Settled at 10 h: a1/1, a1/2 and a2/1; at 11 h, 12 h, 35 h: the rest.
    assert_eq!(
        store.delete_settled_before(10 * hour, 100).await.unwrap(),
        0
    );
    assert_eq!(
        store.delete_settled_before(10 * hour + 6, 1).await.unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_settled_before(10 * hour + 6, 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.delete_settled_before(11 * hour, 100).await.unwrap(),
        1
    );
    assert_eq!(
        store.delete_settled_before(11 * hour, 100).await.unwrap(),
        0
    );
    let left = all(store, pb::UsageFilter::default(), 2).await;
    assert_eq!(
        seqs(left),
        vec![("a1".into(), 3), ("a2".into(), 2), ("a3".into(), 1)]
    );
    let k1 = pb::UsageFilter {
        key_id: "k1".into(),
        ..Default::default()
    };
    assert!(
        all(store, k1, 100).await.is_empty(),
        "the key index forgot them"
    );
    let acct = pb::UsageFilter {
        account_id: "acct-k1".into(),
        ..Default::default()
    };
    assert!(all(store, acct, 100).await.is_empty());
    let k2 = pb::UsageFilter {
        key_id: "k2".into(),
        ..Default::default()
    };
    assert_eq!(all(store, k2, 100).await.len(), 2);
    // A row re-sent after its deletion is a row again (it was settled
    // again), and the next deletion takes it again.
    assert_eq!(store.insert(sample()[..1].to_vec()).await.unwrap(), 1);
    assert_eq!(
        store.delete_settled_before(36 * hour, 100).await.unwrap(),
        4
    );
    assert!(all(store, pb::UsageFilter::default(), 100).await.is_empty());
}

/// A fresh directory for one test, and an embedded store in it.
pub fn scratch(label: &str) -> (std::path::PathBuf, EmbeddedUsageStore) {
    let dir = std::env::temp_dir().join(format!("allot-usage-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = EmbeddedUsageStore::open(&dir.join("usage.redb")).unwrap();
    (dir, store)
}
