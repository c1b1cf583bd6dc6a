//! Validate: the key works, has no scope, is not about to expire, and belongs to an admin.
//!
//! `GET /v3/users?me=true` (whose key), the key's token (scope and expiry: `GET /v3/tokens/{name}`,
//! or `GET /v1/ext.cattle.io.tokens/{name}` for a 2.12+ `ext/` key) and
//! `GET /v3/settings/server-version` (optional, for the details), run concurrently, then the admin
//! proof (`GET /v3/globalrolebindings?userId=<me>&globalRoleId=admin`, see `admin`): 4 requests.
//!
//! A 401 never says why (`pkg/auth/requests/filter.go` always writes "must authenticate"), and a
//! cluster-scoped key is refused on every path outside its cluster, its own token included. So a
//! refused key is probed: a key that works on `GET /v3/clusters/{id}` is scoped to that cluster.
//! The cluster list is not readable with such a key, so only ids known up front can be probed:
//! `local`, the operation's own cluster, and the clusters earlier operations of this process
//! named on the same Rancher ([`Rancher::probe_clusters`]); otherwise the message lists the
//! scope among the causes.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::Rancher;
use super::admin::owner_of;
use super::client::ApiError;
use super::model::{Collection, Setting, Token, User, nonempty};
use crate::integrations::{IntegrationError, Resource, ValidateResult};

/// Warn when the key expires within this many days.
pub(super) const EXPIRY_WARNING_DAYS: i64 = 14;

impl Rancher {
    pub(super) async fn validate_key(&self) -> Result<ValidateResult, IntegrationError> {
        let me_url = self
            .client
            .url(&["v3", "users"], &[("me", "true")])
            .map_err(ApiError::into_error)?;
        let version_url = self
            .client
            .url(&["v3", "settings", "server-version"], &[])
            .map_err(ApiError::into_error)?;
        let (me, token, version) = tokio::join!(
            self.client.get::<Collection<User>>(me_url),
            self.own_token(),
            self.client.get::<Setting>(version_url),
        );
        let me = match me {
            Ok(me) => me,
            Err(e) => return Err(self.explain_refusal(e, &self.probe_clusters(None)).await),
        };
        let user = owner_of(me)?;
        let principal = user.username().map(str::to_string).unwrap_or_else(|| user.id.clone());
        let mut result = ValidateResult {
            principal,
            ..ValidateResult::default()
        };
        result.details.insert("user_id".into(), Value::from(user.id.clone()));
        if !user.name.is_empty() {
            result
                .details
                .insert("user_display_name".into(), Value::from(user.name.clone()));
        }
        result
            .details
            .insert("rancher_url".into(), Value::from(self.client.base_url().as_str()));
        if let Ok(Setting { value: Some(v) }) = &version
            && !v.is_empty()
        {
            result.details.insert("rancher_version".into(), Value::from(v.clone()));
        }

        match token {
            Ok(token) => self.check_token(&token, &mut result, Utc::now())?,
            Err(e) if matches!(e.status(), Some(403 | 404)) => {
                // A key may lack read access to its own token (or an `ext/` key meet a server
                // without the ext API). Neither stops the key from working.
                result.warnings.push(format!(
                    "could not read the API key's own token ({}): its scope and expiry are not checked",
                    e.summary()
                ));
            }
            Err(e) => return Err(self.explain_refusal(e, &self.probe_clusters(None)).await),
        }
        // Last: a key that fails the checks above is better told about those first.
        self.prove_admin(&user.id).await?;
        result
            .details
            .insert("request_count".into(), Value::from(self.client.requests()));
        Ok(result)
    }

    /// The key's token: a v3 token, or for an `ext/` key (2.12+) its ext token read as one.
    async fn own_token(&self) -> Result<Token, ApiError> {
        let name = self.key.token_name();
        if self.key.is_ext() {
            let url = self.client.url(&["v1", "ext.cattle.io.tokens", name], &[])?;
            self.client.get::<ExtToken>(url).await.map(|t| t.into_token(name))
        } else {
            let url = self.client.url(&["v3", "tokens", name], &[])?;
            self.client.get::<Token>(url).await
        }
    }

    /// Turns a failed request into the error to report. A 401 is probed for a cluster scope:
    /// `GET /v3/clusters/{id}` for `local` and each of `clusters` (ids the caller knows, see
    /// [`Rancher::probe_clusters`]), at most [`MAX_SCOPE_PROBES`] requests, stopping at the first
    /// the key gets past authentication on. Other failures map as usual.
    pub(super) async fn explain_refusal(&self, e: ApiError, clusters: &[String]) -> IntegrationError {
        if e.status() != Some(401) {
            return e.into_error();
        }
        let mut candidates = vec!["local"];
        for c in clusters {
            if !c.is_empty() && !candidates.contains(&c.as_str()) {
                candidates.push(c);
            }
        }
        for cluster in candidates.into_iter().take(MAX_SCOPE_PROBES) {
            // A cluster id that is not an id cannot be probed (and names no cluster).
            let Ok(url) = self.client.url(&["v3", "clusters", cluster], &[]) else {
                continue;
            };
            let authenticated = match self.client.get::<Value>(url).await {
                Ok(_) => true,
                // Any status but 401 means the authenticator let the key through here.
                Err(probe) => probe.status().is_some_and(|s| s != 401),
            };
            if authenticated {
                return IntegrationError::CredentialsRefused {
                    message: format!(
                        "the API key {} is scoped to cluster {cluster}: Rancher refuses it (HTTP 401 on {} {}) \
                         everywhere outside that cluster; create an API key with no scope from an admin user and \
                         update the secret",
                        self.key.token_name(),
                        e.method,
                        e.path
                    ),
                };
            }
        }
        e.into_error()
    }

    /// Scope and expiry of the key's token.
    pub(super) fn check_token(
        &self,
        token: &Token,
        result: &mut ValidateResult,
        now: DateTime<Utc>,
    ) -> Result<(), IntegrationError> {
        let name = self.key.token_name();
        result.details.insert("token_id".into(), Value::from(name));
        // A scoped key cannot read its own token (401 outside its cluster): kept for a server
        // that lets it, at no cost.
        if let Some(cluster) = nonempty(&token.cluster_id) {
            return Err(IntegrationError::Invalid {
                message: format!(
                    "the API key {name} is scoped to cluster {cluster}: the integration needs a key with no scope \
                     (a scoped key is refused on every path outside that cluster); create a no-scope API key from \
                     an admin user and update the secret"
                ),
            });
        }
        result.details.insert("scope".into(), Value::from("none"));
        if token.enabled == Some(false) {
            return Err(IntegrationError::CredentialsRefused {
                message: format!(
                    "the API key {name} is disabled in Rancher (401 on use); create a new no-scope API key"
                ),
            });
        }
        let expires_at = nonempty(&token.expires_at).and_then(|s| DateTime::parse_from_rfc3339(s).ok());
        if token.expired == Some(true) || expires_at.is_some_and(|t| t <= now) {
            return Err(IntegrationError::CredentialsRefused {
                message: format!(
                    "the API key {name} has expired (Rancher answers 401 to it); create a new no-scope API key and \
                     update the secret"
                ),
            });
        }
        match expires_at {
            Some(t) => {
                let t = t.with_timezone(&Utc);
                let days = (t - now).num_days();
                result.details.insert("expires_at".into(), Value::from(t.to_rfc3339()));
                result.details.insert("expires_in_days".into(), Value::from(days));
                if days < EXPIRY_WARNING_DAYS {
                    result.warnings.push(format!(
                        "the API key {name} expires in {days} day(s), at {}: create a new no-scope API key before \
                         then and update the secret, or the integration stops working",
                        t.to_rfc3339()
                    ));
                }
            }
            None => {
                result.details.insert("expires_at".into(), Value::Null);
            }
        }
        Ok(())
    }
}

/// Clusters probed at most for a refused key's scope.
const MAX_SCOPE_PROBES: usize = 4;
/// Cluster ids remembered per Rancher for those probes.
const SEEN_CLUSTERS_KEPT: usize = 8;

/// The clusters this process's operations were about, per Rancher (base URL), newest first. A
/// cluster-scoped key cannot list clusters (every path outside its cluster is 401,
/// `pkg/clusterrouter`), so a refused key can only be probed with ids known beforehand: the
/// operation's own, and those of earlier operations on the same Rancher.
static SEEN_CLUSTERS: LazyLock<Mutex<HashMap<String, VecDeque<String>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

impl Rancher {
    /// Remembers the cluster an operation is about (a cluster, or a project's cluster), for the
    /// scope probe of a later 401. Callers note it before their first request.
    pub(super) fn note_cluster(&self, resource: &Resource) {
        let cluster = match resource {
            Resource::Global => return,
            Resource::Cluster(c) => c.as_str(),
            Resource::Project(p) => p.split_once(':').map_or(p.as_str(), |(c, _)| c),
        };
        if cluster.is_empty() {
            return;
        }
        let mut map = SEEN_CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        let seen = map.entry(self.config.base_url.as_str().to_string()).or_default();
        seen.retain(|c| c != cluster);
        seen.push_front(cluster.to_string());
        seen.truncate(SEEN_CLUSTERS_KEPT);
    }

    /// The clusters to probe a 401 with: `resource`'s cluster (noted, so later probes know it
    /// too), then those of earlier operations on this Rancher, newest first.
    pub(super) fn probe_clusters(&self, resource: Option<&Resource>) -> Vec<String> {
        if let Some(r) = resource {
            self.note_cluster(r);
        }
        SEEN_CLUSTERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(self.config.base_url.as_str())
            .map(|seen| seen.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A 2.12+ ext token as `/v1/ext.cattle.io.tokens/{name}` serves it (rancher
/// `pkg/apis/ext.cattle.io/v1/types.go`: `spec.clusterName`, `spec.enabled`, `status.expired`,
/// `status.expiresAt`, empty when it never expires).
#[derive(Debug, Default, Deserialize)]
struct ExtToken {
    #[serde(default)]
    spec: ExtTokenSpec,
    #[serde(default)]
    status: ExtTokenStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtTokenSpec {
    #[serde(default, rename = "userID")]
    user_id: Option<String>,
    #[serde(default)]
    cluster_name: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtTokenStatus {
    #[serde(default)]
    expired: Option<bool>,
    #[serde(default)]
    expires_at: Option<String>,
}

impl ExtToken {
    fn into_token(self, name: &str) -> Token {
        Token {
            id: name.to_string(),
            user_id: self.spec.user_id,
            cluster_id: self.spec.cluster_name,
            expires_at: self.status.expires_at,
            expired: self.status.expired,
            enabled: self.spec.enabled,
            ..Token::default()
        }
    }
}
