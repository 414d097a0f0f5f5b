//! Real dependency processes for Moneta's test suites, on free loopback ports,
//! stopped when dropped. A missing binary fails the test with advice; nothing
//! is ever skipped.

pub mod bench_stack;
pub mod cpu;
pub mod memory;
pub mod nginx;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod wait;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

pub use postgres::{PgServer, shared_server};
pub use process::Process;
pub use redis::{RedisCluster, RedisServer};
// Suites that check what reached PostgreSQL use the same client as the kit.
pub use sqlx;
pub use wait::{PATIENCE, eventually, eventually_blocking, eventually_every};

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

/// Runs `command` to completion and returns its output; panics with that
/// output unless it succeeded.
pub fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`, …) to a process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}
