//! Observability of the real `moneta` binary: `/metrics` as Prometheus and
//! promtool see it, traces as an OTLP collector receives them, and log lines
//! that carry the trace id of their request and never a secret.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::Value;
use support::{
    DEV_SECRET, FakeApi, Fault, MonetaProcess, PATIENCE, PublicApi, RedisServer, eventually,
    run_moneta_until_exit, spawn_fake_api,
};

// ---------------------------------------------------------------------------
// In-test servers

async fn serve(router: Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await });
    port
}

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
    service_name: String,
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
#[derive(Default)]
struct Collector {
    spans: Mutex<Vec<ReceivedSpan>>,
}

fn any_value_text(value: Option<&AnyValue>) -> String {
    match value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.resource_spans {
            let service_name = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| any_value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    any_value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                        service_name: service_name.clone(),
                    });
                }
            }
        }
    }

    fn spans_of(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

async fn collect_traces(State(c): State<Arc<Collector>>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(
        content_type, "application/x-protobuf",
        "OTLP/HTTP must send protobuf"
    );
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    c.record(request);
    (
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// The same collector behind OTLP/gRPC.
struct GrpcCollector(Arc<Collector>);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn spawn_grpc_collector() -> (Arc<Collector>, u16) {
    let state = Arc::new(Collector::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(GrpcCollector(state.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (state, port)
}

async fn spawn_collector() -> (Arc<Collector>, u16) {
    let state = Arc::new(Collector::default());
    let router = Router::new()
        .route("/v1/traces", post(collect_traces))
        .with_state(state.clone());
    (state, serve(router).await)
}

// ---------------------------------------------------------------------------
// Helpers

/// Moneta (the binary) on a fresh Redis in front of the fake internal API.
struct Observed {
    moneta: MonetaProcess,
    public: PublicApi,
    api: FakeApi,
    _redis: RedisServer,
}

impl Observed {
    async fn start(extra: &[(&'static str, String)]) -> Observed {
        let redis = RedisServer::start();
        let api = spawn_fake_api().await;
        let mut env = vec![
            ("MONETA_REDIS_URL", redis.url.clone()),
            ("MONETA_INTERNAL_API_URL", api.url()),
            ("MONETA_INTERNAL_API_TOKEN", INTERNAL_API_TOKEN.to_owned()),
            // A failing internal API opens its breaker only after many calls, so
            // every request in these tests still reaches it.
            ("MONETA_INTERNAL_API_BREAKER_FAILURES", "1000".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let moneta = MonetaProcess::start(&env);
        Observed {
            public: moneta.public_api(),
            moneta,
            api,
            _redis: redis,
        }
    }

    /// playback-info for m-0001, continuing `trace_id` when given.
    async fn playback(&self, token: &str, trace_id: Option<&str>) -> reqwest::Response {
        let traceparent = trace_id.map(|id| format!("00-{id}-{PARENT_ID}-01"));
        let headers: Vec<(&str, &str)> = traceparent
            .iter()
            .map(|tp| ("traceparent", tp.as_str()))
            .collect();
        self.public
            .get_with("/v1/contents/m-0001/playback-info", Some(token), &headers)
            .await
    }
}

const INTERNAL_API_TOKEN: &str = "internal-token-for-tests";

/// Pipes `text` into `promtool check metrics`; promtool is required.
fn promtool_check_metrics(text: &str) -> (bool, String) {
    let bin = support::require_binary("promtool");
    let mut child = Command::new(bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

/// Every sample as (metric name, label names).
fn series(text: &str) -> Vec<(String, BTreeSet<String>)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) => line.split_at(i),
                None => (line, ""),
            };
            let mut labels = BTreeSet::new();
            if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split('}').next()) {
                for pair in inner.split("\",") {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_owned());
                    }
                }
            }
            (name.to_owned(), labels)
        })
        .collect()
}

fn assert_series(text: &str, name: &str, labels: &[&str]) {
    let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
    let found = series(text);
    assert!(
        found.iter().any(|(n, l)| n == name && *l == want),
        "no {name} sample with labels {want:?}; found {:?}",
        found.iter().filter(|(n, _)| n == name).collect::<Vec<_>>()
    );
}

fn assert_type(text: &str, name: &str, kind: &str) {
    let line = format!("# TYPE {name} {kind}");
    assert!(text.lines().any(|l| l == line), "missing `{line}`");
}

const PLAYBACK_ROUTE: &str = "/v1/contents/{content_id}/playback-info";

// ---------------------------------------------------------------------------
// Metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_carry_the_contract_series() {
    let stack = Observed::start(&[]).await;
    // Before any request, every fallback counter is there at 0: dashboards
    // and alerts read a number, not "no data".
    let fresh = stack.moneta.metrics().await;
    assert_type(&fresh, "moneta_fallbacks_total", "counter");
    for series in [
        r#"moneta_fallbacks_total{dependency="redis",kind="stream_limit_open"}"#,
        r#"moneta_fallbacks_total{dependency="internal_api",kind="snapshot"}"#,
    ] {
        assert_eq!(support::metric_value(&fresh, series), Some(0.0), "{series}");
    }
    let token = support::mint_token("u-premium", "premium", 4, "KR");
    assert_eq!(stack.playback(&token, None).await.status(), 200);
    // Served from the cache, for the cache counters' hit side.
    assert_eq!(stack.playback(&token, None).await.status(), 200);
    assert_eq!(stack.public.get_anonymously("/nowhere").await.status(), 404);
    // With the internal API failing, a new user's entitlement comes from the claims.
    stack.api.set_fault(Fault::Status500);
    let other = support::mint_token("u-standard", "premium", 4, "KR");
    let resp = stack.playback(&other, None).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["degraded"], true);

    let text = stack.moneta.metrics().await;
    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok, "promtool check metrics failed:\n{report}\n---\n{text}");

    assert_type(&text, "moneta_http_requests_total", "counter");
    assert_series(
        &text,
        "moneta_http_requests_total",
        &["method", "route", "status"],
    );
    assert!(text.contains(&format!(
        "moneta_http_requests_total{{method=\"GET\",route=\"{PLAYBACK_ROUTE}\",status=\"200\"}}"
    )));
    // Unknown paths share one label value, so raw paths never become series.
    assert!(text.contains(r#"route="unmatched",status="404""#));
    assert!(!text.contains("/nowhere"));

    assert_type(&text, "moneta_http_request_duration_seconds", "histogram");
    assert_series(
        &text,
        "moneta_http_request_duration_seconds_bucket",
        &["route", "le"],
    );
    assert_series(&text, "moneta_http_request_duration_seconds_count", &["route"]);

    assert_type(&text, "moneta_dependency_requests_total", "counter");
    assert_series(
        &text,
        "moneta_dependency_requests_total",
        &["dependency", "outcome"],
    );
    assert!(text.contains(r#"moneta_dependency_requests_total{dependency="redis",outcome="success"}"#));
    assert!(text.contains(r#"moneta_dependency_requests_total{dependency="internal_api",outcome="error"}"#));

    assert_type(&text, "moneta_dependency_request_duration_seconds", "histogram");
    assert_series(
        &text,
        "moneta_dependency_request_duration_seconds_bucket",
        &["dependency", "le"],
    );

    assert_type(&text, "moneta_circuit_breaker_state", "gauge");
    assert_series(&text, "moneta_circuit_breaker_state", &["dependency"]);

    assert_type(&text, "moneta_fallbacks_total", "counter");
    assert_series(&text, "moneta_fallbacks_total", &["dependency", "kind"]);
    assert!(text.contains(r#"moneta_fallbacks_total{dependency="internal_api",kind="claims_entitlement"}"#));

    assert_type(&text, "moneta_cache_requests_total", "counter");
    assert_series(&text, "moneta_cache_requests_total", &["cache", "result"]);
    for cache in [
        "content_memory",
        "content_redis",
        "entitlement_redis",
        "position_redis",
    ] {
        assert!(
            text.contains(&format!(
                "moneta_cache_requests_total{{cache=\"{cache}\",result=\"miss\"}}"
            )),
            "no misses counted for {cache}"
        );
    }
    assert!(text.contains(r#"moneta_cache_requests_total{cache="content_memory",result="hit"}"#));

    assert_type(&text, "moneta_http_requests_in_flight", "gauge");
    assert_type(&text, "moneta_progress_queue_depth", "gauge");
    assert_type(&text, "process_resident_memory_bytes", "gauge");
    assert_series(&text, "process_resident_memory_bytes", &[]);
    assert_type(&text, "process_threads", "gauge");
    assert_series(&text, "process_threads", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_state_is_exported_before_any_transition() {
    // Nothing listens on either port: no call has succeeded yet, and however
    // long the scrape below takes, the failing probes cannot open a breaker.
    let moneta = MonetaProcess::start(&[
        (
            "MONETA_REDIS_URL",
            format!("redis://127.0.0.1:{}", support::refused_port()),
        ),
        ("MONETA_INTERNAL_API_URL", support::nobody_listens()),
        ("MONETA_REDIS_BREAKER_FAILURES", "1000000".to_owned()),
        ("MONETA_INTERNAL_API_BREAKER_FAILURES", "1000000".to_owned()),
    ]);
    let text = moneta.metrics().await;
    for dependency in ["redis", "internal_api"] {
        let line = format!("moneta_circuit_breaker_state{{dependency=\"{dependency}\"}} 0");
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
}

// ---------------------------------------------------------------------------
// Traces

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// In cluster mode the read of the caller's entitlement and position is
/// routed to its slot's primary by hand (`Conn::pipeline_on`); it is traced
/// like every other Redis call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_callers_read_is_traced_too() {
    let (collector, collector_port) = spawn_collector().await;
    let cluster = testkit::RedisCluster::start(3);
    let stack = Observed::start(&[
        ("MONETA_REDIS_CLUSTER_URLS", cluster.urls()),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{collector_port}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ])
    .await;
    let token = support::mint_token("u-premium", "premium", 4, "KR");
    assert_eq!(stack.playback(&token, Some(TRACE_ID)).await.status(), 200);
    let read = eventually(PATIENCE, async || {
        collector.spans_of(TRACE_ID).into_iter().find(|s| {
            s.attributes.get("db.system.name").map(String::as_str) == Some("redis")
                && s.attributes
                    .get("db.query.summary")
                    .is_some_and(|q| q.contains("HGET"))
        })
    })
    .await
    .unwrap_or_else(|| panic!("no span of the read: {:#?}", collector.spans_of(TRACE_ID)));
    assert_eq!(read.kind, SpanKind::Client as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_incoming_traceparent_and_reach_the_collector() {
    let (collector, collector_port) = spawn_collector().await;
    let stack = Observed::start(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{collector_port}"),
        ),
        ("OTEL_SERVICE_NAME", "moneta-under-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ])
    .await;
    let token = support::mint_token("u-premium", "premium", 4, "KR");
    assert_eq!(stack.playback(&token, Some(TRACE_ID)).await.status(), 200);

    let spans = eventually(PATIENCE, async || {
        let spans = collector.spans_of(TRACE_ID);
        let server = spans.iter().any(|s| s.kind == SpanKind::Server as i32);
        let internal_api = spans.iter().any(|s| s.attributes.contains_key("url.full"));
        let redis = spans
            .iter()
            .any(|s| s.attributes.get("db.system.name").map(String::as_str) == Some("redis"));
        (server && internal_api && redis).then_some(spans)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the collector did not get the request's spans; it got {:#?}",
            collector.spans.lock().unwrap()
        )
    });

    let server = spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap();
    assert_eq!(server.name, format!("GET {PLAYBACK_ROUTE}"));
    assert_eq!(
        server.parent_span_id, PARENT_ID,
        "the caller's span is the parent"
    );
    assert_eq!(server.service_name, "moneta-under-test");
    assert_eq!(server.attributes["http.request.method"], "GET");
    assert_eq!(server.attributes["http.route"], PLAYBACK_ROUTE);
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["url.path"], "/v1/contents/m-0001/playback-info");

    let redis_span = spans
        .iter()
        .find(|s| s.attributes.get("db.system.name").map(String::as_str) == Some("redis"))
        .unwrap();
    assert_eq!(redis_span.kind, SpanKind::Client as i32);
    assert!(redis_span.attributes.contains_key("db.operation.name"));

    let api_spans: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attributes.contains_key("url.full"))
        .collect();
    for span in &api_spans {
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.attributes["http.request.method"], "GET");
        assert_eq!(span.attributes["server.address"], "127.0.0.1");
        assert!(span.attributes["url.full"].starts_with(&format!("{}/internal/v1/", stack.api.url())));
        assert!(
            !span.name.contains("u-premium"),
            "user ids stay out of span names: {}",
            span.name
        );
    }
    let content = api_spans
        .iter()
        .find(|s| s.name == "GET /internal/v1/contents/{content_id}/playback")
        .expect("a span for the title lookup");
    assert_eq!(content.attributes["http.response.status_code"], "200");

    // The internal API saw the same trace, with the client span as its parent.
    let seen = stack.api.traceparents();
    let ours: Vec<&String> = seen
        .iter()
        .filter(|tp| tp.starts_with(&format!("00-{TRACE_ID}-")))
        .collect();
    assert!(
        !ours.is_empty(),
        "no traceparent of the trace reached the internal API: {seen:?}"
    );
    for tp in ours {
        let parent = tp.split('-').nth(2).unwrap();
        assert!(
            api_spans.iter().any(|s| s.span_id == parent),
            "{tp} does not name one of Moneta's client spans"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_grpc_collector_and_the_last_ones_leave_at_shutdown() {
    let (collector, collector_port) = spawn_grpc_collector().await;
    let mut stack = Observed::start(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{collector_port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        // No scheduled export within the test: only the flush at shutdown sends.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ])
    .await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let token = support::mint_token("u-premium", "premium", 4, "KR");
    assert_eq!(stack.playback(&token, Some(trace_id)).await.status(), 200);
    // Room for an early export to show; a slow machine only makes this check weaker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        collector.spans_of(trace_id).is_empty(),
        "exported before shutdown"
    );

    // The drain and the final flush have their own bounds; this deadline only
    // catches a process that never exits.
    let status = tokio::task::block_in_place(|| stack.moneta.terminate(PATIENCE));
    assert!(
        status.is_some_and(|s| s.success()),
        "moneta did not stop cleanly: {status:?}"
    );
    let spans = collector.spans_of(trace_id);
    assert!(
        spans
            .iter()
            .any(|s| s.kind == SpanKind::Server as i32 && s.name == format!("GET {PLAYBACK_ROUTE}")),
        "the request span was not flushed at shutdown: {spans:#?}"
    );
    assert!(spans.iter().any(|s| s.kind == SpanKind::Client as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_slows_requests() {
    // An export to it waits this long; a request that waited for an export
    // would take as long, one that did not stays an order of magnitude under.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
    // Accepts connections (the kernel does) but never reads or answers: the
    // worst collector, since every export waits for its timeout.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackhole_port = blackhole.local_addr().unwrap().port();
    for protocol in ["http/protobuf", "grpc"] {
        let stack = Observed::start(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{blackhole_port}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
            (
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                EXPORT_TIMEOUT.as_millis().to_string(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ])
        .await;
        let token = support::mint_token("u-premium", "premium", 4, "KR");
        assert_eq!(stack.playback(&token, None).await.status(), 200);
        for _ in 0..30 {
            let started = Instant::now();
            assert_eq!(stack.playback(&token, None).await.status(), 200);
            assert!(
                started.elapsed() < EXPORT_TIMEOUT / 10,
                "{protocol}: a request took {:?} with the collector down",
                started.elapsed()
            );
        }
    }
}

#[test]
fn an_unknown_otlp_protocol_stops_the_start() {
    let (code, stderr) = run_moneta_until_exit(&[
        ("MONETA_JWT_HS256_SECRET", DEV_SECRET.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon".to_owned()),
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Logs

/// The JSON log lines of a process (anything else it printed is skipped).
fn json_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn is_hex_id(v: &Value, len: usize) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_the_trace_id_and_no_secret() {
    // No OTLP endpoint: ids are still made and logged.
    let stack = Observed::start(&[]).await;
    let moneta = &stack.moneta;
    let token = support::mint_token("u-premium", "premium", 4, "KR");

    let resp = stack.playback(&token, Some(TRACE_ID)).await;
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    // Without a traceparent, a fresh trace.
    let fresh = stack.playback(&token, None).await;
    let fresh_id = fresh.headers()["x-request-id"].to_str().unwrap().to_owned();
    // A failing dependency writes warnings inside the request.
    stack.api.set_fault(Fault::Status500);
    let other = support::mint_token("u-standard", "premium", 4, "KR");
    let failing_trace = "0123456789abcdef0123456789abcdef";
    assert_eq!(stack.playback(&other, Some(failing_trace)).await.status(), 200);

    let access = |id: &str| {
        json_lines(&moneta.output())
            .into_iter()
            .find(|l| l["target"] == "moneta::access" && l["request_id"] == id)
    };
    let line = eventually(PATIENCE, async || access(&request_id))
        .await
        .unwrap_or_else(|| panic!("no access-log line for {request_id}:\n{}", moneta.output()));
    assert_eq!(line["trace_id"], TRACE_ID);
    assert!(is_hex_id(&line["span_id"], 16), "{line}");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["route"], PLAYBACK_ROUTE);
    assert_eq!(line["status"], 200);
    assert!(line["latency_ms"].as_f64().is_some(), "{line}");
    assert!(
        line.get("user_id").is_none() && line.get("sub").is_none(),
        "{line}"
    );

    let line = eventually(PATIENCE, async || access(&fresh_id)).await.unwrap();
    assert!(is_hex_id(&line["trace_id"], 32), "{line}");
    assert_ne!(line["trace_id"], TRACE_ID);

    let warnings = eventually(PATIENCE, async || {
        let w: Vec<Value> = json_lines(&moneta.output())
            .into_iter()
            .filter(|l| l["level"] == "WARN" && l["trace_id"] == failing_trace)
            .collect();
        (!w.is_empty()).then_some(w)
    })
    .await;
    assert!(
        warnings.is_some(),
        "dependency warnings do not carry the request's trace id:\n{}",
        moneta.output()
    );

    let output = moneta.output();
    for secret in [DEV_SECRET, token.as_str(), other.as_str(), INTERNAL_API_TOKEN] {
        assert!(!output.contains(secret), "a secret reached the output");
    }
    // Not even the signature part of a token.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!output.contains(signature));
}

/// A dependency that fails every call in flight would write a warning per
/// call: at 3 a.m. the log says it once a second, with how many it left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dependency_is_reported_once_a_second_not_once_a_call() {
    const CALLS: usize = 40;
    let stack = Observed::start(&[]).await;
    let moneta = &stack.moneta;
    let started = Instant::now();
    stack.api.set_fault(Fault::Status500);
    let stack = &stack;
    let answers = futures::future::join_all((0..CALLS).map(|i| {
        let token = support::mint_token(&format!("load-warn-{i}"), "standard", 2, "KR");
        async move { stack.playback(&token, None).await.status() }
    }))
    .await;
    assert!(answers.iter().all(|s| s.is_server_error()), "{answers:?}");
    let failures = |output: &str| -> Vec<Value> {
        json_lines(output)
            .into_iter()
            .filter(|l| {
                l["fields"]["message"] == "dependency call failed" || l["message"] == "dependency call failed"
            })
            .collect()
    };
    let lines = failures(&moneta.output());
    // Taken after the output: every line counted was written within it.
    let seconds = started.elapsed().as_secs();
    assert!(!lines.is_empty(), "the failure is reported:\n{}", moneta.output());
    assert!(
        lines.len() as u64 <= seconds + 1,
        "{} lines for {CALLS} failing requests in {seconds} s:\n{lines:?}",
        lines.len()
    );
    // The next one, a second later, counts the calls it stands for.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        stack
            .playback(&support::mint_token("load-warn-last", "standard", 2, "KR"), None)
            .await
            .status()
            .is_server_error()
    );
    let last = eventually(PATIENCE, async || {
        failures(&moneta.output()).get(lines.len()).cloned()
    })
    .await
    .expect("a line a second later");
    let skipped = last["skipped"].as_u64().or(last["fields"]["skipped"].as_u64());
    assert!(skipped.is_some_and(|n| n > 0), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_carry_the_trace_id_when_info_logs_are_off() {
    let stack = Observed::start(&[("RUST_LOG", "warn".to_owned())]).await;
    let moneta = &stack.moneta;
    stack.api.set_fault(Fault::Status500);
    let token = support::mint_token("u-premium", "premium", 4, "KR");
    let resp = stack.playback(&token, Some(TRACE_ID)).await;
    // Unknown title everywhere and no snapshot: 503, with warnings on the way.
    assert_eq!(resp.status(), 503);
    let found = eventually(PATIENCE, async || {
        json_lines(&moneta.output())
            .into_iter()
            .find(|l| l["level"] == "WARN" && l["trace_id"] == TRACE_ID)
    })
    .await;
    assert!(
        found.is_some(),
        "no warning with the trace id:\n{}",
        moneta.output()
    );
    assert!(
        !moneta.output().contains("moneta::access"),
        "RUST_LOG=warn still hides the access log"
    );
}

// ---------------------------------------------------------------------------
// Alert rules and dashboards

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rule_files() -> Vec<String> {
    let dir = repo().join("deploy/prometheus/rules");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files in {}", dir.display());
    files
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = support::require_binary("promtool");
    testkit::run(
        Command::new(&promtool)
            .args(["check", "rules"])
            .args(rule_files()),
        "promtool check rules",
    );
    testkit::run(
        Command::new(&promtool)
            .current_dir(repo().join("deploy/prometheus"))
            .args(["test", "rules", "tests/moneta-rules.test.yml"]),
        "promtool test rules",
    );
}

/// Every `moneta_…` name in the rules and dashboards is one Moneta exports, so
/// a renamed metric cannot leave a silent alert or an empty panel behind.
#[test]
fn rules_and_dashboards_name_only_exported_metrics() {
    let described = std::fs::read_to_string(repo().join("src/telemetry/metrics.rs")).unwrap();
    let mut texts = vec![];
    for file in rule_files() {
        texts.push((file.clone(), std::fs::read_to_string(&file).unwrap()));
    }
    let dashboards = repo().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            doc["uid"].is_string() && doc["panels"].is_array(),
            "{}",
            path.display()
        );
        texts.push((path.display().to_string(), text));
    }
    for (file, text) in texts {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("moneta_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                described.contains(&format!("\"{base}\"")),
                "{file} uses {name}, which Moneta does not export"
            );
        }
    }
}
