//! The binary's allocator settings, as mimalloc itself reports them
//! (`MIMALLOC_VERBOSE=1` prints every option at start).

use std::process::Command;

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
}

#[test]
fn the_environment_still_decides() {
    let report = report(&[
        ("MIMALLOC_PURGE_DELAY", "250"),
        ("MIMALLOC_ARENA_EAGER_COMMIT", "1"),
    ]);
    assert_eq!(option(&report, "purge_delay"), Some(250), "{report}");
    assert_eq!(option(&report, "arena_eager_commit"), Some(1), "{report}");
}
