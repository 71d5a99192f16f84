use super::*;
use ::redb::{Database, ReadableTable, TableDefinition};

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
    pub fn open(path: &Path) -> Result<EmbeddedUsageStore, UsageStoreError> {
        if let Some(parent) = path.parent() {
            allot_runtime::private_files::create_dir_all(parent)
                .map_err(|e| setup(format_args!("cannot create {}: {e}", parent.display())))?;
        }
        allot_runtime::private_files::create_if_missing(path)
            .map_err(|e| setup(format_args!("cannot create {}: {e}", path.display())))?;
        let db = Database::create(path)
            .map_err(|e| setup(format_args!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(setup)?;
        {
            let rows = txn.open_table(ROWS).map_err(setup)?;
            let mut index = txn.open_table(BY_OWNER).map_err(setup)?;
            let mut by_settled = txn.open_table(BY_SETTLED).map_err(setup)?;
            let mut meta = txn.open_table(META).map_err(setup)?;
            if meta.get("settled_index").map_err(setup)?.is_none() {
                for entry in rows.iter().map_err(setup)? {
                    let (key, value) = entry.map_err(setup)?;
                    let row = pb::UsageRow::decode(value.value()).map_err(corrupt)?;
                    by_settled
                        .insert(settled_entry(&row, key.value()).as_slice(), [].as_slice())
                        .map_err(setup)?;
                }
                meta.insert("settled_index", 1).map_err(setup)?;
            }
            if meta.get("owner_index").map_err(setup)?.is_none() {
                let mut indexed = 0u64;
                for entry in rows.iter().map_err(setup)? {
                    let (key, value) = entry.map_err(setup)?;
                    let row = pb::UsageRow::decode(value.value()).map_err(corrupt)?;
                    for entry in owner_entries(&row, key.value()) {
                        index
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(setup)?;
                    }
                    indexed += 1;
                }
                if indexed > 0 {
                    tracing::info!(rows = indexed, "usage rows indexed by key and account");
                }
                meta.insert("owner_index", 1).map_err(setup)?;
            }
        }
        txn.commit().map_err(setup)?;
        Ok(EmbeddedUsageStore { db: Arc::new(db) })
    }
}

impl UsageStore for EmbeddedUsageStore {
    fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_write().map_err(not_applied)?;
                let mut new = 0;
                {
                    let mut table = txn.open_table(ROWS).map_err(not_applied)?;
                    let mut entries = Vec::with_capacity(rows.len() * 2);
                    let mut settled = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let key = row_key(row);
                        if table.get(key.as_slice()).map_err(not_applied)?.is_some() {
                            continue;
                        }
                        table
                            .insert(key.as_slice(), row.encode_to_vec().as_slice())
                            .map_err(not_applied)?;
                        entries.extend(owner_entries(row, &key));
                        settled.push(settled_entry(row, &key));
                        new += 1;
                    }
                    // In order: neighbouring entries share B-tree pages.
                    entries.sort_unstable();
                    let mut index = txn.open_table(BY_OWNER).map_err(not_applied)?;
                    for entry in &entries {
                        index
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(not_applied)?;
                    }
                    settled.sort_unstable();
                    let mut by_settled = txn.open_table(BY_SETTLED).map_err(not_applied)?;
                    for entry in &settled {
                        by_settled
                            .insert(entry.as_slice(), [].as_slice())
                            .map_err(not_applied)?;
                    }
                }
                txn.commit().map_err(maybe_applied)?;
                Ok(new)
            })
            .await
            .map_err(not_applied)?
        })
    }

    fn list(
        &self,
        filter: pb::UsageFilter,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, UsageStoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(not_applied)?;
                let table = txn.open_table(ROWS).map_err(not_applied)?;
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
                let mut take = |key: &[u8], value: &[u8]| -> Result<bool, UsageStoreError> {
                    let row = pb::UsageRow::decode(value).map_err(corrupt)?;
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
                        let index = txn.open_table(BY_OWNER).map_err(not_applied)?;
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
                            .map_err(not_applied)?
                        {
                            let (entry, _) = entry.map_err(not_applied)?;
                            let Some(key) = entry.value().strip_prefix(prefix.as_slice()) else {
                                break;
                            };
                            let Some(value) = table.get(key).map_err(not_applied)? else {
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
                        .map_err(not_applied)?;
                        let mut more = false;
                        for entry in range {
                            let (key, value) = entry.map_err(not_applied)?;
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
            .map_err(not_applied)?
        })
    }

    fn delete_settled_before(
        &self,
        cutoff: UnixMs,
        limit: usize,
    ) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::delete_before(&db, cutoff, limit))
                .await
                .map_err(not_applied)?
        })
    }
}

impl EmbeddedUsageStore {
    /// Deletes what [`UsageStore::delete_settled_before`] deletes, in one
    /// write transaction (`limit` bounds how long it holds the writer).
    fn delete_before(
        db: &Database,
        cutoff: UnixMs,
        limit: usize,
    ) -> Result<usize, UsageStoreError> {
        let txn = db.begin_write().map_err(not_applied)?;
        let mut deleted = 0;
        {
            let mut rows = txn.open_table(ROWS).map_err(not_applied)?;
            let mut index = txn.open_table(BY_OWNER).map_err(not_applied)?;
            let mut by_settled = txn.open_table(BY_SETTLED).map_err(not_applied)?;
            let end = settled_prefix(cutoff);
            let old: Vec<Vec<u8>> = by_settled
                .range::<&[u8]>(..end.as_slice())
                .map_err(not_applied)?
                .take(limit)
                .map(|entry| entry.map(|(key, _)| key.value().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(not_applied)?;
            for entry in &old {
                let key = &entry[8..];
                let removed = rows.remove(key).map_err(not_applied)?;
                if let Some(value) = removed {
                    let row = pb::UsageRow::decode(value.value()).map_err(corrupt)?;
                    for owner in owner_entries(&row, key) {
                        index.remove(owner.as_slice()).map_err(not_applied)?;
                    }
                    deleted += 1;
                }
                by_settled.remove(entry.as_slice()).map_err(not_applied)?;
            }
        }
        txn.commit().map_err(maybe_applied)?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conformance::{sample, scratch};

    #[tokio::test]
    async fn the_embedded_store_passes_the_conformance_cases() {
        let (dir, store) = scratch("c");
        conformance::run(&store).await;
        conformance::retention(&store).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn retention_leaves_no_index_entry_behind_in_the_embedded_store() {
        let (dir, store) = scratch("retention-index");
        store.insert(sample()).await.unwrap();
        assert_eq!(store.delete_settled_before(i64::MAX, 100).await.unwrap(), 5);
        let txn = store.db.begin_read().unwrap();
        for table in [ROWS, BY_OWNER, BY_SETTLED] {
            assert_eq!(
                ::redb::ReadableTableMetadata::len(&txn.open_table(table).unwrap()).unwrap(),
                0
            );
        }
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
}
