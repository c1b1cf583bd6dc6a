//! The access lifecycle: why a binding is granted, kept, handed over, repaired or removed, in one
//! place.
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
//!   CA in the config reaches old accesses too. Accesses from before pinning are pinned by the
//!   schema v3 migration.
//! - **Owner.** Every grant, revoke and sweep carries the control plane's owner
//!   (`connector/install`); an access records the owner its grant ran under, and its revoke and
//!   repairs act for that owner, so the bindings it made stay provably its own.
//! - **Overlap** ([`share_binding`]). Two accesses share a binding when they are on the same
//!   Rancher (host and port, whatever the integration's name), with the same role and resource and
//!   the same subject key: the Rancher object the grant bound (`bound_subject`), or one derived
//!   from the subject where that is possible, or the same subject string. When one ends while
//!   another sharing its binding is `active` or `pending` (a holder), no revoke is queued: its
//!   binding ids are merged into each holder's, and it is `revoked` at once ("binding kept: still
//!   held by access X"). Only the last one revokes, with every id handed to it. A grant whose
//!   binding has a revoke in flight waits (1 s steps) until that revoke settles, so a new grant
//!   never races an old revoke.
//! - **Fail closed.** A revoke carries what the grant recorded (`grant_id`, `binding_ids`, the
//!   `bound_subject`, and `user_id` only when it is a Rancher user id: a group's principal is
//!   not one), refreshed from the access when it is handed out, so revokes queued by an older
//!   build carry it too. A grant that fails for good, runs out of attempts, is cancelled after it
//!   started, or whose expiry passed before it ran, is cleaned up by a revoke (the agent then also
//!   removes the connector's marked bindings of that grant id); the access ends `revoked` with the
//!   grant's error in `last_error`. A revoke asked for while the grant runs is carried out when the
//!   grant settles, whichever way it settles. A revoke that completes while the access lists
//!   bindings it did not carry (recorded since it was handed out) is followed by another.
//! - **Repair** (queued by the reconcile, see `reconcile`). A grant job of an `active` access is a
//!   repair: it runs with the access's expiry (no new TTL) and `keep_password`; its result's ids
//!   are merged into the access's. One that fails for good leaves the access `active` with
//!   `last_error`; one that runs after the access ended has what it made revoked (or handed to a
//!   holder).
//! - **Passwords.** A `create_user` grant for a user who already holds a live access on the same
//!   Rancher runs with `keep_password`: that access's password stays valid, no new one is made,
//!   and the access's `note` says so.

#[cfg(test)]
mod tests;

use crate::control_plane::store::Db;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::registry::{same_target, target};
use super::{Effects, EmbeddedControlPlane, bad_request, later, now, skip_corrupt, view};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef, JobState};
use crate::control_plane::protocol::{JobError, JobKind};
use crate::control_plane::store::{self, AccessRow, IntegrationSource, JobRow};
use crate::integrations::{BoundSubject, GrantRequest, Owner, RevokeRequest};

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
pub(super) fn merge_ids(into: &mut Vec<String>, ids: &[String]) {
    for id in ids {
        if !into.contains(id) {
            into.push(id.clone());
        }
    }
}

pub(super) fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// `a` and `b` name one Rancher subject: the same subject string, or the same subject key.
fn same_subject(a: &AccessRow, b: &AccessRow) -> bool {
    a.subject == b.subject || a.subject_key().is_some_and(|k| b.subject_key().as_ref() == Some(&k))
}

/// `a` (on `spec_a`) and `b` (on `spec_b`) are on one Rancher: the same host and port, whatever
/// the integration's name. Specs that name no host (unregistered) match only by name.
fn same_rancher(a: &AccessRow, spec_a: &Value, b: &AccessRow, spec_b: &Value) -> bool {
    let known = target(spec_a).0.is_some() && target(spec_b).0.is_some();
    same_target(spec_a, spec_b) && (known || a.integration == b.integration)
}

/// The overlap rule: `a` and `b` (with the specs their jobs go to) share one binding in Rancher:
/// same Rancher, role, resource and subject (see the module docs).
pub(super) fn share_binding(a: &AccessRow, spec_a: &Value, b: &AccessRow, spec_b: &Value) -> bool {
    a.role == b.role && a.resource == b.resource && same_rancher(a, spec_a, b, spec_b) && same_subject(a, b)
}

/// A new access request as stored: `pending`, its grant `grant_job_id` queued, pinned to `spec`.
pub(super) fn pending_row(
    id: String,
    integration: &str,
    request: AccessRequestCreate,
    grant_job_id: String,
    spec: Value,
    t: DateTime<Utc>,
) -> AccessRow {
    AccessRow {
        id,
        integration: integration.to_string(),
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
        grant_job_id,
        revoke_job_id: None,
        user_id: None,
        binding_ids: Vec::new(),
        access_details: None,
        last_error: None,
        revoke_requested: false,
        integration_spec: Some(spec),
        pre_existing: false,
        bound_subject: None,
        owner: None,
        note: None,
    }
}

/// Fails a job that must not run (again), clearing its lease.
fn fail_job(job: &mut JobRow, error: JobError, t: DateTime<Utc>) {
    job.state = JobState::Failed;
    job.error = Some(error);
    job.lease_token = None;
    job.lease_expires_at = None;
    job.not_before = None;
    job.updated_at = t;
}

/// Puts a grant back for a short wait (a revoke of its binding is in flight).
fn defer_grant(c: &dyn Db, job: &mut JobRow, t: DateTime<Utc>) -> Result<GrantGate, ControlPlaneError> {
    job.state = JobState::Pending;
    job.lease_token = None;
    job.lease_expires_at = None;
    job.not_before = Some(later(t, REVOKE_IN_FLIGHT_WAIT));
    job.updated_at = t;
    store::update_job(c, job)?;
    Ok(GrantGate::Deferred)
}

/// Writes what every hand-out of `a`'s grant carries into its params.
fn fill_grant_params(job: &mut JobRow, a: &AccessRow, expires: DateTime<Utc>, owner: &Owner, keep_password: bool) {
    if let Value::Object(params) = &mut job.params {
        params.insert("grant_id".into(), Value::String(a.id.clone()));
        params.insert("expires_at".into(), serde_json::json!(expires));
        params.insert("owner".into(), Value::String(owner.to_string()));
        if keep_password {
            params.insert("keep_password".into(), Value::Bool(true));
        } else {
            params.remove("keep_password");
        }
    }
}

/// A grant result's `bound_subject`, when it has a readable one.
fn bound_subject_of(result: &Value) -> Option<BoundSubject> {
    result
        .get("bound_subject")
        .filter(|v| !v.is_null())
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Accesses ended per transaction when many expire at once.
const EXPIRE_CHUNK: usize = 100;

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
            let row = pending_row(id.clone(), &name, request, grant.id.clone(), spec, t);
            store::insert_job(c, &grant)?;
            store::insert_access(c, &row)?;
            fx.wake = true;
            tracing::info!(access = %id, integration = %name, subject = %row.subject, role = %row.role, resource = %row.resource, ttl_s = row.ttl_seconds, "access requested");
            Ok(view(row, None))
        })
    }

    /// One access request. One-time credentials (from its grant or a rotation) are included in
    /// the first read after they arrived, and then forgotten; on a shared state the first read on
    /// any replica (see `credentials`).
    ///
    /// # Errors
    /// `Store` when the row cannot be read.
    pub fn access(&self, id: &str) -> Result<Option<AccessRequest>, ControlPlaneError> {
        #[cfg(feature = "store-postgres")]
        if let Some(sealer) = &self.sealer {
            return self.access_sealed(sealer, id);
        }
        let conn = self.store.lock()?;
        let Some(row) = store::access(&*conn, id)? else {
            return Ok(None);
        };
        let creds = self.credentials_map().remove(id);
        drop(conn);
        Ok(Some(view(row, creds)))
    }

    /// Every access request, in the order stored (without credentials; the operator API answers
    /// in id order: see the server's `list_answer`). A corrupt row is logged and left out.
    ///
    /// # Errors
    /// `Store` when the table cannot be read.
    pub fn list_access(&self) -> Result<Vec<AccessRequest>, ControlPlaneError> {
        let rows = store::list_access(&*self.store.lock()?)?;
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

    /// The other accesses that have not ended and share `a`'s binding ([`share_binding`]).
    fn overlapping(&self, c: &dyn Db, a: &AccessRow) -> Result<Vec<AccessRow>, ControlPlaneError> {
        let candidates = skip_corrupt(store::live_access_naming(c, Some((&a.role, &a.resource)), a)?);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let spec = self.effective_spec(c, a)?;
        let mut out = Vec::new();
        for o in candidates {
            if share_binding(a, &spec, &o, &self.effective_spec(c, &o)?) {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Another access of `a`'s user on `a`'s Rancher whose password is live: `active`, or granted
    /// and still being revoked. A `create_user` grant for `a` then keeps that password.
    pub(super) fn credentials_holder(&self, c: &dyn Db, a: &AccessRow) -> Result<Option<AccessRow>, ControlPlaneError> {
        let mut spec = None;
        for o in skip_corrupt(store::live_access_naming(c, None, a)?) {
            let live = o.state == AccessState::Active || (o.state == AccessState::Revoking && o.granted_at.is_some());
            if !live || !same_subject(a, &o) {
                continue;
            }
            let spec = match &spec {
                Some(s) => s,
                None => spec.insert(self.effective_spec(c, a)?),
            };
            if same_rancher(a, spec, &o, &self.effective_spec(c, &o)?) {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// The spec `a`'s jobs go to: its pinned one, or (rows from before pinning) the named one.
    pub(super) fn effective_spec(&self, c: &dyn Db, a: &AccessRow) -> Result<Value, ControlPlaneError> {
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
        c: &dyn Db,
        a: &mut AccessRow,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let holders: Vec<AccessRow> = self
            .overlapping(c, a)?
            .into_iter()
            .filter(|o| matches!(o.state, AccessState::Active | AccessState::Pending))
            .collect();
        self.end_access_held_by(c, a, holders, t)
    }

    /// [`end_access`](Self::end_access) once its holders (the accesses that keep its binding) are
    /// known.
    fn end_access_held_by(
        &self,
        c: &dyn Db,
        a: &mut AccessRow,
        holders: Vec<AccessRow>,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
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

    /// The params of `a`'s revoke: what its grant recorded, plus `extra_ids` (ids a revoke job
    /// already carried).
    fn revoke_params(&self, a: &AccessRow, extra_ids: &[String]) -> Result<Value, ControlPlaneError> {
        let mut binding_ids = a.binding_ids.clone();
        merge_ids(&mut binding_ids, extra_ids);
        serde_json::to_value(RevokeRequest {
            subject: a.subject.clone(),
            role: a.role.clone(),
            resource: a.resource.clone(),
            grant_id: Some(a.id.clone()),
            user_id: a.rancher_user_id(),
            binding_ids,
            all: false,
            owner: Some(a.owner.clone().unwrap_or_else(|| self.owner.clone())),
            bound_subject: a.bound_subject.clone(),
        })
        .map_err(|e| ControlPlaneError::Store {
            message: format!("revoke params do not serialize: {e}"),
        })
    }

    /// At hand-out of a revoke that serves an access: its params are made again from the access
    /// (lifecycle review D3a: revokes queued by an older build carry no ids, no user id, no grant
    /// id), keeping any id they carried. A stored `user_id` that is not a Rancher user id (a
    /// group's principal, recorded by older builds) is dropped, so a revoke stuck as
    /// `malformed_job` on it recovers.
    pub(super) fn refresh_revoke(&self, c: &dyn Db, job: &mut JobRow) -> Result<(), ControlPlaneError> {
        let Some(access_id) = job.access_id.clone() else {
            return Ok(()); // a raw revoke: sent as its creator gave it
        };
        let mut a = match store::access(c, &access_id) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(access = %access_id, error = %e, "a revoke's access request cannot be read; its params are sent as queued");
                return Ok(());
            }
        };
        if a.user_id.as_deref().is_some_and(|u| !store::is_user_id(u)) {
            tracing::info!(access = %a.id, "the recorded user id is not a Rancher user id (a principal); the revoke goes without it");
            a.user_id = None;
            store::update_access(c, &a)?;
        }
        let carried = string_list(job.params.get("binding_ids"));
        job.params = self.revoke_params(&a, &carried)?;
        Ok(())
    }

    /// Queues the revoke of an access (with what its grant recorded) and moves it to `revoking`.
    fn queue_revoke(&self, c: &dyn Db, a: &mut AccessRow, t: DateTime<Utc>) -> Result<(), ControlPlaneError> {
        let params = self.revoke_params(a, &[])?;
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
        c: &dyn Db,
        job: &mut JobRow,
        a: &mut AccessRow,
        why: String,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let error = cancelled(why);
        fail_job(job, error.clone(), t);
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
    /// hand-out. A grant job of an `active` access is a repair (see [`Self::gate_repair`]).
    pub(super) fn gate_grant(
        &self,
        c: &dyn Db,
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
        if job.id != a.grant_job_id {
            return self.gate_repair(c, fx, job, &mut a, t);
        }
        if a.state != AccessState::Pending {
            let why = format!(
                "access request {} is {}; its grant no longer runs",
                a.id,
                a.state.as_str()
            );
            fail_job(job, cancelled(why), t);
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
        if self.revoke_in_flight(c, &a)? {
            return defer_grant(c, job, t);
        }
        let expires = match a.expires_at {
            Some(e) => e,
            // `t` is whole milliseconds, as stored: every attempt marks exactly what the access says.
            None => later(t, std::time::Duration::from_secs(a.ttl_seconds)),
        };
        let owner = a.owner.clone().unwrap_or_else(|| self.owner.clone());
        if a.expires_at != Some(expires) || a.owner.as_ref() != Some(&owner) {
            if a.expires_at != Some(expires) {
                fx.reschedule = Some(fx.reschedule.map_or(expires, |r| r.min(expires)));
            }
            a.expires_at = Some(expires);
            a.owner = Some(owner.clone());
            store::update_access(c, &a)?;
        }
        // Lifecycle review D9: a new password would lock out the holder of a live access.
        let keep_password = a.create_user && self.credentials_holder(c, &a)?.is_some();
        fill_grant_params(job, &a, expires, &owner, keep_password);
        Ok(GrantGate::HandOut)
    }

    /// A revoke of `a`'s binding is in flight (an access sharing it is `revoking`): a grant of `a`
    /// waits, so it never races that revoke.
    fn revoke_in_flight(&self, c: &dyn Db, a: &AccessRow) -> Result<bool, ControlPlaneError> {
        let revoking = self
            .overlapping(c, a)?
            .into_iter()
            .find(|o| o.state == AccessState::Revoking);
        if let Some(other) = &revoking {
            tracing::debug!(access = %a.id, revoking = %other.id, "grant waits: a revoke on the same binding is in flight");
        }
        Ok(revoking.is_some())
    }

    /// A repair grant (queued by the reconcile) runs while its access is `active` and unexpired,
    /// with the access's expiry (no new TTL), its owner, and `keep_password`. Otherwise it is
    /// cancelled, and if an earlier attempt ran, what it may have made is cleaned up.
    fn gate_repair(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        job: &mut JobRow,
        a: &mut AccessRow,
        t: DateTime<Utc>,
    ) -> Result<GrantGate, ControlPlaneError> {
        let expires = a.expires_at.filter(|e| *e > t);
        let (AccessState::Active, Some(expires)) = (a.state, expires) else {
            let why = format!(
                "access request {} is {}; its repair no longer runs",
                a.id,
                if a.state == AccessState::Active {
                    "expired"
                } else {
                    a.state.as_str()
                }
            );
            fail_job(job, cancelled(why), t);
            store::update_job(c, job)?;
            // An active access that expired is revoked by the scheduler, with its grant id.
            if job.attempt > 0 && a.state != AccessState::Active {
                fx.wake |= self.after_end_grant(c, a, &[], t)?;
            }
            return Ok(GrantGate::Cancelled);
        };
        if self.revoke_in_flight(c, a)? {
            return defer_grant(c, job, t);
        }
        let owner = a.owner.clone().unwrap_or_else(|| self.owner.clone());
        fill_grant_params(job, a, expires, &owner, true);
        Ok(GrantGate::HandOut)
    }

    /// A grant of `a` ran (or may have) after `a` ended: what it made (`made`, and the
    /// connector's marked bindings of its grant id) goes. While `a`'s revoke is in flight the ids
    /// join it (refreshed at its hand-out, or a further revoke when it completes without them);
    /// after `a` ended they are handed to a holder of the binding, or revoked. Returns true when a
    /// job was queued.
    fn after_end_grant(
        &self,
        c: &dyn Db,
        a: &mut AccessRow,
        made: &[String],
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        match a.state {
            AccessState::Pending | AccessState::Active => Ok(false),
            AccessState::Revoking => {
                merge_ids(&mut a.binding_ids, made);
                store::update_access(c, a)?;
                Ok(false)
            }
            AccessState::Revoked | AccessState::Failed => {
                tracing::info!(access = %a.id, binding_ids = ?made, "a grant of the access ran after it ended: removing what it made");
                // The earlier ids were revoked or handed over already.
                a.binding_ids = made.to_vec();
                self.end_access(c, a, t)
            }
        }
    }

    /// Grant done. The access's first grant makes it `active` (or ends it at once if a revoke was
    /// asked meanwhile); the expiry set at the first hand-out stays. A grant of an `active` access
    /// is a repair; one of an access that has ended is cleaned up. Returns true when a job was
    /// queued.
    pub(super) fn on_grant_succeeded(
        &self,
        c: &dyn Db,
        job: &JobRow,
        a: &mut AccessRow,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let empty = Value::Null;
        let result = job.result.as_ref().unwrap_or(&empty);
        let made = string_list(result.get("binding_ids"));
        match a.state {
            AccessState::Pending if job.id == a.grant_job_id => {}
            AccessState::Active => {
                self.record_grant(c, a, result, t)?;
                store::update_access(c, a)?;
                tracing::info!(access = %a.id, binding_ids = ?a.binding_ids, pre_existing = a.pre_existing, "access {} repaired", a.id);
                return Ok(false);
            }
            AccessState::Pending => {
                // Not its grant job: keep what it made with the access, which its revoke removes.
                merge_ids(&mut a.binding_ids, &made);
                store::update_access(c, a)?;
                tracing::warn!(access = %a.id, job = %job.id, "a second grant completed for a pending access; its bindings are kept with the access");
                return Ok(false);
            }
            _ => return self.after_end_grant(c, a, &made, t),
        }
        a.user_id = None;
        a.bound_subject = None;
        self.record_grant(c, a, result, t)?;
        a.granted_at = Some(t);
        if a.expires_at.is_none() {
            // A grant handed out by an older build: its TTL starts now.
            a.expires_at = Some(later(t, std::time::Duration::from_secs(a.ttl_seconds)));
        }
        if let Some(note) = result.get("note").and_then(Value::as_str) {
            let holder = self.credentials_holder(c, a)?;
            a.note = Some(match holder {
                Some(h) => format!("{note} (the password handed out with access {} stays valid)", h.id),
                None => note.to_string(),
            });
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

    /// What a grant's `result` says about `a`: its ids are merged into the access's (ids handed
    /// over by accesses that ended while it was pending, or held before a repair, stay); the user
    /// id is kept only when it is a Rancher user id (lifecycle review D1); the bound subject,
    /// `pre_existing` and details follow the result. Tracks a user the connector created.
    fn record_grant(
        &self,
        c: &dyn Db,
        a: &mut AccessRow,
        result: &Value,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        if let Some(user_id) = result
            .get("user_id")
            .and_then(Value::as_str)
            .filter(|u| store::is_user_id(u))
        {
            a.user_id = Some(user_id.to_string());
        }
        if let Some(bound) = bound_subject_of(result) {
            a.bound_subject = Some(bound);
        }
        merge_ids(&mut a.binding_ids, &string_list(result.get("binding_ids")));
        if let Some(details) = result.get("access_details").and_then(Value::as_str) {
            a.access_details = Some(details.to_string());
        }
        a.pre_existing = result.get("pre_existing").and_then(Value::as_bool).unwrap_or(false);
        a.last_error = None;
        let flag = |k: &str| result.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(user_id) = a.user_id.clone() {
            self.track_granted_user(c, a, &user_id, flag("created_user") || flag("managed_user"), t)?;
        }
        Ok(())
    }

    /// Grant attempt failed. `retry`: the job was requeued. A first grant that will not run again
    /// (for good, out of attempts, or revoked meanwhile) is cleaned up. A repair that failed for
    /// good leaves the access `active` with `last_error` (the next reconcile tries again); one
    /// whose access ended is cleaned up. Returns true when a job was queued.
    pub(super) fn on_grant_failed(
        &self,
        c: &dyn Db,
        job: &mut JobRow,
        a: &mut AccessRow,
        error: &JobError,
        retry: bool,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        match a.state {
            AccessState::Pending => {}
            AccessState::Active => {
                a.last_error = Some(error.clone());
                store::update_access(c, a)?;
                if !retry {
                    tracing::warn!(access = %a.id, code = %error.code, "repair of access {} failed for good; the next reconcile tries again", a.id);
                }
                return Ok(false);
            }
            // A requeued attempt is cancelled at its hand-out, which cleans up then.
            _ if retry => return Ok(false),
            _ => return self.after_end_grant(c, a, &[], t),
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

    /// Revoke done: `revoked`, unless the access lists bindings the revoke neither carried nor
    /// removed (recorded after it was handed out): then another revoke goes. After a cleanup (the
    /// access was never granted), `last_error` keeps the grant's error. Tracks a user the
    /// connector created and schedules its cleanup when this was its last access. A removed
    /// binding that another `active` access lists (a race took its binding) has that access
    /// repaired. Returns true when a job was queued.
    pub(super) fn on_revoke_succeeded(
        &self,
        c: &dyn Db,
        job: &JobRow,
        a: &mut AccessRow,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let result = job.result.as_ref();
        let removed = string_list(result.and_then(|r| r.get("removed_binding_ids")));
        let carried = string_list(job.params.get("binding_ids"));
        let spec = self.effective_spec(c, a)?;
        let queued = self.repair_holders_of(c, &spec, &removed, Some(&a.id), t)?;
        let left: Vec<String> = a
            .binding_ids
            .iter()
            .filter(|id| !carried.contains(id) && !removed.contains(id))
            .cloned()
            .collect();
        if a.state == AccessState::Revoking && !left.is_empty() {
            tracing::info!(access = %a.id, binding_ids = ?left, "revoked, but the access recorded bindings since: revoking those too");
            self.queue_revoke(c, a, t)?;
            return Ok(true);
        }
        a.state = AccessState::Revoked;
        a.revoked_at = Some(t);
        a.last_error = if a.granted_at.is_none() {
            store::job(c, &a.grant_job_id)?.and_then(|g| g.error)
        } else {
            None
        };
        store::update_access(c, a)?;
        tracing::info!(access = %a.id, "access revoked");
        let reported = result
            .and_then(|r| r.get("user_id"))
            .and_then(Value::as_str)
            .filter(|u| store::is_user_id(u));
        let Some(user_id) = a.rancher_user_id().or(reported.map(str::to_string)) else {
            return Ok(queued);
        };
        let managed = result
            .and_then(|r| r.get("managed_user"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if managed {
            Self::ensure_tracked(c, &a.integration, &user_id)?;
        }
        self.schedule_cleanup_if_last(c, a, &user_id, t)?;
        Ok(queued)
    }

    /// Revoke attempt failed: it is retried forever; the operator sees why in `last_error`.
    pub(super) fn on_revoke_failed(
        &self,
        c: &dyn Db,
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
        let expired = skip_corrupt(store::expired_access(&*self.store.lock()?, t)?);
        // A mass expiry (a shift's end) ends in a few transactions, not one per access; a chunk
        // that fails is retried one access at a time, so one bad row holds back no other.
        for chunk in expired.chunks(EXPIRE_CHUNK) {
            let together = self.write(|c, fx| self.expire_chunk(c, fx, chunk, t));
            if together.is_ok() {
                continue;
            }
            for a in chunk {
                if let Err(e) = self.write(|c, fx| self.end_if_expired(c, fx, &a.id, t)) {
                    tracing::error!(access = %a.id, error = %e, "could not end an expired access; retrying next tick");
                }
            }
        }
        Ok(())
    }

    /// Ends the accesses of `chunk` (listed before the transaction) that are still active and due.
    ///
    /// One query reads back the chunk and every live access naming the subject of one of them.
    /// An access nobody else names (the usual case) is ended from that row, with no holders: in
    /// this transaction (which excludes every other writer) only ending an access changes another
    /// one, handing its bindings to a holder that names its subject, so the row stays current
    /// while the chunk is worked through. The others are read again one by one, as alone.
    fn expire_chunk(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        chunk: &[AccessRow],
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let Ok(live) = store::live_access_naming_any(c, chunk)?
            .into_iter()
            .collect::<Result<Vec<AccessRow>, _>>()
        else {
            // A row that cannot be read may name anyone.
            for a in chunk {
                self.end_if_expired(c, fx, &a.id, t)?;
            }
            return Ok(());
        };
        for listed in chunk {
            let Some(current) = live.iter().find(|o| o.id == listed.id) else {
                // Ended since it was listed, as a rule; read by id all the same, so that no
                // mismatch between the lookup and the row can leave an expired access active.
                self.end_if_expired(c, fx, &listed.id, t)?;
                continue;
            };
            let key = current.subject_key();
            let alone = key == listed.subject_key()
                && !live.iter().any(|o| {
                    o.id != current.id
                        && (o.subject.as_str() == current.subject.as_str() || (key.is_some() && o.subject_key() == key))
                });
            if !alone {
                self.end_if_expired(c, fx, &listed.id, t)?;
            } else if is_due(current, t) {
                let mut a = current.clone();
                tracing::info!(access = %a.id, "access expired");
                fx.wake |= self.end_access_held_by(c, &mut a, Vec::new(), t)?;
            }
        }
        Ok(())
    }

    /// Ends access `id` if it is still active and its time has come (re-read inside the
    /// transaction: it may have changed since it was listed).
    fn end_if_expired(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        id: &str,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let Some(mut a) = store::access(c, id)? else {
            return Ok(());
        };
        if is_due(&a, t) {
            tracing::info!(access = %a.id, "access expired");
            fx.wake |= self.end_access(c, &mut a, t)?;
        }
        Ok(())
    }
}

/// Whether `a` is active and its time has come: what a scheduler pass ends.
fn is_due(a: &AccessRow, t: DateTime<Utc>) -> bool {
    a.state == AccessState::Active && a.expires_at.is_some_and(|e| e <= t)
}
