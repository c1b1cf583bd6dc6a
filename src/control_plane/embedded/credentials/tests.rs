//! One-time credentials: sealing on its own, then on a real PostgreSQL shared by two control
//! plane instances (two replicas), and on SQLite (nothing written).

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::*;
use crate::control_plane::embedded::tests::{
    access_create, assert_not_in_files, complete_ok, grant_result, lease_one, open_with, options,
};
use crate::control_plane::embedded::{EmbeddedControlPlane, Options};
use crate::control_plane::operator::AccessState;
use crate::control_plane::store::db::p;
use crate::control_plane::store::testing::{self, TestBackend};

const CANARY: &str = "canary-otp-7f3a91c2e5";

fn creds(password: &str) -> Credentials {
    Credentials {
        username: "alice".into(),
        password: SecretString::from(password),
    }
}

fn token(s: &str) -> SecretString {
    SecretString::from(s)
}

#[test]
fn a_sealed_password_opens_only_for_its_access_and_under_its_token() {
    let sealer = Sealer::new(&token("operator-token-1"), "install-1").unwrap();
    let t = Utc::now();
    let row = sealer.seal("ar-1", &creds(CANARY), t).unwrap();
    assert!(!row.sealed.contains(CANARY) && !row.sealed.contains("alice"));
    assert_eq!(row.key_id, sealer.key_id());
    let opened = sealer.open("ar-1", &row).unwrap();
    assert_eq!(
        (opened.username.as_str(), opened.password.expose_secret()),
        ("alice", CANARY)
    );

    // A fresh nonce per seal: the same password never seals to the same bytes.
    assert_ne!(sealer.seal("ar-1", &creds(CANARY), t).unwrap().sealed, row.sealed);
    // The access id is the associated data: moved to another access, it does not open.
    assert!(matches!(sealer.open("ar-2", &row), Err(SealError::Damaged)));
    // Another operator token (or another install): another key, and another key id.
    for other in [
        Sealer::new(&token("operator-token-2"), "install-1").unwrap(),
        Sealer::new(&token("operator-token-1"), "install-2").unwrap(),
    ] {
        assert_ne!(other.key_id(), sealer.key_id());
        assert!(matches!(other.open("ar-1", &row), Err(SealError::Damaged)));
    }
    // The same token and install on another replica: the same key.
    let replica = Sealer::new(&token("operator-token-1"), "install-1").unwrap();
    assert_eq!(replica.key_id(), sealer.key_id());
    assert!(replica.open("ar-1", &row).is_ok());

    let shown = format!("{sealer:?} {row:?} {}", SealError::Damaged);
    assert!(
        !shown.contains(CANARY) && !shown.contains(&row.sealed) && !shown.contains("operator-token"),
        "{shown}"
    );
}

/// Runs `body` on PostgreSQL (a real server; under `CI=true` a missing one fails).
async fn on_postgres<F: std::future::Future<Output = ()>>(body: F) {
    if !testing::postgres_available() {
        return;
    }
    testing::BACKEND.scope(TestBackend::Postgres, body).await;
}

/// Every row of every table of the test's database, as text.
fn database_text(cp: &EmbeddedControlPlane) -> String {
    let c = cp.store.lock().unwrap();
    let tables = c
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .unwrap();
    let mut out = String::new();
    for t in tables {
        let name: String = t.get(0).unwrap();
        for r in c
            .query(&format!("SELECT row_to_json(t)::text FROM {name} t"), &[])
            .unwrap()
        {
            out.push_str(&r.get::<String>(0).unwrap());
        }
    }
    out
}

fn sealed_rows(cp: &EmbeddedControlPlane) -> i64 {
    let c = cp.store.lock().unwrap();
    c.query("SELECT COUNT(*) FROM one_time_credentials", &[]).unwrap()[0]
        .get(0)
        .unwrap()
}

/// A create-user access granted on `cp` with `password`, not read yet.
async fn granted(cp: &EmbeddedControlPlane, user: &str, password: &str) -> String {
    let a = cp.create_access(access_create(user, 3600, true)).unwrap();
    let grant = lease_one(cp, 0).await.expect("grant job");
    complete_ok(cp, &grant, grant_result(&format!("u-{user}"), true, Some(password))).await;
    a.id
}

/// Two replicas: control planes on one database with the same operator token.
fn replicas(dir: &std::path::Path) -> (Arc<EmbeddedControlPlane>, Arc<EmbeddedControlPlane>) {
    let one = open_with(options(dir), json!({}));
    let two = EmbeddedControlPlane::open(options(dir)).unwrap();
    (one, two)
}

#[tokio::test]
async fn a_password_sealed_on_one_replica_is_read_once_on_another_and_never_stored_in_clear() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = replicas(dir.path());
        let id = granted(&one, "alice", CANARY).await;

        assert_eq!(sealed_rows(&one), 1);
        let stored = database_text(&one);
        assert!(
            stored.contains(&id) && stored.contains("v1-"),
            "the sealed row is there"
        );
        assert!(
            !stored.contains(CANARY),
            "no password in clear anywhere in the database"
        );
        assert!(one.list_access().unwrap().iter().all(|a| a.credentials.is_none()));

        let first = two.access(&id).unwrap().unwrap();
        assert_eq!(first.state, AccessState::Active, "shown with the state that brought it");
        let shown = first.credentials.as_ref().expect("the other replica hands it out");
        assert_eq!(shown.password.expose_secret(), CANARY);
        assert!(first.note.is_none());
        assert!(!format!("{first:?}").contains(CANARY), "Debug is redacted");

        assert!(
            one.access(&id).unwrap().unwrap().credentials.is_none(),
            "once: not on the first replica"
        );
        assert!(
            two.access(&id).unwrap().unwrap().credentials.is_none(),
            "once: not again"
        );
        assert_eq!(sealed_rows(&one), 0, "taken on the first read");
    })
    .await;
}

#[tokio::test]
async fn two_replicas_reading_at_once_hand_it_out_once() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = replicas(dir.path());
        for round in 0..5 {
            let user = format!("user{round}");
            let id = granted(&one, &user, CANARY).await;
            let barrier = std::sync::Barrier::new(2);
            let got: Vec<bool> = std::thread::scope(|s| {
                let reads: Vec<_> = [&one, &two]
                    .into_iter()
                    .map(|cp| {
                        let (barrier, id) = (&barrier, &id);
                        s.spawn(move || {
                            barrier.wait();
                            cp.access(id).unwrap().unwrap().credentials.is_some()
                        })
                    })
                    .collect();
                reads.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(got.iter().filter(|g| **g).count(), 1, "round {round}: {got:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_replica_with_another_operator_token_cannot_open_it_and_says_what_to_do() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let one = open_with(options(dir.path()), json!({}));
        let rotated = EmbeddedControlPlane::open(Options {
            operator_token: Some(token("a-rotated-operator-token")),
            ..options(dir.path())
        })
        .unwrap();
        let id = granted(&one, "alice", CANARY).await;

        let read = rotated.access(&id).unwrap().unwrap();
        assert!(read.credentials.is_none());
        let note = read.note.clone().expect("a note says why");
        assert!(
            note.contains("sealed under another operator token")
                && note.contains("APONO_OPERATOR_TOKEN")
                && note.contains("--create-user"),
            "{note}"
        );
        assert!(!serde_json::to_string(&read).unwrap().contains(CANARY));
        assert_eq!(sealed_rows(&one), 1, "left for a replica with the right token");
        let shown = one
            .access(&id)
            .unwrap()
            .unwrap()
            .credentials
            .expect("the right token opens it");
        assert_eq!(shown.password.expose_secret(), CANARY);
    })
    .await;
}

#[tokio::test]
async fn a_sealed_password_moved_to_another_access_does_not_open() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let cp = open_with(options(dir.path()), json!({}));
        let alice = granted(&cp, "alice", CANARY).await;
        let bob = granted(&cp, "bob", "bobs-password").await;
        {
            let c = cp.store.lock().unwrap();
            c.exec(
                "UPDATE one_time_credentials SET sealed = (SELECT sealed FROM one_time_credentials WHERE access_id = ?1)
                 WHERE access_id = ?2",
                &p![alice, bob],
            )
            .unwrap();
        }
        let read = cp.access(&bob).unwrap().unwrap();
        assert!(read.credentials.is_none());
        assert!(
            read.note.as_deref().is_some_and(|n| n.contains("could not be opened")),
            "{read:?}"
        );
        assert_eq!(
            cp.access(&alice)
                .unwrap()
                .unwrap()
                .credentials
                .unwrap()
                .password
                .expose_secret(),
            CANARY
        );
    })
    .await;
}

#[tokio::test]
async fn unread_credentials_go_when_the_access_ends_or_after_24_hours() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let cp = open_with(options(dir.path()), json!({}));

        // The access ends: its revoke's completion deletes them.
        let ended = granted(&cp, "alice", CANARY).await;
        cp.revoke_access(&ended).unwrap();
        let revoke = lease_one(&cp, 0).await.expect("revoke job");
        complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-apono-1"]})).await;
        assert_eq!(cp.access(&ended).unwrap().unwrap().state, AccessState::Revoked);
        assert_eq!(sealed_rows(&cp), 0, "deleted when the access ended");

        // Older than 24 h: not handed out, and pruned.
        let old = granted(&cp, "bob", CANARY).await;
        {
            let c = cp.store.lock().unwrap();
            let day_and_a_bit = i64::try_from(KEEP_FOR.as_millis()).unwrap() + 1_000;
            c.exec(
                "UPDATE one_time_credentials SET created_at = created_at - ?1 WHERE access_id = ?2",
                &p![day_and_a_bit, old],
            )
            .unwrap();
        }
        assert!(
            cp.access(&old).unwrap().unwrap().credentials.is_none(),
            "too old to hand out"
        );
        let fresh = granted(&cp, "carol", "carols-password").await;
        cp.prune(Utc::now()).unwrap();
        assert_eq!(sealed_rows(&cp), 1, "the old one pruned, the fresh one kept");
        assert!(cp.access(&fresh).unwrap().unwrap().credentials.is_some());
    })
    .await;
}

#[tokio::test]
async fn without_an_operator_token_a_replica_keeps_them_in_its_memory() {
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        let cp = open_with(
            Options {
                operator_token: None,
                ..options(dir.path())
            },
            json!({}),
        );
        assert!(cp.sealer.is_none());
        let id = granted(&cp, "alice", CANARY).await;
        assert_eq!(sealed_rows(&cp), 0, "nothing written without a key");
        assert!(!database_text(&cp).contains(CANARY));
        assert!(cp.access(&id).unwrap().unwrap().credentials.is_some());
    })
    .await;
}

#[tokio::test]
async fn on_sqlite_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    assert!(cp.sealer.is_none());
    let id = granted(&cp, "alice", CANARY).await;
    // Unread, so still held (in memory): neither the file nor its WAL has it.
    assert_not_in_files(dir.path(), CANARY);
    assert_eq!(sealed_rows(&cp), 0);
    let shown = cp.access(&id).unwrap().unwrap().credentials.expect("shown from memory");
    assert_eq!(shown.password.expose_secret(), CANARY);
}

/// A rotation that completes after its access ended keeps nothing (no one may read it).
async fn a_rotation_finishing_after_its_access_ended_keeps_nothing_on(dir: &std::path::Path) {
    let day = std::time::Duration::from_millis(300);
    let cp = open_with(Options { day, ..options(dir) }, json!({"credential_rotation_days": 1}));
    let id = granted(&cp, "alice", "first-password").await;
    assert!(cp.access(&id).unwrap().unwrap().credentials.is_some());
    tokio::time::sleep(day + std::time::Duration::from_millis(50)).await;
    cp.tick_once().unwrap();
    let rotate = lease_one(&cp, 0).await.expect("rotation due");
    assert_eq!(rotate.kind, "rotate_credentials");
    cp.revoke_access(&id).unwrap();
    let revoke = lease_one(&cp, 0).await.expect("revoke job");
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-apono-1"]})).await;
    complete_ok(&cp, &rotate, grant_result("u-alice", false, Some(CANARY))).await;
    assert_eq!(sealed_rows(&cp), 0);
    assert!(cp.access(&id).unwrap().unwrap().credentials.is_none());
    assert!(cp.credentials_map().is_empty(), "nothing held in memory either");
}

#[tokio::test]
async fn a_rotation_finishing_after_its_access_ended_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    a_rotation_finishing_after_its_access_ended_keeps_nothing_on(dir.path()).await;
    on_postgres(async {
        let dir = tempfile::tempdir().unwrap();
        a_rotation_finishing_after_its_access_ended_keeps_nothing_on(dir.path()).await;
    })
    .await;
}
