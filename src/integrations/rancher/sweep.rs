//! The sweep: removes the connector's own bindings whose marked expiry has passed and that no
//! access still holds, so access ends even when the control plane's state is lost.
//!
//! A binding is swept iff it carries the connector's label, a readable `apono.io/expires-at` in
//! the past, is not being removed, and is not in `keep_binding_ids`. One without an expiry (the
//! login bindings of created users, grants without a TTL) is never swept; an unreadable expiry is
//! logged and left. Labels cannot be filtered on v3 collections, so the three binding collections
//! are read in full (paged) after the admin proof: one failed delete does not stop the others.
//! Each expired binding is read again right before its delete (one `GET`), so a grant that moved
//! its expiry later in the meantime keeps it; what is left is the moment between that `GET` and
//! the `DELETE` (v3 has no conditional delete).

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::Rancher;
use super::client::ApiError;
use super::grant::Kind;
use super::model::{Binding, nonempty};
use super::names::MarkedExpiry;
use crate::integrations::{IntegrationError, SweepRequest, SweepResult, SweptBinding, SweptReason};

impl Rancher {
    pub(super) async fn sweep_expired(&self, request: &SweepRequest) -> Result<SweepResult, IntegrationError> {
        self.ensure_admin().await?;
        let now = Utc::now();
        let keep: HashSet<&str> = request.keep_binding_ids.iter().map(String::as_str).collect();
        let mut result = SweepResult {
            dry_run: request.dry_run,
            ..SweepResult::default()
        };
        let mut failed = Vec::new();
        for kind in [Kind::Global, Kind::Cluster, Kind::Project] {
            // Listed in full before any delete: a delete between pages can restart the paging.
            let mut expired = Vec::new();
            let mut pager =
                self.client
                    .list::<Binding>(&["v3", kind.collection()], &[], format!("{} bindings", kind.noun()));
            while let Some(page) = pager.next_page().await? {
                for b in page.into_iter().filter(Binding::is_connectors) {
                    result.marked += 1;
                    if b.is_removed() {
                        continue;
                    }
                    match b.marked_expiry() {
                        MarkedExpiry::At(t) if t <= now => expired.push(swept(kind, &b, t)),
                        MarkedExpiry::At(_) | MarkedExpiry::None => {}
                        MarkedExpiry::Unreadable(value) => tracing::warn!(
                            binding = %b.id, value,
                            "the connector's binding has an unreadable apono.io/expires-at; the sweep leaves it"
                        ),
                    }
                }
            }
            for s in expired {
                if keep.contains(s.id.as_str()) {
                    result.kept_binding_ids.push(s.id);
                    continue;
                }
                if !request.dry_run {
                    match self.still_expired(kind, &s.id, now).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            failed.push(format!("{} ({e})", s.id));
                            continue;
                        }
                    }
                    if let Err(e) = self.delete_confirmed(kind, &s.id).await {
                        tracing::warn!(binding = %s.id, error = %e, "sweep: could not remove an expired binding");
                        failed.push(format!("{} ({e})", s.id));
                        continue;
                    }
                    tracing::info!(
                        binding = %s.id, role = %s.role_id, resource = %s.resource_id, subject = %s.subject,
                        grant = s.grant_id.as_deref().unwrap_or(""), expires_at = ?s.expires_at,
                        "sweep: removed the connector's expired binding"
                    );
                }
                result.removed.push(s);
            }
        }
        if !failed.is_empty() {
            return Err(IntegrationError::Unavailable {
                message: format!(
                    "the sweep removed {} expired binding(s) but could not remove {}: {}; the next sweep tries again",
                    result.removed.len(),
                    failed.len(),
                    failed.join("; ")
                ),
            });
        }
        Ok(result)
    }
}

impl Rancher {
    /// Reads an expired binding again just before its delete: a grant that started after the
    /// listing may have found it and moved its expiry later (a new access on the same subject,
    /// role and resource, e.g. right after a restart that lost the control plane's state).
    /// False when it is gone or no longer expired.
    async fn still_expired(&self, kind: Kind, id: &str, now: DateTime<Utc>) -> Result<bool, IntegrationError> {
        let url = self
            .client
            .url(&["v3", kind.collection(), id], &[])
            .map_err(ApiError::into_error)?;
        match self.client.get::<Binding>(url).await {
            Ok(b) => Ok(!b.is_removed() && matches!(b.marked_expiry(), MarkedExpiry::At(t) if t <= now)),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e.into_error()),
        }
    }
}

fn swept(kind: Kind, b: &Binding, expires_at: DateTime<Utc>) -> SweptBinding {
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
        expires_at: Some(expires_at),
        reason: SweptReason::Expired,
    }
}
