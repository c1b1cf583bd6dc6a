//! The command line (DESIGN.md §8, a contract): parse, set up logging, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use apono_connector::commands::{self, DEFAULT_CONTROL_PLANE, Refused, Stdout};
use apono_connector::config::{Config, TelemetryConfig};
use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::AccessRequestCreate;
use apono_connector::integrations::{GrantRequest, Owner, Resource, RevokeRequest, Subject};
use apono_connector::sim::{DatasetSize, RancherVersion, Sim, SimOptions};
use apono_connector::telemetry;

/// Shown by `--help` of every command: scripts branch on these.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (one line on stderr says what is wrong)
  2  usage error (unknown flag, missing or malformed argument)
  3  not ready or refused: `healthcheck` got no 200 answer; `check` has a FAILED row; the operator
     API refused the operator token (`access ...`); the data dir is locked by another process
     (`run`, `control-plane serve`)";

/// `run --help`: the daemon's settings that have no flag (DESIGN.md §9; README \"Configuration\").
const RUN_ENV: &str = "\
Environment (each overrides the config file's key):
  APONO_URL                         remote control plane (a bare host means https); unset: standalone
  APONO_TOKEN                       token for the remote control plane
  APONO_TOKEN_FILE                  read the token from this file (re-read when refused)
  APONO_CONNECTOR_ID, CONNECTOR_ID  connector id [default: standalone]
  APONO_ALLOW_INSECURE_HTTP         allow an http:// APONO_URL to another host (cleartext) [default: false]
  APONO_ACTIONS_PARALLELISM         jobs run at once [default: 8]
  APONO_ALLOWED_RANCHER_HOSTS       the only Rancher hosts jobs may send keys to (host[:port], ...)
  APONO_DATA_DIR                    standalone state (SQLite, operator token) [default: ./data]
  APONO_LISTEN_ADDR                 standalone operator API [default: 127.0.0.1:8790]
  APONO_DATABASE_URL                standalone state in PostgreSQL (postgres://...), shared by replicas
  APONO_DATABASE_URL_FILE           the same URL in a file (read again at each new connection)
  APONO_OPERATOR_TOKEN              operator token (required with a database; the same on every replica)
  APONO_OPERATOR_TOKEN_FILE         the operator token in a file
  APONO_LOG_FORMAT                  text or json [default: text]
  APONO_LOG_LEVEL                   tracing filter [default: info]
  APONO_HEALTH_ADDR                 /healthz, /readyz, /metrics [default: 0.0.0.0:8080]
  ALLOWED_SECRETS_TO_READ           comma-separated Kubernetes secrets the agent may read
  HASHICORP_VAULT_CONFIG            Vault definitions (JSON list)
  HASHICORP_VAULT_CONFIG_FILE_PATH  the same list in a file (re-read when it changes)
  VAULT_NAMESPACE                   Vault namespace of a definition that names none
  APONO_SECRET_CACHE_TTL_SECONDS    how long a read secret is reused [default: 300; 0: never]
  APONO_REQUIRE_READ_MARK           AZURE and/or GCP: require the read mark there too
  HTTPS_PROXY, NO_PROXY             proxy for the control plane and Rancher
  SSL_CERT_FILE                     extra trusted CA certificates
  NO_COLOR                          no colour in logs (there is none when stderr is not a terminal)";

/// `--help` of the one-shot commands that read a secret store.
const SECRET_ENV: &str = "\
Environment: the secret stores' settings (ALLOWED_SECRETS_TO_READ, HASHICORP_VAULT_CONFIG,
HASHICORP_VAULT_CONFIG_FILE_PATH, VAULT_NAMESPACE, APONO_REQUIRE_READ_MARK) and each cloud SDK's
own variables (AWS_REGION, AWS_ENDPOINT_URL, ...); APONO_LOG_LEVEL (default warn) for logs.";

#[derive(Parser)]
#[command(
    name = "apono-connector",
    version,
    about = "Just-in-time access to Rancher, with credentials that stay in your secret stores",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The config file, for every command that reads one.
#[derive(Args)]
struct ConfigFile {
    /// TOML config file (`config/connector.example.toml` documents every key); environment
    /// variables override its keys. Without it, /etc/apono-connector/connector.toml is read when
    /// it exists.
    #[arg(long, env = "APONO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (remote mode if APONO_URL is set, else standalone with the embedded control plane).
    #[command(after_help = RUN_ENV)]
    Run {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// One command, nothing to install: simulator + embedded control plane + agent; grant with TTL, auto-revoke.
    Demo {
        /// How long the demo's access lasts.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Validate the configuration, reach the control plane, every secret and every integration;
    /// print a table of checks. Exit 3 when a check fails.
    #[command(after_help = RUN_ENV)]
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Ask the health server whether the daemon is ready (the image's HEALTHCHECK, the chart's
    /// `helm test`): exit 0 on a 200 answer, 3 otherwise.
    Healthcheck {
        /// The URL to ask. Default: /readyz (or /healthz with --live) on the port of
        /// APONO_HEALTH_ADDR (from the environment or the config file), on loopback when it binds
        /// every address.
        #[arg(long, value_name = "URL", value_parser = health_url)]
        url: Option<String>,
        /// Ask /healthz (the process answers) instead of /readyz (it can take jobs).
        #[arg(long, conflicts_with = "url")]
        live: bool,
        /// How long to wait for the answer.
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_seconds: u64,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Secret-store commands.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// One-shot discovery: NDJSON on stdout, progress on stderr.
    #[command(after_help = SECRET_ENV)]
    Discover {
        /// Integration JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        integration: String,
    },
    /// One-shot grant; prints the result as one JSON object.
    #[command(after_help = SECRET_ENV)]
    Grant {
        /// Integration JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        integration: String,
        #[command(flatten)]
        target: Target,
        /// Create a missing local user with a generated password (shown once in the result).
        #[arg(long)]
        create_user: bool,
        /// Mark the binding with an expiry this far ahead (e.g. 2h): a `sweep` removes it after.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// One-shot revoke: removes the one-shot grants' bindings and connector bindings whose marked
    /// expiry has passed; leaves (and names in `notes`) a binding a running connector's live
    /// access holds, and a person's. Prints the result as one JSON object.
    #[command(after_help = SECRET_ENV)]
    Revoke {
        /// Integration JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        integration: String,
        #[command(flatten)]
        target: Target,
        /// Remove every matching binding: a person's, and a binding a live access of a running
        /// connector holds (clean-up by hand; that access then loses its access until it is repaired).
        #[arg(long)]
        all: bool,
    },
    /// Remove the connector's bindings whose marked expiry has passed; prints what it removed.
    #[command(after_help = SECRET_ENV)]
    Sweep {
        /// Integration JSON, or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
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
    /// The control plane's state (moving an install to PostgreSQL).
    #[cfg(feature = "store-postgres")]
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Simulators for demos and benchmarks.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Print a shell completion script (e.g. `apono-connector completions bash > /etc/bash_completion.d/apono-connector`).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    Man {
        /// Write apono-connector.1 and one page per subcommand here instead of printing the main page.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
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
    #[command(after_help = SECRET_ENV)]
    Get {
        /// The secret reference, as in an integration's `secret_store` (JSON or @FILE), e.g.
        /// {"type":"AWS","region":"eu-west-1","secret_id":"rancher-api-key"}.
        #[arg(long, value_name = "JSON|@FILE")]
        store: String,
        /// Print the values themselves (they end up in your terminal's scrollback).
        #[arg(long)]
        reveal: bool,
    },
}

/// Where the operator API is and where its token comes from.
#[derive(clap::Args)]
struct OperatorEndpoint {
    /// The operator API of `run` (standalone) or `control-plane serve`.
    #[arg(long, env = "APONO_CONTROL_PLANE", value_name = "URL", default_value = DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// The daemon's config file: its data dir holds the operator token (`operator.token`). Without
    /// it the data dir is APONO_DATA_DIR, else ./data; APONO_OPERATOR_TOKEN overrides both. Default:
    /// /etc/apono-connector/connector.toml when it exists.
    #[arg(long, env = "APONO_CONFIG", value_name = "FILE")]
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
        #[arg(long, value_name = "NAME|JSON|@FILE")]
        integration: String,
        #[command(flatten)]
        target: Target,
        /// How long the access lasts (e.g. 30m, 2h, 1d); revoked when it ends.
        #[arg(long, value_name = "DURATION", value_parser = access_ttl)]
        ttl: Duration,
        /// Create a missing local user with a generated password (shown once in the result).
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
        /// The access request's id (the `id` of `access request`, the ID column of `access list`).
        id: String,
        #[command(flatten)]
        endpoint: OperatorEndpoint,
    },
}

#[derive(Subcommand)]
enum ControlPlaneCommand {
    /// Serve the embedded control plane (agent protocol and operator API) for remote agents,
    /// which set APONO_URL to it and APONO_TOKEN to the same token.
    #[command(
        after_help = "Environment: APONO_TOKEN or APONO_TOKEN_FILE (required: the token agents present), \
                            APONO_HEALTH_ADDR, APONO_LOG_FORMAT, APONO_LOG_LEVEL."
    )]
    Serve {
        /// Address to serve on (agents and operators connect here).
        #[arg(long, env = "APONO_LISTEN_ADDR", value_name = "ADDR", value_parser = listen_addr)]
        listen: Option<std::net::SocketAddr>,
        /// The state (SQLite) and the operator token.
        #[arg(long, env = "APONO_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigFile,
    },
}

#[cfg(feature = "store-postgres")]
#[derive(Subcommand)]
enum StateCommand {
    /// Copy a stopped install's SQLite state (live accesses included) into an empty PostgreSQL
    /// database; prints what was copied as JSON. Refuses a database that already holds state.
    Copy {
        /// The data dir of the install to move (its daemon stopped).
        #[arg(long, value_name = "DATA_DIR")]
        from: PathBuf,
        /// postgres://USER:PASSWORD@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=CA].
        #[arg(long, env = "APONO_DATABASE_URL", hide_env_values = true, value_name = "URL")]
        to: String,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// Serve the Rancher simulator.
    Rancher {
        /// Address to serve on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Dataset: `small` (a few objects with fixed ids) or `large` (about 82,000 objects).
        #[arg(long, default_value = "small")]
        size: DatasetSize,
        /// Latency added to every request, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 0)]
        latency_ms: u64,
        /// The Rancher release to behave as (2.8 to 2.16; e.g. 2.10, 2.12, 2.13): binding status
        /// (2.11+), the unknown-project answer (2.12+), duplicate checks (2.14+, 2.15+).
        #[arg(long, value_name = "2.MINOR", default_value = "2.13")]
        version: RancherVersion,
        /// Make the simulator's API key expire this many days from now (the key-expiry metric and alert).
        #[arg(long, value_name = "DAYS")]
        key_expires_in_days: Option<u32>,
        /// Serve https with a self-signed certificate made at start, written (PEM) to this file:
        /// give it to the integration as `certificate_authority`. `/sim/stats` counts handshakes.
        #[arg(long, value_name = "PATH")]
        tls_cert: Option<std::path::PathBuf>,
    },
}

/// The command line as `--help`, completions and the man pages show it: every subcommand's help
/// ends with the exit codes too, after its own notes (deploy review N14).
fn cli_command() -> clap::Command {
    fn with_exit_codes(cmd: clap::Command) -> clap::Command {
        let after = match cmd.get_after_help().map(ToString::to_string) {
            Some(text) if text.contains(EXIT_CODES) => text,
            Some(text) => format!("{text}\n\n{EXIT_CODES}"),
            None => EXIT_CODES.to_string(),
        };
        cmd.after_help(after).mut_subcommands(with_exit_codes)
    }
    with_exit_codes(Cli::command())
}

/// The tree the man pages describe: no `help` subcommands (there is no page for them).
fn man_command() -> clap::Command {
    fn without_help(cmd: clap::Command) -> clap::Command {
        cmd.disable_help_subcommand(true).mut_subcommands(without_help)
    }
    let mut cmd = without_help(cli_command());
    cmd.build();
    cmd
}

/// One page per command, named as `clap_mangen::generate_to` names them.
fn write_man_pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub.clone(), dir)?;
    }
    let mut file = std::fs::File::create(dir.join(clap_mangen::Man::new(cmd.clone()).get_filename()))?;
    render_man(&cmd, &mut file)
}

/// clap_mangen's sections, then each block of the help's closing notes as a section of its own
/// (ENVIRONMENT, EXIT STATUS) printed verbatim: roff would reflow their aligned tables.
fn render_man(cmd: &clap::Command, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    let notes = cmd.get_after_help().map(ToString::to_string).unwrap_or_default();
    for block in notes.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let title = match block {
            b if b.starts_with("Exit codes") => "EXIT STATUS",
            b if b.starts_with("Environment") => "ENVIRONMENT",
            _ => "NOTES",
        };
        writeln!(w, ".SH \"{title}\"\n.nf")?;
        for line in block.lines() {
            // roff: a backslash is `\e`; a line starting with `.` or `'` would be a request.
            let line = line.replace('\\', "\\e");
            let guard = if line.starts_with(['.', '\'']) { "\\&" } else { "" };
            writeln!(w, "{guard}{line}")?;
        }
        writeln!(w, ".fi")?;
    }
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

// Malformed arguments are usage errors (exit 2) like those clap finds itself, so they are
// checked while parsing (deploy review N13).

/// `access request --ttl`: a duration of at least 1 s.
fn access_ttl(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(ttl) if ttl.as_secs() >= 1 => Ok(ttl),
        Ok(_) => Err("--ttl must be at least 1s".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `healthcheck --url`: an http:// or https:// URL.
fn health_url(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(s.to_string()),
        Ok(_) => Err(format!("{s:?}: expected an http:// or https:// URL")),
        Err(e) => Err(format!("{s:?} is not a URL: {e}")),
    }
}

/// `secret get --store`: JSON (or @FILE) that is a secret reference of a known store type.
/// Checked after parsing, not by clap: clap's message would echo the value, which may hold
/// inline credentials.
fn secret_ref_arg(s: &str) -> Result<(), String> {
    let json = commands::read_json_arg(s, "--store").map_err(|e| format!("{e:#}"))?;
    serde_json::from_value::<apono_connector::secrets::SecretRef>(json)
        .map(|_| ())
        .map_err(|e| format!("--store is not a secret reference such as {{\"type\":\"AWS\",\"region\":\"...\",\"secret_id\":\"...\"}}: {e}"))
}

/// `--listen` / `APONO_LISTEN_ADDR`: the error names both, since either may have given it.
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address such as 0.0.0.0:8790 (from --listen or APONO_LISTEN_ADDR)"))
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = match cli_command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say_error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(dispatch(cli.command));
    // Queued log lines first, then the one-line error (both go to stderr).
    telemetry::flush_logs();
    match outcome {
        Ok(code) => code,
        Err(e) => {
            let code = commands::exit_code(&e);
            match e.downcast_ref::<Refused>() {
                // Already one line that says what was refused.
                Some(refused) => say(&refused.to_string()),
                None => say_error(&format!("{e:#}").replace('\n', " ")),
            }
            ExitCode::from(code)
        }
    }
}

/// glibc's malloc settings for a small, long-running daemon, set before any thread starts so the
/// binary has them as the README runs it (no environment needed); a setting the operator gives
/// in the environment (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) wins. Measured in the
/// mass-expiry benchmark (README "Benchmarks"), each about 5 MB of peak RSS, at no cost in CPU
/// per job:
/// - one arena: by default each thread that allocates while another does gets an arena of its
///   own (up to 8 per core), each keeping what it freed; the threads here are few (the runtime's,
///   one per core) and short-locked;
/// - a fixed mmap threshold (128 KiB, glibc's starting value): otherwise it rises with every
///   large block freed (up to 32 MiB), and large buffers (an answer listing every access, a
///   Rancher listing) then come from the heap, where they leave it fragmented.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (env, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 128 * 1024),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only sets a number in glibc's allocator state; no thread has
            // started yet, and no pointer is passed.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

/// The one-line error on stderr. A closed stderr (`... 2>&1 | head`) must not turn a failure
/// into a panic: `eprintln!` would panic, so the write error is ignored.
fn say_error(message: &str) {
    say(&format!("error: {message}"));
}

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    commands::print_line(&serde_json::to_string(value)?)?;
    Ok(())
}

/// Remote mode without `APONO_ALLOWED_RANCHER_HOSTS`: the control plane decides which hosts get
/// the keys this agent reads. Said once at start, and as a gauge to alert on.
fn warn_if_hosts_unrestricted(config: &Config) {
    let unrestricted = apono_connector::agent::HostPolicy::from_config(config).unrestricted();
    telemetry::metrics()
        .rancher_hosts_unrestricted
        .set(i64::from(unrestricted));
    if unrestricted {
        tracing::warn!(
            "APONO_ALLOWED_RANCHER_HOSTS is not set: the control plane decides which Rancher hosts receive the keys \
             this agent reads from your secret stores; set it to the hosts you run"
        );
    }
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
            let config = Config::load(config.config.as_deref())?;
            telemetry::init(&config.telemetry);
            warn_if_hosts_unrestricted(&config);
            commands::run(config, commands::shutdown_on_signal()).await?;
        }
        Command::Demo { ttl } => {
            quiet_logs();
            apono_connector::demo::run(&mut Stdout::default(), ttl).await?;
        }
        Command::Check { config } => {
            quiet_logs();
            let rows = commands::check(config.config.as_deref()).await;
            let width = rows.iter().map(|(what, _)| what.len()).max().unwrap_or(0);
            let mut ok = true;
            for (what, result) in &rows {
                let line = match result {
                    Ok(detail) => format!("{:<8} {:<width$}  {detail}", "ok", what),
                    Err(e) => {
                        ok = false;
                        format!("{:<8} {:<width$}  {e}", "FAILED", what)
                    }
                };
                commands::print_line(&line)?;
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(commands::EXIT_NOT_READY)
            });
        }
        Command::Healthcheck {
            url,
            live,
            timeout_seconds,
            config,
        } => {
            let url = match url {
                Some(url) => url,
                None => {
                    let config = Config::load(config.config.as_deref())
                        .context("finding the health address (APONO_HEALTH_ADDR); or give --url")?;
                    commands::health_url(config.telemetry.health_addr, live)?
                }
            };
            let answer = commands::healthcheck(&url, Duration::from_secs(timeout_seconds)).await?;
            commands::print_line(&answer)?;
        }
        Command::Secret {
            command: SecretCommand::Get { store, reveal },
        } => {
            if let Err(e) = secret_ref_arg(&store) {
                say_error(&e);
                return Ok(ExitCode::from(2));
            }
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
                    owner: Some(Owner::cli()),
                    keep_password: false,
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
                    owner: Some(Owner::cli()),
                    bound_subject: None,
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
            let mut config = Config::load(config.config.as_deref())?;
            if let Some(listen) = listen {
                config.standalone.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.standalone.data_dir = dir;
            }
            telemetry::init(&config.telemetry);
            commands::serve_control_plane(config, commands::shutdown_on_signal()).await?;
        }
        #[cfg(feature = "store-postgres")]
        Command::State {
            command: StateCommand::Copy { from, to },
        } => {
            let to = secrecy::SecretString::from(to);
            let copied = apono_connector::control_plane::embedded::copy_state(&from, &to)?;
            print_json(&copied)?;
        }
        Command::Sim {
            command:
                SimCommand::Rancher {
                    listen,
                    size,
                    latency_ms,
                    version,
                    key_expires_in_days,
                    tls_cert,
                },
        } => {
            quiet_logs();
            let sim = Sim::new(SimOptions {
                size,
                latency: Duration::from_millis(latency_ms),
                version,
                key_expires_at: key_expires_in_days.map(|d| chrono::Utc::now() + chrono::Duration::days(d.into())),
                ..SimOptions::default()
            });
            let (access_key, secret_key) = sim.api_key();
            // Written before the port opens: whoever waits for the port can read it then.
            let tls = match &tls_cert {
                Some(path) => {
                    let tls = apono_connector::sim::TlsIdentity::self_signed().map_err(anyhow::Error::msg)?;
                    std::fs::write(path, tls.cert_pem()).with_context(|| format!("writing {}", path.display()))?;
                    Some(tls)
                }
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            say(&format!(
                "Rancher {version} simulator on {scheme}://{addr}  (API key {access_key}:{secret_key}; a simulator key, not a secret)"
            ));
            let shutdown = commands::shutdown_on_signal();
            let stop = async move { shutdown.cancelled().await };
            match tls {
                Some(tls) => sim.serve_tls(listener, &tls, stop).await?,
                None => sim.serve(listener, stop).await?,
            }
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli_command(), "apono-connector", &mut script);
            commands::print_bytes(&script)?;
        }
        Command::Man { out_dir } => match out_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                write_man_pages(man_command(), &dir)
                    .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            }
            None => {
                let mut page = Vec::new();
                render_man(&man_command(), &mut page)?;
                commands::print_bytes(&page)?;
            }
        },
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
            .await
            .map_err(|e| commands::operator_refusal(e, &endpoint.control_plane))?;
            print_json(&access)?;
        }
        AccessCommand::List { json, endpoint } => {
            let list = endpoint
                .client()?
                .list_access()
                .await
                .map_err(|e| commands::operator_refusal(e.into(), &endpoint.control_plane))?;
            if json {
                print_json(&list)?;
            } else {
                commands::print_bytes(commands::access_table(&list).as_bytes())?;
            }
        }
        AccessCommand::Revoke { id, endpoint } => {
            let access = endpoint
                .client()?
                .revoke_access(&id)
                .await
                .map_err(|e| commands::operator_refusal(e.into(), &endpoint.control_plane))?;
            print_json(&access)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command explains itself in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !cmd.is_hide_set() {
                missing.push(format!("{path} (the command itself)"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        let mut cmd = Cli::command();
        cmd.build();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
