//! Who may watch what: pure rules, no I/O.

use crate::auth::Claims;
use crate::config::ResumeSettings;
use crate::model::{ContentPlayback, Entitlement, ResumePoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the subscription is not active")]
    SubscriptionInactive,
    #[error("the subscription plan does not include this title")]
    PlanNotEligible,
    #[error("this title is not available in your region")]
    RegionUnavailable,
}

/// The entitlement a token vouches for, used when the internal API cannot answer.
pub fn entitlement_from_claims(claims: &Claims) -> Entitlement {
    Entitlement {
        user_id: claims.sub.to_string(),
        plan: claims.plan.clone().unwrap_or_default(),
        max_streams: claims.max_streams.unwrap_or(1),
        active: true,
    }
}

/// Where playback resumes and whether the title counts as watched (CONTRACT
/// §7): under `min_pct` of the duration is no resume point; at or over
/// `max_pct`, or stopped as completed, the title is watched and starts over.
/// A title without a duration has no thresholds.
pub fn resume(point: ResumePoint, duration_ms: u64, thresholds: ResumeSettings) -> (u64, bool) {
    if point.completed {
        return (0, true);
    }
    if duration_ms == 0 {
        return (point.position_ms, false);
    }
    // In u128: position and duration may each be up to 2^53.
    let share = |pct: u8| u128::from(duration_ms) * u128::from(pct);
    let scaled = u128::from(point.position_ms) * 100;
    if scaled >= share(thresholds.max_pct) {
        (0, true)
    } else if scaled < share(thresholds.min_pct) {
        (0, false)
    } else {
        (point.position_ms, false)
    }
}

/// Checks an entitlement and the caller's country against a title, in the
/// contract's order: subscription, plan, region.
pub fn check_access(
    content: &ContentPlayback,
    entitlement: &Entitlement,
    country: Option<&str>,
) -> Result<(), Denial> {
    if !entitlement.active {
        return Err(Denial::SubscriptionInactive);
    }
    if !content.required_plans.is_empty()
        && !content
            .required_plans
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&entitlement.plan))
    {
        return Err(Denial::PlanNotEligible);
    }
    if let Some(countries) = &content.available_countries {
        let allowed = country.is_some_and(|c| countries.iter().any(|a| a.eq_ignore_ascii_case(c)));
        if !allowed {
            return Err(Denial::RegionUnavailable);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(plans: &[&str], countries: Option<&[&str]>) -> ContentPlayback {
        ContentPlayback {
            content_id: crate::model::ContentId::parse("m-1").unwrap(),
            title: "t".into(),
            duration_ms: 1,
            available_countries: countries.map(|c| c.iter().map(|s| s.to_string()).collect()),
            required_plans: plans.iter().map(|s| s.to_string()).collect(),
            streams: vec![],
            subtitles: vec![],
            markers: vec![],
        }
    }

    fn ent(plan: &str, active: bool) -> Entitlement {
        Entitlement {
            user_id: "u".into(),
            plan: plan.into(),
            max_streams: 1,
            active,
        }
    }

    const THRESHOLDS: ResumeSettings = ResumeSettings {
        min_pct: 5,
        max_pct: 90,
    };

    fn at(position_ms: u64) -> ResumePoint {
        ResumePoint {
            position_ms,
            completed: false,
        }
    }

    #[test]
    fn resume_thresholds_are_inclusive_where_the_contract_says() {
        let d = 100_000;
        assert_eq!(resume(at(4_999), d, THRESHOLDS), (0, false));
        assert_eq!(resume(at(5_000), d, THRESHOLDS), (5_000, false));
        assert_eq!(resume(at(89_999), d, THRESHOLDS), (89_999, false));
        assert_eq!(resume(at(90_000), d, THRESHOLDS), (0, true));
        assert_eq!(resume(at(250_000), d, THRESHOLDS), (0, true));
    }

    #[test]
    fn completed_is_watched_whatever_the_position() {
        let p = ResumePoint {
            position_ms: 10,
            completed: true,
        };
        assert_eq!(resume(p, 100_000, THRESHOLDS), (0, true));
    }

    #[test]
    fn no_duration_no_thresholds() {
        assert_eq!(resume(at(1_234), 0, THRESHOLDS), (1_234, false));
        let huge = crate::model::PositionMs::MAX;
        assert_eq!(resume(at(huge), huge, THRESHOLDS), (0, true));
    }

    #[test]
    fn any_plan_everywhere_is_open() {
        assert_eq!(
            check_access(&content(&[], None), &ent("basic", true), None),
            Ok(())
        );
    }

    #[test]
    fn inactive_comes_first() {
        let c = content(&["premium"], Some(&["KR"]));
        assert_eq!(
            check_access(&c, &ent("basic", false), None),
            Err(Denial::SubscriptionInactive)
        );
    }

    #[test]
    fn plan_must_be_listed() {
        let c = content(&["premium"], None);
        assert_eq!(
            check_access(&c, &ent("standard", true), None),
            Err(Denial::PlanNotEligible)
        );
        assert_eq!(check_access(&c, &ent("premium", true), None), Ok(()));
    }

    #[test]
    fn region_needs_a_listed_country() {
        let c = content(&[], Some(&["KR"]));
        assert_eq!(
            check_access(&c, &ent("basic", true), None),
            Err(Denial::RegionUnavailable)
        );
        assert_eq!(
            check_access(&c, &ent("basic", true), Some("JP")),
            Err(Denial::RegionUnavailable)
        );
        assert_eq!(check_access(&c, &ent("basic", true), Some("kr")), Ok(()));
    }
}
