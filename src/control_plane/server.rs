//! HTTP server for the embedded control plane (axum): the operator API under `/operator/v1`
//! (operator token, JSON bodies, this server's own `Host`/`Origin` only) and, in
//! `control-plane serve` only, the agent protocol under `/connector/v1` (agent token).
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
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
use super::operator::{
    AccessRequestCreate, IntegrationRef, JobCreate, MAX_PAGE, NEXT_CURSOR_HEADER, OPERATOR_PREFIX, check_field, page,
};
use super::protocol::{
    API_PREFIX, ApiError, ApiErrorBody, CompleteRequest, Job, LEASE_TOKEN_HEADER, LeaseRequest, LeaseResponse,
    ReleaseRequest, RenewRequest, SessionHello,
};
use super::{ControlPlane, ControlPlaneError};
use crate::integrations::IntegrationSpec;

/// Largest request body, a discovery upload (`/resources`): 500 objects fit many times over.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest body of a job action (`:complete` carries the job's result; renew and release less).
const ACTION_BODY: usize = 1024 * 1024;
/// Largest body of the operator API (an inline integration with its CA bundle).
const OPERATOR_BODY: usize = 1024 * 1024;
/// Largest body of a session hello or a lease call.
const SMALL_BODY: usize = 64 * 1024;
/// How long a request's body may take to arrive once its headers have: a client that trickles
/// it holds a connection for this long at most (security review N2).
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a request may run, body included: the longest long-poll plus a margin.
const REQUEST_DEADLINE: Duration = Duration::from_secs(super::protocol::MAX_WAIT_SECONDS as u64 + 30);

/// How long `serve` waits for open requests after shutdown before it returns anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct AppState {
    cp: Arc<EmbeddedControlPlane>,
    /// The expected token; `None`: no token is asked for.
    token: Option<Arc<ExpectedToken>>,
}

/// The token a route expects, as its SHA-256 (compared in constant time; the token itself is not
/// kept in a second place). When it came from a file (`APONO_TOKEN_FILE`, a mounted Secret), a
/// token that does not match makes the file be read again if it changed since (its size or
/// modification time), so a rotated Secret reaches the control plane without a restart while the
/// agents already present the new token (deploy review N6).
struct ExpectedToken {
    digest: std::sync::RwLock<[u8; 32]>,
    file: Option<(PathBuf, std::sync::Mutex<Option<FileStamp>>)>,
}

/// A file's modification time and size, to tell that it changed.
type FileStamp = (std::time::SystemTime, u64);

impl ExpectedToken {
    fn fixed(digest: [u8; 32]) -> ExpectedToken {
        ExpectedToken {
            digest: std::sync::RwLock::new(digest),
            file: None,
        }
    }

    fn matches(&self, given: &str) -> bool {
        let given = digest(given);
        let current = *self.digest.read().unwrap_or_else(|p| p.into_inner());
        if same_digest(&current, &given) {
            return true;
        }
        self.reread_if_changed() && same_digest(&self.digest.read().unwrap_or_else(|p| p.into_inner()), &given)
    }

    /// Reads the token file again when its size or modification time changed. True when the
    /// expected token was replaced. A file that went blank or unreadable keeps the old token.
    fn reread_if_changed(&self) -> bool {
        let Some((path, seen)) = &self.file else {
            return false;
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == Some(stamp) {
            return false;
        }
        *seen = Some(stamp);
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => {
                *self.digest.write().unwrap_or_else(|p| p.into_inner()) = digest(text.trim());
                tracing::info!(path = %path.display(), "the agent token file changed: using the new token");
                true
            }
            _ => {
                tracing::warn!(path = %path.display(), "the agent token file changed but holds no token: keeping the previous one");
                false
            }
        }
    }
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
    let Some(expected) = &state.token else {
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
    if expected.matches(given) {
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

/// What the server serves and who may call it.
pub struct Access {
    /// The agent protocol's bearer token; `None`: the agent protocol is not served at all (`run`
    /// standalone, whose agent talks to the control plane in-process).
    pub agent_token: Option<SecretString>,
    /// Where `agent_token` was read from (`APONO_TOKEN_FILE`): read again when a presented token
    /// does not match and the file changed.
    pub agent_token_file: Option<PathBuf>,
    /// The operator API's bearer token (`<data_dir>/operator.token`). The agent token is not
    /// accepted in its place: an agent may lease jobs, it may not grant access.
    pub operator_token: SecretString,
    /// The address the server listens on: the `Host` (and any `Origin`) of an operator call must
    /// name it, which defeats DNS rebinding.
    pub listen: SocketAddr,
}

/// A token the server cannot use. Never carries the token.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccessError(String);

fn token_digest(token: &SecretString, what: &str) -> Result<[u8; 32], AccessError> {
    let t = token.expose_secret().trim();
    if t.is_empty() {
        // A blank token never means "authentication off" (reliability F10).
        return Err(AccessError(format!(
            "{what} is empty or only whitespace: set a real token"
        )));
    }
    Ok(digest(t))
}

/// The routes: the operator API (operator token, JSON bodies, own `Host`/`Origin` only) and, when
/// `access.agent_token` is set, the agent protocol (agent token).
///
/// # Errors
/// A token that is empty or only whitespace.
pub fn router(cp: Arc<EmbeddedControlPlane>, access: Access) -> Result<Router, AccessError> {
    let agent_token = match &access.agent_token {
        Some(t) => {
            let mut expected = ExpectedToken::fixed(token_digest(t, "APONO_TOKEN")?);
            if let Some(path) = &access.agent_token_file {
                let stamp = std::fs::metadata(path)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()));
                expected.file = Some((path.clone(), std::sync::Mutex::new(stamp)));
            }
            Some(Arc::new(expected))
        }
        None => None,
    };
    let serves_agents = agent_token.is_some();
    let operator_digest = token_digest(&access.operator_token, "the operator token")?;
    let agent_state = AppState {
        cp: cp.clone(),
        token: agent_token,
    };
    let operator_state = AppState {
        cp,
        token: Some(Arc::new(ExpectedToken::fixed(operator_digest))),
    };
    let guard = OperatorGuard {
        state: operator_state.clone(),
        listen: access.listen,
        refusals: Arc::new(std::sync::Mutex::new(crate::telemetry::serve::Throttled::new())),
    };
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
        .route_layer(middleware::from_fn(bounded_body))
        .route_layer(middleware::from_fn_with_state(guard, operator_guard))
        .with_state(operator_state);
    let mut app = Router::new().merge(operator);
    if serves_agents {
        let agent = Router::new()
            .route(&format!("{API_PREFIX}/connectors/{{id}}/sessions"), post(hello))
            .route(&format!("{API_PREFIX}/connectors/{{id}}/jobs:lease"), post(lease))
            .route(&format!("{API_PREFIX}/jobs/{{job}}"), post(job_action))
            .route(&format!("{API_PREFIX}/jobs/{{job}}/resources"), post(upload))
            // The token before anything else: a stranger is refused before a byte of its body
            // is read (security review N2); then the body within its route's size and time.
            .route_layer(middleware::from_fn(bounded_body))
            .route_layer(middleware::from_fn_with_state(agent_state.clone(), agent_guard))
            .with_state(agent_state);
        app = app.merge(agent);
    }
    Ok(app.fallback(not_found).layer(DefaultBodyLimit::max(MAX_BODY)))
}

#[derive(Clone)]
struct OperatorGuard {
    state: AppState,
    listen: SocketAddr,
    /// Refusals are strangers' doing: one warning per 10 s with a count, so they cannot fill the
    /// log (security review N6).
    refusals: Arc<std::sync::Mutex<crate::telemetry::serve::Throttled>>,
}

impl OperatorGuard {
    /// `Some(held back)` when a refusal should be logged now.
    fn log_refusal(&self) -> Option<u64> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).tick()
    }
}

fn forbidden(message: String) -> Response {
    rejected(403, message).into_response()
}

/// Whether `authority` (`host[:port]` of a `Host` header or an `Origin`) names this server: a
/// loopback name or IP literal on the listen port when listening on loopback; an IP literal or
/// `localhost` otherwise (behind a port-forward or a proxy the port differs). A DNS name never
/// does, which is what defeats DNS rebinding; the operator token does the rest.
fn names_this_server(authority: &str, listen: SocketAddr) -> bool {
    let Ok(parsed) = url::Url::parse(&format!("http://{authority}")) else {
        return false;
    };
    if parsed.path() != "/" || parsed.username() != "" || parsed.query().is_some() {
        return false;
    }
    let port = parsed.port().unwrap_or(80);
    let (is_local_name, ip) = match parsed.host() {
        Some(url::Host::Domain(d)) => (d.eq_ignore_ascii_case("localhost"), None),
        Some(url::Host::Ipv4(ip)) => (false, Some(std::net::IpAddr::V4(ip))),
        Some(url::Host::Ipv6(ip)) => (false, Some(std::net::IpAddr::V6(ip))),
        None => return false,
    };
    if listen.ip().is_loopback() {
        port == listen.port() && (is_local_name || ip.is_some_and(|ip| ip.to_canonical().is_loopback()))
    } else if listen.ip().is_unspecified() {
        is_local_name || ip.is_some()
    } else {
        is_local_name || ip.is_some_and(|ip| ip.to_canonical() == listen.ip().to_canonical() || ip.is_loopback())
    }
}

/// Whether a request carries a body (`Content-Length` above 0, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The operator API grants access, so it answers only (1) requests that name this server in
/// `Host` and, if they carry one, in `Origin` (no DNS rebinding, no cross-site page: 403), (2) whose
/// body, if any, is declared JSON (a browser's "simple" `text/plain` POST needs no preflight: 415),
/// (3) with the operator token (401).
async fn operator_guard(State(g): State<OperatorGuard>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    // HTTP/2 carries the host in the URI's authority instead of a `Host` header.
    let authority = request.uri().authority().map(|a| a.as_str().to_string());
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(authority.as_deref());
    if !host.is_some_and(|h| names_this_server(h, g.listen)) {
        if let Some(repeated) = g.log_refusal() {
            tracing::warn!(host = ?host, repeated, "operator API call with a foreign Host refused");
        }
        return forbidden(format!(
            "the Host header must name this server ({}, or localhost on its port): the operator API does not answer other names",
            g.listen
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")))
            .is_some_and(|authority| names_this_server(authority, g.listen));
        if !same {
            if let Some(repeated) = g.log_refusal() {
                tracing::warn!(origin = ?origin, repeated, "operator API call from a foreign Origin refused");
            }
            return forbidden(
                "cross-origin requests to the operator API are refused (the Origin is not this server)".into(),
            );
        }
    }
    if has_body(headers) && !is_json(headers) {
        return rejected(
            415,
            "the operator API takes JSON bodies only: send \"Content-Type: application/json\"".into(),
        )
        .into_response();
    }
    if let Err(e) = check_token(&g.state, headers) {
        return ApiFailure(ControlPlaneError::Unauthorized {
            message: format!(
                "{}: the operator API needs \"Authorization: Bearer <operator token>\" (the token is in <data_dir>/operator.token)",
                match &e.0 {
                    ControlPlaneError::Unauthorized { message } => message.as_str(),
                    _ => "not authorized",
                }
            ),
        })
        .into_response();
    }
    next.run(request).await
}

/// The agent protocol's token check, run before the body is read.
async fn agent_guard(State(s): State<AppState>, request: Request, next: Next) -> Response {
    match check_token(&s, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The most a route's body may hold.
fn body_limit(path: &str) -> usize {
    if path.starts_with(OPERATOR_PREFIX) {
        OPERATOR_BODY
    } else if path.starts_with(&format!("{API_PREFIX}/jobs/")) {
        if path.ends_with("/resources") {
            MAX_BODY
        } else {
            ACTION_BODY
        }
    } else {
        SMALL_BODY
    }
}

/// Reads the body before the handler runs: at most the route's [`body_limit`] (413 at once when
/// `Content-Length` says more), within [`BODY_DEADLINE`] (408), and the whole request within
/// [`REQUEST_DEADLINE`]. Runs after the token check, so only a caller with a token gets this far.
async fn bounded_body(request: Request, next: Next) -> Response {
    let limit = body_limit(request.uri().path());
    let too_large = || {
        rejected(
            413,
            format!(
                "the request body is larger than {} KiB, the most this endpoint takes",
                limit / 1024
            ),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read = async {
        use futures::StreamExt;
        let mut stream = body.into_data_stream();
        let mut buffer = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| None)?;
            if buffer.len() + chunk.len() > limit {
                return Err(Some(()));
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer)
    };
    let body = match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(Some(()))) => return too_large(),
        Ok(Err(None)) => return rejected(400, "the request body could not be read".into()).into_response(),
        Err(_) => {
            return rejected(
                408,
                format!("the request body did not arrive within {} s", BODY_DEADLINE.as_secs()),
            )
            .into_response();
        }
    };
    let request = Request::from_parts(parts, axum::body::Body::from(body));
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiFailure(ControlPlaneError::Unavailable {
            message: format!(
                "the request took longer than {} s; try again",
                REQUEST_DEADLINE.as_secs()
            ),
        })
        .into_response(),
    }
}

async fn not_found() -> ApiFailure {
    ApiFailure(ControlPlaneError::NotFound {
        message: format!("no such endpoint: see docs/protocol.md ({API_PREFIX}/..., {OPERATOR_PREFIX}/...)"),
    })
}

// ----- agent protocol -----

async fn hello(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> ApiResult<Response> {
    let hello: SessionHello = parse_body(&body, "session hello")?;
    tracing::debug!(connector = %id, "session hello");
    Ok(Json(s.cp.hello(&hello).await?).into_response())
}

async fn lease(
    State(s): State<AppState>,
    Path(_id): Path<String>,
    shutdown: Option<Extension<ShutdownSignal>>,
    body: Bytes,
) -> ApiResult<Response> {
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

async fn job_action(State(s): State<AppState>, Path(job): Path<String>, body: Bytes) -> ApiResult<Response> {
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
        lease_seconds: None,
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
    let subject_field = match &request.subject {
        crate::integrations::Subject::GroupPrincipal(_) => "group",
        _ => "user",
    };
    let mut fields = vec![
        (subject_field, request.subject.as_str()),
        ("role", request.role.as_str()),
        ("resource", request.resource.as_str()),
    ];
    if let IntegrationRef::Name(name) = &request.integration {
        fields.push(("integration", name.as_str()));
    }
    for (field, value) in fields {
        check_field(field, value).map_err(|e| rejected(400, e))?;
    }
    let created = s.cp.create_access(request)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `?limit=N&after=CURSOR` of a list: `None` for the whole list (older clients).
fn page_query(query: Option<&str>) -> ApiResult<Option<(usize, Option<String>)>> {
    let (mut limit, mut after) = (None, None);
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "limit" => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| rejected(400, format!("limit must be a whole number from 1 to {MAX_PAGE}")))?;
                limit = Some(n);
            }
            "after" => {
                check_field("after", &value).map_err(|e| rejected(400, e))?;
                after = Some(value.into_owned());
            }
            _ => {}
        }
    }
    match (limit, after) {
        (None, None) => Ok(None),
        (limit, after) => Ok(Some((limit.unwrap_or(MAX_PAGE), after))),
    }
}

/// A list as JSON: whole, or one page with the next page's cursor in [`NEXT_CURSOR_HEADER`].
///
/// Always in id order (ids are time-ordered: oldest first), whole or paged: pages are cut by id,
/// and the stored order is not id order (an id is made before its transaction waits for the
/// write lock, so concurrent creates, on one replica or several, store out of it). Paging the
/// stored order by id skipped some rows and repeated others.
fn list_answer<T: serde::Serialize>(
    mut items: Vec<T>,
    id: impl Fn(&T) -> &str,
    query: Option<&str>,
) -> ApiResult<Response> {
    items.sort_unstable_by(|a, b| id(a).cmp(id(b)));
    let Some((limit, after)) = page_query(query)? else {
        return Ok(Json(items).into_response());
    };
    let (items, next) = page(items, id, limit, after.as_deref());
    let mut response = Json(items).into_response();
    if let Some(next) = next.and_then(|n| header::HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, next);
    }
    Ok(response)
}

/// An id from a path: bounded and free of control characters, else 400.
fn path_id(id: &str) -> ApiResult<&str> {
    check_field("the id", id).map_err(|e| rejected(400, e))?;
    Ok(id)
}

async fn list_access(State(s): State<AppState>, RawQuery(query): RawQuery) -> ApiResult<Response> {
    list_answer(s.cp.list_access()?, |a| a.id.as_str(), query.as_deref())
}

async fn get_access(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = path_id(&id)?;
    match s.cp.access(id)? {
        Some(a) => Ok(Json(a).into_response()),
        None => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no access request {id:?}"),
        })),
    }
}

/// `POST /operator/v1/access-requests/{id}:revoke` (the `/revoke` sub-path is the same).
async fn access_action(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    match split_action(path_id(&id)?) {
        Some((id, "revoke")) => Ok(Json(s.cp.revoke_access(id)?).into_response()),
        _ => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no such endpoint: POST {OPERATOR_PREFIX}/access-requests/{id} (expected {{id}}:revoke)"),
        })),
    }
}

async fn revoke_access(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.cp.revoke_access(path_id(&id)?)?).into_response())
}

async fn create_job(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: JobCreate = parse_body(&body, "job")?;
    check_field("kind", &request.kind).map_err(|e| rejected(400, e))?;
    if request.kind.trim() == "grant" {
        // A raw grant has no access request: no TTL, no row in `access list`, never revoked
        // (security review N14). Access is given only with an end.
        return Err(rejected(
            400,
            "a raw grant job would never end: request access with a TTL instead \
             (POST /operator/v1/access-requests, or `apono-connector access request --ttl`)"
                .into(),
        ));
    }
    if let Some(name) = request.integration.as_str() {
        check_field("integration", name).map_err(|e| rejected(400, e))?;
    }
    let created = s.cp.create_job(request)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_jobs(State(s): State<AppState>, RawQuery(query): RawQuery) -> ApiResult<Response> {
    list_answer(s.cp.list_jobs()?, |j| j.id.as_str(), query.as_deref())
}

async fn get_job(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = path_id(&id)?;
    match s.cp.job(id)? {
        Some(j) => Ok(Json(j).into_response()),
        None => Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no job {id:?}"),
        })),
    }
}

/// `GET /operator/v1/jobs/{id}/resources`: the objects a discover job uploaded, as NDJSON.
async fn job_resources(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = path_id(&id)?;
    if s.cp.job(id)?.is_none() {
        return Err(ApiFailure(ControlPlaneError::NotFound {
            message: format!("no job {id:?}"),
        }));
    }
    let mut body = String::new();
    for object in s.cp.resources(id)? {
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
