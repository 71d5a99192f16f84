//! SPEC "Admission" and "Settlement" through a real coordinator, a real agent
//! and the fake neuron.

use allot::pb;
use allot_e2e::*;
use std::time::Duration;

async fn balance_over_cap_is_429_insufficient_quota_before_dispatch(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "10", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(1000)).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_none());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(stack.neuron.hits(), 0);
}

async fn rolling_over_cap_is_429_rate_limit_exceeded_with_retry_after(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "10", rolling(3600))])
        .await;
    let response = stack.chat(&secret, chat_body(1000)).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!(retry_after >= 1);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(stack.neuron.hits(), 0);
}

async fn within_cap_is_served_with_exactly_one_neuron_hit_and_settled(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(50)).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-ratelimit-limit-tokens").is_some());
    assert!(response.headers().get("x-request-id").is_some());
    let body: serde_json::Value = response.json().await.unwrap();
    let reported = body["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(stack.neuron.hits(), 1);
    wait_until("the usage to settle", Duration::from_secs(30), || async {
        stack.key_usage(&key_id, pb::Unit::Tokens).await.0 == reported
    })
    .await;
}

async fn fan_out(backend: Backend, concurrent: bool) {
    let stack = Stack::start_on(backend).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100", balance())])
        .await;
    let mut statuses = Vec::new();
    if concurrent {
        let requests = (0..20).map(|_| stack.chat(&secret, chat_body(20)));
        for response in futures_util::future::join_all(requests).await {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            statuses.push((
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    } else {
        for _ in 0..20 {
            let response = stack.chat(&secret, chat_body(20)).await;
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            statuses.push((
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    let served = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused = statuses
        .iter()
        .filter(|(s, c)| *s == 429 && c == "insufficient_quota")
        .count();
    assert!(served >= 1, "{statuses:?}");
    assert!(refused >= 1, "{statuses:?}");
    assert_eq!(served + refused, 20, "{statuses:?}");
    assert_eq!(stack.neuron.hits() as usize, served);
    // Once every slice goes back, nothing stays reserved.
    // Every request has its record: the served ones priced, the refused
    // ones with their code at no cost.
    wait_until(
        "every usage record to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await as usize == served + refused },
    )
    .await;
    let mut stack = stack;
    // A graceful stop gives the agent's slice back.
    stack.agent.take().unwrap().stop().await;
    wait_until(
        "nothing to stay reserved",
        Duration::from_secs(30),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.1 == 0 },
    )
    .await;
    let (spent, reserved) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent <= 100, "spent {spent}");
    assert!(spent > 0);
    assert_eq!(reserved, 0);
}

async fn fan_out_sequential_never_exceeds_a_balance_cap(backend: Backend) {
    fan_out(backend, false).await;
}

async fn fan_out_concurrent_never_exceeds_a_balance_cap(backend: Backend) {
    fan_out(backend, true).await;
}

on_both_stores!(
    fan_out_sequential_never_exceeds_a_balance_cap,
    fan_out_concurrent_never_exceeds_a_balance_cap,
    balance_over_cap_is_429_insufficient_quota_before_dispatch,
    rolling_over_cap_is_429_rate_limit_exceeded_with_retry_after,
    within_cap_is_served_with_exactly_one_neuron_hit_and_settled
);

fn header_u64(response: &reqwest::Response, name: &str) -> u64 {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} is missing"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a whole number"))
}

/// SPEC "x-ratelimit-*": with one agent the remaining figure is the cap
/// less everything spent, on served responses and on the 429 alike, and it
/// matches the coordinator's snapshot once the usage has settled there.
#[tokio::test]
async fn rate_limit_headers_agree_with_the_snapshot_on_served_and_refused_requests() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![
                limit(pb::Unit::Tokens, "300", balance()),
                limit(pb::Unit::Requests, "50", rolling(3600)),
            ],
        )
        .await;
    // Every request uses its whole completion bound: a few fill the cap.
    stack.neuron.set_behavior(allot_fake_neuron::Behavior {
        completion_tokens: Some(60),
        ..Default::default()
    });
    let mut spent = 0;
    let mut served = 0;
    let refused = loop {
        let response = stack.chat(&secret, chat_body(60)).await;
        assert_eq!(header_u64(&response, "x-ratelimit-limit-tokens"), 300);
        assert_eq!(header_u64(&response, "x-ratelimit-limit-requests"), 50);
        if response.status() != 200 {
            break response;
        }
        let remaining = header_u64(&response, "x-ratelimit-remaining-tokens");
        let remaining_requests = header_u64(&response, "x-ratelimit-remaining-requests");
        let body: serde_json::Value = response.json().await.unwrap();
        spent += body["usage"]["total_tokens"].as_u64().unwrap();
        served += 1;
        assert_eq!(remaining, 300 - spent, "after {served} requests");
        assert_eq!(remaining_requests, 50 - served);
        assert!(served < 10, "a 300-token cap served {served} requests");
    };
    assert_eq!(refused.status(), 429);
    assert_eq!(
        header_u64(&refused, "x-ratelimit-remaining-tokens"),
        300 - spent
    );
    assert!(refused.headers().get("x-request-id").is_some());
    wait_until("the usage to settle", Duration::from_secs(30), || async {
        stack.key_usage(&key_id, pb::Unit::Tokens).await.0 == spent
    })
    .await;
    let snapshot = stack.snapshot(&key_id).await;
    let tokens = key_limit(&snapshot, pb::Unit::Tokens).unwrap();
    let held: u64 = tokens.reserved.parse().unwrap();
    let free: u64 = tokens.remaining.parse().unwrap();
    assert_eq!(free + held, 300 - spent, "snapshot {tokens:?}");
}
