//! Verification keys: where they come from and the set in force.
//!
//! Every configured [`KeySource`] contributes keys; the union is swapped in
//! atomically ([`arc_swap`]) so the hot path reads the current set lock-free.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::config::{ExposeSecret, Secret};

/// One key, pinned to the one algorithm it may verify.
pub struct VerificationKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct KeyError {
    pub setting: &'static str,
    pub reason: String,
}

/// Somewhere keys come from. Sources are asked again on every refresh.
pub trait KeySource: Send + Sync {
    /// The setting that configures this source (named in errors).
    fn setting(&self) -> &'static str;
    fn load(&self) -> BoxFuture<'_, Result<Vec<VerificationKey>, KeyError>>;
}

/// `MONETA_JWT_HS256_SECRET`: one HS256 key, no `kid`.
pub struct StaticSecret(pub Secret);

impl KeySource for StaticSecret {
    fn setting(&self) -> &'static str {
        "MONETA_JWT_HS256_SECRET"
    }
    fn load(&self) -> BoxFuture<'_, Result<Vec<VerificationKey>, KeyError>> {
        Box::pin(async move {
            Ok(vec![VerificationKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(self.0.expose_secret().as_bytes()),
            }])
        })
    }
}

/// `MONETA_JWT_JWKS_FILE`: an RFC 7517 key set on disk, re-read on refresh.
pub struct JwksFile(pub PathBuf);

impl KeySource for JwksFile {
    fn setting(&self) -> &'static str {
        "MONETA_JWT_JWKS_FILE"
    }
    fn load(&self) -> BoxFuture<'_, Result<Vec<VerificationKey>, KeyError>> {
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&self.0).await.map_err(|e| KeyError {
                setting: self.setting(),
                reason: format!("cannot read {}: {e}", self.0.display()),
            })?;
            parse_jwks(&text).map_err(|reason| KeyError {
                setting: self.setting(),
                reason,
            })
        })
    }
}

/// Parses a JWKS document. Keys meant only for encryption are skipped; a key
/// whose algorithm cannot be known is an error rather than a guess.
pub fn parse_jwks(text: &str) -> Result<Vec<VerificationKey>, String> {
    // serde's own message can quote the offending value, which may be key material.
    let set: JwkSet = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a JWKS document ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let alg = key_algorithm(jwk)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| match jwk.algorithm {
            // A shared secret's decoding error could echo part of it.
            AlgorithmParameters::OctetKey(_) => {
                format!("key {:?}: unusable shared secret", jwk.common.key_id)
            }
            _ => format!("key {:?}: {e}", jwk.common.key_id),
        })?;
        keys.push(VerificationKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the key set holds no signature key".into());
    }
    Ok(keys)
}

fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let named = |alg: KeyAlgorithm| -> Result<Algorithm, String> {
        alg.to_string()
            .parse()
            .map_err(|_| format!("key {:?}: algorithm {alg} cannot sign tokens", jwk.common.key_id))
    };
    match (jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(alg), _) => named(alg),
        // Curves and Ed25519 name their algorithm; RSA and shared secrets do not.
        (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
            EllipticCurve::P256 => Ok(Algorithm::ES256),
            EllipticCurve::P384 => Ok(Algorithm::ES384),
            _ => Err(format!("key {:?}: unsupported curve", jwk.common.key_id)),
        },
        (None, AlgorithmParameters::OctetKeyPair(_)) => Ok(Algorithm::EdDSA),
        (None, _) => Err(format!(
            "key {:?}: an RSA or secret key needs \"alg\"",
            jwk.common.key_id
        )),
    }
}

/// Records when a source last gave keys, so stale keys can be alerted on
/// (`time() - moneta_jwt_keys_last_refresh_timestamp_seconds`).
fn mark_loaded(source: &dyn KeySource) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("moneta_jwt_keys_last_refresh_timestamp_seconds", "source" => source.setting()).set(now);
}

/// Combines the sources and holds the current [`KeySet`].
pub struct KeyStore {
    sources: Vec<Box<dyn KeySource>>,
    /// The last keys each source gave, so one failing source keeps its old keys.
    last_good: tokio::sync::Mutex<Vec<Option<Vec<Arc<VerificationKey>>>>>,
    current: ArcSwap<Vec<Arc<VerificationKey>>>,
    /// Bumped whenever a key set is published, so caches of verified tokens
    /// know the keys changed.
    generation: std::sync::atomic::AtomicU64,
}

impl KeyStore {
    /// Loads every source once; any failure here stops the start.
    pub async fn load(sources: Vec<Box<dyn KeySource>>) -> Result<Arc<Self>, KeyError> {
        let store = Arc::new(Self {
            last_good: tokio::sync::Mutex::new(sources.iter().map(|_| None).collect()),
            sources,
            current: ArcSwap::from_pointee(Vec::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        for (i, source) in store.sources.iter().enumerate() {
            let keys = source.load().await?;
            store.last_good.lock().await[i] = Some(keys.into_iter().map(Arc::new).collect());
            mark_loaded(source.as_ref());
        }
        store.publish().await;
        Ok(store)
    }

    /// Asks every source again; a source that fails keeps its previous keys.
    /// Returns the number of sources that failed.
    pub async fn refresh(&self) -> usize {
        let mut failed = 0;
        for (i, source) in self.sources.iter().enumerate() {
            match source.load().await {
                Ok(keys) => {
                    self.last_good.lock().await[i] = Some(keys.into_iter().map(Arc::new).collect());
                    mark_loaded(source.as_ref());
                }
                Err(e) => {
                    failed += 1;
                    metrics::counter!("moneta_jwt_key_refresh_failures_total", "source" => source.setting())
                        .increment(1);
                    tracing::warn!(error = %e, "key refresh failed; keeping the last good keys");
                }
            }
        }
        self.publish().await;
        failed
    }

    async fn publish(&self) {
        let all: Vec<Arc<VerificationKey>> = self
            .last_good
            .lock()
            .await
            .iter()
            .flatten()
            .flatten()
            .cloned()
            .collect();
        metrics::gauge!("moneta_jwt_keys").set(all.len() as f64);
        self.current.store(Arc::new(all));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever the keys in force change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current keys; cheap, lock-free.
    pub fn current(&self) -> Arc<Vec<Arc<VerificationKey>>> {
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_with_explicit_and_implied_algorithms() {
        let doc = r#"{"keys":[
            {"kty":"oct","kid":"h","alg":"HS384","k":"c2VjcmV0"},
            {"kty":"EC","kid":"e","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}
        ]}"#;
        let keys = parse_jwks(doc).unwrap();
        assert_eq!(keys[0].alg, Algorithm::HS384);
        assert_eq!(keys[1].alg, Algorithm::ES256);
    }

    #[test]
    fn rsa_without_alg_is_refused() {
        let doc = r#"{"keys":[{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}]}"#;
        assert!(parse_jwks(doc).unwrap_err().contains("needs \"alg\""));
    }

    #[test]
    fn parse_errors_do_not_quote_the_document() {
        for doc in [
            r#""hunter2-not-a-key-set""#,
            r#"{"keys":[{"kty":"oct","alg":"HS256","k":"hunter2@@"}]}"#,
            r#"{"keys":[{"kty":"oct","alg":"HS256","k":["hunter2"]}]}"#,
        ] {
            let err = parse_jwks(doc).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
