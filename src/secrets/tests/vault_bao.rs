//! The Vault store against OpenBao (a real Vault API server): token, AppRole, KV v1 and v2,
//! rotation, a 403 after token rotation, `from_secret_store` through AWS (moto), TLS.

use base64::Engine;
use secrecy::SecretString;
use serde_json::{Value, json};

use super::support::{BAO_ROOT, ServerGuard, reference, start_bao, value_of};
use crate::config::SecretsConfig;
use crate::secrets::{SecretRef, SecretStores};

/// Calls OpenBao's HTTP API as root.
pub struct Bao {
    pub base: String,
    http: reqwest::Client,
}

impl Bao {
    pub fn new(guard: &ServerGuard, scheme: &str) -> Bao {
        Bao::new_at(guard.url(scheme))
    }

    /// At `base` (`http://127.0.0.1:PORT`), for a server started without [`start_bao`].
    pub fn new_at(base: String) -> Bao {
        Bao {
            base,
            http: reqwest::Client::builder()
                .tls_danger_accept_invalid_certs(true)
                .build()
                .unwrap(),
        }
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.call_in(None, method, path, body).await
    }

    /// As `call`, inside a namespace.
    pub async fn call_in(
        &self,
        namespace: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        // A dev server upgrades its `secret/` mount to KV v2 in the background after it reports
        // healthy; until then a write answers "Upgrading from non-versioned to versioned data"
        // (seen on a loaded machine). Set-up waits that out, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}/v1/{path}", self.base))
                .header("X-Vault-Token", BAO_ROOT);
            if let Some(ns) = namespace {
                req = req.header("X-Vault-Namespace", ns);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            if !status.is_success()
                && text.contains("Upgrading from non-versioned")
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            assert!(status.is_success(), "{method} {path}: {status} {text}");
            return serde_json::from_str(&text).unwrap_or(Value::Null);
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Enables AppRole, creates the role `apono` with `role` settings, and returns its role id and
    /// a new secret id.
    pub async fn approle(&self, role: Value) -> (String, String) {
        self.post("sys/auth/approle", json!({"type": "approle"})).await;
        self.post("auth/approle/role/apono", role).await;
        let role_id = self
            .call(reqwest::Method::GET, "auth/approle/role/apono/role-id", None)
            .await["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret_id = self.post("auth/approle/role/apono/secret-id", json!({})).await["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
        (role_id, secret_id)
    }

    /// A token limited to `policy` (which allows reading everything under `secret/` and `kv1/`).
    pub async fn reader_token(&self) -> String {
        self.post(
            "sys/policies/acl/reader",
            json!({"policy": "path \"secret/data/apono/*\" { capabilities = [\"read\"] }\npath \"kv1/*\" { capabilities = [\"read\"] }"}),
        )
        .await;
        let out = self.post("auth/token/create", json!({"policies": ["reader"]})).await;
        out["auth"]["client_token"].as_str().unwrap().to_string()
    }
}

pub(super) fn stores_with(config_json: Value) -> SecretStores {
    let config = SecretsConfig {
        hashicorp_vault_config: Some(SecretString::from(config_json.to_string())),
        cache_ttl_seconds: 300,
        ..SecretsConfig::default()
    };
    SecretStores::from_config(&config).unwrap()
}

pub(super) fn vault_ref(engine: &str, path: &str) -> SecretRef {
    reference(json!({"type": "HASHICORP_VAULT", "secret_engine": engine, "path": path}))
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn token_kv_v1_and_v2_rotation_and_not_found() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post(
        "secret/data/apono/rancher",
        json!({"data": {"access_key": "token-a", "secret_key": "v1"}}),
    )
    .await;
    bao.post("sys/mounts/kv1", json!({"type": "kv", "options": {"version": "1"}}))
        .await;
    bao.post("kv1/apono/rancher", json!({"token": "old-style"})).await;
    let token = bao.reader_token().await;

    let stores = stores_with(json!([{"address": bao.base, "token": token}]));
    let v2 = vault_ref("secret", "apono/rancher");
    let s = stores.fetch(&v2).await.unwrap();
    assert_eq!(value_of(&s, "access_key"), "token-a");
    assert_eq!(value_of(&s, "secret_key"), "v1");
    let s = stores.fetch(&vault_ref("kv1", "apono/rancher")).await.unwrap();
    assert_eq!(value_of(&s, "token"), "old-style");

    // A new KV version: cached until invalidated.
    bao.post(
        "secret/data/apono/rancher",
        json!({"data": {"access_key": "token-a", "secret_key": "v2"}}),
    )
    .await;
    assert_eq!(value_of(&stores.fetch(&v2).await.unwrap(), "secret_key"), "v1");
    stores.invalidate(&v2);
    assert_eq!(value_of(&stores.fetch(&v2).await.unwrap(), "secret_key"), "v2");

    let e = stores.fetch(&vault_ref("secret", "apono/missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");
    let e = stores.fetch(&vault_ref("kv1", "apono/missing")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    // Outside the token's policy: a 403 (retried once with a re-read definition), then NotPermitted.
    bao.post("secret/data/other/x", json!({"data": {"k": "v"}})).await;
    let stores = stores_with(json!([{"address": bao.base, "token": bao.reader_token().await}]));
    let e = stores.fetch(&vault_ref("secret", "other/x")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("secret/data/other/x"), "{e}");

    // A bad token.
    let stores = stores_with(json!([{"address": bao.base, "token": "not-a-token"}]));
    let e = stores.fetch(&v2).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn approle_login_and_named_vaults() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "via-approle"}}))
        .await;
    bao.reader_token().await; // creates the policy
    let (role_id, secret_id) = bao.approle(json!({"token_policies": ["reader"]})).await;

    let stores = stores_with(json!([
        {"name": "unused", "address": "http://127.0.0.1:1", "token": "x"},
        {"name": "prod", "address": bao.base, "auth": "approle", "role_id": role_id, "secret_id": secret_id},
    ]));
    let r = reference(
        json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "apono/rancher", "vault": "prod"}),
    );
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "via-approle");

    let wrong =
        stores_with(json!([{"address": bao.base, "auth": "approle", "role_id": role_id, "secret_id": "wrong"}]));
    let e = wrong.fetch(&vault_ref("secret", "apono/rancher")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("AppRole"), "{e}");

    let r = reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "x", "vault": "staging"}));
    let e = stores.fetch(&r).await.unwrap_err();
    assert!(e.to_string().contains("staging"), "{e}");
}

#[cfg(feature = "store-aws")]
#[cfg_attr(
    not(all(apono_test_moto, apono_test_bao)),
    ignore = "needs moto and OpenBao: run tests/run, or set APONO_TEST_MOTO_SERVER and APONO_TEST_BAO"
)]
#[tokio::test]
async fn from_secret_store_through_aws_and_token_rotation_on_403() {
    let guard = start_bao(false).await;
    let moto = super::support::start_moto().await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "from-vault"}}))
        .await;
    let first = bao.reader_token().await;

    let sdk = super::aws_moto::sdk_config(&moto).await;
    let admin = super::aws_moto::admin(&sdk);
    let definition = json!({"address": bao.base, "token": first}).to_string();
    super::aws_moto::create(&admin, "vault-definition", &definition, true).await;

    // The Vault store reads its definition through the AWS store (pointed at moto).
    let aws: std::sync::Arc<dyn crate::secrets::SecretStore> =
        std::sync::Arc::new(crate::secrets::AwsStore::with_sdk_config(sdk.clone()));
    let definitions = crate::secrets::VaultDefinitions::parse(
        &json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}]).to_string(),
    )
    .unwrap();
    let vault = crate::secrets::VaultStore::new(definitions, vec![aws.clone()]);
    let stores = SecretStores::empty()
        .with_store(aws)
        .with_store(std::sync::Arc::new(vault))
        .with_cache_ttl(std::time::Duration::ZERO);
    let r = vault_ref("secret", "apono/rancher");
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "from-vault");

    // Rotate the Vault token: new one in AWS, old one revoked. The next read gets a 403, re-reads
    // the definition from AWS and succeeds, without a restart.
    let second = bao.reader_token().await;
    admin
        .put_secret_value()
        .secret_id("vault-definition")
        .secret_string(json!({"address": bao.base, "token": second}).to_string())
        .send()
        .await
        .unwrap();
    bao.post("auth/token/revoke", json!({"token": first})).await;
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "from-vault");

    // A definition in AWS that is malformed: named, without its content.
    super::aws_moto::create(
        &admin,
        "bad-definition",
        r#"{"address":"http://v","tokn":"canary-def-1"}"#,
        true,
    )
    .await;
    let definitions = crate::secrets::VaultDefinitions::parse(
        &json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "bad-definition"}]).to_string(),
    )
    .unwrap();
    let aws: std::sync::Arc<dyn crate::secrets::SecretStore> =
        std::sync::Arc::new(crate::secrets::AwsStore::with_sdk_config(sdk));
    let vault = crate::secrets::VaultStore::new(definitions, vec![aws]);
    let e = crate::secrets::SecretStore::fetch(&vault, &r).await.unwrap_err();
    assert!(
        e.to_string().contains("bad-definition") && e.to_string().contains("tokn"),
        "{e}"
    );
    assert!(!e.to_string().contains("canary"), "{e}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn definitions_file_is_reread_when_it_changes() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "t"}}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.json");
    std::fs::write(&path, json!([{"address": bao.base, "token": "wrong"}]).to_string()).unwrap();
    let config = SecretsConfig {
        hashicorp_vault_config_file_path: Some(path.clone()),
        cache_ttl_seconds: 0,
        ..SecretsConfig::default()
    };
    let stores = SecretStores::from_config(&config).unwrap();
    let r = vault_ref("secret", "apono/rancher");
    assert_eq!(stores.fetch(&r).await.unwrap_err().code(), "secret_not_permitted");
    std::fs::write(
        &path,
        json!([{"address": bao.base, "token": BAO_ROOT, "name": "fixed"}]).to_string(),
    )
    .unwrap();
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn tls_with_ca_certificate_and_with_skip_verify() {
    let guard = start_bao(true).await;
    let bao = Bao::new(&guard, "https");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "over-tls"}}))
        .await;
    let ca = std::fs::read(guard.dir.path().join("vault-ca.pem")).expect("bao wrote its CA");
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca);
    let r = vault_ref("secret", "apono/rancher");

    let with_ca = stores_with(json!([{"address": bao.base, "token": BAO_ROOT, "ca_cert_base64": ca_b64}]));
    assert_eq!(value_of(&with_ca.fetch(&r).await.unwrap(), "token"), "over-tls");

    let skip = stores_with(json!([{"address": bao.base, "token": BAO_ROOT, "skip_verify": "true"}]));
    assert_eq!(value_of(&skip.fetch(&r).await.unwrap(), "token"), "over-tls");

    // Neither: the certificate is refused, and the error says it is about TLS.
    let neither = stores_with(json!([{"address": bao.base, "token": BAO_ROOT}]));
    let e = neither.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
    let msg = e.to_string().to_lowercase();
    assert!(
        msg.contains("certificate") || msg.contains("tls") || msg.contains("issuer"),
        "{e}"
    );
}

/// A Kubernetes API fake answering only TokenReview, as OpenBao's Kubernetes auth calls it.
async fn token_review_fake(expected_jwt: String) -> std::net::SocketAddr {
    use axum::Json;
    use axum::http::HeaderMap;
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        axum::routing::post(move |_headers: HeaderMap, Json(review): Json<Value>| {
            let expected = expected_jwt.clone();
            async move {
                let authenticated = review["spec"]["token"].as_str() == Some(expected.as_str());
                Json(json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"creationTimestamp": null},
                    "spec": review["spec"].clone(),
                    "status": if authenticated {
                        json!({"authenticated": true, "user": {
                            "username": "system:serviceaccount:apono:apono-connector",
                            "uid": "6a6c3c2e-0d6f-4f57-9a3c-6a1e1c0e7b11",
                            "groups": ["system:serviceaccounts", "system:serviceaccounts:apono"]}})
                    } else {
                        json!({"authenticated": false, "error": "invalid bearer token"})
                    },
                }))
            }
        }),
    );
    super::support::serve_http(app).await
}

/// A service account JWT as the kubelet mounts it (legacy claims; OpenBao does not verify the
/// signature unless given keys, it asks TokenReview).
fn service_account_jwt() -> String {
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256", "kid": "test"})),
        b64(json!({
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": "apono",
            "kubernetes.io/serviceaccount/secret.name": "apono-connector-token",
            "kubernetes.io/serviceaccount/service-account.name": "apono-connector",
            "kubernetes.io/serviceaccount/service-account.uid": "6a6c3c2e-0d6f-4f57-9a3c-6a1e1c0e7b11",
            "sub": "system:serviceaccount:apono:apono-connector",
        })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 64]),
    )
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn kubernetes_auth_login() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "via-k8s-auth"}}))
        .await;
    bao.reader_token().await; // creates the policy
    let jwt = service_account_jwt();
    let api = token_review_fake(jwt.clone()).await;
    bao.post("sys/auth/kubernetes", json!({"type": "kubernetes"})).await;
    bao.post(
        "auth/kubernetes/config",
        // The CA is required with disable_local_ca_jwt, though unused over http.
        json!({"kubernetes_host": format!("http://{api}"), "disable_local_ca_jwt": true,
               "kubernetes_ca_cert": super::support::self_signed(&["kubernetes"]).0}),
    )
    .await;
    bao.post(
        "auth/kubernetes/role/apono",
        json!({"bound_service_account_names": ["apono-connector"], "bound_service_account_namespaces": ["apono"], "token_policies": ["reader"]}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &jwt).unwrap();

    let stores =
        stores_with(json!([{"address": bao.base, "auth": "kubernetes", "role": "apono", "token_file": token_file}]));
    let r = vault_ref("secret", "apono/rancher");
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "via-k8s-auth");

    let wrong_role =
        stores_with(json!([{"address": bao.base, "auth": "kubernetes", "role": "nope", "token_file": token_file}]));
    let e = wrong_role.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("Kubernetes login"), "{e}");

    let missing = stores_with(
        json!([{"address": bao.base, "auth": "kubernetes", "role": "apono", "token_file": dir.path().join("nope")}]),
    );
    let e = missing.fetch(&r).await.unwrap_err();
    assert!(e.to_string().contains("service account token"), "{e}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn namespaces() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    let post = reqwest::Method::POST;
    bao.post("sys/namespaces/team", json!({})).await;
    bao.call_in(
        Some("team"),
        post.clone(),
        "sys/mounts/kv",
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    bao.call_in(
        Some("team"),
        post,
        "kv/data/apono/rancher",
        Some(json!({"data": {"token": "in-namespace"}})),
    )
    .await;
    let r = vault_ref("kv", "apono/rancher");
    let stores = stores_with(json!([{"address": bao.base, "token": BAO_ROOT, "namespace": "team"}]));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "in-namespace");
    // Outside the namespace the mount does not exist.
    let root = stores_with(json!([{"address": bao.base, "token": BAO_ROOT}]));
    assert!(root.fetch(&r).await.is_err());
    // `VAULT_NAMESPACE`, as the seed's HCP steps export it, applies to a definition without one.
    let env = |k: &str| match k {
        "VAULT_NAMESPACE" => Some("team".to_string()),
        "HASHICORP_VAULT_CONFIG" => Some(json!([{"address": bao.base, "token": BAO_ROOT}]).to_string()),
        _ => None,
    };
    let config = SecretsConfig::from_env(env).unwrap();
    let from_env = SecretStores::from_config(&config).unwrap();
    assert_eq!(value_of(&from_env.fetch(&r).await.unwrap(), "token"), "in-namespace");
    // A definition's own namespace wins over the variable.
    let config = SecretsConfig {
        vault_namespace: Some("elsewhere".into()),
        ..config
    };
    let own = SecretsConfig {
        hashicorp_vault_config: Some(SecretString::from(
            json!([{"address": bao.base, "token": BAO_ROOT, "namespace": "team"}]).to_string(),
        )),
        ..config
    };
    let own = SecretStores::from_config(&own).unwrap();
    assert_eq!(value_of(&own.fetch(&r).await.unwrap(), "token"), "in-namespace");
}

/// A Vault store whose definitions may point at `memory` (standing in for AWS).
pub(super) fn vault_over_memory(
    config: Value,
    memory: &std::sync::Arc<crate::secrets::MemoryStore>,
) -> crate::secrets::VaultStore {
    let definitions = crate::secrets::VaultDefinitions::parse(&config.to_string()).unwrap();
    let other: std::sync::Arc<dyn crate::secrets::SecretStore> = memory.clone();
    crate::secrets::VaultStore::new(definitions, vec![other])
}

pub(super) fn definition_ref() -> SecretRef {
    reference(json!({"type": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}))
}

fn unreachable_store() -> crate::secrets::SecretError {
    crate::secrets::SecretError::Unreachable {
        reference: "AWS secret vault-definition".into(),
        hint: "connection refused".into(),
    }
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn from_secret_store_failure_heals_on_a_later_read() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "healed"}}))
        .await;
    let memory = std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS"));
    memory.fail_with(&definition_ref(), unreachable_store());
    let vault = vault_over_memory(
        json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}]),
        &memory,
    );
    let r = vault_ref("secret", "apono/rancher");
    let e = crate::secrets::SecretStore::fetch(&vault, &r).await.unwrap_err();
    assert_eq!(e.code(), unreachable_store().code(), "{e}");

    // The store comes back; after the (first, one-second) backoff the definition is fetched again.
    memory.set(&definition_ref(), [("address", bao.base.as_str()), ("token", BAO_ROOT)]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let s = crate::secrets::SecretStore::fetch(&vault, &r).await.unwrap();
    assert_eq!(value_of(&s, "token"), "healed");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn reference_without_vault_uses_the_first_definition_that_holds_the_path() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("sys/namespaces/team", json!({})).await;
    bao.post("secret/data/other/x", json!({"data": {"token": "in-root"}}))
        .await;
    let reader = bao.reader_token().await;
    // 0: a namespace without the path (404); 1: a token not allowed to read it (403); 2: holds it.
    let vault = vault_over_memory(
        json!([
            {"address": bao.base, "token": BAO_ROOT, "namespace": "team", "name": "team"},
            {"address": bao.base, "token": reader, "name": "reader"},
            {"address": bao.base, "token": BAO_ROOT, "name": "root"},
        ]),
        &std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS")),
    );
    let s = crate::secrets::SecretStore::fetch(&vault, &vault_ref("secret", "other/x"))
        .await
        .unwrap();
    assert_eq!(value_of(&s, "token"), "in-root");
    // Held by none: the 403 is what the user must fix, and it names the vault.
    let e = crate::secrets::SecretStore::fetch(&vault, &vault_ref("secret", "other/missing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("reader"), "{e}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn an_unreachable_definition_does_not_stop_the_others() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "from-second"}}))
        .await;
    let memory = std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS"));
    memory.fail_with(&definition_ref(), unreachable_store());
    let vault = vault_over_memory(
        json!([
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"},
            {"address": bao.base, "token": BAO_ROOT, "name": "second"},
        ]),
        &memory,
    );
    let s = crate::secrets::SecretStore::fetch(&vault, &vault_ref("secret", "apono/rancher"))
        .await
        .unwrap();
    assert_eq!(value_of(&s, "token"), "from-second");
    let named = reference(
        json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "apono/rancher", "vault": "second"}),
    );
    let s = crate::secrets::SecretStore::fetch(&vault, &named).await.unwrap();
    assert_eq!(value_of(&s, "token"), "from-second");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_policy_denial_does_not_spend_approle_secret_id_uses() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/other/x", json!({"data": {"k": "v"}})).await;
    bao.reader_token().await; // creates the policy, which does not cover other/
    let (role_id, secret_id) = bao
        .approle(json!({"token_policies": ["reader"], "secret_id_num_uses": 2}))
        .await;
    let vault = vault_over_memory(
        json!([{"address": bao.base, "auth": "approle", "role_id": role_id, "secret_id": secret_id}]),
        &std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS")),
    );
    let r = vault_ref("secret", "other/x");
    for attempt in 1..=3 {
        let e = crate::secrets::SecretStore::fetch(&vault, &r).await.unwrap_err();
        assert_eq!(e.code(), "secret_not_permitted", "attempt {attempt}: {e}");
        assert!(e.to_string().contains("policy must allow"), "attempt {attempt}: {e}");
    }
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn approle_tokens_are_renewed_before_they_expire() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    // A 9 s token and a secret ID good for one login: only renewal keeps reads working.
    let (role_id, secret_id) = bao
        .approle(
            json!({"token_policies": ["reader"], "token_ttl": "9s", "token_max_ttl": "60s", "secret_id_num_uses": 1}),
        )
        .await;
    let vault = vault_over_memory(
        json!([{"address": bao.base, "auth": "approle", "role_id": role_id, "secret_id": secret_id}]),
        &std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS")),
    );
    reads_outlive_a_9s_token(&bao, &vault).await;
}

/// Reads `apono/rancher` 6.5 s apart: past two thirds of a 9 s token's life (6 s), with 2.5 s to
/// spare before it expires (a loaded machine does not make the test flaky); the last read is past
/// the first token's expiry. Writes the secret and creates the `reader` policy first.
pub(super) async fn reads_outlive_a_9s_token(bao: &Bao, vault: &crate::secrets::VaultStore) {
    bao.post(
        "secret/data/apono/rancher",
        json!({"data": {"token": "still-readable"}}),
    )
    .await;
    bao.reader_token().await;
    let r = vault_ref("secret", "apono/rancher");
    for _ in 0..3 {
        let s = crate::secrets::SecretStore::fetch(vault, &r).await.unwrap();
        assert_eq!(value_of(&s, "token"), "still-readable");
        tokio::time::sleep(std::time::Duration::from_millis(6500)).await;
    }
}

/// An AWS stand-in whose reads each wait until `barrier` has as many readers waiting: reads made one
/// after another never get through.
struct BarrierStore {
    barrier: tokio::sync::Barrier,
    address: String,
}

#[async_trait::async_trait]
impl crate::secrets::SecretStore for BarrierStore {
    fn store_type(&self) -> &'static str {
        "AWS"
    }

    async fn fetch(&self, _reference: &SecretRef) -> Result<crate::secrets::Secret, crate::secrets::SecretError> {
        self.barrier.wait().await;
        let values = [("address", self.address.as_str()), ("token", BAO_ROOT)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), SecretString::from(v.to_string())))
            .collect();
        Ok(crate::secrets::Secret::new(values))
    }
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn from_secret_store_definitions_are_resolved_in_parallel() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "parallel"}}))
        .await;
    let store: std::sync::Arc<dyn crate::secrets::SecretStore> = std::sync::Arc::new(BarrierStore {
        barrier: tokio::sync::Barrier::new(2),
        address: bao.base.clone(),
    });
    let definitions = crate::secrets::VaultDefinitions::parse(
        &json!([
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "first"},
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "second"},
        ])
        .to_string(),
    )
    .unwrap();
    let vault = crate::secrets::VaultStore::new(definitions, vec![store]);
    // Resolved one after the other, the first read would wait for the second forever; the timeout
    // only turns that hang into a failure.
    let r = vault_ref("secret", "apono/rancher");
    let read = crate::secrets::SecretStore::fetch(&vault, &r);
    let s = tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the definitions were resolved one after the other")
        .unwrap();
    assert_eq!(value_of(&s, "token"), "parallel");
}

/// Issue 18: one client per vault definition, shared by every read, with its connection kept
/// alive (counted at a proxy in front of OpenBao); a re-read definitions file keeps the client
/// of an entry it did not change and builds one only for the entry that did.
#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_per_definition_kept_while_it_is_unchanged() {
    use std::sync::atomic::Ordering;
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "t"}}))
        .await;
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", guard.port).parse().unwrap();
    let (proxy, connections) = super::support::counting_proxy(target).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.json");
    let through_proxy = format!("http://{proxy}");
    std::fs::write(
        &path,
        json!([{"address": through_proxy, "token": BAO_ROOT, "name": "a"}]).to_string(),
    )
    .unwrap();
    let config = SecretsConfig {
        hashicorp_vault_config_file_path: Some(path.clone()),
        ..SecretsConfig::default()
    };
    let definitions = crate::secrets::VaultDefinitions::from_config(&config).unwrap();
    let vault = std::sync::Arc::new(crate::secrets::VaultStore::new(definitions, vec![]));
    let stores = SecretStores::empty()
        .with_store(vault.clone())
        .with_cache_ttl(std::time::Duration::ZERO);
    let r = vault_ref("secret", "apono/rancher");
    for _ in 0..30 {
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
    }
    assert_eq!(vault.clients_built(), 1);
    let opened = connections.load(Ordering::SeqCst);
    // A client per read would open 30 or more; a kept pool a few (hyper hands a connection back
    // to the pool just after the answer, so a quick next request may open another).
    assert!(opened <= 5, "{opened} connections for 30 reads");
    eprintln!("OpenBao: 30 reads opened {opened} connections");

    // Another entry added after it: the first keeps its client (and its connection).
    std::fs::write(
        &path,
        json!([
            {"address": through_proxy, "token": BAO_ROOT, "name": "a"},
            {"address": bao.base, "token": BAO_ROOT, "name": "b"},
        ])
        .to_string(),
    )
    .unwrap();
    for _ in 0..5 {
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "t");
    }
    let b =
        reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "apono/rancher", "vault": "b"}));
    assert_eq!(value_of(&stores.fetch(&b).await.unwrap(), "token"), "t");
    assert_eq!(vault.clients_built(), 2, "one more, for the new entry only");
    let after = connections.load(Ordering::SeqCst);
    assert!(
        after <= opened + 2,
        "{after} connections after 5 more reads (was {opened})"
    );

    // The first entry changed: its client is built again.
    std::fs::write(
        &path,
        json!([{"address": through_proxy, "token": BAO_ROOT, "name": "a", "skip_verify": false}]).to_string(),
    )
    .unwrap();
    stores.fetch(&r).await.unwrap();
    assert_eq!(vault.clients_built(), 3);
}

/// Secrets review N8: a `from_secret_store` secret holding the `HASHICORP_VAULT_CONFIG` shape (a
/// one-element list, as plain text, with a byte-order mark even) is that definition; a list of
/// several says what to do instead.
#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_definition_secret_may_hold_the_list_shape() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "from-list"}}))
        .await;
    let memory = std::sync::Arc::new(crate::secrets::MemoryStore::new("AWS"));
    let list = format!("\u{feff}{}", json!([{"address": bao.base, "token": BAO_ROOT}]));
    memory.set(&definition_ref(), [("value", list.as_str())]);
    let pointer = json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}]);
    let vault = vault_over_memory(pointer.clone(), &memory);
    let r = vault_ref("secret", "apono/rancher");
    let s = crate::secrets::SecretStore::fetch(&vault, &r).await.unwrap();
    assert_eq!(value_of(&s, "token"), "from-list");

    let two = json!([{"address": bao.base, "token": BAO_ROOT}, {"address": bao.base, "token": "canary-second"}]);
    memory.set(&definition_ref(), [("value", two.to_string())]);
    let vault = vault_over_memory(pointer, &memory);
    let e = crate::secrets::SecretStore::fetch(&vault, &r)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("list of 2 entries") && e.contains("one definition per secret"),
        "{e}"
    );
    assert!(!e.contains("canary-second") && !e.contains(BAO_ROOT), "{e}");
}
