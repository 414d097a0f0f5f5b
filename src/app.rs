//! The application's shared state: what every handler reaches, and the
//! lifecycle phase readiness reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::auth::Verifier;
use crate::licenses::Licenses;
use crate::playback::Playback;
use crate::progress::ProgressQueue;
use crate::resilience::Guard;
use crate::sessions::Sessions;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    /// SIGTERM received: readiness says 503 while requests are still served.
    Draining = 2,
}

/// Everything the handlers share.
pub struct App {
    pub verifier: Verifier,
    pub playback: Arc<Playback>,
    pub sessions: Sessions,
    /// Positions acknowledged while Redis was unreachable.
    pub unlogged: Arc<ProgressQueue>,
    /// For readiness: each dependency's guard.
    pub redis: Guard,
    pub internal_api: Guard,
    pub heartbeat_interval: Duration,
    /// Set: the CDN cookies are also sent as `Set-Cookie` for this domain.
    pub cdn_cookie_domain: Option<String>,
    /// The licence proxy, with `MONETA_DRM_PROXY=true`.
    pub licenses: Option<Licenses>,
    phase: AtomicU8,
}

impl App {
    pub fn new(
        verifier: Verifier,
        playback: Arc<Playback>,
        sessions: Sessions,
        unlogged: Arc<ProgressQueue>,
        guards: (Guard, Guard),
        heartbeat_interval: Duration,
        cdn_cookie_domain: Option<String>,
    ) -> Self {
        Self {
            verifier,
            playback,
            sessions,
            unlogged,
            redis: guards.0,
            internal_api: guards.1,
            heartbeat_interval,
            cdn_cookie_domain,
            licenses: None,
            phase: AtomicU8::new(Phase::Starting as u8),
        }
    }

    /// With the licence proxy on.
    pub fn with_licenses(mut self, licenses: Option<Licenses>) -> Self {
        self.licenses = licenses;
        self
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }
}
