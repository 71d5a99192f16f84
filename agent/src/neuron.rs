//! Neuron adapters: how the agent reads its inference server's state (GPUs,
//! VRAM, models) and loads or unloads models, whatever server it is. The
//! reporter sends what the adapter reads to the coordinator as `NodeStatus`,
//! on change and at least every `node_report_ms`.
//!
//! An adapter implements [`NeuronAdapter`]:
//! - `state()`: GPUs (total and free VRAM) and the models on the server with
//!   their status, VRAM, context length and capabilities;
//! - `load(model)` / `unload(model)`: what placement directives will call.
//!
//! Two adapters exist:
//! - [`FakeAdapter`]: allot's fake neuron (`GET /_fake/node`,
//!   `POST /_fake/models/{id}/load|unload`);
//! - [`OllamaAdapter`]: Ollama (`GET /api/ps`; load with
//!   `POST /api/generate {"model": m, "keep_alive": -1}`, unload with
//!   `keep_alive: 0`). Ollama does not report GPU totals, so the agent's
//!   `gpu_vram_bytes` says what the node has.

use crate::upstream::HttpClient;
use allot::pb;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// Why an adapter could not read or change the neuron.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NeuronError {
    #[error("{url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: no answer within {CALL_TIMEOUT:?}")]
    NoAnswer { url: String },
    #[error("{url}: body not complete within {CALL_TIMEOUT:?}")]
    BodyTimedOut { url: String },
    /// A non-2xx answer, with the start of its body.
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    /// An answer that is not the documented shape.
    #[error("unexpected {what}: {reason}")]
    Unexpected { what: &'static str, reason: String },
    /// An unload refused: requests are in flight on the model.
    #[error("{model} has {in_flight} requests in flight")]
    InFlight { model: String, in_flight: u32 },
    #[error("unknown directive action {0}")]
    UnknownAction(i32),
}

/// The state an adapter reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NeuronState {
    pub gpus: Vec<pb::GpuStatus>,
    pub models: Vec<pb::ModelState>,
}

/// How the agent talks to one kind of inference server about its models.
pub trait NeuronAdapter: Send + Sync + 'static {
    fn state(&self) -> impl Future<Output = Result<NeuronState, NeuronError>> + Send;
    /// Loads `model` as `hint` says, as far as the server lets the adapter
    /// choose.
    fn load(
        &self,
        model: &str,
        hint: LoadHint,
    ) -> impl Future<Output = Result<(), NeuronError>> + Send;
    fn unload(&self, model: &str) -> impl Future<Output = Result<(), NeuronError>> + Send;
}

/// What the coordinator knows of a model it asks to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadHint {
    /// The catalog's VRAM estimate (the fake neuron takes it as the size).
    pub vram_bytes: u64,
    /// The catalog's load time (the fake neuron simulates it).
    pub load_ms: u64,
    /// The GPU placement planned for.
    pub gpu: Option<u32>,
}

impl LoadHint {
    pub fn of(directive: &pb::PlacementDirective) -> LoadHint {
        LoadHint {
            vram_bytes: directive.vram_bytes,
            load_ms: directive.load_ms,
            gpu: directive.gpu,
        }
    }
}

/// How long an adapter call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn call(
    client: &HttpClient,
    method: hyper::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), NeuronError> {
    let mut request = Request::builder().method(method).uri(&url);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let unreachable = |reason: String| NeuronError::Unreachable {
        url: url.clone(),
        reason,
    };
    let request = request
        .body(Full::new(body))
        .map_err(|e| unreachable(e.to_string()))?;
    let response = tokio::time::timeout(CALL_TIMEOUT, client.request(request))
        .await
        .map_err(|_| NeuronError::NoAnswer { url: url.clone() })?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| NeuronError::BodyTimedOut { url: url.clone() })?
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    Ok((status, bytes))
}

fn expect_success(url: &str, (status, body): (u16, Bytes)) -> Result<Bytes, NeuronError> {
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(NeuronError::Refused {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        })
    }
}

// ---- the fake neuron ----

#[derive(Deserialize)]
struct FakeGpu {
    index: u32,
    vram_total: u64,
    vram_free: u64,
}

#[derive(Deserialize)]
struct FakeModel {
    id: String,
    status: String,
    gpu: u32,
    vram_bytes: u64,
    last_access_ms: u64,
    context_length: u32,
    capabilities: Vec<String>,
    tool_call: bool,
    reasoning: bool,
}

#[derive(Deserialize)]
struct FakeNode {
    gpus: Vec<FakeGpu>,
    models: Vec<FakeModel>,
}

fn model_status(text: &str) -> pb::ModelStatus {
    match text {
        "loaded" => pb::ModelStatus::Loaded,
        "loading" => pb::ModelStatus::Loading,
        "unloaded" => pb::ModelStatus::Unloaded,
        _ => pb::ModelStatus::Failed,
    }
}

pub struct FakeAdapter {
    base: String,
    client: HttpClient,
}

impl FakeAdapter {
    pub fn new(base: &str, client: HttpClient) -> FakeAdapter {
        FakeAdapter {
            base: base.to_string(),
            client,
        }
    }
}

/// Reads `GET /_fake/node`.
pub fn parse_fake_node(body: &[u8]) -> Result<NeuronState, NeuronError> {
    let node: FakeNode = serde_json::from_slice(body).map_err(|e| NeuronError::Unexpected {
        what: "/_fake/node",
        reason: e.to_string(),
    })?;
    Ok(NeuronState {
        gpus: node
            .gpus
            .into_iter()
            .map(|g| pb::GpuStatus {
                index: g.index,
                vram_total_bytes: g.vram_total,
                vram_free_bytes: g.vram_free,
            })
            .collect(),
        models: node
            .models
            .into_iter()
            .map(|m| pb::ModelState {
                status: model_status(&m.status) as i32,
                model: m.id,
                gpu: m.gpu,
                vram_bytes: m.vram_bytes,
                last_access_unix_ms: m.last_access_ms as i64,
                capabilities: m.capabilities,
                tool_call: m.tool_call,
                reasoning: m.reasoning,
                context_length: m.context_length,
                in_flight: 0,
            })
            .collect(),
    })
}

impl NeuronAdapter for FakeAdapter {
    async fn state(&self) -> Result<NeuronState, NeuronError> {
        let url = format!("{}/_fake/node", self.base);
        let answer = call(&self.client, hyper::Method::GET, url.clone(), None).await?;
        parse_fake_node(&expect_success(&url, answer)?)
    }

    async fn load(&self, model: &str, hint: LoadHint) -> Result<(), NeuronError> {
        let url = format!("{}/_fake/models/{model}/load", self.base);
        let mut body = serde_json::json!({"vram_bytes": hint.vram_bytes, "load_ms": hint.load_ms});
        if let Some(gpu) = hint.gpu {
            body["gpu"] = gpu.into();
        }
        let answer = call(&self.client, hyper::Method::POST, url.clone(), Some(body)).await?;
        expect_success(&url, answer).map(drop)
    }

    async fn unload(&self, model: &str) -> Result<(), NeuronError> {
        let url = format!("{}/_fake/models/{model}/unload", self.base);
        let answer = call(&self.client, hyper::Method::POST, url.clone(), None).await?;
        expect_success(&url, answer).map(drop)
    }
}

// ---- Ollama ----

#[derive(Deserialize)]
struct OllamaRunning {
    #[serde(default)]
    name: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    size_vram: u64,
    #[serde(default)]
    context_length: u32,
}

#[derive(Deserialize)]
struct OllamaPs {
    #[serde(default)]
    models: Vec<OllamaRunning>,
}

/// The body Ollama takes to load (`keep_alive` -1: keep it resident) or
/// unload (`keep_alive` 0) a model: `POST /api/generate` with no prompt.
#[derive(Debug, Serialize, PartialEq)]
pub struct OllamaKeepAlive<'a> {
    pub model: &'a str,
    pub keep_alive: i64,
}

pub struct OllamaAdapter {
    base: String,
    client: HttpClient,
    /// VRAM of the node's GPUs as configured; Ollama does not report it.
    gpu_vram_bytes: Vec<u64>,
}

impl OllamaAdapter {
    pub fn new(base: &str, client: HttpClient, gpu_vram_bytes: Vec<u64>) -> OllamaAdapter {
        OllamaAdapter {
            base: base.to_string(),
            client,
            gpu_vram_bytes,
        }
    }

    async fn keep_alive(&self, model: &str, keep_alive: i64) -> Result<(), NeuronError> {
        let url = format!("{}/api/generate", self.base);
        let body = serde_json::json!(OllamaKeepAlive { model, keep_alive });
        let answer = call(&self.client, hyper::Method::POST, url.clone(), Some(body)).await?;
        expect_success(&url, answer).map(drop)
    }
}

/// Reads `GET /api/ps`: every running model is loaded. Ollama does not
/// say which GPU holds a model, so all are placed on GPU 0, and the node
/// is reported as one GPU of the configured total.
pub fn parse_ollama_ps(body: &[u8], gpu_vram_bytes: &[u64]) -> Result<NeuronState, NeuronError> {
    let ps: OllamaPs = serde_json::from_slice(body).map_err(|e| NeuronError::Unexpected {
        what: "/api/ps",
        reason: e.to_string(),
    })?;
    let total: u64 = gpu_vram_bytes.iter().sum();
    let used: u64 = ps.models.iter().map(|m| m.size_vram).sum();
    Ok(NeuronState {
        gpus: vec![pb::GpuStatus {
            index: 0,
            vram_total_bytes: total,
            vram_free_bytes: total.saturating_sub(used),
        }],
        models: ps
            .models
            .into_iter()
            .map(|m| pb::ModelState {
                model: if m.model.is_empty() { m.name } else { m.model },
                status: pb::ModelStatus::Loaded as i32,
                gpu: 0,
                vram_bytes: m.size_vram,
                context_length: m.context_length,
                capabilities: vec!["chat".into(), "completions".into()],
                ..Default::default()
            })
            .collect(),
    })
}

impl NeuronAdapter for OllamaAdapter {
    async fn state(&self) -> Result<NeuronState, NeuronError> {
        let url = format!("{}/api/ps", self.base);
        let answer = call(&self.client, hyper::Method::GET, url.clone(), None).await?;
        parse_ollama_ps(&expect_success(&url, answer)?, &self.gpu_vram_bytes)
    }

    /// Ollama places models itself: the hint is not used.
    async fn load(&self, model: &str, _hint: LoadHint) -> Result<(), NeuronError> {
        self.keep_alive(model, -1).await
    }

    async fn unload(&self, model: &str) -> Result<(), NeuronError> {
        self.keep_alive(model, 0).await
    }
}

// ---- what the agent itself knows of each model ----

#[derive(Default, Clone, Copy)]
struct Activity {
    in_flight: u32,
    last_access_ms: i64,
}

/// Requests in flight and last use per model, and completion tokens
/// settled, as the proxy sees them: what the reports add to the adapter's
/// view.
#[derive(Default)]
pub struct ModelActivity {
    models: Mutex<HashMap<String, Activity>>,
    tokens: std::sync::atomic::AtomicU64,
}

impl ModelActivity {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Activity>> {
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin(&self, model: &str, now_ms: i64) {
        let mut models = self.lock();
        // The model's name is copied once, on its first request.
        let entry = match models.get_mut(model) {
            Some(entry) => entry,
            None => models.entry(model.to_string()).or_default(),
        };
        entry.in_flight += 1;
        entry.last_access_ms = entry.last_access_ms.max(now_ms);
    }

    pub fn end(&self, model: &str, now_ms: i64, completion_tokens: u64) {
        if let Some(entry) = self.lock().get_mut(model) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.last_access_ms = entry.last_access_ms.max(now_ms);
        }
        self.tokens
            .fetch_add(completion_tokens, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests in flight for `model`.
    pub fn in_flight(&self, model: &str) -> u32 {
        self.lock().get(model).map_or(0, |a| a.in_flight)
    }

    /// Completion tokens settled since the agent started.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds what the proxy saw to the adapter's models: requests in flight,
    /// and the later of the two last-access times.
    pub fn annotate(&self, models: &mut [pb::ModelState]) {
        let seen = self.lock();
        for model in models {
            if let Some(activity) = seen.get(&model.model) {
                model.in_flight = activity.in_flight;
                model.last_access_unix_ms = model.last_access_unix_ms.max(activity.last_access_ms);
            }
        }
    }
}

/// Reads the neuron through `adapter` and reports it to the coordinator:
/// once a second when anything changed, at least every `node_report_ms`,
/// and at once after each (re)connection.
/// Directives from the coordinator are carried out here, one at a time
/// and in order (the unloads of an eviction before its load), each answered
/// with a `DirectiveResult` and followed by a report at once.
pub async fn report_loop<A: NeuronAdapter>(
    adapter: A,
    state: std::sync::Arc<crate::AgentState>,
    mut directives: tokio::sync::mpsc::UnboundedReceiver<pb::PlacementDirective>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(models) = state.neuron.models.clone() else {
        return;
    };
    let every = Duration::from_millis(state.config.node_report_ms);
    let poll = every.min(Duration::from_secs(1));
    let mut connected = state.coordinator.link.subscribe_connected();
    let mut last_sent: Option<(pb::NodeStatus, tokio::time::Instant)> = None;
    let mut last_known = NeuronState::default();
    let mut tokens_at = (models.tokens(), tokio::time::Instant::now());
    loop {
        let (healthy, mut read) = match adapter.state().await {
            Ok(read) => {
                last_known = read.clone();
                (true, read)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the neuron's state");
                (false, last_known.clone())
            }
        };
        models.annotate(&mut read.models);
        let now = tokio::time::Instant::now();
        let tokens = models.tokens();
        let elapsed = now.duration_since(tokens_at.1).as_secs_f64();
        let tokens_per_second = if elapsed > 0.0 {
            (tokens - tokens_at.0) as f64 / elapsed
        } else {
            0.0
        };
        let status = pb::NodeStatus {
            neuron_id: state.config.neuron_id.clone(),
            in_flight: state.neuron.in_flight.total() as u32,
            endpoint: state.neuron.upstreams.default_url().to_string(),
            gpus: read.gpus,
            models: read.models,
            capacity: state.config.node_capacity,
            tokens_per_second,
            healthy,
        };
        // Throughput and last-access times move with every request: only
        // a change of anything else is worth a report before `every`.
        let differs = |sent: &pb::NodeStatus| {
            let strip = |s: &pb::NodeStatus| {
                let mut s = s.clone();
                s.tokens_per_second = 0.0;
                s.in_flight = 0;
                for m in &mut s.models {
                    m.last_access_unix_ms = 0;
                    m.in_flight = 0;
                }
                s
            };
            strip(sent) != strip(&status)
        };
        let due = match &last_sent {
            None => true,
            Some((sent, at)) => now.duration_since(*at) >= every || differs(sent),
        };
        if due
            && state
                .coordinator
                .link
                .send(allot::pb::agent_message::Msg::NodeStatus(status.clone()))
        {
            metrics::counter!("allot_agent_node_reports_total").increment(1);
            last_sent = Some((status, now));
            tokens_at = (tokens, now);
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            Some(directive) = directives.recv() => {
                let result = carry_out(&adapter, &models, &directive).await;
                state.coordinator.link.send(pb::agent_message::Msg::DirectiveResult(result));
                last_sent = None;
            }
            changed = connected.changed() => {
                if changed.is_err() { return; }
                if *connected.borrow() { last_sent = None; }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn carry_out<A: NeuronAdapter>(
    adapter: &A,
    models: &ModelActivity,
    directive: &pb::PlacementDirective,
) -> pb::DirectiveResult {
    let outcome = match pb::DirectiveAction::try_from(directive.action) {
        Ok(pb::DirectiveAction::Load) => {
            adapter
                .load(&directive.model, LoadHint::of(directive))
                .await
        }
        Ok(pb::DirectiveAction::Unload) => {
            // Never unload under a request: the coordinator's view may be
            // a report old.
            match models.in_flight(&directive.model) {
                0 => adapter.unload(&directive.model).await,
                in_flight => Err(NeuronError::InFlight {
                    model: directive.model.clone(),
                    in_flight,
                }),
            }
        }
        _ => Err(NeuronError::UnknownAction(directive.action)),
    };
    let label = if outcome.is_ok() { "ok" } else { "failed" };
    metrics::counter!("allot_agent_directives_total", "outcome" => label).increment(1);
    if let Err(error) = &outcome {
        tracing::warn!(model = directive.model, %error, "a placement directive failed");
    }
    pb::DirectiveResult {
        directive_id: directive.directive_id,
        ok: outcome.is_ok(),
        message: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /api/ps` as documented by Ollama (docs.ollama.com/api/ps).
    const OLLAMA_PS: &str = r#"{
      "models": [
        {
          "name": "gemma3",
          "model": "gemma3",
          "size": 6591830464,
          "digest": "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
          "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "4.3B",
            "quantization_level": "Q4_K_M"
          },
          "expires_at": "2025-10-17T16:47:07.93355-07:00",
          "size_vram": 5333539264,
          "context_length": 4096
        }
      ]
    }"#;

    #[test]
    fn ollama_ps_becomes_loaded_models_on_the_configured_vram() {
        let state = parse_ollama_ps(OLLAMA_PS.as_bytes(), &[24 << 30]).unwrap();
        assert_eq!(state.gpus.len(), 1);
        assert_eq!(state.gpus[0].vram_total_bytes, 24 << 30);
        assert_eq!(state.gpus[0].vram_free_bytes, (24 << 30) - 5333539264);
        let model = &state.models[0];
        assert_eq!(model.model, "gemma3");
        assert_eq!(model.status, pb::ModelStatus::Loaded as i32);
        assert_eq!((model.vram_bytes, model.context_length), (5333539264, 4096));
        assert_eq!(
            parse_ollama_ps(br#"{"models": []}"#, &[1]).unwrap().models,
            vec![]
        );
        assert!(matches!(
            parse_ollama_ps(b"<html>", &[1]),
            Err(NeuronError::Unexpected {
                what: "/api/ps",
                ..
            })
        ));
    }

    #[test]
    fn ollama_load_and_unload_bodies_match_its_keep_alive_api() {
        // docs.ollama.com: "load a model" / "unload a model" with an empty prompt.
        let load = serde_json::to_value(OllamaKeepAlive {
            model: "llama3.2",
            keep_alive: -1,
        })
        .unwrap();
        assert_eq!(
            load,
            serde_json::json!({"model": "llama3.2", "keep_alive": -1})
        );
        let unload = serde_json::to_value(OllamaKeepAlive {
            model: "llama3.2",
            keep_alive: 0,
        })
        .unwrap();
        assert_eq!(
            unload,
            serde_json::json!({"model": "llama3.2", "keep_alive": 0})
        );
    }

    #[test]
    fn the_fake_nodes_state_is_read_field_by_field() {
        let body = br#"{"gpus":[{"index":0,"vram_total":100,"vram_free":40}],
            "models":[{"id":"m","status":"loading","gpu":0,"vram_bytes":60,"last_access_ms":5,
            "context_length":8192,"capabilities":["chat"],"tool_call":true,"reasoning":false}]}"#;
        let state = parse_fake_node(body).unwrap();
        assert_eq!(state.gpus[0].vram_free_bytes, 40);
        assert_eq!(state.models[0].status, pb::ModelStatus::Loading as i32);
        assert_eq!(state.models[0].last_access_unix_ms, 5);
        assert!(state.models[0].tool_call);
    }

    #[test]
    fn activity_counts_requests_in_flight_per_model_and_keeps_the_latest_access() {
        let activity = ModelActivity::default();
        activity.begin("m", 10);
        activity.begin("m", 20);
        activity.end("m", 30, 7);
        let mut models = vec![pb::ModelState {
            model: "m".into(),
            last_access_unix_ms: 25,
            ..Default::default()
        }];
        activity.annotate(&mut models);
        assert_eq!(
            (models[0].in_flight, models[0].last_access_unix_ms),
            (1, 30)
        );
        assert_eq!(activity.tokens(), 7);
    }
}
