//! Micro-benchmarks of the CPU work of a warm request, one group per hot
//! function: token verification, assembling the answer, CloudFront signing,
//! serializing the answer and writing the access-log line.
//!
//! `cargo bench --bench hot_path`; the table in `docs/profiling.md` comes
//! from `-- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moneta::auth::keys::{JwksFile, KeySource};
use moneta::auth::{Claims, KeyStore, Verifier};
use moneta::config::{DrmSettings, ResumeSettings, Secret};
use moneta::model::{ContentPlayback, Entitlement, ResumePoint, Sourced};
use moneta::playback::cdn::{Cdn, CloudFrontSigner};
use moneta::playback::{Answers, Audience, Authorized};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;

/// A P-256 key made for this benchmark only.
const EC_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp8Hr3eagCnn5MaaG
BckF23RxilVU2Naoz2aR45tTtnahRANCAAR+p3qCv4QxYC9JxuAyrmNs2yB0uLRA
uWik1csW6NxFsFSuF+GF+bpfAHnJlBzRtd8QMFLhIaJ5f+rVQxTVic76
-----END PRIVATE KEY-----";

const CDN_BASE: &str = "https://d111111abcdef8.cloudfront.net";

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

/// The operating system RNG in the rand_core version rsa 0.9 expects.
fn os_rng() -> rsa::rand_core::OsRng {
    rsa::rand_core::OsRng
}

/// One 2048-bit key for every RSA use here: generating one takes a while.
fn rsa_key() -> RsaPrivateKey {
    static KEY: std::sync::OnceLock<RsaPrivateKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut os_rng(), 2048).expect("rsa key"))
        .clone()
}

/// A verifier whose key set holds exactly the public half of `key`, read
/// from a JWKS file (so a refresh re-reads it).
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

/// `verify/<alg>`: a token seen for the first time (signature, header and
/// claims parsed, the result cached). A key-set refresh before each call,
/// outside the timing, makes the cached result unusable, as after a key
/// rotation. `verify/cache_hit`: the same token again, what nearly every
/// request pays, whatever the algorithm.
fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa_pem = rsa_key().to_pkcs1_pem(Default::default()).expect("pem");
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
    let mut group = c.benchmark_group("verify");
    for (alg, key) in &keys {
        let v = verifier(&rt, key, *alg, dir.path());
        let mut header = Header::new(*alg);
        header.kid = Some("bench".into());
        let token = jsonwebtoken::encode(&header, &claims(), key).expect("sign");
        assert!(v.verify(&token).is_ok());
        if *alg == Algorithm::HS256 {
            group.bench_function("cache_hit", |b| b.iter(|| v.verify(black_box(&token))));
        }
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    rt.block_on(v.keys().refresh());
                    let started = Instant::now();
                    let verified = v.verify(black_box(&token));
                    spent += started.elapsed();
                    assert!(verified.is_ok());
                }
                spent
            })
        });
    }
    group.finish();
}

/// m-0001 as the internal API describes it: DASH with Widevine, HLS, two
/// subtitle languages, two markers.
fn title() -> ContentPlayback {
    serde_json::from_value(serde_json::json!({
        "content_id": "m-0001",
        "title": "Parasite",
        "duration_ms": 7_920_000,
        "available_countries": null,
        "required_plans": [],
        "streams": [
            {"protocol": "dash", "path": "/m-0001/dash/manifest.mpd",
             "drm": {"system": "widevine", "key_id": "0123abcd0123abcd0123abcd0123abcd"}},
            {"protocol": "hls", "path": "/m-0001/hls/master.m3u8", "drm": null}
        ],
        "subtitles": [
            {"language": "ko", "path": "/m-0001/subs/ko.vtt"},
            {"language": "en", "path": "/m-0001/subs/en.vtt"}
        ],
        "markers": [
            {"type": "intro", "start_ms": 30_000, "end_ms": 105_000},
            {"type": "credits", "start_ms": 7_680_000, "end_ms": 7_920_000}
        ]
    }))
    .expect("a title")
}

fn authorized() -> Authorized {
    Authorized {
        content: Sourced::fresh(Arc::new(title())),
        entitlement: Sourced::fresh(Entitlement {
            user_id: "bench-user".into(),
            plan: "premium".into(),
            max_streams: 4,
            active: true,
        }),
        position: Sourced::fresh(ResumePoint {
            position_ms: 1_234_000,
            completed: false,
        }),
    }
}

fn drm_settings(token_secret: Option<&str>) -> DrmSettings {
    DrmSettings {
        license_url_widevine: "https://drm.example.com/widevine".into(),
        license_url_playready: "https://drm.example.com/playready".into(),
        license_url_fairplay: "https://drm.example.com/fairplay".into(),
        token_secret: token_secret.map(Secret::from),
        token_ttl: Duration::from_secs(300),
        fairplay_certificate_url: None,
        proxy: None,
    }
}

fn signer() -> CloudFrontSigner {
    CloudFrontSigner::new("K2JCJMDEHXQW5F", rsa_key(), Duration::from_secs(21_600))
}

const RESUME: ResumeSettings = ResumeSettings {
    min_pct: 5,
    max_pct: 90,
};

/// The answers of the three deployments: plain CDN URLs; CloudFront-signed
/// URLs and cookies; signed and with DRM licence tokens.
fn answers() -> [(&'static str, Answers); 3] {
    [
        (
            "plain_urls",
            Answers::new(Cdn::new(CDN_BASE, None), drm_settings(None), RESUME),
        ),
        (
            "cloudfront_signed",
            Answers::new(Cdn::new(CDN_BASE, Some(signer())), drm_settings(None), RESUME),
        ),
        (
            "signed_with_licence_tokens",
            Answers::new(
                Cdn::new(CDN_BASE, Some(signer())),
                drm_settings(Some("bench-only-drm-token-secret")),
                RESUME,
            ),
        ),
    ]
}

/// Building the playback answer from an authorized title and the caller's
/// state. Signatures are reused within their expiry step, as in production.
fn assemble(c: &mut Criterion) {
    let authorized = authorized();
    let claims = claims();
    let audience = Audience {
        claims: &claims,
        session_id: None,
        max_streams: None,
    };
    let mut group = c.benchmark_group("assemble");
    for (name, answers) in answers() {
        let _ = answers.playback_info(&authorized, &audience);
        group.bench_function(name, |b| {
            b.iter(|| answers.playback_info(black_box(&authorized), &audience))
        });
    }
    group.finish();
}

fn sign(c: &mut Criterion) {
    let signer = signer();
    let url = format!("{CDN_BASE}/m-0001/dash/manifest.mpd");
    let resource = format!("{CDN_BASE}/m-0001/*");
    let mut group = c.benchmark_group("sign");
    group.bench_function("url_rsa_sha1", |b| {
        b.iter(|| signer.sign_with_expiry(black_box(&url), 1_700_000_000))
    });
    group.bench_function("url_within_step", |b| {
        b.iter(|| signer.sign_at(black_box(&url), SystemTime::now()))
    });
    group.bench_function("cookies_within_step", |b| {
        b.iter(|| signer.cookies_at(black_box(&resource), SystemTime::now()))
    });
    group.finish();
}

/// The answer a CloudFront deployment sends, to JSON.
fn serialize(c: &mut Criterion) {
    let claims = claims();
    let audience = Audience {
        claims: &claims,
        session_id: None,
        max_streams: None,
    };
    let [_, (_, answers), _] = answers();
    let info = answers.playback_info(&authorized(), &audience);
    let mut group = c.benchmark_group("serialize");
    group.bench_function("playback_info", |b| {
        b.iter(|| serde_json::to_vec(black_box(&info)).expect("json"))
    });
    group.finish();
}

/// One access-log line with the fields `http::middleware::observe` writes,
/// inside the request span, into `std::io::sink()`, through
/// tracing-subscriber's JSON format filtered as `telemetry::logs` filters.
/// Moneta's own line formatter is private to `telemetry::logs`; until it is
/// reachable with a chosen writer this measures the library format, and the
/// line carries no trace ids (there is no OpenTelemetry tracer here).
fn log_line(c: &mut Criterion) {
    use tracing_subscriber::prelude::*;

    // Moneta's own stdout layer (filter and JSON line), writing to a sink.
    let layer =
        moneta::telemetry::logs::layer_with_writer("info", moneta::config::LogFormat::Json, std::io::sink);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let route = "/v1/contents/{content_id}/playback-info".to_owned();
        let request_id = "0b9f3c52-5d1e-4a7b-9a43-6f1e2d3c4b5a".to_owned();
        let span = tracing::info_span!(
            target: "moneta::http",
            "request",
            http.route = %route,
            request_id = %request_id,
        );
        let method = "GET";
        let status = 200_u16;
        let mut group = c.benchmark_group("log_line");
        group.bench_function("access_json", |b| {
            b.iter(|| {
                span.in_scope(|| {
                    moneta::telemetry::logs::access(
                        method,
                        &route,
                        status,
                        black_box(std::time::Duration::from_micros(1234)),
                        &request_id,
                    )
                })
            })
        });
        group.finish();
    });
}

criterion_group!(benches, verify, assemble, sign, serialize, log_line);
criterion_main!(benches);
