//! The agent's TLS (rustls, ring): its client certificate towards
//! coordinators (mutual TLS), the roots it trusts for `https://` upstreams,
//! and the optional certificate of its client-facing listener.
//!
//! Files are read when a connection needs them: the coordinator link reads
//! them at every (re)connection, so a renewed short-lived certificate is
//! picked up without a restart. Errors name the configuration field.

use crate::config::{AgentConfig, ClientTlsFiles};
pub use allot_runtime::pem::TlsError;
use allot_runtime::pem::{add_roots, provider, read_certs, read_file, read_key};
use std::path::Path;
use std::sync::Arc;

/// tonic's client TLS towards a coordinator, read from the files now.
pub fn coordinator_tls(
    files: &ClientTlsFiles,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    // Parsed here so that a bad file is named before any connection.
    read_certs("coordinator_ca", &files.ca)?;
    read_certs("client_cert", &files.cert)?;
    read_key("client_key", &files.key)?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read_file(
            "coordinator_ca",
            &files.ca,
        )?))
        .identity(tonic::transport::Identity::from_pem(
            read_file("client_cert", &files.cert)?,
            read_file("client_key", &files.key)?,
        )))
}

/// The client configuration for `https://` upstreams: the system's roots
/// and `upstream_ca`.
pub fn upstream_client_config(
    upstream_ca: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = upstream_ca {
        add_roots(&mut roots, "upstream_ca", path)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            field: "upstream_ca",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The client-facing listener's server configuration (HTTP/2 and
/// HTTP/1.1 by ALPN).
pub fn listener_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs("listen_tls_cert", cert)?;
    let key = read_key("listen_tls_key", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            field: "listen_tls_cert",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::KeyMismatch {
            key: "listen_tls_key",
            cert: "listen_tls_cert",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every TLS file `config` names, once, before any port is bound:
/// a missing or bad file is a start-up error naming its field.
pub fn check_files(config: &AgentConfig) -> Result<(), TlsError> {
    if let Some(files) = config.coordinator_tls() {
        coordinator_tls(&files)?;
    }
    if let Some(ca) = &config.upstream_ca {
        upstream_client_config(Some(ca))?;
    }
    if let (Some(cert), Some(key)) = (&config.listen_tls_cert, &config.listen_tls_key) {
        listener_config(cert, key)?;
    }
    Ok(())
}
