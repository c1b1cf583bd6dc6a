//! The command line as scripts use it (DESIGN.md §8): real processes of the binary.

mod common;

use std::time::Duration;

use apono_connector::sim::{SimHandle, SimOptions};
use common::{ChildGuard, bindings_of, free_port, run_cli, sim_integration, wait_for_port};
use serde_json::Value;

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_discover_grant_and_revoke_against_the_simulator() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    // page_size 2: every collection of the small dataset spans several pages.
    let integration = sim_integration(&sim, "sim").to_string();

    let out = tokio::task::spawn_blocking({
        let i = integration.clone();
        move || run_cli(&["discover", "--integration", &i])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    let of = |t: &str| lines.iter().filter(|o| o["type"] == t).count();
    assert_eq!(of("cluster"), 3, "every cluster, across pages");
    assert_eq!(of("user"), sim.sim.users().len(), "every user, across pages");
    assert_eq!(
        of("binding"),
        sim.sim.bindings().len(),
        "every binding of the three kinds"
    );
    assert!(of("project") >= 6 && of("namespace") >= 9 && of("role_template") >= 5 && of("global_role") >= 3);
    for ns in lines.iter().filter(|o| o["type"] == "namespace") {
        assert!(ns["cluster_id"].is_string() && ns.get("project_id").is_some(), "{ns}");
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requests"),
        "summary on stderr"
    );

    let grant = |args: &'static [&'static str]| {
        let i = integration.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = vec![args[0], "--integration", &i];
            all.extend_from_slice(&args[1..]);
            run_cli(&all)
        })
    };
    let args: &[&str] = &[
        "grant",
        "--user",
        "bob",
        "--role",
        "cluster-member",
        "--resource",
        "c-7x2k9",
    ];
    let first = stdout_json(&grant(args).await.unwrap());
    let again = stdout_json(&grant(args).await.unwrap());
    assert_eq!(
        first["binding_ids"], again["binding_ids"],
        "a repeat reports the same binding"
    );
    let on_cluster = || {
        bindings_of(&sim, "bob")
            .into_iter()
            .filter(|b| b.role_id == "cluster-member" && b.resource_id == "c-7x2k9")
            .count()
    };
    assert_eq!(on_cluster(), 1, "a repeated grant is still one binding");
    assert_eq!(first["created_user"], false);

    let revoke: &[&str] = &[
        "revoke",
        "--user",
        "bob",
        "--role",
        "cluster-member",
        "--resource",
        "c-7x2k9",
    ];
    let removed = stdout_json(&grant(revoke).await.unwrap());
    assert_eq!(removed["removed_binding_ids"], first["binding_ids"]);
    assert_eq!(on_cluster(), 0);
    let again = stdout_json(&grant(revoke).await.unwrap());
    assert_eq!(
        again["removed_binding_ids"],
        Value::Array(vec![]),
        "a repeated revoke is a success with nothing to remove"
    );

    // A failure: one line on stderr, non-zero exit.
    let bad = grant(&[
        "grant",
        "--user",
        "bob",
        "--role",
        "no-such-role",
        "--resource",
        "c-7x2k9",
    ])
    .await
    .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-role"), "{stderr}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_to_completion() {
    let out = tokio::task::spawn_blocking(|| run_cli(&["demo", "--ttl", "2s"]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "discover job",
        "state: active",
        "1 binding(s)",
        "state: revoked",
        "0 binding(s)",
    ] {
        assert!(stdout.contains(step), "{step:?} missing from:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revoke_still_happens_after_the_agent_and_control_plane_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, sim_url) = common::spawn_sim(dir.path(), 0).await;
    let cp_port = free_port();
    let config = common::write_control_plane_config(dir.path(), cp_port, 5, &sim_url);
    let env = [("APONO_HEALTH_ADDR", "127.0.0.1:0")];
    let mut agent = ChildGuard::spawn(&["run", "--config", &config], &env, dir.path());
    wait_for_port(cp_port).await;
    let cp_url = format!("http://127.0.0.1:{cp_port}");

    let request = {
        let cp_url = cp_url.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&[
                "access",
                "request",
                "--integration",
                "sim",
                "--user",
                "alice",
                "--role",
                "cluster-owner",
                "--resource",
                "c-7x2k9",
                "--ttl",
                "4s",
                "--control-plane",
                &cp_url,
                "--config",
                &config,
            ])
        })
    };
    let access = stdout_json(&request.await.unwrap());
    assert_eq!(access["state"], "active", "{access}");
    let id = access["id"].as_str().unwrap().to_string();

    let list = |cp_url: String, config: String| async move {
        let out = tokio::task::spawn_blocking(move || {
            run_cli(&[
                "access",
                "list",
                "--json",
                "--control-plane",
                &cp_url,
                "--config",
                &config,
            ])
        })
        .await
        .unwrap();
        stdout_json(&out)
    };
    let state_of = |list: &Value, id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .map(|a| a["state"].clone())
    };
    assert_eq!(
        state_of(&list(cp_url.clone(), config.clone()).await, &id),
        Some(Value::from("active"))
    );
    let table = tokio::task::spawn_blocking({
        let cp_url = cp_url.clone();
        let config = config.clone();
        move || run_cli(&["access", "list", "--control-plane", &cp_url, "--config", &config])
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("active"));

    let owner_bindings = |url: String| async move {
        let body: Vec<Value> = reqwest::get(format!("{url}/sim/bindings"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body.into_iter()
            .filter(|b| b["role_id"] == "cluster-owner" && b["resource_id"] == "c-7x2k9")
            .count()
    };
    assert_eq!(owner_bindings(sim_url.clone()).await, 1);

    // Kill the agent (and its embedded control plane) hard; let the TTL pass while it is down.
    agent.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        owner_bindings(sim_url.clone()).await,
        1,
        "nobody revoked while the agent was down"
    );

    let _agent = ChildGuard::spawn(&["run", "--config", &config], &env, dir.path());
    wait_for_port(cp_port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if state_of(&list(cp_url.clone(), config.clone()).await, &id) == Some(Value::from("revoked")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not revoked after restart");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(owner_bindings(sim_url).await, 0, "binding removed after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_dependency_and_fails_when_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, sim_url) = common::spawn_sim(dir.path(), 0).await;
    let config = common::write_control_plane_config(dir.path(), free_port(), 5, &sim_url);
    let run = |args: Vec<String>, envs: Vec<(&'static str, String)>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(&args)
                .envs(envs)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let out = run(vec!["check".into(), "--config".into(), config.clone()], vec![])
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in ["config", "control plane", "secret of sim", "integration sim"] {
        assert!(
            table.lines().any(|l| l.starts_with("ok") && l.contains(row)),
            "{row:?} not ok in:\n{table}"
        );
    }
    assert!(table.contains("keys: access_key, secret_key"), "{table}");
    assert!(
        !table.contains(apono_connector::sim::DEFAULT_SECRET_KEY),
        "no secret value in the table"
    );

    // A refused key and an unreachable control plane: each a FAILED row, and a non-zero exit.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(apono_connector::sim::DEFAULT_SECRET_KEY, "canary-wrong-key-31"),
    )
    .unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = run(
        vec!["check".into(), "--config".into(), config],
        vec![("APONO_URL", dead), ("APONO_TOKEN", "t".into())],
    )
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(3), "a failed check exits 3: {table}");
    let failed = |row: &str| table.lines().any(|l| l.starts_with("FAILED") && l.contains(row));
    assert!(failed("control plane"), "{table}");
    assert!(failed("integration sim") && table.contains("401"), "{table}");
    assert!(!table.contains("canary-wrong-key-31"), "no secret value in the table");
}

#[test]
fn a_control_plane_beyond_loopback_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("0.0.0.0:{}", free_port());
    let out = std::process::Command::new(common::BIN)
        .args(["control-plane", "serve", "--listen", &listen, "--data-dir"])
        .arg(dir.path())
        .env_remove("APONO_TOKEN")
        .env("APONO_HEALTH_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("APONO_TOKEN") && stderr.contains(&listen), "{stderr}");
}
