//! One function per CLI command: build what the command needs from the config and call into the
//! modules. `main.rs` parses arguments and calls these; `demo` lives in its own module.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentOptions, Executor};
use crate::config::{Config, DEFAULT_CONFIG_FILE, SecretsConfig, normalize_url};
use crate::control_plane::client::{self, ALLOW_INSECURE_HTTP_ENV, HttpControlPlane, OperatorClient};
use crate::control_plane::embedded::{self, EmbeddedControlPlane};
use crate::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef, printable};
use crate::control_plane::{ControlPlane, operator_token, server};
use crate::integrations::{self, DiscoveredObject, GrantRequest, IntegrationSpec, RevokeRequest, SweepRequest};
use crate::secrets::{SecretRef, SecretStores};
use crate::telemetry::health::HealthServer;
use crate::telemetry::{self, Readiness};

mod healthcheck;
mod output;

pub use healthcheck::{health_url, healthcheck};
use output::say;
pub use output::{EXIT_NOT_READY, Refused, Stdout, exit_code, operator_refusal, print_bytes, print_line};

/// Default address of the standalone control plane's operator API.
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:8790";

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        // Cancel before logging: nothing a log write does can keep the daemon from stopping.
        t.cancel();
        tracing::info!("shutdown signal received: no new jobs will be leased");
    });
    token
}

pub fn agent_options(config: &Config) -> AgentOptions {
    AgentOptions {
        parallelism: config.agent.parallelism,
        lease_wait_seconds: config.agent.lease_wait_seconds,
        shutdown_grace: config.shutdown_grace(),
    }
}

pub fn embedded_options(config: &Config) -> embedded::Options {
    embedded::Options {
        data_dir: config.standalone.data_dir.clone(),
        lease_duration: Duration::from_secs(config.standalone.lease_seconds),
        max_grant_attempts: config.standalone.max_grant_attempts,
        retention: Duration::from_secs(config.standalone.retention_days.saturating_mul(86_400)),
        sweep_interval: Duration::from_secs(config.standalone.sweep_interval_seconds),
        connector_id: config.control_plane.connector_id.clone(),
        database_url: config.standalone.database_url.clone(),
        database_url_file: config.standalone.database_url_file.clone(),
        // With a database it seals one-time passwords kept there (config checked it is set).
        operator_token: config
            .standalone
            .has_database()
            .then(|| config.standalone.shared_operator_token().ok())
            .flatten(),
        ..embedded::Options::default()
    }
}

/// Opens the embedded control plane and registers the config's integrations.
pub fn open_embedded(config: &Config, options: embedded::Options) -> anyhow::Result<Arc<EmbeddedControlPlane>> {
    let dir = match options.database_url.is_some() || options.database_url_file.is_some() {
        true => "the database (APONO_DATABASE_URL)".to_string(),
        false => options.data_dir.display().to_string(),
    };
    let cp =
        EmbeddedControlPlane::open(options).with_context(|| format!("opening the control-plane state in {dir}"))?;
    for spec in &config.integrations {
        cp.register_integration(spec, embedded::IntegrationSource::Config)
            .with_context(|| format!("registering integration {:?}", spec.name))?;
    }
    Ok(cp)
}

/// `run`: the daemon. Standalone (embedded control plane + operator API + agent) unless
/// `APONO_URL` is set.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let stores = SecretStores::from_config(&config.secrets)?;
    let executor = Executor::new(stores, config.agent.job_attempts)
        .with_connector_id(&config.control_plane.connector_id)
        .with_host_policy(crate::agent::HostPolicy::from_config(&config));
    let readiness = Readiness::new();
    let health = start_health_server(&config, &readiness).await?;
    let outcome = run_agent(config, executor, readiness, shutdown).await;
    health.stop().await;
    outcome
}

/// `/healthz`, `/readyz` and `/metrics` on `APONO_HEALTH_ADDR`, for `run` and `control-plane serve`.
async fn start_health_server(config: &Config, readiness: &Readiness) -> anyhow::Result<HealthServer> {
    let addr = config.telemetry.health_addr;
    let server = telemetry::health::serve(addr, readiness.clone())
        .await
        .with_context(|| format!("binding the health server on {addr} (APONO_HEALTH_ADDR)"))?;
    tracing::info!(health_addr = %server.addr, "serving /healthz, /readyz and /metrics");
    Ok(server)
}

async fn run_agent(
    config: Config,
    executor: Executor,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match &config.control_plane.url {
        Some(url) => {
            let url = normalize_url(url).map_err(anyhow::Error::msg)?;
            let cp = remote_control_plane(&config, url.as_str())?;
            tracing::info!(control_plane = %url, connector_id = %config.control_plane.connector_id, "starting agent (remote mode)");
            Agent::new(Arc::new(cp), executor, agent_options(&config))
                .with_readiness(readiness)
                .run(shutdown)
                .await;
        }
        None => {
            // The operator API grants access, so it wants the operator token (always) and the
            // `Host`/`Origin` checks wherever it listens. Beyond loopback only when asked: a
            // container's loopback cannot be published, so there `APONO_LISTEN_ADDR=0.0.0.0:8790`
            // with `-p 127.0.0.1:8790:8790` keeps it on the host's loopback.
            if !config.standalone.listen.ip().is_loopback() {
                tracing::warn!(
                    operator_api = %config.standalone.listen,
                    "the operator API listens beyond loopback (APONO_LISTEN_ADDR): whoever reaches it with the operator \
                     token can grant access; publish it on a loopback address only (docker run -p 127.0.0.1:8790:8790)"
                );
            }
            let cp = open_embedded(&config, embedded_options(&config))?;
            // In standalone the in-process agent is the only holder of leases, and `open` has
            // locked the data dir: every lease still recorded belongs to our own dead process.
            // Taking them back now runs a revoke that fell due while we were down at once,
            // instead of after a lease.
            let reclaimed = cp.reclaim_leases().context("reclaiming the leases of a previous run")?;
            if reclaimed > 0 {
                tracing::info!(
                    jobs = reclaimed,
                    "took back the leases of a previous run that ended without releasing them"
                );
            }
            let operator_token = if config.standalone.has_database() {
                config.standalone.shared_operator_token()?
            } else {
                operator_token::ensure(&config.standalone.data_dir)?
            };
            let listener = tokio::net::TcpListener::bind(config.standalone.listen)
                .await
                .with_context(|| format!("binding the operator API on {}", config.standalone.listen))?;
            // The in-process agent needs no agent protocol: serving it here would hand leased
            // jobs (and inline credentials) to any local process (reliability F3).
            let router = server::router(
                cp.clone(),
                server::Access {
                    agent_token: None,
                    agent_token_file: None,
                    operator_token,
                    listen: listener.local_addr().context("reading the operator API's address")?,
                },
            )?;
            tracing::info!(
                operator_api = %config.standalone.listen,
                data_dir = %config.standalone.data_dir.display(),
                integrations = config.integrations.len(),
                "starting agent (standalone: embedded control plane)"
            );
            let background = CancellationToken::new();
            let scheduler = tokio::spawn(cp.clone().run_scheduler(background.clone()));
            let api = tokio::spawn(server::serve(listener, router, background.clone()));
            Agent::new(cp.clone(), executor, agent_options(&config))
                .with_readiness(readiness)
                .run(shutdown)
                .await;
            cp.close();
            background.cancel();
            let _ = scheduler.await;
            let _ = api.await;
        }
    }
    Ok(())
}

/// `control-plane serve`: the embedded control plane alone, for remote agents.
pub async fn serve_control_plane(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Leased jobs carry inline credentials and a completed revoke ends an access: the agent
    // protocol always needs a token. "Loopback only" is no substitute: behind a same-host proxy,
    // a port-forward or a mesh sidecar every caller is loopback (reliability F3, F10).
    let agent_token = serve_agent_token(&config)?;
    let cp = open_embedded(&config, embedded_options(&config))?;
    let operator_token = if config.standalone.has_database() {
        config.standalone.shared_operator_token()?
    } else {
        operator_token::ensure(&config.standalone.data_dir)?
    };
    let listener = tokio::net::TcpListener::bind(config.standalone.listen)
        .await
        .with_context(|| format!("binding {}", config.standalone.listen))?;
    let router = server::router(
        cp.clone(),
        server::Access {
            agent_token: Some(agent_token),
            // Read again on a mismatch when it changed: a rotated Secret reaches the control
            // plane without a restart (APONO_TOKEN wins when both are set, as at start).
            agent_token_file: config
                .control_plane
                .token
                .is_none()
                .then(|| config.control_plane.token_file.clone())
                .flatten(),
            operator_token,
            listen: listener.local_addr().context("reading the listen address")?,
        },
    )?;
    let readiness = Readiness::new();
    let health = start_health_server(&config, &readiness).await?;
    tracing::info!(
        listen = %config.standalone.listen,
        data_dir = %config.standalone.data_dir.display(),
        "control plane serving"
    );
    readiness.set_ready();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(shutdown.clone()));
    let served = server::serve(listener, router, shutdown).await;
    readiness.set_not_ready("shutting down");
    let _ = scheduler.await;
    health.stop().await;
    served?;
    Ok(())
}

/// The token agents must present to `control-plane serve`: `APONO_TOKEN`, else the content of
/// `APONO_TOKEN_FILE` (read at start, and again when an agent presents another token and the file
/// changed). Blank is an error, never "no authentication".
fn serve_agent_token(config: &Config) -> anyhow::Result<secrecy::SecretString> {
    if let Some(token) = &config.control_plane.token {
        return Ok(operator_token::non_blank("APONO_TOKEN", token.expose_secret())?);
    }
    if let Some(path) = &config.control_plane.token_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading APONO_TOKEN_FILE {}", path.display()))?;
        return Ok(operator_token::non_blank(
            &format!("APONO_TOKEN_FILE {}", path.display()),
            &text,
        )?);
    }
    bail!(
        "control-plane serve on {} needs APONO_TOKEN (or APONO_TOKEN_FILE): agents must authenticate, \
         also on loopback; set the same token on the agents",
        config.standalone.listen
    )
}

/// Reads `JSON` or `@FILE`.
pub fn read_json_arg(arg: &str, what: &str) -> anyhow::Result<Value> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {what} from {path}"))?,
        None => arg.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

pub fn parse_integration(arg: &str) -> anyhow::Result<IntegrationSpec> {
    let spec: IntegrationSpec = serde_json::from_value(read_json_arg(arg, "--integration")?)
        .context("--integration must be {\"type\",\"name\",\"config\",\"secret_store\"}")?;
    integrations::validate_spec(&spec)?;
    Ok(spec)
}

/// The secret stores of a one-shot command, which takes no config file: settings from the
/// environment alone, checked as the daemon's are.
pub fn secret_stores_from_env() -> anyhow::Result<SecretStores> {
    let settings = SecretsConfig::from_env(|name| std::env::var(name).ok())?;
    Ok(SecretStores::from_config(&settings)?)
}

async fn build_integration(spec: &IntegrationSpec) -> anyhow::Result<Box<dyn integrations::Integration>> {
    let secret = secret_stores_from_env()?.fetch(&spec.secret_store).await?;
    Ok(integrations::build(spec, &secret)?)
}

/// `discover`: NDJSON on stdout, progress and a summary on stderr.
pub async fn discover(spec: IntegrationSpec) -> anyhow::Result<()> {
    let integration = build_integration(&spec).await?;
    let (tx, mut rx) = mpsc::channel::<DiscoveredObject>(1024);
    // Writes until the objects end or the reader goes away (`discover | head`): then it drops
    // the receiver, which stops the discovery, and says so with `None`.
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<u64>> {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut n = 0u64;
        let closed = |e: &io::Error| e.kind() == io::ErrorKind::BrokenPipe;
        while let Some(object) = rx.blocking_recv() {
            let mut line = serde_json::to_vec(&object)?;
            line.push(b'\n');
            match out.write_all(&line) {
                Err(e) if closed(&e) => return Ok(None),
                other => other?,
            }
            n += 1;
            if n.is_multiple_of(10_000) {
                say(&format!("discovered {n} objects..."));
            }
        }
        match out.flush() {
            Err(e) if closed(&e) => Ok(None),
            other => other.map(|()| Some(n)).map_err(Into::into),
        }
    });
    let summary = integration.discover(tx).await;
    let Some(written) = writer.await.context("writer task")?? else {
        return Ok(());
    };
    let summary = summary?;
    say(&format!(
        "discovery done: {written} objects, {} requests, {} ms ({})",
        summary.requests,
        summary.elapsed_ms,
        summary
            .counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    for skipped in &summary.skipped_clusters {
        say(&format!(
            "cluster {} skipped: its namespaces were not listed ({})",
            skipped.id, skipped.reason
        ));
    }
    Ok(())
}

pub async fn grant(spec: IntegrationSpec, request: GrantRequest) -> anyhow::Result<Value> {
    let integration = build_integration(&spec).await?;
    Ok(serde_json::to_value(integration.grant(&request).await?)?)
}

pub async fn revoke(spec: IntegrationSpec, request: RevokeRequest) -> anyhow::Result<Value> {
    let integration = build_integration(&spec).await?;
    Ok(serde_json::to_value(integration.revoke(&request).await?)?)
}

/// `sweep`: removes (or, in a dry run, lists) the connector's bindings whose marked expiry has
/// passed. Run by hand there is no control plane to say which accesses still hold a binding, so
/// nothing is kept beyond what has not expired yet.
pub async fn sweep(spec: IntegrationSpec, dry_run: bool) -> anyhow::Result<Value> {
    let integration = build_integration(&spec).await?;
    let result = integration
        .sweep(&SweepRequest {
            keep_binding_ids: Vec::new(),
            dry_run,
            ..SweepRequest::default()
        })
        .await?;
    let verb = if dry_run { "would remove" } else { "removed" };
    say(&format!(
        "sweep: {} of the connector's binding(s) seen; {verb} {} expired",
        result.marked,
        result.removed.len()
    ));
    Ok(serde_json::to_value(result)?)
}

/// `secret get`: keys as JSON; values `***` unless `reveal`.
pub async fn secret_get(store: &str, reveal: bool) -> anyhow::Result<Value> {
    let reference: SecretRef = serde_json::from_value(read_json_arg(store, "--store")?).context(
        "--store must be a secret reference such as {\"type\":\"AWS\",\"region\":\"...\",\"secret_id\":\"...\"}",
    )?;
    let secret = secret_stores_from_env()?.fetch(&reference).await?;
    let mut map = serde_json::Map::new();
    for key in secret.keys() {
        let value = match (reveal, secret.get(key)) {
            (true, Some(v)) => Value::String(v.expose_secret().to_string()),
            _ => Value::String("***".into()),
        };
        map.insert(key.to_string(), value);
    }
    Ok(Value::Object(map))
}

/// The operator API client of the `access` commands: the operator token from
/// `APONO_OPERATOR_TOKEN`, else from `<data_dir>/operator.token` with the data dir found as `run`
/// finds it (`config`, `APONO_DATA_DIR`, default `./data`).
///
/// # Errors
/// No token found, a blank one, a token file readable by others, or a config that does not load.
pub fn operator_client(control_plane: &str, config: Option<&Path>) -> anyhow::Result<OperatorClient> {
    let token = operator_token::for_client(
        |name| std::env::var(name).ok(),
        || {
            Config::load(config).map(|c| c.standalone.data_dir).map_err(|e| {
                operator_token::TokenError::Config(format!(
                    "finding the daemon's data dir (for its operator token): {e}; or set {}",
                    operator_token::TOKEN_ENV
                ))
            })
        },
    )?;
    // Only the environment: `access` reads no config when APONO_OPERATOR_TOKEN is set.
    let insecure = std::env::var(ALLOW_INSECURE_HTTP_ENV).unwrap_or_default();
    let allow_insecure_http = client::parse_flag(&insecure)
        .with_context(|| format!("{ALLOW_INSECURE_HTTP_ENV}={insecure:?} is not true or false"))?;
    Ok(OperatorClient::with_insecure_http(control_plane, allow_insecure_http)?.with_token(token))
}

/// `access request`: creates the request and, unless `wait` is zero, waits for the grant to settle.
pub async fn access_request(
    client: &OperatorClient,
    integration: &str,
    create: impl FnOnce(IntegrationRef) -> AccessRequestCreate,
    wait: Duration,
) -> anyhow::Result<AccessRequest> {
    let integration = if integration.trim_start().starts_with('{') || integration.starts_with('@') {
        IntegrationRef::Inline(Box::new(parse_integration(integration)?))
    } else {
        IntegrationRef::Name(integration.to_string())
    };
    let mut access = client
        .create_access(&create(integration))
        .await
        .context("creating the access request")?;
    let deadline = tokio::time::Instant::now() + wait;
    while access.state == AccessState::Pending && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        access = client
            .access(&access.id)
            .await?
            .context("the access request disappeared")?;
    }
    if access.state == AccessState::Failed {
        let why = access
            .last_error
            .as_ref()
            .map(|e| format!("{} ({})", e.message, e.code))
            .unwrap_or_default();
        bail!("access request {} failed: {why}", access.id);
    }
    Ok(access)
}

/// Renders access requests as a table for people.
pub fn access_table(list: &[AccessRequest]) -> String {
    let mut out = format!(
        "{:<40} {:<10} {:<14} {:<24} {:<18} {:<20} {:<20}\n",
        "ID", "STATE", "INTEGRATION", "SUBJECT", "ROLE", "RESOURCE", "EXPIRES"
    );
    for a in list {
        let expires = a
            .expires_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        // Escaped: a Rancher error or an old row must not drive the operator's terminal (N10).
        out.push_str(&format!(
            "{:<40} {:<10} {:<14} {:<24} {:<18} {:<20} {:<20}\n",
            printable(&a.id),
            a.state.as_str(),
            printable(&a.integration),
            printable(a.subject.as_str()),
            printable(&a.role),
            printable(a.resource.as_str()),
            expires
        ));
        if let Some(e) = &a.last_error {
            out.push_str(&format!(
                "    last error: {} ({})\n",
                printable(&e.message),
                printable(&e.code)
            ));
        }
    }
    out
}

/// One row of `check`: what was checked, and the detail or the failure.
pub type CheckRow = (String, Result<String, String>);

/// `check`: the operator's first command after install. The config loads; the control plane
/// answers and accepts the token (remote mode); every integration's secret resolves (keys shown,
/// never values); every integration validates against Rancher. Each row is independent: a
/// failure is reported and the next check still runs.
pub async fn check(config_path: Option<&Path>) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            rows.push(("config".to_string(), Err(e.to_string())));
            return rows;
        }
    };
    let source = Config::file_to_read(config_path, Path::new(DEFAULT_CONFIG_FILE))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "defaults + environment".into());
    rows.push(("config".to_string(), Ok(source)));
    rows.push(check_control_plane(&config).await);
    let stores = match SecretStores::from_config(&config.secrets) {
        Ok(stores) => stores,
        Err(e) => {
            rows.push(("secret stores".to_string(), Err(e.to_string())));
            return rows;
        }
    };
    for spec in &config.integrations {
        let what = format!("secret of {} ({})", spec.name, spec.secret_store.describe());
        let secret = match stores.fetch(&spec.secret_store).await {
            Ok(secret) => {
                rows.push((
                    what,
                    Ok(format!("keys: {}", secret.keys().collect::<Vec<_>>().join(", "))),
                ));
                secret
            }
            Err(e) => {
                rows.push((what, Err(e.to_string())));
                continue;
            }
        };
        let what = format!("integration {} ({})", spec.name, spec.kind);
        let validated = match integrations::build(spec, &secret) {
            Ok(integration) => integration.validate().await,
            Err(e) => Err(e),
        };
        rows.push(match validated {
            Ok(v) if v.warnings.is_empty() => (what, Ok(format!("key of {} works", v.principal))),
            Ok(v) => (
                what,
                Ok(format!(
                    "key of {} works; WARNING: {}",
                    v.principal,
                    v.warnings.join("; ")
                )),
            ),
            Err(e) => (what, Err(format!("{e} ({})", e.code()))),
        });
    }
    if config.integrations.is_empty() && config.control_plane.url.is_none() {
        rows.push((
            "integrations".to_string(),
            Err("none configured: add [[integrations]] to the config file".into()),
        ));
    }
    rows
}

async fn check_control_plane(config: &Config) -> CheckRow {
    let Some(url) = &config.control_plane.url else {
        return (
            "control plane".to_string(),
            Ok(format!("standalone, operator API on {}", config.standalone.listen)),
        );
    };
    let what = format!("control plane {url}");
    let cp = match normalize_url(url)
        .map_err(|e| e.to_string())
        .and_then(|u| remote_control_plane(config, u.as_str()).map_err(|e| e.to_string()))
    {
        Ok(cp) => cp,
        Err(e) => return (what, Err(e)),
    };
    let hello = crate::control_plane::protocol::SessionHello {
        version: crate::VERSION.to_string(),
        hostname: "check".to_string(),
        capabilities: Default::default(),
    };
    match cp.hello(&hello).await {
        Ok(session) => (what, Ok(format!("token accepted (session {})", session.session_id))),
        Err(e) => (what, Err(e.to_string())),
    }
}

/// The HTTP control plane of remote mode, with the token from `APONO_TOKEN` or `APONO_TOKEN_FILE`.
pub fn remote_control_plane(config: &Config, url: &str) -> anyhow::Result<HttpControlPlane> {
    let cp = HttpControlPlane::with_insecure_http(
        url,
        &config.control_plane.connector_id,
        config.control_plane.token.clone(),
        config.control_plane.allow_insecure_http,
    )?;
    Ok(match &config.control_plane.token_file {
        Some(path) => cp.with_token_file(path.clone()),
        None => cp,
    })
}
