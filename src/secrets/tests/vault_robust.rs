//! The Vault store when things go wrong as they do in production (issue 21, review secrets-2):
//! pasted tokens, stalled definitions, expiring tokens, API-style paths, non-KV mounts. Against
//! OpenBao; `from_secret_store` definitions come from a `MemoryStore` standing in for AWS.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::support::{BAO_ROOT, LogCapture, reference, start_bao, value_of};
use super::vault_bao::{Bao, definition_ref, reads_outlive_a_9s_token, stores_with, vault_over_memory, vault_ref};
use crate::secrets::{MemoryStore, SecretStore, VaultDefinitions};

fn no_others() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new("AWS"))
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_token_or_namespace_ending_in_a_newline_reads_and_a_control_character_is_named() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("sys/namespaces/team", json!({})).await;
    bao.call_in(
        Some("team"),
        reqwest::Method::POST,
        "sys/mounts/secret",
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    bao.call_in(
        Some("team"),
        reqwest::Method::POST,
        "secret/data/apono/rancher",
        Some(json!({"data": {"token": "in-team"}})),
    )
    .await;
    // What `kubectl create secret --from-file=token=./token` stores: the file's trailing newline.
    let memory = no_others();
    memory.set(
        &definition_ref(),
        [
            ("address", bao.base.as_str()),
            ("token", &format!("{BAO_ROOT}\n")),
            ("namespace", "team\n"),
        ],
    );
    let vault = vault_over_memory(
        json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}]),
        &memory,
    );
    let s = vault.fetch(&vault_ref("secret", "apono/rancher")).await.unwrap();
    assert_eq!(value_of(&s, "token"), "in-team");

    // A control character inside: a named, non-retryable error, never a panic, never the value.
    memory.set(
        &definition_ref(),
        [("address", bao.base.as_str()), ("token", "CANARY\u{0}-x")],
    );
    let vault = vault_over_memory(
        json!([{"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"}]),
        &memory,
    );
    let e = vault.fetch(&vault_ref("secret", "apono/rancher")).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(e.to_string().contains("\"token\" contains a control character"), "{e}");
    assert!(!e.to_string().contains("CANARY"), "{e}");
    let e = VaultDefinitions::parse(r#"[{"address":"http://v","token":"t","namespace":"a\nb"}]"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("\"namespace\" contains a control character"), "{e}");
}

/// `apono/rancher` = {token: `value`} in the vault, and a store holding its definition that
/// accepts and never answers (a Kubernetes API or Key Vault that stalls).
async fn stalled_definition(guard: &super::support::ServerGuard, value: &str) -> (Bao, Arc<MemoryStore>) {
    let bao = Bao::new(guard, "http");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": value}}))
        .await;
    let memory = no_others();
    memory.set(&definition_ref(), [("address", bao.base.as_str()), ("token", BAO_ROOT)]);
    memory.set_delay(Duration::from_secs(3600));
    (bao, memory)
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_stalled_definition_never_delays_a_vault_listed_before_it() {
    let guard = start_bao(false).await;
    let (bao, memory) = stalled_definition(&guard, "first").await;
    let vault = vault_over_memory(
        json!([
            {"address": bao.base, "token": BAO_ROOT},
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"},
        ]),
        &memory,
    );
    let r = vault_ref("secret", "apono/rancher");
    // The deadline only turns a wait for the stalled store into a failure; twice, since a
    // resolution left pending must not stall the next read either.
    for read in 1..=2 {
        let s = tokio::time::timeout(Duration::from_secs(10), vault.fetch(&r))
            .await
            .unwrap_or_else(|_| panic!("read {read} waited for the stalled definition"))
            .unwrap();
        assert_eq!(value_of(&s, "token"), "first");
    }
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_stalled_definition_is_remembered_as_failed_with_backoff() {
    let guard = start_bao(false).await;
    let (bao, memory) = stalled_definition(&guard, "second").await;
    let vault = vault_over_memory(
        json!([
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"},
            {"address": bao.base, "token": BAO_ROOT, "name": "second"},
        ]),
        &memory,
    )
    .with_deadlines(Duration::from_millis(300), Duration::from_secs(20));
    let r = vault_ref("secret", "apono/rancher");
    for read in 1..=3 {
        let s = tokio::time::timeout(Duration::from_secs(10), vault.fetch(&r))
            .await
            .unwrap_or_else(|_| panic!("read {read} waited for the stalled definition"))
            .unwrap();
        assert_eq!(value_of(&s, "token"), "second");
    }
    // Timed out once, then answered from memory during the backoff: the store was asked once.
    assert_eq!(memory.calls(), 1);
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn errors_name_the_vault_the_cause_and_are_retryable_only_when_retrying_helps() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/test/webapp", json!({"data": {"k": "v"}})).await;
    bao.post("sys/mounts/transit", json!({"type": "transit"})).await;
    let r = vault_ref("secret", "test/webapp");

    // A mistyped (or expired, or revoked) token is not a policy problem.
    let wrong = vault_over_memory(json!([{"address": bao.base, "token": "s.mistyped"}]), &no_others());
    let e = wrong.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("does not accept the token"), "{e}");
    assert!(!e.to_string().contains("policy must allow"), "{e}");

    // Only KV mounts are read: a GET on another engine can mint credentials.
    let root = vault_over_memory(json!([{"address": bao.base, "token": BAO_ROOT}]), &no_others());
    for (engine, path) in [("transit", "keys"), ("sys", "health"), ("auth/token", "lookup-self")] {
        let e = root.fetch(&vault_ref(engine, path)).await.unwrap_err();
        assert_eq!(e.code(), "secret_store_misconfigured", "{engine}: {e}");
        assert!(!e.retryable(), "{engine}: {e}");
        assert!(e.to_string().contains("not KV"), "{engine}: {e}");
    }

    // A typo next to a definition that cannot be read: the not-found comes first, under the
    // Vault reference, naming the path that was asked for.
    let memory = no_others();
    memory.fail_with(
        &definition_ref(),
        crate::secrets::SecretError::Unreachable {
            reference: definition_ref().describe(),
            hint: "cannot get credentials now".into(),
        },
    );
    let two = vault_over_memory(
        json!([
            {"address": bao.base, "token": BAO_ROOT},
            {"from_secret_store": "AWS", "region": "us-east-1", "secret_id": "vault-definition"},
        ]),
        &memory,
    );
    let e = two.fetch(&vault_ref("secret", "test/webap")).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("secret store unreachable for HASHICORP_VAULT secret/test/webap"),
        "{e}"
    );
    assert!(text.contains("has no secret at secret/data/test/webap"), "{e}");
    assert!(
        text.contains("definition 1 (the vault definition in AWS us-east-1/vault-definition)"),
        "{e}"
    );
    // With the vaults all answering, a typo is not retried.
    let e = root.fetch(&vault_ref("secret", "test/webap")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");
    assert!(!e.retryable());
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test(flavor = "current_thread")]
async fn a_vault_skipped_on_the_way_to_the_next_is_named_in_a_warning() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/rancher/key", json!({"data": {"k": "staging"}}))
        .await;
    let logs = LogCapture::default();
    let _log = logs.install();
    let dead = format!("http://127.0.0.1:{}", super::support::free_port(false));
    let vault = vault_over_memory(
        json!([
            {"address": dead, "token": "t", "name": "prod"},
            {"address": bao.base, "token": BAO_ROOT, "name": "staging"},
        ]),
        &no_others(),
    );
    let s = vault.fetch(&vault_ref("secret", "rancher/key")).await.unwrap();
    assert_eq!(value_of(&s, "k"), "staging");
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("prod (") && l.contains("skipping")),
        "{text}"
    );
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn kv2_paths_are_accepted_with_or_without_data() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/test/webapp", json!({"data": {"k": "v2"}})).await;
    let vault = vault_over_memory(json!([{"address": bao.base, "token": BAO_ROOT}]), &no_others());
    for (engine, path) in [
        ("secret", "test/webapp"),
        ("secret", "data/test/webapp"),
        ("secret/data", "test/webapp"),
        ("/secret/", "/data/test/webapp"),
    ] {
        let s = vault
            .fetch(&vault_ref(engine, path))
            .await
            .unwrap_or_else(|e| panic!("{engine} {path}: {e}"));
        assert_eq!(value_of(&s, "k"), "v2");
    }
    // The error names the API path that was asked for, once.
    let e = vault
        .fetch(&vault_ref("secret", "data/test/missing"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no secret at secret/data/test/missing "), "{e}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn a_periodic_configured_token_is_renewed() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.reader_token().await; // creates the policy
    let token = bao
        .post("auth/token/create", json!({"policies": ["reader"], "period": "9s"}))
        .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let vault = vault_over_memory(json!([{"address": bao.base, "token": token}]), &no_others());
    reads_outlive_a_9s_token(&bao, &vault).await;
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn token_file_is_reread_when_the_agent_rewrites_it_and_ca_cert_file_is_read() {
    let guard = start_bao(true).await;
    let bao = Bao::new(&guard, "https");
    bao.post("secret/data/apono/rancher", json!({"data": {"token": "via-sink"}}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("token");
    std::fs::write(&sink, "s.not-yet-valid\n").unwrap();
    let ca = guard.dir.path().join("vault-ca.pem");
    let vault = vault_over_memory(
        json!([{"address": bao.base, "token_file": sink, "ca_cert_file": ca}]),
        &no_others(),
    );
    let r = vault_ref("secret", "apono/rancher");
    let e = vault.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    // The Vault Agent writes a new token (with a trailing newline, as sinks do).
    std::fs::write(&sink, format!("{BAO_ROOT}\n")).unwrap();
    let s = vault.fetch(&r).await.unwrap();
    assert_eq!(value_of(&s, "token"), "via-sink");
    // Token auth takes the token or the file, not both; a login's fields are refused with it.
    for bad in [
        json!([{"address": "https://v", "token": "t", "token_file": "/x"}]),
        json!([{"address": "https://v", "token": "t", "role": "apono"}]),
        json!([{"address": "https://v", "token": "t", "ca_cert_file": "/nonexistent/ca.pem"}]),
    ] {
        assert!(VaultDefinitions::parse(&bad.to_string()).is_err(), "{bad}");
    }
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn registry_reads_through_the_same_paths() {
    let guard = start_bao(false).await;
    let bao = Bao::new(&guard, "http");
    bao.post("secret/data/test/webapp", json!({"data": {"k": "v"}})).await;
    let stores = stores_with(json!([{"address": bao.base, "token": format!("{BAO_ROOT}\n")}]));
    let r = reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret/data", "path": "test/webapp"}));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "k"), "v");
}
