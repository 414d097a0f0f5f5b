//! Known attacks on JWT verification against a Moneta that trusts one RS256
//! key (JWKS file) and the dev HS256 secret, with issuer and audience set.
//! Each must end in `401 invalid_token`; the untouched token must pass.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use crate::helpers::{assert_invalid_token, spawn_app_with};

const ISSUER: &str = "https://id.moneta.test";
const AUDIENCE: &str = "moneta-playback";
const KID: &str = "rs-1";

struct RsaKey {
    pem: Vec<u8>,
    private: RsaPrivateKey,
}

impl RsaKey {
    fn generate(dir: &Path, name: &str) -> RsaKey {
        let (pem, private) = crate::support::openssl_rsa_key(dir, name);
        RsaKey { pem, private }
    }

    fn jwk(&self, kid: &str) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": b64(&self.private.n().to_bytes_be()), "e": b64(&self.private.e().to_bytes_be()),
        })
    }

    fn encoding(&self) -> EncodingKey {
        EncodingKey::from_rsa_pem(&self.pem).expect("encoding key")
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_json(v: &Value) -> String {
    b64(v.to_string().as_bytes())
}

/// Signs exactly the given header and claims, whatever they say.
fn compact(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("sign");
    format!("{message}.{signature}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn jwt_attack_table_is_refused_with_invalid_token() {
    let dir = tempfile::tempdir().unwrap();
    let ours = RsaKey::generate(dir.path(), "ours");
    let theirs = RsaKey::generate(dir.path(), "theirs");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [ours.jwk(KID)]}).to_string()).unwrap();
    let jwks = jwks.to_string_lossy();
    let app = spawn_app_with(&[
        ("MONETA_JWT_JWKS_FILE", &jwks),
        ("MONETA_JWT_ISSUER", ISSUER),
        ("MONETA_JWT_AUDIENCE", AUDIENCE),
    ])
    .await;

    let rs256 = |kid: Option<&str>| match kid {
        Some(kid) => json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
        None => json!({"alg": "RS256", "typ": "JWT"}),
    };
    let claims = json!({"sub": "u-basic", "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE});
    let with = |patch: Value| {
        let mut c = claims.clone();
        for (k, v) in patch.as_object().unwrap() {
            match v {
                Value::Null => c.as_object_mut().unwrap().remove(k),
                v => c.as_object_mut().unwrap().insert(k.clone(), v.clone()),
            };
        }
        c
    };
    let signed = |claims: &Value| compact(&rs256(Some(KID)), claims, &ours.encoding(), Algorithm::RS256);
    let valid = signed(&claims);

    // Controls: the key is trusted, and `kid` is optional.
    for token in [
        valid.clone(),
        compact(&rs256(None), &claims, &ours.encoding(), Algorithm::RS256),
    ] {
        let resp = app.playback_info("m-0001", &token).await;
        assert_eq!(resp.status(), 200, "control token refused");
    }

    let public_der = ours.private.to_public_key().to_public_key_der().unwrap();
    let spki_pem = ours
        .private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let pkcs1_pem = ours.private.to_public_key().to_pkcs1_pem(LineEnding::LF).unwrap();
    let hmac_with = |alg: Algorithm, name: &str, kid: Option<&str>, secret: &[u8]| {
        let mut header = json!({"alg": name, "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        compact(&header, &claims, &EncodingKey::from_secret(secret), alg)
    };
    let (h, p, s) = {
        let mut parts = valid.split('.');
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        )
    };
    let unsigned = |header: Value| format!("{}.{p}.", b64_json(&header));

    let cases: Vec<(&str, String)> = vec![
        // alg none and its spellings
        ("alg none", unsigned(json!({"alg": "none", "kid": KID}))),
        ("alg None", unsigned(json!({"alg": "None", "kid": KID}))),
        ("alg NONE", unsigned(json!({"alg": "NONE"}))),
        (
            "alg none, signature kept",
            format!("{}.{p}.{s}", b64_json(&json!({"alg": "none", "kid": KID}))),
        ),
        ("alg missing", unsigned(json!({"kid": KID}))),
        ("alg empty", unsigned(json!({"alg": "", "kid": KID}))),
        // algorithm confusion: the public key as an HMAC secret
        (
            "HS256 keyed with the SPKI PEM, kid",
            hmac_with(Algorithm::HS256, "HS256", Some(KID), spki_pem.as_bytes()),
        ),
        (
            "HS256 keyed with the SPKI PEM, no kid",
            hmac_with(Algorithm::HS256, "HS256", None, spki_pem.as_bytes()),
        ),
        (
            "HS256 keyed with the PKCS#1 PEM",
            hmac_with(Algorithm::HS256, "HS256", Some(KID), pkcs1_pem.as_bytes()),
        ),
        (
            "HS256 keyed with the DER",
            hmac_with(Algorithm::HS256, "HS256", Some(KID), public_der.as_bytes()),
        ),
        (
            "HS512 keyed with the SPKI PEM",
            hmac_with(Algorithm::HS512, "HS512", Some(KID), spki_pem.as_bytes()),
        ),
        // the right key under another algorithm than the one it is pinned to
        (
            "RS512 with the RS256 key",
            compact(
                &json!({"alg": "RS512", "kid": KID}),
                &claims,
                &ours.encoding(),
                Algorithm::RS512,
            ),
        ),
        (
            "PS256 with the RS256 key",
            compact(
                &json!({"alg": "PS256", "kid": KID}),
                &claims,
                &ours.encoding(),
                Algorithm::PS256,
            ),
        ),
        (
            "RS256 signature under an HS256 header",
            format!("{}.{p}.{s}", b64_json(&json!({"alg": "HS256", "kid": KID}))),
        ),
        // key selection
        (
            "unknown kid",
            compact(&rs256(Some("rs-2")), &claims, &ours.encoding(), Algorithm::RS256),
        ),
        (
            "kid path traversal",
            compact(
                &rs256(Some("../../../../dev/null")),
                &claims,
                &ours.encoding(),
                Algorithm::RS256,
            ),
        ),
        (
            "kid of another type",
            compact(
                &json!({"alg": "RS256", "kid": 1}),
                &claims,
                &ours.encoding(),
                Algorithm::RS256,
            ),
        ),
        (
            "another key under our kid",
            compact(&rs256(Some(KID)), &claims, &theirs.encoding(), Algorithm::RS256),
        ),
        (
            "embedded jwk of the signer",
            compact(
                &json!({"alg": "RS256", "kid": KID, "jwk": theirs.jwk(KID)}),
                &claims,
                &theirs.encoding(),
                Algorithm::RS256,
            ),
        ),
        (
            "jku pointing elsewhere",
            compact(
                &json!({"alg": "RS256", "kid": "x", "jku": "http://127.0.0.1:1/jwks.json"}),
                &claims,
                &theirs.encoding(),
                Algorithm::RS256,
            ),
        ),
        (
            "critical extension",
            compact(
                &json!({"alg": "RS256", "kid": KID, "crit": ["exp"], "exp": 1}),
                &claims,
                &ours.encoding(),
                Algorithm::RS256,
            ),
        ),
        // tampering and shape
        (
            "claims swapped, signature kept",
            format!("{h}.{}.{s}", b64_json(&with(json!({"sub": "u-premium"})))),
        ),
        (
            "signature of other claims",
            format!(
                "{h}.{p}.{}",
                signed(&with(json!({"sub": "x"}))).rsplit('.').next().unwrap()
            ),
        ),
        ("empty signature", format!("{h}.{p}.")),
        ("signature cut short", format!("{h}.{p}.{}", &s[..s.len() - 4])),
        ("two segments", format!("{h}.{p}")),
        ("one segment", h.clone()),
        ("empty token", String::new()),
        ("only dots", "..".into()),
        ("extra segment", format!("{valid}.{s}")),
        ("five segments (JWE shape)", format!("{h}.{p}.{s}.{s}.{s}")),
        ("leading dot", format!(".{valid}")),
        // encodings
        (
            "standard base64 signature",
            format!("{h}.{p}.{}", s.replace('-', "+").replace('_', "/") + "+/"),
        ),
        ("padded signature", format!("{valid}==")),
        ("bad base64 header", format!("!!{h}.{p}.{s}")),
        ("bad base64 payload", format!("{h}.{p}$.{s}")),
        (
            "header is not JSON",
            format!("{}.{p}.{s}", b64(b"{\"alg\":\"RS256\"")),
        ),
        ("payload is not JSON", compact_raw(&h, b"not json", &ours)),
        // size
        (
            "huge header",
            compact(
                &json!({"alg": "RS256", "kid": KID, "pad": "x".repeat(9_000)}),
                &claims,
                &ours.encoding(),
                Algorithm::RS256,
            ),
        ),
        // time
        ("expired beyond leeway", signed(&with(json!({"exp": now() - 60})))),
        ("not yet valid", signed(&with(json!({"nbf": now() + 300})))),
        ("no exp", signed(&with(json!({"exp": null})))),
        (
            "exp as a string",
            signed(&with(json!({"exp": (now() + 600).to_string()}))),
        ),
        ("exp negative", signed(&with(json!({"exp": -1})))),
        // issuer and audience
        ("wrong iss", signed(&with(json!({"iss": "https://evil.test"})))),
        ("no iss", signed(&with(json!({"iss": null})))),
        ("wrong aud", signed(&with(json!({"aud": "someone-else"})))),
        ("aud list without ours", signed(&with(json!({"aud": ["a", "b"]})))),
        ("no aud", signed(&with(json!({"aud": null})))),
        // the dev HS256 secret is trusted, but issuer and audience still apply
        (
            "dev token without iss/aud",
            crate::support::mint_token("u-basic", "basic", 1, "KR"),
        ),
    ];
    assert!(cases.iter().all(|(_, t)| t != &valid));

    for (name, token) in &cases {
        assert_invalid_token(app.playback_info("m-0001", token).await, name).await;
    }
    assert!(cases.len() >= 45, "{}", cases.len());
    app.shutdown().await;
}

/// A token whose payload segment is arbitrary bytes, correctly signed.
fn compact_raw(header_b64: &str, payload: &[u8], key: &RsaKey) -> String {
    let message = format!("{header_b64}.{}", b64(payload));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding(), Algorithm::RS256).expect("sign");
    format!("{message}.{signature}")
}
