//! The fallback ladder for a title, as pure steps (no I/O), so every rung is
//! unit-tested without a process: memory → Redis → internal API → stale copy
//! → snapshot → unavailable. `content.rs` runs the steps against the sources.

use std::sync::Arc;
use std::time::Duration;

use crate::model::{ContentPlayback, Origin, Sourced};
use crate::sources::redis::CachedContent;

/// How long "the internal API does not know this title" counts as fresh, in
/// Redis entries written by earlier builds (this one writes none).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// A title, or the fact that it does not exist, with where that came from.
pub type Lookup = Sourced<Option<Arc<ContentPlayback>>>;

/// Which fallback answered, for `moneta_fallbacks_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    Stale,
    Snapshot,
    Unavailable,
}

/// What Redis' copy allows: answer now, or ask the internal API (keeping a
/// stale copy in hand for when it fails).
#[derive(Debug)]
pub enum CacheStep {
    Fresh(Option<ContentPlayback>),
    AskApi { stale: Option<CachedContent> },
}

/// Whether a cached entry (`None`: not cached or Redis down) is still fresh
/// at `now_ms`; titles and "unknown title" have their own freshness.
pub fn from_cache(cached: Option<CachedContent>, now_ms: u64, content_ttl: Duration) -> CacheStep {
    match cached {
        Some(c) => {
            let fresh_for = if c.content.is_some() {
                content_ttl
            } else {
                NEGATIVE_TTL
            };
            let age = Duration::from_millis(now_ms.saturating_sub(c.fetched_at_ms));
            if age < fresh_for {
                CacheStep::Fresh(c.content)
            } else {
                CacheStep::AskApi { stale: Some(c) }
            }
        }
        None => CacheStep::AskApi { stale: None },
    }
}

/// What to answer when the internal API failed: Redis' stale copy, then the
/// last good copy this process saw, then the static snapshot.
pub fn after_api_failure(
    stale: Option<CachedContent>,
    last_good: Option<Arc<ContentPlayback>>,
    snapshot: Option<Arc<ContentPlayback>>,
) -> Result<(Lookup, Rung), Rung> {
    if let Some(stale) = stale {
        return Ok((
            Sourced::new(stale.content.map(Arc::new), Origin::Stale),
            Rung::Stale,
        ));
    }
    if let Some(copy) = last_good {
        return Ok((Sourced::new(Some(copy), Origin::Stale), Rung::Stale));
    }
    if let Some(snap) = snapshot {
        return Ok((Sourced::new(Some(snap), Origin::Snapshot), Rung::Snapshot));
    }
    Err(Rung::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ContentId;

    fn title(id: &str) -> ContentPlayback {
        ContentPlayback {
            content_id: ContentId::parse(id).unwrap(),
            title: id.to_owned(),
            duration_ms: 1,
            available_countries: None,
            required_plans: vec![],
            streams: vec![],
            subtitles: vec![],
            markers: vec![],
        }
    }

    fn cached(at: u64, content: Option<ContentPlayback>) -> CachedContent {
        CachedContent {
            fetched_at_ms: at,
            content,
        }
    }

    const TTL: Duration = Duration::from_secs(300);

    #[test]
    fn a_young_copy_answers_without_the_api() {
        let step = from_cache(Some(cached(1_000, Some(title("a")))), 1_000 + 299_999, TTL);
        assert!(matches!(step, CacheStep::Fresh(Some(c)) if c.title == "a"));
    }

    #[test]
    fn an_old_copy_is_kept_as_the_stale_fallback() {
        let step = from_cache(Some(cached(1_000, Some(title("a")))), 1_000 + 300_000, TTL);
        assert!(matches!(step, CacheStep::AskApi { stale: Some(_) }));
    }

    #[test]
    fn unknown_titles_are_fresh_only_briefly() {
        let young = from_cache(Some(cached(0, None)), 29_999, TTL);
        assert!(matches!(young, CacheStep::Fresh(None)));
        let old = from_cache(Some(cached(0, None)), 30_000, TTL);
        assert!(matches!(old, CacheStep::AskApi { stale: Some(_) }));
    }

    #[test]
    fn nothing_cached_asks_the_api() {
        assert!(matches!(
            from_cache(None, 5, TTL),
            CacheStep::AskApi { stale: None }
        ));
    }

    #[test]
    fn failure_prefers_stale_then_last_good_then_snapshot() {
        let snap = Some(Arc::new(title("snap")));
        let good = Some(Arc::new(title("good")));
        let stale = Some(cached(0, Some(title("stale"))));

        let (l, rung) = after_api_failure(stale, good.clone(), snap.clone()).unwrap();
        assert_eq!(
            (l.value.unwrap().title.as_str(), l.origin, rung),
            ("stale", Origin::Stale, Rung::Stale)
        );

        let (l, rung) = after_api_failure(None, good, snap.clone()).unwrap();
        assert_eq!(
            (l.value.unwrap().title.as_str(), l.origin, rung),
            ("good", Origin::Stale, Rung::Stale)
        );

        let (l, rung) = after_api_failure(None, None, snap).unwrap();
        assert_eq!(
            (l.value.unwrap().title.as_str(), l.origin, rung),
            ("snap", Origin::Snapshot, Rung::Snapshot)
        );

        assert_eq!(
            after_api_failure(None, None, None).unwrap_err(),
            Rung::Unavailable
        );
    }

    #[test]
    fn a_stale_unknown_title_stays_unknown() {
        let (l, _) = after_api_failure(Some(cached(0, None)), None, None).unwrap();
        assert!(l.value.is_none());
        assert_eq!(l.origin, Origin::Stale);
    }
}
