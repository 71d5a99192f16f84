//! The agent's configuration: a TOML file, every field overridable by an
//! `ALLOT_AGENT_*` environment variable and a command-line flag. Validated
//! before any port is bound.

use allot::reservation::ReservationPolicy;
use allot::InvalidArgument;
use allot_runtime::layered::{self, ArgsError, Environment, FileError, Layers};
use allot_runtime::telemetry::LogFormat;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration the agent cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// A field whose value cannot be used; the message starts with its
    /// name.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(#[from] InvalidArgument),
    #[error("{UNKNOWN_PATHS_REMOVED}")]
    UnknownPathsRemoved,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(InvalidArgument::new(field, message))
}

/// What the command line says besides the fields of [`AgentConfig`].
#[derive(Debug, Default, clap::Args)]
pub struct Sources {
    /// TOML configuration file; flags and ALLOT_AGENT_* variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Removed (see pass_through); refused with a message if set.
    #[arg(long, hide = true)]
    pub unknown_paths: Option<String>,
}

/// The environment variable of `--flag`: `ALLOT_AGENT_FLAG` (upper snake
/// case), and `ALLOT_AGENT_ID` for `--agent-id`.
pub fn env_name(flag: &str) -> String {
    let name = flag.strip_prefix("agent-").unwrap_or(flag);
    format!("ALLOT_AGENT_{}", name.replace('-', "_").to_uppercase())
}

/// The command line of `allot-agent`: `--config`, and every field of
/// [`AgentConfig`] as a flag.
pub fn command() -> clap::Command {
    // Set after the derives, whose doc comments would set `about`.
    let fields =
        AgentConfig::augment_args(Sources::augment_args(clap::Command::new("allot-agent")));
    layered::prepare(fields)
        .version(env!("CARGO_PKG_VERSION"))
        .about("allot agent: OpenAI-compatible admission proxy beside an inference node")
        .after_help(
            "Every flag --some-name is also read from the environment variable \
             ALLOT_AGENT_SOME_NAME (--agent-id: ALLOT_AGENT_ID), and every TOML key some_name \
             from both: a flag beats the variable, which beats the file, which beats the \
             default. Tables (reservation, models, upstreams) take JSON.",
        )
}

/// The arguments of `command` in `args` (the program name first) and in
/// `env`.
pub fn parse(
    command: &clap::Command,
    args: impl IntoIterator<Item = OsString>,
    env: &Environment,
) -> Result<Layers, ArgsError> {
    Layers::parse(command, args, env, env_name)
}

/// The configuration: defaults, then the file, then the environment, then
/// flags; validated, and every TLS file it names read once, before any
/// port is bound.
pub fn load(layers: &Layers) -> Result<AgentConfig, ConfigError> {
    let mut sources = Sources::default();
    layers.apply(&mut sources)?;
    if sources.unknown_paths.is_some() {
        return Err(ConfigError::UnknownPathsRemoved);
    }
    let mut config = match &sources.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    layers.apply(&mut config)?;
    config.validate()?;
    Ok(config)
}

/// How the agent reads its neuron's GPUs and models for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum NeuronAdapterKind {
    /// No node reports: the coordinator does not place models here.
    #[default]
    None,
    /// allot's fake neuron (`/_fake/node`).
    Fake,
    /// Ollama (`/api/ps`, keep_alive); needs `gpu_vram_bytes`.
    Ollama,
}

/// Every field is a TOML key, a flag (`--` and the key in kebab case) and
/// an environment variable (`ALLOT_AGENT_` and the key in upper case; the
/// agent's id is `ALLOT_AGENT_ID`): see [`command`] and [`load`].
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// HTTP address clients send OpenAI requests to.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Prometheus metrics address; unset disables the exporter.
    #[arg(long, value_parser = allot_runtime::layered::listen_or_off)]
    #[serde(deserialize_with = "allot_runtime::layered::deserialize_listen_or_off")]
    pub metrics_listen: std::option::Option<SocketAddr>,
    /// Coordinator gRPC endpoints, tried in turn: `https://` (mutual TLS
    /// with `coordinator_ca`, `client_cert`, `client_key`), or `http://`
    /// only with `insecure`.
    #[arg(long, value_delimiter = ',')]
    pub coordinators: Vec<String>,
    /// Allow plaintext `http://` coordinators (no TLS, no identity). For a
    /// laptop or a test; with `false` (the default) an `http://`
    /// coordinator is a start-up error.
    #[arg(long)]
    pub insecure: bool,
    /// PEM CA certificates the coordinators' server certificates are
    /// verified against.
    #[arg(long)]
    pub coordinator_ca: Option<PathBuf>,
    /// PEM client certificate presented to coordinators; it must name this
    /// agent (URI SAN `spiffe://allot/agent/<agent_id>`, made by
    /// `allot-coordinator certs agent <id>`). Read again at every
    /// (re)connection, so a renewed certificate is used without a restart.
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// PEM certificate (chain) of the client-facing listener: when set with
    /// `listen_tls_key`, clients speak HTTPS to the agent; unset, the
    /// listener is plaintext HTTP (keep it on loopback or a pod network).
    #[arg(long)]
    pub listen_tls_cert: Option<PathBuf>,
    /// PEM private key of `listen_tls_cert`.
    #[arg(long)]
    pub listen_tls_key: Option<PathBuf>,
    /// PEM CA certificates trusted for `https://` upstreams, besides the
    /// system's roots.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// This agent's id; stable across restarts (it names its usage stream).
    #[arg(long)]
    pub agent_id: String,
    /// The neuron this agent sits beside.
    #[arg(long)]
    pub neuron_id: String,
    /// Base URL of the neuron's OpenAI-compatible API.
    #[arg(long)]
    pub neuron_url: String,
    /// The server family of the neuron and every upstream (`openai`,
    /// `vllm`, `llama.cpp`, `ollama`, `tgi`), or `auto` to ask the server
    /// at start and after it could not be reached. The limit field always
    /// written, how a stream's usage is read and the request id rule follow
    /// it (docs/server-families.md).
    #[arg(long, value_enum)]
    pub upstream_family: crate::family::UpstreamFamily,
    /// Directory of the usage spool.
    #[arg(long)]
    pub spool_dir: PathBuf,
    /// Usage records the agent keeps in memory until the coordinator
    /// acknowledges them (about 1 KiB each), those the disk has not taken
    /// yet included. At this many, admission stops with 503
    /// `usage_spool_unavailable` until acknowledgements or the disk catch
    /// up: nothing is dropped.
    #[arg(long)]
    pub spool_max_records: usize,
    /// Largest request body accepted; larger bodies get 413.
    #[arg(long)]
    pub max_body_bytes: usize,
    /// How long a request may wait for an allowance grant.
    #[arg(long)]
    pub allowance_wait_ms: u64,
    /// Before a key has any measured demand, asks cover this many requests
    /// like the one waiting.
    #[arg(long)]
    pub grant_multiplier: u64,
    /// Asks cover this long of a key's measured demand; the agent asks
    /// ahead when what it holds would last less than half of it.
    #[arg(long)]
    pub refresh_interval_ms: u64,
    /// Stop admitting on a lease this long before it expires.
    #[arg(long)]
    pub lease_margin_ms: u64,
    /// Give back a slice unused for this long.
    #[arg(long)]
    pub idle_return_ms: u64,
    /// Resend unacknowledged usage after this long.
    #[arg(long)]
    pub usage_resend_ms: u64,
    /// Send usage to the coordinator at most this often (0: at once).
    /// Records are on disk before; a longer interval means fewer messages
    /// and later settlement.
    #[arg(long)]
    pub usage_flush_ms: u64,
    /// Time to connect to a coordinator.
    #[arg(long)]
    pub coordinator_connect_timeout_ms: u64,
    /// Time to connect to the neuron.
    #[arg(long)]
    pub upstream_connect_timeout_ms: u64,
    /// Time until the neuron's response headers.
    #[arg(long)]
    pub first_byte_timeout_ms: u64,
    /// Time for a whole request, streamed or not, from admission to the
    /// last byte.
    #[arg(long)]
    pub request_timeout_ms: u64,
    /// A stream that sends nothing for this long is cut: the client gets an
    /// error event, the request settles at what was delivered.
    #[arg(long)]
    pub stream_idle_timeout_ms: u64,
    /// Time a client has, from the accept of its connection (or the end of
    /// its previous request), to send complete request headers; a
    /// connection that sends nothing, or half a header line, is closed.
    #[arg(long)]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a whole request body once its headers are
    /// in; later it gets 408 `request_body_timeout`. A request holds no
    /// concurrency slot while its body arrives.
    #[arg(long)]
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection (HTTP/1.1 or HTTP/2) with no request in
    /// flight for this long is closed.
    #[arg(long)]
    pub connection_idle_timeout_ms: u64,
    /// Client connections open at once. Past it, the oldest connection with
    /// no request in flight is closed to make room; when every connection
    /// is serving a request, the new one gets 503 `too_many_connections`
    /// and is closed. Each connection may need one to the neuron: keep the
    /// open-file limit (`ulimit -n`) above twice this plus 256.
    #[arg(long)]
    pub max_connections: usize,
    /// HTTP/2 clients are pinged this often, and a connection whose ping
    /// is not answered within as long again is closed.
    #[arg(long)]
    pub http2_keep_alive_interval_ms: u64,
    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long)]
    pub http2_max_concurrent_streams: u32,
    /// Unknown API keys remembered at once (each for 5 s, so that a flood
    /// of bad keys is not a flood of coordinator lookups); past it the
    /// oldest is forgotten. At most about 200 bytes each: 2 MB at the
    /// default.
    /// Known keys are bounded by the keys the operator created.
    #[arg(long)]
    pub unknown_key_cache_max: usize,
    /// Requests this agent serves at once (0: no limit); more get 503.
    #[arg(long)]
    pub max_concurrent_requests: usize,
    /// Requests one key may have in flight on this agent (0: no limit);
    /// more get 429 `rate_limit_exceeded`.
    #[arg(long)]
    pub max_concurrent_per_key: usize,
    /// Refusals of one key recorded per UTC minute (as usage rows at no
    /// cost); further refusals in that minute are only counted in
    /// `allot_agent_refusals_unrecorded_total`. 0 records none.
    #[arg(long)]
    pub refusal_records_per_key_per_minute: u32,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to upstreams.
    #[arg(long)]
    pub upstream_http2: bool,
    /// Per-model upstream base URLs, overriding `neuron_url`.
    #[arg(long, value_parser = layered::json::<HashMap<String, String>>)]
    pub upstreams: HashMap<String, String>,
    /// Ask the neuron `GET /models/{model_id}/endpoint` for models without
    /// a fixed upstream.
    #[arg(long)]
    pub endpoint_discovery: bool,
    /// How long a discovered endpoint is used before it is looked up again.
    #[arg(long)]
    pub endpoint_cache_ms: u64,
    /// Requests on paths allot does not meter that are forwarded to the
    /// neuron for a valid key, uncharged: `"METHOD /path"` entries such as
    /// `"GET /v1/files"`; a path ending in `/*` matches everything under
    /// it. Every other method and path is 404. Empty by default: a
    /// neuron's own control routes (unload, load) must never be reachable.
    #[arg(long, value_delimiter = ',')]
    pub pass_through: Vec<String>,
    /// Time given to in-flight requests at shutdown.
    #[arg(long)]
    pub shutdown_grace_ms: u64,
    /// Reservation overheads for every model...
    #[arg(long, value_parser = layered::json::<ReservationPolicy>)]
    pub reservation: ReservationPolicy,
    /// ...and per model where a chat template differs.
    #[arg(long, value_parser = layered::json::<HashMap<String, ReservationPolicy>>)]
    pub models: HashMap<String, ReservationPolicy>,
    /// `text` or `json`.
    #[arg(long)]
    pub log_format: LogFormat,
    /// `none`, `fake` or `ollama`: how node reports read the neuron.
    #[arg(long)]
    pub neuron_adapter: NeuronAdapterKind,
    /// Node reports go out on change and at least this often.
    #[arg(long)]
    pub node_report_ms: u64,
    /// VRAM of each GPU of the node, for adapters whose server does not
    /// report it (Ollama).
    #[arg(long, value_delimiter = ',')]
    pub gpu_vram_bytes: Vec<u64>,
    /// Concurrent requests the neuron serves well (placement's load is
    /// in flight ÷ capacity).
    #[arg(long)]
    pub node_capacity: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            metrics_listen: Some("127.0.0.1:9465".parse().expect("valid default")),
            coordinators: vec!["https://127.0.0.1:50051".into()],
            insecure: false,
            coordinator_ca: None,
            client_cert: None,
            client_key: None,
            listen_tls_cert: None,
            listen_tls_key: None,
            upstream_ca: None,
            agent_id: "agent-1".into(),
            neuron_id: "neuron-1".into(),
            neuron_url: "http://127.0.0.1:9100".into(),
            upstream_family: crate::family::UpstreamFamily::Auto,
            spool_dir: PathBuf::from("allot-data/agent"),
            spool_max_records: 100_000,
            max_body_bytes: 8 * 1024 * 1024,
            allowance_wait_ms: 250,
            grant_multiplier: 16,
            refresh_interval_ms: 2_000,
            lease_margin_ms: 1_000,
            idle_return_ms: 30_000,
            usage_resend_ms: 5_000,
            usage_flush_ms: 100,
            coordinator_connect_timeout_ms: 2_000,
            upstream_connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 120_000,
            request_timeout_ms: 600_000,
            stream_idle_timeout_ms: 60_000,
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 60_000,
            connection_idle_timeout_ms: 60_000,
            max_connections: 1_024,
            http2_keep_alive_interval_ms: 20_000,
            http2_max_concurrent_streams: 256,
            unknown_key_cache_max: crate::keys::DEFAULT_MAX_UNKNOWN,
            max_concurrent_requests: 0,
            max_concurrent_per_key: 0,
            refusal_records_per_key_per_minute: 60,
            upstream_http2: false,
            upstreams: HashMap::new(),
            endpoint_discovery: false,
            endpoint_cache_ms: 60_000,
            pass_through: Vec::new(),
            shutdown_grace_ms: 30_000,
            reservation: ReservationPolicy::default(),
            models: HashMap::new(),
            log_format: LogFormat::Text,
            neuron_adapter: NeuronAdapterKind::None,
            node_report_ms: 2_000,
            gpu_vram_bytes: Vec::new(),
            node_capacity: 8,
        }
    }
}

impl AgentConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = layered::read_text(path)?;
        if let Ok(table) = toml::from_str::<toml::Table>(&text) {
            if table.contains_key("unknown_paths") {
                return Err(ConfigError::UnknownPathsRemoved);
            }
        }
        Ok(layered::parse_toml(path, &text)?)
    }

    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        allot::key::validate_id("agent_id", &self.agent_id)?;
        if self.coordinators.is_empty() {
            return Err(invalid(
                "coordinators",
                "at least one coordinator endpoint is needed",
            ));
        }
        for (i, endpoint) in self.coordinators.iter().enumerate() {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(invalid(
                    format!("coordinators[{i}]"),
                    format!("{endpoint:?} must start with http:// or https://"),
                ));
            }
        }
        if !(self.neuron_url.starts_with("http://") || self.neuron_url.starts_with("https://")) {
            return Err(invalid(
                "neuron_url",
                format!("{:?} must start with http://", self.neuron_url),
            ));
        }
        if self.neuron_url.ends_with('/') {
            return Err(invalid("neuron_url", "must not end with '/'"));
        }
        if self.spool_max_records == 0 {
            return Err(invalid("spool_max_records", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be greater than zero"));
        }
        for (model, url) in &self.upstreams {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    format!("upstreams.{model}"),
                    format!("{url:?} must start with http:// or https://"),
                ));
            }
        }
        for (name, value) in [
            ("first_byte_timeout_ms", self.first_byte_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            (
                "connection_idle_timeout_ms",
                self.connection_idle_timeout_ms,
            ),
            (
                "http2_keep_alive_interval_ms",
                self.http2_keep_alive_interval_ms,
            ),
            (
                "upstream_connect_timeout_ms",
                self.upstream_connect_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be greater than zero"));
            }
        }
        if self.neuron_adapter == NeuronAdapterKind::Ollama && self.gpu_vram_bytes.is_empty() {
            return Err(invalid(
                "gpu_vram_bytes",
                "the ollama adapter needs the VRAM of the node's GPUs",
            ));
        }
        if self.node_report_ms < 100 {
            return Err(invalid("node_report_ms", "must be at least 100"));
        }
        if self.node_capacity == 0 {
            return Err(invalid("node_capacity", "must be at least 1"));
        }
        if self.grant_multiplier == 0 {
            return Err(invalid("grant_multiplier", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.http2_max_concurrent_streams == 0 {
            return Err(invalid(
                "http2_max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.unknown_key_cache_max == 0 {
            return Err(invalid("unknown_key_cache_max", "must be at least 1"));
        }
        for (i, entry) in self.pass_through.iter().enumerate() {
            PassThroughRule::parse(entry)
                .map_err(|e| invalid(format!("pass_through[{i}]"), e.to_string()))?;
        }
        self.validate_tls()
    }

    /// A coordinator URL whose scheme cannot be honoured is an error naming
    /// the field, never a silent downgrade.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid(
                "client_cert",
                "client_cert and client_key go together",
            ));
        }
        if self.listen_tls_cert.is_some() != self.listen_tls_key.is_some() {
            return Err(invalid(
                "listen_tls_cert",
                "listen_tls_cert and listen_tls_key go together",
            ));
        }
        let tls_files = self.coordinator_ca.is_some() || self.client_cert.is_some();
        for (i, endpoint) in self.coordinators.iter().enumerate() {
            if endpoint.starts_with("https://") {
                if self.coordinator_ca.is_none() {
                    return Err(invalid(
                        "coordinator_ca",
                        format!("must be set to verify coordinators[{i}] {endpoint}"),
                    ));
                }
                if self.client_cert.is_none() {
                    return Err(invalid(
                        "client_cert",
                        format!(
                            "must be set: coordinators[{i}] {endpoint} needs a client \
                             certificate naming this agent (allot-coordinator certs agent {})",
                            self.agent_id
                        ),
                    ));
                }
            } else if tls_files {
                return Err(invalid(
                    format!("coordinators[{i}]"),
                    format!("{endpoint} is plaintext but TLS files are set: use https://"),
                ));
            } else if !self.insecure {
                return Err(invalid(
                    format!("coordinators[{i}]"),
                    format!(
                        "{endpoint} is plaintext: use https:// (with coordinator_ca, \
                         client_cert, client_key) or set insecure = true"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The files of the agent's client TLS towards coordinators.
    pub fn coordinator_tls(&self) -> Option<ClientTlsFiles> {
        Some(ClientTlsFiles {
            ca: self.coordinator_ca.clone()?,
            cert: self.client_cert.clone()?,
            key: self.client_key.clone()?,
        })
    }

    /// The parsed `pass_through` allow-list (validated before).
    pub fn pass_through_rules(&self) -> Vec<PassThroughRule> {
        self.pass_through
            .iter()
            .filter_map(|entry| PassThroughRule::parse(entry).ok())
            .collect()
    }

    pub fn policy_for(&self, model: &str) -> ReservationPolicy {
        self.models.get(model).copied().unwrap_or(self.reservation)
    }

    pub fn allowance_wait(&self) -> Duration {
        Duration::from_millis(self.allowance_wait_ms)
    }

    pub fn refresh_interval(&self) -> Duration {
        Duration::from_millis(self.refresh_interval_ms.max(100))
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms)
    }
}

/// The files of the agent's mutual TLS towards coordinators.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The message for configurations that still set the removed
/// `unknown_paths`.
pub const UNKNOWN_PATHS_REMOVED: &str = "unknown_paths: removed; every path allot does not meter \
     is 404 unless listed in pass_through, e.g. pass_through = [\"GET /v1/files\"]";

/// One `pass_through` entry: a method and a path, or everything under a
/// path for `/prefix/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassThroughRule {
    pub method: http::Method,
    pub path: String,
    /// `/prefix/*`: `path` is `/prefix/` and matches any path under it.
    pub prefix: bool,
}

const PASS_THROUGH_METHODS: [&str; 7] =
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Why a `pass_through` entry is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadPassThrough {
    #[error("{0:?} must be a method and a path, e.g. \"GET /v1/files\"")]
    Shape(String),
    #[error("{0:?} is not one of {methods}", methods = PASS_THROUGH_METHODS.join(", "))]
    Method(String),
    #[error("{0:?}: `*` may only end a path, after `/`")]
    Wildcard(String),
    #[error("{0:?} must start with '/' and hold no query, `*`, `.`/`..` segment or escape")]
    NotPlain(String),
    #[error("{0} is metered by allot and cannot be passed through")]
    Metered(&'static str),
}

impl PassThroughRule {
    pub fn parse(entry: &str) -> Result<PassThroughRule, BadPassThrough> {
        let mut words = entry.split_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            return Err(BadPassThrough::Shape(entry.to_string()));
        };
        if !PASS_THROUGH_METHODS.contains(&method) {
            return Err(BadPassThrough::Method(method.to_string()));
        }
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| BadPassThrough::Method(method.to_string()))?;
        let (path, prefix) = match path.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => (prefix, true),
            Some(_) => return Err(BadPassThrough::Wildcard(path.to_string())),
            None => (path, false),
        };
        if !path.starts_with('/') || !is_plain_path(path) {
            return Err(BadPassThrough::NotPlain(path.to_string()));
        }
        if let Some(operation) = allot::reservation::Operation::ALL
            .iter()
            .find(|op| op.path() == path)
        {
            return Err(BadPassThrough::Metered(operation.path()));
        }
        Ok(PassThroughRule {
            method,
            path: path.to_string(),
            prefix,
        })
    }

    /// Whether a request with `method` on `path` is passed through. A path
    /// that could mean another one to the neuron (dot segments, escaped
    /// slashes or dots, empty segments) never matches a prefix.
    pub fn allows(&self, method: &http::Method, path: &str) -> bool {
        if *method != self.method {
            return false;
        }
        if self.prefix {
            path.len() > self.path.len() && path.starts_with(&self.path) && is_plain_path(path)
        } else {
            path == self.path
        }
    }
}

/// No query, wildcard, backslash, percent escape, empty or dot segment:
/// the neuron reads the path exactly as allot matched it.
fn is_plain_path(path: &str) -> bool {
    if path.contains(['?', '#', '*', '\\', '%']) {
        return false;
    }
    // A trailing `/` leaves one empty last segment; no other may be empty.
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    segments.iter().enumerate().all(|(i, segment)| {
        (!segment.is_empty() || i + 1 == segments.len()) && *segment != "." && *segment != ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn args(flags: &[&str]) -> Vec<OsString> {
        std::iter::once("allot-agent")
            .chain(flags.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn every_toml_field_has_a_flag_and_an_environment_variable() {
        assert!(layered::field_names::<AgentConfig>().len() > 40);
        let unsettable = layered::unsettable_fields::<AgentConfig>(&command(), env_name);
        assert!(unsettable.is_empty(), "{unsettable:?}");
        assert_eq!(env_name("agent-id"), "ALLOT_AGENT_ID");
        assert_eq!(env_name("neuron-url"), "ALLOT_AGENT_NEURON_URL");
    }

    #[test]
    fn a_file_switches_the_metrics_exporter_off_or_moves_it_like_the_flag() {
        let read = |text: &str| {
            allot_runtime::layered::parse_toml::<AgentConfig>(std::path::Path::new("f.toml"), text)
        };
        assert_eq!(
            read("metrics_listen = \"off\"").unwrap().metrics_listen,
            None
        );
        assert_eq!(read("metrics_listen = \"\"").unwrap().metrics_listen, None);
        assert_eq!(
            read("metrics_listen = \"127.0.0.1:7000\"")
                .unwrap()
                .metrics_listen,
            Some("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(
            read("").unwrap().metrics_listen,
            Some("127.0.0.1:9465".parse().unwrap()),
            "absent: the default"
        );
        let bad = read("metrics_listen = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("metrics_listen") || bad.contains("invalid socket address"),
            "{bad}"
        );
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
        let dir = std::env::temp_dir().join(format!("allot-agent-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "insecure = true\ncoordinators = [\"http://127.0.0.1:1\"]\nagent_id = \"from-file\"\nmax_connections = 5\n",
        )
        .unwrap();
        let file = path.display().to_string();
        let command = command();
        let load_with = |flags: &[&str], vars: &[(&str, &str)]| {
            load(&parse(&command, args(flags), &env(vars)).unwrap()).unwrap()
        };
        let from_file = load_with(&["--config", &file], &[]);
        assert_eq!(
            (from_file.max_connections, from_file.agent_id.as_str()),
            (5, "from-file")
        );
        let from_env = load_with(
            &[],
            &[
                ("ALLOT_AGENT_CONFIG", &file),
                ("ALLOT_AGENT_ID", "from-env"),
                ("ALLOT_AGENT_MAX_CONNECTIONS", "6"),
            ],
        );
        assert_eq!(
            (from_env.max_connections, from_env.agent_id.as_str()),
            (6, "from-env")
        );
        let from_flag = load_with(
            &[
                "--max-connections",
                "7",
                "--endpoint-discovery",
                "--metrics-listen=off",
            ],
            &[
                ("ALLOT_AGENT_CONFIG", &file),
                ("ALLOT_AGENT_MAX_CONNECTIONS", "6"),
            ],
        );
        assert_eq!(from_flag.max_connections, 7);
        assert!(from_flag.endpoint_discovery && from_flag.insecure);
        assert_eq!(from_flag.metrics_listen, None);
        let error = load(&parse(&command, args(&["--unknown-paths", "x"]), &env(&[])).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("unknown_paths: removed"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pass_through_rules_match_their_method_and_path_only() {
        let exact = PassThroughRule::parse("GET /v1/files").unwrap();
        assert!(exact.allows(&http::Method::GET, "/v1/files"));
        assert!(!exact.allows(&http::Method::POST, "/v1/files"));
        assert!(!exact.allows(&http::Method::GET, "/v1/files/x"));
        let prefix = PassThroughRule::parse("GET /v1/files/*").unwrap();
        assert!(prefix.allows(&http::Method::GET, "/v1/files/abc"));
        assert!(!prefix.allows(&http::Method::GET, "/v1/files/"));
        assert!(!prefix.allows(&http::Method::GET, "/v1/files"));
        for sneaky in [
            "/v1/files/../_fake/models/m/unload",
            "/v1/files/%2e%2e/x",
            "/v1/files//x",
            "/v1/files/a\\..\\b",
        ] {
            assert!(!prefix.allows(&http::Method::GET, sneaky), "{sneaky}");
        }
    }

    #[test]
    fn bad_pass_through_entries_are_refused_naming_the_field() {
        for bad in [
            "/v1/files",
            "get /v1/files",
            "GET v1/files",
            "GET /v1/*/files",
            "GET /v1/files/../x",
            "POST /v1/chat/completions",
            "GET /a /b",
        ] {
            let config = AgentConfig {
                insecure: true,
                coordinators: vec!["http://127.0.0.1:50051".into()],
                pass_through: vec![bad.into()],
                ..AgentConfig::default()
            };
            let error = config.validate().unwrap_err().to_string();
            assert!(error.starts_with("pass_through[0]: "), "{bad}: {error}");
        }
    }

    #[test]
    fn a_file_still_setting_unknown_paths_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("allot-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "unknown_paths = \"pass_through\"\n").unwrap();
        let error = AgentConfig::from_file(&path).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(error.contains("unknown_paths: removed"), "{error}");
    }

    /// The row of `field` in docs/configuration.md.
    fn documented_row(row: &layered::Reference) -> String {
        let default = match row.default.as_str() {
            "null" => "unset".to_string(),
            other => format!("`{other}`"),
        };
        format!(
            "| `{}` | `{}` | `{}` | {default} | {} |",
            row.key, row.flag, row.variable, row.meaning
        )
    }

    #[test]
    fn the_configuration_reference_documents_every_field() {
        let docs = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap();
        let defaults = serde_json::to_value(AgentConfig::default()).unwrap();
        let rows = layered::reference::<AgentConfig>(&command(), &defaults, env_name);
        let missing: Vec<String> = rows
            .iter()
            .filter(|row| {
                !docs.lines().any(|line| {
                    line.starts_with(&format!(
                        "| `{}` | `{}` | `{}` |",
                        row.key, row.flag, row.variable
                    ))
                })
            })
            .map(documented_row)
            .collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks:\n{}",
            missing.join("\n")
        );
    }
}
