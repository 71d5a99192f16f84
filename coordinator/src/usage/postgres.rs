use super::*;

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
    pub fn new(url: &str) -> Result<PostgresUsageStore, UsageStoreError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(WRITES_IN_FLIGHT as u32 + 2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)
            .map_err(|e| setup(format_args!("usage_postgres_url: {e}")))?;
        Ok(PostgresUsageStore {
            pool,
            schema: tokio::sync::OnceCell::new(),
        })
    }

    /// [`PostgresUsageStore::new`], then the schema at once.
    pub async fn connect(url: &str) -> Result<PostgresUsageStore, UsageStoreError> {
        let store = PostgresUsageStore::new(url)?;
        store.ensure_schema().await?;
        Ok(store)
    }

    /// Runs the migrations once; until they ran, every call fails with
    /// nothing applied.
    async fn ensure_schema(&self) -> Result<(), UsageStoreError> {
        self.schema
            .get_or_try_init(|| async {
                sqlx::migrate!("./migrations")
                    .run(&self.pool)
                    .await
                    .map_err(|e| {
                        not_applied(format_args!("cannot migrate the usage database: {e}"))
                    })
            })
            .await
            .map(drop)
    }
}

/// The error of a commit, or of a statement that commits by itself: the
/// database refused it, or it never left the pool (nothing changed), or
/// its answer was lost (the commit may have happened).
fn commit_failed(error: sqlx::Error) -> UsageStoreError {
    match error {
        sqlx::Error::Database(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Configuration(_) => not_applied(error),
        _ => maybe_applied(error),
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
fn copy_data(rows: &[pb::UsageRow]) -> Result<Vec<u8>, UsageStoreError> {
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
            text => allot::money::parse_decimal("cost", text).map_err(not_applied)?,
        };
        numeric.clear();
        // A decimal is never NULL.
        let _not_null = sqlx::Encode::<sqlx::Postgres>::encode_by_ref(&cost, &mut numeric)
            .map_err(not_applied)?;
        encoded.clear();
        row.encode(&mut encoded).map_err(not_applied)?;
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
    async fn insert_skipping_duplicates(
        &self,
        rows: &[pb::UsageRow],
    ) -> Result<usize, UsageStoreError> {
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
        let mut txn = self.pool.begin().await.map_err(not_applied)?;
        Self::note_keys(&mut txn, rows).await.map_err(not_applied)?;
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
        .map_err(not_applied)?;
        txn.commit().await.map_err(commit_failed)?;
        Ok(done.rows_affected() as usize)
    }
}

impl UsageStore for PostgresUsageStore {
    /// One binary `COPY` in one transaction, the fast path (COPY cannot
    /// skip conflicts); a batch holding a row already written (a record
    /// settled again after a lost ack) fails it whole on the primary key,
    /// and is inserted again skipping the rows already there.
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
        Box::pin(async move {
            self.ensure_schema().await?;
            let data = copy_data(&rows)?;
            let mut txn = self.pool.begin().await.map_err(not_applied)?;
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
                    txn.commit().await.map_err(commit_failed)?;
                    Ok(new as usize)
                }
                Err(error) if is_unique_violation(&error) => {
                    txn.rollback().await.map_err(not_applied)?;
                    self.insert_skipping_duplicates(&rows).await
                }
                Err(error) => Err(not_applied(error)),
            }
        })
    }

    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, UsageStoreError>> {
        Box::pin(async move {
            self.ensure_schema().await?;
            let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "SELECT agent_id, epoch, seq, row FROM usage_rows WHERE TRUE",
            );
            if let Some(after) = &after {
                let (agent, epoch, seq) = parse_key(after).ok_or_else(not_a_page_token)?;
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
                .map_err(not_applied)?;
            let more = found.len() > limit;
            let mut rows = Vec::with_capacity(found.len().min(limit));
            for (_, _, _, bytes) in found.into_iter().take(limit) {
                rows.push(pb::UsageRow::decode(bytes.as_slice()).map_err(corrupt)?);
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
    ) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
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
            .map_err(commit_failed)?;
            Ok(done.rows_affected() as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_whose_answer_was_lost_may_have_been_applied_and_a_refused_one_was_not() {
        let lost = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(
            commit_failed(lost),
            UsageStoreError::MaybeApplied(_)
        ));
        for never_sent in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            assert!(matches!(
                commit_failed(never_sent),
                UsageStoreError::NotApplied(_)
            ));
        }
    }
}
