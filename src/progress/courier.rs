//! The delivery loop each instance runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{ProgressQueue, dropped};
use crate::model::{ContentId, ProgressItem, UserId};
use crate::sources::internal_api::{BatchOutcome, InternalApi};
use crate::sources::redis::{Delivery, ProgressLog, Settlement};

/// Rounds per tick at most, so a large backlog drains in bounded bites.
const MAX_ROUNDS_PER_TICK: usize = 50;
/// Consumers of instances gone this long (holding nothing) leave the group.
const CONSUMER_IDLE: Duration = Duration::from_secs(3600);
/// Ticks between two looks for such consumers.
const CONSUMER_SWEEP_TICKS: u64 = 600;

/// What became of each item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Delivered,
    /// Refused for good by the internal API (`4xx`): dropped alone.
    Refused,
    /// Not delivered now (the internal API failed): kept for later.
    Failed,
}

/// Delivers `items`, splitting a refused batch in halves until the items at
/// fault stand alone, so one bad item never holds back the others. Stops
/// asking at the first failure of the dependency itself.
pub async fn deliver(api: &InternalApi, items: &[ProgressItem]) -> Vec<Fate> {
    let mut fates = vec![Fate::Failed; items.len()];
    let mut todo = Vec::with_capacity(8);
    todo.push(0..items.len());
    while let Some(range) = todo.pop() {
        let Some(batch) = items.get(range.clone()).filter(|b| !b.is_empty()) else {
            continue;
        };
        match api.post_progress(batch).await {
            Ok(BatchOutcome::Accepted) => fates[range].fill(Fate::Delivered),
            Ok(BatchOutcome::Refused(status)) if batch.len() == 1 => {
                tracing::warn!(
                    status = status.as_u16(),
                    "the internal API refused a position; dropped"
                );
                fates[range].fill(Fate::Refused);
            }
            Ok(BatchOutcome::Refused(_)) => {
                let mid = range.start + batch.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
            Err(e) => {
                tracing::warn!(error = %e, items = batch.len(), "progress delivery failed; will retry");
                break;
            }
        }
    }
    fates
}

type Pair = (UserId, ContentId);

/// One round's items, newest per (user, title), with where each came from.
#[derive(Default)]
struct Round {
    newest: HashMap<Pair, ProgressItem>,
    memory: Vec<ProgressItem>,
    settlement: Settlement,
    fresh: Vec<(String, ProgressItem)>,
    parked: Vec<(String, String, ProgressItem)>,
}

impl Round {
    fn offer(&mut self, item: &ProgressItem) {
        let pair = (item.user_id.clone(), item.content_id.clone());
        // On a tie (one Redis millisecond), the later offer is the later write.
        match self.newest.get(&pair) {
            Some(known) if known.updated_at > item.updated_at => {}
            _ => {
                self.newest.insert(pair, item.clone());
            }
        }
    }

    fn new(memory: Vec<ProgressItem>, from_log: Delivery) -> Self {
        let mut round = Round {
            memory,
            ..Round::default()
        };
        let mut invalid = 0;
        for (id, item) in from_log.fresh {
            match item {
                Some(item) => round.fresh.push((id, item)),
                None => {
                    invalid += 1;
                    round.settlement.done.push(id);
                }
            }
        }
        for (field, value, item) in from_log.parked {
            match item {
                Some(item) => round.parked.push((field, value, item)),
                None => {
                    invalid += 1;
                    round.settlement.parked_done.push((field, value));
                }
            }
        }
        dropped("invalid", invalid);
        // Oldest sources first, the log in its own order, so that later
        // offers are later writes.
        let all: Vec<ProgressItem> = round
            .parked
            .iter()
            .map(|(_, _, i)| i)
            .chain(round.memory.iter())
            .chain(round.fresh.iter().map(|(_, i)| i))
            .cloned()
            .collect();
        for item in &all {
            round.offer(item);
        }
        round
    }

    fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }
}

/// One instance's delivery worker.
pub struct Courier {
    pub api: InternalApi,
    pub log: ProgressLog,
    pub unlogged: Arc<ProgressQueue>,
    pub interval: Duration,
    pub batch_size: usize,
}

/// How much a round moved; the loop goes on while rounds come back full.
struct Moved {
    /// Fresh entries read from the log.
    fresh: usize,
    read: usize,
    delivered: usize,
}

impl Courier {
    async fn round(&self) -> Moved {
        let memory = self.unlogged.take(self.batch_size);
        let from_log = match self.log.next_round(self.batch_size).await {
            Ok(d) => d,
            Err(_) => {
                // The group is gone when Redis lost its data; creating it is
                // idempotent, and cheap next to a failed round.
                let _ = self.log.ensure_group().await;
                Delivery::default()
            }
        };
        let round = Round::new(memory, from_log);
        let fresh_read = round.fresh.len();
        let read = round.memory.len() + fresh_read + round.parked.len();
        if round.is_empty() {
            let _ = self.log.settle(&round.settlement).await;
            return Moved {
                fresh: fresh_read,
                read,
                delivered: 0,
            };
        }
        let items: Vec<ProgressItem> = round.newest.values().cloned().collect();
        let fates = deliver(&self.api, &items).await;
        let mut outcome: HashMap<Pair, Fate> = HashMap::new();
        for (item, fate) in items.iter().zip(&fates) {
            outcome.insert((item.user_id.clone(), item.content_id.clone()), *fate);
        }
        let fate_of = |i: &ProgressItem| {
            outcome
                .get(&(i.user_id.clone(), i.content_id.clone()))
                .copied()
                .unwrap_or(Fate::Failed)
        };
        let delivered = fates.iter().filter(|f| **f == Fate::Delivered).count();
        let refused = fates.iter().filter(|f| **f == Fate::Refused).count();
        metrics::counter!("moneta_progress_delivered_total").increment(delivered as u64);
        dropped("refused", refused);

        let Round {
            memory,
            mut settlement,
            fresh,
            parked,
            ..
        } = round;
        for (id, item) in fresh {
            match fate_of(&item) {
                Fate::Failed => settlement.park.push((id, item)),
                _ => settlement.done.push(id),
            }
        }
        for (field, value, item) in parked {
            if fate_of(&item) != Fate::Failed {
                settlement.parked_done.push((field, value));
            }
        }
        // Not settled: the entries stay with this consumer and another instance
        // takes them over; delivering twice is fine, the internal API keeps the newest.
        let _ = self.log.settle(&settlement).await;

        let undelivered: Vec<ProgressItem> = memory
            .into_iter()
            .filter(|i| fate_of(i) == Fate::Failed)
            .collect();
        if !undelivered.is_empty() && self.log.append_all(&undelivered).await.is_err() {
            self.unlogged.restore(undelivered);
        }
        Moved {
            fresh: fresh_read,
            read,
            delivered,
        }
    }

    /// One tick: rounds until one comes back short (or fails).
    async fn tick(&self) {
        for _ in 0..MAX_ROUNDS_PER_TICK {
            let moved = self.round().await;
            metrics::gauge!("moneta_progress_queue_depth").set(self.unlogged.len() as f64);
            // Full rounds go on while they deliver; while the internal API
            // fails, only a full read of fresh entries is worth another round
            // (parking them keeps the log short).
            let goes_on =
                moved.fresh >= self.batch_size || (moved.read >= self.batch_size && moved.delivered > 0);
            if !goes_on {
                break;
            }
        }
        if let Ok((log, parked)) = self.log.backlog().await {
            metrics::gauge!("moneta_progress_backlog", "kind" => "log").set(log as f64);
            metrics::gauge!("moneta_progress_backlog", "kind" => "parked").set(parked as f64);
        }
    }

    /// Runs until `stop` is notified, then delivers what this process holds
    /// in memory within `grace` (what is in Redis is left for any instance).
    pub async fn run(self, stop: Arc<Notify>, grace: Duration) {
        let _ = self.log.ensure_group().await;
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.notified() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
            self.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(CONSUMER_SWEEP_TICKS) {
                let _ = self.log.forget_idle_consumers(CONSUMER_IDLE).await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            self.tick().await;
            if self.unlogged.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = self.unlogged.len();
        if left > 0 {
            tracing::error!(
                positions = left,
                "shutting down with positions that reached neither Redis nor the internal API"
            );
        } else {
            tracing::info!("no positions left in memory");
        }
    }
}
