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
//! [`conformance`].

use allot::clock::UnixMs;
use allot::pb;
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};
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

/// The analytics store.
pub trait UsageStore: Send + Sync + 'static {
    /// Writes `rows` in one transaction; a row whose (agent id, epoch, seq)
    /// is already there is left as it is. Returns how many were new.
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, String>>;
    /// Rows matching `filter`, in key order, starting after `after` (a
    /// page token), at most `limit`; and the token of the next page.
    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, String>>;
    /// Deletes at most `limit` rows settled before `cutoff` (Unix ms),
    /// with their index entries; returns how many went.
    fn delete_settled_before(
        &self,
        cutoff: UnixMs,
        limit: usize,
    ) -> BoxFuture<'_, Result<usize, String>>;
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

/// Checks a filter's fields; the message names the field.
pub fn validate_filter(filter: &pb::UsageFilter) -> Result<(), String> {
    if filter.to_unix_ms != 0 && filter.to_unix_ms < filter.from_unix_ms {
        return Err("filter.to_unix_ms: must not be before filter.from_unix_ms".into());
    }
    if pb::Origin::try_from(filter.origin).is_err() {
        return Err(format!("filter.origin: unknown origin {}", filter.origin));
    }
    if pb::UsageStatus::try_from(filter.status).is_err() {
        return Err(format!("filter.status: unknown status {}", filter.status));
    }
    use allot::bounds::{check_len, MAX_HEADER_VALUE_BYTES, MAX_ID_BYTES, MAX_MODEL_BYTES};
    for (field, value, max) in [
        ("filter.account_id", &filter.account_id, MAX_ID_BYTES),
        ("filter.key_id", &filter.key_id, MAX_ID_BYTES),
        ("filter.model", &filter.model, MAX_MODEL_BYTES),
        ("filter.batch_id", &filter.batch_id, MAX_HEADER_VALUE_BYTES),
    ] {
        check_len(field, value, max).map_err(|e| format!("{}: {}", e.field, e.message))?;
    }
    Ok(())
}

/// Page size of a request: 0 → 100; more than [`MAX_PAGE`] is refused.
pub fn page_size(requested: u32) -> Result<usize, String> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(format!("page_size: at most {MAX_PAGE}, not {n}")),
    }
}

pub fn encode_token(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_token(token: &str) -> Result<Option<Vec<u8>>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || "page_token: not a token from a previous page".to_string();
    if !token.len().is_multiple_of(2) {
        return Err(invalid());
    }
    (0..token.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(token.get(i..i + 2).ok_or_else(invalid)?, 16).map_err(|_| invalid())
        })
        .collect::<Result<Vec<u8>, String>>()
        .map(Some)
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
) -> Result<Vec<pb::UsageRow>, String> {
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

/// What a row counts in `unit` against a limit: one request, its tokens,
/// or its cost; nothing when it was not charged.
pub fn row_amount(row: &pb::UsageRow, unit: allot::Unit) -> Decimal {
    let Some(r) = row.record.as_ref().filter(|r| r.charged) else {
        return Decimal::ZERO;
    };
    match unit {
        allot::Unit::Requests => Decimal::ONE,
        allot::Unit::Tokens => Decimal::from(r.prompt_tokens + r.completion_tokens),
        allot::Unit::Credits => allot::money::parse_decimal("cost", &row.cost).unwrap_or_default(),
    }
}

// ---- the embedded store ----

const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_rows");
/// Index of the key and account filters: `k` + key id + 0 + row key, and
/// `a` + account id + 0 + row key, each to nothing. Within one key or
/// account, entries are in row-key order, the order pages are in.
const BY_OWNER: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_rows_by_owner");
/// Index of retention: settled time (big-endian, sign bit flipped so that
/// byte order is time order) + row key, each to nothing.
const BY_SETTLED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_rows_by_settled");
/// `owner_index` = 1 once every row is in [`BY_OWNER`], `settled_index` = 1
/// once every row is in [`BY_SETTLED`] (files written before an index
/// existed are indexed when opened).
const META: TableDefinition<&str, u64> = TableDefinition::new("usage_meta");

fn settled_prefix(at: UnixMs) -> [u8; 8] {
    ((at as u64) ^ (1 << 63)).to_be_bytes()
}

/// The retention index entry of one row.
fn settled_entry(row: &pb::UsageRow, row_key: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(8 + row_key.len());
    entry.extend_from_slice(&settled_prefix(row.settled_at_unix_ms));
    entry.extend_from_slice(row_key);
    entry
}

fn owner_prefix(kind: u8, id: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(id.len() + 2);
    prefix.push(kind);
    prefix.extend_from_slice(id.as_bytes());
    prefix.push(0);
    prefix
}

/// The index entries of one row.
fn owner_entries(row: &pb::UsageRow, row_key: &[u8]) -> [Vec<u8>; 2] {
    let record = row.record.as_ref();
    [
        (b'k', record.map_or("", |r| r.key_id.as_str())),
        (b'a', record.map_or("", |r| r.account_id.as_str())),
    ]
    .map(|(kind, id)| {
        let mut entry = owner_prefix(kind, id);
        entry.extend_from_slice(row_key);
        entry
    })
}

pub struct EmbeddedUsageStore {
    db: Arc<Database>,
}

impl EmbeddedUsageStore {
    pub fn open(path: &Path) -> Result<EmbeddedUsageStore, String> {
        if let Some(parent) = path.parent() {
            allot_runtime::private_files::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        allot_runtime::private_files::create_if_missing(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let db =
            Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let rows = txn.open_table(ROWS).map_err(|e| e.to_string())?;
            let mut index = txn.open_table(BY_OWNER).map_err(|e| e.to_string())?;
            let mut by_settled = txn.open_table(BY_SETTLED).map_err(|e| e.to_string())?;
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            if meta
                .get("settled_index")
                .map_err(|e| e.to_string())?
                .is_none()
            {
                for entry in rows.iter().map_err(|e| e.to_string())? {
                    let (key, value) = entry.map_err(|e| e.to_string())?;
                    let row = pb::UsageRow::decode(value.value())
                        .map_err(|e| format!("corrupt usage row: {e}"))?;
                    by_settled
                        .insert(settled_entry(&row, key.value()).as_slice(), [].as_slice())
                        .map_err(|e| e.to_string())?;
                }
                meta.insert("settled_index", 1).map_err(|e| e.to_string())?;
            }
            if meta
                .get("owner_index")
                .map_err(|e| e.to_string())?
                .is_none()
            {
                let mut indexed = 0u64;
                for entry in rows.iter().map_err(|e| e.to_string())? {
                    let (key, value) = entry.map_err(|e| e.to_string())?;
                    let row = pb::UsageRow::decode(value.value())
                        .map_err(|e| format!("corrupt usage row: {e}"))?;
                    for entry in owner_entries(&row, key.value()) {
                        index
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    indexed += 1;
                }
                if indexed > 0 {
                    tracing::info!(rows = indexed, "usage rows indexed by key and account");
                }
                meta.insert("owner_index", 1).map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(EmbeddedUsageStore { db: Arc::new(db) })
    }
}

impl UsageStore for EmbeddedUsageStore {
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, String>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_write().map_err(|e| e.to_string())?;
                let mut new = 0;
                {
                    let mut table = txn.open_table(ROWS).map_err(|e| e.to_string())?;
                    let mut entries = Vec::with_capacity(rows.len() * 2);
                    let mut settled = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let key = row_key(row);
                        if table
                            .get(key.as_slice())
                            .map_err(|e| e.to_string())?
                            .is_some()
                        {
                            continue;
                        }
                        table
                            .insert(key.as_slice(), row.encode_to_vec().as_slice())
                            .map_err(|e| e.to_string())?;
                        entries.extend(owner_entries(row, &key));
                        settled.push(settled_entry(row, &key));
                        new += 1;
                    }
                    // In order: neighbouring entries share B-tree pages.
                    entries.sort_unstable();
                    let mut index = txn.open_table(BY_OWNER).map_err(|e| e.to_string())?;
                    for entry in &entries {
                        index
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    settled.sort_unstable();
                    let mut by_settled = txn.open_table(BY_SETTLED).map_err(|e| e.to_string())?;
                    for entry in &settled {
                        by_settled
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                }
                txn.commit().map_err(|e| e.to_string())?;
                Ok(new)
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, String>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(|e| e.to_string())?;
                let table = txn.open_table(ROWS).map_err(|e| e.to_string())?;
                let mut rows = Vec::new();
                let mut last = None;
                // Rows in key order from `after` on: through the index for
                // a key or account filter, else every row.
                let owner = if !filter.key_id.is_empty() {
                    Some(owner_prefix(b'k', &filter.key_id))
                } else if !filter.account_id.is_empty() {
                    Some(owner_prefix(b'a', &filter.account_id))
                } else {
                    None
                };
                let mut take = |key: &[u8], value: &[u8]| -> Result<bool, String> {
                    let row = pb::UsageRow::decode(value)
                        .map_err(|e| format!("corrupt usage row: {e}"))?;
                    if !matches(&filter, &row) {
                        return Ok(true);
                    }
                    if rows.len() == limit {
                        // One more matches: there is a next page.
                        return Ok(false);
                    }
                    last = Some(key.to_vec());
                    rows.push(row);
                    Ok(true)
                };
                let more = match owner {
                    Some(prefix) => {
                        let index = txn.open_table(BY_OWNER).map_err(|e| e.to_string())?;
                        let mut start = prefix.clone();
                        let from = match &after {
                            Some(after) => {
                                start.extend_from_slice(after);
                                std::ops::Bound::Excluded(start.as_slice())
                            }
                            None => std::ops::Bound::Included(start.as_slice()),
                        };
                        let mut more = false;
                        for entry in index
                            .range::<&[u8]>((from, std::ops::Bound::Unbounded))
                            .map_err(|e| e.to_string())?
                        {
                            let (entry, _) = entry.map_err(|e| e.to_string())?;
                            let Some(key) = entry.value().strip_prefix(prefix.as_slice()) else {
                                break;
                            };
                            let Some(value) = table.get(key).map_err(|e| e.to_string())? else {
                                continue;
                            };
                            if !take(key, value.value())? {
                                more = true;
                                break;
                            }
                        }
                        more
                    }
                    None => {
                        let range = match &after {
                            Some(after) => table.range::<&[u8]>((
                                std::ops::Bound::Excluded(after.as_slice()),
                                std::ops::Bound::Unbounded,
                            )),
                            None => table.range::<&[u8]>(..),
                        }
                        .map_err(|e| e.to_string())?;
                        let mut more = false;
                        for entry in range {
                            let (key, value) = entry.map_err(|e| e.to_string())?;
                            if !take(key.value(), value.value())? {
                                more = true;
                                break;
                            }
                        }
                        more
                    }
                };
                Ok((rows, if more { last } else { None }))
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn delete_settled_before(
        &self,
        cutoff: UnixMs,
        limit: usize,
    ) -> BoxFuture<'_, Result<usize, String>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::delete_before(&db, cutoff, limit))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

impl EmbeddedUsageStore {
    /// Deletes what [`UsageStore::delete_settled_before`] deletes, in one
    /// write transaction (`limit` bounds how long it holds the writer).
    fn delete_before(db: &Database, cutoff: UnixMs, limit: usize) -> Result<usize, String> {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        let mut deleted = 0;
        {
            let mut rows = txn.open_table(ROWS).map_err(|e| e.to_string())?;
            let mut index = txn.open_table(BY_OWNER).map_err(|e| e.to_string())?;
            let mut by_settled = txn.open_table(BY_SETTLED).map_err(|e| e.to_string())?;
            let end = settled_prefix(cutoff);
            let old: Vec<Vec<u8>> = by_settled
                .range::<&[u8]>(..end.as_slice())
                .map_err(|e| e.to_string())?
                .take(limit)
                .map(|entry| entry.map(|(key, _)| key.value().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            for entry in &old {
                let key = &entry[8..];
                let removed = rows.remove(key).map_err(|e| e.to_string())?;
                if let Some(value) = removed {
                    let row = pb::UsageRow::decode(value.value())
                        .map_err(|e| format!("corrupt usage row: {e}"))?;
                    for owner in owner_entries(&row, key) {
                        index.remove(owner.as_slice()).map_err(|e| e.to_string())?;
                    }
                    deleted += 1;
                }
                by_settled
                    .remove(entry.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(deleted)
    }
}

// ---- PostgreSQL ----

/// The production usage store: PostgreSQL through sqlx, schema managed by
/// `sqlx::migrate!` (`coordinator/migrations/`), rows written once per
/// (agent_id, epoch, seq), indexes for the key, model and batch filters;
/// account filters go through `usage_keys` (each key's account) and the
/// key index.
pub struct PostgresUsageStore {
    pool: sqlx::PgPool,
    /// Set once the migrations ran: the coordinator starts (and keeps its
    /// budgets) even while the analytics database is down.
    schema: tokio::sync::OnceCell<()>,
}

impl PostgresUsageStore {
    /// Prepares a pool without connecting: the first write or read
    /// connects and brings the schema up to date, and retries that later
    /// if the database is not there yet.
    pub fn new(url: &str) -> Result<PostgresUsageStore, String> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(WRITES_IN_FLIGHT as u32 + 2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)
            .map_err(|e| format!("usage_postgres_url: {e}"))?;
        Ok(PostgresUsageStore {
            pool,
            schema: tokio::sync::OnceCell::new(),
        })
    }

    /// [`PostgresUsageStore::new`], then the schema at once.
    pub async fn connect(url: &str) -> Result<PostgresUsageStore, String> {
        let store = PostgresUsageStore::new(url)?;
        store.ensure_schema().await?;
        Ok(store)
    }

    async fn ensure_schema(&self) -> Result<(), String> {
        self.schema
            .get_or_try_init(|| async {
                sqlx::migrate!("./migrations")
                    .run(&self.pool)
                    .await
                    .map_err(|e| format!("cannot migrate the usage database: {e}"))
            })
            .await
            .map(drop)
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "23505")
}

/// Splits a page token back into (agent id, epoch, seq).
fn parse_key(key: &[u8]) -> Option<(String, i64, i64)> {
    let zero = key.iter().position(|b| *b == 0)?;
    let agent = std::str::from_utf8(&key[..zero]).ok()?.to_string();
    let rest = &key[zero + 1..];
    if rest.len() != 16 {
        return None;
    }
    let epoch = u64::from_be_bytes(rest[..8].try_into().ok()?) as i64;
    let seq = u64::from_be_bytes(rest[8..].try_into().ok()?) as i64;
    Some((agent, epoch, seq))
}

/// Columns of `usage_rows` in the order the writer sends them.
const COLUMNS: &str = "agent_id, epoch, seq, account_id, key_id, model, admitted_at, \
                       batch_id, origin, charged, cost, settled_at, row";

/// `rows` in PostgreSQL's binary COPY format (a header, one tuple of
/// length-prefixed fields per row, a trailer).
fn copy_data(rows: &[pb::UsageRow]) -> Result<Vec<u8>, String> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(rows.len() * 640 + 32);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    let mut numeric = sqlx::postgres::PgArgumentBuffer::default();
    let mut encoded = Vec::new();
    let empty = pb::UsageRecord::default();
    for row in rows {
        let r = row.record.as_ref().unwrap_or(&empty);
        let cost = match row.cost.as_str() {
            "" => Decimal::ZERO,
            text => allot::money::parse_decimal("cost", text).map_err(|e| e.to_string())?,
        };
        numeric.clear();
        // A decimal is never NULL.
        let _not_null = sqlx::Encode::<sqlx::Postgres>::encode_by_ref(&cost, &mut numeric)
            .map_err(|e| e.to_string())?;
        encoded.clear();
        row.encode(&mut encoded).map_err(|e| e.to_string())?;
        out.extend_from_slice(&13i16.to_be_bytes());
        field(&mut out, row.agent_id.as_bytes());
        field(&mut out, &(r.epoch as i64).to_be_bytes());
        field(&mut out, &(r.seq as i64).to_be_bytes());
        field(&mut out, r.account_id.as_bytes());
        field(&mut out, r.key_id.as_bytes());
        field(&mut out, r.model_requested.as_bytes());
        field(&mut out, &r.admitted_at_unix_ms.to_be_bytes());
        field(&mut out, r.batch_id.as_bytes());
        field(&mut out, &r.origin.to_be_bytes());
        field(&mut out, &[u8::from(r.charged)]);
        field(&mut out, &numeric);
        field(&mut out, &row.settled_at_unix_ms.to_be_bytes());
        field(&mut out, &encoded);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(out)
}

impl PostgresUsageStore {
    /// Notes the account of each key in `rows` (`usage_keys`, which the
    /// account filter reads), in key order so that concurrent batches
    /// never wait on each other in a cycle.
    async fn note_keys(
        txn: &mut sqlx::PgConnection,
        rows: &[pb::UsageRow],
    ) -> Result<(), sqlx::Error> {
        let pairs: std::collections::BTreeMap<&str, &str> = rows
            .iter()
            .filter_map(|row| row.record.as_ref())
            .map(|r| (r.key_id.as_str(), r.account_id.as_str()))
            .collect();
        let (keys, accounts): (Vec<&str>, Vec<&str>) = pairs.into_iter().unzip();
        sqlx::query(
            "INSERT INTO usage_keys (key_id, account_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&keys)
        .bind(&accounts)
        .execute(txn)
        .await
        .map(drop)
    }

    /// Inserts with `INSERT ... ON CONFLICT DO NOTHING`: slower than COPY,
    /// but skips rows already there (a batch with re-settled records).
    async fn insert_skipping_duplicates(&self, rows: &[pb::UsageRow]) -> Result<usize, String> {
        let n = rows.len();
        fn column<T>(n: usize) -> Vec<T> {
            Vec::with_capacity(n)
        }
        let (mut agent, mut epoch, mut seq): (Vec<&str>, Vec<i64>, Vec<i64>) =
            (column(n), column(n), column(n));
        let (mut account, mut key, mut model): (Vec<&str>, Vec<&str>, Vec<&str>) =
            (column(n), column(n), column(n));
        let (mut admitted, mut batch, mut origin): (Vec<i64>, Vec<&str>, Vec<i32>) =
            (column(n), column(n), column(n));
        let (mut charged, mut cost, mut settled): (Vec<bool>, Vec<&str>, Vec<i64>) =
            (column(n), column(n), column(n));
        let mut bytes: Vec<Vec<u8>> = column(n);
        let empty = pb::UsageRecord::default();
        for row in rows {
            let r = row.record.as_ref().unwrap_or(&empty);
            agent.push(&row.agent_id);
            epoch.push(r.epoch as i64);
            seq.push(r.seq as i64);
            account.push(&r.account_id);
            key.push(&r.key_id);
            model.push(&r.model_requested);
            admitted.push(r.admitted_at_unix_ms);
            batch.push(&r.batch_id);
            origin.push(r.origin);
            charged.push(r.charged);
            cost.push(if row.cost.is_empty() { "0" } else { &row.cost });
            settled.push(row.settled_at_unix_ms);
            bytes.push(row.encode_to_vec());
        }
        let mut txn = self.pool.begin().await.map_err(|e| e.to_string())?;
        Self::note_keys(&mut txn, rows)
            .await
            .map_err(|e| e.to_string())?;
        let done = sqlx::query(&format!(
            "INSERT INTO usage_rows ({COLUMNS}) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
             $6::text[], $7::int8[], $8::text[], $9::int4[], $10::bool[], \
             $11::text[]::numeric[], $12::int8[], $13::bytea[]) \
             ON CONFLICT (agent_id, epoch, seq) DO NOTHING"
        ))
        .bind(&agent)
        .bind(&epoch)
        .bind(&seq)
        .bind(&account)
        .bind(&key)
        .bind(&model)
        .bind(&admitted)
        .bind(&batch)
        .bind(&origin)
        .bind(&charged)
        .bind(&cost)
        .bind(&settled)
        .bind(&bytes)
        .execute(&mut *txn)
        .await
        .map_err(|e| e.to_string())?;
        txn.commit().await.map_err(|e| e.to_string())?;
        Ok(done.rows_affected() as usize)
    }
}

impl UsageStore for PostgresUsageStore {
    /// One binary `COPY` in one transaction, the fast path (COPY cannot
    /// skip conflicts); a batch holding a row already written (a record
    /// settled again after a lost ack) fails it whole on the primary key,
    /// and is inserted again skipping the rows already there.
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, String>> {
        Box::pin(async move {
            self.ensure_schema().await?;
            let data = copy_data(&rows)?;
            let mut txn = self.pool.begin().await.map_err(|e| e.to_string())?;
            let copied = async {
                Self::note_keys(&mut txn, &rows).await?;
                let mut copy = txn
                    .copy_in_raw(&format!(
                        "COPY usage_rows ({COLUMNS}) FROM STDIN (FORMAT binary)"
                    ))
                    .await?;
                copy.send(data).await?;
                copy.finish().await
            }
            .await;
            match copied {
                Ok(new) => {
                    txn.commit().await.map_err(|e| e.to_string())?;
                    Ok(new as usize)
                }
                Err(error) if is_unique_violation(&error) => {
                    txn.rollback().await.map_err(|e| e.to_string())?;
                    self.insert_skipping_duplicates(&rows).await
                }
                Err(error) => Err(error.to_string()),
            }
        })
    }

    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, String>> {
        Box::pin(async move {
            self.ensure_schema().await?;
            let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "SELECT agent_id, epoch, seq, row FROM usage_rows WHERE TRUE",
            );
            if let Some(after) = &after {
                let (agent, epoch, seq) =
                    parse_key(after).ok_or("page_token: not a token from a previous page")?;
                query
                    .push(" AND (agent_id, epoch, seq) > (")
                    .push_bind(agent)
                    .push(", ")
                    .push_bind(epoch)
                    .push(", ")
                    .push_bind(seq)
                    .push(")");
            }
            if !filter.account_id.is_empty() {
                query
                    .push(" AND key_id IN (SELECT key_id FROM usage_keys WHERE account_id = ")
                    .push_bind(filter.account_id.clone())
                    .push(")");
            }
            for (column, value) in [
                ("key_id", &filter.key_id),
                ("model", &filter.model),
                ("batch_id", &filter.batch_id),
            ] {
                if !value.is_empty() {
                    query
                        .push(format!(" AND {column} = "))
                        .push_bind(value.clone());
                }
            }
            if filter.from_unix_ms != 0 {
                query
                    .push(" AND admitted_at >= ")
                    .push_bind(filter.from_unix_ms);
            }
            if filter.to_unix_ms != 0 {
                query
                    .push(" AND admitted_at < ")
                    .push_bind(filter.to_unix_ms);
            }
            if filter.origin != 0 {
                query.push(" AND origin = ").push_bind(filter.origin);
            }
            match pb::UsageStatus::try_from(filter.status) {
                Ok(pb::UsageStatus::Charged) => {
                    query.push(" AND charged");
                }
                Ok(pb::UsageStatus::NotCharged) => {
                    query.push(" AND NOT charged");
                }
                _ => {}
            }
            query
                .push(" ORDER BY agent_id, epoch, seq LIMIT ")
                .push_bind(limit as i64 + 1);
            let found: Vec<(String, i64, i64, Vec<u8>)> = query
                .build_query_as()
                .fetch_all(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
            let more = found.len() > limit;
            let mut rows = Vec::with_capacity(found.len().min(limit));
            for (_, _, _, bytes) in found.into_iter().take(limit) {
                rows.push(
                    pb::UsageRow::decode(bytes.as_slice())
                        .map_err(|e| format!("corrupt usage row: {e}"))?,
                );
            }
            let next = if more { rows.last().map(row_key) } else { None };
            Ok((rows, next))
        })
    }

    /// Through the BRIN index on `settled_at` (migration 0003): cheap to
    /// keep up, as rows arrive roughly in settlement order.
    fn delete_settled_before(
        &self,
        cutoff: UnixMs,
        limit: usize,
    ) -> BoxFuture<'_, Result<usize, String>> {
        Box::pin(async move {
            self.ensure_schema().await?;
            let done = sqlx::query(
                "DELETE FROM usage_rows WHERE (agent_id, epoch, seq) IN \
                 (SELECT agent_id, epoch, seq FROM usage_rows WHERE settled_at < $1 \
                  LIMIT $2)",
            )
            .bind(cutoff)
            .bind(limit as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            Ok(done.rows_affected() as usize)
        })
    }
}

// ---- the writer ----

/// Rows per store transaction.
const WRITE_BATCH: usize = 2048;
/// Transactions the writer runs at once (each its own batch of rows).
pub const WRITES_IN_FLIGHT: usize = 3;
/// How long the writer gathers rows before a write.
const GATHER: Duration = Duration::from_millis(5);
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Tries of one batch (backoff 50, 100, 200 ms between them) before it
/// goes to the spill.
const ATTEMPTS: u32 = 4;
/// How often retention deletes rows older than `usage_retention_days`.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Rows one retention step deletes: one short transaction, after which
/// the writer writes what arrived meanwhile before the next step.
const RETENTION_STEP: usize = 5_000;

/// Writes what the leader settled, in batches of one transaction each. A
/// failed write is retried with exponential backoff and jitter; a batch
/// still not written after [`ATTEMPTS`] tries goes to the [`Spill`] on disk
/// and is written from there once the store takes it again, also by a
/// later run of the coordinator. A row is never dropped. When the channel
/// closes (shutdown), the writer writes or spills what it holds, then
/// returns.
///
/// With a `retention`, the writer also deletes rows settled longer ago
/// than that: at start and every [`RETENTION_EVERY`], in steps of
/// [`RETENTION_STEP`] rows between which it writes what arrived.
pub async fn run_writer(
    store: Arc<dyn UsageStore>,
    mut rows: mpsc::UnboundedReceiver<Vec<pb::UsageRow>>,
    spill: Spill,
    retention: Option<Duration>,
) {
    let mut held: Vec<pb::UsageRow> = Vec::new();
    let mut open = true;
    let mut replay_delay = RETRY_FIRST;
    let replay_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(replay_due);
    let retention_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retention_due);
    while open || !held.is_empty() {
        if held.is_empty() {
            tokio::select! {
                batch = rows.recv() => match batch {
                    Some(batch) => held.extend(batch),
                    None => break,
                },
                () = &mut retention_due, if retention.is_some() => {
                    let window = retention.expect("checked by the branch condition");
                    let next = match retain(store.as_ref(), window).await {
                        true => Duration::ZERO,
                        false => RETENTION_EVERY,
                    };
                    retention_due.as_mut().reset(tokio::time::Instant::now() + next);
                    continue;
                }
                () = &mut replay_due, if spill.has_files() => {
                    replay_delay = match replay(store.as_ref(), &spill).await {
                        true => RETRY_FIRST,
                        false => (replay_delay * 2).min(RETRY_MAX),
                    };
                    replay_due.as_mut().reset(tokio::time::Instant::now() + replay_delay);
                    continue;
                }
            }
            tokio::time::sleep(GATHER).await;
        }
        loop {
            match rows.try_recv() {
                Ok(batch) => held.extend(batch),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let take = held.len().min(WRITE_BATCH * WRITES_IN_FLIGHT);
        let writes = held[..take]
            .chunks(WRITE_BATCH)
            .map(|chunk| write_or_spill(store.as_ref(), &spill, chunk.to_vec()));
        futures_util::future::join_all(writes).await;
        held.drain(..take);
        metrics::gauge!("allot_usage_rows_pending").set(held.len() as f64);
    }
}

/// Writes one batch, retrying with exponential backoff and jitter; after
/// [`ATTEMPTS`] failures the batch goes to the spill (and only if the disk
/// refuses that too does the writer keep it in memory and keep trying).
/// While earlier batches wait in the spill, the store is known to be
/// failing: one failed try is enough, so an outage does not hold every new
/// batch for the whole backoff.
async fn write_or_spill(store: &dyn UsageStore, spill: &Spill, batch: Vec<pb::UsageRow>) {
    let mut delay = RETRY_FIRST;
    let mut attempt = 1u32;
    let attempts = if spill.has_files() { 1 } else { ATTEMPTS };
    loop {
        match store.insert(batch.clone()).await {
            Ok(new) => return written(&batch, new),
            Err(error) => {
                metrics::counter!("allot_usage_rows_write_failures_total").increment(1);
                tracing::error!(attempt, rows = batch.len(), %error, "cannot write usage rows");
            }
        }
        if attempt >= attempts {
            match spill.put(&batch).await {
                Ok(()) => return,
                Err(error) => tracing::error!(rows = batch.len(), %error,
                    "cannot spill usage rows to disk; keeping them in memory"),
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(delay.mul_f64(jitter)).await;
        delay = (delay * 2).min(RETRY_MAX);
        attempt += 1;
    }
}

/// One retention step: deletes up to [`RETENTION_STEP`] rows settled more
/// than `window` ago; whether there may be more to delete.
async fn retain(store: &dyn UsageStore, window: Duration) -> bool {
    let cutoff = allot::clock::now_ms().saturating_sub(window.as_millis() as i64);
    match store.delete_settled_before(cutoff, RETENTION_STEP).await {
        Ok(deleted) => {
            metrics::counter!("allot_usage_rows_deleted_total").increment(deleted as u64);
            if deleted > 0 {
                tracing::info!(deleted, cutoff, "usage rows past retention deleted");
            }
            deleted == RETENTION_STEP
        }
        Err(error) => {
            metrics::counter!("allot_usage_retention_failures_total").increment(1);
            tracing::error!(%error, "cannot delete usage rows past retention");
            false
        }
    }
}

/// Counts a written batch: rows new and duplicate, and each row's lag from
/// settlement.
fn written(batch: &[pb::UsageRow], new: usize) {
    let now = allot::clock::now_ms();
    for row in batch {
        let lag = (now - row.settled_at_unix_ms).max(0) as f64 / 1000.0;
        metrics::histogram!("allot_usage_rows_lag_seconds").record(lag);
    }
    metrics::counter!("allot_usage_rows_written_total").increment(new as u64);
    metrics::counter!("allot_usage_rows_duplicates_total").increment((batch.len() - new) as u64);
}

/// Writes spilled batches, oldest first, until the spill is empty or a
/// write fails; whether every one was written.
async fn replay(store: &dyn UsageStore, spill: &Spill) -> bool {
    loop {
        let Some((file, batch)) = spill.oldest().await else {
            spill.emptied();
            return true;
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                // Unreadable: keep the file for an operator, never loop on it.
                tracing::error!(file = %file.display(), %error, "cannot read a spilled usage batch; set aside");
                spill.set_aside(&file).await;
                continue;
            }
        };
        match store.insert(batch.clone()).await {
            Ok(new) => {
                written(&batch, new);
                spill.remove(&file).await;
                tracing::info!(rows = batch.len(), "spilled usage rows written");
            }
            Err(error) => {
                metrics::counter!("allot_usage_rows_write_failures_total").increment(1);
                tracing::error!(rows = batch.len(), %error, "cannot write spilled usage rows yet");
                return false;
            }
        }
    }
}

/// Batches of usage rows kept on disk until the usage store takes them:
/// one file per batch (rows length-delimited, protobuf), written to a
/// temporary name, fsync'd and renamed, so a file that exists is whole.
#[derive(Clone)]
pub struct Spill {
    inner: Arc<SpillDir>,
}

struct SpillDir {
    dir: std::path::PathBuf,
    /// Batch files waiting: the writer looks at the disk only when some are.
    files: std::sync::atomic::AtomicUsize,
    next: std::sync::atomic::AtomicU64,
}

const SPILL_SUFFIX: &str = ".rows";

impl Spill {
    /// Opens (creating) the spill directory; batches already there, from an
    /// earlier run, are written first.
    pub fn open(dir: &Path) -> Result<Spill, String> {
        allot_runtime::private_files::create_dir_all(dir)
            .map_err(|e| format!("usage_spill_dir: cannot create {}: {e}", dir.display()))?;
        let files = Self::batch_files(dir)
            .map_err(|e| format!("usage_spill_dir: cannot read {}: {e}", dir.display()))?
            .len();
        if files > 0 {
            tracing::warn!(files, dir = %dir.display(), "usage batches from an earlier run are waiting to be written");
        }
        metrics::gauge!("allot_usage_spill_batches").set(files as f64);
        Ok(Spill {
            inner: Arc::new(SpillDir {
                dir: dir.to_path_buf(),
                files: files.into(),
                next: 0.into(),
            }),
        })
    }

    pub fn has_files(&self) -> bool {
        self.inner.files.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Batch files, oldest first (names sort by time of writing).
    fn batch_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(SPILL_SUFFIX))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Keeps `batch` on disk, durably.
    pub async fn put(&self, batch: &[pb::UsageRow]) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let mut bytes = Vec::new();
        for row in batch {
            row.encode_length_delimited(&mut bytes)
                .map_err(|e| e.to_string())?;
        }
        let n = self.inner.next.fetch_add(1, Ordering::SeqCst);
        let name = format!(
            "{:016}-{}-{n:08}{SPILL_SUFFIX}",
            allot::clock::now_ms(),
            std::process::id()
        );
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let temporary = dir.join(format!("{name}.tmp"));
            let mut file = allot_runtime::private_files::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let files = self.inner.files.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!("allot_usage_spill_batches").set(files as f64);
        metrics::counter!("allot_usage_rows_spilled_total").increment(batch.len() as u64);
        tracing::error!(
            rows = batch.len(),
            "usage rows not written after {ATTEMPTS} tries: kept on disk, retried later"
        );
        Ok(())
    }

    /// The oldest batch file and its rows.
    async fn oldest(&self) -> Option<(std::path::PathBuf, Result<Vec<pb::UsageRow>, String>)> {
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            let file = Self::batch_files(&dir).ok()?.into_iter().next()?;
            let rows = std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    let mut rest = bytes.as_slice();
                    let mut rows = Vec::new();
                    while !rest.is_empty() {
                        rows.push(
                            pb::UsageRow::decode_length_delimited(&mut rest)
                                .map_err(|e| format!("corrupt spilled row: {e}"))?,
                        );
                    }
                    Ok(rows)
                });
            Some((file, rows))
        })
        .await
        .ok()
        .flatten()
    }

    async fn remove(&self, file: &Path) {
        let _ = tokio::fs::remove_file(file).await;
        self.forget_one();
    }

    /// Renames an unreadable batch file so that it is no longer replayed.
    async fn set_aside(&self, file: &Path) {
        let _ = tokio::fs::rename(file, file.with_extension("unreadable")).await;
        metrics::counter!("allot_usage_spill_unreadable_total").increment(1);
        self.forget_one();
    }

    /// Nothing is left on disk (also if the count was off).
    fn emptied(&self) {
        self.inner
            .files
            .store(0, std::sync::atomic::Ordering::SeqCst);
        metrics::gauge!("allot_usage_spill_batches").set(0.0);
    }

    fn forget_one(&self) {
        use std::sync::atomic::Ordering;
        let left = self
            .inner
            .files
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0)
            .saturating_sub(1);
        metrics::gauge!("allot_usage_spill_batches").set(left as f64);
    }
}

/// The row of a settled record. The free-text fields an agent sends are
/// cut to the same bounds the Admin API applies (`allot::bounds`), so that
/// a row stays small whatever the agent's version: the record was already
/// priced and settled with them as sent.
pub fn settled_row(
    agent_id: &str,
    mut record: pb::UsageRecord,
    price: Option<crate::ledger::AppliedPrice>,
    cost: Decimal,
    now: UnixMs,
) -> pb::UsageRow {
    use allot::bounds::{MAX_HEADER_VALUE_BYTES, MAX_ID_BYTES, MAX_MODEL_BYTES};
    for (field, max) in [
        (&mut record.request_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.model_requested, MAX_MODEL_BYTES),
        (&mut record.model_served, MAX_MODEL_BYTES),
        (&mut record.trace_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.span_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.batch_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.completion_window, MAX_HEADER_VALUE_BYTES),
        (&mut record.neuron_id, MAX_ID_BYTES),
        (&mut record.refusal_code, MAX_HEADER_VALUE_BYTES),
    ] {
        let kept = allot::bounds::truncated(field, max).len();
        field.truncate(kept);
    }
    let format = allot::money::format;
    pb::UsageRow {
        agent_id: agent_id.to_string(),
        input_price: price.map(|p| format(p.input_price)).unwrap_or_default(),
        output_price: price.map(|p| format(p.output_price)).unwrap_or_default(),
        cost: format(cost),
        tariff_purpose: price.map_or(0, |p| p.purpose.to_pb() as i32),
        tariff_completion_window: match price {
            Some(p) if p.windowed => record.completion_window.clone(),
            _ => String::new(),
        },
        settled_at_unix_ms: now,
        record: Some(record),
    }
}

/// The cases every usage store must pass, run against each implementation
/// (the embedded store in this crate's tests, PostgreSQL in the end-to-end
/// tests). Each run needs an empty store.
#[doc(hidden)]
pub mod conformance {
    use super::*;

    fn row(agent: &str, seq: u64, key: &str, model: &str, at: i64, charged: bool) -> pb::UsageRow {
        pb::UsageRow {
            agent_id: agent.into(),
            record: Some(pb::UsageRecord {
                seq,
                epoch: 1,
                key_id: key.into(),
                account_id: format!("acct-{key}"),
                model_requested: model.into(),
                admitted_at_unix_ms: at,
                prompt_tokens: 10,
                completion_tokens: seq,
                charged,
                batch_id: if seq.is_multiple_of(2) {
                    "b1".into()
                } else {
                    String::new()
                },
                origin: if seq.is_multiple_of(2) {
                    pb::Origin::Batch as i32
                } else {
                    pb::Origin::Api as i32
                },
                ..Default::default()
            }),
            cost: if charged {
                format!("0.{seq}")
            } else {
                "0".into()
            },
            settled_at_unix_ms: at,
            ..Default::default()
        }
    }

    pub fn sample() -> Vec<pb::UsageRow> {
        let hour = 3_600_000;
        vec![
            row("a1", 1, "k1", "m1", 10 * hour, true),
            row("a1", 2, "k1", "m2", 10 * hour + 5, true),
            row("a1", 3, "k2", "m1", 11 * hour, false),
            row("a2", 1, "k1", "m1", 10 * hour + 7, true),
            row("a2", 2, "k2", "m1", 35 * hour, true),
        ]
    }

    pub async fn all(
        store: &dyn UsageStore,
        filter: pb::UsageFilter,
        page: usize,
    ) -> Vec<pb::UsageRow> {
        let (mut rows, mut after) = (Vec::new(), None);
        loop {
            let (got, next) = store.list(filter.clone(), after, page).await.unwrap();
            assert!(got.len() <= page);
            rows.extend(got);
            match next {
                Some(next) => after = Some(next),
                None => return rows,
            }
        }
    }

    /// The cases every usage store must pass.
    pub async fn run(store: &dyn UsageStore) {
        assert_eq!(store.insert(sample()).await.unwrap(), 5);
        // A re-sent record is the same row, written once.
        assert_eq!(store.insert(sample()[..2].to_vec()).await.unwrap(), 0);
        let everything = all(store, pb::UsageFilter::default(), 2).await;
        assert_eq!(everything.len(), 5, "paged by 2, nothing lost or repeated");
        let seqs: Vec<(String, u64)> = everything
            .iter()
            .map(|r| (r.agent_id.clone(), r.record.as_ref().unwrap().seq))
            .collect();
        assert_eq!(
            seqs,
            vec![
                ("a1".into(), 1),
                ("a1".into(), 2),
                ("a1".into(), 3),
                ("a2".into(), 1),
                ("a2".into(), 2)
            ]
        );
        let count = |filter: pb::UsageFilter| async move { all(store, filter, 100).await.len() };
        let base = pb::UsageFilter::default;
        assert_eq!(
            count(pb::UsageFilter {
                key_id: "k1".into(),
                ..base()
            })
            .await,
            3
        );
        assert_eq!(
            count(pb::UsageFilter {
                account_id: "acct-k2".into(),
                ..base()
            })
            .await,
            2
        );
        assert_eq!(
            count(pb::UsageFilter {
                model: "m2".into(),
                ..base()
            })
            .await,
            1
        );
        assert_eq!(
            count(pb::UsageFilter {
                batch_id: "b1".into(),
                ..base()
            })
            .await,
            2
        );
        assert_eq!(
            count(pb::UsageFilter {
                origin: pb::Origin::Batch as i32,
                ..base()
            })
            .await,
            2
        );
        assert_eq!(
            count(pb::UsageFilter {
                status: pb::UsageStatus::NotCharged as i32,
                ..base()
            })
            .await,
            1
        );
        assert_eq!(
            count(pb::UsageFilter {
                status: pb::UsageStatus::Charged as i32,
                ..base()
            })
            .await,
            4
        );
        let hour = 3_600_000;
        assert_eq!(
            count(pb::UsageFilter {
                from_unix_ms: 10 * hour + 5,
                to_unix_ms: 11 * hour,
                ..base()
            })
            .await,
            2,
            "[from, to)"
        );
        // Summaries add up to the rows they summarize.
        let buckets = summarize(everything.clone(), pb::Granularity::Hour);
        let requests: u64 = buckets.iter().map(|b| b.requests).sum();
        let completion: u64 = buckets.iter().map(|b| b.completion_tokens).sum();
        assert_eq!(requests, 5);
        assert_eq!(completion, 1 + 2 + 3 + 1 + 2);
        let k1_m1 = buckets
            .iter()
            .find(|b| b.key_id == "k1" && b.model == "m1")
            .unwrap();
        assert_eq!((k1_m1.requests, k1_m1.cost.as_str()), (2, "0.2"));
        let days = summarize(everything, pb::Granularity::Day);
        assert_eq!(
            days.iter().filter(|b| b.bucket_start_unix_ms == 0).count(),
            3
        );
        assert_eq!(
            days.iter()
                .filter(|b| b.bucket_start_unix_ms == 24 * hour)
                .count(),
            1
        );
        // A batch mixing rows already there with a new one writes the new
        // one only.
        let mut mixed = sample()[3..].to_vec();
        mixed.push(row("a3", 1, "k3", "m1", 12 * hour, true));
        assert_eq!(store.insert(mixed).await.unwrap(), 1);
        assert_eq!(all(store, pb::UsageFilter::default(), 100).await.len(), 6);
    }

    /// Retention deletes the rows settled before the cutoff, and only
    /// those, from every filter's view; at most `limit` per call. Runs on
    /// the six rows [`run`] leaves.
    pub async fn retention(store: &dyn UsageStore) {
        let hour = 3_600_000;
        let seqs = |rows: Vec<pb::UsageRow>| -> Vec<(String, u64)> {
            rows.iter()
                .map(|r| (r.agent_id.clone(), r.record.as_ref().unwrap().seq))
                .collect()
        };
        // Settled at 10 h: a1/1, a1/2 and a2/1; at 11 h, 12 h, 35 h: the rest.
        assert_eq!(
            store.delete_settled_before(10 * hour, 100).await.unwrap(),
            0
        );
        assert_eq!(
            store.delete_settled_before(10 * hour + 6, 1).await.unwrap(),
            1
        );
        assert_eq!(
            store
                .delete_settled_before(10 * hour + 6, 100)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store.delete_settled_before(11 * hour, 100).await.unwrap(),
            1
        );
        assert_eq!(
            store.delete_settled_before(11 * hour, 100).await.unwrap(),
            0
        );
        let left = all(store, pb::UsageFilter::default(), 2).await;
        assert_eq!(
            seqs(left),
            vec![("a1".into(), 3), ("a2".into(), 2), ("a3".into(), 1)]
        );
        let k1 = pb::UsageFilter {
            key_id: "k1".into(),
            ..Default::default()
        };
        assert!(
            all(store, k1, 100).await.is_empty(),
            "the key index forgot them"
        );
        let acct = pb::UsageFilter {
            account_id: "acct-k1".into(),
            ..Default::default()
        };
        assert!(all(store, acct, 100).await.is_empty());
        let k2 = pb::UsageFilter {
            key_id: "k2".into(),
            ..Default::default()
        };
        assert_eq!(all(store, k2, 100).await.len(), 2);
        // A row re-sent after its deletion is a row again (it was settled
        // again), and the next deletion takes it again.
        assert_eq!(store.insert(sample()[..1].to_vec()).await.unwrap(), 1);
        assert_eq!(
            store.delete_settled_before(36 * hour, 100).await.unwrap(),
            4
        );
        assert!(all(store, pb::UsageFilter::default(), 100).await.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use conformance::{all, sample};

    /// A fresh directory for one test, and an embedded store in it.
    fn scratch(label: &str) -> (std::path::PathBuf, EmbeddedUsageStore) {
        let dir = std::env::temp_dir().join(format!("allot-usage-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedUsageStore::open(&dir.join("usage.redb")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn the_embedded_store_passes_the_conformance_cases() {
        let (dir, store) = scratch("c");
        conformance::run(&store).await;
        conformance::retention(&store).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_row_keeps_an_agents_strings_cut_to_the_admin_bounds() {
        let record = pb::UsageRecord {
            batch_id: "b".repeat(150_000),
            completion_window: "w".repeat(150_000),
            model_requested: "é".repeat(1_000),
            ..Default::default()
        };
        let row = settled_row("agent-1", record, None, Decimal::ZERO, 0);
        let r = row.record.unwrap();
        assert_eq!(r.batch_id.len(), allot::bounds::MAX_HEADER_VALUE_BYTES);
        assert_eq!(
            r.completion_window.len(),
            allot::bounds::MAX_HEADER_VALUE_BYTES
        );
        assert_eq!(r.model_requested.len(), allot::bounds::MAX_MODEL_BYTES);
    }

    #[tokio::test]
    async fn retention_leaves_no_index_entry_behind_in_the_embedded_store() {
        let (dir, store) = scratch("retention-index");
        store.insert(sample()).await.unwrap();
        assert_eq!(store.delete_settled_before(i64::MAX, 100).await.unwrap(), 5);
        let txn = store.db.begin_read().unwrap();
        for table in [ROWS, BY_OWNER, BY_SETTLED] {
            assert_eq!(
                redb::ReadableTableMetadata::len(&txn.open_table(table).unwrap()).unwrap(),
                0
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_writer_deletes_rows_past_retention_in_the_background() {
        let (dir, store) = scratch("retention-writer");
        let store = Arc::new(store);
        let now = allot::clock::now_ms();
        let mut rows = sample();
        // Two rows settled now, the others long ago (hours after 1970).
        rows[0].settled_at_unix_ms = now;
        rows[4].settled_at_unix_ms = now;
        store.insert(rows).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(
            store.clone(),
            rx,
            Spill::open(&dir.join("spill")).unwrap(),
            Some(Duration::from_secs(86_400)),
        ));
        wait_for("old rows to be deleted", async || {
            all(&*store, pb::UsageFilter::default(), 100).await.len() == 2
        })
        .await;
        drop(tx);
        writer.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_written_before_the_key_and_retention_indexes_is_indexed_when_opened() {
        let (dir, store) = scratch("old");
        drop(store);
        let path = dir.join("usage.redb");
        // What an older coordinator left: rows only, no index, no meta.
        std::fs::remove_file(&path).unwrap();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(ROWS).unwrap();
                for row in conformance::sample() {
                    table
                        .insert(row_key(&row).as_slice(), row.encode_to_vec().as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedUsageStore::open(&path).unwrap();
        let by_key = pb::UsageFilter {
            key_id: "k1".into(),
            ..Default::default()
        };
        assert_eq!(conformance::all(&store, by_key.clone(), 1).await.len(), 3);
        // Rows written from now on are indexed as they are written.
        let mut later = conformance::sample()[0].clone();
        later.agent_id = "a3".into();
        store.insert(vec![later]).await.unwrap();
        assert_eq!(conformance::all(&store, by_key, 2).await.len(), 4);
        // The old rows are in the retention index too.
        assert_eq!(store.delete_settled_before(i64::MAX, 100).await.unwrap(), 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn page_tokens_and_filters_are_checked() {
        let key = row_key(&sample()[0]);
        assert_eq!(decode_token(&encode_token(&key)).unwrap(), Some(key));
        assert!(decode_token("xyz").unwrap_err().starts_with("page_token"));
        assert_eq!(page_size(0).unwrap(), 100);
        assert!(page_size(5000).unwrap_err().starts_with("page_size"));
        let backwards = pb::UsageFilter {
            from_unix_ms: 10,
            to_unix_ms: 5,
            ..Default::default()
        };
        assert!(validate_filter(&backwards)
            .unwrap_err()
            .starts_with("filter.to_unix_ms"));
    }

    /// A store that refuses every write while `down`.
    struct Flaky {
        store: EmbeddedUsageStore,
        down: std::sync::atomic::AtomicBool,
        /// The size of every batch it was asked to write.
        tries: std::sync::Mutex<Vec<usize>>,
    }

    impl UsageStore for Flaky {
        fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, String>> {
            self.tries.lock().unwrap().push(rows.len());
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(async { Err("connection refused".to_string()) });
            }
            self.store.insert(rows)
        }

        fn list(
            &self,
            filter: pb::UsageFilter,
            after: Option<Vec<u8>>,
            limit: usize,
        ) -> BoxFuture<'_, Result<Page, String>> {
            self.store.list(filter, after, limit)
        }

        fn delete_settled_before(
            &self,
            cutoff: UnixMs,
            limit: usize,
        ) -> BoxFuture<'_, Result<usize, String>> {
            self.store.delete_settled_before(cutoff, limit)
        }
    }

    fn spilled(dir: &Path) -> usize {
        Spill::batch_files(dir).unwrap().len()
    }

    async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn rows_the_store_refuses_are_kept_on_disk_and_written_once_it_is_back() {
        let (dir, store) = scratch("s");
        let flaky = Arc::new(Flaky {
            store,
            down: true.into(),
            tries: Default::default(),
        });
        let store: Arc<dyn UsageStore> = flaky.clone();
        let spill_dir = dir.join("spill");

        // Down through the retries: the batch goes to disk, and the writer
        // still stops when asked.
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(
            store.clone(),
            rx,
            Spill::open(&spill_dir).unwrap(),
            None,
        ));
        tx.send(sample()[..3].to_vec()).unwrap();
        wait_for("the batch to be spilled", async || spilled(&spill_dir) == 1).await;
        tx.send(sample()[3..].to_vec()).unwrap();
        drop(tx);
        writer.await.unwrap();
        assert_eq!(spilled(&spill_dir), 2, "shutdown spills what it holds");
        // Batches are told apart by their size (3, 2, then 1 row).
        let tries_of = |rows: usize| {
            flaky
                .tries
                .lock()
                .unwrap()
                .iter()
                .filter(|&&n| n == rows)
                .count()
        };
        // (Replays of the spilled file add tries of their own.)
        assert!(
            tries_of(3) >= ATTEMPTS as usize,
            "the first failing batch is retried"
        );
        assert_eq!(
            tries_of(2),
            1,
            "once one batch is spilled, one try is enough"
        );
        assert_eq!(all(&*store, pb::UsageFilter::default(), 100).await.len(), 0);

        // A later run, store still down: nothing is lost or written; once
        // it is back, every spilled row lands once and the spill empties.
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(
            store.clone(),
            rx,
            Spill::open(&spill_dir).unwrap(),
            None,
        ));
        tx.send(sample()[..1].to_vec()).unwrap();
        wait_for("the new batch to be spilled", async || {
            spilled(&spill_dir) == 3
        })
        .await;
        assert_eq!(
            tries_of(1),
            1,
            "with batches already spilled, one try is enough"
        );
        flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
        wait_for("the spill to be written", async || spilled(&spill_dir) == 0).await;
        let rows = all(&*store, pb::UsageFilter::default(), 100).await;
        assert_eq!(rows.len(), 5, "every row once, the re-sent one too");
        drop(tx);
        writer.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreadable_spill_file_is_set_aside_not_retried_forever() {
        let (dir, store) = scratch("u");
        let spill_dir = dir.join("spill");
        std::fs::create_dir_all(&spill_dir).unwrap();
        std::fs::write(
            spill_dir.join("0000000000000001-1-00000000.rows"),
            b"\xff\xff",
        )
        .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(
            Arc::new(store),
            rx,
            Spill::open(&spill_dir).unwrap(),
            None,
        ));
        wait_for("the file to be set aside", async || {
            spill_dir
                .join("0000000000000001-1-00000000.unreadable")
                .exists()
        })
        .await;
        assert_eq!(spilled(&spill_dir), 0);
        drop(tx);
        writer.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_writer_drains_what_it_holds_when_its_channel_closes() {
        let (dir, store) = scratch("w");
        let store: Arc<dyn UsageStore> = Arc::new(store);
        let (tx, rx) = mpsc::unbounded_channel();
        let spill = Spill::open(&dir.join("spill")).unwrap();
        let writer = tokio::spawn(run_writer(store.clone(), rx, spill, None));
        tx.send(sample()).unwrap();
        tx.send(sample()).unwrap();
        drop(tx);
        writer.await.unwrap();
        assert_eq!(all(&*store, pb::UsageFilter::default(), 100).await.len(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
