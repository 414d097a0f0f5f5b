//! This instance's estimate of Redis' clock.
//!
//! "Newest" means acknowledged last on Redis' clock (`TIME` inside the
//! scripts), whatever the instances' own clocks say. While Redis is
//! unreachable a position is stamped with the instance's clock corrected by
//! the offset last measured against Redis, so an instance minutes ahead does
//! not bury the positions other instances acknowledge after it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Default)]
pub struct RedisClock {
    /// Redis' time minus ours, in ms, as last measured.
    offset_ms: AtomicI64,
    measured: AtomicBool,
}

impl RedisClock {
    /// Records Redis' `now` as read by a reply that arrived just now. The
    /// reading is at most one round trip old, so the estimate errs early by
    /// at most that: deadlines derived from it are conservative.
    pub fn observe(&self, redis_now_ms: i64) {
        if redis_now_ms <= 0 {
            return;
        }
        let offset = redis_now_ms - Utc::now().timestamp_millis();
        self.offset_ms.store(offset, Ordering::Relaxed);
        self.measured.store(true, Ordering::Relaxed);
    }

    /// Redis' time as this instance estimates it (its own clock until the
    /// first measurement).
    pub fn now(&self) -> DateTime<Utc> {
        let ms = Utc::now().timestamp_millis() + self.offset_ms.load(Ordering::Relaxed);
        DateTime::from_timestamp_millis(ms).unwrap_or_else(Utc::now)
    }

    /// The instant on Redis' clock after which a call sent now is no longer
    /// awaited (its caller timed out and answered from memory); `None` until
    /// the offset was measured once.
    pub fn deadline(&self, timeout: Duration) -> Option<i64> {
        self.measured
            .load(Ordering::Relaxed)
            .then(|| self.now().timestamp_millis() + timeout.as_millis() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_the_measured_offset() {
        let clock = RedisClock::default();
        assert_eq!(clock.deadline(Duration::from_millis(250)), None);
        let ahead = Utc::now().timestamp_millis() + 300_000;
        clock.observe(ahead);
        let estimate = clock.now().timestamp_millis();
        assert!((estimate - ahead).abs() < 5_000, "{estimate} vs {ahead}");
        let deadline = clock.deadline(Duration::from_millis(250)).unwrap();
        assert!(deadline >= estimate + 250);
    }
}
