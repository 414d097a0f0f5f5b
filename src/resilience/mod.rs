//! What stands between Moneta and each dependency: timeout, bulkhead and
//! circuit breaker, composed into one [`Guard`] per dependency; and what
//! stands between Moneta and its clients: the admission [`Limiter`].

mod guard;
pub mod limiter;

pub use guard::{BreakerState, DependencyError, Guard, Verdict};
pub use limiter::{Limiter, Permit, Priority};
