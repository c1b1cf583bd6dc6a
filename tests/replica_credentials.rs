//! Issue 20 with new users: a password a grant generated on one `run` replica is handed out by
//! another replica on the same PostgreSQL database (sealed in the database in between), once.
//!
//! Needs PostgreSQL's server binaries (Debian's `postgresql`, installed by `tests/run`); under
//! `CI=true` their absence fails the test.

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::path::Path;
use std::time::Duration;

use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::{AccessRequestCreate, AccessState, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use common::daemon::{integration_toml, sim, user_id_of, wait_state};
use common::{ChildGuard, free_port, wait_for_port};
use postgres::PgServer;
use secrecy::ExposeSecret;

const TOKEN: &str = "operator-token-of-both-replicas";

/// A `run` replica on `url` in `dir`: the child and its operator API.
async fn replica(dir: &Path, url: &str, integrations: &str) -> (ChildGuard, OperatorClient) {
    let port = free_port();
    let config = dir.join("connector.toml");
    std::fs::write(
        &config,
        format!(
            "[standalone]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\n[telemetry]\nhealth_addr = \"127.0.0.1:{}\"\n\n{integrations}",
            dir.join("state").display(),
            free_port(),
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let child = ChildGuard::spawn_logged(
        &["run", "--config", &config],
        &[("APONO_DATABASE_URL", url), ("APONO_OPERATOR_TOKEN", TOKEN)],
        dir,
        &dir.join("daemon.log"),
    );
    wait_for_port(port).await;
    let op = OperatorClient::new(&format!("http://127.0.0.1:{port}"))
        .expect("operator client")
        .with_token(TOKEN.to_string().into());
    (child, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_users_password_granted_on_one_replica_is_read_once_on_another() {
    let pg = match PgServer::start() {
        Ok(s) => s,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true and PostgreSQL cannot run: {e}"),
        Err(e) => {
            eprintln!("*** SKIPPED: PostgreSQL cannot run here: {e} ***");
            return;
        }
    };
    let url = pg.database("credentials").expose_secret().to_string();
    let sim = sim().await;
    let integrations = integration_toml("prod", &sim);
    let (dir_one, dir_two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // Only replica one runs while the grants run: every password is generated there.
    let (mut one, op_one) = replica(dir_one.path(), &url, &integrations).await;
    let users = ["newcomer1", "newcomer2", "newcomer3"];
    let mut ids = Vec::new();
    for user in users {
        let a = op_one
            .create_access(&AccessRequestCreate {
                integration: IntegrationRef::Name("prod".into()),
                subject: Subject::user(user),
                role: "cluster-member".into(),
                resource: Resource::Cluster("c-7x2k9".into()),
                ttl_seconds: 3600,
                create_user: true,
            })
            .await
            .expect("access request accepted");
        ids.push(a.id);
    }
    // Listing shows the state without taking the passwords.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !op_one
        .list_access()
        .await
        .expect("list")
        .iter()
        .all(|a| a.state == AccessState::Active)
    {
        assert!(tokio::time::Instant::now() < deadline, "grants did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Replica two starts, and replica one dies: the passwords are in the database only.
    let (_two, op_two) = replica(dir_two.path(), &url, &integrations).await;
    one.kill();
    let mut passwords = Vec::new();
    for (user, id) in users.iter().zip(&ids) {
        let read = wait_state(&op_two, id, AccessState::Active, Duration::from_secs(10)).await;
        let Some(creds) = read.credentials.clone() else {
            panic!("{user}'s password on the other replica: {read:?}");
        };
        assert_eq!(creds.username, *user);
        let password = creds.password.expose_secret().to_string();
        let user_id = user_id_of(&sim, user).expect("user created");
        assert!(
            sim.sim.check_password(&user_id, &password),
            "the handed-out password logs in"
        );
        let again = op_two.access(id).await.expect("read").expect("exists");
        assert!(again.credentials.is_none(), "shown once");
        passwords.push(password);
    }
    for dir in [dir_one.path(), dir_two.path()] {
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        assert!(!log.is_empty(), "the replica logged");
        assert!(
            passwords.iter().all(|p| !log.contains(p.as_str())),
            "a password in a replica's log"
        );
    }
    sim.stop().await;
}
