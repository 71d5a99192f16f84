//! Grant sizing: how much of what is left one agent gets, as a plain
//! function that tests, the simulation and benchmarks call directly.
//!
//! The algorithm is proportional share over reported demand (Doorman's
//! ProportionalShare), bounded so that grants shrink geometrically as a
//! budget runs out:
//! - an agent asks with `need` (what a waiting request lacks, zero when it
//!   asks ahead) and `want` (its recent demand over one refresh interval);
//! - it gets `want`, but at most its share of what is left in proportion to
//!   the demand of every agent active on the principal, and at most
//!   `max_share` of what is left (so the last of a budget is handed out in
//!   ever smaller pieces), and always at least `need` when `need` fits.

use rust_decimal::Decimal;

/// What to grant in one unit, or `None` when `need` does not fit in `room`.
///
/// Every input may come from an agent: the proportional share is computed
/// as `room × (want ÷ total)` with a ratio ≤ 1, sums saturate, and the
/// grant is clamped to `room`, so that no product can leave `Decimal`'s
/// range whatever the agent asked. Negative inputs count as 0.
pub fn size(
    need: Decimal,
    want: Decimal,
    room: Decimal,
    others_demand: Decimal,
    max_share: Decimal,
) -> Option<Decimal> {
    let need = need.max(Decimal::ZERO);
    if need > room {
        return None;
    }
    let room = room.max(Decimal::ZERO);
    let want = want.max(need);
    let others = others_demand.max(Decimal::ZERO);
    let total_demand = want.saturating_add(others);
    let proportional = if total_demand > Decimal::ZERO {
        // want ≤ total_demand: the ratio is in [0, 1].
        want.checked_div(total_demand)
            .and_then(|ratio| room.checked_mul(ratio))
            .unwrap_or(need)
    } else {
        room
    };
    let share = room
        .checked_mul(max_share.clamp(Decimal::ZERO, Decimal::ONE))
        .unwrap_or(need);
    let cap = proportional.min(share).max(need);
    Some(want.min(cap).min(room))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: i64) -> Decimal {
        Decimal::from(n)
    }

    fn half() -> Decimal {
        Decimal::new(5, 1)
    }

    #[test]
    fn the_largest_demand_an_agent_can_send_does_not_overflow() {
        let huge = Decimal::from(u64::MAX);
        let room = Decimal::from(allot::bounds::MAX_AMOUNT) * d(1000);
        assert_eq!(size(d(0), huge, room, huge, half()), Some(room * half()));
    }

    #[test]
    fn a_lone_agent_gets_its_demand_up_to_half_of_what_is_left() {
        assert_eq!(size(d(10), d(100), d(1000), d(0), half()), Some(d(100)));
        assert_eq!(size(d(10), d(900), d(1000), d(0), half()), Some(d(500)));
    }

    #[test]
    fn agents_share_in_proportion_to_their_demand() {
        // Two agents want 800 each out of 1000: each gets at most 500.
        assert_eq!(size(d(0), d(800), d(1000), d(800), half()), Some(d(500)));
        // A heavy agent (80% of demand) against a light one.
        assert_eq!(
            size(d(0), d(800), d(1000), d(200), Decimal::ONE),
            Some(d(800))
        );
        assert_eq!(
            size(d(0), d(200), d(1000), d(800), Decimal::ONE),
            Some(d(200))
        );
    }

    #[test]
    fn need_is_always_granted_when_it_fits_and_never_when_it_does_not() {
        assert_eq!(size(d(60), d(60), d(100), d(10_000), half()), Some(d(60)));
        assert_eq!(size(d(101), d(101), d(100), d(0), half()), None);
    }

    #[test]
    fn grants_shrink_geometrically_as_the_budget_runs_out() {
        let mut room = d(1024);
        let mut grants = Vec::new();
        while room >= d(1) {
            let g = size(d(0), d(10_000), room, d(0), half()).unwrap();
            grants.push(g);
            room -= g;
        }
        assert_eq!(grants[..4], [d(512), d(256), d(128), d(64)]);
    }

    #[test]
    fn any_ask_is_answered_without_overflow_and_never_beyond_room() {
        let big = Decimal::MAX;
        let cases = [
            (d(0), big, big, big),
            (
                d(0),
                Decimal::from(u64::MAX),
                Decimal::new(1, 0) * Decimal::from(1_000_000_000_000_000u64),
                d(0),
            ),
            (d(1), big, d(10), big),
            (d(0), big, big, d(0)),
            (Decimal::NEGATIVE_ONE, Decimal::MIN, d(10), Decimal::MIN),
        ];
        for (need, want, room, others) in cases {
            for share in [Decimal::ZERO, half(), Decimal::ONE, big] {
                if let Some(g) = size(need, want, room, others, share) {
                    assert!(g <= room, "{g} > {room}");
                    assert!(g >= Decimal::ZERO);
                }
            }
        }
    }
}
