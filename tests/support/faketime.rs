//! A process whose wall clock is off by a chosen amount, through Debian's
//! libfaketime (`LD_PRELOAD`), for checks that instances with different
//! clocks still agree.

use std::path::PathBuf;

/// Where distributions put the preload library; Debian's is under the
/// multiarch triplet, whatever the machine's architecture.
fn candidates() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = ["/usr/lib", "/usr/lib64", "/usr/local/lib"]
        .iter()
        .flat_map(|root| {
            let nested = std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path().join("faketime"));
            std::iter::once(PathBuf::from(root).join("faketime")).chain(nested)
        })
        .map(|dir| dir.join("libfaketime.so.1"))
        .collect();
    found.retain(|path| path.is_file());
    found
}

/// The libfaketime library, or a panic that says how to get it: a test that
/// needs a skewed clock must never pass without one.
pub fn library() -> PathBuf {
    candidates().into_iter().next().unwrap_or_else(|| {
        panic!(
            "libfaketime.so.1 is not installed (Debian package `faketime`); \
             run scripts/install-deps, which installs the test dependencies"
        )
    })
}

/// Environment for a process whose wall clock is `offset` away from the
/// machine's (`"+150s"`, `"-2m"`). Monotonic time stays real, so timers,
/// timeouts and tokio's clock behave as they would on any machine.
pub fn skewed_clock(offset: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", library().display().to_string()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}
