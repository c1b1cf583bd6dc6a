//! A canary value planted in every store must never appear in logs (trace level), errors, `Debug`
//! output or metrics: only in the `Secret` handed to the caller.

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::SecretString;
use serde_json::json;

use super::support::{LogCapture, reference, start_bao, start_moto, value_of};
use crate::config::{LogFormat, SecretsConfig};
use crate::secrets::{MemoryStore, SecretError, SecretRef, SecretStores, VaultDefinitions, VaultStore};

const CANARY: &str = "CANARY-d41d8cd98f00b204";

fn canary(store: &str) -> String {
    format!("{CANARY}-{store}")
}

/// The log format a [`canary_child`] installs (`text` or `json`).
const CHILD_LOG_FORMAT: &str = "APONO_TEST_LOG_FORMAT";

/// Runs [`canary_child`] in a child process (this test binary again), once per log format: there
/// it can install the production subscriber globally at trace level, seeing every thread, without
/// other tests' events or their races with callsite registration.
#[test]
fn a_planted_value_never_leaks() {
    for format in ["text", "json"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "secrets::tests::canary::canary_child",
                "--ignored",
                "--nocapture",
            ])
            .env("APONO_TEST_CHILD", "1")
            .env(CHILD_LOG_FORMAT, format)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if std::env::var_os("APONO_TEST_DUMP_LOGS").is_some() {
            eprintln!("{stderr}");
        }
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "canary child ({format} logs) failed:\n{stdout}\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_planted_value_never_leaks in a child process"]
async fn canary_child() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let format = match std::env::var(CHILD_LOG_FORMAT).as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    let logs = LogCapture::default();
    logs.install_global(format);

    let mut stores = SecretStores::empty().with_store(Arc::new(crate::secrets::AponoStore));
    // (reference, key, planted value) read successfully; references expected to fail.
    let mut reads: Vec<(SecretRef, &str, String)> = Vec::new();
    let mut failures: Vec<SecretRef> = Vec::new();

    // APONO (inline).
    reads.push((
        reference(json!({"type": "APONO", "credentials": {"secret_key": canary("APONO")}})),
        "secret_key",
        canary("APONO"),
    ));

    // Kubernetes fake.
    let (client, _) = super::kube_fake::fake(vec![
        super::kube_fake::secret("apono", "k", true, &[("secret_key", canary("K8S").as_bytes())]),
        super::kube_fake::secret("apono", "unmarked", false, &[("secret_key", canary("K8S").as_bytes())]),
        super::kube_fake::secret("apono", "nested", true, &[("blob", &[0xff, 0xfe])]),
    ])
    .await;
    stores = stores.with_store(Arc::new(crate::secrets::KubernetesStore::with_client(client, vec![])));
    reads.push((
        reference(json!({"type": "KUBERNETES", "namespace": "apono", "name": "k"})),
        "secret_key",
        canary("K8S"),
    ));
    failures.push(reference(
        json!({"type": "KUBERNETES", "namespace": "apono", "name": "unmarked"}),
    ));
    failures.push(reference(
        json!({"type": "KUBERNETES", "namespace": "apono", "name": "nested"}),
    ));

    // Azure fake.
    let (vault, store, _, url) = super::azure_fake::fake().await;
    {
        let mut s = vault.secrets.lock().unwrap();
        let v = json!({"secret_key": canary("AZURE")}).to_string();
        s.insert("k".into(), (v.clone(), super::azure_fake::marked()));
        s.insert("unmarked".into(), (v, HashMap::new()));
        s.insert(
            "nested".into(),
            (
                json!({"a": {"b": canary("AZURE")}}).to_string(),
                super::azure_fake::marked(),
            ),
        );
    }
    // With the opt-in mark, so the refusal path is covered too.
    stores = stores.with_store(Arc::new(store.requiring_read_mark(true)));
    reads.push((
        reference(json!({"type": "AZURE", "vault_url": url, "name": "k"})),
        "secret_key",
        canary("AZURE"),
    ));
    failures.push(reference(
        json!({"type": "AZURE", "vault_url": url, "name": "unmarked"}),
    ));
    failures.push(reference(json!({"type": "AZURE", "vault_url": url, "name": "nested"})));

    // GCP fake.
    let (fake, store) = super::gcp_fake::fake().await;
    {
        let mut s = fake.secrets.lock().unwrap();
        let v = json!({"secret_key": canary("GCP")}).to_string().into_bytes();
        s.insert("k".into(), (super::gcp_fake::marked(), vec![v.clone()]));
        s.insert("unmarked".into(), (HashMap::new(), vec![v]));
        s.insert(
            "broken".into(),
            (
                super::gcp_fake::marked(),
                vec![format!("{{\"k\": \"{}\"", canary("GCP")).into_bytes()],
            ),
        );
    }
    stores = stores.with_store(Arc::new(store.requiring_read_mark(true)));
    reads.push((
        reference(json!({"type": "GCP", "project": "p", "secret_id": "k"})),
        "secret_key",
        canary("GCP"),
    ));
    failures.push(reference(
        json!({"type": "GCP", "project": "p", "secret_id": "unmarked"}),
    ));
    failures.push(reference(json!({"type": "GCP", "project": "p", "secret_id": "broken"})));

    // AWS (moto) and Vault (OpenBao), whose definition (with its token, a credential too) lives in AWS.
    // Run with the servers where they run (CI, tests/run); the fakes' part runs everywhere.
    let (moto, bao) = if cfg!(all(apono_test_moto, apono_test_bao)) {
        (Some(start_moto().await), Some(start_bao(false).await))
    } else {
        (None, None)
    };
    let vault_token = canary("VAULT-TOKEN");
    if let (Some(moto), Some(bao_guard)) = (&moto, &bao) {
        let sdk = super::aws_moto::sdk_config(moto).await;
        let admin = super::aws_moto::admin(&sdk);
        let v = json!({"secret_key": canary("AWS")}).to_string();
        super::aws_moto::create(&admin, "k", &v, true).await;
        super::aws_moto::create(&admin, "unmarked", &v, false).await;
        let bao_api = super::vault_bao::Bao::new(bao_guard, "http");
        bao_api
            .post("auth/token/create", json!({"id": vault_token, "policies": ["root"]}))
            .await;
        bao_api
            .post("secret/data/k", json!({"data": {"secret_key": canary("VAULT")}}))
            .await;
        bao_api
            .post("secret/data/nested", json!({"data": {"a": {"b": canary("VAULT")}}}))
            .await;
        super::aws_moto::create(
            &admin,
            "vault-def",
            &json!({"address": bao_api.base, "token": vault_token}).to_string(),
            true,
        )
        .await;
        let aws: Arc<dyn crate::secrets::SecretStore> = Arc::new(crate::secrets::AwsStore::with_sdk_config(sdk));
        let defs = VaultDefinitions::parse(
            &json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-def"}]).to_string(),
        )
        .unwrap();
        stores = stores
            .with_store(aws.clone())
            .with_store(Arc::new(VaultStore::new(defs, vec![aws])));
        reads.push((
            reference(json!({"type": "AWS", "region": "us-east-1", "secret_id": "k"})),
            "secret_key",
            canary("AWS"),
        ));
        failures.push(reference(
            json!({"type": "AWS", "region": "us-east-1", "secret_id": "unmarked"}),
        ));
        reads.push((
            reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "k"})),
            "secret_key",
            canary("VAULT"),
        ));
        failures.push(reference(
            json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "nested"}),
        ));
    }

    let mut outputs = Vec::new();

    // Refused Vault credentials (a token, an AppRole secret_id) stay out of errors and logs too.
    if let Some(bao_guard) = &bao {
        let bao_api = super::vault_bao::Bao::new(bao_guard, "http");
        bao_api.post("sys/auth/approle", json!({"type": "approle"})).await;
        bao_api
            .post("auth/approle/role/apono", json!({"token_policies": ["default"]}))
            .await;
        let r = reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "k"}));
        for definition in [
            json!([{"address": bao_api.base, "token": canary("BAD-VAULT-TOKEN")}]),
            json!([{"address": bao_api.base, "auth": "approle", "role_id": "apono", "secret_id": canary("BAD-SECRET-ID")}]),
        ] {
            let defs = VaultDefinitions::parse(&definition.to_string()).unwrap();
            let store = VaultStore::new(defs, vec![]);
            let e = crate::secrets::SecretStore::fetch(&store, &r).await.unwrap_err();
            assert_eq!(e.code(), "secret_not_permitted", "{e}");
            outputs.push(format!("{e} {e:?}"));
        }
    }

    // Memory store (what other modules' tests use).
    let mem = Arc::new(MemoryStore::new("AWS"));
    let mem_ref = reference(json!({"type": "AWS", "region": "x", "secret_id": "m"}));
    mem.set(&mem_ref, [("secret_key", canary("MEMORY"))]);
    let mem_stores = SecretStores::empty().with_store(mem);
    let s = mem_stores.fetch(&mem_ref).await.unwrap();
    assert_eq!(value_of(&s, "secret_key"), canary("MEMORY"));
    outputs.push(format!("{s:?} {mem_stores:?} {:?}", mem_stores.metrics()));

    for (r, key, planted) in &reads {
        let secret = stores
            .fetch(r)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", r.describe()));
        assert_eq!(&value_of(&secret, key), planted, "{}", r.describe());
        // Twice: the second from the cache.
        let again = stores.fetch(r).await.unwrap();
        outputs.push(format!("{secret:?} {again:?} {r:?} {}", r.describe()));
    }
    let mut errors: Vec<SecretError> = Vec::new();
    for r in &failures {
        let e = stores.fetch(r).await.expect_err(&r.describe());
        outputs.push(format!("{e} {e:?} {}", e.code()));
        errors.push(e);
    }
    assert!(errors.iter().any(|e| e.code() == "secret_not_marked"));
    assert!(errors.iter().any(|e| e.code() == "secret_malformed"));
    for row in stores
        .describe_all(&reads.iter().map(|(r, _, _)| r.clone()).collect::<Vec<_>>())
        .await
    {
        outputs.push(format!("{row:?}"));
    }
    outputs.push(format!("{stores:?}"));
    outputs.push(format!("{:?}", stores.metrics()));
    outputs.push(serde_json::to_string(&stores.metrics()).unwrap());
    outputs.push(format!(
        "{:?}",
        SecretsConfig {
            hashicorp_vault_config: Some(SecretString::from(format!("[{{\"token\":\"{vault_token}\"}}]"))),
            ..SecretsConfig::default()
        }
    ));

    let logs = logs.text();
    if std::env::var_os("APONO_TEST_DUMP_LOGS").is_some() {
        eprintln!("{logs}");
    }
    assert!(logs.contains("secret read"), "trace logging was captured:\n{logs}");
    // The format asked for is the one that wrote: every JSON line parses, no text line does.
    let json_lines = logs
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    match format {
        LogFormat::Json => assert_eq!(json_lines, logs.lines().count(), "JSON logs:\n{logs}"),
        LogFormat::Text => assert_eq!(json_lines, 0, "text logs:\n{logs}"),
    }
    for text in outputs.iter().chain(std::iter::once(&logs)) {
        assert!(!text.contains(CANARY), "canary leaked:\n{text}");
    }
    if moto.is_none() || bao.is_none() {
        eprintln!(
            "*** canary test ran without AWS/Vault: run tests/run, or set APONO_TEST_MOTO_SERVER and APONO_TEST_BAO ***"
        );
    }
}

/// L1: inline credentials of the wrong shape are named by field and type, never quoted: through
/// a job's integration spec (serde_json) and through a TOML config (figment).
#[test]
fn inline_credentials_of_the_wrong_shape_are_not_quoted() {
    let secret = canary("INLINE");
    for credentials in [
        json!(secret),
        json!({"secret_key": 12345678}),
        json!({"secret_key": {"nested": secret}}),
        json!([secret]),
    ] {
        let spec = json!({
            "type": "rancher", "name": "r", "config": {},
            "secret_store": {"type": "APONO", "credentials": credentials},
        });
        let e = serde_json::from_value::<crate::integrations::IntegrationSpec>(spec).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(text.contains("credentials"), "the field is named: {text}");
        assert!(
            !text.contains(CANARY) && !text.contains("12345678"),
            "canary leaked: {text}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for credentials in [format!("\"{secret}\""), "{ secret_key = 12345678 }".to_string()] {
        std::fs::write(
            &path,
            format!(
                "[[integrations]]\ntype = \"rancher\"\nname = \"r\"\nconfig = {{ host = \"https://rancher.example\" }}\n\
                 secret_store = {{ type = \"APONO\", credentials = {credentials} }}\n"
            ),
        )
        .unwrap();
        let e = crate::config::Config::load_from(Some(&path), |_| None).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(text.contains("credentials"), "the field is named: {text}");
        assert!(
            !text.contains(CANARY) && !text.contains("12345678"),
            "canary leaked: {text}"
        );
    }
}

/// L2: a kubeconfig that does not parse, with a token next to the error, is named by path only.
/// In a child process: `KUBECONFIG` is process-wide.
#[test]
fn a_broken_kubeconfig_is_not_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n    token: {}\n    bad: [unclosed\n",
            canary("KUBECONFIG")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "secrets::tests::canary::kubeconfig_child",
            "--ignored",
            "--nocapture",
        ])
        .env("APONO_TEST_CHILD", "1")
        .env("KUBECONFIG", &path)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "kubeconfig child failed:\n{stdout}\n{stderr}"
    );
}

#[tokio::test]
#[ignore = "run by a_broken_kubeconfig_is_not_quoted in a child process"]
async fn kubeconfig_child() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let store = crate::secrets::KubernetesStore::new(vec![]);
    let r = reference(json!({"type": "KUBERNETES", "namespace": "apono", "name": "k"}));
    let e = crate::secrets::SecretStore::fetch(&store, &r).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(text.contains("could not be parsed"), "{text}");
    assert!(text.contains("kubeconfig"), "{text}");
    assert!(!text.contains(CANARY), "canary leaked: {text}");
}
