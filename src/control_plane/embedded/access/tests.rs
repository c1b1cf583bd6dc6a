//! The access lifecycle, driven as an agent would: lease, complete, and the scheduler's tick.

use super::super::tests::{
    access_create, complete_ok, failed, grant_result, lease_all, lease_one, open_with, options, spec_json,
};
use super::super::{EmbeddedControlPlane, Options};
use super::{pending_row, share_binding};
use crate::control_plane::ControlPlane;
use crate::control_plane::operator::{AccessRequestCreate, AccessState, JobState};
use crate::control_plane::store::AccessRow;
use crate::control_plane::store::testing::backends;
use crate::integrations::{BoundSubject, GrantRequest, Resource, RevokeRequest, Subject};
use serde_json::{Value, json};
use std::time::Duration;

fn granted(user_id: &str, binding: &str) -> Value {
    json!({"user_id": user_id, "binding_ids": [binding], "created_user": false, "access_details": ""})
}

/// Creates an access and runs its grant to `active` with `binding` recorded.
async fn active(cp: &EmbeddedControlPlane, user: &str, ttl: u64, binding: &str) -> String {
    let a = cp.create_access(access_create(user, ttl, false)).unwrap();
    let grant = lease_one(cp, 0).await.expect("grant");
    assert_eq!(grant.id, a.grant_job_id);
    complete_ok(cp, &grant, granted(&format!("u-{user}"), binding)).await;
    assert_eq!(cp.access(&a.id).unwrap().unwrap().state, AccessState::Active);
    a.id
}

fn state(cp: &EmbeddedControlPlane, id: &str) -> AccessState {
    cp.access(id).unwrap().unwrap().state
}

backends! {
#[tokio::test]
async fn overlapping_accesses_keep_the_binding_until_the_last_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let first = active(&cp, "alice", 1, "c-1:crtb-first").await;
    let second = active(&cp, "alice", 2, "c-1:crtb-second").await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    cp.tick_once().unwrap();
    let a = cp.access(&first).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoked, "ended without a revoke");
    assert!(a.revoke_job_id.is_none());
    assert!(
        lease_all(&cp).await.is_empty(),
        "no revoke job while the second holds the binding"
    );
    let b = cp.access(&second).unwrap().unwrap();
    assert_eq!(b.state, AccessState::Active);
    assert_eq!(b.binding_ids, vec!["c-1:crtb-second", "c-1:crtb-first"], "handed over");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    cp.tick_once().unwrap();
    assert_eq!(state(&cp, &second), AccessState::Revoking);
    let revoke = lease_one(&cp, 0).await.expect("the last one revokes");
    assert_eq!(revoke.kind, "revoke");
    assert_eq!(revoke.params["grant_id"], json!(second));
    assert_eq!(
        revoke.params["binding_ids"],
        json!(["c-1:crtb-second", "c-1:crtb-first"])
    );
    complete_ok(
        &cp,
        &revoke,
        json!({"removed_binding_ids": ["c-1:crtb-second", "c-1:crtb-first"]}),
    )
    .await;
    assert_eq!(state(&cp, &second), AccessState::Revoked);
}
}

backends! {
#[tokio::test]
async fn accesses_of_other_subjects_or_roles_do_not_hold_a_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let alice = active(&cp, "alice", 3600, "c-1:crtb-a").await;
    let _bob = active(&cp, "bob", 3600, "c-1:crtb-b").await;
    cp.revoke_access(&alice).unwrap();
    assert_eq!(state(&cp, &alice), AccessState::Revoking, "bob's access is another key");
    assert_eq!(lease_one(&cp, 0).await.unwrap().kind, "revoke");
}
}

backends! {
#[tokio::test]
async fn a_pending_access_on_the_key_holds_the_binding_and_keeps_it_after_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let first = active(&cp, "alice", 3600, "c-1:crtb-x").await;
    let second = cp.create_access(access_create("alice", 3600, false)).unwrap();
    cp.revoke_access(&first).unwrap();
    assert_eq!(state(&cp, &first), AccessState::Revoked, "the pending one holds it");
    let grant = lease_one(&cp, 0).await.expect("the second's grant");
    assert_eq!(grant.id, second.grant_job_id);
    // The grant reports the connector's existing binding under its own id, plus one more.
    complete_ok(&cp, &grant, granted("u-alice", "c-1:crtb-y")).await;
    let b = cp.access(&second.id).unwrap().unwrap();
    assert_eq!(b.state, AccessState::Active);
    assert_eq!(
        b.binding_ids,
        vec!["c-1:crtb-x", "c-1:crtb-y"],
        "handed-over ids survive the grant result"
    );
}
}

backends! {
#[tokio::test]
async fn a_grant_waits_while_a_revoke_on_its_key_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let first = active(&cp, "alice", 3600, "c-1:crtb-x").await;
    cp.revoke_access(&first).unwrap();
    let second = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let jobs = lease_all(&cp).await;
    assert_eq!(jobs.len(), 1, "only the revoke: {jobs:?}");
    assert_eq!(jobs[0].kind, "revoke");
    assert!(lease_all(&cp).await.is_empty(), "the grant still waits");
    assert_eq!(cp.job(&second.grant_job_id).unwrap().unwrap().state, JobState::Pending);
    complete_ok(&cp, &jobs[0], json!({"removed_binding_ids": ["c-1:crtb-x"]})).await;
    let grant = lease_one(&cp, 5).await.expect("handed out once the revoke settled");
    assert_eq!(grant.id, second.grant_job_id);
    assert_eq!(grant.attempt, 1, "holding it back did not count as an attempt");
}
}

backends! {
#[tokio::test]
async fn a_grant_out_of_attempts_is_cleaned_up_with_what_it_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            max_grant_attempts: 2,
            ..options(dir.path())
        },
        json!({}),
    );
    let a = cp.create_access(access_create("carol", 60, true)).unwrap();
    for attempt in 1..=2 {
        let grant = lease_one(&cp, 5).await.expect("grant attempt");
        assert_eq!(grant.attempt, attempt);
        cp.complete(&grant.id, &failed(&grant, true)).await.unwrap();
    }
    assert_eq!(cp.job(&a.grant_job_id).unwrap().unwrap().state, JobState::Failed);
    assert_eq!(state(&cp, &a.id), AccessState::Revoking);
    let cleanup = lease_one(&cp, 0).await.expect("cleanup revoke");
    assert_eq!(
        cleanup.params,
        json!({"user": "carol", "role": "cluster-member", "resource": "c-1", "grant_id": a.id,
               "owner": cp.owner().as_str()}),
        "nothing recorded: the agent removes the connector's marked bindings of this grant id"
    );
    complete_ok(&cp, &cleanup, json!({"removed_binding_ids": ["c-1:crtb-c"]})).await;
    let a = cp.access(&a.id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoked);
    assert_eq!(a.last_error.map(|e| e.code).as_deref(), Some("unavailable"));
}
}

backends! {
#[tokio::test]
async fn a_revoke_asked_during_a_running_grant_is_carried_out_when_the_grant_fails() {
    for retryable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cp = open_with(options(dir.path()), json!({}));
        let a = cp.create_access(access_create("dave", 60, false)).unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        let during = cp.revoke_access(&a.id).unwrap();
        assert_eq!(during.state, AccessState::Pending, "carried out when the grant settles");
        cp.complete(&grant.id, &failed(&grant, retryable)).await.unwrap();
        let g = cp.job(&a.grant_job_id).unwrap().unwrap();
        assert_eq!(g.state, JobState::Failed, "retryable={retryable}: not granted again");
        assert_eq!(state(&cp, &a.id), AccessState::Revoking, "retryable={retryable}");
        let cleanup = lease_one(&cp, 0).await.expect("cleanup revoke");
        assert_eq!(cleanup.kind, "revoke");
        complete_ok(&cp, &cleanup, json!({"removed_binding_ids": []})).await;
        let a = cp.access(&a.id).unwrap().unwrap();
        assert_eq!(a.state, AccessState::Revoked);
        assert_eq!(a.last_error.map(|e| e.code).as_deref(), Some("unavailable"));
    }
}
}

backends! {
#[tokio::test]
async fn a_grant_cancelled_after_it_started_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            retry_base: Duration::from_secs(30),
            ..options(dir.path())
        },
        json!({}),
    );
    let a = cp.create_access(access_create("erin", 60, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    cp.complete(&grant.id, &failed(&grant, true)).await.unwrap();
    assert_eq!(
        cp.job(&a.grant_job_id).unwrap().unwrap().state,
        JobState::Pending,
        "requeued"
    );
    let r = cp.revoke_access(&a.id).unwrap();
    assert_eq!(r.state, AccessState::Revoking, "an attempt ran: clean up");
    let g = cp.job(&a.grant_job_id).unwrap().unwrap();
    assert_eq!(
        (g.state, g.error.map(|e| e.code)),
        (JobState::Failed, Some("cancelled".into()))
    );
    let cleanup = lease_one(&cp, 0).await.expect("cleanup revoke, not the grant");
    assert_eq!(cleanup.kind, "revoke");
    complete_ok(&cp, &cleanup, json!({"removed_binding_ids": []})).await;
    let a = cp.access(&a.id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoked);
    assert_eq!(a.last_error.map(|e| e.code).as_deref(), Some("cancelled"));
}
}

backends! {
#[tokio::test]
async fn a_grant_revoked_while_a_dead_agent_held_it_is_not_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            lease_duration: Duration::from_millis(300),
            ..options(dir.path())
        },
        json!({}),
    );
    let a = cp.create_access(access_create("frank", 60, false)).unwrap();
    let _held_by_a_dead_agent = lease_one(&cp, 0).await.unwrap();
    assert_eq!(cp.revoke_access(&a.id).unwrap().state, AccessState::Pending);
    let next = lease_one(&cp, 5).await.expect("something after the dead lease ran out");
    assert_eq!(next.kind, "revoke", "the cleanup, not the grant again");
    let g = cp.job(&a.grant_job_id).unwrap().unwrap();
    assert_eq!(
        (g.state, g.error.map(|e| e.code)),
        (JobState::Failed, Some("cancelled".into()))
    );
    assert_eq!(state(&cp, &a.id), AccessState::Revoking);
}
}

backends! {
#[tokio::test]
async fn the_ttl_starts_at_the_first_hand_out_and_every_attempt_marks_the_same_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let a = cp.create_access(access_create("gina", 60, false)).unwrap();
    assert!(a.expires_at.is_none(), "not before the grant is handed out");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = lease_one(&cp, 0).await.unwrap();
    let expires = cp.access(&a.id).unwrap().unwrap().expires_at.expect("started");
    assert!(expires - a.created_at >= chrono::Duration::milliseconds(60_300));
    assert_eq!(first.params["expires_at"], json!(expires));
    assert_eq!(first.params["grant_id"], json!(a.id));
    cp.complete(&first.id, &failed(&first, true)).await.unwrap();
    let second = lease_one(&cp, 5).await.expect("retry");
    assert_eq!(second.params["expires_at"], json!(expires), "the same expiry");
    complete_ok(&cp, &second, granted("u-gina", "c-1:crtb-g")).await;
    let done = cp.access(&a.id).unwrap().unwrap();
    assert_eq!(done.expires_at, Some(expires), "success does not restart the TTL");
}
}

backends! {
#[tokio::test]
async fn a_grant_whose_expiry_passed_before_it_ran_is_cleaned_up_instead() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            retry_base: Duration::from_millis(1500),
            ..options(dir.path())
        },
        json!({}),
    );
    let a = cp.create_access(access_create("hank", 1, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    cp.complete(&grant.id, &failed(&grant, true)).await.unwrap();
    let next = lease_one(&cp, 5).await.expect("a job after the backoff");
    assert_eq!(next.kind, "revoke", "the expired grant is not handed out");
    let g = cp.job(&a.grant_job_id).unwrap().unwrap();
    assert!(g.error.unwrap().message.contains("expired"));
    complete_ok(&cp, &next, json!({"removed_binding_ids": []})).await;
    assert_eq!(state(&cp, &a.id), AccessState::Revoked);
}
}

backends! {
#[tokio::test]
async fn revoke_works_on_every_access_that_has_not_ended() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    // A legacy `failed` access (older builds): revoke queues the cleanup it never had.
    let legacy = active(&cp, "ivan", 3600, "c-1:crtb-i").await;
    cp.store
        .lock()
        .unwrap()
        .exec(
            "UPDATE access_requests SET state = 'failed' WHERE id = ?1",
            &crate::control_plane::store::db::p![legacy],
        )
        .unwrap();
    assert_eq!(cp.revoke_access(&legacy).unwrap().state, AccessState::Revoking);
    let revoke = lease_one(&cp, 0).await.expect("cleanup revoke");
    assert_eq!(revoke.params["binding_ids"], json!(["c-1:crtb-i"]));
    // Revoking, then revoked: nothing more is queued.
    assert_eq!(cp.revoke_access(&legacy).unwrap().state, AccessState::Revoking);
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-i"]})).await;
    assert_eq!(cp.revoke_access(&legacy).unwrap().state, AccessState::Revoked);
    assert!(lease_all(&cp).await.is_empty());
}
}

backends! {
#[tokio::test]
async fn a_failed_grant_on_a_held_key_ends_without_a_revoke_and_keeps_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let holder = active(&cp, "judy", 3600, "c-1:crtb-j").await;
    let b = cp.create_access(access_create("judy", 60, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    cp.complete(&grant.id, &failed(&grant, false)).await.unwrap();
    let b = cp.access(&b.id).unwrap().unwrap();
    assert_eq!(b.state, AccessState::Revoked);
    assert_eq!(b.last_error.map(|e| e.code).as_deref(), Some("unavailable"));
    assert!(lease_all(&cp).await.is_empty(), "no revoke under the active holder");
    assert_eq!(state(&cp, &holder), AccessState::Active);
}
}

backends! {
#[tokio::test]
async fn the_grant_result_says_when_equal_access_was_already_there() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let a = cp.create_access(access_create("kim", 60, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    let mut result = granted("u-kim", "c-1:crtb-k");
    result["pre_existing"] = json!(true);
    result["binding_ids"] = json!([]);
    complete_ok(&cp, &grant, result).await;
    let a = cp.access(&a.id).unwrap().unwrap();
    assert!(a.pre_existing);
    assert!(serde_json::to_value(&a).unwrap()["pre_existing"].as_bool().unwrap());
}
}

// ----- overlap: one binding in Rancher, however the accesses name it -----

/// An active access on integration `name` (Rancher `host`) for `subject` with role
/// `cluster-member` on `resource`, bound by `bound` when given.
fn row(name: &str, host: &str, subject: Subject, resource: &str, bound: Option<(&str, &str)>) -> (AccessRow, Value) {
    let spec = spec_json(name, json!({"host": host}));
    let request = AccessRequestCreate {
        subject,
        resource: Resource::parse(resource).unwrap(),
        ..access_create("x", 60, false)
    };
    let id = format!("ar-{}", uuid::Uuid::now_v7());
    let mut row = pending_row(id, name, request, "j".into(), spec.clone(), chrono::Utc::now());
    row.state = AccessState::Active;
    row.bound_subject = bound.map(|(field, value)| BoundSubject {
        field: field.into(),
        value: value.into(),
    });
    (row, spec)
}

fn shares(a: &(AccessRow, Value), b: &(AccessRow, Value)) -> bool {
    let one = share_binding(&a.0, &a.1, &b.0, &b.1);
    assert_eq!(one, share_binding(&b.0, &b.1, &a.0, &a.1), "the rule is symmetric");
    one
}

const HOST: &str = "rancher.example.com";

#[test]
fn two_spellings_of_one_user_share_a_binding() {
    let by_name = row(
        "prod",
        HOST,
        Subject::Username("alice".into()),
        "c-1",
        Some(("userId", "u-alice1")),
    );
    let by_principal = row("prod", HOST, Subject::user("local://u-alice1"), "c-1", None);
    assert!(shares(&by_name, &by_principal), "lifecycle review D4a");
    let other = row("prod", HOST, Subject::user("local://u-bob"), "c-1", None);
    assert!(!shares(&by_name, &other));
}

#[test]
fn a_username_recorded_by_an_older_build_shares_by_its_user_id() {
    let (mut old, spec) = row("prod", HOST, Subject::Username("alice".into()), "c-1", None);
    old.user_id = Some("u-alice1".into());
    let by_principal = row("prod", HOST, Subject::user("local://u-alice1"), "c-1", None);
    assert!(shares(&(old, spec), &by_principal));
}

#[test]
fn a_username_not_yet_resolved_shares_only_with_the_same_username() {
    let pending = row("prod", HOST, Subject::Username("alice".into()), "c-1", None);
    let same = row(
        "prod",
        HOST,
        Subject::Username("alice".into()),
        "c-1",
        Some(("userId", "u-alice1")),
    );
    let principal = row("prod", HOST, Subject::user("local://u-alice1"), "c-1", None);
    assert!(shares(&pending, &same), "the old rule: equal subject strings");
    assert!(!shares(&pending, &principal), "unknown until its grant resolves it");
}

#[test]
fn two_integration_names_on_one_rancher_share_a_binding() {
    let prod = row("prod", HOST, Subject::Username("alice".into()), "c-1", None);
    let prod_b = row("prod-b", HOST, Subject::Username("alice".into()), "c-1", None);
    assert!(shares(&prod, &prod_b), "lifecycle review D4b");
}

#[test]
fn accesses_on_different_ranchers_never_share_a_binding() {
    let a = row(
        "prod",
        HOST,
        Subject::Username("alice".into()),
        "c-1",
        Some(("userId", "u-1")),
    );
    let b = row(
        "prod",
        "other.example.com",
        Subject::Username("alice".into()),
        "c-1",
        Some(("userId", "u-1")),
    );
    assert!(!shares(&a, &b));
    let (mut x, _) = row("x", HOST, Subject::Username("alice".into()), "c-1", None);
    let (mut y, _) = row("y", HOST, Subject::Username("alice".into()), "c-1", None);
    (x.integration_spec, y.integration_spec) = (None, None);
    assert!(
        !shares(&(x, Value::Null), &(y, Value::Null)),
        "unknown Ranchers: only by integration name"
    );
}

#[test]
fn other_roles_or_resources_never_share_a_binding() {
    let a = row("prod", HOST, Subject::Username("alice".into()), "c-1", None);
    let other_resource = row("prod", HOST, Subject::Username("alice".into()), "c-2", None);
    let (mut other_role, spec) = row("prod", HOST, Subject::Username("alice".into()), "c-1", None);
    other_role.role = "cluster-owner".into();
    assert!(!shares(&a, &other_resource));
    assert!(!shares(&a, &(other_role, spec)));
}

#[test]
fn a_group_shares_by_its_principal() {
    let recorded = row(
        "prod",
        HOST,
        Subject::GroupPrincipal("okta_group://sre".into()),
        "c-1",
        Some(("groupPrincipalId", "okta_group://sre")),
    );
    let pending = row(
        "prod-b",
        HOST,
        Subject::GroupPrincipal("okta_group://sre".into()),
        "c-1",
        None,
    );
    let other = row(
        "prod",
        HOST,
        Subject::GroupPrincipal("okta_group://ops".into()),
        "c-1",
        None,
    );
    assert!(shares(&recorded, &pending));
    assert!(!shares(&recorded, &other));
}

#[test]
fn an_external_principal_shares_by_principal_at_cluster_and_project_scope_only() {
    for resource in ["c-1", "c-1:p-1"] {
        let principal = row("prod", HOST, Subject::user("github_user://7"), resource, None);
        let by_name = row(
            "prod",
            HOST,
            Subject::Username("octocat".into()),
            resource,
            Some(("userPrincipalId", "github_user://7")),
        );
        assert!(shares(&principal, &by_name), "{resource}");
    }
    // A global role binding names a user id: the principal alone does not say which.
    let principal = row("prod", HOST, Subject::user("github_user://7"), "global", None);
    let by_name = row(
        "prod",
        HOST,
        Subject::Username("octocat".into()),
        "global",
        Some(("userId", "u-7")),
    );
    assert!(!shares(&principal, &by_name));
}

backends! {
#[tokio::test]
async fn an_access_under_another_spelling_keeps_the_binding_when_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let long = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    let mut result = granted("u-alice1", "c-1:crtb-a");
    result["bound_subject"] = json!({"field": "userId", "value": "u-alice1"});
    complete_ok(&cp, &grant, result.clone()).await;
    let short = cp
        .create_access(AccessRequestCreate {
            subject: Subject::user("local://u-alice1"),
            ..access_create("x", 3600, false)
        })
        .unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, result).await;
    let ended = cp.revoke_access(&short.id).unwrap();
    assert_eq!(
        ended.state,
        AccessState::Revoked,
        "no revoke under the other spelling's access"
    );
    assert!(lease_all(&cp).await.is_empty());
    assert_eq!(state(&cp, &long.id), AccessState::Active);
}
}

// ----- subjects that are not users (lifecycle review D1) -----

fn group_create() -> AccessRequestCreate {
    AccessRequestCreate {
        subject: Subject::GroupPrincipal("okta_group://sre".into()),
        ..access_create("x", 3600, false)
    }
}

backends! {
#[tokio::test]
async fn a_group_grant_is_revoked_with_params_an_agent_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let a = cp.create_access(group_create()).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(
        &cp,
        &grant,
        json!({"user_id": "", "binding_ids": ["c-1:crtb-g"], "created_user": false,
               "bound_subject": {"field": "groupPrincipalId", "value": "okta_group://sre"}}),
    )
    .await;
    let view = cp.access(&a.id).unwrap().unwrap();
    assert_eq!((view.state, view.user_id.as_deref()), (AccessState::Active, None));
    assert_eq!(
        view.bound_subject.as_ref().map(BoundSubject::key).as_deref(),
        Some("groupPrincipalId=okta_group://sre")
    );
    cp.revoke_access(&a.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    let request: RevokeRequest = serde_json::from_value(revoke.params.clone()).expect("an agent parses it");
    assert_eq!(request.user_id, None);
    assert_eq!(request.subject, Subject::GroupPrincipal("okta_group://sre".into()));
    assert_eq!(request.binding_ids, vec!["c-1:crtb-g"]);
    assert_eq!(
        request.bound_subject.map(|b| b.key()).as_deref(),
        Some("groupPrincipalId=okta_group://sre")
    );
    assert_eq!(request.owner.as_ref(), Some(cp.owner()));
}
}

backends! {
#[tokio::test]
async fn a_revoke_stuck_on_a_principal_in_user_id_recovers_at_its_next_hand_out() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let a = cp.create_access(group_create()).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, granted("okta_group://sre", "c-1:crtb-g")).await;
    assert_eq!(
        cp.access(&a.id).unwrap().unwrap().user_id,
        None,
        "a principal is not recorded as a user id"
    );
    cp.revoke_access(&a.id).unwrap();
    // As an older build left it: the principal in the row and in the revoke's params, which the
    // agent refused as malformed.
    let job_id = cp.access(&a.id).unwrap().unwrap().revoke_job_id.unwrap();
    {
        let conn = cp.store.lock().unwrap();
        conn.exec(
            "UPDATE access_requests SET user_id = 'okta_group://sre' WHERE id = ?1",
            &crate::control_plane::store::db::p![a.id],
        )
        .unwrap();
        let params = json!({"group": "okta_group://sre", "role": "cluster-member", "resource": "c-1",
                            "user_id": "okta_group://sre"});
        conn.exec(
            "UPDATE jobs SET params = ?2, attempt = 4 WHERE id = ?1",
            &crate::control_plane::store::db::p![job_id, params.to_string()],
        )
        .unwrap();
    }
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.id, job_id);
    let request: RevokeRequest = serde_json::from_value(revoke.params.clone()).expect("parses now");
    assert_eq!(request.user_id, None);
    assert_eq!(request.grant_id.as_deref(), Some(a.id.as_str()));
    assert_eq!(request.binding_ids, vec!["c-1:crtb-g"], "what the grant recorded");
    assert_eq!(
        cp.access(&a.id).unwrap().unwrap().user_id,
        None,
        "dropped from the access too"
    );
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-g"]})).await;
    assert_eq!(state(&cp, &a.id), AccessState::Revoked);
}
}

// ----- passwords (lifecycle review D9) -----

fn create_user_on(resource: &str) -> AccessRequestCreate {
    AccessRequestCreate {
        resource: Resource::parse(resource).unwrap(),
        ..access_create("dana", 3600, true)
    }
}

backends! {
#[tokio::test]
async fn a_create_user_grant_keeps_the_password_of_a_live_access() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let first = cp.create_access(create_user_on("c-1")).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(grant.params.get("keep_password"), None, "nobody holds a password yet");
    let mut result = grant_result("u-dana", true, Some("pw-first"));
    result["managed_user"] = json!(true);
    complete_ok(&cp, &grant, result).await;
    assert!(cp.access(&first.id).unwrap().unwrap().credentials.is_some());

    let second = cp.create_access(create_user_on("c-2")).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(
        grant.params["keep_password"],
        json!(true),
        "the first access's password stays valid"
    );
    let request: GrantRequest = serde_json::from_value(grant.params.clone()).unwrap();
    assert!(request.keep_password && request.create_user);
    complete_ok(
        &cp,
        &grant,
        json!({"user_id": "u-dana", "binding_ids": ["c-2:crtb-d"], "created_user": false, "managed_user": true,
               "note": "dana already has a password from an earlier access"}),
    )
    .await;
    let view = cp.access(&second.id).unwrap().unwrap();
    assert_eq!(view.state, AccessState::Active);
    assert!(view.credentials.is_none());
    let note = view.note.expect("the requester is told why there is no password");
    assert!(note.contains("earlier access") && note.contains(&first.id), "{note}");
    assert_eq!(
        serde_json::to_value(cp.access(&second.id).unwrap().unwrap()).unwrap()["note"],
        json!(note),
        "in the operator API's view"
    );

    // Once the first access has ended, a new one gets its own password.
    cp.revoke_access(&first.id).unwrap();
    cp.revoke_access(&second.id).unwrap();
    for revoke in lease_all(&cp).await {
        complete_ok(&cp, &revoke, json!({"removed_binding_ids": []})).await;
    }
    cp.create_access(create_user_on("c-3")).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(grant.params.get("keep_password"), None);
}
}

backends! {
/// Accesses that end in one scheduler pass (one transaction): those alone on their subject are
/// revoked each, and where several share one (by name or by the user id their grant recorded),
/// each one ended hands its binding to the next and the last revokes them all; one that ends
/// beside an access that goes on hands its binding over and queues nothing.
#[tokio::test]
async fn a_mass_expiry_hands_bindings_over_within_one_pass_and_revokes_each_binding_once() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let alice_bound = |binding: &str| {
        let mut r = granted("u-alice1", binding);
        r["bound_subject"] = json!({"field": "userId", "value": "u-alice1"});
        r
    };
    let mut alice = Vec::new();
    for (i, subject) in ["alice", "local://u-alice1", "alice"].into_iter().enumerate() {
        let a = cp
            .create_access(AccessRequestCreate {
                subject: Subject::user(subject),
                ..access_create("x", 1, false)
            })
            .unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        complete_ok(&cp, &grant, alice_bound(&format!("c-1:crtb-alice{i}"))).await;
        alice.push(a.id);
    }
    let mut loners = Vec::new();
    for i in 0..10 {
        loners.push(active(&cp, &format!("user{i}"), 1, &format!("c-1:crtb-user{i}")).await);
    }
    let dave_short = active(&cp, "dave", 1, "c-1:crtb-dave1").await;
    let dave_long = active(&cp, "dave", 3600, "c-1:crtb-dave2").await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    cp.tick_once().unwrap();

    let mut revokes = Vec::new();
    loop {
        let jobs = lease_all(&cp).await;
        if jobs.is_empty() {
            break;
        }
        revokes.extend(jobs);
    }
    assert!(revokes.iter().all(|j| j.kind == "revoke"));
    let by_access = |id: &str| {
        revokes
            .iter()
            .filter(|j| j.params["grant_id"] == json!(id))
            .collect::<Vec<_>>()
    };
    for (i, id) in loners.iter().enumerate() {
        assert_eq!(state(&cp, id), AccessState::Revoking);
        let jobs = by_access(id);
        assert_eq!(jobs.len(), 1, "one revoke for user{i}");
        assert_eq!(jobs[0].params["binding_ids"], json!([format!("c-1:crtb-user{i}")]));
    }
    // The first two handed their bindings on; the last one revokes all three.
    for id in &alice[..2] {
        assert_eq!(state(&cp, id), AccessState::Revoked);
        assert!(by_access(id).is_empty());
    }
    assert_eq!(state(&cp, &alice[2]), AccessState::Revoking);
    let last = by_access(&alice[2]);
    assert_eq!(last.len(), 1);
    let mut ids: Vec<String> = serde_json::from_value(last[0].params["binding_ids"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, ["c-1:crtb-alice0", "c-1:crtb-alice1", "c-1:crtb-alice2"]);
    // Dave's goes on: the binding of the one that ended is his now, and nothing is revoked.
    assert_eq!(state(&cp, &dave_short), AccessState::Revoked);
    assert!(by_access(&dave_short).is_empty() && by_access(&dave_long).is_empty());
    let kept = cp.access(&dave_long).unwrap().unwrap();
    assert_eq!(kept.state, AccessState::Active);
    assert_eq!(kept.binding_ids, vec!["c-1:crtb-dave2", "c-1:crtb-dave1"]);
    assert_eq!(revokes.len(), loners.len() + 1, "no other revoke");
}
}
