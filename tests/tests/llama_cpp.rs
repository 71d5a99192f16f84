//! A real inference server behind a real agent (issue 16): llama-cpp-python's
//! `llama_cpp.server` serving a tiny llama model written at test time
//! (tests/python/tiny_gguf.py), with the coordinator in-process as in every
//! other end-to-end test. Each test checks the charge against what the
//! server itself reported, or against its own tokenizer
//! (`/extras/tokenize`) where it reports nothing.
//!
//! What this server does that the fake neuron does not (the findings the
//! tests pin down):
//! - `GET /v1/models` names it (`owned_by: "me"`): the agent's
//!   `upstream_family = "auto"` detects `llama.cpp` (docs/server-families.md);
//! - its streams never carry usage: it ignores `stream_options`, so the
//!   agent counts a finished stream's text with the server's own tokenizer
//!   (`/extras/tokenize/count`), and a legacy completion's prompt with it;
//!   a chat prompt, rendered by a template the agent does not know, stays
//!   at the reservation's bound. Still marked `usage_estimated` (SPEC
//!   Settlement 2), never more than the completion bound;
//! - legacy completions take at most one prompt: an array of two is
//!   answered 500 and costs nothing (SPEC Settlement 3);
//! - it refuses any request whose `x-request-id` is not a UUID (an empty
//!   400), so the agent's own ids are UUIDs, and a client's other id is
//!   sent as a new UUID (the client's stays in its record and response);
//! - `max_tokens: 0` (or negative) means "no limit" to it, so the agent
//!   refuses a completion limit of 0 before dispatch;
//! - its chat template adds no BOS, 10 tokens per request and 7 to 13 per
//!   message: within the default overheads plus the bytes the bound counts
//!   for each message's keys and role, so the bound holds without learning.

use allot::pb;
use allot::reservation::{self, Operation, ReservationPolicy};
use allot_e2e::llama::*;
use allot_e2e::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

/// A stack whose agent's neuron is `server`, once the agent has detected
/// its family (`upstream_family = "auto"`, the default).
async fn stack_on(server: &LlamaServer) -> Stack {
    let mut stack = Stack::start().await;
    stack.agent_config.neuron_url = server.url.clone();
    stack.agent.take().expect("agent").stop().await;
    stack.restart_agent().await;
    let readyz = format!("{}/readyz", stack.agent_url());
    wait_until(
        "the agent to detect llama.cpp",
        Duration::from_secs(30),
        || async {
            let response = stack.http.get(&readyz).send().await.expect("readyz");
            response
                .headers()
                .get("x-allot-upstream-family")
                .is_some_and(|family| family == "llama.cpp")
        },
    )
    .await;
    stack
}

async fn post(stack: &Stack, secret: &str, path: &str, body: &Value) -> reqwest::Response {
    stack
        .http
        .post(format!("{}{path}", stack.agent_url()))
        .bearer_auth(secret)
        .json(body)
        .send()
        .await
        .expect("the agent answers")
}

fn reserved_tokens(record: &pb::UsageRecord) -> u64 {
    record
        .reserved
        .as_ref()
        .and_then(|r| r.tokens)
        .expect("a token reservation")
}

/// What the agent's reservation of `body` bounds the prompt by (default
/// policy, nothing learned).
fn prompt_bound(operation: Operation, body: &Value) -> u64 {
    reservation::inspect(
        operation,
        body.as_object().expect("an object"),
        &ReservationPolicy::default(),
    )
    .expect("admissible")
    .prompt_tokens_bound
}

async fn spent(stack: &Stack, key_id: &str) -> u64 {
    stack.key_usage(key_id, pb::Unit::Tokens).await.0
}

async fn wait_spent(stack: &Stack, key_id: &str, expected: u64) {
    wait_until(
        &format!("{expected} tokens spent"),
        Duration::from_secs(30),
        || async { spent(stack, key_id).await == expected },
    )
    .await;
}

/// The prompt overheads the agent learned (none while the bound holds).
async fn learned_overheads(stack: &Stack) -> Vec<(String, u64)> {
    let agents = stack
        .admin()
        .await
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
        .expect("list agents")
        .into_inner()
        .agents;
    agents
        .into_iter()
        .flat_map(|a| a.prompt_overheads)
        .filter(|(_, tokens)| *tokens > 0)
        .collect()
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": LLAMA_MODEL, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})
}

async fn key(stack: &Stack, tokens: &str) -> (String, String) {
    stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, tokens, balance())])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_plain_are_charged_what_the_server_reports_and_streams_its_tokenizers_count(
) {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (key_id, secret) = key(&stack, "1000000").await;

    // Plain: the server's usage, to the token.
    let body = chat("hello there friend", 7);
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    let status = response.status();
    let id = request_id_of(&response);
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}\n{}", server.log());
    let answer: Value = serde_json::from_str(&text).unwrap();
    let usage = &answer["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(completion, 7, "the tiny model runs to max_tokens: {answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    // The template's tokens, counted by the server's own tokenizer (which
    // adds a BOS that the chat handler does not).
    let rendered = "<|im_start|>user\nhello there friend<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(prompt + 1, server.tokenize(rendered).await.len() as u64);
    let record = record_of(&stack, &key_id, &id).await;
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.usage_estimated
        ),
        (prompt, 7, false)
    );
    assert!(prompt <= prompt_bound(Operation::ChatCompletions, &body));
    wait_spent(&stack, &key_id, prompt + 7).await;
    let mut expected = prompt + 7;
    // The agent's own request ids are UUIDs: the server refuses any other.
    let uuid = |id: &str| {
        id.len() == 36
            && id.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                14 => c == '4',
                _ => c.is_ascii_hexdigit(),
            })
    };
    assert!(uuid(&id), "{id}");

    // A client's own id: a UUID goes to the server as it is; any other the
    // server would refuse (an empty 400), so the agent sends a UUID of its
    // own in its place and keeps the client's for the record.
    for (client_id, status) in [
        ("0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5b", 200),
        ("my-trace-1", 200),
    ] {
        let response = stack
            .http
            .post(format!("{}/v1/chat/completions", stack.agent_url()))
            .bearer_auth(&secret)
            .header("x-request-id", client_id)
            .json(&chat("hi", 2))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "x-request-id: {client_id}");
        let record = record_of(&stack, &key_id, client_id).await;
        assert_eq!(record.charged, status == 200, "{record:?}");
        if status == 200 {
            expected += record.prompt_tokens + record.completion_tokens;
        }
        wait_spent(&stack, &key_id, expected).await;
    }

    // Streamed, without and with stream_options: the server sends no
    // usage either way (it ignores stream_options), so the agent counts
    // the streamed text with the server's tokenizer (never below the
    // content events, at most the completion bound); the chat prompt
    // stays at its bound.
    for include_usage in [None, Some(true)] {
        let mut body = chat("hello there friend", 7);
        body["stream"] = json!(true);
        if let Some(include) = include_usage {
            body["stream_options"] = json!({"include_usage": include});
        }
        let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        let id = request_id_of(&response);
        let text = response.text().await.unwrap();
        let events = sse_events(&text);
        let content = events
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count() as u64;
        assert_eq!(content, 7, "one event per token: {text}");
        assert!(
            events
                .iter()
                .all(|e| e.get("usage").is_none_or(Value::is_null)),
            "the server sent usage after all; the estimate is no longer needed: {text}"
        );
        let streamed: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        let counted = (server.tokenize(&streamed).await.len() as u64).max(content);
        let record = record_of(&stack, &key_id, &id).await;
        let bound = prompt_bound(Operation::ChatCompletions, &body);
        assert!(record.usage_estimated, "{record:?}");
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (bound, counted.min(7))
        );
        assert!(bound > prompt, "the estimate overcharges the prompt");
        expected += bound + 7;
        wait_spent(&stack, &key_id, expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_are_charged_the_servers_count_and_prompt_arrays_it_refuses_cost_nothing(
) {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (key_id, secret) = key(&stack, "1000000").await;
    let mut expected = 0;

    // A string and an array of one: the server's usage, whose prompt is
    // what its tokenizer makes of the text.
    for prompt in [
        json!("say hi to 42 friends"),
        json!(["say hi to 42 friends"]),
    ] {
        let body = json!({"model": LLAMA_MODEL, "prompt": prompt, "max_tokens": 5});
        let response = post(&stack, &secret, "/v1/completions", &body).await;
        assert_eq!(response.status(), 200);
        let id = request_id_of(&response);
        let answer: Value = response.json().await.unwrap();
        let usage = &answer["usage"];
        let counted = server.tokenize("say hi to 42 friends").await.len() as u64;
        assert_eq!(usage["prompt_tokens"], counted, "{answer}");
        assert_eq!(usage["completion_tokens"], 5, "{answer}");
        let record = record_of(&stack, &key_id, &id).await;
        assert_eq!(
            (
                record.prompt_tokens,
                record.completion_tokens,
                record.usage_estimated
            ),
            (counted, 5, false)
        );
        assert!(counted <= prompt_bound(Operation::Completions, &body));
        expected += counted + 5;
        wait_spent(&stack, &key_id, expected).await;
    }

    // Streamed: no usage from the server; the agent has the server's
    // tokenizer count the prompt (as the server counts it, BOS included)
    // and the text, instead of charging the prompt bound.
    let body = json!({"model": LLAMA_MODEL, "prompt": "say hi", "max_tokens": 5,
        "stream": true, "stream_options": {"include_usage": true}});
    let response = post(&stack, &secret, "/v1/completions", &body).await;
    assert_eq!(response.status(), 200);
    let id = request_id_of(&response);
    let text = response.text().await.unwrap();
    let pieces = sse_events(&text)
        .iter()
        .filter(|e| {
            e["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(pieces, 5, "{text}");
    let record = record_of(&stack, &key_id, &id).await;
    let bound = prompt_bound(Operation::Completions, &body);
    let counted = server.tokenize("say hi").await.len() as u64;
    assert!(record.usage_estimated);
    assert_eq!(
        (record.prompt_tokens, record.completion_tokens),
        (counted, 5)
    );
    assert!(counted < bound, "the bound it is no longer charged");
    expected += counted + 5;
    wait_spent(&stack, &key_id, expected).await;

    // Two prompts: the server refuses them (500) before any output, and
    // the reservation for both is released in full.
    let body = json!({"model": LLAMA_MODEL, "prompt": ["one", "two"], "max_tokens": 5});
    let response = post(&stack, &secret, "/v1/completions", &body).await;
    assert!(
        response.status().is_server_error(),
        "llama-cpp-python takes one prompt: {}",
        response.status()
    );
    let id = request_id_of(&response);
    let record = record_of(&stack, &key_id, &id).await;
    assert!(!record.charged, "{record:?}");
    assert_eq!(spent(&stack, &key_id).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_charged_the_tokens_the_server_counts() {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (key_id, secret) = key(&stack, "1000000").await;
    let inputs = ["one two three", "four 🙂", "12345678901234567890"];
    let body = json!({"model": LLAMA_EMBED_MODEL, "input": inputs});
    let response = post(&stack, &secret, "/v1/embeddings", &body).await;
    assert_eq!(response.status(), 200);
    let id = request_id_of(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 3);
    let mut counted = 0;
    for input in inputs {
        counted += server.tokenize(input).await.len() as u64;
    }
    assert_eq!(
        answer["usage"]["prompt_tokens"], counted,
        "{}",
        answer["usage"]
    );
    let record = record_of(&stack, &key_id, &id).await;
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.usage_estimated
        ),
        (counted, 0, false)
    );
    assert!(counted <= prompt_bound(Operation::Embeddings, &body));
    wait_spent(&stack, &key_id, counted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_pays_the_prompt_bound_and_what_was_forwarded() {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (key_id, secret) = key(&stack, "1000000").await;
    let max_tokens = 1500;
    let mut body = chat("tell me a long story", max_tokens);
    body["stream"] = json!(true);
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let id = request_id_of(&response);
    let mut stream = response.bytes_stream();
    let mut delivered = 0;
    let mut buffer = String::new();
    while delivered < 5 {
        let chunk = stream.next().await.expect("more").expect("bytes");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        delivered = sse_events(buffer.rsplit_once("\n\n").map_or("", |(whole, _)| whole))
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count() as u64;
    }
    drop(stream);
    // SPEC Settlement 2: no usage came, so the estimate from what was
    // forwarded: the prompt bound, and a token per content event
    // forwarded (the role event included), never the whole reservation.
    let record = record_of(&stack, &key_id, &id).await;
    assert!(record.charged && record.usage_estimated, "{record:?}");
    assert_eq!(
        record.prompt_tokens,
        prompt_bound(Operation::ChatCompletions, &body)
    );
    assert!(
        record.completion_tokens >= delivered,
        "{} < {delivered} delivered",
        record.completion_tokens
    );
    assert!(
        record.completion_tokens < max_tokens,
        "charged the whole reservation for a partial stream: {record:?}"
    );
    wait_spent(
        &stack,
        &key_id,
        record.prompt_tokens + record.completion_tokens,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_absent_present_and_over_the_budget_stop_where_the_agent_said() {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;

    // Present: the server generates exactly that many.
    let (key_id, secret) = key(&stack, "1000000").await;
    let body = chat("count with me", 9);
    let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 9, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");

    // 0 means "no limit" to llama.cpp: refused before dispatch, or the
    // server would generate up to its context.
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat("count with me", 0);
        body.as_object_mut().unwrap().remove("max_tokens");
        body[field] = json!(0);
        let response = post(&stack, &secret, "/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 400, "{field}: 0");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], field, "{error}");
    }

    // Absent, on a small budget: the agent sets what the allowance pays
    // for, and the server stops there.
    let budget = 300;
    let (small_id, small_secret) = key(&stack, &budget.to_string()).await;
    let body = json!({"model": LLAMA_MODEL,
        "messages": [{"role": "user", "content": "go on"}]});
    let response = post(&stack, &small_secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let id = request_id_of(&response);
    let answer: Value = response.json().await.unwrap();
    let completion = answer["usage"]["completion_tokens"].as_u64().unwrap();
    let record = record_of(&stack, &small_id, &id).await;
    let clamp = reserved_tokens(&record) - prompt_bound(Operation::ChatCompletions, &body);
    assert_eq!(completion, clamp, "the server stopped where the agent said");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert!(clamp < 4096 && clamp > 0, "clamped to the budget: {clamp}");
    assert!(reserved_tokens(&record) <= budget);
    let spent_small = record.prompt_tokens + record.completion_tokens;
    wait_spent(&stack, &small_id, spent_small).await;

    // Present and larger than what remains: refused, nothing dispatched.
    let remaining = budget - spent_small;
    let body = chat("go on", remaining + 1);
    let response = post(&stack, &small_secret, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 429);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota", "{error}");
    assert_eq!(spent(&stack, &small_id).await, spent_small);
    let _ = key_id;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservation_bound_holds_for_prompts_that_tokenize_worst() {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (_, secret) = key(&stack, "100000000").await;
    let digits: String = "0123456789".repeat(40);
    let emoji = "🙂🚀🎉👍🏽🇫🇷".repeat(10);
    let singles = "a b c d e f g h i j k l m n o p q r s t u v w x y z . , ! ?";
    let accents = "é à ü ñ ç ß ø Ω π 中 文 字";
    let worst = [
        "a", "7", "🙂", "\n", " ", singles, &digits, &emoji, accents, "x",
    ];
    let mut checked = 0;
    for text in worst {
        let cases = [
            (
                Operation::ChatCompletions,
                "/v1/chat/completions",
                chat(text, 1),
            ),
            (
                Operation::ChatCompletions,
                "/v1/chat/completions",
                json!({"model": LLAMA_MODEL, "max_tokens": 1, "messages": [
                    {"role": "system", "content": text},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": text}]}),
            ),
            (
                Operation::Completions,
                "/v1/completions",
                json!({"model": LLAMA_MODEL, "prompt": text, "max_tokens": 1}),
            ),
            (
                Operation::Embeddings,
                "/v1/embeddings",
                json!({"model": LLAMA_EMBED_MODEL, "input": [text, text]}),
            ),
        ];
        for (operation, path, body) in cases {
            let response = post(&stack, &secret, path, &body).await;
            assert_eq!(response.status(), 200, "{path} {body}");
            let answer: Value = response.json().await.unwrap();
            let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
            let bound = prompt_bound(operation, &body);
            assert!(
                prompt <= bound,
                "{path} {text:?}: the server counted {prompt} prompt tokens, the bound is {bound}"
            );
            if operation == Operation::Completions {
                assert_eq!(prompt, server.tokenize(text).await.len() as u64);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 40);
    // Nothing above the bound: the agent learned no overhead.
    wait_until(
        "every request to settle",
        Duration::from_secs(30),
        || async { stack.settled_records().await >= 40 },
    )
    .await;
    assert_eq!(learned_overheads(&stack).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_reaches_the_real_server_through_the_agent() {
    let server = LlamaServer::start().await;
    let stack = stack_on(&server).await;
    let (key_id, secret) = key(&stack, "1000000").await;
    let envs = [
        ("AGENT_URL", format!("{}/v1", stack.agent_url())),
        ("API_KEY", secret),
        ("MODEL", LLAMA_MODEL.to_string()),
        ("EMBED_MODEL", LLAMA_EMBED_MODEL.to_string()),
    ];
    let script = python_script("openai_llama.py").display().to_string();
    let run =
        tokio::task::spawn_blocking(move || run_python(&[script], &envs, Duration::from_secs(120)))
            .await
            .unwrap();
    assert!(run.success, "{run}");
    assert_eq!(run.stdout.lines().last(), Some("ok"), "{run}");
    // Every step settled; the plain ones at the usage the client saw.
    let steps: Vec<Value> = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    wait_until("every step to settle", Duration::from_secs(30), || async {
        usage_records(&stack, &key_id).await.len() == steps.len()
    })
    .await;
    let rows = usage_records(&stack, &key_id).await;
    for step in &steps {
        let Some(usage) = step.get("usage").filter(|u| !u.is_null()) else {
            continue;
        };
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        let completion = usage["completion_tokens"].as_u64().unwrap_or(0);
        assert!(
            rows.iter().any(|r| {
                !r.usage_estimated && (r.prompt_tokens, r.completion_tokens) == (prompt, completion)
            }),
            "no record of {step}"
        );
    }
}
