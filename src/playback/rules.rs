//! Who may watch what: pure rules, no I/O.

use crate::auth::Claims;
use crate::model::{ContentPlayback, Entitlement};

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
