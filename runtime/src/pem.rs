//! PEM files for TLS, read the same way by both binaries (rustls, ring).
//! Every error names the configuration field the file came from.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A TLS file or setting that cannot be used; `field` is the configuration
/// field that names it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{field}: no certificate in {}", path.display())]
    NoCertificate { field: &'static str, path: PathBuf },
    #[error("{field}: cannot read a private key from {}: {source}", path.display())]
    Key {
        field: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{field}: {source}")]
    Rustls {
        field: &'static str,
        source: rustls::Error,
    },
    #[error("{key}: does not match {cert} or is unusable: {source}")]
    KeyMismatch {
        key: &'static str,
        cert: &'static str,
        source: rustls::Error,
    },
    #[error("{field}: {source}")]
    Verifier {
        field: &'static str,
        source: rustls::server::VerifierBuilderError,
    },
}

/// The crypto provider of every TLS configuration allot builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a whole PEM file, for APIs that parse it themselves.
pub fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source: rustls::pki_types::pem::Error::Io(e),
    })
}

/// Reads certificates from a PEM file.
pub fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            field,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn read_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Key {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// A root store of the certificates in `path`.
pub fn read_roots(field: &'static str, path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, field, path)?;
    Ok(roots)
}

/// Adds the certificates in `path` to `roots`.
pub fn add_roots(
    roots: &mut rustls::RootCertStore,
    field: &'static str,
    path: &Path,
) -> Result<(), TlsError> {
    for cert in read_certs(field, path)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::Rustls { field, source })?;
    }
    Ok(())
}
