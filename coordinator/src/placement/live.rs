//! The coordinator's live placement state: the fleet view fed by agents'
//! `NodeStatus` reports, the catalog (the operator's file, corrected by
//! measured loads), demand fed by the requests the ledger settles, and the `Placement` gRPC
//! service that answers `Route` and `Fleet` from them.
//!
//! This is soft state, kept in memory by the coordinator the agents are
//! connected to: agents report every few seconds, so a new leader has a
//! complete view within one report interval of their reconnecting. Nothing
//! here touches the store.

use super::{
    defrag_plan, place_copy, route, wants_copy, Catalog, Decision, DemandTracker, FleetView,
    ModelId, ModelSpec, ModelStatus, NodeId, PlacementConfig, Resident, RouteError, Strategy,
};
use crate::engine::Outbox;
use allot::clock::{self, UnixMs};
use allot::pb;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use tonic::{Request, Response, Status};

/// Load time assumed for a model reported by an agent but absent from the
/// catalog, until a measured load corrects it.
pub const UNKNOWN_LOAD_MS: u64 = 30_000;
/// Half-life of the demand estimates.
const DEMAND_HALF_LIFE_MS: i64 = 10 * 60 * 1000;

/// One `[[model]]` of the catalog file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogEntry {
    name: String,
    vram_bytes: u64,
    load_ms: u64,
    #[serde(default)]
    pinned: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    model: Vec<CatalogEntry>,
}

/// A model catalog that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalog {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("catalog {}: {source}", path.display())]
    In {
        path: std::path::PathBuf,
        source: Box<CatalogError>,
    },
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("a [[model]] has an empty name")]
    EmptyName,
    #[error("model {0} is listed twice")]
    Twice(String),
}

/// Reads a catalog file (TOML, `[[model]]` tables with `name`,
/// `vram_bytes`, `load_ms` and optional `pinned`).
pub fn load_catalog(path: &Path) -> Result<Catalog, CatalogError> {
    let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_catalog(&text).map_err(|source| CatalogError::In {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

pub fn parse_catalog(text: &str) -> Result<Catalog, CatalogError> {
    let file: CatalogFile = toml::from_str(text)?;
    let mut catalog = Catalog::new();
    for entry in file.model {
        if entry.name.is_empty() {
            return Err(CatalogError::EmptyName);
        }
        if catalog.id(&entry.name).is_some() {
            return Err(CatalogError::Twice(entry.name));
        }
        let mut spec = ModelSpec::new(entry.name, entry.vram_bytes, entry.load_ms);
        spec.pinned = entry.pinned;
        catalog.insert(spec);
    }
    Ok(catalog)
}

struct NodeMeta {
    id: NodeId,
    agent_id: String,
    session_up: bool,
    report: pb::NodeStatus,
    reported_at: UnixMs,
    /// Models seen loading, and since when, to measure load times.
    loading_since: HashMap<String, UnixMs>,
    /// Since when every report showed the node at or over its capacity
    /// (`in_flight >= capacity`); `None` once one did not.
    saturated_since: Option<UnixMs>,
}

/// A directive sent and not yet answered.
struct Pending {
    directive_id: u64,
    action: pb::DirectiveAction,
    model: String,
    neuron_id: String,
    /// Forgotten (and so retried) after this.
    until: UnixMs,
}

/// A consolidation under way. A model moving to another node is loaded
/// there, then unloaded at its source once the destination reports it
/// loaded, so it stays servable throughout. A node holds one copy of a
/// model, so a model moving to another GPU of its own node is unloaded and
/// loaded again there (its requests wait for that load, as for any cold
/// start).
struct Consolidation {
    moves: Vec<MoveJob>,
    /// Given up (moves not yet done are left as they are) after this.
    until: UnixMs,
}

/// A move to another node, followed until its source copy is unloaded.
struct MoveJob {
    model: String,
    from: String,
    to: String,
    done: bool,
}

struct Inner {
    /// Sessions by agent id, for directives.
    outboxes: HashMap<String, Outbox>,
    /// Model → when a `Route` or a request last wanted it.
    wanted: HashMap<String, UnixMs>,
    pending: Vec<Pending>,
    next_directive: u64,
    fleet: FleetView,
    catalog: Catalog,
    demand: DemandTracker,
    config: PlacementConfig,
    nodes: HashMap<String, NodeMeta>,
    /// NodeId index → neuron id (empty for a slot freed by expiry).
    neuron_of: Vec<String>,
    /// Slots of expired nodes, reused by the next new node, so the fleet
    /// holds at most as many nodes as were live at one time.
    free_ids: Vec<NodeId>,
    /// Models of the catalog file: they never expire.
    configured: HashSet<ModelId>,
    /// Learned model → when a node last reported it.
    model_reported_at: HashMap<ModelId, UnixMs>,
    /// Eviction plans carried out since the last consolidation was
    /// considered.
    eviction_cycles: u32,
    consolidation: Option<Consolidation>,
}

/// Shared by the session service (node reports, directive results), the
/// engine (settled requests) and the `Placement` service (which reads it).
pub struct LivePlacement {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for LivePlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePlacement").finish_non_exhaustive()
    }
}

/// A charged request the ledger settled, as demand sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    /// The model that served it (else the one requested).
    pub model: String,
    pub admitted_at: UnixMs,
    pub tokens: u64,
}

/// Most models the catalog learns from node reports (beyond the operator's
/// catalog file); further unknown models are not placed.
pub const MAX_CATALOG_MODELS: usize = 10_000;

impl Served {
    /// `None` for a record that charged nothing (a refusal).
    pub fn of(record: &pb::UsageRecord) -> Option<Served> {
        record.charged.then(|| Served {
            model: if record.model_served.is_empty() {
                record.model_requested.clone()
            } else {
                record.model_served.clone()
            },
            admitted_at: record.admitted_at_unix_ms,
            tokens: record
                .prompt_tokens
                .saturating_add(record.completion_tokens),
        })
    }
}

fn status_of(pb_status: i32) -> Option<ModelStatus> {
    match pb::ModelStatus::try_from(pb_status).ok()? {
        pb::ModelStatus::Loaded => Some(ModelStatus::Loaded),
        pb::ModelStatus::Loading => Some(ModelStatus::Loading),
        pb::ModelStatus::Unloaded => Some(ModelStatus::Unloaded),
        pb::ModelStatus::Failed => Some(ModelStatus::Failed),
        pb::ModelStatus::Unspecified => None,
    }
}

impl LivePlacement {
    pub fn new(catalog: Catalog, config: PlacementConfig) -> Arc<LivePlacement> {
        let configured = catalog.iter().map(|(id, _)| id).collect();
        Arc::new(LivePlacement {
            inner: Mutex::new(Inner {
                outboxes: HashMap::new(),
                wanted: HashMap::new(),
                pending: Vec::new(),
                next_directive: 1,
                fleet: FleetView::new(),
                catalog,
                demand: DemandTracker::new(DEMAND_HALF_LIFE_MS),
                config,
                nodes: HashMap::new(),
                neuron_of: Vec::new(),
                free_ids: Vec::new(),
                configured,
                model_reported_at: HashMap::new(),
                eviction_cycles: 0,
                consolidation: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies an agent's report of its neuron. Models the catalog does not
    /// know are added with their reported VRAM; a load seen finishing
    /// corrects the catalog's estimates with what was measured.
    pub fn report(&self, agent_id: &str, status: pb::NodeStatus, now: UnixMs) {
        if status.neuron_id.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        // A neuron another agent reports while its session is up stays
        // that agent's: a second agent naming it takes nothing over.
        if let Some(meta) = inner.nodes.get(&status.neuron_id) {
            if meta.session_up && meta.agent_id != agent_id {
                metrics::counter!("allot_node_reports_refused_total").increment(1);
                tracing::warn!(
                    agent_id,
                    owner = meta.agent_id,
                    neuron_id = status.neuron_id,
                    "a node report for a neuron another connected agent reports; ignored"
                );
                return;
            }
        }
        let id = match inner.nodes.get(&status.neuron_id) {
            Some(meta) => meta.id,
            None => {
                let id = match inner.free_ids.pop() {
                    // `replace` below sets the slot's endpoint and GPUs.
                    Some(id) => {
                        inner.neuron_of[id.index()] = status.neuron_id.clone();
                        id
                    }
                    None => {
                        let totals: Vec<u64> =
                            status.gpus.iter().map(|g| g.vram_total_bytes).collect();
                        let id =
                            inner
                                .fleet
                                .add_node(&status.endpoint, &totals, status.capacity.max(1));
                        inner.neuron_of.push(status.neuron_id.clone());
                        id
                    }
                };
                inner.nodes.insert(
                    status.neuron_id.clone(),
                    NodeMeta {
                        id,
                        agent_id: agent_id.to_string(),
                        session_up: true,
                        report: pb::NodeStatus::default(),
                        reported_at: now,
                        loading_since: HashMap::new(),
                        saturated_since: None,
                    },
                );
                id
            }
        };
        let meta = inner.nodes.get_mut(&status.neuron_id).expect("just added");
        meta.agent_id = agent_id.to_string();
        meta.session_up = true;
        meta.reported_at = now;
        meta.saturated_since = if status.capacity > 0 && status.in_flight >= status.capacity {
            Some(meta.saturated_since.unwrap_or(now))
        } else {
            None
        };
        let mut residents = Vec::with_capacity(status.models.len());
        for model in &status.models {
            let Some(model_status) = status_of(model.status) else {
                continue;
            };
            let model_id = match inner.catalog.id(&model.model) {
                Some(id) => id,
                // Reported models join the catalog, up to a bound: a node
                // cycling through model names cannot grow it for ever.
                None if inner.catalog.len() >= MAX_CATALOG_MODELS => {
                    metrics::counter!("allot_placement_models_ignored_total").increment(1);
                    continue;
                }
                None => inner.catalog.insert(ModelSpec::new(
                    model.model.clone(),
                    model.vram_bytes,
                    UNKNOWN_LOAD_MS,
                )),
            };
            if !inner.configured.contains(&model_id) {
                inner.model_reported_at.insert(model_id, now);
            }
            match model_status {
                ModelStatus::Loading => {
                    meta.loading_since.entry(model.model.clone()).or_insert(now);
                }
                ModelStatus::Loaded => {
                    if let Some(since) = meta.loading_since.remove(&model.model) {
                        inner.catalog.observe_load(
                            model_id,
                            model.vram_bytes,
                            u64::try_from(now - since).unwrap_or(0),
                        );
                    }
                }
                ModelStatus::Unloaded | ModelStatus::Failed => {
                    meta.loading_since.remove(&model.model);
                }
            }
            let mut resident = Resident::new(
                model_id,
                model.gpu,
                model_status,
                model.vram_bytes,
                model.last_access_unix_ms,
            );
            resident.in_flight = model.in_flight;
            if model_status == ModelStatus::Loading {
                resident.since = *meta.loading_since.get(&model.model).unwrap_or(&now);
            }
            residents.push(resident);
        }
        let gpus: Vec<(u64, u64)> = status
            .gpus
            .iter()
            .map(|g| (g.vram_total_bytes, g.vram_free_bytes))
            .collect();
        inner.fleet.replace(
            id,
            &status.endpoint,
            &gpus,
            residents,
            status.in_flight,
            status.capacity,
            status.tokens_per_second,
            status.healthy,
        );
        meta.report = status;
        metrics::counter!("allot_node_reports_total").increment(1);
    }

    /// The agent's session ended: nothing is routed to its neurons until it
    /// reports again.
    pub fn agent_gone(&self, agent_id: &str, outbox: &Outbox) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        // A newer session of the same agent may have replaced this one.
        match inner.outboxes.get(agent_id) {
            Some(current) if !current.same_channel(outbox) => return,
            _ => {}
        }
        inner.outboxes.remove(agent_id);
        for meta in inner.nodes.values_mut() {
            if meta.agent_id == agent_id {
                meta.session_up = false;
                inner.fleet.set_healthy(meta.id, false);
            }
        }
    }

    /// Feeds demand from requests the ledger has just settled, once each:
    /// the engine calls it after the commit, so a record an agent re-sends
    /// (after a reconnect, or to a new leader) is a ledger duplicate and
    /// never reaches it twice.
    pub fn record_settled(&self, served: &[Served]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for request in served {
            match inner.wanted.get_mut(&request.model) {
                Some(at) => *at = (*at).max(request.admitted_at),
                None => {
                    inner
                        .wanted
                        .insert(request.model.clone(), request.admitted_at);
                }
            }
            if let Some(id) = inner.catalog.id(&request.model) {
                inner.demand.record(id, request.admitted_at, request.tokens);
            }
        }
    }

    pub fn route(&self, model: &str, now: UnixMs) -> Result<pb::RouteDecision, PlacementError> {
        let mut inner = self.lock();
        let Some(id) = inner.catalog.id(model) else {
            return Err(PlacementError::UnknownModel(model.to_string()));
        };
        let decision = inner
            .route(id, now)
            .map_err(|e| PlacementError::of_route(&inner.catalog, &e))?;
        if !matches!(decision, Decision::Serve { .. }) {
            inner.wanted.insert(model.to_string(), now);
        }
        let kind = match &decision {
            Decision::Serve { .. } => "serve",
            Decision::ColdStart { .. } => "cold_start",
            Decision::Evict { .. } => "evict",
        };
        metrics::counter!("allot_route_decisions_total", "decision" => kind).increment(1);
        Ok(inner.decision_pb(model, decision))
    }

    /// The agent's session, to send it directives.
    pub fn attach(&self, agent_id: &str, outbox: Outbox) {
        self.lock().outboxes.insert(agent_id.to_string(), outbox);
    }

    /// An agent answered a directive: it is no longer pending (the next
    /// node report shows what changed).
    pub fn directive_done(&self, agent_id: &str, result: &pb::DirectiveResult) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let index = inner
            .pending
            .iter()
            .position(|p| p.directive_id == result.directive_id);
        if let Some(done) = index.map(|index| inner.pending.swap_remove(index)) {
            if !result.ok && done.action == pb::DirectiveAction::Load {
                // A consolidation's load that failed ends that move.
                for job in inner.consolidation.iter_mut().flat_map(|c| &mut c.moves) {
                    if job.model == done.model && job.to == done.neuron_id {
                        job.done = true;
                    }
                }
            }
        }
        let outcome = if result.ok { "ok" } else { "failed" };
        metrics::counter!("allot_directive_results_total", "outcome" => outcome).increment(1);
        if !result.ok {
            tracing::warn!(
                agent_id,
                directive_id = result.directive_id,
                message = result.message,
                "a placement directive failed"
            );
        }
    }

    /// One pass of the placement controller:
    /// - every model wanted within `want_window_ms` and not loaded (or
    ///   loading) on a healthy node is loaded where `route` says, after
    ///   unloading the victims it names;
    /// - a loaded model gets one more copy (where [`place_copy`] says) when
    ///   every node serving it has been saturated for `copy_after_ms`, up
    ///   to `max_copies` ([`wants_copy`]);
    /// - after `defrag_after_cycles` eviction plans, a consolidation that
    ///   empties a whole GPU is started ([`defrag_plan`]), and carried on
    ///   by later passes.
    ///
    /// Directives in flight are not repeated until answered or expired.
    pub fn tick(&self, now: UnixMs) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.expire(now);
        inner.pending.retain(|p| p.until > now);
        if !inner.config.directives {
            return;
        }
        let window = inner.config.want_window_ms;
        inner.wanted.retain(|_, at| now - *at <= window);
        let mut wanted: Vec<String> = inner.wanted.keys().cloned().collect();
        wanted.sort();
        for model in wanted {
            let Some(id) = inner.catalog.id(&model) else {
                continue;
            };
            if inner
                .pending
                .iter()
                .any(|p| p.model == model && p.action == pb::DirectiveAction::Load)
            {
                continue;
            }
            let Ok(decision) = inner.route(id, now) else {
                continue;
            };
            let decision = match decision {
                Decision::ColdStart {
                    in_progress: true, ..
                } => continue,
                Decision::Serve { .. } => {
                    if !inner.more_copies(id, now) {
                        continue;
                    }
                    let Ok(copy) = inner.place_copy(id, now) else {
                        continue;
                    };
                    metrics::counter!("allot_placement_copies_total").increment(1);
                    copy
                }
                other => other,
            };
            inner.carry_out(id, decision, now);
        }
        inner.consolidate(now);
    }

    pub fn fleet(&self, now: UnixMs) -> pb::FleetView {
        let inner = self.lock();
        let mut nodes: Vec<pb::FleetNode> = inner
            .nodes
            .iter()
            .map(|(neuron_id, meta)| {
                let node = inner.fleet.node(meta.id);
                pb::FleetNode {
                    neuron_id: neuron_id.clone(),
                    agent_id: meta.agent_id.clone(),
                    endpoint: node.endpoint.to_string(),
                    healthy: node.healthy,
                    in_flight: node.in_flight,
                    capacity: node.capacity,
                    tokens_per_second: node.throughput_tokens_per_s,
                    gpus: meta.report.gpus.clone(),
                    models: meta.report.models.clone(),
                    reported_at_unix_ms: meta.reported_at,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.neuron_id.cmp(&b.neuron_id));
        let catalog = inner
            .catalog
            .iter()
            .filter(|(id, _)| inner.listed(*id))
            .map(|(id, spec)| pb::CatalogModel {
                model: spec.name.clone(),
                vram_bytes: spec.vram_bytes,
                load_ms: spec.load_ms,
                pinned: spec.pinned,
                measurements: spec.measurements,
                requests_per_second: super::Demand::request_rate(&inner.demand, id, now),
            })
            .collect();
        pb::FleetView { nodes, catalog }
    }
}

/// A model's name, for operators (its id if the catalog lacks it).
fn model_name(catalog: &Catalog, model: ModelId) -> String {
    catalog
        .get(model)
        .map(|s| s.name.clone())
        .unwrap_or_else(|| model.to_string())
}

impl Inner {
    /// Nodes not reported for `node_expiry_ms` leave the fleet: their slot
    /// is emptied (no GPU, no model, unhealthy) and kept for the next new
    /// node; learned models no node reported for as long are forgotten by
    /// `Fleet` (their catalog entry stays, within [`MAX_CATALOG_MODELS`]).
    fn expire(&mut self, now: UnixMs) {
        let expiry = self.config.node_expiry_ms;
        let expired: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, meta)| now.saturating_sub(meta.reported_at) > expiry)
            .map(|(neuron_id, _)| neuron_id.clone())
            .collect();
        for neuron_id in expired {
            let Some(meta) = self.nodes.remove(&neuron_id) else {
                continue;
            };
            self.fleet
                .replace(meta.id, "", &[], Vec::new(), 0, 1, 0.0, false);
            self.neuron_of[meta.id.index()].clear();
            self.free_ids.push(meta.id);
            metrics::counter!("allot_placement_nodes_expired_total").increment(1);
            tracing::info!(
                neuron_id,
                agent_id = meta.agent_id,
                "no report for {expiry} ms: the node leaves the fleet"
            );
        }
        self.model_reported_at
            .retain(|_, at| now.saturating_sub(*at) <= expiry);
    }

    /// Whether `Fleet` lists the catalog's model: a model of the catalog
    /// file always, a learned one while a node reports it.
    fn listed(&self, model: ModelId) -> bool {
        self.configured.contains(&model) || self.model_reported_at.contains_key(&model)
    }

    fn route(&self, model: ModelId, now: UnixMs) -> Result<Decision, RouteError> {
        route(
            &self.fleet,
            &self.catalog,
            &self.demand,
            &self.config,
            model,
            now,
        )
    }

    fn place_copy(&self, model: ModelId, now: UnixMs) -> Result<Decision, RouteError> {
        place_copy(
            &self.fleet,
            &self.catalog,
            &self.demand,
            &self.config,
            model,
            now,
        )
    }

    /// Sends one directive to the agent of `neuron_id`; whether it went.
    fn send(&mut self, neuron_id: &str, directive: pb::PlacementDirective, now: UnixMs) -> bool {
        let Some(outbox) = self
            .nodes
            .get(neuron_id)
            .and_then(|meta| self.outboxes.get(&meta.agent_id))
        else {
            return false;
        };
        let directive_id = self.next_directive;
        let action = directive.action();
        let model = directive.model.clone();
        let until = now + directive.load_ms as i64 + 30_000;
        let message = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Directive(
                pb::PlacementDirective {
                    directive_id,
                    ..directive
                },
            )),
        };
        if outbox.try_send(Ok(message)).is_err() {
            return false;
        }
        self.next_directive += 1;
        let label = match action {
            pb::DirectiveAction::Load => "load",
            _ => "unload",
        };
        metrics::counter!("allot_directives_total", "action" => label).increment(1);
        tracing::info!(neuron_id, model, action = label, "placement directive");
        self.pending.push(Pending {
            directive_id,
            action,
            model,
            neuron_id: neuron_id.to_string(),
            until,
        });
        true
    }

    fn load_directive(&self, model: ModelId, gpu: u32) -> pb::PlacementDirective {
        let spec = self.catalog.get(model).expect("known model");
        pb::PlacementDirective {
            action: pb::DirectiveAction::Load as i32,
            model: spec.name.clone(),
            vram_bytes: spec.vram_bytes,
            load_ms: spec.load_ms,
            gpu: Some(gpu),
            ..Default::default()
        }
    }

    fn unload_directive(&self, model: String) -> pb::PlacementDirective {
        pb::PlacementDirective {
            action: pb::DirectiveAction::Unload as i32,
            model,
            ..Default::default()
        }
    }

    /// Unloads the decision's victims, then loads the model on its GPU.
    fn carry_out(&mut self, model: ModelId, decision: Decision, now: UnixMs) {
        let (node, gpu, victims) = match decision {
            Decision::Serve { .. } => return,
            Decision::ColdStart { node, gpu, .. } => (node, gpu, Vec::new()),
            Decision::Evict {
                node, gpu, victims, ..
            } => (node, gpu, victims),
        };
        let neuron_id = self.neuron_of[node.index()].clone();
        let evicts = !victims.is_empty();
        for victim in victims {
            let directive = self.unload_directive(model_name(&self.catalog, victim));
            if !self.send(&neuron_id, directive, now) {
                return;
            }
        }
        let directive = self.load_directive(model, gpu);
        if self.send(&neuron_id, directive, now) && evicts {
            self.eviction_cycles = self.eviction_cycles.saturating_add(1);
        }
    }

    fn more_copies(&self, model: ModelId, now: UnixMs) -> bool {
        let saturated_since = |node: NodeId| {
            self.nodes
                .get(&self.neuron_of[node.index()])
                .and_then(|meta| meta.saturated_since)
        };
        wants_copy(&self.fleet, &self.config, model, saturated_since, now)
    }

    /// Starts a consolidation when it is due, or carries on the one under
    /// way.
    fn consolidate(&mut self, now: UnixMs) {
        if let Some(mut consolidation) = self.consolidation.take() {
            if now > consolidation.until {
                tracing::warn!("a consolidation did not finish in time; left as it is");
                metrics::counter!("allot_consolidations_total", "outcome" => "expired")
                    .increment(1);
                return;
            }
            for job in consolidation.moves.iter_mut().filter(|job| !job.done) {
                self.advance(job, now);
            }
            if consolidation.moves.iter().all(|job| job.done) {
                metrics::counter!("allot_consolidations_total", "outcome" => "done").increment(1);
            } else {
                self.consolidation = Some(consolidation);
            }
            return;
        }
        let due = self.config.defrag_after_cycles;
        if due == 0 || self.eviction_cycles < due || !self.pending.is_empty() {
            return;
        }
        let cycles = std::mem::take(&mut self.eviction_cycles);
        let Some(plan) = defrag_plan(&self.fleet, &self.catalog, &self.config, cycles) else {
            return;
        };
        let mut moves = Vec::with_capacity(plan.moves.len());
        for step in &plan.moves {
            let model = model_name(&self.catalog, step.model);
            let from = self.neuron_of[step.from_node.index()].clone();
            let to = self.neuron_of[step.to_node.index()].clone();
            let load = self.load_directive(step.model, step.to_gpu);
            if from == to {
                // The agent carries both out in order; nothing to follow
                // up (if the unload is refused, the load changes nothing).
                let unload = self.unload_directive(model);
                if self.send(&from, unload, now) {
                    self.send(&to, load, now);
                }
                continue;
            }
            if self.send(&to, load, now) {
                moves.push(MoveJob {
                    model,
                    from,
                    to,
                    done: false,
                });
            }
        }
        tracing::info!(
            neuron_id = self.neuron_of[plan.node.index()],
            gpu = plan.gpu,
            moves = plan.moves.len(),
            "consolidating to free a whole gpu"
        );
        if moves.is_empty() {
            metrics::counter!("allot_consolidations_total", "outcome" => "done").increment(1);
            return;
        }
        self.consolidation = Some(Consolidation {
            moves,
            until: now + plan.expected_load_ms as i64 + 60_000,
        });
    }

    /// One step of a move to another node: once the destination reports
    /// the model loaded, unload it at the source (again, if the source
    /// refused while it had requests in flight). A load the destination
    /// failed ends the move (see also [`LivePlacement::directive_done`]).
    fn advance(&mut self, job: &mut MoveJob, now: UnixMs) {
        let status_on = |neuron: &str| -> Option<ModelStatus> {
            let meta = self.nodes.get(neuron)?;
            let id = self.catalog.id(&job.model)?;
            Some(self.fleet.node(meta.id).resident(id)?.status)
        };
        let (at_destination, at_source) = (status_on(&job.to), status_on(&job.from));
        match at_destination {
            Some(ModelStatus::Loaded) => {
                if !matches!(at_source, Some(ModelStatus::Loaded | ModelStatus::Loading)) {
                    job.done = true;
                } else if !self.pending.iter().any(|p| {
                    p.model == job.model
                        && p.neuron_id == job.from
                        && p.action == pb::DirectiveAction::Unload
                }) {
                    let directive = self.unload_directive(job.model.clone());
                    self.send(&job.from, directive, now);
                }
            }
            Some(ModelStatus::Failed) => job.done = true,
            // Loading, or not yet reported: wait (at most until the
            // consolidation expires).
            Some(ModelStatus::Loading | ModelStatus::Unloaded) | None => {}
        }
    }

    fn decision_pb(&self, model: &str, decision: Decision) -> pb::RouteDecision {
        let node = decision.node();
        let neuron_id = self.neuron_of[node.index()].clone();
        let agent_id = self
            .nodes
            .get(&neuron_id)
            .map(|m| m.agent_id.clone())
            .unwrap_or_default();
        let strategy = match self.config.strategy {
            Strategy::Lru => "lru",
            Strategy::Demand => "demand",
        };
        let mut out = pb::RouteDecision {
            model: model.to_string(),
            neuron_id,
            agent_id,
            endpoint: decision.endpoint().to_string(),
            ..Default::default()
        };
        match decision {
            Decision::Serve { .. } => out.kind = pb::RouteKind::Serve as i32,
            Decision::ColdStart {
                gpu,
                expected_load_ms,
                in_progress,
                ..
            } => {
                out.kind = pb::RouteKind::ColdStart as i32;
                out.gpu = gpu;
                out.expected_load_ms = expected_load_ms;
                out.load_in_progress = in_progress;
            }
            Decision::Evict {
                gpu,
                victims,
                expected_load_ms,
                ..
            } => {
                out.kind = pb::RouteKind::Evict as i32;
                out.gpu = gpu;
                out.expected_load_ms = expected_load_ms;
                out.victims = victims
                    .into_iter()
                    .map(|v| model_name(&self.catalog, v))
                    .collect();
                out.strategy = strategy.into();
            }
        }
        out
    }
}

/// What a `Placement` call can fail with; [`crate::error`] maps it to a
/// gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("model: must not be empty")]
    EmptyModel,
    #[error("model: {0} is neither in the catalog nor reported by any agent")]
    UnknownModel(String),
    #[error("model: {0} is not in the catalog")]
    NotInCatalog(String),
    #[error("no agent reports a healthy neuron")]
    NoHealthyNode,
    /// `RouteError::TooLarge`, with the model's name.
    #[error("model: {0}")]
    TooLarge(String),
    /// `RouteError::NoRoom`, with the model's name.
    #[error("model: {0}")]
    NoRoom(String),
}

impl PlacementError {
    fn of_route(catalog: &Catalog, error: &RouteError) -> PlacementError {
        let name = |model: ModelId| model_name(catalog, model);
        match error {
            RouteError::UnknownModel(model) => PlacementError::NotInCatalog(name(*model)),
            RouteError::NoHealthyNode => PlacementError::NoHealthyNode,
            RouteError::TooLarge {
                model,
                need_bytes,
                largest_gpu_bytes,
            } => PlacementError::TooLarge(format!(
                "{} needs {need_bytes} bytes of vram, more than the largest healthy gpu \
                 ({largest_gpu_bytes}); models are not split across gpus",
                name(*model)
            )),
            RouteError::NoRoom {
                model,
                need_bytes,
                protected,
            } => PlacementError::NoRoom(format!(
                "no gpu can make room for {} ({need_bytes} bytes) even after allowed \
                 evictions; protected: {protected}",
                name(*model)
            )),
        }
    }
}

/// The `allot.v1.Placement` gRPC service (behind the admin token
/// interceptor).
pub struct PlacementService {
    live: Arc<LivePlacement>,
}

impl PlacementService {
    pub fn new(live: Arc<LivePlacement>) -> PlacementService {
        PlacementService { live }
    }
}

#[tonic::async_trait]
impl pb::placement_server::Placement for PlacementService {
    async fn route(
        &self,
        request: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteDecision>, Status> {
        let model = request.into_inner().model;
        if model.trim().is_empty() {
            return Err(PlacementError::EmptyModel.into());
        }
        Ok(Response::new(self.live.route(&model, clock::now_ms())?))
    }

    async fn fleet(
        &self,
        request: Request<pb::FleetRequest>,
    ) -> Result<Response<pb::FleetView>, Status> {
        let _ = request;
        Ok(Response::new(self.live.fleet(clock::now_ms())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A catalog of `(name, GiB, load ms)` models, read from its file text.
    fn catalog(models: &[(&str, u64, u64)]) -> Catalog {
        let text: String = models
            .iter()
            .map(|(name, gib, load_ms)| {
                format!(
                    "[[model]]\nname = \"{name}\"\nvram_bytes = {}\nload_ms = {load_ms}\n",
                    gib * GIB
                )
            })
            .collect();
        parse_catalog(&text).unwrap()
    }

    fn report(neuron: &str, free: u64, models: Vec<pb::ModelState>) -> pb::NodeStatus {
        pb::NodeStatus {
            neuron_id: neuron.into(),
            endpoint: format!("http://{neuron}"),
            gpus: vec![pb::GpuStatus {
                index: 0,
                vram_total_bytes: 24 * GIB,
                vram_free_bytes: free,
            }],
            models,
            capacity: 4,
            healthy: true,
            ..Default::default()
        }
    }

    fn model(name: &str, status: pb::ModelStatus, vram: u64) -> pb::ModelState {
        pb::ModelState {
            model: name.into(),
            status: status as i32,
            vram_bytes: vram,
            ..Default::default()
        }
    }

    #[test]
    fn the_catalog_file_is_read_strictly() {
        let catalog =
            parse_catalog("[[model]]\nname = \"a\"\nvram_bytes = 10\nload_ms = 5\npinned = true\n")
                .unwrap();
        assert!(catalog.get(catalog.id("a").unwrap()).unwrap().pinned);
        let twice = "[[model]]\nname = \"a\"\nvram_bytes = 1\nload_ms = 1\n".repeat(2);
        assert!(parse_catalog(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let unknown =
            parse_catalog("[[model]]\nname = \"a\"\nvram_bytes = 1\nload_ms = 1\nsize = 3\n");
        assert!(unknown.unwrap_err().to_string().contains("size"));
    }

    #[test]
    fn another_agent_cannot_report_a_connected_agents_neuron() {
        let live = LivePlacement::new(catalog(&[]), PlacementConfig::default());
        live.report("agent-1", report("n1", 20 * GIB, vec![]), 1_000);
        let mut stolen = report("n1", 20 * GIB, vec![]);
        stolen.endpoint = "http://attacker.example".into();
        live.report("rogue", stolen, 2_000);
        let fleet = live.fleet(3_000);
        assert_eq!(fleet.nodes.len(), 1);
        assert_eq!(fleet.nodes[0].agent_id, "agent-1");
        assert_eq!(fleet.nodes[0].endpoint, "http://n1");
    }

    #[test]
    fn reports_feed_route_and_a_gone_agent_takes_its_node_out() {
        let live = LivePlacement::new(catalog(&[("cold", 1, 7000)]), PlacementConfig::default());
        live.report(
            "agent-1",
            report(
                "n1",
                20 * GIB,
                vec![model("hot", pb::ModelStatus::Loaded, 4 * GIB)],
            ),
            1_000,
        );
        let serve = live.route("hot", 2_000).unwrap();
        assert_eq!(serve.kind, pb::RouteKind::Serve as i32);
        assert_eq!(
            (serve.neuron_id.as_str(), serve.agent_id.as_str()),
            ("n1", "agent-1")
        );
        assert_eq!(serve.endpoint, "http://n1");
        let cold = live.route("cold", 2_000).unwrap();
        assert_eq!(cold.kind, pb::RouteKind::ColdStart as i32);
        assert_eq!(cold.expected_load_ms, 7_000);
        assert_eq!(
            Status::from(live.route("nowhere", 2_000).unwrap_err()).code(),
            tonic::Code::NotFound
        );
        let (outbox, _rx) = tokio::sync::mpsc::channel(1);
        live.attach("agent-1", outbox.clone());
        live.agent_gone("agent-1", &outbox);
        assert_eq!(
            Status::from(live.route("hot", 2_000).unwrap_err()).code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn a_load_seen_finishing_corrects_the_catalog() {
        let live = LivePlacement::new(catalog(&[("m", 1, 9000)]), PlacementConfig::default());
        live.report(
            "a",
            report(
                "n1",
                20 * GIB,
                vec![model("m", pb::ModelStatus::Loading, 3 * GIB)],
            ),
            10_000,
        );
        let joining = live.route("m", 10_500).unwrap();
        assert!(joining.load_in_progress);
        live.report(
            "a",
            report(
                "n1",
                20 * GIB,
                vec![model("m", pb::ModelStatus::Loaded, 3 * GIB)],
            ),
            12_500,
        );
        let fleet = live.fleet(12_500);
        let m = fleet.catalog.iter().find(|c| c.model == "m").unwrap();
        assert_eq!(
            (m.vram_bytes, m.load_ms, m.measurements),
            (3 * GIB, 2_500, 1)
        );
    }

    type Inbox = tokio::sync::mpsc::Receiver<Result<pb::CoordinatorMessage, Status>>;

    /// The directives an agent received so far, as (action, model, gpu).
    fn received(inbox: &mut Inbox) -> Vec<(pb::DirectiveAction, String, Option<u32>)> {
        let mut out = Vec::new();
        while let Ok(Ok(message)) = inbox.try_recv() {
            if let Some(pb::coordinator_message::Msg::Directive(d)) = message.msg {
                out.push((d.action(), d.model, d.gpu));
            }
        }
        out
    }

    fn connect(live: &LivePlacement, agent: &str) -> Inbox {
        let (outbox, inbox) = tokio::sync::mpsc::channel(16);
        live.attach(agent, outbox);
        inbox
    }

    fn used(model: &str, at: UnixMs) -> Served {
        Served::of(&pb::UsageRecord {
            model_requested: model.into(),
            admitted_at_unix_ms: at,
            charged: true,
            completion_tokens: 10,
            ..Default::default()
        })
        .expect("charged")
    }

    fn loaded(name: &str, vram: u64, in_flight: u32, last_access: UnixMs) -> pb::ModelState {
        pb::ModelState {
            in_flight,
            last_access_unix_ms: last_access,
            ..model(name, pb::ModelStatus::Loaded, vram)
        }
    }

    const LOAD: pb::DirectiveAction = pb::DirectiveAction::Load;
    const UNLOAD: pb::DirectiveAction = pb::DirectiveAction::Unload;

    #[test]
    fn a_node_no_agent_reports_any_more_leaves_the_fleet_and_its_slot_is_reused() {
        let config = PlacementConfig {
            node_expiry_ms: 10_000,
            ..PlacementConfig::default()
        };
        let live = LivePlacement::new(catalog(&[("m", 4, 1000)]), config);
        live.report(
            "a1",
            report("n1", 20 * GIB, vec![loaded("m", 4 * GIB, 0, 0)]),
            1_000,
        );
        live.report(
            "a2",
            report("n2", 20 * GIB, vec![loaded("learned", 4 * GIB, 0, 0)]),
            1_000,
        );
        // n2 goes on reporting without `learned`; n1 stops.
        live.report("a2", report("n2", 24 * GIB, vec![]), 8_000);
        live.tick(11_000);
        let view = live.fleet(11_000);
        assert_eq!(view.nodes.len(), 2, "within the expiry, both stay");
        assert!(view.catalog.iter().any(|m| m.model == "learned"));
        live.tick(11_001);
        let view = live.fleet(11_001);
        let names: Vec<&str> = view.nodes.iter().map(|n| n.neuron_id.as_str()).collect();
        assert_eq!(names, vec!["n2"], "n1 was last reported 10,001 ms ago");
        let models: Vec<&str> = view.catalog.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(models, vec!["m"], "no node reports `learned` any more");
        // Nothing is routed to the expired node: `m` is a cold start on n2.
        let decision = live.route("m", 11_001).unwrap();
        assert_eq!(decision.neuron_id, "n2");
        assert_eq!(decision.kind, pb::RouteKind::ColdStart as i32);
        // A new neuron takes the freed slot rather than growing the fleet,
        // and is routed to under its own name.
        live.report(
            "a3",
            report("n3", 20 * GIB, vec![loaded("m", 4 * GIB, 0, 0)]),
            12_000,
        );
        assert_eq!(live.lock().fleet.nodes().len(), 2);
        let decision = live.route("m", 12_000).unwrap();
        assert_eq!(
            (decision.neuron_id.as_str(), decision.endpoint.as_str()),
            ("n3", "http://n3")
        );
        assert_eq!(decision.kind, pb::RouteKind::Serve as i32);
    }

    #[test]
    fn a_model_whose_every_node_stays_saturated_gets_a_copy_on_another_node() {
        let config = PlacementConfig {
            copy_after_ms: 5_000,
            ..PlacementConfig::default()
        };
        let catalog = catalog(&[("m", 4, 1000)]);
        let live = LivePlacement::new(catalog, config);
        let (mut one, mut two) = (connect(&live, "a1"), connect(&live, "a2"));
        let busy = |in_flight: u32, at: UnixMs| {
            let mut status = report("n1", 20 * GIB, vec![loaded("m", 4 * GIB, in_flight, at)]);
            status.in_flight = in_flight;
            status
        };
        live.report("a2", report("n2", 24 * GIB, vec![]), 1_000);
        live.report("a1", busy(4, 1_000), 1_000);
        live.record_settled(&[used("m", 1_000)]);
        live.tick(2_000);
        assert!(received(&mut two).is_empty(), "saturated for 1 s only");
        // One report below capacity restarts the clock.
        live.report("a1", busy(3, 4_000), 4_000);
        live.report("a1", busy(4, 5_000), 5_000);
        live.tick(9_000);
        assert!(
            received(&mut two).is_empty(),
            "saturated for 4 s since the dip"
        );
        live.report("a1", busy(4, 10_000), 10_000);
        live.tick(10_000);
        assert_eq!(received(&mut two), vec![(LOAD, "m".to_string(), Some(0))]);
        assert!(received(&mut one).is_empty());
        // The copy is pending: the next pass does not ask again.
        live.tick(10_500);
        assert!(received(&mut two).is_empty());
    }

    #[test]
    fn an_eviction_plan_is_carried_out_victims_first_and_counted() {
        let catalog = catalog(&[("c", 12, 1000)]);
        let live = LivePlacement::new(catalog, PlacementConfig::default());
        let mut one = connect(&live, "a1");
        live.report(
            "a1",
            report("n1", 4 * GIB, vec![loaded("old", 20 * GIB, 0, 0)]),
            100_000,
        );
        live.record_settled(&[used("c", 100_000)]);
        live.tick(100_000);
        assert_eq!(
            received(&mut one),
            vec![
                (UNLOAD, "old".to_string(), None),
                (LOAD, "c".to_string(), Some(0))
            ]
        );
        assert_eq!(live.lock().eviction_cycles, 1);
    }

    #[test]
    fn after_enough_evictions_a_gpu_is_emptied_by_loading_elsewhere_then_unloading() {
        let config = PlacementConfig {
            defrag_after_cycles: 2,
            ..PlacementConfig::default()
        };
        let catalog = catalog(&[("a", 4, 1000), ("b", 8, 5000)]);
        let live = LivePlacement::new(catalog, config);
        let (mut one, mut two) = (connect(&live, "a1"), connect(&live, "a2"));
        let n1 = |models| {
            report(
                "n1",
                24 * GIB - 4 * GIB * models as u64,
                if models == 1 {
                    vec![loaded("a", 4 * GIB, 0, 0)]
                } else {
                    vec![]
                },
            )
        };
        let n2 = |a: Option<pb::ModelStatus>| {
            let mut models = vec![loaded("b", 8 * GIB, 0, 0)];
            let mut free = 16 * GIB;
            if let Some(status) = a {
                models.push(model("a", status, 4 * GIB));
                free -= 4 * GIB;
            }
            report("n2", free, models)
        };
        live.report("a1", n1(1), 1_000);
        live.report("a2", n2(None), 1_000);
        live.lock().eviction_cycles = 1;
        live.tick(1_000);
        assert!(received(&mut one).is_empty() && received(&mut two).is_empty());

        // Emptying n1's GPU costs one 1 s load; emptying n2's a 5 s one.
        live.lock().eviction_cycles = 2;
        live.tick(2_000);
        assert_eq!(live.lock().eviction_cycles, 0);
        assert_eq!(received(&mut two), vec![(LOAD, "a".to_string(), Some(0))]);
        assert!(received(&mut one).is_empty());
        // Nothing is unloaded before the destination has it loaded.
        live.report("a2", n2(Some(pb::ModelStatus::Loading)), 2_500);
        live.tick(2_500);
        assert!(received(&mut one).is_empty());
        live.report("a2", n2(Some(pb::ModelStatus::Loaded)), 3_000);
        live.tick(3_000);
        assert_eq!(received(&mut one), vec![(UNLOAD, "a".to_string(), None)]);
        live.tick(3_500);
        assert!(received(&mut one).is_empty(), "the unload is pending");
        live.report("a1", n1(0), 4_000);
        live.tick(4_000);
        assert!(live.lock().consolidation.is_none());
        assert!(received(&mut one).is_empty() && received(&mut two).is_empty());
    }

    #[test]
    fn a_change_of_a_loaded_models_options_alone_never_reloads_it() {
        let catalog = catalog(&[("m", 4, 1000)]);
        let live = LivePlacement::new(catalog, PlacementConfig::default());
        let mut one = connect(&live, "a1");
        let with = |context_length: u32, capabilities: Vec<String>, tool_call: bool| {
            report(
                "n1",
                20 * GIB,
                vec![pb::ModelState {
                    context_length,
                    capabilities,
                    tool_call,
                    ..loaded("m", 4 * GIB, 0, 1_000)
                }],
            )
        };
        live.report("a1", with(4_096, vec!["chat".into()], false), 1_000);
        live.record_settled(&[used("m", 1_000)]);
        live.tick(1_000);
        live.report(
            "a1",
            with(32_768, vec!["chat".into(), "embeddings".into()], true),
            2_000,
        );
        live.tick(2_000);
        assert!(received(&mut one).is_empty());
        assert_eq!(
            live.route("m", 2_000).unwrap().kind,
            pb::RouteKind::Serve as i32
        );
        let fleet = live.fleet(2_000);
        assert_eq!(fleet.nodes[0].models[0].context_length, 32_768);
    }

    #[test]
    fn a_model_moving_to_another_gpu_of_its_node_is_unloaded_then_loaded_there() {
        let config = PlacementConfig {
            defrag_after_cycles: 1,
            ..PlacementConfig::default()
        };
        let catalog = catalog(&[("a", 4, 1000), ("b", 8, 5000)]);
        let live = LivePlacement::new(catalog, config);
        let mut one = connect(&live, "a1");
        let mut status = report(
            "n1",
            20 * GIB,
            vec![
                loaded("a", 4 * GIB, 0, 0),
                pb::ModelState {
                    gpu: 1,
                    ..loaded("b", 8 * GIB, 0, 0)
                },
            ],
        );
        status.gpus.push(pb::GpuStatus {
            index: 1,
            vram_total_bytes: 24 * GIB,
            vram_free_bytes: 16 * GIB,
        });
        live.report("a1", status, 1_000);
        live.lock().eviction_cycles = 1;
        live.tick(1_000);
        // A node holds one copy of a model: "a" cannot be loaded on GPU 1
        // before it leaves GPU 0.
        assert_eq!(
            received(&mut one),
            vec![
                (UNLOAD, "a".to_string(), None),
                (LOAD, "a".to_string(), Some(1))
            ]
        );
        assert!(live.lock().consolidation.is_none(), "nothing to follow up");
    }

    #[test]
    fn demand_counts_charged_requests_by_the_model_that_served_them() {
        let record = pb::UsageRecord {
            model_requested: "alias".into(),
            model_served: "m".into(),
            admitted_at_unix_ms: 5,
            prompt_tokens: 3,
            completion_tokens: 4,
            charged: true,
            ..Default::default()
        };
        assert_eq!(
            Served::of(&record),
            Some(Served {
                model: "m".into(),
                admitted_at: 5,
                tokens: 7
            })
        );
        let refused = pb::UsageRecord {
            charged: false,
            ..record
        };
        assert_eq!(Served::of(&refused), None);
    }
}
