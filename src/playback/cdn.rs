//! Stream and subtitle URLs: CDN paths joined to the base URL, optionally signed
//! as CloudFront canned-policy URLs, and the signed cookies (a custom policy
//! over the title's folder) that let a player fetch its segments.
//!
//! The policies and CloudFront's URL-safe base64 alphabet are written here by
//! hand: no maintained Rust crate signs CloudFront URLs or cookies without
//! pulling an AWS SDK we do not otherwise need, and the format is a dozen lines.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rsa::RsaPrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use sha1::Sha1;

use crate::model::{CdnCookies, ContentId};

#[derive(Debug, thiserror::Error)]
#[error("MONETA_CDN_PRIVATE_KEY_FILE: {0}")]
pub struct CdnKeyError(String);

/// Builds the URLs a player fetches.
pub struct Cdn {
    base: String,
    signer: Option<CloudFrontSigner>,
}

impl Cdn {
    pub fn new(base: &str, signer: Option<CloudFrontSigner>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            signer,
        }
    }

    /// Base URL and path joined with exactly one slash.
    pub fn url(&self, path: &str) -> String {
        let path = path.trim_start_matches('/');
        let mut url = String::with_capacity(self.base.len() + path.len() + 1);
        url.push_str(&self.base);
        url.push('/');
        url.push_str(path);
        url
    }

    /// The URL of a stream manifest: signed when a key pair is configured.
    /// One answer passes one `now` everywhere, so its URLs and cookies
    /// share an expiry even across a rounding step.
    pub fn stream_url(&self, path: &str, now: SystemTime) -> String {
        let url = self.url(path);
        match &self.signer {
            Some(signer) => signer.sign_at(&url, now),
            None => url,
        }
    }

    /// Signed cookies for everything under `<base>/<content_id>/`, expiring
    /// with the URLs signed at `now`; `None` without a key pair.
    /// What stream URLs depend on besides their path: the expiry they are
    /// signed with, which holds for a whole signing step (0 unsigned).
    pub fn signing_step(&self, now: SystemTime) -> u64 {
        self.signer.as_ref().map_or(0, |signer| signer.expires_at(now))
    }

    pub fn cookies(&self, content_id: &ContentId, now: SystemTime) -> Option<CdnCookies> {
        let signer = self.signer.as_ref()?;
        let resource = format!("{}/{content_id}/*", self.base);
        Some(signer.cookies_at(&resource, now))
    }
}

/// CloudFront canned-policy signer (RSA-SHA1 over the policy document).
pub struct CloudFrontSigner {
    key_pair_id: String,
    key: SigningKey<Sha1>,
    ttl: Duration,
    /// Expiry is rounded up to this step so one signature serves every request
    /// for the same URL within the step: RSA signing costs about a millisecond,
    /// far more than the rest of a warm answer.
    step: u64,
    cache: moka::sync::Cache<(String, u64), Arc<str>>,
}

impl CloudFrontSigner {
    pub fn from_pem_file(key_pair_id: &str, path: &Path, ttl: Duration) -> Result<Self, CdnKeyError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| CdnKeyError(format!("cannot read {}: {e}", path.display())))?;
        let key = RsaPrivateKey::from_pkcs1_pem(&pem)
            .or_else(|_| RsaPrivateKey::from_pkcs8_pem(&pem))
            .map_err(|_| CdnKeyError("not an RSA private key in PKCS#1 or PKCS#8 PEM".into()))?;
        Ok(Self::new(key_pair_id, key, ttl))
    }

    pub fn new(key_pair_id: &str, key: RsaPrivateKey, ttl: Duration) -> Self {
        let step = (ttl.as_secs() / 72).clamp(1, 300);
        Self {
            key_pair_id: key_pair_id.to_owned(),
            key: SigningKey::<Sha1>::new(key),
            ttl,
            step,
            cache: moka::sync::Cache::builder()
                .max_capacity(50_000)
                .time_to_live(Duration::from_secs(step.max(1) * 2))
                .build(),
        }
    }

    /// The expiry of anything signed at `now`: at least `ttl` ahead.
    fn expires_at(&self, now: SystemTime) -> u64 {
        let now_s = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        (now_s + self.ttl.as_secs()).div_ceil(self.step) * self.step
    }

    /// Signs `url` so that it is valid at least `ttl` from `now`.
    pub fn sign_at(&self, url: &str, now: SystemTime) -> String {
        let expires = self.expires_at(now);
        let signed = self.cache.get_with((url.to_owned(), expires), || {
            Arc::from(self.sign_with_expiry(url, expires))
        });
        signed.to_string()
    }

    /// Cookies for a wildcard `resource`, with the same expiry as URLs signed at `now`.
    pub fn cookies_at(&self, resource: &str, now: SystemTime) -> CdnCookies {
        let expires = self.expires_at(now);
        // The cache holds `policy signature` for cookie resources (they end in `*`,
        // which no URL does, so the keys never meet).
        let signed = self.cache.get_with((resource.to_owned(), expires), || {
            let policy = custom_policy(resource, expires);
            let signature = self.sign(&policy);
            Arc::from(format!("{} {signature}", cloudfront_base64(policy.as_bytes())))
        });
        let (policy, signature) = signed.split_once(' ').unwrap_or_default();
        CdnCookies {
            policy: policy.to_owned(),
            signature: signature.to_owned(),
            key_pair_id: self.key_pair_id.clone(),
        }
    }

    /// RSA-SHA1 over `policy`, in CloudFront's base64.
    fn sign(&self, policy: &str) -> String {
        cloudfront_base64(&self.key.sign(policy.as_bytes()).to_bytes())
    }

    /// The canned-policy URL for a fixed expiry (epoch seconds).
    pub fn sign_with_expiry(&self, url: &str, expires: u64) -> String {
        let encoded = self.sign(&canned_policy(url, expires));
        let sep = if url.contains('?') { '&' } else { '?' };
        format!(
            "{url}{sep}Expires={expires}&Signature={encoded}&Key-Pair-Id={}",
            self.key_pair_id
        )
    }
}

/// The policy CloudFront rebuilds from `Expires` and the URL; byte-exact, no spaces.
fn canned_policy(url: &str, expires: u64) -> String {
    format!(
        r#"{{"Statement":[{{"Resource":"{url}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}"#
    )
}

/// A custom policy: the only statement's `Resource` may hold a wildcard. Its
/// exact bytes are what gets signed and sent, so it is compact JSON.
fn custom_policy(resource: &str, expires: u64) -> String {
    serde_json::json!({
        "Statement": [{
            "Resource": resource,
            "Condition": {"DateLessThan": {"AWS:EpochTime": expires}}
        }]
    })
    .to_string()
}

/// Standard base64 with CloudFront's replacements (`+`→`-`, `=`→`_`, `/`→`~`).
fn cloudfront_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .chars()
        .map(|c| match c {
            '+' => '-',
            '=' => '_',
            '/' => '~',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_with_one_slash() {
        let cdn = Cdn::new("https://cdn.example.com/", None);
        assert_eq!(
            cdn.url("/m-1/dash/manifest.mpd"),
            "https://cdn.example.com/m-1/dash/manifest.mpd"
        );
        assert_eq!(cdn.url("m-1/x"), "https://cdn.example.com/m-1/x");
    }

    #[test]
    fn canned_policy_is_compact_json() {
        let p = canned_policy("https://d.example/a", 1700000000);
        assert_eq!(
            p,
            r#"{"Statement":[{"Resource":"https://d.example/a","Condition":{"DateLessThan":{"AWS:EpochTime":1700000000}}}]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(
            v["Statement"][0]["Condition"]["DateLessThan"]["AWS:EpochTime"],
            1700000000
        );
    }

    #[test]
    fn custom_policy_names_the_folder_and_the_expiry() {
        let p = custom_policy("https://d.example/m-1/*", 1700000000);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        let statement = &v["Statement"][0];
        assert_eq!(statement["Resource"], "https://d.example/m-1/*");
        assert_eq!(
            statement["Condition"]["DateLessThan"]["AWS:EpochTime"],
            1700000000
        );
        assert_eq!(v["Statement"].as_array().unwrap().len(), 1);
        assert!(!p.contains(' '));
    }

    #[test]
    fn url_safe_alphabet() {
        assert_eq!(cloudfront_base64(&[0xfb, 0xff, 0xfe]), "-~~-");
        assert_eq!(cloudfront_base64(&[0xff]), "~w__");
    }
}
