//! A real llama.cpp server for the tests: `python3 -m llama_cpp.server`
//! (llama-cpp-python, installed by scripts/test) serving a tiny model that
//! `tests/python/tiny_gguf.py` writes at test time. The server runs as a
//! child process on a free loopback port and is killed on drop.
//!
//! It serves the one model file under two names, because llama-cpp-python
//! computes embeddings only with a model loaded for them:
//! [`LLAMA_MODEL`] for chat and legacy completions, [`LLAMA_EMBED_MODEL`]
//! for embeddings (the server swaps between them on demand; the model
//! loads in milliseconds).
//!
//! Python and its packages are required: a missing one fails the test with
//! the command that installs it, it never skips.

use crate::process::{free_port, ServiceProcess};
use crate::{wait_until, TempDir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The model name of chat and legacy completions.
pub const LLAMA_MODEL: &str = "tiny-llama";
/// The model name of embeddings.
pub const LLAMA_EMBED_MODEL: &str = "tiny-llama-embed";

/// The server's context window, in tokens.
pub const LLAMA_CONTEXT: u64 = 2048;

const INSTALL: &str = "the llama.cpp tests need python3 with llama-cpp-python[server] and gguf: \
     run tests/python/install_llama_server.sh (scripts/test does)";

/// A Python file of `tests/python/`.
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A running `llama_cpp.server`, killed on drop.
pub struct LlamaServer {
    /// Its base URL (`http://127.0.0.1:PORT`), without `/v1`.
    pub url: String,
    pub model_path: PathBuf,
    pub http: reqwest::Client,
    process: ServiceProcess,
    pub dir: TempDir,
}

impl LlamaServer {
    /// Writes the tiny model and starts the server on a free loopback
    /// port; returns once it answers `GET /v1/models`.
    pub async fn start() -> LlamaServer {
        let dir = TempDir::new("llama");
        let model_path = dir.0.join("tiny.gguf");
        let wrote = run_python(
            &[
                python_script("tiny_gguf.py").display().to_string(),
                model_path.display().to_string(),
            ],
            &[],
            Duration::from_secs(60),
        );
        assert!(
            wrote.success,
            "writing the tiny model failed ({INSTALL}):\n{wrote}"
        );

        let port = free_port();
        let model = |alias: &str, embedding: bool| {
            json!({
                "model": model_path,
                "model_alias": alias,
                "n_ctx": LLAMA_CONTEXT,
                "n_threads": 1,
                "n_threads_batch": 1,
                "embedding": embedding,
                "seed": 7,
                "verbose": false,
            })
        };
        let config = json!({
            "host": "127.0.0.1",
            "port": port,
            "models": [model(LLAMA_MODEL, false), model(LLAMA_EMBED_MODEL, true)],
        });
        let config_path = dir.0.join("server.json");
        std::fs::write(&config_path, config.to_string()).expect("server config");
        let process = ServiceProcess::spawn_binary(
            Path::new("python3"),
            &[
                "-m".into(),
                "llama_cpp.server".into(),
                "--config_file".into(),
                config_path.display().to_string(),
            ],
            &[],
            dir.0.join("server.log"),
        );
        let server = LlamaServer {
            url: format!("http://127.0.0.1:{port}"),
            model_path,
            http: reqwest::Client::new(),
            process,
            dir,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let url = format!("{}/v1/models", self.url);
        let log = self.process.log.clone();
        wait_until(
            "llama_cpp.server to answer GET /v1/models",
            Duration::from_secs(120),
            || {
                let (http, url, log) = (self.http.clone(), url.clone(), log.clone());
                async move {
                    if let Ok(response) = http.get(&url).send().await {
                        return response.status() == 200;
                    }
                    // A server that died will never answer: say why now.
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        !said.contains("No module named") && !said.contains("Traceback"),
                        "llama_cpp.server failed to start ({INSTALL}):\n{said}"
                    );
                    false
                }
            },
        )
        .await;
    }

    /// What the server logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// The tokens of `text` by the server's own tokenizer
    /// (`POST /extras/tokenize`), BOS included as the server adds it.
    pub async fn tokenize(&self, text: &str) -> Vec<u64> {
        let response = self
            .http
            .post(format!("{}/extras/tokenize", self.url))
            .json(&json!({"model": LLAMA_MODEL, "input": text}))
            .send()
            .await
            .expect("the server answers /extras/tokenize");
        assert_eq!(response.status(), 200, "tokenize {text:?}");
        let body: Value = response.json().await.expect("JSON");
        body["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("tokens in {body}"))
            .iter()
            .map(|t| t.as_u64().expect("token ids"))
            .collect()
    }

    /// `POST path` with `body` to the server directly.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("the server answers")
    }
}

/// What a Python program did.
pub struct PythonRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl std::fmt::Display for PythonRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` (success: {})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.success, self.stdout, self.stderr
        )
    }
}

/// Runs `python3 args...` with extra `envs`, killing it if it outlives
/// `deadline`; blocking (call it from `spawn_blocking` in async code).
pub fn run_python(args: &[String], envs: &[(&str, String)], deadline: Duration) -> PythonRun {
    let command_line = format!("python3 {}", args.join(" "));
    let dir = TempDir::new("python");
    let (out_path, err_path) = (dir.0.join("stdout"), dir.0.join("stderr"));
    let mut command = Command::new("python3");
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    // Every call here is on loopback.
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command_line}` ({INSTALL}): {e}"));
    let end = Instant::now() + deadline;
    let success = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.success(),
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{command_line}`: {e}"),
        }
    };
    PythonRun {
        success,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        command: command_line,
    }
}
