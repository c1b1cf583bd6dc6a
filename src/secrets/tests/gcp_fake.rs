//! The GCP store against a wire-level Secret Manager fake (the official client speaks HTTP/JSON):
//! `GET /v1/projects/{p}/secrets/{s}` and `GET .../versions/{v}:access`, Google's error JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::json;

use super::support::{reference, serve_http, value_of};
use crate::secrets::{GcpStore, SecretStores};

/// A secret's labels and versions (version n at index n-1).
pub type Entry = (HashMap<String, String>, Vec<Vec<u8>>);

#[derive(Clone, Default)]
pub struct Fake {
    /// secret id → entry
    pub secrets: Arc<Mutex<HashMap<String, Entry>>>,
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
    // projects/{p}/secrets/{s}[/versions/{v}:access]
    let parts: Vec<&str> = rest.split('/').collect();
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
    let secrets = fake.secrets.lock().unwrap();
    let Some((labels, versions)) = secrets.get(&secret) else {
        return error(
            404,
            "NOT_FOUND",
            format!("Secret [projects/{project}/secrets/{secret}] not found or has no versions."),
        );
    };
    let name = format!("projects/{project}/secrets/{secret}");
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
async fn oauth_token(axum::Json(form): axum::Json<serde_json::Value>) -> Response {
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

/// The fake alone.
pub async fn serve() -> (Fake, std::net::SocketAddr) {
    let fake = Fake::default();
    let app = Router::new()
        .route("/v1/{*rest}", get(handle))
        .route("/token", axum::routing::post(oauth_token))
        .with_state(fake.clone());
    (fake, serve_http(app).await)
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
