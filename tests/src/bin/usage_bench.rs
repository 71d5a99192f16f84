//! Rows per second into a usage analytics store (embedded or PostgreSQL),
//! written the way the coordinator's writer writes them (batches of 2,048
//! rows, one transaction each, several at a time), and the time to read a
//! page back.
//!
//! Run: `cargo run --release -p allot-e2e --bin usage_bench [ROWS] [embedded|postgres]`
//! (`postgres` starts a PostgreSQL server of its own from Debian's
//! `postgresql` package, as the tests do).

use allot::pb;
use allot_coordinator::usage::{EmbeddedUsageStore, PostgresUsageStore, UsageStore};
use std::time::{Duration, Instant};

fn row(seq: u64) -> pb::UsageRow {
    pb::UsageRow {
        agent_id: format!("agent-{}", seq % 8),
        record: Some(pb::UsageRecord {
            seq,
            epoch: 1,
            request_id: format!("req_{seq:024x}"),
            key_id: format!("key-{}", seq % 1000),
            account_id: format!("acct-{}", seq % 100),
            model_requested: "llama-3.1-8b".into(),
            model_served: "llama-3.1-8b".into(),
            http_status: 200,
            duration_ms: 850,
            ttfb_ms: 40,
            prompt_tokens: 120,
            completion_tokens: 300,
            admitted_at_unix_ms: 1_764_000_000_000 + seq as i64,
            trace_id: format!("{seq:032x}"),
            origin: pb::Origin::Api as i32,
            charged: true,
            ..Default::default()
        }),
        input_price: "0.0000005".into(),
        output_price: "0.0000015".into(),
        cost: "0.00051".into(),
        settled_at_unix_ms: 1_764_000_000_000 + seq as i64,
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);
    let kind = args.next().unwrap_or_else(|| "embedded".into());
    let dir = std::env::temp_dir().join(format!("allot-usage-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut _server = None;
    let store: Box<dyn UsageStore> = match kind.as_str() {
        "embedded" => {
            Box::new(EmbeddedUsageStore::open(&dir.join("usage.redb")).map_err(anyhow::Error::msg)?)
        }
        "postgres" => {
            let pg = allot_e2e::postgres::Postgres::start();
            let store = PostgresUsageStore::connect(&pg.url())
                .await
                .map_err(anyhow::Error::msg)?;
            _server = Some(pg);
            Box::new(store)
        }
        other => anyhow::bail!("unknown store {other}: embedded or postgres"),
    };
    let mut batch_times = Vec::new();
    let started = Instant::now();
    let mut seq = 1;
    // `in_flight` batches at a time, as the writer does.
    let in_flight: usize = std::env::var("ALLOT_BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(allot_coordinator::usage::WRITES_IN_FLIGHT);
    while seq <= total {
        let mut batches = Vec::new();
        for _ in 0..in_flight {
            if seq > total {
                break;
            }
            let batch: Vec<pb::UsageRow> = (seq..(seq + 2048).min(total + 1)).map(row).collect();
            seq += batch.len() as u64;
            batches.push(batch);
        }
        let at = Instant::now();
        let writes = batches.into_iter().map(|b| store.insert(b));
        for result in futures_util::future::join_all(writes).await {
            result.map_err(anyhow::Error::msg)?;
        }
        batch_times.push(at.elapsed());
    }
    let elapsed = started.elapsed();
    batch_times.sort();
    let filter = pb::UsageFilter {
        key_id: "key-7".into(),
        ..Default::default()
    };
    let read = Instant::now();
    let (page, _) = store
        .list(filter, None, 100)
        .await
        .map_err(anyhow::Error::msg)?;
    let read = read.elapsed();
    println!("usage_bench: {total} rows in batches of 2048, {in_flight} at a time, into the {kind} store");
    println!(
        "rows/s: {:.0}; write of {in_flight} batches p50 {:.2} ms, p99 {:.2} ms",
        total as f64 / elapsed.as_secs_f64(),
        percentile(&batch_times, 0.5).as_secs_f64() * 1e3,
        percentile(&batch_times, 0.99).as_secs_f64() * 1e3,
    );
    if let Ok(meta) = std::fs::metadata(dir.join("usage.redb")) {
        println!(
            "file {:.1} MiB ({:.0} bytes/row)",
            meta.len() as f64 / (1 << 20) as f64,
            meta.len() as f64 / total as f64
        );
    }
    println!(
        "ListUsage page of {} rows for one key of 1000: {:.1} ms",
        page.len(),
        read.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
