//! The agent runtime: lease renewal timed on this host's clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keep_lease;
use crate::control_plane::protocol::{
    CompleteRequest, Job, LeaseRequest, ReleaseRequest, RenewRequest, RenewResponse, SessionHello, SessionInfo,
};
use crate::control_plane::{ControlPlane, ControlPlaneError};

/// A control plane whose wall clock is `skew` away from the agent's. It keeps its leases on its
/// own monotonic clock: a renewal that comes after the lease ran out finds it lost.
struct SkewedControlPlane {
    lease: Duration,
    skew: chrono::Duration,
    /// Whether answers carry `lease_seconds` (older control planes do not).
    sends_lease_seconds: bool,
    deadline: Mutex<Instant>,
    renewals: AtomicU32,
    lost: AtomicBool,
}

impl SkewedControlPlane {
    fn new(lease: Duration, skew: chrono::Duration, sends_lease_seconds: bool) -> SkewedControlPlane {
        SkewedControlPlane {
            lease,
            skew,
            sends_lease_seconds,
            deadline: Mutex::new(Instant::now() + lease),
            renewals: AtomicU32::new(0),
            lost: AtomicBool::new(false),
        }
    }

    /// Its clock's idea of when a lease taken now runs out.
    fn expires_at(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + self.skew + chrono::Duration::from_std(self.lease).unwrap()
    }

    fn lease_seconds(&self) -> Option<u64> {
        self.sends_lease_seconds.then_some(self.lease.as_secs())
    }

    fn job(&self) -> Job {
        Job {
            id: "j-1".into(),
            kind: "revoke".into(),
            attempt: 1,
            lease_token: "lt-1".into(),
            lease_expires_at: self.expires_at(),
            lease_seconds: self.lease_seconds(),
            integration: Value::Null,
            params: Value::Null,
        }
    }
}

fn unused() -> ControlPlaneError {
    ControlPlaneError::Protocol {
        message: "not used by this test".into(),
    }
}

#[async_trait]
impl ControlPlane for SkewedControlPlane {
    async fn hello(&self, _: &SessionHello) -> Result<SessionInfo, ControlPlaneError> {
        Err(unused())
    }
    async fn lease(&self, _: &LeaseRequest) -> Result<Vec<Value>, ControlPlaneError> {
        Err(unused())
    }
    async fn renew(&self, job_id: &str, _: &RenewRequest) -> Result<RenewResponse, ControlPlaneError> {
        let now = Instant::now();
        let mut deadline = self.deadline.lock().unwrap();
        if now > *deadline {
            self.lost.store(true, Ordering::SeqCst);
            return Err(ControlPlaneError::LeaseLost { job_id: job_id.into() });
        }
        *deadline = now + self.lease;
        self.renewals.fetch_add(1, Ordering::SeqCst);
        Ok(RenewResponse {
            lease_expires_at: self.expires_at(),
            lease_seconds: self.lease_seconds(),
        })
    }
    async fn complete(&self, _: &str, _: &CompleteRequest) -> Result<(), ControlPlaneError> {
        Err(unused())
    }
    async fn upload_resources(&self, _: &Job, _: &[Value]) -> Result<(), ControlPlaneError> {
        Err(unused())
    }
    async fn release(&self, _: &str, _: &ReleaseRequest) -> Result<(), ControlPlaneError> {
        Err(unused())
    }
}

/// Keeps one lease past its first expiry; true if the control plane still counts it held.
async fn kept(cp: &SkewedControlPlane) -> bool {
    let job = cp.job();
    let stop = CancellationToken::new();
    let until = cp.lease + cp.lease / 4;
    let renewing = tokio::select! {
        _ = keep_lease(cp, &job, Instant::now(), stop.clone()) => false,
        _ = tokio::time::sleep(until) => true,
    };
    stop.cancel();
    let held = Instant::now() <= *cp.deadline.lock().unwrap();
    renewing && held && !cp.lost.load(Ordering::SeqCst) && cp.renewals.load(Ordering::SeqCst) > 0
}

/// A lease long enough that a renewal at a third of it never comes late on a busy machine.
const LEASE: Duration = Duration::from_secs(2);

/// Reliability review F13: renewals were timed by `lease_expires_at - now`, the control plane's
/// clock against the agent's. With the control plane an hour ahead the agent waited 20 minutes to
/// renew a 60 s lease, lost it, and the job ran twice.
#[tokio::test]
async fn lease_renewal_with_a_server_clock_an_hour_ahead_still_renews_in_time() {
    let cp = SkewedControlPlane::new(LEASE, chrono::Duration::hours(1), true);
    assert!(kept(&cp).await);
}

#[tokio::test]
async fn lease_renewal_with_a_server_clock_an_hour_behind_still_renews() {
    let cp = SkewedControlPlane::new(LEASE, chrono::Duration::hours(-1), true);
    assert!(kept(&cp).await);
}

#[tokio::test]
async fn lease_renewal_without_lease_seconds_uses_the_expiry_as_before() {
    let cp = SkewedControlPlane::new(LEASE, chrono::Duration::zero(), false);
    assert!(kept(&cp).await);
}

/// With one worker, a grant waiting for Rancher to apply its binding (the simulator's
/// controllers held back) does not stop other jobs: three validate jobs run and finish while the
/// grant is still waiting, and the grant succeeds once the binding is applied.
#[tokio::test]
async fn a_grant_waiting_for_its_binding_to_settle_does_not_stop_other_jobs_with_one_worker() {
    use crate::control_plane::embedded::{self, EmbeddedControlPlane};
    use crate::control_plane::operator::{JobCreate, JobState};
    use crate::sim::{SimHandle, SimOptions};

    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    // The binding is applied only when the test says so.
    sim.sim.set_controller_delay(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let cp = EmbeddedControlPlane::open(embedded::Options {
        data_dir: dir.path().to_path_buf(),
        lease_duration: Duration::from_secs(30),
        tick: Duration::from_millis(100),
        ..embedded::Options::default()
    })
    .unwrap();
    let (access, key) = sim.sim.api_key();
    let spec: crate::integrations::IntegrationSpec = serde_json::from_value(serde_json::json!({
        "type": "rancher",
        "name": "r",
        "config": {"host": sim.base_url, "status_timeout_seconds": 600},
        "secret_store": {"type": "APONO", "credentials": {"access_key": access, "secret_key": key}},
    }))
    .unwrap();
    cp.register_integration(&spec, embedded::IntegrationSource::Config)
        .unwrap();
    let stop = CancellationToken::new();
    let executor = super::Executor::new(crate::secrets::SecretStores::default(), 1);
    let options = super::AgentOptions {
        parallelism: 1,
        lease_wait_seconds: 1,
        shutdown_grace: Duration::from_secs(1),
    };
    let agent = tokio::spawn(super::Agent::new(cp.clone(), executor, options).run(stop.clone()));

    let job = |kind: &str, params: Value| {
        cp.create_job(JobCreate {
            kind: kind.into(),
            integration: serde_json::json!("r"),
            params,
        })
        .unwrap()
        .id
    };
    let state = |id: &str| cp.job(id).unwrap().unwrap().state;
    let before = sim.sim.bindings_of_username("bob").len();
    let grant = job(
        "grant",
        serde_json::json!({"user": "bob", "role": "cluster-member", "resource": "c-7x2k9"}),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // The grant has posted its binding and waits for it to be applied.
    while sim.sim.bindings_of_username("bob").len() <= before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let others: Vec<String> = (0..3).map(|_| job("validate", serde_json::json!({}))).collect();
    while others.iter().any(|id| state(id) != JobState::Succeeded) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &others {
        assert_eq!(
            state(id),
            JobState::Succeeded,
            "validate job {id} did not run beside the waiting grant"
        );
    }
    assert_eq!(
        state(&grant),
        JobState::Leased,
        "the grant should still be waiting for its binding"
    );

    sim.sim.reconcile_now();
    while state(&grant) != JobState::Succeeded && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&grant), JobState::Succeeded);
    stop.cancel();
    let _ = agent.await;
    cp.close();
    sim.stop().await;
}
