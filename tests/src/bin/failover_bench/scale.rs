//! `failover_bench scale`: a leader `kill -9` at 10^6 keys and 10^4 agents,
//! with a hot standby (see the binary's module doc).

use super::{opening, wait_leader, Coordinator};
use allot::pb;
use allot_e2e::fixture::{fixture_chunks, status_kib, wait_metric, write_fixture, OwnEtcd};
use allot_e2e::process::free_port;
use allot_e2e::TempDir;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

fn arg(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// One raw agent's session: Hello, a lookup of its key, an ask; the
/// session once a grant answers.
async fn open_session(
    channel: tonic::transport::Channel,
    agent: usize,
    keys: usize,
) -> anyhow::Result<tonic::Streaming<pb::CoordinatorMessage>> {
    let key = agent % keys;
    let (tx, rx) = mpsc::channel(8);
    for msg in opening(
        &format!("ag{agent:05}"),
        1,
        &format!("secret-{key}"),
        &format!("mk{key:07}"),
        1,
    ) {
        tx.send(pb::AgentMessage { msg: Some(msg) }).await?;
    }
    let mut inbound = pb::agent_session_client::AgentSessionClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        match inbound.message().await?.and_then(|m| m.msg) {
            Some(pb::coordinator_message::Msg::Grant(_)) => {
                // The sending half lives as long as the session: dropping
                // it would end the stream.
                tokio::spawn(async move { tx.closed().await });
                return Ok(inbound);
            }
            Some(pb::coordinator_message::Msg::Deny(deny)) => anyhow::bail!("denied: {deny:?}"),
            Some(_) => continue,
            None => anyhow::bail!("session ended before a grant"),
        }
    }
}

struct Fleet {
    channels: [Vec<tonic::transport::Channel>; 2],
    keys: usize,
}

/// One agent: a session with the leader; after the kill, reconnects with
/// the agent's backoff until a grant, and reports the time from the kill.
async fn agent_life(
    fleet: Arc<Fleet>,
    agent: usize,
    leader: usize,
    connected: mpsc::Sender<anyhow::Result<()>>,
    killed: watch::Receiver<Option<Instant>>,
    regranted: mpsc::Sender<Result<Duration, String>>,
) {
    let pick = |side: usize| {
        let list = &fleet.channels[side];
        list[agent % list.len()].clone()
    };
    let mut session = match open_session(pick(leader), agent, fleet.keys).await {
        Ok(session) => {
            let _ = connected.send(Ok(())).await;
            session
        }
        Err(error) => {
            let _ = connected.send(Err(error)).await;
            return;
        }
    };
    // The session ends when the leader dies.
    while let Ok(Some(_)) = session.message().await {}
    let mut killed = killed;
    let Ok(at) = killed
        .wait_for(|at| at.is_some())
        .await
        .map(|at| at.unwrap())
    else {
        return;
    };
    let mut side = 1 - leader;
    let mut attempt = 0u32;
    let mut last = String::new();
    while at.elapsed() < Duration::from_secs(120) {
        attempt += 1;
        let base = Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(5));
        let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 2);
        tokio::time::sleep(base.min(Duration::from_secs(3)) + Duration::from_millis(jitter)).await;
        match open_session(pick(side), agent, fleet.keys).await {
            Ok(_session) => {
                let _ = regranted.send(Ok(at.elapsed())).await;
                return;
            }
            Err(error) => last = error.to_string(),
        }
        side = 1 - side;
    }
    let _ = regranted.send(Err(last)).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(args: &[String]) -> anyhow::Result<()> {
    let keys = arg(args, "--keys", 1_000_000)? as usize;
    let agents = arg(args, "--agents", 10_000)? as usize;
    let connections = arg(args, "--connections", 100)?.max(1) as usize;
    anyhow::ensure!(
        keys > 0 && agents > 0,
        "--keys and --agents must be positive"
    );
    let etcd = OwnEtcd::start(
        "failover-scale-etcd",
        &[
            "--quota-backend-bytes",
            "8589934592",
            "--max-request-bytes",
            "10485760",
        ],
    )
    .await?;
    let started = Instant::now();
    write_fixture(etcd.client().await?, fixture_chunks(keys, agents, 120)).await?;
    println!(
        "wrote {keys} keys, {agents} agents and {agents} slices into etcd in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dir = TempDir::new("failover-scale");
    let metrics: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let endpoints = [etcd.url.clone()];
    let started = Instant::now();
    let mut coordinators = [
        Coordinator::spawn_with_metrics("c1", &endpoints, &dir.0, &metrics[0]),
        Coordinator::spawn_with_metrics("c2", &endpoints, &dir.0, &metrics[1]),
    ];
    let pids: Vec<u32> = coordinators
        .iter()
        .map(|c| c.child.as_ref().map_or(0, |c| c.id()))
        .collect();
    let urls: Vec<String> = coordinators.iter().map(|c| c.url.clone()).collect();
    let leader = wait_leader(&urls, Duration::from_secs(1_800)).await?;
    let standby = 1 - leader;
    println!(
        "c{} leads {:.1} s after both started",
        leader + 1,
        started.elapsed().as_secs_f64()
    );
    wait_metric(
        &format!("http://{}/metrics", metrics[standby]),
        "allot_standby_warm",
        1.0,
        Duration::from_secs(1_800),
    )
    .await?;
    println!(
        "c{} follows the store (warm standby) {:.1} s after both started",
        standby + 1,
        started.elapsed().as_secs_f64()
    );

    let mut channels: [Vec<tonic::transport::Channel>; 2] = [Vec::new(), Vec::new()];
    for (side, url) in urls.iter().enumerate() {
        for _ in 0..connections {
            channels[side].push(
                tonic::transport::Endpoint::from_shared(url.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
    }
    let fleet = Arc::new(Fleet { channels, keys });
    let (connected_tx, mut connected_rx) = mpsc::channel(agents);
    let (regranted_tx, mut regranted_rx) = mpsc::channel(agents);
    let (killed_tx, killed_rx) = watch::channel(None);
    let started = Instant::now();
    for agent in 0..agents {
        tokio::spawn(agent_life(
            fleet.clone(),
            agent,
            leader,
            connected_tx.clone(),
            killed_rx.clone(),
            regranted_tx.clone(),
        ));
    }
    drop((connected_tx, regranted_tx));
    for _ in 0..agents {
        match connected_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => anyhow::bail!("an agent got no grant from the leader: {error}"),
            None => anyhow::bail!("agents ended early"),
        }
    }
    println!(
        "{agents} agents hold a session and a grant with the leader ({:.1} s to connect them all)",
        started.elapsed().as_secs_f64()
    );
    let rss = |pid: u32| status_kib(pid, "VmRSS:").unwrap_or(0);
    println!(
        "resident memory: leader {} KiB, standby {} KiB",
        rss(pids[leader]),
        rss(pids[standby])
    );

    let killed_at = Instant::now();
    coordinators[leader].kill();
    killed_tx.send_replace(Some(killed_at));
    let mut times = Vec::with_capacity(agents);
    let mut failures = Vec::new();
    while let Some(outcome) = regranted_rx.recv().await {
        match outcome {
            Ok(elapsed) => times.push(elapsed),
            Err(error) => failures.push(error),
        }
    }
    times.sort();
    let takeover = std::fs::read_to_string(dir.0.join(format!("c{}.log", standby + 1)))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("elected leader")
                || l.contains("handed to the new leader")
                || l.contains("loading instead")
        })
        .map(str::to_string)
        .collect::<Vec<_>>();
    for line in &takeover {
        println!("new leader: {line}");
    }
    anyhow::ensure!(
        !times.is_empty(),
        "no agent got a grant after the kill; first error: {:?}",
        failures.first()
    );
    let max = *times.last().unwrap();
    println!(
        "kill -9 -> grant, {} agents: first {:.3} s, median {:.3} s, p99 {:.3} s, max {:.3} s; {} agents never granted{}",
        times.len(),
        times[0].as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64(),
        percentile(&times, 0.99).as_secs_f64(),
        max.as_secs_f64(),
        failures.len(),
        failures
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "new leader resident memory {} KiB; target first grant <= 3 s: {}, every agent <= 3 s: {}",
        rss(pids[standby]),
        if times[0] <= Duration::from_secs(3) {
            "met"
        } else {
            "missed"
        },
        if failures.is_empty() && max <= Duration::from_secs(3) {
            "met"
        } else {
            "missed"
        }
    );
    Ok(())
}
