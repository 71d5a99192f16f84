//! Who a peer is, from the client certificate its TLS handshake verified.
//!
//! An agent's certificate names it with exactly one URI subject alternative
//! name `spiffe://allot/agent/<agent_id>` (what `allot-coordinator certs
//! agent <id>` makes). Everything that must hold "only for this agent"
//! (its `Hello`, later its epochs and the keys it holds) asks
//! [`session_peer`] once per stream and compares against [`PeerIdentity`].
//!
//! An operator's certificate (`allot-coordinator certs client <name>`)
//! carries the URI SAN `spiffe://allot/operator/<name>`; the operators file
//! maps such a URI to a credential ([`crate::operators`]). A certificate
//! with an agent URI is never an operator's, whatever a file says.
//!
//! This module only reads certificates that rustls already verified
//! against `tls_client_ca`; it never verifies a chain itself.

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

/// The URI SAN prefix of an agent certificate.
pub const AGENT_URI_PREFIX: &str = "spiffe://allot/agent/";

/// The URI SAN naming `agent_id`.
pub fn agent_uri(agent_id: &str) -> String {
    format!("{AGENT_URI_PREFIX}{agent_id}")
}

/// The URI SAN prefix of an operator certificate made by `certs client`.
pub const OPERATOR_URI_PREFIX: &str = "spiffe://allot/operator/";

/// The URI SAN naming operator `name`.
pub fn operator_uri(name: &str) -> String {
    format!("{OPERATOR_URI_PREFIX}{name}")
}

/// Whether `uri` is an agent's identity. Case is ignored, so that no
/// spelling of an agent's URI can be mapped to an operator.
pub fn is_agent_uri(uri: &str) -> bool {
    uri.as_bytes()
        .get(..AGENT_URI_PREFIX.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(AGENT_URI_PREFIX.as_bytes()))
}

/// A client certificate that names nobody allot knows.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("unreadable client certificate: {0}")]
    Unreadable(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("unreadable subject alternative names: {0}")]
    SubjectAlternativeNames(x509_parser::error::X509Error),
    #[error(
        "the client certificate must name exactly one agent as a URI SAN {AGENT_URI_PREFIX}<agent_id>"
    )]
    NotOneAgent,
    #[error("{0}")]
    AgentId(allot::InvalidArgument),
}

/// Every URI subject alternative name of a certificate (DER), in order.
pub fn uris_of_certificate(der: &[u8]) -> Result<Vec<String>, CertificateError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(CertificateError::Unreadable)?;
    let names = cert
        .subject_alternative_name()
        .map_err(CertificateError::SubjectAlternativeNames)?;
    Ok(names
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// Who is at the other end of an agent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// `insecure = true`: plaintext, nobody is verified and any `Hello` is
    /// taken at its word.
    Unverified,
    /// The agent the verified client certificate names.
    Agent(String),
}

impl PeerIdentity {
    /// `Ok` when a `Hello` for `agent_id` may be accepted from this peer;
    /// else `PERMISSION_DENIED` naming `hello.agent_id`.
    pub fn admit_hello(&self, agent_id: &str) -> Result<(), Status> {
        match self {
            PeerIdentity::Unverified => Ok(()),
            PeerIdentity::Agent(certified) if certified == agent_id => Ok(()),
            PeerIdentity::Agent(certified) => Err(Status::permission_denied(format!(
                "hello.agent_id: {agent_id:?} is not the agent this client certificate names \
                 ({certified:?})"
            ))),
        }
    }
}

/// The agent id a certificate (DER) names: its one URI SAN under
/// [`AGENT_URI_PREFIX`], a valid agent id.
pub fn agent_id_of_certificate(der: &[u8]) -> Result<String, CertificateError> {
    let uris = uris_of_certificate(der)?;
    let mut ids = uris
        .iter()
        .filter_map(|uri| uri.strip_prefix(AGENT_URI_PREFIX));
    let (Some(id), None) = (ids.next(), ids.next()) else {
        return Err(CertificateError::NotOneAgent);
    };
    allot::key::validate_id("agent id", id).map_err(CertificateError::AgentId)?;
    Ok(id.to_string())
}

/// The identity of the peer of `request`. With `required` (TLS on), a
/// peer without a verified agent certificate is refused: `UNAUTHENTICATED`
/// when it presented none, `PERMISSION_DENIED` when its certificate names
/// no agent.
pub fn session_peer<T>(request: &Request<T>, required: bool) -> Result<PeerIdentity, Status> {
    if !required {
        return Ok(PeerIdentity::Unverified);
    }
    let certs = request.peer_certs().unwrap_or_default();
    let Some(leaf) = certs.first() else {
        return Err(Status::unauthenticated(format!(
            "an agent session needs a client certificate naming the agent \
             ({AGENT_URI_PREFIX}<agent_id>)"
        )));
    };
    agent_id_of_certificate(leaf)
        .map(PeerIdentity::Agent)
        .map_err(|error| Status::permission_denied(error.to_string()))
}
