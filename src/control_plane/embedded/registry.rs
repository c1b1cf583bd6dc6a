//! Registered integrations, and what an inline registration may not change.
//!
//! Accesses and their jobs are pinned to the spec they were created with (see `access`), so a
//! registration never re-targets the revoke of an access granted before. On top of that, an
//! inline registration (JSON in `access request`, which anyone who can reach the operator API may
//! send) cannot replace an integration the operator declared in the config file, nor move an
//! inline one (host, port, secret store) while accesses on it have not ended.

#[cfg(test)]
mod tests;

use crate::control_plane::store::Db;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{EmbeddedControlPlane, bad_request, now, skip_corrupt};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::store::{self, IntegrationSource};
use crate::integrations::{self, IntegrationSpec};

/// The parts of a spec that say where jobs go and with which key.
const TARGET_FIELDS: [(&str, &[&str]); 3] = [
    ("config.host", &["config", "host"]),
    ("config.port", &["config", "port"]),
    ("secret_store", &["secret_store"]),
];

fn at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// Where a spec sends jobs: its Rancher's `config.host` and `config.port`. Accesses are pinned to
/// this; credentials and other settings (a rotated key, a new CA) follow the registration.
pub(super) fn target(spec: &Value) -> (Option<&Value>, Option<&Value>) {
    (at(spec, &["config", "host"]), at(spec, &["config", "port"]))
}

/// Two specs send jobs to the same Rancher.
pub(super) fn same_target(a: &Value, b: &Value) -> bool {
    target(a) == target(b)
}

fn conflict(message: String) -> ControlPlaneError {
    ControlPlaneError::Rejected { status: 409, message }
}

impl EmbeddedControlPlane {
    /// Registers (or replaces) an integration under its name. `Config` (the config file, at
    /// start) may change anything: accesses stay pinned to the spec they were granted with.
    /// `Inline` may not replace a `Config` one, nor change the host, port or secret store of an
    /// inline one while accesses on it have not ended.
    ///
    /// # Errors
    /// `Rejected` 400 when the spec has no name or fails `integrations::validate_spec`; 409 for an
    /// inline registration that may not replace the registered one.
    pub fn register_integration(
        &self,
        spec: &IntegrationSpec,
        source: IntegrationSource,
    ) -> Result<(), ControlPlaneError> {
        let value = Self::checked_spec(spec)?;
        self.write(|c, _| self.register_in(c, &spec.name, &value, source, now()))
    }

    /// A spec's JSON, once its name and config are checked (no network, no credentials).
    pub(super) fn checked_spec(spec: &IntegrationSpec) -> Result<Value, ControlPlaneError> {
        if spec.name.trim().is_empty() {
            return Err(bad_request("an integration needs a non-empty \"name\"".into()));
        }
        integrations::validate_spec(spec)
            .map_err(|e| bad_request(format!("integration {:?} is invalid: {e}", spec.name)))?;
        serde_json::to_value(spec)
            .map_err(|e| bad_request(format!("integration {:?} does not serialize: {e}", spec.name)))
    }

    /// Registration inside the caller's transaction (so an access request that registers an
    /// inline integration commits both or neither).
    pub(super) fn register_in(
        &self,
        c: &dyn Db,
        name: &str,
        value: &Value,
        source: IntegrationSource,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let existing = store::integration_with_source(c, name)?;
        if let Some((old, old_source)) = &existing {
            if old == value {
                return Ok(()); // nothing changes (and a config one stays a config one)
            }
            let moved: Vec<&str> = TARGET_FIELDS
                .iter()
                .filter(|(_, path)| at(old, path) != at(value, path))
                .map(|(label, _)| *label)
                .collect();
            if source == IntegrationSource::Inline {
                if *old_source == IntegrationSource::Config {
                    return Err(conflict(format!(
                        "integration {name:?} is declared in the config file; an inline integration cannot replace it: \
                         refer to it by name, or give the inline integration another name"
                    )));
                }
                let live = self.live_access_ids(c, name)?;
                if !moved.is_empty() && !live.is_empty() {
                    return Err(conflict(format!(
                        "inline integration {name:?} would change its {} while these accesses on it have not ended: {}; \
                         revoke them first, or give the inline integration another name",
                        moved.join(", "),
                        live.join(", ")
                    )));
                }
            } else if !moved.is_empty() {
                tracing::info!(integration = %name, changed = %moved.join(", "), "integration changed in the config; existing accesses keep the spec they were granted with");
            }
        }
        store::upsert_integration(c, name, value, source, t)?;
        Ok(())
    }

    /// Ids of the accesses on integration `name` that have not ended.
    fn live_access_ids(&self, c: &dyn Db, name: &str) -> Result<Vec<String>, ControlPlaneError> {
        Ok(skip_corrupt(store::live_access(c)?)
            .into_iter()
            .filter(|a| a.integration == name)
            .map(|a| a.id)
            .collect())
    }

    /// Names of the registered integrations.
    ///
    /// # Errors
    /// `Store` when the table cannot be read.
    pub fn integration_names(&self) -> Result<Vec<String>, ControlPlaneError> {
        Ok(store::integration_names(&*self.store.lock()?)?)
    }

    pub(super) fn unknown_integration(c: &dyn Db, name: &str) -> ControlPlaneError {
        let known = store::integration_names(c).unwrap_or_default();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        bad_request(format!(
            "unknown integration {name:?}: declare it in the config's [[integrations]] or give it inline as JSON (known: {known})"
        ))
    }
}
