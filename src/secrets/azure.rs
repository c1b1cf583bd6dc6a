//! The `AZURE` store: Azure Key Vault secrets, through the official `azure_security_keyvault_secrets`.
//!
//! Credentials (azure_identity), picked from the environment the way Azure's own tooling does:
//! workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (AKS), a client secret when
//! `AZURE_CLIENT_SECRET` is, else managed identity (user-assigned when `AZURE_CLIENT_ID` is set).
//! The gate: the secret's tag `apono-connector-read=true`.

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
        }
    }

    /// Credentials from the environment, with these client options for both the token requests
    /// and the vault calls (a proxy, a transport).
    pub fn with_client_options(client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(None),
            client_options,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A given credential and client options (tests).
    pub fn with_credential(credential: Arc<dyn TokenCredential>, client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(Some(credential)),
            client_options,
            clients: Mutex::new(HashMap::new()),
        }
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
                         role (RBAC vaults) or an access policy with secret permission Get ({code})"
                    ),
                },
                401 => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!("the key vault refused the connector's token ({code})"),
                },
                _ => SecretError::Unreachable {
                    reference: describe,
                    hint: format!("the key vault answered {status} ({code})"),
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
        let response = client
            .get_secret(name, None)
            .await
            .map_err(|e| map_error(reference, e))?;
        let secret = response.into_model().map_err(|e| map_error(reference, e))?;
        let tags = secret.tags.unwrap_or_default();
        if !is_marked(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Err(SecretError::not_marked(
                reference,
                "tag",
                format!(
                    "az keyvault secret set-attributes --vault-name <VAULT> --name {name} --tags {}=true",
                    super::READ_MARK_KEY
                ),
            ));
        }
        match secret.value {
            Some(text) => value::from_text(reference, text),
            None => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret has no value".into(),
            }),
        }
    }
}
