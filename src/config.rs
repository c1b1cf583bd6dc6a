//! Configuration: built-in defaults < TOML file (`--config`) < environment, through figment.
//!
//! Environment names are Apono's connector's (`APONO_TOKEN`, `APONO_CONNECTOR_ID`, ...), mapped
//! explicitly below: each variable is parsed here so that a bad value fails at start-up with the
//! variable's name. Loading never reads a secret store or opens a connection.
//!
//! This module sits above the ones it configures: it composes their settings types
//! (`secrets::SecretsSettings` as `[secrets]`, `integrations::IntegrationSpec` as
//! `[[integrations]]`) and converts their errors into [`ConfigError`]; they never import it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::integrations::{self, IntegrationSpec};
use crate::secrets::SettingsError;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub control_plane: RemoteConfig,
    pub agent: AgentConfig,
    pub standalone: StandaloneConfig,
    pub telemetry: TelemetryConfig,
    pub secrets: SecretsConfig,
    /// Integrations the standalone control plane knows by name.
    pub integrations: Vec<IntegrationSpec>,
}

/// The remote control plane. With no `url`, `run` starts the embedded one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// `APONO_URL`; a bare host means https.
    pub url: Option<String>,
    /// `APONO_TOKEN`.
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    /// `APONO_TOKEN_FILE`: read the token from this file, and again whenever the control plane
    /// refuses it (a rotated token in a mounted Secret is picked up without a restart).
    pub token_file: Option<PathBuf>,
    /// `APONO_CONNECTOR_ID` (alias `CONNECTOR_ID`).
    pub connector_id: String,
    /// `APONO_ALLOW_INSECURE_HTTP`: allow an `http://` URL to a control plane on another host
    /// (the token and every job then travel in cleartext). Loopback never needs it.
    pub allow_insecure_http: bool,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            url: None,
            token: None,
            token_file: None,
            connector_id: "standalone".into(),
            allow_insecure_http: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `APONO_ACTIONS_PARALLELISM`: workers, i.e. requests to Rancher in flight at once; jobs in
    /// progress are capped at `agent::JOBS_PER_WORKER` per worker (a job waiting on Rancher holds no worker).
    pub parallelism: usize,
    /// How long in-flight jobs may run after SIGTERM before they are abandoned (their leases then
    /// run out and the jobs are handed out again).
    pub shutdown_grace_seconds: u64,
    /// Long-poll wait per lease call (≤ 30).
    pub lease_wait_seconds: u32,
    /// Attempts of one job inside one lease for retryable failures, with backoff and jitter.
    pub job_attempts: u32,
    /// `APONO_ALLOWED_RANCHER_HOSTS`: the only Rancher hosts (`host[:port]`, or `http://host:port`
    /// to allow cleartext) a job may send this agent's keys to. Unset: any host, as the control
    /// plane says (see [`AllowedHost`] and the README's Security section).
    pub allowed_rancher_hosts: Option<Vec<String>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            parallelism: 32,
            shutdown_grace_seconds: 30,
            lease_wait_seconds: 20,
            job_attempts: 3,
            allowed_rancher_hosts: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// Operator API (and agent protocol, for `control-plane serve`).
    pub listen: SocketAddr,
    /// `APONO_DATA_DIR`: the SQLite state.
    pub data_dir: PathBuf,
    pub lease_seconds: u64,
    pub max_grant_attempts: u32,
    /// Finished jobs, discovered objects and ended access requests are forgotten this many days
    /// after they ended.
    pub retention_days: u64,
    /// How often the scheduler sweeps each integration for the connector's bindings whose
    /// marked expiry has passed and that no access holds (0: never). The first sweep runs at
    /// start, so a process that lost its database removes expired access at once.
    pub sweep_interval_seconds: u64,
    // ----- the shared (PostgreSQL) state: several replicas (see `standalone_database`) -----
    /// `APONO_DATABASE_URL`: `postgres://USER:PASSWORD@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=CA]`.
    /// Set: the state lives there, shared by every replica, instead of SQLite in `data_dir`.
    #[serde(skip_serializing)]
    pub database_url: Option<SecretString>,
    /// `APONO_DATABASE_URL_FILE`: the URL read from this file (a mounted Secret), read again at
    /// each new connection so a rotated password is picked up without a restart.
    pub database_url_file: Option<PathBuf>,
    /// `APONO_OPERATOR_TOKEN`: with a database, the operator token (the same on every replica);
    /// required then, as a generated token in one replica's `data_dir` would differ per replica.
    #[serde(skip_serializing)]
    pub operator_token: Option<SecretString>,
    /// `APONO_OPERATOR_TOKEN_FILE`: the operator token read from this file.
    pub operator_token_file: Option<PathBuf>,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        StandaloneConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8790)),
            data_dir: PathBuf::from("./data"),
            lease_seconds: 60,
            max_grant_attempts: 5,
            retention_days: 30,
            sweep_interval_seconds: 300,
            database_url: None,
            database_url_file: None,
            operator_token: None,
            operator_token_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `APONO_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `APONO_LOG_LEVEL`: a tracing filter (`info`, `apono_connector=debug`).
    pub log_level: String,
    /// `APONO_HEALTH_ADDR`: `/healthz`, `/readyz`, `/metrics`.
    pub health_addr: SocketAddr,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            health_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// The `[secrets]` section. The type belongs to `secrets` (which checks what its values mean);
/// this module says where they come from. The name `SecretsConfig` stays for callers that think
/// of it as a config section.
pub use crate::secrets::SecretsSettings as SecretsConfig;

/// Implemented here rather than in `secrets` because the variable table (`ENV_KEYS`) is this
/// module's: `secrets` never reads the environment for its settings.
impl SecretsConfig {
    /// The secrets section from environment variables alone (defaults for the rest), for one-shot
    /// CLI commands that take no config file. Not validated: [`SecretStores::from_config`] does that.
    ///
    /// [`SecretStores::from_config`]: crate::secrets::SecretStores::from_config
    ///
    /// # Errors
    /// A bad variable, named.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<SecretsConfig, ConfigError> {
        let mut overrides = env_overrides(&env, |key| key.starts_with("secrets."))?;
        let section = overrides.remove("secrets").unwrap_or_else(|| Value::Object(Map::new()));
        Figment::from(Serialized::defaults(SecretsConfig::default()))
            .merge(Serialized::defaults(section))
            .extract()
            .map_err(|e| ConfigError(describe_figment_error(e, None)))
    }
}

/// A configuration that cannot be used: names the key or variable and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl From<SettingsError> for ConfigError {
    /// The message already names the key and its variable.
    fn from(e: SettingsError) -> Self {
        ConfigError(e.0)
    }
}

type EnvParser = fn(&str, &str) -> Result<Value, String>;

/// The set environment variables of [`ENV_KEYS`] whose config key `wanted` accepts, parsed and
/// nested by key (`a.b` → `{"a": {"b": ..}}`). Every bad variable is reported, named.
fn env_overrides(
    env: &impl Fn(&str) -> Option<String>,
    wanted: impl Fn(&str) -> bool,
) -> Result<Map<String, Value>, ConfigError> {
    let mut overrides = Map::new();
    let mut errors = Vec::new();
    for (name, key, parse) in ENV_KEYS.iter().filter(|(_, key, _)| wanted(key)) {
        let Some(raw) = env(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        match parse(name, &raw) {
            Ok(value) => insert_dotted(&mut overrides, key, value),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(overrides)
    } else {
        Err(ConfigError(errors.join("; ")))
    }
}

/// Environment variable → config key, with the parser for its value.
const ENV_KEYS: &[(&str, &str, EnvParser)] = &[
    ("APONO_URL", "control_plane.url", parse_string),
    ("APONO_TOKEN", "control_plane.token", parse_string),
    ("APONO_TOKEN_FILE", "control_plane.token_file", parse_string),
    ("CONNECTOR_ID", "control_plane.connector_id", parse_string),
    ("APONO_CONNECTOR_ID", "control_plane.connector_id", parse_string),
    (
        "APONO_ALLOW_INSECURE_HTTP",
        "control_plane.allow_insecure_http",
        parse_flag,
    ),
    ("APONO_ACTIONS_PARALLELISM", "agent.parallelism", parse_positive_int),
    ("APONO_ALLOWED_RANCHER_HOSTS", "agent.allowed_rancher_hosts", parse_list),
    ("APONO_DATA_DIR", "standalone.data_dir", parse_string),
    ("APONO_DATABASE_URL", "standalone.database_url", parse_string),
    ("APONO_DATABASE_URL_FILE", "standalone.database_url_file", parse_string),
    ("APONO_OPERATOR_TOKEN", "standalone.operator_token", parse_string),
    (
        "APONO_OPERATOR_TOKEN_FILE",
        "standalone.operator_token_file",
        parse_string,
    ),
    ("APONO_LISTEN_ADDR", "standalone.listen", parse_string),
    ("APONO_LOG_FORMAT", "telemetry.log_format", parse_log_format),
    ("APONO_LOG_LEVEL", "telemetry.log_level", parse_string),
    ("APONO_HEALTH_ADDR", "telemetry.health_addr", parse_string),
    ("ALLOWED_SECRETS_TO_READ", "secrets.allowed_secrets_to_read", parse_list),
    ("HASHICORP_VAULT_CONFIG", "secrets.hashicorp_vault_config", parse_string),
    (
        "HASHICORP_VAULT_CONFIG_FILE_PATH",
        "secrets.hashicorp_vault_config_file_path",
        parse_string,
    ),
    ("APONO_REQUIRE_READ_MARK", "secrets.require_read_mark", parse_list),
    ("VAULT_NAMESPACE", "secrets.vault_namespace", parse_string),
    (
        "APONO_SECRET_CACHE_TTL_SECONDS",
        "secrets.cache_ttl_seconds",
        parse_non_negative_int,
    ),
];

fn parse_string(_: &str, v: &str) -> Result<Value, String> {
    Ok(Value::String(v.to_string()))
}

fn parse_flag(name: &str, v: &str) -> Result<Value, String> {
    crate::control_plane::client::parse_flag(v)
        .map(Value::Bool)
        .ok_or_else(|| format!("{name}={v:?} is not true or false"))
}

fn parse_positive_int(name: &str, v: &str) -> Result<Value, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Value::from(n)),
        _ => Err(format!("{name}={v:?} is not a positive whole number")),
    }
}

fn parse_non_negative_int(name: &str, v: &str) -> Result<Value, String> {
    match v.trim().parse::<u64>() {
        Ok(n) => Ok(Value::from(n)),
        _ => Err(format!("{name}={v:?} is not a whole number of seconds (0 or more)")),
    }
}

fn parse_log_format(name: &str, v: &str) -> Result<Value, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        f @ ("text" | "json") => Ok(Value::String(f.to_string())),
        _ => Err(format!("{name}={v:?}: expected \"text\" or \"json\"")),
    }
}

fn parse_list(_: &str, v: &str) -> Result<Value, String> {
    // Helm's list syntax (`{a,b}`, and `{a\,b}` as `--set` needs it) copied into a plain
    // variable, where no shell removes the backslashes (a compose file, an ECS task, a manifest's
    // `env.value`), means the same list (secrets review N13).
    let v = v.trim();
    let v = v.strip_prefix('{').and_then(|v| v.strip_suffix('}')).unwrap_or(v);
    let v = v.replace("\\,", ",");
    Ok(Value::Array(
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect(),
    ))
}

/// The config file read when none is named (`--config`, `APONO_CONFIG`), if it exists: where a
/// package or a bare-metal install puts it.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/apono-connector/connector.toml";

impl Config {
    /// Loads defaults < the config file < the process environment. The file is `file` (the CLI
    /// fills it from `--config` or `APONO_CONFIG`), else [`DEFAULT_CONFIG_FILE`] when it exists.
    ///
    /// # Errors
    /// A missing or malformed file, a bad variable or key, or a config that fails [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = Config::file_to_read(file, Path::new(DEFAULT_CONFIG_FILE));
        Config::load_from(file.as_deref(), |name| std::env::var(name).ok())
    }

    /// The config file [`Config::load`] reads: the one named (which must then exist), else
    /// `default` if it exists (a missing default is no error: most installs have none).
    pub fn file_to_read(named: Option<&Path>, default: &Path) -> Option<PathBuf> {
        match named {
            Some(path) => Some(path.to_path_buf()),
            None => default.is_file().then(|| default.to_path_buf()),
        }
    }

    /// As [`Config::load`], with the environment given as a lookup (tests).
    pub fn load_from(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let overrides = env_overrides(&env, |_| true)?;
        figment = figment.merge(Serialized::defaults(Value::Object(overrides)));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(describe_figment_error(e, file)))?;
        config.validate()?;
        Ok(config)
    }

    /// Pure checks (no I/O) collecting every problem at once.
    ///
    /// # Errors
    /// Every problem found, joined.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = self.secrets.problems();
        if self.agent.parallelism == 0 || self.agent.parallelism > 256 {
            problems.push(format!(
                "agent.parallelism (APONO_ACTIONS_PARALLELISM) must be 1..=256, got {}",
                self.agent.parallelism
            ));
        }
        if self.agent.lease_wait_seconds == 0 || self.agent.lease_wait_seconds > 30 {
            problems.push("agent.lease_wait_seconds must be 1..=30".into());
        }
        if self.agent.job_attempts == 0 {
            problems.push("agent.job_attempts must be at least 1".into());
        }
        if let Some(hosts) = &self.agent.allowed_rancher_hosts {
            if hosts.is_empty() {
                problems.push(
                    "agent.allowed_rancher_hosts (APONO_ALLOWED_RANCHER_HOSTS) is an empty list: name the Rancher \
                     hosts jobs may use (rancher.example.com, or host:port), or remove the key"
                        .into(),
                );
            }
            for entry in hosts {
                if let Err(e) = AllowedHost::parse(entry) {
                    problems.push(format!(
                        "agent.allowed_rancher_hosts (APONO_ALLOWED_RANCHER_HOSTS): {e}"
                    ));
                }
            }
        }
        if self.standalone.retention_days == 0 {
            problems.push("standalone.retention_days must be at least 1".into());
        }
        if self.standalone.lease_seconds < 2 {
            problems.push("standalone.lease_seconds must be at least 2".into());
        }
        if let Some(url) = &self.control_plane.url
            && let Err(e) = normalize_url(url)
        {
            problems.push(format!("control_plane.url (APONO_URL): {e}"));
        }
        // A blank token must never mean "authentication off" (reliability F10).
        if self
            .control_plane
            .token
            .as_ref()
            .is_some_and(|t| t.expose_secret().trim().is_empty())
        {
            problems.push(
                "APONO_TOKEN (control_plane.token) is empty or only whitespace: set the real token, or unset it".into(),
            );
        }
        if self.control_plane.url.is_some()
            && self.control_plane.token.is_none()
            && self.control_plane.token_file.is_none()
        {
            problems.push("APONO_TOKEN (or APONO_TOKEN_FILE) is required when APONO_URL is set".into());
        }
        if self.control_plane.connector_id.trim().is_empty() {
            problems.push("control_plane.connector_id (APONO_CONNECTOR_ID) must not be empty".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, spec) in self.integrations.iter().enumerate() {
            if !names.insert(spec.name.as_str()) {
                problems.push(format!("integrations[{i}]: duplicate name {:?}", spec.name));
            }
            if let Err(e) = integrations::validate_spec(spec) {
                problems.push(format!("integrations[{i}] ({:?}): {e}", spec.name));
            }
        }
        problems.extend(self.standalone.database_problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems.join("; ")))
        }
    }

    /// Standalone mode: no remote control plane configured.
    pub fn is_standalone(&self) -> bool {
        self.control_plane.url.is_none()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.agent.shutdown_grace_seconds)
    }

    /// The Rancher allow-list, parsed: `None` when unset. Entries that do not parse were refused
    /// by [`Config::validate`]; here they are skipped (a narrower list, never a wider one).
    pub fn allowed_rancher_hosts(&self) -> Option<Vec<AllowedHost>> {
        self.agent
            .allowed_rancher_hosts
            .as_ref()
            .map(|hosts| hosts.iter().filter_map(|h| AllowedHost::parse(h).ok()).collect())
    }
}

/// One entry of `agent.allowed_rancher_hosts`: a Rancher origin jobs may send this agent's keys
/// to. `rancher.example.com` means port 443, `host:8443` that port, both over https only;
/// `http://host:port` also allows cleartext to it (a job's `insecure_http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// Lowercase, no trailing dot; IPv6 in brackets.
    pub host: String,
    pub port: u16,
    /// `http://` given: cleartext allowed to this host.
    pub cleartext: bool,
}

impl AllowedHost {
    /// Parses `host`, `host:port`, `https://host[:port]` or `http://host[:port]`.
    ///
    /// # Errors
    /// A value that is not a host and port, naming it.
    pub fn parse(entry: &str) -> Result<AllowedHost, String> {
        let entry = entry.trim();
        let text = if entry.contains("://") {
            entry.to_string()
        } else {
            format!("https://{entry}")
        };
        let bad = |why: &str| format!("{entry:?} is not a host[:port] ({why})");
        let url = url::Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be https:// or http://"));
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("only a host and a port"));
        }
        if !matches!(url.path(), "" | "/") {
            return Err(bad("only a host and a port, no path"));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        Ok(AllowedHost {
            host: normalize_host(host),
            port,
            cleartext: url.scheme() == "http",
        })
    }

    /// Whether `url` (a Rancher origin) is this host and port.
    pub fn matches(&self, url: &url::Url) -> bool {
        url.host_str().map(normalize_host).as_deref() == Some(self.host.as_str())
            && url.port_or_known_default() == Some(self.port)
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.cleartext { "http://" } else { "" };
        write!(f, "{scheme}{}:{}", self.host, self.port)
    }
}

/// `Rancher.Example.com.` and `rancher.example.com` are one host.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl StandaloneConfig {
    /// Whether the state is shared in a database (a URL or a URL file is set).
    pub fn has_database(&self) -> bool {
        self.database_url.is_some() || self.database_url_file.is_some()
    }

    /// Problems with the database settings; none of them quotes the URL (it holds a password).
    fn database_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.database_url.is_some() && self.database_url_file.is_some() {
            problems.push(
                "set APONO_DATABASE_URL or APONO_DATABASE_URL_FILE (standalone.database_url[_file]), not both".into(),
            );
        }
        if let Some(url) = &self.database_url {
            let url = url.expose_secret().trim();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                problems.push(
                    "standalone.database_url (APONO_DATABASE_URL) must be a postgres:// URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
                        .into(),
                );
            }
        }
        if self.has_database() && self.operator_token.is_none() && self.operator_token_file.is_none() {
            problems.push(
                "with a database (APONO_DATABASE_URL) the operator token must be given, the same on every replica: \
                 set APONO_OPERATOR_TOKEN or APONO_OPERATOR_TOKEN_FILE"
                    .into(),
            );
        }
        if self
            .operator_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().trim().is_empty())
        {
            problems.push("APONO_OPERATOR_TOKEN is empty or only whitespace: set the real token, or unset it".into());
        }
        problems
    }

    /// The shared operator token (with a database): `operator_token`, else the file's content.
    ///
    /// # Errors
    /// Neither is set, the file cannot be read, or the token is blank.
    pub fn shared_operator_token(&self) -> Result<SecretString, ConfigError> {
        if let Some(t) = &self.operator_token {
            return Ok(t.clone());
        }
        let Some(path) = &self.operator_token_file else {
            return Err(ConfigError(
                "with a database the operator token must be given: set APONO_OPERATOR_TOKEN or APONO_OPERATOR_TOKEN_FILE".into(),
            ));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read APONO_OPERATOR_TOKEN_FILE {}: {e}", path.display())))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(ConfigError(format!(
                "APONO_OPERATOR_TOKEN_FILE {} is empty: it must hold the operator token",
                path.display()
            )));
        }
        Ok(SecretString::from(text.to_string()))
    }
}

/// `APONO_URL` may be a bare host (`connector.example.com`), meaning https.
///
/// # Errors
/// A value that is not a URL after adding the scheme.
pub fn normalize_url(raw: &str) -> Result<url::Url, String> {
    let raw = raw.trim();
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("https://{raw}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!("{raw:?}: scheme {other:?} is not http or https")),
    }
}

fn insert_dotted(map: &mut Map<String, Value>, dotted: &str, value: Value) {
    match dotted.split_once('.') {
        None => {
            map.insert(dotted.to_string(), value);
        }
        Some((head, rest)) => {
            let child = map.entry(head.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(child) = child {
                insert_dotted(child, rest, value);
            }
        }
    }
}

/// Names the key (and the env variable when there is one) in figment's error.
fn describe_figment_error(e: figment::Error, file: Option<&Path>) -> String {
    let mut out = Vec::new();
    for err in e {
        let key = err.path.join(".");
        let var = ENV_KEYS.iter().find(|(_, k, _)| *k == key).map(|(n, _, _)| *n);
        let source = file.map(|f| format!(" in {}", f.display())).unwrap_or_default();
        let what = match var {
            Some(v) => format!("{key} ({v}{source})"),
            None if key.is_empty() => format!("config{source}"),
            None => format!("{key}{source}"),
        };
        out.push(format!("{what}: {}", kind_without_values(&err.kind)));
    }
    out.join("; ")
}

/// figment's error kind, naming what was found by its type only: its own `Display` quotes the
/// value (`invalid type: found string "…"`), which may be a token or an inline credential.
fn kind_without_values(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let shape = |a: &Actual| match a {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "nothing",
        Actual::Option => "an option",
        Actual::Seq => "a list",
        Actual::Map => "a map",
        Actual::NewtypeStruct
        | Actual::Enum
        | Actual::UnitVariant
        | Actual::NewtypeVariant
        | Actual::TupleVariant
        | Actual::StructVariant
        | Actual::Other(_) => "a value of another type",
    };
    match kind {
        Kind::InvalidType(a, expected) => format!("invalid type: found {}, expected {expected}", shape(a)),
        Kind::InvalidValue(a, expected) => format!("invalid value: found {}, expected {expected}", shape(a)),
        Kind::Unsupported(a) => format!("unsupported type: {}", shape(a)),
        Kind::UnsupportedKey(a, need) => format!("unsupported key type: {}, need {need}", shape(a)),
        Kind::Message(m) => without_source_lines(m),
        other => other.to_string(),
    }
}

/// A TOML parse error as "TOML parse error at line L, column C: <reason>": the parser's own
/// text quotes the offending line (`5 | secret_key = "..."`) and points at it, and that line may
/// hold a secret (security review N9a). One line, as every other configuration error.
fn without_source_lines(message: &str) -> String {
    let mut lines = message.lines();
    let Some(head) = lines.next() else {
        return String::new();
    };
    let rest: Vec<&str> = lines.collect();
    // The snippet is the lines up to the last one made of a gutter (`  |`, `5 |`) and carets.
    let is_snippet = |l: &str| {
        let t = l.trim_start();
        let after_number = t.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        after_number.starts_with('|')
    };
    let Some(last_snippet) = rest.iter().rposition(|l| is_snippet(l)) else {
        return message.split_whitespace().collect::<Vec<_>>().join(" ");
    };
    let reason: Vec<&str> = rest[last_snippet + 1..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if reason.is_empty() {
        format!("{} (the line is not shown)", head.trim())
    } else {
        format!("{}: {} (the line is not shown)", head.trim(), reason.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn helm_list_escapes_copied_into_a_variable_mean_the_same_list() {
        for raw in [
            "{secret1\\,secret2\\,secret3}",
            "{secret1,secret2,secret3}",
            "secret1, secret2,secret3",
        ] {
            let c = Config::load_from(None, env(&[("ALLOWED_SECRETS_TO_READ", raw)])).unwrap();
            assert_eq!(
                c.secrets.allowed_secrets_to_read,
                ["secret1", "secret2", "secret3"],
                "{raw}"
            );
        }
    }

    #[test]
    fn defaults_are_standalone() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert!(c.is_standalone());
        assert_eq!(c.agent.parallelism, 32);
        assert_eq!(c.standalone.listen.to_string(), "127.0.0.1:8790");
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[agent]\nparallelism = 3\n[telemetry]\nlog_level = \"debug\"\n").unwrap();
        let c = Config::load_from(Some(&path), env(&[("APONO_ACTIONS_PARALLELISM", "5")])).unwrap();
        assert_eq!(c.agent.parallelism, 5);
        assert_eq!(c.telemetry.log_level, "debug");
        let c = Config::load_from(
            Some(&path),
            env(&[("APONO_URL", "cp.example.com"), ("APONO_TOKEN", "12345")]),
        )
        .unwrap();
        assert!(!c.is_standalone());
        assert_eq!(
            normalize_url(c.control_plane.url.as_deref().unwrap()).unwrap().as_str(),
            "https://cp.example.com/"
        );
    }

    #[test]
    fn bad_values_name_the_variable_or_key() {
        let e = Config::load_from(None, env(&[("APONO_ACTIONS_PARALLELISM", "many")])).unwrap_err();
        assert!(e.to_string().contains("APONO_ACTIONS_PARALLELISM"), "{e}");
        let e = Config::load_from(None, env(&[("APONO_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(e.to_string().contains("APONO_LOG_FORMAT"), "{e}");
        let e = Config::load_from(None, env(&[("APONO_HEALTH_ADDR", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("APONO_HEALTH_ADDR"), "{e}");
        let e = Config::load_from(None, env(&[("APONO_URL", "https://cp")])).unwrap_err();
        assert!(e.to_string().contains("APONO_TOKEN"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[agent]\nparalelism = 3\n").unwrap();
        let e = Config::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(e.to_string().contains("paralelism"), "{e}");
    }

    #[test]
    fn a_blank_token_is_an_error_naming_the_variable() {
        for blank in [" ", "\n", "\t \n"] {
            let e = Config::load_from(None, env(&[("APONO_TOKEN", blank)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("APONO_TOKEN") && e.contains("empty"), "{blank:?}: {e}");
            let e = Config::load_from(None, env(&[("APONO_URL", "cp"), ("APONO_TOKEN", blank)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("APONO_TOKEN"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[control_plane]\ntoken = \"  \"\n").unwrap();
        let e = Config::load_from(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(e.contains("control_plane.token"), "{e}");
    }

    #[test]
    fn the_rancher_allow_list_parses_and_names_bad_entries() {
        let c = Config::load_from(
            None,
            env(&[(
                "APONO_ALLOWED_RANCHER_HOSTS",
                "rancher.example.com, 10.0.0.5:8443,http://lab:8080",
            )]),
        )
        .unwrap();
        let hosts: Vec<String> = c
            .allowed_rancher_hosts()
            .unwrap()
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(hosts, ["rancher.example.com:443", "10.0.0.5:8443", "http://lab:8080"]);
        assert!(
            Config::load_from(None, env(&[]))
                .unwrap()
                .allowed_rancher_hosts()
                .is_none()
        );
        for bad in ["rancher.example.com/v3", "ftp://x", "user:pw@host", "host:99999"] {
            let e = Config::load_from(None, env(&[("APONO_ALLOWED_RANCHER_HOSTS", bad)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("APONO_ALLOWED_RANCHER_HOSTS"), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[agent]\nallowed_rancher_hosts = []\n").unwrap();
        let e = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(e.contains("empty list"), "{e}");
    }

    /// A TOML syntax error is located (line, column) and explained, but the offending line is not
    /// quoted: it may be the one holding a secret (security review N9a).
    #[test]
    fn a_toml_syntax_error_never_quotes_the_line() {
        const CANARY: &str = "TOMLCANARY-s3cr3t-77";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        for text in [
            format!(
                "[[integrations]]\ntype = \"rancher\"\nname = \"p\"\nconfig = {{ host = \"r.example.com\" }}\n\
                 secret_store = {{ type = \"APONO\", credentials = {{ access_key = \"token-sim01\", secret_key = \"{CANARY}\" }} x\n"
            ),
            format!("[control_plane]\ntoken = \"{CANARY}\"x\n"),
            format!("[control_plane]\ntoken = \"{CANARY}\n"),
            format!("[control_plane]\ntoken = \"{CANARY}\"\ntoken = \"{CANARY}\"\n"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let e = Config::load_from(Some(&path), env(&[])).unwrap_err().to_string();
            assert!(!e.contains(CANARY) && !e.contains("s3cr3t"), "{e}");
            assert!(e.contains("bad.toml") && e.contains("line "), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn token_never_appears_in_debug() {
        let c = Config::load_from(None, env(&[("APONO_URL", "cp"), ("APONO_TOKEN", "canary-token-77")])).unwrap();
        assert!(!format!("{c:?}").contains("canary-token-77"));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/connector.example.toml");
        Config::load_from(Some(&path), env(&[])).unwrap();
    }

    // A build without Vault does not read the definitions (its Vault references answer
    // `secret_store_unsupported`), so there is nothing to refuse.
    #[cfg(feature = "store-vault")]
    #[test]
    fn malformed_vault_config_fails_start_up_naming_variable_and_entry() {
        let e = Config::load_from(
            None,
            env(&[("HASHICORP_VAULT_CONFIG", r#"[{"address": "https://v:8200"}]"#)]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("HASHICORP_VAULT_CONFIG"), "{e}");
        assert!(
            e.contains("[0]") || e.contains("entry 0") || e.contains("index 0"),
            "{e}"
        );
    }
}
