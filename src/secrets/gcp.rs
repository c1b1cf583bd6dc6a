//! The `GCP` store: Google Secret Manager, through the official `google-cloud-secretmanager-v1`
//! (HTTP/JSON) with Application Default Credentials.
//!
//! Access is governed by Google's IAM, as in Apono: a read needs only
//! `secretmanager.versions.access` (`roles/secretmanager.secretAccessor`). The read mark (label
//! `apono-connector-read=true`) is opt-in (`secrets.require_read_mark`); when asked for, it is read
//! with `GetSecret` before `AccessSecretVersion`, which also needs `secretmanager.secrets.get`.
//!
//! `secret_id` is a short id, or a full resource name as Apono's Terraform examples give it
//! (`projects/P/secrets/S`, `projects/P/locations/L/secrets/S`, optionally `/versions/V`).
//!
//! The client's own retries are capped (K2): its default (10 attempts within 60 s per request,
//! backoff from 1 s, no per-attempt limit) stacks under the agent's retries and runs into the
//! registry's 60 s limit, which hides the real cause. Here a request gets [`ATTEMPTS`] tries of at
//! most [`DEFAULT_ATTEMPT_TIMEOUT`] each, a whole read (token included) three times that, and the
//! error names what happened.

use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_secretmanager_v1::client::SecretManagerService;
use tokio::sync::OnceCell;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Reads Google Secret Manager.
pub struct GcpStore {
    client: OnceCell<SecretManagerService>,
    /// Endpoint and credentials overrides (tests); `None` means Google's endpoint and ADC.
    endpoint: Option<String>,
    credentials: Option<google_cloud_auth::credentials::Credentials>,
    /// Whether a secret must carry the read mark (`secrets.require_read_mark` has `GCP`).
    require_mark: bool,
    /// How long one attempt of one request may take.
    attempt_timeout: Duration,
}

/// Tries per request (the first and one retry, for UNAVAILABLE / 503 and I/O faults only; a
/// timed-out attempt is not retried): a longer outage is the agent's to retry, with its backoff.
const ATTEMPTS: u32 = 2;
/// How long one attempt may take by default, connection included.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before the retry.
const RETRY_DELAY: Duration = Duration::from_millis(300);
const DEFAULT_HOST: &str = "secretmanager.googleapis.com";

impl Default for GcpStore {
    fn default() -> Self {
        GcpStore::new()
    }
}

impl GcpStore {
    /// Google's endpoint and Application Default Credentials, resolved on first use.
    pub fn new() -> GcpStore {
        GcpStore {
            client: OnceCell::new(),
            endpoint: None,
            credentials: None,
            require_mark: false,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// Another endpoint (a regional or private one; tests: a local fake), with the given
    /// credentials or, when `None`, Application Default Credentials.
    pub fn with_endpoint(
        endpoint: String,
        credentials: Option<google_cloud_auth::credentials::Credentials>,
    ) -> GcpStore {
        GcpStore {
            client: OnceCell::new(),
            endpoint: Some(endpoint),
            credentials,
            require_mark: false,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// How long one attempt of one request may take (default [`DEFAULT_ATTEMPT_TIMEOUT`]); a
    /// request is tried at most twice.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> GcpStore {
        self.attempt_timeout = timeout;
        self
    }

    /// Also require the read mark on every secret read (off by default).
    pub fn requiring_read_mark(mut self, require: bool) -> GcpStore {
        self.require_mark = require;
        self
    }

    async fn client(&self) -> Result<SecretManagerService, SecretError> {
        self.client
            .get_or_try_init(|| async {
                let misconfigured = |e: String| SecretError::Misconfigured {
                    store: "GCP".into(),
                    hint: format!("cannot build a Secret Manager client: {e}"),
                };
                let backoff = ExponentialBackoffBuilder::new()
                    .with_initial_delay(RETRY_DELAY)
                    .with_maximum_delay(RETRY_DELAY)
                    .build()
                    .map_err(|e| misconfigured(e.to_string()))?;
                let mut builder = SecretManagerService::builder()
                    .with_retry_policy(
                        Aip194Strict
                            .with_attempt_limit(ATTEMPTS)
                            .with_time_limit(self.attempt_timeout * ATTEMPTS + RETRY_DELAY),
                    )
                    .with_backoff_policy(backoff)
                    .with_attempt_timeout(self.attempt_timeout);
                if let Some(e) = &self.endpoint {
                    builder = builder.with_endpoint(e.clone());
                }
                if let Some(c) = &self.credentials {
                    builder = builder.with_credentials(c.clone());
                }
                builder.build().await.map_err(|e| SecretError::Misconfigured {
                    store: "GCP".into(),
                    hint: format!("cannot build a Secret Manager client (Application Default Credentials?): {e}"),
                })
            })
            .await
            .cloned()
    }

    /// The host requests go to, for error messages.
    fn host(&self) -> String {
        self.endpoint
            .as_deref()
            .and_then(|e| url::Url::parse(e).ok())
            .and_then(|u| {
                let host = u.host_str()?.to_string();
                Some(match u.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                })
            })
            .unwrap_or_else(|| DEFAULT_HOST.to_string())
    }

    fn map_error(&self, reference: &SecretRef, action: &str, err: google_cloud_gax::error::Error) -> SecretError {
        map_error(reference, action, &self.host(), self.attempt_timeout, err)
    }
}

/// The error the retry loop gave up on: "exhausted" wraps the last attempt's error.
fn last_attempt(err: &google_cloud_gax::error::Error) -> &google_cloud_gax::error::Error {
    use google_cloud_gax::error::Error;
    let mut current = err;
    while current.is_exhausted() {
        let mut source = std::error::Error::source(current);
        let mut inner = None;
        while let Some(s) = source {
            if let Some(e) = s.downcast_ref::<Error>() {
                inner = Some(e);
                break;
            }
            source = s.source();
        }
        match inner {
            Some(e) => current = e,
            None => break,
        }
    }
    current
}

fn map_error(
    reference: &SecretRef,
    action: &str,
    host: &str,
    attempt_timeout: Duration,
    err: google_cloud_gax::error::Error,
) -> SecretError {
    let describe = reference.describe();
    let err = last_attempt(&err);
    if let Some(status) = err.status() {
        let message = status.message.clone();
        return match status.code {
            Code::NotFound => SecretError::NotFound {
                reference: describe,
                hint: format!("Secret Manager has no such secret or version ({message})"),
            },
            Code::PermissionDenied => SecretError::NotPermitted {
                reference: describe,
                hint: format!(
                    "the connector's service account lacks {action} permission (reading needs \
                     roles/secretmanager.secretAccessor; with GCP in secrets.require_read_mark also \
                     secretmanager.secrets.get, e.g. roles/secretmanager.viewer) ({message})"
                ),
            },
            Code::Unauthenticated => SecretError::NotPermitted {
                reference: describe,
                hint: format!("Google refused the connector's credentials ({message})"),
            },
            Code::FailedPrecondition => SecretError::NotFound {
                reference: describe,
                hint: format!(
                    "the secret version cannot be read in its state ({message}): enable it \
                     (gcloud secrets versions enable) or pin another version"
                ),
            },
            // A name or version Secret Manager refuses: the reference's fault, not the value's.
            Code::InvalidArgument => SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("Secret Manager refused {action} of {describe}: {message}"),
            },
            // Only transient conditions are worth a retry; the rest is the request's fault.
            code @ (Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::Unknown) => SecretError::Unreachable {
                reference: describe,
                hint: format!(
                    "Secret Manager at {host} answered {action} with {}{code:?} ({message})",
                    err.http_status_code().map(|c| format!("HTTP {c} ")).unwrap_or_default()
                ),
            },
            code => SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("Secret Manager refused {action} of {describe}: {code:?} ({message})"),
            },
        };
    }
    if err.is_timeout() {
        return SecretError::Unreachable {
            reference: describe,
            hint: format!(
                "timed out after {} s at {host} ({action}): Secret Manager or the network is slow or dropping \
                 packets",
                attempt_timeout.as_secs_f64()
            ),
        };
    }
    if err.is_connect() {
        return SecretError::Unreachable {
            reference: describe,
            hint: format!("cannot connect to {host} ({action}): {}", crate::error_chain(err)),
        };
    }
    if err.is_authentication() {
        // Getting a token failed: a metadata server or token endpoint that is down or slow is
        // worth a retry; refused credentials are not.
        let transient = std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|c| c.is_transient());
        if transient {
            return SecretError::Unreachable {
                reference: describe,
                hint: format!("cannot get a Google access token now: {}", crate::error_chain(err)),
            };
        }
        return SecretError::NotPermitted {
            reference: describe,
            hint: format!(
                "Google refused or lacks the connector's credentials (Application Default Credentials): {}",
                crate::error_chain(err)
            ),
        };
    }
    if let Some(code) = err.http_status_code() {
        return match code {
            404 => SecretError::NotFound {
                reference: describe,
                hint: format!("{host} answered 404 to {action}"),
            },
            403 => SecretError::NotPermitted {
                reference: describe,
                hint: format!("{host} answered 403 to {action}"),
            },
            400..=499 if code != 408 && code != 429 => SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("{host} answered {code} to {action} of {describe}: {err}"),
            },
            _ => SecretError::Unreachable {
                reference: describe,
                hint: format!("{host} answered {code} to {action}: {err}"),
            },
        };
    }
    if err.is_binding() {
        // The client refused to build the request: the name is not a Secret Manager name.
        return SecretError::Misconfigured {
            store: "GCP".into(),
            hint: format!("{describe}: the secret name is not a Secret Manager resource name ({action}): {err}"),
        };
    }
    SecretError::Unreachable {
        reference: describe,
        hint: format!("{action} at {host}: {}", crate::error_chain(err)),
    }
}

/// The secret's resource name and the version to read: `secret_id` as a short id in `project`,
/// or a full resource name (its `/versions/V` suffix, when present, is the default version).
fn resource_name(project: &str, secret_id: &str, version: Option<&str>) -> (String, String) {
    let secret_id = secret_id.trim().trim_start_matches('/');
    let (name, named_version) = if secret_id.starts_with("projects/") {
        match secret_id.split_once("/versions/") {
            Some((name, v)) => (name.to_string(), Some(v)),
            None => (secret_id.to_string(), None),
        }
    } else {
        (format!("projects/{project}/secrets/{secret_id}"), None)
    };
    let version = version.or(named_version).unwrap_or("latest").to_string();
    (name, version)
}

#[async_trait]
impl SecretStore for GcpStore {
    fn store_type(&self) -> &'static str {
        "GCP"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        // The per-attempt limit does not cover getting a token (the metadata server, a token
        // endpoint), so the whole read has a deadline of its own, inside the registry's.
        let deadline = self.attempt_timeout * (ATTEMPTS + 1);
        match tokio::time::timeout(deadline, self.read(reference)).await {
            Ok(result) => result,
            Err(_) => Err(SecretError::Unreachable {
                reference: reference.describe(),
                hint: format!(
                    "no answer within {} s from Secret Manager at {} or from the Google token source (metadata \
                     server or token endpoint of the Application Default Credentials)",
                    deadline.as_secs_f64(),
                    self.host()
                ),
            }),
        }
    }
}

impl GcpStore {
    async fn read(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::Gcp {
            project,
            secret_id,
            version,
        } = reference
        else {
            return Err(wrong_store(reference, "GCP"));
        };
        let client = self.client().await?;
        let (name, version) = resource_name(project, secret_id, version.as_deref());
        if self.require_mark {
            let meta = client
                .get_secret()
                .set_name(&name)
                .send()
                .await
                .map_err(|e| self.map_error(reference, "secretmanager.secrets.get", e))?;
            if !is_marked(meta.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
                return Err(SecretError::not_marked(
                    reference,
                    "label",
                    format!(
                        "gcloud secrets update {name} --update-labels={}=true; \
                         or remove GCP from secrets.require_read_mark",
                        super::READ_MARK_KEY
                    ),
                ));
            }
        }
        let out = client
            .access_secret_version()
            .set_name(format!("{name}/versions/{version}"))
            .send()
            .await
            .map_err(|e| self.map_error(reference, "secretmanager.versions.access", e))?;
        match out.payload {
            Some(payload) => value::from_bytes(reference, payload.data.to_vec()),
            None => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret version has no payload".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resource_name;

    #[test]
    fn secret_id_may_be_a_full_resource_name() {
        let n = |id, v| resource_name("p", id, v);
        assert_eq!(n("s", None), ("projects/p/secrets/s".into(), "latest".into()));
        assert_eq!(
            n("projects/123/secrets/s", None),
            ("projects/123/secrets/s".into(), "latest".into())
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", None),
            ("projects/123/secrets/s".into(), "4".into())
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", Some("2")),
            ("projects/123/secrets/s".into(), "2".into())
        );
        assert_eq!(
            n("projects/1/locations/eu/secrets/s", None),
            ("projects/1/locations/eu/secrets/s".into(), "latest".into())
        );
    }
}
