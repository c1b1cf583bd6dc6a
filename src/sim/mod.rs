//! A Rancher `/v3` (Norman) API simulator: in-memory, wire-compatible for the subset the connector
//! uses, with latency, version switches and fault injection. Used by `demo`, tests and benchmarks,
//! never by production code paths (DESIGN.md §3).
//!
//! # Layout
//!
//! - this file: the public API ([`Sim`], [`SimHandle`], [`SimOptions`] and the fidelity controls);
//! - `store`: the in-memory objects, the write rules (validation, duplicates, EnsureUser) and the
//!   Norman JSON shapes;
//! - `data`: the small (fixed ids, tests depend on them) and large (generated) datasets;
//! - `api`: the HTTP layer: auth, routing, filters, pagination, errors, latency, faults, stats;
//! - `view`: what the key's owner is shown (RBAC for a non-admin owner, objects hidden from lists);
//! - `tests`: behaviour tests over HTTP.
//!
//! Behaviour follows `rancher-api-notes.md` (the real server's quirks included: string `status` on
//! 401, silently ignored unknown filters, the marker that restarts paging at item 0, duplicate
//! bindings allowed or refused depending on the version).
//!
//! # Wire behaviour worth knowing when writing a client against it
//!
//! - Pagination is Norman's: `pagination.partial` is **omitted** when false and stays `true` on the
//!   last page, which has no `next`; follow `next` while it is present.
//! - Filters as Norman parses them: the key splits on its last `_`; string/reference fields take
//!   `f=v`, `f_ne`, `f_in`, `f_notin`, booleans `f=v` and `f_ne` only; `eq`/`ne` use the first
//!   value given. There is no `_null`/`_notnull`: an unknown field or modifier is ignored (the
//!   list comes back unfiltered). `sort=<field>&order=desc`.
//! - Bindings keep `labels` and `annotations` from the create body. A `labels` or `annotations`
//!   map in `PUT /v3/<bindings>/{id}` (or `/v3/users/{id}`) *replaces* the object's, as norman's
//!   `mergeProtected` does: keys left out are deleted, except protected ones (containing
//!   `cattle.io/`) and `field.cattle.io/` ones, and protected keys cannot be set; a body without
//!   the map leaves it alone. A PUT refuses to change the role, the resource or a set subject
//!   (400 `BadRequest` "field is immutable"). A create of a name whose binding is being removed
//!   is 409 `AlreadyExists` "object is being deleted: ...".
//! - Binding creates are checked in Rancher's order and with its answers: an unknown role
//!   template is 500 `ServerError` "Error getting role template: ...", an unknown global role 404,
//!   an unknown cluster 404 (its namespace), an unknown project 404 `namespaces "p-y" not found`
//!   before 2.12 and 500 `projects.management.cattle.io "c-x/p-y" not found` from 2.12 (looked up
//!   before the principal), an external principal the key's provider cannot resolve 500
//!   `users.management.cattle.io "<id>" not found`, an unknown `userId` is accepted (201).
//! - A binding's 201 is what was posted: no `status`, no `userId` for a principal-only binding,
//!   no backfilled `userPrincipalId`. After `controller_delay` the management pass fills `userId`
//!   (EnsureUser: the user, plus GRBs for the `newUserDefault` global roles), backfills
//!   `userPrincipalId` only with `local://<userId>`, and on 2.11+ writes the status of CRTBs and
//!   GRBs: `summaryLocal: Completed` (`Error`, with `summary: Error`, for a missing user). A GRB
//!   then has `summary: Completed`; a CRTB (and a GRB of an admin role) gets `summaryRemote` and
//!   `summary: Completed` from the downstream pass, at `settle` after its create and never while
//!   its cluster is disconnected. PRTBs never have a status. No binding is ever `InProgress`.
//! - `GET /v3/principals` answers the key owner's user principal and its group principals
//!   ([`Sim::set_user_groups`]). Global roles carry `rules`; the owner is an admin when a GRB to
//!   it or to one of its groups binds a role Rancher's `IsAdminGlobalRole` accepts
//!   ([`Sim::add_global_role`]). `POST /k8s/clusters/{id}/apis/authorization.k8s.io/v1/
//!   selfsubjectaccessreviews` answers from those rules.
//! - Every answer's `Date` header is the simulator's clock ([`Sim::set_clock_offset`]).
//! - Users created through the API get no global role binding; `POST /v3/users` is not atomic
//!   ([`Sim::fail_user_password_next`]).
//! - Every 401 body is `{"type":"error","status":"401","message":"Unauthorized 401: must
//!   authenticate"}`, for a scoped key used outside its cluster too.
//! - A disconnected cluster's `/v3/cluster/{id}/...` stalls, then answers 500 "cluster agent
//!   disconnected".
//! - `GET /v1/ext.cattle.io.tokens/{name}` shows an `ext/` key (2.12+);
//!   `GET /k8s/clusters/{id}/version` answers for any cluster.
//! - `GET /sim/stats`, `/sim/bindings`, `/sim/users` need no auth and are not counted.
//!
//! # Fidelity controls
//!
//! On [`SimOptions`]: `version`, `latency`, `settle` (when a new CRTB's downstream pass runs),
//! `controller_delay` (a new binding's `status`, EnsureUser'd `userId`, backfilled
//! `userPrincipalId` and a new user's `principalIds` arrive then), `disconnect_stall` and
//! `disconnected_share` (clusters whose agent is down), `removal_delay` (deleted bindings
//! linger with `removed`), `key_cluster_id` / `key_expires_at` (scoped or expiring key),
//! `resolve_external_principals`, `password_min_length`, `key_owner_admin` (lists filtered by
//! RBAC when `false`), `faults` (seeded random 5xx / slow answers), `seed`. At run time on [`Sim`]: [`Sim::set_api_key`] (rotation),
//! [`Sim::set_key_scope`], [`Sim::set_key_expiry`], [`Sim::set_version`], [`Sim::set_latency`],
//! [`Sim::set_settle`], [`Sim::set_controller_delay`], [`Sim::reconcile_now`],
//! [`Sim::disconnect_cluster`], [`Sim::disconnected_clusters`], [`Sim::set_disconnect_stall`],
//! [`Sim::fail_user_password_next`], [`Sim::set_removal_delay`], [`Sim::fail_next`] / [`Sim::fail_next_on`]
//! (exact faults, optionally after the change is committed), [`Sim::set_faults`],
//! [`Sim::add_user`], [`Sim::add_binding`], [`Sim::remove_binding`], [`Sim::check_password`],
//! [`Sim::set_key_owner_admin`], [`Sim::set_user_groups`], [`Sim::add_global_role`],
//! [`Sim::is_admin`], [`Sim::set_clock_offset`] / [`Sim::now`], [`Sim::fail_next_on_with`]
//! (a fault in Rancher's words), [`Sim::set_new_user_default`], [`Sim::empty_lists_on`] /
//! [`Sim::hide_from_lists`] / [`Sim::unhide`] / [`Sim::clear_list_faults`] (lists that miss
//! objects still there), [`Sim::slow_next_on`] (a slow route that still applies the change).
//!
//! Route keys (for `fail_next_on`, `empty_lists_on`, `slow_next_on` and [`SimStats::routes`]):
//! `METHOD /v3/<collection>[/{id}][?action=<a>]`, collection in lowercase, ids as `{id}`, e.g.
//! `GET /v3/clusterroletemplatebindings`, `DELETE /v3/clusterroletemplatebindings/{id}`,
//! `POST /v3/users/{id}?action=setpassword`, `GET /v3/cluster/{id}/namespaces`.

mod api;
mod data;
mod index;
mod store;
#[cfg(test)]
mod tests;
mod tls;
mod view;

pub use tls::TlsIdentity;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::integrations::BindingScope;

/// The simulator's API key (a simulator key, not a secret).
pub const DEFAULT_ACCESS_KEY: &str = "token-sim01";
/// The simulator's API key secret (a simulator key, not a secret).
pub const DEFAULT_SECRET_KEY: &str = "s1mk3y4p0n0c0nn3ct0rr4nch3rs1mul4t0r0001";
/// Id of the API key's owner in both datasets (the bootstrap admin, username `admin`).
pub const ADMIN_USER_ID: &str = "user-admin1";

/// Which dataset the simulator starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetSize {
    /// A few objects with fixed ids (tests depend on them).
    Small,
    /// The small dataset plus generated objects: about 200 clusters, 2,000 projects, 20,000
    /// namespaces, 10,000 users and 50,000 bindings.
    Large,
}

impl FromStr for DatasetSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "small" => Ok(DatasetSize::Small),
            "large" => Ok(DatasetSize::Large),
            other => Err(format!(
                "unknown dataset size {other:?}: expected \"small\" or \"large\""
            )),
        }
    }
}

impl fmt::Display for DatasetSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetSize::Small => "small",
            DatasetSize::Large => "large",
        })
    }
}

/// The Rancher 2.x release the simulator behaves as. Only the minor version matters: it decides
/// `status` on CRTBs and GRBs (2.11+; never on PRTBs), `backingNamespace` on projects and the 500
/// for an unknown project (2.12+), duplicate CRTBs refused (2.14+) and duplicate PRTBs refused
/// (2.15+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RancherVersion {
    pub minor: u32,
}

impl RancherVersion {
    pub const fn new(minor: u32) -> RancherVersion {
        RancherVersion { minor }
    }
}

impl Default for RancherVersion {
    fn default() -> Self {
        RancherVersion { minor: 13 }
    }
}

impl FromStr for RancherVersion {
    type Err = String;
    /// Accepts `2.13`, `v2.13`, `2.13.1`, `v2.14.0-rc1`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().trim_start_matches('v');
        let mut parts = t.split(['.', '-']);
        let major = parts.next().unwrap_or_default();
        let minor = parts.next().unwrap_or_default();
        match (major, minor.parse::<u32>()) {
            ("2", Ok(minor)) => Ok(RancherVersion { minor }),
            _ => Err(format!("bad Rancher version {s:?}: expected 2.<minor>, e.g. 2.13")),
        }
    }
}

impl fmt::Display for RancherVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "2.{}", self.minor)
    }
}

/// Random faults on `/v3` requests, seeded so a run can be replayed: request number `n` (counted
/// from start) gets the same fate for the same seed.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultOptions {
    /// Share (0.0–1.0) of `/v3` requests answered with a 5xx (`500 ServerError` or
    /// `503 ClusterUnavailable`, alternately by the draw).
    pub error_rate: f64,
    /// Share (0.0–1.0) of the injected errors on writes (POST, PUT, DELETE) that are applied first:
    /// the change is made, then the answer is a 500 (what a client's retry must absorb).
    pub after_commit_share: f64,
    /// Share (0.0–1.0) of `/v3` requests delayed by `slow_delay` on top of the latency.
    pub slow_rate: f64,
    pub slow_delay: Duration,
    pub seed: u64,
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions {
            error_rate: 0.0,
            after_commit_share: 0.0,
            slow_rate: 0.0,
            slow_delay: Duration::from_millis(500),
            seed: 0x5eed,
        }
    }
}

/// How the simulator starts. Everything has a default (`SimOptions::default()`).
#[derive(Clone)]
pub struct SimOptions {
    /// Default `Small`.
    pub size: DatasetSize,
    /// Added to every `/v3` answer (requests still proceed concurrently); default 0.
    pub latency: Duration,
    /// Default [`DEFAULT_ACCESS_KEY`].
    pub access_key: String,
    /// Default [`DEFAULT_SECRET_KEY`].
    pub secret_key: String,
    /// Default 2.13.
    pub version: RancherVersion,
    /// The key's cluster scope: `Some(c)` makes a scoped key that only works on paths routed to
    /// cluster `c` (`/v3/clusters/c`, `/v3/cluster/c/...`, `/k8s/clusters/c/...`); everything else
    /// gets the plain 401 "must authenticate", which never says why. Default `None` (no scope).
    pub key_cluster_id: Option<String>,
    /// When the key expires (after which every request gets 401). Default `None` (never).
    pub key_expires_at: Option<DateTime<Utc>>,
    /// How long after its create a CRTB's downstream pass runs (and a GRB of an admin role's):
    /// until then a 2.11+ CRTB shows `summaryLocal: Completed` and no `summary`. Never before the
    /// management pass, never while the cluster is disconnected. Default 0.
    pub settle: Duration,
    /// How long after a write the controllers act on it: a new binding has no `status`, no
    /// EnsureUser'd `userId` and no backfilled `userPrincipalId` until then; a new local user
    /// shows `principalIds: []` until then. The 201 never carries them. Default 200 ms.
    pub controller_delay: Duration,
    /// How long `/v3/cluster/{id}/...` of a disconnected cluster waits (Rancher's dialer retries
    /// for 20-40 s) before its 500 "cluster agent disconnected". Default 25 s.
    pub disconnect_stall: Duration,
    /// Share (0.0-1.0) of the clusters other than `local` whose agent is disconnected, picked by
    /// `seed` (e.g. 0.05 on the large dataset: 10 of its 199). Default 0.
    pub disconnected_share: f64,
    /// A deleted binding stays listed (with `removed` set and `state: removing`, its name still
    /// taken) for this long, as while Rancher's finalizers run. Default 0 (gone at once).
    pub removal_delay: Duration,
    /// Whether the key owner's auth provider can resolve external principals (`github_user://..`).
    /// `false` behaves like a local admin's key: binding by an external `userPrincipalId` answers
    /// 500 and external principals are not found. Default `true`.
    pub resolve_external_principals: bool,
    /// The `password-min-length` setting. Default 12.
    pub password_min_length: usize,
    /// Whether the key's owner holds the `admin` global role (GRB `grb-admin`). `false`: it holds
    /// only `user` (GRB `grb-owner`) and Rancher filters every list down to what it may see.
    /// Default `true`.
    pub key_owner_admin: bool,
    /// Random faults; default none.
    pub faults: FaultOptions,
    /// Seed for generated ids and the large dataset. Default fixed.
    pub seed: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            size: DatasetSize::Small,
            latency: Duration::ZERO,
            access_key: DEFAULT_ACCESS_KEY.to_string(),
            secret_key: DEFAULT_SECRET_KEY.to_string(),
            version: RancherVersion::default(),
            key_cluster_id: None,
            key_expires_at: None,
            settle: Duration::ZERO,
            controller_delay: Duration::from_millis(200),
            disconnect_stall: Duration::from_secs(25),
            disconnected_share: 0.0,
            removal_delay: Duration::ZERO,
            resolve_external_principals: true,
            password_min_length: 12,
            key_owner_admin: true,
            faults: FaultOptions::default(),
            seed: 0x4150_4f4e_4f53_494d,
        }
    }
}

impl fmt::Debug for SimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimOptions")
            .field("size", &self.size)
            .field("latency", &self.latency)
            .field("access_key", &self.access_key)
            .field("secret_key", &"[REDACTED]")
            .field("version", &self.version)
            .field("key_cluster_id", &self.key_cluster_id)
            .field("key_expires_at", &self.key_expires_at)
            .field("settle", &self.settle)
            .field("controller_delay", &self.controller_delay)
            .field("disconnect_stall", &self.disconnect_stall)
            .field("disconnected_share", &self.disconnected_share)
            .field("removal_delay", &self.removal_delay)
            .field("resolve_external_principals", &self.resolve_external_principals)
            .field("password_min_length", &self.password_min_length)
            .field("key_owner_admin", &self.key_owner_admin)
            .field("faults", &self.faults)
            .field("seed", &self.seed)
            .finish()
    }
}

/// A user as the simulator holds it. Never carries the password, only whether one is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimUser {
    pub id: String,
    /// `None` for external users.
    pub username: Option<String>,
    /// The display name (Norman's `name`).
    pub name: String,
    pub principal_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub must_change_password: bool,
    pub enabled: bool,
    pub password_set: bool,
}

/// A Kubernetes RBAC rule as a global role carries it (`rules`, `rbacv1.PolicyRule`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default, rename = "nonResourceURLs", skip_serializing_if = "Vec::is_empty")]
    pub non_resource_urls: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl PolicyRule {
    /// A rule on resources: `verbs` on `resources` of the API `groups` (`""` is the core group).
    pub fn on(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        PolicyRule {
            api_groups: strings(groups),
            resources: strings(resources),
            verbs: strings(verbs),
            non_resource_urls: Vec::new(),
        }
    }

    /// A rule on non-resource URLs (`/healthz`, `*`).
    pub fn urls(urls: &[&str], verbs: &[&str]) -> PolicyRule {
        PolicyRule {
            verbs: strings(verbs),
            non_resource_urls: strings(urls),
            ..PolicyRule::default()
        }
    }

    /// The rules of Rancher's built-in `admin` global role (`pkg/data/management/role_data.go`):
    /// every verb on every resource of every group, and every non-resource URL. A role with these
    /// two rules is an admin role whatever its name (`IsAdminGlobalRole`, `pkg/rbac/common.go`).
    pub fn admin() -> Vec<PolicyRule> {
        vec![PolicyRule::on(&["*"], &["*"], &["*"]), PolicyRule::urls(&["*"], &["*"])]
    }
}

/// Rancher's `IsAdminGlobalRole` (`pkg/rbac/common.go`): the built-in `admin`, or any global
/// role with a `*`/`*`/`*` resource rule and a `*` non-resource rule with verb `*`.
pub fn is_admin_global_role(id: &str, builtin: bool, rules: &[PolicyRule]) -> bool {
    if builtin && id == "admin" {
        return true;
    }
    let has = |v: &[String], s: &str| v.iter().any(|x| x == s);
    let resources = rules
        .iter()
        .any(|r| has(&r.resources, "*") && has(&r.api_groups, "*") && has(&r.verbs, "*"));
    let urls = rules
        .iter()
        .any(|r| has(&r.non_resource_urls, "*") && has(&r.verbs, "*"));
    resources && urls
}

/// A binding of any of the three kinds (GRB, CRTB, PRTB).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimBinding {
    /// `grb-x`, `c-x:crtb-y`, `p-y:prtb-z` or `c-x-p-y:prtb-z`.
    pub id: String,
    /// The metadata name (the part after `:`).
    pub name: String,
    pub scope: BindingScope,
    /// Global role id or role template id.
    pub role_id: String,
    /// `global`, a cluster id, or a project id `c-x:p-y`.
    pub resource_id: String,
    pub user_id: Option<String>,
    pub user_principal_id: Option<String>,
    pub group_principal_id: Option<String>,
    /// Kept from the create body and changed by `PUT` (Norman's `metadata` mapper).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Request counts since start (or the last [`Sim::reset_stats`]): `/v3`, `/v1` and `/k8s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every `/v3` request, whatever its answer.
    pub total: u64,
    /// Per route key `METHOD /v3/<collection>[/{id}][?action=<a>]`, e.g. `GET /v3/users`,
    /// `GET /v3/users/{id}`, `POST /v3/users/{id}?action=setpassword`,
    /// `GET /v3/cluster/{id}/namespaces`. Ids are replaced by `{id}` so counts aggregate.
    pub routes: BTreeMap<String, u64>,
    /// Answers with a status of 400 or more (injected faults included).
    pub errors: u64,
    /// Answers replaced or delayed by fault injection.
    pub injected_faults: u64,
    /// TCP connections accepted (by [`Sim::serve`]): with keep-alive, bounded by the client's
    /// pool, not by its jobs. Over TLS each is one handshake.
    #[serde(default)]
    pub connections: u64,
    /// TLS handshakes completed (by [`Sim::serve_tls`]), resumed ones included: one per pooled
    /// connection when the client keeps its pool, one per job when it does not.
    #[serde(default)]
    pub handshakes: u64,
    /// Of [`SimStats::handshakes`], those that resumed an earlier session.
    #[serde(default)]
    pub resumed_handshakes: u64,
}

impl SimStats {
    /// The count for one route key (0 when never hit).
    pub fn route(&self, key: &str) -> u64 {
        self.routes.get(key).copied().unwrap_or(0)
    }
}

/// Shared by every clone of a [`Sim`].
struct Inner {
    state: Mutex<store::State>,
    key: RwLock<KeyState>,
    stats: Mutex<SimStats>,
    faults: Mutex<api::FaultState>,
    latency: RwLock<Duration>,
}

#[derive(Debug, Clone)]
struct KeyState {
    /// Without the `ext/` prefix.
    access_key: String,
    /// A 2.12+ `ext.cattle.io` token, sent as `ext/<name>:<secret>`.
    ext: bool,
    secret_key: String,
    cluster_id: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
    owner: String,
}

/// The simulator: state plus the HTTP service. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sim {
    /// Builds the simulator with its dataset (the large one takes about a second in a debug build).
    pub fn new(options: SimOptions) -> Sim {
        let state = data::build(&options);
        let (access_key, ext) = split_ext(&options.access_key);
        let key = KeyState {
            access_key,
            ext,
            secret_key: options.secret_key.clone(),
            cluster_id: options.key_cluster_id.clone(),
            expires_at: options.key_expires_at,
            created: data::base_time(),
            owner: ADMIN_USER_ID.to_string(),
        };
        Sim {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                key: RwLock::new(key),
                stats: Mutex::new(SimStats::default()),
                faults: Mutex::new(api::FaultState::new(options.faults.clone())),
                latency: RwLock::new(options.latency),
            }),
        }
    }

    /// The current API key: `(access_key, secret_key)`, the access key as a client sends it
    /// (`ext/<name>` for an ext token).
    pub fn api_key(&self) -> (String, String) {
        let k = self.key();
        let access = if k.ext {
            format!("ext/{}", k.access_key)
        } else {
            k.access_key
        };
        (access, k.secret_key)
    }

    /// Serves the simulator on `listener` until `shutdown` completes.
    ///
    /// # Errors
    /// I/O errors of the listener.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        let counted = self.clone();
        let listener = listener.tap_io(move |_| lock(&counted.inner.stats).connections += 1);
        axum::serve(listener, api::router(self.clone()))
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Counts one accepted connection (for servers that accept their own, as over TLS).
    pub fn count_connection(&self) {
        lock(&self.inner.stats).connections += 1;
    }

    /// Counts one completed TLS handshake.
    pub fn count_handshake(&self, resumed: bool) {
        let mut stats = lock(&self.inner.stats);
        stats.handshakes += 1;
        stats.resumed_handshakes += u64::from(resumed);
    }

    /// Bindings (all three kinds) of the user with this username; none if there is no such user.
    pub fn bindings_of_username(&self, username: &str) -> Vec<SimBinding> {
        let Some(user) = self
            .users()
            .into_iter()
            .find(|u| u.username.as_deref() == Some(username))
        else {
            return Vec::new();
        };
        self.bindings()
            .into_iter()
            .filter(|b| b.user_id.as_deref() == Some(user.id.as_str()))
            .collect()
    }

    /// The HTTP app, to serve it another way (over TLS in tests of the integration's CA).
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// Every user, ordered by id (after the controllers have done what is due).
    pub fn users(&self) -> Vec<SimUser> {
        let mut st = lock(&self.inner.state);
        st.reconcile(std::time::Instant::now());
        st.users.values().map(store::User::to_sim).collect()
    }

    /// Every binding of the three kinds: GRBs, then CRTBs, then PRTBs, each ordered by id.
    pub fn bindings(&self) -> Vec<SimBinding> {
        let mut st = lock(&self.inner.state);
        st.purge();
        st.reconcile(std::time::Instant::now());
        st.grbs
            .values()
            .chain(st.crtbs.values())
            .chain(st.prtbs.values())
            .map(store::Binding::to_sim)
            .collect()
    }

    pub fn stats(&self) -> SimStats {
        lock(&self.inner.stats).clone()
    }

    pub fn reset_stats(&self) {
        *lock(&self.inner.stats) = SimStats::default();
    }

    /// Key rotation: from now on only `(access, secret)` authenticates; the old key gets 401.
    /// An `ext/<name>` access key makes a 2.12+ ext token: it authenticates only when sent with
    /// its `ext/` prefix (`pkg/auth/requests/authenticate.go` strips it and looks in the ext
    /// token store) and is read at `GET /v1/ext.cattle.io.tokens/<name>`, not `/v3/tokens`.
    pub fn set_api_key(&self, access: &str, secret: &str) {
        let (access, ext) = split_ext(access);
        let mut k = self.inner.key.write().unwrap_or_else(|e| e.into_inner());
        k.access_key = access;
        k.ext = ext;
        k.secret_key = secret.to_string();
        k.created = Utc::now();
    }

    /// Scopes the key to a cluster (`Some`) or removes the scope (`None`).
    pub fn set_key_scope(&self, cluster_id: Option<&str>) {
        self.inner.key.write().unwrap_or_else(|e| e.into_inner()).cluster_id = cluster_id.map(str::to_string);
    }

    /// Sets when the key expires (`None`: never). A time in the past makes every request 401.
    pub fn set_key_expiry(&self, expires_at: Option<DateTime<Utc>>) {
        self.inner.key.write().unwrap_or_else(|e| e.into_inner()).expires_at = expires_at;
    }

    /// Switches the Rancher version the simulator behaves as.
    pub fn set_version(&self, version: RancherVersion) {
        lock(&self.inner.state).version = version;
    }

    pub fn version(&self) -> RancherVersion {
        lock(&self.inner.state).version
    }

    /// Changes the latency added to every `/v3` answer.
    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.write().unwrap_or_else(|e| e.into_inner()) = latency;
    }

    /// Changes when the downstream pass of new CRTBs runs (bindings made from now on).
    pub fn set_settle(&self, settle: Duration) {
        lock(&self.inner.state).settle = settle;
    }

    /// Changes how long the controllers take to act on new bindings and users (from now on).
    pub fn set_controller_delay(&self, delay: Duration) {
        lock(&self.inner.state).controller_delay = delay;
    }

    /// Makes every controller finish now: pending bindings get their `userId` (EnsureUser),
    /// `userPrincipalId` and `status` (`Completed`, or `Error` for a missing user; a CRTB of a
    /// disconnected cluster only `summaryLocal`), new users their `principalIds`. For tests that
    /// need the "later" state without waiting.
    pub fn reconcile_now(&self) {
        lock(&self.inner.state).reconcile_all();
    }

    /// Disconnects (`on`) or reconnects a cluster's agent: while disconnected, every
    /// `/v3/cluster/{id}/...` request (its namespaces) waits `disconnect_stall`, then answers
    /// 500 `ServerError` "cluster agent disconnected" (rancher `pkg/dialer/factory.go`
    /// `ErrAgentDisconnected`, turned into a 500 by rancher/norman
    /// `httperror/handler/handler.go`), and its CRTBs get no downstream pass (no `summary`
    /// until it is back). The cluster stays in `/v3/clusters`. A request stalling when the
    /// cluster comes back is served. `false` if there is no such cluster.
    pub fn disconnect_cluster(&self, id: &str, on: bool) -> bool {
        let mut st = lock(&self.inner.state);
        if !st.clusters.contains_key(id) {
            return false;
        }
        if on {
            st.disconnected.insert(id.to_string());
        } else {
            st.disconnected.remove(id);
        }
        true
    }

    /// The clusters disconnected now, ordered by id.
    pub fn disconnected_clusters(&self) -> Vec<String> {
        lock(&self.inner.state).disconnected.iter().cloned().collect()
    }

    /// Changes how long a request to a disconnected cluster stalls before its 500.
    pub fn set_disconnect_stall(&self, stall: Duration) {
        lock(&self.inner.state).disconnect_stall = stall;
    }

    /// The next `n` `POST /v3/users` create the user and then fail to store its password
    /// (rancher `pkg/auth/api/user/user_store.go` Create makes the User, then the password
    /// Secret): the answer is 500 `ServerError` while the user exists with no password
    /// (`SimUser::password_set == false`).
    pub fn fail_user_password_next(&self, n: usize) {
        lock(&self.inner.state).fail_user_password = n;
    }

    /// Changes how long deleted bindings stay listed with `removed` set.
    pub fn set_removal_delay(&self, delay: Duration) {
        lock(&self.inner.state).removal_delay = delay;
    }

    /// The next `n` `/v3` requests (any route) answer `status` with a Rancher-shaped error
    /// (500 `ServerError`, 503 `ClusterUnavailable`, ...). With `after_commit`, the request is
    /// applied first (a POST creates its binding) and only the answer is replaced.
    pub fn fail_next(&self, n: usize, status: u16, after_commit: bool) {
        lock(&self.inner.faults).push(None, n, status, after_commit, None);
    }

    /// Like [`Sim::fail_next`], for the next `n` requests whose route key (as in
    /// [`SimStats::routes`], e.g. `POST /v3/clusterroletemplatebindings`) equals `route`.
    pub fn fail_next_on(&self, route: &str, n: usize, status: u16, after_commit: bool) {
        lock(&self.inner.faults).push(Some(route.to_string()), n, status, after_commit, None);
    }

    /// Like [`Sim::fail_next_on`] (nothing applied), answering with Rancher's words for the
    /// failure, e.g. a 500 `Internal error occurred: failed calling webhook "…"` while the
    /// admission webhook's pod restarts, or `etcdserver: request timed out`.
    pub fn fail_next_on_with(&self, route: &str, n: usize, status: u16, message: &str) {
        lock(&self.inner.faults).push(Some(route.to_string()), n, status, false, Some(message.to_string()));
    }

    /// Replaces the random fault settings (and restarts their sequence).
    pub fn set_faults(&self, faults: FaultOptions) {
        lock(&self.inner.faults).set_options(faults);
    }

    /// Adds a user as given (no password), e.g. to plant an external user.
    ///
    /// # Errors
    /// An id or username already in use.
    pub fn add_user(&self, user: SimUser) -> Result<(), String> {
        lock(&self.inner.state).add_user(user)
    }

    /// Adds a binding as given (out of band: no validation beyond the id, the role and the
    /// resource existing), e.g. to plant a duplicate that an older Rancher allowed.
    ///
    /// # Errors
    /// An id in use, an unknown role or resource.
    pub fn add_binding(&self, binding: SimBinding) -> Result<(), String> {
        lock(&self.inner.state).add_binding(binding)
    }

    /// Removes a binding out of band (as another admin would); `true` if it existed.
    pub fn remove_binding(&self, id: &str) -> bool {
        lock(&self.inner.state).remove_binding(id).is_some()
    }

    /// Whether `password` is the password of user `user_id` (for rotate tests).
    pub fn check_password(&self, user_id: &str, password: &str) -> bool {
        lock(&self.inner.state)
            .users
            .get(user_id)
            .is_some_and(|u| u.password.as_deref() == Some(password))
    }

    /// Makes the key's owner an admin (GRB `admin`, id `grb-admin`) or takes that away (its own
    /// GRBs to every admin role deleted, a `user` GRB `grb-owner` kept so it can log in), as
    /// another admin would. A GRB to one of its groups stays: with one, the owner is an admin
    /// only through its group. A non-admin owner sees lists filtered silently by RBAC (rancher/norman
    /// `store/proxy/proxy_store.go` `FilterList`, rancher `pkg/rbac/user_based.go`): `/v3/users`
    /// holds only itself; binding lists only its own bindings; clusters, projects and namespaces
    /// only those its bindings reach; global roles and role templates everything. Reading one
    /// object it may not see, and every PUT/DELETE of users and bindings, is 403 `Forbidden`
    /// (Kubernetes RBAC, the caller impersonated); a POST of a user or binding is 403
    /// `PermissionDenied` `can not create <type>`.
    pub fn set_key_owner_admin(&self, admin: bool) {
        let owner = self.key().owner;
        lock(&self.inner.state).set_admin(&owner, admin);
    }

    /// Sets `newUserDefault` on a global role (`pkg/data/management/role_data.go`: a default
    /// install has it on `user` only; `user-base` is login only). `false` if there is no such
    /// role.
    pub fn set_new_user_default(&self, role_id: &str, on: bool) -> bool {
        lock(&self.inner.state)
            .global_roles
            .get_mut(role_id)
            .map(|r| r.new_user_default = on)
            .is_some()
    }

    /// The next `n` GET list requests on `route` answer 200 with an empty collection (what an
    /// RBAC-filtered or lagging listing looks like); `usize::MAX` means until
    /// [`Sim::clear_list_faults`]. `route` is a route key as in [`SimStats::routes`]:
    /// `METHOD /v3/<collection>` in lowercase, e.g. `GET /v3/clusterroletemplatebindings`,
    /// `GET /v3/users`, `GET /v3/cluster/{id}/namespaces`.
    pub fn empty_lists_on(&self, route: &str, n: usize) {
        lock(&self.inner.faults).push_empty_lists(route, n);
    }

    /// Ends every [`Sim::empty_lists_on`] fault and un-hides every [`Sim::hide_from_lists`]
    /// object: lists are whole again.
    pub fn clear_list_faults(&self) {
        lock(&self.inner.faults).clear_empty_lists();
        lock(&self.inner.state).hidden.clear();
    }

    /// Leaves the object with this id (a binding, user, cluster, project, namespace name or
    /// role) out of every list, while it stays readable by id, changeable and deletable: an
    /// informer that has not caught up with one object.
    pub fn hide_from_lists(&self, id: &str) {
        lock(&self.inner.state).hidden.insert(id.to_string());
    }

    /// Lists show the object again; `true` if it was hidden.
    pub fn unhide(&self, id: &str) -> bool {
        lock(&self.inner.state).hidden.remove(id)
    }

    /// The next `n` requests on `route` (a route key as in [`SimStats::routes`], e.g.
    /// `DELETE /v3/clusterroletemplatebindings/{id}`) wait `delay` before they are handled. The
    /// change is applied after the wait even when the client has given up, as on a slow Rancher.
    pub fn slow_next_on(&self, route: &str, n: usize, delay: Duration) {
        lock(&self.inner.faults).push_slow(route, n, delay);
    }

    /// Gives a user the group principals its auth provider reports for it (Rancher keeps them in
    /// the user's `UserAttribute.GroupPrincipals`), replacing any given before. They show in
    /// `GET /v3/principals` when the user is the key's owner, and bindings to these groups
    /// (`groupPrincipalId`) count for the user: a GRB of an admin role to one of them makes the
    /// user an admin. `false` if there is no such user.
    pub fn set_user_groups(&self, user_id: &str, groups: Vec<String>) -> bool {
        let mut st = lock(&self.inner.state);
        if !st.users.contains_key(user_id) {
            return false;
        }
        st.groups.insert(user_id.to_string(), groups.into_iter().collect());
        true
    }

    /// Adds a custom global role (not built in) with these rules, as an admin would in the UI.
    /// Its holders are admins when the rules are an admin's ([`PolicyRule::admin`],
    /// `IsAdminGlobalRole`).
    ///
    /// # Errors
    /// The id is in use.
    pub fn add_global_role(&self, id: &str, rules: Vec<PolicyRule>) -> Result<(), String> {
        lock(&self.inner.state).add_global_role(id, rules)
    }

    /// Whether the user is an admin as Rancher decides it: a live GRB, to the user or to one of
    /// its groups, of a role that `IsAdminGlobalRole` accepts.
    pub fn is_admin(&self, user_id: &str) -> bool {
        lock(&self.inner.state).is_admin(user_id)
    }

    /// Runs the simulator's clock ahead (positive) or behind (negative) this machine's: the `Date`
    /// header of every answer, the key's expiry, `created` and `removed` times of new objects.
    pub fn set_clock_offset(&self, offset: chrono::Duration) {
        lock(&self.inner.state).clock_offset = offset;
    }

    /// The simulator's clock: this machine's plus the offset ([`Sim::set_clock_offset`]).
    pub fn now(&self) -> DateTime<Utc> {
        lock(&self.inner.state).now_utc()
    }

    fn key(&self) -> KeyState {
        self.inner.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A simulator served on `127.0.0.1:<free port>` in the background.
pub struct SimHandle {
    /// `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` from [`SimHandle::start_tls`].
    pub base_url: String,
    pub sim: Sim,
    shutdown: tokio::sync::oneshot::Sender<()>,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimHandle {
    /// Builds a simulator and serves it on a free loopback port.
    ///
    /// # Errors
    /// Binding the port failed.
    pub async fn start(options: SimOptions) -> std::io::Result<SimHandle> {
        SimHandle::start_sim(Sim::new(options)).await
    }

    /// Serves an existing simulator on a free loopback port.
    ///
    /// # Errors
    /// Binding the port failed.
    pub async fn start_sim(sim: Sim) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = sim.clone();
        let join = tokio::spawn(async move {
            served
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
        });
        Ok(SimHandle {
            base_url: format!("http://{addr}"),
            sim,
            shutdown: tx,
            join,
        })
    }

    /// Builds a simulator and serves it over TLS (a new self-signed certificate, see
    /// [`TlsIdentity`]) on a free loopback port; the identity gives the certificate to trust.
    ///
    /// # Errors
    /// Binding the port or making the certificate failed.
    pub async fn start_tls(options: SimOptions) -> std::io::Result<(SimHandle, TlsIdentity)> {
        let tls = TlsIdentity::self_signed().map_err(std::io::Error::other)?;
        let sim = Sim::new(options);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (served, identity) = (sim.clone(), tls.clone());
        let join = tokio::spawn(async move {
            served
                .serve_tls(listener, &identity, async move {
                    let _ = rx.await;
                })
                .await
        });
        let handle = SimHandle {
            base_url: format!("https://{addr}"),
            sim,
            shutdown: tx,
            join,
        };
        Ok((handle, tls))
    }

    /// Stops serving and waits for the server task to end: in-flight requests finish, idle
    /// connections close. Bounded to 5 s (then the task is aborted) so a client that keeps a
    /// request open cannot hang the caller.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut join = self.join;
        match tokio::time::timeout(Duration::from_secs(5), &mut join).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "simulator server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "simulator server task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => {
                tracing::warn!("simulator server did not stop within 5 s; aborting it");
                join.abort();
            }
        }
    }
}

/// `ext/<name>` → (`name`, true); anything else as is.
fn split_ext(access: &str) -> (String, bool) {
    match access.strip_prefix("ext/") {
        Some(name) => (name.to_string(), true),
        None => (access.to_string(), false),
    }
}

/// The id Rancher gives an external user: `u-` + lowercase(base32(sha256(principal)))[..10]
/// (`pkg/auth/providers/common/usermanager.go`).
pub fn external_user_id(principal_id: &str) -> String {
    let digest = Sha256::digest(principal_id.as_bytes());
    let encoded = base32(digest.as_slice());
    format!("u-{}", encoded[..10].to_ascii_lowercase())
}

/// RFC 4648 base32 (standard alphabet), no padding. Written here to avoid a new dependency.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}
