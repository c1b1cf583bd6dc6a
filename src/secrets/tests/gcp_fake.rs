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

async fn handle(State(fake): State<Fake>, Path(rest): Path<String>) -> Response {
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

pub async fn fake() -> (Fake, GcpStore) {
    let fake = Fake::default();
    let app = Router::new().route("/v1/{*rest}", get(handle)).with_state(fake.clone());
    let addr = serve_http(app).await;
    let store = GcpStore::with_endpoint(
        format!("http://{addr}"),
        google_cloud_auth::credentials::anonymous::Builder::new().build(),
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
    let stores = SecretStores::empty().with_store(Arc::new(store));
    let r = |project: &str, id: &str| reference(json!({"type": "GCP", "project": project, "secret_id": id}));

    let s = stores.fetch(&r("p1", "rancher")).await.unwrap();
    assert_eq!(value_of(&s, "secret_key"), "s1");

    let e = stores.fetch(&r("p1", "unlabelled")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("label apono-connector-read=true"), "{e}");
    assert!(e.to_string().contains("--update-labels"), "{e}");

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
