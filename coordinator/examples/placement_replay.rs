//! Replays a synthetic week of multi-key traffic through a placement
//! simulator, once with LRU eviction and once with demand-ranked eviction,
//! and compares cold starts, seconds spent loading and peak VRAM.
//!
//! Run: `cargo run --release -p allot-coordinator --example placement_replay`
//!
//! The trace is deterministic (seeded xorshift) and fixed before any
//! strategy runs on it: 30 models from 2 to 75 GB, 300 small API keys each
//! using one or two models drawn from a long-tailed popularity curve, 6
//! heavy keys on two or three popular models, three time zones of diurnal
//! load with quieter weekends, and bursts (10–40 minutes at 5× rate). The
//! fleet is 8 nodes with one GPU each (3 × 80 GB, 5 × 40 GB, 440 GB in
//! all), less than the models' 700-odd GB, so evictions are frequent.
//!
//! The simulator applies each decision as an agent would: a cold start or
//! an eviction plan loads the model for its catalog load time (VRAM held
//! from the start), a request holds its model in flight for its generation
//! time (50 tokens/s), and usage feeds the demand estimate as requests
//! arrive. It keeps one copy per model (no `wants_copy`) and never
//! defragments, identically for every strategy. A request refused because
//! every GPU that could hold its model is protected (in flight, loading,
//! churn guard) is retried every second until served, so it still costs
//! its cold start: no strategy can look better by refusing. "refused"
//! counts requests refused at least once, "refused wait s" the seconds
//! they waited in all.
//!
//! The last row is no strategy: it ranks victims by when each model is
//! really requested next, and so bounds what any demand estimate could
//! gain by ranking victims on this trace.

use allot::clock::UnixMs;
use allot_coordinator::placement::{
    route, Catalog, Decision, Demand, DemandTracker, FleetView, ModelId, ModelSpec, ModelStatus,
    PlacementConfig, Resident, RouteError, Strategy,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

const GB: u64 = 1 << 30;
const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;
const START: UnixMs = 1_798_761_600_000; // a Monday, 00:00 UTC
const TOKENS_PER_S: u64 = 50;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }
    fn exponential(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate
    }
}

/// `(name, vram GB)`; load time is 3 s plus 0.9 s per GB.
const MODELS: [(&str, u64); 30] = [
    ("embed-small", 2),
    ("embed-large", 3),
    ("rerank", 3),
    ("qwen-1.5b", 4),
    ("phi-3-mini", 8),
    ("llama-3.2-3b", 7),
    ("gemma-2b", 6),
    ("whisper", 4),
    ("guard-1b", 3),
    ("tiny-coder", 5),
    ("llama-3.1-8b", 17),
    ("mistral-7b", 15),
    ("qwen-7b", 16),
    ("gemma-9b", 19),
    ("deepseek-coder-6.7b", 15),
    ("llava-7b", 16),
    ("llama-13b", 27),
    ("phi-3-medium", 28),
    ("starcoder-15b", 30),
    ("mistral-nemo-12b", 25),
    ("qwen-14b", 29),
    ("solar-10.7b", 22),
    ("mixtral-8x7b-awq", 26),
    ("llama-3.1-70b-awq", 40),
    ("qwen-72b-awq", 42),
    ("codellama-34b", 68),
    ("yi-34b", 69),
    ("command-r-35b", 72),
    ("mixtral-8x22b-awq", 75),
    ("deepseek-v2-lite", 38),
];

/// Popularity: a long tail over models, shuffled so size and popularity
/// are unrelated.
fn popularity(rng: &mut XorShift) -> Vec<f64> {
    let mut order: Vec<usize> = (0..MODELS.len()).collect();
    for index in (1..order.len()).rev() {
        order.swap(index, (rng.next() % (index as u64 + 1)) as usize);
    }
    let mut weights = vec![0.0; MODELS.len()];
    for (rank, &model) in order.iter().enumerate() {
        weights[model] = 1.0 / (rank as f64 + 1.0).powf(1.1);
    }
    weights
}

fn pick(rng: &mut XorShift, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut point = rng.unit() * total;
    for (index, &weight) in weights.iter().enumerate() {
        point -= weight;
        if point < 0.0 {
            return index;
        }
    }
    weights.len() - 1
}

struct Key {
    /// Requests per second at the daily peak.
    peak_rate: f64,
    /// Hours east of UTC of the key's users.
    zone_hours: i64,
    models: Vec<(ModelId, f64)>,
    tokens: (f64, f64),
    bursts: Vec<(UnixMs, UnixMs)>,
}

impl Key {
    fn rate(&self, at: UnixMs) -> f64 {
        let local = at - START + self.zone_hours * HOUR;
        let hour = (local.rem_euclid(DAY)) as f64 / HOUR as f64;
        let weekend = matches!(local.div_euclid(DAY).rem_euclid(7), 5 | 6);
        // Working-hours hump peaking at 14:00, a floor at night.
        let daylight = (-((hour - 14.0) / 4.0).powi(2)).exp();
        let mut rate = self.peak_rate * (0.08 + 0.92 * daylight);
        if weekend {
            rate *= 0.4;
        }
        if self.bursts.iter().any(|&(from, to)| at >= from && at < to) {
            rate *= 5.0;
        }
        rate
    }
}

#[derive(Clone, Copy)]
struct Request {
    at: UnixMs,
    model: ModelId,
    tokens: u64,
}

fn keys(rng: &mut XorShift) -> Vec<Key> {
    let weights = popularity(rng);
    let mut keys = Vec::new();
    let bursts = |rng: &mut XorShift, per_day: f64| {
        let mut bursts = Vec::new();
        let mut at = START as f64;
        loop {
            at += rng.exponential(per_day / DAY as f64);
            if at >= (START + WEEK) as f64 {
                return bursts;
            }
            let length = rng.range(10.0, 40.0) * MINUTE as f64;
            bursts.push((at as UnixMs, (at + length) as UnixMs));
        }
    };
    for index in 0..306 {
        let heavy = index >= 300;
        let zone_hours = [0, -6, 8][index % 3];
        let model_count = if heavy { 2 + index % 2 } else { 1 + index % 2 };
        let mut models = Vec::new();
        while models.len() < model_count {
            let model = ModelId(pick(rng, &weights) as u32);
            if models.iter().all(|&(m, _)| m != model) {
                models.push((model, rng.range(0.2, 1.0)));
            }
        }
        keys.push(Key {
            peak_rate: if heavy {
                rng.range(0.2, 0.8)
            } else {
                1.0 / rng.range(300.0, 3_600.0)
            },
            zone_hours,
            models,
            tokens: if heavy {
                (500.0, 4_000.0)
            } else {
                (150.0, 1_500.0)
            },
            bursts: bursts(rng, if heavy { 3.0 } else { 0.5 }),
        });
    }
    keys
}

/// Non-homogeneous Poisson arrivals per key, by thinning, merged in time order.
fn trace(seed: u64) -> Vec<Request> {
    let mut rng = XorShift(seed);
    let keys = keys(&mut rng);
    let mut requests = Vec::new();
    for key in &keys {
        let bound = key.peak_rate * 5.0 / 1_000.0; // per ms
        let mut at = START as f64;
        loop {
            at += rng.exponential(bound);
            if at >= (START + WEEK) as f64 {
                break;
            }
            let now = at as UnixMs;
            if rng.unit() * bound * 1_000.0 >= key.rate(now) {
                continue;
            }
            let weights: Vec<f64> = key.models.iter().map(|m| m.1).collect();
            let model = key.models[pick(&mut rng, &weights)].0;
            let tokens = rng.range(key.tokens.0, key.tokens.1) as u64;
            requests.push(Request {
                at: now,
                model,
                tokens,
            });
        }
    }
    requests.sort_by_key(|r| (r.at, r.model));
    requests
}

fn catalog() -> Catalog {
    let mut catalog = Catalog::new();
    for (name, gb) in MODELS {
        catalog.insert(ModelSpec::new(name, gb * GB, 3_000 + gb * 900));
    }
    catalog
}

fn fleet() -> FleetView {
    let mut view = FleetView::new();
    for index in 0..8 {
        let gpu = if index < 3 { 80 * GB } else { 40 * GB };
        view.add_node(&format!("10.0.0.{index}:8000"), &[gpu], 32);
    }
    view
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Loaded(u32, u32),
    Done(u32, u32),
}

#[derive(Default)]
struct Outcome {
    requests: u64,
    cold_starts: u64,
    evicted: u64,
    load_ms: u64,
    /// Requests refused at least once (each retried until served).
    refused: u64,
    /// Time refused requests spent waiting for a retry to succeed.
    refused_wait_ms: u64,
    peak_vram: u64,
    wall_ms: u128,
}

/// A refused request is retried this long after, until it is served: the
/// simulator never drops a request, so a strategy cannot win by refusing.
const RETRY_MS: i64 = SECOND;

/// What a strategy may know of demand: fed by every request as it arrives.
trait Estimator: Demand {
    fn record(&mut self, model: ModelId, at: UnixMs, tokens: u64);
}

impl Estimator for DemandTracker {
    fn record(&mut self, model: ModelId, at: UnixMs, tokens: u64) {
        DemandTracker::record(self, model, at, tokens);
    }
}

/// Two time scales: a burst shows in the short one at once, a model used
/// steadily but rarely keeps its rate in the long one.
struct TwoScales {
    short: DemandTracker,
    long: DemandTracker,
}

impl Demand for TwoScales {
    fn request_rate(&self, model: ModelId, now: UnixMs) -> f64 {
        self.short
            .request_rate(model, now)
            .max(self.long.request_rate(model, now))
    }
    fn token_rate(&self, model: ModelId, now: UnixMs) -> f64 {
        self.short.token_rate(model, now)
    }
}

impl Estimator for TwoScales {
    fn record(&mut self, model: ModelId, at: UnixMs, tokens: u64) {
        self.short.record(model, at, tokens);
        self.long.record(model, at, tokens);
    }
}

/// Not a strategy: knows when each model is next requested and ranks
/// victims by it (Belady's rule per byte freed), a reference for how far
/// any estimate of demand could take victim ranking on this trace.
struct Oracle {
    arrivals: Vec<Vec<UnixMs>>,
}

impl Oracle {
    fn new(requests: &[Request]) -> Self {
        let mut arrivals = vec![Vec::new(); MODELS.len()];
        for request in requests {
            arrivals[request.model.index()].push(request.at);
        }
        Oracle { arrivals }
    }
}

impl Demand for Oracle {
    fn request_rate(&self, model: ModelId, now: UnixMs) -> f64 {
        let times = &self.arrivals[model.index()];
        let next = times.partition_point(|&at| at <= now);
        // Tiny rates keep P(request within the window) proportional to the
        // rate; dividing by the reload time squared cancels the reload
        // weighting, so victims go furthest next request per byte first.
        let reload_s = 3.0 + 0.9 * MODELS[model.index()].1 as f64;
        times.get(next).map_or(0.0, |&at| {
            1e-3 / (at - now).max(1) as f64 / (reload_s * reload_s)
        })
    }
    fn token_rate(&self, _: ModelId, _: UnixMs) -> f64 {
        0.0
    }
}

impl Estimator for Oracle {
    fn record(&mut self, _: ModelId, _: UnixMs, _: u64) {}
}

fn simulate<E: Estimator>(
    requests: &[Request],
    config: &PlacementConfig,
    mut demand: E,
) -> Outcome {
    let begun = Instant::now();
    let catalog = catalog();
    let mut view = fleet();
    let mut events: BinaryHeap<Reverse<(UnixMs, Event)>> = BinaryHeap::new();
    // (retry at, index of the request in the trace)
    let mut retries: BinaryHeap<Reverse<(UnixMs, usize)>> = BinaryHeap::new();
    let mut outcome = Outcome::default();
    let mut next = 0;
    loop {
        let from_trace = requests.get(next).map(|r| r.at);
        let from_retries = retries.peek().map(|r| r.0 .0);
        let (now, index, retry) = match (from_trace, from_retries) {
            (None, None) => break,
            (Some(at), Some(retry_at)) if retry_at < at => retries
                .pop()
                .map(|Reverse((at, index))| (at, index, true))
                .unwrap(),
            (None, Some(_)) => retries
                .pop()
                .map(|Reverse((at, index))| (at, index, true))
                .unwrap(),
            (Some(at), _) => {
                next += 1;
                (at, next - 1, false)
            }
        };
        let request = requests[index];
        while let Some(&Reverse((at, event))) = events.peek() {
            if at > now {
                break;
            }
            events.pop();
            match event {
                Event::Loaded(node, model) => {
                    view.set_status(NodeId(node), ModelId(model), ModelStatus::Loaded, at)
                }
                Event::Done(node, model) => view.end_request(NodeId(node), ModelId(model), at),
            }
        }
        if !retry {
            outcome.requests += 1;
        }
        let generation_ms = (request.tokens * 1_000 / TOKENS_PER_S) as i64;
        let decision = route(&view, &catalog, &demand, config, request.model, now);
        if !retry {
            demand.record(request.model, now, request.tokens);
        }
        let (node, ready_at) = match decision {
            Ok(Decision::Serve { node, .. }) => (node, now),
            Ok(Decision::ColdStart {
                node,
                expected_load_ms,
                in_progress: true,
                ..
            }) => (node, now + expected_load_ms as i64),
            Ok(Decision::ColdStart { node, gpu, .. }) => (
                node,
                load(
                    &mut view,
                    &catalog,
                    &mut events,
                    &mut outcome,
                    node,
                    gpu,
                    request.model,
                    now,
                ),
            ),
            Ok(Decision::Evict {
                node, gpu, victims, ..
            }) => {
                for victim in victims {
                    view.remove(node, victim);
                    outcome.evicted += 1;
                }
                (
                    node,
                    load(
                        &mut view,
                        &catalog,
                        &mut events,
                        &mut outcome,
                        node,
                        gpu,
                        request.model,
                        now,
                    ),
                )
            }
            Err(RouteError::NoRoom { .. }) => {
                if !retry {
                    outcome.refused += 1;
                }
                retries.push(Reverse((now + RETRY_MS, index)));
                continue;
            }
            Err(error) => panic!("unexpected: {error}"),
        };
        if retry {
            outcome.refused_wait_ms += (now - request.at) as u64;
        }
        view.begin_request(node, request.model, now);
        events.push(Reverse((
            ready_at + generation_ms,
            Event::Done(node.0, request.model.0),
        )));
        outcome.peak_vram = outcome.peak_vram.max(view.vram_used());
    }
    outcome.wall_ms = begun.elapsed().as_millis();
    outcome
}

use allot_coordinator::placement::NodeId;

#[allow(clippy::too_many_arguments)]
fn load(
    view: &mut FleetView,
    catalog: &Catalog,
    events: &mut BinaryHeap<Reverse<(UnixMs, Event)>>,
    outcome: &mut Outcome,
    node: NodeId,
    gpu: u32,
    model: ModelId,
    now: UnixMs,
) -> UnixMs {
    let spec = catalog
        .get(model)
        .expect("routed models are in the catalog");
    view.upsert(
        node,
        Resident::new(model, gpu, ModelStatus::Loading, spec.vram_bytes, now),
    );
    outcome.cold_starts += 1;
    outcome.load_ms += spec.load_ms;
    let ready = now + spec.load_ms as i64;
    events.push(Reverse((ready, Event::Loaded(node.0, model.0))));
    ready
}

fn main() {
    let begun = Instant::now();
    let requests = trace(0x5eed_2026);
    println!(
        "trace: {} requests over 7 days, 306 keys (300 small, 6 heavy), 30 models, fleet 8 GPUs / 440 GB (generated in {} ms)",
        requests.len(),
        begun.elapsed().as_millis()
    );
    let base = PlacementConfig {
        churn_guard_ms: MINUTE,
        ..PlacementConfig::default()
    };
    let runs = [
        ("lru", Strategy::Lru, 0, Estimate::Tracker(30 * MINUTE)),
        (
            "demand (window = reload time)",
            Strategy::Demand,
            0,
            Estimate::Tracker(30 * MINUTE),
        ),
        (
            "demand (window ≥ 10 min)",
            Strategy::Demand,
            10 * MINUTE,
            Estimate::Tracker(30 * MINUTE),
        ),
        (
            "demand (window ≥ 1 h)",
            Strategy::Demand,
            HOUR,
            Estimate::Tracker(30 * MINUTE),
        ),
        (
            "demand (≥ 1 h, half-life 2 h)",
            Strategy::Demand,
            HOUR,
            Estimate::Tracker(2 * HOUR),
        ),
        (
            "demand (≥ 10 min, 10 min + 6 h scales)",
            Strategy::Demand,
            10 * MINUTE,
            Estimate::TwoScales(10 * MINUTE, 6 * HOUR),
        ),
        (
            "oracle: knows the future",
            Strategy::Demand,
            0,
            Estimate::Oracle,
        ),
    ];
    println!(
        "{:<40} {:>11} {:>9} {:>13} {:>9} {:>14} {:>9} {:>14}",
        "strategy",
        "cold starts",
        "vs lru",
        "load seconds",
        "vs lru",
        "peak vram GB",
        "refused",
        "refused wait s"
    );
    let mut lru: Option<Outcome> = None;
    for (label, strategy, horizon, estimate) in runs {
        let config = PlacementConfig {
            strategy,
            demand_horizon_ms: horizon,
            ..base.clone()
        };
        let outcome = match estimate {
            Estimate::Tracker(half_life) => {
                simulate(&requests, &config, DemandTracker::new(half_life))
            }
            Estimate::Oracle => simulate(&requests, &config, Oracle::new(&requests)),
            Estimate::TwoScales(short, long) => simulate(
                &requests,
                &config,
                TwoScales {
                    short: DemandTracker::new(short),
                    long: DemandTracker::new(long),
                },
            ),
        };
        let versus = |ours: u64, theirs: Option<u64>| match theirs {
            Some(theirs) if theirs > 0 => format!(
                "{:+.1}%",
                (ours as f64 - theirs as f64) * 100.0 / theirs as f64
            ),
            _ => "-".to_string(),
        };
        println!(
            "{:<40} {:>11} {:>9} {:>13.0} {:>9} {:>14.1} {:>9} {:>14.0}   ({} ms)",
            label,
            outcome.cold_starts,
            versus(outcome.cold_starts, lru.as_ref().map(|l| l.cold_starts)),
            outcome.load_ms as f64 / 1_000.0,
            versus(outcome.load_ms, lru.as_ref().map(|l| l.load_ms)),
            outcome.peak_vram as f64 / GB as f64,
            outcome.refused,
            outcome.refused_wait_ms as f64 / 1_000.0,
            outcome.wall_ms,
        );
        if lru.is_none() {
            lru = Some(outcome);
        }
    }
}

/// Where a run's demand estimates come from.
#[derive(Clone, Copy)]
enum Estimate {
    /// `DemandTracker` with this half-life, fed as requests arrive.
    Tracker(i64),
    /// `TwoScales` with these half-lives.
    TwoScales(i64, i64),
    /// The future itself; a reference, not a strategy.
    Oracle,
}
