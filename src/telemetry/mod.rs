//! Telemetry: logs (a tracing subscriber writing text or JSON to stderr), Prometheus metrics
//! ([`metrics`]) and the operator's HTTP endpoints ([`health`]: `/healthz`, `/readyz`, `/metrics`).

pub mod health;
pub mod metrics;
pub mod serve;

pub use health::Readiness;
pub use metrics::metrics;
pub use serve::{Limits, serve as serve_hardened};

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Dispatch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Lines the log writer holds while stderr is not being read; past it, lines are dropped and
/// counted (`apono_connector_log_lines_dropped_total`), so a stalled reader never stalls the daemon.
pub const LOG_BUFFER_LINES: usize = 8_192;

/// The log writer's thread, kept until [`flush_logs`].
static LOG_WRITER: Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> = Mutex::new(None);

/// Installs the global subscriber ([`subscriber`], writing to stderr through a bounded,
/// non-blocking, lossy queue: a full pipe loses log lines, never the daemon's progress or its
/// SIGTERM). A filter that does not parse falls back to `info` with a warning rather than
/// stopping the agent. Calling it twice is harmless (the second is ignored). Call
/// [`flush_logs`] before the process exits.
pub fn init(config: &TelemetryConfig) {
    let ansi = colour_allowed(io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("apono-log-writer")
        .finish(LossyStderr);
    let logs = subscriber(config, CountDropped::new(writer), ansi);
    if logs.dispatch.try_init().is_ok() {
        if let Ok(mut slot) = LOG_WRITER.lock() {
            *slot = Some(guard);
        }
        if let Some(e) = logs.bad_filter {
            tracing::warn!(level = %config.log_level, error = %e, "APONO_LOG_LEVEL does not parse; using info");
        }
    }
}

/// Writes out the queued log lines, waiting about a second at most for a stalled stderr, and
/// stops the writer. Lines logged afterwards are lost.
pub fn flush_logs() {
    let guard = LOG_WRITER.lock().ok().and_then(|mut slot| slot.take());
    drop(guard);
}

/// The non-blocking writer, counting the lines it drops into the metrics.
#[derive(Clone)]
struct CountDropped {
    inner: tracing_appender::non_blocking::NonBlocking,
    dropped: tracing_appender::non_blocking::ErrorCounter,
    /// Drops already counted in the metric.
    seen: Arc<AtomicUsize>,
}

impl CountDropped {
    fn new(inner: tracing_appender::non_blocking::NonBlocking) -> CountDropped {
        let dropped = inner.error_counter();
        CountDropped {
            inner,
            dropped,
            seen: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn record_drops(&self) {
        let now = self.dropped.dropped_lines();
        let before = self.seen.swap(now, Ordering::Relaxed);
        if now > before {
            metrics().log_lines_dropped.inc_by((now - before) as u64);
        }
    }
}

impl Write for CountDropped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.record_drops();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<'a> MakeWriter<'a> for CountDropped {
    type Writer = CountDropped;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
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
    let ansi = ansi && config.log_format == LogFormat::Text;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(EscapeControls { inner: writer, ansi })
        .log_internal_errors(false);
    let dispatch = match config.log_format {
        // The message at the top level (`flatten_event`), where log pipelines look for it.
        LogFormat::Json => Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_ansi(false)
                .finish()
                .with(StrangerRateLimit::default()),
        ),
        LogFormat::Text => Dispatch::new(
            builder
                .with_target(false)
                .with_ansi(ansi)
                .finish()
                .with(StrangerRateLimit::default()),
        ),
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

/// Escapes control characters in each formatted line, so a value from outside (a username, a
/// job id, a Rancher error) cannot forge a log line with `\n` or drive a terminal with escape
/// sequences (security review N10). The line's own final newline stays; with colours on, only
/// colour codes (`ESC [ digits ; m`) pass, the formatter's own. JSON lines are already escaped.
struct EscapeControls<M> {
    inner: M,
    ansi: bool,
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapeControls<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter {
            inner: self.inner.make_writer(),
            ansi: self.ansi,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EscapingWriter {
            inner: self.inner.make_writer_for(meta),
            ansi: self.ansi,
        }
    }
}

struct EscapingWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> Write for EscapingWriter<W> {
    /// tracing-subscriber writes each event as one buffer ending in `\n`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if body.iter().any(|b| needs_escape(*b)) {
            self.inner.write_all(&escape_controls(buf, self.ansi))?;
        } else {
            self.inner.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// C0 controls but tab, and DEL. (C1 controls are two bytes in UTF-8 and handled in
/// [`escape_controls`].)
fn needs_escape(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f || b == 0xc2
}

/// `buf` with control characters written as `\n`, `\r`, `\x1b`, `\u{9b}`; a final `\n` kept.
fn escape_controls(buf: &[u8], ansi: bool) -> Vec<u8> {
    let (body, newline) = match buf.split_last() {
        Some((b'\n', body)) => (body, true),
        _ => (buf, false),
    };
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len() + 16);
    for (i, c) in text.char_indices() {
        match c {
            '\t' => out.push(c),
            '\x1b' if ansi && is_colour_code(&text[i..]) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (0x80..=0x9f).contains(&(c as u32)) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    let mut bytes = out.into_bytes();
    if newline {
        bytes.push(b'\n');
    }
    bytes
}

/// `ESC [ 0 ; 1 m` and the like: colour (SGR), which cannot move the cursor, clear the screen or
/// set a title.
fn is_colour_code(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("\x1b[") else {
        return false;
    };
    let params = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b';').count();
    rest.as_bytes().get(params) == Some(&b'm') && params <= 16
}

/// Warnings from the HTTP edge, where a stranger decides how often they happen (a refused
/// `Host` or `Origin`, a refused token): at most [`STRANGER_BURST`] per call site per
/// [`STRANGER_WINDOW`]; the rest are counted in `apono_connector_log_lines_suppressed_total`.
/// Without it, requests from anyone who can connect fill the log pipe (security review N6).
#[derive(Default)]
struct StrangerRateLimit {
    windows: Mutex<HashMap<tracing::callsite::Identifier, (Instant, u32)>>,
}

const STRANGER_TARGETS: &[&str] = &[
    "apono_connector::control_plane::server",
    "apono_connector::telemetry::serve",
];
const STRANGER_BURST: u32 = 5;
const STRANGER_WINDOW: Duration = Duration::from_secs(10);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StrangerRateLimit {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR || !STRANGER_TARGETS.iter().any(|t| meta.target().starts_with(t)) {
            return true;
        }
        let Ok(mut windows) = self.windows.lock() else {
            return true;
        };
        let now = Instant::now();
        let (start, count) = windows.entry(meta.callsite()).or_insert((now, 0));
        if now.duration_since(*start) >= STRANGER_WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count <= STRANGER_BURST {
            true
        } else {
            metrics().log_lines_suppressed.inc();
            false
        }
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
        capture(format, ansi, || {
            tracing::info_span!("job", id = "j-1").in_scope(|| tracing::info!(jobs = 3, "agent started"));
        })
    }

    fn capture(format: LogFormat, ansi: bool, log: impl FnOnce()) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let config = TelemetryConfig {
            log_format: format,
            log_level: "info".into(),
            ..TelemetryConfig::default()
        };
        let logs = subscriber(&config, move || writer.clone(), ansi);
        tracing::dispatcher::with_default(&logs.dispatch, log);
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A newline in a username or a job id cannot forge a line; escape sequences from Rancher
    /// reach the log escaped, on a terminal too (security review N10).
    #[test]
    fn values_from_outside_cannot_forge_lines_or_drive_the_terminal() {
        let forged = "eve\n2026-12-07T00:00:00.000000Z  INFO access revoked access=ar-FORGED";
        let rancher = "denied\x1b[2J\x1b[H\x1b]0;pwned\x07\r\u{9b}31m";
        for (format, ansi) in [
            (LogFormat::Text, false),
            (LogFormat::Text, true),
            (LogFormat::Json, false),
        ] {
            let out = capture(format, ansi, || {
                tracing::info_span!("job", id = %forged).in_scope(|| {
                    tracing::warn!(user = %forged, error = %rancher, "job failed");
                    tracing::warn!("{forged}");
                });
            });
            assert_eq!(out.lines().count(), 2, "{format:?} ansi={ansi}: {out}");
            assert!(out.lines().all(|l| !l.starts_with("2026-12-07T00")), "{out}");
            for raw in ["\x1b[2J", "\x1b[H", "\x1b]0", "\x07", "\r", "\u{9b}"] {
                assert!(!out.contains(raw), "{format:?} ansi={ansi}: {raw:?} in {out:?}");
            }
            assert!(
                out.contains("ar-FORGED") && out.contains("pwned"),
                "escaped, not dropped: {out}"
            );
        }
        assert!(
            capture(LogFormat::Text, true, || tracing::warn!("x")).contains("\x1b["),
            "colours still work"
        );
    }

    /// A writer that never returns: a stalled stderr.
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Err(io::Error::other("stalled"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_stalled_stderr_cannot_take_are_dropped_and_counted() {
        let (release, stalled) = std::sync::mpsc::channel();
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(4)
            .finish(Stalled(stalled));
        let mut writer = CountDropped::new(writer);
        let before = metrics().log_lines_dropped.get();
        let started = Instant::now();
        for _ in 0..100 {
            writer.write_all(b"a line\n").unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(1), "the writer blocked");
        assert!(metrics().log_lines_dropped.get() >= before + 90);
        drop(release);
        drop(guard);
    }

    #[test]
    fn warnings_from_the_http_edge_are_rate_limited() {
        let before = metrics().log_lines_suppressed.get();
        let out = capture(LogFormat::Text, false, || {
            for _ in 0..50 {
                tracing::warn!(target: "apono_connector::control_plane::server", "operator API call with a foreign Host refused");
            }
            for _ in 0..20 {
                tracing::warn!("job failed");
            }
        });
        let refused = out.lines().filter(|l| l.contains("foreign Host")).count();
        assert_eq!(refused, STRANGER_BURST as usize, "{out}");
        assert_eq!(
            out.lines().filter(|l| l.contains("job failed")).count(),
            20,
            "others are not limited"
        );
        assert!(metrics().log_lines_suppressed.get() >= before + 45);
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
