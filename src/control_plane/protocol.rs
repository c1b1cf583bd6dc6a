//! Control-plane protocol v1: the wire types shared by the agent's HTTP client, the embedded
//! server and the in-process control plane. `docs/protocol.md` is the prose version of this file.
//!
//! A leased job is kept loosely typed (`kind`, `integration`, `params` are raw JSON): a job that
//! does not parse must still be *completed as failed* with a clear error, which needs its id and
//! lease token. The agent's executor turns the raw parts into a typed operation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Path prefix of every agent-facing endpoint.
pub const API_PREFIX: &str = "/connector/v1";

/// Longest long-poll the server honours, in seconds.
pub const MAX_WAIT_SECONDS: u32 = 30;

/// What a job asks the agent to do. `as_str` is the wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Validate,
    Discover,
    Grant,
    Revoke,
    RotateCredentials,
    DeleteUser,
    /// Remove the connector's own bindings whose marked expiry has passed.
    Sweep,
}

impl JobKind {
    pub const ALL: [JobKind; 7] = [
        JobKind::Validate,
        JobKind::Discover,
        JobKind::Grant,
        JobKind::Revoke,
        JobKind::RotateCredentials,
        JobKind::DeleteUser,
        JobKind::Sweep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Validate => "validate",
            JobKind::Discover => "discover",
            JobKind::Grant => "grant",
            JobKind::Revoke => "revoke",
            JobKind::RotateCredentials => "rotate_credentials",
            JobKind::DeleteUser => "delete_user",
            JobKind::Sweep => "sweep",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /connector/v1/connectors/{id}/sessions`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionHello {
    pub version: String,
    pub hostname: String,
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capabilities {
    pub integration_types: Vec<String>,
    pub secret_store_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    /// How long a lease lasts; the agent renews well before it runs out.
    pub lease_seconds: u64,
}

/// `POST /connector/v1/connectors/{id}/jobs:lease`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub max_jobs: u32,
    /// Long-poll: answer as soon as a job is ready, or empty after this many seconds (≤ 30).
    pub wait_seconds: u32,
}

/// Jobs stay raw JSON here so that one malformed job cannot hide the others in the same answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub jobs: Vec<Value>,
}

/// A leased job. Only the envelope (`id`, `lease_token`, ...) must parse for the agent to be able
/// to report on it; `kind`, `integration` and `params` are checked by the executor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default = "one")]
    pub attempt: u32,
    pub lease_token: String,
    pub lease_expires_at: DateTime<Utc>,
    /// The lease's length from the hand-out, in seconds. The agent times renewals from when the
    /// answer arrived with this, on its own monotonic clock, so a control plane whose clock is
    /// off does not make it renew late; absent (older control planes): `lease_expires_at - now`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
    /// `{id?, type, name, config, secret_store}`; see `integrations::IntegrationSpec`.
    #[serde(default)]
    pub integration: Value,
    #[serde(default)]
    pub params: Value,
}

fn one() -> u32 {
    1
}

/// The code of a job the agent cannot run as sent (see [`Job::from_leased`]).
pub const MALFORMED_JOB: &str = "malformed_job";

/// A leased job whose fields do not parse. With `job` (its id and lease token parsed), it is
/// completed as failed [`MALFORMED_JOB`] at once: dropping it would only have the control plane
/// hand it out again when the lease runs out, forever (security review N8). Without one there is
/// nothing to report to.
#[derive(Debug)]
pub struct MalformedJob {
    /// The envelope, to complete the job with; `kind`, `integration` and `params` are empty.
    pub job: Option<Box<Job>>,
    /// What does not parse (serde's words: the field and the type it wanted).
    pub message: String,
}

impl MalformedJob {
    /// The completion that reports it: failed, [`MALFORMED_JOB`], not retryable.
    pub fn completion(&self) -> Option<CompleteRequest> {
        self.job.as_ref().map(|job| CompleteRequest {
            lease_token: job.lease_token.clone(),
            outcome: Outcome::Failed,
            error: Some(JobError {
                code: MALFORMED_JOB.into(),
                message: format!(
                    "the job's fields do not parse, so it was not run: {}; the control plane must send kind as a \
                     string and attempt as a whole number (docs/protocol.md)",
                    self.message
                ),
                retryable: false,
            }),
            result: None,
        })
    }
}

/// The part of a job needed to report on it.
#[derive(Deserialize)]
struct Envelope {
    id: String,
    lease_token: String,
}

impl Job {
    /// Parses one job of a lease answer. A job whose id and lease token parse but whose other
    /// fields do not (a `kind` that is not a string, an `attempt` that is not a number) is a
    /// [`MalformedJob`] carrying its envelope, so the agent can complete it as failed.
    ///
    /// # Errors
    /// [`MalformedJob`], with `job` set when the id and lease token parsed.
    pub fn from_leased(raw: Value) -> Result<Job, MalformedJob> {
        let error = match Job::deserialize(&raw) {
            Ok(job) => return Ok(job),
            Err(e) => e,
        };
        // serde's message names types and, for a wrong-typed string, its value: cut it short.
        let mut message: String = error.to_string().chars().take(300).collect();
        if message.len() < error.to_string().len() {
            message.push_str("...");
        }
        let job = Envelope::deserialize(&raw)
            .ok()
            .filter(|e| !e.id.trim().is_empty() && !e.lease_token.trim().is_empty())
            .map(|e| {
                Box::new(Job {
                    id: e.id,
                    kind: String::new(),
                    attempt: 1,
                    lease_token: e.lease_token,
                    lease_expires_at: raw
                        .get("lease_expires_at")
                        .and_then(|v| DateTime::<Utc>::deserialize(v).ok())
                        .unwrap_or_else(Utc::now),
                    lease_seconds: None,
                    integration: Value::Null,
                    params: Value::Null,
                })
            });
        Err(MalformedJob { job, message })
    }
}

/// `POST /connector/v1/jobs/{job_id}:renew`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    pub lease_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewResponse {
    pub lease_expires_at: DateTime<Utc>,
    /// The renewed lease's length from now, in seconds (see [`Job::lease_seconds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
}

/// `POST /connector/v1/jobs/{job_id}:release`: the agent gives a leased job back without an
/// outcome (it is shutting down), so another agent can take it at once instead of waiting out
/// the lease. 204; 409 when the lease was already lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub lease_token: String,
    /// Whether the agent had started working on the job (false: it was leased but never run, so
    /// the hand-out does not count as an attempt).
    #[serde(default)]
    pub started: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

/// A failure as reported to the control plane: a stable code, a message a person can act on,
/// and whether trying again later can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// `POST /connector/v1/jobs/{job_id}:complete`; idempotent on `(job_id, lease_token)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub lease_token: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// Error body of every non-2xx answer of the control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// Header carrying the lease token on `POST /connector/v1/jobs/{job_id}/resources` (NDJSON body).
pub const LEASE_TOKEN_HEADER: &str = "x-lease-token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_envelope_parses_without_payload() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "j1", "lease_token": "t", "lease_expires_at": "2026-01-01T00:00:00Z"
        }))
        .expect("envelope");
        assert_eq!(job.attempt, 1);
        assert!(job.kind.is_empty());
        assert!(job.params.is_null());
    }

    #[test]
    fn a_job_with_a_wrong_typed_field_keeps_its_envelope() {
        for (field, value) in [
            ("kind", serde_json::json!(42)),
            ("attempt", serde_json::json!("../../v3/users")),
            ("attempt", serde_json::json!({"a": 1})),
            ("lease_expires_at", serde_json::json!("yesterday")),
        ] {
            let mut raw = serde_json::json!({
                "id": "j1", "kind": "grant", "attempt": 1, "lease_token": "t",
                "lease_expires_at": "2026-01-01T00:00:00Z"
            });
            raw[field] = value;
            let bad = Job::from_leased(raw).expect_err(field);
            let job = bad.job.as_ref().expect("the envelope parsed");
            assert_eq!((job.id.as_str(), job.lease_token.as_str()), ("j1", "t"));
            let done = bad.completion().expect("a completion");
            let error = done.error.expect("an error");
            assert_eq!(
                (done.outcome, error.code.as_str(), error.retryable),
                (Outcome::Failed, MALFORMED_JOB, false)
            );
            assert!(error.message.contains("invalid"), "{field}: {}", error.message);
        }
        // No id: nothing to report to.
        let bad = Job::from_leased(serde_json::json!({"lease_token": "t", "kind": 1})).expect_err("no id");
        assert!(bad.job.is_none() && bad.completion().is_none());
    }

    #[test]
    fn job_kind_round_trips() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), Value::from(k.as_str()));
        }
    }
}
