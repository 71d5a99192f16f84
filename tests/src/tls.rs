//! Certificates for the TLS tests, made with rcgen through the
//! coordinator's own `certs` module: a CA, a server certificate for
//! `127.0.0.1`/`localhost`, agent and operator client certificates, and
//! the bad ones (another CA, expired) the tests present.

use allot::pb;
use allot_coordinator::certs::{self, Leaf, Pem, Validity};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A day: long enough for any test.
const DAY: Duration = Duration::from_secs(86_400);

/// A CA and the files issued from it, in one directory.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: Pem,
}

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn identity(&self) -> Identity {
        Identity::from_pem(
            std::fs::read(&self.cert).unwrap(),
            std::fs::read(&self.key).unwrap(),
        )
    }
}

impl TestPki {
    /// A new CA in `dir` (`ca.pem`, `ca.key`) and a server certificate for
    /// the loopback address (`node.pem`, `node.key`).
    pub fn new(dir: &Path) -> TestPki {
        let ca = certs::new_ca("allot test CA", Validity::for_next(DAY)).unwrap();
        certs::write(dir, "ca", &ca, true).unwrap();
        let pki = TestPki {
            dir: dir.to_path_buf(),
            ca,
        };
        pki.node();
        pki
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// (Re)issues the server certificate for 127.0.0.1 and localhost.
    pub fn node(&self) -> CertFiles {
        self.issue(
            Leaf::Node {
                hosts: vec!["127.0.0.1".into(), "localhost".into()],
            },
            Validity::for_next(DAY),
        )
    }

    pub fn agent(&self, agent_id: &str) -> CertFiles {
        self.issue(
            Leaf::Agent {
                agent_id: agent_id.into(),
            },
            Validity::for_next(DAY),
        )
    }

    pub fn client(&self, name: &str) -> CertFiles {
        self.issue(Leaf::Client { name: name.into() }, Validity::for_next(DAY))
    }

    /// An agent certificate that expired an hour ago.
    pub fn expired_agent(&self, agent_id: &str) -> CertFiles {
        let now = time::OffsetDateTime::now_utc();
        let pem = certs::issue(
            &self.ca,
            &Leaf::Agent {
                agent_id: agent_id.into(),
            },
            Validity {
                not_before: now - time::Duration::days(2),
                not_after: now - time::Duration::hours(1),
            },
        )
        .unwrap();
        self.save(&format!("expired-agent-{agent_id}"), &pem)
    }

    pub fn issue(&self, leaf: Leaf, validity: Validity) -> CertFiles {
        let pem = certs::issue(&self.ca, &leaf, validity).unwrap();
        self.save(&certs::file_stem(&leaf), &pem)
    }

    fn save(&self, stem: &str, pem: &Pem) -> CertFiles {
        let cert = certs::write(&self.dir, stem, pem, true).unwrap();
        CertFiles {
            cert,
            key: self.dir.join(format!("{stem}.key")),
        }
    }

    /// An `https://` endpoint that trusts this CA, presenting `identity`.
    pub fn endpoint(&self, url: &str, identity: Option<&CertFiles>) -> Endpoint {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca.cert));
        if let Some(identity) = identity {
            tls = tls.identity(identity.identity());
        }
        Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .unwrap()
    }

    /// A connected channel to `url` trusting this CA (no client certificate).
    pub async fn channel(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        self.endpoint(url, None).connect().await
    }

    /// Waits (20 s at most) until the coordinator at `url` answers Admin
    /// calls over TLS trusting this CA.
    pub async fn wait_for_coordinator(&self, url: &str) {
        crate::wait_until(
            "the TLS coordinator to answer",
            Duration::from_secs(20),
            || async move {
                let Ok(channel) = self.channel(url).await else {
                    return false;
                };
                pb::admin_client::AdminClient::new(channel)
                    .list_accounts(crate::authed(pb::ListAccountsRequest::default()))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// The leaf certificate a fresh TLS connection to `addr` (trusting this
    /// CA, as 127.0.0.1) is shown; `None` when the handshake fails.
    pub async fn served_certificate(&self, addr: std::net::SocketAddr) -> Option<Vec<u8>> {
        let roots = allot_coordinator::tls::read_roots("ca", &self.ca_path()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(allot_coordinator::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.ok()?;
        Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
    }
}
