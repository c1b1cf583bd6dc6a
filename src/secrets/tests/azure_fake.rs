//! The Azure store against a wire-level Key Vault fake: HTTPS with a self-signed certificate for
//! `*.vault.azure.net`, the 401 `WWW-Authenticate: Bearer authorization=..., resource=...`
//! challenge first (the client discovers its token scope from it), then Key Vault's JSON.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, Transport};
use serde_json::{Value, json};

use super::support::{reference, self_signed, serve_https, value_of};
use crate::secrets::{AzureStore, SecretStores};

pub const VAULT_HOST: &str = "apono-test.vault.azure.net";
/// The id of every secret's current version.
const CURRENT_VERSION: &str = "4387e9f3d6e14c459867679a90fd0f79";
const TOKEN: &str = "fake-entra-token";

/// Hands out a fixed token and records the scopes asked for.
#[derive(Debug, Default)]
pub struct FakeCredential {
    pub scopes: Mutex<Vec<String>>,
}

#[async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(&self, scopes: &[&str], _: Option<TokenRequestOptions<'_>>) -> azure_core::Result<AccessToken> {
        self.scopes.lock().unwrap().extend(scopes.iter().map(|s| s.to_string()));
        Ok(AccessToken::new(
            TOKEN.to_string(),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// A secret's value and tags.
pub type Entry = (String, HashMap<String, String>);
/// A version's tags.
pub type Tags = HashMap<String, String>;

#[derive(Clone, Default)]
pub struct Vault {
    /// name → (value, tags) of the current version
    pub secrets: Arc<Mutex<HashMap<String, Entry>>>,
    /// name → tags of the older versions (what `az keyvault secret set` leaves behind)
    pub older_versions: Arc<Mutex<HashMap<String, Vec<Tags>>>>,
    /// The names whose value was sent, in order (Key Vault's `SecretGet` audit events).
    pub value_reads: Arc<Mutex<Vec<String>>>,
    /// Authenticated `GET /secrets/{name}` requests seen.
    pub requests: Arc<AtomicUsize>,
    /// Answers for the next authenticated reads.
    pub fail_next: Arc<Mutex<VecDeque<Failure>>>,
    /// Accept authenticated reads and never answer.
    pub stall: Arc<AtomicBool>,
    /// (name, version id) → value of an older version, readable by its id.
    pub pinned: Arc<Mutex<HashMap<(String, String), String>>>,
    /// The version ids asked for by `GET /secrets/{name}/{version}`, in order.
    pub versions_read: Arc<Mutex<Vec<String>>>,
}

/// An error answer: HTTP status, Key Vault's error code, message, `Retry-After` seconds.
pub type Failure = (u16, &'static str, &'static str, Option<u32>);

impl Vault {
    /// `az keyvault secret set` on an existing secret: a new current version with these tags.
    pub fn rotate(&self, name: &str, value: &str, tags: HashMap<String, String>) {
        let mut secrets = self.secrets.lock().unwrap();
        if let Some((_, old_tags)) = secrets.insert(name.into(), (value.into(), tags)) {
            self.older_versions
                .lock()
                .unwrap()
                .entry(name.into())
                .or_default()
                .push(old_tags);
        }
    }
}

fn authorized(headers: &HeaderMap) -> Option<Response> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}")) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(
                "WWW-Authenticate",
                "Bearer authorization=\"https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47\", resource=\"https://vault.azure.net\"",
            )],
            axum::Json(json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})),
        )
            .into_response(),
    )
}

/// `GET /secrets/{name}/versions`: every version's properties and tags, never a value.
async fn list_versions(State(vault): State<Vault>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(challenge) = authorized(&headers) {
        return challenge;
    }
    let secrets = vault.secrets.lock().unwrap();
    let Some((_, current)) = secrets.get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
        );
    };
    let older = vault
        .older_versions
        .lock()
        .unwrap()
        .get(&name)
        .cloned()
        .unwrap_or_default();
    let items: Vec<Value> = older
        .iter()
        .chain(std::iter::once(current))
        .enumerate()
        .map(|(i, tags)| {
            json!({
                "id": format!("https://{VAULT_HOST}/secrets/{name}/v{i}"),
                "attributes": {"enabled": true, "created": 1_700_000_000 + i, "updated": 1_700_000_000 + i},
                "tags": tags,
            })
        })
        .collect();
    axum::Json(json!({"value": items, "nextLink": null})).into_response()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn get_secret(
    State(vault): State<Vault>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    Path(name): Path<String>,
) -> Response {
    if let Some(challenge) = authorized(&headers) {
        return challenge;
    }
    assert!(query.contains_key("api-version"), "api-version missing");
    vault.requests.fetch_add(1, Ordering::SeqCst);
    if vault.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let failure = vault.fail_next.lock().unwrap().pop_front();
    if let Some((status, code, message, retry_after)) = failure {
        let mut response = error(StatusCode::from_u16(status).unwrap(), code, message);
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
        }
        return response;
    }
    if name == "firewalled" {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Client address is not authorized and caller is not a trusted service. Client address: 203.0.113.7",
        );
    }
    if name == "forbidden" {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The user, group or application 'appid=...' does not have secrets get permission on key vault 'apono-test'.",
        );
    }
    // Key Vault names allow only letters, digits and dashes; anything else is a 400 BadParameter.
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            &format!("The request URI contains an invalid name: {name}"),
        );
    }
    let secrets = vault.secrets.lock().unwrap();
    let Some((value, tags)) = secrets.get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
        );
    };
    vault.value_reads.lock().unwrap().push(name.clone());
    let body: Value = json!({
        "value": value,
        "id": format!("https://{VAULT_HOST}/secrets/{name}/{CURRENT_VERSION}"),
        "attributes": {"enabled": true, "created": 1_700_000_000, "updated": 1_700_000_000, "recoveryLevel": "Recoverable+Purgeable"},
        "tags": tags,
    });
    axum::Json(body).into_response()
}

async fn get_secret_version(
    state: State<Vault>,
    headers: HeaderMap,
    query: Query<HashMap<String, String>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if version == "versions" {
        return list_versions(state, headers, Path(name)).await;
    }
    if let Some(challenge) = authorized(&headers) {
        return challenge;
    }
    state.versions_read.lock().unwrap().push(version.clone());
    let pinned = state
        .pinned
        .lock()
        .unwrap()
        .get(&(name.clone(), version.clone()))
        .cloned();
    if let Some(value) = pinned {
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.value_reads.lock().unwrap().push(name.clone());
        return axum::Json(json!({
            "value": value,
            "id": format!("https://{VAULT_HOST}/secrets/{name}/{version}"),
            "attributes": {"enabled": true, "created": 1_600_000_000, "updated": 1_600_000_000},
        }))
        .into_response();
    }
    if version != CURRENT_VERSION {
        return error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name}/{version} was not found in this key vault."),
        );
    }
    get_secret(state, headers, query, Path(name)).await
}

/// The Entra ID (login) host of the fake: `AZURE_AUTHORITY_HOST` points here.
pub const LOGIN_HOST: &str = "login.apono-test.example";
const CLIENT_SECRET: &str = "fake-client-secret";
const FEDERATED_TOKEN: &str = "fake.federated.jwt";
const IDENTITY_HEADER: &str = "fake-identity-header";

/// Entra ID's token endpoint: client secret and client assertion (workload identity) grants.
async fn token(Path(_tenant): Path<String>, axum::Form(form): axum::Form<HashMap<String, String>>) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str);
    let scope_ok = field("scope") == Some("https://vault.azure.net/.default");
    let secret_ok = field("client_secret") == Some(CLIENT_SECRET);
    let jwt_bearer = field("client_assertion_type") == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    // A certificate's assertion is recorded here and verified by the test that asked for it.
    let signed = field("client_assertion").is_some_and(|a| a.split('.').count() == 3 && a != FEDERATED_TOKEN);
    if signed && jwt_bearer {
        *LAST_ASSERTION.lock().unwrap() = field("client_assertion").map(str::to_string);
    }
    let assertion_ok = (field("client_assertion") == Some(FEDERATED_TOKEN) || signed) && jwt_bearer;
    if field("grant_type") != Some("client_credentials") || !scope_ok || !(secret_ok || assertion_ok) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})),
        )
            .into_response();
    }
    axum::Json(json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN}))
        .into_response()
}

/// The last certificate-signed client assertion the token endpoint saw.
pub static LAST_ASSERTION: Mutex<Option<String>> = Mutex::new(None);

/// The App Service managed identity endpoint (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`).
async fn msi_token(headers: HeaderMap, Query(query): Query<HashMap<String, String>>) -> Response {
    if headers.get("x-identity-header").and_then(|v| v.to_str().ok()) != Some(IDENTITY_HEADER)
        || query.get("resource").map(String::as_str) != Some("https://vault.azure.net")
    {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "bad request"}))).into_response();
    }
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    axum::Json(json!({"access_token": TOKEN, "expires_on": expires.to_string(), "resource": "https://vault.azure.net", "token_type": "Bearer"}))
        .into_response()
}

/// The fake (Key Vault and Entra ID on one HTTPS port) and client options whose transport trusts
/// its certificate and resolves both host names to it.
pub async fn start() -> (Vault, ClientOptions, std::net::SocketAddr) {
    let vault = Vault::default();
    let app = Router::new()
        .route("/secrets/{name}", get(get_secret))
        .route("/secrets/{name}/", get(get_secret))
        .route("/secrets/{name}/{version}", get(get_secret_version))
        .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
        .route("/msi/token", get(msi_token))
        .with_state(vault.clone());
    let (cert, key) = self_signed(&[VAULT_HOST, LOGIN_HOST]);
    let addr = serve_https(app, &cert, &key).await;
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.as_bytes()).unwrap()])
        .resolve(VAULT_HOST, addr)
        .resolve(LOGIN_HOST, addr)
        .build()
        .unwrap();
    let options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        ..ClientOptions::default()
    };
    (vault, options, addr)
}

/// Starts the fake; returns it and an Azure store with a fake credential.
pub async fn fake() -> (Vault, AzureStore, Arc<FakeCredential>, String) {
    let (vault, options, addr) = start().await;
    let credential = Arc::new(FakeCredential::default());
    let store = AzureStore::with_credential(credential.clone(), options);
    (
        vault,
        store,
        credential,
        format!("https://{VAULT_HOST}:{}", addr.port()),
    )
}

pub fn marked() -> HashMap<String, String> {
    HashMap::from([("apono-connector-read".to_string(), "true".to_string())])
}

#[tokio::test]
async fn reads_after_the_challenge_gates_not_found_and_forbidden() {
    let (vault, store, credential, url) = fake().await;
    {
        let mut s = vault.secrets.lock().unwrap();
        s.insert(
            "rancher".into(),
            (r#"{"access_key":"token-abc","secret_key":"s1"}"#.into(), marked()),
        );
        s.insert("untagged".into(), (r#"{"k":"v"}"#.into(), HashMap::new()));
    }
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = |name: &str| reference(json!({"type": "AZURE", "vault_url": url, "name": name}));

    let s = stores.fetch(&r("rancher")).await.unwrap();
    assert_eq!(value_of(&s, "access_key"), "token-abc");
    assert_eq!(value_of(&s, "secret_key"), "s1");
    assert_eq!(
        credential.scopes.lock().unwrap().first().map(String::as_str),
        Some("https://vault.azure.net/.default"),
        "scope from the challenge"
    );

    // Access is Key Vault's RBAC: an untagged secret (the seed's `az keyvault secret set`) is read.
    assert_eq!(value_of(&stores.fetch(&r("untagged")).await.unwrap(), "k"), "v");

    let e = stores.fetch(&r("missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    let e = stores.fetch(&r("forbidden")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("Key Vault Secrets User"), "{e}");
    // Key Vault's own message is kept: a firewall block is not a missing role.
    let e = stores.fetch(&r("firewalled")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("Client address is not authorized"), "{e}");

    // Rotation, seen after invalidation.
    vault.secrets.lock().unwrap().insert(
        "rancher".into(),
        (r#"{"access_key":"token-abc","secret_key":"s2"}"#.into(), marked()),
    );
    stores.invalidate(&r("rancher"));
    assert_eq!(
        value_of(&stores.fetch(&r("rancher")).await.unwrap(), "secret_key"),
        "s2"
    );
}

/// With `AZURE` in `secrets.require_read_mark`: the tag is read from the version list before the
/// value (an untagged value never leaves the vault), and a rotation that creates an untagged
/// version (`az keyvault secret set`) keeps the secret readable.
#[tokio::test]
async fn opt_in_mark_is_checked_on_the_secret_before_its_value() {
    let (vault, store, _, url) = fake().await;
    vault.rotate("rancher", r#"{"token":"t1"}"#, marked());
    vault.rotate("untagged", r#"{"k":"v"}"#, HashMap::new());
    let stores = SecretStores::empty().with_store(Arc::new(store.requiring_read_mark(true)));
    let r = |name: &str| reference(json!({"type": "AZURE", "vault_url": url, "name": name}));

    assert_eq!(value_of(&stores.fetch(&r("rancher")).await.unwrap(), "token"), "t1");

    let e = stores.fetch(&r("untagged")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("--tags apono-connector-read=true"), "{e}");
    assert!(e.to_string().contains("require_read_mark"), "{e}");
    assert_eq!(
        *vault.value_reads.lock().unwrap(),
        ["rancher"],
        "the untagged value was not fetched"
    );

    vault.rotate("rancher", r#"{"token":"t2"}"#, HashMap::new());
    stores.invalidate(&r("rancher"));
    assert_eq!(value_of(&stores.fetch(&r("rancher")).await.unwrap(), "token"), "t2");
}

/// The credential chosen from the environment (client secret, workload identity, App Service
/// managed identity), against the fake's Entra ID endpoints. The environment is process-wide, so
/// each runs in a child process (this test binary again, running `env_credential_child`).
#[tokio::test]
async fn credentials_from_the_environment() {
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, FEDERATED_TOKEN).unwrap();
    let client = |secret: &str| {
        vec![
            ("AZURE_TENANT_ID", tenant.to_string()),
            ("AZURE_CLIENT_ID", "apono-connector".to_string()),
            ("AZURE_CLIENT_SECRET", secret.to_string()),
        ]
    };
    let modes: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("client secret", client(CLIENT_SECRET)),
        (
            "workload identity",
            vec![
                ("AZURE_TENANT_ID", tenant.into()),
                ("AZURE_CLIENT_ID", "apono-connector".into()),
                ("AZURE_FEDERATED_TOKEN_FILE", token_file.display().to_string()),
            ],
        ),
        (
            "managed identity (App Service)",
            vec![("IDENTITY_HEADER", IDENTITY_HEADER.into())],
        ),
        ("wrong client secret", client("wrong-secret-value")),
    ];
    let (vault, _, addr) = start().await;
    vault
        .secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (r#"{"token":"t"}"#.into(), marked()));
    for (mode, mut vars) in modes {
        // The App Service managed identity's endpoint, on the fake (the others ignore it).
        vars.push((
            "IDENTITY_ENDPOINT",
            format!("https://{LOGIN_HOST}:{}/msi/token", addr.port()),
        ));
        let expect = if mode.starts_with("wrong") { "refused" } else { "ok" };
        run_credential_child(addr, &vars, expect).await;
    }
}

#[tokio::test]
#[ignore = "run by credentials_from_the_environment in a child process"]
async fn env_credential_child() {
    let Some(addr) = std::env::var("APONO_TEST_AZURE_ADDR").ok() else {
        return;
    };
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    // The fake's certificate is not known here: a trust-all transport, names resolved to the fake.
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .resolve(VAULT_HOST, addr)
        .resolve(LOGIN_HOST, addr)
        .build()
        .unwrap();
    let options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        ..ClientOptions::default()
    };
    let stores = SecretStores::empty().with_store(Arc::new(AzureStore::with_client_options(options)));
    let url = format!("https://{VAULT_HOST}:{}", addr.port());
    let r = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher"}));
    let expect = std::env::var("APONO_TEST_AZURE_EXPECT").unwrap_or_default();
    if expect == "ok" {
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
    } else if let Some(hint) = expect.strip_prefix("misconfigured:") {
        let e = stores.fetch(&r).await.unwrap_err();
        assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
        assert!(e.to_string().contains(hint), "{e}");
        assert!(!e.to_string().contains("pfx-password"), "{e}");
    } else {
        let e = stores.fetch(&r).await.unwrap_err();
        assert_eq!(e.code(), "secret_not_permitted", "{e}");
        assert!(!e.to_string().contains("wrong-secret-value"), "{e}");
    }
}

#[tokio::test]
async fn a_bad_name_is_not_retried_and_carries_key_vaults_message() {
    let (vault, store, _, url) = fake().await;
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher_key"}));
    let e = stores.fetch(&r).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(e.to_string().contains("invalid name: rancher_key"), "{e}");
    assert!(vault.value_reads.lock().unwrap().is_empty());
}

/// A registry over a fresh fake holding `rancher`, without a cache.
async fn failing_fake(attempt_timeout: Duration) -> (Vault, SecretStores, crate::secrets::SecretRef, String) {
    let (vault, store, _, url) = fake().await;
    vault
        .secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (r#"{"token":"t"}"#.into(), HashMap::new()));
    let stores = SecretStores::empty()
        .with_cache_ttl(Duration::ZERO)
        .with_store(Arc::new(store.with_attempt_timeout(attempt_timeout)));
    let r = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher"}));
    let host = url.trim_start_matches("https://").to_string();
    (vault, stores, r, host)
}

/// Hang guard only: a capped client answers in seconds, the registry's own limit is 60 s.
async fn fetch_bounded(stores: &SecretStores, r: &crate::secrets::SecretRef) -> crate::secrets::SecretError {
    tokio::time::timeout(Duration::from_secs(45), stores.fetch(r))
        .await
        .expect("the Azure store gave up by itself, well inside the registry's limit")
        .unwrap_err()
}

/// K2: a 503 is retried once by the SDK (not 8 times over 60 s), then reported as retryable
/// with Key Vault's status, code and message.
#[tokio::test]
async fn service_unavailable_is_tried_twice_and_reported_with_its_status() {
    let (vault, stores, r, host) = failing_fake(Duration::from_secs(10)).await;
    vault.fail_next.lock().unwrap().extend(std::iter::repeat_n(
        (
            503,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
            None,
        ),
        8,
    ));
    let e = fetch_bounded(&stores, &r).await;
    assert!(e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
    let text = e.to_string();
    assert!(text.contains("503"), "{e}");
    assert!(text.contains("ServiceUnavailable"), "{e}");
    assert!(text.contains("The service is temporarily unavailable."), "{e}");
    assert!(text.contains(&host), "{e}");
    assert!(!text.contains("did not answer within"), "{e}");
    assert_eq!(vault.requests.load(Ordering::SeqCst), 2, "one try and one retry");

    // A blip that the one retry covers is not an error at all.
    vault.fail_next.lock().unwrap().clear();
    vault.fail_next.lock().unwrap().push_back((
        503,
        "ServiceUnavailable",
        "The service is temporarily unavailable.",
        None,
    ));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
}

/// K2: throttling (429 with a long `Retry-After`) fails at once as retryable: the agent backs
/// off, the SDK does not sleep out the registry's limit.
#[tokio::test]
async fn throttling_is_left_to_the_agent() {
    let (vault, stores, r, _) = failing_fake(Duration::from_secs(10)).await;
    vault.fail_next.lock().unwrap().extend(std::iter::repeat_n(
        (429, "Throttled", "Operations per second rate limit reached.", Some(120)),
        8,
    ));
    let e = fetch_bounded(&stores, &r).await;
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("429"), "{e}");
    assert!(e.to_string().contains("Throttled"), "{e}");
    assert_eq!(vault.requests.load(Ordering::SeqCst), 1);
}

/// K2: a vault that accepts and never answers: each try ends at the limit, two tries, and the
/// error names the host and the limit.
#[tokio::test]
async fn a_stalled_vault_times_out_per_try_and_names_the_host() {
    let (vault, stores, r, host) = failing_fake(Duration::from_millis(500)).await;
    vault.stall.store(true, Ordering::SeqCst);
    let e = fetch_bounded(&stores, &r).await;
    assert!(e.retryable(), "{e}");
    assert!(
        e.to_string().contains(&format!("timed out after 0.5 s at {host}")),
        "{e}"
    );
    assert_eq!(vault.requests.load(Ordering::SeqCst), 2);
}

/// A credential that never answers (a metadata endpoint dropping packets).
#[derive(Debug)]
struct StalledCredential;

#[async_trait]
impl TokenCredential for StalledCredential {
    async fn get_token(&self, _: &[&str], _: Option<TokenRequestOptions<'_>>) -> azure_core::Result<AccessToken> {
        std::future::pending().await
    }
}

/// K2: getting a token is bounded too, and the error says it was the token, not the vault.
#[tokio::test]
async fn a_token_that_never_comes_is_bounded_and_named() {
    let (vault, options, addr) = start().await;
    let store = AzureStore::with_credential(Arc::new(StalledCredential), options)
        .with_attempt_timeout(Duration::from_millis(500));
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let url = format!("https://{VAULT_HOST}:{}", addr.port());
    let r = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher"}));
    let e = fetch_bounded(&stores, &r).await;
    assert!(e.retryable(), "{e}");
    assert!(
        e.to_string()
            .contains("no Azure token from the given credential within 1 s"),
        "{e}"
    );
    assert_eq!(vault.requests.load(Ordering::SeqCst), 0);
}

/// Runs `env_credential_child` with these variables (and no other Azure credential variables)
/// against the fake at `addr`, expecting `expect`.
async fn run_credential_child(addr: std::net::SocketAddr, vars: &[(&str, String)], expect: &str) {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "secrets::tests::azure_fake::env_credential_child",
        "--ignored",
        "--nocapture",
    ])
    .env("APONO_TEST_AZURE_ADDR", addr.to_string())
    .env("APONO_TEST_AZURE_EXPECT", expect)
    .env("AZURE_AUTHORITY_HOST", format!("https://{LOGIN_HOST}:{}", addr.port()));
    for name in [
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "MSI_ENDPOINT",
    ] {
        cmd.env_remove(name);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{expect} with {:?}:\n{stdout}\n{}",
        vars.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the `openssl` command line (test set-up and checks only).
#[cfg(feature = "store-azure-certificate")]
fn openssl(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A client certificate as `AZURE_CLIENT_CERTIFICATE_PATH` (a password-protected PFX): the
/// token request carries a client assertion whose header names the certificate (`x5t`, its
/// SHA-1 thumbprint) and whose signature verifies with the certificate's public key.
#[cfg(feature = "store-azure-certificate")]
#[tokio::test]
async fn client_certificate_from_the_environment() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=apono-connector",
        ],
    );
    openssl(
        d,
        &[
            "pkcs12",
            "-export",
            "-in",
            "cert.pem",
            "-inkey",
            "key.pem",
            "-out",
            "cert.pfx",
            "-passout",
            "pass:pfx-password",
        ],
    );
    let (vault, _, addr) = start().await;
    vault
        .secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), (r#"{"token":"t"}"#.into(), HashMap::new()));
    let vars = |password: &str| {
        vec![
            ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47".to_string()),
            ("AZURE_CLIENT_ID", "apono-connector".to_string()),
            (
                "AZURE_CLIENT_CERTIFICATE_PATH",
                d.join("cert.pfx").display().to_string(),
            ),
            ("AZURE_CLIENT_CERTIFICATE_PASSWORD", password.to_string()),
        ]
    };
    *LAST_ASSERTION.lock().unwrap() = None;
    run_credential_child(addr, &vars("pfx-password"), "ok").await;

    let assertion = LAST_ASSERTION.lock().unwrap().clone().expect("a client assertion");
    let parts: Vec<&str> = assertion.split('.').collect();
    let b64url = |p: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p.trim_end_matches('='))
            .unwrap()
    };
    let header: serde_json::Value = serde_json::from_slice(&b64url(parts[0])).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&b64url(parts[1])).unwrap();
    let fingerprint = String::from_utf8(openssl(
        d,
        &["x509", "-in", "cert.pem", "-noout", "-fingerprint", "-sha1"],
    ))
    .unwrap();
    let thumbprint = hex::decode(fingerprint.trim().rsplit('=').next().unwrap().replace(':', "")).unwrap();
    assert_eq!(
        header["x5t"],
        json!(base64::engine::general_purpose::STANDARD.encode(&thumbprint)),
        "{header}"
    );
    assert_eq!(header["alg"], "RS256");
    assert_eq!(payload["iss"], "apono-connector");
    assert_eq!(payload["sub"], "apono-connector");
    std::fs::write(d.join("signed"), format!("{}.{}", parts[0], parts[1])).unwrap();
    std::fs::write(d.join("sig"), b64url(parts[2])).unwrap();
    std::fs::write(
        d.join("pub.pem"),
        openssl(d, &["x509", "-in", "cert.pem", "-pubkey", "-noout"]),
    )
    .unwrap();
    let verified = openssl(
        d,
        &["dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", "signed"],
    );
    assert_eq!(String::from_utf8_lossy(&verified).trim(), "Verified OK");

    // A wrong password is a configuration error that names the variable, never the password.
    run_credential_child(
        addr,
        &vars("wrong-pfx-password"),
        "misconfigured:AZURE_CLIENT_CERTIFICATE_PATH",
    )
    .await;
}

/// Without the feature, a certificate in the environment is refused with what to do.
#[cfg(not(feature = "store-azure-certificate"))]
#[tokio::test]
async fn client_certificate_needs_its_build_feature() {
    let (_, _, addr) = start().await;
    let vars = [
        ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47".to_string()),
        ("AZURE_CLIENT_ID", "apono-connector".to_string()),
        ("AZURE_CLIENT_CERTIFICATE_PATH", "/nonexistent/cert.pfx".to_string()),
    ];
    run_credential_child(addr, &vars, "misconfigured:store-azure-certificate").await;
}

/// Secrets review §3: a pinned `version` is asked for by its id (the value of an older version
/// after a bad rotation); one that is not an id is refused before any request. One client per
/// vault URL however many reads (issue 18).
#[tokio::test]
async fn a_pinned_version_is_read_by_its_id() {
    let (vault, store, _, url) = fake().await;
    vault
        .secrets
        .lock()
        .unwrap()
        .insert("rancher".into(), ("token-a:new".into(), HashMap::new()));
    let old = "0f2c4e6a8b0d4f1e3a5c7e9b1d3f5a7c";
    vault
        .pinned
        .lock()
        .unwrap()
        .insert(("rancher".into(), old.into()), "token-a:old".into());
    let store = Arc::new(store);
    let stores = SecretStores::empty()
        .with_store(store.clone())
        .with_cache_ttl(Duration::ZERO);
    let pinned = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher", "version": old}));
    assert_eq!(pinned.describe(), format!("AZURE {url} rancher@{old}"));
    assert_eq!(value_of(&stores.fetch(&pinned).await.unwrap(), "value"), "token-a:old");
    assert_eq!(vault.versions_read.lock().unwrap().as_slice(), [old.to_string()]);
    let current = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher"}));
    for _ in 0..20 {
        assert_eq!(value_of(&stores.fetch(&current).await.unwrap(), "value"), "token-a:new");
    }
    let missing = reference(json!({
        "type": "AZURE", "vault_url": url, "name": "rancher", "version": "ffffffffffffffffffffffffffffffff"
    }));
    assert_eq!(stores.fetch(&missing).await.unwrap_err().code(), "secret_not_found");
    let before = vault.versions_read.lock().unwrap().len();
    let bad = reference(json!({"type": "AZURE", "vault_url": url, "name": "rancher", "version": "../other"}));
    let e = stores.fetch(&bad).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(e.to_string().contains("not a Key Vault version id"), "{e}");
    assert_eq!(vault.versions_read.lock().unwrap().len(), before, "nothing sent");
    assert_eq!(store.clients_built(), 1, "one client for one vault");
}
