//! Wall-clock instants as milliseconds since the Unix epoch (UTC), and the
//! calendar boundaries that calendar windows reset on. Callers pass `now` in;
//! nothing here reads a clock except [`now_ms`].

use time::{Date, Month, OffsetDateTime, Time};

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type UnixMs = i64;

/// The current wall-clock time.
pub fn now_ms() -> UnixMs {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as UnixMs
}

fn date_of(at: UnixMs) -> Date {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .date()
}

fn midnight_ms(date: Date) -> UnixMs {
    (date
        .with_time(Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp_nanos()
        / 1_000_000) as UnixMs
}

/// Start of the UTC day containing `at`.
pub fn day_start(at: UnixMs) -> UnixMs {
    midnight_ms(date_of(at))
}

/// Start of the UTC day after the one containing `at`.
pub fn next_day_start(at: UnixMs) -> UnixMs {
    day_start(at) + 86_400_000
}

/// Start of the UTC month containing `at`.
pub fn month_start(at: UnixMs) -> UnixMs {
    let date = date_of(at);
    midnight_ms(Date::from_calendar_date(date.year(), date.month(), 1).unwrap_or(date))
}

/// Start of the UTC month after the one containing `at`.
pub fn next_month_start(at: UnixMs) -> UnixMs {
    let date = date_of(at);
    let (year, month) = match date.month() {
        Month::December => (date.year() + 1, Month::January),
        other => (date.year(), other.next()),
    };
    midnight_ms(Date::from_calendar_date(year, month, 1).unwrap_or(date))
}

/// RFC 3339 text of an instant, for logs and messages.
pub fn to_rfc3339(at: UnixMs) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string())
}

/// Converts a protobuf timestamp to milliseconds.
pub fn from_pb(ts: &prost_types::Timestamp) -> UnixMs {
    ts.seconds.saturating_mul(1000) + i64::from(ts.nanos / 1_000_000)
}

/// Converts milliseconds to a protobuf timestamp.
pub fn to_pb(at: UnixMs) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.div_euclid(1000),
        nanos: (at.rem_euclid(1000) * 1_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-25T08:30:00Z
    const T: UnixMs = 1_795_595_400_000;

    #[test]
    fn day_boundaries_are_utc_midnights() {
        assert_eq!(to_rfc3339(day_start(T)), "2026-11-25T00:00:00Z");
        assert_eq!(to_rfc3339(next_day_start(T)), "2026-11-26T00:00:00Z");
    }

    #[test]
    fn month_boundaries_roll_over_the_year() {
        assert_eq!(to_rfc3339(month_start(T)), "2026-11-01T00:00:00Z");
        assert_eq!(to_rfc3339(next_month_start(T)), "2026-12-01T00:00:00Z");
        let december = T + 10 * 86_400_000;
        assert_eq!(
            to_rfc3339(next_month_start(december)),
            "2027-01-01T00:00:00Z"
        );
    }

    #[test]
    fn protobuf_timestamps_round_trip() {
        assert_eq!(from_pb(&to_pb(T + 123)), T + 123);
        assert_eq!(from_pb(&to_pb(-1)), -1);
    }
}
