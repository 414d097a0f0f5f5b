//! Playback: which title, for whom, with which URLs. Orchestration over the
//! sources the App hands in; the rules are pure (`rules.rs`, `ladder.rs`).

mod answer;
pub mod cdn;
mod content;
mod ladder;
pub mod rules;
mod user_state;

use std::sync::{Arc, OnceLock};

pub use answer::{Answers, Audience, MediaJson, PlaybackAnswer};
pub use content::Titles;
use rules::Denial;
pub use user_state::UserStates;

use crate::auth::Claims;
use crate::model::{ContentId, ContentPlayback, Entitlement, PlaybackInfo, ResumePoint, Sourced};
use crate::sources::CallContext;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PlaybackError {
    #[error("no such title")]
    ContentNotFound,
    #[error("no entitlement for this user")]
    NoEntitlement,
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("the catalog is unavailable")]
    Unavailable,
}

/// A title the caller may watch, with everything needed to answer.
pub struct Authorized {
    pub content: Sourced<Arc<ContentPlayback>>,
    pub entitlement: Sourced<Entitlement>,
    pub position: Sourced<ResumePoint>,
}

impl Authorized {
    pub fn degraded(&self) -> bool {
        self.content.origin.is_degraded()
            || self.entitlement.origin.is_degraded()
            || self.position.origin.is_degraded()
    }
}

/// One lookup in a cache; lookups that could not be made (Redis down) are
/// counted by the dependency metrics, not here.
///
/// The series are registered once: `counter!` looks its series up on every
/// call, ~1.3 k instructions each, three times per warm request.
fn cache_metric(cache: &'static str, hit: bool) {
    const CACHES: [&str; 4] = [
        "content_memory",
        "content_redis",
        "entitlement_redis",
        "position_redis",
    ];
    let series = |cache: &'static str, hit: bool| {
        let result = if hit { "hit" } else { "miss" };
        metrics::counter!("moneta_cache_requests_total", "cache" => cache, "result" => result)
    };
    static HANDLES: OnceLock<Vec<(&'static str, [metrics::Counter; 2])>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        CACHES
            .iter()
            .map(|&c| (c, [series(c, false), series(c, true)]))
            .collect()
    });
    match handles.iter().find(|(c, _)| *c == cache) {
        Some((_, pair)) => pair[usize::from(hit)].increment(1),
        None => series(cache, hit).increment(1),
    }
}

pub struct Playback {
    titles: Titles,
    users: UserStates,
    answers: Answers,
}

impl Playback {
    pub fn new(titles: Titles, users: UserStates, answers: Answers) -> Self {
        Self {
            titles,
            users,
            answers,
        }
    }

    /// Everything the contract checks before a title may play. Only an
    /// authorized request teaches Redis anything about the caller.
    pub async fn authorize(
        &self,
        claims: &Claims,
        content_id: &ContentId,
        ctx: &CallContext,
    ) -> Result<Authorized, PlaybackError> {
        let known_title = self.titles.known(content_id);
        let (content, user) = tokio::join!(
            self.titles.get(content_id, ctx),
            self.users.get(claims, content_id, known_title, ctx)
        );
        let content = content?;
        let mut user = user?;
        rules::check_access(&content.value, &user.entitlement.value, claims.country.as_deref())?;
        self.users.remember(claims, &mut user).await;
        Ok(Authorized {
            content,
            entitlement: user.entitlement,
            position: user.position,
        })
    }

    /// The caller's concurrent-stream limit (entitlement, else claims).
    pub async fn stream_limit(&self, claims: &Claims, ctx: &CallContext) -> Result<u32, PlaybackError> {
        self.users.stream_limit(claims, ctx).await
    }

    /// The playback-info answer for an authorized title, as it is written.
    pub fn answer(&self, authorized: &Authorized, audience: &Audience<'_>) -> PlaybackAnswer {
        self.answers.playback_answer(authorized, audience)
    }

    /// The playback-info answer for an authorized title.
    pub fn assemble(&self, authorized: &Authorized, audience: &Audience<'_>) -> PlaybackInfo {
        self.answers.playback_info(authorized, audience)
    }
}
