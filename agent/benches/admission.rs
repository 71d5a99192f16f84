//! Admission against a local allowance: `try_reserve` + `settle` on one key
//! of an `AllowanceTable` holding a huge grant, single-threaded and with two
//! threads hammering the same key.
//!
//! Run: `cargo bench -p allot-agent --bench admission`. Besides criterion's
//! estimates, it prints the median and p99 of per-op time measured over
//! 1,000,000 ops in batches of 100 (lines starting with `percentiles:`).

use allot::Amounts;
use allot_agent::allowance::{Admission, AllowanceTable};
use criterion::{black_box, Criterion, Throughput};
use rust_decimal::Decimal;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const KEY: &str = "bench-key";
const BATCH: u64 = 100;
const PERCENTILE_OPS: u64 = 1_000_000;

/// A table whose `KEY` holds a huge token and request allowance for a day.
fn table() -> AllowanceTable {
    let table = AllowanceTable::new(0);
    let huge = Decimal::from(1_000_000_000_000_000_000u64);
    table.grant(
        KEY,
        &Amounts([Some(huge), Some(huge), None]),
        Duration::from_secs(86_400),
        Duration::from_secs(1),
        vec![],
        Instant::now(),
    );
    table
}

/// One admission: reserve 100 tokens, settle at 60.
fn reserve_settle(table: &AllowanceTable, need: &Amounts, actual: &Amounts) {
    let Admission::Reserved(reservation) = table.try_reserve(KEY, need, Instant::now()) else {
        panic!("the huge allowance ran out");
    };
    let seq = table.settle(&reservation, actual, |_| {});
    // The coordinator acknowledges usage as it settles it.
    table.ack(seq);
    black_box(seq);
}

fn amounts() -> (Amounts, Amounts) {
    (
        Amounts::request(100, Decimal::ZERO),
        Amounts::request(60, Decimal::ZERO),
    )
}

/// Runs `iters` admissions on each of `threads` threads at once; returns the
/// wall time from the common start to the last thread's end.
fn contended(table: &Arc<AllowanceTable>, threads: usize, iters: u64) -> Duration {
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let table = Arc::clone(table);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let (need, actual) = amounts();
                start.wait();
                for _ in 0..iters {
                    reserve_settle(&table, &need, &actual);
                }
            })
        })
        .collect();
    start.wait();
    let begun = Instant::now();
    for handle in handles {
        handle.join().expect("bench thread");
    }
    begun.elapsed()
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    let single = table();
    let (need, actual) = amounts();
    group.bench_function("reserve_settle/1_thread", |b| {
        b.iter(|| reserve_settle(&single, &need, &actual))
    });
    // One iteration = one op on each of the 2 threads: the time reported is
    // the per-op latency one thread sees; elements/s counts both threads.
    group.throughput(Throughput::Elements(2));
    let shared = Arc::new(table());
    group.bench_function("reserve_settle/2_threads_same_key", |b| {
        b.iter_custom(|iters| contended(&shared, 2, iters))
    });
    group.finish();
}

/// Per-op times (batch time / BATCH) of `ops` admissions on one thread.
fn batches(table: &AllowanceTable, ops: u64, start: &Barrier) -> Vec<f64> {
    let (need, actual) = amounts();
    let mut per_op = Vec::with_capacity((ops / BATCH) as usize);
    start.wait();
    for _ in 0..ops / BATCH {
        let begun = Instant::now();
        for _ in 0..BATCH {
            reserve_settle(table, &need, &actual);
        }
        per_op.push(begun.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    per_op
}

fn print_percentiles(label: &str, mut per_op: Vec<f64>) {
    per_op.sort_by(|a, b| a.total_cmp(b));
    let at =
        |q: f64| per_op[((per_op.len() as f64 * q).ceil() as usize).clamp(1, per_op.len()) - 1];
    println!(
        "percentiles: {label}: {} ops in batches of {BATCH}: per-op median {:.1} ns, p99 {:.1} ns",
        per_op.len() as u64 * BATCH,
        at(0.50),
        at(0.99),
    );
}

fn percentiles() {
    // Single thread.
    let table = Arc::new(table());
    let alone = Barrier::new(1);
    batches(&table, PERCENTILE_OPS / 10, &alone); // warm-up
    print_percentiles("1 thread", batches(&table, PERCENTILE_OPS, &alone));

    // Two threads on the same key, 500,000 ops each.
    let start = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let table = Arc::clone(&table);
            let start = Arc::clone(&start);
            std::thread::spawn(move || batches(&table, PERCENTILE_OPS / 2, &start))
        })
        .collect();
    let per_op: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("bench thread"))
        .collect();
    print_percentiles("2 threads same key (per-thread latency)", per_op);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    criterion_benches(&mut criterion);
    criterion.final_summary();
    // Only under `cargo bench` (criterion's test mode just checks it runs).
    if std::env::args().any(|a| a == "--bench") {
        percentiles();
    }
}
