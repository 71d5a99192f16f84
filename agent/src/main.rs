//! `allot-agent`: parses configuration, validates it before binding
//! anything, then runs the library's proxy until SIGINT or SIGTERM.

use allot_agent::config::{self, ConfigError};
use allot_runtime::layered::{self, ArgsError};
use allot_runtime::telemetry;

/// Every request allocates and frees buffers on both worker threads;
/// glibc's allocator spent about a tenth of the agent's CPU on it under
/// load (BENCHMARKS.md). `no_thp`: with transparent huge pages its arenas
/// kept the agent at 91 MiB with 1,000 open streams, 52 MiB without.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = layered::process_environment();
    let loaded = config::parse(&config::command(), std::env::args_os(), &env)
        .map_err(ConfigError::from)
        .and_then(|layers| config::load(&layers));
    let config = match loaded {
        Ok(config) => config,
        Err(ConfigError::Args(ArgsError::Flags(error))) => error.exit(),
        Err(error) => exit_with(&error),
    };
    if let Err(error) = allot_agent::tls::check_files(&config) {
        exit_with(&error);
    }
    let telemetry = telemetry::init(config.log_format, "allot-agent");
    if let Some(addr) = config.metrics_listen {
        telemetry::install_metrics(addr)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = allot_agent::run(config, listener, allot_runtime::signal::shutdown()).await;
    telemetry.shutdown();
    result
}

/// A configuration that cannot start: its message on stderr, status 2.
fn exit_with(error: &dyn std::fmt::Display) -> ! {
    eprintln!("allot-agent: {error}");
    std::process::exit(2);
}
