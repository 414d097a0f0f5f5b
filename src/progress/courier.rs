//! The delivery loop each instance runs.

use std::sync::Arc;
use std::time::Duration;

// foldhash, seeded per process, for the round's maps: one lookup or more
// per entry, where SipHash was ~1 k instructions a heartbeat.
use foldhash::HashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::queue::Held;
use super::{ProgressQueue, dropped};
use crate::model::{ContentId, ProgressItem, UserId};
use crate::resilience::DependencyError;
use crate::sources::internal_api::{BatchOutcome, InternalApi};
use crate::sources::redis::{Delivery, EntryId, ParkedField, ProgressLog, Settlement};
use crate::telemetry::throttled::Throttled;

/// How often positions waiting in memory look whether Redis answers again.
const REDIS_BACK_POLL: Duration = Duration::from_millis(200);
/// After a position is recorded in memory (Redis failed), the courier ticks
/// this much later rather than at its next tick: until the internal API or
/// Redis has it, a SIGKILL loses it. The wait gathers what arrives with it,
/// and bounds the ticks an outage's traffic makes. It counts from the
/// recording: a tick in flight then (waiting on Redis' timeout) used it up.
const RECORDED_GATHER: Duration = Duration::from_millis(50);
/// Rounds per tick at most, so a large backlog drains in bounded bites:
/// between two, the courier counts the backlog and looks for a shutdown. A
/// tick that ends at this bound with rounds still full is followed at once
/// by the next, not after the flush interval: a backlog (a flood admitted
/// while the internal API was away) drains as fast as rounds go, and the
/// log does not outgrow what the courier can fold into parked pairs.
const MAX_ROUNDS_PER_TICK: usize = 50;
/// Consumers of instances gone this long (holding nothing) leave the group.
const CONSUMER_IDLE: Duration = Duration::from_secs(3600);
/// Ticks between two looks for such consumers.
const CONSUMER_SWEEP_TICKS: u64 = 600;
/// A courier whose last tick found nothing sweeps (takes over abandoned
/// entries, samples parked pairs) and counts the backlog every this many
/// ticks only: an idle tick over every bucket was ~100 Redis commands. A
/// busy one sweeps every tick. Entries are abandoned for 15 s before they
/// can be taken over, and parked pairs wait for a failing internal API:
/// neither waits for a few ticks more in any way that matters.
const IDLE_SWEEP_TICKS: u64 = 5;

/// What became of each item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Delivered,
    /// Refused for good alone (`400`, `409`, `413`, `422`): dropped.
    Refused,
    /// Failed alone (any other answer, a transport error, a timeout) right
    /// after the internal API had taken a batch: the item's fault, one more
    /// attempt. Holds the failure as a dead letter records it.
    FailedAlone(String),
    /// Not delivered now (the internal API takes nothing, or was not asked):
    /// kept as it is.
    Failed,
}

/// What [`deliver`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// One per item, in order.
    pub fates: Vec<Fate>,
    /// The internal API took nothing, not even an empty batch: an outage
    /// (down, or misconfigured), so nothing was judged.
    pub outage: bool,
    /// The internal API took a batch that held items.
    pub took_items: bool,
}

/// Why one batch was not taken.
enum Failure {
    Refused,
    Other(String),
}

/// Whether the internal API takes batches at all: an empty one carries no
/// item that could be at fault.
pub(super) async fn takes_batches(api: &InternalApi) -> bool {
    matches!(api.post_progress(&[]).await, Ok(BatchOutcome::Accepted))
}

/// Delivers `items`, splitting a failed batch in halves until the items at
/// fault stand alone, so one bad item never holds back the others.
///
/// A failure is blamed on the batch only while the internal API is proven to
/// take batches: the call just before succeeded (a delivery, or an empty
/// batch sent to find out). Otherwise the empty batch is sent; if that fails
/// too, the API is down or misconfigured and the round stops with nothing
/// judged. So an outage costs two calls, a failure in the middle of a round
/// three, and a misconfigured URL never turns everybody's positions into
/// poison.
///
/// A refusal is final, so it needs more proof than an empty batch taken: a
/// gateway in the way or a schema change may take that and refuse every
/// item. An item refused alone is dropped only when the internal API took
/// items in this delivery or lately (`others_taken`); otherwise it stays as
/// it is, as in an outage, until items get through again.
pub async fn deliver(api: &InternalApi, items: &[ProgressItem], others_taken: bool) -> Report {
    let mut report = Report {
        fates: vec![Fate::Failed; items.len()],
        outage: false,
        took_items: false,
    };
    let mut proven = false;
    let mut alone = Vec::new();
    let mut todo = Vec::with_capacity(8);
    todo.push(0..items.len());
    while let Some(range) = todo.pop() {
        let Some(batch) = items.get(range.clone()).filter(|b| !b.is_empty()) else {
            continue;
        };
        let failure = match api.post_progress(batch).await {
            Ok(BatchOutcome::Accepted) => {
                report.fates[range].fill(Fate::Delivered);
                proven = true;
                report.took_items = true;
                continue;
            }
            Ok(BatchOutcome::Refused(_)) => Failure::Refused,
            Ok(BatchOutcome::Failed(status)) => Failure::Other(format!("status {}", status.as_u16())),
            // Turned away by our own guard: nothing was asked, nothing is learnt.
            Err(e @ (DependencyError::Open(_) | DependencyError::Saturated(_))) => {
                if let Some(skipped) = OUTAGE_WARNINGS.pass() {
                    tracing::warn!(error = %e, skipped, "progress delivery not attempted; will retry");
                }
                report.outage = true;
                break;
            }
            Err(e) => Failure::Other(e.kind().to_owned()),
        };
        if !proven && !takes_batches(api).await {
            if let Some(skipped) = OUTAGE_WARNINGS.pass() {
                tracing::warn!(
                    items = batch.len(),
                    skipped,
                    "the internal API takes no progress batch, not even an empty one; will retry"
                );
            }
            report.outage = true;
            break;
        }
        proven = false;
        if batch.len() == 1 {
            alone.push((range.start, failure));
        } else {
            let mid = range.start + batch.len() / 2;
            todo.push(mid..range.end);
            todo.push(range.start..mid);
        }
    }
    let refusals_count = others_taken || report.took_items;
    for (at, failure) in alone {
        report.fates[at] = match failure {
            Failure::Refused if refusals_count => {
                tracing::warn!("the internal API refused a position; dropped");
                Fate::Refused
            }
            Failure::Refused => {
                tracing::warn!("the internal API refused a position and has taken none lately; will retry");
                Fate::Failed
            }
            Failure::Other(error) => {
                tracing::warn!(error = %error, "the internal API failed a position alone; will retry");
                Fate::FailedAlone(error)
            }
        };
    }
    report
}

/// The warnings every round of an internal-API outage would repeat (under
/// a flood, rounds follow one another every few milliseconds): one every
/// ten seconds, with how many were left out before it.
static OUTAGE_WARNINGS: Throttled = Throttled::new(Duration::from_secs(10));

/// How long items the internal API took make its refusals credible.
const TAKEN_VOUCHES_FOR: Duration = Duration::from_secs(60);

type Pair = (UserId, ContentId);

fn pair_of(item: &ProgressItem) -> Pair {
    (item.user_id.clone(), item.content_id.clone())
}

/// Where an item of a round came from, with what settling it needs.
#[derive(Debug, Clone)]
enum Origin {
    /// Held in this process's memory; `delivered` when the internal API has
    /// it already and only the resume position in Redis is missing.
    Memory { delivered: bool },
    /// An entry of the log.
    Fresh { id: EntryId, attempts: u32 },
    /// A field of a parked hash.
    Parked {
        field: ParkedField,
        value: String,
        attempts: u32,
    },
}

#[derive(Debug, Clone)]
struct Offer {
    item: ProgressItem,
    origin: Origin,
}

/// One round's items and, per (user, title), the newest of them: the one
/// that is sent.
#[derive(Default)]
struct Round {
    offers: Vec<Offer>,
    newest: HashMap<Pair, usize>,
    settlement: Settlement,
    /// Fresh entries read from the log (parseable or not).
    fresh: usize,
}

/// How a tick went.
struct Ticked {
    /// It read, swept or delivered something.
    busy: bool,
    /// It stopped at [`MAX_ROUNDS_PER_TICK`] with rounds still full.
    more: bool,
}

/// A position from memory on its way to Redis.
#[derive(Debug, Clone)]
struct Homecoming {
    item: ProgressItem,
    /// Update the user's resume position (unless Redis holds a newer one).
    position: bool,
    /// Append to the log, with the times it failed alone so far; `None`
    /// when it needs no delivery any more.
    log: Option<u32>,
}

/// How a round ends, before anything is written.
#[derive(Default)]
struct Conclusion {
    settlement: Settlement,
    /// Positions from memory on their way to Redis; with `Some(attempts)`
    /// when the settlement moves them to the dead letters (if that fails,
    /// they go to the log instead).
    homecomings: Vec<(Homecoming, Option<u32>)>,
    delivered: usize,
    refused: usize,
}

impl Round {
    fn new(memory: Vec<Held>, from_log: Delivery) -> Self {
        let mut round = Round {
            fresh: from_log.fresh.len(),
            ..Round::default()
        };
        let mut invalid = 0;
        // Oldest sources first, the log in its own order, so that later
        // offers are later writes.
        for (field, value, parsed) in from_log.parked {
            match parsed {
                Some((item, attempts)) => round.offer(
                    item,
                    Origin::Parked {
                        field,
                        value,
                        attempts,
                    },
                ),
                None => {
                    invalid += 1;
                    round.settlement.forget_parked(field, value);
                }
            }
        }
        for held in memory {
            round.offer(
                held.item,
                Origin::Memory {
                    delivered: held.delivered,
                },
            );
        }
        for (id, parsed) in from_log.fresh {
            match parsed {
                Some((item, attempts)) => round.offer(item, Origin::Fresh { id, attempts }),
                None => {
                    invalid += 1;
                    round.settlement.done(id);
                }
            }
        }
        dropped("invalid", invalid);
        round
    }

    fn offer(&mut self, item: ProgressItem, origin: Origin) {
        let at = self.offers.len();
        let pair = pair_of(&item);
        // On a tie (one Redis millisecond), the later offer is the later write.
        let newer = self
            .newest
            .get(&pair)
            .is_none_or(|&known| self.offers[known].item.updated_at <= item.updated_at);
        if newer {
            self.newest.insert(pair, at);
        }
        self.offers.push(Offer { item, origin });
    }

    /// Items read (memory, fresh and parked).
    fn read(&self) -> usize {
        self.offers.len()
    }

    /// The offers to send: the newest of each pair, unless the internal API
    /// has it already.
    fn to_send(&self) -> Vec<usize> {
        let mut send: Vec<usize> = self
            .newest
            .values()
            .copied()
            .filter(|&i| !matches!(self.offers[i].origin, Origin::Memory { delivered: true }))
            .collect();
        send.sort_unstable();
        send
    }

    /// Settles every offer by what became of what was sent: an offer's own
    /// fate when it was sent; otherwise it is settled only if the offer sent
    /// for its pair was delivered and is at least as new, else it stays to
    /// be offered again (an older position is never given up for a newer one
    /// that did not arrive).
    fn conclude(self, fates: &HashMap<usize, Fate>, max_attempts: u32) -> Conclusion {
        let Round {
            offers,
            newest,
            settlement,
            ..
        } = self;
        let mut end = Conclusion {
            settlement,
            ..Conclusion::default()
        };
        let fate_of = |i: usize| -> Fate {
            match (&offers[i].origin, fates.get(&i)) {
                (Origin::Memory { delivered: true }, _) => Fate::Delivered,
                (_, Some(fate)) => fate.clone(),
                (_, None) => Fate::Failed,
            }
        };
        for (i, offer) in offers.iter().enumerate() {
            let Some(&sent) = newest.get(&pair_of(&offer.item)) else {
                continue;
            };
            if i == sent {
                let fate = fate_of(i);
                match (&fate, fates.contains_key(&i)) {
                    (Fate::Delivered, true) => end.delivered += 1,
                    (Fate::Refused, _) => end.refused += 1,
                    _ => {}
                }
                end.own_fate(offer, fate, max_attempts);
            } else {
                let covered =
                    fate_of(sent) == Fate::Delivered && offers[sent].item.updated_at >= offer.item.updated_at;
                end.superseded(offer, covered);
            }
        }
        end
    }
}

impl Conclusion {
    fn home(&mut self, item: &ProgressItem, position: bool, log: Option<u32>) {
        let homecoming = Homecoming {
            item: item.clone(),
            position,
            log,
        };
        self.homecomings.push((homecoming, None));
    }

    /// The offer sent for its pair.
    fn own_fate(&mut self, offer: &Offer, fate: Fate, max_attempts: u32) {
        let item = &offer.item;
        match (&offer.origin, fate) {
            (Origin::Fresh { id, .. }, Fate::Delivered | Fate::Refused) => self.settlement.done(id.clone()),
            (Origin::Fresh { id, attempts }, Fate::Failed) => {
                self.settlement.park(id.clone(), item, *attempts)
            }
            (Origin::Fresh { id, attempts }, Fate::FailedAlone(error)) => {
                let attempts = attempts + 1;
                if attempts >= max_attempts {
                    self.settlement.bury_entry(id.clone(), item, attempts, &error);
                } else {
                    self.settlement.park(id.clone(), item, attempts);
                }
            }
            (Origin::Parked { field, value, .. }, Fate::Delivered | Fate::Refused) => {
                self.settlement.forget_parked(field.clone(), value.clone());
            }
            (Origin::Parked { .. }, Fate::Failed) => {}
            (
                Origin::Parked {
                    field,
                    value,
                    attempts,
                },
                Fate::FailedAlone(error),
            ) => {
                let attempts = attempts + 1;
                if attempts >= max_attempts {
                    self.settlement
                        .bury_parked(field.clone(), value.clone(), item, attempts, &error);
                } else {
                    self.settlement
                        .retry_parked(field.clone(), value.clone(), item, attempts);
                }
            }
            // Acknowledged while Redis was unreachable: whatever the internal
            // API said, the resume position Redis holds catches up.
            (Origin::Memory { .. }, Fate::Delivered | Fate::Refused) => self.home(item, true, None),
            (Origin::Memory { .. }, Fate::Failed) => self.home(item, true, Some(0)),
            (Origin::Memory { .. }, Fate::FailedAlone(error)) => {
                if max_attempts <= 1 {
                    self.settlement.bury(item, 1, &error);
                    let homecoming = Homecoming {
                        item: item.clone(),
                        position: true,
                        log: None,
                    };
                    self.homecomings.push((homecoming, Some(1)));
                } else {
                    self.home(item, true, Some(1));
                }
            }
        }
    }

    /// An offer not sent: a newer one of its pair was. `covered`: that one
    /// was delivered, so this one is settled; otherwise it stays.
    fn superseded(&mut self, offer: &Offer, covered: bool) {
        let item = &offer.item;
        match (&offer.origin, covered) {
            (Origin::Fresh { id, .. }, true) => self.settlement.done(id.clone()),
            (Origin::Fresh { id, attempts }, false) => self.settlement.park(id.clone(), item, *attempts),
            (Origin::Parked { field, value, .. }, true) => {
                self.settlement.forget_parked(field.clone(), value.clone());
            }
            (Origin::Parked { .. }, false) => {}
            // The newer position came through Redis, which wrote it as the
            // resume position then: nothing left to write for this one.
            (Origin::Memory { .. }, true) | (Origin::Memory { delivered: true }, false) => {}
            (Origin::Memory { delivered: false }, false) => self.home(item, false, Some(0)),
        }
    }
}

/// One instance's delivery worker.
pub struct Courier {
    /// When the internal API last took a batch that held items.
    pub items_taken: std::sync::Mutex<Option<std::time::Instant>>,
    pub api: InternalApi,
    pub log: ProgressLog,
    pub unlogged: Arc<ProgressQueue>,
    pub interval: Duration,
    pub batch_size: usize,
    /// Deliveries an item may fail alone before it goes to the dead letters.
    pub max_attempts: u32,
}

/// How much a round moved; the loop goes on while rounds come back full.
struct Moved {
    /// Fresh entries read from the log.
    fresh: usize,
    read: usize,
    /// Read by the round's sweep (taken over, parked).
    swept: usize,
    delivered: usize,
}

impl Courier {
    /// The log's share for this round. An answer that is an error (the group
    /// is gone because Redis lost its data) is mended at once, within the
    /// round: creating the group is idempotent. While Redis is unreachable,
    /// the round delivers from memory only.
    async fn read_log(&self, sweep: bool) -> Delivery {
        match self.log.next_round(self.batch_size, sweep).await {
            Ok(delivery) => delivery,
            Err(DependencyError::Refused(_, error)) => {
                tracing::warn!(error = %error, "the progress log could not be read; creating its group");
                let _ = self.log.ensure_group().await;
                self.log
                    .next_round(self.batch_size, sweep)
                    .await
                    .unwrap_or_default()
            }
            Err(_) => Delivery::default(),
        }
    }

    async fn round(&self, sweep: bool) -> Moved {
        // Stamps of an instance that never measured Redis' clock are its own
        // clock's; measured first, they are settled before they meet Redis'.
        if self.unlogged.is_provisional() {
            let _ = self.log.measure_clock().await;
        }
        let memory = self.unlogged.take(self.batch_size);
        let taken = memory.len();
        // Redis' last call failed: what only this process holds goes to the
        // internal API before anything waits on Redis. Two calls waiting out
        // Redis' timeout first (the homecoming, the log's read) kept it only
        // here for half a second more, where a SIGKILL loses it.
        let skip_redis = taken > 0 && !self.log.guard().is_up();
        let (memory, redis_down) = match skip_redis {
            true => (memory, true),
            false => self.home_first(memory).await,
        };
        // Not when only the homecoming failed: in a cluster, one primary that
        // hangs fails it, and the others' logs are still to be read.
        let moved = self.round_with(memory, sweep, redis_down, skip_redis).await;
        self.unlogged.release(taken);
        moved
    }

    /// Positions held in memory go to Redis (the log, and the resume
    /// position unless Redis holds a newer one) as soon as it answers,
    /// before anything else: once there, any instance delivers them and this
    /// one may die. Delivered from memory first, they would stay only here
    /// for as long as the internal API takes to answer, or to time out when
    /// it is down too. Returns what stays for the round (provisional stamps,
    /// and what Redis did not take), and whether Redis failed.
    async fn home_first(&self, memory: Vec<Held>) -> (Vec<Held>, bool) {
        // Nor is a position of a cluster primary that does not answer tried:
        // every round would wait out its timeout and count against the
        // breaker every user shares.
        let (stay, home): (Vec<Held>, Vec<Held>) =
            (memory.into_iter()).partition(|h| h.item.provisional || self.log.unreachable(&h.item.user_id));
        if home.is_empty() {
            // Still provisional (the clock was just asked for, and did not
            // answer), or their primary does not answer.
            let redis_down = !stay.is_empty();
            return (stay, redis_down);
        }
        let positions: Vec<&ProgressItem> = home.iter().map(|h| &h.item).collect();
        let logged: Vec<(&ProgressItem, u32)> = (home.iter())
            .filter(|h| !h.delivered)
            .map(|h| (&h.item, 0))
            .collect();
        match self.log.bring_back(&positions, &logged).await {
            Ok(()) => (stay, false),
            Err(left) => {
                let back = home.into_iter().filter(|h| left.holds(&h.item.user_id));
                (stay.into_iter().chain(back).collect(), true)
            }
        }
    }

    /// Delivers `items`, read from memory only because Redis failed. If
    /// Redis answers again before the internal API does, the delivery is
    /// given up (nothing judged, nothing lost: the round writes the items to
    /// Redis instead), so that a slow or hung internal API does not keep
    /// them only in this process for its timeout.
    async fn deliver_unless_redis_returns(&self, items: &[ProgressItem], others_taken: bool) -> Report {
        if self.log.guard().is_up() {
            return deliver(&self.api, items, others_taken).await;
        }
        tokio::select! {
            report = deliver(&self.api, items, others_taken) => report,
            () = self.redis_answers() => Report::default(),
        }
    }

    /// Returns once Redis answers a call (`TIME`, under its guard: while the
    /// breaker is open the call is refused at once). Asked here rather than
    /// read from the breaker's state: while this instance waits, nothing
    /// else may call Redis, and the background probe keeps quiet while calls
    /// were made lately.
    async fn redis_answers(&self) {
        while self.log.measure_clock().await.is_err() {
            self.redis_back_poll().await;
        }
    }

    /// The wait between two looks at Redis while positions wait in memory:
    /// [`REDIS_BACK_POLL`], or less when a request finds Redis back first
    /// and closes its breaker (every millisecond they stay only here, a
    /// SIGKILL loses them).
    async fn redis_back_poll(&self) {
        tokio::select! {
            () = tokio::time::sleep(REDIS_BACK_POLL) => {}
            () = self.log.guard().closes() => {}
        }
    }

    /// Returns once positions wait in memory and Redis answers: they go
    /// there then, not at the next tick. Looks every [`REDIS_BACK_POLL`];
    /// calls Redis only while positions wait and its guard does not report
    /// it up (another call may have found it back first).
    async fn memory_may_go_home(&self) {
        loop {
            self.redis_back_poll().await;
            if self.unlogged.is_empty() {
                continue;
            }
            if self.log.guard().is_up() || self.log.measure_clock().await.is_ok() {
                return;
            }
        }
    }

    async fn round_with(&self, memory: Vec<Held>, sweep: bool, redis_down: bool, skip_log: bool) -> Moved {
        let delivery = match skip_log {
            true => Delivery::default(),
            false => self.read_log(sweep).await,
        };
        let swept = delivery.swept;
        let round = Round::new(memory, delivery);
        let (fresh, read) = (round.fresh, round.read());
        // A stamp of this instance's own clock (it never reached Redis) goes
        // to the internal API only moved onto the API's clock, as its `Date`
        // tells it: minutes ahead, it would win there over positions
        // acknowledged after it, and Redis would never see the correction
        // (the newest stamp wins). Kept as it is in memory, it is settled on
        // Redis' clock once Redis answers, and sent again.
        let api_offset = self.api.clock_offset();
        let send: Vec<usize> = (round.to_send().into_iter())
            .filter(|&i| !round.offers[i].item.provisional || api_offset.is_some())
            .collect();
        let items: Vec<ProgressItem> = (send.iter())
            .map(|&i| {
                let mut item = round.offers[i].item.clone();
                if let (true, Some(offset)) = (item.provisional, api_offset) {
                    item.updated_at += offset;
                }
                item
            })
            .collect();
        let report = if items.is_empty() {
            Report::default()
        } else {
            let taken = || (self.items_taken.lock()).unwrap_or_else(std::sync::PoisonError::into_inner);
            let others_taken = taken().is_some_and(|at| at.elapsed() < TAKEN_VOUCHES_FOR);
            let report = match redis_down {
                true => self.deliver_unless_redis_returns(&items, others_taken).await,
                false => deliver(&self.api, &items, others_taken).await,
            };
            if report.took_items {
                *taken() = Some(std::time::Instant::now());
            }
            report
        };
        let fates: HashMap<usize, Fate> = send.into_iter().zip(report.fates).collect();
        let end = round.conclude(&fates, self.max_attempts);
        metrics::counter!("moneta_progress_delivered_total").increment(end.delivered as u64);
        dropped("refused", end.refused);

        // Not settled: the entries stay with this consumer and another instance
        // takes them over; delivering twice is fine, the internal API keeps the newest.
        let settled = match self.log.settle(&end.settlement).await {
            Ok(buried) => {
                dropped("poison", buried);
                true
            }
            Err(_) => false,
        };
        // Provisional stamps never reach Redis: they wait in memory until
        // this instance has measured Redis' clock. Nor do positions of a
        // cluster primary that does not answer, until it does.
        let (unsettled, homecomings): (Vec<Homecoming>, Vec<Homecoming>) = end
            .homecomings
            .into_iter()
            .map(|(mut h, buried)| {
                if let (Some(attempts), false) = (buried, settled) {
                    h.log = Some(attempts);
                }
                h
            })
            .partition(|h| h.item.provisional || self.log.unreachable(&h.item.user_id));
        self.put_back(unsettled);
        let positions: Vec<&ProgressItem> = homecomings
            .iter()
            .filter(|h| h.position)
            .map(|h| &h.item)
            .collect();
        let logged: Vec<(&ProgressItem, u32)> = homecomings
            .iter()
            .filter_map(|h| Some((&h.item, h.log?)))
            .collect();
        let home = match positions.is_empty() && logged.is_empty() {
            true => Ok(()),
            false => self.log.bring_back(&positions, &logged).await,
        };
        if let Err(left) = home {
            self.put_back(
                (homecomings.into_iter())
                    .filter(|h| left.holds(&h.item.user_id))
                    .collect(),
            );
        }
        Moved {
            fresh,
            read,
            swept,
            delivered: end.delivered,
        }
    }

    /// Keeps in memory what could not reach Redis.
    fn put_back(&self, homecomings: Vec<Homecoming>) {
        if homecomings.is_empty() {
            return;
        }
        let (to_deliver, to_write): (Vec<Homecoming>, Vec<Homecoming>) =
            homecomings.into_iter().partition(|h| h.log.is_some());
        self.unlogged
            .restore(to_deliver.into_iter().map(|h| h.item).collect());
        self.unlogged.restore_delivered(
            to_write
                .into_iter()
                .filter(|h| h.position)
                .map(|h| h.item)
                .collect(),
        );
    }

    /// One tick: rounds until one comes back short (or fails), the first
    /// one sweeping when `sweep`. Returns whether the tick found anything
    /// to move.
    async fn tick(&self, sweep: bool) -> Ticked {
        let mut busy = false;
        let mut more = false;
        let swept_first = sweep;
        let mut sweep = sweep;
        for round in 1..=MAX_ROUNDS_PER_TICK {
            let moved = self.round(sweep).await;
            busy |= moved.read > 0 || moved.swept > 0 || moved.delivered > 0;
            sweep = moved.swept > 0;
            metrics::gauge!("moneta_progress_queue_depth").set(self.unlogged.len() as f64);
            // Full rounds go on while they deliver; while the internal API
            // fails, only a full read of fresh entries is worth another round
            // (parking them keeps the log short).
            let goes_on =
                moved.fresh >= self.batch_size || (moved.read >= self.batch_size && moved.delivered > 0);
            if !goes_on {
                break;
            }
            more = round == MAX_ROUNDS_PER_TICK;
        }
        // Not while Redis' last call failed: counting would wait out its
        // timeout, and a position recorded meanwhile waits for this tick.
        if (swept_first || busy)
            && self.log.guard().is_up()
            && let Ok((log, parked)) = self.log.backlog().await
        {
            metrics::gauge!("moneta_progress_backlog", "kind" => "log").set(log as f64);
            metrics::gauge!("moneta_progress_backlog", "kind" => "parked").set(parked as f64);
        }
        Ticked { busy, more }
    }

    /// Runs until `stop` sends a deadline (or is dropped: the deadline is
    /// then now), then until that deadline delivers what this process holds
    /// in memory (what is in Redis is left for any instance).
    pub async fn run(self, mut stop: oneshot::Receiver<Instant>) {
        let _ = self.log.ensure_group().await;
        let mut ticks: u64 = 0;
        let mut busy = true;
        // After a tick that memory woke, the next waits its full interval:
        // positions Redis keeps refusing while it answers other calls must
        // not turn the loop into one tick per poll.
        let mut woke_early = false;
        // The first tick at once: what the log holds after a restart is
        // owed already.
        let mut wait = Duration::ZERO;
        let deadline = loop {
            let early = async {
                match woke_early {
                    true => std::future::pending().await,
                    false => self.memory_may_go_home().await,
                }
            };
            let recorded = async {
                let since = self.unlogged.recorded().await;
                tokio::time::sleep_until(since + RECORDED_GATHER).await;
            };
            tokio::select! {
                deadline = &mut stop => break deadline.unwrap_or_else(|_| Instant::now()),
                _ = tokio::time::sleep(wait) => woke_early = false,
                () = early => woke_early = true,
                () = recorded => woke_early = false,
            }
            let ticked = self.tick(busy || ticks.is_multiple_of(IDLE_SWEEP_TICKS)).await;
            busy = ticked.busy;
            wait = if ticked.more {
                Duration::ZERO
            } else {
                self.interval
            };
            ticks += 1;
            if ticks.is_multiple_of(CONSUMER_SWEEP_TICKS) {
                let _ = self.log.forget_idle_consumers(CONSUMER_IDLE).await;
            }
        };
        // Also what the internal API has already is worth the wait: Redis may
        // answer again before the deadline, and until it has these positions
        // it answers an older resume position for as long as it keeps one.
        loop {
            self.tick(true).await;
            if self.unlogged.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let undelivered = self.unlogged.undelivered();
        let unwritten = self.unlogged.len() - undelivered;
        if undelivered > 0 {
            tracing::error!(
                positions = undelivered,
                "shutting down with positions that reached neither Redis nor the internal API"
            );
        }
        if unwritten > 0 {
            tracing::warn!(
                positions = unwritten,
                "shutting down with delivered positions Redis' resume positions lack"
            );
        }
        if undelivered == 0 && unwritten == 0 {
            tracing::info!("no positions left in memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::model::PositionMs;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_764_640_000_000 + ms).unwrap()
    }

    fn item(user: &str, position: u64, ms: i64) -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse(user).unwrap(),
            content_id: ContentId::parse("m-1").unwrap(),
            position_ms: PositionMs::new(position).unwrap(),
            updated_at: at(ms),
            completed: false,
            provisional: false,
        }
    }

    fn memory(item: ProgressItem) -> Held {
        Held {
            item,
            delivered: false,
        }
    }

    fn fresh(id: &str, item: ProgressItem, attempts: u32) -> (EntryId, Option<(ProgressItem, u32)>) {
        (EntryId::for_tests(id), Some((item, attempts)))
    }

    fn parked(item: ProgressItem, attempts: u32) -> (ParkedField, String, Option<(ProgressItem, u32)>) {
        let field = format!("{}\n{}", item.user_id, item.content_id);
        let value = format!("{} v{attempts}", item.updated_at.timestamp_millis());
        (ParkedField::for_tests(field), value, Some((item, attempts)))
    }

    /// Sends what the round sends, the fate `fate` decides for each item.
    fn play(
        round: Round,
        fate: impl Fn(&ProgressItem) -> Fate,
        max_attempts: u32,
    ) -> (Vec<ProgressItem>, Conclusion) {
        let send = round.to_send();
        let sent: Vec<ProgressItem> = send.iter().map(|&i| round.offers[i].item.clone()).collect();
        let fates = send.iter().zip(&sent).map(|(&i, item)| (i, fate(item))).collect();
        (sent, round.conclude(&fates, max_attempts))
    }

    fn settlement_text(s: &Settlement) -> String {
        format!("{s:?}")
    }

    fn homes(end: &Conclusion) -> Vec<(u64, bool, Option<u32>)> {
        end.homecomings
            .iter()
            .map(|(h, _)| (h.item.position_ms.get(), h.position, h.log))
            .collect()
    }

    #[test]
    fn the_newest_by_updated_at_is_sent_whatever_its_source() {
        let round = Round::new(
            vec![memory(item("u", 200, 20))],
            Delivery {
                fresh: vec![fresh("1-0", item("u", 100, 10), 0)],
                parked: vec![],
                swept: 0,
            },
        );
        let (sent, _) = play(round, |_| Fate::Delivered, 5);
        assert_eq!(sent, [item("u", 200, 20)]);
    }

    #[test]
    fn an_older_log_entry_is_settled_only_when_the_newer_memory_item_was_delivered() {
        let delivery = || Delivery {
            fresh: vec![fresh("1-0", item("u", 100, 10), 0)],
            parked: vec![],
            swept: 0,
        };
        // Delivered: the older entry leaves the log; the memory item
        // updates the resume position only.
        let (_, end) = play(
            Round::new(vec![memory(item("u", 200, 20))], delivery()),
            |_| Fate::Delivered,
            5,
        );
        let text = settlement_text(&end.settlement);
        assert!(text.contains("done: [\"1-0\"]"), "{text}");
        assert!(text.contains("park: []"), "{text}");
        assert_eq!(homes(&end), [(200, true, None)]);

        // Not delivered: neither is given up; the entry is parked, the
        // memory item goes to Redis (resume position and log).
        let (_, end) = play(
            Round::new(vec![memory(item("u", 200, 20))], delivery()),
            |_| Fate::Failed,
            5,
        );
        let text = settlement_text(&end.settlement);
        assert!(text.contains("done: []"), "{text}");
        assert!(text.contains("\"1-0\""), "the older entry is parked: {text}");
        assert_eq!(homes(&end), [(200, true, Some(0))]);
    }

    #[test]
    fn an_older_memory_item_stays_unless_the_newer_log_entry_was_delivered() {
        let delivery = || Delivery {
            fresh: vec![fresh("1-0", item("u", 300, 30), 0)],
            parked: vec![],
            swept: 0,
        };
        let (sent, end) = play(
            Round::new(vec![memory(item("u", 200, 20))], delivery()),
            |_| Fate::Delivered,
            5,
        );
        assert_eq!(sent, [item("u", 300, 30)]);
        assert!(homes(&end).is_empty(), "covered by the delivered newer one");

        // The newer one refused or failing: the older memory item is kept
        // (to the log, without touching the newer resume position).
        for fate in [
            Fate::Refused,
            Fate::Failed,
            Fate::FailedAlone("status 500".into()),
        ] {
            let (_, end) = play(
                Round::new(vec![memory(item("u", 200, 20))], delivery()),
                |_| fate.clone(),
                5,
            );
            assert_eq!(homes(&end), [(200, false, Some(0))], "{fate:?}");
        }
    }

    #[test]
    fn both_end_delivered_in_the_order_they_were_acknowledged() {
        // Round 1: the newer memory item fails; the older log entry stays (parked).
        let round = Round::new(
            vec![memory(item("u", 200, 20))],
            Delivery {
                fresh: vec![fresh("1-0", item("u", 100, 10), 0)],
                parked: vec![],
                swept: 0,
            },
        );
        let (sent, end) = play(round, |_| Fate::Failed, 5);
        assert_eq!(sent, [item("u", 200, 20)]);
        assert!(settlement_text(&end.settlement).contains("\"1-0\""));
        assert_eq!(homes(&end), [(200, true, Some(0))]);
        // Round 2: both come back from Redis (parked, and the log entry the
        // memory item became); the newest is sent and, delivered, settles both.
        let round = Round::new(
            vec![],
            Delivery {
                fresh: vec![fresh("2-0", item("u", 200, 20), 0)],
                parked: vec![parked(item("u", 100, 10), 0)],
                swept: 0,
            },
        );
        let (sent, end) = play(round, |_| Fate::Delivered, 5);
        assert_eq!(sent, [item("u", 200, 20)]);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("done: [\"2-0\"]"), "{text}");
        assert!(text.contains("forget: [(\"u\\nm-1\""), "{text}");
    }

    #[test]
    fn an_item_that_fails_alone_counts_attempts_then_is_buried() {
        let round = |attempts| {
            Round::new(
                vec![],
                Delivery {
                    fresh: vec![],
                    parked: vec![parked(item("u", 5, 1), attempts)],
                    swept: 0,
                },
            )
        };
        let fate = |_: &ProgressItem| Fate::FailedAlone("status 404".into());
        let (_, end) = play(round(3), fate, 5);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("retry: [(\"u\\nm-1\""), "{text}");
        assert!(text.contains("\\\"attempts\\\":4"), "{text}");
        assert!(text.contains("bury: []"), "{text}");
        let (_, end) = play(round(4), fate, 5);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("bury: [(\"u\\nm-1\""), "{text}");
        assert!(text.contains("attempts: 5, error: \"status 404\""), "{text}");
    }

    #[test]
    fn a_log_entry_that_fails_alone_is_parked_with_its_attempt() {
        let round = Round::new(
            vec![],
            Delivery {
                fresh: vec![fresh("1-0", item("u", 5, 1), 1)],
                parked: vec![],
                swept: 0,
            },
        );
        let (_, end) = play(round, |_| Fate::FailedAlone("timeout".into()), 5);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("park: [(\"1-0\""), "{text}");
        assert!(text.contains("\\\"attempts\\\":2"), "{text}");
    }

    #[test]
    fn an_outage_judges_nothing() {
        let round = Round::new(
            vec![memory(item("m", 1, 1))],
            Delivery {
                fresh: vec![fresh("1-0", item("f", 2, 2), 4)],
                parked: vec![parked(item("p", 3, 3), 4)],
                swept: 0,
            },
        );
        let (_, end) = play(round, |_| Fate::Failed, 5);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("bury: []") && text.contains("dead: []"), "{text}");
        assert!(
            text.contains("retry: []") && text.contains("forget: []"),
            "{text}"
        );
        assert!(text.contains("\\\"attempts\\\":4"), "attempts kept: {text}");
        assert_eq!(homes(&end), [(1, true, Some(0))]);
        assert_eq!((end.delivered, end.refused), (0, 0));
    }

    #[test]
    fn a_delivered_memory_item_is_not_sent_again() {
        let round = Round::new(
            vec![Held {
                item: item("u", 7, 7),
                delivered: true,
            }],
            Delivery::default(),
        );
        let (sent, end) = play(round, |_| Fate::Failed, 5);
        assert!(sent.is_empty());
        assert_eq!(homes(&end), [(7, true, None)]);
        assert_eq!(end.delivered, 0);
    }

    #[test]
    fn a_refused_newest_settles_nothing_older() {
        let round = Round::new(
            vec![],
            Delivery {
                fresh: vec![fresh("1-0", item("u", 1, 1), 0), fresh("2-0", item("u", 2, 2), 0)],
                parked: vec![],
                swept: 0,
            },
        );
        let (sent, end) = play(round, |_| Fate::Refused, 5);
        assert_eq!(sent, [item("u", 2, 2)]);
        let text = settlement_text(&end.settlement);
        assert!(text.contains("done: [\"2-0\"]"), "{text}");
        assert!(text.contains("park: [(\"1-0\""), "{text}");
        assert_eq!(end.refused, 1);
    }

    #[test]
    fn on_a_tie_the_later_offer_is_sent() {
        let round = Round::new(
            vec![],
            Delivery {
                fresh: vec![fresh("1-0", item("u", 1, 5), 0), fresh("2-0", item("u", 2, 5), 0)],
                parked: vec![],
                swept: 0,
            },
        );
        let (sent, end) = play(round, |_| Fate::Delivered, 5);
        assert_eq!(sent, [item("u", 2, 5)]);
        assert!(settlement_text(&end.settlement).contains("done: [\"1-0\", \"2-0\"]"));
    }
}
