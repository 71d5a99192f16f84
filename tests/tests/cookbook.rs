//! The grpcurl cookbook (docs/admin-cookbook.md), run line by line as written against a
//! real coordinator speaking TLS (only the address and the CA file differ),
//! with its outputs checked.

use allot_e2e::*;
use std::time::Duration;

const TOKEN: &str = "quickstart-admin-token";

fn cookbook() -> Vec<String> {
    let cookbook = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/admin-cookbook.md"
    ))
    .unwrap();
    let section = cookbook
        .split("## Admin API with grpcurl")
        .nth(1)
        .expect("the cookbook section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_the_grpcurl_cookbook_works_as_written() {
    let dir = TempDir::new("cookbook");
    let pki = allot_e2e::tls::TestPki::new(&dir.0.join("certs"));
    let (addr, _coordinator) = start_coordinator(allot_coordinator::config::CoordinatorConfig {
        admin_token: TOKEN.into(),
        ..Stack::tls_coordinator_config(&dir, &pki)
    })
    .await;
    let lines = cookbook();
    assert!(
        lines[0].contains("CA=allot-data/quickstart/certs/ca.pem"),
        "{}",
        lines[0]
    );
    let setup = lines[0]
        .replace("127.0.0.1:50051", &addr.to_string())
        .replace(
            "allot-data/quickstart/certs/ca.pem",
            &pki.ca_path().display().to_string(),
        );
    assert!(
        setup.starts_with(
            "export ALLOT_ADMIN_TOKEN=quickstart-admin-token; T='authorization: Bearer ${ALLOT_ADMIN_TOKEN}'"
        ),
        "{setup}"
    );
    let commands: Vec<&String> = lines
        .iter()
        .skip(1)
        .filter(|l| l.starts_with("grpcurl "))
        .collect();
    assert!(commands.len() >= 15, "every Admin call is in the cookbook");
    for rpc in [
        "CreateAccount",
        "GetAccount",
        "ListAccounts",
        "Credit",
        "CreateKey",
        "ListKeys",
        "RevokeKey",
        "SetLimits",
        "GetSnapshot",
        "PutTariff",
        "ListTariffs",
        "ListAgents",
        "ListUsage",
        "UsageSummary",
        "CheckUsage",
        "ListAudit",
    ] {
        assert!(
            commands
                .iter()
                .any(|c| c.ends_with(&format!("allot.v1.Admin/{rpc}"))),
            "{rpc} is missing"
        );
    }
    let health = format!("{setup}\n{}", commands[0]);
    wait_until(
        "the coordinator to answer health checks",
        Duration::from_secs(20),
        || {
            let health = health.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    std::process::Command::new("bash")
                        .args(["-c", &health])
                        .output()
                        .is_ok_and(|o| {
                            o.status.success()
                                && String::from_utf8_lossy(&o.stdout).contains("SERVING")
                        })
                })
                .await
                .unwrap()
            }
        },
    )
    .await;
    let mut outputs = Vec::new();
    for command in &commands {
        let script = format!("{setup}\n{command}");
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("bash")
                .args(["-c", &script])
                .output()
                .expect("bash runs")
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "{command}\nfailed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push((
            command.to_string(),
            String::from_utf8_lossy(&output.stdout).to_string(),
        ));
    }
    let output_of = |rpc: &str| {
        outputs
            .iter()
            .filter(|(c, _)| c.ends_with(rpc))
            .map(|(_, o)| o.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(output_of("/CreateKey").contains("\"secret\": \"sk-allot-"));
    assert!(
        output_of("/Credit").contains("\"credited\": \"45\""),
        "{}",
        output_of("/Credit")
    );
    assert!(output_of("/GetSnapshot").contains("\"remaining\""));
    assert!(output_of("/ListTariffs").contains("\"completionWindow\": \"24h\""));
    assert!(output_of("/RevokeKey").contains("\"revoked\": true"));
    assert!(output_of("/CheckUsage").contains("\"agrees\": true"));
    let audit = output_of("/ListAudit");
    assert!(
        audit.contains("\"method\": \"RevokeKey\"") && audit.contains("\"operator\": \"admin\""),
        "{audit}"
    );
    for command in &commands {
        assert!(
            !command.contains(TOKEN),
            "no grpcurl command line holds the token: {command}"
        );
    }
}
