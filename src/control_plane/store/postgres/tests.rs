//! The PostgreSQL backend's own rules: the URL (TLS, what is refused), the password kept out of
//! every message, and a newer schema refused. The state machine runs on PostgreSQL through
//! `backends!` in the control-plane tests.

use super::*;
use crate::control_plane::embedded::{EmbeddedControlPlane, Options};
use crate::control_plane::store::Store;
use crate::control_plane::store::db::p;
use crate::control_plane::store::testing::{PgServer, postgres_available, shared};
use std::time::Instant;

const CANARY: &str = "pw-canary-7f3a9c";

fn url(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

#[test]
fn urls_that_are_not_verified_tls_or_plain_text_are_refused_without_quoting_them() {
    for (u, says) in [
        (
            format!("postgres://apono:{CANARY}@db:5432/x?sslmode=require"),
            "sslmode=require",
        ),
        (
            format!("postgres://apono:{CANARY}@db:5432/x?sslmode=prefer"),
            "sslmode=prefer",
        ),
        (
            format!("postgres://apono:{CANARY}@db:5432/x?sslmode=verify-full"),
            "without sslrootcert",
        ),
        (format!("mysql://apono:{CANARY}@db/x"), "not a postgres:// URL"),
        (
            format!("postgres://apono:{CANARY}@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            "/nonexistent/ca.pem",
        ),
    ] {
        let e = PgTarget::parse(&url(&u))
            .expect_err(&u.replace(CANARY, "***"))
            .to_string();
        assert!(e.contains(says), "{e}");
        assert!(!e.contains(CANARY), "the password leaked: {e}");
    }
    let t = PgTarget::parse(&url(&format!("postgresql://apono:{CANARY}@db.internal:6432/state"))).unwrap();
    assert_eq!(t.display(), "db.internal:6432/state");
    assert!(!format!("{t:?}").contains(CANARY));
}

/// CloudNativePG's app Secret holds `uri: postgresql://app:PASSWORD@CLUSTER-rw.NS:5432/app`, and
/// managed databases often give `postgres://`: both schemes pass the config check and the parser,
/// and a percent-encoded password reaches the driver decoded.
#[test]
fn postgresql_and_postgres_schemes_are_both_accepted() {
    for scheme in ["postgres", "postgresql"] {
        let u = format!("{scheme}://app:{CANARY}@cluster-rw.apono.svc:5432/app");
        let t = PgTarget::parse(&url(&u)).unwrap_or_else(|e| panic!("{scheme}: {e}"));
        assert_eq!(t.display(), "cluster-rw.apono.svc:5432/app");
        let options = Options {
            database_url: Some(url(&u)),
            ..Options::default()
        };
        assert!(matches!(
            options.backend().unwrap(),
            crate::control_plane::store::Backend::Postgres(_)
        ));
        let env = |k: &str| match k {
            "APONO_DATABASE_URL" => Some(u.clone()),
            "APONO_OPERATOR_TOKEN" => Some("op-token".into()),
            _ => None,
        };
        crate::config::Config::load_from(None, env).unwrap_or_else(|e| panic!("{scheme}: {e}"));
    }
    let t = PgTarget::parse(&url("postgresql://app:p%40ss%2Fw%3Ard@db:5432/app?sslmode=disable")).unwrap();
    assert_eq!(t.config.get_password(), Some(&b"p@ss/w:rd"[..]));
    assert_eq!(t.config.get_user(), Some("app"));
}

#[test]
fn sqlite_spelling_is_translated() {
    assert_eq!(
        translate("SELECT 1 WHERE a = ?1 AND instr(b, ?12) > 0"),
        "SELECT 1 WHERE a = $1 AND strpos(b, $12) > 0"
    );
}

#[tokio::test]
async fn the_password_never_reaches_an_error_or_debug_output() {
    // Nothing listens on this port: the connection error must not carry the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = Options {
        database_url: Some(url(&format!("postgres://apono:{CANARY}@127.0.0.1:{port}/state"))),
        ..Options::default()
    };
    assert!(!format!("{options:?}").contains(CANARY));
    let e = EmbeddedControlPlane::open(options).expect_err("nothing listens");
    let text = format!("{e} / {e:?}");
    assert!(text.contains(&format!("127.0.0.1:{port}/state")), "{text}");
    assert!(!text.contains(CANARY), "the password leaked: {text}");

    // The config: Debug of the whole config, and its problems.
    let env = |k: &str| match k {
        "APONO_DATABASE_URL" => Some(format!("postgres://apono:{CANARY}@db/x")),
        _ => None,
    };
    let e = crate::config::Config::load_from(None, env)
        .expect_err("no operator token")
        .to_string();
    assert!(e.contains("APONO_OPERATOR_TOKEN"), "{e}");
    assert!(!e.contains(CANARY), "{e}");
    let env = |k: &str| match k {
        "APONO_DATABASE_URL" => Some(format!("postgres://apono:{CANARY}@db/x")),
        "APONO_OPERATOR_TOKEN" => Some("op-token-canary".into()),
        _ => None,
    };
    let config = crate::config::Config::load_from(None, env).expect("valid");
    let shown = format!("{config:?}");
    assert!(!shown.contains(CANARY) && !shown.contains("op-token-canary"), "{shown}");
}

#[tokio::test]
async fn a_newer_schema_on_postgres_is_refused_with_what_to_do() {
    if !postgres_available() {
        return;
    }
    let server = shared().unwrap();
    let db = server.database(&format!("t_newer_{}", uuid::Uuid::new_v4().simple()));
    let options = Options {
        database_url: Some(db.clone()),
        ..Options::default()
    };
    let cp = EmbeddedControlPlane::open(options.clone()).expect("fresh database");
    drop(cp);
    {
        let store = Store::open_backend(&options.backend().unwrap()).unwrap();
        store
            .lock()
            .unwrap()
            .exec(
                "UPDATE schema_version SET version = ?1",
                &crate::control_plane::store::db::p![99i64],
            )
            .unwrap();
    }
    let e = EmbeddedControlPlane::open(options).unwrap_err().to_string();
    assert!(
        e.contains("schema version 99") && e.contains("newer apono-connector"),
        "{e}"
    );
}

/// A server with TLS on, its certificate signed by a CA of the test's own.
fn tls_server() -> Option<(PgServer, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let cert = params.signed_by(&key, &ca).unwrap();
    let other_ca_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = other.self_signed(&other_ca_key).unwrap();
    let server = PgServer::start_with(
        &[("server.crt", cert.pem()), ("server.key", key.serialize_pem())],
        "-c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
    )
    .map_err(|e| eprintln!("*** SKIPPED: a TLS PostgreSQL cannot start: {e} ***"))
    .ok()?;
    Some((server, ca.pem(), other.pem()))
}

#[tokio::test]
async fn tls_verify_full_connects_with_the_right_ca_and_refuses_another() {
    if !postgres_available() {
        return;
    }
    let (server, ca, other) = tls_server().expect("TLS server");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&ca_file, ca).unwrap();
    std::fs::write(&other_file, other).unwrap();
    server.database("tls");
    let base = server.url("tls");
    let with = |file: &Path| {
        let u = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            base.expose_secret(),
            file.display()
        );
        Options {
            database_url: Some(url(&u)),
            ..Options::default()
        }
    };
    let cp = EmbeddedControlPlane::open(with(&ca_file)).expect("verified TLS connects");
    assert!(cp.list_access().unwrap().is_empty());
    {
        let store = Store::open_backend(&with(&ca_file).backend().unwrap()).unwrap();
        let guard = store.lock().unwrap();
        let rows = guard
            .query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .unwrap();
        assert!(rows[0].get::<bool>(0).unwrap(), "the session is encrypted");
    }
    let e = EmbeddedControlPlane::open(with(&other_file))
        .expect_err("another CA is refused")
        .to_string();
    assert!(e.contains("certificate") || e.contains("Certificate"), "{e}");
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_when_its_session_ends() {
    if !postgres_available() {
        return;
    }
    let server = shared().unwrap();
    let db = server.database(&format!("t_lead_{}", uuid::Uuid::new_v4().simple()));
    let options = Options {
        database_url: Some(db),
        ..Options::default()
    };
    let one = Store::open_backend(&options.backend().unwrap()).unwrap();
    let two = Store::open_backend(&options.backend().unwrap()).unwrap();
    assert!(one.try_lead(), "the first to try leads");
    assert!(!two.try_lead(), "one leader at a time");
    assert!(one.try_lead(), "and keeps leading");
    drop(one); // its session ends, as when the process is killed
    let t = Instant::now();
    while !two.try_lead() {
        assert!(t.elapsed() < Duration::from_secs(5), "no hand-over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_database_outage_is_unavailable_then_over_without_reopening() {
    if !postgres_available() {
        return;
    }
    let server = PgServer::start().expect("a server of this test's own");
    let options = Options {
        database_url: Some(server.database("outage")),
        ..Options::default()
    };
    let cp = EmbeddedControlPlane::open(options).expect("open");
    assert!(cp.list_access().unwrap().is_empty());
    server.stop().unwrap();
    let e = cp.list_access().expect_err("the database is down");
    assert!(
        matches!(e, crate::control_plane::ControlPlaneError::Unavailable { .. }) && e.retryable(),
        "an outage, not a broken state: {e:?}"
    );
    assert_eq!(e.status(), 503);
    server.start_again().unwrap();
    let t = Instant::now();
    loop {
        match cp.list_access() {
            Ok(list) => {
                assert!(list.is_empty());
                break;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "still failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sqlite_state_is_copied_with_its_live_accesses_and_a_second_copy_is_refused() {
    use crate::control_plane::embedded::tests::{access_create, complete_ok, grant_result, lease_one, open_with};
    use crate::control_plane::operator::AccessState;
    if !postgres_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Options {
        data_dir: dir.path().to_path_buf(),
        lease_duration: Duration::from_secs(3600),
        ..Options::default()
    };
    let (id, owner, leased) = {
        let cp = open_with(sqlite.clone(), serde_json::json!({}));
        let a = cp.create_access(access_create("alice", 3600, false)).unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
        cp.create_access(access_create("bob", 3600, false)).unwrap();
        // Bob's grant is leased when the old install stops: it must not wait out the lease.
        let leased = lease_one(&cp, 0).await.unwrap();
        (a.id, cp.owner().clone(), leased.id)
    };
    let db = shared()
        .unwrap()
        .database(&format!("t_copy_{}", uuid::Uuid::new_v4().simple()));
    let copied = crate::control_plane::embedded::copy_state(dir.path(), &db).expect("copied");
    assert_eq!((copied.access_requests, copied.leases_reclaimed), (2, 1), "{copied:?}");

    let cp = EmbeddedControlPlane::open(Options {
        database_url: Some(db.clone()),
        lease_duration: Duration::from_secs(3600),
        ..Options::default()
    })
    .unwrap();
    assert_eq!(
        cp.owner(),
        &owner,
        "the same install: it revokes what the SQLite one granted"
    );
    let alice = cp.access(&id).unwrap().unwrap();
    assert_eq!(alice.state, AccessState::Active);
    assert!(alice.expires_at.is_some());
    let again = lease_one(&cp, 0).await.expect("bob's grant runs at once");
    assert_eq!((again.id.as_str(), again.attempt), (leased.as_str(), 2));
    cp.revoke_access(&id).unwrap();
    let revoke = lease_one(&cp, 0).await.expect("alice's revoke");
    assert_eq!(revoke.kind, "revoke");

    let e = crate::control_plane::embedded::copy_state(dir.path(), &db)
        .expect_err("the database holds state now")
        .to_string();
    assert!(e.contains("already holds control-plane state"), "{e}");
}

/// A database URL of a fresh database on the shared server, for the tests below.
fn fresh_target(prefix: &str) -> PgTarget {
    let server = shared().expect("checked by postgres_available");
    PgTarget::parse(&server.database(&format!("{prefix}_{}", uuid::Uuid::new_v4().simple()))).unwrap()
}

/// Writes sent without waiting (pipelined) still fail their transaction: the failure is what the
/// next statement reports, and the commit that follows writes nothing.
#[test]
fn a_pipelined_write_that_fails_fails_its_transaction_and_writes_nothing() {
    if !postgres_available() {
        return;
    }
    let target = fresh_target("t_pipe");
    let store = Store::open_backend(&crate::control_plane::store::Backend::Postgres(Box::new(
        target.clone(),
    )))
    .unwrap();
    let guard = store.lock().unwrap();
    let insert = "INSERT INTO meta (key, value) VALUES (?1, ?2)";

    // Reported by the next read, as the write's own error (not "transaction aborted").
    let tx = guard.transaction().unwrap();
    tx.exec_quiet(insert, &p!["k", "one"]).unwrap();
    tx.exec_quiet(insert, &p!["k", "two"]).expect("sent; not answered yet");
    let e = tx
        .query("SELECT value FROM meta", &[])
        .expect_err("the duplicate key")
        .to_string();
    assert!(e.contains("23505"), "the write's own error: {e}");
    drop(tx);

    // Reported by the commit when nothing reads after it; nothing of the transaction stays.
    let tx = guard.transaction().unwrap();
    tx.exec_quiet(insert, &p!["a", "1"]).unwrap();
    tx.exec_quiet(insert, &p!["a", "2"]).unwrap();
    let e = tx
        .commit()
        .expect_err("the commit reports the failed write")
        .to_string();
    assert!(e.contains("23505"), "{e}");
    assert!(
        guard
            .query("SELECT key FROM meta WHERE key IN ('a', 'k')", &[])
            .unwrap()
            .is_empty()
    );

    // And writes that succeed are all there after the commit.
    let tx = guard.transaction().unwrap();
    for i in 0..50 {
        tx.exec_quiet(insert, &p![format!("ok{i}"), "v"]).unwrap();
    }
    tx.commit().unwrap();
    let n = guard
        .query("SELECT COUNT(*) FROM meta WHERE key LIKE 'ok%'", &[])
        .unwrap();
    assert_eq!(n[0].get::<i64>(0).unwrap(), 50);

    // Outside a transaction a write is done when it returns: another connection sees it.
    guard.exec_quiet(insert, &p!["after", "v"]).unwrap();
    let other = PgStore::open(target).unwrap();
    let seen = other.lock().unwrap();
    let rows = seen
        .as_ref()
        .unwrap()
        .query("SELECT value FROM meta WHERE key = 'after'", &[])
        .unwrap();
    assert_eq!(rows.len(), 1);
}

/// A statement that waits long (here for the write lock another connection holds) does not stall
/// the runtime's other tasks: with one worker, a timer still fires on time meanwhile.
#[test]
fn a_long_database_wait_does_not_stall_the_runtimes_other_tasks() {
    if !postgres_available() {
        return;
    }
    let target = fresh_target("t_wait");
    let holder = Arc::new(PgStore::open(target.clone()).unwrap());
    let waiter = Arc::new(PgStore::open(target).unwrap());
    {
        let g = holder.lock().unwrap();
        let h = g.as_ref().unwrap();
        h.begin_write().unwrap();
        h.query("SELECT 1", &[]).unwrap(); // the write lock is held from here
    }
    let release = {
        let holder = Arc::clone(&holder);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            let g = holder.lock().unwrap();
            g.as_ref().unwrap().batch("ROLLBACK").unwrap();
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Timed from before the statement starts waiting: a stalled worker also stalls the timers
        // of the wait below, so the time would be lost before a later start.
        let t = Instant::now();
        let blocked = tokio::spawn(async move {
            let g = waiter.lock().unwrap();
            let c = g.as_ref().unwrap();
            c.begin_write().unwrap();
            c.query("SELECT 1", &[]).unwrap();
            c.batch("COMMIT").unwrap();
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::spawn(tokio::time::sleep(Duration::from_millis(100)))
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "200 + 100 ms of timers took {took:?} while a statement waited (3 s) on the only worker"
        );
        blocked.await.unwrap();
    });
    release.join().unwrap();
    rt.shutdown_background();
}
