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

use super::operator::{AccessRequest, AccessRequestCreate, JobCreate, JobRecord, NEXT_CURSOR_HEADER, OPERATOR_PREFIX};
use super::protocol::{
    API_PREFIX, ApiErrorBody, CompleteRequest, Job, LEASE_TOKEN_HEADER, LeaseRequest, LeaseResponse, MAX_WAIT_SECONDS,
    ReleaseRequest, RenewRequest, RenewResponse, SessionHello, SessionInfo,
};
use super::{ControlPlane, ControlPlaneError};

/// Timeout of a call that is not a long-poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to `wait_seconds` for a lease call's timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(15);
/// Most of a success answer read (a lease of many jobs is the largest); the server accepts
/// bodies of the same size.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Most of an error answer read: only its message is kept.
pub const MAX_ERROR_ANSWER_BYTES: usize = 64 << 10;
/// Items asked for per page of an operator list.
const LIST_PAGE: usize = 500;
/// Longest id put in a URL path.
const MAX_ID_LEN: usize = 256;

/// The environment variable (and `control_plane.allow_insecure_http`) that allows `http://` to a
/// control plane that is not on this machine.
pub const ALLOW_INSECURE_HTTP_ENV: &str = "APONO_ALLOW_INSECURE_HTTP";

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`), any case; `None` for anything else.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

/// Whether `url` names this machine: a loopback IP literal or `localhost`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.to_canonical().is_loopback(),
        None => false,
    }
}

/// The base URL, trimmed, and whether it is on this machine. `http://` to another host sends the
/// token and every job in cleartext: refused unless `allow_insecure_http` (security review N12).
fn base_url(base_url: &str, allow_insecure_http: bool) -> Result<(String, bool), ControlPlaneError> {
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
    let loopback = is_loopback(&parsed);
    if parsed.scheme() == "http" && !loopback && !allow_insecure_http {
        return Err(ControlPlaneError::Rejected {
            status: 400,
            message: format!(
                "control-plane URL {trimmed:?} uses http:// to another host, which would send the token and every \
                 job in cleartext: use https://, or set {ALLOW_INSECURE_HTTP_ENV}=true \
                 (control_plane.allow_insecure_http) if the network is trusted"
            ),
        });
    }
    Ok((trimmed.to_string(), loopback))
}

/// The client of one control plane. Redirects are never followed: a 307 would re-send a body
/// (a grant's password, a job's result) to wherever it points (N12). A control plane on this
/// machine is reached directly, never through `HTTP_PROXY`, which would see the token (N5).
fn build_client(loopback: bool) -> Result<reqwest::Client, ControlPlaneError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("apono-connector/", env!("CARGO_PKG_VERSION")));
    if loopback {
        builder = builder.no_proxy();
    }
    builder.build().map_err(|e| ControlPlaneError::Unavailable {
        message: format!("cannot build the HTTP client: {e}"),
    })
}

/// Percent-encodes one path segment (ids are opaque strings).
///
/// A `.` or `..` segment would be resolved by the URL parser (`/jobs/../resources` is
/// `/resources`), whatever its encoding (`%2e%2e` too): it is sent double-encoded, so it names
/// an id that does not exist instead of another route. [`id_segment`] refuses it outright.
fn segment(s: &str) -> String {
    if s == "." || s == ".." {
        return s.replace('.', "%252E");
    }
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

/// An id checked before it goes into a URL path: non-empty, at most 256 characters of
/// `[A-Za-z0-9._~:-]`, not `.` or `..`. The protocol's ids (job and connector ids) never need more.
///
/// # Errors
/// `Protocol` naming `field`; no request is made.
fn id_segment(field: &str, id: &str) -> Result<String, ControlPlaneError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':'));
    if ok {
        Ok(segment(id))
    } else {
        let shown: String = id.chars().take(80).collect();
        Err(ControlPlaneError::Protocol {
            message: format!(
                "{field} {shown:?} is not an id (ids use letters, digits, '-', '_', '.', '~' and ':', at most \
                 {MAX_ID_LEN} characters, and are not \".\" or \"..\"); no request was sent"
            ),
        })
    }
}

/// `16 MiB`, `64 KiB`.
fn byte_size(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}

/// Reads at most `cap` bytes of the body; `None` when there was more (the rest is not read).
async fn read_capped(resp: &mut Response, cap: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > cap {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

fn too_large(what: &str, cap: usize) -> ControlPlaneError {
    ControlPlaneError::Protocol {
        message: format!(
            "the control plane's answer to {what} is larger than {}, the most this agent reads; check APONO_URL \
             points at the control plane",
            byte_size(cap)
        ),
    }
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
    let mut message = format!("{what}: {}", crate::error_chain(&e));
    if message.to_ascii_lowercase().contains("certificate") {
        message.push_str(" (trust the control plane's CA with SSL_CERT_FILE)");
    }
    ControlPlaneError::Unavailable { message }
}

/// The error body's message, or the start of the body text (read up to
/// [`MAX_ERROR_ANSWER_BYTES`]: a longer one is not read at all).
async fn error_message(mut resp: Response) -> String {
    let status = resp.status();
    let text = match read_capped(&mut resp, MAX_ERROR_ANSWER_BYTES).await {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(None) => format!(
            "{} (the error answer is larger than {}; not read)",
            status.canonical_reason().unwrap_or("no message"),
            byte_size(MAX_ERROR_ANSWER_BYTES)
        ),
        Err(_) => String::new(),
    };
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
    if status.is_redirection() {
        let to: String = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nowhere")
            .chars()
            .take(200)
            .collect();
        return Err(ControlPlaneError::Rejected {
            status: status.as_u16(),
            message: format!(
                "the control plane answered {} with a redirect to {to:?}; redirects are not followed, so the token \
                 and request bodies go only to the configured URL: configure the final address instead",
                status.as_u16()
            ),
        });
    }
    let message = error_message(resp).await;
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ControlPlaneError::Unauthorized { message },
        StatusCode::CONFLICT if job_id.is_some() => ControlPlaneError::LeaseLost {
            job_id: job_id.unwrap_or_default().to_string(),
        },
        StatusCode::NOT_FOUND => ControlPlaneError::NotFound { message },
        // Timed out, too early, too many requests: the same request can succeed later.
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS => {
            ControlPlaneError::Unavailable {
                message: format!("{} {message}", status.as_u16()),
            }
        }
        s if s.is_client_error() => ControlPlaneError::Rejected {
            status: s.as_u16(),
            message,
        },
        s => ControlPlaneError::Unavailable {
            message: format!("{} {message}", s.as_u16()),
        },
    })
}

async fn decode<T: DeserializeOwned>(mut resp: Response, what: &str) -> Result<T, ControlPlaneError> {
    let bytes = read_capped(&mut resp, MAX_ANSWER_BYTES)
        .await
        .map_err(transport)?
        .ok_or_else(|| too_large(what, MAX_ANSWER_BYTES))?;
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
        HttpControlPlane::with_insecure_http(base_url_, connector_id, token, false)
    }

    /// Like [`HttpControlPlane::new`]; `allow_insecure_http` lets `http://` reach a control plane
    /// on another host (`APONO_ALLOW_INSECURE_HTTP`).
    ///
    /// # Errors
    /// As [`HttpControlPlane::new`], and `Rejected` for `http://` to another host when not allowed.
    pub fn with_insecure_http(
        base_url_: &str,
        connector_id: &str,
        token: Option<SecretString>,
        allow_insecure_http: bool,
    ) -> Result<Self, ControlPlaneError> {
        let (base, loopback) = base_url(base_url_, allow_insecure_http)?;
        Ok(HttpControlPlane {
            http: build_client(loopback)?,
            base,
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

    fn job_path(job_id: &str, tail: &str) -> Result<String, ControlPlaneError> {
        Ok(format!("{API_PREFIX}/jobs/{}{tail}", id_segment("job id", job_id)?))
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
        let path = Self::job_path(job_id, ":renew")?;
        let resp = self.post_json(&path, request, CALL_TIMEOUT, Some(job_id)).await?;
        decode(resp, "renew").await
    }

    async fn complete(&self, job_id: &str, request: &CompleteRequest) -> Result<(), ControlPlaneError> {
        let path = Self::job_path(job_id, ":complete")?;
        self.post_json(&path, request, CALL_TIMEOUT, Some(job_id)).await?;
        Ok(())
    }

    async fn release(&self, job_id: &str, request: &ReleaseRequest) -> Result<(), ControlPlaneError> {
        let path = Self::job_path(job_id, ":release")?;
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
        let path = Self::job_path(&job.id, "/resources")?;
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
        OperatorClient::with_insecure_http(base_url_, false)
    }

    /// Like [`OperatorClient::new`]; `allow_insecure_http` lets `http://` reach an operator API on
    /// another host (`APONO_ALLOW_INSECURE_HTTP`): the operator token would cross the network in
    /// cleartext.
    ///
    /// # Errors
    /// As [`OperatorClient::new`], and `Rejected` for `http://` to another host when not allowed.
    pub fn with_insecure_http(base_url_: &str, allow_insecure_http: bool) -> Result<Self, ControlPlaneError> {
        let (base, loopback) = base_url(base_url_, allow_insecure_http)?;
        Ok(OperatorClient {
            http: build_client(loopback)?,
            base,
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

    /// Every access request, read a page at a time (an answer never nears the read cap however
    /// many are kept: security review N11).
    pub async fn list_access(&self) -> Result<Vec<AccessRequest>, ControlPlaneError> {
        self.list_all("access-requests", "access request list", |a: &AccessRequest| {
            a.id.clone()
        })
        .await
    }

    /// Walks `GET {tail}?limit=&after=` through [`NEXT_CURSOR_HEADER`]. A server that does not
    /// page answers the whole list at once, without the header: that is the last page.
    async fn list_all<T: DeserializeOwned>(
        &self,
        tail: &str,
        what: &str,
        id: impl Fn(&T) -> String,
    ) -> Result<Vec<T>, ControlPlaneError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", LIST_PAGE.to_string())];
            if let Some(after) = &after {
                query.push(("after", after.clone()));
            }
            let resp = self.send(self.http.get(self.url(tail)).query(&query)).await?;
            let next = resp
                .headers()
                .get(NEXT_CURSOR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let page: Vec<T> = decode(resp, what).await?;
            // A cursor that does not move on would loop forever: stop at a page that ends on it.
            let moved = match (page.last(), &next) {
                (Some(last), Some(next)) => after.as_deref() != Some(next.as_str()) && id(last) == *next,
                _ => false,
            };
            all.extend(page);
            match next {
                Some(next) if moved => after = Some(next),
                Some(_) => {
                    return Err(ControlPlaneError::Protocol {
                        message: format!("the {what} pages do not move on: the control plane's cursor is wrong"),
                    });
                }
                None => return Ok(all),
            }
        }
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

    /// Every job, read a page at a time.
    pub async fn list_jobs(&self) -> Result<Vec<JobRecord>, ControlPlaneError> {
        self.list_all("jobs", "job list", |j: &JobRecord| j.id.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_rejects_other_schemes_and_trims() {
        assert_eq!(
            base_url("http://127.0.0.1:8790/", false).unwrap(),
            ("http://127.0.0.1:8790".to_string(), true)
        );
        assert!(matches!(
            base_url("ftp://x", false),
            Err(ControlPlaneError::Rejected { .. })
        ));
        assert!(base_url("not a url", false).is_err());
    }

    #[test]
    fn cleartext_to_another_host_needs_the_setting() {
        for local in [
            "http://localhost:8790",
            "http://127.0.0.2:1",
            "http://[::1]:8790",
            "https://cp.example.com",
        ] {
            assert!(base_url(local, false).is_ok(), "{local}");
        }
        for remote in [
            "http://cp.example.com",
            "http://10.0.0.5:8790",
            "http://localhost.evil.example",
        ] {
            let e = base_url(remote, false).unwrap_err();
            assert!(e.to_string().contains(ALLOW_INSECURE_HTTP_ENV), "{remote}: {e}");
            assert!(!base_url(remote, true).unwrap().1, "{remote}");
        }
        assert!(OperatorClient::new("http://cp.example.com").is_err());
        assert!(HttpControlPlane::with_insecure_http("http://cp.example.com", "c", None, true).is_ok());
        assert_eq!(parse_flag(" TRUE "), Some(true));
        assert_eq!(parse_flag("0"), Some(false));
        assert_eq!(parse_flag("maybe"), None);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("a b/c:d"), "a%20b%2Fc%3Ad");
        assert_eq!(segment("ar-0190-x_y.z~"), "ar-0190-x_y.z~");
    }

    #[test]
    fn dot_segments_never_resolve() {
        // Sent double-encoded: the server sees the id "%2E%2E", never another route.
        assert_eq!(segment(".."), "%252E%252E");
        assert_eq!(segment("."), "%252E");
        for bad in ["..", ".", "", "a/b", "a?b", "a#b", "a%2F..", "a b"] {
            let e = id_segment("job id", bad).unwrap_err();
            assert!(
                matches!(&e, ControlPlaneError::Protocol { message } if message.contains("job id")),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(id_segment("job id", "j-0190:x_y.z~").unwrap(), "j-0190%3Ax_y.z~");
    }

    /// A fake control plane on 127.0.0.1 that answers every request with `status` and `body`,
    /// counting the requests it gets.
    async fn fake(status: u16, body: axum::body::Body) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let body = std::sync::Arc::new(std::sync::Mutex::new(Some(body)));
        let app = axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.lock().ok().and_then(|mut b| b.take()).unwrap_or_default();
            async move {
                axum::response::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), hits)
    }

    /// A streamed body of `n` bytes with no Content-Length, like a hostile server's.
    fn endless(n: usize) -> axum::body::Body {
        let chunk = axum::body::Bytes::from(vec![b' '; 1 << 20]);
        let chunks = (0..n.div_ceil(1 << 20)).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
        axum::body::Body::from_stream(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn an_oversized_lease_answer_is_a_protocol_error() {
        let (url, _) = fake(200, endless(MAX_ANSWER_BYTES + (2 << 20))).await;
        let cp = HttpControlPlane::new(&url, "c", None).unwrap();
        let e = cp
            .lease(&LeaseRequest {
                max_jobs: 1,
                wait_seconds: 0,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ControlPlaneError::Protocol { message }
                if message.contains("answer to lease is larger than 16 MiB")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_oversized_error_answer_keeps_the_status_and_drops_the_body() {
        let (url, _) = fake(400, endless(4 << 20)).await;
        let cp = HttpControlPlane::new(&url, "c", None).unwrap();
        let e = cp
            .lease(&LeaseRequest {
                max_jobs: 1,
                wait_seconds: 0,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ControlPlaneError::Rejected { status: 400, message } if message.contains("larger than 64 KiB")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn timeouts_and_throttling_are_retryable() {
        for status in [408, 425, 429] {
            let (url, _) = fake(status, r#"{"error":{"code":"x","message":"slow down"}}"#.into()).await;
            let cp = HttpControlPlane::new(&url, "c", None).unwrap();
            let request = CompleteRequest {
                lease_token: "t".into(),
                outcome: super::super::protocol::Outcome::Succeeded,
                error: None,
                result: None,
            };
            let e = cp.complete("j-1", &request).await.unwrap_err();
            assert!(
                matches!(&e, ControlPlaneError::Unavailable { message } if message.contains("slow down"))
                    && e.retryable(),
                "{status}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_hostile_job_id_sends_no_request() {
        let (url, hits) = fake(204, axum::body::Body::empty()).await;
        let cp = HttpControlPlane::new(&url, "c", None).unwrap();
        let renew = RenewRequest {
            lease_token: "t".into(),
        };
        for id in ["..", "x/../../resources", "x?y=z", "local%2F.."] {
            let e = cp.renew(id, &renew).await.unwrap_err();
            assert!(matches!(e, ControlPlaneError::Protocol { .. }), "{id}: {e}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn debug_hides_the_token() {
        let cp = HttpControlPlane::new("http://localhost:1", "c", Some(SecretString::from("tok-canary-123"))).unwrap();
        assert!(!format!("{cp:?}").contains("tok-canary-123"));
    }
}
