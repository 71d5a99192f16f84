//! Allowances across many agents: nearly all of a cap is usable, never more.

use allot::pb;
use allot_e2e::*;
use allot_fake_neuron::FakeNeuron;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Agents {
    urls: Vec<String>,
    agents: Vec<RunningAgent>,
    neuron: FakeNeuron,
    _dir: TempDir,
}

async fn agents(coordinator_url: &str, count: usize) -> Agents {
    let dir = TempDir::new("agents");
    let (neuron, neuron_url) = start_neuron(&[MODEL], "n", Default::default()).await;
    let mut running = Vec::new();
    for i in 0..count {
        running.push(
            start_agent(allot_agent::config::AgentConfig {
                insecure: true,
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: None,
                coordinators: vec![coordinator_url.to_string()],
                agent_id: format!("agent-{i}"),
                neuron_id: format!("neuron-{i}"),
                neuron_url: neuron_url.clone(),
                spool_dir: dir.0.join(format!("agent-{i}")),
                allowance_wait_ms: 2_000,
                ..Default::default()
            })
            .await,
        );
    }
    for agent in &running {
        wait_agent_ready(&agent.url, Duration::from_secs(60)).await;
    }
    Agents {
        urls: running.iter().map(|a| a.url.clone()).collect(),
        agents: running,
        neuron,
        _dir: dir,
    }
}

/// Eight agents share one key; one gets 80% of the requests. Load runs until
/// the first final refusal. Spend stays within the cap and reaches 99% of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_with_skewed_load_use_99_percent_of_a_cap_and_never_more() {
    let stack = Stack::start().await;
    let cap: u64 = 20_000;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &cap.to_string(), balance())],
        )
        .await;
    let fleet = agents(&stack.coordinator_url, 8).await;
    let refused = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for worker in 0..8u64 {
        let (refused, served, refusals, http, urls, secret) = (
            refused.clone(),
            served.clone(),
            refusals.clone(),
            http.clone(),
            fleet.urls.clone(),
            secret.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut seed = 0x2545_F491_4F6C_DD1D ^ (worker + 1);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while !refused.load(Ordering::SeqCst) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cap was not reached in time"
                );
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let agent = if seed % 10 < 8 {
                    0
                } else {
                    1 + (seed / 10) as usize % 7
                };
                let response = http
                    .post(format!("{}/v1/chat/completions", urls[agent]))
                    .bearer_auth(&secret)
                    .json(&chat_body(20))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    429 => {
                        let body: serde_json::Value = response.json().await.unwrap();
                        assert_eq!(body["error"]["code"], "insufficient_quota");
                        refusals.fetch_add(1, Ordering::SeqCst);
                        refused.store(true, Ordering::SeqCst);
                    }
                    503 => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let served = served.load(Ordering::SeqCst);
    assert_eq!(fleet.neuron.hits(), served);
    // Refusals are recorded too, at no cost.
    let records = served + refusals.load(Ordering::SeqCst);
    wait_until(
        "every served and refused request to settle",
        Duration::from_secs(60),
        || async { stack.settled_records().await == records },
    )
    .await;
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent <= cap, "spent {spent} over the cap {cap}");
    assert!(
        spent * 100 >= cap * 99,
        "only {spent} of {cap} was usable before the first refusal"
    );
    println!(
        "utilisation: spent {spent} of {cap} ({:.2}%), served {served}",
        spent as f64 * 100.0 / cap as f64
    );
    for agent in fleet.agents {
        agent.stop().await;
    }
}

/// SPEC Ledger 3: a top-up is pushed; a refused client is served again at
/// once, without waiting for a cached refusal to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_top_up_a_refused_client_is_served_again_within_a_second() {
    let stack = Stack::start().await;
    stack
        .put_tariff(pb::Purpose::Realtime, "", "0.001", "0.001")
        .await;
    let (_, secret) = stack.key_with_limits("acme", vec![]).await;
    // Wait until the agent has the tariff, so that it prices the request.
    wait_until(
        "the tariff to reach the agent",
        Duration::from_secs(60),
        || async { stack.chat(&secret, chat_body(20)).await.status() == 429 },
    )
    .await;
    let response = stack.chat(&secret, chat_body(20)).await;
    assert_eq!(response.status(), 429);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(stack.neuron.hits(), 0);

    stack.credit("acme", "10", "topup-1").await;
    let topped_up = tokio::time::Instant::now();
    wait_until(
        "the top-up to serve the client again",
        Duration::from_secs(1),
        || async { stack.chat(&secret, chat_body(20)).await.status() == 200 },
    )
    .await;
    println!("top-up to first served request: {:?}", topped_up.elapsed());
}

/// SPEC Ledger 3: revoking a key is pushed to the agents that know it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_agents_within_a_second() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    stack
        .admin()
        .await
        .revoke_key(authed(pb::RevokeKeyRequest { key_id }))
        .await
        .unwrap();
    wait_until(
        "the agent to refuse the revoked key",
        Duration::from_secs(1),
        || async { stack.chat(&secret, chat_body(5)).await.status() == 401 },
    )
    .await;
    // Requests admitted before the push arrived were served; from the push
    // on, none reaches the neuron.
    let hits = stack.neuron.hits();
    for _ in 0..5 {
        assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 401);
    }
    assert_eq!(stack.neuron.hits(), hits);
}

/// SPEC Ledger 3: a spent cap is pushed to every agent holding a slice,
/// which then refuses beyond its slice without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_depleted_key_is_pushed_to_every_agent_holding_it() {
    let stack = Stack::start().await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Requests, "3", balance())])
        .await;
    let fleet = agents(&stack.coordinator_url, 2).await;
    let http = reqwest::Client::new();
    let send = |url: String| {
        let (http, secret) = (http.clone(), secret.clone());
        async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(secret)
                .json(&chat_body(5))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The second agent takes part of the budget, the first spends the rest.
    assert_eq!(send(fleet.urls[1].clone()).await, 200);
    let mut served = 1;
    while send(fleet.urls[0].clone()).await == 200 {
        served += 1;
    }
    assert!(served <= 3);
    // The second agent learns of the depletion by push and refuses locally.
    wait_until(
        "the depletion to reach the other agent",
        Duration::from_secs(1),
        || async { send(fleet.urls[1].clone()).await == 429 },
    )
    .await;
    assert_eq!(fleet.neuron.hits(), served);
    for agent in fleet.agents {
        agent.stop().await;
    }
}

/// A raw session that takes a slice and then ignores Revokes, as a slow or
/// cut-off agent would.
struct StubbornAgent {
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
}

impl StubbornAgent {
    /// Takes `tokens` of the key `key_id` (whose secret is `secret`, which
    /// a client showed it).
    async fn holding(
        coordinator_url: &str,
        key_id: &str,
        secret: &str,
        tokens: u64,
    ) -> StubbornAgent {
        let mut client =
            pb::agent_session_client::AgentSessionClient::connect(coordinator_url.to_string())
                .await
                .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let send = |msg| pb::AgentMessage { msg: Some(msg) };
        use pb::agent_message::Msg;
        tx.send(send(Msg::Hello(pb::Hello {
            agent_id: "stubborn".into(),
            epoch: 1,
            ..Default::default()
        })))
        .await
        .unwrap();
        tx.send(send(Msg::Reconcile(pb::Reconcile::default())))
            .await
            .unwrap();
        tx.send(send(key_lookup(secret))).await.unwrap();
        let tokens_only = pb::Amounts {
            tokens: Some(tokens),
            ..Default::default()
        };
        tx.send(send(Msg::Ask(pb::AllowanceAsk {
            ask_id: 1,
            key_id: key_id.to_string(),
            need: Some(tokens_only.clone()),
            want: Some(tokens_only),
        })))
        .await
        .unwrap();
        let mut agent = StubbornAgent {
            inbound: client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner(),
            tx,
        };
        let grant = agent
            .next(|msg| match msg {
                pb::coordinator_message::Msg::Grant(grant) => Some(grant),
                _ => None,
            })
            .await;
        assert_eq!(grant.amount.unwrap().tokens, Some(tokens));
        agent
    }

    async fn next<T>(&mut self, pick: impl Fn(pb::coordinator_message::Msg) -> Option<T>) -> T {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.inbound.message())
                .await
                .expect("a coordinator message in time")
                .unwrap()
                .expect("the session to stay open");
            if let Some(found) = message.msg.and_then(&pick) {
                return found;
            }
        }
    }
}

/// Budget held by an agent that does not give it back is not an exhausted
/// cap: clients get 503 with Retry-After (never 429 `insufficient_quota`),
/// and are served once the slice comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_held_by_an_unresponsive_agent_is_a_503_not_a_429_until_it_returns() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000", balance())])
        .await;
    let mut stubborn = StubbornAgent::holding(&stack.coordinator_url, &key_id, &secret, 990).await;
    wait_until(
        "the coordinator to give up on the reclaim",
        Duration::from_secs(30),
        || async {
            let response = stack.chat(&secret, chat_body(20)).await;
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").cloned();
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(
                status, 503,
                "held budget must not be refused as spent: {body}"
            );
            assert!(retry_after.is_some(), "a 503 carries Retry-After");
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("held by other agents")
        },
    )
    .await;
    let revoke = stubborn
        .next(|msg| match msg {
            pb::coordinator_message::Msg::Revoke(revoke) => Some(revoke),
            _ => None,
        })
        .await;
    assert_eq!(revoke.key_id, key_id);
    assert_eq!(stack.neuron.hits(), 0);
    // The slice comes back: the next ask is granted.
    stubborn
        .tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::GiveBack(pb::Return {
                key_id: key_id.clone(),
                amount: Some(pb::Amounts {
                    tokens: Some(990),
                    ..Default::default()
                }),
            })),
        })
        .await
        .unwrap();
    wait_until(
        "the returned budget to serve the client",
        Duration::from_secs(30),
        || async { stack.chat(&secret, chat_body(20)).await.status() == 200 },
    )
    .await;
}
