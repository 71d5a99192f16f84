//! Analytics lag: from the end of a request (its response fully read by
//! the client) to its row being visible through `Admin.ListUsage`, at a
//! steady 1,000 requests/s through the agent. Everything runs in this
//! process (coordinator on the embedded store, agent, fake neuron) on a
//! tokio runtime with 2 workers.
//!
//! A poller reads only the rows added since its last read (`ListUsage`
//! pages continue after the last key), every 5 ms, so each lag figure is
//! exact to about 5 ms.
//!
//! With `postgres` the coordinator writes rows to a PostgreSQL server this
//! bench starts (Debian's `postgresql`, as the tests do) instead.
//!
//! Run: `cargo run --release -p allot-e2e --bin analytics_lag_bench [RATE] [SECONDS] [embedded|postgres]`

use allot::pb;
use allot_e2e::{authed, balance, limit, Stack, MODEL};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn bench(rate: u64, seconds: u64, store: &str) -> anyhow::Result<()> {
    let dir = allot_e2e::TempDir::new("lag-bench");
    let mut _postgres = None;
    let stack = match store {
        "embedded" => Stack::start().await,
        "postgres" => {
            let pg = allot_e2e::postgres::Postgres::start();
            let url = pg.url();
            _postgres = Some(pg);
            Stack::start_with(allot_coordinator::config::CoordinatorConfig {
                insecure: true,
                listen: "127.0.0.1:0".parse()?,
                metrics_listen: None,
                admin_token: allot_e2e::ADMIN_TOKEN.into(),
                data_path: dir.0.join("coordinator.redb"),
                usage_postgres_url: Some(url),
                ..Default::default()
            })
            .await
        }
        other => anyhow::bail!("unknown store {other}: embedded or postgres"),
    };
    let (_, secret) = stack
        .key_with_limits(
            "bench",
            vec![limit(pb::Unit::Tokens, "1000000000000", balance())],
        )
        .await;
    let ended: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The poller: new rows only, every 5 ms.
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let mut admin = stack.admin().await;
        tokio::spawn(async move {
            let mut token = String::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                loop {
                    let page = admin
                        .list_usage(authed(pb::ListUsageRequest {
                            page_size: 1000,
                            page_token: token.clone(),
                            ..Default::default()
                        }))
                        .await
                        .expect("list usage")
                        .into_inner();
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap();
                    for row in &page.rows {
                        let id = row.record.as_ref().unwrap().request_id.clone();
                        seen.entry(id).or_insert(now);
                    }
                    drop(seen);
                    if let Some(last) = page.rows.last() {
                        // The next read starts after the last row seen.
                        let record = last.record.as_ref().unwrap();
                        let mut key = last.agent_id.as_bytes().to_vec();
                        key.push(0);
                        key.extend_from_slice(&record.epoch.to_be_bytes());
                        key.extend_from_slice(&record.seq.to_be_bytes());
                        token = key.iter().map(|b| format!("{b:02x}")).collect();
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The load: `rate` requests per second, each on its own task.
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (http, url, secret, ended) = (
            stack.http.clone(),
            format!("{}/v1/chat/completions", stack.agent_url()),
            secret.clone(),
            ended.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let id = format!("lag-{i}");
            let response = http
                .post(url)
                .bearer_auth(secret)
                .header("x-request-id", &id)
                .json(&serde_json::json!({"model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
                .send()
                .await;
            if let Ok(response) = response {
                if response.status() == 200 && response.bytes().await.is_ok() {
                    ended.lock().unwrap().insert(id, Instant::now());
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let sent_for = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = {
            let ended = ended.lock().unwrap();
            let seen = seen.lock().unwrap();
            ended.keys().all(|id| seen.contains_key(id))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.await;
    let ended = ended.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut lags: Vec<Duration> = ended
        .iter()
        .filter_map(|(id, end)| seen.get(id).map(|s| s.saturating_duration_since(*end)))
        .collect();
    lags.sort();
    let missing = ended.len() - lags.len();
    println!(
        "analytics_lag_bench: {total} requests at {rate}/s (sent in {:.2} s), {} served, {} rows seen, {missing} never seen, {store} store",
        sent_for.as_secs_f64(),
        ended.len(),
        lags.len()
    );
    if !lags.is_empty() {
        println!(
            "request end → row visible in ListUsage: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (poll every 5 ms)",
            percentile(&lags, 0.5).as_secs_f64() * 1e3,
            percentile(&lags, 0.99).as_secs_f64() * 1e3,
            lags.last().unwrap().as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let store = args.next().unwrap_or_else(|| "embedded".into());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(rate, seconds, &store))
}
