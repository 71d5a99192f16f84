//! Benchmarks of the etcd store (issue 3), each against a real `etcd`
//! process and `allot-coordinator` process(es) from the same target
//! directory as this binary, all on 127.0.0.1:
//!
//! * `throughput`: settled usage records per second with 8 raw agents
//!   pipelining 512-record batches, then the same with one etcd
//!   transaction per record; checks the spent tokens afterwards.
//! * `memory --keys N --agents M [--store etcd|embedded]`: the leader's
//!   resident memory after loading N keys, M agents and one slice per agent
//!   written straight into the store beforehand.
//! * `history [--secs S] [--compaction etcd|coordinator] [--history-ms H]`:
//!   the throughput workload for S seconds against an etcd with periodic
//!   auto-compaction, or a stock etcd whose history the leader keeps to H
//!   ms, sampling its database size.
//! * `heap --keys N --agents M`: the heap bytes the engine's ledger takes
//!   for that state, loaded in this process from an in-memory store
//!   (counted by this binary's allocator; no store cache involved).
//! * `tls [--rounds 5] [--secs 10] [--warmup 2]` (issue 14): the batched
//!   throughput workload against two coordinators on the embedded store,
//!   one plaintext (`--insecure`) and one on mutual TLS (every raw agent
//!   presents a certificate naming it, from a test CA made here), in
//!   interleaved rounds whose order is swapped every round.
//!
//! * `standby [--secs 20] [--warmup 3]` (issue 17): the batched workload
//!   against a leader on etcd while a second coordinator stands by. Every
//!   second the store's revision is read and the time until the standby
//!   has applied it is measured (its watch lag). Then the leader is
//!   killed: the standby takes over with its warm ledger, and the spent
//!   tokens must equal every acknowledged record's.
//!
//! Build `cargo build --release --workspace --bins`, then run
//! `target/release/settle_bench <mode>`.

use allot::pb;
use allot_coordinator::store::{Store, StoreWrite};
use allot_e2e::etcd::EtcdCluster;
use allot_e2e::fixture::{
    fixture_chunks, metric_value, status_kib, wait_metric, write_fixture, OwnEtcd,
};
use allot_e2e::process::{binary, free_port};
use allot_e2e::tls::TestPki;
use allot_e2e::{authed, balance, limit, TempDir, ADMIN_TOKEN, MODEL};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Counts live heap bytes while `COUNTING` is on (the `heap` mode only; the
/// other modes pay one relaxed load per allocation).
struct CountingAlloc;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        std::alloc::System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        std::alloc::System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

const PROMPT_TOKENS: u64 = 10;
const COMPLETION_TOKENS: u64 = 5;
const TOKENS_PER_RECORD: u64 = PROMPT_TOKENS + COMPLETION_TOKENS;
const BENCH_KEYS: usize = 1_000;
const BENCH_AGENTS: usize = 8;
const ACCOUNT: &str = "bench";

// ---------------------------------------------------------------- processes

struct Coordinator {
    child: Option<Child>,
    url: String,
}

impl Coordinator {
    /// Starts a plaintext coordinator with `args` after the common ones.
    fn spawn(log: &Path, args: &[String]) -> Coordinator {
        Coordinator::spawn_with(log, args, None)
    }

    /// Starts a coordinator with `args` after the common ones: on TLS with
    /// the server certificate of `pki` (client certificates checked
    /// against its CA), or plaintext without.
    fn spawn_with(log: &Path, args: &[String], pki: Option<&TestPki>) -> Coordinator {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(log).expect("log file");
        let mut command = Command::new(binary("allot-coordinator"));
        match pki {
            Some(pki) => {
                command
                    .arg("--tls-cert")
                    .arg(pki.dir.join("node.pem"))
                    .arg("--tls-key")
                    .arg(pki.dir.join("node.key"))
                    .arg("--tls-client-ca")
                    .arg(pki.ca_path());
            }
            None => {
                command.arg("--insecure");
            }
        }
        let scheme = if pki.is_some() { "https" } else { "http" };
        let child = command
            .args(["--listen", &addr])
            .args(if args.iter().any(|a| a == "--metrics-listen") {
                &[][..]
            } else {
                &["--metrics-listen", "off"][..]
            })
            .args(["--admin-token", ADMIN_TOKEN])
            .args(args)
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("allot-coordinator starts");
        Coordinator {
            child: Some(child),
            url: format!("{scheme}://{addr}"),
        }
    }

    fn on_etcd(log: &Path, endpoints: &[String], node_id: &str, extra: &[&str]) -> Coordinator {
        let mut args: Vec<String> = vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            endpoints.join(","),
            "--node-id".into(),
            node_id.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Coordinator::spawn(log, &args)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The CA of the `tls` mode's coordinator, trusted by every connection to
/// an `https://` URL (set once, before the first).
static BENCH_PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();

/// A channel to `url`: over TLS trusting [`BENCH_PKI`] for `https://`,
/// presenting the certificate of `agent_id` when given one.
async fn connect(url: &str, agent_id: Option<&str>) -> anyhow::Result<tonic::transport::Channel> {
    if !url.starts_with("https://") {
        return Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
            .connect()
            .await?);
    }
    let pki = BENCH_PKI
        .get()
        .ok_or_else(|| anyhow::anyhow!("{url}: no test CA"))?;
    let identity = agent_id.map(|agent_id| pki.agent(agent_id));
    Ok(pki.endpoint(url, identity.as_ref()).connect().await?)
}

/// Polls ListAccounts until this coordinator answers (it leads).
async fn wait_leading(url: &str, deadline: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut admin = pb::admin_client::AdminClient::new(connect(url, None).await?);
            admin
                .list_accounts(authed(pb::ListAccountsRequest::default()))
                .await?;
            anyhow::Ok(())
        })
        .await;
        if let Ok(Ok(())) = attempt {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "{url} did not lead within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- admin setup

/// The secret of every key [`create_keys`] made, by key id: a raw agent
/// looks a key up by its secret's hash before the coordinator grants it a
/// slice, as a real agent does when a client shows it the key.
static SECRETS: std::sync::OnceLock<Mutex<HashMap<String, String>>> = std::sync::OnceLock::new();

fn secret_of(key_id: &str) -> Option<String> {
    SECRETS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .get(key_id)
        .cloned()
}

/// One account and `count` keys `bk00000..` with a huge token balance.
async fn create_keys(url: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let channel = connect(url, None).await?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: ACCOUNT.into(),
            name: ACCOUNT.into(),
        }))
        .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (next, channel) = (next.clone(), channel.clone());
        workers.spawn(async move {
            let mut admin = pb::admin_client::AdminClient::new(channel);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                let key_id = format!("bk{i:05}");
                let created = admin
                    .create_key(authed(pb::CreateKeyRequest {
                        account_id: ACCOUNT.into(),
                        key_id: key_id.clone(),
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                SECRETS
                    .get_or_init(Default::default)
                    .lock()
                    .unwrap()
                    .insert(key_id.clone(), created.secret);
                admin
                    .set_limits(authed(pb::SetLimitsRequest {
                        scope: Some(pb::set_limits_request::Scope::KeyId(key_id)),
                        limits: vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
                    }))
                    .await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok((0..count).map(|i| format!("bk{i:05}")).collect())
}

/// Sum over `keys` of the tokens spent under each key's own limit.
async fn spent_tokens(url: &str, keys: &[String]) -> anyhow::Result<u64> {
    let channel = connect(url, None).await?;
    let keys = Arc::new(keys.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (next, channel, keys, total) =
            (next.clone(), channel.clone(), keys.clone(), total.clone());
        workers.spawn(async move {
            let mut admin = pb::admin_client::AdminClient::new(channel);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(key_id) = keys.get(i) else {
                    return anyhow::Ok(());
                };
                let snapshot = admin
                    .get_snapshot(authed(pb::GetSnapshotRequest {
                        key_id: key_id.clone(),
                    }))
                    .await?
                    .into_inner();
                let status = allot_e2e::key_limit(&snapshot, pb::Unit::Tokens)
                    .ok_or_else(|| anyhow::anyhow!("{key_id} has no token limit"))?;
                total.fetch_add(status.spent.parse::<u64>()?, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(total.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------- workload

#[derive(Clone)]
struct Workload {
    url: String,
    agent_prefix: String,
    agents: usize,
    batch: usize,
    in_flight_per_agent: usize,
    warm_up: Duration,
    measure: Duration,
}

impl Workload {
    /// The batched workload: [`BENCH_AGENTS`] agents, each with 8 batches
    /// of 512 records in flight.
    fn batched(
        url: String,
        agent_prefix: String,
        warm_up: Duration,
        measure: Duration,
    ) -> Workload {
        Workload {
            url,
            agent_prefix,
            agents: BENCH_AGENTS,
            batch: 512,
            in_flight_per_agent: 8,
            warm_up,
            measure,
        }
    }
}

#[derive(Default)]
struct Outcome {
    /// Records whose ack arrived inside the measurement window.
    acked_in_window: u64,
    /// Ack latency of each batch acked inside the window.
    latencies: Vec<Duration>,
    /// Every record sent / acknowledged over the whole run.
    sent: u64,
    acked: u64,
    batches_in_window: u64,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn run_workload(w: &Workload, keys: Arc<Vec<String>>) -> anyhow::Result<Outcome> {
    // The clock starts once every agent holds its slices.
    let start = Arc::new(Start {
        ready: tokio::sync::Barrier::new(w.agents),
        at: std::sync::OnceLock::new(),
    });
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..w.agents {
        let (w, keys, start) = (w.clone(), keys.clone(), start.clone());
        agents.spawn(async move { one_agent(&w, i, keys, &start).await });
    }
    let mut total = Outcome::default();
    while let Some(done) = agents.join_next().await {
        let one = done??;
        total.acked_in_window += one.acked_in_window;
        total.latencies.extend(one.latencies);
        total.sent += one.sent;
        total.acked += one.acked;
        total.batches_in_window += one.batches_in_window;
    }
    Ok(total)
}

/// Where the agents of one workload wait for each other before the clock
/// starts.
struct Start {
    ready: tokio::sync::Barrier,
    at: std::sync::OnceLock<Instant>,
}

struct AgentShared {
    /// (last seq of the batch, records in it, sent at) in sending order.
    pending: Mutex<VecDeque<(u64, u64, Instant)>>,
    outcome: Mutex<Outcome>,
}

async fn one_agent(
    w: &Workload,
    index: usize,
    keys: Arc<Vec<String>>,
    start: &Start,
) -> anyhow::Result<Outcome> {
    let agent_id = format!("{}{index}", w.agent_prefix);
    let mut client =
        pb::agent_session_client::AgentSessionClient::new(connect(&w.url, Some(&agent_id)).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(w.in_flight_per_agent + 4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: agent_id.clone(),
            epoch: 1,
            neuron_id: "bench-neuron".into(),
        })),
    })
    .await?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let welcome = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("session ended before welcome"))?;
        if let Some(pb::coordinator_message::Msg::Welcome(welcome)) = message.msg {
            break welcome;
        }
    };
    // Usage is charged only for keys the agent was granted a slice of:
    // ask for every key before measuring (sent from a task, so that the
    // grants are read while the asks go out).
    let asks = {
        let (tx, keys) = (tx.clone(), keys.clone());
        tokio::spawn(async move {
            for (index, key_id) in keys.iter().enumerate() {
                let secret = secret_of(key_id)
                    .ok_or_else(|| anyhow::anyhow!("no secret for key {key_id}"))?;
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::KeyLookup(pb::KeyLookup {
                        key_hash: allot::key::KeyHash::of_secret(&secret).0.to_vec(),
                    })),
                })
                .await?;
                let ask = pb::AllowanceAsk {
                    ask_id: index as u64 + 1,
                    key_id: key_id.clone(),
                    need: Some(pb::Amounts::default()),
                    want: Some(pb::Amounts {
                        tokens: Some(1_000_000),
                        ..Default::default()
                    }),
                };
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Ask(ask)),
                })
                .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut granted = 0;
    while granted < keys.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("session ended before every grant"))?;
        match message.msg {
            Some(pb::coordinator_message::Msg::Grant(_)) => granted += 1,
            Some(pb::coordinator_message::Msg::Deny(deny)) => {
                anyhow::bail!("{agent_id}: ask refused: {}", deny.message)
            }
            _ => {}
        }
    }
    asks.await??;
    start.ready.wait().await;
    let t0 = *start.at.get_or_init(Instant::now);
    let (window_start, window_end) = (t0 + w.warm_up, t0 + w.warm_up + w.measure);
    let first_seq = welcome.high_water_seq + 1;
    let shared = Arc::new(AgentShared {
        pending: Mutex::new(VecDeque::new()),
        outcome: Mutex::new(Outcome::default()),
    });
    let permits = Arc::new(Semaphore::new(w.in_flight_per_agent));
    let receiver = {
        let (shared, permits) = (shared.clone(), permits.clone());
        tokio::spawn(async move {
            let mut high_water = first_seq - 1;
            loop {
                let message =
                    match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
                        Err(_) => anyhow::bail!("no message from the coordinator for 30 s"),
                        Ok(Err(status)) => anyhow::bail!("session failed: {status}"),
                        Ok(Ok(None)) => return Ok(()),
                        Ok(Ok(Some(message))) => message,
                    };
                let Some(pb::coordinator_message::Msg::UsageAck(ack)) = message.msg else {
                    continue;
                };
                let now = Instant::now();
                let in_window = now >= window_start && now < window_end;
                let mut pending = shared.pending.lock().unwrap();
                let mut outcome = shared.outcome.lock().unwrap();
                if ack.high_water_seq > high_water {
                    let newly = ack.high_water_seq - high_water;
                    outcome.acked += newly;
                    if in_window {
                        outcome.acked_in_window += newly;
                    }
                    high_water = ack.high_water_seq;
                }
                while let Some(&(last, _, sent_at)) = pending.front() {
                    if last > high_water {
                        break;
                    }
                    pending.pop_front();
                    permits.add_permits(1);
                    if in_window {
                        outcome.latencies.push(now - sent_at);
                        outcome.batches_in_window += 1;
                    }
                }
            }
        })
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut next_seq = first_seq;
    let mut sent = 0u64;
    while Instant::now() < window_end {
        let permit =
            match tokio::time::timeout_at(window_end.into(), permits.clone().acquire_owned()).await
            {
                Ok(permit) => permit?,
                Err(_) => break,
            };
        permit.forget();
        let records: Vec<pb::UsageRecord> = (0..w.batch as u64)
            .map(|offset| pb::UsageRecord {
                seq: next_seq + offset,
                epoch: 1,
                key_id: keys[(xorshift(&mut rng) % keys.len() as u64) as usize].clone(),
                model_requested: MODEL.into(),
                prompt_tokens: PROMPT_TOKENS,
                completion_tokens: COMPLETION_TOKENS,
                charged: true,
                // What an honest agent's admission reserved: a record over
                // its reservation is logged (once per batch) as suspect.
                reserved: Some(pb::Amounts {
                    tokens: Some(TOKENS_PER_RECORD),
                    requests: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let last = next_seq + w.batch as u64 - 1;
        shared
            .pending
            .lock()
            .unwrap()
            .push_back((last, w.batch as u64, Instant::now()));
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch { records })),
        })
        .await?;
        sent += w.batch as u64;
        next_seq = last + 1;
    }
    // Drain: wait (bounded) for every batch sent to be acknowledged.
    let drained = Instant::now() + Duration::from_secs(60);
    while !shared.pending.lock().unwrap().is_empty() {
        anyhow::ensure!(
            Instant::now() < drained,
            "{agent_id}: batches still unacknowledged 60 s after the run"
        );
        anyhow::ensure!(!receiver.is_finished(), "{agent_id}: session ended early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), receiver).await???;
    let mut outcome = std::mem::take(&mut *shared.outcome.lock().unwrap());
    outcome.sent = sent;
    Ok(outcome)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

struct Row {
    name: String,
    records_per_s: f64,
    p50: Duration,
    p99: Duration,
    batches: u64,
}

fn row(name: &str, w: &Workload, outcome: &mut Outcome) -> Row {
    outcome.latencies.sort();
    Row {
        name: name.into(),
        records_per_s: outcome.acked_in_window as f64 / w.measure.as_secs_f64(),
        p50: percentile(&outcome.latencies, 50),
        p99: percentile(&outcome.latencies, 99),
        batches: outcome.batches_in_window,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------- modes

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn arg_u64(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match arg_value(args, name) {
        Some(v) => Ok(v.parse()?),
        None => Ok(default),
    }
}

async fn throughput(args: &[String]) -> anyhow::Result<()> {
    let measure = Duration::from_secs(arg_u64(args, "--secs", 20)?);
    let warm_up = Duration::from_secs(arg_u64(args, "--warmup", 3)?);
    let dir = TempDir::new("settle-bench");
    let cluster = EtcdCluster::start(1).await;
    let endpoints = cluster.endpoints();
    println!("etcd {} (single member, fsync on)", endpoints.join(","));

    let mut coordinator = Coordinator::on_etcd(&dir.0.join("c1.log"), &endpoints, "c1", &[]);
    wait_leading(&coordinator.url, Duration::from_secs(30)).await?;
    let started = Instant::now();
    let keys = Arc::new(create_keys(&coordinator.url, BENCH_KEYS).await?);
    println!(
        "created {} keys (CreateKey + SetLimits, 32 concurrent) in {:.1} s",
        keys.len(),
        started.elapsed().as_secs_f64()
    );

    let batched = Workload::batched(
        coordinator.url.clone(),
        "batch-agent-".into(),
        warm_up,
        measure,
    );
    println!(
        "run 1: default settings, {} agents x {} in flight x {} records per batch, {:?} warm-up + {:?}",
        batched.agents, batched.in_flight_per_agent, batched.batch, warm_up, measure
    );
    let mut first = run_workload(&batched, keys.clone()).await?;
    let spent_after_first = spent_tokens(&coordinator.url, &keys).await?;
    println!(
        "run 1: sent {} records, acked {}; sum of spent tokens over all {} keys = {} (expected {} = {} x {})",
        first.sent,
        first.acked,
        keys.len(),
        spent_after_first,
        first.acked * TOKENS_PER_RECORD,
        first.acked,
        TOKENS_PER_RECORD
    );
    let first_ok =
        first.sent == first.acked && spent_after_first == first.acked * TOKENS_PER_RECORD;

    coordinator.kill();
    let mut coordinator = Coordinator::on_etcd(
        &dir.0.join("c1-per-record.log"),
        &endpoints,
        "c1",
        &["--max-batch-jobs", "1", "--settle-window-ms", "0"],
    );
    let lead = wait_leading(&coordinator.url, Duration::from_secs(30)).await?;
    println!(
        "restarted the coordinator with --max-batch-jobs 1 --settle-window-ms 0 (leading after {:.2} s)",
        lead.as_secs_f64()
    );
    let per_record = Workload {
        url: coordinator.url.clone(),
        agent_prefix: "record-agent-".into(),
        batch: 1,
        in_flight_per_agent: 8,
        ..batched.clone()
    };
    println!(
        "run 2: {} agents x {} in flight (64 total) x 1 record per batch, {:?} warm-up + {:?}",
        per_record.agents, per_record.in_flight_per_agent, warm_up, measure
    );
    let mut second = run_workload(&per_record, keys.clone()).await?;
    let spent_after_second = spent_tokens(&coordinator.url, &keys).await?;
    let expected_second = (first.acked + second.acked) * TOKENS_PER_RECORD;
    println!(
        "run 2: sent {} records, acked {}; sum of spent tokens over all {} keys = {} (expected {} = ({} + {}) x {})",
        second.sent,
        second.acked,
        keys.len(),
        spent_after_second,
        expected_second,
        first.acked,
        second.acked,
        TOKENS_PER_RECORD
    );
    let second_ok = second.sent == second.acked && spent_after_second == expected_second;
    coordinator.kill();

    let rows = [
        row(
            "512 records/batch, 8 agents x 8 in flight, default settle window (2 ms) and max batch (4096 jobs)",
            &batched,
            &mut first,
        ),
        row(
            "1 record/batch, 64 in flight, --max-batch-jobs 1 --settle-window-ms 0 (one etcd txn per record)",
            &per_record,
            &mut second,
        ),
    ];
    println!();
    println!("| workload | records/s settled | batch ack p50 (ms) | batch ack p99 (ms) | batches acked in window |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            r.name,
            r.records_per_s,
            ms(r.p50),
            ms(r.p99),
            r.batches
        );
    }
    println!();
    println!(
        "correctness: run 1 {}, run 2 {}",
        if first_ok { "OK" } else { "MISMATCH" },
        if second_ok { "OK" } else { "MISMATCH" }
    );
    anyhow::ensure!(
        first_ok && second_ok,
        "spent tokens do not match acked records"
    );
    Ok(())
}

/// Settlement over a plaintext link against mutual TLS, interleaved.
async fn tls(args: &[String]) -> anyhow::Result<()> {
    let rounds = arg_u64(args, "--rounds", 5)?;
    let measure = Duration::from_secs(arg_u64(args, "--secs", 10)?);
    let warm_up = Duration::from_secs(arg_u64(args, "--warmup", 2)?);
    let dir = TempDir::new("settle-tls-bench");
    if BENCH_PKI.set(TestPki::new(&dir.0.join("certs"))).is_err() {
        anyhow::bail!("the test CA was made twice");
    }
    let pki = BENCH_PKI.get().expect("just set");
    // A directory each: the usage store sits beside the data file.
    let store = |name: &str| -> Vec<String> {
        let data = dir.0.join(name);
        std::fs::create_dir_all(&data).expect("a data directory");
        vec![
            "--store".into(),
            "embedded".into(),
            "--data-path".into(),
            data.join("coordinator.redb").display().to_string(),
        ]
    };
    let plain = Coordinator::spawn(&dir.0.join("plain.log"), &store("plain"));
    let mtls = Coordinator::spawn_with(&dir.0.join("mtls.log"), &store("mtls"), Some(pki));
    let mut keys = Vec::new();
    for coordinator in [&plain, &mtls] {
        wait_leading(&coordinator.url, Duration::from_secs(30)).await?;
        keys.push(Arc::new(create_keys(&coordinator.url, BENCH_KEYS).await?));
    }
    println!(
        "coordinators: plaintext pid {} {}, mutual TLS pid {} {} (embedded store each, {} keys each)",
        plain.pid(),
        plain.url,
        mtls.pid(),
        mtls.url,
        BENCH_KEYS
    );
    println!(
        "workload: {BENCH_AGENTS} raw agents x 8 in flight x 512 records per batch, {warm_up:?} warm-up + {measure:?} per run; {rounds} rounds, order swapped every round"
    );
    let names = ["plaintext", "mutual TLS"];
    let mut records_per_s: [Vec<f64>; 2] = Default::default();
    let mut acked = [0u64; 2];
    let mut all_ok = true;
    println!();
    println!("| round | link | records/s settled | batch ack p50 (ms) | batch ack p99 (ms) | batches acked in window |");
    println!("|---:|---|---:|---:|---:|---:|");
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for mode in order {
            let coordinator = [&plain, &mtls][mode];
            let workload = Workload::batched(
                coordinator.url.clone(),
                format!("{}-r{round}-", ["plain", "mtls"][mode]),
                warm_up,
                measure,
            );
            let mut outcome = run_workload(&workload, keys[mode].clone()).await?;
            acked[mode] += outcome.acked;
            let spent = spent_tokens(&coordinator.url, &keys[mode]).await?;
            let ok = outcome.sent == outcome.acked && spent == acked[mode] * TOKENS_PER_RECORD;
            all_ok &= ok;
            let r = row(names[mode], &workload, &mut outcome);
            records_per_s[mode].push(r.records_per_s);
            println!(
                "| {round} | {} | {:.0} | {} | {} | {} |{}",
                r.name,
                r.records_per_s,
                ms(r.p50),
                ms(r.p99),
                r.batches,
                if ok { "" } else { " MISMATCH" }
            );
        }
    }
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    println!();
    for mode in [0, 1] {
        println!(
            "{}: median {:.0} records/s over {} rounds",
            names[mode],
            median(&records_per_s[mode]),
            rounds
        );
    }
    println!(
        "mutual TLS / plaintext: {:.3}",
        median(&records_per_s[1]) / median(&records_per_s[0])
    );
    println!(
        "correctness (every record sent was acked; spent tokens = acked records x {TOKENS_PER_RECORD} on each coordinator): {}",
        if all_ok { "OK" } else { "MISMATCH" }
    );
    anyhow::ensure!(all_ok, "spent tokens do not match acked records");
    Ok(())
}

async fn memory(args: &[String]) -> anyhow::Result<()> {
    let keys = arg_u64(args, "--keys", 100_000)? as usize;
    let agents = arg_u64(args, "--agents", 10_000)? as usize;
    let store = arg_value(args, "--store").unwrap_or_else(|| "etcd".into());
    let lead_deadline = Duration::from_secs(arg_u64(args, "--lead-timeout", 600)?);
    let dir = TempDir::new("memory-bench");
    let chunks = fixture_chunks(keys, agents, 120);
    let writes: usize = chunks.iter().map(Vec::len).sum();
    let started = Instant::now();
    let (_etcd, coordinator_args) = match store.as_str() {
        "etcd" => {
            let etcd = OwnEtcd::start(
                "memory-etcd",
                &[
                    "--quota-backend-bytes",
                    "8589934592",
                    "--max-request-bytes",
                    "10485760",
                ],
            )
            .await?;
            write_fixture(etcd.client().await?, chunks).await?;
            let mut client = etcd.client().await?;
            let status = client.status().await?;
            println!(
                "wrote {writes} records ({keys} keys, {agents} agents, {agents} slices, 1 account) into etcd in {:.1} s; etcd db_size {} bytes",
                started.elapsed().as_secs_f64(),
                status.db_size()
            );
            let args: Vec<String> = [
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd.url,
                "--node-id",
                "c1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            (Some(etcd), args)
        }
        "embedded" => {
            let path = dir.0.join("coordinator.redb");
            {
                let store = allot_coordinator::store::embedded::EmbeddedStore::open(&path)?;
                for chunk in chunks.chunks(1000) {
                    store.commit(chunk.concat()).await?;
                }
            }
            println!(
                "wrote {writes} records ({keys} keys, {agents} agents, {agents} slices, 1 account) into {} in {:.1} s",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            let args: Vec<String> = vec![
                "--store".into(),
                "embedded".into(),
                "--data-path".into(),
                path.to_str().unwrap().into(),
            ];
            (None, args)
        }
        other => anyhow::bail!("unknown store {other}"),
    };
    let log = dir.0.join("coordinator.log");
    let coordinator = Coordinator::spawn(&log, &coordinator_args);
    let pid = coordinator.pid();
    let led = wait_leading(&coordinator.url, lead_deadline).await;
    let led = match led {
        Ok(led) => led,
        Err(error) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
            println!(
                "the coordinator did not lead: {error}; {} ERROR lines in its log, first: {}",
                errors.len(),
                errors.first().unwrap_or(&"(none)")
            );
            println!(
                "coordinator VmRSS {} KiB, VmHWM {} KiB at give-up",
                status_kib(pid, "VmRSS:").unwrap_or(0),
                status_kib(pid, "VmHWM:").unwrap_or(0)
            );
            anyhow::bail!("the coordinator did not load {keys} keys from {store}");
        }
    };
    println!(
        "the coordinator ({store} store) answered ListAccounts {:.2} s after it was started",
        led.as_secs_f64()
    );
    let base = Instant::now();
    for after in [1u64, 5, 10] {
        tokio::time::sleep_until((base + Duration::from_secs(after)).into()).await;
        println!(
            "  +{after:>2} s: VmRSS {} KiB, VmHWM (peak) {} KiB",
            status_kib(pid, "VmRSS:")?,
            status_kib(pid, "VmHWM:")?
        );
    }
    println!(
        "RESULT store={store} keys={keys} agents={agents} load_s={:.2} rss_kib={} hwm_kib={}",
        led.as_secs_f64(),
        status_kib(pid, "VmRSS:")?,
        status_kib(pid, "VmHWM:")?
    );
    Ok(())
}

/// A store that only hands out a fixed state.
struct MemStore(allot_coordinator::store::StoredState);

impl Store for MemStore {
    fn load(
        &self,
    ) -> allot_coordinator::store::BoxFuture<
        '_,
        Result<allot_coordinator::store::StoredState, allot_coordinator::store::StoreError>,
    > {
        Box::pin(async move { Ok(self.0.clone()) })
    }

    fn commit(
        &self,
        _writes: Vec<StoreWrite>,
    ) -> allot_coordinator::store::BoxFuture<'_, Result<(), allot_coordinator::store::StoreError>>
    {
        Box::pin(async { Ok(()) })
    }

    fn ping(&self) -> allot_coordinator::store::BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

async fn heap(args: &[String]) -> anyhow::Result<()> {
    let keys = arg_u64(args, "--keys", 100_000)? as usize;
    let agents = arg_u64(args, "--agents", 10_000)? as usize;
    // Through the stores' own encoding and decoding, as a real load.
    let writes: Vec<StoreWrite> = fixture_chunks(keys, agents, usize::MAX)
        .into_iter()
        .flatten()
        .collect();
    let encoded = allot_coordinator::store::layout::coalesce("/allot/", &writes);
    drop(writes);
    let entries: Vec<(String, Vec<u8>)> = encoded
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let encoded_bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    let state = allot_coordinator::store::layout::decode(
        "/allot/",
        entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
    )?;
    drop(entries);
    let store: Arc<dyn Store> = Arc::new(MemStore(state));
    COUNTING.store(true, Ordering::SeqCst);
    let before = LIVE.load(Ordering::SeqCst);
    let started = Instant::now();
    let (engine, handle) = allot_coordinator::engine::Engine::load(
        store,
        allot_coordinator::engine::EngineSettings::default(),
    )
    .await?;
    let took = started.elapsed();
    let after = LIVE.load(Ordering::SeqCst);
    COUNTING.store(false, Ordering::SeqCst);
    let delta = after - before;
    println!(
        "RESULT heap keys={keys} agents={agents} engine_heap_bytes={delta} ({:.1} MiB) per_key_incl_agents={:.0} load_s={:.2} stored_json_bytes={encoded_bytes}",
        delta as f64 / 1048576.0,
        delta as f64 / keys.max(1) as f64,
        took.as_secs_f64()
    );
    drop((engine, handle));
    Ok(())
}

async fn history(args: &[String]) -> anyhow::Result<()> {
    let secs = arg_u64(args, "--secs", 600)?;
    let sample_every = Duration::from_secs(arg_u64(args, "--sample", 30)?);
    // `--compaction etcd` (the default): etcd's periodic auto-compaction
    // keeping 1 minute, the coordinator's off. `--compaction coordinator`:
    // a stock etcd (no auto-compaction, default request limit), compacted
    // by the leader, keeping `--history-ms` (60,000).
    let by_coordinator = match arg_value(args, "--compaction").as_deref() {
        None | Some("etcd") => false,
        Some("coordinator") => true,
        Some(other) => anyhow::bail!("--compaction etcd|coordinator, not {other}"),
    };
    let history_ms = arg_u64(args, "--history-ms", 60_000)?.to_string();
    let etcd_flags: &[&str] = if by_coordinator {
        &[]
    } else {
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1m",
            "--max-request-bytes",
            "10485760",
        ]
    };
    let etcd = OwnEtcd::start("history-etcd", etcd_flags).await?;
    let coordinator_flags: Vec<&str> = if by_coordinator {
        println!(
            "etcd {} with its defaults (fsync on); the leader keeps {history_ms} ms of history",
            etcd.url
        );
        vec!["--etcd-history-ms", &history_ms]
    } else {
        println!(
            "etcd {} with --auto-compaction-mode periodic --auto-compaction-retention 1m (fsync on)",
            etcd.url
        );
        vec!["--etcd-history-ms", "0"]
    };
    let dir = TempDir::new("history-bench");
    let coordinator = Coordinator::on_etcd(
        &dir.0.join("c1.log"),
        std::slice::from_ref(&etcd.url),
        "c1",
        &coordinator_flags,
    );
    wait_leading(&coordinator.url, Duration::from_secs(30)).await?;
    let keys = Arc::new(create_keys(&coordinator.url, BENCH_KEYS).await?);
    let workload = Workload::batched(
        coordinator.url.clone(),
        "history-agent-".into(),
        Duration::ZERO,
        Duration::from_secs(secs),
    );
    let mut client = etcd.client().await?;
    let sampler = tokio::spawn(async move {
        let started = Instant::now();
        let mut samples = Vec::new();
        let end = started + Duration::from_secs(secs);
        let mut next = started;
        loop {
            let status = tokio::time::timeout(Duration::from_secs(5), client.status()).await;
            let revision = tokio::time::timeout(Duration::from_secs(5), client.get("/probe", None))
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|r| r.header().map(|h| h.revision()))
                .unwrap_or(-1);
            let line = match status {
                Ok(Ok(s)) => format!(
                    "| {:>4} | {} | {} | {} |",
                    started.elapsed().as_secs(),
                    s.db_size(),
                    s.raft_used_db_size(),
                    revision
                ),
                other => format!(
                    "| {:>4} | status failed: {other:?} | | |",
                    started.elapsed().as_secs()
                ),
            };
            println!("{line}");
            samples.push(line);
            next += sample_every;
            if next > end {
                return samples;
            }
            tokio::time::sleep_until(next.into()).await;
        }
    });
    println!("| t (s) | db_size (bytes) | db_size_in_use (bytes) | revision |");
    println!("|---:|---:|---:|---:|");
    let mut outcome = run_workload(&workload, keys.clone()).await?;
    let samples = sampler.await?;
    let r = row("history", &workload, &mut outcome);
    println!(
        "workload over {secs} s: {} records acked ({:.0} records/s), batch ack p50 {} ms, p99 {} ms, {} samples",
        outcome.acked,
        r.records_per_s,
        ms(r.p50),
        ms(r.p99),
        samples.len()
    );
    let spent = spent_tokens(&coordinator.url, &keys).await?;
    println!(
        "correctness: sum of spent tokens {} vs expected {} ({})",
        spent,
        outcome.acked * TOKENS_PER_RECORD,
        if spent == outcome.acked * TOKENS_PER_RECORD && outcome.acked == outcome.sent {
            "OK"
        } else {
            "MISMATCH"
        }
    );
    Ok(())
}

/// Watch lag samples: every second, the store's revision, then the time
/// until the standby's `allot_standby_revision` reaches it.
async fn sample_watch_lag(
    mut client: etcd_client::Client,
    metrics_url: String,
    until: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let http = reqwest::Client::new();
    let mut lags = Vec::new();
    while Instant::now() < until {
        let revision = client
            .get("/allot/journal", None)
            .await?
            .header()
            .map_or(0, |h| h.revision()) as f64;
        let asked = Instant::now();
        loop {
            if metric_value(&http, &metrics_url, "allot_standby_revision")
                .await
                .is_some_and(|v| v >= revision)
            {
                lags.push(asked.elapsed());
                break;
            }
            anyhow::ensure!(
                asked.elapsed() < Duration::from_secs(60),
                "the standby did not reach revision {revision} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(lags)
}

async fn standby(args: &[String]) -> anyhow::Result<()> {
    let measure = Duration::from_secs(arg_u64(args, "--secs", 20)?);
    let warm_up = Duration::from_secs(arg_u64(args, "--warmup", 3)?);
    let dir = TempDir::new("standby-bench");
    let cluster = EtcdCluster::start(1).await;
    let endpoints = cluster.endpoints();
    let mut leader = Coordinator::on_etcd(&dir.0.join("c1.log"), &endpoints, "c1", &[]);
    wait_leading(&leader.url, Duration::from_secs(30)).await?;
    let metrics = format!("127.0.0.1:{}", free_port());
    let metrics_url = format!("http://{metrics}/metrics");
    let standby = Coordinator::on_etcd(
        &dir.0.join("c2.log"),
        &endpoints,
        "c2",
        &["--metrics-listen", &metrics],
    );
    let keys = Arc::new(create_keys(&leader.url, BENCH_KEYS).await?);
    wait_metric(
        &metrics_url,
        "allot_standby_warm",
        1.0,
        Duration::from_secs(60),
    )
    .await?;
    let workload = Workload::batched(
        leader.url.clone(),
        "standby-agent-".into(),
        warm_up,
        measure,
    );
    println!(
        "a leader and a standby on one etcd member; {} agents x {} in flight x {} records per batch, {:?} warm-up + {:?}",
        workload.agents, workload.in_flight_per_agent, workload.batch, warm_up, measure
    );
    let sampler = tokio::spawn(sample_watch_lag(
        cluster.client().await,
        metrics_url.clone(),
        Instant::now() + warm_up + measure,
    ));
    let outcome = run_workload(&workload, keys.clone()).await?;
    let mut lags = sampler.await??;
    lags.sort();
    anyhow::ensure!(!lags.is_empty(), "no watch lag sample");
    let rss = |c: &Coordinator| {
        c.child
            .as_ref()
            .map_or(0, |child| status_kib(child.id(), "VmRSS:").unwrap_or(0))
    };
    println!(
        "settled {:.0} records/s in the window ({} acked); standby watch lag over {} samples: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        outcome.acked_in_window as f64 / measure.as_secs_f64(),
        outcome.acked,
        lags.len(),
        lags[lags.len() / 2].as_secs_f64() * 1e3,
        lags[((lags.len() - 1) as f64 * 0.99).round() as usize].as_secs_f64() * 1e3,
        lags[lags.len() - 1].as_secs_f64() * 1e3,
    );
    println!(
        "resident memory: leader {} KiB, standby {} KiB",
        rss(&leader),
        rss(&standby)
    );
    leader.kill();
    let took = wait_leading(&standby.url, Duration::from_secs(30)).await?;
    let spent = spent_tokens(&standby.url, &keys).await?;
    println!(
        "leader killed: the standby led after {:.2} s; spent tokens {} (expected {} = {} acked x {}): {}",
        took.as_secs_f64(),
        spent,
        outcome.acked * TOKENS_PER_RECORD,
        outcome.acked,
        TOKENS_PER_RECORD,
        if spent == outcome.acked * TOKENS_PER_RECORD && outcome.sent == outcome.acked {
            "exact"
        } else {
            "MISMATCH"
        }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("throughput") => throughput(&args).await,
        Some("memory") => memory(&args).await,
        Some("history") => history(&args).await,
        Some("heap") => heap(&args).await,
        Some("tls") => tls(&args).await,
        Some("standby") => standby(&args).await,
        _ => {
            eprintln!("usage: settle_bench throughput [--secs 20] [--warmup 3] | memory --keys N --agents M [--store etcd|embedded] | history [--secs 600] [--sample 30] [--compaction etcd|coordinator] [--history-ms 60000] | heap --keys N --agents M | tls [--rounds 5] [--secs 10] [--warmup 2]");
            std::process::exit(2);
        }
    }
}
