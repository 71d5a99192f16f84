//! Tariffs and the choice of the one in force (SPEC "Pricing").
//!
//! Choice at time T, first match wins, among tariffs of the request's model
//! in force at T (`valid_from <= T < valid_until`):
//! 1. same purpose and same completion window;
//! 2. same purpose, no completion window;
//! 3. when the purpose is not realtime: realtime, no completion window.
//!
//! A completion window without a tariff of its own falls back to the generic
//! tariff of its purpose, never to another window's price. No tariff: the
//! request is free, and the caller counts it. Among several tariffs of one
//! rule in force at T, the one that started last wins.

use crate::clock::{self, UnixMs};
use crate::error::InvalidArgument;
use crate::key::Purpose;
use crate::money;
use crate::pb;
use rust_decimal::Decimal;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tariff {
    pub model: String,
    pub purpose: Purpose,
    /// Batch completion window such as `24h`; `None` for the generic tariff.
    pub completion_window: Option<String>,
    #[serde(with = "rust_decimal::serde::str")]
    pub input_price: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_price: Decimal,
    pub valid_from: UnixMs,
    pub valid_until: Option<UnixMs>,
}

impl Tariff {
    pub fn in_force_at(&self, at: UnixMs) -> bool {
        self.valid_from <= at && self.valid_until.is_none_or(|until| until > at)
    }

    /// The exact cost of a request priced with this tariff.
    /// Saturating: a count no request reaches prices at `Decimal::MAX`
    /// (refused everywhere) instead of panicking.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Decimal {
        Decimal::from(prompt_tokens)
            .saturating_mul(self.input_price)
            .saturating_add(Decimal::from(completion_tokens).saturating_mul(self.output_price))
    }

    /// Identity of a tariff in the book: putting a tariff with the same
    /// identity replaces it.
    pub fn identity(&self) -> (&str, Purpose, Option<&str>, UnixMs) {
        (
            &self.model,
            self.purpose,
            self.completion_window.as_deref(),
            self.valid_from,
        )
    }

    pub fn from_pb(field: &str, tariff: &pb::Tariff) -> Result<Tariff, InvalidArgument> {
        crate::bounds::check_model(&format!("{field}.model"), &tariff.model)?;
        let purpose = Purpose::from_pb(&format!("{field}.purpose"), tariff.purpose)?;
        let window = tariff.completion_window.trim();
        if !window.is_empty() {
            crate::bounds::check_completion_window(&format!("{field}.completion_window"), window)?;
        }
        let input_price = money::parse_price(&format!("{field}.input_price"), &tariff.input_price)?;
        let output_price =
            money::parse_price(&format!("{field}.output_price"), &tariff.output_price)?;
        let valid_from = tariff
            .valid_from
            .as_ref()
            .map(clock::from_pb)
            .ok_or_else(|| InvalidArgument::new(format!("{field}.valid_from"), "is required"))?;
        let valid_until = tariff.valid_until.as_ref().map(clock::from_pb);
        if valid_until.is_some_and(|until| until <= valid_from) {
            return Err(InvalidArgument::new(
                format!("{field}.valid_until"),
                "must be after valid_from",
            ));
        }
        Ok(Tariff {
            model: tariff.model.trim().to_string(),
            purpose,
            completion_window: (!window.is_empty()).then(|| window.to_string()),
            input_price,
            output_price,
            valid_from,
            valid_until,
        })
    }

    pub fn to_pb(&self) -> pb::Tariff {
        pb::Tariff {
            model: self.model.clone(),
            purpose: self.purpose.to_pb() as i32,
            completion_window: self.completion_window.clone().unwrap_or_default(),
            input_price: money::format(self.input_price),
            output_price: money::format(self.output_price),
            valid_from: Some(clock::to_pb(self.valid_from)),
            valid_until: self.valid_until.map(clock::to_pb),
        }
    }
}

/// What prices one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price<'a> {
    Tariff(&'a Tariff),
    /// No tariff matched: the request costs nothing (and is counted).
    Free,
}

impl Price<'_> {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Decimal {
        match self {
            Price::Tariff(tariff) => tariff.cost(prompt_tokens, completion_tokens),
            Price::Free => Decimal::ZERO,
        }
    }
}

/// Every tariff, by model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TariffBook {
    by_model: HashMap<String, Vec<Tariff>>,
}

impl TariffBook {
    pub fn new(tariffs: impl IntoIterator<Item = Tariff>) -> TariffBook {
        let mut book = TariffBook::default();
        for tariff in tariffs {
            book.put(tariff);
        }
        book
    }

    /// Adds a tariff, replacing one of the same identity.
    pub fn put(&mut self, tariff: Tariff) {
        let list = self.by_model.entry(tariff.model.clone()).or_default();
        list.retain(|t| t.identity() != tariff.identity());
        list.push(tariff);
    }

    pub fn all(&self) -> impl Iterator<Item = &Tariff> {
        self.by_model.values().flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// The tariff that prices a request for `model` by a key of `purpose`,
    /// with an optional batch `completion_window`, at time `at` (the request
    /// time, or for batches the batch's creation time).
    pub fn choose(
        &self,
        model: &str,
        purpose: Purpose,
        completion_window: Option<&str>,
        at: UnixMs,
    ) -> Price<'_> {
        let Some(list) = self.by_model.get(model) else {
            return Price::Free;
        };
        let latest = |wanted_purpose: Purpose, wanted_window: Option<&str>| {
            list.iter()
                .filter(|t| {
                    t.purpose == wanted_purpose
                        && t.completion_window.as_deref() == wanted_window
                        && t.in_force_at(at)
                })
                .max_by_key(|t| t.valid_from)
        };
        let chosen = completion_window
            .and_then(|window| latest(purpose, Some(window)))
            .or_else(|| latest(purpose, None))
            .or_else(|| {
                (purpose != Purpose::Realtime)
                    .then(|| latest(Purpose::Realtime, None))
                    .flatten()
            });
        chosen.map_or(Price::Free, Price::Tariff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const DAY: UnixMs = 86_400_000;
    const NOW: UnixMs = 1_795_595_400_000;

    fn tariff(
        purpose: Purpose,
        window: Option<&str>,
        price: &str,
        from: UnixMs,
        until: Option<UnixMs>,
    ) -> Tariff {
        Tariff {
            model: "llama".into(),
            purpose,
            completion_window: window.map(str::to_string),
            input_price: Decimal::from_str(price).unwrap(),
            output_price: Decimal::from_str(price).unwrap() * Decimal::from(2),
            valid_from: from,
            valid_until: until,
        }
    }

    fn price_of(
        book: &TariffBook,
        purpose: Purpose,
        window: Option<&str>,
        at: UnixMs,
    ) -> Option<String> {
        match book.choose("llama", purpose, window, at) {
            Price::Tariff(t) => Some(t.input_price.to_string()),
            Price::Free => None,
        }
    }

    fn book() -> TariffBook {
        TariffBook::new([
            tariff(Purpose::Realtime, None, "0.003", NOW - 10 * DAY, None),
            tariff(Purpose::Batch, None, "0.002", NOW - 10 * DAY, None),
            tariff(Purpose::Batch, Some("24h"), "0.001", NOW - 10 * DAY, None),
        ])
    }

    #[test]
    fn exact_purpose_and_window_wins() {
        assert_eq!(
            price_of(&book(), Purpose::Batch, Some("24h"), NOW).as_deref(),
            Some("0.001")
        );
    }

    #[test]
    fn unknown_window_takes_the_purpose_generic_never_another_window() {
        assert_eq!(
            price_of(&book(), Purpose::Batch, Some("1h"), NOW).as_deref(),
            Some("0.002")
        );
    }

    #[test]
    fn purpose_without_a_window_takes_its_generic_tariff() {
        assert_eq!(
            price_of(&book(), Purpose::Batch, None, NOW).as_deref(),
            Some("0.002")
        );
    }

    #[test]
    fn purpose_without_tariffs_falls_back_to_realtime() {
        assert_eq!(
            price_of(&book(), Purpose::Playground, None, NOW).as_deref(),
            Some("0.003")
        );
        let only_realtime =
            TariffBook::new([tariff(Purpose::Realtime, None, "0.003", NOW - DAY, None)]);
        assert_eq!(
            price_of(&only_realtime, Purpose::Batch, Some("24h"), NOW).as_deref(),
            Some("0.003")
        );
    }

    #[test]
    fn window_without_generic_falls_back_to_realtime_not_another_window() {
        let book = TariffBook::new([
            tariff(Purpose::Realtime, None, "0.003", NOW - DAY, None),
            tariff(Purpose::Batch, Some("24h"), "0.001", NOW - DAY, None),
        ]);
        assert_eq!(
            price_of(&book, Purpose::Batch, Some("1h"), NOW).as_deref(),
            Some("0.003")
        );
    }

    #[test]
    fn realtime_never_falls_back_to_another_purpose() {
        let book = TariffBook::new([tariff(Purpose::Batch, None, "0.002", NOW - DAY, None)]);
        assert_eq!(price_of(&book, Purpose::Realtime, None, NOW), None);
    }

    #[test]
    fn future_tariff_is_never_used() {
        let book = TariffBook::new([
            tariff(Purpose::Realtime, None, "0.003", NOW - DAY, None),
            tariff(Purpose::Realtime, None, "0.009", NOW + DAY, None),
        ]);
        assert_eq!(
            price_of(&book, Purpose::Realtime, None, NOW).as_deref(),
            Some("0.003")
        );
        assert_eq!(
            price_of(&book, Purpose::Realtime, None, NOW + DAY).as_deref(),
            Some("0.009")
        );
    }

    #[test]
    fn expired_tariff_is_not_used_and_valid_until_is_exclusive() {
        let book = TariffBook::new([tariff(
            Purpose::Realtime,
            None,
            "0.003",
            NOW - DAY,
            Some(NOW),
        )]);
        assert_eq!(
            price_of(&book, Purpose::Realtime, None, NOW - 1).as_deref(),
            Some("0.003")
        );
        assert_eq!(price_of(&book, Purpose::Realtime, None, NOW), None);
    }

    #[test]
    fn historical_request_time_pays_the_old_price() {
        let book = TariffBook::new([
            tariff(
                Purpose::Realtime,
                None,
                "0.001",
                NOW - 10 * DAY,
                Some(NOW - DAY),
            ),
            tariff(Purpose::Realtime, None, "0.005", NOW - DAY, None),
        ]);
        // A batch created five days ago is priced at its creation time.
        assert_eq!(
            price_of(&book, Purpose::Realtime, None, NOW - 5 * DAY).as_deref(),
            Some("0.001")
        );
        assert_eq!(
            price_of(&book, Purpose::Realtime, None, NOW).as_deref(),
            Some("0.005")
        );
    }

    #[test]
    fn no_tariff_means_free() {
        assert_eq!(
            TariffBook::default().choose("llama", Purpose::Realtime, None, NOW),
            Price::Free
        );
        assert_eq!(
            book().choose("other-model", Purpose::Realtime, None, NOW),
            Price::Free
        );
        assert_eq!(Price::Free.cost(1000, 1000), Decimal::ZERO);
    }

    #[test]
    fn cost_is_exact_decimal_arithmetic() {
        let t = tariff(Purpose::Realtime, None, "0.0000001", NOW, None);
        // 3 * 0.0000001 + 7 * 0.0000002 = 0.0000017 exactly.
        assert_eq!(t.cost(3, 7), Decimal::from_str("0.0000017").unwrap());
    }

    #[test]
    fn putting_the_same_identity_replaces() {
        let mut book = book();
        book.put(tariff(
            Purpose::Batch,
            Some("24h"),
            "0.0005",
            NOW - 10 * DAY,
            None,
        ));
        assert_eq!(book.all().count(), 3);
        assert_eq!(
            price_of(&book, Purpose::Batch, Some("24h"), NOW).as_deref(),
            Some("0.0005")
        );
    }

    #[test]
    fn tariff_validation_names_the_field() {
        let mut wire = tariff(Purpose::Realtime, None, "0.1", NOW, None).to_pb();
        wire.input_price = "-1".into();
        assert_eq!(
            Tariff::from_pb("tariff", &wire).unwrap_err().field,
            "tariff.input_price"
        );
        let mut wire = tariff(Purpose::Realtime, None, "0.1", NOW, None).to_pb();
        wire.valid_from = None;
        assert_eq!(
            Tariff::from_pb("tariff", &wire).unwrap_err().field,
            "tariff.valid_from"
        );
    }

    #[test]
    fn tariff_windows_models_and_prices_are_bounded() {
        let mut wire = tariff(Purpose::Batch, Some("24h"), "0.1", NOW, None).to_pb();
        wire.completion_window = "yesterday".into();
        let err = Tariff::from_pb("tariff", &wire).unwrap_err();
        assert_eq!(err.field, "tariff.completion_window");
        assert!(err.message.contains("at most 366d"), "{err}");
        let mut wire = tariff(Purpose::Realtime, None, "0.1", NOW, None).to_pb();
        wire.model = "m".repeat(257);
        let err = Tariff::from_pb("tariff", &wire).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.message.as_str()),
            ("tariff.model", "must be at most 256 bytes")
        );
        let mut wire = tariff(Purpose::Realtime, None, "0.1", NOW, None).to_pb();
        wire.output_price = "1".repeat(40);
        let err = Tariff::from_pb("tariff", &wire).unwrap_err();
        assert_eq!(err.field, "tariff.output_price");
        assert!(err.message.starts_with("is too large"), "{err}");
    }
}
