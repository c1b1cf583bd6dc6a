//! What the stores are told at start-up: the `[secrets]` section of the configuration.
//!
//! Owned here, not in `config`, so the stores depend on nothing above them: `config` composes this
//! type as `Config.secrets` and decides where each value comes from (file key, environment
//! variable); the checks of what a value means live beside the stores that use it. Messages name
//! both the key and its variable, so a user finds the setting whichever way they set it.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The secrets section. `Debug` is derived: the only credential it may hold, the Vault
/// definitions, is a `SecretString`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSettings {
    /// `ALLOWED_SECRETS_TO_READ` (comma-separated): when set, only these Kubernetes secrets may be
    /// read. An entry is `namespace/name` (that secret only) or a bare `name` (that name in any
    /// namespace, as Apono's connector reads it; the Helm chart grants it in the release
    /// namespace only). See [`AllowedSecret`].
    pub allowed_secrets_to_read: Vec<String>,
    /// `HASHICORP_VAULT_CONFIG`: a JSON list of Vault definitions. A `SecretString` because the
    /// definitions carry tokens.
    #[serde(skip_serializing)]
    pub hashicorp_vault_config: Option<SecretString>,
    /// `HASHICORP_VAULT_CONFIG_FILE_PATH`: the same list in a file (a mounted secret), re-read when
    /// it changes.
    pub hashicorp_vault_config_file_path: Option<PathBuf>,
    /// `VAULT_NAMESPACE`: the Vault Enterprise / HCP namespace for a definition that names none
    /// (as the `vault` CLI does; HCP Vault's is `admin`).
    pub vault_namespace: Option<String>,
    /// `APONO_SECRET_CACHE_TTL_SECONDS`: how long a fetched secret is reused. Short, because a
    /// rotation should be seen soon even when no integration refuses the old key; 0 disables it.
    pub cache_ttl_seconds: u64,
    /// `APONO_REQUIRE_READ_MARK` (comma-separated store types, `AZURE` and/or `GCP`): also require
    /// the mark `apono-connector-read=true` there. Off by default because Apono's own docs create
    /// those secrets unmarked and leave access to the cloud's IAM; Kubernetes and AWS always
    /// require it.
    pub require_read_mark: Vec<String>,
}

impl Default for SecretsSettings {
    fn default() -> Self {
        SecretsSettings {
            allowed_secrets_to_read: Vec::new(),
            hashicorp_vault_config: None,
            hashicorp_vault_config_file_path: None,
            vault_namespace: None,
            cache_ttl_seconds: super::DEFAULT_CACHE_TTL.as_secs(),
            require_read_mark: Vec::new(),
        }
    }
}

/// The stores whose read mark is opt-in (`secrets.require_read_mark`).
pub const OPTIONAL_READ_MARK_STORES: &[&str] = &["AZURE", "GCP"];

/// Secrets settings that cannot be used. The message names the key and its environment variable
/// (`secrets.allowed_secrets_to_read (ALLOWED_SECRETS_TO_READ): ...`) and what to change; never a
/// value that may be a credential. Not retryable: the setting must be fixed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct SettingsError(pub String);

impl SecretsSettings {
    /// Pure checks (no file or network access), each problem naming the key, its variable and,
    /// for a list, the entry: the Vault definitions in `HASHICORP_VAULT_CONFIG`, the allow-list
    /// entries, the stores named in `require_read_mark`. (The file at
    /// `HASHICORP_VAULT_CONFIG_FILE_PATH` is read by `SecretStores::from_config`.)
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        #[cfg(feature = "store-vault")]
        if let Some(text) = &self.hashicorp_vault_config {
            use secrecy::ExposeSecret;
            if let Err(e) = super::VaultDefinitions::parse(text.expose_secret()) {
                problems.push(e.0);
            }
        }
        problems.extend(self.problems_besides_vault());
        problems
    }

    /// [`SecretsSettings::problems`] without the Vault definitions, for a caller that parses them
    /// anyway (parsing logs its warnings, such as a trailing comma, and once is enough).
    pub(super) fn problems_besides_vault(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in &self.allowed_secrets_to_read {
            if let Err(why) = AllowedSecret::parse(entry) {
                problems.push(format!(
                    "secrets.allowed_secrets_to_read (ALLOWED_SECRETS_TO_READ): entry {entry:?} {why}"
                ));
            }
        }
        for store in &self.require_read_mark {
            if !OPTIONAL_READ_MARK_STORES
                .iter()
                .any(|s| s.eq_ignore_ascii_case(store.trim()))
            {
                problems.push(format!(
                    "secrets.require_read_mark (APONO_REQUIRE_READ_MARK): {store:?} is not one of {OPTIONAL_READ_MARK_STORES:?} \
                     (Kubernetes and AWS always require the mark)"
                ));
            }
        }
        problems
    }

    /// Whether `store_type` (`AZURE`, `GCP`) must find the read mark on a secret before reading it.
    pub fn requires_read_mark(&self, store_type: &str) -> bool {
        self.require_read_mark
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case(store_type))
    }
}

/// One entry of `ALLOWED_SECRETS_TO_READ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedSecret {
    /// `name`: a secret of that name in any namespace. Apono's connector reads a bare name this
    /// way, so its lists keep working; the cluster's RBAC (the chart's Role in the release
    /// namespace) is what narrows it to one namespace.
    AnyNamespace(String),
    /// `namespace/name`: exactly that secret.
    InNamespace { namespace: String, name: String },
}

impl AllowedSecret {
    /// Parses an entry (surrounding spaces ignored).
    ///
    /// # Errors
    /// What is wrong with the entry's shape (an empty part, more than one `/`), as a phrase that
    /// follows the entry in a message.
    pub fn parse(entry: &str) -> Result<AllowedSecret, String> {
        let entry = entry.trim();
        let parts: Vec<&str> = entry.split('/').map(str::trim).collect();
        match parts.as_slice() {
            [name] if !name.is_empty() => Ok(AllowedSecret::AnyNamespace((*name).to_string())),
            [namespace, name] if !namespace.is_empty() && !name.is_empty() => Ok(AllowedSecret::InNamespace {
                namespace: (*namespace).to_string(),
                name: (*name).to_string(),
            }),
            [_] => Err("is empty: remove it, or write a secret's name".into()),
            [_, _] => Err("has an empty namespace or name: write `namespace/name`, or a bare `name`".into()),
            _ => Err("has more than one `/`: write `namespace/name`, or a bare `name`".into()),
        }
    }

    /// Whether this entry allows the secret `name` in `namespace`.
    pub fn allows(&self, namespace: &str, name: &str) -> bool {
        match self {
            AllowedSecret::AnyNamespace(allowed) => allowed == name,
            AllowedSecret::InNamespace {
                namespace: allowed_ns,
                name: allowed,
            } => allowed_ns == namespace && allowed == name,
        }
    }
}
