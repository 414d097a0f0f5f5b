//! The only code that does I/O: Redis, the internal API, the DRM vendors'
//! licence servers and the static files. Each networked source owns its
//! [`Guard`](crate::resilience::Guard).

pub mod drm;
pub mod internal_api;
pub mod redis;
pub mod snapshot;

/// What a request passes down to outbound calls for correlation.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub request_id: Option<String>,
}
