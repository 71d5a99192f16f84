//! Demand per model, estimated from the usage streams agents send: request
//! and token rates as exponentially decaying averages. Placement reads rates
//! through the [`Demand`] trait so tests and simulations can supply their
//! own.

use super::ModelId;
use allot::clock::UnixMs;

/// Recent demand for models, in events per second at `now`.
pub trait Demand {
    /// Requests per second.
    fn request_rate(&self, model: ModelId, now: UnixMs) -> f64;
    /// Tokens (prompt + completion) per second.
    fn token_rate(&self, model: ModelId, now: UnixMs) -> f64;
}

/// No demand at all: every model is equally cold.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDemand;

impl Demand for NoDemand {
    fn request_rate(&self, _: ModelId, _: UnixMs) -> f64 {
        0.0
    }
    fn token_rate(&self, _: ModelId, _: UnixMs) -> f64 {
        0.0
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    /// Requests per millisecond, as of `at`.
    requests: f64,
    /// Tokens per millisecond, as of `at`.
    tokens: f64,
    at: UnixMs,
}

/// Exponentially decaying rate estimates: each event adds `1/tau` and the
/// sum decays as `exp(-dt/tau)`, which is an unbiased estimate of a steady
/// Poisson rate and forgets with the configured half-life.
#[derive(Clone, Debug)]
pub struct DemandTracker {
    tau_ms: f64,
    rates: Vec<Rates>,
}

impl DemandTracker {
    pub fn new(half_life_ms: i64) -> Self {
        DemandTracker {
            tau_ms: (half_life_ms.max(1) as f64) / std::f64::consts::LN_2,
            rates: Vec::new(),
        }
    }

    /// Ingests one request of `tokens` tokens for `model` at `at`.
    pub fn record(&mut self, model: ModelId, at: UnixMs, tokens: u64) {
        if self.rates.len() <= model.index() {
            self.rates.resize(model.index() + 1, Rates::default());
        }
        let tau = self.tau_ms;
        let rates = &mut self.rates[model.index()];
        if rates.requests == 0.0 && rates.tokens == 0.0 {
            rates.at = at;
        }
        if at >= rates.at {
            let decay = (-((at - rates.at) as f64) / tau).exp();
            rates.requests = rates.requests * decay + 1.0 / tau;
            rates.tokens = rates.tokens * decay + tokens as f64 / tau;
            rates.at = at;
        } else {
            // Late event: count it, decayed to the estimate's own instant.
            let decay = (-((rates.at - at) as f64) / tau).exp();
            rates.requests += decay / tau;
            rates.tokens += tokens as f64 * decay / tau;
        }
    }

    fn decayed(&self, model: ModelId, now: UnixMs) -> Rates {
        let Some(rates) = self.rates.get(model.index()).copied() else {
            return Rates::default();
        };
        let decay = (-((now - rates.at).max(0) as f64) / self.tau_ms).exp();
        Rates {
            requests: rates.requests * decay,
            tokens: rates.tokens * decay,
            at: now,
        }
    }
}

impl Demand for DemandTracker {
    fn request_rate(&self, model: ModelId, now: UnixMs) -> f64 {
        self.decayed(model, now).requests * 1000.0
    }

    fn token_rate(&self, model: ModelId, now: UnixMs) -> f64 {
        self.decayed(model, now).tokens * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_tracker_estimates_a_steady_rate_then_decays_by_half_life() {
        let mut tracker = DemandTracker::new(60_000);
        let model = ModelId(3);
        // 2 requests per second of 100 tokens, for 10 minutes.
        let mut at = 0;
        while at < 600_000 {
            tracker.record(model, at, 100);
            at += 500;
        }
        let rate = tracker.request_rate(model, at);
        assert!((rate - 2.0).abs() < 0.05, "rate {rate}");
        let tokens = tracker.token_rate(model, at);
        assert!((tokens - 200.0).abs() < 5.0, "tokens {tokens}");
        let later = tracker.request_rate(model, at + 60_000);
        assert!((later - rate / 2.0).abs() < 0.01, "half-life: {later}");
        assert_eq!(tracker.request_rate(ModelId(9), at), 0.0);
    }
}
