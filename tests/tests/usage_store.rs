//! The PostgreSQL usage store (issue 7) against a real PostgreSQL server:
//! the conformance cases every usage store passes (retention included),
//! and an outage under
//! load that loses and duplicates nothing.

use allot::pb;
use allot_coordinator::config::CoordinatorConfig;
use allot_coordinator::usage::{conformance, PostgresUsageStore};
use allot_e2e::postgres::Postgres;
use allot_e2e::*;
use std::time::Duration;

#[tokio::test]
async fn the_postgres_store_passes_the_conformance_cases() {
    let pg = Postgres::start();
    let store = PostgresUsageStore::connect(&pg.url()).await.unwrap();
    conformance::run(&store).await;
    // Connecting again finds the schema in place (migrations run once).
    let again = PostgresUsageStore::connect(&pg.url()).await.unwrap();
    assert_eq!(
        conformance::all(&again, pb::UsageFilter::default(), 1000)
            .await
            .len(),
        6
    );
    conformance::retention(&again).await;
}

async fn rows(stack: &Stack, key_id: &str) -> Result<Vec<pb::UsageRow>, tonic::Status> {
    stack
        .list_usage(pb::UsageFilter {
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_under_load_loses_and_duplicates_no_row() {
    // PostgreSQL is down when the coordinator starts: budgets work anyway.
    let mut pg = Postgres::start();
    pg.stop();
    let dir = TempDir::new("pg-outage");
    let stack = Stack::start_with(CoordinatorConfig {
        insecure: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        usage_postgres_url: Some(pg.url()),
        ..Default::default()
    })
    .await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let serve = |n: usize| {
        let (stack, secret) = (&stack, secret.clone());
        async move {
            let requests = (0..n).map(|_| stack.chat(&secret, chat_body(5)));
            for response in futures_util::future::join_all(requests).await {
                assert_eq!(response.status(), 200);
            }
        }
    };
    let settled = |n: u64| {
        let stack = &stack;
        async move {
            wait_until("the ledger to settle", Duration::from_secs(30), || async {
                stack.settled_records().await == n
            })
            .await
        }
    };
    let rows_are = |n: usize| {
        let (stack, key_id) = (&stack, key_id.clone());
        async move {
            wait_until(
                "the rows to be written",
                Duration::from_secs(60),
                || async { rows(stack, &key_id).await.is_ok_and(|r| r.len() == n) },
            )
            .await
        }
    };
    serve(20).await;
    settled(20).await;
    let down = rows(&stack, &key_id).await.unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    pg.restart();
    rows_are(20).await;

    // Up, then down again under load, then back.
    serve(30).await;
    rows_are(50).await;
    pg.stop();
    serve(30).await;
    // Refusals are rows too (at no cost): five requests over the cap.
    for _ in 0..5 {
        let refused = stack.chat(&secret, chat_body(2_000_000)).await;
        assert_eq!(refused.status(), 429);
    }
    settled(85).await;
    // Long enough down for the writer's retries to give up: the rows wait
    // on disk, and are written from there once PostgreSQL is back.
    wait_until(
        "the rows to be spilled",
        Duration::from_secs(30),
        || async {
            std::fs::read_dir(dir.0.join("usage-spill")).is_ok_and(|files| {
                files
                    .flatten()
                    .any(|f| f.path().extension().is_some_and(|e| e == "rows"))
            })
        },
    )
    .await;
    pg.restart();
    rows_are(85).await;

    let rows = rows(&stack, &key_id).await.unwrap();
    let mut seqs: Vec<u64> = rows
        .iter()
        .map(|r| r.record.as_ref().unwrap().seq)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 85, "every served and refused request once");
    let refused = rows
        .iter()
        .filter(|r| r.record.as_ref().unwrap().refusal_code == "insufficient_quota")
        .count();
    assert_eq!(refused, 5);
    let check = stack.check_usage(&key_id).await;
    assert!(check.agrees, "{check:?}");
}
