//! TLS on every link (SPEC/DESIGN trust model): the coordinator's port
//! speaks TLS, an agent is who its client certificate says, operators reach
//! Admin with `grpcurl -cacert`, `https://` upstreams work, a URL whose
//! scheme cannot be honoured stops the start, and renewed certificates are
//! served without a restart. Certificates are made here with rcgen.

use allot::pb;
use allot::pb::agent_message::Msg as AgentMsg;
use allot::pb::coordinator_message::Msg as CoordMsg;
use allot_e2e::grpcurl::Grpcurl;
use allot_e2e::tls::{CertFiles, TestPki};
use allot_e2e::*;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

/// A TLS coordinator (no agent) with a key whose secret a peer may try to
/// look up.
struct TlsCoordinator {
    addr: SocketAddr,
    url: String,
    pki: TestPki,
    key_id: String,
    secret: String,
    _task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: TempDir,
}

impl TlsCoordinator {
    async fn start() -> TlsCoordinator {
        let dir = TempDir::new("tls-coordinator");
        let pki = TestPki::new(&dir.0.join("certs"));
        let (addr, task) = start_coordinator(Stack::tls_coordinator_config(&dir, &pki)).await;
        let url = format!("https://{addr}");
        pki.wait_for_coordinator(&url).await;
        let admin = pb::admin_client::AdminClient::new(pki.channel(&url).await.unwrap());
        let (key_id, secret) = key_with_limits_via(
            admin,
            "acme",
            vec![limit(pb::Unit::Tokens, "100000", balance())],
        )
        .await;
        TlsCoordinator {
            addr,
            url,
            pki,
            key_id,
            secret,
            _task: task,
            _dir: dir,
        }
    }

    async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        pb::admin_client::AdminClient::new(self.pki.channel(&self.url).await.unwrap())
    }

    /// Nothing was granted or reserved and no agent session registered.
    async fn assert_nothing_granted(&self) {
        let mut admin = self.admin().await;
        let agents = admin
            .list_agents(authed(pb::ListAgentsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert!(agents.is_empty(), "no agent registered: {agents:?}");
        let snapshot = admin
            .get_snapshot(authed(pb::GetSnapshotRequest {
                key_id: self.key_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        for status in &snapshot.limits {
            assert_eq!(status.spent, "0", "{status:?}");
            assert_eq!(status.reserved, "0", "{status:?}");
        }
    }
}

/// What a peer got from `AgentSession` after sending `Hello` and a
/// `KeyLookup` of a real key.
#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug in failure messages
enum Attempt {
    /// No channel at all (handshake or connection refused).
    NotConnected(String),
    /// The call was refused before any message.
    Refused(tonic::Status),
    /// The stream ended (with an error, or not) after these messages.
    Ended(Vec<CoordMsg>, Option<tonic::Status>),
    /// Still open after the deadline, with these messages.
    Open(Vec<CoordMsg>),
}

impl Attempt {
    /// The peer learned nothing: no welcome, no key, and the session is
    /// over.
    fn assert_learns_nothing(&self) {
        match self {
            Attempt::NotConnected(_) | Attempt::Refused(_) => {}
            Attempt::Ended(messages, Some(_)) if messages.is_empty() => {}
            other => panic!("the peer must learn nothing, got {other:?}"),
        }
    }
}

/// Opens a session as `agent_id` and asks for the key of `secret`;
/// collects what the coordinator answers until the stream ends or 5 s of
/// silence.
async fn try_session(endpoint: Endpoint, agent_id: &str, secret: &str) -> Attempt {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => return Attempt::NotConnected(format!("{error:?}")),
    };
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    for msg in [
        AgentMsg::Hello(pb::Hello {
            agent_id: agent_id.into(),
            epoch: 1,
            neuron_id: "neuron-1".into(),
        }),
        AgentMsg::KeyLookup(pb::KeyLookup {
            key_hash: Sha256::digest(secret.as_bytes()).to_vec(),
        }),
    ] {
        tx.send(pb::AgentMessage { msg: Some(msg) }).await.unwrap();
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.session(ReceiverStream::new(rx)),
    )
    .await
    .expect("the coordinator answers the call");
    let mut inbound = match response {
        Ok(response) => response.into_inner(),
        Err(status) => return Attempt::Refused(status),
    };
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
            Ok(Ok(Some(message))) => messages.extend(message.msg),
            Ok(Ok(None)) => return Attempt::Ended(messages, None),
            Ok(Err(status)) => return Attempt::Ended(messages, Some(status)),
            Err(_) => return Attempt::Open(messages),
        }
    }
}

fn was_welcomed_and_answered(messages: &[CoordMsg]) -> bool {
    messages.iter().any(|m| matches!(m, CoordMsg::Welcome(_)))
        && messages
            .iter()
            .any(|m| matches!(m, CoordMsg::Key(result) if result.key.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_session_without_a_client_certificate_is_refused_and_learns_nothing() {
    let coordinator = TlsCoordinator::start().await;
    let attempt = try_session(
        coordinator.pki.endpoint(&coordinator.url, None),
        "agent-1",
        &coordinator.secret,
    )
    .await;
    match &attempt {
        Attempt::Refused(status) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}")
        }
        other => panic!("refused at once, not {other:?}"),
    }
    coordinator.assert_nothing_granted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_and_learns_nothing() {
    let coordinator = TlsCoordinator::start().await;
    let dir = TempDir::new("other-ca");
    let other = TestPki::new(&dir.0);
    let impostor = other.agent("agent-1");
    let attempt = try_session(
        coordinator.pki.endpoint(&coordinator.url, Some(&impostor)),
        "agent-1",
        &coordinator.secret,
    )
    .await;
    attempt.assert_learns_nothing();
    coordinator.assert_nothing_granted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_and_learns_nothing() {
    let coordinator = TlsCoordinator::start().await;
    let expired = coordinator.pki.expired_agent("agent-1");
    let attempt = try_session(
        coordinator.pki.endpoint(&coordinator.url, Some(&expired)),
        "agent-1",
        &coordinator.secret,
    )
    .await;
    attempt.assert_learns_nothing();
    coordinator.assert_nothing_granted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_coordinator_is_refused_and_learns_nothing() {
    let coordinator = TlsCoordinator::start().await;
    let plaintext = Endpoint::from_shared(format!("http://{}", coordinator.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let attempt = try_session(plaintext, "agent-1", &coordinator.secret).await;
    attempt.assert_learns_nothing();
    coordinator.assert_nothing_granted().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_agent_a_cannot_open_a_session_as_agent_b() {
    let coordinator = TlsCoordinator::start().await;
    let agent_a = coordinator.pki.agent("agent-a");
    let attempt = try_session(
        coordinator.pki.endpoint(&coordinator.url, Some(&agent_a)),
        "agent-b",
        &coordinator.secret,
    )
    .await;
    match &attempt {
        Attempt::Ended(messages, Some(status)) if messages.is_empty() => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("hello.agent_id"), "{status:?}");
        }
        other => panic!("PERMISSION_DENIED before any message, not {other:?}"),
    }
    coordinator.assert_nothing_granted().await;
    // The same certificate, for its own agent, is welcomed and answered.
    let attempt = try_session(
        coordinator.pki.endpoint(&coordinator.url, Some(&agent_a)),
        "agent-a",
        &coordinator.secret,
    )
    .await;
    match &attempt {
        Attempt::Open(messages) | Attempt::Ended(messages, _) => {
            assert!(was_welcomed_and_answered(messages), "{attempt:?}")
        }
        other => panic!("agent-a is welcomed, not {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_through_an_agent_on_mutual_tls_is_admitted_and_settled() {
    let stack = Stack::start_tls().await;
    assert!(stack.coordinator_url.starts_with("https://"));
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    wait_until("the usage to settle", Duration::from_secs(20), || async {
        stack.settled_records().await >= 1
    })
    .await;
    let (spent, reserved) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert!(spent > 0, "spent {spent}");
    assert_eq!(reserved, stack.key_usage(&key_id, pb::Unit::Tokens).await.1);
    let agents = stack
        .admin()
        .await
        .list_agents(authed(pb::ListAgentsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        agents
            .iter()
            .any(|a| a.agent_id == "agent-1" && a.connected),
        "{agents:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_cacert_lists_the_services_and_calls_admin_with_the_token() {
    let coordinator = TlsCoordinator::start().await;
    let ca = &coordinator.pki.ca_path();
    let addr = coordinator.addr.to_string();
    let (ok, out) = Grpcurl::tls(ca).args(&[&addr, "list"]).await;
    assert!(ok && out.contains("allot.v1.Admin"), "{out}");
    let list_accounts = "allot.v1.Admin/ListAccounts";
    let (ok, out) = Grpcurl::tls(ca)
        .token(ADMIN_TOKEN)
        .call(&addr, list_accounts, "{}")
        .await;
    assert!(ok && out.contains("acme"), "{out}");
    // A client certificate that no operator credential maps is only TLS: the
    // call needs the token (tests/tests/operator_certs.rs maps certificates).
    let operator = coordinator.pki.client("ops");
    let (ok, out) = Grpcurl::tls(ca)
        .cert(&operator)
        .token(ADMIN_TOKEN)
        .call(&addr, list_accounts, "{}")
        .await;
    assert!(ok && out.contains("acme"), "{out}");
    let (ok, out) = Grpcurl::tls(ca)
        .cert(&operator)
        .call(&addr, list_accounts, "{}")
        .await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    // Plaintext does not reach it.
    let (ok, out) = Grpcurl::plaintext().args(&[&addr, "list"]).await;
    assert!(!ok, "{out}");
}

/// Serves `neuron` over TLS (HTTP/1.1 and h2 by ALPN) with `cert`.
async fn serve_neuron_over_tls(neuron: &allot_fake_neuron::FakeNeuron, cert: &CertFiles) -> String {
    let config = allot_agent::tls::listener_config(&cert.cert, &cert.key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let router = neuron.router();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, router) = (
                tokio_rustls::TlsAcceptor::from(config.clone()),
                router.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_neuron_is_reached_and_verified_against_upstream_ca() {
    let mut stack = Stack::start().await;
    let pki = TestPki::new(&stack.dir.0.join("neuron-certs"));
    let neuron = allot_fake_neuron::FakeNeuron::new(allot_fake_neuron::FakeConfig {
        models: vec![MODEL.into()],
        neuron_id: "neuron-1".into(),
        ..Default::default()
    });
    let url = serve_neuron_over_tls(&neuron, &pki.node()).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    // Without the neuron's CA the agent refuses the upstream's certificate.
    stack.agent.take().unwrap().stop().await;
    stack.agent_config.neuron_url = url.clone();
    stack.restart_agent().await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert!(response.status().is_server_error(), "{}", response.status());
    assert_eq!(neuron.hits(), 0);
    // With it, the request goes through over TLS.
    stack.agent.take().unwrap().stop().await;
    stack.agent_config.upstream_ca = Some(pki.ca_path());
    stack.restart_agent().await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(neuron.hits(), 1);
}

/// Runs a binary with `args`; its exit code and stderr.
async fn run_binary(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let binary = allot_e2e::process::binary(name);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(binary)
            .args(&args)
            .env_remove("ALLOT_CONFIG")
            .env_remove("ALLOT_AGENT_CONFIG")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_whose_scheme_cannot_be_honoured_is_a_start_up_error_naming_the_field() {
    let dir = TempDir::new("scheme");
    let data = dir.0.join("c.redb").display().to_string();
    // A coordinator without certificates and without --insecure.
    let (code, err) = run_binary(
        "allot-coordinator",
        &[
            "--admin-token",
            ADMIN_TOKEN,
            "--data-path",
            &data,
            "--metrics-listen",
            "off",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls_cert"), "{err}");
    // Certificate files that cannot be read, named before any port is bound.
    let missing = dir.0.join("missing.pem").display().to_string();
    let (code, err) = run_binary(
        "allot-coordinator",
        &[
            "--admin-token",
            ADMIN_TOKEN,
            "--data-path",
            &data,
            "--metrics-listen",
            "off",
            "--tls-cert",
            &missing,
            "--tls-key",
            &missing,
            "--tls-client-ca",
            &missing,
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls_cert: cannot read"), "{err}");
    // An agent told to speak plaintext to its coordinator.
    let spool = dir.0.join("spool").display().to_string();
    let (code, err) = run_binary(
        "allot-agent",
        &[
            "--coordinators",
            "http://127.0.0.1:1",
            "--spool-dir",
            &spool,
            "--metrics-listen",
            "off",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("coordinators[0]"), "{err}");
    // https:// without the files to speak it.
    let (code, err) = run_binary(
        "allot-agent",
        &[
            "--coordinators",
            "https://127.0.0.1:1",
            "--spool-dir",
            &spool,
            "--metrics-listen",
            "off",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("coordinator_ca"), "{err}");
    // etcd and PostgreSQL, checked by the same validation.
    let tls_files = |config: &mut allot_coordinator::config::CoordinatorConfig| {
        config.tls_cert = Some("node.pem".into());
        config.tls_key = Some("node.key".into());
        config.tls_client_ca = Some("ca.pem".into());
    };
    let mut etcd = allot_coordinator::config::CoordinatorConfig {
        admin_token: ADMIN_TOKEN.into(),
        store: allot_coordinator::config::StoreKind::Etcd,
        etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
        ..Default::default()
    };
    tls_files(&mut etcd);
    assert!(etcd
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("etcd_endpoints[0]"));
    etcd.etcd_endpoints = vec!["https://127.0.0.1:2379".into()];
    assert!(etcd
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("etcd_endpoints[0]"));
    etcd.etcd_ca = Some("ca.pem".into());
    etcd.validate().unwrap();
    etcd.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
    assert!(etcd
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("etcd_endpoints[0]"));
    let mut postgres = allot_coordinator::config::CoordinatorConfig {
        admin_token: ADMIN_TOKEN.into(),
        usage_postgres_url: Some("postgres://allot@db/allot".into()),
        ..Default::default()
    };
    tls_files(&mut postgres);
    assert!(postgres
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("usage_postgres_url"));
    postgres.usage_postgres_url = Some("postgres://allot@db/allot?sslmode=verify-full".into());
    postgres.validate().unwrap();
}

/// The leaf certificate a fresh TLS connection to `addr` is shown.
async fn served_certificate(pki: &TestPki, addr: SocketAddr) -> Vec<u8> {
    pki.served_certificate(addr)
        .await
        .expect("a TLS handshake with the coordinator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_coordinator_certificate_is_served_to_new_connections_while_sessions_continue() {
    let coordinator = TlsCoordinator::start().await;
    let before = served_certificate(&coordinator.pki, coordinator.addr).await;
    // A session open across the renewal.
    let agent = coordinator.pki.agent("agent-r");
    let channel = coordinator
        .pki
        .endpoint(&coordinator.url, Some(&agent))
        .connect()
        .await
        .unwrap();
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            agent_id: "agent-r".into(),
            epoch: 1,
            neuron_id: "neuron-1".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = inbound.message().await.unwrap().unwrap();
    assert!(matches!(welcome.msg, Some(CoordMsg::Welcome(_))));
    // The files are replaced on disk (a new key too); nothing is signalled.
    coordinator.pki.node();
    let (pki, addr, old) = (&coordinator.pki, coordinator.addr, &before);
    wait_until(
        "new connections to see the renewed certificate",
        Duration::from_secs(20),
        || async move { served_certificate(pki, addr).await != *old },
    )
    .await;
    let after = served_certificate(pki, addr).await;
    assert_ne!(after, before);
    // The session made before the renewal still answers.
    tx.send(pb::AgentMessage {
        msg: Some(AgentMsg::KeyLookup(pb::KeyLookup {
            key_hash: Sha256::digest(coordinator.secret.as_bytes()).to_vec(),
        })),
    })
    .await
    .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = inbound.message().await.unwrap() {
            if let Some(CoordMsg::Key(result)) = message.msg {
                return result.key.is_some();
            }
        }
        false
    })
    .await
    .expect("the old session answers");
    assert!(answered);
    // A file that is not a certificate is not taken: new connections keep
    // the last good one.
    std::fs::write(coordinator.pki.dir.join("node.pem"), "not a certificate").unwrap();
    std::fs::write(coordinator.pki.dir.join("node.key"), "not a key").unwrap();
    let renewed = after.clone();
    for _ in 0..5 {
        assert_eq!(
            served_certificate(&coordinator.pki, coordinator.addr).await,
            renewed
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_reaches_etcd_over_tls_with_a_client_certificate() {
    let dir = TempDir::new("etcd-tls");
    let pki = TestPki::new(&dir.0.join("certs"));
    let cluster = allot_e2e::etcd::EtcdCluster::start_tls(&pki).await;
    let tls = cluster.tls().unwrap().clone();
    // This etcd speaks TLS only and wants a client certificate.
    let short = || {
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2))
    };
    let without_certificate = short().with_tls(etcd_client::TlsOptions::new().ca_certificate(
        etcd_client::Certificate::from_pem(std::fs::read(&tls.ca).unwrap()),
    ));
    let plaintext: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.replace("https://", "http://"))
        .collect();
    for (endpoints, options) in [
        (cluster.endpoints(), without_certificate),
        (plaintext, short()),
    ] {
        let put = tokio::time::timeout(Duration::from_secs(10), async {
            let mut client = etcd_client::Client::connect(endpoints, Some(options)).await?;
            client.put("/probe", "x", None).await
        })
        .await;
        assert!(
            !matches!(put, Ok(Ok(_))),
            "etcd took a put without TLS and a certificate"
        );
    }
    let config = allot_coordinator::config::CoordinatorConfig {
        store: allot_coordinator::config::StoreKind::Etcd,
        etcd_endpoints: cluster.endpoints(),
        etcd_ca: Some(tls.ca.clone()),
        etcd_cert: Some(tls.client.cert.clone()),
        etcd_key: Some(tls.client.key.clone()),
        ..Stack::tls_coordinator_config(&dir, &pki)
    };
    let mut stack = Stack::start_tls_with(dir, pki, config).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert_eq!(response.status(), 200);
    wait_until(
        "the usage to settle in etcd",
        Duration::from_secs(20),
        || async { stack.settled_records().await >= 1 },
    )
    .await;
    assert!(stack.key_usage(&key_id, pb::Unit::Tokens).await.0 > 0);
    let stored = cluster
        .client()
        .await
        .get(
            "/allot/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert!(stored > 0, "the ledger is in the TLS etcd");
    stack.etcd = Some(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_rows_reach_postgresql_over_tls_with_sslmode_verify_full() {
    let dir = TempDir::new("pg-tls");
    let pki = TestPki::new(&dir.0.join("certs"));
    // This server refuses plaintext connections (pg_hba.conf: hostssl only).
    let pg = allot_e2e::postgres::Postgres::start_tls(&pki.node());
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        pki.ca_path().display()
    );
    let config = allot_coordinator::config::CoordinatorConfig {
        usage_postgres_url: Some(url),
        ..Stack::tls_coordinator_config(&dir, &pki)
    };
    let stack = Stack::start_tls_with(dir, pki, config).await;
    let (key_id, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert_eq!(response.status(), 200);
    wait_until(
        "the usage row in PostgreSQL",
        Duration::from_secs(30),
        || async {
            stack
                .list_usage(pb::UsageFilter {
                    key_id: key_id.clone(),
                    ..Default::default()
                })
                .await
                .is_ok_and(|rows| rows.len() == 1)
        },
    )
    .await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_clients_https_when_given_a_certificate() {
    use http_body_util::BodyExt;
    let mut stack = Stack::start().await;
    let pki = TestPki::new(&stack.dir.0.join("agent-certs"));
    let server = pki.node();
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    stack.agent.take().unwrap().stop().await;
    let config = allot_agent::config::AgentConfig {
        listen_tls_cert: Some(server.cert.clone()),
        listen_tls_key: Some(server.key.clone()),
        ..stack.agent_config.clone()
    };
    let agent = start_agent(config).await;
    let roots = allot_coordinator::tls::read_roots("ca", &pki.ca_path()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(allot_coordinator::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let base = format!("https://{}", agent.addr);
    wait_until(
        "the agent to be ready over https",
        Duration::from_secs(30),
        || {
            let (client, url) = (client.clone(), format!("{base}/readyz"));
            async move {
                let request = http::Request::get(url).body(Default::default()).unwrap();
                client
                    .request(request)
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        },
    )
    .await;
    let request = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat_body(16).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await.unwrap();
    // Plaintext HTTP to the TLS listener gets no answer.
    let plain = stack
        .http
        .get(format!("http://{}/healthz", agent.addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(!plain.is_ok_and(|r| r.status() == 200));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_agent_certificate_is_used_at_the_next_connection_without_a_restart() {
    let mut stack = Stack::start_tls().await;
    let pki = stack.pki.take().unwrap();
    stack.agent.take().unwrap().stop().await;
    // The agent's certificate on disk has expired: it cannot connect.
    let expired = pki.expired_agent("agent-1");
    let current = pki.agent("agent-1");
    std::fs::copy(&expired.cert, &current.cert).unwrap();
    std::fs::copy(&expired.key, &current.key).unwrap();
    let agent = start_agent(stack.agent_config.clone()).await;
    let ready = format!("{}/readyz", agent.url);
    for _ in 0..10 {
        let status = stack.http.get(&ready).send().await.unwrap().status();
        assert_ne!(status, 200, "an expired certificate opened a session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A renewed certificate is written over it: the agent, not restarted,
    // connects with it.
    pki.agent("agent-1");
    wait_agent_ready(&agent.url, Duration::from_secs(30)).await;
    agent.stop().await;
    stack.pki = Some(pki);
}

/// Kills the child process when the test ends, failing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_a_coordinator_process_serve_its_renewed_certificate() {
    let dir = TempDir::new("sighup");
    let pki = TestPki::new(&dir.0.join("certs"));
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = |p: std::path::PathBuf| p.display().to_string();
    let log = std::fs::File::create(dir.0.join("coordinator.log")).unwrap();
    let child = std::process::Command::new(allot_e2e::process::binary("allot-coordinator"))
        .args(["--listen", &addr.to_string(), "--metrics-listen", "off"])
        .args(["--admin-token", ADMIN_TOKEN])
        .args(["--data-path", &path(dir.0.join("c.redb"))])
        .args(["--tls-cert", &path(pki.dir.join("node.pem"))])
        .args(["--tls-key", &path(pki.dir.join("node.key"))])
        .args(["--tls-client-ca", &path(pki.ca_path())])
        // No polling: only the signal reloads.
        .args(["--tls-reload-ms", "0"])
        .env_remove("ALLOT_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("allot-coordinator starts");
    let mut child = KillOnDrop(child);
    let pki = &pki;
    wait_until(
        "the coordinator to speak TLS",
        Duration::from_secs(30),
        || async move { pki.served_certificate(addr).await.is_some() },
    )
    .await;
    let before = served_certificate(pki, addr).await;
    pki.node();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let old = &before;
    wait_until(
        "the renewed certificate after SIGHUP",
        Duration::from_secs(20),
        || async move {
            pki.served_certificate(addr)
                .await
                .is_some_and(|c| c != *old)
        },
    )
    .await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the coordinator survives SIGHUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_authenticates_to_etcd_with_its_user_and_password() {
    let dir = TempDir::new("etcd-auth");
    let pki = TestPki::new(&dir.0.join("certs"));
    let cluster = allot_e2e::etcd::EtcdCluster::start_tls(&pki).await;
    let tls = cluster.tls().unwrap().clone();
    let mut client = cluster.client().await;
    client.role_add("root").await.unwrap();
    client
        .user_add("root", "root-password", None)
        .await
        .unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();
    // With authentication on, the client certificate alone (CN
    // "coordinator", no such user) may not write.
    let mut anonymous = cluster.client().await;
    assert!(anonymous.put("/probe", "x", None).await.is_err());
    let config = allot_coordinator::config::CoordinatorConfig {
        store: allot_coordinator::config::StoreKind::Etcd,
        etcd_endpoints: cluster.endpoints(),
        etcd_ca: Some(tls.ca.clone()),
        etcd_cert: Some(tls.client.cert.clone()),
        etcd_key: Some(tls.client.key.clone()),
        etcd_user: Some("root".into()),
        etcd_password: Some("root-password".into()),
        ..Stack::tls_coordinator_config(&dir, &pki)
    };
    let mut stack = Stack::start_tls_with(dir, pki, config).await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "100000", balance())])
        .await;
    let response = stack.chat(&secret, chat_body(16)).await;
    assert_eq!(response.status(), 200);
    wait_until(
        "the usage to settle in etcd",
        Duration::from_secs(20),
        || async { stack.settled_records().await >= 1 },
    )
    .await;
    stack.etcd = Some(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_over_tls_is_slowed_down_like_over_plaintext() {
    let coordinator = TlsCoordinator::start().await;
    let ca = &coordinator.pki.ca_path();
    let addr = coordinator.addr.to_string();
    let call = |token: &str| {
        Grpcurl::tls(ca)
            .token(token)
            .call(&addr, "allot.v1.Admin/ListAccounts", "{}")
    };
    // `auth_max_failures` (10) wrong tokens from one address...
    for _ in 0..10 {
        let (ok, out) = call("guessed-token").await;
        assert!(!ok && out.contains("Unauthenticated"), "{out}");
    }
    // ...and that address is slowed down, the right token included: the
    // gate sees the peer's address behind TLS too.
    let (ok, out) = call(ADMIN_TOKEN).await;
    assert!(!ok && out.contains("ResourceExhausted"), "{out}");
}
