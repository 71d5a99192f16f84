//! The fake neuron's simulated node: GPUs with VRAM, and models that are
//! loaded onto one GPU each, take a while to load, and can be unloaded. The
//! agent's fake-neuron adapter reads it through `GET /_fake/node` and drives
//! it through `POST /_fake/models/{id}/load` and `.../unload`; a model is
//! served only while it is `loaded`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// VRAM of a model loaded at start or loaded without a size: 2 GiB.
pub const DEFAULT_MODEL_VRAM: u64 = 2 << 30;
/// VRAM of the single GPU a fake neuron has unless configured: 24 GiB.
pub const DEFAULT_GPU_VRAM: u64 = 24 << 30;
/// Context window the fake neuron reports for every model.
pub const CONTEXT_LENGTH: u32 = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Loading,
    Loaded,
}

/// One model on the node, as `GET /_fake/node` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeModel {
    pub id: String,
    pub status: ModelStatus,
    pub gpu: u32,
    pub vram_bytes: u64,
    /// Unix milliseconds of the last request served (or of the load).
    pub last_access_ms: u64,
    pub context_length: u32,
    pub capabilities: Vec<String>,
    pub tool_call: bool,
    pub reasoning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuState {
    pub index: u32,
    pub vram_total: u64,
    pub vram_free: u64,
}

/// What `GET /_fake/node` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub gpus: Vec<GpuState>,
    pub models: Vec<NodeModel>,
}

/// Body of `POST /_fake/models/{id}/load`; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadRequest {
    /// VRAM the model takes once loaded (default 2 GiB).
    pub vram_bytes: Option<u64>,
    /// Simulated load time (default 0: loaded at once).
    pub load_ms: u64,
    /// The GPU to load on; without it, the one the model fits most tightly.
    pub gpu: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No GPU has this much VRAM free.
    NoRoom { need: u64, largest_free: u64 },
    /// The GPU asked for does not exist.
    NoSuchGpu { gpu: u32, gpus: usize },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NoRoom { need, largest_free } => write!(
                f,
                "no gpu has {need} bytes of vram free (largest free: {largest_free})"
            ),
            LoadError::NoSuchGpu { gpu, gpus } => {
                write!(f, "gpu: {gpu} does not exist (this node has {gpus})")
            }
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub struct Node {
    vram_totals: Vec<u64>,
    models: BTreeMap<String, NodeModel>,
}

impl Node {
    /// A node with GPUs of `vram_totals` bytes (one 24 GiB GPU when empty)
    /// and `loaded` models loaded at start, each on the first GPU with room.
    pub fn new(vram_totals: &[u64], loaded: &[String]) -> Node {
        let mut node = Node {
            vram_totals: if vram_totals.is_empty() {
                vec![DEFAULT_GPU_VRAM]
            } else {
                vram_totals.to_vec()
            },
            models: BTreeMap::new(),
        };
        for model in loaded {
            // A start-up model that does not fit is simply not loaded.
            let _ = node.load(model, &LoadRequest::default());
        }
        node
    }

    fn free(&self, gpu: usize) -> u64 {
        let used: u64 = self
            .models
            .values()
            .filter(|m| m.gpu as usize == gpu)
            .map(|m| m.vram_bytes)
            .sum();
        self.vram_totals[gpu].saturating_sub(used)
    }

    pub fn state(&self) -> NodeState {
        NodeState {
            gpus: (0..self.vram_totals.len())
                .map(|i| GpuState {
                    index: i as u32,
                    vram_total: self.vram_totals[i],
                    vram_free: self.free(i),
                })
                .collect(),
            models: self.models.values().cloned().collect(),
        }
    }

    /// Starts loading `model` on the GPU it fits most tightly; `Loaded` at
    /// once when `load_ms` is 0. Loading a model that is already there
    /// changes nothing.
    pub fn load(&mut self, model: &str, request: &LoadRequest) -> Result<NodeModel, LoadError> {
        if let Some(existing) = self.models.get(model) {
            return Ok(existing.clone());
        }
        let need = request.vram_bytes.unwrap_or(DEFAULT_MODEL_VRAM);
        let gpus = self.vram_totals.len();
        let asked = match request.gpu {
            Some(gpu) if gpu as usize >= gpus => return Err(LoadError::NoSuchGpu { gpu, gpus }),
            Some(gpu) => gpu as usize..gpu as usize + 1,
            None => 0..gpus,
        };
        let gpu = asked
            .clone()
            .filter(|&i| self.free(i) >= need)
            .min_by_key(|&i| self.free(i))
            .ok_or_else(|| LoadError::NoRoom {
                need,
                largest_free: asked.map(|i| self.free(i)).max().unwrap_or(0),
            })?;
        let entry = NodeModel {
            id: model.to_string(),
            status: if request.load_ms == 0 {
                ModelStatus::Loaded
            } else {
                ModelStatus::Loading
            },
            gpu: gpu as u32,
            vram_bytes: need,
            last_access_ms: unix_ms(),
            context_length: CONTEXT_LENGTH,
            capabilities: vec![
                "chat".into(),
                "completions".into(),
                "embeddings".into(),
                "responses".into(),
            ],
            tool_call: true,
            reasoning: false,
        };
        self.models.insert(model.to_string(), entry.clone());
        Ok(entry)
    }

    /// Ends a simulated load (the load task calls it after `load_ms`).
    pub fn finish_load(&mut self, model: &str) {
        if let Some(entry) = self.models.get_mut(model) {
            entry.status = ModelStatus::Loaded;
        }
    }

    /// Frees the model's VRAM; whether it was there.
    pub fn unload(&mut self, model: &str) -> bool {
        self.models.remove(model).is_some()
    }

    /// Whether `model` is loaded; marks it used.
    pub fn touch(&mut self, model: &str) -> bool {
        match self.models.get_mut(model) {
            Some(entry) if entry.status == ModelStatus::Loaded => {
                entry.last_access_ms = unix_ms();
                true
            }
            _ => false,
        }
    }

    pub fn loaded(&self) -> Vec<String> {
        self.models
            .values()
            .filter(|m| m.status == ModelStatus::Loaded)
            .map(|m| m.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn start_up_models_take_vram_on_the_first_gpu_with_room() {
        let node = Node::new(&[3 * GIB, 24 * GIB], &["a".into(), "b".into()]);
        let state = node.state();
        // Best fit: the 3 GiB GPU takes the first 2 GiB model.
        assert_eq!(state.models[0].gpu, 0);
        assert_eq!(state.models[1].gpu, 1);
        assert_eq!(state.gpus[0].vram_free, GIB);
        assert_eq!(state.gpus[1].vram_free, 22 * GIB);
    }

    #[test]
    fn a_model_that_fits_nowhere_is_refused_and_nothing_changes() {
        let mut node = Node::new(&[4 * GIB], &["a".into()]);
        let error = node
            .load(
                "big",
                &LoadRequest {
                    vram_bytes: Some(3 * GIB),
                    ..LoadRequest::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            error,
            LoadError::NoRoom {
                need: 3 * GIB,
                largest_free: 2 * GIB
            }
        );
        assert_eq!(node.loaded(), vec!["a".to_string()]);
    }

    #[test]
    fn a_loading_model_is_not_served_until_its_load_finishes_and_unload_frees_vram() {
        let mut node = Node::new(&[8 * GIB], &[]);
        let entry = node
            .load(
                "m",
                &LoadRequest {
                    vram_bytes: Some(5 * GIB),
                    load_ms: 100,
                    gpu: None,
                },
            )
            .unwrap();
        assert_eq!(entry.status, ModelStatus::Loading);
        assert!(!node.touch("m"));
        assert_eq!(node.state().gpus[0].vram_free, 3 * GIB);
        node.finish_load("m");
        assert!(node.touch("m"));
        assert!(node.unload("m"));
        assert!(!node.touch("m"));
        assert_eq!(node.state().gpus[0].vram_free, 8 * GIB);
    }

    #[test]
    fn a_load_on_a_named_gpu_goes_there_or_is_refused() {
        let mut node = Node::new(&[8 * GIB, 24 * GIB], &[]);
        let on = |gpu| LoadRequest {
            vram_bytes: Some(4 * GIB),
            gpu: Some(gpu),
            ..LoadRequest::default()
        };
        // Best fit alone would take GPU 0.
        assert_eq!(node.load("a", &on(1)).unwrap().gpu, 1);
        assert_eq!(
            node.load("b", &on(2)).unwrap_err(),
            LoadError::NoSuchGpu { gpu: 2, gpus: 2 }
        );
        let big = LoadRequest {
            vram_bytes: Some(12 * GIB),
            gpu: Some(0),
            ..LoadRequest::default()
        };
        assert_eq!(
            node.load("c", &big).unwrap_err(),
            LoadError::NoRoom {
                need: 12 * GIB,
                largest_free: 8 * GIB
            }
        );
        assert_eq!(node.loaded(), vec!["a".to_string()]);
    }
}
