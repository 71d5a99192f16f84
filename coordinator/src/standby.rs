//! A hot standby: while another coordinator leads, this one follows the
//! store and keeps a warm ledger, so that winning the election means
//! catching up from its last revision, not loading everything.
//!
//! ```text
//!   Loading ──load at revision R──▶ Warm(R) ──watch events──▶ Warm(R')
//!      ▲                               │
//!      └── watch compacted, corrupt ───┘
//!   Warm(R') ──take(at_least)──▶ catch up (progress requests) ──▶ the ledger
//! ```
//!
//! The follower applies exactly what the leader committed, read back through
//! the store's key layout ([`crate::store::layout::decode_entry`] and
//! [`Ledger::apply_stored`]); it decides nothing and writes nothing. Fencing
//! is unchanged: the ledger it hands over is the one a fresh load at the
//! same revision would build, and the new leader's writes are fenced by its
//! own election key. One task owns the ledger until it is handed over.

use crate::ledger::{Ledger, LedgerConfig};
use crate::store::etcd::EtcdStore;
use crate::store::{layout, StoreError, StoreWrite};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How often a catching-up standby asks etcd for watch progress (etcd
/// answers only once the watcher has sent every event before it).
const PROGRESS_POLL: Duration = Duration::from_millis(20);

/// Where the follower is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Following {
    /// Reading the store (at start, or after the watch was lost).
    Loading,
    /// The ledger equals the store at this revision.
    Warm { revision: i64 },
}

struct Take {
    at_least: i64,
    reply: oneshot::Sender<Ledger>,
}

/// A standby's warm ledger, owned by its follower task.
pub struct Standby {
    takes: mpsc::Sender<Take>,
    following: watch::Receiver<Following>,
    task: JoinHandle<()>,
}

impl Standby {
    /// Starts following the store under `store`'s prefix. `store` must be
    /// unfenced: the follower only reads.
    pub fn spawn(store: EtcdStore, config: LedgerConfig) -> Standby {
        let (takes, takes_rx) = mpsc::channel(1);
        let (following_tx, following) = watch::channel(Following::Loading);
        let task = tokio::spawn(follow(store, config, takes_rx, following_tx));
        Standby {
            takes,
            following,
            task,
        }
    }

    pub fn following(&self) -> watch::Receiver<Following> {
        self.following.clone()
    }

    /// The warm ledger once it has applied every write up to `at_least`
    /// (the store's revision when this coordinator won the election and
    /// replayed the journal), or `None` if it is not warm or does not catch
    /// up within `deadline`: the caller then loads.
    pub async fn take(self, at_least: i64, deadline: Duration) -> Option<Ledger> {
        if !matches!(*self.following.borrow(), Following::Warm { .. }) {
            return None;
        }
        let (reply, ledger) = oneshot::channel();
        self.takes.send(Take { at_least, reply }).await.ok()?;
        tokio::time::timeout(deadline, ledger).await.ok()?.ok()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(
    store: EtcdStore,
    config: LedgerConfig,
    mut takes: mpsc::Receiver<Take>,
    following: watch::Sender<Following>,
) {
    let mut failures = 0u32;
    loop {
        following.send_replace(Following::Loading);
        metrics::gauge!("allot_standby_warm").set(0.0);
        let started = std::time::Instant::now();
        let warm = match load(&store, config.clone()).await {
            Ok(warm) => warm,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "the standby cannot load the ledger; retrying");
                let backoff = Duration::from_millis(200 * u64::from(failures.min(25)));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    // A take while loading: the new leader loads itself.
                    take = takes.recv() => match take {
                        Some(_) => return,
                        None => return,
                    },
                }
            }
        };
        tracing::info!(
            revision = warm.revision,
            seconds = started.elapsed().as_secs_f64(),
            "standby ledger loaded; following the store"
        );
        match run_warm(&store, warm, &mut takes, &following).await {
            Ended::HandedOver | Ended::Dropped => return,
            Ended::Lost(reason) => {
                failures += 1;
                tracing::warn!(reason, "the standby lost the store's changes; reloading");
                metrics::counter!("allot_standby_reloads_total").increment(1);
            }
        }
    }
}

struct Warm {
    ledger: Ledger,
    revision: i64,
    /// Keeps the leader's compaction short of `revision` until the watch
    /// from it is open.
    barrier: Option<crate::store::etcd::LoadBarrier>,
}

async fn load(store: &EtcdStore, config: LedgerConfig) -> Result<Warm, StoreError> {
    let (stored, revision, barrier) = store.load_at().await?;
    let ledger = tokio::task::spawn_blocking(move || Ledger::from_stored(config, stored))
        .await
        .map_err(|e| StoreError::NotApplied(format!("building the standby ledger failed: {e}")))?;
    Ok(Warm {
        ledger,
        revision,
        barrier,
    })
}

enum Ended {
    HandedOver,
    Dropped,
    Lost(String),
}

async fn run_warm(
    store: &EtcdStore,
    warm: Warm,
    takes: &mut mpsc::Receiver<Take>,
    following: &watch::Sender<Following>,
) -> Ended {
    let Warm {
        ledger,
        mut revision,
        barrier,
    } = warm;
    let mut ledger = Some(ledger);
    let mut stream = match store.watch_from(revision + 1).await {
        Ok(stream) => stream,
        Err(error) => return Ended::Lost(format!("cannot watch: {error}")),
    };
    drop(barrier);
    let publish = |revision: i64| {
        following.send_replace(Following::Warm { revision });
        metrics::gauge!("allot_standby_warm").set(1.0);
        metrics::gauge!("allot_standby_revision").set(revision as f64);
    };
    publish(revision);
    let mut pending: Option<Take> = None;
    let mut progress = tokio::time::interval(PROGRESS_POLL);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(take) = pending.take_if(|take| revision >= take.at_least) {
            let ledger = ledger
                .take()
                .expect("the follower owns the ledger until it hands it over");
            tracing::info!(revision, "standby ledger handed to the new leader");
            return match take.reply.send(ledger) {
                Ok(()) => Ended::HandedOver,
                Err(_) => Ended::Dropped,
            };
        }
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Ended::Lost("the watch ended".into()),
                    Err(error) => return Ended::Lost(format!("the watch failed: {error}")),
                };
                if response.canceled() || response.compact_revision() > 0 {
                    return Ended::Lost(format!(
                        "the watch was cancelled (compacted at {}): {}",
                        response.compact_revision(),
                        response.cancel_reason()
                    ));
                }
                if response.events().is_empty() {
                    // A progress notification: every event up to its
                    // revision has been sent. (A creation answer says
                    // nothing about events before it.)
                    if !response.created() {
                        if let Some(header) = response.header() {
                            revision = revision.max(header.revision());
                        }
                    }
                } else {
                    let (writes, last) = match decode(store.prefix(), response.events()) {
                        Ok(decoded) => decoded,
                        Err(error) => return Ended::Lost(error.to_string()),
                    };
                    let mut owned = ledger.take().expect("the follower owns the ledger");
                    // Decoding and applying a burst of commits is CPU work:
                    // off the async workers.
                    owned = match tokio::task::spawn_blocking(move || {
                        for write in writes {
                            owned.apply_stored(write);
                        }
                        owned
                    })
                    .await
                    {
                        Ok(owned) => owned,
                        Err(error) => return Ended::Lost(format!("applying failed: {error}")),
                    };
                    ledger = Some(owned);
                    revision = revision.max(last);
                }
                publish(revision);
            }
            _ = progress.tick(), if pending.is_some() => {
                if pending.as_ref().is_some_and(|take| take.reply.is_closed()) {
                    return Ended::Dropped;
                }
                if let Err(error) = stream.request_progress().await {
                    return Ended::Lost(format!("cannot ask for watch progress: {error}"));
                }
            }
            take = takes.recv(), if pending.is_none() => match take {
                Some(take) => pending = Some(take),
                None => return Ended::Dropped,
            },
        }
    }
}

/// The writes a watch response carries, in order, and the last revision.
fn decode(
    prefix: &str,
    events: &[etcd_client::Event],
) -> Result<(Vec<StoreWrite>, i64), StoreError> {
    let mut writes = Vec::with_capacity(events.len());
    let mut last = 0;
    for event in events {
        let Some(kv) = event.kv() else { continue };
        last = last.max(kv.mod_revision());
        let Ok(key) = kv.key_str() else { continue };
        let value = match event.event_type() {
            etcd_client::EventType::Put => Some(kv.value()),
            etcd_client::EventType::Delete => None,
        };
        if let Some(write) = layout::decode_entry(prefix, key, value)? {
            writes.push(write);
        }
    }
    Ok((writes, last))
}
