//! Consolidation: after enough eviction cycles, move the models of one GPU
//! onto free space elsewhere when that empties the GPU entirely, so that a
//! model too large for any fragment can load there. It only proposes moves;
//! the caller loads each model at its destination before unloading it at
//! its source, so a moved model stays servable.
//!
//! Cost: for every source GPU, every resident looks for a best-fit
//! destination over the whole fleet (O(GPUs² × models per GPU)); it runs
//! once per `defrag_after_cycles` eviction cycles, never per request.

use super::{Catalog, FleetView, ModelId, ModelStatus, NodeId, PlacementConfig};

/// One model to load on `to` and then unload from `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub model: ModelId,
    pub from_node: NodeId,
    pub from_gpu: u32,
    pub to_node: NodeId,
    pub to_gpu: u32,
    pub vram_bytes: u64,
}

/// Moves that leave `(node, gpu)` holding no model at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefragPlan {
    pub node: NodeId,
    pub gpu: u32,
    pub moves: Vec<Move>,
    /// Sum of the moved models' load times.
    pub expected_load_ms: u64,
}

/// The cheapest consolidation that frees a whole GPU, once at least
/// `defrag_after_cycles` eviction cycles happened since the last one; `None`
/// when it is not yet time, it is disabled (0), or no GPU can be emptied.
/// Only loaded, idle, unpinned models move.
pub fn defrag_plan(
    view: &FleetView,
    catalog: &Catalog,
    config: &PlacementConfig,
    eviction_cycles: u32,
) -> Option<DefragPlan> {
    if config.defrag_after_cycles == 0 || eviction_cycles < config.defrag_after_cycles {
        return None;
    }
    let mut free: Vec<Vec<u64>> = view
        .nodes()
        .iter()
        .map(|node| node.gpus.iter().map(|gpu| gpu.vram_free).collect())
        .collect();
    let mut best: Option<(u64, u64, DefragPlan)> = None;
    let mut moves: Vec<Move> = Vec::new();

    for (source_index, source) in view.nodes().iter().enumerate() {
        if !source.healthy {
            continue;
        }
        let source_id = NodeId(source_index as u32);
        for (gpu_index, gpu) in source.gpus.iter().enumerate() {
            let gpu_index = gpu_index as u32;
            let mut residents: Vec<_> = source
                .residents
                .iter()
                .filter(|r| r.gpu == gpu_index && r.status.holds_vram())
                .collect();
            let held: u64 = residents.iter().map(|r| r.vram_bytes).sum();
            if residents.is_empty() || gpu.vram_free + held < gpu.vram_total {
                continue; // already empty, or something else holds vram there
            }
            let movable = residents.iter().all(|r| {
                r.status == ModelStatus::Loaded
                    && r.in_flight == 0
                    && !catalog.get(r.model).is_some_and(|spec| spec.pinned)
            });
            if !movable {
                continue;
            }
            residents.sort_by(|a, b| b.vram_bytes.cmp(&a.vram_bytes).then(a.model.cmp(&b.model)));
            moves.clear();
            for resident in &residents {
                let Some((to_node, to_gpu)) = best_destination(
                    view,
                    &free,
                    resident.model,
                    resident.vram_bytes,
                    source_id,
                    gpu_index,
                ) else {
                    break;
                };
                free[to_node.index()][to_gpu as usize] -= resident.vram_bytes;
                moves.push(Move {
                    model: resident.model,
                    from_node: source_id,
                    from_gpu: gpu_index,
                    to_node,
                    to_gpu,
                    vram_bytes: resident.vram_bytes,
                });
            }
            for done in &moves {
                free[done.to_node.index()][done.to_gpu as usize] += done.vram_bytes;
            }
            if moves.len() != residents.len() {
                continue;
            }
            let load_ms: u64 = moves
                .iter()
                .map(|m| catalog.get(m.model).map_or(0, |spec| spec.load_ms))
                .sum();
            if best
                .as_ref()
                .is_none_or(|(best_ms, best_bytes, _)| (load_ms, held) < (*best_ms, *best_bytes))
            {
                best = Some((
                    load_ms,
                    held,
                    DefragPlan {
                        node: source_id,
                        gpu: gpu_index,
                        moves: moves.clone(),
                        expected_load_ms: load_ms,
                    },
                ));
            }
        }
    }
    best.map(|(_, _, plan)| plan)
}

/// The healthy GPU, other than the source, that `vram` fits most tightly,
/// on a node that does not already hold `model` elsewhere.
fn best_destination(
    view: &FleetView,
    free: &[Vec<u64>],
    model: ModelId,
    vram: u64,
    source_node: NodeId,
    source_gpu: u32,
) -> Option<(NodeId, u32)> {
    let mut best: Option<(u64, NodeId, u32)> = None;
    for (index, node) in view.nodes().iter().enumerate() {
        let id = NodeId(index as u32);
        if !node.healthy || (id != source_node && node.resident(model).is_some()) {
            continue;
        }
        for (gpu_index, &room) in free[index].iter().enumerate() {
            let gpu_index = gpu_index as u32;
            if (id, gpu_index) == (source_node, source_gpu) || room < vram {
                continue;
            }
            let leftover = room - vram;
            if best.is_none_or(|(best_leftover, _, _)| leftover < best_leftover) {
                best = Some((leftover, id, gpu_index));
            }
        }
    }
    best.map(|(_, node, gpu)| (node, gpu))
}
