//! The reconcile: at start and every `Options::sweep_interval`, one `sweep` job per Rancher (host,
//! port) compares what Rancher holds with what the accesses say. The agent's integration does the
//! Rancher side (`integrations::rancher::sweep`): it removes this owner's bindings that are expired
//! or that no access claims, moves expiry annotations, and reports the active accesses whose
//! binding is gone. This module is the control plane's side: what each sweep carries, and what
//! its result makes the control plane do. Jobs are edge-triggered (a grant at request, a revoke at
//! expiry); this level-triggered pass is what keeps the promise when an edge is lost.
//!
//! | case | what the control plane does |
//! |---|---|
//! | a Rancher (a registered integration, or the pinned Rancher of an access that has not ended) with no sweep open | one `sweep` job for it, whatever the integrations that point there are named |
//! | a sweep is handed out | its params are made again: `owner`, `keep_binding_ids` (every id an access that has not ended on that Rancher holds, added to those it carried) and `accesses` (a `HeldAccess` for each such access of this owner, or from before owners) |
//! | the result names a `missing` access that is `active` and has no repair open | a repair grant is queued (the access's grant, with its expiry, owner and `keep_password`), logged "repairing access X: reason" and counted (`apono_connector_access_repairs_total`) |
//! | a `missing` access that already has a repair open | nothing: one repair at a time |
//! | a `missing` access that is no longer `active` | nothing: it ended, and its revoke removes what is left |
//! | the result removed a binding that an `active` access lists (a race took it) | that access is repaired |
//! | the result removed bindings | counted by reason (`apono_connector_swept_bindings_total`) |
//! | Rancher's clock (`rancher_time`) is more than a minute from this host's | a warning: expiry in Rancher is judged on Rancher's clock |
//!
//! How a repair completes, fails or outlives its access is in `access` (the access lifecycle).

#[cfg(test)]
mod tests;

use crate::control_plane::store::Db;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::access::merge_ids;
use super::registry::same_target;
use super::{EmbeddedControlPlane, now, skip_corrupt};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::operator::AccessState;
use crate::control_plane::protocol::JobKind;
use crate::control_plane::store::{self, AccessRow, JobRow};
use crate::integrations::{GrantRequest, HeldAccess, HeldState, SweepRequest, SweepResult, SweptReason};
use crate::telemetry::metrics;

/// How far Rancher's clock may be from this host's before the reconcile warns.
const CLOCK_SKEW_WARNING: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

fn params_error(what: &str, e: serde_json::Error) -> ControlPlaneError {
    ControlPlaneError::Store {
        message: format!("{what} params do not serialize: {e}"),
    }
}

/// `a` as the reconcile sees it (`None` once it has ended).
fn held(a: &AccessRow) -> Option<HeldAccess> {
    let state = match a.state {
        AccessState::Pending => HeldState::Pending,
        AccessState::Active => HeldState::Active,
        AccessState::Revoking => HeldState::Revoking,
        AccessState::Revoked | AccessState::Failed => return None,
    };
    Some(HeldAccess {
        grant_id: a.id.clone(),
        subject: a.subject.clone(),
        role: a.role.clone(),
        resource: a.resource.clone(),
        state,
        user_id: a.rancher_user_id(),
        bound_subject: a.bound_subject.clone(),
        binding_ids: a.binding_ids.clone(),
        expires_at: a.expires_at,
        pre_existing: a.pre_existing,
    })
}

fn reason_label(reason: SweptReason) -> &'static str {
    match reason {
        SweptReason::Expired => "expired",
        SweptReason::Unclaimed => "unclaimed",
    }
}

impl EmbeddedControlPlane {
    /// Queues one sweep job per Rancher (see the module docs), except for those that still have
    /// a sweep pending or leased. Returns the ids of the jobs queued.
    ///
    /// # Errors
    /// `Store` when the state cannot be read or written.
    pub fn queue_sweeps(&self) -> Result<Vec<String>, ControlPlaneError> {
        self.write(|c, fx| {
            let t = now();
            let open: Vec<Value> = skip_corrupt(store::open_sweeps(c)?)
                .into_iter()
                .filter_map(|j| j.integration)
                .collect();
            let mut queued = Vec::new();
            for (name, spec) in Self::sweep_targets(c)? {
                if open.iter().any(|s| same_target(s, &spec)) {
                    tracing::debug!(integration = %name, "a sweep is still pending or running; not queueing another");
                    continue;
                }
                let params = serde_json::to_value(SweepRequest {
                    keep_binding_ids: self.keep_binding_ids(c, &spec)?,
                    owner: Some(self.owner.clone()),
                    accesses: Some(self.held_accesses(c, &spec)?),
                    ..SweepRequest::default()
                })
                .map_err(|e| params_error("sweep", e))?;
                let job = Self::new_job(JobKind::Sweep, &name, Some(spec), params, None, t);
                store::insert_job(c, &job)?;
                tracing::info!(integration = %name, job = %job.id, "sweep queued");
                queued.push(job.id);
            }
            fx.wake |= !queued.is_empty();
            Ok(queued)
        })
    }

    /// `(name, spec)` per Rancher to sweep: the registered integrations, then the pinned specs of
    /// accesses that have not ended where their Rancher is not one of those. Integrations that
    /// point at one Rancher share its sweep (the first by name): a binding is the owner's
    /// whichever name granted it, so two sweeps of one Rancher would only repeat each other.
    fn sweep_targets(c: &dyn Db) -> Result<Vec<(String, Value)>, ControlPlaneError> {
        let mut targets: Vec<(String, Value)> = Vec::new();
        let mut add = |name: String, spec: Value| {
            if !targets.iter().any(|(_, s)| same_target(s, &spec)) {
                targets.push((name, spec));
            }
        };
        for name in store::integration_names(c)? {
            if let Some(spec) = store::integration(c, &name)? {
                add(name, spec);
            }
        }
        for a in skip_corrupt(store::live_access(c)?) {
            if let Some(spec) = a.integration_spec {
                add(a.integration, spec);
            }
        }
        Ok(targets)
    }

    /// The accesses that have not ended on `spec`'s Rancher, whatever their integration's name.
    fn live_on(&self, c: &dyn Db, spec: &Value) -> Result<Vec<AccessRow>, ControlPlaneError> {
        let mut out = Vec::new();
        for a in skip_corrupt(store::live_access(c)?) {
            if same_target(&self.effective_spec(c, &a)?, spec) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Binding ids held by accesses that have not ended on `spec`'s Rancher.
    fn keep_binding_ids(&self, c: &dyn Db, spec: &Value) -> Result<Vec<String>, ControlPlaneError> {
        let mut ids: Vec<String> = self.live_on(c, spec)?.into_iter().flat_map(|a| a.binding_ids).collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The accesses the reconcile compares Rancher with: those that have not ended on `spec`'s
    /// Rancher and act for this owner (or were granted before owners existed). An access granted
    /// under another connector id acts for that owner, whose bindings this sweep never touches;
    /// listed here, it would only be reported missing again and again.
    fn held_accesses(&self, c: &dyn Db, spec: &Value) -> Result<Vec<HeldAccess>, ControlPlaneError> {
        Ok(self
            .live_on(c, spec)?
            .iter()
            .filter(|a| a.owner.as_ref().is_none_or(|o| *o == self.owner))
            .filter_map(held)
            .collect())
    }

    /// The spec a sweep job goes to: its pinned one, else its integration's.
    fn sweep_spec(c: &dyn Db, job: &JobRow) -> Result<Value, ControlPlaneError> {
        Ok(match (&job.integration, &job.integration_name) {
            (Some(spec), _) => spec.clone(),
            (None, Some(name)) => store::integration(c, name)?.unwrap_or(Value::Null),
            (None, None) => Value::Null,
        })
    }

    /// At hand-out: the sweep's params are made again from the state *now* (an access may have
    /// been granted, repaired or handed a binding since the job was queued). Ids it carried are
    /// kept in `keep_binding_ids`.
    pub(super) fn refresh_sweep(&self, c: &dyn Db, job: &mut JobRow) -> Result<(), ControlPlaneError> {
        let spec = Self::sweep_spec(c, job)?;
        let mut keep = self.keep_binding_ids(c, &spec)?;
        let dry_run = job.params.get("dry_run").and_then(Value::as_bool).unwrap_or(false);
        merge_ids(
            &mut keep,
            &super::access::string_list(job.params.get("keep_binding_ids")),
        );
        keep.sort();
        job.params = serde_json::to_value(SweepRequest {
            keep_binding_ids: keep,
            dry_run,
            owner: Some(self.owner.clone()),
            accesses: Some(self.held_accesses(c, &spec)?),
        })
        .map_err(|e| params_error("sweep", e))?;
        Ok(())
    }

    /// A sweep completed: repairs, counts and a clock check (see the module docs). Returns true
    /// when a job was queued.
    pub(super) fn on_sweep_succeeded(
        &self,
        c: &dyn Db,
        job: &JobRow,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        let Some(raw) = &job.result else { return Ok(false) };
        let result: SweepResult = match serde_json::from_value(raw.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "a sweep result cannot be read; nothing is repaired from it");
                return Ok(false);
            }
        };
        if result.dry_run {
            return Ok(false);
        }
        let integration = job.integration_name.clone().unwrap_or_default();
        for b in &result.removed {
            metrics().binding_swept(&integration, reason_label(b.reason));
        }
        if let Some(rancher_time) = result.rancher_time {
            let skew = t - rancher_time;
            if skew.abs() > CLOCK_SKEW_WARNING {
                tracing::warn!(integration = %integration, skew_s = skew.num_seconds(), "Rancher's clock and this host's differ by more than a minute: bindings expire in Rancher by Rancher's clock; check NTP on both");
            }
        }
        let mut queued = false;
        for m in &result.missing {
            match store::access(c, &m.grant_id) {
                Ok(Some(a)) if a.state == AccessState::Active => {
                    queued |= self.queue_repair(c, &a, &m.reason, t)?;
                }
                Ok(Some(a)) => {
                    tracing::debug!(access = %a.id, state = a.state.as_str(), "reported missing, but no longer active: not repaired");
                }
                Ok(None) => {
                    tracing::warn!(grant_id = %m.grant_id, "the reconcile reported an access this control plane does not know")
                }
                Err(e) => {
                    tracing::error!(access = %m.grant_id, error = %e, "an access reported missing cannot be read")
                }
            }
        }
        let removed: Vec<String> = result.removed.iter().map(|b| b.id.clone()).collect();
        queued |= self.repair_holders_of(c, &Self::sweep_spec(c, job)?, &removed, None, t)?;
        tracing::info!(
            integration = %integration,
            removed = result.removed.len(),
            missing = result.missing.len(),
            extended = result.extended_binding_ids.len(),
            marked = result.marked,
            "reconcile done"
        );
        Ok(queued)
    }

    /// Queues a repair for every `active` access on `spec`'s Rancher (but `except`) that lists one
    /// of `removed`: something removed the binding it holds. Returns true when a job was queued.
    pub(super) fn repair_holders_of(
        &self,
        c: &dyn Db,
        spec: &Value,
        removed: &[String],
        except: Option<&str>,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        if removed.is_empty() {
            return Ok(false);
        }
        let mut queued = false;
        // Only accesses that may hold a removed id are read (a revoke per access ending in a mass
        // expiry would otherwise decode every live access each time).
        let mut seen = std::collections::HashSet::new();
        let mut candidates = Vec::new();
        for id in removed {
            for a in skip_corrupt(store::active_access_holding(c, id)?) {
                if seen.insert(a.id.clone()) && same_target(&self.effective_spec(c, &a)?, spec) {
                    candidates.push(a);
                }
            }
        }
        for a in candidates {
            if a.state != AccessState::Active || Some(a.id.as_str()) == except {
                continue;
            }
            if let Some(id) = a.binding_ids.iter().find(|id| removed.contains(id)).cloned() {
                let reason = format!("binding {id} it holds was removed");
                queued |= self.queue_repair(c, &a, &reason, t)?;
            }
        }
        Ok(queued)
    }

    /// Queues a repair grant for active access `a` unless one is open: its grant again, with its
    /// expiry, owner and `keep_password` (see `access`). Returns true when one was queued.
    pub(super) fn queue_repair(
        &self,
        c: &dyn Db,
        a: &AccessRow,
        reason: &str,
        t: DateTime<Utc>,
    ) -> Result<bool, ControlPlaneError> {
        if !skip_corrupt(store::open_jobs_of_access(c, &a.id, JobKind::Grant.as_str())?).is_empty() {
            tracing::debug!(access = %a.id, "a repair is already open");
            return Ok(false);
        }
        let params = serde_json::to_value(GrantRequest {
            subject: a.subject.clone(),
            role: a.role.clone(),
            resource: a.resource.clone(),
            create_user: a.create_user,
            grant_id: Some(a.id.clone()),
            expires_at: a.expires_at,
            owner: Some(a.owner.clone().unwrap_or_else(|| self.owner.clone())),
            keep_password: true,
        })
        .map_err(|e| params_error("repair grant", e))?;
        let job = Self::new_job(
            JobKind::Grant,
            &a.integration,
            a.integration_spec.clone(),
            params,
            Some(&a.id),
            t,
        );
        store::insert_job(c, &job)?;
        metrics().access_repaired(&a.integration);
        tracing::warn!(access = %a.id, job = %job.id, reason, "repairing access {}: {reason}", a.id);
        Ok(true)
    }

    /// Scheduler step: queues sweeps at the first tick and then every `sweep_interval`.
    pub(super) fn sweep_if_due(&self, t: DateTime<Utc>) {
        if self.options.sweep_interval.is_zero() {
            return;
        }
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|l| (t - l).to_std().unwrap_or_default() < self.options.sweep_interval) {
                return;
            }
            *last = Some(t);
        }
        if let Err(e) = self.queue_sweeps() {
            tracing::error!(error = %e, "could not queue the sweeps; retrying next interval");
        }
    }
}
