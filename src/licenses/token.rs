//! Licence tokens (CONTRACT §7): HS256 under `MONETA_DRM_TOKEN_SECRET`,
//! minted with each DRM stream of an answer, checked here before a licence.
//!
//! Moneta both mints and checks them, on different instances: their times
//! are on Redis' clock as each instance estimates it (`iat` when minted,
//! `now` when checked), so instances whose own clocks differ by minutes
//! agree on when a token expires, as they agree on which sessions are live.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::claims::{in_force, numeric_date, some_numeric_date};
use crate::config::{ExposeSecret, Secret};
use crate::model::{ContentId, KeyId, SessionId, UserId};

/// As for every token Moneta reads: longer ones are refused unparsed.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const LEEWAY_S: i64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no licence token")]
    Missing,
    #[error("the licence token is invalid or expired")]
    Invalid,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    content_id: String,
    key_id: String,
    drm_system: String,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    max_streams: Option<u32>,
    #[serde(deserialize_with = "numeric_date")]
    exp: i64,
    #[serde(default, deserialize_with = "some_numeric_date")]
    iat: Option<i64>,
    #[serde(default, deserialize_with = "some_numeric_date")]
    nbf: Option<i64>,
}

/// What a valid licence token grants.
#[derive(Debug, Clone)]
pub struct LicenseGrant {
    pub user: UserId,
    pub content: ContentId,
    /// `None` when the catalog's key id is not a 16-byte CENC key id: such
    /// a token is good for a vendor, never for a ClearKey licence.
    pub key_id: Option<KeyId>,
    /// As the catalog names it; the route's system must match it.
    pub drm_system: String,
    /// Set when the token came with a session start.
    pub session: Option<SessionId>,
    /// The stream limit that start enforced (tokens minted before it was
    /// carried have none).
    pub max_streams: Option<u32>,
}

pub struct LicenseTokens {
    key: DecodingKey,
    validation: Validation,
    /// `MONETA_DRM_TOKEN_TTL_S`: no token Moneta mints lives longer.
    ttl_s: i64,
}

impl LicenseTokens {
    pub fn new(secret: &Secret, ttl: std::time::Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // The time claims are checked by `verify`, against Redis' clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
            ttl_s: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// The grant of a bearer token (`None`: no token was sent) at `now`
    /// (seconds on Redis' clock, as this instance estimates it). A token
    /// whose claims do not have the shapes Moneta mints is invalid, like a
    /// bad signature: Moneta signed neither. So is one minted in the future
    /// or for longer than `MONETA_DRM_TOKEN_TTL_S`, beyond the leeway.
    pub fn verify(&self, token: Option<&str>, now: i64) -> Result<LicenseGrant, TokenError> {
        let token = token.ok_or(TokenError::Missing)?;
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid);
        }
        // Only HS256 is in the validation: `alg: none` or any other algorithm fails here.
        let raw = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|_| TokenError::Invalid)?
            .claims;
        let minted_as_moneta_mints = raw.iat.is_none_or(|iat| {
            iat.saturating_sub(LEEWAY_S) <= now
                && raw.exp.saturating_sub(iat) <= self.ttl_s.saturating_add(LEEWAY_S)
        });
        if !in_force(raw.exp, raw.nbf, now, LEEWAY_S) || !minted_as_moneta_mints {
            return Err(TokenError::Invalid);
        }
        let session = match raw.session_id {
            Some(id) => Some(SessionId::parse(id).map_err(|_| TokenError::Invalid)?),
            None => None,
        };
        Ok(LicenseGrant {
            user: UserId::parse(raw.sub).map_err(|_| TokenError::Invalid)?,
            content: ContentId::parse(raw.content_id).map_err(|_| TokenError::Invalid)?,
            key_id: KeyId::from_hex(&raw.key_id),
            drm_system: raw.drm_system,
            session,
            max_streams: raw.max_streams,
        })
    }
}
