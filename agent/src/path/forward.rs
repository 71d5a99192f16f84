//! Step: forward. The admitted request goes to its upstream with the
//! completion bound it reserved written into every completion-limit field
//! a server may honour (and, for a stream whose operation needs it, the
//! usage chunk asked for): the neuron is never asked for more than was
//! reserved. A neuron that cannot be reached is 502, one that sends no
//! response headers within `first_byte_timeout_ms` 504; an answer other
//! than 2xx is passed on and costs nothing.

use super::settle::Settlement;
use super::{TRACEPARENT, TRACESTATE, X_REQUEST_ID};
use crate::api_error::ApiError;
use crate::config::AgentConfig;
use crate::family::Family;
use crate::Neuron;
use allot::reservation::{self, Operation, RequestFacts};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tracing::Instrument;

/// The body sent to the neuron: the client's own bytes when nothing had to
/// change, else `body` with the reserved completion bound (and the usage
/// chunk of a stream) written in.
pub fn bounded_body(
    operation: Operation,
    family: Family,
    mut body: Map<String, Value>,
    original: Bytes,
    facts: &RequestFacts,
    completion: u64,
) -> Bytes {
    // Change the body only where it must change: the bound reserved goes
    // into every completion-limit field a server may honour, and into the
    // one the family documents.
    let mut changed = reservation::write_completion_bound_as(
        operation,
        &mut body,
        completion,
        family.completion_field(operation),
    );
    if facts.stream && operation.usage_chunk_on_request() && !facts.client_wants_usage {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        changed = true;
    }
    if changed {
        Bytes::from(serde_json::to_vec(&body).expect("a JSON map serializes"))
    } else {
        original
    }
}

/// The request to the neuron: `body` to `uri`, with the request id, the
/// trace context (this agent's span's, or the client's when no exporter
/// records spans) and the client's `Accept`.
pub fn upstream_request(
    uri: http::Uri,
    body: Bytes,
    request_id: &HeaderValue,
    client_headers: &HeaderMap,
    span: &tracing::Span,
) -> Request<http_body_util::Full<Bytes>> {
    let mut upstream = Request::new(http_body_util::Full::new(body));
    *upstream.method_mut() = http::Method::POST;
    *upstream.uri_mut() = uri;
    let headers = upstream.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(X_REQUEST_ID, request_id.clone());
    if !crate::trace::inject(span, headers) {
        // No exporter: pass the client's context on unchanged.
        for name in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = client_headers.get(&name) {
                headers.insert(name, value.clone());
            }
        }
    }
    if let Some(value) = client_headers.get(header::ACCEPT) {
        headers.insert(header::ACCEPT, value.clone());
    }
    upstream
}

/// Sends an admitted request; the settlement is released (uncharged, with
/// 502 or 504) when the neuron does not answer, and a discovered endpoint
/// of `model` that cannot be reached is forgotten.
pub async fn send(
    neuron: &Neuron,
    config: &AgentConfig,
    model: &str,
    request: Request<http_body_util::Full<Bytes>>,
    span: tracing::Span,
    settlement: &mut Settlement,
) -> Result<Response<hyper::body::Incoming>, ApiError> {
    match tokio::time::timeout(config.first_byte_timeout(), neuron.client.request(request))
        .instrument(span)
        .await
    {
        Ok(Ok(response)) => {
            settlement.status = response.status().as_u16();
            Ok(response)
        }
        Ok(Err(e)) => {
            settlement.release(502);
            neuron.upstreams.invalidate(model);
            neuron.upstreams.unreachable();
            Err(ApiError::bad_gateway(format!(
                "the neuron is unreachable: {e}"
            )))
        }
        Err(_) => {
            settlement.release(504);
            Err(ApiError::gateway_timeout(
                "the neuron did not answer in time",
            ))
        }
    }
}

/// The neuron's answer other than 2xx, passed on: it failed before any
/// output, so the request costs nothing.
pub async fn failed_before_output(
    response: Response<hyper::body::Incoming>,
    settlement: &mut Settlement,
) -> Response {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    settlement.finish(None, false);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = parts.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Sends an unmetered request to the neuron (`/v1/models`, pass-through):
/// 502 when it cannot be reached, 504 without response headers within
/// `first_byte_timeout_ms`.
pub async fn unmetered(
    neuron: &Neuron,
    config: &AgentConfig,
    request: Request<http_body_util::Full<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, ApiError> {
    match tokio::time::timeout(config.first_byte_timeout(), neuron.client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(ApiError::bad_gateway(format!(
            "the neuron is unreachable: {e}"
        ))),
        Err(_) => Err(ApiError::gateway_timeout(
            "the neuron did not answer in time",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::settle::tests::settlement;
    use crate::path::testing;
    use axum::http::StatusCode;

    fn parsed(text: &str) -> (Map<String, Value>, RequestFacts) {
        let body = reservation::parse_body(text.as_bytes()).unwrap();
        let facts =
            reservation::inspect(Operation::ChatCompletions, &body, &Default::default()).unwrap();
        (body, facts)
    }

    #[test]
    fn the_reserved_bound_is_written_into_the_body() {
        let text = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":900,"stream":true}"#;
        let (body, facts) = parsed(text);
        let sent = bounded_body(
            Operation::ChatCompletions,
            Family::Unknown,
            body,
            Bytes::from(text),
            &facts,
            33,
        );
        let sent: Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(sent["max_tokens"], 33, "always written");
        assert_eq!(sent["max_completion_tokens"], 33, "the client's, bounded");
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }

    #[test]
    fn openai_chat_always_gets_max_completion_tokens_and_others_max_tokens() {
        let text = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        for (family, written, absent) in [
            (Family::Openai, "max_completion_tokens", "max_tokens"),
            (Family::Vllm, "max_tokens", "max_completion_tokens"),
            (Family::LlamaCpp, "max_tokens", "max_completion_tokens"),
        ] {
            let (body, facts) = parsed(text);
            let sent = bounded_body(
                Operation::ChatCompletions,
                family,
                body,
                Bytes::from(text),
                &facts,
                21,
            );
            let sent: Value = serde_json::from_slice(&sent).unwrap();
            assert_eq!(sent[written], 21, "{family:?}: {sent}");
            assert!(sent.get(absent).is_none(), "{family:?}: {sent}");
        }
    }

    #[test]
    fn a_body_that_needs_no_change_is_sent_as_it_came() {
        let text = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        let (body, facts) = parsed(text);
        let original = Bytes::from(text);
        let sent = bounded_body(
            Operation::ChatCompletions,
            Family::Unknown,
            body,
            original.clone(),
            &facts,
            5,
        );
        assert_eq!(sent.as_ptr(), original.as_ptr(), "not re-serialized");
    }

    #[test]
    fn the_upstream_request_carries_the_id_the_trace_and_accept() {
        let mut client = HeaderMap::new();
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        client.insert(TRACEPARENT, HeaderValue::from_static(traceparent));
        client.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        client.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk"));
        let request = upstream_request(
            "http://neuron/v1/chat/completions".parse().unwrap(),
            Bytes::from_static(b"{}"),
            &HeaderValue::from_static("req-1"),
            &client,
            &tracing::Span::none(),
        );
        let headers = request.headers();
        assert_eq!(headers[X_REQUEST_ID], "req-1");
        assert_eq!(headers[TRACEPARENT], traceparent);
        assert_eq!(headers[header::ACCEPT], "text/event-stream");
        assert!(
            headers.get(header::AUTHORIZATION).is_none(),
            "the client's key never reaches the neuron"
        );
        assert_eq!(request.method(), http::Method::POST);
    }

    /// Sends a request for model `m` to `address` with `agent`'s client.
    async fn send_to(
        agent: &testing::TestAgent,
        address: std::net::SocketAddr,
    ) -> Result<Response<hyper::body::Incoming>, ApiError> {
        let mut settlement = settlement(agent);
        let request = upstream_request(
            format!("http://{address}/v1/chat/completions")
                .parse()
                .unwrap(),
            Bytes::from_static(b"{}"),
            &HeaderValue::from_static("req-1"),
            &HeaderMap::new(),
            &tracing::Span::none(),
        );
        let state = &agent.state;
        let span = tracing::Span::none();
        send(
            &state.neuron,
            &state.config,
            "m",
            request,
            span,
            &mut settlement,
        )
        .await
    }

    #[tokio::test]
    async fn an_unreachable_neuron_is_502_and_costs_nothing() {
        let mut agent = testing::agent(Default::default());
        // A port that was just free: nothing listens on it.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = free.local_addr().unwrap();
        drop(free);
        let error = send_to(&agent, address).await.unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_GATEWAY);
        let record = agent.records.try_recv().unwrap();
        assert_eq!(record.http_status, 502);
        assert!(!record.charged);
    }

    #[tokio::test]
    async fn a_neuron_silent_past_the_first_byte_timeout_is_504() {
        let mut agent = testing::agent(crate::config::AgentConfig {
            first_byte_timeout_ms: 50,
            ..Default::default()
        });
        // Accepts the connection and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = send_to(&agent, silent.local_addr().unwrap())
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(agent.records.try_recv().unwrap().http_status, 504);
    }
}
