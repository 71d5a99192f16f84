//! The agent as its own OS process (issue 8): CPU time per request under
//! load, and resident memory with many streams open at once.
//!
//! Starts `allot-fake-neuron`, `allot-coordinator` (embedded store) and
//! `allot-agent` from the directory of this executable (`target/release/`
//! after `cargo build --release --workspace --bins`), creates a key with a
//! token balance of 10^15 through Admin, then:
//!
//! - CPU: `--concurrency` workers (32) send non-streamed chat completions
//!   back to back through the agent over pooled keep-alive connections: 1 s
//!   warm-up, then `--requests` (20,000) measured. The agent's utime + stime
//!   (`/proc/<pid>/stat`) over the measured window, divided by the requests
//!   completed in it, is its CPU time per request.
//! - Memory: the fake neuron is told to wait 30 s between SSE events; then
//!   `--streams` (1,000) streamed chat completions are opened at once, each
//!   on its own HTTP/1.1 connection, and each response's headers and first
//!   event are read. With all of them open, VmRSS and VmHWM of the agent
//!   are read from `/proc/<pid>/status`.
//! - TLS (`--part tls`, issue 14): two agents on the same neuron and
//!   coordinator, one whose client listener is plaintext and one serving
//!   HTTPS (`--listen-tls-cert`, a certificate from a test CA made here),
//!   and the bare hop as the floor. `--rounds` (5) rounds, the order of the
//!   two agents swapped every round: `--c1-requests` (2,000) requests at
//!   c=1 through each (and through the bare hop), then `--requests`
//!   (20,000) at c=`--concurrency` (32) through each. The load client is
//!   hyper's pooled keep-alive HTTP/1.1 client, over hyper-rustls (trusting
//!   the test CA) for the TLS agent: handshakes happen once per pooled
//!   connection, as with a real client.
//!
//! Run: `target/release/agent_bench [--part cpu|memory|both|tls] [--requests N]
//! [--concurrency N] [--streams N] [--stream] [--agent PATH] [--rounds N]
//! [--c1-requests N]`
//!
//! `--stream`: the CPU part sends streamed chat completions instead (the
//! whole SSE response is read). `--agent PATH`: run that agent binary
//! instead of the one beside this executable, e.g. a saved baseline for an
//! A/B comparison in one session.

use allot::pb;
use allot_e2e::{authed, balance, key_with_limits_at, limit, wait_agent_ready, ADMIN_TOKEN};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WARM_UP: Duration = Duration::from_secs(1);
const MAX_RUN: Duration = Duration::from_secs(120);
const STREAM_CHUNK_DELAY_MS: u64 = 30_000;
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(60);
const BODY: &str =
    r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
const STREAM_BODY: &str = r#"{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}"#;

struct Options {
    cpu: bool,
    memory: bool,
    requests: u64,
    concurrency: usize,
    streams: usize,
    /// The CPU part sends streamed requests.
    stream: bool,
    /// The agent binary to run; `None`: the one beside this executable.
    agent: Option<PathBuf>,
    /// `--part tls`: plaintext against TLS on the agent's client listener.
    tls: bool,
    /// Interleaved rounds of `--part tls`.
    rounds: usize,
    /// Requests at c=1 per mode and round of `--part tls`.
    c1_requests: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        cpu: true,
        memory: true,
        requests: 20_000,
        concurrency: 32,
        streams: 1_000,
        stream: false,
        agent: None,
        tls: false,
        rounds: 5,
        c1_requests: 2_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--part" => match value()?.as_str() {
                "cpu" => options.memory = false,
                "memory" => options.cpu = false,
                "both" => {}
                "tls" => {
                    options.cpu = false;
                    options.memory = false;
                    options.tls = true;
                }
                other => anyhow::bail!("--part cpu|memory|both|tls, not {other}"),
            },
            "--requests" => options.requests = value()?.parse()?,
            "--concurrency" => options.concurrency = value()?.parse()?,
            "--streams" => options.streams = value()?.parse()?,
            "--stream" => options.stream = true,
            "--agent" => options.agent = Some(PathBuf::from(value()?)),
            "--rounds" => options.rounds = value()?.parse()?,
            "--c1-requests" => options.c1_requests = value()?.parse()?,
            other => anyhow::bail!(
                "unknown argument {other}; usage: agent_bench [--part cpu|memory|both|tls] \
                 [--requests N] [--concurrency N] [--streams N] [--stream] [--agent PATH] \
                 [--rounds N] [--c1-requests N]"
            ),
        }
    }
    Ok(options)
}

/// A child process, `kill -9`ed on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `name` (next to this executable) through `sh`, which first raises
/// its soft open-file limit to the hard limit and then `exec`s the binary,
/// so the pid is the binary's own.
fn spawn(name: &'static str, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    spawn_binary(name, &allot_e2e::process::binary(name), args, log)
}

fn spawn_binary(
    name: &'static str,
    path: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Proc> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@""#)
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()?;
    Ok(Proc { name, child })
}

/// (utime, stime) of `pid` (a number or `self`), in seconds.
fn cpu_times(pid: &str, ticks_per_second: f64) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    Ok((
        utime as f64 / ticks_per_second,
        stime as f64 / ticks_per_second,
    ))
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let (user, system) = cpu_times(&pid.to_string(), ticks_per_second)?;
    Ok(user + system)
}

/// Voluntary + involuntary context switches of `pid`, summed over its threads.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, ...), in KiB.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(value) = line.strip_prefix(field).and_then(|l| l.strip_prefix(':')) {
            let number = value.trim().trim_end_matches("kB").trim();
            return Ok(number.parse()?);
        }
    }
    anyhow::bail!("no {field} in /proc/{pid}/status")
}

fn status_value(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "?".into())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// (soft, hard) "Max open files" of `pid`.
fn nofile_limits(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].to_string(), f[4].to_string())
        })
        .unwrap_or_else(|| ("?".into(), "?".into()))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[derive(Clone)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
    threads: String,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    Ok(Memory {
        rss_kib: status_kib(pid, "VmRSS")?,
        hwm_kib: status_kib(pid, "VmHWM")?,
        fds: open_fds(pid),
        threads: status_value(pid, "Threads"),
    })
}

fn pooled_client() -> Client<HttpConnector, Full<Bytes>> {
    allot_e2e::bare_hop::pooled_client()
}

async fn one_request<C: Connect + Clone + Send + Sync + 'static>(
    client: &Client<C, Full<Bytes>>,
    url: &str,
    auth: &str,
    body: &Bytes,
) -> Result<Duration, String> {
    let request = Request::post(url)
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, auth)
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let begun = Instant::now();
    let response: Response<Incoming> = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{status}: body: {e}"))?
        .to_bytes();
    let latency = begun.elapsed();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    Ok(latency)
}

#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    elapsed: Duration,
    timed_out: bool,
}

/// `concurrency` workers with requests back to back, until `requests` are
/// done (or `deadline` passes).
async fn run_workers<C: Connect + Clone + Send + Sync + 'static>(
    client: &Client<C, Full<Bytes>>,
    url: &str,
    auth: &str,
    body: &'static str,
    concurrency: usize,
    requests: u64,
    deadline: Duration,
) -> Outcome {
    let body = Bytes::from_static(body.as_bytes());
    let first_error = Arc::new(Mutex::new(None::<String>));
    let remaining = Arc::new(AtomicU64::new(requests));
    let begun = Instant::now();
    let end = begun + deadline;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, auth, body) = (
                client.clone(),
                url.to_string(),
                auth.to_string(),
                body.clone(),
            );
            let (remaining, first_error) = (remaining.clone(), first_error.clone());
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                loop {
                    if Instant::now() >= end {
                        outcome.timed_out = true;
                        return outcome;
                    }
                    if remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_err()
                    {
                        return outcome;
                    }
                    match one_request(&client, &url, &auth, &body).await {
                        Ok(latency) => {
                            outcome.ok += 1;
                            outcome.latencies.push(latency);
                        }
                        Err(error) => {
                            outcome.errors += 1;
                            first_error.lock().unwrap().get_or_insert(error);
                        }
                    }
                }
            })
        })
        .collect();
    let mut total = Outcome::default();
    for worker in workers {
        let outcome = worker.await.expect("load worker");
        total.ok += outcome.ok;
        total.errors += outcome.errors;
        total.latencies.extend(outcome.latencies);
        total.timed_out |= outcome.timed_out;
    }
    total.elapsed = begun.elapsed();
    total.latencies.sort();
    total.first_error = first_error.lock().unwrap().take();
    total
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One open streamed response: its connection, the response body with
/// the first event already read.
struct OpenStream {
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _body: Incoming,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Opens one streamed chat completion on a connection of its own and reads
/// the response headers and the first non-empty body chunk.
async fn open_stream(addr: SocketAddr, auth: &str) -> Result<OpenStream, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post("/v1/chat/completions")
        .header(HOST, addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, auth)
        .body(Full::new(Bytes::from_static(STREAM_BODY.as_bytes())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    break;
                }
            }
            Some(Err(e)) => return Err(format!("body: {e}")),
            None => return Err("the stream ended before its first event".into()),
        }
    }
    Ok(OpenStream {
        _sender: sender,
        _body: body,
        connection,
    })
}

struct CpuRun {
    outcome: Outcome,
    agent_cpu: f64,
    agent_user: f64,
    agent_system: f64,
    agent_switches: u64,
    bench_cpu: f64,
    neuron_cpu: f64,
    coordinator_cpu: f64,
}

struct MemoryRun {
    at_ready: Memory,
    idle: Memory,
    open: Vec<Memory>,
    after_close: Memory,
    opened: usize,
    failed: usize,
    first_error: Option<String>,
    open_time: Duration,
    neuron_hits_delta: u64,
}

async fn neuron_hits(http: &reqwest::Client, neuron_url: &str) -> u64 {
    let Ok(response) = http.get(format!("{neuron_url}/_fake/hits")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.get("hits").and_then(|h| h.as_u64()))
        })
        .or_else(|| text.trim().parse().ok())
        .unwrap_or(0)
}

/// The fake neuron and the coordinator (embedded store, plaintext) the
/// agents under test talk to, and a key with a huge token balance.
struct Backends {
    neuron: Proc,
    neuron_url: String,
    coordinator: Proc,
    coordinator_url: String,
    /// `Bearer <secret>` of the key.
    auth: String,
    http: reqwest::Client,
}

async fn start_backends(dir: &Path) -> anyhow::Result<Backends> {
    let addr = |_: ()| allot_e2e::process::free_addr();
    let neuron_addr = addr(());
    let neuron_url = format!("http://{neuron_addr}");
    let neuron = spawn(
        "allot-fake-neuron",
        &[
            "--listen".into(),
            neuron_addr.to_string(),
            "--model".into(),
            "fake-model".into(),
            "--neuron-id".into(),
            "neuron-1".into(),
        ],
        &dir.join("neuron.log"),
    )?;
    let coordinator_addr = addr(());
    let coordinator_url = format!("http://{coordinator_addr}");
    let coordinator = spawn(
        "allot-coordinator",
        &[
            "--listen".into(),
            coordinator_addr.to_string(),
            "--metrics-listen".into(),
            "off".into(),
            "--insecure".into(),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
            "--store".into(),
            "embedded".into(),
            "--data-path".into(),
            dir.join("coordinator.redb").display().to_string(),
        ],
        &dir.join("coordinator.log"),
    )?;
    let http = reqwest::Client::new();
    let check = wait("the fake neuron");
    while !check(
        http.get(format!("{neuron_url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200),
    )? {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let check = wait("the coordinator");
    loop {
        let ok = match pb::admin_client::AdminClient::connect(coordinator_url.clone()).await {
            Ok(mut admin) => admin
                .list_accounts(authed(pb::ListAccountsRequest::default()))
                .await
                .is_ok(),
            Err(_) => false,
        };
        if check(ok)? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_key_id, secret) = key_with_limits_at(
        &coordinator_url,
        "bench",
        vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
    )
    .await;
    let auth = format!("Bearer {secret}");
    Ok(Backends {
        neuron,
        neuron_url,
        coordinator,
        coordinator_url,
        auth,
        http,
    })
}

/// Waits until `ok` holds or `what` times out after 30 s.
fn wait(what: &'static str) -> impl Fn(bool) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(30);
    move |ok: bool| -> anyhow::Result<bool> {
        if ok {
            return Ok(true);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        Ok(false)
    }
}

async fn bench(options: Options) -> anyhow::Result<()> {
    let ticks = clock_ticks();
    let (own_soft, own_hard) = nofile_limits("self");
    if let Ok(soft) = own_soft.parse::<usize>() {
        anyhow::ensure!(
            soft >= options.streams + 256,
            "open-file limit {soft} is too low for {} streams: run `ulimit -n {}` first",
            options.streams,
            options.streams * 4
        );
    }
    let dir = std::env::temp_dir().join(format!("allot-agent-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let addr = |_: ()| allot_e2e::process::free_addr();

    let Backends {
        neuron,
        neuron_url,
        coordinator,
        coordinator_url,
        auth,
        http,
    } = start_backends(&dir).await?;

    let agent_addr = addr(());
    let agent_url = format!("http://{agent_addr}");
    let agent_path = options
        .agent
        .clone()
        .unwrap_or_else(|| allot_e2e::process::binary("allot-agent"));
    let agent = spawn_binary(
        "allot-agent",
        &agent_path,
        &[
            "--listen".into(),
            agent_addr.to_string(),
            "--metrics-listen".into(),
            "off".into(),
            "--insecure".into(),
            "--coordinators".into(),
            coordinator_url.clone(),
            "--agent-id".into(),
            "agent-1".into(),
            "--neuron-id".into(),
            "neuron-1".into(),
            "--neuron-url".into(),
            neuron_url.clone(),
            "--spool-dir".into(),
            dir.join("spool").display().to_string(),
            "--allowance-wait-ms".into(),
            "2000".into(),
        ],
        &dir.join("agent.log"),
    )?;
    wait_agent_ready(&agent_url, Duration::from_secs(30)).await;
    let pid = agent.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    // The kernel keeps the first 15 bytes of the executable's name.
    let file_name = agent_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let expected: String = file_name.chars().take(15).collect();
    anyhow::ensure!(
        comm.trim() == expected,
        "pid {pid} is {comm:?}, not {expected}"
    );
    let (agent_soft, agent_hard) = nofile_limits(&pid.to_string());
    let at_ready = memory(pid)?;

    let client = pooled_client();
    let url = format!("{agent_url}/v1/chat/completions");
    let load_body = if options.stream { STREAM_BODY } else { BODY };
    let check = wait("the agent to answer 200");
    loop {
        let result = one_request(&client, &url, &auth, &Bytes::from_static(BODY.as_bytes())).await;
        if check(result.is_ok())? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Warm-up: `concurrency` workers for 1 s.
    eprintln!(
        "warm-up: {} workers for {WARM_UP:?}...",
        options.concurrency
    );
    let warm = run_workers(
        &client,
        &url,
        &auth,
        load_body,
        options.concurrency,
        u64::MAX,
        WARM_UP,
    )
    .await;
    if warm.errors > 0 {
        eprintln!(
            "warm-up: {} errors of {}, first: {}",
            warm.errors,
            warm.ok + warm.errors,
            warm.first_error.as_deref().unwrap_or("?")
        );
    }

    let mut cpu_run = None;
    let mut bare_run = None;
    if options.cpu {
        eprintln!(
            "measuring: {} requests at c={}...",
            options.requests, options.concurrency
        );
        let agent_before = cpu_times(&pid.to_string(), ticks)?;
        let bench_before = cpu_times("self", ticks)?;
        let switches_before = context_switches(pid);
        let before = [
            cpu_seconds(pid, ticks)?,
            cpu_seconds(neuron.pid(), ticks)?,
            cpu_seconds(coordinator.pid(), ticks)?,
        ];
        let outcome = run_workers(
            &client,
            &url,
            &auth,
            load_body,
            options.concurrency,
            options.requests,
            MAX_RUN,
        )
        .await;
        let after = [
            cpu_seconds(pid, ticks)?,
            cpu_seconds(neuron.pid(), ticks)?,
            cpu_seconds(coordinator.pid(), ticks)?,
        ];
        let agent_after = cpu_times(&pid.to_string(), ticks)?;
        let bench_after = cpu_times("self", ticks)?;
        let switches_after = context_switches(pid);
        cpu_run = Some(CpuRun {
            outcome,
            agent_cpu: after[0] - before[0],
            agent_user: agent_after.0 - agent_before.0,
            agent_system: agent_after.1 - agent_before.1,
            agent_switches: switches_after.saturating_sub(switches_before),
            bench_cpu: bench_after.0 + bench_after.1 - bench_before.0 - bench_before.1,
            neuron_cpu: after[1] - before[1],
            coordinator_cpu: after[2] - before[2],
        });
        // The floor: the same load through the bare hop, as its own
        // process on the same neuron, measured the same way.
        let bare_addr = addr(());
        let bare = spawn(
            "bare_hop",
            &[
                "--listen".into(),
                bare_addr.to_string(),
                "--upstream".into(),
                neuron_url.clone(),
            ],
            &dir.join("bare_hop.log"),
        )?;
        let bare_url = format!("http://{bare_addr}/v1/chat/completions");
        let check = wait("the bare hop to answer 200");
        loop {
            let result = one_request(
                &client,
                &bare_url,
                &auth,
                &Bytes::from_static(BODY.as_bytes()),
            )
            .await;
            if check(result.is_ok())? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run_workers(
            &client,
            &bare_url,
            &auth,
            load_body,
            options.concurrency,
            u64::MAX,
            WARM_UP,
        )
        .await;
        eprintln!("measuring the bare hop: {} requests...", options.requests);
        let before = cpu_seconds(bare.pid(), ticks)?;
        let outcome = run_workers(
            &client,
            &bare_url,
            &auth,
            load_body,
            options.concurrency,
            options.requests,
            MAX_RUN,
        )
        .await;
        bare_run = Some((outcome, cpu_seconds(bare.pid(), ticks)? - before));
    }
    drop(client);

    let mut memory_run = None;
    if options.memory {
        // Let the agent settle after the load, then sample it idle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = memory(pid)?;
        let response = http
            .post(format!("{neuron_url}/_fake/behavior"))
            .json(&serde_json::json!({ "chunk_delay_ms": STREAM_CHUNK_DELAY_MS }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "POST /_fake/behavior: {}",
            response.status()
        );
        let hits_before = neuron_hits(&http, &neuron_url).await;
        eprintln!("opening {} streams at once...", options.streams);
        let begun = Instant::now();
        let tasks: Vec<_> = (0..options.streams)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(STREAM_OPEN_TIMEOUT, open_stream(agent_addr, &auth))
                        .await
                        .unwrap_or_else(|_| Err("timed out opening".into()))
                })
            })
            .collect();
        let mut streams = Vec::with_capacity(options.streams);
        let (mut failed, mut first_error) = (0, None);
        for task in tasks {
            match task.await.expect("stream task") {
                Ok(stream) => streams.push(stream),
                Err(error) => {
                    failed += 1;
                    first_error.get_or_insert(error);
                }
            }
        }
        let open_time = begun.elapsed();
        let neuron_hits_delta = neuron_hits(&http, &neuron_url).await - hits_before;
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(memory(pid)?);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        open.push(memory(pid)?);
        let opened = streams.len();
        drop(streams);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after_close = memory(pid)?;
        memory_run = Some(MemoryRun {
            at_ready: at_ready.clone(),
            idle,
            open,
            after_close,
            opened,
            failed,
            first_error,
            open_time,
            neuron_hits_delta,
        });
    }

    let command = std::iter::once("target/release/agent_bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    println!("## agent_bench: the agent as its own process\n");
    println!("Command: `{command}`\n");
    println!(
        "Processes: agent {} pid {pid}, allot-fake-neuron pid {}, allot-coordinator pid {} \
         (embedded store); clock ticks/s {ticks}; open-file limit (soft/hard) of this bench \
         {own_soft}/{own_hard}, of the agent {agent_soft}/{agent_hard}; agent threads {}.\n",
        agent_path.display(),
        neuron.pid(),
        coordinator.pid(),
        at_ready.threads,
    );
    if let Some(run) = &cpu_run {
        let o = &run.outcome;
        let per_request = |cpu: f64| cpu / o.ok.max(1) as f64 * 1e6;
        println!(
            "### CPU per request: {} chat completion (max_tokens 5), c={}, zero-delay neuron\n",
            if options.stream {
                "streamed"
            } else {
                "non-streamed"
            },
            options.concurrency
        );
        println!("| ok | errors | time (s) | req/s | p50 (µs) | p99 (µs) | agent CPU (s) | agent CPU/request (µs) | agent cores busy | neuron CPU/request (µs) | coordinator CPU/request (µs) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {} | {} | {:.2}{} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} |",
            o.ok,
            o.errors,
            o.elapsed.as_secs_f64(),
            if o.timed_out { " (cap)" } else { "" },
            o.ok as f64 / o.elapsed.as_secs_f64(),
            micros(percentile(&o.latencies, 0.50)),
            micros(percentile(&o.latencies, 0.99)),
            run.agent_cpu,
            per_request(run.agent_cpu),
            run.agent_cpu / o.elapsed.as_secs_f64(),
            per_request(run.neuron_cpu),
            per_request(run.coordinator_cpu),
        );
        println!(
            "\nAgent CPU per request split: user {:.1} µs, system {:.1} µs; agent context \
             switches per request {:.2}; this load client's CPU per request {:.1} µs.",
            per_request(run.agent_user),
            per_request(run.agent_system),
            run.agent_switches as f64 / o.ok.max(1) as f64,
            per_request(run.bench_cpu),
        );
        if let Some((bare, bare_cpu)) = &bare_run {
            let bare_per_request = bare_cpu / bare.ok.max(1) as f64 * 1e6;
            println!(
                "\nThe bare hop (`bare_hop`, its own process, same neuron, same load): {} ok, {} errors, \
                 {:.0} req/s, p50 {:.1} µs, p99 {:.1} µs, **CPU/request {:.1} µs**. Agent CPU/request \
                 over the bare hop's: +{:.1} µs ({:.2}×); agent req/s ÷ bare hop req/s: {:.3}.",
                bare.ok,
                bare.errors,
                bare.ok as f64 / bare.elapsed.as_secs_f64(),
                micros(percentile(&bare.latencies, 0.50)),
                micros(percentile(&bare.latencies, 0.99)),
                bare_per_request,
                per_request(run.agent_cpu) - bare_per_request,
                per_request(run.agent_cpu) / bare_per_request,
                (o.ok as f64 / o.elapsed.as_secs_f64())
                    / (bare.ok as f64 / bare.elapsed.as_secs_f64()),
            );
        }
        let target = per_request(run.agent_cpu) <= 20.0;
        println!(
            "\nTarget ≤ 20 µs agent CPU per request: {}",
            if target { "met" } else { "NOT met" }
        );
        if let Some(error) = &o.first_error {
            println!(
                "\nERRORS: {} of {}; first: {error}",
                o.errors,
                o.ok + o.errors
            );
        }
        println!();
    }
    if let Some(run) = &memory_run {
        let peak_open = run.open.iter().map(|m| m.rss_kib).max().unwrap_or(0);
        let last = run.open.last().cloned().expect("samples");
        println!(
            "### Agent memory with {} streamed chat completions open at once (neuron chunk delay {} s)\n",
            options.streams,
            STREAM_CHUNK_DELAY_MS / 1000
        );
        println!(
            "Streams open: {} of {} ({} failed); all headers + first event read in {:.2} s; \
             neuron hits during the opening: {}.\n",
            run.opened,
            options.streams,
            run.failed,
            run.open_time.as_secs_f64(),
            run.neuron_hits_delta,
        );
        println!("| moment | VmRSS (MiB) | VmHWM (MiB) | agent open fds | agent threads |");
        println!("|---|---:|---:|---:|---:|");
        let row = |name: &str, m: &Memory| {
            println!(
                "| {name} | {:.1} | {:.1} | {} | {} |",
                mib(m.rss_kib),
                mib(m.hwm_kib),
                m.fds,
                m.threads
            )
        };
        row("agent ready, before any request", &run.at_ready);
        row(
            "idle after warm-up (and the CPU run), before the streams",
            &run.idle,
        );
        for (i, m) in run.open.iter().enumerate() {
            row(
                &format!("{} streams open, sample {} (1 s apart)", run.opened, i + 1),
                m,
            );
        }
        row("3 s after the streams were closed", &run.after_close);
        println!(
            "\nRSS with the streams open: {:.1} MiB (highest sample; last {:.1} MiB), {:.1} MiB above idle, \
             {:.1} KiB per stream. Target ≤ 64 MiB: {}",
            mib(peak_open),
            mib(last.rss_kib),
            mib(peak_open.saturating_sub(run.idle.rss_kib)),
            peak_open.saturating_sub(run.idle.rss_kib) as f64 / run.opened.max(1) as f64,
            if peak_open <= 64 * 1024 && run.opened == options.streams {
                "met"
            } else {
                "NOT met"
            }
        );
        if let Some(error) = &run.first_error {
            println!("\nSTREAM ERRORS: {} failed; first: {error}", run.failed);
        }
    }
    let names = [agent.name, neuron.name, coordinator.name];
    drop(agent);
    drop(neuron);
    drop(coordinator);
    eprintln!("stopped {}", names.join(", "));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A pooled keep-alive HTTP/1.1 client over TLS trusting the CA in `ca`,
/// with TCP_NODELAY: [`pooled_client`] with hyper-rustls.
fn pooled_tls_client(
    ca: &Path,
) -> anyhow::Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>> {
    let roots = allot_coordinator::tls::read_roots("ca", ca).map_err(anyhow::Error::msg)?;
    let tls = rustls::ClientConfig::builder_with_provider(allot_coordinator::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https))
}

/// One measured load: its outcome and the CPU seconds `pid` spent in it.
async fn measured<C: Connect + Clone + Send + Sync + 'static>(
    client: &Client<C, Full<Bytes>>,
    url: &str,
    auth: &str,
    concurrency: usize,
    requests: u64,
    pid: u32,
    ticks: f64,
) -> anyhow::Result<(Outcome, f64)> {
    let before = cpu_seconds(pid, ticks)?;
    let outcome = run_workers(client, url, auth, BODY, concurrency, requests, MAX_RUN).await;
    let cpu = cpu_seconds(pid, ticks)? - before;
    if let Some(error) = &outcome.first_error {
        anyhow::bail!("{} errors, first: {error}", outcome.errors);
    }
    Ok((outcome, cpu))
}

/// Waits until a chat completion through `url` answers 200.
async fn wait_serving<C: Connect + Clone + Send + Sync + 'static>(
    client: &Client<C, Full<Bytes>>,
    url: &str,
    auth: &str,
    what: &'static str,
) -> anyhow::Result<()> {
    let check = wait(what);
    loop {
        let result = one_request(client, url, auth, &Bytes::from_static(BODY.as_bytes())).await;
        if check(result.is_ok())? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct ModeFigures {
    p50_c1: Vec<f64>,
    p99_c1: Vec<f64>,
    rps_cn: Vec<f64>,
    cpu_cn: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `--part tls`: plaintext against TLS on the agent's client listener,
/// interleaved.
async fn tls_ab(options: Options) -> anyhow::Result<()> {
    let ticks = clock_ticks();
    let dir = std::env::temp_dir().join(format!("allot-agent-tls-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let backends = start_backends(&dir).await?;
    let pki = allot_e2e::tls::TestPki::new(&dir.join("certs"));
    let server = pki.node();
    let agent_path = options
        .agent
        .clone()
        .unwrap_or_else(|| allot_e2e::process::binary("allot-agent"));
    let start_agent = |id: &'static str, tls: bool| {
        let addr = allot_e2e::process::free_addr();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            "off".into(),
            "--insecure".into(),
            "--coordinators".into(),
            backends.coordinator_url.clone(),
            "--agent-id".into(),
            id.into(),
            "--neuron-id".into(),
            "neuron-1".into(),
            "--neuron-url".into(),
            backends.neuron_url.clone(),
            "--spool-dir".into(),
            dir.join(id).display().to_string(),
            "--allowance-wait-ms".into(),
            "2000".into(),
        ];
        if tls {
            args.extend([
                "--listen-tls-cert".into(),
                server.cert.display().to_string(),
                "--listen-tls-key".into(),
                server.key.display().to_string(),
            ]);
        }
        let log = dir.join(format!("{id}.log"));
        spawn_binary("allot-agent", &agent_path, &args, &log).map(|agent| (agent, addr))
    };
    let (plain_agent, plain_addr) = start_agent("agent-plain", false)?;
    let (tls_agent, tls_addr) = start_agent("agent-tls", true)?;
    let bare_addr = allot_e2e::process::free_addr();
    let bare = spawn(
        "bare_hop",
        &[
            "--listen".into(),
            bare_addr.to_string(),
            "--upstream".into(),
            backends.neuron_url.clone(),
        ],
        &dir.join("bare_hop.log"),
    )?;
    let plain = pooled_client();
    let tls = pooled_tls_client(&pki.ca_path())?;
    let plain_url = format!("http://{plain_addr}/v1/chat/completions");
    let tls_url = format!("https://{tls_addr}/v1/chat/completions");
    let bare_url = format!("http://{bare_addr}/v1/chat/completions");
    let auth = backends.auth.clone();
    wait_serving(&plain, &plain_url, &auth, "the plaintext agent").await?;
    wait_serving(&tls, &tls_url, &auth, "the TLS agent").await?;
    wait_serving(&plain, &bare_url, &auth, "the bare hop").await?;
    eprintln!("warm-up: 1 s each at c={}...", options.concurrency);
    run_workers(
        &plain,
        &plain_url,
        &auth,
        BODY,
        options.concurrency,
        u64::MAX,
        WARM_UP,
    )
    .await;
    run_workers(
        &tls,
        &tls_url,
        &auth,
        BODY,
        options.concurrency,
        u64::MAX,
        WARM_UP,
    )
    .await;
    run_workers(
        &plain,
        &bare_url,
        &auth,
        BODY,
        options.concurrency,
        u64::MAX,
        WARM_UP,
    )
    .await;

    let (c1, cn) = (options.c1_requests, options.requests);
    let mut figures: [ModeFigures; 3] = Default::default();
    let names = ["plaintext", "TLS", "bare hop (plaintext)"];
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        let order: [usize; 3] = if round % 2 == 1 { [0, 1, 2] } else { [1, 0, 2] };
        for mode in order {
            eprintln!("round {round}: {} at c=1...", names[mode]);
            let (outcome, _) = match mode {
                0 => measured(&plain, &plain_url, &auth, 1, c1, plain_agent.pid(), ticks).await?,
                1 => measured(&tls, &tls_url, &auth, 1, c1, tls_agent.pid(), ticks).await?,
                _ => measured(&plain, &bare_url, &auth, 1, c1, bare.pid(), ticks).await?,
            };
            let f = &mut figures[mode];
            f.p50_c1.push(micros(percentile(&outcome.latencies, 0.50)));
            f.p99_c1.push(micros(percentile(&outcome.latencies, 0.99)));
            if mode == 2 {
                rows.push(format!(
                    "| {round} | {} | {} | {:.1} | {:.1} | | |",
                    names[mode],
                    outcome.ok,
                    f.p50_c1.last().unwrap(),
                    f.p99_c1.last().unwrap()
                ));
                continue;
            }
            eprintln!(
                "round {round}: {} at c={}...",
                names[mode], options.concurrency
            );
            let n = options.concurrency;
            let (outcome_n, cpu) = match mode {
                0 => measured(&plain, &plain_url, &auth, n, cn, plain_agent.pid(), ticks).await?,
                _ => measured(&tls, &tls_url, &auth, n, cn, tls_agent.pid(), ticks).await?,
            };
            let rps = outcome_n.ok as f64 / outcome_n.elapsed.as_secs_f64();
            let cpu_per_request = cpu / outcome_n.ok.max(1) as f64 * 1e6;
            f.rps_cn.push(rps);
            f.cpu_cn.push(cpu_per_request);
            rows.push(format!(
                "| {round} | {} | {} + {} | {:.1} | {:.1} | {rps:.0} | {cpu_per_request:.1} |",
                names[mode],
                outcome.ok,
                outcome_n.ok,
                f.p50_c1.last().unwrap(),
                f.p99_c1.last().unwrap(),
            ));
        }
    }

    let command = std::iter::once("target/release/agent_bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    println!("## agent_bench --part tls: plaintext against TLS on the client listener\n");
    println!("Command: `{command}`\n");
    println!(
        "Agents {} (pids {} plaintext, {} TLS), bare hop pid {}, allot-fake-neuron pid {}, \
         allot-coordinator pid {} (embedded store, plaintext to the agents); non-streamed chat \
         completions (max_tokens 5), pooled keep-alive HTTP/1.1; agent CPU is utime + stime \
         over the c={} run.\n",
        agent_path.display(),
        plain_agent.pid(),
        tls_agent.pid(),
        bare.pid(),
        backends.neuron.pid(),
        backends.coordinator.pid(),
        options.concurrency,
    );
    println!(
        "| round | through | requests | p50 c=1 (µs) | p99 c=1 (µs) | req/s c={} | agent CPU/request c={} (µs) |",
        options.concurrency, options.concurrency
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!("{row}");
    }
    let bare_p50 = median(&figures[2].p50_c1);
    println!(
        "\nMedians over {} rounds (bare hop p50 at c=1: {bare_p50:.1} µs):\n",
        options.rounds
    );
    println!(
        "| listener | p50 c=1 (µs) | added over the bare hop (µs) | p99 c=1 (µs) | req/s c={} | agent CPU/request (µs) |",
        options.concurrency
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for mode in [0, 1] {
        let f = &figures[mode];
        println!(
            "| {} | {:.1} | {:+.1} | {:.1} | {:.0} | {:.1} |",
            names[mode],
            median(&f.p50_c1),
            median(&f.p50_c1) - bare_p50,
            median(&f.p99_c1),
            median(&f.rps_cn),
            median(&f.cpu_cn),
        );
    }
    let (plain_f, tls_f) = (&figures[0], &figures[1]);
    println!(
        "\nTLS − plaintext: p50 c=1 {:+.1} µs, p99 c=1 {:+.1} µs, req/s c={} {:+.1}%, agent CPU/request {:+.1} µs.",
        median(&tls_f.p50_c1) - median(&plain_f.p50_c1),
        median(&tls_f.p99_c1) - median(&plain_f.p99_c1),
        options.concurrency,
        (median(&tls_f.rps_cn) / median(&plain_f.rps_cn) - 1.0) * 100.0,
        median(&tls_f.cpu_cn) - median(&plain_f.cpu_cn),
    );
    drop((plain_agent, tls_agent, bare, backends));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            if options.tls {
                tls_ab(options).await
            } else {
                bench(options).await
            }
        })
}
