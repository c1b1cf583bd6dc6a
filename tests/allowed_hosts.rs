//! The real binary in remote mode against a hostile control plane that names a Rancher host the
//! agent's owner did not allow (security review N1): with `APONO_ALLOWED_RANCHER_HOSTS` set, the
//! job fails `host_not_allowed` naming the host, its secret is never read (a fake Vault counts
//! requests) and the foreign host never sees a connection (a listener counts them). A job for an
//! allowed host does reach its host, so the counters can fail. Without the list, the agent says at
//! start, in the log and in a gauge, that the control plane decides where keys go.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, Uri};
use common::scripted_cp::{self, Shared, serve};
use common::{BIN, ChildGuard, free_port};
use serde_json::{Value, json};

/// A listener that only counts the connections it accepts (and closes them).
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, count)
}

/// A Vault (KV v2 at `secret/`) that serves a Rancher key at `secret/rancher` and records every
/// request path: without the allow-list the agent would read it and send it on.
async fn counting_vault() -> (String, Arc<Mutex<Vec<String>>>) {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let recorded = paths.clone();
    let url = serve(Router::new().fallback(move |uri: Uri| {
        let recorded = recorded.clone();
        async move {
            recorded.lock().expect("lock").push(uri.path().to_string());
            match uri.path() {
                "/v1/sys/internal/ui/mounts/secret" | "/v1/sys/internal/ui/mounts/secret/rancher" => (
                    StatusCode::OK,
                    axum::Json(json!({"data": {"type": "kv", "path": "secret/", "options": {"version": "2"}}})),
                ),
                "/v1/secret/data/rancher" => (
                    StatusCode::OK,
                    axum::Json(json!({"data": {
                        "data": {"access_key": "token-prod7", "secret_key": "VAULTKEY-9f8e7d6c5b4a"},
                        "metadata": {"version": 1, "created_time": "2026-01-01T00:00:00Z", "deletion_time": "", "destroyed": false}
                    }})),
                ),
                _ => (StatusCode::NOT_FOUND, axum::Json(json!({"errors": []}))),
            }
        }
    }))
    .await;
    (url, paths)
}

fn validate_job(id: &str, config: Value, secret_store: Value) -> Value {
    json!({
        "id": id, "kind": "validate", "attempt": 1, "lease_token": format!("t-{id}"),
        "lease_expires_at": "2099-01-01T00:00:00Z",
        "integration": {"type": "rancher", "name": id, "config": config, "secret_store": secret_store},
        "params": {}
    })
}

fn spawn_agent(dir: &std::path::Path, cp: &str, vault: &str, health: u16, extra: &[(&str, &str)]) -> ChildGuard {
    let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
    let vault_config = json!([{"address": vault, "token": "vault-root"}]).to_string();
    let child = Command::new(BIN)
        .arg("run")
        .envs([
            ("APONO_URL", cp),
            ("APONO_TOKEN", "agent-token-1"),
            ("APONO_CONNECTOR_ID", "c1"),
            ("APONO_HEALTH_ADDR", &format!("127.0.0.1:{health}")),
            ("APONO_LOG_LEVEL", "info"),
            ("HASHICORP_VAULT_CONFIG", &vault_config),
            ("APONO_DATA_DIR", &dir.join("data").to_string_lossy()),
        ])
        .envs(extra.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn apono-connector");
    ChildGuard(child)
}

async fn control_plane(jobs: Vec<Value>) -> (String, Shared) {
    scripted_cp::start([json!({ "jobs": jobs }).to_string()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_host_off_the_allow_list_reads_no_secret_and_connects_nowhere() {
    let (foreign, foreign_connections) = counting_listener().await;
    let (allowed, allowed_connections) = counting_listener().await;
    let (vault, vault_paths) = counting_vault().await;
    let vault_secret = json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "rancher"});
    let inline = json!({"type": "APONO", "credentials": {"access_key": "token-a", "secret_key": "inline-secret-1"}});
    let fast = |host: String| json!({"host": host, "timeout_seconds": 2, "connect_timeout_seconds": 1});
    let mut foreign_insecure = fast(format!("http://localhost:{foreign}"));
    foreign_insecure["insecure_http"] = json!(true);
    let jobs = vec![
        validate_job(
            "j-foreign",
            fast(format!("http://127.0.0.1:{foreign}")),
            vault_secret.clone(),
        ),
        validate_job("j-foreign-insecure", foreign_insecure, vault_secret.clone()),
        validate_job("j-allowed", fast(format!("http://127.0.0.1:{allowed}")), inline),
    ];
    let (cp, seen) = control_plane(jobs).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let health = free_port();
    let allow = format!("127.0.0.1:{allowed}");
    let _agent = spawn_agent(
        dir.path(),
        &cp,
        &vault,
        health,
        &[("APONO_ALLOWED_RANCHER_HOSTS", &allow)],
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let completions = loop {
        let completions = seen.lock().expect("lock").completions();
        if completions.len() >= 3 || Instant::now() > deadline {
            break completions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert_eq!(completions.len(), 3, "jobs not completed: {completions:?}\n{log}");
    for id in ["j-foreign", "j-foreign-insecure"] {
        let (_, body) = completions.iter().find(|(i, _)| i == id).expect("completed");
        assert_eq!(body["outcome"], "failed", "{body}");
        assert_eq!(body["error"]["code"], "host_not_allowed", "{body}");
        assert_eq!(body["error"]["retryable"], false, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&foreign.to_string()), "names the host: {message}");
    }
    assert_eq!(
        foreign_connections.load(Ordering::SeqCst),
        0,
        "the foreign host was contacted"
    );
    let read = vault_paths.lock().expect("lock").clone();
    assert!(read.is_empty(), "the secret store was asked: {read:?}");
    // The allowed host was reached: the counters can tell.
    let (_, allowed_body) = completions.iter().find(|(i, _)| i == "j-allowed").expect("completed");
    assert_ne!(allowed_body["error"]["code"], "host_not_allowed", "{allowed_body}");
    assert!(allowed_connections.load(Ordering::SeqCst) > 0, "{allowed_body}");
    assert!(!log.contains("APONO_ALLOWED_RANCHER_HOSTS is not set"), "{log}");
    assert!(!log.contains("inline-secret-1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_list_a_remote_agent_says_the_control_plane_decides_where_keys_go() {
    let (cp, _seen) = control_plane(vec![]).await;
    let (vault, _) = counting_vault().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let health = free_port();
    let _agent = spawn_agent(dir.path(), &cp, &vault, health, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{health}/metrics")).await
            && let Ok(text) = r.text().await
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.contains("apono_connector_rancher_hosts_unrestricted 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("APONO_ALLOWED_RANCHER_HOSTS is not set"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}
