//! At most [`PER_MINUTE`] licence requests a minute per session (per user
//! and title for a token without one), counted over a sliding minute.
//!
//! The count is kept in this instance's memory: with several instances
//! behind a load balancer a session may get up to that many per instance.
//! That is enough to stop a player from hammering the vendor (a player asks
//! once at start and once per renewal period), and costs no Redis round
//! trip on the licence path. The memory is bounded: at most [`TRACKED`]
//! keys, each forgotten after a minute without requests (when its window is
//! empty anyway); under more keys than that the least used lose their count.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub const PER_MINUTE: usize = 30;
const WINDOW: Duration = Duration::from_secs(60);
const TRACKED: u64 = 50_000;

/// The admission times of the last [`PER_MINUTE`] admitted requests, in
/// milliseconds since the limiter started (wrapping: only ages up to a
/// minute are ever compared).
#[derive(Default)]
struct Window {
    admitted: [u32; PER_MINUTE],
    len: usize,
    /// Where the next admission goes once full: the oldest one.
    next: usize,
}

impl Window {
    /// `Err(wait)`: refused, and admitted again after `wait`.
    fn admit(&mut self, now: u32) -> Result<(), Duration> {
        if self.len < PER_MINUTE {
            self.admitted[self.len] = now;
            self.len += 1;
            return Ok(());
        }
        let age = Duration::from_millis(u64::from(now.wrapping_sub(self.admitted[self.next])));
        if age < WINDOW {
            return Err(WINDOW - age);
        }
        self.admitted[self.next] = now;
        self.next = (self.next + 1) % PER_MINUTE;
        Ok(())
    }
}

pub struct RateLimit {
    windows: moka::sync::Cache<String, Arc<Mutex<Window>>>,
    started: Instant,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            windows: moka::sync::Cache::builder()
                .max_capacity(TRACKED)
                .time_to_idle(WINDOW)
                .build(),
            started: Instant::now(),
        }
    }
}

impl RateLimit {
    /// Admits one request under `key`, or says how long until one would be.
    pub fn admit(&self, key: &str) -> Result<(), Duration> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let now = now.saturating_duration_since(self.started).as_millis() as u32;
        let window = self.windows.get_with_by_ref(key, Default::default);
        let mut window = window.lock().unwrap_or_else(PoisonError::into_inner);
        window.admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_a_minute_pass_the_thirty_first_waits_for_the_oldest() {
        let limit = RateLimit::default();
        let t0 = limit.started + Duration::from_secs(5);
        for i in 0..PER_MINUTE as u64 {
            assert!(
                limit.admit_at("s", t0 + Duration::from_secs(i)).is_ok(),
                "request {i}"
            );
        }
        let at = t0 + Duration::from_secs(40);
        assert_eq!(limit.admit_at("s", at), Err(Duration::from_secs(20)));
        // Another session is counted on its own.
        assert!(limit.admit_at("t", at).is_ok());
        // A minute after the first, one more fits; then the second's minute.
        assert!(limit.admit_at("s", t0 + WINDOW).is_ok());
        assert_eq!(limit.admit_at("s", t0 + WINDOW), Err(Duration::from_secs(1)));
        assert!(limit.admit_at("s", t0 + WINDOW + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn refusals_do_not_count() {
        let limit = RateLimit::default();
        let t0 = limit.started;
        for _ in 0..PER_MINUTE {
            assert!(limit.admit_at("s", t0).is_ok());
        }
        for i in 1..100 {
            assert!(limit.admit_at("s", t0 + Duration::from_millis(i * 500)).is_err());
        }
        assert!(limit.admit_at("s", t0 + WINDOW).is_ok());
    }
}
