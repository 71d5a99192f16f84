//! Step: concurrency. Requests in flight on this agent, in total and per
//! key, bounded by `max_concurrent_requests` and `max_concurrent_per_key`
//! (0: no bound). A slot is taken once the request body is in (a slow body never holds
//! one), before admission, and held until the response, streamed or not, is
//! done (or the client leaves).

use crate::api_error::ApiError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct InFlight {
    total: AtomicUsize,
    max_total: usize,
    max_per_key: usize,
    per_key: Mutex<HashMap<String, usize>>,
}

/// Which bound refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Agent(usize),
    Key(usize),
}

/// One request's place; released on drop.
pub struct Slot {
    owner: Arc<InFlight>,
    key_id: Option<String>,
}

impl InFlight {
    pub fn new(max_total: usize, max_per_key: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            total: AtomicUsize::new(0),
            max_total,
            max_per_key,
            per_key: Mutex::new(HashMap::new()),
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn enter(self: &Arc<Self>, key_id: &str) -> Result<Slot, Full> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total > 0 && before >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Agent(self.max_total));
        }
        let mut slot = Slot {
            owner: self.clone(),
            key_id: None,
        };
        if self.max_per_key > 0 {
            let mut per_key = self.lock();
            let count = per_key.entry(key_id.to_string()).or_insert(0);
            if *count >= self.max_per_key {
                drop(per_key);
                return Err(Full::Key(self.max_per_key)); // `slot` releases the total
            }
            *count += 1;
            slot.key_id = Some(key_id.to_string());
        }
        Ok(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.per_key.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a place in the agent's and the key's concurrency bounds, or
/// refuses: 503 when the agent is full, 429 when the key is.
pub fn enter(in_flight: &Arc<InFlight>, key_id: &str) -> Result<Slot, ApiError> {
    in_flight.enter(key_id).map_err(|full| match full {
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

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(key_id) = &self.key_id {
            let mut per_key = self.owner.lock();
            if let Some(count) = per_key.get_mut(key_id) {
                *count -= 1;
                if *count == 0 {
                    per_key.remove(key_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_and_slots_are_released_on_drop() {
        let in_flight = InFlight::new(3, 2);
        let a1 = in_flight.enter("a").unwrap();
        let _a2 = in_flight.enter("a").unwrap();
        assert_eq!(in_flight.enter("a").err(), Some(Full::Key(2)));
        let _b1 = in_flight.enter("b").unwrap();
        assert_eq!(in_flight.enter("c").err(), Some(Full::Agent(3)));
        assert_eq!(in_flight.total(), 3);
        drop(a1);
        assert_eq!(in_flight.total(), 2);
        let _a3 = in_flight.enter("a").unwrap();
        assert_eq!(in_flight.total(), 3);
    }

    #[test]
    fn no_bounds_means_no_refusals() {
        let in_flight = InFlight::new(0, 0);
        let slots: Vec<Slot> = (0..1000).map(|_| in_flight.enter("k").unwrap()).collect();
        assert_eq!(in_flight.total(), 1000);
        drop(slots);
        assert_eq!(in_flight.total(), 0);
    }

    #[test]
    fn a_full_agent_is_503_and_a_full_key_is_429() {
        use axum::http::StatusCode;
        let in_flight = InFlight::new(2, 1);
        let _a = enter(&in_flight, "a").unwrap();
        let key_full = enter(&in_flight, "a").err().unwrap();
        assert_eq!(key_full.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(key_full.message.contains("1 concurrent requests per key"));
        let _b = enter(&in_flight, "b").unwrap();
        let agent_full = enter(&in_flight, "c").err().unwrap();
        assert_eq!(agent_full.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(agent_full.retry_after, Some(1));
    }
}
