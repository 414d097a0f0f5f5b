use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use failsafe::failure_policy::{
    ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow, consecutive_failures,
    success_rate_over_time_window,
};
use failsafe::{Instrument, StateMachine};
use futures::FutureExt;
use futures::future::Either;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::config::GuardSettings;
use crate::telemetry::throttled::Throttled;

/// Why a guarded call produced no answer. All of them mean "use the fallback".
#[derive(Debug, Clone, thiserror::Error)]
pub enum DependencyError {
    #[error("{0}: circuit breaker open")]
    Open(&'static str),
    #[error("{0}: too many calls in flight")]
    Saturated(&'static str),
    #[error("{0}: no answer within the timeout")]
    Timeout(&'static str),
    #[error("{0}: {1}")]
    Failed(&'static str, String),
    /// The dependency answered, with an error about this one call (a Redis
    /// command error such as `NOGROUP`, an HTTP status about the request's
    /// content), or with one that may be about the call or about itself
    /// (see [`Verdict`]).
    #[error("{0}: answered with an error: {1}")]
    Refused(&'static str, String),
}

/// What an error a call ended in says about the dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Unreachable or broken: a failure, counted by the breaker.
    Outage,
    /// An answer about this one call: a sign of life, counted as a success.
    Answered,
    /// An answer that may be about the call or about the dependency (a
    /// failed batch that may hold a poison item, from an API that may be
    /// failing everything). Counted neither way: it must not open the
    /// breaker for one bad item, nor close a half-open one while the
    /// dependency fails every call.
    Unclear,
}

impl DependencyError {
    /// A low-cardinality name for traces (`error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            DependencyError::Open(_) => "circuit_open",
            DependencyError::Saturated(_) => "bulkhead_full",
            DependencyError::Timeout(_) => "timeout",
            DependencyError::Failed(..) => "failed",
            DependencyError::Refused(..) => "refused",
        }
    }
}

/// Circuit breaker state as exported in `moneta_circuit_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            _ => BreakerState::Closed,
        }
    }
}

/// Feeds failsafe's state transitions into an atomic (for the half-open probe
/// limit and readiness), into the exported gauge, and to whoever waits for
/// the breaker to close.
struct Observer {
    dependency: &'static str,
    state: Arc<AtomicU8>,
    closed: Arc<Notify>,
}

impl Observer {
    fn set(&self, state: BreakerState) {
        self.state.store(state as u8, Ordering::Release);
        metrics::gauge!("moneta_circuit_breaker_state", "dependency" => self.dependency)
            .set(state as u8 as f64);
        tracing::info!(dependency = self.dependency, state = ?state, "circuit breaker changed state");
    }
}

impl Instrument for Observer {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.set(BreakerState::Closed);
        self.closed.notify_waiters();
    }
}

/// Doubling open intervals from `next` up to `max`. failsafe's own backoffs
/// refuse intervals under one second, too coarse for a playback hot path.
#[derive(Clone)]
struct Doubling {
    next: Duration,
    max: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(current)
    }
}

/// Opens on a run of consecutive failures (a dead dependency) or on a low
/// success rate over a window (a flapping one, whose failures never line up).
type Policy = OrElse<ConsecutiveFailures<Doubling>, SuccessRateOverTimeWindow<Doubling>>;
type Breaker = StateMachine<Policy, Observer>;

/// A probe is skipped while real calls were made this recently: they keep
/// the breaker current, and a probe's success must not close a half-open
/// breaker while real calls still fail.
const PROBE_QUIET: Duration = Duration::from_secs(2);

/// The room an admitted call holds until it ends.
struct Admission<'a> {
    _probe: Option<SemaphorePermit<'a>>,
    _slot: SemaphorePermit<'a>,
    started: Instant,
}

struct Inner {
    dependency: &'static str,
    settings: GuardSettings,
    breaker: Breaker,
    state: Arc<AtomicU8>,
    closed: Arc<Notify>,
    bulkhead: Semaphore,
    /// failsafe lets every call through while half-open; this bounds the probes.
    probes: Semaphore,
    last_ok: AtomicBool,
    /// Milliseconds after `born` of the last real (non-probe) call.
    last_call_ms: AtomicU64,
    born: Instant,
    metrics: CallMetrics,
    /// Every call in flight fails at once when a dependency dies, and every
    /// probe after: one line a second tells the operator as much.
    failure_warnings: Throttled,
}

/// The dependency's series, registered once: the macros look a series up on
/// every call, and Redis is called on every request.
struct CallMetrics {
    duration: metrics::Histogram,
    /// By outcome, in the order of [`OUTCOMES`].
    requests: [metrics::Counter; OUTCOMES.len()],
}

const OUTCOMES: [&str; 5] = ["success", "error", "timeout", "rejected_open", "rejected_full"];

impl CallMetrics {
    fn new(dependency: &'static str) -> Self {
        Self {
            duration: metrics::histogram!("moneta_dependency_request_duration_seconds", "dependency" => dependency),
            requests: OUTCOMES.map(|outcome| {
                metrics::counter!("moneta_dependency_requests_total", "dependency" => dependency, "outcome" => outcome)
            }),
        }
    }

    fn count(&self, outcome: &'static str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.requests[i].increment(1);
        }
    }
}

/// Timeout ∘ bulkhead ∘ circuit breaker ∘ metrics around one dependency.
///
/// A call rejected by the open breaker or the full bulkhead returns at once
/// (an atomic load and a mutex-free semaphore try). The timeout runs inside the
/// breaker's accounting, so a hung dependency counts as failing. A call whose
/// future is dropped (the client went away) records no outcome, as in failsafe.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

impl Guard {
    pub fn new(dependency: &'static str, settings: &GuardSettings) -> Self {
        let state = Arc::new(AtomicU8::new(BreakerState::Closed as u8));
        let closed = Arc::new(Notify::new());
        // Exported from the start: an absent series would read as "no data",
        // not "closed", on dashboards and in alerts.
        metrics::gauge!("moneta_circuit_breaker_state", "dependency" => dependency)
            .set(BreakerState::Closed as u8 as f64);
        let backoff = Doubling {
            next: settings.breaker_open_min,
            max: settings.breaker_open_max,
        };
        let policy = consecutive_failures(settings.breaker_failures, backoff.clone()).or_else(
            success_rate_over_time_window(
                f64::from(settings.breaker_min_success_pct.min(100)) / 100.0,
                settings.breaker_min_calls,
                settings.breaker_window,
                backoff,
            ),
        );
        let breaker = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(Observer {
                dependency,
                state: state.clone(),
                closed: closed.clone(),
            })
            .build();
        Self {
            inner: Arc::new(Inner {
                dependency,
                settings: settings.clone(),
                breaker,
                state,
                closed,
                bulkhead: Semaphore::new(settings.max_concurrency),
                probes: Semaphore::new(settings.half_open_probes),
                last_ok: AtomicBool::new(true),
                last_call_ms: AtomicU64::new(0),
                born: Instant::now(),
                metrics: CallMetrics::new(dependency),
                failure_warnings: Throttled::new(Duration::from_secs(1)),
            }),
        }
    }

    pub fn dependency(&self) -> &'static str {
        self.inner.dependency
    }

    /// How long a call may take before the guard gives up on it.
    pub fn timeout(&self) -> Duration {
        self.inner.settings.timeout
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.inner.state.load(Ordering::Acquire))
    }

    /// Returns when the breaker next closes (a call found the dependency
    /// back), for work that waits for it and must not wait a poll longer.
    pub async fn closes(&self) {
        self.inner.closed.notified().await;
    }

    /// Up when the breaker is closed and the last call succeeded.
    pub fn is_up(&self) -> bool {
        self.state() == BreakerState::Closed && self.inner.last_ok.load(Ordering::Relaxed)
    }

    // The entry points below are plain functions returning `guarded`'s
    // future rather than `async fn`s awaiting it: each `async fn` layer keeps
    // its own copy of `call` beside the future it awaits, and a Redis call's
    // future is kilobytes that every request's future carries and the router
    // copies (a layer more here was +3 KB and +16 k instructions a heartbeat).

    /// Runs `call` under the guard. `Err` from `call` counts as a failure of the dependency.
    pub fn call<T, E, F>(&self, call: F) -> impl Future<Output = Result<T, DependencyError>>
    where
        E: Display,
        F: Future<Output = Result<T, E>>,
    {
        self.call_judged(call, |_: &E| Verdict::Outage)
    }

    /// Runs `call` under the guard; `judge` tells what an error of `call`
    /// says about the dependency. Errors not judged an outage come back as
    /// [`DependencyError::Refused`].
    pub fn call_judged<T, E, F>(
        &self,
        call: F,
        judge: impl Fn(&E) -> Verdict,
    ) -> impl Future<Output = Result<T, DependencyError>>
    where
        E: Display,
        F: Future<Output = Result<T, E>>,
    {
        self.call_judged_timing_out(call, judge, || Verdict::Outage)
    }

    /// [`Guard::call_judged`] for a call whose timing out may be about the
    /// call rather than the dependency (`timed_out`: what a timeout says,
    /// asked when it happens).
    pub fn call_judged_timing_out<T, E, F>(
        &self,
        call: F,
        judge: impl Fn(&E) -> Verdict,
        timed_out: impl FnOnce() -> Verdict,
    ) -> impl Future<Output = Result<T, DependencyError>>
    where
        E: Display,
        F: Future<Output = Result<T, E>>,
    {
        // +1: zero means "no real call yet". Made when the call is made, as
        // callers await it at once.
        let since_born = self.inner.born.elapsed().as_millis() as u64 + 1;
        self.inner.last_call_ms.store(since_born, Ordering::Relaxed);
        self.guarded(call, judge, timed_out)
    }

    /// A background reachability check, made only while no real call has
    /// been made for a while (so readiness and the breaker learn of an outage
    /// or a recovery without traffic). Skipped calls answer `Ok`.
    pub async fn probe<T, E, F>(&self, call: F) -> Result<(), DependencyError>
    where
        E: Display,
        F: Future<Output = Result<T, E>>,
    {
        let now = self.inner.born.elapsed().as_millis() as u64;
        let last = self.inner.last_call_ms.load(Ordering::Relaxed);
        if last > 0 && now.saturating_sub(last) < PROBE_QUIET.as_millis() as u64 {
            return Ok(());
        }
        self.guarded(call, |_| Verdict::Outage, || Verdict::Outage)
            .await
            .map(drop)
    }

    /// Admits a call, then runs it under the timeout. Admission (breaker,
    /// probes, bulkhead) happens when the call is made, as callers await it
    /// at once. The rest is a `Map` around the timed call, not an `async fn`:
    /// an `async fn` keeps its argument beside the future it awaits, so a
    /// Redis call's future sat twice in every request's (3 KB each, copied
    /// by every layer of the router).
    fn guarded<T, E, F>(
        &self,
        call: F,
        judge: impl Fn(&E) -> Verdict,
        timed_out: impl FnOnce() -> Verdict,
    ) -> impl Future<Output = Result<T, DependencyError>>
    where
        E: Display,
        F: Future<Output = Result<T, E>>,
    {
        let admission = match self.admit() {
            Ok(admission) => admission,
            Err(rejected) => return Either::Left(std::future::ready(Err(rejected))),
        };
        Either::Right(
            tokio::time::timeout(self.inner.settings.timeout, call)
                .map(move |result| self.settle(admission, result, judge, timed_out)),
        )
    }

    fn admit(&self) -> Result<Admission<'_>, DependencyError> {
        let inner = &*self.inner;
        let dep = inner.dependency;
        if !inner.breaker.is_call_permitted() {
            return Err(self.reject(DependencyError::Open(dep), "rejected_open"));
        }
        // failsafe moves to half-open inside `is_call_permitted` but tells the
        // observer after releasing its lock, so the state read here can still
        // say open (and under a loaded CPU, for a whole batch of calls): a
        // call the breaker lets through while not known closed is a probe.
        let probe = if self.state() != BreakerState::Closed {
            match inner.probes.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) => return Err(self.reject(DependencyError::Open(dep), "rejected_open")),
            }
        } else {
            None
        };
        let Ok(slot) = inner.bulkhead.try_acquire() else {
            return Err(self.reject(DependencyError::Saturated(dep), "rejected_full"));
        };
        Ok(Admission {
            _probe: probe,
            _slot: slot,
            started: Instant::now(),
        })
    }

    /// Tells the breaker and the metrics how an admitted call ended.
    fn settle<T, E: Display>(
        &self,
        admission: Admission<'_>,
        result: Result<Result<T, E>, tokio::time::error::Elapsed>,
        judge: impl Fn(&E) -> Verdict,
        timed_out: impl FnOnce() -> Verdict,
    ) -> Result<T, DependencyError> {
        let inner = &*self.inner;
        let dep = inner.dependency;
        let (outcome, verdict, result) = match result {
            Ok(Ok(value)) => ("success", Verdict::Answered, Ok(value)),
            Ok(Err(e)) => match judge(&e) {
                Verdict::Outage => (
                    "error",
                    Verdict::Outage,
                    Err(DependencyError::Failed(dep, e.to_string())),
                ),
                verdict => (
                    "error",
                    verdict,
                    Err(DependencyError::Refused(dep, e.to_string())),
                ),
            },
            Err(_) => ("timeout", timed_out(), Err(DependencyError::Timeout(dep))),
        };
        match verdict {
            Verdict::Answered => {
                inner.breaker.on_success();
                inner.last_ok.store(true, Ordering::Relaxed);
            }
            Verdict::Outage => {
                if let Err(e) = &result
                    && let Some(skipped) = inner.failure_warnings.pass()
                {
                    tracing::warn!(dependency = dep, error = %e, skipped, "dependency call failed");
                }
                inner.breaker.on_error();
                inner.last_ok.store(false, Ordering::Relaxed);
            }
            Verdict::Unclear => {}
        }
        inner
            .metrics
            .duration
            .record(admission.started.elapsed().as_secs_f64());
        inner.metrics.count(outcome);
        result
    }

    /// A call not made because the part of the dependency it needs is known
    /// to fail (one cluster primary, while the others answer): answered at
    /// once, as by an open breaker, and counted so, but not against the
    /// breaker every other call shares.
    pub fn refuse(&self) -> DependencyError {
        self.reject(DependencyError::Open(self.inner.dependency), "rejected_open")
    }

    fn reject(&self, error: DependencyError, outcome: &'static str) -> DependencyError {
        self.inner.metrics.count(outcome);
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GuardSettings {
        GuardSettings {
            timeout: Duration::from_millis(50),
            max_concurrency: 2,
            breaker_failures: 3,
            breaker_open_min: Duration::from_millis(100),
            breaker_open_max: Duration::from_millis(100),
            half_open_probes: 1,
            breaker_min_success_pct: 50,
            breaker_min_calls: 1_000,
            breaker_window: Duration::from_secs(10),
        }
    }

    async fn fail(g: &Guard) -> Result<(), DependencyError> {
        g.call(async { Err::<(), _>("boom") }).await
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_recovers() {
        let g = Guard::new("test", &settings());
        for _ in 0..3 {
            assert!(matches!(fail(&g).await, Err(DependencyError::Failed(..))));
        }
        assert_eq!(g.state(), BreakerState::Open);
        assert!(matches!(fail(&g).await, Err(DependencyError::Open(_))));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(g.call(async { Ok::<_, String>(1) }).await.is_ok());
        assert_eq!(g.state(), BreakerState::Closed);
        assert!(g.is_up());
    }

    #[tokio::test]
    async fn waiters_learn_when_the_breaker_closes() {
        let g = Guard::new("test", &settings());
        for _ in 0..3 {
            let _ = fail(&g).await;
        }
        let waiter = g.clone();
        let closes = tokio::spawn(async move { waiter.closes().await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!closes.is_finished(), "woke while the breaker was open");
        assert!(g.call(async { Ok::<_, String>(()) }).await.is_ok());
        let woke = tokio::time::timeout(Duration::from_secs(10), closes).await;
        assert!(woke.is_ok(), "a waiter slept through the breaker closing");
    }

    #[tokio::test]
    async fn an_answered_error_is_not_an_outage() {
        let g = Guard::new("test", &settings());
        for _ in 0..10 {
            let r = g
                .call_judged(async { Err::<(), _>("NOGROUP") }, |_: &&str| Verdict::Answered)
                .await;
            assert!(matches!(r, Err(DependencyError::Refused(..))));
        }
        assert_eq!(g.state(), BreakerState::Closed);
        assert!(g.is_up());
    }

    #[tokio::test]
    async fn timeout_counts_as_failure() {
        let g = Guard::new("test", &settings());
        for _ in 0..3 {
            let r = g
                .call(async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<_, String>(())
                })
                .await;
            assert!(matches!(r, Err(DependencyError::Timeout(_))));
        }
        assert_eq!(g.state(), BreakerState::Open);
    }

    /// Opens `g`, waits out its open interval, and makes a second call while
    /// the first (the probe) is out; `meanwhile` runs just before the second.
    async fn while_a_probe_is_out(
        g: &Guard,
        meanwhile: impl FnOnce(),
    ) -> (Result<(), DependencyError>, Result<(), DependencyError>) {
        for _ in 0..3 {
            let _ = fail(g).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The first probe holds its slot until the second call has been answered.
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let slow = g.call(async {
            let _ = held.await;
            Ok::<_, String>(())
        });
        let second = async {
            meanwhile();
            let answer = g.call(async { Ok::<_, String>(()) }).await;
            let _ = release.send(());
            answer
        };
        tokio::join!(slow, second)
    }

    #[tokio::test]
    async fn half_open_admits_a_bounded_number_of_probes() {
        let g = Guard::new("test", &settings());
        let (first, second) = while_a_probe_is_out(&g, || {}).await;
        assert!(first.is_ok());
        assert!(matches!(second, Err(DependencyError::Open(_))));
    }

    #[tokio::test]
    async fn a_call_let_through_before_the_state_is_told_is_a_probe() {
        let g = Guard::new("test", &settings());
        // failsafe is half-open with the first probe out, but its observer has
        // not run yet, as when the thread that moved it was preempted.
        let (first, second) = while_a_probe_is_out(&g, || {
            g.inner.state.store(BreakerState::Open as u8, Ordering::Release);
        })
        .await;
        assert!(first.is_ok());
        assert!(matches!(second, Err(DependencyError::Open(_))));
    }

    #[tokio::test]
    async fn an_unclear_answer_neither_opens_nor_closes_the_breaker() {
        let g = Guard::new("test", &settings());
        async fn unclear(g: &Guard) -> Result<(), DependencyError> {
            g.call_judged(async { Err::<(), _>("500 for a batch") }, |_: &&str| {
                Verdict::Unclear
            })
            .await
        }
        for _ in 0..10 {
            assert!(matches!(unclear(&g).await, Err(DependencyError::Refused(..))));
        }
        assert_eq!(g.state(), BreakerState::Closed);
        for _ in 0..3 {
            let _ = fail(&g).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let _ = unclear(&g).await;
        assert_eq!(g.state(), BreakerState::HalfOpen, "closed by an unclear answer");
        assert!(matches!(fail(&g).await, Err(DependencyError::Failed(..))));
        assert_eq!(g.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn bulkhead_rejects_instead_of_queueing() {
        let g = Guard::new("test", &settings());
        // Both slots are held until the third call has been answered.
        let gate = tokio::sync::Semaphore::new(0);
        let hold = || {
            g.call(async {
                let _ = gate.acquire().await;
                Ok::<_, String>(())
            })
        };
        let third = async {
            let answer = g.call(async { Ok::<_, String>(()) }).await;
            gate.add_permits(2);
            answer
        };
        let (a, b, c) = tokio::join!(hold(), hold(), third);
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(c, Err(DependencyError::Saturated(_))));
    }

    #[tokio::test]
    async fn opens_on_a_low_success_rate_without_consecutive_failures() {
        let mut s = settings();
        s.breaker_failures = 1_000;
        s.breaker_min_calls = 10;
        s.breaker_window = Duration::from_secs(1);
        let g = Guard::new("test", &s);
        // Never many failures in a row, but three calls in four fail. The
        // rate only counts once the window has been observed whole; failsafe's
        // moving average ignores calls within one millisecond of the previous.
        let started = Instant::now();
        let mut n = 0u32;
        while g.state() == BreakerState::Closed && started.elapsed() < Duration::from_secs(20) {
            let _ = match n % 4 {
                0 => g.call(async { Ok::<_, String>(()) }).await,
                _ => fail(&g).await,
            };
            n += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        assert_eq!(g.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn probes_wait_while_real_calls_decide() {
        let g = Guard::new("test", &settings());
        let _ = fail(&g).await;
        let probed = std::sync::atomic::AtomicBool::new(false);
        let r = g
            .probe(async {
                probed.store(true, Ordering::Relaxed);
                Ok::<_, String>(())
            })
            .await;
        assert!(r.is_ok());
        assert!(
            !probed.load(Ordering::Relaxed),
            "a probe ran right after a real call"
        );
        assert!(!g.is_up(), "a skipped probe must not mark the dependency up");
    }
}
