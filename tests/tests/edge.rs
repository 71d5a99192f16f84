//! The agent's HTTP edge against hostile clients (issue 13): connections
//! that send nothing, half a header or a trickle of body are closed or
//! refused in bounded time, hold no concurrency slot, and a flood of idle
//! sockets never keeps a real request from being served.

use allot::pb;
use allot_e2e::*;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A stack whose agent runs with `configure` applied.
async fn stack_with(configure: impl FnOnce(&mut allot_agent::config::AgentConfig)) -> Stack {
    let mut stack = Stack::start().await;
    configure(&mut stack.agent_config);
    stack.agent.take().unwrap().stop().await;
    stack.restart_agent().await;
    stack
}

fn agent_addr(stack: &Stack) -> std::net::SocketAddr {
    stack.agent.as_ref().expect("agent running").addr
}

/// Reads until the peer closes; what it sent. Panics if it is still open
/// after `deadline`.
async fn read_until_closed(tcp: &mut TcpStream, deadline: Duration, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(deadline, async {
        let mut buffer = [0u8; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: still open after {deadline:?}");
    received
}

/// Sends a request head with `Expect: 100-continue` and waits for the
/// agent's `100 Continue`: hyper sends it once the handler starts reading
/// the body, so the request is then surely in flight.
async fn head_in_flight(tcp: &mut TcpStream, head: &str) {
    let head = head.replacen("\r\n", "\r\nExpect: 100-continue\r\n", 1);
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !received.ends_with(b"\r\n\r\n") {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(
        read.is_ok() && text.starts_with("HTTP/1.1 100"),
        "100 Continue: {text}"
    );
}

/// A chat request head for a body of `length` bytes.
fn chat_head(secret: &str, length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// The JSON body of a raw HTTP/1.1 response.
fn json_body(response: &[u8]) -> Value {
    let text = String::from_utf8_lossy(response);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_or_half_a_header_are_closed_within_the_header_timeout() {
    let stack = stack_with(|c| {
        c.header_read_timeout_ms = 500;
        c.connection_idle_timeout_ms = 700;
    })
    .await;
    let addr = agent_addr(&stack);
    let deadline = Duration::from_secs(5);

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let received = read_until_closed(&mut silent, deadline, "a silent connection").await;
    assert!(received.is_empty());

    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: ag")
        .await
        .unwrap();
    read_until_closed(&mut half, deadline, "half a header line").await;

    // HTTP/2 with prior knowledge: the preface, then nothing.
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    read_until_closed(&mut h2, deadline, "an HTTP/2 connection with no stream").await;

    // A keep-alive connection after its request: closed once idle.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let received = read_until_closed(&mut kept, deadline, "an idle keep-alive connection").await;
    assert!(
        String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"),
        "it was served first: {}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_never_holds_a_concurrency_slot() {
    let stack = stack_with(|c| {
        c.max_concurrent_requests = 1;
        c.body_read_timeout_ms = 2_000;
    })
    .await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let body = serde_json::to_vec(&chat_body(5)).unwrap();
    let length = body.len();
    let mut slow = TcpStream::connect(agent_addr(&stack)).await.unwrap();
    head_in_flight(&mut slow, &chat_head(&secret, body.len())).await;
    let (mut reader, mut writer) = slow.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let trickle = {
        let sent = sent.clone();
        tokio::spawn(async move {
            // One byte every 100 ms: the whole body would take minutes.
            for byte in body {
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait_until(
        "the slow client to be sending its body",
        Duration::from_secs(5),
        || async { sent.load(Ordering::SeqCst) >= 3 },
    )
    .await;
    // The agent's only slot is free: normal requests are served meanwhile.
    for _ in 0..3 {
        let response = stack.chat(&secret, chat_body(5)).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut response));
    assert!(read.await.is_ok(), "the slow request is answered");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = json_body(&response);
    assert_eq!(body["error"]["code"], "request_body_timeout", "{text}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        sent.load(Ordering::SeqCst) < length,
        "answered long before the body was in"
    );
    trickle.abort();
}

/// `GET /healthz` on a new connection: its status line, or the refusal.
async fn probe(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await;
    read_until_closed(&mut tcp, Duration::from_secs(5), "a probe").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_max_connections_never_starve_real_requests() {
    let stack = stack_with(|c| {
        c.max_connections = 4;
        // Only the bound closes the idle sockets here.
        c.header_read_timeout_ms = 60_000;
        c.body_read_timeout_ms = 60_000;
    })
    .await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let addr = agent_addr(&stack);
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // A real request on a new connection is served at once: the oldest
    // idle sockets make room.
    let served = tokio::time::timeout(Duration::from_secs(5), stack.chat(&secret, chat_body(5)))
        .await
        .expect("served while idle sockets flood the agent");
    assert_eq!(served.status(), 200);
    let mut closed = 0;
    for tcp in &mut idle[..9] {
        read_until_closed(tcp, Duration::from_secs(5), "an evicted idle socket").await;
        closed += 1;
    }
    assert_eq!(closed, 9);
    drop(idle);

    // Four connections each with a request in flight (headers in, body
    // pending): nothing can be evicted, so a newcomer is refused cleanly.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        head_in_flight(&mut tcp, &chat_head(&secret, 100)).await;
        busy.push(tcp);
    }
    let refusal = probe(addr).await;
    assert!(
        refusal.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&refusal)
    );
    let body = json_body(&refusal);
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(String::from_utf8_lossy(&refusal)
        .to_ascii_lowercase()
        .contains("retry-after: 1"));

    // Once they are gone, real requests are served again, promptly.
    drop(busy);
    wait_until(
        "a real request to be served once the busy sockets closed",
        Duration::from_secs(5),
        || async {
            let response = stack
                .http
                .post(format!("{}/v1/chat/completions", stack.agent_url()))
                .bearer_auth(&secret)
                .json(&chat_body(5))
                .send()
                .await;
            response.is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}
