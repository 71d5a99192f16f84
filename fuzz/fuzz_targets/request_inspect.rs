//! A request body as a client sends it: whatever `inspect` answers for any
//! operation must be a usable bound or a refusal that names its parameter.
#![no_main]

use allot::reservation::{inspect, write_completion_bound, Operation, ReservationPolicy};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Map<String, Value>>(data) else {
        return;
    };
    let policy = ReservationPolicy::default();
    for op in Operation::ALL {
        match inspect(op, &body, &policy) {
            Ok(facts) => {
                assert!(!facts.model.is_empty(), "{op:?}: empty model admitted");
                assert!(facts.choices >= 1, "{op:?}: {} choices", facts.choices);
                assert!(
                    facts.prompt_tokens_bound >= policy.per_request_tokens,
                    "{op:?}: prompt bound {} below the per-request overhead",
                    facts.prompt_tokens_bound
                );
                // Saturates, never overflows.
                let whole = facts.token_bound(u64::MAX);
                assert!(whole >= facts.prompt_tokens_bound);
                let completion = facts
                    .max_completion_tokens
                    .unwrap_or(policy.default_max_tokens);
                assert!(facts.token_bound(completion) >= facts.prompt_tokens_bound);
                if op == Operation::Embeddings {
                    assert_eq!(
                        facts.max_completion_tokens,
                        Some(0),
                        "embeddings generate nothing"
                    );
                    assert!(!facts.stream);
                }
                // Once the bound is written, every limit field any server
                // honours says exactly the bound.
                if op != Operation::Embeddings {
                    let mut rewritten = body.clone();
                    write_completion_bound(op, &mut rewritten, 17);
                    let again = inspect(op, &rewritten, &policy).expect("a rewritten body is admitted");
                    assert_eq!(again.max_completion_tokens, Some(17), "{op:?}: {rewritten:?}");
                }
                // The model is the body's, unchanged.
                assert_eq!(
                    body.get("model").and_then(Value::as_str),
                    Some(facts.model.as_str())
                );
            }
            Err(refusal) => {
                assert!(
                    refusal.param.is_some(),
                    "{op:?}: refusal without a param: {refusal:?}"
                );
                assert!(
                    !refusal.message.is_empty(),
                    "{op:?}: refusal without a message"
                );
            }
        }
    }
});
