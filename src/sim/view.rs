//! What the API key's owner is shown: every object for an admin; for anyone else only what
//! Rancher's RBAC lets them get, dropped from lists *silently* (200, fewer items, no hint).
//!
//! Who is an admin is Rancher's rule: a live GRB, to the owner or to one of its group principals
//! (`groupPrincipalId`), of a global role `IsAdminGlobalRole` accepts (`pkg/rbac/common.go`:
//! the built-in `admin`, or any role with its `*` rules). Bindings to the owner's groups count
//! like its own.
//!
//! Real Rancher: Norman's proxy store ends every `List` with `AccessControl.FilterList`
//! (rancher/norman `store/proxy/proxy_store.go`), and Rancher's access control drops every object
//! the caller cannot `get` (rancher/rancher `pkg/rbac/user_based.go`). Reads and writes of one
//! object go to Kubernetes impersonating the caller (`doAuthed`, `Impersonate-User`), so a
//! refused one is Kubernetes' 403 `Forbidden`; creates are refused earlier by Norman's schema
//! check with 403 `PermissionDenied` `can not create <type>` (rancher/norman
//! `authorization/all.go`). Global roles and role templates stay readable by every user.
//!
//! Objects hidden with [`super::Sim::hide_from_lists`] (informer lag) are left out of lists but
//! stay readable by id, for admins too.

use std::collections::BTreeSet;

use super::store::{ApiError, Binding, Namespace, Project, State, User};
use crate::integrations::BindingScope;

/// The global role that makes its holder see and change everything.
pub(crate) const ADMIN_ROLE: &str = "admin";

pub(crate) struct View {
    /// `None` for an admin.
    limited: Option<Limited>,
    hidden: BTreeSet<String>,
}

/// What a non-admin owner can get: the clusters and projects its own bindings (and its groups')
/// reach.
struct Limited {
    owner: String,
    groups: BTreeSet<String>,
    clusters: BTreeSet<String>,
    /// Clusters where the owner is `cluster-owner`: it sees all their projects and namespaces.
    owned_clusters: BTreeSet<String>,
    projects: BTreeSet<String>,
}

impl View {
    pub fn new(st: &State, owner: &str) -> View {
        let hidden = st.hidden.clone();
        if st.is_admin(owner) {
            return View { limited: None, hidden };
        }
        let mine = |b: &&Binding| st.binds(b, owner);
        let mut clusters = BTreeSet::new();
        let mut owned_clusters = BTreeSet::new();
        let mut projects = BTreeSet::new();
        for b in st.crtbs.values().filter(mine) {
            clusters.insert(b.resource_id.clone());
            if b.role_id == "cluster-owner" {
                owned_clusters.insert(b.resource_id.clone());
            }
        }
        for b in st.prtbs.values().filter(mine) {
            projects.insert(b.resource_id.clone());
            if let Some(p) = st.projects.get(&b.resource_id) {
                clusters.insert(p.cluster_id.clone());
            }
        }
        View {
            limited: Some(Limited {
                owner: owner.to_string(),
                groups: st.groups_of(owner).cloned().collect(),
                clusters,
                owned_clusters,
                projects,
            }),
            hidden,
        }
    }

    /// Whether an object with this id appears in lists at all (not hidden by informer lag).
    pub fn listed(&self, id: &str) -> bool {
        !self.hidden.contains(id)
    }

    pub fn user(&self, u: &User) -> bool {
        self.limited.as_ref().is_none_or(|l| u.id == l.owner)
    }

    pub fn binding(&self, b: &Binding) -> bool {
        self.limited.as_ref().is_none_or(|l| {
            b.user_id.as_deref() == Some(l.owner.as_str())
                || b.group_principal_id.as_ref().is_some_and(|g| l.groups.contains(g))
        })
    }

    pub fn cluster(&self, id: &str) -> bool {
        self.limited.as_ref().is_none_or(|l| l.clusters.contains(id))
    }

    pub fn project(&self, p: &Project) -> bool {
        self.limited
            .as_ref()
            .is_none_or(|l| l.projects.contains(&p.id) || l.owned_clusters.contains(&p.cluster_id))
    }

    pub fn namespace(&self, n: &Namespace) -> bool {
        self.limited.as_ref().is_none_or(|l| {
            l.owned_clusters.contains(&n.cluster_id) || n.project_id.as_ref().is_some_and(|p| l.projects.contains(p))
        })
    }

    /// Norman's create check: 403 `PermissionDenied` "can not create <type>".
    pub fn may_create(&self, schema_id: &str) -> Result<(), ApiError> {
        match &self.limited {
            None => Ok(()),
            Some(_) => Err(ApiError::new(
                403,
                "PermissionDenied",
                format!("can not create {schema_id}"),
            )),
        }
    }

    /// Kubernetes RBAC on one object (the caller impersonated): `verb` is `get`, `update` or
    /// `delete`; `allowed` says whether the owner can get it (a non-admin can change nothing).
    pub fn may(&self, verb: &str, allowed: bool, plural: &str, id: &str) -> Result<(), ApiError> {
        let Some(l) = &self.limited else {
            return Ok(());
        };
        if verb == "get" && allowed {
            return Ok(());
        }
        let (ns, name) = match id.split_once(':') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, id),
        };
        let in_ns = ns.map(|n| format!(" in the namespace \"{n}\"")).unwrap_or_default();
        Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{plural}.management.cattle.io \"{name}\" is forbidden: User \"{}\" cannot {verb} resource \
                 \"{plural}\" in API group \"management.cattle.io\"{in_ns}",
                l.owner
            ),
        ))
    }
}

/// The Norman schema id of a binding kind (as in "can not create clusterRoleTemplateBinding").
pub(crate) fn binding_schema(scope: BindingScope) -> &'static str {
    match scope {
        BindingScope::Global => "globalRoleBinding",
        BindingScope::Cluster => "clusterRoleTemplateBinding",
        BindingScope::Project => "projectRoleTemplateBinding",
    }
}
