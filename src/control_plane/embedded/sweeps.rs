//! Sweep scheduling: at start and every `Options::sweep_interval`, one `sweep` job per registered
//! integration, and one per distinct pinned Rancher (host, port) of an access that has not ended
//! where it differs from the current one (an integration moved in the config: its old Rancher
//! still needs sweeping). The agent removes the connector's bindings whose marked expiry has passed, except those an
//! access that has not ended holds (`keep_binding_ids`, computed again when the job is handed
//! out). This is what ends access when the control plane's state is lost.

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;

use super::registry::same_target;
use super::{EmbeddedControlPlane, now, skip_corrupt};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::protocol::JobKind;
use crate::control_plane::store::{self, JobRow};
use crate::integrations::SweepRequest;

impl EmbeddedControlPlane {
    /// Queues one sweep job per integration target (see the module docs), except for targets
    /// that still have a sweep pending or leased. Returns the ids of the jobs queued.
    ///
    /// # Errors
    /// `Store` when the state cannot be read or written.
    pub fn queue_sweeps(&self) -> Result<Vec<String>, ControlPlaneError> {
        self.write(|c, fx| {
            let t = now();
            let open: Vec<(Option<String>, Option<Value>)> = skip_corrupt(store::open_sweeps(c)?)
                .into_iter()
                .map(|j| (j.integration_name, j.integration))
                .collect();
            let mut queued = Vec::new();
            for (name, spec) in Self::sweep_targets(c)? {
                if open.iter().any(|(n, s)| {
                    n.as_deref() == Some(name.as_str()) && s.as_ref().is_some_and(|s| same_target(s, &spec))
                }) {
                    tracing::debug!(integration = %name, "a sweep is still pending or running; not queueing another");
                    continue;
                }
                let params = serde_json::to_value(SweepRequest {
                    keep_binding_ids: self.keep_binding_ids(c, &name, &spec)?,
                    dry_run: false,
                    ..SweepRequest::default()
                })
                .map_err(|e| ControlPlaneError::Store {
                    message: format!("sweep params do not serialize: {e}"),
                })?;
                let job = Self::new_job(JobKind::Sweep, &name, Some(spec), params, None, t);
                store::insert_job(c, &job)?;
                tracing::info!(integration = %name, job = %job.id, "sweep queued");
                queued.push(job.id);
            }
            fx.wake |= !queued.is_empty();
            Ok(queued)
        })
    }

    /// `(name, spec)` pairs to sweep: every registered integration, then the pinned specs of
    /// accesses that have not ended where their Rancher differs from the registered one.
    fn sweep_targets(c: &Connection) -> Result<Vec<(String, Value)>, ControlPlaneError> {
        let mut targets = Vec::new();
        for name in store::integration_names(c)? {
            if let Some(spec) = store::integration(c, &name)? {
                targets.push((name, spec));
            }
        }
        for a in skip_corrupt(store::live_access(c)?) {
            if let Some(spec) = a.integration_spec
                && !targets
                    .iter()
                    .any(|(n, s)| *n == a.integration && same_target(s, &spec))
            {
                targets.push((a.integration, spec));
            }
        }
        Ok(targets)
    }

    /// Binding ids held by accesses on `name` (on `spec`'s Rancher) that have not ended.
    fn keep_binding_ids(&self, c: &Connection, name: &str, spec: &Value) -> Result<Vec<String>, ControlPlaneError> {
        let mut ids = Vec::new();
        for a in skip_corrupt(store::live_access(c)?) {
            if a.integration == name && same_target(&self.effective_spec(c, &a)?, spec) {
                ids.extend(a.binding_ids);
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// At hand-out: adds the bindings held *now* to the sweep's `keep_binding_ids` (an access may
    /// have been granted or handed a binding since the job was queued).
    pub(super) fn refresh_sweep(&self, c: &Connection, job: &mut JobRow) -> Result<(), ControlPlaneError> {
        let Some(name) = job.integration_name.clone() else {
            return Ok(());
        };
        let spec = match &job.integration {
            Some(spec) => spec.clone(),
            None => store::integration(c, &name)?.unwrap_or(Value::Null),
        };
        let mut keep = self.keep_binding_ids(c, &name, &spec)?;
        if let Value::Object(params) = &mut job.params {
            if let Some(given) = params.get("keep_binding_ids").and_then(Value::as_array) {
                keep.extend(given.iter().filter_map(Value::as_str).map(str::to_string));
                keep.sort();
                keep.dedup();
            }
            params.insert("keep_binding_ids".into(), serde_json::json!(keep));
        } else if job.params.is_null() {
            job.params = serde_json::json!({"keep_binding_ids": keep});
        }
        Ok(())
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
