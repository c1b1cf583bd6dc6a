//! Sweep scheduling.

use super::super::tests::{access_create, complete_ok, grant_result, lease_one, open_with, options, spec_json};
use super::super::{EmbeddedControlPlane, IntegrationSource, Options};
use crate::control_plane::ControlPlane;
use crate::control_plane::protocol::{Job, LeaseRequest};
use serde_json::json;
use std::time::Duration;

fn sweep_jobs(cp: &EmbeddedControlPlane) -> usize {
    cp.list_jobs().unwrap().iter().filter(|j| j.kind == "sweep").count()
}

async fn lease_all(cp: &EmbeddedControlPlane) -> Vec<Job> {
    let jobs = cp
        .lease(&LeaseRequest {
            max_jobs: 10,
            wait_seconds: 0,
        })
        .await
        .unwrap();
    jobs.into_iter().map(|v| serde_json::from_value(v).unwrap()).collect()
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

#[tokio::test]
async fn no_sweeps_when_the_interval_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    cp.tick_once().unwrap();
    assert_eq!(sweep_jobs(&cp), 0);
}
