//! The `Integration` trait and the typed requests and results of its operations.
//!
//! An integration is built per job from its spec and its freshly resolved secret; it knows nothing
//! of the control plane in use. `rancher/` is the one implementation today.

pub mod ids;
pub mod rancher;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::secrets::{Secret, SecretRef};

/// `{id?, type, name, config, secret_store}` as carried by a job or given on the command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub config: Value,
    pub secret_store: SecretRef,
}

/// Integration types this build can run.
pub const INTEGRATION_TYPES: &[&str] = &[rancher::TYPE];

/// Builds the integration named by `spec.kind` with its resolved secret.
///
/// # Errors
/// `Invalid` for an unknown type, `Config` for a config the integration rejects.
pub fn build(spec: &IntegrationSpec, secret: &Secret) -> Result<Box<dyn Integration>, IntegrationError> {
    build_with(spec, secret, None)
}

/// [`build`] for the agent: each request to the integration's server holds one of `workers`
/// while it is in flight, so the agent's workers bound requests in flight, not jobs in progress
/// (a job waiting for Rancher to settle holds none). The HTTP client is not built here: it comes
/// from the process-wide cache of one client per endpoint (`rancher::client::Endpoint`).
///
/// # Errors
/// As [`build`].
pub fn build_with(
    spec: &IntegrationSpec,
    secret: &Secret,
    workers: Option<std::sync::Arc<tokio::sync::Semaphore>>,
) -> Result<Box<dyn Integration>, IntegrationError> {
    match spec.kind.to_ascii_lowercase().as_str() {
        rancher::TYPE => Ok(Box::new(rancher::Rancher::new(spec, secret)?.with_workers(workers))),
        other => Err(IntegrationError::Invalid {
            message: format!(
                "unknown integration type {other:?} (integration {:?}); this agent supports: {}",
                spec.name,
                INTEGRATION_TYPES.join(", ")
            ),
        }),
    }
}

/// Checks an integration's config without credentials or network (used when a config or an
/// access request is loaded, so a bad one is refused before any job runs).
pub fn validate_spec(spec: &IntegrationSpec) -> Result<(), IntegrationError> {
    match spec.kind.to_ascii_lowercase().as_str() {
        rancher::TYPE => rancher::RancherConfig::from_value(&spec.config).map(|_| ()),
        other => Err(IntegrationError::Invalid {
            message: format!(
                "unknown integration type {other:?}; this agent supports: {}",
                INTEGRATION_TYPES.join(", ")
            ),
        }),
    }
}

/// The operations every integration offers. Each is idempotent: running it twice has the effect
/// of running it once, and a repeat reports success.
#[async_trait]
pub trait Integration: Send + Sync {
    async fn validate(&self) -> Result<ValidateResult, IntegrationError>;
    /// Streams every discovered object into `sink`; returns counts when done. Stops early (with
    /// `Ok`) if the receiver is dropped.
    async fn discover(&self, sink: mpsc::Sender<DiscoveredObject>) -> Result<DiscoverySummary, IntegrationError>;
    async fn grant(&self, request: &GrantRequest) -> Result<GrantResult, IntegrationError>;
    async fn revoke(&self, request: &RevokeRequest) -> Result<RevokeResult, IntegrationError>;
    async fn rotate_credentials(&self, request: &RotateRequest) -> Result<GrantResult, IntegrationError>;
    async fn delete_user(&self, request: &DeleteUserRequest) -> Result<DeleteUserResult, IntegrationError>;
    /// Removes the connector's own bindings whose marked expiry has passed (see [`SweepRequest`]).
    async fn sweep(&self, request: &SweepRequest) -> Result<SweepResult, IntegrationError>;
}

/// Who gets the access.
///
/// On the wire (job params, CLI): `{"user": "alice"}`, `{"user": "github_user://123"}` or
/// `{"group": "okta_group://admins"}`. A user value with `://` is a principal id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Username(String),
    UserPrincipal(String),
    GroupPrincipal(String),
}

impl Subject {
    pub fn user(value: &str) -> Subject {
        if value.contains("://") {
            Subject::UserPrincipal(value.to_string())
        } else {
            Subject::Username(value.to_string())
        }
    }

    /// The subject as given, for messages and keys.
    pub fn as_str(&self) -> &str {
        match self {
            Subject::Username(s) | Subject::UserPrincipal(s) | Subject::GroupPrincipal(s) => s,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Username(s) => write!(f, "user {s}"),
            Subject::UserPrincipal(s) => write!(f, "user principal {s}"),
            Subject::GroupPrincipal(s) => write!(f, "group {s}"),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SubjectWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

impl Serialize for Subject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = match self {
            Subject::Username(v) | Subject::UserPrincipal(v) => SubjectWire {
                user: Some(v.clone()),
                group: None,
            },
            Subject::GroupPrincipal(v) => SubjectWire {
                user: None,
                group: Some(v.clone()),
            },
        };
        wire.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = SubjectWire::deserialize(d)?;
        match (wire.user, wire.group) {
            (Some(u), None) if !u.trim().is_empty() => Ok(Subject::user(u.trim())),
            (None, Some(g)) if !g.trim().is_empty() => Ok(Subject::GroupPrincipal(g.trim().to_string())),
            (Some(_), Some(_)) => Err(serde::de::Error::custom("give either \"user\" or \"group\", not both")),
            _ => Err(serde::de::Error::custom(
                "missing subject: give \"user\" (a username or principal id) or \"group\" (a group principal id)",
            )),
        }
    }
}

/// What the access is to. On the wire a string: `global`, a cluster id (`c-x`, `local`) or a
/// project id (`c-x:p-y`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    Global,
    Cluster(String),
    Project(String),
}

impl Resource {
    /// # Errors
    /// An empty id, or a project id that is not `cluster:project`.
    pub fn parse(s: &str) -> Result<Resource, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "resource is empty: give \"global\", a cluster id (c-xxxxx) or a project id (c-xxxxx:p-yyyyy)".into(),
            );
        }
        if s == "global" {
            return Ok(Resource::Global);
        }
        // Checked here, where ids enter, so a hostile id never reaches a URL (see `ids`).
        match s.split_once(':') {
            None => {
                ids::check_plain("resource", s).map_err(|e| {
                    format!("{e}; give \"global\", a cluster id (c-xxxxx) or a project id (c-xxxxx:p-yyyyy)")
                })?;
                Ok(Resource::Cluster(s.to_string()))
            }
            Some((c, p)) if !c.is_empty() && !p.is_empty() && !p.contains(':') => {
                ids::check_namespaced("resource", s)
                    .map_err(|e| format!("{e}; a project id has the form c-xxxxx:p-yyyyy"))?;
                Ok(Resource::Project(s.to_string()))
            }
            Some(_) => Err(format!(
                "resource {s:?} is not a project id of the form c-xxxxx:p-yyyyy"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Resource::Global => "global",
            Resource::Cluster(s) | Resource::Project(s) => s,
        }
    }

    pub fn scope(&self) -> BindingScope {
        match self {
            Resource::Global => BindingScope::Global,
            Resource::Cluster(_) => BindingScope::Cluster,
            Resource::Project(_) => BindingScope::Project,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment (`{:<20}` in tables).
        f.pad(self.as_str())
    }
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Resource::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingScope {
    Global,
    Cluster,
    Project,
}

/// Which connector made a binding: its connector id and the install id kept in its state
/// (`standalone/0193c5d2...`), or `cli` for the one-shot commands. Written in the marker of every
/// binding the connector creates and hashed into the binding's name, so two connectors never
/// share a binding and a copy under another name is never the connector's (see
/// `rancher::names`). On the wire a string: `CONNECTOR[/INSTALL]`, each part 1-64 of
/// `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(String);

impl Owner {
    /// The owner of the one-shot `grant`/`revoke` commands.
    pub const CLI: &'static str = "cli";

    /// # Errors
    /// A message naming what is wrong with the value.
    pub fn parse(value: &str) -> Result<Owner, String> {
        let v = value.trim();
        let mut parts = v.split('/');
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.len() <= 64
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let connector = parts.next().unwrap_or_default();
        let install = parts.next();
        if !ok_part(connector) || install.is_some_and(|i| !ok_part(i)) || parts.next().is_some() {
            return Err(format!(
                "owner {:?} is not CONNECTOR[/INSTALL] (each part 1-64 letters, digits, '.', '_' or '-')",
                v.chars().take(80).collect::<String>()
            ));
        }
        Ok(Owner(v.to_string()))
    }

    /// `connector/install`.
    pub fn new(connector: &str, install: &str) -> Result<Owner, String> {
        Owner::parse(&format!("{connector}/{install}"))
    }

    /// The one-shot commands' owner.
    pub fn cli() -> Owner {
        Owner(Owner::CLI.to_string())
    }

    /// The connector id alone (before the `/`).
    pub fn connector(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_cli(&self) -> bool {
        self.0 == Owner::CLI
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Owner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Owner::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The field a binding is bound by, and its value, as the grant resolved it: what two accesses
/// must share to share a binding (the overlap key names this, not the subject string a request
/// gave). `{"field": "userId", "value": "u-abc12"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BoundSubject {
    /// `userId`, `userPrincipalId` or `groupPrincipalId`.
    pub field: String,
    pub value: String,
}

impl BoundSubject {
    /// `field=value`, the form kept in the control plane's overlap key.
    pub fn key(&self) -> String {
        format!("{}={}", self.field, self.value)
    }
}

/// Params of a grant job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    #[serde(flatten)]
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    #[serde(default)]
    pub create_user: bool,
    /// Which grant this is (the access request's id): written in the marker of every binding the
    /// grant creates, so its revoke can tell the connector's bindings from anyone else's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// When the access ends: written in the marker of every binding the grant creates, so a sweep
    /// can remove it even if the control plane's state is lost. A grant asked to create a
    /// binding whose expiry has already passed is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The connector making the grant (its marker and the binding's name). Absent in jobs of
    /// control planes that do not send it: the agent uses its connector id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The user already holds a live access whose credentials were handed out: do not reset its
    /// password (the result then carries no credentials). Set by the control plane.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_password: bool,
}

/// Params of a revoke job. A revoke removes only what the connector made: the bindings its grant
/// recorded (`binding_ids`, by id) and the connector's own marked bindings of the same grant;
/// never a binding a person made, unless `all` (an operator cleaning up by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    #[serde(flatten)]
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    /// The grant being revoked (its marker's grant id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The user the grant resolved. When given, the revoke uses it and never looks the subject up
    /// by name (a lookup that finds nothing proves nothing).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ids::de_opt_user_id"
    )]
    pub user_id: Option<String>,
    /// The bindings the grant recorded: deleted by id (404 is done) and checked gone.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ids::de_revoke_binding_ids"
    )]
    pub binding_ids: Vec<String>,
    /// Remove every binding that matches (subject, role, resource), whoever made it. Only for an
    /// operator cleaning up by hand (`revoke --all`); the control plane never sets it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// The connector whose bindings this revoke may remove (see [`Owner`]). Absent in jobs of
    /// control planes that do not send it: the agent uses its connector id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The binding subject the grant resolved (`GrantResult::bound_subject`), when recorded: the
    /// kind of subject this revoke carries, whatever the subject string says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_subject: Option<BoundSubject>,
}

/// Params of a sweep (reconcile) job: compare what Rancher holds with what the accesses say.
/// It removes the connector's bindings whose marked expiry has passed (on Rancher's clock) and,
/// when `accesses` is given, this owner's bindings no access claims; it moves an expiry
/// annotation that is earlier than its holder's expiry; and it reports the active accesses whose
/// binding is gone (`SweepResult::missing`), which the control plane repairs with a grant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepRequest {
    /// Binding ids held by accesses that have not ended: never removed by the sweep.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ids::de_keep_binding_ids"
    )]
    pub keep_binding_ids: Vec<String>,
    /// Report what would be removed; remove nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// This connector (see [`Owner`]); absent: the agent uses its connector id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Every access of this integration's Rancher that has not ended. `None` (a control plane
    /// that does not send it): only expired bindings are removed, nothing is reported missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accesses: Option<Vec<HeldAccess>>,
}

/// An access that has not ended, as the reconcile sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAccess {
    /// The access request's id: the grant id in its bindings' markers.
    pub grant_id: String,
    #[serde(flatten)]
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    pub state: HeldState,
    /// The Rancher user the grant resolved, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_subject: Option<BoundSubject>,
    /// The connector's bindings it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binding_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Its grant found equal access someone else made (it holds no binding of its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_existing: bool,
}

/// The state of a [`HeldAccess`]: only `active` ones are checked for a missing binding; all
/// claim their bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeldState {
    Pending,
    Active,
    Revoking,
}

/// An active access whose binding is gone from Rancher (a person deleted it, or the standing
/// binding of a `pre_existing` access went): the control plane re-runs its grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingAccess {
    pub grant_id: String,
    /// What was looked for and not found, for the log.
    pub reason: String,
}

/// Why a sweep removed a binding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweptReason {
    /// Its marked expiry passed.
    #[default]
    Expired,
    /// This connector made it and no access claims it (a failed grant's leftover, a lost delete).
    Unclaimed,
}

/// One binding a sweep removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweptBinding {
    pub id: String,
    pub scope: BindingScope,
    pub role_id: String,
    pub resource_id: String,
    /// `userId`, `userPrincipalId` or `groupPrincipalId` of the binding, whichever it has.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// Its marked expiry (absent on an unclaimed binding without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub reason: SweptReason,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SweepResult {
    /// Expired connector bindings removed (or that would be, in a dry run).
    pub removed: Vec<SweptBinding>,
    /// Expired connector bindings left in place because an access still holds them.
    #[serde(default)]
    pub kept_binding_ids: Vec<String>,
    /// Connector bindings looked at (expired or not).
    #[serde(default)]
    pub marked: u64,
    #[serde(default)]
    pub dry_run: bool,
    /// Active accesses whose binding is gone: to be granted again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingAccess>,
    /// The connector's bindings whose expiry annotation was moved later to their holder's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extended_binding_ids: Vec<String>,
    /// Rancher's clock when the bindings were listed (its `Date` header), by which expiry was
    /// judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rancher_time: Option<DateTime<Utc>>,
}

/// Params of a rotate-credentials job: the user whose password is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateRequest {
    #[serde(deserialize_with = "ids::de_user_id")]
    pub user_id: String,
}

/// Params of a delete-user job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteUserRequest {
    #[serde(deserialize_with = "ids::de_user_id")]
    pub user_id: String,
}

/// Credentials generated for the requester. The one secret that may leave the agent, and only in
/// the result of the job that made it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    #[serde(serialize_with = "expose_secret")]
    pub password: SecretString,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .finish()
    }
}

fn expose_secret<S: Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.expose_secret())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantResult {
    pub user_id: String,
    /// The connector's own bindings that carry this access (made now, or made earlier by the
    /// connector for the same subject, role and resource): what the revoke deletes by id.
    pub binding_ids: Vec<String>,
    pub created_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    #[serde(default)]
    pub access_details: String,
    /// Equal access was already there, made by someone else: nothing was created, and the
    /// revoke leaves it in place.
    #[serde(default)]
    pub pre_existing: bool,
    /// The equal bindings that were already there (never deleted by a revoke).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_existing_binding_ids: Vec<String>,
    /// `user_id` is a user the connector created (tracked for rotation and cleanup).
    #[serde(default)]
    pub managed_user: bool,
    /// The subject field the binding is bound by, as resolved (a group's principal, a user's id
    /// or an external principal): the key overlapping accesses share. `user_id` is empty for a
    /// group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_subject: Option<BoundSubject>,
    /// Why no credentials came back for a create-user grant (`keep_password`), for the requester.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevokeResult {
    pub removed_binding_ids: Vec<String>,
    /// Bindings equal to the grant that the connector did not make: left in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_binding_ids: Vec<String>,
    /// The user the revoke acted for, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `user_id` is a user the connector created (tracked for rotation and cleanup).
    #[serde(default)]
    pub managed_user: bool,
    /// The user is one the connector created and this revoke removed its last access: it was
    /// disabled (`enabled: false`); its next grant enables it again.
    #[serde(default)]
    pub user_disabled: bool,
    /// What was left and why, for a person (a binding another connector's live access holds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeleteUserResult {
    pub user_id: String,
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ValidateResult {
    /// Who the key belongs to.
    pub principal: String,
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub details: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiscoverySummary {
    pub objects: u64,
    pub requests: u64,
    pub elapsed_ms: u64,
    /// Objects emitted, per `type`.
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    /// Clusters whose namespaces could not be listed (a disconnected cluster agent, a timeout,
    /// a 403...). Discovery went on without them; their `cluster` objects say
    /// `namespaces_listed: false`, so a consumer never takes "not listed" for "deleted".
    #[serde(default)]
    pub skipped_clusters: Vec<SkippedCluster>,
}

/// A cluster whose namespaces were not listed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedCluster {
    pub id: String,
    /// What went wrong, for a person (never a credential).
    pub reason: String,
}

/// Old data (before `namespaces_listed` existed) was only ever uploaded with every namespace listed.
fn listed_by_default() -> bool {
    true
}

/// One discovered object: a line of the discovery NDJSON (DESIGN.md §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DiscoveredObject {
    /// Emitted once the cluster's namespace listing has settled (after its `namespace` lines).
    Cluster {
        id: String,
        name: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// `false`: the cluster's namespaces could not be listed (its `namespace` lines are
        /// missing or incomplete), which says nothing about whether they still exist.
        #[serde(default = "listed_by_default")]
        namespaces_listed: bool,
    },
    Project {
        id: String,
        name: String,
        cluster_id: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    Namespace {
        id: String,
        name: String,
        cluster_id: String,
        project_id: Option<String>,
    },
    GlobalRole {
        id: String,
        name: String,
        #[serde(default)]
        builtin: bool,
    },
    RoleTemplate {
        id: String,
        name: String,
        context: String,
        #[serde(default)]
        locked: bool,
    },
    User {
        id: String,
        name: String,
        username: Option<String>,
        principal_ids: Vec<String>,
    },
    Binding {
        id: String,
        name: String,
        scope: BindingScope,
        resource_id: String,
        role_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_principal_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_principal_id: Option<String>,
    },
}

impl DiscoveredObject {
    pub fn type_name(&self) -> &'static str {
        match self {
            DiscoveredObject::Cluster { .. } => "cluster",
            DiscoveredObject::Project { .. } => "project",
            DiscoveredObject::Namespace { .. } => "namespace",
            DiscoveredObject::GlobalRole { .. } => "global_role",
            DiscoveredObject::RoleTemplate { .. } => "role_template",
            DiscoveredObject::User { .. } => "user",
            DiscoveredObject::Binding { .. } => "binding",
        }
    }
}

/// Why an integration operation failed. Messages name the object and say what to do; they never
/// carry a secret value.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    /// The service refused the credentials (Rancher 401). The executor drops the cached secret
    /// and tries once more with a fresh read before giving up.
    #[error("{message}")]
    CredentialsRefused { message: String },
    /// The credentials work but lack a permission.
    #[error("{message}")]
    PermissionDenied { message: String },
    /// A named object (user, role, cluster, project) does not exist.
    #[error("{message}")]
    NotFound { message: String },
    /// The request cannot succeed as asked (unknown or locked role, wrong role context, ...).
    #[error("{message}")]
    Invalid { message: String },
    /// The integration's config is unusable (bad host, bad CA, missing secret key).
    #[error("{message}")]
    Config { message: String },
    /// The service is unreachable, slow or answered 5xx: trying again later can help.
    #[error("{message}")]
    Unavailable { message: String },
    /// The change was accepted but has not settled yet (e.g. binding status `InProgress`).
    #[error("{message}")]
    InProgress { message: String },
    /// The service answered something this agent does not understand.
    #[error("{message}")]
    Protocol { message: String },
}

impl IntegrationError {
    /// Stable code for job results and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            IntegrationError::CredentialsRefused { .. } => "credentials_refused",
            IntegrationError::PermissionDenied { .. } => "permission_denied",
            IntegrationError::NotFound { .. } => "not_found",
            IntegrationError::Invalid { .. } => "invalid_request",
            IntegrationError::Config { .. } => "invalid_config",
            IntegrationError::Unavailable { .. } => "unavailable",
            IntegrationError::InProgress { .. } => "in_progress",
            IntegrationError::Protocol { .. } => "protocol_error",
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(
            self,
            IntegrationError::Unavailable { .. } | IntegrationError::InProgress { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subject_wire_forms() {
        let g: GrantRequest =
            serde_json::from_value(json!({"user": "alice", "role": "cluster-member", "resource": "c-1"})).unwrap();
        assert_eq!(g.subject, Subject::Username("alice".into()));
        assert_eq!(g.resource, Resource::Cluster("c-1".into()));
        assert!(!g.create_user);
        let g: GrantRequest =
            serde_json::from_value(json!({"user": "local://u-abc", "role": "r", "resource": "c-1:p-2"})).unwrap();
        assert_eq!(g.subject, Subject::UserPrincipal("local://u-abc".into()));
        assert_eq!(g.resource, Resource::Project("c-1:p-2".into()));
        let g: GrantRequest =
            serde_json::from_value(json!({"group": "okta_group://x", "role": "admin", "resource": "global"})).unwrap();
        assert_eq!(g.subject, Subject::GroupPrincipal("okta_group://x".into()));
        assert_eq!(
            serde_json::to_value(&g).unwrap(),
            json!({"group": "okta_group://x", "role": "admin", "resource": "global", "create_user": false})
        );
    }

    #[test]
    fn subject_errors_are_clear() {
        let e = serde_json::from_value::<GrantRequest>(json!({"role": "r", "resource": "c-1"})).unwrap_err();
        assert!(e.to_string().contains("missing subject"), "{e}");
        let e =
            serde_json::from_value::<GrantRequest>(json!({"user": "a", "group": "b", "role": "r", "resource": "c-1"}))
                .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        assert!(Resource::parse("c-1:").is_err());
        assert!(Resource::parse("a:b:c").is_err());
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials {
            username: "alice".into(),
            password: SecretString::from("canary-pw-123"),
        };
        assert!(!format!("{c:?}").contains("canary"));
        assert!(serde_json::to_string(&c).unwrap().contains("canary-pw-123"));
    }
}
