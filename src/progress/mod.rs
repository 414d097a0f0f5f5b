//! Delivery of resume positions to the internal API, at least once.
//!
//! A position is durable before the player hears `200`: the heartbeat script
//! appends it to the progress log in Redis (`sources/redis/progress.rs`).
//! Every instance runs a [`Courier`] that reads its share of the log, takes
//! over what dead instances left, offers parked pairs again, and delivers
//! them in batches. A batch that fails while the internal API takes others
//! is split until the item at fault stands alone: refused for good (`400`,
//! `409`, `413`, `422`), it is dropped; failing otherwise, it is tried again
//! and, after `MONETA_PROGRESS_MAX_ATTEMPTS` failures alone, moved to the
//! dead letters ([`replay`]). When the API takes nothing at all (not even an
//! empty batch), nothing is judged: everything is parked (one entry per user
//! and title) and offered again every round.
//!
//! Only while Redis is unreachable are positions kept in this process's
//! memory ([`ProgressQueue`]); they go to the internal API directly, and to
//! Redis (the resume position, and the log when not delivered yet) as soon
//! as it answers again.

mod courier;
mod queue;
pub mod replay;

pub use courier::{Courier, Fate, Report, deliver};
pub use queue::ProgressQueue;

/// Counts positions given up, by why (one of
/// [`DROP_REASONS`](crate::telemetry::metrics::DROP_REASONS)).
fn dropped(reason: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!("moneta_progress_dropped_total", "reason" => reason).increment(n as u64);
    }
}
