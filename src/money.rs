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
/// exponents, non-numbers and magnitudes over 10^15.
pub fn parse_decimal(field: &str, text: &str) -> Result<Decimal, InvalidArgument> {
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
        return Err(InvalidArgument::new(
            field,
            format!("{trimmed:?} is not a decimal number"),
        ));
    }
    let value = Decimal::from_str(trimmed)
        .map_err(|_| InvalidArgument::new(field, format!("{trimmed:?} is not a decimal number")))?;
    if value.abs() > max_abs() {
        return Err(InvalidArgument::new(field, "is too large"));
    }
    Ok(value.normalize())
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
    fn huge_amount_is_refused() {
        assert!(parse_decimal("amount", "10000000000000000000").is_err());
    }
}
