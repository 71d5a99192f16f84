//! Certificate rotation under load (issue 14): while clients keep sending
//! requests through an agent on mutual TLS, the coordinator's server
//! certificate is renewed on disk, the agent's client certificate is
//! renewed on disk and its old one expires, and the agent's session is
//! forced to reconnect once (the coordinator restarts). No request fails,
//! the renewed certificates are the ones in use afterwards, the agent's
//! session dropped exactly once, and every request's usage is settled.
//!
//! Sessions are counted by the coordinator's `allot_agent_sessions_total`,
//! scraped from the metrics recorder this test installs in its process
//! (one test per file: one recorder per process).

use allot::pb;
use allot_coordinator::certs::{Leaf, Validity};
use allot_e2e::tls::{CertFiles, TestPki};
use allot_e2e::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Concurrent clients for the whole test.
const CLIENTS: usize = 3;
/// Each client's pause between requests (pacing, not synchronisation).
const PACE: Duration = Duration::from_millis(20);
/// Lifetime of the agent certificate the session is first made with.
const SHORT_LIFETIME: Duration = Duration::from_secs(8);

/// What the clients saw.
#[derive(Default)]
struct Load {
    served: AtomicU64,
    tokens: AtomicU64,
    /// Every answer other than 200, with its body.
    failures: Mutex<Vec<String>>,
}

/// Starts `CLIENTS` clients sending chat completions through `agent_url`
/// until `stop` is set.
fn start_load(
    agent_url: &str,
    secret: &str,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let http = reqwest::Client::new();
    let tasks = (0..CLIENTS)
        .map(|_| {
            let (http, url, secret) = (
                http.clone(),
                format!("{agent_url}/v1/chat/completions"),
                secret.to_string(),
            );
            let (load, stop) = (load.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let sent = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&chat_body(8))
                        .send()
                        .await;
                    let response = match sent {
                        Ok(response) => response,
                        Err(error) => {
                            load.failures.lock().unwrap().push(format!("{error:?}"));
                            continue;
                        }
                    };
                    let status = response.status();
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    if status == 200 {
                        let tokens = body["usage"]["total_tokens"].as_u64().unwrap();
                        load.tokens.fetch_add(tokens, Ordering::Relaxed);
                        load.served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        load.failures
                            .lock()
                            .unwrap()
                            .push(format!("{status}: {body}"));
                    }
                    tokio::time::sleep(PACE).await;
                }
            })
        })
        .collect();
    (load, tasks)
}

/// Agent sessions the coordinator started so far (every coordinator in
/// this process).
async fn sessions_started(metrics: SocketAddr) -> u64 {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("allot_agent_sessions_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// Waits until the clients have been served `more` requests beyond now.
async fn served_more(load: &Load, more: u64) {
    let target = load.served.load(Ordering::Relaxed) + more;
    wait_until(
        "the clients to be served more requests",
        Duration::from_secs(60),
        || async { load.served.load(Ordering::Relaxed) >= target },
    )
    .await;
}

/// The leaf certificate a fresh TLS connection to `addr` is shown.
async fn served_certificate(pki: &TestPki, addr: SocketAddr) -> Vec<u8> {
    pki.served_certificate(addr)
        .await
        .expect("a TLS handshake with the coordinator")
}

/// Whether an Admin call presenting `identity` gets through: a client
/// certificate the coordinator does not accept fails the handshake.
async fn accepted(pki: &TestPki, url: &str, identity: &CertFiles) -> bool {
    let Ok(channel) = pki.endpoint(url, Some(identity)).connect().await else {
        return false;
    };
    pb::admin_client::AdminClient::new(channel)
        .list_accounts(authed(pb::ListAccountsRequest::default()))
        .await
        .is_ok()
}

/// Copies a certificate and key aside, as they are now.
fn keep_copy(files: &CertFiles, stem: &str) -> CertFiles {
    let dir = files.cert.parent().unwrap();
    let copy = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::copy(&files.cert, &copy.cert).unwrap();
    std::fs::copy(&files.key, &copy.key).unwrap();
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request_and_with_one_reconnect() {
    let metrics = allot_e2e::process::free_addr();
    allot_runtime::telemetry::install_metrics(metrics).unwrap();
    let mut stack = Stack::start_tls().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, "100000000", balance())],
        )
        .await;
    // The agent's session is made with a short-lived certificate.
    stack.agent.take().unwrap().stop().await;
    let pki = stack.pki.as_ref().unwrap();
    let short_lived = pki.issue(
        Leaf::Agent {
            agent_id: "agent-1".into(),
        },
        Validity::for_next(SHORT_LIFETIME),
    );
    let expires = tokio::time::Instant::now() + SHORT_LIFETIME;
    let old_agent = keep_copy(&short_lived, "old-agent-1");
    stack.restart_agent().await;
    let sessions = sessions_started(metrics).await;
    assert!(sessions >= 1, "the metric counts sessions: {sessions}");

    let stop = Arc::new(AtomicBool::new(false));
    let (load, clients) = start_load(&stack.agent_url(), &secret, stop.clone());
    served_more(&load, 20).await;

    // (a) The coordinator's certificate and key are renewed on disk; new
    // connections get it, the agent's session goes on.
    let pki = stack.pki.as_ref().unwrap();
    let addr = stack.coordinator_addr;
    let old_server = served_certificate(pki, addr).await;
    pki.node();
    wait_until(
        "new connections to get the renewed server certificate",
        Duration::from_secs(20),
        || async { served_certificate(pki, addr).await != old_server },
    )
    .await;
    let renewed_server = served_certificate(pki, addr).await;
    served_more(&load, 20).await;

    // (b) The agent's certificate is renewed on disk, and the one its
    // session was made with expires: the coordinator no longer accepts it,
    // and the session made with it goes on.
    let renewed_agent = pki.agent("agent-1");
    let after_expiry = expires + Duration::from_secs(1);
    wait_until(
        "the agent's old certificate to expire",
        SHORT_LIFETIME + Duration::from_secs(30),
        || async { tokio::time::Instant::now() >= after_expiry },
    )
    .await;
    let url = stack.coordinator_url.clone();
    assert!(
        !accepted(pki, &url, &old_agent).await,
        "an expired agent certificate is refused"
    );
    assert!(accepted(pki, &url, &renewed_agent).await);
    served_more(&load, 20).await;
    assert_eq!(
        sessions_started(metrics).await,
        sessions,
        "the agent's session survived both renewals"
    );

    // (c) The coordinator restarts: the agent reconnects once, and can
    // only do so with its renewed certificate.
    let config = Stack::tls_coordinator_config(&stack.dir, stack.pki.as_ref().unwrap());
    stack.stop_coordinator().await;
    stack.start_coordinator_again(config).await;
    wait_until(
        "the agent's session to be made again",
        Duration::from_secs(30),
        || async { sessions_started(metrics).await > sessions },
    )
    .await;
    stack.wait_for_agent().await;
    served_more(&load, 20).await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failures = load.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "every request got 200: {failures:?}");
    assert_eq!(
        sessions_started(metrics).await,
        sessions + 1,
        "the agent's session dropped exactly once"
    );
    let pki = stack.pki.as_ref().unwrap();
    assert_eq!(
        served_certificate(pki, stack.coordinator_addr).await,
        renewed_server
    );

    // Every request's usage is settled, once.
    let (served, tokens) = (
        load.served.load(Ordering::Relaxed),
        load.tokens.load(Ordering::Relaxed),
    );
    wait_until(
        "every request to settle",
        Duration::from_secs(30),
        || async {
            stack.settled_records().await == served
                && stack.key_usage(&key_id, pb::Unit::Tokens).await.0 == tokens
        },
    )
    .await;
    assert_eq!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0, tokens);
    assert!(served >= 80, "served {served}");
}
