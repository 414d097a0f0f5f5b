use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::AppState;
use crate::http::JsonAnswer;
use crate::http::cookies::CdnCookieHeaders;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{Caller, JsonBody, OptionalJsonBody, PathParam};
use crate::model::{ContentId, DeviceId, LiveSession, PlaybackInfo, PositionMs, SessionId, write_rfc3339};
use crate::sources::CallContext;

#[derive(Deserialize, ToSchema)]
pub struct StartSession {
    /// Checked by the handler: a bad one is `invalid_content_id`, not `invalid_body`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", example = "m-0001")]
    pub content_id: String,
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_.:-]{1,128}$", example = "tv-livingroom")]
    pub device_id: DeviceId,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionStarted {
    pub session_id: String,
    pub heartbeat_interval_s: u64,
    pub expires_at: DateTime<Utc>,
    pub playback: PlaybackInfo,
    /// With `MONETA_STREAM_LIMIT_POLICY=evict_oldest`: the most recent of
    /// the sessions ended to make room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted_session_id: Option<String>,
    /// Every session ended to make room, oldest first (several after a plan
    /// downgrade); absent when none was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evicted_session_ids: Vec<String>,
}

#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum PlayerState {
    Playing,
    Paused,
    Buffering,
}

impl PlayerState {
    /// Counts a heartbeat in this state. The series are registered once:
    /// `counter!` looks its series up on every call (~0.7 k instructions).
    fn count(self) {
        static HANDLES: OnceLock<[metrics::Counter; 3]> = OnceLock::new();
        let handles = HANDLES.get_or_init(|| {
            [PlayerState::Playing, PlayerState::Paused, PlayerState::Buffering]
                .map(|state| metrics::counter!("moneta_heartbeats_total", "state" => state.as_str()))
        });
        handles[self as usize].increment(1);
    }

    fn as_str(self) -> &'static str {
        match self {
            PlayerState::Playing => "playing",
            PlayerState::Paused => "paused",
            PlayerState::Buffering => "buffering",
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct Heartbeat {
    /// 0 to 2^53 − 1.
    #[schema(value_type = u64, maximum = 9007199254740991_u64)]
    pub position_ms: PositionMs,
    pub state: PlayerState,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    #[schema(value_type = String)]
    pub session_id: SessionId,
    #[serde(serialize_with = "crate::model::rfc3339")]
    pub expires_at: DateTime<Utc>,
    /// Taken by a fallback: Redis unreachable (the session unchecked, the
    /// position kept in this instance's memory until Redis is back).
    pub degraded: bool,
}

impl HeartbeatAck {
    /// What `serde_json` writes for it, keys as literals: the request
    /// production sends most spent ~1.3 k instructions in serde_json's
    /// escaping of its keys, its ~90-byte id and its timestamp, none of
    /// which can hold a character JSON escapes (a [`SessionId`] is ASCII
    /// letters, digits and `_.:-`). A test holds it to the derived form.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"session_id\":\"");
        out.extend_from_slice(self.session_id.as_str().as_bytes());
        out.extend_from_slice(b"\",\"expires_at\":");
        write_rfc3339(out, &self.expires_at);
        out.extend_from_slice(if self.degraded {
            b",\"degraded\":true}"
        } else {
            b",\"degraded\":false}"
        });
    }
}

#[derive(Deserialize, ToSchema, Default)]
pub struct StopSession {
    /// 0 to 2^53 − 1.
    #[schema(value_type = Option<u64>, maximum = 9007199254740991_u64)]
    pub position_ms: Option<PositionMs>,
    /// The title was watched to the end, whatever the position.
    #[serde(default)]
    pub completed: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    pub device_id: String,
    pub content_id: String,
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<LiveSession> for SessionView {
    fn from(s: LiveSession) -> Self {
        Self {
            session_id: s.session_id.into(),
            device_id: s.device_id.into(),
            content_id: s.content_id.into(),
            expires_at: s.expires_at,
        }
    }
}

/// A path segment that is not a session id Moneta could have issued is an
/// unknown session, like any other.
fn session_id(raw: String) -> Result<SessionId, ApiError> {
    SessionId::parse(raw).map_err(|_| ApiError::SessionNotFound)
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
    /// True when the list could not be read (Redis unavailable).
    pub degraded: bool,
}

/// Starts playback: the playback-info checks, then the concurrent-stream limit.
#[utoipa::path(
    post,
    path = "/v1/playback/sessions",
    tag = "sessions",
    request_body = StartSession,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Session started", body = SessionStarted),
        (status = 400, description = "invalid_body / invalid_content_id", body = ErrorBody),
        (status = 401, description = "missing_token / invalid_token", body = ErrorBody),
        (status = 403, description = "no_entitlement / subscription_inactive / plan_not_eligible / region_unavailable", body = ErrorBody),
        (status = 404, description = "content_not_found", body = ErrorBody),
        (status = 409, description = "stream_limit_reached", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 503, description = "dependency_unavailable (also when Moneta is too busy to count streams)", body = ErrorBody),
    )
)]
pub async fn start(
    State(app): State<AppState>,
    Caller(claims): Caller,
    ctx: CallContext,
    JsonBody(body): JsonBody<StartSession>,
) -> Result<(StatusCode, CdnCookieHeaders, JsonAnswer<SessionStarted>), ApiError> {
    let content_id = ContentId::parse(body.content_id).map_err(|_| ApiError::InvalidContentId)?;
    let started = app
        .sessions
        .start(&claims, &content_id, &body.device_id, &ctx)
        .await?;
    let cookies = CdnCookieHeaders::new(
        &started.playback.content_id,
        started.playback.cdn_cookies.as_ref(),
        app.cdn_cookie_domain.as_deref(),
    );
    Ok((
        StatusCode::CREATED,
        cookies,
        JsonAnswer(SessionStarted {
            session_id: started.session_id.into(),
            heartbeat_interval_s: app.heartbeat_interval.as_secs(),
            expires_at: started.expires_at,
            playback: started.playback,
            evicted_session_id: started.evicted.last().cloned().map(String::from),
            evicted_session_ids: started.evicted.into_iter().map(String::from).collect(),
        }),
    ))
}

/// Keeps a session alive and records the position.
#[utoipa::path(
    put,
    path = "/v1/playback/sessions/{session_id}",
    tag = "sessions",
    params(("session_id" = String, Path)),
    request_body = Heartbeat,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Heartbeat recorded", body = HeartbeatAck),
        (status = 400, description = "invalid_body", body = ErrorBody),
        (status = 401, description = "missing_token / invalid_token", body = ErrorBody),
        (status = 404, description = "session_not_found", body = ErrorBody),
        (status = 409, description = "session_evicted (playback moved to another device); stream_limit_reached (Redis had lost the session and the limit is now full)", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 503, description = "dependency_unavailable (too busy; the position was not taken)", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(app): State<AppState>,
    Caller(claims): Caller,
    ctx: CallContext,
    PathParam(raw_id): PathParam,
    JsonBody(body): JsonBody<Heartbeat>,
) -> Result<HeartbeatAck, ApiError> {
    body.state.count();
    let session_id = session_id(raw_id)?;
    let beat = app
        .sessions
        .heartbeat(&claims, &session_id, body.position_ms, &ctx)
        .await?;
    Ok(HeartbeatAck {
        session_id,
        expires_at: beat.expires_at,
        degraded: beat.degraded,
    })
}

/// Ends a session and frees its stream slot at once.
#[utoipa::path(
    delete,
    path = "/v1/playback/sessions/{session_id}",
    tag = "sessions",
    params(("session_id" = String, Path)),
    request_body(content = Option<StopSession>, description = "Optional final position"),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Session ended"),
        (status = 400, description = "invalid_body", body = ErrorBody),
        (status = 401, description = "missing_token / invalid_token", body = ErrorBody),
        (status = 404, description = "session_not_found", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 503, description = "dependency_unavailable (too busy; the position was not taken)", body = ErrorBody),
    )
)]
pub async fn stop(
    State(app): State<AppState>,
    Caller(claims): Caller,
    PathParam(raw_id): PathParam,
    OptionalJsonBody(body): OptionalJsonBody<StopSession>,
) -> Result<StatusCode, ApiError> {
    let body = body.unwrap_or_default();
    app.sessions
        .stop(&claims, &session_id(raw_id)?, body.position_ms, body.completed)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's live sessions.
#[utoipa::path(
    get,
    path = "/v1/playback/sessions",
    tag = "sessions",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Live sessions", body = SessionList),
        (status = 401, description = "missing_token / invalid_token", body = ErrorBody),
    )
)]
pub async fn list(State(app): State<AppState>, Caller(claims): Caller) -> JsonAnswer<SessionList> {
    let (sessions, degraded) = match app.sessions.list(&claims).await {
        Some(list) => (list, false),
        None => (Vec::new(), true),
    };
    let sessions = sessions.into_iter().map(SessionView::from).collect();
    JsonAnswer(SessionList { sessions, degraded })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn a_heartbeat_answer_is_written_as_serde_writes_it() {
        let mac = "AbC-_0123456789xyzXYZ_";
        let device = format!("tv.living:room_{}", "d".repeat(113));
        let ids = [
            format!("{:032x}.m-0001.tv.{mac}", 7),
            format!("{:032x}.m-0001.{mac}", u128::MAX),
            format!("{:032x}.{}.{device}.{mac}", 0xabc, "c".repeat(64)),
        ];
        let at = Utc.with_ymd_and_hms(2026, 12, 5, 2, 3, 4).unwrap();
        let times = [
            at,
            at + chrono::Duration::milliseconds(45),
            at + chrono::Duration::nanoseconds(1),
        ];
        for id in ids {
            for expires_at in times {
                for degraded in [false, true] {
                    let ack = HeartbeatAck {
                        session_id: SessionId::parse(id.clone()).unwrap(),
                        expires_at,
                        degraded,
                    };
                    let mut written = Vec::new();
                    ack.write_json(&mut written);
                    assert_eq!(
                        String::from_utf8(written).unwrap(),
                        serde_json::to_string(&ack).unwrap()
                    );
                }
            }
        }
    }
}
