//! The access lifecycle: why a binding is granted, kept, handed over or removed, in one place.
//!
//! States: `pending` (grant queued or running) → `active` (granted, until `expires_at`) →
//! `revoking` (revoke queued or running, retried until it succeeds) → `revoked`. `failed` is only
//! found in state written by older builds.
//!
//! Rules:
//! - **TTL.** It starts when the grant is first handed out (not when it was requested, not when it
//!   completed): `expires_at` is set then and written into the grant's params, so every attempt
//!   marks the binding with the same expiry, and the agent refuses a grant whose expiry has passed.
//! - **Pinning.** An access keeps the integration spec it was created with, and so do its jobs: a
//!   later config edit that moves the named integration (host, port) does not re-target its
//!   revoke. While the target is unchanged, jobs get the current spec, so a rotated key or a new
//!   CA in the config reaches old accesses too.
//! - **Overlap.** Accesses on one key (integration, subject, role, resource, on the same pinned
//!   Rancher) share the binding. When one ends while another on the key is `active` or `pending` (a
//!   holder), no revoke is queued: its binding ids are merged into each holder's, and it is
//!   `revoked` at once ("binding kept: still held by access X"). Only the last one revokes, with
//!   every id handed to it. A grant whose key has a revoke in flight waits (1 s steps) until that
//!   revoke settles, so a new grant never races an old revoke.
//! - **Fail closed.** A revoke carries what the grant recorded (`grant_id`, `user_id`,
//!   `binding_ids`). A grant that fails for good, runs out of attempts, is cancelled after it
//!   started, or whose expiry passed before it ran, is cleaned up by a revoke (the agent then also
//!   removes the connector's marked bindings of that grant id); the access ends `revoked` with the
//!   grant's error in `last_error`. A revoke asked for while the grant runs is carried out when the
//!   grant settles, whichever way it settles.

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;

use super::registry::same_target;
use super::{Effects, EmbeddedControlPlane, bad_request, later, now, skip_corrupt, view};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef, JobState};
use crate::control_plane::protocol::{JobError, JobKind};
use crate::control_plane::store::{self, AccessRow, IntegrationSource, JobRow};
use crate::integrations::{GrantRequest, RevokeRequest};

/// Longest TTL an access request may ask for (ten years).
pub const MAX_TTL_SECONDS: u64 = 10 * 366 * 86_400;

/// How long a grant waits before it looks again at a revoke in flight on its key.
const REVOKE_IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What `try_lease` may do with a ready grant job.
pub(super) enum GrantGate {
    /// Hand it out (its params now carry the expiry).
    HandOut,
    /// Not now: a revoke on its key is in flight (the job was put back with a short delay).
    Deferred,
    /// Not at all: the job was failed and the access cleaned up (revoked meanwhile, or expired).
    Cancelled,
}

fn cancelled(message: String) -> JobError {
    JobError {
        code: "cancelled".into(),
        message,
        retryable: false,
    }
}

/// Merges `ids` into `into`, keeping order and dropping repeats.
fn merge_ids(into: &mut Vec<String>, ids: &[String]) {
    for id in ids {
        if !into.contains(id) {
            into.push(id.clone());
        }
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

impl EmbeddedControlPlane {
    /// Creates an access request (`pending`) and queues its grant job, both pinned to the
    /// integration's current spec. An inline integration is validated and registered under its
    /// name in the same transaction (see [`EmbeddedControlPlane::register_integration`] for what
    /// an inline registration may not change).
    ///
    /// # Errors
    /// `Rejected` 400 for an unknown integration name, an invalid inline integration, an empty
    /// role or a TTL out of range; 409 for an inline integration that may not replace the
    /// registered one.
    pub fn create_access(&self, request: AccessRequestCreate) -> Result<AccessRequest, ControlPlaneError> {
        if request.ttl_seconds == 0 || request.ttl_seconds > MAX_TTL_SECONDS {
            return Err(bad_request(format!(
                "ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (ten years), not {}",
                request.ttl_seconds
            )));
        }
        if request.role.trim().is_empty() {
            return Err(bad_request("role must not be empty".into()));
        }
        let (name, inline) = match &request.integration {
            IntegrationRef::Name(name) => (name.clone(), None),
            IntegrationRef::Inline(spec) => (spec.name.clone(), Some(Self::checked_spec(spec)?)),
        };
        self.write(|c, fx| {
            let t = now();
            if let Some(value) = &inline {
                self.register_in(c, &name, value, IntegrationSource::Inline, t)?;
            }
            let spec = store::integration(c, &name)?.ok_or_else(|| Self::unknown_integration(c, &name))?;
            let id = format!("ar-{}", uuid::Uuid::now_v7());
            let params = serde_json::to_value(GrantRequest {
                subject: request.subject.clone(),
                role: request.role.clone(),
                resource: request.resource.clone(),
                create_user: request.create_user,
                grant_id: Some(id.clone()),
                expires_at: None, // set when the grant is first handed out
                owner: None,
                keep_password: false,
            })
            .map_err(|e| bad_request(format!("the grant request does not serialize: {e}")))?;
            let grant = Self::new_job(JobKind::Grant, &name, Some(spec.clone()), params, Some(&id), t);
            let row = AccessRow {
                id: id.clone(),
                integration: name.clone(),
                subject: request.subject,
                role: request.role,
                resource: request.resource,
                ttl_seconds: request.ttl_seconds,
                create_user: request.create_user,
                state: AccessState::Pending,
                created_at: t,
                granted_at: None,
                expires_at: None,
                revoked_at: None,
                grant_job_id: grant.id.clone(),
                revoke_job_id: None,
                user_id: None,
                binding_ids: Vec::new(),
                access_details: None,
                last_error: None,
                revoke_requested: false,
                integration_spec: Some(spec),
                pre_existing: false,
            };
            store::insert_job(c, &grant)?;
            store::insert_access(c, &row)?;
            fx.wake = true;
            tracing::info!(access = %id, integration = %name, subject = %row.subject, role = %row.role, resource = %row.resource, ttl_s = row.ttl_seconds, "access requested");
            Ok(view(row, None))
        })
    }

    /// One access request. One-time credentials (from its grant or a rotation) are included in
    /// the first read after they arrived, and then forgotten.
    ///
    /// # Errors
    /// `Store` when the row cannot be read.
    pub fn access(&self, id: &str) -> Result<Option<AccessRequest>, ControlPlaneError> {
        let conn = self.store.lock();
        let Some(row) = store::access(&conn, id)? else {
            return Ok(None);
        };
        let creds = self.credentials_map().remove(id);
        drop(conn);
        Ok(Some(view(row, creds)))
    }

    /// Every access request, oldest first (without credentials). A corrupt row is logged and left out.
    ///
    /// # Errors
    /// `Store` when the table cannot be read.
    pub fn list_access(&self) -> Result<Vec<AccessRequest>, ControlPlaneError> {
        let rows = store::list_access(&self.store.lock())?;
        Ok(skip_corrupt(rows).into_iter().map(|r| view(r, None)).collect())
    }

    /// Ends an access now, whatever state it is in short of ended:
    /// - `active`, or a legacy `failed`: revoke (or hand the binding over, see the module rules);
    /// - `pending`, grant not handed out: cancelled, `revoked` (nothing was granted); grant
    ///   requeued after an attempt: cancelled and cleaned up; grant running: revoked as soon as
    ///   the grant settles;
    /// - `revoking`, `revoked`: nothing to do.
    ///
    /// # Errors
    /// `NotFound` for an unknown id.
    pub fn revoke_access(&self, id: &str) -> Result<AccessRequest, ControlPlaneError> {
        let row = self.write(|c, fx| {
            let mut a = store::access(c, id)?.ok_or_else(|| ControlPlaneError::NotFound {
                message: format!("no access request {id:?}"),
            })?;
            let t = now();
            match a.state {
                AccessState::Revoking | AccessState::Revoked => {}
                AccessState::Active | AccessState::Failed => {
                    fx.wake |= self.end_access(c, &mut a, t)?;
                    tracing::info!(access = %id, "access revoked by the operator");
                }
                AccessState::Pending => match store::job(c, &a.grant_job_id)? {
                    Some(mut g) if g.state == JobState::Pending => {
                        let why = format!("access request {id} was revoked before the grant ran");
                        fx.wake |= self.cancel_grant(c, &mut g, &mut a, why, t)?;
                    }
                    Some(g) if g.state == JobState::Leased => {
                        a.revoke_requested = true;
                        store::update_access(c, &a)?;
                        tracing::info!(access = %id, "access revoked while its grant runs: revoked when the grant settles");
                    }
                    _ => fx.wake |= self.end_access(c, &mut a, t)?,
                },
            }
            Ok(a)
        })?;
        Ok(view(row, None))
    }

    /// The other accesses on `a`'s key that have not ended, on the same Rancher (pinned target).
    fn same_key(&self, c: &Connection, a: &AccessRow) -> Result<Vec<AccessRow>, ControlPlaneError> {
        let spec = self.effective_spec(c, a)?;
        let mut out = Vec::new();
        for o in skip_corrupt(store::live_access_on_key(
            c,
            &a.integration,
            &a.subject,
            &a.role,
            &a.resource,
        )?) {
            if o.id != a.id && same_target(&self.effective_spec(c, &o)?, &spec) {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// The spec `a`'s jobs go to: its pinned one, or (rows from before pinning) the named one.
    pub(super) fn effective_spec(&self, c: &Connection, a: &AccessRow) -> Result<Value, ControlPlaneError> {
        Ok(match &a.integration_spec {
            Some(spec) => spec.clone(),
            None => store::integration(c, &a.integration)?.unwrap_or(Value::Null),
        })
    }

    /// The one place an access that may hold bindings ends (expiry, operator revoke, failed or
    /// cancelled grant): hand its bindings to the holders of its key, or queue its revoke when
    /// it is the last one. Returns true when a job was queued.
    pub(super) fn end_access(
        &self,
        c: &Connection,
        a: &mut AccessRow,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let holders: Vec<AccessRow> = self
            .same_key(c, a)?
            .into_iter()
            .filter(|o| matches!(o.state, AccessState::Active | AccessState::Pending))
            .collect();
        if holders.is_empty() {
            self.queue_revoke(c, a, t)?;
            return Ok(true);
        }
        for mut h in holders {
            merge_ids(&mut h.binding_ids, &a.binding_ids);
            store::update_access(c, &h)?;
            tracing::info!(access = %a.id, holder = %h.id, binding_ids = ?a.binding_ids, "binding kept: still held by access {}", h.id);
        }
        a.state = AccessState::Revoked;
        a.revoked_at = Some(t);
        a.revoke_requested = false;
        store::update_access(c, a)?;
        Ok(false)
    }

    /// Queues the revoke of an access (with what its grant recorded) and moves it to `revoking`.
    fn queue_revoke(&self, c: &Connection, a: &mut AccessRow, t: DateTime<Utc>) -> Result<(), ControlPlaneError> {
        let params = serde_json::to_value(RevokeRequest {
            subject: a.subject.clone(),
            role: a.role.clone(),
            resource: a.resource.clone(),
            grant_id: Some(a.id.clone()),
            user_id: a.user_id.clone(),
            binding_ids: a.binding_ids.clone(),
            all: false,
            owner: None,
            bound_subject: None,
        })
        .map_err(|e| ControlPlaneError::Store {
            message: format!("revoke params do not serialize: {e}"),
        })?;
        let job = Self::new_job(
            JobKind::Revoke,
            &a.integration,
            a.integration_spec.clone(),
            params,
            Some(&a.id),
            t,
        );
        store::insert_job(c, &job)?;
        a.state = AccessState::Revoking;
        a.revoke_job_id = Some(job.id.clone());
        a.revoke_requested = false;
        store::update_access(c, a)?;
        tracing::info!(access = %a.id, job = %job.id, binding_ids = ?a.binding_ids, "revoke queued");
        Ok(())
    }

    /// Fails a grant job that must not run (again) and ends its access: `revoked` at once when
    /// nothing can have been granted (never handed out, no bindings handed over), else cleaned up.
    fn cancel_grant(
        &self,
        c: &Connection,
        job: &mut JobRow,
        a: &mut AccessRow,
        why: String,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let error = cancelled(why);
        job.state = JobState::Failed;
        job.error = Some(error.clone());
        job.lease_token = None;
        job.lease_expires_at = None;
        job.not_before = None;
        job.updated_at = t;
        store::update_job(c, job)?;
        if job.attempt == 0 && a.binding_ids.is_empty() {
            a.state = AccessState::Revoked;
            a.revoked_at = Some(t);
            a.revoke_requested = false;
            store::update_access(c, a)?;
            tracing::info!(access = %a.id, "access cancelled before its grant ran");
            return Ok(false);
        }
        a.last_error = Some(error);
        tracing::info!(access = %a.id, attempt = job.attempt, "grant cancelled after it started: cleaning up");
        self.end_access(c, a, t)
    }

    /// Decides whether a ready grant job may be handed out now, and starts the TTL on its first
    /// hand-out.
    pub(super) fn gate_grant(
        &self,
        c: &Connection,
        fx: &mut Effects,
        job: &mut JobRow,
        t: DateTime<Utc>,
    ) -> Result<GrantGate, ControlPlaneError> {
        let Some(access_id) = job.access_id.clone() else {
            return Ok(GrantGate::HandOut); // a raw grant job: no lifecycle
        };
        let mut a = match store::access(c, &access_id) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(GrantGate::HandOut),
            Err(e) => {
                // Without its access row nothing could track or revoke what the grant makes: do not grant.
                tracing::error!(access = %access_id, error = %e, "a grant's access request cannot be read; failing the grant");
                store::fail_corrupt_job(c, &job.id, &format!("its access request cannot be read: {e}"), t)?;
                return Ok(GrantGate::Cancelled);
            }
        };
        if a.state != AccessState::Pending {
            let why = format!(
                "access request {} is {}; its grant no longer runs",
                a.id,
                a.state.as_str()
            );
            job.state = JobState::Failed;
            job.error = Some(cancelled(why));
            job.lease_token = None;
            job.lease_expires_at = None;
            job.not_before = None;
            job.updated_at = t;
            store::update_job(c, job)?;
            return Ok(GrantGate::Cancelled);
        }
        if a.revoke_requested {
            // Revoked while an agent (now gone) held the grant: clean up, do not grant again.
            let why = format!("access request {} was revoked while its grant was running", a.id);
            fx.wake |= self.cancel_grant(c, job, &mut a, why, t)?;
            return Ok(GrantGate::Cancelled);
        }
        if let Some(expires) = a.expires_at.filter(|e| *e <= t) {
            let why = format!(
                "access request {} expired at {} before its grant could run",
                a.id,
                expires.to_rfc3339()
            );
            fx.wake |= self.cancel_grant(c, job, &mut a, why, t)?;
            return Ok(GrantGate::Cancelled);
        }
        if let Some(other) = self
            .same_key(c, &a)?
            .into_iter()
            .find(|o| o.state == AccessState::Revoking)
        {
            tracing::debug!(access = %a.id, revoking = %other.id, "grant waits: a revoke on the same binding is in flight");
            job.state = JobState::Pending;
            job.lease_token = None;
            job.lease_expires_at = None;
            job.not_before = Some(later(t, REVOKE_IN_FLIGHT_WAIT));
            job.updated_at = t;
            store::update_job(c, job)?;
            return Ok(GrantGate::Deferred);
        }
        let expires = match a.expires_at {
            Some(e) => e,
            None => {
                let e = later(t, std::time::Duration::from_secs(a.ttl_seconds));
                // Whole milliseconds, as stored: every attempt marks exactly what the access says.
                let e = DateTime::from_timestamp_millis(e.timestamp_millis()).unwrap_or(e);
                a.expires_at = Some(e);
                store::update_access(c, &a)?;
                e
            }
        };
        if let Value::Object(params) = &mut job.params {
            params.insert("grant_id".into(), Value::String(a.id.clone()));
            params.insert("expires_at".into(), serde_json::json!(expires));
        }
        Ok(GrantGate::HandOut)
    }

    /// Grant done: `active` (or ended at once if a revoke was asked meanwhile). The expiry set at
    /// the first hand-out stays. Returns true when a job was queued.
    pub(super) fn on_grant_succeeded(
        &self,
        c: &Connection,
        a: &mut AccessRow,
        result: Option<&Value>,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        if a.state != AccessState::Pending {
            tracing::warn!(access = %a.id, state = a.state.as_str(), "grant completed for an access that is no longer pending");
            return Ok(false);
        }
        let empty = Value::Null;
        let result = result.unwrap_or(&empty);
        a.user_id = result.get("user_id").and_then(Value::as_str).map(str::to_string);
        // Keep ids handed over by accesses on the same key that ended while this one was pending.
        merge_ids(&mut a.binding_ids, &string_list(result.get("binding_ids")));
        a.access_details = result.get("access_details").and_then(Value::as_str).map(str::to_string);
        a.pre_existing = result.get("pre_existing").and_then(Value::as_bool).unwrap_or(false);
        a.granted_at = Some(t);
        if a.expires_at.is_none() {
            // A grant handed out by an older build: its TTL starts now.
            a.expires_at = Some(later(t, std::time::Duration::from_secs(a.ttl_seconds)));
        }
        a.last_error = None;
        let flag = |k: &str| result.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(user_id) = a.user_id.clone() {
            self.track_granted_user(c, a, &user_id, flag("created_user") || flag("managed_user"), t)?;
        }
        if a.revoke_requested {
            tracing::info!(access = %a.id, "granted, but revoked meanwhile");
            return self.end_access(c, a, t);
        }
        a.state = AccessState::Active;
        store::update_access(c, a)?;
        tracing::info!(access = %a.id, expires_at = %a.expires_at.map(|e| e.to_rfc3339()).unwrap_or_default(), pre_existing = a.pre_existing, "access active");
        Ok(false)
    }

    /// Grant attempt failed. `retry`: the job was requeued. A grant that will not run again (for
    /// good, out of attempts, or revoked meanwhile) is cleaned up. Returns true when a job was queued.
    pub(super) fn on_grant_failed(
        &self,
        c: &Connection,
        job: &mut JobRow,
        a: &mut AccessRow,
        error: &JobError,
        retry: bool,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        if a.state != AccessState::Pending {
            return Ok(false);
        }
        a.last_error = Some(error.clone());
        if retry && !a.revoke_requested {
            store::update_access(c, a)?;
            return Ok(false);
        }
        // Revoked while this attempt ran, or no attempt left: stop granting, clean up what an
        // attempt may have made.
        job.state = JobState::Failed;
        job.not_before = None;
        tracing::warn!(access = %a.id, code = %error.code, revoke_requested = a.revoke_requested, "grant will not run again: cleaning up");
        self.end_access(c, a, t)
    }

    /// Revoke done: `revoked`. After a cleanup (the access was never granted), `last_error` keeps
    /// the grant's error. Tracks a user the connector created and schedules its cleanup when
    /// this was its last access.
    pub(super) fn on_revoke_succeeded(
        &self,
        c: &Connection,
        a: &mut AccessRow,
        result: Option<&Value>,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        a.state = AccessState::Revoked;
        a.revoked_at = Some(t);
        a.last_error = if a.granted_at.is_none() {
            store::job(c, &a.grant_job_id)?.and_then(|g| g.error)
        } else {
            None
        };
        store::update_access(c, a)?;
        tracing::info!(access = %a.id, "access revoked");
        let reported = result.and_then(|r| r.get("user_id")).and_then(Value::as_str);
        let Some(user_id) = a.user_id.clone().or(reported.map(str::to_string)) else {
            return Ok(());
        };
        let managed = result
            .and_then(|r| r.get("managed_user"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if managed {
            Self::ensure_tracked(c, &a.integration, &user_id)?;
        }
        self.schedule_cleanup_if_last(c, a, &user_id, t)
    }

    /// Revoke attempt failed: it is retried forever; the operator sees why in `last_error`.
    pub(super) fn on_revoke_failed(
        &self,
        c: &Connection,
        a: &mut AccessRow,
        error: &JobError,
    ) -> Result<(), ControlPlaneError> {
        if a.state == AccessState::Revoking {
            a.last_error = Some(error.clone());
            store::update_access(c, a)?;
        }
        Ok(())
    }

    /// Scheduler step: ends every active access whose TTL has passed.
    pub(super) fn expire_due(&self, t: DateTime<Utc>) -> Result<(), ControlPlaneError> {
        let expired = skip_corrupt(store::expired_access(&self.store.lock(), t)?);
        for a in expired {
            let r = self.write(|c, fx| {
                // Re-read inside the transaction: it may have changed since.
                let Some(mut a) = store::access(c, &a.id)? else {
                    return Ok(());
                };
                if a.state == AccessState::Active && a.expires_at.is_some_and(|e| e <= t) {
                    tracing::info!(access = %a.id, "access expired");
                    fx.wake |= self.end_access(c, &mut a, t)?;
                }
                Ok(())
            });
            if let Err(e) = r {
                tracing::error!(access = %a.id, error = %e, "could not end an expired access; retrying next tick");
            }
        }
        Ok(())
    }
}
