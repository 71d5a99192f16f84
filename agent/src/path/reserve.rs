//! Step: bound and reserve. The request's upper bound of cost (prompt
//! bound plus the completion it may produce, priced with the tariffs read
//! at admission) is reserved from the key's local allowance slice before
//! anything is dispatched. When the slice is short, the coordinator is
//! asked and the request waits, at most `allowance_wait_ms`, for a grant.
//! An exhausted budget is 429 (`insufficient_quota` or
//! `rate_limit_exceeded`), never 402; an allowance that cannot be had in
//! time is 503.

use crate::allowance::{Admission, CachedDeny, DenyKind, Reservation};
use crate::api_error::ApiError;
use crate::config::AgentConfig;
use crate::Coordinator;
use allot::reservation::RequestFacts;
use allot::tariff::Price;
use allot::{Amounts, Unit};
use rust_decimal::Decimal;
use std::time::Instant;
use tracing::Instrument;

/// What admission decided for one request.
pub struct Plan {
    pub reservation: Reservation,
    /// Completion tokens per choice the request may produce.
    pub completion: u64,
}

/// Reserves the request's upper bound, waiting briefly for a grant when the
/// slice is short. When the client set no `max_tokens`, the completion is
/// the smaller of the configured default and what the allowance pays for.
pub async fn reserve(
    coordinator: &Coordinator,
    config: &AgentConfig,
    key_id: &str,
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
    let table = &coordinator.table;
    let link = &coordinator.link;
    let attempt = |now: Instant| {
        let mut chosen = most;
        let admission = table.try_reserve_with(
            key_id,
            &min_need,
            |usable| {
                chosen = affordable_completion(usable, facts, price, least, most);
                cost_of(chosen)
            },
            now,
        );
        (admission, chosen)
    };
    let deadline = Instant::now() + config.allowance_wait();
    // Most requests fit the slice: the first attempt is made without the
    // key's wake-up. One that falls short registers for it and looks
    // again before it waits, so a grant arriving in between is not missed.
    let mut registered = false;
    loop {
        let now = Instant::now();
        let notify = registered.then(|| table.notify_of(key_id, now));
        let notified = notify.as_deref().map(tokio::sync::Notify::notified);
        tokio::pin!(notified);
        if let Some(notified) = notified.as_mut().as_pin_mut() {
            notified.enable();
        }
        let (admission, chosen) = attempt(now);
        match admission {
            Admission::Reserved(reservation) => {
                maybe_refill(coordinator, config, key_id);
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
                    let want = want_for(coordinator, config, key_id, &max_need, now);
                    if !link.ask(key_id, &shortfall, &want) {
                        table.ask_failed(key_id);
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
                    table.ask_failed(key_id);
                    return Err(ApiError::unavailable(
                        if link.is_connected() {
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

/// The refusal a cached deny from the coordinator stands for: a budget or
/// rate limit is 429 (never 402), budget held by other agents 503.
pub fn deny_error(deny: &CachedDeny, now: Instant) -> ApiError {
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

/// What to ask for: the key's recent demand over one refresh interval, or,
/// before there is any, `grant_multiplier` requests like this one; never
/// less than this request.
fn want_for(
    coordinator: &Coordinator,
    config: &AgentConfig,
    key_id: &str,
    need: &Amounts,
    now: Instant,
) -> Amounts {
    let demand = coordinator
        .table
        .demand(key_id, config.refresh_interval(), now);
    let base = if demand.is_zero() {
        scaled(need, config.grant_multiplier)
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
fn maybe_refill(coordinator: &Coordinator, config: &AgentConfig, key_id: &str) {
    if let Some(want) =
        coordinator
            .table
            .wants_refill(key_id, config.refresh_interval(), Instant::now())
    {
        if !coordinator.link.ask(key_id, &Amounts::zero(), &want) {
            coordinator.table.ask_failed(key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::testing;
    use allot::reservation::{Operation, ReservationPolicy};
    use axum::http::StatusCode;
    use std::time::Duration;

    /// A chat request with a prompt bound of `prompt` tokens and the
    /// client's `max_tokens`, if any.
    fn facts(max_tokens: Option<u64>, choices: u64) -> RequestFacts {
        let mut body = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "n": choices,
        });
        if let Some(max) = max_tokens {
            body["max_tokens"] = max.into();
        }
        let serde_json::Value::Object(body) = body else {
            unreachable!()
        };
        allot::reservation::inspect(
            Operation::ChatCompletions,
            &body,
            &ReservationPolicy::default(),
        )
        .unwrap()
    }

    /// Reserves for key `k` with a default `max_tokens` of 500.
    async fn reserve_for(
        agent: &testing::TestAgent,
        facts: &RequestFacts,
    ) -> Result<Plan, ApiError> {
        let state = &agent.state;
        reserve(
            &state.coordinator,
            &state.config,
            "k",
            facts,
            500,
            Price::Free,
        )
        .await
    }

    fn config() -> AgentConfig {
        AgentConfig {
            allowance_wait_ms: 50,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_whole_bound_is_reserved_before_dispatch() {
        let agent = testing::agent(config());
        let coordinator = &agent.state.coordinator;
        testing::grant(&agent.state, "k", 1_000_000);
        let facts = facts(Some(40), 2);
        let plan = reserve_for(&agent, &facts).await.unwrap();
        assert_eq!(plan.completion, 40);
        assert_eq!(
            plan.reservation.amount.get(Unit::Tokens),
            Some(Decimal::from(facts.prompt_tokens_bound + 80)),
            "prompt bound plus max_tokens for each choice"
        );
        let left = coordinator.table.available("k").unwrap();
        assert_eq!(
            left.get(Unit::Tokens),
            Some(Decimal::from(1_000_000 - facts.prompt_tokens_bound - 80)),
            "taken from the slice at once"
        );
    }

    #[tokio::test]
    async fn without_max_tokens_the_completion_is_what_the_slice_pays_for() {
        let agent = testing::agent(config());
        let facts = facts(None, 1);
        testing::grant(&agent.state, "k", facts.prompt_tokens_bound + 30);
        let plan = reserve_for(&agent, &facts).await.unwrap();
        assert_eq!(plan.completion, 30, "not the default of 500");
    }

    #[tokio::test]
    async fn a_short_slice_without_a_coordinator_is_503_and_nothing_is_reserved() {
        let agent = testing::agent(config());
        let coordinator = &agent.state.coordinator;
        testing::grant(&agent.state, "k", 10);
        let error = reserve_for(&agent, &facts(Some(100), 1))
            .await
            .err()
            .unwrap();
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            coordinator.table.available("k").unwrap().get(Unit::Tokens),
            Some(Decimal::from(10))
        );
    }

    #[tokio::test]
    async fn an_exhausted_budget_is_429_never_402() {
        let agent = testing::agent(config());
        let coordinator = &agent.state.coordinator;
        let now = Instant::now();
        for (kind, code) in [
            (DenyKind::InsufficientQuota, "insufficient_quota"),
            (DenyKind::RateLimited, "rate_limit_exceeded"),
        ] {
            coordinator.table.deny(
                "k",
                CachedDeny {
                    kind,
                    until: now + Duration::from_secs(30),
                    shortfall: Amounts::request(1, Decimal::ZERO),
                    message: "cap reached".into(),
                },
                now,
            );
            let error = reserve_for(&agent, &facts(Some(10), 1))
                .await
                .err()
                .unwrap();
            assert_eq!(error.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(error.code_label(), code);
        }
    }

    #[test]
    fn deny_errors_carry_their_retry_time() {
        let now = Instant::now();
        let deny = |kind| CachedDeny {
            kind,
            until: now + Duration::from_millis(2_500),
            shortfall: Amounts::zero(),
            message: "m".into(),
        };
        assert_eq!(
            deny_error(&deny(DenyKind::RateLimited), now).retry_after,
            Some(3)
        );
        let held = deny_error(&deny(DenyKind::HeldElsewhere), now);
        assert_eq!(held.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(held.retry_after, Some(3));
        assert_eq!(
            deny_error(&deny(DenyKind::KeyRevoked), now).status,
            StatusCode::UNAUTHORIZED
        );
    }
}
