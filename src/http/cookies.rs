//! The CDN's signed cookies as `Set-Cookie` headers (CONTRACT §7), scoped to
//! the title's folder so a player's segment requests carry them.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponseParts, ResponseParts};

use crate::model::CdnCookies;

/// Three `Set-Cookie` headers, or none without a cookie domain or cookies.
pub struct CdnCookieHeaders(Vec<HeaderValue>);

impl CdnCookieHeaders {
    pub fn new(content_id: &str, cookies: Option<&CdnCookies>, domain: Option<&str>) -> Self {
        let (Some(domain), Some(c)) = (domain, cookies) else {
            return Self(Vec::new());
        };
        let attributes = format!("Domain={domain}; Path=/{content_id}/; Secure; HttpOnly; SameSite=None");
        let values = [
            ("CloudFront-Policy", &c.policy),
            ("CloudFront-Signature", &c.signature),
            ("CloudFront-Key-Pair-Id", &c.key_pair_id),
        ]
        .iter()
        // Every part is checked (base64 alphabets, a validated domain, a
        // content id); a value that still fails is left out, not a 500.
        .filter_map(|(name, value)| HeaderValue::from_str(&format!("{name}={value}; {attributes}")).ok())
        .collect();
        Self(values)
    }
}

impl IntoResponseParts for CdnCookieHeaders {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        for value in self.0 {
            res.headers_mut().append(header::SET_COOKIE, value);
        }
        Ok(res)
    }
}
