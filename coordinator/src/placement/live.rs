//! The coordinator's live placement state: the fleet view fed by agents'
//! `NodeStatus` reports, the catalog (the operator's file, corrected by
//! measured loads), demand fed by usage batches, and the `Placement` gRPC
//! service that answers `Route` and `Fleet` from them.
//!
//! This is soft state, kept in memory by the coordinator the agents are
//! connected to: agents report every few seconds, so a new leader has a
//! complete view within one report interval of their reconnecting. Nothing
//! here touches the store.

use super::{
    route, Catalog, Decision, DemandTracker, FleetView, ModelId, ModelSpec, ModelStatus, NodeId,
    PlacementConfig, Resident, RouteError, Strategy,
};
use crate::engine::Outbox;
use allot::clock::{self, UnixMs};
use allot::pb;
use serde::Deserialize;
use std::collections::HashMap;
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

/// Reads a catalog file (TOML, `[[model]]` tables with `name`,
/// `vram_bytes`, `load_ms` and optional `pinned`).
pub fn load_catalog(path: &Path) -> Result<Catalog, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the catalog {}: {e}", path.display()))?;
    parse_catalog(&text).map_err(|e| format!("catalog {}: {e}", path.display()))
}

pub fn parse_catalog(text: &str) -> Result<Catalog, String> {
    let file: CatalogFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut catalog = Catalog::new();
    for entry in file.model {
        if entry.name.is_empty() {
            return Err("a [[model]] has an empty name".into());
        }
        if catalog.id(&entry.name).is_some() {
            return Err(format!("model {} is listed twice", entry.name));
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
}

/// A directive sent and not yet answered.
struct Pending {
    directive_id: u64,
    action: pb::DirectiveAction,
    model: String,
    /// Forgotten (and so retried) after this.
    until: UnixMs,
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
    /// NodeId index → neuron id.
    neuron_of: Vec<String>,
}

/// Shared by the session service (which feeds it) and the `Placement`
/// service (which reads it).
pub struct LivePlacement {
    inner: Mutex<Inner>,
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
        let id = match inner.nodes.get(&status.neuron_id) {
            Some(meta) => meta.id,
            None => {
                let totals: Vec<u64> = status.gpus.iter().map(|g| g.vram_total_bytes).collect();
                let id = inner
                    .fleet
                    .add_node(&status.endpoint, &totals, status.capacity.max(1));
                inner.neuron_of.push(status.neuron_id.clone());
                inner.nodes.insert(
                    status.neuron_id.clone(),
                    NodeMeta {
                        id,
                        agent_id: agent_id.to_string(),
                        session_up: true,
                        report: pb::NodeStatus::default(),
                        reported_at: now,
                        loading_since: HashMap::new(),
                    },
                );
                id
            }
        };
        let meta = inner.nodes.get_mut(&status.neuron_id).expect("just added");
        meta.agent_id = agent_id.to_string();
        meta.session_up = true;
        meta.reported_at = now;
        let mut residents = Vec::with_capacity(status.models.len());
        for model in &status.models {
            let Some(model_status) = status_of(model.status) else {
                continue;
            };
            let model_id = match inner.catalog.id(&model.model) {
                Some(id) => id,
                None => inner.catalog.insert(ModelSpec::new(
                    model.model.clone(),
                    model.vram_bytes,
                    UNKNOWN_LOAD_MS,
                )),
            };
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

    /// Feeds demand from a usage batch: one request per record.
    pub fn record_usage(&self, records: &[pb::UsageRecord]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for record in records {
            if !record.charged {
                continue;
            }
            let model = if record.model_served.is_empty() {
                &record.model_requested
            } else {
                &record.model_served
            };
            match inner.wanted.get_mut(model) {
                Some(at) => *at = (*at).max(record.admitted_at_unix_ms),
                None => {
                    inner
                        .wanted
                        .insert(model.clone(), record.admitted_at_unix_ms);
                }
            }
            if let Some(id) = inner.catalog.id(model) {
                inner.demand.record(
                    id,
                    record.admitted_at_unix_ms,
                    record.prompt_tokens + record.completion_tokens,
                );
            }
        }
    }

    pub fn route(&self, model: &str, now: UnixMs) -> Result<pb::RouteDecision, Status> {
        let mut inner = self.lock();
        let Some(id) = inner.catalog.id(model) else {
            return Err(Status::not_found(format!(
                "model: {model} is neither in the catalog nor reported by any agent"
            )));
        };
        let decision = route(
            &inner.fleet,
            &inner.catalog,
            &inner.demand,
            &inner.config,
            id,
            now,
        )
        .map_err(|e| route_status(&inner.catalog, &e))?;
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
        inner
            .pending
            .retain(|p| p.directive_id != result.directive_id);
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

    /// One pass of the placement controller: every model wanted within
    /// `want_window_ms` and not loaded (or loading) on a healthy node is
    /// loaded where `route` says, after unloading the victims it names.
    /// Directives in flight are not repeated until answered or expired.
    pub fn tick(&self, now: UnixMs) {
        let mut inner = self.lock();
        let inner = &mut *inner;
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
            let Ok(decision) = route(
                &inner.fleet,
                &inner.catalog,
                &inner.demand,
                &inner.config,
                id,
                now,
            ) else {
                continue;
            };
            let (node, victims) = match decision {
                Decision::Serve { .. }
                | Decision::ColdStart {
                    in_progress: true, ..
                } => continue,
                Decision::ColdStart { node, .. } => (node, Vec::new()),
                Decision::Evict { node, victims, .. } => (node, victims),
            };
            let neuron_id = inner.neuron_of[node.index()].clone();
            let Some(agent_id) = inner.nodes.get(&neuron_id).map(|m| m.agent_id.clone()) else {
                continue;
            };
            let Some(outbox) = inner.outboxes.get(&agent_id).cloned() else {
                continue;
            };
            let spec = inner.catalog.get(id).cloned().expect("known model");
            let mut steps: Vec<(pb::DirectiveAction, String, u64, u64)> = victims
                .iter()
                .map(|v| {
                    (
                        pb::DirectiveAction::Unload,
                        model_name(&inner.catalog, *v),
                        0,
                        0,
                    )
                })
                .collect();
            steps.push((
                pb::DirectiveAction::Load,
                model.clone(),
                spec.vram_bytes,
                spec.load_ms,
            ));
            for (action, target, vram_bytes, load_ms) in steps {
                let directive_id = inner.next_directive;
                inner.next_directive += 1;
                let message = pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Directive(
                        pb::PlacementDirective {
                            directive_id,
                            action: action as i32,
                            model: target.clone(),
                            vram_bytes,
                            load_ms,
                        },
                    )),
                };
                if outbox.try_send(Ok(message)).is_err() {
                    break;
                }
                let label = match action {
                    pb::DirectiveAction::Load => "load",
                    _ => "unload",
                };
                metrics::counter!("allot_directives_total", "action" => label).increment(1);
                tracing::info!(
                    neuron_id,
                    model = target,
                    action = label,
                    "placement directive"
                );
                inner.pending.push(Pending {
                    directive_id,
                    action,
                    model: target,
                    until: now + load_ms as i64 + 30_000,
                });
            }
        }
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

fn route_status(catalog: &Catalog, error: &RouteError) -> Status {
    let name = |model: ModelId| model_name(catalog, model);
    match error {
        RouteError::UnknownModel(model) => {
            Status::not_found(format!("model: {} is not in the catalog", name(*model)))
        }
        RouteError::NoHealthyNode => Status::unavailable("no agent reports a healthy neuron"),
        RouteError::TooLarge {
            model,
            need_bytes,
            largest_gpu_bytes,
        } => Status::failed_precondition(format!(
            "model: {} needs {need_bytes} bytes of vram, more than the largest healthy gpu \
             ({largest_gpu_bytes}); models are not split across gpus",
            name(*model)
        )),
        RouteError::NoRoom {
            model,
            need_bytes,
            protected,
        } => Status::resource_exhausted(format!(
            "model: no gpu can make room for {} ({need_bytes} bytes) even after allowed \
             evictions; protected: {protected}",
            name(*model)
        )),
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
            return Err(Status::invalid_argument("model: must not be empty"));
        }
        self.live.route(&model, clock::now_ms()).map(Response::new)
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
        assert!(parse_catalog(&twice).unwrap_err().contains("twice"));
        let unknown =
            parse_catalog("[[model]]\nname = \"a\"\nvram_bytes = 1\nload_ms = 1\nsize = 3\n");
        assert!(unknown.unwrap_err().contains("size"));
    }

    #[test]
    fn reports_feed_route_and_a_gone_agent_takes_its_node_out() {
        let live = LivePlacement::new(
            parse_catalog("[[model]]\nname = \"cold\"\nvram_bytes = 1073741824\nload_ms = 7000\n")
                .unwrap(),
            PlacementConfig::default(),
        );
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
            live.route("nowhere", 2_000).unwrap_err().code(),
            tonic::Code::NotFound
        );
        let (outbox, _rx) = tokio::sync::mpsc::channel(1);
        live.attach("agent-1", outbox.clone());
        live.agent_gone("agent-1", &outbox);
        assert_eq!(
            live.route("hot", 2_000).unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn a_load_seen_finishing_corrects_the_catalog() {
        let live = LivePlacement::new(
            parse_catalog("[[model]]\nname = \"m\"\nvram_bytes = 1073741824\nload_ms = 9000\n")
                .unwrap(),
            PlacementConfig::default(),
        );
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
}
