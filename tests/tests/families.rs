//! Server families (issue 16 item 3, docs/server-families.md): a real agent
//! in front of the fake neuron behaving as each family documents
//! (`FakeConfig::family`), for what the real llama.cpp server in
//! tests/tests/llama_cpp.rs cannot show: which limit field each family
//! honours, how its streams report usage, llama.cpp's request id rule, and
//! `upstream_family = "auto"` telling them apart.

use allot::pb;
use allot::reservation::{self, Operation, ReservationPolicy};
use allot_agent::family::{Family, UpstreamFamily};
use allot_e2e::*;
use allot_fake_neuron::{Behavior, FakeConfig, FakeNeuron, LimitRule};
use serde_json::{json, Value};
use std::time::Duration;

/// Every family: the fake's profile and the agent's setting naming it.
const FAMILIES: [(LimitRule, UpstreamFamily); 5] = [
    (LimitRule::Openai, UpstreamFamily::Openai),
    (LimitRule::Vllm, UpstreamFamily::Vllm),
    (LimitRule::LlamaCpp, UpstreamFamily::LlamaCpp),
    (LimitRule::Ollama, UpstreamFamily::Ollama),
    (LimitRule::Tgi, UpstreamFamily::Tgi),
];

/// What the agent reserves for a request naming no limit.
const DEFAULT_MAX_TOKENS: u64 = 12;

async fn fake_as(family: Option<LimitRule>) -> (FakeNeuron, String) {
    start_neuron_with(FakeConfig {
        models: vec![MODEL.into()],
        family,
        ..Default::default()
    })
    .await
}

/// A stack whose agent, set to `setting`, fronts a fake neuron behaving
/// as `family`.
async fn stack_as(family: LimitRule, setting: UpstreamFamily) -> (Stack, FakeNeuron) {
    let (neuron, url) = fake_as(Some(family)).await;
    let stack = stack_on(url, setting).await;
    (stack, neuron)
}

async fn stack_on(neuron_url: String, setting: UpstreamFamily) -> Stack {
    let mut stack = Stack::start().await;
    stack.agent_config.neuron_url = neuron_url;
    stack.agent_config.upstream_family = setting;
    stack.agent_config.reservation.default_max_tokens = DEFAULT_MAX_TOKENS;
    stack.agent.take().expect("agent").stop().await;
    stack.restart_agent().await;
    stack
}

async fn key(stack: &Stack) -> (String, String) {
    stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "1000000", balance())])
        .await
}

async fn post(
    stack: &Stack,
    secret: &str,
    path: &str,
    body: &Value,
    request_id: Option<&str>,
) -> reqwest::Response {
    let mut request = stack
        .http
        .post(format!("{}{path}", stack.agent_url()))
        .bearer_auth(secret)
        .json(body);
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    request.send().await.expect("the agent answers")
}

/// The body field at `path` as a docs table writes it (`options.num_predict`).
fn field<'a>(body: &'a Value, path: &str) -> Option<&'a Value> {
    body.pointer(&format!("/{}", path.replace('.', "/")))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]});
    for (name, value) in extra.as_object().expect("an object") {
        body[name] = value.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_field_each_family_honours_carries_the_bound() {
    for (profile, setting) in FAMILIES {
        let family = setting.initial();
        let (stack, neuron) = stack_as(profile, setting).await;
        // A server that runs to whatever limit it reads.
        neuron.set_behavior(Behavior {
            generate_to_limit: true,
            ..Default::default()
        });
        let (key_id, secret) = key(&stack).await;
        // The client names the family's own field unlimited (or larger),
        // and a smaller max_tokens; OpenAI's client names none.
        let (body, bound) = match profile {
            LimitRule::Openai => (chat(json!({})), DEFAULT_MAX_TOKENS),
            LimitRule::Vllm => (
                chat(json!({"max_tokens": 9, "max_completion_tokens": 400})),
                9,
            ),
            LimitRule::LlamaCpp => (chat(json!({"max_tokens": 9, "n_predict": -1})), 9),
            LimitRule::Ollama => (
                chat(json!({"max_tokens": 9, "options": {"num_predict": -1}})),
                9,
            ),
            LimitRule::Tgi => (chat(json!({"max_tokens": 9, "max_new_tokens": 400})), 9),
        };
        let response = post(&stack, &secret, "/v1/chat/completions", &body, None).await;
        assert_eq!(response.status(), 200, "{family:?}");
        let id = request_id_of(&response);
        let sent = neuron.last_request().expect("forwarded").body;
        let honoured = family.honoured_limit_field();
        assert_eq!(
            field(&sent, honoured),
            Some(&json!(bound)),
            "{family:?} honours {honoured}: {sent}"
        );
        if profile == LimitRule::Openai {
            assert!(
                sent.get("max_tokens").is_none(),
                "OpenAI's chat API is bounded by max_completion_tokens alone: {sent}"
            );
        }
        let record = record_of(&stack, &key_id, &id).await;
        assert_eq!(
            record.completion_tokens, bound,
            "{family:?}: the server stopped at the bound"
        );
    }
}

/// `text`'s tokens as the fake's llama.cpp tokenizer counts them: its
/// words and the BOS token it adds.
fn fake_token_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_charged_by_its_familys_rule_and_never_below_what_was_generated() {
    for (profile, setting) in FAMILIES {
        let family = setting.initial();
        let (stack, _neuron) = stack_as(profile, setting).await;
        let (key_id, secret) = key(&stack).await;
        // Two choices of 16 tokens (the fake's cap) each: 32 generated.
        let body = chat(json!({"max_tokens": 30, "n": 2, "stream": true}));
        let generated = 32;
        let response = post(&stack, &secret, "/v1/chat/completions", &body, None).await;
        assert_eq!(response.status(), 200, "{family:?}");
        let id = request_id_of(&response);
        let events = sse_events(&response.text().await.unwrap());
        let record = record_of(&stack, &key_id, &id).await;
        assert!(
            record.completion_tokens >= generated,
            "{family:?}: {record:?}"
        );
        if profile != LimitRule::LlamaCpp {
            // Usage came: a usage chunk asked for, or (TGI) the last chunk's.
            assert!(!record.usage_estimated, "{family:?}: {record:?}");
            assert_eq!(record.completion_tokens, generated, "{family:?}");
            continue;
        }
        // llama.cpp streams carry no usage: the streamed text is counted
        // by the server's tokenizer, and never below the events that
        // carried it; the role events of the two choices carry nothing.
        let pieces: Vec<&str> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .filter(|c| !c.is_empty())
            .collect();
        assert!(events.iter().all(|e| e.get("usage").is_none()), "no usage");
        let counted = fake_token_count(&pieces.concat()).max(pieces.len() as u64);
        assert!(record.usage_estimated, "no usage was reported: {record:?}");
        assert_eq!(record.completion_tokens, counted, "{record:?}");
        assert!(
            record.completion_tokens < events.len() as u64,
            "less than the estimate, which counts every event: {record:?}"
        );

        // A legacy completion of one prompt: its prompt is counted too
        // (with the BOS the server adds), not charged at the bound.
        let body =
            json!({"model": MODEL, "prompt": "say hi to friends", "max_tokens": 5, "stream": true});
        let response = post(&stack, &secret, "/v1/completions", &body, None).await;
        assert_eq!(response.status(), 200);
        let id = request_id_of(&response);
        response.text().await.unwrap();
        let record = record_of(&stack, &key_id, &id).await;
        let bound = reservation::inspect(
            Operation::Completions,
            body.as_object().unwrap(),
            &ReservationPolicy::default(),
        )
        .unwrap()
        .prompt_tokens_bound;
        assert_eq!(record.prompt_tokens, fake_token_count("say hi to friends"));
        assert!(record.prompt_tokens < bound, "{record:?}");
        assert_eq!(record.completion_tokens, 5, "{record:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_is_sent_a_uuid_in_place_of_a_client_id_it_would_refuse() {
    let (stack, neuron) = stack_as(LimitRule::LlamaCpp, UpstreamFamily::LlamaCpp).await;
    let (key_id, secret) = key(&stack).await;
    let body = chat(json!({"max_tokens": 3}));
    let response = post(
        &stack,
        &secret,
        "/v1/chat/completions",
        &body,
        Some("my-trace-1"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        request_id_of(&response),
        "my-trace-1",
        "the client's id back"
    );
    let sent = neuron.last_request().expect("forwarded");
    let sent_id = sent.header("x-request-id").expect("an id").to_string();
    assert!(
        Family::LlamaCpp.accepts_request_id(sent_id.as_bytes()),
        "{sent_id}"
    );
    let record = record_of(&stack, &key_id, "my-trace-1").await;
    assert!(record.charged, "recorded under the client's id: {record:?}");

    // A UUID the client sent goes as it came.
    let uuid = "0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5b";
    let response = post(&stack, &secret, "/v1/chat/completions", &body, Some(uuid)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        neuron.last_request().unwrap().header("x-request-id"),
        Some(uuid)
    );
}

async fn upstream_family(stack: &Stack) -> String {
    let response = stack
        .http
        .get(format!("{}/readyz", stack.agent_url()))
        .send()
        .await
        .expect("the agent answers");
    response.headers()["x-allot-upstream-family"]
        .to_str()
        .expect("ascii")
        .to_string()
}

async fn wait_family(stack: &Stack, family: Family) {
    wait_until(
        &format!("the agent to detect {}", family.name()),
        Duration::from_secs(30),
        || async { upstream_family(stack).await == family.name() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_detects_each_family() {
    for (profile, setting) in FAMILIES {
        let (stack, _neuron) = stack_as(profile, UpstreamFamily::Auto).await;
        wait_family(&stack, setting.initial()).await;
        if profile == LimitRule::LlamaCpp {
            // What follows the family follows the detected one.
            let (_, secret) = key(&stack).await;
            let body = chat(json!({"max_tokens": 3}));
            let response = post(
                &stack,
                &secret,
                "/v1/chat/completions",
                &body,
                Some("my-id"),
            )
            .await;
            assert_eq!(response.status(), 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_detects_a_server_that_comes_up_after_the_agent() {
    let port = allot_e2e::process::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let stack = stack_on(url, UpstreamFamily::Auto).await;
    assert_eq!(upstream_family(&stack).await, "unknown");
    let neuron = FakeNeuron::new(FakeConfig {
        models: vec![MODEL.into()],
        family: Some(LimitRule::Vllm),
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the port is still free");
    tokio::spawn(neuron.serve(listener, std::future::pending()));
    wait_family(&stack, Family::Vllm).await;
}
