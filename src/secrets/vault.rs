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
use secrecy::zeroize::{Zeroize, Zeroizing};
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
/// Each request to a vault; a stalled vault is named within seconds, not after the job's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One vault's whole part of a read (login, mount, read, a 403's check), below the registry's
/// 60 s so the next definition can still be tried.
const VAULT_DEADLINE: Duration = Duration::from_secs(20);
/// Resolving one `from_secret_store` definition (reading the other store, building the client).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

mod auth;
#[cfg(feature = "vault-aws-auth")]
mod aws_iam;

/// How the connector logs in to a vault.
#[derive(Clone)]
enum Auth {
    Token(SecretString),
    /// A file holding the token, kept fresh by someone else (a Vault Agent sink): re-read when it
    /// changes and after a 403.
    TokenFile(PathBuf),
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
            Auth::Token(_) | Auth::TokenFile(_) => "token",
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
    /// A digest of the definition as written (and of the CA file it names): a definitions file
    /// re-read with this entry unchanged keeps its client, login and mounts (issue 18).
    digest: [u8; 32],
}

/// An entry of the configured list.
#[derive(Clone)]
enum Entry {
    Direct(Box<Definition>),
    /// A secret in another store holding a definition.
    FromSecretStore(SecretRef),
}

impl Entry {
    /// Whether `other` is this entry as configured (so what was built for it still serves).
    fn same_as(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::Direct(a), Entry::Direct(b)) => a.digest == b.digest,
            (Entry::FromSecretStore(a), Entry::FromSecretStore(b)) => a == b,
            _ => false,
        }
    }
}

/// A file's modification time and size (None: it cannot be read).
type Stamp = Option<(SystemTime, u64)>;

#[derive(Clone)]
enum Source {
    None,
    /// Parsed at start-up from `HASHICORP_VAULT_CONFIG`.
    Env(Vec<Entry>),
    /// Re-read from `HASHICORP_VAULT_CONFIG_FILE_PATH` when its modification time or size changes;
    /// with what start-up read (and checked, and warned about) and the file's stamp then, used
    /// until the file changes instead of reading it again (one trailing-comma warning, not two).
    File(PathBuf, Option<(Stamp, Vec<Entry>)>),
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
                default_namespace: default_namespace(config)?,
            });
        }
        if let Some(path) = &config.hashicorp_vault_config_file_path {
            let stamp = file_stamp(path);
            let entries = read_file(path).map_err(SettingsError)?;
            return Ok(VaultDefinitions {
                source: Source::File(path.clone(), Some((stamp, entries))),
                default_namespace: default_namespace(config)?,
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

fn default_namespace(config: &SecretsSettings) -> Result<Option<String>, SettingsError> {
    let Some(ns) = config.vault_namespace.as_deref() else {
        return Ok(None);
    };
    let ns = header_safe("namespace", ns)
        .map_err(|e| SettingsError(format!("VAULT_NAMESPACE: {e}")))?
        .trim_matches('/')
        .to_string();
    Ok((!ns.is_empty()).then_some(ns))
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_file(path: &Path) -> Result<Vec<Entry>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{ENV_FILE}: cannot read {}: {e}", path.display()))?,
    );
    parse_list(&text, &format!("{ENV_FILE} ({})", path.display()))
}

/// Zeroes the strings of a parsed definition (tokens, secret IDs) before it is dropped: the
/// parsed `Definition` keeps its own copies in `SecretString`s.
fn zeroize_json(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(zeroize_json),
        Value::Object(map) => map.values_mut().for_each(zeroize_json),
        _ => {}
    }
}

/// Parses the list. Errors name `origin`, the entry's index and the field, never a value (not even
/// serde_json's messages, which may quote the input).
fn parse_list(text: &str, origin: &str) -> Result<Vec<Entry>, String> {
    // Pasted text (secrets review N23): a byte-order mark from Notepad is dropped; quotes kept
    // around the value (`docker run --env-file`, systemd's EnvironmentFile) and typographic
    // quotes are named, with where they are.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim();
    for quote in ['\'', '"'] {
        if trimmed.len() >= 2 && trimmed.starts_with(quote) && trimmed.ends_with(quote) {
            return Err(format!(
                "{origin} is wrapped in {quote} quotes: remove them (an env file or a docker --env-file keeps quotes as part of the value); it must start with ["
            ));
        }
    }
    // Apono's documentation has a trailing comma in its `from_secret_store` example; users copy it.
    let (text, comma_lines) = strip_trailing_commas(text);
    let text = Zeroizing::new(text);
    if !comma_lines.is_empty() {
        let lines: Vec<String> = comma_lines.iter().map(ToString::to_string).collect();
        tracing::warn!(
            "{origin}: ignored a trailing comma (line {}); JSON does not allow it, remove it",
            lines.join(", ")
        );
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{origin} is not valid JSON (line {}, column {}){}: expected a list such as [{{\"address\":\"https://vault:8200\",\"token\":\"...\"}}]",
            e.line(),
            e.column(),
            value::typographic_quote_hint(&text)
        )
    })?;
    let Value::Array(items) = value else {
        return Err(format!("{origin} must be a JSON list of vault definitions"));
    };
    let mut problems = Vec::new();
    let mut entries = Vec::new();
    for (i, mut item) in items.into_iter().enumerate() {
        let Value::Object(map) = &item else {
            problems.push(format!("{origin}: entry {i} is not a JSON object"));
            zeroize_json(&mut item);
            continue;
        };
        match parse_entry(map) {
            Ok(e) => entries.push(e),
            Err(e) => problems.push(format!("{origin}: entry {i}: {e}")),
        }
        zeroize_json(&mut item);
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

/// A value sent in an HTTP header (a token, a namespace): trimmed, since `--from-file` and editors
/// leave a trailing newline, and refused with the field's name when a control character remains
/// inside (vaultrs would panic on it). Never quotes the value.
pub(super) fn header_safe(field: &str, value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.chars().any(char::is_control) || reqwest::header::HeaderValue::from_str(value).is_err() {
        return Err(format!(
            "field {field:?} contains a control character (a line break or NUL inside the value?); store it without one"
        ));
    }
    Ok(value.to_string())
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
                    "version_stage",
                    "version_id",
                ],
            )?;
            SecretRef::Aws {
                region: required(map, &["region"])?,
                secret_id: required(map, &["secret_id"])?,
                role_arn: field_str(map, &["role_arn"])?,
                external_id: field_str(map, &["external_id"])?,
                profile: field_str(map, &["profile"])?,
                version_stage: field_str(map, &["version_stage"])?,
                version_id: field_str(map, &["version_id"])?,
            }
        }
        "GCP" => {
            check_fields(
                map,
                &["from_secret_store", "project", "secret_id", "version", "location"],
            )?;
            SecretRef::Gcp {
                project: required(map, &["project"])?,
                secret_id: required(map, &["secret_id"])?,
                version: field_str(map, &["version"])?,
                location: field_str(map, &["location"])?,
            }
        }
        "AZURE" => {
            check_fields(
                map,
                &[
                    "from_secret_store",
                    "AZURE_KEY_VAULT_URL",
                    "vault_url",
                    "name",
                    "version",
                ],
            )?;
            SecretRef::Azure {
                vault_url: required(map, &["AZURE_KEY_VAULT_URL", "vault_url"])?,
                name: required(map, &["name"])?,
                version: field_str(map, &["version"])?,
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
    "ca_cert_file",
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

/// The login fields each auth method reads. Any other of [`LOGIN_FIELDS`] given with a method
/// would be silently ignored (a `token` next to AppRole's IDs, a `role_id` with Kubernetes), so
/// the definition is refused, naming the field and the methods that use it (secrets review N16).
const METHOD_FIELDS: &[(&str, &[&str])] = &[
    ("token", &["token", "token_file"]),
    ("approle", &["role_id", "secret_id", "mount"]),
    ("kubernetes", &["role", "mount", "token_file"]),
    ("jwt", &["role", "mount", "jwt", "jwt_file"]),
    ("cert", &["role", "mount"]),
    ("aws", &["role", "mount", "header_value", "region"]),
];
const LOGIN_FIELDS: &[&str] = &[
    "token",
    "token_file",
    "role_id",
    "secret_id",
    "role",
    "mount",
    "jwt",
    "jwt_file",
    "header_value",
    "region",
];

/// The first login field of `map` that `method` does not use, as an error.
fn foreign_login_field(map: &Map<String, Value>, method: &str) -> Result<(), String> {
    let Some((_, used)) = METHOD_FIELDS.iter().find(|(m, _)| *m == method) else {
        return Ok(());
    };
    let Some(field) = LOGIN_FIELDS
        .iter()
        .find(|f| !used.contains(f) && map.get(**f).is_some_and(|v| !v.is_null()))
    else {
        return Ok(());
    };
    let users: Vec<String> = METHOD_FIELDS
        .iter()
        .filter(|(_, fields)| fields.contains(field))
        .map(|(m, _)| format!("\"{m}\""))
        .collect();
    Err(format!(
        "field {field:?} is only used with \"auth\": {} (this definition's auth is {method:?}); remove it or set the auth it belongs to",
        users.join(" or ")
    ))
}

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
    let ca_cert = match (field_str(map, &["ca_cert_base64"])?, field_str(map, &["ca_cert_file"])?) {
        (Some(_), Some(_)) => return Err("set either \"ca_cert_base64\" or \"ca_cert_file\", not both".into()),
        (None, None) => None,
        (Some(b64), None) => {
            let bytes = decode_base64(&b64).ok_or_else(|| {
                "field \"ca_cert_base64\" is not base64 (encode the CA's PEM file with base64)".to_string()
            })?;
            Some(checked_ca(bytes, "field \"ca_cert_base64\"")?)
        }
        // Read when the definition is parsed (start-up, or each re-read of the definitions), as
        // VAULT_CACERT is: a mounted ConfigMap or Secret, no base64 step.
        (None, Some(path)) => {
            let path = path.trim();
            let bytes = std::fs::read(path).map_err(|e| format!("field \"ca_cert_file\": cannot read {path}: {e}"))?;
            Some(checked_ca(bytes, &format!("field \"ca_cert_file\" ({path})"))?)
        }
    };
    let client_identity = auth::ClientIdentity::parse(map)?;
    let auth_kind = field_str(map, &["auth"])?.map(|a| a.to_ascii_lowercase());
    let auth_kind = match auth_kind {
        Some(a) => a,
        None if map.contains_key("role_id") => "approle".into(),
        None => "token".into(),
    };
    foreign_login_field(map, &auth_kind)?;
    let mount = |default: &str| -> Result<String, String> {
        Ok(field_str(map, &["mount"])?.map_or_else(|| default.to_string(), |m| m.trim_matches('/').to_string()))
    };
    let auth = match auth_kind.as_str() {
        "token" => match (field_str(map, &["token"])?, field_str(map, &["token_file"])?) {
            (Some(_), Some(_)) => return Err("set either \"token\" or \"token_file\", not both".into()),
            (Some(token), None) => Auth::Token(SecretString::from(header_safe("token", &token)?)),
            (None, Some(path)) => Auth::TokenFile(PathBuf::from(path.trim())),
            (None, None) => {
                return Err(
                    "field \"token\" is missing (or \"token_file\": a file holding it, such as a Vault Agent sink)"
                        .into(),
                );
            }
        },
        "approle" => Auth::AppRole {
            mount: mount("approle")?,
            role_id: header_safe("role_id", &required(map, &["role_id"])?)?,
            secret_id: SecretString::from(header_safe("secret_id", &required(map, &["secret_id"])?)?),
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
    let digest = {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(serde_json::to_vec(map).unwrap_or_default());
        hasher.update(ca_cert.as_deref().unwrap_or_default());
        hasher.finalize().into()
    };
    Ok(Definition {
        address,
        auth,
        ca_cert,
        skip_verify,
        client_identity,
        digest,
        namespace: field_str(map, &["namespace"])?
            .map(|ns| header_safe("namespace", &ns))
            .transpose()?,
        name: field_str(map, &["name"])?,
    })
}

/// `bytes` when they hold a PEM bundle or a DER certificate.
fn checked_ca(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>, String> {
    let parses = if bytes.starts_with(b"-----BEGIN") {
        reqwest::Certificate::from_pem_bundle(&bytes).is_ok()
    } else {
        reqwest::Certificate::from_der(&bytes).is_ok()
    };
    if parses {
        Ok(bytes)
    } else {
        Err(format!("{what} does not hold a PEM or DER certificate"))
    }
}

/// Standard base64, line breaks allowed: `base64` wraps at 76 columns and Go's decoder (Apono's
/// connector) skips them.
fn decode_base64(b64: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.chars().filter(|c| !c.is_ascii_whitespace()).collect::<String>())
        .ok()
}

/// A vault ready to be used: the definition, its HTTP client, the login token and the KV mounts
/// it was asked about.
struct Conn {
    def: Definition,
    http: reqwest::Client,
    /// The client certificate and key files as they were when `http` was built (None: none, or
    /// given inline): a renewed certificate (cert-manager, Vault Agent) means a new client.
    identity_stamp: Option<auth::IdentityStamp>,
    token: Mutex<Option<Held>>,
    /// By `secret_engine` as the reference wrote it.
    mounts: Mutex<HashMap<String, Mount>>,
    /// The AWS credential chain, built on the first AWS IAM login.
    #[cfg(feature = "vault-aws-auth")]
    aws_credentials: tokio::sync::OnceCell<aws_iam::Credentials>,
}

/// A token in use, and when to renew it (None: one that does not expire, or that someone else
/// renews).
struct Held {
    token: SecretString,
    renew_at: Option<Instant>,
    renewable: bool,
    /// For `token_file`: the file as it was when read; a change means a new token.
    file_stamp: Option<Option<(SystemTime, u64)>>,
}

impl Held {
    /// Renewed once two thirds of its life have passed, so a read never races its expiry.
    fn new(token: SecretString, lease_seconds: u64, renewable: bool) -> Held {
        let renew_at = (lease_seconds > 0).then(|| Instant::now() + Duration::from_secs(lease_seconds) * 2 / 3);
        Held {
            token,
            renew_at,
            renewable,
            file_stamp: None,
        }
    }
}

/// A KV mount as Vault describes it (`sys/internal/ui/mounts`).
#[derive(Clone)]
struct Mount {
    /// The mount's own path: `secret` for a `secret_engine` of `secret/data`.
    path: String,
    /// None when Vault would not say (a policy without `sys/internal/ui/mounts`).
    version: Option<u8>,
}

/// Vault's answer, before it becomes a `SecretError`.
enum ReadError {
    /// A 403 with a token Vault no longer accepts (expired, revoked, rotated): worth re-reading
    /// the definition and logging in again.
    Forbidden(String),
    /// A 403 with a token Vault still accepts: its policy denies the path (the hint says which),
    /// so logging in again would only spend a use of an AppRole secret ID.
    Denied(String),
    Other(SecretError),
}

/// Statuses worth retrying: throttling, a standby or a DR secondary (472, 473), 5xx.
fn retryable_status(code: u16) -> bool {
    code == 429 || code == 472 || code == 473 || code >= 500
}

/// The `errors` of a Vault error body.
fn vault_errors(body: Option<&Value>) -> String {
    body.and_then(|b| b.get("errors"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
}

impl Conn {
    fn new(def: Definition) -> Result<Conn, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tls_danger_accept_invalid_certs(def.skip_verify);
        if def.address.scheme() == "http" {
            // No TLS: skip loading the platform's roots (reqwest#2988, as vaultrs does).
            builder = builder.tls_certs_only(Vec::new());
        } else if let Some(ca) = &def.ca_cert {
            let certs = if ca.starts_with(b"-----BEGIN") {
                reqwest::Certificate::from_pem_bundle(ca).map_err(|e| format!("CA certificate: {e}"))?
            } else {
                vec![reqwest::Certificate::from_der(ca).map_err(|e| format!("CA certificate: {e}"))?]
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
            mounts: Mutex::new(HashMap::new()),
            #[cfg(feature = "vault-aws-auth")]
            aws_credentials: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether the client certificate or key file changed since the client was built.
    fn identity_changed(&self) -> bool {
        self.identity_stamp.as_ref().is_some_and(auth::IdentityStamp::changed)
    }

    fn describe(&self) -> String {
        self.def.describe()
    }

    fn matches(&self, wanted: &str) -> bool {
        self.def.matches(wanted)
    }

    fn is_configured_token(&self) -> bool {
        matches!(self.def.auth, Auth::Token(_) | Auth::TokenFile(_))
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

    /// The token to send: the configured one (renewed when Vault says it can be), the file's
    /// (re-read when the file changes), or one from logging in, renewed before it expires (logged
    /// in again, and the old one revoked, when it cannot be renewed).
    async fn token(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        let mut slot = self.token.lock().await;
        let mut expiring = None;
        if let Some(held) = slot.as_ref() {
            let file_changed = match (&self.def.auth, &held.file_stamp) {
                (Auth::TokenFile(path), Some(stamp)) => file_stamp(path) != *stamp,
                _ => false,
            };
            match held.renew_at {
                _ if file_changed => {
                    tracing::info!(vault = %self.describe(), "the vault token file changed; using its new token");
                }
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
                                tracing::warn!(vault = %self.describe(), error = %e, "cannot renew the vault token");
                            }
                        }
                    }
                    // A configured token is the only one there is: never revoke it.
                    if !self.is_configured_token() {
                        expiring = Some(held.token.clone());
                    }
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

    /// A configured token's life as Vault tells it (`auth/token/lookup-self`, allowed by the
    /// default policy): renewable ones are renewed like login tokens; one that will expire
    /// without renewal is reported ahead of time. A token Vault does not accept is kept as it is:
    /// the read's 403 then says so.
    async fn configured_token(&self, token: SecretString) -> Held {
        let lookup = match self.get(&token, "auth/token/lookup-self").await {
            Ok((200, Some(body))) => body,
            _ => return Held::new(token, 0, false),
        };
        let data = &lookup["data"];
        let ttl = data["ttl"].as_u64().unwrap_or(0);
        let renewable = data["renewable"].as_bool().unwrap_or(false);
        if ttl > 0 && !renewable && ttl < 24 * 3600 {
            tracing::warn!(
                vault = %self.describe(),
                expires_in_s = ttl,
                "the configured vault token cannot be renewed and expires within a day: issue a periodic token (vault token create -period=...) or use token_file, AppRole, Kubernetes or JWT auth"
            );
        }
        Held::new(token, ttl, renewable && ttl > 0)
    }

    /// A token from `token_file`, trimmed and checked.
    async fn file_token(&self, path: &Path) -> Result<Held, SecretError> {
        let stamp = file_stamp(path);
        let fail = |why: String| SecretError::Misconfigured {
            store: STORE.into(),
            hint: format!("token_file of vault {}: {why}", self.describe()),
        };
        let text = secrecy::zeroize::Zeroizing::new(
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?,
        );
        let token = header_safe("token", &text).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        if token.is_empty() {
            return Err(fail(format!(
                "{} is empty (has the Vault Agent written it yet?)",
                path.display()
            )));
        }
        let mut held = Held::new(SecretString::from(token), 0, false);
        held.file_stamp = Some(stamp);
        Ok(held)
    }

    /// GET `v1/{api_path}` with `token`: the status and the JSON body (None when it is not JSON).
    async fn get(&self, token: &SecretString, api_path: &str) -> Result<(u16, Option<Value>), reqwest::Error> {
        let url = self
            .def
            .address
            .join(&format!("v1/{api_path}"))
            .unwrap_or_else(|_| self.def.address.clone());
        let mut request = self.http.get(url).header("X-Vault-Token", token.expose_secret());
        if let Some(ns) = &self.def.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        // A KV answer holds the values: the body is zeroed once parsed.
        let bytes = Zeroizing::new(Vec::from(response.bytes().await?));
        Ok((status, serde_json::from_slice(&bytes).ok()))
    }

    fn unreachable(&self, reference: &SecretRef, what: &str, e: &reqwest::Error) -> ReadError {
        ReadError::Other(SecretError::Unreachable {
            reference: reference.describe(),
            hint: format!("vault {}: {what}: {}", self.describe(), crate::error_chain(e)),
        })
    }

    /// The mount `engine` names, from `sys/internal/ui/mounts/{engine}` (allowed by Vault's
    /// default policy), remembered. Only KV mounts are read: a GET on another engine
    /// (`database/creds/...`, `aws/creds/...`) can mint a credential.
    async fn mount(&self, reference: &SecretRef, engine: &str, token: &SecretString) -> Result<Mount, ReadError> {
        if let Some(m) = self.mounts.lock().await.get(engine) {
            return Ok(m.clone());
        }
        let (status, body) = self
            .get(token, &format!("sys/internal/ui/mounts/{engine}"))
            .await
            .map_err(|e| self.unreachable(reference, "asking for the mount", &e))?;
        let data = body.as_ref().map(|b| &b["data"]).filter(|_| status == 200);
        let Some(data) = data else {
            return Ok(Mount {
                path: engine.to_string(),
                version: None,
            });
        };
        let kind = data["type"].as_str().unwrap_or_default();
        let version = match kind {
            "kv" if data.pointer("/options/version").and_then(Value::as_str) == Some("2") => 2,
            "kv" | "generic" => 1,
            other => {
                return Err(ReadError::Other(misconfigured(&format!(
                    "{}: secret_engine {engine:?} of vault {} is a {other:?} engine, not KV; only KV mounts are read",
                    reference.describe(),
                    self.describe()
                ))));
            }
        };
        let mount = Mount {
            path: data["path"]
                .as_str()
                .map(|p| p.trim_matches('/').to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| engine.to_string()),
            version: Some(version),
        };
        self.mounts.lock().await.insert(engine.to_string(), mount.clone());
        Ok(mount)
    }

    /// Whether Vault still accepts `token` (`auth/token/lookup-self`, allowed by the default
    /// policy). False when it cannot tell, so a doubtful token is replaced.
    async fn token_accepted(&self, token: &SecretString) -> bool {
        matches!(self.get(token, "auth/token/lookup-self").await, Ok((200, _)))
    }

    /// Reads the KV entry at `path` under `engine`. KV v2 paths are accepted as the CLI writes
    /// them (`test/x`) and as the API and policies do (`data/test/x`, or an engine of
    /// `secret/data`).
    async fn read(&self, reference: &SecretRef, engine: &str, path: &str) -> Result<Secret, ReadError> {
        let token = self.token(reference).await.map_err(ReadError::Other)?;
        let mount = self.mount(reference, engine, &token).await?;
        let below = engine.strip_prefix(mount.path.as_str()).unwrap_or("").trim_matches('/');
        let mut path = if below.is_empty() {
            path.to_string()
        } else {
            format!("{below}/{path}")
        };
        if mount.version == Some(2)
            && let Some(rest) = path.strip_prefix("data/")
        {
            path = rest.to_string();
        }
        let m = &mount.path;
        let (api_path, version) = match mount.version {
            Some(1) => (format!("{m}/{path}"), 1),
            _ => (format!("{m}/data/{path}"), 2),
        };
        let mut answer = self
            .get(&token, &api_path)
            .await
            .map_err(|e| self.unreachable(reference, "reading", &e))?;
        let (mut api_path, mut version) = (api_path, version);
        if mount.version.is_none() && answer.0 == 404 {
            // Vault would not say which KV version: KV v1 then.
            api_path = format!("{m}/{path}");
            version = 1;
            answer = self
                .get(&token, &api_path)
                .await
                .map_err(|e| self.unreachable(reference, "reading", &e))?;
        }
        let describe = || reference.describe();
        let (status, mut body) = answer;
        match status {
            200 => {
                // Taken out of the body, not copied: its strings end up zeroed (value.rs).
                let pointer = if version == 2 { "/data/data" } else { "/data" };
                let data = body
                    .as_mut()
                    .map(|b| b.pointer_mut(pointer).map(Value::take).unwrap_or(Value::Null));
                match data {
                    Some(Value::Object(map)) => value::from_json_map(reference, map).map_err(ReadError::Other),
                    Some(Value::Null) if version == 2 && body.as_ref().is_some_and(|b| b["data"].is_object()) => {
                        Err(ReadError::Other(SecretError::NotFound {
                            reference: describe(),
                            hint: format!(
                                "the latest version at {api_path} in vault {} is deleted or destroyed; write a new version (vault kv put {m}/{path} ...)",
                                self.describe()
                            ),
                        }))
                    }
                    _ => Err(ReadError::Other(SecretError::Malformed {
                        reference: describe(),
                        hint: format!("{api_path} is not a KV entry (a map of keys to values)"),
                    })),
                }
            }
            404 => Err(ReadError::Other(SecretError::NotFound {
                reference: describe(),
                hint: format!(
                    "vault {} has no secret at {api_path} (KV v{version}{}; `vault kv get {m}/{path}` shows it)",
                    self.describe(),
                    if mount.version.is_some() { "" } else { ", guessed" },
                ),
            })),
            403 => {
                let why = vault_errors(body.as_ref());
                if self.token_accepted(&token).await {
                    Err(ReadError::Denied(format!(
                        "vault {}: {why}: the token's policy must allow \"read\" on {api_path}",
                        self.describe()
                    )))
                } else {
                    Err(ReadError::Forbidden(format!("vault {}: {why}", self.describe())))
                }
            }
            code if retryable_status(code) => Err(ReadError::Other(SecretError::Unreachable {
                reference: describe(),
                hint: format!(
                    "vault {} answered {code} for {api_path}: {}",
                    self.describe(),
                    vault_errors(body.as_ref())
                ),
            })),
            code => Err(ReadError::Other(misconfigured(&format!(
                "{}: vault {} answered {code} for {api_path}: {}; check secret_engine (a KV mount) and path",
                describe(),
                self.describe(),
                vault_errors(body.as_ref())
            )))),
        }
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

type Resolution = futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Conn>, SecretError>>>;

enum SlotState {
    Unresolved,
    /// Being resolved by a task of its own, which records the outcome whether or not anyone
    /// still waits for it (a read cut off by its deadline must not leave the slot unresolved).
    Resolving(Resolution),
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
    index: usize,
    entry: Entry,
    state: std::sync::Mutex<SlotState>,
    /// The backoff of the last failure, for the next one.
    last_backoff: std::sync::Mutex<Option<Duration>>,
}

/// What resolving a definition needs, shared with the resolution tasks.
struct Resolver {
    /// The other stores, for `from_secret_store` definitions (read uncached).
    others: Vec<Arc<dyn SecretStore>>,
    default_namespace: Option<String>,
    /// How long resolving one definition may take.
    timeout: Duration,
    /// Vault clients built so far (one per definition as configured: issue 18).
    built: Arc<std::sync::atomic::AtomicUsize>,
}

impl Slot {
    /// The connection, or the resolution under way (started here when needed).
    fn poll_state(self: &Arc<Self>, resolver: &Arc<Resolver>) -> Result<Result<Arc<Conn>, SecretError>, Resolution> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*state {
            SlotState::Ready(c) if c.identity_changed() => {
                tracing::info!(vault = %c.describe(), "the vault client certificate changed; reconnecting with it");
            }
            SlotState::Ready(c) => return Ok(Ok(c.clone())),
            SlotState::Failed { error, at, backoff } if at.elapsed() < *backoff => return Ok(Err(error.clone())),
            SlotState::Resolving(r) => return Err(r.clone()),
            SlotState::Failed { .. } | SlotState::Unresolved => {}
        }
        let (slot, resolver) = (self.clone(), resolver.clone());
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout(resolver.timeout, resolver.resolve(slot.entry.clone())).await {
                Ok(r) => r,
                Err(_) => Err(SecretError::Unreachable {
                    reference: slot.entry.describe(),
                    hint: format!("no answer within {:?}", resolver.timeout),
                }),
            };
            slot.record(&result);
            result
        });
        let resolution: Resolution = futures::FutureExt::shared(Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(misconfigured(&format!("resolving a vault definition failed: {e}"))))
        }) as futures::future::BoxFuture<'static, _>);
        *state = SlotState::Resolving(resolution.clone());
        Err(resolution)
    }

    fn record(&self, result: &Result<Arc<Conn>, SecretError>) {
        let mut last = self
            .last_backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = match result {
            Ok(c) => {
                *last = None;
                SlotState::Ready(c.clone())
            }
            Err(error) => {
                let backoff = last.map_or(RETRY_MIN, |b| (b * 2).min(RETRY_MAX));
                *last = Some(backoff);
                tracing::warn!(definition = self.index, error = %error, retry_in_s = backoff.as_secs(), "cannot resolve a vault definition; will retry");
                SlotState::Failed {
                    error: error.clone(),
                    at: Instant::now(),
                    backoff,
                }
            }
        };
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }

    /// Starts resolving in the background when needed, without waiting.
    fn start(self: &Arc<Self>, resolver: &Arc<Resolver>) {
        let _ = self.poll_state(resolver);
    }

    /// The connection: resolved (with its own deadline) or remembered.
    async fn conn(self: &Arc<Self>, resolver: &Arc<Resolver>) -> Result<Arc<Conn>, SecretError> {
        match self.poll_state(resolver) {
            Ok(result) => result,
            Err(resolution) => resolution.await,
        }
    }
}

impl Entry {
    /// For errors and logs: where the definition is, never what it holds.
    fn describe(&self) -> String {
        match self {
            Entry::Direct(def) => format!("vault {}", def.describe()),
            Entry::FromSecretStore(r) => format!("the vault definition in {}", r.describe()),
        }
    }
}

impl Definition {
    fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} ({})", self.address),
            None => self.address.to_string(),
        }
    }

    fn matches(&self, wanted: &str) -> bool {
        let trim = |s: &str| s.trim_end_matches('/').to_string();
        self.name.as_deref() == Some(wanted) || trim(self.address.as_str()) == trim(wanted)
    }
}

impl Resolver {
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
                let mut definition = definition_in_secret(&secret).map_err(|e| {
                    misconfigured(&format!(
                        "the vault definition held in {} is malformed: {e}",
                        reference.describe()
                    ))
                })?;
                let parsed = match &definition {
                    Value::Object(map) => parse_definition(map),
                    _ => Err("not a JSON object".into()),
                };
                zeroize_json(&mut definition);
                parsed.map_err(|e| {
                    misconfigured(&format!(
                        "the vault definition held in {} is malformed: {e}",
                        reference.describe()
                    ))
                })?
            }
        };
        if def.namespace.is_none() {
            def.namespace.clone_from(&self.default_namespace);
        }
        let conn = Conn::new(def).map(Arc::new).map_err(|e| misconfigured(&e))?;
        self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }
}

/// The definition a `from_secret_store` secret holds, as a JSON object: its keys, or (secrets
/// review N8) the object or one-element list that a plain-text secret holds under `value`, the
/// shape of `HASHICORP_VAULT_CONFIG` which users naturally store.
fn definition_in_secret(secret: &Secret) -> Result<Value, String> {
    let keys: Vec<&str> = secret.keys().collect();
    if keys != [value::PLAIN_VALUE_KEY] {
        return Ok(Value::Object(
            keys.iter()
                .filter_map(|k| {
                    secret
                        .get(k)
                        .map(|v| (k.to_string(), Value::String(v.expose_secret().to_string())))
                })
                .collect(),
        ));
    }
    let text = secret
        .get(value::PLAIN_VALUE_KEY)
        .map(ExposeSecret::expose_secret)
        .unwrap_or_default();
    let shape = "the secret must hold one JSON object such as {\"address\":\"https://vault:8200\",\"token\":\"...\"}";
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "{shape} (it is not JSON: line {}, column {}{})",
            e.line(),
            e.column(),
            value::typographic_quote_hint(text)
        )
    })?;
    match &mut parsed {
        Value::Array(items) if items.len() == 1 && items[0].is_object() => Ok(items.remove(0)),
        Value::Array(items) => {
            let n = items.len();
            zeroize_json(&mut parsed);
            Err(format!(
                "{shape}; it holds a list of {n} entries (the HASHICORP_VAULT_CONFIG shape): keep one definition per secret and list each secret in HASHICORP_VAULT_CONFIG"
            ))
        }
        Value::Object(_) => Ok(parsed),
        _ => {
            zeroize_json(&mut parsed);
            Err(shape.to_string())
        }
    }
}

/// The configured definitions, each resolved lazily.
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    slots: Vec<Arc<Slot>>,
}

/// Reads HashiCorp Vault / OpenBao KV entries.
pub struct VaultStore {
    definitions: VaultDefinitions,
    resolver: Arc<Resolver>,
    /// How long one vault may take over its part of a read (login, mount, read).
    vault_deadline: Duration,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

impl VaultStore {
    /// `others` serve the `from_secret_store` entries.
    pub fn new(definitions: VaultDefinitions, others: Vec<Arc<dyn SecretStore>>) -> VaultStore {
        VaultStore {
            resolver: Arc::new(Resolver {
                others,
                default_namespace: definitions.default_namespace.clone(),
                timeout: RESOLVE_TIMEOUT,
                built: Arc::default(),
            }),
            definitions,
            vault_deadline: VAULT_DEADLINE,
            loaded: Mutex::new(None),
        }
    }

    /// Shorter deadlines (tests of stalled stores): resolving one definition, and one vault's
    /// part of a read.
    #[cfg(test)]
    pub(crate) fn with_deadlines(mut self, resolve: Duration, vault: Duration) -> VaultStore {
        self.resolver = Arc::new(Resolver {
            others: self.resolver.others.clone(),
            default_namespace: self.resolver.default_namespace.clone(),
            timeout: resolve,
            built: self.resolver.built.clone(),
        });
        self.vault_deadline = vault;
        self
    }

    /// How many vault clients this store has built: one per definition, kept while the
    /// definition is unchanged; again after a 403 with a token the vault no longer accepts.
    pub fn clients_built(&self) -> usize {
        self.resolver.built.load(std::sync::atomic::Ordering::Relaxed)
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
            Source::File(path, first) => {
                let stamp = file_stamp(path);
                if let (Some(loaded), false) = (slot.as_ref(), force)
                    && loaded.stamp == stamp
                {
                    return Ok(loaded.clone());
                }
                match first {
                    Some((first_stamp, entries)) if slot.is_none() && *first_stamp == stamp => (entries.clone(), stamp),
                    _ => {
                        let entries = read_file(path).map_err(|e| misconfigured(&e))?;
                        tracing::info!(path = %path.display(), "vault definitions (re)read");
                        (entries, stamp)
                    }
                }
            }
        };
        if entries.is_empty() {
            return Err(misconfigured(&format!("{ENV_CONFIG} lists no vault")));
        }
        // A re-read file keeps what was built for the entries it did not change (their clients,
        // logins and mounts); after a 403 (`force`) everything is resolved again.
        let previous = slot
            .as_ref()
            .filter(|_| !force)
            .map(|l| l.slots.clone())
            .unwrap_or_default();
        let slots = entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| match previous.get(index) {
                Some(kept) if kept.entry.same_as(&entry) => kept.clone(),
                _ => Arc::new(Slot {
                    index,
                    entry,
                    state: std::sync::Mutex::new(SlotState::Unresolved),
                    last_backoff: std::sync::Mutex::new(None),
                }),
            })
            .collect();
        let loaded = Arc::new(Loaded { stamp, slots });
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// The vault named (or addressed) `wanted`. Direct definitions are matched without being
    /// resolved; only `from_secret_store` ones must be read to know their names.
    async fn pick(&self, loaded: &Loaded, wanted: &str) -> Result<Arc<Conn>, SecretError> {
        for slot in &loaded.slots {
            if let Entry::Direct(def) = &slot.entry
                && def.matches(wanted)
            {
                return slot.conn(&self.resolver).await;
            }
        }
        let pointers: Vec<&Arc<Slot>> = loaded
            .slots
            .iter()
            .filter(|s| matches!(s.entry, Entry::FromSecretStore(_)))
            .collect();
        let conns = futures::future::join_all(pointers.iter().map(|s| s.conn(&self.resolver))).await;
        if let Some(c) = conns.iter().flatten().find(|c| c.matches(wanted)) {
            return Ok(c.clone());
        }
        let known: Vec<String> = loaded
            .slots
            .iter()
            .zip(std::iter::repeat(()))
            .filter_map(|(s, ())| match &s.entry {
                Entry::Direct(def) => Some(def.describe()),
                Entry::FromSecretStore(_) => None,
            })
            .chain(conns.iter().flatten().map(|c| c.describe()))
            .collect();
        let unresolved: Vec<String> = conns
            .iter()
            .filter_map(|c| c.as_ref().err())
            .map(ToString::to_string)
            .collect();
        let mut hint = format!("no vault named {wanted:?} is configured (known: {})", known.join(", "));
        if !unresolved.is_empty() {
            // One of those may be the vault asked for: worth retrying.
            hint.push_str(&format!(
                "; some definitions could not be read: {}",
                unresolved.join("; ")
            ));
            return Err(SecretError::Unreachable {
                reference: format!("vault {wanted:?}"),
                hint,
            });
        }
        Err(misconfigured(&hint))
    }

    /// One vault's part of a read, within its own deadline.
    async fn read_from(
        &self,
        conn: &Conn,
        reference: &SecretRef,
        engine: &str,
        path: &str,
    ) -> Result<Secret, ReadError> {
        match tokio::time::timeout(self.vault_deadline, conn.read(reference, engine, path)).await {
            Ok(result) => result,
            Err(_) => Err(ReadError::Other(SecretError::Unreachable {
                reference: reference.describe(),
                hint: format!(
                    "vault {} did not answer within {:?}",
                    conn.describe(),
                    self.vault_deadline
                ),
            })),
        }
    }

    /// One attempt at the read. Without `wanted`, the definitions are tried in order (Apono's
    /// references name no vault, yet its documentation lists several): the first that holds the
    /// path serves it. A definition is waited for only when those before it lacked the path or
    /// failed (the rest are resolved in the background), so a stalled one never delays a read
    /// that an earlier vault serves. A vault that fails is skipped with a warning naming it.
    async fn read_once(
        &self,
        loaded: &Loaded,
        reference: &SecretRef,
        wanted: Option<&str>,
        engine: &str,
        path: &str,
    ) -> Result<Secret, ReadError> {
        if let Some(wanted) = wanted {
            let conn = self.pick(loaded, wanted).await.map_err(ReadError::Other)?;
            return self.read_from(&conn, reference, engine, path).await;
        }
        for slot in &loaded.slots {
            slot.start(&self.resolver);
        }
        let several = loaded.slots.len() > 1;
        let (mut forbidden, mut denied, mut failures, mut not_found) = (None, None, Vec::new(), Vec::new());
        for slot in &loaded.slots {
            let conn = match slot.conn(&self.resolver).await {
                Ok(c) => c,
                Err(e) => {
                    let what = format!("definition {} ({})", slot.index, slot.entry.describe());
                    failures.push((format!("{what}: {e}"), e));
                    continue;
                }
            };
            let skipped = |why: &str| {
                if several {
                    tracing::warn!(vault = %conn.describe(), reason = %why, "skipping a vault that cannot serve the path; trying the next definition");
                }
            };
            match self.read_from(&conn, reference, engine, path).await {
                Ok(s) => {
                    if several {
                        tracing::info!(vault = %conn.describe(), path = %format!("{engine}/{path}"), "read from the first configured vault that holds the path");
                    }
                    return Ok(s);
                }
                Err(ReadError::Forbidden(why)) => {
                    skipped(&why);
                    forbidden.get_or_insert(why);
                }
                Err(ReadError::Denied(why)) => {
                    skipped(&why);
                    denied.get_or_insert(why);
                }
                Err(ReadError::Other(SecretError::NotFound { hint, .. })) => not_found.push(hint),
                Err(ReadError::Other(e)) => {
                    skipped(&e.to_string());
                    failures.push((e.to_string(), e));
                }
            }
        }
        if let Some(why) = forbidden {
            return Err(ReadError::Forbidden(why));
        }
        if let Some(why) = denied {
            return Err(ReadError::Denied(why));
        }
        let retryable = failures.iter().any(|(_, e)| e.retryable());
        let failed: Vec<&str> = failures.iter().map(|(text, _)| text.as_str()).collect();
        let error = match (not_found.is_empty(), failures.first()) {
            (true, None) => misconfigured(&format!("{ENV_CONFIG} lists no vault")),
            (false, None) => SecretError::NotFound {
                reference: reference.describe(),
                hint: not_found.join("; "),
            },
            // A vault that could not be asked may hold the path: retry then.
            (false, Some(_)) if retryable => SecretError::Unreachable {
                reference: reference.describe(),
                hint: format!("{}; and not asked: {}", not_found.join("; "), failed.join("; ")),
            },
            (false, Some(_)) => SecretError::NotFound {
                reference: reference.describe(),
                hint: format!("{}; and not asked: {}", not_found.join("; "), failed.join("; ")),
            },
            (true, Some((_, only))) if failures.len() == 1 => only.clone(),
            (true, Some(_)) if retryable => SecretError::Unreachable {
                reference: reference.describe(),
                hint: failed.join("; "),
            },
            (true, Some((_, first))) => first.clone(),
        };
        Err(ReadError::Other(error))
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
        let engine = secret_engine.trim().trim_matches('/');
        let path = path.trim().trim_matches('/');
        let loaded = self.conns(None).await?;
        match self.read_once(&loaded, reference, vault.as_deref(), engine, path).await {
            Ok(s) => return Ok(s),
            Err(ReadError::Other(e)) => return Err(e),
            Err(ReadError::Denied(why)) => return Err(denied(reference, &why)),
            Err(ReadError::Forbidden(why)) => {
                tracing::info!(reason = %why, "vault answered 403; re-reading its definition and retrying once");
            }
        }
        let loaded = self.conns(Some(&loaded)).await?;
        match self.read_once(&loaded, reference, vault.as_deref(), engine, path).await {
            Ok(s) => Ok(s),
            Err(ReadError::Other(e)) => Err(e),
            Err(ReadError::Denied(why)) => Err(denied(reference, &why)),
            Err(ReadError::Forbidden(why)) => Err(SecretError::NotPermitted {
                reference: reference.describe(),
                hint: format!(
                    "{why}: the vault does not accept the token (expired, revoked or mistyped): issue a new one (a periodic token is renewed by the connector), or use token_file, AppRole, Kubernetes or JWT auth"
                ),
            }),
        }
    }
}

fn denied(reference: &SecretRef, why: &str) -> SecretError {
    SecretError::NotPermitted {
        reference: reference.describe(),
        hint: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// Secrets review N19: the parsed JSON of a definition (a token, a secret ID) is wiped once the
    /// definition keeps its own copies, nested strings included.
    #[test]
    fn a_parsed_definition_is_wiped() {
        let mut value = json!({"token": "canary-token", "nested": [{"secret_id": "canary-id"}], "skip_verify": true});
        super::zeroize_json(&mut value);
        assert_eq!(
            value,
            json!({"token": "", "nested": [{"secret_id": ""}], "skip_verify": true})
        );
    }
}
