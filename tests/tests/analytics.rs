//! Usage analytics (issue 7) through a real coordinator, agent and fake
//! neuron: every settled request becomes one row, priced by the tariff
//! rules of SPEC "Pricing", and `ListUsage` / `UsageSummary` read them.

use allot::pb;
use allot_e2e::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;
use std::time::Duration;

async fn batch_key(stack: &Stack) -> (String, String) {
    let mut admin = stack.admin().await;
    let _ = admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "nightly".into(),
            name: "nightly".into(),
        }))
        .await;
    let created = admin
        .create_key(authed(pb::CreateKeyRequest {
            account_id: "nightly".into(),
            purpose: pb::Purpose::Batch as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    stack.credit("nightly", "100", "top-up-nightly-batch").await;
    (created.key.unwrap().key_id, created.secret)
}

async fn list(stack: &Stack, filter: pb::UsageFilter) -> Vec<pb::UsageRow> {
    stack.list_usage(filter).await.unwrap()
}

async fn chat(stack: &Stack, secret: &str, model: &str, window: Option<&str>) -> Value {
    let mut request = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.agent_url()))
        .bearer_auth(secret)
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": 4}),
        );
    if let Some(window) = window {
        request = request.header("x-allot-completion-window", window);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_requests_become_priced_rows_that_list_and_summarize() {
    let stack = Stack::start().await;
    stack
        .put_tariff(pb::Purpose::Realtime, "", "0.001", "0.002")
        .await;
    stack
        .put_tariff(pb::Purpose::Batch, "24h", "0.0005", "0.001")
        .await;
    let (api_key, api_secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let (batch_key, batch_secret) = batch_key(&stack).await;
    for account in ["acme", "nightly"] {
        stack
            .credit(account, "100", &format!("top-up-{account}"))
            .await;
    }

    let realtime = chat(&stack, &api_secret, MODEL, None).await;
    let windowed = chat(&stack, &batch_secret, MODEL, Some("24h")).await;
    // A batch key with a window that has no tariff pays the batch generic
    // if there is one, else realtime: here there is none, so realtime.
    let unknown_window = chat(&stack, &batch_secret, MODEL, Some("7d")).await;
    // No tariff for this model: free.
    let free = chat(&stack, &api_secret, "other-model", None).await;

    wait_until("four rows", Duration::from_secs(30), || async {
        list(&stack, pb::UsageFilter::default()).await.len() == 4
    })
    .await;
    let usage = |body: &Value| {
        (
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let rows = list(
        &stack,
        pb::UsageFilter {
            key_id: api_key.clone(),
            model: MODEL.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rows.len(), 1);
    let (prompt, completion) = usage(&realtime);
    let record = rows[0].record.as_ref().unwrap();
    assert_eq!(
        (record.prompt_tokens, record.completion_tokens),
        (prompt, completion)
    );
    assert_eq!(
        (rows[0].input_price.as_str(), rows[0].output_price.as_str()),
        ("0.001", "0.002")
    );
    assert_eq!(
        dec(&rows[0].cost),
        Decimal::from(prompt) * dec("0.001") + Decimal::from(completion) * dec("0.002")
    );
    assert_eq!(rows[0].agent_id, "agent-1");
    assert_eq!(record.origin, pb::Origin::Api as i32);

    let batch_rows = list(
        &stack,
        pb::UsageFilter {
            key_id: batch_key.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(batch_rows.len(), 2);
    let by_window = |w: &str| {
        batch_rows
            .iter()
            .find(|r| r.record.as_ref().unwrap().completion_window == w)
            .unwrap()
    };
    let (prompt, completion) = usage(&windowed);
    let row = by_window("24h");
    assert_eq!(row.tariff_completion_window, "24h");
    assert_eq!(row.tariff_purpose, pb::Purpose::Batch as i32);
    assert_eq!(
        dec(&row.cost),
        Decimal::from(prompt) * dec("0.0005") + Decimal::from(completion) * dec("0.001")
    );
    assert_eq!(
        row.record.as_ref().unwrap().origin,
        pb::Origin::Batch as i32
    );
    let (prompt, completion) = usage(&unknown_window);
    let row = by_window("7d");
    assert_eq!(
        row.tariff_purpose,
        pb::Purpose::Realtime as i32,
        "never another window's price"
    );
    assert_eq!(
        dec(&row.cost),
        Decimal::from(prompt) * dec("0.001") + Decimal::from(completion) * dec("0.002")
    );
    assert!(usage(&free).1 > 0);
    let free_rows = list(
        &stack,
        pb::UsageFilter {
            model: "other-model".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (
            free_rows[0].cost.as_str(),
            free_rows[0].input_price.as_str()
        ),
        ("0", "")
    );

    // The summary adds up to the rows.
    let all = list(&stack, pb::UsageFilter::default()).await;
    let buckets = stack
        .admin()
        .await
        .usage_summary(authed(pb::UsageSummaryRequest {
            granularity: pb::Granularity::Hour as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .buckets;
    let total = |f: &dyn Fn(&pb::UsageRow) -> Decimal| all.iter().map(f).sum::<Decimal>();
    assert_eq!(
        buckets.iter().map(|b| dec(&b.cost)).sum::<Decimal>(),
        total(&|r| dec(&r.cost))
    );
    assert_eq!(buckets.iter().map(|b| b.requests).sum::<u64>(), 4);

    // The account's credits: the ledger's spend is the rows' cost.
    let check = stack.check_usage(&api_key).await;
    let credits = check
        .checks
        .iter()
        .find(|c| c.scope == "account" && c.unit == pb::Unit::Credits as i32)
        .unwrap();
    assert!(dec(&credits.ledger_spent) > Decimal::ZERO);
    assert!(check.agrees, "{check:?}");

    // Bad input names the field.
    let refused = stack
        .admin()
        .await
        .list_usage(authed(pb::ListUsageRequest {
            page_size: 5000,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().starts_with("page_size"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_settled_again_after_a_coordinator_restart_is_one_row() {
    let mut stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    for _ in 0..3 {
        chat(&stack, &secret, MODEL, None).await;
    }
    let filter = pb::UsageFilter {
        key_id: key_id.clone(),
        ..Default::default()
    };
    wait_until("three rows", Duration::from_secs(30), || async {
        list(&stack, filter.clone()).await.len() == 3
    })
    .await;
    // The coordinator stops and starts on the same files; the agent
    // reconnects and sends more.
    let config = allot_coordinator::config::CoordinatorConfig {
        insecure: true,
        listen: stack.coordinator_addr,
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: stack.dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        ..Default::default()
    };
    stack.stop_coordinator().await;
    stack.start_coordinator_again(config).await;
    stack.wait_for_agent().await;
    chat(&stack, &secret, MODEL, None).await;
    wait_until("four rows", Duration::from_secs(30), || async {
        list(&stack, filter.clone()).await.len() == 4
    })
    .await;
    let rows = list(&stack, filter).await;
    let mut seqs: Vec<u64> = rows
        .iter()
        .map(|r| r.record.as_ref().unwrap().seq)
        .collect();
    seqs.dedup();
    assert_eq!(seqs.len(), 4, "no row twice: {seqs:?}");
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    let rows_total: u64 = rows
        .iter()
        .map(|r| {
            let r = r.record.as_ref().unwrap();
            r.prompt_tokens + r.completion_tokens
        })
        .sum();
    assert_eq!(rows_total, spent, "the ledger and the analytics agree");
    // The same check as an Admin call.
    let check = stack.check_usage(&key_id).await;
    assert!(check.agrees, "{check:?}");
    let tokens = check
        .checks
        .iter()
        .find(|c| c.scope == "key" && c.unit == pb::Unit::Tokens as i32)
        .unwrap();
    assert_eq!(tokens.rows_total, spent.to_string());
    assert_eq!(tokens.difference, "0");
}

/// Puts a tariff for [`MODEL`] in force over `[from, until)` (ms).
async fn put_tariff_between(
    stack: &Stack,
    purpose: pb::Purpose,
    prices: (&str, &str),
    from: i64,
    until: Option<i64>,
) {
    stack
        .admin()
        .await
        .put_tariff(authed(pb::PutTariffRequest {
            tariff: Some(pb::Tariff {
                model: MODEL.into(),
                purpose: purpose as i32,
                input_price: prices.0.into(),
                output_price: prices.1.into(),
                valid_from: Some(allot::clock::to_pb(from)),
                valid_until: until.map(allot::clock::to_pb),
                ..Default::default()
            }),
        }))
        .await
        .expect("put tariff");
}

fn cost_at(body: &Value, input: &str, output: &str) -> Decimal {
    Decimal::from(body["usage"]["prompt_tokens"].as_u64().unwrap()) * dec(input)
        + Decimal::from(body["usage"]["completion_tokens"].as_u64().unwrap()) * dec(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_rows_with_their_code_at_no_cost() {
    let stack = Stack::start().await;
    stack
        .put_tariff(pb::Purpose::Realtime, "", "0.001", "0.002")
        .await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "60", balance())])
        .await;
    stack.credit("acme", "100", "top-up-acme").await;
    // Over the cap by itself: refused at once, never dispatched.
    let over = stack.chat(&secret, chat_body(1000)).await;
    assert_eq!(over.status(), 429);
    let malformed = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.agent_url()))
        .bearer_auth(&secret)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    // No principal, no row.
    let unknown = stack.chat("sk-not-a-key", chat_body(5)).await;
    assert_eq!(unknown.status(), 401);
    let served = stack.chat(&secret, chat_body(5)).await;
    assert_eq!(served.status(), 200);
    assert_eq!(
        stack.neuron.hits(),
        1,
        "refused requests never reach the neuron"
    );

    wait_until("three rows", Duration::from_secs(30), || async {
        list(&stack, pb::UsageFilter::default()).await.len() == 3
    })
    .await;
    let refused = list(
        &stack,
        pb::UsageFilter {
            key_id: key_id.clone(),
            status: pb::UsageStatus::NotCharged as i32,
            ..Default::default()
        },
    )
    .await;
    let mut seen: Vec<(u32, String, String, String)> = refused
        .iter()
        .map(|row| {
            let r = row.record.as_ref().unwrap();
            (
                r.http_status,
                r.refusal_code.clone(),
                r.model_requested.clone(),
                row.cost.clone(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (400, "invalid_request_error".into(), "".into(), "0".into()),
            (429, "insufficient_quota".into(), MODEL.into(), "0".into()),
        ]
    );
    assert!(refused.iter().all(|row| {
        !row.record.as_ref().unwrap().request_id.is_empty()
            && row.input_price.is_empty()
            && row.tariff_purpose == 0
    }));
    // The summary tells refused requests apart.
    let buckets = stack
        .admin()
        .await
        .usage_summary(authed(pb::UsageSummaryRequest {
            filter: Some(pb::UsageFilter {
                key_id: key_id.clone(),
                ..Default::default()
            }),
            granularity: pb::Granularity::Day as i32,
        }))
        .await
        .unwrap()
        .into_inner()
        .buckets;
    let count = |f: fn(&pb::UsageBucket) -> u64| buckets.iter().map(f).sum::<u64>();
    assert_eq!((count(|b| b.requests), count(|b| b.refused)), (3, 2));
    // Refusals spend nothing: the ledger and the rows agree.
    let check = stack.check_usage(&key_id).await;
    assert!(check.agrees, "{check:?}");
    let tokens = check
        .checks
        .iter()
        .find(|c| c.scope == "key" && c.unit == pb::Unit::Tokens as i32)
        .unwrap();
    assert_eq!(
        dec(&tokens.ledger_spent),
        Decimal::from(
            served.json::<Value>().await.unwrap()["usage"]["total_tokens"]
                .as_u64()
                .unwrap()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_without_its_own_tariff_pays_its_purposes_generic_price() {
    let stack = Stack::start().await;
    stack
        .put_tariff(pb::Purpose::Realtime, "", "0.001", "0.002")
        .await;
    stack
        .put_tariff(pb::Purpose::Batch, "", "0.0007", "0.0014")
        .await;
    stack
        .put_tariff(pb::Purpose::Batch, "24h", "0.0005", "0.001")
        .await;
    let (key_id, secret) = batch_key(&stack).await;
    let unknown_window = chat(&stack, &secret, MODEL, Some("7d")).await;
    let no_window = chat(&stack, &secret, MODEL, None).await;
    wait_until("two rows", Duration::from_secs(30), || async {
        list(&stack, pb::UsageFilter::default()).await.len() == 2
    })
    .await;
    let rows = list(
        &stack,
        pb::UsageFilter {
            key_id,
            ..Default::default()
        },
    )
    .await;
    for (window, body) in [("7d", &unknown_window), ("", &no_window)] {
        let row = rows
            .iter()
            .find(|r| r.record.as_ref().unwrap().completion_window == window)
            .unwrap();
        assert_eq!(
            (row.tariff_purpose, row.tariff_completion_window.as_str()),
            (pb::Purpose::Batch as i32, ""),
            "the batch generic, never the 24h window's price"
        );
        assert_eq!(dec(&row.cost), cost_at(body, "0.0007", "0.0014"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_request_pays_the_price_in_force_when_its_batch_was_created() {
    let stack = Stack::start().await;
    let now = allot::clock::now_ms();
    let change = now - 3_600_000;
    put_tariff_between(
        &stack,
        pb::Purpose::Batch,
        ("0.0005", "0.001"),
        0,
        Some(change),
    )
    .await;
    put_tariff_between(
        &stack,
        pb::Purpose::Batch,
        ("0.0009", "0.0018"),
        change,
        None,
    )
    .await;
    let (key_id, secret) = batch_key(&stack).await;
    let batch_request = |created_at: Option<i64>, secret: String| {
        let stack = &stack;
        async move {
            let mut request = stack
                .http
                .post(format!("{}/v1/chat/completions", stack.agent_url()))
                .bearer_auth(secret)
                .json(&chat_body(4));
            if let Some(at) = created_at {
                request = request.header("x-allot-batch-created-at", (at / 1000).to_string());
            }
            request.send().await.unwrap()
        }
    };
    // Created two hours ago, before the price changed: the old price.
    let created = now - 2 * 3_600_000;
    let old = batch_request(Some(created), secret.clone()).await;
    assert_eq!(old.status(), 200);
    let old: Value = old.json().await.unwrap();
    let current = batch_request(None, secret.clone()).await;
    assert_eq!(current.status(), 200);
    let current: Value = current.json().await.unwrap();

    // Only a batch key may name a creation time, and only a past one.
    let (_, realtime_secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    for (at, secret) in [
        (Some(created), realtime_secret),
        (Some(now + 3_600_000), secret.clone()),
        (Some(now - 30 * 24 * 3_600_000), secret.clone()),
    ] {
        let refused = batch_request(at, secret).await;
        assert_eq!(refused.status(), 400);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["param"], "x-allot-batch-created-at", "{body}");
    }

    wait_until("two priced rows", Duration::from_secs(30), || async {
        list(
            &stack,
            pb::UsageFilter {
                status: pb::UsageStatus::Charged as i32,
                ..Default::default()
            },
        )
        .await
        .len()
            == 2
    })
    .await;
    let rows = list(
        &stack,
        pb::UsageFilter {
            key_id,
            status: pb::UsageStatus::Charged as i32,
            ..Default::default()
        },
    )
    .await;
    let historical = rows
        .iter()
        .find(|r| r.record.as_ref().unwrap().priced_at_unix_ms != 0)
        .unwrap();
    assert_eq!(
        historical.record.as_ref().unwrap().priced_at_unix_ms,
        created / 1000 * 1000
    );
    assert_eq!(historical.input_price, "0.0005");
    assert_eq!(dec(&historical.cost), cost_at(&old, "0.0005", "0.001"));
    let recent = rows
        .iter()
        .find(|r| r.record.as_ref().unwrap().priced_at_unix_ms == 0)
        .unwrap();
    assert_eq!(recent.input_price, "0.0009");
    assert_eq!(dec(&recent.cost), cost_at(&current, "0.0009", "0.0018"));
}
