//! The coordinator's configuration: a TOML file, every field overridable by
//! an `ALLOT_*` environment variable and a command-line flag. Validated
//! before any port is bound.

use allot_runtime::telemetry::LogFormat;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC address (Admin, AgentSession, Health, reflection).
    pub listen: SocketAddr,
    /// Plaintext everywhere: the gRPC port without TLS, `http://` etcd
    /// endpoints and PostgreSQL without `sslmode=require`. For a laptop or
    /// a test; with `false` (the default) every link speaks TLS and a
    /// plaintext URL is a start-up error.
    pub insecure: bool,
    /// PEM certificate chain of the gRPC port (`certs node`). Required
    /// unless `insecure`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Required unless `insecure`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates client certificates are verified against. Agents
    /// must present one naming them (URI SAN `spiffe://allot/agent/<id>`);
    /// operators may, with or instead of a token, when a credential maps
    /// its URI SAN (`client_certificate`). Required unless `insecure`.
    pub tls_client_ca: Option<PathBuf>,
    /// The TLS files are read again when they change, checked this often
    /// (and on SIGHUP); 0 reloads on SIGHUP only.
    pub tls_reload_ms: u64,
    /// Prometheus metrics address; unset disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Legacy: one shared token, the credential named `admin` with scope
    /// `admin`. Prefer `operators_file`. Either (or `operators`) is needed.
    pub admin_token: String,
    /// Operator credentials (`[[operators]]`: `name`, `token_sha256` or
    /// `client_certificate`, `scopes`); hashes only, never tokens.
    pub operators: Vec<crate::operators::OperatorCredential>,
    /// A credentials file of `[[operator]]` tables (TOML, or JSON when it
    /// ends in `.json`), re-read when it changes and at SIGHUP.
    pub operators_file: Option<PathBuf>,
    /// How often `operators_file` is checked for changes.
    pub operators_reload_ms: u64,
    /// Failed authentications from one address within
    /// `auth_failure_window_ms` after which its calls are refused until
    /// the window ends; 0 disables.
    pub auth_max_failures: u32,
    /// The window of `auth_max_failures`.
    pub auth_failure_window_ms: u64,
    /// Most entries the audit log keeps; the oldest go first.
    pub audit_max_entries: usize,
    /// Days an audit entry is kept (checked when an entry is added); 0:
    /// only `audit_max_entries` bounds the log.
    pub audit_retention_days: u32,
    /// `embedded` or `etcd`.
    pub store: StoreKind,
    /// File of the embedded store.
    pub data_path: PathBuf,
    /// etcd endpoints, for `store = "etcd"`.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key.
    pub etcd_prefix: String,
    /// PEM CA certificates etcd's server certificate is verified against;
    /// required for `https://` endpoints.
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (`--client-cert-auth`); needs
    /// `etcd_key`.
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of `etcd_cert`.
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication); needs `etcd_password`.
    pub etcd_user: Option<String>,
    /// Password of `etcd_user`. Never logged.
    pub etcd_password: Option<String>,
    /// This coordinator's name in the election (shown to operators).
    pub node_id: String,
    /// Lease of the election key: how long a dead leader blocks fail-over.
    pub election_ttl_ms: u64,
    /// Lease length of a grant; agents stop admitting on it at expiry.
    pub lease_ttl_ms: u64,
    /// A disconnected agent's slices are released after this long.
    pub dead_after_ms: u64,
    /// How long the engine collects jobs before one store commit.
    pub settle_window_ms: u64,
    /// Most jobs (usage batches, asks, admin calls) in one store commit.
    pub max_batch_jobs: usize,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// At SIGTERM, agent sessions end and the leadership is given up at
    /// once; other calls get this long to finish before the process exits.
    pub shutdown_grace_ms: u64,
    /// Model catalog for placement (TOML `[[model]]` tables with `name`,
    /// `vram_bytes`, `load_ms`, `pinned`); models agents report that it
    /// does not list are added with their reported VRAM.
    pub placement_catalog: Option<PathBuf>,
    /// `[placement]`: strategy, churn guard and the other knobs of `Route`.
    pub placement: crate::placement::PlacementConfig,
    /// File of the embedded usage analytics store (embedded budget store
    /// only); default: `usage.redb` beside `data_path`.
    pub usage_data_path: Option<PathBuf>,
    /// PostgreSQL URL of the usage analytics store
    /// (`postgres://user@host:port/db?sslmode=verify-full&sslrootcert=ca.pem`);
    /// when set it is used whatever the budget store, and it is the only
    /// analytics store with `etcd`. Unless `insecure`, `sslmode` must be
    /// `require`, `verify-ca` or `verify-full` (rustls).
    pub usage_postgres_url: Option<String>,
    /// Directory where the usage writer keeps batches it could not write
    /// after its retries, until the store takes them (also after a
    /// restart); default: `usage-spill` beside `data_path`.
    pub usage_spill_dir: Option<PathBuf>,
    /// Days a usage row is kept after it was settled; older rows are
    /// deleted in the background (hourly) from either usage store. 0 keeps
    /// rows forever.
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
    pub fn from_file(path: &std::path::Path) -> Result<CoordinatorConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))
    }

    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.admin_token.is_empty() && self.operators.is_empty() && self.operators_file.is_none()
        {
            return Err("admin_token: no operator credential: set operators_file (ALLOT_OPERATORS_FILE), operators (ALLOT_OPERATORS) or the legacy admin_token (ALLOT_ADMIN_TOKEN)".into());
        }
        if !self.admin_token.is_empty() && self.admin_token.len() < 8 {
            return Err("admin_token: must be at least 8 characters".into());
        }
        self.operator_sources().load()?;
        if self.operators_reload_ms < 100 {
            return Err("operators_reload_ms: must be at least 100".into());
        }
        if self.auth_max_failures > 0 && self.auth_failure_window_ms == 0 {
            return Err(
                "auth_failure_window_ms: must be at least 1 when auth_max_failures is set".into(),
            );
        }
        if self.audit_max_entries == 0 || self.audit_max_entries > MAX_AUDIT_ENTRIES {
            return Err(format!(
                "audit_max_entries: must be from 1 to {MAX_AUDIT_ENTRIES}"
            ));
        }
        if self.audit_retention_days > MAX_USAGE_RETENTION_DAYS {
            return Err(format!(
                "audit_retention_days: must be at most {MAX_USAGE_RETENTION_DAYS} (0: bounded by audit_max_entries only)"
            ));
        }
        if self.placement.node_expiry_ms < 1_000 {
            return Err("placement.node_expiry_ms: must be at least 1000".into());
        }
        if self.lease_ttl_ms < 1_000 {
            return Err("lease_ttl_ms: must be at least 1000".into());
        }
        if self.dead_after_ms < self.lease_ttl_ms {
            return Err("dead_after_ms: must be at least lease_ttl_ms".into());
        }
        if self.max_batch_jobs == 0 {
            return Err("max_batch_jobs: must be at least 1".into());
        }
        if self.settle_window_ms > 1_000 {
            return Err("settle_window_ms: must be at most 1000".into());
        }
        if self.store == StoreKind::Etcd && self.etcd_endpoints.is_empty() {
            return Err("etcd_endpoints: at least one endpoint is needed with store = etcd".into());
        }
        if self.election_ttl_ms < 1_000 {
            return Err("election_ttl_ms: must be at least 1000 (etcd's minimum lease)".into());
        }
        if let Some(url) = &self.usage_postgres_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err("usage_postgres_url: must start with postgres://".into());
            }
        }
        if self.usage_retention_days > MAX_USAGE_RETENTION_DAYS {
            return Err(format!(
                "usage_retention_days: must be at most {MAX_USAGE_RETENTION_DAYS} (0 keeps rows forever)"
            ));
        }
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            return Err("etcd_prefix: must start and end with '/'".into());
        }
        self.validate_tls()
    }

    /// Every link either speaks TLS with what it needs, or `insecure`
    /// allows plaintext: a scheme that cannot be honoured is an error
    /// naming the field, never a silent downgrade.
    fn validate_tls(&self) -> Result<(), String> {
        let server_files = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ];
        if self.insecure {
            if let Some((field, _)) = server_files.iter().find(|(_, path)| path.is_some()) {
                return Err(format!(
                    "{field}: set, but insecure = true serves plaintext: remove one of them"
                ));
            }
        } else if let Some((field, _)) = server_files.iter().find(|(_, path)| path.is_none()) {
            return Err(format!(
                "{field}: must be set: the gRPC port speaks TLS unless insecure = true \
                 (--insecure); allot-coordinator certs makes the files"
            ));
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err("etcd_cert: etcd_cert and etcd_key go together".into());
        }
        if self.etcd_user.is_some() != self.etcd_password.is_some() {
            return Err("etcd_user: etcd_user and etcd_password go together".into());
        }
        if self.store == StoreKind::Etcd {
            for (i, endpoint) in self.etcd_endpoints.iter().enumerate() {
                let field = format!("etcd_endpoints[{i}]");
                if endpoint.starts_with("https://") {
                    if self.etcd_ca.is_none() {
                        return Err(format!("{field}: {endpoint} needs etcd_ca to verify etcd"));
                    }
                } else if endpoint.starts_with("http://") {
                    if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
                        return Err(format!(
                            "{field}: {endpoint} is plaintext but etcd TLS files are set: use https://"
                        ));
                    }
                    if !self.insecure {
                        return Err(format!(
                            "{field}: {endpoint} is plaintext: use https:// with etcd_ca, or insecure = true"
                        ));
                    }
                } else {
                    return Err(format!("{field}: must start with http:// or https://"));
                }
            }
        }
        if let Some(url) = &self.usage_postgres_url {
            let mode = postgres_sslmode(url);
            let encrypted = matches!(mode, Some("require" | "verify-ca" | "verify-full"));
            if !encrypted && !self.insecure {
                return Err(format!(
                    "usage_postgres_url: sslmode={} does not guarantee TLS: add \
                     sslmode=verify-full (or require), or set insecure = true",
                    mode.unwrap_or("prefer (the default)")
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
