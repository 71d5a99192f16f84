//! VRAM-aware placement: which node serves a model now, and what to load or
//! evict to make that possible. Everything here is a plain function over
//! plain data (a [`FleetView`], a [`Catalog`], [`Demand`] estimates and a
//! [`PlacementConfig`]); it never performs I/O, reads a clock or spawns a
//! task. Sessions feed the view, the caller applies decisions.
//!
//! [`route`] answers, in order:
//! 1. a healthy node with the model loaded, least loaded first
//!    (`in_flight / capacity`, ties to the lowest node id); failing that, a
//!    healthy node already loading it (the request waits for that load);
//! 2. a healthy node with a GPU whose free VRAM fits the model: a cold start,
//!    on the GPU it fits most tightly (best fit keeps whole GPUs free for
//!    large models);
//! 3. an eviction plan on the GPU where evicting costs least, under the
//!    configured [`Strategy`]: `Lru` (the plan whose newest victim is
//!    oldest) or `Demand` (the plan with the least expected reload time).
//!
//! A plan never evicts a model with requests in flight, a model that is
//! still loading, a model pinned in the catalog, or one used within
//! `churn_guard_ms`. Victims are taken in strategy order until the model
//! fits, then any victim not needed for the fit is dropped again.
//!
//! Beside `route`, the controller (`LivePlacement::tick`) uses
//! [`wants_copy`] and [`place_copy`] to add a copy of a model whose every
//! serving node stays saturated, and [`defrag_plan`] to empty a whole GPU
//! after enough eviction cycles.
//!
//! Limit: a model is placed on a single GPU; models larger than any one GPU
//! (tensor-parallel deployments) are refused with [`RouteError::TooLarge`].

mod catalog;
mod defrag;
mod demand;
mod fleet;
mod live;

pub use catalog::{Catalog, ModelSpec};
pub use defrag::{defrag_plan, DefragPlan, Move};
pub use demand::{Demand, DemandTracker, NoDemand};
pub use fleet::{FleetView, Gpu, ModelStatus, Node, Resident};
pub use live::{
    load_catalog, parse_catalog, CatalogError, LivePlacement, PlacementError, PlacementService,
    Served,
};

use allot::clock::UnixMs;
use fleet::load_cmp;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// Dense index of a model in the [`Catalog`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelId(pub u32);

impl ModelId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model#{}", self.0)
    }
}

/// Dense index of a node in the [`FleetView`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

/// How eviction victims are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Least recently used first: what operators expect.
    #[default]
    Lru,
    /// Least expected reload cost per byte freed first, from demand.
    Demand,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// Victim selection when a model needs room: `lru` or `demand`.
    pub strategy: Strategy,
    /// A model used within this many milliseconds is never evicted.
    pub churn_guard_ms: i64,
    /// Eviction cycles after which consolidation is considered; 0 disables it.
    pub defrag_after_cycles: u32,
    /// `demand` only: "a request within the reload time" looks at least this
    /// far ahead (0 keeps the window at exactly the reload time).
    pub demand_horizon_ms: i64,
    /// Most copies of one model the controller keeps loaded.
    pub max_copies: u32,
    /// A loaded model gets one more copy once every node serving it has
    /// reported itself saturated (`in_flight >= capacity`, with requests
    /// for this model among them) for this many milliseconds; 0 disables
    /// copies. See [`wants_copy`].
    pub copy_after_ms: i64,
    /// Send agents load/unload directives so that every wanted model is
    /// loaded somewhere.
    pub directives: bool,
    /// A model is wanted while a `Route` asked for it or a request used it
    /// within this many milliseconds.
    pub want_window_ms: i64,
    /// A node that no agent has reported for this many milliseconds
    /// leaves the fleet (its models with it): nothing is routed to it and
    /// `Fleet` no longer lists it. A model learned from reports (not in the
    /// catalog file) that no node has reported for as long leaves `Fleet`'s
    /// catalog too. At least 1000.
    pub node_expiry_ms: i64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            strategy: Strategy::Lru,
            churn_guard_ms: 60_000,
            defrag_after_cycles: 16,
            demand_horizon_ms: 0,
            max_copies: 8,
            copy_after_ms: 10_000,
            directives: true,
            want_window_ms: 60_000,
            node_expiry_ms: 300_000,
        }
    }
}

/// Where a request for a model goes now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Loaded and healthy: send the request there.
    Serve { node: NodeId, endpoint: Arc<str> },
    /// Not loaded anywhere usable, but `gpu` has room: load it there. With
    /// `in_progress`, that load has already begun and `expected_load_ms` is
    /// what is left of it.
    ColdStart {
        node: NodeId,
        gpu: u32,
        endpoint: Arc<str>,
        expected_load_ms: u64,
        in_progress: bool,
    },
    /// Unload `victims` from `gpu`, then load the model there.
    Evict {
        node: NodeId,
        gpu: u32,
        endpoint: Arc<str>,
        victims: Vec<ModelId>,
        expected_load_ms: u64,
    },
}

impl Decision {
    pub fn node(&self) -> NodeId {
        match self {
            Decision::Serve { node, .. }
            | Decision::ColdStart { node, .. }
            | Decision::Evict { node, .. } => *node,
        }
    }

    pub fn endpoint(&self) -> &Arc<str> {
        match self {
            Decision::Serve { endpoint, .. }
            | Decision::ColdStart { endpoint, .. }
            | Decision::Evict { endpoint, .. } => endpoint,
        }
    }
}

/// Models that would have freed room but may not be evicted, on GPUs large
/// enough for the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protected {
    pub in_flight: u32,
    pub loading: u32,
    pub pinned: u32,
    pub churn_guard: u32,
}

impl fmt::Display for Protected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} with requests in flight, {} loading, {} pinned, {} used within the churn guard",
            self.in_flight, self.loading, self.pinned, self.churn_guard
        )
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown model {0}")]
    UnknownModel(ModelId),
    #[error("no healthy node")]
    NoHealthyNode,
    #[error("{model} needs {need_bytes} bytes of vram, more than the largest healthy gpu ({largest_gpu_bytes}); models are not split across gpus")]
    TooLarge {
        model: ModelId,
        need_bytes: u64,
        largest_gpu_bytes: u64,
    },
    #[error("no gpu can make room for {model} ({need_bytes} bytes) even after allowed evictions; protected: {protected}")]
    NoRoom {
        model: ModelId,
        need_bytes: u64,
        protected: Protected,
    },
}

/// Where a request for `model` should go at `now`. See the module docs for
/// the order of preference.
pub fn route<D: Demand + ?Sized>(
    view: &FleetView,
    catalog: &Catalog,
    demand: &D,
    config: &PlacementConfig,
    model: ModelId,
    now: UnixMs,
) -> Result<Decision, RouteError> {
    let spec = catalog.get(model).ok_or(RouteError::UnknownModel(model))?;
    let holders = view.holders(model);
    if let Some(decision) = serve_or_join(view, spec, holders, model, now) {
        return Ok(decision);
    }
    // Never retry a node where this model just failed to load.
    let failed: Vec<NodeId> = holders
        .iter()
        .copied()
        .filter(|&node| {
            view.node(node)
                .resident(model)
                .is_some_and(|r| r.status == ModelStatus::Failed)
        })
        .collect();
    place(view, catalog, demand, config, model, &failed, now)
}

/// Where to load one more copy of `model`, which is already loaded (or
/// loading) somewhere: steps 2 and 3 of [`route`] over the healthy nodes that
/// hold no copy of it. A node holds at most one copy of a model.
pub fn place_copy<D: Demand + ?Sized>(
    view: &FleetView,
    catalog: &Catalog,
    demand: &D,
    config: &PlacementConfig,
    model: ModelId,
    now: UnixMs,
) -> Result<Decision, RouteError> {
    let holders = view.holders(model).to_vec();
    place(view, catalog, demand, config, model, &holders, now)
}

/// Steps 2 and 3: a cold start where the model fits, else the cheapest
/// eviction plan, never on a node in `excluded`.
fn place<D: Demand + ?Sized>(
    view: &FleetView,
    catalog: &Catalog,
    demand: &D,
    config: &PlacementConfig,
    model: ModelId,
    excluded: &[NodeId],
    now: UnixMs,
) -> Result<Decision, RouteError> {
    let spec = catalog.get(model).ok_or(RouteError::UnknownModel(model))?;
    let need = spec.vram_bytes;
    let mut largest_gpu = None;
    let mut best: Option<(u64, NodeId, u32)> = None;
    for slot in view.slots() {
        let id = NodeId(slot.node);
        if !slot.healthy || (!excluded.is_empty() && excluded.contains(&id)) {
            continue;
        }
        largest_gpu = largest_gpu.max(Some(slot.vram_total));
        if slot.vram_free < need {
            continue;
        }
        let leftover = slot.vram_free - need;
        let better = match best {
            None => true,
            Some((best_leftover, best_node, _)) => match leftover.cmp(&best_leftover) {
                Ordering::Less => true,
                Ordering::Greater => false,
                Ordering::Equal => load_cmp(view.node(id), view.node(best_node)) == Ordering::Less,
            },
        };
        if better {
            best = Some((leftover, id, u32::from(slot.gpu)));
        }
    }
    if let Some((_, node, gpu)) = best {
        return Ok(Decision::ColdStart {
            node,
            gpu,
            endpoint: view.node(node).endpoint.clone(),
            expected_load_ms: spec.load_ms,
            in_progress: false,
        });
    }
    let Some(largest_gpu_bytes) = largest_gpu else {
        return Err(RouteError::NoHealthyNode);
    };
    if largest_gpu_bytes < need {
        return Err(RouteError::TooLarge {
            model,
            need_bytes: need,
            largest_gpu_bytes,
        });
    }
    plan_eviction(view, catalog, demand, config, model, excluded, now)
}

/// Step 1: a loaded copy, or a load already under way.
fn serve_or_join(
    view: &FleetView,
    spec: &ModelSpec,
    holders: &[NodeId],
    model: ModelId,
    now: UnixMs,
) -> Option<Decision> {
    let mut loaded: Option<NodeId> = None;
    let mut loading: Option<(UnixMs, NodeId, u32)> = None;
    for &id in holders {
        let node = view.node(id);
        if !node.healthy {
            continue;
        }
        let Some(resident) = node.resident(model) else {
            continue;
        };
        match resident.status {
            ModelStatus::Loaded => {
                if loaded.is_none_or(|best| load_cmp(node, view.node(best)) == Ordering::Less) {
                    loaded = Some(id);
                }
            }
            ModelStatus::Loading => {
                if loading.is_none_or(|(since, _, _)| resident.since < since) {
                    loading = Some((resident.since, id, resident.gpu));
                }
            }
            ModelStatus::Unloaded | ModelStatus::Failed => {}
        }
    }
    if let Some(node) = loaded {
        return Some(Decision::Serve {
            node,
            endpoint: view.node(node).endpoint.clone(),
        });
    }
    let (since, node, gpu) = loading?;
    let elapsed = u64::try_from(now - since).unwrap_or(0);
    Some(Decision::ColdStart {
        node,
        gpu,
        endpoint: view.node(node).endpoint.clone(),
        expected_load_ms: spec.load_ms.saturating_sub(elapsed),
        in_progress: true,
    })
}

/// One evictable model on the GPU being considered.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    model: ModelId,
    vram: u64,
    last_access: UnixMs,
    /// Expected reload seconds caused by evicting it (0 under LRU).
    expected_reload_s: f64,
    /// `expected_reload_s` per byte freed: the demand strategy's order.
    rank: f64,
    chosen: bool,
}

/// How much a plan costs; lower is better, compared field by field.
#[derive(Clone, Copy, Debug)]
struct PlanCost {
    expected_reload_s: f64,
    newest_victim_access: UnixMs,
    victims: usize,
    bytes: u64,
}

impl PlanCost {
    fn cmp(&self, other: &PlanCost) -> Ordering {
        self.expected_reload_s
            .total_cmp(&other.expected_reload_s)
            .then(self.newest_victim_access.cmp(&other.newest_victim_access))
            .then(self.victims.cmp(&other.victims))
            .then(self.bytes.cmp(&other.bytes))
    }
}

/// P(a request within the window) × reload seconds, per model, computed on
/// first use so LRU and GPUs without candidates pay nothing.
struct ExpectedReload<'a, D: ?Sized> {
    demand: &'a D,
    catalog: &'a Catalog,
    horizon_ms: i64,
    now: UnixMs,
    memo: Vec<f64>,
}

impl<D: Demand + ?Sized> ExpectedReload<'_, D> {
    fn of(&mut self, model: ModelId) -> f64 {
        if self.memo.is_empty() {
            self.memo = vec![f64::NAN; self.catalog.len()];
        }
        let Some(slot) = self.memo.get_mut(model.index()) else {
            return 0.0;
        };
        if slot.is_nan() {
            let reload_ms = self.catalog.get(model).map_or(0, |spec| spec.load_ms);
            let reload_s = reload_ms as f64 / 1000.0;
            let window_s = (reload_ms as i64).max(self.horizon_ms) as f64 / 1000.0;
            let rate = self.demand.request_rate(model, self.now).max(0.0);
            let probability = 1.0 - (-rate * window_s).exp();
            *slot = probability * reload_s;
        }
        *slot
    }
}

/// Step 3: the cheapest allowed eviction plan over every healthy GPU large
/// enough for the model.
///
/// Speed: only the fleet view's idle models are read (models in flight or
/// loading never are), already grouped by GPU and in LRU order, so LRU
/// walks each GPU's oldest few and never sorts. Of those, only models that
/// could still be part of a plan beating the best one so far are kept (see
/// [`could_improve`]); a GPU is ranked (victims sorted and chosen) only when
/// they free enough room, so once a good plan is found most GPUs are
/// skipped. A skipped GPU had no better plan to offer.
fn plan_eviction<D: Demand + ?Sized>(
    view: &FleetView,
    catalog: &Catalog,
    demand: &D,
    config: &PlacementConfig,
    model: ModelId,
    excluded: &[NodeId],
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
    let mut candidates: Vec<Candidate> = Vec::with_capacity(16);
    let mut best: Option<(PlanCost, NodeId, u32)> = None;
    let mut best_victims: Vec<ModelId> = Vec::new();
    // Demand: per bit of `SlotIdle::idle_models`, the least expected reload and
    // the most VRAM of the idle models it stands for.
    let mut least: Option<[(f64, u64); 64]> = None;

    for (slot, idle) in view.slots().iter().zip(view.slots_idle()) {
        let id = NodeId(slot.node);
        if !slot.healthy
            || slot.vram_total < need
            || idle.idle_bytes == 0
            || (!excluded.is_empty() && excluded.contains(&id))
        {
            continue;
        }
        let gap = need.saturating_sub(slot.vram_free);
        if idle.idle_bytes < gap {
            continue;
        }
        // Skip GPUs whose every plan costs more than the best: each plan
        // takes the newest idle model when the others cannot free `gap`,
        // and takes them all when all but the smallest cannot.
        let takes_all = idle.idle_bytes_but_smallest < gap;
        if let Some((cost, _, _)) = &best {
            let beaten = match config.strategy {
                Strategy::Lru => {
                    let newest = if idle.idle_bytes_but_newest < gap {
                        idle.newest_idle
                    } else {
                        idle.oldest_idle
                    };
                    newest > cost.newest_victim_access
                }
                Strategy::Demand => {
                    let least = least.get_or_insert_with(|| {
                        let mut least = [(f64::INFINITY, 0); 64];
                        let most = view.idle_vram_max();
                        for (index, &count) in view.idle_counts().iter().enumerate() {
                            if count > 0 {
                                let bucket = &mut least[index % 64];
                                bucket.0 = bucket.0.min(expected.of(ModelId(index as u32)));
                                bucket.1 = bucket.1.max(most[index]);
                            }
                        }
                        least
                    });
                    plans_cost_more(
                        least,
                        idle.idle_models,
                        gap,
                        takes_all,
                        cost.expected_reload_s,
                    )
                }
            };
            if beaten {
                continue;
            }
        }
        let node = view.node(id);
        let gpu_index = u32::from(slot.gpu);
        let on_node = node.idle();
        let start = on_node.partition_point(|e| e.gpu < gpu_index);
        let end = start + on_node[start..].partition_point(|e| e.gpu == gpu_index);
        let bound = best.as_ref().map(|b| b.0);
        candidates.clear();
        let mut room = 0;
        for entry in &on_node[start..end] {
            if now - entry.last_access < config.churn_guard_ms {
                // Oldest first: every later one is guarded too.
                break;
            }
            let expected_reload_s = match config.strategy {
                Strategy::Lru => 0.0,
                Strategy::Demand => expected.of(entry.model),
            };
            let vram = entry.vram_bytes.max(1);
            let candidate = Candidate {
                model: entry.model,
                vram,
                last_access: entry.last_access,
                expected_reload_s,
                rank: expected_reload_s / vram as f64,
                chosen: false,
            };
            if !could_improve(&candidate, bound.as_ref()) {
                if config.strategy == Strategy::Lru {
                    // Oldest first: no later one can improve either.
                    break;
                }
                continue;
            }
            if catalog.get(entry.model).is_some_and(|spec| spec.pinned) {
                continue;
            }
            room += vram;
            candidates.push(candidate);
            if config.strategy == Strategy::Lru && room >= gap {
                // LRU takes victims in this order: later ones are never taken.
                break;
            }
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
            best = Some((cost, id, gpu_index));
            best_victims.clear();
            best_victims.extend(candidates.iter().filter(|c| c.chosen).map(|c| c.model));
        }
    }
    let Some((_, node, gpu)) = best else {
        return Err(RouteError::NoRoom {
            model,
            need_bytes: need,
            protected: protected(view, catalog, config, need, excluded, now),
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

/// Whether every plan on a GPU holding the idle models of `bits` (per bit:
/// least expected reload, most VRAM) that frees `gap` expects more reload
/// than `best`: the sum of all models' when the plan must take all, else
/// the cheapest covering of `gap` when models may be taken in part (a
/// relaxation of the plan), tried cheapest test first.
#[inline]
fn plans_cost_more(
    least: &[(f64, u64); 64],
    bits: u64,
    gap: u64,
    takes_all: bool,
    best: f64,
) -> bool {
    // Margin for rounding: the plan adds its costs in another order.
    let best = best * (1.0 + 1e-9);
    let mut rest = bits;
    if takes_all {
        let mut all = 0.0;
        while rest != 0 {
            all += least[rest.trailing_zeros() as usize].0;
            rest &= rest - 1;
        }
        return all > best;
    }
    let (mut one, mut per_byte) = (f64::INFINITY, f64::INFINITY);
    while rest != 0 {
        let (value, vram) = least[rest.trailing_zeros() as usize];
        one = one.min(value);
        per_byte = per_byte.min(value / vram as f64);
        rest &= rest - 1;
    }
    if one > best || per_byte * gap as f64 > best {
        return true;
    }
    let mut items = [(0.0, 0u64); 8];
    if bits.count_ones() as usize > items.len() {
        return false;
    }
    let mut count = 0;
    rest = bits;
    while rest != 0 {
        let item = least[rest.trailing_zeros() as usize];
        rest &= rest - 1;
        // Insertion by expected reload per byte.
        let mut at = count;
        while at > 0 && items[at - 1].0 * (item.1 as f64) > item.0 * items[at - 1].1 as f64 {
            items[at] = items[at - 1];
            at -= 1;
        }
        items[at] = item;
        count += 1;
    }
    let (mut bound, mut left) = (0.0, gap);
    for &(value, vram) in &items[..count] {
        if vram >= left {
            bound += value * left as f64 / vram as f64;
            break;
        }
        bound += value;
        left -= vram;
    }
    bound > best
}

/// Why no plan exists: the models on large enough healthy GPUs that may not
/// be evicted, by reason. Only computed on the error path.
fn protected(
    view: &FleetView,
    catalog: &Catalog,
    config: &PlacementConfig,
    need: u64,
    excluded: &[NodeId],
    now: UnixMs,
) -> Protected {
    let mut protected = Protected::default();
    for (index, node) in view.nodes().iter().enumerate() {
        if !node.healthy || excluded.contains(&NodeId(index as u32)) {
            continue;
        }
        for resident in &node.residents {
            if !resident.status.holds_vram() || node.gpus[resident.gpu as usize].vram_total < need {
                continue;
            }
            if resident.status == ModelStatus::Loading {
                protected.loading += 1;
            } else if resident.in_flight > 0 {
                protected.in_flight += 1;
            } else if catalog.get(resident.model).is_some_and(|spec| spec.pinned) {
                protected.pinned += 1;
            } else if now - resident.last_access < config.churn_guard_ms {
                protected.churn_guard += 1;
            }
        }
    }
    protected
}

/// Whether a plan containing `candidate` could cost no more than `best`.
/// Costs are non-negative sums led by expected reload time, then by the
/// newest victim's last access: a plan as cheap as `best` holds only
/// victims whose own expected reload is at most `best`'s total, and, when
/// it merely ties, victims accessed no later than `best`'s newest.
fn could_improve(candidate: &Candidate, best: Option<&PlanCost>) -> bool {
    let Some(best) = best else {
        return true;
    };
    candidate.expected_reload_s < best.expected_reload_s
        || (candidate.expected_reload_s <= best.expected_reload_s
            && candidate.last_access <= best.newest_victim_access)
}

fn order_victims(candidates: &mut [Candidate], strategy: Strategy) {
    match strategy {
        Strategy::Lru => {
            candidates.sort_unstable_by(|a, b| {
                a.last_access
                    .cmp(&b.last_access)
                    .then(a.model.cmp(&b.model))
            });
        }
        Strategy::Demand => {
            candidates.sort_unstable_by(|a, b| {
                a.rank
                    .total_cmp(&b.rank)
                    .then(a.last_access.cmp(&b.last_access))
                    .then(a.model.cmp(&b.model))
            });
        }
    }
}

/// Marks victims in order until `gap` bytes are freed, then unmarks any
/// earlier victim the fit does not need. `None` when they cannot free `gap`.
fn choose_victims(candidates: &mut [Candidate], gap: u64) -> Option<PlanCost> {
    let mut freed = 0u64;
    let mut taken = 0;
    while freed < gap {
        let candidate = candidates.get_mut(taken)?;
        candidate.chosen = true;
        freed += candidate.vram;
        taken += 1;
    }
    // The last one taken closed the gap; earlier ones may be superfluous.
    for index in (0..taken.saturating_sub(1)).rev() {
        if freed - candidates[index].vram >= gap {
            candidates[index].chosen = false;
            freed -= candidates[index].vram;
        }
    }
    let mut cost = PlanCost {
        expected_reload_s: 0.0,
        newest_victim_access: UnixMs::MIN,
        victims: 0,
        bytes: freed,
    };
    for candidate in candidates[..taken].iter().filter(|c| c.chosen) {
        cost.expected_reload_s += candidate.expected_reload_s;
        cost.newest_victim_access = cost.newest_victim_access.max(candidate.last_access);
        cost.victims += 1;
    }
    Some(cost)
}

/// Whether `model` should get one more copy now: it is loaded on at least
/// one healthy node, no copy is loading, it has fewer than `max_copies`
/// copies, and every healthy node where it is loaded has been saturated
/// (`saturated_since`: since when every report showed in flight ≥
/// capacity) for `copy_after_ms`, with requests for this model among those
/// in flight. 0 disables copies.
///
/// Saturation is the measured sign that the model's token demand exceeds
/// what its nodes deliver. Token rates alone cannot show it: an agent's
/// tokens per second is what its node served, and demand measured from
/// settled usage is what was served too, so neither exceeds a node's
/// throughput while requests queue in front of it.
pub fn wants_copy(
    view: &FleetView,
    config: &PlacementConfig,
    model: ModelId,
    saturated_since: impl Fn(NodeId) -> Option<UnixMs>,
    now: UnixMs,
) -> bool {
    if config.copy_after_ms <= 0 {
        return false;
    }
    let mut loaded = 0u32;
    for &id in view.holders(model) {
        let node = view.node(id);
        let Some(resident) = node.resident(model).filter(|_| node.healthy) else {
            continue;
        };
        match resident.status {
            ModelStatus::Loading => return false,
            ModelStatus::Loaded => {
                let saturated = resident.in_flight > 0
                    && saturated_since(id).is_some_and(|since| now - since >= config.copy_after_ms);
                if !saturated {
                    return false;
                }
                loaded += 1;
            }
            ModelStatus::Unloaded | ModelStatus::Failed => {}
        }
    }
    loaded > 0 && loaded < config.max_copies.max(1)
}

#[cfg(test)]
mod tests;
