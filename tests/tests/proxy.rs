//! The agent as a production proxy (issue 8): every OpenAI path settles what
//! the neuron reported, streams pass chunk by chunk, a client that leaves
//! cancels the neuron, timeouts and concurrency bounds answer with the
//! right status and leave nothing in flight, other paths are refused or
//! passed through, and models are routed to their discovered endpoint.

use allot::pb;
use allot::reservation::{self, Operation, ReservationPolicy};
use allot_e2e::*;
use allot_fake_neuron::Behavior;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

async fn post(stack: &Stack, secret: &str, path: &str, body: &Value) -> reqwest::Response {
    stack
        .http
        .post(format!("{}{path}", stack.agent_url()))
        .bearer_auth(secret)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn spent_tokens(stack: &Stack, key_id: &str) -> u64 {
    stack.key_usage(key_id, pb::Unit::Tokens).await.0
}

async fn wait_spent(stack: &Stack, key_id: &str, expected: u64, what: &str) {
    wait_until(what, Duration::from_secs(30), || async {
        spent_tokens(stack, key_id).await == expected
    })
    .await;
}

async fn wait_settled(stack: &Stack, records: u64, what: &str) {
    wait_until(what, Duration::from_secs(30), || async {
        stack.settled_records().await == records
    })
    .await;
}

/// Total tokens in a usage object of either shape.
fn total(usage: &Value) -> u64 {
    usage["total_tokens"].as_u64().unwrap_or_else(|| {
        usage["prompt_tokens"].as_u64().unwrap_or(0)
            + usage["completion_tokens"].as_u64().unwrap_or(0)
    })
}

/// The data of every SSE event.
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("each event is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_plain_and_streamed_settles_exactly_what_the_neuron_reported() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let messages = json!([{"role": "user", "content": "hello there friend"}]);
    let cases: Vec<(&str, Value)> = vec![
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": messages, "max_tokens": 5}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": messages, "max_tokens": 5,
            "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "say hi", "max_tokens": 4}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "say hi", "max_tokens": 4,
            "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["one two three", "four"]}),
        ),
        (
            "/v1/responses",
            json!({"model": MODEL, "input": "hello there", "instructions": "be brief",
            "max_output_tokens": 6}),
        ),
        (
            "/v1/responses",
            json!({"model": MODEL, "input": "hello there", "max_output_tokens": 20,
            "stream": true}),
        ),
    ];
    let mut expected = 0;
    let mut totals = Vec::new();
    for (path, body) in cases {
        let response = post(&stack, &secret, path, &body).await;
        assert_eq!(response.status(), 200, "{path} {body}");
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let text = response.text().await.unwrap();
        let usage = if body["stream"] == true {
            let events = events(&text);
            let last = events.last().expect("events");
            if path == "/v1/responses" {
                assert_eq!(last["type"], "response.completed", "{text}");
                last["response"]["usage"].clone()
            } else {
                assert!(events.len() > 2, "chunk by chunk: {text}");
                last["usage"].clone()
            }
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        };
        assert!(total(&usage) > 0, "{path}: {text}");
        expected += total(&usage);
        totals.push(total(&usage));
        wait_spent(
            &stack,
            &key_id,
            expected,
            &format!("{path} to settle its usage"),
        )
        .await;
        // The request id reached the neuron.
        let seen = stack.neuron.last_request().unwrap();
        assert_eq!(seen.header("x-request-id"), Some(request_id.as_str()));
    }
    // Embeddings generate nothing: the body went through without a bound.
    assert_eq!(stack.neuron.hits(), 7);

    // A stream whose client did not ask for usage: same charge, and the
    // usage chunk never reaches the client.
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 5, "stream": true});
    let text = post(&stack, &secret, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"usage\":{"), "{text}");
    let forwarded = stack.neuron.last_request().unwrap().body;
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    expected += totals[1]; // as the same stream with usage reported above
    wait_spent(&stack, &key_id, expected, "the stripped stream to settle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bounds_are_added_in_the_field_each_path_reads() {
    let stack = Stack::start().await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let response = post(
        &stack,
        &secret,
        "/v1/responses",
        &json!({"model": MODEL, "input": "hi"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let forwarded = stack.neuron.last_request().unwrap().body;
    assert_eq!(forwarded["max_output_tokens"], 4096);
    assert!(forwarded.get("max_tokens").is_none());
    assert!(forwarded.get("stream_options").is_none());

    let body = br#"{"model":"fake-model","input":"hi"}"#;
    let response = stack
        .http
        .post(format!("{}/v1/embeddings", stack.agent_url()))
        .bearer_auth(&secret)
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let forwarded = stack.neuron.last_request().unwrap().body;
    assert_eq!(forwarded, serde_json::from_slice::<Value>(body).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_reach_the_client_as_the_neuron_sends_them() {
    let stack = Stack::start().await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    stack.neuron.set_behavior(Behavior {
        chunk_delay_ms: 100,
        ..Default::default()
    });
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "stream": true}),
        ),
        (
            "/v1/responses",
            json!({"model": MODEL, "input": "x", "max_output_tokens": 6, "stream": true}),
        ),
    ] {
        let response = post(&stack, &secret, path, &body).await;
        assert_eq!(response.status(), 200);
        let mut arrivals = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            assert!(!chunk.unwrap().is_empty());
            arrivals.push(Instant::now());
        }
        // The neuron spaces 7+ events 100 ms apart: a buffering proxy would
        // deliver them together at the end.
        assert!(arrivals.len() >= 6, "{path}: {} pieces", arrivals.len());
        let spread = *arrivals.last().unwrap() - arrivals[0];
        assert!(
            spread >= Duration::from_millis(400),
            "{path}: events arrived within {spread:?}"
        );
    }
}

/// The reservation the agent takes for `body` on `operation` with the
/// default policy.
fn reservation_of(operation: Operation, body: &Value, completion: u64) -> u64 {
    reservation::inspect(
        operation,
        body.as_object().unwrap(),
        &ReservationPolicy::default(),
    )
    .unwrap()
    .token_bound(completion)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_cancels_the_neuron_and_pays_for_what_it_got() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    stack.neuron.set_behavior(Behavior {
        chunk_delay_ms: 100,
        completion_tokens: Some(40),
        ..Default::default()
    });
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 40, "stream": true});
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut delivered = 0;
    while delivered < 5 {
        let chunk = stream.next().await.unwrap().unwrap();
        delivered += events(&String::from_utf8_lossy(&chunk))
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count();
    }
    drop(stream);
    wait_until(
        "the neuron to see the cancellation",
        Duration::from_secs(10),
        || async { stack.neuron.cancellations() == 1 },
    )
    .await;
    wait_settled(&stack, 1, "the abandoned request to settle").await;
    let spent = spent_tokens(&stack, &key_id).await;
    let reserved = reservation_of(Operation::ChatCompletions, &body, 40);
    assert!(
        spent >= delivered as u64,
        "spent {spent} < {delivered} delivered"
    );
    assert!(spent <= reserved, "spent {spent} > reserved {reserved}");
    assert!(
        spent < reserved,
        "charged the whole reservation for a partial stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neuron_that_breaks_mid_stream_ends_the_clients_stream_with_an_error_and_settles() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    stack.neuron.set_behavior(Behavior {
        fail_after_chunks: Some(3),
        completion_tokens: Some(10),
        ..Default::default()
    });
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 10, "stream": true});
    let text = post(&stack, &secret, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(
        events.last().unwrap()["error"]["code"],
        "upstream_error",
        "{text}"
    );
    wait_settled(&stack, 1, "the broken stream to settle").await;
    let spent = spent_tokens(&stack, &key_id).await;
    assert!(spent >= 2, "two tokens were delivered, {spent} charged");
    assert!(spent <= reservation_of(Operation::ChatCompletions, &body, 10));
}

/// A stack whose agent runs with `configure` applied.
async fn stack_with(configure: impl FnOnce(&mut allot_agent::config::AgentConfig)) -> Stack {
    let mut stack = Stack::start().await;
    configure(&mut stack.agent_config);
    stack.agent.take().unwrap().stop().await;
    stack.restart_agent().await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fire_map_to_their_status_and_leave_nothing_in_flight() {
    let stack = stack_with(|c| {
        c.first_byte_timeout_ms = 300;
        c.stream_idle_timeout_ms = 1_000;
        c.request_timeout_ms = 2_500;
        c.max_concurrent_per_key = 1;
    })
    .await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let chat = |stream: bool| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 16, "stream": stream})
    };
    // No first byte in time: 504, nothing charged.
    stack.neuron.set_behavior(Behavior {
        delay_ms: 3_000,
        ..Default::default()
    });
    let response = post(&stack, &secret, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(response.status(), 504);
    // The code of the error event that ends a stream the neuron answers
    // with `behavior`.
    let cut_by = |behavior: Behavior| {
        stack.neuron.set_behavior(behavior);
        let (stack, secret) = (&stack, &secret);
        async move {
            let text = post(stack, secret, "/v1/chat/completions", &chat(true))
                .await
                .text()
                .await
                .unwrap();
            let last = events(&text).last().cloned().unwrap_or_default();
            (
                last["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                text,
            )
        }
    };
    // A stream that goes quiet: cut with an error event.
    let (code, text) = cut_by(Behavior {
        chunk_delay_ms: 5_000,
        ..Default::default()
    })
    .await;
    assert_eq!(code, "stream_idle_timeout", "{text}");
    // A stream that keeps talking past the whole-request deadline.
    let (code, text) = cut_by(Behavior {
        chunk_delay_ms: 200,
        completion_tokens: Some(16),
        ..Default::default()
    })
    .await;
    assert_eq!(code, "request_timeout", "{text}");
    wait_until(
        "the neuron to see both streams cancelled",
        Duration::from_secs(10),
        || async { stack.neuron.cancellations() == 2 },
    )
    .await;
    wait_settled(&stack, 3, "all three requests to settle").await;
    // Nothing stays in flight: the key's single slot is free again.
    stack.neuron.set_behavior(Behavior::default());
    let response = post(&stack, &secret, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(response.status(), 200);
    assert!(spent_tokens(&stack, &key_id).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_refuse_per_key_with_429_and_per_agent_with_503() {
    let stack = stack_with(|c| {
        c.max_concurrent_requests = 2;
        c.max_concurrent_per_key = 1;
    })
    .await;
    let mut secrets = Vec::new();
    for account in ["a", "b", "c"] {
        secrets.push(
            stack
                .key_with_limits(account, vec![limit(pb::Unit::Tokens, "1000000", balance())])
                .await
                .1,
        );
    }
    stack.neuron.set_behavior(Behavior {
        delay_ms: 1_500,
        ..Default::default()
    });
    let slow = |secret: String| {
        let (http, url) = (stack.http.clone(), stack.agent_url());
        tokio::spawn(async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(secret)
                .json(&chat_body(5))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let first = slow(secrets[0].clone());
    wait_until(
        "the first request to reach the neuron",
        Duration::from_secs(10),
        || async { stack.neuron.hits() == 1 },
    )
    .await;
    let same_key = stack.chat(&secrets[0], chat_body(5)).await;
    assert_eq!(same_key.status(), 429);
    assert_eq!(same_key.headers()["retry-after"], "1");
    let body: Value = same_key.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let second = slow(secrets[1].clone());
    wait_until(
        "the second key's request to reach the neuron",
        Duration::from_secs(10),
        || async { stack.neuron.hits() == 2 },
    )
    .await;
    let third_key = stack.chat(&secrets[2], chat_body(5)).await;
    assert_eq!(third_key.status(), 503);
    assert!(third_key.headers().contains_key("retry-after"));
    assert_eq!(stack.neuron.hits(), 2);

    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);
    stack.neuron.set_behavior(Behavior::default());
    assert_eq!(stack.chat(&secrets[2], chat_body(5)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_are_refused_unless_allow_listed_and_then_passed_through_uncharged() {
    let mut stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let send = |stack: &Stack, method: reqwest::Method, path: &str, secret: Option<&str>| {
        let mut request = stack
            .http
            .request(method, format!("{}{path}", stack.agent_url()));
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        request.send()
    };
    let refused = send(&stack, reqwest::Method::GET, "/_fake/hits", Some(&secret))
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));

    stack.agent_config.pass_through = vec!["GET /_fake/hits".into()];
    stack.agent.take().unwrap().stop().await;
    stack.restart_agent().await;
    assert_eq!(
        send(&stack, reqwest::Method::GET, "/_fake/hits", None)
            .await
            .unwrap()
            .status(),
        401
    );
    // One metered request, so that the neuron's counter is not zero.
    assert_eq!(stack.chat(&secret, chat_body(5)).await.status(), 200);
    assert_eq!(stack.neuron.hits(), 1);
    // Not on the list: another method, another path, a path that climbs
    // out of an allowed one. None reaches the neuron: `/_fake/reset` would
    // zero its counter, `unload` would unload the model.
    for (method, path) in [
        (reqwest::Method::POST, "/_fake/hits"),
        (reqwest::Method::POST, "/_fake/reset"),
        (reqwest::Method::POST, "/_fake/models/fake-model/unload"),
        (reqwest::Method::GET, "/_fake/hits/../reset"),
    ] {
        let response = send(&stack, method.clone(), path, Some(&secret))
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unknown_url", "{method} {path}");
    }
    assert_eq!(stack.neuron.hits(), 1, "nothing reached the neuron");
    let passed = send(&stack, reqwest::Method::GET, "/_fake/hits", Some(&secret))
        .await
        .unwrap();
    assert_eq!(passed.status(), 200);
    let counters: Value = passed.json().await.unwrap();
    assert_eq!(counters["hits"], 1, "the neuron's own answer: {counters}");
    wait_settled(&stack, 1, "the metered request to settle").await;
    assert_eq!(
        stack.settled_records().await,
        1,
        "pass-through is uncharged"
    );
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_go_to_the_endpoint_the_neuron_names() {
    // A model server for one model, and a node daemon that points to it.
    let (server, server_url) = start_neuron(&["model-b"], "server-b", Default::default()).await;
    let (daemon, daemon_url) = start_neuron(
        &[MODEL],
        "daemon",
        [("model-b".to_string(), format!("{server_url}/v1"))].into(),
    )
    .await;
    let stack = stack_with(|c| {
        c.neuron_url = daemon_url.clone();
        c.endpoint_discovery = true;
    })
    .await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3});
    for _ in 0..3 {
        let response = post(&stack, &secret, "/v1/chat/completions", &body("model-b")).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(server.hits(), 3);
    assert_eq!(daemon.hits(), 0);
    // The daemon's own model is served by the daemon.
    let response = post(&stack, &secret, "/v1/chat/completions", &body(MODEL)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(daemon.hits(), 1);
    // A model nobody serves: 404 before anything is reserved or sent.
    let response = post(&stack, &secret, "/v1/chat/completions", &body("nope")).await;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(server.hits() + daemon.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_refused_precisely_and_reach_nothing() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    let raw = |path: &'static str, body: Vec<u8>| {
        let (http, url, secret) = (stack.http.clone(), stack.agent_url(), secret.clone());
        async move {
            let response = http
                .post(format!("{url}{path}"))
                .bearer_auth(secret)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/chat/completions", br#"{"model": "fake-model", "messages": [{"role""#.to_vec(), 400, "malformed JSON"),
        ("/v1/chat/completions", br#"{"model": "fake-model", "messages": "hi"}"#.to_vec(), 400, "messages must be an array"),
        ("/v1/chat/completions", br#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}"#.to_vec(), 400, "malformed JSON"),
        ("/v1/chat/completions", br#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999999999999999999}"#.to_vec(), 400, "max_tokens"),
        ("/v1/chat/completions", br#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "max_tokens": 100000}"#.to_vec(), 400, "duplicate key"),
        ("/v1/chat/completions", b"{\"model\": \"fake-model\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(), 400, "malformed JSON"),
        ("/v1/embeddings", br#"{"model": "fake-model", "input": 5}"#.to_vec(), 400, "input must be"),
        ("/v1/responses", br#"{"model": "fake-model", "input": "x", "max_output_tokens": -1}"#.to_vec(), 400, "max_output_tokens"),
        ("/v1/responses", br#"{"model": "fake-model", "input": "x", "previous_response_id": "r"}"#.to_vec(), 400, "cannot be bounded"),
    ];
    for (path, body, status, words) in cases {
        let (got, error) = raw(path, body.clone()).await;
        assert_eq!(got, status, "{}: {error}", String::from_utf8_lossy(&body));
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{message:?} lacks {words:?}");
    }
    // A 10 MB prompt is refused by size, whole, without reading it as JSON.
    let prompt = "x".repeat(10 * 1024 * 1024);
    let (got, error) = raw(
        "/v1/chat/completions",
        serde_json::to_vec(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]}),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(got, 413, "{error}");
    assert_eq!(stack.neuron.hits(), 0);
    assert_eq!(spent_tokens(&stack, &key_id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_can_be_spoken_to_over_h2c() {
    let stack = stack_with(|c| c.upstream_http2 = true).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    for stream in [false, true] {
        let mut body = chat_body(3);
        body["stream"] = stream.into();
        let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("tok"));
    }
    // The neuron saw HTTP/2: no HTTP/1.1 `connection` semantics, and the
    // authority arrives as :authority (recorded without a Host header).
    let seen = stack.neuron.last_request().unwrap();
    assert!(seen.header("host").is_none(), "{:?}", seen.headers);
    wait_settled(&stack, 2, "both to settle").await;
    assert!(spent_tokens(&stack, &key_id).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_open_streams_finish_and_settles_them() {
    let mut stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    stack.neuron.set_behavior(Behavior {
        chunk_delay_ms: 150,
        ..Default::default()
    });
    let mut body = chat_body(8);
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Stop the agent while the stream is open.
    let agent = stack.agent.take().unwrap();
    let stopping = tokio::spawn(agent.stop());
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    stopping.await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let usage = events(&text).last().unwrap()["usage"].clone();
    assert_eq!(stack.neuron.cancellations(), 0);
    // The agent flushed before exiting: the coordinator has the record.
    stack.restart_agent().await;
    wait_spent(
        &stack,
        &key_id,
        total(&usage),
        "the drained stream to settle",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_outlives_the_shutdown_grace_is_cut_and_settled_before_the_agent_exits() {
    let mut stack = stack_with(|c| c.shutdown_grace_ms = 300).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await;
    stack.neuron.set_behavior(Behavior {
        chunk_delay_ms: 400,
        ..Default::default()
    });
    let mut body = chat_body(100);
    body["stream"] = true.into();
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // The stream would take 40 s; the agent gives it 300 ms.
    stack.agent.take().unwrap().stop().await;
    while let Some(Ok(_)) = stream.next().await {}
    wait_until(
        "the neuron to see the cut",
        Duration::from_secs(20),
        || async { stack.neuron.cancellations() == 1 },
    )
    .await;
    // The cut request was settled before the agent exited: a new agent
    // finds it in the spool and the coordinator charges it.
    stack.restart_agent().await;
    wait_settled(&stack, 1, "the cut stream to settle").await;
    let spent = spent_tokens(&stack, &key_id).await;
    let reserved = reservation_of(Operation::ChatCompletions, &body, 100);
    assert!(spent > 0, "delivered tokens are charged");
    assert!(spent < reserved, "spent {spent}, reserved {reserved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = stack_with(|c| c.header_read_timeout_ms = 300).await;
    let address = stack.agent_url().replace("http://", "");
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: agent\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut answer))
        .await
        .expect("the agent kept a half-sent request open for 20 s")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert_eq!(stack.neuron.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_done_even_when_the_neuron_keeps_its_connection_open() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    stack.wait_for_agent().await;
    stack.neuron.set_behavior(allot_fake_neuron::Behavior {
        linger_after_end_ms: 30_000,
        ..Default::default()
    });
    let mut body = chat_body(5);
    body["stream"] = serde_json::json!(true);
    let started = std::time::Instant::now();
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        stack.chat(&secret, body).await.text().await.unwrap()
    })
    .await
    .expect("the stream ends at [DONE], not when the neuron closes (30 s)");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    wait_until(
        "the request settles",
        std::time::Duration::from_secs(10),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 > 0 },
    )
    .await;
}
