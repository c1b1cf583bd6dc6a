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
