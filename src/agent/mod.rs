//! The agent runtime: session hello, the lease loop, a bounded worker pool, lease renewal,
//! completion, and graceful shutdown. What a job *does* is in [`executor`].
//!
//! Shutdown: the `shutdown` token stops leasing at once; in-flight jobs get `grace` to finish and
//! report. Jobs leased but not started (an answer that arrived as shutdown began) and jobs still
//! running when the grace ends are *released* (`:release`), so another replica, or this one after
//! its restart, takes them at once instead of waiting out the lease. A release that fails is
//! harmless: the lease runs out and the job is handed out again (every operation is idempotent).

pub mod executor;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::control_plane::protocol::{
    Capabilities, CompleteRequest, Job, JobKind, LeaseRequest, Outcome, ReleaseRequest, RenewRequest, SessionHello,
};
use crate::control_plane::{ControlPlane, ControlPlaneError};
use crate::integrations::INTEGRATION_TYPES;
use crate::telemetry::{Readiness, metrics};
use executor::backoff;
pub use executor::{Executor, HostPolicy};

/// Jobs in progress per worker. Workers bound requests in flight; most of a job's time is spent
/// waiting for Rancher (a request's round trip, a binding settling), so more jobs than workers
/// are in progress at once. Eight per worker (256 with the default 32 workers) keeps every
/// worker busy through a grant's settling wait (about 3 of 4 of its time), and each job in
/// progress costs memory (its task, its job and integration, a lease renewal): at 32 per worker
/// a mass expiry took the agent past 64 MB for no gain in throughput.
pub const JOBS_PER_WORKER: usize = 8;

/// Knobs of the runtime (from `config::AgentConfig`).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Workers: requests to integrations in flight at once (`APONO_ACTIONS_PARALLELISM`). Jobs in
    /// progress are capped at `parallelism × JOBS_PER_WORKER`.
    pub parallelism: usize,
    pub lease_wait_seconds: u32,
    pub shutdown_grace: Duration,
}

pub struct Agent {
    control_plane: Arc<dyn ControlPlane>,
    executor: Arc<Executor>,
    options: AgentOptions,
    readiness: Readiness,
}

/// While the control plane refuses the token, ask again from every 5 s up to every minute: slowly
/// enough not to hammer it, soon enough that a fixed token (or a new one in `APONO_TOKEN_FILE`)
/// is picked up without a restart.
fn refused_token_retry(failures: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << failures.saturating_sub(1).min(4)).min(60))
}

impl AgentOptions {
    /// The cap on jobs in progress at once: `parallelism × JOBS_PER_WORKER`.
    pub fn jobs_in_flight(&self) -> usize {
        self.parallelism.max(1).saturating_mul(JOBS_PER_WORKER)
    }
}

impl Agent {
    pub fn new(control_plane: Arc<dyn ControlPlane>, executor: Executor, options: AgentOptions) -> Agent {
        Agent {
            control_plane,
            executor: Arc::new(executor.with_workers(options.parallelism)),
            options,
            readiness: Readiness::new(),
        }
    }

    /// Reports readiness to `readiness` (served on `/readyz`).
    pub fn with_readiness(mut self, readiness: Readiness) -> Agent {
        self.readiness = readiness;
        self
    }

    /// Runs until `shutdown` is cancelled, then drains in-flight jobs within the grace period.
    /// Control-plane outages are retried with backoff (1 s → 5 min, jittered); they never stop
    /// the agent.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.say_hello(&shutdown).await {
            return;
        }
        // Jobs in progress, not workers: a job waiting on Rancher holds no worker (see
        // `Executor::with_workers`), so many more jobs than workers run at once.
        let permits = Arc::new(Semaphore::new(self.options.jobs_in_flight()));
        let tracker = TaskTracker::new();
        // Cancelled when the grace period runs out: abandons jobs still running.
        let abandon = CancellationToken::new();
        let mut failures = 0u32;
        let mut session = true;
        loop {
            if !session {
                // The token was refused: stop leasing until a hello succeeds again.
                if !self.say_hello(&shutdown).await {
                    break;
                }
                session = true;
            }
            let first_permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let request = LeaseRequest {
                max_jobs: (permits.available_permits() + 1) as u32,
                wait_seconds: self.options.lease_wait_seconds,
            };
            let lease = self.control_plane.lease(&request);
            tokio::pin!(lease);
            let leased = tokio::select! {
                r = &mut lease => r,
                _ = shutdown.cancelled() => {
                    // The answer may already carry jobs leased to us: take it if it comes at once,
                    // and give them back rather than leave them to a lease that runs out.
                    if let Ok(Ok(jobs)) = tokio::time::timeout(SHUTDOWN_LEASE_WAIT, &mut lease).await {
                        release_unstarted(self.control_plane.as_ref(), jobs).await;
                    }
                    break;
                }
            };
            let jobs = match leased {
                Ok(jobs) => {
                    if failures > 0 {
                        self.readiness.set_ready();
                    }
                    failures = 0;
                    jobs
                }
                Err(e) => {
                    failures += 1;
                    drop(first_permit);
                    if matches!(e, ControlPlaneError::Unauthorized { .. }) {
                        log_control_plane_error(&e, "lease", Duration::ZERO);
                        self.readiness.set_not_ready(e.to_string());
                        session = false;
                        continue;
                    }
                    let delay = backoff(Duration::from_secs(1), failures);
                    self.readiness.set_not_ready(format!("control plane unavailable: {e}"));
                    log_control_plane_error(&e, "lease", delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            // Leases are timed from here, on this host's monotonic clock (see `keep_lease`).
            let received = tokio::time::Instant::now();
            let mut first_permit = Some(first_permit);
            let mut jobs = jobs.into_iter();
            while let Some(raw) = jobs.next() {
                let permit = match first_permit.take() {
                    Some(p) => p,
                    // The control plane sent more than asked: run them anyway, in turn, unless
                    // shutdown comes first (then the rest are given back unstarted).
                    None => tokio::select! {
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        _ = shutdown.cancelled() => {
                            release_unstarted(self.control_plane.as_ref(), std::iter::once(raw).chain(jobs.by_ref()).collect()).await;
                            break;
                        }
                    },
                };
                let cp = self.control_plane.clone();
                let executor = self.executor.clone();
                let abandon = abandon.child_token();
                tracker.spawn(async move {
                    run_job(raw, received, cp.as_ref(), &executor, abandon).await;
                    drop(permit);
                });
            }
        }
        tracker.close();
        self.readiness.set_not_ready("shutting down");
        if !tracker.is_empty() {
            tracing::info!(
                in_flight = tracker.len(),
                grace_s = self.options.shutdown_grace.as_secs(),
                "shutting down: waiting for in-flight jobs"
            );
        }
        if tokio::time::timeout(self.options.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = tracker.len(),
                "grace period over: abandoning jobs and releasing their leases so they are handed out again at once"
            );
            abandon.cancel();
            tracker.wait().await;
        }
        tracing::info!("agent stopped");
    }

    /// Says hello until the control plane answers. False if shutdown came first.
    async fn say_hello(&self, shutdown: &CancellationToken) -> bool {
        let hello = SessionHello {
            version: crate::VERSION.to_string(),
            hostname: hostname(),
            capabilities: Capabilities {
                integration_types: INTEGRATION_TYPES.iter().map(|s| s.to_string()).collect(),
                secret_store_types: self.executor.secrets().types(),
            },
        };
        let mut failures = 0u32;
        loop {
            match self.control_plane.hello(&hello).await {
                Ok(session) => {
                    tracing::info!(session = %session.session_id, lease_seconds = session.lease_seconds, "session with the control plane established");
                    self.readiness.set_ready();
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    let (delay, reason) = match e {
                        // Slowly: hammering a control plane that refuses us helps no one. `e`
                        // reads "the control plane refused the token ...".
                        ControlPlaneError::Unauthorized { .. } => (refused_token_retry(failures), e.to_string()),
                        _ => (
                            backoff(Duration::from_secs(1), failures),
                            format!("no session with the control plane: {e}"),
                        ),
                    };
                    self.readiness.set_not_ready(reason);
                    log_control_plane_error(&e, "hello", delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

fn log_control_plane_error(e: &ControlPlaneError, call: &str, retry_in: Duration) {
    metrics().control_plane_error(call, e.code());
    match e {
        ControlPlaneError::Unauthorized { .. } => {
            tracing::error!(call, error = %e, retry_in_s = retry_in.as_secs(), "the control plane refused the token")
        }
        _ => {
            tracing::warn!(call, error = %e, retry_in_ms = retry_in.as_millis() as u64, "control plane call failed; retrying")
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// One job: keep its lease alive while the executor runs, then report the outcome. `received`:
/// when the lease answer that carried it arrived.
async fn run_job(
    raw: Value,
    received: tokio::time::Instant,
    cp: &dyn ControlPlane,
    executor: &Executor,
    abandon: CancellationToken,
) {
    let job: Job = match Job::from_leased(raw) {
        Ok(job) => job,
        Err(bad) => {
            // Completed as failed when it can be (security review N8); without an id and lease
            // token there is nothing to report to.
            match (&bad.job, bad.completion()) {
                (Some(job), Some(request)) => {
                    tracing::warn!(job = ?job.id, error = %bad.message, "control plane sent a job whose fields do not parse; completing it as failed (malformed_job)");
                    metrics().job_finished("unknown", "failed", Duration::ZERO);
                    report(cp, job, &request, &abandon).await;
                }
                _ => {
                    tracing::error!(error = %bad.message, "control plane sent a job without a valid envelope (id, lease_token); skipping it")
                }
            }
            return;
        }
    };
    let integration = job
        .integration
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let span =
        tracing::info_span!("job", id = %job.id, kind = %job.kind, attempt = job.attempt, integration = %integration);
    async move {
        let started = std::time::Instant::now();
        let m = metrics();
        // The kind comes from outside: an unknown one is one label, not a new series per value.
        let kind_label = JobKind::parse(&job.kind).map_or("unknown", JobKind::as_str);
        m.jobs_in_flight.inc();
        // Decrements on every path out, including abandonment.
        struct InFlight;
        impl Drop for InFlight {
            fn drop(&mut self) {
                metrics().jobs_in_flight.dec();
            }
        }
        let _in_flight = InFlight;
        // Lost lease or grace over: stop working on the job, report nothing.
        let stop = abandon.child_token();
        let renewal = keep_lease(cp, &job, received, stop.clone());
        tokio::pin!(renewal);
        let work = executor.execute(&job, cp, &stop);
        let outcome = tokio::select! {
            r = work => Some(r),
            _ = &mut renewal => None,
            _ = stop.cancelled() => None,
        };
        let Some(outcome) = outcome else {
            m.job_finished(kind_label, "abandoned", started.elapsed());
            if abandon.is_cancelled() {
                tracing::warn!("shutdown grace over: job abandoned; releasing its lease");
                release(cp, &job.id, &job.lease_token, true).await;
            } else {
                tracing::warn!("job abandoned: its lease was lost; the control plane has handed it out again");
            }
            return;
        };
        let request = match outcome {
            Ok(result) => CompleteRequest { lease_token: job.lease_token.clone(), outcome: Outcome::Succeeded, error: None, result: Some(result) },
            Err(error) => {
                tracing::warn!(code = %error.code, retryable = error.retryable, error = %error.message, "job failed");
                CompleteRequest { lease_token: job.lease_token.clone(), outcome: Outcome::Failed, error: Some(error), result: None }
            }
        };
        let outcome_label = match request.outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        };
        m.job_finished(kind_label, outcome_label, started.elapsed());
        // Keep the lease alive while reporting: a report retried through a control-plane outage
        // must not let the lease lapse and the job run a second time.
        let reported = tokio::select! {
            r = report(cp, &job, &request, &abandon) => r,
            _ = &mut renewal => false,
        };
        stop.cancel();
        if reported {
            tracing::info!(outcome = ?request.outcome, elapsed_ms = started.elapsed().as_millis() as u64, "job completed");
        }
    }
    .instrument(span)
    .await
}

/// How long a lease answer that is in flight when shutdown begins is still waited for.
const SHUTDOWN_LEASE_WAIT: Duration = Duration::from_secs(2);
/// How long one release call may take at shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Gives back jobs that were leased but never started (shutdown).
async fn release_unstarted(cp: &dyn ControlPlane, jobs: Vec<Value>) {
    for raw in jobs {
        let envelope = match Job::from_leased(raw) {
            Ok(job) => Ok(job),
            Err(crate::control_plane::protocol::MalformedJob { job: Some(job), .. }) => Ok(*job),
            Err(bad) => Err(bad),
        };
        match envelope {
            Ok(job) => release(cp, &job.id, &job.lease_token, false).await,
            Err(bad) => {
                tracing::warn!(error = %bad.message, "a leased job without a valid envelope cannot be released; its lease will run out")
            }
        }
    }
}

/// Releases one lease, bounded in time; a failure only means the lease runs out instead.
async fn release(cp: &dyn ControlPlane, job_id: &str, lease_token: &str, started: bool) {
    let request = ReleaseRequest {
        lease_token: lease_token.to_string(),
        started,
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, cp.release(job_id, &request)).await {
        Ok(Ok(())) => tracing::info!(job = %job_id, started, "lease released: the job can be handed out again at once"),
        Ok(Err(ControlPlaneError::LeaseLost { .. })) => {}
        Ok(Err(e)) => tracing::warn!(job = %job_id, error = %e, "could not release the lease; it will run out instead"),
        Err(_) => tracing::warn!(job = %job_id, "releasing the lease timed out; it will run out instead"),
    }
}

/// When a lease runs out, on this host's monotonic clock: `lease_seconds` after `since` (when the
/// answer that granted it arrived, or the renewal was asked for), so a control plane whose clock
/// is off cannot make the agent renew late (reliability review F13). Control planes that send no
/// `lease_seconds`: `lease_expires_at` against this host's clock, as before.
fn lease_deadline(
    since: tokio::time::Instant,
    lease_seconds: Option<u64>,
    lease_expires_at: chrono::DateTime<chrono::Utc>,
) -> tokio::time::Instant {
    let left = match lease_seconds {
        Some(s) => Duration::from_secs(s),
        None => (lease_expires_at - chrono::Utc::now()).to_std().unwrap_or_default(),
    };
    since + left
}

/// Renews the lease at a third of its remaining time. Returns only when the lease is lost.
async fn keep_lease(cp: &dyn ControlPlane, job: &Job, received: tokio::time::Instant, stop: CancellationToken) {
    let mut deadline = lease_deadline(received, job.lease_seconds, job.lease_expires_at);
    let request = RenewRequest {
        lease_token: job.lease_token.clone(),
    };
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wait = (remaining / 3).max(Duration::from_millis(200));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // The renewed lease starts no earlier than the request: timed from here, never too late.
        let asked = tokio::time::Instant::now();
        match cp.renew(&job.id, &request).await {
            Ok(renewed) => {
                metrics().lease_renewals.inc();
                deadline = lease_deadline(asked, renewed.lease_seconds, renewed.lease_expires_at);
            }
            Err(ControlPlaneError::LeaseLost { .. }) => {
                metrics().leases_lost.inc();
                tracing::warn!("lease lost while the job was running");
                return;
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(error = %e, "could not renew the lease before it ran out");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// Reports a job's outcome, retrying transient failures while the lease may still be valid.
/// True when the control plane took it.
async fn report(cp: &dyn ControlPlane, job: &Job, request: &CompleteRequest, abandon: &CancellationToken) -> bool {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match cp.complete(&job.id, request).await {
            Ok(()) => return true,
            Err(ControlPlaneError::LeaseLost { .. }) => {
                metrics().leases_lost.inc();
                tracing::warn!("lease was lost before the outcome was reported; the job will run again");
                return false;
            }
            Err(e) if e.retryable() && attempt < 8 => {
                let delay = backoff(Duration::from_millis(500), attempt);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "reporting the outcome failed; retrying");
                tokio::select! {
                    _ = abandon.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not report the outcome; the job will run again when its lease runs out");
                return false;
            }
        }
    }
}
