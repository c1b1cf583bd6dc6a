//! The `HASHICORP_VAULT` store: a KV (v1 or v2) entry in HashiCorp Vault or OpenBao.
//!
//! Vaults are defined in `HASHICORP_VAULT_CONFIG` (a JSON list) or in the file at
//! `HASHICORP_VAULT_CONFIG_FILE_PATH` (re-read when it changes). An entry is either a vault
//! (`address` + token, AppRole, Kubernetes, JWT, TLS certificate or AWS IAM auth, TLS options and a
//! client certificate; the logins are in `vault/auth.rs`) or `{"from_secret_store": ...}`: a
//! pointer to a secret in another store that holds such a definition. Those are resolved on first
//! use, not at start-up, so a connector starts even when that store is briefly unreachable; all at
//! once, so one slow store does not add up with the others; and again after a failure (with
//! backoff), so a transient failure heals without a restart.
//!
//! A reference that names no `vault` (Apono's never do) is served by the first definition that
//! holds the path; a vault that lacks it, refuses it or is unreachable passes to the next.
//!
//! A 403 with a token Vault no longer accepts re-reads every definition (the token may have been
//! rotated in the file or in the other store), logs in again and retries once; a 403 with a token
//! Vault still accepts is a policy denial and is reported as such, without a new login. The KV version of a mount is asked of
//! `sys/internal/ui/mounts/{mount}` (allowed by Vault's default policy) and remembered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{Secret, SecretError, SecretRef, SecretStore, value, wrong_store};
use crate::secrets::settings::{SecretsSettings, SettingsError};

const STORE: &str = "HASHICORP_VAULT";
const ENV_CONFIG: &str = "HASHICORP_VAULT_CONFIG";
const ENV_FILE: &str = "HASHICORP_VAULT_CONFIG_FILE_PATH";
const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

mod auth;
#[cfg(feature = "vault-aws-auth")]
mod aws_iam;

/// How the connector logs in to a vault.
#[derive(Clone)]
enum Auth {
    Token(SecretString),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: SecretString,
    },
    Kubernetes {
        mount: String,
        role: String,
        token_file: PathBuf,
    },
    /// Vault's `jwt` auth method (JWT/OIDC): a JWT signed by an issuer the mount trusts.
    Jwt {
        mount: String,
        /// None: the mount's `default_role`.
        role: Option<String>,
        jwt: auth::JwtSource,
    },
    /// Vault's `cert` auth method: the client certificate presented on the TLS connection.
    Cert {
        mount: String,
        /// The certificate role to log in as; None: any role whose CA signed the certificate.
        role: Option<String>,
    },
    /// Vault's `aws` auth method, `iam` type: a signed `sts:GetCallerIdentity` request.
    #[cfg(feature = "vault-aws-auth")]
    Aws(aws_iam::AwsIam),
}

impl Auth {
    /// The method's name as Vault's documentation spells it, for errors.
    fn method(&self) -> &'static str {
        match self {
            Auth::Token(_) => "token",
            Auth::AppRole { .. } => "AppRole",
            Auth::Kubernetes { .. } => "Kubernetes",
            Auth::Jwt { .. } => "JWT",
            Auth::Cert { .. } => "TLS certificate",
            #[cfg(feature = "vault-aws-auth")]
            Auth::Aws(_) => "AWS IAM",
        }
    }
}

/// One vault, parsed and checked. `Debug` is not derived: it holds credentials.
#[derive(Clone)]
struct Definition {
    address: url::Url,
    auth: Auth,
    /// PEM (or DER) bytes of the CA that signed the vault's certificate.
    ca_cert: Option<Vec<u8>>,
    skip_verify: bool,
    /// The client certificate presented on every connection (`cert` auth, or a listener or proxy
    /// that requires mTLS).
    client_identity: Option<auth::ClientIdentity>,
    namespace: Option<String>,
    name: Option<String>,
}

/// An entry of the configured list.
#[derive(Clone)]
enum Entry {
    Direct(Box<Definition>),
    /// A secret in another store holding a definition.
    FromSecretStore(SecretRef),
}

#[derive(Clone)]
enum Source {
    None,
    /// Parsed at start-up from `HASHICORP_VAULT_CONFIG`.
    Env(Vec<Entry>),
    /// Re-read from `HASHICORP_VAULT_CONFIG_FILE_PATH` when its modification time or size changes.
    File(PathBuf),
    /// The configuration was unusable (the lenient `SecretStores::default()` path).
    Broken(String),
}

/// The configured Vault definitions (not yet resolved or logged in).
#[derive(Clone)]
pub struct VaultDefinitions {
    source: Source,
    /// `VAULT_NAMESPACE`, for definitions that name no namespace.
    default_namespace: Option<String>,
}

impl VaultDefinitions {
    /// Parses `HASHICORP_VAULT_CONFIG` or the file at `HASHICORP_VAULT_CONFIG_FILE_PATH` (the
    /// variable wins when both are set).
    ///
    /// # Errors
    /// Malformed JSON or entries (naming the variable, the entry's index and the field), or an
    /// unreadable file.
    pub fn from_config(config: &SecretsSettings) -> Result<VaultDefinitions, SettingsError> {
        if let Some(text) = &config.hashicorp_vault_config {
            let entries = parse_list(text.expose_secret(), ENV_CONFIG).map_err(SettingsError)?;
            if config.hashicorp_vault_config_file_path.is_some() {
                tracing::warn!("both {ENV_CONFIG} and {ENV_FILE} are set; using {ENV_CONFIG}");
            }
            return Ok(VaultDefinitions {
                source: Source::Env(entries),
                default_namespace: default_namespace(config),
            });
        }
        if let Some(path) = &config.hashicorp_vault_config_file_path {
            read_file(path).map_err(SettingsError)?;
            return Ok(VaultDefinitions {
                source: Source::File(path.clone()),
                default_namespace: default_namespace(config),
            });
        }
        Ok(VaultDefinitions {
            source: Source::None,
            default_namespace: None,
        })
    }

    /// Definitions that fail every read with `why`.
    pub(crate) fn broken(why: String) -> VaultDefinitions {
        VaultDefinitions {
            source: Source::Broken(why),
            default_namespace: None,
        }
    }

    /// Parses a JSON list as `HASHICORP_VAULT_CONFIG` would hold it (tests, `check`).
    ///
    /// # Errors
    /// As [`VaultDefinitions::from_config`].
    pub fn parse(text: &str) -> Result<VaultDefinitions, SettingsError> {
        Ok(VaultDefinitions {
            source: Source::Env(parse_list(text, ENV_CONFIG).map_err(SettingsError)?),
            default_namespace: None,
        })
    }
}

/// `text` without the commas that directly precede a `}` or `]` (outside strings), and the 1-based
/// lines they were on.
fn strip_trailing_commas(text: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(text.len());
    let mut lines = Vec::new();
    let (mut in_string, mut escaped, mut line) = (false, false, 1);
    for (i, c) in text.char_indices() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == ',' && matches!(text[i + 1..].trim_start().chars().next(), Some('}' | ']')) {
            lines.push(line);
            continue;
        }
        out.push(c);
    }
    (out, lines)
}

fn default_namespace(config: &SecretsSettings) -> Option<String> {
    let ns = config.vault_namespace.as_deref()?.trim().trim_matches('/');
    (!ns.is_empty()).then(|| ns.to_string())
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_file(path: &Path) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{ENV_FILE}: cannot read {}: {e}", path.display()))?;
    parse_list(&text, &format!("{ENV_FILE} ({})", path.display()))
}

/// Parses the list. Errors name `origin`, the entry's index and the field, never a value (not even
/// serde_json's messages, which may quote the input).
fn parse_list(text: &str, origin: &str) -> Result<Vec<Entry>, String> {
    // Apono's documentation has a trailing comma in its `from_secret_store` example; users copy it.
    let (text, comma_lines) = strip_trailing_commas(text);
    if !comma_lines.is_empty() {
        let lines: Vec<String> = comma_lines.iter().map(ToString::to_string).collect();
        tracing::warn!(
            "{origin}: ignored a trailing comma (line {}); JSON does not allow it, remove it",
            lines.join(", ")
        );
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{origin} is not valid JSON (line {}, column {}): expected a list such as [{{\"address\":\"https://vault:8200\",\"token\":\"...\"}}]",
            e.line(),
            e.column()
        )
    })?;
    let Value::Array(items) = value else {
        return Err(format!("{origin} must be a JSON list of vault definitions"));
    };
    let mut problems = Vec::new();
    let mut entries = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(map) = item else {
            problems.push(format!("{origin}: entry {i} is not a JSON object"));
            continue;
        };
        match parse_entry(&map) {
            Ok(e) => entries.push(e),
            Err(e) => problems.push(format!("{origin}: entry {i}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(entries)
    } else {
        Err(problems.join("; "))
    }
}

fn field_str(map: &Map<String, Value>, names: &[&str]) -> Result<Option<String>, String> {
    for name in names {
        match map.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.trim().is_empty() => return Err(format!("field {name:?} is empty")),
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(_) => return Err(format!("field {name:?} must be a string")),
        }
    }
    Ok(None)
}

fn required(map: &Map<String, Value>, names: &[&str]) -> Result<String, String> {
    field_str(map, names)?.ok_or_else(|| format!("field {:?} is missing", names[0]))
}

fn check_fields(map: &Map<String, Value>, known: &[&str]) -> Result<(), String> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown field {k:?} (known: {})", known.join(", "))),
        None => Ok(()),
    }
}

fn parse_entry(map: &Map<String, Value>) -> Result<Entry, String> {
    let Some(store) = field_str(map, &["from_secret_store"])? else {
        return parse_definition(map).map(|d| Entry::Direct(Box::new(d)));
    };
    // Field names exactly as Apono documents them (with the reference's own names as aliases).
    let reference = match store.to_ascii_uppercase().as_str() {
        "AWS" => {
            check_fields(
                map,
                &[
                    "from_secret_store",
                    "region",
                    "secret_id",
                    "role_arn",
                    "external_id",
                    "profile",
                ],
            )?;
            SecretRef::Aws {
                region: required(map, &["region"])?,
                secret_id: required(map, &["secret_id"])?,
                role_arn: field_str(map, &["role_arn"])?,
                external_id: field_str(map, &["external_id"])?,
                profile: field_str(map, &["profile"])?,
            }
        }
        "GCP" => {
            check_fields(map, &["from_secret_store", "project", "secret_id", "version"])?;
            SecretRef::Gcp {
                project: required(map, &["project"])?,
                secret_id: required(map, &["secret_id"])?,
                version: field_str(map, &["version"])?,
            }
        }
        "AZURE" => {
            check_fields(map, &["from_secret_store", "AZURE_KEY_VAULT_URL", "vault_url", "name"])?;
            SecretRef::Azure {
                vault_url: required(map, &["AZURE_KEY_VAULT_URL", "vault_url"])?,
                name: required(map, &["name"])?,
            }
        }
        "KUBERNETES" => {
            check_fields(map, &["from_secret_store", "NAMESPACE", "namespace", "name"])?;
            SecretRef::Kubernetes {
                namespace: required(map, &["NAMESPACE", "namespace"])?,
                name: required(map, &["name"])?,
            }
        }
        other => {
            return Err(format!(
                "field \"from_secret_store\": unknown store {other:?} (expected AWS, GCP, AZURE or KUBERNETES)"
            ));
        }
    };
    Ok(Entry::FromSecretStore(reference))
}

const DEFINITION_FIELDS: &[&str] = &[
    "address",
    "token",
    "ca_cert_base64",
    "skip_verify",
    "namespace",
    "name",
    "auth",
    "role_id",
    "secret_id",
    "role",
    "token_file",
    "mount",
    "jwt",
    "jwt_file",
    "client_cert",
    "client_key",
    "client_cert_base64",
    "client_key_base64",
    "header_value",
    "region",
];

/// Fields that mean something to one method only: given with another, they would be silently
/// ignored, so the definition is refused instead.
const METHOD_FIELDS: &[(&str, &str)] = &[
    ("jwt", "jwt"),
    ("jwt_file", "jwt"),
    ("header_value", "aws"),
    ("region", "aws"),
];

fn parse_definition(map: &Map<String, Value>) -> Result<Definition, String> {
    check_fields(map, DEFINITION_FIELDS)?;
    let raw_address = required(map, &["address"])?;
    let address = url::Url::parse(raw_address.trim())
        .map_err(|e| format!("field \"address\" is not a URL ({e}); e.g. https://vault.example.com:8200"))?;
    if !matches!(address.scheme(), "http" | "https") {
        return Err("field \"address\" must start with http:// or https://".into());
    }
    let skip_verify = match map.get("skip_verify") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            _ => return Err("field \"skip_verify\" must be true or false".into()),
        },
        Some(_) => return Err("field \"skip_verify\" must be true or false".into()),
    };
    let ca_cert = match field_str(map, &["ca_cert_base64"])? {
        None => None,
        Some(b64) => {
            let bytes = decode_base64(&b64).ok_or_else(|| {
                "field \"ca_cert_base64\" is not base64 (encode the CA's PEM file with base64)".to_string()
            })?;
            let parses = if bytes.starts_with(b"-----BEGIN") {
                reqwest::Certificate::from_pem_bundle(&bytes).is_ok()
            } else {
                reqwest::Certificate::from_der(&bytes).is_ok()
            };
            if !parses {
                return Err("field \"ca_cert_base64\" does not hold a PEM or DER certificate".into());
            }
            Some(bytes)
        }
    };
    let client_identity = auth::ClientIdentity::parse(map)?;
    let auth_kind = field_str(map, &["auth"])?.map(|a| a.to_ascii_lowercase());
    let auth_kind = match auth_kind {
        Some(a) => a,
        None if map.contains_key("role_id") => "approle".into(),
        None => "token".into(),
    };
    for (field, method) in METHOD_FIELDS {
        if map.get(*field).is_some_and(|v| !v.is_null()) && auth_kind != *method {
            return Err(format!(
                "field {field:?} is only used with \"auth\": \"{method}\" (this definition's auth is {auth_kind:?})"
            ));
        }
    }
    let mount = |default: &str| -> Result<String, String> {
        Ok(field_str(map, &["mount"])?.map_or_else(|| default.to_string(), |m| m.trim_matches('/').to_string()))
    };
    let auth = match auth_kind.as_str() {
        "token" => Auth::Token(SecretString::from(required(map, &["token"])?)),
        "approle" => Auth::AppRole {
            mount: mount("approle")?,
            role_id: required(map, &["role_id"])?,
            secret_id: SecretString::from(required(map, &["secret_id"])?),
        },
        "kubernetes" => Auth::Kubernetes {
            mount: mount("kubernetes")?,
            role: required(map, &["role"])?,
            token_file: PathBuf::from(
                field_str(map, &["token_file"])?.unwrap_or_else(|| DEFAULT_K8S_TOKEN_FILE.into()),
            ),
        },
        "jwt" => Auth::Jwt {
            mount: mount("jwt")?,
            role: field_str(map, &["role"])?,
            jwt: auth::JwtSource::parse(map)?,
        },
        "cert" => {
            if address.scheme() != "https" {
                return Err(
                    "\"auth\": \"cert\" presents the client certificate over TLS: \"address\" must start with https://"
                        .into(),
                );
            }
            if client_identity.is_none() {
                return Err("\"auth\": \"cert\" needs the client certificate: set \"client_cert\" and \"client_key\" (PEM file paths) or \"client_cert_base64\" and \"client_key_base64\"".into());
            }
            Auth::Cert {
                mount: mount("cert")?,
                role: field_str(map, &["role"])?,
            }
        }
        #[cfg(feature = "vault-aws-auth")]
        "aws" => Auth::Aws(aws_iam::AwsIam {
            mount: mount("aws")?,
            role: field_str(map, &["role"])?,
            header_value: field_str(map, &["header_value"])?,
            region: field_str(map, &["region"])?,
        }),
        #[cfg(not(feature = "vault-aws-auth"))]
        "aws" => {
            return Err(
                "field \"auth\": this build has no AWS IAM auth for Vault (built without the cargo feature vault-aws-auth)"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "field \"auth\": unknown method {other:?} (expected token, approle, kubernetes, jwt, cert or aws)"
            ));
        }
    };
    Ok(Definition {
        address,
        auth,
        ca_cert,
        skip_verify,
        client_identity,
        namespace: field_str(map, &["namespace"])?,
        name: field_str(map, &["name"])?,
    })
}

/// Standard base64, line breaks allowed: `base64` wraps at 76 columns and Go's decoder (Apono's
/// connector) skips them.
fn decode_base64(b64: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.chars().filter(|c| !c.is_ascii_whitespace()).collect::<String>())
        .ok()
}

/// A vault ready to be used: the definition, its HTTP client, the login token and the KV versions
/// of its mounts.
struct Conn {
    def: Definition,
    http: reqwest::Client,
    /// The client certificate and key files as they were when `http` was built (None: none, or
    /// given inline): a renewed certificate (cert-manager, Vault Agent) means a new client.
    identity_stamp: Option<auth::IdentityStamp>,
    token: Mutex<Option<Held>>,
    kv_versions: Mutex<HashMap<String, u8>>,
    /// The AWS credential chain, built on the first AWS IAM login.
    #[cfg(feature = "vault-aws-auth")]
    aws_credentials: tokio::sync::OnceCell<aws_iam::Credentials>,
}

/// A token in use, and when to renew it (None: a configured token, or one that does not expire).
struct Held {
    token: SecretString,
    renew_at: Option<Instant>,
    renewable: bool,
}

impl Held {
    /// Renewed once two thirds of its life have passed, so a read never races its expiry.
    fn new(token: SecretString, lease_seconds: u64, renewable: bool) -> Held {
        let renew_at = (lease_seconds > 0).then(|| Instant::now() + Duration::from_secs(lease_seconds) * 2 / 3);
        Held {
            token,
            renew_at,
            renewable,
        }
    }
}

/// Vault's answer, before it becomes a `SecretError`.
enum ReadError {
    /// A 403 with a token Vault no longer accepts (expired, revoked, rotated): worth re-reading
    /// the definition and logging in again.
    Forbidden(String),
    /// A 403 with a token Vault still accepts: its policy denies the path, so logging in again
    /// would only spend a use of an AppRole secret ID.
    Denied(String),
    Other(SecretError),
}

impl Conn {
    fn new(def: Definition) -> Result<Conn, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tls_danger_accept_invalid_certs(def.skip_verify);
        if def.address.scheme() == "http" {
            // No TLS: skip loading the platform's roots (reqwest#2988, as vaultrs does).
            builder = builder.tls_certs_only(Vec::new());
        } else if let Some(ca) = &def.ca_cert {
            let certs = if ca.starts_with(b"-----BEGIN") {
                reqwest::Certificate::from_pem_bundle(ca).map_err(|e| format!("ca_cert_base64: {e}"))?
            } else {
                vec![reqwest::Certificate::from_der(ca).map_err(|e| format!("ca_cert_base64: {e}"))?]
            };
            builder = builder.tls_certs_merge(certs);
        }
        let mut identity_stamp = None;
        if let Some(identity) = &def.client_identity {
            let (identity, stamp) = identity.load()?;
            builder = builder.identity(identity);
            identity_stamp = stamp;
        }
        let http = builder.build().map_err(|e| {
            if def.client_identity.is_some() {
                format!("cannot build an HTTP client with the client certificate (does client_key belong to client_cert?): {e}")
            } else {
                format!("cannot build an HTTP client: {e}")
            }
        })?;
        Ok(Conn {
            def,
            http,
            identity_stamp,
            token: Mutex::new(None),
            kv_versions: Mutex::new(HashMap::new()),
            #[cfg(feature = "vault-aws-auth")]
            aws_credentials: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether the client certificate or key file changed since the client was built.
    fn identity_changed(&self) -> bool {
        self.identity_stamp.as_ref().is_some_and(auth::IdentityStamp::changed)
    }

    fn describe(&self) -> String {
        match &self.def.name {
            Some(n) => format!("{n} ({})", self.def.address),
            None => self.def.address.to_string(),
        }
    }

    fn matches(&self, wanted: &str) -> bool {
        let trim = |s: &str| s.trim_end_matches('/').to_string();
        self.def.name.as_deref() == Some(wanted) || trim(self.def.address.as_str()) == trim(wanted)
    }

    fn client(&self, token: &str) -> Result<VaultClient, String> {
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(self.def.address.as_str())
            .token(token)
            .verify(!self.def.skip_verify)
            .ca_certs(Vec::new())
            .identity(None)
            .timeout(Some(REQUEST_TIMEOUT))
            .namespace(self.def.namespace.clone());
        let settings = settings.build().map_err(|e| format!("vault client settings: {e}"))?;
        Ok(VaultClient {
            http: rustify::clients::reqwest::Client::new(self.def.address.as_str(), self.http.clone()),
            middle: vaultrs::api::EndpointMiddleware {
                token: token.to_string(),
                version: "v1".into(),
                wrap: None,
                namespace: self.def.namespace.clone(),
            },
            settings,
        })
    }

    /// The token to send: the configured one, or one from logging in, renewed before it expires
    /// (logged in again, and the old one revoked, when it cannot be renewed).
    async fn token(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        let mut slot = self.token.lock().await;
        let mut expiring = None;
        if let Some(held) = slot.as_ref() {
            match held.renew_at {
                Some(at) if Instant::now() >= at => {
                    if held.renewable
                        && let Ok(client) = self.client(held.token.expose_secret())
                    {
                        match vaultrs::token::renew_self(&client, None).await {
                            Ok(auth) => {
                                let renewed = Held::new(held.token.clone(), auth.lease_duration, auth.renewable);
                                let token = renewed.token.clone();
                                *slot = Some(renewed);
                                return Ok(token);
                            }
                            Err(e) => {
                                tracing::info!(vault = %self.describe(), error = %e, "cannot renew the vault token; logging in again");
                            }
                        }
                    }
                    expiring = Some(held.token.clone());
                }
                _ => return Ok(held.token.clone()),
            }
        }
        let held = self.login(reference).await?;
        if let Some(old) = expiring
            && let Ok(client) = self.client(old.expose_secret())
            && let Err(e) = vaultrs::token::revoke_self(&client).await
        {
            tracing::debug!(vault = %self.describe(), error = %e, "cannot revoke the replaced vault token");
        }
        let token = held.token.clone();
        *slot = Some(held);
        Ok(token)
    }

    /// The KV version of `mount`, from `sys/internal/ui/mounts` (None when Vault will not say).
    async fn kv_version(&self, mount: &str, token: &SecretString) -> Option<u8> {
        if let Some(v) = self.kv_versions.lock().await.get(mount) {
            return Some(*v);
        }
        let url = self
            .def
            .address
            .join(&format!("v1/sys/internal/ui/mounts/{}", mount.trim_matches('/')))
            .ok()?;
        let mut request = self.http.get(url).header("X-Vault-Token", token.expose_secret());
        if let Some(ns) = &self.def.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        let data = body.get("data")?;
        let version = match data.pointer("/options/version").and_then(Value::as_str) {
            Some("2") => 2,
            _ if data.get("type").and_then(Value::as_str) == Some("kv") => 1,
            _ => return None,
        };
        self.kv_versions.lock().await.insert(mount.to_string(), version);
        Some(version)
    }

    /// Whether Vault still accepts `token` (`auth/token/lookup-self`, allowed by the default
    /// policy). False when it cannot tell, so a doubtful token is replaced.
    async fn token_accepted(&self, token: &SecretString) -> bool {
        let Ok(url) = self.def.address.join("v1/auth/token/lookup-self") else {
            return false;
        };
        let mut request = self.http.get(url).header("X-Vault-Token", token.expose_secret());
        if let Some(ns) = &self.def.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        matches!(request.send().await, Ok(r) if r.status().is_success())
    }

    async fn read(&self, reference: &SecretRef, mount: &str, path: &str) -> Result<Secret, ReadError> {
        let token = self.token(reference).await.map_err(ReadError::Other)?;
        let client = self
            .client(token.expose_secret())
            .map_err(|e| ReadError::Other(misconfigured(&e)))?;
        let version = self.kv_version(mount, &token).await;
        let result = match version {
            Some(1) => vaultrs::kv1::get::<HashMap<String, Value>>(&client, mount, path).await,
            Some(_) => vaultrs::kv2::read::<HashMap<String, Value>>(&client, mount, path).await,
            None => match vaultrs::kv2::read::<HashMap<String, Value>>(&client, mount, path).await {
                Err(ClientError::APIError { code: 404, .. }) => {
                    vaultrs::kv1::get::<HashMap<String, Value>>(&client, mount, path).await
                }
                other => other,
            },
        };
        let describe = || reference.describe();
        match result {
            Ok(data) => value::from_json_map(reference, data).map_err(ReadError::Other),
            Err(ClientError::APIError { code: 403, errors }) => {
                let why = errors.join("; ");
                if self.token_accepted(&token).await {
                    Err(ReadError::Denied(why))
                } else {
                    Err(ReadError::Forbidden(why))
                }
            }
            Err(ClientError::APIError { code: 404, .. })
            | Err(ClientError::ResponseEmptyError)
            | Err(ClientError::ResponseDataEmptyError) => Err(ReadError::Other(SecretError::NotFound {
                reference: describe(),
                hint: format!(
                    "vault {} has no secret at {mount}/{path}{}",
                    self.describe(),
                    match version {
                        Some(v) => format!(" (a KV v{v} mount)"),
                        None => String::new(),
                    }
                ),
            })),
            Err(ClientError::JsonParseError { .. }) => Err(ReadError::Other(SecretError::Malformed {
                reference: describe(),
                hint: "the KV entry is not a map of keys to values".into(),
            })),
            Err(e) => Err(ReadError::Other(unreachable_error(reference, &self.describe(), &e))),
        }
    }
}

fn denied(reference: &SecretRef, why: &str, mount: &str, path: &str) -> SecretError {
    SecretError::NotPermitted {
        reference: reference.describe(),
        hint: format!(
            "{why}: the token's policy must allow \"read\" on {mount}/data/{path} (KV v2) or {mount}/{path} (KV v1)"
        ),
    }
}

fn misconfigured(hint: &str) -> SecretError {
    SecretError::Misconfigured {
        store: STORE.into(),
        hint: hint.to_string(),
    }
}

/// Connection, TLS and 5xx failures: the message chain (no bodies, no values).
fn unreachable_error(reference: &SecretRef, vault: &str, e: &ClientError) -> SecretError {
    let mut detail = crate::error_chain(e);
    if let ClientError::APIError { errors, .. } = e {
        detail.push_str(&format!(": {}", errors.join("; ")));
    }
    SecretError::Unreachable {
        reference: reference.describe(),
        hint: format!("vault {vault}: {detail}"),
    }
}

/// First wait before a failed definition is resolved again; doubled on each failure up to
/// `RETRY_MAX`, so a store that is down is not hammered, yet a transient failure heals quickly.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

enum SlotState {
    Unresolved,
    Ready(Arc<Conn>),
    /// Resolving failed at `at`; `error` is answered until `backoff` has passed.
    Failed {
        error: SecretError,
        at: Instant,
        backoff: Duration,
    },
}

/// One configured entry and what resolving it gave. Resolved on first use, not at start-up, and
/// resolved again after a failure (with backoff) rather than remembered as failed until a restart.
struct Slot {
    entry: Entry,
    state: Mutex<SlotState>,
}

impl Slot {
    async fn conn(&self, store: &VaultStore) -> Result<Arc<Conn>, SecretError> {
        // Held while resolving, so concurrent reads resolve a definition once.
        let mut state = self.state.lock().await;
        let previous = match &*state {
            SlotState::Ready(c) if c.identity_changed() => {
                tracing::info!(vault = %c.describe(), "the vault client certificate changed; reconnecting with it");
                None
            }
            SlotState::Ready(c) => return Ok(c.clone()),
            SlotState::Failed { error, at, backoff } if at.elapsed() < *backoff => return Err(error.clone()),
            SlotState::Failed { backoff, .. } => Some(*backoff),
            SlotState::Unresolved => None,
        };
        match store.resolve(self.entry.clone()).await {
            Ok(c) => {
                *state = SlotState::Ready(c.clone());
                Ok(c)
            }
            Err(error) => {
                let backoff = previous.map_or(RETRY_MIN, |b| (b * 2).min(RETRY_MAX));
                tracing::warn!(error = %error, retry_in_s = backoff.as_secs(), "cannot resolve a vault definition; will retry");
                *state = SlotState::Failed {
                    error: error.clone(),
                    at: Instant::now(),
                    backoff,
                };
                Err(error)
            }
        }
    }
}

/// The configured definitions, each resolved lazily.
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    slots: Vec<Slot>,
}

/// Reads HashiCorp Vault / OpenBao KV entries.
pub struct VaultStore {
    definitions: VaultDefinitions,
    /// The other stores, for `from_secret_store` definitions (read uncached).
    others: Vec<Arc<dyn SecretStore>>,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

impl VaultStore {
    /// `others` serve the `from_secret_store` entries.
    pub fn new(definitions: VaultDefinitions, others: Vec<Arc<dyn SecretStore>>) -> VaultStore {
        VaultStore {
            definitions,
            others,
            loaded: Mutex::new(None),
        }
    }

    async fn resolve(&self, entry: Entry) -> Result<Arc<Conn>, SecretError> {
        let mut def = match entry {
            Entry::Direct(def) => *def,
            Entry::FromSecretStore(reference) => {
                let store = self
                    .others
                    .iter()
                    .find(|s| s.store_type() == reference.store_type())
                    .ok_or_else(|| SecretError::Unsupported {
                        store: reference.store_type().to_string(),
                    })?;
                let secret = store.fetch(&reference).await?;
                let map: Map<String, Value> = secret
                    .keys()
                    .filter_map(|k| {
                        secret
                            .get(k)
                            .map(|v| (k.to_string(), Value::String(v.expose_secret().to_string())))
                    })
                    .collect();
                parse_definition(&map).map_err(|e| {
                    misconfigured(&format!(
                        "the vault definition held in {} is malformed: {e}",
                        reference.describe()
                    ))
                })?
            }
        };
        if def.namespace.is_none() {
            def.namespace.clone_from(&self.definitions.default_namespace);
        }
        Conn::new(def).map(Arc::new).map_err(|e| misconfigured(&e))
    }

    /// The definitions, re-read when the definitions file changed, or when `stale` (the set a
    /// caller got a 403 with) is still the current one: concurrent 403s reload once.
    async fn conns(&self, stale: Option<&Arc<Loaded>>) -> Result<Arc<Loaded>, SecretError> {
        let mut slot = self.loaded.lock().await;
        let force = match (stale, slot.as_ref()) {
            (Some(stale), Some(current)) => Arc::ptr_eq(stale, current),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let (entries, stamp) = match &self.definitions.source {
            Source::None => {
                return Err(misconfigured(&format!(
                    "no vault is configured: set {ENV_CONFIG} (a JSON list) or {ENV_FILE}"
                )));
            }
            Source::Broken(why) => return Err(misconfigured(why)),
            Source::Env(entries) => {
                if let (Some(loaded), false) = (slot.as_ref(), force) {
                    return Ok(loaded.clone());
                }
                (entries.clone(), None)
            }
            Source::File(path) => {
                let stamp = file_stamp(path);
                if let (Some(loaded), false) = (slot.as_ref(), force)
                    && loaded.stamp == stamp
                {
                    return Ok(loaded.clone());
                }
                let entries = read_file(path).map_err(|e| misconfigured(&e))?;
                tracing::info!(path = %path.display(), "vault definitions (re)read");
                (entries, stamp)
            }
        };
        if entries.is_empty() {
            return Err(misconfigured(&format!("{ENV_CONFIG} lists no vault")));
        }
        let slots = entries
            .into_iter()
            .map(|entry| Slot {
                entry,
                state: Mutex::new(SlotState::Unresolved),
            })
            .collect();
        let loaded = Arc::new(Loaded { stamp, slots });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// Every definition resolved, in parallel: one slow or unreachable store costs its own time
    /// once, not once per definition per read.
    async fn resolve_all(&self, loaded: &Loaded) -> Vec<Result<Arc<Conn>, SecretError>> {
        futures::future::join_all(loaded.slots.iter().map(|s| s.conn(self))).await
    }

    /// The vault named (or addressed) `wanted`.
    async fn pick(&self, loaded: &Loaded, wanted: &str) -> Result<Arc<Conn>, SecretError> {
        let conns = self.resolve_all(loaded).await;
        if let Some(c) = conns.iter().flatten().find(|c| c.matches(wanted)) {
            return Ok(c.clone());
        }
        if let Some(Err(e)) = conns.iter().find(|c| c.is_err()) {
            return Err(e.clone());
        }
        let known: Vec<String> = conns.iter().flatten().map(|c| c.describe()).collect();
        Err(misconfigured(&format!(
            "no vault named {wanted:?} is configured (known: {})",
            known.join(", ")
        )))
    }

    /// One attempt at the read. Without `wanted`, the definitions are tried in order (Apono's
    /// references name no vault, yet its documentation lists several): the first that holds the
    /// path serves it; a vault that lacks it, refuses it or cannot be reached passes to the next.
    async fn read_once(
        &self,
        loaded: &Loaded,
        reference: &SecretRef,
        wanted: Option<&str>,
        mount: &str,
        path: &str,
    ) -> Result<Secret, ReadError> {
        if let Some(wanted) = wanted {
            let conn = self.pick(loaded, wanted).await.map_err(ReadError::Other)?;
            return match conn.read(reference, mount, path).await {
                Err(ReadError::Forbidden(why)) => {
                    Err(ReadError::Forbidden(format!("vault {}: {why}", conn.describe())))
                }
                Err(ReadError::Denied(why)) => Err(ReadError::Denied(format!("vault {}: {why}", conn.describe()))),
                other => other,
            };
        }
        let conns = self.resolve_all(loaded).await;
        let several = conns.len() > 1;
        let (mut forbidden, mut denied, mut first_error, mut not_found) = (None, None, None, None);
        for conn in conns {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            match conn.read(reference, mount, path).await {
                Ok(s) => {
                    if several {
                        tracing::info!(vault = %conn.describe(), path = %format!("{mount}/{path}"), "read from the first configured vault that holds the path");
                    }
                    return Ok(s);
                }
                Err(ReadError::Forbidden(why)) => {
                    forbidden.get_or_insert(format!("vault {}: {why}", conn.describe()));
                }
                Err(ReadError::Denied(why)) => {
                    denied.get_or_insert(format!("vault {}: {why}", conn.describe()));
                }
                Err(ReadError::Other(e @ SecretError::NotFound { .. })) => {
                    not_found.get_or_insert(e);
                }
                Err(ReadError::Other(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(why) = forbidden {
            return Err(ReadError::Forbidden(why));
        }
        if let Some(why) = denied {
            return Err(ReadError::Denied(why));
        }
        match first_error.or(not_found) {
            Some(e) => Err(ReadError::Other(e)),
            None => Err(ReadError::Other(misconfigured(&format!("{ENV_CONFIG} lists no vault")))),
        }
    }
}

#[async_trait]
impl SecretStore for VaultStore {
    fn store_type(&self) -> &'static str {
        STORE
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::HashicorpVault {
            secret_engine,
            path,
            vault,
        } = reference
        else {
            return Err(wrong_store(reference, STORE));
        };
        let mount = secret_engine.trim_matches('/');
        let path = path.trim_matches('/');
        let loaded = self.conns(None).await?;
        match self.read_once(&loaded, reference, vault.as_deref(), mount, path).await {
            Ok(s) => return Ok(s),
            Err(ReadError::Other(e)) => return Err(e),
            Err(ReadError::Denied(why)) => return Err(denied(reference, &why, mount, path)),
            Err(ReadError::Forbidden(why)) => {
                tracing::info!(reason = %why, "vault answered 403; re-reading its definition and retrying once");
            }
        }
        let loaded = self.conns(Some(&loaded)).await?;
        match self.read_once(&loaded, reference, vault.as_deref(), mount, path).await {
            Ok(s) => Ok(s),
            Err(ReadError::Other(e)) => Err(e),
            Err(ReadError::Forbidden(why) | ReadError::Denied(why)) => Err(denied(reference, &why, mount, path)),
        }
    }
}
