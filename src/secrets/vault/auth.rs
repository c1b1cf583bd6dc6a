//! Logging in to a vault with each auth method, and the client certificate a connection presents.

use std::path::PathBuf;
use std::time::SystemTime;

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use vaultrs::api::AuthInfo;
use vaultrs::error::ClientError;

use super::{Auth, Conn, Held, STORE, decode_base64, field_str, misconfigured, unreachable_error};
use crate::secrets::{SecretError, SecretRef};

/// Where the JWT of `"auth": "jwt"` comes from.
#[derive(Clone)]
pub(super) enum JwtSource {
    /// Re-read at each login: projected service-account tokens and CI tokens rotate.
    File(PathBuf),
    Inline(SecretString),
}

impl JwtSource {
    pub(super) fn parse(map: &Map<String, Value>) -> Result<JwtSource, String> {
        match (field_str(map, &["jwt_file"])?, field_str(map, &["jwt"])?) {
            (Some(_), Some(_)) => Err("set either \"jwt_file\" or \"jwt\", not both".into()),
            (Some(path), None) => Ok(JwtSource::File(PathBuf::from(path))),
            (None, Some(jwt)) => Ok(JwtSource::Inline(SecretString::from(jwt.trim().to_string()))),
            (None, None) => Err(
                "\"auth\": \"jwt\" needs \"jwt_file\" (a file holding the JWT, re-read at each login) or \"jwt\""
                    .into(),
            ),
        }
    }

    async fn read(&self, vault: &str) -> Result<SecretString, SecretError> {
        let path = match self {
            JwtSource::Inline(jwt) => return Ok(jwt.clone()),
            JwtSource::File(path) => path,
        };
        let fail = |why: String| SecretError::Misconfigured {
            store: STORE.into(),
            hint: format!("JWT auth for vault {vault}: {why}"),
        };
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| fail(format!("cannot read jwt_file {}: {e}", path.display())))?;
        let jwt = text.trim();
        if jwt.is_empty() {
            return Err(fail(format!("jwt_file {} is empty", path.display())));
        }
        Ok(SecretString::from(jwt.to_string()))
    }
}

/// A PEM certificate or key: a file (re-read when it changes) or inline (`*_base64`).
#[derive(Clone)]
enum Pem {
    File(PathBuf),
    /// Held as a secret: for the key it is one.
    Inline(SecretString),
}

/// The client certificate and its key.
#[derive(Clone)]
pub(super) struct ClientIdentity {
    cert: Pem,
    key: Pem,
}

/// The certificate and key files' modification times and sizes when they were read.
pub(super) struct IdentityStamp(Vec<(PathBuf, Option<(SystemTime, u64)>)>);

impl IdentityStamp {
    pub(super) fn changed(&self) -> bool {
        self.0.iter().any(|(path, stamp)| super::file_stamp(path) != *stamp)
    }
}

impl ClientIdentity {
    /// `client_cert`/`client_key` (PEM file paths) or `client_cert_base64`/`client_key_base64`;
    /// None when neither is set. Inline values are checked here; files when the vault is first used.
    pub(super) fn parse(map: &Map<String, Value>) -> Result<Option<ClientIdentity>, String> {
        let cert = pem_field(map, "client_cert")?;
        let key = pem_field(map, "client_key")?;
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err("a client certificate needs its key: set \"client_key\" (or \"client_key_base64\")".into());
            }
            (None, Some(_)) => {
                return Err(
                    "a client key needs its certificate: set \"client_cert\" (or \"client_cert_base64\")".into(),
                );
            }
        };
        if let (Pem::Inline(c), Pem::Inline(k)) = (&cert, &key) {
            identity_from(c.expose_secret().as_bytes(), k.expose_secret().as_bytes())
                .map_err(|e| format!("fields \"client_cert_base64\" and \"client_key_base64\": {e}"))?;
        }
        Ok(Some(ClientIdentity { cert, key }))
    }

    /// The identity for reqwest, and the files' stamps (None when both are inline).
    pub(super) fn load(&self) -> Result<(reqwest::Identity, Option<IdentityStamp>), String> {
        let mut stamps = Vec::new();
        let mut read = |pem: &Pem, field: &str| -> Result<Zeroizing<Vec<u8>>, String> {
            match pem {
                Pem::Inline(text) => Ok(Zeroizing::new(text.expose_secret().as_bytes().to_vec())),
                Pem::File(path) => {
                    let stamp = super::file_stamp(path);
                    let bytes = std::fs::read(path).map_err(|e| {
                        format!("cannot read the {field} file {}: {e} (a PEM file path)", path.display())
                    })?;
                    stamps.push((path.clone(), stamp));
                    Ok(Zeroizing::new(bytes))
                }
            }
        };
        let cert = read(&self.cert, "client_cert")?;
        let key = read(&self.key, "client_key")?;
        let identity = identity_from(&cert, &key).map_err(|e| format!("client_cert/client_key: {e}"))?;
        Ok((identity, (!stamps.is_empty()).then_some(IdentityStamp(stamps))))
    }
}

fn pem_field(map: &Map<String, Value>, field: &str) -> Result<Option<Pem>, String> {
    let inline_field = format!("{field}_base64");
    match (field_str(map, &[field])?, field_str(map, &[inline_field.as_str()])?) {
        (Some(_), Some(_)) => Err(format!("set either {field:?} or {inline_field:?}, not both")),
        (Some(path), None) => Ok(Some(Pem::File(PathBuf::from(path)))),
        (None, Some(b64)) => {
            let text = decode_base64(&b64)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .filter(|text| text.contains("-----BEGIN"))
                .ok_or_else(|| format!("field {inline_field:?} is not a base64-encoded PEM file"))?;
            Ok(Some(Pem::Inline(SecretString::from(text))))
        }
        (None, None) => Ok(None),
    }
}

/// reqwest's identity from a PEM certificate (chain) and key. Only the certificate and key
/// sections are passed on: reqwest refuses others, such as the `EC PARAMETERS` block that
/// `openssl ecparam -genkey` writes before the key.
fn identity_from(cert: &[u8], key: &[u8]) -> Result<reqwest::Identity, String> {
    let mut pem = Zeroizing::new(Vec::with_capacity(cert.len() + key.len()));
    let mut keys = 0;
    let mut certs = 0;
    for source in [key, cert] {
        let text = String::from_utf8_lossy(source);
        let mut keep = false;
        for line in text.lines() {
            if let Some(label) = line.trim().strip_prefix("-----BEGIN ") {
                keep = matches!(
                    label.trim_end_matches('-'),
                    "CERTIFICATE" | "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY"
                );
                if keep {
                    if label.starts_with("CERTIFICATE") {
                        certs += 1;
                    } else {
                        keys += 1;
                    }
                }
            }
            if keep {
                pem.extend_from_slice(line.trim().as_bytes());
                pem.push(b'\n');
            }
            if line.trim().starts_with("-----END ") {
                keep = false;
            }
        }
    }
    if certs == 0 {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in the certificate".into());
    }
    if keys == 0 {
        return Err("no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC) in the key".into());
    }
    reqwest::Identity::from_pem(&pem).map_err(|_| "the certificate or key is not valid PEM".into())
}

impl Held {
    fn from_login(auth: AuthInfo) -> Held {
        Held::new(
            SecretString::from(auth.client_token),
            auth.lease_duration,
            auth.renewable,
        )
    }
}

impl Conn {
    /// A token from the definition's auth method (the configured one for `token`).
    pub(super) async fn login(&self, reference: &SecretRef) -> Result<Held, SecretError> {
        let anonymous = || self.client("").map_err(|e| misconfigured(&e));
        let refused = |e: ClientError| self.login_error(reference, e);
        match &self.def.auth {
            Auth::Token(t) => Ok(self.configured_token(t.clone()).await),
            Auth::TokenFile(path) => self.file_token(path).await,
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => vaultrs::auth::approle::login(&anonymous()?, mount, role_id, secret_id.expose_secret())
                .await
                .map(Held::from_login)
                .map_err(refused),
            Auth::Kubernetes {
                mount,
                role,
                token_file,
            } => {
                let jwt = tokio::fs::read_to_string(token_file)
                    .await
                    .map_err(|e| SecretError::Misconfigured {
                        store: STORE.into(),
                        hint: format!(
                            "Kubernetes auth for vault {}: cannot read the service account token {}: {e}",
                            self.describe(),
                            token_file.display()
                        ),
                    })?;
                vaultrs::auth::kubernetes::login(&anonymous()?, mount, role, jwt.trim())
                    .await
                    .map(Held::from_login)
                    .map_err(refused)
            }
            Auth::Jwt { mount, role, jwt } => {
                let jwt = jwt.read(&self.describe()).await?;
                vaultrs::auth::oidc::login(&anonymous()?, mount, jwt.expose_secret(), role.clone())
                    .await
                    .map(Held::from_login)
                    .map_err(refused)
            }
            Auth::Cert { mount, role } => self.cert_login(reference, mount, role.as_deref()).await,
            #[cfg(feature = "vault-aws-auth")]
            Auth::Aws(aws) => {
                let data = aws.login_data(self, reference).await?;
                vaultrs::auth::aws::iam_login(
                    &anonymous()?,
                    &aws.mount,
                    &data.method,
                    &data.url,
                    &data.headers,
                    &data.body,
                    aws.role.as_deref(),
                )
                .await
                .map(Held::from_login)
                .map_err(refused)
            }
        }
    }

    /// `auth/{mount}/login` of the cert method, by hand: vaultrs sends the role as `cert_name`,
    /// which Vault ignores (its parameter is `name`).
    async fn cert_login(&self, reference: &SecretRef, mount: &str, role: Option<&str>) -> Result<Held, SecretError> {
        let url = self
            .def
            .address
            .join(&format!("v1/auth/{mount}/login"))
            .map_err(|e| misconfigured(&format!("field \"mount\" {mount:?}: {e}")))?;
        let body = match role {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        };
        let mut request = self.http.post(url).json(&body);
        if let Some(ns) = &self.def.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        let response = request.send().await.map_err(|e| SecretError::Unreachable {
            reference: reference.describe(),
            hint: format!("vault {}: {}", self.describe(), crate::error_chain(&e)),
        })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let errors = body["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
                .unwrap_or_default();
            return Err(self.login_error(
                reference,
                ClientError::APIError {
                    code: status.as_u16(),
                    errors,
                },
            ));
        }
        let auth: AuthInfo = serde_json::from_value(body["auth"].clone()).map_err(|_| SecretError::Unreachable {
            reference: reference.describe(),
            hint: format!(
                "vault {}: its TLS certificate login answer holds no token",
                self.describe()
            ),
        })?;
        Ok(Held::from_login(auth))
    }

    /// A refused login (4xx) is the configuration's fault: not retryable, naming the method, the
    /// role and what to check. Throttling, 5xx and network failures are retryable.
    pub(super) fn login_error(&self, reference: &SecretRef, e: ClientError) -> SecretError {
        let auth = &self.def.auth;
        match e {
            ClientError::APIError { code, errors } if code < 500 && code != 429 => {
                let role = match auth {
                    Auth::Kubernetes { role, .. } => Some(role.as_str()),
                    Auth::Jwt { role, .. } | Auth::Cert { role, .. } => role.as_deref(),
                    #[cfg(feature = "vault-aws-auth")]
                    Auth::Aws(aws) => aws.role.as_deref(),
                    Auth::Token(_) | Auth::TokenFile(_) | Auth::AppRole { .. } => None,
                };
                let role = role.map(|r| format!(" as role {r:?}")).unwrap_or_default();
                SecretError::NotPermitted {
                    reference: reference.describe(),
                    hint: format!(
                        "{} login to vault {}{role} refused ({code}: {}); {}",
                        auth.method(),
                        self.describe(),
                        errors.join("; "),
                        login_fix(auth)
                    ),
                }
            }
            other => unreachable_error(reference, &self.describe(), &other),
        }
    }
}

fn login_fix(auth: &Auth) -> &'static str {
    match auth {
        Auth::Token(_) | Auth::TokenFile(_) => "check the token",
        Auth::AppRole { .. } => "check role_id and secret_id (a secret ID expires or runs out of uses)",
        Auth::Kubernetes { .. } => {
            "check the role's bound service account names and namespaces, and that Vault can call the TokenReview API"
        }
        Auth::Jwt { .. } => {
            "check the role's bound_audiences, bound_subject or bound_claims, that the JWT has not expired, and that the mount trusts its signer (jwt_validation_pubkeys, jwks_url or oidc_discovery_url)"
        }
        Auth::Cert { .. } => {
            "check that a certificate role of the mount trusts the CA that signed client_cert, and that the certificate has not expired"
        }
        #[cfg(feature = "vault-aws-auth")]
        Auth::Aws(_) => {
            "check that the role has auth_type iam and is bound to this AWS identity (bound_iam_principal_arn), that region matches the mount's STS region, and header_value the mount's iam_server_id_header_value"
        }
    }
}
