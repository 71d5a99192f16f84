//! Operators: who may call the `Admin` and `Placement` services, and what
//! each of them may do.
//!
//! An operator holds a named credential and a set of scopes. The
//! credential is either a bearer token, of which only the SHA-256 is
//! configured, or a client certificate: the URI SAN (`client_certificate`,
//! such as `spiffe://allot/operator/alice`) of certificates that the TLS
//! handshake verified against `tls_client_ca`. [`METHOD_SCOPES`] maps every
//! method to the scopes that allow it; `admin` allows everything. The
//! [`OperatorGate`] in front of both services authenticates the call
//! (token hashes compared in constant time), checks the method's scope,
//! slows down a peer that keeps failing, and puts the [`Operator`] into the
//! request's extensions so that handlers know who calls (the audit log
//! records it, and whether by token or certificate).
//!
//! A token and a certificate on one call (see [`Gatekeeper::admit`]): a
//! token that does not authenticate is refused, whatever the certificate;
//! a certificate that maps to an operator and a token are refused together
//! (two credentials: which to trust is not guessed); a certificate that
//! maps to no operator adds nothing to a valid token. An agent's certificate
//! (`spiffe://allot/agent/...`) never maps to an operator: such a mapping
//! is refused when the credentials load.
//!
//! Credentials come from the legacy `admin_token` (one credential named
//! `admin` with scope `admin`), from `operators` in the configuration, and
//! from `operators_file`, which is re-read every `operators_reload_ms` and
//! at SIGHUP: a changed file applies without a restart, a broken one is
//! logged and the previous credentials stay. This module never sees a
//! token on a command line and never logs one.

use allot::InvalidArgument;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tonic::Status;

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Get*, List*, usage queries, the audit log, `Route` and `Fleet`.
    Read,
    /// Create and revoke API keys.
    Keys,
    /// Accounts, credits, limits and tariffs.
    Billing,
    /// Agents and placement (`ListAgents`, `Route`, `Fleet`).
    Agents,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Keys => "keys",
            Scope::Billing => "billing",
            Scope::Agents => "agents",
            Scope::Admin => "admin",
        }
    }
}

/// Every method of `Admin` and `Placement` and the scopes, any of which
/// allows it (`admin` allows every method). A method missing here is
/// allowed to `admin` only.
pub const METHOD_SCOPES: &[(&str, &[Scope])] = &[
    ("/allot.v1.Admin/CreateAccount", &[Scope::Billing]),
    ("/allot.v1.Admin/GetAccount", &[Scope::Read]),
    ("/allot.v1.Admin/ListAccounts", &[Scope::Read]),
    ("/allot.v1.Admin/Credit", &[Scope::Billing]),
    ("/allot.v1.Admin/CreateKey", &[Scope::Keys]),
    ("/allot.v1.Admin/ListKeys", &[Scope::Read]),
    ("/allot.v1.Admin/RevokeKey", &[Scope::Keys]),
    ("/allot.v1.Admin/SetLimits", &[Scope::Billing]),
    ("/allot.v1.Admin/GetSnapshot", &[Scope::Read]),
    ("/allot.v1.Admin/PutTariff", &[Scope::Billing]),
    ("/allot.v1.Admin/ListTariffs", &[Scope::Read]),
    ("/allot.v1.Admin/ListAgents", &[Scope::Read, Scope::Agents]),
    ("/allot.v1.Admin/ListUsage", &[Scope::Read]),
    ("/allot.v1.Admin/UsageSummary", &[Scope::Read]),
    ("/allot.v1.Admin/CheckUsage", &[Scope::Read]),
    ("/allot.v1.Admin/ListAudit", &[Scope::Read]),
    ("/allot.v1.Admin/ResetAgent", &[Scope::Agents]),
    ("/allot.v1.Placement/Route", &[Scope::Read, Scope::Agents]),
    ("/allot.v1.Placement/Fleet", &[Scope::Read, Scope::Agents]),
];

/// The scopes that allow the method at `path` (besides `admin`).
pub fn scopes_for(path: &str) -> &'static [Scope] {
    METHOD_SCOPES
        .iter()
        .find(|(method, _)| *method == path)
        .map_or(&[], |(_, scopes)| scopes)
}

/// Who is calling, as the gate authenticated them; in the extensions of
/// every `Admin` and `Placement` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// Which credential authenticated the call.
    pub via: Via,
}

/// How an operator authenticated: what the audit log records besides the
/// credential's name. Never the token or the certificate itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// A bearer token (also every entry written before certificates).
    #[default]
    Token,
    /// A verified client certificate with this URI SAN.
    Certificate { uri: String },
}

impl Via {
    /// `token` or `certificate`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Via::Token => "token",
            Via::Certificate { .. } => "certificate",
        }
    }
}

impl Operator {
    /// Whether any of `allowed` (or `admin`) is among this operator's scopes.
    pub fn may(&self, allowed: &[Scope]) -> bool {
        self.scopes.contains(&Scope::Admin) || allowed.iter().any(|s| self.scopes.contains(s))
    }

    /// PERMISSION_DENIED unless the operator may call the method at `path`.
    pub fn check(&self, path: &str) -> Result<(), Status> {
        let allowed = scopes_for(path);
        if self.may(allowed) {
            return Ok(());
        }
        let needed: Vec<&str> = allowed
            .iter()
            .chain(std::iter::once(&Scope::Admin))
            .map(|s| s.as_str())
            .collect();
        let held: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        Err(Status::permission_denied(format!(
            "{}: needs scope {}; operator {:?} has {}",
            path.trim_start_matches('/'),
            needed.join(" or "),
            self.name,
            if held.is_empty() {
                "none".to_string()
            } else {
                held.join(", ")
            }
        )))
    }
}

/// One configured credential: a name, exactly one of the SHA-256 of its
/// token (64 hex digits) and the URI SAN of its client certificates, and
/// its scopes. The token itself is never configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorCredential {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// A URI SAN, such as `spiffe://allot/operator/alice`: a client
    /// certificate verified against `tls_client_ca` that carries it is
    /// this operator. Compared byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    pub scopes: Vec<Scope>,
}

/// The longest `client_certificate` accepted.
pub const MAX_CERTIFICATE_URI_BYTES: usize = 2048;

/// Checks a `client_certificate` URI: `scheme:rest`, printable, bounded,
/// and never an agent's identity.
fn check_certificate_uri(field: &str, uri: &str) -> Result<(), InvalidArgument> {
    if uri.len() > MAX_CERTIFICATE_URI_BYTES {
        return Err(InvalidArgument::new(
            field,
            format!("must be at most {MAX_CERTIFICATE_URI_BYTES} bytes"),
        ));
    }
    let well_formed = uri.split_once(':').is_some_and(|(scheme, rest)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            && !rest.is_empty()
    }) && uri.chars().all(|c| c.is_ascii_graphic());
    if !well_formed {
        return Err(InvalidArgument::new(
            field,
            format!(
                "{uri:?} is not a URI (the URI SAN of the certificates, such as {}<name>)",
                crate::identity::OPERATOR_URI_PREFIX
            ),
        ));
    }
    if crate::identity::is_agent_uri(uri) {
        return Err(InvalidArgument::new(
            field,
            format!(
                "{uri:?} is an agent's identity ({}...): an agent certificate is never an operator",
                crate::identity::AGENT_URI_PREFIX
            ),
        ));
    }
    Ok(())
}

/// The credentials file: `[[operator]]` tables (TOML) or
/// `{"operator": [...]}` (JSON, for a file ending in `.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    operator: Vec<OperatorCredential>,
}

/// The name of the credential the legacy `admin_token` becomes.
pub const LEGACY_ADMIN: &str = "admin";

/// The SHA-256 of `token`, hex-encoded, as `token_sha256` expects it
/// (the same as `printf %s "$TOKEN" | sha256sum`).
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What proves a credential.
#[derive(Debug, Clone)]
enum Proof {
    /// The SHA-256 of the token.
    Token([u8; 32]),
    /// A URI SAN of a verified client certificate.
    Certificate(String),
}

#[derive(Debug, Clone)]
struct Credential {
    proof: Proof,
    operator: Operator,
}

/// Every credential in force.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    entries: Vec<Credential>,
}

impl Credentials {
    /// Builds and checks the credentials; the message names the field.
    pub fn new(
        admin_token: &str,
        configured: &[(String, Vec<OperatorCredential>)],
    ) -> Result<Credentials, CredentialsError> {
        let mut entries = Vec::new();
        if !admin_token.is_empty() {
            entries.push(Credential {
                proof: Proof::Token(Sha256::digest(admin_token.as_bytes()).into()),
                operator: Operator {
                    name: LEGACY_ADMIN.into(),
                    scopes: BTreeSet::from([Scope::Admin]),
                    via: Via::Token,
                },
            });
        }
        for (source, credentials) in configured {
            for (index, credential) in credentials.iter().enumerate() {
                let field = format!("{source}[{index}]");
                allot::key::validate_id(&format!("{field}.name"), &credential.name)?;
                if entries
                    .iter()
                    .any(|e: &Credential| e.operator.name == credential.name)
                {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!(
                            "{:?} is taken (\"admin\" is the legacy admin_token's)",
                            credential.name
                        ),
                    ));
                }
                let proof = match (&credential.token_sha256, &credential.client_certificate) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            format!("{field}.client_certificate"),
                            "set either token_sha256 or client_certificate, not both (one \
                             credential each)",
                        ))
                    }
                    (None, None) => {
                        return Err(invalid(
                            format!("{field}.token_sha256"),
                            "missing: set token_sha256 (the SHA-256 of a bearer token) or \
                             client_certificate (the URI SAN of client certificates)",
                        ))
                    }
                    (Some(hash), None) => hex::decode(hash)
                        .ok()
                        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                        .map(Proof::Token)
                        .ok_or_else(|| {
                            invalid(
                                format!("{field}.token_sha256"),
                                "must be 64 hex digits (the SHA-256 of the token)",
                            )
                        })?,
                    (None, Some(uri)) => {
                        check_certificate_uri(&format!("{field}.client_certificate"), uri)?;
                        Proof::Certificate(uri.clone())
                    }
                };
                if credential.scopes.is_empty() {
                    return Err(invalid(
                        format!("{field}.scopes"),
                        "at least one of read, keys, billing, agents, admin",
                    ));
                }
                // One token or certificate, one operator: a shared one
                // would give it another credential's scopes and name in
                // the audit.
                let shared = entries.iter().find(|e| match (&e.proof, &proof) {
                    (Proof::Token(a), Proof::Token(b)) => a == b,
                    (Proof::Certificate(a), Proof::Certificate(b)) => a == b,
                    _ => false,
                });
                if let Some(other) = shared {
                    let (what, field_name) = match proof {
                        Proof::Token(_) => ("token", "token_sha256"),
                        Proof::Certificate(_) => ("certificate identity", "client_certificate"),
                    };
                    return Err(invalid(
                        format!("{field}.{field_name}"),
                        format!(
                            "the same {what} as {:?}; every credential needs its own",
                            other.operator.name
                        ),
                    ));
                }
                let via = match &proof {
                    Proof::Token(_) => Via::Token,
                    Proof::Certificate(uri) => Via::Certificate { uri: uri.clone() },
                };
                entries.push(Credential {
                    proof,
                    operator: Operator {
                        name: credential.name.clone(),
                        scopes: credential.scopes.iter().copied().collect(),
                        via,
                    },
                });
            }
        }
        Ok(Credentials { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .map(|e| e.operator.name.as_str())
            .collect()
    }

    /// The operator whose token is `token`. Every hash is compared, in
    /// constant time, whichever matches.
    pub fn authenticate(&self, token: &str) -> Option<Operator> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if let Proof::Token(hash) = &entry.proof {
                if bool::from(hash.ct_eq(&presented)) {
                    found = Some(&entry.operator);
                }
            }
        }
        found.cloned()
    }

    /// The operator a verified client certificate (DER) maps to, by its
    /// URI SANs; else why it is none, for an UNAUTHENTICATED message. A
    /// certificate naming an agent is never an operator, nor one whose
    /// URIs map to two operators.
    pub fn authenticate_certificate(&self, der: &[u8]) -> Result<Operator, NotAnOperator> {
        let uris = crate::identity::uris_of_certificate(der)?;
        if let Some(agent) = uris.iter().find(|uri| crate::identity::is_agent_uri(uri)) {
            return Err(NotAnOperator::Agent(shown(agent)));
        }
        let mut found: Option<&Operator> = None;
        for entry in &self.entries {
            let Proof::Certificate(mapped) = &entry.proof else {
                continue;
            };
            if !uris.iter().any(|uri| uri == mapped) {
                continue;
            }
            if let Some(first) = found {
                return Err(NotAnOperator::TwoOperators(
                    first.name.clone(),
                    entry.operator.name.clone(),
                ));
            }
            found = Some(&entry.operator);
        }
        if let Some(operator) = found {
            return Ok(operator.clone());
        }
        Err(match uris.as_slice() {
            [] => NotAnOperator::NoUri,
            [uri] => NotAnOperator::Unmapped {
                uri: shown(uri),
                more: String::new(),
            },
            [uri, more @ ..] => NotAnOperator::Unmapped {
                uri: shown(uri),
                more: format!(" (and {} more URI)", more.len()),
            },
        })
    }
}

/// A certificate's URI for a message: quoted, at most 256 bytes of it.
fn shown(uri: &str) -> String {
    const MAX: usize = 256;
    if uri.len() <= MAX {
        return format!("{uri:?}");
    }
    let mut end = MAX;
    while !uri.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &uri[..end])
}

/// Reads a credentials file (TOML, or JSON when it ends in `.json`), and
/// warns when others may read it.
pub fn read_credentials_file(path: &Path) -> Result<Vec<OperatorCredential>, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    warn_if_others_may_read(path);
    parse_credentials(path, &text)
}

fn parse_credentials(path: &Path, text: &str) -> Result<Vec<OperatorCredential>, CredentialsError> {
    let file: CredentialsFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|source| CredentialsError::Json {
            path: path.to_path_buf(),
            source,
        })?
    } else {
        toml::from_str(text).map_err(|source| CredentialsError::Toml {
            path: path.to_path_buf(),
            source,
        })?
    };
    Ok(file.operator)
}

/// Operator credentials that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(#[from] InvalidArgument),
    #[error("operators_file: cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operators_file {}: {source}", path.display())]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("operators_file {}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> CredentialsError {
    CredentialsError::Invalid(InvalidArgument::new(field, message))
}

/// Why a verified client certificate is no operator (the message of an
/// `UNAUTHENTICATED`).
#[derive(Debug, thiserror::Error)]
pub enum NotAnOperator {
    #[error(transparent)]
    Unreadable(#[from] crate::identity::CertificateError),
    #[error(
        "the client certificate is an agent's ({0}): an agent certificate is never an operator"
    )]
    Agent(String),
    #[error("the client certificate maps to two operators, {0:?} and {1:?}: it is neither")]
    TwoOperators(String, String),
    #[error(
        "the client certificate has no URI SAN, so it is not an operator (certs client makes {}<name>)",
        crate::identity::OPERATOR_URI_PREFIX
    )]
    NoUri,
    #[error(
        "the client certificate's identity {uri}{more} is not an operator: map it with \
         client_certificate in the operators file"
    )]
    Unmapped { uri: String, more: String },
}

#[cfg(unix)]
fn warn_if_others_may_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the operators file is readable by every user: chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_others_may_read(_path: &Path) {}

/// Where credentials come from, as configured.
#[derive(Debug, Clone)]
pub struct CredentialSources {
    pub admin_token: String,
    pub inline: Vec<OperatorCredential>,
    pub file: Option<PathBuf>,
}

impl CredentialSources {
    /// Reads every source; the file is read now (not at the last poll).
    pub fn load(&self) -> Result<Credentials, CredentialsError> {
        let mut configured = vec![("operators".to_string(), self.inline.clone())];
        if let Some(path) = &self.file {
            configured.push(("operators_file".into(), read_credentials_file(path)?));
        }
        Credentials::new(&self.admin_token, &configured)
    }
}

/// Something that says "reload now": SIGHUP on Unix.
#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

async fn next_hangup(hangup: &mut Option<Hangup>) {
    #[cfg(unix)]
    if let Some(signal) = hangup.as_mut() {
        if signal.recv().await.is_some() {
            return;
        }
    }
    let _ = hangup;
    std::future::pending::<()>().await
}

/// Re-reads the credentials every `every` and at SIGHUP, and publishes
/// them when they changed and are valid, until `credentials` has no
/// receiver left. Without a credentials file there is nothing to reload
/// (and SIGHUP keeps its default meaning). The SIGHUP handler is in place
/// when this returns, before the future first runs, so that a SIGHUP sent
/// once the coordinator serves never ends the process.
pub fn reload_credentials(
    sources: CredentialSources,
    every: Duration,
    credentials: watch::Sender<Arc<Credentials>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangup: Option<Hangup> = sources
        .file
        .as_ref()
        .and_then(|_| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok());
    #[cfg(not(unix))]
    let hangup: Option<Hangup> = None;
    reload_loop(sources, every, credentials, hangup)
}

async fn reload_loop(
    sources: CredentialSources,
    every: Duration,
    credentials: watch::Sender<Arc<Credentials>>,
    mut hangup: Option<Hangup>,
) {
    let Some(path) = sources.file.clone() else {
        return;
    };
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = next_hangup(&mut hangup) => true,
            _ = credentials.closed() => return,
        };
        let current = std::fs::read(&path).ok();
        if !forced && current == last {
            continue;
        }
        last = current;
        match sources.load() {
            Ok(loaded) => {
                tracing::info!(operators = ?loaded.names(), "operator credentials reloaded");
                metrics::counter!("allot_operator_reloads_total").increment(1);
                credentials.send_replace(Arc::new(loaded));
            }
            Err(error) => {
                tracing::error!(%error, "operator credentials not reloaded; the previous ones stay");
                metrics::counter!("allot_operator_reload_failures_total").increment(1);
            }
        }
    }
}

/// Failed authentications per peer address: after `max_failures` within
/// `window` (counted from the first), every call from that address is
/// refused until the window ends. At most `max_peers` addresses are
/// remembered; the oldest is forgotten first.
#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    max_peers: usize,
    // A std mutex: held for a map lookup, never across an await.
    peers: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

/// Addresses remembered by the throttle at most.
pub const MAX_THROTTLED_PEERS: usize = 10_000;

/// What the throttle counts failures by: an IPv4 address (an IPv4-mapped
/// IPv6 address counts as its IPv4 address), or an IPv6 address's /64,
/// the smallest network a host is routinely given, so that one host
/// cannot escape the throttle (or flush it) by walking its own addresses.
pub fn throttle_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

impl AuthThrottle {
    /// `max_failures` 0 disables the throttle.
    pub fn new(max_failures: u32, window: Duration) -> AuthThrottle {
        AuthThrottle {
            max_failures,
            window,
            max_peers: MAX_THROTTLED_PEERS,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `peer` is slowed down.
    pub fn check(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let peer = throttle_key(peer);
        let mut peers = self.peers.lock().expect("throttle lock");
        let Some(failures) = peers.get(&peer).copied() else {
            return Ok(());
        };
        let ends = failures.since + self.window;
        if now >= ends {
            peers.remove(&peer);
            return Ok(());
        }
        if failures.count >= self.max_failures {
            return Err(ends - now);
        }
        Ok(())
    }

    pub fn failed(&self, peer: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let peer = throttle_key(peer);
        let mut peers = self.peers.lock().expect("throttle lock");
        if !peers.contains_key(&peer) && peers.len() >= self.max_peers {
            // Full: forget what has expired and, if that is not enough,
            // the oldest tenth at once, so that a stream of new addresses
            // costs one pass over the map per tenth of it, not per failure.
            let window = self.window;
            peers.retain(|_, f| now < f.since + window);
            if peers.len() >= self.max_peers {
                let mut since: Vec<Instant> = peers.values().map(|f| f.since).collect();
                let cut = (self.max_peers / 10).max(1).min(since.len()) - 1;
                let (_, &mut oldest_kept, _) = since.select_nth_unstable(cut);
                peers.retain(|_, f| f.since > oldest_kept);
            }
        }
        let failures = peers.entry(peer).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now >= failures.since + self.window {
            *failures = Failures {
                since: now,
                count: 0,
            };
        }
        failures.count += 1;
    }

    pub fn succeeded(&self, peer: IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        self.peers
            .lock()
            .expect("throttle lock")
            .remove(&throttle_key(peer));
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.peers.lock().unwrap().len()
    }
}

/// What the gate decides with.
#[derive(Clone)]
pub struct Gatekeeper {
    credentials: watch::Receiver<Arc<Credentials>>,
    throttle: Arc<AuthThrottle>,
}

impl Gatekeeper {
    pub fn new(
        credentials: watch::Receiver<Arc<Credentials>>,
        throttle: Arc<AuthThrottle>,
    ) -> Gatekeeper {
        Gatekeeper {
            credentials,
            throttle,
        }
    }

    /// The operator calling `path` with `headers` from `peer`, who
    /// presented the verified client `certificate` (DER, the leaf) if any,
    /// or the status that refuses the call. The rule:
    ///
    /// | token | certificate | caller |
    /// | --- | --- | --- |
    /// | none | none | refused |
    /// | none | maps to an operator | that operator |
    /// | none | maps to none (or an agent's) | refused |
    /// | invalid | any | refused |
    /// | valid | none, or maps to none (or an agent's) | the token's operator |
    /// | valid | maps to an operator | refused, naming both |
    ///
    /// Every refusal is UNAUTHENTICATED and counts as a failure from the
    /// peer.
    pub fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        certificate: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> Result<Operator, Status> {
        let now = Instant::now();
        if let Some(peer) = peer {
            if let Err(wait) = self.throttle.check(peer, now) {
                metrics::counter!("allot_operator_auth_throttled_total").increment(1);
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut status = Status::resource_exhausted(format!(
                    "too many failed authentications from {peer}: retry in {seconds} s"
                ));
                if let Ok(value) = seconds.to_string().parse() {
                    status.metadata_mut().insert("retry-after", value);
                }
                return Err(status);
            }
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let operator = {
            let credentials = self.credentials.borrow();
            let by_certificate =
                certificate.map(|certificate| credentials.authenticate_certificate(certificate));
            match (presented, by_certificate) {
                (None, None) => Err(Status::unauthenticated(
                    "missing operator credential: send authorization: Bearer <token> or a \
                     client certificate mapped to an operator",
                )),
                (None, Some(by_certificate)) => {
                    by_certificate.map_err(|why| Status::unauthenticated(why.to_string()))
                }
                (Some(token), by_certificate) => match credentials.authenticate(token) {
                    None => Err(Status::unauthenticated("invalid operator token")),
                    // Names are unique, so a mapped certificate and a
                    // token are always two credentials: which one to
                    // trust is not guessed.
                    Some(by_token) => match by_certificate {
                        Some(Ok(by_certificate)) => Err(Status::unauthenticated(format!(
                            "the client certificate is operator {:?} and the bearer token is \
                             operator {:?}: send one credential",
                            by_certificate.name, by_token.name
                        ))),
                        Some(Err(_)) | None => Ok(by_token),
                    },
                },
            }
        };
        let operator = match operator {
            Ok(operator) => operator,
            Err(status) => {
                metrics::counter!("allot_operator_auth_failures_total").increment(1);
                if let Some(peer) = peer {
                    self.throttle.failed(peer, now);
                }
                return Err(status);
            }
        };
        if let Some(peer) = peer {
            self.throttle.succeeded(peer);
        }
        operator.check(path)?;
        Ok(operator)
    }
}

/// A tower service in front of a generated gRPC server: admits the call
/// through the [`Gatekeeper`] (which sees the method's path, unlike a
/// tonic interceptor) and passes the [`Operator`] on in the extensions.
#[derive(Clone)]
pub struct OperatorGate<S> {
    inner: S,
    gatekeeper: Gatekeeper,
}

impl<S> OperatorGate<S> {
    pub fn new(inner: S, gatekeeper: Gatekeeper) -> OperatorGate<S> {
        OperatorGate { inner, gatekeeper }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for OperatorGate<S> {
    const NAME: &'static str = S::NAME;
}

/// The peer's address, as the transport recorded it.
/// The caller's address: on a plaintext port (`--insecure`) and behind TLS.
fn peer_of<B>(request: &http::Request<B>) -> Option<IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
        .map(|addr| addr.ip())
}

/// The client certificates the TLS handshake verified (leaf first).
fn peer_certificates_of<B>(
    request: &http::Request<B>,
) -> Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
}

impl<S, B> tower_service::Service<http::Request<B>> for OperatorGate<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let certificates = peer_certificates_of(&request);
        let leaf = certificates
            .as_deref()
            .and_then(|chain| chain.first())
            .map(|der| der.as_ref());
        let admitted = self.gatekeeper.admit(
            request.uri().path(),
            request.headers(),
            leaf,
            peer_of(&request),
        );
        match admitted {
            Ok(operator) => {
                request.extensions_mut().insert(operator);
                // The clone is ready-checked by `poll_ready` of the original:
                // swap so that the ready one serves this call.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// The calling operator, as the gate put it into the request.
pub fn operator_of<T>(request: &tonic::Request<T>) -> Result<Operator, Status> {
    request
        .extensions()
        .get::<Operator>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no operator: the call did not pass the gate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(name: &str, token: &str, scopes: &[Scope]) -> OperatorCredential {
        OperatorCredential {
            name: name.into(),
            token_sha256: Some(token_sha256(token)),
            client_certificate: None,
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn every_method_of_admin_and_placement_has_a_scope() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(allot::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                let name = service.name();
                if name != "Admin" && name != "Placement" {
                    continue;
                }
                for method in &service.method {
                    let path = format!("/{}.{name}/{}", file.package(), method.name());
                    assert!(!scopes_for(&path).is_empty(), "{path} has no scope");
                    methods += 1;
                }
            }
        }
        assert_eq!(
            methods,
            METHOD_SCOPES.len(),
            "the table lists only real methods"
        );
    }

    #[test]
    fn tokens_authenticate_by_hash_and_scopes_decide() {
        let credentials = Credentials::new(
            "legacy-admin-token",
            &[(
                "operators".into(),
                vec![credential("reader", "reader-token", &[Scope::Read])],
            )],
        )
        .unwrap();
        let admin = credentials.authenticate("legacy-admin-token").unwrap();
        assert_eq!(admin.name, "admin");
        assert!(admin.check("/allot.v1.Admin/Credit").is_ok());
        assert!(admin.check("/allot.v1.Admin/Unknown").is_ok());
        let reader = credentials.authenticate("reader-token").unwrap();
        assert!(reader.check("/allot.v1.Admin/ListKeys").is_ok());
        let denied = reader.check("/allot.v1.Admin/Credit").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            "allot.v1.Admin/Credit: needs scope billing or admin; operator \"reader\" has read"
        );
        assert!(reader.check("/allot.v1.Admin/Unknown").is_err());
        assert!(credentials.authenticate("reader-token ").is_none());
        assert!(credentials.authenticate("").is_none());
    }

    #[test]
    fn credentials_are_checked() {
        let bad_hash = OperatorCredential {
            token_sha256: Some("abc".into()),
            ..credential("x", "t", &[Scope::Read])
        };
        let err = Credentials::new("", &[("operators".into(), vec![bad_hash])])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("operators[0].token_sha256"), "{err}");
        let err = Credentials::new(
            "legacy-token",
            &[(
                "operators_file".into(),
                vec![credential("admin", "t", &[Scope::Read])],
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("operators_file[0].name"), "{err}");
        let err = Credentials::new("", &[("operators".into(), vec![credential("x", "t", &[])])])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("operators[0].scopes"), "{err}");
        // Two credentials, one token: refused, naming the second.
        let err = Credentials::new(
            "",
            &[(
                "operators".into(),
                vec![
                    credential("reader", "shared", &[Scope::Read]),
                    credential("biller", "shared", &[Scope::Billing]),
                ],
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("operators[1].token_sha256"), "{err}");
    }

    fn mapped(name: &str, uri: &str, scopes: &[Scope]) -> OperatorCredential {
        OperatorCredential {
            name: name.into(),
            token_sha256: None,
            client_certificate: Some(uri.into()),
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn certificate_mappings_are_checked() {
        let load = |credentials: Vec<OperatorCredential>| {
            Credentials::new("", &[("operators_file".into(), credentials)])
                .unwrap_err()
                .to_string()
        };
        let both = OperatorCredential {
            client_certificate: Some("spiffe://allot/operator/x".into()),
            ..credential("x", "t", &[Scope::Read])
        };
        let err = load(vec![both]);
        assert!(
            err.starts_with("operators_file[0].client_certificate: set either"),
            "{err}"
        );
        let neither = OperatorCredential {
            token_sha256: None,
            ..credential("x", "t", &[Scope::Read])
        };
        let err = load(vec![neither]);
        assert!(
            err.starts_with("operators_file[0].token_sha256: missing"),
            "{err}"
        );
        for agent in ["spiffe://allot/agent/a1", "SPIFFE://Allot/Agent/a1"] {
            let err = load(vec![mapped("x", agent, &[Scope::Admin])]);
            assert!(
                err.starts_with("operators_file[0].client_certificate")
                    && err.contains("never an operator"),
                "{err}"
            );
        }
        for not_a_uri in ["", "alice", "spiffe://allot/operator/a b", "1x:y", "x:"] {
            let err = load(vec![mapped("x", not_a_uri, &[Scope::Read])]);
            assert!(
                err.starts_with("operators_file[0].client_certificate"),
                "{not_a_uri:?}: {err}"
            );
        }
        let long = format!(
            "spiffe://allot/operator/{}",
            "a".repeat(MAX_CERTIFICATE_URI_BYTES)
        );
        assert!(load(vec![mapped("x", &long, &[Scope::Read])]).contains("at most 2048 bytes"));
        let err = load(vec![
            mapped("alice", "spiffe://allot/operator/alice", &[Scope::Read]),
            mapped("bob", "spiffe://allot/operator/alice", &[Scope::Billing]),
        ]);
        assert!(
            err.starts_with(
                "operators_file[1].client_certificate: the same certificate identity as \"alice\""
            ),
            "{err}"
        );
        let err = load(vec![
            mapped("alice", "spiffe://allot/operator/alice", &[Scope::Read]),
            credential("alice", "t", &[Scope::Read]),
        ]);
        assert!(err.starts_with("operators_file[1].name"), "{err}");
        // A mapping and a token named alike elsewhere are separate proofs.
        Credentials::new(
            "",
            &[(
                "operators".into(),
                vec![
                    mapped("alice", "spiffe://example.org/ops/alice", &[Scope::Read]),
                    credential("bob", "spiffe://example.org/ops/alice", &[Scope::Read]),
                ],
            )],
        )
        .unwrap();
    }

    /// A certificate (DER) signed by a throwaway CA with these URI SANs.
    fn certificate_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| rcgen::SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn gatekeeper(credentials: Credentials) -> Gatekeeper {
        let (tx, rx) = watch::channel(Arc::new(credentials));
        // The receiver keeps the value; the sender is not needed.
        drop(tx);
        Gatekeeper::new(rx, Arc::new(AuthThrottle::new(3, Duration::from_secs(60))))
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn a_mapped_certificate_is_its_operator_and_the_gate_combines_it_with_a_token_by_rule() {
        const ALICE: &str = "spiffe://allot/operator/alice";
        let credentials = Credentials::new(
            "",
            &[(
                "operators_file".into(),
                vec![
                    mapped("alice", ALICE, &[Scope::Read]),
                    credential("alice-token", "alice-token", &[Scope::Billing]),
                    credential("bob", "bob-token", &[Scope::Read, Scope::Billing]),
                    mapped("carol", "spiffe://example.org/carol", &[Scope::Keys]),
                ],
            )],
        )
        .unwrap();
        let alice_cert = certificate_with_uris(&[ALICE]);
        let alice = credentials.authenticate_certificate(&alice_cert).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.via, Via::Certificate { uri: ALICE.into() });
        assert!(alice.check("/allot.v1.Admin/ListKeys").is_ok());
        assert_eq!(
            alice.check("/allot.v1.Admin/Credit").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(credentials.authenticate_certificate(b"not DER").is_err());
        let agent = certificate_with_uris(&["spiffe://allot/agent/a1", ALICE]);
        let why = credentials
            .authenticate_certificate(&agent)
            .unwrap_err()
            .to_string();
        assert!(why.contains("never an operator"), "{why}");
        let two = certificate_with_uris(&[ALICE, "spiffe://example.org/carol"]);
        let why = credentials
            .authenticate_certificate(&two)
            .unwrap_err()
            .to_string();
        assert!(why.contains("two operators"), "{why}");
        let unmapped = certificate_with_uris(&["spiffe://allot/operator/mallory"]);
        let why = credentials
            .authenticate_certificate(&unmapped)
            .unwrap_err()
            .to_string();
        assert_eq!(
            why,
            "the client certificate's identity \"spiffe://allot/operator/mallory\" is not an \
             operator: map it with client_certificate in the operators file"
        );
        let none = certificate_with_uris(&[]);
        assert!(credentials
            .authenticate_certificate(&none)
            .unwrap_err()
            .to_string()
            .contains("no URI SAN"));
        // A token never authenticates as a certificate credential.
        assert!(credentials.authenticate(ALICE).is_none());

        let gate = gatekeeper(credentials);
        let path = "/allot.v1.Admin/ListKeys";
        let no_headers = http::HeaderMap::new();
        let admit =
            |headers: &http::HeaderMap, cert: Option<&[u8]>| gate.admit(path, headers, cert, None);
        let refused = |result: Result<Operator, Status>| {
            let status = result.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            status.message().to_string()
        };
        assert!(refused(admit(&no_headers, None)).starts_with("missing operator credential"));
        assert_eq!(admit(&no_headers, Some(&alice_cert)).unwrap(), alice);
        assert!(refused(admit(&no_headers, Some(&unmapped))).contains("mallory"));
        assert!(refused(admit(&no_headers, Some(&agent))).contains("agent"));
        assert_eq!(
            refused(admit(&bearer("wrong"), Some(&alice_cert))),
            "invalid operator token"
        );
        let by_token = admit(&bearer("bob-token"), Some(&unmapped)).unwrap();
        assert_eq!(
            (by_token.name.as_str(), &by_token.via),
            ("bob", &Via::Token)
        );
        assert_eq!(
            admit(&bearer("bob-token"), Some(&agent)).unwrap().name,
            "bob",
            "an agent certificate adds nothing to a valid token"
        );
        assert_eq!(
            refused(admit(&bearer("bob-token"), Some(&alice_cert))),
            "the client certificate is operator \"alice\" and the bearer token is operator \
             \"bob\": send one credential"
        );
        // Scopes are checked after authentication: PERMISSION_DENIED.
        let denied = gate
            .admit(
                "/allot.v1.Admin/Credit",
                &no_headers,
                Some(&alice_cert),
                None,
            )
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_mapped_certificate_with_even_the_admin_token_is_refused() {
        let credentials = Credentials::new(
            "legacy-admin-token",
            &[(
                "operators".into(),
                vec![mapped(
                    "ops",
                    "spiffe://allot/operator/ops",
                    &[Scope::Admin],
                )],
            )],
        )
        .unwrap();
        let gate = gatekeeper(credentials);
        let ops = certificate_with_uris(&["spiffe://allot/operator/ops"]);
        let status = gate
            .admit(
                "/allot.v1.Admin/ListKeys",
                &bearer("legacy-admin-token"),
                Some(&ops),
                None,
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("\"ops\"") && status.message().contains("\"admin\""));
    }

    #[test]
    fn failed_certificate_authentication_is_throttled_like_a_token() {
        let gate = gatekeeper(Credentials::new("legacy-admin-token", &[]).unwrap());
        let unmapped = certificate_with_uris(&["spiffe://allot/operator/mallory"]);
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let path = "/allot.v1.Admin/ListKeys";
        for _ in 0..3 {
            let status = gate
                .admit(path, &http::HeaderMap::new(), Some(&unmapped), Some(peer))
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        let slowed = gate
            .admit(path, &bearer("legacy-admin-token"), None, Some(peer))
            .unwrap_err();
        assert_eq!(slowed.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn credentials_files_are_toml_or_json() {
        let toml = format!(
            "[[operator]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\nscopes = [\"keys\", \"billing\"]\n",
            token_sha256("t")
        );
        let parsed = parse_credentials(Path::new("ops.toml"), &toml).unwrap();
        assert_eq!(
            parsed,
            vec![credential("ops", "t", &[Scope::Keys, Scope::Billing])]
        );
        let json = format!(
            r#"{{"operator": [{{"name": "ops", "token_sha256": "{}", "scopes": ["keys", "billing"]}}]}}"#,
            token_sha256("t")
        );
        assert_eq!(
            parse_credentials(Path::new("ops.json"), &json).unwrap(),
            parsed
        );
        assert!(parse_credentials(Path::new("x.toml"), "[[operator]]\nname = 1").is_err());
        let mapping = "[[operator]]\nname = \"alice\"\nclient_certificate = \"spiffe://allot/operator/alice\"\nscopes = [\"read\"]\n";
        assert_eq!(
            parse_credentials(Path::new("ops.toml"), mapping).unwrap(),
            vec![mapped(
                "alice",
                "spiffe://allot/operator/alice",
                &[Scope::Read]
            )]
        );
    }

    #[test]
    fn a_peer_that_keeps_failing_is_slowed_down_until_the_window_ends() {
        let throttle = AuthThrottle::new(3, Duration::from_secs(60));
        let (peer, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(throttle.check(peer, t0).is_ok());
            throttle.failed(peer, t0);
        }
        let wait = throttle
            .check(peer, t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(
            throttle.check(other, t0).is_ok(),
            "other peers are not slowed"
        );
        assert!(throttle.check(peer, t0 + Duration::from_secs(60)).is_ok());
        assert_eq!(throttle.remembered(), 0, "an ended window is forgotten");
    }

    #[test]
    fn the_throttle_remembers_a_bounded_number_of_peers() {
        let mut throttle = AuthThrottle::new(1, Duration::from_secs(60));
        throttle.max_peers = 4;
        let t0 = Instant::now();
        for i in 0..10u8 {
            throttle.failed(
                IpAddr::from([10, 0, 0, i]),
                t0 + Duration::from_millis(i.into()),
            );
        }
        assert!(throttle.remembered() <= 4);
        assert!(throttle
            .check(IpAddr::from([10, 0, 0, 9]), t0 + Duration::from_secs(1))
            .is_err());
    }

    #[test]
    fn one_ipv6_host_walking_its_own_64_is_throttled_as_one_peer() {
        let throttle = AuthThrottle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let base: u128 = 0x2001_0db8_0000_0001 << 64;
        for i in 0..1000u128 {
            throttle.failed(IpAddr::V6((base | (i * 7919)).into()), t0);
        }
        assert_eq!(throttle.remembered(), 1);
        assert!(throttle.check(IpAddr::V6((base | 42).into()), t0).is_err());
        // The next /64 is another peer.
        let next = IpAddr::V6((base + (1u128 << 64)).into());
        assert!(throttle.check(next, t0).is_ok());
        // An IPv4-mapped address is its IPv4 address.
        for _ in 0..3 {
            throttle.failed(IpAddr::from([192, 0, 2, 1]), t0);
        }
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(throttle.check(mapped, t0).is_err());
    }
}
