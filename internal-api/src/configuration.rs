//! Settings come only from the environment so the same binary runs unchanged
//! in a container, under systemd and in tests.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;

pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:4000";
pub const DEFAULT_DB_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// A bad setting. The message names the variable but never repeats its value,
/// because several of them (`DATABASE_URL`, `INTERNAL_API_TOKEN`) hold secrets.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

impl ConfigError {
    fn new(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            name,
            reason: reason.into(),
        }
    }
}

#[derive(Clone)]
pub struct Settings {
    /// `PgConnectOptions`'s own `Debug` prints the password, hence the
    /// hand-written `Debug` for `Settings` below.
    pub database: PgConnectOptions,
    pub listen_addr: SocketAddr,
    /// `SecretString` prints as `[REDACTED]`, so no `Debug` of the settings
    /// or log line can leak it.
    pub token: Option<SecretString>,
    /// How long a starting process keeps retrying an unreachable database
    /// before giving up, so it can be started alongside PostgreSQL.
    pub db_startup_timeout: Duration,
    pub log_filter: String,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field(
                "database",
                &format_args!(
                    "{}@{}:{}/{}",
                    self.database.get_username(),
                    self.database.get_host(),
                    self.database.get_port(),
                    self.database.get_database().unwrap_or_default()
                ),
            )
            .field("listen_addr", &self.listen_addr)
            .field("token", &self.token)
            .field("db_startup_timeout", &self.db_startup_timeout)
            .field("log_filter", &self.log_filter)
            .finish()
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` so tests need not touch the process
    /// environment, which is shared between test threads.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let database_url = lookup("DATABASE_URL")
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| ConfigError::new("DATABASE_URL", "required but not set"))?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "expected a postgres:// or postgresql:// URL",
            ));
        }
        // The parser's own message may quote the URL, password included.
        let database = PgConnectOptions::from_str(&database_url)
            .map_err(|_| ConfigError::new("DATABASE_URL", "not a valid PostgreSQL URL"))?
            .application_name("internal-api");

        let listen_addr = match lookup("INTERNAL_API_LISTEN_ADDR").filter(|v| !v.is_empty()) {
            None => DEFAULT_LISTEN_ADDR
                .parse()
                .map_err(|_| ConfigError::new("INTERNAL_API_LISTEN_ADDR", "bad default"))?,
            Some(v) => v.trim().parse().map_err(|_| {
                ConfigError::new(
                    "INTERNAL_API_LISTEN_ADDR",
                    format!("expected IP:port such as {DEFAULT_LISTEN_ADDR}, got {v:?}"),
                )
            })?,
        };

        // An empty value is treated as unset: compose files commonly pass
        // `INTERNAL_API_TOKEN=${TOKEN:-}`.
        let token = match lookup("INTERNAL_API_TOKEN").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => {
                // It has to travel in an HTTP header as `Bearer <token>`.
                if !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        "INTERNAL_API_TOKEN",
                        "must be printable ASCII without spaces",
                    ));
                }
                Some(SecretString::from(v))
            }
        };

        let db_startup_timeout = match lookup("INTERNAL_API_DB_STARTUP_TIMEOUT_S").filter(|v| !v.is_empty()) {
            None => DEFAULT_DB_STARTUP_TIMEOUT,
            Some(v) => v.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| {
                ConfigError::new(
                    "INTERNAL_API_DB_STARTUP_TIMEOUT_S",
                    format!("expected whole seconds, got {v:?}"),
                )
            })?,
        };

        let log_filter = match lookup("RUST_LOG").filter(|v| !v.trim().is_empty()) {
            None => DEFAULT_LOG_FILTER.to_owned(),
            Some(v) => {
                tracing_subscriber::EnvFilter::try_new(&v)
                    .map_err(|e| ConfigError::new("RUST_LOG", e.to_string()))?;
                v
            }
        };

        Ok(Self {
            database,
            listen_addr,
            token,
            db_startup_timeout,
            log_filter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:hunter2@db:5432/moneta");

    #[test]
    fn defaults_apply_when_only_database_url_is_set() {
        let s = settings(&[URL]).expect("valid");
        assert_eq!(s.listen_addr.to_string(), DEFAULT_LISTEN_ADDR);
        assert!(s.token.is_none());
        assert_eq!(s.db_startup_timeout, DEFAULT_DB_STARTUP_TIMEOUT);
        assert_eq!(s.log_filter, DEFAULT_LOG_FILTER);
    }

    /// Asserts that the settings are refused naming `name`; returns the message.
    fn refused(vars: &[(&str, &str)], name: &str) -> String {
        let err = settings(vars).expect_err("must fail");
        assert_eq!(err.name, name);
        err.to_string()
    }

    #[test]
    fn missing_database_url_names_the_setting() {
        assert!(refused(&[], "DATABASE_URL").contains("DATABASE_URL"));
    }

    #[test]
    fn bad_values_name_the_setting_and_hide_secrets() {
        let message = refused(&[("DATABASE_URL", "mysql://u:topsecret@h/db")], "DATABASE_URL");
        assert!(!message.contains("topsecret"));
        refused(
            &[URL, ("INTERNAL_API_LISTEN_ADDR", "nope")],
            "INTERNAL_API_LISTEN_ADDR",
        );
        let message = refused(&[URL, ("INTERNAL_API_TOKEN", "has space")], "INTERNAL_API_TOKEN");
        assert!(!message.contains("has space"));
        refused(
            &[URL, ("INTERNAL_API_DB_STARTUP_TIMEOUT_S", "soon")],
            "INTERNAL_API_DB_STARTUP_TIMEOUT_S",
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = settings(&[URL, ("INTERNAL_API_TOKEN", "s3cr3t-token")]).expect("valid");
        let printed = format!("{s:?}");
        assert!(!printed.contains("s3cr3t-token"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(s.token.as_ref().map(|t| t.expose_secret()), Some("s3cr3t-token"));
    }

    #[test]
    fn empty_token_means_no_auth() {
        let s = settings(&[URL, ("INTERNAL_API_TOKEN", "")]).expect("valid");
        assert!(s.token.is_none());
    }
}
