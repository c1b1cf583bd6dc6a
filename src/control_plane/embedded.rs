//! The embedded control plane: the job queue with its leases, job completion, and the scheduler.
//! The access lifecycle (states, TTL, overlap, cleanup, repairs: why a binding is granted, kept or
//! removed) is in [`access`]; integration registration and pinning in `registry`; users the agent
//! created in `users`; the reconcile (sweep jobs and the repairs their results ask for) in
//! `reconcile`. State is in SQLite (`store`), so all of it survives a restart.
//!
//! Rules, in one place:
//! - one control plane per `data_dir`: `open` takes an exclusive lock on `<data_dir>/lock`, held
//!   while the control plane lives; a second open fails at once, naming the holder's pid;
//! - its owner is `connector_id/install_id` (the install id made once and kept in the state):
//!   every grant, revoke and sweep job carries it, set when the job is handed out;
//! - leased jobs and renewals carry `lease_seconds` besides `lease_expires_at`, so agents time
//!   renewals without comparing clocks;
//! - a job is *ready* when it is pending and past its backoff, or leased with an expired lease;
//!   each hand-out gets a new random lease token and `attempt + 1`. `reclaim_leases` (standalone,
//!   at start: every lease then belongs to a dead process) and `release` (an agent giving a job
//!   back; `started: false` does not count the attempt) make a job ready at once;
//! - a grant job is handed out only while its access may still be granted (or, a repair, while it
//!   is active) and no revoke of its binding is in flight; its first hand-out starts the access's
//!   TTL (see [`access`]); a revoke's params are made again from its access at each hand-out;
//! - a job of an access goes to the Rancher (host, port) the access was created with (pinned; with
//!   the current spec's credentials while the named integration still points there); other jobs go
//!   to the named integration's current spec, or the inline spec they were created with;
//! - `complete` is idempotent on `(job_id, lease_token)`; a stale token is `LeaseLost`;
//! - a retryable failure is requeued with exponential backoff and jitter, up to
//!   `max_grant_attempts` hand-outs; a revoke that serves an access request is requeued whatever
//!   the error, forever (capped backoff): access must never outlive its TTL; a grant that will not
//!   run again is cleaned up by a revoke;
//! - the scheduler, once at start and then every `tick`, ends expired accesses, queues due
//!   credential rotations and user cleanups, queues the reconcile every `sweep_interval` (at start
//!   too) and forgets old finished state;
//! - credentials a grant or rotation generates are stripped from the stored result and kept
//!   until the access request is read once: in memory on SQLite (one process); sealed in the
//!   database on PostgreSQL, so any replica can hand them out (see `credentials`).

pub mod access;
#[cfg(feature = "store-postgres")]
mod credentials;
mod gauges;
mod reconcile;
mod registry;
#[cfg(test)]
mod scheduler_tests;
#[cfg(test)]
pub(crate) mod tests;
mod users;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::operator::{AccessRequest, AccessState, JobCreate, JobRecord, JobState};
use super::protocol::{
    CompleteRequest, Job, JobError, JobKind, LeaseRequest, MAX_WAIT_SECONDS, Outcome, ReleaseRequest, RenewRequest,
    RenewResponse, SessionHello, SessionInfo,
};
use super::store::{self, AccessRow, Db, JobRow, Store, StoreError};
use super::{ControlPlane, ControlPlaneError};
use crate::integrations::{Credentials, Owner};

pub use access::MAX_TTL_SECONDS;
pub use store::IntegrationSource;
pub use users::ScheduledUser;

/// Integration config key: rotate the password of agent-created users every N days (0/absent: off).
pub const ROTATION_DAYS_KEY: &str = "credential_rotation_days";
/// Integration config key: delete an agent-created user N days after its last access ended.
pub const CLEANUP_DAYS_KEY: &str = "user_cleanup_days";

/// Knobs of the embedded control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the SQLite state lives (created if missing). Unused with a `database_url`.
    pub data_dir: PathBuf,
    /// A `postgres://` URL (`standalone.database_url`): the state lives in that database, shared
    /// by every replica given the same URL. `None`: SQLite in `data_dir`.
    pub database_url: Option<SecretString>,
    /// A file holding that URL (a mounted Secret), read at start and at each new connection.
    pub database_url_file: Option<PathBuf>,
    /// The operator token, with a database (the same on every replica; the daemon's config
    /// requires it there): the key that seals new users' one-time passwords kept in the database
    /// is derived from it. Without it they stay in this process's memory. Unused on SQLite.
    pub operator_token: Option<SecretString>,
    /// How long a lease lasts from a lease or a renew.
    pub lease_duration: Duration,
    /// Period of the scheduler (expiry revokes, rotations, cleanups).
    pub tick: Duration,
    /// First backoff of a requeued job; doubled per attempt, with ±25 % jitter.
    pub retry_base: Duration,
    /// Longest backoff of a requeued job.
    pub max_retry_delay: Duration,
    /// Hand-outs after which a retryable grant (or any job not serving a revoke) fails for good.
    pub max_grant_attempts: u32,
    /// Length of a "day" for `credential_rotation_days` and `user_cleanup_days` (tests shrink it).
    pub day: Duration,
    /// Finished jobs, their discovered objects, and ended access requests are forgotten this long
    /// after they ended, so the state file does not grow without bound (`standalone.retention_days`).
    pub retention: Duration,
    /// How often a `sweep` job is queued per integration, the first at start
    /// (`standalone.sweep_interval_seconds`). Zero: no sweeps.
    pub sweep_interval: Duration,
    /// This connector's id (`control_plane.connector_id`): with the install id kept in the state
    /// it is the owner named in every binding the connector makes.
    pub connector_id: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            data_dir: PathBuf::from("./data"),
            lease_duration: Duration::from_secs(60),
            tick: Duration::from_secs(1),
            retry_base: Duration::from_secs(2),
            max_retry_delay: Duration::from_secs(300),
            max_grant_attempts: 10,
            day: Duration::from_secs(86_400),
            retention: Duration::from_secs(30 * 86_400),
            // Off unless asked for: the daemon sets it from its config (default 300 s there).
            sweep_interval: Duration::ZERO,
            connector_id: "standalone".into(),
            database_url: None,
            database_url_file: None,
            operator_token: None,
        }
    }
}

impl Options {
    /// Where the state lives: the database URL's PostgreSQL, else SQLite in `data_dir`.
    ///
    /// # Errors
    /// `Store` when the URL is not one this build can use (the message never holds it).
    pub fn backend(&self) -> Result<store::Backend, ControlPlaneError> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => Some(url.clone()),
            #[cfg(feature = "store-postgres")]
            (None, Some(file)) => Some(store::postgres::read_url_file(file)?),
            #[cfg(not(feature = "store-postgres"))]
            (None, Some(_)) => Some(SecretString::from(String::new())),
            (None, None) => None,
        };
        match url {
            None => Ok(store::Backend::Sqlite(self.data_dir.clone())),
            #[cfg(feature = "store-postgres")]
            Some(url) => {
                let mut target = store::postgres::PgTarget::parse(&url)?;
                target.url_file = self.database_url_file.clone();
                Ok(store::Backend::Postgres(Box::new(target)))
            }
            #[cfg(not(feature = "store-postgres"))]
            Some(_) => Err(StoreError::Config(
                "standalone.database_url is set, but this build has no PostgreSQL support (cargo feature store-postgres)"
                    .into(),
            )
            .into()),
        }
    }
}

/// The in-process control plane. Cheap to share (`Arc`); every method is short and sync except
/// the long-poll `lease`.
pub struct EmbeddedControlPlane {
    options: Options,
    store: Store,
    /// `connector_id/install_id`: carried by every grant, revoke and sweep job (see `Owner`).
    owner: Owner,
    /// Wakes long-polls when a job may have become ready (created, requeued, closed).
    ready: Notify,
    /// Wakes the scheduler when an access got an expiry (it sleeps until the earliest one).
    rescheduled: Notify,
    /// When the scheduler looks next (ms since the epoch; `i64::MAX` while it is not asleep): an
    /// expiry at or after it needs no wake-up (see [`EmbeddedControlPlane::expiry_set`]).
    next_look_ms: AtomicI64,
    /// Cancelled by `close`: pending long-polls answer at once (empty).
    closing: CancellationToken,
    /// One-time credentials by access-request id on SQLite: never written there. Guarded
    /// together with the store's lock (taken after it) so a reader never sees `active` without
    /// them.
    credentials: Mutex<HashMap<String, Credentials>>,
    /// On a shared (PostgreSQL) state: seals one-time credentials kept in the database instead.
    #[cfg(feature = "store-postgres")]
    sealer: Option<credentials::Sealer>,
    /// When the scheduler last pruned old state (pruning runs at most every `PRUNE_EVERY`).
    last_prune: Mutex<Option<DateTime<Utc>>>,
    /// When the scheduler last queued sweeps (every `options.sweep_interval`).
    last_sweep: Mutex<Option<DateTime<Utc>>>,
}

pub use super::store::Pruned;

/// Most jobs one lease hands out on a shared (PostgreSQL) state; see `lease`.
const SHARED_LEASE_BATCH: u32 = 20;

/// How often the scheduler forgets old state.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

impl std::fmt::Debug for EmbeddedControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedControlPlane")
            .field("db", &self.store.describe())
            .finish_non_exhaustive()
    }
}

/// What a committed change asks for afterwards.
#[derive(Default)]
struct Effects {
    /// A job became ready: wake long-polls.
    wake: bool,
    /// An access got (or moved) its expiry, the earliest such: the scheduler may have to wake
    /// sooner.
    reschedule: Option<DateTime<Utc>>,
}

/// The time, in whole milliseconds as the store keeps it: what a call answers (an access's
/// `created_at`, the `expires_at` written into a grant) is what every later read shows.
fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// `t + d`, saturating at the end of time instead of panicking on overflow.
fn later(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `days` × `day`, saturating (a config may say anything).
fn days_of(day: Duration, days: f64) -> Duration {
    Duration::try_from_secs_f64(day.as_secs_f64() * days).unwrap_or(Duration::MAX)
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn new_lease_token() -> String {
    format!("lt-{}", uuid::Uuid::new_v4().simple())
}

fn bad_request(message: String) -> ControlPlaneError {
    ControlPlaneError::Rejected { status: 400, message }
}

/// How long the scheduler sleeps after a pass that started at `pass_started`: until the next
/// tick, or until the earliest expiry (`next_expiry`) when that comes first. An expiry that was
/// already due when the pass started is still there because the pass failed to end it: it waits
/// for the tick (no busy retry). One that fell due while the pass ran, after the pass read the
/// clock, is ended at once: treating it as failed, as this once did, left it (and every access
/// that expired after it) a whole tick late.
fn scheduler_wait(
    until_tick: Duration,
    pass_started: DateTime<Utc>,
    next_expiry: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Duration {
    match next_expiry {
        Some(due) if due > pass_started => until_tick.min((due - now).to_std().unwrap_or_default()),
        _ => until_tick,
    }
}

/// Exponential backoff from `base`, doubled per attempt, capped, with ±25 % jitter.
fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(cap);
    let jitter = rand::random_range(0.75..1.25);
    Duration::try_from_secs_f64(exp.as_secs_f64() * jitter)
        .unwrap_or(cap)
        .min(cap)
}

/// Removes `credentials` from a result object; returns the cleaned result and the credentials.
fn strip_credentials(result: Option<Value>) -> (Option<Value>, Option<Credentials>) {
    let Some(mut value) = result else { return (None, None) };
    let creds = match &mut value {
        Value::Object(map) => map.remove("credentials"),
        _ => None,
    };
    let creds = creds.and_then(|c| match serde_json::from_value::<Credentials>(c) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "a job result carried unreadable credentials; dropped");
            None
        }
    });
    (Some(value), creds)
}

/// `days` from an integration's config: a positive number (or numeric string); else off.
fn config_days(spec: &Value, key: &str) -> Option<f64> {
    let v = spec.get("config")?.get(key)?;
    let days = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (days.is_finite() && days > 0.0).then_some(days)
}

impl EmbeddedControlPlane {
    /// Opens (or creates) the state in `options.data_dir` and locks the directory for as long as
    /// the control plane lives. Jobs leased by a process that died are handed out again when their
    /// leases run out, or at once after [`EmbeddedControlPlane::reclaim_leases`]; due revokes are
    /// queued by the scheduler.
    ///
    /// # Errors
    /// `Store` when the directory or database cannot be created or read, or when another control
    /// plane (in this process or another) has the directory open.
    pub fn open(options: Options) -> Result<Arc<EmbeddedControlPlane>, ControlPlaneError> {
        let store = Store::open_backend(&options.backend()?)?;
        let install_id = store::install_id(&*store.lock()?)?;
        let owner = Owner::new(options.connector_id.trim(), &install_id).map_err(|e| {
            bad_request(format!(
                "control_plane.connector_id (APONO_CONNECTOR_ID) cannot name this connector's bindings: {e}"
            ))
        })?;
        tracing::debug!(owner = %owner, "control-plane state opened");
        #[cfg(feature = "store-postgres")]
        let sealer = match (store.is_shared(), &options.operator_token) {
            (false, _) => None,
            (true, Some(token)) => Some(credentials::Sealer::new(token, &install_id).map_err(|e| {
                StoreError::Config(format!(
                    "{e}: set APONO_OPERATOR_TOKEN (or APONO_OPERATOR_TOKEN_FILE) to the operator token shared by every replica"
                ))
            })?),
            // The daemon never gets here (its config requires the token with a database); a
            // library caller without one keeps them in this process's memory, as on SQLite.
            (true, None) => {
                tracing::warn!(
                    "no operator token given: new users' one-time passwords stay in this replica's memory, \
                     and a read on another replica does not show them (set APONO_OPERATOR_TOKEN)"
                );
                None
            }
        };
        Ok(Arc::new(EmbeddedControlPlane {
            options,
            store,
            owner,
            ready: Notify::new(),
            rescheduled: Notify::new(),
            next_look_ms: AtomicI64::new(i64::MAX),
            closing: CancellationToken::new(),
            credentials: Mutex::new(HashMap::new()),
            #[cfg(feature = "store-postgres")]
            sealer,
            last_prune: Mutex::new(None),
            last_sweep: Mutex::new(None),
        }))
    }

    /// Makes every leased job pending again at once (lease token cleared, attempt kept). For
    /// standalone `run`, right after `open`: the in-process agent is the only holder of leases,
    /// so every lease found at start belongs to a process that died, and waiting it out would only
    /// delay revokes that fell due meanwhile. Returns how many jobs were handed back. On a shared
    /// (PostgreSQL) state it does nothing: the other replicas' leases are live.
    ///
    /// # Errors
    /// `Store` when the state cannot be written.
    pub fn reclaim_leases(&self) -> Result<usize, ControlPlaneError> {
        if self.store.is_shared() {
            // Other replicas hold live leases on a shared database: a dead one's leases run out
            // within `lease_duration` and its jobs are handed out again then.
            return Ok(0);
        }
        let n = self.write(|c, fx| {
            let n = store::reclaim_leases(c, now())?;
            fx.wake = n > 0;
            Ok(n)
        })?;
        if n > 0 {
            tracing::info!(
                jobs = n,
                "leases of a previous process handed back; those jobs run again now"
            );
        }
        Ok(n)
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The owner named in the bindings this control plane's jobs make (`connector/install`).
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Runs `f` in one transaction and commits. The store's lock is held throughout.
    fn write<T>(
        &self,
        f: impl FnOnce(&dyn Db, &mut Effects) -> Result<T, ControlPlaneError>,
    ) -> Result<T, ControlPlaneError> {
        let conn = self.store.lock()?;
        let tx = conn.transaction()?;
        let mut effects = Effects::default();
        let value = f(&*tx, &mut effects)?;
        if effects.wake {
            tx.announce_ready().map_err(store::sql("announcing ready jobs"))?;
        }
        tx.commit()?;
        drop(conn);
        if effects.wake {
            self.ready.notify_waiters();
        }
        if let Some(at) = effects.reschedule {
            self.expiry_set(at);
        }
        Ok(value)
    }

    /// An access's expiry was set to `at` (committed): wakes the scheduler unless it looks at
    /// or before `at` anyway (a pass reads every expiry from the store). Every grant sets one,
    /// so waking for each cost two queries per grant for nothing.
    ///
    /// The scheduler sets `next_look_ms` to `i64::MAX` before its pass reads the store and to
    /// its wake-up time before it sleeps: an expiry committed after that read finds either
    /// `MAX` (wakes it: `notify_one` keeps a permit for a scheduler not yet asleep) or the time
    /// it will look again.
    fn expiry_set(&self, at: DateTime<Utc>) {
        if at.timestamp_millis() < self.next_look_ms.load(Ordering::SeqCst) {
            self.rescheduled.notify_one();
        }
    }

    fn credentials_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Credentials>> {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- jobs -----

    /// Queues a raw job. Only `kind` is checked (present); the agent validates the rest.
    ///
    /// # Errors
    /// `Rejected` (400) for a blank kind or an integration name that is not registered.
    pub fn create_job(&self, job: JobCreate) -> Result<JobRecord, ControlPlaneError> {
        if job.kind.trim().is_empty() {
            return Err(bad_request(
                "a job needs a \"kind\" (validate, discover, grant, revoke, ...)".into(),
            ));
        }
        self.write(|c, fx| {
            let (integration_name, integration) = match job.integration {
                Value::String(name) => {
                    if store::integration(c, &name)?.is_none() {
                        return Err(Self::unknown_integration(c, &name));
                    }
                    (Some(name), None)
                }
                other => (None, Some(other)),
            };
            let t = now();
            let row = JobRow {
                id: new_id(),
                kind: job.kind,
                integration_name,
                integration,
                params: job.params,
                state: JobState::Pending,
                attempt: 0,
                lease_token: None,
                lease_expires_at: None,
                not_before: None,
                completed_token: None,
                result: None,
                error: None,
                access_id: None,
                created_at: t,
                updated_at: t,
            };
            store::insert_job(c, &row)?;
            fx.wake = true;
            Ok(record(&row))
        })
    }

    /// One job, as the operator API shows it (never with credentials).
    ///
    /// # Errors
    /// `Store` when the row cannot be read (a corrupt row names its table and id).
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, ControlPlaneError> {
        Ok(store::job(&*self.store.lock()?, id)?.as_ref().map(record))
    }

    /// Every job, in the order stored (the operator API answers in id order: see the server's
    /// `list_answer`). A corrupt row is logged and left out.
    pub fn list_jobs(&self) -> Result<Vec<JobRecord>, ControlPlaneError> {
        let rows = store::list_jobs(&*self.store.lock()?)?;
        Ok(skip_corrupt(rows).iter().map(record).collect())
    }

    /// Objects uploaded by a discovery job, in upload order.
    pub fn resources(&self, job_id: &str) -> Result<Vec<Value>, ControlPlaneError> {
        Ok(store::resources(&*self.store.lock()?, job_id)?)
    }

    /// A new pending job. `spec`: the integration spec it is pinned to (`None`: the named
    /// integration's spec at lease time).
    fn new_job(
        kind: JobKind,
        integration: &str,
        spec: Option<Value>,
        params: Value,
        access_id: Option<&str>,
        t: DateTime<Utc>,
    ) -> JobRow {
        JobRow {
            id: new_id(),
            kind: kind.as_str().to_string(),
            integration_name: Some(integration.to_string()),
            integration: spec,
            params,
            state: JobState::Pending,
            attempt: 0,
            lease_token: None,
            lease_expires_at: None,
            not_before: None,
            completed_token: None,
            result: None,
            error: None,
            access_id: access_id.map(str::to_string),
            created_at: t,
            updated_at: t,
        }
    }

    /// Hands out up to `max` ready jobs; when it hands out none, also when the next not-yet-ready
    /// job becomes ready.
    fn try_lease(&self, max: u32) -> Result<(Vec<Value>, Option<DateTime<Utc>>), ControlPlaneError> {
        self.write(|c, fx| {
            let t = now();
            let mut out = Vec::new();
            // Integration specs by name, read once per transaction (nothing here changes them):
            // on PostgreSQL each read is a round trip made while every replica's writers wait.
            let mut specs = HashMap::new();
            // A few rounds: a grant held back (revoke in flight) or cancelled leaves room for others.
            for _ in 0..4 {
                let want = max.saturating_sub(u32::try_from(out.len()).unwrap_or(u32::MAX));
                if want == 0 {
                    break;
                }
                let rows = store::ready_jobs(c, t, want)?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    if let Some(job) = self.hand_out(c, fx, row, t, &mut specs)? {
                        out.push(job);
                    }
                }
            }
            // Only an empty answer waits for it.
            let next = if out.is_empty() { store::next_ready_at(c)? } else { None };
            Ok((out, next))
        })
    }

    /// Leases one ready row, or leaves it (corrupt, held back, cancelled): `None`.
    fn hand_out(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        row: Result<JobRow, StoreError>,
        t: DateTime<Utc>,
        specs: &mut HashMap<String, Option<Value>>,
    ) -> Result<Option<Value>, ControlPlaneError> {
        let mut row = match row {
            Ok(r) => r,
            Err(e) => {
                // Fail it for good so it is not looked at again on every lease.
                tracing::error!(error = %e, "a job cannot be read; marking it failed");
                if let Some(id) = e.corrupt_key() {
                    store::fail_corrupt_job(c, id, &e.to_string(), t)?;
                }
                return Ok(None);
            }
        };
        let kind = JobKind::parse(&row.kind);
        match kind {
            Some(JobKind::Grant) => match self.gate_grant(c, fx, &mut row, t)? {
                access::GrantGate::HandOut => {}
                access::GrantGate::Deferred | access::GrantGate::Cancelled => return Ok(None),
            },
            Some(JobKind::Revoke) => self.refresh_revoke(c, &mut row)?,
            Some(JobKind::Sweep) => self.refresh_sweep(c, &mut row)?,
            _ => {}
        }
        // Set at hand-out, so jobs queued by an older build carry it too. A raw job keeps an owner
        // its creator gave; the lifecycle's jobs got theirs above.
        if matches!(kind, Some(JobKind::Grant | JobKind::Revoke | JobKind::Sweep))
            && let Value::Object(params) = &mut row.params
        {
            params
                .entry("owner")
                .or_insert_with(|| Value::String(self.owner.to_string()));
        }
        if row.state == JobState::Leased {
            tracing::info!(job = %row.id, kind = %row.kind, attempt = row.attempt, "lease expired; handing the job out again");
        }
        // Uploads belong to a lease: what an earlier attempt uploaded before it failed or lost its
        // lease would otherwise be counted twice once this attempt uploads everything again.
        let discarded = store::discard_resources(c, &row.id)?;
        if discarded > 0 {
            tracing::info!(job = %row.id, discarded, "discarding the discovered objects of the job's earlier attempt");
        }
        row.state = JobState::Leased;
        row.attempt = row.attempt.saturating_add(1);
        row.lease_token = Some(new_lease_token());
        row.lease_expires_at = Some(later(t, self.options.lease_duration));
        row.not_before = None;
        row.updated_at = t;
        store::update_job(c, &row)?;
        // The pinned (or inline) spec first: a later registration under the name must not
        // re-target this job. While the named one still points at the same Rancher, its current
        // spec goes (a rotated key or CA in the config reaches jobs pinned before the change).
        let mut named = |name: &String| -> Result<Option<Value>, StoreError> {
            if let Some(spec) = specs.get(name) {
                return Ok(spec.clone());
            }
            let spec = store::integration(c, name)?;
            specs.insert(name.clone(), spec.clone());
            Ok(spec)
        };
        let integration = match (&row.integration, &row.integration_name) {
            (Some(pinned), Some(name)) => match named(name)? {
                Some(current) if registry::same_target(pinned, &current) => current,
                _ => pinned.clone(),
            },
            (Some(spec), None) => spec.clone(),
            (None, Some(name)) => named(name)?.unwrap_or_else(|| {
                // Cannot happen (integrations are never deleted); the agent fails the job clearly.
                serde_json::json!({"name": name})
            }),
            (None, None) => Value::Null,
        };
        let job = Job {
            id: row.id.clone(),
            kind: row.kind.clone(),
            attempt: row.attempt,
            lease_token: row.lease_token.clone().unwrap_or_default(),
            lease_expires_at: row.lease_expires_at.unwrap_or(t),
            lease_seconds: Some(self.lease_seconds()),
            integration,
            params: row.params.clone(),
        };
        match serde_json::to_value(&job) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                tracing::error!(job = %row.id, error = %e, "a job does not serialize; skipping it");
                Ok(None)
            }
        }
    }

    /// A lease's length in whole seconds, rounded down (at least 1): sent next to
    /// `lease_expires_at` so an agent can time renewals without comparing clocks.
    fn lease_seconds(&self) -> u64 {
        self.options.lease_duration.as_secs().max(1)
    }

    /// Ends pending long-polls at once and makes later ones answer empty (shutdown).
    pub fn close(&self) {
        self.closing.cancel();
        self.ready.notify_waiters();
    }

    // ----- completion -----

    fn complete_sync(&self, job_id: &str, request: &CompleteRequest) -> Result<(), ControlPlaneError> {
        let lost = || ControlPlaneError::LeaseLost {
            job_id: job_id.to_string(),
        };
        let mut new_creds: Option<(String, Credentials)> = None;
        // Unread one-time credentials of an access that has ended are of no use to anyone.
        let mut forget_creds: Option<String> = None;
        let conn = self.store.lock()?;
        let transaction = conn.transaction()?;
        let tx: &dyn Db = &*transaction;
        let (mut job, access) = store::job_with_access(tx, job_id)?.ok_or_else(|| ControlPlaneError::NotFound {
            message: format!("no job {job_id:?}"),
        })?;
        if job.completed_token.as_deref() == Some(request.lease_token.as_str()) {
            return Ok(()); // a repeat: already taken
        }
        if job.state != JobState::Leased || job.lease_token.as_deref() != Some(request.lease_token.as_str()) {
            return Err(lost());
        }
        let t = now();
        let mut wake = false;
        // The expiry of the access this grant made active: the scheduler's to watch from now on.
        let mut activated = None;
        job.completed_token = Some(request.lease_token.clone());
        job.lease_token = None;
        job.lease_expires_at = None;
        job.updated_at = t;
        let access = match access {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                // Record the job's outcome anyway; the access row needs a person's look.
                let id = job.access_id.as_deref().unwrap_or_default();
                tracing::error!(access = %id, error = %e, "the job's access request cannot be read");
                None
            }
            None => None,
        };
        let is_revoke = job.kind == JobKind::Revoke.as_str();
        match request.outcome {
            Outcome::Succeeded => {
                let (result, creds) = strip_credentials(request.result.clone());
                job.state = JobState::Succeeded;
                job.result = result;
                job.error = None;
                store::update_job(tx, &job)?;
                if job.kind == JobKind::Sweep.as_str() {
                    wake |= self.on_sweep_succeeded(tx, &job, t)?;
                }
                if let Some(mut a) = access {
                    match JobKind::parse(&job.kind) {
                        Some(JobKind::Grant) => {
                            wake |= self.on_grant_succeeded(tx, &job, &mut a, t)?;
                            if a.state == AccessState::Active {
                                activated = a.expires_at;
                            }
                            if let Some(c) = creds {
                                new_creds = Some((a.id.clone(), c));
                            }
                        }
                        Some(JobKind::Revoke) => {
                            wake |= self.on_revoke_succeeded(tx, &job, &mut a, t)?;
                            gauges::revoke_done(&a);
                            if a.state == AccessState::Revoked {
                                forget_creds = Some(a.id.clone());
                            }
                        }
                        Some(JobKind::RotateCredentials) => {
                            // A rotation that finished after its access ended: nobody may read it.
                            if let Some(c) = creds
                                && a.state == AccessState::Active
                            {
                                new_creds = Some((a.id.clone(), c));
                            }
                        }
                        _ => {}
                    }
                }
                if job.kind == JobKind::DeleteUser.as_str()
                    && let Some(user_id) = job.params.get("user_id").and_then(Value::as_str)
                    && let Some(integration) = &job.integration_name
                {
                    store::delete_managed_user(tx, integration, user_id)?;
                }
                // A raw grant or revoke (no access) that reports a user the connector created.
                if job.access_id.is_none()
                    && matches!(JobKind::parse(&job.kind), Some(JobKind::Grant | JobKind::Revoke))
                    && let Some(integration) = &job.integration_name
                    && let Some(result) = &job.result
                    && let Some(user_id) = result.get("user_id").and_then(Value::as_str)
                    && store::is_user_id(user_id)
                    && ["managed_user", "created_user"]
                        .iter()
                        .any(|k| result.get(*k).and_then(Value::as_bool) == Some(true))
                {
                    Self::ensure_tracked(tx, integration, user_id)?;
                }
            }
            Outcome::Failed => {
                let error = request.error.clone().unwrap_or_else(|| JobError {
                    code: "unknown".into(),
                    message: "the agent reported a failure without an error".into(),
                    retryable: false,
                });
                // A revoke serving an access is retried forever: access must not outlive its TTL.
                let forever = is_revoke && job.access_id.is_some();
                let retry = forever || (error.retryable && job.attempt < self.options.max_grant_attempts);
                job.error = Some(error.clone());
                job.result = None;
                if retry {
                    let delay = backoff(self.options.retry_base, self.options.max_retry_delay, job.attempt);
                    job.state = JobState::Pending;
                    job.not_before = Some(later(t, delay));
                } else {
                    job.state = JobState::Failed;
                }
                if let Some(mut a) = access {
                    match JobKind::parse(&job.kind) {
                        // May stop the retry: a grant revoked meanwhile is cleaned up instead.
                        Some(JobKind::Grant) => {
                            wake |= self.on_grant_failed(tx, &mut job, &mut a, &error, retry, t)?;
                        }
                        Some(JobKind::Revoke) => self.on_revoke_failed(tx, &mut a, &error)?,
                        _ => {}
                    }
                }
                match (job.state, job.not_before) {
                    (JobState::Pending, Some(at)) => {
                        let retry_in_ms = (at - t).num_milliseconds().max(0);
                        tracing::warn!(job = %job.id, kind = %job.kind, attempt = job.attempt, code = %error.code, retry_in_ms, "job failed; requeued");
                    }
                    _ => {
                        tracing::warn!(job = %job.id, kind = %job.kind, attempt = job.attempt, code = %error.code, "job failed for good")
                    }
                }
                store::update_job(tx, &job)?;
                wake |= job.state == JobState::Pending;
            }
        }
        if wake {
            tx.announce_ready().map_err(store::sql("announcing ready jobs"))?;
        }
        #[cfg(feature = "store-postgres")]
        if let Some(sealer) = &self.sealer {
            self.keep_sealed(tx, sealer, new_creds.as_ref(), forget_creds.as_deref(), t)?;
            transaction.commit()?;
        } else {
            self.keep_in_memory(transaction, new_creds, forget_creds)?;
        }
        #[cfg(not(feature = "store-postgres"))]
        self.keep_in_memory(transaction, new_creds, forget_creds)?;
        drop(conn);
        if wake {
            self.ready.notify_waiters();
        }
        if let Some(at) = activated {
            self.expiry_set(at);
        }
        Ok(())
    }

    /// SQLite: the credentials go into memory before the commit and while the store's lock is
    /// held, so the first read that sees the new state also sees them.
    fn keep_in_memory(
        &self,
        transaction: store::Transaction<'_>,
        new_creds: Option<(String, Credentials)>,
        forget_creds: Option<String>,
    ) -> Result<(), ControlPlaneError> {
        let mut map = self.credentials_map();
        if let Some((id, c)) = &new_creds {
            map.insert(id.clone(), c.clone());
        }
        if let Some(id) = &forget_creds {
            map.remove(id);
        }
        if let Err(e) = transaction.commit() {
            if let Some((id, _)) = &new_creds {
                map.remove(id);
            }
            return Err(e.into());
        }
        Ok(())
    }

    // ----- scheduler -----

    /// Every `tick`: ends expired accesses, queues due credential rotations, due user cleanups and
    /// (every `sweep_interval`) sweeps. Runs once at start (revokes that fell due while the process
    /// was down go out at once). Between ticks it wakes at the earliest expiry (the `access_due`
    /// index, no scan) or when an access gets one, and ends what is due then: a revoke is queued
    /// as its access ends, not up to a tick later. Returns when `stop` is cancelled. Errors are
    /// logged, never fatal.
    pub async fn run_scheduler(self: Arc<Self>, stop: CancellationToken) {
        let tick = self.options.tick.max(Duration::from_millis(10));
        tracing::debug!(tick_ms = tick.as_millis() as u64, "control-plane scheduler started");
        let mut next_tick = tokio::time::Instant::now();
        loop {
            // On a shared database one replica at a time runs the passes; the others try the
            // leader lock every tick and take over within a tick of the leader's death.
            if !self.store.try_lead() {
                // The gauges read the shared state: every replica shows the same counts, and a
                // follower's do not go stale after a hand-over.
                if let Ok(c) = self.store.lock() {
                    gauges::update(&*c, now());
                    // Jobs another replica queued (the leader's expiry revokes) wake this one's
                    // long-polls within a tick when its notice did not come (its listening
                    // connection lost); its own jobs wake them at once, as on SQLite. Ready jobs,
                    // not `next_ready_at`: a new job has no backoff time, so that never saw one.
                    if store::any_ready_job(&*c, now()).unwrap_or(false) {
                        self.ready.notify_waiters();
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(tick) => continue,
                }
            }
            // Any expiry set from here on wakes it again (see `expiry_set`).
            self.next_look_ms.store(i64::MAX, Ordering::SeqCst);
            // The pass reads the clock after this, so whatever was due now it ends.
            let pass_started = now();
            let pass = if tokio::time::Instant::now() >= next_tick {
                next_tick = tokio::time::Instant::now() + tick;
                self.tick_once()
            } else {
                self.expire_due(now())
            };
            if let Err(e) = pass {
                tracing::error!(error = %e, "control-plane scheduler pass failed; retrying next tick");
            }
            let until_tick = next_tick.saturating_duration_since(tokio::time::Instant::now());
            let wait = match self.store.lock().and_then(|c| store::next_expiry(&*c)) {
                Ok(due) => scheduler_wait(until_tick, pass_started, due, now()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the next expiry; ending accesses at the next tick");
                    until_tick
                }
            };
            let look = now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
            self.next_look_ms.store(look.timestamp_millis(), Ordering::SeqCst);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.rescheduled.notified() => {}
            }
        }
        tracing::debug!("control-plane scheduler stopped");
    }

    /// One pass of the scheduler (public for tests and one-shot tools).
    pub fn tick_once(&self) -> Result<(), ControlPlaneError> {
        let t = now();
        self.expire_due(t)?;
        let rotations = skip_corrupt(store::due_rotations(&*self.store.lock()?, t)?);
        for u in rotations {
            if let Err(e) = self.write(|c, fx| self.queue_rotation(c, fx, &u, t)) {
                tracing::error!(user = %u.user_id, error = %e, "could not queue a credential rotation; retrying next tick");
            }
        }
        let cleanups = skip_corrupt(store::due_cleanups(&*self.store.lock()?, t)?);
        for u in cleanups {
            if let Err(e) = self.write(|c, fx| self.queue_cleanup(c, fx, &u, t)) {
                tracing::error!(user = %u.user_id, error = %e, "could not queue a user cleanup; retrying next tick");
            }
        }
        self.sweep_if_due(t);
        self.prune_if_due(t);
        gauges::update(&*self.store.lock()?, t);
        // A backoff ended or a lease ran out: wake long-polls (they also time their own waits).
        let next = store::next_ready_at(&*self.store.lock()?)?;
        if next.is_some_and(|n| n <= t) {
            self.ready.notify_waiters();
        }
        Ok(())
    }

    fn prune_if_due(&self, t: DateTime<Utc>) {
        {
            let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|l| (t - l).to_std().unwrap_or_default() < PRUNE_EVERY) {
                return;
            }
            *last = Some(t);
        }
        if let Err(e) = self.prune(t) {
            tracing::error!(error = %e, "could not prune old control-plane state; retrying later");
        }
    }

    /// Forgets what ended more than `retention` before `t` (see [`Options::retention`]).
    ///
    /// # Errors
    /// `Store` when the state cannot be written.
    pub fn prune(&self, t: DateTime<Utc>) -> Result<store::Pruned, ControlPlaneError> {
        let retention = chrono::Duration::from_std(self.options.retention).unwrap_or(chrono::Duration::MAX);
        let cutoff = t.checked_sub_signed(retention).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let (pruned, sealed) = self.write(|c, _| {
            #[cfg(feature = "store-postgres")]
            let sealed = match self.sealer {
                Some(_) => self.prune_sealed(c, t)?,
                None => 0,
            };
            #[cfg(not(feature = "store-postgres"))]
            let sealed = 0usize;
            Ok((store::prune(c, cutoff)?, sealed))
        })?;
        if sealed > 0 {
            tracing::info!(
                one_time_credentials = sealed,
                "deleted one-time credentials nobody read within 24 h"
            );
        }
        if pruned != store::Pruned::default() {
            tracing::info!(
                jobs = pruned.jobs,
                resources = pruned.resources,
                access_requests = pruned.access_requests,
                "forgot state older than the retention"
            );
        }
        Ok(pruned)
    }
}

/// `state copy`: moves the SQLite state in `from` (a stopped install's data dir) into the empty
/// PostgreSQL database at `to`, live accesses included (see `store::copy_sqlite_to_postgres`).
///
/// # Errors
/// `Store` (with what to do) when the URL is wrong, the database holds state already, a daemon
/// has the data dir, or either database fails.
#[cfg(feature = "store-postgres")]
pub fn copy_state(from: &std::path::Path, to: &SecretString) -> Result<store::Copied, ControlPlaneError> {
    let target = store::postgres::PgTarget::parse(to)?;
    let copied = store::copy_sqlite_to_postgres(from, &target)?;
    tracing::info!(
        from = %from.display(),
        to = %target.display(),
        access_requests = copied.access_requests,
        jobs = copied.jobs,
        "state copied"
    );
    Ok(copied)
}

pub use store::Copied;

/// Logs and drops rows that do not decode, so one corrupt row cannot stop a listing or the scheduler.
fn skip_corrupt<T>(rows: Vec<Result<T, StoreError>>) -> Vec<T> {
    rows.into_iter()
        .filter_map(|r| match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, "skipping a control-plane row that cannot be read");
                None
            }
        })
        .collect()
}

/// The operator view of a job: the integration by name only, never its spec or credentials.
fn record(j: &JobRow) -> JobRecord {
    let integration = match (&j.integration_name, &j.integration) {
        (Some(name), _) => name.clone(),
        (None, Some(v)) => v.get("name").and_then(Value::as_str).unwrap_or("(invalid)").to_string(),
        (None, None) => "(invalid)".to_string(),
    };
    JobRecord {
        id: j.id.clone(),
        kind: j.kind.clone(),
        integration,
        state: j.state,
        attempt: j.attempt,
        created_at: j.created_at,
        updated_at: j.updated_at,
        lease_expires_at: if j.state == JobState::Leased {
            j.lease_expires_at
        } else {
            None
        },
        result: j.result.clone(),
        error: j.error.clone(),
    }
}

fn view(a: AccessRow, credentials: Option<Credentials>) -> AccessRequest {
    AccessRequest {
        id: a.id,
        integration: a.integration,
        subject: a.subject,
        role: a.role,
        resource: a.resource,
        ttl_seconds: a.ttl_seconds,
        create_user: a.create_user,
        state: a.state,
        created_at: a.created_at,
        granted_at: a.granted_at,
        expires_at: a.expires_at,
        revoked_at: a.revoked_at,
        grant_job_id: a.grant_job_id,
        revoke_job_id: a.revoke_job_id,
        user_id: a.user_id,
        binding_ids: a.binding_ids,
        access_details: a.access_details,
        pre_existing: a.pre_existing,
        bound_subject: a.bound_subject,
        note: a.note,
        last_error: a.last_error,
        credentials,
    }
}

/// The job whose lease `token` holds: `NotFound` for an unknown job, `LeaseLost` when the lease
/// is no longer this token's (renew, release and upload all take that rule).
fn leased_job(c: &dyn Db, job_id: &str, token: &str) -> Result<JobRow, ControlPlaneError> {
    let job = store::job(c, job_id)?.ok_or_else(|| ControlPlaneError::NotFound {
        message: format!("no job {job_id:?}"),
    })?;
    if job.state != JobState::Leased || job.lease_token.as_deref() != Some(token) {
        return Err(ControlPlaneError::LeaseLost {
            job_id: job_id.to_string(),
        });
    }
    Ok(job)
}

#[async_trait]
impl ControlPlane for EmbeddedControlPlane {
    async fn hello(&self, hello: &SessionHello) -> Result<SessionInfo, ControlPlaneError> {
        let session_id = format!("s-{}", uuid::Uuid::new_v4().simple());
        tracing::info!(session = %session_id, version = %hello.version, hostname = %hello.hostname, "agent session started");
        Ok(SessionInfo {
            session_id,
            lease_seconds: self.options.lease_duration.as_secs().max(1),
        })
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Value>, ControlPlaneError> {
        let mut max = request.max_jobs.clamp(1, 100);
        if self.store.is_shared() {
            // Replicas share what falls due together (a mass expiry is queued in chunks of
            // 100): a smaller hand-out leaves the rest to the others' long-polls, woken by the
            // same commit, instead of one agent taking the whole chunk.
            max = max.min(SHARED_LEASE_BATCH);
        }
        let wait = Duration::from_secs(u64::from(request.wait_seconds.min(MAX_WAIT_SECONDS)));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so a job created in between is not missed.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Jobs another replica queued (PostgreSQL: its announcement).
            let mut remote = self.store.remote_ready().map(|n| Box::pin(n.notified()));
            if let Some(r) = remote.as_mut() {
                r.as_mut().enable();
            }
            if self.closing.is_cancelled() {
                return Ok(Vec::new());
            }
            let (jobs, next) = self.try_lease(max)?;
            if !jobs.is_empty() {
                return Ok(jobs);
            }
            let now_i = tokio::time::Instant::now();
            if now_i >= deadline {
                return Ok(Vec::new());
            }
            let mut sleep_for = deadline - now_i;
            if let Some(next) = next {
                let until = (next - now())
                    .to_std()
                    .unwrap_or_default()
                    .max(Duration::from_millis(15));
                sleep_for = sleep_for.min(until);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = async {
                    match remote.as_mut() {
                        Some(r) => r.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.closing.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    async fn renew(&self, job_id: &str, request: &RenewRequest) -> Result<RenewResponse, ControlPlaneError> {
        self.write(|c, _| {
            let mut job = leased_job(c, job_id, &request.lease_token)?;
            let t = now();
            let expires = later(t, self.options.lease_duration);
            job.lease_expires_at = Some(expires);
            job.updated_at = t;
            store::update_job(c, &job)?;
            Ok(RenewResponse {
                lease_expires_at: expires,
                lease_seconds: Some(self.lease_seconds()),
            })
        })
    }

    async fn complete(&self, job_id: &str, request: &CompleteRequest) -> Result<(), ControlPlaneError> {
        self.complete_sync(job_id, request)
    }

    async fn release(&self, job_id: &str, request: &ReleaseRequest) -> Result<(), ControlPlaneError> {
        self.write(|c, fx| {
            let mut job = leased_job(c, job_id, &request.lease_token)?;
            job.state = JobState::Pending;
            job.lease_token = None;
            job.lease_expires_at = None;
            job.not_before = None;
            if !request.started {
                job.attempt = job.attempt.saturating_sub(1);
            }
            job.updated_at = now();
            store::update_job(c, &job)?;
            fx.wake = true;
            tracing::info!(job = %job_id, kind = %job.kind, started = request.started, "lease released by the agent; the job is ready again");
            Ok(())
        })
    }

    async fn upload_resources(&self, job: &Job, batch: &[Value]) -> Result<(), ControlPlaneError> {
        self.write(|c, _| {
            leased_job(c, &job.id, &job.lease_token)?;
            store::insert_resources(c, &job.id, batch)?;
            Ok(())
        })
    }
}
