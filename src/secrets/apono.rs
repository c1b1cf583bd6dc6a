//! The `APONO` store: credentials delivered inline with the integration (not for production, as
//! Apono's own docs say: the control plane then holds them).

use async_trait::async_trait;

use super::{Secret, SecretError, SecretRef, SecretStore};

pub struct AponoStore;

#[async_trait]
impl SecretStore for AponoStore {
    fn store_type(&self) -> &'static str {
        "APONO"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        match reference {
            SecretRef::Apono { credentials } if credentials.0.is_empty() => Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the inline credentials are empty: give the integration's keys (for Rancher: access_key and secret_key, or token)".into(),
            }),
            SecretRef::Apono { credentials } => Ok(Secret::new(credentials.0.clone())),
            other => Err(SecretError::Unsupported { store: other.store_type().to_string() }),
        }
    }
}
