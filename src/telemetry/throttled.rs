//! Warnings an outage would repeat for every call, let through one in a
//! while. By hand: tracing has no rate limit of its own, and a token bucket
//! crate would not count what it left out, which the line that passes says.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub struct Throttled {
    every_ms: u64,
    /// Milliseconds after the process' first check before which nothing passes.
    quiet_until_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Throttled {
    pub const fn new(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            quiet_until_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last one)` when this one is to be logged.
    pub fn pass(&self) -> Option<u64> {
        static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
        self.pass_at(EPOCH.elapsed().as_millis() as u64)
    }

    fn pass_at(&self, now: u64) -> Option<u64> {
        let until = self.quiet_until_ms.load(Relaxed);
        if now < until
            || self
                .quiet_until_ms
                .compare_exchange(until, now + self.every_ms, Relaxed, Relaxed)
                .is_err()
        {
            self.skipped.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.skipped.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_passes_in_a_while_and_counts_the_rest() {
        let warnings = Throttled::new(Duration::from_secs(10));
        assert_eq!(warnings.pass_at(5), Some(0));
        assert_eq!(warnings.pass_at(6), None);
        assert_eq!(warnings.pass_at(10_004), None);
        assert_eq!(
            warnings.pass_at(10_005),
            Some(2),
            "the next one says how many were left out"
        );
        assert_eq!(warnings.pass_at(10_006), None);
    }
}
