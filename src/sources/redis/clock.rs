//! This instance's estimate of Redis' clock.
//!
//! "Newest" means acknowledged last on Redis' clock (`TIME` inside the
//! scripts), whatever the instances' own clocks say. While Redis is
//! unreachable a position is stamped with the instance's clock corrected by
//! the offset last measured against Redis, so an instance minutes ahead does
//! not bury the positions other instances acknowledge after it. Until the
//! first measurement a stamp is the instance's own clock, and says so.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

/// The offset before any measurement. One atomic holds both the offset and
/// whether there is one, so a stamp never mixes a measured offset with the
/// claim that there was none.
const UNMEASURED: i64 = i64::MIN;

pub struct RedisClock {
    /// Redis' time minus ours, in ms, as last measured.
    offset_ms: AtomicI64,
}

impl Default for RedisClock {
    fn default() -> Self {
        Self {
            offset_ms: AtomicI64::new(UNMEASURED),
        }
    }
}

/// A time on Redis' clock as this instance estimates it.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub at: DateTime<Utc>,
    /// False: no offset was measured yet; `at` is this instance's own clock.
    pub measured: bool,
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
        self.offset_ms
            .store(offset.max(UNMEASURED + 1), Ordering::Relaxed);
    }

    fn offset_ms(&self) -> Option<i64> {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        (offset != UNMEASURED).then_some(offset)
    }

    pub fn stamp(&self) -> Stamp {
        let offset = self.offset_ms();
        let ms = Utc::now().timestamp_millis().saturating_add(offset.unwrap_or(0));
        Stamp {
            at: DateTime::from_timestamp_millis(ms).unwrap_or_else(Utc::now),
            measured: offset.is_some(),
        }
    }

    /// Redis' time as this instance estimates it (its own clock until the
    /// first measurement).
    pub fn now(&self) -> DateTime<Utc> {
        self.stamp().at
    }

    /// [`RedisClock::now`] once the offset was measured.
    pub fn measured_now(&self) -> Option<DateTime<Utc>> {
        let stamp = self.stamp();
        stamp.measured.then_some(stamp.at)
    }

    pub fn is_measured(&self) -> bool {
        self.offset_ms().is_some()
    }

    /// Redis' time minus this instance's, as last measured.
    pub fn offset(&self) -> Option<chrono::Duration> {
        self.offset_ms().map(chrono::Duration::milliseconds)
    }

    /// The instant on Redis' clock after which a call sent now is no longer
    /// awaited (its caller timed out and answered from memory); `None` until
    /// the offset was measured once.
    ///
    /// In milliseconds straight from the system clock: every heartbeat asks,
    /// and going through a `DateTime` and back cost it ~100 instructions.
    pub fn deadline(&self, timeout: Duration) -> Option<i64> {
        let offset = self.offset_ms()?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        Some(now_ms.saturating_add(offset).saturating_add(timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_the_measured_offset() {
        let clock = RedisClock::default();
        assert_eq!(clock.deadline(Duration::from_millis(250)), None);
        assert!(!clock.stamp().measured);
        let ahead = Utc::now().timestamp_millis() + 300_000;
        clock.observe(ahead);
        let stamp = clock.stamp();
        assert!(stamp.measured);
        let estimate = stamp.at.timestamp_millis();
        assert!((estimate - ahead).abs() < 5_000, "{estimate} vs {ahead}");
        let deadline = clock.deadline(Duration::from_millis(250)).unwrap();
        assert!(deadline >= estimate + 250);
        let offset = clock.offset().unwrap().num_milliseconds();
        assert!((offset - 300_000).abs() < 5_000, "{offset}");
    }
}
