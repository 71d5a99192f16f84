//! Step: refuse. Every refusal of an authenticated request is recorded (a
//! usage record with its status and code, at no cost), so operators can
//! tell why a key was refused. Only 4xx refusals, decisions about the
//! request itself (its budget, its model, its body), are recorded: a 5xx
//! says the system could not serve it (coordinator or neuron unreachable),
//! is counted in metrics, and would otherwise fill the spool during the
//! very outage that causes it. At most `refusal_records_per_key_per_minute`
//! refusals of one key are recorded per minute
//! ([`crate::refusals::RefusalRecords`]); the rest are counted in
//! `allot_agent_refusals_unrecorded_total`.

use super::record::origin;
use super::{X_ALLOT_BATCH_ID, X_ALLOT_COMPLETION_WINDOW};
use crate::api_error::ApiError;
use crate::keys::KeyInfo;
use crate::AgentState;
use allot::clock;
use allot::pb;
use axum::http::{header, HeaderMap};

/// Why admission refused a request, and the model it named (empty when
/// refused before the model was read).
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub model: String,
}

impl Refusal {
    /// Refused before the request's model was known.
    pub fn before_model(error: ApiError) -> Refusal {
        Refusal {
            error,
            model: String::new(),
        }
    }

    /// Refused a request for `model`.
    pub fn naming(error: ApiError, model: &str) -> Refusal {
        Refusal {
            error,
            model: model.to_string(),
        }
    }
}

/// Records `refusal` of `key`'s request when it is a 4xx and the key's
/// budget of refusal records allows; hands the error on either way. Header
/// values are kept cut to
/// [`MAX_HEADER_VALUE_BYTES`](allot::bounds::MAX_HEADER_VALUE_BYTES).
pub fn record(
    state: &AgentState,
    key: &KeyInfo,
    request_id: &str,
    headers: &HeaderMap,
    refusal: Refusal,
) -> ApiError {
    let Refusal { error, model } = refusal;
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
        model_requested: allot::bounds::truncated(&model, allot::bounds::MAX_MODEL_BYTES)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::path::testing;
    use axum::http::HeaderValue;

    #[test]
    fn a_4xx_refusal_is_recorded_at_no_cost_and_a_5xx_is_not() {
        let mut agent = testing::agent(AgentConfig::default());
        let key = testing::key("k");
        let mut headers = HeaderMap::new();
        let long = "b".repeat(allot::bounds::MAX_HEADER_VALUE_BYTES + 10);
        headers.insert(X_ALLOT_BATCH_ID, HeaderValue::from_str(&long).unwrap());
        let quota = ApiError::insufficient_quota("over");
        let handed_on = record(
            &agent.state,
            &key,
            "req-9",
            &headers,
            Refusal::naming(quota.clone(), "m1"),
        );
        assert_eq!(handed_on, quota);
        let recorded = agent.records.try_recv().unwrap();
        assert_eq!(recorded.http_status, 429);
        assert_eq!(recorded.refusal_code, "insufficient_quota");
        assert_eq!(recorded.model_requested, "m1");
        assert_eq!(recorded.request_id, "req-9");
        assert!(!recorded.charged);
        assert_eq!(recorded.cost, "0");
        assert!(recorded.seq > 0, "numbered like every record");
        assert_eq!(
            recorded.batch_id.len(),
            allot::bounds::MAX_HEADER_VALUE_BYTES
        );
        assert_eq!(recorded.origin, pb::Origin::Batch as i32);

        let unreachable = ApiError::bad_gateway("the neuron is unreachable");
        record(
            &agent.state,
            &key,
            "req-10",
            &headers,
            Refusal::before_model(unreachable),
        );
        assert!(agent.records.try_recv().is_err(), "a 5xx is not recorded");
    }

    #[test]
    fn refusals_past_the_per_minute_budget_are_not_recorded() {
        let mut agent = testing::agent(AgentConfig {
            refusal_records_per_key_per_minute: 1,
            ..Default::default()
        });
        let key = testing::key("k");
        for _ in 0..3 {
            let error = ApiError::model_not_found("m");
            record(
                &agent.state,
                &key,
                "r",
                &HeaderMap::new(),
                Refusal::before_model(error),
            );
        }
        assert!(agent.records.try_recv().is_ok());
        assert!(agent.records.try_recv().is_err());
    }
}
