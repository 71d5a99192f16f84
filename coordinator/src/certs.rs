//! Certificates for a small allot deployment, in the spirit of
//! `cockroach cert`: a CA, server certificates for coordinators, client
//! certificates for agents (naming the agent, see [`crate::identity`]) and
//! for operators (naming the operator, for a `client_certificate` mapping
//! in the operators file, see [`crate::operators`]). Used by `allot-coordinator certs`, the quick start and
//! the tests. It only makes files; it never reads a running config.
//!
//! Files, in one directory, keys created with mode 0600:
//! `ca.pem`/`ca.key`, `node.pem`/`node.key`, `agent-<id>.pem`/`.key`,
//! `client-<name>.pem`/`.key`.

use crate::identity::{agent_uri, operator_uri};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

/// A certificate that cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("a node certificate needs at least one host name or IP")]
    NoHosts,
    #[error(transparent)]
    Invalid(#[from] allot::InvalidArgument),
    #[error("{} exists: remove it or pass --overwrite", .0.display())]
    Exists(PathBuf),
    #[error("cannot read {}: {source} (make the CA first: allot-coordinator certs ca)", path.display())]
    NoCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) until `lifetime` from now.
    pub fn for_next(lifetime: Duration) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - time::Duration::hours(1),
            not_after: now + lifetime,
        }
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone)]
pub enum Leaf {
    /// A coordinator's server certificate for these host names and IPs.
    Node { hosts: Vec<String> },
    /// An agent's client certificate: URI SAN `spiffe://allot/agent/<id>`.
    Agent { agent_id: String },
    /// An operator's client certificate (grpcurl `-cert`): URI SAN
    /// `spiffe://allot/operator/<name>`.
    Client { name: String },
}

/// A new self-signed CA.
pub fn new_ca(common_name: &str, validity: Validity) -> Result<Pem, CertsError> {
    let key = KeyPair::generate().map_err(|source| CertsError::Rcgen {
        what: "cannot make a key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertsError::Rcgen {
            what: "cannot sign the CA",
            source,
        })?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A leaf certificate signed by `ca`.
pub fn issue(ca: &Pem, leaf: &Leaf, validity: Validity) -> Result<Pem, CertsError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|source| CertsError::Rcgen {
        what: "ca.key",
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(|source| CertsError::Rcgen {
            what: "ca.pem",
            source,
        })?;
    let mut params = match leaf {
        Leaf::Node { hosts } => {
            if hosts.is_empty() {
                return Err(CertsError::NoHosts);
            }
            let mut params =
                CertificateParams::new(hosts.clone()).map_err(|source| CertsError::Rcgen {
                    what: "hosts",
                    source,
                })?;
            params.distinguished_name = name(&hosts[0]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params
        }
        Leaf::Agent { agent_id } => {
            allot::key::validate_id("agent id", agent_id)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = name(agent_id);
            let uri = agent_uri(agent_id)
                .try_into()
                .map_err(|source| CertsError::Rcgen {
                    what: "agent id",
                    source,
                })?;
            params.subject_alt_names = vec![SanType::URI(uri)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        }
        Leaf::Client { name: client } => {
            allot::key::validate_id("client name", client)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = name(client);
            let uri = operator_uri(client)
                .try_into()
                .map_err(|source| CertsError::Rcgen {
                    what: "client name",
                    source,
                })?;
            params.subject_alt_names = vec![SanType::URI(uri)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        }
    };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate().map_err(|source| CertsError::Rcgen {
        what: "cannot make a key",
        source,
    })?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertsError::Rcgen {
            what: "cannot sign",
            source,
        })?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "allot");
    name.push(DnType::CommonName, common_name);
    name
}

/// The file stem of a leaf: `node`, `agent-<id>`, `client-<name>`.
pub fn file_stem(leaf: &Leaf) -> String {
    match leaf {
        Leaf::Node { .. } => "node".into(),
        Leaf::Agent { agent_id } => format!("agent-{agent_id}"),
        Leaf::Client { name } => format!("client-{name}"),
    }
}

/// Writes `<stem>.pem` and `<stem>.key` into `dir` (created if missing),
/// both 0600; an existing file is kept unless `overwrite`. Returns the
/// certificate's path.
pub fn write(dir: &Path, stem: &str, pem: &Pem, overwrite: bool) -> Result<PathBuf, CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        what: "cannot create",
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() && !overwrite {
            return Err(CertsError::Exists(path.to_path_buf()));
        }
    }
    write_private(&key_path, pem.key.as_bytes())?;
    write_private(&cert_path, pem.cert.as_bytes())?;
    Ok(cert_path)
}

/// Reads `ca.pem` and `ca.key` from `dir`.
pub fn read_ca(dir: &Path) -> Result<Pem, CertsError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| CertsError::NoCa { path, source })
    };
    Ok(Pem {
        cert: read("ca.pem")?,
        key: read("ca.key")?,
    })
}

/// Writes a file readable by its owner only, replacing it atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp).map_err(|source| CertsError::Io {
        what: "cannot create",
        path: tmp.clone(),
        source,
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| CertsError::Io {
            what: "cannot write",
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, path).map_err(|source| CertsError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_certificate_names_its_agent_and_an_operator_certificate_its_operator() {
        let validity = Validity::for_next(Duration::from_secs(3600));
        let ca = new_ca("test CA", validity).unwrap();
        let agent = issue(
            &ca,
            &Leaf::Agent {
                agent_id: "agent-7".into(),
            },
            validity,
        )
        .unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(agent.cert.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(
            crate::identity::agent_id_of_certificate(&der).unwrap(),
            "agent-7"
        );
        let client = issue(&ca, &Leaf::Client { name: "ops".into() }, validity).unwrap();
        let der: rustls::pki_types::CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(client.cert.as_bytes()).unwrap();
        assert!(crate::identity::agent_id_of_certificate(&der).is_err());
        assert_eq!(
            crate::identity::uris_of_certificate(&der).unwrap(),
            vec!["spiffe://allot/operator/ops".to_string()]
        );
    }

    #[test]
    fn keys_and_certificates_are_written_owner_only() {
        let dir = std::env::temp_dir().join(format!("allot-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = new_ca("test CA", Validity::for_next(Duration::from_secs(60))).unwrap();
        write(&dir, "ca", &ca, false).unwrap();
        assert!(write(&dir, "ca", &ca, false)
            .unwrap_err()
            .to_string()
            .contains("exists"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in ["ca.pem", "ca.key"] {
                let mode = std::fs::metadata(dir.join(file))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{file}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
