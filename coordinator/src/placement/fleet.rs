//! The fleet view: nodes, their GPUs' VRAM, the models on them and the load
//! they carry, as agents report it. It keeps a per-model index of the nodes
//! holding that model so that routing to a loaded model never scans the
//! fleet. It never decides anything; `route` reads it.

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
}

impl Node {
    pub fn resident(&self, model: ModelId) -> Option<&Resident> {
        self.residents.iter().find(|r| r.model == model)
    }

    fn resident_mut(&mut self, model: ModelId) -> Option<&mut Resident> {
        self.residents.iter_mut().find(|r| r.model == model)
    }

    pub fn vram_used(&self) -> u64 {
        self.gpus.iter().map(|g| g.vram_total - g.vram_free).sum()
    }
}

/// Orders nodes by load (`in_flight / capacity`) without dividing.
pub(crate) fn load_cmp(a: &Node, b: &Node) -> std::cmp::Ordering {
    let left = u64::from(a.in_flight) * u64::from(b.capacity.max(1));
    let right = u64::from(b.in_flight) * u64::from(a.capacity.max(1));
    left.cmp(&right)
}

#[derive(Clone, Debug, Default)]
pub struct FleetView {
    nodes: Vec<Node>,
    /// Model → sorted nodes holding a resident entry for it (any status).
    holders: Vec<Vec<NodeId>>,
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
        });
        id
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
    }

    pub fn set_throughput(&mut self, node: NodeId, tokens_per_s: f64) {
        self.nodes[node.index()].throughput_tokens_per_s = tokens_per_s;
    }

    /// Free VRAM as the agent measured it (other processes use VRAM too).
    pub fn set_gpu_free(&mut self, node: NodeId, gpu: u32, vram_free: u64) {
        let gpu = &mut self.nodes[node.index()].gpus[gpu as usize];
        gpu.vram_free = vram_free.min(gpu.vram_total);
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
        entry.residents.push(resident);
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
        let Some(resident) = entry.resident_mut(model) else {
            return;
        };
        let (was, gpu, vram) = (resident.status, resident.gpu, resident.vram_bytes);
        resident.status = status;
        resident.since = at;
        let gpu = &mut entry.gpus[gpu as usize];
        match (was.holds_vram(), status.holds_vram()) {
            (true, false) => gpu.vram_free = (gpu.vram_free + vram).min(gpu.vram_total),
            (false, true) => gpu.vram_free = gpu.vram_free.saturating_sub(vram),
            _ => {}
        }
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
        if let Some(resident) = entry.resident_mut(model) {
            resident.in_flight += 1;
            resident.last_access = resident.last_access.max(at);
            entry.in_flight += 1;
        }
    }

    /// A request for `model` on `node` finished.
    pub fn end_request(&mut self, node: NodeId, model: ModelId, at: UnixMs) {
        let entry = &mut self.nodes[node.index()];
        if let Some(resident) = entry.resident_mut(model) {
            resident.last_access = resident.last_access.max(at);
            if resident.in_flight > 0 {
                resident.in_flight -= 1;
                entry.in_flight -= 1;
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
