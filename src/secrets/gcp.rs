//! The `GCP` store: Google Secret Manager, through the official `google-cloud-secretmanager-v1`
//! (HTTP/JSON) with Application Default Credentials.
//!
//! Access is governed by Google's IAM, as in Apono: a read needs only
//! `secretmanager.versions.access` (`roles/secretmanager.secretAccessor`). The read mark (label
//! `apono-connector-read=true`) is opt-in (`secrets.require_read_mark`); when asked for, it is read
//! with `GetSecret` before `AccessSecretVersion`, which also needs `secretmanager.secrets.get`.
//!
//! `secret_id` is a short id, or a full resource name as Apono's Terraform examples give it
//! (`projects/P/secrets/S`, `projects/P/locations/L/secrets/S`, optionally `/versions/V`).

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
    /// Whether a secret must carry the read mark (`secrets.require_read_mark` has `GCP`).
    require_mark: bool,
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
            require_mark: false,
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
            require_mark: false,
        }
    }

    /// Also require the read mark on every secret read (off by default).
    pub fn requiring_read_mark(mut self, require: bool) -> GcpStore {
        self.require_mark = require;
        self
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
                    "the connector's service account lacks {action} permission (reading needs \
                     roles/secretmanager.secretAccessor; with GCP in secrets.require_read_mark also \
                     secretmanager.secrets.get, e.g. roles/secretmanager.viewer) ({message})"
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
            // Only transient conditions are worth a retry; the rest is the request's fault.
            code @ (Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::Unknown) => SecretError::Unreachable {
                reference: describe,
                hint: format!("{action}: {code:?} ({message})"),
            },
            code => SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("Secret Manager refused {action} of {describe}: {code:?} ({message})"),
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
            400..=499 if code != 408 && code != 429 => SecretError::Misconfigured {
                store: "GCP".into(),
                hint: format!("Secret Manager answered {code} to {action} of {describe}: {err}"),
            },
            _ => SecretError::Unreachable {
                reference: describe,
                hint: format!("Secret Manager answered {code} to {action}: {err}"),
            },
        };
    }
    if err.is_binding() {
        // The client refused to build the request: the name is not a Secret Manager name.
        return SecretError::Malformed {
            reference: describe,
            hint: format!("the secret name is not a Secret Manager resource name ({action}): {err}"),
        };
    }
    SecretError::Unreachable {
        reference: describe,
        hint: format!("{action}: {err}"),
    }
}

/// The secret's resource name and the version to read: `secret_id` as a short id in `project`,
/// or a full resource name (its `/versions/V` suffix, when present, is the default version).
fn resource_name(project: &str, secret_id: &str, version: Option<&str>) -> (String, String) {
    let secret_id = secret_id.trim().trim_start_matches('/');
    let (name, named_version) = if secret_id.starts_with("projects/") {
        match secret_id.split_once("/versions/") {
            Some((name, v)) => (name.to_string(), Some(v)),
            None => (secret_id.to_string(), None),
        }
    } else {
        (format!("projects/{project}/secrets/{secret_id}"), None)
    };
    let version = version.or(named_version).unwrap_or("latest").to_string();
    (name, version)
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
        let (name, version) = resource_name(project, secret_id, version.as_deref());
        if self.require_mark {
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
                        "gcloud secrets update {name} --update-labels={}=true; \
                         or remove GCP from secrets.require_read_mark",
                        super::READ_MARK_KEY
                    ),
                ));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::resource_name;

    #[test]
    fn secret_id_may_be_a_full_resource_name() {
        let n = |id, v| resource_name("p", id, v);
        assert_eq!(n("s", None), ("projects/p/secrets/s".into(), "latest".into()));
        assert_eq!(
            n("projects/123/secrets/s", None),
            ("projects/123/secrets/s".into(), "latest".into())
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", None),
            ("projects/123/secrets/s".into(), "4".into())
        );
        assert_eq!(
            n("projects/123/secrets/s/versions/4", Some("2")),
            ("projects/123/secrets/s".into(), "2".into())
        );
        assert_eq!(
            n("projects/1/locations/eu/secrets/s", None),
            ("projects/1/locations/eu/secrets/s".into(), "latest".into())
        );
    }
}
