//! The OpenAI-compatible HTTP front of the agent. For each request:
//! authenticate (by key hash), parse only what admission needs, reserve an
//! upper bound of its cost from the local allowance (asking the coordinator
//! only when the slice is short), forward to the neuron, and settle at the
//! usage the neuron reports. Nothing reaches the neuron unless it was
//! admitted, and every admitted request settles exactly once, also when the
//! client goes away mid-stream.

use crate::allowance::{Admission, CachedDeny, DenyKind, Reservation};
use crate::api_error::ApiError;
use crate::concurrency::{Full, Slot};
use crate::keys::{KeyInfo, Known};
use crate::upstream::LookupError;
use crate::usage::{self, Reported, SseScanner};
use crate::AgentState;
use allot::clock;
use allot::key::{KeyHash, Purpose};
use allot::pb;
use allot::reservation::{self, Operation, RequestFacts};
use allot::tariff::{Price, TariffBook};
use allot::{Amounts, Unit};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing::Instrument;

pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// Header names the hot path reads or writes, parsed once.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
const TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");
const TRACESTATE: header::HeaderName = header::HeaderName::from_static("tracestate");
const X_ALLOT_BATCH_ID: header::HeaderName = header::HeaderName::from_static("x-allot-batch-id");
const X_ALLOT_COMPLETION_WINDOW: header::HeaderName =
    header::HeaderName::from_static("x-allot-completion-window");
const X_ALLOT_BATCH_CREATED_AT: header::HeaderName =
    header::HeaderName::from_static("x-allot-batch-created-at");

pub fn router(state: Arc<AgentState>) -> axum::Router {
    let mut router = axum::Router::new();
    for operation in Operation::ALL {
        router = router.route(
            operation.path(),
            axum::routing::post(
                move |State(state): State<Arc<AgentState>>, request: Request<Body>| {
                    handle(state, operation, request)
                },
            ),
        );
    }
    router
        .route("/v1/models", axum::routing::get(models))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(ready))
        .fallback(other_path)
        .with_state(state)
}

/// Paths allot does not meter: 404, unless `pass_through` lists the
/// method and path; then forwarded for a valid key, never charged.
async fn other_path(State(state): State<Arc<AgentState>>, request: Request<Body>) -> Response {
    let allowed = state
        .pass_through
        .iter()
        .any(|rule| rule.allows(request.method(), request.uri().path()));
    if !allowed {
        return ApiError::not_found(format!(
            "unknown path {} {}; allot serves /v1/chat/completions, /v1/completions, \
             /v1/embeddings, /v1/responses and /v1/models",
            request.method(),
            request.uri().path()
        ))
        .into_response();
    }
    match pass_through(&state, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn pass_through(state: &AgentState, request: Request<Body>) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let key = authenticate(state, &parts.headers).await?;
    // The body first: a slow one never holds a concurrency slot.
    let bytes = read_body(state, body).await?;
    // Uncharged, but it occupies the neuron like any other request.
    let slot = enter(state, &key.key_id)?;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut upstream = Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{path}", state.neuron.upstreams.default_url()));
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .body(http_body_util::Full::new(bytes))
        .map_err(|e| ApiError::bad_request(format!("cannot forward this request: {e}"), None))?;
    metrics::counter!("allot_agent_pass_through_total").increment(1);
    let (mut parts, body) = neuron_request(state, upstream).await?.into_parts();
    for hop in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        parts.headers.remove(hop);
    }
    // The slot is held until the body has been relayed (or dropped).
    let body = body.map_frame(move |frame| {
        let _held = &slot;
        frame
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Ready when a session with the coordinator is up (before that, only
/// keys already cached with a valid lease could be served) and the usage
/// spool admits requests; otherwise 503 with what is wrong.
async fn ready(State(state): State<Arc<AgentState>>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if let Some(refusal) = state.coordinator.link.refusal() {
        return unavailable(refusal);
    }
    if let Some(refusal) = state.records.durability.refusal() {
        return unavailable(ApiError::from(refusal).message);
    }
    if !state.coordinator.link.is_connected() {
        return unavailable("not connected to a coordinator".into());
    }
    (StatusCode::OK, "ready").into_response()
}

async fn handle(state: Arc<AgentState>, operation: Operation, request: Request<Body>) -> Response {
    let started = Instant::now();
    let path = operation.path();
    // One server span per request (OpenTelemetry HTTP and GenAI
    // conventions); never the key's secret, only its id.
    let span = tracing::info_span!(
        "POST",
        otel.name = operation.span_name(),
        otel.kind = "server",
        http.request.method = "POST",
        url.path = path,
        http.response.status_code = tracing::field::Empty,
        gen_ai.operation.name = operation.otel_name(),
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        allot.key_id = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    crate::trace::continue_from(&span, request.headers());
    let request_id = RequestId::of(request.headers());
    // The key, once authenticated: its x-ratelimit-* headers go on every
    // response to it, refusals and neuron errors included.
    let (outcome, key) = async {
        // Durable before delivered: nothing is admitted that the spool
        // could not record.
        if let Some(refusal) = state.records.durability.refusal() {
            return (Err(ApiError::from(refusal)), None);
        }
        match authenticate(&state, request.headers()).await {
            Err(error) => (Err(error), None),
            Ok(key) => {
                let outcome =
                    admit_and_forward(&state, operation, request, started, &request_id, &key).await;
                (outcome, Some(key))
            }
        }
    }
    .instrument(span.clone())
    .await;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            span.record("error.type", error.code_label());
            error.into_response()
        }
    };
    span.record("http.response.status_code", response.status().as_u16());
    let headers = response.headers_mut();
    headers.insert(X_REQUEST_ID, request_id.header);
    if let Some(key) = key {
        add_rate_limit_headers(&state, &key.key_id, headers);
    }
    response
}

/// The bearer token's key, looked up in the cache or on the coordinator.
async fn authenticate(state: &AgentState, headers: &HeaderMap) -> Result<Arc<KeyInfo>, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_api_key(
                "you didn't provide an API key: send Authorization: Bearer <key>",
            )
        })?;
    let hash = KeyHash::of_secret(secret);
    let key = match state.coordinator.keys.get(&hash, Instant::now()) {
        Known::Key(key) => Some(key),
        Known::Unknown => None,
        Known::Miss => state
            .coordinator
            .link
            .lookup(hash, state.config.allowance_wait())
            .await
            .map_err(|_| {
                ApiError::unavailable("cannot reach the coordinator to check the API key", 1)
            })?
            .map(Arc::new),
    };
    match key {
        Some(key) if key.revoked => Err(ApiError::invalid_api_key("the API key was revoked")),
        Some(key) => Ok(key),
        None => Err(ApiError::invalid_api_key("incorrect API key provided")),
    }
}

/// Takes a place in the agent's and the key's concurrency bounds, or
/// refuses: 503 when the agent is full, 429 when the key is.
fn enter(state: &AgentState, key_id: &str) -> Result<Slot, ApiError> {
    state
        .neuron
        .in_flight
        .enter(key_id)
        .map_err(|full| match full {
            Full::Agent(max) => ApiError::unavailable(
                format!("this agent is serving its maximum of {max} concurrent requests"),
                1,
            ),
            Full::Key(max) => ApiError::rate_limited(
                format!("rate limit reached: at most {max} concurrent requests per key"),
                1,
            ),
        })
}

/// Past the size limit, the rest of a body is read and dropped, up to this
/// much and for at most [`DRAIN_TIME`], so that the client, still sending,
/// reads the 413 instead of a broken connection (nginx's lingering close).
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads the whole request body within `body_read_timeout_ms` of the
/// headers: a client trickling its body gets 408 instead of holding the
/// connection.
async fn read_body(state: &AgentState, body: Body) -> Result<Bytes, ApiError> {
    let timeout = state.config.body_read_timeout();
    match tokio::time::timeout(timeout, read_body_unbounded(state, body)).await {
        Ok(read) => read,
        Err(_) => {
            metrics::counter!("allot_agent_body_read_timeouts_total").increment(1);
            Err(ApiError::body_timeout(timeout))
        }
    }
}

async fn read_body_unbounded(state: &AgentState, mut body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    // A body that arrives in one frame (the common case) is kept as it
    // came; only one in several frames is copied together.
    let mut first: Option<Bytes> = None;
    let mut collected = bytes::BytesMut::new();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!("cannot read the request body: {e}"), None)
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if length + data.len() > limit {
            let mut drained = length + data.len();
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while drained < DRAIN_BYTES {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            drained += frame.data_ref().map_or(0, |d| d.len());
                        }
                        _ => break,
                    }
                }
            })
            .await;
            return Err(ApiError::too_large(limit));
        }
        length += data.len();
        match first.take() {
            None if collected.is_empty() => first = Some(data),
            None => collected.extend_from_slice(&data),
            Some(earlier) => {
                collected.reserve(earlier.len() + data.len());
                collected.extend_from_slice(&earlier);
                collected.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| collected.freeze()))
}

fn deny_error(deny: &CachedDeny, now: Instant) -> ApiError {
    match deny.kind {
        DenyKind::InsufficientQuota => ApiError::insufficient_quota(format!(
            "you exceeded your current quota: {}",
            deny.message
        )),
        DenyKind::RateLimited => {
            let wait = deny.until.saturating_duration_since(now);
            ApiError::rate_limited(
                format!("rate limit reached: {}", deny.message),
                wait.as_millis().div_ceil(1000) as u64,
            )
        }
        DenyKind::HeldElsewhere => ApiError::unavailable(
            "the key's remaining budget is held by other agents; retry shortly",
            deny.until
                .saturating_duration_since(now)
                .as_millis()
                .div_ceil(1000)
                .max(1) as u64,
        ),
        DenyKind::KeyRevoked => ApiError::invalid_api_key("the API key was revoked"),
        DenyKind::UnknownKey => ApiError::invalid_api_key("incorrect API key provided"),
    }
}

/// What admission decided for one request.
struct Plan {
    reservation: Reservation,
    /// Completion tokens per choice the request may produce.
    completion: u64,
}

/// Reserves the request's upper bound, waiting briefly for a grant when the
/// slice is short. When the client set no `max_tokens`, the completion is
/// the smaller of the configured default and what the allowance pays for.
async fn reserve(
    state: &AgentState,
    key: &KeyInfo,
    facts: &RequestFacts,
    default_max_tokens: u64,
    price: Price<'_>,
) -> Result<Plan, ApiError> {
    let fixed = facts.max_completion_tokens;
    let most = fixed.unwrap_or(default_max_tokens);
    let least = fixed.unwrap_or(1);
    let cost_of = |completion: u64| {
        let completion_total = completion.saturating_mul(facts.choices);
        Amounts::request(
            facts.token_bound(completion),
            price.cost(facts.prompt_tokens_bound, completion_total),
        )
    };
    let min_need = cost_of(least);
    let max_need = cost_of(most);
    let attempt = |now: Instant| {
        let mut chosen = most;
        let admission = state.coordinator.table.try_reserve_with(
            &key.key_id,
            &min_need,
            |usable| {
                chosen = affordable_completion(usable, facts, price, least, most);
                cost_of(chosen)
            },
            now,
        );
        (admission, chosen)
    };
    let deadline = Instant::now() + state.config.allowance_wait();
    // Most requests fit the slice: the first attempt is made without the
    // key's wake-up. One that falls short registers for it and looks
    // again before it waits, so a grant arriving in between is not missed.
    let mut registered = false;
    loop {
        let now = Instant::now();
        let notify = registered.then(|| state.coordinator.table.notify_of(&key.key_id, now));
        let notified = notify.as_deref().map(tokio::sync::Notify::notified);
        tokio::pin!(notified);
        if let Some(notified) = notified.as_mut().as_pin_mut() {
            notified.enable();
        }
        let (admission, chosen) = attempt(now);
        match admission {
            Admission::Reserved(reservation) => {
                maybe_refill(state, &key.key_id);
                return Ok(Plan {
                    reservation,
                    completion: chosen,
                });
            }
            Admission::Denied(deny) => return Err(deny_error(&deny, now)),
            Admission::Short {
                shortfall,
                send_ask,
            } => {
                if send_ask {
                    let want = want_for(state, &key.key_id, &max_need, now);
                    if !state.coordinator.link.ask(&key.key_id, &shortfall, &want) {
                        state.coordinator.table.ask_failed(&key.key_id);
                        return Err(ApiError::unavailable(
                            "the coordinator is unreachable and no allowance lease is valid",
                            2,
                        ));
                    }
                }
                let Some(notified) = notified.as_pin_mut() else {
                    registered = true;
                    continue;
                };
                if now >= deadline {
                    return Err(ApiError::unavailable("no allowance was granted in time", 1));
                }
                let waited = tokio::time::timeout_at(deadline.into(), notified)
                    .instrument(tracing::info_span!("allowance.wait"))
                    .await;
                if waited.is_err() {
                    state.coordinator.table.ask_failed(&key.key_id);
                    return Err(ApiError::unavailable(
                        if state.coordinator.link.is_connected() {
                            "no allowance was granted in time"
                        } else {
                            "the coordinator is unreachable and no allowance lease is valid"
                        },
                        1,
                    ));
                }
            }
        }
    }
}

/// What to ask for: the key's recent demand over one refresh interval, or,
/// before there is any, `grant_multiplier` requests like this one; never
/// less than this request.
fn want_for(state: &AgentState, key_id: &str, need: &Amounts, now: Instant) -> Amounts {
    let demand = state
        .coordinator
        .table
        .demand(key_id, state.config.refresh_interval(), now);
    let base = if demand.is_zero() {
        scaled(need, state.config.grant_multiplier)
    } else {
        demand
    };
    let mut want = base;
    for unit in Unit::ALL {
        want.set(unit, Some(base.value(unit).max(need.value(unit))));
    }
    want
}

/// `need × multiplier` in every unit.
fn scaled(need: &Amounts, multiplier: u64) -> Amounts {
    let mut out = *need;
    for unit in Unit::ALL {
        if let Some(v) = out.0[unit.index()].as_mut() {
            *v *= Decimal::from(multiplier.max(1));
        }
    }
    out
}

/// Completion tokens per choice that `usable` pays for, within
/// `[least, most]` (`least` when even that does not fit: the caller only
/// calls this once `least` fits).
fn affordable_completion(
    usable: &Amounts,
    facts: &RequestFacts,
    price: Price<'_>,
    least: u64,
    most: u64,
) -> u64 {
    let mut completion = most;
    let choices = Decimal::from(facts.choices.max(1));
    if let Some(tokens) = usable.get(Unit::Tokens) {
        let room = (tokens - Decimal::from(facts.prompt_tokens_bound)) / choices;
        completion = completion.min(allot::amounts::decimal_to_u64(room.floor()));
    }
    if let (Some(credits), Price::Tariff(tariff)) = (usable.get(Unit::Credits), price) {
        if tariff.output_price > Decimal::ZERO {
            let prompt_cost = Decimal::from(facts.prompt_tokens_bound) * tariff.input_price;
            let room = (credits - prompt_cost) / (tariff.output_price * choices);
            completion = completion.min(allot::amounts::decimal_to_u64(room.floor()));
        }
    }
    completion.max(least)
}

/// Asks ahead, in the background, when a busy slice runs low.
fn maybe_refill(state: &AgentState, key_id: &str) {
    if let Some(want) = state.coordinator.table.wants_refill(
        key_id,
        state.config.refresh_interval(),
        Instant::now(),
    ) {
        if !state.coordinator.link.ask(key_id, &Amounts::zero(), &want) {
            state.coordinator.table.ask_failed(key_id);
        }
    }
}

/// Fields of the usage record known at admission.
struct RecordTemplate {
    request_id: String,
    key: Arc<KeyInfo>,
    model: String,
    admitted_at: i64,
    /// When the tariffs that price it were read (0: at admission).
    priced_at: i64,
    trace_id: String,
    span_id: String,
    batch_id: String,
    completion_window: String,
    /// The tariffs in force at admission: the request is priced with them
    /// (SPEC Admission 2), also when it settles after they changed.
    tariffs: Arc<TariffBook>,
}

/// Settles one admitted request exactly once: explicitly with the usage
/// the neuron reported, or on drop (client gone, error) with an estimate.
struct Settlement {
    state: Arc<AgentState>,
    reservation: Option<Reservation>,
    template: RecordTemplate,
    prompt_bound: u64,
    /// The learned overhead included in `prompt_bound`.
    learned_overhead: u64,
    completion_bound: u64,
    started: Instant,
    first_byte: Option<Duration>,
    /// Completion chunks forwarded so far, for estimates.
    chunks: u64,
    model_served: String,
    status: u16,
    /// This request's place in the concurrency bounds, until it settles.
    slot: Option<Slot>,
}

impl Settlement {
    /// Settles with reported usage, or an estimate bounded by the
    /// reservation; `charged == false` releases the reservation in full.
    /// The record's sequence number, for [`Records::durability`](crate::Records::durability); `None`
    /// when it had settled already.
    fn finish(&mut self, reported: Option<Reported>, charged: bool) -> Option<u64> {
        let reservation = self.reservation.take()?;
        let (usage, estimated) = match (reported, charged) {
            (_, false) => (Reported::default(), false),
            // Bounded like the coordinator bounds it: a neuron's absurd
            // count cannot wrap the charge.
            (Some(r), true) => (
                Reported {
                    prompt: r.prompt.min(allot::bounds::MAX_REQUEST_TOKENS),
                    completion: r.completion.min(allot::bounds::MAX_REQUEST_TOKENS),
                    reasoning: r.reasoning.min(allot::bounds::MAX_REQUEST_TOKENS),
                },
                false,
            ),
            (None, true) => (
                Reported {
                    prompt: self.prompt_bound,
                    completion: self.chunks.min(self.completion_bound),
                    reasoning: 0,
                },
                true,
            ),
        };
        let t = &self.template;
        let price = t.tariffs.choose(
            &t.model,
            t.key.purpose,
            non_empty(&t.completion_window),
            t.priced_at,
        );
        let actual = if charged {
            Amounts::request(
                usage.prompt + usage.completion,
                price.cost(usage.prompt, usage.completion),
            )
        } else {
            Amounts::zero()
        };
        if charged
            && Unit::ALL
                .iter()
                .any(|u| actual.value(*u) > reservation.amount.value(*u))
        {
            metrics::counter!("allot_agent_usage_over_reservation_total").increment(1);
            tracing::error!(
                key_id = t.key.key_id,
                request_id = t.request_id,
                "neuron reported more usage than was reserved; the excess is charged"
            );
        }
        if charged
            && !estimated
            && self.state.neuron.overheads.learn(
                &self.template.model,
                self.learned_overhead,
                self.prompt_bound,
                usage.prompt,
            )
        {
            self.state
                .coordinator
                .link
                .send(self.state.neuron.overheads.message());
        }
        if let Some(models) = &self.state.neuron.models {
            models.end(&self.template.model, clock::now_ms(), usage.completion);
        }
        // Settled once (the reservation is gone after this): the record
        // takes the template's strings instead of copying them.
        use std::mem::take;
        let origin = origin(self.template.key.purpose, &self.template.batch_id);
        let t = &mut self.template;
        let record = pb::UsageRecord {
            seq: 0,
            epoch: self.state.records.epoch,
            request_id: take(&mut t.request_id),
            key_id: t.key.key_id.clone(),
            account_id: t.key.account_id.clone(),
            purpose: t.key.purpose.to_pb() as i32,
            model_requested: take(&mut t.model),
            model_served: bounded_model(take(&mut self.model_served)),
            http_status: u32::from(self.status),
            duration_ms: self.started.elapsed().as_millis() as u64,
            ttfb_ms: self.first_byte.map(|d| d.as_millis() as u64).unwrap_or(0),
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            reasoning_tokens: usage.reasoning,
            usage_estimated: estimated,
            admitted_at_unix_ms: t.admitted_at,
            trace_id: take(&mut t.trace_id),
            span_id: take(&mut t.span_id),
            batch_id: take(&mut t.batch_id),
            completion_window: take(&mut t.completion_window),
            origin: origin as i32,
            reserved: Some(reservation.amount.to_pb()),
            neuron_id: self.state.config.neuron_id.clone(),
            charged,
            refusal_code: String::new(),
            cost: allot::money::format(actual.value(Unit::Credits)),
            priced_at_unix_ms: if t.priced_at == t.admitted_at {
                0
            } else {
                t.priced_at
            },
        };
        let usage_tx = &self.state.records.usage;
        let seq = self
            .state
            .coordinator
            .table
            .settle(&reservation, &actual, |seq| {
                let _ = usage_tx.send(pb::UsageRecord { seq, ..record });
            });
        metrics::counter!("allot_agent_settlements_total").increment(1);
        if estimated {
            metrics::counter!("allot_agent_usage_estimated_total").increment(1);
        }
        self.slot = None;
        Some(seq)
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.reservation.is_some() {
            // The client went away or the upstream failed mid-way: settle
            // what was delivered, estimated, never more than reserved.
            let charged = self.first_byte.is_some();
            self.finish(None, charged);
        }
    }
}

/// The served model as the neuron named it, cut to
/// [`reservation::MAX_MODEL_BYTES`] (on a character boundary): the
/// coordinator refuses records with longer strings.
fn bounded_model(mut model: String) -> String {
    let kept = allot::bounds::truncated(&model, reservation::MAX_MODEL_BYTES).len();
    model.truncate(kept);
    model
}

/// When the tariffs that price a request are read (SPEC Pricing 1): its
/// admission time, or for a batch key's request the batch's creation time
/// from `x-allot-batch-created-at` (Unix seconds, as the `created_at` of an
/// OpenAI batch), at most [`allot::bounds::MAX_BATCH_AGE_MS`] old and never in the future.
fn pricing_time(headers: &HeaderMap, key: &KeyInfo, admitted_at: i64) -> Result<i64, ApiError> {
    const HEADER: &str = "x-allot-batch-created-at";
    let Some(value) = headers.get(X_ALLOT_BATCH_CREATED_AT) else {
        return Ok(admitted_at);
    };
    let invalid =
        |why: &str| ApiError::bad_request(format!("{HEADER}: {why}"), Some(HEADER.into()));
    if key.purpose != Purpose::Batch {
        return Err(invalid("only batch keys may give a batch creation time"));
    }
    let seconds: i64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("must be a whole number of seconds since the Unix epoch"))?;
    let created_at = seconds.saturating_mul(1000);
    if created_at > admitted_at {
        return Err(invalid("must not be in the future"));
    }
    if admitted_at - created_at > allot::bounds::MAX_BATCH_AGE_MS {
        return Err(invalid("the batch is more than 7 days old"));
    }
    Ok(created_at)
}

/// Records a refusal of an authenticated request (status, code, no cost),
/// then hands the error on. Only 4xx refusals, decisions about the request
/// itself (its budget, its model, its body), are recorded: a 5xx says the
/// system could not serve it (coordinator or neuron unreachable), is
/// counted in metrics, and would otherwise fill the spool during the very
/// outage that causes it. At most `refusal_records_per_key_per_minute`
/// refusals of one key are recorded per minute; the rest are counted in
/// `allot_agent_refusals_unrecorded_total`. Header values are kept cut to
/// [`MAX_HEADER_VALUE_BYTES`](allot::bounds::MAX_HEADER_VALUE_BYTES).
fn refuse(
    state: &AgentState,
    key: &KeyInfo,
    model: &str,
    request_id: &str,
    headers: &HeaderMap,
    error: ApiError,
) -> ApiError {
    if !error.status.is_client_error() {
        return error;
    }
    let now = clock::now_ms();
    if !state.records.refusals.admit(&key.key_id, now) {
        metrics::counter!("allot_agent_refusals_unrecorded_total").increment(1);
        return error;
    }
    let batch_id = header_str(headers, X_ALLOT_BATCH_ID);
    let record = pb::UsageRecord {
        epoch: state.records.epoch,
        request_id: request_id.to_string(),
        key_id: key.key_id.clone(),
        account_id: key.account_id.clone(),
        purpose: key.purpose.to_pb() as i32,
        model_requested: allot::bounds::truncated(model, allot::bounds::MAX_MODEL_BYTES)
            .to_string(),
        http_status: u32::from(error.status.as_u16()),
        admitted_at_unix_ms: now,
        origin: origin(key.purpose, &batch_id) as i32,
        batch_id,
        completion_window: header_str(headers, X_ALLOT_COMPLETION_WINDOW),
        neuron_id: state.config.neuron_id.clone(),
        charged: false,
        refusal_code: error.code_label().to_string(),
        cost: "0".into(),
        ..Default::default()
    };
    let usage_tx = &state.records.usage;
    state.coordinator.table.number(|seq| {
        let _ = usage_tx.send(pb::UsageRecord { seq, ..record });
    });
    metrics::counter!("allot_agent_refusals_recorded_total").increment(1);
    error
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn origin(purpose: Purpose, batch_id: &str) -> pb::Origin {
    match purpose {
        Purpose::Batch => pb::Origin::Batch,
        Purpose::Playground => pb::Origin::Frontend,
        _ if !batch_id.is_empty() => pb::Origin::Batch,
        _ => pb::Origin::Api,
    }
}

/// A client header's value as a refusal record keeps it: cut to
/// [`MAX_HEADER_VALUE_BYTES`](allot::bounds::MAX_HEADER_VALUE_BYTES);
/// empty when absent or not visible ASCII.
fn header_str(headers: &HeaderMap, name: header::HeaderName) -> String {
    let value = headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    allot::bounds::truncated(value, allot::bounds::MAX_HEADER_VALUE_BYTES).to_string()
}

/// The client headers a served request's usage record keeps, checked:
/// `x-allot-batch-id` of at most
/// [`MAX_HEADER_VALUE_BYTES`](allot::bounds::MAX_HEADER_VALUE_BYTES) and an
/// `x-allot-completion-window` such as `24h` (see
/// [`check_completion_window`](allot::bounds::check_completion_window)).
/// Anything else is refused with 400 naming the header, never cut and
/// served. Returns `(batch_id, completion_window)`, empty when absent.
fn recorded_headers(headers: &HeaderMap) -> Result<(String, String), ApiError> {
    let checked = |name: header::HeaderName| -> Result<String, ApiError> {
        let invalid =
            |why: &str| ApiError::bad_request(format!("{name}: {why}"), Some(name.as_str().into()));
        let Some(value) = headers.get(&name) else {
            return Ok(String::new());
        };
        let text = value
            .to_str()
            .map_err(|_| invalid("must be visible ASCII"))?;
        allot::bounds::check_len(name.as_str(), text, allot::bounds::MAX_HEADER_VALUE_BYTES)
            .map_err(|e| invalid(&e.message))?;
        if name == X_ALLOT_COMPLETION_WINDOW && !text.is_empty() {
            allot::bounds::check_completion_window(name.as_str(), text)
                .map_err(|e| invalid(&e.message))?;
        }
        Ok(text.to_string())
    };
    Ok((
        checked(X_ALLOT_BATCH_ID)?,
        checked(X_ALLOT_COMPLETION_WINDOW)?,
    ))
}

/// The trace id of a W3C `traceparent` header, if well-formed.
fn trace_id_of(traceparent: &str) -> String {
    let mut parts = traceparent.split('-');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(_), Some(trace_id), Some(_), Some(_), None) if trace_id.len() == 32 => {
            trace_id.to_string()
        }
        _ => String::new(),
    }
}

/// A request's id: the client's `x-request-id` when it sent a usable one,
/// else a new one; as text for the usage record and as the header value
/// sent to the neuron and back to the client.
struct RequestId {
    text: String,
    header: HeaderValue,
}

impl RequestId {
    fn of(headers: &HeaderMap) -> RequestId {
        if let Some(value) = headers.get(X_REQUEST_ID) {
            if let Ok(id) = value.to_str() {
                if !id.is_empty() && id.len() <= 128 {
                    return RequestId {
                        text: id.to_string(),
                        header: value.clone(),
                    };
                }
            }
        }
        let text = new_request_id();
        let header = HeaderValue::from_str(&text).expect("a generated id is visible ASCII");
        RequestId { text, header }
    }
}

fn new_request_id() -> String {
    // 96 random bits as 24 hex digits, in one allocation.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random::<u128>() >> 32;
    let mut id = String::with_capacity(28);
    id.push_str("req_");
    for shift in (0..24).rev() {
        id.push(char::from(HEX[((bits >> (shift * 4)) & 0xf) as usize]));
    }
    id
}

async fn admit_and_forward(
    state: &Arc<AgentState>,
    operation: Operation,
    request: Request<Body>,
    started: Instant,
    request_id: &RequestId,
    key: &Arc<KeyInfo>,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    // Every refusal of an authenticated request is recorded (at no cost),
    // so operators can tell why it was refused.
    let refused = |error: ApiError, model: &str| {
        refuse(state, key, model, &request_id.text, &parts.headers, error)
    };
    // The body first: a client that sends it slowly never holds a slot.
    let bytes = read_body(state, body).await.map_err(|e| refused(e, ""))?;
    let slot = enter(state, &key.key_id).map_err(|e| refused(e, ""))?;
    let mut body: Map<String, Value> = reservation::parse_body(&bytes)
        .map_err(|e| refused(ApiError::bad_request(e.message, e.param), ""))?;
    let policy = state.config.policy_for(
        body.get("model")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    let mut facts = reservation::inspect(operation, &body, &policy)
        .map_err(|e| refused(ApiError::bad_request(e.message, e.param), ""))?;
    // What this model's neuron was seen to bill beyond the bound.
    let learned_overhead = state.neuron.overheads.extra(&facts.model);
    facts.prompt_tokens_bound = facts.prompt_tokens_bound.saturating_add(learned_overhead);
    let current = tracing::Span::current();
    current.record("allot.key_id", key.key_id.as_str());
    current.record("gen_ai.request.model", facts.model.as_str());
    if !key.allows_model(&facts.model) {
        return Err(refused(
            ApiError::model_not_found(&facts.model),
            &facts.model,
        ));
    }
    let upstream = match state
        .neuron
        .upstreams
        .resolve(&state.neuron.client, &facts.model)
        .await
    {
        Ok(upstream) => upstream,
        Err(LookupError::UnknownModel) => {
            return Err(refused(
                ApiError::model_not_found(&facts.model),
                &facts.model,
            ))
        }
        Err(LookupError::Unavailable(why)) => {
            let error = ApiError::bad_gateway(format!(
                "cannot find the endpoint of model {}: {why}",
                facts.model
            ));
            return Err(refused(error, &facts.model));
        }
    };
    let admitted_at = clock::now_ms();
    let priced_at =
        pricing_time(&parts.headers, key, admitted_at).map_err(|e| refused(e, &facts.model))?;
    let (batch_id, completion_window) =
        recorded_headers(&parts.headers).map_err(|e| refused(e, &facts.model))?;
    let tariffs = state.coordinator.link.tariffs.borrow().clone();
    let price = tariffs.choose(
        &facts.model,
        key.purpose,
        non_empty(&completion_window),
        priced_at,
    );
    if matches!(price, Price::Free) && !tariffs.is_empty() {
        metrics::counter!("allot_agent_unpriced_requests_total").increment(1);
    }
    let plan = reserve(state, key, &facts, policy.default_max_tokens, price)
        .instrument(tracing::info_span!("admission"))
        .await
        .map_err(|e| refused(e, &facts.model))?;
    current.record("gen_ai.request.max_tokens", plan.completion);
    metrics::counter!("allot_agent_admissions_total").increment(1);

    // Change the body only where it must change: the bound reserved goes
    // into every completion-limit field a server may honour.
    let mut changed = reservation::write_completion_bound(operation, &mut body, plan.completion);
    if facts.stream && operation.usage_chunk_on_request() && !facts.client_wants_usage {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        changed = true;
    }
    let forwarded = if changed {
        Bytes::from(serde_json::to_vec(&body).expect("a JSON map serializes"))
    } else {
        bytes
    };

    let (server_trace_id, server_span_id) = crate::trace::ids(&current);
    if let Some(models) = &state.neuron.models {
        models.begin(&facts.model, admitted_at);
    }
    let mut settlement = Settlement {
        state: state.clone(),
        reservation: Some(plan.reservation),
        template: RecordTemplate {
            request_id: request_id.text.clone(),
            key: key.clone(),
            model: facts.model.clone(),
            admitted_at,
            priced_at,
            trace_id: if server_trace_id.is_empty() {
                let traceparent = parts.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
                trace_id_of(traceparent.unwrap_or_default())
            } else {
                server_trace_id
            },
            span_id: server_span_id,
            batch_id,
            completion_window,
            tariffs,
        },
        prompt_bound: facts.prompt_tokens_bound,
        learned_overhead,
        completion_bound: plan.completion.saturating_mul(facts.choices),
        started,
        first_byte: None,
        chunks: 0,
        model_served: String::new(),
        status: 0,
        slot: Some(slot),
    };

    let upstream_span = tracing::info_span!(
        "upstream",
        otel.name = operation.span_name(),
        otel.kind = "client",
        http.request.method = "POST",
        server.address = &*upstream.url,
    );
    let uri = upstream
        .uri(operation)
        .map_err(|e| ApiError::bad_gateway(format!("cannot build the upstream request: {e}")))?;
    let mut upstream = Request::new(http_body_util::Full::new(forwarded));
    *upstream.method_mut() = http::Method::POST;
    *upstream.uri_mut() = uri;
    let upstream_headers = upstream.headers_mut();
    upstream_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    upstream_headers.insert(X_REQUEST_ID, request_id.header.clone());
    if !crate::trace::inject(&upstream_span, upstream_headers) {
        // No exporter: pass the client's context on unchanged.
        for name in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = parts.headers.get(&name) {
                upstream_headers.insert(name, value.clone());
            }
        }
    }
    if let Some(value) = parts.headers.get(header::ACCEPT) {
        upstream_headers.insert(header::ACCEPT, value.clone());
    }

    let response = match tokio::time::timeout(
        state.config.first_byte_timeout(),
        state.neuron.client.request(upstream),
    )
    .instrument(upstream_span)
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            settlement.status = 502;
            settlement.finish(None, false);
            state.neuron.upstreams.invalidate(&facts.model);
            return Err(ApiError::bad_gateway(format!(
                "the neuron is unreachable: {e}"
            )));
        }
        Err(_) => {
            settlement.status = 504;
            settlement.finish(None, false);
            return Err(ApiError::gateway_timeout(
                "the neuron did not answer in time",
            ));
        }
    };
    settlement.status = response.status().as_u16();
    let (upstream_parts, upstream_body) = response.into_parts();
    if !upstream_parts.status.is_success() {
        // Failed before any output: costs nothing.
        let body = upstream_body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        settlement.finish(None, false);
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = upstream_parts.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(response);
    }
    settlement.first_byte = Some(started.elapsed());

    let mut headers = HeaderMap::new();
    if facts.stream {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let idle_timeout = state.config.stream_idle_timeout();
        let stream = SseRelay {
            cut_after: stream_event_bound(settlement.completion_bound, facts.choices),
            upstream: upstream_body,
            scanner: SseScanner::new(
                operation.usage_chunk_on_request() && !facts.client_wants_usage,
            )
            .hold_end(),
            settlement,
            done: false,
            durable: None,
            tail: Bytes::new(),
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            deadline: Box::pin(tokio::time::sleep_until(
                (started + state.config.request_timeout()).into(),
            )),
        };
        let mut response = Response::new(Body::from_stream(stream));
        *response.headers_mut() = headers;
        return Ok(response);
    }

    let collected = match tokio::time::timeout_at(
        (started + state.config.request_timeout()).into(),
        upstream_body.collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            settlement.finish(None, true);
            return Err(ApiError::bad_gateway(format!(
                "the neuron's response broke off: {e}"
            )));
        }
        Err(_) => {
            settlement.finish(None, true);
            return Err(ApiError::gateway_timeout(
                "the neuron's response did not complete in time",
            ));
        }
    };
    let read = usage::read_body(&collected);
    if let Some(model) = read.model {
        settlement.model_served = model;
    }
    let reported = read.usage;
    if reported.is_none() {
        // Not even JSON: charge the whole bound.
        settlement.chunks = read.estimate.unwrap_or(settlement.completion_bound);
    }
    // Durable before delivered: the body leaves once its record is on
    // disk (one fsync per batch of requests, shared).
    if let Some(seq) = settlement.finish(reported, true) {
        state.records.durability.wait(seq).await?;
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut response = Response::new(Body::from(collected));
    *response.headers_mut() = headers;
    Ok(response)
}

/// A reset time as OpenAI writes it (`250ms`, `12s`, `1m5s`).
fn format_reset(d: Duration) -> HeaderValue {
    use std::io::Write;
    let ms = d.as_millis() as u64;
    // Longest: u64::MAX / 60000 minutes and 59 seconds, 20 bytes.
    let mut buffer = [0u8; 40];
    let mut out = &mut buffer[..];
    let unused = {
        let _ = if ms < 1000 {
            write!(out, "{ms}ms")
        } else if ms < 60_000 {
            write!(out, "{}s", ms / 1000)
        } else {
            let secs = ms / 1000;
            write!(out, "{}m{}s", secs / 60, secs % 60)
        };
        out.len()
    };
    let written = buffer.len() - unused;
    HeaderValue::from_bytes(&buffer[..written]).expect("digits and letters")
}

/// OpenAI-style `x-ratelimit-*` headers for the tightest request and token
/// limits, from the last grant and local use since.
fn add_rate_limit_headers(state: &AgentState, key_id: &str, headers: &mut HeaderMap) {
    use header::HeaderName;
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    let now = Instant::now();
    let tightest = state
        .coordinator
        .table
        .tightest_limits(key_id, [Unit::Requests, Unit::Tokens]);
    for (limit, [limit_name, remaining_name, reset_name]) in tightest.into_iter().zip(NAMES) {
        let Some(limit) = limit else {
            continue;
        };
        let reset = limit.reset_at.map_or(HeaderValue::from_static("0s"), |at| {
            format_reset(at.saturating_duration_since(now))
        });
        // Requests and tokens are whole numbers.
        let whole = |d: Decimal| HeaderValue::from(allot::amounts::decimal_to_u64(d.floor()));
        headers.insert(limit_name, whole(limit.cap));
        headers.insert(remaining_name, whole(limit.remaining));
        headers.insert(reset_name, reset);
    }
}

/// A record's way to the disk ([`crate::spool::Durability::wait`]).
type DurableWait = Pin<Box<dyn Future<Output = Result<(), crate::spool::NotDurable>> + Send>>;

/// Relays an SSE stream chunk by chunk, reading the usage chunk and
/// stripping it for clients that did not ask for it, and settles when the
/// stream ends (or, through the settlement's drop, when the client leaves).
/// Durable before delivered: the end of the stream (from the final usage
/// event or `[DONE]` on, see [`SseScanner::hold_end`]) is held back until
/// the record is on disk; if it cannot be, the client gets an error event
/// instead.
struct SseRelay {
    /// More content events than this and the neuron is generating past the
    /// bound it was given: the stream is cut there.
    cut_after: u64,
    upstream: hyper::body::Incoming,
    scanner: SseScanner,
    settlement: Settlement,
    done: bool,
    /// Set once settled: the record's way to the disk...
    durable: Option<DurableWait>,
    /// ...and the end of the stream, released when it gets there.
    tail: Bytes,
    /// Cut the stream when the neuron sends nothing for this long...
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// ...or when the whole request outlives `request_timeout_ms`.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// Events a stream may carry beyond one per completion token: the role
/// and finish events of each choice, and the lifecycle events of the
/// Responses API (created, in progress, item and part added and done,
/// completed).
fn stream_event_bound(completion_tokens: u64, choices: u64) -> u64 {
    completion_tokens
        .saturating_add(choices.saturating_mul(8))
        .saturating_add(16)
}

/// An OpenAI-shaped error as the last event of a stream.
fn error_event(message: &str, code: &str) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}})
    ))
}

impl SseRelay {
    /// Settles at the end of the upstream and holds `tail` (the end of the
    /// stream) until the record is durable.
    fn settle_and_hold(&mut self, tail: Bytes) {
        let reported = self.relay_seen();
        self.settle_then_end(reported, tail);
    }

    /// Settles with `reported` and holds `tail`, the stream's last bytes
    /// (its end, or an error event), until the record is durable: a stream
    /// cut short is charged before its client sees it end, too.
    fn settle_then_end(&mut self, reported: Option<Reported>, tail: Bytes) {
        self.tail = tail;
        if let Some(seq) = self.settlement.finish(reported, true) {
            self.durable = Some(Box::pin(self.settlement.state.records.durability.wait(seq)));
        }
    }

    /// Releases the end of the stream once the record is on disk, or ends
    /// the stream with an error event when it cannot be written.
    fn poll_release(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        if let Some(durable) = self.durable.as_mut() {
            let written = std::task::ready!(durable.as_mut().poll(cx));
            self.durable = None;
            if let Err(error) = written {
                self.tail = Bytes::new();
                let error = ApiError::from(error);
                return Poll::Ready(Some(Ok(error_event(&error.message, error.code_label()))));
            }
        }
        let tail = std::mem::take(&mut self.tail);
        Poll::Ready((!tail.is_empty()).then_some(Ok(tail)))
    }

    /// Hands what the stream showed so far to the settlement; the usage
    /// the neuron reported, if any.
    fn relay_seen(&mut self) -> Option<Reported> {
        let seen = &self.scanner.seen;
        self.settlement.chunks = seen.chunks;
        if let Some(model) = &seen.model {
            self.settlement.model_served.clone_from(model);
        }
        seen.usage
    }
}

impl Drop for SseRelay {
    fn drop(&mut self) {
        // The client left mid-stream (a finished stream has settled
        // already): settle at the usage the neuron reported, if it came,
        // else at the estimate from what was forwarded.
        let reported = self.relay_seen();
        self.settlement.finish(reported, true);
    }
}

impl Stream for SseRelay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return this.poll_release(cx);
        }
        loop {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => {
                    let idle = this.idle.as_mut().poll(cx).is_ready();
                    if !idle && this.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Cut: dropping the upstream body (with this relay)
                    // cancels the neuron's request.
                    this.done = true;
                    let reported = this.relay_seen();
                    this.settlement.status = 504;
                    let (what, code) = if idle {
                        ("sent nothing for too long", "stream_idle_timeout")
                    } else {
                        ("did not finish in time", "request_timeout")
                    };
                    metrics::counter!("allot_agent_stream_timeouts_total", "kind" => code)
                        .increment(1);
                    let event = error_event(&format!("the neuron's stream {what}"), code);
                    this.settle_then_end(reported, event);
                    return this.poll_release(cx);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let next = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(next);
                    let out = this.scanner.push(&data);
                    if this.scanner.seen.chunks > this.cut_after {
                        // Last line of defence: a neuron that ignores the
                        // limit it was sent is cut, and the request settles
                        // at its whole reservation (estimated), never more.
                        this.done = true;
                        metrics::counter!("allot_agent_streams_cut_total").increment(1);
                        tracing::error!(
                            key_id = this.settlement.template.key.key_id,
                            request_id = this.settlement.template.request_id,
                            "the neuron streamed past the completion bound it was sent; the stream is cut"
                        );
                        this.settlement.chunks = this.settlement.completion_bound;
                        let event = error_event(
                            "the neuron generated more than this request reserved; the stream was cut",
                            "reservation_exceeded",
                        );
                        this.settle_then_end(None, event);
                        return this.poll_release(cx);
                    }
                    if this.scanner.seen.done {
                        // `[DONE]` ends the stream even if the neuron keeps
                        // its connection open: settle now, and pass the end
                        // on once the record is on disk.
                        this.done = true;
                        let mut tail = bytes::BytesMut::from(this.scanner.take_held());
                        tail.extend_from_slice(&this.scanner.finish());
                        this.settle_and_hold(tail.freeze());
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(out)));
                        }
                        return this.poll_release(cx);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    let reported = this.relay_seen();
                    let event = error_event(
                        &format!("the neuron's stream broke off: {e}"),
                        "upstream_error",
                    );
                    this.settle_then_end(reported, event);
                    return this.poll_release(cx);
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut tail = bytes::BytesMut::from(this.scanner.take_held());
                    tail.extend_from_slice(&this.scanner.finish());
                    this.settle_and_hold(tail.freeze());
                    return this.poll_release(cx);
                }
            }
        }
    }
}

/// Sends an unmetered request to the neuron: 502 when it cannot be
/// reached, 504 without response headers within `first_byte_timeout_ms`.
async fn neuron_request(
    state: &AgentState,
    request: Request<http_body_util::Full<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, ApiError> {
    match tokio::time::timeout(
        state.config.first_byte_timeout(),
        state.neuron.client.request(request),
    )
    .await
    {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(ApiError::bad_gateway(format!(
            "the neuron is unreachable: {e}"
        ))),
        Err(_) => Err(ApiError::gateway_timeout(
            "the neuron did not answer in time",
        )),
    }
}

/// `GET /v1/models`: the neuron's list, narrowed to what the key may use.
async fn models(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> Response {
    let key = match authenticate(&state, &headers).await {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let request = match Request::get(format!(
        "{}/v1/models",
        state.neuron.upstreams.default_url()
    ))
    .body(http_body_util::Full::new(Bytes::new()))
    {
        Ok(r) => r,
        Err(e) => return ApiError::bad_gateway(e.to_string()).into_response(),
    };
    let response = match neuron_request(&state, request).await {
        Ok(response) => response,
        Err(e) => return e.into_response(),
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let Ok(mut list) = serde_json::from_slice::<Value>(&body) else {
        return ApiError::bad_gateway(
            "the neuron answered /v1/models with something that is not JSON",
        )
        .into_response();
    };
    if let Some(data) = list.get_mut("data").and_then(Value::as_array_mut) {
        data.retain(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| key.allows_model(id))
        });
    }
    (
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
        axum::Json(list),
    )
        .into_response()
}
