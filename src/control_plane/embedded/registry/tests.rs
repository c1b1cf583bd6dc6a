//! Pinning and what an inline registration may not change.

use super::super::tests::{access_create, complete_ok, grant_result, lease_one, open_with, options, spec_json};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::embedded::IntegrationSource;
use crate::control_plane::operator::{AccessRequestCreate, AccessState, IntegrationRef};
use crate::control_plane::store::testing::backends;
use crate::integrations::IntegrationSpec;
use serde_json::{Value, json};

fn spec(name: &str, config: Value) -> IntegrationSpec {
    serde_json::from_value(spec_json(name, config)).unwrap()
}

fn inline(name: &str, config: Value, user: &str) -> AccessRequestCreate {
    AccessRequestCreate {
        integration: IntegrationRef::Inline(Box::new(spec(name, config))),
        ..access_create(user, 3600, false)
    }
}

fn conflict_message(r: Result<impl std::fmt::Debug, ControlPlaneError>) -> String {
    match r {
        Err(ControlPlaneError::Rejected { status: 409, message }) => message,
        other => panic!("expected a 409, got {other:?}"),
    }
}

backends! {
#[tokio::test]
async fn an_access_keeps_the_integration_it_was_granted_with() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let old = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(grant.integration["config"]["host"], "rancher.example.com");
    complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;

    // The operator moves `test` to another Rancher in the config and restarts.
    cp.register_integration(
        &spec("test", json!({"host": "other.example.com"})),
        IntegrationSource::Config,
    )
    .unwrap();
    cp.revoke_access(&old.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.kind, "revoke");
    assert_eq!(
        revoke.integration["config"]["host"], "rancher.example.com",
        "the revoke goes where the grant went"
    );
    assert_eq!(cp.job(&revoke.id).unwrap().unwrap().integration, "test");

    cp.create_access(access_create("bob", 3600, false)).unwrap();
    let new_grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(new_grant.integration["config"]["host"], "other.example.com");
}
}

backends! {
#[tokio::test]
async fn an_inline_integration_cannot_replace_one_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let message = conflict_message(cp.create_access(inline("test", json!({"host": "evil.example.com"}), "alice")));
    assert!(
        message.contains("\"test\"") && message.contains("config file"),
        "{message}"
    );
    assert!(cp.list_access().unwrap().is_empty(), "nothing was created");
    // The same spec inline changes nothing and is accepted.
    cp.create_access(inline("test", json!({}), "alice")).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(grant.integration["config"]["host"], "rancher.example.com");
}
}

backends! {
#[tokio::test]
async fn an_inline_integration_cannot_move_while_accesses_on_it_have_not_ended() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let live = cp
        .create_access(inline("inl", json!({"host": "one.example.com"}), "alice"))
        .unwrap();
    let moves = [
        json!({"host": "two.example.com"}),
        json!({"host": "one.example.com", "port": 8443}),
    ];
    for config in moves {
        let message = conflict_message(cp.create_access(inline("inl", config.clone(), "bob")));
        assert!(message.contains(&live.id), "{config}: {message}");
    }
    let mut other_key: Value = spec_json("inl", json!({"host": "one.example.com"}));
    other_key["secret_store"]["credentials"]["access_key"] = json!("token-y");
    let other_key: IntegrationSpec = serde_json::from_value(other_key).unwrap();
    let message = conflict_message(cp.create_access(AccessRequestCreate {
        integration: IntegrationRef::Inline(Box::new(other_key)),
        ..access_create("bob", 60, false)
    }));
    assert!(message.contains("secret_store"), "{message}");
    assert_eq!(
        cp.list_access().unwrap().len(),
        1,
        "the refused requests created nothing"
    );

    // What does not move the target may change.
    let friendly = cp
        .create_access(inline(
            "inl",
            json!({"host": "one.example.com", "ui_url": "https://ui.example.com"}),
            "carol",
        ))
        .unwrap();
    // Once every access on it has ended, it may move.
    for id in [&live.id, &friendly.id] {
        assert_eq!(cp.revoke_access(id).unwrap().state, AccessState::Revoked);
    }
    cp.create_access(inline("inl", json!({"host": "two.example.com"}), "dave"))
        .unwrap();
    // And the config file may always take a name over.
    cp.register_integration(
        &spec("inl", json!({"host": "three.example.com"})),
        IntegrationSource::Config,
    )
    .unwrap();
    let message = conflict_message(cp.create_access(inline("inl", json!({"host": "two.example.com"}), "erin")));
    assert!(message.contains("config file"), "{message}");
}
}

backends! {
#[tokio::test]
async fn a_key_rotated_in_the_config_reaches_accesses_granted_before() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let old = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
    let mut rotated = spec_json("test", json!({}));
    rotated["secret_store"]["credentials"]["access_key"] = json!("token-rotated");
    let rotated: IntegrationSpec = serde_json::from_value(rotated).unwrap();
    cp.register_integration(&rotated, IntegrationSource::Config).unwrap();
    cp.revoke_access(&old.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.integration["config"]["host"], "rancher.example.com");
    assert_eq!(
        revoke.integration["secret_store"]["credentials"]["access_key"], "token-rotated",
        "same Rancher: the current key is used"
    );
}
}
