//! Write-behind delivery of resume positions to the internal API.
//!
//! Positions reach Redis at once (that is what playback-info reads); this queue
//! carries them to the system of record in batches. It coalesces by
//! (user, title) — only the newest position matters — which also bounds it:
//! its size is the number of distinct (user, title) pairs awaiting delivery,
//! capped by `MONETA_PROGRESS_QUEUE_CAPACITY`.
//!
//! A batch the internal API refuses is parked in Redis (when Redis is up) so
//! it outlives this process and any instance can deliver it later; only when
//! Redis is down too does it stay in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::sources::internal_api::{InternalApi, ProgressItem};
use crate::sources::redis::RedisStore;

type Key = (String, String);

pub struct ProgressQueue {
    pending: Mutex<HashMap<Key, (u64, DateTime<Utc>)>>,
    capacity: usize,
}

impl ProgressQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, (u64, DateTime<Utc>)>> {
        // A poisoned lock only means another thread panicked mid-insert of plain data.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a position; the newer of two positions for the same pair wins.
    /// Returns false when the queue is full and the position was not queued.
    pub fn record(&self, user_id: &str, content_id: &str, position_ms: u64, at: DateTime<Utc>) -> bool {
        let mut pending = self.lock();
        let key = (user_id.to_owned(), content_id.to_owned());
        if let Some(existing) = pending.get_mut(&key) {
            if existing.1 <= at {
                *existing = (position_ms, at);
            }
            return true;
        }
        if pending.len() >= self.capacity {
            drop(pending);
            metrics::counter!("moneta_progress_dropped_total").increment(1);
            return false;
        }
        pending.insert(key, (position_ms, at));
        let depth = pending.len();
        drop(pending);
        metrics::gauge!("moneta_progress_queue_depth").set(depth as f64);
        true
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn take(&self, max: usize) -> Vec<ProgressItem> {
        let mut pending = self.lock();
        let keys: Vec<Key> = pending.keys().take(max).cloned().collect();
        let items = keys
            .into_iter()
            .filter_map(|key| {
                let (position_ms, updated_at) = pending.remove(&key)?;
                Some(ProgressItem {
                    user_id: key.0,
                    content_id: key.1,
                    position_ms,
                    updated_at,
                })
            })
            .collect();
        metrics::gauge!("moneta_progress_queue_depth").set(pending.len() as f64);
        items
    }

    /// Puts back items that could not be delivered, unless newer ones arrived meanwhile.
    fn restore(&self, items: Vec<ProgressItem>) {
        let mut pending = self.lock();
        for item in items {
            let key = (item.user_id, item.content_id);
            match pending.get(&key) {
                Some((_, at)) if *at >= item.updated_at => {}
                _ => {
                    pending.insert(key, (item.position_ms, item.updated_at));
                }
            }
        }
        metrics::gauge!("moneta_progress_queue_depth").set(pending.len() as f64);
    }

    /// Delivers one batch: from memory, or else from what was parked in
    /// Redis. A failed batch is parked in Redis, or kept in memory when Redis
    /// is down too.
    async fn flush_once(&self, sinks: &Sinks) -> Result<usize, ()> {
        let mut items = self.take(sinks.batch_size);
        if items.is_empty() {
            items = sinks
                .redis
                .take_spilled_progress(sinks.batch_size)
                .await
                .unwrap_or_default();
        }
        if items.is_empty() {
            return Ok(0);
        }
        match sinks.api.post_progress(&items).await {
            Ok(()) => {
                metrics::counter!("moneta_progress_delivered_total").increment(items.len() as u64);
                Ok(items.len())
            }
            Err(e) => {
                tracing::warn!(error = %e, items = items.len(), "progress delivery failed; will retry");
                if sinks.redis.spill_progress(&items, self.capacity).await.is_err() {
                    self.restore(items);
                }
                Err(())
            }
        }
    }

    /// Runs until `stop` is notified, then tries to deliver everything left
    /// within `grace`.
    pub async fn run_flusher(self: Arc<Self>, sinks: Sinks, stop: Arc<Notify>, grace: Duration) {
        let max_backoff = Duration::from_secs(10).max(sinks.interval);
        let mut delay = sinks.interval;
        loop {
            tokio::select! {
                _ = stop.notified() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = sinks.interval;
            loop {
                match self.flush_once(&sinks).await {
                    Ok(n) if n == sinks.batch_size => continue,
                    Ok(_) => break,
                    Err(()) => {
                        delay = (delay * 2).min(max_backoff);
                        break;
                    }
                }
            }
        }
        self.drain(&sinks, grace).await;
    }

    /// Final delivery on shutdown; what the internal API does not take is
    /// parked in Redis for the next start.
    async fn drain(&self, sinks: &Sinks, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while !self.is_empty() && tokio::time::Instant::now() < deadline {
            if self.flush_once(sinks).await.is_err() && !self.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let left = self.len();
        if left > 0 {
            tracing::error!(positions = left, "shutting down with undelivered positions");
        } else {
            tracing::info!("no positions left in memory");
        }
    }
}

/// Where positions go, and how often.
pub struct Sinks {
    pub api: InternalApi,
    pub redis: RedisStore,
    pub interval: Duration,
    pub batch_size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_position_wins_and_capacity_bounds() {
        let q = ProgressQueue::new(1);
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        assert!(q.record("u", "c", 10, t1));
        assert!(q.record("u", "c", 5, t0));
        assert!(!q.record("u", "other", 1, t0));
        let items = q.take(10);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].position_ms, 10);
    }

    #[test]
    fn restore_keeps_newer_entries() {
        let q = ProgressQueue::new(10);
        let t0 = Utc::now();
        q.record("u", "c", 1, t0);
        let items = q.take(10);
        q.record("u", "c", 2, t0 + chrono::Duration::seconds(1));
        q.restore(items);
        assert_eq!(q.take(10)[0].position_ms, 2);
    }
}
