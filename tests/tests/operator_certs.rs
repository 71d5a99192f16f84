//! Operators who authenticate with a client certificate instead of a
//! token: the operators file maps a certificate's URI SAN
//! (`spiffe://allot/operator/<name>`, what `certs client` makes) to a
//! credential with scopes. Real TLS and real grpcurl (`-cacert -cert
//! -key`), against an in-process coordinator; certificates made with
//! rcgen.

use allot::pb;
use allot_e2e::grpcurl::Grpcurl;
use allot_e2e::tls::{CertFiles, TestPki};
use allot_e2e::*;
use std::path::Path;
use std::time::Duration;

const ALICE_URI: &str = "spiffe://allot/operator/alice";
const BILL_URI: &str = "spiffe://allot/operator/bill";
const BOB_URI: &str = "spiffe://allot/operator/bob";

/// Writes an operators file mapping each (name, URI, scope); aside and
/// renamed, so that the coordinator never reads half a file.
fn write_mappings(path: &Path, mappings: &[(&str, &str, &str)]) {
    let mut text = String::new();
    for (name, uri, scope) in mappings {
        text.push_str(&format!(
            "[[operator]]\nname = \"{name}\"\nclient_certificate = \"{uri}\"\nscopes = [\"{scope}\"]\n\n"
        ));
    }
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A TLS coordinator whose operators file maps certificates, with the
/// legacy admin token for the test's own checks, and an account `acme`.
struct CertCoordinator {
    addr: String,
    url: String,
    pki: TestPki,
    operators_file: std::path::PathBuf,
    _task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: TempDir,
}

impl CertCoordinator {
    async fn start(label: &str, mappings: &[(&str, &str, &str)], max_failures: u32) -> Self {
        let dir = TempDir::new(label);
        let pki = TestPki::new(&dir.0.join("certs"));
        let operators_file = dir.0.join("operators.toml");
        write_mappings(&operators_file, mappings);
        let config = allot_coordinator::config::CoordinatorConfig {
            operators_file: Some(operators_file.clone()),
            operators_reload_ms: 100,
            auth_max_failures: max_failures,
            ..Stack::tls_coordinator_config(&dir, &pki)
        };
        let (addr, task) = start_coordinator(config).await;
        let url = format!("https://{addr}");
        pki.wait_for_coordinator(&url).await;
        let coordinator = CertCoordinator {
            addr: addr.to_string(),
            url,
            pki,
            operators_file,
            _task: task,
            _dir: dir,
        };
        coordinator
            .admin()
            .await
            .create_account(authed(pb::CreateAccountRequest {
                account_id: "acme".into(),
                name: "ACME".into(),
            }))
            .await
            .unwrap();
        coordinator
    }

    /// An Admin client over TLS without a client certificate (calls carry
    /// the admin token with `authed`).
    async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        pb::admin_client::AdminClient::new(self.pki.channel(&self.url).await.unwrap())
    }

    /// Every audit entry, newest first.
    async fn audit(&self) -> Vec<pb::AuditEntry> {
        self.admin()
            .await
            .list_audit(authed(pb::ListAuditRequest {
                page_size: 1000,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    /// grpcurl `method` with `-cacert` and the certificate `identity`,
    /// the JSON `data` and, if given, a bearer token: whether it
    /// succeeded, and its output.
    async fn grpcurl(
        &self,
        identity: &CertFiles,
        token: Option<&str>,
        data: &str,
        method: &str,
    ) -> (bool, String) {
        let mut grpcurl = Grpcurl::tls(&self.pki.ca_path()).cert(identity);
        if let Some(token) = token {
            grpcurl = grpcurl.token(token);
        }
        grpcurl.call(&self.addr, method, data).await
    }
}

const CREDIT: &str = r#"{"account_id": "acme", "amount": "5", "source_id": "invoice-9"}"#;
const CREATE_INTRUDER: &str = r#"{"account_id": "intruder", "name": "x"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_an_operator_certificate_acts_within_its_scopes_and_is_audited_as_by_certificate(
) {
    let coordinator = CertCoordinator::start(
        "opcert-scopes",
        &[("alice", ALICE_URI, "read"), ("bill", BILL_URI, "billing")],
        10,
    )
    .await;
    let (alice, bill) = (
        coordinator.pki.client("alice"),
        coordinator.pki.client("bill"),
    );
    let before = coordinator.audit().await;

    let (ok, out) = coordinator
        .grpcurl(&alice, None, "{}", "allot.v1.Admin/ListAccounts")
        .await;
    assert!(ok && out.contains("acme"), "{out}");
    let (ok, out) = coordinator
        .grpcurl(&alice, None, CREDIT, "allot.v1.Admin/Credit")
        .await;
    assert!(
        !ok && out.contains("PermissionDenied")
            && out.contains(
                "allot.v1.Admin/Credit: needs scope billing or admin; operator \"alice\" has read"
            ),
        "{out}"
    );

    let (ok, out) = coordinator
        .grpcurl(&bill, None, CREDIT, "allot.v1.Admin/Credit")
        .await;
    assert!(ok, "{out}");
    let credited = coordinator
        .admin()
        .await
        .get_account(authed(pb::GetAccountRequest {
            account_id: "acme".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .credited;
    assert_eq!(credited, "5", "the credit was applied");

    let after = coordinator.audit().await;
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one entry for the credit, none for the denied call"
    );
    let entry = &after[0];
    assert_eq!(
        (
            entry.operator.as_str(),
            entry.method.as_str(),
            entry.via.as_str(),
            entry.certificate_uri.as_str()
        ),
        ("bill", "Credit", "certificate", BILL_URI)
    );
    let pem = std::fs::read_to_string(&bill.cert).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !entry.change.contains(&body[..40]),
        "never the certificate itself: {}",
        entry.change
    );
    assert_eq!(
        (
            before[0].operator.as_str(),
            before[0].via.as_str(),
            before[0].certificate_uri.as_str()
        ),
        ("admin", "token", ""),
        "an entry by token says so"
    );
    // The operator with scope read reads the log with grpcurl too.
    let (ok, out) = coordinator
        .grpcurl(
            &alice,
            None,
            r#"{"method": "Credit"}"#,
            "allot.v1.Admin/ListAudit",
        )
        .await;
    assert!(
        ok && out.contains(r#""via": "certificate""#) && out.contains(BILL_URI),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_unmapped_and_foreign_certificates_are_refused_and_audit_nothing() {
    let coordinator =
        CertCoordinator::start("opcert-refused", &[("alice", ALICE_URI, "admin")], 4).await;
    let alice = coordinator.pki.client("alice");
    let agent = coordinator.pki.agent("agent-1");
    let mallory = coordinator.pki.client("mallory");
    let elsewhere = TempDir::new("opcert-other-ca");
    let foreign_alice = TestPki::new(&elsewhere.0).client("alice");
    let before = coordinator.audit().await;

    // An agent's certificate is never an operator, and a file cannot
    // make it one: the mapping is refused at load.
    let (ok, out) = coordinator
        .grpcurl(
            &agent,
            None,
            CREATE_INTRUDER,
            "allot.v1.Admin/CreateAccount",
        )
        .await;
    assert!(
        !ok && out.contains("Unauthenticated") && out.contains("never an operator"),
        "{out}"
    );
    let agent_file = coordinator
        .operators_file
        .with_file_name("agent-mapping.toml");
    write_mappings(
        &agent_file,
        &[("agent", "spiffe://allot/agent/agent-1", "admin")],
    );
    let refused = allot_coordinator::operators::CredentialSources {
        admin_token: String::new(),
        inline: Vec::new(),
        file: Some(agent_file),
    }
    .load()
    .unwrap_err()
    .to_string();
    assert!(
        refused.starts_with("operators_file[0].client_certificate")
            && refused.contains("never an operator"),
        "{refused}"
    );

    // A certificate of our CA that no credential maps.
    let (ok, out) = coordinator
        .grpcurl(
            &mallory,
            None,
            CREATE_INTRUDER,
            "allot.v1.Admin/CreateAccount",
        )
        .await;
    assert!(
        !ok && out.contains("Unauthenticated")
            && out.contains("\"spiffe://allot/operator/mallory\" is not an operator"),
        "{out}"
    );

    // The right URI from another CA fails at the handshake.
    let (ok, out) = coordinator
        .grpcurl(
            &foreign_alice,
            None,
            CREATE_INTRUDER,
            "allot.v1.Admin/CreateAccount",
        )
        .await;
    assert!(!ok && !out.contains("Unauthenticated"), "{out}");

    // A mapped certificate and a token: refused, naming both.
    let (ok, out) = coordinator
        .grpcurl(
            &alice,
            Some(ADMIN_TOKEN),
            CREATE_INTRUDER,
            "allot.v1.Admin/CreateAccount",
        )
        .await;
    assert!(
        !ok && out.contains("Unauthenticated")
            && out.contains("operator \"alice\" and the bearer token is operator \"admin\""),
        "{out}"
    );

    assert_eq!(
        coordinator.audit().await,
        before,
        "no refused call is audited"
    );
    let intruder = coordinator
        .admin()
        .await
        .get_account(authed(pb::GetAccountRequest {
            account_id: "intruder".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(intruder.code(), tonic::Code::NotFound);

    // Failed certificates count like failed tokens: after four, even
    // alice's certificate is refused from this address for now.
    for _ in 0..4 {
        let (ok, _) = coordinator
            .grpcurl(&mallory, None, "{}", "allot.v1.Admin/ListAccounts")
            .await;
        assert!(!ok);
    }
    let (ok, out) = coordinator
        .grpcurl(&alice, None, "{}", "allot.v1.Admin/ListAccounts")
        .await;
    assert!(!ok && out.contains("ResourceExhausted"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_mapping_added_to_the_file_works_and_a_removed_one_stops_without_a_restart() {
    let coordinator =
        CertCoordinator::start("opcert-reload", &[("alice", ALICE_URI, "read")], 0).await;
    let (alice, bob) = (
        coordinator.pki.client("alice"),
        coordinator.pki.client("bob"),
    );
    let works = |identity: CertFiles| {
        let coordinator = &coordinator;
        async move {
            coordinator
                .grpcurl(&identity, None, "{}", "allot.v1.Admin/ListAccounts")
                .await
        }
    };
    let (ok, out) = works(alice.clone()).await;
    assert!(ok, "{out}");
    let (ok, out) = works(bob.clone()).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    write_mappings(
        &coordinator.operators_file,
        &[("alice", ALICE_URI, "read"), ("bob", BOB_URI, "read")],
    );
    wait_until("bob's new mapping to work", Duration::from_secs(10), || {
        let bob = bob.clone();
        async { works(bob).await.0 }
    })
    .await;

    write_mappings(&coordinator.operators_file, &[("bob", BOB_URI, "read")]);
    wait_until(
        "alice's removed mapping to stop working",
        Duration::from_secs(10),
        || {
            let alice = alice.clone();
            async {
                let (ok, out) = works(alice).await;
                !ok && out.contains("Unauthenticated")
            }
        },
    )
    .await;
    let (ok, out) = works(bob).await;
    assert!(ok, "{out}");
}
