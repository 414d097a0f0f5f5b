//! Licence tokens (CONTRACT §7): HS256 under `MONETA_DRM_TOKEN_SECRET`,
//! minted with each DRM stream of an answer, checked here before a licence.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{ExposeSecret, Secret};
use crate::model::{ContentId, KeyId, SessionId, UserId};

/// As for every token Moneta reads: longer ones are refused unparsed.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const LEEWAY_S: u64 = 30;

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
}

impl LicenseTokens {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_S;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
        }
    }

    /// The grant of a bearer token (`None`: no token was sent). A token
    /// whose claims do not have the shapes Moneta mints is invalid, like a
    /// bad signature: Moneta signed neither.
    pub fn verify(&self, token: Option<&str>) -> Result<LicenseGrant, TokenError> {
        let token = token.ok_or(TokenError::Missing)?;
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid);
        }
        // Only HS256 is in the validation: `alg: none` or any other algorithm fails here.
        let raw = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|_| TokenError::Invalid)?
            .claims;
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
