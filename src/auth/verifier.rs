//! Token verification per CONTRACT §3 "JWT".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// Tokens already verified, with the key set that verified them. Clients
    /// send the same token for its whole life, and the signature check and
    /// two JSON parses were the largest cost of a warm request.
    verified: moka::sync::Cache<String, Verified, foldhash::fast::RandomState>,
}

#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    /// The key set in force when verified: after a rotation the token is
    /// checked again, so a removed key stops working at once.
    key_set: u64,
}

/// Verified tokens kept, at most (about 1 KiB each).
const VERIFIED_CAPACITY: u64 = 20_000;
const VERIFIED_TTL: Duration = Duration::from_secs(60);

impl Verifier {
    pub fn new(keys: Arc<KeyStore>, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let validations = ALGORITHMS
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                // `exp` and `nbf` are checked by `within_time`: jsonwebtoken
                // refuses fractional NumericDates, which RFC 7519 allows.
                // `exp` is required by `Claims` itself.
                v.validate_exp = false;
                v.validate_nbf = false;
                let mut required = vec!["sub"];
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
        // foldhash, seeded per process, instead of SipHash: a token is a few
        // hundred bytes, hashed on every request (~0.7 k instructions with
        // SipHash). Only verified tokens are inserted, so a client cannot
        // aim collisions at the table.
        let verified = moka::sync::Cache::builder()
            .max_capacity(VERIFIED_CAPACITY)
            .time_to_live(VERIFIED_TTL)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            keys,
            validations,
            verified,
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Verifies a compact JWS and returns its claims.
    /// Verifies a compact JWS and returns its claims; a token verified before
    /// under the same key set only has its time claims checked again.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        let key_set = self.keys.generation();
        if let Some(hit) = self.verified.get(token)
            && hit.key_set == key_set
            && within_time(&hit.claims)
        {
            return Ok(hit.claims);
        }
        let claims = Arc::new(self.verify_uncached(token)?);
        self.verified.insert(
            token.to_owned(),
            Verified {
                claims: claims.clone(),
                key_set,
            },
        );
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid);
        }
        // `alg: none` and unknown algorithms fail here: the header type has no such variant.
        let header = decode_header(token).map_err(|_| AuthError::Invalid)?;
        // RFC 7515 §4.1.11: extensions listed as critical must be understood, and none is.
        if header.crit.is_some() {
            return Err(AuthError::Invalid);
        }
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
                return within_time(&data.claims)
                    .then_some(data.claims)
                    .ok_or(AuthError::Invalid);
            }
        }
        Err(AuthError::Invalid)
    }
}

/// `exp` and `nbf` against now, with the same leeway as the full check.
fn within_time(claims: &Claims) -> bool {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    super::claims::in_force(claims.exp, claims.nbf, now, LEEWAY_S as i64)
}

/// Signs a development token with an HS256 secret (`moneta token`, tests, benches).
pub fn mint_hs256<C: serde::Serialize>(
    secret: &str,
    claims: &C,
) -> Result<String, jsonwebtoken::errors::Error> {
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
        let sources: Vec<Box<dyn KeySource>> = vec![Box::new(StaticSecret(Secret::from("s3cret")))];
        Verifier::new(KeyStore::load(sources).await.unwrap(), iss, aud)
    }

    fn claims(exp_offset: i64) -> Claims {
        Claims {
            sub: crate::model::UserId::parse("u1").unwrap(),
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
        assert_eq!(v.verify(&t).unwrap().sub.as_str(), "u1");
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

    /// Public halves only: an RSA key (`r`, RS256), the RFC 7517 P-256 example
    /// (`e`, ES256), the RFC 8037 Ed25519 example (`o`) and a shared secret
    /// (`h`, HS384) beside the HS256 `StaticSecret`.
    const RSA_N: &str = "0nvIcmqoCit7jPdr5iMp2QyaELNdjXMtrEX7FbQqzcE1juelq-nSga8mTYLzeqkln0q3xdYy0ot6nuU4ZdjdNkkcHjjV1Z7nDgUeBnYT4W0r9KTDPHtJId-OAwxdwHECoSXKXCjIaWjqlri8f1LOwYFlp_w3QMLw7re5aJarSHun1REqqdC1C9khMbMDNB8GtHF-zjBsnPEO2jnNKzznemyecg3xrjGHaN3gGGnwVO1MdJTiXGyY4MU25Bmp_d3NweO1Dmgp9y0QCEvzQqz--0cLSJ-oJ-9z5AHn4yXrknremSx7ms54tydpZiyuMbhagZ4Sqd2mNMIR8rltDd1DLQ";
    const RSA_SPKI_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA0nvIcmqoCit7jPdr5iMp
2QyaELNdjXMtrEX7FbQqzcE1juelq+nSga8mTYLzeqkln0q3xdYy0ot6nuU4Zdjd
NkkcHjjV1Z7nDgUeBnYT4W0r9KTDPHtJId+OAwxdwHECoSXKXCjIaWjqlri8f1LO
wYFlp/w3QMLw7re5aJarSHun1REqqdC1C9khMbMDNB8GtHF+zjBsnPEO2jnNKzzn
emyecg3xrjGHaN3gGGnwVO1MdJTiXGyY4MU25Bmp/d3NweO1Dmgp9y0QCEvzQqz+
+0cLSJ+oJ+9z5AHn4yXrknremSx7ms54tydpZiyuMbhagZ4Sqd2mNMIR8rltDd1D
LQIDAQAB
-----END PUBLIC KEY-----
";

    async fn mixed_verifier() -> Verifier {
        let jwks = format!(
            r#"{{"keys":[
            {{"kty":"RSA","kid":"r","alg":"RS256","use":"sig","n":"{RSA_N}","e":"AQAB"}},
            {{"kty":"EC","kid":"e","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}},
            {{"kty":"OKP","kid":"o","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}},
            {{"kty":"oct","kid":"h","alg":"HS384","k":"c2VjcmV0LWZvci1oczM4NA"}}
        ]}}"#
        );
        let keys = crate::auth::keys::parse_jwks(&jwks).unwrap();
        struct Fixed(std::sync::Mutex<Option<Vec<crate::auth::VerificationKey>>>);
        impl KeySource for Fixed {
            fn setting(&self) -> &'static str {
                "test"
            }
            fn load(
                &self,
            ) -> futures::future::BoxFuture<
                '_,
                Result<Vec<crate::auth::VerificationKey>, crate::auth::keys::KeyError>,
            > {
                let keys = self.0.lock().unwrap().take().unwrap_or_default();
                Box::pin(async move { Ok(keys) })
            }
        }
        let sources: Vec<Box<dyn KeySource>> = vec![
            Box::new(StaticSecret(Secret::from("s3cret"))),
            Box::new(Fixed(std::sync::Mutex::new(Some(keys)))),
        ];
        Verifier::new(KeyStore::load(sources).await.unwrap(), None, None)
    }

    fn sign_with(alg: Algorithm, kid: Option<&str>, secret: &[u8], claims: &Claims) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[tokio::test]
    async fn hmac_keyed_with_the_rsa_public_key_is_refused() {
        let v = mixed_verifier().await;
        let c = claims(60);
        let n = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, RSA_N).unwrap();
        for secret in [RSA_SPKI_PEM.as_bytes(), RSA_SPKI_PEM.trim_end().as_bytes(), &n] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                for kid in [None, Some("r"), Some("h")] {
                    let token = sign_with(alg, kid, secret, &c);
                    assert_eq!(
                        v.verify(&token).err(),
                        Some(AuthError::Invalid),
                        "{alg:?} {kid:?}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_key_verifies_only_its_own_algorithm() {
        let v = mixed_verifier().await;
        let c = claims(60);
        let secret = b"secret-for-hs384";
        assert!(
            v.verify(&sign_with(Algorithm::HS384, Some("h"), secret, &c))
                .is_ok()
        );
        assert!(v.verify(&sign_with(Algorithm::HS384, None, secret, &c)).is_ok());
        for alg in [Algorithm::HS256, Algorithm::HS512] {
            assert!(
                v.verify(&sign_with(alg, Some("h"), secret, &c)).is_err(),
                "{alg:?}"
            );
        }
        // The dev secret carries no kid, so a kid never selects it.
        assert!(
            v.verify(&sign_with(Algorithm::HS256, Some("h"), b"s3cret", &c))
                .is_err()
        );
        assert!(
            v.verify(&sign_with(Algorithm::HS256, None, b"s3cret", &c))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn critical_header_extensions_are_refused() {
        let v = verifier(None, None).await;
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["b64".into()]);
        let token = encode(&header, &claims(60), &EncodingKey::from_secret(b"s3cret")).unwrap();
        assert_eq!(v.verify(&token).err(), Some(AuthError::Invalid));
    }

    #[tokio::test]
    async fn not_before_leeway_is_thirty_seconds() {
        let v = verifier(None, None).await;
        let mut c = claims(600);
        c.nbf = Some(chrono::Utc::now().timestamp() + 20);
        assert!(v.verify(&mint_hs256("s3cret", &c).unwrap()).is_ok());
        c.nbf = Some(chrono::Utc::now().timestamp() + 45);
        assert!(v.verify(&mint_hs256("s3cret", &c).unwrap()).is_err());
    }

    #[tokio::test]
    async fn fractional_numeric_dates_are_dates() {
        let v = verifier(None, None).await;
        let now = chrono::Utc::now().timestamp() as f64 + 0.25;
        let token = |exp: f64, nbf: f64| {
            let claims = serde_json::json!({"sub": "u1", "exp": exp, "iat": now, "nbf": nbf});
            mint_hs256("s3cret", &claims).unwrap()
        };
        assert!(v.verify(&token(now + 3600.5, now - 0.5)).is_ok());
        assert!(v.verify(&token(now - 20.5, now)).is_ok());
        assert!(v.verify(&token(now - 45.5, now - 60.0)).is_err());
        assert!(v.verify(&token(now + 3600.0, now + 45.5)).is_err());
        // Never expiring, and not a reason to overflow.
        let far = serde_json::json!({"sub": "u1", "exp": u64::MAX, "nbf": i64::MIN});
        assert!(v.verify(&mint_hs256("s3cret", &far).unwrap()).is_ok());
        let missing = serde_json::json!({"sub": "u1"});
        assert!(v.verify(&mint_hs256("s3cret", &missing).unwrap()).is_err());
    }

    /// xorshift64: reproducible, and enough to stir bytes around.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn b64url(bytes: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    }

    /// Well-formed tokens for every algorithm and key, with unverifiable signatures.
    fn forged_seeds(rng: &mut Rng) -> Vec<Vec<u8>> {
        let algs = [
            "HS256", "HS384", "HS512", "RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA", "none", "None",
            "",
        ];
        let kids = [
            "",
            r#","kid":"r""#,
            r#","kid":"e""#,
            r#","kid":"o""#,
            r#","kid":"h""#,
            r#","kid":7"#,
        ];
        let far = chrono::Utc::now().timestamp() + 600;
        let bodies = [
            format!(r#"{{"sub":"u1","exp":{far}}}"#),
            format!(r#"{{"sub":"","exp":{far}}}"#),
            r#"{"sub":"u1","exp":18446744073709551615}"#.to_owned(),
            r#"{"sub":"u1","exp":-1,"nbf":1e400}"#.to_owned(),
            r#"{"sub":["u1"],"exp":"soon"}"#.to_owned(),
            "[]".to_owned(),
            "null".to_owned(),
        ];
        let mut seeds = Vec::new();
        for alg in algs {
            for kid in kids {
                let header = format!(r#"{{"alg":"{alg}","typ":"JWT"{kid}}}"#);
                let body = rng.pick(&bodies).clone();
                let sig_len = *rng.pick(&[0usize, 1, 32, 48, 64, 96, 256, 257]);
                let sig = rng.bytes(sig_len);
                seeds.push(
                    format!(
                        "{}.{}.{}",
                        b64url(header.as_bytes()),
                        b64url(body.as_bytes()),
                        b64url(&sig)
                    )
                    .into_bytes(),
                );
            }
        }
        seeds
    }

    const NOISE: &[u8] = b"AZaz09-_.=+/ \t%\"{}\\\x00\x7f\xc3\xa9";

    fn mutate(rng: &mut Rng, token: &mut Vec<u8>) {
        let at = rng.below(token.len() + 1);
        match rng.below(9) {
            0 if !token.is_empty() => {
                let last = token.len() - 1;
                token[at.min(last)] = *rng.pick(NOISE);
            }
            1 => token.insert(at, *rng.pick(NOISE)),
            2 if at < token.len() => {
                token.remove(at);
            }
            3 => token.truncate(at),
            4 => {
                let end = (at + rng.below(64)).min(token.len());
                let copy = token[at..end].to_vec();
                let to = rng.below(token.len() + 1);
                token.splice(to..to, copy);
            }
            5 => {
                let mut parts: Vec<Vec<u8>> = token.split(|&b| b == b'.').map(<[u8]>::to_vec).collect();
                let (i, j) = (rng.below(parts.len()), rng.below(parts.len()));
                parts.swap(i, j);
                *token = parts.join(&b'.');
            }
            6 => {
                let len = rng.below(300);
                *token = rng.bytes(len);
            }
            7 => {
                // Around the size limit, on both sides of it.
                let target = MAX_TOKEN_BYTES - 2 + rng.below(5);
                token.resize(target.max(token.len()), b'A');
            }
            _ => token.extend_from_slice(b".e30"),
        }
    }

    /// The stable counterpart of `fuzz/fuzz_targets/verify_token.rs`: garbage and
    /// near-misses must come back as `Invalid`, never as a panic or a success.
    #[tokio::test]
    async fn mutated_tokens_never_panic_and_never_pass() {
        let v = mixed_verifier().await;
        let valid = mint_hs256("s3cret", &claims(600)).unwrap();
        assert!(v.verify(&valid).is_ok());
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut seeds = forged_seeds(&mut rng);
        seeds.push(valid.clone().into_bytes());
        for round in 0..5_000 {
            let mut token = rng.pick(&seeds).clone();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut token);
            }
            let text = String::from_utf8_lossy(&token);
            let result = v.verify(&text);
            if text != valid {
                assert_eq!(result.err(), Some(AuthError::Invalid), "round {round}: {text:?}");
            }
        }
    }
}
