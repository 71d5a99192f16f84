//! The `allot-fake-neuron` binary: serves the fake OpenAI-compatible neuron for the demo.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;

use allot_fake_neuron::{FakeConfig, FakeNeuron, LimitRule};
use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A fake OpenAI-compatible inference server.
#[derive(Debug, Parser)]
#[command(name = "allot-fake-neuron", version, about)]
struct CommandLine {
    /// Address to listen on.
    #[arg(
        long,
        env = "ALLOT_FAKE_NEURON_LISTEN",
        default_value = "127.0.0.1:9100"
    )]
    listen: SocketAddr,
    /// Model to serve; repeat for several (default: fake-model).
    #[arg(long = "model")]
    models: Vec<String>,
    /// Identifier of this neuron.
    #[arg(long, default_value = "fake-neuron")]
    neuron_id: String,
    /// `MODEL=URL`: answer `GET /models/MODEL/endpoint` with `{"url": URL}`; repeatable.
    #[arg(long = "endpoint", value_name = "MODEL=URL", value_parser = parse_endpoint)]
    endpoints: Vec<(String, String)>,
    /// VRAM of a simulated GPU in bytes; repeat for several (default: one of 24 GiB).
    #[arg(long = "gpu-vram", value_name = "BYTES")]
    gpus: Vec<u64>,
    /// Behave as this server family documents: openai, vllm, llama_cpp,
    /// ollama or tgi (default: the OpenAI documents, owned_by fake-neuron).
    #[arg(long, env = "ALLOT_FAKE_NEURON_FAMILY")]
    family: Option<LimitRule>,
}

fn parse_endpoint(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((model, url)) if !model.is_empty() && !url.is_empty() => {
            Ok((model.to_string(), url.to_string()))
        }
        _ => anyhow::bail!("expected MODEL=URL, got `{text}`"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command_line = CommandLine::parse();
    // Logs go to stderr so stdout carries only the "listening" line scripts wait for.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = tokio::net::TcpListener::bind(command_line.listen)
        .await
        .with_context(|| format!("binding {}", command_line.listen))?;
    let bound_address = listener.local_addr().context("reading bound address")?;
    let neuron = FakeNeuron::new(FakeConfig {
        models: command_line.models,
        neuron_id: command_line.neuron_id,
        endpoints: command_line.endpoints.into_iter().collect(),
        gpus: command_line.gpus,
        family: command_line.family,
    });

    // Flushed at once: a piped stdout is block-buffered and scripts would never see it.
    println!("fake neuron listening on {bound_address}");
    std::io::stdout().flush().context("flushing stdout")?;
    tracing::info!(%bound_address, ?neuron, "serving");

    neuron
        .serve(listener, shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate_signal) => {
                terminate_signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
