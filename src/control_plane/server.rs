//! HTTP server for the embedded control plane (axum): the agent protocol under `/connector/v1`
//! (bearer-token check when a token is configured) and the operator API under `/operator/v1`.
//!
//! Every non-2xx answer is an `ApiErrorBody` with the status of `ControlPlaneError::status()`.
//! Bodies are parsed by hand (not with axum's `Json` extractor) so that a bad body gets the same
//! error shape as every other failure: 400 for JSON that does not parse, 422 for JSON of the
//! wrong shape.
//!
//! Paths like `/jobs/{job_id}:renew` put a capture and a verb in one segment: the router captures
//! the whole segment (`{job}`) and splits it at its last `:`.

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::embedded::EmbeddedControlPlane;
use super::operator::{AccessRequestCreate, JobCreate, OPERATOR_PREFIX};
use super::protocol::{
    API_PREFIX, ApiError, ApiErrorBody, CompleteRequest, Job, LEASE_TOKEN_HEADER, LeaseRequest, LeaseResponse,
    ReleaseRequest, RenewRequest, SessionHello,
};
use super::{ControlPlane, ControlPlaneError};
use crate::integrations::IntegrationSpec;

/// Largest request body: a discovery upload of 500 objects fits many times over.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// How long `serve` waits for open requests after shutdown before it returns anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct AppState {
    cp: Arc<EmbeddedControlPlane>,
    /// SHA-256 of the expected token: compared in constant time, and the token itself is not kept
    /// in a second place.
    token_digest: Option<[u8; 32]>,
}

/// Cancelled when the server shuts down; long-polls answer (empty) at once. Set by [`serve`].
#[derive(Clone)]
struct ShutdownSignal(CancellationToken);

/// A failure as an HTTP answer.
struct ApiFailure(ControlPlaneError);

impl From<ControlPlaneError> for ApiFailure {
    fn from(e: ControlPlaneError) -> Self {
        ApiFailure(e)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = match &self.0 {
            ControlPlaneError::Rejected { message, .. }
            | ControlPlaneError::NotFound { message }
            | ControlPlaneError::Unauthorized { message } => message.clone(),
            other => other.to_string(),
        };
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self.0, "control-plane request failed");
        }
        let body = ApiErrorBody {
            error: ApiError {
                code: self.0.code().to_string(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

fn rejected(status: u16, message: String) -> ApiFailure {
    ApiFailure(ControlPlaneError::Rejected { status, message })
}

/// Parses a JSON body: 400 when it is not JSON, 422 when it is JSON of the wrong shape.
fn parse_body<T: DeserializeOwned>(body: &[u8], what: &str) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(rejected(
            400,
            format!("the request body is empty: expected a JSON {what}"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => rejected(422, format!("invalid {what}: {e}")),
            _ => rejected(
                400,
                format!("the request body is not valid JSON ({what} expected): {e}"),
            ),
        }
    })
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time comparison of two digests.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_token(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &state.token_digest else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiFailure(ControlPlaneError::Unauthorized {
            message: "missing \"Authorization: Bearer <token>\" header".into(),
        }));
    };
    if same_digest(expected, &digest(given)) {
        Ok(())
    } else {
        Err(ApiFailure(ControlPlaneError::Unauthorized {
            message: "the bearer token is not valid".into(),
        }))
    }
}

/// Splits `"{job_id}:{verb}"` at its last `:`.
fn split_action(segment: &str) -> Option<(&str, &str)> {
    segment
        .rsplit_once(':')
        .filter(|(id, verb)| !id.is_empty() && !verb.is_empty())
}

/// The routes: agent protocol (bearer check when `token` is `Some`) and operator API (no
/// authentication in v1: bind it to loopback).
pub fn router(cp: Arc<EmbeddedControlPlane>, token: Option<SecretString>) -> Router {
    let token_digest = token
        .as_ref()
        .map(|t| t.expose_secret().trim().to_string())
        .filter(|t| !t.is_empty())
        .map(|t| digest(&t));
    let state = AppState { cp, token_digest };
    let operator = Router::new()
        .route(
            &format!("{OPERATOR_PREFIX}/access-requests"),
            post(create_access).get(list_access),
        )
        .route(
            &format!("{OPERATOR_PREFIX}/access-requests/{{id}}"),
            get(get_access).post(access_action),
        )
        .route(
            &format!("{OPERATOR_PREFIX}/access-requests/{{id}}/revoke"),
            post(revoke_access),
        )
        .route(&format!("{OPERATOR_PREFIX}/jobs"), post(create_job).get(list_jobs))
        .route(&format!("{OPERATOR_PREFIX}/jobs/{{id}}"), get(get_job))
        .route(&format!("{OPERATOR_PREFIX}/jobs/{{id}}/resources"), get(job_resources))
        .route_layer(middleware::from_fn_with_state(state.clone(), operator_guard));
    Router::new()
        .route(&format!("{API_PREFIX}/connectors/{{id}}/sessions"), post(hello))
        .route(&format!("{API_PREFIX}/connectors/{{id}}/jobs:lease"), post(lease))
        .route(&format!("{API_PREFIX}/jobs/{{job}}"), post(job_action))
        .route(&format!("{API_PREFIX}/jobs/{{job}}/resources"), post(upload))
        .merge(operator)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The operator API grants access to whoever can reach it, and has no credentials of its own in
/// v1: it answers loopback callers, and others only when they carry the agent token (when one is
/// configured). Without peer information (the router used in-process) it answers.
async fn operator_guard(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if let Some(peer) = peer
        && !peer.ip().to_canonical().is_loopback()
    {
        let allowed = s.token_digest.is_some() && check_token(&s, request.headers()).is_ok();
        if !allowed {
            tracing::warn!(peer = %peer, "operator API call from a non-loopback address refused");
            return ApiFailure(ControlPlaneError::Unauthorized {
                message: "the operator API answers loopback callers only (or callers with the bearer token)".into(),
            })
            .into_response();
        }
    }
    next.run(request).await
}

async fn not_found() -> ApiFailure {
    ApiFailure(ControlPlaneError::NotFound {
        message: format!("no such endpoint: see docs/protocol.md ({API_PREFIX}/..., {OPERATOR_PREFIX}/...)"),
    })
}

// ----- agent protocol -----

async fn hello(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_token(&s, &headers)?;
    let hello: SessionHello = parse_body(&body, "session hello")?;
    tracing::debug!(connector = %id, "session hello");
    Ok(Json(s.cp.hello(&hello).await?).into_response())
}

async fn lease(
    State(s): State<AppState>,
    Path(_id): Path<String>,
    shutdown: Option<Extension<ShutdownSignal>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_token(&s, &headers)?;
    let request: LeaseRequest = parse_body(&body, "lease request")?;
    let jobs = match shutdown {
        Some(Extension(ShutdownSignal(token))) => tokio::select! {
            r = s.cp.lease(&request) => r?,
            _ = token.cancelled() => Vec::new(),
        },
        None => s.cp.lease(&request).await?,
    };
    Ok(Json(LeaseResponse { jobs }).into_response())
}

async fn job_action(
    State(s): State<AppState>,
    Path(job): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_token(&s, &headers)?;
    let Some((job_id, verb)) = split_action(&job) else {
        return Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!(
                "no such endpoint: POST {API_PREFIX}/jobs/{job} (expected {{job_id}}:renew, {{job_id}}:complete or {{job_id}}:release)"
            ),
        }));
    };
    match verb {
        "renew" => {
            let request: RenewRequest = parse_body(&body, "renew request")?;
            Ok(Json(s.cp.renew(job_id, &request).await?).into_response())
        }
        "complete" => {
            let request: CompleteRequest = parse_body(&body, "complete request")?;
            s.cp.complete(job_id, &request).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        "release" => {
            let request: ReleaseRequest = parse_body(&body, "release request")?;
            s.cp.release(job_id, &request).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("unknown job action {other:?}: expected renew or complete"),
        })),
    }
}

async fn upload(
    State(s): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_token(&s, &headers)?;
    let lease_token = headers
        .get(LEASE_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            rejected(
                400,
                format!("missing {LEASE_TOKEN_HEADER} header with the job's lease token"),
            )
        })?;
    let text = std::str::from_utf8(&body).map_err(|_| rejected(400, "the NDJSON body is not UTF-8".into()))?;
    let mut batch = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| rejected(400, format!("line {} of the NDJSON body is not JSON: {e}", n + 1)))?;
        batch.push(value);
    }
    let job = Job {
        id: job_id,
        kind: String::new(),
        attempt: 1,
        lease_token: lease_token.to_string(),
        lease_expires_at: chrono::Utc::now(),
        integration: Value::Null,
        params: Value::Null,
    };
    s.cp.upload_resources(&job, &batch).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- operator API -----

async fn create_access(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let value: Value = parse_body(&body, "access request")?;
    // An untagged `IntegrationRef` only says "did not match any variant": say what is wrong with
    // an inline integration instead.
    if let Some(inline @ Value::Object(_)) = value.get("integration")
        && let Err(e) = serde_json::from_value::<IntegrationSpec>(inline.clone())
    {
        return Err(rejected(422, format!("invalid inline integration: {e}")));
    }
    let request: AccessRequestCreate =
        serde_json::from_value(value).map_err(|e| rejected(422, format!("invalid access request: {e}")))?;
    let created = s.cp.create_access(request)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_access(State(s): State<AppState>) -> ApiResult<Response> {
    Ok(Json(s.cp.list_access()?).into_response())
}

async fn get_access(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    match s.cp.access(&id)? {
        Some(a) => Ok(Json(a).into_response()),
        None => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no access request {id:?}"),
        })),
    }
}

/// `POST /operator/v1/access-requests/{id}:revoke` (the `/revoke` sub-path is the same).
async fn access_action(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    match split_action(&id) {
        Some((id, "revoke")) => Ok(Json(s.cp.revoke_access(id)?).into_response()),
        _ => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no such endpoint: POST {OPERATOR_PREFIX}/access-requests/{id} (expected {{id}}:revoke)"),
        })),
    }
}

async fn revoke_access(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.cp.revoke_access(&id)?).into_response())
}

async fn create_job(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: JobCreate = parse_body(&body, "job")?;
    let created = s.cp.create_job(request)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_jobs(State(s): State<AppState>) -> ApiResult<Response> {
    Ok(Json(s.cp.list_jobs()?).into_response())
}

async fn get_job(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    match s.cp.job(&id)? {
        Some(j) => Ok(Json(j).into_response()),
        None => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no job {id:?}"),
        })),
    }
}

/// `GET /operator/v1/jobs/{id}/resources`: the objects a discover job uploaded, as NDJSON.
async fn job_resources(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    if s.cp.job(&id)?.is_none() {
        return Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no job {id:?}"),
        }));
    }
    let mut body = String::new();
    for object in s.cp.resources(&id)? {
        body.push_str(&object.to_string());
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// Serves `router` on `listener` until `shutdown` is cancelled, through the hardened accept loop
/// ([`crate::telemetry::serve_hardened`]: header timeout, connection cap). Open long-polls answer
/// at once (empty); other requests get a short grace to finish, after which this returns anyway.
///
/// # Errors
/// None today (accept errors are retried); the `Result` is kept for callers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router.layer(Extension(ShutdownSignal(shutdown.clone())));
    let limits = crate::telemetry::Limits {
        shutdown_grace: SHUTDOWN_GRACE,
        ..crate::telemetry::Limits::API
    };
    crate::telemetry::serve_hardened(listener, app, limits, shutdown).await;
    Ok(())
}
