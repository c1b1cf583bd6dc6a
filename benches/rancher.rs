//! Benchmarks of the Rancher integration and the job path, against the simulator. Run by hand,
//! not in CI (`cargo bench --bench rancher`); prints a Markdown table for the README.
//!
//! - **Round trips** per operation, counted at the simulator.
//! - **Discovery** of a large instance (200 clusters, 2,000 projects, 20,000 namespaces, 10,000
//!   users, 50,000 bindings) with injected latency: wall time, requests, the lower bound
//!   (requests ÷ concurrency × latency) and the ratio to it, peak RSS of the discovering process.
//!   The simulator runs in a child process so the RSS is the agent's own.
//! - **Discovery with disconnected clusters**: the same instance with 5 % of its clusters'
//!   agents down (their namespaces stall 25 s, as Rancher's dialer does, then answer 500): wall
//!   time against the per-cluster deadline (`cluster_timeout_seconds`, default 10 s), and the
//!   clusters skipped. Lower bound: (requests × latency + skipped × deadline) ÷ concurrency.
//! - **Jobs per second**: grant then revoke jobs end to end through the embedded control plane
//!   (SQLite on disk) and the agent (8 workers), against the simulator with injected latency.
//! - **Idle memory** of `apono-connector run` (standalone, one integration) after start-up.
//!
//! Knobs (environment): `BENCH_LATENCY_MS` (default 20), `BENCH_JOBS` (default 400).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apono_connector::agent::{Agent, AgentOptions, Executor};
use apono_connector::control_plane::embedded::{EmbeddedControlPlane, Options};
use apono_connector::control_plane::operator::{JobCreate, JobState};
use apono_connector::integrations::{
    self, DiscoveredObject, GrantRequest, IntegrationSpec, Resource, RevokeRequest, Subject,
};
use apono_connector::secrets::SecretStores;
use apono_connector::sim::{DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, DatasetSize, Sim, SimHandle, SimOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

// The tests' fixtures: child processes killed by their own PID, free ports, waiting for a port.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{BIN, ChildGuard, free_port, wait_for_port};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `VmHWM` (peak RSS) or `VmRSS` of a process, in MiB.
fn memory_mib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn spec(base_url: &str, extra: Value) -> IntegrationSpec {
    let mut config = json!({"host": base_url});
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    serde_json::from_value(json!({
        "type": "rancher", "name": "sim", "config": config,
        "secret_store": {"type": "APONO", "credentials": {"access_key": DEFAULT_ACCESS_KEY, "secret_key": DEFAULT_SECRET_KEY}},
    }))
    .expect("spec")
}

async fn integration(spec: &IntegrationSpec) -> Box<dyn integrations::Integration> {
    let secret = SecretStores::default().fetch(&spec.secret_store).await.expect("secret");
    integrations::build(spec, &secret).expect("integration")
}

async fn round_trips(rows: &mut Vec<String>) {
    let sim = SimHandle::start(SimOptions::default()).await.expect("sim");
    let rancher = integration(&spec(&sim.base_url, json!({}))).await;
    let mut count = |label: &str, n: u64| rows.push(format!("| {label} | {n} |"));
    // The admin proof (revoke, sweep and discover trust no listing without it) is paid once per
    // key and 10 minutes: measured on its own, so the rows below show the steady state.
    sim.sim.reset_stats();
    rancher
        .sweep(&integrations::SweepRequest::default())
        .await
        .expect("sweep");
    let sweep_first = sim.sim.stats().total;
    sim.sim.reset_stats();
    rancher
        .sweep(&integrations::SweepRequest::default())
        .await
        .expect("sweep");
    count(
        "admin proof (once per key and 10 minutes)",
        sweep_first - sim.sim.stats().total,
    );
    count("sweep (3 binding listings)", sim.sim.stats().total);
    // As the control plane asks: the grant carries its id and expiry (the binding's marker), the
    // revoke what the grant recorded.
    let expires_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let grant = |resource: &str| GrantRequest {
        subject: Subject::Username("bob".into()),
        role: if resource.contains(':') {
            "project-owner".into()
        } else {
            "cluster-member".into()
        },
        resource: Resource::parse(resource).expect("resource"),
        create_user: false,
        grant_id: Some(format!("ar-bench-{resource}")),
        expires_at,
        owner: None,
        keep_password: false,
    };
    for (label, resource) in [
        ("cluster", "c-7x2k9"),
        ("project", "c-7x2k9:p-x4m7q"),
        ("global", "global"),
    ] {
        let mut g = grant(resource);
        if resource == "global" {
            g.role = "restricted-admin".into();
        }
        sim.sim.reset_stats();
        let granted = rancher.grant(&g).await.expect("grant");
        count(
            &format!("grant, existing user by username, {label} scope"),
            sim.sim.stats().total,
        );
        sim.sim.reset_stats();
        rancher.grant(&g).await.expect("repeat grant");
        count(&format!("repeated grant, {label} scope"), sim.sim.stats().total);
        let r = RevokeRequest {
            subject: g.subject.clone(),
            role: g.role.clone(),
            resource: g.resource.clone(),
            grant_id: g.grant_id.clone(),
            user_id: Some(granted.user_id.clone()),
            binding_ids: granted.binding_ids.clone(),
            all: false,
            owner: None,
            bound_subject: None,
        };
        sim.sim.reset_stats();
        rancher.revoke(&r).await.expect("revoke");
        count(&format!("revoke (one binding), {label} scope"), sim.sim.stats().total);
        sim.sim.reset_stats();
        rancher.revoke(&r).await.expect("repeat revoke");
        count(&format!("repeated revoke, {label} scope"), sim.sim.stats().total);
    }
    sim.sim.reset_stats();
    let created = rancher
        .grant(&GrantRequest {
            subject: Subject::Username("new-user-bench".into()),
            role: "cluster-member".into(),
            resource: Resource::Cluster("c-7x2k9".into()),
            create_user: true,
            grant_id: None,
            expires_at: None,
            owner: None,
            keep_password: false,
        })
        .await
        .expect("grant with user creation");
    count("grant creating a local user", sim.sim.stats().total);
    sim.sim.reset_stats();
    rancher.validate().await.expect("validate");
    count("validate", sim.sim.stats().total);
    sim.sim.reset_stats();
    rancher
        .rotate_credentials(&integrations::RotateRequest {
            user_id: created.user_id.clone(),
        })
        .await
        .expect("rotate");
    count("rotate credentials", sim.sim.stats().total);
    sim.stop().await;
}

async fn discovery(rows: &mut Vec<String>, latency_ms: u64) {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "sim",
            "rancher",
            "--size",
            "large",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--latency-ms", &latency_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn simulator");
    let _child = ChildGuard(child);
    wait_for_port(port).await;
    let base = format!("http://127.0.0.1:{port}");
    for concurrency in [8u64, 32] {
        let rancher = integration(&spec(&base, json!({"concurrency": concurrency}))).await;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<DiscoveredObject>(1024);
        let drain = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(object) = rx.recv().await {
                // Serialize as the CLI would, so the cost of NDJSON is in the figure.
                n += serde_json::to_vec(&object).map(|v| v.len() as u64).unwrap_or(0).min(1);
            }
            n
        });
        let started = Instant::now();
        let summary = rancher.discover(tx).await.expect("discovery");
        let wall = started.elapsed();
        let objects = drain.await.expect("drain");
        let bound = Duration::from_millis(summary.requests * latency_ms / concurrency);
        rows.push(format!(
            "| large instance, concurrency {concurrency}, latency {latency_ms} ms | {objects} objects | {} requests | {:.2} s | {:.2} s | {:.1}× | {:.0} MiB |",
            summary.requests,
            wall.as_secs_f64(),
            bound.as_secs_f64(),
            wall.as_secs_f64() / bound.as_secs_f64().max(1e-9),
            memory_mib("self", "VmHWM"),
        ));
    }
}

/// Share of the large instance's clusters whose agent is disconnected.
const DISCONNECTED_SHARE: f64 = 0.05;
/// What Rancher's dialer waits before "cluster agent disconnected" (20-40 s).
const DISCONNECT_STALL: Duration = Duration::from_secs(25);

async fn discovery_with_disconnected_clusters(rows: &mut Vec<String>, latency_ms: u64) {
    // In process: the simulator's switches are options, not command-line flags (no RSS here).
    let sim = SimHandle::start(SimOptions {
        size: DatasetSize::Large,
        latency: Duration::from_millis(latency_ms),
        disconnected_share: DISCONNECTED_SHARE,
        disconnect_stall: DISCONNECT_STALL,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let disconnected = sim.sim.disconnected_clusters().len();
    let deadline = apono_connector::integrations::rancher::config::DEFAULT_CLUSTER_TIMEOUT_SECONDS;
    for concurrency in [8u64, 32] {
        let rancher = integration(&spec(&sim.base_url, json!({"concurrency": concurrency}))).await;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<DiscoveredObject>(1024);
        let drain = tokio::spawn(async move {
            let mut n = 0u64;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        });
        let started = Instant::now();
        let summary = rancher.discover(tx).await.expect("discovery");
        let wall = started.elapsed();
        let objects = drain.await.expect("drain");
        let skipped = summary.skipped_clusters.len() as u64;
        let bound = Duration::from_millis((summary.requests * latency_ms + skipped * deadline * 1000) / concurrency);
        rows.push(format!(
            "| large instance, {disconnected} of its clusters disconnected (stall {} s, deadline {deadline} s), \
             concurrency {concurrency}, latency {latency_ms} ms | {objects} objects | {} requests | {skipped} skipped | \
             {:.2} s | {:.2} s | {:.1}× |",
            DISCONNECT_STALL.as_secs(),
            summary.requests,
            wall.as_secs_f64(),
            bound.as_secs_f64(),
            wall.as_secs_f64() / bound.as_secs_f64().max(1e-9),
        ));
    }
    sim.stop().await;
}

async fn jobs_per_second(rows: &mut Vec<String>, latency_ms: u64, jobs: usize) {
    let sim = Sim::new(SimOptions {
        size: DatasetSize::Large,
        latency: Duration::from_millis(latency_ms),
        ..SimOptions::default()
    });
    let users: Vec<String> = sim
        .users()
        .into_iter()
        .filter_map(|u| u.username)
        .filter(|u| u.starts_with("user"))
        .take(jobs)
        .collect();
    let sim = SimHandle::start_sim(sim).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = EmbeddedControlPlane::open(Options {
        data_dir: dir.path().to_path_buf(),
        lease_duration: Duration::from_secs(30),
        tick: Duration::from_millis(50),
        ..Options::default()
    })
    .expect("control plane");
    cp.register_integration(
        &spec(&sim.base_url, json!({})),
        apono_connector::control_plane::embedded::IntegrationSource::Config,
    )
    .expect("register");
    let stop = CancellationToken::new();
    let executor = Executor::new(SecretStores::default(), 3);
    let options = AgentOptions {
        parallelism: 8,
        lease_wait_seconds: 1,
        shutdown_grace: Duration::from_secs(5),
    };
    let agent = tokio::spawn(Agent::new(cp.clone(), executor, options).run(stop.clone()));
    // Revokes carry what their grant recorded, as the control plane sends them.
    let mut recorded: Vec<serde_json::Value> = Vec::new();
    for kind in ["grant", "revoke"] {
        sim.sim.reset_stats();
        let started = Instant::now();
        let expires_at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        let ids: Vec<String> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut params = json!({"user": u, "role": "cluster-member", "resource": "c-7x2k9",
                    "grant_id": format!("ar-bench-{i}")});
                if kind == "grant" {
                    params["expires_at"] = json!(expires_at);
                } else if let Some(r) = recorded.get(i) {
                    params["user_id"] = r["user_id"].clone();
                    params["binding_ids"] = r["binding_ids"].clone();
                }
                cp.create_job(JobCreate {
                    kind: kind.into(),
                    integration: json!("sim"),
                    params,
                })
                .expect("job")
                .id
            })
            .collect();
        wait_all(&cp, &ids).await;
        let wall = started.elapsed();
        if kind == "grant" {
            recorded = ids
                .iter()
                .map(|id| cp.job(id).expect("read").expect("job").result.unwrap_or_default())
                .collect();
        }
        let requests = sim.sim.stats().total;
        rows.push(format!(
            "| {kind} jobs, 8 workers, latency {latency_ms} ms | {} jobs | {:.2} s | {:.0} jobs/s | {:.2} requests/job |",
            ids.len(),
            wall.as_secs_f64(),
            ids.len() as f64 / wall.as_secs_f64(),
            requests as f64 / ids.len() as f64,
        ));
    }
    stop.cancel();
    let _ = agent.await;
    sim.stop().await;
}

async fn wait_all(cp: &Arc<EmbeddedControlPlane>, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(600);
    for id in ids {
        loop {
            let job = cp.job(id).expect("read").expect("job");
            match job.state {
                JobState::Succeeded => break,
                JobState::Failed => panic!("job {id} failed: {:?}", job.error),
                _ => {}
            }
            assert!(Instant::now() < deadline, "jobs did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn idle_memory(rows: &mut Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[standalone]\nlisten = \"{listen}\"\ndata_dir = \"{}\"\n\n[[integrations]]\ntype = \"rancher\"\nname = \"r\"\n\
             config = {{ host = \"http://127.0.0.1:9\" }}\nsecret_store = {{ type = \"APONO\", credentials = {{ access_key = \"a\", secret_key = \"b\" }} }}\n",
            dir.path().join("state").display()
        ),
    )
    .expect("config");
    let child = Command::new(BIN)
        .args(["run", "--config", &config.to_string_lossy()])
        .env("APONO_HEALTH_ADDR", "127.0.0.1:0")
        .env("APONO_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let pid = child.id().to_string();
    let _child = ChildGuard(child);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rows.push(format!(
        "| `run` standalone, idle after start-up | {:.1} MiB RSS | {:.1} MiB peak |",
        memory_mib(&pid, "VmRSS"),
        memory_mib(&pid, "VmHWM")
    ));
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` (CI) only builds and starts it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench rancher`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let latency = env_u64("BENCH_LATENCY_MS", 20);
    let jobs = env_u64("BENCH_JOBS", 400) as usize;
    runtime.block_on(async {
        let mut rows = vec!["| operation | Rancher requests |".to_string(), "|---|---|".to_string()];
        round_trips(&mut rows).await;
        rows.push(String::new());
        rows.push("| discovery | objects | requests | wall | lower bound | ratio | peak RSS |".into());
        rows.push("|---|---|---|---|---|---|---|".into());
        discovery(&mut rows, latency).await;
        rows.push(String::new());
        rows.push(
            "| discovery, disconnected clusters | objects | requests | skipped clusters | wall | lower bound | ratio |"
                .into(),
        );
        rows.push("|---|---|---|---|---|---|---|".into());
        discovery_with_disconnected_clusters(&mut rows, latency).await;
        rows.push(String::new());
        rows.push("| job path | jobs | wall | throughput | Rancher requests per job |".into());
        rows.push("|---|---|---|---|---|".into());
        jobs_per_second(&mut rows, latency, jobs).await;
        rows.push(String::new());
        rows.push("| memory | | |".into());
        rows.push("|---|---|---|".into());
        idle_memory(&mut rows).await;
        println!("{}", rows.join("\n"));
    });
}
