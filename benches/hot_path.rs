//! Micro-benchmarks of the hot path's CPU work: JWT verification per
//! algorithm, answer serialization and CloudFront URL signing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moneta::auth::keys::{JwksFile, KeySource};
use moneta::auth::{Claims, KeyStore, Verifier};
use moneta::model::{Drm, PlaybackInfo, Stream, Subtitle};
use moneta::playback::cdn::CloudFrontSigner;
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;

/// A P-256 key made for this benchmark only.
const EC_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp8Hr3eagCnn5MaaG
BckF23RxilVU2Naoz2aR45tTtnahRANCAAR+p3qCv4QxYC9JxuAyrmNs2yB0uLRA
uWik1csW6NxFsFSuF+GF+bpfAHnJlBzRtd8QMFLhIaJ5f+rVQxTVic76
-----END PRIVATE KEY-----";

fn claims() -> Claims {
    Claims {
        sub: moneta::model::UserId::parse("bench-user").expect("a valid user id"),
        exp: chrono::Utc::now().timestamp() + 3600,
        iat: None,
        nbf: None,
        iss: None,
        plan: Some("premium".into()),
        max_streams: Some(4),
        country: Some("KR".into()),
    }
}

/// A verifier whose key set holds exactly the public half of `key`.
fn verifier(
    rt: &tokio::runtime::Runtime,
    key: &EncodingKey,
    alg: Algorithm,
    dir: &std::path::Path,
) -> Verifier {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk");
    jwk.common.key_id = Some("bench".into());
    let path = dir.join(format!("{alg:?}.json"));
    std::fs::write(
        &path,
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).expect("jwks"),
    )
    .expect("write");
    let sources: Vec<Box<dyn KeySource>> = vec![Box::new(JwksFile(path))];
    Verifier::new(rt.block_on(KeyStore::load(sources)).expect("keys"), None, None)
}

fn jwt(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa_pem = RsaPrivateKey::new(&mut os_rng(), 2048)
        .expect("rsa key")
        .to_pkcs1_pem(Default::default())
        .expect("pem");
    let keys = [
        (
            Algorithm::HS256,
            EncodingKey::from_secret(b"bench-only-secret-of-some-length"),
        ),
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).expect("rsa"),
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY.as_bytes()).expect("ec"),
        ),
    ];
    let mut group = c.benchmark_group("jwt_verify");
    for (alg, key) in &keys {
        let v = verifier(&rt, key, *alg, dir.path());
        let mut header = Header::new(*alg);
        header.kid = Some("bench".into());
        let token = jsonwebtoken::encode(&header, &claims(), key).expect("sign");
        assert!(v.verify(&token).is_ok());
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| v.verify(std::hint::black_box(&token)))
        });
    }
    group.finish();
}

/// The operating system RNG in the rand_core version rsa 0.9 expects.
fn os_rng() -> rsa::rand_core::OsRng {
    rsa::rand_core::OsRng
}

fn answer() -> PlaybackInfo {
    PlaybackInfo {
        content_id: "m-0001".into(),
        title: "Parasite".into(),
        duration_ms: 7_920_000,
        streams: vec![
            Stream {
                protocol: "dash".into(),
                url: "https://cdn.example.com/m-0001/dash/manifest.mpd?Expires=1700000000&Signature=abc&Key-Pair-Id=K".into(),
                drm: Some(Drm {
                    system: "widevine".into(),
                    license_url: "https://drm.example.com/widevine".into(),
                    key_id: "0123abcd".into(),
                    license_token: None,
                    license_request_headers: None,
                    certificate_url: None,
                }),
            },
            Stream { protocol: "hls".into(), url: "https://cdn.example.com/m-0001/hls/master.m3u8".into(), drm: None },
        ],
        subtitles: vec![
            Subtitle { language: "ko".into(), url: "https://cdn.example.com/m-0001/subs/ko.vtt".into() },
            Subtitle { language: "en".into(), url: "https://cdn.example.com/m-0001/subs/en.vtt".into() },
        ],
        markers: vec![],
        resume_position_ms: 12_345,
        watched: false,
        degraded: false,
        cdn_cookies: None,
    }
}

fn serialization(c: &mut Criterion) {
    let info = answer();
    c.bench_function("serialize_playback_info", |b| {
        b.iter(|| serde_json::to_vec(std::hint::black_box(&info)).expect("json"))
    });
}

fn signing(c: &mut Criterion) {
    let key = RsaPrivateKey::new(&mut os_rng(), 2048).expect("rsa key");
    let signer = Arc::new(CloudFrontSigner::new(
        "K2JCJMDEHXQW5F",
        key,
        Duration::from_secs(21_600),
    ));
    let url = "https://d111111abcdef8.cloudfront.net/m-0001/dash/manifest.mpd";
    let mut group = c.benchmark_group("cloudfront_sign");
    group.bench_function("rsa_sha1_uncached", |b| {
        b.iter(|| signer.sign_with_expiry(std::hint::black_box(url), 1_700_000_000))
    });
    group.bench_function("cached_within_step", |b| {
        b.iter(|| signer.sign_at(std::hint::black_box(url), SystemTime::now()))
    });
    group.finish();
}

criterion_group!(benches, jwt, serialization, signing);
criterion_main!(benches);
