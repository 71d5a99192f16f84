//! `route` decision time on a fleet view of 1,000 nodes (1–8 GPUs of 80 GB
//! each) and 50 models: routing to a loaded model, a cold start (the model
//! fits somewhere, so every GPU is scanned), and an eviction plan (nothing
//! fits, so every GPU's residents are ranked) under LRU and under demand.
//!
//! Run: `cargo bench -p allot-coordinator --bench route`. Besides criterion's
//! estimates, it prints the median and p99 of 100,000 individually timed
//! calls per case (lines starting with `percentiles:`); the target is
//! p99 ≤ 100 µs.

use allot::clock::UnixMs;
use allot_coordinator::placement::{
    route, Catalog, Decision, DemandTracker, FleetView, ModelId, ModelSpec, ModelStatus,
    PlacementConfig, Resident, Strategy,
};
use criterion::{black_box, Criterion};
use std::time::Instant;

const GB: u64 = 1 << 30;
const NODES: usize = 1_000;
const MODELS: u32 = 50;
const NOW: UnixMs = 1_800_000_000_000;
const PERCENTILE_CALLS: usize = 100_000;
/// Loaded on many nodes.
const LOADED: ModelId = ModelId(0);
/// 6 GB, loaded nowhere: fits in some GPU's free space.
const COLD: ModelId = ModelId(48);
/// 75 GB, loaded nowhere: fits in no GPU's free space.
const EVICT: ModelId = ModelId(49);

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Fleet {
    view: FleetView,
    catalog: Catalog,
    demand: DemandTracker,
}

fn fleet() -> Fleet {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut catalog = Catalog::new();
    for index in 0..MODELS {
        let gb = match index {
            48 => 6,
            49 => 75,
            _ => 4 + rng.below(60),
        };
        let mut spec = ModelSpec::new(format!("model-{index}"), gb * GB, 5_000 + gb * 1_000);
        spec.pinned = index == 1 || index == 2;
        catalog.insert(spec);
    }
    let mut demand = DemandTracker::new(10 * 60_000);
    for index in 0..MODELS - 2 {
        let events = rng.below(200);
        for _ in 0..events {
            demand.record(ModelId(index), NOW - rng.below(3_600_000) as i64, 500);
        }
    }
    let mut view = FleetView::new();
    for index in 0..NODES {
        let gpus = vec![80 * GB; 1 + rng.below(8) as usize];
        let node = view.add_node(
            &format!("10.0.{}.{}:8000", index / 256, index % 256),
            &gpus,
            16,
        );
        for gpu in 0..gpus.len() as u32 {
            for _ in 0..10 {
                let model = ModelId(rng.below(48) as u32);
                let need = catalog.get(model).unwrap().vram_bytes;
                let here = view.node(node);
                if here.resident(model).is_some() || here.gpus[gpu as usize].vram_free < need {
                    continue;
                }
                let mut resident = Resident::new(
                    model,
                    gpu,
                    ModelStatus::Loaded,
                    need,
                    NOW - rng.below(7_200_000) as i64,
                );
                resident.in_flight = (rng.below(4) == 0) as u32 * (1 + rng.below(3) as u32);
                view.upsert(node, resident);
            }
        }
        view.set_throughput(node, 2_000.0);
    }
    Fleet {
        view,
        catalog,
        demand,
    }
}

fn config(strategy: Strategy) -> PlacementConfig {
    PlacementConfig {
        strategy,
        ..PlacementConfig::default()
    }
}

fn cases() -> [(&'static str, ModelId, Strategy); 4] {
    [
        ("loaded", LOADED, Strategy::Lru),
        ("cold_start", COLD, Strategy::Lru),
        ("evict_lru", EVICT, Strategy::Lru),
        ("evict_demand", EVICT, Strategy::Demand),
    ]
}

fn check(fleet: &Fleet) {
    let expect = |model, strategy, what: fn(&Decision) -> bool| {
        let decision = route(
            &fleet.view,
            &fleet.catalog,
            &fleet.demand,
            &config(strategy),
            model,
            NOW,
        );
        assert!(
            decision.as_ref().is_ok_and(what),
            "unexpected decision {decision:?}"
        );
    };
    expect(LOADED, Strategy::Lru, |d| {
        matches!(d, Decision::Serve { .. })
    });
    expect(COLD, Strategy::Lru, |d| {
        matches!(d, Decision::ColdStart { .. })
    });
    expect(EVICT, Strategy::Lru, |d| {
        matches!(d, Decision::Evict { .. })
    });
    expect(EVICT, Strategy::Demand, |d| {
        matches!(d, Decision::Evict { .. })
    });
}

fn criterion_benches(c: &mut Criterion, fleet: &Fleet) {
    let mut group = c.benchmark_group("route/1000_nodes_50_models");
    for (name, model, strategy) in cases() {
        let config = config(strategy);
        group.bench_function(name, |b| {
            b.iter(|| {
                route(
                    black_box(&fleet.view),
                    &fleet.catalog,
                    &fleet.demand,
                    &config,
                    black_box(model),
                    NOW,
                )
            })
        });
    }
    group.finish();
}

fn percentiles(fleet: &Fleet) {
    for (name, model, strategy) in cases() {
        let config = config(strategy);
        let mut per_call = Vec::with_capacity(PERCENTILE_CALLS);
        for round in 0..PERCENTILE_CALLS + PERCENTILE_CALLS / 10 {
            let begun = Instant::now();
            let decision = route(
                black_box(&fleet.view),
                &fleet.catalog,
                &fleet.demand,
                &config,
                black_box(model),
                NOW,
            );
            let elapsed = begun.elapsed();
            black_box(decision).ok();
            if round >= PERCENTILE_CALLS / 10 {
                per_call.push(elapsed.as_nanos() as f64 / 1_000.0);
            }
        }
        per_call.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            per_call[((per_call.len() as f64 * q).ceil() as usize).clamp(1, per_call.len()) - 1]
        };
        println!(
            "percentiles: route {name}: {} calls: median {:.2} µs, p99 {:.2} µs, max {:.2} µs",
            per_call.len(),
            at(0.50),
            at(0.99),
            at(1.0),
        );
    }
}

fn main() {
    let fleet = fleet();
    check(&fleet);
    let mut criterion = Criterion::default().configure_from_args();
    criterion_benches(&mut criterion, &fleet);
    criterion.final_summary();
    // Only under `cargo bench` (criterion's test mode just checks it runs).
    if std::env::args().any(|a| a == "--bench") {
        percentiles(&fleet);
    }
}
