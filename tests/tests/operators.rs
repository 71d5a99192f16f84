//! Operators: named credentials with scopes, reloaded without a restart,
//! a peer that keeps failing slowed down, and the audit log of every
//! Admin mutation (with its author, in the commit of the change, kept
//! across a restart).

use allot::pb;
use allot_coordinator::config::CoordinatorConfig;
use allot_coordinator::operators::{token_sha256, OperatorCredential, Scope};
use allot_e2e::grpcurl::Grpcurl;
use allot_e2e::*;
use std::time::Duration;
use tonic::transport::Channel;

const READER: &str = "reader-token-0123456789";
const KEYS: &str = "keys-token-0123456789";
const BILLING: &str = "billing-token-0123456789";
const AGENTS: &str = "agents-token-0123456789";
const ROOT: &str = "root-token-0123456789";

fn credential(name: &str, token: &str, scopes: &[Scope]) -> OperatorCredential {
    OperatorCredential {
        name: name.into(),
        token_sha256: Some(token_sha256(token)),
        client_certificate: None,
        scopes: scopes.to_vec(),
    }
}

fn operators() -> Vec<OperatorCredential> {
    vec![
        credential("reader", READER, &[Scope::Read]),
        credential("keyman", KEYS, &[Scope::Keys]),
        credential("biller", BILLING, &[Scope::Billing]),
        credential("fleet", AGENTS, &[Scope::Agents]),
        credential("root", ROOT, &[Scope::Admin]),
    ]
}

fn config_in(dir: &TempDir) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        admin_token: ADMIN_TOKEN.into(),
        data_path: dir.0.join("coordinator.redb"),
        settle_window_ms: 1,
        operators: operators(),
        insecure: true,
        ..CoordinatorConfig::default()
    }
}

/// `message` with `authorization: Bearer <token>`.
fn as_operator<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// Calls `method` of Admin or Placement with a valid request for it.
async fn call(url: &str, method: &str, token: &str) -> Result<(), tonic::Status> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let mut placement = pb::placement_client::PlacementClient::new(channel);
    let limit = limit(pb::Unit::Tokens, "100", balance());
    match method {
        "CreateAccount" => admin
            .create_account(as_operator(
                token,
                pb::CreateAccountRequest {
                    account_id: format!("a-{}", token.len()),
                    name: String::new(),
                },
            ))
            .await
            .map(drop),
        "GetAccount" => admin
            .get_account(as_operator(
                token,
                pb::GetAccountRequest {
                    account_id: "acme".into(),
                },
            ))
            .await
            .map(drop),
        "ListAccounts" => admin
            .list_accounts(as_operator(token, pb::ListAccountsRequest::default()))
            .await
            .map(drop),
        "Credit" => admin
            .credit(as_operator(
                token,
                pb::CreditRequest {
                    account_id: "acme".into(),
                    amount: "1".into(),
                    source_id: format!("pay-{token}"),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "CreateKey" => admin
            .create_key(as_operator(
                token,
                pb::CreateKeyRequest {
                    account_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "ListKeys" => admin
            .list_keys(as_operator(token, pb::ListKeysRequest::default()))
            .await
            .map(drop),
        "RevokeKey" => admin
            .revoke_key(as_operator(
                token,
                pb::RevokeKeyRequest {
                    key_id: "k1".into(),
                },
            ))
            .await
            .map(drop),
        "SetLimits" => admin
            .set_limits(as_operator(
                token,
                pb::SetLimitsRequest {
                    scope: Some(pb::set_limits_request::Scope::AccountId("acme".into())),
                    limits: vec![limit],
                },
            ))
            .await
            .map(drop),
        "GetSnapshot" => admin
            .get_snapshot(as_operator(
                token,
                pb::GetSnapshotRequest {
                    key_id: "k1".into(),
                },
            ))
            .await
            .map(drop),
        "PutTariff" => admin
            .put_tariff(as_operator(
                token,
                pb::PutTariffRequest {
                    tariff: Some(pb::Tariff {
                        model: MODEL.into(),
                        purpose: pb::Purpose::Realtime as i32,
                        input_price: "0.1".into(),
                        output_price: "0.2".into(),
                        valid_from: Some(allot::clock::to_pb(0)),
                        ..Default::default()
                    }),
                },
            ))
            .await
            .map(drop),
        "ListTariffs" => admin
            .list_tariffs(as_operator(token, pb::ListTariffsRequest::default()))
            .await
            .map(drop),
        "ListAgents" => admin
            .list_agents(as_operator(token, pb::ListAgentsRequest::default()))
            .await
            .map(drop),
        "ListUsage" => admin
            .list_usage(as_operator(token, pb::ListUsageRequest::default()))
            .await
            .map(drop),
        "UsageSummary" => admin
            .usage_summary(as_operator(token, pb::UsageSummaryRequest::default()))
            .await
            .map(drop),
        "CheckUsage" => admin
            .check_usage(as_operator(
                token,
                pb::CheckUsageRequest {
                    key_id: "k1".into(),
                },
            ))
            .await
            .map(drop),
        "ListAudit" => admin
            .list_audit(as_operator(token, pb::ListAuditRequest::default()))
            .await
            .map(drop),
        "Route" => placement
            .route(as_operator(
                token,
                pb::RouteRequest {
                    model: MODEL.into(),
                },
            ))
            .await
            .map(drop),
        "Fleet" => placement
            .fleet(as_operator(token, pb::FleetRequest {}))
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    }
}

/// Each method and the scopes that allow it besides `admin`, as
/// docs/admin-cookbook.md states them.
const ALLOWED: &[(&str, &[&str])] = &[
    ("CreateAccount", &["billing"]),
    ("GetAccount", &["read"]),
    ("ListAccounts", &["read"]),
    ("Credit", &["billing"]),
    ("CreateKey", &["keys"]),
    ("ListKeys", &["read"]),
    ("RevokeKey", &["keys"]),
    ("SetLimits", &["billing"]),
    ("GetSnapshot", &["read"]),
    ("PutTariff", &["billing"]),
    ("ListTariffs", &["read"]),
    ("ListAgents", &["read", "agents"]),
    ("ListUsage", &["read"]),
    ("UsageSummary", &["read"]),
    ("CheckUsage", &["read"]),
    ("ListAudit", &["read"]),
    ("Route", &["read", "agents"]),
    ("Fleet", &["read", "agents"]),
];

fn service_of(method: &str) -> &'static str {
    if method == "Route" || method == "Fleet" {
        "allot.v1.Placement"
    } else {
        "allot.v1.Admin"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_allows_its_methods_and_every_other_call_is_permission_denied() {
    let dir = TempDir::new("scopes");
    let stack = Stack::start_with(config_in(&dir)).await;
    let (key_id, _) = {
        let mut admin = stack.admin().await;
        admin
            .create_account(authed(pb::CreateAccountRequest {
                account_id: "acme".into(),
                name: String::new(),
            }))
            .await
            .unwrap();
        let key = admin
            .create_key(authed(pb::CreateKeyRequest {
                account_id: "acme".into(),
                key_id: "k1".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        (key.key.unwrap().key_id, key.secret)
    };
    assert_eq!(key_id, "k1");
    let url = stack.coordinator_url.clone();
    for (scope, token) in [
        ("read", READER),
        ("keys", KEYS),
        ("billing", BILLING),
        ("agents", AGENTS),
        ("admin", ROOT),
        ("admin", ADMIN_TOKEN),
    ] {
        for (method, scopes) in ALLOWED {
            let result = call(&url, method, token).await;
            let allowed = scope == "admin" || scopes.contains(&scope);
            match result {
                Err(status) if !allowed => {
                    assert_eq!(
                        status.code(),
                        tonic::Code::PermissionDenied,
                        "{scope} calling {method}: {status:?}"
                    );
                    let message = status.message();
                    assert!(
                        message.contains(&format!("{}/{method}", service_of(method)))
                            && message.contains(&format!("needs scope {}", scopes.join(" or "))),
                        "the refusal names the method and the missing scope: {message}"
                    );
                }
                Ok(()) if !allowed => panic!("{scope} may not call {method}, yet it passed"),
                // Allowed: whatever the outcome, the gate let it through.
                Err(status) => assert!(
                    !matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ),
                    "{scope} calling {method}: {status:?}"
                ),
                Ok(()) => {}
            }
        }
    }
    for bad in ["", "not-a-token"] {
        let status = call(&url, "ListAccounts", bad).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let status = stack
        .admin()
        .await
        .list_accounts(pb::ListAccountsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_a_scoped_token_works_and_a_denied_call_names_the_missing_scope() {
    let dir = TempDir::new("grpcurl-scopes");
    let stack = Stack::start_with(config_in(&dir)).await;
    let addr = stack.coordinator_addr.to_string();
    let (ok, out) = Grpcurl::plaintext()
        .token(READER)
        .call(&addr, "allot.v1.Admin/ListAccounts", "{}")
        .await;
    assert!(ok, "{out}");
    let (ok, out) = Grpcurl::plaintext()
        .token(READER)
        .call(
            &addr,
            "allot.v1.Admin/Credit",
            r#"{"account_id": "acme", "amount": "1", "source_id": "s"}"#,
        )
        .await;
    assert!(
        !ok && out.contains("PermissionDenied")
            && out.contains("allot.v1.Admin/Credit: needs scope billing or admin"),
        "{out}"
    );
}

fn write_credentials(path: &std::path::Path, credentials: &[(&str, &str, &str)]) {
    let mut text = String::new();
    for (name, token, scope) in credentials {
        text.push_str(&format!(
            "[[operator]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nscopes = [\"{scope}\"]\n\n",
            token_sha256(token)
        ));
    }
    // Written aside and renamed, as an operator's tooling should: the
    // coordinator never reads half a file.
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_added_to_the_file_works_and_a_removed_one_stops_without_a_restart() {
    let dir = TempDir::new("reload");
    let file = dir.0.join("operators.toml");
    write_credentials(&file, &[("alice", "alice-token-0123456789", "read")]);
    let config = CoordinatorConfig {
        operators: Vec::new(),
        operators_file: Some(file.clone()),
        operators_reload_ms: 100,
        // The polls below fail on purpose until the reload happens.
        auth_max_failures: 0,
        ..config_in(&dir)
    };
    let stack = Stack::start_with(config).await;
    let url = stack.coordinator_url.clone();
    call(&url, "ListAccounts", "alice-token-0123456789")
        .await
        .unwrap();
    let bob = call(&url, "ListAccounts", "bob-token-0123456789")
        .await
        .unwrap_err();
    assert_eq!(bob.code(), tonic::Code::Unauthenticated);

    write_credentials(
        &file,
        &[
            ("alice", "alice-token-0123456789", "read"),
            ("bob", "bob-token-0123456789", "read"),
        ],
    );
    wait_until(
        "bob's new credential to work",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                call(&url, "ListAccounts", "bob-token-0123456789")
                    .await
                    .is_ok()
            }
        },
    )
    .await;

    write_credentials(&file, &[("bob", "bob-token-0123456789", "read")]);
    wait_until(
        "alice's removed credential to stop working",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                call(&url, "ListAccounts", "alice-token-0123456789")
                    .await
                    .is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
            }
        },
    )
    .await;
    call(&url, "ListAccounts", "bob-token-0123456789")
        .await
        .unwrap();
    // The legacy admin_token is untouched by the file.
    call(&url, "ListAccounts", ADMIN_TOKEN).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_credentials_file_at_once() {
    let cluster = allot_e2e::etcd::EtcdCluster::start(1).await;
    let dir = TempDir::new("sighup");
    let file = dir.0.join("operators.toml");
    write_credentials(&file, &[("alice", "alice-token-0123456789", "read")]);
    let coordinator = allot_e2e::process::CoordinatorProcess::spawn(
        "c1",
        &cluster.endpoints(),
        &dir.0,
        &[
            "--operators-file",
            file.to_str().unwrap(),
            // The next poll is an hour away: only SIGHUP can apply a change.
            "--operators-reload-ms",
            "3600000",
            "--auth-max-failures",
            "0",
        ],
    );
    let url = coordinator.url.clone();
    wait_until("the coordinator to lead", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            call(&url, "ListAccounts", "alice-token-0123456789")
                .await
                .is_ok()
        }
    })
    .await;
    write_credentials(
        &file,
        &[
            ("alice", "alice-token-0123456789", "read"),
            ("bob", "bob-token-0123456789", "read"),
        ],
    );
    coordinator.hangup();
    wait_until("bob's credential to work", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            call(&url, "ListAccounts", "bob-token-0123456789")
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_keeps_failing_authentication_is_slowed_down() {
    let dir = TempDir::new("throttle");
    let config = CoordinatorConfig {
        auth_max_failures: 3,
        auth_failure_window_ms: 60_000,
        ..config_in(&dir)
    };
    let stack = Stack::start_with(config).await;
    let url = stack.coordinator_url.clone();
    for _ in 0..3 {
        let status = call(&url, "ListAccounts", "guessed-token")
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    // Even the right token is refused from that address for now.
    let slowed = call(&url, "ListAccounts", READER).await.unwrap_err();
    assert_eq!(slowed.code(), tonic::Code::ResourceExhausted, "{slowed:?}");
    assert!(
        slowed.message().contains("retry in"),
        "{}",
        slowed.message()
    );
    let retry_after: u64 = slowed
        .metadata()
        .get("retry-after")
        .expect("a retry-after")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Another address is not slowed down.
    let other = Channel::from_shared(url.clone())
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    pb::admin_client::AdminClient::new(other)
        .list_accounts(as_operator(READER, pb::ListAccountsRequest::default()))
        .await
        .expect("another peer is served");
}

async fn list_audit(url: &str, request: pb::ListAuditRequest) -> Vec<pb::AuditEntry> {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap();
    admin
        .list_audit(as_operator(READER, request))
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// Every entry, read in pages of `page_size`.
async fn all_audit(url: &str, page_size: u32) -> Vec<pb::AuditEntry> {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap();
    let (mut entries, mut token) = (Vec::new(), String::new());
    loop {
        let page = admin
            .list_audit(as_operator(
                READER,
                pb::ListAuditRequest {
                    page_size,
                    page_token: token,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_mutation_is_audited_with_its_author_refusals_are_not_and_a_restart_keeps_them()
{
    let dir = TempDir::new("audit");
    let config = config_in(&dir);
    let mut stack = Stack::start_with(config.clone()).await;
    let url = stack.coordinator_url.clone();
    let mut admin = stack.admin().await;
    admin
        .create_account(as_operator(
            BILLING,
            pb::CreateAccountRequest {
                account_id: "acme".into(),
                name: "ACME".into(),
            },
        ))
        .await
        .unwrap();
    let credit = pb::CreditRequest {
        account_id: "acme".into(),
        amount: "50".into(),
        source_id: "invoice-1".into(),
        ..Default::default()
    };
    admin
        .credit(as_operator(BILLING, credit.clone()))
        .await
        .unwrap();
    let again = admin
        .credit(as_operator(BILLING, credit))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "a duplicate changes nothing");
    let created = admin
        .create_key(as_operator(
            KEYS,
            pb::CreateKeyRequest {
                account_id: "acme".into(),
                key_id: "k1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    admin
        .set_limits(as_operator(
            BILLING,
            pb::SetLimitsRequest {
                scope: Some(pb::set_limits_request::Scope::KeyId("k1".into())),
                limits: vec![limit(pb::Unit::Tokens, "1000", balance())],
            },
        ))
        .await
        .unwrap();
    stack
        .put_tariff(pb::Purpose::Realtime, "", "0.001", "0.002")
        .await;
    admin
        .revoke_key(as_operator(
            KEYS,
            pb::RevokeKeyRequest {
                key_id: "k1".into(),
            },
        ))
        .await
        .unwrap();

    // Refused calls: invalid input, outside the scope, nothing to change.
    let invalid = admin
        .credit(as_operator(
            BILLING,
            pb::CreditRequest {
                account_id: "acme".into(),
                amount: "-1".into(),
                source_id: "bad".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let denied = admin
        .create_key(as_operator(
            BILLING,
            pb::CreateKeyRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let missing = admin
        .revoke_key(as_operator(
            KEYS,
            pb::RevokeKeyRequest {
                key_id: "no-such-key".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let expected = [
        ("keyman", "RevokeKey"),
        ("admin", "PutTariff"),
        ("biller", "SetLimits"),
        ("keyman", "CreateKey"),
        ("biller", "Credit"),
        ("biller", "CreateAccount"),
    ];
    let check = |entries: &[pb::AuditEntry]| {
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.operator.as_str(), e.method.as_str()))
            .collect();
        assert_eq!(got, expected, "one entry per mutation, newest first");
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    };
    let entries = all_audit(&url, 0).await;
    check(&entries);
    let key_hash = token_sha256(&created.secret);
    for entry in &entries {
        let change: serde_json::Value = serde_json::from_str(&entry.change).unwrap();
        assert!(change.is_object(), "{}", entry.change);
        assert!(
            !entry.change.contains(&created.secret) && !entry.change.contains(&key_hash),
            "no secret and no key hash in the log: {}",
            entry.change
        );
        assert!(entry.at.is_some());
    }
    let credit_change: serde_json::Value = serde_json::from_str(&entries[4].change).unwrap();
    assert_eq!(credit_change["amount"], "50");
    assert_eq!(credit_change["source_id"], "invoice-1");
    assert_eq!(
        all_audit(&url, 4).await,
        entries,
        "pages hold every entry once"
    );

    // Filters.
    let by_keyman = list_audit(
        &url,
        pb::ListAuditRequest {
            operator: "keyman".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_keyman.len(), 2);
    let credits = list_audit(
        &url,
        pb::ListAuditRequest {
            method: "Credit".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(credits.len(), 1);
    let at = |e: &pb::AuditEntry| allot::clock::from_pb(e.at.as_ref().unwrap());
    let since_key = list_audit(
        &url,
        pb::ListAuditRequest {
            from_unix_ms: at(&entries[3]),
            ..Default::default()
        },
    )
    .await;
    assert!(since_key.len() >= 4 && since_key.iter().all(|e| at(e) >= at(&entries[3])));
    let before_all = list_audit(
        &url,
        pb::ListAuditRequest {
            to_unix_ms: at(&entries[5]),
            ..Default::default()
        },
    )
    .await;
    assert!(before_all.is_empty());

    // A restart keeps the log, and numbering goes on.
    drop(admin);
    stack.stop_coordinator().await;
    stack.start_coordinator_again(config).await;
    let after = all_audit(&url, 0).await;
    assert_eq!(after, entries);
    stack
        .admin()
        .await
        .create_account(as_operator(
            ROOT,
            pb::CreateAccountRequest {
                account_id: "later".into(),
                name: String::new(),
            },
        ))
        .await
        .unwrap();
    let newest = &all_audit(&url, 1).await[0];
    assert_eq!(
        (newest.operator.as_str(), newest.method.as_str()),
        ("root", "CreateAccount")
    );
    assert_eq!(newest.seq, entries[0].seq + 1);
}
