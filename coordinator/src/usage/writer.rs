use super::*;

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
pub(super) const ATTEMPTS: u32 = 4;
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

#[cfg(test)]
mod tests {
    use super::*;

    use conformance::{all, sample, scratch};

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

    /// A store that refuses every write while `down`.
    struct Flaky {
        store: EmbeddedUsageStore,
        down: std::sync::atomic::AtomicBool,
        /// The size of every batch it was asked to write.
        tries: std::sync::Mutex<Vec<usize>>,
    }

    impl UsageStore for Flaky {
        fn insert(&self, rows: Vec<pb::UsageRow>) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
            self.tries.lock().unwrap().push(rows.len());
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(async {
                    Err(UsageStoreError::NotApplied("connection refused".into()))
                });
            }
            self.store.insert(rows)
        }

        fn list(
            &self,
            filter: pb::UsageFilter,
            after: Option<Vec<u8>>,
            limit: usize,
        ) -> BoxFuture<'_, Result<Page, UsageStoreError>> {
            self.store.list(filter, after, limit)
        }

        fn delete_settled_before(
            &self,
            cutoff: UnixMs,
            limit: usize,
        ) -> BoxFuture<'_, Result<usize, UsageStoreError>> {
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
