//! Telemetry: logs (a tracing subscriber writing text or JSON to stderr), Prometheus metrics
//! ([`metrics`]) and the operator's HTTP endpoints ([`health`]: `/healthz`, `/readyz`, `/metrics`).

pub mod health;
pub mod metrics;
pub mod serve;

pub use health::Readiness;
pub use metrics::metrics;
pub use serve::{Limits, serve as serve_hardened};

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber. A filter that does not parse falls back to `info` with a
/// warning rather than stopping the agent. Calling it twice is harmless (the second is ignored).
pub fn init(config: &TelemetryConfig) {
    let (filter, bad_filter) = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false);
    let installed = match config.log_format {
        LogFormat::Json => builder.json().with_current_span(true).try_init().is_ok(),
        LogFormat::Text => builder.with_target(false).try_init().is_ok(),
    };
    if installed && let Some(e) = bad_filter {
        tracing::warn!(level = %config.log_level, error = %e, "APONO_LOG_LEVEL does not parse; using info");
    }
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
