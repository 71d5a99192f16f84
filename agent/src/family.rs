//! Server families: what the agent must know of the server behind it to
//! bound, meter and identify a request there (docs/server-families.md).
//! The configured `upstream_family` is parsed into [`UpstreamFamily`] at
//! the edge; at run time the agent holds a [`Family`] (configured, or
//! detected by [`crate::upstream`] from what the server says of itself).
//! Everything here is a plain function over plain data: no I/O, and
//! nothing on the request path allocates for the family's sake.

use allot::reservation::Operation;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicU8, Ordering};

/// The `upstream_family` setting: a family, or `auto` to detect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum UpstreamFamily {
    /// OpenAI's own API.
    #[serde(rename = "openai")]
    #[value(name = "openai")]
    Openai,
    #[serde(rename = "vllm")]
    #[value(name = "vllm")]
    Vllm,
    /// llama.cpp: llama-cpp-python's `llama_cpp.server` or `llama-server`.
    #[serde(rename = "llama.cpp")]
    #[value(name = "llama.cpp")]
    LlamaCpp,
    /// Ollama's OpenAI-compatible `/v1` API.
    #[serde(rename = "ollama")]
    #[value(name = "ollama")]
    Ollama,
    /// Hugging Face text-generation-inference (its Messages API).
    #[serde(rename = "tgi")]
    #[value(name = "tgi")]
    Tgi,
    /// Asked once at start and again after the server could not be
    /// reached; until it answers (or when it does not say), the agent
    /// treats it as [`Family::Unknown`].
    #[default]
    #[serde(rename = "auto")]
    #[value(name = "auto")]
    Auto,
}

impl UpstreamFamily {
    /// The family to use before detection: the configured one, or
    /// [`Family::Unknown`] for `auto`.
    pub fn initial(self) -> Family {
        match self {
            UpstreamFamily::Openai => Family::Openai,
            UpstreamFamily::Vllm => Family::Vllm,
            UpstreamFamily::LlamaCpp => Family::LlamaCpp,
            UpstreamFamily::Ollama => Family::Ollama,
            UpstreamFamily::Tgi => Family::Tgi,
            UpstreamFamily::Auto => Family::Unknown,
        }
    }
}

/// The family of the server behind the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    /// OpenAI-compatible, family not known: every limit field a family
    /// honours is bounded, usage is asked for, ids go as the client sent
    /// them.
    Unknown = 0,
    Openai = 1,
    Vllm = 2,
    LlamaCpp = 3,
    Ollama = 4,
    Tgi = 5,
}

/// Whether and how a family's streams report usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// A usage-only chunk before `[DONE]` when asked with
    /// `stream_options.include_usage` (the agent always asks).
    OnRequest,
    /// Usage in the last chunk, beside its choice, asked or not.
    Always,
    /// Never: the agent counts the streamed text with the server's own
    /// tokenizer after the stream ([`Family::counts_streams_by_tokenizing`]).
    Never,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Unknown,
        Family::Openai,
        Family::Vllm,
        Family::LlamaCpp,
        Family::Ollama,
        Family::Tgi,
    ];

    /// Its name in configuration, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Family::Unknown => "unknown",
            Family::Openai => "openai",
            Family::Vllm => "vllm",
            Family::LlamaCpp => "llama.cpp",
            Family::Ollama => "ollama",
            Family::Tgi => "tgi",
        }
    }

    /// The limit field the agent always writes its bound into (besides
    /// every limit field the client sent). OpenAI's chat API documents
    /// `max_completion_tokens` (its reasoning models refuse `max_tokens`);
    /// every other family reads `max_tokens` when its own field is absent.
    pub fn completion_field(self, operation: Operation) -> Option<&'static str> {
        match (self, operation) {
            (Family::Openai, Operation::ChatCompletions) => Some("max_completion_tokens"),
            _ => operation.completion_field(),
        }
    }

    /// The body field the family's server reads first as the completion
    /// limit of chat and legacy completions (as the fake neuron's
    /// `LimitRule` of the same name does).
    pub fn honoured_limit_field(self) -> &'static str {
        match self {
            Family::Openai | Family::Vllm => "max_completion_tokens",
            Family::LlamaCpp => "n_predict",
            Family::Ollama => "options.num_predict",
            Family::Tgi => "max_new_tokens",
            Family::Unknown => "max_tokens",
        }
    }

    /// How its streams report usage.
    pub fn stream_usage(self) -> StreamUsage {
        match self {
            // llama-cpp-python's streams carry no usage, stream_options or
            // not (llama-server's do, in the last chunk: both are read).
            Family::LlamaCpp => StreamUsage::Never,
            Family::Tgi => StreamUsage::Always,
            Family::Unknown | Family::Openai | Family::Vllm | Family::Ollama => {
                StreamUsage::OnRequest
            }
        }
    }

    /// Whether a stream that ended without usage is counted by the
    /// server's tokenizer (`/extras/tokenize/count`, or `/tokenize` on
    /// llama-server) instead of estimated. Only families that have one and
    /// whose streams may lack usage pay for the call.
    pub fn counts_streams_by_tokenizing(self) -> bool {
        self.stream_usage() == StreamUsage::Never
    }

    /// Whether the server takes `id` as its `x-request-id`.
    /// llama-cpp-python answers an empty 400 to any id Python's
    /// `uuid.UUID` cannot read; a canonical UUID always reads.
    pub fn accepts_request_id(self, id: &[u8]) -> bool {
        self != Family::LlamaCpp || is_canonical_uuid(id)
    }

    /// The family an `owned_by` of `GET /v1/models` names, when it names
    /// one: `vllm` (vLLM), `llamacpp` (llama-server), `me`
    /// (llama-cpp-python), `library` (Ollama), `openai` / `system` /
    /// `openai-internal` (OpenAI).
    pub fn from_models_owner(owner: &str) -> Option<Family> {
        match owner {
            "vllm" => Some(Family::Vllm),
            "llamacpp" | "me" => Some(Family::LlamaCpp),
            "library" | "ollama" => Some(Family::Ollama),
            "openai" | "system" | "openai-internal" => Some(Family::Openai),
            _ => None,
        }
    }

    /// TGI answers `GET /info` with its `router`
    /// (`text-generation-router`) and `model_id`.
    pub fn from_info(body: &Value) -> Option<Family> {
        let router = body.get("router")?.as_str()?;
        (router.starts_with("text-generation") && body.get("model_id").is_some())
            .then_some(Family::Tgi)
    }

    /// Ollama answers `GET /api/version` with `{"version": "0.x.y"}`.
    pub fn from_ollama_version(body: &Value) -> Option<Family> {
        let object = body.as_object()?;
        (object.len() == 1 && object.get("version")?.is_string()).then_some(Family::Ollama)
    }

    fn from_u8(value: u8) -> Family {
        Family::ALL
            .into_iter()
            .find(|f| *f as u8 == value)
            .unwrap_or(Family::Unknown)
    }
}

/// The family of `GET /v1/models`'s answer: every model's `owned_by`
/// must name the same one.
pub fn family_of_models(body: &Value) -> Option<Family> {
    let mut found = None;
    for model in body.get("data")?.as_array()? {
        let family = Family::from_models_owner(model.get("owned_by")?.as_str()?)?;
        if found.is_some_and(|f| f != family) {
            return None;
        }
        found = Some(family);
    }
    found
}

/// `8-4-4-4-12` hexadecimal digits.
pub fn is_canonical_uuid(id: &[u8]) -> bool {
    id.len() == 36
        && id.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A token count as a tokenizer endpoint answers it: `{"count": n}`
/// (llama-cpp-python's `/extras/tokenize/count`) or `{"tokens": [...]}`
/// (llama-server's `/tokenize`).
pub fn token_count_of(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Count {
        count: Option<u64>,
        tokens: Option<Vec<serde::de::IgnoredAny>>,
    }
    let answer: Count = serde_json::from_slice(body).ok()?;
    answer.count.or(answer.tokens.map(|t| t.len() as u64))
}

/// The completion tokens a stream without usage is charged when the
/// server counted its text: never below the token-carrying events
/// forwarded (re-tokenizing the text may merge what was generated apart).
pub fn counted_completion(counted: u64, token_events: u64) -> u64 {
    counted.max(token_events)
}

/// The agent's current family, shared by the request path (one atomic
/// load per request) and the detector.
#[derive(Debug)]
pub struct FamilyCell(AtomicU8);

impl FamilyCell {
    pub fn new(family: Family) -> FamilyCell {
        FamilyCell(AtomicU8::new(family as u8))
    }

    pub fn get(&self) -> Family {
        Family::from_u8(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, family: Family) {
        self.0.store(family as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_chat_is_bounded_by_max_completion_tokens_and_the_rest_by_max_tokens() {
        let chat = Operation::ChatCompletions;
        assert_eq!(
            Family::Openai.completion_field(chat),
            Some("max_completion_tokens")
        );
        for family in [
            Family::Unknown,
            Family::Vllm,
            Family::LlamaCpp,
            Family::Ollama,
            Family::Tgi,
        ] {
            assert_eq!(family.completion_field(chat), Some("max_tokens"));
        }
        assert_eq!(
            Family::Openai.completion_field(Operation::Completions),
            Some("max_tokens")
        );
        assert_eq!(
            Family::Openai.completion_field(Operation::Responses),
            Some("max_output_tokens")
        );
        assert_eq!(Family::Vllm.completion_field(Operation::Embeddings), None);
    }

    #[test]
    fn only_llama_cpp_streams_are_counted_by_the_servers_tokenizer() {
        let counted: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| f.counts_streams_by_tokenizing())
            .collect();
        assert_eq!(counted, [Family::LlamaCpp]);
        assert_eq!(Family::Tgi.stream_usage(), StreamUsage::Always);
        assert_eq!(Family::Vllm.stream_usage(), StreamUsage::OnRequest);
    }

    #[test]
    fn llama_cpp_takes_only_uuid_request_ids() {
        let uuid = b"0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5b";
        assert!(Family::LlamaCpp.accepts_request_id(uuid));
        assert!(!Family::LlamaCpp.accepts_request_id(b"my-trace-1"));
        assert!(!Family::LlamaCpp.accepts_request_id(b"0b7e4a52-3c3d-4f0e-9a4b-6c1d2e3f4a5g"));
        assert!(!Family::LlamaCpp.accepts_request_id(b"0b7e4a52x3c3d-4f0e-9a4b-6c1d2e3f4a5b"));
        for family in [Family::Unknown, Family::Openai, Family::Vllm, Family::Tgi] {
            assert!(family.accepts_request_id(b"my-trace-1"), "{family:?}");
        }
    }

    #[test]
    fn a_family_is_detected_from_what_the_server_says_of_itself() {
        let models = |owners: &[&str]| json!({"object": "list", "data": owners.iter().map(|o| json!({"id": "m", "owned_by": o})).collect::<Vec<_>>()});
        assert_eq!(family_of_models(&models(&["vllm"])), Some(Family::Vllm));
        assert_eq!(
            family_of_models(&models(&["me", "me"])),
            Some(Family::LlamaCpp)
        );
        assert_eq!(
            family_of_models(&models(&["llamacpp"])),
            Some(Family::LlamaCpp)
        );
        assert_eq!(
            family_of_models(&models(&["library"])),
            Some(Family::Ollama)
        );
        assert_eq!(family_of_models(&models(&["system"])), Some(Family::Openai));
        assert_eq!(family_of_models(&models(&["vllm", "me"])), None, "mixed");
        assert_eq!(family_of_models(&models(&["fake-neuron"])), None);
        assert_eq!(family_of_models(&models(&[])), None);
        assert_eq!(
            Family::from_info(&json!({"model_id": "m", "router": "text-generation-router"})),
            Some(Family::Tgi)
        );
        assert_eq!(Family::from_info(&json!({"router": "other"})), None);
        assert_eq!(
            Family::from_ollama_version(&json!({"version": "0.5.7"})),
            Some(Family::Ollama)
        );
        assert_eq!(Family::from_ollama_version(&json!({"version": 5})), None);
    }

    #[test]
    fn token_counts_are_read_from_either_tokenizer_answer() {
        assert_eq!(token_count_of(br#"{"count": 12}"#), Some(12));
        assert_eq!(token_count_of(br#"{"tokens": [1, 2, 3]}"#), Some(3));
        assert_eq!(token_count_of(br#"{"count": -1}"#), None);
        assert_eq!(token_count_of(b"not json"), None);
        assert_eq!(counted_completion(5, 7), 7, "never below the events");
        assert_eq!(counted_completion(9, 7), 9);
    }

    #[test]
    fn the_cell_keeps_every_family() {
        let cell = FamilyCell::new(Family::Unknown);
        for family in Family::ALL {
            cell.set(family);
            assert_eq!(cell.get(), family);
        }
    }

    #[test]
    fn the_setting_names_the_families_as_their_documents_do() {
        #[derive(Deserialize)]
        struct Setting {
            upstream_family: UpstreamFamily,
        }
        let read = |text: &str| toml::from_str::<Setting>(text).map(|s| s.upstream_family);
        assert_eq!(
            read("upstream_family = \"llama.cpp\"").unwrap(),
            UpstreamFamily::LlamaCpp
        );
        assert_eq!(
            read("upstream_family = \"auto\"").unwrap(),
            UpstreamFamily::Auto
        );
        let error = read("upstream_family = \"llamacpp\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("upstream_family"), "{error}");
        assert!(error.contains("llama.cpp"), "lists the values: {error}");
        assert_eq!(UpstreamFamily::Auto.initial(), Family::Unknown);
        assert_eq!(UpstreamFamily::Tgi.initial(), Family::Tgi);
    }
}
