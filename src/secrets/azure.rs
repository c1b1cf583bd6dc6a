//! The `AZURE` store: Azure Key Vault secrets, through the official `azure_security_keyvault_secrets`.
//!
//! Credentials (azure_identity), picked from the environment with Azure's variable names:
//! workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (AKS), a client secret when
//! `AZURE_CLIENT_SECRET` is, a client certificate when `AZURE_CLIENT_CERTIFICATE_PATH` is (cargo
//! feature `store-azure-certificate`), else managed identity (user-assigned when
//! `AZURE_CLIENT_ID` is set).
//! Access is governed by Key Vault's own RBAC or access policies, as in Apono. The read mark
//! (tag `apono-connector-read=true`) is opt-in (`secrets.require_read_mark`); when asked for, it
//! is read from the secret's version list before the value, and any enabled version carrying it
//! marks the secret, because `az keyvault secret set` (a rotation) creates an untagged version.
//!
//! The SDK's own retries are capped (K2). By default azure_core retries 8 times within 60 s
//! (honouring any `Retry-After`), and its transport waits up to 20 s to connect and 60 s per
//! read; the VM managed identity retries 6 times within 72 s, 404 included. That stacks under the
//! agent's retries and runs into the registry's 60 s limit, which hides the cause. Here every
//! request gets one retry (5xx, 408 and I/O faults; not 429, which the agent backs off from), each
//! try at most [`DEFAULT_ATTEMPT_TIMEOUT`], and getting a token (all of the credential's own
//! tries) at most twice that.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::policies::{Policy, PolicyResult, RetryHeaders, RetryPolicy};
use azure_core::http::{ClientOptions, Context, Request, RetryOptions, StatusCode};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use tokio::sync::Mutex;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// How long one try of one request may take by default, connection included.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before the one retry.
const RETRY_DELAY: Duration = Duration::from_millis(300);

/// Reads Azure Key Vault. One client per vault URL, built on first use.
pub struct AzureStore {
    /// The credential (and where it comes from, for errors); chosen from the environment on
    /// first use unless given.
    credential: Mutex<Option<Arc<dyn TokenCredential>>>,
    /// A credential given by the caller (tests), used instead of the environment's.
    given: Option<Arc<dyn TokenCredential>>,
    /// Client options (tests give a transport that trusts their certificate); the retry and
    /// per-try limits are added to them.
    client_options: ClientOptions,
    clients: Mutex<HashMap<String, Arc<SecretClient>>>,
    /// Clients built so far (one per vault URL, shared by every job: issue 18).
    built: AtomicUsize,
    /// Whether a secret must carry the read mark (`secrets.require_read_mark` has `AZURE`).
    require_mark: bool,
    /// How long one try of one request may take.
    attempt_timeout: Duration,
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
            given: None,
            client_options: ClientOptions::default(),
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
            require_mark: false,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// Credentials from the environment, with these client options for both the token requests
    /// and the vault calls (a proxy, a transport).
    pub fn with_client_options(client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(None),
            given: None,
            client_options,
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
            require_mark: false,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// A given credential and client options (tests).
    pub fn with_credential(credential: Arc<dyn TokenCredential>, client_options: ClientOptions) -> AzureStore {
        AzureStore {
            credential: Mutex::new(None),
            given: Some(credential),
            client_options,
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
            require_mark: false,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// How many Key Vault clients this store has built: one per vault URL.
    pub fn clients_built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// Also require the read mark on every secret read (off by default).
    pub fn requiring_read_mark(mut self, require: bool) -> AzureStore {
        self.require_mark = require;
        self
    }

    /// How long one try of one request may take (default [`DEFAULT_ATTEMPT_TIMEOUT`]); a request
    /// is tried at most twice.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> AzureStore {
        self.attempt_timeout = timeout;
        self
    }

    /// The caller's options with the retry and per-try limits.
    fn options(&self) -> ClientOptions {
        let mut options = self.client_options.clone();
        options.retry = RetryOptions::custom(Arc::new(OneRetry));
        options
            .per_try_policies
            .push(Arc::new(AttemptTimeout(self.attempt_timeout)));
        options
    }

    async fn credential(&self) -> Result<Arc<dyn TokenCredential>, SecretError> {
        let mut slot = self.credential.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let (inner, source) = match &self.given {
            Some(given) => (given.clone(), "the given credential"),
            None => credential_from_env(&self.options()).map_err(|e| SecretError::Misconfigured {
                store: "AZURE".into(),
                hint: format!("cannot set up Azure credentials: {e}"),
            })?,
        };
        let c: Arc<dyn TokenCredential> = Arc::new(BoundedCredential {
            inner,
            source,
            timeout: self.attempt_timeout * 2,
        });
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
            client_options: self.options(),
            ..SecretClientOptions::default()
        };
        let client =
            SecretClient::new(vault_url, credential, Some(options)).map_err(|e| SecretError::Misconfigured {
                store: "AZURE".into(),
                hint: format!("vault_url {vault_url:?} is not usable: {e}"),
            })?;
        let client = Arc::new(client);
        self.built.fetch_add(1, Ordering::Relaxed);
        clients.insert(vault_url.to_string(), client.clone());
        Ok(client)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// One retry, after [`RETRY_DELAY`], of a 5xx, a 408 or an I/O fault. `Retry-After` is not
/// honoured here: a throttled read fails at once and the agent backs off.
#[derive(Debug)]
struct OneRetry;

const RETRIED_STATUSES: &[StatusCode] = &[
    StatusCode::RequestTimeout,
    StatusCode::InternalServerError,
    StatusCode::BadGateway,
    StatusCode::ServiceUnavailable,
    StatusCode::GatewayTimeout,
];

impl RetryPolicy for OneRetry {
    fn is_expired(&self, _: azure_core::time::Duration, retry_count: u32) -> bool {
        retry_count >= 1
    }

    fn retry_headers(&self) -> Option<&RetryHeaders> {
        None
    }

    fn retry_status_codes(&self) -> &[StatusCode] {
        RETRIED_STATUSES
    }

    fn sleep_duration(&self, _: u32) -> azure_core::time::Duration {
        azure_core::time::Duration::milliseconds(RETRY_DELAY.as_millis() as i64)
    }
}

/// Ends a try that takes longer than the limit, as an I/O fault naming the host.
#[derive(Debug)]
struct AttemptTimeout(Duration);

#[async_trait]
impl Policy for AttemptTimeout {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        let host = host_of(request.url());
        match tokio::time::timeout(self.0, next[0].send(ctx, request, &next[1..])).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::with_message(
                ErrorKind::Io,
                format!("timed out after {} s at {host}", self.0.as_secs_f64()),
            )),
        }
    }
}

fn host_of(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        (None, _) => url.to_string(),
    }
}

/// Bounds getting a token, the credential's own retries included (the VM managed identity
/// retries for up to 72 s, also on the 404 an AWS or on-premises metadata server may give).
#[derive(Debug)]
struct BoundedCredential {
    inner: Arc<dyn TokenCredential>,
    /// Where tokens come from, for errors.
    source: &'static str,
    timeout: Duration,
}

#[async_trait]
impl TokenCredential for BoundedCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        match tokio::time::timeout(self.timeout, self.inner.get_token(scopes, options)).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::with_message(
                ErrorKind::Io,
                format!(
                    "no Azure token from {} within {} s (is this host on Azure? Otherwise set AZURE_TENANT_ID, \
                     AZURE_CLIENT_ID and a client secret or certificate)",
                    self.source,
                    self.timeout.as_secs_f64()
                ),
            )),
        }
    }
}

/// Workload identity, client secret or managed identity, by what the environment holds; with a
/// short description of the choice.
fn credential_from_env(client_options: &ClientOptions) -> azure_core::Result<(Arc<dyn TokenCredential>, &'static str)> {
    if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        let mut options = azure_identity::WorkloadIdentityCredentialOptions::default();
        options.credential_options.client_options = client_options.clone();
        return Ok((
            azure_identity::WorkloadIdentityCredential::new(Some(options))?,
            "workload identity (AZURE_FEDERATED_TOKEN_FILE)",
        ));
    }
    if let (Some(tenant), Some(client_id), Some(secret)) = (
        env("AZURE_TENANT_ID"),
        env("AZURE_CLIENT_ID"),
        env("AZURE_CLIENT_SECRET"),
    ) {
        let options = azure_identity::ClientSecretCredentialOptions {
            client_options: client_options.clone(),
        };
        return Ok((
            azure_identity::ClientSecretCredential::new(
                &tenant,
                client_id,
                azure_core::credentials::Secret::from(secret),
                Some(options),
            )?,
            "a client secret (AZURE_CLIENT_SECRET)",
        ));
    }
    if let Some(path) = env("AZURE_CLIENT_CERTIFICATE_PATH") {
        return client_certificate(client_options, &path);
    }
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: env("AZURE_CLIENT_ID").map(azure_identity::UserAssignedId::ClientId),
        client_options: client_options.clone(),
    };
    Ok((
        azure_identity::ManagedIdentityCredential::new(Some(options))?,
        "managed identity",
    ))
}

/// A service principal with a certificate, as Azure's EnvironmentCredential reads it:
/// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_CERTIFICATE_PATH` (a PKCS#12 / PFX file
/// with an RSA key) and `AZURE_CLIENT_CERTIFICATE_PASSWORD`.
#[cfg(feature = "store-azure-certificate")]
fn client_certificate(
    client_options: &ClientOptions,
    path: &str,
) -> azure_core::Result<(Arc<dyn TokenCredential>, &'static str)> {
    let fail = |message: String| azure_core::Error::with_message(ErrorKind::Credential, message);
    let (Some(tenant), Some(client_id)) = (env("AZURE_TENANT_ID"), env("AZURE_CLIENT_ID")) else {
        return Err(fail(
            "AZURE_CLIENT_CERTIFICATE_PATH is set: set AZURE_TENANT_ID and AZURE_CLIENT_ID too".into(),
        ));
    };
    let bytes =
        std::fs::read(path).map_err(|e| fail(format!("cannot read AZURE_CLIENT_CERTIFICATE_PATH {path}: {e}")))?;
    if bytes.starts_with(b"-----BEGIN") {
        return Err(fail(format!(
            "{path} is PEM; this agent reads a PKCS#12 (PFX) bundle: openssl pkcs12 -export -in cert.pem \
             -inkey key.pem -out cert.pfx"
        )));
    }
    let options = azure_identity::ClientCertificateCredentialOptions {
        client_options: client_options.clone(),
        password: env("AZURE_CLIENT_CERTIFICATE_PASSWORD").map(azure_core::credentials::Secret::from),
    };
    let credential = azure_identity::ClientCertificateCredential::new(tenant, client_id, bytes.into(), Some(options))
        .map_err(|e| fail(format!("AZURE_CLIENT_CERTIFICATE_PATH {path}: {e}")))?;
    Ok((credential, "a client certificate (AZURE_CLIENT_CERTIFICATE_PATH)"))
}

#[cfg(not(feature = "store-azure-certificate"))]
fn client_certificate(_: &ClientOptions, _: &str) -> azure_core::Result<(Arc<dyn TokenCredential>, &'static str)> {
    Err(azure_core::Error::with_message(
        ErrorKind::Credential,
        "AZURE_CLIENT_CERTIFICATE_PATH is set, but this build of the agent has no client-certificate support \
         (cargo feature store-azure-certificate, which links OpenSSL): use a client secret, workload identity or \
         managed identity, or a build with that feature",
    ))
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
                // Key Vault's own words say which 403 it is (a missing role, its firewall, a
                // disabled version): kept after the usual fix (secrets review N15).
                403 => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!(
                        "the connector's identity may not get secrets in this vault: give it the \"Key Vault Secrets User\" \
                         role (RBAC vaults) or an access policy with secret permissions Get (and List when AZURE is in \
                         secrets.require_read_mark), unless the key vault says otherwise: {code}: {err}"
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
                crate::error_chain(&err)
            ),
        },
        ErrorKind::DataConversion => SecretError::Malformed {
            reference: describe,
            hint: "the key vault's answer could not be read".into(),
        },
        // Network faults and time limits; the message names the host (or the token source).
        _ => SecretError::Unreachable {
            reference: describe,
            hint: crate::error_chain(&err),
        },
    }
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
        let SecretRef::Azure {
            vault_url,
            name,
            version,
        } = reference
        else {
            return Err(wrong_store(reference, "AZURE"));
        };
        // Key Vault version ids are 32 hex digits; checked here because the client pastes the
        // version into the request's path as it is.
        let version = version.as_deref().map(str::trim).filter(|v| !v.is_empty());
        if let Some(v) = version
            && !v.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(SecretError::Misconfigured {
                store: "AZURE".into(),
                hint: format!(
                    "{}: version {v:?} is not a Key Vault version id (32 hexadecimal digits, as `az keyvault secret list-versions` shows)",
                    reference.describe()
                ),
            });
        }
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
        let options = version.map(
            |v| azure_security_keyvault_secrets::models::SecretClientGetSecretOptions {
                secret_version: Some(v.to_string()),
                ..Default::default()
            },
        );
        let response = client
            .get_secret(name, options)
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
