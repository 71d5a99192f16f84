//! The model catalog: what each model needs (VRAM, load time) and whether
//! operators pinned it. Estimates start from the operator's numbers and are
//! corrected by what agents measure after each load.

use super::ModelId;
use std::collections::HashMap;

/// Weight of a new measurement in the running estimate once a model has
/// been measured at least once.
const CORRECTION_WEIGHT: f64 = 0.3;

/// One model as the catalog knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// VRAM the model needs on one GPU once loaded, in bytes.
    pub vram_bytes: u64,
    /// Time from "start loading" to "serving", in milliseconds.
    pub load_ms: u64,
    /// A pinned model is never chosen as an eviction victim.
    pub pinned: bool,
    /// How many agent measurements corrected these estimates.
    pub measurements: u32,
}

impl ModelSpec {
    pub fn new(name: impl Into<String>, vram_bytes: u64, load_ms: u64) -> Self {
        ModelSpec {
            name: name.into(),
            vram_bytes,
            load_ms,
            pinned: false,
            measurements: 0,
        }
    }

    pub fn pinned(mut self) -> Self {
        self.pinned = true;
        self
    }
}

/// Every model placement may route to, indexed by dense [`ModelId`]s so
/// that `route` looks models up by position, never by hashing a name.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    models: Vec<ModelSpec>,
    by_name: HashMap<String, ModelId>,
}

impl Catalog {
    pub fn new() -> Self {
        Catalog::default()
    }

    /// Adds a model, or replaces the spec of a model with the same name
    /// (keeping its id).
    pub fn insert(&mut self, spec: ModelSpec) -> ModelId {
        if let Some(&id) = self.by_name.get(&spec.name) {
            self.models[id.index()] = spec;
            return id;
        }
        let id = ModelId(self.models.len() as u32);
        self.by_name.insert(spec.name.clone(), id);
        self.models.push(spec);
        id
    }

    pub fn id(&self, name: &str) -> Option<ModelId> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, model: ModelId) -> Option<&ModelSpec> {
        self.models.get(model.index())
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ModelId, &ModelSpec)> {
        self.models
            .iter()
            .enumerate()
            .map(|(index, spec)| (ModelId(index as u32), spec))
    }

    pub fn set_pinned(&mut self, model: ModelId, pinned: bool) {
        if let Some(spec) = self.models.get_mut(model.index()) {
            spec.pinned = pinned;
        }
    }

    /// Corrects a model's estimates with what an agent measured after
    /// loading it.
    ///
    /// The first measurement replaces the operator's guess outright. Later
    /// ones move the estimate by an EWMA (weight 0.3) so one noisy load does
    /// not swing placement, except that the VRAM estimate never falls below
    /// the latest measurement: under-estimating VRAM makes the next load
    /// fail, over-estimating only leaves some room unused.
    pub fn observe_load(&mut self, model: ModelId, measured_vram: u64, measured_load_ms: u64) {
        let Some(spec) = self.models.get_mut(model.index()) else {
            return;
        };
        if spec.measurements == 0 {
            spec.vram_bytes = measured_vram;
            spec.load_ms = measured_load_ms;
        } else {
            let blend = |old: u64, new: u64| {
                (old as f64 * (1.0 - CORRECTION_WEIGHT) + new as f64 * CORRECTION_WEIGHT).round()
                    as u64
            };
            spec.vram_bytes = blend(spec.vram_bytes, measured_vram).max(measured_vram);
            spec.load_ms = blend(spec.load_ms, measured_load_ms);
        }
        spec.measurements = spec.measurements.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_load_replaces_the_guess_then_smooths_but_never_underestimates_vram() {
        let mut catalog = Catalog::new();
        let model = catalog.insert(ModelSpec::new("llama", 10_000, 20_000));
        catalog.observe_load(model, 12_000, 30_000);
        let spec = catalog.get(model).unwrap();
        assert_eq!((spec.vram_bytes, spec.load_ms), (12_000, 30_000));

        catalog.observe_load(model, 10_000, 20_000);
        let spec = catalog.get(model).unwrap();
        assert_eq!(spec.vram_bytes, 11_400, "ewma 0.7*12000 + 0.3*10000");
        assert_eq!(spec.load_ms, 27_000);

        catalog.observe_load(model, 14_000, 27_000);
        assert_eq!(
            catalog.get(model).unwrap().vram_bytes,
            14_000,
            "never below the latest measurement"
        );
    }

    #[test]
    fn insert_with_same_name_keeps_the_id() {
        let mut catalog = Catalog::new();
        let first = catalog.insert(ModelSpec::new("a", 1, 1));
        let again = catalog.insert(ModelSpec::new("a", 2, 2).pinned());
        assert_eq!(first, again);
        assert!(catalog.get(first).unwrap().pinned);
        assert_eq!(catalog.id("a"), Some(first));
        assert_eq!(catalog.len(), 1);
    }
}
