//! Positions acknowledged while Redis was unreachable, in this process's
//! memory until the internal API or Redis takes them. Coalesced by (user,
//! title) — only the newest position matters — which also bounds it: its
//! size is the number of distinct pairs, capped by
//! `MONETA_PROGRESS_QUEUE_CAPACITY`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::model::{ContentId, ProgressItem, UserId};

type Key = (UserId, ContentId);

pub struct ProgressQueue {
    pending: Mutex<HashMap<Key, ProgressItem>>,
    capacity: usize,
}

impl ProgressQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, ProgressItem>> {
        // A poisoned lock only means another thread panicked mid-insert of plain data.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `item` unless a newer position for its pair is already here.
    fn merge(pending: &mut HashMap<Key, ProgressItem>, item: ProgressItem) {
        let key = (item.user_id.clone(), item.content_id.clone());
        match pending.get(&key) {
            Some(known) if known.updated_at > item.updated_at => {}
            _ => {
                pending.insert(key, item);
            }
        }
    }

    /// Queues a position; the newer of two positions for the same pair wins.
    /// Returns false when the queue is full and the position was not queued.
    pub fn record(&self, item: ProgressItem) -> bool {
        let mut pending = self.lock();
        let known = pending.contains_key(&(item.user_id.clone(), item.content_id.clone()));
        if !known && pending.len() >= self.capacity {
            drop(pending);
            super::dropped("queue_full", 1);
            return false;
        }
        Self::merge(&mut pending, item);
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

    pub fn take(&self, max: usize) -> Vec<ProgressItem> {
        let mut pending = self.lock();
        let keys: Vec<Key> = pending.keys().take(max).cloned().collect();
        let items = keys.iter().filter_map(|key| pending.remove(key)).collect();
        metrics::gauge!("moneta_progress_queue_depth").set(pending.len() as f64);
        items
    }

    /// Puts back items that could not be delivered, unless newer ones arrived meanwhile.
    pub fn restore(&self, items: Vec<ProgressItem>) {
        let mut pending = self.lock();
        for item in items {
            Self::merge(&mut pending, item);
        }
        metrics::gauge!("moneta_progress_queue_depth").set(pending.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PositionMs;
    use chrono::{DateTime, Utc};

    fn item(content: &str, position: u64, at: DateTime<Utc>) -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse("u").unwrap(),
            content_id: ContentId::parse(content).unwrap(),
            position_ms: PositionMs::new(position).unwrap(),
            updated_at: at,
            completed: false,
        }
    }

    #[test]
    fn newest_position_wins_and_capacity_bounds() {
        let q = ProgressQueue::new(1);
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        assert!(q.record(item("c", 10, t1)));
        assert!(q.record(item("c", 5, t0)));
        assert!(!q.record(item("other", 1, t0)));
        let items = q.take(10);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].position_ms.get(), 10);
    }

    #[test]
    fn restore_keeps_newer_entries() {
        let q = ProgressQueue::new(10);
        let t0 = Utc::now();
        q.record(item("c", 1, t0));
        let items = q.take(10);
        q.record(item("c", 2, t0 + chrono::Duration::seconds(1)));
        q.restore(items);
        assert_eq!(q.take(10)[0].position_ms.get(), 2);
    }
}
