//! The command line (DESIGN.md §8, a contract): parse, set up logging, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use apono_connector::commands::{self, DEFAULT_CONTROL_PLANE};
use apono_connector::config::{Config, TelemetryConfig};
use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::AccessRequestCreate;
use apono_connector::integrations::{GrantRequest, Resource, RevokeRequest, Subject};
use apono_connector::sim::{DatasetSize, Sim, SimOptions};
use apono_connector::telemetry;

#[derive(Parser)]
#[command(
    name = "apono-connector",
    version,
    about = "Just-in-time access to Rancher, with credentials that stay in your secret stores"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (remote mode if APONO_URL is set, else standalone with the embedded control plane).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// One command, nothing to install: simulator + embedded control plane + agent; grant with TTL, auto-revoke.
    Demo {
        /// How long the demo's access lasts.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Validate the configuration and print a table of checks; non-zero exit on failure.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Secret-store commands.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// One-shot discovery: NDJSON on stdout, progress on stderr.
    Discover {
        /// Integration JSON, or @FILE.
        #[arg(long)]
        integration: String,
    },
    /// One-shot grant; prints the result as one JSON object.
    Grant {
        #[arg(long)]
        integration: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        create_user: bool,
        /// Mark the binding with an expiry this far ahead (e.g. 2h): a `sweep` removes it after.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// One-shot revoke of the connector's own bindings; prints the result as one JSON object.
    Revoke {
        #[arg(long)]
        integration: String,
        #[command(flatten)]
        target: Target,
        /// Remove every matching binding, also those the connector did not make (clean-up by hand).
        #[arg(long)]
        all: bool,
    },
    /// Remove the connector's bindings whose marked expiry has passed; prints what it removed.
    Sweep {
        #[arg(long)]
        integration: String,
        /// Show what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Operator commands against a control plane (default: the standalone one on 127.0.0.1:8790).
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// The embedded control plane alone, for remote agents.
    ControlPlane {
        #[command(subcommand)]
        command: ControlPlaneCommand,
    },
    /// Simulators for demos and benchmarks.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// A Rancher username, or a principal id (`github_user://123`, `local://u-abc`).
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    user: Option<String>,
    /// A group principal id.
    #[arg(long)]
    group: Option<String>,
    /// Global role id or role template id.
    #[arg(long)]
    role: String,
    /// `global`, a cluster id, or a project id (c-x:p-y).
    #[arg(long)]
    resource: String,
}

impl Target {
    fn parts(&self) -> anyhow::Result<(Subject, String, Resource)> {
        let subject = match (&self.user, &self.group) {
            (Some(u), None) => Subject::user(u),
            (None, Some(g)) => Subject::GroupPrincipal(g.clone()),
            _ => anyhow::bail!("give --user or --group"),
        };
        let resource = Resource::parse(&self.resource).map_err(anyhow::Error::msg)?;
        Ok((subject, self.role.clone(), resource))
    }
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Resolve a secret reference; print its keys as JSON, values shown as "***" unless --reveal.
    Get {
        #[arg(long)]
        store: String,
        #[arg(long)]
        reveal: bool,
    },
}

/// Where the operator API is and where its token comes from.
#[derive(clap::Args)]
struct OperatorEndpoint {
    #[arg(long, default_value = DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// The daemon's config file: its data dir holds the operator token (`operator.token`). Without
    /// it the data dir is `APONO_DATA_DIR`, else `./data`; `APONO_OPERATOR_TOKEN` overrides both.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl OperatorEndpoint {
    fn client(&self) -> anyhow::Result<OperatorClient> {
        commands::operator_client(&self.control_plane, self.config.as_deref())
    }
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Request time-boxed access.
    Request {
        /// An integration name declared in the control plane, or integration JSON / @FILE.
        #[arg(long)]
        integration: String,
        #[command(flatten)]
        target: Target,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        create_user: bool,
        /// Return at once instead of waiting for the grant to settle.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: OperatorEndpoint,
    },
    /// List access requests.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: OperatorEndpoint,
    },
    /// End an access now.
    Revoke {
        id: String,
        #[command(flatten)]
        endpoint: OperatorEndpoint,
    },
}

#[derive(Subcommand)]
enum ControlPlaneCommand {
    Serve {
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// Serve the Rancher simulator.
    Rancher {
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "small")]
        size: DatasetSize,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say_error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            say_error(&format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The one-line error on stderr. A closed stderr (`... 2>&1 | head`) must not turn a failure
/// into a panic: `eprintln!` would panic, so the write error is ignored.
fn say_error(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "error: {message}");
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Logging for one-shot commands: warnings only, unless APONO_LOG_LEVEL says otherwise.
fn quiet_logs() {
    let level = std::env::var("APONO_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    telemetry::init(&TelemetryConfig {
        log_level: level,
        ..TelemetryConfig::default()
    });
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = Config::load(config.as_deref())?;
            telemetry::init(&config.telemetry);
            commands::run(config, commands::shutdown_on_signal()).await?;
        }
        Command::Demo { ttl } => {
            quiet_logs();
            let mut out = std::io::stdout();
            apono_connector::demo::run(&mut out, ttl).await?;
        }
        Command::Check { config } => {
            quiet_logs();
            let rows = commands::check(config.as_deref()).await;
            let width = rows.iter().map(|(what, _)| what.len()).max().unwrap_or(0);
            let mut ok = true;
            for (what, result) in &rows {
                match result {
                    Ok(detail) => println!("{:<8} {:<width$}  {detail}", "ok", what),
                    Err(e) => {
                        ok = false;
                        println!("{:<8} {:<width$}  {e}", "FAILED", what)
                    }
                }
            }
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Command::Secret {
            command: SecretCommand::Get { store, reveal },
        } => {
            quiet_logs();
            print_json(&commands::secret_get(&store, reveal).await?)?;
        }
        Command::Discover { integration } => {
            quiet_logs();
            commands::discover(commands::parse_integration(&integration)?).await?;
        }
        Command::Grant {
            integration,
            target,
            create_user,
            ttl,
        } => {
            quiet_logs();
            let (subject, role, resource) = target.parts()?;
            let expires_at = match ttl {
                Some(ttl) => Some(
                    chrono::Duration::from_std(ttl)
                        .ok()
                        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                        .context("--ttl is too long")?,
                ),
                None => None,
            };
            let result = commands::grant(
                commands::parse_integration(&integration)?,
                GrantRequest {
                    subject,
                    role,
                    resource,
                    create_user,
                    grant_id: Some(format!("cli-{}", uuid::Uuid::now_v7())),
                    expires_at,
                },
            )
            .await?;
            print_json(&result)?;
        }
        Command::Sweep { integration, dry_run } => {
            quiet_logs();
            let result = commands::sweep(commands::parse_integration(&integration)?, dry_run).await?;
            print_json(&result)?;
        }
        Command::Revoke {
            integration,
            target,
            all,
        } => {
            quiet_logs();
            let (subject, role, resource) = target.parts()?;
            let result = commands::revoke(
                commands::parse_integration(&integration)?,
                RevokeRequest {
                    subject,
                    role,
                    resource,
                    grant_id: None,
                    user_id: None,
                    binding_ids: Vec::new(),
                    all,
                },
            )
            .await?;
            print_json(&result)?;
        }
        Command::Access { command } => {
            quiet_logs();
            access(command).await?;
        }
        Command::ControlPlane {
            command:
                ControlPlaneCommand::Serve {
                    listen,
                    data_dir,
                    config,
                },
        } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(listen) = listen {
                config.standalone.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.standalone.data_dir = dir;
            }
            telemetry::init(&config.telemetry);
            commands::serve_control_plane(config, commands::shutdown_on_signal()).await?;
        }
        Command::Sim {
            command:
                SimCommand::Rancher {
                    listen,
                    size,
                    latency_ms,
                },
        } => {
            quiet_logs();
            let sim = Sim::new(SimOptions {
                size,
                latency: Duration::from_millis(latency_ms),
                ..SimOptions::default()
            });
            let (access_key, secret_key) = sim.api_key();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            eprintln!(
                "Rancher simulator on http://{addr}  (API key {access_key}:{secret_key}; a simulator key, not a secret)"
            );
            let shutdown = commands::shutdown_on_signal();
            sim.serve(listener, async move { shutdown.cancelled().await }).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn access(command: AccessCommand) -> anyhow::Result<()> {
    match command {
        AccessCommand::Request {
            integration,
            target,
            ttl,
            create_user,
            no_wait,
            endpoint,
        } => {
            let (subject, role, resource) = target.parts()?;
            if ttl.as_secs() == 0 {
                anyhow::bail!("--ttl must be at least 1s");
            }
            let wait = if no_wait {
                Duration::ZERO
            } else {
                Duration::from_secs(60)
            };
            let access = commands::access_request(
                &endpoint.client()?,
                &integration,
                |integration| AccessRequestCreate {
                    integration,
                    subject,
                    role,
                    resource,
                    ttl_seconds: ttl.as_secs(),
                    create_user,
                },
                wait,
            )
            .await?;
            print_json(&access)?;
        }
        AccessCommand::List { json, endpoint } => {
            let list = endpoint.client()?.list_access().await?;
            if json {
                print_json(&list)?;
            } else {
                print!("{}", commands::access_table(&list));
            }
        }
        AccessCommand::Revoke { id, endpoint } => {
            print_json(&endpoint.client()?.revoke_access(&id).await?)?;
        }
    }
    Ok(())
}
