//! The `AWS` store: AWS Secrets Manager.
//!
//! Credentials come from the SDK's default chain (environment, web identity / IRSA, ECS / EKS Pod
//! Identity, the shared config files' profile with static keys, `credential_process` (IAM Roles
//! Anywhere's signing helper) or SSO, then IMDS), and `AWS_ENDPOINT_URL` is honoured by the SDK
//! itself. A reference may name a `profile`. With `role_arn` the store assumes that role through
//! STS first, passing `external_id` when given. The gate: `DescribeSecret` must show the tag
//! `apono-connector-read=true` before `GetSecretValue` is called.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use tokio::sync::Mutex;

use super::{Secret, SecretError, SecretRef, SecretStore, is_marked, value, wrong_store};

/// Time limits on each request (the SDK retries a timed-out attempt up to 3 attempts in all).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(25);

/// What a client is built for: region, role, external ID, profile.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    region: String,
    role_arn: Option<String>,
    external_id: Option<String>,
    profile: Option<String>,
}

/// Reads AWS Secrets Manager. Clients are built on first use, one per [`ClientKey`].
pub struct AwsStore {
    /// A base configuration given by the caller (tests point it at moto); otherwise the SDK's
    /// defaults are loaded on first use.
    base: Option<SdkConfig>,
    clients: Mutex<HashMap<ClientKey, aws_sdk_secretsmanager::Client>>,
    /// Clients built so far (one per [`ClientKey`], shared by every job: issue 18).
    built: AtomicUsize,
}

impl Default for AwsStore {
    fn default() -> Self {
        AwsStore::new()
    }
}

impl AwsStore {
    /// The SDK's default configuration chain.
    pub fn new() -> AwsStore {
        AwsStore {
            base: None,
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
        }
    }

    /// Starts from `config` (endpoint, credentials) instead of the default chain; the reference's
    /// region still applies.
    pub fn with_sdk_config(config: SdkConfig) -> AwsStore {
        AwsStore {
            base: Some(config),
            clients: Mutex::new(HashMap::new()),
            built: AtomicUsize::new(0),
        }
    }

    /// How many SDK clients this store has built: one per region, role, external ID and profile.
    pub fn clients_built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    async fn client(&self, key: ClientKey) -> aws_sdk_secretsmanager::Client {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let region = Region::new(key.region.clone());
        let sdk = match &self.base {
            // A given configuration carries its own credentials: a profile does not apply.
            Some(base) => base.to_builder().region(region.clone()).build(),
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region.clone());
                if let Some(profile) = &key.profile {
                    loader = loader.profile_name(profile);
                }
                loader.load().await
            }
        };
        // The SDK's defaults set no time limit on a request (only 3.1 s to connect): a stalled
        // endpoint would hold the fetch until the registry's 60 s limit, hiding the cause.
        // Limits the caller set itself are kept.
        let mut timeouts = sdk
            .timeout_config()
            .cloned()
            .unwrap_or_else(|| TimeoutConfig::builder().build());
        timeouts.take_defaults_from(
            &TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
        let sdk = sdk.to_builder().timeout_config(timeouts).build();
        let mut conf = aws_sdk_secretsmanager::config::Builder::from(&sdk);
        if let Some(role) = &key.role_arn {
            let mut provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("apono-connector")
                .region(region);
            if let Some(id) = &key.external_id {
                provider = provider.external_id(id);
            }
            conf = conf.credentials_provider(provider.configure(&sdk).build().await);
        }
        let client = aws_sdk_secretsmanager::Client::from_conf(conf.build());
        self.built.fetch_add(1, Ordering::Relaxed);
        clients.insert(key, client.clone());
        client
    }
}

/// Maps an SDK error to ours. Service messages name the resource, never a value.
fn map_error<E>(reference: &SecretRef, action: &str, err: SdkError<E>) -> SecretError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let describe = reference.describe();
    let (region, secret_id) = match reference {
        SecretRef::Aws { region, secret_id, .. } => (region.as_str(), secret_id.as_str()),
        _ => ("<region>", "<secret>"),
    };
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown");
            let message = e.message().unwrap_or("").to_string();
            // A 403 whose body the SDK cannot read (a proxy, an IAM-style XML error) is a denial too.
            let code = if code == "Unknown" && service.raw().status().as_u16() == 403 {
                "AccessDeniedException"
            } else {
                code
            };
            match code {
                "ResourceNotFoundException" => SecretError::NotFound {
                    reference: describe,
                    hint: format!("Secrets Manager has no such secret in this region ({message})"),
                },
                // Apono's IAM policy grants both actions only on secrets tagged
                // apono-connector-read=true, so a missing tag looks like a missing permission.
                "AccessDeniedException" => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!(
                        "AWS denied secretsmanager:{action} ({message}). If the connector's IAM policy is \
                         conditioned on aws:ResourceTag/apono-connector-read (as Apono's is), add the tag \
                         apono-connector-read=true: aws secretsmanager tag-resource --region {region} \
                         --secret-id {secret_id} --tags Key=apono-connector-read,Value=true; otherwise \
                         grant secretsmanager:{action} on this secret"
                    ),
                },
                "DecryptionFailure" | "DecryptionFailureException" => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!(
                        "Secrets Manager cannot decrypt the secret: grant kms:Decrypt on the secret's KMS key \
                         to the connector's AWS identity ({message})"
                    ),
                },
                "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "ExpiredToken" => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!("AWS refused the connector's credentials: {code} ({message})"),
                },
                "InvalidRequestException" => SecretError::NotFound {
                    reference: describe,
                    hint: format!("the secret cannot be read now (deleted or scheduled for deletion?): {message}"),
                },
                "ThrottlingException" | "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" => {
                    SecretError::Unreachable {
                        reference: describe,
                        hint: format!("{code} ({message})"),
                    }
                }
                // Anything else is classed by its HTTP status: a 4xx is the request's fault
                // (InvalidParameterException, ValidationException, ...) and a retry cannot fix it.
                _ => {
                    let status = service.raw().status().as_u16();
                    if (400..500).contains(&status) && status != 429 {
                        SecretError::Misconfigured {
                            store: "AWS".into(),
                            hint: format!("{action} of {describe} was refused: {code} ({message})"),
                        }
                    } else {
                        SecretError::Unreachable {
                            reference: describe,
                            hint: format!("{action} failed: HTTP {status} {code} ({message})"),
                        }
                    }
                }
            }
        }
        // The request could not even be built (a region that is not a host label, a malformed
        // id): the reference's fault, which no retry fixes (secrets review N12).
        SdkError::ConstructionFailure(_) => SecretError::Misconfigured {
            store: "AWS".into(),
            hint: format!(
                "{action} of {describe} cannot be sent: {}; check the reference's region (e.g. eu-west-1) \
                 and secret_id",
                crate::error_chain(&err)
            ),
        },
        _ => {
            // The message chain (without the Debug dump DisplayErrorContext adds).
            let detail = crate::error_chain(&err);
            // The innermost one says why: an assumed role wraps its base credentials' error.
            let credentials = std::iter::successors(std::error::Error::source(&err), |s| s.source())
                .filter_map(|s| s.downcast_ref::<CredentialsError>())
                .last();
            let role = match reference {
                SecretRef::Aws {
                    role_arn: Some(role), ..
                } => Some(role.as_str()),
                _ => None,
            };
            match credentials {
                // No credentials at all is not something a retry fixes.
                Some(CredentialsError::CredentialsNotLoaded(_)) => SecretError::NotPermitted {
                    reference: describe,
                    hint: format!(
                        "no AWS credentials found (environment, web identity / IRSA, ECS / Pod Identity, profile, \
                         IMDS): {detail}"
                    ),
                },
                Some(CredentialsError::InvalidConfiguration(_)) => SecretError::Misconfigured {
                    store: "AWS".into(),
                    hint: format!("the AWS credentials configuration is invalid: {detail}"),
                },
                // STS (or a credential_process / SSO portal) answered with a refusal: with
                // `role_arn`, the role's trust policy or the external ID.
                Some(CredentialsError::ProviderError(_))
                    if detail.contains("service error") && !detail.contains("Throttl") =>
                {
                    SecretError::NotPermitted {
                        reference: describe,
                        hint: match role {
                            Some(role) => format!(
                                "AWS refused to let the connector assume {role}: check the role's trust policy (the \
                                 connector's principal, sts:ExternalId = the reference's external_id) and that the \
                                 connector may call sts:AssumeRole on it ({detail})"
                            ),
                            None => format!("AWS refused the connector's credentials: {detail}"),
                        },
                    }
                }
                _ => SecretError::Unreachable {
                    reference: describe,
                    hint: format!("{action}: {detail}"),
                },
            }
        }
    }
}

#[async_trait]
impl SecretStore for AwsStore {
    fn store_type(&self) -> &'static str {
        "AWS"
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::Aws {
            region,
            secret_id,
            role_arn,
            external_id,
            profile,
            version_stage,
            version_id,
        } = reference
        else {
            return Err(wrong_store(reference, "AWS"));
        };
        // Pasted from a console, a field may carry spaces around it (secrets review N12).
        let (region, secret_id) = (region.trim(), secret_id.trim());
        if region.is_empty() || secret_id.is_empty() {
            return Err(SecretError::Misconfigured {
                store: "AWS".into(),
                hint: format!(
                    "{} has an empty {}: give the secret's region (e.g. eu-west-1) and its name or ARN",
                    reference.describe(),
                    if region.is_empty() { "region" } else { "secret_id" }
                ),
            });
        }
        let client = self
            .client(ClientKey {
                region: region.to_string(),
                role_arn: role_arn.clone(),
                external_id: external_id.clone(),
                profile: profile.clone(),
            })
            .await;
        let described = client
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| map_error(reference, "DescribeSecret", e))?;
        let tags = described.tags();
        if !is_marked(tags.iter().map(|t| (t.key().unwrap_or(""), t.value().unwrap_or("")))) {
            return Err(SecretError::not_marked(
                reference,
                "tag",
                format!(
                    "aws secretsmanager tag-resource --region {region} --secret-id {secret_id} --tags Key=apono-connector-read,Value=true"
                ),
            ));
        }
        let mut out = client
            .get_secret_value()
            .secret_id(secret_id)
            .set_version_stage(version_stage.clone())
            .set_version_id(version_id.clone())
            .send()
            .await
            .map_err(|e| map_error(reference, "GetSecretValue", e))?;
        // Moved out of the answer, not copied: `from_text` zeroes it once parsed.
        if let Some(text) = out.secret_string.take() {
            return value::from_text(reference, text);
        }
        if out.secret_binary().is_some() {
            return Err(SecretError::Malformed {
                reference: reference.describe(),
                hint: "the secret is stored as SecretBinary; store it as SecretString (a JSON object of strings)"
                    .into(),
            });
        }
        Err(SecretError::Malformed {
            reference: reference.describe(),
            hint: "the secret has no value".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClientKey {
        ClientKey {
            region: "us-east-1".into(),
            role_arn: None,
            external_id: None,
            profile: None,
        }
    }

    /// The SDK sets no request time limit of its own; the store adds one, keeping the caller's.
    #[tokio::test]
    async fn clients_get_time_limits_unless_the_caller_set_them() {
        let plain = aws_config::defaults(BehaviorVersion::latest())
            .region("us-east-1")
            .load()
            .await;
        assert_eq!(plain.timeout_config().and_then(|t| t.operation_attempt_timeout()), None);
        let client = AwsStore::with_sdk_config(plain).client(key()).await;
        let t = client.config().timeout_config().cloned().expect("timeouts");
        assert_eq!(t.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(t.operation_timeout(), Some(OPERATION_TIMEOUT));

        let own = aws_config::defaults(BehaviorVersion::latest())
            .region("us-east-1")
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_millis(500))
                    .build(),
            )
            .load()
            .await;
        let client = AwsStore::with_sdk_config(own).client(key()).await;
        let t = client.config().timeout_config().cloned().expect("timeouts");
        assert_eq!(t.operation_attempt_timeout(), Some(Duration::from_millis(500)));
        assert_eq!(t.operation_timeout(), Some(OPERATION_TIMEOUT));
    }
}
