//! The v3 (Norman) objects this integration reads, as they come over the wire.
//!
//! Every field is defaulted: Rancher versions add and drop fields, and a missing one must not fail
//! a whole page. Empty strings and nulls are both "absent" (see [`nonempty`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::names::{
    BindingSubject, CREATED_BY_LABEL, CREATED_BY_VALUE, EXPIRES_AT_ANNOTATION, GRANT_ID_ANNOTATION, MarkedExpiry,
    OWNER_ANNOTATION, binding_name, legacy_binding_name, parse_expiry,
};
use crate::integrations::{BindingScope, Owner};

/// A collection page: `{data: [...], pagination: {...}}`.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Collection<T> {
    #[serde(default = "Vec::new", deserialize_with = "null_as_default")]
    pub data: Vec<T>,
    #[serde(default)]
    pub pagination: Option<Pagination>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Pagination {
    #[serde(default)]
    pub partial: bool,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
}

/// Objects in a collection have an `id`: pagination tracks them to detect a marker restart.
pub trait HasId {
    fn id(&self) -> &str;
}

macro_rules! has_id {
    ($($t:ty),*) => {$(impl HasId for $t { fn id(&self) -> &str { &self.id } })*};
}

has_id!(
    Cluster,
    Project,
    Namespace,
    GlobalRole,
    RoleTemplate,
    User,
    Binding,
    Token,
    Principal
);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Project {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub project_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalRole {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub builtin: bool,
    /// The install gives this role to every new user (`GlobalRole.NewUserDefault`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub new_user_default: bool,
    /// Its RBAC rules (on the `local` cluster's management API).
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<PolicyRule>,
}

impl GlobalRole {
    /// Rancher's own test for an admin role (`IsAdminGlobalRole`, rancher `pkg/rbac/common.go`):
    /// the builtin `admin`, or any role with a rule granting every verb on every resource of every
    /// API group and a rule granting every verb on every non-resource URL.
    pub fn is_admin(&self) -> bool {
        if self.builtin && self.id == "admin" {
            return true;
        }
        let star = |v: &[String]| v.iter().any(|x| x == "*");
        let resources = self
            .rules
            .iter()
            .any(|r| star(&r.resources) && star(&r.api_groups) && star(&r.verbs));
        let non_resources = self.rules.iter().any(|r| star(&r.non_resource_urls) && star(&r.verbs));
        resources && non_resources
    }
}

/// A Kubernetes RBAC rule as Norman shows it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default, deserialize_with = "null_as_default")]
    pub verbs: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub api_groups: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub resources: Vec<String>,
    #[serde(default, rename = "nonResourceURLs", deserialize_with = "null_as_default")]
    pub non_resource_urls: Vec<String>,
}

/// A principal as `GET /v3/principals` lists the caller's own: its user and, for providers with
/// groups, the groups it logged in with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Principal {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub principal_type: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleTemplate {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub context: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub locked: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub principal_ids: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Set on the caller's own user (`?me=true`).
    #[serde(default)]
    pub me: Option<bool>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl User {
    pub fn username(&self) -> Option<&str> {
        nonempty(&self.username)
    }
}

/// Any of the three binding kinds: GlobalRoleBinding, ClusterRoleTemplateBinding,
/// ProjectRoleTemplateBinding. The fields a kind lacks stay `None`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub global_role_id: Option<String>,
    #[serde(default)]
    pub role_template_id: Option<String>,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub user_principal_id: Option<String>,
    #[serde(default)]
    pub group_principal_id: Option<String>,
    /// 2.11+ CRTBs and GRBs: `summary` is `Completed` or `Error` (`InProgress` is for
    /// GlobalRoles only), absent until Rancher's passes ran. Never on PRTBs, nor before 2.11.
    #[serde(default)]
    pub status: Option<BindingStatus>,
    /// Set while finalizers run after a DELETE: the binding is on its way out.
    #[serde(default)]
    pub removed: Option<String>,
    /// When Rancher stored it (RFC 3339, Rancher's clock).
    #[serde(default)]
    pub created: Option<String>,
    /// Where the connector's marker lives (`names::CREATED_BY_LABEL`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// The marker's grant id and expiry (`names::GRANT_ID_ANNOTATION`, `names::EXPIRES_AT_ANNOTATION`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
}

impl Binding {
    pub fn is_removed(&self) -> bool {
        nonempty(&self.removed).is_some()
    }

    /// `status.summary` (2.11+, written by Rancher's controllers after the create).
    pub fn summary(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| nonempty(&s.summary))
    }

    /// Made by the connector: it carries the created-by label.
    pub fn is_connectors(&self) -> bool {
        self.labels.get(CREATED_BY_LABEL).map(String::as_str) == Some(CREATED_BY_VALUE)
    }

    /// The grant id in the connector's marker.
    pub fn grant_id(&self) -> Option<&str> {
        self.annotations
            .get(GRANT_ID_ANNOTATION)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The expiry in the connector's marker.
    pub fn marked_expiry(&self) -> MarkedExpiry {
        match self.annotations.get(EXPIRES_AT_ANNOTATION) {
            None => MarkedExpiry::None,
            Some(s) if s.trim().is_empty() => MarkedExpiry::None,
            Some(s) => parse_expiry(s).map_or_else(|| MarkedExpiry::Unreadable(s.clone()), MarkedExpiry::At),
        }
    }

    /// `userId`, `userPrincipalId` or `groupPrincipalId`, whichever the binding has.
    pub fn subject(&self) -> &str {
        nonempty(&self.user_id)
            .or_else(|| nonempty(&self.user_principal_id))
            .or_else(|| nonempty(&self.group_principal_id))
            .unwrap_or_default()
    }

    /// The metadata name: `name`, else the id's part after the namespace.
    pub fn object_name(&self) -> &str {
        nonempty(&self.name).unwrap_or_else(|| self.id.rsplit(':').next().unwrap_or(&self.id))
    }

    /// The owner annotation as written (`None` when absent or empty).
    pub fn owner_annotation(&self) -> Option<&str> {
        self.annotations
            .get(OWNER_ANNOTATION)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// Scope, role and resource as the binding itself says (a GRB has `globalRoleId`, a PRTB
    /// `projectId`, a CRTB `clusterId`); `None` for a binding that says neither.
    pub fn scope_role_resource(&self) -> Option<(BindingScope, &str, &str)> {
        if let Some(role) = nonempty(&self.global_role_id) {
            return Some((BindingScope::Global, role, "global"));
        }
        let role = nonempty(&self.role_template_id)?;
        if let Some(p) = nonempty(&self.project_id) {
            return Some((BindingScope::Project, role, p));
        }
        nonempty(&self.cluster_id).map(|c| (BindingScope::Cluster, role, c))
    }

    /// Every subject field the binding carries (Rancher fills `userId` into a principal's binding
    /// and `userPrincipalId` into some `userId` bindings later: its name came from one of them).
    fn subjects(&self) -> Vec<BindingSubject> {
        let mut out = Vec::new();
        if let Some(u) = nonempty(&self.user_id) {
            out.push(BindingSubject::UserId(u.to_string()));
        }
        if let Some(p) = nonempty(&self.user_principal_id) {
            out.push(BindingSubject::UserPrincipal(p.to_string()));
        }
        if let Some(g) = nonempty(&self.group_principal_id) {
            out.push(BindingSubject::GroupPrincipal(g.to_string()));
        }
        out
    }

    /// Whether the binding's name is the one `owner` (or, with `None`, a build before owners)
    /// derives from the binding's own scope, role, resource and one of its subject fields.
    fn has_derived_name(&self, owner: Option<&Owner>) -> bool {
        let Some((scope, role, resource)) = self.scope_role_resource() else {
            return false;
        };
        let name = self.object_name();
        self.subjects().iter().any(|s| match owner {
            Some(o) => binding_name(o, scope, s, role, resource) == name,
            None => legacy_binding_name(scope, s, role, resource) == name,
        })
    }

    /// Whose the binding is, as far as its marker and its name prove (see [`Ownership`]).
    pub fn ownership(&self, me: &Owner) -> Ownership {
        let labeled = self.is_connectors();
        match self.owner_annotation() {
            Some(written) => {
                let Ok(owner) = Owner::parse(written) else {
                    return Ownership::NotConnectors;
                };
                // Its own name, or the pre-owner name of a binding adopted at an upgrade.
                let named = self.has_derived_name(Some(&owner)) || self.has_derived_name(None);
                match (labeled && named, owner == *me) {
                    (true, true) => Ownership::Ours,
                    (true, false) => Ownership::Connector(owner),
                    (false, _) => Ownership::NotConnectors,
                }
            }
            None if self.has_derived_name(None) => Ownership::Legacy { labeled },
            None => Ownership::NotConnectors,
        }
    }
}

/// Whose a binding is. The created-by label alone proves nothing: anyone who copies a binding's
/// YAML copies it. A binding is a connector's only when its owner annotation names that connector
/// and its name is the one derived from that owner and the binding's own subject, role and
/// resource; nobody else creates that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This connector's: ours to adopt, extend and delete.
    Ours,
    /// Another connector's (another install, or the one-shot commands' `cli`): never adopted or
    /// re-dated; removed only by a sweep once its own marked expiry has passed.
    Connector(Owner),
    /// Made by a build before owners existed: the pre-owner derived name, no owner annotation
    /// (and, from the oldest builds, no label). Adopted by the grant that meets it, and removed
    /// by the revoke of the grant it names (or of any grant when it names none).
    Legacy { labeled: bool },
    /// A person's binding, or a copy of a connector's binding under another name: never touched.
    NotConnectors,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BindingStatus {
    #[serde(default)]
    pub summary: Option<String>,
    /// CRTBs and GRBs (2.11+): the management pass's verdict, written before the downstream one.
    #[serde(default)]
    pub summary_local: Option<String>,
    /// CRTBs (and admin GRBs): the downstream cluster's pass; absent while its agent is away.
    #[serde(default)]
    pub summary_remote: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_conditions: Vec<Condition>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub remote_conditions: Vec<Condition>,
}

impl BindingStatus {
    /// Messages of the conditions that carry one, for an `Error` summary.
    pub fn messages(&self) -> Vec<String> {
        self.local_conditions
            .iter()
            .chain(&self.remote_conditions)
            .filter_map(|c| {
                let m = nonempty(&c.message)?;
                Some(match nonempty(&c.kind) {
                    Some(t) => format!("{t}: {m}"),
                    None => m.to_string(),
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Condition {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub id: String,
    #[serde(default)]
    pub user_id: Option<String>,
    /// The key's scope: a cluster id, or empty for a no-scope key.
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub expired: Option<bool>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub ttl: Option<Value>,
}

/// `/v3/settings/{name}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Setting {
    #[serde(default)]
    pub value: Option<String>,
}

/// An `Option<String>` with empty strings treated as absent.
pub fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `null` (which Norman writes for empty maps and lists) reads as the type's default.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Binding {
    /// `status.summaryLocal` (2.11+ CRTBs and GRBs): the management pass has run.
    pub fn summary_local(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| nonempty(&s.summary_local))
    }

    /// `status.summaryRemote` (2.11+ CRTBs): the downstream cluster has applied it.
    pub fn summary_remote(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| nonempty(&s.summary_remote))
    }
}
