//! The admin proof: Rancher filters every listing by the caller's RBAC and says nothing about it
//! (rancher/norman `store/proxy/proxy_store.go` ends `List` with `FilterList`; rancher
//! `pkg/rbac/user_based.go` drops what the caller cannot get). An empty answer proves nothing
//! unless the key's owner can see everything: an admin. Revoke, sweep and discover prove it
//! before trusting any listing; validate says so up front.
//!
//! `GET /v3/users?me=true` (whose key) + `GET /v3/globalrolebindings?userId=<me>&globalRoleId=admin`
//! (re-checked client-side): 2 requests, then cached per key for [`PROOF_TTL`].
//!
//! An owner is admin in Rancher's sense also through an identity-provider group (a GRB by
//! `groupPrincipalId`) or a custom global role with the admin rules (`IsAdminGlobalRole`). When
//! the direct binding is not there: the caller's principals (`GET /v3/principals`: its user and
//! its groups), every GRB (one listing, checked client-side for the owner's id and groups), and
//! each bound global role other than `admin` read (`GET /v3/globalroles/{id}`) and tested with
//! Rancher's rule. `restricted-admin` does not pass: it cannot see the `local` cluster.

use std::collections::{BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use super::Rancher;
use super::client::ApiError;
use super::model::{Binding, Collection, GlobalRole, Principal, User, nonempty};
use crate::integrations::IntegrationError;

/// The global role that sees everything.
pub(super) const ADMIN_ROLE: &str = "admin";
/// How long a proof holds. Short enough that a key whose owner lost admin is caught within
/// minutes; long enough that a burst of revokes costs the proof once.
pub(super) const PROOF_TTL: Duration = Duration::from_secs(600);

/// Proofs that succeeded, by `base URL|access key id` (never the secret). Process-wide: an
/// integration is built per job, the proof outlives it. A failure is never cached, and ends an
/// earlier proof of the same key.
static PROVEN: LazyLock<Mutex<HashMap<String, Instant>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

impl Rancher {
    fn proof_key(&self) -> String {
        format!("{}|{}", self.config.base_url.as_str(), self.key.token_name())
    }

    fn proven_recently(&self) -> bool {
        let key = self.proof_key();
        let map = PROVEN.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).is_some_and(|at| at.elapsed() < PROOF_TTL)
    }

    pub(super) fn forget_proof(&self) {
        PROVEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.proof_key());
    }

    pub(super) fn remember_proof(&self) {
        let mut map = PROVEN.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, at| at.elapsed() < PROOF_TTL);
        map.insert(self.proof_key(), Instant::now());
    }

    /// Proves the API key's owner is an admin, unless proven for this key within [`PROOF_TTL`].
    ///
    /// # Errors
    /// `PermissionDenied` when it is not; the request's failure otherwise.
    pub(super) async fn ensure_admin(&self) -> Result<(), IntegrationError> {
        if self.proven_recently() {
            return Ok(());
        }
        let me = self.key_owner().await?;
        self.prove_admin(&me.id).await
    }

    /// The key's owner (`GET /v3/users?me=true`). Being the first request of revoke, sweep and
    /// discover, its 401 is the one probed for a cluster scope (see `validate`).
    pub(super) async fn key_owner(&self) -> Result<User, IntegrationError> {
        let url = self
            .client
            .url(&["v3", "users"], &[("me", "true")])
            .map_err(ApiError::into_error)?;
        match self.client.get::<Collection<User>>(url).await {
            Ok(me) => owner_of(me),
            Err(e) => Err(self.explain_refusal(e, &self.probe_clusters(None)).await),
        }
    }

    /// Proves `user_id` (the key's owner) holds the global role admin, and caches the proof.
    ///
    /// # Errors
    /// `PermissionDenied` when it does not.
    pub(super) async fn prove_admin(&self, user_id: &str) -> Result<(), IntegrationError> {
        let is_admin = |b: &Binding| {
            !b.is_removed() && nonempty(&b.user_id) == Some(user_id) && nonempty(&b.global_role_id) == Some(ADMIN_ROLE)
        };
        let found = self
            .client
            .list::<Binding>(
                &["v3", "globalrolebindings"],
                &[("userId", user_id), ("globalRoleId", ADMIN_ROLE)],
                "the key owner's global role bindings",
            )
            .find(is_admin)
            .await?;
        if found.is_none() && !self.admin_otherwise(user_id).await? {
            // A key found wanting is not trusted on an older proof either.
            self.forget_proof();
            return Err(IntegrationError::PermissionDenied {
                message: format!(
                    "the API key's owner {user_id} is not an admin (no global role with Rancher's admin rules, \
                     directly or through a group): Rancher silently hides what a non-admin cannot see, so revokes \
                     could not be proven and nothing is granted; use a key of a user with the global role admin"
                ),
            });
        }
        self.remember_proof();
        Ok(())
    }

    /// Whether `user_id` is admin through one of its groups or a custom global role.
    async fn admin_otherwise(&self, user_id: &str) -> Result<bool, IntegrationError> {
        let groups: Vec<String> = self
            .client
            .list::<Principal>(&["v3", "principals"], &[], "the key owner's principals")
            .collect_matching(|p| p.principal_type.eq_ignore_ascii_case("group"))
            .await?
            .into_iter()
            .map(|p| p.id)
            .collect();
        let roles: BTreeSet<String> = self
            .client
            .list::<Binding>(&["v3", "globalrolebindings"], &[], "global role bindings")
            .collect_matching(|b| {
                !b.is_removed()
                    && (nonempty(&b.user_id) == Some(user_id)
                        || nonempty(&b.group_principal_id).is_some_and(|g| groups.iter().any(|x| x == g)))
            })
            .await?
            .into_iter()
            .filter_map(|b| b.global_role_id)
            .collect();
        if roles.contains(ADMIN_ROLE) {
            return Ok(true);
        }
        for id in roles {
            let url = self
                .client
                .url(&["v3", "globalroles", &id], &[])
                .map_err(ApiError::into_error)?;
            match self.client.get::<GlobalRole>(url).await {
                Ok(role) if role.is_admin() => {
                    tracing::info!(user_id, role = %id, "the API key's owner is admin through a custom global role");
                    return Ok(true);
                }
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(e.into_error()),
            }
        }
        Ok(false)
    }
}

/// The caller's own entry in a `?me=true` answer (the whole list comes back if the filter is
/// ignored: pick the entry marked `me`).
pub(super) fn owner_of(me: Collection<User>) -> Result<User, IntegrationError> {
    let only = me.data.len() == 1;
    let mut data = me.data;
    match data.iter().position(|u| u.me == Some(true)) {
        Some(i) => Ok(data.swap_remove(i)),
        None if only => Ok(data.swap_remove(0)),
        None => Err(IntegrationError::Protocol {
            message: "GET /v3/users?me=true did not say which user the API key belongs to".into(),
        }),
    }
}
