//! `allot-coordinator`: parses configuration, validates it before binding
//! anything, then runs the library's server until SIGINT or SIGTERM.

use allot_coordinator::certs::CertsError;
use allot_coordinator::config::{self, ConfigError};
use allot_runtime::layered::{self, ArgsError};
use allot_runtime::telemetry;
use clap::{FromArgMatches, Subcommand};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Makes a CA and certificates for coordinators, agents and operators.
    Certs {
        /// Directory of the files (ca.pem, ca.key, node.pem, ...).
        #[arg(long, default_value = "certs", global = true)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365, global = true)]
        days: u64,
        /// Replace files that exist.
        #[arg(long, global = true)]
        overwrite: bool,
        #[command(subcommand)]
        what: CertsCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum CertsCommand {
    /// A new CA: ca.pem and ca.key.
    Ca,
    /// A coordinator's server certificate for these host names and IPs.
    Node {
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// An agent's client certificate (URI SAN spiffe://allot/agent/<id>).
    Agent { agent_id: String },
    /// An operator's client certificate (grpcurl -cert/-key; URI SAN
    /// spiffe://allot/operator/<name>, for client_certificate in the
    /// operators file).
    Client { name: String },
}

fn certs(
    dir: &std::path::Path,
    days: u64,
    overwrite: bool,
    what: CertsCommand,
) -> Result<(), CertsError> {
    use allot_coordinator::certs::{self, Leaf, Validity};
    let validity = Validity::for_next(std::time::Duration::from_secs(days * 86_400));
    let (stem, pem) = match what {
        CertsCommand::Ca => ("ca".to_string(), certs::new_ca("allot CA", validity)?),
        CertsCommand::Node { hosts } => issue(dir, Leaf::Node { hosts }, validity)?,
        CertsCommand::Agent { agent_id } => issue(dir, Leaf::Agent { agent_id }, validity)?,
        CertsCommand::Client { name } => issue(dir, Leaf::Client { name }, validity)?,
    };
    let path = certs::write(dir, &stem, &pem, overwrite)?;
    println!("{}", path.display());
    Ok(())
}

fn issue(
    dir: &std::path::Path,
    leaf: allot_coordinator::certs::Leaf,
    validity: allot_coordinator::certs::Validity,
) -> Result<(String, allot_coordinator::certs::Pem), CertsError> {
    use allot_coordinator::certs;
    let ca = certs::read_ca(dir)?;
    Ok((certs::file_stem(&leaf), certs::issue(&ca, &leaf, validity)?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Command::augment_subcommands(config::command());
    let env = layered::process_environment();
    let layers = match config::parse(&command, std::env::args_os(), &env) {
        Ok(layers) => layers,
        Err(ArgsError::Flags(error)) => error.exit(),
        Err(error) => exit_with(&error),
    };
    if let Some(Command::Certs {
        dir,
        days,
        overwrite,
        what,
    }) = layers
        .flags
        .subcommand_name()
        .map(|_| Command::from_arg_matches(&layers.flags))
        .transpose()?
    {
        if let Err(error) = certs(&dir, days, overwrite, what) {
            eprintln!("allot-coordinator certs: {error}");
            std::process::exit(2);
        }
        return Ok(());
    }
    let config = match config::load(&layers) {
        Ok(config) => config,
        Err(ConfigError::Args(ArgsError::Flags(error))) => error.exit(),
        Err(error) => exit_with(&error),
    };
    if let Err(error) = config::check_tls_files(&config) {
        exit_with(&error);
    }
    let telemetry = telemetry::init(config.log_format, "allot-coordinator");
    if let Some(addr) = config.metrics_listen {
        telemetry::install_metrics(addr)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = allot_coordinator::run(config, listener, allot_runtime::signal::shutdown()).await;
    telemetry.shutdown();
    result
}

/// A configuration that cannot start: its message on stderr, status 2.
fn exit_with(error: &dyn std::fmt::Display) -> ! {
    eprintln!("allot-coordinator: {error}");
    std::process::exit(2);
}
