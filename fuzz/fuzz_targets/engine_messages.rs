//! Arbitrary agent message sequences into the coordinator: the input is a
//! run of length-delimited `AgentMessage` protobufs, alternating between
//! two connected agents. Each goes through the real edge (`wire`) and the
//! real session jobs into a ledger; no panic, and the ledger's invariants
//! hold after every message (`allot_coordinator::fuzzing`).
#![no_main]

use allot::pb;
use allot_coordinator::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut harness = Harness::new();
    let mut rest = data;
    let mut agent = 0;
    while !rest.is_empty() {
        let Ok(message) = pb::AgentMessage::decode_length_delimited(&mut rest) else {
            break;
        };
        let Some(msg) = message.msg else { continue };
        if let Err(broken) = harness.step(agent, msg, false) {
            panic!("{broken}");
        }
        agent += 1;
    }
    if let Err(broken) = harness.finish() {
        panic!("{broken}");
    }
});
