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
//! - Filters: `f=v`, `f_ne`, `f_in`, `f_notin`, `f_null`, `f_notnull` on the collection's known
//!   fields only (listed in each answer's `filters`); `sort=<field>&order=desc`.
//! - Users created through the API get no global role binding. A binding made by
//!   `userPrincipalId` alone creates the user (EnsureUser) and sets `userId`.
//! - `GET /sim/stats`, `/sim/bindings`, `/sim/users` need no auth and are not counted.
//!
//! # Fidelity controls
//!
//! On [`SimOptions`]: `version`, `latency`, `settle` (new bindings `InProgress`, EnsureUser's
//! `userId` and new users' `principalIds` hidden until then), `removal_delay` (deleted bindings
//! linger with `removed`), `key_cluster_id` / `key_expires_at` (scoped or expiring key),
//! `resolve_external_principals`, `password_min_length`, `faults` (seeded random 5xx / slow
//! answers), `seed`. At run time on [`Sim`]: [`Sim::set_api_key`] (rotation),
//! [`Sim::set_key_scope`], [`Sim::set_key_expiry`], [`Sim::set_version`], [`Sim::set_latency`],
//! [`Sim::set_settle`], [`Sim::set_removal_delay`], [`Sim::fail_next`] / [`Sim::fail_next_on`]
//! (exact faults, optionally after the change is committed), [`Sim::set_faults`],
//! [`Sim::add_user`], [`Sim::add_binding`], [`Sim::remove_binding`], [`Sim::check_password`].

mod api;
mod data;
mod store;
#[cfg(test)]
mod tests;
mod view;

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
/// `status.summary` on bindings (2.11+), `backingNamespace` on projects (2.12+), duplicate CRTBs
/// refused (2.14+) and duplicate PRTBs refused (2.15+).
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
    /// cluster `c` (others get 401 "clusterID does not match"). Default `None` (no scope).
    pub key_cluster_id: Option<String>,
    /// When the key expires (after which every request gets 401). Default `None` (never).
    pub key_expires_at: Option<DateTime<Utc>>,
    /// New bindings report `status.summary: InProgress` for this long, then `Completed`
    /// (2.11+ only). Default 0.
    pub settle: Duration,
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

/// Request counts since start (or the last [`Sim::reset_stats`]), `/v3` only.
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
    access_key: String,
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
        let key = KeyState {
            access_key: options.access_key.clone(),
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

    /// The current API key: `(access_key, secret_key)`.
    pub fn api_key(&self) -> (String, String) {
        let k = self.key();
        (k.access_key, k.secret_key)
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
        axum::serve(listener, api::router(self.clone()))
            .with_graceful_shutdown(shutdown)
            .await
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

    /// Every user, ordered by id.
    pub fn users(&self) -> Vec<SimUser> {
        lock(&self.inner.state)
            .users
            .values()
            .map(store::User::to_sim)
            .collect()
    }

    /// Every binding of the three kinds: GRBs, then CRTBs, then PRTBs, each ordered by id.
    pub fn bindings(&self) -> Vec<SimBinding> {
        let mut st = lock(&self.inner.state);
        st.purge();
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
    pub fn set_api_key(&self, access: &str, secret: &str) {
        let mut k = self.inner.key.write().unwrap_or_else(|e| e.into_inner());
        k.access_key = access.to_string();
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

    /// Changes how long new bindings stay `InProgress`.
    pub fn set_settle(&self, settle: Duration) {
        lock(&self.inner.state).settle = settle;
    }

    /// Changes how long deleted bindings stay listed with `removed` set.
    pub fn set_removal_delay(&self, delay: Duration) {
        lock(&self.inner.state).removal_delay = delay;
    }

    /// The next `n` `/v3` requests (any route) answer `status` with a Rancher-shaped error
    /// (500 `ServerError`, 503 `ClusterUnavailable`, ...). With `after_commit`, the request is
    /// applied first (a POST creates its binding) and only the answer is replaced.
    pub fn fail_next(&self, n: usize, status: u16, after_commit: bool) {
        lock(&self.inner.faults).push(None, n, status, after_commit);
    }

    /// Like [`Sim::fail_next`], for the next `n` requests whose route key (as in
    /// [`SimStats::routes`], e.g. `POST /v3/clusterroletemplatebindings`) equals `route`.
    pub fn fail_next_on(&self, route: &str, n: usize, status: u16, after_commit: bool) {
        lock(&self.inner.faults).push(Some(route.to_string()), n, status, after_commit);
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

    /// Makes the key's owner an admin (GRB `admin`, id `grb-admin`) or takes that away (its
    /// admin GRBs deleted, a `user` GRB `grb-owner` kept so it can log in), as another admin
    /// would. A non-admin owner sees lists filtered silently by RBAC (rancher/norman
    /// `store/proxy/proxy_store.go` `FilterList`, rancher `pkg/rbac/user_based.go`): `/v3/users`
    /// holds only itself; binding lists only its own bindings; clusters, projects and namespaces
    /// only those its bindings reach; global roles and role templates everything. Reading one
    /// object it may not see, and every PUT/DELETE of users and bindings, is 403 `Forbidden`
    /// (Kubernetes RBAC, the caller impersonated); a POST of a user or binding is 403
    /// `PermissionDenied` "can not create <type>".
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

    fn key(&self) -> KeyState {
        self.inner.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A simulator served on `127.0.0.1:<free port>` in the background.
pub struct SimHandle {
    /// `http://127.0.0.1:PORT`
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
