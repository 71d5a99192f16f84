//! Coordinator messages per 100 admitted requests at steady state: one key
//! at a fixed request rate spread over 8 agents, on loopback.
//!
//! `cargo run --release -p allot-e2e --bin allowance_bench -- [rps] [seconds] [usage_flush_ms]`
//! (defaults: 1000 requests/s, 20 s measured after 5 s of warm-up, 100 ms).

use allot::pb;
use allot_e2e::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn message_totals(coordinator_url: &str) -> (u64, u64) {
    let mut admin = pb::admin_client::AdminClient::connect(coordinator_url.to_string())
        .await
        .unwrap();
    let agents = admin
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    agents.agents.iter().fold((0, 0), |(r, s), a| {
        (r + a.messages_received, s + a.messages_sent)
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rps = args.first().copied().unwrap_or(1000);
    let seconds = args.get(1).copied().unwrap_or(20);
    let flush_ms = args.get(2).copied().unwrap_or(100);
    let agents_count = 8u64;

    let dir = TempDir::new("allowance-bench");
    let (addr, _coordinator) = start_coordinator(allot_coordinator::config::CoordinatorConfig {
        insecure: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        ..Default::default()
    })
    .await;
    let coordinator_url = format!("http://{addr}");
    let (_neuron, neuron_url) = start_neuron(&[MODEL], "n", Default::default()).await;
    wait_until("the coordinator", Duration::from_secs(10), || {
        let url = coordinator_url.clone();
        async move { message_admin_ready(&url).await }
    })
    .await;

    let (_, secret) = key_with_limits_at(
        &coordinator_url,
        "acme",
        vec![limit(pb::Unit::Tokens, "1000000000", balance())],
    )
    .await;

    let mut urls = Vec::new();
    let mut running = Vec::new();
    for i in 0..agents_count {
        let agent = start_agent(allot_agent::config::AgentConfig {
            insecure: true,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            coordinators: vec![coordinator_url.clone()],
            agent_id: format!("agent-{i}"),
            neuron_url: neuron_url.clone(),
            spool_dir: dir.0.join(format!("agent-{i}")),
            usage_flush_ms: flush_ms,
            ..Default::default()
        })
        .await;
        urls.push(agent.url.clone());
        running.push(agent);
    }
    let http = reqwest::Client::new();
    for url in &urls {
        wait_agent_ready(url, Duration::from_secs(30)).await;
    }

    let admitted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let per_agent = Duration::from_micros(1_000_000 * agents_count / rps);
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(5 + seconds + 1);
    let mut tasks = Vec::new();
    for url in urls.clone() {
        let (http, secret, admitted, failed) = (
            http.clone(),
            secret.clone(),
            admitted.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_agent);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while tokio::time::Instant::now() < stop_at {
                tick.tick().await;
                let (http, secret, admitted, failed, url) = (
                    http.clone(),
                    secret.clone(),
                    admitted.clone(),
                    failed.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let ok = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(secret)
                        .json(&chat_body(20))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if ok {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (in0, out0) = message_totals(&coordinator_url).await;
    let admitted0 = admitted.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (in1, out1) = message_totals(&coordinator_url).await;
    let admitted1 = admitted.load(Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let requests = (admitted1 - admitted0).max(1) as f64;
    let inbound = (in1 - in0) as f64;
    let outbound = (out1 - out0) as f64;
    println!("| target rps | measured rps | usage_flush_ms | agent→coordinator msgs / 100 req | coordinator→agent msgs / 100 req | total / 100 req | failed requests |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {rps} | {:.0} | {flush_ms} | {:.2} | {:.2} | {:.2} | {} |",
        requests / seconds as f64,
        inbound * 100.0 / requests,
        outbound * 100.0 / requests,
        (inbound + outbound) * 100.0 / requests,
        failed.load(Ordering::Relaxed)
    );
    for agent in running {
        agent.stop().await;
    }
}

async fn message_admin_ready(url: &str) -> bool {
    let Ok(mut admin) = pb::admin_client::AdminClient::connect(url.to_string()).await else {
        return false;
    };
    admin
        .list_accounts(authed(pb::ListAccountsRequest::default()))
        .await
        .is_ok()
}
