//! The coordinator's configuration: a TOML file, every field overridable by
//! an `ALLOT_*` environment variable and a command-line flag. Validated
//! before any port is bound.

use allot::InvalidArgument;
use allot_runtime::layered::{self, ArgsError, Environment, FileError, Layers};
use allot_runtime::telemetry::LogFormat;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration the coordinator cannot start with.
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
    #[error(transparent)]
    Operators(#[from] crate::operators::CredentialsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(InvalidArgument::new(field, message))
}

/// What the command line says besides the fields of
/// [`CoordinatorConfig`].
#[derive(Debug, Default, clap::Args)]
pub struct Sources {
    /// TOML configuration file; flags and ALLOT_* variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Eviction strategy of placement (`placement.strategy`): lru or demand.
    #[arg(long, value_parser = layered::variant::<crate::placement::Strategy>)]
    pub placement_strategy: Option<crate::placement::Strategy>,
}

/// The environment variable of `--flag`: `ALLOT_FLAG` (upper snake case).
pub fn env_name(flag: &str) -> String {
    format!("ALLOT_{}", flag.replace('-', "_").to_uppercase())
}

/// The command line of `allot-coordinator`: `--config`, and every field of
/// [`CoordinatorConfig`] as a flag. The binary adds its subcommands.
pub fn command() -> clap::Command {
    // Set after the derives, whose doc comments would set `about`.
    let fields = CoordinatorConfig::augment_args(Sources::augment_args(clap::Command::new(
        "allot-coordinator",
    )));
    layered::prepare(fields)
        .version(env!("CARGO_PKG_VERSION"))
        .about("allot coordinator: authoritative budgets, allowances, settlement, admin")
        .after_help(
            "Every flag --some-name is also read from the environment variable \
             ALLOT_SOME_NAME, and every TOML key some_name from both: a flag beats the \
             variable, which beats the file, which beats the default. Tables and arrays \
             of tables (operators, placement) take JSON.",
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
/// flags; validated (files are not read yet: see [`check_tls_files`]).
pub fn load(layers: &Layers) -> Result<CoordinatorConfig, ConfigError> {
    let mut sources = Sources::default();
    layers.apply(&mut sources)?;
    let mut config = match &sources.config {
        Some(path) => CoordinatorConfig::from_file(path)?,
        None => CoordinatorConfig::default(),
    };
    layers.apply(&mut config)?;
    if let Some(strategy) = sources.placement_strategy {
        config.placement.strategy = strategy;
    }
    config.validate()?;
    Ok(config)
}

/// The TLS files are read once before any port is bound: a missing or bad
/// file is a start-up error naming its field.
pub fn check_tls_files(config: &CoordinatorConfig) -> Result<(), ConfigError> {
    if let Some(files) = config.server_tls_files() {
        crate::tls::server_config(&files)?;
    }
    Ok(())
}

/// Where budgets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// One redb file; one coordinator. The quick start's default.
    #[default]
    Embedded,
    /// An etcd cluster; several coordinators with leader election.
    Etcd,
}

/// The `sslmode` query parameter of a PostgreSQL URL, if any.
fn postgres_sslmode(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sslmode="))
}

/// The longest `usage_retention_days` short of forever: 100 years.
pub const MAX_USAGE_RETENTION_DAYS: u32 = 36_500;

/// The most audit entries the leader holds (in memory and in the store).
pub const MAX_AUDIT_ENTRIES: usize = 1_000_000;

/// Every field is a TOML key, a flag (`--` and the key in kebab case) and
/// an environment variable (`ALLOT_` and the key in upper case): see
/// [`command`] and [`load`].
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC address (Admin, AgentSession, Health, reflection).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Plaintext everywhere: the gRPC port without TLS, `http://` etcd
    /// endpoints and PostgreSQL without `sslmode=require`. For a laptop or
    /// a test; with `false` (the default) every link speaks TLS and a
    /// plaintext URL is a start-up error.
    #[arg(long)]
    pub insecure: bool,
    /// PEM certificate chain of the gRPC port (`certs node`). Required
    /// unless `insecure`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Required unless `insecure`.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates client certificates are verified against. Agents
    /// must present one naming them (URI SAN `spiffe://allot/agent/<id>`);
    /// operators may, with or instead of a token, when a credential maps
    /// its URI SAN (`client_certificate`). Required unless `insecure`.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// The TLS files are read again when they change, checked this often
    /// (and on SIGHUP); 0 reloads on SIGHUP only.
    #[arg(long)]
    pub tls_reload_ms: u64,
    /// Prometheus metrics address; unset disables the exporter.
    #[arg(long, value_parser = allot_runtime::layered::listen_or_off)]
    #[serde(deserialize_with = "allot_runtime::layered::deserialize_listen_or_off")]
    pub metrics_listen: std::option::Option<SocketAddr>,
    /// Legacy: one shared token, the credential named `admin` with scope
    /// `admin`. Prefer `operators_file`. Either (or `operators`) is needed.
    #[arg(long)]
    pub admin_token: String,
    /// Operator credentials (`[[operators]]`: `name`, `token_sha256` or
    /// `client_certificate`, `scopes`); hashes only, never tokens.
    #[arg(long, value_parser = layered::json::<Vec<crate::operators::OperatorCredential>>)]
    pub operators: std::vec::Vec<crate::operators::OperatorCredential>,
    /// A credentials file of `[[operator]]` tables (TOML, or JSON when it
    /// ends in `.json`), re-read when it changes and at SIGHUP.
    #[arg(long)]
    pub operators_file: Option<PathBuf>,
    /// How often `operators_file` is checked for changes.
    #[arg(long)]
    pub operators_reload_ms: u64,
    /// Failed authentications from one address within
    /// `auth_failure_window_ms` after which its calls are refused until
    /// the window ends; 0 disables.
    #[arg(long)]
    pub auth_max_failures: u32,
    /// The window of `auth_max_failures`.
    #[arg(long)]
    pub auth_failure_window_ms: u64,
    /// Most entries the audit log keeps; the oldest go first.
    #[arg(long)]
    pub audit_max_entries: usize,
    /// Days an audit entry is kept (checked when an entry is added); 0:
    /// only `audit_max_entries` bounds the log.
    #[arg(long)]
    pub audit_retention_days: u32,
    /// `embedded` or `etcd`.
    #[arg(long)]
    pub store: StoreKind,
    /// File of the embedded store.
    #[arg(long)]
    pub data_path: PathBuf,
    /// etcd endpoints, for `store = "etcd"`.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key.
    #[arg(long)]
    pub etcd_prefix: String,
    /// PEM CA certificates etcd's server certificate is verified against;
    /// required for `https://` endpoints.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (`--client-cert-auth`); needs
    /// `etcd_key`.
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of `etcd_cert`.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication); needs `etcd_password`.
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// Password of `etcd_user`. Never logged.
    #[arg(long)]
    pub etcd_password: Option<String>,
    /// This coordinator's name in the election (shown to operators).
    #[arg(long)]
    pub node_id: String,
    /// Lease of the election key: how long a dead leader blocks fail-over.
    #[arg(long)]
    pub election_ttl_ms: u64,
    /// etcd history the leader keeps, compacting the rest (0: never; leave
    /// it to etcd's `--auto-compaction-*`).
    #[arg(long)]
    pub etcd_history_ms: u64,
    /// Lease length of a grant; agents stop admitting on it at expiry.
    #[arg(long)]
    pub lease_ttl_ms: u64,
    /// A disconnected agent's slices are released after this long.
    #[arg(long)]
    pub dead_after_ms: u64,
    /// How long the engine collects jobs before one store commit.
    #[arg(long)]
    pub settle_window_ms: u64,
    /// Most jobs (usage batches, asks, admin calls) in one store commit.
    #[arg(long)]
    pub max_batch_jobs: usize,
    /// `text` or `json`.
    #[arg(long)]
    pub log_format: LogFormat,
    /// At SIGTERM, agent sessions end and the leadership is given up at
    /// once; other calls get this long to finish before the process exits.
    #[arg(long)]
    pub shutdown_grace_ms: u64,
    /// Model catalog for placement (TOML `[[model]]` tables with `name`,
    /// `vram_bytes`, `load_ms`, `pinned`); models agents report that it
    /// does not list are added with their reported VRAM.
    #[arg(long)]
    pub placement_catalog: Option<PathBuf>,
    /// `[placement]`: strategy, churn guard and the other knobs of `Route`.
    #[arg(long, value_parser = layered::json::<crate::placement::PlacementConfig>)]
    pub placement: crate::placement::PlacementConfig,
    /// File of the embedded usage analytics store (embedded budget store
    /// only); default: `usage.redb` beside `data_path`.
    #[arg(long)]
    pub usage_data_path: Option<PathBuf>,
    /// PostgreSQL URL of the usage analytics store
    /// (`postgres://user@host:port/db?sslmode=verify-full&sslrootcert=ca.pem`);
    /// when set it is used whatever the budget store, and it is the only
    /// analytics store with `etcd`. Unless `insecure`, `sslmode` must be
    /// `require`, `verify-ca` or `verify-full` (rustls).
    #[arg(long)]
    pub usage_postgres_url: Option<String>,
    /// Directory where the usage writer keeps batches it could not write
    /// after its retries, until the store takes them (also after a
    /// restart); default: `usage-spill` beside `data_path`.
    #[arg(long)]
    pub usage_spill_dir: Option<PathBuf>,
    /// Days a usage row is kept after it was settled; older rows are
    /// deleted in the background (hourly) from either usage store. 0 keeps
    /// rows forever.
    #[arg(long)]
    pub usage_retention_days: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:50051".parse().expect("valid default"),
            insecure: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_reload_ms: 10_000,
            metrics_listen: Some("127.0.0.1:9464".parse().expect("valid default")),
            admin_token: String::new(),
            operators: Vec::new(),
            operators_file: None,
            operators_reload_ms: 1_000,
            auth_max_failures: 10,
            auth_failure_window_ms: 60_000,
            audit_max_entries: 10_000,
            audit_retention_days: 365,
            store: StoreKind::Embedded,
            data_path: PathBuf::from("allot-data/coordinator.redb"),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: "/allot/".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password: None,
            node_id: "coordinator-1".into(),
            election_ttl_ms: 2_000,
            etcd_history_ms: 60_000,
            lease_ttl_ms: 30_000,
            dead_after_ms: 120_000,
            settle_window_ms: 2,
            max_batch_jobs: 4096,
            log_format: LogFormat::Text,
            shutdown_grace_ms: 10_000,
            placement_catalog: None,
            placement: crate::placement::PlacementConfig::default(),
            usage_data_path: None,
            usage_postgres_url: None,
            usage_spill_dir: None,
            usage_retention_days: 90,
        }
    }
}

impl CoordinatorConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<CoordinatorConfig, FileError> {
        layered::read_toml(path)
    }

    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_token.is_empty() && self.operators.is_empty() && self.operators_file.is_none()
        {
            return Err(invalid("admin_token", "no operator credential: set operators_file (ALLOT_OPERATORS_FILE), operators (ALLOT_OPERATORS) or the legacy admin_token (ALLOT_ADMIN_TOKEN)"));
        }
        if !self.admin_token.is_empty() && self.admin_token.len() < 8 {
            return Err(invalid("admin_token", "must be at least 8 characters"));
        }
        self.operator_sources().load()?;
        if self.operators_reload_ms < 100 {
            return Err(invalid("operators_reload_ms", "must be at least 100"));
        }
        if self.auth_max_failures > 0 && self.auth_failure_window_ms == 0 {
            return Err(invalid(
                "auth_failure_window_ms",
                "must be at least 1 when auth_max_failures is set",
            ));
        }
        if self.audit_max_entries == 0 || self.audit_max_entries > MAX_AUDIT_ENTRIES {
            return Err(invalid(
                "audit_max_entries",
                format!("must be from 1 to {MAX_AUDIT_ENTRIES}"),
            ));
        }
        if self.audit_retention_days > MAX_USAGE_RETENTION_DAYS {
            return Err(invalid(
                "audit_retention_days",
                format!("must be at most {MAX_USAGE_RETENTION_DAYS} (0: bounded by audit_max_entries only)"),
            ));
        }
        if self.placement.node_expiry_ms < 1_000 {
            return Err(invalid("placement.node_expiry_ms", "must be at least 1000"));
        }
        if self.lease_ttl_ms < 1_000 {
            return Err(invalid("lease_ttl_ms", "must be at least 1000"));
        }
        if self.dead_after_ms < self.lease_ttl_ms {
            return Err(invalid("dead_after_ms", "must be at least lease_ttl_ms"));
        }
        if self.max_batch_jobs == 0 {
            return Err(invalid("max_batch_jobs", "must be at least 1"));
        }
        if self.settle_window_ms > 1_000 {
            return Err(invalid("settle_window_ms", "must be at most 1000"));
        }
        if self.store == StoreKind::Etcd && self.etcd_endpoints.is_empty() {
            return Err(invalid(
                "etcd_endpoints",
                "at least one endpoint is needed with store = etcd",
            ));
        }
        if self.etcd_history_ms != 0 && self.etcd_history_ms < 1_000 {
            return Err(invalid(
                "etcd_history_ms",
                "must be 0 (off) or at least 1000",
            ));
        }
        if self.election_ttl_ms < 1_000 {
            return Err(invalid(
                "election_ttl_ms",
                "must be at least 1000 (etcd's minimum lease)",
            ));
        }
        if let Some(url) = &self.usage_postgres_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid("usage_postgres_url", "must start with postgres://"));
            }
        }
        if self.usage_retention_days > MAX_USAGE_RETENTION_DAYS {
            return Err(invalid(
                "usage_retention_days",
                format!("must be at most {MAX_USAGE_RETENTION_DAYS} (0 keeps rows forever)"),
            ));
        }
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            return Err(invalid("etcd_prefix", "must start and end with '/'"));
        }
        self.validate_tls()
    }

    /// Every link either speaks TLS with what it needs, or `insecure`
    /// allows plaintext: a scheme that cannot be honoured is an error
    /// naming the field, never a silent downgrade.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let server_files = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ];
        if self.insecure {
            if let Some((field, _)) = server_files.iter().find(|(_, path)| path.is_some()) {
                return Err(invalid(
                    *field,
                    "set, but insecure = true serves plaintext: remove one of them",
                ));
            }
        } else if let Some((field, _)) = server_files.iter().find(|(_, path)| path.is_none()) {
            return Err(invalid(
                *field,
                "must be set: the gRPC port speaks TLS unless insecure = true \
                 (--insecure); allot-coordinator certs makes the files",
            ));
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err(invalid("etcd_cert", "etcd_cert and etcd_key go together"));
        }
        if self.etcd_user.is_some() != self.etcd_password.is_some() {
            return Err(invalid(
                "etcd_user",
                "etcd_user and etcd_password go together",
            ));
        }
        if self.store == StoreKind::Etcd {
            for (i, endpoint) in self.etcd_endpoints.iter().enumerate() {
                let field = format!("etcd_endpoints[{i}]");
                if endpoint.starts_with("https://") {
                    if self.etcd_ca.is_none() {
                        return Err(invalid(
                            field,
                            format!("{endpoint} needs etcd_ca to verify etcd"),
                        ));
                    }
                } else if endpoint.starts_with("http://") {
                    if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
                        return Err(invalid(
                            field,
                            format!(
                                "{endpoint} is plaintext but etcd TLS files are set: use https://"
                            ),
                        ));
                    }
                    if !self.insecure {
                        return Err(invalid(
                            field,
                            format!("{endpoint} is plaintext: use https:// with etcd_ca, or insecure = true"),
                        ));
                    }
                } else {
                    return Err(invalid(field, "must start with http:// or https://"));
                }
            }
        }
        if let Some(url) = &self.usage_postgres_url {
            let mode = postgres_sslmode(url);
            let encrypted = matches!(mode, Some("require" | "verify-ca" | "verify-full"));
            if !encrypted && !self.insecure {
                return Err(invalid(
                    "usage_postgres_url",
                    format!(
                        "sslmode={} does not guarantee TLS: add \
                     sslmode=verify-full (or require), or set insecure = true",
                        mode.unwrap_or("prefer (the default)")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The files of the gRPC port's TLS; `None` with `insecure`.
    pub fn server_tls_files(&self) -> Option<crate::tls::ServerTlsFiles> {
        Some(crate::tls::ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone()?,
        })
    }

    /// How often the TLS files are checked for changes.
    pub fn tls_reload_poll(&self) -> Option<Duration> {
        (self.tls_reload_ms > 0).then(|| Duration::from_millis(self.tls_reload_ms))
    }

    /// Where the embedded usage store lives.
    pub fn usage_path(&self) -> PathBuf {
        self.usage_data_path
            .clone()
            .unwrap_or_else(|| self.data_path.with_file_name("usage.redb"))
    }

    pub fn usage_spill_path(&self) -> PathBuf {
        self.usage_spill_dir
            .clone()
            .unwrap_or_else(|| self.data_path.with_file_name("usage-spill"))
    }

    /// How long usage rows are kept; `None`: forever.
    pub fn usage_retention(&self) -> Option<Duration> {
        (self.usage_retention_days > 0)
            .then(|| Duration::from_secs(u64::from(self.usage_retention_days) * 86_400))
    }

    /// Where operator credentials come from.
    pub fn operator_sources(&self) -> crate::operators::CredentialSources {
        crate::operators::CredentialSources {
            admin_token: self.admin_token.clone(),
            inline: self.operators.clone(),
            file: self.operators_file.clone(),
        }
    }

    /// How much of the audit log is kept.
    pub fn audit_retention(&self) -> crate::audit::AuditRetention {
        crate::audit::AuditRetention {
            max_entries: self.audit_max_entries,
            max_age_ms: (self.audit_retention_days > 0)
                .then(|| i64::from(self.audit_retention_days) * 86_400_000),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
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
        std::iter::once("allot-coordinator")
            .chain(flags.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn every_toml_field_has_a_flag_and_an_environment_variable() {
        assert!(layered::field_names::<CoordinatorConfig>().len() > 30);
        let unsettable = layered::unsettable_fields::<CoordinatorConfig>(&command(), env_name);
        assert!(unsettable.is_empty(), "{unsettable:?}");
        assert_eq!(env_name("admin-token"), "ALLOT_ADMIN_TOKEN");
        assert_eq!(env_name("etcd-endpoints"), "ALLOT_ETCD_ENDPOINTS");
    }

    #[test]
    fn a_file_switches_the_metrics_exporter_off_or_moves_it_like_the_flag() {
        let read = |text: &str| {
            allot_runtime::layered::parse_toml::<CoordinatorConfig>(
                std::path::Path::new("f.toml"),
                text,
            )
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
            Some("127.0.0.1:9464".parse().unwrap()),
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
        let dir =
            std::env::temp_dir().join(format!("allot-coordinator-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("coordinator.toml");
        std::fs::write(&path, "insecure = true\nadmin_token = \"file-token\"\nlease_ttl_ms = 5000\nnode_id = \"from-file\"\n").unwrap();
        let file = path.display().to_string();
        let command = command();
        let load_with = |flags: &[&str], vars: &[(&str, &str)]| {
            load(&parse(&command, args(flags), &env(vars)).unwrap()).unwrap()
        };
        let from_file = load_with(&["--config", &file], &[]);
        assert_eq!(
            (from_file.lease_ttl_ms, from_file.node_id.as_str()),
            (5000, "from-file")
        );
        assert_eq!(
            from_file.dead_after_ms,
            CoordinatorConfig::default().dead_after_ms
        );
        let from_env = load_with(
            &[],
            &[("ALLOT_CONFIG", &file), ("ALLOT_LEASE_TTL_MS", "6000")],
        );
        assert_eq!(
            (from_env.lease_ttl_ms, from_env.node_id.as_str()),
            (6000, "from-file")
        );
        let from_flag = load_with(
            &[
                "--lease-ttl-ms",
                "7000",
                "--placement-strategy",
                "demand",
                "--metrics-listen",
                "off",
            ],
            &[("ALLOT_CONFIG", &file), ("ALLOT_LEASE_TTL_MS", "6000")],
        );
        assert_eq!(from_flag.lease_ttl_ms, 7000);
        assert_eq!(
            from_flag.placement.strategy,
            crate::placement::Strategy::Demand
        );
        assert_eq!(from_flag.metrics_listen, None);
        assert!(from_flag.insecure, "an absent --insecure keeps the file's");
        let secure = load_with(
            &[
                "--insecure=false",
                "--tls-cert=c",
                "--tls-key=k",
                "--tls-client-ca=a",
            ],
            &[("ALLOT_CONFIG", &file)],
        );
        assert!(!secure.insecure);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_value_names_its_field_or_variable() {
        let command = command();
        let error = load(
            &parse(
                &command,
                args(&[
                    "--insecure",
                    "--admin-token",
                    "long-enough",
                    "--lease-ttl-ms",
                    "10",
                ]),
                &env(&[]),
            )
            .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("lease_ttl_ms: "), "{error}");
        let Err(error) = parse(&command, args(&[]), &env(&[("ALLOT_OPERATORS", "[{")])) else {
            panic!("bad JSON accepted");
        };
        assert!(
            error.to_string().starts_with("ALLOT_OPERATORS: "),
            "{error}"
        );
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
        let defaults = serde_json::to_value(CoordinatorConfig::default()).unwrap();
        let rows = layered::reference::<CoordinatorConfig>(&command(), &defaults, env_name);
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
