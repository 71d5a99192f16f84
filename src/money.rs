//! Money: exact decimals parsed from strings. No float ever touches money.

use crate::error::InvalidArgument;
use rust_decimal::Decimal;
use std::str::FromStr;

/// The largest magnitude accepted for any amount or price (10^15): keeps every
/// sum and product far inside `Decimal`'s range.
fn max_abs() -> Decimal {
    Decimal::from(1_000_000_000_000_000i64)
}

/// Parses a decimal string such as `"12.50"`. Rejects empty strings,
/// exponents and non-numbers, and reports numbers that are only too large
/// (magnitudes over 10^15, more than 28 decimal places) as such.
pub fn parse_decimal(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
    parse_at_most(field, text, max_abs())
}

/// [`parse_decimal`] with `max` as the largest magnitude (at most 10^15).
fn parse_at_most(field: &str, text: &str, max: Decimal) -> Result<Decimal, InvalidArgument> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(InvalidArgument::new(field, "must be a decimal number"));
    }
    let digits = trimmed.strip_prefix(['-', '+']).unwrap_or(trimmed);
    let plain = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|b| *b == b'.').count() <= 1
        && digits.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        let shown = crate::bounds::truncated(trimmed, 64);
        return Err(InvalidArgument::new(
            field,
            format!("{shown:?} is not a decimal number"),
        ));
    }
    let too_large = || InvalidArgument::new(field, format!("is too large: must be at most {max}"));
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.trim_start_matches('0').len() > 16 {
        return Err(too_large());
    }
    if fraction.len() > 28 {
        return Err(InvalidArgument::new(
            field,
            "has too many decimal places: at most 28",
        ));
    }
    let value = Decimal::from_str(trimmed).map_err(|_| too_large())?;
    if value.abs() > max {
        return Err(too_large());
    }
    Ok(value.normalize())
}

/// Parses an amount an operator gives (a credit or a limit's amount): at
/// most [`bounds::MAX_AMOUNT`](crate::bounds::MAX_AMOUNT) in magnitude,
/// with at most [`bounds::MAX_AMOUNT_DECIMALS`](crate::bounds::MAX_AMOUNT_DECIMALS)
/// decimal places.
pub fn parse_amount(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
    let value = parse_at_most(field, text, Decimal::from(crate::bounds::MAX_AMOUNT))?;
    crate::bounds::check_amount(
        field,
        value,
        crate::bounds::MAX_AMOUNT,
        crate::bounds::MAX_AMOUNT_DECIMALS,
    )?;
    Ok(value)
}

/// Parses a price per token: zero or more, at most
/// [`bounds::MAX_PRICE`](crate::bounds::MAX_PRICE), with at most
/// [`bounds::MAX_PRICE_DECIMALS`](crate::bounds::MAX_PRICE_DECIMALS)
/// decimal places.
pub fn parse_price(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
    let value = parse_at_most(field, text, Decimal::from(crate::bounds::MAX_PRICE))?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(InvalidArgument::new(field, "must not be negative"));
    }
    crate::bounds::check_amount(
        field,
        value,
        crate::bounds::MAX_PRICE,
        crate::bounds::MAX_PRICE_DECIMALS,
    )?;
    Ok(value)
}

/// Parses a decimal that must be zero or more.
pub fn parse_non_negative(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
    let value = parse_decimal(field, text)?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(InvalidArgument::new(field, "must not be negative"));
    }
    Ok(value)
}

/// Parses a decimal that must be strictly positive.
pub fn parse_positive(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
    let value = parse_decimal(field, text)?;
    if value <= Decimal::ZERO {
        return Err(InvalidArgument::new(field, "must be greater than zero"));
    }
    Ok(value)
}

/// Formats a decimal without trailing zeros (`"12.5"`, `"0"`).
pub fn format(value: Decimal) -> String {
    value.normalize().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_parse_exactly() {
        assert_eq!(
            parse_decimal("amount", "0.1").unwrap() + parse_decimal("amount", "0.2").unwrap(),
            Decimal::from_str("0.3").unwrap()
        );
    }

    #[test]
    fn non_decimal_amount_names_the_field() {
        let err = parse_decimal("amount", "ten").unwrap_err();
        assert_eq!(err.field, "amount");
        assert!(parse_decimal("amount", "").is_err());
        assert!(parse_decimal("amount", "NaN").is_err());
        assert!(parse_decimal("amount", "1e5").is_err());
    }

    #[test]
    fn negative_amount_is_refused_where_it_must_be_positive() {
        assert_eq!(parse_positive("amount", "-5").unwrap_err().field, "amount");
        assert!(parse_positive("amount", "0").is_err());
        assert!(parse_non_negative("price", "-0.01").is_err());
        assert!(parse_non_negative("price", "0").is_ok());
    }

    #[test]
    fn huge_amount_is_refused_as_too_large_not_as_a_non_number() {
        for huge in [
            "10000000000000000000",
            "100000000000000000000000000000000000000000",
            "-99999999999999999999999999999.5",
            "1000000000000000.1",
        ] {
            let err = parse_decimal("amount", huge).unwrap_err();
            assert_eq!(err.field, "amount");
            assert!(err.message.starts_with("is too large"), "{huge}: {err}");
        }
        let err = parse_decimal("amount", "0.00000000000000000000000000001").unwrap_err();
        assert!(err.message.contains("decimal places"), "{err}");
        assert!(parse_decimal("amount", "0001.5").is_ok());
    }

    #[test]
    fn operator_amounts_and_prices_have_their_own_bounds() {
        assert!(parse_amount("amount", "100000000000000").is_ok());
        let err = parse_amount("amount", "100000000000001").unwrap_err();
        assert_eq!(err.message, "is too large: must be at most 100000000000000");
        let err = parse_amount("amount", "1.0000000001").unwrap_err();
        assert_eq!(err.message, "must have at most 9 decimal places");
        assert!(parse_price("price", "0.000000000000000001").is_ok());
        assert!(parse_price("price", "1000001").is_err());
        assert!(parse_price("price", "-1").is_err());
    }
}
