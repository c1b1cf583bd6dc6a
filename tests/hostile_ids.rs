//! Ids that would change a Rancher URL (`..`, `/`, `?`, `%`) and inline credentials of the wrong
//! shape, given on the command line: refused with a clear error, no request reaches Rancher,
//! and no credential is printed.

mod common;

use apono_connector::sim::{SimHandle, SimOptions};
use common::{run_cli, sim_integration};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_hostile_resource_ids_before_any_request() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let integration = sim_integration(&sim, "sim").to_string();
    let before = sim.sim.stats().total;
    for resource in ["c-x/../../users", "c-x?userId=y", "local%2F..", "..", "c-x:../p"] {
        for command in ["grant", "revoke"] {
            let out = tokio::task::spawn_blocking({
                let i = integration.clone();
                let command = command.to_string();
                let resource = resource.to_string();
                move || {
                    run_cli(&[
                        &command,
                        "--integration",
                        &i,
                        "--user",
                        "bob",
                        "--role",
                        "cluster-member",
                        "--resource",
                        &resource,
                    ])
                }
            })
            .await
            .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} {resource}: {stderr}");
            assert!(
                stderr.contains("resource") && stderr.contains("is not a Rancher id"),
                "{command} {resource}: {stderr}"
            );
        }
    }
    assert_eq!(sim.sim.stats().total, before, "no request reached Rancher");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_never_prints_inline_credentials_of_the_wrong_shape() {
    const CANARY: &str = "CANARY-cli-5f0c2a";
    for credentials in [
        serde_json::json!(format!("token-abc:{CANARY}")),
        serde_json::json!({"secret_key": {"x": CANARY}}),
    ] {
        let integration = serde_json::json!({
            "type": "rancher", "name": "r", "config": {"host": "https://127.0.0.1:1"},
            "secret_store": {"type": "APONO", "credentials": credentials},
        })
        .to_string();
        let out = tokio::task::spawn_blocking(move || {
            run_cli(&[
                "grant",
                "--integration",
                &integration,
                "--user",
                "bob",
                "--role",
                "cluster-member",
                "--resource",
                "c-1",
            ])
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("credentials"), "the field is named: {stderr}");
        assert!(
            !stderr.contains(CANARY) && !stdout.contains(CANARY),
            "canary leaked: {stderr}{stdout}"
        );
    }
}
