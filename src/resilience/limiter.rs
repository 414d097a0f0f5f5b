//! Admission control (CONTRACT §9): how many requests Moneta works on at
//! once, and which of them a full house turns away first.
//!
//! **One limit, shared by priorities.** A request is admitted while the
//! requests in flight are fewer than its priority's share of the limit:
//! heartbeats stop at half of it, stops at three quarters, and the rest is
//! left to what a viewer is waiting on. This is the partitioned limiter of
//! Netflix's concurrency-limits (`AbstractPartitionedLimiter`) with the
//! shares used as ceilings, which needs one counter and no queue.
//!
//! **The limit is fixed or adaptive.** Adaptive is Netflix's Gradient2
//! (`Gradient2Limit` behind a `WindowedLimit`): the latencies of admitted
//! requests are averaged over a window (≥ 100 ms and ≥ 10 answers); a slow
//! exponential average of those windows is the latency of the service when
//! it is not queueing. A window slower than 1.5 × that shrinks the limit in
//! proportion (by at most half, smoothed by 0.2); otherwise the limit grows
//! by a queue allowance of √limit (also smoothed). Neither happens while the
//! load stays under the heartbeats' ceiling: a service that is not busy says
//! nothing about its capacity (Gradient2 waits for half the limit, which is
//! where the heartbeats' share ends).
//!
//! No I/O and no clock of its own: time comes from a [`Clock`], so tests
//! script it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::config::{OverloadLimit, OverloadSettings};

/// What a request is for, most important first. A full house turns away
/// the last ones first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A licence request or renewal: without it the picture stops.
    Licence,
    /// A session start: a viewer pressed play.
    Start,
    /// playback-info: a viewer is about to press play.
    PlaybackInfo,
    /// A stop or a list of sessions: sent once, frees a stream slot.
    Stop,
    /// A heartbeat, or a request for no route: a player skips a heartbeat
    /// and keeps playing (interval 30 s, liveness 90 s).
    Heartbeat,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::Licence,
        Priority::Start,
        Priority::PlaybackInfo,
        Priority::Stop,
        Priority::Heartbeat,
    ];

    /// Percent of the limit in flight up to which this priority is admitted.
    const fn share_pct(self) -> usize {
        match self {
            Priority::Licence => 100,
            Priority::Start => 95,
            Priority::PlaybackInfo => 90,
            Priority::Stop => 75,
            Priority::Heartbeat => 50,
        }
    }

    /// Requests in flight below which this priority is admitted under
    /// `limit`. Rounded up, so that at the smallest limits what a viewer
    /// waits on gets every slot the heartbeats leave.
    pub fn ceiling(self, limit: usize) -> usize {
        (limit * self.share_pct()).div_ceil(100).max(1)
    }
}

/// Monotonic time since some origin of the clock's choosing.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The process's monotonic clock.
pub struct SystemClock(Instant);

impl SystemClock {
    pub fn new() -> Self {
        SystemClock(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A window closes after at least this long and [`WINDOW_ANSWERS`] answers…
const WINDOW: Duration = Duration::from_millis(100);
const WINDOW_ANSWERS: u64 = 10;
/// …or after this long with fewer answers, which are then too few to judge.
const WINDOW_MAX: Duration = Duration::from_secs(1);
/// Gradient2's defaults: the long-term latency is the plain average of the
/// first windows, then an exponential average over about 600 of them (a
/// minute of steady traffic); a window up to 1.5 × it is not queueing.
const LONG_WARMUP_WINDOWS: u32 = 10;
const LONG_WINDOWS: f64 = 600.0;
const TOLERANCE: f64 = 1.5;
const SMOOTHING: f64 = 0.2;
/// The smallest queue allowance; above 16 it is √limit.
const MIN_QUEUE: f64 = 4.0;

pub struct Limiter<C: Clock = SystemClock> {
    clock: C,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    adaptive: Option<Adaptive>,
    limit_gauge: metrics::Gauge,
    in_flight_gauge: metrics::Gauge,
}

impl Limiter<SystemClock> {
    /// `None` when admission control is off.
    pub fn from_settings(settings: &OverloadSettings) -> Option<Arc<Self>> {
        Self::with_clock(settings, SystemClock::new())
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(settings: &OverloadSettings, clock: C) -> Option<Arc<Self>> {
        let (limit, adaptive) = match settings.limit {
            OverloadLimit::Off => {
                metrics::gauge!("moneta_overload_limit").set(0.0);
                return None;
            }
            OverloadLimit::Fixed(limit) => (limit.max(1), None),
            OverloadLimit::Adaptive => {
                let (min, max) = (settings.min_limit.max(1), settings.max_limit.max(1));
                // Generous at first: traffic that is merely heavy must not
                // be shed while the long-term latency is being learned.
                let initial = (max / 4).clamp(min.min(max), max);
                let adaptive = Adaptive {
                    min: min as f64,
                    max: max.max(min) as f64,
                    opened_at_ns: AtomicU64::new(nanos(clock.now())),
                    rtt_sum_ns: AtomicU64::new(0),
                    answers: AtomicU64::new(0),
                    peak_in_flight: AtomicUsize::new(0),
                    gradient: Mutex::new(Gradient2 {
                        estimate: initial as f64,
                        long_rtt_ns: 0.0,
                        windows: 0,
                    }),
                };
                (initial, Some(adaptive))
            }
        };
        let limiter = Limiter {
            clock,
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            adaptive,
            limit_gauge: metrics::gauge!("moneta_overload_limit"),
            in_flight_gauge: metrics::gauge!("moneta_overload_in_flight"),
        };
        limiter.limit_gauge.set(limit as f64);
        limiter.in_flight_gauge.set(0.0);
        Some(Arc::new(limiter))
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A slot for a request of `priority`, or `None`: refuse it now.
    pub fn try_acquire(self: &Arc<Self>, priority: Priority) -> Option<Permit<C>> {
        let ceiling = priority.ceiling(self.limit());
        let mut current = self.in_flight.load(Ordering::Relaxed);
        // Compare-and-swap rather than add-then-undo: a burst of refused
        // heartbeats must not make a start see a full house for an instant.
        loop {
            if current >= ceiling {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.in_flight_gauge.increment(1.0);
        let admitted_at = self.adaptive.as_ref().map(|adaptive| {
            adaptive.peak_in_flight.fetch_max(current + 1, Ordering::Relaxed);
            self.clock.now()
        });
        Some(Permit {
            limiter: self.clone(),
            admitted_at,
            answered: false,
        })
    }

    fn release(&self, admitted_at: Option<Duration>, answered: bool) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.in_flight_gauge.decrement(1.0);
        let (Some(adaptive), Some(admitted_at), true) = (&self.adaptive, admitted_at, answered) else {
            return;
        };
        let now = self.clock.now();
        let ceiling = Priority::Heartbeat.ceiling(self.limit());
        if let Some(limit) =
            adaptive.answered(now, now.saturating_sub(admitted_at), ceiling, self.in_flight())
        {
            self.limit.store(limit, Ordering::Relaxed);
            self.limit_gauge.set(limit as f64);
        }
    }
}

/// A request's slot, given back when dropped. Only an answered request's
/// latency teaches the adaptive limit: an abandoned one (the client went
/// away) says nothing about how long answers take.
pub struct Permit<C: Clock = SystemClock> {
    limiter: Arc<Limiter<C>>,
    admitted_at: Option<Duration>,
    answered: bool,
}

impl<C: Clock> Permit<C> {
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl<C: Clock> Drop for Permit<C> {
    fn drop(&mut self) {
        self.limiter.release(self.admitted_at, self.answered);
    }
}

/// The current window, in atomics so that answers never wait on each other,
/// and the Gradient2 state, touched once per window by whichever answer
/// closes it.
struct Adaptive {
    min: f64,
    max: f64,
    opened_at_ns: AtomicU64,
    rtt_sum_ns: AtomicU64,
    answers: AtomicU64,
    peak_in_flight: AtomicUsize,
    gradient: Mutex<Gradient2>,
}

impl Adaptive {
    /// Counts one answer; returns the new limit when it closed a window.
    fn answered(&self, now: Duration, rtt: Duration, busy_at: usize, in_flight: usize) -> Option<usize> {
        let now_ns = nanos(now);
        self.rtt_sum_ns.fetch_add(nanos(rtt), Ordering::Relaxed);
        let answers = self.answers.fetch_add(1, Ordering::Relaxed) + 1;
        let opened_at = self.opened_at_ns.load(Ordering::Relaxed);
        let age = Duration::from_nanos(now_ns.saturating_sub(opened_at));
        if age < WINDOW || (answers < WINDOW_ANSWERS && age < WINDOW_MAX) {
            return None;
        }
        let mut gradient = match self.gradient.try_lock() {
            Ok(gradient) => gradient,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Someone else is closing this window.
            Err(TryLockError::WouldBlock) => return None,
        };
        if self.opened_at_ns.load(Ordering::Relaxed) != opened_at {
            return None;
        }
        self.opened_at_ns.store(now_ns, Ordering::Relaxed);
        let answers = self.answers.swap(0, Ordering::Relaxed);
        let rtt_sum = self.rtt_sum_ns.swap(0, Ordering::Relaxed);
        let peak = self.peak_in_flight.swap(in_flight, Ordering::Relaxed);
        if answers < WINDOW_ANSWERS {
            return None;
        }
        let rtt = (rtt_sum as f64 / answers as f64).max(1.0);
        let estimate = gradient.update(rtt, peak >= busy_at, self.min, self.max);
        Some(estimate.round() as usize)
    }
}

struct Gradient2 {
    estimate: f64,
    long_rtt_ns: f64,
    windows: u32,
}

impl Gradient2 {
    /// One window's average latency → the new estimate.
    fn update(&mut self, rtt_ns: f64, busy: bool, min: f64, max: f64) -> f64 {
        self.windows = self.windows.saturating_add(1);
        let weight = if self.windows <= LONG_WARMUP_WINDOWS {
            1.0 / f64::from(self.windows)
        } else {
            2.0 / (LONG_WINDOWS + 1.0)
        };
        self.long_rtt_ns += (rtt_ns - self.long_rtt_ns) * weight;
        // After a long overload the long-term latency has crept up; let it
        // fall faster than the average would, so the limit recovers.
        if self.long_rtt_ns / rtt_ns > 2.0 {
            self.long_rtt_ns *= 0.95;
        }
        if !busy {
            return self.estimate;
        }
        let gradient = (TOLERANCE * self.long_rtt_ns / rtt_ns).clamp(0.5, 1.0);
        let queue = self.estimate.sqrt().max(MIN_QUEUE);
        let target = self.estimate * gradient + queue;
        self.estimate = (self.estimate * (1.0 - SMOOTHING) + target * SMOOTHING).clamp(min, max);
        self.estimate
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Scripted(Arc<AtomicU64>);

    impl Scripted {
        fn advance(&self, by: Duration) {
            self.0.fetch_add(nanos(by), Ordering::SeqCst);
        }
    }

    impl Clock for Scripted {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    fn settings(limit: OverloadLimit, min_limit: usize, max_limit: usize) -> OverloadSettings {
        OverloadSettings {
            limit,
            min_limit,
            max_limit,
        }
    }

    fn fixed(limit: usize) -> Arc<Limiter<Scripted>> {
        Limiter::with_clock(
            &settings(OverloadLimit::Fixed(limit), 8, 1024),
            Scripted::default(),
        )
        .unwrap()
    }

    fn adaptive(min: usize, max: usize) -> (Arc<Limiter<Scripted>>, Scripted) {
        let clock = Scripted::default();
        let limiter =
            Limiter::with_clock(&settings(OverloadLimit::Adaptive, min, max), clock.clone()).unwrap();
        (limiter, clock)
    }

    /// Takes slots at `priority` until refused.
    fn fill(limiter: &Arc<Limiter<Scripted>>, priority: Priority) -> Vec<Permit<Scripted>> {
        std::iter::from_fn(|| limiter.try_acquire(priority)).collect()
    }

    #[test]
    fn off_means_no_limiter() {
        assert!(Limiter::with_clock(&settings(OverloadLimit::Off, 8, 1024), Scripted::default()).is_none());
    }

    #[test]
    fn each_priority_is_admitted_up_to_its_share_of_one_limit() {
        let limiter = fixed(20);
        let heartbeats = fill(&limiter, Priority::Heartbeat);
        assert_eq!(heartbeats.len(), 10, "heartbeats stop at half");
        let stops = fill(&limiter, Priority::Stop);
        assert_eq!(stops.len(), 5, "stops go on to three quarters");
        let infos = fill(&limiter, Priority::PlaybackInfo);
        assert_eq!(infos.len(), 3);
        let starts = fill(&limiter, Priority::Start);
        assert_eq!(starts.len(), 1);
        let licences = fill(&limiter, Priority::Licence);
        assert_eq!(licences.len(), 1);
        assert_eq!(limiter.in_flight(), 20);
        assert!(
            limiter.try_acquire(Priority::Licence).is_none(),
            "the limit is the limit"
        );

        // Slots freed by anyone serve the highest priority asking.
        drop(heartbeats);
        assert_eq!(limiter.in_flight(), 10);
        assert!(limiter.try_acquire(Priority::Heartbeat).is_none());
        assert!(limiter.try_acquire(Priority::Start).is_some());
    }

    #[test]
    fn heartbeats_never_take_the_last_slots_at_any_limit() {
        for limit in 1..=2048 {
            let ceilings = Priority::ALL.map(|p| p.ceiling(limit));
            assert_eq!(ceilings[0], limit, "licences get the whole limit");
            assert!(ceilings.windows(2).all(|w| w[0] >= w[1]), "{limit}: {ceilings:?}");
            if limit >= 2 {
                let heartbeats = Priority::Heartbeat.ceiling(limit);
                let play = Priority::PlaybackInfo.ceiling(limit);
                assert!(heartbeats <= limit.div_ceil(2), "{limit}: {ceilings:?}");
                assert!(play - heartbeats >= limit * 2 / 5, "{limit}: {ceilings:?}");
            }
        }
    }

    #[test]
    fn an_abandoned_request_frees_its_slot() {
        let limiter = fixed(2);
        let first = limiter.try_acquire(Priority::Licence).unwrap();
        let second = limiter.try_acquire(Priority::Licence).unwrap();
        assert!(limiter.try_acquire(Priority::Licence).is_none());
        drop(first);
        second.answered();
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(fill(&limiter, Priority::Licence).len(), 2);
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let limiter = fixed(16);
        let clock = &limiter.clock;
        for _ in 0..200 {
            let permits = fill(&limiter, Priority::Licence);
            clock.advance(Duration::from_millis(50));
            permits.into_iter().for_each(Permit::answered);
        }
        assert_eq!(limiter.limit(), 16);
    }

    /// Windows of a service busy up to the limit whose answers take `rtt`:
    /// every round fills the limit, waits `rtt`, answers everything.
    fn busy_windows(limiter: &Arc<Limiter<Scripted>>, clock: &Scripted, rtt: Duration, windows: u32) {
        let rounds = WINDOW.as_nanos().div_ceil(rtt.as_nanos()).max(1) as u32;
        for _ in 0..windows * rounds {
            let permits = fill(limiter, Priority::Licence);
            clock.advance(rtt);
            permits.into_iter().for_each(Permit::answered);
        }
    }

    #[test]
    fn the_adaptive_limit_falls_when_latency_rises_and_comes_back_when_it_falls() {
        let (limiter, clock) = adaptive(8, 400);
        let initial = limiter.limit();
        assert_eq!(initial, 100, "a quarter of the maximum");

        busy_windows(&limiter, &clock, Duration::from_millis(2), 30);
        let healthy = limiter.limit();
        assert!(
            healthy > initial,
            "a busy, healthy service earns a higher limit: {healthy}"
        );

        // A dependency slows down tenfold: every answer takes longer.
        busy_windows(&limiter, &clock, Duration::from_millis(20), 10);
        let slowed = limiter.limit();
        assert!(
            slowed < healthy / 2,
            "latency up, limit down: {healthy} → {slowed}"
        );

        // It recovers.
        busy_windows(&limiter, &clock, Duration::from_millis(2), 60);
        let recovered = limiter.limit();
        assert!(
            recovered > slowed * 2,
            "latency down, limit up again: {slowed} → {recovered}"
        );
    }

    #[test]
    fn the_adaptive_limit_stays_within_min_and_max() {
        let (limiter, clock) = adaptive(8, 64);
        busy_windows(&limiter, &clock, Duration::from_millis(1), 300);
        assert_eq!(limiter.limit(), 64, "grown to the maximum, not past it");
        // Latency doubling again and again (up to 8 s an answer).
        let mut rtt = Duration::from_millis(2);
        for _ in 0..12 {
            busy_windows(&limiter, &clock, rtt, 8);
            rtt *= 2;
            assert!(limiter.limit() >= 8, "{}", limiter.limit());
        }
        assert_eq!(limiter.limit(), 8, "shrunk to the minimum, not past it");
    }

    #[test]
    fn a_service_that_is_not_busy_keeps_its_limit() {
        let (limiter, clock) = adaptive(8, 400);
        // Few requests at a time, however slow: nothing to learn.
        for rtt_ms in [1, 50, 200, 1] {
            for _ in 0..2_000 {
                let permits: Vec<_> = (0..3)
                    .filter_map(|_| limiter.try_acquire(Priority::Heartbeat))
                    .collect();
                clock.advance(Duration::from_millis(rtt_ms));
                permits.into_iter().for_each(Permit::answered);
            }
            assert_eq!(limiter.limit(), 100);
        }
    }

    #[test]
    fn refused_and_abandoned_requests_teach_nothing() {
        let (limiter, clock) = adaptive(8, 400);
        busy_windows(&limiter, &clock, Duration::from_millis(2), 20);
        let before = limiter.limit();
        for _ in 0..2_000 {
            let permits = fill(&limiter, Priority::Licence);
            assert!(limiter.try_acquire(Priority::Heartbeat).is_none());
            clock.advance(Duration::from_millis(100));
            drop(permits);
        }
        assert_eq!(limiter.limit(), before);
    }
}
