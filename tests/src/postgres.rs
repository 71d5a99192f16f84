//! A real PostgreSQL server for tests: `initdb` into a temporary directory,
//! `pg_ctl start` on a free loopback port, stopped (and removed) on drop.
//! The binaries come from Debian's `postgresql` package
//! (`/usr/lib/postgresql/<version>/bin`, or the PATH). PostgreSQL refuses
//! to run as root, so as root the server runs as the `postgres` user that
//! the package creates.

use crate::process::free_port;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// Serves TLS only (`hostssl` in pg_hba.conf) with this certificate.
    tls: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        if let Some(newest) = versions.pop() {
            return newest;
        }
    }
    let found = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    match found {
        Some(path) => Path::new(&path).parent().unwrap().to_path_buf(),
        None => panic!(
            "PostgreSQL is not installed: run scripts/test as root, or apt-get install postgresql"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL program, as `postgres` when this process is root.
fn run(bin: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let path = bin.join(program);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A server that accepts only TLS connections (pg_hba.conf `hostssl`),
    /// with `server` as its certificate.
    pub fn start_tls(server: &crate::tls::CertFiles) -> Postgres {
        Postgres::start_with(Some(server))
    }

    fn start_with(tls: Option<&crate::tls::CertFiles>) -> Postgres {
        let bin = bin_dir();
        let dir =
            std::env::temp_dir().join(format!("allot-pg-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        if let Some(files) = tls {
            // PostgreSQL wants its key owned by its user and 0600 (kept by
            // the copy of a 0600 file, and by the chown below).
            std::fs::copy(&files.cert, dir.join("server.pem")).expect("copy the certificate");
            std::fs::copy(&files.key, dir.join("server.key")).expect("copy the key");
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "cannot chown {}", dir.display());
        }
        let data = dir.join("data");
        let out = run(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "allot",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls.is_some() {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: free_port(),
            tls: tls.is_some(),
        };
        pg.start_server();
        pg
    }

    fn start_server(&mut self) {
        let data = self.dir.join("data");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
                self.dir.display()
            ));
        }
        let log = self.dir.join("postgres.log");
        let out = run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://allot@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown), keeping its data.
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = run(
            &self.bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.start_server();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
