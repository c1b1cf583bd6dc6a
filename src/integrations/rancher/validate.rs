//! Validate: the key works, has no scope, is not about to expire, and belongs to an admin.
//!
//! `GET /v3/users?me=true` (whose key), `GET /v3/tokens/{accessKey}` (scope and expiry) and
//! `GET /v3/settings/server-version` (optional, for the details), run concurrently, then the admin
//! proof (`GET /v3/globalrolebindings?userId=<me>&globalRoleId=admin`, see `admin`): 4 requests.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Rancher;
use super::admin::owner_of;
use super::client::ApiError;
use super::model::{Collection, Setting, Token, User, nonempty};
use crate::integrations::{IntegrationError, ValidateResult};

/// Warn when the key expires within this many days.
pub(super) const EXPIRY_WARNING_DAYS: i64 = 14;

impl Rancher {
    pub(super) async fn validate_key(&self) -> Result<ValidateResult, IntegrationError> {
        let me_url = self.client.url(&["v3", "users"], &[("me", "true")]);
        let token_url = self.client.url(&["v3", "tokens", self.key.token_name()], &[]);
        let version_url = self.client.url(&["v3", "settings", "server-version"], &[]);
        let (me, token, version) = tokio::join!(
            self.client.get::<Collection<User>>(me_url),
            self.client.get::<Token>(token_url),
            self.client.get::<Setting>(version_url),
        );
        let user = owner_of(me.map_err(scoped_or_refused)?)?;
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
                // 2.12+ `ext/` tokens are not v3 tokens; a key may also lack read access to its
                // own token. Neither stops the key from working.
                result.warnings.push(format!(
                    "could not read the API key's own token ({}): its scope and expiry are not checked",
                    e.summary()
                ));
            }
            Err(e) => return Err(scoped_or_refused(e)),
        }
        // Last: a key that fails the checks above is better told about those first.
        self.prove_admin(&user.id).await?;
        result
            .details
            .insert("request_count".into(), Value::from(self.client.requests()));
        Ok(result)
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

/// A scoped key gets 401 "clusterID does not match" outside its cluster: say so plainly.
fn scoped_or_refused(e: ApiError) -> IntegrationError {
    if e.status() == Some(401) && e.message().contains("clusterID does not match") {
        return IntegrationError::Invalid {
            message: format!(
                "the API key is scoped to a cluster (Rancher answered 401 on {} {}: clusterID does not match): the \
                 integration needs a key with no scope; create a no-scope API key from an admin user and update the \
                 secret",
                e.method, e.path
            ),
        };
    }
    e.into_error()
}
