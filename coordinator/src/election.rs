//! Leader election through etcd's election API, on a lease kept alive by
//! this coordinator. A coordinator counts as leader only after its first
//! successful keep-alive once elected, and steps down as soon as a
//! keep-alive fails or the lease is gone: from then on its fenced writes
//! fail anyway, since the election key they compare is deleted with the
//! lease.

use crate::store::etcd::Fence;
use etcd_client::Client;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// This coordinator's hold on leadership.
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    /// Becomes `true` when the lease is lost.
    pub lost: watch::Receiver<bool>,
    keeper: JoinHandle<()>,
    client: Client,
}

impl Leadership {
    /// Gives leadership up at once: revoking the lease deletes the
    /// election key, so a standby wins without waiting for the TTL.
    pub async fn resign(self) {
        self.keeper.abort();
        let mut client = self.client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(self.lease)).await;
    }

    /// Resolves when leadership is lost.
    pub async fn wait_lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Keeps `lease` alive every `ttl / 3`; reports successes and the loss.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    successes: watch::Sender<u64>,
    lost: watch::Sender<bool>,
) {
    let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(error) => {
            tracing::warn!(%error, "cannot keep the election lease alive");
            lost.send_replace(true);
            return;
        }
    };
    // Beat every third of the TTL; one slow beat is not a loss, but once no
    // beat has succeeded for two thirds of the TTL the lease may lapse
    // before the next one: step down.
    let mut tick = tokio::time::interval(ttl / 3);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let beat = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(ttl / 3, beat).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                last_ok = tokio::time::Instant::now();
                successes.send_modify(|n| *n += 1);
            }
            Ok(Ok(Some(_))) => {
                tracing::warn!(lease, "the election lease is gone; stepping down");
                lost.send_replace(true);
                return;
            }
            outcome => {
                if last_ok.elapsed() >= ttl * 2 / 3 {
                    tracing::warn!(
                        ?outcome,
                        lease,
                        "election lease keep-alive failing; stepping down"
                    );
                    lost.send_replace(true);
                    return;
                }
                tracing::warn!(
                    ?outcome,
                    lease,
                    "an election lease keep-alive failed; retrying"
                );
            }
        }
    }
}

/// A campaign's lease until it leads. A campaign that fails, or that is
/// dropped (the coordinator shuts down while it waits), stops keeping the
/// lease alive and revokes it, so that its candidacy cannot win after this
/// coordinator is gone.
struct PendingLease {
    client: Client,
    lease: i64,
    keeper: Option<JoinHandle<()>>,
}

impl Drop for PendingLease {
    fn drop(&mut self) {
        let Some(keeper) = self.keeper.take() else {
            return;
        };
        keeper.abort();
        let (mut client, lease) = (self.client.clone(), self.lease);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
            });
        }
    }
}

/// Campaigns for leadership under `{prefix}election`, blocking while
/// another coordinator leads. Returns once this one leads and its lease
/// has been kept alive at least once since.
pub async fn campaign(
    client: &Client,
    prefix: &str,
    candidate: &str,
    ttl: Duration,
) -> Result<Leadership, etcd_client::Error> {
    let mut client = client.clone();
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    let (successes_tx, mut successes) = watch::channel(0u64);
    let (lost_tx, lost) = watch::channel(false);
    let mut pending = PendingLease {
        client: client.clone(),
        lease,
        keeper: Some(tokio::spawn(keep_alive(
            client.clone(),
            lease,
            ttl,
            successes_tx,
            lost_tx,
        ))),
    };
    let name = format!("{prefix}election");
    let response = client.campaign(name, candidate, lease).await?;
    let leader = response.leader().ok_or_else(|| {
        etcd_client::Error::ElectError("campaign answered without a leader key".into())
    })?;
    let fence = Fence {
        key: leader.key().to_vec(),
        create_revision: leader.rev(),
    };
    let seen = *successes.borrow_and_update();
    let confirmed = tokio::time::timeout(ttl, async {
        while *successes.borrow() <= seen {
            if successes.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    if !matches!(confirmed, Ok(true)) || *lost.borrow() {
        return Err(etcd_client::Error::ElectError(
            "the lease was not kept alive after the election".into(),
        ));
    }
    let Some(keeper) = pending.keeper.take() else {
        return Err(etcd_client::Error::ElectError("no lease keeper".into()));
    };
    Ok(Leadership {
        fence,
        lease,
        lost,
        keeper,
        client,
    })
}
