//! SPEC "Settlement", "Ledger" and the bad-input rules, end to end.

use allot::pb;
use allot_e2e::*;
use std::time::Duration;

async fn read_sse(response: reqwest::Response) -> Vec<serde_json::Value> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("each event is JSON"))
        .collect()
}

fn stream_body(include_usage: bool) -> serde_json::Value {
    let mut body = chat_body(5);
    body["stream"] = true.into();
    if include_usage {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}

async fn streams_settle_at_reported_usage_and_only_askers_see_the_usage_chunk(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;

    let response = stack.chat(&secret, stream_body(false)).await;
    assert_eq!(response.status(), 200);
    let events = read_sse(response).await;
    assert!(events.len() > 1);
    assert!(
        events.iter().all(|e| e["usage"].is_null()),
        "a client that did not ask saw usage: {events:?}"
    );
    // The agent asked the neuron for usage on the client's behalf.
    let forwarded = stack.neuron.last_request().unwrap().body;
    assert_eq!(forwarded["stream_options"]["include_usage"], true);

    let response = stack.chat(&secret, stream_body(true)).await;
    let events = read_sse(response).await;
    let usage_chunk = events.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    let total = usage_chunk["usage"]["total_tokens"].as_u64().unwrap();
    assert!(total > 0);

    // Both requests are the same size: each settles at what the neuron reported.
    wait_until(
        "both streams to settle",
        Duration::from_secs(30),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 == 2 * total },
    )
    .await;
}

async fn a_missing_max_tokens_is_bounded_by_what_the_allowance_pays_for(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "200", balance())])
        .await;
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let response = stack.chat(&secret, body).await;
    assert_eq!(response.status(), 200);
    let forwarded = stack.neuron.last_request().unwrap().body;
    let max_tokens = forwarded["max_tokens"]
        .as_u64()
        .expect("the agent set max_tokens");
    assert!((1..200).contains(&max_tokens), "{max_tokens}");
}

async fn a_failed_neuron_request_costs_nothing(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000", balance())])
        .await;
    stack.neuron.set_behavior(allot_fake_neuron::Behavior {
        fail_status: Some(500),
        ..Default::default()
    });
    let response = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.agent_url()))
        .bearer_auth(&secret)
        .json(&chat_body(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    wait_until(
        "the failed request to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await == 1 },
    )
    .await;
    assert_eq!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0, 0);
}

async fn an_unreachable_neuron_is_502_and_costs_nothing(backend: Backend) {
    let mut stack = Stack::start_on(backend).await;
    stack.agent.take().unwrap().stop().await;
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    stack.agent_config.neuron_url = format!("http://{unused}");
    stack.restart_agent().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(10)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0, 0);
}

async fn a_top_up_resent_with_the_same_source_id_counts_once(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let mut admin = stack.admin().await;
    admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "acme".into(),
            name: "Acme".into(),
        }))
        .await
        .unwrap();
    let credit = || pb::CreditRequest {
        account_id: "acme".into(),
        amount: "12.50".into(),
        source_id: "payment-1".into(),
        kind: 0,
    };
    let first = admin.credit(authed(credit())).await.unwrap().into_inner();
    let second = admin.credit(authed(credit())).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.account.unwrap().credited, "12.5");
}

async fn a_usage_batch_resent_on_a_new_session_is_charged_once(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (key_id, _) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let records: Vec<pb::UsageRecord> = (1..=3)
        .map(|seq| pb::UsageRecord {
            seq,
            key_id: key_id.clone(),
            model_requested: MODEL.into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            charged: true,
            ..Default::default()
        })
        .collect();
    for epoch in [1, 2] {
        let mut client =
            pb::agent_session_client::AgentSessionClient::connect(stack.coordinator_url.clone())
                .await
                .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_id: "raw-agent".into(),
                epoch,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch {
                records: records.clone(),
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let ack = loop {
            let message = tokio::time::timeout(Duration::from_secs(30), inbound.message())
                .await
                .expect("an ack in time")
                .unwrap()
                .unwrap();
            if let Some(pb::coordinator_message::Msg::UsageAck(ack)) = message.msg {
                break ack;
            }
        };
        assert_eq!(ack.high_water_seq, 3);
        assert_eq!(
            stack.key_usage(&key_id, pb::Unit::Tokens).await.0,
            45,
            "epoch {epoch}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_spooled_while_the_coordinator_is_down_is_settled_once_after_both_restart() {
    let dir = TempDir::new("restart");
    let coordinator_config = allot_coordinator::config::CoordinatorConfig {
        insecure: true,
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        ..Default::default()
    };
    let mut stack = Stack::start_with(coordinator_config.clone()).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    // The first request fetches a lease that covers the next ones.
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    wait_until(
        "the first request to settle",
        Duration::from_secs(30),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 > 0 },
    )
    .await;
    let one = stack.key_usage(&key_id, pb::Unit::Tokens).await.0;

    stack.stop_coordinator().await;
    for _ in 0..3 {
        // Admitted inside the valid lease, spooled, not acknowledged.
        assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    }
    stack.agent.take().unwrap().kill();
    stack.start_coordinator_again(coordinator_config).await;
    stack.restart_agent().await;
    wait_until(
        "the spooled usage to settle",
        Duration::from_secs(15),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 == 4 * one },
    )
    .await;
    // And nothing more arrives later.
    let agents = stack
        .admin()
        .await
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agents.agents[0].high_water_seq, 4);
    assert_eq!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0, 4 * one);
    assert_eq!(stack.neuron.hits(), 4);
}

async fn bad_input_gets_a_precise_openai_error(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let url = format!("{}/v1/chat/completions", stack.agent_url());

    let malformed = stack
        .http
        .post(&url)
        .bearer_auth(&secret)
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: serde_json::Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let unknown = stack
        .http
        .post(&url)
        .bearer_auth("sk-allot-nope")
        .json(&chat_body(5))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let anonymous = stack
        .http
        .post(&url)
        .json(&chat_body(5))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let huge = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let oversized = stack
        .http
        .post(&url)
        .bearer_auth(&secret)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(oversized.status(), 413);

    let negative = stack.http.post(&url).bearer_auth(&secret)
        .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}))
        .send().await.unwrap();
    assert_eq!(negative.status(), 400);
    let body: serde_json::Value = negative.json().await.unwrap();
    assert_eq!(body["error"]["param"], "max_tokens");

    let other_model = serde_json::json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1});
    let (_, limited_secret) = {
        let mut admin = stack.admin().await;
        let created = admin
            .create_key(authed(pb::CreateKeyRequest {
                account_id: "acme".into(),
                allowed_models: vec![MODEL.into()],
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        (created.key.unwrap().key_id, created.secret)
    };
    let not_allowed = stack
        .http
        .post(&url)
        .bearer_auth(&limited_secret)
        .json(&other_model)
        .send()
        .await
        .unwrap();
    assert_eq!(not_allowed.status(), 404);
    let body: serde_json::Value = not_allowed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(stack.neuron.hits(), 0);
}

async fn admin_calls_need_the_token_and_name_the_invalid_field(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let mut admin = stack.admin().await;
    let status = admin
        .create_account(tonic::Request::new(pb::CreateAccountRequest {
            account_id: "acme".into(),
            name: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "acme".into(),
            name: String::new(),
        }))
        .await
        .unwrap();
    for amount in ["-5", "ten", "1e3", ""] {
        let status = admin
            .credit(authed(pb::CreditRequest {
                account_id: "acme".into(),
                amount: amount.into(),
                source_id: "p1".into(),
                kind: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{amount}");
        assert!(
            status.message().starts_with("amount"),
            "{}",
            status.message()
        );
    }
    let status = admin
        .set_limits(authed(pb::SetLimitsRequest {
            scope: Some(pb::set_limits_request::Scope::AccountId("acme".into())),
            limits: vec![pb::Limit {
                unit: 0,
                amount: "5".into(),
                window: None,
            }],
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("limits[0].unit"),
        "{}",
        status.message()
    );
}

async fn no_402_ever_across_a_randomized_run_over_mixed_limits(backend: Backend) {
    let stack = Stack::start_on(backend).await;
    let mut secrets = Vec::new();
    let limit_sets = vec![
        vec![limit(pb::Unit::Tokens, "300", balance())],
        vec![limit(pb::Unit::Requests, "5", rolling(60))],
        vec![
            limit(pb::Unit::Tokens, "2000", rolling(3600)),
            limit(pb::Unit::Requests, "40", balance()),
        ],
        vec![limit(
            pb::Unit::Tokens,
            "500",
            pb::window::Kind::Calendar(pb::CalendarWindow {
                period: pb::CalendarPeriod::Day as i32,
            }),
        )],
        vec![],
    ];
    for (i, limits) in limit_sets.into_iter().enumerate() {
        secrets.push(
            stack
                .key_with_limits(&format!("acct-{}", i % 2), limits)
                .await
                .1,
        );
    }
    secrets.push("sk-allot-unknown".into());
    // A small deterministic generator: the run is the same every time.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let allowed = [200u16, 400, 401, 404, 413, 429];
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let secret = &secrets[next(secrets.len() as u64) as usize];
        let body = match next(10) {
            0 => serde_json::json!({"model": MODEL, "messages": "not an array"}),
            1 => {
                serde_json::json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
            }
            2 => {
                serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]})
            }
            _ => chat_body(1 + next(400)),
        };
        let response = stack.chat(secret, body).await;
        let status = response.status().as_u16();
        assert_ne!(status, 402);
        assert!(
            allowed.contains(&status),
            "unexpected status {status}: {}",
            response.text().await.unwrap()
        );
        *seen.entry(status).or_insert(0u32) += 1;
    }
    assert!(
        seen.contains_key(&200) && seen.contains_key(&429),
        "{seen:?}"
    );
}

on_both_stores!(
    streams_settle_at_reported_usage_and_only_askers_see_the_usage_chunk,
    a_missing_max_tokens_is_bounded_by_what_the_allowance_pays_for,
    a_failed_neuron_request_costs_nothing,
    an_unreachable_neuron_is_502_and_costs_nothing,
    a_top_up_resent_with_the_same_source_id_counts_once,
    a_usage_batch_resent_on_a_new_session_is_charged_once,
    bad_input_gets_a_precise_openai_error,
    admin_calls_need_the_token_and_name_the_invalid_field,
    no_402_ever_across_a_randomized_run_over_mixed_limits
);
