//! Coordinators as real processes, for the tests that `kill -9` or
//! `SIGSTOP` them. The binary comes from `cargo build --workspace --bins`
//! (scripts/test runs it before the tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A workspace binary from `target/<profile>/`: next to the running
/// executable (a bench binary) or one level up (a test in `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|path| path.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing: run `cargo build --workspace --bins` (with --release for the \
                 benchmarks) first (scripts/test does)",
                candidates[0].display()
            )
        })
}

pub struct CoordinatorProcess {
    pub node_id: String,
    pub addr: SocketAddr,
    pub url: String,
    child: Option<Child>,
}

impl CoordinatorProcess {
    /// Starts `allot-coordinator` on etcd with `extra` flags.
    pub fn spawn(
        node_id: &str,
        etcd_endpoints: &[String],
        log_dir: &std::path::Path,
        extra: &[&str],
    ) -> CoordinatorProcess {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let log = std::fs::File::create(log_dir.join(format!("{node_id}.log"))).expect("log file");
        let child = Command::new(binary("allot-coordinator"))
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", "off"])
            // In the environment: a flag would show in the process list.
            .env("ALLOT_ADMIN_TOKEN", crate::ADMIN_TOKEN)
            .arg("--insecure")
            .args(["--store", "etcd"])
            .args(["--etcd-endpoints", &etcd_endpoints.join(",")])
            .args(["--node-id", node_id])
            .args(extra)
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("allot-coordinator starts");
        CoordinatorProcess {
            node_id: node_id.to_string(),
            addr,
            url: format!("http://{addr}"),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -HUP`: reload the operators file.
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// `kill -TERM`: a graceful stop.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits (polling) until the process has exited; its status, or `None`
    /// if it still runs after `deadline`.
    pub fn wait_exit(&mut self, deadline: std::time::Duration) -> Option<ExitStatus> {
        let status = wait_exit(self.child.as_mut()?, deadline)?;
        self.child = None;
        Some(status)
    }
}

fn wait_exit(child: &mut Child, deadline: std::time::Duration) -> Option<ExitStatus> {
    let end = std::time::Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= end {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Any allot binary as a child process, killed on drop.
pub struct ServiceProcess {
    child: Option<Child>,
    pub log: std::path::PathBuf,
}

impl ServiceProcess {
    /// Starts `name` with `args` and extra environment `envs`; stderr goes
    /// to `log`.
    pub fn spawn(
        name: &str,
        args: &[String],
        envs: &[(&str, String)],
        log: std::path::PathBuf,
    ) -> ServiceProcess {
        ServiceProcess::spawn_binary(&binary(name), args, envs, log)
    }

    /// [`ServiceProcess::spawn`] of the binary at `path`.
    pub fn spawn_binary(
        path: &std::path::Path,
        args: &[String],
        envs: &[(&str, String)],
        log: std::path::PathBuf,
    ) -> ServiceProcess {
        let name = path.display();
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(path);
        command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        for (key, value) in envs {
            command.env(key, value);
        }
        ServiceProcess {
            child: Some(
                command
                    .spawn()
                    .unwrap_or_else(|e| panic!("{name} starts: {e}")),
            ),
            log,
        }
    }

    /// Sends SIGTERM and waits (polling) until the process has exited; its
    /// status, or `None` if it still runs after `deadline`.
    pub fn terminate_within(&mut self, deadline: std::time::Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = wait_exit(child, deadline)?;
        self.child = None;
        Some(status)
    }

    /// Stops it with SIGTERM (a graceful shutdown) and waits.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    free_addr().port()
}
