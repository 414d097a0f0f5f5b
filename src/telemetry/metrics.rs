//! The Prometheus recorder and the descriptions of every metric Moneta exports.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets for a service whose warm answers take about a millisecond and whose
/// dependency timeouts are 250 ms and 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe();
            // Present from the start, so that dashboards read 0 rather than
            // "no data" and `increase()` in alerts sees the first loss.
            metrics::gauge!("moneta_progress_queue_depth").set(0.0);
            metrics::counter!("moneta_progress_delivered_total").absolute(0);
            for reason in DROP_REASONS {
                metrics::counter!("moneta_progress_dropped_total", "reason" => reason).absolute(0);
            }
            for fallback in Fallback::ALL {
                fallback.counter().absolute(0);
            }
            handle
        })
        .clone()
}

/// Why positions are given up: the closed set of
/// `moneta_progress_dropped_total{reason}` (counted in `progress`).
pub const DROP_REASONS: [&str; 4] = ["refused", "poison", "invalid", "queue_full"];

/// Each fallback an answer can come from, by the dependency that failed:
/// the closed set of `moneta_fallbacks_total{dependency,kind}`, every series
/// present from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Redis: a title read from the internal API, not Redis' copy.
    ContentSkipCache,
    /// Redis: a caller's entitlement and position read past Redis.
    UserStateSkipCache,
    /// Redis: the resume position from the internal API.
    PositionFromApi,
    /// Redis: a session started without counting the stream limit.
    StreamLimitOpen,
    /// Redis: a licence for a session Redis has no trace of.
    LicenseUntraced,
    /// Redis: a licence granted without checking the session.
    LicenseUnchecked,
    /// Redis: a position acknowledged before enough replicas had it.
    ReplicasUnacked,
    /// Redis: a heartbeat's position kept in memory.
    HeartbeatUnchecked,
    /// Redis: a stop's position kept in memory.
    StopUnchecked,
    /// Internal API: a stale copy of a title.
    StaleContent,
    /// Internal API: the static snapshot of a title.
    Snapshot,
    /// Internal API: no title at all (`503`).
    Unavailable,
    /// Internal API: the JWT's claims instead of the entitlement.
    ClaimsEntitlement,
    /// Internal API: no resume position (0).
    DefaultPosition,
}

impl Fallback {
    const ALL: [Fallback; 14] = [
        Fallback::ContentSkipCache,
        Fallback::UserStateSkipCache,
        Fallback::PositionFromApi,
        Fallback::StreamLimitOpen,
        Fallback::LicenseUntraced,
        Fallback::LicenseUnchecked,
        Fallback::ReplicasUnacked,
        Fallback::HeartbeatUnchecked,
        Fallback::StopUnchecked,
        Fallback::StaleContent,
        Fallback::Snapshot,
        Fallback::Unavailable,
        Fallback::ClaimsEntitlement,
        Fallback::DefaultPosition,
    ];

    /// `(dependency, kind)`.
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Fallback::ContentSkipCache => ("redis", "content_skip_cache"),
            Fallback::UserStateSkipCache => ("redis", "user_state_skip_cache"),
            Fallback::PositionFromApi => ("redis", "position_from_api"),
            Fallback::StreamLimitOpen => ("redis", "stream_limit_open"),
            Fallback::LicenseUntraced => ("redis", "license_untraced"),
            Fallback::LicenseUnchecked => ("redis", "license_unchecked"),
            Fallback::ReplicasUnacked => ("redis", "replicas_unacked"),
            Fallback::HeartbeatUnchecked => ("redis", "heartbeat_unchecked"),
            Fallback::StopUnchecked => ("redis", "stop_unchecked"),
            Fallback::StaleContent => ("internal_api", "stale_content"),
            Fallback::Snapshot => ("internal_api", "snapshot"),
            Fallback::Unavailable => ("internal_api", "unavailable"),
            Fallback::ClaimsEntitlement => ("internal_api", "claims_entitlement"),
            Fallback::DefaultPosition => ("internal_api", "default_position"),
        }
    }

    fn counter(self) -> metrics::Counter {
        let (dependency, kind) = self.labels();
        metrics::counter!("moneta_fallbacks_total", "dependency" => dependency, "kind" => kind)
    }

    /// One answer came (partly) from this fallback.
    pub fn count(self) {
        self.counter().increment(1);
    }
}

/// Folds recorded histogram samples into their buckets every second.
/// The recorder keeps raw samples until then; without this, memory grows
/// with every request between scrapes (or forever, with no scraper). Each
/// request records two samples (~8 bytes each in the recorder's blocks):
/// at 30 k requests a second, every second between upkeeps held ~0.5 MiB
/// (`docs/profiling.md`, "Memory, round 1"); the fold itself costs the same per
/// sample however often it runs.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Renders the exposition text, refreshing process metrics first.
pub fn render(handle: &PrometheusHandle) -> String {
    PROCESS
        .get_or_init(|| {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        })
        .collect();
    handle.render()
}

fn describe() {
    describe_counter!(
        "moneta_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "moneta_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by route template."
    );
    describe_gauge!(
        "moneta_http_requests_in_flight",
        "HTTP requests being answered now."
    );
    describe_gauge!(
        "moneta_overload_limit",
        "Public requests admitted at once (adaptive or fixed); 0: admission control off."
    );
    describe_gauge!(
        "moneta_overload_in_flight",
        "Public requests admitted and not yet answered (health and preflights not counted)."
    );
    describe_counter!(
        "moneta_requests_shed_total",
        "Requests answered 503 overloaded at once, by route template."
    );
    describe_gauge!(
        "moneta_http_connections",
        "Public connections open; at MONETA_MAX_CONNECTIONS new ones wait in the listen backlog."
    );
    describe_counter!(
        "moneta_dependency_requests_total",
        "Calls to a dependency by outcome (success, error, timeout, rejected_open, rejected_full)."
    );
    describe_histogram!(
        "moneta_dependency_request_duration_seconds",
        Unit::Seconds,
        "Time of calls that reached a dependency."
    );
    describe_gauge!(
        "moneta_circuit_breaker_state",
        "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        "moneta_fallbacks_total",
        "Answers (or parts) served from a fallback, by dependency and kind."
    );
    describe_counter!(
        "moneta_license_requests_total",
        "Licence requests to the licence proxy, by DRM system and outcome (issued, forwarded, upstream_status, \
         missing_token, invalid_token, denied, evicted, session_not_found, rate_limited, invalid_body, too_large, \
         no_license_server, unavailable)."
    );
    describe_counter!(
        "moneta_stream_limit_rejections_total",
        "Session starts refused by the concurrent-stream limit."
    );
    describe_counter!("moneta_heartbeats_total", "Heartbeats received, by player state.");
    describe_gauge!(
        "moneta_progress_queue_depth",
        "Resume positions waiting for delivery to the internal API."
    );
    describe_gauge!(
        "moneta_progress_backlog",
        "Resume positions waiting in Redis, by kind: log (entries not yet delivered) and parked (user and title pairs the internal API has not taken yet), over every bucket, as the courier last counted them."
    );
    describe_counter!(
        "moneta_progress_delivered_total",
        "Resume positions delivered to the internal API."
    );
    describe_counter!(
        "moneta_progress_dropped_total",
        "Resume positions given up, by reason: refused (the internal API refused the item), invalid (unreadable in the log), poison (moved to the dead-letter stream), queue_full (not taken while Redis was unreachable: answered 503)."
    );
    describe_counter!(
        "moneta_resume_positions_checked_total",
        "Resume positions Redis held from before the last Redis outage's end, checked once against the internal API, by where the newest was found (redis, internal_api)."
    );
    describe_counter!(
        "moneta_cache_requests_total",
        "Cache lookups by cache (content_memory, content_redis, entitlement_redis, position_redis) and result (hit, miss)."
    );
    describe_counter!(
        "moneta_redis_client_cache_requests_total",
        "Reads offered to the in-process copy of Redis (entitlements, positions), by result (hit, miss)."
    );
    describe_counter!(
        "moneta_redis_client_cache_invalidations_total",
        "Entries of the in-process copy of Redis dropped because Redis said they changed, expired or were replaced."
    );
    describe_counter!(
        "moneta_redis_client_cache_raced_total",
        "Replies from Redis not kept in the in-process copy because their key changed (or everything was dropped) while they were read."
    );
    describe_gauge!(
        "moneta_redis_client_cache_trusted",
        "1 while the Redis connection has proven itself alive recently and the in-process copy is served, else 0."
    );
    describe_counter!(
        "moneta_redis_client_cache_distrusted_total",
        "Times the in-process copy of Redis stopped being served (connection lost or not answering)."
    );
    describe_gauge!(
        "moneta_redis_primaries_failing",
        "Redis Cluster primaries that did not answer the outage watch's last PING while others did: calls for their keys answer from fallbacks at once, without counting against the Redis breaker."
    );
    describe_gauge!("moneta_jwt_keys", "JWT verification keys in force.");
    describe_counter!(
        "moneta_jwt_key_refresh_failures_total",
        "Failed refreshes of a JWT key source."
    );
    describe_gauge!(
        "moneta_jwt_keys_last_refresh_timestamp_seconds",
        Unit::Seconds,
        "Unix time a JWT key source last gave keys, by source."
    );
}
