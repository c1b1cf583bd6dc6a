//! Secret stores: where an integration's credentials come from.
//!
//! **Architecture invariant:** a secret value lives in a `SecretString` from the moment the store
//! has read it until the integration puts it in an HTTP header. `Debug`, `Display`, errors, logs
//! and metrics name the store and the reference, never the value.
//!
//! Zeroisation, as far as it goes: `SecretString`s are zeroed when dropped, and so are the
//! buffers this crate owns on the way in (a store's answer text or bytes once parsed, the parsed
//! JSON of a Vault answer or definition, a token file). The HTTP clients' and SDKs' own buffers
//! (hyper, reqwest, the cloud SDKs' responses) are not: they are outside the connector's reach.
//!
//! # Layout
//! - this file: the types every store shares ([`Secret`], [`SecretRef`], [`SecretError`], the
//!   [`SecretStore`] trait) and the registry [`SecretStores`], which picks a store by the
//!   reference's `type` and adds what every store gets: a TTL cache with invalidation, one call for
//!   concurrent fetches of one reference (singleflight), and per-store metrics;
//! - one file per store, each behind its cargo feature (`store-kubernetes`, `store-aws`,
//!   `store-azure`, `store-gcp`, `store-vault`; all on by default). A build without a store answers
//!   [`SecretError::Unsupported`] for it;
//! - `settings.rs`: [`SecretsSettings`], what the stores are told at start-up (the `[secrets]`
//!   section, which `config` composes), and its checks; [`SettingsError`] when they fail;
//! - `value.rs`: turns what a store holds (JSON text, a key/value map) into a [`Secret`];
//! - `memory.rs`: an in-memory store for tests of other modules (always compiled: it has no
//!   dependencies and is never registered unless a caller asks for it).
//!
//! **Architecture invariant:** nothing here imports `crate::config` (or any module above it):
//! `config` composes [`SecretsSettings`], not the other way round (checked by
//! `tests::registry::secrets_never_import_config`).

mod apono;
mod cache;
mod memory;
mod metrics;
mod settings;
mod value;

#[cfg(feature = "store-aws")]
mod aws;
#[cfg(feature = "store-azure")]
mod azure;
#[cfg(feature = "store-gcp")]
mod gcp;
#[cfg(feature = "store-kubernetes")]
mod kubernetes;
#[cfg(feature = "store-vault")]
mod vault;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub use apono::AponoStore;
#[cfg(feature = "store-aws")]
pub use aws::AwsStore;
#[cfg(feature = "store-azure")]
pub use azure::AzureStore;
#[cfg(feature = "store-gcp")]
pub use gcp::GcpStore;
#[cfg(feature = "store-kubernetes")]
pub use kubernetes::KubernetesStore;
pub use memory::MemoryStore;
pub use metrics::StoreMetrics;
pub use settings::{AllowedSecret, OPTIONAL_READ_MARK_STORES, SecretsSettings, SettingsError};
#[cfg(feature = "store-vault")]
pub use vault::{VaultDefinitions, VaultStore};

/// The label (Kubernetes, GCP) or tag (AWS, Azure) that marks a secret as readable by the connector.
pub const READ_MARK_KEY: &str = "apono-connector-read";
/// The value [`READ_MARK_KEY`] must have.
pub const READ_MARK_VALUE: &str = "true";

/// A resolved secret: string keys to secret values. `Debug` shows the keys only.
#[derive(Clone, Default)]
pub struct Secret {
    values: BTreeMap<String, SecretString>,
    /// Which cached read this copy came from (0: not from the cache), so that a job whose
    /// credentials were refused drops that read only, not the one a sibling job has just made
    /// ([`SecretStores::invalidate_read`]).
    read: u64,
}

impl Secret {
    pub fn new(values: BTreeMap<String, SecretString>) -> Secret {
        Secret { values, read: 0 }
    }

    pub fn get(&self, key: &str) -> Option<&SecretString> {
        self.values.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The cached read this copy came from, for [`SecretStores::invalidate_read`] (0: none).
    pub fn read_id(&self) -> u64 {
        self.read
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Credentials given inline (the `APONO` store). Serializable because the control plane must hand
/// them to the agent inside the job; `Debug` is redacted.
#[derive(Clone, Default)]
pub struct InlineCredentials(pub BTreeMap<String, SecretString>);

/// Hand-written: serde's own errors quote the value they could not use (`invalid type: string
/// "token-…:secret", expected a map`), and these values are credentials. A wrong shape is named
/// by its field and type only.
impl<'de> Deserialize<'de> for InlineCredentials {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // `Value` takes any shape, so this step cannot fail on a value (only on broken input).
        let value = serde_json::Value::deserialize(d)?;
        let serde_json::Value::Object(map) = value else {
            return Err(D::Error::custom(format!(
                "credentials must be a map of keys to string values (like {{ access_key = \"...\", secret_key = \"...\" }}), not {} (the value is not shown)",
                shape(&value)
            )));
        };
        map.into_iter()
            .map(|(key, v)| match v {
                serde_json::Value::String(s) => Ok((key, SecretString::from(s))),
                other => Err(D::Error::custom(format!(
                    "credentials.{key} must be a string, not {} (the value is not shown)",
                    shape(&other)
                ))),
            })
            .collect::<Result<_, _>>()
            .map(InlineCredentials)
    }
}

/// What kind of JSON value `v` is, never what it holds.
fn shape(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a map",
    }
}

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

/// Where a secret lives. Field names are Apono's (DESIGN.md §5); the optional ones are ours.
/// Unknown fields are refused by name: a misspelt optional field (`versoin`, `roleArn`) would
/// otherwise be silently ignored, as Vault definitions already refuse them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub enum SecretRef {
    Apono {
        credentials: InlineCredentials,
    },
    Kubernetes {
        namespace: String,
        name: String,
    },
    Aws {
        region: String,
        /// A name or an ARN.
        secret_id: String,
        /// Assume this role (through STS) before reading.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role_arn: Option<String>,
        /// The external ID the role's trust policy asks for (`sts:ExternalId`), with `role_arn`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external_id: Option<String>,
        /// A profile of the shared AWS config files (`credential_process`, SSO, ...) instead of
        /// the default chain's (`AWS_PROFILE`, else `default`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        /// A staging label to read instead of `AWSCURRENT` (`AWSPREVIOUS` after a bad rotation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version_stage: Option<String>,
        /// A version id to read, pinned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version_id: Option<String>,
    },
    Azure {
        vault_url: String,
        name: String,
        /// A version id to read, pinned (the current version when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    Gcp {
        project: String,
        secret_id: String,
        /// A version number or `latest` (the default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// The region of a regional secret (`europe-west1`): read at that region's endpoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        location: Option<String>,
    },
    HashicorpVault {
        /// The KV mount (`secret`).
        secret_engine: String,
        path: String,
        /// Which of several configured vaults: a definition's `name` or `address`. Default: the first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vault: Option<String>,
    },
}

impl PartialEq for InlineCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|((ka, va), (kb, vb))| ka == kb && va.expose_secret() == vb.expose_secret())
    }
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
            SecretRef::Aws {
                region,
                secret_id,
                role_arn,
                version_stage,
                version_id,
                ..
            } => {
                let version = match (version_id, version_stage) {
                    (Some(id), _) => format!("@{id}"),
                    (None, Some(stage)) => format!("@{stage}"),
                    (None, None) => String::new(),
                };
                match role_arn {
                    Some(role) => format!("AWS {region}/{secret_id}{version} (as {role})"),
                    None => format!("AWS {region}/{secret_id}{version}"),
                }
            }
            SecretRef::Azure {
                vault_url,
                name,
                version,
            } => match version {
                Some(v) => format!("AZURE {vault_url} {name}@{v}"),
                None => format!("AZURE {vault_url} {name}"),
            },
            SecretRef::Gcp {
                project,
                secret_id,
                version,
                location,
            } => {
                let version = version.as_ref().map(|v| format!("@{v}")).unwrap_or_default();
                match location {
                    Some(l) => format!("GCP {project}/{secret_id}{version} (in {l})"),
                    None => format!("GCP {project}/{secret_id}{version}"),
                }
            }
            SecretRef::HashicorpVault {
                secret_engine,
                path,
                vault,
            } => match vault {
                Some(v) => format!("HASHICORP_VAULT {secret_engine}/{path} (vault {v})"),
                None => format!("HASHICORP_VAULT {secret_engine}/{path}"),
            },
        }
    }

    /// The cache key: the reference itself. `None` for inline credentials (nothing to cache).
    fn cache_key(&self) -> Option<String> {
        match self {
            SecretRef::Apono { .. } => None,
            other => serde_json::to_string(other).ok(),
        }
    }
}

/// Why a secret could not be read. Messages name the reference and what to do; never the value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
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
    #[error("secret store {store} is misconfigured: {hint}")]
    Misconfigured { store: String, hint: String },
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
            SecretError::Misconfigured { .. } => "secret_store_misconfigured",
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self, SecretError::Unreachable { .. })
    }

    /// The error for a secret that lacks the read mark, with how to add it.
    #[cfg_attr(
        not(all(
            feature = "store-kubernetes",
            feature = "store-aws",
            feature = "store-azure",
            feature = "store-gcp",
            feature = "store-vault"
        )),
        allow(dead_code)
    )]
    pub(crate) fn not_marked(reference: &SecretRef, what: &str, how: String) -> SecretError {
        SecretError::NotMarked {
            reference: reference.describe(),
            hint: format!("add the {what} {READ_MARK_KEY}={READ_MARK_VALUE} to the secret ({how})"),
        }
    }
}

/// One kind of secret store.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The `type` this store serves (`APONO`, `AWS`, ...).
    fn store_type(&self) -> &'static str;
    /// Reads the secret, checking the store's gate (label, tag, allow-list) first.
    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError>;
}

/// Is this label or tag map marked for the connector?
#[cfg_attr(
    not(all(
        feature = "store-kubernetes",
        feature = "store-aws",
        feature = "store-azure",
        feature = "store-gcp",
        feature = "store-vault"
    )),
    allow(dead_code)
)]
pub(crate) fn is_marked<'a>(mut marks: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    marks.any(|(k, v)| k == READ_MARK_KEY && v.trim().eq_ignore_ascii_case(READ_MARK_VALUE))
}

/// The stores of this build, chosen by a reference's type, with a shared cache and metrics.
///
/// Cloning is cheap and shares the cache and the metrics.
#[derive(Clone)]
pub struct SecretStores {
    stores: Vec<Arc<dyn SecretStore>>,
    cache: Arc<cache::Cache>,
    metrics: Arc<metrics::Metrics>,
    /// Bounds one store call: a hung store must not hold a job (and, through the singleflight,
    /// every job waiting on the same reference) forever.
    fetch_timeout: Duration,
}

impl fmt::Debug for SecretStores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStores").field("types", &self.types()).finish()
    }
}

/// The cache TTL when none is configured.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
/// How long one store call may take before it fails as `Unreachable` (retryable).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for SecretStores {
    /// APONO and every store of this build, with default settings: no allow-list, no Vault
    /// definitions, the default cache TTL. It reads none of the connector's variables (the cloud
    /// SDKs still read their own); a program that has settings uses [`SecretStores::from_config`].
    fn default() -> Self {
        SecretStores::build(&SecretsSettings::default(), false).unwrap_or_else(|e| SecretStores::broken(e.to_string()))
    }
}

impl SecretStores {
    /// An empty registry (no store at all), for tests that add their own with [`SecretStores::with_store`].
    pub fn empty() -> SecretStores {
        SecretStores {
            stores: Vec::new(),
            cache: Arc::new(cache::Cache::new(DEFAULT_CACHE_TTL)),
            metrics: Arc::new(metrics::Metrics::default()),
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }

    /// The stores for the daemon and the one-shot commands, from their settings.
    ///
    /// Validates what can be validated without network access ([`SecretsSettings::problems`],
    /// and the file at `HASHICORP_VAULT_CONFIG_FILE_PATH`); clients for the cloud stores are built
    /// on first use.
    ///
    /// # Errors
    /// A bad setting (naming the key, its variable and the entry: a malformed Vault definition, an
    /// allow-list entry, an unknown store in `require_read_mark`) or an unreadable definitions
    /// file.
    pub fn from_config(settings: &SecretsSettings) -> Result<SecretStores, SettingsError> {
        // The Vault definitions are checked by `build`, which parses them anyway.
        let mut problems = settings.problems_besides_vault();
        let built = SecretStores::build(settings, true);
        if let Err(e) = &built {
            problems.push(e.0.clone());
        }
        if problems.is_empty() {
            built
        } else {
            Err(SettingsError(problems.join("; ")))
        }
    }

    fn build(config: &SecretsSettings, strict: bool) -> Result<SecretStores, SettingsError> {
        #[cfg_attr(
            not(any(
                feature = "store-kubernetes",
                feature = "store-aws",
                feature = "store-azure",
                feature = "store-gcp",
                feature = "store-vault"
            )),
            allow(unused_mut)
        )]
        let mut stores: Vec<Arc<dyn SecretStore>> = vec![Arc::new(AponoStore)];
        #[cfg(feature = "store-kubernetes")]
        stores.push(Arc::new(KubernetesStore::new(config.allowed_secrets_to_read.clone())));
        #[cfg(feature = "store-aws")]
        stores.push(Arc::new(AwsStore::new()));
        #[cfg(feature = "store-azure")]
        stores.push(Arc::new(
            AzureStore::new().requiring_read_mark(config.requires_read_mark("AZURE")),
        ));
        #[cfg(feature = "store-gcp")]
        stores.push(Arc::new(
            GcpStore::new().requiring_read_mark(config.requires_read_mark("GCP")),
        ));
        #[cfg(feature = "store-vault")]
        {
            let definitions = match VaultDefinitions::from_config(config) {
                Ok(d) => d,
                Err(e) if strict => return Err(e),
                Err(e) => VaultDefinitions::broken(e.to_string()),
            };
            // A `from_secret_store` definition is read through the other stores (uncached: a
            // rotated Vault token must be seen at once).
            let vault = VaultStore::new(definitions, stores.clone());
            stores.push(Arc::new(vault));
        }
        #[cfg(not(feature = "store-vault"))]
        let _ = strict;
        let ttl = Duration::from_secs(config.cache_ttl_seconds);
        Ok(SecretStores {
            stores,
            cache: Arc::new(cache::Cache::new(ttl)),
            metrics: Arc::new(metrics::Metrics::default()),
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        })
    }

    /// A registry whose every non-inline store answers `Misconfigured` with `why`.
    fn broken(why: String) -> SecretStores {
        tracing::error!(error = %why, "secret stores are misconfigured");
        let mut s = SecretStores::empty();
        s.stores.push(Arc::new(AponoStore));
        for store in ["KUBERNETES", "AWS", "AZURE", "GCP", "HASHICORP_VAULT"] {
            s.stores.push(Arc::new(BrokenStore {
                store,
                why: why.clone(),
            }));
        }
        s
    }

    /// Adds `store`, replacing any store of the same type (tests put a [`MemoryStore`] in place of
    /// a cloud store this way).
    #[must_use]
    pub fn with_store(mut self, store: Arc<dyn SecretStore>) -> SecretStores {
        self.stores.retain(|s| s.store_type() != store.store_type());
        self.stores.push(store);
        self
    }

    /// Sets how long a fetched secret is reused; zero disables the cache (concurrent fetches of one
    /// reference still make one call). Starts with an empty cache.
    #[must_use]
    pub fn with_cache_ttl(mut self, ttl: Duration) -> SecretStores {
        self.cache = Arc::new(cache::Cache::new(ttl));
        self
    }

    /// Sets how long one store call may take (default [`DEFAULT_FETCH_TIMEOUT`]).
    #[must_use]
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> SecretStores {
        self.fetch_timeout = timeout;
        self
    }

    /// Store types this build can read (sent as capabilities in the session hello).
    pub fn types(&self) -> Vec<String> {
        self.stores.iter().map(|s| s.store_type().to_string()).collect()
    }

    /// Reads a secret, from the cache when a fresh copy is there.
    ///
    /// # Errors
    /// The store's own error, or `Unsupported` when no store of this build serves the type.
    pub async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let wanted = reference.store_type();
        let Some(store) = self.stores.iter().find(|s| s.store_type() == wanted) else {
            return Err(SecretError::Unsupported {
                store: wanted.to_string(),
            });
        };
        let Some(key) = reference.cache_key() else {
            return self.call(store.as_ref(), reference).await;
        };
        let (result, from_cache) = self
            .cache
            .get_or_fetch(&key, || self.call(store.as_ref(), reference))
            .await;
        if from_cache {
            self.metrics.cache_hit(wanted);
        }
        result
    }

    async fn call(&self, store: &dyn SecretStore, reference: &SecretRef) -> Result<Secret, SecretError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.fetch_timeout, store.fetch(reference)).await {
            Ok(result) => result,
            Err(_) => Err(SecretError::Unreachable {
                reference: reference.describe(),
                hint: format!("the store did not answer within {:?}", self.fetch_timeout),
            }),
        };
        let elapsed = started.elapsed();
        self.metrics.record(
            store.store_type(),
            elapsed,
            result.as_ref().err().map(SecretError::code),
        );
        match &result {
            Ok(secret) => tracing::debug!(
                store = store.store_type(),
                reference = %reference.describe(),
                keys = ?secret.keys().collect::<Vec<_>>(),
                elapsed_ms = elapsed.as_millis() as u64,
                "secret read"
            ),
            Err(e) => tracing::debug!(
                store = store.store_type(),
                reference = %reference.describe(),
                code = e.code(),
                error = %e,
                "secret read failed"
            ),
        }
        result
    }

    /// Forgets anything cached for `reference` (after the integration refused its credentials), so
    /// the next fetch reads the store again.
    pub fn invalidate(&self, reference: &SecretRef) {
        if let Some(key) = reference.cache_key() {
            self.cache.invalidate(&key);
            tracing::debug!(reference = %reference.describe(), "cached secret dropped");
        }
    }

    /// Forgets the cached copy of `reference` only if it is still the read `read_id`
    /// ([`Secret::read_id`] of the copy the integration refused). After a rotation every job
    /// holding the old copy gets a 401 and calls this; the first drops the old copy and re-reads,
    /// the others find the new copy in place and use it: one store read, not one per job (secrets
    /// review N20). Concurrent re-reads of one reference make one call (singleflight).
    pub fn invalidate_read(&self, reference: &SecretRef, read_id: u64) {
        if let Some(key) = reference.cache_key()
            && self.cache.invalidate_read(&key, read_id)
        {
            tracing::debug!(reference = %reference.describe(), "cached secret dropped");
        }
    }

    /// Per-store counters (calls, cache hits, errors by code, latency), for the telemetry module.
    /// Never carries a value or a reference, only store types and error codes.
    pub fn metrics(&self) -> Vec<StoreMetrics> {
        self.metrics.snapshot()
    }

    /// Reads each reference (through the cache) and reports its keys, or why it failed; for `check`.
    pub async fn describe_all(&self, references: &[SecretRef]) -> Vec<(String, Result<Vec<String>, SecretError>)> {
        let mut out = Vec::with_capacity(references.len());
        for r in references {
            let keys = self
                .fetch(r)
                .await
                .map(|s| s.keys().map(str::to_string).collect::<Vec<_>>());
            out.push((r.describe(), keys));
        }
        out
    }
}

/// Stands in for the stores when the secrets configuration is unusable (see `Default`).
struct BrokenStore {
    store: &'static str,
    why: String,
}

#[async_trait]
impl SecretStore for BrokenStore {
    fn store_type(&self) -> &'static str {
        self.store
    }

    async fn fetch(&self, _: &SecretRef) -> Result<Secret, SecretError> {
        Err(SecretError::Misconfigured {
            store: self.store.to_string(),
            hint: self.why.clone(),
        })
    }
}

/// The error a store's `fetch` returns when handed another store's reference (a registry bug).
#[cfg_attr(
    not(all(
        feature = "store-kubernetes",
        feature = "store-aws",
        feature = "store-azure",
        feature = "store-gcp",
        feature = "store-vault"
    )),
    allow(dead_code)
)]
pub(crate) fn wrong_store(reference: &SecretRef, store: &'static str) -> SecretError {
    SecretError::Misconfigured {
        store: store.to_string(),
        hint: format!("handed a {} reference", reference.store_type()),
    }
}
