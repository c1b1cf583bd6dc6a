//! The standalone `run` daemon as a child process (embedded control plane + agent, its own data
//! dir, ports and config file) and the helpers the lifecycle tests share around it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apono_connector::control_plane::ControlPlaneError;
use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use apono_connector::sim::{SimBinding, SimHandle, SimOptions};
use serde_json::{Value, json};

use super::{ChildGuard, free_port, run_cli, wait_for_port};

/// How long a lifecycle step may take before a test gives up on it.
pub const LONG: Duration = Duration::from_secs(30);

/// What a daemon is started with besides its integrations.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `standalone.sweep_interval_seconds`: how often the reconcile runs.
    pub sweep_interval_seconds: u64,
    /// `agent.parallelism`, when not the default.
    pub parallelism: Option<usize>,
    /// Write the daemon's log to `<dir>/daemon.log` instead of the test's stderr (a test that
    /// runs many accesses at once prints a tail of it when it fails).
    pub log_to_file: bool,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            sweep_interval_seconds: 300,
            parallelism: None,
            log_to_file: false,
        }
    }
}

/// The standalone daemon as a child process, with its own data dir, ports and config file.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    /// The operator API's port.
    pub port: u16,
    /// The health server's port (`/metrics`); the same across restarts.
    pub health_port: u16,
    child: Option<ChildGuard>,
    pub op: OperatorClient,
    /// The `[[integrations]]` part of the config (rewritten by tests that move an integration).
    pub integrations: String,
    pub options: DaemonOptions,
}

/// `[[integrations]]` TOML for an integration named `name` on `sim` with the simulator's key.
pub fn integration_toml(name: &str, sim: &SimHandle) -> String {
    let (access_key, secret_key) = sim.sim.api_key();
    format!(
        "[[integrations]]\ntype = \"rancher\"\nname = \"{name}\"\nconfig = {{ host = \"{}\", status_timeout_seconds = 2 }}\n\
         secret_store = {{ type = \"APONO\", credentials = {{ access_key = \"{access_key}\", secret_key = \"{secret_key}\" }} }}\n",
        sim.base_url
    )
}

impl Daemon {
    pub async fn start(integrations: String) -> Daemon {
        Daemon::start_with(integrations, 300).await
    }

    pub async fn start_with(integrations: String, sweep_interval_seconds: u64) -> Daemon {
        Daemon::start_opts(
            integrations,
            DaemonOptions {
                sweep_interval_seconds,
                ..DaemonOptions::default()
            },
        )
        .await
    }

    pub async fn start_opts(integrations: String, options: DaemonOptions) -> Daemon {
        let mut d = Daemon::unstarted(integrations, options);
        d.spawn().await;
        d
    }

    /// A daemon whose data dir and ports are chosen but which is not running yet: a test can
    /// lay out a state file (an older build's) before [`Daemon::spawn`].
    pub fn unstarted(integrations: String, options: DaemonOptions) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let op = OperatorClient::new(&format!("http://127.0.0.1:{port}")).expect("operator client");
        Daemon {
            dir,
            port,
            health_port: free_port(),
            child: None,
            op,
            integrations,
            options,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The last `lines` lines of the daemon's log file (empty when it logs to stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("connector.toml");
        let parallelism = self
            .options
            .parallelism
            .map(|p| format!("parallelism = {p}\n"))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                "[agent]\nshutdown_grace_seconds = 5\n{parallelism}\n[standalone]\nlisten = \"127.0.0.1:{}\"\n\
                 data_dir = \"{}\"\nsweep_interval_seconds = {}\n\n[telemetry]\nhealth_addr = \"127.0.0.1:{}\"\n\n{}",
                self.port,
                self.data_dir().display(),
                self.options.sweep_interval_seconds,
                self.health_port,
                self.integrations
            ),
        )
        .expect("write the config");
        path
    }

    pub async fn spawn(&mut self) {
        let config = self.write_config();
        let config = config.to_string_lossy().into_owned();
        let args = ["run", "--config", config.as_str()];
        let envs = [("APONO_LOG_LEVEL", "info")];
        self.child = Some(if self.options.log_to_file {
            ChildGuard::spawn_logged(&args, &envs, self.dir.path(), &self.log_path())
        } else {
            ChildGuard::spawn(&args, &envs, self.dir.path())
        });
        wait_for_port(self.port).await;
        // The daemon writes the operator token at start (again after its data dir was lost).
        self.op = super::operator_client(&format!("http://127.0.0.1:{}", self.port), &self.data_dir()).await;
    }

    /// `kill -9`: no shutdown, no release, leases left behind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    pub async fn request(&self, user: &str, role: &str, resource: &str, ttl_seconds: u64) -> AccessRequest {
        self.request_prod(user, role, resource, ttl_seconds, false).await
    }

    /// An access requested and waited for until it is `active`; the access then.
    pub async fn granted(&self, user: &str, role: &str, resource: &str, ttl_seconds: u64) -> AccessRequest {
        let a = self.request(user, role, resource, ttl_seconds).await;
        self.wait_state(&a.id, AccessState::Active, LONG).await
    }

    /// An access for a user the connector creates (`create_user`).
    pub async fn request_new_user(&self, user: &str, role: &str, resource: &str, ttl_seconds: u64) -> AccessRequest {
        self.request_prod(user, role, resource, ttl_seconds, true).await
    }

    /// An access on the integration `prod`, which must be accepted.
    async fn request_prod(
        &self,
        user: &str,
        role: &str,
        resource: &str,
        ttl_seconds: u64,
        create_user: bool,
    ) -> AccessRequest {
        self.request_with(
            IntegrationRef::Name("prod".into()),
            user,
            role,
            resource,
            ttl_seconds,
            create_user,
        )
        .await
        .expect("access request accepted")
    }

    pub async fn request_with(
        &self,
        integration: IntegrationRef,
        user: &str,
        role: &str,
        resource: &str,
        ttl_seconds: u64,
        create_user: bool,
    ) -> Result<AccessRequest, ControlPlaneError> {
        self.request_subject(
            integration,
            Subject::user(user),
            role,
            resource,
            ttl_seconds,
            create_user,
        )
        .await
    }

    /// An access for any subject (a group included).
    pub async fn request_subject(
        &self,
        integration: IntegrationRef,
        subject: Subject,
        role: &str,
        resource: &str,
        ttl_seconds: u64,
        create_user: bool,
    ) -> Result<AccessRequest, ControlPlaneError> {
        self.op
            .create_access(&AccessRequestCreate {
                integration,
                subject,
                role: role.into(),
                resource: Resource::parse(resource).expect("resource"),
                ttl_seconds,
                create_user,
            })
            .await
    }

    pub async fn get(&self, id: &str) -> AccessRequest {
        self.op
            .access(id)
            .await
            .expect("operator API answers")
            .expect("access exists")
    }

    /// `access revoke` now, and waits until the access is `revoked`.
    pub async fn revoke_now(&self, id: &str) -> AccessRequest {
        self.op.revoke_access(id).await.expect("revoke accepted");
        self.wait_state(id, AccessState::Revoked, LONG).await
    }

    /// Waits for `state`; the access as it was then.
    pub async fn wait_state(&self, id: &str, state: AccessState, timeout: Duration) -> AccessRequest {
        wait_state(&self.op, id, state, timeout).await
    }

    /// `/metrics` of the health server (empty while it does not answer).
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.health_port);
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// The sum of the samples of the metric `name` in a Prometheus text page whose labels contain
/// `labels` (`""`: every sample); `None` when the page has no such sample.
pub fn metric_sum(page: &str, name: &str, labels: &str) -> Option<f64> {
    let samples: Vec<f64> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            // `name{labels} v` or `name v`; not a longer name that starts with `name`.
            let (set, value) = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once('}')?
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            if !set.contains(labels) {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// Reconcile (sweep) jobs the daemon has finished since it started, per its `/metrics`.
pub async fn sweeps_done(d: &Daemon) -> f64 {
    metric_sum(&d.metrics().await, "apono_connector_jobs_total", "kind=\"sweep\"").unwrap_or(0.0)
}

/// Waits until the daemon has finished `n` more reconcile passes than now.
pub async fn wait_sweeps(d: &Daemon, n: u32) {
    let start = sweeps_done(d).await;
    let deadline = Instant::now() + LONG;
    while sweeps_done(d).await < start + f64::from(n) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not reconcile {n} times within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for an access to reach `state` on the operator API behind `op`; the access as it was then.
pub async fn wait_state(op: &OperatorClient, id: &str, state: AccessState, timeout: Duration) -> AccessRequest {
    match try_wait_state(op, id, state, timeout).await {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

/// Where a state lies on the way `pending` → `active` → `revoking` → `revoked` (`failed` is an
/// end too): an access never goes back.
fn rank(state: AccessState) -> u8 {
    match state {
        AccessState::Pending => 0,
        AccessState::Active => 1,
        AccessState::Revoking => 2,
        AccessState::Revoked | AccessState::Failed => 3,
    }
}

/// Like [`wait_state`], an error instead of a panic (for tests that collect failures). Gives up
/// at once when the access has gone past `state` (it can never reach it then).
pub async fn try_wait_state(
    op: &OperatorClient,
    id: &str,
    state: AccessState,
    timeout: Duration,
) -> Result<AccessRequest, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = op.access(id).await;
        if let Ok(Some(a)) = &now {
            if a.state == state {
                return Ok(a.clone());
            }
            if rank(a.state) >= rank(state) {
                return Err(format!("access {id} never reached {state:?}: {}", describe(&now)));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "access {id} did not reach {state:?} within {timeout:?}: {}",
                describe(&now)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An access read as one line: state, ids, error.
fn describe(read: &Result<Option<AccessRequest>, ControlPlaneError>) -> String {
    match read {
        Ok(Some(a)) => format!(
            "state {:?}, binding_ids {:?}, pre_existing {}, last_error {:?}",
            a.state,
            a.binding_ids,
            a.pre_existing,
            a.last_error.as_ref().map(|e| format!("{}: {}", e.code, e.message))
        ),
        Ok(None) => "no such access".into(),
        Err(e) => format!("operator API error: {e}"),
    }
}

/// A simulator with the default options (Rancher 2.13, the small dataset) on a free port.
pub async fn sim() -> SimHandle {
    SimHandle::start(SimOptions::default()).await.expect("sim starts")
}

/// Bindings in the simulator for (user id, role, resource).
pub fn bindings(sim: &SimHandle, user_id: &str, role: &str, resource: &str) -> Vec<SimBinding> {
    sim.sim
        .bindings()
        .into_iter()
        .filter(|b| b.user_id.as_deref() == Some(user_id) && b.role_id == role && b.resource_id == resource)
        .collect()
}

/// The id of the user with this username, if there is one.
pub fn user_id_of(sim: &SimHandle, username: &str) -> Option<String> {
    sim.sim
        .users()
        .into_iter()
        .find(|u| u.username.as_deref() == Some(username))
        .map(|u| u.id)
}

/// The integration JSON of the one-shot commands (`--integration`) for `sim` with its key.
pub fn integration_arg(sim: &SimHandle) -> String {
    let (a, s) = sim.sim.api_key();
    json!({
        "type": "rancher", "name": "oneshot", "config": {"host": sim.base_url},
        "secret_store": {"type": "APONO", "credentials": {"access_key": a, "secret_key": s}},
    })
    .to_string()
}

/// The one-shot `apono-connector revoke` of `user`'s `role` on `resource` on `sim` (with
/// `--all` when `all`); its result.
pub fn oneshot_revoke(sim: &SimHandle, user: &str, role: &str, resource: &str, all: bool) -> Value {
    let spec = integration_arg(sim);
    let mut args = vec![
        "revoke",
        "--integration",
        &spec,
        "--user",
        user,
        "--role",
        role,
        "--resource",
        resource,
    ];
    if all {
        args.push("--all");
    }
    cli_json(&args)
}

/// Runs a one-shot command that must succeed; its stdout as one JSON object.
pub fn cli_json(args: &[&str]) -> Value {
    let out = run_cli(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// The state file of a daemon's data dir.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join("control-plane.sqlite3")
}
