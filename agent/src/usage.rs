//! Reading usage out of neuron responses, as pure functions over bytes and
//! JSON so that they are unit-tested and fuzzed apart from the proxy:
//! - [`read_usage`]: the `usage` object of a body or stream event, in the
//!   Chat/Completions/Embeddings shape or the Responses API's;
//! - [`estimate_completion_tokens`]: an upper bound when a body has none;
//! - [`SseScanner`]: splits an SSE byte stream into events as they arrive,
//!   passes them on unchanged, notes usage and strips usage-only chunks for
//!   clients that did not ask for them.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Usage a neuron reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub prompt: u64,
    pub completion: u64,
    pub reasoning: u64,
}

/// Usage in a response body or stream event: Chat/Completions/Embeddings
/// (`prompt_tokens`, `completion_tokens`) at the top, or the Responses API's
/// (`input_tokens`, `output_tokens`) at the top or under `response` (the
/// `response.completed` and `response.incomplete` events).
pub fn read_usage(value: &Value) -> Option<Reported> {
    read_usage_of(value.get("usage"), value.get("response"))
}

/// [`read_usage`] of a value whose top-level `usage` and `response` are
/// these.
fn read_usage_of(usage: Option<&Value>, response: Option<&Value>) -> Option<Reported> {
    let usage = usage
        .filter(|u| u.is_object())
        .or_else(|| response?.get("usage"))?
        .as_object()?;
    let number = |name: &str| usage.get(name).and_then(Value::as_u64);
    let reasoning = |details: &str| {
        usage
            .get(details)
            .and_then(|d| d.get("reasoning_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    if let Some(prompt) = number("prompt_tokens") {
        return Some(Reported {
            prompt,
            completion: number("completion_tokens").unwrap_or(0),
            reasoning: reasoning("completion_tokens_details"),
        });
    }
    Some(Reported {
        prompt: number("input_tokens")?,
        completion: number("output_tokens").unwrap_or(0),
        reasoning: reasoning("output_tokens_details"),
    })
}

/// What settlement reads from a whole (non-streamed) response body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub usage: Option<Reported>,
    /// Completion tokens estimated from the text when there is no usage;
    /// `None` when the body is not JSON (nothing to estimate from).
    pub estimate: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    usage: Option<UsageFields>,
}

#[derive(serde::Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(serde::Deserialize)]
struct Details {
    reasoning_tokens: Option<u64>,
}

/// Reads the model and usage of a response body without building the
/// whole JSON tree (the choices' text is skipped, not copied); bodies
/// without usage, or with an unexpected shape, are read in full.
pub fn read_body(body: &[u8]) -> BodyFacts {
    if let Ok(head) = serde_json::from_slice::<Head>(body) {
        let usage = head.usage.and_then(|u| {
            let reasoning = |d: Option<Details>| d.and_then(|d| d.reasoning_tokens).unwrap_or(0);
            match (u.prompt_tokens, u.input_tokens) {
                (Some(prompt), _) => Some(Reported {
                    prompt,
                    completion: u.completion_tokens.unwrap_or(0),
                    reasoning: reasoning(u.completion_tokens_details),
                }),
                (None, Some(input)) => Some(Reported {
                    prompt: input,
                    completion: u.output_tokens.unwrap_or(0),
                    reasoning: reasoning(u.output_tokens_details),
                }),
                (None, None) => None,
            }
        });
        if usage.is_some() {
            return BodyFacts {
                model: head.model.map(|m| m.into_owned()),
                usage,
                estimate: None,
            };
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => BodyFacts {
            model: value
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string),
            usage: read_usage(&value),
            estimate: Some(estimate_completion_tokens(&value)),
        },
        Err(_) => BodyFacts::default(),
    }
}

/// An estimate of completion tokens from a response without usage: one
/// per byte of generated text (an upper bound for byte-level tokenizers).
pub fn estimate_completion_tokens(value: &Value) -> u64 {
    if let Some(output) = value.get("output").and_then(Value::as_array) {
        // Responses API: output items with content parts.
        return output
            .iter()
            .filter_map(|item| item.get("content")?.as_array())
            .flatten()
            .filter_map(|part| part.get("text")?.as_str())
            .map(|text| text.len() as u64)
            .sum();
    }
    let Some(choices) = value.get("choices").and_then(Value::as_array) else {
        return 0;
    };
    choices
        .iter()
        .map(|choice| {
            let text = choice
                .get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            text.len() as u64
        })
        .sum()
}

/// End of the first complete SSE event in `buffer` (after its blank line).
pub fn find_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the scanner has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The last usage reported.
    pub usage: Option<Reported>,
    /// Events with content (neither usage-only, nor `[DONE]`, nor empty).
    pub chunks: u64,
    /// The `model` of the first content event.
    pub model: Option<String>,
    /// `[DONE]` came: the stream is over, whether or not the neuron closes
    /// its connection.
    pub done: bool,
    /// The generated text, when collected ([`SseScanner::collect_text`]).
    pub text: Option<StreamText>,
}

/// The text a stream generated, collected for the server's tokenizer to
/// count when the stream reports no usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamText {
    /// Content, legacy text, reasoning and tool-call pieces, in order.
    pub text: String,
    /// Events that carried any of them: a role-only or finish-only event
    /// generated nothing.
    pub token_events: u64,
    /// Past the collection bound, or an event whose pieces could not be
    /// read: the text is not all there, and must not be counted.
    pub incomplete: bool,
    max_bytes: usize,
}

impl StreamText {
    /// Reads the pieces of one content event.
    fn add(&mut self, data: &str) {
        let Ok(event) = serde_json::from_str::<TextEvent>(data) else {
            self.token_events += 1;
            self.incomplete = true;
            return;
        };
        let mut generated = false;
        for choice in event.choices.unwrap_or_default() {
            let mut pieces = [choice.text, None, None];
            if let Some(delta) = choice.delta {
                pieces[1] = delta.content;
                pieces[2] = delta.reasoning_content;
                for call in delta.tool_calls.unwrap_or_default() {
                    generated = true;
                    if let Some(function) = call.function {
                        for piece in [function.name, function.arguments].into_iter().flatten() {
                            self.push(&piece);
                        }
                    }
                }
            }
            for piece in pieces.into_iter().flatten() {
                generated |= !piece.is_empty();
                self.push(&piece);
            }
        }
        if generated {
            self.token_events += 1;
        }
    }

    fn push(&mut self, piece: &str) {
        if self.text.len() + piece.len() > self.max_bytes {
            self.incomplete = true;
            return;
        }
        self.text.push_str(piece);
    }
}

/// What [`StreamText`] reads of an event; every other field is skipped.
#[derive(serde::Deserialize)]
struct TextEvent<'a> {
    #[serde(borrow)]
    choices: Option<Vec<TextChoice<'a>>>,
}

#[derive(serde::Deserialize)]
struct TextChoice<'a> {
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<TextDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct TextDelta<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(serde::Deserialize)]
struct ToolCallDelta {
    function: Option<FunctionDelta>,
}

#[derive(serde::Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

/// An event longer than this is passed on in pieces, unread: a neuron that
/// never ends an event cannot grow the agent's memory without bound.
const MAX_EVENT: usize = 1024 * 1024;
/// Most bytes held back at the end of a stream ([`SseScanner::hold_end`]):
/// a usage chunk, `[DONE]` or a Responses API `response.completed` (which
/// repeats the whole output) fit. Past it the held bytes are passed on and
/// holding stops for that stream (`allot_agent_stream_holds_released_total`).
pub const MAX_HELD: usize = 4 * MAX_EVENT;

/// Splits an SSE stream into whole events as bytes arrive.
#[derive(Debug, Default)]
pub struct SseScanner {
    buffer: BytesMut,
    /// How much of `buffer` was searched for an event end already.
    searched: usize,
    strip_usage: bool,
    /// Hold back the end of the stream ([`SseScanner::hold_end`])...
    hold_end: bool,
    /// ...and what is held, from the first final event on.
    held: Option<BytesMut>,
    /// Set by [`SseScanner::inspect`]: content came after what looked like
    /// the end, so what is held was not the end and is passed on.
    release: bool,
    pub seen: Seen,
}

impl SseScanner {
    /// `strip_usage`: drop usage-only events (no choices) from the output.
    pub fn new(strip_usage: bool) -> SseScanner {
        SseScanner {
            buffer: BytesMut::new(),
            searched: 0,
            strip_usage,
            hold_end: false,
            held: None,
            release: false,
            seen: Seen::default(),
        }
    }

    /// From the first event that ends a stream on (`[DONE]`, or an event
    /// that reports usage and carries no content, such as the usage-only
    /// chunk or the Responses API's `response.completed`), events are held
    /// back instead of passed on: [`SseScanner::take_held`] hands them
    /// over once the caller may deliver the end. Usage in content chunks
    /// (vLLM's `continuous_usage_stats`) does not start holding.
    pub fn hold_end(mut self) -> SseScanner {
        self.hold_end = true;
        self
    }

    /// Collects the generated text of content events, up to `max_bytes`
    /// ([`Seen::text`]), for a server whose streams carry no usage.
    pub fn collect_text(mut self, max_bytes: usize) -> SseScanner {
        self.seen.text = Some(StreamText {
            max_bytes,
            ..StreamText::default()
        });
        self
    }

    /// What was held back ([`SseScanner::hold_end`]).
    pub fn take_held(&mut self) -> Bytes {
        self.held.take().map(BytesMut::freeze).unwrap_or_default()
    }

    /// Where an event to pass on goes: out, or held back.
    fn pass<'a>(&'a mut self, out: &'a mut BytesMut) -> &'a mut BytesMut {
        match &mut self.held {
            Some(held) => held,
            None => out,
        }
    }

    /// Takes arriving bytes; returns the complete events to pass on, in
    /// order and unchanged (a partial event waits for its end).
    pub fn push(&mut self, data: &[u8]) -> Bytes {
        self.buffer.extend_from_slice(data);
        let mut out = BytesMut::new();
        loop {
            // Resume where the last search stopped (minus a possibly split
            // blank line): arriving in small pieces stays linear.
            let from = self.searched.saturating_sub(3);
            let Some(end) = find_event_end(&self.buffer[from..]).map(|e| e + from) else {
                self.searched = self.buffer.len();
                break;
            };
            self.searched = 0;
            let event = self.buffer.split_to(end);
            let keep = self.inspect(&event);
            if std::mem::take(&mut self.release) {
                if let Some(held) = self.held.take() {
                    out.unsplit(held);
                }
            }
            if keep {
                // Events passed on back to back stay one piece of the
                // buffer: joining them copies nothing.
                self.pass(&mut out).unsplit(event);
            }
            if self.held.as_ref().is_some_and(|h| h.len() > MAX_HELD) {
                metrics::counter!("allot_agent_stream_holds_released_total").increment(1);
                tracing::warn!(
                    "a stream's end held back past {MAX_HELD} bytes: passed on, no longer held"
                );
                self.hold_end = false;
                if let Some(held) = self.held.take() {
                    out.unsplit(held);
                }
            }
        }
        if self.buffer.len() > MAX_EVENT {
            self.seen.chunks += 1;
            if let Some(text) = &mut self.seen.text {
                text.token_events += 1;
                text.incomplete = true;
            }
            self.searched = 0;
            let long = self.buffer.split();
            self.pass(&mut out).extend_from_slice(&long);
        }
        out.freeze()
    }

    /// The bytes of an unfinished last event, passed on as they are.
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.buffer).freeze()
    }

    fn hold_from_here(&mut self) {
        if self.hold_end && self.held.is_none() {
            self.held = Some(BytesMut::new());
        }
    }

    /// Reads one event; false when it must not reach the client.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let text = std::str::from_utf8(event).unwrap_or_default();
        // As the SSE spec reads it: `data:` lines, one leading space off,
        // joined by newlines (copied only when there are several).
        let mut data = std::borrow::Cow::Borrowed("");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("data:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                if data.is_empty() {
                    data = std::borrow::Cow::Borrowed(rest);
                } else {
                    let joined = data.to_mut();
                    joined.push('\n');
                    joined.push_str(rest);
                }
            }
        }
        let data = data.trim_end();
        if data == "[DONE]" {
            self.seen.done = true;
            self.hold_from_here();
            return true;
        }
        if data.is_empty() {
            return true;
        }
        // Parse in full only events that may carry usage.
        if !data.contains("\"usage\":{") && !data.contains("\"usage\": {") {
            self.content_after_end();
            self.seen.chunks += 1;
            if self.seen.model.is_none() {
                self.seen.model = model_of(data);
            }
            if let Some(text) = &mut self.seen.text {
                text.add(data);
            }
            return true;
        }
        let Some((usage, choices_empty)) = read_event_choices(data) else {
            return true;
        };
        let usage_only = choices_empty == Some(true);
        if let Some(usage) = usage {
            self.seen.usage = Some(usage);
            // No content beside the usage: the stream is ending.
            if choices_empty != Some(false) {
                self.hold_from_here();
            }
        }
        if !usage_only {
            if choices_empty == Some(false) {
                self.content_after_end();
            }
            self.seen.chunks += 1;
            if let Some(text) = &mut self.seen.text {
                text.add(data);
            }
        }
        !(self.strip_usage && usage_only)
    }

    /// A content event: if it follows what looked like the end of the
    /// stream (a usage event without `choices`), that was not the end, and
    /// what is held is passed on before it. After `[DONE]` nothing is
    /// content: what follows it stays held.
    fn content_after_end(&mut self) {
        if self.held.is_some() && !self.seen.done {
            self.release = true;
        }
    }
}

/// The scalar `visit_*` methods of a visitor that answers `$value` for
/// every number, boolean and null (and string, with `str`).
macro_rules! scalars_are {
    ($out:ty, $value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<$out, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<$out, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$out, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$out, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<$out, E> {
            Ok($value)
        }
    };
    ($out:ty, $value:expr, str) => {
        scalars_are!($out, $value);
        fn visit_str<E>(self, _: &str) -> Result<$out, E> {
            Ok($value)
        }
    };
}

/// The top-level `model` string of a JSON text, as
/// `serde_json::from_str::<Value>(text)?.get("model")?.as_str()` reads it
/// (the same texts are JSON, the last of two `model` keys wins), without
/// building the tree: nothing but the model is copied.
pub fn model_of(text: &str) -> Option<String> {
    serde_json::from_str::<EventFields>(text).ok()?.model
}

/// The usage a stream event reports ([`read_usage`]) and whether it is
/// usage-only (its `choices` an empty array), as the event's `Value` tree
/// gives them, without building the tree; `None` when it is not JSON.
pub fn read_event(text: &str) -> Option<(Option<Reported>, bool)> {
    let (usage, choices_empty) = read_event_choices(text)?;
    Some((usage, choices_empty == Some(true)))
}

/// [`read_event`], with whether `choices` is empty (`None`: no array).
fn read_event_choices(text: &str) -> Option<(Option<Reported>, Option<bool>)> {
    let event = serde_json::from_str::<EventFields>(text).ok()?;
    Some((
        read_usage_of(event.usage.as_ref(), event.response.as_ref()),
        event.choices_empty,
    ))
}

/// The top-level fields of a stream event that the scanner reads, as a
/// `Value` tree of the event would give them (the same texts are JSON, the
/// last of two equal keys wins), without building the rest of the tree.
#[derive(Default)]
struct EventFields {
    /// `model`, when it is a string.
    model: Option<String>,
    usage: Option<Value>,
    response: Option<Value>,
    /// Whether `choices` is an empty array; `None` when it is no array.
    choices_empty: Option<bool>,
}

impl<'de> serde::Deserialize<'de> for EventFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> serde::de::Visitor<'de> for Top {
            type Value = EventFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EventFields, A::Error> {
                let mut fields = EventFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Model => fields.model = map.next_value::<StringOrNot>()?.0,
                        Key::Usage => fields.usage = Some(map.next_value()?),
                        Key::Response => fields.response = Some(map.next_value()?),
                        Key::Choices => fields.choices_empty = map.next_value::<ArrayEmpty>()?.0,
                        Key::Other => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(fields)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<EventFields, A::Error> {
                Skip::seq(seq).map(|_| EventFields::default())
            }
            scalars_are!(EventFields, EventFields::default(), str);
        }
        deserializer.deserialize_any(Top)
    }
}

/// A top-level key of a stream event (not copied).
enum Key {
    Model,
    Usage,
    Response,
    Choices,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "usage" => Key::Usage,
                    "response" => Key::Response,
                    "choices" => Key::Choices,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A JSON value: whether it is an empty array, if it is an array.
struct ArrayEmpty(Option<bool>);

impl<'de> serde::Deserialize<'de> for ArrayEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = ArrayEmpty;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ArrayEmpty, A::Error> {
                let mut empty = true;
                while seq.next_element::<Skip>()?.is_some() {
                    empty = false;
                }
                Ok(ArrayEmpty(Some(empty)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ArrayEmpty, A::Error> {
                Skip::map(map).map(|_| ArrayEmpty(None))
            }
            scalars_are!(ArrayEmpty, ArrayEmpty(None), str);
        }
        deserializer.deserialize_any(Any)
    }
}

/// A JSON value: the string if it is one (what `Value::as_str` gives).
struct StringOrNot(Option<String>);

impl<'de> serde::Deserialize<'de> for StringOrNot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = StringOrNot;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<StringOrNot, E> {
                Ok(StringOrNot(Some(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<StringOrNot, E> {
                Ok(StringOrNot(Some(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<StringOrNot, A::Error> {
                Skip::map(map).map(|_| StringOrNot(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<StringOrNot, A::Error> {
                Skip::seq(seq).map(|_| StringOrNot(None))
            }
            scalars_are!(StringOrNot, StringOrNot(None));
        }
        deserializer.deserialize_any(Any)
    }
}

/// Any JSON value, read as `Value` would read it (the same numbers,
/// strings and nesting are accepted) but kept nowhere. Unlike
/// `serde::de::IgnoredAny`, numbers are parsed, so a number out of range
/// fails here as it fails `Value`.
struct Skip;

impl Skip {
    fn seq<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn map<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Key, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = Skip;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
                Skip::map(map)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
                Skip::seq(seq)
            }
            scalars_are!(Skip, Skip, str);
        }
        deserializer.deserialize_any(Any)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn collected_text_skips_role_and_finish_events_and_stops_at_its_bound() {
        let mut scanner = super::SseScanner::new(false).collect_text(8);
        let events = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"he"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"llo"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ];
        for event in events {
            scanner.push(format!("data: {event}\n\n").as_bytes());
        }
        scanner.push(b"data: [DONE]\n\n");
        let text = scanner.seen.text.clone().unwrap();
        assert_eq!(text.text, "hello");
        assert_eq!(
            text.token_events, 2,
            "role and finish events carry no tokens"
        );
        assert!(!text.incomplete);
        assert_eq!(
            scanner.seen.chunks, 4,
            "the estimate still counts every event"
        );

        let legacy = r#"{"choices":[{"index":0,"text":" world","finish_reason":null}]}"#;
        let call = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#;
        scanner.push(format!("data: {legacy}\n\ndata: {call}\n\n").as_bytes());
        let text = scanner.seen.text.unwrap();
        assert!(text.incomplete, "past 8 bytes");
        assert_eq!(text.token_events, 4);
        assert_eq!(text.text, "hello{}");
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_read_in_every_shape() {
        let chat = json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4,
            "completion_tokens_details": {"reasoning_tokens": 2}}});
        assert_eq!(
            read_usage(&chat),
            Some(Reported {
                prompt: 3,
                completion: 4,
                reasoning: 2
            })
        );
        let embeddings = json!({"usage": {"prompt_tokens": 7, "total_tokens": 7}});
        assert_eq!(read_usage(&embeddings).unwrap().completion, 0);
        let responses = json!({"type": "response.completed", "response": {"usage":
            {"input_tokens": 5, "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 1}}}});
        assert_eq!(
            read_usage(&responses),
            Some(Reported {
                prompt: 5,
                completion: 6,
                reasoning: 1
            })
        );
        assert_eq!(read_usage(&json!({"usage": null})), None);
        assert_eq!(read_usage(&json!({"usage": {"total_tokens": 1}})), None);
    }

    #[test]
    fn events_split_anywhere_pass_unchanged_and_usage_only_chunks_are_stripped() {
        let stream = concat!(
            "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        for split in 0..stream.len() {
            let mut scanner = SseScanner::new(true);
            let mut out = scanner.push(&stream.as_bytes()[..split]).to_vec();
            out.extend_from_slice(&scanner.push(&stream.as_bytes()[split..]));
            out.extend_from_slice(&scanner.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("usage"), "split {split}: {text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(scanner.seen.chunks, 1);
            assert_eq!(scanner.seen.model.as_deref(), Some("m"));
            assert_eq!(scanner.seen.usage.unwrap().prompt, 2);
        }
        let mut keep = SseScanner::new(false);
        let mut out = keep.push(stream.as_bytes()).to_vec();
        out.extend_from_slice(&keep.finish());
        assert_eq!(out, stream.as_bytes());
    }

    #[test]
    fn content_after_what_looked_like_the_end_releases_what_was_held() {
        // A neuron that puts usage in an event without `choices` and then
        // goes on streaming content: nothing stays held behind the content.
        let early = "data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":0}}\n\n";
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let done = "data: [DONE]\n\n";
        let mut scanner = SseScanner::new(false).hold_end();
        assert!(
            scanner.push(early.as_bytes()).is_empty(),
            "held: it may be the end"
        );
        let out = scanner.push(format!("{content}{content}").as_bytes());
        assert_eq!(out, format!("{early}{content}{content}").as_bytes());
        assert!(scanner.push(done.as_bytes()).is_empty());
        assert_eq!(scanner.take_held(), done.as_bytes());
    }

    #[test]
    fn what_is_held_is_bounded() {
        // Usage-only events one after another, each under MAX_EVENT: past
        // MAX_HELD they are passed on and holding stops.
        let filler = "x".repeat(MAX_EVENT / 2);
        let event = format!(
            "data: {{\"choices\":[],\"pad\":\"{filler}\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":1}}}}\n\n"
        );
        let mut scanner = SseScanner::new(false).hold_end();
        let mut passed = 0usize;
        for _ in 0..(2 * MAX_HELD / event.len() + 2) {
            passed += scanner.push(event.as_bytes()).len();
            assert!(scanner.held.as_ref().map_or(0, |h| h.len()) <= MAX_HELD);
        }
        assert!(passed > 0, "the held bytes were passed on");
        assert!(scanner.take_held().is_empty(), "holding stopped");
    }

    #[test]
    fn the_end_of_a_stream_is_held_back_from_the_final_usage_event_or_done_on() {
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";
        let done = "data: [DONE]\n\n";
        let stream = format!("{content}{usage}{done}");
        for strip in [false, true] {
            for split in 0..stream.len() {
                let mut scanner = SseScanner::new(strip).hold_end();
                let mut out = scanner.push(&stream.as_bytes()[..split]).to_vec();
                out.extend_from_slice(&scanner.push(&stream.as_bytes()[split..]));
                // Usage in a content chunk does not end the stream.
                assert_eq!(String::from_utf8(out).unwrap(), content, "split {split}");
                let held = scanner.take_held();
                let expected = if strip {
                    done.to_string()
                } else {
                    format!("{usage}{done}")
                };
                assert_eq!(held, expected.as_bytes(), "split {split}");
            }
        }
        // Without usage, `[DONE]` starts holding; the Responses API's
        // completion event does too.
        let mut scanner = SseScanner::new(false).hold_end();
        assert_eq!(
            scanner.push(b"data: {\"choices\":[]}\n\n"),
            &b"data: {\"choices\":[]}\n\n"[..]
        );
        assert!(scanner.push(done.as_bytes()).is_empty());
        assert_eq!(scanner.take_held(), done.as_bytes());
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}}\n\n";
        let mut scanner = SseScanner::new(false).hold_end();
        assert!(scanner.push(completed.as_bytes()).is_empty());
        assert_eq!(scanner.take_held(), completed.as_bytes());
    }

    #[test]
    fn bodies_are_read_in_every_shape_and_fall_back_to_estimates() {
        let chat = br#"{"id":"x","model":"m","choices":[{"message":{"content":"hi \"there\""}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let facts = read_body(chat);
        assert_eq!(facts.model.as_deref(), Some("m"));
        assert_eq!(
            facts.usage,
            Some(Reported {
                prompt: 3,
                completion: 2,
                reasoning: 0
            })
        );
        let responses = br#"{"model":"m","output":[],"usage":{"input_tokens":4,"output_tokens":5,"output_tokens_details":{"reasoning_tokens":1}}}"#;
        assert_eq!(
            read_body(responses).usage,
            Some(Reported {
                prompt: 4,
                completion: 5,
                reasoning: 1
            })
        );
        let bare = br#"{"model":"m","choices":[{"text":"abcd"}]}"#;
        let facts = read_body(bare);
        assert_eq!((facts.usage, facts.estimate), (None, Some(4)));
        let odd = br#"{"model":"m","choices":[{"text":"ab"}],"usage":{"prompt_tokens":"3"}}"#;
        assert_eq!(read_body(odd).estimate, Some(2));
        assert_eq!(read_body(b"not json"), BodyFacts::default());
    }

    #[test]
    fn data_lines_join_as_the_sse_spec_says_and_huge_events_pass_unread() {
        // A key split over two data lines is not `usage` to a client.
        let split = "data: {\"choices\":[],\"usa\ndata: ge\":{\"prompt_tokens\":1}}\n\n";
        let mut scanner = SseScanner::new(true);
        assert_eq!(scanner.push(split.as_bytes()), split.as_bytes());
        assert_eq!(scanner.seen.usage, None);
        // A JSON value over two lines is read.
        let multi = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":4}}\n\n";
        let mut scanner = SseScanner::new(true);
        assert!(scanner.push(multi.as_bytes()).is_empty());
        assert_eq!(scanner.seen.usage.map(|u| u.prompt), Some(4));
        // An event that never ends is passed on once it is too long.
        let mut scanner = SseScanner::new(false);
        let mut out = 0;
        for _ in 0..300 {
            out += scanner.push(&[b'x'; 4096]).len();
        }
        assert!(out >= MAX_EVENT, "{out}");
        assert!(scanner.buffer.len() <= MAX_EVENT);
    }

    #[test]
    fn the_model_is_read_as_a_json_tree_would_read_it() {
        let tree = |text: &str| {
            serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string))
        };
        for text in [
            r#"{"model":"m","choices":[{"delta":{"content":"a"}}],"usage":null}"#,
            r#"{"choices":[],"model":"m\u00e9"}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"a","model":7}"#,
            r#"{"model":{"model":"inner"}}"#,
            r#"{"x":[1,-2,3.5,true,null,{"model":"no"}],"model":"yes"}"#,
            r#"{"model":"m","big":1e400}"#,
            r#"{"model":"m"} trailing"#,
            r#"{"model":"m""#,
            r#"["model","m"]"#,
            r#""model""#,
            "17",
            "",
        ] {
            assert_eq!(model_of(text), tree(text), "{text}");
        }
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(model_of(&deep), tree(&deep));
    }

    #[test]
    fn an_events_usage_and_choices_are_read_as_a_json_tree_would_read_them() {
        let tree = |text: &str| {
            let value = serde_json::from_str::<Value>(text).ok()?;
            let empty = value
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty());
            Some((read_usage(&value), empty))
        };
        for text in [
            r#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"completion_tokens_details":{"reasoning_tokens":1}}}"#,
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":2}}"#,
            r#"{"choices":{},"usage":{"prompt_tokens":2}}"#,
            r#"{"choices":[],"choices":[1],"usage":null,"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":2.5,"input_tokens":3}}"#,
            r#"{"usage":"x","response":{"usage":{"input_tokens":4,"output_tokens":6}}}"#,
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens_details":{"reasoning_tokens":2}}}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1},"n":1e400}"#,
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1}"#,
        ] {
            assert_eq!(read_event(text), tree(text), "{text}");
        }
    }

    #[test]
    fn estimates_cover_chat_completions_and_responses_text() {
        assert_eq!(
            estimate_completion_tokens(
                &json!({"choices": [{"message": {"content": "abc"}}, {"text": "de"}]})
            ),
            5
        );
        assert_eq!(
            estimate_completion_tokens(
                &json!({"output": [{"content": [{"type": "output_text", "text": "hello"}]}]})
            ),
            5
        );
        assert_eq!(estimate_completion_tokens(&json!({"data": []})), 0);
    }
}
