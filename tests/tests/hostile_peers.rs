//! The coordinator against agents that send what no honest agent sends:
//! the engine can be neither crashed nor opened by a message, and if it
//! still dies the coordinator stops serving and exits non-zero instead of
//! answering "shutting down" forever while health says SERVING.

use allot::pb;
use allot_coordinator::config::CoordinatorConfig;
use allot_coordinator::store::BoxFuture;
use allot_coordinator::store::{Store, StoreError, StoreWrite, StoredState};
use allot_e2e::process::CoordinatorProcess;
use allot_e2e::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A raw session as `agent_id` (epoch 1), sending `messages`.
async fn session_as(
    url: &str,
    agent_id: &str,
    messages: Vec<pb::agent_message::Msg>,
) -> tonic::Streaming<pb::CoordinatorMessage> {
    let hello = pb::Hello {
        agent_id: agent_id.into(),
        epoch: 1,
        ..Default::default()
    };
    raw_session(url, hello, messages).await.unwrap()
}

/// The next message that is not Welcome, a tariff update or a key lookup's
/// result, or the status that ended the stream.
async fn next_answer(
    inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
) -> Result<pb::coordinator_message::Msg, tonic::Status> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), inbound.message())
            .await
            .expect("an answer in time")?;
        match message.and_then(|m| m.msg) {
            Some(pb::coordinator_message::Msg::Welcome(_))
            | Some(pb::coordinator_message::Msg::Tariffs(_))
            | Some(pb::coordinator_message::Msg::Key(_)) => continue,
            Some(msg) => return Ok(msg),
            None => return Err(tonic::Status::cancelled("the stream ended")),
        }
    }
}

fn ask(key_id: &str, tokens: u64) -> pb::agent_message::Msg {
    allowance_ask(7, key_id, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_for_u64_max_tokens_is_refused_naming_the_field_and_budgets_keep_working() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
        )
        .await;
    let mut inbound = session_as(
        &stack.coordinator_url,
        "hostile-agent",
        vec![ask(&key_id, u64::MAX)],
    )
    .await;
    let status = next_answer(&mut inbound)
        .await
        .expect_err("the session ends");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("ask.want.tokens") && status.message().contains("too large"),
        "{}",
        status.message()
    );

    // The largest ask the wire admits, on the largest cap Admin admits, is
    // granted (its sizing once multiplied cap × ask, out of Decimal's range).
    let mut inbound = session_as(
        &stack.coordinator_url,
        "big-agent",
        vec![key_lookup(&secret), ask(&key_id, 1_000_000_000_000_000)],
    )
    .await;
    match next_answer(&mut inbound).await.expect("an answer") {
        pb::coordinator_message::Msg::Grant(grant) => {
            let tokens = grant.amount.and_then(|a| a.tokens).expect("tokens");
            assert!(tokens > 0 && tokens <= 1_000_000_000_000_000, "{tokens}");
        }
        other => panic!("expected a grant, got {other:?}"),
    }

    // The engine is alive: Admin still changes budgets.
    let mut admin = stack.admin().await;
    admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "after".into(),
            name: "after".into(),
        }))
        .await
        .expect("admin works after the hostile asks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_with_absurd_token_counts_is_charged_at_the_bound_without_wrapping() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, "100000000000000", balance())],
        )
        .await;
    let record = |seq| pb::UsageRecord {
        seq,
        key_id: key_id.clone(),
        model_requested: MODEL.into(),
        prompt_tokens: u64::MAX,
        completion_tokens: u64::MAX,
        charged: true,
        ..Default::default()
    };
    // The agent holds a slice of the key: usage counts only for those.
    let mut inbound = session_as(
        &stack.coordinator_url,
        "wrapping-agent",
        vec![
            key_lookup(&secret),
            ask(&key_id, 1_000),
            usage(vec![record(1), record(2)]),
        ],
    )
    .await;
    assert_eq!(grants_then_ack(&mut inbound, 1).await, 2);
    // Two records of 2 × 10^12 tokens each: never a wrapped, small sum.
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert_eq!(spent, 4_000_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_record_with_an_unknown_purpose_is_refused_not_priced_as_realtime() {
    let stack = Stack::start().await;
    let (key_id, _) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000", balance())])
        .await;
    let mut inbound = session_as(
        &stack.coordinator_url,
        "odd-agent",
        vec![pb::agent_message::Msg::Usage(pb::UsageBatch {
            records: vec![pb::UsageRecord {
                seq: 1,
                key_id: key_id.clone(),
                purpose: 42,
                prompt_tokens: 5,
                charged: true,
                ..Default::default()
            }],
        })],
    )
    .await;
    let status = next_answer(&mut inbound).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("usage.records[0].purpose"),
        "{}",
        status.message()
    );
}

/// The embedded store, until `poisoned`: then a commit panics, as a bug in
/// the engine's path would.
struct PanickingStore {
    inner: allot_coordinator::store::embedded::EmbeddedStore,
    poisoned: AtomicBool,
}

impl Store for PanickingStore {
    fn load(&self) -> BoxFuture<'_, Result<StoredState, StoreError>> {
        self.inner.load()
    }

    fn commit(&self, writes: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>> {
        if self.poisoned.load(Ordering::SeqCst) {
            panic!("injected engine failure");
        }
        self.inner.commit(writes)
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        self.inner.ping()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_turns_health_not_serving_and_the_coordinator_exits_with_an_error() {
    let dir = TempDir::new("panic");
    let config = CoordinatorConfig {
        insecure: true,
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        ..Default::default()
    };
    let store = Arc::new(PanickingStore {
        inner: allot_coordinator::store::embedded::EmbeddedStore::open(&config.data_path).unwrap(),
        poisoned: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let run = tokio::spawn(allot_coordinator::run_with_store(
        config,
        store.clone(),
        listener,
        std::future::pending(),
    ));
    let health = |url: String| async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: "allot.v1.Admin".into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    };
    wait_until("the coordinator serves", Duration::from_secs(30), || {
        let url = url.clone();
        async move { health(url).await == Some(1) }
    })
    .await;

    store.poisoned.store(true, Ordering::SeqCst);
    let mut admin = pb::admin_client::AdminClient::connect(url.clone())
        .await
        .unwrap();
    let refused = admin
        .create_account(authed(pb::CreateAccountRequest {
            account_id: "doomed".into(),
            name: "doomed".into(),
        }))
        .await;
    assert!(refused.is_err(), "a call whose commit panicked fails");

    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the coordinator stops by itself")
        .expect("no panic escapes run");
    let error = outcome.expect_err("a dead engine is an error exit");
    assert!(
        error.to_string().contains("injected engine failure"),
        "{error}"
    );
    // Nothing answers SERVING once it stopped.
    assert_ne!(health(url).await, Some(1));
}

async fn fleet_endpoints(url: &str) -> Vec<String> {
    let mut client = pb::placement_client::PlacementClient::connect(url.to_string())
        .await
        .unwrap();
    client
        .fleet(authed(pb::FleetRequest {}))
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.endpoint)
        .collect()
}

/// A Hello naming `neuron_id`, then `status`: how the session ended.
async fn report_as(url: &str, neuron_id: &str, status: pb::NodeStatus) -> tonic::Status {
    let hello = pb::Hello {
        agent_id: "reporter".into(),
        epoch: 1,
        neuron_id: neuron_id.into(),
    };
    match raw_session(url, hello, vec![pb::agent_message::Msg::NodeStatus(status)]).await {
        Ok(mut inbound) => next_answer(&mut inbound)
            .await
            .expect_err("the session ends"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_only_its_own_neuron_and_bounded_reports() {
    let stack = Stack::start().await;
    // Another agent's neuron, pointing clients at an attacker.
    let status = report_as(
        &stack.coordinator_url,
        "my-neuron",
        pb::NodeStatus {
            neuron_id: "neuron-1".into(),
            endpoint: "http://attacker.example:443".into(),
            healthy: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("node_status.neuron_id"),
        "{}",
        status.message()
    );
    // A report of 24 MB is refused before it is decoded.
    let huge = pb::NodeStatus {
        neuron_id: "my-neuron".into(),
        endpoint: "http://127.0.0.1:1".into(),
        models: (0..100_000)
            .map(|i| pb::ModelState {
                model: format!("model-{i}-{}", "x".repeat(220)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let status = report_as(&stack.coordinator_url, "my-neuron", huge).await;
    assert_ne!(status.code(), tonic::Code::Ok);
    // Neither reached the fleet view.
    let endpoints = fleet_endpoints(&stack.coordinator_url).await;
    assert!(
        endpoints
            .iter()
            .all(|e| !e.contains("attacker") && !e.contains("127.0.0.1:1")),
        "{endpoints:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_cannot_jump_an_agents_epoch_to_lock_it_out() {
    let stack = Stack::start().await;
    stack.wait_for_agent().await;
    let hello = pb::Hello {
        agent_id: "agent-1".into(),
        epoch: u64::MAX,
        neuron_id: "neuron-1".into(),
    };
    let mut inbound = raw_session(&stack.coordinator_url, hello, vec![])
        .await
        .unwrap();
    let status = next_answer(&mut inbound).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("hello.epoch"),
        "{}",
        status.message()
    );
    // The real agent still serves, and comes back after a restart.
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    let mut stack = stack;
    stack.restart_agent().await;
    stack.wait_for_agent().await;
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_reported_for_a_key_the_agent_holds_nothing_of_is_ignored() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let in_flight = pb::agent_message::Msg::InFlight(pb::InFlight {
        keys: vec![pb::SliceReport {
            key_id: key_id.clone(),
            held: Some(pb::Amounts {
                tokens: Some(500),
                ..Default::default()
            }),
        }],
    });
    // The report comes before the agent holds any slice of the key; the
    // ask after it is answered only once the report was handled.
    let mut inbound = session_as(
        &stack.coordinator_url,
        "boasting-agent",
        vec![in_flight, key_lookup(&secret), ask(&key_id, 1_000)],
    )
    .await;
    match next_answer(&mut inbound).await.expect("an answer") {
        pb::coordinator_message::Msg::Grant(_) => {}
        other => panic!("expected a grant, got {other:?}"),
    }
    let snapshot = stack.snapshot(&key_id).await;
    let tokens = snapshot
        .limits
        .iter()
        .find(|l| {
            l.limit
                .as_ref()
                .is_some_and(|x| x.unit == pb::Unit::Tokens as i32)
        })
        .unwrap();
    assert_eq!(tokens.in_flight, "0", "{tokens:?}");
    assert_ne!(tokens.held, "0", "the grant is held");
}

/// A charged usage record of `tokens` prompt tokens for `key_id`.
fn charged(seq: u64, key_id: &str, tokens: u64) -> pb::UsageRecord {
    pb::UsageRecord {
        seq,
        key_id: key_id.into(),
        model_requested: MODEL.into(),
        prompt_tokens: tokens,
        charged: true,
        ..Default::default()
    }
}

fn usage(records: Vec<pb::UsageRecord>) -> pb::agent_message::Msg {
    pb::agent_message::Msg::Usage(pb::UsageBatch { records })
}

/// Gives back `tokens` of the agent's slice of `key_id` (all of it when
/// `tokens` is at least what was granted).
fn give_back(key_id: &str, tokens: u64) -> pb::agent_message::Msg {
    pb::agent_message::Msg::GiveBack(pb::Return {
        key_id: key_id.into(),
        amount: Some(pb::Amounts {
            tokens: Some(tokens),
            ..Default::default()
        }),
    })
}

/// Spent and held tokens of the key's own token limit, through the Admin
/// service at `url`.
async fn tokens_at(url: &str, key_id: &str) -> (u64, u64) {
    let snapshot = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .expect("admin connects")
        .get_snapshot(authed(pb::GetSnapshotRequest {
            key_id: key_id.into(),
        }))
        .await
        .expect("snapshot")
        .into_inner();
    let limit = key_limit(&snapshot, pb::Unit::Tokens).expect("a key token limit");
    (limit.spent.parse().unwrap(), limit.held.parse().unwrap())
}

/// Reads answers until the usage acknowledgement, expecting `grants` grants
/// before it; returns its high-water mark.
async fn grants_then_ack(
    inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
    grants: usize,
) -> u64 {
    for _ in 0..grants {
        match next_answer(inbound).await.expect("an answer") {
            pb::coordinator_message::Msg::Grant(_) => {}
            other => panic!("expected a grant, got {other:?}"),
        }
    }
    match next_answer(inbound).await.expect("an answer") {
        pb::coordinator_message::Msg::UsageAck(ack) => ack.high_water_seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_charge_or_hold_a_key_it_was_never_granted_a_slice_of() {
    let stack = Stack::start().await;
    let url = stack.coordinator_url.clone();
    let (victim, _) = stack
        .key_with_limits("victim", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let (own, own_secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    // A reconcile claiming a slice of the victim's key, a grant of its own
    // key, then usage: 90,000 tokens on the victim's key between two
    // honest records of its own.
    let claim = pb::agent_message::Msg::Reconcile(pb::Reconcile {
        slices: vec![pb::SliceReport {
            key_id: victim.clone(),
            held: Some(pb::Amounts {
                tokens: Some(90_000),
                ..Default::default()
            }),
        }],
    });
    let mut inbound = session_as(
        &url,
        "hostile-agent",
        vec![
            claim,
            key_lookup(&own_secret),
            ask(&own, 1_000),
            usage(vec![
                charged(1, &own, 10),
                charged(2, &victim, 90_000),
                charged(3, &own, 20),
            ]),
        ],
    )
    .await;
    assert_eq!(
        grants_then_ack(&mut inbound, 1).await,
        3,
        "the refused record is acknowledged: the agent's stream goes on"
    );
    assert_eq!(
        tokens_at(&url, &victim).await,
        (0, 0),
        "nothing charged to, nor held of, the victim's key"
    );
    assert_eq!(tokens_at(&url, &own).await.0, 30, "its own key is charged");
    // A later batch of the same agent for its own key is charged too.
    drop(inbound);
    let hello = pb::Hello {
        agent_id: "hostile-agent".into(),
        epoch: 2,
        ..Default::default()
    };
    let mut inbound = raw_session(&url, hello, vec![usage(vec![charged(4, &own, 5)])])
        .await
        .unwrap();
    assert_eq!(grants_then_ack(&mut inbound, 0).await, 4);
    assert_eq!(tokens_at(&url, &own).await.0, 35);
    assert_eq!(tokens_at(&url, &victim).await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_knows_only_a_keys_id_is_granted_nothing_of_it() {
    let stack = Stack::start().await;
    let url = stack.coordinator_url.clone();
    let (victim, victim_secret) = stack
        .key_with_limits("victim", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    // The key id alone (it appears in logs, usage rows and headers) is not
    // the key: the ask is refused, then charged usage is refused too.
    let mut inbound = session_as(
        &url,
        "guessing-agent",
        vec![
            ask(&victim, 90_000),
            usage(vec![charged(1, &victim, 90_000)]),
        ],
    )
    .await;
    match next_answer(&mut inbound).await.expect("an answer") {
        pb::coordinator_message::Msg::Deny(deny) => {
            assert_eq!(deny.reason, pb::DenyReason::UnknownKey as i32);
            assert!(deny.message.contains("key_id"), "{}", deny.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(grants_then_ack(&mut inbound, 0).await, 1);
    assert_eq!(tokens_at(&url, &victim).await, (0, 0));
    // An agent a client showed the key to (it looked it up by the secret's
    // hash) is granted a slice.
    let mut inbound = session_as(
        &url,
        "honest-agent",
        vec![key_lookup(&victim_secret), ask(&victim, 1_000)],
    )
    .await;
    match next_answer(&mut inbound).await.expect("an answer") {
        pb::coordinator_message::Msg::Grant(_) => {}
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_arriving_after_its_slice_was_given_back_is_still_charged() {
    let stack = Stack::start().await;
    let url = stack.coordinator_url.clone();
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    // Messages are handled in order: the slice is gone before the usage
    // of a request admitted under it arrives.
    let mut inbound = session_as(
        &url,
        "late-agent",
        vec![
            key_lookup(&secret),
            ask(&key_id, 1_000),
            give_back(&key_id, 1_000_000),
            usage(vec![charged(1, &key_id, 40)]),
        ],
    )
    .await;
    assert_eq!(grants_then_ack(&mut inbound, 1).await, 1);
    assert_eq!(tokens_at(&url, &key_id).await, (40, 0));
}

/// Looks up the key `key_id` (by its `secret`), asks for a slice of it as
/// `agent_id` and gives all of it back, so that only the key history
/// remembers it.
async fn hold_then_give_back(url: &str, agent_id: &str, key_id: &str, secret: &str) {
    let mut inbound = session_as(
        url,
        agent_id,
        vec![
            key_lookup(secret),
            ask(key_id, 1_000),
            give_back(key_id, 1_000_000),
            // An empty batch: its acknowledgement says the give-back was
            // handled (and committed with it).
            usage(vec![]),
        ],
    )
    .await;
    assert_eq!(grants_then_ack(&mut inbound, 1).await, 0);
    assert_eq!(
        tokens_at(url, key_id).await,
        (0, 0),
        "nothing held any more"
    );
}

/// Sends a late record for `key_id` as `agent_id` on a new session.
async fn late_record(url: &str, agent_id: &str, key_id: &str, tokens: u64) {
    let hello = pb::Hello {
        agent_id: agent_id.into(),
        epoch: 2,
        ..Default::default()
    };
    let mut inbound = raw_session(url, hello, vec![usage(vec![charged(1, key_id, tokens)])])
        .await
        .unwrap();
    assert_eq!(grants_then_ack(&mut inbound, 0).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_history_survives_a_restart_of_the_embedded_coordinator() {
    let dir = TempDir::new("key-history");
    let config = CoordinatorConfig {
        insecure: true,
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        ..Default::default()
    };
    let mut stack = Stack::start_with(config.clone()).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    hold_then_give_back(&stack.coordinator_url, "late-agent", &key_id, &secret).await;
    stack.stop_coordinator().await;
    stack.start_coordinator_again(config).await;
    late_record(&stack.coordinator_url, "late-agent", &key_id, 40).await;
    assert_eq!(tokens_at(&stack.coordinator_url, &key_id).await.0, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_history_survives_a_coordinator_restart_on_etcd() {
    let cluster = allot_e2e::etcd::EtcdCluster::start(1).await;
    let dir = TempDir::new("key-history-etcd");
    let leading = |url: String| async move {
        let Ok(mut admin) = pb::admin_client::AdminClient::connect(url).await else {
            return false;
        };
        admin
            .list_accounts(authed(pb::ListAccountsRequest::default()))
            .await
            .is_ok()
    };
    let mut first = CoordinatorProcess::spawn("c1", &cluster.endpoints(), &dir.0, &[]);
    wait_until("c1 to lead", Duration::from_secs(60), || {
        leading(first.url.clone())
    })
    .await;
    let (key_id, secret) = key_with_limits_at(
        &first.url,
        "acme",
        vec![limit(pb::Unit::Tokens, "100000", balance())],
    )
    .await;
    hold_then_give_back(&first.url, "late-agent", &key_id, &secret).await;
    first.kill();
    let second = CoordinatorProcess::spawn("c2", &cluster.endpoints(), &dir.0, &[]);
    wait_until("c2 to lead", Duration::from_secs(60), || {
        leading(second.url.clone())
    })
    .await;
    late_record(&second.url, "late-agent", &key_id, 40).await;
    assert_eq!(tokens_at(&second.url, &key_id).await.0, 40);
    // And a stranger's record for the same key is still refused there.
    let hello = pb::Hello {
        agent_id: "stranger".into(),
        epoch: 1,
        ..Default::default()
    };
    let mut inbound = raw_session(
        &second.url,
        hello,
        vec![usage(vec![charged(1, &key_id, 50)])],
    )
    .await
    .unwrap();
    assert_eq!(grants_then_ack(&mut inbound, 0).await, 1);
    assert_eq!(tokens_at(&second.url, &key_id).await.0, 40);
}
