//! The `KUBERNETES` store: a Secret in the cluster.
//!
//! The client comes from the in-cluster service account or the kubeconfig (kube-rs's inference).
//! Gates: when `ALLOWED_SECRETS_TO_READ` is set the secret must be in it (checked before any
//! call: `namespace/name` allows that secret, a bare `name` that name in any namespace), and the
//! Secret must carry the label `apono-connector-read=true`.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret as K8sSecret;
use kube::Api;
use tokio::sync::OnceCell;

use super::{AllowedSecret, Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Reads Kubernetes Secrets.
pub struct KubernetesStore {
    /// Built on first use (inferring it reads files and the environment).
    client: OnceCell<kube::Client>,
    /// Clients built so far (one, shared by every job: issue 18; none when one was given).
    built: std::sync::atomic::AtomicUsize,
    /// `ALLOWED_SECRETS_TO_READ`, parsed; `None` (the list is empty) means any labelled secret.
    allowed: Option<Vec<AllowedSecret>>,
}

/// The allow-list, parsed. A malformed entry (refused at start-up by the settings' checks, so
/// only possible when a caller builds the store directly) allows nothing: it is dropped, but the
/// list stays a list, so an unparsable list refuses every secret instead of allowing them all.
fn allow_list(entries: Vec<String>) -> Option<Vec<AllowedSecret>> {
    if entries.is_empty() {
        return None;
    }
    Some(entries.iter().filter_map(|e| AllowedSecret::parse(e).ok()).collect())
}

impl KubernetesStore {
    /// A store whose client is inferred on first use.
    pub fn new(allowed: Vec<String>) -> KubernetesStore {
        KubernetesStore {
            client: OnceCell::new(),
            built: std::sync::atomic::AtomicUsize::new(0),
            allowed: allow_list(allowed),
        }
    }

    /// A store using `client` (tests point it at a fake API server).
    pub fn with_client(client: kube::Client, allowed: Vec<String>) -> KubernetesStore {
        KubernetesStore {
            client: OnceCell::new_with(Some(client)),
            built: std::sync::atomic::AtomicUsize::new(0),
            allowed: allow_list(allowed),
        }
    }

    /// How many Kubernetes clients this store has built (at most one).
    pub fn clients_built(&self) -> usize {
        self.built.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn client(&self, reference: &SecretRef) -> Result<kube::Client, SecretError> {
        self.client
            .get_or_try_init(|| async {
                let mut config = kube::Config::infer().await.map_err(|e| SecretError::Misconfigured {
                    store: "KUBERNETES".into(),
                    hint: format!(
                        "no in-cluster service account and no usable kubeconfig for {}: {}",
                        reference.describe(),
                        infer_error_text(&e)
                    ),
                })?;
                // kube's default retry (15 tries, backoff up to 1000 s on 429/503/504) would stack
                // under the agent's own retries and hide the cause behind the registry's timeout.
                config.default_retry = false;
                // kube sets no read timeout: an API server that accepts and never answers would
                // hold the read until the registry's deadline, and a Vault definition with it.
                config.connect_timeout = Some(std::time::Duration::from_secs(5));
                config.read_timeout = Some(std::time::Duration::from_secs(10));
                let client = kube::Client::try_from(config).map_err(|e| SecretError::Misconfigured {
                    store: "KUBERNETES".into(),
                    hint: format!("cannot build a Kubernetes client: {e}"),
                })?;
                self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(client)
            })
            .await
            .cloned()
    }
}

/// Why the client config could not be inferred, without the kubeconfig's text: a YAML parse
/// error renders a snippet of the file, which may hold its `token:` or `client-key-data:`.
fn infer_error_text(e: &kube::config::InferConfigError) -> String {
    let parse_failed = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<kube::config::KubeconfigError>())
        .is_some_and(|k| matches!(k, kube::config::KubeconfigError::Parse(_)));
    if parse_failed {
        let path = std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into());
        format!(
            "the kubeconfig at {path} could not be parsed as YAML (its text is not shown: it holds credentials); \
             check it with `kubectl config view`"
        )
    } else {
        e.to_string()
    }
}

fn map_error(reference: &SecretRef, namespace: &str, name: &str, err: kube::Error) -> SecretError {
    let describe = reference.describe();
    match err {
        kube::Error::Api(status) => match status.code {
            404 => SecretError::NotFound {
                reference: describe,
                hint: format!("no Secret of that name in namespace {namespace}"),
            },
            403 => SecretError::NotPermitted {
                reference: describe,
                hint: format!(
                    "the connector's service account may not get this secret in namespace {namespace}: grant it \
                     get on it (Helm: list {namespace}/{name} in allowedSecretsToRead) ({})",
                    status.message
                ),
            },
            401 => SecretError::NotPermitted {
                reference: describe,
                hint: format!(
                    "the Kubernetes API refused the connector's credentials ({})",
                    status.message
                ),
            },
            code if code >= 500 || code == 429 || code == 408 => SecretError::Unreachable {
                reference: describe,
                hint: format!("the Kubernetes API answered {code} ({})", status.message),
            },
            // 400/422 and the like: the request is wrong (a bad name), a retry cannot fix it.
            code => SecretError::Misconfigured {
                store: "KUBERNETES".into(),
                hint: format!(
                    "the Kubernetes API refused {describe}: {code} ({}: {})",
                    status.reason, status.message
                ),
            },
        },
        other => SecretError::Unreachable {
            reference: describe,
            hint: format!("cannot reach the Kubernetes API: {other}"),
        },
    }
}

#[async_trait]
impl SecretStore for KubernetesStore {
    fn store_type(&self) -> &'static str {
        "KUBERNETES"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::Kubernetes { namespace, name } = reference else {
            return Err(wrong_store(reference, "KUBERNETES"));
        };
        if let Some(allowed) = &self.allowed
            && !allowed.iter().any(|a| a.allows(namespace, name))
        {
            return Err(SecretError::NotPermitted {
                reference: reference.describe(),
                hint: format!(
                    "{namespace}/{name} is not in ALLOWED_SECRETS_TO_READ; add {namespace}/{name} there \
                     (Helm value allowedSecretsToRead)"
                ),
            });
        }
        let not_marked = || {
            SecretError::not_marked(
                reference,
                "label",
                format!(
                    "kubectl label secret -n {namespace} {name} {}=true",
                    super::READ_MARK_KEY
                ),
            )
        };
        let client = self.client(reference).await?;
        let api: Api<K8sSecret> = Api::namespaced(client, namespace);
        // The label first, from the metadata alone (the same `get` verb), so an unmarked value is
        // never fetched (nor recorded as read in the API server's audit log).
        let meta = api
            .get_metadata(name)
            .await
            .map_err(|e| map_error(reference, namespace, name, e))?;
        let labels = meta.metadata.labels.unwrap_or_default();
        if !is_marked(labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Err(not_marked());
        }
        let secret = api
            .get(name)
            .await
            .map_err(|e| map_error(reference, namespace, name, e))?;
        // Re-checked on the object read: the label may have been removed in between.
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        if !is_marked(labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Err(not_marked());
        }
        let data = secret.data.unwrap_or_default();
        value::from_bytes_map(reference, data.into_iter().map(|(k, v)| (k, v.0)))
    }
}
