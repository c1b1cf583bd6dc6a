//! Settling: a binding is granted once Rancher has applied it, not when the POST answers.
//!
//! What "applied" looks like depends on the kind and the version (`authz_types.go` at each tag):
//!
//! | binding | 2.8-2.10 | 2.11+ |
//! |---|---|---|
//! | GRB | exists | `summary: Completed`, written after the 201 by the management pass (an admin role's waits for the downstream pass too) |
//! | CRTB | exists | `summary: Completed`, written once both passes ran: `summaryLocal` (management) then `summaryRemote` (the cluster's agent); while the agent is away only `summaryLocal` |
//! | PRTB | exists | exists: PRTBs have no status on any version |
//!
//! Never `InProgress` on a binding (only GlobalRoles use it). A fresh CRTB or GRB without a
//! summary is "not yet", not "an old server". For a binding made by `userPrincipalId` the
//! controller also fills in `userId` (EnsureUser) later, on every kind and version.
//!
//! Whether a server writes status is learned per base URL: from any binding that carries a
//! status, else from `GET /v3/settings/server-version` (when a binding read back shows none, then
//! once per [`VERSION_TTL`]). On 2.11+ at least one `GET` of a new CRTB or GRB proves it
//! `Completed`; a new PRTB (by user or group) costs nothing more than its POST.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use super::Rancher;
use super::client::ApiError;
use super::grant::{Kind, Target};
use super::model::{Binding, Setting, nonempty};
use super::names::BindingSubject;
use crate::integrations::{IntegrationError, Resource};

/// How long what was learned about a server holds (an upgrade to 2.11 is picked up after it, or
/// at once by the first binding that shows a status).
const VERSION_TTL: Duration = Duration::from_secs(600);
/// The first minor version whose controllers write binding status.
const FIRST_WITH_STATUS: u32 = 11;

/// Whether the server at a base URL writes binding status, and when that was learned.
static WRITES_STATUS: LazyLock<Mutex<HashMap<String, (bool, Instant)>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Whether a Rancher version (`v2.11.3`, `2.10.1`, `v2.12.0-rc1`) writes binding status; `None`
/// when it cannot be read (`dev`, `master-head`).
pub(super) fn version_writes_status(version: &str) -> Option<bool> {
    let t = version.trim().trim_start_matches(['v', 'V']);
    let mut parts = t.split(['.', '-', '+']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some(major > 2 || (major == 2 && minor >= FIRST_WITH_STATUS))
}

impl Rancher {
    fn remember_writes_status(&self, writes: bool) {
        let mut map = WRITES_STATUS.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (_, at)| at.elapsed() < VERSION_TTL);
        map.insert(self.config.base_url.as_str().to_string(), (writes, Instant::now()));
    }

    /// A binding that carries a status proves the server writes it.
    pub(super) fn learn_status(&self, b: &Binding) {
        if b.summary().is_some() || b.summary_local().is_some() {
            self.remember_writes_status(true);
        }
    }

    /// What is remembered about the server writing binding status.
    fn known_writes_status(&self) -> Option<bool> {
        WRITES_STATUS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(self.config.base_url.as_str())
            .filter(|(_, at)| at.elapsed() < VERSION_TTL)
            .map(|(w, _)| *w)
    }

    /// Whether the server writes binding status (2.11+): remembered, else read from
    /// `GET /v3/settings/server-version`.
    async fn writes_status(&self) -> Result<bool, IntegrationError> {
        match self.known_writes_status() {
            Some(w) => Ok(w),
            None => self.read_writes_status().await,
        }
    }

    /// `GET /v3/settings/server-version`, remembered. An unreadable version (a development
    /// build, or a setting the key cannot read) is taken as one without status, with a warning: waiting for a status that never
    /// comes would fail every grant, while not waiting only reports a grant before it settled.
    async fn read_writes_status(&self) -> Result<bool, IntegrationError> {
        let url = self
            .client
            .url(&["v3", "settings", "server-version"], &[])
            .map_err(ApiError::into_error)?;
        let version = match self.client.get::<Setting>(url).await {
            Ok(setting) => setting.value.unwrap_or_default(),
            // Hidden by a proxy, or not readable by the key: unknown, as below.
            Err(e) if matches!(e.status(), Some(403 | 404)) => String::new(),
            Err(e) => return Err(e.into_error()),
        };
        let writes = match version_writes_status(&version) {
            Some(w) => w,
            None => {
                tracing::warn!(
                    version = %version,
                    "cannot read Rancher's server-version: bindings are taken as granted once they exist, without \
                     waiting for their status"
                );
                false
            }
        };
        self.remember_writes_status(writes);
        Ok(writes)
    }

    /// Waits (bounded by `status_timeout`) until the connector's binding `b` is in effect. A
    /// CRTB or GRB where the server writes status (2.11+): `status.summary` `Completed`. A PRTB:
    /// it exists (PRTBs have no status on any version). For a binding made by principal, also the
    /// `userId` Rancher's EnsureUser fills in. `created`: `b` is the 201's body, which never
    /// carries a status; otherwise it was read (GET, listing or PUT answer).
    ///
    /// # Errors
    /// `Unavailable` (retryable) for an `Error` summary, with Rancher's messages; `InProgress`
    /// (retryable) when not settled by the deadline; the request's failure otherwise.
    pub(super) async fn settle(
        &self,
        target: &Target<'_>,
        mut b: Binding,
        created: bool,
    ) -> Result<Binding, IntegrationError> {
        let deadline = Instant::now() + self.config.status_timeout;
        // Rancher's controllers take a moment: reading at once would mostly cost a request.
        let mut delay = Duration::from_millis(250);
        let mut read = !created;
        let mut ever_status = false;
        let by_principal = matches!(target.subject, BindingSubject::UserPrincipal(_));
        // `ProjectRoleTemplateBinding` has no `status` in any version (`authz_types.go`; the
        // request for one, rancher/rancher#44661, was closed unimplemented): waiting for one
        // would fail every project grant.
        let has_status = target.kind != Kind::Project;
        loop {
            let pending = if has_status {
                self.learn_status(&b);
                ever_status |= b.summary().is_some() || b.summary_local().is_some();
                self.status_pending(target, &b, read).await?
            } else {
                None
            };
            let user_pending = by_principal && nonempty(&b.user_id).is_none();
            let pending = pending
                .or_else(|| user_pending.then(|| "has no user yet (Rancher creates the principal's user)".to_string()));
            let Some(pending) = pending else {
                self.note_cluster(target.resource);
                return Ok(b);
            };
            // One read after the 201 is always made, whatever the deadline.
            if read && Instant::now() + delay > deadline {
                // Never a status on a server remembered as writing one: the memory (per base
                // URL) may be stale; ask the server itself before failing.
                let status_expected = ever_status || user_pending || self.read_writes_status().await?;
                if !status_expected {
                    self.note_cluster(target.resource);
                    return Ok(b);
                }
                return Err(IntegrationError::InProgress {
                    message: format!(
                        "binding {} ({}) {pending} after {}s; the grant will be checked again",
                        b.id,
                        target.describe(),
                        self.config.status_timeout.as_secs()
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
            read = true;
            let url = self
                .client
                .url(&["v3", target.kind.collection(), &b.id], &[])
                .map_err(ApiError::into_error)?;
            b = match self.client.get::<Binding>(url).await {
                Ok(b) => b,
                Err(e) if e.status() == Some(404) => {
                    return Err(IntegrationError::Unavailable {
                        message: format!(
                            "binding {} ({}) disappeared while Rancher applied it; try again",
                            b.id,
                            target.describe()
                        ),
                    });
                }
                Err(e) => return Err(e.into_error()),
            };
        }
    }

    /// What a CRTB or GRB still waits for, by its status (`None`: nothing). `read`: `b` was read
    /// back, not the 201's body.
    ///
    /// A CRTB's `summary` is absent until both of Rancher's passes ran: the management one
    /// (`summaryLocal`, `pkg/controllers/management/auth/crtb_handler.go`) and the downstream
    /// cluster's (`summaryRemote`, `pkg/controllers/managementuser/rbac/crtb_handler.go`); it is
    /// never `InProgress`. `summaryLocal` alone is what a cluster whose agent is down shows.
    async fn status_pending(
        &self,
        target: &Target<'_>,
        b: &Binding,
        read: bool,
    ) -> Result<Option<String>, IntegrationError> {
        const NO_STATUS: &str = "has no status yet: Rancher is still applying it";
        Ok(match b.summary() {
            Some(s) if s.eq_ignore_ascii_case("error") => return Err(status_error(target, b)),
            Some(s) if s.eq_ignore_ascii_case("completed") => None,
            Some(s) => Some(format!("is still {s} in Rancher")),
            None if b.summary_local().is_some_and(|l| l.eq_ignore_ascii_case("completed")) => {
                Some(match target.resource {
                    Resource::Cluster(c) => format!(
                        "is applied in Rancher, not yet on cluster {c} (its agent may be disconnected: check the \
                         cluster's state in Rancher)"
                    ),
                    _ => "is applied in Rancher, not yet on the downstream clusters".to_string(),
                })
            }
            // The 201 never has the status the controllers write later: read the binding
            // (which shows whether this server writes one) unless it is known not to.
            None if !read => (self.known_writes_status() != Some(false)).then(|| NO_STATUS.to_string()),
            // On 2.11+ the status comes later: not yet.
            None if self.writes_status().await? => Some(NO_STATUS.to_string()),
            None => None,
        })
    }
}

/// An `Error` summary: retryable (Rancher's controllers retry too), with Rancher's messages.
fn status_error(target: &Target<'_>, b: &Binding) -> IntegrationError {
    let messages = b.status.as_ref().map(|s| s.messages()).unwrap_or_default();
    let why = if messages.is_empty() {
        "no reason given".to_string()
    } else {
        messages.join("; ")
    };
    IntegrationError::Unavailable {
        message: format!(
            "Rancher created binding {} ({}) but reports an error applying it: {why}",
            b.id,
            target.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::version_writes_status;

    #[test]
    fn versions_from_2_11_write_binding_status() {
        for (v, writes) in [
            ("v2.11.0", Some(true)),
            ("v2.14.1", Some(true)),
            ("2.12.0-rc1", Some(true)),
            ("v2.10.3", Some(false)),
            ("v2.8.0", Some(false)),
            ("v3.0.0", Some(true)),
            ("dev", None),
            ("master-head", None),
            ("", None),
        ] {
            assert_eq!(version_writes_status(v), writes, "{v}");
        }
    }
}
