//! End-to-end tests of the fake neuron over real HTTP on a loopback socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use allot_fake_neuron::{Behavior, FakeConfig, FakeNeuron, LimitRule, MAXIMUM_GENERATED_TOKENS};
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

fn test_config() -> FakeConfig {
    FakeConfig {
        models: vec!["fake-model".to_string(), "other-model".to_string()],
        neuron_id: "neuron-under-test".to_string(),
        ..FakeConfig::default()
    }
}

async fn start_neuron() -> RunningNeuron {
    start_neuron_with(test_config()).await
}

async fn start_neuron_with(config: FakeConfig) -> RunningNeuron {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let neuron = FakeNeuron::new(config);
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
    // Two prompts, two choices each (as OpenAI and vLLM answer arrays).
    assert_eq!(body["choices"].as_array().expect("choices").len(), 4);
    assert_eq!(body["choices"][1]["index"], 1);
    assert_eq!(body["choices"][1]["text"], "tok tok tok");
    assert_eq!(body["choices"][1]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 3 + 10);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    assert_eq!(body["usage"]["total_tokens"], 25);

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

/// Splits a Responses API SSE body into (event name, data payload) pairs, checking each
/// payload's `type` matches its event name.
fn named_sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let (name_line, data_line) = event.split_once('\n').expect("two lines");
            let name = name_line.strip_prefix("event: ").expect("event line");
            let data = data_line.strip_prefix("data: ").expect("data line");
            let payload: Value = serde_json::from_str(data).expect("event json");
            assert_eq!(payload["type"], name, "payload type matches event name");
            (name.to_string(), payload)
        })
        .collect()
}

/// Reads a body to its end: the text received, and whether it ended with an error.
async fn read_until_end_or_error(response: Response<Incoming>) -> (String, bool) {
    let mut body = response.into_body();
    let mut received = String::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received.push_str(&String::from_utf8_lossy(data));
                }
            }
            Err(_) => return (received, true),
        }
    }
    (received, false)
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = text
        .bytes()
        .filter(|byte| *byte != b'=')
        .map(|byte| ALPHABET.iter().position(|a| *a == byte).expect("base64") as u32)
        .collect();
    let mut bytes = Vec::new();
    for group in sextets.chunks(4) {
        let mut triple = 0u32;
        for (position, sextet) in group.iter().enumerate() {
            triple |= sextet << (18 - 6 * position);
        }
        for position in 0..group.len() - 1 {
            bytes.push((triple >> (16 - 8 * position)) as u8);
        }
    }
    bytes
}

fn embedding_floats(embedding: &Value) -> Vec<f32> {
    embedding
        .as_array()
        .expect("float embedding")
        .iter()
        .map(|component| component.as_f64().expect("number") as f32)
        .collect()
}

#[tokio::test]
async fn embeddings_report_usage_and_deterministic_unit_vectors() {
    let running = start_neuron().await;
    let request = json!({"model": "fake-model", "input": ["one two three", ""], "stream": true});
    let response = running
        .post_json("/v1/embeddings", request.clone(), &[])
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
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "fake-model");
    // Three words, and an empty string counting as one token.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "total_tokens": 4})
    );
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for (index, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        let vector = embedding_floats(&item["embedding"]);
        assert_eq!(vector.len(), 8);
        let norm: f32 = vector.iter().map(|c| c * c).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit vector, norm {norm}");
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    let again = body_json(running.post_json("/v1/embeddings", request, &[]).await).await;
    assert_eq!(again["data"], body["data"], "vectors are deterministic");

    let base64 = body_json(
        running
            .post_json(
                "/v1/embeddings",
                json!({"model": "fake-model", "input": "one two three", "encoding_format": "base64"}),
                &[],
            )
            .await,
    )
    .await;
    let decoded: Vec<f32> = base64_decode(base64["data"][0]["embedding"].as_str().expect("b64"))
        .chunks(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("four bytes")))
        .collect();
    assert_eq!(decoded, embedding_floats(&data[0]["embedding"]));

    let token_arrays = body_json(
        running
            .post_json(
                "/v1/embeddings",
                json!({"model": "other-model", "input": [[1, 2, 3], [4, 5]], "dimensions": 3}),
                &[],
            )
            .await,
    )
    .await;
    assert_eq!(token_arrays["usage"]["prompt_tokens"], 5);
    assert_eq!(
        token_arrays["data"][1]["embedding"]
            .as_array()
            .expect("v")
            .len(),
        3
    );

    running.neuron.set_behavior(Behavior {
        overreport_prompt_tokens: 10,
        ..Behavior::default()
    });
    let token_ids = body_json(
        running
            .post_json(
                "/v1/embeddings",
                json!({"model": "fake-model", "input": [7, 8, 9, 10], "dimensions": 1000}),
                &[],
            )
            .await,
    )
    .await;
    assert_eq!(token_ids["data"].as_array().expect("data").len(), 1);
    assert_eq!(
        token_ids["data"][0]["embedding"]
            .as_array()
            .expect("v")
            .len(),
        64
    );
    assert_eq!(
        token_ids["usage"],
        json!({"prompt_tokens": 14, "total_tokens": 14})
    );

    let omitted = body_json(
        running
            .post_json(
                "/v1/embeddings",
                json!({"model": "fake-model", "input": "x"}),
                &[("x-fake-omit-usage", "true")],
            )
            .await,
    )
    .await;
    assert!(omitted.get("usage").is_none());
    assert_eq!(omitted["data"][0]["object"], "embedding");

    let recorded = running.neuron.last_request().expect("recorded request");
    assert_eq!(recorded.path, "/v1/embeddings");
    assert_eq!(running.neuron.hits(), 6);
}

#[tokio::test]
async fn embeddings_reject_bad_input_and_honour_failures() {
    let running = start_neuron().await;
    for bad_input in [
        json!(null),
        json!(5),
        json!([]),
        json!(["a", [1]]),
        json!([[]]),
        json!([-1]),
    ] {
        let mut request = json!({"model": "fake-model", "input": bad_input});
        if bad_input.is_null() {
            request = json!({"model": "fake-model"});
        }
        let response = running.post_json("/v1/embeddings", request, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "input {bad_input}"
        );
        let body = body_json(response).await;
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("`input`"), "{message}");
    }
    let bad_format = running
        .post_json(
            "/v1/embeddings",
            json!({"model": "fake-model", "input": "x", "encoding_format": "int8"}),
            &[],
        )
        .await;
    assert_eq!(bad_format.status(), StatusCode::BAD_REQUEST);
    let unknown_model = running
        .post_json(
            "/v1/embeddings",
            json!({"model": "nope", "input": "x"}),
            &[],
        )
        .await;
    assert_eq!(unknown_model.status(), StatusCode::NOT_FOUND);
    let failing = running
        .post_json(
            "/v1/embeddings",
            json!({"model": "fake-model", "input": "x"}),
            &[("x-fake-fail-status", "503")],
        )
        .await;
    assert_eq!(failing.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_json(failing).await["error"]["type"], "server_error");
    assert_eq!(running.neuron.hits(), 9);
}

fn responses_request(extra: Value) -> Value {
    let mut body = json!({
        "model": "fake-model",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "hello there world"},
                {"type": "input_image", "image_url": "http://example.invalid/a.png"}
            ]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "hi", "annotations": []}
            ]},
            {"type": "function_call_output", "call_id": "call-1", "output": "not counted at all"}
        ]
    });
    if let (Some(body_fields), Some(extra_fields)) = (body.as_object_mut(), extra.as_object()) {
        for (name, value) in extra_fields {
            body_fields.insert(name.clone(), value.clone());
        }
    }
    body
}

// Instructions (2) + user message (1 + 3) + assistant message (1 + 1); the function call
// output counts nothing.
const RESPONSES_REQUEST_INPUT_TOKENS: u64 = 8;

fn responses_usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens
    })
}

#[tokio::test]
async fn responses_plain_report_usage_and_output_text() {
    let running = start_neuron().await;
    let response = running
        .post_json("/v1/responses", responses_request(json!({})), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    assert!(body["id"].as_str().expect("id").starts_with("resp-"));
    assert_eq!(body["object"], "response");
    assert!(body["created_at"].as_u64().expect("created_at") > 0);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["incomplete_details"], Value::Null);
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["instructions"], "be brief");
    let output = body["output"].as_array().expect("output");
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert!(output[0]["id"]
        .as_str()
        .expect("item id")
        .starts_with("msg-"));
    assert_eq!(output[0]["status"], "completed");
    assert_eq!(output[0]["role"], "assistant");
    let expected_text = vec!["tok"; 16].join(" ");
    assert_eq!(
        output[0]["content"],
        json!([{"type": "output_text", "text": expected_text, "annotations": []}])
    );
    assert_eq!(
        body["usage"],
        responses_usage(RESPONSES_REQUEST_INPUT_TOKENS, 16)
    );

    let capped = body_json(
        running
            .post_json(
                "/v1/responses",
                json!({"model": "other-model", "input": "a b c", "max_output_tokens": 5}),
                &[],
            )
            .await,
    )
    .await;
    assert_eq!(capped["status"], "incomplete");
    assert_eq!(
        capped["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(
        capped["output"][0]["content"][0]["text"],
        "tok tok tok tok tok"
    );
    assert_eq!(capped["usage"], responses_usage(3, 5));

    running.neuron.set_behavior(Behavior {
        overreport_prompt_tokens: 10,
        completion_tokens: Some(2),
        ..Behavior::default()
    });
    let forced = body_json(
        running
            .post_json(
                "/v1/responses",
                json!({"model": "fake-model", "input": ""}),
                &[],
            )
            .await,
    )
    .await;
    assert_eq!(forced["status"], "completed");
    assert_eq!(forced["usage"], responses_usage(1 + 10, 2));

    let omitted = body_json(
        running
            .post_json(
                "/v1/responses",
                json!({"model": "fake-model", "input": "x"}),
                &[("x-fake-omit-usage", "1")],
            )
            .await,
    )
    .await;
    assert!(omitted.get("usage").is_none());

    let missing_input = running
        .post_json("/v1/responses", json!({"model": "fake-model"}), &[])
        .await;
    assert_eq!(missing_input.status(), StatusCode::BAD_REQUEST);
    let message = body_json(missing_input).await["error"]["message"].clone();
    assert!(message.as_str().expect("message").contains("`input`"));
    let bad_instructions = running
        .post_json(
            "/v1/responses",
            json!({"model": "fake-model", "input": "x", "instructions": 5}),
            &[],
        )
        .await;
    assert_eq!(bad_instructions.status(), StatusCode::BAD_REQUEST);
    assert_eq!(running.neuron.hits(), 6);
    assert_eq!(
        running.neuron.last_request().expect("recorded").path,
        "/v1/responses"
    );
}

#[tokio::test]
async fn responses_stream_events_in_order_and_completed_carries_usage() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/responses",
            responses_request(json!({"stream": true})),
            &[("x-fake-completion-tokens", "3")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let text = body_text(response).await;
    assert!(!text.contains("[DONE]"));
    let events = named_sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (sequence_number, (_, payload)) in events.iter().enumerate() {
        assert_eq!(payload["sequence_number"], sequence_number);
    }
    let created = &events[0].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert_eq!(created["usage"], Value::Null);
    let item_id = events[2].1["item"]["id"].as_str().expect("item id");
    assert_eq!(events[2].1["item"]["status"], "in_progress");
    let deltas: String = events[4..7]
        .iter()
        .map(|(_, payload)| {
            assert_eq!(payload["item_id"], item_id);
            assert_eq!(payload["output_index"], 0);
            assert_eq!(payload["content_index"], 0);
            payload["delta"].as_str().expect("delta")
        })
        .collect();
    assert_eq!(deltas, "tok tok tok");
    assert_eq!(events[7].1["text"], "tok tok tok");
    assert_eq!(events[8].1["part"]["text"], "tok tok tok");
    assert_eq!(events[9].1["item"]["status"], "completed");
    let completed = &events[10].1["response"];
    assert_eq!(completed["id"], created["id"]);
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"][0]["content"][0]["text"], "tok tok tok");
    assert_eq!(
        completed["usage"],
        responses_usage(RESPONSES_REQUEST_INPUT_TOKENS, 3)
    );

    let capped = named_sse_events(
        &body_text(
            running
                .post_json(
                    "/v1/responses",
                    json!({"model": "fake-model", "input": "a b", "max_output_tokens": 2, "stream": true}),
                    &[],
                )
                .await,
        )
        .await,
    );
    let (last_name, last_payload) = capped.last().expect("events");
    assert_eq!(last_name, "response.incomplete");
    assert_eq!(last_payload["response"]["status"], "incomplete");
    assert_eq!(last_payload["response"]["usage"], responses_usage(2, 2));

    let omitted = named_sse_events(
        &body_text(
            running
                .post_json(
                    "/v1/responses",
                    json!({"model": "fake-model", "input": "a", "stream": true}),
                    &[("x-fake-omit-usage", "1")],
                )
                .await,
        )
        .await,
    );
    let (last_name, last_payload) = omitted.last().expect("events");
    assert_eq!(last_name, "response.completed");
    assert!(last_payload["response"].get("usage").is_none());
    assert_eq!(running.neuron.cancellations(), 0);
}

#[tokio::test]
async fn client_disconnect_mid_responses_stream_counts_a_cancellation() {
    let running = start_neuron().await;
    let mut response = running
        .post_json(
            "/v1/responses",
            json!({"model": "fake-model", "input": "hi", "stream": true}),
            &[("x-fake-chunk-delay-ms", "50")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = String::new();
    while received.matches("event: ").count() < 2 {
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
    drop(response);
    let neuron = running.neuron.clone();
    wait_until("a recorded cancellation", || neuron.cancellations() == 1).await;
}

#[tokio::test]
async fn fail_after_chunks_breaks_streams_with_a_body_error() {
    let running = start_neuron().await;
    let chat = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({"stream": true, "max_tokens": 5})),
            &[("x-fake-fail-after-chunks", "2")],
        )
        .await;
    assert_eq!(chat.status(), StatusCode::OK);
    let (received, broken) = read_until_end_or_error(chat).await;
    assert!(broken, "the stream ends with a body error");
    assert_eq!(received.matches("data: ").count(), 2, "{received}");
    assert!(!received.contains("[DONE]"));

    let completions = running
        .post_json(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "hi", "stream": true}),
            &[("x-fake-fail-after-chunks", "0")],
        )
        .await;
    assert_eq!(completions.status(), StatusCode::OK);
    let (received, broken) = read_until_end_or_error(completions).await;
    assert!(broken);
    assert_eq!(received, "");

    running.neuron.set_behavior(Behavior {
        fail_after_chunks: Some(5),
        chunk_delay_ms: 1,
        ..Behavior::default()
    });
    let responses = running
        .post_json(
            "/v1/responses",
            json!({"model": "fake-model", "input": "hi", "stream": true}),
            &[],
        )
        .await;
    let (received, broken) = read_until_end_or_error(responses).await;
    assert!(broken);
    assert_eq!(received.matches("event: ").count(), 5, "{received}");
    assert!(!received.contains("response.completed"));

    // Non-streamed responses and streams with fewer events are unaffected.
    let plain = running
        .post_json(
            "/v1/responses",
            json!({"model": "fake-model", "input": "hi"}),
            &[],
        )
        .await;
    assert_eq!(plain.status(), StatusCode::OK);
    assert_eq!(body_json(plain).await["status"], "completed");
    let short = running
        .post_json(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "hi", "max_tokens": 1, "stream": true}),
            &[("x-fake-fail-after-chunks", "2")],
        )
        .await;
    let (received, broken) = read_until_end_or_error(short).await;
    assert!(!broken);
    assert!(received.ends_with("data: [DONE]\n\n"));
    assert_eq!(running.neuron.cancellations(), 0);
}

#[tokio::test]
async fn configured_endpoints_override_the_model_endpoint() {
    let running = start_neuron_with(FakeConfig {
        endpoints: HashMap::from([
            (
                "remote-model".to_string(),
                "http://10.1.2.3:9100".to_string(),
            ),
            (
                "fake-model".to_string(),
                "http://elsewhere.invalid:1".to_string(),
            ),
        ]),
        ..test_config()
    })
    .await;
    let remote = running.get("/models/remote-model/endpoint").await;
    assert_eq!(remote.status(), StatusCode::OK);
    assert_eq!(
        body_json(remote).await,
        json!({"url": "http://10.1.2.3:9100"})
    );
    let overridden = body_json(running.get("/models/fake-model/endpoint").await).await;
    assert_eq!(overridden["url"], "http://elsewhere.invalid:1");
    let own = body_json(running.get("/models/other-model/endpoint").await).await;
    assert_eq!(own["url"], format!("http://{}", running.address));
    let unknown = running.get("/models/no-such-model/endpoint").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // An endpoint entry does not make this neuron serve the model.
    let models = body_json(running.get("/v1/models").await).await;
    assert_eq!(models["data"].as_array().expect("data").len(), 2);
    let inference = running
        .post_json(
            "/v1/chat/completions",
            chat_request(json!({"model": "remote-model"})),
            &[],
        )
        .await;
    assert_eq!(inference.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_simulated_node_loads_and_unloads_models_in_vram_and_serves_only_loaded_ones() {
    const GIB: u64 = 1 << 30;
    let running = start_neuron_with(FakeConfig {
        models: vec!["fake-model".into()],
        gpus: vec![6 * GIB],
        ..FakeConfig::default()
    })
    .await;
    let node = body_json(running.get("/_fake/node").await).await;
    assert_eq!(node["gpus"][0]["vram_total"], 6 * GIB);
    assert_eq!(node["gpus"][0]["vram_free"], 4 * GIB);
    assert_eq!(node["models"][0]["id"], "fake-model");
    assert_eq!(node["models"][0]["status"], "loaded");

    // Not on the node: not served.
    let chat = |model: &str| chat_request(json!({ "model": model }));
    let refused = running
        .post_json("/v1/chat/completions", chat("big-model"), &[])
        .await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);

    // Too large for what is free: 507, nothing changes.
    let too_big = running
        .post_json(
            "/_fake/models/big-model/load",
            json!({"vram_bytes": 5 * GIB}),
            &[],
        )
        .await;
    assert_eq!(too_big.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(
        body_json(too_big).await["error"]["code"],
        "insufficient_vram"
    );

    // Room made by unloading, then a load that takes a while.
    let unloaded = running
        .send(
            Method::POST,
            "/_fake/models/fake-model/unload",
            Bytes::new(),
            &[],
        )
        .await;
    assert_eq!(unloaded.status(), StatusCode::NO_CONTENT);
    let loading = running
        .post_json(
            "/_fake/models/big-model/load",
            json!({"vram_bytes": 5 * GIB, "load_ms": 300}),
            &[],
        )
        .await;
    assert_eq!(loading.status(), StatusCode::ACCEPTED);
    assert_eq!(body_json(loading).await["status"], "loading");
    let during = running
        .post_json("/v1/chat/completions", chat("big-model"), &[])
        .await;
    assert_eq!(
        during.status(),
        StatusCode::NOT_FOUND,
        "served while loading"
    );
    let node = body_json(running.get("/_fake/node").await).await;
    assert_eq!(node["gpus"][0]["vram_free"], GIB);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let node = body_json(running.get("/_fake/node").await).await;
        if node["models"][0]["status"] == "loaded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never loaded: {node}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = running
        .post_json("/v1/chat/completions", chat("big-model"), &[])
        .await;
    assert_eq!(served.status(), StatusCode::OK);
    let models = body_json(running.get("/v1/models").await).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(models["data"][0]["id"], "big-model");
}

#[tokio::test]
async fn each_server_family_reads_its_own_limit_field_and_generates_to_it() {
    let running = start_neuron().await;
    let cases = [
        (
            LimitRule::Openai,
            json!({"max_completion_tokens": 7, "max_tokens": 3}),
            7,
        ),
        (
            LimitRule::Vllm,
            json!({"max_completion_tokens": 0, "max_tokens": 9}),
            9,
        ),
        (
            LimitRule::Vllm,
            json!({"max_completion_tokens": 4, "max_tokens": 9}),
            4,
        ),
        (
            LimitRule::LlamaCpp,
            json!({"n_predict": 5, "max_tokens": 2}),
            5,
        ),
        (LimitRule::LlamaCpp, json!({"max_tokens": 2}), 2),
        (
            LimitRule::Ollama,
            json!({"options": {"num_predict": 6}, "max_tokens": 2}),
            6,
        ),
        (
            LimitRule::Tgi,
            json!({"max_new_tokens": 8, "max_tokens": 2}),
            8,
        ),
    ];
    for (rule, limits, expected) in cases {
        running.neuron.set_behavior(Behavior {
            limit_rule: rule,
            generate_to_limit: true,
            ..Behavior::default()
        });
        let mut body =
            json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in limits.as_object().unwrap() {
            body[k] = v.clone();
        }
        let response = running.post_json("/v1/chat/completions", body, &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer = body_json(response).await;
        assert_eq!(
            answer["usage"]["completion_tokens"], expected,
            "{rule:?} {limits}"
        );
    }
    // Unlimited (-1) runs to the generator's own maximum.
    running.neuron.set_behavior(Behavior {
        limit_rule: LimitRule::LlamaCpp,
        generate_to_limit: true,
        ..Behavior::default()
    });
    let response = running
        .post_json(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "x", "n_predict": -1, "max_tokens": 3}),
            &[],
        )
        .await;
    let answer = body_json(response).await;
    assert_eq!(
        answer["usage"]["completion_tokens"],
        MAXIMUM_GENERATED_TOKENS
    );
}

#[tokio::test]
async fn a_background_response_is_queued_without_usage() {
    let running = start_neuron().await;
    let response = running
        .post_json(
            "/v1/responses",
            json!({"model": "fake-model", "input": "hello", "background": true}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = body_json(response).await;
    assert_eq!(answer["status"], "queued");
    assert!(answer.get("usage").is_none(), "{answer}");
}

fn with_family(family: LimitRule) -> FakeConfig {
    FakeConfig {
        family: Some(family),
        ..test_config()
    }
}

#[tokio::test]
async fn the_llama_cpp_profile_refuses_other_ids_streams_no_usage_and_counts_tokens() {
    let running = start_neuron_with(with_family(LimitRule::LlamaCpp)).await;
    let models = body_json(running.get("/v1/models").await).await;
    assert_eq!(models["data"][0]["owned_by"], "me");
    let chat = json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}});
    let refused = running
        .post_json(
            "/v1/chat/completions",
            chat.clone(),
            &[("x-request-id", "my-id")],
        )
        .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_text(refused).await, "", "an empty 400");
    let uuid = [("x-request-id", "0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5b")];
    let streamed = running.post_json("/v1/chat/completions", chat, &uuid).await;
    assert_eq!(streamed.status(), StatusCode::OK);
    let chunks = sse_chunks(&sse_payloads(&body_text(streamed).await));
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "stream_options is ignored: {chunks:?}"
    );
    let counted = running
        .post_json(
            "/extras/tokenize/count",
            json!({"input": "tok tok tok"}),
            &[],
        )
        .await;
    assert_eq!(
        body_json(counted).await,
        json!({"count": 4}),
        "BOS included"
    );
}

#[tokio::test]
async fn the_tgi_and_ollama_profiles_say_who_they_are_and_tgi_streams_carry_usage() {
    let tgi = start_neuron_with(with_family(LimitRule::Tgi)).await;
    let info = body_json(tgi.get("/info").await).await;
    assert_eq!(info["router"], "text-generation-router");
    let chat = json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "stream": true});
    let chunks = sse_chunks(&sse_payloads(
        &body_text(tgi.post_json("/v1/chat/completions", chat, &[]).await).await,
    ));
    let last = chunks.last().expect("chunks");
    assert_eq!(last["usage"]["completion_tokens"], 3, "{last}");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(
        tgi.get("/api/version").await.status(),
        StatusCode::NOT_FOUND
    );

    let ollama = start_neuron_with(with_family(LimitRule::Ollama)).await;
    let version = body_json(ollama.get("/api/version").await).await;
    assert!(version["version"].is_string());
    assert_eq!(ollama.get("/info").await.status(), StatusCode::NOT_FOUND);
}
