//! Arbitrary bytes as a bearer token: the verifier must answer, never panic.
//! Run with `cargo +nightly fuzz run verify_token` from the repository root.

#![no_main]

use std::sync::OnceLock;

use futures::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use moneta::auth::keys::{KeyError, StaticSecret, parse_jwks};
use moneta::auth::{KeySource, KeyStore, VerificationKey, Verifier};
use moneta::config::Secret;

/// Public keys of every family the verifier supports, so inputs that name
/// them reach the signature checks: RS256 (`r`), ES256 (`e`), EdDSA (`o`),
/// and a shared HS384 secret (`h`).
const JWKS: &str = r#"{"keys":[
  {"kty":"RSA","kid":"r","alg":"RS256","n":"0nvIcmqoCit7jPdr5iMp2QyaELNdjXMtrEX7FbQqzcE1juelq-nSga8mTYLzeqkln0q3xdYy0ot6nuU4ZdjdNkkcHjjV1Z7nDgUeBnYT4W0r9KTDPHtJId-OAwxdwHECoSXKXCjIaWjqlri8f1LOwYFlp_w3QMLw7re5aJarSHun1REqqdC1C9khMbMDNB8GtHF-zjBsnPEO2jnNKzznemyecg3xrjGHaN3gGGnwVO1MdJTiXGyY4MU25Bmp_d3NweO1Dmgp9y0QCEvzQqz--0cLSJ-oJ-9z5AHn4yXrknremSx7ms54tydpZiyuMbhagZ4Sqd2mNMIR8rltDd1DLQ","e":"AQAB"},
  {"kty":"EC","kid":"e","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
  {"kty":"OKP","kid":"o","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
  {"kty":"oct","kid":"h","alg":"HS384","k":"c2VjcmV0LWZvci1oczM4NA"}
]}"#;

struct EmbeddedJwks;

impl KeySource for EmbeddedJwks {
    fn setting(&self) -> &'static str {
        "fuzz"
    }
    fn load(&self) -> BoxFuture<'_, Result<Vec<VerificationKey>, KeyError>> {
        Box::pin(async {
            parse_jwks(JWKS).map_err(|reason| KeyError {
                setting: "fuzz",
                reason,
            })
        })
    }
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let sources: Vec<Box<dyn KeySource>> = vec![
            Box::new(StaticSecret(Secret::new("fuzz-secret"))),
            Box::new(EmbeddedJwks),
        ];
        let keys = futures::executor::block_on(KeyStore::load(sources)).expect("fuzz keys load");
        Verifier::new(keys, Some("https://id.example"), Some("moneta"))
    })
}

fuzz_target!(|data: &[u8]| {
    // Only text reaches the verifier; lossy decoding keeps inputs that are not
    // UTF-8 useful instead of discarding them.
    let token = String::from_utf8_lossy(data);
    let _ = verifier().verify(&token);
});
