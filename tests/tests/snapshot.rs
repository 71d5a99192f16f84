//! SPEC Ledger 2: a snapshot shows, per limit, what was spent, what
//! requests being served reserved (`in_flight`), what agents hold unused
//! (`held`) and what is left; `in_flight` returns to 0 soon after the
//! requests finish, while the agent may keep its unused slice.

use allot::pb;
use allot_e2e::*;
use allot_fake_neuron::Behavior;
use std::time::{Duration, Instant};

const CAP: u64 = 100_000;

/// The key's token limit as the snapshot shows it:
/// `(spent, in_flight, held, remaining, reserved)`.
async fn token_figures(stack: &Stack, key_id: &str) -> (u64, u64, u64, u64, u64) {
    let snapshot = stack.snapshot(key_id).await;
    let status = key_limit(&snapshot, pb::Unit::Tokens).expect("the key's token limit");
    let number = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{s:?}"));
    (
        number(&status.spent),
        number(&status.in_flight),
        number(&status.held),
        number(&status.remaining),
        number(&status.reserved),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_shows_requests_being_served_and_returns_to_zero_once_they_finish() {
    let stack = Stack::start().await;
    let (key_id, secret) = stack
        .key_with_limits(
            "acme",
            vec![limit(pb::Unit::Tokens, &CAP.to_string(), balance())],
        )
        .await;
    stack.wait_for_agent().await;
    stack.neuron.set_behavior(Behavior {
        delay_ms: 1_500,
        ..Default::default()
    });
    let mut requests = Vec::new();
    for _ in 0..3 {
        let http = reqwest::Client::new();
        let url = format!("{}/v1/chat/completions", stack.agent_url());
        let secret = secret.clone();
        requests.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(secret)
                .json(&chat_body(100))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    // While they are served: each reserved 41 + 100 tokens.
    let mut saw_in_flight = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && saw_in_flight == 0 {
        let (spent, in_flight, held, remaining, reserved) = token_figures(&stack, &key_id).await;
        assert_eq!(
            spent + in_flight + held + remaining,
            CAP,
            "the figures add up to the cap"
        );
        assert_eq!(reserved, in_flight + held);
        saw_in_flight = in_flight;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(saw_in_flight, 3 * 141, "the three requests' reservations");
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    // Finished: in flight drops to 0 within a usage flush and a report
    // (100 ms + 250 ms here), while the agent may keep its unused slice.
    let finished = Instant::now();
    wait_until("in_flight returns to 0", Duration::from_secs(5), || async {
        let (spent, in_flight, held, remaining, _) = token_figures(&stack, &key_id).await;
        assert_eq!(spent + in_flight + held + remaining, CAP);
        in_flight == 0 && spent > 0
    })
    .await;
    let took = finished.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "in_flight took {took:?} to return to 0"
    );
    let (spent, _, held, _, _) = token_figures(&stack, &key_id).await;
    println!("after the burst: spent {spent}, held {held} (the agent's unused slice)");
}
