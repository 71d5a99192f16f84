use super::*;

const GB: u64 = 1 << 30;
const MINUTE: i64 = 60_000;
const NOW: UnixMs = 1_800_000_000_000;

/// Fixed demand: (model, requests/s, tokens/s).
struct Fixed(Vec<(ModelId, f64, f64)>);

impl Demand for Fixed {
    fn request_rate(&self, model: ModelId, _: UnixMs) -> f64 {
        self.0.iter().find(|e| e.0 == model).map_or(0.0, |e| e.1)
    }
    fn token_rate(&self, model: ModelId, _: UnixMs) -> f64 {
        self.0.iter().find(|e| e.0 == model).map_or(0.0, |e| e.2)
    }
}

/// Catalog of `(name, vram GB, load seconds)`; ids follow the order.
fn catalog(models: &[(&str, u64, u64)]) -> Catalog {
    let mut catalog = Catalog::new();
    for &(name, gb, load_s) in models {
        catalog.insert(ModelSpec::new(name, gb * GB, load_s * 1000));
    }
    catalog
}

fn loaded(view: &mut FleetView, node: NodeId, gpu: u32, model: ModelId, gb: u64, idle_ms: i64) {
    view.upsert(
        node,
        Resident::new(model, gpu, ModelStatus::Loaded, gb * GB, NOW - idle_ms),
    );
}

fn lru(churn_guard_ms: i64) -> PlacementConfig {
    PlacementConfig {
        strategy: Strategy::Lru,
        churn_guard_ms,
        ..PlacementConfig::default()
    }
}

fn victims(decision: Result<Decision, RouteError>) -> (NodeId, Vec<ModelId>) {
    match decision {
        Ok(Decision::Evict { node, victims, .. }) => (node, victims),
        other => panic!("expected an eviction plan, got {other:?}"),
    }
}

const M: ModelId = ModelId(0);
const X: ModelId = ModelId(1);
const Y: ModelId = ModelId(2);
const Z: ModelId = ModelId(3);

/// One node, one 80 GB GPU full with x (30 GB, idle 50 min), y (30 GB,
/// idle 10 min), z (20 GB, idle 30 min); m needs 40 GB.
fn full_gpu() -> (FleetView, Catalog, NodeId) {
    let catalog = catalog(&[("m", 40, 20), ("x", 30, 20), ("y", 30, 20), ("z", 20, 20)]);
    let mut view = FleetView::new();
    let node = view.add_node("a:8000", &[80 * GB], 4);
    loaded(&mut view, node, 0, X, 30, 50 * MINUTE);
    loaded(&mut view, node, 0, Y, 30, 10 * MINUTE);
    loaded(&mut view, node, 0, Z, 20, 30 * MINUTE);
    (view, catalog, node)
}

#[test]
fn route_serves_a_loaded_model_on_the_least_loaded_healthy_node() {
    let catalog = catalog(&[("m", 10, 20), ("x", 10, 20)]);
    let mut view = FleetView::new();
    let a = view.add_node("a:8000", &[80 * GB], 4);
    let b = view.add_node("b:8000", &[80 * GB], 8);
    let c = view.add_node("c:8000", &[80 * GB], 4);
    let d = view.add_node("d:8000", &[80 * GB], 4);
    view.add_node("empty:8000", &[80 * GB], 4);
    for node in [a, b, c, d] {
        loaded(&mut view, node, 0, M, 10, MINUTE);
        loaded(&mut view, node, 0, X, 10, MINUTE);
    }
    // Loads: a 2/4, b 2/8, c 0/4 but unhealthy, d 1/4.
    for (node, requests) in [(a, 2), (b, 2), (d, 1)] {
        for _ in 0..requests {
            view.begin_request(node, X, NOW);
        }
    }
    view.set_healthy(c, false);
    let config = PlacementConfig::default();
    let decision = route(&view, &catalog, &NoDemand, &config, M, NOW).unwrap();
    assert_eq!(
        decision,
        Decision::Serve {
            node: b,
            endpoint: "b:8000".into()
        },
        "b and d tie at 1/4; the lower id wins"
    );
    view.begin_request(b, X, NOW);
    let decision = route(&view, &catalog, &NoDemand, &config, M, NOW).unwrap();
    assert_eq!(decision.node(), d);
}

#[test]
fn route_joins_a_load_in_progress_instead_of_loading_again() {
    let catalog = catalog(&[("m", 10, 30)]);
    let mut view = FleetView::new();
    let a = view.add_node("a:8000", &[80 * GB], 4);
    view.add_node("b:8000", &[80 * GB], 4);
    view.upsert(
        a,
        Resident::new(M, 0, ModelStatus::Loading, 10 * GB, NOW - 10_000),
    );
    let decision = route(
        &view,
        &catalog,
        &NoDemand,
        &PlacementConfig::default(),
        M,
        NOW,
    );
    assert_eq!(
        decision.unwrap(),
        Decision::ColdStart {
            node: a,
            gpu: 0,
            endpoint: "a:8000".into(),
            expected_load_ms: 20_000,
            in_progress: true,
        }
    );
}

#[test]
fn route_cold_starts_on_the_gpu_the_model_fits_most_tightly() {
    let catalog = catalog(&[("m", 25, 45), ("x", 50, 20)]);
    let mut view = FleetView::new();
    view.add_node("a:8000", &[80 * GB], 4);
    let b = view.add_node("b:8000", &[40 * GB, 80 * GB], 4);
    view.add_node("c:8000", &[24 * GB], 4);
    loaded(&mut view, b, 1, X, 50, 0);
    let decision = route(
        &view,
        &catalog,
        &NoDemand,
        &PlacementConfig::default(),
        M,
        NOW,
    );
    assert_eq!(
        decision.unwrap(),
        Decision::ColdStart {
            node: b,
            gpu: 1,
            endpoint: "b:8000".into(),
            expected_load_ms: 45_000,
            in_progress: false,
        },
        "30 GB free on b/1 fits 25 GB tighter than 40 or 80 GB; 24 GB is too small"
    );
}

#[test]
fn route_does_not_retry_a_node_where_the_model_failed_to_load() {
    let catalog = catalog(&[("m", 10, 20)]);
    let mut view = FleetView::new();
    let a = view.add_node("a:8000", &[16 * GB], 4);
    let b = view.add_node("b:8000", &[80 * GB], 4);
    view.upsert(a, Resident::new(M, 0, ModelStatus::Failed, 10 * GB, NOW));
    let decision = route(
        &view,
        &catalog,
        &NoDemand,
        &PlacementConfig::default(),
        M,
        NOW,
    );
    assert_eq!(decision.unwrap().node(), b);
}

#[test]
fn route_evicts_least_recently_used_idle_models_until_the_model_fits() {
    let (view, catalog, node) = full_gpu();
    let decision = route(&view, &catalog, &NoDemand, &lru(0), M, NOW);
    // LRU order x (50 min), z (30 min), y (10 min): x + z free 50 GB >= 40.
    assert_eq!(victims(decision), (node, vec![X, Z]));
    if let Ok(Decision::Evict {
        expected_load_ms, ..
    }) = route(&view, &catalog, &NoDemand, &lru(0), M, NOW)
    {
        assert_eq!(expected_load_ms, 20_000);
    }
}

#[test]
fn route_eviction_plan_drops_victims_the_fit_does_not_need() {
    let catalog = catalog(&[("m", 25, 20), ("x", 10, 20), ("y", 30, 20)]);
    let mut view = FleetView::new();
    let node = view.add_node("a:8000", &[40 * GB], 4);
    loaded(&mut view, node, 0, X, 10, 50 * MINUTE);
    loaded(&mut view, node, 0, Y, 30, 40 * MINUTE);
    // LRU takes x (10 GB) then y (30 GB); y alone frees enough.
    let decision = route(&view, &catalog, &NoDemand, &lru(0), M, NOW);
    assert_eq!(victims(decision), (node, vec![Y]));
}

#[test]
fn route_never_evicts_a_model_with_requests_in_flight() {
    let (mut view, catalog, node) = full_gpu();
    view.begin_request(node, X, NOW - 50 * MINUTE);
    let decision = route(&view, &catalog, &NoDemand, &lru(0), M, NOW);
    assert_eq!(victims(decision), (node, vec![Z, Y]));

    view.begin_request(node, Z, NOW - 30 * MINUTE);
    let error = route(&view, &catalog, &NoDemand, &lru(0), M, NOW).unwrap_err();
    let RouteError::NoRoom { protected, .. } = &error else {
        panic!("expected NoRoom, got {error:?}");
    };
    assert_eq!(protected.in_flight, 2);
    assert!(
        error.to_string().contains("2 with requests in flight"),
        "{error}"
    );
}

#[test]
fn route_never_evicts_a_model_pinned_in_the_catalog() {
    let (view, mut catalog, node) = full_gpu();
    catalog.set_pinned(X, true);
    let decision = route(&view, &catalog, &NoDemand, &lru(0), M, NOW);
    assert_eq!(victims(decision), (node, vec![Z, Y]));
}

#[test]
fn route_churn_guard_refuses_models_used_within_the_configured_age() {
    let (view, catalog, node) = full_gpu();
    // Guard 20 min protects y (10 min): the LRU plan is unchanged.
    let decision = route(&view, &catalog, &NoDemand, &lru(20 * MINUTE), M, NOW);
    assert_eq!(victims(decision), (node, vec![X, Z]));
    // Guard 40 min also protects z (30 min): x alone cannot make room.
    let error = route(&view, &catalog, &NoDemand, &lru(40 * MINUTE), M, NOW).unwrap_err();
    assert!(
        matches!(error, RouteError::NoRoom { protected, .. } if protected.churn_guard == 2),
        "{error:?}"
    );
}

#[test]
fn route_demand_strategy_evicts_the_least_expected_reload_cost_per_byte() {
    let (view, catalog, node) = full_gpu();
    let demand = Fixed(vec![(X, 1.0, 0.0), (Z, 0.01, 0.0), (Y, 0.0, 0.0)]);
    let config = PlacementConfig {
        strategy: Strategy::Demand,
        churn_guard_ms: 0,
        ..PlacementConfig::default()
    };
    // LRU would evict x, the oldest, though it is requested every second.
    assert_eq!(
        victims(route(&view, &catalog, &demand, &lru(0), M, NOW)),
        (node, vec![X, Z])
    );
    // Demand: y (never requested) then z (rare); x stays.
    assert_eq!(
        victims(route(&view, &catalog, &demand, &config, M, NOW)),
        (node, vec![Y, Z])
    );
}

#[test]
fn route_demand_strategy_prefers_victims_that_reload_quickly() {
    let catalog = catalog(&[("m", 40, 20), ("slow", 40, 120), ("fast", 40, 10)]);
    let (slow, fast) = (ModelId(1), ModelId(2));
    let mut view = FleetView::new();
    let node = view.add_node("a:8000", &[80 * GB], 4);
    loaded(&mut view, node, 0, slow, 40, 30 * MINUTE);
    loaded(&mut view, node, 0, fast, 40, 20 * MINUTE);
    let demand = Fixed(vec![(slow, 0.01, 0.0), (fast, 0.01, 0.0)]);
    let config = PlacementConfig {
        strategy: Strategy::Demand,
        ..PlacementConfig::default()
    };
    assert_eq!(
        victims(route(&view, &catalog, &demand, &config, M, NOW)),
        (node, vec![fast])
    );
}

#[test]
fn route_plans_the_eviction_on_the_node_where_it_costs_least() {
    let catalog = catalog(&[("m", 40, 20), ("x", 40, 20), ("y", 40, 20)]);
    let mut view = FleetView::new();
    let a = view.add_node("a:8000", &[40 * GB], 4);
    let b = view.add_node("b:8000", &[40 * GB], 4);
    loaded(&mut view, a, 0, X, 40, 10 * MINUTE);
    loaded(&mut view, b, 0, Y, 40, 30 * MINUTE);
    assert_eq!(
        victims(route(&view, &catalog, &NoDemand, &lru(0), M, NOW)),
        (b, vec![Y]),
        "lru: the plan whose newest victim is oldest"
    );
    let demand = Fixed(vec![(X, 0.0, 0.0), (Y, 0.5, 0.0)]);
    let config = PlacementConfig {
        strategy: Strategy::Demand,
        churn_guard_ms: 0,
        ..PlacementConfig::default()
    };
    assert_eq!(
        victims(route(&view, &catalog, &demand, &config, M, NOW)),
        (a, vec![X]),
        "demand: the plan with the least expected reload time"
    );
}

#[test]
fn route_names_why_it_cannot_place_a_model() {
    let catalog = catalog(&[("m", 100, 20)]);
    let mut view = FleetView::new();
    let config = PlacementConfig::default();
    assert_eq!(
        route(&view, &catalog, &NoDemand, &config, ModelId(7), NOW),
        Err(RouteError::UnknownModel(ModelId(7)))
    );
    assert_eq!(
        route(&view, &catalog, &NoDemand, &config, M, NOW),
        Err(RouteError::NoHealthyNode)
    );
    view.add_node("a:8000", &[80 * GB, 80 * GB], 4);
    let error = route(&view, &catalog, &NoDemand, &config, M, NOW).unwrap_err();
    assert_eq!(
        error,
        RouteError::TooLarge {
            model: M,
            need_bytes: 100 * GB,
            largest_gpu_bytes: 80 * GB
        },
        "two 80 GB GPUs do not make one 100 GB GPU"
    );
}

#[test]
fn defrag_waits_for_the_configured_number_of_eviction_cycles() {
    let (mut view, catalog, node) = fragmented();
    view.end_request(node, X, NOW);
    view.end_request(node, Y, NOW);
    let config = PlacementConfig {
        defrag_after_cycles: 3,
        ..PlacementConfig::default()
    };
    assert_eq!(defrag_plan(&view, &catalog, &config, 2), None);
    assert!(defrag_plan(&view, &catalog, &config, 3).is_some());
    let disabled = PlacementConfig {
        defrag_after_cycles: 0,
        ..config
    };
    assert_eq!(defrag_plan(&view, &catalog, &disabled, 100), None);
}

/// Two 80 GB GPUs holding 30 GB each: 100 GB free, but a 70 GB model fits
/// on neither.
fn fragmented() -> (FleetView, Catalog, NodeId) {
    let catalog = catalog(&[("big", 70, 60), ("x", 30, 20), ("y", 30, 25)]);
    let mut view = FleetView::new();
    let node = view.add_node("a:8000", &[80 * GB, 80 * GB], 4);
    loaded(&mut view, node, 0, X, 30, 0);
    loaded(&mut view, node, 1, Y, 30, 0);
    view.begin_request(node, X, NOW);
    view.begin_request(node, Y, NOW);
    (view, catalog, node)
}

#[test]
fn defrag_consolidates_when_that_frees_a_whole_gpu() {
    let (mut view, catalog, node) = fragmented();
    let big = ModelId(0);
    // Both models are busy: no eviction plan, yet 100 GB are free.
    assert!(matches!(
        route(&view, &catalog, &NoDemand, &lru(0), big, NOW),
        Err(RouteError::NoRoom { .. })
    ));
    view.end_request(node, X, NOW);
    view.end_request(node, Y, NOW);
    let config = PlacementConfig {
        defrag_after_cycles: 1,
        ..PlacementConfig::default()
    };
    let plan = defrag_plan(&view, &catalog, &config, 1).expect("a gpu can be emptied");
    assert_eq!(
        plan.moves,
        vec![Move {
            model: X,
            from_node: node,
            from_gpu: 0,
            to_node: node,
            to_gpu: 1,
            vram_bytes: 30 * GB,
        }],
        "x reloads faster than y"
    );
    assert_eq!(
        (plan.node, plan.gpu, plan.expected_load_ms),
        (node, 0, 20_000)
    );
    for step in &plan.moves {
        let moved = Resident::new(
            step.model,
            step.to_gpu,
            ModelStatus::Loaded,
            step.vram_bytes,
            NOW,
        );
        view.upsert(step.to_node, moved);
    }
    assert_eq!(view.node(node).gpus[0].vram_free, 80 * GB);
    let decision = route(&view, &catalog, &NoDemand, &lru(0), big, NOW).unwrap();
    assert!(
        matches!(decision, Decision::ColdStart { gpu: 0, .. }),
        "{decision:?}"
    );
}

#[test]
fn defrag_proposes_nothing_when_no_gpu_can_be_emptied() {
    let (mut view, mut catalog, node) = fragmented();
    view.end_request(node, X, NOW);
    let config = PlacementConfig {
        defrag_after_cycles: 1,
        ..PlacementConfig::default()
    };
    // y is busy and x pinned: neither GPU can be emptied.
    catalog.set_pinned(X, true);
    assert_eq!(defrag_plan(&view, &catalog, &config, 1), None);
    // Unpinned, x could move, but not onto a GPU with only 20 GB free.
    catalog.set_pinned(X, false);
    loaded(&mut view, node, 1, ModelId(0), 30, 0);
    assert_eq!(defrag_plan(&view, &catalog, &config, 1), None);
}

#[test]
fn wants_copy_when_every_node_serving_the_model_stays_saturated() {
    let mut view = FleetView::new();
    let a = view.add_node("a:8000", &[80 * GB], 4);
    let b = view.add_node("b:8000", &[80 * GB], 4);
    loaded(&mut view, a, 0, M, 10, 0);
    let config = PlacementConfig {
        copy_after_ms: 5_000,
        max_copies: 2,
        ..PlacementConfig::default()
    };
    let busy_since = |a_since: Option<UnixMs>, b_since: Option<UnixMs>| {
        move |node: NodeId| if node == a { a_since } else { b_since }
    };
    let set_in_flight = |view: &mut FleetView, node: NodeId, in_flight: u32| {
        let mut resident = Resident::new(M, 0, ModelStatus::Loaded, 10 * GB, NOW);
        resident.in_flight = in_flight;
        view.upsert(node, resident);
    };
    set_in_flight(&mut view, a, 4);
    assert!(wants_copy(
        &view,
        &config,
        M,
        busy_since(Some(NOW - 5_000), None),
        NOW
    ));
    assert!(
        !wants_copy(&view, &config, M, busy_since(Some(NOW - 4_999), None), NOW),
        "not saturated long enough"
    );
    assert!(!wants_copy(&view, &config, M, busy_since(None, None), NOW));
    assert!(
        !wants_copy(&view, &config, X, busy_since(Some(0), None), NOW),
        "not loaded"
    );
    // The node is saturated by other models' requests: no copy of this one.
    set_in_flight(&mut view, a, 0);
    assert!(!wants_copy(
        &view,
        &config,
        M,
        busy_since(Some(0), None),
        NOW
    ));
    set_in_flight(&mut view, a, 4);
    // Two copies: both must be saturated, and two is `max_copies`.
    loaded(&mut view, b, 0, M, 10, 0);
    set_in_flight(&mut view, b, 4);
    assert!(!wants_copy(
        &view,
        &config,
        M,
        busy_since(Some(0), Some(0)),
        NOW
    ));
    let three = PlacementConfig {
        max_copies: 3,
        ..config.clone()
    };
    assert!(wants_copy(
        &view,
        &three,
        M,
        busy_since(Some(0), Some(0)),
        NOW
    ));
    assert!(!wants_copy(
        &view,
        &three,
        M,
        busy_since(Some(0), None),
        NOW
    ));
    let off = PlacementConfig {
        copy_after_ms: 0,
        ..three
    };
    assert!(!wants_copy(
        &view,
        &off,
        M,
        busy_since(Some(0), Some(0)),
        NOW
    ));
}

/// The eviction planner as it was before the fleet view indexed idle
/// models: every resident of every node scanned on each call. Kept as the
/// reference the indexed planner must agree with.
#[allow(clippy::too_many_arguments)]
fn scan_plan_eviction<D: Demand + ?Sized>(
    view: &FleetView,
    catalog: &Catalog,
    demand: &D,
    config: &PlacementConfig,
    model: ModelId,
    failed: &[NodeId],
    now: UnixMs,
) -> Result<Decision, RouteError> {
    let spec = catalog.get(model).ok_or(RouteError::UnknownModel(model))?;
    let need = spec.vram_bytes;
    let mut expected = ExpectedReload {
        demand,
        catalog,
        horizon_ms: config.demand_horizon_ms,
        now,
        memo: Vec::new(),
    };
    let mut on_node: Vec<(u32, Candidate)> = Vec::with_capacity(32);
    let mut candidates: Vec<Candidate> = Vec::with_capacity(16);
    let mut best: Option<(PlanCost, NodeId, u32)> = None;
    let mut best_victims: Vec<ModelId> = Vec::new();

    for (index, node) in view.nodes().iter().enumerate() {
        let id = NodeId(index as u32);
        if !node.healthy || failed.contains(&id) {
            continue;
        }
        let bound = best.as_ref().map(|b| b.0);
        on_node.clear();
        for resident in &node.residents {
            if resident.status != ModelStatus::Loaded
                || resident.in_flight > 0
                || now - resident.last_access < config.churn_guard_ms
                || node.gpus[resident.gpu as usize].vram_total < need
            {
                continue;
            }
            let expected_reload_s = match config.strategy {
                Strategy::Lru => 0.0,
                Strategy::Demand => expected.of(resident.model),
            };
            let vram = resident.vram_bytes.max(1);
            let candidate = Candidate {
                model: resident.model,
                vram,
                last_access: resident.last_access,
                expected_reload_s,
                rank: expected_reload_s / vram as f64,
                chosen: false,
            };
            if !could_improve(&candidate, bound.as_ref())
                || catalog.get(resident.model).is_some_and(|spec| spec.pinned)
            {
                continue;
            }
            on_node.push((resident.gpu, candidate));
        }
        if on_node.is_empty() {
            continue;
        }
        for (gpu_index, gpu) in node.gpus.iter().enumerate() {
            if gpu.vram_total < need {
                continue;
            }
            let gap = need.saturating_sub(gpu.vram_free);
            let bound = best.as_ref().map(|b| b.0);
            candidates.clear();
            let mut room = 0;
            for (_, candidate) in on_node
                .iter()
                .filter(|(g, c)| *g as usize == gpu_index && could_improve(c, bound.as_ref()))
            {
                room += candidate.vram;
                candidates.push(*candidate);
            }
            if room < gap {
                continue;
            }
            order_victims(&mut candidates, config.strategy);
            let Some(cost) = choose_victims(&mut candidates, gap) else {
                continue;
            };
            let better = match &best {
                None => true,
                Some((best_cost, best_node, _)) => match cost.cmp(best_cost) {
                    Ordering::Less => true,
                    Ordering::Greater => false,
                    Ordering::Equal => load_cmp(node, view.node(*best_node)) == Ordering::Less,
                },
            };
            if better {
                best = Some((cost, id, gpu_index as u32));
                best_victims.clear();
                best_victims.extend(candidates.iter().filter(|c| c.chosen).map(|c| c.model));
            }
        }
    }
    let Some((_, node, gpu)) = best else {
        return Err(RouteError::NoRoom {
            model,
            need_bytes: need,
            protected: protected(view, catalog, config, need, failed, now),
        });
    };
    Ok(Decision::Evict {
        node,
        gpu,
        endpoint: view.node(node).endpoint.clone(),
        victims: best_victims,
        expected_load_ms: spec.load_ms,
    })
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn indexed_eviction_plans_equal_a_scan_of_every_resident_and_the_index_stays_exact() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut planned = 0;
    for round in 0..3_000 {
        let mut catalog = Catalog::new();
        for index in 0..12 {
            let mut spec = ModelSpec::new(
                format!("m{index}"),
                (5 + rng.below(40)) * GB,
                1_000 * (1 + rng.below(60)),
            );
            spec.pinned = rng.below(10) == 0;
            catalog.insert(spec);
        }
        let mut view = FleetView::new();
        for index in 0..1 + rng.below(6) {
            let gpus: Vec<u64> = (0..1 + rng.below(3))
                .map(|_| (20 + rng.below(60)) * GB)
                .collect();
            let node = view.add_node(&format!("n{index}:1"), &gpus, 4);
            for _ in 0..8 {
                let model = ModelId(rng.below(12) as u32);
                let gpu = rng.below(gpus.len() as u64) as u32;
                let vram = catalog.get(model).unwrap().vram_bytes;
                if view.node(node).resident(model).is_some()
                    || view.node(node).gpus[gpu as usize].vram_free < vram
                {
                    continue;
                }
                let status = match rng.below(8) {
                    0 => ModelStatus::Loading,
                    1 => ModelStatus::Failed,
                    _ => ModelStatus::Loaded,
                };
                let at = NOW - (rng.below(6) as i64) * 10 * MINUTE;
                view.upsert(node, Resident::new(model, gpu, status, vram, at));
                // Requests begin and end so the idle index is kept up to date.
                for _ in 0..rng.below(3) {
                    view.begin_request(node, model, at);
                }
                if rng.below(2) == 0 {
                    view.end_request(node, model, at + (rng.below(3) as i64) * MINUTE);
                }
            }
            view.set_healthy(node, rng.below(8) != 0);
        }
        if rng.below(4) == 0 {
            // An agent report: the node's models, GPUs and health at once.
            let node = NodeId(rng.below(view.nodes().len() as u64) as u32);
            let entry = view.node(node).clone();
            let gpus: Vec<(u64, u64)> = entry
                .gpus
                .iter()
                .map(|g| (g.vram_total, g.vram_free))
                .collect();
            view.replace(
                node,
                "r:1",
                &gpus[..1],
                entry.residents.clone(),
                0,
                4,
                0.0,
                true,
            );
        }
        let (slots, idle) = view.slots_rebuilt();
        assert_eq!(view.slots(), slots.as_slice(), "round {round}");
        assert_eq!(view.slots_idle(), idle.as_slice(), "round {round}");
        let demand = Fixed(
            (0..12)
                .map(|m| (ModelId(m), rng.below(4) as f64 * 0.01, 0.0))
                .collect(),
        );
        let model = ModelId(rng.below(12) as u32);
        let failed: Vec<NodeId> = view
            .holders(model)
            .iter()
            .copied()
            .filter(|&n| {
                view.node(n)
                    .resident(model)
                    .is_some_and(|r| r.status == ModelStatus::Failed)
            })
            .collect();
        for strategy in [Strategy::Lru, Strategy::Demand] {
            let config = PlacementConfig {
                strategy,
                churn_guard_ms: (rng.below(3) as i64) * 15 * MINUTE,
                ..PlacementConfig::default()
            };
            match route(&view, &catalog, &demand, &config, model, NOW) {
                Ok(Decision::Evict { .. }) => planned += 1,
                Err(RouteError::NoRoom { .. }) => {}
                _ => continue,
            }
            let indexed = plan_eviction(&view, &catalog, &demand, &config, model, &failed, NOW);
            let scanned =
                scan_plan_eviction(&view, &catalog, &demand, &config, model, &failed, NOW);
            assert_eq!(indexed, scanned, "round {round}, {strategy:?}");
        }
    }
    assert!(planned > 500, "only {planned} rounds found a plan");
}
