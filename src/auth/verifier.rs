//! Token verification per CONTRACT §3 "JWT".

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation, decode, decode_header, encode};

use super::claims::Claims;
use super::keys::KeyStore;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
const LEEWAY_S: u64 = 30;
/// Without a `kid`, at most this many keys of the token's algorithm are tried,
/// so a large key set cannot be turned into a CPU sink.
const MAX_KEYS_TRIED: usize = 4;

const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is not valid")]
    Invalid,
}

pub struct Verifier {
    keys: Arc<KeyStore>,
    /// One prepared rule set per algorithm: the algorithm list holds only that
    /// algorithm, so a key can never verify a token of another one.
    validations: HashMap<Algorithm, Validation>,
}

impl Verifier {
    pub fn new(keys: Arc<KeyStore>, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let validations = ALGORITHMS
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = LEEWAY_S;
                v.validate_exp = true;
                v.validate_nbf = true;
                let mut required = vec!["exp", "sub"];
                if let Some(iss) = issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                match audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        Self { keys, validations }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Verifies a compact JWS and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid);
        }
        // `alg: none` and unknown algorithms fail here: the header type has no such variant.
        let header = decode_header(token).map_err(|_| AuthError::Invalid)?;
        let validation = self.validations.get(&header.alg).ok_or(AuthError::Invalid)?;
        let keys = self.keys.current();
        let candidates = keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| match &header.kid {
                Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
                None => true,
            })
            .take(MAX_KEYS_TRIED);
        for key in candidates {
            if let Ok(data) = decode::<Claims>(token, &key.key, validation) {
                if data.claims.sub.is_empty() {
                    return Err(AuthError::Invalid);
                }
                return Ok(data.claims);
            }
        }
        Err(AuthError::Invalid)
    }
}

/// Signs a development token with an HS256 secret (`moneta token`, tests, benches).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::{KeySource, StaticSecret};
    use crate::config::Secret;

    async fn verifier(iss: Option<&str>, aud: Option<&str>) -> Verifier {
        let sources: Vec<Box<dyn KeySource>> = vec![Box::new(StaticSecret(Secret::new("s3cret")))];
        Verifier::new(KeyStore::load(sources).await.unwrap(), iss, aud)
    }

    fn claims(exp_offset: i64) -> Claims {
        Claims {
            sub: "u1".into(),
            exp: chrono::Utc::now().timestamp() + exp_offset,
            iat: None,
            nbf: None,
            iss: None,
            plan: Some("basic".into()),
            max_streams: Some(2),
            country: Some("KR".into()),
        }
    }

    #[tokio::test]
    async fn accepts_a_good_token() {
        let v = verifier(None, None).await;
        let t = mint_hs256("s3cret", &claims(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().sub, "u1");
    }

    #[tokio::test]
    async fn leeway_is_thirty_seconds() {
        let v = verifier(None, None).await;
        assert!(v.verify(&mint_hs256("s3cret", &claims(-20)).unwrap()).is_ok());
        assert!(v.verify(&mint_hs256("s3cret", &claims(-45)).unwrap()).is_err());
    }

    #[tokio::test]
    async fn refuses_wrong_key_none_and_oversize() {
        let v = verifier(None, None).await;
        assert!(v.verify(&mint_hs256("other", &claims(60)).unwrap()).is_err());
        // {"alg":"none","typ":"JWT"}
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert_eq!(v.verify(none).err(), Some(AuthError::Invalid));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).err(),
            Some(AuthError::Invalid)
        );
    }

    #[tokio::test]
    async fn issuer_and_audience_are_enforced_when_set() {
        let v = verifier(Some("https://id.example"), None).await;
        assert!(v.verify(&mint_hs256("s3cret", &claims(60)).unwrap()).is_err());
        let mut c = claims(60);
        c.iss = Some("https://id.example".into());
        assert!(v.verify(&mint_hs256("s3cret", &c).unwrap()).is_ok());
    }
}
