//! Client of the company's private internal API (CONTRACT §5).

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::CallContext;
use crate::config::{Secret, Settings};
use crate::playback::model::{ContentPlayback, Entitlement};
use crate::resilience::{DependencyError, Guard};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub position_ms: u64,
    pub updated_at: DateTime<Utc>,
}

/// One position for `POST /internal/v1/progress:batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressItem {
    pub user_id: String,
    pub content_id: String,
    pub position_ms: u64,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize)]
struct Batch<'a> {
    items: &'a [ProgressItem],
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("unexpected status {0}")]
    Status(StatusCode),
}

#[derive(Clone)]
pub struct InternalApi {
    http: reqwest::Client,
    base: Url,
    token: Option<Secret>,
    guard: Guard,
}

impl InternalApi {
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let base =
            Url::parse(&settings.internal_api_url).map_err(|e| format!("MONETA_INTERNAL_API_URL: {e}"))?;
        let timeout = settings.internal_api.timeout;
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            // The guard times calls out; this only backs it up for calls made outside it.
            .timeout(timeout + Duration::from_millis(100))
            .pool_max_idle_per_host(64)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("MONETA_INTERNAL_API_URL: cannot build HTTP client: {e}"))?;
        Ok(Self {
            http,
            base,
            token: settings.internal_api_token.clone(),
            guard: Guard::new("internal_api", &settings.internal_api),
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// `base` + percent-encoded path segments (user ids are arbitrary strings).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: Url, ctx: &CallContext) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose());
        }
        if let Some(id) = &ctx.request_id {
            req = req.header("x-request-id", id);
        }
        req
    }

    /// GET returning `Ok(None)` on 404; anything but 200/404 counts as a failure.
    async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        ctx: &CallContext,
    ) -> Result<Option<T>, DependencyError> {
        let req = self.request(reqwest::Method::GET, self.url(segments), ctx);
        self.guard
            .call(async move {
                let resp = req.send().await?;
                match resp.status() {
                    StatusCode::OK => Ok(Some(resp.json::<T>().await?)),
                    StatusCode::NOT_FOUND => Ok(None),
                    other => Err(CallError::Status(other)),
                }
            })
            .await
    }

    pub async fn content(
        &self,
        content_id: &str,
        ctx: &CallContext,
    ) -> Result<Option<ContentPlayback>, DependencyError> {
        self.get(&["internal", "v1", "contents", content_id, "playback"], ctx)
            .await
    }

    pub async fn entitlement(
        &self,
        user_id: &str,
        ctx: &CallContext,
    ) -> Result<Option<Entitlement>, DependencyError> {
        self.get(&["internal", "v1", "users", user_id, "entitlement"], ctx)
            .await
    }

    pub async fn progress(
        &self,
        user_id: &str,
        content_id: &str,
        ctx: &CallContext,
    ) -> Result<Option<Progress>, DependencyError> {
        self.get(&["internal", "v1", "users", user_id, "progress", content_id], ctx)
            .await
    }

    pub async fn post_progress(&self, items: &[ProgressItem]) -> Result<(), DependencyError> {
        let req = self
            .request(
                reqwest::Method::POST,
                self.url(&["internal", "v1", "progress:batch"]),
                &CallContext::default(),
            )
            .json(&Batch { items });
        self.guard
            .call(async move {
                let resp = req.send().await?;
                match resp.status() {
                    s if s.is_success() => Ok(()),
                    other => Err(CallError::Status(other)),
                }
            })
            .await
    }

    /// Reachability probe: any answer below 500 means the API is there.
    pub async fn probe(&self) -> Result<(), DependencyError> {
        let req = self.request(
            reqwest::Method::GET,
            self.url(&["health"]),
            &CallContext::default(),
        );
        self.guard
            .call(async move {
                let resp = req.send().await?;
                match resp.status() {
                    s if s.is_server_error() => Err(CallError::Status(s)),
                    _ => Ok(()),
                }
            })
            .await
    }
}
