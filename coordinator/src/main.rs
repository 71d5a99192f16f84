//! `allot-coordinator`: parses configuration, validates it before binding
//! anything, then runs the library's server until SIGINT or SIGTERM.

use allot_runtime::telemetry::{self, LogFormat};
use allot_coordinator::config::{CoordinatorConfig, StoreKind};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// allot coordinator: authoritative budgets, allowances, settlement, admin.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file; flags and ALLOT_* variables override it.
    #[arg(long, env = "ALLOT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "ALLOT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Plaintext on every link (no TLS); for a laptop or a test.
    #[arg(long, env = "ALLOT_INSECURE", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    insecure: Option<bool>,
    /// PEM certificate (chain) of the gRPC port.
    #[arg(long, env = "ALLOT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ALLOT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA that agents' (and operators') client certificates chain to.
    #[arg(long, env = "ALLOT_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes; 0: SIGHUP only.
    #[arg(long, env = "ALLOT_TLS_RELOAD_MS")]
    tls_reload_ms: Option<u64>,
    /// PEM CA of etcd's server certificate (https:// endpoints).
    #[arg(long, env = "ALLOT_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd.
    #[arg(long, env = "ALLOT_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "ALLOT_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "ALLOT_ETCD_USER")]
    etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "ALLOT_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Prometheus address; "off" disables it.
    #[arg(long, env = "ALLOT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Legacy shared admin token; prefer ALLOT_ADMIN_TOKEN (a flag shows
    /// in the process list) or, better, --operators-file.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Operator credentials file (TOML `[[operator]]` tables, or JSON).
    #[arg(long, env = "ALLOT_OPERATORS_FILE")]
    operators_file: Option<PathBuf>,
    /// Operator credentials as a JSON array of {name, token_sha256 or
    /// client_certificate, scopes}.
    #[arg(long, env = "ALLOT_OPERATORS")]
    operators: Option<String>,
    /// How often the operators file is checked for changes (also at SIGHUP).
    #[arg(long, env = "ALLOT_OPERATORS_RELOAD_MS")]
    operators_reload_ms: Option<u64>,
    /// Failed authentications from one address before it is slowed down; 0: never.
    #[arg(long, env = "ALLOT_AUTH_MAX_FAILURES")]
    auth_max_failures: Option<u32>,
    #[arg(long, env = "ALLOT_AUTH_FAILURE_WINDOW_MS")]
    auth_failure_window_ms: Option<u64>,
    /// Most entries the audit log keeps.
    #[arg(long, env = "ALLOT_AUDIT_MAX_ENTRIES")]
    audit_max_entries: Option<usize>,
    /// Days an audit entry is kept; 0: only the entry bound applies.
    #[arg(long, env = "ALLOT_AUDIT_RETENTION_DAYS")]
    audit_retention_days: Option<u32>,
    #[arg(long, env = "ALLOT_STORE")]
    store: Option<StoreKind>,
    #[arg(long, env = "ALLOT_DATA_PATH")]
    data_path: Option<PathBuf>,
    /// Comma-separated etcd endpoints.
    #[arg(long, env = "ALLOT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    #[arg(long, env = "ALLOT_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    #[arg(long, env = "ALLOT_NODE_ID")]
    node_id: Option<String>,
    #[arg(long, env = "ALLOT_ELECTION_TTL_MS")]
    election_ttl_ms: Option<u64>,
    #[arg(long, env = "ALLOT_LEASE_TTL_MS")]
    lease_ttl_ms: Option<u64>,
    #[arg(long, env = "ALLOT_DEAD_AFTER_MS")]
    dead_after_ms: Option<u64>,
    #[arg(long, env = "ALLOT_SETTLE_WINDOW_MS")]
    settle_window_ms: Option<u64>,
    #[arg(long, env = "ALLOT_MAX_BATCH_JOBS")]
    max_batch_jobs: Option<usize>,
    #[arg(long, env = "ALLOT_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// text or json.
    #[arg(long, env = "ALLOT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Model catalog (TOML) for placement.
    #[arg(long, env = "ALLOT_PLACEMENT_CATALOG")]
    placement_catalog: Option<std::path::PathBuf>,
    /// PostgreSQL URL of the usage analytics store.
    #[arg(long, env = "ALLOT_USAGE_POSTGRES_URL", hide_env_values = true)]
    usage_postgres_url: Option<String>,
    /// Directory of usage batches kept until the analytics store takes them.
    #[arg(long, env = "ALLOT_USAGE_SPILL_DIR")]
    usage_spill_dir: Option<PathBuf>,
    /// Days usage rows are kept; 0 keeps them forever.
    #[arg(long, env = "ALLOT_USAGE_RETENTION_DAYS")]
    usage_retention_days: Option<u32>,
    /// Eviction strategy of placement: lru or demand.
    #[arg(long, env = "ALLOT_PLACEMENT_STRATEGY")]
    placement_strategy: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Makes a CA and certificates for coordinators, agents and operators.
    Certs {
        /// Directory of the files (ca.pem, ca.key, node.pem, ...).
        #[arg(long, default_value = "certs", global = true)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365, global = true)]
        days: u64,
        /// Replace files that exist.
        #[arg(long, global = true)]
        overwrite: bool,
        #[command(subcommand)]
        what: CertsCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum CertsCommand {
    /// A new CA: ca.pem and ca.key.
    Ca,
    /// A coordinator's server certificate for these host names and IPs.
    Node {
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// An agent's client certificate (URI SAN spiffe://allot/agent/<id>).
    Agent { agent_id: String },
    /// An operator's client certificate (grpcurl -cert/-key; URI SAN
    /// spiffe://allot/operator/<name>, for client_certificate in the
    /// operators file).
    Client { name: String },
}

fn certs(
    dir: &std::path::Path,
    days: u64,
    overwrite: bool,
    what: CertsCommand,
) -> Result<(), String> {
    use allot_coordinator::certs::{self, Leaf, Validity};
    let validity = Validity::for_next(std::time::Duration::from_secs(days * 86_400));
    let (stem, pem) = match what {
        CertsCommand::Ca => ("ca".to_string(), certs::new_ca("allot CA", validity)?),
        CertsCommand::Node { hosts } => issue(dir, Leaf::Node { hosts }, validity)?,
        CertsCommand::Agent { agent_id } => issue(dir, Leaf::Agent { agent_id }, validity)?,
        CertsCommand::Client { name } => issue(dir, Leaf::Client { name }, validity)?,
    };
    let path = certs::write(dir, &stem, &pem, overwrite)?;
    println!("{}", path.display());
    Ok(())
}

fn issue(
    dir: &std::path::Path,
    leaf: allot_coordinator::certs::Leaf,
    validity: allot_coordinator::certs::Validity,
) -> Result<(String, allot_coordinator::certs::Pem), String> {
    use allot_coordinator::certs;
    let ca = certs::read_ca(dir)?;
    Ok((certs::file_stem(&leaf), certs::issue(&ca, &leaf, validity)?))
}

/// The TLS files are read once before any port is bound: a missing or bad
/// file is a start-up error naming its field.
fn check_tls_files(config: CoordinatorConfig) -> Result<CoordinatorConfig, String> {
    if let Some(files) = config.server_tls_files() {
        allot_coordinator::tls::server_config(&files)?;
    }
    Ok(config)
}

fn load(cli: Cli) -> Result<CoordinatorConfig, String> {
    let mut config = match &cli.config {
        Some(path) => CoordinatorConfig::from_file(path)?,
        None => CoordinatorConfig::default(),
    };
    if let Some(v) = cli.listen {
        config.listen = v;
    }
    if let Some(v) = cli.insecure {
        config.insecure = v;
    }
    if let Some(v) = cli.tls_cert {
        config.tls_cert = Some(v);
    }
    if let Some(v) = cli.tls_key {
        config.tls_key = Some(v);
    }
    if let Some(v) = cli.tls_client_ca {
        config.tls_client_ca = Some(v);
    }
    if let Some(v) = cli.tls_reload_ms {
        config.tls_reload_ms = v;
    }
    if let Some(v) = cli.etcd_ca {
        config.etcd_ca = Some(v);
    }
    if let Some(v) = cli.etcd_cert {
        config.etcd_cert = Some(v);
    }
    if let Some(v) = cli.etcd_key {
        config.etcd_key = Some(v);
    }
    if let Some(v) = cli.etcd_user {
        config.etcd_user = Some(v);
    }
    if let Some(v) = cli.etcd_password {
        config.etcd_password = Some(v);
    }
    if let Some(v) = cli.metrics_listen {
        config.metrics_listen = match v.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| format!("metrics_listen: {e}"))?),
        };
    }
    if let Some(v) = cli.admin_token {
        config.admin_token = v;
    }
    if let Some(v) = cli.operators_file {
        config.operators_file = Some(v);
    }
    if let Some(v) = cli.operators {
        config.operators = serde_json::from_str(&v).map_err(|e| {
            format!("operators: not a JSON array of {{name, token_sha256 or client_certificate, scopes}}: {e}")
        })?;
    }
    if let Some(v) = cli.operators_reload_ms {
        config.operators_reload_ms = v;
    }
    if let Some(v) = cli.auth_max_failures {
        config.auth_max_failures = v;
    }
    if let Some(v) = cli.auth_failure_window_ms {
        config.auth_failure_window_ms = v;
    }
    if let Some(v) = cli.audit_max_entries {
        config.audit_max_entries = v;
    }
    if let Some(v) = cli.audit_retention_days {
        config.audit_retention_days = v;
    }
    if let Some(v) = cli.store {
        config.store = v;
    }
    if let Some(v) = cli.data_path {
        config.data_path = v;
    }
    if let Some(v) = cli.etcd_endpoints {
        config.etcd_endpoints = v;
    }
    if let Some(v) = cli.etcd_prefix {
        config.etcd_prefix = v;
    }
    if let Some(v) = cli.node_id {
        config.node_id = v;
    }
    if let Some(v) = cli.election_ttl_ms {
        config.election_ttl_ms = v;
    }
    if let Some(v) = cli.lease_ttl_ms {
        config.lease_ttl_ms = v;
    }
    if let Some(v) = cli.dead_after_ms {
        config.dead_after_ms = v;
    }
    if let Some(v) = cli.settle_window_ms {
        config.settle_window_ms = v;
    }
    if let Some(v) = cli.max_batch_jobs {
        config.max_batch_jobs = v;
    }
    if let Some(v) = cli.shutdown_grace_ms {
        config.shutdown_grace_ms = v;
    }
    if let Some(v) = cli.log_format {
        config.log_format = v;
    }
    if let Some(v) = cli.usage_postgres_url {
        config.usage_postgres_url = Some(v);
    }
    if let Some(v) = cli.usage_spill_dir {
        config.usage_spill_dir = Some(v);
    }
    if let Some(v) = cli.usage_retention_days {
        config.usage_retention_days = v;
    }
    if let Some(v) = cli.placement_catalog {
        config.placement_catalog = Some(v);
    }
    if let Some(v) = cli.placement_strategy {
        config.placement.strategy = match v.as_str() {
            "lru" => allot_coordinator::placement::Strategy::Lru,
            "demand" => allot_coordinator::placement::Strategy::Demand,
            other => {
                return Err(format!(
                    "placement_strategy: must be lru or demand, not {other:?}"
                ))
            }
        };
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(Command::Certs {
        dir,
        days,
        overwrite,
        what,
    }) = cli.command.take()
    {
        if let Err(message) = certs(&dir, days, overwrite, what) {
            eprintln!("allot-coordinator certs: {message}");
            std::process::exit(2);
        }
        return Ok(());
    }
    let config = match load(cli).and_then(check_tls_files) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("allot-coordinator: {message}");
            std::process::exit(2);
        }
    };
    let telemetry = telemetry::init(config.log_format, "allot-coordinator");
    if let Some(addr) = config.metrics_listen {
        telemetry::install_metrics(addr).map_err(anyhow::Error::msg)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = allot_coordinator::run(config, listener, allot_runtime::signal::shutdown()).await;
    telemetry.shutdown();
    result
}
