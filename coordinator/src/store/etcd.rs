//! The etcd store: the production, highly available home of budgets.
//!
//! Every write is fenced: a transaction applies only while this
//! coordinator's election key still exists with the create revision it won
//! with, so a deposed leader (its lease expired while it was paused or cut
//! off) can never write. A batch that fits one transaction (etcd's default
//! `--max-txn-ops` and `--max-request-bytes`, see [`journal`]) is one
//! transaction. A larger one is first journaled in chunks, then committed
//! by the journal's head, then applied in parts, several at once, then the
//! journal is deleted. Every write is an absolute value and the parts are
//! disjoint keys, so replaying a journal (the next leader does so before
//! loading) is harmless and the order of parts does not matter: the batch
//! as a whole is never half-applied once its head is written, and never
//! applied at all before.
//!
//! Every call goes through one retry policy: bounded, exponential,
//! jittered, each attempt logged. Replaying a maybe-applied commit is safe
//! for the same reason a journal replay is.

use super::journal::{self, Head, Journal, Op};
use super::{layout, BoxFuture, Store, StoreError, StoreWrite, StoredState};
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use futures_util::{StreamExt, TryStreamExt};
use rand::Rng;
use std::time::Duration;
use tracing::Instrument;

/// Operations per transaction: etcd's `--max-txn-ops` default is 128.
pub const MAX_TXN_OPS: usize = 120;
const JOURNAL: &str = "journal";
/// Where the chunks of a journal live: `{prefix}journal-chunks/{batch}/{n}`.
const JOURNAL_CHUNKS: &str = "journal-chunks/";
/// Transactions of one batch in flight at once (chunks, then parts).
const PARALLEL_TXNS: usize = 8;
/// Where loads name the revision they read at: `{prefix}loads/{id}`.
const LOADS: &str = "loads/";
/// The lease of a load's barrier: how long one left by a crashed loader
/// holds compaction back.
const BARRIER_TTL_SECS: i64 = 30;
const ATTEMPTS: u32 = 6;
/// Keys per page when loading the ledger.
const LOAD_PAGE: i64 = 2_000;
/// Largest watch response a follower decodes (etcd batches the events of
/// many revisions into one response when a watcher catches up).
pub const MAX_WATCH_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The election key this leader holds, compared by every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    fence: Option<Fence>,
    max_ops: usize,
}

impl EtcdStore {
    /// A store whose writes are fenced by `fence` (`None` only for tests
    /// and tools that run without an election).
    pub fn new(client: Client, prefix: &str, fence: Option<Fence>) -> EtcdStore {
        EtcdStore {
            client,
            prefix: prefix.to_string(),
            fence,
            max_ops: MAX_TXN_OPS,
        }
    }

    pub fn with_max_ops(mut self, max_ops: usize) -> EtcdStore {
        self.max_ops = max_ops.max(2);
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn journal_key(&self) -> String {
        format!("{}{JOURNAL}", self.prefix)
    }

    fn chunk_dir(&self) -> String {
        format!("{}{JOURNAL_CHUNKS}", self.prefix)
    }

    fn fenced(&self, ops: Vec<TxnOp>) -> Txn {
        let txn = Txn::new();
        let txn = match &self.fence {
            Some(fence) => txn.when(vec![Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.create_revision,
            )]),
            None => txn,
        };
        txn.and_then(ops)
    }

    /// One fenced transaction of `ops`, retried under the policy.
    async fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|(key, value)| match value {
                Some(bytes) => TxnOp::put(key.as_bytes(), bytes.clone(), None),
                None => TxnOp::delete(key.as_bytes(), None),
            })
            .collect();
        self.apply_txn(txn_ops).await
    }

    async fn apply_txn(&self, txn_ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let count = txn_ops.len();
        let txn = self.fenced(txn_ops);
        let started = std::time::Instant::now();
        let response = retry("txn", || {
            let mut client = self.client.clone();
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .instrument(tracing::info_span!("etcd.txn", ops = count))
        .await?;
        metrics::histogram!("allot_etcd_txn_seconds").record(started.elapsed().as_secs_f64());
        if !response.succeeded() {
            metrics::counter!("allot_etcd_fenced_writes_total").increment(1);
            return Err(StoreError::Fenced);
        }
        Ok(())
    }

    /// `ops` in parts (see [`journal::parts`]), up to [`PARALLEL_TXNS`] at
    /// once: the keys are disjoint and every value absolute, so the order
    /// does not matter. The first failure ends the batch (the engine then
    /// reloads, replaying the journal).
    async fn apply_in_parts(&self, ops: &[Op]) -> Result<(), StoreError> {
        futures_util::stream::iter(journal::parts(ops, self.max_ops))
            .map(|part| self.apply(&ops[part]))
            .buffer_unordered(PARALLEL_TXNS)
            .try_collect::<()>()
            .await
    }

    /// A batch too large for one transaction: journaled in chunks,
    /// committed by writing the head, applied in parts, then forgotten.
    async fn commit_journaled(&self, ops: &[Op]) -> Result<(), StoreError> {
        let chunks = journal::encode_chunks(ops)?;
        let batch = format!("{:016x}", rand::rng().random::<u64>());
        let dir = self.chunk_dir();
        let count = chunks.len();
        futures_util::stream::iter(chunks.into_iter().enumerate())
            .map(|(i, chunk)| {
                let key = journal::chunk_key(&dir, &batch, i);
                self.apply_txn(vec![TxnOp::put(key, chunk, None)])
            })
            .buffer_unordered(PARALLEL_TXNS)
            .try_collect::<()>()
            .await?;
        let head = Head {
            batch,
            chunks: count,
        };
        self.apply(&[(self.journal_key(), Some(journal::encode_head(&head)))])
            .await?;
        metrics::counter!("allot_etcd_journaled_batches_total").increment(1);
        self.apply_in_parts(ops).await?;
        self.forget_journal().await
    }

    /// Deletes the journal's head and every chunk (a batch's, and any left
    /// by a leader that died before writing its head), in one transaction.
    async fn forget_journal(&self) -> Result<(), StoreError> {
        self.apply_txn(vec![
            TxnOp::delete(self.journal_key(), None),
            TxnOp::delete(self.chunk_dir(), Some(DeleteOptions::new().with_prefix())),
        ])
        .await
    }

    /// Everything under the prefix, read at one revision, and that
    /// revision: a follower watches from the next one. A load of more than
    /// one page holds a [`LoadBarrier`] at that revision, returned so that
    /// a follower can keep it until its watch is open.
    pub async fn load_at(&self) -> Result<(StoredState, i64, Option<LoadBarrier>), StoreError> {
        let mut barrier = None;
        // Paged, at one revision: a large ledger never needs one huge
        // response (gRPC messages are capped at 4 MiB by default), and
        // every page sees the same snapshot.
        let end = prefix_end(self.prefix.as_bytes());
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let key = start.clone();
            let response = retry("load", || {
                let mut client = self.client.clone();
                let (key, options) = (key.clone(), options.clone());
                async move { client.get(key, Some(options)).await }
            })
            .await?;
            if revision == 0 {
                revision = response.header().map(|h| h.revision()).unwrap_or(0);
                if response.more() {
                    barrier = LoadBarrier::put(&self.client, &self.prefix, revision).await;
                }
            }
            for kv in response.kvs() {
                if let Ok(key) = kv.key_str() {
                    entries.push((key.to_string(), kv.value().to_vec()));
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        // Decoding a large ledger is CPU work: off the async workers.
        let prefix = self.prefix.clone();
        let state = tokio::task::spawn_blocking(move || {
            layout::decode(
                &prefix,
                entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            )
        })
        .await
        .map_err(|e| StoreError::NotApplied(format!("decoding the ledger failed: {e}")))?;
        Ok((state?, revision, barrier))
    }

    /// What a new leader does before it serves: replays a journal the last
    /// leader left (fenced by this leader's election key), then answers the
    /// store's revision. A standby's ledger caught up to that revision is
    /// the ledger a fresh load would build.
    pub async fn prepare_to_lead(&self) -> Result<i64, StoreError> {
        self.replay_journal().await?;
        let key = self.journal_key();
        let response = retry("revision", || {
            let mut client = self.client.clone();
            let key = key.clone();
            async move { client.get(key, None).await }
        })
        .await?;
        response
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::MaybeApplied("etcd answered without a revision".into()))
    }

    /// Watches every key under the prefix from `revision` (inclusive), with
    /// progress notifications. Responses may be large after a burst of
    /// commits: they are decoded up to [`MAX_WATCH_RESPONSE_BYTES`].
    pub async fn watch_from(&self, revision: i64) -> Result<etcd_client::WatchStream, StoreError> {
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision)
            .with_progress_notify();
        self.client
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_RESPONSE_BYTES)
            .watch(self.prefix.clone(), Some(options))
            .await
            .map_err(classify)
    }

    /// Replays a journal left by a leader that stopped mid-batch, and
    /// deletes chunks left without a head (a batch never committed).
    async fn replay_journal(&self) -> Result<(), StoreError> {
        let key = self.journal_key();
        let response = retry("get journal", || {
            let mut client = self.client.clone();
            let key = key.clone();
            async move { client.get(key, None).await }
        })
        .await?;
        let Some(kv) = response.kvs().first() else {
            return self.forget_stray_chunks().await;
        };
        let ops = match journal::decode_head(&key, kv.value())? {
            Journal::Whole(ops) => ops,
            Journal::Chunked(head) => self.read_chunks(&head).await?,
        };
        tracing::warn!(
            ops = ops.len(),
            "replaying the settlement journal of an interrupted batch"
        );
        self.apply_in_parts(&ops).await?;
        self.forget_journal().await
    }

    /// The ops of a committed journal, chunk by chunk (one chunk per read:
    /// a response stays far under gRPC's 4 MiB). A missing chunk is corrupt.
    async fn read_chunks(&self, head: &Head) -> Result<Vec<Op>, StoreError> {
        let dir = self.chunk_dir();
        let mut ops = Vec::new();
        for i in 0..head.chunks {
            let key = journal::chunk_key(&dir, &head.batch, i);
            let response = retry("get journal chunk", || {
                let mut client = self.client.clone();
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
            let Some(kv) = response.kvs().first() else {
                return Err(StoreError::Corrupt {
                    key,
                    message: format!("chunk {i} of {} of the journal is missing", head.chunks),
                });
            };
            ops.extend(journal::decode_chunk(&key, kv.value())?);
        }
        Ok(ops)
    }

    async fn forget_stray_chunks(&self) -> Result<(), StoreError> {
        let dir = self.chunk_dir();
        let response = retry("count journal chunks", || {
            let mut client = self.client.clone();
            let dir = dir.clone();
            async move {
                client
                    .get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
                    .await
            }
        })
        .await?;
        if response.count() == 0 || self.fence.is_none() {
            return Ok(());
        }
        tracing::warn!(
            chunks = response.count(),
            "deleting the journal chunks of a batch that was never committed"
        );
        self.forget_journal().await
    }
}

/// While a load reads a large ledger at one revision (and until a
/// follower's watch from it is open), `{prefix}loads/{id}` names that
/// revision and the leader's compaction stops short of it: a load longer
/// than the compaction interval still finishes. The key lives on an etcd
/// lease kept alive while the barrier lives (no wall clock is compared):
/// dropped, the lease is revoked; left by a loader that crashed, it lapses
/// after [`BARRIER_TTL_SECS`].
pub struct LoadBarrier {
    client: Client,
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

impl LoadBarrier {
    /// Names `revision` as read by a load; `None` if etcd refused (the
    /// load goes on unprotected, and starts again if compacted under it).
    async fn put(client: &Client, prefix: &str, revision: i64) -> Option<LoadBarrier> {
        let mut kv = client.clone();
        let attempt = async {
            let lease = kv.lease_grant(BARRIER_TTL_SECS, None).await?.id();
            let key = format!("{prefix}{LOADS}{lease:016x}");
            let options = etcd_client::PutOptions::new().with_lease(lease);
            kv.put(key, revision.to_string(), Some(options)).await?;
            let (mut keeper, mut stream) = kv.lease_keep_alive(lease).await?;
            Ok::<_, etcd_client::Error>((lease, async move {
                let mut tick =
                    tokio::time::interval(Duration::from_secs(BARRIER_TTL_SECS as u64 / 3));
                loop {
                    tick.tick().await;
                    if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                        tracing::warn!(lease, "a load's hold on etcd's history may lapse");
                    }
                }
            }))
        };
        match attempt.await {
            Ok((lease, keep)) => Some(LoadBarrier {
                client: client.clone(),
                lease,
                keeper: tokio::spawn(keep),
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot hold etcd's history for a load");
                None
            }
        }
    }
}

impl Drop for LoadBarrier {
    fn drop(&mut self) {
        self.keeper.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut client = self.client.clone();
            let lease = self.lease;
            runtime.spawn(async move {
                if let Err(error) = client.lease_revoke(lease).await {
                    tracing::warn!(%error, "cannot remove a load's hold on etcd's history");
                }
            });
        }
    }
}

/// The oldest revision a load in progress reads at, if any.
async fn oldest_load(client: &mut Client, prefix: &str) -> Result<Option<i64>, etcd_client::Error> {
    let response = client
        .get(
            format!("{prefix}{LOADS}"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| kv.value_str().ok()?.parse::<i64>().ok())
        .min())
}

/// What the leader runs while it leads: keeps `retain` of etcd's history
/// and compacts the rest, so that etcd's database stops growing with every
/// settlement batch on an etcd run with its defaults (no auto-compaction).
/// Every quarter of `retain` it notes etcd's revision and compacts up to
/// the newest revision noted at least `retain` ago, but never past a load
/// in progress ([`LoadBarrier`]): etcd holds between 1 and 1.25 × `retain`
/// of history. A compaction etcd already made (its own
/// `--auto-compaction-*`) is fine. Never returns.
pub async fn compact_history(
    client: Client,
    prefix: String,
    retain: Duration,
) -> std::convert::Infallible {
    let mut ticks = tokio::time::interval((retain / 4).max(Duration::from_millis(250)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Revisions noted, oldest first; at most five (one `retain` of quarters).
    let mut noted: std::collections::VecDeque<(tokio::time::Instant, i64)> = Default::default();
    let mut compacted = 0;
    loop {
        let now = ticks.tick().await;
        let mut kv = client.clone();
        let revision = kv
            .get(
                format!("{prefix}{JOURNAL}"),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map(|response| response.header().map(|h| h.revision()));
        match revision {
            Ok(Some(revision)) => noted.push_back((now, revision)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read etcd's revision to compact its history")
            }
        }
        let mut due = None;
        while let Some(&(at, revision)) = noted.front() {
            if now.duration_since(at) < retain {
                break;
            }
            due = Some(revision);
            noted.pop_front();
        }
        let Some(due) = due else {
            continue;
        };
        let compact_to = match oldest_load(&mut kv, &prefix).await {
            Ok(oldest) => oldest.map_or(due, |r| r.min(due)),
            Err(error) => {
                tracing::warn!(%error, "cannot read the loads in progress; not compacting");
                continue;
            }
        };
        if compact_to <= compacted {
            continue;
        }
        match kv.compact(compact_to, None).await {
            Ok(_) => {
                compacted = compact_to;
                metrics::gauge!("allot_etcd_compacted_revision").set(compact_to as f64);
                tracing::debug!(revision = compact_to, "etcd history compacted");
            }
            // Compacted past it already (etcd's own auto-compaction).
            Err(error) if error.to_string().contains("compacted") => compacted = compact_to,
            Err(error) => tracing::warn!(%error, "cannot compact etcd's history"),
        }
    }
}

fn classify(error: etcd_client::Error) -> StoreError {
    match &error {
        etcd_client::Error::GRpcStatus(status)
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::ResourceExhausted
            ) =>
        {
            StoreError::NotApplied(error.to_string())
        }
        _ => StoreError::MaybeApplied(error.to_string()),
    }
}

/// The one retry policy of etcd calls: up to six attempts, exponential
/// backoff from 50 ms with full jitter, each failure logged.
async fn retry<T, F, Fut>(what: &str, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => {
                let classified = classify(error);
                if matches!(classified, StoreError::NotApplied(_)) || attempt >= ATTEMPTS {
                    tracing::error!(what, attempt, error = %classified, "etcd call failed");
                    return Err(classified);
                }
                tracing::warn!(what, attempt, error = %classified, "etcd call failed; retrying");
            }
            Err(_) => {
                if attempt >= ATTEMPTS {
                    tracing::error!(what, attempt, "etcd call timed out");
                    return Err(StoreError::MaybeApplied(format!("{what} timed out")));
                }
                tracing::warn!(what, attempt, "etcd call timed out; retrying");
            }
        }
        metrics::counter!("allot_etcd_retries_total").increment(1);
        let cap = 50u64 << attempt.min(6);
        let delay = rand::rng().random_range(cap / 2..=cap);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

impl Store for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<StoredState, StoreError>> {
        Box::pin(async move {
            if self.fence.is_some() {
                self.replay_journal().await?;
            }
            Ok(self.load_at().await?.0)
        })
    }

    fn commit(&self, writes: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let ops = layout::coalesce(&self.prefix, &writes);
            if ops.is_empty() {
                return Ok(());
            }
            if journal::fits_one_txn(&ops, self.max_ops) {
                return self.apply(&ops).await;
            }
            self.commit_journaled(&ops).await
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut client = self.client.clone();
            matches!(
                tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get(format!("{}ping", self.prefix), None)
                )
                .await,
                Ok(Ok(_))
            )
        })
    }
}
