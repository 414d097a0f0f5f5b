//! The licence proxy (CONTRACT §8): the stream limit where a player cannot
//! skip it. A player that ignores `409 session_evicted`, or sends no
//! heartbeats, still needs a licence at start and at every renewal; each
//! one passes here, and a session that is no longer live gets none.
//!
//! In order: the licence token; the DRM system it is for; the per-session
//! rate limit; the session (one read-only Redis script); for ClearKey the
//! key ids asked for. Then the licence: ClearKey from Moneta's own keys
//! file, any other system from its vendor, the challenge and the answer
//! passed through unchanged.
//!
//! Degraded operation is the heartbeats': while Redis is unreachable, a
//! session id whose MAC proves Moneta issued it to this caller gets its
//! licence (counted as a fallback), any other does not. A full Redis
//! bulkhead is Moneta's own overload and answers `503`.

mod clearkey;
mod limit;
mod token;

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use reqwest::header::HeaderValue;

pub use token::{LicenseGrant, LicenseTokens, TokenError};

use crate::config::{LicenseProxySettings, Secret};
use crate::model::{DrmSystem, KeyId, LiveSession, SessionId};
use crate::resilience::DependencyError;
use crate::sessions::{Provenance, SessionKey};
use crate::sources::CallContext;
use crate::sources::drm::{DrmUpstreams, LicenseCall, VendorAnswer};
use crate::sources::redis::{SessionState, SessionStore, TouchOutcome, Untraced};
use crate::telemetry::metrics::Fallback;
use clearkey::ClearKeyError;
use limit::RateLimit;

/// One licence request as the edge received it.
pub struct LicenseRequest<'a> {
    pub system: DrmSystem,
    /// The bearer token of `Authorization`; `None` when none was sent.
    pub token: Option<&'a str>,
    /// The CDM's licence request (challenge), as received.
    pub body: Bytes,
    pub content_type: Option<&'a HeaderValue>,
    /// PlayReady's `SOAPAction`, one of the headers the CDM hands the player
    /// with its challenge; licence servers that speak SOAP dispatch on it.
    pub soap_action: Option<&'a HeaderValue>,
    pub ctx: &'a CallContext,
}

pub enum License {
    /// A W3C ClearKey licence Moneta issued itself (JSON).
    ClearKey(Vec<u8>),
    /// The vendor's answer, whatever its status.
    Vendor(VendorAnswer),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LicenseError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Denied(&'static str),
    #[error("no such session")]
    SessionNotFound,
    #[error("playback moved to another device")]
    SessionEvicted,
    /// A session Redis lost could not be recorded again within the limit.
    #[error("the concurrent-stream limit is reached")]
    LimitReached {
        max_streams: u32,
        active: Vec<LiveSession>,
    },
    #[error("too many licence requests")]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    InvalidBody(&'static str),
    /// Nothing issues licences for this system here.
    #[error("no licence server for this DRM system")]
    NoLicenseServer,
    /// The vendor's licence server failed (unreachable, timed out, breaker open).
    #[error("the licence server is unavailable")]
    Unavailable,
    /// Moneta's own Redis bulkhead is full.
    #[error("too busy to check the session; try again")]
    Busy,
}

/// `outcome` of `moneta_license_requests_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A ClearKey licence from Moneta's keys file.
    Issued,
    /// The vendor answered 2xx.
    Forwarded,
    /// The vendor answered another status, passed back unchanged.
    UpstreamStatus,
    MissingToken,
    InvalidToken,
    Denied,
    Evicted,
    SessionNotFound,
    StreamLimit,
    RateLimited,
    InvalidBody,
    TooLarge,
    NoLicenseServer,
    Unavailable,
}

impl Outcome {
    const ALL: [Outcome; 14] = [
        Outcome::Issued,
        Outcome::Forwarded,
        Outcome::UpstreamStatus,
        Outcome::MissingToken,
        Outcome::InvalidToken,
        Outcome::Denied,
        Outcome::Evicted,
        Outcome::SessionNotFound,
        Outcome::StreamLimit,
        Outcome::RateLimited,
        Outcome::InvalidBody,
        Outcome::TooLarge,
        Outcome::NoLicenseServer,
        Outcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::Forwarded => "forwarded",
            Outcome::UpstreamStatus => "upstream_status",
            Outcome::MissingToken => "missing_token",
            Outcome::InvalidToken => "invalid_token",
            Outcome::Denied => "denied",
            Outcome::Evicted => "evicted",
            Outcome::SessionNotFound => "session_not_found",
            Outcome::StreamLimit => "stream_limit_reached",
            Outcome::RateLimited => "rate_limited",
            Outcome::InvalidBody => "invalid_body",
            Outcome::TooLarge => "too_large",
            Outcome::NoLicenseServer => "no_license_server",
            Outcome::Unavailable => "unavailable",
        }
    }

    fn of(result: &Result<License, LicenseError>) -> Self {
        match result {
            Ok(License::ClearKey(_)) => Outcome::Issued,
            Ok(License::Vendor(answer)) if answer.status.is_success() => Outcome::Forwarded,
            Ok(License::Vendor(_)) => Outcome::UpstreamStatus,
            Err(LicenseError::Token(TokenError::Missing)) => Outcome::MissingToken,
            Err(LicenseError::Token(TokenError::Invalid)) => Outcome::InvalidToken,
            Err(LicenseError::Denied(_)) => Outcome::Denied,
            Err(LicenseError::SessionNotFound) => Outcome::SessionNotFound,
            Err(LicenseError::SessionEvicted) => Outcome::Evicted,
            Err(LicenseError::LimitReached { .. }) => Outcome::StreamLimit,
            Err(LicenseError::RateLimited { .. }) => Outcome::RateLimited,
            Err(LicenseError::InvalidBody(_)) => Outcome::InvalidBody,
            Err(LicenseError::NoLicenseServer) => Outcome::NoLicenseServer,
            Err(LicenseError::Unavailable | LicenseError::Busy) => Outcome::Unavailable,
        }
    }
}

fn counter(system: DrmSystem, outcome: Outcome) -> metrics::Counter {
    metrics::counter!(
        "moneta_license_requests_total",
        "drm_system" => system.as_str(),
        "outcome" => outcome.as_str()
    )
}

/// Counts one licence request; `drm_system` and `outcome` are closed sets.
pub fn count(system: DrmSystem, outcome: Outcome) {
    counter(system, outcome).increment(1);
}

pub struct Licenses {
    tokens: LicenseTokens,
    sessions: SessionStore,
    session_key: SessionKey,
    limit: RateLimit,
    /// Set: ClearKey licences are Moneta's own.
    clear_keys: Option<HashMap<KeyId, [u8; 16]>>,
    vendors: DrmUpstreams,
    /// Licences only for tokens of a session start: a token from
    /// playback-info alone names no session, so no stream slot holds it.
    require_session: bool,
}

impl Licenses {
    pub fn new(
        tokens: LicenseTokens,
        sessions: SessionStore,
        session_key: SessionKey,
        clear_keys: Option<HashMap<KeyId, [u8; 16]>>,
        vendors: DrmUpstreams,
        require_session: bool,
    ) -> Self {
        // Every series from the start, at 0, while the proxy is on.
        for system in DrmSystem::ALL {
            for outcome in Outcome::ALL {
                counter(system, outcome).absolute(0);
            }
        }
        Self {
            tokens,
            sessions,
            session_key,
            limit: RateLimit::default(),
            clear_keys,
            vendors,
            require_session,
        }
    }

    /// Builds the proxy from its settings; the keys file was loaded by the caller.
    pub fn from_settings(
        token_secret: &Secret,
        token_ttl: Duration,
        proxy: &LicenseProxySettings,
        sessions: SessionStore,
        session_key: SessionKey,
        clear_keys: Option<HashMap<KeyId, [u8; 16]>>,
    ) -> Result<Self, String> {
        let vendors = DrmUpstreams::new(proxy)?;
        Ok(Self::new(
            LicenseTokens::new(token_secret, token_ttl),
            sessions,
            session_key,
            clear_keys,
            vendors,
            proxy.require_session,
        ))
    }

    /// Checks the request, then answers the licence; every request is
    /// counted in `moneta_license_requests_total`.
    pub async fn license(&self, request: LicenseRequest<'_>) -> Result<License, LicenseError> {
        let system = request.system;
        let result = self.answer(request).await;
        count(system, Outcome::of(&result));
        result
    }

    async fn answer(&self, request: LicenseRequest<'_>) -> Result<License, LicenseError> {
        if self.sessions.measured_now().is_none() {
            // Only until the first measurement, as a start does: on its own
            // clock, an instance minutes off (just started, no call of its
            // own measured Redis yet) refuses every token another instance
            // minted, or honours expired ones. Boxed: a rare call.
            let _ = Box::pin(self.sessions.measure_clock()).await;
        }
        let now = self.sessions.clock_now().timestamp();
        let grant = self.tokens.verify(request.token, now)?;
        // ClearKey stands in for any CENC system in development: the key id
        // decides there, not the system the catalog named.
        if request.system != DrmSystem::ClearKey && grant.drm_system != request.system.as_str() {
            return Err(LicenseError::Denied(
                "the licence token is for another DRM system",
            ));
        }
        if self.require_session && grant.session.is_none() {
            return Err(LicenseError::Denied(
                "licences are issued to playback sessions: start one (POST /v1/playback/sessions) and use its licence token",
            ));
        }
        let limited = match &grant.session {
            Some(session) => self.limit.admit(session.as_str()),
            // NUL occurs in neither part, so the key is unambiguous.
            None => self
                .limit
                .admit(&format!("{}\0{}", grant.user.as_str(), grant.content.as_str())),
        };
        limited.map_err(|retry_after| LicenseError::RateLimited { retry_after })?;
        self.check_session(&grant).await?;
        if request.system == DrmSystem::ClearKey {
            let kid = clearkey::granted_key(&request.body, grant.key_id).map_err(|e| match e {
                ClearKeyError::Malformed => LicenseError::InvalidBody(
                    "expected a W3C ClearKey licence request: {\"kids\": [\"<base64url key id>\"], \"type\": \"temporary\"}",
                ),
                ClearKeyError::NotGranted => {
                    LicenseError::Denied("the licence token does not grant the requested key")
                }
            })?;
            // With a keys file the licence is Moneta's own; without one it
            // comes from `MONETA_DRM_UPSTREAM_CLEARKEY`, as for every system.
            if let Some(keys) = &self.clear_keys {
                let key = keys
                    .get(&kid)
                    .ok_or(LicenseError::Denied("no licence is issued for this key"))?;
                return Ok(License::ClearKey(clearkey::license(kid, key)));
            }
        }
        let call = LicenseCall {
            body: request.body,
            content_type: request.content_type,
            soap_action: request.soap_action,
            user: &grant.user,
            content: &grant.content,
            session: grant.session.as_ref(),
            ctx: request.ctx,
        };
        match self.vendors.request(request.system, call).await {
            None => Err(LicenseError::NoLicenseServer),
            Some(Ok(answer)) => Ok(License::Vendor(answer)),
            Some(Err(_)) => Err(LicenseError::Unavailable),
        }
    }

    /// Records a session Redis has no trace of again, within `max_streams`
    /// (`heartbeat.lua`, without a position). Boxed by its caller: this rare
    /// branch would otherwise size every licence request's future.
    async fn record_again(
        &self,
        grant: &LicenseGrant,
        session: &SessionId,
        max_streams: u32,
    ) -> Result<(), LicenseError> {
        let recorded = self
            .sessions
            .touch(&grant.user, session, None, Untraced::Record { max_streams })
            .await;
        match recorded {
            Ok(TouchOutcome::Touched(_) | TouchOutcome::Unreplicated(_)) => {
                metrics::counter!("moneta_sessions_recorded_again_total").increment(1);
                Ok(())
            }
            Ok(TouchOutcome::Full(active)) => {
                metrics::counter!("moneta_stream_limit_rejections_total").increment(1);
                Err(LicenseError::LimitReached { max_streams, active })
            }
            Ok(TouchOutcome::Evicted) => Err(LicenseError::SessionEvicted),
            Ok(TouchOutcome::Unknown | TouchOutcome::Untraced) => Err(LicenseError::SessionNotFound),
            Err(DependencyError::Saturated(_)) => Err(LicenseError::Busy),
            // Redis answered the check a moment ago and fails now: as while
            // it is unreachable, the session's own id vouches for it.
            Err(_) => {
                Fallback::LicenseUnchecked.count();
                Ok(())
            }
        }
    }

    /// A token from a session start is good only while that session is
    /// live for its user. One read-only script; Redis' answer decides while
    /// it gives one.
    async fn check_session(&self, grant: &LicenseGrant) -> Result<(), LicenseError> {
        let Some(session) = &grant.session else {
            return Ok(());
        };
        if session.content_id() != grant.content {
            return Err(LicenseError::SessionNotFound);
        }
        let provenance = self.session_key.provenance(&grant.user, session);
        if provenance == Provenance::Forged {
            return Err(LicenseError::SessionNotFound);
        }
        let issued = provenance == Provenance::Issued;
        match self.sessions.state(&grant.user, session).await {
            Ok(SessionState::Live) => Ok(()),
            Ok(SessionState::Evicted) => Err(LicenseError::SessionEvicted),
            Ok(SessionState::Ended) => Err(LicenseError::SessionNotFound),
            // Started while Redis was unreachable, or Redis lost its data:
            // as with a heartbeat, Redis' silence is not an ending, and
            // refusing the licence would stop a player that did nothing
            // wrong. As a heartbeat does, the request records the session
            // again within the limit its start enforced, or is refused with
            // `409 stream_limit_reached`: a player that never sends
            // heartbeats must not keep a slot outside the limit for as long
            // as its licence token lives.
            Ok(SessionState::Untraced) if issued => match grant.max_streams {
                Some(max_streams) => Box::pin(self.record_again(grant, session, max_streams)).await,
                // A token minted before it carried the limit: the session's
                // heartbeats settle it.
                None => {
                    Fallback::LicenseUntraced.count();
                    Ok(())
                }
            },
            Ok(SessionState::Untraced) => Err(LicenseError::SessionNotFound),
            Err(DependencyError::Saturated(_)) => Err(LicenseError::Busy),
            // Redis unreachable: an outage never stops a player, exactly as
            // heartbeats keep being answered; only an id this instance can
            // prove ours passes.
            Err(_) if issued => {
                Fallback::LicenseUnchecked.count();
                Ok(())
            }
            Err(_) => Err(LicenseError::SessionNotFound),
        }
    }
}
