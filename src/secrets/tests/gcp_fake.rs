//! The GCP store against a wire-level Secret Manager fake (the official client speaks HTTP/JSON):
//! `GET /v1/projects/{p}/secrets/{s}` and `GET .../versions/{v}:access`, Google's error JSON.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::json;

use super::support::{reference, serve_http, serve_http_counting, value_of};
use crate::secrets::{GcpStore, SecretStores};

/// A secret's labels and versions (version n at index n-1).
pub type Entry = (HashMap<String, String>, Vec<Vec<u8>>);

/// An error answer: HTTP status, Google's status name, message.
pub type Failure = (u16, &'static str, &'static str);

#[derive(Clone, Default)]
pub struct Fake {
    /// secret id → entry
    pub secrets: Arc<Mutex<HashMap<String, Entry>>>,
    /// Requests to the Secret Manager API (`/v1/...`) seen so far.
    pub requests: Arc<AtomicUsize>,
    /// Answers for the next requests, before any secret is looked up.
    pub fail_next: Arc<Mutex<VecDeque<Failure>>>,
    /// Accept requests and never answer.
    pub stall: Arc<AtomicBool>,
    /// Answers for the next token requests (`/token`): HTTP status, OAuth error, description.
    pub token_fail_next: Arc<Mutex<VecDeque<Failure>>>,
    /// The resource paths asked for (`projects/p/secrets/s/versions/1:access`), in order.
    pub paths: Arc<Mutex<Vec<String>>>,
    /// Regional secrets: (location, secret id) → entry, served under `/locations/{l}/`.
    pub regional: Arc<Mutex<HashMap<(String, String), Entry>>>,
}

impl Fake {
    /// The next `times` requests get this error.
    pub fn fail(&self, times: usize, failure: Failure) {
        self.fail_next
            .lock()
            .unwrap()
            .extend(std::iter::repeat_n(failure, times));
    }
}

fn error(code: u16, status: &str, message: String) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({"error": {"code": code, "message": message, "status": status}})),
    )
        .into_response()
}

/// The last `Authorization` header the fake saw.
pub static LAST_AUTHORIZATION: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

async fn handle(State(fake): State<Fake>, headers: axum::http::HeaderMap, Path(rest): Path<String>) -> Response {
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        *LAST_AUTHORIZATION.lock().unwrap() = Some(auth.to_string());
    }
    fake.requests.fetch_add(1, Ordering::SeqCst);
    fake.paths.lock().unwrap().push(rest.clone());
    if fake.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let failure = fake.fail_next.lock().unwrap().pop_front();
    if let Some((code, status, message)) = failure {
        return error(code, status, message.to_string());
    }
    // projects/{p}[/locations/{l}]/secrets/{s}[/versions/{v}:access]; a regional secret exists
    // only under its location (the global API answers NOT_FOUND for it, as Google's does).
    let mut parts: Vec<&str> = rest.split('/').collect();
    let location = match parts.as_slice() {
        ["projects", _, "locations", l, "secrets", ..] => {
            let l = l.to_string();
            parts.drain(2..4);
            Some(l)
        }
        _ => None,
    };
    let (project, secret) = match parts.as_slice() {
        ["projects", p, "secrets", s, ..] => (p.to_string(), s.to_string()),
        _ => return error(404, "NOT_FOUND", format!("no route {rest}")),
    };
    if project == "forbidden-project" {
        return error(
            403,
            "PERMISSION_DENIED",
            format!(
                "Permission 'secretmanager.secrets.get' denied for resource 'projects/{project}/secrets/{secret}' (or it may not exist)."
            ),
        );
    }
    // roles/secretmanager.secretAccessor: versions.access only, no secrets.get.
    if project == "accessor-only" && parts.len() == 4 {
        return error(
            403,
            "PERMISSION_DENIED",
            format!(
                "Permission 'secretmanager.secrets.get' denied for resource 'projects/{project}/secrets/{secret}' (or it may not exist)."
            ),
        );
    }
    let found = match &location {
        Some(l) => fake.regional.lock().unwrap().get(&(l.clone(), secret.clone())).cloned(),
        None => fake.secrets.lock().unwrap().get(&secret).cloned(),
    };
    let name = match &location {
        Some(l) => format!("projects/{project}/locations/{l}/secrets/{secret}"),
        None => format!("projects/{project}/secrets/{secret}"),
    };
    let Some((labels, versions)) = found else {
        return error(
            404,
            "NOT_FOUND",
            format!("Secret [{name}] not found or has no versions."),
        );
    };
    match parts.as_slice() {
        [_, _, _, _] => axum::Json(json!({
            "name": name,
            "replication": {"automatic": {}},
            "createTime": "2026-01-01T00:00:00Z",
            "labels": labels,
            "etag": "\"1\"",
        }))
        .into_response(),
        [_, _, _, _, "versions", v] if v.ends_with(":access") => {
            let v = v.trim_end_matches(":access");
            let index = if v == "latest" {
                versions.len()
            } else {
                v.parse().unwrap_or(0)
            };
            let Some(data) = index.checked_sub(1).and_then(|i| versions.get(i)) else {
                return error(
                    404,
                    "NOT_FOUND",
                    format!("Secret Version [{name}/versions/{v}] not found."),
                );
            };
            axum::Json(json!({
                "name": format!("{name}/versions/{index}"),
                "payload": {"data": base64::engine::general_purpose::STANDARD.encode(data)},
            }))
            .into_response()
        }
        _ => error(404, "NOT_FOUND", format!("no route {rest}")),
    }
}

/// Google's OAuth token endpoint for an `authorized_user` refresh (google-cloud-auth posts JSON).
async fn oauth_token(State(fake): State<Fake>, axum::Json(form): axum::Json<serde_json::Value>) -> Response {
    let failure = fake.token_fail_next.lock().unwrap().pop_front();
    if let Some((code, status, message)) = failure {
        return (
            StatusCode::from_u16(code).unwrap(),
            axum::Json(json!({"error": status, "error_description": message})),
        )
            .into_response();
    }
    let ok = form["grant_type"] == "refresh_token"
        && form["refresh_token"] == "fake-refresh-token"
        && form["client_secret"] == "fake-client-secret";
    if !ok {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant", "error_description": "Bad Request"})),
        )
            .into_response();
    }
    axum::Json(json!({
        "access_token": "gcp-access-token", "expires_in": 3599, "token_type": "Bearer",
        "scope": "https://www.googleapis.com/auth/cloud-platform",
    }))
    .into_response()
}

fn app(fake: &Fake) -> Router {
    Router::new()
        .route("/v1/{*rest}", get(handle))
        .route("/token", axum::routing::post(oauth_token))
        .with_state(fake.clone())
}

/// The fake alone.
pub async fn serve() -> (Fake, std::net::SocketAddr) {
    let fake = Fake::default();
    let addr = serve_http(app(&fake)).await;
    (fake, addr)
}

/// The fake, counting the TCP connections it accepted.
pub async fn serve_counting() -> (Fake, std::net::SocketAddr, Arc<AtomicUsize>) {
    let fake = Fake::default();
    let (addr, connections) = serve_http_counting(app(&fake)).await;
    (fake, addr, connections)
}

pub async fn fake() -> (Fake, GcpStore) {
    let (fake, addr) = serve().await;
    let store = GcpStore::with_endpoint(
        format!("http://{addr}"),
        Some(google_cloud_auth::credentials::anonymous::Builder::new().build()),
    );
    (fake, store)
}

pub fn marked() -> HashMap<String, String> {
    HashMap::from([("apono-connector-read".to_string(), "true".to_string())])
}

#[tokio::test]
async fn reads_versions_gates_not_found_and_forbidden() {
    let (fake, store) = fake().await;
    {
        let mut s = fake.secrets.lock().unwrap();
        s.insert(
            "rancher".into(),
            (
                marked(),
                vec![br#"{"access_key":"token-abc","secret_key":"s1"}"#.to_vec()],
            ),
        );
        s.insert("unlabelled".into(), (HashMap::new(), vec![b"v".to_vec()]));
    }
    let stores = SecretStores::empty().with_store(Arc::new(store.requiring_read_mark(true)));
    let r = |project: &str, id: &str| reference(json!({"type": "GCP", "project": project, "secret_id": id}));

    let s = stores.fetch(&r("p1", "rancher")).await.unwrap();
    assert_eq!(value_of(&s, "secret_key"), "s1");

    let e = stores.fetch(&r("p1", "unlabelled")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("label apono-connector-read=true"), "{e}");
    assert!(e.to_string().contains("--update-labels"), "{e}");
    assert!(e.to_string().contains("require_read_mark"), "{e}");

    let e = stores.fetch(&r("p1", "missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    let e = stores.fetch(&r("forbidden-project", "rancher")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("secretmanager"), "{e}");

    // A new version: latest after invalidation; a pinned version stays.
    fake.secrets
        .lock()
        .unwrap()
        .get_mut("rancher")
        .unwrap()
        .1
        .push(br#"{"access_key":"token-abc","secret_key":"s2"}"#.to_vec());
    stores.invalidate(&r("p1", "rancher"));
    assert_eq!(
        value_of(&stores.fetch(&r("p1", "rancher")).await.unwrap(), "secret_key"),
        "s2"
    );
    let pinned = reference(json!({"type": "GCP", "project": "p1", "secret_id": "rancher", "version": "1"}));
    assert_eq!(value_of(&stores.fetch(&pinned).await.unwrap(), "secret_key"), "s1");
    let e = stores
        .fetch(&reference(
            json!({"type": "GCP", "project": "p1", "secret_id": "rancher", "version": "9"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");
}

/// By default access is Google's IAM, as in Apono: the seed's unlabelled secret is read by an
/// identity with `roles/secretmanager.secretAccessor` only (GetSecret would be refused).
#[tokio::test]
async fn unlabelled_secret_is_read_with_access_permission_only() {
    let (fake, store) = fake().await;
    fake.secrets.lock().unwrap().insert(
        "unlabelled".into(),
        (HashMap::new(), vec![br#"{"token":"t"}"#.to_vec()]),
    );
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = reference(json!({"type": "GCP", "project": "accessor-only", "secret_id": "unlabelled"}));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
}

/// Apono's Terraform example gives `secret_id` as a full resource name, with or without a version.
#[tokio::test]
async fn secret_id_as_a_full_resource_name() {
    let (fake, store) = fake().await;
    fake.secrets.lock().unwrap().insert(
        "rancher".into(),
        (
            HashMap::new(),
            vec![br#"{"token":"s1"}"#.to_vec(), br#"{"token":"s2"}"#.to_vec()],
        ),
    );
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = |id: &str| reference(json!({"type": "GCP", "project": "gcp-secrets-project", "secret_id": id}));
    assert_eq!(
        value_of(&stores.fetch(&r("projects/p1/secrets/rancher")).await.unwrap(), "token"),
        "s2"
    );
    assert_eq!(
        value_of(
            &stores
                .fetch(&r("projects/p1/secrets/rancher/versions/1"))
                .await
                .unwrap(),
            "token"
        ),
        "s1"
    );
    // A name the client cannot bind is the reference's fault, not a retryable outage.
    let e = stores.fetch(&r("projects/p1/buckets/rancher")).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
}

/// Application Default Credentials from `GOOGLE_APPLICATION_CREDENTIALS` (an `authorized_user`
/// file whose `token_uri` is the fake), in a child process since the environment is process-wide.
#[tokio::test]
async fn application_default_credentials_from_the_environment() {
    let (fake, addr) = serve().await;
    fake.secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (marked(), vec![br#"{"token":"via-adc"}"#.to_vec()]));
    let dir = tempfile::tempdir().unwrap();
    let adc = dir.path().join("adc.json");
    std::fs::write(
        &adc,
        json!({
            "type": "authorized_user", "client_id": "fake-client.apps.googleusercontent.com",
            "client_secret": "fake-client-secret", "refresh_token": "fake-refresh-token",
            "token_uri": format!("http://{addr}/token"),
        })
        .to_string(),
    )
    .unwrap();
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "secrets::tests::gcp_fake::adc_child",
            "--ignored",
            "--nocapture",
        ])
        .env("APONO_TEST_GCP_ENDPOINT", format!("http://{addr}"))
        .env("GOOGLE_APPLICATION_CREDENTIALS", &adc)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        LAST_AUTHORIZATION.lock().unwrap().as_deref(),
        Some("Bearer gcp-access-token")
    );
}

#[tokio::test]
#[ignore = "run by application_default_credentials_from_the_environment in a child process"]
async fn adc_child() {
    let Ok(endpoint) = std::env::var("APONO_TEST_GCP_ENDPOINT") else {
        return;
    };
    let stores = SecretStores::empty().with_store(Arc::new(GcpStore::with_endpoint(endpoint, None)));
    let r = reference(json!({"type": "GCP", "project": "p1", "secret_id": "rancher"}));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "via-adc");
}

fn gcp_ref() -> crate::secrets::SecretRef {
    reference(json!({"type": "GCP", "project": "p1", "secret_id": "rancher"}))
}

/// A fake holding `rancher`, and a registry over it (no cache, so every fetch reaches the fake).
async fn failing_fake(attempt_timeout: Duration) -> (Fake, SecretStores, std::net::SocketAddr) {
    let (fake, addr) = serve().await;
    fake.secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (HashMap::new(), vec![br#"{"token":"t"}"#.to_vec()]));
    let store = GcpStore::with_endpoint(
        format!("http://{addr}"),
        Some(google_cloud_auth::credentials::anonymous::Builder::new().build()),
    )
    .with_attempt_timeout(attempt_timeout);
    let stores = SecretStores::empty()
        .with_cache_ttl(Duration::ZERO)
        .with_store(Arc::new(store));
    (fake, stores, addr)
}

/// Hang guard only: a capped client answers in seconds, the registry's own limit is 60 s.
async fn fetch_bounded(stores: &SecretStores) -> crate::secrets::SecretError {
    tokio::time::timeout(Duration::from_secs(45), stores.fetch(&gcp_ref()))
        .await
        .expect("the GCP store gave up by itself, well inside the registry's limit")
        .unwrap_err()
}

/// K2: UNAVAILABLE is retried once by the client (not 10 times over 60 s), then reported as
/// retryable with Google's status and message, not as "did not answer within 60s".
#[tokio::test]
async fn unavailable_is_tried_twice_and_reported_with_its_status() {
    let (fake, stores, addr) = failing_fake(Duration::from_secs(10)).await;
    fake.fail(8, (503, "UNAVAILABLE", "The service is currently unavailable."));
    let e = fetch_bounded(&stores).await;
    assert!(e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
    let text = e.to_string();
    assert!(text.contains("Unavailable"), "{e}");
    assert!(text.contains("The service is currently unavailable."), "{e}");
    assert!(text.contains(&addr.to_string()), "{e}");
    assert!(!text.contains("did not answer within"), "{e}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), 2, "one try and one retry");

    // A blip that the one retry covers is not an error at all.
    fake.fail_next.lock().unwrap().clear();
    fake.fail(1, (503, "UNAVAILABLE", "The service is currently unavailable."));
    assert_eq!(value_of(&stores.fetch(&gcp_ref()).await.unwrap(), "token"), "t");
}

/// K2: quota exhaustion (429 RESOURCE_EXHAUSTED) is the agent's to retry with its backoff.
#[tokio::test]
async fn quota_exhaustion_is_retryable_and_not_retried_by_the_client() {
    let (fake, stores, _) = failing_fake(Duration::from_secs(10)).await;
    fake.fail(
        8,
        (
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Access requests' of service 'secretmanager.googleapis.com'.",
        ),
    );
    let e = fetch_bounded(&stores).await;
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("ResourceExhausted"), "{e}");
    assert!(e.to_string().contains("Quota exceeded"), "{e}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1);
}

/// K2: an endpoint that accepts and never answers fails after one bounded attempt (the client
/// does not retry a timeout), naming the host and the limit.
#[tokio::test]
async fn a_stalled_endpoint_times_out_per_attempt_and_names_the_host() {
    let (fake, stores, addr) = failing_fake(Duration::from_millis(500)).await;
    fake.stall.store(true, Ordering::SeqCst);
    let e = fetch_bounded(&stores).await;
    assert!(e.retryable(), "{e}");
    assert!(
        e.to_string().contains(&format!("timed out after 0.5 s at {addr}")),
        "{e}"
    );
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_connection_names_the_host() {
    let port = super::support::free_port(false);
    let store = GcpStore::with_endpoint(
        format!("http://127.0.0.1:{port}"),
        Some(google_cloud_auth::credentials::anonymous::Builder::new().build()),
    );
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let e = fetch_bounded(&stores).await;
    assert!(e.retryable(), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("cannot connect to 127.0.0.1:{port}")), "{e}");
    assert!(text.to_lowercase().contains("refused"), "{e}");
}

/// E1: Google's 4xx answers (its real error JSON) are not retried, carry Google's message and
/// map to what the user must fix; 5xx stay retryable.
#[tokio::test]
async fn google_error_statuses_map_to_their_meaning() {
    let (fake, stores, _) = failing_fake(Duration::from_secs(10)).await;
    let cases: [(Failure, &str, bool); 6] = [
        (
            (400, "INVALID_ARGUMENT", "Invalid resource field value in the request."),
            "secret_store_misconfigured",
            false,
        ),
        (
            (
                404,
                "NOT_FOUND",
                "Secret [projects/p1/secrets/rancher] not found or has no versions.",
            ),
            "secret_not_found",
            false,
        ),
        (
            (
                403,
                "PERMISSION_DENIED",
                "Permission 'secretmanager.versions.access' denied for resource 'projects/p1/secrets/rancher/versions/latest' (or it may not exist).",
            ),
            "secret_not_permitted",
            false,
        ),
        (
            (
                400,
                "FAILED_PRECONDITION",
                "Secret Version [projects/p1/secrets/rancher/versions/1] is in DISABLED state.",
            ),
            "secret_not_found",
            false,
        ),
        (
            (
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            ),
            "secret_not_permitted",
            false,
        ),
        (
            (500, "INTERNAL", "Internal error encountered."),
            "secret_store_unreachable",
            true,
        ),
    ];
    for ((http, status, message), code, retryable) in cases {
        fake.requests.store(0, Ordering::SeqCst);
        fake.fail(1, (http, status, message));
        let e = fetch_bounded(&stores).await;
        assert_eq!(e.code(), code, "{status}: {e}");
        assert_eq!(e.retryable(), retryable, "{status}: {e}");
        assert!(e.to_string().contains(message), "{status}: {e}");
        assert_eq!(
            fake.requests.load(Ordering::SeqCst),
            1,
            "{status}: not retried by the client"
        );
        fake.fail_next.lock().unwrap().clear();
    }
}

/// Getting a token: an `authorized_user` refresh against the fake's token endpoint. A token
/// endpoint that is down is retryable; refused credentials (invalid_grant) are not.
#[tokio::test]
async fn token_endpoint_outage_is_retryable_and_a_refusal_is_not() {
    let (fake, addr) = serve().await;
    fake.secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (HashMap::new(), vec![br#"{"token":"t"}"#.to_vec()]));
    // A fresh credential each time: it keeps its last token (or token error) for a while.
    let stores = || {
        let credentials = google_cloud_auth::credentials::user_account::Builder::new(json!({
            "type": "authorized_user", "client_id": "fake-client.apps.googleusercontent.com",
            "client_secret": "fake-client-secret", "refresh_token": "fake-refresh-token",
        }))
        .with_token_uri(format!("http://{addr}/token"))
        .build()
        .unwrap();
        SecretStores::empty().with_store(Arc::new(GcpStore::with_endpoint(
            format!("http://{addr}"),
            Some(credentials),
        )))
    };

    fake.token_fail_next
        .lock()
        .unwrap()
        .push_back((503, "temporarily_unavailable", "The service is unavailable."));
    let e = fetch_bounded(&stores()).await;
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("access token"), "{e}");

    fake.token_fail_next.lock().unwrap().clear();
    fake.token_fail_next
        .lock()
        .unwrap()
        .push_back((400, "invalid_grant", "Token has been expired or revoked."));
    let e = fetch_bounded(&stores()).await;
    assert!(!e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("invalid_grant"), "{e}");
    assert!(!e.to_string().contains("fake-refresh-token"), "{e}");
    assert!(!e.to_string().contains("fake-client-secret"), "{e}");

    fake.token_fail_next.lock().unwrap().clear();
    assert_eq!(value_of(&stores().fetch(&gcp_ref()).await.unwrap(), "token"), "t");
}

/// Credentials whose token never comes (a metadata server that drops packets).
#[derive(Debug)]
struct StalledCredentials;

impl google_cloud_auth::credentials::CredentialsProvider for StalledCredentials {
    async fn headers(
        &self,
        _: axum::http::Extensions,
    ) -> Result<
        google_cloud_auth::credentials::CacheableResource<axum::http::HeaderMap>,
        google_cloud_auth::errors::CredentialsError,
    > {
        std::future::pending().await
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}

/// K2: getting a token is not covered by the per-attempt limit, so the read has a deadline of
/// its own, and the error says the token source may be the cause.
#[tokio::test]
async fn a_token_that_never_comes_is_bounded_and_named() {
    let (fake, addr) = serve().await;
    let store = GcpStore::with_endpoint(
        format!("http://{addr}"),
        Some(google_cloud_auth::credentials::Credentials::from(StalledCredentials)),
    )
    .with_attempt_timeout(Duration::from_millis(500));
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let e = fetch_bounded(&stores).await;
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("no answer within 1.5 s"), "{e}");
    assert!(e.to_string().contains("token source"), "{e}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), 0);
}

/// Secrets review N14: a regional secret (`location`, or a name with `/locations/L/`) is asked
/// for by its regional name, pinned version included; the global name does not find it.
#[tokio::test]
async fn a_regional_secret_is_read_by_its_regional_name() {
    let (fake, store) = fake().await;
    fake.regional.lock().unwrap().insert(
        ("europe-west1".into(), "rancher".into()),
        (HashMap::new(), vec![b"token-a:v1".to_vec(), b"token-a:v2".to_vec()]),
    );
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = reference(json!({
        "type": "GCP", "project": "p", "secret_id": "rancher", "version": "1", "location": "europe-west1"
    }));
    assert_eq!(r.describe(), "GCP p/rancher@1 (in europe-west1)");
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "value"), "token-a:v1");
    assert_eq!(
        fake.paths.lock().unwrap().last().map(String::as_str),
        Some("projects/p/locations/europe-west1/secrets/rancher/versions/1:access")
    );
    // The same by its full resource name, latest version.
    let by_name = reference(json!({
        "type": "GCP", "project": "p", "secret_id": "projects/p/locations/europe-west1/secrets/rancher"
    }));
    assert_eq!(value_of(&stores.fetch(&by_name).await.unwrap(), "value"), "token-a:v2");
    // Without the location it is not found (what the global endpoint answers).
    let global = reference(json!({"type": "GCP", "project": "p", "secret_id": "rancher"}));
    assert_eq!(stores.fetch(&global).await.unwrap_err().code(), "secret_not_found");
    // A location that is not one is the reference's fault, named, and nothing is sent.
    let before = fake.requests.load(Ordering::SeqCst);
    let bad = reference(json!({
        "type": "GCP", "project": "p", "secret_id": "rancher", "location": "europe-west1.evil.example"
    }));
    let e = stores.fetch(&bad).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(e.to_string().contains("not a Google Cloud location"), "{e}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), before);
}

/// Issue 18: one client per configuration, shared by every read, keeping its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reads_build_one_client_and_reuse_its_connections() {
    let (fake, addr, connections) = serve_counting().await;
    for i in 0..5 {
        fake.secrets.lock().unwrap().insert(
            format!("s{i}"),
            (HashMap::new(), vec![format!("token-{i}:v").into_bytes()]),
        );
    }
    let store = Arc::new(GcpStore::with_endpoint(
        format!("http://{addr}"),
        Some(google_cloud_auth::credentials::anonymous::Builder::new().build()),
    ));
    // No cache: every read reaches the store, as after each TTL in a long-running daemon.
    let stores = SecretStores::empty()
        .with_store(store.clone())
        .with_cache_ttl(Duration::ZERO);
    for round in 0..10 {
        for i in 0..5 {
            let r = reference(json!({"type": "GCP", "project": "p", "secret_id": format!("s{i}")}));
            assert_eq!(
                value_of(&stores.fetch(&r).await.unwrap(), "value"),
                format!("token-{i}:v"),
                "round {round}"
            );
        }
    }
    // A client per read would open 50; a kept pool opens a few (the Google client sometimes
    // drops a connection after an answer).
    let sequential = connections.load(Ordering::SeqCst);
    assert!(sequential <= 10, "{sequential} connections for 50 sequential reads");
    // And many jobs at once: at most one more connection per read in flight.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let stores = stores.clone();
            tokio::spawn(async move {
                let r = reference(json!({"type": "GCP", "project": "p", "secret_id": format!("s{}", i % 5)}));
                stores.fetch(&r).await.map(|_| ())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Concurrent reads of one reference may share one call (singleflight).
    assert!(fake.requests.load(Ordering::SeqCst) >= 50 + 5);
    assert_eq!(store.clients_built(), 1, "one client for one endpoint");
    let opened = connections.load(Ordering::SeqCst);
    assert!(opened <= sequential + 20, "{opened} connections for 70 reads");
    eprintln!("GCP fake: 50 sequential reads opened {sequential} connections; 70 reads {opened}");
}
