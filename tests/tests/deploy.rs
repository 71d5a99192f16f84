//! The deployment examples stay valid: their configuration parses with the
//! services' own config types, their YAML parses, systemd units name the
//! real binaries, and the Grafana dashboard only queries metrics the code
//! emits.

use std::path::{Path, PathBuf};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn all_sources() -> String {
    let mut text = String::new();
    for dir in ["../agent/src", "../coordinator/src", "../src"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    text.push_str(&std::fs::read_to_string(path).unwrap());
                }
            }
        }
    }
    text
}

#[test]
fn the_systemd_configurations_parse_with_the_services_config_types() {
    let mut coordinator = allot_coordinator::config::CoordinatorConfig::from_file(&deploy(
        "systemd/coordinator.toml",
    ))
    .unwrap();
    // Operators come from operators.toml, never a token in the TOML.
    assert!(coordinator.admin_token.is_empty() && coordinator.operators.is_empty());
    assert_eq!(
        coordinator.operators_file.as_deref(),
        Some(Path::new("/etc/allot/operators.toml"))
    );
    coordinator.operators_file = Some(deploy("systemd/operators.toml"));
    coordinator.validate().unwrap();
    let agent = allot_agent::config::AgentConfig::from_file(&deploy("systemd/agent.toml")).unwrap();
    agent.validate().unwrap();
}

#[test]
fn the_systemd_units_run_the_real_binaries() {
    for (unit, binary) in [
        ("allot-coordinator.service", "allot-coordinator"),
        ("allot-agent.service", "allot-agent"),
    ] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{unit} lacks {section}");
        }
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        assert!(exec.contains(&format!("/{binary} ")), "{exec}");
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        {
            assert!(line.contains('='), "{unit}: not a key=value line: {line}");
        }
    }
}

#[test]
fn the_yaml_examples_parse_and_name_the_services() {
    for (file, must_contain) in [
        (
            "compose/docker-compose.yml",
            vec![
                "etcd-0",
                "etcd-1",
                "etcd-2",
                "coordinator-1",
                "coordinator-2",
                "agent",
                "jaeger",
                "prometheus",
            ],
        ),
        (
            "compose/prometheus.yml",
            vec!["allot-coordinator", "allot-agent"],
        ),
        (
            "kubernetes/agent-sidecar.yaml",
            vec!["allot-agent", "neuron"],
        ),
    ] {
        let path = deploy(file);
        let output = std::process::Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
                path.to_str().unwrap(),
            ])
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "{file} does not parse (PyYAML: python3 -m pip install pyyaml): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let text = json.to_string();
        for name in must_contain {
            assert!(text.contains(name), "{file} lacks {name}");
        }
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_code_emits() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/allot-dashboard.json")).unwrap(),
    )
    .unwrap();
    let sources = all_sources();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let expr = panel["targets"][0]["expr"].as_str().unwrap();
        let metric = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|word| word.starts_with("allot_"))
            .unwrap_or_else(|| panic!("no allot metric in {expr}"));
        assert!(
            sources.contains(&format!("\"{metric}\"")),
            "{metric} is not emitted by the code"
        );
    }
}
