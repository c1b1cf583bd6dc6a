//! The Rancher integration: grants and revokes access through Rancher's v3 (Norman) API.
//!
//! # Layout
//! - [`config`]: the integration's settings (pure validation) and the API key.
//! - [`client`]: HTTP, authentication, retries, error mapping, pagination with its loop guard.
//! - [`model`]: the v3 objects as they come over the wire.
//! - [`names`]: deterministic binding names, external user ids, generated passwords.
//! - `validate`, `discover`, `grant`, `revoke`, `reconcile` (the `sweep` operation), `users` (create, rotate, delete,
//!   enable/disable): the operations, one file each; `admin`: the admin proof they rely on;
//!   `settle`: waiting for a new binding to be applied (2.11+ status, EnsureUser's `userId`).
//!
//! Facts about the API and their sources: `rancher-api-notes.md`; what each call costs and what
//! each error means for an operator: `docs/rancher.md`.
//!
//! **Architecture invariant:** only this module speaks HTTP to Rancher, and the API key never
//! leaves [`client::Client`]'s sensitive header: not in `Debug`, errors, logs or results.

mod admin;
pub mod budget;
pub mod client;
pub mod config;
mod discover;
mod grant;
pub mod model;
pub mod names;
mod project_ns;
mod reconcile;
mod revoke;
mod settle;
mod users;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::*;
use crate::secrets::Secret;
pub use client::{Client, RetryPolicy};
pub use config::{ApiKey, NewUserRoles, RancherConfig};

pub const TYPE: &str = "rancher";

/// A Rancher integration bound to one server and one API key, built per job on the shared
/// HTTP client of its endpoint.
pub struct Rancher {
    config: RancherConfig,
    key: ApiKey,
    client: Client,
}

impl fmt::Debug for Rancher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rancher")
            .field("base_url", &self.config.base_url.as_str())
            .field("key", &self.key)
            .finish()
    }
}

impl Rancher {
    /// Builds the integration from its spec and resolved secret. No network.
    ///
    /// # Errors
    /// `Config` for an invalid config, a secret without the expected keys, or an unusable CA.
    pub fn new(spec: &IntegrationSpec, secret: &Secret) -> Result<Rancher, IntegrationError> {
        let config = RancherConfig::from_value(&spec.config)?;
        let key = ApiKey::from_secret(secret)?;
        Rancher::from_parts(config, key)
    }

    /// Builds the integration from a parsed config and key.
    ///
    /// # Errors
    /// `Config` for an unusable CA.
    pub fn from_parts(config: RancherConfig, key: ApiKey) -> Result<Rancher, IntegrationError> {
        let client = Client::new(&config, &key)?;
        Ok(Rancher { config, key, client })
    }

    /// Overrides the retry policy for transient failures (tests use short delays).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Rancher {
        self.client = self.client.with_retry(retry);
        self
    }

    /// Shares the agent's worker slots (see [`Client::with_workers`]).
    pub fn with_workers(mut self, workers: Option<std::sync::Arc<tokio::sync::Semaphore>>) -> Rancher {
        self.client = self.client.with_workers(workers);
        self
    }

    /// The HTTP client (for request counts).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Rancher {
    /// A key refused in the middle of an operation (its admin proof was cached, so the first
    /// request was not the probed `?me=true`): the proof is forgotten and the refusal explained
    /// the way `key_owner` explains it (expired, disabled, scoped to a cluster it names). One
    /// request, on a refusal only.
    async fn explained<T>(&self, outcome: Result<T, IntegrationError>) -> Result<T, IntegrationError> {
        match outcome {
            Err(refused @ IntegrationError::CredentialsRefused { .. }) => {
                self.forget_proof();
                match self.key_owner().await {
                    Err(explained @ IntegrationError::CredentialsRefused { .. }) => Err(explained),
                    _ => Err(refused),
                }
            }
            other => other,
        }
    }
}

#[async_trait]
impl Integration for Rancher {
    async fn validate(&self) -> Result<ValidateResult, IntegrationError> {
        self.validate_key().await
    }

    async fn discover(&self, sink: mpsc::Sender<DiscoveredObject>) -> Result<DiscoverySummary, IntegrationError> {
        self.discover_all(sink).await
    }

    async fn grant(&self, request: &GrantRequest) -> Result<GrantResult, IntegrationError> {
        self.explained(self.grant_access(request).await).await
    }

    async fn revoke(&self, request: &RevokeRequest) -> Result<RevokeResult, IntegrationError> {
        self.explained(self.revoke_access(request).await).await
    }

    async fn rotate_credentials(&self, request: &RotateRequest) -> Result<GrantResult, IntegrationError> {
        self.rotate_password(request).await
    }

    async fn delete_user(&self, request: &DeleteUserRequest) -> Result<DeleteUserResult, IntegrationError> {
        self.delete_agent_user(request).await
    }

    async fn sweep(&self, request: &SweepRequest) -> Result<SweepResult, IntegrationError> {
        self.explained(self.reconcile(request).await).await
    }
}
