//! `allot-fake-neuron` is a test double for an OpenAI-compatible inference server
//! (the "neuron" behind allot's budget enforcement). It mimics the response shapes of
//! vLLM / llama.cpp / OpenAI servers for `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/responses` and `/v1/models`, with deterministic token
//! accounting, real SSE streaming, and knobs (delays, injected failures, streams broken
//! mid-way, missing or inflated usage) that end-to-end tests and the demo use to exercise
//! allot's reservation and settlement paths. It also counts hits and client cancellations
//! so tests can assert on what actually reached the neuron.
//!
//! Routes:
//! - `POST /v1/chat/completions`, `POST /v1/completions`: plain JSON, or SSE ending with
//!   `data: [DONE]` when `stream` is true (a usage chunk when
//!   `stream_options.include_usage`).
//! - `POST /v1/embeddings`: deterministic unit vectors (8 dimensions, or `dimensions` up
//!   to 64), `encoding_format` `float` or `base64`; never streamed.
//! - `POST /v1/responses`: the Responses API, plain JSON or, when `stream` is true, named
//!   SSE events (`event: <type>`) ending with `response.completed` (or
//!   `response.incomplete` when capped by `max_output_tokens`) and no `[DONE]`.
//! - `GET /v1/models`, and `GET /models/{model_id}/endpoint` answering `{"url": ...}`:
//!   this server's own address, or [`FakeConfig::endpoints`]' entry for the model.
//! - `GET /_fake/hits`, `POST /_fake/behavior` (a [`Behavior`] as JSON),
//!   `POST /_fake/reset`, `GET /health`.
//! - The simulated node ([`node`]): `GET /_fake/node` (GPUs, VRAM, models and
//!   their status), `POST /_fake/models/{id}/load` (a [`node::LoadRequest`]:
//!   VRAM, simulated load time and optionally the GPU; 507 when no GPU, or
//!   not the one asked for, has room; 400 for a GPU that does not exist) and
//!   `POST /_fake/models/{id}/unload`. Only `loaded` models are served: a
//!   request for any other model gets 404 `model_not_found`.
//!
//! Token accounting: prompt tokens are whitespace-separated words (+1 per chat or
//! Responses message item), or the length of pre-tokenized inputs; every generated token
//! is the word `tok`.
//!
//! Server family profiles ([`FakeConfig::family`], `--family`): a fake that
//! behaves as a family documents what the real server cannot show here.
//! The family's [`LimitRule`] decides the completion limit, `GET /v1/models`
//! names the family's `owned_by`, and:
//! - `llama_cpp` (llama-cpp-python): an `x-request-id` that is not a UUID is
//!   refused with an empty 400; streams never carry usage (`stream_options`
//!   is ignored); `POST /extras/tokenize/count` answers `{"count": n}`, the
//!   words of `input` plus the BOS token the server adds;
//! - `tgi`: `GET /info` answers its router and model; a stream's last
//!   content chunk carries usage, asked for or not;
//! - `ollama`: `GET /api/version` answers `{"version": ...}`;
//! - `openai`, `vllm`: a usage-only chunk when asked (as without a family).
//!
//! Per-request behavior headers, overriding the default [`Behavior`]: `x-fake-delay-ms`,
//! `x-fake-chunk-delay-ms`, `x-fake-fail-status`, `x-fake-completion-tokens`,
//! `x-fake-omit-usage` (`1`/`true`/`0`/`false`) and `x-fake-fail-after-chunks`.

#![forbid(unsafe_code)]

pub mod node;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const DEFAULT_MODEL_NAME: &str = "fake-model";
const DEFAULT_COMPLETION_TOKEN_CAP: u64 = 16;
const COMPLETION_WORD: &str = "tok";
// Bounds the work a single request can ask for, so hostile input cannot exhaust memory.
const MAXIMUM_CHOICE_COUNT: u64 = 128;
const NEURON_ID_HEADER: &str = "x-fake-neuron-id";
const DEFAULT_EMBEDDING_DIMENSIONS: u64 = 8;
const MAXIMUM_EMBEDDING_DIMENSIONS: u64 = 64;
// OpenAI's own limit on the inputs of one embeddings request.
const MAXIMUM_EMBEDDING_INPUTS: usize = 2048;
// How long a stream broken by `fail_after_chunks` idles before breaking, so the events
// before the break are flushed to the client rather than lost with the connection.
const STREAM_BREAK_FLUSH_PAUSE: Duration = Duration::from_millis(20);

/// Static configuration of a fake neuron.
#[derive(Clone, Debug, Default)]
pub struct FakeConfig {
    /// Models served; empty means `["fake-model"]`.
    pub models: Vec<String>,
    /// Identifier echoed in the `x-fake-neuron-id` response header of inference responses.
    pub neuron_id: String,
    /// Model to URL: `GET /models/{model_id}/endpoint` answers `{"url": <url>}` for these
    /// models, served or not, so this fake can act as a node daemon pointing a model at
    /// another server. Models without an entry get this server's own address.
    pub endpoints: HashMap<String, String>,
    /// VRAM of each simulated GPU in bytes; empty means one 24 GiB GPU.
    pub gpus: Vec<u64>,
    /// Behave as this server family documents (see the crate docs); `None`:
    /// the OpenAI documents, with `owned_by: "fake-neuron"`.
    pub family: Option<LimitRule>,
}

/// How the fake neuron answers inference requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Behavior {
    /// Delay before responding (before the first byte).
    pub delay_ms: u64,
    /// Delay between SSE events of a streamed response.
    pub chunk_delay_ms: u64,
    /// Respond with this HTTP status and an OpenAI error body instead.
    pub fail_status: Option<u16>,
    /// Do not report usage, neither in JSON bodies nor as a stream usage chunk.
    pub omit_usage: bool,
    /// Force this many completion tokens per choice.
    pub completion_tokens: Option<u64>,
    /// Added to the reported prompt_tokens, to simulate a neuron over-reporting.
    pub overreport_prompt_tokens: u64,
    /// Streams only: keep the connection open this long after the last
    /// event (`[DONE]`), as servers that close lazily do.
    pub linger_after_end_ms: u64,
    /// Which completion-limit field wins, as the server family named does.
    pub limit_rule: LimitRule,
    /// Generate exactly the honoured limit per choice (at most
    /// [`MAXIMUM_GENERATED_TOKENS`]) instead of at most 16 tokens: a server
    /// that runs to its limit. Without a limit it generates the maximum.
    pub generate_to_limit: bool,
    /// Streamed responses only (chat, completions, responses): after this many SSE
    /// events the body fails, so the connection is broken mid-stream instead of ending
    /// cleanly (no `[DONE]`, no final event). A stream with no more events than this
    /// ends normally. Header `x-fake-fail-after-chunks`.
    pub fail_after_chunks: Option<u64>,
}

/// Which body field bounds the completion, per server family, as each
/// documents it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LimitRule {
    /// OpenAI: `max_completion_tokens`, else `max_tokens`.
    #[default]
    Openai,
    /// vLLM: `max_completion_tokens or max_tokens` (Python `or`: 0 is
    /// falsy and falls through to `max_tokens`).
    Vllm,
    /// llama.cpp server: `n_predict`, else `max_tokens`; -1 is unlimited.
    LlamaCpp,
    /// Ollama: `options.num_predict`, else `max_tokens`; negative is
    /// unlimited.
    Ollama,
    /// TGI: `max_new_tokens`, else `max_tokens`.
    Tgi,
}

/// What a `generate_to_limit` server generates per choice at most.
pub const MAXIMUM_GENERATED_TOKENS: u64 = 200_000;

impl LimitRule {
    /// The `owned_by` of the family's `GET /v1/models` (TGI names the
    /// model itself: it is detected by `GET /info`).
    fn models_owner(self, model: &str) -> &str {
        match self {
            LimitRule::Openai => "system",
            LimitRule::Vllm => "vllm",
            LimitRule::LlamaCpp => "me",
            LimitRule::Ollama => "library",
            LimitRule::Tgi => model,
        }
    }

    /// The completion limit the family reads from `body`: `None` when it
    /// finds none (or an unlimited one).
    fn read(self, body: &Value) -> Result<Option<u64>, RequestRejection> {
        let signed = |value: Option<&Value>, name: &str| -> Result<Option<i64>, RequestRejection> {
            match value {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                    RequestRejection::bad_request(format!("`{name}` must be an integer"))
                }),
            }
        };
        let max_tokens = optional_unsigned(body, "max_tokens")?;
        Ok(match self {
            LimitRule::Openai => optional_unsigned(body, "max_completion_tokens")?.or(max_tokens),
            LimitRule::Vllm => match optional_unsigned(body, "max_completion_tokens")? {
                Some(0) | None => max_tokens,
                some => some,
            },
            LimitRule::LlamaCpp => match signed(body.get("n_predict"), "n_predict")? {
                Some(n) if n < 0 => None,
                Some(n) => Some(n as u64),
                None => max_tokens,
            },
            LimitRule::Ollama => {
                match signed(body.pointer("/options/num_predict"), "options.num_predict")? {
                    Some(n) if n < 0 => None,
                    Some(n) => Some(n as u64),
                    None => max_tokens,
                }
            }
            LimitRule::Tgi => optional_unsigned(body, "max_new_tokens")?.or(max_tokens),
        })
    }
}

/// An inference request as the fake neuron received it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Parsed JSON body; a body that is not JSON is kept as a JSON string of its text.
    pub body: Value,
    /// Headers as (lowercase name, value) in arrival order.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of a header, looked up case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header_name, _)| header_name.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A cheap, clonable handle to one fake neuron's shared state.
#[derive(Clone)]
pub struct FakeNeuron {
    shared: Arc<SharedState>,
}

struct SharedState {
    family: Option<LimitRule>,
    served_models: Vec<String>,
    node: Mutex<node::Node>,
    neuron_id: String,
    endpoints: HashMap<String, String>,
    hits: AtomicU64,
    cancellations: AtomicU64,
    response_sequence: AtomicU64,
    default_behavior: Mutex<Behavior>,
    last_request: Mutex<Option<RecordedRequest>>,
}

impl std::fmt::Debug for FakeNeuron {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FakeNeuron")
            .field("neuron_id", &self.shared.neuron_id)
            .field("served_models", &self.shared.served_models)
            .finish_non_exhaustive()
    }
}

impl FakeNeuron {
    pub fn new(config: FakeConfig) -> FakeNeuron {
        let served_models = if config.models.is_empty() {
            vec![DEFAULT_MODEL_NAME.to_string()]
        } else {
            config.models
        };
        FakeNeuron {
            shared: Arc::new(SharedState {
                family: config.family,
                node: Mutex::new(node::Node::new(&config.gpus, &served_models)),
                served_models,
                neuron_id: config.neuron_id,
                endpoints: config.endpoints,
                hits: AtomicU64::new(0),
                cancellations: AtomicU64::new(0),
                response_sequence: AtomicU64::new(0),
                default_behavior: Mutex::new(Behavior::default()),
                last_request: Mutex::new(None),
            }),
        }
    }

    /// All routes: the OpenAI-compatible API, the endpoint lookup, the control API and health.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions_handler))
            .route("/v1/completions", post(completions_handler))
            .route("/v1/embeddings", post(embeddings_handler))
            .route("/v1/responses", post(responses_handler))
            .route("/v1/models", get(list_models_handler))
            .route("/models/{model_id}/endpoint", get(model_endpoint_handler))
            .route("/_fake/hits", get(hits_handler))
            .route("/_fake/behavior", post(set_behavior_handler))
            .route("/_fake/reset", post(reset_handler))
            .route("/_fake/node", get(node_handler))
            .route("/_fake/models/{model_id}/load", post(load_handler))
            .route("/_fake/models/{model_id}/unload", post(unload_handler))
            .route("/health", get(|| async { "ok" }))
            .route("/info", get(tgi_info_handler))
            .route("/api/version", get(ollama_version_handler))
            .route("/extras/tokenize/count", post(token_count_handler))
            .with_state(Arc::clone(&self.shared))
    }

    /// Serves the router on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Inference requests received, counted on arrival, including ones that errored.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Streams whose client went away before the stream finished.
    pub fn cancellations(&self) -> u64 {
        self.shared.cancellations.load(Ordering::SeqCst)
    }

    /// Sets the default behavior for following requests.
    pub fn set_behavior(&self, behavior: Behavior) {
        *lock_ignoring_poison(&self.shared.default_behavior) = behavior;
    }

    /// The most recent inference request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock_ignoring_poison(&self.shared.last_request).clone()
    }
}

// A panic elsewhere must not turn every later request into a panic too.
fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SharedState {
    fn record_request(&self, path: &str, body: Value, headers: &HeaderMap) {
        let recorded_headers = headers
            .iter()
            .map(|(name, value)| {
                let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_ascii_lowercase(), text)
            })
            .collect();
        *lock_ignoring_poison(&self.last_request) = Some(RecordedRequest {
            path: path.to_string(),
            body,
            headers: recorded_headers,
        });
    }

    fn effective_behavior(&self, headers: &HeaderMap) -> Behavior {
        let mut behavior = lock_ignoring_poison(&self.default_behavior).clone();
        if let Some(delay_ms) = header_number::<u64>(headers, "x-fake-delay-ms") {
            behavior.delay_ms = delay_ms;
        }
        if let Some(chunk_delay_ms) = header_number::<u64>(headers, "x-fake-chunk-delay-ms") {
            behavior.chunk_delay_ms = chunk_delay_ms;
        }
        if let Some(fail_status) = header_number::<u16>(headers, "x-fake-fail-status") {
            behavior.fail_status = Some(fail_status);
        }
        if let Some(completion_tokens) = header_number::<u64>(headers, "x-fake-completion-tokens") {
            behavior.completion_tokens = Some(completion_tokens);
        }
        match header_text(headers, "x-fake-omit-usage") {
            Some("1") | Some("true") => behavior.omit_usage = true,
            Some("0") | Some("false") => behavior.omit_usage = false,
            _ => {}
        }
        if let Some(fail_after_chunks) = header_number::<u64>(headers, "x-fake-fail-after-chunks") {
            behavior.fail_after_chunks = Some(fail_after_chunks);
        }
        if let Some(family) = self.family {
            behavior.limit_rule = family;
        }
        behavior
    }

    /// Whether `model` is loaded (and marks it used).
    fn serves_model(&self, model: &str) -> bool {
        lock_ignoring_poison(&self.node).touch(model)
    }

    fn next_response_number(&self) -> u64 {
        self.response_sequence.fetch_add(1, Ordering::SeqCst) + 1
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn header_number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    header_text(headers, name)?.parse().ok()
}

fn unix_seconds_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// An OpenAI-shaped error response; the error type follows the status class.
fn openai_error(status: StatusCode, message: impl Into<String>, code: Option<&str>) -> Response {
    let error_type = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({
        "error": {"message": message.into(), "type": error_type, "param": null, "code": code}
    });
    (status, axum::Json(body)).into_response()
}

fn model_not_found(model: &str) -> RequestRejection {
    RequestRejection {
        status: StatusCode::NOT_FOUND,
        message: format!("the model `{model}` does not exist"),
        code: Some("model_not_found"),
    }
}

/// Why a request was refused; kept small so `Result`s carrying it stay cheap.
#[derive(Debug)]
struct RequestRejection {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
}

impl RequestRejection {
    fn bad_request(message: impl Into<String>) -> RequestRejection {
        RequestRejection {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            code: None,
        }
    }
}

impl IntoResponse for RequestRejection {
    fn into_response(self) -> Response {
        openai_error(self.status, self.message, self.code)
    }
}

/// The two completion-style APIs, which share their request and response shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InferenceKind {
    ChatCompletions,
    Completions,
}

impl InferenceKind {
    fn path(self) -> &'static str {
        match self {
            InferenceKind::ChatCompletions => "/v1/chat/completions",
            InferenceKind::Completions => "/v1/completions",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            InferenceKind::ChatCompletions => "chatcmpl",
            InferenceKind::Completions => "cmpl",
        }
    }
}

/// How the SSE events of a streamed response are paced, and whether the stream breaks.
#[derive(Clone, Copy, Debug)]
struct StreamPacing {
    chunk_delay: Duration,
    fail_after_events: Option<u64>,
    linger_after_end: Duration,
}

impl StreamPacing {
    fn from_behavior(behavior: &Behavior) -> StreamPacing {
        StreamPacing {
            chunk_delay: Duration::from_millis(behavior.chunk_delay_ms),
            fail_after_events: behavior.fail_after_chunks,
            linger_after_end: Duration::from_millis(behavior.linger_after_end_ms),
        }
    }
}

/// Everything needed to answer one validated chat or text completion request.
struct InferencePlan {
    kind: InferenceKind,
    model: String,
    stream: bool,
    include_usage: bool,
    /// TGI: usage rides on the last content chunk, asked for or not.
    usage_in_last_chunk: bool,
    omit_usage: bool,
    choice_count: u64,
    tokens_per_choice: u64,
    finish_reason: &'static str,
    prompt_tokens: u64,
    pacing: StreamPacing,
}

impl InferencePlan {
    fn completion_tokens(&self) -> u64 {
        self.tokens_per_choice.saturating_mul(self.choice_count)
    }

    fn usage(&self) -> Value {
        let completion_tokens = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens.saturating_add(completion_tokens),
            "completion_tokens_details": {"reasoning_tokens": 0},
        })
    }
}

fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn optional_unsigned(body: &Value, field: &str) -> Result<Option<u64>, RequestRejection> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            RequestRejection::bad_request(format!("`{field}` must be a non-negative integer"))
        }),
    }
}

fn chat_prompt_words(body: &Value) -> Result<u64, RequestRejection> {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(RequestRejection::bad_request(
            "`messages` is required and must be an array",
        ));
    };
    let mut words = 0u64;
    for message in messages {
        words = words.saturating_add(1);
        match message.get("content") {
            Some(Value::String(text)) => words = words.saturating_add(count_words(text)),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if part.get("type").and_then(Value::as_str) != Some("text") {
                        continue;
                    }
                    let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                    words = words.saturating_add(count_words(text));
                }
            }
            _ => {}
        }
    }
    Ok(words)
}

fn completions_prompt_words(body: &Value) -> Result<u64, RequestRejection> {
    match body.get("prompt") {
        Some(Value::String(text)) => Ok(count_words(text)),
        Some(Value::Array(prompts)) => Ok(prompts
            .iter()
            .map(|prompt| match prompt {
                Value::String(text) => count_words(text),
                // Pre-tokenized prompts: each integer is a token, nested arrays are prompts.
                Value::Array(token_ids) => token_ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add)),
        _ => Err(RequestRejection::bad_request(
            "`prompt` is required and must be a string or an array",
        )),
    }
}

/// The served model a request names, after checking the body is a JSON object.
fn requested_model<'body>(
    shared: &SharedState,
    body: &'body Value,
) -> Result<&'body str, RequestRejection> {
    if !body.is_object() {
        return Err(RequestRejection::bad_request(
            "request body must be a json object",
        ));
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return Err(RequestRejection::bad_request(
            "`model` is required and must be a string",
        ));
    };
    if !shared.serves_model(model) {
        return Err(model_not_found(model));
    }
    Ok(model)
}

/// Prompt tokens as reported: at least one, plus any configured over-reporting.
fn reported_prompt_tokens(prompt_words: u64, behavior: &Behavior) -> u64 {
    prompt_words
        .max(1)
        .saturating_add(behavior.overreport_prompt_tokens)
}

/// Tokens to generate (the behavior's forced count, else the requested maximum capped at
/// the default cap) and whether the requested maximum cut the output short.
fn generated_tokens(requested_maximum: Option<u64>, behavior: &Behavior) -> (u64, bool) {
    let tokens = behavior.completion_tokens.unwrap_or_else(|| {
        if behavior.generate_to_limit {
            return requested_maximum
                .unwrap_or(MAXIMUM_GENERATED_TOKENS)
                .min(MAXIMUM_GENERATED_TOKENS);
        }
        requested_maximum
            .unwrap_or(DEFAULT_COMPLETION_TOKEN_CAP)
            .min(DEFAULT_COMPLETION_TOKEN_CAP)
    });
    let cut_short = matches!(requested_maximum, Some(maximum) if tokens >= maximum);
    (tokens, cut_short)
}

fn plan_inference(
    shared: &SharedState,
    kind: InferenceKind,
    body: &Value,
    behavior: &Behavior,
) -> Result<InferencePlan, RequestRejection> {
    let model = requested_model(shared, body)?;
    let prompt_words = match kind {
        InferenceKind::ChatCompletions => chat_prompt_words(body)?,
        InferenceKind::Completions => completions_prompt_words(body)?,
    };
    let choice_count = optional_unsigned(body, "n")?.unwrap_or(1);
    if choice_count == 0 || choice_count > MAXIMUM_CHOICE_COUNT {
        return Err(RequestRejection::bad_request(format!(
            "`n` must be between 1 and {MAXIMUM_CHOICE_COUNT}"
        )));
    }
    // Legacy completions answer every prompt of an array with `n` choices.
    let prompts = match (kind, body.get("prompt")) {
        (InferenceKind::Completions, Some(Value::Array(items)))
            if !items.iter().all(Value::is_number) =>
        {
            items.len() as u64
        }
        _ => 1,
    };
    let choice_count = choice_count.saturating_mul(prompts.max(1));
    if choice_count > MAXIMUM_CHOICE_COUNT * 2048 {
        return Err(RequestRejection::bad_request(
            "too many prompts and choices",
        ));
    }
    let requested_maximum = behavior.limit_rule.read(body)?;
    let (tokens_per_choice, cut_short) = generated_tokens(requested_maximum, behavior);
    let finish_reason = if cut_short { "length" } else { "stop" };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // llama-cpp-python ignores stream_options; TGI reports usage anyway.
    let (include_usage, usage_in_last_chunk) = match shared.family {
        Some(LimitRule::LlamaCpp) => (false, false),
        Some(LimitRule::Tgi) => (false, true),
        _ => (include_usage, false),
    };
    Ok(InferencePlan {
        kind,
        model: model.to_string(),
        stream,
        include_usage,
        usage_in_last_chunk,
        omit_usage: behavior.omit_usage,
        choice_count,
        tokens_per_choice,
        finish_reason,
        prompt_tokens: reported_prompt_tokens(prompt_words, behavior),
        pacing: StreamPacing::from_behavior(behavior),
    })
}

async fn chat_completions_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    let kind = InferenceKind::ChatCompletions;
    handle_inference(
        shared,
        kind.path(),
        headers,
        raw_body,
        |shared, body, behavior| respond_to_completion(shared, kind, body, behavior),
    )
    .await
}

async fn completions_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    let kind = InferenceKind::Completions;
    handle_inference(
        shared,
        kind.path(),
        headers,
        raw_body,
        |shared, body, behavior| respond_to_completion(shared, kind, body, behavior),
    )
    .await
}

async fn embeddings_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    handle_inference(
        shared,
        "/v1/embeddings",
        headers,
        raw_body,
        respond_to_embeddings,
    )
    .await
}

async fn responses_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    handle_inference(
        shared,
        "/v1/responses",
        headers,
        raw_body,
        respond_to_responses,
    )
    .await
}

/// What every inference route shares: counting the hit, recording the request, the
/// behavior's delay and injected failure, and the neuron id header. `respond` answers a
/// request whose body parsed as JSON.
async fn handle_inference(
    shared: Arc<SharedState>,
    path: &'static str,
    headers: HeaderMap,
    raw_body: Bytes,
    respond: impl FnOnce(&Arc<SharedState>, &Value, &Behavior) -> Result<Response, RequestRejection>,
) -> Response {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    let parsed_body = serde_json::from_slice::<Value>(&raw_body);
    let recorded_body = match &parsed_body {
        Ok(body) => body.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&raw_body).into_owned()),
    };
    shared.record_request(path, recorded_body, &headers);
    if shared.family == Some(LimitRule::LlamaCpp) && !request_id_is_uuid(&headers) {
        // llama-cpp-python's request-id middleware: an empty 400.
        return StatusCode::BAD_REQUEST.into_response();
    }
    let behavior = shared.effective_behavior(&headers);
    tracing::debug!(path, ?behavior, "inference request");

    if behavior.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.delay_ms)).await;
    }
    let mut response = respond_to_inference(&shared, parsed_body, &behavior, respond);
    if shared.neuron_id.is_empty() {
        return response;
    }
    if let Ok(neuron_id) = HeaderValue::from_str(&shared.neuron_id) {
        response.headers_mut().insert(NEURON_ID_HEADER, neuron_id);
    }
    response
}

fn respond_to_inference(
    shared: &Arc<SharedState>,
    parsed_body: Result<Value, serde_json::Error>,
    behavior: &Behavior,
    respond: impl FnOnce(&Arc<SharedState>, &Value, &Behavior) -> Result<Response, RequestRejection>,
) -> Response {
    let body = match parsed_body {
        Ok(body) => body,
        Err(error) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("invalid json body: {error}"),
                None,
            )
        }
    };
    if let Some(fail_status) = behavior.fail_status {
        let status = StatusCode::from_u16(fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return openai_error(
            status,
            format!("fake neuron injected failure with status {fail_status}"),
            None,
        );
    }
    respond(shared, &body, behavior).unwrap_or_else(IntoResponse::into_response)
}

fn respond_to_completion(
    shared: &Arc<SharedState>,
    kind: InferenceKind,
    body: &Value,
    behavior: &Behavior,
) -> Result<Response, RequestRejection> {
    let plan = plan_inference(shared, kind, body, behavior)?;
    let response_id = format!("{}-{}", kind.id_prefix(), shared.next_response_number());
    let created = unix_seconds_now();
    if plan.stream {
        let events = stream_events(&plan, &response_id, created);
        return Ok(sse_response(Arc::clone(shared), events, plan.pacing));
    }
    Ok(non_streaming_response(&plan, &response_id, created))
}

fn completion_text(token_count: u64) -> String {
    let mut text = String::new();
    for position in 0..token_count {
        if position > 0 {
            text.push(' ');
        }
        text.push_str(COMPLETION_WORD);
    }
    text
}

fn non_streaming_response(plan: &InferencePlan, response_id: &str, created: u64) -> Response {
    let text = completion_text(plan.tokens_per_choice);
    let choices: Vec<Value> = (0..plan.choice_count)
        .map(|index| match plan.kind {
            InferenceKind::ChatCompletions => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": plan.finish_reason,
                "logprobs": null,
            }),
            InferenceKind::Completions => json!({
                "index": index,
                "text": text,
                "finish_reason": plan.finish_reason,
                "logprobs": null,
            }),
        })
        .collect();
    let object = match plan.kind {
        InferenceKind::ChatCompletions => "chat.completion",
        InferenceKind::Completions => "text_completion",
    };
    let mut body = json!({
        "id": response_id,
        "object": object,
        "created": created,
        "model": plan.model,
        "choices": choices,
    });
    if !plan.omit_usage {
        body["usage"] = plan.usage();
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The SSE events of a streamed response, in order, ending with `[DONE]`.
fn stream_events(plan: &InferencePlan, response_id: &str, created: u64) -> Vec<Bytes> {
    let object = match plan.kind {
        InferenceKind::ChatCompletions => "chat.completion.chunk",
        InferenceKind::Completions => "text_completion",
    };
    let chunk = |choices: Vec<Value>| {
        let mut chunk = json!({
            "id": response_id,
            "object": object,
            "created": created,
            "model": plan.model,
            "choices": choices,
        });
        if plan.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    };
    let choice = |index: u64, piece: &str, finish_reason: Option<&str>| match plan.kind {
        InferenceKind::ChatCompletions => json!({
            "index": index, "delta": {"content": piece},
            "logprobs": null, "finish_reason": finish_reason,
        }),
        InferenceKind::Completions => json!({
            "index": index, "text": piece,
            "logprobs": null, "finish_reason": finish_reason,
        }),
    };

    let mut chunks = Vec::new();
    if plan.kind == InferenceKind::ChatCompletions {
        for index in 0..plan.choice_count {
            chunks.push(chunk(vec![json!({
                "index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            })]));
        }
    }
    if plan.tokens_per_choice == 0 {
        for index in 0..plan.choice_count {
            chunks.push(chunk(vec![choice(index, "", Some(plan.finish_reason))]));
        }
    }
    for position in 0..plan.tokens_per_choice {
        let is_last_token = position + 1 == plan.tokens_per_choice;
        // The last piece drops its trailing space so the concatenated stream equals the
        // non-streamed text.
        let piece = if is_last_token { "tok" } else { "tok " };
        let finish_reason = is_last_token.then_some(plan.finish_reason);
        for index in 0..plan.choice_count {
            let mut event = chunk(vec![choice(index, piece, finish_reason)]);
            let last = is_last_token && index + 1 == plan.choice_count;
            if last && plan.usage_in_last_chunk && !plan.omit_usage {
                event["usage"] = plan.usage();
            }
            chunks.push(event);
        }
    }
    if plan.include_usage && !plan.omit_usage {
        let mut usage_chunk = chunk(Vec::new());
        usage_chunk["usage"] = plan.usage();
        chunks.push(usage_chunk);
    }

    let mut events: Vec<Bytes> = chunks
        .iter()
        .map(|chunk| Bytes::from(format!("data: {chunk}\n\n")))
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// One input of an embeddings request.
struct EmbeddingInput {
    tokens: u64,
    /// Derived from the input's content, so equal inputs get equal vectors.
    seed: u64,
}

impl EmbeddingInput {
    fn from_text(text: &str) -> EmbeddingInput {
        EmbeddingInput {
            tokens: count_words(text).max(1),
            seed: fnv1a(FNV_OFFSET_BASIS, text.as_bytes()),
        }
    }

    fn from_token_ids(token_ids: &[Value]) -> Result<EmbeddingInput, RequestRejection> {
        if token_ids.is_empty() {
            return Err(RequestRejection::bad_request(
                "`input` must not contain an empty token array",
            ));
        }
        let mut seed = fnv1a(FNV_OFFSET_BASIS, b"token ids");
        for token_id in token_ids {
            let Some(token_id) = token_id.as_u64() else {
                return Err(invalid_embedding_input());
            };
            seed = fnv1a(seed, &token_id.to_le_bytes());
        }
        Ok(EmbeddingInput {
            tokens: token_ids.len() as u64,
            seed,
        })
    }
}

fn invalid_embedding_input() -> RequestRejection {
    RequestRejection::bad_request(
        "`input` is required and must be a string, an array of strings, an array of token \
         ids or an array of token id arrays",
    )
}

/// The inputs of an embeddings request: `input` as a string, strings, one token id array
/// or token id arrays.
fn embedding_inputs(body: &Value) -> Result<Vec<EmbeddingInput>, RequestRejection> {
    let items = match body.get("input") {
        Some(Value::String(text)) => return Ok(vec![EmbeddingInput::from_text(text)]),
        Some(Value::Array(items)) => items,
        _ => return Err(invalid_embedding_input()),
    };
    if items.is_empty() {
        return Err(RequestRejection::bad_request(
            "`input` must not be an empty array",
        ));
    }
    if items.iter().all(Value::is_number) {
        return Ok(vec![EmbeddingInput::from_token_ids(items)?]);
    }
    if items.len() > MAXIMUM_EMBEDDING_INPUTS {
        return Err(RequestRejection::bad_request(format!(
            "`input` must have at most {MAXIMUM_EMBEDDING_INPUTS} items"
        )));
    }
    if items.iter().all(Value::is_string) {
        return Ok(items
            .iter()
            .map(|item| EmbeddingInput::from_text(item.as_str().unwrap_or_default()))
            .collect());
    }
    items
        .iter()
        .map(|item| match item {
            Value::Array(token_ids) => EmbeddingInput::from_token_ids(token_ids),
            _ => Err(invalid_embedding_input()),
        })
        .collect()
}

/// How embedding vectors are written: a JSON array of floats, or base64 of their
/// little-endian `f32` bytes (what the OpenAI SDKs ask for by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EmbeddingEncoding {
    Float,
    Base64,
}

fn embedding_encoding(body: &Value) -> Result<EmbeddingEncoding, RequestRejection> {
    match body.get("encoding_format") {
        None | Some(Value::Null) => Ok(EmbeddingEncoding::Float),
        Some(Value::String(format)) if format == "float" => Ok(EmbeddingEncoding::Float),
        Some(Value::String(format)) if format == "base64" => Ok(EmbeddingEncoding::Base64),
        Some(_) => Err(RequestRejection::bad_request(
            "`encoding_format` must be `float` or `base64`",
        )),
    }
}

fn embedding_dimensions(body: &Value) -> Result<u64, RequestRejection> {
    match optional_unsigned(body, "dimensions")? {
        None => Ok(DEFAULT_EMBEDDING_DIMENSIONS),
        Some(0) => Err(RequestRejection::bad_request(
            "`dimensions` must be at least 1",
        )),
        Some(dimensions) => Ok(dimensions.min(MAXIMUM_EMBEDDING_DIMENSIONS)),
    }
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a stable hash, unlike the standard library's, across Rust versions.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// SplitMix64's output function: spreads a counter into well-mixed bits.
fn split_mix(state: u64) -> u64 {
    let mut mixed = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// A deterministic unit vector for `seed`, like OpenAI's normalized embeddings.
fn embedding_vector(seed: u64, dimensions: u64) -> Vec<f32> {
    let mut vector: Vec<f32> = (0..dimensions)
        .map(|dimension| {
            let bits = split_mix(seed ^ dimension.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            // The top 24 bits, mapped onto [-1, 1).
            (bits >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = vector
        .iter()
        .map(|component| component * component)
        .sum::<f32>()
        .sqrt();
    if norm > 0.0 {
        for component in &mut vector {
            *component /= norm;
        }
    }
    vector
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let byte_at = |position: usize| u32::from(group.get(position).copied().unwrap_or(0));
        let triple = (byte_at(0) << 16) | (byte_at(1) << 8) | byte_at(2);
        for position in 0..4 {
            if position <= group.len() {
                let sextet = (triple >> (18 - 6 * position)) & 0x3f;
                encoded.push(char::from(ALPHABET[sextet as usize]));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// An embeddings response; typed so vectors serialize as short `f32` literals.
#[derive(Serialize)]
struct EmbeddingList<'request> {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: &'request str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<EmbeddingUsage>,
}

#[derive(Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: EncodedEmbedding,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EncodedEmbedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

fn respond_to_embeddings(
    shared: &Arc<SharedState>,
    body: &Value,
    behavior: &Behavior,
) -> Result<Response, RequestRejection> {
    let model = requested_model(shared, body)?;
    let inputs = embedding_inputs(body)?;
    let encoding = embedding_encoding(body)?;
    let dimensions = embedding_dimensions(body)?;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding_vector(input.seed, dimensions);
            let embedding = match encoding {
                EmbeddingEncoding::Float => EncodedEmbedding::Float(vector),
                EmbeddingEncoding::Base64 => {
                    let bytes: Vec<u8> = vector
                        .iter()
                        .flat_map(|component| component.to_le_bytes())
                        .collect();
                    EncodedEmbedding::Base64(base64_encode(&bytes))
                }
            };
            EmbeddingData {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let input_tokens = inputs
        .iter()
        .map(|input| input.tokens)
        .fold(0u64, u64::saturating_add);
    let prompt_tokens = reported_prompt_tokens(input_tokens, behavior);
    let usage = (!behavior.omit_usage).then_some(EmbeddingUsage {
        prompt_tokens,
        total_tokens: prompt_tokens,
    });
    let response_body = EmbeddingList {
        object: "list",
        data,
        model,
        usage,
    };
    Ok((StatusCode::OK, axum::Json(response_body)).into_response())
}

/// Everything needed to answer one validated Responses API request.
struct ResponsesPlan {
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    stream: bool,
    omit_usage: bool,
    input_tokens: u64,
    output_tokens: u64,
    /// `max_output_tokens` cut the output short: the response is `incomplete`.
    cut_short: bool,
    pacing: StreamPacing,
}

impl ResponsesPlan {
    fn usage(&self) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens.saturating_add(self.output_tokens),
        })
    }

    /// Status of the finished response and of its message item.
    fn final_status(&self) -> &'static str {
        if self.cut_short {
            "incomplete"
        } else {
            "completed"
        }
    }
}

/// Words of a Responses API `input`: a string, or input items where each message item
/// counts 1 plus the words of its text (a string, or `input_text` / `output_text` parts);
/// other items (function call outputs, references, ...) count nothing.
fn responses_input_words(body: &Value) -> Result<u64, RequestRejection> {
    let items = match body.get("input") {
        Some(Value::String(text)) => return Ok(count_words(text)),
        Some(Value::Array(items)) => items,
        _ => {
            return Err(RequestRejection::bad_request(
                "`input` is required and must be a string or an array of input items",
            ))
        }
    };
    let mut words = 0u64;
    for item in items {
        let Some(item) = item.as_object() else {
            return Err(RequestRejection::bad_request(
                "`input` items must be objects",
            ));
        };
        let is_message = match item.get("type") {
            None | Some(Value::Null) => item.contains_key("role"),
            Some(item_type) => item_type.as_str() == Some("message"),
        };
        if !is_message {
            continue;
        }
        words = words.saturating_add(1);
        match item.get("content") {
            Some(Value::String(text)) => words = words.saturating_add(count_words(text)),
            Some(Value::Array(parts)) => {
                for part in parts {
                    let part_type = part.get("type").and_then(Value::as_str);
                    if !matches!(part_type, Some("input_text") | Some("output_text")) {
                        continue;
                    }
                    let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                    words = words.saturating_add(count_words(text));
                }
            }
            _ => {}
        }
    }
    Ok(words)
}

fn plan_responses(
    shared: &SharedState,
    body: &Value,
    behavior: &Behavior,
) -> Result<ResponsesPlan, RequestRejection> {
    let model = requested_model(shared, body)?;
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            return Err(RequestRejection::bad_request(
                "`instructions` must be a string",
            ))
        }
    };
    let input_words = responses_input_words(body)?;
    let max_output_tokens = optional_unsigned(body, "max_output_tokens")?;
    let (output_tokens, cut_short) = generated_tokens(max_output_tokens, behavior);
    let instruction_words = instructions.as_deref().map_or(0, count_words);
    Ok(ResponsesPlan {
        model: model.to_string(),
        instructions,
        max_output_tokens,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        omit_usage: behavior.omit_usage,
        input_tokens: reported_prompt_tokens(
            instruction_words.saturating_add(input_words),
            behavior,
        ),
        output_tokens,
        cut_short,
        pacing: StreamPacing::from_behavior(behavior),
    })
}

/// Identifiers and timestamp of one Responses API response.
struct ResponseIdentity {
    response_id: String,
    message_id: String,
    created_at: u64,
}

/// A `response` object; `usage: None` leaves the field out.
fn response_object(
    plan: &ResponsesPlan,
    identity: &ResponseIdentity,
    status: &str,
    output: Vec<Value>,
    usage: Option<Value>,
) -> Value {
    let incomplete_details = if status == "incomplete" {
        json!({"reason": "max_output_tokens"})
    } else {
        Value::Null
    };
    let mut response = json!({
        "id": identity.response_id,
        "object": "response",
        "created_at": identity.created_at,
        "status": status,
        "error": null,
        "incomplete_details": incomplete_details,
        "instructions": plan.instructions,
        "max_output_tokens": plan.max_output_tokens,
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "metadata": {},
    });
    if let Some(usage) = usage {
        response["usage"] = usage;
    }
    response
}

fn output_message(identity: &ResponseIdentity, status: &str, content: Vec<Value>) -> Value {
    json!({
        "type": "message",
        "id": identity.message_id,
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// The finished response: the non-streamed body, and the final streamed event's
/// `response`.
fn finished_response(plan: &ResponsesPlan, identity: &ResponseIdentity) -> Value {
    let text = completion_text(plan.output_tokens);
    let message = output_message(identity, plan.final_status(), vec![output_text_part(&text)]);
    let usage = (!plan.omit_usage).then(|| plan.usage());
    response_object(plan, identity, plan.final_status(), vec![message], usage)
}

/// The SSE events of a streamed Responses API response, each `event: <type>` with its
/// `sequence_number`, ending with `response.completed` (or `response.incomplete`) and no
/// `[DONE]`.
fn responses_stream_events(plan: &ResponsesPlan, identity: &ResponseIdentity) -> Vec<Bytes> {
    let in_progress = response_object(plan, identity, "in_progress", Vec::new(), Some(Value::Null));
    let item_id = identity.message_id.as_str();
    let text = completion_text(plan.output_tokens);
    let mut events: Vec<(&str, Value)> = vec![
        ("response.created", json!({"response": in_progress})),
        ("response.in_progress", json!({"response": in_progress})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": output_message(identity, "in_progress", Vec::new())}),
        ),
        (
            "response.content_part.added",
            json!({
                "item_id": item_id, "output_index": 0, "content_index": 0,
                "part": output_text_part(""),
            }),
        ),
    ];
    for position in 0..plan.output_tokens {
        // The last piece drops its trailing space so the deltas concatenate to the text.
        let piece = if position + 1 == plan.output_tokens {
            COMPLETION_WORD.to_string()
        } else {
            format!("{COMPLETION_WORD} ")
        };
        events.push((
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push((
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
    ));
    events.push((
        "response.content_part.done",
        json!({
            "item_id": item_id, "output_index": 0, "content_index": 0,
            "part": output_text_part(&text),
        }),
    ));
    events.push((
        "response.output_item.done",
        json!({
            "output_index": 0,
            "item": output_message(identity, plan.final_status(), vec![output_text_part(&text)]),
        }),
    ));
    let final_event = if plan.cut_short {
        "response.incomplete"
    } else {
        "response.completed"
    };
    events.push((
        final_event,
        json!({"response": finished_response(plan, identity)}),
    ));

    events
        .into_iter()
        .enumerate()
        .map(|(sequence_number, (event_type, mut payload))| {
            payload["type"] = json!(event_type);
            payload["sequence_number"] = json!(sequence_number);
            Bytes::from(format!("event: {event_type}\ndata: {payload}\n\n"))
        })
        .collect()
}

fn respond_to_responses(
    shared: &Arc<SharedState>,
    body: &Value,
    behavior: &Behavior,
) -> Result<Response, RequestRejection> {
    let plan = plan_responses(shared, body, behavior)?;
    let response_number = shared.next_response_number();
    let identity = ResponseIdentity {
        response_id: format!("resp-{response_number}"),
        message_id: format!("msg-{response_number}"),
        created_at: unix_seconds_now(),
    };
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        // As OpenAI does: queued at once, without usage; the output (and
        // its usage) is fetched later with GET /v1/responses/{id}.
        let queued = response_object(&plan, &identity, "queued", Vec::new(), None);
        return Ok((StatusCode::OK, axum::Json(queued)).into_response());
    }
    if plan.stream {
        let events = responses_stream_events(&plan, &identity);
        return Ok(sse_response(Arc::clone(shared), events, plan.pacing));
    }
    let response_body = finished_response(&plan, &identity);
    Ok((StatusCode::OK, axum::Json(response_body)).into_response())
}

/// Streams `events` as an SSE body, paced and possibly broken as `pacing` says.
fn sse_response(shared: Arc<SharedState>, events: Vec<Bytes>, pacing: StreamPacing) -> Response {
    let mut body_items: Vec<Result<Bytes, std::io::Error>> = events.into_iter().map(Ok).collect();
    if let Some(fail_after_events) = pacing.fail_after_events {
        let kept_events = usize::try_from(fail_after_events).unwrap_or(usize::MAX);
        if kept_events < body_items.len() {
            body_items.truncate(kept_events);
            // A body error makes hyper abort the response: no terminating chunk on
            // HTTP/1.1, a stream reset on HTTP/2.
            body_items.push(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("fake neuron broke the stream after {kept_events} events"),
            )));
        }
    }
    // Capacity 1 keeps the producer in step with the client, so a disconnect is noticed
    // while the stream is still being produced rather than after it was fully buffered.
    let (item_sender, item_receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(produce_stream_events(
        shared,
        body_items,
        pacing.chunk_delay,
        pacing.linger_after_end,
        item_sender,
    ));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ReceiverStream::new(item_receiver)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Sends the body items one by one, `chunk_delay` apart; an `Err` item, which breaks the
/// stream, is sent after at least `STREAM_BREAK_FLUSH_PAUSE`.
async fn produce_stream_events(
    shared: Arc<SharedState>,
    body_items: Vec<Result<Bytes, std::io::Error>>,
    chunk_delay: Duration,
    linger_after_end: Duration,
    item_sender: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    for (position, body_item) in body_items.into_iter().enumerate() {
        let pause = if body_item.is_err() {
            chunk_delay.max(STREAM_BREAK_FLUSH_PAUSE)
        } else if position > 0 {
            chunk_delay
        } else {
            Duration::ZERO
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = item_sender.closed() => {
                    record_cancellation(&shared);
                    return;
                }
            }
        }
        if item_sender.send(body_item).await.is_err() {
            record_cancellation(&shared);
            return;
        }
    }
    // The body ends when the sender is dropped: after the linger, or at
    // once when the client leaves first.
    if !linger_after_end.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(linger_after_end) => {}
            _ = item_sender.closed() => {}
        }
    }
}

fn record_cancellation(shared: &SharedState) {
    shared.cancellations.fetch_add(1, Ordering::SeqCst);
    tracing::debug!("stream cancelled by client");
}

/// Whether `x-request-id` is absent or a UUID as Python's `uuid.UUID`
/// reads one (32 hexadecimal digits; hyphens, braces and a `urn:uuid:`
/// prefix aside).
fn request_id_is_uuid(headers: &HeaderMap) -> bool {
    let Some(id) = headers.get("x-request-id") else {
        return true;
    };
    let Ok(id) = id.to_str() else {
        return false;
    };
    let id = id.strip_prefix("urn:uuid:").unwrap_or(id);
    let id = id.trim_start_matches('{').trim_end_matches('}');
    let digits: Vec<char> = id.chars().filter(|c| *c != '-').collect();
    digits.len() == 32 && digits.iter().all(char::is_ascii_hexdigit)
}

/// TGI's `GET /info`.
async fn tgi_info_handler(State(shared): State<Arc<SharedState>>) -> Response {
    if shared.family != Some(LimitRule::Tgi) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let model = shared.served_models.first().cloned().unwrap_or_default();
    axum::Json(json!({"model_id": model, "router": "text-generation-router", "version": "3.0.0"}))
        .into_response()
}

/// Ollama's `GET /api/version`.
async fn ollama_version_handler(State(shared): State<Arc<SharedState>>) -> Response {
    if shared.family != Some(LimitRule::Ollama) {
        return StatusCode::NOT_FOUND.into_response();
    }
    axum::Json(json!({"version": "0.5.7"})).into_response()
}

/// llama-cpp-python's `POST /extras/tokenize/count`: the words of `input`
/// (the fake's tokens) and the BOS token its tokenizer adds.
async fn token_count_handler(State(shared): State<Arc<SharedState>>, raw_body: Bytes) -> Response {
    if shared.family != Some(LimitRule::LlamaCpp) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(input) = serde_json::from_slice::<Value>(&raw_body)
        .ok()
        .and_then(|body| body.get("input")?.as_str().map(count_words))
    else {
        return openai_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "`input` must be a string",
            None,
        );
    };
    axum::Json(json!({"count": input + 1})).into_response()
}

async fn list_models_handler(State(shared): State<Arc<SharedState>>) -> Response {
    let loaded = lock_ignoring_poison(&shared.node).loaded();
    let models: Vec<Value> = loaded
        .iter()
        .map(|model| {
            let owner = shared
                .family
                .map_or("fake-neuron", |f| f.models_owner(model));
            json!({"id": model, "object": "model", "created": 0, "owned_by": owner})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": models})).into_response()
}

async fn node_handler(State(shared): State<Arc<SharedState>>) -> Response {
    axum::Json(lock_ignoring_poison(&shared.node).state()).into_response()
}

async fn load_handler(
    State(shared): State<Arc<SharedState>>,
    Path(model_id): Path<String>,
    body: Bytes,
) -> Response {
    let request: node::LoadRequest = if body.is_empty() {
        node::LoadRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid load request: {error}"),
                    None,
                )
            }
        }
    };
    let loaded = lock_ignoring_poison(&shared.node).load(&model_id, &request);
    match loaded {
        Ok(entry) => {
            if entry.status == node::ModelStatus::Loading {
                let (shared, model) = (Arc::clone(&shared), model_id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(request.load_ms)).await;
                    lock_ignoring_poison(&shared.node).finish_load(&model);
                });
            }
            (StatusCode::ACCEPTED, axum::Json(entry)).into_response()
        }
        Err(error @ node::LoadError::NoSuchGpu { .. }) => {
            openai_error(StatusCode::BAD_REQUEST, error.to_string(), None)
        }
        Err(error) => openai_error(
            StatusCode::INSUFFICIENT_STORAGE,
            error.to_string(),
            Some("insufficient_vram"),
        ),
    }
}

async fn unload_handler(
    State(shared): State<Arc<SharedState>>,
    Path(model_id): Path<String>,
) -> Response {
    if lock_ignoring_poison(&shared.node).unload(&model_id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        openai_error(
            StatusCode::NOT_FOUND,
            format!("model {model_id} is not on this node"),
            Some("model_not_found"),
        )
    }
}

async fn model_endpoint_handler(
    State(shared): State<Arc<SharedState>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(url) = shared.endpoints.get(&model_id) {
        return axum::Json(json!({"url": url})).into_response();
    }
    if !shared.serves_model(&model_id) {
        return model_not_found(&model_id).into_response();
    }
    // HTTP/2 requests carry the authority in the URI instead of a Host header.
    let host = header_text(&headers, header::HOST.as_str())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|authority| authority.to_string()));
    let Some(host) = host else {
        return openai_error(StatusCode::BAD_REQUEST, "missing host header", None);
    };
    axum::Json(json!({"url": format!("http://{host}")})).into_response()
}

fn counters_json(shared: &SharedState) -> Value {
    json!({
        "hits": shared.hits.load(Ordering::SeqCst),
        "cancellations": shared.cancellations.load(Ordering::SeqCst),
    })
}

async fn hits_handler(State(shared): State<Arc<SharedState>>) -> Response {
    axum::Json(counters_json(&shared)).into_response()
}

async fn set_behavior_handler(State(shared): State<Arc<SharedState>>, raw_body: Bytes) -> Response {
    let behavior = match serde_json::from_slice::<Behavior>(&raw_body) {
        Ok(behavior) => behavior,
        Err(error) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("invalid behavior: {error}"),
                None,
            )
        }
    };
    *lock_ignoring_poison(&shared.default_behavior) = behavior.clone();
    axum::Json(behavior).into_response()
}

async fn reset_handler(State(shared): State<Arc<SharedState>>) -> Response {
    shared.hits.store(0, Ordering::SeqCst);
    shared.cancellations.store(0, Ordering::SeqCst);
    *lock_ignoring_poison(&shared.default_behavior) = Behavior::default();
    *lock_ignoring_poison(&shared.last_request) = None;
    axum::Json(counters_json(&shared)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_encodes_with_padding() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(&[0xff, 0xfe, 0xfd]), "//79");
    }
}
