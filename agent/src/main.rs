//! `allot-agent`: parses configuration, validates it before binding
//! anything, then runs the library's proxy until SIGINT or SIGTERM.

use allot_agent::config::{AgentConfig, UNKNOWN_PATHS_REMOVED};
use allot_runtime::telemetry::{self, LogFormat};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// allot agent: OpenAI-compatible admission proxy beside an inference node.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// TOML configuration file; flags and ALLOT_AGENT_* variables override it.
    #[arg(long, env = "ALLOT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "ALLOT_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Prometheus address; "off" disables it.
    #[arg(long, env = "ALLOT_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Comma-separated coordinator endpoints.
    #[arg(long, env = "ALLOT_AGENT_COORDINATORS", value_delimiter = ',')]
    coordinators: Option<Vec<String>>,
    /// Allow plaintext http:// coordinators (no TLS); for a laptop or a test.
    #[arg(long, env = "ALLOT_AGENT_INSECURE", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    insecure: Option<bool>,
    /// PEM CA of the coordinators' server certificates.
    #[arg(long, env = "ALLOT_AGENT_COORDINATOR_CA")]
    coordinator_ca: Option<PathBuf>,
    /// PEM client certificate naming this agent, presented to coordinators.
    #[arg(long, env = "ALLOT_AGENT_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "ALLOT_AGENT_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// PEM certificate of the client-facing listener (HTTPS when set).
    #[arg(long, env = "ALLOT_AGENT_LISTEN_TLS_CERT")]
    listen_tls_cert: Option<PathBuf>,
    /// PEM private key of --listen-tls-cert.
    #[arg(long, env = "ALLOT_AGENT_LISTEN_TLS_KEY")]
    listen_tls_key: Option<PathBuf>,
    /// PEM CA trusted for https:// upstreams besides the system's roots.
    #[arg(long, env = "ALLOT_AGENT_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    #[arg(long, env = "ALLOT_AGENT_ID")]
    agent_id: Option<String>,
    #[arg(long, env = "ALLOT_AGENT_NEURON_ID")]
    neuron_id: Option<String>,
    #[arg(long, env = "ALLOT_AGENT_NEURON_URL")]
    neuron_url: Option<String>,
    #[arg(long, env = "ALLOT_AGENT_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Usage records kept in memory until acknowledged; at this many,
    /// admission stops with 503.
    #[arg(long, env = "ALLOT_AGENT_SPOOL_MAX_RECORDS")]
    spool_max_records: Option<usize>,
    #[arg(long, env = "ALLOT_AGENT_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    #[arg(long, env = "ALLOT_AGENT_ALLOWANCE_WAIT_MS")]
    allowance_wait_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_FIRST_BYTE_TIMEOUT_MS")]
    first_byte_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_STREAM_IDLE_TIMEOUT_MS")]
    stream_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    #[arg(long, env = "ALLOT_AGENT_MAX_CONCURRENT_PER_KEY")]
    max_concurrent_per_key: Option<usize>,
    /// Refusals of one key recorded per minute; the rest are only counted.
    #[arg(long, env = "ALLOT_AGENT_REFUSAL_RECORDS_PER_KEY_PER_MINUTE")]
    refusal_records_per_key_per_minute: Option<u32>,
    /// Look model endpoints up with GET /models/{id}/endpoint on the neuron.
    #[arg(long, env = "ALLOT_AGENT_ENDPOINT_DISCOVERY")]
    endpoint_discovery: Option<bool>,
    /// "METHOD /path" forwarded uncharged; repeat or comma-separate.
    #[arg(long, env = "ALLOT_AGENT_PASS_THROUGH", value_delimiter = ',')]
    pass_through: Option<Vec<String>>,
    /// Removed (see pass_through); refused with a message if set.
    #[arg(long, env = "ALLOT_AGENT_UNKNOWN_PATHS", hide = true)]
    unknown_paths: Option<String>,
    #[arg(long, env = "ALLOT_AGENT_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_BODY_READ_TIMEOUT_MS")]
    body_read_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_CONNECTION_IDLE_TIMEOUT_MS")]
    connection_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    #[arg(long, env = "ALLOT_AGENT_HTTP2_KEEP_ALIVE_INTERVAL_MS")]
    http2_keep_alive_interval_ms: Option<u64>,
    #[arg(long, env = "ALLOT_AGENT_HTTP2_MAX_CONCURRENT_STREAMS")]
    http2_max_concurrent_streams: Option<u32>,
    #[arg(long, env = "ALLOT_AGENT_UNKNOWN_KEY_CACHE_MAX")]
    unknown_key_cache_max: Option<usize>,
    #[arg(long, env = "ALLOT_AGENT_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// none, fake or ollama: how node reports read the neuron.
    #[arg(long, env = "ALLOT_AGENT_NEURON_ADAPTER")]
    neuron_adapter: Option<allot_agent::config::NeuronAdapterKind>,
    /// VRAM of a GPU of the node in bytes (ollama); repeat or comma-separate.
    #[arg(long, env = "ALLOT_AGENT_GPU_VRAM_BYTES", value_delimiter = ',')]
    gpu_vram_bytes: Vec<u64>,
    /// text or json.
    #[arg(long, env = "ALLOT_AGENT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn load(cli: Cli) -> Result<AgentConfig, String> {
    let mut config = match &cli.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    if let Some(v) = cli.insecure {
        config.insecure = v;
    }
    if let Some(v) = cli.coordinator_ca {
        config.coordinator_ca = Some(v);
    }
    if let Some(v) = cli.client_cert {
        config.client_cert = Some(v);
    }
    if let Some(v) = cli.client_key {
        config.client_key = Some(v);
    }
    if let Some(v) = cli.listen_tls_cert {
        config.listen_tls_cert = Some(v);
    }
    if let Some(v) = cli.listen_tls_key {
        config.listen_tls_key = Some(v);
    }
    if let Some(v) = cli.upstream_ca {
        config.upstream_ca = Some(v);
    }
    if let Some(v) = cli.listen {
        config.listen = v;
    }
    if let Some(v) = cli.metrics_listen {
        config.metrics_listen = match v.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| format!("metrics_listen: {e}"))?),
        };
    }
    if let Some(v) = cli.coordinators {
        config.coordinators = v;
    }
    if let Some(v) = cli.agent_id {
        config.agent_id = v;
    }
    if let Some(v) = cli.neuron_id {
        config.neuron_id = v;
    }
    if let Some(v) = cli.neuron_url {
        config.neuron_url = v;
    }
    if let Some(v) = cli.spool_dir {
        config.spool_dir = v;
    }
    if let Some(v) = cli.spool_max_records {
        config.spool_max_records = v;
    }
    if let Some(v) = cli.max_body_bytes {
        config.max_body_bytes = v;
    }
    if let Some(v) = cli.allowance_wait_ms {
        config.allowance_wait_ms = v;
    }
    if let Some(v) = cli.first_byte_timeout_ms {
        config.first_byte_timeout_ms = v;
    }
    if let Some(v) = cli.request_timeout_ms {
        config.request_timeout_ms = v;
    }
    if let Some(v) = cli.stream_idle_timeout_ms {
        config.stream_idle_timeout_ms = v;
    }
    if let Some(v) = cli.max_concurrent_requests {
        config.max_concurrent_requests = v;
    }
    if let Some(v) = cli.max_concurrent_per_key {
        config.max_concurrent_per_key = v;
    }
    if let Some(v) = cli.refusal_records_per_key_per_minute {
        config.refusal_records_per_key_per_minute = v;
    }
    if let Some(v) = cli.endpoint_discovery {
        config.endpoint_discovery = v;
    }
    if let Some(v) = cli.neuron_adapter {
        config.neuron_adapter = v;
    }
    if !cli.gpu_vram_bytes.is_empty() {
        config.gpu_vram_bytes = cli.gpu_vram_bytes;
    }
    if cli.unknown_paths.is_some() {
        return Err(UNKNOWN_PATHS_REMOVED.into());
    }
    if let Some(v) = cli.pass_through {
        config.pass_through = v;
    }
    if let Some(v) = cli.header_read_timeout_ms {
        config.header_read_timeout_ms = v;
    }
    if let Some(v) = cli.body_read_timeout_ms {
        config.body_read_timeout_ms = v;
    }
    if let Some(v) = cli.connection_idle_timeout_ms {
        config.connection_idle_timeout_ms = v;
    }
    if let Some(v) = cli.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = cli.http2_keep_alive_interval_ms {
        config.http2_keep_alive_interval_ms = v;
    }
    if let Some(v) = cli.http2_max_concurrent_streams {
        config.http2_max_concurrent_streams = v;
    }
    if let Some(v) = cli.unknown_key_cache_max {
        config.unknown_key_cache_max = v;
    }
    if let Some(v) = cli.shutdown_grace_ms {
        config.shutdown_grace_ms = v;
    }
    if let Some(v) = cli.log_format {
        config.log_format = v;
    }
    config.validate()?;
    Ok(config)
}

/// Every request allocates and frees buffers on both worker threads;
/// glibc's allocator spent about a tenth of the agent's CPU on it under
/// load (BENCHMARKS.md). `no_thp`: with transparent huge pages its arenas
/// kept the agent at 91 MiB with 1,000 open streams, 52 MiB without.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let checked = load(Cli::parse())
        .and_then(|config| allot_agent::tls::check_files(&config).map(|()| config));
    let config = match checked {
        Ok(config) => config,
        Err(message) => {
            eprintln!("allot-agent: {message}");
            std::process::exit(2);
        }
    };
    let telemetry = telemetry::init(config.log_format, "allot-agent");
    if let Some(addr) = config.metrics_listen {
        telemetry::install_metrics(addr).map_err(anyhow::Error::msg)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = allot_agent::run(config, listener, allot_runtime::signal::shutdown()).await;
    telemetry.shutdown();
    result
}
