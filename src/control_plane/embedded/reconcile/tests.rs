//! The reconcile, one test per row of the module's table (and how repairs settle).

use super::super::tests::{
    access_create, complete_ok, failed, grant_result, lease_all, lease_one, open_with, options, spec_json,
};
use super::super::{EmbeddedControlPlane, IntegrationSource, Options};
use crate::control_plane::ControlPlane;
use crate::control_plane::operator::{AccessState, JobState};
use crate::control_plane::protocol::{CompleteRequest, Job, Outcome, ReleaseRequest};
use crate::control_plane::store::testing::backends;
use crate::integrations::{GrantRequest, HeldState, IntegrationSpec, SweepRequest};
use crate::telemetry::metrics::{IntegrationLabels, SweptLabels};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn sweep_jobs(cp: &EmbeddedControlPlane) -> usize {
    cp.list_jobs().unwrap().iter().filter(|j| j.kind == "sweep").count()
}

/// A sweep's `keep_binding_ids` (absent when empty).
fn keep(job: &Job) -> serde_json::Value {
    job.params.get("keep_binding_ids").cloned().unwrap_or(json!([]))
}

fn with_sweeps(dir: &std::path::Path) -> Options {
    Options {
        sweep_interval: Duration::from_secs(3600),
        ..options(dir)
    }
}

/// An access on `test` holding `c-1:crtb-apono-1`.
async fn active_access(cp: &EmbeddedControlPlane) {
    cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(cp, 0).await.unwrap();
    complete_ok(cp, &grant, grant_result("u-alice", false, None)).await;
}

backends! {
#[tokio::test]
async fn a_sweep_per_integration_is_queued_at_start_and_never_twice_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let other = serde_json::from_value(spec_json("other", json!({"host": "other.example.com"}))).unwrap();
    cp.register_integration(&other, IntegrationSource::Config).unwrap();
    active_access(&cp).await;

    cp.tick_once().unwrap();
    assert_eq!(sweep_jobs(&cp), 2, "one per integration at the first tick");
    cp.tick_once().unwrap();
    assert_eq!(sweep_jobs(&cp), 2, "not again before the interval");
    assert!(
        cp.queue_sweeps().unwrap().is_empty(),
        "not while the previous ones are pending"
    );

    let jobs = lease_all(&cp).await;
    assert_eq!(jobs.len(), 2);
    let by_name = |n: &str| jobs.iter().find(|j| j.integration["name"] == n).unwrap();
    assert_eq!(by_name("test").kind, "sweep");
    assert_eq!(keep(by_name("test")), json!(["c-1:crtb-apono-1"]));
    assert_eq!(keep(by_name("other")), json!([]));
    assert!(cp.queue_sweeps().unwrap().is_empty(), "not while they are leased");

    complete_ok(&cp, by_name("test"), json!({"removed": [], "marked": 1})).await;
    assert_eq!(cp.queue_sweeps().unwrap().len(), 1, "only the settled one again");
}
}

backends! {
#[tokio::test]
async fn a_moved_integration_is_also_swept_where_its_live_accesses_were_granted() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    active_access(&cp).await;
    let moved = serde_json::from_value(spec_json("test", json!({"host": "new.example.com"}))).unwrap();
    cp.register_integration(&moved, IntegrationSource::Config).unwrap();
    assert_eq!(cp.queue_sweeps().unwrap().len(), 2);
    let jobs = lease_all(&cp).await;
    let by_host = |h: &str| jobs.iter().find(|j| j.integration["config"]["host"] == h).unwrap();
    assert_eq!(keep(by_host("rancher.example.com")), json!(["c-1:crtb-apono-1"]));
    assert_eq!(keep(by_host("new.example.com")), json!([]));
}
}

backends! {
#[tokio::test]
async fn no_sweeps_when_the_interval_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    cp.tick_once().unwrap();
    assert_eq!(sweep_jobs(&cp), 0);
}
}

// ----- the reconcile's table -----

/// An active access for `user` on integration `name`, holding `binding`. Returns its id.
async fn granted_on(cp: &EmbeddedControlPlane, name: &str, user: &str, binding: &str) -> String {
    let a = cp
        .create_access(crate::control_plane::operator::AccessRequestCreate {
            integration: crate::control_plane::operator::IntegrationRef::Name(name.into()),
            ..access_create(user, 3600, false)
        })
        .unwrap();
    let grant = lease_one(cp, 0).await.unwrap();
    let mut result = grant_result(&format!("u-{user}"), false, None);
    result["binding_ids"] = json!([binding]);
    complete_ok(cp, &grant, result).await;
    assert_eq!(cp.access(&a.id).unwrap().unwrap().state, AccessState::Active);
    a.id
}

async fn granted(cp: &EmbeddedControlPlane, user: &str, binding: &str) -> String {
    granted_on(cp, "test", user, binding).await
}

/// Leases every ready job and keeps those of `kind`; the others are given back unstarted.
async fn lease_kind(cp: &EmbeddedControlPlane, kind: &str) -> Vec<Job> {
    let mut mine = Vec::new();
    for job in lease_all(cp).await {
        if job.kind == kind {
            mine.push(job);
        } else {
            let release = ReleaseRequest {
                lease_token: job.lease_token.clone(),
                started: false,
            };
            cp.release(&job.id, &release).await.unwrap();
        }
    }
    mine
}

/// Queues and leases the sweep of `test`'s Rancher.
async fn sweep(cp: &EmbeddedControlPlane) -> Job {
    cp.queue_sweeps().unwrap();
    let mut sweeps = lease_kind(cp, "sweep").await;
    assert_eq!(sweeps.len(), 1, "one sweep for the one Rancher");
    sweeps.remove(0)
}

/// Runs one reconcile whose agent reports `result`; returns what was logged meanwhile.
async fn reconcile(cp: &EmbeddedControlPlane, result: Value) -> String {
    let job = sweep(cp).await;
    let request = CompleteRequest {
        lease_token: job.lease_token.clone(),
        outcome: Outcome::Succeeded,
        error: None,
        result: Some(result),
    };
    let (done, logs) = logged(|| cp.complete_sync(&job.id, &request));
    done.unwrap();
    logs
}

/// Alice's active access, reported missing, with its repair handed out: `(access id, repair)`.
async fn repair_running(cp: &EmbeddedControlPlane) -> (String, Job) {
    let a = granted(cp, "alice", "c-1:crtb-a").await;
    reconcile(cp, missing(&a)).await;
    let repair = lease_kind(cp, "grant").await.remove(0);
    (a, repair)
}

/// Ends access `a` now and hands its revoke out.
async fn revoke_running(cp: &EmbeddedControlPlane, a: &str) -> Job {
    cp.revoke_access(a).unwrap();
    lease_kind(cp, "revoke").await.remove(0)
}

/// Completes `revoke`, which removed `ids`; returns the access's state then.
async fn revoked(cp: &EmbeddedControlPlane, a: &str, revoke: &Job, ids: Value) -> AccessState {
    complete_ok(cp, revoke, json!({ "removed_binding_ids": ids })).await;
    cp.access(a).unwrap().unwrap().state
}

/// Completes a repair that made `c-1:crtb-made-late`.
async fn made_late(cp: &EmbeddedControlPlane, repair: &Job) {
    let mut result = grant_result("u-alice", false, None);
    result["binding_ids"] = json!(["c-1:crtb-made-late"]);
    complete_ok(cp, repair, result).await;
}

fn missing(id: &str) -> Value {
    json!({"removed": [], "missing": [{"grant_id": id, "reason": "no binding of cluster-member on c-1 for u-x"}]})
}

/// Open grant jobs of access `id` (its repairs, once it is active).
fn repairs(cp: &EmbeddedControlPlane, id: &str) -> usize {
    let conn = cp.store.lock().unwrap();
    crate::control_plane::store::open_jobs_of_access(&*conn, id, "grant")
        .unwrap()
        .len()
}

fn repairs_counted() -> u64 {
    crate::telemetry::metrics()
        .access_repairs
        .get_or_create(&IntegrationLabels {
            integration: "test".into(),
        })
        .get()
}

/// Runs `f` with a subscriber that captures every log line at debug and above.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    (out, text)
}

backends! {
#[tokio::test]
async fn one_sweep_per_rancher_whatever_its_integrations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let alias: IntegrationSpec = serde_json::from_value(spec_json("test-b", json!({}))).unwrap();
    cp.register_integration(&alias, IntegrationSource::Config).unwrap();
    let a = granted_on(&cp, "test", "alice", "c-1:crtb-a").await;
    let b = granted_on(&cp, "test-b", "bob", "c-1:crtb-b").await;
    assert_eq!(cp.queue_sweeps().unwrap().len(), 1, "two names, one Rancher");
    let job = lease_kind(&cp, "sweep").await.remove(0);
    let request: SweepRequest = serde_json::from_value(job.params).unwrap();
    let held: Vec<&str> = request.accesses.iter().flatten().map(|h| h.grant_id.as_str()).collect();
    assert_eq!(held, vec![a.as_str(), b.as_str()], "either name's bindings are claimed");
    assert_eq!(request.keep_binding_ids, vec!["c-1:crtb-a", "c-1:crtb-b"]);
}
}

backends! {
#[tokio::test]
async fn a_sweep_carries_the_owner_and_the_accesses_as_they_are_when_it_is_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let active = granted(&cp, "alice", "c-1:crtb-a").await;
    let foreign = granted(&cp, "zed", "c-1:crtb-z").await;
    cp.store
        .lock()
        .unwrap()
        .exec(
            "UPDATE access_requests SET owner = 'other-connector/0123' WHERE id = ?1",
            &crate::control_plane::store::db::p![foreign],
        )
        .unwrap();
    cp.queue_sweeps().unwrap();
    // Requested after the sweep was queued: still in it when it is handed out.
    let pending = cp.create_access(access_create("bob", 60, false)).unwrap();
    let job = lease_kind(&cp, "sweep").await.remove(0);
    let request: SweepRequest = serde_json::from_value(job.params).expect("an agent parses it");
    assert_eq!(request.owner.as_ref(), Some(cp.owner()));
    assert!(cp.owner().as_str().starts_with("standalone/"), "{}", cp.owner());
    let held = request.accesses.expect("the accesses are sent");
    let by_id = |id: &str| held.iter().find(|h| h.grant_id == id);
    let a = by_id(&active).expect("the active access");
    let row = cp.access(&active).unwrap().unwrap();
    assert_eq!(
        (a.state, a.binding_ids.clone()),
        (HeldState::Active, vec!["c-1:crtb-a".to_string()])
    );
    assert_eq!((a.expires_at, a.user_id.as_deref()), (row.expires_at, Some("u-alice")));
    assert_eq!(by_id(&pending.id).map(|h| h.state), Some(HeldState::Pending));
    assert!(
        by_id(&foreign).is_none(),
        "another owner's access: that owner's sweep checks it"
    );
    assert!(
        request.keep_binding_ids.contains(&"c-1:crtb-z".to_string()),
        "but its binding is never removed"
    );
}
}

backends! {
#[tokio::test]
async fn a_missing_active_access_gets_one_repair_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let a = granted(&cp, "alice", "c-1:crtb-a").await;
    let counted = repairs_counted();
    let logs = reconcile(&cp, missing(&a)).await;
    assert!(logs.contains(&format!("repairing access {a}: no binding")), "{logs}");
    assert_eq!(repairs(&cp, &a), 1);
    assert!(repairs_counted() > counted, "counted in /metrics");
    reconcile(&cp, missing(&a)).await;
    assert_eq!(repairs(&cp, &a), 1, "not a second while one is open");

    let repair = lease_kind(&cp, "grant").await.remove(0);
    let row = cp.access(&a).unwrap().unwrap();
    let request: GrantRequest = serde_json::from_value(repair.params).unwrap();
    assert_eq!(request.grant_id.as_deref(), Some(a.as_str()));
    assert_eq!(request.expires_at, row.expires_at, "no new TTL");
    assert_eq!(request.owner.as_ref(), Some(cp.owner()));
    assert!(request.keep_password, "a repair never resets a password");
}
}

backends! {
#[tokio::test]
async fn a_missing_access_that_is_no_longer_active_is_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let a = granted(&cp, "alice", "c-1:crtb-a").await;
    cp.revoke_access(&a).unwrap();
    reconcile(&cp, missing(&a)).await;
    assert_eq!(repairs(&cp, &a), 0);
    assert_eq!(lease_kind(&cp, "grant").await.len(), 0);
}
}

backends! {
#[tokio::test]
async fn a_binding_the_sweep_removed_under_an_active_access_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let a = granted(&cp, "alice", "c-1:crtb-a").await;
    let other = granted(&cp, "bob", "c-1:crtb-b").await;
    reconcile(
        &cp,
        json!({"removed": [{"id": "c-1:crtb-a", "scope": "cluster", "role_id": "cluster-member",
                            "resource_id": "c-1", "subject": "u-alice", "reason": "unclaimed"}]}),
    )
    .await;
    assert_eq!((repairs(&cp, &a), repairs(&cp, &other)), (1, 0));
}
}

backends! {
#[tokio::test]
async fn removed_bindings_are_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let counter = |reason: &str| {
        crate::telemetry::metrics()
            .swept_bindings
            .get_or_create(&SweptLabels {
                integration: "test".into(),
                reason: reason.into(),
            })
            .get()
    };
    let (expired, unclaimed) = (counter("expired"), counter("unclaimed"));
    let binding = |id: &str, reason: &str| json!({"id": id, "scope": "cluster", "role_id": "r", "resource_id": "c-1", "subject": "u-x", "reason": reason});
    reconcile(
        &cp,
        json!({"removed": [binding("c-1:crtb-1", "expired"), binding("c-1:crtb-2", "expired"),
                           binding("c-1:crtb-3", "unclaimed")]}),
    )
    .await;
    assert!(counter("expired") >= expired + 2);
    assert!(counter("unclaimed") > unclaimed);
    assert!(
        crate::telemetry::metrics()
            .encode()
            .contains("apono_connector_swept_bindings_total{")
    );
}
}

backends! {
#[tokio::test]
async fn a_rancher_clock_far_from_ours_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let off = chrono::Utc::now() - chrono::Duration::hours(1);
    let logs = reconcile(&cp, json!({"removed": [], "rancher_time": off})).await;
    assert!(logs.contains("Rancher's clock and this host's differ"), "{logs}");
    let logs = reconcile(&cp, json!({"removed": [], "rancher_time": chrono::Utc::now()})).await;
    assert!(!logs.contains("clock"), "{logs}");
}
}

// ----- how repairs settle -----

backends! {
#[tokio::test]
async fn a_repair_merges_its_bindings_and_keeps_the_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    // A `pre_existing` access: someone else's binding carried it, and that one is gone.
    let a = cp.create_access(access_create("kim", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(
        &cp,
        &grant,
        json!({"user_id": "u-kim", "binding_ids": [], "created_user": false, "pre_existing": true,
               "pre_existing_binding_ids": ["c-1:crtb-person"]}),
    )
    .await;
    let before = cp.access(&a.id).unwrap().unwrap();
    reconcile(&cp, missing(&a.id)).await;
    let repair = lease_kind(&cp, "grant").await.remove(0);
    let (_, logs) = logged(|| {
        cp.complete_sync(
            &repair.id,
            &CompleteRequest {
                lease_token: repair.lease_token.clone(),
                outcome: Outcome::Succeeded,
                error: None,
                result: Some(
                    json!({"user_id": "u-kim", "binding_ids": ["c-1:crtb-own"], "created_user": false,
                                    "bound_subject": {"field": "userId", "value": "u-kim"}}),
                ),
            },
        )
        .unwrap()
    });
    assert!(logs.contains("repaired"), "{logs}");
    let after = cp.access(&a.id).unwrap().unwrap();
    assert_eq!(after.state, AccessState::Active);
    assert_eq!(after.binding_ids, vec!["c-1:crtb-own"], "its own binding now");
    assert!(!after.pre_existing);
    assert_eq!(after.bound_subject.map(|b| b.key()).as_deref(), Some("userId=u-kim"));
    assert_eq!(
        (after.expires_at, after.granted_at),
        (before.expires_at, before.granted_at)
    );
    // Its revoke removes the binding the repair made.
    cp.revoke_access(&a.id).unwrap();
    let revoke = lease_kind(&cp, "revoke").await.remove(0);
    assert_eq!(revoke.params["binding_ids"], json!(["c-1:crtb-own"]));
}
}

backends! {
#[tokio::test]
async fn a_repair_that_fails_for_good_leaves_the_access_active_and_the_next_pass_tries_again() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let (a, repair) = repair_running(&cp).await;
    cp.complete(&repair.id, &failed(&repair, false)).await.unwrap();
    assert_eq!(cp.job(&repair.id).unwrap().unwrap().state, JobState::Failed);
    let row = cp.access(&a).unwrap().unwrap();
    assert_eq!(row.state, AccessState::Active);
    assert_eq!(row.last_error.map(|e| e.code).as_deref(), Some("unavailable"));
    assert!(lease_all(&cp).await.is_empty(), "no revoke: the access has not ended");
    reconcile(&cp, missing(&a)).await;
    assert_eq!(repairs(&cp, &a), 1, "tried again");
}
}

backends! {
#[tokio::test]
async fn a_repair_that_completes_after_the_access_was_revoked_is_revoked_too() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let (a, repair) = repair_running(&cp).await;
    // The access ends and its revoke completes while the repair runs.
    let revoke = revoke_running(&cp, &a).await;
    assert_eq!(
        revoked(&cp, &a, &revoke, json!(["c-1:crtb-a"])).await,
        AccessState::Revoked
    );
    made_late(&cp, &repair).await;
    assert_eq!(cp.access(&a).unwrap().unwrap().state, AccessState::Revoking);
    let cleanup = lease_kind(&cp, "revoke").await.remove(0);
    assert_eq!(cleanup.params["binding_ids"], json!(["c-1:crtb-made-late"]));
    assert_eq!(cleanup.params["grant_id"], json!(a));
    let ids = json!(["c-1:crtb-made-late"]);
    assert_eq!(revoked(&cp, &a, &cleanup, ids).await, AccessState::Revoked);
}
}

backends! {
#[tokio::test]
async fn a_repair_that_completes_while_the_revoke_runs_is_followed_by_another_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let (a, repair) = repair_running(&cp).await;
    let revoke = revoke_running(&cp, &a).await;
    made_late(&cp, &repair).await;
    assert_eq!(
        revoked(&cp, &a, &revoke, json!(["c-1:crtb-a"])).await,
        AccessState::Revoking,
        "not revoked while a binding it recorded is left"
    );
    let again = lease_kind(&cp, "revoke").await.remove(0);
    assert_ne!(again.id, revoke.id);
    let ids: Vec<String> = serde_json::from_value(again.params["binding_ids"].clone()).unwrap();
    assert!(ids.contains(&"c-1:crtb-made-late".to_string()), "{ids:?}");
    assert_eq!(revoked(&cp, &a, &again, json!(ids)).await, AccessState::Revoked);
}
}

backends! {
#[tokio::test]
async fn a_repair_whose_access_ended_before_it_ran_again_is_cancelled_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let (a, repair) = repair_running(&cp).await;
    cp.complete(&repair.id, &failed(&repair, true)).await.unwrap();
    let backoff = |until: Option<i64>| {
        cp.store
            .lock()
            .unwrap()
            .exec(
                "UPDATE jobs SET not_before = ?2 WHERE id = ?1",
                &crate::control_plane::store::db::p![repair.id, until],
            )
            .unwrap()
    };
    // Held back until the access has ended.
    backoff(Some(
        (chrono::Utc::now() + chrono::Duration::days(1)).timestamp_millis(),
    ));
    let revoke = revoke_running(&cp, &a).await;
    assert_eq!(
        revoked(&cp, &a, &revoke, json!(["c-1:crtb-a"])).await,
        AccessState::Revoked
    );
    backoff(None);
    let next = lease_all(&cp).await;
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(
        next[0].kind, "revoke",
        "the repair's first attempt may have made a binding"
    );
    let job = cp.job(&repair.id).unwrap().unwrap();
    assert_eq!(
        (job.state, job.error.map(|e| e.code)),
        (JobState::Failed, Some("cancelled".into()))
    );
}
}

backends! {
#[tokio::test]
async fn a_revoke_that_removes_a_binding_another_active_access_lists_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(with_sweeps(dir.path()), json!({}));
    let holder = granted(&cp, "alice", "c-1:crtb-shared").await;
    let other = granted(&cp, "bob", "c-1:crtb-b").await;
    let revoke = revoke_running(&cp, &other).await;
    // A race (e.g. two names for one person) made bob's revoke take alice's binding too.
    let ids = json!(["c-1:crtb-b", "c-1:crtb-shared"]);
    assert_eq!(revoked(&cp, &other, &revoke, ids).await, AccessState::Revoked);
    assert_eq!(repairs(&cp, &holder), 1);
    assert_eq!(cp.access(&holder).unwrap().unwrap().state, AccessState::Active);
}
}
