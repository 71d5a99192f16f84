//! Step: inspect. What admission needs to know of a request, read from its
//! body and headers and checked: the facts its bound is computed from
//! (model, stream, completion limit, choices, prompt bound plus what the
//! model's neuron was seen to bill beyond it), whether the key may use the
//! model, the upstream serving it, when its tariffs are read and the client
//! headers its usage record keeps. Every wire value is checked here; a bad
//! one is refused naming its field or header, never cut and served.

use super::record::non_empty;
use super::refuse::Refusal;
use super::{X_ALLOT_BATCH_CREATED_AT, X_ALLOT_BATCH_ID, X_ALLOT_COMPLETION_WINDOW};
use crate::api_error::ApiError;
use crate::keys::KeyInfo;
use crate::upstream::{LookupError, Upstream};
use crate::AgentState;
use allot::clock;
use allot::key::Purpose;
use allot::reservation::{self, Operation, RequestFacts};
use allot::tariff::{Price, TariffBook};
use axum::http::{header, HeaderMap};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A request as admission reads it.
pub struct Inspected {
    /// The body, parsed (strictly: no duplicate keys).
    pub body: Map<String, Value>,
    pub facts: RequestFacts,
    /// The model's `default_max_tokens`, for a request naming none.
    pub default_max_tokens: u64,
    /// The learned overhead included in `facts.prompt_tokens_bound`.
    pub learned_overhead: u64,
    pub upstream: Arc<Upstream>,
    pub admitted_at: i64,
    /// When the tariffs that price it are read (SPEC Pricing 1).
    pub priced_at: i64,
    pub batch_id: String,
    pub completion_window: String,
    /// The tariffs in force at admission: the request is priced with them
    /// (SPEC Admission 2), also when it settles after they changed.
    pub tariffs: Arc<TariffBook>,
}

impl Inspected {
    /// The request's price under the tariffs read at admission.
    pub fn price(&self, purpose: Purpose) -> Price<'_> {
        self.tariffs.choose(
            &self.facts.model,
            purpose,
            non_empty(&self.completion_window),
            self.priced_at,
        )
    }
}

/// Reads and checks the request; a refusal names the model once it is
/// known.
pub async fn inspect(
    state: &AgentState,
    operation: Operation,
    bytes: &[u8],
    headers: &HeaderMap,
    key: &KeyInfo,
) -> Result<Inspected, Refusal> {
    let bad_request = |e: reservation::BadRequest| ApiError::bad_request(e.message, e.param);
    let body = reservation::parse_body(bytes).map_err(|e| Refusal::before_model(bad_request(e)))?;
    let policy = state.config.policy_for(
        body.get("model")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    let mut facts = reservation::inspect(operation, &body, &policy)
        .map_err(|e| Refusal::before_model(bad_request(e)))?;
    // What this model's neuron was seen to bill beyond the bound.
    let learned_overhead = state.neuron.overheads.extra(&facts.model);
    facts.prompt_tokens_bound = facts.prompt_tokens_bound.saturating_add(learned_overhead);
    let current = tracing::Span::current();
    current.record("allot.key_id", key.key_id.as_str());
    current.record("gen_ai.request.model", facts.model.as_str());
    let refused = |error: ApiError| Refusal::naming(error, &facts.model);
    if !key.allows_model(&facts.model) {
        return Err(refused(ApiError::model_not_found(&facts.model)));
    }
    let upstream = match state
        .neuron
        .upstreams
        .resolve(&state.neuron.client, &facts.model)
        .await
    {
        Ok(upstream) => upstream,
        Err(LookupError::UnknownModel) => {
            return Err(refused(ApiError::model_not_found(&facts.model)))
        }
        Err(LookupError::Unavailable(why)) => {
            return Err(refused(ApiError::bad_gateway(format!(
                "cannot find the endpoint of model {}: {why}",
                facts.model
            ))));
        }
    };
    let admitted_at = clock::now_ms();
    let priced_at = pricing_time(headers, key, admitted_at).map_err(refused)?;
    let (batch_id, completion_window) = recorded_headers(headers).map_err(refused)?;
    let tariffs = state.coordinator.link.tariffs.borrow().clone();
    Ok(Inspected {
        body,
        facts,
        default_max_tokens: policy.default_max_tokens,
        learned_overhead,
        upstream,
        admitted_at,
        priced_at,
        batch_id,
        completion_window,
        tariffs,
    })
}

/// When the tariffs that price a request are read (SPEC Pricing 1): its
/// admission time, or for a batch key's request the batch's creation time
/// from `x-allot-batch-created-at` (Unix seconds, as the `created_at` of an
/// OpenAI batch), at most [`allot::bounds::MAX_BATCH_AGE_MS`] old and never in the future.
pub fn pricing_time(headers: &HeaderMap, key: &KeyInfo, admitted_at: i64) -> Result<i64, ApiError> {
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

/// The client headers a served request's usage record keeps, checked:
/// `x-allot-batch-id` of at most
/// [`MAX_HEADER_VALUE_BYTES`](allot::bounds::MAX_HEADER_VALUE_BYTES) and an
/// `x-allot-completion-window` such as `24h` (see
/// [`check_completion_window`](allot::bounds::check_completion_window)).
/// Anything else is refused with 400 naming the header, never cut and
/// served. Returns `(batch_id, completion_window)`, empty when absent.
pub fn recorded_headers(headers: &HeaderMap) -> Result<(String, String), ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::testing;
    use axum::http::{HeaderValue, StatusCode};

    const CHAT: &[u8] =
        br#"{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;

    #[tokio::test]
    async fn a_request_is_read_into_the_facts_its_bound_comes_from() {
        let agent = testing::agent(Default::default());
        let key = testing::key("k");
        let inspected = inspect(
            &agent.state,
            Operation::ChatCompletions,
            CHAT,
            &HeaderMap::new(),
            &key,
        )
        .await
        .unwrap();
        assert_eq!(inspected.facts.model, "m1");
        assert_eq!(inspected.facts.max_completion_tokens, Some(5));
        assert!(inspected.facts.prompt_tokens_bound > 0);
        assert_eq!(
            inspected.upstream.url,
            agent.state.neuron.upstreams.default_url()
        );
        assert_eq!(inspected.priced_at, inspected.admitted_at);
        assert!(matches!(inspected.price(key.purpose), Price::Free));
    }

    #[tokio::test]
    async fn a_refusal_names_the_model_once_it_is_known() {
        let agent = testing::agent(Default::default());
        let mut key = (*testing::key("k")).clone();
        key.allowed_models = vec!["other".into()];
        let headers = HeaderMap::new();
        let chat = Operation::ChatCompletions;
        let unparsed = inspect(&agent.state, chat, b"{not json", &headers, &key)
            .await
            .err()
            .unwrap();
        assert_eq!(unparsed.error.status, StatusCode::BAD_REQUEST);
        assert_eq!(unparsed.model, "");
        let not_allowed = inspect(&agent.state, chat, CHAT, &headers, &key)
            .await
            .err()
            .unwrap();
        assert_eq!(not_allowed.error.status, StatusCode::NOT_FOUND);
        assert_eq!(not_allowed.model, "m1");
    }

    #[test]
    fn only_a_batch_key_may_date_its_pricing_back_and_at_most_seven_days() {
        let now = 10 * allot::bounds::MAX_BATCH_AGE_MS;
        let mut headers = HeaderMap::new();
        let api = testing::key("k");
        let mut batch = (*api).clone();
        batch.purpose = Purpose::Batch;
        assert_eq!(pricing_time(&headers, &api, now), Ok(now));
        let created = now / 1000 - 60;
        headers.insert(X_ALLOT_BATCH_CREATED_AT, HeaderValue::from(created));
        assert_eq!(pricing_time(&headers, &batch, now), Ok(created * 1000));
        let refused = pricing_time(&headers, &api, now).unwrap_err();
        assert_eq!(refused.param.as_deref(), Some("x-allot-batch-created-at"));
        for bad in [
            now / 1000 + 1,
            (now - allot::bounds::MAX_BATCH_AGE_MS) / 1000 - 1,
        ] {
            headers.insert(X_ALLOT_BATCH_CREATED_AT, HeaderValue::from(bad));
            assert!(pricing_time(&headers, &batch, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn recorded_headers_are_checked_not_cut() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            recorded_headers(&headers),
            Ok((String::new(), String::new()))
        );
        headers.insert(X_ALLOT_BATCH_ID, HeaderValue::from_static("b-1"));
        headers.insert(X_ALLOT_COMPLETION_WINDOW, HeaderValue::from_static("24h"));
        assert_eq!(
            recorded_headers(&headers),
            Ok(("b-1".to_string(), "24h".to_string()))
        );
        headers.insert(X_ALLOT_COMPLETION_WINDOW, HeaderValue::from_static("soon"));
        let error = recorded_headers(&headers).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("x-allot-completion-window"));
        let long = "b".repeat(allot::bounds::MAX_HEADER_VALUE_BYTES + 1);
        headers.remove(X_ALLOT_COMPLETION_WINDOW);
        headers.insert(X_ALLOT_BATCH_ID, HeaderValue::from_str(&long).unwrap());
        let error = recorded_headers(&headers).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("x-allot-batch-id"));
    }
}
