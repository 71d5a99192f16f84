//! The path of a metered request (`POST /v1/chat/completions` and the other
//! [`Operation`]s), one named step per module, in the order a request meets
//! them. [`crate::proxy`] composes them in one function; each step is a
//! plain function (a stream's meter is a body type) with its own unit
//! tests. A step takes what it decides on and returns a value or an
//! [`ApiError`]; none of them answers the client or records anything it was
//! not built to.
//!
//! ```text
//!   spool writable? ─── 503  durable before delivered: nothing is admitted
//!                            that the spool could not record
//!   authenticate ────── 401 / 503  the bearer key, cached or looked up
//!   admit ┬ intake ──── 413 / 408  the body, bounded in size and time
//!         ├ concurrency  503 / 429  a place in the agent's and key's bounds
//!         ├ inspect ─── 400 / 404 / 502  facts, model, endpoint, pricing
//!         └ reserve ─── 429 / 503  the upper bound, from the local
//!                            allowance, before anything is dispatched
//!                            (over budget is 429, never 402)
//!   refuse ──────────── every refusal of an authenticated request is
//!                            recorded, at no cost (4xx only, budgeted)
//!   settle::open ────── from here the request settles exactly once, also
//!                            when the client leaves or the neuron fails
//!   forward ─────────── the reserved bound written into the body; sent
//!   meter ───────────── usage read from the body or the stream; a stream
//!                            is cut at its reservation's bound
//!   settle ──────────── at the reported usage; the end of the response
//!                            waits until its record is on disk
//! ```

pub mod authenticate;
pub mod concurrency;
pub mod forward;
pub mod inspect;
pub mod intake;
pub mod meter;
pub mod record;
pub mod refuse;
pub mod reserve;
pub mod settle;

use crate::family::Family;
use crate::keys::KeyInfo;
use crate::AgentState;
use allot::reservation::Operation;
use allot::tariff::Price;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use bytes::Bytes;
use concurrency::Slot;
use inspect::Inspected;
use refuse::Refusal;
use reserve::Plan;
use tracing::Instrument;

/// Header names the path reads or writes, parsed once.
pub(crate) const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
pub(crate) const TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: header::HeaderName = header::HeaderName::from_static("tracestate");
pub(crate) const X_ALLOT_BATCH_ID: header::HeaderName =
    header::HeaderName::from_static("x-allot-batch-id");
pub(crate) const X_ALLOT_COMPLETION_WINDOW: header::HeaderName =
    header::HeaderName::from_static("x-allot-completion-window");
pub(crate) const X_ALLOT_BATCH_CREATED_AT: header::HeaderName =
    header::HeaderName::from_static("x-allot-batch-created-at");

/// A request that passed admission: its body, its place in the concurrency
/// bounds, what inspection found and the reservation that pays for it.
pub struct Admitted {
    /// The body as the client sent it.
    pub bytes: Bytes,
    pub slot: Slot,
    pub request: Inspected,
    pub plan: Plan,
}

/// Admission, step by step: intake, concurrency, inspect, reserve. A
/// refusal carries the model it names (once known) for its record; the
/// caller records it ([`refuse::record`]).
pub async fn admit(
    state: &AgentState,
    operation: Operation,
    headers: &HeaderMap,
    body: Body,
    key: &KeyInfo,
) -> Result<Admitted, Refusal> {
    // The body first: a client that sends it slowly never holds a slot.
    let bytes = intake::read_body(&state.config, body)
        .await
        .map_err(Refusal::before_model)?;
    let slot =
        concurrency::enter(&state.neuron.in_flight, &key.key_id).map_err(Refusal::before_model)?;
    let request = inspect::inspect(state, operation, &bytes, headers, key).await?;
    let price = request.price(key.purpose);
    if matches!(price, Price::Free) && !request.tariffs.is_empty() {
        metrics::counter!("allot_agent_unpriced_requests_total").increment(1);
    }
    let plan = reserve::reserve(
        &state.coordinator,
        &state.config,
        &key.key_id,
        &request.facts,
        request.default_max_tokens,
        price,
    )
    .instrument(tracing::info_span!("admission"))
    .await
    .map_err(|error| Refusal::naming(error, &request.facts.model))?;
    tracing::Span::current().record("gen_ai.request.max_tokens", plan.completion);
    metrics::counter!("allot_agent_admissions_total").increment(1);
    Ok(Admitted {
        bytes,
        slot,
        request,
        plan,
    })
}

/// A request's id: the client's `x-request-id` when it sent a usable one,
/// else a new one; as text for the usage record and as the header value
/// sent to the neuron and back to the client.
pub struct RequestId {
    pub text: String,
    pub header: HeaderValue,
}

impl RequestId {
    pub fn of(headers: &HeaderMap) -> RequestId {
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

impl RequestId {
    /// The id sent to the neuron: this one, unless the server family
    /// refuses it (llama-cpp-python takes only UUIDs); then a new UUID,
    /// logged beside the client's. The client's id stays in the usage
    /// record and the response.
    pub fn for_upstream(&self, family: Family) -> std::borrow::Cow<'_, HeaderValue> {
        if family.accepts_request_id(self.header.as_bytes()) {
            return std::borrow::Cow::Borrowed(&self.header);
        }
        let sent = new_request_id();
        tracing::debug!(
            request_id = self.text,
            upstream_request_id = sent,
            family = family.name(),
            "the client's request id is not one the server takes: a UUID is sent instead"
        );
        std::borrow::Cow::Owned(
            HeaderValue::from_str(&sent).expect("a generated id is visible ASCII"),
        )
    }
}

/// A new request id: a random UUID (version 4) in its canonical text.
/// llama-cpp-python's server refuses, with an empty 400, any request whose
/// `x-request-id` is not a UUID.
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random::<u128>();
    // Version 4 (random) and the RFC 9562 variant.
    let bits = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let mut id = String::with_capacity(36);
    for digit in (0..32).rev() {
        if matches!(digit, 23 | 19 | 15 | 11) {
            id.push('-');
        }
        id.push(char::from(HEX[((bits >> (digit * 4)) & 0xf) as usize]));
    }
    id
}

/// An agent for unit tests of the steps: the real state, with no
/// coordinator session and no spool thread (the test marks records
/// durable itself).
#[cfg(test)]
pub(crate) mod testing {
    use crate::config::AgentConfig;
    use crate::keys::KeyInfo;
    use crate::link::CoordinatorLink;
    use crate::{AgentState, Coordinator, Neuron, Records};
    use allot::key::Purpose;
    use allot::pb;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    pub struct TestAgent {
        pub state: Arc<AgentState>,
        /// Usage records as the spool would receive them.
        pub records: mpsc::UnboundedReceiver<pb::UsageRecord>,
    }

    pub fn agent(config: AgentConfig) -> TestAgent {
        let (usage, records) = mpsc::unbounded_channel();
        let dir = std::env::temp_dir().join(format!(
            "allot-path-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let state = AgentState {
            pass_through: config.pass_through_rules(),
            coordinator: Coordinator {
                link: Arc::new(CoordinatorLink::default()),
                keys: Arc::new(crate::keys::KeyCache::new(16)),
                table: Arc::new(crate::allowance::AllowanceTable::new(0)),
            },
            neuron: Neuron {
                client: crate::http_client(&config).expect("an HTTP client"),
                upstreams: crate::upstream::Upstreams::new(&config),
                in_flight: super::concurrency::InFlight::new(
                    config.max_concurrent_requests,
                    config.max_concurrent_per_key,
                ),
                models: None,
                overheads: Arc::new(crate::overhead::LearnedOverheads::open(&dir)),
            },
            records: Records {
                usage,
                epoch: 7,
                refusals: crate::refusals::RefusalRecords::new(
                    config.refusal_records_per_key_per_minute,
                ),
                durability: crate::spool::Durability::for_tests(1_000),
            },
            config,
        };
        TestAgent {
            state: Arc::new(state),
            records,
        }
    }

    pub fn key(key_id: &str) -> Arc<KeyInfo> {
        Arc::new(KeyInfo {
            key_id: key_id.into(),
            account_id: "acct".into(),
            purpose: Purpose::Realtime,
            revoked: false,
            allowed_models: vec![],
        })
    }

    /// A whole allowance for `key_id` for an hour.
    pub fn grant(state: &AgentState, key_id: &str, tokens: u64) {
        use rust_decimal::Decimal;
        let amount = allot::Amounts([
            Some(Decimal::from(1_000_000u64)),
            Some(Decimal::from(tokens)),
            None,
        ]);
        state.coordinator.table.grant(
            key_id,
            &amount,
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_secs(1),
            vec![],
            std::time::Instant::now(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_client_request_id_is_kept_and_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("client-7"));
        assert_eq!(RequestId::of(&headers).text, "client-7");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static(""));
        let generated = RequestId::of(&headers);
        // A version-4 UUID: 8-4-4-4-12 hex digits, version 4, variant 10xx.
        let parts: Vec<&str> = generated.text.split('-').collect();
        let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12], "{}", generated.text);
        assert!(parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]));
        assert_eq!(generated.header.to_str().unwrap(), generated.text);
        let long = "x".repeat(129);
        headers.insert(X_REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        assert_ne!(RequestId::of(&headers).text, long);
    }

    #[test]
    fn llama_cpp_gets_a_uuid_in_place_of_a_client_id_it_would_refuse() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("my-trace-1"));
        let id = RequestId::of(&headers);
        assert_eq!(
            id.text, "my-trace-1",
            "kept for the record and the response"
        );
        let sent = id.for_upstream(Family::LlamaCpp);
        assert!(
            crate::family::is_canonical_uuid(sent.as_bytes()),
            "{sent:?}"
        );
        assert_eq!(*id.for_upstream(Family::Vllm), "my-trace-1");
        let uuid = "0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5b";
        headers.insert(X_REQUEST_ID, HeaderValue::from_static(uuid));
        let id = RequestId::of(&headers);
        assert!(matches!(
            id.for_upstream(Family::LlamaCpp),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
