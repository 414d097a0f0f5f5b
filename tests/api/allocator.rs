//! The binary's allocator settings, as mimalloc itself reports them
//! (`MIMALLOC_VERBOSE=1` prints every option at start).

use std::process::Command;

use crate::support::{self, MonetaProcess, RedisServer};

/// `option 'name': value` from mimalloc's verbose start-up report.
fn option(report: &str, name: &str) -> Option<i64> {
    let prefix = format!("option '{name}': ");
    report
        .lines()
        .find_map(|line| line.split_once(&prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

fn report(env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_moneta"))
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .envs(env.iter().copied())
        .output()
        .expect("run moneta --version");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn freed_memory_goes_back_at_once_and_arenas_commit_lazily() {
    let report = report(&[]);
    assert_eq!(option(&report, "purge_delay"), Some(0), "{report}");
    assert_eq!(option(&report, "arena_eager_commit"), Some(0), "{report}");
    assert_eq!(option(&report, "allow_thp"), Some(0), "{report}");
}

/// Whatever the host's `transparent_hugepage/enabled`, the serving process
/// has huge pages off (the kernel's own account of it).
#[test]
fn a_serving_moneta_has_transparent_huge_pages_off() {
    let redis = RedisServer::start();
    let moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", support::nobody_listens()),
    ]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", moneta.pid())).expect("its /proc status");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}

#[test]
fn the_environment_still_decides() {
    let report = report(&[
        ("MIMALLOC_PURGE_DELAY", "250"),
        ("MIMALLOC_ARENA_EAGER_COMMIT", "1"),
        ("MIMALLOC_ALLOW_THP", "1"),
    ]);
    assert_eq!(option(&report, "purge_delay"), Some(250), "{report}");
    assert_eq!(option(&report, "arena_eager_commit"), Some(1), "{report}");
    assert_eq!(option(&report, "allow_thp"), Some(1), "{report}");
}
