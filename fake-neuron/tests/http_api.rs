//! End-to-end tests of the fake neuron over real HTTP on a loopback socket.

use std::net::SocketAddr;
use std::time::Duration;

use allot_fake_neuron::{Behavior, FakeConfig, FakeNeuron};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::oneshot;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct RunningNeuron {
    neuron: FakeNeuron,
    address: SocketAddr,
    client: HttpClient,
    _shutdown_sender: oneshot::Sender<()>,
}

async fn start_neuron() -> RunningNeuron {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let neuron = FakeNeuron::new(FakeConfig {
        models: vec!["fake-model".to_string(), "other-model".to_string()],
        neuron_id: "neuron-under-test".to_string(),
    });
    let (shutdown_sender, shutdown_receiver) = oneshot::channel::<()>();
    let serving_neuron = neuron.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = shutdown_receiver.await;
        };
        serving_neuron
            .serve(listener, shutdown)
            .await
            .expect("serve");
    });
    RunningNeuron {
        neuron,
        address,
        client: Client::builder(TokioExecutor::new()).build_http(),
        _shutdown_sender: shutdown_sender,
    }
}

impl RunningNeuron {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.address, path))
            .header("content-type", "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).expect("request");
        self.client.request(request).await.expect("send request")
    }

    async fn post_json(
        &self,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let bytes = Bytes::from(body.to_string());
        self.send(Method::POST, path, bytes, headers).await
    }

    async fn get(&self, path: &str) -> Response<Incoming> {
        self.send(Method::GET, path, Bytes::new(), &[]).await
    }
}

async fn body_text(response: Response<Incoming>) -> String {
    let collected = response
        .into_body()
        .collect()
        .await
        .expect("read body")
        .to_bytes();
    String::from_utf8(collected.to_vec()).expect("utf-8 body")
}

async fn body_json(response: Response<Incoming>) -> Value {
    serde_json::from_str(&body_text(response).await).expect("json body")
}

/// Splits an SSE body into its `data:` payloads.
fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .expect("event starts with data:")
                .to_string()
        })
        .collect()
}

fn sse_chunks(payloads: &[String]) -> Vec<Value> {
    payloads
        .iter()
        .filter(|payload| payload.as_str() != "[DONE]")
        .map(|payload| serde_json::from_str(payload).expect("chunk json"))
        .collect()
}

async fn wait_until(description: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {description}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chat_request(extra: Value) -> Value {
    let mut body = json!({
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "hello there world"},
                {"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}}
            ]}
        ]
    });
    if let (Some(body_fields), Some(extra_fields)) = (body.as_object_mut(), extra.as_object()) {
        for (name, value) in extra_fields {
            body_fields.insert(name.clone(), value.clone());
        }
    }
    body
}

// Two messages (+2) and five words: seven prompt tokens.
const CHAT_REQUEST_PROMPT_TOKENS: u64 = 7;

#[tokio::test]
async fn non_stream_chat_has_openai_shape_and_usage() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({"max_tokens": 5})),
            &[("authorization", "Bearer secret")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("x-fake-neuron-id")
            .map(|v| v.as_bytes()),
        Some(&b"neuron-under-test"[..])
    );
    let body = body_json(response).await;
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fake-model");
    assert!(body["created"].as_u64().expect("created") > 0);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "tok tok tok tok tok");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": CHAT_REQUEST_PROMPT_TOKENS,
            "completion_tokens": 5,
            "total_tokens": CHAT_REQUEST_PROMPT_TOKENS + 5,
            "completion_tokens_details": {"reasoning_tokens": 0}
        })
    );

    let recorded = running.neuron.last_request().expect("recorded request");
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.body["max_tokens"], 5);
    assert_eq!(recorded.header("authorization"), Some("Bearer secret"));
}

#[tokio::test]
async fn non_stream_completions_honour_n_and_behavior() {
    let running = start_neuron().await;
    running.neuron.set_behavior(Behavior {
        overreport_prompt_tokens: 10,
        completion_tokens: Some(3),
        ..Behavior::default()
    });
    let response = running
        .post_json(
            "/v1/completions",
            json!({"model": "other-model", "prompt": ["one two", "three"], "n": 2}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"].as_array().expect("choices").len(), 2);
    assert_eq!(body["choices"][1]["index"], 1);
    assert_eq!(body["choices"][1]["text"], "tok tok tok");
    assert_eq!(body["choices"][1]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 3 + 10);
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["usage"]["total_tokens"], 19);

    let omitted = running
        .post_json(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "x"}),
            &[("x-fake-omit-usage", "1")],
        )
        .await;
    let omitted_body = body_json(omitted).await;
    assert!(omitted_body.get("usage").is_none());
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_chunk_and_done() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({
                "max_tokens": 3, "stream": true,
                "stream_options": {"include_usage": true}
            })),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let payloads = sse_payloads(&body_text(response).await);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = sse_chunks(&payloads);
    // Role chunk, three token chunks, usage chunk.
    assert_eq!(chunks.len(), 5);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk.get("usage").is_some(), "every chunk carries usage");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[0]["usage"], Value::Null);
    let streamed_text: String = chunks[1..4]
        .iter()
        .map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(streamed_text, "tok tok tok");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    let usage_chunk = &chunks[4];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"],
        CHAT_REQUEST_PROMPT_TOKENS
    );
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    assert_eq!(
        usage_chunk["usage"]["total_tokens"],
        CHAT_REQUEST_PROMPT_TOKENS + 3
    );
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "hi", "max_tokens": 2, "stream": true}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let payloads = sse_payloads(&body_text(response).await);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = sse_chunks(&payloads);
    assert_eq!(chunks.len(), 2);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert!(chunk.get("usage").is_none());
        assert_eq!(chunk["choices"].as_array().expect("choices").len(), 1);
    }
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn fail_status_header_returns_openai_error() {
    let running = start_neuron().await;
    let server_failure = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({})),
            &[("x-fake-fail-status", "503")],
        )
        .await;
    assert_eq!(server_failure.status(), StatusCode::SERVICE_UNAVAILABLE);
    let server_body = body_json(server_failure).await;
    assert_eq!(server_body["error"]["type"], "server_error");
    assert!(server_body["error"]["message"].is_string());
    assert_eq!(server_body["error"]["param"], Value::Null);
    assert_eq!(server_body["error"]["code"], Value::Null);

    let client_failure = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({})),
            &[("x-fake-fail-status", "429")],
        )
        .await;
    assert_eq!(client_failure.status(), StatusCode::TOO_MANY_REQUESTS);
    let client_body = body_json(client_failure).await;
    assert_eq!(client_body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn hits_count_every_inference_request_including_errors() {
    let running = start_neuron().await;
    running
        .post_json("/v1/chat/completions", chat_request(json!({})), &[])
        .await;
    let malformed = running
        .send(
            Method::POST,
            "/v1/chat/completions",
            Bytes::from_static(b"{not json"),
            &[],
        )
        .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let malformed_body = body_json(malformed).await;
    assert_eq!(malformed_body["error"]["type"], "invalid_request_error");
    running.get("/v1/models").await;
    running.get("/health").await;

    assert_eq!(running.neuron.hits(), 2);
    let counters = body_json(running.get("/_fake/hits").await).await;
    assert_eq!(counters, json!({"hits": 2, "cancellations": 0}));

    let reset = running
        .send(Method::POST, "/_fake/reset", Bytes::new(), &[])
        .await;
    assert_eq!(reset.status(), StatusCode::OK);
    assert_eq!(running.neuron.hits(), 0);
    assert!(running.neuron.last_request().is_none());
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({"model": "no-such-model"})),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = body_json(response).await;
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let endpoint = running.get("/models/no-such-model/endpoint").await;
    assert_eq!(endpoint.status(), StatusCode::NOT_FOUND);
    assert_eq!(running.neuron.hits(), 1);
}

#[tokio::test]
async fn models_endpoint_and_control_api() {
    let running = start_neuron().await;
    let models = body_json(running.get("/v1/models").await).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][1]["id"], "other-model");
    assert_eq!(models["data"][1]["owned_by"], "fake-neuron");

    let endpoint = body_json(running.get("/models/fake-model/endpoint").await).await;
    assert_eq!(endpoint["url"], format!("http://{}", running.address));

    let health = running.get("/health").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(body_text(health).await, "ok");

    let set_behavior = running
        .post_json("/_fake/behavior", json!({"fail_status": 502}), &[])
        .await;
    assert_eq!(set_behavior.status(), StatusCode::OK);
    let failing = running
        .post_json("/v1/chat/completions", chat_request(json!({})), &[])
        .await;
    assert_eq!(failing.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn client_disconnect_mid_stream_counts_a_cancellation() {
    let running = start_neuron().await;
    let mut response = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({"stream": true})),
            &[("x-fake-chunk-delay-ms", "50")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    let mut received = String::new();
    while received.matches("data: ").count() < 2 {
        let frame = response
            .body_mut()
            .frame()
            .await
            .expect("stream ended early")
            .expect("frame");
        if let Some(data) = frame.data_ref() {
            received.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert!(!received.contains("[DONE]"));
    drop(response);

    let neuron = running.neuron.clone();
    wait_until("a recorded cancellation", || neuron.cancellations() == 1).await;
    assert_eq!(running.neuron.hits(), 1);
}
