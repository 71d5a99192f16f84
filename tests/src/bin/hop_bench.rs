//! Whole-system load benchmark: the same small chat completion sent straight
//! to the fake neuron, through a bare hyper reverse proxy (one hop, no
//! logic), and through the agent (authentication, local admission, usage
//! spooling). Everything runs in this process on one tokio runtime with 2
//! worker threads, over 127.0.0.1.
//!
//! Run: `cargo run --release -p allot-e2e --bin hop_bench`

use allot::pb;
use allot_e2e::bare_hop::pooled_client;
use allot_e2e::{balance, limit, start_agent, Stack};
use axum::serve::ListenerExt;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const STREAM_REQUESTS: u64 = 500;
const WARM_UP: Duration = Duration::from_secs(1);
const MAX_RUN: Duration = Duration::from_secs(30);
const BODY: &str =
    r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
const STREAM_BODY: &str = r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}"#;

/// The stack's fake neuron served once more, with TCP_NODELAY on accepted
/// sockets (axum's default leaves Nagle on): a diagnostic for streaming.
async fn start_nodelay_neuron(stack: &Stack) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let router = stack.neuron.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    ttfbs: Vec<Duration>,
    headers: Vec<Duration>,
    elapsed: Duration,
    timed_out: bool,
}

struct Sample {
    latency: Duration,
    ttfb: Duration,
    headers: Duration,
}

async fn one_request(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    auth: &str,
    body: &Bytes,
) -> Result<Sample, String> {
    let request = Request::post(url)
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, auth)
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let begun = Instant::now();
    let response: Response<Incoming> = client.request(request).await.map_err(|e| e.to_string())?;
    let headers = begun.elapsed();
    let status = response.status();
    let mut body = response.into_body();
    let mut ttfb = None;
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{status}: body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if !data.is_empty() && ttfb.is_none() {
                ttfb = Some(begun.elapsed());
            }
            if status != StatusCode::OK && collected.len() < 300 {
                collected.extend_from_slice(data);
            }
        }
    }
    let latency = begun.elapsed();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&collected)));
    }
    Ok(Sample {
        latency,
        ttfb: ttfb.unwrap_or(latency),
        headers,
    })
}

/// `concurrency` workers, each with requests back to back: first for the
/// warm-up time, then until `requests` are done or `MAX_RUN` passes.
async fn load(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    auth: &str,
    body: &'static str,
    concurrency: usize,
    requests: u64,
) -> Outcome {
    let body = Bytes::from_static(body.as_bytes());
    let first_error = Arc::new(Mutex::new(None::<String>));
    for measured in [false, true] {
        let remaining = Arc::new(AtomicU64::new(requests));
        let begun = Instant::now();
        let end = begun + if measured { MAX_RUN } else { WARM_UP };
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, url, auth, body) = (
                    client.clone(),
                    url.to_string(),
                    auth.to_string(),
                    body.clone(),
                );
                let (remaining, first_error) = (remaining.clone(), first_error.clone());
                tokio::spawn(async move {
                    let mut outcome = Outcome::default();
                    while Instant::now() < end {
                        if measured
                            && remaining
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                    n.checked_sub(1)
                                })
                                .is_err()
                        {
                            return outcome;
                        }
                        match one_request(&client, &url, &auth, &body).await {
                            Ok(sample) => {
                                outcome.ok += 1;
                                outcome.latencies.push(sample.latency);
                                outcome.ttfbs.push(sample.ttfb);
                                outcome.headers.push(sample.headers);
                            }
                            Err(error) => {
                                outcome.errors += 1;
                                first_error.lock().unwrap().get_or_insert(error);
                            }
                        }
                    }
                    outcome.timed_out = measured;
                    outcome
                })
            })
            .collect();
        let mut total = Outcome::default();
        for worker in workers {
            let outcome = worker.await.expect("load worker");
            total.ok += outcome.ok;
            total.errors += outcome.errors;
            total.latencies.extend(outcome.latencies);
            total.ttfbs.extend(outcome.ttfbs);
            total.headers.extend(outcome.headers);
            total.timed_out |= outcome.timed_out;
        }
        total.elapsed = begun.elapsed();
        if measured {
            total.first_error = first_error.lock().unwrap().take();
            total.latencies.sort();
            total.ttfbs.sort();
            total.headers.sort();
            return total;
        }
        if total.errors > 0 {
            eprintln!(
                "warm-up of {url} at c={concurrency}: {} errors of {}, first: {}",
                total.errors,
                total.ok + total.errors,
                first_error.lock().unwrap().as_deref().unwrap_or("?")
            );
        }
    }
    unreachable!("the measured pass returns")
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Row {
    target: &'static str,
    concurrency: usize,
    outcome: Outcome,
}

impl Row {
    fn rps(&self) -> f64 {
        self.outcome.ok as f64 / self.outcome.elapsed.as_secs_f64()
    }
    fn p(&self, q: f64) -> f64 {
        micros(percentile(&self.outcome.latencies, q))
    }
}

/// Waits (10 s at most) until `url` answers a chat completion with 200.
async fn answers_200(
    client: &Client<HttpConnector, Full<Bytes>>,
    name: &str,
    url: &str,
    auth: &str,
) -> anyhow::Result<()> {
    let body = Bytes::from_static(BODY.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match one_request(client, url, auth, &body).await {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                anyhow::bail!("{name} never answered 200: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn bench() -> anyhow::Result<()> {
    let stack = Stack::start().await;
    let (_key_id, secret) = stack
        .key_with_limits(
            "bench",
            vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
        )
        .await;
    let auth = format!("Bearer {secret}");
    let bare = allot_e2e::bare_hop::start(stack.neuron_url.clone()).await?;
    let client: Client<HttpConnector, Full<Bytes>> = pooled_client();
    let path = "/v1/chat/completions";
    let targets = [
        ("direct neuron", format!("{}{path}", stack.neuron_url)),
        ("bare hop", format!("http://{bare}{path}")),
        ("agent", format!("{}{path}", stack.agent_url())),
    ];
    for (name, url) in &targets {
        answers_200(&client, name, url, &auth).await?;
    }

    let mut rows = Vec::new();
    for (concurrency, requests) in [(1usize, 5_000u64), (32, 20_000)] {
        for (name, url) in &targets {
            eprintln!("measuring {name} at c={concurrency} ({requests} requests)...");
            let outcome = load(&client, url, &auth, BODY, concurrency, requests).await;
            rows.push(Row {
                target: name,
                concurrency,
                outcome,
            });
        }
    }
    // Streaming: the neuron as the stack serves it (axum, Nagle on), and as
    // a diagnostic the same neuron served with TCP_NODELAY, with a second
    // agent in front of it.
    let nodelay_neuron = start_nodelay_neuron(&stack).await?;
    let second_agent = start_agent(allot_agent::config::AgentConfig {
        insecure: true,
        agent_id: "agent-2".into(),
        neuron_id: "neuron-2".into(),
        neuron_url: nodelay_neuron.clone(),
        spool_dir: stack.dir.0.join("agent-2"),
        ..stack.agent_config.clone()
    })
    .await;
    let stream_targets = [
        targets[0].clone(),
        targets[2].clone(),
        (
            "direct neuron, TCP_NODELAY",
            format!("{nodelay_neuron}{path}"),
        ),
        (
            "agent → neuron with TCP_NODELAY",
            format!("{}{path}", second_agent.url),
        ),
    ];
    for (name, url) in &stream_targets[2..] {
        answers_200(&client, name, url, &auth).await?;
    }
    let mut ttfb_rows = Vec::new();
    for (name, url) in &stream_targets {
        eprintln!("measuring streamed TTFB of {name} at c=1 ({STREAM_REQUESTS} requests)...");
        let outcome = load(&client, url, &auth, STREAM_BODY, 1, STREAM_REQUESTS).await;
        ttfb_rows.push((*name, outcome));
    }

    println!("## hop_bench: POST /v1/chat/completions, non-streamed (max_tokens 5)\n");
    println!("| target | concurrency | ok | errors | time (s) | req/s | p50 (µs) | p99 (µs) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2}{} | {:.0} | {:.1} | {:.1} |",
            row.target,
            row.concurrency,
            row.outcome.ok,
            row.outcome.errors,
            row.outcome.elapsed.as_secs_f64(),
            if row.outcome.timed_out {
                " (30 s cap)"
            } else {
                ""
            },
            row.rps(),
            row.p(0.50),
            row.p(0.99),
        );
    }
    println!("\n## Agent overhead\n");
    println!("| concurrency | p50 agent−direct (µs) | p50 agent−bare (µs) | p99 agent−direct (µs) | p99 agent−bare (µs) | req/s agent/bare | req/s agent/direct |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for chunk in rows.chunks(3) {
        let [direct, bare, agent] = chunk else {
            continue;
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} |",
            agent.concurrency,
            agent.p(0.50) - direct.p(0.50),
            agent.p(0.50) - bare.p(0.50),
            agent.p(0.99) - direct.p(0.99),
            agent.p(0.99) - bare.p(0.99),
            agent.rps() / bare.rps(),
            agent.rps() / direct.rps(),
        );
    }
    println!("\n## Streamed (`\"stream\": true`), concurrency 1: time to first body byte\n");
    println!("| target | ok | errors | time (s) | headers p50 (µs) | TTFB p50 (µs) | TTFB p99 (µs) | full response p50 (µs) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, outcome) in &ttfb_rows {
        println!(
            "| {name} | {} | {} | {:.2}{} | {:.1} | {:.1} | {:.1} | {:.1} |",
            outcome.ok,
            outcome.errors,
            outcome.elapsed.as_secs_f64(),
            if outcome.timed_out { " (30 s cap)" } else { "" },
            micros(percentile(&outcome.headers, 0.50)),
            micros(percentile(&outcome.ttfbs, 0.50)),
            micros(percentile(&outcome.ttfbs, 0.99)),
            micros(percentile(&outcome.latencies, 0.50)),
        );
    }
    let ttfb50 = |i: usize| micros(percentile(&ttfb_rows[i].1.ttfbs, 0.50));
    println!(
        "\nTTFB p50 added by the agent: {:.1} µs (neuron as served by the stack), {:.1} µs (TCP_NODELAY neuron)",
        ttfb50(1) - ttfb50(0),
        ttfb50(3) - ttfb50(2),
    );
    let failures: Vec<_> = rows
        .iter()
        .map(|r| (r.target, r.concurrency, &r.outcome))
        .chain(ttfb_rows.iter().map(|(n, o)| (*n, 1, o)))
        .filter(|(_, _, o)| o.errors > 0)
        .collect();
    for (name, concurrency, outcome) in &failures {
        println!(
            "\nERRORS: {name} at c={concurrency}: {} of {}; first: {}",
            outcome.errors,
            outcome.ok + outcome.errors,
            outcome.first_error.as_deref().unwrap_or("?")
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
