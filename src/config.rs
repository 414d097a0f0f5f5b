//! Typed settings, read once at start from the environment and an optional TOML
//! file (`MONETA_CONFIG_FILE`; the environment wins). Every value is validated
//! here so the rest of the code never re-parses a string.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::model::DrmSystem;

/// A setting that could not be used; `Display` names it, never its value when secret.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: &str, reason: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A value that must never reach a log line or a `Debug` dump (shared with
/// the internal API crate: both use `secrecy`).
pub use secrecy::{ExposeSecret, SecretString as Secret};

/// Transport of the OTLP trace exporter (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Limits of one dependency's guard (timeout, bulkhead, breaker).
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub breaker_failures: u32,
    pub breaker_open_min: Duration,
    pub breaker_open_max: Duration,
    pub half_open_probes: usize,
    /// The breaker also opens when the success rate over `breaker_window`
    /// falls below this (once `breaker_min_calls` calls were seen).
    pub breaker_min_success_pct: u32,
    pub breaker_min_calls: u32,
    pub breaker_window: Duration,
}

/// What a stream start does at the concurrent-stream limit (CONTRACT §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamLimitPolicy {
    /// `409 stream_limit_reached`.
    Block,
    /// End the live session with the oldest heartbeat and start the new one.
    EvictOldest,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Set: Redis Cluster mode on these seed nodes.
    pub cluster_urls: Option<Vec<String>>,
    pub guard: GuardSettings,
    pub client_cache: ClientCacheSettings,
    /// `MONETA_REDIS_BUCKETS`: hash tags users are spread over (1..=16384);
    /// the same on every instance of a deployment.
    pub buckets: u16,
    /// `MONETA_REDIS_MIN_REPLICAS_ACKED`: replicas that must hold a heartbeat
    /// or stop before it counts as recorded (`WAIT`); 0 trusts the primary.
    pub min_replicas_acked: u32,
}

/// The in-process copy of entitlements and resume positions that Redis keeps
/// coherent (server-assisted client-side caching, RESP3 `CLIENT TRACKING`).
#[derive(Debug, Clone)]
pub struct ClientCacheSettings {
    /// Redis keys held at most (two per user; a positions key holds up to
    /// four titles); 0 turns the cache off.
    pub max_keys: usize,
    /// A cached value is asked for again after this long even without an
    /// invalidation: the bound on staleness should an invalidation ever be lost.
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct InternalApiSettings {
    pub url: String,
    pub token: Option<Secret>,
    pub guard: GuardSettings,
}

/// JWT key sources and the claims every token must carry.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub hs256_secret: Option<Secret>,
    pub jwks_file: Option<PathBuf>,
    pub secret_id: Option<String>,
    pub refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CdnSettings {
    pub base_url: String,
    /// Both set, or neither (checked at load).
    pub key_pair_id: Option<String>,
    pub private_key_file: Option<PathBuf>,
    pub url_ttl: Duration,
    /// Set: the signed cookies are also sent as `Set-Cookie` for this domain.
    pub cookie_domain: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DrmSettings {
    pub license_url_widevine: String,
    pub license_url_playready: String,
    pub license_url_fairplay: String,
    /// Set: every DRM stream carries a licence token signed with it (HS256).
    pub token_secret: Option<Secret>,
    pub token_ttl: Duration,
    pub fairplay_certificate_url: Option<String>,
    /// `MONETA_DRM_PROXY=true`: Moneta is the licence proxy (CONTRACT §8).
    pub proxy: Option<LicenseProxySettings>,
}

/// The licence proxy: where answers send players for licences, and what it
/// answers with (ClearKey keys of its own, or a vendor's licence server).
#[derive(Debug, Clone)]
pub struct LicenseProxySettings {
    /// `<MONETA_PUBLIC_BASE_URL>/v1/licenses/<system>`, in the order of
    /// [`DrmSystem::ALL`]: made once, answers only borrow them.
    license_urls: [String; 4],
    /// Set: Moneta answers ClearKey licences itself from this file.
    pub clearkey_keys_file: Option<PathBuf>,
    pub upstream_widevine: Option<String>,
    pub upstream_playready: Option<String>,
    pub upstream_fairplay: Option<String>,
    /// Without a keys file, ClearKey licences come from here.
    pub upstream_clearkey: Option<String>,
    /// Sent to every vendor licence server (an API key…); values never print.
    pub upstream_headers: Vec<(String, Secret)>,
    pub upstream_guard: GuardSettings,
    /// `MONETA_DRM_REQUIRE_SESSION`: licences only for tokens of a session
    /// start, so that no licence escapes the stream limit.
    pub require_session: bool,
}

impl LicenseProxySettings {
    pub fn license_url(&self, system: DrmSystem) -> &str {
        &self.license_urls[system as usize]
    }

    /// The licence server for `system`.
    pub fn upstream(&self, system: DrmSystem) -> Option<&str> {
        match system {
            DrmSystem::Widevine => self.upstream_widevine.as_deref(),
            DrmSystem::PlayReady => self.upstream_playready.as_deref(),
            DrmSystem::FairPlay => self.upstream_fairplay.as_deref(),
            DrmSystem::ClearKey => self.upstream_clearkey.as_deref(),
        }
    }
}

/// Where a stored position resumes (CONTRACT §7).
#[derive(Debug, Clone, Copy)]
pub struct ResumeSettings {
    /// Below this share of the duration, playback starts from the beginning.
    pub min_pct: u8,
    /// At or above it, the title counts as watched (and starts from the beginning).
    pub max_pct: u8,
}

impl DrmSettings {
    /// License server for a DRM system named by the internal API: with the
    /// licence proxy on, Moneta's own route for every system it knows.
    pub fn license_url(&self, system: &str) -> Option<&str> {
        if let Some(proxy) = &self.proxy
            && let Some(known) = DrmSystem::parse(system)
        {
            return Some(proxy.license_url(known));
        }
        match system {
            "widevine" => Some(&self.license_url_widevine),
            "playready" => Some(&self.license_url_playready),
            "fairplay" => Some(&self.license_url_fairplay),
            _ => None,
        }
    }
}

/// Freshness of titles and entitlements in Redis and in process memory.
#[derive(Debug, Clone)]
pub struct CatalogSettings {
    pub fallback_file: Option<PathBuf>,
    /// How long a cached title counts as fresh in Redis.
    pub content_ttl: Duration,
    /// How long a title is kept past freshness to serve when the internal API fails.
    pub content_stale_ttl: Duration,
    /// How long a title is kept in process memory before Redis is asked again.
    pub content_local_ttl: Duration,
    pub entitlement_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Sessions without a heartbeat for this long stop counting.
    pub ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Signs session ids; `None`: a random key per process.
    pub secret: Option<Secret>,
    pub limit_policy: StreamLimitPolicy,
}

#[derive(Debug, Clone)]
pub struct ProgressSettings {
    pub flush_interval: Duration,
    pub batch_size: usize,
    /// Positions kept in memory while Redis is down too.
    pub queue_capacity: usize,
    /// Deliveries an item may fail alone (while the internal API takes
    /// others) before it goes to the dead-letter stream.
    pub max_attempts: u32,
}

/// The public listener's limits and its shutdown.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Exact origins browsers may call from; empty: no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub request_timeout: Duration,
    /// After SIGTERM: readiness `503` while the API keeps serving this long.
    pub shutdown_drain: Duration,
    /// After the listener closes: how long in-flight requests and position delivery may take.
    pub shutdown_grace: Duration,
    /// Admission control in front of the public routes (CONTRACT §9).
    pub overload: OverloadSettings,
    /// Public connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// `MONETA_OVERLOAD_LIMIT`: requests the public API works on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverloadLimit {
    /// Follows measured latency between the minimum and the maximum.
    Adaptive,
    Fixed(usize),
    /// No admission control (for comparisons; not for production).
    Off,
}

#[derive(Debug, Clone)]
pub struct OverloadSettings {
    pub limit: OverloadLimit,
    pub min_limit: usize,
    pub max_limit: usize,
}

#[derive(Debug, Clone)]
pub struct OtelSettings {
    pub endpoint: Option<String>,
    pub service_name: String,
    pub protocol: OtlpProtocol,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
}

/// Every setting, nested per concern: each constructor takes only its slice.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub redis: RedisSettings,
    pub internal_api: InternalApiSettings,
    pub jwt: JwtSettings,
    pub cdn: CdnSettings,
    pub drm: DrmSettings,
    pub resume: ResumeSettings,
    pub catalog: CatalogSettings,
    pub sessions: SessionSettings,
    pub progress: ProgressSettings,
    pub otel: OtelSettings,
    pub log: LogSettings,
}

/// Raw key/value pairs from the TOML file overlaid by the environment.
struct Source {
    values: HashMap<String, String>,
}

impl Source {
    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_owned()
    }

    fn opt_string(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_owned)
    }

    fn parse<T: FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(key, format!("cannot parse {raw:?}: {e}"))),
        }
    }

    fn positive<T: FromStr + PartialOrd + Default>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let value = self.parse(key, default)?;
        if value <= T::default() {
            return Err(ConfigError::new(key, "must be greater than zero"));
        }
        Ok(value)
    }

    fn millis(&self, key: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.positive(key, default_ms).map(Duration::from_millis)
    }

    fn secs(&self, key: &str, default_s: u64) -> Result<Duration, ConfigError> {
        self.positive(key, default_s).map(Duration::from_secs)
    }

    fn url(&self, key: &str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let value = self.string(key, default);
        if !schemes.iter().any(|s| value.starts_with(&format!("{s}://"))) {
            return Err(ConfigError::new(
                key,
                format!("must start with one of {}", schemes.join("://, ") + "://"),
            ));
        }
        Ok(value.trim_end_matches('/').to_owned())
    }

    fn guard(&self, prefix: &str, timeout_ms: u64, concurrency: usize) -> Result<GuardSettings, ConfigError> {
        let key = |s: &str| format!("{prefix}_{s}");
        let settings = GuardSettings {
            timeout: self.millis(&key("TIMEOUT_MS"), timeout_ms)?,
            max_concurrency: self.positive(&key("MAX_CONCURRENCY"), concurrency)?,
            breaker_failures: self.positive(&key("BREAKER_FAILURES"), 5)?,
            breaker_open_min: self.millis(&key("BREAKER_OPEN_MS"), 500)?,
            breaker_open_max: self.millis(&key("BREAKER_OPEN_MAX_MS"), 5_000)?,
            half_open_probes: self.positive(&key("BREAKER_PROBES"), 2)?,
            breaker_min_success_pct: self.parse(&key("BREAKER_MIN_SUCCESS_PCT"), 50)?,
            breaker_min_calls: self.positive(&key("BREAKER_MIN_CALLS"), 20)?,
            breaker_window: self.secs(&key("BREAKER_WINDOW_S"), 10)?,
        };
        if settings.breaker_open_max < settings.breaker_open_min {
            return Err(ConfigError::new(
                &key("BREAKER_OPEN_MAX_MS"),
                "must not be below BREAKER_OPEN_MS",
            ));
        }
        Ok(settings)
    }
}

/// One entry of `MONETA_CORS_ALLOWED_ORIGINS`, as browsers write an `Origin`
/// header (`scheme://host[:port]`: the host lower-case, no default port), so
/// that comparing the two is comparing origins. A path, query or user is no
/// part of an origin, and never matches one: refused.
fn origin(value: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        ConfigError::new(
            "MONETA_CORS_ALLOWED_ORIGINS",
            format!("{value:?} is not an origin (scheme://host[:port]): {why}"),
        )
    };
    let url = reqwest::Url::parse(value).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme is not http or https"));
    }
    if url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(bad("it has more than a scheme, a host and a port"));
    }
    Ok(url.origin().ascii_serialization())
}

/// `MONETA_DRM_UPSTREAM_HEADERS`: a JSON object of header names to string
/// values. The value is a secret: no error quotes it, only header names.
fn upstream_headers(src: &Source) -> Result<Vec<(String, Secret)>, ConfigError> {
    const KEY: &str = "MONETA_DRM_UPSTREAM_HEADERS";
    let Some(raw) = src.get(KEY) else {
        return Ok(Vec::new());
    };
    // serde_json's messages may quote the input, so none is passed on.
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
        .map_err(|_| ConfigError::new(KEY, "must be a JSON object of header names to string values"))?;
    // Moneta sets these itself: a vendor header must not replace them.
    const OWN: [&str; 8] = [
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "connection",
        "x-moneta-user",
        "x-moneta-content",
        "x-moneta-session",
    ];
    let mut headers = Vec::with_capacity(object.len());
    for (name, value) in object {
        let header = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::new(KEY, format!("{name:?} is not a header name")))?;
        if OWN.contains(&header.as_str()) {
            return Err(ConfigError::new(KEY, format!("{name:?} is set by Moneta itself")));
        }
        let Some(value) = value.as_str() else {
            return Err(ConfigError::new(
                KEY,
                format!("the value of {name:?} must be a string"),
            ));
        };
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(
                KEY,
                format!("the value of {name:?} is not a valid header value"),
            ));
        }
        headers.push((header.as_str().to_owned(), Secret::from(value.to_owned())));
    }
    Ok(headers)
}

/// `MONETA_REDIS_BUCKETS`: more buckets than Redis Cluster has slots could
/// not spread any further.
fn redis_buckets(src: &Source) -> Result<u16, ConfigError> {
    const KEY: &str = "MONETA_REDIS_BUCKETS";
    let buckets: u32 = src.positive(KEY, 64)?;
    u16::try_from(buckets)
        .ok()
        .filter(|b| *b <= 16_384)
        .ok_or_else(|| ConfigError::new(KEY, "must be at most 16384 (the cluster's hash slots)"))
}

impl Source {
    fn overload(&self) -> Result<OverloadSettings, ConfigError> {
        const KEY: &str = "MONETA_OVERLOAD_LIMIT";
        let limit = match self.string(KEY, "adaptive").trim() {
            "adaptive" => OverloadLimit::Adaptive,
            "off" => OverloadLimit::Off,
            other => match other.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => OverloadLimit::Fixed(n),
                _ => {
                    return Err(ConfigError::new(
                        KEY,
                        format!("must be adaptive, off or a number from 1 to 1000000, not {other:?}"),
                    ));
                }
            },
        };
        let settings = OverloadSettings {
            limit,
            min_limit: self.positive("MONETA_OVERLOAD_MIN_LIMIT", 8)?,
            max_limit: self.positive("MONETA_OVERLOAD_MAX_LIMIT", 1_024)?,
        };
        if settings.max_limit < settings.min_limit {
            return Err(ConfigError::new(
                "MONETA_OVERLOAD_MAX_LIMIT",
                "must not be below MONETA_OVERLOAD_MIN_LIMIT",
            ));
        }
        Ok(settings)
    }
}

fn load_toml(path: &str) -> Result<HashMap<String, String>, ConfigError> {
    const KEY: &str = "MONETA_CONFIG_FILE";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(KEY, format!("cannot read {path}: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(&text, &e))?;
    let mut values = HashMap::new();
    for (key, value) in table {
        // Accept both `MONETA_LISTEN_ADDR` and the shorter `listen_addr`.
        let upper = key.to_ascii_uppercase();
        let name = match is_setting_name(&upper) {
            true => upper,
            false => format!("MONETA_{upper}"),
        };
        let text = match &value {
            toml::Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(",")),
            other => scalar(other),
        };
        // A table has no meaning as a setting; its text (possibly a
        // secret's) is never quoted.
        let Some(text) = text else {
            return Err(ConfigError::new(
                &name,
                "must be a string, a number, a boolean or an array of them in MONETA_CONFIG_FILE",
            ));
        };
        values.insert(name, text);
    }
    Ok(values)
}

/// The names Moneta reads its settings from, in the environment or the file.
fn is_setting_name(name: &str) -> bool {
    name.starts_with("MONETA_") || name.starts_with("OTEL_") || name == "RUST_LOG"
}

/// A TOML error as one line: where and what, never the text itself. The
/// parser's own rendering quotes the offending line, which may hold a secret.
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let what = error.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let at = match error.span() {
        Some(span) => {
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(" at line {line}, column {column}")
        }
        None => String::new(),
    };
    ConfigError::new("MONETA_CONFIG_FILE", format!("invalid TOML{at}: {what}"))
}

/// A TOML scalar as the string an environment variable would hold.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

impl Settings {
    /// Reads the process environment (and the TOML file it may name).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars_os(std::env::vars_os())
    }

    /// As [`Settings::from_vars`], from variables that may not be UTF-8
    /// (`std::env::vars` would panic on any, whoever it belongs to). One of
    /// Moneta's is an error naming it, never quoting it; others are ignored.
    pub fn from_vars_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Self, ConfigError> {
        let mut utf8 = Vec::new();
        for (name, value) in vars {
            let name = match name.into_string() {
                Ok(name) => name,
                Err(name) => {
                    let name = name.to_string_lossy();
                    if is_setting_name(&name) {
                        return Err(ConfigError::new(
                            &name.escape_debug().to_string(),
                            "the variable's name is not valid UTF-8",
                        ));
                    }
                    continue;
                }
            };
            match value.into_string() {
                Ok(value) => utf8.push((name, value)),
                Err(_) if is_setting_name(&name) => {
                    return Err(ConfigError::new(&name, "the value is not valid UTF-8"));
                }
                Err(_) => {}
            }
        }
        Self::from_vars(utf8)
    }

    /// Builds settings from explicit variables; the environment-free entry point tests use.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = vars.into_iter().collect();
        let mut values = match env.get("MONETA_CONFIG_FILE").filter(|p| !p.is_empty()) {
            Some(path) => load_toml(path)?,
            None => HashMap::new(),
        };
        values.extend(env);
        Self::from_source(&Source { values })
    }

    fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let redis_cluster_urls = src.opt_string("MONETA_REDIS_CLUSTER_URLS").map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });
        let bad_url = |u: &String| !(u.starts_with("redis://") || u.starts_with("rediss://"));
        if let Some(urls) = &redis_cluster_urls
            && (urls.is_empty() || urls.iter().any(bad_url))
        {
            return Err(ConfigError::new(
                "MONETA_REDIS_CLUSTER_URLS",
                "must be a comma list of redis:// or rediss:// URLs",
            ));
        }
        let log_format = match src.string("MONETA_LOG_FORMAT", "json").as_str() {
            "json" => LogFormat::Json,
            "text" | "pretty" => LogFormat::Text,
            other => {
                return Err(ConfigError::new(
                    "MONETA_LOG_FORMAT",
                    format!("must be json or text, not {other:?}"),
                ));
            }
        };
        let log_filter = src.string("RUST_LOG", "info");
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(ConfigError::new(
                "RUST_LOG",
                format!("not a log filter ({why}): {log_filter:?}"),
            ));
        }
        let otel_protocol = match src
            .string("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .as_str()
        {
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            "grpc" => OtlpProtocol::Grpc,
            other => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    format!("must be http/protobuf or grpc, not {other:?}"),
                ));
            }
        };
        let cdn_key_pair_id = src.opt_string("MONETA_CDN_KEY_PAIR_ID");
        let cdn_private_key_file = src.opt_string("MONETA_CDN_PRIVATE_KEY_FILE").map(PathBuf::from);
        if cdn_key_pair_id.is_some() != cdn_private_key_file.is_some() {
            return Err(ConfigError::new(
                "MONETA_CDN_KEY_PAIR_ID",
                "MONETA_CDN_KEY_PAIR_ID and MONETA_CDN_PRIVATE_KEY_FILE must be set together",
            ));
        }
        let drm = |system: &str| {
            let key = format!("MONETA_DRM_LICENSE_URL_{}", system.to_ascii_uppercase());
            src.url(
                &key,
                &format!("https://drm.example.com/{system}"),
                &["http", "https"],
            )
        };
        let limit_policy = match src.string("MONETA_STREAM_LIMIT_POLICY", "block").as_str() {
            "block" => StreamLimitPolicy::Block,
            "evict_oldest" => StreamLimitPolicy::EvictOldest,
            other => {
                return Err(ConfigError::new(
                    "MONETA_STREAM_LIMIT_POLICY",
                    format!("must be block or evict_oldest, not {other:?}"),
                ));
            }
        };
        let secret = |key: &str| src.opt_string(key).map(Secret::from);
        let optional_url = |key: &str| match src.get(key) {
            Some(_) => src.url(key, "", &["http", "https"]).map(Some),
            None => Ok(None),
        };
        // Read whatever MONETA_DRM_PROXY says, so a bad value never waits
        // for the day the proxy is turned on.
        let public_base_url = optional_url("MONETA_PUBLIC_BASE_URL")?;
        let upstream_widevine = optional_url("MONETA_DRM_UPSTREAM_WIDEVINE")?;
        let upstream_playready = optional_url("MONETA_DRM_UPSTREAM_PLAYREADY")?;
        let upstream_fairplay = optional_url("MONETA_DRM_UPSTREAM_FAIRPLAY")?;
        let upstream_clearkey = optional_url("MONETA_DRM_UPSTREAM_CLEARKEY")?;
        let upstream_headers = upstream_headers(src)?;
        let upstream_guard = src.guard("MONETA_DRM_UPSTREAM", 2_000, 64)?;
        let clearkey_keys_file = src.opt_string("MONETA_DRM_CLEARKEY_KEYS_FILE").map(PathBuf::from);
        let require_session = src.parse("MONETA_DRM_REQUIRE_SESSION", false)?;
        let proxy = match src.parse("MONETA_DRM_PROXY", false)? {
            false => None,
            true => {
                if src.get("MONETA_DRM_TOKEN_SECRET").is_none() {
                    return Err(ConfigError::new(
                        "MONETA_DRM_TOKEN_SECRET",
                        "required with MONETA_DRM_PROXY=true: the proxy checks licence tokens",
                    ));
                }
                let Some(base) = public_base_url else {
                    return Err(ConfigError::new(
                        "MONETA_PUBLIC_BASE_URL",
                        "required with MONETA_DRM_PROXY=true: licence URLs point at it",
                    ));
                };
                Some(LicenseProxySettings {
                    license_urls: DrmSystem::ALL.map(|s| format!("{base}/v1/licenses/{s}")),
                    clearkey_keys_file,
                    upstream_widevine,
                    upstream_playready,
                    upstream_fairplay,
                    upstream_clearkey,
                    upstream_headers,
                    upstream_guard,
                    require_session,
                })
            }
        };
        let resume = ResumeSettings {
            min_pct: src.parse("MONETA_RESUME_MIN_PCT", 5)?,
            max_pct: src.parse("MONETA_RESUME_MAX_PCT", 90)?,
        };
        if resume.max_pct > 100 || resume.min_pct > resume.max_pct {
            return Err(ConfigError::new(
                "MONETA_RESUME_MAX_PCT",
                "must be at most 100 and not below MONETA_RESUME_MIN_PCT",
            ));
        }
        let cors_allowed_origins = src
            .opt_string("MONETA_CORS_ALLOWED_ORIGINS")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(origin)
                    .collect::<Result<Vec<String>, ConfigError>>()
            })
            .transpose()?
            .unwrap_or_default();
        let mut settings = Settings {
            server: ServerSettings {
                cors_allowed_origins,
                listen_addr: src.parse("MONETA_LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], 3000)))?,
                admin_addr: src.parse("MONETA_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9090)))?,
                request_timeout: src.millis("MONETA_REQUEST_TIMEOUT_MS", 5_000)?,
                shutdown_drain: Duration::from_millis(src.parse("MONETA_SHUTDOWN_DRAIN_MS", 5_000)?),
                shutdown_grace: src.millis("MONETA_SHUTDOWN_GRACE_MS", 7_000)?,
                overload: src.overload()?,
                // Each open connection holds ~12 KiB (hyper's buffers, its
                // task). Under the overload benchmark's 4096 flooding
                // connections (2-core Intel host, mimalloc), 8192 let all in:
                // every request answered, probe p99 60–72 ms, peak RSS
                // 67 MiB. 1536 kept ~41 MiB but made room by closing
                // connections between two requests, which clients with a
                // request already on its way see as errors: 3 % of the probe
                // and of the flood lost. (With glibc's malloc, 8192 peaked
                // at 97–100 MiB.)
                max_connections: src.positive("MONETA_MAX_CONNECTIONS", 8_192)?,
            },
            redis: RedisSettings {
                url: src.url("MONETA_REDIS_URL", "redis://127.0.0.1:6379", &["redis", "rediss"])?,
                cluster_urls: redis_cluster_urls,
                guard: src.guard("MONETA_REDIS", 250, 512)?,
                client_cache: ClientCacheSettings {
                    max_keys: src.parse("MONETA_REDIS_CLIENT_CACHE_KEYS", 4_096)?,
                    ttl: src.millis("MONETA_REDIS_CLIENT_CACHE_TTL_MS", 30_000)?,
                },
                buckets: redis_buckets(src)?,
                min_replicas_acked: src.parse("MONETA_REDIS_MIN_REPLICAS_ACKED", 0)?,
            },
            internal_api: InternalApiSettings {
                url: src.url(
                    "MONETA_INTERNAL_API_URL",
                    "http://127.0.0.1:4000",
                    &["http", "https"],
                )?,
                token: secret("MONETA_INTERNAL_API_TOKEN"),
                guard: src.guard("MONETA_INTERNAL_API", 1_000, 128)?,
            },
            jwt: JwtSettings {
                hs256_secret: secret("MONETA_JWT_HS256_SECRET"),
                jwks_file: src.opt_string("MONETA_JWT_JWKS_FILE").map(PathBuf::from),
                secret_id: src.opt_string("MONETA_JWT_SECRET_ID"),
                refresh: src.secs("MONETA_JWT_REFRESH_S", 300)?,
                issuer: src.opt_string("MONETA_JWT_ISSUER"),
                audience: src.opt_string("MONETA_JWT_AUDIENCE"),
            },
            cdn: CdnSettings {
                base_url: src.url(
                    "MONETA_CDN_BASE_URL",
                    "https://cdn.example.com",
                    &["http", "https"],
                )?,
                key_pair_id: cdn_key_pair_id,
                private_key_file: cdn_private_key_file,
                url_ttl: src.secs("MONETA_CDN_URL_TTL_S", 21_600)?,
                cookie_domain: match src.opt_string("MONETA_CDN_COOKIE_DOMAIN") {
                    Some(d)
                        if d.is_empty()
                            || !d
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
                    {
                        return Err(ConfigError::new(
                            "MONETA_CDN_COOKIE_DOMAIN",
                            "must be a domain name such as .example.com",
                        ));
                    }
                    other => other,
                },
            },
            drm: DrmSettings {
                license_url_widevine: drm("widevine")?,
                license_url_playready: drm("playready")?,
                license_url_fairplay: drm("fairplay")?,
                token_secret: secret("MONETA_DRM_TOKEN_SECRET"),
                token_ttl: src.secs("MONETA_DRM_TOKEN_TTL_S", 300)?,
                fairplay_certificate_url: match src.get("MONETA_DRM_FAIRPLAY_CERTIFICATE_URL") {
                    Some(_) => {
                        Some(src.url("MONETA_DRM_FAIRPLAY_CERTIFICATE_URL", "", &["http", "https"])?)
                    }
                    None => None,
                },
                proxy,
            },
            resume,
            catalog: CatalogSettings {
                fallback_file: src.opt_string("MONETA_FALLBACK_CATALOG_FILE").map(PathBuf::from),
                content_ttl: src.secs("MONETA_CONTENT_TTL_S", 300)?,
                content_stale_ttl: src.secs("MONETA_CONTENT_STALE_TTL_S", 86_400)?,
                content_local_ttl: src.millis("MONETA_CONTENT_LOCAL_TTL_MS", 2_000)?,
                entitlement_ttl: src.secs("MONETA_ENTITLEMENT_TTL_S", 60)?,
            },
            sessions: SessionSettings {
                ttl: src.secs("MONETA_SESSION_TTL_S", 90)?,
                heartbeat_interval: src.secs("MONETA_HEARTBEAT_INTERVAL_S", 30)?,
                secret: secret("MONETA_SESSION_SECRET"),
                limit_policy,
            },
            progress: ProgressSettings {
                flush_interval: src.millis("MONETA_PROGRESS_FLUSH_MS", 1_000)?,
                batch_size: src.positive("MONETA_PROGRESS_BATCH_SIZE", 200)?,
                queue_capacity: src.positive("MONETA_PROGRESS_QUEUE_CAPACITY", 100_000)?,
                max_attempts: src.positive("MONETA_PROGRESS_MAX_ATTEMPTS", 5)?,
            },
            otel: OtelSettings {
                endpoint: src.opt_string("OTEL_EXPORTER_OTLP_ENDPOINT"),
                service_name: src.string("OTEL_SERVICE_NAME", "moneta"),
                protocol: otel_protocol,
            },
            log: LogSettings {
                filter: log_filter,
                format: log_format,
            },
        };
        let jwt = &settings.jwt;
        if jwt.hs256_secret.is_none() && jwt.jwks_file.is_none() && jwt.secret_id.is_none() {
            return Err(ConfigError::new(
                "MONETA_JWT_HS256_SECRET",
                "no JWT key source configured (set MONETA_JWT_HS256_SECRET, MONETA_JWT_JWKS_FILE or MONETA_JWT_SECRET_ID)",
            ));
        }
        if settings.sessions.heartbeat_interval >= settings.sessions.ttl {
            return Err(ConfigError::new(
                "MONETA_HEARTBEAT_INTERVAL_S",
                "must be shorter than MONETA_SESSION_TTL_S",
            ));
        }
        // A vendor call only ever runs inside a licence request: past the
        // request's own timeout it would end as a bare 503, uncounted by
        // its guard and its breaker. It gets at most 4/5 of the request.
        let request_timeout = settings.server.request_timeout;
        if let Some(proxy) = settings.drm.proxy.as_mut() {
            let timeout = &mut proxy.upstream_guard.timeout;
            *timeout = (*timeout).min(request_timeout * 4 / 5);
        }
        Ok(settings)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_vars(vars(&[("MONETA_JWT_HS256_SECRET", "x")])).unwrap();
        assert_eq!(s.server.listen_addr.to_string(), "0.0.0.0:3000");
        assert_eq!(s.server.admin_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(s.server.shutdown_drain, Duration::from_millis(5_000));
        assert_eq!(s.redis.guard.timeout, Duration::from_millis(250));
        assert_eq!(s.internal_api.guard.timeout, Duration::from_secs(1));
        assert_eq!(s.cdn.url_ttl, Duration::from_secs(21_600));
        assert_eq!(s.sessions.limit_policy, StreamLimitPolicy::Block);
        assert_eq!((s.resume.min_pct, s.resume.max_pct), (5, 90));
        assert_eq!(s.drm.token_ttl, Duration::from_secs(300));
        assert!(s.server.cors_allowed_origins.is_empty());
        assert_eq!(
            s.drm.license_url("playready"),
            Some("https://drm.example.com/playready")
        );
    }

    #[test]
    fn redis_buckets_are_positive_and_at_most_the_cluster_slots() {
        let with = |v: &str| {
            Settings::from_vars(vars(&[
                ("MONETA_JWT_HS256_SECRET", "x"),
                ("MONETA_REDIS_BUCKETS", v),
            ]))
        };
        let default = Settings::from_vars(vars(&[("MONETA_JWT_HS256_SECRET", "x")])).unwrap();
        assert_eq!(default.redis.buckets, 64);
        assert_eq!(with("16384").unwrap().redis.buckets, 16_384);
        assert_eq!(with("1").unwrap().redis.buckets, 1);
        for bad in ["0", "16385", "-1", "many", "70000"] {
            assert_eq!(with(bad).unwrap_err().key, "MONETA_REDIS_BUCKETS", "{bad}");
        }
    }

    #[test]
    fn min_replicas_acked_defaults_to_none_and_names_itself_when_bad() {
        let with = |v: &str| {
            Settings::from_vars(vars(&[
                ("MONETA_JWT_HS256_SECRET", "x"),
                ("MONETA_REDIS_MIN_REPLICAS_ACKED", v),
            ]))
        };
        let default = Settings::from_vars(vars(&[("MONETA_JWT_HS256_SECRET", "x")])).unwrap();
        assert_eq!(default.redis.min_replicas_acked, 0);
        assert_eq!(with("1").unwrap().redis.min_replicas_acked, 1);
        assert_eq!(with("0").unwrap().redis.min_replicas_acked, 0);
        for bad in ["-1", "one", "1.5"] {
            assert_eq!(
                with(bad).unwrap_err().key,
                "MONETA_REDIS_MIN_REPLICAS_ACKED",
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_value_names_the_setting() {
        let err = Settings::from_vars(vars(&[
            ("MONETA_JWT_HS256_SECRET", "x"),
            ("MONETA_LISTEN_ADDR", "nope"),
        ]))
        .unwrap_err();
        assert_eq!(err.key, "MONETA_LISTEN_ADDR");
    }

    #[test]
    fn overload_is_adaptive_between_8_and_1024_unless_told_otherwise() {
        let with = |pairs: &[(&str, &str)]| {
            let mut all = vec![("MONETA_JWT_HS256_SECRET", "x")];
            all.extend_from_slice(pairs);
            Settings::from_vars(vars(&all))
        };
        let s = with(&[]).unwrap().server;
        assert_eq!(s.overload.limit, OverloadLimit::Adaptive);
        assert_eq!((s.overload.min_limit, s.overload.max_limit), (8, 1024));
        assert_eq!(s.max_connections, 8192);
        let limit = |v: &str| with(&[("MONETA_OVERLOAD_LIMIT", v)]).map(|s| s.server.overload.limit);
        assert_eq!(limit("4").unwrap(), OverloadLimit::Fixed(4));
        assert_eq!(limit("off").unwrap(), OverloadLimit::Off);
        for bad in ["0", "-1", "lots", "1000001"] {
            assert_eq!(limit(bad).unwrap_err().key, "MONETA_OVERLOAD_LIMIT", "{bad}");
        }
        let err = with(&[
            ("MONETA_OVERLOAD_MIN_LIMIT", "64"),
            ("MONETA_OVERLOAD_MAX_LIMIT", "32"),
        ])
        .unwrap_err();
        assert_eq!(err.key, "MONETA_OVERLOAD_MAX_LIMIT");
        let err = with(&[("MONETA_MAX_CONNECTIONS", "0")]).unwrap_err();
        assert_eq!(err.key, "MONETA_MAX_CONNECTIONS");
    }

    #[test]
    fn no_key_source_is_an_error() {
        let err = Settings::from_vars(vars(&[])).unwrap_err();
        assert!(err.reason.contains("no JWT key source"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::from_vars(vars(&[
            ("MONETA_JWT_HS256_SECRET", "topsecret"),
            ("MONETA_SESSION_SECRET", "sessionsecret"),
            ("MONETA_INTERNAL_API_TOKEN", "apitoken"),
            ("MONETA_DRM_TOKEN_SECRET", "drmsecret"),
        ]))
        .unwrap();
        let dump = format!("{s:?}");
        for secret in ["topsecret", "sessionsecret", "apitoken", "drmsecret"] {
            assert!(!dump.contains(secret), "{secret} printed");
        }
    }

    fn proxy_vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = vars(&[
            ("MONETA_JWT_HS256_SECRET", "x"),
            ("MONETA_DRM_PROXY", "true"),
            ("MONETA_DRM_TOKEN_SECRET", "drm"),
            ("MONETA_PUBLIC_BASE_URL", "https://api.example.com/"),
        ]);
        all.retain(|(k, _)| extra.iter().all(|(name, _)| k != name));
        all.extend(vars(extra));
        all
    }

    #[test]
    fn the_licence_proxy_points_every_licence_url_at_moneta() {
        let s = Settings::from_vars(proxy_vars(&[(
            "MONETA_DRM_UPSTREAM_WIDEVINE",
            "https://lic.vendor.example/wv",
        )]))
        .unwrap();
        for system in ["widevine", "playready", "fairplay", "clearkey"] {
            assert_eq!(
                s.drm.license_url(system),
                Some(format!("https://api.example.com/v1/licenses/{system}").as_str())
            );
        }
        let proxy = s.drm.proxy.as_ref().unwrap();
        assert_eq!(
            proxy.upstream(DrmSystem::Widevine),
            Some("https://lic.vendor.example/wv")
        );
        assert_eq!(proxy.upstream(DrmSystem::FairPlay), None);
        assert_eq!(proxy.upstream_guard.timeout, Duration::from_millis(2_000));
        let off = Settings::from_vars(vars(&[("MONETA_JWT_HS256_SECRET", "x")])).unwrap();
        assert!(off.drm.proxy.is_none());
        assert_eq!(off.drm.license_url("clearkey"), None);
    }

    #[test]
    fn the_licence_proxy_needs_its_settings_and_names_the_missing_one() {
        let no_base = proxy_vars(&[("MONETA_PUBLIC_BASE_URL", "")]);
        assert_eq!(
            Settings::from_vars(no_base).unwrap_err().key,
            "MONETA_PUBLIC_BASE_URL"
        );
        let not_bool = proxy_vars(&[("MONETA_DRM_REQUIRE_SESSION", "always")]);
        assert_eq!(
            Settings::from_vars(not_bool).unwrap_err().key,
            "MONETA_DRM_REQUIRE_SESSION"
        );
        let no_secret = proxy_vars(&[("MONETA_DRM_TOKEN_SECRET", "")]);
        assert_eq!(
            Settings::from_vars(no_secret).unwrap_err().key,
            "MONETA_DRM_TOKEN_SECRET"
        );
        let not_bool = proxy_vars(&[("MONETA_DRM_PROXY", "yes")]);
        assert_eq!(Settings::from_vars(not_bool).unwrap_err().key, "MONETA_DRM_PROXY");
        let bad_url = proxy_vars(&[("MONETA_DRM_UPSTREAM_PLAYREADY", "ftp://x")]);
        assert_eq!(
            Settings::from_vars(bad_url).unwrap_err().key,
            "MONETA_DRM_UPSTREAM_PLAYREADY"
        );
        let zero = proxy_vars(&[("MONETA_DRM_UPSTREAM_TIMEOUT_MS", "0")]);
        assert_eq!(
            Settings::from_vars(zero).unwrap_err().key,
            "MONETA_DRM_UPSTREAM_TIMEOUT_MS"
        );
    }

    #[test]
    fn a_vendor_call_ends_within_its_licence_request() {
        let long = proxy_vars(&[("MONETA_DRM_UPSTREAM_TIMEOUT_MS", "10000")]);
        let s = Settings::from_vars(long).unwrap();
        let guard = &s.drm.proxy.as_ref().unwrap().upstream_guard;
        assert_eq!(guard.timeout, Duration::from_millis(4_000));
        let short = proxy_vars(&[("MONETA_DRM_UPSTREAM_TIMEOUT_MS", "1500")]);
        let s = Settings::from_vars(short).unwrap();
        let guard = &s.drm.proxy.as_ref().unwrap().upstream_guard;
        assert_eq!(guard.timeout, Duration::from_millis(1_500));
    }

    #[test]
    fn vendor_headers_are_checked_and_never_quoted() {
        let ok = proxy_vars(&[("MONETA_DRM_UPSTREAM_HEADERS", r#"{"X-Api-Key": "k3y-value"}"#)]);
        let s = Settings::from_vars(ok).unwrap();
        let headers = &s.drm.proxy.as_ref().unwrap().upstream_headers;
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0, "x-api-key");
        assert_eq!(headers[0].1.expose_secret(), "k3y-value");
        assert!(!format!("{s:?}").contains("k3y-value"));
        for bad in [
            r#"["k3y-value"]"#,
            r#"{"X-Api-Key": 12}"#,
            r#"{"bad header": "k3y-value"}"#,
            r#"{"X-Api-Key": "k3y-value
"}"#,
            r#"{"X-Moneta-User": "k3y-value"}"#,
            r#"{"X-Api-Key": "k3y-value""#,
        ] {
            let err = Settings::from_vars(proxy_vars(&[("MONETA_DRM_UPSTREAM_HEADERS", bad)])).unwrap_err();
            assert_eq!(err.key, "MONETA_DRM_UPSTREAM_HEADERS", "{bad}");
            assert!(!err.to_string().contains("k3y-value"), "{err}");
        }
    }

    #[test]
    fn toml_file_is_overridden_by_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moneta.toml");
        std::fs::write(
            &path,
            "listen_addr = \"127.0.0.1:1\"\nMONETA_ADMIN_ADDR = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let s = Settings::from_vars(vars(&[
            ("MONETA_CONFIG_FILE", path.to_str().unwrap()),
            ("MONETA_JWT_HS256_SECRET", "x"),
            ("MONETA_ADMIN_ADDR", "127.0.0.1:3"),
        ]))
        .unwrap();
        assert_eq!(s.server.listen_addr.to_string(), "127.0.0.1:1");
        assert_eq!(s.server.admin_addr.to_string(), "127.0.0.1:3");
    }

    #[test]
    fn cors_origins_are_origins_as_browsers_write_them() {
        let origins = |list: &str| {
            Settings::from_vars(vars(&[
                ("MONETA_JWT_HS256_SECRET", "x"),
                ("MONETA_CORS_ALLOWED_ORIGINS", list),
            ]))
            .map(|s| s.server.cors_allowed_origins)
        };
        assert_eq!(
            origins("https://Player.Example.com:443/, http://localhost:8080").unwrap(),
            ["https://player.example.com", "http://localhost:8080"]
        );
        for bad in [
            "not-an-origin",
            "ftp://files.example.com",
            "http://a.com/path",
            "https://a.com?x=1",
            "https://user@a.com",
            "https://a.com#top",
            "https://exa mple.com",
        ] {
            let err = origins(bad).unwrap_err();
            assert_eq!(err.key, "MONETA_CORS_ALLOWED_ORIGINS", "{bad}");
        }
    }

    #[test]
    fn a_file_that_is_not_toml_is_a_one_line_error_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moneta.toml");
        std::fs::write(&path, "this is not toml = =\n").unwrap();
        let err = Settings::from_vars(vars(&[
            ("MONETA_CONFIG_FILE", path.to_str().unwrap()),
            ("MONETA_JWT_HS256_SECRET", "x"),
        ]))
        .unwrap_err();
        assert_eq!(err.key, "MONETA_CONFIG_FILE");
        let text = err.to_string();
        assert!(!text.contains('\n') && text.contains("line 1"), "{text}");
    }

    fn toml_error_for(text: &str) -> ConfigError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moneta.toml");
        std::fs::write(&path, text).unwrap();
        Settings::from_vars(vars(&[
            ("MONETA_CONFIG_FILE", path.to_str().unwrap()),
            ("MONETA_JWT_HS256_SECRET", "x"),
        ]))
        .unwrap_err()
    }

    #[test]
    fn toml_errors_give_the_position_never_the_text() {
        let err = toml_error_for("session_secret = \"Hunter2\\Secret\"\n");
        assert_eq!(err.key, "MONETA_CONFIG_FILE");
        let text = err.to_string();
        assert!(text.contains("line 1, column 27"), "{text}");
        assert!(!text.contains("Hunter2"), "{text}");
        for (file, at) in [
            (
                "listen_addr = \"127.0.0.1:1\"\nsession_secret = \"Hunter2Secret",
                "line 2",
            ),
            (
                "session_secret = \"Hunter2Secret\"\nsession_secret = \"Hunter2Secret\"\n",
                "line 2",
            ),
            ("session_secret = Hunter2Secret\n", "line 1"),
            ("session_secret = \"Hunter2Secret\" x\n", "line 1"),
            ("[a]\nb = \"Hunter2Secret\"\n[a]\n", "line 3"),
            (
                "# ünïcode\nsession_secret = \"Hunter2Secret\" \"Hunter2Secret\"\n",
                "line 2",
            ),
        ] {
            let err = toml_error_for(file);
            let text = err.to_string();
            assert_eq!(err.key, "MONETA_CONFIG_FILE", "{file}");
            assert!(text.contains(at) && !text.contains('\n'), "{file}: {text}");
            assert!(!text.contains("Hunter2"), "{file}: {text}");
        }
    }

    #[test]
    fn a_toml_value_that_is_no_setting_names_the_key_never_the_value() {
        for file in [
            "session_secret = { value = \"Hunter2Secret\" }\n",
            "listen_addr = { host = \"Hunter2Secret\" }\n",
            "cors_allowed_origins = [[\"Hunter2Secret\"]]\n",
            "[session_secret]\nvalue = \"Hunter2Secret\"\n",
        ] {
            let err = toml_error_for(file);
            assert!(err.key.starts_with("MONETA_"), "{file}: {err}");
            assert!(!err.to_string().contains("Hunter2"), "{file}: {err}");
        }
        assert_eq!(
            toml_error_for("session_secret = { value = \"Hunter2Secret\" }\n").key,
            "MONETA_SESSION_SECRET"
        );
    }

    #[cfg(unix)]
    fn os_vars(pairs: &[(&[u8], &[u8])]) -> Vec<(OsString, OsString)> {
        use std::os::unix::ffi::OsStringExt;
        pairs
            .iter()
            .map(|(k, v)| (OsString::from_vec(k.to_vec()), OsString::from_vec(v.to_vec())))
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn a_setting_that_is_not_utf8_is_named_never_quoted() {
        for name in [
            "MONETA_SESSION_SECRET",
            "MONETA_JWT_HS256_SECRET",
            "MONETA_CONFIG_FILE",
            "OTEL_SERVICE_NAME",
            "RUST_LOG",
        ] {
            let err = Settings::from_vars_os(os_vars(&[
                (b"MONETA_JWT_HS256_SECRET", b"x"),
                (name.as_bytes(), b"\xffTopSecret"),
            ]))
            .unwrap_err();
            assert_eq!(err.key, name);
            assert!(!err.to_string().contains("TopSecret"), "{err}");
        }
        let err = Settings::from_vars_os(os_vars(&[
            (b"MONETA_JWT_HS256_SECRET", b"x"),
            (b"MONETA_SESSION_SECRE\xff", b"TopSecret"),
        ]))
        .unwrap_err();
        assert!(err.key.starts_with("MONETA_SESSION_SECRE"), "{err}");
        assert!(!err.to_string().contains("TopSecret"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn other_variables_that_are_not_utf8_are_ignored() {
        let s = Settings::from_vars_os(os_vars(&[
            (b"MONETA_JWT_HS256_SECRET", b"x"),
            (b"MONETA_LISTEN_ADDR", b"127.0.0.1:1"),
            (b"UNRELATED_VAR", b"caf\xe9"),
            (b"LC_\xff", b"x"),
        ]))
        .unwrap();
        assert_eq!(s.server.listen_addr.to_string(), "127.0.0.1:1");
    }

    #[test]
    fn an_unparsable_log_filter_names_rust_log() {
        let with =
            |key: &str, v: &str| Settings::from_vars(vars(&[("MONETA_JWT_HS256_SECRET", "x"), (key, v)]));
        for good in ["info", "warn,moneta=debug", "moneta::access=off,info", "debug"] {
            assert_eq!(with("RUST_LOG", good).unwrap().log.filter, good);
        }
        assert_eq!(with("RUST_LOG", "").unwrap().log.filter, "info");
        for bad in ["warn,[[[bad", "info,moneta=loud", "="] {
            let err = with("RUST_LOG", bad).unwrap_err();
            assert_eq!(err.key, "RUST_LOG", "{bad}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let err = toml_error_for("rust_log = \"info,moneta=loud\"\n");
        assert_eq!(err.key, "RUST_LOG");
        // The format next to it was already refused the same way.
        assert_eq!(
            with("MONETA_LOG_FORMAT", "xml").unwrap_err().key,
            "MONETA_LOG_FORMAT"
        );
    }
}
