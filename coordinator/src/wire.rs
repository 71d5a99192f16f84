//! The edge between the agent session protocol and the engine, both ways.
//! Every `AgentMessage` an agent sends becomes a checked command here, or an
//! `INVALID_ARGUMENT` naming the field; the engine's jobs never read a raw
//! wire amount. And every message the core decides to send (a
//! [`ToAgent`]) becomes a `CoordinatorMessage` here ([`to_agent`]): the
//! only other modules that build one are the placement directives and the
//! admin service's key and tariff pushes. In doubt this module refuses: a
//! bad amount is never read as "unlimited" or as zero.
//!
//! Bounds (the same for every agent, documented in docs/bounds.md, "Agent
//! messages"):
//! - requests and tokens in one amount: at most [`MAX_UNITS`];
//! - credits: decimal strings of at most 10^15 (see `allot::money`);
//! - tokens of one usage record: at most [`MAX_RECORD_TOKENS`] each; a
//!   larger count (a neuron's bug or a hostile agent) is charged at the
//!   bound, counted and logged, so that a record can neither wrap a sum nor
//!   wedge the agent's usage stream;
//! - strings of a usage record: at most [`MAX_RECORD_STRING`] bytes;
//! - records in one batch: at most [`MAX_BATCH_RECORDS`], slices in one
//!   reconcile: at most [`MAX_RECONCILE_SLICES`], one message at most
//!   [`MAX_MESSAGE_BYTES`];
//! - node reports: only for the agent's own neuron (its Hello's), an
//!   `http(s)` endpoint, at most [`MAX_NODE_GPUS`] GPUs and
//!   [`MAX_NODE_MODELS`] models, strings of at most [`MAX_NODE_STRING`]
//!   bytes.

use crate::lease::ToAgent;
use crate::ledger::{KeyRecord, Usage};
use allot::error::InvalidArgument;
use allot::key::{validate_id, KeyHash, Purpose};
use allot::pb;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::pb::coordinator_message::Msg as CoordMsg;
use allot::Amounts;

/// Largest agent message the coordinator decodes (8 MiB): a full usage
/// batch or a reconcile of 100,000 slices fits; a 24 MB node report does
/// not even reach the decoder's memory.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Largest count of requests or tokens one wire amount may carry (10^15):
/// any product of two admitted amounts stays inside `Decimal`'s range.
pub const MAX_UNITS: u64 = 1_000_000_000_000_000;
/// Largest count of prompt, completion or reasoning tokens one usage record
/// is charged (10^12): no single request comes near it.
pub const MAX_RECORD_TOKENS: u64 = allot::bounds::MAX_REQUEST_TOKENS;
/// Longest string field of a usage record, in bytes.
pub const MAX_RECORD_STRING: usize = 512;
/// Most records in one `UsageBatch` (agents send at most 512).
pub const MAX_BATCH_RECORDS: usize = 4_096;
/// Most slices in one `Reconcile`.
pub const MAX_RECONCILE_SLICES: usize = 100_000;

pub use crate::lease::Ask;

/// A usage batch: each record as received (its usage row keeps it) and as
/// the ledger settles it.
#[derive(Debug, Clone)]
pub struct UsageBatch {
    pub records: Vec<pb::UsageRecord>,
    pub usages: Vec<Usage>,
    /// Records whose token counts were over [`MAX_RECORD_TOKENS`].
    pub clamped: usize,
}

/// What an agent asks the engine to do.
#[derive(Debug, Clone)]
pub enum Command {
    KeyLookup { hash: Option<KeyHash>, raw: Vec<u8> },
    Ask(Ask),
    Usage(UsageBatch),
    GiveBack { key_id: String, amount: Amounts },
    Reconcile(Vec<(String, Amounts)>),
    PromptOverheads(std::collections::BTreeMap<String, u64>),
    InFlight(std::collections::BTreeMap<String, Amounts>),
}

/// Most models in one `PromptOverheads` (agents learn at most 256).
pub const MAX_OVERHEAD_MODELS: usize = 256;

/// Checks one message that the engine handles (not `Hello`, node reports
/// or directive results, which the session takes itself).
pub fn command(message: AgentMsg) -> Result<Command, InvalidArgument> {
    match message {
        AgentMsg::KeyLookup(lookup) => Ok(Command::KeyLookup {
            hash: KeyHash::from_slice("key_lookup.key_hash", &lookup.key_hash).ok(),
            raw: bounded_bytes("key_lookup.key_hash", lookup.key_hash, 64)?,
        }),
        AgentMsg::Ask(ask) => {
            validate_id("ask.key_id", &ask.key_id)?;
            Ok(Command::Ask(Ask {
                ask_id: ask.ask_id,
                need: amounts("ask.need", ask.need.as_ref())?.unwrap_or_else(Amounts::zero),
                want: amounts("ask.want", ask.want.as_ref())?.unwrap_or_else(Amounts::zero),
                key_id: ask.key_id,
            }))
        }
        AgentMsg::Usage(batch) => usage_batch(batch).map(Command::Usage),
        AgentMsg::GiveBack(give_back) => {
            validate_id("give_back.key_id", &give_back.key_id)?;
            let amount = amounts("give_back.amount", give_back.amount.as_ref())?
                .ok_or_else(|| InvalidArgument::new("give_back.amount", "is required"))?;
            Ok(Command::GiveBack {
                key_id: give_back.key_id,
                amount,
            })
        }
        AgentMsg::Reconcile(reconcile) => {
            if reconcile.slices.len() > MAX_RECONCILE_SLICES {
                return Err(InvalidArgument::new(
                    "reconcile.slices",
                    format!("must hold at most {MAX_RECONCILE_SLICES} slices"),
                ));
            }
            let mut slices = Vec::with_capacity(reconcile.slices.len());
            for (i, slice) in reconcile.slices.into_iter().enumerate() {
                validate_id(&format!("reconcile.slices[{i}].key_id"), &slice.key_id)?;
                let held = amounts(&format!("reconcile.slices[{i}].held"), slice.held.as_ref())?
                    .ok_or_else(|| {
                        InvalidArgument::new(format!("reconcile.slices[{i}].held"), "is required")
                    })?;
                slices.push((slice.key_id, held));
            }
            Ok(Command::Reconcile(slices))
        }
        AgentMsg::PromptOverheads(overheads) => {
            if overheads.tokens_by_model.len() > MAX_OVERHEAD_MODELS {
                return Err(InvalidArgument::new(
                    "prompt_overheads.tokens_by_model",
                    format!("must hold at most {MAX_OVERHEAD_MODELS} models"),
                ));
            }
            for (model, tokens) in &overheads.tokens_by_model {
                if model.is_empty() || model.len() > MAX_RECORD_STRING {
                    return Err(InvalidArgument::new(
                        "prompt_overheads.tokens_by_model",
                        format!("model names must be 1 to {MAX_RECORD_STRING} bytes"),
                    ));
                }
                if *tokens > MAX_RECORD_TOKENS {
                    return Err(InvalidArgument::new(
                        format!("prompt_overheads.tokens_by_model[{model}]"),
                        format!("is too large: at most {MAX_RECORD_TOKENS}"),
                    ));
                }
            }
            Ok(Command::PromptOverheads(
                overheads.tokens_by_model.into_iter().collect(),
            ))
        }
        AgentMsg::InFlight(in_flight) => {
            if in_flight.keys.len() > MAX_RECONCILE_SLICES {
                return Err(InvalidArgument::new(
                    "in_flight.keys",
                    format!("must hold at most {MAX_RECONCILE_SLICES} keys"),
                ));
            }
            let mut keys = std::collections::BTreeMap::new();
            for (i, key) in in_flight.keys.into_iter().enumerate() {
                validate_id(&format!("in_flight.keys[{i}].key_id"), &key.key_id)?;
                let amount = amounts(&format!("in_flight.keys[{i}].held"), key.held.as_ref())?
                    .unwrap_or_else(Amounts::zero);
                keys.insert(key.key_id, amount);
            }
            Ok(Command::InFlight(keys))
        }
        AgentMsg::Hello(_) => Err(InvalidArgument::new(
            "hello",
            "may only be sent once, as the first message of a session",
        )),
        AgentMsg::NodeStatus(_) | AgentMsg::DirectiveResult(_) => Err(InvalidArgument::new(
            "msg",
            "node reports are not engine commands",
        )),
    }
}

/// Most GPUs in one node report.
pub const MAX_NODE_GPUS: usize = 64;
/// Most models in one node report.
pub const MAX_NODE_MODELS: usize = 256;
/// Most capabilities of one model, each at most [`MAX_NODE_STRING`] bytes.
pub const MAX_MODEL_CAPABILITIES: usize = 32;
/// Longest string of a node report (ids, model names, the endpoint).
pub const MAX_NODE_STRING: usize = 512;

/// Checks a node report: bounded in size and model count, for the neuron
/// the agent named in its Hello, with an `http(s)` endpoint (placement
/// sends clients there).
pub fn node_status(status: &pb::NodeStatus, own_neuron: &str) -> Result<(), InvalidArgument> {
    if status.neuron_id != own_neuron {
        return Err(InvalidArgument::new(
            "node_status.neuron_id",
            format!(
                "an agent reports only its own neuron ({own_neuron:?}, from its hello), not {:?}",
                allot::bounds::truncated(&status.neuron_id, 64)
            ),
        ));
    }
    if status.endpoint.len() > MAX_NODE_STRING
        || !(status.endpoint.starts_with("http://") || status.endpoint.starts_with("https://"))
    {
        return Err(InvalidArgument::new(
            "node_status.endpoint",
            format!("must be an http:// or https:// URL of at most {MAX_NODE_STRING} bytes"),
        ));
    }
    if status.gpus.len() > MAX_NODE_GPUS {
        return Err(InvalidArgument::new(
            "node_status.gpus",
            format!("must list at most {MAX_NODE_GPUS} GPUs"),
        ));
    }
    if status.models.len() > MAX_NODE_MODELS {
        return Err(InvalidArgument::new(
            "node_status.models",
            format!("must list at most {MAX_NODE_MODELS} models"),
        ));
    }
    for (i, model) in status.models.iter().enumerate() {
        if model.model.is_empty() || model.model.len() > MAX_NODE_STRING {
            return Err(InvalidArgument::new(
                format!("node_status.models[{i}].model"),
                format!("must be 1 to {MAX_NODE_STRING} bytes"),
            ));
        }
        if model.capabilities.len() > MAX_MODEL_CAPABILITIES
            || model.capabilities.iter().any(|c| c.len() > MAX_NODE_STRING)
        {
            return Err(InvalidArgument::new(
                format!("node_status.models[{i}].capabilities"),
                format!(
                    "must list at most {MAX_MODEL_CAPABILITIES} capabilities of at most {MAX_NODE_STRING} bytes"
                ),
            ));
        }
    }
    Ok(())
}

fn bounded_bytes(field: &str, bytes: Vec<u8>, max: usize) -> Result<Vec<u8>, InvalidArgument> {
    if bytes.len() > max {
        return Err(InvalidArgument::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// A wire amount, checked: `None` when absent. Units left unset stay unset
/// (a slice of a key with no limit in that unit).
pub fn amounts(
    field: &str,
    value: Option<&pb::Amounts>,
) -> Result<Option<Amounts>, InvalidArgument> {
    let Some(value) = value else {
        return Ok(None);
    };
    for (unit, count) in [("requests", value.requests), ("tokens", value.tokens)] {
        if count.is_some_and(|c| c > MAX_UNITS) {
            return Err(InvalidArgument::new(
                format!("{field}.{unit}"),
                format!("is too large: at most {MAX_UNITS}"),
            ));
        }
    }
    Amounts::from_pb(field, Some(value)).map(Some)
}

fn bounded_str(field: &str, index: usize, value: &str) -> Result<(), InvalidArgument> {
    if value.len() > MAX_RECORD_STRING {
        return Err(InvalidArgument::new(
            format!("usage.records[{index}].{field}"),
            format!("must be at most {MAX_RECORD_STRING} bytes"),
        ));
    }
    Ok(())
}

fn usage_batch(batch: pb::UsageBatch) -> Result<UsageBatch, InvalidArgument> {
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(InvalidArgument::new(
            "usage.records",
            format!("must hold at most {MAX_BATCH_RECORDS} records"),
        ));
    }
    let mut records = batch.records;
    let mut usages = Vec::with_capacity(records.len());
    let mut clamped = 0;
    for (i, record) in records.iter_mut().enumerate() {
        let (usage, was_clamped) = usage_record(i, record)?;
        if was_clamped {
            // Rows, demand and sums downstream read the clamped counts.
            clamped += 1;
            for count in [
                &mut record.prompt_tokens,
                &mut record.completion_tokens,
                &mut record.reasoning_tokens,
            ] {
                *count = (*count).min(MAX_RECORD_TOKENS);
            }
        }
        usages.push(usage);
    }
    Ok(UsageBatch {
        records,
        usages,
        clamped,
    })
}

/// One record, checked; `true` when a token count was clamped.
fn usage_record(i: usize, record: &pb::UsageRecord) -> Result<(Usage, bool), InvalidArgument> {
    let field = |name: &str| format!("usage.records[{i}].{name}");
    if record.seq == 0 {
        return Err(InvalidArgument::new(field("seq"), "must be at least 1"));
    }
    validate_id(&field("key_id"), &record.key_id)?;
    for (name, value) in [
        ("request_id", &record.request_id),
        ("account_id", &record.account_id),
        ("model_requested", &record.model_requested),
        ("model_served", &record.model_served),
        ("trace_id", &record.trace_id),
        ("span_id", &record.span_id),
        ("batch_id", &record.batch_id),
        ("completion_window", &record.completion_window),
        ("neuron_id", &record.neuron_id),
        ("refusal_code", &record.refusal_code),
        ("cost", &record.cost),
    ] {
        bounded_str(name, i, value)?;
    }
    let purpose = Purpose::from_pb(&field("purpose"), record.purpose)?;
    if record.admitted_at_unix_ms < 0 {
        return Err(InvalidArgument::new(
            field("admitted_at_unix_ms"),
            "must not be negative",
        ));
    }
    // The price time is the admission, or a batch's creation at most 7
    // days before it (the agent refuses older ones): an agent cannot pick
    // an older, cheaper tariff for its usage.
    let priced_at = record.priced_at_unix_ms;
    if priced_at != 0
        && !(record
            .admitted_at_unix_ms
            .saturating_sub(allot::bounds::MAX_BATCH_AGE_MS)
            ..=record.admitted_at_unix_ms)
            .contains(&priced_at)
    {
        return Err(InvalidArgument::new(
            field("priced_at_unix_ms"),
            "must be at most 7 days before the admission time, and not after it",
        ));
    }
    let reserved =
        amounts(&field("reserved"), record.reserved.as_ref())?.unwrap_or_else(Amounts::zero);
    let clamp = |v: u64| v.min(MAX_RECORD_TOKENS);
    let clamped = record.prompt_tokens > MAX_RECORD_TOKENS
        || record.completion_tokens > MAX_RECORD_TOKENS
        || record.reasoning_tokens > MAX_RECORD_TOKENS;
    Ok((
        Usage {
            seq: record.seq,
            key_id: record.key_id.clone(),
            model: record.model_requested.clone(),
            purpose,
            completion_window: (!record.completion_window.is_empty())
                .then(|| record.completion_window.clone()),
            priced_at: match record.priced_at_unix_ms {
                0 => record.admitted_at_unix_ms,
                at => at,
            },
            prompt_tokens: clamp(record.prompt_tokens),
            completion_tokens: clamp(record.completion_tokens),
            charged: record.charged,
            reserved,
        },
        clamped,
    ))
}

/// A message the core decided to send, as the agent's stream carries it.
pub fn to_agent(message: ToAgent) -> CoordMsg {
    match message {
        ToAgent::Welcome {
            high_water_seq,
            lease_ttl,
        } => CoordMsg::Welcome(pb::Welcome {
            high_water_seq,
            lease_ttl_ms: lease_ttl.as_millis() as u64,
        }),
        ToAgent::Grant {
            ask_id,
            key_id,
            amount,
            ttl,
            limits,
            at,
        } => CoordMsg::Grant(pb::Grant {
            ask_id,
            key_id,
            amount: Some(amount.to_pb()),
            ttl_ms: ttl.as_millis() as u64,
            limits: limits
                .iter()
                .map(|view| pb::LimitView {
                    unit: view.limit.unit.to_pb() as i32,
                    cap: allot::money::format(view.limit.amount),
                    // Free under the cap: no agent holds it, this one's
                    // new slice included (the agent adds what it holds).
                    remaining: allot::money::format(view.remaining),
                    reset_in_ms: view
                        .next_refill
                        .map(|refill| (refill - at).max(0) as u64)
                        .unwrap_or(0),
                    window: Some(view.limit.window.to_pb()),
                })
                .collect(),
        }),
        ToAgent::Deny {
            ask_id,
            key_id,
            reason,
            retry_after_ms,
            message,
        } => CoordMsg::Deny(pb::Deny {
            ask_id,
            key_id,
            reason: deny_reason(reason) as i32,
            retry_after_ms,
            message,
        }),
        ToAgent::Revoke { key_id, reason } => CoordMsg::Revoke(pb::Revoke {
            key_id,
            reason: reason.into(),
        }),
        ToAgent::UsageAck { high_water_seq } => CoordMsg::UsageAck(pb::UsageAck { high_water_seq }),
        ToAgent::KeyLookup { key_hash, key } => CoordMsg::Key(pb::KeyLookupResult {
            key_hash,
            key: key.as_ref().map(key_info),
        }),
    }
}

fn deny_reason(reason: crate::lease::Refused) -> pb::DenyReason {
    use crate::lease::Refused;
    match reason {
        Refused::InsufficientQuota => pb::DenyReason::InsufficientQuota,
        Refused::RateLimited => pb::DenyReason::RateLimited,
        Refused::KeyRevoked => pb::DenyReason::KeyRevoked,
        Refused::UnknownKey => pb::DenyReason::UnknownKey,
        Refused::HeldElsewhere => pb::DenyReason::HeldElsewhere,
    }
}

/// A key as agents see it (lookups and pushed updates).
pub fn key_info(key: &KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        key_id: key.key_id.clone(),
        account_id: key.account_id.clone(),
        purpose: key.purpose.to_pb() as i32,
        revoked: key.revoked,
        allowed_models: key.allowed_models.clone(),
        name: key.name.clone(),
    }
}

/// Every tariff, as agents price with them.
pub fn tariff_update(tariffs: &allot::tariff::TariffBook) -> CoordMsg {
    CoordMsg::Tariffs(pb::TariffUpdate {
        tariffs: tariffs.all().map(|t| t.to_pb()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(need: pb::Amounts, want: pb::Amounts) -> AgentMsg {
        AgentMsg::Ask(pb::AllowanceAsk {
            ask_id: 1,
            key_id: "k1".into(),
            need: Some(need),
            want: Some(want),
        })
    }

    #[test]
    fn an_ask_over_the_bound_is_refused_naming_the_field() {
        let huge = pb::Amounts {
            tokens: Some(u64::MAX),
            ..Default::default()
        };
        let err = command(ask(pb::Amounts::default(), huge)).unwrap_err();
        assert_eq!(err.field, "ask.want.tokens");
        assert!(err.message.contains("too large"), "{}", err.message);
        let bad_credits = pb::Amounts {
            credits: Some("lots".into()),
            ..Default::default()
        };
        let err = command(ask(bad_credits, pb::Amounts::default())).unwrap_err();
        assert_eq!(err.field, "ask.need.credits");
    }

    #[test]
    fn an_ask_without_amounts_asks_for_nothing_never_for_everything() {
        let Command::Ask(ask) = command(AgentMsg::Ask(pb::AllowanceAsk {
            ask_id: 1,
            key_id: "k1".into(),
            need: None,
            want: None,
        }))
        .unwrap() else {
            panic!("an ask");
        };
        assert!(ask.need.is_zero() && ask.want.is_zero());
        assert_eq!(ask.want, Amounts::zero());
    }

    #[test]
    fn a_give_back_or_slice_with_a_bad_amount_is_refused_not_read_as_unlimited() {
        let err = command(AgentMsg::GiveBack(pb::Return {
            key_id: "k1".into(),
            amount: Some(pb::Amounts {
                credits: Some("-1".into()),
                ..Default::default()
            }),
        }))
        .unwrap_err();
        assert_eq!(err.field, "give_back.amount.credits");
        let err = command(AgentMsg::GiveBack(pb::Return {
            key_id: "k1".into(),
            amount: None,
        }))
        .unwrap_err();
        assert_eq!(err.field, "give_back.amount");
        let err = command(AgentMsg::Reconcile(pb::Reconcile {
            slices: vec![pb::SliceReport {
                key_id: "k1".into(),
                held: Some(pb::Amounts {
                    requests: Some(MAX_UNITS + 1),
                    ..Default::default()
                }),
            }],
        }))
        .unwrap_err();
        assert_eq!(err.field, "reconcile.slices[0].held.requests");
    }

    #[test]
    fn node_reports_are_bounded_and_only_for_the_agents_own_neuron() {
        let good = pb::NodeStatus {
            neuron_id: "n1".into(),
            endpoint: "http://10.0.0.1:8000".into(),
            ..Default::default()
        };
        assert!(node_status(&good, "n1").is_ok());
        assert_eq!(
            node_status(&good, "n2").unwrap_err().field,
            "node_status.neuron_id"
        );
        let attacker = pb::NodeStatus {
            endpoint: "javascript:alert(1)".into(),
            ..good.clone()
        };
        assert_eq!(
            node_status(&attacker, "n1").unwrap_err().field,
            "node_status.endpoint"
        );
        let huge = pb::NodeStatus {
            models: vec![
                pb::ModelState {
                    model: "m".into(),
                    ..Default::default()
                };
                MAX_NODE_MODELS + 1
            ],
            ..good.clone()
        };
        assert_eq!(
            node_status(&huge, "n1").unwrap_err().field,
            "node_status.models"
        );
        let long_name = pb::NodeStatus {
            models: vec![pb::ModelState {
                model: "m".repeat(MAX_NODE_STRING + 1),
                ..Default::default()
            }],
            ..good
        };
        assert_eq!(
            node_status(&long_name, "n1").unwrap_err().field,
            "node_status.models[0].model"
        );
    }

    #[test]
    fn usage_records_are_checked_and_huge_token_counts_are_clamped() {
        let record = pb::UsageRecord {
            seq: 1,
            key_id: "k1".into(),
            prompt_tokens: u64::MAX,
            completion_tokens: 5,
            charged: true,
            ..Default::default()
        };
        let Command::Usage(batch) = command(AgentMsg::Usage(pb::UsageBatch {
            records: vec![record.clone()],
        }))
        .unwrap() else {
            panic!("a batch");
        };
        assert_eq!(batch.clamped, 1);
        assert_eq!(batch.records[0].prompt_tokens, MAX_RECORD_TOKENS);
        assert_eq!(batch.usages[0].prompt_tokens, MAX_RECORD_TOKENS);
        assert_eq!(batch.usages[0].completion_tokens, 5);

        let bad_purpose = pb::UsageRecord {
            purpose: 99,
            ..record.clone()
        };
        let err = command(AgentMsg::Usage(pb::UsageBatch {
            records: vec![record.clone(), bad_purpose],
        }))
        .unwrap_err();
        assert_eq!(err.field, "usage.records[1].purpose");
        let backdated = pb::UsageRecord {
            admitted_at_unix_ms: 1_800_000_000_000,
            priced_at_unix_ms: 1_800_000_000_000 - allot::bounds::MAX_BATCH_AGE_MS - 1,
            ..record.clone()
        };
        let err = command(AgentMsg::Usage(pb::UsageBatch {
            records: vec![backdated],
        }))
        .unwrap_err();
        assert_eq!(err.field, "usage.records[0].priced_at_unix_ms");
        let long_model = pb::UsageRecord {
            model_requested: "m".repeat(MAX_RECORD_STRING + 1),
            ..record
        };
        let err = command(AgentMsg::Usage(pb::UsageBatch {
            records: vec![long_model],
        }))
        .unwrap_err();
        assert_eq!(err.field, "usage.records[0].model_requested");
    }
}
