//! Limits: `{unit, amount, window}` on a key or an account, validated once at
//! the edge so the ledger never sees an unchecked value.

use crate::amounts::Unit;
use crate::bounds::{check_count, MAX_LIMITS};
use crate::error::InvalidArgument;
use crate::money;
use crate::pb;
use rust_decimal::Decimal;

/// The longest rolling window accepted: 366 days.
pub const MAX_ROLLING_SECONDS: u64 = 366 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarPeriod {
    Day,
    Month,
}

/// Over what time a limit counts spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// A hard cap that never resets.
    Balance,
    /// Spend in the last `seconds` seconds.
    Rolling { seconds: u64 },
    /// Spend since the start of the current UTC day or month.
    Calendar { period: CalendarPeriod },
}

impl Window {
    /// Balance windows refuse with `insufficient_quota`; the others with
    /// `rate_limit_exceeded` and a Retry-After.
    pub fn is_balance(&self) -> bool {
        matches!(self, Window::Balance)
    }

    pub fn from_pb(field: &str, window: Option<&pb::Window>) -> Result<Window, InvalidArgument> {
        use pb::window::Kind;
        match window.and_then(|w| w.kind.as_ref()) {
            None => Err(InvalidArgument::new(
                field,
                "must be one of balance, rolling or calendar",
            )),
            Some(Kind::Balance(_)) => Ok(Window::Balance),
            Some(Kind::Rolling(rolling)) => {
                if rolling.seconds == 0 || rolling.seconds > MAX_ROLLING_SECONDS {
                    return Err(InvalidArgument::new(
                        format!("{field}.rolling.seconds"),
                        format!("must be between 1 and {MAX_ROLLING_SECONDS}"),
                    ));
                }
                Ok(Window::Rolling {
                    seconds: rolling.seconds,
                })
            }
            Some(Kind::Calendar(calendar)) => match pb::CalendarPeriod::try_from(calendar.period) {
                Ok(pb::CalendarPeriod::Day) => Ok(Window::Calendar {
                    period: CalendarPeriod::Day,
                }),
                Ok(pb::CalendarPeriod::Month) => Ok(Window::Calendar {
                    period: CalendarPeriod::Month,
                }),
                _ => Err(InvalidArgument::new(
                    format!("{field}.calendar.period"),
                    "must be CALENDAR_PERIOD_DAY or CALENDAR_PERIOD_MONTH",
                )),
            },
        }
    }

    pub fn to_pb(&self) -> pb::Window {
        use pb::window::Kind;
        let kind = match self {
            Window::Balance => Kind::Balance(pb::BalanceWindow {}),
            Window::Rolling { seconds } => Kind::Rolling(pb::RollingWindow { seconds: *seconds }),
            Window::Calendar { period } => Kind::Calendar(pb::CalendarWindow {
                period: match period {
                    CalendarPeriod::Day => pb::CalendarPeriod::Day as i32,
                    CalendarPeriod::Month => pb::CalendarPeriod::Month as i32,
                },
            }),
        };
        pb::Window { kind: Some(kind) }
    }
}

/// A cap of `amount` in `unit` over `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limit {
    pub unit: Unit,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub window: Window,
}

impl Limit {
    pub fn from_pb(field: &str, limit: &pb::Limit) -> Result<Limit, InvalidArgument> {
        let unit = Unit::from_pb(&format!("{field}.unit"), limit.unit)?;
        let amount_field = format!("{field}.amount");
        let amount = money::parse_amount(&amount_field, &limit.amount)?;
        if amount.is_sign_negative() && !amount.is_zero() {
            return Err(InvalidArgument::new(amount_field, "must not be negative"));
        }
        if unit.is_integral() && !amount.fract().is_zero() {
            return Err(InvalidArgument::new(
                amount_field,
                format!("must be a whole number of {}", unit.as_str()),
            ));
        }
        let window = Window::from_pb(&format!("{field}.window"), limit.window.as_ref())?;
        Ok(Limit {
            unit,
            amount,
            window,
        })
    }

    pub fn to_pb(&self) -> pb::Limit {
        pb::Limit {
            unit: self.unit.to_pb() as i32,
            amount: money::format(self.amount),
            window: Some(self.window.to_pb()),
        }
    }
}

/// Validates a whole list of limits (at most [`MAX_LIMITS`]), naming the
/// offending element.
pub fn limits_from_pb(field: &str, limits: &[pb::Limit]) -> Result<Vec<Limit>, InvalidArgument> {
    check_count(field, limits.len(), MAX_LIMITS)?;
    limits
        .iter()
        .enumerate()
        .map(|(i, limit)| Limit::from_pb(&format!("{field}[{i}]"), limit))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_limit(unit: pb::Unit, amount: &str, window: Option<pb::Window>) -> pb::Limit {
        pb::Limit {
            unit: unit as i32,
            amount: amount.into(),
            window,
        }
    }

    #[test]
    fn limit_converts_from_the_wire_and_back() {
        let limit = Limit {
            unit: Unit::Tokens,
            amount: Decimal::from(200_000),
            window: Window::Rolling { seconds: 60 },
        };
        assert_eq!(Limit::from_pb("limits[0]", &limit.to_pb()).unwrap(), limit);
    }

    #[test]
    fn fractional_token_limit_is_refused_naming_the_field() {
        let err = Limit::from_pb(
            "limits[0]",
            &pb_limit(pb::Unit::Tokens, "1.5", Some(Window::Balance.to_pb())),
        )
        .unwrap_err();
        assert_eq!(err.field, "limits[0].amount");
    }

    #[test]
    fn missing_window_or_unit_is_refused_naming_the_field() {
        let err = Limit::from_pb("limits[1]", &pb_limit(pb::Unit::Tokens, "5", None)).unwrap_err();
        assert_eq!(err.field, "limits[1].window");
        let err = Limit::from_pb(
            "limits[2]",
            &pb_limit(pb::Unit::Unspecified, "5", Some(Window::Balance.to_pb())),
        )
        .unwrap_err();
        assert_eq!(err.field, "limits[2].unit");
    }

    #[test]
    fn too_many_or_too_large_limits_are_refused_naming_the_bound() {
        let one = pb_limit(pb::Unit::Requests, "5", Some(Window::Balance.to_pb()));
        let err = limits_from_pb("limits", &vec![one; MAX_LIMITS + 1]).unwrap_err();
        assert_eq!(err.field, "limits");
        assert!(err.message.contains("at most 32"), "{err}");
        let huge = pb_limit(
            pb::Unit::Tokens,
            "1000000000000000",
            Some(Window::Balance.to_pb()),
        );
        let err = limits_from_pb("limits", &[huge]).unwrap_err();
        assert_eq!(err.field, "limits[0].amount");
        assert!(err.message.starts_with("is too large"), "{err}");
    }

    #[test]
    fn zero_length_rolling_window_is_refused() {
        let window = pb::Window {
            kind: Some(pb::window::Kind::Rolling(pb::RollingWindow { seconds: 0 })),
        };
        let err =
            Limit::from_pb("l", &pb_limit(pb::Unit::Requests, "5", Some(window))).unwrap_err();
        assert_eq!(err.field, "l.window.rolling.seconds");
    }
}
