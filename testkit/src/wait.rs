//! Waiting for something a process or a background task will do.
//!
//! A deadline here only ends a wait for something that is never going to
//! happen, so it is generous: a loaded machine must not fail a test whose
//! behaviour is right. How fast things happen is `scripts/bench`'s business.

use std::time::{Duration, Instant};

/// The deadline for anything that should happen "soon": a process listening,
/// a log line written, a background task's effect showing.
pub const PATIENCE: Duration = Duration::from_secs(60);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Asks `check` until it answers `Some`, or `None` once `within` has passed.
pub async fn eventually<T>(within: Duration, check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    eventually_every(within, POLL_INTERVAL, check).await
}

/// [`eventually`], asking every `interval`: where the wait itself is
/// measured, a coarse poll would measure the poll.
pub async fn eventually_every<T>(
    within: Duration,
    interval: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(interval).await;
    }
}

/// [`eventually`] for code that cannot await (process start-up, `Drop`).
pub fn eventually_blocking<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
