//! Users the connector created are tracked from every result that says so.

use super::super::tests::{access_create, complete_ok, failed, grant_result, lease_one, open_with, options};
use crate::control_plane::ControlPlane;
use crate::control_plane::store::testing::backends;
use serde_json::json;

backends! {
#[tokio::test]
async fn a_user_the_connector_created_is_tracked_from_a_revoke_result() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({"user_cleanup_days": 1}));
    let a = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
    assert!(
        cp.managed_users().unwrap().is_empty(),
        "not reported as the connector's yet"
    );
    cp.revoke_access(&a.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    complete_ok(
        &cp,
        &revoke,
        json!({"removed_binding_ids": [], "user_id": "u-alice", "managed_user": true, "user_disabled": true}),
    )
    .await;
    let users = cp.managed_users().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(
        (users[0].integration.as_str(), users[0].user_id.as_str()),
        ("test", "u-alice")
    );
    assert!(
        users[0].cleanup_at.is_some(),
        "its last access ended: cleanup scheduled"
    );
}
}

backends! {
#[tokio::test]
async fn a_user_is_tracked_from_a_cleanup_revoke_after_a_failed_grant() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    cp.create_access(access_create("bob", 3600, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    cp.complete(&grant.id, &failed(&grant, false)).await.unwrap();
    let cleanup = lease_one(&cp, 0).await.expect("cleanup revoke");
    complete_ok(
        &cp,
        &cleanup,
        json!({"removed_binding_ids": ["c-1:crtb-b"], "user_id": "u-bob", "managed_user": true}),
    )
    .await;
    let users = cp.managed_users().unwrap();
    assert_eq!(
        users.iter().map(|u| u.user_id.as_str()).collect::<Vec<_>>(),
        vec!["u-bob"]
    );
}
}

backends! {
#[tokio::test]
async fn a_user_is_tracked_when_the_grant_says_it_is_the_connectors() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    cp.create_access(access_create("carol", 3600, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    // A retried create-user grant: the user exists already, so created_user is false.
    let mut result = grant_result("u-carol", false, None);
    result["managed_user"] = json!(true);
    complete_ok(&cp, &grant, result).await;
    assert_eq!(cp.managed_users().unwrap().len(), 1);
}
}
