//! The OpenAI-compatible HTTP front of the agent: its routes, and for a
//! metered request the path through it, composed in [`handle`] and
//! [`serve`] from the named steps in [`crate::path`]. Nothing reaches the
//! neuron unless it was admitted, and every admitted request settles
//! exactly once, also when the client goes away mid-stream.

use crate::api_error::ApiError;
use crate::path::authenticate::authenticate;
use crate::path::{self, concurrency, forward, intake, meter, refuse, settle, RequestId};
use crate::AgentState;
use allot::reservation::Operation;
use allot::Unit;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use rust_decimal::Decimal;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

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
    let key = authenticate(
        &state.coordinator,
        state.config.allowance_wait(),
        &parts.headers,
    )
    .await?;
    // The body first: a slow one never holds a concurrency slot.
    let bytes = intake::read_body(&state.config, body).await?;
    // Uncharged, but it occupies the neuron like any other request.
    let slot = concurrency::enter(&state.neuron.in_flight, &key.key_id)?;
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
    let (mut parts, body) = forward::unmetered(&state.neuron, &state.config, upstream)
        .await?
        .into_parts();
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
/// spool admits requests; otherwise 503 with what is wrong. Either way
/// `x-allot-upstream-family` names the server family requests are sent
/// as (`unknown` while `auto` has not detected one).
async fn ready(State(state): State<Arc<AgentState>>) -> Response {
    let family = state.neuron.upstreams.family().name();
    let unavailable = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(X_ALLOT_UPSTREAM_FAMILY, family)],
            why,
        )
            .into_response()
    };
    if let Some(refusal) = state.coordinator.link.refusal() {
        return unavailable(refusal);
    }
    if let Some(refusal) = state.records.durability.refusal() {
        return unavailable(ApiError::from(refusal).message);
    }
    if !state.coordinator.link.is_connected() {
        return unavailable("not connected to a coordinator".into());
    }
    (StatusCode::OK, [(X_ALLOT_UPSTREAM_FAMILY, family)], "ready").into_response()
}

const X_ALLOT_UPSTREAM_FAMILY: header::HeaderName =
    header::HeaderName::from_static("x-allot-upstream-family");

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
        let authenticated = authenticate(
            &state.coordinator,
            state.config.allowance_wait(),
            request.headers(),
        )
        .await;
        match authenticated {
            Err(error) => (Err(error), None),
            Ok(key) => {
                let outcome = serve(&state, operation, request, started, &request_id, &key).await;
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
    headers.insert(path::X_REQUEST_ID, request_id.header);
    if let Some(key) = key {
        add_rate_limit_headers(&state, &key.key_id, headers);
    }
    response
}

/// An authenticated request, step by step: admitted (or refused, and the
/// refusal recorded), its settlement opened, forwarded, metered and
/// settled.
async fn serve(
    state: &Arc<AgentState>,
    operation: Operation,
    request: Request<Body>,
    started: Instant,
    request_id: &RequestId,
    key: &Arc<crate::keys::KeyInfo>,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let admitted = match path::admit(state, operation, headers, body, key).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            return Err(refuse::record(
                state,
                key,
                &request_id.text,
                headers,
                refusal,
            ))
        }
    };
    let settle::Opened {
        mut settlement,
        bytes,
        body,
        facts,
        upstream,
        completion,
    } = settle::open(state, admitted, key, request_id, headers, started);

    let span = tracing::info_span!(
        "upstream",
        otel.name = operation.span_name(),
        otel.kind = "client",
        http.request.method = "POST",
        server.address = &*upstream.url,
    );
    let uri = upstream
        .uri(operation)
        .map_err(|e| ApiError::bad_gateway(format!("cannot build the upstream request: {e}")))?;
    let family = state.neuron.upstreams.family();
    let count = (facts.stream && family.counts_streams_by_tokenizing())
        .then(|| meter::TokenCount::of(&upstream.url, operation, &body))
        .flatten();
    let forwarded = forward::bounded_body(operation, family, body, bytes, &facts, completion);
    let sent_id = request_id.for_upstream(family);
    let request = forward::upstream_request(uri, forwarded, &sent_id, headers, &span);
    let response = forward::send(
        &state.neuron,
        &state.config,
        &facts.model,
        request,
        span,
        &mut settlement,
    )
    .await?;
    if !response.status().is_success() {
        return Ok(forward::failed_before_output(response, &mut settlement).await);
    }
    settlement.first_byte = Some(started.elapsed());

    let deadline = started + state.config.request_timeout();
    if facts.stream {
        let limits = meter::StreamLimits {
            strip_usage: operation.usage_chunk_on_request() && !facts.client_wants_usage,
            // Only a family whose streams carry no usage has the text
            // collected and counted by its server's tokenizer.
            count,
            choices: facts.choices,
            idle_timeout: state.config.stream_idle_timeout(),
            deadline,
        };
        return Ok(meter::stream(response.into_body(), limits, settlement));
    }
    meter::body(response.into_body(), deadline, settlement).await
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

/// `GET /v1/models`: the neuron's list, narrowed to what the key may use.
async fn models(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> Response {
    let key = match authenticate(&state.coordinator, state.config.allowance_wait(), &headers).await
    {
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
    let response = match forward::unmetered(&state.neuron, &state.config, request).await {
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
