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
//! A regional secret (a `location`, or a name with `/locations/L/`) is read at its region's
//! endpoint, `secretmanager.L.rep.googleapis.com`: Google serves it nowhere else. One client per
//! endpoint, built on first use and shared by every job (issue 18).
//!
//! The client's own retries are capped (K2): its default (10 attempts within 60 s per request,
//! backoff from 1 s, no per-attempt limit) stacks under the agent's retries and runs into the
//! registry's 60 s limit, which hides the real cause. Here a request gets [`ATTEMPTS`] tries of at
//! most [`DEFAULT_ATTEMPT_TIMEOUT`] each, a whole read (token included) three times that, and the
//! error names what happened.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_secretmanager_v1::client::SecretManagerService;
use tokio::sync::Mutex;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Reads Google Secret Manager.
pub struct GcpStore {
    /// By endpoint (None: Google's global one).
    clients: Mutex<HashMap<Option<String>, SecretManagerService>>,
    /// Clients built so far.
    built: AtomicUsize,
    /// Endpoint and credentials overrides (tests, a private endpoint); `None` means Google's
    /// endpoints (global, or the secret's region) and ADC. An override serves every location.
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
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
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
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
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

    /// How many Secret Manager clients this store has built: one per endpoint.
    pub fn clients_built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// The endpoint for a secret in `location` (None: a global secret): the override, else
    /// Google's regional endpoint, else None for the client's default (global) one.
    fn endpoint_for(&self, location: Option<&str>) -> Option<String> {
        match (&self.endpoint, location) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(l)) => Some(format!("https://secretmanager.{l}.rep.googleapis.com")),
            (None, None) => None,
        }
    }

    async fn client(&self, endpoint: Option<String>) -> Result<SecretManagerService, SecretError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&endpoint) {
            return Ok(c.clone());
        }
        let client = async {
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
            if let Some(e) = &endpoint {
                builder = builder.with_endpoint(e.clone());
            }
            if let Some(c) = &self.credentials {
                builder = builder.with_credentials(c.clone());
            }
            builder.build().await.map_err(|e| SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("cannot build a Secret Manager client (Application Default Credentials?): {e}"),
            })
        }
        .await?;
        self.built.fetch_add(1, Ordering::Relaxed);
        clients.insert(endpoint, client.clone());
        Ok(client)
    }

    /// The host requests for `location` go to, for error messages.
    fn host(&self, location: Option<&str>) -> String {
        self.endpoint_for(location)
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

    fn map_error(
        &self,
        reference: &SecretRef,
        location: Option<&str>,
        action: &str,
        err: google_cloud_gax::error::Error,
    ) -> SecretError {
        map_error(reference, action, &self.host(location), self.attempt_timeout, err)
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
                hint: format!(
                    "cannot get a Google access token now: {}",
                    once_each(&crate::error_chain(err))
                ),
            };
        }
        return SecretError::NotPermitted {
            reference: describe,
            hint: format!(
                "Google refused or lacks the connector's credentials (Application Default Credentials): {}",
                once_each(&crate::error_chain(err))
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

/// `text` with google-cloud-auth's retry verdicts ("but future attempts may succeed", "and
/// future attempts will not succeed") said once: every layer of its error chain adds its own,
/// and our error says whether a retry helps anyway.
fn once_each(text: &str) -> String {
    let mut out = text.to_string();
    for verdict in [
        " but future attempts may succeed",
        " and future attempts will not succeed",
    ] {
        if let Some(first) = out.find(verdict) {
            let keep = first + verdict.len();
            let rest = out[keep..].replace(verdict, "");
            out.truncate(keep);
            out.push_str(&rest);
        }
    }
    out
}

/// A secret to read: its resource name, the version, and its region (None: a global secret).
#[derive(Debug, PartialEq)]
struct Target {
    name: String,
    version: String,
    location: Option<String>,
}

/// The secret's resource name, version and location: `secret_id` as a short id in `project`
/// (regional when `location` is given), or a full resource name (its `/versions/V` suffix, when
/// present, is the default version; its `/locations/L/` is the location).
fn resource_name(
    project: &str,
    secret_id: &str,
    version: Option<&str>,
    location: Option<&str>,
) -> Result<Target, String> {
    let secret_id = secret_id.trim().trim_start_matches('/');
    let location = location.map(str::trim).filter(|l| !l.is_empty());
    // Checked before it goes into a name or a host name.
    let is_location = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if let Some(l) = location.filter(|l| !is_location(l)) {
        return Err(format!(
            "location {l:?} is not a Google Cloud location (such as europe-west1): lowercase letters, digits and dashes"
        ));
    }
    let (name, named_version) = if secret_id.starts_with("projects/") {
        match secret_id.split_once("/versions/") {
            Some((name, v)) => (name.to_string(), Some(v)),
            None => (secret_id.to_string(), None),
        }
    } else {
        match location {
            Some(l) => (
                format!("projects/{}/locations/{l}/secrets/{secret_id}", project.trim()),
                None,
            ),
            None => (format!("projects/{}/secrets/{secret_id}", project.trim()), None),
        }
    };
    let named_location = name.split('/').collect::<Vec<_>>().windows(2).find_map(|w| match w {
        ["locations", l] => Some(l.to_string()),
        _ => None,
    });
    let location = match (named_location, location) {
        (Some(named), Some(given)) if named != given => {
            return Err(format!(
                "secret_id names location {named:?} but location is {given:?}: give one of them"
            ));
        }
        (Some(named), _) => Some(named),
        (None, Some(given)) => Some(given.to_string()),
        (None, None) => None,
    };
    if let Some(l) = location.as_deref().filter(|l| !is_location(l)) {
        return Err(format!(
            "location {l:?} is not a Google Cloud location (such as europe-west1): lowercase letters, digits and dashes"
        ));
    }
    let version = version.or(named_version).unwrap_or("latest").trim().to_string();
    Ok(Target {
        name,
        version,
        location,
    })
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
        let location = match reference {
            SecretRef::Gcp {
                project,
                secret_id,
                version,
                location,
            } => resource_name(project, secret_id, version.as_deref(), location.as_deref())
                .ok()
                .and_then(|t| t.location),
            _ => None,
        };
        match tokio::time::timeout(deadline, self.read(reference)).await {
            Ok(result) => result,
            Err(_) => Err(SecretError::Unreachable {
                reference: reference.describe(),
                hint: format!(
                    "no answer within {} s from Secret Manager at {} or from the Google token source (metadata \
                     server or token endpoint of the Application Default Credentials)",
                    deadline.as_secs_f64(),
                    self.host(location.as_deref())
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
            location,
        } = reference
        else {
            return Err(wrong_store(reference, "GCP"));
        };
        let Target {
            name,
            version,
            location,
        } = resource_name(project, secret_id, version.as_deref(), location.as_deref()).map_err(|e| {
            SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("{}: {e}", reference.describe()),
            }
        })?;
        let location = location.as_deref();
        let client = self.client(self.endpoint_for(location)).await?;
        if self.require_mark {
            let meta = client
                .get_secret()
                .set_name(&name)
                .send()
                .await
                .map_err(|e| self.map_error(reference, location, "secretmanager.secrets.get", e))?;
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
            .map_err(|e| self.map_error(reference, location, "secretmanager.versions.access", e))?;
        match out.payload {
            // The payload's own buffer, not a copy, when nothing else holds it (`from_bytes`
            // zeroes it once parsed).
            Some(payload) => value::from_bytes(reference, Vec::from(payload.data)),
            None => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret version has no payload".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{GcpStore, Target, resource_name};

    fn target(name: &str, version: &str, location: Option<&str>) -> Target {
        Target {
            name: name.into(),
            version: version.into(),
            location: location.map(str::to_string),
        }
    }

    #[test]
    fn secret_id_may_be_a_full_resource_name() {
        let n = |id, v| resource_name("p", id, v, None).unwrap();
        assert_eq!(n("s", None), target("projects/p/secrets/s", "latest", None));
        assert_eq!(
            n("projects/123/secrets/s", None),
            target("projects/123/secrets/s", "latest", None)
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", None),
            target("projects/123/secrets/s", "4", None)
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", Some("2")),
            target("projects/123/secrets/s", "2", None)
        );
        assert_eq!(
            n("projects/1/locations/eu/secrets/s", None),
            target("projects/1/locations/eu/secrets/s", "latest", Some("eu"))
        );
    }

    #[test]
    fn a_retry_verdict_is_said_once() {
        let chain = "cannot fetch token but future attempts may succeed: metadata server down but future attempts may succeed: connection refused";
        assert_eq!(
            super::once_each(chain),
            "cannot fetch token but future attempts may succeed: metadata server down: connection refused"
        );
        assert_eq!(super::once_each("plain"), "plain");
    }

    /// Secrets review N14: a regional secret by `location` or by its name, read at Google's
    /// regional endpoint; a location that is not one (or contradicts the name) is refused.
    #[test]
    fn a_location_makes_a_regional_name_and_endpoint() {
        assert_eq!(
            resource_name("p", "s", Some("3"), Some(" europe-west1 ")).unwrap(),
            target("projects/p/locations/europe-west1/secrets/s", "3", Some("europe-west1"))
        );
        assert_eq!(
            resource_name("p", "projects/p/locations/us-east4/secrets/s", None, Some("us-east4")).unwrap(),
            target("projects/p/locations/us-east4/secrets/s", "latest", Some("us-east4"))
        );
        let e = resource_name(
            "p",
            "projects/p/locations/us-east4/secrets/s",
            None,
            Some("europe-west1"),
        )
        .unwrap_err();
        assert!(e.contains("us-east4") && e.contains("europe-west1"), "{e}");
        let e = resource_name("p", "s", None, Some("evil.example/x")).unwrap_err();
        assert!(e.contains("not a Google Cloud location"), "{e}");
        let store = GcpStore::new();
        assert_eq!(
            store.endpoint_for(Some("europe-west1")).as_deref(),
            Some("https://secretmanager.europe-west1.rep.googleapis.com")
        );
        assert_eq!(store.endpoint_for(None), None);
        assert_eq!(
            store.host(Some("me-central2")),
            "secretmanager.me-central2.rep.googleapis.com"
        );
        assert_eq!(store.host(None), "secretmanager.googleapis.com");
    }
}
