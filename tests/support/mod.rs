//! Real processes for integration tests: redis-server and the moneta binary on
//! free loopback ports, stopped when dropped. A missing binary fails loudly.
#![allow(dead_code)]

pub mod nginx;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEV_SECRET: &str = "integration-test-secret-do-not-use";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Finds a binary on PATH or in the usual sbin folders, or panics with advice.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from).chain(
        ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed; run scripts/test, which installs the test dependencies");
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

/// A real redis-server, no persistence, killed on drop.
pub struct RedisServer {
    pub port: u16,
    pub url: String,
    child: Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// Starts (or restarts, after `kill`) on a chosen port.
    pub fn start_on(port: u16) -> RedisServer {
        let bin = require_binary("redis-server");
        let mut child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        wait_for_port(port, "redis-server", &mut child);
        RedisServer {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the server (SIGSTOP): connections hang instead of being refused.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.pid(), "CONT");
        self.kill();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

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
