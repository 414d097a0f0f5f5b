use serde::{Deserialize, Serialize};

use crate::playback::model::Entitlement;

/// The claims Moneta reads from a verified token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

impl Claims {
    /// The entitlement the token vouches for, used when the internal API cannot answer.
    pub fn fallback_entitlement(&self) -> Entitlement {
        Entitlement {
            user_id: self.sub.clone(),
            plan: self.plan.clone().unwrap_or_default(),
            max_streams: self.max_streams.unwrap_or(1),
            active: true,
        }
    }
}
