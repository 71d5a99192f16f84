//! The agent's TLS (rustls, ring): its client certificate towards
//! coordinators (mutual TLS), the roots it trusts for `https://` upstreams,
//! and the optional certificate of its client-facing listener.
//!
//! Files are read when a connection needs them: the coordinator link reads
//! them at every (re)connection, so a renewed short-lived certificate is
//! picked up without a restart. Errors name the configuration field.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files of the agent's mutual TLS towards coordinators.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(field, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{field}: no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(&read(field, path)?)
        .map_err(|e| format!("{field}: no usable private key in {}: {e}", path.display()))
}

/// tonic's client TLS towards a coordinator, read from the files now.
pub fn coordinator_tls(
    files: &ClientTlsFiles,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    // Parsed here so that a bad file is named before any connection.
    read_certs("coordinator_ca", &files.ca)?;
    read_certs("client_cert", &files.cert)?;
    read_key("client_key", &files.key)?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            "coordinator_ca",
            &files.ca,
        )?))
        .identity(tonic::transport::Identity::from_pem(
            read("client_cert", &files.cert)?,
            read("client_key", &files.key)?,
        )))
}

/// The client configuration for `https://` upstreams: the system's roots
/// and `upstream_ca`.
pub fn upstream_client_config(upstream_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = upstream_ca {
        for cert in read_certs("upstream_ca", path)? {
            roots
                .add(cert)
                .map_err(|e| format!("upstream_ca: {}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream_ca: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The client-facing listener's server configuration (HTTP/2 and
/// HTTP/1.1 by ALPN).
pub fn listener_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = read_certs("listen_tls_cert", cert)?;
    let key = read_key("listen_tls_key", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("listen_tls_cert: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("listen_tls_key: does not match listen_tls_cert: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every TLS file `config` names, once, before any port is bound:
/// a missing or bad file is a start-up error naming its field.
pub fn check_files(config: &crate::config::AgentConfig) -> Result<(), String> {
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
