//! Shared test fixtures: the simulator, the embedded control plane and an agent in-process, and
//! child processes of the real binary guarded so they are killed by their own PID.
#![allow(dead_code)]

pub mod daemon;
pub mod scripted_cp;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apono_connector::agent::{Agent, AgentOptions, Executor};
use apono_connector::control_plane::embedded::{EmbeddedControlPlane, Options};
use apono_connector::control_plane::operator::{AccessRequest, AccessState, JobRecord, JobState};
use apono_connector::secrets::SecretStores;
use apono_connector::sim::{SimBinding, SimHandle, SimOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_apono-connector");

/// An integration JSON for a simulator, with the given API key.
pub fn integration_json(sim: &SimHandle, name: &str, access_key: &str, secret_key: &str) -> Value {
    json!({
        "type": "rancher",
        "name": name,
        "config": {"host": sim.base_url, "page_size": 2},
        "secret_store": {"type": "APONO", "credentials": {"access_key": access_key, "secret_key": secret_key}},
    })
}

/// The simulator's integration with its valid key.
pub fn sim_integration(sim: &SimHandle, name: &str) -> Value {
    let (a, s) = sim.sim.api_key();
    integration_json(sim, name, &a, &s)
}

/// Simulator + embedded control plane (in a temp dir) + agent, all in this process.
pub struct Stack {
    pub sim: SimHandle,
    pub cp: Arc<EmbeddedControlPlane>,
    pub dir: tempfile::TempDir,
    /// The agents' secret stores.
    stores: SecretStores,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(Duration::from_secs(10), true).await
    }

    /// `with_agent: false` leaves the jobs for the test to lease by hand.
    pub async fn start_with(lease: Duration, with_agent: bool) -> Stack {
        Stack::start_with_stores(lease, with_agent, SecretStores::default()).await
    }

    /// With the agent reading secrets through `stores` (e.g. a `MemoryStore` a test rotates).
    pub async fn start_with_stores(lease: Duration, with_agent: bool, stores: SecretStores) -> Stack {
        let sim = SimHandle::start(SimOptions::default()).await.expect("sim starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = EmbeddedControlPlane::open(Options {
            data_dir: dir.path().to_path_buf(),
            lease_duration: lease,
            tick: Duration::from_millis(100),
            retry_base: Duration::from_millis(100),
            ..Options::default()
        })
        .expect("control plane opens");
        let spec = serde_json::from_value(sim_integration(&sim, "sim")).expect("spec");
        cp.register_integration(
            &spec,
            apono_connector::control_plane::embedded::IntegrationSource::Config,
        )
        .expect("register");
        let stop = CancellationToken::new();
        let mut tasks = vec![tokio::spawn(cp.clone().run_scheduler(stop.clone()))];
        let mut stack = Stack {
            sim,
            cp,
            dir,
            stores,
            stop,
            tasks: Vec::new(),
        };
        if with_agent {
            tasks.push(stack.spawn_agent());
        }
        stack.tasks = tasks;
        stack
    }

    pub fn spawn_agent(&self) -> tokio::task::JoinHandle<()> {
        let executor = Executor::new(self.stores.clone(), 3).with_backoff_base(Duration::from_millis(50));
        let options = AgentOptions {
            parallelism: 4,
            lease_wait_seconds: 1,
            shutdown_grace: Duration::from_secs(5),
        };
        tokio::spawn(Agent::new(self.cp.clone(), executor, options).run(self.stop.clone()))
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.sim.stop().await;
    }

    pub async fn wait_job(&self, id: &str) -> JobRecord {
        wait_until(Duration::from_secs(20), || {
            let job = self.cp.job(id).expect("job read").expect("job exists");
            matches!(job.state, JobState::Succeeded | JobState::Failed).then_some(job)
        })
        .await
    }

    pub async fn wait_access(&self, id: &str, state: AccessState, timeout: Duration) -> AccessRequest {
        wait_until(timeout, || {
            let a = self.cp.access(id).expect("access read").expect("access exists");
            (a.state == state).then_some(a)
        })
        .await
    }
}

/// Polls `check` every 50 ms until it returns Some, or panics after `timeout`.
pub async fn wait_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bindings of `username` in the simulator.
pub fn bindings_of(sim: &SimHandle, username: &str) -> Vec<SimBinding> {
    sim.sim.bindings_of_username(username)
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process killed (by its own PID) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)], dir: &Path) -> ChildGuard {
        let child = Command::new(BIN)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn apono-connector");
        ChildGuard(child)
    }

    /// Like [`ChildGuard::spawn`], with stderr (and stdout) appended to the file `log`.
    pub fn spawn_logged(args: &[&str], envs: &[(&str, &str)], dir: &Path, log: &Path) -> ChildGuard {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log file");
        let child = Command::new(BIN)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log file"))
            .stderr(file)
            .spawn()
            .expect("spawn apono-connector");
        ChildGuard(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the binary to completion.
pub fn run_cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run apono-connector")
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16) {
    wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
}

/// Starts `apono-connector sim rancher` on a free port (latency in ms); returns it and its URL.
pub async fn spawn_sim(dir: &Path, latency_ms: u64) -> (ChildGuard, String) {
    let port = free_port();
    let sim = ChildGuard::spawn(
        &[
            "sim",
            "rancher",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--latency-ms",
            &latency_ms.to_string(),
        ],
        &[],
        dir,
    );
    wait_for_port(port).await;
    (sim, format!("http://127.0.0.1:{port}"))
}

/// Writes a config file for an embedded control plane on `cp_port` (state in `dir/state`) with
/// one integration `sim` pointing at `sim_url` with the simulator's key; returns its path.
pub fn write_control_plane_config(dir: &Path, cp_port: u16, lease_seconds: u64, sim_url: &str) -> String {
    let apono_connector::sim::SimOptions {
        access_key, secret_key, ..
    } = apono_connector::sim::SimOptions::default();
    let path = dir.join("connector.toml");
    std::fs::write(
        &path,
        format!(
            "[standalone]\nlisten = \"127.0.0.1:{cp_port}\"\ndata_dir = \"{}\"\nlease_seconds = {lease_seconds}\n\n\
             [[integrations]]\ntype = \"rancher\"\nname = \"sim\"\nconfig = {{ host = \"{sim_url}\" }}\n\
             secret_store = {{ type = \"APONO\", credentials = {{ access_key = \"{access_key}\", secret_key = \"{secret_key}\" }} }}\n",
            dir.join("state").display()
        ),
    )
    .expect("write the config");
    path.to_string_lossy().into_owned()
}

/// `/readyz` of a health server on `port`: status and body, or None while nothing answers.
pub async fn readyz(port: u16) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.ok()?;
    Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
}

/// Polls `/readyz` until it answers `want` with a body containing `needle`.
pub async fn wait_ready(port: u16, want: u16, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((status, body)) = readyz(port).await
            && status == want
            && body.contains(needle)
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz on {port} never answered {want} with {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator token a daemon wrote into `data_dir` (waits for it: the daemon writes it at start).
pub async fn operator_token(data_dir: &Path) -> String {
    let path = data_dir.join(apono_connector::control_plane::operator_token::TOKEN_FILE);
    wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&path).ok().filter(|t| !t.trim().is_empty())
    })
    .await
    .trim()
    .to_string()
}

/// An operator API client for the daemon at `url` whose data dir is `data_dir`.
pub async fn operator_client(url: &str, data_dir: &Path) -> apono_connector::control_plane::client::OperatorClient {
    apono_connector::control_plane::client::OperatorClient::new(url)
        .expect("operator client")
        .with_token(operator_token(data_dir).await.into())
}
