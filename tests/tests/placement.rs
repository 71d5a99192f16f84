//! Placement (issue 5) through real processes' code: agents report their
//! fake neuron's GPUs and models over the session stream, and
//! `Placement.Route` / `Placement.Fleet` answer from those reports, the
//! catalog file and the churn guard.

use allot::pb;
use allot_coordinator::config::CoordinatorConfig;
use allot_e2e::*;
use serde_json::json;
use std::time::Duration;

const GIB: u64 = 1 << 30;

async fn placement(
    stack: &Stack,
) -> pb::placement_client::PlacementClient<tonic::transport::Channel> {
    pb::placement_client::PlacementClient::connect(stack.coordinator_url.clone())
        .await
        .expect("connect")
}

async fn route(stack: &Stack, model: &str) -> Result<pb::RouteDecision, tonic::Status> {
    placement(stack)
        .await
        .route(authed(pb::RouteRequest {
            model: model.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

async fn fleet(stack: &Stack) -> pb::FleetView {
    placement(stack)
        .await
        .fleet(authed(pb::FleetRequest {}))
        .await
        .expect("fleet")
        .into_inner()
}

fn loaded(view: &pb::FleetView, model: &str) -> bool {
    view.nodes
        .iter()
        .any(|n| n.healthy && loaded_on(n).any(|m| m == model))
}

/// The models a node reports loaded.
fn loaded_on(node: &pb::FleetNode) -> impl Iterator<Item = &str> {
    node.models
        .iter()
        .filter(|m| m.status == pb::ModelStatus::Loaded as i32)
        .map(|m| m.model.as_str())
}

/// The neurons where `model` is loaded, sorted.
fn holders(view: &pb::FleetView, model: &str) -> Vec<String> {
    let mut on: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| loaded_on(n).any(|m| m == model))
        .map(|n| n.neuron_id.clone())
        .collect();
    on.sort();
    on
}

/// The models `neuron` reports loaded, sorted.
fn models_on(view: &pb::FleetView, neuron: &str) -> Vec<String> {
    let node = view.nodes.iter().find(|n| n.neuron_id == neuron).unwrap();
    let mut models: Vec<String> = loaded_on(node).map(str::to_string).collect();
    models.sort();
    models
}

/// `agent-{n}` for `neuron-{n}` at `neuron_url`, with the stack's agent
/// settings and `configure` applied, once it answers.
async fn node_agent(
    stack: &Stack,
    dir: &TempDir,
    n: u32,
    neuron_url: &str,
    configure: impl FnOnce(&mut allot_agent::config::AgentConfig),
) -> RunningAgent {
    let mut config = allot_agent::config::AgentConfig {
        insecure: true,
        agent_id: format!("agent-{n}"),
        neuron_id: format!("neuron-{n}"),
        neuron_url: neuron_url.to_string(),
        spool_dir: dir.0.join(format!("agent-{n}")),
        ..stack.agent_config.clone()
    };
    configure(&mut config);
    let agent = start_agent(config).await;
    wait_agent_ready(&agent.url, Duration::from_secs(20)).await;
    agent
}

async fn wait_nodes(stack: &Stack, count: usize) {
    wait_until(
        &format!("{count} nodes to report"),
        Duration::from_secs(20),
        || async { fleet(stack).await.nodes.len() == count },
    )
    .await;
}

/// A stack whose coordinator reads `catalog` (TOML) with no churn guard,
/// `configure` applied, and whose agent reports its fake neuron every
/// 200 ms.
async fn placement_stack(
    dir: &TempDir,
    catalog: String,
    configure: impl FnOnce(&mut allot_coordinator::placement::PlacementConfig),
) -> Stack {
    let path = dir.0.join("catalog.toml");
    std::fs::write(&path, catalog).unwrap();
    let mut config = CoordinatorConfig {
        insecure: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        placement_catalog: Some(path),
        ..CoordinatorConfig::default()
    };
    config.placement.churn_guard_ms = 0;
    configure(&mut config.placement);
    let mut stack = Stack::start_with(config).await;
    stack.agent_config.neuron_adapter = allot_agent::config::NeuronAdapterKind::Fake;
    stack.agent_config.node_report_ms = 200;
    stack.agent.take().unwrap().stop().await;
    stack.restart_agent().await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_follows_what_agents_report_loaded_cold_evict_and_gone() {
    let dir = TempDir::new("placement");
    let catalog = format!(
        "[[model]]\nname = \"cold\"\nvram_bytes = {}\nload_ms = 7000\n\n\
         [[model]]\nname = \"huge\"\nvram_bytes = {}\nload_ms = 9000\n",
        GIB,
        3 * GIB
    );
    // Route alone, with nothing acting on its answers.
    let mut stack = placement_stack(&dir, catalog, |p| p.directives = false).await;

    // The stack's neuron starts with two 2 GiB models on one 24 GiB GPU.
    wait_until(
        "the agent's first node report",
        Duration::from_secs(20),
        || async { loaded(&fleet(&stack).await, MODEL) },
    )
    .await;
    let view = fleet(&stack).await;
    let node = &view.nodes[0];
    assert_eq!(
        (node.neuron_id.as_str(), node.agent_id.as_str()),
        ("neuron-1", "agent-1")
    );
    assert_eq!(node.endpoint, stack.neuron_url);
    assert_eq!(node.gpus[0].vram_total_bytes, 24 * GIB);
    assert_eq!(node.gpus[0].vram_free_bytes, 20 * GIB);

    let serve = route(&stack, MODEL).await.unwrap();
    assert_eq!(serve.kind, pb::RouteKind::Serve as i32);
    assert_eq!(serve.endpoint, stack.neuron_url);
    assert_eq!(serve.agent_id, "agent-1");
    let unknown = route(&stack, "no-such-model").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().starts_with("model:"),
        "{}",
        unknown.message()
    );
    let empty = route(&stack, " ").await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    // A 19 GiB model loads (it takes 400 ms): while loading, a route
    // joins that load; once loaded, the catalog has its measured size.
    let http = reqwest::Client::new();
    let load = http
        .post(format!("{}/_fake/models/big/load", stack.neuron_url))
        .json(&json!({"vram_bytes": 19 * GIB, "load_ms": 400}))
        .send()
        .await
        .unwrap();
    assert_eq!(load.status(), 202);
    wait_until("big to be loaded", Duration::from_secs(20), || async {
        loaded(&fleet(&stack).await, "big")
    })
    .await;
    let view = fleet(&stack).await;
    assert_eq!(view.nodes[0].gpus[0].vram_free_bytes, GIB);
    let big = view.catalog.iter().find(|c| c.model == "big").unwrap();
    assert_eq!(big.vram_bytes, 19 * GIB);
    assert_eq!(
        route(&stack, "big").await.unwrap().kind,
        pb::RouteKind::Serve as i32
    );

    // 1 GiB free: "cold" (1 GiB) is a cold start with its catalog load time.
    let cold = route(&stack, "cold").await.unwrap();
    assert_eq!(cold.kind, pb::RouteKind::ColdStart as i32);
    assert_eq!((cold.expected_load_ms, cold.gpu), (7_000, 0));

    // "huge" (3 GiB) needs one 2 GiB model out: the least recently used,
    // which is other-model once fake-model has served a request.
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    wait_until(
        "the request to show in a report",
        Duration::from_secs(20),
        || async {
            let view = fleet(&stack).await;
            let models = &view.nodes[0].models;
            let at = |name: &str| {
                models
                    .iter()
                    .find(|m| m.model == name)
                    .map(|m| m.last_access_unix_ms)
            };
            at(MODEL) > at("other-model")
        },
    )
    .await;
    let evict = route(&stack, "huge").await.unwrap();
    assert_eq!(evict.kind, pb::RouteKind::Evict as i32, "{evict:?}");
    assert_eq!(evict.victims, vec!["other-model".to_string()]);
    assert_eq!(evict.strategy, "lru");

    // The agent goes: nothing is routed to its neuron.
    stack.agent.take().unwrap().stop().await;
    let gone = route(&stack, MODEL).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn placement_needs_the_admin_token() {
    let stack = Stack::start().await;
    let refused = placement(&stack)
        .await
        .fleet(pb::FleetRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

/// A fake neuron with `gpus` (bytes each) that loads `models` (2 GiB
/// each; none: the default model) at start, and its URL.
async fn spawn_neuron(
    neuron_id: &str,
    gpus: Vec<u64>,
    models: Vec<String>,
) -> (allot_fake_neuron::FakeNeuron, String) {
    let neuron = allot_fake_neuron::FakeNeuron::new(allot_fake_neuron::FakeConfig {
        neuron_id: neuron_id.into(),
        gpus,
        models,
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(neuron.clone().serve(listener, std::future::pending()));
    (neuron, url)
}

async fn node_has_loaded(neuron_url: &str, model: &str) -> bool {
    let node: serde_json::Value = reqwest::get(format!("{neuron_url}/_fake/node"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    node["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == model && m["status"] == "loaded")
}

/// The router's loop for one model: ask `Route` until it says SERVE, and
/// each time it does, check that the node really has the model loaded and
/// serve a request there.
async fn serve_through_route(
    stack: &Stack,
    agents: &std::collections::HashMap<String, (String, String)>,
    secret: &str,
    model: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let decision = route(stack, model).await.unwrap();
        if decision.kind == pb::RouteKind::Serve as i32 {
            let (agent_url, neuron_url) = &agents[&decision.agent_id];
            assert!(
                node_has_loaded(neuron_url, model).await,
                "{model} routed to {} where it is not loaded",
                decision.neuron_id
            );
            let response = reqwest::Client::new()
                .post(format!("{agent_url}/v1/chat/completions"))
                .bearer_auth(secret)
                .json(
                    &json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{model} on {}", decision.neuron_id);
            return decision.neuron_id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{model} never became servable; last decision {decision:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_converges_to_shifting_demand_through_directives() {
    let dir = TempDir::new("converge");
    let catalog = format!(
        "[[model]]\nname = \"m-a\"\nvram_bytes = {}\nload_ms = 300\n\n\
         [[model]]\nname = \"m-c\"\nvram_bytes = {}\nload_ms = 300\n",
        10 * GIB,
        21 * GIB
    );
    // Three nodes: 24 GiB (the stack's, with two 2 GiB models), 16 GiB and
    // 12 GiB (one 2 GiB model each).
    let stack = placement_stack(&dir, catalog, |p| p.want_window_ms = 3_000).await;
    let mut agents = std::collections::HashMap::new();
    agents.insert(
        "agent-1".to_string(),
        (stack.agent_url(), stack.neuron_url.clone()),
    );
    let mut others = Vec::new();
    for (n, gib) in [(2, 16), (3, 12)] {
        let (_, neuron_url) = spawn_neuron(&format!("neuron-{n}"), vec![gib * GIB], vec![]).await;
        let agent = node_agent(&stack, &dir, n, &neuron_url, |_| {}).await;
        agents.insert(format!("agent-{n}"), (agent.url.clone(), neuron_url));
        others.push(agent);
    }
    wait_nodes(&stack, 3).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;

    // Demand for m-a (10 GiB), loaded nowhere: it is loaded where it fits
    // best (the 12 GiB node), then served there.
    assert_eq!(
        route(&stack, "m-a").await.unwrap().kind,
        pb::RouteKind::ColdStart as i32
    );
    let a_on = serve_through_route(&stack, &agents, &secret, "m-a").await;
    assert_eq!(a_on, "neuron-3");

    // Demand shifts to m-c (21 GiB): only the 24 GiB node can hold it, once
    // one of its 2 GiB models is unloaded.
    let c_on = serve_through_route(&stack, &agents, &secret, "m-c").await;
    assert_eq!(c_on, "neuron-1");
    let view = fleet(&stack).await;
    let node_1 = view
        .nodes
        .iter()
        .find(|n| n.neuron_id == "neuron-1")
        .unwrap();
    let resident: Vec<&str> = node_1.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(resident.len(), 2, "one 2 GiB model made room: {resident:?}");
    assert!(resident.contains(&"m-c"));
    // m-a was never disturbed.
    assert_eq!(
        serve_through_route(&stack, &agents, &secret, "m-a").await,
        "neuron-3"
    );
    for agent in others {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_keeps_its_node_saturated_gets_a_second_copy() {
    let dir = TempDir::new("copies");
    let catalog = format!(
        "[[model]]\nname = \"hot\"\nvram_bytes = {}\nload_ms = 200\n",
        4 * GIB
    );
    let stack = placement_stack(&dir, catalog, |p| p.copy_after_ms = 1_000).await;
    // A second node of 16 GiB whose neuron answers slowly, so that two
    // requests keep it at its capacity of 2.
    let (slow, neuron_url) = spawn_neuron("neuron-2", vec![16 * GIB], vec![]).await;
    slow.set_behavior(allot_fake_neuron::Behavior {
        delay_ms: 400,
        ..Default::default()
    });
    let agent = node_agent(&stack, &dir, 2, &neuron_url, |c| c.node_capacity = 2).await;
    wait_nodes(&stack, 2).await;
    let mut agents = std::collections::HashMap::new();
    agents.insert(
        "agent-1".to_string(),
        (stack.agent_url(), stack.neuron_url.clone()),
    );
    agents.insert("agent-2".to_string(), (agent.url.clone(), neuron_url));
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    // Best fit puts the first copy on the 16 GiB node (14 GiB free against
    // 20 on the stack's 24 GiB one).
    assert_eq!(
        serve_through_route(&stack, &agents, &secret, "hot").await,
        "neuron-2"
    );
    let copies = |view: &pb::FleetView| holders(view, "hot");
    assert_eq!(copies(&fleet(&stack).await), vec!["neuron-2"]);

    // Four clients keep requests for "hot" in flight on agent-2 until a
    // second copy is loaded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, secret, stop) = (agent.url.clone(), secret.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let response = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&secret)
                    .json(&json!({"model": "hot",
                        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }));
    }
    wait_until(
        "a second copy of the saturated model",
        Duration::from_secs(30),
        || async { copies(&fleet(&stack).await).len() == 2 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        let statuses = client.await.unwrap();
        assert!(!statuses.is_empty());
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert_eq!(
        copies(&fleet(&stack).await),
        vec!["neuron-1", "neuron-2"],
        "the copy went to the node that did not hold it"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_eviction_a_gpu_is_emptied_by_moving_its_model_and_it_stays_servable() {
    let dir = TempDir::new("consolidate");
    let catalog = format!(
        "[[model]]\nname = \"big\"\nvram_bytes = {}\nload_ms = 200\n\n\
         [[model]]\nname = \"tiny\"\nvram_bytes = {}\nload_ms = 100\n\n\
         [[model]]\nname = \"small\"\nvram_bytes = {}\nload_ms = 300\n",
        21 * GIB,
        2 * GIB,
        2 * GIB
    );
    let stack = placement_stack(&dir, catalog, |p| p.defrag_after_cycles = 1).await;
    // neuron-1 (the stack's): 24 GiB with two 2 GiB models; neuron-2:
    // 16 GiB with "tiny"; neuron-3: 8 GiB with "small".
    let mut others = Vec::new();
    for (n, gib, model) in [(2, 16, "tiny"), (3, 8, "small")] {
        let (_, neuron_url) =
            spawn_neuron(&format!("neuron-{n}"), vec![gib * GIB], vec![model.into()]).await;
        others.push(node_agent(&stack, &dir, n, &neuron_url, |_| {}).await);
    }
    wait_nodes(&stack, 3).await;
    // "big" fits nowhere: one of neuron-1's models makes room (one
    // eviction cycle, enough with defrag_after_cycles = 1).
    assert_eq!(
        route(&stack, "big").await.unwrap().kind,
        pb::RouteKind::Evict as i32
    );
    // Then the cheapest GPU to empty is neuron-2's: "tiny" (100 ms to load)
    // fits in neuron-3's free 6 GiB; moving "small" would cost 300 ms.
    // "tiny" must be servable at every moment of the move.
    wait_until(
        "big loaded, neuron-2 emptied, tiny on neuron-3",
        Duration::from_secs(30),
        || async {
            let decision = route(&stack, "tiny").await.unwrap();
            assert_eq!(
                decision.kind,
                pb::RouteKind::Serve as i32,
                "tiny stopped being servable during the move: {decision:?}"
            );
            let view = fleet(&stack).await;
            models_on(&view, "neuron-1").contains(&"big".to_string())
                && models_on(&view, "neuron-2").is_empty()
                && models_on(&view, "neuron-3") == vec!["small".to_string(), "tiny".to_string()]
        },
    )
    .await;
    for agent in others {
        agent.stop().await;
    }
}

/// Requests per second the coordinator estimates for `model`.
async fn demand_for(stack: &Stack, model: &str) -> f64 {
    let view = fleet(stack).await;
    view.catalog
        .iter()
        .find(|c| c.model == model)
        .map_or(0.0, |c| c.requests_per_second)
}

/// A raw agent session: `Hello` with `epoch`, a lookup of the key whose
/// secret is `secret`, then each of `batches`, each waited for until
/// acknowledged.
async fn send_usage(stack: &Stack, epoch: u64, secret: &str, batches: Vec<Vec<pb::UsageRecord>>) {
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
    // Usage counts only for keys the agent was granted a slice of, and a
    // slice only of a key a client showed it (looked up by secret).
    tx.send(pb::AgentMessage {
        msg: Some(key_lookup(secret)),
    })
    .await
    .unwrap();
    let mut keys: Vec<String> = batches.iter().flatten().map(|r| r.key_id.clone()).collect();
    keys.sort();
    keys.dedup();
    for (index, key_id) in keys.into_iter().enumerate() {
        tx.send(pb::AgentMessage {
            msg: Some(allowance_ask(index as u64 + 1, &key_id, 100)),
        })
        .await
        .unwrap();
    }
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for records in batches {
        let last = records.last().unwrap().seq;
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch { records })),
        })
        .await
        .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), inbound.message())
                .await
                .expect("an ack in time")
                .unwrap()
                .unwrap();
            if let Some(pb::coordinator_message::Msg::UsageAck(ack)) = message.msg {
                if ack.high_water_seq == last {
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_batch_resent_on_a_new_session_counts_as_demand_once() {
    let dir = TempDir::new("demand-once");
    let catalog = format!(
        "[[model]]\nname = \"{MODEL}\"\nvram_bytes = {}\nload_ms = 100\n",
        2 * GIB
    );
    let stack = placement_stack(&dir, catalog, |p| p.directives = false).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let now = allot::clock::now_ms();
    let records = |seqs: std::ops::RangeInclusive<u64>| -> Vec<pb::UsageRecord> {
        seqs.map(|seq| pb::UsageRecord {
            seq,
            key_id: key_id.clone(),
            model_requested: MODEL.into(),
            admitted_at_unix_ms: now,
            prompt_tokens: 10,
            completion_tokens: 5,
            charged: true,
            ..Default::default()
        })
        .collect()
    };
    send_usage(&stack, 1, &secret, vec![records(1..=10)]).await;
    wait_until(
        "ten requests of demand",
        Duration::from_secs(10),
        || async { demand_for(&stack, MODEL).await > 0.0 },
    )
    .await;
    let ten = demand_for(&stack, MODEL).await;
    // A reconnect re-sends the ten (not acknowledged, as far as the agent
    // knows), then one new record follows.
    send_usage(&stack, 2, &secret, vec![records(1..=10), records(11..=11)]).await;
    wait_until("the eleventh request", Duration::from_secs(10), || async {
        demand_for(&stack, MODEL).await >= ten * 1.09
    })
    .await;
    // Demand is fed in settlement order: once the eleventh counts, the
    // re-sent ten would have. Half-life 10 min: the estimate barely decays
    // meanwhile; counted twice it would be 2.1 times the first.
    let eleven = demand_for(&stack, MODEL).await;
    assert!(
        (eleven / ten - 1.1).abs() < 0.01,
        "the re-sent batch counted again: {ten} then {eleven}"
    );
}
