//! HTTP clients: [`HttpControlPlane`] speaks protocol v1 to a remote control plane (the agent in
//! remote mode), [`OperatorClient`] speaks the operator API (`apono-connector access ...`).
//!
//! Status mapping (the inverse of `ControlPlaneError::status`): 401/403 → `Unauthorized`, 409 on
//! renew/complete/resources → `LeaseLost`, 404 → `NotFound`, other 4xx → `Rejected`, 5xx and
//! transport errors → `Unavailable`. The bearer token is sent in a header marked sensitive and
//! never appears in an error or a log line.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::operator::{AccessRequest, AccessRequestCreate, JobCreate, JobRecord, OPERATOR_PREFIX};
use super::protocol::{
    API_PREFIX, ApiErrorBody, CompleteRequest, Job, LEASE_TOKEN_HEADER, LeaseRequest, LeaseResponse, MAX_WAIT_SECONDS,
    ReleaseRequest, RenewRequest, RenewResponse, SessionHello, SessionInfo,
};
use super::{ControlPlane, ControlPlaneError};

/// Timeout of a call that is not a long-poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to `wait_seconds` for a lease call's timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(15);

fn base_url(base_url: &str) -> Result<String, ControlPlaneError> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let parsed = url::Url::parse(trimmed).map_err(|e| ControlPlaneError::Rejected {
        status: 400,
        message: format!("control-plane URL {trimmed:?} is not a URL: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ControlPlaneError::Rejected {
            status: 400,
            message: format!("control-plane URL {trimmed:?} must start with https:// (or http://)"),
        });
    }
    Ok(trimmed.to_string())
}

fn build_client() -> Result<reqwest::Client, ControlPlaneError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("apono-connector/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ControlPlaneError::Unavailable {
            message: format!("cannot build the HTTP client: {e}"),
        })
}

/// Percent-encodes one path segment (ids are opaque strings).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn transport(e: reqwest::Error) -> ControlPlaneError {
    if e.is_builder() {
        // Not transient: a request that cannot be built (a job id too long for a URL, found by
        // tests/hostile_control_plane.rs) never will be, and retrying it held a worker for a
        // minute. The URL is left out: it may be that huge id.
        return ControlPlaneError::Protocol {
            message: format!(
                "the request to the control plane cannot be built (an id in its path is too long or invalid): {}",
                e.without_url()
            ),
        };
    }
    // reqwest's message names the URL and the cause, never the headers.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The cause chain says what an operator needs ("invalid peer certificate: UnknownIssuer",
    // "Connection refused"); reqwest's own line only says a request failed.
    let mut message = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if message.to_ascii_lowercase().contains("certificate") {
        message.push_str(" (trust the control plane's CA with SSL_CERT_FILE)");
    }
    ControlPlaneError::Unavailable { message }
}

/// The error body's message, or the start of the body text.
async fn error_message(resp: Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiErrorBody>(&text) {
        Ok(body) => body.error.message,
        Err(_) if text.trim().is_empty() => status.canonical_reason().unwrap_or("no message").to_string(),
        Err(_) => text.chars().take(300).collect(),
    }
}

/// Maps a non-2xx answer to an error. `job_id` is set on calls where 409 means a lost lease.
async fn check(resp: Response, job_id: Option<&str>) -> Result<Response, ControlPlaneError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let message = error_message(resp).await;
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ControlPlaneError::Unauthorized { message },
        StatusCode::CONFLICT if job_id.is_some() => ControlPlaneError::LeaseLost {
            job_id: job_id.unwrap_or_default().to_string(),
        },
        StatusCode::NOT_FOUND => ControlPlaneError::NotFound { message },
        s if s.is_client_error() => ControlPlaneError::Rejected {
            status: s.as_u16(),
            message,
        },
        s => ControlPlaneError::Unavailable {
            message: format!("{} {message}", s.as_u16()),
        },
    })
}

async fn decode<T: DeserializeOwned>(resp: Response, what: &str) -> Result<T, ControlPlaneError> {
    let bytes = resp.bytes().await.map_err(transport)?;
    serde_json::from_slice(&bytes).map_err(|e| ControlPlaneError::Protocol {
        message: format!("{what} answer does not parse: {e}"),
    })
}

/// Protocol v1 over HTTP(S): the agent's view of a remote control plane.
pub struct HttpControlPlane {
    http: reqwest::Client,
    base: String,
    connector_id: String,
    token: Option<SecretString>,
    /// `APONO_TOKEN_FILE`: read at every call, so a token rotated in a mounted Secret is used
    /// from the next call on, without a restart. Takes precedence over `token`.
    token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for HttpControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpControlPlane")
            .field("base", &self.base)
            .field("connector_id", &self.connector_id)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl HttpControlPlane {
    /// # Errors
    /// `Rejected` for a URL that is not http(s); `Unavailable` if the HTTP client cannot be built.
    pub fn new(base_url_: &str, connector_id: &str, token: Option<SecretString>) -> Result<Self, ControlPlaneError> {
        Ok(HttpControlPlane {
            http: build_client()?,
            base: base_url(base_url_)?,
            connector_id: connector_id.to_string(),
            token,
            token_file: None,
        })
    }

    /// Reads the token from `path` at every call (`APONO_TOKEN_FILE`).
    pub fn with_token_file(mut self, path: std::path::PathBuf) -> Self {
        self.token_file = Some(path);
        self
    }

    fn current_token(&self) -> Result<Option<SecretString>, ControlPlaneError> {
        match &self.token_file {
            None => Ok(self.token.clone()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Ok(Some(SecretString::from(text.trim().to_string()))),
                Ok(_) => Err(ControlPlaneError::Unauthorized {
                    message: format!("APONO_TOKEN_FILE {} is empty", path.display()),
                }),
                Err(e) => Err(ControlPlaneError::Unauthorized {
                    message: format!("APONO_TOKEN_FILE {} cannot be read: {e}", path.display()),
                }),
            },
        }
    }

    fn request(&self, method: Method, path: &str, timeout: Duration) -> Result<RequestBuilder, ControlPlaneError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(token) = &self.current_token()? {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.expose_secret().trim())).map_err(|_| {
                    ControlPlaneError::Rejected {
                        status: 400,
                        message: "APONO_TOKEN contains characters that cannot go in an HTTP header".into(),
                    }
                })?;
            value.set_sensitive(true);
            rb = rb.header(AUTHORIZATION, value);
        }
        Ok(rb)
    }

    async fn post_json<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
        job_id: Option<&str>,
    ) -> Result<Response, ControlPlaneError> {
        let resp = self
            .request(Method::POST, path, timeout)?
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        check(resp, job_id).await
    }

    fn connector_path(&self, tail: &str) -> String {
        format!("{API_PREFIX}/connectors/{}/{tail}", segment(&self.connector_id))
    }
}

#[async_trait::async_trait]
impl ControlPlane for HttpControlPlane {
    async fn hello(&self, hello: &SessionHello) -> Result<SessionInfo, ControlPlaneError> {
        let resp = self
            .post_json(&self.connector_path("sessions"), hello, CALL_TIMEOUT, None)
            .await?;
        decode(resp, "session").await
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Value>, ControlPlaneError> {
        let wait = Duration::from_secs(u64::from(request.wait_seconds.min(MAX_WAIT_SECONDS)));
        let resp = self
            .post_json(&self.connector_path("jobs:lease"), request, wait + LEASE_MARGIN, None)
            .await?;
        let body: LeaseResponse = decode(resp, "lease").await?;
        Ok(body.jobs)
    }

    async fn renew(&self, job_id: &str, request: &RenewRequest) -> Result<RenewResponse, ControlPlaneError> {
        let path = format!("{API_PREFIX}/jobs/{}:renew", segment(job_id));
        let resp = self.post_json(&path, request, CALL_TIMEOUT, Some(job_id)).await?;
        decode(resp, "renew").await
    }

    async fn complete(&self, job_id: &str, request: &CompleteRequest) -> Result<(), ControlPlaneError> {
        let path = format!("{API_PREFIX}/jobs/{}:complete", segment(job_id));
        self.post_json(&path, request, CALL_TIMEOUT, Some(job_id)).await?;
        Ok(())
    }

    async fn release(&self, job_id: &str, request: &ReleaseRequest) -> Result<(), ControlPlaneError> {
        let path = format!("{API_PREFIX}/jobs/{}:release", segment(job_id));
        self.post_json(&path, request, CALL_TIMEOUT, Some(job_id)).await?;
        Ok(())
    }

    async fn upload_resources(&self, job: &Job, batch: &[Value]) -> Result<(), ControlPlaneError> {
        let mut body = String::new();
        for object in batch {
            let line = serde_json::to_string(object).map_err(|e| ControlPlaneError::Protocol {
                message: format!("an object does not serialize: {e}"),
            })?;
            body.push_str(&line);
            body.push('\n');
        }
        let path = format!("{API_PREFIX}/jobs/{}/resources", segment(&job.id));
        let resp = self
            .request(Method::POST, &path, CALL_TIMEOUT)?
            .header(CONTENT_TYPE, "application/x-ndjson")
            .header(LEASE_TOKEN_HEADER, job.lease_token.as_str())
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        check(resp, Some(&job.id)).await?;
        Ok(())
    }
}

/// The operator API of an embedded control plane (`/operator/v1`).
#[derive(Clone)]
pub struct OperatorClient {
    http: reqwest::Client,
    base: String,
    /// The operator token (`<data_dir>/operator.token`), sent as a bearer token.
    token: Option<SecretString>,
}

impl std::fmt::Debug for OperatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl OperatorClient {
    /// # Errors
    /// `Rejected` for a URL that is not http(s); `Unavailable` if the HTTP client cannot be built.
    pub fn new(base_url_: &str) -> Result<Self, ControlPlaneError> {
        Ok(OperatorClient {
            http: build_client()?,
            base: base_url(base_url_)?,
            token: None,
        })
    }

    /// Sends `token` (the operator token) with every call; the operator API refuses calls without it.
    #[must_use]
    pub fn with_token(mut self, token: SecretString) -> Self {
        self.token = Some(token);
        self
    }

    fn url(&self, tail: &str) -> String {
        format!("{}{OPERATOR_PREFIX}/{tail}", self.base)
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, ControlPlaneError> {
        let rb = match &self.token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).map_err(|_| {
                    ControlPlaneError::Rejected {
                        status: 400,
                        message: "the operator token contains characters not allowed in an HTTP header".into(),
                    }
                })?;
                value.set_sensitive(true);
                rb.header(AUTHORIZATION, value)
            }
            None => rb,
        };
        let resp = rb.timeout(CALL_TIMEOUT).send().await.map_err(|e| {
            let mut err = transport(e);
            if let ControlPlaneError::Unavailable { message } = &mut err {
                message.push_str(&format!(
                    " (is the control plane running at {}? `apono-connector run` serves it on 127.0.0.1:8790)",
                    self.base
                ));
            }
            err
        })?;
        check(resp, None).await
    }

    /// Like `send`, but a 404 is `None`.
    async fn send_opt<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        what: &str,
    ) -> Result<Option<T>, ControlPlaneError> {
        match self.send(rb).await {
            Ok(resp) => decode(resp, what).await.map(Some),
            Err(ControlPlaneError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create_access(&self, request: &AccessRequestCreate) -> Result<AccessRequest, ControlPlaneError> {
        let resp = self
            .send(self.http.post(self.url("access-requests")).json(request))
            .await?;
        decode(resp, "access request").await
    }

    pub async fn access(&self, id: &str) -> Result<Option<AccessRequest>, ControlPlaneError> {
        let rb = self.http.get(self.url(&format!("access-requests/{}", segment(id))));
        self.send_opt(rb, "access request").await
    }

    pub async fn list_access(&self) -> Result<Vec<AccessRequest>, ControlPlaneError> {
        let resp = self.send(self.http.get(self.url("access-requests"))).await?;
        decode(resp, "access request list").await
    }

    pub async fn revoke_access(&self, id: &str) -> Result<AccessRequest, ControlPlaneError> {
        let rb = self
            .http
            .post(self.url(&format!("access-requests/{}/revoke", segment(id))));
        let resp = self.send(rb).await?;
        decode(resp, "access request").await
    }

    pub async fn create_job(&self, job: &JobCreate) -> Result<JobRecord, ControlPlaneError> {
        let resp = self.send(self.http.post(self.url("jobs")).json(job)).await?;
        decode(resp, "job").await
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, ControlPlaneError> {
        let rb = self.http.get(self.url(&format!("jobs/{}", segment(id))));
        self.send_opt(rb, "job").await
    }

    /// Objects a discover job uploaded (`GET /operator/v1/jobs/{id}/resources`, NDJSON).
    pub async fn resources(&self, job_id: &str) -> Result<Vec<Value>, ControlPlaneError> {
        let resp = self
            .send(self.http.get(self.url(&format!("jobs/{}/resources", segment(job_id)))))
            .await?;
        let text = resp.text().await.map_err(transport)?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| ControlPlaneError::Protocol {
                    message: format!("a discovered object does not parse: {e}"),
                })
            })
            .collect()
    }

    pub async fn list_jobs(&self) -> Result<Vec<JobRecord>, ControlPlaneError> {
        let resp = self.send(self.http.get(self.url("jobs"))).await?;
        decode(resp, "job list").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_rejects_other_schemes_and_trims() {
        assert_eq!(base_url("http://127.0.0.1:8790/").unwrap(), "http://127.0.0.1:8790");
        assert!(matches!(base_url("ftp://x"), Err(ControlPlaneError::Rejected { .. })));
        assert!(base_url("not a url").is_err());
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("a b/c:d"), "a%20b%2Fc%3Ad");
        assert_eq!(segment("ar-0190-x_y.z~"), "ar-0190-x_y.z~");
    }

    #[test]
    fn debug_hides_the_token() {
        let cp = HttpControlPlane::new("http://localhost:1", "c", Some(SecretString::from("tok-canary-123"))).unwrap();
        assert!(!format!("{cp:?}").contains("tok-canary-123"));
    }
}
