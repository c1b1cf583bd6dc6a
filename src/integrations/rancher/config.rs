//! The integration's settings and its API key.
//!
//! Parsing is pure (no network, no filesystem, no credentials): [`RancherConfig::from_value`] runs
//! when a config or an access request is loaded, so a bad config is refused before any job runs.
//! Every problem found is reported at once, each naming its key.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use crate::integrations::IntegrationError;
use crate::secrets::Secret;

/// Rancher caps `limit` at 10000 (rancher/norman `parse/collection.go`).
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// Large pages keep the number of round trips low: every v3 page costs the server a full list.
pub const DEFAULT_PAGE_SIZE: u32 = 5_000;
pub const DEFAULT_CONCURRENCY: usize = 8;
pub const MAX_CONCURRENCY: usize = 64;
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
pub const DEFAULT_CONNECT_TIMEOUT_SECONDS: u64 = 10;
/// How long a grant waits for a new binding's `status.summary` to reach `Completed` (2.11+).
pub const DEFAULT_STATUS_TIMEOUT_SECONDS: u64 = 10;
/// How long discovery gives one cluster's namespace listing (all pages, its one retry included).
/// Short on purpose: a disconnected cluster stalls 20-40 s before Rancher answers 500
/// (rancher `pkg/dialer/factory.go`), and it must not hold a request slot that long.
pub const DEFAULT_CLUSTER_TIMEOUT_SECONDS: u64 = 10;
/// How old (on Rancher's clock) a binding of this connector that no access claims must be before
/// the reconcile removes it: longer than a sweep job takes from its hand-out (when the control
/// plane listed the accesses) to its listing, so a grant that started meanwhile keeps its binding.
pub const DEFAULT_UNCLAIMED_GRACE_SECONDS: u64 = 300;
/// Apono's limit on the instructions shown to end users.
pub const MAX_CUSTOM_ACCESS_DETAILS: usize = 400;

/// Keys this integration reads. Anything else is refused by name, so a typo does not pass silently.
const KNOWN_KEYS: &[&str] = &[
    "host",
    "port",
    "certificate_authority",
    "ui_url",
    "custom_access_details",
    "credential_rotation_days",
    "user_cleanup_days",
    "page_size",
    "concurrency",
    "max_requests",
    "timeout_seconds",
    "connect_timeout_seconds",
    "status_timeout_seconds",
    "new_user_roles",
    "insecure_http",
    "cluster_timeout_seconds",
    "unclaimed_grace_seconds",
];

/// Which global roles the users the agent creates get, so they can log in
/// (`new_user_roles` in the integration config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NewUserRoles {
    /// `"user-base"` (the default): the login-only global role. Never `user`, which can create
    /// clusters and own them beyond the access (rancher-api-notes §6).
    #[default]
    UserBase,
    /// `"newUserDefault"`: the global roles the install marks `newUserDefault: true`, with
    /// `user` replaced by `user-base`; `user-base` when none is marked.
    NewUserDefault,
}

impl NewUserRoles {
    pub const KEY: &'static str = "new_user_roles";

    fn parse(s: &str) -> Result<NewUserRoles, String> {
        match s {
            "user-base" => Ok(NewUserRoles::UserBase),
            "newUserDefault" => Ok(NewUserRoles::NewUserDefault),
            other => Err(format!(
                "{} {other:?} is not known: use \"user-base\" (the login-only role, the default) or \
                 \"newUserDefault\" (the global roles the install gives new users)",
                NewUserRoles::KEY
            )),
        }
    }
}

/// A validated Rancher integration config.
#[derive(Debug, Clone, PartialEq)]
pub struct RancherConfig {
    /// Origin of the Rancher API (`https://rancher.example.com:443`), with no trailing slash.
    pub base_url: Url,
    /// PEM bundle added to the trust roots (a private CA), if given.
    pub certificate_authority: Option<String>,
    /// Where people log in, shown in access details; defaults to the API origin.
    pub ui_url: Option<Url>,
    pub custom_access_details: Option<String>,
    /// Consumed by the control plane; validated here only.
    pub credential_rotation_days: Option<f64>,
    /// Consumed by the control plane; validated here only.
    pub user_cleanup_days: Option<f64>,
    pub page_size: u32,
    pub concurrency: usize,
    /// Cap on requests in flight to this Rancher, shared by every job for it (see
    /// [`super::client::Endpoint`]).
    pub max_requests: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub status_timeout: Duration,
    /// The global roles of the users the agent creates.
    pub new_user_roles: NewUserRoles,
    /// Discovery's deadline for one cluster's namespaces; a cluster past it is skipped.
    pub cluster_timeout: Duration,
    /// See [`DEFAULT_UNCLAIMED_GRACE_SECONDS`].
    pub unclaimed_grace: Duration,
}

impl RancherConfig {
    /// Parses and validates the `config` object of a Rancher integration. Pure: no network.
    ///
    /// # Errors
    /// `Config`, listing every problem found, each naming its key.
    pub fn from_value(v: &Value) -> Result<RancherConfig, IntegrationError> {
        let empty = Map::new();
        let map = match v {
            Value::Object(m) => m,
            Value::Null => &empty,
            other => {
                return Err(config_err(vec![format!(
                    "the Rancher config must be an object with at least \"host\", got {}",
                    kind_of(other)
                )]));
            }
        };
        let mut errors = Vec::new();
        for key in map.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                errors.push(format!("unknown key {key:?} (known keys: {})", KNOWN_KEYS.join(", ")));
            }
        }

        let insecure_http = match map.get("insecure_http") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if matches!(s.trim(), "true" | "false") => s.trim() == "true",
            Some(other) => {
                errors.push(format!("insecure_http must be true or false, got {other}"));
                false
            }
        };
        let port = match opt_uint(map, "port", &mut errors) {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => {
                errors.push(format!("port must be between 1 and 65535, got {p}"));
                None
            }
            None => None,
        };
        let base_url = match opt_string(map, "host", &mut errors) {
            None => {
                errors.push("host is required: the Rancher server's hostname (rancher.example.com)".into());
                None
            }
            Some(host) => match parse_host(&host, port, insecure_http) {
                Ok(u) => Some(u),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        let certificate_authority = opt_string(map, "certificate_authority", &mut errors);
        if let Some(pem) = &certificate_authority {
            match reqwest::Certificate::from_pem_bundle(pem.as_bytes()) {
                Ok(certs) if !certs.is_empty() && pem.contains("-----BEGIN CERTIFICATE-----") => {}
                _ => errors.push(
                    "certificate_authority is not a PEM certificate (expected -----BEGIN CERTIFICATE----- ...)".into(),
                ),
            }
        }
        let ui_url = opt_string(map, "ui_url", &mut errors).and_then(|s| match Url::parse(&s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            _ => {
                errors.push(format!("ui_url {s:?} is not an http(s) URL"));
                None
            }
        });
        let custom_access_details = opt_string(map, "custom_access_details", &mut errors);
        if let Some(d) = &custom_access_details {
            let n = d.chars().count();
            if n > MAX_CUSTOM_ACCESS_DETAILS {
                errors.push(format!(
                    "custom_access_details is {n} characters long; at most {MAX_CUSTOM_ACCESS_DETAILS} are allowed"
                ));
            }
        }
        let credential_rotation_days = opt_days(map, "credential_rotation_days", &mut errors);
        let user_cleanup_days = opt_days(map, "user_cleanup_days", &mut errors);

        let page_size = bounded(
            map,
            "page_size",
            DEFAULT_PAGE_SIZE as u64,
            1,
            MAX_PAGE_SIZE as u64,
            &mut errors,
        );
        let concurrency = bounded(
            map,
            "concurrency",
            DEFAULT_CONCURRENCY as u64,
            1,
            MAX_CONCURRENCY as u64,
            &mut errors,
        );
        let max_requests = bounded(
            map,
            "max_requests",
            super::client::DEFAULT_ENDPOINT_REQUESTS as u64,
            1,
            1024,
            &mut errors,
        );
        let timeout = bounded(map, "timeout_seconds", DEFAULT_TIMEOUT_SECONDS, 1, 3600, &mut errors);
        let connect_timeout = bounded(
            map,
            "connect_timeout_seconds",
            DEFAULT_CONNECT_TIMEOUT_SECONDS,
            1,
            600,
            &mut errors,
        );
        let status_timeout = bounded(
            map,
            "status_timeout_seconds",
            DEFAULT_STATUS_TIMEOUT_SECONDS,
            0,
            600,
            &mut errors,
        );

        let new_user_roles = match opt_string(map, NewUserRoles::KEY, &mut errors) {
            None => NewUserRoles::default(),
            Some(s) => NewUserRoles::parse(&s).unwrap_or_else(|e| {
                errors.push(e);
                NewUserRoles::default()
            }),
        };

        let cluster_timeout = bounded(
            map,
            "cluster_timeout_seconds",
            DEFAULT_CLUSTER_TIMEOUT_SECONDS,
            1,
            600,
            &mut errors,
        );

        let unclaimed_grace = bounded(
            map,
            "unclaimed_grace_seconds",
            DEFAULT_UNCLAIMED_GRACE_SECONDS,
            0,
            86_400,
            &mut errors,
        );

        match base_url {
            Some(base_url) if errors.is_empty() => Ok(RancherConfig {
                base_url,
                certificate_authority,
                ui_url,
                custom_access_details,
                credential_rotation_days,
                user_cleanup_days,
                page_size: page_size as u32,
                concurrency: concurrency as usize,
                max_requests: max_requests as usize,
                timeout: Duration::from_secs(timeout),
                connect_timeout: Duration::from_secs(connect_timeout),
                status_timeout: Duration::from_secs(status_timeout),
                new_user_roles,
                cluster_timeout: Duration::from_secs(cluster_timeout),
                unclaimed_grace: Duration::from_secs(unclaimed_grace),
            }),
            _ => Err(config_err(errors)),
        }
    }

    /// What a person needs to reach Rancher: the UI URL, then the custom instructions if any.
    pub fn access_details(&self) -> String {
        let ui = self.ui_url.as_ref().unwrap_or(&self.base_url);
        let mut s = format!("Rancher UI: {}", ui.as_str().trim_end_matches('/'));
        if let Some(d) = self.custom_access_details.as_deref().filter(|d| !d.trim().is_empty()) {
            s.push('\n');
            s.push_str(d.trim());
        }
        s
    }
}

fn config_err(errors: Vec<String>) -> IntegrationError {
    IntegrationError::Config {
        message: format!("invalid Rancher config: {}", errors.join("; ")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string value; empty strings and null count as absent.
fn opt_string(map: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<String> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(other) => {
            errors.push(format!("{key} must be a string, got {}", kind_of(other)));
            None
        }
    }
}

/// A non-negative integer, given as a number or as a numeric string (forms send strings).
fn opt_uint(map: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<u64> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(Value::String(s)) if s.trim().parse::<u64>().is_ok() => s.trim().parse().ok(),
        Some(other) => {
            errors.push(format!("{key} must be a whole number of 0 or more, got {other}"));
            None
        }
    }
}

/// A number of days ≥ 0, as a number or a numeric string. Tolerant on purpose: the control plane
/// reads these (fractional days included, e.g. in its tests) and saturates absurd values.
fn opt_days(map: &Map<String, Value>, key: &str, errors: &mut Vec<String>) -> Option<f64> {
    let days = match map.get(key) {
        None | Some(Value::Null) => return None,
        Some(Value::String(s)) if s.trim().is_empty() => return None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match days {
        Some(d) if d.is_finite() && d >= 0.0 => Some(d),
        _ => {
            errors.push(format!(
                "{key} must be a number of days of 0 or more, got {}",
                map.get(key).map(Value::to_string).unwrap_or_default()
            ));
            None
        }
    }
}

fn bounded(map: &Map<String, Value>, key: &str, default: u64, min: u64, max: u64, errors: &mut Vec<String>) -> u64 {
    match opt_uint(map, key, errors) {
        None => default,
        Some(v) if (min..=max).contains(&v) => v,
        Some(v) => {
            errors.push(format!("{key} must be between {min} and {max}, got {v}"));
            default
        }
    }
}

/// `rancher.example.com`, `rancher.example.com:8443`, `https://rancher.example.com` or
/// `http://127.0.0.1:8080` (test servers) → the API origin. `port` applies when the host has none.
/// `http://` sends the API key in cleartext: allowed for a loopback host (the simulator, tests),
/// elsewhere only with `insecure_http`.
fn parse_host(host: &str, port: Option<u16>, insecure_http: bool) -> Result<Url, String> {
    let with_scheme = host.contains("://");
    let text = if with_scheme {
        host.to_string()
    } else {
        format!("https://{host}")
    };
    let mut url = Url::parse(&text).map_err(|e| format!("host {host:?} is not a hostname or URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "host {host:?} must use https:// (or http:// for a test server on this machine)"
        ));
    }
    if url.scheme() == "http" && !insecure_http && !is_loopback(&url) {
        return Err(format!(
            "host {host:?} uses http://, which would send the API key in cleartext: use https://, or set \
             insecure_http: true to allow http:// to a host that is not this machine"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("host {host:?} has no hostname"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("host must not carry credentials: put the API key in the secret store".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("host {host:?} must not have a query or fragment"));
    }
    if url.port().is_none() {
        let port = match (port, with_scheme) {
            (Some(p), _) => Some(p),
            (None, false) => Some(443),
            (None, true) => None,
        };
        if let Some(p) = port {
            url.set_port(Some(p))
                .map_err(|_| format!("host {host:?} cannot take a port"))?;
        }
    }
    let path = url.path().trim_end_matches('/').to_string();
    url.set_path(&path);
    Ok(url)
}

/// `localhost`, `127.0.0.0/8` or `::1`: traffic that never leaves the machine.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The API key: `access_key` (a token name such as `token-abc12`, or `ext/name` from 2.12) and its
/// secret. `Debug` shows neither.
#[derive(Clone)]
pub struct ApiKey {
    access_key: String,
    secret_key: SecretString,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

impl ApiKey {
    /// Reads the key from a resolved secret: `access_key` + `secret_key`, or `token` =
    /// `access_key:secret_key`.
    ///
    /// # Errors
    /// `Config` naming the keys expected and the keys found (never a value).
    pub fn from_secret(secret: &Secret) -> Result<ApiKey, IntegrationError> {
        let found = || {
            let keys: Vec<&str> = secret.keys().collect();
            if keys.is_empty() {
                "the secret is empty".to_string()
            } else {
                format!("the secret has keys: {}", keys.join(", "))
            }
        };
        let access = secret.get("access_key").map(|s| s.expose_secret().trim());
        let key = secret.get("secret_key").map(|s| s.expose_secret().trim());
        let (access, key) = match (access, key) {
            (Some(a), Some(k)) if !a.is_empty() && !k.is_empty() => (a.to_string(), k.to_string()),
            _ => match secret.get("token").map(|t| t.expose_secret().trim()) {
                Some(t) => match t.split_once(':') {
                    Some((a, k)) if !a.is_empty() && !k.is_empty() => (a.to_string(), k.to_string()),
                    _ => {
                        return Err(IntegrationError::Config {
                            message: "the Rancher secret's \"token\" must have the form access_key:secret_key".into(),
                        });
                    }
                },
                None => {
                    return Err(IntegrationError::Config {
                        message: format!(
                            "the Rancher secret needs the keys \"access_key\" and \"secret_key\" (or \"token\" = \
                             access_key:secret_key); {}",
                            found()
                        ),
                    });
                }
            },
        };
        let ok = |s: &str| s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !ok(&access) || !ok(&key) {
            return Err(IntegrationError::Config {
                message: "the Rancher API key contains characters that cannot be sent in a header (spaces, colons \
                          or non-ASCII); copy the access key and secret key again"
                    .into(),
            });
        }
        Ok(ApiKey {
            access_key: access,
            secret_key: SecretString::from(key),
        })
    }

    /// The token's name as `/v3/tokens/{name}` knows it: the access key without an `ext/` prefix.
    pub fn token_name(&self) -> &str {
        self.access_key.strip_prefix("ext/").unwrap_or(&self.access_key)
    }

    pub fn is_ext(&self) -> bool {
        self.access_key.starts_with("ext/")
    }

    /// `Bearer access:secret`, for the Authorization header only.
    pub(crate) fn bearer(&self) -> SecretString {
        SecretString::from(format!(
            "Bearer {}:{}",
            self.access_key,
            self.secret_key.expose_secret()
        ))
    }

    /// The secret part, so messages taken from server bodies can be scrubbed of it.
    pub(crate) fn secret_part(&self) -> &SecretString {
        &self.secret_key
    }
}
