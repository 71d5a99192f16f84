//! SPEC Admission 2: the reservation is an upper bound of the request's
//! cost, whatever fields the client chooses and whichever field the server
//! behind the agent honours. The fake neuron plays each server family's
//! documented rule and generates all the way to the limit it reads.

use allot::pb;
use allot_e2e::*;
use allot_fake_neuron::{Behavior, LimitRule};
use serde_json::{json, Value};

const CAP: u64 = 10_000;

async fn stack_with_cap() -> (Stack, String, String) {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &CAP.to_string(), balance())],
        )
        .await;
    stack.wait_for_agent().await;
    (stack, key_id, secret)
}

fn completion_tokens(body: &Value) -> u64 {
    body["usage"]["completion_tokens"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_limit_field_lifts_the_bound_on_any_server_family() {
    let (stack, key_id, secret) = stack_with_cap().await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    // For each family, the body whose fields it reads run far past what a
    // reader of max_tokens alone would reserve.
    // vLLM reads `max_completion_tokens or max_tokens`, so a 0 would let
    // max_tokens through (and llama-cpp-python reads 0 as no limit): a
    // limit of 0 is refused before dispatch.
    stack.neuron.set_behavior(Behavior {
        limit_rule: LimitRule::Vllm,
        generate_to_limit: true,
        ..Default::default()
    });
    let response = stack
        .chat(
            &secret,
            json!({"model": MODEL, "messages": hi, "max_completion_tokens": 0, "max_tokens": 50000}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["error"]["param"], "max_completion_tokens",
        "{answer}"
    );
    assert_eq!(stack.neuron.hits(), 0, "refused before dispatch");
    let cases = [
        (
            LimitRule::Vllm,
            json!({"model": MODEL, "messages": hi, "max_completion_tokens": 5000, "max_tokens": 20}),
        ),
        (
            LimitRule::LlamaCpp,
            json!({"model": MODEL, "messages": hi, "max_tokens": 20, "n_predict": -1}),
        ),
        (
            LimitRule::Ollama,
            json!({"model": MODEL, "messages": hi, "max_tokens": 20, "options": {"num_predict": 5000}}),
        ),
        (
            LimitRule::Tgi,
            json!({"model": MODEL, "messages": hi, "max_tokens": 20, "max_new_tokens": 5000}),
        ),
        (
            LimitRule::Openai,
            json!({"model": MODEL, "messages": hi, "max_completion_tokens": 5000, "max_tokens": 20}),
        ),
    ];
    for (rule, body) in cases {
        stack.neuron.set_behavior(Behavior {
            limit_rule: rule,
            generate_to_limit: true,
            ..Default::default()
        });
        let response = stack.chat(&secret, body.clone()).await;
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{rule:?}: {answer}");
        let forwarded = stack.neuron.last_request().unwrap().body;
        // The smallest limit the client gave is the bound, written into
        // every limit field it sent and into max_tokens.
        let bound = 20;
        for field in [
            "max_tokens",
            "max_completion_tokens",
            "n_predict",
            "max_new_tokens",
        ] {
            if body.get(field).is_some() {
                assert_eq!(forwarded[field], bound, "{rule:?}: {field} in {forwarded}");
            }
        }
        if body.pointer("/options/num_predict").is_some() {
            assert_eq!(forwarded["options"]["num_predict"], bound, "{rule:?}");
        }
        assert!(
            completion_tokens(&answer) <= bound,
            "{rule:?} generated {} past the bound {bound}",
            completion_tokens(&answer)
        );
    }
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent <= CAP, "spent {spent} of a cap of {CAP}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_of_a_completions_array_is_reserved_for_and_over_cap_is_429_before_dispatch() {
    let (stack, key_id, secret) = stack_with_cap().await;
    stack.neuron.set_behavior(Behavior {
        generate_to_limit: true,
        ..Default::default()
    });
    let prompts: Vec<String> = (0..100).map(|i| format!("prompt {i}")).collect();
    let completions = |body: Value| {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/completions", stack.agent_url());
        let secret = secret.clone();
        async move {
            http.post(url)
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // 100 prompts × 100 tokens each cannot fit a cap of 10,000 with the
    // prompts themselves: refused before the neuron sees it.
    let response = completions(json!({"model": MODEL, "prompt": prompts, "max_tokens": 100})).await;
    assert_eq!(response.status(), 429);
    assert_eq!(stack.neuron.hits(), 0, "refused before dispatch");
    // 10 prompts × 50 tokens fit, and are generated in full.
    let response =
        completions(json!({"model": MODEL, "prompt": &prompts[..10], "max_tokens": 50})).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"].as_array().unwrap().len(), 10);
    assert_eq!(completion_tokens(&answer), 500);
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent <= CAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_bounded_is_refused_with_400_naming_the_param_before_dispatch() {
    let (stack, _key_id, secret) = stack_with_cap().await;
    let http = reqwest::Client::new();
    let responses_url = format!("{}/v1/responses", stack.agent_url());
    let background = http
        .post(&responses_url)
        .bearer_auth(&secret)
        .json(&json!({"model": MODEL, "input": "hello", "background": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(background.status(), 400);
    let error: Value = background.json().await.unwrap();
    assert_eq!(error["error"]["param"], "background", "{error}");

    let video = stack
        .chat(
            &secret,
            json!({"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "https://example.invalid/v.mp4"}}
            ]}]}),
        )
        .await;
    assert_eq!(video.status(), 400);
    let error: Value = video.json().await.unwrap();
    assert_eq!(
        error["error"]["param"], "messages[0].content[0].type",
        "{error}"
    );
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(stack.neuron.hits(), 0, "nothing reached the neuron");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_bound_is_cut_and_settled_at_the_reservation() {
    let (stack, key_id, secret) = stack_with_cap().await;
    // A neuron that ignores every limit: 500 tokens whatever it is sent.
    stack.neuron.set_behavior(Behavior {
        completion_tokens: Some(500),
        ..Default::default()
    });
    let mut body = chat_body(10);
    body["stream"] = json!(true);
    let text = stack.chat(&secret, body).await.text().await.unwrap();
    assert!(text.contains("reservation_exceeded"), "{text}");
    assert!(!text.contains("[DONE]"), "the stream was cut, not finished");
    // Prompt bound: "role" 4 + "user" 4 + "content" 7 + "hi" 2 + 8 per
    // message + 16 per request = 41, and 10 completion tokens.
    wait_until(
        "the cut request settles",
        std::time::Duration::from_secs(10),
        || async { stack.key_usage(&key_id, pb::Unit::Tokens).await.0 > 0 },
    )
    .await;
    let (spent, _) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert_eq!(
        spent, 51,
        "settled at the reservation, not at what the neuron sent"
    );
}
