//! Spend over a window, and the arithmetic of refills and Retry-After.
//!
//! A rolling window keeps its spend in at most [`ROLLING_BUCKETS`] + 1 time
//! buckets, so memory never grows with traffic. Spend recorded in a bucket
//! counts until the bucket's *end* plus the window length has passed: the
//! counter may hold spend up to one bucket width longer than exact, never
//! shorter, so it can only refuse early, never admit over the cap.

use crate::clock::{self, UnixMs};
use crate::limit::{CalendarPeriod, Window};
use rust_decimal::Decimal;
use std::collections::VecDeque;

/// Buckets per rolling window.
pub const ROLLING_BUCKETS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    pub start: UnixMs,
    #[serde(with = "rust_decimal::serde::str")]
    pub spent: Decimal,
}

/// Settled spend of one limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SpendCounter {
    Balance {
        #[serde(with = "rust_decimal::serde::str")]
        spent: Decimal,
    },
    Rolling {
        seconds: u64,
        buckets: VecDeque<Bucket>,
    },
    Calendar {
        period: CalendarPeriod,
        period_start: UnixMs,
        #[serde(with = "rust_decimal::serde::str")]
        spent: Decimal,
    },
}

fn bucket_width_ms(seconds: u64) -> i64 {
    ((seconds * 1000) / ROLLING_BUCKETS).max(1000) as i64
}

fn period_start(period: CalendarPeriod, at: UnixMs) -> UnixMs {
    match period {
        CalendarPeriod::Day => clock::day_start(at),
        CalendarPeriod::Month => clock::month_start(at),
    }
}

fn next_period_start(period: CalendarPeriod, at: UnixMs) -> UnixMs {
    match period {
        CalendarPeriod::Day => clock::next_day_start(at),
        CalendarPeriod::Month => clock::next_month_start(at),
    }
}

impl SpendCounter {
    pub fn new(window: Window, now: UnixMs) -> SpendCounter {
        match window {
            Window::Balance => SpendCounter::Balance {
                spent: Decimal::ZERO,
            },
            Window::Rolling { seconds } => SpendCounter::Rolling {
                seconds,
                buckets: VecDeque::new(),
            },
            Window::Calendar { period } => SpendCounter::Calendar {
                period,
                period_start: period_start(period, now),
                spent: Decimal::ZERO,
            },
        }
    }

    /// The window this counter was made for.
    pub fn window(&self) -> Window {
        match self {
            SpendCounter::Balance { .. } => Window::Balance,
            SpendCounter::Rolling { seconds, .. } => Window::Rolling { seconds: *seconds },
            SpendCounter::Calendar { period, .. } => Window::Calendar { period: *period },
        }
    }

    /// When spend recorded in the bucket starting at `start` stops counting.
    fn bucket_expiry(seconds: u64, start: UnixMs) -> UnixMs {
        start + bucket_width_ms(seconds) + (seconds * 1000) as i64
    }

    /// Drops what no longer counts at `now`. Called by every mutation.
    fn roll(&mut self, now: UnixMs) {
        match self {
            SpendCounter::Balance { .. } => {}
            SpendCounter::Rolling { seconds, buckets } => {
                while buckets
                    .front()
                    .is_some_and(|b| Self::bucket_expiry(*seconds, b.start) <= now)
                {
                    buckets.pop_front();
                }
            }
            SpendCounter::Calendar {
                period,
                period_start: start,
                spent,
            } => {
                if now >= next_period_start(*period, *start) {
                    *start = period_start(*period, now);
                    *spent = Decimal::ZERO;
                }
            }
        }
    }

    /// Records `amount` of spend at `now`. Negative amounts (refunds) are
    /// allowed and never take the counter below zero.
    pub fn record(&mut self, now: UnixMs, amount: Decimal) {
        self.roll(now);
        match self {
            SpendCounter::Balance { spent } | SpendCounter::Calendar { spent, .. } => {
                *spent = spent.saturating_add(amount).max(Decimal::ZERO);
            }
            SpendCounter::Rolling { seconds, buckets } => {
                let width = bucket_width_ms(*seconds);
                let start = now - now.rem_euclid(width);
                match buckets.back_mut() {
                    Some(last) if last.start >= start => {
                        last.spent = last.spent.saturating_add(amount)
                    }
                    _ => buckets.push_back(Bucket {
                        start,
                        spent: amount,
                    }),
                }
                debug_assert!(buckets.len() as u64 <= ROLLING_BUCKETS + 2);
            }
        }
    }

    /// Spend that counts against the cap at `now`.
    pub fn spent(&self, now: UnixMs) -> Decimal {
        match self {
            SpendCounter::Balance { spent } => *spent,
            SpendCounter::Rolling { seconds, buckets } => buckets
                .iter()
                .filter(|b| Self::bucket_expiry(*seconds, b.start) > now)
                .fold(Decimal::ZERO, |sum, b| sum.saturating_add(b.spent))
                .max(Decimal::ZERO),
            SpendCounter::Calendar {
                period,
                period_start: start,
                spent,
            } => {
                if now >= next_period_start(*period, *start) {
                    Decimal::ZERO
                } else {
                    *spent
                }
            }
        }
    }

    /// When the window next gives spend back: the oldest live bucket's expiry
    /// (rolling) or the next UTC boundary (calendar). `None` for balances and
    /// for rolling windows with nothing to give back.
    pub fn next_refill(&self, now: UnixMs) -> Option<UnixMs> {
        match self {
            SpendCounter::Balance { .. } => None,
            SpendCounter::Rolling { seconds, buckets } => buckets
                .iter()
                .map(|b| Self::bucket_expiry(*seconds, b.start))
                .find(|expiry| *expiry > now),
            SpendCounter::Calendar {
                period,
                period_start: start,
                ..
            } => {
                let boundary = next_period_start(*period, *start);
                Some(if now >= boundary {
                    next_period_start(*period, now)
                } else {
                    boundary
                })
            }
        }
    }

    /// The earliest instant at or after `now` at which
    /// `spent + held + need <= cap`, assuming no new spend and that `held`
    /// (what agents hold) stays held. `None` when that never happens in this
    /// window kind (a balance, or `held + need > cap`).
    pub fn fits_at(
        &self,
        now: UnixMs,
        cap: Decimal,
        held: Decimal,
        need: Decimal,
    ) -> Option<UnixMs> {
        if held.saturating_add(need) > cap {
            return None;
        }
        let budget_for_spend = cap - held - need;
        let mut spent = self.spent(now);
        if spent <= budget_for_spend {
            return Some(now);
        }
        match self {
            SpendCounter::Balance { .. } => None,
            SpendCounter::Calendar { .. } => self.next_refill(now),
            SpendCounter::Rolling { seconds, buckets } => {
                for bucket in buckets {
                    let expiry = Self::bucket_expiry(*seconds, bucket.start);
                    if expiry <= now {
                        continue;
                    }
                    spent -= bucket.spent;
                    if spent <= budget_for_spend {
                        return Some(expiry);
                    }
                }
                None
            }
        }
    }
}

/// Whole seconds from `now` until `at`, at least 1: the value of a
/// `Retry-After` header.
pub fn retry_after_seconds(now: UnixMs, at: UnixMs) -> u64 {
    let ms = (at - now).max(0) as u64;
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMs = 1_795_595_400_000; // 2026-11-25T08:30:00Z

    fn dec(n: i64) -> Decimal {
        Decimal::from(n)
    }

    #[test]
    fn balance_spend_never_ages_out() {
        let mut c = SpendCounter::new(Window::Balance, T0);
        c.record(T0, dec(7));
        assert_eq!(c.spent(T0 + 10 * 365 * 86_400_000), dec(7));
        assert_eq!(c.next_refill(T0), None);
        assert_eq!(c.fits_at(T0, dec(10), dec(0), dec(4)), None);
        assert_eq!(c.fits_at(T0, dec(10), dec(0), dec(3)), Some(T0));
    }

    #[test]
    fn rolling_spend_ages_out_after_the_window() {
        let mut c = SpendCounter::new(Window::Rolling { seconds: 60 }, T0);
        c.record(T0, dec(5));
        assert_eq!(c.spent(T0 + 59_000), dec(5));
        // Bucket width is 1 s for a 60 s window: spend at T0 counts until T0 + 61 s.
        assert_eq!(c.spent(T0 + 61_000), dec(0));
    }

    #[test]
    fn rolling_buckets_do_not_grow_with_traffic() {
        let mut c = SpendCounter::new(Window::Rolling { seconds: 3600 }, T0);
        for i in 0..30_000 {
            c.record(T0 + i * 100, dec(1));
        }
        let SpendCounter::Rolling { buckets, .. } = &c else {
            unreachable!()
        };
        assert!(
            buckets.len() as u64 <= ROLLING_BUCKETS + 1,
            "{}",
            buckets.len()
        );
        assert_eq!(c.spent(T0 + 30_000 * 100), dec(30_000));
    }

    #[test]
    fn rolling_retry_after_is_when_enough_spend_ages_out() {
        let mut c = SpendCounter::new(Window::Rolling { seconds: 60 }, T0);
        c.record(T0, dec(6));
        c.record(T0 + 30_000, dec(4));
        // cap 10, all spent; needing 5 waits for the first 6 to age out.
        let at = c.fits_at(T0 + 31_000, dec(10), dec(0), dec(5)).unwrap();
        assert_eq!(at, T0 + 61_000);
        assert_eq!(retry_after_seconds(T0 + 31_000, at), 30);
        // needing 10 waits for both.
        assert_eq!(
            c.fits_at(T0 + 31_000, dec(10), dec(0), dec(10)),
            Some(T0 + 91_000)
        );
        // needing 11 never fits.
        assert_eq!(c.fits_at(T0 + 31_000, dec(10), dec(0), dec(11)), None);
    }

    #[test]
    fn calendar_day_resets_at_utc_midnight() {
        let mut c = SpendCounter::new(
            Window::Calendar {
                period: CalendarPeriod::Day,
            },
            T0,
        );
        c.record(T0, dec(10));
        let midnight = clock::next_day_start(T0);
        assert_eq!(c.next_refill(T0), Some(midnight));
        assert_eq!(c.fits_at(T0, dec(10), dec(0), dec(1)), Some(midnight));
        assert_eq!(c.spent(midnight - 1), dec(10));
        assert_eq!(c.spent(midnight), dec(0));
        c.record(midnight + 5, dec(1));
        assert_eq!(c.spent(midnight + 5), dec(1));
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        assert_eq!(retry_after_seconds(T0, T0), 1);
        assert_eq!(retry_after_seconds(T0, T0 + 1), 1);
        assert_eq!(retry_after_seconds(T0, T0 + 1001), 2);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const T0: UnixMs = 1_795_595_400_000;

    fn rolling_counter(seconds: u64, records: &[(u32, u32)]) -> (SpendCounter, UnixMs) {
        let mut counter = SpendCounter::new(Window::Rolling { seconds }, T0);
        let mut at = T0;
        for (gap, amount) in records {
            at += i64::from(*gap);
            counter.record(at, Decimal::from(*amount));
        }
        (counter, at)
    }

    proptest! {
        #[test]
        fn rolling_spend_never_grows_without_new_spend(
            seconds in 1u64..7200,
            records in prop::collection::vec((0u32..120_000, 0u32..1000), 0..200),
            later in prop::collection::vec(0u32..600_000, 1..20),
        ) {
            let (counter, mut at) = rolling_counter(seconds, &records);
            let mut last = counter.spent(at);
            for step in later {
                at += i64::from(step);
                let now = counter.spent(at);
                prop_assert!(now <= last);
                last = now;
            }
            // Everything ages out once a window and a bucket have passed.
            prop_assert_eq!(counter.spent(at + (seconds as i64 + 120) * 1000 + 1), Decimal::ZERO);
        }

        #[test]
        fn fits_at_is_the_earliest_instant_the_request_fits(
            seconds in 1u64..3600,
            records in prop::collection::vec((0u32..60_000, 1u32..500), 1..100),
            cap in 1u32..20_000,
            held in 0u32..5_000,
            need in 1u32..5_000,
        ) {
            let (counter, now) = rolling_counter(seconds, &records);
            let (cap, held, need) = (Decimal::from(cap), Decimal::from(held), Decimal::from(need));
            match counter.fits_at(now, cap, held, need) {
                Some(at) => {
                    prop_assert!(at >= now);
                    prop_assert!(counter.spent(at) + held + need <= cap, "does not fit at the answer");
                    if at > now {
                        prop_assert!(counter.spent(at - 1) + held + need > cap, "it already fit earlier");
                    }
                    // Retry-After in whole seconds never undershoots.
                    let seconds = retry_after_seconds(now, at);
                    prop_assert!(seconds >= 1);
                    prop_assert!(now + seconds as i64 * 1000 >= at);
                }
                None => prop_assert!(held + need > cap, "a request that fits a window must fit at some time"),
            }
        }

        #[test]
        fn calendar_spend_is_zero_from_the_refill_on(
            day in any::<bool>(),
            offset in 0i64..(40 * 86_400_000),
            amount in 1u32..1000,
        ) {
            let period = if day { CalendarPeriod::Day } else { CalendarPeriod::Month };
            let at = T0 + offset;
            let mut counter = SpendCounter::new(Window::Calendar { period }, at);
            counter.record(at, Decimal::from(amount));
            let refill = counter.next_refill(at).unwrap();
            prop_assert!(refill > at);
            prop_assert_eq!(counter.spent(refill - 1), Decimal::from(amount));
            prop_assert_eq!(counter.spent(refill), Decimal::ZERO);
        }
    }
}
