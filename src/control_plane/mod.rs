//! The control plane: where jobs come from and where their outcomes go.
//!
//! - `protocol`: wire types of protocol v1, shared by client and server.
//! - `operator`: the operator API's types (`access ...` commands).
//! - `client`: the HTTP client (remote mode, and the CLI's operator commands).
//! - `embedded`: the in-process control plane (SQLite `store`, job queue and leases, scheduler);
//!   its `access` module holds the access lifecycle (TTL, overlap, cleanup, pinning).
//! - `server`: the axum routes serving `embedded` over HTTP (agent protocol + operator API).
//!
//! **Architecture invariant:** nothing here knows Rancher or any secret store; jobs carry the
//! integration and its params as data.

pub mod client;
pub mod data_dir;
pub mod embedded;
pub mod operator;
pub mod operator_token;
pub mod protocol;
pub mod server;
mod store;

use async_trait::async_trait;
use serde_json::Value;

use protocol::{
    CompleteRequest, Job, LeaseRequest, ReleaseRequest, RenewRequest, RenewResponse, SessionHello, SessionInfo,
};

/// What the agent needs from a control plane: the embedded one in-process, or a remote one over
/// HTTPS. Both answer the same way, so the agent cannot tell them apart.
#[async_trait]
pub trait ControlPlane: Send + Sync {
    async fn hello(&self, hello: &SessionHello) -> Result<SessionInfo, ControlPlaneError>;
    /// Long-poll for up to `max_jobs` jobs. Each job is raw JSON: see `protocol::LeaseResponse`.
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Value>, ControlPlaneError>;
    /// Extends a lease. `LeaseLost` when the job was handed to someone else.
    async fn renew(&self, job_id: &str, request: &RenewRequest) -> Result<RenewResponse, ControlPlaneError>;
    /// Reports the outcome. Idempotent on `(job_id, lease_token)`. `LeaseLost` when the lease
    /// ran out and the job was handed out again.
    async fn complete(&self, job_id: &str, request: &CompleteRequest) -> Result<(), ControlPlaneError>;
    /// Uploads a batch of discovered objects for a discovery job before it completes.
    async fn upload_resources(&self, job: &Job, batch: &[Value]) -> Result<(), ControlPlaneError>;
    /// Gives a leased job back without an outcome (shutdown), so it can be handed out again at
    /// once. `LeaseLost` when the lease was already lost.
    async fn release(&self, job_id: &str, request: &ReleaseRequest) -> Result<(), ControlPlaneError>;
}

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// 401/403: the token was refused. Stop leasing, say so, retry slowly.
    #[error("the control plane refused the token ({message}): check APONO_TOKEN and APONO_CONNECTOR_ID")]
    Unauthorized { message: String },
    /// 409 on renew or complete: the lease ran out and the job belongs to someone else now.
    #[error("lease on job {job_id} was lost: the job was handed out again")]
    LeaseLost { job_id: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    /// Another 4xx: the request was wrong; retrying it as is cannot help.
    #[error("the control plane rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// Transport errors and 5xx: retry with backoff.
    #[error("the control plane is unavailable: {message}")]
    Unavailable { message: String },
    #[error("unexpected answer from the control plane: {message}")]
    Protocol { message: String },
    /// The embedded control plane's state could not be read or written.
    #[error("control-plane state error: {message}")]
    Store { message: String },
    /// Another process holds the data dir's lock (the CLI exits 3 on it).
    #[error("{message}")]
    InUse { message: String },
}

impl ControlPlaneError {
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ControlPlaneError::Unavailable { .. } | ControlPlaneError::Store { .. }
        )
    }

    /// HTTP status the embedded server answers with for this error.
    pub fn status(&self) -> u16 {
        match self {
            ControlPlaneError::Unauthorized { .. } => 401,
            ControlPlaneError::LeaseLost { .. } | ControlPlaneError::InUse { .. } => 409,
            ControlPlaneError::NotFound { .. } => 404,
            ControlPlaneError::Rejected { status, .. } => *status,
            ControlPlaneError::Unavailable { .. } => 503,
            ControlPlaneError::Protocol { .. } | ControlPlaneError::Store { .. } => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ControlPlaneError::Unauthorized { .. } => "unauthorized",
            ControlPlaneError::LeaseLost { .. } => "lease_lost",
            ControlPlaneError::NotFound { .. } => "not_found",
            ControlPlaneError::Rejected { .. } => "bad_request",
            ControlPlaneError::Unavailable { .. } => "unavailable",
            ControlPlaneError::Protocol { .. } => "protocol_error",
            ControlPlaneError::Store { .. } => "store_error",
            ControlPlaneError::InUse { .. } => "in_use",
        }
    }
}
