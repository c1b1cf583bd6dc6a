//! The `GCP` store: Google Secret Manager, through the official `google-cloud-secretmanager-v1`
//! (HTTP/JSON) with Application Default Credentials.
//!
//! The gate: the secret's label `apono-connector-read=true`, read with `GetSecret` before
//! `AccessSecretVersion` (so the connector needs `secretmanager.secrets.get` and
//! `secretmanager.versions.access`).

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_secretmanager_v1::client::SecretManagerService;
use tokio::sync::OnceCell;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Reads Google Secret Manager.
pub struct GcpStore {
    client: OnceCell<SecretManagerService>,
    /// Endpoint and credentials overrides (tests); `None` means Google's endpoint and ADC.
    endpoint: Option<String>,
    credentials: Option<google_cloud_auth::credentials::Credentials>,
}

impl Default for GcpStore {
    fn default() -> Self {
        GcpStore::new()
    }
}

impl GcpStore {
    /// Google's endpoint and Application Default Credentials, resolved on first use.
    pub fn new() -> GcpStore {
        GcpStore {
            client: OnceCell::new(),
            endpoint: None,
            credentials: None,
        }
    }

    /// Another endpoint (a regional or private one; tests: a local fake), with the given
    /// credentials or, when `None`, Application Default Credentials.
    pub fn with_endpoint(
        endpoint: String,
        credentials: Option<google_cloud_auth::credentials::Credentials>,
    ) -> GcpStore {
        GcpStore {
            client: OnceCell::new(),
            endpoint: Some(endpoint),
            credentials,
        }
    }

    async fn client(&self) -> Result<SecretManagerService, SecretError> {
        self.client
            .get_or_try_init(|| async {
                let mut builder = SecretManagerService::builder();
                if let Some(e) = &self.endpoint {
                    builder = builder.with_endpoint(e.clone());
                }
                if let Some(c) = &self.credentials {
                    builder = builder.with_credentials(c.clone());
                }
                builder.build().await.map_err(|e| SecretError::Misconfigured {
                    store: "GCP".into(),
                    hint: format!("cannot build a Secret Manager client (Application Default Credentials?): {e}"),
                })
            })
            .await
            .cloned()
    }
}

fn map_error(reference: &SecretRef, action: &str, err: google_cloud_gax::error::Error) -> SecretError {
    let describe = reference.describe();
    if let Some(status) = err.status() {
        let message = status.message.clone();
        return match status.code {
            Code::NotFound => SecretError::NotFound {
                reference: describe,
                hint: format!("Secret Manager has no such secret or version ({message})"),
            },
            Code::PermissionDenied => SecretError::NotPermitted {
                reference: describe,
                hint: format!(
                    "the connector's service account lacks {action} permission (roles/secretmanager.secretAccessor \
                     and secretmanager.secrets.get, e.g. roles/secretmanager.viewer) ({message})"
                ),
            },
            Code::Unauthenticated => SecretError::NotPermitted {
                reference: describe,
                hint: format!("Google refused the connector's credentials ({message})"),
            },
            Code::FailedPrecondition => SecretError::NotFound {
                reference: describe,
                hint: format!("the secret version is not enabled ({message})"),
            },
            Code::InvalidArgument => SecretError::Malformed {
                reference: describe,
                hint: format!("Secret Manager refused the request: {message}"),
            },
            code => SecretError::Unreachable {
                reference: describe,
                hint: format!("{action}: {code:?} ({message})"),
            },
        };
    }
    if err.is_authentication() {
        return SecretError::NotPermitted {
            reference: describe,
            hint: format!("no Google credentials (Application Default Credentials): {err}"),
        };
    }
    if let Some(code) = err.http_status_code() {
        return match code {
            404 => SecretError::NotFound {
                reference: describe,
                hint: format!("Secret Manager answered 404 to {action}"),
            },
            403 => SecretError::NotPermitted {
                reference: describe,
                hint: format!("Secret Manager answered 403 to {action}"),
            },
            _ => SecretError::Unreachable {
                reference: describe,
                hint: format!("Secret Manager answered {code} to {action}"),
            },
        };
    }
    SecretError::Unreachable {
        reference: describe,
        hint: format!("{action}: {err}"),
    }
}

#[async_trait]
impl SecretStore for GcpStore {
    fn store_type(&self) -> &'static str {
        "GCP"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::Gcp {
            project,
            secret_id,
            version,
        } = reference
        else {
            return Err(wrong_store(reference, "GCP"));
        };
        let client = self.client().await?;
        let name = format!("projects/{project}/secrets/{secret_id}");
        let meta = client
            .get_secret()
            .set_name(&name)
            .send()
            .await
            .map_err(|e| map_error(reference, "secretmanager.secrets.get", e))?;
        if !is_marked(meta.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Err(SecretError::not_marked(
                reference,
                "label",
                format!(
                    "gcloud secrets update {secret_id} --project {project} --update-labels={}=true",
                    super::READ_MARK_KEY
                ),
            ));
        }
        let version = version.as_deref().unwrap_or("latest");
        let out = client
            .access_secret_version()
            .set_name(format!("{name}/versions/{version}"))
            .send()
            .await
            .map_err(|e| map_error(reference, "secretmanager.versions.access", e))?;
        match out.payload {
            Some(payload) => value::from_bytes(reference, payload.data.to_vec()),
            None => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret version has no payload".into(),
            }),
        }
    }
}
