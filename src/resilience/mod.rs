//! What stands between Moneta and each dependency: timeout, bulkhead and
//! circuit breaker, composed into one [`Guard`] per dependency.

mod guard;

pub use guard::{BreakerState, DependencyError, Guard};
