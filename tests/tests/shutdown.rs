//! SIGTERM against real coordinator processes (issue 13): with agents
//! connected, a coordinator ends their sessions and exits within its
//! shutdown grace, and a leader gives up its etcd leadership on the way
//! out, so a standby takes over long before the election TTL.

use allot::pb;
use allot_e2e::etcd::EtcdCluster;
use allot_e2e::process::{free_addr, CoordinatorProcess, ServiceProcess};
use allot_e2e::*;
use std::time::{Duration, Instant};

/// An agent (in this process) beside a fake neuron, on `coordinators`,
/// ready: its session with a coordinator is up.
async fn connected_agent(coordinators: Vec<String>, dir: &TempDir) -> RunningAgent {
    let (_neuron, neuron_url) = start_neuron(&[MODEL], "n1", Default::default()).await;
    let agent = start_agent(allot_agent::config::AgentConfig {
        insecure: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        coordinators,
        neuron_url,
        spool_dir: dir.0.join("agent"),
        ..Default::default()
    })
    .await;
    wait_agent_ready(&agent.url, Duration::from_secs(60)).await;
    agent
}

async fn answers_admin(url: &str) -> bool {
    let Ok(mut admin) = pb::admin_client::AdminClient::connect(url.to_string()).await else {
        return false;
    };
    admin
        .list_accounts(authed(pb::ListAccountsRequest::default()))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_a_connected_agent_exits_within_its_grace_after_sigterm() {
    let dir = TempDir::new("sigterm");
    let addr = free_addr();
    let url = format!("http://{addr}");
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--metrics-listen",
        "off",
        "--insecure",
        "--admin-token",
        ADMIN_TOKEN,
        "--data-path",
        &dir.0.join("coordinator.redb").display().to_string(),
        "--shutdown-grace-ms",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut coordinator = ServiceProcess::spawn(
        "allot-coordinator",
        &args,
        &[("RUST_LOG", "info,h2=warn,tower=warn".into())],
        dir.0.join("coordinator.log"),
    );
    wait_until("the coordinator to answer", Duration::from_secs(30), || {
        answers_admin(&url)
    })
    .await;
    let agent = connected_agent(vec![url.clone()], &dir).await;

    let asked = Instant::now();
    let status =
        tokio::task::block_in_place(|| coordinator.terminate_within(Duration::from_secs(6)));
    let log = std::fs::read_to_string(dir.0.join("coordinator.log")).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("still running 6 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status}:\n{log}");
    assert!(asked.elapsed() < Duration::from_secs(6));
    // The agent saw its session end.
    let ready = format!("{}/readyz", agent.url);
    wait_until(
        "the agent to see the session end",
        Duration::from_secs(10),
        || {
            let ready = ready.clone();
            async move { reqwest::get(ready).await.is_ok_and(|r| r.status() == 503) }
        },
    )
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_resigns_and_a_standby_leads_long_before_the_ttl() {
    let cluster = EtcdCluster::start(1).await;
    let dir = TempDir::new("resign");
    // A leader that vanished without resigning would block fail-over for
    // the whole TTL.
    let ttl_ms = 9_000;
    let extra = ["--election-ttl-ms", "9000", "--shutdown-grace-ms", "2000"];
    let mut coordinators = [
        CoordinatorProcess::spawn("c1", &cluster.endpoints(), &dir.0, &extra),
        CoordinatorProcess::spawn("c2", &cluster.endpoints(), &dir.0, &extra),
    ];
    let urls: Vec<String> = coordinators.iter().map(|c| c.url.clone()).collect();
    wait_until("a coordinator to lead", Duration::from_secs(60), || {
        let urls = urls.clone();
        async move {
            for url in &urls {
                if answers_admin(url).await {
                    return true;
                }
            }
            false
        }
    })
    .await;
    let leader = if answers_admin(&urls[0]).await { 0 } else { 1 };
    let standby_url = urls[1 - leader].clone();
    assert!(!answers_admin(&standby_url).await, "one leader");
    let agent = connected_agent(urls.clone(), &dir).await;

    let asked = Instant::now();
    coordinators[leader].terminate();
    let status =
        tokio::task::block_in_place(|| coordinators[leader].wait_exit(Duration::from_secs(6)));
    let log = std::fs::read_to_string(dir.0.join(format!("{}.log", coordinators[leader].node_id)))
        .unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("still running 6 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status}:\n{log}");
    wait_until(
        "the standby to lead",
        Duration::from_millis(ttl_ms * 3 / 4),
        || answers_admin(&standby_url),
    )
    .await;
    assert!(
        asked.elapsed() < Duration::from_millis(ttl_ms),
        "took over after {:?}",
        asked.elapsed()
    );
    // The agent follows to the new leader.
    wait_agent_ready(&agent.url, Duration::from_secs(30)).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_idle_half_open_and_trickling_clients_exits_within_its_grace_after_sigterm() {
    let stack = Stack::start().await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let dir = TempDir::new("agent-sigterm");
    let addr = free_addr();
    let url = format!("http://{addr}");
    let args: Vec<String> = [
        "--listen",
        &addr.to_string(),
        "--metrics-listen",
        "off",
        "--insecure",
        "--coordinators",
        &stack.coordinator_url,
        "--agent-id",
        "agent-2",
        "--neuron-url",
        &stack.neuron_url,
        "--spool-dir",
        &dir.0.join("spool").display().to_string(),
        "--shutdown-grace-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = ServiceProcess::spawn(
        "allot-agent",
        &args,
        &[("RUST_LOG", "info".into())],
        dir.0.join("agent.log"),
    );
    wait_agent_ready(&url, Duration::from_secs(30)).await;
    use tokio::io::AsyncWriteExt;
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: ag")
        .await
        .unwrap();
    let mut h2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A body that never completes: a request in flight all along.
    let mut trickling = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    trickling.write_all(head.as_bytes()).await.unwrap();

    let asked = Instant::now();
    let status = tokio::task::block_in_place(|| agent.terminate_within(Duration::from_secs(10)));
    let log = std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status}:\n{log}");
    assert!(asked.elapsed() < Duration::from_secs(10));
    drop((silent, half, h2, trickling));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_coordinator_tells_health_watchers_not_serving_first() {
    let dir = TempDir::new("drain-health");
    let config = allot_coordinator::config::CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        insecure: true,
        // The health watch below is an open call: the drain waits for it.
        shutdown_grace_ms: 1_000,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(allot_coordinator::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Ok(channel) = channel.connect().await {
                break channel;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the coordinator accepts connections");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    // The service is known to health once its first status is reported.
    let mut watch = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let request = tonic_health::pb::HealthCheckRequest {
                service: "allot.v1.Admin".into(),
            };
            if let Ok(watch) = health.watch(request).await {
                break watch.into_inner();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("health knows the service");
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    loop {
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
            .await
            .expect("a status in time")
            .unwrap()
            .expect("the watch stays open")
            .status;
        if status == serving {
            break;
        }
    }
    stop.send(()).unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
        .await
        .expect("a status before the server goes");
    let status = next.ok().flatten().map(|m| m.status);
    assert_eq!(
        status,
        Some(not_serving),
        "NOT_SERVING before the drain ends"
    );
    tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the coordinator stops within its grace")
        .unwrap()
        .unwrap();
}
