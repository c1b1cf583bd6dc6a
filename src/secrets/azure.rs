//! The `AZURE` store: Azure Key Vault secrets, through the official `azure_security_keyvault_secrets`.
//!
//! Credentials (azure_identity), picked from the environment the way Azure's own tooling does:
//! workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (AKS), a client secret when
//! `AZURE_CLIENT_SECRET` is, else managed identity (user-assigned when `AZURE_CLIENT_ID` is set).
//! Access is governed by Key Vault's own RBAC or access policies, as in Apono. The read mark
//! (tag `apono-connector-read=true`) is opt-in (`secrets.require_read_mark`); when asked for, it
//! is read from the secret's version list before the value, and any enabled version carrying it
//! marks the secret, because `az keyvault secret set` (a rotation) creates an untagged version.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::ClientOptions;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use tokio::sync::Mutex;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Reads Azure Key Vault. One client per vault URL, built on first use.
pub struct AzureStore {
    /// The credential; chosen from the environment on first use unless given.
    credential: Mutex<Option<Arc<dyn TokenCredential>>>,
    /// Client options (tests give a transport that trusts their certificate).
    client_options: ClientOptions,
    clients: Mutex<HashMap<String, Arc<SecretClient>>>,
    /// Whether a secret must carry the read mark (`secrets.require_read_mark` has `AZURE`).
    require_mark: bool,
}

impl Default for AzureStore {
    fn default() -> Self {
        AzureStore::new()
    }
}

impl AzureStore {
    /// Credentials from the environment, default client options.
    pub fn new() -> AzureStore {
        AzureStore {
            credential: Mutex::new(None),
            client_options: ClientOptions::default(),
            clients: Mutex::new(HashMap::new()),
            require_mark: false,
        }
    }

    /// Credentials from the environment, with these client options for both the token requests
    /// and the vault calls (a proxy, a transport).
    pub fn with_client_options(client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(None),
            client_options,
            clients: Mutex::new(HashMap::new()),
            require_mark: false,
        }
    }

    /// A given credential and client options (tests).
    pub fn with_credential(credential: Arc<dyn TokenCredential>, client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(Some(credential)),
            client_options,
            clients: Mutex::new(HashMap::new()),
            require_mark: false,
        }
    }

    /// Also require the read mark on every secret read (off by default).
    pub fn requiring_read_mark(mut self, require: bool) -> AzureStore {
        self.require_mark = require;
        self
    }

    async fn credential(&self) -> Result<Arc<dyn TokenCredential>, SecretError> {
        let mut slot = self.credential.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = credential_from_env(&self.client_options).map_err(|e| SecretError::Misconfigured {
            store: "AZURE".into(),
            hint: format!("cannot set up Azure credentials: {e}"),
        })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn client(&self, vault_url: &str) -> Result<Arc<SecretClient>, SecretError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(vault_url) {
            return Ok(c.clone());
        }
        let credential = self.credential().await?;
        let options = SecretClientOptions {
            client_options: self.client_options.clone(),
            ..SecretClientOptions::default()
        };
        let client =
            SecretClient::new(vault_url, credential, Some(options)).map_err(|e| SecretError::Misconfigured {
                store: "AZURE".into(),
                hint: format!("vault_url {vault_url:?} is not usable: {e}"),
            })?;
        let client = Arc::new(client);
        clients.insert(vault_url.to_string(), client.clone());
        Ok(client)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Workload identity, client secret or managed identity, by what the environment holds.
fn credential_from_env(client_options: &ClientOptions) -> azure_core::Result<Arc<dyn TokenCredential>> {
    if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        let mut options = azure_identity::WorkloadIdentityCredentialOptions::default();
        options.credential_options.client_options = client_options.clone();
        return Ok(azure_identity::WorkloadIdentityCredential::new(Some(options))?);
    }
    if let (Some(tenant), Some(client_id), Some(secret)) = (
        env("AZURE_TENANT_ID"),
        env("AZURE_CLIENT_ID"),
        env("AZURE_CLIENT_SECRET"),
    ) {
        let options = azure_identity::ClientSecretCredentialOptions {
            client_options: client_options.clone(),
        };
        return Ok(azure_identity::ClientSecretCredential::new(
            &tenant,
            client_id,
            azure_core::credentials::Secret::from(secret),
            Some(options),
        )?);
    }
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: env("AZURE_CLIENT_ID").map(azure_identity::UserAssignedId::ClientId),
        client_options: client_options.clone(),
    };
    Ok(azure_identity::ManagedIdentityCredential::new(Some(options))?)
}

fn map_error(reference: &SecretRef, err: azure_core::Error) -> SecretError {
    let describe = reference.describe();
    match err.kind() {
        ErrorKind::HttpResponse { status, error_code, .. } => {
            let status = u16::from(*status);
            let code = error_code.clone().unwrap_or_else(|| "no error code".into());
            match status {
                404 => SecretError::NotFound {
                    reference: describe,
                    hint: format!("the key vault has no such secret ({code})"),
                },
                403 => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!(
                        "the connector's identity may not get secrets in this vault: give it the \"Key Vault Secrets User\" \
                         role (RBAC vaults) or an access policy with secret permissions Get (and List when AZURE is in \
                         secrets.require_read_mark) ({code})"
                    ),
                },
                401 => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!("the key vault refused the connector's token ({code})"),
                },
                // Any other 4xx (400 BadParameter for a name with `_`, ...) is the request's fault.
                400..=499 if status != 408 && status != 429 => SecretError::Misconfigured {
                    store: "AZURE".into(),
                    hint: format!("the key vault refused {describe}: {status} {code}: {err}"),
                },
                _ => SecretError::Unreachable {
                    reference: describe,
                    hint: format!("the key vault answered {status} ({code}): {err}"),
                },
            }
        }
        ErrorKind::Credential => SecretError::NotPermitted {
            reference: describe,
            hint: format!(
                "no Azure token (workload identity, client secret or managed identity): {}",
                summarize(&err)
            ),
        },
        ErrorKind::DataConversion => SecretError::Malformed {
            reference: describe,
            hint: "the key vault's answer could not be read".into(),
        },
        _ => SecretError::Unreachable {
            reference: describe,
            hint: format!("cannot reach the key vault: {}", summarize(&err)),
        },
    }
}

/// The error's message chain, without any response body.
fn summarize(err: &azure_core::Error) -> String {
    let mut out = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Whether an enabled version of the secret carries the read mark, from the version list (tags
/// without values, so an unmarked value is never fetched).
async fn any_version_marked(client: &SecretClient, reference: &SecretRef, name: &str) -> Result<bool, SecretError> {
    use futures::TryStreamExt;
    let mut versions = client
        .list_secret_properties_versions(name, None)
        .map_err(|e| map_error(reference, e))?;
    while let Some(version) = versions.try_next().await.map_err(|e| map_error(reference, e))? {
        let enabled = version.attributes.as_ref().and_then(|a| a.enabled).unwrap_or(true);
        let tags = version.tags.unwrap_or_default();
        if enabled && is_marked(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[async_trait]
impl SecretStore for AzureStore {
    fn store_type(&self) -> &'static str {
        "AZURE"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::Azure { vault_url, name } = reference else {
            return Err(wrong_store(reference, "AZURE"));
        };
        let client = self.client(vault_url).await?;
        if self.require_mark && !any_version_marked(&client, reference, name).await? {
            return Err(SecretError::not_marked(
                reference,
                "tag",
                format!(
                    "az keyvault secret set-attributes --vault-name <VAULT> --name {name} --tags {}=true \
                     (this replaces the version's other tags: list them too); \
                     or remove AZURE from secrets.require_read_mark",
                    super::READ_MARK_KEY
                ),
            ));
        }
        let response = client
            .get_secret(name, None)
            .await
            .map_err(|e| map_error(reference, e))?;
        let secret = response.into_model().map_err(|e| map_error(reference, e))?;
        match secret.value {
            Some(text) => value::from_text(reference, text),
            None => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret has no value".into(),
            }),
        }
    }
}
