//! The dead letters, for operators: `moneta progress dead-letters` lists
//! them, `moneta progress replay` sends them to the internal API again.

use crate::resilience::DependencyError;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::{DeadLetter, ProgressLog};

use super::courier::takes_batches;
use super::deliver;

/// Dead letters read (and replayed) per round trip.
const CHUNK: usize = 200;

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("Redis: {0}")]
    Redis(#[from] DependencyError),
    #[error("the internal API takes no progress batch (unreachable or misconfigured)")]
    InternalApi,
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub delivered: usize,
    /// Still failing (or unreadable): left in the stream.
    pub left: usize,
}

/// Calls `each` with every dead letter as one JSON object, oldest first;
/// returns how many there were.
pub async fn list_dead_letters(
    log: &ProgressLog,
    mut each: impl FnMut(serde_json::Value),
) -> Result<usize, DependencyError> {
    let mut after: Option<DeadLetter> = None;
    let mut listed = 0;
    loop {
        let letters = log.dead_letters(after.as_ref(), CHUNK).await?;
        let Some(last) = letters.last() else {
            return Ok(listed);
        };
        after = Some(last.clone());
        listed += letters.len();
        for letter in &letters {
            each(letter.to_json());
        }
    }
}

/// Sends every dead letter again; those the internal API takes leave the
/// stream, the others stay. Stops at the first sign the API takes nothing.
pub async fn replay(log: &ProgressLog, api: &InternalApi) -> Result<Replayed, ReplayError> {
    // Asked first, so that an unreachable API is an error even with nothing to replay.
    if !takes_batches(api).await {
        return Err(ReplayError::InternalApi);
    }
    let mut after: Option<DeadLetter> = None;
    let mut replayed = Replayed::default();
    loop {
        let letters = log.dead_letters(after.as_ref(), CHUNK).await?;
        let Some(last) = letters.last() else {
            return Ok(replayed);
        };
        after = Some(last.clone());
        let (sent, items): (Vec<&DeadLetter>, Vec<_>) =
            letters.iter().filter_map(|l| Some((l, l.item.clone()?))).unzip();
        replayed.left += letters.len() - items.len();
        // Only deliveries count here: nothing is judged, whatever the answer.
        let report = deliver(api, &items, true).await;
        if report.outage {
            return Err(ReplayError::InternalApi);
        }
        let (done, left): (Vec<_>, Vec<_>) = sent
            .into_iter()
            .zip(&report.fates)
            .partition(|(_, fate)| **fate == super::Fate::Delivered);
        let done: Vec<&DeadLetter> = done.into_iter().map(|(letter, _)| letter).collect();
        log.forget_dead_letters(&done).await?;
        replayed.delivered += done.len();
        replayed.left += left.len();
    }
}
