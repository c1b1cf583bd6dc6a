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
    fn job_kind_round_trips() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), Value::from(k.as_str()));
        }
    }
}
