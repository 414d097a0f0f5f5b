use serde::{Deserialize, Deserializer, Serialize};

use crate::model::UserId;

/// The claims Moneta reads from a verified token. A `sub` that is not a
/// valid [`UserId`] fails decoding, so the token is `invalid_token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: UserId,
    #[serde(deserialize_with = "numeric_date")]
    pub exp: i64,
    #[serde(
        default,
        deserialize_with = "some_numeric_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub iat: Option<i64>,
    #[serde(
        default,
        deserialize_with = "some_numeric_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

/// A JWT NumericDate (RFC 7519 §2): seconds since the epoch, which may be
/// fractional (a token minted with `time.time() + 3600` carries one). Read as
/// whole seconds, rounded down; beyond what i64 holds, saturated. jsonwebtoken
/// reads these claims as integers only and refuses the token otherwise, so
/// Moneta reads them here and checks them itself (`verifier.rs`).
pub(crate) fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(i64),
        Big(u64),
        Float(f64),
    }
    Ok(match Number::deserialize(deserializer)? {
        Number::Int(s) => s,
        Number::Big(s) => i64::try_from(s).unwrap_or(i64::MAX),
        // `as` saturates (and JSON has no NaN or infinity).
        Number::Float(s) => s.floor() as i64,
    })
}

pub(crate) fn some_numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    numeric_date(deserializer).map(Some)
}

/// Whether a token's `exp` and `nbf` hold at `now` (seconds), give or take
/// `leeway`; never overflows, whatever the claims say.
pub(crate) fn in_force(exp: i64, nbf: Option<i64>, now: i64, leeway: i64) -> bool {
    exp.saturating_add(leeway) >= now && nbf.is_none_or(|nbf| nbf.saturating_sub(leeway) <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp_of(json: &str) -> Option<(i64, Option<i64>, Option<i64>)> {
        serde_json::from_str::<Claims>(json)
            .ok()
            .map(|c| (c.exp, c.iat, c.nbf))
    }

    #[test]
    fn numeric_dates_may_be_fractional() {
        assert_eq!(
            exp_of(r#"{"sub":"u","exp":1764800000}"#),
            Some((1_764_800_000, None, None))
        );
        assert_eq!(
            exp_of(r#"{"sub":"u","exp":1764800000.75,"iat":1764796400.5,"nbf":1.764796400e9}"#),
            Some((1_764_800_000, Some(1_764_796_400), Some(1_764_796_400)))
        );
        assert_eq!(
            exp_of(r#"{"sub":"u","exp":18446744073709551615}"#),
            Some((i64::MAX, None, None))
        );
        assert_eq!(exp_of(r#"{"sub":"u","exp":-1.5}"#), Some((-2, None, None)));
        for bad in [
            r#"{"sub":"u"}"#,
            r#"{"sub":"u","exp":"soon"}"#,
            r#"{"sub":"u","exp":null}"#,
            r#"{"sub":"u","exp":1e400}"#,
            r#"{"sub":"u","exp":1,"nbf":"x"}"#,
            r#"{"sub":"u","exp":1,"iat":[1]}"#,
        ] {
            assert_eq!(exp_of(bad), None, "{bad}");
        }
    }
}
