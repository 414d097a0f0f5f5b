//! Client of the company's private internal API (CONTRACT §5).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU16, Ordering};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use tracing::Span;
use tracing::field::Empty;

use super::CallContext;
use crate::config::{ExposeSecret, InternalApiSettings, Secret};
use crate::model::{ContentId, ContentPlayback, Entitlement, Progress, ProgressItem, UserId, write_rfc3339};
use crate::resilience::{DependencyError, Guard, Verdict};
use crate::telemetry::traces;

/// What the internal API said to a batch of positions. A refusal is a sign
/// of life. Another failure of a batch with items may be the items' fault or
/// an outage, which the caller tells apart (an empty batch is the control:
/// see `progress::deliver`), so the breaker counts it neither way; a
/// failure of the empty batch is an outage, as a transport failure or a
/// timeout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    Accepted,
    /// The batch's content will never be accepted (`400`, `409`, `413`,
    /// `422`); the caller splits the batch to find the item at fault.
    Refused(StatusCode),
    /// Any other status (another `4xx` such as `404`, a `5xx`): about the
    /// batch when other batches are taken, about the API when none is.
    Failed(StatusCode),
}

/// The statuses that say a batch's content will never be accepted.
fn refuses_content(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::CONFLICT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY
    )
}

/// The body of `progress:batch`, `{"items":[…]}`, written directly. Through
/// serde's derive every literal key went through string escaping and the
/// timestamp through `collect_str`, a few characters at a time: ~1.3 k
/// instructions an item, in the courier that delivers every heartbeat
/// (`docs/profiling.md`, "Hot path, round 6"). The test below holds it to
/// the derived form byte for byte.
fn batch_body(items: &[ProgressItem]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + items.len() * 128);
    out.extend_from_slice(b"{\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user_id\":");
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, item.user_id.as_str());
        out.extend_from_slice(b",\"content_id\":");
        let _ = serde_json::to_writer(&mut out, item.content_id.as_str());
        out.extend_from_slice(b",\"position_ms\":");
        out.extend_from_slice(itoa::Buffer::new().format(item.position_ms.get()).as_bytes());
        out.extend_from_slice(b",\"updated_at\":");
        write_rfc3339(&mut out, &item.updated_at);
        if item.completed {
            out.extend_from_slice(b",\"completed\":true");
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("transport: {0}")]
    Transport(reqwest::Error),
    #[error("unexpected status {0}")]
    Status(StatusCode),
}

impl From<reqwest::Error> for CallError {
    /// Drops the URL: its path holds user ids, and these errors reach the logs.
    fn from(e: reqwest::Error) -> Self {
        CallError::Transport(e.without_url())
    }
}

/// `url.full` must never carry credentials someone put in the base URL.
fn without_credentials(url: &Url) -> Url {
    let mut url = url.clone();
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    url
}

#[derive(Clone)]
pub struct InternalApi {
    http: reqwest::Client,
    base: Url,
    token: Option<Secret>,
    guard: Guard,
    clock: Arc<DateClock>,
}

/// The internal API's clock as the `Date` of its answers tells it: the one
/// estimate of the platform's time an instance has before it first reaches
/// Redis (an instance that started during a Redis outage), so that what it
/// stamps with its own clock, possibly minutes off, is corrected before the
/// internal API compares it with other instances' positions. `Date` counts
/// whole seconds: the estimate errs by half a second and a round trip.
struct DateClock {
    /// The API's time minus ours, in ms; `UNMEASURED` until an answer came.
    offset_ms: AtomicI64,
}

const UNMEASURED: i64 = i64::MIN;

impl DateClock {
    fn observe(&self, headers: &reqwest::header::HeaderMap) {
        let Some(date) = headers.get(reqwest::header::DATE).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let Ok(date) = chrono::DateTime::parse_from_rfc2822(date) else {
            return;
        };
        // The middle of the second the answer was dated in.
        let offset = date.timestamp_millis() + 500 - chrono::Utc::now().timestamp_millis();
        self.offset_ms.store(offset, Ordering::Relaxed);
    }
}

impl InternalApi {
    pub fn new(settings: &InternalApiSettings) -> Result<Self, String> {
        let base = Url::parse(&settings.url).map_err(|e| format!("MONETA_INTERNAL_API_URL: {e}"))?;
        let timeout = settings.guard.timeout;
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            // The guard times calls out; this only backs it up for calls made outside it.
            .timeout(timeout + Duration::from_millis(100))
            .pool_max_idle_per_host(64)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("MONETA_INTERNAL_API_URL: cannot build HTTP client: {e}"))?;
        Ok(Self {
            http,
            base,
            token: settings.token.clone(),
            guard: Guard::new("internal_api", &settings.guard),
            clock: Arc::new(DateClock {
                offset_ms: AtomicI64::new(UNMEASURED),
            }),
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The internal API's time minus this instance's, from the `Date` of its
    /// last answer; `None` before any.
    pub fn clock_offset(&self) -> Option<chrono::Duration> {
        match self.clock.offset_ms.load(Ordering::Relaxed) {
            UNMEASURED => None,
            ms => Some(chrono::Duration::milliseconds(ms)),
        }
    }

    /// `base` + percent-encoded path segments (user ids are arbitrary strings).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A client span following the OpenTelemetry HTTP conventions, named by
    /// the path template so that user ids stay out of span names; none when
    /// spans are not exported or outside a traced operation.
    fn span(&self, method: &reqwest::Method, template: &str, url: &Url) -> Span {
        if !traces::client_spans() {
            return Span::none();
        }
        tracing::info_span!(
            target: "moneta::sources::internal_api",
            "internal_api",
            otel.name = %format_args!("{method} {template}"),
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = %method,
            server.address = url.host_str().unwrap_or(""),
            server.port = url.port_or_known_default(),
            url.full = %without_credentials(url),
            url.template = template,
            http.response.status_code = Empty,
            error.type = Empty,
        )
    }

    /// Runs a guarded call inside its client span; refusals by the guard
    /// (open breaker, full bulkhead, timeout) show in the span as `error.type`.
    async fn traced<T>(
        &self,
        span: Span,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, DependencyError> {
        let guarded = self.guard.call(call);
        if span.is_none() {
            return guarded.await;
        }
        traces::traced(span, guarded, |e: &DependencyError| e.kind().to_owned()).await
    }

    /// Carries the bearer token, the request id and the `traceparent` of `span`.
    fn request(
        &self,
        method: reqwest::Method,
        url: Url,
        ctx: &CallContext,
        span: &Span,
    ) -> reqwest::RequestBuilder {
        let mut headers = reqwest::header::HeaderMap::new();
        traces::inject(span, &mut headers);
        let mut req = self.http.request(method, url).headers(headers);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose_secret());
        }
        if let Some(id) = &ctx.request_id {
            req = req.header("x-request-id", id);
        }
        req
    }

    /// GET returning `Ok(None)` on 404; anything but 200/404 counts as a failure.
    async fn get<T: DeserializeOwned>(
        &self,
        template: &str,
        segments: &[&str],
        ctx: &CallContext,
    ) -> Result<Option<T>, DependencyError> {
        let url = self.url(segments);
        let span = self.span(&reqwest::Method::GET, template, &url);
        let req = self.request(reqwest::Method::GET, url, ctx, &span);
        let status_span = span.clone();
        let clock = &self.clock;
        self.traced(span, async move {
            let resp = req.send().await?;
            clock.observe(resp.headers());
            status_span.record("http.response.status_code", resp.status().as_u16());
            match resp.status() {
                StatusCode::OK => Ok(Some(resp.json::<T>().await?)),
                StatusCode::NOT_FOUND => Ok(None),
                other => Err(CallError::Status(other)),
            }
        })
        .await
    }

    pub async fn content(
        &self,
        content_id: &ContentId,
        ctx: &CallContext,
    ) -> Result<Option<ContentPlayback>, DependencyError> {
        self.get(
            "/internal/v1/contents/{content_id}/playback",
            &["internal", "v1", "contents", content_id.as_str(), "playback"],
            ctx,
        )
        .await
    }

    pub async fn entitlement(
        &self,
        user_id: &UserId,
        ctx: &CallContext,
    ) -> Result<Option<Entitlement>, DependencyError> {
        self.get(
            "/internal/v1/users/{user_id}/entitlement",
            &["internal", "v1", "users", user_id.as_str(), "entitlement"],
            ctx,
        )
        .await
    }

    pub async fn progress(
        &self,
        user_id: &UserId,
        content_id: &ContentId,
        ctx: &CallContext,
    ) -> Result<Option<Progress>, DependencyError> {
        self.get(
            "/internal/v1/users/{user_id}/progress/{content_id}",
            &[
                "internal",
                "v1",
                "users",
                user_id.as_str(),
                "progress",
                content_id.as_str(),
            ],
            ctx,
        )
        .await
    }

    /// Posts a batch (an empty one answers whether the API takes batches at
    /// all). A failure of a batch with items (a status, a transport error, a
    /// timeout) never opens the breaker: it may be one user's bad item, and
    /// must not open it for everybody. The courier then sends the empty
    /// batch, whose failure is an outage and counts.
    pub async fn post_progress(&self, items: &[ProgressItem]) -> Result<BatchOutcome, DependencyError> {
        let url = self.url(&["internal", "v1", "progress:batch"]);
        let span = self.span(&reqwest::Method::POST, "/internal/v1/progress:batch", &url);
        let req = self
            .request(reqwest::Method::POST, url, &CallContext::default(), &span)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(batch_body(items));
        let status_span = span.clone();
        // The guard turns an answered error into `Refused` with text only;
        // the status itself comes back this way.
        let answered = AtomicU16::new(0);
        let call = async {
            let resp = req.send().await?;
            self.clock.observe(resp.headers());
            let status = resp.status();
            status_span.record("http.response.status_code", status.as_u16());
            if status.is_success() {
                return Ok(());
            }
            answered.store(status.as_u16(), Ordering::Relaxed);
            Err(CallError::Status(status))
        };
        let control = items.is_empty();
        // Holds no item that could be at fault.
        let unclear = if control {
            Verdict::Outage
        } else {
            Verdict::Unclear
        };
        let judge = |e: &CallError| match e {
            CallError::Status(status) if !control && refuses_content(*status) => Verdict::Answered,
            CallError::Transport(_) | CallError::Status(_) => unclear,
        };
        let guarded = self.guard.call_judged_timing_out(call, judge, || unclear);
        let result = if span.is_none() {
            guarded.await
        } else {
            traces::traced(span, guarded, |e: &DependencyError| e.kind().to_owned()).await
        };
        match result {
            Ok(()) => Ok(BatchOutcome::Accepted),
            Err(DependencyError::Refused(dep, msg)) => {
                let Ok(status) = StatusCode::from_u16(answered.load(Ordering::Relaxed)) else {
                    return Err(DependencyError::Refused(dep, msg));
                };
                Ok(if refuses_content(status) {
                    BatchOutcome::Refused(status)
                } else {
                    BatchOutcome::Failed(status)
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Reachability probe: any answer below 500 means the API is there.
    pub async fn probe(&self) -> Result<(), DependencyError> {
        let req = self.request(
            reqwest::Method::GET,
            self.url(&["health"]),
            &CallContext::default(),
            &Span::none(),
        );
        let clock = &self.clock;
        self.guard
            .probe(async move {
                let resp = req.send().await?;
                clock.observe(resp.headers());
                match resp.status() {
                    s if s.is_server_error() => Err(CallError::Status(s)),
                    _ => Ok(()),
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};
    use serde::Serialize;

    use super::*;
    use crate::model::PositionMs;

    #[derive(Serialize)]
    struct Batch<'a> {
        items: &'a [ProgressItem],
    }

    fn item(user: &str, position: u64, at: DateTime<Utc>, completed: bool) -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse(user).unwrap(),
            content_id: ContentId::parse("m-0001").unwrap(),
            position_ms: PositionMs::new(position).unwrap(),
            updated_at: at,
            completed,
            provisional: false,
        }
    }

    #[test]
    fn the_batch_body_is_what_serde_writes() {
        let at = Utc.with_ymd_and_hms(2026, 12, 3, 21, 23, 0).unwrap();
        // The timestamp's own cases are `model::timestamp`'s test.
        let items = [
            item("bench-0", 0, at, false),
            item(
                "a \"quoted\" \\ user ü",
                PositionMs::MAX,
                at + chrono::Duration::milliseconds(7),
                true,
            ),
            item("u", 1, at + chrono::Duration::microseconds(1_500), false),
            item("u", 2, at + chrono::Duration::nanoseconds(1), false),
        ];
        for n in 0..=items.len() {
            let batch = Batch { items: &items[..n] };
            assert_eq!(
                String::from_utf8(batch_body(&items[..n])).unwrap(),
                serde_json::to_string(&batch).unwrap()
            );
        }
    }

    #[test]
    fn the_date_of_an_answer_tells_the_apis_clock() {
        let clock = DateClock {
            offset_ms: AtomicI64::new(UNMEASURED),
        };
        let mut headers = reqwest::header::HeaderMap::new();
        clock.observe(&headers);
        assert_eq!(
            clock.offset_ms.load(Ordering::Relaxed),
            UNMEASURED,
            "no Date, no estimate"
        );
        headers.insert(reqwest::header::DATE, "yesterday".parse().unwrap());
        clock.observe(&headers);
        assert_eq!(
            clock.offset_ms.load(Ordering::Relaxed),
            UNMEASURED,
            "no estimate from junk"
        );
        let ahead = Utc::now() + chrono::Duration::seconds(300);
        let date = ahead.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert(reqwest::header::DATE, date.parse().unwrap());
        clock.observe(&headers);
        let offset = clock.offset_ms.load(Ordering::Relaxed);
        // Whole seconds, read as the middle of theirs: within a second of 300 s.
        assert!((299_000..=301_000).contains(&offset), "{offset} ms");
    }
}
