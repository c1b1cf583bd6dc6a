//! The job executor: one job's path, top to bottom.
//!
//! parse the job → resolve its secret → build the integration → run the operation (retrying
//! retryable failures with backoff; on a refused key, re-reading the secret once) → an outcome.
//!
//! Every failure becomes a [`JobError`] with a stable code, a message a person can act on and a
//! retryable flag. No message carries a secret value: secrets stay inside `Secret`, and the
//! integration's errors are built to name objects, never credentials.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{AllowedHost, Config};
use crate::control_plane::ControlPlane;
use crate::control_plane::protocol::{Job, JobError, JobKind};
use crate::integrations::{
    self, DeleteUserRequest, DiscoveredObject, GrantRequest, Integration, IntegrationError, IntegrationSpec, Owner,
    RevokeRequest, RotateRequest, SweepRequest,
};
use crate::secrets::{SecretError, SecretStores};

/// Discovered objects are uploaded to the control plane in batches of this many.
const UPLOAD_BATCH: usize = 500;

/// The connector id of an executor not told one (the config's default).
const DEFAULT_CONNECTOR_ID: &str = "standalone";

/// A job's operation, parsed and typed. Invalid jobs never get this far.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Validate,
    Discover,
    Grant(GrantRequest),
    Revoke(RevokeRequest),
    RotateCredentials(RotateRequest),
    DeleteUser(DeleteUserRequest),
    Sweep(SweepRequest),
}

impl Operation {
    /// Parses a job's kind and params.
    ///
    /// # Errors
    /// `malformed_job` naming the kind and what is wrong with the params.
    pub fn parse(kind: &str, params: &Value) -> Result<Operation, JobError> {
        let kind = JobKind::parse(kind).ok_or_else(|| {
            let known: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
            malformed(format!(
                "unknown job kind {kind:?}; this agent runs: {}",
                known.join(", ")
            ))
        })?;
        fn params_of<T: serde::de::DeserializeOwned>(kind: JobKind, params: &Value) -> Result<T, JobError> {
            serde_json::from_value(params.clone()).map_err(|e| malformed(format!("{kind} job has invalid params: {e}")))
        }
        Ok(match kind {
            JobKind::Validate => Operation::Validate,
            JobKind::Discover => Operation::Discover,
            JobKind::Grant => Operation::Grant(params_of(kind, params)?),
            JobKind::Revoke => Operation::Revoke(params_of(kind, params)?),
            JobKind::RotateCredentials => Operation::RotateCredentials(params_of(kind, params)?),
            JobKind::DeleteUser => Operation::DeleteUser(params_of(kind, params)?),
            JobKind::Sweep => Operation::Sweep(params_of(kind, params)?),
        })
    }

    /// Fills in `connector_id` as the owner of a grant, revoke or sweep whose params carry none
    /// (a control plane that does not send it), so every binding the agent makes names its owner.
    ///
    /// # Errors
    /// `malformed_job` when `connector_id` cannot be an owner.
    pub fn with_default_owner(mut self, connector_id: &str) -> Result<Operation, JobError> {
        let slot = match &mut self {
            Operation::Grant(r) => &mut r.owner,
            Operation::Revoke(r) => &mut r.owner,
            Operation::Sweep(r) => &mut r.owner,
            _ => return Ok(self),
        };
        if slot.is_none() {
            let owner = Owner::parse(connector_id).map_err(|e| {
                malformed(format!(
                    "the job names no owner and this agent's connector id (APONO_CONNECTOR_ID) cannot be one: {e}"
                ))
            })?;
            *slot = Some(owner);
        }
        Ok(self)
    }
}

fn malformed(message: String) -> JobError {
    JobError {
        code: "malformed_job".into(),
        message,
        retryable: false,
    }
}

fn from_secret_error(e: &SecretError) -> JobError {
    JobError {
        code: e.code().into(),
        message: e.to_string(),
        retryable: e.retryable(),
    }
}

fn from_integration_error(e: &IntegrationError) -> JobError {
    JobError {
        code: e.code().into(),
        message: e.to_string(),
        retryable: e.retryable(),
    }
}

fn host_not_allowed(message: String) -> JobError {
    JobError {
        code: "host_not_allowed".into(),
        message,
        retryable: false,
    }
}

/// Where this agent may send an integration's key, whatever a job says (security review N1):
/// checked at the top of a job's path, before its secret is read or any connection is made.
///
/// - With an allow-list, a job's Rancher host must be on it; cleartext (`http://` to a host that
///   is not this machine) needs an `http://` entry. A custom CA is honoured: the host is named.
/// - Without one, jobs from the local configuration (standalone) go anywhere they name, and
///   jobs from a remote control plane go to any host too, but over verified https only: they
///   cannot turn on `insecure_http` or a custom CA, as the local configuration names no host.
/// - Whatever the list, a secret with a `host` key is sent to that host only.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    allowed: Option<Vec<AllowedHost>>,
    /// Jobs come from this machine's own configuration (the embedded control plane).
    local_jobs: bool,
}

impl HostPolicy {
    /// Any host, as jobs say: one-shot commands, the demo, tests.
    pub fn open() -> HostPolicy {
        HostPolicy {
            allowed: None,
            local_jobs: true,
        }
    }

    /// From `agent.allowed_rancher_hosts`, with jobs local in standalone mode.
    pub fn from_config(config: &Config) -> HostPolicy {
        HostPolicy {
            allowed: config.allowed_rancher_hosts(),
            local_jobs: config.is_standalone(),
        }
    }

    /// `allowed`: the list (`None`: unset); `local_jobs`: jobs come from the local configuration.
    pub fn new(allowed: Option<Vec<AllowedHost>>, local_jobs: bool) -> HostPolicy {
        HostPolicy { allowed, local_jobs }
    }

    /// A remote control plane decides where keys go: say so (`run` logs it once at start and
    /// sets `apono_connector_rancher_hosts_unrestricted`).
    pub fn unrestricted(&self) -> bool {
        self.allowed.is_none() && !self.local_jobs
    }

    /// The job's Rancher origin when the job may use it.
    ///
    /// # Errors
    /// `host_not_allowed`, naming the host and the setting that would allow it.
    pub fn check(&self, spec: &IntegrationSpec) -> Result<Option<url::Url>, JobError> {
        if spec.kind != integrations::rancher::TYPE {
            return Ok(None);
        }
        // Validated already; should it not parse here, the job stops (fail closed), before its secret.
        let config =
            integrations::rancher::RancherConfig::from_value(&spec.config).map_err(|e| from_integration_error(&e))?;
        let origin = config.base_url;
        let shown = shown_origin(&origin);
        let cleartext = origin.scheme() == "http" && !is_loopback(&origin);
        let setting = "agent.allowed_rancher_hosts (APONO_ALLOWED_RANCHER_HOSTS)";
        match &self.allowed {
            Some(list) => {
                let Some(entry) = list.iter().find(|h| h.matches(&origin)) else {
                    return Err(host_not_allowed(format!(
                        "Rancher host {shown} is not on this agent's {setting}; no secret was read. \
                         Add it there if this agent should send keys to it"
                    )));
                };
                if cleartext && !entry.cleartext {
                    return Err(host_not_allowed(format!(
                        "Rancher host {shown} is allowed over https only ({setting} has {entry}); \
                         list it as http://{}:{} to allow cleartext",
                        entry.host, entry.port
                    )));
                }
            }
            None if !self.local_jobs => {
                let asks = if cleartext {
                    Some("cleartext http (insecure_http)")
                } else if config.certificate_authority.is_some() {
                    Some("a custom certificate authority")
                } else {
                    None
                };
                if let Some(asks) = asks {
                    return Err(host_not_allowed(format!(
                        "the job asks for {asks} to Rancher host {shown}, which this agent's configuration \
                         does not name; no secret was read. Add the host to {setting} to allow it"
                    )));
                }
            }
            None => {}
        }
        Ok(Some(origin))
    }
}

/// A secret that carries a `host` key is this host's only (optional pinning): any other host
/// fails `host_not_allowed` before the key is used.
fn check_secret_host(secret: &crate::secrets::Secret, origin: &url::Url) -> Result<(), JobError> {
    use secrecy::ExposeSecret;
    let Some(pinned) = secret.get("host") else {
        return Ok(());
    };
    let pinned = pinned.expose_secret();
    match AllowedHost::parse(pinned) {
        Ok(host) if host.matches(origin) => Ok(()),
        Ok(host) => Err(host_not_allowed(format!(
            "the secret is for Rancher host {}:{} (its \"host\" key), not {}; its key was not sent",
            host.host,
            host.port,
            shown_origin(origin)
        ))),
        Err(e) => Err(host_not_allowed(format!(
            "the secret's \"host\" key is not a host[:port] ({e}); its key was not sent"
        ))),
    }
}

/// `host:port` of a Rancher origin, with control characters escaped (it may come from a job).
fn shown_origin(origin: &url::Url) -> String {
    let host = origin.host_str().unwrap_or("?");
    let port = origin.port_or_known_default().unwrap_or(0);
    format!("{}://{host}:{port}", origin.scheme())
        .escape_debug()
        .to_string()
}

/// `localhost`, `127.0.0.0/8` or `::1`: cleartext to it never leaves the machine.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Runs jobs. Holds only what every job shares: the secret stores, the retry policy and the
/// connector id.
pub struct Executor {
    secrets: SecretStores,
    /// The owner of jobs that name none (see [`Operation::with_default_owner`]).
    connector_id: String,
    /// Attempts for retryable failures within one lease.
    attempts: u32,
    /// First backoff; doubles per attempt, with jitter.
    backoff_base: Duration,
    /// The workers: each request to an integration's server holds one while in flight (see
    /// [`Executor::with_workers`]). None: requests are bounded per endpoint only.
    workers: Option<Arc<Semaphore>>,
    /// Where keys may go ([`HostPolicy`]).
    hosts: HostPolicy,
}

impl Executor {
    pub fn new(secrets: SecretStores, attempts: u32) -> Executor {
        Executor {
            secrets,
            connector_id: DEFAULT_CONNECTOR_ID.to_string(),
            attempts: attempts.max(1),
            backoff_base: Duration::from_millis(500),
            workers: None,
            hosts: HostPolicy::open(),
        }
    }

    /// Where jobs may send keys (default: [`HostPolicy::open`]).
    pub fn with_host_policy(mut self, hosts: HostPolicy) -> Executor {
        self.hosts = hosts;
        self
    }

    pub fn host_policy(&self) -> &HostPolicy {
        &self.hosts
    }

    /// `n` workers: at most `n` requests to integrations in flight at once, whatever the number
    /// of jobs in progress. A job waiting between requests (a binding settling, a delete being
    /// proved) holds no worker, so it does not stop other jobs.
    pub fn with_workers(mut self, n: usize) -> Executor {
        self.workers = Some(Arc::new(Semaphore::new(n.max(1))));
        self
    }

    /// The connector id (`control_plane.connector_id`): the owner of jobs that name none.
    pub fn with_connector_id(mut self, connector_id: &str) -> Executor {
        self.connector_id = connector_id.trim().to_string();
        self
    }

    /// Shorter backoff, for tests and the demo.
    pub fn with_backoff_base(mut self, base: Duration) -> Executor {
        self.backoff_base = base;
        self
    }

    pub fn secrets(&self) -> &SecretStores {
        &self.secrets
    }

    /// Runs one leased job to a result or an error. `cancel` aborts it (lease lost, or the
    /// shutdown grace ran out); the caller then reports nothing and the lease runs out.
    pub async fn execute(
        &self,
        job: &Job,
        cp: &dyn ControlPlane,
        cancel: &CancellationToken,
    ) -> Result<Value, JobError> {
        // 1. Parse: an invalid job fails at once, for good.
        let spec: IntegrationSpec = serde_json::from_value(job.integration.clone())
            .map_err(|e| malformed(format!("job's integration is invalid: {e}")))?;
        let operation = Operation::parse(&job.kind, &job.params)?.with_default_owner(&self.connector_id)?;
        integrations::validate_spec(&spec).map_err(|e| from_integration_error(&e))?;
        // Before the secret is read or any connection made (security review N1).
        let origin = self.hosts.check(&spec)?;

        // 2-4. Resolve the secret, build the integration, run; retry what can be retried.
        let mut refreshed_secret = false;
        let mut attempt = 1;
        let tried = Tried::default();
        loop {
            let outcome = self.run_once(&spec, origin.as_ref(), &operation, job, cp, &tried).await;
            let error = match outcome {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let worth_retrying = error.retryable || (error.code == "credentials_refused" && !refreshed_secret);
            if worth_retrying && tried.uploaded.load(Ordering::Relaxed) {
                // Uploads belong to the lease: a rerun under this one would upload every object
                // twice. The control plane retries the job under a new lease, which starts over.
                if error.code == "credentials_refused" {
                    self.secrets
                        .invalidate_read(&spec.secret_store, tried.secret_read.load(Ordering::Relaxed));
                }
                return Err(JobError {
                    retryable: true,
                    ..error
                });
            }
            if error.code == "credentials_refused" && !refreshed_secret {
                // The key may have been rotated: drop any cached copy and read it again, once.
                tracing::warn!(
                    store = spec.secret_store.store_type(),
                    "integration refused the credentials; re-reading the secret"
                );
                self.secrets
                    .invalidate_read(&spec.secret_store, tried.secret_read.load(Ordering::Relaxed));
                refreshed_secret = true;
                continue;
            }
            if !error.retryable || attempt >= self.attempts {
                return Err(error);
            }
            let delay = backoff(self.backoff_base, attempt);
            tracing::info!(code = %error.code, attempt, delay_ms = delay.as_millis() as u64, "retryable failure; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return Err(error),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    async fn run_once(
        &self,
        spec: &IntegrationSpec,
        origin: Option<&url::Url>,
        operation: &Operation,
        job: &Job,
        cp: &dyn ControlPlane,
        tried: &Tried,
    ) -> Result<Value, JobError> {
        let secret = self
            .secrets
            .fetch(&spec.secret_store)
            .await
            .map_err(|e| from_secret_error(&e))?;
        tried.secret_read.store(secret.read_id(), Ordering::Relaxed);
        if let Some(origin) = origin {
            check_secret_host(&secret, origin)?;
        }
        let integration =
            integrations::build_with(spec, &secret, self.workers.clone()).map_err(|e| from_integration_error(&e))?;
        drop(secret);
        let result = match operation {
            Operation::Validate => {
                let validated = integration.validate().await;
                if let Ok(v) = &validated
                    && let Some(days) = v.details.get("expires_in_days").and_then(Value::as_f64)
                {
                    // Alert on this before the key runs out (a warning is also in the result).
                    crate::telemetry::metrics().api_key_expiry(&spec.name, days);
                }
                to_json(validated)
            }
            Operation::Grant(r) => to_json(integration.grant(r).await),
            Operation::Revoke(r) => to_json(integration.revoke(r).await),
            Operation::RotateCredentials(r) => to_json(integration.rotate_credentials(r).await),
            Operation::DeleteUser(r) => to_json(integration.delete_user(r).await),
            Operation::Sweep(r) => to_json(integration.sweep(r).await),
            Operation::Discover => return discover_and_upload(integration.as_ref(), job, cp, &tried.uploaded).await,
        };
        result.map_err(|e| from_integration_error(&e))
    }
}

/// What an attempt of a job leaves for the next one to decide on.
#[derive(Default)]
struct Tried {
    /// Some discovered objects were uploaded under this lease.
    uploaded: AtomicBool,
    /// The cached secret read the last attempt used: a refusal drops that copy only (secrets review N20).
    secret_read: std::sync::atomic::AtomicU64,
}

fn to_json<T: Serialize>(r: Result<T, IntegrationError>) -> Result<Value, IntegrationError> {
    let value = r?;
    serde_json::to_value(value).map_err(|e| IntegrationError::Protocol {
        message: format!("result does not serialize: {e}"),
    })
}

/// Streams discovery into batched uploads; the job's result is the summary.
///
/// The uploads belong to this job's lease: if the job fails after some batches, the control plane
/// discards them when it hands the job out again, and the next attempt uploads everything anew
/// (docs/protocol.md, the resources upload).
async fn discover_and_upload(
    integration: &dyn Integration,
    job: &Job,
    cp: &dyn ControlPlane,
    uploaded_any: &AtomicBool,
) -> Result<Value, JobError> {
    let (tx, mut rx) = mpsc::channel::<DiscoveredObject>(UPLOAD_BATCH * 2);
    let discovery = integration.discover(tx);
    // Owns the receiver, so a failed upload drops it and discovery stops at its next send
    // instead of waiting forever on a full channel.
    let upload = async move {
        let mut batch = Vec::with_capacity(UPLOAD_BATCH);
        let mut uploaded = 0u64;
        loop {
            let next = rx.recv().await;
            let done = next.is_none();
            if let Some(object) = next {
                batch.push(serde_json::to_value(&object).unwrap_or(Value::Null));
            }
            if batch.len() >= UPLOAD_BATCH || (done && !batch.is_empty()) {
                cp.upload_resources(job, &batch).await.map_err(|e| JobError {
                    code: "upload_failed".into(),
                    message: format!("uploading discovered objects failed: {e}"),
                    retryable: e.retryable(),
                })?;
                uploaded += batch.len() as u64;
                uploaded_any.store(true, Ordering::Relaxed);
                batch.clear();
            }
            if done {
                return Ok::<u64, JobError>(uploaded);
            }
        }
    };
    let (summary, uploaded) = tokio::join!(discovery, upload);
    let summary = summary.map_err(|e| from_integration_error(&e))?;
    let uploaded = uploaded?;
    let mut value = serde_json::to_value(summary).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("uploaded".into(), Value::from(uploaded));
    }
    Ok(value)
}

/// Exponential backoff from `base`, doubled per attempt, capped at 5 minutes, with ±25 % jitter
/// so that agents failing together do not retry together.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = Duration::from_secs(300);
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(cap);
    let jitter = rand::random_range(0.75..1.25);
    exp.mul_f64(jitter).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A job whose integration carries inline credentials of the wrong shape, or whose params
    /// carry an id that would change a Rancher URL, fails as `malformed_job` naming the field,
    /// never quoting the credential, and before any request.
    #[tokio::test]
    async fn hostile_jobs_fail_as_malformed_without_quoting_credentials() {
        const CANARY: &str = "CANARY-job-77e1";
        let executor = Executor::new(crate::secrets::SecretStores::empty(), 1);
        // Never called: the job fails while it is parsed.
        let cp = crate::control_plane::client::HttpControlPlane::new("http://127.0.0.1:1", "c", None).unwrap();
        let job = |integration: Value, kind: &str, params: Value| Job {
            id: "j-1".into(),
            kind: kind.into(),
            attempt: 1,
            lease_token: "t".into(),
            lease_expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            lease_seconds: None,
            integration,
            params,
        };
        let spec = |credentials: Value| {
            json!({"type": "rancher", "name": "r", "config": {"host": "https://127.0.0.1:1"},
                   "secret_store": {"type": "APONO", "credentials": credentials}})
        };
        let grant = json!({"user": "bob", "role": "cluster-member", "resource": "c-1"});
        for credentials in [json!(format!("token-a:{CANARY}")), json!({"secret_key": [CANARY]})] {
            let e = executor
                .execute(
                    &job(spec(credentials), "grant", grant.clone()),
                    &cp,
                    &CancellationToken::new(),
                )
                .await
                .unwrap_err();
            assert_eq!(e.code, "malformed_job");
            assert!(e.message.contains("credentials"), "{}", e.message);
            assert!(
                !format!("{} {e:?}", e.message).contains(CANARY),
                "canary leaked: {}",
                e.message
            );
        }
        let good = spec(json!({"token": "token-a:b"}));
        for (kind, params, field) in [
            (
                "grant",
                json!({"user": "bob", "role": "r", "resource": "c-x/../../users"}),
                "resource",
            ),
            (
                "grant",
                json!({"user": "bob", "role": "r", "resource": "c-x?userId=y"}),
                "resource",
            ),
            (
                "revoke",
                json!({"user": "bob", "role": "r", "resource": "c-1", "binding_ids": ["local%2F.."]}),
                "binding_ids",
            ),
            ("rotate_credentials", json!({"user_id": ".."}), "user_id"),
            ("delete_user", json!({"user_id": "u-x/../../clusters"}), "user_id"),
        ] {
            let e = executor
                .execute(&job(good.clone(), kind, params), &cp, &CancellationToken::new())
                .await
                .unwrap_err();
            assert_eq!(e.code, "malformed_job", "{kind}: {}", e.message);
            assert!(e.message.contains(field), "{kind}: {}", e.message);
        }
    }

    #[test]
    fn parse_rejects_unknown_kind_and_bad_params() {
        let e = Operation::parse("teleport", &json!({})).unwrap_err();
        assert_eq!(e.code, "malformed_job");
        assert!(!e.retryable);
        assert!(
            e.message.contains("teleport") && e.message.contains("grant"),
            "{}",
            e.message
        );
        let e = Operation::parse("grant", &json!({"user": "alice"})).unwrap_err();
        assert!(e.message.contains("grant job has invalid params"), "{}", e.message);
        let op = Operation::parse(
            "revoke",
            &json!({"user": "alice", "role": "cluster-member", "resource": "c-1"}),
        )
        .unwrap();
        assert!(matches!(op, Operation::Revoke(_)));
    }

    /// A control plane that sends no `owner` (an older or remote one): the agent names itself,
    /// so every binding it makes still names its owner; one it cannot name fails the job.
    #[tokio::test]
    async fn jobs_without_an_owner_get_the_connector_id() {
        let grant = json!({"user": "alice", "role": "cluster-member", "resource": "c-1"});
        let owner = |op: Operation| match op {
            Operation::Grant(r) => r.owner,
            Operation::Revoke(r) => r.owner,
            Operation::Sweep(r) => r.owner,
            _ => None,
        };
        let prod = Some(Owner::parse("prod-eu").unwrap());
        for (kind, params) in [
            ("grant", grant.clone()),
            ("revoke", grant.clone()),
            ("sweep", json!({})),
        ] {
            let op = Operation::parse(kind, &params)
                .unwrap()
                .with_default_owner("prod-eu")
                .unwrap();
            assert_eq!(owner(op), prod, "{kind}");
        }
        let mut given = grant.clone();
        given["owner"] = json!("standalone/0193c5d2");
        let op = Operation::parse("grant", &given)
            .unwrap()
            .with_default_owner("prod-eu")
            .unwrap();
        assert_eq!(
            owner(op).unwrap().as_str(),
            "standalone/0193c5d2",
            "a given owner is kept"
        );
        let e = Operation::parse("revoke", &grant)
            .unwrap()
            .with_default_owner("prod eu")
            .unwrap_err();
        assert_eq!(e.code, "malformed_job");
        assert!(e.message.contains("APONO_CONNECTOR_ID"), "{}", e.message);
        assert!(
            Operation::parse("validate", &json!({}))
                .unwrap()
                .with_default_owner("prod eu")
                .is_ok(),
            "only grants, revokes and sweeps name an owner"
        );

        // Through the executor: refused before any secret is read or request made.
        let executor = Executor::new(crate::secrets::SecretStores::empty(), 1).with_connector_id("prod eu");
        let cp = crate::control_plane::client::HttpControlPlane::new("http://127.0.0.1:1", "c", None).unwrap();
        let job = Job {
            id: "j-1".into(),
            kind: "grant".into(),
            attempt: 1,
            lease_token: "t".into(),
            lease_expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            lease_seconds: None,
            integration: json!({"type": "rancher", "name": "r", "config": {"host": "https://127.0.0.1:1"},
                                "secret_store": {"type": "APONO", "credentials": {"token": "token-a:b"}}}),
            params: grant,
        };
        let e = executor
            .execute(&job, &cp, &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(e.code, "malformed_job", "{}", e.message);
    }

    fn rancher(config: Value) -> IntegrationSpec {
        serde_json::from_value(json!({"type": "rancher", "name": "r", "config": config,
            "secret_store": {"type": "APONO", "credentials": {"token": "token-a:b"}}}))
        .unwrap()
    }

    /// The allow-list's rules: the host and port must be listed, cleartext needs an `http://`
    /// entry, and without a list a remote job cannot turn on cleartext or a custom CA.
    #[test]
    fn the_host_policy_decides_where_keys_may_go() {
        let list = |entries: &[&str]| Some(entries.iter().map(|e| AllowedHost::parse(e).unwrap()).collect());
        let code = |p: &HostPolicy, config: Value| p.check(&rancher(config)).err().map(|e| (e.code, e.message));
        let listed = HostPolicy::new(
            list(&["Rancher.Example.com.", "10.0.0.5:8443", "http://rancher.lan:8080"]),
            false,
        );
        for ok in [
            json!({"host": "rancher.example.com"}),
            json!({"host": "https://RANCHER.example.com:443"}),
            json!({"host": "10.0.0.5", "port": 8443}),
            json!({"host": "http://rancher.lan:8080", "insecure_http": true}),
        ] {
            assert_eq!(code(&listed, ok.clone()), None, "{ok}");
        }
        for (bad, needle) in [
            (json!({"host": "evil.example"}), "evil.example:443"),
            (json!({"host": "rancher.example.com:8443"}), "rancher.example.com:8443"),
            (json!({"host": "10.0.0.5"}), "10.0.0.5:443"),
            (
                json!({"host": "http://rancher.example.com:443", "insecure_http": true}),
                "https only",
            ),
        ] {
            let (code, message) = code(&listed, bad.clone()).expect("refused");
            assert_eq!(code, "host_not_allowed", "{bad}");
            assert!(
                message.contains(needle) && message.contains("APONO_ALLOWED_RANCHER_HOSTS"),
                "{message}"
            );
        }
        let e = listed.check(&rancher(json!({"host": "evil.example"}))).unwrap_err();
        assert!(!e.retryable);

        // No list, remote jobs: any host over verified https, nothing weaker.
        let remote = HostPolicy::new(None, false);
        assert!(remote.unrestricted());
        assert_eq!(code(&remote, json!({"host": "anything.example"})), None);
        assert_eq!(
            code(&remote, json!({"host": "http://127.0.0.1:9"})),
            None,
            "loopback http"
        );
        let ca = rcgen::generate_simple_self_signed(vec!["evil.example".into()])
            .unwrap()
            .cert
            .pem();
        for (asks, needle) in [
            (
                json!({"host": "http://rancher.evil.example", "insecure_http": true}),
                "insecure_http",
            ),
            (
                json!({"host": "rancher.example.com", "certificate_authority": ca}),
                "certificate authority",
            ),
        ] {
            let (code, message) = code(&remote, asks.clone()).expect("refused");
            assert_eq!(code, "host_not_allowed", "{asks}: {message}");
            assert!(message.contains(needle), "{message}");
        }
        // On the list, the named host may have its private CA.
        assert_eq!(
            code(
                &listed,
                json!({"host": "rancher.example.com", "certificate_authority": ca})
            ),
            None
        );
        // Standalone without a list: the integrations are the operator's own.
        let local = HostPolicy::new(None, true);
        assert!(!local.unrestricted() && !HostPolicy::new(list(&["a"]), false).unrestricted());
        assert_eq!(
            code(&local, json!({"host": "http://rancher.lan", "insecure_http": true})),
            None
        );
    }

    #[test]
    fn a_secret_with_a_host_key_goes_to_that_host_only() {
        let origin = url::Url::parse("https://rancher.example.com:443").unwrap();
        let secret = |host: &str| {
            crate::secrets::Secret::new(
                [("token", "token-a:CANARY-pin"), ("host", host)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), secrecy::SecretString::from(v.to_string())))
                    .collect(),
            )
        };
        assert!(check_secret_host(&secret("rancher.example.com"), &origin).is_ok());
        assert!(check_secret_host(&secret("https://rancher.example.com:443"), &origin).is_ok());
        for other in ["evil.example", "rancher.example.com:8443", "not a host"] {
            let e = check_secret_host(&secret(other), &origin).unwrap_err();
            assert_eq!(e.code, "host_not_allowed", "{other}");
            assert!(!e.message.contains("CANARY"), "{}", e.message);
        }
        let unpinned = crate::secrets::Secret::default();
        assert!(check_secret_host(&unpinned, &origin).is_ok());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 1) <= Duration::from_millis(125));
        assert!(backoff(base, 4) >= Duration::from_millis(600));
        assert!(backoff(base, 40) <= Duration::from_secs(300));
    }
}
