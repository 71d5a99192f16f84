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
    let (key_id, secret) = stack
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
        // Usage counts only for a key the agent was granted a slice of, and
        // a slice only of a key a client showed it (looked up by secret).
        tx.send(pb::AgentMessage {
            msg: Some(key_lookup(&secret)),
        })
        .await
        .unwrap();
        tx.send(pb::AgentMessage {
            msg: Some(allowance_ask(1, &key_id, 100)),
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

/// Durable before delivered (DESIGN "Settlement, exactly once"): the agent
/// runs as its own process and is killed with SIGKILL, again and again,
/// under steady load of plain and streamed requests, and restarted on the
/// same spool directory. Every response a client received in full (200
/// with usage, or a stream that reached `[DONE]`) is charged exactly once.
/// `ALLOT_E2E_AGENT` may name another agent binary (to see an older one
/// fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_delivered_in_full_survives_repeated_kill_9_of_the_agent_and_is_charged_once(
) {
    use allot_e2e::process::{free_addr, ServiceProcess};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    const ROUNDS: usize = 5;
    const WORKERS: usize = 8;
    const COMPLETIONS_PER_ROUND: usize = 150;

    let mut stack = Stack::start().await;
    stack.agent.take().unwrap().stop().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, "1000000000000", balance())],
        )
        .await;
    let addr = free_addr();
    let agent_url = format!("http://{addr}");
    let spool = stack.dir.0.join("kill9-spool");
    let binary = std::env::var_os("ALLOT_E2E_AGENT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| allot_e2e::process::binary("allot-agent"));
    let start_agent = |round: usize| {
        let args: Vec<String> = [
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            "off",
            "--coordinators",
            &stack.coordinator_url,
            "--agent-id",
            "agent-k9",
            "--neuron-id",
            "neuron-1",
            "--neuron-url",
            &stack.neuron_url,
            "--spool-dir",
            &spool.display().to_string(),
            "--allowance-wait-ms",
            "2000",
            "--insecure",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = stack.dir.0.join(format!("agent-{round}.log"));
        ServiceProcess::spawn_binary(&binary, &args, &[("RUST_LOG", "info".into())], log)
    };

    // Completed responses: request id → total tokens the client saw.
    let completed: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (completed, stop, url, secret) = (
            completed.clone(),
            stop.clone(),
            format!("{agent_url}/v1/chat/completions"),
            secret.clone(),
        );
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let request_id = format!("k9-{worker}-{n}");
                let streamed = n.is_multiple_of(2);
                let body = if streamed {
                    stream_body(true)
                } else {
                    chat_body(5)
                };
                let tokens = async {
                    let response = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .header("x-request-id", &request_id)
                        .json(&body)
                        .send()
                        .await
                        .ok()?;
                    if response.status() != 200 {
                        return None;
                    }
                    let text = response.text().await.ok()?;
                    if !streamed {
                        let body: serde_json::Value = serde_json::from_str(&text).ok()?;
                        return body["usage"]["total_tokens"].as_u64();
                    }
                    if !text.ends_with("data: [DONE]\n\n") {
                        return None;
                    }
                    text.split("\n\n")
                        .filter_map(|event| event.strip_prefix("data: "))
                        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
                        .find_map(|event| event["usage"]["total_tokens"].as_u64())
                }
                .await;
                match tokens {
                    Some(tokens) => {
                        completed.lock().unwrap().insert(request_id, tokens);
                    }
                    // The agent is down or restarting: pace the retries.
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }

    let count = || completed.lock().unwrap().len();
    for round in 0..ROUNDS {
        let agent = start_agent(round);
        wait_agent_ready(&agent_url, Duration::from_secs(30)).await;
        let target = count() + COMPLETIONS_PER_ROUND;
        wait_until(
            "clients to complete requests through the agent",
            Duration::from_secs(30),
            || async { count() >= target },
        )
        .await;
        // SIGKILL under load: no drain, no flush.
        drop(agent);
    }
    let _agent = start_agent(ROUNDS);
    wait_agent_ready(&agent_url, Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let completed = completed.lock().unwrap().clone();
    let rows_of = |rows: &[pb::UsageRow]| {
        let mut by_request: HashMap<String, Vec<pb::UsageRecord>> = HashMap::new();
        for row in rows {
            let record = row.record.clone().unwrap();
            by_request
                .entry(record.request_id.clone())
                .or_default()
                .push(record);
        }
        by_request
    };
    // Every completed request settled (polled, with a deadline).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = list_all_usage(&stack, &key_id).await.unwrap_or_default();
        let by_request = rows_of(&rows);
        if completed.keys().all(|id| by_request.contains_key(id)) {
            break rows;
        }
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<&String> = completed
                .keys()
                .filter(|id| !by_request.contains_key(*id))
                .collect();
            panic!(
                "{} of {} responses delivered in full were never charged: {missing:?}",
                missing.len(),
                completed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_request = rows_of(&rows);
    for (request_id, tokens) in &completed {
        let records = &by_request[request_id];
        assert_eq!(
            records.len(),
            1,
            "{request_id} settled more than once: {records:?}"
        );
        let record = &records[0];
        assert!(record.charged, "{request_id}");
        assert_eq!(
            record.prompt_tokens + record.completion_tokens,
            *tokens,
            "{request_id}: charged what the client saw"
        );
    }
    for (request_id, records) in &by_request {
        assert_eq!(records.len(), 1, "{request_id} settled more than once");
    }
    // The ledger charged each row once: its spend is the rows' sum, and
    // covers what clients saw (requests cut by a kill after their record
    // was on disk are charged too, at what the neuron reported).
    let charged: u64 = rows
        .iter()
        .filter_map(|row| row.record.as_ref())
        .filter(|r| r.charged)
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    let observed: u64 = completed.values().sum();
    let spent = stack.key_usage(&key_id, pb::Unit::Tokens).await.0;
    assert_eq!(spent, charged);
    assert!(spent >= observed, "spent {spent} < delivered {observed}");
    assert!(completed.len() >= ROUNDS * COMPLETIONS_PER_ROUND);
}

/// Every usage row of `key_id`, in pages of 1000.
async fn list_all_usage(stack: &Stack, key_id: &str) -> Result<Vec<pb::UsageRow>, tonic::Status> {
    let mut admin = stack.admin().await;
    let (mut rows, mut token) = (Vec::new(), String::new());
    loop {
        let page = admin
            .list_usage(authed(pb::ListUsageRequest {
                filter: Some(pb::UsageFilter {
                    key_id: key_id.into(),
                    ..Default::default()
                }),
                page_size: 1000,
                page_token: token,
            }))
            .await?
            .into_inner();
        rows.extend(page.rows);
        if page.next_page_token.is_empty() {
            return Ok(rows);
        }
        token = page.next_page_token;
    }
}

/// A tmpfs of `size`, mounted for one test (needs root, as CI runs) and
/// lazily unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` when this process is not root: the test is then skipped.
    fn mount(path: std::path::PathBuf, size: &str) -> Option<Tmpfs> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0");
        if !root {
            eprintln!("skipped: mounting a small tmpfs for the spool needs root");
            return None;
        }
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(mounted.success(), "mount -t tmpfs failed as root");
        Some(Tmpfs(path))
    }

    /// Fills what is left of it; the file to remove to free it again.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn error_code(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// A full disk under the spool (a real one: a 256 KiB tmpfs, filled): the
/// request whose record cannot be written gets 503 instead of its
/// response, new requests get 503 `usage_spool_unavailable`, `/readyz`
/// says why, and nothing unwritten reaches the coordinator. Once the disk
/// has room again, the agent admits again without a restart and every
/// record is settled once, the held one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_stops_admission_acknowledges_nothing_unwritten_and_recovers_by_itself() {
    let mut stack = Stack::start().await;
    let Some(disk) = Tmpfs::mount(stack.dir.0.join("small-disk"), "256k") else {
        return;
    };
    stack.agent.take().unwrap().stop().await;
    stack.agent_config.spool_dir = disk.0.join("spool");
    stack.agent_config.agent_id = "agent-small-disk".into();
    stack.restart_agent().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, "1000000000", balance())],
        )
        .await;
    let spent = || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 };
    let ready = || async {
        let response = stack
            .http
            .get(format!("{}/readyz", stack.agent_url()))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };

    let first = stack.chat(&secret, chat_body(5)).await;
    assert_eq!(first.status(), 200);
    let body: serde_json::Value = first.json().await.unwrap();
    let per_request = body["usage"]["total_tokens"].as_u64().unwrap();
    wait_until(
        "the first request to settle",
        Duration::from_secs(30),
        || async { spent().await == per_request },
    )
    .await;

    let filler = disk.fill();
    // What is left of the spool file's last page still takes records;
    // then a record finds no room.
    let mut delivered = 1u64;
    let (status, code, message) = loop {
        let response = stack.chat(&secret, chat_body(5)).await;
        if response.status() != 200 {
            break error_code(response).await;
        }
        delivered += 1;
        assert!(
            delivered < 200,
            "the agent kept answering 200 with its spool's disk full"
        );
    };
    assert_eq!(
        (status, code.as_str()),
        (503, "usage_spool_unavailable"),
        "{message}"
    );
    assert!(message.contains("not delivered"), "{message}");
    let neuron_hits = stack.neuron.hits();

    // Admission stops, before the neuron, and says why.
    let (status, code, message) = error_code(stack.chat(&secret, chat_body(5)).await).await;
    assert_eq!((status, code.as_str()), (503, "usage_spool_unavailable"));
    assert!(message.contains("cannot record usage"), "{message}");
    assert_eq!(stack.neuron.hits(), neuron_hits);
    let (status, why) = ready().await;
    assert_eq!(status, 503);
    assert!(why.contains("cannot record usage"), "{why}");

    // What is on disk settles; the record that is not stays unsent.
    wait_until(
        "the records on disk to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await == delivered },
    )
    .await;
    assert_eq!(spent().await, delivered * per_request);
    for _ in 0..10 {
        // A few more refusals, while the agent's usage flush (100 ms) runs.
        let (status, _, _) = error_code(stack.chat(&secret, chat_body(5)).await).await;
        assert_eq!(status, 503);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            stack.settled_records().await,
            delivered,
            "an unwritten record was acknowledged"
        );
    }

    // Room again: no restart needed.
    std::fs::remove_file(filler).unwrap();
    wait_until(
        "the agent to admit again",
        Duration::from_secs(15),
        || async { ready().await.0 == 200 },
    )
    .await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    // The held record (its request reached the neuron) and the new one
    // settle, each once.
    let records = delivered + 2;
    wait_until(
        "every record to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await == records },
    )
    .await;
    assert_eq!(spent().await, records * per_request);
    // Usage rows follow the ledger commit: wait for them, then check that
    // each request has one.
    wait_until(
        "every settled record's usage row",
        Duration::from_secs(30),
        || async { list_all_usage(&stack, &key_id).await.unwrap().len() as u64 >= records },
    )
    .await;
    let rows = list_all_usage(&stack, &key_id).await.unwrap();
    let mut ids: Vec<String> = rows
        .iter()
        .map(|row| row.record.as_ref().unwrap().request_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len() as u64, ids.len() as u64), (records, records));
    assert_eq!(stack.neuron.hits() as u64, records);
}

/// A spool directory wiped while the coordinator remembers the agent: the
/// agent restarts at epoch 1, the coordinator refuses it, and the agent
/// says so in `/readyz` (and its log) with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_spool_directory_is_explained_in_readyz() {
    let mut stack = Stack::start().await;
    stack.agent.take().unwrap().stop().await;
    // A second start: epoch 2.
    stack.restart_agent().await;
    stack.agent.take().unwrap().stop().await;
    std::fs::remove_dir_all(&stack.agent_config.spool_dir).unwrap();
    let agent = allot_e2e::start_agent(stack.agent_config.clone()).await;
    let url = format!("{}/readyz", agent.url);
    let explained = |text: &str| text.contains("older than") && text.contains("wiped");
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !explained(&last) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never explained the refusal: {last}"
        );
        let response = stack.http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 503);
        last = response.text().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.contains("state.json"), "{last}");

    // An operator resets the agent (audited, scope `agents`); the agent
    // then connects by itself, and what was settled stays settled.
    let mut admin = stack.admin().await;
    let reset = admin
        .reset_agent(authed(pb::ResetAgentRequest {
            agent_id: "agent-1".into(),
        }))
        .await
        .expect("reset")
        .into_inner();
    assert_eq!(reset.epoch, 0);
    assert!(!reset.connected);
    wait_agent_ready(&agent.url, Duration::from_secs(30)).await;
    let refused = admin
        .reset_agent(authed(pb::ResetAgentRequest {
            agent_id: "agent-1".into(),
        }))
        .await
        .expect_err("a connected agent is not reset");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let audit = admin
        .list_audit(authed(pb::ListAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        audit
            .entries
            .iter()
            .filter(|e| e.method == "ResetAgent")
            .count(),
        1,
        "one audit entry, none for the refused call"
    );
    agent.stop().await;
}

/// The records an agent holds until acknowledged are bounded
/// (`spool_max_records`): with the coordinator gone, admission stops at
/// the bound with 503 instead of dropping anything, and resumes by itself
/// once the coordinator acknowledges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_spool_max_records_unacknowledged_admission_stops_with_503_and_nothing_is_dropped() {
    let dir = TempDir::new("spool-cap");
    let coordinator_config = allot_coordinator::config::CoordinatorConfig {
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        insecure: true,
        ..Default::default()
    };
    let mut stack = Stack::start_with(coordinator_config.clone()).await;
    stack.agent.take().unwrap().stop().await;
    stack.agent_config.spool_max_records = 3;
    stack.restart_agent().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    // The first request fetches a lease that covers the next ones.
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    wait_until(
        "the first request to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await == 1 },
    )
    .await;
    let one = stack.key_usage(&key_id, pb::Unit::Tokens).await.0;

    stack.stop_coordinator().await;
    for _ in 0..3 {
        assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    }
    let (status, code, message) = error_code(stack.chat(&secret, chat_body(5)).await).await;
    assert_eq!((status, code.as_str()), (503, "usage_spool_unavailable"));
    assert!(message.contains("holds 3 usage records"), "{message}");
    assert_eq!(
        stack.neuron.hits(),
        4,
        "the refused request reached the neuron"
    );

    stack.start_coordinator_again(coordinator_config).await;
    wait_until("admission to resume", Duration::from_secs(30), || async {
        stack.chat(&secret, chat_body(5)).await.status() == 200
    })
    .await;
    wait_until(
        "every record to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await == 5 },
    )
    .await;
    assert_eq!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0, 5 * one);
}
