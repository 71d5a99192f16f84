//! Reservations that learn (issue 13): a neuron that bills more prompt
//! tokens than the reservation's bound (a long chat template, a system
//! prompt the server adds) overspends a cap only with the requests already
//! in flight when its first excess is seen. The agent then adds the excess
//! to that model's reservations, keeps it across restarts and reports it.

use allot::pb;
use allot_e2e::*;
use allot_fake_neuron::Behavior;
use std::time::Duration;

const CAP: u64 = 1_000;
const CLIENTS: usize = 16;

/// 16 clients send small chats until each is refused; returns how many
/// were served.
async fn drain(stack: &Stack, secret: &str) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/chat/completions", stack.agent_url());
        let secret = secret.to_string();
        tasks.push(tokio::spawn(async move {
            let mut served = 0;
            for _ in 0..100 {
                let response = http
                    .post(&url)
                    .bearer_auth(&secret)
                    .json(&chat_body(10))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => served += 1,
                    429 => break,
                    // Held by a slice being returned: ask again.
                    503 => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
                }
            }
            served
        }));
    }
    let mut served = 0;
    for task in tasks {
        served += task.await.unwrap();
    }
    served
}

/// Each request is billed 2 + 300 prompt and 10 completion tokens.
const PER_REQUEST: u64 = 312;

/// What `key_id` spent once all of its `served` requests settled.
async fn settled_spend(stack: &Stack, key_id: &str, served: usize) -> u64 {
    let expected = served as u64 * PER_REQUEST;
    wait_until(
        "every served request settles",
        Duration::from_secs(60),
        || async { stack.key_usage(key_id, pb::Unit::Tokens).await.0 >= expected },
    )
    .await;
    stack.key_usage(key_id, pb::Unit::Tokens).await.0
}

async fn overheads(stack: &Stack) -> std::collections::HashMap<String, u64> {
    let agents = stack
        .admin()
        .await
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .agents;
    agents
        .into_iter()
        .find(|a| a.agent_id == "agent-1")
        .map(|a| a.prompt_overheads)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neuron_billing_more_prompt_than_reserved_overspends_only_its_first_wave() {
    let mut stack = Stack::start().await;
    // The neuron bills 300 prompt tokens more than the text it was sent,
    // as a long server-side system prompt would.
    stack.neuron.set_behavior(Behavior {
        overreport_prompt_tokens: 300,
        ..Default::default()
    });
    stack.wait_for_agent().await;

    let (first, first_secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &CAP.to_string(), balance())],
        )
        .await;
    let served_first = drain(&stack, &first_secret).await;
    let spent_first = settled_spend(&stack, &first, served_first).await;
    // Reserved 41 + 10 before anything was learned: the requests in flight
    // when the first excess was seen overspend, at most one per client.
    let overspend = spent_first.saturating_sub(CAP);
    assert!(
        overspend <= CLIENTS as u64 * PER_REQUEST,
        "the first wave overspent {overspend} with {served_first} served"
    );

    // Learned: "hi" is bounded at 41 prompt tokens, billed at 302.
    wait_until(
        "the agent reports what it learned",
        Duration::from_secs(30),
        || async { overheads(&stack).await.get(MODEL) == Some(&261) },
    )
    .await;

    // After the first excess, a fresh key is never overspent.
    let (second, second_secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &CAP.to_string(), balance())],
        )
        .await;
    let served_second = drain(&stack, &second_secret).await;
    let spent_second = settled_spend(&stack, &second, served_second).await;
    assert!(
        served_second >= 1,
        "the learned bound still admits what fits"
    );
    assert!(
        spent_second <= CAP,
        "overspent {} after learning ({served_second} served)",
        spent_second - CAP
    );

    // Kept beside the spool: a restarted agent reserves the same way.
    stack.restart_agent().await;
    stack.wait_for_agent().await;
    wait_until(
        "the restarted agent reports it again",
        Duration::from_secs(30),
        || async { overheads(&stack).await.get(MODEL) == Some(&261) },
    )
    .await;
    let (third, third_secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &CAP.to_string(), balance())],
        )
        .await;
    let served_third = drain(&stack, &third_secret).await;
    let spent_third = settled_spend(&stack, &third, served_third).await;
    assert!(
        spent_third <= CAP,
        "overspent {} after a restart",
        spent_third - CAP
    );
    println!(
        "first wave: {served_first} served, spent {spent_first} of {CAP}; \
         after learning: {served_second} served, spent {spent_second}; after restart: spent {spent_third}"
    );
}
