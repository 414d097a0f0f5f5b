//! W3C ClearKey (Encrypted Media Extensions, "Clear Key"): the licence
//! request a CDM sends, `{"kids": ["<base64url key id>", …], "type":
//! "temporary"}`, and the JSON Web Key set that answers it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::model::KeyId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClearKeyError {
    /// Not a ClearKey licence request at all.
    Malformed,
    /// It asks for a key the token does not grant.
    NotGranted,
}

#[derive(Deserialize)]
struct Request {
    kids: Vec<String>,
}

/// The key a request may have: every kid it names must be the token's key
/// id (a token is for one title's key), and it must name one at least.
pub fn granted_key(body: &[u8], granted: Option<KeyId>) -> Result<KeyId, ClearKeyError> {
    // From text, not bytes: serde_json does not look inside the strings of
    // fields it skips, and a body that is no UTF-8 is no JSON (RFC 8259).
    let text = std::str::from_utf8(body).map_err(|_| ClearKeyError::Malformed)?;
    let request: Request = serde_json::from_str(text).map_err(|_| ClearKeyError::Malformed)?;
    if request.kids.is_empty() {
        return Err(ClearKeyError::Malformed);
    }
    let granted = granted.ok_or(ClearKeyError::NotGranted)?;
    let all_granted = request
        .kids
        .iter()
        .all(|kid| KeyId::from_base64url(kid) == Some(granted));
    match all_granted {
        true => Ok(granted),
        false => Err(ClearKeyError::NotGranted),
    }
}

#[derive(Serialize)]
struct JsonWebKey {
    kty: &'static str,
    kid: String,
    k: String,
}

#[derive(Serialize)]
struct License {
    keys: [JsonWebKey; 1],
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The licence: the one key, as a JSON Web Key set of a temporary session.
pub fn license(kid: KeyId, key: &[u8; 16]) -> Vec<u8> {
    let license = License {
        keys: [JsonWebKey {
            kty: "oct",
            kid: kid.to_base64url(),
            k: URL_SAFE_NO_PAD.encode(key),
        }],
        kind: "temporary",
    };
    // Plain strings only: serializing cannot fail.
    serde_json::to_vec(&license).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KID: &str = "ASOrzQEjq80BI6vNASOrzQ";

    fn key_id() -> KeyId {
        KeyId::from_base64url(KID).unwrap()
    }

    #[test]
    fn a_request_for_the_granted_key_gets_it() {
        let body = format!(r#"{{"kids": ["{KID}", "{KID}=="], "type": "temporary"}}"#);
        assert_eq!(granted_key(body.as_bytes(), Some(key_id())), Ok(key_id()));
        let answer: serde_json::Value =
            serde_json::from_slice(&license(key_id(), b"moneta-dev-key!!")).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"keys": [{"kty": "oct", "kid": KID, "k": "bW9uZXRhLWRldi1rZXkhIQ"}], "type": "temporary"})
        );
    }

    #[test]
    fn any_other_kid_or_shape_is_refused() {
        let other = "AAAAAAAAAAAAAAAAAAAAAA";
        let not_granted = [
            format!(r#"{{"kids": ["{KID}", "{other}"]}}"#),
            format!(r#"{{"kids": ["{other}"]}}"#),
            r#"{"kids": ["not base64!"]}"#.to_owned(),
            r#"{"kids": ["ASOrzQ"]}"#.to_owned(),
        ];
        for body in &not_granted {
            assert_eq!(
                granted_key(body.as_bytes(), Some(key_id())),
                Err(ClearKeyError::NotGranted),
                "{body}"
            );
        }
        let kids = format!(r#"{{"kids": ["{KID}"]}}"#);
        assert_eq!(granted_key(kids.as_bytes(), None), Err(ClearKeyError::NotGranted));
        // Bytes that are no UTF-8 in a field the request does not read.
        let mut not_text = format!(r#"{{"kids": ["{KID}"], "x": ""#).into_bytes();
        not_text.extend_from_slice(b"\xff\xfe\"}");
        assert_eq!(
            granted_key(&not_text, Some(key_id())),
            Err(ClearKeyError::Malformed)
        );
        for body in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"kids": []}"#,
            r#"{"kids": [1]}"#,
            r#"{"kids": "x"}"#,
        ] {
            assert_eq!(
                granted_key(body.as_bytes(), Some(key_id())),
                Err(ClearKeyError::Malformed),
                "{body}"
            );
        }
    }

    /// Deterministic pseudo-random bytes (xorshift), so a failure repeats.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    #[test]
    fn random_requests_never_get_another_key() {
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            "\"kids\"",
            ":",
            ",",
            "\"",
            KID,
            "AAAAAAAAAAAAAAAAAAAAAA",
            "==",
            "\"type\"",
            "\"temporary\"",
            "null",
            "1",
            "\\u0000",
            "ASOrzQEjq80BI6vNASOrz",
            "-_",
            " ",
        ];
        let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
        for _ in 0..50_000 {
            let n = (noise.next() % 24) as usize;
            let body: String = (0..n).map(|_| noise.pick(&pieces)).collect();
            // Whatever it is, the only key ever granted is the token's own.
            if let Ok(kid) = granted_key(body.as_bytes(), Some(key_id())) {
                assert_eq!(kid, key_id(), "{body}");
            }
            assert!(granted_key(body.as_bytes(), None).is_err(), "{body}");
        }
    }
}
