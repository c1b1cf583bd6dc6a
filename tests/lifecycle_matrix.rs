//! The access lifecycle as a matrix, through the real `run` binary against a Rancher simulator
//! served by this test: subject kinds {username, `local://` principal, external user principal,
//! group principal} × scopes {global, cluster, project} × Rancher {2.10, 2.13} × {grant, overlap,
//! expiry revoke, repair after a person deletes the binding, restart (kill -9 while active)}.
//!
//! One daemon per Rancher version runs all its cells at once (short TTLs, a 2 s reconcile), each
//! cell with people of its own so that no two cells share a binding. Every cell asserts the
//! access's state and what Rancher holds; failures are collected and reported together, each
//! named `[2.13 group project repair] ...`, so one run shows every broken cell.

mod common;

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use apono_connector::control_plane::operator::{AccessRequest, AccessState, IntegrationRef};
use apono_connector::integrations::Subject;
use apono_connector::sim::{RancherVersion, SimBinding, SimHandle, SimOptions, SimUser, external_user_id};
use chrono::{DateTime, Utc};
use common::daemon::{Daemon, DaemonOptions, LONG, integration_toml, metric_sum, try_wait_state};
use futures::future::join_all;

/// TTL of the access whose grant and expiry revoke are checked.
const GRANT_TTL: u64 = 10;
/// TTL of the short access of an overlap; the long one is revoked by hand.
const SHORT_TTL: u64 = 5;
/// TTL of accesses that must outlive their cell (revoked by hand at its end).
const HELD_TTL: u64 = 120;
/// TTL of the access that is active across the daemon's kill -9.
const RESTART_TTL: u64 = 15;
/// How long a repair (a reconcile after the delete, then a grant) may take.
const REPAIR_WAIT: Duration = Duration::from_secs(30);
const SWEEP_INTERVAL_SECONDS: u64 = 2;

const LABEL: &str = "apono.io/created-by";
const LABEL_VALUE: &str = "apono-connector";
const GRANT_ID: &str = "apono.io/grant-id";
const EXPIRES_AT: &str = "apono.io/expires-at";
const OWNER: &str = "apono.io/owner";
const REPAIRS_METRIC: &str = "apono_connector_access_repairs_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Username,
    LocalPrincipal,
    ExternalPrincipal,
    Group,
}

const KINDS: [Kind; 4] = [
    Kind::Username,
    Kind::LocalPrincipal,
    Kind::ExternalPrincipal,
    Kind::Group,
];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Username => "username",
            Kind::LocalPrincipal => "local",
            Kind::ExternalPrincipal => "external",
            Kind::Group => "group",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Global,
    Cluster,
    Project,
}

const SCOPES: [Scope; 3] = [Scope::Global, Scope::Cluster, Scope::Project];

impl Scope {
    /// The role and resource of this scope's cells (none of the small dataset's people holds them).
    fn target(self) -> (&'static str, &'static str) {
        match self {
            Scope::Global => ("clusters-create", "global"),
            Scope::Cluster => ("cluster-member", "c-m-4bq8z2lp"),
            // A project made on 2.12+: its bindings live in the project's backing namespace there.
            Scope::Project => ("project-member", "c-7x2k9:p-x4m7q"),
        }
    }

    /// The prefix of the names the connector gives its bindings of this scope.
    fn name_prefix(self) -> &'static str {
        match self {
            Scope::Global => "grb-",
            Scope::Cluster => "crtb-",
            Scope::Project => "prtb-",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Global => "global",
            Scope::Cluster => "cluster",
            Scope::Project => "project",
        })
    }
}

/// Someone access is granted to, planted in the simulator for one cell.
#[derive(Debug, Clone)]
struct Person {
    kind: Kind,
    /// As the first access asks for it.
    subject: Subject,
    /// The same Rancher subject spelled the other way where there is one (a username and its
    /// `local://` principal), else the same spelling.
    alias: Subject,
    /// The Rancher user (none for a group).
    user_id: Option<String>,
    /// The user's principal, or the group's.
    principal: Option<String>,
}

impl Person {
    /// Whether `b` binds this person (by user id, user principal or group principal).
    fn holds(&self, b: &SimBinding) -> bool {
        match self.kind {
            Kind::Group => b.group_principal_id.is_some() && b.group_principal_id == self.principal,
            _ => {
                (b.user_id.is_some() && b.user_id == self.user_id)
                    || (b.user_principal_id.is_some() && b.user_principal_id == self.principal)
            }
        }
    }
}

/// One Rancher version: its simulator, its daemon and what its cells found.
struct Matrix {
    version: RancherVersion,
    sim: SimHandle,
    daemon: Daemon,
    failures: Mutex<Vec<String>>,
    passed: Mutex<Vec<String>>,
    /// The owner annotation of every connector binding a grant cell saw, by cell.
    owners: Mutex<Vec<(String, Option<String>)>>,
    planted: Mutex<Vec<Person>>,
}

impl Matrix {
    async fn start(minor: u32) -> Matrix {
        let version = RancherVersion::new(minor);
        let sim = SimHandle::start(SimOptions {
            version,
            ..SimOptions::default()
        })
        .await
        .expect("sim starts");
        let daemon = Daemon::start_opts(
            integration_toml("prod", &sim),
            DaemonOptions {
                sweep_interval_seconds: SWEEP_INTERVAL_SECONDS,
                parallelism: Some(16),
                log_to_file: true,
            },
        )
        .await;
        Matrix {
            version,
            sim,
            daemon,
            failures: Mutex::new(Vec::new()),
            passed: Mutex::new(Vec::new()),
            owners: Mutex::new(Vec::new()),
            planted: Mutex::new(Vec::new()),
        }
    }

    fn cell(&self, kind: Kind, scope: Scope, what: &str) -> String {
        format!("[{} {kind} {scope} {what}]", self.version)
    }

    fn record(&self, cell: &str, result: Result<(), String>) {
        match result {
            Ok(()) => self
                .passed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(cell.to_string()),
            Err(e) => self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{cell} {e}")),
        }
    }

    /// Plants a person of `kind` for the cell group `tag` (unique within the matrix).
    fn plant(&self, kind: Kind, scope: Scope, tag: &str) -> Person {
        let short = format!("{}{}{tag}", &kind.to_string()[..2], &scope.to_string()[..2]);
        let number = 9000 + self.planted.lock().unwrap_or_else(|e| e.into_inner()).len();
        let person = match kind {
            Kind::Username | Kind::LocalPrincipal => {
                let id = format!("u-m{short}");
                let username = format!("m-{kind}-{scope}-{tag}");
                let principal = format!("local://{id}");
                self.add_user(&id, Some(&username), &principal);
                let (by_name, by_principal) = (Subject::user(&username), Subject::user(&principal));
                let (subject, alias) = if kind == Kind::Username {
                    (by_name, by_principal)
                } else {
                    (by_principal, by_name)
                };
                Person {
                    kind,
                    subject,
                    alias,
                    user_id: Some(id),
                    principal: Some(principal),
                }
            }
            Kind::ExternalPrincipal => {
                // An external user who has logged in once: Rancher knows its principal, so a
                // global role (bound by user id only) can be granted too.
                let principal = format!("github_user://{number}");
                let id = external_user_id(&principal);
                self.add_user(&id, None, &principal);
                Person {
                    kind,
                    subject: Subject::user(&principal),
                    alias: Subject::user(&principal),
                    user_id: Some(id),
                    principal: Some(principal),
                }
            }
            Kind::Group => {
                let principal = format!("github_team://{number}");
                Person {
                    kind,
                    subject: Subject::GroupPrincipal(principal.clone()),
                    alias: Subject::GroupPrincipal(principal.clone()),
                    user_id: None,
                    principal: Some(principal),
                }
            }
        };
        self.planted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(person.clone());
        person
    }

    fn add_user(&self, id: &str, username: Option<&str>, principal: &str) {
        self.sim
            .sim
            .add_user(SimUser {
                id: id.to_string(),
                username: username.map(str::to_string),
                name: format!("Matrix {id}"),
                principal_ids: vec![principal.to_string()],
                labels: Default::default(),
                description: String::new(),
                must_change_password: false,
                enabled: true,
                password_set: false,
            })
            .expect("plant a user");
    }

    /// The bindings Rancher holds for `person` on this scope's role and resource.
    fn rancher(&self, person: &Person, scope: Scope) -> Vec<SimBinding> {
        let (role, resource) = scope.target();
        self.sim
            .sim
            .bindings()
            .into_iter()
            .filter(|b| b.role_id == role && b.resource_id == resource && person.holds(b))
            .collect()
    }

    async fn request(&self, subject: &Subject, scope: Scope, ttl: u64) -> Result<AccessRequest, String> {
        let (role, resource) = scope.target();
        self.daemon
            .request_subject(
                IntegrationRef::Name("prod".into()),
                subject.clone(),
                role,
                resource,
                ttl,
                false,
            )
            .await
            .map_err(|e| format!("the access request for {subject} was refused: {e}"))
    }

    /// An access requested and waited for until it is `active`.
    async fn granted(&self, subject: &Subject, scope: Scope, ttl: u64) -> Result<AccessRequest, String> {
        let a = self.request(subject, scope, ttl).await?;
        self.wait(&a.id, AccessState::Active, LONG).await
    }

    async fn wait(&self, id: &str, state: AccessState, timeout: Duration) -> Result<AccessRequest, String> {
        try_wait_state(&self.daemon.op, id, state, timeout).await
    }

    async fn get(&self, id: &str) -> Result<AccessRequest, String> {
        match self.daemon.op.access(id).await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(format!("access {id} is gone")),
            Err(e) => Err(format!("reading access {id}: {e}")),
        }
    }

    /// The access revoked by hand; then Rancher holds nothing of `person` for the scope.
    async fn revoke_by_hand(&self, id: &str, person: &Person, scope: Scope) -> Result<(), String> {
        self.daemon
            .op
            .revoke_access(id)
            .await
            .map_err(|e| format!("revoke of {id} refused: {e}"))?;
        self.wait(id, AccessState::Revoked, LONG).await?;
        nothing_left(&self.rancher(person, scope), "after its revoke")
    }

    // ----- the cells -----

    /// grant + expiry revoke on one access.
    async fn grant_and_expiry(&self, kind: Kind, scope: Scope) {
        let person = self.plant(kind, scope, "g");
        let grant_cell = self.cell(kind, scope, "grant");
        let expiry_cell = self.cell(kind, scope, "expiry revoke");
        let active = match self.granted(&person.subject, scope, GRANT_TTL).await {
            Ok(a) => a,
            Err(e) => {
                self.record(&grant_cell, Err(e));
                self.record(&expiry_cell, Err("not reached: the grant never became active".into()));
                return;
            }
        };
        let granted = self
            .check_granted(&person, scope, &active)
            .map(|b| self.note_owner(&grant_cell, &b));
        self.record(&grant_cell, granted);
        let expired = async {
            let ended = self
                .wait(&active.id, AccessState::Revoked, Duration::from_secs(GRANT_TTL) + LONG)
                .await?;
            if let (Some(revoked), Some(expires)) = (ended.revoked_at, ended.expires_at)
                && revoked < expires
            {
                return Err(format!("revoked at {revoked}, before its expiry {expires}"));
            }
            nothing_left(&self.rancher(&person, scope), "after the expiry")
        }
        .await;
        self.record(&expiry_cell, expired);
    }

    /// Keeps the owner annotation a cell's binding carries, for [`Matrix::check_owners`].
    fn note_owner(&self, cell: &str, b: &SimBinding) {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((cell.to_string(), b.annotations.get(OWNER).cloned()));
    }

    /// What an active access of `person` must show: its own, marked binding, and nothing else.
    fn check_granted(&self, person: &Person, scope: Scope, a: &AccessRequest) -> Result<SimBinding, String> {
        if a.pre_existing {
            return Err(format!("pre_existing, though nobody else gave this access: {a:?}"));
        }
        match person.kind {
            Kind::Group => {
                if a.user_id.as_deref().is_some_and(|u| !u.is_empty()) {
                    return Err(format!("a group access records user_id {:?}", a.user_id));
                }
            }
            _ => {
                if a.user_id != person.user_id {
                    return Err(format!("user_id {:?}, expected {:?}", a.user_id, person.user_id));
                }
            }
        }
        let held = self.rancher(person, scope);
        let [b] = held.as_slice() else {
            return Err(format!(
                "Rancher holds {} bindings for it, expected one: {held:?}",
                held.len()
            ));
        };
        if !a.binding_ids.contains(&b.id) {
            return Err(format!("binding_ids {:?} do not name {}", a.binding_ids, b.id));
        }
        check_marker(b, scope, &a.id, a.expires_at)?;
        Ok(b.clone())
    }

    /// Two accesses on one Rancher subject (spelled two ways where it has two) share the
    /// connector's binding; it stays until the last one ends.
    async fn overlap(&self, kind: Kind, scope: Scope) {
        let person = self.plant(kind, scope, "o");
        let cell = self.cell(kind, scope, "overlap");
        let result = async {
            let long = self.granted(&person.subject, scope, HELD_TTL).await?;
            let short = self.granted(&person.alias, scope, SHORT_TTL).await?;
            let held = self.rancher(&person, scope);
            let [b] = held.as_slice() else {
                return Err(format!(
                    "two accesses ({} and {}) left {} bindings, expected one shared: {held:?}",
                    person.subject,
                    person.alias,
                    held.len()
                ));
            };
            for a in [&long, &short] {
                if a.pre_existing || !a.binding_ids.contains(&b.id) {
                    return Err(format!(
                        "access {} does not hold the shared binding {} as its own: pre_existing {}, binding_ids {:?}",
                        a.id, b.id, a.pre_existing, a.binding_ids
                    ));
                }
            }
            self.wait(&short.id, AccessState::Revoked, Duration::from_secs(SHORT_TTL) + LONG)
                .await?;
            let now = self.get(&long.id).await?;
            if now.state != AccessState::Active {
                return Err(format!("the long access is {:?} after the short one ended", now.state));
            }
            if !self.rancher(&person, scope).iter().any(|x| x.id == b.id) {
                return Err(format!(
                    "the short access took the shared binding {} away from the long one",
                    b.id
                ));
            }
            self.revoke_by_hand(&long.id, &person, scope).await
        }
        .await;
        self.record(&cell, result);
    }

    /// A person deletes the binding of an active access: the reconcile puts it back.
    async fn repair(&self, kind: Kind, scope: Scope) {
        let person = self.plant(kind, scope, "r");
        let cell = self.cell(kind, scope, "repair");
        let result = async {
            let a = self.granted(&person.subject, scope, HELD_TTL).await?;
            let before = self.rancher(&person, scope);
            if before.is_empty() {
                return Err("Rancher holds no binding for the active access".into());
            }
            for b in &before {
                self.sim.sim.remove_binding(&b.id);
            }
            let deadline = tokio::time::Instant::now() + REPAIR_WAIT;
            let (now, b) = loop {
                let now = self.get(&a.id).await?;
                if now.state != AccessState::Active {
                    return Err(format!("the access is {:?} after its binding was deleted", now.state));
                }
                if let Some(b) = self
                    .rancher(&person, scope)
                    .into_iter()
                    .find(|b| now.binding_ids.contains(&b.id))
                {
                    break (now, b);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "not repaired within {REPAIR_WAIT:?}: Rancher holds {:?}, the access names {:?}",
                        self.rancher(&person, scope),
                        now.binding_ids
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            check_marker(&b, scope, &now.id, now.expires_at)?;
            self.revoke_by_hand(&a.id, &person, scope).await
        }
        .await;
        self.record(&cell, result);
    }

    /// Phase 2 for every lane at once: an access active across a kill -9 and a start again
    /// keeps its binding, and still ends at its time.
    async fn restart_all(&mut self) {
        let lanes: Vec<(Kind, Scope)> = KINDS
            .iter()
            .flat_map(|k| SCOPES.iter().map(move |s| (*k, *s)))
            .collect();
        let this = &*self;
        let started = join_all(lanes.iter().map(|&(kind, scope)| async move {
            let person = this.plant(kind, scope, "s");
            let active = this.granted(&person.subject, scope, RESTART_TTL).await;
            (kind, scope, person, active)
        }))
        .await;
        self.daemon.kill9();
        self.daemon.spawn().await;
        let this = &*self;
        join_all(started.into_iter().map(|(kind, scope, person, active)| async move {
            let cell = this.cell(kind, scope, "restart");
            let result = async {
                let before = active.map_err(|e| format!("before the restart: {e}"))?;
                let after = this.get(&before.id).await?;
                // Only while its time has not come: a slow restart may have let it expire.
                let due = before
                    .expires_at
                    .is_some_and(|e| Utc::now() + chrono::Duration::seconds(2) >= e);
                if !due {
                    if after.state != AccessState::Active {
                        return Err(format!("{:?} after the restart, before its expiry", after.state));
                    }
                    let held = this.rancher(&person, scope);
                    let [b] = held.as_slice() else {
                        return Err(format!(
                            "after the restart Rancher holds {} bindings, expected one: {held:?}",
                            held.len()
                        ));
                    };
                    if !after.binding_ids.contains(&b.id) {
                        return Err(format!(
                            "after the restart binding_ids {:?} do not name {}",
                            after.binding_ids, b.id
                        ));
                    }
                }
                this.wait(
                    &before.id,
                    AccessState::Revoked,
                    Duration::from_secs(RESTART_TTL) + LONG,
                )
                .await?;
                nothing_left(
                    &this.rancher(&person, scope),
                    "after the expiry that followed the restart",
                )
            }
            .await;
            this.record(&cell, result);
        }))
        .await;
    }

    /// A grant after the restart: its binding names the owner the bindings before it named (the
    /// install id is kept in the data dir), checked with the others by [`Matrix::check_owners`].
    async fn grant_after_restart(&self) {
        let (kind, scope) = (Kind::Username, Scope::Cluster);
        let person = self.plant(kind, scope, "a");
        let cell = self.cell(kind, scope, "grant after the restart");
        let result = async {
            let a = self.granted(&person.subject, scope, HELD_TTL).await?;
            let b = self.check_granted(&person, scope, &a)?;
            self.note_owner(&cell, &b);
            self.revoke_by_hand(&a.id, &person, scope).await
        }
        .await;
        self.record(&cell, result);
    }

    /// Every connector binding of this daemon names the same owner, `CONNECTOR/INSTALL`.
    fn check_owners(&self) {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cell = format!("[{} owner]", self.version);
        let missing: Vec<&str> = owners
            .iter()
            .filter(|(_, o)| o.is_none())
            .map(|(c, _)| c.as_str())
            .collect();
        let mut distinct: Vec<&str> = owners.iter().filter_map(|(_, o)| o.as_deref()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let result = if owners.is_empty() {
            Err("no grant cell got as far as its binding".to_string())
        } else if !missing.is_empty() {
            Err(format!("bindings without an {OWNER} annotation, in {missing:?}"))
        } else if distinct.len() != 1 {
            Err(format!("one daemon's bindings name several owners: {distinct:?}"))
        } else if !distinct[0].contains('/') {
            Err(format!("owner {:?} is not CONNECTOR/INSTALL", distinct[0]))
        } else {
            Ok(())
        };
        self.record(&cell, result);
    }

    /// `/metrics` counts the repairs.
    async fn check_repairs_metric(&self) {
        let page = self.daemon.metrics().await;
        let result = match metric_sum(&page, REPAIRS_METRIC, "") {
            Some(n) if n > 0.0 => Ok(()),
            Some(n) => Err(format!("{REPAIRS_METRIC} is {n} after the repair cells")),
            None => Err(format!("/metrics has no {REPAIRS_METRIC} after the repair cells")),
        };
        self.record(&format!("[{} repairs metric]", self.version), result);
    }

    /// Once every access has ended, Rancher holds nothing of anyone the matrix planted.
    fn check_nothing_left(&self) {
        let planted = self.planted.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let left: Vec<SimBinding> = self
            .sim
            .sim
            .bindings()
            .into_iter()
            .filter(|b| planted.iter().any(|p| p.holds(b)))
            .collect();
        self.record(
            &format!("[{} leftovers]", self.version),
            nothing_left(&left, "once every access has ended"),
        );
    }

    fn report(self) {
        let passed = self.passed.into_inner().unwrap_or_else(|e| e.into_inner());
        let failures = self.failures.into_inner().unwrap_or_else(|e| e.into_inner());
        eprintln!(
            "Rancher {}: {} cells passed, {} failed",
            self.version,
            passed.len(),
            failures.len()
        );
        for p in &passed {
            eprintln!("  ok   {p}");
        }
        for f in &failures {
            eprintln!("  FAIL {f}");
        }
        if !failures.is_empty() {
            eprintln!("--- the daemon's log, last lines ---\n{}", self.daemon.log_tail(40));
            panic!(
                "{} of {} cells failed on Rancher {}:\n{}",
                failures.len(),
                failures.len() + passed.len(),
                self.version,
                failures.join("\n")
            );
        }
    }
}

/// An expiry annotation is the access's `expires_at` in whole seconds.
fn same_second(annotation: DateTime<Utc>, expires_at: DateTime<Utc>) -> bool {
    let floor = expires_at.timestamp();
    let ceil = if expires_at.timestamp_subsec_nanos() > 0 {
        floor + 1
    } else {
        floor
    };
    annotation.timestamp() == floor || annotation.timestamp() == ceil
}

/// The connector's marker on a binding of access `grant_id`, and the name it gives it.
fn check_marker(b: &SimBinding, scope: Scope, grant_id: &str, expires_at: Option<DateTime<Utc>>) -> Result<(), String> {
    let hash = b.name.strip_prefix(scope.name_prefix()).unwrap_or_default();
    if hash.len() != 16 || !hash.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        return Err(format!(
            "binding name {:?} is not {}<16 hex>",
            b.name,
            scope.name_prefix()
        ));
    }
    if b.labels.get(LABEL).map(String::as_str) != Some(LABEL_VALUE) {
        return Err(format!("binding {} lacks {LABEL}: {LABEL_VALUE}: {:?}", b.id, b.labels));
    }
    if b.annotations.get(GRANT_ID).map(String::as_str) != Some(grant_id) {
        return Err(format!(
            "binding {} has {GRANT_ID} {:?}, expected {grant_id}",
            b.id,
            b.annotations.get(GRANT_ID)
        ));
    }
    let marked = b
        .annotations
        .get(EXPIRES_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    match (marked, expires_at) {
        (Some(m), Some(e)) if same_second(m, e) => Ok(()),
        _ => Err(format!(
            "binding {} has {EXPIRES_AT} {:?}, the access expires at {expires_at:?}",
            b.id,
            b.annotations.get(EXPIRES_AT)
        )),
    }
}

fn nothing_left(held: &[SimBinding], when: &str) -> Result<(), String> {
    if held.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Rancher still holds {:?} {when}",
            held.iter().map(|b| b.id.as_str()).collect::<Vec<_>>()
        ))
    }
}

async fn run_matrix(minor: u32) {
    let mut m = Matrix::start(minor).await;
    let this = &m;
    let mut cells = Vec::new();
    for kind in KINDS {
        for scope in SCOPES {
            cells.push(Box::pin(this.grant_and_expiry(kind, scope))
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>);
            cells.push(Box::pin(this.overlap(kind, scope)));
            cells.push(Box::pin(this.repair(kind, scope)));
        }
    }
    join_all(cells).await;
    m.check_repairs_metric().await;
    m.restart_all().await;
    m.grant_after_restart().await;
    m.check_owners();
    m.check_nothing_left();
    m.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_matrix_on_rancher_2_10() {
    run_matrix(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_matrix_on_rancher_2_13() {
    run_matrix(13).await;
}
