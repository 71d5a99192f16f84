//! The embedded store: one redb file, for a single coordinator (the quick
//! start's default). redb commits are atomic and fsync'd; the file lock keeps
//! a second coordinator from opening the same file, which is this store's
//! fencing.

use super::{layout, BoxFuture, Store, StoreError, StoreWrite, StoredState};
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("allot");
const PREFIX: &str = "/allot/";

pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(parent) = path.parent() {
            allot_runtime::private_files::create_dir_all(parent).map_err(|e| {
                StoreError::NotApplied(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        allot_runtime::private_files::create_if_missing(path).map_err(|e| {
            StoreError::NotApplied(format!("cannot create {}: {e}", path.display()))
        })?;
        let db = Database::create(path)
            .map_err(|e| StoreError::NotApplied(format!("cannot open {}: {e}", path.display())))?;
        // Create the table so that the first load finds it.
        let txn = db.begin_write().map_err(not_applied)?;
        txn.open_table(TABLE).map_err(not_applied)?;
        txn.commit().map_err(not_applied)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }
}

fn not_applied(e: impl std::fmt::Display) -> StoreError {
    StoreError::NotApplied(e.to_string())
}

impl Store for EmbeddedStore {
    fn load(&self) -> BoxFuture<'_, Result<StoredState, StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(not_applied)?;
                let table = txn.open_table(TABLE).map_err(not_applied)?;
                let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
                for row in table.iter().map_err(not_applied)? {
                    let (key, value) = row.map_err(not_applied)?;
                    entries.push((key.value().to_string(), value.value().to_vec()));
                }
                layout::decode(
                    PREFIX,
                    entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                )
            })
            .await
            .map_err(not_applied)?
        })
    }

    fn commit(&self, writes: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(());
            }
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_write().map_err(not_applied)?;
                {
                    let mut table = txn.open_table(TABLE).map_err(not_applied)?;
                    for (key, value) in layout::coalesce(PREFIX, &writes) {
                        match value {
                            Some(bytes) => {
                                table
                                    .insert(key.as_str(), bytes.as_slice())
                                    .map_err(not_applied)?;
                            }
                            None => {
                                table.remove(key.as_str()).map_err(not_applied)?;
                            }
                        }
                    }
                }
                // A failed commit of redb leaves the previous state intact.
                txn.commit().map_err(not_applied)
            })
            .await
            .map_err(|e| StoreError::MaybeApplied(e.to_string()))?
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}
