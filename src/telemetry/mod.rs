//! Telemetry: logs (a tracing subscriber writing text or JSON to stderr), Prometheus metrics
//! ([`metrics`]) and the operator's HTTP endpoints ([`health`]: `/healthz`, `/readyz`, `/metrics`).

pub mod health;
pub mod metrics;
pub mod serve;

pub use health::Readiness;
pub use metrics::metrics;
pub use serve::{Limits, serve as serve_hardened};

use std::io::{self, IsTerminal, Write};

use tracing::Dispatch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber ([`subscriber`], writing to stderr). A filter that does not
/// parse falls back to `info` with a warning rather than stopping the agent. Calling it twice is
/// harmless (the second is ignored).
pub fn init(config: &TelemetryConfig) {
    let ansi = colour_allowed(io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    let logs = subscriber(config, || LossyStderr, ansi);
    if logs.dispatch.try_init().is_ok()
        && let Some(e) = logs.bad_filter
    {
        tracing::warn!(level = %config.log_level, error = %e, "APONO_LOG_LEVEL does not parse; using info");
    }
}

/// The production subscriber, not yet installed.
pub struct Logs {
    pub dispatch: Dispatch,
    /// Why `log_level` did not parse (the subscriber then logs at `info`).
    pub bad_filter: Option<String>,
}

/// The subscriber the daemon logs through (filter, text or JSON format, span fields), writing
/// to `writer`. One builder for [`init`] and for tests: the canary test installs this very
/// subscriber at trace level to prove that what the daemon would print carries no secret.
pub fn subscriber<W>(config: &TelemetryConfig, writer: W, ansi: bool) -> Logs
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, bad_filter) = match EnvFilter::try_new(quiet_clients(&config.log_level)) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(quiet_clients("info")), Some(e.to_string())),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    let dispatch = match config.log_format {
        // The message at the top level (`flatten_event`), where log pipelines look for it.
        LogFormat::Json => Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_ansi(false)
                .finish(),
        ),
        LogFormat::Text => Dispatch::new(builder.with_target(false).with_ansi(ansi).finish()),
    };
    Logs { dispatch, bad_filter }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but the empty string
/// (no-color.org): escape codes in a file or a log collector are noise.
pub fn colour_allowed(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Stderr that never fails. When stderr is closed (`run 2>&1 | head -1`) a log line is lost, not
/// the process: tracing-subscriber would otherwise report the failed write with `eprintln!`,
/// which panics on EPIPE, in whichever task was logging (the SIGTERM handler logs before it
/// cancels, so the daemon would ignore SIGTERM).
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Ignored on purpose: there is nowhere left to report a failed log write.
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// The Vault client's HTTP layer (`rustify`) logs every refused request at ERROR, its own way,
/// beside the connector's own message that names the vault and what to do (secrets review N9):
/// off unless the filter names it; `vaultrs` from WARN.
fn quiet_clients(filter: &str) -> String {
    let mut out = filter.trim().to_string();
    for (target, level) in [("rustify", "off"), ("vaultrs", "warn")] {
        if !out.contains(target) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&format!("{target}={level}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_vault_clients_own_error_logs_are_off_unless_named() {
        assert_eq!(quiet_clients("info"), "info,rustify=off,vaultrs=warn");
        assert_eq!(quiet_clients(""), "rustify=off,vaultrs=warn");
        assert_eq!(quiet_clients("debug,rustify=trace"), "debug,rustify=trace,vaultrs=warn");
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log_one(format: LogFormat, ansi: bool) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let config = TelemetryConfig {
            log_format: format,
            log_level: "info".into(),
            ..TelemetryConfig::default()
        };
        let logs = subscriber(&config, move || writer.clone(), ansi);
        tracing::dispatcher::with_default(&logs.dispatch, || {
            tracing::info_span!("job", id = "j-1").in_scope(|| tracing::info!(jobs = 3, "agent started"));
        });
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_lines_carry_the_message_at_the_top_level() {
        let line = log_one(LogFormat::Json, false);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["message"], "agent started", "{line}");
        assert_eq!(v["jobs"], 3, "{line}");
        assert!(v.get("fields").is_none(), "{line}");
        assert_eq!(v["span"]["id"], "j-1", "{line}");
    }

    #[test]
    fn text_lines_have_no_escape_codes_unless_allowed() {
        assert!(!log_one(LogFormat::Text, false).contains('\u{1b}'));
        assert!(log_one(LogFormat::Text, true).contains('\u{1b}'), "the switch works");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(
            colour_allowed(true, Some("".into())),
            "an empty NO_COLOR does not count"
        );
        assert!(!colour_allowed(true, Some("1".into())));
        assert!(!colour_allowed(false, None));
    }
}
