//! Remote mode with real processes: one `control-plane serve`, agents running `run` with
//! `APONO_URL` pointing at it, and a simulator. Jobs run once across agents, a dead agent's jobs
//! move to the other, a control-plane outage loses nothing, and a refused token is reported and
//! recovered from without a restart.

mod common;

use std::time::{Duration, Instant};

use common::{ChildGuard, free_port, run_cli, wait_for_port, wait_ready};
use serde_json::Value;

const TOKEN: &str = "cp-token-5d1e";
const CONNECTOR: &str = "ha-connector";

struct Setup {
    dir: tempfile::TempDir,
    sim_url: String,
    cp_port: u16,
    cp_config: String,
}

impl Setup {
    /// A simulator answering every request after `latency_ms`, and a control-plane config.
    async fn new(latency_ms: u64, lease_seconds: u64) -> (Setup, ChildGuard) {
        let dir = tempfile::tempdir().unwrap();
        let (sim, sim_url) = common::spawn_sim(dir.path(), latency_ms).await;
        let cp_port = free_port();
        let cp_config = common::write_control_plane_config(dir.path(), cp_port, lease_seconds, &sim_url);
        let setup = Setup {
            dir,
            sim_url,
            cp_port,
            cp_config,
        };
        (setup, sim)
    }

    fn cp_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cp_port)
    }

    async fn start_control_plane(&self) -> ChildGuard {
        let cp = ChildGuard::spawn(
            &["control-plane", "serve", "--config", &self.cp_config],
            &[("APONO_TOKEN", TOKEN), ("APONO_HEALTH_ADDR", "127.0.0.1:0")],
            self.dir.path(),
        );
        wait_for_port(self.cp_port).await;
        cp
    }

    /// An agent in remote mode; returns it and its health port.
    fn start_agent(&self, token_env: (&str, &str)) -> (ChildGuard, u16) {
        let health = free_port();
        let health_addr = format!("127.0.0.1:{health}");
        let cp_url = self.cp_url();
        let agent = ChildGuard::spawn(
            &["run"],
            &[
                ("APONO_URL", cp_url.as_str()),
                token_env,
                ("APONO_CONNECTOR_ID", CONNECTOR),
                ("APONO_HEALTH_ADDR", health_addr.as_str()),
                ("APONO_ACTIONS_PARALLELISM", "4"),
            ],
            self.dir.path(),
        );
        (agent, health)
    }
}

fn access_request(setup: &Setup, role: &str, resource: &str, ttl: &str) -> Value {
    let cp_url = setup.cp_url();
    let out = run_cli(&[
        "access",
        "request",
        "--integration",
        "sim",
        "--user",
        "alice",
        "--role",
        role,
        "--resource",
        resource,
        "--ttl",
        ttl,
        "--no-wait",
        "--control-plane",
        &cp_url,
        "--config",
        &setup.cp_config,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET /operator/v1/{tail}` with the operator token the control plane wrote into its data dir.
async fn operator_get(setup: &Setup, tail: &str) -> Vec<Value> {
    let token = common::operator_token(&setup.dir.path().join("state")).await;
    reqwest::Client::new()
        .get(format!("{}/operator/v1/{tail}", setup.cp_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn list(setup: &Setup) -> Vec<Value> {
    operator_get(setup, "access-requests").await
}

async fn wait_states(setup: &Setup, ids: &[String], state: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let all = list(setup).await;
        let states: Vec<_> = ids
            .iter()
            .map(|id| {
                all.iter()
                    .find(|a| a["id"] == id.as_str())
                    .map(|a| a["state"].clone())
                    .unwrap_or(Value::Null)
            })
            .collect();
        if states.iter().all(|s| s == state) {
            return;
        }
        assert!(Instant::now() < deadline, "not all {state}: {states:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn sim_bindings(sim_url: &str) -> Vec<Value> {
    reqwest::get(format!("{sim_url}/sim/bindings"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Alice's bindings per (role, resource), as Rancher holds them.
async fn alice_bindings(sim_url: &str, targets: &[(&str, &str)]) -> Vec<usize> {
    let all = sim_bindings(sim_url).await;
    targets
        .iter()
        .map(|(role, resource)| {
            all.iter()
                .filter(|b| b["user_id"] == "u-alice1" && b["role_id"] == *role && b["resource_id"] == *resource)
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_one_control_plane_every_job_once_and_nothing_lost() {
    // Slow Rancher answers (400 ms) keep jobs in flight long enough to kill an agent mid-job.
    let (setup, _sim) = Setup::new(400, 3).await;
    let mut cp = setup.start_control_plane().await;

    // Agent A alone takes the first jobs.
    let (mut agent_a, health_a) = setup.start_agent(("APONO_TOKEN", TOKEN));
    wait_ready(health_a, 200, "ready", Duration::from_secs(20)).await;
    let targets = [
        ("cluster-member", "c-7x2k9"),
        ("cluster-member", "c-m-4bq8z2lp"),
        ("project-member", "c-7x2k9:p-abcde"),
        ("project-member", "c-7x2k9:p-x4m7q"),
    ];
    let ids: Vec<String> = targets
        .iter()
        .map(|(role, resource)| {
            access_request(&setup, role, resource, "12s")["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // Wait until A holds them (leased), then kill it mid-job.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = operator_get(&setup, "jobs").await;
        if jobs.iter().filter(|j| j["state"] == "leased").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "agent A never leased the grants: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent_a.kill();

    // B, same connector id, gets them once their leases (3 s) run out.
    let (_agent_b, health_b) = setup.start_agent(("APONO_TOKEN", TOKEN));
    let (_agent_c, health_c) = setup.start_agent(("APONO_TOKEN", TOKEN));
    wait_ready(health_b, 200, "ready", Duration::from_secs(20)).await;
    wait_ready(health_c, 200, "ready", Duration::from_secs(20)).await;
    wait_states(&setup, &ids, "active", Duration::from_secs(40)).await;
    assert_eq!(
        alice_bindings(&setup.sim_url, &targets).await,
        vec![1; 4],
        "each grant made exactly one binding"
    );

    // Stop the control plane across the expiry; the agents wait and reconnect.
    let last_expiry = list(&setup)
        .await
        .iter()
        .filter_map(|a| {
            a["expires_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        })
        .max()
        .expect("expiry times");
    cp.kill();
    wait_ready(health_b, 503, "", Duration::from_secs(20)).await;
    let until_expired = (last_expiry.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(until_expired + Duration::from_secs(1)).await;
    cp = setup.start_control_plane().await;
    wait_ready(health_b, 200, "ready", Duration::from_secs(40)).await;
    wait_states(&setup, &ids, "revoked", Duration::from_secs(60)).await;
    assert_eq!(
        alice_bindings(&setup.sim_url, &targets).await,
        vec![0; 4],
        "every revoke happened"
    );
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_reported_and_a_fixed_token_file_recovers_without_restart() {
    let (setup, _sim) = Setup::new(0, 5).await;
    let _cp = setup.start_control_plane().await;
    let token_file = setup.dir.path().join("token");
    std::fs::write(&token_file, "wrong-token").unwrap();
    let token_path = token_file.to_string_lossy().into_owned();
    let (_agent, health) = setup.start_agent(("APONO_TOKEN_FILE", token_path.as_str()));
    let body = wait_ready(health, 503, "refused the token", Duration::from_secs(20)).await;
    assert!(!body.contains("wrong-token"), "the token is not shown: {body}");
    let healthz = reqwest::get(format!("http://127.0.0.1:{health}/healthz"))
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200, "alive while refused");

    // The operator fixes the token in the mounted file; the agent recovers by itself.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    wait_ready(health, 200, "ready", Duration::from_secs(30)).await;
    let id = access_request(&setup, "cluster-member", "c-7x2k9", "60s")["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_states(&setup, &[id], "active", Duration::from_secs(20)).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{health}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("apono_connector_control_plane_errors_total{call=\"hello\",code=\"unauthorized\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apono_connector_jobs_total{kind=\"grant\",outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
}
