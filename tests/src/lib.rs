//! Test harness for allot's end-to-end tests: starts a real coordinator, real
//! agents and fake neurons on loopback ports, each in its own temporary
//! directory, and offers the helpers the tests share. Waiting is always on a
//! condition with a deadline, never a bare sleep.

pub mod bare_hop;
pub mod etcd;
pub mod fixture;
pub mod grpcurl;
pub mod llama;
pub mod postgres;
pub mod process;
pub mod tls;

use allot::pb;
use allot_coordinator::config::CoordinatorConfig;
use allot_fake_neuron::{FakeConfig, FakeNeuron};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const MODEL: &str = "fake-model";

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "allot-test-{label}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `condition` every 10 ms until it holds or `deadline` passes.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request to the Admin service carrying the admin token.
pub fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().expect("ascii"),
    );
    request
}

pub struct RunningAgent {
    pub addr: SocketAddr,
    pub url: String,
    task: JoinHandle<anyhow::Result<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningAgent {
    /// Ends the agent at once, as `kill -9` would: no drain, no flush
    /// beyond what is already on disk.
    pub fn kill(mut self) {
        self.shutdown.take();
        self.task.abort();
    }

    /// Stops the agent gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// One coordinator (embedded store), one fake neuron, one agent.
pub struct Stack {
    pub coordinator_addr: SocketAddr,
    pub coordinator_url: String,
    pub neuron: FakeNeuron,
    pub neuron_url: String,
    pub agent: Option<RunningAgent>,
    pub agent_config: allot_agent::config::AgentConfig,
    pub http: reqwest::Client,
    coordinator_task: JoinHandle<anyhow::Result<()>>,
    /// The etcd cluster of an etcd-backed stack (dropped after the rest).
    pub etcd: Option<etcd::EtcdCluster>,
    /// The certificates of a TLS stack ([`Stack::start_tls`]); `None`: the
    /// stack runs with `insecure = true`.
    pub pki: Option<tls::TestPki>,
    pub dir: TempDir,
}

/// Which store the stack's coordinator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Etcd,
}

/// Runs each named `async fn name(backend: Backend)` as two tests: one on
/// the embedded store, one on a real single-member etcd.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Embedded).await
                }
            )*
        }
        mod etcd_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Etcd).await
                }
            )*
        }
    };
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.coordinator_task.abort();
        if let Some(agent) = self.agent.take() {
            agent.task.abort();
        }
    }
}

pub async fn start_coordinator(
    config: CoordinatorConfig,
) -> (SocketAddr, JoinHandle<anyhow::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(allot_coordinator::run(
        config,
        listener,
        std::future::pending(),
    ));
    (addr, task)
}

/// A fake neuron serving `models` on a free loopback port, until the test
/// ends; its base URL.
pub async fn start_neuron(
    models: &[&str],
    neuron_id: &str,
    endpoints: std::collections::HashMap<String, String>,
) -> (FakeNeuron, String) {
    start_neuron_with(FakeConfig {
        models: models.iter().map(|m| m.to_string()).collect(),
        neuron_id: neuron_id.into(),
        endpoints,
        ..Default::default()
    })
    .await
}

/// A fake neuron of `config` on a free loopback port, until the test ends;
/// its base URL.
pub async fn start_neuron_with(config: FakeConfig) -> (FakeNeuron, String) {
    let neuron = FakeNeuron::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(neuron.clone().serve(listener, std::future::pending()));
    (neuron, url)
}

pub async fn start_agent(config: allot_agent::config::AgentConfig) -> RunningAgent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(allot_agent::run(config, listener, async move {
        let _ = rx.await;
    }));
    RunningAgent {
        addr,
        url: format!("http://{addr}"),
        task,
        shutdown: Some(tx),
    }
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_on(Backend::Embedded).await
    }

    pub async fn start_on(backend: Backend) -> Stack {
        // ALLOT_TEST_LOG=1 (with RUST_LOG) shows the services' logs.
        if std::env::var_os("ALLOT_TEST_LOG").is_some() {
            allot_runtime::telemetry::init_logging(allot_runtime::telemetry::LogFormat::Text);
        }
        let dir = TempDir::new("stack");
        let mut config = CoordinatorConfig {
            insecure: true,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            admin_token: ADMIN_TOKEN.into(),
            data_path: dir.0.join("coordinator.redb"),
            settle_window_ms: 1,
            ..CoordinatorConfig::default()
        };
        let cluster = match backend {
            Backend::Embedded => None,
            Backend::Etcd => {
                let cluster = etcd::EtcdCluster::start(1).await;
                config.store = allot_coordinator::config::StoreKind::Etcd;
                config.etcd_endpoints = cluster.endpoints();
                Some(cluster)
            }
        };
        let mut stack = Stack::start_in(dir, config, None).await;
        stack.etcd = cluster;
        stack
    }

    /// A stack whose coordinator uses `config` (its data path included).
    pub async fn start_with(config: CoordinatorConfig) -> Stack {
        Stack::start_in(TempDir::new("stack"), config, None).await
    }

    /// A stack where every link speaks TLS: the coordinator's port with
    /// certificates from a test CA (reloaded every 100 ms), the agent with
    /// a client certificate naming `agent-1`. The agent's own listener
    /// stays plaintext on loopback.
    pub async fn start_tls() -> Stack {
        let dir = TempDir::new("tls-stack");
        let pki = tls::TestPki::new(&dir.0.join("certs"));
        let config = Stack::tls_coordinator_config(&dir, &pki);
        Stack::start_in(dir, config, Some(pki)).await
    }

    /// A TLS stack ([`Stack::start_tls`]) whose coordinator uses `config`
    /// (made from [`Stack::tls_coordinator_config`] of `dir` and `pki`).
    pub async fn start_tls_with(
        dir: TempDir,
        pki: tls::TestPki,
        config: CoordinatorConfig,
    ) -> Stack {
        Stack::start_in(dir, config, Some(pki)).await
    }

    /// The coordinator configuration of [`Stack::start_tls`].
    pub fn tls_coordinator_config(dir: &TempDir, pki: &tls::TestPki) -> CoordinatorConfig {
        CoordinatorConfig {
            insecure: false,
            tls_cert: Some(pki.dir.join("node.pem")),
            tls_key: Some(pki.dir.join("node.key")),
            tls_client_ca: Some(pki.ca_path()),
            tls_reload_ms: 100,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            admin_token: ADMIN_TOKEN.into(),
            data_path: dir.0.join("coordinator.redb"),
            settle_window_ms: 1,
            ..CoordinatorConfig::default()
        }
    }

    async fn start_in(dir: TempDir, config: CoordinatorConfig, pki: Option<tls::TestPki>) -> Stack {
        let (coordinator_addr, coordinator_task) = start_coordinator(config).await;
        let (neuron, neuron_url) =
            start_neuron(&[MODEL, "other-model"], "neuron-1", Default::default()).await;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let coordinator_url = format!("{scheme}://{coordinator_addr}");
        let agent_tls = pki.as_ref().map(|pki| pki.agent("agent-1"));
        let agent_config = allot_agent::config::AgentConfig {
            insecure: pki.is_none(),
            coordinator_ca: pki.as_ref().map(|pki| pki.ca_path()),
            client_cert: agent_tls.as_ref().map(|files| files.cert.clone()),
            client_key: agent_tls.as_ref().map(|files| files.key.clone()),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            coordinators: vec![coordinator_url.clone()],
            agent_id: "agent-1".into(),
            neuron_id: "neuron-1".into(),
            neuron_url: neuron_url.clone(),
            spool_dir: dir.0.join("agent-1"),
            max_body_bytes: 64 * 1024,
            allowance_wait_ms: 2_000,
            ..Default::default()
        };
        let mut stack = Stack {
            coordinator_addr,
            coordinator_url,
            neuron,
            neuron_url,
            agent: None,
            agent_config,
            http: reqwest::Client::new(),
            coordinator_task,
            etcd: None,
            pki,
            dir,
        };
        stack.wait_for_coordinator().await;
        stack.restart_agent().await;
        stack
    }

    /// Waits until the agent has a session with the coordinator.
    pub async fn wait_for_agent(&self) {
        wait_agent_ready(&self.agent_url(), Duration::from_secs(30)).await;
    }

    /// Usage records settled so far, over every agent.
    pub async fn settled_records(&self) -> u64 {
        match self.channel().await {
            Ok(channel) => settled_records_via(pb::admin_client::AdminClient::new(channel)).await,
            Err(_) => 0,
        }
    }

    /// A channel to the coordinator: over TLS (trusting the test CA, no
    /// client certificate) on a TLS stack.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.pki {
            Some(pki) => pki.channel(&self.coordinator_url).await,
            None => {
                Channel::from_shared(self.coordinator_url.clone())
                    .expect("a valid url")
                    .connect()
                    .await
            }
        }
    }

    async fn wait_for_coordinator(&self) {
        wait_until(
            "the coordinator to lead and answer admin calls",
            Duration::from_secs(20),
            || async move {
                let Ok(channel) = self.channel().await else {
                    return false;
                };
                let mut admin = pb::admin_client::AdminClient::new(channel);
                admin
                    .list_accounts(authed(pb::ListAccountsRequest::default()))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn agent_url(&self) -> String {
        self.agent.as_ref().expect("agent running").url.clone()
    }

    pub async fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel().await.expect("admin connects"))
    }

    /// Creates an account (if new) and a key with `limits`; returns
    /// `(key_id, secret)`.
    pub async fn key_with_limits(
        &self,
        account_id: &str,
        limits: Vec<pb::Limit>,
    ) -> (String, String) {
        key_with_limits_via(self.admin().await, account_id, limits).await
    }

    pub async fn snapshot(&self, key_id: &str) -> pb::Snapshot {
        self.admin()
            .await
            .get_snapshot(authed(pb::GetSnapshotRequest {
                key_id: key_id.into(),
            }))
            .await
            .expect("snapshot")
            .into_inner()
    }

    /// Spent and reserved of the key's first limit in `unit`.
    pub async fn key_usage(&self, key_id: &str, unit: pb::Unit) -> (u64, u64) {
        let snapshot = self.snapshot(key_id).await;
        let status = key_limit(&snapshot, unit).expect("a key limit in that unit");
        (
            status.spent.parse().unwrap(),
            status.reserved.parse().unwrap(),
        )
    }

    /// Every usage row matching `filter`, read in pages of 7 (so that paging
    /// is exercised too).
    pub async fn list_usage(
        &self,
        filter: pb::UsageFilter,
    ) -> Result<Vec<pb::UsageRow>, tonic::Status> {
        let mut admin = self.admin().await;
        let (mut rows, mut token) = (Vec::new(), String::new());
        loop {
            let page = admin
                .list_usage(authed(pb::ListUsageRequest {
                    filter: Some(filter.clone()),
                    page_size: 7,
                    page_token: token,
                }))
                .await?
                .into_inner();
            rows.extend(page.rows);
            if page.next_page_token.is_empty() {
                return Ok(rows);
            }
            token = page.next_page_token;
        }
    }

    /// `Admin.CheckUsage` for a key: the ledger against the usage rows.
    pub async fn check_usage(&self, key_id: &str) -> pb::CheckUsageResponse {
        self.admin()
            .await
            .check_usage(authed(pb::CheckUsageRequest {
                key_id: key_id.into(),
            }))
            .await
            .expect("check usage")
            .into_inner()
    }

    /// Adds `amount` credits to `account` (a purchase with `source` as its
    /// source id).
    pub async fn credit(&self, account: &str, amount: &str, source: &str) {
        self.admin()
            .await
            .credit(authed(pb::CreditRequest {
                account_id: account.into(),
                amount: amount.into(),
                source_id: source.into(),
                ..Default::default()
            }))
            .await
            .expect("credit");
    }

    /// Puts a tariff for [`MODEL`] in force since the epoch.
    pub async fn put_tariff(&self, purpose: pb::Purpose, window: &str, input: &str, output: &str) {
        self.admin()
            .await
            .put_tariff(authed(pb::PutTariffRequest {
                tariff: Some(pb::Tariff {
                    model: MODEL.into(),
                    purpose: purpose as i32,
                    completion_window: window.into(),
                    input_price: input.into(),
                    output_price: output.into(),
                    valid_from: Some(allot::clock::to_pb(0)),
                    ..Default::default()
                }),
            }))
            .await
            .expect("put tariff");
    }

    pub async fn chat(&self, secret: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.agent_url()))
            .bearer_auth(secret)
            .json(&body)
            .send()
            .await
            .expect("agent answers")
    }

    /// Stops the coordinator and waits until its store file is released.
    pub async fn stop_coordinator(&mut self) {
        self.coordinator_task.abort();
        let _ = (&mut self.coordinator_task).await;
    }

    /// Starts a coordinator again on the same address.
    pub async fn start_coordinator_again(&mut self, config: CoordinatorConfig) {
        let addr = self.coordinator_addr;
        let mut listener = None;
        wait_until(
            "the coordinator's port to be free",
            Duration::from_secs(10),
            || {
                let bound = std::net::TcpListener::bind(addr).ok();
                let ok = bound.is_some();
                if let Some(l) = bound {
                    l.set_nonblocking(true).unwrap();
                    listener = Some(l);
                }
                async move { ok }
            },
        )
        .await;
        let listener = TcpListener::from_std(listener.unwrap()).unwrap();
        // The old engine may still hold the store file for a moment.
        let mut store = None;
        let path = config.data_path.clone();
        wait_until(
            "the store file to be released",
            Duration::from_secs(10),
            || {
                store = allot_coordinator::store::embedded::EmbeddedStore::open(&path).ok();
                let ok = store.is_some();
                async move { ok }
            },
        )
        .await;
        let store: std::sync::Arc<dyn allot_coordinator::store::Store> =
            std::sync::Arc::new(store.unwrap());
        self.coordinator_task = tokio::spawn(allot_coordinator::run_with_store(
            config,
            store,
            listener,
            std::future::pending(),
        ));
        self.wait_for_coordinator().await;
    }

    pub async fn restart_agent(&mut self) {
        self.agent = Some(start_agent(self.agent_config.clone()).await);
        self.wait_for_agent().await;
    }
}

/// Waits until the agent at `agent_url` has a coordinator session
/// (`GET /readyz` answers 200).
pub async fn wait_agent_ready(agent_url: &str, deadline: Duration) {
    let url = format!("{agent_url}/readyz");
    let http = reqwest::Client::new();
    wait_until("an agent to connect to the coordinator", deadline, || {
        let (url, http) = (url.clone(), http.clone());
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
}

/// Usage records settled so far by the coordinator at `url`: the sum of
/// every agent's high-water mark.
pub async fn settled_records_at(url: &str) -> u64 {
    let Ok(admin) = pb::admin_client::AdminClient::connect(url.to_string()).await else {
        return 0;
    };
    settled_records_via(admin).await
}

/// Usage records settled so far by the coordinator behind `admin`.
pub async fn settled_records_via(mut admin: pb::admin_client::AdminClient<Channel>) -> u64 {
    match admin
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
    {
        Ok(agents) => agents
            .into_inner()
            .agents
            .iter()
            .map(|a| a.high_water_seq)
            .sum(),
        Err(_) => 0,
    }
}

/// Creates the account (if new) and a key with `limits` through the Admin
/// service at `url`; returns `(key_id, secret)`.
pub async fn key_with_limits_at(
    url: &str,
    account_id: &str,
    limits: Vec<pb::Limit>,
) -> (String, String) {
    let admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .expect("admin connects");
    key_with_limits_via(admin, account_id, limits).await
}

/// [`key_with_limits_at`] through a connected Admin client.
pub async fn key_with_limits_via(
    mut admin: pb::admin_client::AdminClient<Channel>,
    account_id: &str,
    limits: Vec<pb::Limit>,
) -> (String, String) {
    let _ = admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: account_id.into(),
            name: account_id.into(),
        }))
        .await;
    let created = admin
        .create_key(authed(pb::CreateKeyRequest {
            account_id: account_id.into(),
            ..Default::default()
        }))
        .await
        .expect("create key")
        .into_inner();
    let key_id = created.key.expect("key").key_id;
    admin
        .set_limits(authed(pb::SetLimitsRequest {
            scope: Some(pb::set_limits_request::Scope::KeyId(key_id.clone())),
            limits,
        }))
        .await
        .expect("set limits");
    (key_id, created.secret)
}

pub fn limit(unit: pb::Unit, amount: &str, window: pb::window::Kind) -> pb::Limit {
    pb::Limit {
        unit: unit as i32,
        amount: amount.into(),
        window: Some(pb::Window { kind: Some(window) }),
    }
}

pub fn balance() -> pb::window::Kind {
    pb::window::Kind::Balance(pb::BalanceWindow {})
}

pub fn rolling(seconds: u64) -> pb::window::Kind {
    pb::window::Kind::Rolling(pb::RollingWindow { seconds })
}

pub fn chat_body(max_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    })
}

/// A raw agent's `KeyLookup` of the key whose secret is `secret`: what an
/// agent sends when a client shows it the key, and what the coordinator
/// needs before it grants that agent a slice of the key.
pub fn key_lookup(secret: &str) -> pb::agent_message::Msg {
    pb::agent_message::Msg::KeyLookup(pb::KeyLookup {
        key_hash: allot::key::KeyHash::of_secret(secret).0.to_vec(),
    })
}

/// A raw agent's `AllowanceAsk` numbered `ask_id`: no need, a want of
/// `tokens`.
pub fn allowance_ask(ask_id: u64, key_id: &str, tokens: u64) -> pb::agent_message::Msg {
    pb::agent_message::Msg::Ask(pb::AllowanceAsk {
        ask_id,
        key_id: key_id.into(),
        need: Some(pb::Amounts::default()),
        want: Some(pb::Amounts {
            tokens: Some(tokens),
            ..Default::default()
        }),
    })
}

/// Opens an `AgentSession` at `url` as a raw agent: `hello`, then
/// `messages`; the sending side stays open until the returned stream is
/// dropped. `Err` when the coordinator refuses the call itself.
pub async fn raw_session(
    url: &str,
    hello: pb::Hello,
    messages: Vec<pb::agent_message::Msg>,
) -> Result<tonic::Streaming<pb::CoordinatorMessage>, tonic::Status> {
    let mut client = pb::agent_session_client::AgentSessionClient::connect(url.to_string())
        .await
        .expect("the coordinator accepts connections");
    let (tx, rx) = tokio::sync::mpsc::channel(messages.len() + 1);
    for msg in std::iter::once(pb::agent_message::Msg::Hello(hello)).chain(messages) {
        tx.send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("the channel has room for every message");
    }
    let inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The sender lives as long as the session: it closes with the stream.
    tokio::spawn(async move { tx.closed().await });
    Ok(inbound)
}

/// The `x-request-id` the agent answered with.
pub fn request_id_of(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string()
}

/// The data of every SSE event of `text` but `[DONE]`.
pub fn sse_events(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("each event is JSON"))
        .collect()
}

/// Every usage record of `key_id` settled so far.
pub async fn usage_records(stack: &Stack, key_id: &str) -> Vec<pb::UsageRecord> {
    stack
        .list_usage(pb::UsageFilter {
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .expect("list usage")
        .into_iter()
        .filter_map(|row| row.record)
        .collect()
}

/// The usage record of the request `request_id` of `key_id`, once settled.
pub async fn record_of(stack: &Stack, key_id: &str, request_id: &str) -> pb::UsageRecord {
    let find = |records: Vec<pb::UsageRecord>| {
        records
            .into_iter()
            .find(|record| record.request_id == request_id)
    };
    wait_until(
        &format!("request {request_id} to settle"),
        Duration::from_secs(30),
        || async { find(usage_records(stack, key_id).await).is_some() },
    )
    .await;
    find(usage_records(stack, key_id).await).expect("settled records stay")
}

/// The key's own first limit in `unit` in a snapshot.
pub fn key_limit(snapshot: &pb::Snapshot, unit: pb::Unit) -> Option<&pb::LimitStatus> {
    snapshot
        .limits
        .iter()
        .find(|l| l.scope == "key" && l.limit.as_ref().is_some_and(|x| x.unit == unit as i32))
}
