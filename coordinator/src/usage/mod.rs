//! Usage analytics: one row per settled request, priced by the coordinator,
//! kept in a usage store that is not the budget store (DESIGN: etcd holds
//! small data only), and queried by `Admin.ListUsage` / `Admin.UsageSummary`.
//!
//! Rows are keyed by (agent id, epoch, sequence number): a record settled
//! twice (re-sent after a lost ack) is the same row, written once. The
//! writer takes rows from the leader after each ledger commit, so the
//! agents' acks never wait on analytics; the analytics write lags, and
//! `allot_usage_rows_lag_seconds` measures by how much.
//!
//! Implementations: [`PostgresUsageStore`] (production, any budget store)
//! and [`EmbeddedUsageStore`] (a redb file beside the embedded budget store,
//! for the quick start and single-coordinator deployments). Both pass
//! `conformance` (compiled for tests and the `test-support` feature only).

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
mod postgres;
mod pricing;
mod redb;
mod spill;
mod writer;

pub use postgres::PostgresUsageStore;
pub use pricing::{row_amount, settled_row};
pub use redb::EmbeddedUsageStore;
pub use spill::Spill;
pub use writer::{run_writer, WRITES_IN_FLIGHT};

use allot::clock::UnixMs;
use allot::pb;
use allot::InvalidArgument;
use prost::Message;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A page of rows and the key to continue after, if more match.
pub type Page = (Vec<pb::UsageRow>, Option<Vec<u8>>);

/// Most rows of one `ListUsage` page.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// Why a usage store call failed. As for the budget store
/// ([`crate::store::StoreError`]), a write that certainly did not happen is
/// told apart from one whose outcome is unknown; rows are keyed, so writing
/// either again is safe, but only the first may be reported as not written.
#[derive(Debug, thiserror::Error)]
pub enum UsageStoreError {
    /// Nothing changed: the call failed before its transaction committed,
    /// or the database refused the commit. Reads fail this way too.
    #[error("{0}")]
    NotApplied(String),
    /// The commit was sent and its answer lost: the rows may be there.
    #[error("outcome unknown, the write may have been applied: {0}")]
    MaybeApplied(String),
    /// A stored row does not decode.
    #[error("corrupt usage row: {0}")]
    Corrupt(String),
    /// A request the store cannot take (a page token of another store).
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(#[from] allot::InvalidArgument),
    /// The store cannot be opened or its schema brought up to date; the
    /// message names the configuration field where there is one.
    #[error("{0}")]
    Setup(String),
}

fn not_applied(error: impl std::fmt::Display) -> UsageStoreError {
    UsageStoreError::NotApplied(error.to_string())
}

fn maybe_applied(error: impl std::fmt::Display) -> UsageStoreError {
    UsageStoreError::MaybeApplied(error.to_string())
}

fn corrupt(error: impl std::fmt::Display) -> UsageStoreError {
    UsageStoreError::Corrupt(error.to_string())
}

fn setup(error: impl std::fmt::Display) -> UsageStoreError {
    UsageStoreError::Setup(error.to_string())
}

/// The analytics store.
pub trait UsageStore: Send + Sync + 'static {
    /// Writes `rows` in one transaction; a row whose (agent id, epoch, seq)
    /// is already there is left as it is. Returns how many were new.
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, UsageStoreError>>;
    /// Rows matching `filter`, in key order, starting after `after` (a
    /// page token), at most `limit`; and the token of the next page.
    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, UsageStoreError>>;
    /// Deletes at most `limit` rows settled before `cutoff` (Unix ms),
    /// with their index entries; returns how many went.
    fn delete_settled_before(
        &self,
        cutoff: UnixMs,
        limit: usize,
    ) -> BoxFuture<'_, Result<usize, UsageStoreError>>;
}

/// The unique key of a row: agent id, then epoch and seq big-endian, so
/// that key order is (agent, epoch, seq) order.
pub fn row_key(row: &pb::UsageRow) -> Vec<u8> {
    let record = row.record.as_ref();
    let mut key = Vec::with_capacity(row.agent_id.len() + 17);
    key.extend_from_slice(row.agent_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&record.map_or(0, |r| r.epoch).to_be_bytes());
    key.extend_from_slice(&record.map_or(0, |r| r.seq).to_be_bytes());
    key
}

/// Whether `row` passes `filter`.
pub fn matches(filter: &pb::UsageFilter, row: &pb::UsageRow) -> bool {
    let Some(r) = row.record.as_ref() else {
        return false;
    };
    let text = |wanted: &str, have: &str| wanted.is_empty() || wanted == have;
    text(&filter.account_id, &r.account_id)
        && text(&filter.key_id, &r.key_id)
        && text(&filter.model, &r.model_requested)
        && text(&filter.batch_id, &r.batch_id)
        && (filter.from_unix_ms == 0 || r.admitted_at_unix_ms >= filter.from_unix_ms)
        && (filter.to_unix_ms == 0 || r.admitted_at_unix_ms < filter.to_unix_ms)
        && (filter.origin == 0 || filter.origin == r.origin)
        && match pb::UsageStatus::try_from(filter.status) {
            Ok(pb::UsageStatus::Charged) => r.charged,
            Ok(pb::UsageStatus::NotCharged) => !r.charged,
            _ => true,
        }
}

/// Checks a filter's fields.
pub fn validate_filter(filter: &pb::UsageFilter) -> Result<(), InvalidArgument> {
    if filter.to_unix_ms != 0 && filter.to_unix_ms < filter.from_unix_ms {
        return Err(InvalidArgument::new(
            "filter.to_unix_ms",
            "must not be before filter.from_unix_ms",
        ));
    }
    if pb::Origin::try_from(filter.origin).is_err() {
        return Err(InvalidArgument::new(
            "filter.origin",
            format!("unknown origin {}", filter.origin),
        ));
    }
    if pb::UsageStatus::try_from(filter.status).is_err() {
        return Err(InvalidArgument::new(
            "filter.status",
            format!("unknown status {}", filter.status),
        ));
    }
    use allot::bounds::{check_len, MAX_HEADER_VALUE_BYTES, MAX_ID_BYTES, MAX_MODEL_BYTES};
    for (field, value, max) in [
        ("filter.account_id", &filter.account_id, MAX_ID_BYTES),
        ("filter.key_id", &filter.key_id, MAX_ID_BYTES),
        ("filter.model", &filter.model, MAX_MODEL_BYTES),
        ("filter.batch_id", &filter.batch_id, MAX_HEADER_VALUE_BYTES),
    ] {
        check_len(field, value, max)?;
    }
    Ok(())
}

/// Page size of a request: 0 → 100; more than [`MAX_PAGE`] is refused.
pub fn page_size(requested: u32) -> Result<usize, InvalidArgument> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(InvalidArgument::new(
            "page_size",
            format!("at most {MAX_PAGE}, not {n}"),
        )),
    }
}

pub fn encode_token(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_token(token: &str) -> Result<Option<Vec<u8>>, InvalidArgument> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = not_a_page_token;
    if !token.len().is_multiple_of(2) {
        return Err(invalid());
    }
    (0..token.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(token.get(i..i + 2).ok_or_else(invalid)?, 16).map_err(|_| invalid())
        })
        .collect::<Result<Vec<u8>, InvalidArgument>>()
        .map(Some)
}

fn not_a_page_token() -> InvalidArgument {
    InvalidArgument::new("page_token", "not a token from a previous page")
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Totals per (bucket, key, model) of `rows`, in that order.
pub fn summarize(
    rows: impl IntoIterator<Item = pb::UsageRow>,
    granularity: pb::Granularity,
) -> Vec<pb::UsageBucket> {
    let width = match granularity {
        pb::Granularity::Hour => HOUR_MS,
        _ => DAY_MS,
    };
    // (start, key, model) → (requests, prompt, completion, cost, refused)
    type Totals = (u64, u64, u64, Decimal, u64);
    let mut buckets: BTreeMap<(i64, String, String), Totals> = BTreeMap::new();
    for row in rows {
        let Some(r) = row.record else { continue };
        let start = r
            .admitted_at_unix_ms
            .div_euclid(width)
            .saturating_mul(width);
        let cost = allot::money::parse_decimal("cost", &row.cost).unwrap_or_default();
        let entry = buckets
            .entry((start, r.key_id, r.model_requested))
            .or_default();
        entry.0 += 1;
        entry.1 += r.prompt_tokens;
        entry.2 += r.completion_tokens;
        entry.3 += cost;
        entry.4 += u64::from(!r.refusal_code.is_empty());
    }
    buckets
        .into_iter()
        .map(
            |((start, key_id, model), (requests, prompt, completion, cost, refused))| {
                pb::UsageBucket {
                    bucket_start_unix_ms: start,
                    key_id,
                    model,
                    requests,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    cost: allot::money::format(cost),
                    refused,
                }
            },
        )
        .collect()
}

/// Every row matching `filter`, page after page.
pub async fn list_all(
    store: &dyn UsageStore,
    filter: &pb::UsageFilter,
) -> Result<Vec<pb::UsageRow>, UsageStoreError> {
    let (mut rows, mut after) = (Vec::new(), None);
    loop {
        let (page, next) = store.list(filter.clone(), after, MAX_PAGE).await?;
        rows.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conformance::sample;

    #[test]
    fn page_tokens_and_filters_are_checked() {
        let key = row_key(&sample()[0]);
        assert_eq!(decode_token(&encode_token(&key)).unwrap(), Some(key));
        assert_eq!(decode_token("xyz").unwrap_err().field, "page_token");
        assert_eq!(page_size(0).unwrap(), 100);
        assert_eq!(page_size(5000).unwrap_err().field, "page_size");
        let backwards = pb::UsageFilter {
            from_unix_ms: 10,
            to_unix_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            validate_filter(&backwards).unwrap_err().field,
            "filter.to_unix_ms"
        );
    }
}
