//! Secret stores: where an integration's credentials come from.
//!
//! **Architecture invariant:** a secret value lives in a `SecretString` from the moment it is read
//! until the integration puts it in an HTTP header. `Debug`, `Display`, errors, logs and metrics
//! name the store and the reference, never the value.
//!
//! One file per store behind the `SecretStore` trait; `SecretStores` picks the store by the
//! reference's `type`. This build ships the `APONO` inline store; the others are parsed (so a
//! config that names them is understood) and answer `Unsupported` until their store lands.

mod apono;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub use apono::AponoStore;

/// A resolved secret: string keys to secret values. `Debug` shows the keys only.
#[derive(Clone, Default)]
pub struct Secret(BTreeMap<String, SecretString>);

impl Secret {
    pub fn new(values: BTreeMap<String, SecretString>) -> Secret {
        Secret(values)
    }

    pub fn get(&self, key: &str) -> Option<&SecretString> {
        self.0.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Credentials given inline (the `APONO` store). Serializable because the control plane must hand
/// them to the agent inside the job; `Debug` is redacted.
#[derive(Clone, Default, Deserialize)]
pub struct InlineCredentials(pub BTreeMap<String, SecretString>);

impl Serialize for InlineCredentials {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v.expose_secret())))
    }
}

impl fmt::Debug for InlineCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineCredentials")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Where a secret lives. Field names are Apono's (DESIGN.md §5).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecretRef {
    Apono { credentials: InlineCredentials },
    Kubernetes { namespace: String, name: String },
    Aws { region: String, secret_id: String },
    Azure { vault_url: String, name: String },
    Gcp { project: String, secret_id: String },
    HashicorpVault { secret_engine: String, path: String },
}

impl SecretRef {
    /// The store's type as written in configs: `APONO`, `AWS`, ...
    pub fn store_type(&self) -> &'static str {
        match self {
            SecretRef::Apono { .. } => "APONO",
            SecretRef::Kubernetes { .. } => "KUBERNETES",
            SecretRef::Aws { .. } => "AWS",
            SecretRef::Azure { .. } => "AZURE",
            SecretRef::Gcp { .. } => "GCP",
            SecretRef::HashicorpVault { .. } => "HASHICORP_VAULT",
        }
    }

    /// A printable name for the reference (never the value): `AWS eu-west-1/rancher-key`.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Apono { .. } => "APONO (inline credentials)".to_string(),
            SecretRef::Kubernetes { namespace, name } => format!("KUBERNETES {namespace}/{name}"),
            SecretRef::Aws { region, secret_id } => format!("AWS {region}/{secret_id}"),
            SecretRef::Azure { vault_url, name } => format!("AZURE {vault_url} {name}"),
            SecretRef::Gcp { project, secret_id } => format!("GCP {project}/{secret_id}"),
            SecretRef::HashicorpVault { secret_engine, path } => format!("HASHICORP_VAULT {secret_engine}/{path}"),
        }
    }
}

/// Why a secret could not be read. Messages name the reference and what to do; never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {reference} not found: {hint}")]
    NotFound { reference: String, hint: String },
    #[error("not permitted to read secret {reference}: {hint}")]
    NotPermitted { reference: String, hint: String },
    #[error("secret {reference} is not marked for the connector: {hint}")]
    NotMarked { reference: String, hint: String },
    #[error("secret store unreachable for {reference}: {hint}")]
    Unreachable { reference: String, hint: String },
    #[error("secret {reference} has a malformed value: {hint}")]
    Malformed { reference: String, hint: String },
    #[error("secret store {store} is not supported by this build of the agent")]
    Unsupported { store: String },
}

impl SecretError {
    pub fn code(&self) -> &'static str {
        match self {
            SecretError::NotFound { .. } => "secret_not_found",
            SecretError::NotPermitted { .. } => "secret_not_permitted",
            SecretError::NotMarked { .. } => "secret_not_marked",
            SecretError::Unreachable { .. } => "secret_store_unreachable",
            SecretError::Malformed { .. } => "secret_malformed",
            SecretError::Unsupported { .. } => "secret_store_unsupported",
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self, SecretError::Unreachable { .. })
    }
}

/// One kind of secret store.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The `type` this store serves (`APONO`, `AWS`, ...).
    fn store_type(&self) -> &'static str;
    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError>;
}

/// The stores of this build, chosen by a reference's type.
#[derive(Clone)]
pub struct SecretStores {
    stores: Vec<Arc<dyn SecretStore>>,
}

impl Default for SecretStores {
    fn default() -> Self {
        SecretStores {
            stores: vec![Arc::new(AponoStore)],
        }
    }
}

impl SecretStores {
    /// Store types this build can read (sent as capabilities in the session hello).
    pub fn types(&self) -> Vec<String> {
        self.stores.iter().map(|s| s.store_type().to_string()).collect()
    }

    /// # Errors
    /// The store's own error, or `Unsupported` when no store of this build serves the type.
    pub async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let wanted = reference.store_type();
        match self.stores.iter().find(|s| s.store_type() == wanted) {
            Some(store) => store.fetch(reference).await,
            None => Err(SecretError::Unsupported {
                store: wanted.to_string(),
            }),
        }
    }

    /// Forgets anything cached for `reference` (after the integration refused its credentials).
    pub fn invalidate(&self, _reference: &SecretRef) {
        // No store caches yet; the TTL cache lands with the remote stores.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_ref_parses_and_debug_hides_values() {
        let r: SecretRef = serde_json::from_value(serde_json::json!({
            "type": "APONO", "credentials": {"access_key": "token-abc", "secret_key": "canary-secret-9"}
        }))
        .unwrap();
        assert_eq!(r.store_type(), "APONO");
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("canary-secret-9"), "{dbg}");
        assert!(dbg.contains("secret_key"));
        // The control plane must be able to hand the credentials to the agent.
        assert!(serde_json::to_string(&r).unwrap().contains("canary-secret-9"));
    }

    #[test]
    fn other_store_refs_parse_with_apono_field_names() {
        for (v, t) in [
            (
                serde_json::json!({"type": "AWS", "region": "eu-west-1", "secret_id": "k"}),
                "AWS",
            ),
            (
                serde_json::json!({"type": "KUBERNETES", "namespace": "ns", "name": "k"}),
                "KUBERNETES",
            ),
            (
                serde_json::json!({"type": "AZURE", "vault_url": "https://v", "name": "k"}),
                "AZURE",
            ),
            (
                serde_json::json!({"type": "GCP", "project": "p", "secret_id": "k"}),
                "GCP",
            ),
            (
                serde_json::json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "k"}),
                "HASHICORP_VAULT",
            ),
        ] {
            let r: SecretRef = serde_json::from_value(v).unwrap();
            assert_eq!(r.store_type(), t);
        }
    }

    #[tokio::test]
    async fn unsupported_store_is_a_clear_error() {
        let r: SecretRef =
            serde_json::from_value(serde_json::json!({"type": "GCP", "project": "p", "secret_id": "k"})).unwrap();
        let e = SecretStores::default().fetch(&r).await.unwrap_err();
        assert_eq!(e.code(), "secret_store_unsupported");
        assert!(e.to_string().contains("GCP"));
    }
}
