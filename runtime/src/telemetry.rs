//! Logging, tracing and metrics set-up shared by the binaries:
//! - `tracing` logs on stderr, human-readable or JSON, levels from
//!   `RUST_LOG`;
//! - OpenTelemetry traces over OTLP/gRPC, configured only by the standard
//!   `OTEL_*` variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
//!   `OTEL_TRACES_SAMPLER`, ...). Export is off unless an endpoint is set
//!   (or `OTEL_TRACES_EXPORTER=otlp`), and `OTEL_TRACES_EXPORTER=none`
//!   turns it off. W3C trace context is the propagator;
//! - a Prometheus exporter on a metrics port.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::net::SocketAddr;
use std::time::Duration;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = TelemetryError;
    fn from_str(text: &str) -> Result<LogFormat, TelemetryError> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::LogFormat(other.to_string())),
        }
    }
}

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log format must be text or json, not {0:?}")]
    LogFormat(String),
    #[error("cannot start the OTLP export runtime: {0}")]
    ExportRuntime(std::io::Error),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(opentelemetry_otlp::ExporterBuildError),
    #[error("the OTLP exporter set-up panicked")]
    ExporterPanicked,
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The provider blocks while it flushes: keep that off the
            // async workers.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Whether the `OTEL_*` environment asks for OTLP trace export.
pub fn otlp_requested(env: impl Fn(&str) -> Option<String>) -> bool {
    match env("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => false,
        Some("otlp") => true,
        _ => {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    }
}

/// Runs the OTLP/gRPC exporter on a small runtime of its own: the SDK's
/// batch processor exports from a plain thread, where tonic would find no
/// Tokio reactor.
#[derive(Debug)]
struct OwnRuntimeExporter {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for OwnRuntimeExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let result = self.runtime.block_on(self.inner.export(batch));
        async move { result }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

fn otlp_provider(service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    // Built on a plain thread: this may be called from inside the
    // application's runtime, where blocking on another one is not allowed.
    let exporter = std::thread::spawn(|| -> Result<OwnRuntimeExporter, TelemetryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(TelemetryError::ExportRuntime)?;
        let inner = runtime
            .block_on(async {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            })
            .map_err(TelemetryError::Exporter)?;
        Ok(OwnRuntimeExporter { inner, runtime })
    })
    .join()
    .map_err(|_| TelemetryError::ExporterPanicked)??;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global `tracing` subscriber (logs, and traces when the
/// environment asks for them) and the W3C trace-context propagator.
/// `service_name` applies when `OTEL_SERVICE_NAME` is unset.
pub fn init(format: LogFormat, service_name: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        // Colours only on a terminal: a log file or journald gets plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut telemetry = Telemetry::default();
    let traces = if otlp_requested(|name| std::env::var(name).ok()) {
        match otlp_provider(service_name) {
            Ok(provider) => {
                let tracer = provider.tracer("allot");
                telemetry.provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(message) => {
                eprintln!("{service_name}: traces disabled: {message}");
                None
            }
        }
    } else {
        None
    };
    // Log lines carry their spans' fields only with ALLOT_LOG_SPANS set:
    // otherwise the log layer ignores spans, and without an OTLP exporter
    // no layer wants them, so the per-request spans cost nothing.
    let log_spans = std::env::var_os("ALLOT_LOG_SPANS").is_some();
    let logs_filter = filter().and(tracing_subscriber::filter::filter_fn(move |meta| {
        log_spans || meta.is_event()
    }));
    // Without an exporter (and without ALLOT_LOG_SPANS) no layer wants
    // spans, so every span callsite is disabled and costs nothing on the
    // request path. (An `Option` layer set to `None` would still make the
    // registry build every span.)
    let logs = logs.with_filter(logs_filter);
    let _ = match traces {
        Some(traces) => tracing_subscriber::registry()
            .with(logs)
            .with(traces.with_filter(filter()))
            .try_init(),
        None => tracing_subscriber::registry().with(logs).try_init(),
    };
    telemetry
}

/// Logs only, for tests and tools.
pub fn init_logging(format: LogFormat) {
    let _ = init(format, "allot");
}

/// Serves Prometheus text format on `addr` (`GET /metrics`) for the global
/// `metrics` recorder. Must be called from within a tokio runtime.
pub fn install_metrics(addr: SocketAddr) -> Result<(), TelemetryError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|source| TelemetryError::Metrics { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_is_off_unless_an_endpoint_or_the_exporter_is_named() {
        assert!(!otlp_requested(env(&[])));
        assert!(otlp_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317"
        )])));
        assert!(otlp_requested(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://x:4317"
        )])));
        assert!(otlp_requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!otlp_requested(env(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        ])));
    }
}
