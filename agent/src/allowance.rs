//! The agent's allowances: per key, the slice of budget the coordinator
//! granted (`available`), what in-flight requests reserved from it, its
//! lease, and the last refusal. Admission takes a reservation from here
//! without waiting on anything unless the slice is short.
//!
//! This table is the one place that numbers usage records: a settlement
//! moves the request's reservation out of `in_flight` and takes its sequence
//! number under the same lock, so a Hello report (what the agent holds, and
//! the highest number already taken out of it) is always consistent.
//!
//! A `std::sync::Mutex` is right here: it is held for a few hundred
//! nanoseconds, never across an `.await`.

use allot::{Amounts, Unit};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Length of one demand-measuring window.
const DEMAND_WINDOW: Duration = Duration::from_secs(1);

/// Why the coordinator refused an ask, as the agent caches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    InsufficientQuota,
    RateLimited,
    KeyRevoked,
    UnknownKey,
    /// The cap has room but other agents hold it (transient).
    HeldElsewhere,
}

#[derive(Debug, Clone)]
pub struct CachedDeny {
    pub kind: DenyKind,
    /// Until when the refusal stands (the refill time for rate limits).
    pub until: Instant,
    /// The shortfall it was given for: a smaller one may still be granted.
    pub shortfall: Amounts,
    pub message: String,
}

/// What a limit leaves this agent now, for the x-ratelimit-* headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitLeft {
    pub cap: Decimal,
    pub remaining: Decimal,
    pub reset_at: Option<Instant>,
}

/// A limit as last seen from a grant, for the x-ratelimit-* headers.
#[derive(Debug, Clone)]
pub struct LimitSeen {
    pub unit: Unit,
    pub cap: Decimal,
    /// What no agent held under this limit at the grant (the cap less
    /// settled spend and every slice, this agent's included), plus what
    /// this agent gave back since. The headers add the slice still
    /// available here.
    pub free: Decimal,
    pub reset_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Slice {
    available: Amounts,
    in_flight: Amounts,
    lease_until: Option<Instant>,
    lease_ttl: Duration,
    deny: Option<CachedDeny>,
    ask_in_flight: bool,
    /// The shortfall the ask in flight was sent for.
    asked: Amounts,
    last_used: Instant,
    limits: Vec<LimitSeen>,
    /// Reservations taken in the current and the previous demand window.
    demand_now: Amounts,
    demand_prev: Amounts,
    demand_since: Instant,
    notify: Arc<Notify>,
}

impl Slice {
    /// Less than a tenth of some limit's cap was free at the last grant.
    fn scarce(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.free.saturating_mul(Decimal::TEN) < l.cap)
    }

    fn new(now: Instant) -> Slice {
        Slice {
            // No grant yet: every unit is short until the coordinator says
            // which units are limited.
            available: Amounts::zero(),
            in_flight: Amounts::zero(),
            lease_until: None,
            lease_ttl: Duration::ZERO,
            deny: None,
            ask_in_flight: false,
            asked: Amounts::zero(),
            last_used: now,
            limits: Vec::new(),
            demand_now: Amounts::zero(),
            demand_prev: Amounts::zero(),
            demand_since: now,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Rolls the demand windows forward to `now`.
    fn roll_demand(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.demand_since);
        if elapsed >= DEMAND_WINDOW * 2 {
            self.demand_prev = Amounts::zero();
            self.demand_now = Amounts::zero();
            self.demand_since = now;
        } else if elapsed >= DEMAND_WINDOW {
            self.demand_prev = self.demand_now;
            self.demand_now = Amounts::zero();
            self.demand_since += DEMAND_WINDOW;
        }
    }

    /// Recent demand scaled to `interval`: reservations per second over the
    /// last one to two windows, times the interval.
    fn demand_over(&self, interval: Duration, now: Instant) -> Amounts {
        let span = DEMAND_WINDOW
            + now
                .saturating_duration_since(self.demand_since)
                .min(DEMAND_WINDOW);
        let scale = Decimal::from(interval.as_millis() as u64)
            / Decimal::from(span.as_millis().max(1) as u64);
        let mut out = self.demand_prev.add(&self.demand_now);
        for v in out.0.iter_mut().flatten() {
            *v *= scale;
        }
        out
    }

    fn lease_valid(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|until| now < until)
    }

    /// Counts a lease that lapsed before it was renewed, once.
    fn note_expiry(&mut self, now: Instant) {
        if self.lease_until.is_some_and(|until| now >= until) {
            metrics::counter!("allot_agent_lease_expiries_total").increment(1);
            self.lease_until = None;
        }
    }

    /// What `need` lacks in each limited unit; zero when it fits.
    fn shortfall(&self, need: &Amounts, now: Instant) -> Amounts {
        let valid = self.lease_valid(now);
        let mut short = Amounts::UNLIMITED;
        for unit in Unit::ALL {
            let Some(available) = self.available.get(unit) else {
                continue;
            };
            let available = if valid { available } else { Decimal::ZERO };
            let lack = (need.value(unit) - available).max(Decimal::ZERO);
            short.set(unit, Some(lack));
        }
        short
    }
}

/// A reservation taken by admission; settle it exactly once.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub key_id: String,
    pub amount: Amounts,
}

pub enum Admission {
    Reserved(Reservation),
    /// The slice cannot cover the request. Wait on the key's notify for a
    /// grant or a refusal; `send_ask` says whether this caller must send
    /// the ask (only the first short caller does).
    Short {
        shortfall: Amounts,
        send_ask: bool,
    },
    Denied(CachedDeny),
}

/// Per-key slices of this agent.
#[derive(Default)]
pub struct AllowanceTable {
    inner: Mutex<TableState>,
}

#[derive(Debug, Clone, Default)]
struct TableState {
    slices: HashMap<String, Slice>,
    /// Sequence number of the last usage record numbered.
    last_seq: u64,
    /// Usage of numbered records the coordinator has not acknowledged yet,
    /// by sequence number: part of what this agent holds until settled.
    unacked: std::collections::BTreeMap<u64, (String, Amounts)>,
}

/// What one slice holds, for a Hello.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceHeld {
    pub key_id: String,
    pub held: Amounts,
}

/// A copy of the table as it is now, with fresh wake-ups: for the
/// simulation and the model check, which explore many futures of one state.
impl Clone for AllowanceTable {
    fn clone(&self) -> AllowanceTable {
        let mut state = self.lock().clone();
        for slice in state.slices.values_mut() {
            slice.notify = Arc::new(Notify::new());
        }
        AllowanceTable {
            inner: Mutex::new(state),
        }
    }
}

/// The table's state, slices in key order (a canonical form: equal tables
/// print alike).
impl std::fmt::Debug for AllowanceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        let slices: std::collections::BTreeMap<&String, &Slice> = state.slices.iter().collect();
        f.debug_struct("AllowanceTable")
            .field("slices", &slices)
            .field("last_seq", &state.last_seq)
            .field("unacked", &state.unacked)
            .finish()
    }
}

impl AllowanceTable {
    pub fn new(last_seq: u64) -> AllowanceTable {
        AllowanceTable {
            inner: Mutex::new(TableState {
                slices: HashMap::new(),
                last_seq,
                unacked: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableState> {
        // A panic while holding this lock cannot leave a half-applied
        // change (every update is a few assignments), so poisoning is moot.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `need` from the key's slice if it fits.
    pub fn try_reserve(&self, key_id: &str, need: &Amounts, now: Instant) -> Admission {
        self.try_reserve_with(key_id, need, |_| *need, now)
    }

    /// Takes a reservation of at least `min_need`: when that fits, `fit`
    /// chooses the reservation from what is usable (it must stay between
    /// `min_need` and the usable amounts).
    pub fn try_reserve_with(
        &self,
        key_id: &str,
        min_need: &Amounts,
        fit: impl FnOnce(&Amounts) -> Amounts,
        now: Instant,
    ) -> Admission {
        let mut state = self.lock();
        let slice = state
            .slices
            .entry(key_id.to_string())
            .or_insert_with(|| Slice::new(now));
        slice.last_used = now;
        slice.note_expiry(now);
        let short = slice.shortfall(min_need, now);
        if short.is_zero() {
            let need = fit(&slice.available);
            debug_assert!(
                slice.shortfall(&need, now).is_zero(),
                "fit chose more than is usable"
            );
            for unit in Unit::ALL {
                if let Some(available) = slice.available.0[unit.index()].as_mut() {
                    *available -= need.value(unit);
                }
            }
            slice.in_flight = slice.in_flight.add(&need);
            slice.roll_demand(now);
            slice.demand_now = slice.demand_now.add(&need);
            return Admission::Reserved(Reservation {
                key_id: key_id.to_string(),
                amount: need,
            });
        }
        if let Some(deny) = &slice.deny {
            let covers = Unit::ALL
                .iter()
                .all(|u| short.value(*u) >= deny.shortfall.value(*u) || short.value(*u).is_zero());
            if now < deny.until
                && (covers || matches!(deny.kind, DenyKind::KeyRevoked | DenyKind::UnknownKey))
            {
                return Admission::Denied(deny.clone());
            }
        }
        let send_ask = !slice.ask_in_flight;
        if send_ask {
            slice.asked = short;
        }
        slice.ask_in_flight = true;
        Admission::Short {
            shortfall: short,
            send_ask,
        }
    }

    /// The key's wake-up: register on it before `try_reserve`, so that a
    /// grant arriving in between is not missed.
    pub fn notify_of(&self, key_id: &str, now: Instant) -> Arc<Notify> {
        let mut state = self.lock();
        state
            .slices
            .entry(key_id.to_string())
            .or_insert_with(|| Slice::new(now))
            .notify
            .clone()
    }

    /// Settles a reservation at `actual`: the unused part returns to
    /// `available` at once. Returns the record's sequence number; `emit`
    /// runs under the lock so records leave in sequence order.
    pub fn settle(
        &self,
        reservation: &Reservation,
        actual: &Amounts,
        emit: impl FnOnce(u64),
    ) -> u64 {
        let mut state = self.lock();
        state.last_seq += 1;
        let seq = state.last_seq;
        if let Some(slice) = state.slices.get_mut(&reservation.key_id) {
            slice.in_flight = slice.in_flight.saturating_sub(&reservation.amount);
            for unit in Unit::ALL {
                if let Some(available) = slice.available.0[unit.index()].as_mut() {
                    *available += reservation.amount.value(unit) - actual.value(unit);
                }
            }
        }
        state
            .unacked
            .insert(seq, (reservation.key_id.clone(), *actual));
        emit(seq);
        seq
    }

    /// Numbers a record that settles nothing (a refusal): it takes the
    /// next sequence number and holds nothing; `emit` runs under the lock
    /// so records leave in sequence order.
    pub fn number(&self, emit: impl FnOnce(u64)) -> u64 {
        let mut state = self.lock();
        state.last_seq += 1;
        let seq = state.last_seq;
        emit(seq);
        seq
    }

    /// Records up to `high_water_seq` are settled: they no longer count in
    /// what this agent holds.
    pub fn ack(&self, high_water_seq: u64) {
        let mut state = self.lock();
        state.unacked = state.unacked.split_off(&high_water_seq.saturating_add(1));
    }

    /// Usage of a record recovered from the spool after a restart: it
    /// counts in what this agent holds until the coordinator settles it.
    pub fn recover(&self, seq: u64, key_id: &str, actual: Amounts) {
        self.lock()
            .unacked
            .insert(seq, (key_id.to_string(), actual));
    }

    /// Sequence number of the last record numbered.
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Never number a record at or below what the coordinator settled.
    pub fn raise_seq(&self, at_least: u64) {
        let mut state = self.lock();
        state.last_seq = state.last_seq.max(at_least);
    }

    /// Applies a grant: adds to the slice and renews its lease.
    pub fn grant(
        &self,
        key_id: &str,
        amount: &Amounts,
        ttl: Duration,
        margin: Duration,
        limits: Vec<LimitSeen>,
        now: Instant,
    ) {
        let mut state = self.lock();
        let slice = state
            .slices
            .entry(key_id.to_string())
            .or_insert_with(|| Slice::new(now));
        for unit in Unit::ALL {
            let merged = match (slice.available.get(unit), amount.get(unit)) {
                (_, None) => None,
                (current, Some(add)) => Some(current.unwrap_or_default() + add),
            };
            slice.available.set(unit, merged);
        }
        slice.lease_ttl = ttl;
        slice.lease_until = Some(now + ttl.saturating_sub(margin));
        slice.deny = None;
        slice.ask_in_flight = false;
        slice.limits = limits;
        slice.notify.notify_waiters();
    }

    /// Records a refusal and wakes the waiters.
    pub fn deny(&self, key_id: &str, deny: CachedDeny, now: Instant) {
        let mut state = self.lock();
        let slice = state
            .slices
            .entry(key_id.to_string())
            .or_insert_with(|| Slice::new(now));
        slice.deny = Some(deny);
        slice.ask_in_flight = false;
        slice.notify.notify_waiters();
    }

    /// The ask for this key is lost (disconnect): let the next caller ask.
    pub fn ask_failed(&self, key_id: &str) {
        let mut state = self.lock();
        if let Some(slice) = state.slices.get_mut(key_id) {
            slice.ask_in_flight = false;
            slice.notify.notify_waiters();
        }
    }

    /// Every ask in flight is lost (the session ended): wake the waiters
    /// so that they fail or ask again.
    pub fn fail_all_asks(&self) {
        let mut state = self.lock();
        for slice in state.slices.values_mut() {
            slice.ask_in_flight = false;
            slice.notify.notify_waiters();
        }
    }

    /// The shortfall the ask in flight for `key_id` was sent for.
    pub fn pending_shortfall(&self, key_id: &str) -> Amounts {
        self.lock()
            .slices
            .get(key_id)
            .map(|s| s.asked)
            .unwrap_or_default()
    }

    /// Forgets cached refusals of a key (something about it changed).
    pub fn clear_deny(&self, key_id: &str) {
        let mut state = self.lock();
        if let Some(slice) = state.slices.get_mut(key_id) {
            slice.deny = None;
            slice.notify.notify_waiters();
        }
    }

    /// Takes back the unspent part of a slice (revocation, idleness) and
    /// returns it so that the caller gives it back to the coordinator.
    pub fn take_available(&self, key_id: &str) -> Option<Amounts> {
        let mut state = self.lock();
        let slice = state.slices.get_mut(key_id)?;
        let mut taken = Amounts::UNLIMITED;
        for unit in Unit::ALL {
            if let Some(available) = slice.available.get(unit) {
                taken.set(unit, Some(available.max(Decimal::ZERO)));
                slice.available.set(unit, Some(Decimal::ZERO));
            }
        }
        for limit in &mut slice.limits {
            limit.free += taken.value(limit.unit);
        }
        slice.lease_until = None;
        let empty = slice.in_flight.is_zero();
        if empty {
            state.slices.remove(key_id);
        }
        Some(taken)
    }

    /// Keys idle since `idle` with nothing in flight.
    ///
    /// A slice of a scarce key (under some limit, less than a tenth of the
    /// cap was free at the last grant) is idle after a tenth of `idle`:
    /// what no request here uses should not keep another agent waiting.
    pub fn idle_keys(&self, idle: Duration, now: Instant) -> Vec<String> {
        let scarce_idle = (idle / 10).max(Duration::from_millis(500)).min(idle);
        self.lock()
            .slices
            .iter()
            .filter(|(_, s)| {
                let after = if s.scarce() { scarce_idle } else { idle };
                s.in_flight.is_zero() && now.duration_since(s.last_used) >= after
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keys whose lease ends within a third of its length and that were
    /// used since the last grant: renew them before they lapse.
    pub fn leases_to_renew(&self, now: Instant) -> Vec<String> {
        let mut state = self.lock();
        let mut keys = Vec::new();
        for (key_id, slice) in state.slices.iter_mut() {
            let Some(until) = slice.lease_until else {
                continue;
            };
            let due = until.saturating_duration_since(now) < slice.lease_ttl / 3;
            if due && !slice.ask_in_flight {
                slice.ask_in_flight = true;
                keys.push(key_id.clone());
            }
        }
        keys
    }

    /// The key's recent demand over `interval`, for the `want` of an ask.
    pub fn demand(&self, key_id: &str, interval: Duration, now: Instant) -> Amounts {
        let mut state = self.lock();
        match state.slices.get_mut(key_id) {
            Some(slice) => {
                slice.roll_demand(now);
                slice.demand_over(interval, now)
            }
            None => Amounts::zero(),
        }
    }

    /// The `want` of a background ask when the slice will not last half of
    /// `interval` at its recent demand; marks the ask in flight.
    pub fn wants_refill(&self, key_id: &str, interval: Duration, now: Instant) -> Option<Amounts> {
        let mut state = self.lock();
        let slice = state.slices.get_mut(key_id)?;
        if slice.ask_in_flight || slice.deny.is_some() {
            return None;
        }
        slice.roll_demand(now);
        let demand = slice.demand_over(interval, now);
        let low = Unit::ALL
            .iter()
            .any(|u| match (slice.available.get(*u), demand.get(*u)) {
                (Some(a), Some(d)) if d > Decimal::ZERO => a * Decimal::from(2) < d,
                _ => false,
            });
        if !low {
            return None;
        }
        slice.ask_in_flight = true;
        slice.asked = Amounts::zero();
        Some(demand)
    }

    /// What each key's slice holds, for a Reconcile sent once the
    /// coordinator's high-water mark is known (acknowledge it first with
    /// Per key with something in flight, what its requests in flight
    /// reserved plus the usage of finished requests not yet acknowledged,
    /// sorted by key: for operators' snapshots (`in_flight`).
    pub fn in_flight_report(&self) -> Vec<SliceHeld> {
        let state = self.lock();
        let mut totals: std::collections::BTreeMap<String, Amounts> = state
            .slices
            .iter()
            .filter(|(_, slice)| !slice.in_flight.is_zero())
            .map(|(key_id, slice)| (key_id.clone(), slice.in_flight))
            .collect();
        for (key_id, usage) in state.unacked.values() {
            let total = totals.entry(key_id.clone()).or_insert_with(Amounts::zero);
            *total = total.add(usage);
        }
        totals
            .into_iter()
            .filter(|(_, held)| !held.is_zero())
            .map(|(key_id, held)| SliceHeld { key_id, held })
            .collect()
    }

    /// [`AllowanceTable::ack`]): unspent allowance, reservations in flight,
    /// and the usage of records not yet acknowledged. Slices whose lease
    /// lapsed report no unspent allowance: this report gives it back.
    pub fn report(&self, now: Instant) -> Vec<SliceHeld> {
        let mut state = self.lock();
        let mut totals: HashMap<String, Amounts> = HashMap::new();
        for slice_key in state.slices.keys() {
            totals.insert(slice_key.clone(), Amounts::UNLIMITED);
        }
        let unacked: Vec<(String, Amounts)> = state.unacked.values().cloned().collect();
        for (key_id, slice) in state.slices.iter_mut() {
            slice.ask_in_flight = false;
            if !slice.lease_valid(now) {
                for unit in Unit::ALL {
                    if slice.available.get(unit).is_some() {
                        slice.available.set(unit, Some(Decimal::ZERO));
                    }
                }
            }
            let mut total = slice.available.add(&slice.in_flight);
            for unit in Unit::ALL {
                if let Some(v) = total.0[unit.index()].as_mut() {
                    *v = (*v).max(Decimal::ZERO);
                }
                if slice.available.get(unit).is_none() {
                    total.set(unit, None);
                }
            }
            totals.insert(key_id.clone(), total);
        }
        for (key_id, usage) in unacked {
            let total = totals.entry(key_id).or_insert(Amounts::zero());
            for unit in Unit::ALL {
                if let Some(v) = total.0[unit.index()].as_mut() {
                    *v += usage.value(unit);
                }
            }
        }
        totals
            .into_iter()
            .map(|(key_id, held)| SliceHeld { key_id, held })
            .collect()
    }

    /// For each of `units`, the tightest limit seen at the last grant: the
    /// one under which this agent may use the least now (what was free
    /// then, plus the slice still available here; the first such limit on
    /// a tie), for the headers.
    pub fn tightest_limits<const N: usize>(
        &self,
        key_id: &str,
        units: [Unit; N],
    ) -> [Option<LimitLeft>; N] {
        let state = self.lock();
        let Some(slice) = state.slices.get(key_id) else {
            return [None; N];
        };
        units.map(|unit| {
            let mut tightest: Option<LimitLeft> = None;
            for limit in slice.limits.iter().filter(|l| l.unit == unit) {
                let available = slice.available.value(unit).max(Decimal::ZERO);
                let remaining = limit.free + available;
                if tightest.is_none_or(|t| remaining < t.remaining) {
                    tightest = Some(LimitLeft {
                        cap: limit.cap,
                        remaining,
                        reset_at: limit.reset_at,
                    });
                }
            }
            tightest
        })
    }

    /// Available amount per unit (for tests and metrics).
    pub fn available(&self, key_id: &str) -> Option<Amounts> {
        self.lock().slices.get(key_id).map(|s| s.available)
    }

    /// Whether any lease is valid now.
    pub fn has_valid_lease(&self, key_id: &str, now: Instant) -> bool {
        self.lock()
            .slices
            .get(key_id)
            .is_some_and(|s| s.lease_valid(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: i64) -> Amounts {
        Amounts([None, Some(Decimal::from(n)), None])
    }

    fn table_with(tokens_available: i64) -> (AllowanceTable, Instant) {
        let table = AllowanceTable::new(0);
        let now = Instant::now();
        table.grant(
            "k",
            &tokens(tokens_available),
            Duration::from_secs(30),
            Duration::from_secs(1),
            vec![],
            now,
        );
        (table, now)
    }

    #[test]
    fn reservation_within_the_slice_is_taken_at_once() {
        let (table, now) = table_with(100);
        let Admission::Reserved(r) =
            table.try_reserve("k", &Amounts::request(60, Decimal::ZERO), now)
        else {
            panic!("expected a reservation");
        };
        assert_eq!(
            table.available("k").unwrap().get(Unit::Tokens),
            Some(Decimal::from(40))
        );
        assert!(matches!(
            table.try_reserve("k", &Amounts::request(60, Decimal::ZERO), now),
            Admission::Short { .. }
        ));
        table.settle(&r, &Amounts::request(10, Decimal::ZERO), |_| {});
        // 50 unused tokens come back at once.
        assert_eq!(
            table.available("k").unwrap().get(Unit::Tokens),
            Some(Decimal::from(90))
        );
    }

    #[test]
    fn an_expired_lease_admits_nothing() {
        let (table, now) = table_with(100);
        let later = now + Duration::from_secs(30);
        assert!(matches!(
            table.try_reserve("k", &Amounts::request(1, Decimal::ZERO), later),
            Admission::Short { .. }
        ));
    }

    #[test]
    fn only_the_first_short_caller_sends_the_ask() {
        let (table, now) = table_with(0);
        let Admission::Short {
            send_ask: first, ..
        } = table.try_reserve("k", &Amounts::request(1, Decimal::ZERO), now)
        else {
            panic!()
        };
        let Admission::Short {
            send_ask: second, ..
        } = table.try_reserve("k", &Amounts::request(1, Decimal::ZERO), now)
        else {
            panic!()
        };
        assert!(first && !second);
    }

    #[test]
    fn a_cached_deny_refuses_as_large_a_shortfall_but_not_a_smaller_one() {
        let (table, now) = table_with(0);
        table.deny(
            "k",
            CachedDeny {
                kind: DenyKind::InsufficientQuota,
                until: now + Duration::from_secs(60),
                shortfall: tokens(50),
                message: String::new(),
            },
            now,
        );
        assert!(matches!(
            table.try_reserve("k", &Amounts::request(60, Decimal::ZERO), now),
            Admission::Denied(_)
        ));
        assert!(matches!(
            table.try_reserve("k", &Amounts::request(10, Decimal::ZERO), now),
            Admission::Short { .. }
        ));
    }

    #[test]
    fn report_counts_unacknowledged_usage_until_it_is_acknowledged() {
        let (table, now) = table_with(100);
        let Admission::Reserved(r) =
            table.try_reserve("k", &Amounts::request(30, Decimal::ZERO), now)
        else {
            panic!()
        };
        assert_eq!(
            table.report(now)[0].held.get(Unit::Tokens),
            Some(Decimal::from(100))
        );
        let seq = table.settle(&r, &Amounts::request(10, Decimal::ZERO), |_| {});
        assert_eq!(seq, 1);
        // 90 unspent, plus the 10 used that the coordinator has not settled.
        assert_eq!(
            table.report(now)[0].held.get(Unit::Tokens),
            Some(Decimal::from(100))
        );
        table.ack(1);
        assert_eq!(
            table.report(now)[0].held.get(Unit::Tokens),
            Some(Decimal::from(90))
        );
    }

    #[test]
    fn a_lapsed_lease_reports_only_what_is_in_flight() {
        let (table, now) = table_with(100);
        let Admission::Reserved(_) =
            table.try_reserve("k", &Amounts::request(30, Decimal::ZERO), now)
        else {
            panic!()
        };
        let held = table.report(now + Duration::from_secs(60));
        assert_eq!(held[0].held.get(Unit::Tokens), Some(Decimal::from(30)));
    }

    #[test]
    fn a_slice_of_a_scarce_key_is_given_back_ten_times_sooner() {
        let table = AllowanceTable::new(0);
        let now = Instant::now();
        let limit = |free: i64| LimitSeen {
            unit: Unit::Tokens,
            cap: Decimal::from(1_000),
            free: Decimal::from(free),
            reset_at: None,
        };
        for (key, free) in [("plenty", 500), ("scarce", 50)] {
            table.grant(
                key,
                &tokens(100),
                Duration::from_secs(300),
                Duration::from_secs(1),
                vec![limit(free)],
                now,
            );
        }
        let idle = Duration::from_secs(30);
        assert!(table
            .idle_keys(idle, now + Duration::from_secs(2))
            .is_empty());
        assert_eq!(
            table.idle_keys(idle, now + Duration::from_secs(3)),
            vec!["scarce".to_string()]
        );
        let mut both = table.idle_keys(idle, now + Duration::from_secs(30));
        both.sort();
        assert_eq!(both, vec!["plenty".to_string(), "scarce".to_string()]);
    }
}
