//! Positions acknowledged while Redis was unreachable, in this process's
//! memory until the internal API and Redis have them. Coalesced by (user,
//! title) — only the newest position matters — which also bounds it: its
//! size is the number of distinct pairs, capped by
//! `MONETA_PROGRESS_QUEUE_CAPACITY`.
//!
//! A position the internal API took while Redis was still unreachable stays
//! (as delivered) until it also updated the resume position Redis holds, so
//! that playback-info answers it after the outage. It keeps its room until
//! then: giving it up for a new pair would leave Redis answering an older
//! position once it is back, so a full queue refuses the new pair instead.
//!
//! Positions are stamped with Redis' clock as this instance estimates it.
//! An instance that has never reached Redis (it started during the outage)
//! has no estimate: its stamps are its own clock's, provisional, and are
//! moved by the offset it measures once it reaches Redis, before they meet
//! positions stamped by Redis or by other instances there. A provisional
//! position the internal API already took is sent again with its corrected
//! stamp: one dated early would otherwise lose to older positions there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::model::{ContentId, ProgressItem, UserId};
use crate::sources::redis::RedisClock;

type Key = (UserId, ContentId);

/// A position taken from the queue, and whether the internal API has it already.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub item: ProgressItem,
    pub delivered: bool,
}

#[derive(Default)]
struct Pending {
    /// Not delivered yet.
    undelivered: HashMap<Key, ProgressItem>,
    /// Delivered; waiting only to update the resume position in Redis.
    unwritten: HashMap<Key, ProgressItem>,
    /// Taken by a delivery round and not yet released: they still take room,
    /// or a full queue would accept positions while a round is out and hold
    /// more than its capacity once the round puts back what it could not place.
    in_flight: usize,
    /// Whether provisional positions may be here (or out with a round).
    provisional: bool,
    /// When the first position recorded since the courier last looked was.
    recorded_since: Option<tokio::time::Instant>,
}

impl Pending {
    fn len(&self) -> usize {
        self.undelivered.len() + self.unwritten.len()
    }

    /// Keeps `item` to deliver unless a position at least as new is here.
    /// `ties_win`: a position just acknowledged is the later write on a tie
    /// (one millisecond); one put back is not.
    fn merge(&mut self, item: ProgressItem, ties_win: bool) {
        let key = (item.user_id.clone(), item.content_id.clone());
        let newer = |known: &ProgressItem| {
            known.updated_at > item.updated_at || (!ties_win && known.updated_at == item.updated_at)
        };
        if self.undelivered.get(&key).is_some_and(newer) || self.unwritten.get(&key).is_some_and(newer) {
            return;
        }
        self.provisional |= item.provisional;
        self.unwritten.remove(&key);
        self.undelivered.insert(key, item);
    }

    /// Keeps a delivered `item` until Redis has it, unless a position at
    /// least as new is here; an older undelivered one is superseded (the
    /// internal API keeps the newest anyway).
    fn merge_delivered(&mut self, item: ProgressItem) {
        let key = (item.user_id.clone(), item.content_id.clone());
        let as_new = |known: &ProgressItem| known.updated_at >= item.updated_at;
        if self.undelivered.get(&key).is_some_and(as_new) || self.unwritten.get(&key).is_some_and(as_new) {
            return;
        }
        self.provisional |= item.provisional;
        self.undelivered.remove(&key);
        self.unwritten.insert(key, item);
    }

    /// Moves provisional stamps onto Redis' clock once it was measured.
    fn settle(&mut self, clock: &RedisClock) {
        if !self.provisional {
            return;
        }
        let Some(offset) = clock.offset() else {
            return;
        };
        for item in self.undelivered.values_mut().filter(|item| item.provisional) {
            settle(item, offset);
        }
        let delivered: Vec<Key> = (self.unwritten.iter())
            .filter(|(_, item)| item.provisional)
            .map(|(key, _)| key.clone())
            .collect();
        for key in delivered {
            if let Some(mut item) = self.unwritten.remove(&key) {
                settle(&mut item, offset);
                self.undelivered.insert(key, item);
            }
        }
        // Positions out with a round are settled as they come back.
        self.provisional = false;
    }
}

fn settle(item: &mut ProgressItem, offset: chrono::Duration) {
    item.updated_at += offset;
    item.provisional = false;
}

pub struct ProgressQueue {
    pending: Mutex<Pending>,
    capacity: usize,
    clock: Arc<RedisClock>,
    /// Told of each position recorded: one that is only here is lost with
    /// the process, so the courier delivers it now, not at its next tick.
    recorded: tokio::sync::Notify,
}

impl ProgressQueue {
    /// `clock`: the estimate of Redis' clock positions are stamped with.
    pub fn new(capacity: usize, clock: Arc<RedisClock>) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Pending::default()),
            capacity,
            clock,
            recorded: tokio::sync::Notify::new(),
        })
    }

    /// The queue, its stamps settled if they can be.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means another thread panicked mid-insert of plain data.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.settle(&self.clock);
        pending
    }

    /// Whether positions here may carry stamps of this instance's own clock.
    pub fn is_provisional(&self) -> bool {
        self.lock().provisional
    }

    fn gauge(depth: usize) {
        metrics::gauge!("moneta_progress_queue_depth").set(depth as f64);
    }

    /// Queues a position; the newer of two positions for the same pair wins.
    /// Returns false when the queue is full and the position was not queued.
    pub fn record(&self, mut item: ProgressItem) -> bool {
        let mut pending = self.lock();
        let offset = self.clock.offset();
        if let (true, Some(offset)) = (item.provisional, offset) {
            settle(&mut item, offset);
        }
        let key = (item.user_id.clone(), item.content_id.clone());
        let known = pending.undelivered.contains_key(&key) || pending.unwritten.contains_key(&key);
        if !known && pending.len() + pending.in_flight >= self.capacity {
            drop(pending);
            super::dropped("queue_full", 1);
            return false;
        }
        pending.merge(item, true);
        pending
            .recorded_since
            .get_or_insert_with(tokio::time::Instant::now);
        let depth = pending.len();
        drop(pending);
        Self::gauge(depth);
        self.recorded.notify_one();
        true
    }

    /// Returns once a position was recorded since the last return (at once
    /// if one was meanwhile), with when the first of them was: a courier
    /// busy when it came counts its wait from then, not from its return.
    pub async fn recorded(&self) -> tokio::time::Instant {
        self.recorded.notified().await;
        let since = self.lock().recorded_since.take();
        since.unwrap_or_else(tokio::time::Instant::now)
    }

    /// Positions held, delivered or not.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions held that the internal API does not have yet.
    pub fn undelivered(&self) -> usize {
        self.lock().undelivered.len()
    }

    /// Takes up to `max` positions, those still to deliver first.
    pub fn take(&self, max: usize) -> Vec<Held> {
        let mut pending = self.lock();
        let keys: Vec<Key> = pending.undelivered.keys().take(max).cloned().collect();
        let mut held: Vec<Held> = keys
            .iter()
            .filter_map(|key| pending.undelivered.remove(key))
            .map(|item| Held {
                item,
                delivered: false,
            })
            .collect();
        let room = max.saturating_sub(held.len());
        let keys: Vec<Key> = pending.unwritten.keys().take(room).cloned().collect();
        held.extend(
            keys.iter()
                .filter_map(|key| pending.unwritten.remove(key))
                .map(|item| Held {
                    item,
                    delivered: true,
                }),
        );
        pending.in_flight += held.len();
        Self::gauge(pending.len());
        held
    }

    /// Ends a round that took `taken` positions, after it put back what it
    /// could not place.
    pub fn release(&self, taken: usize) {
        let mut pending = self.lock();
        pending.in_flight = pending.in_flight.saturating_sub(taken);
    }

    /// Puts back positions not delivered, unless newer ones arrived meanwhile.
    pub fn restore(&self, items: Vec<ProgressItem>) {
        let mut pending = self.lock();
        let offset = self.clock.offset();
        for mut item in items {
            if let (true, Some(offset)) = (item.provisional, offset) {
                settle(&mut item, offset);
            }
            pending.merge(item, false);
        }
        Self::gauge(pending.len());
    }

    /// Puts back positions delivered whose resume position could not be
    /// written to Redis yet, unless newer ones arrived meanwhile.
    pub fn restore_delivered(&self, items: Vec<ProgressItem>) {
        let mut pending = self.lock();
        let offset = self.clock.offset();
        for mut item in items {
            match (item.provisional, offset) {
                // Delivered with this instance's own clock: sent again.
                (true, Some(offset)) => {
                    settle(&mut item, offset);
                    pending.merge(item, false);
                }
                _ => pending.merge_delivered(item),
            }
        }
        Self::gauge(pending.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PositionMs;
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    fn item(content: &str, position: u64, at: DateTime<Utc>) -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse("u").unwrap(),
            content_id: ContentId::parse(content).unwrap(),
            position_ms: PositionMs::new(position).unwrap(),
            updated_at: at,
            completed: false,
            provisional: false,
        }
    }

    fn positions(held: &[Held]) -> Vec<(u64, bool)> {
        held.iter()
            .map(|h| (h.item.position_ms.get(), h.delivered))
            .collect()
    }

    #[test]
    fn newest_position_wins_and_capacity_bounds() {
        let q = ProgressQueue::new(1, Arc::default());
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        assert!(q.record(item("c", 10, t1)));
        assert!(q.record(item("c", 5, t0)));
        assert!(!q.record(item("other", 1, t0)));
        assert_eq!(positions(&q.take(10)), [(10, false)]);
    }

    #[test]
    fn positions_out_for_delivery_still_take_room() {
        let q = ProgressQueue::new(1, Arc::default());
        let t0 = Utc::now();
        assert!(q.record(item("c", 1, t0)));
        let taken = q.take(10);
        assert!(
            !q.record(item("other", 1, t0)),
            "the queue is full while its item is out"
        );
        q.restore(taken.into_iter().map(|h| h.item).collect());
        q.release(1);
        assert_eq!(q.len(), 1);
        assert!(q.record(item("c", 2, t0)), "a held pair takes no more room");
    }

    #[test]
    fn restore_keeps_newer_entries() {
        let q = ProgressQueue::new(10, Arc::default());
        let t0 = Utc::now();
        q.record(item("c", 1, t0));
        let items = q.take(10);
        q.record(item("c", 2, t0 + chrono::Duration::seconds(1)));
        q.restore(items.into_iter().map(|h| h.item).collect());
        assert_eq!(positions(&q.take(10)), [(2, false)]);
    }

    #[test]
    fn a_tie_goes_to_the_position_acknowledged_last_not_to_one_put_back() {
        let q = ProgressQueue::new(10, Arc::default());
        let t0 = Utc::now();
        q.record(item("c", 1, t0));
        let taken = q.take(10);
        q.record(item("c", 2, t0));
        q.restore(taken.into_iter().map(|h| h.item).collect());
        assert_eq!(positions(&q.take(10)), [(2, false)]);
    }

    #[test]
    fn delivered_positions_wait_for_redis_behind_undelivered_ones() {
        let q = ProgressQueue::new(10, Arc::default());
        let t0 = Utc::now();
        q.restore_delivered(vec![item("a", 1, t0)]);
        q.record(item("b", 2, t0));
        assert_eq!(q.undelivered(), 1);
        assert_eq!(q.len(), 2);
        assert_eq!(positions(&q.take(1)), [(2, false)]);
        assert_eq!(positions(&q.take(1)), [(1, true)]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_newer_position_replaces_a_delivered_one_and_the_reverse() {
        let q = ProgressQueue::new(10, Arc::default());
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        q.restore_delivered(vec![item("c", 1, t0)]);
        q.record(item("c", 2, t1));
        assert_eq!(positions(&q.take(10)), [(2, false)]);
        q.record(item("c", 1, t0));
        q.restore_delivered(vec![item("c", 2, t1)]);
        assert_eq!(positions(&q.take(10)), [(2, true)]);
    }

    #[test]
    fn a_delivered_position_keeps_its_room_until_redis_has_it() {
        let q = ProgressQueue::new(1, Arc::default());
        let t0 = Utc::now();
        q.restore_delivered(vec![item("a", 1, t0)]);
        assert!(!q.record(item("b", 2, t0)), "no room for a new pair");
        // The same pair still takes a newer position.
        assert!(q.record(item("a", 3, t0 + chrono::Duration::milliseconds(1))));
        assert_eq!(positions(&q.take(10)), [(3, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_recorded_position_counts_from_the_first_recording_not_from_the_look() {
        let q = ProgressQueue::new(10, Arc::default());
        let t0 = Utc::now();
        let first = tokio::time::Instant::now();
        q.record(item("a", 1, t0));
        tokio::time::advance(Duration::from_millis(150)).await;
        q.record(item("b", 1, t0));
        // The courier was busy (a tick waiting on Redis' timeout) and looks only now.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(q.recorded().await, first);
        tokio::time::advance(Duration::from_millis(50)).await;
        let second = tokio::time::Instant::now();
        q.record(item("c", 1, t0));
        assert_eq!(q.recorded().await, second, "each look starts a new wait");
    }
}
