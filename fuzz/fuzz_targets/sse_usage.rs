//! A neuron's SSE stream, arriving in pieces the fuzzer chooses (the first
//! byte seeds the piece sizes). The pass-through scanner must hand on every
//! byte in order; the usage-stripping one may only drop whole events, and
//! only events that carry usage; neither may depend on how bytes arrive. The
//! model and usage read from an event without building its JSON tree are
//! the tree's.
#![no_main]

use allot_agent::usage::{
    estimate_completion_tokens, model_of, read_event, read_usage, SseScanner,
};
use libfuzzer_sys::fuzz_target;

/// Piece sizes from a one-byte seed: 0 feeds everything at once, otherwise
/// a small xorshift picks sizes in 1..=max.
fn pieces(seed: u8, input: &[u8]) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![input];
    }
    let max = usize::from(seed & 0x0f) + 1;
    let mut state = u32::from(seed) | 0x100;
    let mut rest = input;
    let mut out = Vec::new();
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state as usize % max + 1).min(rest.len());
        let (piece, tail) = rest.split_at(size);
        out.push(piece);
        rest = tail;
    }
    out
}

/// SSE events of `input` (each ends after its first blank line, `\n\n` or
/// `\r\n\r\n`), and the unfinished tail; written apart from the scanner's.
fn events(input: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = start;
    while i < input.len() {
        i += 1;
        let so_far = &input[start..i];
        if so_far.ends_with(b"\n\n") || so_far.ends_with(b"\r\n\r\n") {
            out.push(so_far);
            start = i;
        }
    }
    (out, &input[start..])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn run(strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, SseScanner) {
    let mut scanner = SseScanner::new(strip);
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&scanner.push(chunk));
    }
    out.extend_from_slice(&scanner.finish());
    (out, scanner)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let chunks = pieces(seed, input);

    // Pass-through: nothing lost, added or reordered.
    let (kept, keep) = run(false, &chunks);
    assert_eq!(kept, input, "pass-through scanner changed the stream");

    // Stripping: a subsequence of whole events, then the unfinished tail.
    let (stripped, strip) = run(true, &chunks);
    assert!(stripped.len() <= input.len());
    let (all, tail) = events(input);
    let mut rest = &stripped[..];
    for event in &all {
        if let Some(after) = rest.strip_prefix(*event) {
            rest = after;
        } else {
            assert!(
                contains(event, b"usage"),
                "dropped an event without usage: {:?}",
                String::from_utf8_lossy(event)
            );
        }
    }
    assert_eq!(
        rest, tail,
        "stripped output is not whole events of the input"
    );
    if !contains(input, b"\"usage\"") {
        assert_eq!(
            stripped, input,
            "dropped events from a stream without usage"
        );
    }
    // What was seen does not depend on stripping or on the pieces.
    assert_eq!(keep.seen, strip.seen, "stripping changed what was seen");
    let (whole, once) = run(true, &[input]);
    assert_eq!(whole, stripped, "output depends on how bytes arrive");
    assert_eq!(once.seen, strip.seen, "seen depends on how bytes arrive");

    // A whole body (or one event's data) as JSON.
    let tree = serde_json::from_slice::<serde_json::Value>(input).ok();
    if let Some(value) = &tree {
        let _ = read_usage(value);
        let _ = estimate_completion_tokens(value);
    }
    // What the scanner reads from an event without the tree is the tree's.
    if let Ok(text) = std::str::from_utf8(input) {
        let from_tree = tree
            .as_ref()
            .and_then(|v| v.get("model")?.as_str().map(str::to_string));
        assert_eq!(model_of(text), from_tree, "model_of disagrees with Value");
        let from_tree = tree.as_ref().map(|v| {
            let usage_only = v
                .get("choices")
                .and_then(|c| c.as_array())
                .is_some_and(|c| c.is_empty());
            (read_usage(v), usage_only)
        });
        assert_eq!(
            read_event(text),
            from_tree,
            "read_event disagrees with Value"
        );
    }
});
