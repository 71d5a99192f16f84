//! Hostile input stays bounded (issue 13, items 5 and 6): Admin input over
//! a documented bound is refused naming the field and the bound, every List
//! response fits a default gRPC client by paging, and a client hammering a
//! refused key, or sending huge headers, cannot grow the usage store
//! without bound.

use allot::bounds::{MAX_ALLOWED_MODELS, MAX_HEADER_VALUE_BYTES, MAX_LIMITS, MAX_MODEL_BYTES};
use allot::pb;
use allot_e2e::*;
use prost::Message;
use serde_json::Value;
use std::time::Duration;

/// The message of a call that must fail with INVALID_ARGUMENT.
fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> String {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_input_over_a_bound_is_invalid_argument_naming_the_field_and_the_bound() {
    let stack = Stack::start().await;
    let mut admin = stack.admin().await;
    let long = |n: usize| "x".repeat(n);

    let message = refused(
        admin
            .create_account(authed(pb::CreateAccountRequest {
                account_id: "acme".into(),
                name: long(257),
            }))
            .await,
    );
    assert_eq!(message, "name: must be at most 256 bytes");
    admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "acme".into(),
            name: long(256),
        }))
        .await
        .expect("a name at the bound is taken");

    let key = |allowed_models: Vec<String>, name: String| pb::CreateKeyRequest {
        account_id: "acme".into(),
        allowed_models,
        name,
        ..Default::default()
    };
    let mut models = vec!["m".to_string(); 4];
    models[3] = long(MAX_MODEL_BYTES + 1);
    let message = refused(admin.create_key(authed(key(models, String::new()))).await);
    assert_eq!(message, "allowed_models[3]: must be at most 256 bytes");
    let many = vec!["m".to_string(); MAX_ALLOWED_MODELS + 1];
    let message = refused(admin.create_key(authed(key(many, String::new()))).await);
    assert_eq!(
        message,
        "allowed_models: must have at most 64 entries, not 65"
    );
    let message = refused(admin.create_key(authed(key(vec![], long(4096)))).await);
    assert_eq!(message, "name: must be at most 256 bytes");

    let (key_id, _) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100", balance())])
        .await;
    let set_limits = |limits: Vec<pb::Limit>| pb::SetLimitsRequest {
        scope: Some(pb::set_limits_request::Scope::KeyId(key_id.clone())),
        limits,
    };
    let too_many = vec![limit(pb::Unit::Requests, "5", balance()); MAX_LIMITS + 1];
    let message = refused(admin.set_limits(authed(set_limits(too_many))).await);
    assert_eq!(message, "limits: must have at most 32 entries, not 33");
    let huge = vec![limit(pb::Unit::Tokens, "1000000000000000", balance())];
    let message = refused(admin.set_limits(authed(set_limits(huge))).await);
    assert_eq!(
        message,
        "limits[0].amount: is too large: must be at most 100000000000000"
    );

    let tariff = |model: String, window: &str| pb::PutTariffRequest {
        tariff: Some(pb::Tariff {
            model,
            purpose: pb::Purpose::Batch as i32,
            completion_window: window.into(),
            input_price: "0.001".into(),
            output_price: "0.002".into(),
            valid_from: Some(allot::clock::to_pb(0)),
            valid_until: None,
        }),
    };
    let message = refused(
        admin
            .put_tariff(authed(tariff(MODEL.into(), "yesterday")))
            .await,
    );
    assert_eq!(
        message,
        "tariff.completion_window: must be a whole number and a unit m, h or d \
         (such as 24h), at most 366d"
    );
    let message = refused(admin.put_tariff(authed(tariff(MODEL.into(), "400d"))).await);
    assert!(
        message.starts_with("tariff.completion_window: "),
        "{message}"
    );
    let message = refused(admin.put_tariff(authed(tariff(long(300), "24h"))).await);
    assert_eq!(message, "tariff.model: must be at most 256 bytes");
    admin
        .put_tariff(authed(tariff(MODEL.into(), "24h")))
        .await
        .expect("a window of the grammar is taken");

    let credit = |amount: &str, source_id: String| pb::CreditRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        source_id,
        kind: pb::CreditKind::Purchase as i32,
    };
    let message = refused(
        admin
            .credit(authed(credit(&format!("1{}", "0".repeat(40)), "c1".into())))
            .await,
    );
    assert_eq!(
        message, "amount: is too large: must be at most 100000000000000",
        "a number that is only too large is reported as too large"
    );
    let message = refused(
        admin
            .credit(authed(credit("100000000000000.5", "c2".into())))
            .await,
    );
    assert_eq!(
        message,
        "amount: is too large: must be at most 100000000000000"
    );
    let message = refused(
        admin
            .credit(authed(credit("1.0000000001", "c3".into())))
            .await,
    );
    assert_eq!(message, "amount: must have at most 9 decimal places");
    let message = refused(admin.credit(authed(credit("5", long(257)))).await);
    assert_eq!(message, "source_id: must be at most 256 bytes");
    admin
        .credit(authed(credit("100000000000000", "c4".into())))
        .await
        .expect("an amount at the bound is taken");

    let message = refused(
        admin
            .list_usage(authed(pb::ListUsageRequest {
                filter: Some(pb::UsageFilter {
                    model: long(300),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await,
    );
    assert_eq!(message, "filter.model: must be at most 256 bytes");
    let message = refused(
        admin
            .list_keys(authed(pb::ListKeysRequest {
                page_size: 1001,
                ..Default::default()
            }))
            .await,
    );
    assert_eq!(message, "page_size: must be at most 1000, not 1001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_many_large_keys_pages_and_every_page_fits_a_default_grpc_client() {
    let stack = Stack::start().await;
    let mut admin = stack.admin().await;
    for account_id in ["big", "small"] {
        admin
            .create_account(authed(pb::CreateAccountRequest {
                account_id: account_id.into(),
                name: account_id.into(),
            }))
            .await
            .unwrap();
    }
    // Keys as large as the bounds allow: about 17 KB each, 5 MB together,
    // more than a default gRPC client (grpcurl, tonic) takes in one message.
    const KEYS: usize = 300;
    let models: Vec<String> = (0..MAX_ALLOWED_MODELS)
        .map(|i| format!("{i:03}{}", "m".repeat(MAX_MODEL_BYTES - 3)))
        .collect();
    for i in 0..KEYS {
        admin
            .create_key(authed(pb::CreateKeyRequest {
                account_id: "big".into(),
                key_id: format!("key-{i:04}"),
                allowed_models: models.clone(),
                name: "n".repeat(256),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    for account_id in ["", "big"] {
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let page = admin
                .list_keys(authed(pb::ListKeysRequest {
                    account_id: account_id.into(),
                    page_token: token.clone(),
                    ..Default::default()
                }))
                .await
                .expect("every page fits a default client's 4 MiB")
                .into_inner();
            assert!(page.encoded_len() < 4 * 1024 * 1024);
            pages += 1;
            seen.extend(page.keys.into_iter().map(|k| k.key_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert!(pages >= 2, "{pages} pages");
        let expected: Vec<String> = (0..KEYS).map(|i| format!("key-{i:04}")).collect();
        assert_eq!(seen, expected, "each key once, in order");
    }

    // A small page size pages too, and the other Lists page the same way.
    let first = admin
        .list_accounts(authed(pb::ListAccountsRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.accounts.len(), 1);
    assert_eq!(first.accounts[0].account_id, "big");
    let second = admin
        .list_accounts(authed(pb::ListAccountsRequest {
            page_size: 1,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.accounts[0].account_id, "small");
    assert!(second.next_page_token.is_empty());
}

async fn rows(stack: &Stack, filter: pb::UsageFilter) -> Vec<pb::UsageRow> {
    stack.list_usage(filter).await.unwrap()
}

/// Waits until every record the agent numbered up to a served request is a
/// row (records are numbered 1, 2, ... by a fresh agent).
async fn wait_for_every_row(stack: &Stack) {
    wait_until(
        "every record to be a row",
        Duration::from_secs(30),
        || async {
            let all = rows(stack, pb::UsageFilter::default()).await;
            let highest = all
                .iter()
                .map(|r| r.record.as_ref().unwrap().seq)
                .max()
                .unwrap_or(0);
            all.iter().any(|r| r.record.as_ref().unwrap().charged) && all.len() as u64 == highest
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_recorded_at_most_n_per_key_per_minute_with_header_values_capped() {
    const PER_MINUTE: u32 = 5;
    const SENT: usize = 30;
    let mut stack = Stack::start().await;
    stack.agent.take().unwrap().stop().await;
    stack.agent_config.refusal_records_per_key_per_minute = PER_MINUTE;
    stack.restart_agent().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "10", balance())])
        .await;
    let huge = "h".repeat(16 * 1024);
    for _ in 0..SENT {
        let response = stack
            .http
            .post(format!("{}/v1/chat/completions", stack.agent_url()))
            .bearer_auth(&secret)
            .header("x-allot-batch-id", &huge)
            .header("x-allot-completion-window", &huge)
            .json(&chat_body(1000))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "the headers are over their bound");
    }
    // A served request of another key marks the end of the refusals.
    let (_, served_secret) = stack
        .key_with_limits("other", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    assert_eq!(stack.chat(&served_secret, chat_body(5)).await.status(), 200);
    wait_for_every_row(&stack).await;

    let refused = rows(
        &stack,
        pb::UsageFilter {
            key_id,
            ..Default::default()
        },
    )
    .await;
    // The refusals may straddle a minute boundary: at most N in each.
    let mut per_minute = std::collections::BTreeMap::<i64, u32>::new();
    for row in &refused {
        let record = row.record.as_ref().unwrap();
        *per_minute
            .entry(record.admitted_at_unix_ms.div_euclid(60_000))
            .or_default() += 1;
        assert_eq!(record.refusal_code, "invalid_request_error");
        assert_eq!(record.batch_id.len(), MAX_HEADER_VALUE_BYTES);
        assert_eq!(record.completion_window.len(), MAX_HEADER_VALUE_BYTES);
    }
    assert!(
        per_minute.values().all(|n| *n <= PER_MINUTE),
        "{per_minute:?}"
    );
    assert!(
        refused.len() >= PER_MINUTE as usize && refused.len() <= 2 * PER_MINUTE as usize,
        "{} rows of {SENT} refusals",
        refused.len()
    );
    assert_eq!(stack.neuron.hits(), 1, "refusals never reach the neuron");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_request_with_an_over_long_or_malformed_header_is_400_naming_it() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let send = |name: &'static str, value: String| {
        let (stack, secret) = (&stack, secret.clone());
        async move {
            stack
                .http
                .post(format!("{}/v1/chat/completions", stack.agent_url()))
                .bearer_auth(secret)
                .header(name, value)
                .json(&chat_body(5))
                .send()
                .await
                .unwrap()
        }
    };
    for (name, value) in [
        ("x-allot-batch-id", "b".repeat(MAX_HEADER_VALUE_BYTES + 1)),
        ("x-allot-completion-window", "yesterday".to_string()),
        ("x-allot-completion-window", "0h".to_string()),
        ("x-allot-completion-window", "w".repeat(10_000)),
    ] {
        let response = send(name, value).await;
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], name, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().starts_with(name),
            "{body}"
        );
    }
    assert_eq!(stack.neuron.hits(), 0, "never served cut");
    let served = send("x-allot-batch-id", "b".repeat(MAX_HEADER_VALUE_BYTES)).await;
    assert_eq!(served.status(), 200);
    let windowed = send("x-allot-completion-window", "24h".to_string()).await;
    assert_eq!(windowed.status(), 200);
    wait_for_every_row(&stack).await;
    let kept = rows(
        &stack,
        pb::UsageFilter {
            key_id,
            status: pb::UsageStatus::Charged as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().any(|r| {
        let record = r.record.as_ref().unwrap();
        record.batch_id.len() == MAX_HEADER_VALUE_BYTES && record.completion_window.is_empty()
    }));
}
