//! Step: settle. An admitted request settles exactly once: at the usage the
//! neuron reported, else at an estimate bounded by its reservation, or
//! uncharged when the neuron produced nothing. Settling gives back what was
//! reserved and not used, numbers the usage record and hands it to the
//! spool. Durable before delivered: the end of a response is released only
//! once its record is on disk ([`durably`], and for streams
//! [`super::meter`]).
//!
//! A [`Settlement`] is opened once a request is admitted. If nothing
//! settles it explicitly (the client went away, the upstream failed), its
//! drop does: charged at the estimate once output had begun, else
//! uncharged.

use super::record::{non_empty, origin};
use super::reserve::Plan;
use super::{Admitted, RequestId, TRACEPARENT};
use crate::allowance::Reservation;
use crate::api_error::ApiError;
use crate::keys::KeyInfo;
use crate::path::concurrency::Slot;
use crate::usage::Reported;
use crate::AgentState;
use allot::clock;
use allot::pb;
use allot::reservation;
use allot::tariff::TariffBook;
use allot::{Amounts, Unit};
use axum::http::HeaderMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fields of the usage record known at admission.
pub(crate) struct RecordTemplate {
    pub(crate) request_id: String,
    pub(crate) key: Arc<KeyInfo>,
    pub(crate) model: String,
    pub(crate) admitted_at: i64,
    /// When the tariffs that price it were read (0: at admission).
    pub(crate) priced_at: i64,
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
    pub(crate) batch_id: String,
    pub(crate) completion_window: String,
    /// The tariffs in force at admission: the request is priced with them
    /// (SPEC Admission 2), also when it settles after they changed.
    pub(crate) tariffs: Arc<TariffBook>,
}

/// Settles one admitted request exactly once: explicitly with the usage
/// the neuron reported, or on drop (client gone, error) with an estimate.
pub struct Settlement {
    pub(crate) state: Arc<AgentState>,
    reservation: Option<Reservation>,
    pub(crate) template: RecordTemplate,
    prompt_bound: u64,
    /// The learned overhead included in `prompt_bound`.
    learned_overhead: u64,
    /// Completion tokens the request may produce, all choices together.
    pub(crate) completion_bound: u64,
    started: Instant,
    pub(crate) first_byte: Option<Duration>,
    /// Completion chunks forwarded so far, for estimates.
    pub(crate) chunks: u64,
    /// The prompt as the server's tokenizer counted it, for the estimate
    /// of a stream without usage (never above the prompt bound).
    pub(crate) prompt_counted: Option<u64>,
    pub(crate) model_served: String,
    pub(crate) status: u16,
    /// This request's place in the concurrency bounds, until the
    /// settlement is dropped (after its response was delivered).
    _slot: Slot,
}

/// What of an admitted request the rest of the path still needs once its
/// settlement holds the reservation and the slot.
pub struct Opened {
    pub settlement: Settlement,
    pub bytes: bytes::Bytes,
    pub body: serde_json::Map<String, serde_json::Value>,
    pub facts: reservation::RequestFacts,
    pub upstream: Arc<crate::upstream::Upstream>,
    pub completion: u64,
}

/// Opens the settlement of an admitted request: from here it settles
/// exactly once. `started` is when the request arrived.
pub fn open(
    state: &Arc<AgentState>,
    admitted: Admitted,
    key: &Arc<KeyInfo>,
    request_id: &RequestId,
    headers: &HeaderMap,
    started: Instant,
) -> Opened {
    let Admitted {
        bytes,
        slot,
        request,
        plan: Plan {
            reservation,
            completion,
        },
    } = admitted;
    let (server_trace_id, server_span_id) = crate::trace::ids(&tracing::Span::current());
    if let Some(models) = &state.neuron.models {
        models.begin(&request.facts.model, request.admitted_at);
    }
    let settlement = Settlement {
        state: state.clone(),
        reservation: Some(reservation),
        template: RecordTemplate {
            request_id: request_id.text.clone(),
            key: key.clone(),
            model: request.facts.model.clone(),
            admitted_at: request.admitted_at,
            priced_at: request.priced_at,
            trace_id: if server_trace_id.is_empty() {
                let traceparent = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
                trace_id_of(traceparent.unwrap_or_default())
            } else {
                server_trace_id
            },
            span_id: server_span_id,
            batch_id: request.batch_id,
            completion_window: request.completion_window,
            tariffs: request.tariffs,
        },
        prompt_bound: request.facts.prompt_tokens_bound,
        learned_overhead: request.learned_overhead,
        completion_bound: completion.saturating_mul(request.facts.choices),
        started,
        first_byte: None,
        chunks: 0,
        prompt_counted: None,
        model_served: String::new(),
        status: 0,
        _slot: slot,
    };
    Opened {
        settlement,
        bytes,
        body: request.body,
        facts: request.facts,
        upstream: request.upstream,
        completion,
    }
}

/// Settles at `reported` (charged) and waits until the record is on disk:
/// the caller delivers the end of the response only after this.
pub async fn durably(
    settlement: &mut Settlement,
    reported: Option<Reported>,
) -> Result<(), ApiError> {
    if let Some(seq) = settlement.finish(reported, true) {
        settlement.state.records.durability.wait(seq).await?;
    }
    Ok(())
}

impl Settlement {
    /// Settles uncharged with `status`: the neuron produced nothing.
    pub fn release(&mut self, status: u16) {
        self.status = status;
        self.finish(None, false);
    }

    /// Settles with reported usage, or an estimate bounded by the
    /// reservation; `charged == false` releases the reservation in full.
    /// The record's sequence number, for
    /// [`Records::durability`](crate::Records::durability); `None` when it
    /// had settled already.
    pub fn finish(&mut self, reported: Option<Reported>, charged: bool) -> Option<u64> {
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
                    prompt: self
                        .prompt_counted
                        .map_or(self.prompt_bound, |counted| counted.min(self.prompt_bound)),
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
        let state = &self.state;
        if charged
            && !estimated
            && state.neuron.overheads.learn(
                &self.template.model,
                self.learned_overhead,
                self.prompt_bound,
                usage.prompt,
            )
        {
            state
                .coordinator
                .link
                .send(state.neuron.overheads.message());
        }
        if let Some(models) = &state.neuron.models {
            models.end(&self.template.model, clock::now_ms(), usage.completion);
        }
        // Settled once (the reservation is gone after this): the record
        // takes the template's strings instead of copying them.
        use std::mem::take;
        let origin = origin(self.template.key.purpose, &self.template.batch_id);
        let t = &mut self.template;
        let record = pb::UsageRecord {
            seq: 0,
            epoch: state.records.epoch,
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
            neuron_id: state.config.neuron_id.clone(),
            charged,
            refusal_code: String::new(),
            cost: allot::money::format(actual.value(Unit::Credits)),
            priced_at_unix_ms: if t.priced_at == t.admitted_at {
                0
            } else {
                t.priced_at
            },
        };
        let usage_tx = &state.records.usage;
        let seq = state
            .coordinator
            .table
            .settle(&reservation, &actual, |seq| {
                let _ = usage_tx.send(pb::UsageRecord { seq, ..record });
            });
        metrics::counter!("allot_agent_settlements_total").increment(1);
        if estimated {
            metrics::counter!("allot_agent_usage_estimated_total").increment(1);
        }
        // The slot stays taken until the settlement is dropped: a response
        // waiting for its record's fsync (and holding its body in memory)
        // still counts against `max_concurrent_requests`.
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::path::testing::{self, TestAgent};
    use rust_decimal::Decimal;
    use std::future::Future;

    /// A settlement of a request of key `k` that reserved a prompt bound
    /// of 10 and a completion bound of 20 tokens.
    pub(crate) fn settlement(agent: &TestAgent) -> Settlement {
        let state = &agent.state;
        testing::grant(state, "k", 1_000);
        let crate::allowance::Admission::Reserved(reservation) = state
            .coordinator
            .table
            .try_reserve("k", &Amounts::request(30, Decimal::ZERO), Instant::now())
        else {
            panic!("the grant covers 30 tokens");
        };
        Settlement {
            state: state.clone(),
            reservation: Some(reservation),
            template: RecordTemplate {
                request_id: "req-1".into(),
                key: testing::key("k"),
                model: "m".into(),
                admitted_at: 1_000,
                priced_at: 1_000,
                trace_id: String::new(),
                span_id: String::new(),
                batch_id: String::new(),
                completion_window: String::new(),
                tariffs: Arc::default(),
            },
            prompt_bound: 10,
            learned_overhead: 0,
            completion_bound: 20,
            started: Instant::now(),
            first_byte: None,
            chunks: 0,
            prompt_counted: None,
            model_served: String::new(),
            status: 200,
            _slot: state
                .neuron
                .in_flight
                .enter("k")
                .unwrap_or_else(|_| panic!("no bound")),
        }
    }

    fn tokens_left(agent: &TestAgent) -> Decimal {
        let available = agent.state.coordinator.table.available("k").unwrap();
        available.get(Unit::Tokens).unwrap()
    }

    #[tokio::test]
    async fn a_request_settles_once_at_the_reported_usage() {
        let mut agent = testing::agent(Default::default());
        let mut settlement = settlement(&agent);
        let reported = Reported {
            prompt: 7,
            completion: 5,
            reasoning: 1,
        };
        let seq = settlement.finish(Some(reported), true).unwrap();
        assert_eq!(settlement.finish(Some(reported), true), None, "only once");
        drop(settlement);
        let record = agent.records.try_recv().unwrap();
        assert!(agent.records.try_recv().is_err(), "one record");
        assert_eq!(record.seq, seq);
        assert_eq!(record.epoch, 7);
        assert_eq!((record.prompt_tokens, record.completion_tokens), (7, 5));
        assert!(record.charged && !record.usage_estimated);
        assert_eq!(record.request_id, "req-1");
        assert_eq!(tokens_left(&agent), Decimal::from(1_000 - 12));
        assert_eq!(agent.state.neuron.in_flight.total(), 0, "the slot is free");
    }

    #[tokio::test]
    async fn an_absurd_report_is_capped_and_an_estimate_stays_within_the_bound() {
        let mut agent = testing::agent(Default::default());
        let mut settlement = settlement(&agent);
        let absurd = Reported {
            prompt: u64::MAX,
            completion: u64::MAX,
            reasoning: 0,
        };
        settlement.finish(Some(absurd), true);
        let record = agent.records.try_recv().unwrap();
        assert_eq!(record.prompt_tokens, allot::bounds::MAX_REQUEST_TOKENS);

        let mut agent = testing::agent(Default::default());
        let mut settlement = super::tests::settlement(&agent);
        settlement.chunks = 1_000;
        settlement.finish(None, true);
        let record = agent.records.try_recv().unwrap();
        assert!(record.usage_estimated);
        assert_eq!((record.prompt_tokens, record.completion_tokens), (10, 20));
    }

    #[tokio::test]
    async fn dropped_before_output_it_costs_nothing_after_output_it_is_charged() {
        let mut agent = testing::agent(Default::default());
        drop(settlement(&agent));
        let record = agent.records.try_recv().unwrap();
        assert!(!record.charged);
        assert_eq!(record.cost, "0");
        assert_eq!(tokens_left(&agent), Decimal::from(1_000));

        let mut settlement = settlement(&agent);
        settlement.first_byte = Some(Duration::from_millis(3));
        settlement.chunks = 4;
        drop(settlement);
        let record = agent.records.try_recv().unwrap();
        assert!(record.charged && record.usage_estimated);
        assert_eq!(record.completion_tokens, 4);
    }

    #[tokio::test]
    async fn released_it_records_the_status_uncharged() {
        let mut agent = testing::agent(Default::default());
        let mut settlement = settlement(&agent);
        settlement.release(502);
        let record = agent.records.try_recv().unwrap();
        assert_eq!(record.http_status, 502);
        assert!(!record.charged);
    }

    #[tokio::test]
    async fn durably_returns_only_once_the_record_is_on_disk() {
        let agent = testing::agent(Default::default());
        let mut settlement = settlement(&agent);
        let durability = agent.state.records.durability.clone();
        let in_flight = agent.state.neuron.in_flight.clone();
        let mut settled = Box::pin(durably(&mut settlement, None));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(settled.as_mut().poll(&mut cx).is_pending());
        // Waiting on the disk still counts against the concurrency bound.
        assert_eq!(in_flight.total(), 1, "the slot is held during the wait");
        durability.mark_durable(u64::MAX);
        assert!(settled.await.is_ok());
        drop(settlement);
        assert_eq!(in_flight.total(), 0, "and freed with the settlement");
    }

    #[test]
    fn the_trace_id_comes_from_a_well_formed_traceparent_only() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        assert_eq!(trace_id_of(&format!("00-{id}-b7ad6b7169203331-01")), id);
        assert_eq!(trace_id_of("00-short-b7ad6b7169203331-01"), "");
        assert_eq!(trace_id_of(&format!("00-{id}-b7ad6b7169203331-01-x")), "");
    }

    #[test]
    fn the_served_model_is_cut_on_a_character_boundary() {
        let long = "é".repeat(reservation::MAX_MODEL_BYTES);
        let cut = bounded_model(long);
        assert!(cut.len() <= reservation::MAX_MODEL_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
