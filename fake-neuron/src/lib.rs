//! `allot-fake-neuron` is a test double for an OpenAI-compatible inference server
//! (the "neuron" behind allot's budget enforcement). It mimics the response shapes of
//! vLLM / llama.cpp servers for `/v1/chat/completions`, `/v1/completions` and
//! `/v1/models`, with deterministic token accounting, real SSE streaming, and knobs
//! (delays, injected failures, missing or inflated usage) that end-to-end tests and the
//! demo use to exercise allot's reservation and settlement paths. It also counts hits and
//! client cancellations so tests can assert on what actually reached the neuron.

#![forbid(unsafe_code)]

use std::convert::Infallible;
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
use tokio_stream::StreamExt;

const DEFAULT_MODEL_NAME: &str = "fake-model";
const DEFAULT_COMPLETION_TOKEN_CAP: u64 = 16;
const COMPLETION_WORD: &str = "tok";
// Bounds the work a single request can ask for, so hostile input cannot exhaust memory.
const MAXIMUM_CHOICE_COUNT: u64 = 128;
const NEURON_ID_HEADER: &str = "x-fake-neuron-id";

/// Static configuration of a fake neuron.
#[derive(Clone, Debug, Default)]
pub struct FakeConfig {
    /// Models served; empty means `["fake-model"]`.
    pub models: Vec<String>,
    /// Identifier echoed in the `x-fake-neuron-id` response header of inference responses.
    pub neuron_id: String,
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
    served_models: Vec<String>,
    neuron_id: String,
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
                served_models,
                neuron_id: config.neuron_id,
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
            .route("/v1/models", get(list_models_handler))
            .route("/models/{model_id}/endpoint", get(model_endpoint_handler))
            .route("/_fake/hits", get(hits_handler))
            .route("/_fake/behavior", post(set_behavior_handler))
            .route("/_fake/reset", post(reset_handler))
            .route("/health", get(|| async { "ok" }))
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
        behavior
    }

    fn serves_model(&self, model: &str) -> bool {
        self.served_models.iter().any(|served| served == model)
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

/// Everything needed to answer one validated inference request.
struct InferencePlan {
    kind: InferenceKind,
    model: String,
    stream: bool,
    include_usage: bool,
    omit_usage: bool,
    choice_count: u64,
    tokens_per_choice: u64,
    finish_reason: &'static str,
    prompt_tokens: u64,
    chunk_delay: Duration,
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

fn plan_inference(
    shared: &SharedState,
    kind: InferenceKind,
    body: &Value,
    behavior: &Behavior,
) -> Result<InferencePlan, RequestRejection> {
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
    let requested_maximum = match optional_unsigned(body, "max_completion_tokens")? {
        Some(maximum) => Some(maximum),
        None => optional_unsigned(body, "max_tokens")?,
    };
    let tokens_per_choice = behavior.completion_tokens.unwrap_or_else(|| {
        requested_maximum
            .unwrap_or(DEFAULT_COMPLETION_TOKEN_CAP)
            .min(DEFAULT_COMPLETION_TOKEN_CAP)
    });
    let finish_reason = match requested_maximum {
        Some(maximum) if tokens_per_choice >= maximum => "length",
        _ => "stop",
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(InferencePlan {
        kind,
        model: model.to_string(),
        stream,
        include_usage,
        omit_usage: behavior.omit_usage,
        choice_count,
        tokens_per_choice,
        finish_reason,
        prompt_tokens: prompt_words
            .max(1)
            .saturating_add(behavior.overreport_prompt_tokens),
        chunk_delay: Duration::from_millis(behavior.chunk_delay_ms),
    })
}

async fn chat_completions_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    handle_inference(shared, InferenceKind::ChatCompletions, headers, raw_body).await
}

async fn completions_handler(
    State(shared): State<Arc<SharedState>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    handle_inference(shared, InferenceKind::Completions, headers, raw_body).await
}

async fn handle_inference(
    shared: Arc<SharedState>,
    kind: InferenceKind,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    let parsed_body = serde_json::from_slice::<Value>(&raw_body);
    let recorded_body = match &parsed_body {
        Ok(body) => body.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&raw_body).into_owned()),
    };
    shared.record_request(kind.path(), recorded_body, &headers);
    let behavior = shared.effective_behavior(&headers);
    tracing::debug!(path = kind.path(), ?behavior, "inference request");

    if behavior.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.delay_ms)).await;
    }
    let mut response = respond_to_inference(&shared, kind, parsed_body, &behavior);
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
    kind: InferenceKind,
    parsed_body: Result<Value, serde_json::Error>,
    behavior: &Behavior,
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
    let plan = match plan_inference(shared, kind, &body, behavior) {
        Ok(plan) => plan,
        Err(rejection) => return rejection.into_response(),
    };
    let response_id = format!("{}-{}", kind.id_prefix(), shared.next_response_number());
    let created = unix_seconds_now();
    if plan.stream {
        return streaming_response(Arc::clone(shared), plan, response_id, created);
    }
    non_streaming_response(&plan, &response_id, created)
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
            chunks.push(chunk(vec![choice(index, piece, finish_reason)]));
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

fn streaming_response(
    shared: Arc<SharedState>,
    plan: InferencePlan,
    response_id: String,
    created: u64,
) -> Response {
    let events = stream_events(&plan, &response_id, created);
    // Capacity 1 keeps the producer in step with the client, so a disconnect is noticed
    // while the stream is still being produced rather than after it was fully buffered.
    let (event_sender, event_receiver) = mpsc::channel::<Bytes>(1);
    tokio::spawn(produce_stream_events(
        shared,
        events,
        plan.chunk_delay,
        event_sender,
    ));
    let body_stream = ReceiverStream::new(event_receiver).map(Ok::<Bytes, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body_stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn produce_stream_events(
    shared: Arc<SharedState>,
    events: Vec<Bytes>,
    chunk_delay: Duration,
    event_sender: mpsc::Sender<Bytes>,
) {
    for (position, event) in events.into_iter().enumerate() {
        if position > 0 && !chunk_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(chunk_delay) => {}
                _ = event_sender.closed() => {
                    record_cancellation(&shared);
                    return;
                }
            }
        }
        if event_sender.send(event).await.is_err() {
            record_cancellation(&shared);
            return;
        }
    }
}

fn record_cancellation(shared: &SharedState) {
    shared.cancellations.fetch_add(1, Ordering::SeqCst);
    tracing::debug!("stream cancelled by client");
}

async fn list_models_handler(State(shared): State<Arc<SharedState>>) -> Response {
    let models: Vec<Value> = shared
        .served_models
        .iter()
        .map(|model| json!({"id": model, "object": "model", "created": 0, "owned_by": "fake-neuron"}))
        .collect();
    axum::Json(json!({"object": "list", "data": models})).into_response()
}

async fn model_endpoint_handler(
    State(shared): State<Arc<SharedState>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
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
