//! Revoke: remove only what the connector made, and fail closed.
//!
//! 1. The key's owner is proven an admin (cached, see `admin`): Rancher filters listings by RBAC
//!    without a word, so only an admin's empty answer means "nothing there".
//! 2. Each binding the grant recorded is deleted by id (404 is done) and proven gone: a `GET`
//!    answering 404. One still readable is a retryable error, never success. With nothing
//!    recorded (the cleanup of a grant that failed after its POST, or a revoke queued by an older
//!    build), the ids this owner's grant would have made are deleted the same way, by id: a
//!    listing that lags must not be the only way to find them.
//! 3. The equal bindings (role, resource, subject) are listed and each is judged by
//!    `model::Ownership`: this connector's bindings of this grant, and bindings of a build before
//!    owners that name this grant (or none), are deleted and proven gone; another connector's
//!    are left; a person's (or a copy under another name) are left and reported in
//!    `left_binding_ids`. `all` (an operator's `revoke --all`) deletes every equal binding.
//!    The one-shot `revoke` (no grant id, owner `cli`) deletes the one-shot grants' bindings and
//!    other connectors' bindings whose marked expiry has passed (Rancher's clock); it leaves a
//!    binding whose marker says it is live, and says so in `notes`.
//! 4. A user the agent created that has no access left but its login roles is disabled; the
//!    remaining access is listed again after that write, and the user enabled again if a grant
//!    made a binding meanwhile.
//!
//! An external principal's equal bindings are listed by `userPrincipalId` and by its user's
//! `userId` (Rancher never fills an external principal into a binding made by `userId`). The
//! connector's bindings already being removed are proven gone too: a removal stuck on its
//! finalizers fails the revoke (`InProgress`, with a warning), never reports it done.
//!
//! Round trips, grant recorded (`user_id`, one binding id), user not agent-created: `DELETE` +
//! `GET` + listing + `GET /v3/users/{id}` = 4 (+2 for the admin proof once per key in 10 min).
//! For an agent-created user, +3 listings of its bindings (+1 `PUT` when it is disabled).

use std::time::{Duration, Instant};

use super::Rancher;
use super::client::ApiError;
use super::grant::{Kind, SubjectMatch, Target, check_role, is_agent_created};
use super::model::{Binding, Ownership, nonempty};
use super::names::{BindingSubject, MarkedExpiry, format_expiry, local_user_id};
use crate::integrations::{IntegrationError, Owner, RevokeRequest, RevokeResult, Subject};

/// Whom the equal bindings belong to, as far as the revoke can tell.
struct RevokeSubject {
    /// The subject fields the equal bindings are listed by (one listing each): an external
    /// principal's bindings may be made by `userPrincipalId` or by its user's `userId`.
    subjects: Vec<BindingSubject>,
    matcher: SubjectMatch,
    /// The Rancher user the revoke acts for, when known.
    user_id: Option<String>,
    /// Whether `user_id` may be a user the agent created, to check for "last access" (users the
    /// agent creates are local users; external principals and groups never are).
    may_be_managed: bool,
}

impl Rancher {
    pub(super) async fn revoke_access(&self, r: &RevokeRequest) -> Result<RevokeResult, IntegrationError> {
        check_role(&r.role)?;
        self.note_cluster(&r.resource);
        self.ensure_admin().await?;
        let owner = r.owner.clone().unwrap_or_else(Owner::cli);
        // The one-shot command revokes no particular grant.
        let one_shot = r.grant_id.is_none();
        let kind = Kind::of(&r.resource);
        let mut result = RevokeResult::default();
        let mut removed = Vec::new();
        for id in r.binding_ids.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            self.delete_confirmed(kind, id).await?;
            removed.push(id.to_string());
        }

        let Some(who) = self.revoke_subject(r, kind).await? else {
            // Looked up by name and not found (and the admin proof makes that answer
            // trustworthy): no binding of ours can name it.
            tracing::info!(subject = %r.subject, "revoke: no such user in Rancher; nothing else to remove");
            return Ok(finish(result, removed));
        };
        result.user_id = who.user_id.clone();
        let targets: Vec<Target<'_>> = who
            .subjects
            .iter()
            .map(|subject| Target {
                kind,
                role: &r.role,
                resource: &r.resource,
                subject: subject.clone(),
            })
            .collect();
        let target = &targets[0];
        if r.binding_ids.is_empty() && !one_shot {
            for t in &targets {
                for id in t.ids_of(&t.name(&owner)) {
                    if self.delete_if_present(kind, &id).await? {
                        tracing::info!(binding = %id, grant = %t.describe(), "removed the grant's binding by its derived id");
                        removed.push(id);
                    }
                }
            }
        }
        let mut equal = Vec::new();
        for t in &targets {
            for b in self.find_bindings_with_removed(t, &who.matcher).await? {
                if !equal.iter().any(|e: &Binding| e.id == b.id) {
                    equal.push(b);
                }
            }
        }
        let now = self.client.rancher_now();
        let expired = |b: &Binding| matches!(b.marked_expiry(), MarkedExpiry::At(t) if t <= now);
        let of_this_grant = |b: &Binding| b.grant_id().is_none() || b.grant_id() == r.grant_id.as_deref();
        for b in equal {
            if removed.contains(&b.id) {
                continue;
            }
            let ownership = b.ownership(&owner);
            let remove = r.all
                || match &ownership {
                    Ownership::Ours => one_shot || b.grant_id() == r.grant_id.as_deref(),
                    // Adopted at upgrade: the old build's binding of this grant.
                    Ownership::Legacy { .. } if !one_shot => of_this_grant(&b),
                    Ownership::Legacy { labeled } => *labeled && expired(&b),
                    // Ended by its own marker: no live access of that connector needs it.
                    Ownership::Connector(_) => one_shot && expired(&b),
                    Ownership::NotConnectors => false,
                };
            if b.is_removed() && !remove {
                // Someone else's, already on its way out.
                continue;
            }
            if remove {
                // Being removed already (an earlier revoke): proven gone all the same, so a
                // removal stuck on its finalizers is not reported as done.
                self.delete_confirmed(kind, &b.id).await?;
                removed.push(b.id);
                continue;
            }
            match ownership {
                Ownership::NotConnectors => {
                    tracing::info!(
                        binding = %b.id, grant = %target.describe(),
                        "left an equal binding the connector did not make in place"
                    );
                    result.left_binding_ids.push(b.id);
                }
                other => {
                    let whose = match &other {
                        Ownership::Connector(o) => format!("connector {o}"),
                        Ownership::Ours => "this connector".to_string(),
                        _ => "an earlier build of the connector".to_string(),
                    };
                    tracing::info!(
                        binding = %b.id, grant = %target.describe(), other_grant = b.grant_id().unwrap_or(""), whose,
                        "left a connector binding of another grant in place"
                    );
                    if one_shot {
                        let until = match b.marked_expiry() {
                            MarkedExpiry::At(t) => format!("until {}", format_expiry(t)),
                            _ => "with no expiry".to_string(),
                        };
                        result.notes.push(format!(
                            "left binding {}: it carries a live access of {whose} ({until}); `revoke --all` removes \
                             it anyway",
                            b.id
                        ));
                        result.left_binding_ids.push(b.id);
                    }
                }
            }
        }

        if let Some(user_id) = who.user_id.as_deref().filter(|_| who.may_be_managed) {
            self.disable_if_unused(user_id, &mut result).await?;
        }
        result.left_binding_ids.sort();
        let result = finish(result, removed);
        tracing::info!(
            grant = %target.describe(), removed = result.removed_binding_ids.len(),
            left = result.left_binding_ids.len(), user_disabled = result.user_disabled, "revoked"
        );
        Ok(result)
    }

    /// The subject of the equal bindings. A recorded `user_id` is used as is: a lookup by name
    /// that finds nothing proves nothing. `None`: looked up by name, and no such user.
    async fn revoke_subject(&self, r: &RevokeRequest, kind: Kind) -> Result<Option<RevokeSubject>, IntegrationError> {
        let mut recorded = r
            .user_id
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty() && !u.contains("://"))
            .map(str::to_string);
        // What the grant bound decides the kind of subject, whatever the request's string says.
        let subject = match r.bound_subject.as_ref().map(|b| (b.field.as_str(), b.value.trim())) {
            Some(("groupPrincipalId", g)) if !g.is_empty() => Subject::GroupPrincipal(g.to_string()),
            Some(("userPrincipalId", p)) if p.contains("://") => Subject::UserPrincipal(p.to_string()),
            Some(("userId", u)) if !u.is_empty() && !u.contains(['/', ':']) => {
                recorded = Some(u.to_string());
                r.subject.clone()
            }
            _ => r.subject.clone(),
        };
        let by_id = |id: String, principals: Vec<String>| RevokeSubject {
            subjects: vec![BindingSubject::UserId(id.clone())],
            matcher: SubjectMatch {
                user_id: Some(id.clone()),
                principals,
                group: None,
            },
            user_id: Some(id),
            may_be_managed: true,
        };
        Ok(match &subject {
            Subject::Username(name) => match recorded {
                Some(id) => Some(by_id(id, Vec::new())),
                None => self.find_user(name).await?.map(|u| by_id(u.id, u.principal_ids)),
            },
            Subject::UserPrincipal(p) => {
                if let Some(id) = local_user_id(p) {
                    Some(by_id(id.to_string(), vec![p.clone()]))
                } else if kind == Kind::Global {
                    let user = match recorded {
                        Some(id) => Some(id),
                        None => self.user_for_principal(p).await?.map(|u| u.id),
                    };
                    user.map(|id| RevokeSubject {
                        may_be_managed: false,
                        ..by_id(id, vec![p.clone()])
                    })
                } else {
                    // Bound by principal, or (Terraform, the UI, an older agent) by the same
                    // person's `userId`: Rancher fills `userPrincipalId` in on those only with
                    // `local://<userId>` (`crtb_handler.go`), so they are listed by `userId` too.
                    let user = match recorded {
                        Some(id) => Some(id),
                        None => self.user_for_principal(p).await?.map(|u| u.id),
                    };
                    let mut subjects = vec![BindingSubject::UserPrincipal(p.clone())];
                    subjects.extend(user.iter().cloned().map(BindingSubject::UserId));
                    Some(RevokeSubject {
                        subjects,
                        matcher: SubjectMatch {
                            user_id: user.clone(),
                            principals: vec![p.clone()],
                            group: None,
                        },
                        user_id: user,
                        may_be_managed: false,
                    })
                }
            }
            Subject::GroupPrincipal(g) => {
                let subject = BindingSubject::GroupPrincipal(g.clone());
                Some(RevokeSubject {
                    matcher: SubjectMatch::of(&subject),
                    subjects: vec![subject],
                    user_id: None,
                    may_be_managed: false,
                })
            }
        })
    }

    /// For a user the agent created: once no access is left but its login roles, disable it
    /// (`PUT /v3/users/{id} {"enabled": false}`: its tokens then get 401), so a password handed
    /// out once does not outlive the access.
    ///
    /// Race: a grant for the same user (any role) may create a binding between the listing and
    /// the `PUT`. The listing is made again after the `PUT`, and the user enabled again if a
    /// binding appeared; a grant reads the user after its binding exists and enables it if this
    /// `PUT` landed first. Whatever the interleaving, a user with a binding ends enabled.
    async fn disable_if_unused(&self, user_id: &str, result: &mut RevokeResult) -> Result<(), IntegrationError> {
        let Some(user) = self.get_user(user_id).await? else {
            return Ok(());
        };
        if !is_agent_created(&user) {
            return Ok(());
        }
        result.managed_user = true;
        let left = self.remaining_access(user_id).await?;
        if !left.is_empty() {
            return Ok(());
        }
        if user.enabled != Some(false) {
            self.set_enabled(user_id, false).await?;
            let appeared = self.remaining_access(user_id).await?;
            if !appeared.is_empty() {
                self.set_enabled(user_id, true).await?;
                tracing::info!(user_id, bindings = ?appeared, "a grant gave the user access while it was disabled: enabled again");
                return Ok(());
            }
            tracing::info!(user_id, "disabled an agent-created user: its last access was revoked");
        }
        result.user_disabled = true;
        Ok(())
    }

    /// Deletes a binding by id and proves it gone: `DELETE` (404: already gone), then `GET`
    /// until 404. While Rancher's finalizers run the binding stays readable with `removed` set:
    /// polled within the config's status timeout.
    ///
    /// # Errors
    /// `InProgress` (retryable) when it is still being removed at the deadline; `Unavailable`
    /// (retryable) when it is readable and not being removed after its delete; the request's
    /// failure otherwise.
    pub(super) async fn delete_confirmed(&self, kind: Kind, id: &str) -> Result<(), IntegrationError> {
        self.delete_if_present(kind, id).await.map(|_| ())
    }

    /// [`Rancher::delete_confirmed`], saying whether there was anything to delete (false: the
    /// `DELETE` answered 404).
    pub(super) async fn delete_if_present(&self, kind: Kind, id: &str) -> Result<bool, IntegrationError> {
        let url = self
            .client
            .url(&["v3", kind.collection(), id], &[])
            .map_err(ApiError::into_error)?;
        match self.client.delete(url.clone()).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => return Ok(false),
            Err(e) => return Err(e.into_error()),
        }
        let deadline = Instant::now() + self.config.status_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.client.get::<Binding>(url.clone()).await {
                Err(e) if e.status() == Some(404) => return Ok(true),
                Err(e) => return Err(e.into_error()),
                Ok(b) if !b.is_removed() => {
                    return Err(IntegrationError::Unavailable {
                        message: format!(
                            "binding {id} is still there after its delete (Rancher accepted the DELETE but the \
                             binding is not being removed); the revoke will be tried again"
                        ),
                    });
                }
                Ok(b) => {
                    if Instant::now() + delay > deadline {
                        // Finalizers that do not finish usually wait on a downstream cluster
                        // (its agent disconnected): until they do, the cluster's RoleBindings
                        // may still grant the access (through the authorized cluster endpoint).
                        let since = nonempty(&b.removed).unwrap_or("an unknown time");
                        tracing::warn!(
                            binding = id,
                            removed_since = since,
                            "a revoked binding is still being removed: its finalizers may be stuck"
                        );
                        return Err(IntegrationError::InProgress {
                            message: format!(
                                "binding {id} is still being removed by Rancher {}s after its delete (marked removed \
                                 at {since}): its finalizers may be stuck, usually on a downstream cluster whose agent \
                                 is disconnected, and the access may remain in effect there until they finish; check \
                                 the cluster's state in Rancher and the binding's finalizers; the revoke will check \
                                 again",
                                self.config.status_timeout.as_secs()
                            ),
                        });
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// `removed` sorted and deduplicated, into the result.
fn finish(mut result: RevokeResult, mut removed: Vec<String>) -> RevokeResult {
    removed.sort();
    removed.dedup();
    result.removed_binding_ids = removed;
    result
}
