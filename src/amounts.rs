//! Quantities per unit (`requests`, `tokens`, `credits`): what a request
//! reserves, what a grant hands out, what a slice holds.

use crate::error::InvalidArgument;
use crate::money;
use crate::pb;
use rust_decimal::Decimal;

/// What a limit counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Requests,
    Tokens,
    Credits,
}

impl Unit {
    pub const ALL: [Unit; 3] = [Unit::Requests, Unit::Tokens, Unit::Credits];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::Credits => "credits",
        }
    }

    pub fn from_pb(field: &str, value: i32) -> Result<Unit, InvalidArgument> {
        match pb::Unit::try_from(value) {
            Ok(pb::Unit::Requests) => Ok(Unit::Requests),
            Ok(pb::Unit::Tokens) => Ok(Unit::Tokens),
            Ok(pb::Unit::Credits) => Ok(Unit::Credits),
            _ => Err(InvalidArgument::new(
                field,
                "must be UNIT_REQUESTS, UNIT_TOKENS or UNIT_CREDITS",
            )),
        }
    }

    pub fn to_pb(self) -> pb::Unit {
        match self {
            Unit::Requests => pb::Unit::Requests,
            Unit::Tokens => pb::Unit::Tokens,
            Unit::Credits => pb::Unit::Credits,
        }
    }

    /// Requests and tokens are whole numbers.
    pub fn is_integral(self) -> bool {
        !matches!(self, Unit::Credits)
    }
}

/// One amount per unit; `None` means "not limited in this unit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Amounts(pub [Option<Decimal>; 3]);

impl Amounts {
    pub const UNLIMITED: Amounts = Amounts([None, None, None]);

    /// The cost of one request: 1 request, `tokens` tokens, `credits` credits.
    pub fn request(tokens: u64, credits: Decimal) -> Amounts {
        Amounts([
            Some(Decimal::ONE),
            Some(Decimal::from(tokens)),
            Some(credits),
        ])
    }

    pub fn zero() -> Amounts {
        Amounts([Some(Decimal::ZERO); 3])
    }

    pub fn get(&self, unit: Unit) -> Option<Decimal> {
        self.0[unit.index()]
    }

    pub fn set(&mut self, unit: Unit, value: Option<Decimal>) {
        self.0[unit.index()] = value;
    }

    /// The amount in `unit`, zero when absent.
    pub fn value(&self, unit: Unit) -> Decimal {
        self.get(unit).unwrap_or(Decimal::ZERO)
    }

    /// Adds `other` unit by unit where `self` is limited.
    pub fn add_assign_limited(&mut self, other: &Amounts) {
        for unit in Unit::ALL {
            if let Some(mine) = self.0[unit.index()].as_mut() {
                *mine += other.value(unit);
            }
        }
    }

    /// Adds every unit, keeping a unit present if either side has it.
    pub fn add(&self, other: &Amounts) -> Amounts {
        let mut out = *self;
        for unit in Unit::ALL {
            out.0[unit.index()] = match (self.get(unit), other.get(unit)) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or_default() + b.unwrap_or_default()),
            };
        }
        out
    }

    /// `self - other` for every unit present in either, floored at zero.
    pub fn saturating_sub(&self, other: &Amounts) -> Amounts {
        let mut out = *self;
        for unit in Unit::ALL {
            if let Some(mine) = out.0[unit.index()].as_mut() {
                *mine = (*mine - other.value(unit)).max(Decimal::ZERO);
            }
        }
        out
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|v| v.is_none_or(|v| v.is_zero()))
    }

    pub fn to_pb(&self) -> pb::Amounts {
        pb::Amounts {
            requests: self.get(Unit::Requests).map(decimal_to_u64),
            tokens: self.get(Unit::Tokens).map(decimal_to_u64),
            credits: self.get(Unit::Credits).map(money::format),
        }
    }

    pub fn from_pb(field: &str, value: Option<&pb::Amounts>) -> Result<Amounts, InvalidArgument> {
        let Some(value) = value else {
            return Ok(Amounts::UNLIMITED);
        };
        let credits = match &value.credits {
            Some(text) => Some(money::parse_non_negative(
                &format!("{field}.credits"),
                text,
            )?),
            None => None,
        };
        Ok(Amounts([
            value.requests.map(Decimal::from),
            value.tokens.map(Decimal::from),
            credits,
        ]))
    }
}

/// Whole part of a non-negative decimal as `u64` (saturating).
pub fn decimal_to_u64(value: Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    value
        .max(Decimal::ZERO)
        .trunc()
        .to_u64()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_units_stay_unlimited_when_added_to() {
        let mut slice = Amounts([None, Some(Decimal::from(10)), None]);
        slice.add_assign_limited(&Amounts::request(5, Decimal::ONE));
        assert_eq!(slice, Amounts([None, Some(Decimal::from(15)), None]));
    }

    #[test]
    fn saturating_sub_never_goes_negative() {
        let a = Amounts([Some(Decimal::ONE), Some(Decimal::from(3)), None]);
        let b = Amounts::request(10, Decimal::ONE);
        assert_eq!(
            a.saturating_sub(&b),
            Amounts([Some(Decimal::ZERO), Some(Decimal::ZERO), None])
        );
    }

    #[test]
    fn amounts_round_trip_through_the_wire() {
        let a = Amounts([Some(Decimal::from(2)), None, Some(Decimal::new(125, 2))]);
        assert_eq!(Amounts::from_pb("x", Some(&a.to_pb())).unwrap(), a);
    }
}
