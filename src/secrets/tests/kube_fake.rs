//! The Kubernetes store against a wire-level fake API server: real `Secret` and `Status` JSON
//! (serialized from k8s-openapi's own types), real status codes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as K8sSecret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use super::support::{reference, serve_http, value_of};
use crate::secrets::{KubernetesStore, SecretStores};

type Secrets = Arc<std::sync::Mutex<BTreeMap<(String, String), K8sSecret>>>;

/// Every request one fake answered, as `namespace/name`, metadata reads included.
pub type Calls = Arc<std::sync::Mutex<Vec<String>>>;

#[derive(Clone)]
struct FakeState {
    secrets: Secrets,
    calls: Calls,
}

/// The names whose full object (with `data`) the fake sent: the API server's audit of value reads.
pub static FULL_GETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The last `Authorization` header the fake saw.
pub static LAST_AUTHORIZATION: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

async fn get_secret(
    State(FakeState { secrets, calls }): State<FakeState>,
    headers: axum::http::HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    calls.lock().unwrap().push(format!("{ns}/{name}"));
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        *LAST_AUTHORIZATION.lock().unwrap() = Some(auth.to_string());
    }
    if ns == "kube-system" {
        return status(
            403,
            "Forbidden",
            format!(
                "secrets \"{name}\" is forbidden: User \"system:serviceaccount:apono:apono-connector\" cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
            ),
        );
    }
    // Two namespaces that stand for API-server failures: a request it rejects (400, as
    // apiserver's responsewriters answer a malformed request) and an overloaded server (503).
    if ns == "badrequest" {
        return status(
            400,
            "BadRequest",
            format!("the request for secrets \"{name}\" is invalid"),
        );
    }
    if ns == "overloaded" {
        return status(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request".into(),
        );
    }
    // `Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`: metadata only, as
    // the API server's metadata transform does.
    let metadata_only = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    match secrets.lock().unwrap().get(&(ns, name.clone())) {
        Some(s) if metadata_only => axum::Json(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": s.metadata,
        }))
        .into_response(),
        Some(s) => {
            FULL_GETS.lock().unwrap().push(name);
            axum::Json(s.clone()).into_response()
        }
        None => status(404, "NotFound", format!("secrets \"{name}\" not found")),
    }
}

pub fn secret(ns: &str, name: &str, labelled: bool, data: &[(&str, &[u8])]) -> K8sSecret {
    let labels = labelled.then(|| BTreeMap::from([("apono-connector-read".to_string(), "true".to_string())]));
    K8sSecret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels,
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..K8sSecret::default()
    }
}

/// A fake API server holding `secrets`; returns a kube client pointed at it.
pub async fn fake(secrets: Vec<K8sSecret>) -> (kube::Client, Secrets) {
    let (client, map, _) = fake_with_calls(secrets).await;
    (client, map)
}

/// [`fake`], with the log of the requests it answered.
pub async fn fake_with_calls(secrets: Vec<K8sSecret>) -> (kube::Client, Secrets, Calls) {
    let (addr, map, calls) = serve_with_calls(secrets).await;
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    // As the store's own client: the agent retries, not kube.
    config.default_retry = false;
    (kube::Client::try_from(config).unwrap(), map, calls)
}

async fn serve_with_calls(secrets: Vec<K8sSecret>) -> (std::net::SocketAddr, Secrets, Calls) {
    let (app, map, calls) = app(secrets);
    (serve_http(app).await, map, calls)
}

/// The fake API server, counting the TCP connections it accepted.
async fn serve_counting(secrets: Vec<K8sSecret>) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let (app, _, _) = app(secrets);
    super::support::serve_http_counting(app).await
}

fn app(secrets: Vec<K8sSecret>) -> (Router, Secrets, Calls) {
    let map: Secrets = Arc::new(std::sync::Mutex::new(
        secrets
            .into_iter()
            .map(|s| {
                let key = (s.metadata.namespace.clone().unwrap(), s.metadata.name.clone().unwrap());
                (key, s)
            })
            .collect(),
    ));
    let calls = Calls::default();
    let app = Router::new()
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .with_state(FakeState {
            secrets: map.clone(),
            calls: calls.clone(),
        });
    (app, map, calls)
}

#[tokio::test]
async fn reads_gates_not_found_and_forbidden() {
    let (client, secrets) = fake(vec![
        secret(
            "apono",
            "rancher",
            true,
            &[("access_key", b"token-abc"), ("secret_key", b"s1")],
        ),
        secret("apono", "unlabelled", false, &[("k", b"v")]),
        secret("apono", "binary", true, &[("blob", &[0xff, 0x00, 0xfe])]),
    ])
    .await;
    let stores = SecretStores::empty().with_store(Arc::new(KubernetesStore::with_client(client.clone(), vec![])));
    let r = |ns: &str, name: &str| reference(json!({"type": "KUBERNETES", "namespace": ns, "name": name}));

    let s = stores.fetch(&r("apono", "rancher")).await.unwrap();
    assert_eq!(value_of(&s, "access_key"), "token-abc");
    assert_eq!(value_of(&s, "secret_key"), "s1");

    let e = stores.fetch(&r("apono", "unlabelled")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("label apono-connector-read=true"), "{e}");
    assert!(
        e.to_string().contains("kubectl label secret -n apono unlabelled"),
        "{e}"
    );
    assert!(
        !FULL_GETS.lock().unwrap().contains(&"unlabelled".to_string()),
        "the unlabelled secret's data was not fetched"
    );
    assert!(FULL_GETS.lock().unwrap().contains(&"rancher".to_string()));

    let e = stores.fetch(&r("apono", "missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    let e = stores.fetch(&r("kube-system", "anything")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("cannot get resource"), "{e}");

    let e = stores.fetch(&r("apono", "binary")).await.unwrap_err();
    assert!(e.to_string().contains("\"blob\""), "{e}");

    // Rotation, seen after invalidation.
    secrets.lock().unwrap().insert(
        ("apono".into(), "rancher".into()),
        secret(
            "apono",
            "rancher",
            true,
            &[("access_key", b"token-abc"), ("secret_key", b"s2")],
        ),
    );
    assert_eq!(
        value_of(&stores.fetch(&r("apono", "rancher")).await.unwrap(), "secret_key"),
        "s1"
    );
    stores.invalidate(&r("apono", "rancher"));
    assert_eq!(
        value_of(&stores.fetch(&r("apono", "rancher")).await.unwrap(), "secret_key"),
        "s2"
    );

    // ALLOWED_SECRETS_TO_READ: refused before any call.
    let allow = SecretStores::empty().with_store(Arc::new(KubernetesStore::with_client(client, vec!["other".into()])));
    let e = allow.fetch(&r("apono", "rancher")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("ALLOWED_SECRETS_TO_READ"), "{e}");
}

/// `ALLOWED_SECRETS_TO_READ` entries: `namespace/name` allows exactly that secret (the Helm chart
/// grants `get` on it in that namespace), a bare name that name in any namespace, as Apono's
/// connector reads it. A refusal is made before any call to the API server.
#[tokio::test]
async fn allow_list_entries_may_name_the_namespace() {
    let (client, _, calls) = fake_with_calls(vec![
        secret("apono", "rancher", true, &[("token", b"in-apono")]),
        secret("team-b", "rancher", true, &[("token", b"in-team-b")]),
        secret("team-b", "other", true, &[("token", b"other")]),
    ])
    .await;
    let stores = |allowed: &[&str]| {
        let allowed = allowed.iter().map(|a| a.to_string()).collect();
        SecretStores::empty().with_store(Arc::new(KubernetesStore::with_client(client.clone(), allowed)))
    };
    let r = |ns: &str, name: &str| reference(json!({"type": "KUBERNETES", "namespace": ns, "name": name}));
    let refused_without_a_call = |stores: SecretStores, ns: &'static str, name: &'static str| {
        let calls = calls.clone();
        async move {
            calls.lock().unwrap().clear();
            let e = stores.fetch(&r(ns, name)).await.unwrap_err();
            assert_eq!(e.code(), "secret_not_permitted", "{e}");
            assert!(e.to_string().contains(&format!("add {ns}/{name} there")), "{e}");
            assert_eq!(*calls.lock().unwrap(), Vec::<String>::new(), "{ns}/{name}");
        }
    };

    let namespaced = stores(&["apono/rancher"]);
    assert_eq!(
        value_of(&namespaced.fetch(&r("apono", "rancher")).await.unwrap(), "token"),
        "in-apono"
    );
    refused_without_a_call(namespaced.clone(), "team-b", "rancher").await;
    refused_without_a_call(namespaced, "apono", "other").await;

    let bare = stores(&["rancher"]);
    assert_eq!(
        value_of(&bare.fetch(&r("apono", "rancher")).await.unwrap(), "token"),
        "in-apono"
    );
    assert_eq!(
        value_of(&bare.fetch(&r("team-b", "rancher")).await.unwrap(), "token"),
        "in-team-b"
    );
    refused_without_a_call(bare, "team-b", "other").await;

    // Both forms in one list, with the spaces a comma-separated variable leaves.
    let mixed = stores(&[" team-b / other ", "rancher"]);
    mixed.fetch(&r("team-b", "other")).await.unwrap();
    mixed.fetch(&r("team-b", "rancher")).await.unwrap();

    // A store given only malformed entries (start-up refuses them; see below) allows nothing,
    // rather than everything.
    refused_without_a_call(stores(&["apono/rancher/x"]), "apono", "rancher").await;
}

/// Malformed allow-list entries stop start-up, each named; well-formed ones are not.
#[test]
fn malformed_allow_list_entries_are_named_at_start_up() {
    let variable = "apono/rancher, a/b/c, /x, ns/, rancher, //";
    let env = |name: &str| (name == "ALLOWED_SECRETS_TO_READ").then(|| variable.to_string());
    let e = crate::config::Config::load_from(None, env).unwrap_err().to_string();
    for entry in ["\"a/b/c\"", "\"/x\"", "\"ns/\"", "\"//\""] {
        assert!(e.contains(entry), "{entry} not named: {e}");
    }
    assert!(e.contains("ALLOWED_SECRETS_TO_READ"), "{e}");
    assert!(!e.contains("\"apono/rancher\"") && !e.contains("\"rancher\""), "{e}");

    // The one-shot commands (`secret get`), which take their settings from the environment
    // alone, refuse them too.
    let settings = crate::config::SecretsConfig::from_env(env).unwrap();
    let e = SecretStores::from_config(&settings).unwrap_err().to_string();
    assert!(e.contains("\"a/b/c\""), "{e}");

    let ok = |name: &str| (name == "ALLOWED_SECRETS_TO_READ").then(|| "apono/rancher, rancher".to_string());
    let config = crate::config::Config::load_from(None, ok).unwrap();
    assert_eq!(config.secrets.allowed_secrets_to_read, ["apono/rancher", "rancher"]);
}

/// `KubernetesStore::new` infers its client: here from a kubeconfig (`KUBECONFIG`) with a bearer
/// token, in a child process since the environment is process-wide.
#[tokio::test]
async fn kubeconfig_from_the_environment() {
    let (addr, connections) =
        serve_counting(vec![secret("apono", "rancher", true, &[("token", b"from-kubeconfig")])]).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: apono\n  user:\n    token: kubeconfig-bearer-token\ncontexts:\n- name: fake\n  context:\n\
             \x20   cluster: fake\n    user: apono\n    namespace: apono\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "secrets::tests::kube_fake::kubeconfig_child",
            "--ignored",
            "--nocapture",
        ])
        .env("APONO_TEST_CHILD", "1")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
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
        Some("Bearer kubeconfig-bearer-token")
    );
    // The child's 20 reads went through its one client and one kept-alive connection (issue 18).
    let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened <= 5,
        "{opened} connections for 20 reads (one per read would be 20 or more)"
    );
}

#[tokio::test]
#[ignore = "run by kubeconfig_from_the_environment in a child process"]
async fn kubeconfig_child() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let store = Arc::new(KubernetesStore::new(vec!["rancher".into()]));
    let stores = SecretStores::empty()
        .with_store(store.clone())
        .with_cache_ttl(std::time::Duration::ZERO);
    let r = reference(json!({"type": "KUBERNETES", "namespace": "apono", "name": "rancher"}));
    for _ in 0..20 {
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "from-kubeconfig");
    }
    assert_eq!(store.clients_built(), 1, "one client, inferred once");
}

#[tokio::test]
async fn a_rejected_request_is_not_retried_but_an_overloaded_server_is() {
    let (client, _) = fake(vec![]).await;
    let stores = SecretStores::empty().with_store(Arc::new(KubernetesStore::with_client(client, vec![])));
    let r = |ns: &str| reference(json!({"type": "KUBERNETES", "namespace": ns, "name": "rancher"}));

    let e = stores.fetch(&r("badrequest")).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(
        e.to_string().contains("the request for secrets \"rancher\" is invalid"),
        "{e}"
    );

    let e = stores.fetch(&r("overloaded")).await.unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("503"), "{e}");
}
