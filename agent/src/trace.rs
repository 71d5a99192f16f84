//! W3C trace context across the agent: continue an incoming `traceparent`,
//! carry it on to the neuron, and read the ids for the usage record.
//! Without an OpenTelemetry exporter the spans have no ids, and the
//! incoming header is passed on as it came. A span no subscriber wants
//! (no exporter, no span logging) has no context at all: it is not asked
//! for one, which keeps the propagator off the hot path.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s context into `headers` (`traceparent`, `tracestate`);
/// false when the span has none (no exporter installed).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) -> bool {
    if span.is_disabled() {
        return false;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return false;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut Inject(headers))
    });
    true
}

/// `(trace_id, span_id)` of `span` in hex; empty when it has none.
pub fn ids(span: &tracing::Span) -> (String, String) {
    if span.is_disabled() {
        return (String::new(), String::new());
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return (String::new(), String::new());
    }
    (
        span_context.trace_id().to_string(),
        span_context.span_id().to_string(),
    )
}
