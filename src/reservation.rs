//! The reservation: an upper bound of a request's cost, taken before dispatch
//! (SPEC "Admission" 2).
//!
//! Byte-level tokenizers emit at most one token per byte of text, so the
//! UTF-8 length of every piece of prompt text, plus a fixed overhead per
//! message and per request for the chat template, bounds the prompt tokens.
//! Images and other non-text parts are charged a configured amount. The
//! completion is bounded by the smallest completion limit the client gave
//! in any field a supported server honours ([`COMPLETION_LIMIT_FIELDS`]),
//! times every fan-out (`n`, `best_of`, prompt arrays); the agent then
//! writes the bound it reserved into every such field
//! ([`write_completion_bound`]), so that no server, whichever field it
//! prefers, generates more than was reserved. What cannot be bounded before
//! dispatch (`background` responses, stored prompts, unknown media parts)
//! is refused, naming the parameter.

use serde_json::{Map, Value};

/// Overheads of the chat template and defaults, configurable per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReservationPolicy {
    /// Template tokens around each chat message (role markers, separators).
    /// 8 covers ChatML, Llama 3 and Mistral templates.
    pub per_message_tokens: u64,
    /// Template tokens once per request (BOS, the assistant header).
    pub per_request_tokens: u64,
    /// Tokens charged for each image or other non-text content part.
    pub image_tokens: u64,
    /// `max_tokens` set on requests that name none, when the allowance
    /// can pay for it.
    pub default_max_tokens: u64,
}

impl Default for ReservationPolicy {
    fn default() -> Self {
        ReservationPolicy {
            per_message_tokens: 8,
            per_request_tokens: 16,
            image_tokens: 2_000,
            default_max_tokens: 4_096,
        }
    }
}

/// Which OpenAI operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    /// `/v1/embeddings`: charged by input tokens, generates nothing.
    Embeddings,
    /// `/v1/responses`: the Responses API (`input`, `instructions`,
    /// `max_output_tokens`); usage arrives as `input_tokens`/`output_tokens`.
    Responses,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::Responses,
    ];

    /// The URL path the operation is served on.
    pub fn path(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "/v1/chat/completions",
            Operation::Completions => "/v1/completions",
            Operation::Embeddings => "/v1/embeddings",
            Operation::Responses => "/v1/responses",
        }
    }

    /// The span name of a request on this path (`POST /v1/...`).
    pub fn span_name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "POST /v1/chat/completions",
            Operation::Completions => "POST /v1/completions",
            Operation::Embeddings => "POST /v1/embeddings",
            Operation::Responses => "POST /v1/responses",
        }
    }

    /// OpenTelemetry GenAI `gen_ai.operation.name`.
    pub fn otel_name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat",
            Operation::Completions => "text_completion",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    /// The body field that bounds the completion, which the agent always
    /// sets; `None` when the operation generates nothing.
    pub fn completion_field(self) -> Option<&'static str> {
        match self {
            Operation::ChatCompletions | Operation::Completions => Some("max_tokens"),
            Operation::Responses => Some("max_output_tokens"),
            Operation::Embeddings => None,
        }
    }

    /// Whether a stream reports usage only when asked with
    /// `stream_options.include_usage` (Responses streams always do).
    pub fn usage_chunk_on_request(self) -> bool {
        matches!(self, Operation::ChatCompletions | Operation::Completions)
    }
}

/// A body field that some server reads as the completion limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitField {
    /// Its path in the body (`["options", "num_predict"]`).
    pub path: &'static [&'static str],
    /// Which servers honour it, and how (for docs/http-api.md's table).
    pub honoured_by: &'static str,
    /// A negative value means "no limit" to its servers (llama.cpp's and
    /// Ollama's `-1`); the agent reads it as absent and rewrites it.
    pub negative_is_unlimited: bool,
}

/// Every completion-limit field of chat and legacy completions that a
/// supported server honours. The agent reads all of them (the smallest
/// wins) and overwrites each one present with the bound it reserved.
pub const COMPLETION_LIMIT_FIELDS: [LimitField; 5] = [
    LimitField {
        path: &["max_tokens"],
        honoured_by: "OpenAI, vLLM, llama.cpp, Ollama, TGI (always written)",
        negative_is_unlimited: false,
    },
    LimitField {
        path: &["max_completion_tokens"],
        honoured_by: "OpenAI; vLLM (`max_completion_tokens or max_tokens`)",
        negative_is_unlimited: false,
    },
    LimitField {
        path: &["n_predict"],
        honoured_by: "llama.cpp (wins over max_tokens; -1 is unlimited)",
        negative_is_unlimited: true,
    },
    LimitField {
        path: &["max_new_tokens"],
        honoured_by: "TGI",
        negative_is_unlimited: false,
    },
    LimitField {
        path: &["options", "num_predict"],
        honoured_by: "Ollama (-1 and -2 are unlimited)",
        negative_is_unlimited: true,
    },
];

/// The Responses API's completion limit.
pub const RESPONSES_LIMIT_FIELD: LimitField = LimitField {
    path: &["max_output_tokens"],
    honoured_by: "OpenAI, vLLM (always written)",
    negative_is_unlimited: false,
};

/// The limit fields `operation` reads.
pub fn limit_fields(operation: Operation) -> &'static [LimitField] {
    match operation {
        Operation::ChatCompletions | Operation::Completions => &COMPLETION_LIMIT_FIELDS,
        Operation::Responses => std::slice::from_ref(&RESPONSES_LIMIT_FIELD),
        Operation::Embeddings => &[],
    }
}

/// Most prompts in one legacy completions request (as for embeddings).
pub const MAX_PROMPTS: u64 = 2048;
/// Longest model name accepted, in bytes.
pub use crate::bounds::MAX_MODEL_BYTES;

/// Content part types whose tokens the agent can bound: text is counted by
/// its bytes, media are charged `image_tokens` each. Any other type
/// (`video_url`, say) is refused before dispatch.
const TEXT_PARTS: [&str; 6] = [
    "text",
    "input_text",
    "output_text",
    "refusal",
    "summary_text",
    "reasoning_text",
];
const MEDIA_PARTS: [&str; 6] = [
    "image_url",
    "input_image",
    "image",
    "input_audio",
    "file",
    "input_file",
];

/// Refuses content parts of a type whose tokens cannot be bounded.
fn check_parts(param: &str, content: Option<&Value>) -> Result<(), BadRequest> {
    let Some(Value::Array(parts)) = content else {
        return Ok(());
    };
    for (j, part) in parts.iter().enumerate() {
        let Some(kind) = part.get("type") else {
            continue;
        };
        let known = kind
            .as_str()
            .is_some_and(|k| TEXT_PARTS.contains(&k) || MEDIA_PARTS.contains(&k));
        if !known {
            return Err(BadRequest::new(
                &format!("{param}[{j}].type"),
                format!(
                    "content part type {kind} is not supported: its tokens cannot be bounded before dispatch"
                ),
            ));
        }
    }
    Ok(())
}

fn field_at<'a>(body: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut map = body;
    for parent in parents {
        map = map.get(*parent)?.as_object()?;
    }
    map.get(*last)
}

/// The smallest completion limit the client gave in any of `fields`.
fn client_limit(
    body: &Map<String, Value>,
    fields: &[LimitField],
) -> Result<Option<u64>, BadRequest> {
    let mut limit: Option<u64> = None;
    for field in fields {
        if let [parent, _] = field.path {
            match body.get(*parent) {
                None | Some(Value::Null) | Some(Value::Object(_)) => {}
                Some(other) => {
                    return Err(BadRequest::new(
                        parent,
                        format!("{parent} must be an object, got {}", type_name(other)),
                    ))
                }
            }
        }
        let name = field.path.join(".");
        let value = match field_at(body, field.path) {
            None | Some(Value::Null) => continue,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => v,
                (None, Some(v)) if v < 0 && field.negative_is_unlimited => continue,
                _ => {
                    return Err(BadRequest::new(
                        &name,
                        format!("{name} must be a non-negative integer, got {n}"),
                    ))
                }
            },
            Some(other) => {
                return Err(BadRequest::new(
                    &name,
                    format!("{name} must be an integer, got {}", type_name(other)),
                ))
            }
        };
        // llama-cpp-python reads `max_tokens: 0` as "up to the context"
        // and vLLM refuses it: a bound of 0 cannot be sent to every
        // server, so it is refused here (as OpenAI does).
        if value == 0 {
            return Err(BadRequest::new(&name, format!("{name} must be at least 1")));
        }
        limit = Some(limit.map_or(value, |l| l.min(value)));
    }
    Ok(limit)
}

/// Writes `bound`, the completion tokens per choice the agent reserved,
/// into the operation's own limit field and into every other limit field
/// the client sent, so that whichever field a server honours holds the
/// bound. Returns whether the body changed.
pub fn write_completion_bound(
    operation: Operation,
    body: &mut Map<String, Value>,
    bound: u64,
) -> bool {
    let mut changed = false;
    for field in limit_fields(operation) {
        let Some((last, parents)) = field.path.split_last() else {
            continue;
        };
        let primary = parents.is_empty() && operation.completion_field() == Some(*last);
        // Limit fields are at most one object deep (`options.num_predict`).
        let map = match parents {
            [] => &mut *body,
            [parent] => match body.get_mut(*parent).and_then(Value::as_object_mut) {
                Some(inner) => inner,
                None => continue,
            },
            _ => continue,
        };
        let present = map.get(*last).is_some_and(|v| !v.is_null());
        if !(present || primary) {
            continue;
        }
        let value = Value::from(bound);
        if map.get(*last) != Some(&value) {
            map.insert((*last).to_string(), value);
            changed = true;
        }
    }
    changed
}

/// A request body that cannot be admitted: which parameter, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub param: Option<String>,
    pub message: String,
}

impl BadRequest {
    fn new(param: &str, message: impl Into<String>) -> Self {
        BadRequest {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }
}

/// What admission needs to know about a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk itself.
    pub client_wants_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`; `None` when absent.
    pub max_completion_tokens: Option<u64>,
    /// Number of choices (`n`, or `best_of` when larger).
    pub choices: u64,
    /// Upper bound of the prompt tokens.
    pub prompt_tokens_bound: u64,
}

impl RequestFacts {
    /// Upper bound of the tokens of the whole request with `completion`
    /// tokens allowed per choice.
    pub fn token_bound(&self, completion: u64) -> u64 {
        self.prompt_tokens_bound
            .saturating_add(completion.saturating_mul(self.choices))
    }
}

fn optional_u64(body: &Map<String, Value>, name: &str) -> Result<Option<u64>, BadRequest> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None => Err(BadRequest::new(
                name,
                format!("{name} must be a non-negative integer, got {n}"),
            )),
        },
        Some(other) => Err(BadRequest::new(
            name,
            format!("{name} must be an integer, got {}", type_name(other)),
        )),
    }
}

fn optional_bool(body: &Map<String, Value>, name: &str) -> Result<Option<bool>, BadRequest> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(BadRequest::new(
            name,
            format!("{name} must be a boolean, got {}", type_name(other)),
        )),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Bytes of every string in a JSON value (keys of objects included), with
/// images charged `image_tokens` each instead of their URL or data.
fn text_bytes(value: &Value, policy: &ReservationPolicy) -> u64 {
    match value {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(|v| text_bytes(v, policy)).sum(),
        Value::Object(map) => {
            let part_type = map.get("type").and_then(Value::as_str);
            if matches!(
                part_type,
                Some("image_url" | "input_image" | "image" | "input_audio" | "file")
            ) {
                return policy.image_tokens;
            }
            map.iter()
                .map(|(k, v)| k.len() as u64 + text_bytes(v, policy))
                .sum()
        }
        Value::Number(n) => n.to_string().len() as u64,
        Value::Bool(_) | Value::Null => 0,
    }
}

/// Parses a request body: a JSON object, with no key twice in any object.
/// Servers disagree on which of two equal keys wins; a body read one way
/// here and another way by the neuron could carry a bound the neuron does
/// not honour, so such a body is refused.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(map))) => Ok(map),
        Ok(_) => Err(BadRequest {
            param: None,
            message: "the request body must be a JSON object".into(),
        }),
        Err(e) => Err(BadRequest {
            param: None,
            message: format!("malformed JSON in the request body: {e}"),
        }),
    }
}

/// A JSON value whose objects have unique keys.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Strict(Value::Array(items)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Strict(Value::Object(object)))
    }
}

/// Reads what admission needs from a parsed request body and bounds its
/// prompt. Refuses bodies a neuron would refuse, naming the parameter.
pub fn inspect(
    operation: Operation,
    body: &Map<String, Value>,
    policy: &ReservationPolicy,
) -> Result<RequestFacts, BadRequest> {
    let model = match body.get("model") {
        Some(Value::String(m)) if m.len() > MAX_MODEL_BYTES => {
            return Err(BadRequest::new(
                "model",
                format!("model must be at most {MAX_MODEL_BYTES} bytes"),
            ))
        }
        // The same rule as every other model name allot takes in: not
        // blank, no control characters (they would reach logs, metrics
        // and the usage store).
        Some(Value::String(m)) if !m.is_empty() => {
            crate::bounds::check_model("model", m)
                .map_err(|e| BadRequest::new("model", format!("model {}", e.message)))?;
            m.clone()
        }
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(BadRequest::new(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(other) => {
            return Err(BadRequest::new(
                "model",
                format!("model must be a string, got {}", type_name(other)),
            ))
        }
    };
    if operation == Operation::Embeddings {
        return inspect_embeddings(model, body, policy);
    }
    let stream = optional_bool(body, "stream")?.unwrap_or(false);
    if operation == Operation::Responses {
        return inspect_responses(model, stream, body, policy);
    }
    let client_wants_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(BadRequest::new(
                    "stream_options.include_usage",
                    "stream_options.include_usage must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(BadRequest::new(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    let max_completion_tokens = client_limit(body, &COMPLETION_LIMIT_FIELDS)?;
    let n = optional_u64(body, "n")?.unwrap_or(1);
    let best_of = optional_u64(body, "best_of")?.unwrap_or(1);
    if n == 0 || n > 128 {
        return Err(BadRequest::new("n", "n must be between 1 and 128"));
    }
    if best_of > 128 {
        return Err(BadRequest::new("best_of", "best_of must be at most 128"));
    }
    // Each choice (and each candidate of best_of) is generated for each
    // prompt of a legacy completions request.
    let mut choices = n.max(best_of);

    let prompt_tokens_bound = match operation {
        Operation::ChatCompletions => {
            let messages = match body.get("messages") {
                Some(Value::Array(messages)) if !messages.is_empty() => messages,
                Some(Value::Array(_)) => {
                    return Err(BadRequest::new("messages", "messages must not be empty"))
                }
                None | Some(Value::Null) => {
                    return Err(BadRequest::new("messages", "you must provide messages"))
                }
                Some(other) => {
                    return Err(BadRequest::new(
                        "messages",
                        format!("messages must be an array, got {}", type_name(other)),
                    ))
                }
            };
            let mut bound = policy.per_request_tokens;
            for (i, message) in messages.iter().enumerate() {
                let Some(fields) = message.as_object() else {
                    return Err(BadRequest::new(
                        &format!("messages[{i}]"),
                        format!("messages[{i}] must be an object"),
                    ));
                };
                check_parts(&format!("messages[{i}].content"), fields.get("content"))?;
                bound = bound
                    .saturating_add(policy.per_message_tokens)
                    .saturating_add(text_bytes(message, policy));
            }
            // Tool and function definitions are rendered into the prompt.
            for extra in ["tools", "functions", "response_format"] {
                if let Some(value) = body.get(extra) {
                    bound = bound.saturating_add(text_bytes(value, policy));
                }
            }
            bound
        }
        Operation::Embeddings | Operation::Responses => unreachable!("inspected above"),
        Operation::Completions => {
            let prompt = match body.get("prompt") {
                Some(prompt) => prompt,
                None => return Err(BadRequest::new("prompt", "you must provide a prompt")),
            };
            let (prompt_bytes, prompts) = prompt_items("prompt", prompt)?;
            if prompts > MAX_PROMPTS {
                return Err(BadRequest::new(
                    "prompt",
                    format!("prompt must not have more than {MAX_PROMPTS} items"),
                ));
            }
            // Every prompt gets its own choices, each rendered with its own
            // special tokens and suffix.
            choices = choices.saturating_mul(prompts);
            let suffix = body.get("suffix").map_or(0, |s| text_bytes(s, policy));
            policy
                .per_request_tokens
                .saturating_add(suffix)
                .saturating_mul(prompts)
                .saturating_add(prompt_bytes)
        }
    };
    Ok(RequestFacts {
        model,
        stream,
        client_wants_usage,
        max_completion_tokens,
        choices,
        prompt_tokens_bound,
    })
}

/// Bytes of one prompt in the completions/embeddings forms: a string, or
/// one token per element of a pre-tokenized array.
fn prompt_items(param: &str, prompt: &Value) -> Result<(u64, u64), BadRequest> {
    let shape = || {
        BadRequest::new(
            param,
            format!("{param} must be a string, an array of strings or of token ids"),
        )
    };
    match prompt {
        Value::String(s) => Ok((s.len() as u64, 1)),
        Value::Array(items) if items.is_empty() => {
            Err(BadRequest::new(param, format!("{param} must not be empty")))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => Ok((items.len() as u64, 1)),
        Value::Array(items) => {
            let mut total = 0u64;
            for item in items {
                total = total.saturating_add(match item {
                    Value::String(s) => s.len() as u64,
                    Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                        tokens.len() as u64
                    }
                    _ => return Err(shape()),
                });
            }
            Ok((total, items.len() as u64))
        }
        _ => Err(shape()),
    }
}

/// `/v1/embeddings`: the input alone is charged; nothing is generated, so
/// the completion is fixed at zero and the body is never changed.
fn inspect_embeddings(
    model: String,
    body: &Map<String, Value>,
    policy: &ReservationPolicy,
) -> Result<RequestFacts, BadRequest> {
    let input = match body.get("input") {
        None | Some(Value::Null) => {
            return Err(BadRequest::new("input", "you must provide an input"))
        }
        Some(input) => input,
    };
    let (bytes, items) = prompt_items("input", input)?;
    if items > 2048 {
        return Err(BadRequest::new(
            "input",
            "input must not have more than 2048 items",
        ));
    }
    Ok(RequestFacts {
        model,
        stream: false,
        client_wants_usage: false,
        max_completion_tokens: Some(0),
        choices: 1,
        // Each input is encoded separately, with its special tokens.
        prompt_tokens_bound: policy
            .per_request_tokens
            .saturating_add(bytes)
            .saturating_add(items.saturating_mul(policy.per_message_tokens)),
    })
}

/// `/v1/responses`: `instructions` and `input` (a string or a list of
/// items) are the prompt, `max_output_tokens` bounds the output; one choice.
fn inspect_responses(
    model: String,
    stream: bool,
    body: &Map<String, Value>,
    policy: &ReservationPolicy,
) -> Result<RequestFacts, BadRequest> {
    let mut bound = policy.per_request_tokens;
    match body.get("input") {
        None | Some(Value::Null) => {
            return Err(BadRequest::new("input", "you must provide an input"))
        }
        Some(Value::String(s)) => {
            bound = bound
                .saturating_add(policy.per_message_tokens)
                .saturating_add(s.len() as u64)
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(fields) = item.as_object() else {
                    return Err(BadRequest::new(
                        &format!("input[{i}]"),
                        format!("input[{i}] must be an object"),
                    ));
                };
                if fields.get("type").and_then(Value::as_str) == Some("item_reference") {
                    return Err(BadRequest::new(
                        &format!("input[{i}].type"),
                        "item references are not supported: the referenced item cannot be bounded before dispatch; send it in full",
                    ));
                }
                check_parts(&format!("input[{i}].content"), fields.get("content"))?;
                bound = bound
                    .saturating_add(policy.per_message_tokens)
                    .saturating_add(text_bytes(item, policy));
            }
        }
        Some(other) => {
            return Err(BadRequest::new(
                "input",
                format!(
                    "input must be a string or an array of items, got {}",
                    type_name(other)
                ),
            ))
        }
    }
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            bound = bound
                .saturating_add(policy.per_message_tokens)
                .saturating_add(s.len() as u64)
        }
        Some(other) => {
            return Err(BadRequest::new(
                "instructions",
                format!("instructions must be a string, got {}", type_name(other)),
            ))
        }
    }
    for extra in ["tools", "text"] {
        if let Some(value) = body.get(extra) {
            bound = bound.saturating_add(text_bytes(value, policy));
        }
    }
    if optional_bool(body, "background")? == Some(true) {
        // A queued response is answered without usage; what it generates
        // later never passes through the agent to be metered.
        return Err(BadRequest::new(
            "background",
            "background responses are not supported: their usage cannot be metered; send the request without background",
        ));
    }
    if body.get("prompt").is_some_and(|p| !p.is_null()) {
        return Err(BadRequest::new(
            "prompt",
            "stored prompt templates are not supported: their text cannot be bounded before dispatch; send the full input",
        ));
    }
    if body.contains_key("previous_response_id") || body.contains_key("conversation") {
        // The server would prepend history the agent cannot see or bound.
        return Err(BadRequest::new(
            if body.contains_key("conversation") {
                "conversation"
            } else {
                "previous_response_id"
            },
            "stored conversation state is not supported: its prompt cannot be bounded before dispatch; send the full input",
        ));
    }
    Ok(RequestFacts {
        model,
        stream,
        // Responses streams always end with usage in response.completed.
        client_wants_usage: true,
        max_completion_tokens: client_limit(body, std::slice::from_ref(&RESPONSES_LIMIT_FIELD))?,
        choices: 1,
        prompt_tokens_bound: bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(operation: Operation, body: Value) -> Result<RequestFacts, BadRequest> {
        inspect(
            operation,
            body.as_object().unwrap(),
            &ReservationPolicy::default(),
        )
    }

    #[test]
    fn prompt_bound_is_bytes_plus_overheads() {
        let f = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "héllo"}], "max_tokens": 50}),
        )
        .unwrap();
        // "role" 4 + "user" 4 + "content" 7 + "héllo" 6 bytes, + 8 per message + 16 per request.
        assert_eq!(f.prompt_tokens_bound, 4 + 4 + 7 + 6 + 8 + 16);
        assert_eq!(f.max_completion_tokens, Some(50));
        assert_eq!(f.token_bound(50), f.prompt_tokens_bound + 50);
    }

    #[test]
    fn a_blank_model_or_one_with_control_characters_is_refused_naming_model() {
        for model in ["   ", "gpt\u{0}x", "line\nbreak"] {
            let refused = facts(
                Operation::ChatCompletions,
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .unwrap_err();
            assert_eq!(refused.param.as_deref(), Some("model"), "{model:?}");
        }
    }

    #[test]
    fn images_are_charged_the_configured_amount_not_their_bytes() {
        let huge = "A".repeat(100_000);
        let f = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{huge}")}}
            ]}]}),
        )
        .unwrap();
        assert!(f.prompt_tokens_bound < 3_000, "{}", f.prompt_tokens_bound);
        assert!(f.prompt_tokens_bound >= 2_000);
    }

    #[test]
    fn the_smallest_limit_of_any_field_a_server_honours_wins_and_n_multiplies() {
        let f = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                   "max_tokens": 10, "max_completion_tokens": 20, "n": 3}),
        )
        .unwrap();
        assert_eq!(f.max_completion_tokens, Some(10));
        assert_eq!(f.token_bound(10), f.prompt_tokens_bound + 30);
        // A limit of 0 is refused: llama-cpp-python reads it as no limit,
        // vLLM reads `max_completion_tokens or max_tokens` (0 is falsy).
        for field in ["max_tokens", "max_completion_tokens", "n_predict"] {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                   "max_tokens": 50000});
            body[field] = json!(0);
            let err = facts(Operation::ChatCompletions, body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field));
        }
        for (field, value, limit) in [
            ("n_predict", json!(7), Some(7)),
            ("n_predict", json!(-1), None),
            ("max_new_tokens", json!(9), Some(9)),
        ] {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            body[field] = value;
            assert_eq!(
                facts(Operation::ChatCompletions, body)
                    .unwrap()
                    .max_completion_tokens,
                limit,
                "{field}"
            );
        }
        let f = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": "x", "max_tokens": 100, "options": {"num_predict": 3}}),
        )
        .unwrap();
        assert_eq!(f.max_completion_tokens, Some(3));
        let err = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": "x", "max_new_tokens": -4}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_new_tokens"));
        let err = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": "x", "options": 5}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("options"));
    }

    #[test]
    fn the_bound_is_written_into_every_limit_field_present_and_the_operations_own() {
        let mut body = json!({"model": "m", "max_completion_tokens": 0, "max_tokens": 50000,
            "n_predict": -1, "options": {"num_predict": -2, "temperature": 0}})
        .as_object()
        .unwrap()
        .clone();
        assert!(write_completion_bound(
            Operation::ChatCompletions,
            &mut body,
            41
        ));
        assert_eq!(
            Value::Object(body),
            json!({"model": "m", "max_completion_tokens": 41, "max_tokens": 41,
                "n_predict": 41, "options": {"num_predict": 41, "temperature": 0}})
        );
        // Absent fields other than the operation's own are not added.
        let mut body = json!({"model": "m"}).as_object().unwrap().clone();
        assert!(write_completion_bound(Operation::Completions, &mut body, 5));
        assert_eq!(
            Value::Object(body.clone()),
            json!({"model": "m", "max_tokens": 5})
        );
        // Already the bound: nothing changes (the body is forwarded as sent).
        assert!(!write_completion_bound(
            Operation::Completions,
            &mut body,
            5
        ));
        let mut body = json!({"model": "m"}).as_object().unwrap().clone();
        assert!(write_completion_bound(Operation::Responses, &mut body, 9));
        assert_eq!(
            Value::Object(body),
            json!({"model": "m", "max_output_tokens": 9})
        );
        let mut body = json!({"model": "m", "max_tokens": 3})
            .as_object()
            .unwrap()
            .clone();
        assert!(!write_completion_bound(Operation::Embeddings, &mut body, 0));
    }

    #[test]
    fn every_prompt_of_a_completions_array_multiplies_the_completion() {
        let prompts: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
        let f = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": prompts, "max_tokens": 100, "n": 2}),
        )
        .unwrap();
        assert_eq!(f.choices, 200);
        assert!(f.token_bound(100) >= 100 * 100 * 2);
        let err = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": vec!["x"; 2049]}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn what_cannot_be_bounded_before_dispatch_is_refused_naming_the_param() {
        let err = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "video_url", "video_url": {"url": "https://example.invalid/v.mp4"}}
            ]}]}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content[1].type"));
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": "x", "background": true}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("background"));
        assert!(facts(
            Operation::Responses,
            json!({"model": "m", "input": "x", "background": false}),
        )
        .is_ok());
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("input[0].type"));
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_video"}]}]}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("input[0].content[0].type"));
        let err = facts(
            Operation::ChatCompletions,
            json!({"model": "m".repeat(300), "messages": [{"role": "user", "content": "x"}]}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("model"));
        // Tool calls carry a `type` too; they are text, not content parts.
        assert!(facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]}]}),
        )
        .is_ok());
    }

    #[test]
    fn negative_max_tokens_is_refused_naming_the_param() {
        let err = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn missing_model_or_messages_is_refused() {
        let err = facts(Operation::ChatCompletions, json!({"messages": []})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("model"));
        let err = facts(
            Operation::ChatCompletions,
            json!({"model": "m", "messages": "hi"}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
    }

    #[test]
    fn completions_prompt_forms_are_bounded() {
        let f = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": "abc"}),
        )
        .unwrap();
        assert_eq!(f.prompt_tokens_bound, 3 + 16);
        let f = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": [[1, 2, 3], "ab"]}),
        )
        .unwrap();
        // Two prompts: each has its own per-request overhead.
        assert_eq!(f.prompt_tokens_bound, 3 + 2 + 2 * 16);
        assert_eq!(f.choices, 2);
        assert!(facts(Operation::Completions, json!({"model": "m", "prompt": 5})).is_err());
    }

    #[test]
    fn bodies_with_a_key_twice_or_out_of_range_numbers_are_refused() {
        let dup =
            parse_body(br#"{"model": "m", "max_tokens": 1, "max_tokens": 100000}"#).unwrap_err();
        assert!(
            dup.message.contains("duplicate key \"max_tokens\""),
            "{}",
            dup.message
        );
        let nested =
            parse_body(br#"{"messages": [{"content": "a", "content": "b"}]}"#).unwrap_err();
        assert!(
            nested.message.contains("duplicate key"),
            "{}",
            nested.message
        );
        assert!(parse_body(br#"{"max_tokens": 1e400}"#).is_err());
        assert!(parse_body(b"[1]")
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert!(parse_body(b"{\"model\": \"\xff\"}").is_err());
        let ok =
            parse_body(br#"{"model": "m", "n": -1, "t": 0.5, "s": ["x", null, true]}"#).unwrap();
        assert_eq!(
            Value::Object(ok),
            json!({"model": "m", "n": -1, "t": 0.5, "s": ["x", null, true]})
        );
    }

    #[test]
    fn embeddings_are_bounded_by_input_and_generate_nothing() {
        let f = facts(
            Operation::Embeddings,
            json!({"model": "m", "input": ["héllo", "ab"], "max_tokens": 99}),
        )
        .unwrap();
        assert_eq!(f.max_completion_tokens, Some(0));
        assert_eq!(f.prompt_tokens_bound, 16 + 6 + 2 + 2 * 8);
        assert_eq!(f.token_bound(0), f.prompt_tokens_bound);
        let tokens = facts(
            Operation::Embeddings,
            json!({"model": "m", "input": [1, 2, 3]}),
        )
        .unwrap();
        assert_eq!(tokens.prompt_tokens_bound, 16 + 3 + 8);
        for bad in [
            json!({"model": "m"}),
            json!({"model": "m", "input": 5}),
            json!({"model": "m", "input": []}),
            json!({"model": "m", "input": [{"a": 1}]}),
        ] {
            let err = facts(Operation::Embeddings, bad).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("input"));
        }
    }

    #[test]
    fn responses_bound_input_instructions_and_max_output_tokens() {
        let f = facts(
            Operation::Responses,
            json!({"model": "m", "input": "hello", "instructions": "be brief", "max_output_tokens": 7, "stream": true}),
        )
        .unwrap();
        assert_eq!(f.prompt_tokens_bound, 16 + 8 + 5 + 8 + 8);
        assert_eq!(f.max_completion_tokens, Some(7));
        assert!(f.stream && f.client_wants_usage);
        let items = facts(
            Operation::Responses,
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "data:..."}]}]}),
        )
        .unwrap();
        assert!(items.prompt_tokens_bound >= 16 + 8 + 2 + 2_000);
        assert_eq!(items.max_completion_tokens, None);
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": "x", "previous_response_id": "r1"}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("previous_response_id"));
        let err = facts(
            Operation::Responses,
            json!({"model": "m", "input": "x", "max_output_tokens": -1}),
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_output_tokens"));
        let err = facts(Operation::Responses, json!({"model": "m", "input": [1]})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("input[0]"));
    }

    #[test]
    fn stream_usage_request_is_read() {
        let f = facts(
            Operation::Completions,
            json!({"model": "m", "prompt": "a", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert!(f.stream && f.client_wants_usage);
    }
}

#[cfg(test)]
mod fuzz {
    //! Property-based fuzzing of request inspection: any JSON, and any
    //! bytes that happen to parse, get an answer, never a panic.
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::hash_map(
                    prop_oneof![
                        Just("model".to_string()),
                        Just("messages".to_string()),
                        Just("prompt".to_string()),
                        Just("max_tokens".to_string()),
                        Just("max_completion_tokens".to_string()),
                        Just("n".to_string()),
                        Just("best_of".to_string()),
                        Just("stream".to_string()),
                        Just("stream_options".to_string()),
                        Just("include_usage".to_string()),
                        Just("content".to_string()),
                        Just("role".to_string()),
                        Just("type".to_string()),
                        Just("tools".to_string()),
                        Just("input".to_string()),
                        Just("instructions".to_string()),
                        Just("max_output_tokens".to_string()),
                        Just("text".to_string()),
                        Just("n_predict".to_string()),
                        Just("max_new_tokens".to_string()),
                        Just("options".to_string()),
                        Just("num_predict".to_string()),
                        Just("background".to_string()),
                        ".{0,8}".prop_map(|s| s),
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn any_json_body_is_answered_without_panicking(body in json()) {
            let policy = ReservationPolicy::default();
            if let Value::Object(map) = &body {
                for operation in Operation::ALL {
                    if let Ok(facts) = inspect(operation, map, &policy) {
                        prop_assert!(!facts.model.is_empty());
                        prop_assert!(facts.choices >= 1);
                        prop_assert!(facts.prompt_tokens_bound >= policy.per_request_tokens);
                        let _ = facts.token_bound(u64::MAX);
                        // Once the bound is written, every field any server
                        // honours says exactly the bound.
                        if operation != Operation::Embeddings {
                            let mut rewritten = map.clone();
                            write_completion_bound(operation, &mut rewritten, 17);
                            let again = inspect(operation, &rewritten, &policy).expect("still admitted");
                            prop_assert_eq!(again.max_completion_tokens, Some(17));
                        }
                    }
                }
            }
        }

        #[test]
        fn any_bytes_that_parse_are_answered_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes) {
                for operation in Operation::ALL {
                    let _ = inspect(operation, &map, &ReservationPolicy::default());
                }
            }
        }

        #[test]
        fn the_prompt_bound_covers_every_byte_of_text(texts in prop::collection::vec(".{0,200}", 1..10)) {
            let messages: Vec<Value> = texts.iter().map(|t| serde_json::json!({"role": "user", "content": t})).collect();
            let body = serde_json::json!({"model": "m", "messages": messages});
            let facts = inspect(Operation::ChatCompletions, body.as_object().unwrap(), &ReservationPolicy::default()).unwrap();
            let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
            prop_assert!(facts.prompt_tokens_bound >= bytes);
        }
    }
}
