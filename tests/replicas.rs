//! Several `run` replicas on one PostgreSQL database (issue 20): they share the queue (one lease
//! per job), each serves the operator API, one runs the scheduler; a replica killed with
//! `kill -9` loses nothing, and a database outage is a readiness outage, not a crash.
//!
//! Needs PostgreSQL's server binaries (Debian's `postgresql`, installed by `tests/run`); under
//! `CI=true` their absence fails the test.

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use apono_connector::sim::{DatasetSize, SimHandle, SimOptions};
use common::daemon::integration_toml;
use common::{ChildGuard, free_port, readyz, wait_for_port, wait_ready};
use futures::StreamExt;
use postgres::PgServer;
use secrecy::ExposeSecret;

const TOKEN: &str = "operator-token-shared-by-replicas";
const LEASE_SECONDS: u64 = 5;

struct Replica {
    dir: tempfile::TempDir,
    port: u16,
    health_port: u16,
    child: Option<ChildGuard>,
    op: OperatorClient,
}

impl Replica {
    fn new() -> Replica {
        let port = free_port();
        Replica {
            dir: tempfile::tempdir().expect("tempdir"),
            port,
            health_port: free_port(),
            child: None,
            op: OperatorClient::new(&format!("http://127.0.0.1:{port}"))
                .expect("operator client")
                .with_token(TOKEN.to_string().into()),
        }
    }

    async fn spawn(&mut self, url: &str, integrations: &str) {
        let config: PathBuf = self.dir.path().join("connector.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nshutdown_grace_seconds = 5\nlease_wait_seconds = 2\nparallelism = 16\n\n[standalone]\n\
                 listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\nlease_seconds = {LEASE_SECONDS}\n\n\
                 [telemetry]\nhealth_addr = \"127.0.0.1:{}\"\n\n{integrations}",
                self.port,
                self.dir.path().join("state").display(),
                self.health_port,
            ),
        )
        .expect("config");
        let config = config.display().to_string();
        self.child = Some(ChildGuard::spawn_logged(
            &["run", "--config", &config],
            &[
                ("APONO_DATABASE_URL", url),
                ("APONO_OPERATOR_TOKEN", TOKEN),
                ("APONO_LOG_LEVEL", "info"),
            ],
            self.dir.path(),
            &self.dir.path().join("daemon.log"),
        ));
        wait_for_port(self.port).await;
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn list(&self) -> BTreeMap<String, AccessRequest> {
        self.op
            .list_access()
            .await
            .expect("operator API answers")
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect()
    }
}

fn server() -> Option<PgServer> {
    match PgServer::start() {
        Ok(s) => Some(s),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true and PostgreSQL cannot run: {e}"),
        Err(e) => {
            eprintln!("*** SKIPPED: PostgreSQL cannot run here: {e} ***");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_survive_a_kill_9_and_a_database_outage() {
    let Some(pg) = server() else { return };
    let url = pg.database("replicas").expose_secret().to_string();
    let sim = SimHandle::start(SimOptions {
        size: DatasetSize::Large,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let integrations = integration_toml("prod", &sim);
    let mut one = Replica::new();
    let mut two = Replica::new();
    one.spawn(&url, &integrations).await;
    two.spawn(&url, &integrations).await;

    // 200 accesses, TTLs of 4 to 12 s, requested half through each replica.
    let n = 200usize;
    let requests = futures::stream::iter(0..n)
        .map(|i| {
            let op = if i % 2 == 0 { &one.op } else { &two.op };
            async move {
                op.create_access(&AccessRequestCreate {
                    integration: IntegrationRef::Name("prod".into()),
                    subject: Subject::user(&format!("user{:05}", i + 1)),
                    role: "cluster-member".into(),
                    resource: Resource::Cluster("c-7x2k9".into()),
                    ttl_seconds: 4 + (i as u64 % 9),
                    create_user: false,
                })
                .await
                .expect("access request accepted")
                .id
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<String>>()
        .await;
    assert_eq!(requests.len(), n);
    // Both replicas see every access at once: one state.
    let (a, b) = (one.list().await, two.list().await);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_eq!(a.len(), n);

    // One replica dies in the middle of the work, leaving its leases behind.
    tokio::time::sleep(Duration::from_secs(3)).await;
    one.kill9();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let all = loop {
        let all = two.list().await;
        if all.values().all(|a| a.state == AccessState::Revoked) {
            break all;
        }
        if tokio::time::Instant::now() > deadline {
            let left: Vec<_> = all.values().filter(|a| a.state != AccessState::Revoked).collect();
            panic!(
                "{} accesses not revoked, e.g. {:?}\n--- replica two ---\n{}",
                left.len(),
                left.first().map(|a| (&a.id, a.state, &a.last_error)),
                two.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut worst = Duration::ZERO;
    for a in all.values() {
        let (Some(expires), Some(revoked)) = (a.expires_at, a.revoked_at) else {
            panic!("access {} has no expiry or revoke time: {a:?}", a.id);
        };
        let late = (revoked - expires).to_std().unwrap_or_default();
        worst = worst.max(late);
    }
    eprintln!("{n} accesses over two replicas, one killed: the last revoke {worst:.1?} after its expiry");
    assert!(
        worst <= Duration::from_secs(LEASE_SECONDS + 5),
        "a revoke came {worst:?} after its expiry (limit lease_seconds + 5 s)"
    );
    // Nothing the connector granted is left: only the bindings that were there before remain.
    let remaining = (1..=n)
        .filter(|i| {
            sim.sim
                .bindings_of_username(&format!("user{i:05}"))
                .iter()
                .any(|b| b.role_id == "cluster-member" && b.resource_id == "c-7x2k9")
        })
        .count();
    let pre_existing = all.values().filter(|a| a.pre_existing).count();
    assert_eq!(
        remaining, pre_existing,
        "bindings left on c-7x2k9 vs bindings that were there before"
    );
    // No binding was created twice: one create per access that found none already there.
    let created = sim
        .sim
        .stats()
        .routes
        .get("POST /v3/clusterroletemplatebindings")
        .copied()
        .unwrap_or(0);
    let fresh = all.values().filter(|a| !a.pre_existing).count() as u64;
    eprintln!("bindings created: {created}; accesses that found none already there: {fresh}");
    assert!(
        created <= fresh,
        "{created} bindings created for {fresh} accesses that needed one: some were granted twice"
    );

    // The killed replica comes back and lists exactly what the other one does.
    one.spawn(&url, &integrations).await;
    let (a, b) = (one.list().await, two.list().await);
    let states = |m: &BTreeMap<String, AccessRequest>| m.iter().map(|(k, v)| (k.clone(), v.state)).collect::<Vec<_>>();
    assert_eq!(states(&a), states(&b));

    // The database goes away and comes back: not ready, then ready, no restart.
    wait_ready(two.health_port, 200, "", Duration::from_secs(20)).await;
    pg.stop().expect("stop PostgreSQL");
    wait_ready(two.health_port, 503, "", Duration::from_secs(30)).await;
    pg.start_again().expect("start PostgreSQL");
    wait_ready(two.health_port, 200, "", Duration::from_secs(60)).await;
    assert!(readyz(one.health_port).await.is_some_and(|(s, _)| s == 200 || s == 503));
    assert!(
        two.child
            .as_mut()
            .is_some_and(|c| c.0.try_wait().ok().flatten().is_none()),
        "no restart"
    );
    assert_eq!(two.list().await.len(), n, "the state is all there");
    sim.stop().await;
}
