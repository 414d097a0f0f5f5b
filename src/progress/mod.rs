//! Delivery of resume positions to the internal API, at least once.
//!
//! A position is durable before the player hears `200`: the heartbeat script
//! appends it to the progress log in Redis (`sources/redis/progress.rs`).
//! Every instance runs a [`Courier`] that reads its share of the log, takes
//! over what dead instances left, offers parked pairs again, and delivers
//! them in batches. A batch the internal API refuses (`4xx`) is split until
//! the item at fault is found and dropped alone; a batch it cannot take now
//! is parked (one entry per user and title) and offered again every round.
//!
//! Only while Redis is unreachable are positions kept in this process's
//! memory ([`ProgressQueue`]); they go to the internal API directly, or into
//! the log as soon as Redis answers again.

mod courier;
mod queue;

pub use courier::{Courier, deliver};
pub use queue::ProgressQueue;

/// Counts positions given up, by why.
fn dropped(reason: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!("moneta_progress_dropped_total", "reason" => reason).increment(n as u64);
    }
}
