//! The Azure store against a wire-level Key Vault fake: HTTPS with a self-signed certificate for
//! `*.vault.azure.net`, the 401 `WWW-Authenticate: Bearer authorization=..., resource=...`
//! challenge first (the client discovers its token scope from it), then Key Vault's JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

#[derive(Clone, Default)]
pub struct Vault {
    /// name → (value, tags)
    pub secrets: Arc<Mutex<HashMap<String, Entry>>>,
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
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                "WWW-Authenticate",
                "Bearer authorization=\"https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47\", resource=\"https://vault.azure.net\"",
            )],
            axum::Json(json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})),
        )
            .into_response();
    }
    assert!(query.contains_key("api-version"), "api-version missing");
    if name == "forbidden" {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The user, group or application 'appid=...' does not have secrets get permission on key vault 'apono-test'.",
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
    let body: Value = json!({
        "value": value,
        "id": format!("https://{VAULT_HOST}/secrets/{name}/4387e9f3d6e14c459867679a90fd0f79"),
        "attributes": {"enabled": true, "created": 1_700_000_000, "updated": 1_700_000_000, "recoveryLevel": "Recoverable+Purgeable"},
        "tags": tags,
    });
    axum::Json(body).into_response()
}

async fn get_secret_version(
    state: State<Vault>,
    headers: HeaderMap,
    query: Query<HashMap<String, String>>,
    Path((name, _version)): Path<(String, String)>,
) -> Response {
    get_secret(state, headers, query, Path(name)).await
}

/// Starts the fake; returns it and an Azure store whose transport trusts its certificate and
/// resolves the vault's host name to it.
pub async fn fake() -> (Vault, AzureStore, Arc<FakeCredential>, String) {
    let vault = Vault::default();
    let app = Router::new()
        .route("/secrets/{name}", get(get_secret))
        .route("/secrets/{name}/", get(get_secret))
        .route("/secrets/{name}/{version}", get(get_secret_version))
        .with_state(vault.clone());
    let (cert, key) = self_signed(&[VAULT_HOST]);
    let addr = serve_https(app, &cert, &key).await;
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.as_bytes()).unwrap()])
        .resolve(VAULT_HOST, addr)
        .build()
        .unwrap();
    let options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        ..ClientOptions::default()
    };
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

    let e = stores.fetch(&r("untagged")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("tag apono-connector-read=true"), "{e}");

    let e = stores.fetch(&r("missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    let e = stores.fetch(&r("forbidden")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("Key Vault Secrets User"), "{e}");

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
