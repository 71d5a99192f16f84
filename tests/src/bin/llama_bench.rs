//! The agent's added latency in front of a real llama.cpp server
//! (llama-cpp-python serving the tiny test model, see `allot_e2e::llama`),
//! against the server directly, in one run: every worker alternates one
//! request straight to the server and one through the agent (which goes
//! first alternates too), so drift of the server (its Python, its caches,
//! the other load on the machine) falls on both sides alike.
//!
//! The request is a non-streamed chat completion of 8 tokens. The server
//! computes one request at a time, so at c=8 latency is mostly queueing;
//! the difference of the two sides is what the agent adds.
//!
//! Run: `cargo run --release -p allot-e2e --bin llama_bench` (needs
//! tests/python/install_llama_server.sh to have run).

use allot::pb;
use allot_e2e::bare_hop::pooled_client;
use allot_e2e::llama::{LlamaServer, LLAMA_MODEL};
use allot_e2e::{balance, limit, Stack};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::time::{Duration, Instant};

const WARM_UP_ROUNDS: usize = 20;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one_request(client: &HttpClient, url: &str, auth: &str, body: &Bytes) -> Duration {
    let request = Request::post(url)
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, auth)
        .body(Full::new(body.clone()))
        .expect("a valid request");
    let begun = Instant::now();
    let response = client.request(request).await.expect("an answer");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes();
    let latency = begun.elapsed();
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&bytes));
    latency
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

/// `concurrency` workers, each `rounds` pairs of requests (direct, agent);
/// the sorted latencies of each side.
async fn interleaved(
    client: &HttpClient,
    direct: &str,
    agent: &str,
    auth: &str,
    concurrency: usize,
    rounds: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let body = Bytes::from(
        serde_json::json!({"model": LLAMA_MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello there, how are you"}]})
        .to_string(),
    );
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (client, direct, agent, auth, body) = (
                client.clone(),
                direct.to_string(),
                agent.to_string(),
                auth.to_string(),
                body.clone(),
            );
            tokio::spawn(async move {
                let (mut to_direct, mut to_agent) = (Vec::new(), Vec::new());
                for round in 0..WARM_UP_ROUNDS + rounds {
                    let agent_first = (round + worker) % 2 == 0;
                    let (a, b) = if agent_first {
                        let a = one_request(&client, &agent, &auth, &body).await;
                        (a, one_request(&client, &direct, &auth, &body).await)
                    } else {
                        let b = one_request(&client, &direct, &auth, &body).await;
                        (one_request(&client, &agent, &auth, &body).await, b)
                    };
                    if round >= WARM_UP_ROUNDS {
                        to_agent.push(a);
                        to_direct.push(b);
                    }
                }
                (to_direct, to_agent)
            })
        })
        .collect();
    let (mut direct_all, mut agent_all) = (Vec::new(), Vec::new());
    for worker in workers {
        let (d, a) = worker.await.expect("worker");
        direct_all.extend(d);
        agent_all.extend(a);
    }
    direct_all.sort();
    agent_all.sort();
    (direct_all, agent_all)
}

async fn bench() -> anyhow::Result<()> {
    let server = LlamaServer::start().await;
    let mut stack = Stack::start().await;
    stack.agent_config.neuron_url = server.url.clone();
    if let Some(agent) = stack.agent.take() {
        agent.stop().await;
    }
    stack.restart_agent().await;
    let (_, secret) = stack
        .key_with_limits(
            "bench",
            vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
        )
        .await;
    let auth = format!("Bearer {secret}");
    let client: HttpClient = pooled_client();
    let path = "/v1/chat/completions";
    let direct = format!("{}{path}", server.url);
    let agent = format!("{}{path}", stack.agent_url());

    println!("## llama_bench: POST /v1/chat/completions to llama-cpp-python (tiny model, max_tokens 8), interleaved\n");
    println!("| concurrency | pairs | direct p50 (ms) | agent p50 (ms) | added p50 (ms) | direct p99 (ms) | agent p99 (ms) | added p99 (ms) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (concurrency, rounds) in [(1usize, 400usize), (8, 60)] {
        eprintln!("measuring c={concurrency} ({rounds} rounds per worker)...");
        let (d, a) = interleaved(&client, &direct, &agent, &auth, concurrency, rounds).await;
        let (d50, a50, d99, a99) = (
            percentile(&d, 0.5),
            percentile(&a, 0.5),
            percentile(&d, 0.99),
            percentile(&a, 0.99),
        );
        println!(
            "| {concurrency} | {} | {d50:.2} | {a50:.2} | {:.2} | {d99:.2} | {a99:.2} | {:.2} |",
            d.len(),
            a50 - d50,
            a99 - d99
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}
