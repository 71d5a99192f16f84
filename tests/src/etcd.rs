//! Real etcd servers for tests: `etcd` processes from Debian's `etcd-server`
//! package on free loopback ports, each member in its own temporary data
//! directory, killed when the handle drops (a failing test included).
//! They run with etcd's defaults (1.5 MiB requests, no auto-compaction),
//! as an operator's etcd may: allot needs no etcd flag raised.

use crate::process::free_port;
use crate::{wait_until, TempDir};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
    /// Client TLS of a [`EtcdCluster::start_tls`] cluster.
    tls: Option<EtcdTls>,
    _dir: TempDir,
}

/// The files of an etcd that serves clients TLS only and requires client
/// certificates (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub server: crate::tls::CertFiles,
    pub client: crate::tls::CertFiles,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub async fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, None).await
    }

    /// One member serving clients on `https://` only, with a server
    /// certificate and client certificates from `pki` required.
    pub async fn start_tls(pki: &crate::tls::TestPki) -> EtcdCluster {
        let tls = EtcdTls {
            ca: pki.ca_path(),
            server: pki.node(),
            client: pki.client("coordinator"),
        };
        EtcdCluster::start_with(1, Some(tls)).await
    }

    async fn start_with(size: usize, tls: Option<EtcdTls>) -> EtcdCluster {
        let scheme = if tls.is_some() { "https" } else { "http" };
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd is not installed: run scripts/test as root, or apt-get install etcd-server"
        );
        let dir = TempDir::new("etcd");
        let mut members: Vec<EtcdMember> = (0..size)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                child: None,
                dir: dir.0.join(format!("m{i}")),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            initial_cluster,
            tls,
            _dir: dir,
        };
        for member in &mut members {
            cluster.spawn(member);
        }
        cluster.members = members;
        cluster.wait_healthy().await;
        cluster
    }

    /// The `etcd` command line of `member`; `new_cluster` on first start.
    fn command(&self, member: &EtcdMember, new_cluster: bool) -> Command {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(member.dir.with_extension("log"))
            .expect("etcd log");
        let mut command = Command::new("etcd");
        command
            .args(["--name", &member.name])
            .args(["--data-dir", member.dir.to_str().unwrap()])
            .args(["--listen-client-urls", &member.client_url])
            .args(["--advertise-client-urls", &member.client_url])
            .args(["--listen-peer-urls", &member.peer_url])
            .args(["--initial-advertise-peer-urls", &member.peer_url])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(tls) = &self.tls {
            command
                .args(["--cert-file", tls.server.cert.to_str().unwrap()])
                .args(["--key-file", tls.server.key.to_str().unwrap()])
                .args(["--trusted-ca-file", tls.ca.to_str().unwrap()])
                .arg("--client-cert-auth");
        }
        if new_cluster {
            command
                .args(["--initial-cluster", &self.initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "allot-test"]);
        }
        command
    }

    fn spawn(&self, member: &mut EtcdMember) {
        member.child = Some(self.command(member, true).spawn().expect("etcd starts"));
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), self.connect_options())
            .await
            .expect("etcd client")
    }

    /// The files of a TLS cluster.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// What a client needs to connect: TLS with the client certificate on
    /// a TLS cluster.
    pub fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let tls = self.tls.as_ref()?;
        let read = |path: &std::path::Path| std::fs::read(path).expect("etcd TLS file");
        Some(
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.client.cert),
                        read(&tls.client.key),
                    )),
            ),
        )
    }

    pub async fn wait_healthy(&self) {
        let endpoints = self.endpoints();
        wait_until("etcd to answer", Duration::from_secs(30), || {
            let endpoints = endpoints.clone();
            let options = self.connect_options();
            async move {
                let Ok(Ok(mut client)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    etcd_client::Client::connect(endpoints, options),
                )
                .await
                else {
                    return false;
                };
                matches!(
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        client.put("/health-probe", "ok", None)
                    )
                    .await,
                    Ok(Ok(_))
                )
            }
        })
        .await;
    }

    /// `kill -9` one member.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member (the data stays).
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Restarts every stopped member on its data.
    pub async fn restart_stopped(&mut self) {
        let mut members = std::mem::take(&mut self.members);
        for member in &mut members {
            if member.child.is_none() {
                member.child = Some(self.command(member, false).spawn().expect("etcd restarts"));
            }
        }
        self.members = members;
        self.wait_healthy().await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
