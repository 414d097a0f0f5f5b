//! `MONETA_JWT_SECRET_ID`: a JWKS kept in AWS Secrets Manager.
//!
//! Rotating the secret leaves two versions alive: `AWSCURRENT` (what signers
//! use from now on) and `AWSPREVIOUS` (what they used until the rotation, still
//! carried by live tokens). Keys of both are accepted until the next rotation.

use std::collections::HashSet;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use futures::future::BoxFuture;

use super::keys::{KeyError, KeySource, VerificationKey, parse_jwks};

pub const SETTING: &str = "MONETA_JWT_SECRET_ID";
/// Upper bound of one `GetSecretValue`, retries included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Region and endpoint resolution may consult the instance metadata service,
/// which does not exist off AWS; the start must not wait on it forever.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
const CURRENT: &str = "AWSCURRENT";
const PREVIOUS: &str = "AWSPREVIOUS";

fn error(reason: impl Into<String>) -> KeyError {
    KeyError {
        setting: SETTING,
        reason: reason.into(),
    }
}

/// The key set stored in one Secrets Manager secret.
pub struct SecretsManagerJwks {
    client: Client,
    secret_id: String,
}

impl SecretsManagerJwks {
    /// Builds the client from the standard AWS settings: `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, profiles and the credential chain.
    pub async fn from_env(secret_id: impl Into<String>) -> Result<Self, KeyError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_attempt_timeout(Duration::from_secs(3))
            .operation_timeout(CALL_TIMEOUT)
            .build();
        let loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts);
        let config = tokio::time::timeout(CONFIG_TIMEOUT, loader.load())
            .await
            .map_err(|_| {
                error(format!(
                    "the AWS configuration did not resolve within {} s",
                    CONFIG_TIMEOUT.as_secs()
                ))
            })?;
        if config.region().is_none() {
            return Err(error("no AWS region configured (set AWS_REGION)"));
        }
        Ok(Self::with_client(Client::new(&config), secret_id))
    }

    pub fn with_client(client: Client, secret_id: impl Into<String>) -> Self {
        Self {
            client,
            secret_id: secret_id.into(),
        }
    }

    /// The `SecretString` of one version stage; `None` when that stage does not
    /// exist and `missing_ok` (a secret never rotated has no `AWSPREVIOUS`).
    async fn fetch(&self, stage: &'static str, missing_ok: bool) -> Result<Option<String>, KeyError> {
        let call = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .version_stage(stage)
            .send();
        let output = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(output)) => output,
            // Matched on the error kind: AWS answers 400 here, some stand-ins 404.
            Ok(Err(e)) if missing_ok && is_not_found(&e) => return Ok(None),
            Ok(Err(e)) => {
                return Err(error(format!(
                    "cannot read {stage} of secret {:?}: {}",
                    self.secret_id,
                    describe(&e)
                )));
            }
            Err(_) => {
                return Err(error(format!(
                    "no answer from Secrets Manager for {stage} of secret {:?} within {} s",
                    self.secret_id,
                    CALL_TIMEOUT.as_secs()
                )));
            }
        };
        match output.secret_string {
            Some(text) => Ok(Some(text)),
            None => Err(error(format!(
                "{stage} of secret {:?} has no SecretString (binary secrets are not supported)",
                self.secret_id
            ))),
        }
    }

    async fn load_keys(&self) -> Result<Vec<VerificationKey>, KeyError> {
        let (current, previous) = tokio::join!(self.fetch(CURRENT, false), self.fetch(PREVIOUS, true));
        let current =
            current?.ok_or_else(|| error(format!("secret {:?} has no {CURRENT}", self.secret_id)))?;
        let current = parse_jwks(&current)
            .map_err(|reason| error(format!("{CURRENT} of secret {:?}: {reason}", self.secret_id)))?;
        let previous = match previous?.map(|text| parse_jwks(&text)) {
            None => Vec::new(),
            Some(Ok(keys)) => keys,
            // The version being retired must not block the one signers use now.
            Some(Err(reason)) => {
                tracing::warn!(
                    secret_id = %self.secret_id,
                    reason = %reason,
                    "ignoring the AWSPREVIOUS version of the JWT key secret"
                );
                Vec::new()
            }
        };
        Ok(merge(current, previous))
    }
}

impl KeySource for SecretsManagerJwks {
    fn setting(&self) -> &'static str {
        SETTING
    }

    fn load(&self) -> BoxFuture<'_, Result<Vec<VerificationKey>, KeyError>> {
        Box::pin(self.load_keys())
    }
}

fn is_not_found(e: &SdkError<GetSecretValueError>) -> bool {
    e.as_service_error()
        .is_some_and(GetSecretValueError::is_resource_not_found_exception)
}

/// One line, whatever the SDK or the service put in the message.
fn describe(e: &SdkError<GetSecretValueError>) -> String {
    let text = match e.as_service_error() {
        Some(service) => format!(
            "{}: {}",
            service.code().unwrap_or("service error"),
            service.message().unwrap_or("no message")
        ),
        None => {
            // The chain of `Display`s; `DisplayErrorContext` appends a `Debug` dump.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `AWSCURRENT` keys first, then those of `AWSPREVIOUS` not already present.
/// Keys without a `kid` are all kept: nothing tells two of them apart but
/// their material.
fn merge(current: Vec<VerificationKey>, previous: Vec<VerificationKey>) -> Vec<VerificationKey> {
    let mut seen = HashSet::new();
    current
        .into_iter()
        .chain(previous)
        .filter(|key| match &key.kid {
            Some(kid) => seen.insert((kid.clone(), key.alg)),
            None => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;

    fn jwks(keys: &[(&str, &str)]) -> Vec<VerificationKey> {
        let keys: Vec<String> = keys
            .iter()
            .map(|(kid, alg)| format!(r#"{{"kty":"oct","kid":"{kid}","alg":"{alg}","k":"c2VjcmV0"}}"#))
            .collect();
        parse_jwks(&format!(r#"{{"keys":[{}]}}"#, keys.join(","))).unwrap()
    }

    #[test]
    fn merge_puts_current_first_and_drops_repeated_kid_and_alg() {
        let merged = merge(
            jwks(&[("b", "HS256"), ("a", "HS256")]),
            jwks(&[("a", "HS256"), ("a", "HS384"), ("z", "HS256")]),
        );
        let got: Vec<(Option<&str>, Algorithm)> = merged.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        assert_eq!(
            got,
            vec![
                (Some("b"), Algorithm::HS256),
                (Some("a"), Algorithm::HS256),
                (Some("a"), Algorithm::HS384),
                (Some("z"), Algorithm::HS256),
            ]
        );
    }

    #[test]
    fn merge_keeps_every_key_without_kid() {
        let doc = r#"{"keys":[{"kty":"oct","alg":"HS256","k":"c2VjcmV0"}]}"#;
        let merged = merge(parse_jwks(doc).unwrap(), parse_jwks(doc).unwrap());
        assert_eq!(merged.len(), 2);
    }
}
