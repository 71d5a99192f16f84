//! Request inspection as admission runs it on every request: parse the
//! body, bound it (every completion-limit field, fan-out, content parts),
//! and write the bound reserved into every limit field a server honours.
//!
//! Run: `cargo bench -p allot --bench domain`. Besides criterion's
//! estimates it prints the median and p99 of per-request time over
//! 200,000 requests (lines starting with `percentiles:`).

use allot::reservation::{
    inspect, parse_body, write_completion_bound, Operation, ReservationPolicy,
};
use criterion::{black_box, Criterion};
use std::time::Instant;

/// A chat request of about 1 KB: a system prompt, a short history.
fn typical_chat() -> Vec<u8> {
    let history: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            serde_json::json!({
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "content": "A sentence of ordinary length that a user might send to a model. ".repeat(2),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": "llama-3-8b-instruct",
        "messages": history,
        "max_tokens": 256,
        "temperature": 0.7,
        "stream": true,
    }))
    .unwrap()
}

/// The same with every limit field a client could choose set differently.
fn conflicting_limits() -> Vec<u8> {
    let mut body: serde_json::Value = serde_json::from_slice(&typical_chat()).unwrap();
    body["max_completion_tokens"] = 0.into();
    body["max_tokens"] = 50_000.into();
    body["n_predict"] = (-1).into();
    body["max_new_tokens"] = 50_000.into();
    body["options"] = serde_json::json!({"num_predict": -1});
    serde_json::to_vec(&body).unwrap()
}

/// Inspects `bytes` as admission does; the bound is rewritten and the
/// body serialized again only when it changed.
fn admit(bytes: &[u8], policy: &ReservationPolicy) -> usize {
    let mut body = parse_body(bytes).unwrap();
    let facts = inspect(Operation::ChatCompletions, &body, policy).unwrap();
    let bound = facts
        .max_completion_tokens
        .unwrap_or(policy.default_max_tokens);
    if write_completion_bound(Operation::ChatCompletions, &mut body, bound) {
        return serde_json::to_vec(&body).unwrap().len();
    }
    bytes.len()
}

fn percentiles(name: &str, bytes: &[u8], policy: &ReservationPolicy) {
    let mut times: Vec<u128> = (0..200_000)
        .map(|_| {
            let start = Instant::now();
            black_box(admit(black_box(bytes), policy));
            start.elapsed().as_nanos()
        })
        .collect();
    times.sort_unstable();
    println!(
        "percentiles: {name}: median {:.2} µs, p99 {:.2} µs ({} bytes)",
        times[times.len() / 2] as f64 / 1000.0,
        times[times.len() * 99 / 100] as f64 / 1000.0,
        bytes.len()
    );
}

fn main() {
    let policy = ReservationPolicy::default();
    let typical = typical_chat();
    let conflicting = conflicting_limits();
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("inspect");
    group.bench_function("typical_chat", |b| {
        b.iter(|| admit(black_box(&typical), &policy))
    });
    group.bench_function("conflicting_limits", |b| {
        b.iter(|| admit(black_box(&conflicting), &policy))
    });
    group.finish();
    criterion.final_summary();
    percentiles("typical_chat", &typical, &policy);
    percentiles("conflicting_limits", &conflicting, &policy);
}
