//! Credential rotation and deletion of the local users the agent created.
//!
//! Both touch only users carrying the agent's marker (label `apono.io/created-by` or the
//! description "created by apono-connector"): a person's own account is never changed.

use super::Rancher;
use super::grant::{DEFAULT_GLOBAL_ROLES, is_agent_created};
use super::model::{Binding, User, nonempty};
use super::names::generate_password;
use crate::integrations::{
    Credentials, DeleteUserRequest, DeleteUserResult, GrantResult, IntegrationError, RotateRequest,
};

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
        })
    }

    /// `GET /v3/users/{id}`, then (for an agent-created user) its CRTBs, PRTBs and GRBs listed
    /// concurrently, then `DELETE /v3/users/{id}`: 5 requests when the user is deleted.
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
        let of_user = |b: &Binding| !b.is_removed() && nonempty(&b.user_id) == Some(id);
        let filters = [("userId", id)];
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
                    of_user(b) && !nonempty(&b.global_role_id).is_some_and(|g| DEFAULT_GLOBAL_ROLES.contains(&g))
                }),
        )?;
        let left: Vec<String> = crtbs.iter().chain(&prtbs).chain(&grbs).map(|b| b.id.clone()).collect();
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
        match self.client.delete(self.client.url(&["v3", "users", id], &[])).await {
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
            .get::<User>(self.client.url(&["v3", "users", id], &[]))
            .await
        {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e.into_error()),
        }
    }
}
