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
}

impl Executor {
    pub fn new(secrets: SecretStores, attempts: u32) -> Executor {
        Executor {
            secrets,
            connector_id: DEFAULT_CONNECTOR_ID.to_string(),
            attempts: attempts.max(1),
            backoff_base: Duration::from_millis(500),
            workers: None,
        }
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

        // 2-4. Resolve the secret, build the integration, run; retry what can be retried.
        let mut refreshed_secret = false;
        let mut attempt = 1;
        let uploaded = AtomicBool::new(false);
        // The cached read this attempt used: a refusal drops that copy only (secrets review N20).
        let secret_read = std::sync::atomic::AtomicU64::new(0);
        loop {
            let outcome = self.run_once(&spec, &operation, job, cp, &uploaded, &secret_read).await;
            let error = match outcome {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let worth_retrying = error.retryable || (error.code == "credentials_refused" && !refreshed_secret);
            if worth_retrying && uploaded.load(Ordering::Relaxed) {
                // Uploads belong to the lease: a rerun under this one would upload every object
                // twice. The control plane retries the job under a new lease, which starts over.
                if error.code == "credentials_refused" {
                    self.secrets
                        .invalidate_read(&spec.secret_store, secret_read.load(Ordering::Relaxed));
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
                    .invalidate_read(&spec.secret_store, secret_read.load(Ordering::Relaxed));
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
        operation: &Operation,
        job: &Job,
        cp: &dyn ControlPlane,
        uploaded: &AtomicBool,
        secret_read: &std::sync::atomic::AtomicU64,
    ) -> Result<Value, JobError> {
        let secret = self
            .secrets
            .fetch(&spec.secret_store)
            .await
            .map_err(|e| from_secret_error(&e))?;
        secret_read.store(secret.read_id(), Ordering::Relaxed);
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
            Operation::Discover => return discover_and_upload(integration.as_ref(), job, cp, uploaded).await,
        };
        result.map_err(|e| from_integration_error(&e))
    }
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

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 1) <= Duration::from_millis(125));
        assert!(backoff(base, 4) >= Duration::from_millis(600));
        assert!(backoff(base, 40) <= Duration::from_secs(300));
    }
}
