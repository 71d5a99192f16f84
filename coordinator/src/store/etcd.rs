//! The etcd store: the production, highly available home of budgets.
//!
//! Every write is fenced: a transaction applies only while this
//! coordinator's election key still exists with the create revision it won
//! with, so a deposed leader (its lease expired while it was paused or cut
//! off) can never write. A batch that fits etcd's per-transaction limit is
//! one transaction. A larger one is first written whole, as one journal
//! value, in one fenced transaction; then applied in parts; then the
//! journal is deleted. Every write is an absolute value, so replaying a
//! journal (the next leader does so before loading) is harmless: each part
//! is atomic and the batch as a whole is never half-applied.
//!
//! Every call goes through one retry policy: bounded, exponential,
//! jittered, each attempt logged. Replaying a maybe-applied commit is safe
//! for the same reason a journal replay is.

use super::{layout, BoxFuture, Store, StoreError, StoreWrite, StoredState};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use rand::Rng;
use std::time::Duration;
use tracing::Instrument;

/// Operations per transaction: etcd's `--max-txn-ops` default is 128.
pub const MAX_TXN_OPS: usize = 120;
const JOURNAL: &str = "journal";
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

type Ops = Vec<(String, Option<Vec<u8>>)>;

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

    /// One fenced transaction, retried under the policy.
    async fn apply(&self, ops: &Ops) -> Result<(), StoreError> {
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|(key, value)| match value {
                Some(bytes) => TxnOp::put(key.as_bytes(), bytes.clone(), None),
                None => TxnOp::delete(key.as_bytes(), None),
            })
            .collect();
        let txn = self.fenced(txn_ops);
        let started = std::time::Instant::now();
        let response = retry("txn", || {
            let mut client = self.client.clone();
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .instrument(tracing::info_span!("etcd.txn", ops = ops.len()))
        .await?;
        metrics::histogram!("allot_etcd_txn_seconds").record(started.elapsed().as_secs_f64());
        if !response.succeeded() {
            metrics::counter!("allot_etcd_fenced_writes_total").increment(1);
            return Err(StoreError::Fenced);
        }
        Ok(())
    }

    async fn apply_in_parts(&self, ops: &Ops) -> Result<(), StoreError> {
        for part in ops.chunks(self.max_ops) {
            self.apply(&part.to_vec()).await?;
        }
        Ok(())
    }

    /// Everything under the prefix, read at one revision, and that
    /// revision: a follower watches from the next one.
    pub async fn load_at(&self) -> Result<(StoredState, i64), StoreError> {
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
        Ok((state?, revision))
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

    /// Replays a journal left by a leader that stopped mid-batch.
    async fn replay_journal(&self) -> Result<(), StoreError> {
        let key = self.journal_key();
        let response = retry("get journal", || {
            let mut client = self.client.clone();
            let key = key.clone();
            async move { client.get(key, None).await }
        })
        .await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(());
        };
        let ops: Ops = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            message: e.to_string(),
        })?;
        tracing::warn!(
            ops = ops.len(),
            "replaying the settlement journal of an interrupted batch"
        );
        self.apply_in_parts(&ops).await?;
        self.apply(&vec![(key, None)]).await
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
            if ops.len() <= self.max_ops {
                return self.apply(&ops).await;
            }
            let journal =
                serde_json::to_vec(&ops).map_err(|e| StoreError::NotApplied(e.to_string()))?;
            self.apply(&vec![(self.journal_key(), Some(journal))])
                .await?;
            self.apply_in_parts(&ops).await?;
            self.apply(&vec![(self.journal_key(), None)]).await
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
