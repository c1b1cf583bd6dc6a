//! Vault's AWS IAM auth: the connector signs an `sts:GetCallerIdentity` request with its AWS
//! credentials (the SDK's default chain: environment, web identity/IRSA, profile, ECS, IMDS) and
//! hands it to Vault, which sends it to STS and learns who the caller is. The credentials never
//! leave the process; only the signature does.

use std::time::SystemTime;

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;
use serde_json::{Map, Value};

use super::{Conn, misconfigured};
use crate::secrets::{SecretError, SecretRef};

/// The credential chain, loaded once per vault.
pub(super) type Credentials = SharedCredentialsProvider;

/// The body Vault's aws method accepts: exactly this action and version.
const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";

#[derive(Clone)]
pub(super) struct AwsIam {
    pub(super) mount: String,
    /// None: Vault's default, a role named after the IAM principal.
    pub(super) role: Option<String>,
    /// Signed into the request as `X-Vault-AWS-IAM-Server-ID`, when the mount requires it.
    pub(super) header_value: Option<String>,
    /// The STS region to sign for (None: us-east-1 and the global endpoint, as Vault's CLI).
    pub(super) region: Option<String>,
}

/// The login fields, as Vault's `iam_*` parameters want them (base64 where Vault says so).
pub(super) struct LoginData {
    pub(super) method: String,
    pub(super) url: String,
    pub(super) headers: String,
    pub(super) body: String,
}

impl AwsIam {
    /// The STS endpoint and signing region, as Vault's own client picks them.
    fn endpoint(&self) -> (String, String) {
        match self.region.as_deref().map(str::trim) {
            None | Some("" | "us-east-1") => ("sts.amazonaws.com".into(), "us-east-1".into()),
            Some(r) if r.starts_with("cn-") => (format!("sts.{r}.amazonaws.com.cn"), r.into()),
            Some(r) => (format!("sts.{r}.amazonaws.com"), r.into()),
        }
    }

    pub(super) async fn login_data(&self, conn: &Conn, reference: &SecretRef) -> Result<LoginData, SecretError> {
        let provider = conn
            .aws_credentials
            .get_or_try_init(|| async {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(region) = &self.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                loader.load().await.credentials_provider().ok_or_else(|| {
                    misconfigured(&format!(
                        "AWS IAM auth for vault {}: the AWS SDK found no credential provider",
                        conn.describe()
                    ))
                })
            })
            .await?;
        let credentials = provider.provide_credentials().await.map_err(|e| {
            let hint = format!(
                "AWS IAM auth for vault {}: no AWS credentials ({}); give the connector an AWS identity (IRSA/web identity, a profile, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance/task role)",
                conn.describe(),
                crate::error_chain(&e)
            );
            match e {
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
                    SecretError::NotPermitted {
                        reference: reference.describe(),
                        hint,
                    }
                }
                _ => SecretError::Unreachable {
                    reference: reference.describe(),
                    hint,
                },
            }
        })?;
        self.sign(&credentials, SystemTime::now()).map_err(|e| {
            misconfigured(&format!(
                "AWS IAM auth for vault {}: cannot sign the request: {e}",
                conn.describe()
            ))
        })
    }

    /// The signed `GetCallerIdentity` request, shaped as `vault login -method=aws` sends it.
    fn sign(&self, credentials: &aws_credential_types::Credentials, time: SystemTime) -> Result<LoginData, String> {
        let (host, region) = self.endpoint();
        let url = format!("https://{host}/");
        let mut headers: Vec<(&str, String)> = vec![
            ("host", host.clone()),
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            ),
        ];
        if let Some(value) = &self.header_value {
            headers.push(("x-vault-aws-iam-server-id", value.clone()));
        }
        let identity = credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&region)
            .name("sts")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let request = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            SignableBody::Bytes(BODY.as_bytes()),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(request, &params).map_err(|e| e.to_string())?.into_parts();
        let signed: Vec<(String, String)> = instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Go's http.Header in JSON (what Vault decodes): canonical names, each with a list of values.
        let all: Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(signed)
            .map(|(k, v)| (canonical_header(&k), Value::Array(vec![Value::String(v)])))
            .collect();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        Ok(LoginData {
            method: "POST".into(),
            url: b64(&url),
            headers: b64(&Value::Object(all).to_string()),
            body: b64(BODY),
        })
    }
}

/// `x-amz-date` -> `X-Amz-Date`, as Go canonicalises header names.
fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request Vault forwards to STS: the body and headers it checks, the server-id header
    /// among the signed ones (Vault refuses it otherwise), the session token sent, the secret key
    /// nowhere.
    #[test]
    fn the_signed_request_has_the_shape_vault_checks() {
        let aws = AwsIam {
            mount: "aws".into(),
            role: Some("apono".into()),
            header_value: Some("vault.example.com".into()),
            region: None,
        };
        let credentials = aws_credential_types::Credentials::new(
            "AKIDEXAMPLE",
            "SECRET-canary-1",
            Some("SESSION-2".into()),
            None,
            "test",
        );
        let data = aws.sign(&credentials, SystemTime::UNIX_EPOCH).unwrap();
        let decode = |s: &str| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap();
        assert_eq!(data.method, "POST");
        assert_eq!(decode(&data.url), "https://sts.amazonaws.com/");
        assert_eq!(decode(&data.body), BODY);
        let headers: Value = serde_json::from_str(&decode(&data.headers)).unwrap();
        let one = |name: &str| {
            headers[name][0]
                .as_str()
                .unwrap_or_else(|| panic!("no {name}: {headers}"))
                .to_string()
        };
        assert_eq!(one("Host"), "sts.amazonaws.com");
        assert_eq!(one("X-Vault-Aws-Iam-Server-Id"), "vault.example.com");
        assert_eq!(one("X-Amz-Security-Token"), "SESSION-2");
        assert_eq!(one("X-Amz-Date"), "19700101T000000Z");
        let authorization = one("Authorization");
        assert!(
            authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/19700101/us-east-1/sts/aws4_request"),
            "{authorization}"
        );
        let signed = authorization
            .split("SignedHeaders=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        for header in ["host", "content-type", "x-amz-date", "x-vault-aws-iam-server-id"] {
            assert!(signed.split(';').any(|h| h == header), "{header} not signed: {signed}");
        }
        assert!(!decode(&data.headers).contains("canary"));

        let regional = AwsIam {
            region: Some("eu-west-1".into()),
            header_value: None,
            ..aws
        };
        let data = regional.sign(&credentials, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(decode(&data.url), "https://sts.eu-west-1.amazonaws.com/");
        let headers = decode(&data.headers);
        assert!(headers.contains("/eu-west-1/sts/aws4_request"), "{headers}");
        assert!(!headers.contains("X-Vault-Aws-Iam-Server-Id"), "{headers}");
    }
}
