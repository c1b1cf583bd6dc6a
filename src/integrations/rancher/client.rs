//! The HTTP client for Rancher's v3 (Norman) API: authentication, retries (honouring
//! `Retry-After`), error mapping, capped (and gzip-decoded) bodies, and pagination.
//!
//! **Invariant:** the API key lives in one sensitive header value and nowhere else; messages taken
//! from response bodies are scrubbed of the secret before they go into an error.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::Semaphore;
use url::Url;

use super::budget::{Body, BodyBudget, OverBudget, Reservation};
use super::config::{ApiKey, RancherConfig};
use super::model::{Collection, HasId};
use crate::integrations::IntegrationError;

/// Hard cap on pages per listing: 100000 pages of even 100 objects is beyond any real install.
const MAX_PAGES: u32 = 100_000;
/// Restarts of a listing from item 0 (its marker was deleted) tolerated before giving up.
const MAX_RESTARTS: u32 = 2;
/// Longest message kept from a response body.
const MAX_MESSAGE: usize = 400;
/// Largest success body read. A page of 5000 bindings is about 5-10 MB; 64 MiB leaves room for
/// fat objects without letting one answer (or a gzip bomb: the cap counts decoded bytes) exhaust
/// the agent's memory. Answers read at once share one budget besides ([`super::budget`]).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest error body read: only its message is kept, so the rest is not even read.
pub const MAX_ERROR_BODY_BYTES: usize = 1 << 20;
/// Longest wait a `Retry-After` can impose before a retry: a server asking for more is retried
/// after this anyway, and the job's own retries take over from there.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How transient failures (5xx, 429, timeouts, connection errors) are retried within one call.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// A Rancher API client bound to one server and one API key.
pub struct Client {
    endpoint: Arc<Endpoint>,
    /// The agent's worker slots (see [`Client::with_workers`]); none outside the agent.
    workers: Option<Arc<Semaphore>>,
    base: Url,
    auth: HeaderValue,
    /// The key's secret part, to scrub from any message a server (or a proxy) echoes back.
    scrub: SecretString,
    requests: AtomicU64,
    /// Bounds requests in flight (discovery fans out; every v3 page is a full list on the server).
    limiter: Semaphore,
    page_size: u32,
    timeout: Duration,
    retry: RetryPolicy,
    /// [`MAX_BODY_BYTES`]; smaller in tests.
    max_body: usize,
    /// Bytes of answers being read, process-wide ([`BodyBudget::shared`]; a small one in tests).
    budget: Arc<BodyBudget>,
    /// Rancher's clock: the `Date` of its latest answer and when it arrived here. Expiry is
    /// judged on it (`rancher_now`), so a connector whose own clock is off neither removes a
    /// binding early nor keeps one late.
    clock: std::sync::Mutex<Option<(DateTime<Utc>, std::time::Instant)>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("auth", &"[REDACTED]")
            .field("requests", &self.requests())
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl Client {
    /// Builds the client (no network). The HTTP client comes from the process-wide
    /// [`Endpoint`] cache: jobs for one Rancher share its connection pool (keep-alive, TLS
    /// sessions resumed) and its cap on requests in flight; only the key is per client.
    ///
    /// # Errors
    /// `Config` if the TLS setup or the key cannot be used.
    pub fn new(config: &RancherConfig, key: &ApiKey) -> Result<Client, IntegrationError> {
        Client::with_endpoint(config, key, Endpoint::shared(config)?)
    }

    /// Builds the client on a given endpoint (its HTTP client and request cap).
    ///
    /// # Errors
    /// `Config` if the key cannot be sent in a header.
    pub fn with_endpoint(
        config: &RancherConfig,
        key: &ApiKey,
        endpoint: Arc<Endpoint>,
    ) -> Result<Client, IntegrationError> {
        let mut auth = HeaderValue::from_str(key.bearer().expose_secret()).map_err(|_| IntegrationError::Config {
            message: "the Rancher API key cannot be sent in a header; copy the access key and secret key again".into(),
        })?;
        auth.set_sensitive(true);
        Ok(Client {
            endpoint,
            workers: None,
            base: config.base_url.clone(),
            auth,
            scrub: key.secret_part().clone(),
            requests: AtomicU64::new(0),
            limiter: Semaphore::new(config.concurrency.max(1)),
            page_size: config.page_size,
            timeout: config.timeout,
            retry: RetryPolicy::default(),
            max_body: MAX_BODY_BYTES,
            budget: BodyBudget::shared(),
            clock: std::sync::Mutex::new(None),
        })
    }

    /// Shares the agent's worker slots: each request holds one while it is in flight, and
    /// nothing holds one while a job waits between requests (a binding settling).
    pub fn with_workers(mut self, workers: Option<Arc<Semaphore>>) -> Client {
        self.workers = workers;
        self
    }

    /// The shared endpoint this client sends through.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Client {
        self.retry = retry;
        self
    }

    /// Lowers the success-body cap, so tests need not send 64 MiB.
    #[cfg(test)]
    pub(crate) fn with_max_body(mut self, bytes: usize) -> Client {
        self.max_body = bytes;
        self
    }

    /// Reads answers within `budget` instead of the process's, so tests need not fill 96 MiB.
    #[cfg(test)]
    pub(crate) fn with_budget(mut self, budget: Arc<BodyBudget>) -> Client {
        self.budget = budget;
        self
    }

    /// HTTP requests sent so far (retries included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// `base` + path segments + query pairs.
    ///
    /// # Errors
    /// `BadSegment` (no request is made) for a segment that is not an id's characters: `url`
    /// would drop a `.` or `..` segment and turn `GET /v3/users/..` into `GET /v3/users`. Ids are
    /// checked where they enter (`integrations::ids`); this is the last line of defence.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url, ApiError> {
        if let Some(Err(why)) = segments
            .iter()
            .map(|s| crate::integrations::ids::check_segment(s))
            .find(Result::is_err)
        {
            return Err(ApiError {
                method: Method::GET,
                path: format!("/{}", segments.first().copied().unwrap_or_default()),
                kind: Box::new(ErrorKind::BadSegment(why)),
            });
        }
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// GET and decode.
    ///
    /// # Errors
    /// The failure as an [`ApiError`] (the caller decides what a 404 means).
    pub async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, ApiError> {
        self.get_tries(url, self.retry.attempts).await
    }

    /// GET and decode, with at most `attempts` tries (a route that must give up fast).
    async fn get_tries<T: DeserializeOwned>(&self, url: Url, attempts: usize) -> Result<T, ApiError> {
        let retry = RetryPolicy { attempts, ..self.retry };
        let bytes = self
            .request_with(Method::GET, url.clone(), None, retry, ApiError::is_transient)
            .await?;
        self.decode(&Method::GET, &url, &bytes)
    }

    /// POST a JSON body and decode the answer.
    ///
    /// Retried on transient failures like a GET. That is safe only because every POST this
    /// integration makes is idempotent by construction: bindings and users have deterministic
    /// names or unique usernames, so a retry of a POST that was applied gets a 409 or 422 that
    /// the caller reads as "done"; setting a password twice sets it once.
    pub async fn post<T: DeserializeOwned>(&self, url: Url, body: &Value) -> Result<T, ApiError> {
        let bytes = self.request(Method::POST, url.clone(), Some(body)).await?;
        self.decode(&Method::POST, &url, &bytes)
    }

    /// POST like [`Client::post`], except that a failure `is_final` says is final is not retried
    /// even when transient by status: Rancher answers some refusals with a 500 (an unknown role
    /// template, a principal the key's auth provider cannot resolve), and retrying them only
    /// costs requests.
    pub async fn post_unless<T: DeserializeOwned>(
        &self,
        url: Url,
        body: &Value,
        is_final: impl Fn(&ApiError) -> bool,
    ) -> Result<T, ApiError> {
        let retry_if = |e: &ApiError| e.is_transient() && !is_final(e);
        let bytes = self
            .request_with(Method::POST, url.clone(), Some(body), self.retry, retry_if)
            .await?;
        self.decode(&Method::POST, &url, &bytes)
    }

    /// PUT a JSON body (Norman replaces the top-level fields given) and decode the answer.
    /// Retried like a POST: every PUT this integration makes sets fields to fixed values.
    pub async fn put<T: DeserializeOwned>(&self, url: Url, body: &Value) -> Result<T, ApiError> {
        let bytes = self.request(Method::PUT, url.clone(), Some(body)).await?;
        self.decode(&Method::PUT, &url, &bytes)
    }

    /// DELETE. Returns the body (Rancher answers 200 with the object, possibly with `removed`
    /// set, or 204 with nothing).
    pub async fn delete(&self, url: Url) -> Result<Option<Value>, ApiError> {
        let bytes = self.request(Method::DELETE, url, None).await?;
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Pages through a collection: `limit=page_size` plus `filters`. Filters only narrow what the
    /// server sends: Rancher silently ignores filters it does not know, so callers re-check
    /// every item client-side.
    pub fn list<T>(&self, segments: &[&str], filters: &[(&str, &str)], what: impl Into<String>) -> Pager<'_, T> {
        let limit = self.page_size.to_string();
        let mut query = vec![("limit", limit.as_str())];
        query.extend_from_slice(filters);
        let (next, refused) = match self.url(segments, &query) {
            Ok(url) => (Some(url), None),
            Err(e) => (None, Some(e)),
        };
        Pager {
            client: self,
            next,
            refused,
            what: what.into(),
            seen: HashSet::new(),
            attempts: self.retry.attempts,
            pages: 0,
            fresh_pages: 0,
            stalled: 0,
            restarts: 0,
            prev_last_seen: false,
            _item: PhantomData,
        }
    }

    fn decode<T: DeserializeOwned>(&self, method: &Method, url: &Url, bytes: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(bytes).map_err(|e| ApiError {
            method: method.clone(),
            path: url.path().to_string(),
            kind: Box::new(ErrorKind::Decode(format!("{e}"))),
        })
    }

    /// One logical request: retried with exponential backoff and jitter on transient failures,
    /// waiting at least what a 429's or 503's `Retry-After` asks (up to [`MAX_RETRY_AFTER`]).
    async fn request(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Body, ApiError> {
        self.request_with(method, url, body, self.retry, ApiError::is_transient)
            .await
    }

    /// [`Client::request`] with its own retry policy, retrying the failures `retry_if` accepts.
    async fn request_with(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        retry: RetryPolicy,
        retry_if: impl Fn(&ApiError) -> bool,
    ) -> Result<Body, ApiError> {
        let policy = ExponentialBuilder::default()
            .with_min_delay(retry.min_delay)
            .with_max_delay(retry.max_delay)
            .with_max_times(retry.attempts.saturating_sub(1))
            .with_jitter();
        (|| self.send_once(&method, &url, body))
            .retry(policy)
            .when(|f: &Failure| retry_if(&f.error))
            // `None` means the tries are spent: keep it so.
            .adjust(|f, delay| delay.map(|d| f.retry_after.map_or(d, |asked| d.max(asked))))
            .notify(|f, delay| {
                let e = &f.error;
                tracing::warn!(
                    method = %e.method, path = %e.path, error = %e.summary(), delay_ms = delay.as_millis() as u64,
                    "Rancher request failed; retrying"
                );
            })
            .await
            .map_err(|f| f.error)
    }

    async fn send_once(&self, method: &Method, url: &Url, body: Option<&Value>) -> Result<Body, Failure> {
        // Per client (discovery's fan-out), per Rancher (shared by every job), per agent (workers).
        let _permit = self.limiter.acquire().await;
        let _endpoint = self.endpoint.requests.acquire().await;
        let _worker = match &self.workers {
            Some(w) => w.acquire().await.ok(),
            None => None,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .endpoint
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(ACCEPT, "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let err = |kind| Failure {
            error: ApiError {
                method: method.clone(),
                path: url.path().to_string(),
                kind: Box::new(kind),
            },
            retry_after: None,
        };
        let operation = operation_label(method, url);
        let mut resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                crate::telemetry::metrics().rancher_request(&operation, "error");
                return Err(err(self.transport_kind(&e)));
            }
        };
        let status = resp.status();
        self.learn_clock(resp.headers());
        crate::telemetry::metrics().rancher_request(&operation, status.as_str());
        tracing::debug!(%method, path = url.path(), status = status.as_u16(), "rancher request");
        if status.is_success() {
            let too_large = || {
                err(ErrorKind::TooLarge {
                    limit: self.max_body,
                    page_size: self.page_size,
                })
            };
            if resp.content_length().is_some_and(|n| n > self.max_body as u64) {
                return Err(too_large());
            }
            let mut held = self.budget.reserve();
            match read_capped(&mut resp, self.max_body, &mut held).await {
                Ok((bytes, false)) => Ok(Body::new(bytes, held)),
                Ok((_, true)) => Err(too_large()),
                Err(ReadError::Http(e)) => Err(err(self.transport_kind(&e))),
                Err(ReadError::OverBudget(over)) => Err(err(ErrorKind::OverBudget {
                    budget: over.budget,
                    page_size: self.page_size,
                })),
            }
        } else {
            let retry_after = matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
                .then(|| retry_after(resp.headers(), Utc::now()))
                .flatten();
            // An error body cut short at the cap (or by the budget) still yields the status; its
            // message may be lost.
            let mut held = self.budget.reserve();
            let bytes = read_capped(&mut resp, MAX_ERROR_BODY_BYTES, &mut held)
                .await
                .map(|(b, _)| b)
                .unwrap_or_default();
            let mut kind = status_kind(status, &bytes, self.scrub.expose_secret());
            if status.is_redirection()
                && let ErrorKind::Status { message, .. } = &mut kind
            {
                // Redirects are not followed (security review N12): a 307 would send the key and
                // a create-user body (a password) on to wherever it points.
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|l| scrub(&l.chars().take(200).collect::<String>(), self.scrub.expose_secret()))
                    .unwrap_or_default();
                *message = format!(
                    "Rancher's address redirects to {to:?}; redirects are not followed, so the key goes \
                     only to the address configured: set the integration's url to the one Rancher serves"
                );
            }
            let mut failure = err(kind);
            failure.retry_after = retry_after;
            Err(failure)
        }
    }

    /// Remembers Rancher's clock from an answer's `Date` header (RFC 7231, whole seconds).
    fn learn_clock(&self, headers: &HeaderMap) {
        let Some(date) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
        else {
            return;
        };
        *self.clock.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((date.with_timezone(&Utc), std::time::Instant::now()));
    }

    /// Rancher's time now: the `Date` of its latest answer plus the time since it arrived, or
    /// this machine's clock before any answer carried one. `Date` has whole seconds: up to one
    /// second early, which errs on keeping a binding a moment longer, never on removing it early.
    pub fn rancher_now(&self) -> DateTime<Utc> {
        match *self.clock.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((date, at)) => date + chrono::Duration::from_std(at.elapsed()).unwrap_or_default(),
            None => Utc::now(),
        }
    }

    /// Whether an answer from Rancher has told its clock yet.
    pub fn knows_rancher_time(&self) -> bool {
        self.clock.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn transport_kind(&self, e: &reqwest::Error) -> ErrorKind {
        let text = scrub(&crate::error_chain(e), self.scrub.expose_secret());
        if e.is_timeout() {
            ErrorKind::Timeout(self.timeout)
        } else if text.to_ascii_lowercase().contains("certificate") {
            ErrorKind::Tls(text)
        } else {
            ErrorKind::Transport(text)
        }
    }
}

/// Default cap on requests in flight to one Rancher, shared by every job for it (Rancher's API
/// server serves each v3 list from its cache; 32 concurrent requests keep a busy instance
/// responsive). The integration's `max_requests` changes it.
pub const DEFAULT_ENDPOINT_REQUESTS: usize = 32;
/// Endpoints kept: one per (URL, CA, timeouts, proxy settings). A connector serves a handful of
/// Rancher instances; the bound only matters if jobs keep naming new ones.
const ENDPOINT_CACHE: usize = 64;

/// What makes two jobs' HTTP clients interchangeable. The API key is not part of it (it is a
/// header of each request), so nothing here is secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointKey {
    base: String,
    /// SHA-256 of the custom CA's PEM: the PEM is public, but a digest keeps the key small.
    ca: Option<[u8; 32]>,
    timeout: Duration,
    connect_timeout: Duration,
    pool: usize,
    max_requests: usize,
    /// SHA-256 of the proxy and root-store variables as the process sees them now: reqwest reads
    /// them when a client is built, so a change means a new client. A digest, because a proxy URL
    /// may carry a password.
    env: [u8; 32],
}

const ENDPOINT_ENV: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

impl EndpointKey {
    fn of(config: &RancherConfig) -> EndpointKey {
        use sha2::Digest;
        EndpointKey {
            base: config.base_url.as_str().to_string(),
            ca: config
                .certificate_authority
                .as_ref()
                .map(|pem| sha2::Sha256::digest(pem.as_bytes()).into()),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            pool: config.concurrency,
            max_requests: config.max_requests,
            env: ENDPOINT_ENV
                .iter()
                .fold(sha2::Sha256::new(), |h, k| {
                    // Unset and empty differ: a length prefix keeps values apart.
                    let v = std::env::var(k).ok();
                    h.chain_update(format!("{}:{}", v.is_some(), v.as_deref().map_or(0, str::len)))
                        .chain_update(v.unwrap_or_default())
                })
                .finalize()
                .into(),
        }
    }
}

/// One Rancher endpoint as the process sees it: the HTTP client (root store loaded and CA parsed
/// once, connections kept alive and TLS sessions resumed) and the cap on requests in flight to
/// it, shared by every job.
pub struct Endpoint {
    http: reqwest::Client,
    requests: Semaphore,
    /// Which build this is (process-wide counter): equal serials mean one shared client.
    serial: u64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("serial", &self.serial)
            .field("requests_available", &self.requests.available_permits())
            .finish()
    }
}

static ENDPOINTS: LazyLock<Mutex<lru::LruCache<EndpointKey, Arc<Endpoint>>>> = LazyLock::new(|| {
    Mutex::new(lru::LruCache::new(
        NonZeroUsize::new(ENDPOINT_CACHE).unwrap_or(NonZeroUsize::MIN),
    ))
});
static ENDPOINT_BUILDS: AtomicU64 = AtomicU64::new(0);

impl Endpoint {
    /// The endpoint for `config`, built on first use and rebuilt only when its configuration
    /// (URL, CA, timeouts, pool, proxy variables) changes.
    ///
    /// # Errors
    /// `Config` if the CA is not usable PEM or the TLS setup fails.
    pub fn shared(config: &RancherConfig) -> Result<Arc<Endpoint>, IntegrationError> {
        let key = EndpointKey::of(config);
        let mut cache = ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache.get(&key) {
            return Ok(hit.clone());
        }
        // Built under the lock: jobs that start together for a new Rancher build it once.
        let built = Arc::new(Endpoint::build(config)?);
        cache.put(key, built.clone());
        Ok(built)
    }

    /// A new endpoint, not shared (the cache's builder).
    ///
    /// # Errors
    /// As [`Endpoint::shared`].
    pub fn build(config: &RancherConfig) -> Result<Endpoint, IntegrationError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("apono-connector/", env!("CARGO_PKG_VERSION")))
            // Keep as many idle connections as requests may be in flight: a burst of jobs
            // reuses them instead of connecting (and handshaking) again.
            .pool_max_idle_per_host(config.max_requests.max(config.concurrency))
            .tcp_nodelay(true)
            // Never on to another address with the key or a body (security review N12).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &config.certificate_authority {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| IntegrationError::Config {
                    message: format!("certificate_authority is not a usable PEM certificate: {e}"),
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| IntegrationError::Config {
            message: format!("cannot set up the HTTP client for Rancher: {}", crate::error_chain(&e)),
        })?;
        Ok(Endpoint {
            http,
            requests: Semaphore::new(config.max_requests.max(1)),
            serial: ENDPOINT_BUILDS.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// Which build this is: two clients with the same serial share one HTTP client and pool.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// A bounded metric label for a request: the method and the collection, never an id
/// (`GET users`, `POST clusterroletemplatebindings`, `GET namespaces`, `POST users?action=setpassword`).
fn operation_label(method: &Method, url: &Url) -> String {
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let after_v3 = segments
        .iter()
        .position(|s| *s == "v3")
        .map(|i| &segments[i + 1..])
        .unwrap_or(&[]);
    let collection = match after_v3 {
        ["cluster", _, rest @ ..] => rest.first().copied().unwrap_or("cluster"),
        [first, ..] => first,
        [] => "root",
    };
    match url.query_pairs().find(|(k, _)| k == "action") {
        Some((_, action)) => format!("{method} {collection}?action={action}"),
        None => format!("{method} {collection}"),
    }
}

/// `64 MiB`, `1 KiB`, `100 bytes`.
fn byte_size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// One try's failure, with the wait the server asked for before the next try.
struct Failure {
    error: ApiError,
    retry_after: Option<Duration>,
}

/// Why a body could not be read.
enum ReadError {
    Http(reqwest::Error),
    OverBudget(OverBudget),
}

/// Reads at most `cap` bytes of the (decoded) body; `true` when there was more. The buffer's
/// capacity is taken from `held` before it is allocated: a body announced by `Content-Length` at
/// once, one of unknown length (gzip) as it grows.
async fn read_capped(
    resp: &mut reqwest::Response,
    cap: usize,
    held: &mut Reservation,
) -> Result<(Vec<u8>, bool), ReadError> {
    let mut out: Vec<u8> = Vec::new();
    if let Some(announced) = resp.content_length().and_then(|n| usize::try_from(n).ok()) {
        let size = announced.min(cap);
        held.grow_to(size).await.map_err(ReadError::OverBudget)?;
        out.reserve_exact(size);
    }
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
        let take = chunk.len().min(cap - out.len());
        let needed = out.len() + take;
        if needed > out.capacity() {
            // Doubling, as `Vec` would, but never past the cap.
            let size = needed.max(out.capacity() * 2).max(8 << 10).min(cap);
            held.grow_to(size).await.map_err(ReadError::OverBudget)?;
            out.reserve_exact(size - out.len());
        }
        out.extend_from_slice(&chunk[..take]);
        if take < chunk.len() {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP date (RFC 9110 §10.2.3),
/// at most [`MAX_RETRY_AFTER`]; a date in the past asks for none. `None` when absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is an RFC 2822 date.
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
            (at - now).to_std().unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Pages of one listing, fetched on demand (bounded memory: one page at a time).
///
/// Guards the marker-restart trap: when the item a `next` marker names is deleted between
/// pages, Rancher silently restarts the listing at item 0. Items already seen are dropped, a
/// restart is tolerated [`MAX_RESTARTS`] times, and a run of pages with nothing new longer than
/// the listing so far ends it with a retryable `Unavailable` error rather than a loop: on a busy
/// install (objects deleted while paging, Apono's own revokes among them) a later try converges.
pub struct Pager<'c, T> {
    client: &'c Client,
    next: Option<Url>,
    /// The listing's URL could not be built: its first page is this error.
    refused: Option<ApiError>,
    what: String,
    seen: HashSet<String>,
    /// Tries per page (the client's retry policy, unless [`Pager::with_attempts`] lowered it).
    attempts: usize,
    pages: u32,
    fresh_pages: u32,
    stalled: u32,
    restarts: u32,
    prev_last_seen: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned + HasId> Pager<'_, T> {
    /// At most `attempts` tries per page (at least 1, never more than the client's policy): for
    /// a route where waiting through every retry costs more than giving up.
    #[must_use]
    pub fn with_attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.clamp(1, self.attempts.max(1));
        self
    }

    /// The next page's new items, or `None` when the listing is done.
    ///
    /// # Errors
    /// The request's failure, `Unavailable` when the listing does not converge, or `Protocol`
    /// when Rancher's `next` cannot be followed.
    pub async fn next_page(&mut self) -> Result<Option<Vec<T>>, IntegrationError> {
        self.next_page_raw().await.map_err(|e| match e {
            PageError::Api(e) => e.into_error(),
            PageError::Loop(e) => e,
        })
    }

    /// As [`Pager::next_page`], keeping the request's failure as an [`ApiError`] for callers
    /// that treat some statuses specially.
    ///
    /// # Errors
    /// The request's failure, or (as `Loop`) the listing's own failure, as [`Pager::next_page`].
    pub async fn next_page_raw(&mut self) -> Result<Option<Vec<T>>, PageError> {
        if let Some(e) = self.refused.take() {
            return Err(PageError::Api(e));
        }
        let Some(url) = self.next.take() else {
            return Ok(None);
        };
        self.pages += 1;
        if self.pages > MAX_PAGES {
            return Err(PageError::Loop(
                self.not_converged(format!("more than {MAX_PAGES} pages")),
            ));
        }
        let page: Collection<T> = self
            .client
            .get_tries(url.clone(), self.attempts)
            .await
            .map_err(PageError::Api)?;
        let first_seen = page.data.first().is_some_and(|o| self.seen.contains(o.id()));
        if first_seen && !self.prev_last_seen {
            self.restarts += 1;
            tracing::warn!(
                listing = %self.what, page = self.pages,
                "Rancher restarted the listing from the beginning (its page marker was deleted); skipping items already seen"
            );
            if self.restarts > MAX_RESTARTS {
                return Err(PageError::Loop(self.not_converged(format!(
                    "the listing restarted from the beginning {} times (objects deleted while paging)",
                    self.restarts
                ))));
            }
        }
        let mut fresh = Vec::with_capacity(page.data.len());
        let mut last_seen = self.prev_last_seen;
        for item in page.data {
            let id = item.id().to_string();
            last_seen = self.seen.contains(&id);
            if !last_seen {
                self.seen.insert(id);
                fresh.push(item);
            }
        }
        self.prev_last_seen = last_seen;
        if fresh.is_empty() {
            self.stalled += 1;
        } else {
            self.stalled = 0;
            self.fresh_pages += 1;
        }
        let pagination = page.pagination.unwrap_or_default();
        if pagination.partial
            && let Some(next) = pagination.next.as_deref().filter(|n| !n.is_empty())
        {
            if self.stalled > self.fresh_pages + 1 {
                return Err(PageError::Loop(self.not_converged(format!(
                    "{} pages in a row brought nothing new (a paging loop)",
                    self.stalled
                ))));
            }
            self.next = Some(self.follow(next).map_err(PageError::Loop)?);
        }
        Ok(Some(fresh))
    }

    /// Every remaining item that passes `keep` (for small, filtered listings).
    ///
    /// # Errors
    /// As [`Pager::next_page`].
    pub async fn collect_matching(mut self, mut keep: impl FnMut(&T) -> bool) -> Result<Vec<T>, IntegrationError> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page().await? {
            out.extend(page.into_iter().filter(|i| keep(i)));
        }
        Ok(out)
    }

    /// The first item that passes `keep`, reading no further pages than needed.
    ///
    /// # Errors
    /// As [`Pager::next_page`].
    pub async fn find(mut self, mut keep: impl FnMut(&T) -> bool) -> Result<Option<T>, IntegrationError> {
        while let Some(page) = self.next_page().await? {
            if let Some(found) = page.into_iter().find(|i| keep(i)) {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// `next` as sent by Rancher (an absolute URL built from its own idea of its address),
    /// re-pointed at the origin this client talks to.
    fn follow(&self, next: &str) -> Result<Url, IntegrationError> {
        let base = &self.client.base;
        let mut url = Url::parse(next)
            .or_else(|_| base.join(next))
            .map_err(|e| self.protocol(format!("pagination.next {next:?} is not a URL ({e})")))?;
        let ok = url.set_scheme(base.scheme()).is_ok()
            && url.set_host(base.host_str()).is_ok()
            && url.set_port(base.port_or_known_default()).is_ok();
        if !ok {
            return Err(self.protocol(format!("pagination.next {next:?} cannot be followed")));
        }
        if !url.query_pairs().any(|(k, _)| k == "limit") {
            url.query_pairs_mut()
                .append_pair("limit", &self.client.page_size.to_string());
        }
        Ok(url)
    }

    /// Objects changing while paging: transient, so the job's retry gets another go.
    fn not_converged(&self, why: String) -> IntegrationError {
        IntegrationError::Unavailable {
            message: format!(
                "listing {} from Rancher did not converge: {why}; stopped after {} pages (objects are changing \
                 while paging; a retry usually succeeds)",
                self.what, self.pages
            ),
        }
    }

    fn protocol(&self, why: String) -> IntegrationError {
        IntegrationError::Protocol {
            message: format!(
                "listing {} from Rancher failed: {why}; stopped after {} pages",
                self.what, self.pages
            ),
        }
    }
}

/// Why a page could not be had.
#[derive(Debug)]
pub enum PageError {
    Api(ApiError),
    /// The listing does not converge (marker restarts, a paging loop: `Unavailable`) or its
    /// `next` cannot be followed (`Protocol`).
    Loop(IntegrationError),
}

/// A failed Rancher request: what was asked and what went wrong. Carries no credentials.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub method: Method,
    pub path: String,
    /// Boxed: errors travel in `Result`s on every call, and are rare.
    pub kind: Box<ErrorKind>,
}

#[derive(Debug, Clone)]
pub enum ErrorKind {
    /// Rancher (or a proxy) answered with an error status.
    Status {
        status: u16,
        code: Option<String>,
        message: String,
        field: Option<String>,
    },
    Timeout(Duration),
    /// TLS verification failed: retrying will not help.
    Tls(String),
    /// Connection refused or reset, DNS failure, a body cut short.
    Transport(String),
    /// A success answer that is not the JSON expected.
    Decode(String),
    /// A success answer larger than `limit` bytes (decoded), read no further.
    TooLarge {
        limit: usize,
        page_size: u32,
    },
    /// A URL path segment that is not an id (`..`, `/`, `?`...): refused before any request.
    BadSegment(String),
    /// Answers being read at once across the process already hold the memory budget of
    /// `budget` bytes ([`super::budget`]), and did not give it back in time.
    OverBudget {
        budget: usize,
        page_size: u32,
    },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match &*self.kind {
            ErrorKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match &*self.kind {
            ErrorKind::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    pub fn field(&self) -> Option<&str> {
        match &*self.kind {
            ErrorKind::Status { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// Rancher's own message (or the transport's).
    pub fn message(&self) -> &str {
        match &*self.kind {
            ErrorKind::Status { message, .. } => message,
            ErrorKind::Timeout(_) => "timed out",
            ErrorKind::Tls(m) | ErrorKind::Transport(m) | ErrorKind::Decode(m) => m,
            ErrorKind::TooLarge { .. } => "answer too large",
            ErrorKind::OverBudget { .. } => "answers in flight over the memory budget",
            ErrorKind::BadSegment(m) => m,
        }
    }

    /// The same failure with `secret` removed from the message Rancher (or a proxy) sent: for a
    /// request whose body carried a generated password, which some servers echo in a 4xx.
    #[must_use]
    pub fn scrubbed(mut self, secret: &str) -> ApiError {
        if let ErrorKind::Status { message, .. } = &mut *self.kind {
            *message = scrub_cut(message, secret);
        }
        self
    }

    /// Worth retrying: 5xx (a 503 ClusterUnavailable too: a downstream cluster's agent
    /// reconnects), 429, timeouts, broken connections.
    pub fn is_transient(&self) -> bool {
        match &*self.kind {
            ErrorKind::Status { status, .. } => *status >= 500 || *status == 429,
            ErrorKind::Timeout(_) | ErrorKind::Transport(_) => true,
            // Over budget: not at once (the same answer would be read again); the job retries.
            ErrorKind::Tls(_)
            | ErrorKind::Decode(_)
            | ErrorKind::TooLarge { .. }
            | ErrorKind::BadSegment(_)
            | ErrorKind::OverBudget { .. } => false,
        }
    }

    /// `GET /v3/users answered 503 ClusterUnavailable: ...`
    pub fn summary(&self) -> String {
        match &*self.kind {
            ErrorKind::Status {
                status, code, message, ..
            } => {
                let code = code.as_deref().map(|c| format!(" {c}")).unwrap_or_default();
                if message.is_empty() {
                    format!("{} {} answered {status}{code}", self.method, self.path)
                } else {
                    format!("{} {} answered {status}{code}: {message}", self.method, self.path)
                }
            }
            ErrorKind::Timeout(t) => format!("{} {} got no answer within {}s", self.method, self.path, t.as_secs()),
            ErrorKind::Tls(m) => format!("{} {}: TLS verification failed: {m}", self.method, self.path),
            ErrorKind::Transport(m) => format!("{} {} failed: {m}", self.method, self.path),
            ErrorKind::Decode(m) => format!(
                "{} {} answered JSON this agent does not understand: {m}",
                self.method, self.path
            ),
            ErrorKind::TooLarge { limit, .. } => format!(
                "{} {} answered more than {}, the most this agent reads",
                self.method,
                self.path,
                byte_size(*limit)
            ),
            ErrorKind::BadSegment(m) => format!("no request was sent: {m}"),
            ErrorKind::OverBudget { budget, .. } => format!(
                "{} {}: the answer was not read: Rancher answers being read at once already hold the agent's \
                 memory budget for them ({} in total, at most {} each) and did not free it within {} s",
                self.method,
                self.path,
                byte_size(*budget),
                byte_size(MAX_BODY_BYTES),
                super::budget::BUDGET_WAIT.as_secs()
            ),
        }
    }

    /// The default mapping to the integration's typed errors. Callers handle the statuses that
    /// mean something specific to them (a 404 on a lookup, a 409 on a create) before this.
    pub fn into_error(self) -> IntegrationError {
        let summary = self.summary();
        match &*self.kind {
            ErrorKind::Status {
                status: 401, message, ..
            } => refused(&self.method, &self.path, message),
            ErrorKind::Status { status: 403, .. } => IntegrationError::PermissionDenied {
                message: format!(
                    "Rancher denied the request ({summary}); the API key's user lacks this permission: use a key \
                     created by an admin user"
                ),
            },
            ErrorKind::Status { status: 404, .. } => IntegrationError::NotFound {
                message: format!("not found in Rancher ({summary})"),
            },
            ErrorKind::Status { status: 409, code, .. } if code.as_deref() == Some("Conflict") => {
                IntegrationError::Unavailable {
                    message: format!("Rancher reported a conflicting change ({summary}); try again"),
                }
            }
            ErrorKind::Status {
                status: 400 | 409 | 422,
                ..
            } => IntegrationError::Invalid {
                message: format!("Rancher refused the request ({summary})"),
            },
            ErrorKind::Status { status, .. } if *status >= 500 || *status == 429 => IntegrationError::Unavailable {
                message: format!("Rancher is unavailable ({summary})"),
            },
            ErrorKind::Status { .. } | ErrorKind::Decode(_) => IntegrationError::Protocol {
                message: format!("unexpected answer from Rancher ({summary})"),
            },
            ErrorKind::Timeout(_) | ErrorKind::Transport(_) => IntegrationError::Unavailable {
                message: format!("cannot reach Rancher ({summary})"),
            },
            ErrorKind::TooLarge { page_size, .. } => IntegrationError::Protocol {
                message: format!(
                    "{summary}; lower page_size in the integration config (now {page_size}) so each page of a \
                     listing is smaller"
                ),
            },
            // Memory frees as other answers are read: the job's retry usually gets through.
            ErrorKind::OverBudget { page_size, .. } => IntegrationError::Unavailable {
                message: format!(
                    "{summary}; the job is retried later; if this persists, Rancher is sending answers far larger \
                     than usual: lower page_size in the integration config (now {page_size}) or check what \
                     the host in the integration config serves"
                ),
            },
            ErrorKind::BadSegment(_) => IntegrationError::Invalid {
                message: format!("{summary}; the job carries an id that is not a Rancher id"),
            },
            ErrorKind::Tls(_) => IntegrationError::Config {
                message: format!(
                    "cannot reach Rancher securely ({summary}); if Rancher uses a private CA, set \
                     certificate_authority to its PEM certificate"
                ),
            },
        }
    }
}

/// A 401: what it means for the operator, and never the key. Rancher's auth filter always answers
/// "Unauthorized 401: must authenticate", whatever the cause (`pkg/auth/requests/filter.go`), so
/// every cause is listed; validate probes for a cluster scope (see `validate`).
fn refused(method: &Method, path: &str, message: &str) -> IntegrationError {
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    IntegrationError::CredentialsRefused {
        message: format!(
            "Rancher refused the API key (HTTP 401 on {method} {path}{detail}); Rancher does not say why: the key is \
             expired, disabled or was rotated, its user was disabled, or it is scoped to a cluster (a scoped key is \
             refused outside its cluster); create a new API key with no scope and update the secret"
        ),
    }
}

/// The error body: Norman's `{type:"error", status, code, message, fieldName}`, the auth filter's
/// `{status:"401", message}` (status as a string, no code), or anything else (a proxy's HTML).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    /// Parsed (string or number) so that neither form fails the body; the HTTP status is the
    /// one acted on.
    #[serde(default, deserialize_with = "string_or_int")]
    #[allow(dead_code)]
    status: Option<u16>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    field_name: Option<String>,
}

fn string_or_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// Reads an error answer. Pure, for tests.
pub fn status_kind(status: StatusCode, body: &[u8], secret: &str) -> ErrorKind {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (code, message, field) = match parsed {
        Some(b) => (
            b.code.filter(|c| !c.is_empty()),
            b.message.unwrap_or_default(),
            b.field_name.filter(|f| !f.is_empty()),
        ),
        None => {
            let text = String::from_utf8_lossy(body);
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let text = if text.starts_with('<') {
                status.canonical_reason().unwrap_or("").to_string()
            } else {
                text
            };
            (None, text, None)
        }
    };
    let mut message = scrub(message.trim(), secret);
    if message.chars().count() > MAX_MESSAGE {
        message = message.chars().take(MAX_MESSAGE).collect::<String>() + "...";
    }
    ErrorKind::Status {
        status: status.as_u16(),
        code,
        message,
        field,
    }
}

/// [`scrub`] for a message already cut to `MAX_MESSAGE`: a secret the cut went through left its
/// head just before the ellipsis, which is removed too (security review N9).
fn scrub_cut(text: &str, secret: &str) -> String {
    let text = scrub(text, secret);
    let Some(kept) = text.strip_suffix("...") else {
        return text;
    };
    if secret.len() < 4 {
        return text;
    }
    let head = (1..secret.len())
        .rev()
        .filter(|&n| secret.is_char_boundary(n))
        .find(|&n| kept.ends_with(&secret[..n]));
    match head {
        Some(n) => format!("{}[REDACTED]...", &kept[..kept.len() - n]),
        None => text,
    }
}

/// Removes the secret from text that came from outside.
fn scrub(text: &str, secret: &str) -> String {
    if secret.len() >= 4 && text.contains(secret) {
        text.replace(secret, "[REDACTED]")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn a_password_the_message_cut_goes_through_is_not_kept_in_part() {
        let password = "Zq8vLm3TxR7pKw2Ns9Yb";
        for at in [MAX_MESSAGE - 15, MAX_MESSAGE - 4, MAX_MESSAGE - 1, MAX_MESSAGE - 30] {
            let echoed = format!("{}{password} is not accepted", "x".repeat(at));
            let body = serde_json::to_vec(&serde_json::json!({"code": "InvalidFormat", "message": echoed})).unwrap();
            let kind = status_kind(StatusCode::UNPROCESSABLE_ENTITY, &body, "api-key-secret");
            let ErrorKind::Status { message, .. } = &kind else {
                panic!("{kind:?}")
            };
            let scrubbed = scrub_cut(message, password);
            assert!(
                !scrubbed.contains(&password[..3]),
                "cut at {at}: part of the password survives: {scrubbed}"
            );
            assert!(scrubbed.contains("[REDACTED]"), "{scrubbed}");
        }
    }

    #[test]
    fn metric_labels_name_the_collection_never_an_id() {
        let l = |m: Method, u: &str| operation_label(&m, &Url::parse(u).unwrap());
        assert_eq!(l(Method::GET, "https://r/v3/users?username=alice"), "GET users");
        assert_eq!(l(Method::GET, "https://r/v3/users/u-abc12"), "GET users");
        assert_eq!(
            l(Method::POST, "https://r/v3/users/u-abc12?action=setpassword"),
            "POST users?action=setpassword"
        );
        assert_eq!(
            l(Method::GET, "https://r/v3/cluster/c-7x2k9/namespaces?limit=5"),
            "GET namespaces"
        );
        assert_eq!(
            l(Method::DELETE, "https://r/v3/clusterroletemplatebindings/c-1:crtb-x"),
            "DELETE clusterroletemplatebindings"
        );
        assert_eq!(l(Method::GET, "https://r/v3"), "GET root");
    }
}
