//! The local users the agent creates: their login roles, enabling and disabling them, credential
//! rotation and deletion.
//!
//! Rotation, deletion and disabling touch only users carrying the agent's marker (label
//! `apono.io/created-by` or the description "created by apono-connector"): a person's own account
//! is never changed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

use super::Rancher;
use super::client::ApiError;
use super::config::NewUserRoles;
use super::grant::{DEFAULT_GLOBAL_ROLES, LOGIN_ROLE, is_agent_created};
use super::model::{Binding, GlobalRole, User, nonempty};
use super::names::generate_password;
use crate::integrations::{
    Credentials, DeleteUserRequest, DeleteUserResult, GrantResult, IntegrationError, RotateRequest,
};

/// The role an install may mark `newUserDefault` that the agent never gives: it can create
/// clusters and own them beyond the access (rancher-api-notes §6).
const STANDARD_USER_ROLE: &str = "user";
/// Logged once per process: `user` was marked `newUserDefault` and replaced by `user-base`.
static REPLACED_USER_LOGGED: AtomicBool = AtomicBool::new(false);

impl Rancher {
    /// `GET /v3/users/{id}` + `POST /v3/users/{id}?action=setpassword`: 2 requests.
    pub(super) async fn rotate_password(&self, r: &RotateRequest) -> Result<GrantResult, IntegrationError> {
        let user = self
            .get_user(&r.user_id)
            .await?
            .ok_or_else(|| IntegrationError::NotFound {
                message: format!("Rancher user {} not found: nothing to rotate", r.user_id),
            })?;
        if !is_agent_created(&user) {
            return Err(IntegrationError::Invalid {
                message: format!(
                    "Rancher user {} was not created by apono-connector; the agent rotates only the passwords of \
                     users it created",
                    r.user_id
                ),
            });
        }
        let Some(username) = user.username().map(str::to_string) else {
            return Err(IntegrationError::Invalid {
                message: format!(
                    "Rancher user {} has no username (not a local user): no password to rotate",
                    r.user_id
                ),
            });
        };
        let password = generate_password();
        self.set_password(&user.id, &password).await?;
        tracing::info!(user_id = %user.id, "rotated the password of an agent-created user");
        Ok(GrantResult {
            user_id: user.id,
            binding_ids: Vec::new(),
            created_user: false,
            credentials: Some(Credentials { username, password }),
            access_details: self.config.access_details(),
            pre_existing: false,
            pre_existing_binding_ids: Vec::new(),
            managed_user: true,
            bound_subject: None,
            note: None,
        })
    }

    /// `GET /v3/users/{id}`, then (for an agent-created user) its CRTBs, PRTBs and GRBs listed
    /// concurrently (+ `GET /v3/globalroles` with `new_user_roles: newUserDefault`), then
    /// `DELETE /v3/users/{id}`: 5 requests when the user is deleted.
    pub(super) async fn delete_agent_user(&self, r: &DeleteUserRequest) -> Result<DeleteUserResult, IntegrationError> {
        let not_deleted = |reason: String| DeleteUserResult {
            user_id: r.user_id.clone(),
            deleted: false,
            reason: Some(reason),
        };
        let Some(user) = self.get_user(&r.user_id).await? else {
            return Ok(not_deleted("already gone".into()));
        };
        if !is_agent_created(&user) {
            return Ok(not_deleted(
                "not created by apono-connector: the agent deletes only users it created".into(),
            ));
        }
        let id = user.id.as_str();
        let left = self.remaining_access(id).await?;
        if !left.is_empty() {
            let mut shown = left.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            if left.len() > 10 {
                shown.push_str(", ...");
            }
            return Ok(not_deleted(format!(
                "the user still has {} role binding(s) ({shown}): revoke them first",
                left.len()
            )));
        }
        match self
            .client
            .delete(
                self.client
                    .url(&["v3", "users", id], &[])
                    .map_err(ApiError::into_error)?,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(user_id = id, "deleted an agent-created user");
                Ok(DeleteUserResult {
                    user_id: user.id.clone(),
                    deleted: true,
                    reason: None,
                })
            }
            Err(e) if e.status() == Some(404) => Ok(not_deleted("already gone".into())),
            Err(e) => Err(e.into_error()),
        }
    }

    /// `GET /v3/users/{id}`; `None` on 404.
    pub(super) async fn get_user(&self, id: &str) -> Result<Option<User>, IntegrationError> {
        if id.trim().is_empty() || id.contains('/') {
            return Err(IntegrationError::Invalid {
                message: format!("{id:?} is not a Rancher user id (u-xxxxx)"),
            });
        }
        match self
            .client
            .get::<User>(
                self.client
                    .url(&["v3", "users", id], &[])
                    .map_err(ApiError::into_error)?,
            )
            .await
        {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e.into_error()),
        }
    }

    /// The global roles a user the agent creates gets so it can log in (`new_user_roles`):
    /// `user-base`, or the roles the install marks `newUserDefault` (`GET /v3/globalroles`,
    /// re-checked client-side) with `user` replaced by `user-base`, or `user-base` when none is.
    pub(super) async fn login_roles(&self) -> Result<Vec<String>, IntegrationError> {
        if self.config.new_user_roles == NewUserRoles::UserBase {
            return Ok(vec![LOGIN_ROLE.to_string()]);
        }
        let mut roles = BTreeSet::new();
        for role in self.new_user_default_roles().await? {
            if role == STANDARD_USER_ROLE {
                if !REPLACED_USER_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the global role \"user\" is marked newUserDefault; users the agent creates get \"user-base\" \
                         instead: \"user\" can create clusters and own them beyond the access"
                    );
                }
                roles.insert(LOGIN_ROLE.to_string());
            } else {
                roles.insert(role);
            }
        }
        if roles.is_empty() {
            roles.insert(LOGIN_ROLE.to_string());
        }
        Ok(roles.into_iter().collect())
    }

    /// Ids of the global roles marked `newUserDefault: true`.
    async fn new_user_default_roles(&self) -> Result<Vec<String>, IntegrationError> {
        Ok(self
            .client
            .list::<GlobalRole>(&["v3", "globalroles"], &[("newUserDefault", "true")], "global roles")
            .collect_matching(|g| g.new_user_default)
            .await?
            .into_iter()
            .map(|g| g.id)
            .collect())
    }

    /// Ids of the user's bindings other than its login roles (`user`, `user-base`, and with
    /// `new_user_roles: newUserDefault` the roles marked so): its CRTBs, PRTBs and GRBs listed
    /// concurrently by `userId`, re-checked client-side; bindings being removed do not count.
    pub(super) async fn remaining_access(&self, user_id: &str) -> Result<Vec<String>, IntegrationError> {
        let login: BTreeSet<String> = match self.config.new_user_roles {
            NewUserRoles::UserBase => BTreeSet::new(),
            NewUserRoles::NewUserDefault => self.new_user_default_roles().await?.into_iter().collect(),
        };
        let of_user = |b: &Binding| !b.is_removed() && nonempty(&b.user_id) == Some(user_id);
        let filters = [("userId", user_id)];
        let (crtbs, prtbs, grbs) = tokio::try_join!(
            self.client
                .list::<Binding>(
                    &["v3", "clusterroletemplatebindings"],
                    &filters,
                    "cluster role bindings"
                )
                .collect_matching(of_user),
            self.client
                .list::<Binding>(
                    &["v3", "projectroletemplatebindings"],
                    &filters,
                    "project role bindings"
                )
                .collect_matching(of_user),
            self.client
                .list::<Binding>(&["v3", "globalrolebindings"], &filters, "global role bindings")
                .collect_matching(|b| {
                    of_user(b)
                        && !nonempty(&b.global_role_id)
                            .is_some_and(|g| DEFAULT_GLOBAL_ROLES.contains(&g) || login.contains(g))
                }),
        )?;
        Ok(crtbs.iter().chain(&prtbs).chain(&grbs).map(|b| b.id.clone()).collect())
    }

    /// Reads the user and enables it when it is disabled (`GET`, and a `PUT` only then): called by
    /// a grant once its binding exists, so a revoke's disable that landed first is undone.
    pub(super) async fn enable_if_disabled(&self, user_id: &str) -> Result<(), IntegrationError> {
        match self.get_user(user_id).await? {
            Some(u) if u.enabled == Some(false) => self.set_enabled(user_id, true).await,
            Some(_) => Ok(()),
            None => Err(IntegrationError::NotFound {
                message: format!("Rancher user {user_id} disappeared while it was granted access; try again"),
            }),
        }
    }

    /// `PUT /v3/users/{id} {"enabled": ...}`. A disabled user's tokens get 401.
    pub(super) async fn set_enabled(&self, user_id: &str, enabled: bool) -> Result<(), IntegrationError> {
        let url = self
            .client
            .url(&["v3", "users", user_id], &[])
            .map_err(ApiError::into_error)?;
        match self
            .client
            .put::<serde_json::Value>(url, &json!({"enabled": enabled}))
            .await
        {
            Ok(_) => {
                if enabled {
                    tracing::info!(user_id, "enabled an agent-created user again for a new access");
                }
                Ok(())
            }
            Err(e) if e.status() == Some(404) => Err(IntegrationError::NotFound {
                message: format!(
                    "Rancher user {user_id} not found while {} it",
                    if enabled { "enabling" } else { "disabling" }
                ),
            }),
            Err(e) => Err(e.into_error()),
        }
    }
}
