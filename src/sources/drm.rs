//! The DRM vendors' licence servers (CONTRACT §8) and the ClearKey keys file.
//!
//! A licence request goes to the vendor byte for byte and the vendor's
//! answer comes back as it is. Each DRM system has its own [`Guard`]
//! (`drm_<system>`): one vendor's outage never opens another's breaker.
//! Every status the vendor answers is an answer, passed back unchanged (its
//! licence errors are the player's business, and a CDM knows how to read
//! them); only a transport failure or a timeout is an outage, and there is
//! no fallback for a licence.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tracing::Span;
use tracing::field::Empty;

use super::CallContext;
use crate::config::{ExposeSecret, LicenseProxySettings};
use crate::model::{ContentId, DrmSystem, KeyId, SessionId, UserId};
use crate::resilience::{DependencyError, Guard};
use crate::telemetry::traces;

/// A licence is a few KiB; more than this is not a licence, and must not
/// sit in memory while it arrives.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// What the vendor answered, as it answered it.
#[derive(Debug, Clone)]
pub struct VendorAnswer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// One licence request on its way to a vendor.
pub struct LicenseCall<'a> {
    /// The CDM's challenge, as received.
    pub body: Bytes,
    pub content_type: Option<&'a HeaderValue>,
    pub soap_action: Option<&'a HeaderValue>,
    pub user: &'a UserId,
    pub content: &'a ContentId,
    pub session: Option<&'a SessionId>,
    pub ctx: &'a CallContext,
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("transport: {0}")]
    Transport(reqwest::Error),
    #[error("the answer is over {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

impl From<reqwest::Error> for CallError {
    /// Drops the URL: a vendor URL may carry a key in its query.
    fn from(e: reqwest::Error) -> Self {
        CallError::Transport(e.without_url())
    }
}

struct Vendor {
    system: DrmSystem,
    url: Url,
    guard: Guard,
}

/// The vendor licence servers that are configured, with one HTTP client
/// (the same construction as the internal API's) shared between them.
pub struct DrmUpstreams {
    http: reqwest::Client,
    /// `MONETA_DRM_UPSTREAM_HEADERS`, marked sensitive so they never print.
    headers: HeaderMap,
    vendors: Vec<Vendor>,
}

fn dependency(system: DrmSystem) -> &'static str {
    match system {
        DrmSystem::Widevine => "drm_widevine",
        DrmSystem::PlayReady => "drm_playready",
        DrmSystem::FairPlay => "drm_fairplay",
        DrmSystem::ClearKey => "drm_clearkey",
    }
}

fn setting(system: DrmSystem) -> &'static str {
    match system {
        DrmSystem::Widevine => "MONETA_DRM_UPSTREAM_WIDEVINE",
        DrmSystem::PlayReady => "MONETA_DRM_UPSTREAM_PLAYREADY",
        DrmSystem::FairPlay => "MONETA_DRM_UPSTREAM_FAIRPLAY",
        DrmSystem::ClearKey => "MONETA_DRM_CLEARKEY_KEYS_FILE",
    }
}

impl DrmUpstreams {
    pub fn new(settings: &LicenseProxySettings) -> Result<Self, String> {
        let guard = &settings.upstream_guard;
        let http = reqwest::Client::builder()
            .connect_timeout(guard.timeout)
            // The guard times calls out; this only backs it up.
            .timeout(guard.timeout + Duration::from_millis(100))
            .pool_max_idle_per_host(16)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            // A vendor's redirect is its answer to the player, not an
            // instruction to Moneta (and following one would turn the POST
            // into a GET without the challenge).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("MONETA_DRM_UPSTREAM_TIMEOUT_MS: cannot build HTTP client: {e}"))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.upstream_headers {
            // Checked when the settings were read; the messages never quote the value.
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("MONETA_DRM_UPSTREAM_HEADERS: {name:?} is not a header name"))?;
            let mut value = HeaderValue::from_str(value.expose_secret())
                .map_err(|_| format!("MONETA_DRM_UPSTREAM_HEADERS: the value of {name:?} is not valid"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut vendors = Vec::new();
        for system in DrmSystem::ALL {
            let Some(url) = settings.upstream(system) else {
                continue;
            };
            let url = Url::parse(url).map_err(|e| format!("{}: {e}", setting(system)))?;
            vendors.push(Vendor {
                system,
                url,
                guard: Guard::new(dependency(system), guard),
            });
        }
        Ok(Self {
            http,
            headers,
            vendors,
        })
    }

    /// Asks `system`'s vendor for a licence; `None` when none is configured.
    pub async fn request(
        &self,
        system: DrmSystem,
        call: LicenseCall<'_>,
    ) -> Option<Result<VendorAnswer, DependencyError>> {
        let vendor = self.vendors.iter().find(|v| v.system == system)?;
        let span = licence_span(vendor);
        // No `traceparent`: the vendor is another company, and our trace ids
        // are no business of theirs. `X-Request-Id` (below) is what a support
        // case with the vendor quotes.
        let mut headers = self.headers.clone();
        // What the CDM asked the player to send with its challenge; nothing
        // else of the player's request goes on (its licence token least).
        if let Some(content_type) = call.content_type {
            headers.insert(CONTENT_TYPE, content_type.clone());
        }
        if let Some(soap_action) = call.soap_action {
            headers.insert(HeaderName::from_static("soapaction"), soap_action.clone());
        }
        let ids = [
            ("x-moneta-user", Some(call.user.as_str())),
            ("x-moneta-content", Some(call.content.as_str())),
            ("x-moneta-session", call.session.map(SessionId::as_str)),
            ("x-request-id", call.ctx.request_id.as_deref()),
        ];
        for (name, value) in ids {
            // User ids may hold any printable character (UTF-8 included),
            // which header bytes allow; only control characters do not occur.
            if let Some(value) = value.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        let request = self
            .http
            .post(vendor.url.clone())
            .headers(headers)
            .body(call.body);
        let status_span = span.clone();
        let exchange = async move {
            let mut response = request.send().await?;
            let status = response.status();
            status_span.record("http.response.status_code", status.as_u16());
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            if response
                .content_length()
                .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
            {
                return Err(CallError::TooLarge);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(CallError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(VendorAnswer {
                status,
                content_type,
                body: Bytes::from(body),
            })
        };
        let guarded = vendor.guard.call(exchange);
        Some(if span.is_none() {
            guarded.await
        } else {
            traces::traced(span, guarded, |e: &DependencyError| e.kind().to_owned()).await
        })
    }
}

/// A client span for one licence exchange; the URL is left out, as a vendor
/// URL may carry a key.
fn licence_span(vendor: &Vendor) -> Span {
    if !traces::client_spans() {
        return Span::none();
    }
    tracing::info_span!(
        target: "moneta::sources::drm",
        "drm",
        otel.name = %format_args!("POST {}", dependency(vendor.system)),
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = "POST",
        server.address = vendor.url.host_str().unwrap_or(""),
        server.port = vendor.url.port_or_known_default(),
        http.response.status_code = Empty,
        error.type = Empty,
    )
}

#[derive(Deserialize)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
struct KeyEntry {
    key_id: String,
    key: String,
}

/// Content keys by key id, from `MONETA_DRM_CLEARKEY_KEYS_FILE`
/// (`{"keys": [{"key_id": "<32 hex>", "key": "<32 hex>"}]}`). No message
/// ever quotes a key.
pub fn load_clearkey_keys(path: &Path) -> Result<HashMap<KeyId, [u8; 16]>, String> {
    const KEY: &str = "MONETA_DRM_CLEARKEY_KEYS_FILE";
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{KEY}: cannot read {}: {e}", path.display()))?;
    // serde_json's messages may quote the input, which holds keys.
    let file: KeysFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{KEY}: {} is not {{\"keys\": [{{\"key_id\": \"<32 hex>\", \"key\": \"<32 hex>\"}}]}} (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let mut keys = HashMap::with_capacity(file.keys.len());
    for (i, entry) in file.keys.iter().enumerate() {
        let key_id = KeyId::from_hex(&entry.key_id)
            .ok_or_else(|| format!("{KEY}: keys[{i}].key_id is not 32 hex digits"))?;
        let key = KeyId::from_hex(&entry.key)
            .ok_or_else(|| format!("{KEY}: keys[{i}].key is not 32 hex digits"))?;
        keys.insert(key_id, key.0);
    }
    if keys.is_empty() {
        return Err(format!("{KEY}: {} holds no key", path.display()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_load_and_errors_never_quote_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(
            &path,
            r#"{"_comment": "dev", "keys": [{"key_id": "0123abcd0123abcd0123abcd0123abcd", "key": "6d6f6e6574612d6465762d6b65792121"}]}"#,
        )
        .unwrap();
        let keys = load_clearkey_keys(&path).unwrap();
        let id = KeyId::from_hex("0123abcd0123abcd0123abcd0123abcd").unwrap();
        assert_eq!(
            keys.get(&id).map(|k| k.as_slice()),
            Some(b"moneta-dev-key!!".as_slice())
        );

        let secret = "6d6f6e6574612d6465762d6b657921";
        for bad in [
            format!(r#"{{"keys": [{{"key_id": "0123abcd0123abcd0123abcd0123abcd", "key": "{secret}"}}]}}"#),
            format!(r#"{{"keys": [{{"key_id": "{secret}", "key": "{secret}"}}]}}"#),
            format!(r#"{{"keys": "{secret}"}}"#),
            format!(r#"{{"keys": [{{"key_id": 1, "key": "{secret}"}}]}}"#),
            r#"{"keys": []}"#.to_owned(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let err = load_clearkey_keys(&path).unwrap_err();
            assert!(err.starts_with("MONETA_DRM_CLEARKEY_KEYS_FILE: "), "{err}");
            assert!(!err.contains(secret), "{err}");
        }
        let missing = load_clearkey_keys(&dir.path().join("absent.json")).unwrap_err();
        assert!(
            missing.starts_with("MONETA_DRM_CLEARKEY_KEYS_FILE: cannot read"),
            "{missing}"
        );
    }
}
