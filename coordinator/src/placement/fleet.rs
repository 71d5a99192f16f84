//! The fleet view: nodes, their GPUs' VRAM, the models on them and the load
//! they carry, as agents report it. It keeps a per-model index of the nodes
//! holding that model so that routing to a loaded model never scans the
//! fleet, and per node the idle models oldest first so that an eviction
//! plan never sorts them. It never decides anything; `route` reads it.

use super::{ModelId, NodeId};
use allot::clock::UnixMs;
use std::sync::Arc;

/// Lifecycle of a model on a node, as its agent reports it.
///
/// ```text
/// Unloaded ──load──> Loading ──ok──> Loaded ──evict──> Unloaded
///                       └──error──> Failed
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelStatus {
    Loaded,
    Loading,
    Unloaded,
    Failed,
}

impl ModelStatus {
    /// Whether a model in this state occupies VRAM.
    pub fn holds_vram(self) -> bool {
        matches!(self, ModelStatus::Loaded | ModelStatus::Loading)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub vram_total: u64,
    pub vram_free: u64,
}

/// One model on one node. A model lives on exactly one GPU: placement does
/// not split models across GPUs (no tensor parallelism).
#[derive(Clone, Debug, PartialEq)]
pub struct Resident {
    pub model: ModelId,
    pub gpu: u32,
    pub status: ModelStatus,
    /// VRAM it occupies (measured by the agent when it can).
    pub vram_bytes: u64,
    /// Last request served (or load start, before any).
    pub last_access: UnixMs,
    /// When `status` last changed; for `Loading`, when the load began.
    pub since: UnixMs,
    pub in_flight: u32,
}

impl Resident {
    pub fn new(model: ModelId, gpu: u32, status: ModelStatus, vram_bytes: u64, at: UnixMs) -> Self {
        Resident {
            model,
            gpu,
            status,
            vram_bytes,
            last_access: at,
            since: at,
            in_flight: 0,
        }
    }

    /// Its entry among the node's idle models, when it is one.
    fn idle(&self) -> Option<Idle> {
        (self.status == ModelStatus::Loaded && self.in_flight == 0).then_some(Idle {
            gpu: self.gpu,
            last_access: self.last_access,
            model: self.model,
            vram_bytes: self.vram_bytes,
        })
    }
}

/// A loaded model with no request in flight: all an eviction plan may take
/// (pinned models and the churn guard are the plan's to check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Idle {
    pub gpu: u32,
    pub last_access: UnixMs,
    pub model: ModelId,
    pub vram_bytes: u64,
}

impl Idle {
    /// Grouped by GPU, least recently used first, ties by model: the LRU
    /// victim order.
    fn key(&self) -> (u32, UnixMs, ModelId) {
        (self.gpu, self.last_access, self.model)
    }
}

/// Moves a resident's idle entry from `before` to `after` (either absent).
fn reindex(idle: &mut Vec<Idle>, before: Option<Idle>, after: Option<Idle>) {
    if let Some(old) = before {
        if let Ok(at) = idle.binary_search_by(|e| e.key().cmp(&old.key())) {
            idle.remove(at);
        }
    }
    if let Some(new) = after {
        let at = idle.partition_point(|e| e.key() < new.key());
        idle.insert(at, new);
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub endpoint: Arc<str>,
    pub healthy: bool,
    pub gpus: Vec<Gpu>,
    pub residents: Vec<Resident>,
    /// Requests in flight on the node, all models together.
    pub in_flight: u32,
    /// Concurrent requests the node serves well; load is `in_flight / capacity`.
    pub capacity: u32,
    /// Measured recent token throughput of the node, tokens per second.
    pub throughput_tokens_per_s: f64,
    /// Its residents that are [`Idle`], in [`Idle::key`] order.
    idle: Vec<Idle>,
}

impl Node {
    pub fn resident(&self, model: ModelId) -> Option<&Resident> {
        self.residents.iter().find(|r| r.model == model)
    }

    pub fn vram_used(&self) -> u64 {
        self.gpus.iter().map(|g| g.vram_total - g.vram_free).sum()
    }

    /// Loaded models without requests in flight, by GPU, least recently
    /// used first.
    pub(crate) fn idle(&self) -> &[Idle] {
        &self.idle
    }
}

/// Orders nodes by load (`in_flight / capacity`) without dividing.
pub(crate) fn load_cmp(a: &Node, b: &Node) -> std::cmp::Ordering {
    let left = u64::from(a.in_flight) * u64::from(b.capacity.max(1));
    let right = u64::from(b.in_flight) * u64::from(a.capacity.max(1));
    left.cmp(&right)
}

/// One GPU as a scan of the fleet reads it: all GPUs sit in one array in
/// node order, so choosing a GPU reads contiguous memory and touches a
/// node's own data only for the few GPUs that could win. Derived from the
/// nodes after every change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    pub vram_total: u64,
    pub vram_free: u64,
    pub node: u32,
    pub gpu: u16,
    pub healthy: bool,
}

/// The idle models of the [`Slot`] at the same index, kept apart so that a
/// scan for free VRAM reads a third of the bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlotIdle {
    /// VRAM of the GPU's idle models.
    pub idle_bytes: u64,
    /// VRAM of its idle models but the most recently used one, and but
    /// the smallest one: a plan that must free more takes that one, or all.
    pub idle_bytes_but_newest: u64,
    pub idle_bytes_but_smallest: u64,
    /// Last access of its least and most recently used idle model.
    pub oldest_idle: UnixMs,
    pub newest_idle: UnixMs,
    /// Bit `model % 64` set for each of its idle models.
    pub idle_models: u64,
}

#[derive(Clone, Debug, Default)]
pub struct FleetView {
    nodes: Vec<Node>,
    /// Model → sorted nodes holding a resident entry for it (any status).
    holders: Vec<Vec<NodeId>>,
    /// Every node's GPUs, in node then GPU order.
    slots: Vec<Slot>,
    slots_idle: Vec<SlotIdle>,
    /// Node → index of its first GPU in `slots`.
    first_slot: Vec<usize>,
    /// Model → nodes where it is idle.
    idle_count: Vec<u32>,
    /// Model → the most VRAM it ever held while idle (never lowered, so
    /// always at least what any idle copy holds now).
    idle_vram_max: Vec<u64>,
}

impl FleetView {
    pub fn new() -> Self {
        FleetView::default()
    }

    pub fn add_node(&mut self, endpoint: &str, gpu_vram_totals: &[u64], capacity: u32) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node {
            endpoint: Arc::from(endpoint),
            healthy: true,
            gpus: gpu_vram_totals
                .iter()
                .map(|&total| Gpu {
                    vram_total: total,
                    vram_free: total,
                })
                .collect(),
            residents: Vec::new(),
            in_flight: 0,
            capacity,
            throughput_tokens_per_s: 0.0,
            idle: Vec::new(),
        });
        self.first_slot.push(self.slots.len());
        let count = self.slots.len() + gpu_vram_totals.len();
        self.slots.resize(count, Slot::default());
        self.slots_idle.resize(count, SlotIdle::default());
        self.refresh(id);
        id
    }

    /// Every GPU of the fleet, in node order.
    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The idle models of each of [`FleetView::slots`].
    pub(crate) fn slots_idle(&self) -> &[SlotIdle] {
        &self.slots_idle
    }

    /// Per model id, how many nodes hold it idle.
    pub(crate) fn idle_counts(&self) -> &[u32] {
        &self.idle_count
    }

    /// Per model id, at least the VRAM (≥ 1 byte) any idle copy of it holds.
    pub(crate) fn idle_vram_max(&self) -> &[u64] {
        &self.idle_vram_max
    }

    /// Moves a resident's idle entry on `node` from `before` to `after`.
    fn reindex(&mut self, node: NodeId, before: Option<Idle>, after: Option<Idle>) {
        if before == after {
            return;
        }
        for (entry, delta) in [(before, -1i64), (after, 1)] {
            if let Some(entry) = entry {
                if self.idle_count.len() <= entry.model.index() {
                    self.idle_count.resize(entry.model.index() + 1, 0);
                }
                let count = &mut self.idle_count[entry.model.index()];
                *count = (i64::from(*count) + delta) as u32;
            }
        }
        if let Some(entry) = after {
            if self.idle_vram_max.len() <= entry.model.index() {
                self.idle_vram_max.resize(entry.model.index() + 1, 0);
            }
            let most = &mut self.idle_vram_max[entry.model.index()];
            *most = (*most).max(entry.vram_bytes.max(1));
        }
        reindex(&mut self.nodes[node.index()].idle, before, after);
    }

    #[cfg(test)]
    pub(crate) fn slots_rebuilt(&self) -> (Vec<Slot>, Vec<SlotIdle>) {
        let mut copy = self.clone();
        for node in &mut copy.nodes {
            node.idle = node.residents.iter().filter_map(Resident::idle).collect();
            node.idle.sort_by_key(Idle::key);
        }
        copy.rebuild_slots();
        (copy.slots, copy.slots_idle)
    }

    /// Lays every node's GPUs out again, after a node's GPU count changed.
    fn rebuild_slots(&mut self) {
        self.slots.clear();
        self.slots_idle.clear();
        self.first_slot.clear();
        for node in &self.nodes {
            self.first_slot.push(self.slots.len());
            let count = self.slots.len() + node.gpus.len();
            self.slots.resize(count, Slot::default());
            self.slots_idle.resize(count, SlotIdle::default());
        }
        for index in 0..self.nodes.len() {
            self.refresh(NodeId(index as u32));
        }
    }

    /// Derives the slots of `node`'s GPUs from the node.
    fn refresh(&mut self, node: NodeId) {
        let entry = &self.nodes[node.index()];
        let first = self.first_slot[node.index()];
        let mut idle = entry.idle.as_slice();
        for (index, gpu) in entry.gpus.iter().enumerate() {
            let split = idle.partition_point(|e| e.gpu as usize <= index);
            let (on_gpu, rest) = idle.split_at(split);
            idle = rest;
            // As a plan counts them: at least one byte each.
            let bytes = |e: &Idle| e.vram_bytes.max(1);
            let idle_bytes: u64 = on_gpu.iter().map(bytes).sum();
            let newest = on_gpu.last();
            self.slots[first + index] = Slot {
                vram_total: gpu.vram_total,
                vram_free: gpu.vram_free,
                node: node.0,
                gpu: index as u16,
                healthy: entry.healthy,
            };
            self.slots_idle[first + index] = SlotIdle {
                idle_bytes,
                idle_bytes_but_newest: idle_bytes - newest.map_or(0, bytes),
                idle_bytes_but_smallest: idle_bytes - on_gpu.iter().map(bytes).min().unwrap_or(0),
                oldest_idle: on_gpu.first().map_or(UnixMs::MAX, |e| e.last_access),
                newest_idle: newest.map_or(UnixMs::MAX, |e| e.last_access),
                idle_models: on_gpu
                    .iter()
                    .fold(0, |bits, e| bits | 1 << (e.model.0 % 64)),
            };
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, node: NodeId) -> &Node {
        &self.nodes[node.index()]
    }

    /// Nodes holding any entry for `model`, in id order.
    pub fn holders(&self, model: ModelId) -> &[NodeId] {
        self.holders.get(model.index()).map_or(&[], Vec::as_slice)
    }

    pub fn set_healthy(&mut self, node: NodeId, healthy: bool) {
        self.nodes[node.index()].healthy = healthy;
        self.refresh(node);
    }

    pub fn set_throughput(&mut self, node: NodeId, tokens_per_s: f64) {
        self.nodes[node.index()].throughput_tokens_per_s = tokens_per_s;
    }

    /// Free VRAM as the agent measured it (other processes use VRAM too).
    pub fn set_gpu_free(&mut self, node: NodeId, gpu: u32, vram_free: u64) {
        let gpu = &mut self.nodes[node.index()].gpus[gpu as usize];
        gpu.vram_free = vram_free.min(gpu.vram_total);
        self.refresh(node);
    }

    /// Records a model on a node, replacing any previous entry for it, and
    /// accounts its VRAM on its GPU.
    pub fn upsert(&mut self, node: NodeId, resident: Resident) {
        debug_assert!((resident.gpu as usize) < self.nodes[node.index()].gpus.len());
        self.remove(node, resident.model);
        let model = resident.model;
        let entry = &mut self.nodes[node.index()];
        if resident.status.holds_vram() {
            let gpu = &mut entry.gpus[resident.gpu as usize];
            gpu.vram_free = gpu.vram_free.saturating_sub(resident.vram_bytes);
        }
        entry.in_flight += resident.in_flight;
        let idle = resident.idle();
        entry.residents.push(resident);
        self.reindex(node, None, idle);
        self.refresh(node);
        if self.holders.len() <= model.index() {
            self.holders.resize(model.index() + 1, Vec::new());
        }
        let holders = &mut self.holders[model.index()];
        if let Err(at) = holders.binary_search(&node) {
            holders.insert(at, node);
        }
    }

    /// Forgets a model on a node, giving its VRAM back to its GPU.
    pub fn remove(&mut self, node: NodeId, model: ModelId) -> Option<Resident> {
        let entry = &mut self.nodes[node.index()];
        let position = entry.residents.iter().position(|r| r.model == model)?;
        let resident = entry.residents.swap_remove(position);
        if resident.status.holds_vram() {
            let gpu = &mut entry.gpus[resident.gpu as usize];
            gpu.vram_free = (gpu.vram_free + resident.vram_bytes).min(gpu.vram_total);
        }
        entry.in_flight -= resident.in_flight;
        self.reindex(node, resident.idle(), None);
        self.refresh(node);
        if let Some(holders) = self.holders.get_mut(model.index()) {
            if let Ok(at) = holders.binary_search(&node) {
                holders.remove(at);
            }
        }
        Some(resident)
    }

    /// Changes a model's status on a node, adjusting VRAM when it starts or
    /// stops holding any.
    pub fn set_status(&mut self, node: NodeId, model: ModelId, status: ModelStatus, at: UnixMs) {
        let entry = &mut self.nodes[node.index()];
        let Some(resident) = entry.residents.iter_mut().find(|r| r.model == model) else {
            return;
        };
        let (was, gpu, vram) = (resident.status, resident.gpu, resident.vram_bytes);
        let before = resident.idle();
        resident.status = status;
        resident.since = at;
        let after = resident.idle();
        let gpu = &mut entry.gpus[gpu as usize];
        match (was.holds_vram(), status.holds_vram()) {
            (true, false) => gpu.vram_free = (gpu.vram_free + vram).min(gpu.vram_total),
            (false, true) => gpu.vram_free = gpu.vram_free.saturating_sub(vram),
            _ => {}
        }
        self.reindex(node, before, after);
        self.refresh(node);
    }

    /// Replaces everything known of `node` with its agent's latest report:
    /// GPUs as `(total, measured free)` bytes, the models on it (a model on
    /// a GPU the node does not have is dropped), capacity, throughput,
    /// health and the requests in flight (at least those of its models).
    #[allow(clippy::too_many_arguments)]
    pub fn replace(
        &mut self,
        node: NodeId,
        endpoint: &str,
        gpus: &[(u64, u64)],
        residents: Vec<Resident>,
        in_flight: u32,
        capacity: u32,
        throughput_tokens_per_s: f64,
        healthy: bool,
    ) {
        let old: Vec<ModelId> = self.nodes[node.index()]
            .residents
            .iter()
            .map(|r| r.model)
            .collect();
        for model in old {
            self.remove(node, model);
        }
        let entry = &mut self.nodes[node.index()];
        if *entry.endpoint != *endpoint {
            entry.endpoint = Arc::from(endpoint);
        }
        let gpus_before = entry.gpus.len();
        entry.gpus = gpus
            .iter()
            .map(|&(total, _)| Gpu {
                vram_total: total,
                vram_free: total,
            })
            .collect();
        entry.in_flight = 0;
        entry.capacity = capacity.max(1);
        entry.throughput_tokens_per_s = throughput_tokens_per_s;
        entry.healthy = healthy;
        if gpus.len() != gpus_before {
            self.rebuild_slots();
        }
        self.refresh(node);
        let gpu_count = gpus.len();
        for resident in residents {
            if (resident.gpu as usize) < gpu_count {
                self.upsert(node, resident);
            }
        }
        for (index, &(_, free)) in gpus.iter().enumerate() {
            self.set_gpu_free(node, index as u32, free);
        }
        let entry = &mut self.nodes[node.index()];
        entry.in_flight = entry.in_flight.max(in_flight);
    }

    /// A request for `model` starts on `node`.
    pub fn begin_request(&mut self, node: NodeId, model: ModelId, at: UnixMs) {
        let entry = &mut self.nodes[node.index()];
        if let Some(resident) = entry.residents.iter_mut().find(|r| r.model == model) {
            let before = resident.idle();
            resident.in_flight += 1;
            resident.last_access = resident.last_access.max(at);
            entry.in_flight += 1;
            if before.is_some() {
                self.reindex(node, before, None);
                self.refresh(node);
            }
        }
    }

    /// A request for `model` on `node` finished.
    pub fn end_request(&mut self, node: NodeId, model: ModelId, at: UnixMs) {
        let entry = &mut self.nodes[node.index()];
        if let Some(resident) = entry.residents.iter_mut().find(|r| r.model == model) {
            let before = resident.idle();
            resident.last_access = resident.last_access.max(at);
            if resident.in_flight > 0 {
                resident.in_flight -= 1;
                entry.in_flight -= 1;
            }
            let after = resident.idle();
            if before != after {
                self.reindex(node, before, after);
                self.refresh(node);
            }
        }
    }

    /// VRAM in use across the fleet.
    pub fn vram_used(&self) -> u64 {
        self.nodes.iter().map(Node::vram_used).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_replaces_the_nodes_models_gpus_and_the_model_index() {
        let mut view = FleetView::new();
        let node = view.add_node("a:1", &[100], 4);
        let (old, new) = (ModelId(0), ModelId(1));
        view.upsert(node, Resident::new(old, 0, ModelStatus::Loaded, 40, 0));
        view.replace(
            node,
            "a:2",
            &[(100, 50), (200, 170)],
            vec![
                Resident::new(new, 1, ModelStatus::Loading, 30, 5),
                Resident::new(ModelId(2), 7, ModelStatus::Loaded, 10, 5),
            ],
            3,
            8,
            12.5,
            true,
        );
        assert!(view.holders(old).is_empty());
        assert_eq!(view.holders(new), &[node]);
        assert!(view.holders(ModelId(2)).is_empty(), "gpu 7 does not exist");
        let entry = view.node(node);
        assert_eq!(&*entry.endpoint, "a:2");
        assert_eq!(entry.gpus[0].vram_free, 50, "the measured free vram");
        assert_eq!(entry.gpus[1].vram_free, 170, "measured, not recomputed");
        assert_eq!((entry.in_flight, entry.capacity), (3, 8));
    }

    #[test]
    fn fleet_view_accounts_vram_in_flight_and_the_model_index() {
        let mut view = FleetView::new();
        let a = view.add_node("a:1", &[100, 100], 4);
        let b = view.add_node("b:1", &[100], 4);
        let model = ModelId(2);
        view.upsert(b, Resident::new(model, 0, ModelStatus::Loading, 30, 0));
        view.upsert(a, Resident::new(model, 1, ModelStatus::Loaded, 40, 0));
        assert_eq!(view.holders(model), &[a, b]);
        assert_eq!(view.node(a).gpus[1].vram_free, 60);
        assert_eq!(view.node(b).gpus[0].vram_free, 70);

        view.begin_request(a, model, 5);
        assert_eq!(view.node(a).in_flight, 1);
        assert_eq!(view.node(a).resident(model).unwrap().last_access, 5);
        view.end_request(a, model, 9);
        assert_eq!(view.node(a).in_flight, 0);

        view.set_status(b, model, ModelStatus::Failed, 10);
        assert_eq!(view.node(b).gpus[0].vram_free, 100, "failed holds no vram");
        view.remove(a, model);
        assert_eq!(view.node(a).gpus[1].vram_free, 100);
        assert_eq!(view.holders(model), &[b]);
    }
}
