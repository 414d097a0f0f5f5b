//! Real processes for integration tests: redis-server and the moneta binary on
//! free loopback ports, stopped when dropped. A missing binary fails loudly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

// Each test binary uses a different part of the kit.
#[allow(unused_imports)]
pub use testkit::{PATIENCE, RedisServer, free_port, nginx, require_binary, signal, wait_for_port};

pub const DEV_SECRET: &str = "integration-test-secret-do-not-use";

/// The real `moneta` binary, killed on drop.
pub struct MonetaProcess {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl MonetaProcess {
    pub fn start(envs: &[(&str, String)]) -> MonetaProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moneta.log");
        let port = free_port();
        let admin_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moneta"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MONETA_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("MONETA_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("MONETA_JWT_HS256_SECRET", DEV_SECRET)
            .env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut child = cmd.stdout(out).stderr(err).spawn().expect("cannot start moneta");
        wait_for_port(port, "moneta", &mut child);
        MonetaProcess {
            port,
            admin_port,
            child,
            log,
            _dir: dir,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MonetaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A valid HS256 dev token for one hour.
pub fn mint_token(sub: &str, plan: &str, max_streams: u32, country: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = moneta::auth::Claims {
        sub: sub.into(),
        exp: now + 3600,
        iat: Some(now),
        nbf: None,
        iss: None,
        plan: Some(plan.into()),
        max_streams: Some(max_streams),
        country: Some(country.into()),
    };
    moneta::auth::verifier::mint_hs256(DEV_SECRET, &claims).expect("sign")
}

/// The title every fixture knows: Widevine DASH, clear HLS, two subtitle tracks.
pub fn sample_content(id: &str) -> serde_json::Value {
    serde_json::json!({
        "content_id": id,
        "title": format!("Title {id}"),
        "duration_ms": 7_920_000,
        "available_countries": null,
        "required_plans": [],
        "streams": [
            {"protocol": "dash", "path": format!("/{id}/dash/manifest.mpd"), "drm": {"system": "widevine", "key_id": "0123abcd"}},
            {"protocol": "hls", "path": format!("/{id}/hls/master.m3u8"), "drm": null}
        ],
        "subtitles": [{"language": "ko", "path": format!("/{id}/subs/ko.vtt")}, {"language": "en", "path": format!("/{id}/subs/en.vtt")}]
    })
}

/// Writes a fallback catalog holding `m-0001` and returns its path.
pub fn write_snapshot(dir: &Path) -> PathBuf {
    let path = dir.join("snapshot.json");
    let doc = serde_json::json!({"contents": [sample_content("m-0001")]});
    std::fs::write(&path, doc.to_string()).expect("write snapshot");
    path
}

/// A fresh 2048-bit RSA key made by the openssl command line (an independent
/// implementation): its PKCS#8 PEM and the parsed key.
pub fn openssl_rsa_key(dir: &Path, name: &str) -> (Vec<u8>, rsa::RsaPrivateKey) {
    use rsa::pkcs8::DecodePrivateKey;
    let path = dir.join(format!("{name}.pem"));
    let status = Command::new(require_binary("openssl"))
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl genpkey failed");
    let pem = std::fs::read(&path).expect("read key");
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(std::str::from_utf8(&pem).expect("PEM is text"))
        .expect("parse key");
    (pem, key)
}

/// `GET /v1/contents/{content_id}/playback-info` on a running Moneta, as JSON.
pub async fn playback_info_json(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    content_id: &str,
) -> serde_json::Value {
    client
        .get(format!("{base}/v1/contents/{content_id}/playback-info"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON body")
}
