//! Operators' view, against the real binaries: OpenTelemetry traces to a
//! real OTLP/gRPC receiver (built on the official protobuf definitions),
//! Prometheus metrics parsed with a Prometheus text parser, and no secret
//! in any log, metric or span.

use allot::pb;
use allot_e2e::process::{free_addr, ServiceProcess};
use allot_e2e::*;
use allot_fake_neuron::FakeNeuron;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An OTLP/gRPC trace receiver that keeps every span, with its service.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    raw: Arc<Mutex<Vec<u8>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        self.raw
            .lock()
            .unwrap()
            .extend(prost::Message::encode_to_vec(&request));
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    self.spans.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

struct Running {
    coordinator: ServiceProcess,
    agent: ServiceProcess,
    coordinator_url: String,
    agent_url: String,
    coordinator_metrics: String,
    agent_metrics: String,
    neuron: FakeNeuron,
    receiver: Receiver,
    _dir: TempDir,
}

async fn start() -> Running {
    let dir = TempDir::new("observability");
    let receiver = Receiver::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_url = format!("http://{}", otlp.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );
    let (neuron, neuron_url) = start_neuron(&[MODEL], "n", Default::default()).await;

    let (grpc, coordinator_metrics) = (free_addr(), free_addr());
    let otel = |service: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url.clone()),
            ("OTEL_SERVICE_NAME", service.to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            (
                "RUST_LOG",
                "debug,h2=info,hyper=info,tower=info,tonic=info".to_string(),
            ),
        ]
    };
    let coordinator = ServiceProcess::spawn(
        "allot-coordinator",
        &[
            "--listen".into(),
            grpc.to_string(),
            "--metrics-listen".into(),
            coordinator_metrics.to_string(),
            "--insecure".into(),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
            "--data-path".into(),
            dir.0.join("c.redb").display().to_string(),
            "--log-format".into(),
            "json".into(),
        ],
        &otel("coordinator"),
        dir.0.join("coordinator.log"),
    );
    let (http, agent_metrics) = (free_addr(), free_addr());
    let agent = ServiceProcess::spawn(
        "allot-agent",
        &[
            "--listen".into(),
            http.to_string(),
            "--metrics-listen".into(),
            agent_metrics.to_string(),
            "--insecure".into(),
            "--coordinators".into(),
            format!("http://{grpc}"),
            "--neuron-url".into(),
            neuron_url,
            "--spool-dir".into(),
            dir.0.join("spool").display().to_string(),
            "--log-format".into(),
            "json".into(),
        ],
        &otel("agent"),
        dir.0.join("agent.log"),
    );
    let running = Running {
        coordinator,
        agent,
        coordinator_url: format!("http://{grpc}"),
        agent_url: format!("http://{http}"),
        coordinator_metrics: format!("http://{coordinator_metrics}/metrics"),
        agent_metrics: format!("http://{agent_metrics}/metrics"),
        neuron,
        receiver,
        _dir: dir,
    };
    wait_agent_ready(&running.agent_url, Duration::from_secs(30)).await;
    running
}

async fn key(url: &str) -> (String, String) {
    key_with_limits_at(
        url,
        "acme",
        vec![limit(pb::Unit::Tokens, "100000", balance())],
    )
    .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_is_continued_through_the_agent_into_the_neuron_and_linked_by_settlement() {
    let running = start().await;
    let (_, secret) = key(&running.coordinator_url).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", running.agent_url))
        .bearer_auth(&secret)
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .json(&chat_body(5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The neuron saw the same trace, with the agent's span as parent.
    let seen = running.neuron.last_request().unwrap();
    let neuron_traceparent = seen
        .header("traceparent")
        .expect("the neuron got a traceparent")
        .to_string();
    assert!(
        neuron_traceparent.contains(trace_id),
        "{neuron_traceparent}"
    );
    assert!(
        !neuron_traceparent.contains(parent),
        "the agent's span is the neuron's parent"
    );

    let spans = running.receiver.spans.clone();
    wait_until(
        "the agent's server span and the coordinator's settlement span",
        Duration::from_secs(30),
        || {
            let spans = spans.clone();
            async move {
                let spans = spans.lock().unwrap();
                let server = spans
                    .iter()
                    .any(|(_, s)| hex(&s.trace_id) == trace_id && hex(&s.parent_span_id) == parent);
                let settle = spans.iter().any(|(_, s)| {
                    s.name == "settle" && s.links.iter().any(|l| hex(&l.trace_id) == trace_id)
                });
                server && settle
            }
        },
    )
    .await;
    let spans = spans.lock().unwrap();
    let server = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == trace_id && hex(&s.parent_span_id) == parent)
        .map(|(service, s)| (service.clone(), s.clone()))
        .unwrap();
    assert!(server.0.contains("agent"), "{}", server.0);
    assert_eq!(server.1.name, "POST /v1/chat/completions");
    let names: Vec<&str> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == trace_id)
        .map(|(_, s)| s.name.as_str())
        .collect();
    for child in ["admission", "POST /v1/chat/completions"] {
        assert!(names.contains(&child), "{names:?}");
    }
    // The upstream span is the parent the neuron saw.
    let upstream_span_id = neuron_traceparent.split('-').nth(2).unwrap();
    assert!(spans
        .iter()
        .any(|(_, s)| hex(&s.span_id) == upstream_span_id && hex(&s.trace_id) == trace_id));
}

async fn scrape(url: &str) -> prometheus_parse::Scrape {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format")
}

fn counter(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_both_services_move_as_the_load_implies_and_no_secret_leaks() {
    let mut running = start().await;
    let (_, secret) = key(&running.coordinator_url).await;
    let http = reqwest::Client::new();
    let served = 12;
    for _ in 0..served {
        let r = http
            .post(format!("{}/v1/chat/completions", running.agent_url))
            .bearer_auth(&secret)
            .json(&chat_body(5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let refused = http
        .post(format!("{}/v1/chat/completions", running.agent_url))
        .bearer_auth("sk-allot-wrong")
        .json(&chat_body(5))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(running.neuron.hits(), served as u64);

    let agent_metrics = running.agent_metrics.clone();
    wait_until("the agent's counters", Duration::from_secs(20), || {
        let url = agent_metrics.clone();
        async move {
            let scrape = scrape(&url).await;
            counter(&scrape, "allot_agent_admissions_total") == served as f64
                && counter(&scrape, "allot_agent_settlements_total") == served as f64
        }
    })
    .await;
    let agent = scrape(&running.agent_metrics).await;
    let refusals = agent.samples.iter().find(|s| {
        s.metric == "allot_agent_refusals_total" && s.labels.get("code") == Some("invalid_api_key")
    });
    assert!(refusals.is_some(), "refusals are counted by code");
    let coordinator_metrics = running.coordinator_metrics.clone();
    wait_until("the coordinator's settlement counter", Duration::from_secs(20), || {
        let url = coordinator_metrics.clone();
        async move { counter(&scrape(&url).await, "allot_usage_settled_total") == served as f64 }
    })
    .await;
    let coordinator = scrape(&running.coordinator_metrics).await;
    assert!(counter(&coordinator, "allot_allowance_grants_total") >= 1.0);

    // No secret anywhere: logs (JSON, debug level), metrics, spans.
    let spans_raw = running.receiver.raw.clone();
    wait_until("some spans to arrive", Duration::from_secs(20), || {
        let raw = spans_raw.clone();
        async move { !raw.lock().unwrap().is_empty() }
    })
    .await;
    let metrics_text = [
        reqwest::get(&running.agent_metrics)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec(),
        reqwest::get(&running.coordinator_metrics)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec(),
    ];
    running.agent.terminate();
    running.coordinator.terminate();
    let mut outputs = vec![
        std::fs::read(&running.agent.log).unwrap(),
        std::fs::read(&running.coordinator.log).unwrap(),
        spans_raw.lock().unwrap().clone(),
    ];
    outputs.extend(metrics_text);
    let logs = String::from_utf8_lossy(&outputs[0]);
    assert!(
        logs.contains("\"level\""),
        "JSON logs were written: {}",
        &logs[..logs.len().min(300)]
    );
    for (i, output) in outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(output);
        assert!(
            !text.contains(&secret),
            "the API key leaked into output {i}"
        );
        assert!(
            !text.contains(ADMIN_TOKEN),
            "the admin token leaked into output {i}"
        );
    }
}
