//! The reconcile: what Rancher holds against what the accesses say. The control plane runs it per
//! integration every `sweep_interval` (the `sweep` job); an operator runs it by hand
//! (`apono-connector sweep`, which knows no accesses). Jobs are edge-triggered (grant at request,
//! revoke at expiry); this is the level-triggered pass that keeps the promise when an edge is lost.
//!
//! After the admin proof the three binding collections are listed once each (labels cannot be
//! filtered on v3 collections), in full before any write; expiry is judged on Rancher's clock (the
//! `Date` of the listing). "Held" below: the binding's id is in `keep_binding_ids` or in the
//! `binding_ids` of an access that has not ended. Ownership is `model::Ownership`.
//!
//! | binding (not being removed)                                       | action                                   |
//! |-------------------------------------------------------------------|------------------------------------------|
//! | ours, held, marked expiry earlier than a live holder's            | expiry moved to the latest holder's (PUT) |
//! | ours, held                                                        | kept                                     |
//! | ours, not held, its grant id names a pending/active/revoking access | kept (that grant is still running)     |
//! | any connector's or a pre-owner labelled one, not held, expired    | removed (`expired`)                      |
//! | ours, not held, an access binding (grant id), accesses known, older than the grace | removed (`unclaimed`) |
//! | ours without a grant id (a created user's login binding)          | kept                                     |
//! | another connector's or a pre-owner one, not expired               | kept (its own connector ends it)         |
//! | a person's, or a copy of a connector's under another name         | never touched                            |
//! | an unreadable expiry                                              | kept, with a warning                     |
//!
//! And per access:
//!
//! | access                                                            | result                                   |
//! |-------------------------------------------------------------------|------------------------------------------|
//! | active, no binding in Rancher gives its subject its role (its own gone, or the standing one of a `pre_existing` access) | reported `missing`: the control plane grants it again |
//! | active, some equal binding present (ours, a person's, another connector's) | nothing                        |
//! | pending or revoking                                               | nothing (its job is running)             |
//!
//! Each binding to remove is read again right before its delete (one `GET`): a grant that moved
//! its expiry later, or adopted it, meanwhile keeps it. What is left is the moment between that
//! `GET` and the `DELETE` (v3 has no conditional delete); the access that loses its binding so is
//! reported missing by the next pass and repaired. One failed delete does not stop the others.
//!
//! Cost: the admin proof (cached), three listings, and one request per change.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::Rancher;
use super::client::ApiError;
use super::grant::{Kind, Target};
use super::model::{Binding, Ownership, nonempty};
use super::names::{BindingSubject, MarkedExpiry, Marker};
use crate::integrations::{
    HeldAccess, HeldState, IntegrationError, MissingAccess, Owner, Resource, Subject, SweepRequest, SweepResult,
    SweptBinding, SweptReason,
};

/// Why a listed binding is removed, if it is.
fn verdict(
    b: &Binding,
    owner: &Owner,
    claims: &Claims,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Option<SweptReason> {
    if b.is_removed() || claims.held.contains(b.id.as_str()) {
        return None;
    }
    let ownership = b.ownership(owner);
    let ours = ownership == Ownership::Ours;
    if ours && b.grant_id().is_some_and(|g| claims.grants.contains(g)) {
        return None;
    }
    let connectors = match ownership {
        Ownership::Ours | Ownership::Connector(_) => true,
        Ownership::Legacy { labeled } => labeled,
        Ownership::NotConnectors => false,
    };
    match b.marked_expiry() {
        MarkedExpiry::At(t) if connectors && t <= now => return Some(SweptReason::Expired),
        MarkedExpiry::Unreadable(value) if connectors => {
            tracing::warn!(
                binding = %b.id, value,
                "the connector's binding has an unreadable apono.io/expires-at; the reconcile leaves it"
            );
            return None;
        }
        _ => {}
    }
    let old_enough = nonempty(&b.created)
        .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
        .is_some_and(|c| now - c.with_timezone(&Utc) >= grace);
    (ours && claims.known && b.grant_id().is_some() && old_enough).then_some(SweptReason::Unclaimed)
}

/// What the accesses that have not ended claim.
#[derive(Default)]
struct Claims<'a> {
    /// Binding ids held (`keep_binding_ids` and the accesses' `binding_ids`).
    held: HashSet<&'a str>,
    /// Grant ids of accesses that have not ended.
    grants: HashSet<&'a str>,
    /// The control plane sent its accesses: an unclaimed binding of ours can be told.
    known: bool,
    /// For each held binding, the latest expiry among its live holders.
    latest_expiry: HashMap<&'a str, DateTime<Utc>>,
}

impl<'a> Claims<'a> {
    fn of(request: &'a SweepRequest) -> Claims<'a> {
        let mut c = Claims {
            held: request.keep_binding_ids.iter().map(String::as_str).collect(),
            known: request.accesses.is_some(),
            ..Claims::default()
        };
        for a in request.accesses.iter().flatten() {
            c.grants.insert(a.grant_id.as_str());
            for id in &a.binding_ids {
                c.held.insert(id.as_str());
                if let (Some(t), HeldState::Active | HeldState::Pending) = (a.expires_at, a.state) {
                    let e = c.latest_expiry.entry(id.as_str()).or_insert(t);
                    *e = (*e).max(t);
                }
            }
        }
        c
    }
}

impl Rancher {
    pub(super) async fn reconcile(&self, request: &SweepRequest) -> Result<SweepResult, IntegrationError> {
        self.ensure_admin().await?;
        let owner = request.owner.clone().unwrap_or_else(Owner::cli);
        let claims = Claims::of(request);
        let grace = chrono::Duration::from_std(self.config.unclaimed_grace).unwrap_or_default();
        let mut result = SweepResult {
            dry_run: request.dry_run,
            ..SweepResult::default()
        };
        let mut listed: Vec<(Kind, Binding)> = Vec::new();
        for kind in [Kind::Global, Kind::Cluster, Kind::Project] {
            // Listed in full before any write: a delete between pages can restart the paging.
            let mut pager =
                self.client
                    .list::<Binding>(&["v3", kind.collection()], &[], format!("{} bindings", kind.noun()));
            while let Some(page) = pager.next_page().await? {
                listed.extend(page.into_iter().map(|b| (kind, b)));
            }
        }
        let now = self.client.rancher_now();
        result.rancher_time = Some(now);

        let mut failed = Vec::new();
        for (kind, b) in &listed {
            if b.is_connectors() || b.owner_annotation().is_some() {
                result.marked += 1;
            }
            if let Some(latest) = claims.latest_expiry.get(b.id.as_str())
                && !b.is_removed()
                && b.ownership(&owner) == Ownership::Ours
                && !matches!(b.marked_expiry(), MarkedExpiry::At(t) if t.timestamp() >= latest.timestamp())
            {
                if !request.dry_run
                    && let Err(e) = self.move_expiry(*kind, b, &owner, *latest).await
                {
                    failed.push(format!("{} ({e})", b.id));
                    continue;
                }
                result.extended_binding_ids.push(b.id.clone());
                continue;
            }
            let Some(reason) = verdict(b, &owner, &claims, now, grace) else {
                if claims.held.contains(b.id.as_str())
                    && matches!(b.marked_expiry(), MarkedExpiry::At(t) if t <= now)
                    && b.is_connectors()
                {
                    result.kept_binding_ids.push(b.id.clone());
                }
                continue;
            };
            let swept = swept(*kind, b, reason);
            if !request.dry_run {
                match self.still_removable(*kind, b, &owner, &claims, grace).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        failed.push(format!("{} ({e})", b.id));
                        continue;
                    }
                }
                if let Err(e) = self.delete_confirmed(*kind, &b.id).await {
                    tracing::warn!(binding = %b.id, error = %e, "reconcile: could not remove a binding");
                    failed.push(format!("{} ({e})", b.id));
                    continue;
                }
                tracing::info!(
                    binding = %swept.id, role = %swept.role_id, resource = %swept.resource_id, subject = %swept.subject,
                    grant = swept.grant_id.as_deref().unwrap_or(""), expires_at = ?swept.expires_at, reason = ?reason,
                    "reconcile: removed the connector's binding"
                );
            }
            result.removed.push(swept);
        }
        for a in request.accesses.iter().flatten() {
            if a.state == HeldState::Active
                && let Some(reason) = missing(a, &listed)
            {
                tracing::warn!(access = %a.grant_id, reason, "reconcile: an active access has no binding in Rancher");
                result.missing.push(MissingAccess {
                    grant_id: a.grant_id.clone(),
                    reason,
                });
            }
        }
        result.kept_binding_ids.sort();
        if !failed.is_empty() {
            return Err(IntegrationError::Unavailable {
                message: format!(
                    "the reconcile removed {} binding(s) but could not change {}: {}; the next pass tries again",
                    result.removed.len(),
                    failed.len(),
                    failed.join("; ")
                ),
            });
        }
        Ok(result)
    }

    /// Reads a binding again just before its delete: a grant may have adopted it or moved its
    /// expiry since the listing. False when it is gone or no longer to be removed.
    async fn still_removable(
        &self,
        kind: Kind,
        listed: &Binding,
        owner: &Owner,
        claims: &Claims<'_>,
        grace: chrono::Duration,
    ) -> Result<bool, IntegrationError> {
        let url = self
            .client
            .url(&["v3", kind.collection(), &listed.id], &[])
            .map_err(ApiError::into_error)?;
        match self.client.get::<Binding>(url).await {
            Ok(b) => Ok(verdict(&b, owner, claims, self.client.rancher_now(), grace).is_some()),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e.into_error()),
        }
    }

    /// Moves the expiry annotation of our binding `b` to `to` (one `PUT` of its maps).
    async fn move_expiry(
        &self,
        kind: Kind,
        b: &Binding,
        owner: &Owner,
        to: DateTime<Utc>,
    ) -> Result<(), IntegrationError> {
        let Some((_, role, resource)) = b.scope_role_resource() else {
            return Ok(());
        };
        let resource = match kind {
            Kind::Global => Resource::Global,
            Kind::Cluster => Resource::Cluster(resource.to_string()),
            Kind::Project => Resource::Project(resource.to_string()),
        };
        let subject = match (nonempty(&b.group_principal_id), nonempty(&b.user_principal_id)) {
            (Some(g), _) => BindingSubject::GroupPrincipal(g.to_string()),
            (None, Some(p)) if nonempty(&b.user_id).is_none() => BindingSubject::UserPrincipal(p.to_string()),
            _ => BindingSubject::UserId(nonempty(&b.user_id).unwrap_or_default().to_string()),
        };
        let target = Target {
            kind,
            role,
            resource: &resource,
            subject,
        };
        let marker = Marker {
            owner: Some(owner.clone()),
            grant_id: None,
            expires_at: Some(to),
        };
        self.extend_marker(&target, b.clone(), &marker).await.map(|_| ())
    }
}

/// Why an active access has no binding in Rancher, or `None` when some equal binding (same role
/// and resource, its subject; not being removed) gives it the access.
fn missing(a: &HeldAccess, listed: &[(Kind, Binding)]) -> Option<String> {
    let kind = Kind::of(&a.resource);
    let user_id = a.user_id.as_deref().filter(|u| !u.is_empty());
    // The fields a binding of this access may carry.
    let (mut user_ids, mut principals, mut groups): (Vec<&str>, Vec<&str>, Vec<&str>) = (vec![], vec![], vec![]);
    match a.bound_subject.as_ref().map(|s| (s.field.as_str(), s.value.as_str())) {
        Some(("userId", u)) => user_ids.push(u),
        Some(("userPrincipalId", p)) => principals.push(p),
        Some(("groupPrincipalId", g)) => groups.push(g),
        _ => match &a.subject {
            Subject::GroupPrincipal(g) => groups.push(g),
            Subject::UserPrincipal(p) => principals.push(p),
            Subject::Username(_) => {}
        },
    }
    user_ids.extend(user_id);
    if let Subject::UserPrincipal(p) = &a.subject {
        principals.push(p);
    }
    let local: Vec<String> = user_ids.iter().map(|u| format!("local://{u}")).collect();
    let subject_known = !(user_ids.is_empty() && principals.is_empty() && groups.is_empty());
    let equal = |b: &Binding| {
        let Some((_, role, resource)) = b.scope_role_resource() else {
            return false;
        };
        let by_user = nonempty(&b.user_id).is_some_and(|u| user_ids.contains(&u));
        let by_principal =
            nonempty(&b.user_principal_id).is_some_and(|p| principals.contains(&p) || local.iter().any(|l| l == p));
        let by_group = nonempty(&b.group_principal_id).is_some_and(|g| groups.contains(&g));
        role == a.role && resource == a.resource.as_str() && (by_user || by_principal || by_group)
    };
    let present = listed
        .iter()
        .any(|(k, b)| *k == kind && !b.is_removed() && (a.binding_ids.contains(&b.id) || (subject_known && equal(b))));
    if present || (!subject_known && a.binding_ids.is_empty()) {
        // Present; or nothing to look for (a username whose user was never recorded, with no
        // binding of its own): its grant's own checks are all there is.
        return None;
    }
    Some(format!(
        "no binding gives {} the {} \"{}\" on {} any more{}",
        a.subject,
        kind.noun(),
        a.role,
        a.resource,
        if a.pre_existing {
            " (the equal binding that was there before the access is gone)"
        } else {
            " (the connector's binding was deleted)"
        }
    ))
}

fn swept(kind: Kind, b: &Binding, reason: SweptReason) -> SweptBinding {
    let (role, resource) = match kind {
        Kind::Global => (&b.global_role_id, None),
        Kind::Cluster => (&b.role_template_id, nonempty(&b.cluster_id)),
        Kind::Project => (&b.role_template_id, nonempty(&b.project_id)),
    };
    SweptBinding {
        id: b.id.clone(),
        scope: kind.scope(),
        role_id: nonempty(role).unwrap_or_default().to_string(),
        resource_id: resource.unwrap_or("global").to_string(),
        subject: b.subject().to_string(),
        grant_id: b.grant_id().map(str::to_string),
        expires_at: match b.marked_expiry() {
            MarkedExpiry::At(t) => Some(t),
            _ => None,
        },
        reason,
    }
}
