//! The simulator's in-memory objects, the write rules of the real server (validation, duplicate
//! checks per version, EnsureUser, cascades) and their Norman JSON shapes.
//!
//! Every collection is a `BTreeMap` keyed by id, so listing is already in Norman's default order
//! (sorted by `id`) and a page costs a filter pass plus rendering the page only.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

pub(crate) use super::index::BindingMap;
use super::{PolicyRule, RancherVersion, SimBinding, SimUser, external_user_id};
use crate::integrations::BindingScope;

/// A Norman error answer: `{"type":"error","baseType":"error","status":..,"code":..,"message":..}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            field: None,
        }
    }
    pub fn field(mut self, field: &str) -> ApiError {
        self.field = Some(field.to_string());
        self
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "NotFound", message)
    }
    pub fn invalid_body(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "InvalidBodyContent", message)
    }
    pub fn missing(field: &str) -> ApiError {
        ApiError::new(422, "MissingRequired", format!("{field} is required")).field(field)
    }
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "type": "error",
            "baseType": "error",
            "status": self.status,
            "code": self.code,
            "message": self.message,
        });
        if let (Some(f), Some(obj)) = (&self.field, v.as_object_mut()) {
            obj.insert("fieldName".into(), Value::String(f.clone()));
        }
        v
    }
}

/// The annotation Rancher puts on a binding by external principal (`rtb_store.go`), read by
/// EnsureUser for the new user's display name.
pub(crate) const PRINCIPAL_DISPLAY_NAME: &str = "auth.cattle.io/principal-display-name";

/// `{resource}.management.cattle.io "{name}" not found`, as the Kubernetes store says it.
pub(crate) fn k8s_not_found(resource: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("{resource}.management.cattle.io \"{name}\" not found"))
}

/// What rendering needs beyond the object itself.
pub(crate) struct Ctx<'a> {
    /// `scheme://host`, for links.
    pub base: &'a str,
    /// The API key's owner (`me`).
    pub owner: &'a str,
    pub version: RancherVersion,
    pub now: Instant,
    /// The simulator's clock.
    pub clock: DateTime<Utc>,
}

/// A listable object: its id, its filterable fields and its JSON shape.
pub(crate) trait Item {
    fn id(&self) -> &str;
    /// The value of a filterable field (`None` for null). Only called with names the collection
    /// declares filterable.
    fn field(&self, name: &str, ctx: &Ctx) -> Option<Cow<'_, str>>;
    fn render(&self, ctx: &Ctx) -> Value;
    /// Appends the JSON of [`Item::render`] to `out`. Big collections override it to serialize
    /// straight from borrowed fields, so a page of thousands never becomes `Value` trees.
    fn write(&self, ctx: &Ctx, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(out, &self.render(ctx));
    }
}

/// splitmix64: small, seeded and deterministic (ids and the large dataset).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    /// `n` characters of Kubernetes' name alphabet (no vowels, no look-alikes).
    pub fn name_chars(&mut self, n: usize) -> String {
        const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..n)
            .map(|_| char::from(ALPHANUMS[self.below(ALPHANUMS.len())]))
            .collect()
    }
}

/// `prefix` + 5 random name characters, not `taken`.
pub(crate) fn unique_name(rng: &mut Rng, prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    loop {
        let name = format!("{prefix}{}", rng.name_chars(5));
        if !taken(&name) {
            return name;
        }
    }
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn time_json(t: DateTime<Utc>) -> (Value, Value) {
    (
        Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        Value::from(t.timestamp_millis()),
    )
}

fn map_json(m: &BTreeMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

fn opt_json(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

/// Fields every Norman object carries.
fn base_object(
    kind: &str,
    id: &str,
    name: &str,
    (labels, annotations): (&BTreeMap<String, String>, &BTreeMap<String, String>),
    created: DateTime<Utc>,
    self_link: String,
    removable: bool,
) -> Map<String, Value> {
    let (created_s, created_ts) = time_json(created);
    let mut links = Map::new();
    links.insert("self".into(), Value::String(self_link.clone()));
    if removable {
        links.insert("remove".into(), Value::String(self_link.clone()));
        links.insert("update".into(), Value::String(self_link));
    }
    let mut m = Map::new();
    m.insert("actions".into(), json!({}));
    m.insert("annotations".into(), map_json(annotations));
    m.insert("baseType".into(), Value::String(kind.into()));
    m.insert("created".into(), created_s);
    m.insert("createdTS".into(), created_ts);
    m.insert("creatorId".into(), Value::Null);
    m.insert("id".into(), Value::String(id.into()));
    m.insert("labels".into(), map_json(labels));
    m.insert("links".into(), Value::Object(links));
    m.insert("name".into(), Value::String(name.into()));
    m.insert("state".into(), Value::String("active".into()));
    m.insert("transitioning".into(), Value::String("no".into()));
    m.insert("transitioningMessage".into(), Value::String(String::new()));
    m.insert("type".into(), Value::String(kind.into()));
    m
}

#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    pub provider: String,
}

impl Item for Cluster {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" => Some(Cow::Borrowed(self.id.as_str())),
            "name" => Some(Cow::Borrowed(self.name.as_str())),
            "provider" => Some(Cow::Borrowed(self.provider.as_str())),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/clusters/{}", ctx.base, self.id);
        let mut m = base_object(
            "cluster",
            &self.id,
            &self.name,
            (&self.labels, &BTreeMap::new()),
            self.created,
            link,
            true,
        );
        if let Some(Value::Object(links)) = m.get_mut("links") {
            links.insert(
                "namespaces".into(),
                Value::String(format!("{}/v3/cluster/{}/namespaces", ctx.base, self.id)),
            );
            links.insert(
                "projects".into(),
                Value::String(format!("{}/v3/projects?clusterId={}", ctx.base, self.id)),
            );
            links.insert(
                "clusterRoleTemplateBindings".into(),
                Value::String(format!(
                    "{}/v3/clusterroletemplatebindings?clusterId={}",
                    ctx.base, self.id
                )),
            );
        }
        m.insert("provider".into(), Value::String(self.provider.clone()));
        m.insert("internal".into(), Value::Bool(self.id == "local"));
        m.insert("description".into(), Value::String(String::new()));
        Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Project {
    /// `c-x:p-y`
    pub id: String,
    pub cluster_id: String,
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    /// Created on Rancher 2.12+: its backing namespace (and PRTB namespace) is `c-x-p-y`.
    pub new_namespace: bool,
}

impl Project {
    /// The `p-y` part.
    pub fn short(&self) -> &str {
        self.id.split_once(':').map_or(self.id.as_str(), |(_, p)| p)
    }
    /// The namespace holding this project's PRTBs: `p-y`, or `c-x-p-y` for projects created on
    /// 2.12+ (only possible when the simulated version is 2.12+).
    pub fn prtb_namespace(&self, version: RancherVersion) -> String {
        if self.new_namespace && version.minor >= 12 {
            format!("{}-{}", self.cluster_id, self.short())
        } else {
            self.short().to_string()
        }
    }
}

impl Item for Project {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" => Some(Cow::Borrowed(self.id.as_str())),
            "name" => Some(Cow::Borrowed(self.name.as_str())),
            "clusterId" => Some(Cow::Borrowed(self.cluster_id.as_str())),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/projects/{}", ctx.base, self.id);
        let mut m = base_object(
            "project",
            &self.id,
            &self.name,
            (&self.labels, &BTreeMap::new()),
            self.created,
            link,
            true,
        );
        m.insert("clusterId".into(), Value::String(self.cluster_id.clone()));
        m.insert("description".into(), Value::String(self.description.clone()));
        m.insert("namespaceId".into(), Value::String(self.cluster_id.clone()));
        if ctx.version.minor >= 12 {
            m.insert(
                "backingNamespace".into(),
                Value::String(self.prtb_namespace(ctx.version)),
            );
        }
        if let Some(Value::Object(links)) = m.get_mut("links") {
            links.insert(
                "projectRoleTemplateBindings".into(),
                Value::String(format!(
                    "{}/v3/projectroletemplatebindings?projectId={}",
                    ctx.base, self.id
                )),
            );
        }
        Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    pub name: String,
    pub cluster_id: String,
    /// `c-x:p-y`, or `None` for a namespace in no project.
    pub project_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
}

impl Item for Namespace {
    fn id(&self) -> &str {
        &self.name
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" | "name" => Some(Cow::Borrowed(self.name.as_str())),
            "projectId" => self.project_id.as_deref().map(Cow::Borrowed),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/cluster/{}/namespaces/{}", ctx.base, self.cluster_id, self.name);
        let mut labels = self.labels.clone();
        let mut annotations = BTreeMap::new();
        labels.insert("kubernetes.io/metadata.name".into(), self.name.clone());
        if let Some(p) = &self.project_id {
            let short = p.split_once(':').map_or(p.as_str(), |(_, s)| s);
            labels.insert("field.cattle.io/projectId".into(), short.to_string());
            annotations.insert("field.cattle.io/projectId".into(), p.clone());
        }
        let mut m = base_object(
            "namespace",
            &self.name,
            &self.name,
            (&labels, &annotations),
            self.created,
            link,
            true,
        );
        m.insert("projectId".into(), opt_json(&self.project_id));
        m.insert("baseType".into(), Value::String("namespace".into()));
        Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct GlobalRole {
    pub id: String,
    pub name: String,
    pub description: String,
    pub builtin: bool,
    pub new_user_default: bool,
    pub created: DateTime<Utc>,
    pub rules: Vec<PolicyRule>,
}

impl GlobalRole {
    /// Rancher's `IsAdminGlobalRole`.
    pub fn is_admin(&self) -> bool {
        super::is_admin_global_role(&self.id, self.builtin, &self.rules)
    }
}

impl Item for GlobalRole {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" => Some(Cow::Borrowed(self.id.as_str())),
            "name" => Some(Cow::Borrowed(self.name.as_str())),
            "builtin" => Some(Cow::Owned(self.builtin.to_string())),
            "newUserDefault" => Some(Cow::Owned(self.new_user_default.to_string())),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/globalRoles/{}", ctx.base, self.id);
        let mut m = base_object(
            "globalRole",
            &self.id,
            &self.name,
            (&BTreeMap::new(), &BTreeMap::new()),
            self.created,
            link,
            !self.builtin,
        );
        m.insert("builtin".into(), Value::Bool(self.builtin));
        m.insert("newUserDefault".into(), Value::Bool(self.new_user_default));
        m.insert("description".into(), Value::String(self.description.clone()));
        m.insert("inheritedClusterRoles".into(), json!([]));
        m.insert(
            "rules".into(),
            serde_json::to_value(&self.rules).unwrap_or_else(|_| json!([])),
        );
        Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RoleTemplate {
    pub id: String,
    pub name: String,
    /// `cluster`, `project` or empty.
    pub context: String,
    pub builtin: bool,
    pub locked: bool,
    pub hidden: bool,
    pub description: String,
    pub created: DateTime<Utc>,
}

impl Item for RoleTemplate {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" => Some(Cow::Borrowed(self.id.as_str())),
            "name" => Some(Cow::Borrowed(self.name.as_str())),
            "context" => Some(Cow::Borrowed(self.context.as_str())),
            "locked" => Some(Cow::Owned(self.locked.to_string())),
            "hidden" => Some(Cow::Owned(self.hidden.to_string())),
            "builtin" => Some(Cow::Owned(self.builtin.to_string())),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/roleTemplates/{}", ctx.base, self.id);
        let mut m = base_object(
            "roleTemplate",
            &self.id,
            &self.name,
            (&BTreeMap::new(), &BTreeMap::new()),
            self.created,
            link,
            !self.builtin,
        );
        m.insert("context".into(), Value::String(self.context.clone()));
        m.insert("builtin".into(), Value::Bool(self.builtin));
        m.insert("locked".into(), Value::Bool(self.locked));
        m.insert("hidden".into(), Value::Bool(self.hidden));
        m.insert("external".into(), Value::Bool(false));
        m.insert("administrative".into(), Value::Bool(false));
        m.insert("clusterCreatorDefault".into(), Value::Bool(self.id == "cluster-owner"));
        m.insert("projectCreatorDefault".into(), Value::Bool(self.id == "project-owner"));
        m.insert("description".into(), Value::String(self.description.clone()));
        m.insert("roleTemplateIds".into(), json!([]));
        m.insert("rules".into(), json!([]));
        Value::Object(m)
    }
}

/// A user. Holds the password (write-only on the wire); deliberately not `Debug`.
#[derive(Clone)]
pub(crate) struct User {
    pub id: String,
    pub username: Option<String>,
    pub name: String,
    pub description: String,
    pub principal_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub enabled: bool,
    pub must_change_password: bool,
    pub password: Option<String>,
    pub created: DateTime<Utc>,
    /// API-created local users: `principalIds` is filled in by a controller, so it shows `[]`
    /// until then (only with a `settle` delay).
    pub principals_at: Option<Instant>,
}

impl User {
    pub fn to_sim(&self) -> SimUser {
        SimUser {
            id: self.id.clone(),
            username: self.username.clone(),
            name: self.name.clone(),
            principal_ids: self.principal_ids.clone(),
            labels: self.labels.clone(),
            description: self.description.clone(),
            must_change_password: self.must_change_password,
            enabled: self.enabled,
            password_set: self.password.is_some(),
        }
    }
}

impl Item for User {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, ctx: &Ctx) -> Option<Cow<'_, str>> {
        match name {
            "id" => Some(Cow::Borrowed(self.id.as_str())),
            "username" => self.username.as_deref().map(Cow::Borrowed),
            "me" => Some(Cow::Owned((self.id == ctx.owner).to_string())),
            "enabled" => Some(Cow::Owned(self.enabled.to_string())),
            "mustChangePassword" => Some(Cow::Owned(self.must_change_password.to_string())),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        let link = format!("{}/v3/users/{}", ctx.base, self.id);
        let mut m = base_object(
            "user",
            &self.id,
            &self.name,
            (&self.labels, &self.annotations),
            self.created,
            link.clone(),
            true,
        );
        m.insert(
            "actions".into(),
            json!({
                "refreshauthprovideraccess": format!("{link}?action=refreshauthprovideraccess"),
                "setpassword": format!("{link}?action=setpassword"),
            }),
        );
        if let Some(Value::Object(links)) = m.get_mut("links") {
            links.insert(
                "globalRoleBindings".into(),
                Value::String(format!("{}/v3/globalrolebindings?userId={}", ctx.base, self.id)),
            );
            links.insert(
                "tokens".into(),
                Value::String(format!("{}/v3/tokens?userId={}", ctx.base, self.id)),
            );
        }
        if let Some(u) = &self.username {
            m.insert("username".into(), Value::String(u.clone()));
        }
        m.insert("description".into(), Value::String(self.description.clone()));
        let filled = self.principals_at.is_none_or(|t| ctx.now >= t);
        m.insert(
            "principalIds".into(),
            if filled { json!(self.principal_ids) } else { json!([]) },
        );
        m.insert("enabled".into(), Value::Bool(self.enabled));
        m.insert("mustChangePassword".into(), Value::Bool(self.must_change_password));
        m.insert("me".into(), Value::Bool(self.id == ctx.owner));
        if !self.enabled {
            m.insert("state".into(), Value::String("inactive".into()));
        }
        Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Binding {
    pub id: String,
    pub name: String,
    pub scope: BindingScope,
    pub role_id: String,
    /// `global`, a cluster id or a project id.
    pub resource_id: String,
    pub user_id: Option<String>,
    pub user_principal_id: Option<String>,
    pub group_principal_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    /// When the downstream pass may run (CRTBs, and GRBs of an admin role): never before the
    /// management pass, and for a CRTB never while its cluster's agent is disconnected.
    pub settles_at: Option<Instant>,
    /// The downstream pass: `None` for a binding that has none shown in its status (PRTBs, GRBs
    /// of other roles), `Some(false)` until it has run, `Some(true)` after (`summaryRemote`).
    pub remote_done: Option<bool>,
    /// When the binding controller first handles it (`None` once it has): until then the object
    /// is exactly what was posted, with no `status`, no EnsureUser'd `userId` and no backfilled
    /// `userPrincipalId` (rancher `pkg/controllers/management/auth/crtb_handler.go`).
    pub reconcile_at: Option<Instant>,
    /// The controller could not find or make the subject (a `userId` with no such user):
    /// `status.summary` is `Error` (`crtb_handler.go` reconcileSubject, FailedToGetSubject).
    pub subject_error: bool,
    /// Deleted while finalizers run: `(removed timestamp, purge time)`. Still listed, with
    /// `removed` set, until the purge time (only with a `removal_delay`).
    pub removing: Option<(DateTime<Utc>, Instant)>,
}

impl Binding {
    pub fn to_sim(&self) -> SimBinding {
        SimBinding {
            id: self.id.clone(),
            name: self.name.clone(),
            scope: self.scope,
            role_id: self.role_id.clone(),
            resource_id: self.resource_id.clone(),
            user_id: self.user_id.clone(),
            user_principal_id: self.user_principal_id.clone(),
            group_principal_id: self.group_principal_id.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self.scope {
            BindingScope::Global => ("globalRoleBinding", "globalRoleBindings"),
            BindingScope::Cluster => ("clusterRoleTemplateBinding", "clusterRoleTemplateBindings"),
            BindingScope::Project => ("projectRoleTemplateBinding", "projectRoleTemplateBindings"),
        }
    }

    fn settled(&self, now: Instant) -> bool {
        self.settles_at.is_none_or(|t| now >= t)
    }

    /// Whether this kind of binding shows its downstream pass in its status: a CRTB always, a
    /// GRB only for an admin role (`globalrolebinding_handler.go` updateStatus); a PRTB has no
    /// status at all.
    pub fn remote_pass(scope: BindingScope, admin_role: bool) -> Option<bool> {
        match scope {
            BindingScope::Cluster => Some(false),
            BindingScope::Global if admin_role => Some(false),
            _ => None,
        }
    }

    /// The webhook's `isDuplicate`: raw fields compared, principals never resolved to users
    /// (rancher/webhook `clusterroletemplatebinding/validator.go`).
    fn same_subject(&self, user_id: &Option<String>, upid: &Option<String>, gpid: &Option<String>) -> bool {
        let eq = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
        eq(&self.user_id, user_id) || eq(&self.user_principal_id, upid) || eq(&self.group_principal_id, gpid)
    }
}

impl Item for Binding {
    fn id(&self) -> &str {
        &self.id
    }
    fn field(&self, name: &str, _: &Ctx) -> Option<Cow<'_, str>> {
        match (name, self.scope) {
            ("id", _) => Some(Cow::Borrowed(self.id.as_str())),
            ("name", _) => Some(Cow::Borrowed(self.name.as_str())),
            ("globalRoleId", BindingScope::Global) => Some(Cow::Borrowed(self.role_id.as_str())),
            ("roleTemplateId", BindingScope::Cluster | BindingScope::Project) => {
                Some(Cow::Borrowed(self.role_id.as_str()))
            }
            ("clusterId", BindingScope::Cluster) => Some(Cow::Borrowed(self.resource_id.as_str())),
            ("projectId", BindingScope::Project) => Some(Cow::Borrowed(self.resource_id.as_str())),
            ("userId", _) => self.user_id.as_deref().map(Cow::Borrowed),
            ("userPrincipalId", _) => self.user_principal_id.as_deref().map(Cow::Borrowed),
            ("groupPrincipalId", _) => self.group_principal_id.as_deref().map(Cow::Borrowed),
            _ => None,
        }
    }
    fn render(&self, ctx: &Ctx) -> Value {
        serde_json::to_value(self.wire(ctx)).unwrap_or(Value::Null)
    }
    fn write(&self, ctx: &Ctx, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(out, &self.wire(ctx));
    }
}

/// A binding's Norman JSON, serialized from borrowed fields (pages of thousands of bindings).
/// `Option<Option<_>>`: outer `None` leaves the key out, `Some(None)` writes `null`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BindingWire<'a> {
    actions: Empty,
    annotations: &'a BTreeMap<String, String>,
    base_type: &'static str,
    created: Rfc3339,
    #[serde(rename = "createdTS")]
    created_ts: i64,
    creator_id: Option<&'a str>,
    id: &'a str,
    labels: &'a BTreeMap<String, String>,
    links: Links<'a>,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<Rfc3339>,
    #[serde(rename = "removedTS", skip_serializing_if = "Option::is_none")]
    removed_ts: Option<i64>,
    state: &'static str,
    transitioning: &'static str,
    transitioning_message: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    global_role_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    project_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role_template_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<Option<&'a str>>,
    user_id: Option<&'a str>,
    user_principal_id: Option<&'a str>,
    group_principal_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<BindingStatus>,
}

/// `{}`
#[derive(serde::Serialize)]
struct Empty {}

/// `{self, remove, update}`, all the object's URL, written without allocating.
#[derive(serde::Serialize)]
struct Links<'a> {
    #[serde(rename = "self")]
    self_link: Link<'a>,
    remove: Link<'a>,
    update: Link<'a>,
}

/// `{base}/v3/{plural}/{id}` as a JSON string.
#[derive(Clone, Copy)]
struct Link<'a> {
    base: &'a str,
    plural: &'static str,
    id: &'a str,
}

impl serde::Serialize for Link<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/v3/{}/{}", self.base, self.plural, self.id))
    }
}

/// RFC 3339 in UTC to the second, written without allocating.
struct Rfc3339(DateTime<Utc>);

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use chrono::{Datelike, Timelike};
        let t = &self.0;
        s.collect_str(&format_args!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ))
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BindingStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'static str>,
    summary_local: &'static str,
    local_conditions: [(); 0],
    #[serde(skip_serializing_if = "Option::is_none")]
    summary_remote: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_conditions: Option<[(); 0]>,
}

impl Binding {
    fn wire<'a>(&'a self, ctx: &Ctx<'a>) -> BindingWire<'a> {
        let (kind, plural) = self.kind();
        let link = Link {
            base: ctx.base,
            plural,
            id: &self.id,
        };
        let global = self.scope == BindingScope::Global;
        // 2.11+ (`authz_types.go`): CRTBs and GRBs have a status, written by the controllers
        // after the 201; PRTBs have none on any version. The management pass writes
        // `summaryLocal`; `summary` is `Completed` only once the downstream pass has written
        // `summaryRemote` too (CRTBs, admin GRBs: `crtb_handler.go` and
        // `managementuser/rbac/crtb_handler.go` updateStatus). Never `InProgress` (only
        // GlobalRoles use it).
        let status = (ctx.version.minor >= 11 && self.scope != BindingScope::Project && self.reconcile_at.is_none())
            .then(|| {
                if self.subject_error {
                    return BindingStatus {
                        summary: Some("Error"),
                        summary_local: "Error",
                        local_conditions: [],
                        summary_remote: None,
                        remote_conditions: None,
                    };
                }
                let remote = self.remote_done == Some(true);
                BindingStatus {
                    summary: (self.remote_done != Some(false)).then_some("Completed"),
                    summary_local: "Completed",
                    local_conditions: [],
                    summary_remote: remote.then_some("Completed"),
                    remote_conditions: remote.then_some([]),
                }
            });
        BindingWire {
            actions: Empty {},
            annotations: &self.annotations,
            base_type: kind,
            created: Rfc3339(self.created),
            created_ts: self.created.timestamp_millis(),
            creator_id: None,
            id: &self.id,
            labels: &self.labels,
            links: Links {
                self_link: link,
                remove: link,
                update: link,
            },
            name: &self.name,
            removed: self.removing.map(|(t, _)| Rfc3339(t)),
            removed_ts: self.removing.map(|(t, _)| t.timestamp_millis()),
            state: if self.removing.is_some() { "removing" } else { "active" },
            transitioning: "no",
            transitioning_message: "",
            kind,
            global_role_id: global.then_some(self.role_id.as_str()),
            cluster_id: (self.scope == BindingScope::Cluster).then_some(self.resource_id.as_str()),
            project_id: (self.scope == BindingScope::Project).then_some(self.resource_id.as_str()),
            role_template_id: (!global).then_some(self.role_id.as_str()),
            group_id: (!global).then_some(None),
            namespace_id: (!global).then_some(None),
            service_account: (self.scope == BindingScope::Project).then_some(None),
            user_id: self.user_id.as_deref(),
            user_principal_id: self.user_principal_id.as_deref(),
            group_principal_id: self.group_principal_id.as_deref(),
            status,
        }
    }
}

/// A principal an auth provider knows (the local provider's come from the users).
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub id: String,
    pub name: String,
    pub login_name: String,
    /// `user` or `group`.
    pub principal_type: String,
}

impl Principal {
    pub fn provider(&self) -> &str {
        self.id
            .split_once("://")
            .map_or("local", |(p, _)| p.rsplit_once('_').map_or(p, |(prov, _)| prov))
    }
    pub fn render(&self, ctx: &Ctx) -> Value {
        let me = self.id == format!("local://{}", ctx.owner);
        json!({
            "baseType": "principal",
            "type": "principal",
            "id": self.id,
            "links": {"self": format!("{}/v3/principals/{}", ctx.base, self.id.replace('/', "%2F"))},
            "loginName": self.login_name,
            "name": self.name,
            "me": me,
            "memberOf": false,
            "principalType": self.principal_type,
            "provider": self.provider(),
            "profilePicture": "",
            "profileURL": "",
        })
    }
}

/// Everything the simulator holds.
pub(crate) struct State {
    pub version: RancherVersion,
    pub settle: Duration,
    /// How long after a write the controllers act on it (bindings, new users' principals).
    pub controller_delay: Duration,
    /// Bindings the controller has not handled yet: `(scope, id)`.
    pub pending: Vec<(BindingScope, String)>,
    /// Bindings whose downstream pass has not run yet: `(scope, id)`.
    pub remote_pending: Vec<(BindingScope, String)>,
    /// Per user id, the group principals its auth provider reports (`UserAttribute`).
    pub groups: BTreeMap<String, BTreeSet<String>>,
    /// How far the simulator's clock runs ahead of (or behind) this machine's.
    pub clock_offset: chrono::Duration,
    /// Clusters whose agent is disconnected (`/v3/cluster/{id}/...` stalls, then 500).
    pub disconnected: BTreeSet<String>,
    /// How long a request to a disconnected cluster waits in the dialer before its 500.
    pub disconnect_stall: Duration,
    /// `POST /v3/users` calls left that create the user but fail storing its password.
    pub fail_user_password: usize,
    pub removal_delay: Duration,
    /// How many bindings are `removing` (so the purge pass is skipped when none are).
    pub lingering: usize,
    pub resolve_external: bool,
    pub password_min_length: usize,
    pub clusters: BTreeMap<String, Cluster>,
    pub projects: BTreeMap<String, Project>,
    /// Per cluster id, namespaces by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, Namespace>>,
    pub global_roles: BTreeMap<String, GlobalRole>,
    pub role_templates: BTreeMap<String, RoleTemplate>,
    pub users: BTreeMap<String, User>,
    pub grbs: BindingMap,
    pub crtbs: BindingMap,
    pub prtbs: BindingMap,
    /// External principals the key owner's auth provider can resolve.
    pub directory: BTreeMap<String, Principal>,
    /// Ids left out of every list though readable by id (an informer that has not caught up).
    pub hidden: BTreeSet<String>,
    pub rng: Rng,
}

/// `field` of a JSON body as a string: absent, null and "" are `None`; another type is 422.
fn opt_str(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::new(422, "InvalidType", format!("{field}: expected a string")).field(field)),
    }
}

fn opt_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
        Some(_) => Err(ApiError::new(422, "InvalidType", format!("{field}: expected a boolean")).field(field)),
    }
}

fn opt_map(body: &Map<String, Value>, field: &str) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(ApiError::new(422, "InvalidType", format!("{field}.{k}: expected a string")).field(field)),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        Some(_) => Err(ApiError::new(422, "InvalidType", format!("{field}: expected a map of strings")).field(field)),
    }
}

/// A `labels` or `annotations` map in a PUT body (`None` when absent or null). A `null` value
/// reads as `""`, as Kubernetes decodes null into a map of strings (the connector never sends
/// one).
fn put_map(body: &Map<String, Value>, field: &str) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                Value::Null => Ok((k.clone(), String::new())),
                _ => Err(
                    ApiError::new(422, "InvalidType", format!("{field}.{k}: expected a string or null")).field(field),
                ),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        Some(_) => Err(ApiError::new(422, "InvalidType", format!("{field}: expected a map of strings")).field(field)),
    }
}

/// A key Norman's update keeps whatever the body says: it contains `cattle.io/`, except the
/// `field.cattle.io/` ones (but `field.cattle.io/creatorId` is protected).
fn is_protected(k: &str) -> bool {
    k.contains("cattle.io/") && !(is_field(k) && k != "field.cattle.io/creatorId")
}

fn is_field(k: &str) -> bool {
    k.starts_with("field.cattle.io/")
}

/// Norman's PUT of a map of labels or annotations (rancher/norman `types/convert/merge/merge.go`
/// `mergeProtected`, called by `APIUpdateMerge` from the proxy store's Update): the body's map
/// *replaces* the object's, except that protected keys can be neither set nor removed and
/// `field.cattle.io/` keys are kept when the body leaves them out.
fn merge_protected(current: &mut BTreeMap<String, String>, body: BTreeMap<String, String>) {
    current.retain(|k, _| is_protected(k) || is_field(k) || body.contains_key(k));
    for (k, v) in body {
        if !is_protected(&k) {
            current.insert(k, v);
        }
    }
}

/// The collection name of a binding kind.
pub(crate) fn binding_plural(scope: BindingScope) -> &'static str {
    match scope {
        BindingScope::Global => "globalrolebindings",
        BindingScope::Cluster => "clusterroletemplatebindings",
        BindingScope::Project => "projectroletemplatebindings",
    }
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

impl State {
    pub fn ctx<'a>(&self, base: &'a str, owner: &'a str) -> Ctx<'a> {
        Ctx {
            base,
            owner,
            version: self.version,
            now: Instant::now(),
            clock: self.now_utc(),
        }
    }

    pub fn binding_map(&self, scope: BindingScope) -> &BindingMap {
        match scope {
            BindingScope::Global => &self.grbs,
            BindingScope::Cluster => &self.crtbs,
            BindingScope::Project => &self.prtbs,
        }
    }

    fn binding_map_mut(&mut self, scope: BindingScope) -> &mut BindingMap {
        match scope {
            BindingScope::Global => &mut self.grbs,
            BindingScope::Cluster => &mut self.crtbs,
            BindingScope::Project => &mut self.prtbs,
        }
    }

    pub fn user_principal(&self, user: &User) -> Principal {
        let id = user
            .principal_ids
            .first()
            .cloned()
            .unwrap_or_else(|| format!("local://{}", user.id));
        match self.directory.get(&id) {
            Some(p) => p.clone(),
            None => Principal {
                id,
                name: user.name.clone(),
                login_name: user.username.clone().unwrap_or_default(),
                principal_type: "user".into(),
            },
        }
    }

    /// A group principal as its provider shows it (the directory's entry, else one named after
    /// its id).
    pub fn group_principal(&self, id: &str) -> Principal {
        self.directory.get(id).cloned().unwrap_or_else(|| {
            let name = id.split_once("://").map_or(id, |(_, n)| n).to_string();
            Principal {
                id: id.to_string(),
                name: name.clone(),
                login_name: name,
                principal_type: "group".into(),
            }
        })
    }

    /// `GET /v3/principals/{id}` as the key owner's provider resolves it.
    pub fn principal(&self, id: &str) -> Option<Principal> {
        if let Some(uid) = id.strip_prefix("local://") {
            return self.users.get(uid).map(|u| Principal {
                id: id.to_string(),
                name: u.name.clone(),
                login_name: u.username.clone().unwrap_or_default(),
                principal_type: "user".into(),
            });
        }
        if !self.resolve_external {
            return None;
        }
        if let Some(p) = self.directory.get(id) {
            return Some(p.clone());
        }
        self.users
            .values()
            .find(|u| u.principal_ids.iter().any(|p| p == id))
            .map(|u| self.user_principal(u))
    }

    /// `POST /v3/principals?action=search`: case-insensitive substring of login name or name.
    pub fn search_principals(&self, name: &str, principal_type: Option<&str>) -> Vec<Principal> {
        let needle = name.to_lowercase();
        let wanted = |p: &Principal| {
            principal_type.is_none_or(|t| t == p.principal_type)
                && (p.login_name.to_lowercase().contains(&needle) || p.name.to_lowercase().contains(&needle))
        };
        let mut found: BTreeMap<String, Principal> = BTreeMap::new();
        for u in self.users.values() {
            let local = u.principal_ids.iter().any(|p| p.starts_with("local://"));
            if local || self.resolve_external {
                let p = self.user_principal(u);
                if (local || !p.id.starts_with("local://")) && wanted(&p) {
                    found.insert(p.id.clone(), p);
                }
            }
        }
        if self.resolve_external {
            for p in self.directory.values().filter(|p| wanted(p)) {
                found.insert(p.id.clone(), p.clone());
            }
        }
        found.into_values().collect()
    }

    // ----- users -----

    fn check_password(&self, username: Option<&str>, password: &str) -> Result<(), ApiError> {
        if password.chars().count() < self.password_min_length {
            return Err(ApiError::invalid_body(format!(
                "Password must be at least {} characters",
                self.password_min_length
            )));
        }
        if username == Some(password) {
            return Err(ApiError::invalid_body("Password cannot be the same as username"));
        }
        Ok(())
    }

    pub fn create_user(&mut self, body: &Map<String, Value>) -> Result<User, ApiError> {
        let username = opt_str(body, "username")?.ok_or_else(|| ApiError::missing("username"))?;
        if self
            .users
            .values()
            .any(|u| u.username.as_deref() == Some(username.as_str()))
        {
            return Err(ApiError::new(422, "NotUnique", "Username is already in use.").field("username"));
        }
        let password = opt_str(body, "password")?.unwrap_or_default();
        self.check_password(Some(&username), &password)?;
        let users = &self.users;
        let id = unique_name(&mut self.rng, "u-", |n| users.contains_key(n));
        // `user_store.go` Create makes the User, then its password Secret: not atomic.
        let password_fails = self.fail_user_password > 0;
        if password_fails {
            self.fail_user_password -= 1;
        }
        let user = User {
            principal_ids: vec![format!("local://{id}")],
            id: id.clone(),
            name: opt_str(body, "name")?.unwrap_or_default(),
            description: opt_str(body, "description")?.unwrap_or_default(),
            username: Some(username),
            labels: opt_map(body, "labels")?.unwrap_or_default(),
            annotations: opt_map(body, "annotations")?.unwrap_or_default(),
            enabled: opt_bool(body, "enabled")?.unwrap_or(true),
            must_change_password: opt_bool(body, "mustChangePassword")?.unwrap_or(false),
            password: (!password_fails).then_some(password),
            principals_at: (!self.controller_delay.is_zero()).then(|| Instant::now() + self.controller_delay),
            created: self.now_utc(),
        };
        self.users.insert(id.clone(), user.clone());
        if password_fails {
            return Err(ApiError::new(
                500,
                "ServerError",
                format!(
                    "Internal error occurred: failed to create the password secret for user {id} (simulated fault)"
                ),
            ));
        }
        Ok(user)
    }

    pub fn update_user(&mut self, id: &str, body: &Map<String, Value>, owner: &str) -> Result<User, ApiError> {
        let name = opt_str(body, "name")?;
        let description = body
            .get("description")
            .map(|_| opt_str(body, "description"))
            .transpose()?;
        let labels = put_map(body, "labels")?;
        let annotations = put_map(body, "annotations")?;
        let enabled = opt_bool(body, "enabled")?;
        let must_change = opt_bool(body, "mustChangePassword")?;
        if id == owner && enabled == Some(false) {
            return Err(ApiError::new(422, "InvalidAction", "You cannot deactivate yourself"));
        }
        let user = self.users.get_mut(id).ok_or_else(|| k8s_not_found("users", id))?;
        if let Some(n) = name {
            user.name = n;
        }
        if let Some(d) = description {
            user.description = d.unwrap_or_default();
        }
        if let Some(l) = labels {
            merge_protected(&mut user.labels, l);
        }
        if let Some(a) = annotations {
            merge_protected(&mut user.annotations, a);
        }
        if let Some(e) = enabled {
            user.enabled = e;
        }
        if let Some(m) = must_change {
            user.must_change_password = m;
        }
        Ok(user.clone())
    }

    /// Deletes the user and, as Rancher's controller does, its GRBs, CRTBs and PRTBs.
    pub fn delete_user(&mut self, id: &str, owner: &str) -> Result<User, ApiError> {
        if id == owner {
            return Err(ApiError::new(422, "InvalidAction", "You cannot delete yourself"));
        }
        let user = self.users.remove(id).ok_or_else(|| k8s_not_found("users", id))?;
        for map in [&mut self.grbs, &mut self.crtbs, &mut self.prtbs] {
            map.retain(|_, b| b.user_id.as_deref() != Some(id));
        }
        Ok(user)
    }

    pub fn set_password(&mut self, id: &str, body: &Map<String, Value>) -> Result<User, ApiError> {
        let username = self
            .users
            .get(id)
            .ok_or_else(|| k8s_not_found("users", id))?
            .username
            .clone();
        let password = opt_str(body, "newPassword")?.ok_or_else(|| ApiError::missing("newPassword"))?;
        self.check_password(username.as_deref(), &password)?;
        let user = self.users.get_mut(id).ok_or_else(|| k8s_not_found("users", id))?;
        user.password = Some(password);
        user.must_change_password = false;
        Ok(user.clone())
    }

    pub fn add_user(&mut self, u: SimUser) -> Result<(), String> {
        if self.users.contains_key(&u.id) {
            return Err(format!("user id {} is in use", u.id));
        }
        if u.username.is_some() && self.users.values().any(|x| x.username == u.username) {
            return Err(format!("username {:?} is in use", u.username));
        }
        self.users.insert(
            u.id.clone(),
            User {
                id: u.id,
                username: u.username,
                name: u.name,
                description: u.description,
                principal_ids: u.principal_ids,
                labels: u.labels,
                annotations: BTreeMap::new(),
                enabled: u.enabled,
                must_change_password: u.must_change_password,
                password: None,
                principals_at: None,
                created: self.now_utc(),
            },
        );
        Ok(())
    }

    // ----- bindings -----

    /// The user EnsureUser finds for a principal: any user listing it, and every user under
    /// `local://<its id>` (`usermanager.go` `userByPrincipal` indexes that one for all users).
    fn user_by_principal(&self, principal: &str) -> Option<String> {
        if let Some(uid) = principal.strip_prefix("local://")
            && self.users.contains_key(uid)
        {
            return Some(uid.to_string());
        }
        self.users
            .values()
            .find(|u| u.principal_ids.iter().any(|p| p == principal))
            .map(|u| u.id.clone())
    }

    /// EnsureUser (`pkg/auth/providers/common/usermanager.go`): the user behind a principal,
    /// created when missing as `u-<base32(sha256(principal))[:10]>` with the GRBs of every global
    /// role marked `newUserDefault` (`createUsersBindings`). It does not check that a `local://`
    /// principal names a real user: `local://u-ghost` gets a user of its own.
    fn ensure_user(&mut self, principal: &str, display_name: Option<&str>) -> String {
        if let Some(id) = self.user_by_principal(principal) {
            return id;
        }
        let id = external_user_id(principal);
        let name = display_name
            .map(str::to_string)
            .or_else(|| self.directory.get(principal).map(|p| p.name.clone()))
            .unwrap_or_default();
        self.users.insert(
            id.clone(),
            User {
                id: id.clone(),
                username: None,
                name,
                description: String::new(),
                principal_ids: vec![principal.to_string()],
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                enabled: true,
                must_change_password: false,
                password: None,
                principals_at: None,
                created: self.now_utc(),
            },
        );
        let defaults: Vec<String> = self
            .global_roles
            .values()
            .filter(|r| r.new_user_default)
            .map(|r| r.id.clone())
            .collect();
        for role in defaults {
            let grbs = &self.grbs;
            let grb = unique_name(&mut self.rng, "grb-", |n| grbs.contains_key(n));
            let mut b = self.owner_grb(&grb, &id, &role);
            b.user_principal_id = None;
            self.grbs.insert(grb, b);
        }
        id
    }

    /// Runs the binding controllers on every binding whose time has come (lazily, on the next
    /// request or [`super::Sim`] read): the management pass, then the downstream pass.
    pub fn reconcile(&mut self, now: Instant) {
        if !self.pending.is_empty() {
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.pending).into_iter().partition(|(scope, id)| {
                    self.binding_map(*scope)
                        .get(id)
                        .is_none_or(|b| b.reconcile_at.is_none_or(|t| t <= now))
                });
            self.pending = later;
            for (scope, id) in due {
                self.reconcile_binding(scope, &id);
            }
        }
        if !self.remote_pending.is_empty() {
            let waiting = std::mem::take(&mut self.remote_pending);
            for (scope, id) in waiting {
                let Some(b) = self.binding_map(scope).get(&id) else {
                    continue; // deleted meanwhile
                };
                // The downstream handler runs in the cluster's agent: not while it is away.
                let reachable = scope != BindingScope::Cluster || !self.disconnected.contains(&b.resource_id);
                if b.reconcile_at.is_none() && b.settled(now) && reachable {
                    if let Some(b) = self.binding_map_mut(scope).get_mut(&id) {
                        b.remote_done = Some(true);
                    }
                } else {
                    self.remote_pending.push((scope, id));
                }
            }
        }
    }

    /// Makes every controller finish at once: bindings handled (management and downstream pass,
    /// but no downstream pass for a cluster whose agent is disconnected), new users' principals
    /// filled.
    pub fn reconcile_all(&mut self) {
        let now = Instant::now();
        for map in [&mut self.grbs, &mut self.crtbs, &mut self.prtbs] {
            for b in map.values_mut() {
                b.settles_at = None;
                if b.reconcile_at.is_some() {
                    b.reconcile_at = Some(now);
                }
            }
        }
        for u in self.users.values_mut() {
            u.principals_at = None;
        }
        self.reconcile(now);
    }

    /// `crtb_handler.go` reconcileSubject (the PRTB and GRB handlers alike): a principal alone
    /// gets its user from EnsureUser; a `userId` alone gets `userPrincipalId` only from a
    /// principal that ends with the user id (`local://u-x`, never an external one).
    fn reconcile_binding(&mut self, scope: BindingScope, id: &str) {
        let Some(b) = self.binding_map(scope).get(id) else {
            return; // deleted meanwhile
        };
        let (user_id, upid, group) = (
            b.user_id.clone(),
            b.user_principal_id.clone(),
            b.group_principal_id.is_some(),
        );
        let display = b.annotations.get(PRINCIPAL_DISPLAY_NAME).cloned();
        let mut set_user = None;
        let mut set_upid = None;
        let mut error = false;
        match (&user_id, &upid) {
            _ if group => {}
            (Some(_), Some(_)) => {}
            (None, Some(p)) => set_user = Some(self.ensure_user(p, display.as_deref())),
            (Some(uid), None) => match self.users.get(uid) {
                Some(u) => set_upid = u.principal_ids.iter().find(|p| p.ends_with(uid.as_str())).cloned(),
                None => error = true,
            },
            (None, None) => error = true,
        }
        let mut remote = false;
        if let Some(b) = self.binding_map_mut(scope).get_mut(id) {
            if set_user.is_some() {
                b.user_id = set_user;
            }
            if set_upid.is_some() {
                b.user_principal_id = set_upid;
            }
            b.subject_error = error;
            b.reconcile_at = None;
            remote = b.remote_done == Some(false) && !error;
        }
        if remote {
            self.remote_pending.push((scope, id.to_string()));
        }
    }

    /// `POST /v3/{globalrolebindings|clusterroletemplatebindings|projectroletemplatebindings}`,
    /// checked in Rancher's order: Norman's validator (role template, then subject), the store
    /// (principal lookup, global role lookup), Kubernetes (namespace, name), the webhook
    /// (duplicates). The object is stored as posted; the controller fills the rest later.
    pub fn create_binding(&mut self, scope: BindingScope, body: &Map<String, Value>) -> Result<Binding, ApiError> {
        let name = opt_str(body, "name")?;
        let user_id = opt_str(body, "userId")?;
        let upid = opt_str(body, "userPrincipalId")?;
        let gpid = opt_str(body, "groupPrincipalId")?;
        let group_id = opt_str(body, "groupId")?;
        // Norman's `metadata` mapper keeps both maps on create (rancher-api-notes §6).
        let labels = opt_map(body, "labels")?.unwrap_or_default();
        let mut annotations = opt_map(body, "annotations")?.unwrap_or_default();
        let plural = binding_plural(scope);

        let (role_id, resource_id, namespace) = match scope {
            BindingScope::Global => {
                // `customization/globalrolebinding/validator.go`: userId or groupPrincipalId only.
                if user_id.is_some() == gpid.is_some() {
                    return Err(ApiError::invalid_body(
                        "must target a user [userId] OR a group [groupPrincipalId]; userPrincipalId alone is not accepted",
                    ));
                }
                let role = opt_str(body, "globalRoleId")?.ok_or_else(|| ApiError::missing("globalRoleId"))?;
                // `store/globalrolebindings/globalrolebinding_store.go` addOwnerReference: the
                // lister's NotFound becomes Norman's 404.
                if !self.global_roles.contains_key(&role) {
                    return Err(k8s_not_found("globalroles", &role));
                }
                (role, "global".to_string(), None)
            }
            BindingScope::Cluster | BindingScope::Project => {
                let (context, resource_field) = if scope == BindingScope::Cluster {
                    ("cluster", "clusterId")
                } else {
                    ("project", "projectId")
                };
                // `customization/roletemplatebinding/validator.go`: the role template first.
                let role = opt_str(body, "roleTemplateId")?.ok_or_else(|| {
                    ApiError::new(422, "MissingRequired", "Request does not have a valid roleTemplateId")
                })?;
                let rt = self.role_templates.get(&role).ok_or_else(|| {
                    ApiError::new(
                        500,
                        "ServerError",
                        format!("Error getting role template: roletemplates.management.cattle.io \"{role}\" not found"),
                    )
                })?;
                if rt.locked {
                    return Err(ApiError::new(
                        422,
                        "InvalidState",
                        "Role is locked and cannot be assigned",
                    ));
                }
                if rt.context != context {
                    return Err(ApiError::invalid_body(format!(
                        "Cannot reference context [{}] from [{context}] context",
                        rt.context
                    )));
                }
                let has_user = user_id.is_some() || upid.is_some();
                let has_group = gpid.is_some() || group_id.is_some();
                if has_user == has_group {
                    return Err(ApiError::invalid_body(
                        "must target a user [userId]/[userPrincipalId] OR a group [groupId]/[groupPrincipalId]",
                    ));
                }
                let resource = opt_str(body, resource_field)?.ok_or_else(|| ApiError::missing(resource_field))?;
                // 2.12+: the scoped store (the outermost PRTB store) looks the project up before
                // anything else is stored (`pkg/api/norman/store/scoped/store.go` Create): the
                // lister's NotFound is not a Norman error, so Norman answers it as a 500
                // (`httperror/handler`). Before 2.12 it only set the namespace (a 404 below).
                if scope == BindingScope::Project
                    && self.version.minor >= 12
                    && let Some((cluster, project)) = resource.split_once(':')
                    && !self.projects.contains_key(&resource)
                {
                    return Err(ApiError::new(
                        500,
                        "ServerError",
                        format!("projects.management.cattle.io \"{cluster}/{project}\" not found"),
                    ));
                }
                // `customization/authn/rtb_store.go` Create: an external principal is looked up
                // with the key owner's auth provider (`local://` ones are not). The key's owner
                // here is a local user: the local provider looks the id's user up by name and its
                // NotFound is answered as a 500 (`local_auth_provider.go` GetPrincipal).
                if let Some(p) = upid.as_deref().filter(|p| !p.starts_with("local://")) {
                    if !self.resolve_external {
                        let name = p.split_once(':').map_or(p, |(_, n)| n.trim_start_matches('/'));
                        return Err(ApiError::new(
                            500,
                            "ServerError",
                            format!("users.management.cattle.io \"{name}\" not found"),
                        ));
                    }
                    if let Some(found) = self.directory.get(p).filter(|d| !d.name.is_empty()) {
                        annotations.insert(PRINCIPAL_DISPLAY_NAME.to_string(), found.name.clone());
                    }
                }
                // The binding lives in the cluster's (or project's) namespace: Kubernetes'
                // NamespaceLifecycle admission refuses a create in one that does not exist.
                let namespace = if scope == BindingScope::Cluster {
                    if !self.clusters.contains_key(&resource) {
                        return Err(ApiError::not_found(format!("namespaces \"{resource}\" not found")));
                    }
                    resource.clone()
                } else {
                    match self.projects.get(&resource) {
                        Some(project) => project.prtb_namespace(self.version),
                        None => {
                            let short = resource.split_once(':').map_or(resource.as_str(), |(_, p)| p);
                            return Err(ApiError::not_found(format!("namespaces \"{short}\" not found")));
                        }
                    }
                };
                (role, resource, Some(namespace))
            }
        };
        // No reference validation: a `userId` naming no user is stored as given (the controller
        // then reports `Error`).
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "metadata.name: Invalid value: \"{n}\": a lowercase RFC 1123 subdomain must consist of lower case \
                     alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            )
            .field("name"));
        }
        let id_of = |n: &str| match &namespace {
            Some(ns) => format!("{ns}:{n}"),
            None => n.to_string(),
        };
        if let Some(n) = &name
            && let Some(existing) = self.binding_map(scope).get(&id_of(n))
        {
            // Kubernetes' registry says so while finalizers still hold the old object
            // (`staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go`, review F9/S9).
            let prefix = if existing.removing.is_some() {
                "object is being deleted: "
            } else {
                ""
            };
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{prefix}{plural}.management.cattle.io \"{n}\" already exists"),
            ));
        }

        // The admission webhook's duplicate check (2.14+ for CRTBs, 2.15+ for PRTBs), on the raw
        // fields: a binding by principal and one by the same person's `userId` are not duplicates.
        let webhook_blocks = match scope {
            BindingScope::Global => false,
            BindingScope::Cluster => self.version.minor >= 14,
            BindingScope::Project => self.version.minor >= 15,
        };
        let group = gpid.clone().or_else(|| group_id.clone());
        if webhook_blocks {
            let dup = self
                .binding_map(scope)
                .values()
                .filter(|b| b.removing.is_none())
                .any(|b| {
                    b.role_id == role_id && b.resource_id == resource_id && b.same_subject(&user_id, &upid, &group)
                });
            if dup {
                let short = if scope == BindingScope::Cluster { "crtb" } else { "prtb" };
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "admission webhook \"rancher.cattle.io.{plural}.management.cattle.io\" denied the request: \
                         duplicate {short} not allowed"
                    ),
                ));
            }
        }

        let prefix = match scope {
            BindingScope::Global => "grb-",
            BindingScope::Cluster => "crtb-",
            BindingScope::Project => "prtb-",
        };
        let name = match name {
            Some(n) => n,
            None => {
                let map = match scope {
                    BindingScope::Global => &self.grbs,
                    BindingScope::Cluster => &self.crtbs,
                    BindingScope::Project => &self.prtbs,
                };
                unique_name(&mut self.rng, prefix, |n| map.contains_key(&id_of(n)))
            }
        };
        let now = Instant::now();
        let admin_role =
            scope == BindingScope::Global && self.global_roles.get(&role_id).is_some_and(GlobalRole::is_admin);
        let binding = Binding {
            id: id_of(&name),
            name,
            scope,
            role_id,
            resource_id,
            user_id,
            user_principal_id: upid,
            group_principal_id: gpid.or(group_id),
            labels,
            annotations,
            created: self.now_utc(),
            settles_at: (!self.settle.is_zero()).then(|| now + self.settle),
            remote_done: Binding::remote_pass(scope, admin_role),
            reconcile_at: Some(now + self.controller_delay),
            subject_error: false,
            removing: None,
        };
        self.pending.push((scope, binding.id.clone()));
        self.binding_map_mut(scope).insert(binding.id.clone(), binding.clone());
        Ok(binding)
    }
    /// `PUT /v3/{bindings}/{id}`: a `labels` or `annotations` map replaces the object's (see
    /// [`merge_protected`]); a body without one leaves it alone. The admission webhook refuses a change of role, resource or an already set subject
    /// with 400 BadRequest "field is immutable" (rancher/webhook
    /// `pkg/resources/management.cattle.io/v3/clusterroletemplatebinding/validator.go`
    /// `validateUpdateFields`, likewise for PRTBs and GRBs); a field repeated unchanged is fine,
    /// as when a client sends back the object it read.
    pub fn update_binding(
        &mut self,
        scope: BindingScope,
        id: &str,
        body: &Map<String, Value>,
    ) -> Result<Binding, ApiError> {
        let plural = binding_plural(scope);
        let name = id.split_once(':').map_or(id, |(_, n)| n);
        let labels = put_map(body, "labels")?;
        let annotations = put_map(body, "annotations")?;
        let b = self
            .binding_map(scope)
            .get(id)
            .ok_or_else(|| k8s_not_found(plural, name))?;
        let (role_field, role_internal) = match scope {
            BindingScope::Global => ("globalRoleId", "globalRoleName"),
            _ => ("roleTemplateId", "roleTemplateName"),
        };
        let resource = match scope {
            BindingScope::Global => None,
            BindingScope::Cluster => Some(("clusterId", "clusterName")),
            BindingScope::Project => Some(("projectId", "projectName")),
        };
        let mut fixed: Vec<(&str, &str, Option<&str>)> = vec![(role_field, role_internal, Some(b.role_id.as_str()))];
        if let Some((f, internal)) = resource {
            fixed.push((f, internal, Some(b.resource_id.as_str())));
        }
        // A subject field already set cannot change (an unset one given here is ignored).
        fixed.push(("userId", "userName", b.user_id.as_deref()));
        fixed.push(("userPrincipalId", "userPrincipalName", b.user_principal_id.as_deref()));
        fixed.push((
            "groupPrincipalId",
            "groupPrincipalName",
            b.group_principal_id.as_deref(),
        ));
        let kind = plural.trim_end_matches('s');
        for (field, internal, current) in fixed {
            if let (Some(new), Some(old)) = (opt_str(body, field)?, current)
                && new != old
            {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "admission webhook \"rancher.cattle.io.{plural}.management.cattle.io\" denied the request: \
                         {kind}.{internal}: Invalid value: \"{new}\": field is immutable"
                    ),
                ));
            }
        }
        let b = self
            .binding_map_mut(scope)
            .get_mut(id)
            .ok_or_else(|| k8s_not_found(plural, name))?;
        if let Some(l) = labels {
            merge_protected(&mut b.labels, l);
        }
        if let Some(a) = annotations {
            merge_protected(&mut b.annotations, a);
        }
        Ok(b.clone())
    }

    /// Deletes a binding. The answer carries `removed` (finalizers run on the real server); with
    /// a `removal_delay` the binding stays listed, still holding its name, until the delay ends.
    pub fn delete_binding(&mut self, scope: BindingScope, id: &str) -> Result<Binding, ApiError> {
        let plural = match scope {
            BindingScope::Global => "globalrolebindings",
            BindingScope::Cluster => "clusterroletemplatebindings",
            BindingScope::Project => "projectroletemplatebindings",
        };
        let name = id.split_once(':').map_or(id, |(_, n)| n);
        let delay = self.removal_delay;
        let now = (self.now_utc(), Instant::now() + delay);
        if delay.is_zero() {
            let mut b = self
                .binding_map_mut(scope)
                .remove(id)
                .ok_or_else(|| k8s_not_found(plural, name))?;
            b.removing = Some(now);
            return Ok(b);
        }
        let b = self
            .binding_map_mut(scope)
            .get_mut(id)
            .ok_or_else(|| k8s_not_found(plural, name))?;
        let newly = b.removing.is_none();
        if newly {
            b.removing = Some(now);
        }
        let b = b.clone();
        if newly {
            self.lingering += 1;
        }
        Ok(b)
    }

    /// Drops bindings whose removal has finished.
    pub fn purge(&mut self) {
        if self.lingering == 0 {
            return;
        }
        let now = Instant::now();
        let mut left = 0;
        for map in [&mut self.grbs, &mut self.crtbs, &mut self.prtbs] {
            map.retain(|_, b| b.removing.is_none_or(|(_, t)| t > now));
            left += map.values().filter(|b| b.removing.is_some()).count();
        }
        self.lingering = left;
    }

    /// The group principals of `user` (none unless given with [`super::Sim::set_user_groups`]).
    pub fn groups_of(&self, user: &str) -> impl Iterator<Item = &String> {
        self.groups.get(user).into_iter().flatten()
    }

    /// Whether binding `b` (live) is bound to `user`: by `userId`, or to one of its groups.
    pub fn binds(&self, b: &Binding, user: &str) -> bool {
        b.removing.is_none()
            && (b.user_id.as_deref() == Some(user)
                || b.group_principal_id
                    .as_ref()
                    .is_some_and(|g| self.groups.get(user).is_some_and(|gs| gs.contains(g))))
    }

    fn admin_role(&self, id: &str) -> bool {
        self.global_roles.get(id).is_some_and(GlobalRole::is_admin)
    }

    /// Whether `user` is an admin as Rancher decides it: a live GRB to it or to one of its
    /// groups, of a role `IsAdminGlobalRole` accepts (the built-in `admin` or a copy of its rules).
    pub fn is_admin(&self, user: &str) -> bool {
        self.grbs
            .values()
            .any(|b| self.binds(b, user) && self.admin_role(&b.role_id))
    }

    /// The rules of every global role bound to `user` (directly or through a group).
    pub fn global_rules(&self, user: &str) -> Vec<&PolicyRule> {
        self.grbs
            .values()
            .filter(|b| self.binds(b, user))
            .filter_map(|b| self.global_roles.get(&b.role_id))
            .flat_map(|r| r.rules.iter())
            .collect()
    }

    /// A custom global role (not built in).
    pub fn add_global_role(&mut self, id: &str, rules: Vec<PolicyRule>) -> Result<(), String> {
        if self.global_roles.contains_key(id) {
            return Err(format!("global role {id} exists"));
        }
        let created = self.now_utc();
        self.global_roles.insert(
            id.to_string(),
            GlobalRole {
                id: id.to_string(),
                name: id.to_string(),
                description: String::new(),
                builtin: false,
                new_user_default: false,
                created,
                rules,
            },
        );
        Ok(())
    }

    /// The simulator's clock (this machine's plus the offset).
    pub fn now_utc(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// Makes `user` an admin (a GRB `admin`, id `grb-admin` when free) or takes away its own
    /// admin GRBs (to any admin role; a group's stay), adding a `user` GRB `grb-owner` so it can
    /// still log in, as another admin would.
    pub fn set_admin(&mut self, user: &str, on: bool) {
        let direct = self
            .grbs
            .values()
            .any(|b| b.removing.is_none() && b.user_id.as_deref() == Some(user) && self.admin_role(&b.role_id));
        if on == direct {
            return;
        }
        if on {
            let id = if self.grbs.contains_key("grb-admin") {
                let grbs = &self.grbs;
                unique_name(&mut self.rng, "grb-", |n| grbs.contains_key(n))
            } else {
                "grb-admin".to_string()
            };
            self.grbs
                .insert(id.clone(), self.owner_grb(&id, user, super::view::ADMIN_ROLE));
            return;
        }
        let admin_roles: BTreeSet<String> = self
            .global_roles
            .values()
            .filter(|r| r.is_admin())
            .map(|r| r.id.clone())
            .collect();
        self.grbs
            .retain(|_, b| !(admin_roles.contains(&b.role_id) && b.user_id.as_deref() == Some(user)));
        let has_user = self
            .grbs
            .values()
            .any(|b| b.role_id == "user" && b.user_id.as_deref() == Some(user));
        if !has_user && !self.grbs.contains_key("grb-owner") {
            self.grbs
                .insert("grb-owner".into(), self.owner_grb("grb-owner", user, "user"));
        }
    }

    fn owner_grb(&self, id: &str, user: &str, role: &str) -> Binding {
        let admin = self.admin_role(role);
        Binding {
            id: id.into(),
            name: id.into(),
            scope: BindingScope::Global,
            role_id: role.into(),
            resource_id: "global".into(),
            user_id: Some(user.into()),
            user_principal_id: Some(format!("local://{user}")),
            group_principal_id: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created: self.now_utc(),
            settles_at: None,
            remote_done: Binding::remote_pass(BindingScope::Global, admin).map(|_| true),
            reconcile_at: None,
            subject_error: false,
            removing: None,
        }
    }

    pub fn remove_binding(&mut self, id: &str) -> Option<Binding> {
        self.grbs
            .remove(id)
            .or_else(|| self.crtbs.remove(id))
            .or_else(|| self.prtbs.remove(id))
    }

    pub fn add_binding(&mut self, b: SimBinding) -> Result<(), String> {
        match b.scope {
            BindingScope::Global if !self.global_roles.contains_key(&b.role_id) => {
                return Err(format!("unknown global role {}", b.role_id));
            }
            BindingScope::Cluster | BindingScope::Project if !self.role_templates.contains_key(&b.role_id) => {
                return Err(format!("unknown role template {}", b.role_id));
            }
            BindingScope::Cluster if !self.clusters.contains_key(&b.resource_id) => {
                return Err(format!("unknown cluster {}", b.resource_id));
            }
            BindingScope::Project if !self.projects.contains_key(&b.resource_id) => {
                return Err(format!("unknown project {}", b.resource_id));
            }
            _ => {}
        }
        if self.binding_map(b.scope).contains_key(&b.id) {
            return Err(format!("binding id {} is in use", b.id));
        }
        let admin = b.scope == BindingScope::Global && self.admin_role(&b.role_id);
        let binding = Binding {
            id: b.id.clone(),
            name: b.name,
            scope: b.scope,
            role_id: b.role_id,
            resource_id: b.resource_id,
            user_id: b.user_id,
            user_principal_id: b.user_principal_id,
            group_principal_id: b.group_principal_id,
            labels: b.labels,
            annotations: b.annotations,
            created: self.now_utc(),
            settles_at: None,
            remote_done: Binding::remote_pass(b.scope, admin).map(|_| true),
            reconcile_at: None,
            subject_error: false,
            removing: None,
        };
        self.binding_map_mut(b.scope).insert(b.id, binding);
        Ok(())
    }
}
