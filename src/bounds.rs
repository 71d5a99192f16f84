//! Every size bound on what operators and agents send, in one place
//! (docs/bounds.md lists them). Input over a bound is refused with
//! the field and the bound named; it never reaches the ledger, the stores
//! or an agent.
//!
//! The amount bounds keep every later sum and product inside `Decimal`'s
//! range (about 7.9e28): two admitted amounts multiply to at most 1e28, and
//! a token count (a `u64`, below 1.9e19) times a price to below 1.9e25.

use crate::error::InvalidArgument;
use rust_decimal::Decimal;

/// Account and key ids (`[A-Za-z0-9._-]`).
pub const MAX_ID_BYTES: usize = 64;
/// Account and key names (free text).
pub const MAX_NAME_BYTES: usize = 256;
/// Model names: tariffs, `allowed_models` entries, filters.
pub const MAX_MODEL_BYTES: usize = 256;
/// `source_id` of a credit transaction.
pub const MAX_SOURCE_ID_BYTES: usize = 256;
/// Batch ids (the `x-allot-batch-id` header, usage filters) and any other
/// client header value kept in a usage record.
pub const MAX_HEADER_VALUE_BYTES: usize = 128;
/// Entries of one key's `allowed_models`.
pub const MAX_ALLOWED_MODELS: usize = 64;
/// Limits of one key or one account.
pub const MAX_LIMITS: usize = 32;
/// Tariffs in the whole tariff book (each agent holds all of them).
pub const MAX_TARIFFS: usize = 4096;
/// A page token of a List call.
pub const MAX_PAGE_TOKEN_BYTES: usize = 512;

/// Largest credit, limit amount (credits, tokens or requests): 10^14.
pub const MAX_AMOUNT: i64 = 100_000_000_000_000;
/// Decimal places of a credit or limit amount.
pub const MAX_AMOUNT_DECIMALS: u32 = 9;
/// Largest price per token: 10^6.
pub const MAX_PRICE: i64 = 1_000_000;
/// Decimal places of a price per token.
pub const MAX_PRICE_DECIMALS: u32 = 18;

/// Longest completion window: 366 days (`527040m`, `8784h`, `366d`).
pub const MAX_COMPLETION_WINDOW_MINUTES: u64 = 366 * 24 * 60;

/// Most prompt, completion or reasoning tokens one request is charged
/// (10^12): no request comes near it; a neuron or agent reporting more is
/// charged this, so no sum can wrap.
pub const MAX_REQUEST_TOKENS: u64 = 1_000_000_000_000;

/// Oldest batch creation time (`x-allot-batch-created-at`) that may price a
/// request, before its admission: 7 days.
pub const MAX_BATCH_AGE_MS: i64 = 7 * 24 * 3_600_000;
/// Most items of one List page.
pub const MAX_PAGE: usize = 1000;
/// Most encoded bytes of the items of one List response: well under the
/// 4 MiB a default gRPC client (grpcurl, tonic, grpcio) accepts.
pub const MAX_RESPONSE_BYTES: usize = 3 * 1024 * 1024;

/// Refuses `text` longer than `max` bytes.
pub fn check_len(field: &str, text: &str, max: usize) -> Result<(), InvalidArgument> {
    if text.len() > max {
        return Err(InvalidArgument::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    Ok(())
}

/// Refuses a list of more than `max` entries.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), InvalidArgument> {
    if count > max {
        return Err(InvalidArgument::new(
            field,
            format!("must have at most {max} entries, not {count}"),
        ));
    }
    Ok(())
}

/// A model name: not blank, at most [`MAX_MODEL_BYTES`], no control
/// characters (model names end up in headers, logs and metric labels).
pub fn check_model(field: &str, model: &str) -> Result<(), InvalidArgument> {
    if model.trim().is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    check_len(field, model, MAX_MODEL_BYTES)?;
    if model.chars().any(char::is_control) {
        return Err(InvalidArgument::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A batch completion window: a whole number from 1 and a unit, `m`
/// (minutes), `h` (hours) or `d` (days), such as `24h`; at most 366 days.
pub fn check_completion_window(field: &str, window: &str) -> Result<(), InvalidArgument> {
    let grammar = || {
        InvalidArgument::new(
            field,
            format!(
                "must be a whole number and a unit m, h or d (such as 24h), at most {}d",
                MAX_COMPLETION_WINDOW_MINUTES / (24 * 60)
            ),
        )
    };
    let (number, minutes_per_unit) = match window.as_bytes().last() {
        Some(b'm') => (&window[..window.len() - 1], 1u64),
        Some(b'h') => (&window[..window.len() - 1], 60),
        Some(b'd') => (&window[..window.len() - 1], 24 * 60),
        _ => return Err(grammar()),
    };
    if number.is_empty()
        || number.len() > 7
        || number.starts_with('0')
        || !number.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(grammar());
    }
    let minutes = number.parse::<u64>().map_err(|_| grammar())? * minutes_per_unit;
    if minutes > MAX_COMPLETION_WINDOW_MINUTES {
        return Err(grammar());
    }
    Ok(())
}

/// `value` bounded to `max` in magnitude and `decimals` decimal places.
pub fn check_amount(
    field: &str,
    value: Decimal,
    max: i64,
    decimals: u32,
) -> Result<(), InvalidArgument> {
    if value.abs() > Decimal::from(max) {
        return Err(InvalidArgument::new(
            field,
            format!("is too large: must be at most {max}"),
        ));
    }
    if value.normalize().scale() > decimals {
        return Err(InvalidArgument::new(
            field,
            format!("must have at most {decimals} decimal places"),
        ));
    }
    Ok(())
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn completion_windows_follow_the_grammar() {
        for good in ["1m", "90m", "1h", "24h", "7d", "366d", "8784h", "527040m"] {
            assert!(check_completion_window("w", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "h",
            "0h",
            "024h",
            "24",
            "24H",
            "24 h",
            " 24h",
            "yesterday",
            "-1h",
            "1.5h",
            "367d",
            "8785h",
            "99999999d",
        ] {
            let err = check_completion_window("w", bad).unwrap_err();
            assert_eq!(err.field, "w", "{bad}");
            assert!(err.message.contains("at most 366d"), "{bad}: {err}");
        }
    }

    #[test]
    fn lengths_and_counts_name_the_bound() {
        let err = check_len("allowed_models[3]", &"m".repeat(257), MAX_MODEL_BYTES).unwrap_err();
        assert_eq!(
            format!("{}: {}", err.field, err.message),
            "allowed_models[3]: must be at most 256 bytes"
        );
        assert!(check_len("name", &"m".repeat(256), MAX_NAME_BYTES).is_ok());
        assert!(check_count("limits", 33, MAX_LIMITS)
            .unwrap_err()
            .message
            .contains("at most 32"));
        assert!(check_model("model", "llama\n").is_err());
        assert!(check_model("model", " ").is_err());
    }

    #[test]
    fn amounts_are_bounded_in_size_and_decimals() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert!(check_amount("a", d("100000000000000"), MAX_AMOUNT, 9).is_ok());
        assert!(check_amount("a", d("100000000000000.1"), MAX_AMOUNT, 9)
            .unwrap_err()
            .message
            .contains("too large"));
        assert!(check_amount("a", d("-100000000000001"), MAX_AMOUNT, 9).is_err());
        assert!(check_amount("a", d("0.123456789"), MAX_AMOUNT, 9).is_ok());
        assert!(check_amount("a", d("0.1234567890"), MAX_AMOUNT, 9).is_ok());
        assert!(check_amount("a", d("0.1234567891"), MAX_AMOUNT, 9)
            .unwrap_err()
            .message
            .contains("9 decimal places"));
        // The largest admitted amounts multiply without overflow.
        let max = Decimal::from(MAX_AMOUNT);
        assert!(max.checked_mul(max).is_some());
        let price = Decimal::from(MAX_PRICE);
        assert!(Decimal::from(u64::MAX).checked_mul(price).is_some());
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("abc", 8), "abc");
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated("aéb", 3), "aé");
    }
}
