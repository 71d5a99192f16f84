//! Large ledgers for benchmarks: one etcd member of their own (with a
//! larger quota), and the records of N keys and M agents holding one slice
//! each. A key `mk{i:07}` has the secret `secret-{i}`; an agent is
//! `ag{j:05}` and holds a slice of key `j % N`.

use crate::process::free_port;
use crate::TempDir;
use allot_coordinator::ledger::{AccountRecord, AgentRecord, KeyRecord};
use allot_coordinator::store::Store;
use allot_coordinator::store::StoreWrite;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One etcd member with extra flags (fsync on, as by default).
pub struct OwnEtcd {
    child: Option<Child>,
    pub url: String,
    _dir: TempDir,
}

impl OwnEtcd {
    pub async fn start(label: &str, extra: &[&str]) -> anyhow::Result<OwnEtcd> {
        let dir = TempDir::new(label);
        let url = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.0.join("etcd.log"))?;
        let child = Command::new("etcd")
            .args(["--name", "m0"])
            .args(["--data-dir", dir.0.join("data").to_str().unwrap()])
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        let etcd = OwnEtcd {
            child: Some(child),
            url,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = etcd.client().await {
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(1), client.put("/probe", "ok", None))
                        .await
                {
                    return Ok(etcd);
                }
            }
            anyhow::ensure!(Instant::now() < end, "etcd did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(tokio::time::timeout(
            Duration::from_secs(2),
            etcd_client::Client::connect([self.url.clone()], None),
        )
        .await??)
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn key_record(i: usize) -> KeyRecord {
    KeyRecord {
        key_id: format!("mk{i:07}"),
        account_id: "ma".into(),
        hash: allot::key::KeyHash::of_secret(&format!("secret-{i}")),
        purpose: allot::key::Purpose::Realtime,
        revoked: false,
        allowed_models: vec![],
        name: String::new(),
        limits: vec![allot::limit::Limit {
            unit: allot::Unit::Tokens,
            amount: rust_decimal::Decimal::from(1_000_000_000i64),
            window: allot::limit::Window::Balance,
        }],
        created_at_ms: 0,
    }
}

/// Every write of the memory fixture, in chunks of `chunk`.
pub fn fixture_chunks(keys: usize, agents: usize, chunk: usize) -> Vec<Vec<StoreWrite>> {
    let mut writes = vec![StoreWrite::PutAccount(AccountRecord {
        account_id: "ma".into(),
        name: "memory".into(),
        credited: rust_decimal::Decimal::ZERO,
        limits: vec![],
        created_at_ms: 0,
    })];
    let mut chunks = Vec::new();
    let mut push = |write: StoreWrite, writes: &mut Vec<StoreWrite>| {
        writes.push(write);
        if writes.len() >= chunk {
            chunks.push(std::mem::take(writes));
        }
    };
    for i in 0..keys {
        push(StoreWrite::PutKey(key_record(i)), &mut writes);
    }
    for j in 0..agents {
        let agent_id = format!("ag{j:05}");
        push(
            StoreWrite::PutAgent(AgentRecord {
                agent_id: agent_id.clone(),
                epoch: 1,
                high_water_seq: 0,
                neuron_id: "n1".into(),
            }),
            &mut writes,
        );
        push(
            StoreWrite::PutSlice {
                agent_id,
                key_id: format!("mk{:07}", j % keys.max(1)),
                held: allot::Amounts([None, Some(rust_decimal::Decimal::from(100)), None]),
            },
            &mut writes,
        );
    }
    if !writes.is_empty() {
        chunks.push(writes);
    }
    chunks
}

/// Writes `chunks` under `/allot/`, unfenced. Chunks of at most 120
/// writes are one etcd transaction each, no journal, so 16 of them run at
/// once.
pub async fn write_fixture(
    client: etcd_client::Client,
    chunks: Vec<Vec<StoreWrite>>,
) -> anyhow::Result<()> {
    let store = Arc::new(allot_coordinator::store::etcd::EtcdStore::new(
        client, "/allot/", None,
    ));
    let chunks = Arc::new(Mutex::new(chunks));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (chunks, store) = (chunks.clone(), store.clone());
        workers.spawn(async move {
            loop {
                let Some(chunk) = chunks.lock().unwrap().pop() else {
                    return anyhow::Ok(());
                };
                store.commit(chunk).await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad {field} line"))?
        .parse()?)
}

/// The value of the first sample of `name` on a Prometheus endpoint.
pub async fn metric_value(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls a Prometheus endpoint until `name` is at least `at_least`.
pub async fn wait_metric(
    url: &str,
    name: &str,
    at_least: f64,
    deadline: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    let http = reqwest::Client::new();
    loop {
        if metric_value(&http, url, name)
            .await
            .is_some_and(|v| v >= at_least)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < end,
            "{url}: {name} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
