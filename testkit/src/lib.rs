//! Real dependency processes for Moneta's test suites, on free loopback ports,
//! stopped when dropped. A missing binary fails the test with advice; nothing
//! is ever skipped.

pub mod nginx;
pub mod postgres;
pub mod redis;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub use postgres::{PgServer, shared_server};
pub use redis::{RedisCluster, RedisServer};
// Suites that check what reached PostgreSQL use the same client as the kit.
pub use sqlx;

/// The deadline for anything that should happen "soon": a process listening,
/// a log line written, a background task's effect showing. It only ends a
/// wait for something that is never going to happen, so it is generous: a
/// loaded machine must not fail a test whose behaviour is right.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Finds a binary on PATH or in the usual sbin folders, or panics with advice.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        "/usr/sbin",
        "/usr/local/sbin",
        "/sbin",
        "/usr/bin",
        "/usr/local/nginx/sbin",
    ]
    .map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed; run scripts/test, which installs the test dependencies")
        })
}

/// Waits until something accepts on `port`, failing early if `child` exits.
pub fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within {PATIENCE:?}");
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`, …) to a process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}
