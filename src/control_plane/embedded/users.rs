//! Users the agent created: tracked in `managed_users` whenever a grant or revoke result says the
//! user is the connector's, so they are always rotated (`credential_rotation_days`, while an
//! access of theirs is active) and deleted (`user_cleanup_days` after their last access ended).

#[cfg(test)]
mod tests;

use crate::control_plane::store::Db;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    CLEANUP_DAYS_KEY, Effects, EmbeddedControlPlane, ROTATION_DAYS_KEY, config_days, days_of, later, skip_corrupt,
};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::operator::AccessState;
use crate::control_plane::protocol::JobKind;
use crate::control_plane::store::{self, AccessRow, ManagedUser};

/// A user the agent created, with its scheduled credential rotation and cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledUser {
    pub integration: String,
    pub user_id: String,
    /// When the next `rotate_credentials` job is due (while an access of the user is active).
    pub next_rotation_at: Option<DateTime<Utc>>,
    /// When its `delete_user` job is due (set when its last access was revoked).
    pub cleanup_at: Option<DateTime<Utc>>,
}

fn not_ended(a: &AccessRow) -> bool {
    matches!(
        a.state,
        AccessState::Active | AccessState::Revoking | AccessState::Pending
    )
}

impl EmbeddedControlPlane {
    /// Tracks `(integration, user_id)` with nothing scheduled yet, if it is not tracked already.
    pub(super) fn ensure_tracked(c: &dyn Db, integration: &str, user_id: &str) -> Result<(), ControlPlaneError> {
        if store::managed_user(c, integration, user_id)?.is_none() {
            store::upsert_managed_user(
                c,
                &ManagedUser {
                    integration: integration.to_string(),
                    user_id: user_id.to_string(),
                    next_rotation_at: None,
                    cleanup_at: None,
                },
            )?;
            tracing::info!(integration, user = %user_id, "tracking a user the connector created");
        }
        Ok(())
    }

    /// A grant of `a` made `user_id` active: a user the connector created (`managed`, or tracked
    /// already) gets its rotation scheduled and any pending cleanup cancelled.
    pub(super) fn track_granted_user(
        &self,
        c: &dyn Db,
        a: &AccessRow,
        user_id: &str,
        managed: bool,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let existing = store::managed_user(c, &a.integration, user_id)?;
        if !managed && existing.is_none() {
            return Ok(());
        }
        let spec = store::integration(c, &a.integration)?.unwrap_or(Value::Null);
        let rotation = config_days(&spec, ROTATION_DAYS_KEY).map(|d| later(t, days_of(self.options.day, d)));
        let mut user = existing.unwrap_or(ManagedUser {
            integration: a.integration.clone(),
            user_id: user_id.to_string(),
            next_rotation_at: None,
            cleanup_at: None,
        });
        if user.cleanup_at.take().is_some() {
            tracing::info!(user = %user_id, "a new access became active: the user's cleanup is cancelled");
        }
        if user.next_rotation_at.is_none() {
            user.next_rotation_at = rotation;
        }
        store::upsert_managed_user(c, &user)?;
        Ok(())
    }

    /// `a` was revoked: if it was the last access of a tracked user, schedule the user's cleanup.
    pub(super) fn schedule_cleanup_if_last(
        &self,
        c: &dyn Db,
        a: &AccessRow,
        user_id: &str,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let Some(mut user) = store::managed_user(c, &a.integration, user_id)? else {
            return Ok(());
        };
        let others = skip_corrupt(store::access_of_user(c, &a.integration, user_id)?)
            .into_iter()
            .filter(|o| o.id != a.id && not_ended(o))
            .count();
        if others > 0 {
            return Ok(());
        }
        let spec = store::integration(c, &a.integration)?.unwrap_or(Value::Null);
        user.next_rotation_at = None;
        user.cleanup_at = config_days(&spec, CLEANUP_DAYS_KEY).map(|d| later(t, days_of(self.options.day, d)));
        store::upsert_managed_user(c, &user)?;
        Ok(())
    }

    pub(super) fn queue_rotation(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        u: &ManagedUser,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let Some(mut user) = store::managed_user(c, &u.integration, &u.user_id)? else {
            return Ok(());
        };
        let spec = store::integration(c, &user.integration)?.unwrap_or(Value::Null);
        let active = skip_corrupt(store::access_of_user(c, &user.integration, &user.user_id)?)
            .into_iter()
            .rfind(|a| a.state == AccessState::Active);
        match (config_days(&spec, ROTATION_DAYS_KEY), active) {
            (Some(days), Some(a)) => {
                let params = serde_json::json!({"user_id": user.user_id});
                // To the Rancher the user's access was granted on (pinned), not wherever the name points now.
                let job = Self::new_job(
                    JobKind::RotateCredentials,
                    &user.integration,
                    a.integration_spec.clone(),
                    params,
                    Some(&a.id),
                    t,
                );
                store::insert_job(c, &job)?;
                fx.wake = true;
                user.next_rotation_at = Some(later(t, days_of(self.options.day, days)));
                tracing::info!(user = %user.user_id, access = %a.id, job = %job.id, "credential rotation queued");
            }
            // Rotation turned off, or no active access: nothing to rotate until one becomes active.
            _ => user.next_rotation_at = None,
        }
        store::upsert_managed_user(c, &user)?;
        Ok(())
    }

    pub(super) fn queue_cleanup(
        &self,
        c: &dyn Db,
        fx: &mut Effects,
        u: &ManagedUser,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        let Some(mut user) = store::managed_user(c, &u.integration, &u.user_id)? else {
            return Ok(());
        };
        if user.cleanup_at.is_none_or(|at| at > t) {
            return Ok(());
        }
        user.cleanup_at = None;
        let accesses = skip_corrupt(store::access_of_user(c, &user.integration, &user.user_id)?);
        if !accesses.iter().any(not_ended) {
            let params = serde_json::json!({"user_id": user.user_id});
            // The Rancher the user's last access was on (pinned), when known.
            let pinned = accesses.iter().rev().find_map(|a| a.integration_spec.clone());
            let job = Self::new_job(JobKind::DeleteUser, &user.integration, pinned, params, None, t);
            store::insert_job(c, &job)?;
            fx.wake = true;
            tracing::info!(user = %user.user_id, job = %job.id, "cleanup of an agent-created user queued");
        }
        store::upsert_managed_user(c, &user)?;
        Ok(())
    }

    /// Users the agent created that the control plane tracks (for rotation and cleanup).
    ///
    /// # Errors
    /// `Store` when the table cannot be read.
    pub fn managed_users(&self) -> Result<Vec<ScheduledUser>, ControlPlaneError> {
        let rows = skip_corrupt(store::list_managed_users(&*self.store.lock()?)?);
        Ok(rows
            .into_iter()
            .map(|u| ScheduledUser {
                integration: u.integration,
                user_id: u.user_id,
                next_rotation_at: u.next_rotation_at,
                cleanup_at: u.cleanup_at,
            })
            .collect())
    }
}
