//! Grant: prove the key an admin, find (or create) the subject, then find or create this
//! connector's binding.
//!
//! The admin proof comes first (cached per key, see `admin`): a revoke must prove it to trust a
//! listing, so a key that could not revoke grants nothing. Every binding the connector creates
//! carries its marker (`names::Marker`): the label `apono.io/created-by: apono-connector`, the
//! annotations `apono.io/owner`, `apono.io/grant-id` and `apono.io/expires-at`, and the name its
//! owner derives from subject, role and resource. Before creating, the equal bindings (same role,
//! resource and subject, not being removed) are listed and judged by `model::Ownership`:
//! - ours (an earlier attempt, or another access of this connector on the same Rancher object), or
//!   one a build before owners made (adopted: marked with this owner): recorded, and its expiry
//!   annotation moved later if this access ends later (one `PUT`), so the reconcile never removes
//!   it while an access needs it;
//! - another connector's: ignored, this connector makes its own (two never share one), except on
//!   2.14+, whose webhook refuses an equal binding under another name: then it is recorded as
//!   pre-existing access;
//! - else one a person made (or a copy under another name): nothing is created, the result says
//!   `pre_existing`, and no revoke ever deletes it;
//! - else the binding is created under its derived name, so a retried POST is 409 AlreadyExists
//!   (read back and treated as ours).
//!
//! A grant whose expiry has passed on Rancher's clock creates nothing. For a user the connector
//! created, the user is read again once its binding exists and enabled if a revoke disabled it
//! meanwhile; a create-user grant resets the password unless `keep_password` (the user's live
//! access already has it).
//!
//! Round trips on the happy path on 2.11+ with the admin proof cached (measured against the
//! simulator in `tests.rs`); a cluster or global binding created is read back until `Completed`
//! (`settle`), one `GET` counted here; a project binding has no status on any version:
//! - grant to an existing user by username: `GET /v3/users?username=` + listing + `POST` + `GET`
//!   = 4 (3 for a project); a repeat is 2 (+1 `PUT` if the expiry moves).
//! - grant to a principal at cluster scope, or to a group: listing + `POST` + `GET` = 3 (a
//!   principal's project binding is read back until Rancher has filled in its user).
//! - grant to `local://u-x`: `GET /v3/users/u-x` first (Rancher would bind a ghost) = 4.
//! - grant with `create_user` to a new user: user lookup + `POST /v3/users` + `POST` binding +
//!   `GET` + `POST` login binding + `GET` = 6 (a new user has no bindings: nothing is listed). A
//!   repeat for an agent-created user lists its binding and login binding, reads the user, and sets
//!   a fresh password (credentials are never lost) unless `keep_password`.
//! - the admin proof, once per key in 10 minutes: `GET /v3/users?me=true` + the admin binding = 2
//!   (more when the owner is admin through a group or a custom role, see `admin`).
//!
//! Rancher refuses some bindings with a 500 (an unknown role template; an unknown project on
//! 2.12+; an external principal the key's auth provider cannot resolve): those are final, not
//! retried (`is_final_refusal`).

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use super::Rancher;
use super::client::ApiError;
use super::model::{Binding, Ownership, User, nonempty};
use super::names::{
    BindingSubject, CREATED_BY_DESCRIPTION, CREATED_BY_LABEL, CREATED_BY_VALUE, EXPIRES_AT_ANNOTATION,
    GRANT_ID_ANNOTATION, MarkedExpiry, Marker, OWNER_ANNOTATION, binding_name, external_user_id, format_expiry,
    generate_password, local_user_id,
};
use super::project_ns;
use crate::integrations::{
    BindingScope, BoundSubject, Credentials, GrantRequest, GrantResult, IntegrationError, Owner, Resource, Subject,
};

/// The login-only global role (rancher `pkg/data/management/role_data.go`). Users created
/// through the API get no default global role bindings (`usermanager.go`), so the agent adds this
/// one to the users it creates. Never `user`: it can create clusters and own them beyond the
/// access (rancher-api-notes §6).
pub(super) const LOGIN_ROLE: &str = "user-base";
/// Global roles Rancher gives users by default (login roles); delete-user and the "last access
/// of the user" check of a revoke ignore bindings of these.
pub(super) const DEFAULT_GLOBAL_ROLES: &[&str] = &["user", "user-base"];

/// The three kinds of binding, by the scope of the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Global,
    Cluster,
    Project,
}

impl Kind {
    pub(super) fn of(resource: &Resource) -> Kind {
        match resource {
            Resource::Global => Kind::Global,
            Resource::Cluster(_) => Kind::Cluster,
            Resource::Project(_) => Kind::Project,
        }
    }

    pub(super) fn collection(self) -> &'static str {
        match self {
            Kind::Global => "globalrolebindings",
            Kind::Cluster => "clusterroletemplatebindings",
            Kind::Project => "projectroletemplatebindings",
        }
    }

    pub(super) fn scope(self) -> BindingScope {
        match self {
            Kind::Global => BindingScope::Global,
            Kind::Cluster => BindingScope::Cluster,
            Kind::Project => BindingScope::Project,
        }
    }

    pub(super) fn role_field(self) -> &'static str {
        match self {
            Kind::Global => "globalRoleId",
            Kind::Cluster | Kind::Project => "roleTemplateId",
        }
    }

    fn resource_field(self) -> Option<&'static str> {
        match self {
            Kind::Global => None,
            Kind::Cluster => Some("clusterId"),
            Kind::Project => Some("projectId"),
        }
    }

    pub(super) fn noun(self) -> &'static str {
        match self {
            Kind::Global => "global role",
            Kind::Cluster => "cluster role",
            Kind::Project => "project role",
        }
    }
}

/// Which existing bindings belong to a subject. Checked client-side on every listing, whatever
/// the server's filters did.
#[derive(Debug, Clone, Default)]
pub(super) struct SubjectMatch {
    pub user_id: Option<String>,
    pub principals: Vec<String>,
    pub group: Option<String>,
}

impl SubjectMatch {
    pub(super) fn of(subject: &BindingSubject) -> SubjectMatch {
        match subject {
            BindingSubject::UserId(u) => SubjectMatch {
                user_id: Some(u.clone()),
                ..SubjectMatch::default()
            },
            BindingSubject::UserPrincipal(p) => SubjectMatch {
                principals: vec![p.clone()],
                ..SubjectMatch::default()
            },
            BindingSubject::GroupPrincipal(g) => SubjectMatch {
                group: Some(g.clone()),
                ..SubjectMatch::default()
            },
        }
    }

    pub(super) fn matches(&self, b: &Binding) -> bool {
        if let Some(group) = &self.group {
            return nonempty(&b.group_principal_id) == Some(group.as_str());
        }
        let by_id = self.user_id.as_deref().is_some_and(|u| nonempty(&b.user_id) == Some(u));
        let by_principal = nonempty(&b.user_principal_id).is_some_and(|p| self.principals.iter().any(|x| x == p));
        by_id || by_principal
    }
}

/// A binding as asked for: kind, role, resource and the subject field it is bound by.
#[derive(Debug, Clone)]
pub(super) struct Target<'a> {
    pub kind: Kind,
    pub role: &'a str,
    pub resource: &'a Resource,
    pub subject: BindingSubject,
}

impl Target<'_> {
    /// The name `owner` gives this binding.
    pub(super) fn name(&self, owner: &Owner) -> String {
        binding_name(
            owner,
            self.kind.scope(),
            &self.subject,
            self.role,
            self.resource.as_str(),
        )
    }

    /// The ids a binding named `name` has in Rancher: `name` (global), `c-x:name` (cluster), and
    /// for a project both `p-y:name` and `c-x-p-y:name` (its namespace depends on the project's age).
    pub(super) fn ids_of(&self, name: &str) -> Vec<String> {
        match self.resource {
            Resource::Global => vec![name.to_string()],
            Resource::Cluster(c) => vec![format!("{c}:{name}")],
            Resource::Project(p) => match p.split_once(':') {
                Some((c, p)) => vec![format!("{p}:{name}"), format!("{c}-{p}:{name}")],
                None => Vec::new(),
            },
        }
    }

    /// The bound subject, as the control plane keys overlapping accesses.
    pub(super) fn bound_subject(&self) -> BoundSubject {
        BoundSubject {
            field: self.subject.field().to_string(),
            value: self.subject.value().to_string(),
        }
    }

    fn body(&self, name: &str, marker: &Marker) -> Value {
        let mut body = Map::new();
        body.insert("name".into(), Value::from(name));
        body.insert("labels".into(), json!(marker.labels()));
        let annotations = marker.annotations();
        if !annotations.is_empty() {
            body.insert("annotations".into(), json!(annotations));
        }
        body.insert(self.kind.role_field().into(), Value::from(self.role));
        if let Some(field) = self.kind.resource_field() {
            body.insert(field.into(), Value::from(self.resource.as_str()));
        }
        body.insert(self.subject.field().into(), Value::from(self.subject.value()));
        Value::Object(body)
    }

    /// Same role on the same resource (the subject is checked by a [`SubjectMatch`]); not
    /// being removed.
    fn same_grant(&self, b: &Binding) -> bool {
        !b.is_removed() && self.same_role_and_resource(b)
    }

    /// Same role on the same resource, whether or not it is being removed.
    fn same_role_and_resource(&self, b: &Binding) -> bool {
        let role = match self.kind {
            Kind::Global => &b.global_role_id,
            Kind::Cluster | Kind::Project => &b.role_template_id,
        };
        let resource_ok = match self.kind {
            Kind::Global => true,
            Kind::Cluster => nonempty(&b.cluster_id) == Some(self.resource.as_str()),
            Kind::Project => nonempty(&b.project_id) == Some(self.resource.as_str()),
        };
        nonempty(role) == Some(self.role) && resource_ok
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} \"{}\" on {} for {}",
            self.kind.noun(),
            self.role,
            describe_resource(self.resource),
            describe_binding_subject(&self.subject)
        )
    }
}

fn describe_resource(r: &Resource) -> String {
    match r {
        Resource::Global => "global scope".into(),
        Resource::Cluster(c) => format!("cluster {c}"),
        Resource::Project(p) => format!("project {p}"),
    }
}

fn describe_binding_subject(s: &BindingSubject) -> String {
    match s {
        BindingSubject::UserId(u) => format!("user {u}"),
        BindingSubject::UserPrincipal(p) => format!("user principal {p}"),
        BindingSubject::GroupPrincipal(g) => format!("group {g}"),
    }
}

pub(super) fn check_role(role: &str) -> Result<(), IntegrationError> {
    if role.trim().is_empty() || role.contains(['/', '?', '#', ' ']) {
        return Err(IntegrationError::Invalid {
            message: format!("role {role:?} is not a Rancher role id (for example cluster-member or rt-abcde)"),
        });
    }
    Ok(())
}

/// The outcome of a user creation.
enum NewUser {
    Created(User, SecretString),
    /// Someone else created it first (422 NotUnique): read back, no password known.
    Existing(User),
}

pub(super) fn is_agent_created(u: &User) -> bool {
    u.labels.get(CREATED_BY_LABEL).map(String::as_str) == Some(CREATED_BY_VALUE)
        || nonempty(&u.description) == Some(CREATED_BY_DESCRIPTION)
}

/// What [`Rancher::ensure_binding`] found or made.
#[derive(Debug)]
pub(super) enum Ensured {
    /// The connector's binding: made by this call (`created`) or found.
    Ours { binding: Box<Binding>, created: bool },
    /// Equal access someone else made: nothing was created, and no revoke deletes these.
    PreExisting(Vec<Binding>),
}

impl Rancher {
    pub(super) async fn grant_access(&self, r: &GrantRequest) -> Result<GrantResult, IntegrationError> {
        check_role(&r.role)?;
        let owner = r.owner.clone().unwrap_or_else(Owner::cli);
        // A key scoped to this cluster is then named as such if Rancher refuses it.
        self.note_cluster(&r.resource);
        // Never grant what cannot be revoked: a revoke must prove the key sees everything, so
        // the grant proves it first, before any write (cached per key).
        self.ensure_admin().await?;
        let kind = Kind::of(&r.resource);
        // Whether this call created the user, and its generated password.
        let mut created_user = false;
        let mut note = None;
        let mut credentials: Option<(String, SecretString)> = None;
        // A user the agent created (now or earlier): enabled, given its login roles, tracked.
        let mut managed: Option<User> = None;
        let mut principals = Vec::new();
        let subject = match &r.subject {
            Subject::Username(name) => {
                let user = match self.find_user(name).await? {
                    Some(u) => u,
                    None if r.create_user => match self.create_local_user(name).await? {
                        NewUser::Created(u, password) => {
                            created_user = true;
                            credentials = Some((name.clone(), password));
                            u
                        }
                        NewUser::Existing(u) => u,
                    },
                    None => {
                        return Err(IntegrationError::NotFound {
                            message: format!(
                                "Rancher user \"{name}\" not found: check the username (a local Rancher username; \
                                 give a principal id such as github_user://123 for external users), or ask for the \
                                 user to be created (create_user)"
                            ),
                        });
                    }
                };
                if created_user || is_agent_created(&user) {
                    managed = Some(user.clone());
                }
                principals = user.principal_ids.clone();
                BindingSubject::UserId(user.id)
            }
            Subject::UserPrincipal(p) => {
                if let Some(id) = local_user_id(p) {
                    // Rancher binds a userId that names no user with a 201 (no reference
                    // validation, rancher-api-notes §6): a typo would be "granted". One GET first.
                    let Some(user) = self.get_user(id).await? else {
                        return Err(IntegrationError::NotFound {
                            message: format!(
                                "Rancher user {id} (principal {p}) not found: check the id (discover lists the users); \
                                 nothing was created"
                            ),
                        });
                    };
                    if is_agent_created(&user) {
                        managed = Some(user.clone());
                    }
                    principals = user.principal_ids.clone();
                    BindingSubject::UserId(user.id)
                } else if kind == Kind::Global {
                    // A GlobalRoleBinding takes only userId or groupPrincipalId.
                    match self.user_for_principal(p).await? {
                        Some(u) => BindingSubject::UserId(u.id),
                        None => {
                            return Err(IntegrationError::Invalid {
                                message: format!(
                                    "a global role needs an existing user, and no Rancher user has the principal \
                                     {p}: the principal has never logged in to Rancher (or belongs to an auth \
                                     provider Rancher does not use); ask them to log in once, or grant a cluster or \
                                     project role, which Rancher binds to the principal directly"
                                ),
                            });
                        }
                    }
                } else {
                    BindingSubject::UserPrincipal(p.clone())
                }
            }
            Subject::GroupPrincipal(g) => BindingSubject::GroupPrincipal(g.clone()),
        };
        let target = Target {
            kind,
            role: &r.role,
            resource: &r.resource,
            subject,
        };
        let mut matcher = SubjectMatch::of(&target.subject);
        matcher.principals.extend(principals);
        let marker = Marker {
            owner: Some(owner.clone()),
            grant_id: r.grant_id.clone(),
            expires_at: r.expires_at,
        };
        // A user this call created has no binding yet: nothing to look for.
        let ensured = self.ensure_binding(&target, &matcher, &marker, !created_user).await?;

        if let Some(user) = &managed {
            for role in self.login_roles().await? {
                if kind == Kind::Global && role == r.role {
                    continue;
                }
                let login = Target {
                    kind: Kind::Global,
                    role: &role,
                    resource: &Resource::Global,
                    subject: BindingSubject::UserId(user.id.clone()),
                };
                // Shared by every access of the user: the label and owner, no grant id, no expiry
                // (never swept, never unclaimed).
                let m = SubjectMatch::of(&login.subject);
                let login_marker = Marker {
                    owner: Some(owner.clone()),
                    ..Marker::default()
                };
                self.ensure_binding(&login, &m, &login_marker, !created_user).await?;
            }
            // Enabled once its binding exists, re-read now: a revoke disabling the user (its last
            // access ended) may have read "no binding left" just before this grant made one; it
            // re-checks after its write, and this read catches the write that landed first.
            if !created_user {
                self.enable_if_disabled(&user.id).await?;
            }
            // Credentials are never lost (an earlier attempt may have made the user and died
            // before its password was handed out, or `setpassword` may have failed after it
            // changed the password): every create-user grant of an agent-created user that did
            // not create it now sets a fresh password and returns it. Last, once the access exists.
            if r.create_user && !created_user && r.keep_password {
                note = Some(format!(
                    "user {} already holds a live access whose password was handed out then; the password was not \
                     reset (it still works)",
                    user.username().unwrap_or(&user.id)
                ));
            } else if r.create_user && !created_user {
                let Some(username) = user.username().map(str::to_string) else {
                    return Err(IntegrationError::Invalid {
                        message: format!(
                            "Rancher user {} carries the apono-connector marker but has no username: it is not a \
                             local user, so no password can be set for it",
                            user.id
                        ),
                    });
                };
                let password = generate_password();
                self.set_password(&user.id, &password).await?;
                tracing::info!(user_id = %user.id, "set a fresh password for an agent-created user");
                credentials = Some((username, password));
            }
        }

        let (binding_ids, pre_existing_binding_ids, bound_user) = match ensured {
            Ensured::Ours { binding, created } => {
                tracing::info!(binding = %binding.id, grant = %target.describe(), created, "granted");
                (vec![binding.id.clone()], Vec::new(), binding.user_id)
            }
            Ensured::PreExisting(found) => {
                let mut ids: Vec<String> = found.iter().map(|b| b.id.clone()).collect();
                ids.sort();
                tracing::info!(
                    grant = %target.describe(), existing = ?ids,
                    "equal access was already there (not made by the connector): nothing created"
                );
                (Vec::new(), ids, found.into_iter().find_map(|b| b.user_id))
            }
        };
        // A Rancher user id, or empty: a group has no user, and a principal's user may not exist
        // yet on a standing binding. The kind of subject travels in `bound_subject`.
        let user_id = match &target.subject {
            BindingSubject::UserId(u) => u.clone(),
            BindingSubject::UserPrincipal(_) => nonempty(&bound_user).unwrap_or_default().to_string(),
            BindingSubject::GroupPrincipal(_) => String::new(),
        };
        Ok(GrantResult {
            user_id,
            binding_ids,
            created_user,
            credentials: credentials.map(|(username, password)| Credentials { username, password }),
            access_details: self.config.access_details(),
            pre_existing: !pre_existing_binding_ids.is_empty(),
            pre_existing_binding_ids,
            managed_user: managed.is_some(),
            bound_subject: Some(target.bound_subject()),
            note,
        })
    }

    /// The user with this username, if any (`GET /v3/users?username=`, re-checked client-side).
    pub(super) async fn find_user(&self, username: &str) -> Result<Option<User>, IntegrationError> {
        self.client
            .list::<User>(&["v3", "users"], &[("username", username)], "users")
            .find(|u| u.username() == Some(username))
            .await
    }

    /// The user that has `principal` among its principal ids. External users have a
    /// deterministic id, so that one is read first (one request); otherwise every user is
    /// scanned, as the Terraform provider does (`principalIds` cannot be filtered).
    pub(super) async fn user_for_principal(&self, principal: &str) -> Result<Option<User>, IntegrationError> {
        let guess = external_user_id(principal);
        match self
            .client
            .get::<User>(
                self.client
                    .url(&["v3", "users", &guess], &[])
                    .map_err(ApiError::into_error)?,
            )
            .await
        {
            Ok(u) if u.principal_ids.iter().any(|p| p == principal) => return Ok(Some(u)),
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into_error()),
        }
        self.client
            .list::<User>(&["v3", "users"], &[], "users")
            .find(|u| u.principal_ids.iter().any(|p| p == principal))
            .await
    }

    /// `POST /v3/users` for a new local user with a generated password and the agent's marker.
    async fn create_local_user(&self, username: &str) -> Result<NewUser, IntegrationError> {
        let password = generate_password();
        let body = json!({
            "type": "user",
            "username": username,
            "password": password.expose_secret(),
            "name": username,
            "enabled": true,
            "mustChangePassword": false,
            "description": CREATED_BY_DESCRIPTION,
            "labels": {CREATED_BY_LABEL: CREATED_BY_VALUE},
        });
        match self
            .client
            .post::<User>(
                self.client.url(&["v3", "users"], &[]).map_err(ApiError::into_error)?,
                &body,
            )
            .await
            // A server that echoes the body in its error must not put the password in ours.
            .map_err(|e| e.scrubbed(password.expose_secret()))
        {
            Ok(u) => {
                tracing::info!(user_id = %u.id, username, "created a local Rancher user");
                Ok(NewUser::Created(u, password))
            }
            Err(e) if e.code() == Some("NotUnique") || (e.status() == Some(422) && e.field() == Some("username")) => {
                // Created concurrently (or by our own retried POST): read it back.
                match self.find_user(username).await? {
                    Some(u) => Ok(NewUser::Existing(u)),
                    None => Err(IntegrationError::Unavailable {
                        message: format!(
                            "Rancher says the username \"{username}\" is taken, but no user has it yet; try again"
                        ),
                    }),
                }
            }
            Err(e) if matches!(e.status(), Some(400 | 422)) => Err(IntegrationError::Invalid {
                message: format!(
                    "Rancher refused to create the user \"{username}\" ({}): {}",
                    e.code().unwrap_or("invalid"),
                    e.message()
                ),
            }),
            Err(e) => Err(e.into_error()),
        }
    }

    /// `POST /v3/users/{id}?action=setpassword`.
    pub(super) async fn set_password(&self, user_id: &str, password: &SecretString) -> Result<(), IntegrationError> {
        let url = self
            .client
            .url(&["v3", "users", user_id], &[("action", "setpassword")])
            .map_err(ApiError::into_error)?;
        let body = json!({"newPassword": password.expose_secret()});
        match self
            .client
            .post::<Value>(url, &body)
            .await
            .map_err(|e| e.scrubbed(password.expose_secret()))
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Err(IntegrationError::NotFound {
                message: format!("Rancher user {user_id} not found while setting its password"),
            }),
            Err(e) if matches!(e.status(), Some(400 | 422)) => Err(IntegrationError::Invalid {
                message: format!("Rancher refused the new password for user {user_id}: {}", e.message()),
            }),
            Err(e) => Err(e.into_error()),
        }
    }

    /// Creates the binding under its deterministic name, or finds it. Returns the binding and
    /// The connector's binding for `target`, found (`look_first`: the equal bindings are listed
    /// before anything is created) or made with `marker`; or the equal bindings someone else
    /// made, in which case nothing is created.
    pub(super) async fn ensure_binding(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
        marker: &Marker,
        look_first: bool,
    ) -> Result<Ensured, IntegrationError> {
        if look_first {
            let found = self.find_bindings(target, matcher).await?;
            self.refuse_if_expired(marker)?;
            if let Some(ensured) = self.adopt(target, marker, found, false).await? {
                return Ok(ensured);
            }
        }
        self.refuse_if_expired(marker)?;
        self.create_binding(target, matcher, marker).await
    }

    /// A grant whose expiry has passed, on Rancher's clock (the clock the sweep judges by), makes
    /// and extends nothing: the control plane would have to revoke it at once.
    fn refuse_if_expired(&self, marker: &Marker) -> Result<(), IntegrationError> {
        match marker.expires_at {
            Some(t) if t <= self.client.rancher_now() => Err(IntegrationError::Invalid {
                message: format!(
                    "the access expired at {} (Rancher's clock) before it was granted; no binding was created",
                    format_expiry(t)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Reads the equal bindings found: the connector's (its expiry moved later if needed), else
    /// someone else's, else nothing.
    ///
    /// Ours (or a binding of a build before owners, adopted here) is extended; another
    /// connector's is neither adopted nor counted: this connector makes its own, unless
    /// `others_stand` (Rancher 2.14+ refused ours as a duplicate of it), when it is recorded as
    /// pre-existing access like a person's.
    async fn adopt(
        &self,
        target: &Target<'_>,
        marker: &Marker,
        found: Vec<Binding>,
        others_stand: bool,
    ) -> Result<Option<Ensured>, IntegrationError> {
        let owner = marker.owner.clone().unwrap_or_else(Owner::cli);
        let name = target.name(&owner);
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for b in found {
            match b.ownership(&owner) {
                Ownership::Ours | Ownership::Legacy { .. } => ours.push(b),
                Ownership::Connector(_) if !others_stand => {}
                Ownership::Connector(_) | Ownership::NotConnectors => theirs.push(b),
            }
        }
        // Our own name first, then by id: the same choice on every attempt.
        ours.sort_by(|a, b| (a.object_name() != name, &a.id).cmp(&(b.object_name() != name, &b.id)));
        if let Some(b) = ours.into_iter().next() {
            // Found is not settled: an earlier attempt may have stopped while it was InProgress.
            let b = self.extend_marker(target, b, marker).await?;
            let binding = self.settle(target, b, false).await?;
            return Ok(Some(Ensured::Ours {
                binding: Box::new(binding),
                created: false,
            }));
        }
        if !theirs.is_empty() {
            return Ok(Some(Ensured::PreExisting(theirs)));
        }
        Ok(None)
    }

    /// `POST` under the deterministic name with the marker.
    async fn create_binding(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
        marker: &Marker,
    ) -> Result<Ensured, IntegrationError> {
        let name = target.name(marker.owner.as_ref().unwrap_or(&Owner::cli()));
        let url = self
            .client
            .url(&["v3", target.kind.collection()], &[])
            .map_err(ApiError::into_error)?;
        let body = target.body(&name, marker);
        let deadline = Instant::now() + self.config.status_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            match self
                .client
                .post_unless::<Binding>(url.clone(), &body, |e| is_final_refusal(target, e))
                .await
            {
                Ok(b) => {
                    self.learn_project_namespace(&b);
                    let binding = Box::new(self.settle(target, b, true).await?);
                    return Ok(Ensured::Ours { binding, created: true });
                }
                // Kubernetes prefixes AlreadyExists with this when the object holding the name
                // has a deletion timestamp: a revoke of the same access whose finalizers still
                // run. Not granted until it is gone: wait for it, then create anew.
                Err(e) if e.status() == Some(409) && e.message().starts_with("object is being deleted") => {
                    if Instant::now() + delay > deadline {
                        return Err(IntegrationError::InProgress {
                            message: format!(
                                "binding {name} ({}) is still being removed after an earlier revoke; the grant \
                                 will be made once Rancher has finished removing it",
                                target.describe()
                            ),
                        });
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) if e.status() == Some(409) && is_already_exists(&e) => {
                    // Our own name: an earlier attempt (or the first try of this retried POST)
                    // made it, or the listing lagged. Ours; marked and extended as needed.
                    let b = self.read_back(target, matcher, &name, &e).await?;
                    let b = self.extend_marker(target, b, marker).await?;
                    let binding = Box::new(self.settle(target, b, false).await?);
                    return Ok(Ensured::Ours {
                        binding,
                        created: false,
                    });
                }
                Err(e) if e.status() == Some(409) => {
                    // 2.14+ webhook: "duplicate crtb not allowed", an equal binding under another
                    // name (the listing missed it): ours if it carries the label.
                    tracing::info!(grant = %target.describe(), "an equal binding exists under another name");
                    let found = self.find_bindings(target, matcher).await?;
                    return match self.adopt(target, marker, found, true).await? {
                        Some(ensured) => Ok(ensured),
                        None => Err(IntegrationError::Unavailable {
                            message: format!(
                                "Rancher answered {} when binding {}, but no such binding can be found yet; try \
                                 again",
                                e.summary(),
                                target.describe()
                            ),
                        }),
                    };
                }
                Err(e) => return Err(binding_error(target, e)),
            }
        }
    }

    /// The binding holding our deterministic name after a 409 AlreadyExists: `GET` by id when
    /// the id is known, else the listing by name.
    async fn read_back(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
        name: &str,
        e: &ApiError,
    ) -> Result<Binding, IntegrationError> {
        let id = match (target.kind, target.resource) {
            (Kind::Global, _) => Some(name.to_string()),
            (Kind::Cluster, Resource::Cluster(c)) => Some(format!("{c}:{name}")),
            // The PRTB's namespace is `p-y` or `c-x-p-y` depending on the project's age: known
            // if this process has seen a binding of the project, else looked up by name.
            (Kind::Project, Resource::Project(p)) => {
                project_ns::namespace_of(self.config.base_url.as_str(), p).map(|ns| format!("{ns}:{name}"))
            }
            _ => None,
        };
        let gone = || IntegrationError::Unavailable {
            message: format!(
                "Rancher answered {} when binding {}, but the binding cannot be read yet; try again",
                e.summary(),
                target.describe()
            ),
        };
        if let Some(id) = id {
            let url = self
                .client
                .url(&["v3", target.kind.collection(), &id], &[])
                .map_err(ApiError::into_error)?;
            return match self.client.get::<Binding>(url).await {
                Ok(b) => {
                    self.learn_project_namespace(&b);
                    Ok(b)
                }
                Err(e) if e.status() == Some(404) => Err(gone()),
                Err(e) => Err(e.into_error()),
            };
        }
        self.find_bindings_named(target, matcher, Some(name), false)
            .await?
            .into_iter()
            .next()
            .ok_or_else(gone)
    }

    /// Makes sure the connector's binding `b` carries the label and an expiry no earlier than
    /// `marker`'s, so a sweep never removes it while this access still needs it. One `PUT` of
    /// the binding's labels and annotations (the others kept) when something changes.
    pub(super) async fn extend_marker(
        &self,
        target: &Target<'_>,
        b: Binding,
        marker: &Marker,
    ) -> Result<Binding, IntegrationError> {
        let mut labels = b.labels.clone();
        let mut annotations = b.annotations.clone();
        let mut changed = false;
        if !b.is_connectors() {
            labels.insert(CREATED_BY_LABEL.to_string(), CREATED_BY_VALUE.to_string());
            changed = true;
        }
        // A binding of a build before owners, adopted: from now on it names its owner (and the
        // grant adopting it, when it names none), so its revoke and the reconcile know it.
        if let Some(owner) = &marker.owner
            && b.owner_annotation().is_none()
        {
            annotations.insert(OWNER_ANNOTATION.to_string(), owner.to_string());
            if let Some(g) = marker.grant_id.as_deref().filter(|_| b.grant_id().is_none()) {
                annotations.insert(GRANT_ID_ANNOTATION.to_string(), g.to_string());
            }
            changed = true;
        }
        if let Some(ours) = marker.expires_at {
            let later = match b.marked_expiry() {
                MarkedExpiry::At(theirs) => ours.timestamp() > theirs.timestamp(),
                MarkedExpiry::None | MarkedExpiry::Unreadable(_) => true,
            };
            if later {
                annotations.insert(EXPIRES_AT_ANNOTATION.to_string(), format_expiry(ours));
                changed = true;
            }
        }
        if !changed {
            return Ok(b);
        }
        let url = self
            .client
            .url(&["v3", target.kind.collection(), &b.id], &[])
            .map_err(ApiError::into_error)?;
        let body = json!({"labels": labels, "annotations": annotations});
        match self.client.put::<Binding>(url, &body).await {
            Ok(updated) => {
                tracing::info!(binding = %b.id, grant = %target.describe(), "marked the connector's binding with the later expiry");
                Ok(updated)
            }
            Err(e) if e.status() == Some(404) => Err(IntegrationError::Unavailable {
                message: format!(
                    "binding {} ({}) went away while its expiry was extended; try again",
                    b.id,
                    target.describe()
                ),
            }),
            Err(e) => Err(e.into_error()),
        }
    }

    /// Bindings of the target's role on its resource that belong to the subject (filtered on
    /// the server, re-checked here).
    pub(super) async fn find_bindings(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
    ) -> Result<Vec<Binding>, IntegrationError> {
        self.find_bindings_named(target, matcher, None, false).await
    }

    /// [`Rancher::find_bindings`], with the bindings being removed too (a revoke proves its own
    /// gone, even when their finalizers are stuck).
    pub(super) async fn find_bindings_with_removed(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
    ) -> Result<Vec<Binding>, IntegrationError> {
        self.find_bindings_named(target, matcher, None, true).await
    }

    async fn find_bindings_named(
        &self,
        target: &Target<'_>,
        matcher: &SubjectMatch,
        name: Option<&str>,
        with_removed: bool,
    ) -> Result<Vec<Binding>, IntegrationError> {
        let mut filters = vec![(target.kind.role_field(), target.role)];
        if let Some(field) = target.kind.resource_field() {
            filters.push((field, target.resource.as_str()));
        }
        filters.push((target.subject.field(), target.subject.value()));
        if let Some(n) = name {
            filters.push(("name", n));
        }
        let what = format!("{} bindings", target.kind.noun());
        let found = self
            .client
            .list::<Binding>(&["v3", target.kind.collection()], &filters, what)
            .collect_matching(|b| {
                (if with_removed {
                    target.same_role_and_resource(b)
                } else {
                    target.same_grant(b)
                }) && matcher.matches(b)
                    && name.is_none_or(|n| b.object_name() == n)
            })
            .await?;
        for b in &found {
            self.learn_project_namespace(b);
            self.learn_status(b);
        }
        Ok(found)
    }

    /// Remembers which namespace holds a project's bindings (see `project_ns`).
    pub(super) fn learn_project_namespace(&self, b: &Binding) {
        if let Some(project) = b.project_id.as_deref() {
            project_ns::learn(self.config.base_url.as_str(), project, &b.id);
        }
    }
}

/// A 409 that means "the name is taken" (not the 2.14+ webhook's "duplicate ... not allowed").
fn is_already_exists(e: &ApiError) -> bool {
    e.code() == Some("AlreadyExists")
        || (e.code().is_none() && e.message().to_ascii_lowercase().contains("already exists"))
}

/// A 500 that is Rancher's final answer to a binding create, not a failure: retrying cannot help
/// (the client does not retry these).
pub(super) fn is_final_refusal(target: &Target<'_>, e: &ApiError) -> bool {
    is_unknown_role_template(e) || is_unknown_project(target, e) || unresolvable_principal(target, e).is_some()
}

/// CRTB/PRTB create with an unknown role template: Norman's validator answers **500**
/// `ServerError` "Error getting role template: roletemplates.management.cattle.io \"x\" not
/// found" (rancher `pkg/api/norman/customization/roletemplatebinding/validator.go`).
fn is_unknown_role_template(e: &ApiError) -> bool {
    let lower = e.message().to_ascii_lowercase();
    e.status() == Some(500) && lower.starts_with("error getting role template") && lower.contains("not found")
}

/// PRTB create for a project that does not exist, on 2.12+: the scoped store looks the project
/// up first (`pkg/api/norman/store/scoped/store.go` Create) and Norman answers the lister's
/// NotFound as **500** `projects.management.cattle.io "c-x/p-y" not found`. Before 2.12 the same
/// create is a 404 for the project's namespace (handled with the other refusals).
fn is_unknown_project(target: &Target<'_>, e: &ApiError) -> bool {
    let lower = e.message().to_ascii_lowercase();
    target.kind == Kind::Project
        && e.status() == Some(500)
        && lower.contains("projects.management.cattle.io \"")
        && lower.contains("not found")
}

/// Messages of a 500 that are not about the principal: the Kubernetes API, the admission webhook
/// (its pod restarting), etcd, the network, or the 2.12+ project lookup. Retryable, or another
/// refusal.
const NOT_ABOUT_THE_PRINCIPAL: &[&str] = &[
    "internal error occurred",
    "failed calling webhook",
    "etcdserver",
    "timeout",
    "timed out",
    "deadline exceeded",
    "connection refused",
    "connection reset",
    "i/o timeout",
    "projects.management.cattle.io",
];

/// What the auth providers say when they cannot resolve a principal id (rancher
/// `pkg/auth/providers/*`): the local provider's user lookup (`users.management.cattle.io "x" not
/// found`, `local_auth_provider.go` GetPrincipal), "invalid id", SAML's and OIDC's "invalid
/// principal type", GitHub's and Google's "invalid externalIDType", a provider's "not found".
const CANNOT_RESOLVE: &[&str] = &[
    "users.management.cattle.io",
    "invalid id",
    "invalid principal",
    "invalid externalid",
    "not found",
];

/// The external principal of a binding create that its auth provider cannot resolve: Rancher
/// resolves it through the key owner's auth provider before storing anything
/// (`providers.GetPrincipal` in rancher `pkg/api/norman/customization/authn/rtb_store.go`), and
/// the provider's error is a plain one that Norman answers as 500. Permanent until the key
/// changes. Only for the messages that say so ([`CANNOT_RESOLVE`]): any other 500 on the same
/// create (a webhook, etcd, a provider timing out) is not about the id.
fn unresolvable_principal<'t>(target: &'t Target<'_>, e: &ApiError) -> Option<&'t str> {
    let BindingSubject::UserPrincipal(p) = &target.subject else {
        return None;
    };
    if p.starts_with("local://") || e.status() != Some(500) {
        return None;
    }
    let lower = e.message().to_ascii_lowercase();
    if NOT_ABOUT_THE_PRINCIPAL.iter().any(|m| lower.contains(m)) {
        return None;
    }
    CANNOT_RESOLVE.iter().any(|m| lower.contains(m)).then_some(p.as_str())
}

/// Reads Rancher's refusal of a binding into an error that names the role, the resource or the
/// subject, and says why. Uses Rancher's own answers: no request is spent checking first.
pub(super) fn binding_error(target: &Target<'_>, e: ApiError) -> IntegrationError {
    let status = e.status().unwrap_or(0);
    if is_unknown_role_template(&e) {
        return IntegrationError::Invalid {
            message: format!(
                "role \"{}\" does not exist in Rancher as a {} (Rancher: {}); check the role id (discover lists the \
                 roles); nothing was created",
                target.role,
                target.kind.noun(),
                e.message()
            ),
        };
    }
    if is_unknown_project(target, &e) {
        return IntegrationError::NotFound {
            message: format!(
                "{} not found in Rancher (Rancher: {}); check the id (discover lists them); nothing was created",
                describe_resource(target.resource),
                e.message()
            ),
        };
    }
    if let Some(p) = unresolvable_principal(target, &e) {
        return IntegrationError::Config {
            message: format!(
                "Rancher cannot resolve the principal {p} when binding {} ({}): Rancher looks principals up through \
                 the auth provider of the API key's owner; use a key of an admin who logs in through the same \
                 provider as {p} (or check the principal id)",
                target.describe(),
                e.summary()
            ),
        };
    }
    if !matches!(status, 400 | 404 | 422) {
        return e.into_error();
    }
    let role = target.role;
    let rancher = e.message().to_string();
    let lower = rancher.to_ascii_lowercase();
    let field = e.field().unwrap_or("");
    let missing = [
        "not found",
        "does not exist",
        "invalid reference",
        "no such",
        "not exist",
    ]
    .iter()
    .any(|m| lower.contains(m))
        || e.code() == Some("InvalidReference")
        || status == 404;
    if lower.contains("locked") {
        return IntegrationError::Invalid {
            message: format!(
                "role \"{role}\" is locked in Rancher and cannot be assigned (Rancher: {rancher}); unlock the role \
                 or choose another"
            ),
        };
    }
    if lower.contains("context") {
        let context = bracketed(&rancher).unwrap_or_else(|| "different".to_string());
        let where_ = match target.resource {
            Resource::Global => "globally".to_string(),
            Resource::Cluster(c) => format!("on cluster {c}"),
            Resource::Project(p) => format!("on project {p}"),
        };
        return IntegrationError::Invalid {
            message: format!(
                "role \"{role}\" is a {context} role and cannot be bound {where_} (Rancher: {rancher}); choose a \
                 {} role",
                match target.kind {
                    Kind::Global => "global",
                    Kind::Cluster => "cluster",
                    Kind::Project => "project",
                }
            ),
        };
    }
    let resource_name = target.resource.as_str();
    let about_role = matches!(field, "roleTemplateId" | "globalRoleId")
        || (field.is_empty()
            && (lower.contains(&format!("\"{}\"", role.to_ascii_lowercase()))
                || lower.contains("roletemplate")
                || lower.contains("globalrole ")
                || lower.contains("globalrole.")
                || lower.contains("globalroles")
                || lower.contains("role template")
                || lower.contains("role ")));
    // A PRTB lives in its project's namespace (`p-y`, or `c-x-p-y` on 2.12+ backing
    // namespaces): an unknown project is Kubernetes' 404 `namespaces "p-y" not found`.
    let quoted = |s: &str| format!("\"{}\"", s.to_ascii_lowercase());
    let mut resource_names = vec![quoted(resource_name)];
    if let Resource::Project(p) = target.resource
        && let Some((cluster, project)) = p.split_once(':')
    {
        resource_names.push(quoted(project));
        resource_names.push(quoted(&format!("{cluster}-{project}")));
    }
    let about_resource = matches!(field, "clusterId" | "projectId")
        || (field.is_empty() && target.kind != Kind::Global && resource_names.iter().any(|n| lower.contains(n)));
    let about_subject = matches!(field, "userId" | "userPrincipalId" | "groupPrincipalId" | "groupId");
    if missing && about_resource && !matches!(field, "roleTemplateId" | "globalRoleId") {
        return IntegrationError::NotFound {
            message: format!(
                "{} not found in Rancher (Rancher: {rancher}); check the id (discover lists them)",
                describe_resource(target.resource)
            ),
        };
    }
    if missing && about_role {
        return IntegrationError::Invalid {
            message: format!(
                "role \"{role}\" does not exist in Rancher as a {} (Rancher: {rancher}); check the role id \
                 (discover lists the roles)",
                target.kind.noun()
            ),
        };
    }
    if missing && about_subject {
        return IntegrationError::NotFound {
            message: format!(
                "{} not found in Rancher (Rancher: {rancher})",
                describe_binding_subject(&target.subject)
            ),
        };
    }
    IntegrationError::Invalid {
        message: format!("Rancher refused binding {} ({})", target.describe(), e.summary()),
    }
}

/// `Cannot reference context [project] from [cluster] context` → `project`.
fn bracketed(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start + 1..].find(']')?;
    let inner = text[start + 1..start + 1 + end].trim();
    (!inner.is_empty()).then(|| inner.to_string())
}
