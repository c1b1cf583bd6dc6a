//! `apono-connector demo`: the Rancher simulator, the embedded control plane and the agent in one
//! process. Discovers the instance, grants a time-boxed role, shows the binding in Rancher, waits
//! for the TTL and shows the automatic revoke. Nothing to install, nothing to configure.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentOptions, Executor};
use crate::control_plane::embedded::{self, EmbeddedControlPlane};
use crate::control_plane::operator::{AccessRequestCreate, AccessState, IntegrationRef, JobCreate, JobState};
use crate::integrations::{IntegrationSpec, Resource, Subject};
use crate::secrets::SecretStores;
use crate::sim::{SimHandle, SimOptions};

/// What the demo grants.
const USER: &str = "alice";
const ROLE: &str = "cluster-member";
const CLUSTER: &str = "c-7x2k9";

/// Runs the demo, writing its story to `out`. `ttl` is how long the access lasts.
pub async fn run(out: &mut (impl Write + Send), ttl: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let data_dir = std::env::temp_dir().join(format!("apono-connector-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let result = run_in(out, ttl, &data_dir).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    writeln!(out, "\ndemo finished in {:.1} s", started.elapsed().as_secs_f64())?;
    result
}

async fn run_in(out: &mut (impl Write + Send), ttl: Duration, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let sim = SimHandle::start(SimOptions::default())
        .await
        .context("starting the Rancher simulator")?;
    let (access_key, secret_key) = sim.sim.api_key();
    writeln!(
        out,
        "==> Rancher simulator listening on {} (small dataset)",
        sim.base_url
    )?;

    let cp = EmbeddedControlPlane::open(embedded::Options {
        data_dir: data_dir.to_path_buf(),
        lease_duration: Duration::from_secs(10),
        tick: Duration::from_millis(200),
        ..embedded::Options::default()
    })?;
    let spec: IntegrationSpec = serde_json::from_value(json!({
        "type": "rancher",
        "name": "demo-rancher",
        "config": {"host": sim.base_url, "ui_url": format!("{}/dashboard", sim.base_url)},
        "secret_store": {"type": "APONO", "credentials": {"access_key": access_key, "secret_key": secret_key}},
    }))?;
    cp.register_integration(&spec, embedded::IntegrationSource::Config)?;
    writeln!(
        out,
        "==> embedded control plane ready (state in {})",
        data_dir.display()
    )?;

    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    let executor = Executor::new(SecretStores::default(), 3).with_backoff_base(Duration::from_millis(100));
    let options = AgentOptions {
        parallelism: 4,
        lease_wait_seconds: 1,
        shutdown_grace: Duration::from_secs(5),
    };
    let agent = tokio::spawn(Agent::new(cp.clone(), executor, options).run(stop.clone()));
    writeln!(out, "==> agent started (4 workers)")?;

    let outcome = story(out, &cp, &sim, ttl).await;
    stop.cancel();
    let _ = agent.await;
    let _ = scheduler.await;
    sim.stop().await;
    outcome
}

async fn story(
    out: &mut (impl Write + Send),
    cp: &Arc<EmbeddedControlPlane>,
    sim: &SimHandle,
    ttl: Duration,
) -> anyhow::Result<()> {
    // 1. Validate and discover, as jobs through the control plane.
    for kind in ["validate", "discover"] {
        let job = cp.create_job(JobCreate {
            kind: kind.into(),
            integration: json!("demo-rancher"),
            params: json!({}),
        })?;
        let done = wait_for_job(cp, &job.id, Duration::from_secs(30)).await?;
        writeln!(out, "\n==> {kind} job {}: {:?}", done.id, done.state)?;
        if let Some(e) = &done.error {
            bail!("{kind} failed: {} ({})", e.message, e.code);
        }
        if let Some(result) = &done.result {
            writeln!(out, "    {}", serde_json::to_string(result)?)?;
        }
    }

    // 2. Request time-boxed access.
    let request = AccessRequestCreate {
        integration: IntegrationRef::Name("demo-rancher".into()),
        subject: Subject::Username(USER.into()),
        role: ROLE.into(),
        resource: Resource::Cluster(CLUSTER.into()),
        ttl_seconds: ttl.as_secs().max(1),
        create_user: false,
    };
    let access = cp.create_access(request)?;
    writeln!(
        out,
        "\n==> access request {}: {USER} gets {ROLE} on cluster {CLUSTER} for {} s",
        access.id,
        ttl.as_secs()
    )?;
    let access = wait_for_access(cp, &access.id, |s| s != AccessState::Pending, Duration::from_secs(30)).await?;
    if access.state != AccessState::Active {
        bail!("grant did not succeed: {:?} {:?}", access.state, access.last_error);
    }
    writeln!(
        out,
        "    state: active, expires at {}",
        access.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
    )?;
    if let Some(details) = &access.access_details {
        writeln!(out, "    access details: {details}")?;
    }
    let bindings = bindings_of(sim, USER);
    writeln!(
        out,
        "    Rancher now has {} binding(s) for {USER} on {CLUSTER}: {}",
        bindings.len(),
        bindings.join(", ")
    )?;
    if bindings.is_empty() {
        bail!("the grant reported success but Rancher has no binding");
    }
    // The marker that lets a revoke (or a sweep, if this state were lost) tell it is ours.
    for b in sim.sim.bindings_of_username(USER) {
        if b.role_id == ROLE && b.resource_id == CLUSTER {
            let marker: Vec<String> = b
                .labels
                .iter()
                .chain(&b.annotations)
                .filter(|(k, _)| k.starts_with("apono.io/"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(out, "    marker on {}: {}", b.id, marker.join(", "))?;
        }
    }

    // 3. Wait for the TTL: the control plane queues the revoke, the agent runs it.
    writeln!(out, "\n==> waiting {} s for the access to expire...", ttl.as_secs())?;
    let access = wait_for_access(
        cp,
        &access.id,
        |s| s == AccessState::Revoked,
        ttl + Duration::from_secs(30),
    )
    .await?;
    writeln!(
        out,
        "    state: revoked at {}",
        access.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
    )?;
    let bindings = bindings_of(sim, USER);
    writeln!(
        out,
        "    Rancher now has {} binding(s) for {USER} on {CLUSTER}",
        bindings.len()
    )?;
    if !bindings.is_empty() {
        bail!("the revoke reported success but Rancher still has {bindings:?}");
    }
    Ok(())
}

/// Ids of the demo user's bindings of the demo role on the demo cluster, as Rancher holds them.
fn bindings_of(sim: &SimHandle, username: &str) -> Vec<String> {
    sim.sim
        .bindings_of_username(username)
        .into_iter()
        .filter(|b| b.role_id == ROLE && b.resource_id == CLUSTER)
        .map(|b| b.id)
        .collect()
}

async fn wait_for_job(
    cp: &EmbeddedControlPlane,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<crate::control_plane::operator::JobRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = cp.job(id)?.context("job vanished")?;
        if matches!(job.state, JobState::Succeeded | JobState::Failed) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} did not finish within {} s (state {:?})",
                timeout.as_secs(),
                job.state
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_access(
    cp: &EmbeddedControlPlane,
    id: &str,
    done: impl Fn(AccessState) -> bool,
    timeout: Duration,
) -> anyhow::Result<crate::control_plane::operator::AccessRequest> {
    let deadline = Instant::now() + timeout;
    loop {
        let access = cp.access(id)?.context("access request vanished")?;
        if done(access.state) || access.state == AccessState::Failed {
            return Ok(access);
        }
        if Instant::now() > deadline {
            bail!(
                "access request {id} stayed {:?} for {} s",
                access.state,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
