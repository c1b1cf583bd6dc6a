use super::*;
use crate::control_plane::operator::{AccessRequestCreate, AccessState, IntegrationRef};
use crate::control_plane::store::db::p;
use crate::control_plane::store::testing::backends;
use crate::integrations::{IntegrationSpec, Resource, Subject};
use serde_json::json;
use std::time::Instant;

const INLINE_SECRET: &str = "inline-secret-value-4711";

pub(crate) fn spec_json(name: &str, extra_config: Value) -> Value {
    let mut config = json!({"host": "rancher.example.com"});
    if let (Value::Object(c), Value::Object(extra)) = (&mut config, extra_config) {
        c.extend(extra);
    }
    json!({
        "type": "rancher",
        "name": name,
        "config": config,
        "secret_store": {"type": "APONO", "credentials": {"access_key": "token-x", "secret_key": INLINE_SECRET}},
    })
}

pub(crate) fn options(dir: &std::path::Path) -> Options {
    Options {
        data_dir: dir.to_path_buf(),
        database_url: crate::control_plane::store::testing::database_url_for(dir),
        // Required with a database (it seals one-time passwords there); unused on SQLite.
        operator_token: Some(secrecy::SecretString::from("test-operator-token")),
        lease_duration: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        retry_base: Duration::from_millis(40),
        max_grant_attempts: 3,
        ..Options::default()
    }
}

pub(crate) fn open_with(options: Options, extra_config: Value) -> Arc<EmbeddedControlPlane> {
    let cp = EmbeddedControlPlane::open(options).expect("open");
    let spec: IntegrationSpec = serde_json::from_value(spec_json("test", extra_config)).expect("spec");
    cp.register_integration(&spec, IntegrationSource::Config)
        .expect("register");
    cp
}

pub(crate) fn access_create(user: &str, ttl_seconds: u64, create_user: bool) -> AccessRequestCreate {
    AccessRequestCreate {
        integration: IntegrationRef::Name("test".into()),
        subject: Subject::Username(user.into()),
        role: "cluster-member".into(),
        resource: Resource::Cluster("c-1".into()),
        ttl_seconds,
        create_user,
    }
}

pub(crate) async fn lease_one(cp: &EmbeddedControlPlane, wait_seconds: u32) -> Option<Job> {
    let jobs = cp
        .lease(&LeaseRequest {
            max_jobs: 1,
            wait_seconds,
        })
        .await
        .expect("lease");
    jobs.first()
        .map(|v| serde_json::from_value(v.clone()).expect("job envelope"))
}

/// Leases every ready job (up to 10).
pub(crate) async fn lease_all(cp: &EmbeddedControlPlane) -> Vec<Job> {
    cp.lease(&LeaseRequest {
        max_jobs: 10,
        wait_seconds: 0,
    })
    .await
    .expect("lease")
    .into_iter()
    .map(|v| serde_json::from_value(v).expect("job"))
    .collect()
}

pub(crate) async fn complete_ok(cp: &EmbeddedControlPlane, job: &Job, result: Value) {
    cp.complete(
        &job.id,
        &CompleteRequest {
            lease_token: job.lease_token.clone(),
            outcome: Outcome::Succeeded,
            error: None,
            result: Some(result),
        },
    )
    .await
    .expect("complete");
}

pub(crate) fn failed(job: &Job, retryable: bool) -> CompleteRequest {
    CompleteRequest {
        lease_token: job.lease_token.clone(),
        outcome: Outcome::Failed,
        error: Some(JobError {
            code: "unavailable".into(),
            message: "Rancher answered 503".into(),
            retryable,
        }),
        result: None,
    }
}

pub(crate) fn grant_result(user_id: &str, created_user: bool, password: Option<&str>) -> Value {
    let mut v = json!({
        "user_id": user_id,
        "binding_ids": ["c-1:crtb-apono-1"],
        "created_user": created_user,
        "access_details": "Log in as alice",
    });
    if let Some(p) = password {
        v["credentials"] = json!({"username": "alice", "password": p});
    }
    v
}

/// A fake agent: completes every job it leases; revokes fail `fail_revokes` times first.
fn spawn_fake_agent(
    cp: Arc<EmbeddedControlPlane>,
    stop: CancellationToken,
    fail_revokes: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut revoke_failures = 0;
        loop {
            let jobs = tokio::select! {
                _ = stop.cancelled() => return,
                r = cp.lease(&LeaseRequest { max_jobs: 4, wait_seconds: 1 }) => r.expect("lease"),
            };
            for raw in jobs {
                let job: Job = serde_json::from_value(raw).expect("job");
                let request = match job.kind.as_str() {
                    "revoke" if revoke_failures < fail_revokes => {
                        revoke_failures += 1;
                        failed(&job, false)
                    }
                    kind => CompleteRequest {
                        lease_token: job.lease_token.clone(),
                        outcome: Outcome::Succeeded,
                        error: None,
                        // Each user is its own Rancher user, with its own binding.
                        result: Some(match kind {
                            "grant" => {
                                let user = job.params["user"].as_str().unwrap_or("alice");
                                let mut r = grant_result(&format!("u-{user}"), false, None);
                                if user != "alice" {
                                    r["binding_ids"] = json!([format!("c-1:crtb-{user}")]);
                                }
                                r
                            }
                            "revoke" => json!({"removed_binding_ids": job.params["binding_ids"]}),
                            _ => json!({}),
                        }),
                    },
                };
                cp.complete(&job.id, &request).await.expect("complete");
            }
        }
    })
}

/// Gives the rows of `table` (`access_requests` or `jobs`) the same ids in the reverse of the
/// order they were stored in: what concurrent creates leave (an id is made before its
/// transaction waits for the write lock). Returns the ids in stored order (descending).
pub(crate) fn store_ids_out_of_order(cp: &EmbeddedControlPlane, table: &str) -> Vec<String> {
    assert!(matches!(table, "access_requests" | "jobs"));
    let c = cp.store.lock().unwrap();
    let stored: Vec<String> = c
        .query(&format!("SELECT id FROM {table} ORDER BY seq"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<String>(0).unwrap())
        .collect();
    let mut descending = stored.clone();
    descending.sort_unstable_by(|a, b| b.cmp(a));
    let rename = |from: &str, to: &str| {
        c.exec(&format!("UPDATE {table} SET id = ?1 WHERE id = ?2"), &p![to, from])
            .unwrap();
    };
    for (i, id) in stored.iter().enumerate() {
        rename(id, &format!("renaming-{i}"));
    }
    for (i, id) in descending.iter().enumerate() {
        rename(&format!("renaming-{i}"), id);
    }
    descending
}

/// Fails when a file in `dir` (the state file, its WAL) holds `canary`.
pub(crate) fn assert_not_in_files(dir: &std::path::Path, canary: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "canary found in {}",
            path.display()
        );
    }
}

pub(crate) async fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

backends! {
#[tokio::test]
async fn lease_renew_complete_are_idempotent_and_stale_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let created = cp
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    assert_eq!(created.state, JobState::Pending);
    assert_eq!(created.integration, "test");

    let job = lease_one(&cp, 0).await.expect("a job");
    assert_eq!(job.id, created.id);
    assert_eq!(job.attempt, 1);
    assert_eq!(job.kind, "validate");
    assert_eq!(
        job.integration["type"], "rancher",
        "the full spec is handed out: {}",
        job.integration
    );
    assert_eq!(job.integration["secret_store"]["type"], "APONO");
    assert!(
        lease_one(&cp, 0).await.is_none(),
        "a leased job is not handed out twice"
    );
    assert_eq!(cp.job(&job.id).unwrap().unwrap().state, JobState::Leased);

    let renewed = cp
        .renew(
            &job.id,
            &RenewRequest {
                lease_token: job.lease_token.clone(),
            },
        )
        .await
        .unwrap();
    assert!(renewed.lease_expires_at >= job.lease_expires_at);
    let stale = RenewRequest {
        lease_token: "lt-not-mine".into(),
    };
    assert!(matches!(
        cp.renew(&job.id, &stale).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert!(matches!(
        cp.renew("nope", &stale).await,
        Err(ControlPlaneError::NotFound { .. })
    ));

    complete_ok(&cp, &job, json!({"principal": "local://u-admin"})).await;
    complete_ok(&cp, &job, json!({"principal": "ignored"})).await; // same token: Ok, no change
    let record = cp.job(&job.id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.result, Some(json!({"principal": "local://u-admin"})));
    assert!(record.lease_expires_at.is_none());
    let other = CompleteRequest {
        lease_token: "lt-other".into(),
        ..failed(&job, false)
    };
    assert!(matches!(
        cp.complete(&job.id, &other).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert!(matches!(
        cp.renew(
            &job.id,
            &RenewRequest {
                lease_token: job.lease_token.clone()
            }
        )
        .await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
}
}

backends! {
#[tokio::test]
async fn a_long_poll_answers_as_soon_as_a_job_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let started = Instant::now();
    let waiter = {
        let cp = cp.clone();
        tokio::spawn(async move { lease_one(&cp, 20).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    cp.create_job(JobCreate {
        kind: "discover".into(),
        integration: json!("test"),
        params: json!({}),
    })
    .unwrap();
    let job = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered early")
        .unwrap();
    assert!(job.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );

    // With nothing to hand out, an empty answer after wait_seconds.
    let started = Instant::now();
    assert!(lease_one(&cp, 1).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
}
}

backends! {
#[tokio::test]
async fn an_expired_lease_hands_the_job_out_again_with_attempt_2() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            lease_duration: Duration::from_millis(300),
            ..options(dir.path())
        },
        json!({}),
    );
    cp.create_job(JobCreate {
        kind: "discover".into(),
        integration: json!("test"),
        params: json!({}),
    })
    .unwrap();
    let first = lease_one(&cp, 0).await.unwrap();
    let started = Instant::now();
    // The long-poll wakes when the lease runs out, not at the end of wait_seconds.
    let second = lease_one(&cp, 10).await.expect("handed out again");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woke at lease expiry: {:?}",
        started.elapsed()
    );
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.lease_token, first.lease_token);
    let stale = RenewRequest {
        lease_token: first.lease_token.clone(),
    };
    assert!(matches!(
        cp.renew(&first.id, &stale).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert!(matches!(
        cp.complete(&first.id, &failed(&first, true)).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert!(matches!(
        cp.upload_resources(&first, &[json!({"type": "cluster"})]).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    cp.upload_resources(
        &second,
        &[
            json!({"type": "cluster", "id": "c-1"}),
            json!({"type": "project", "id": "c-1:p-1"}),
        ],
    )
    .await
    .unwrap();
    complete_ok(&cp, &second, json!({"objects": 2, "uploaded": 2})).await;
    let resources = cp.resources(&second.id).unwrap();
    assert_eq!(resources.len(), 2);
    assert_eq!(resources[1]["id"], "c-1:p-1");
    assert_eq!(cp.job(&first.id).unwrap().unwrap().attempt, 2);
}
}

backends! {
#[tokio::test]
async fn retryable_failures_are_requeued_with_backoff_up_to_the_attempt_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            retry_base: Duration::from_millis(300),
            ..options(dir.path())
        },
        json!({}),
    );
    let created = cp
        .create_job(JobCreate {
            kind: "grant".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let job = lease_one(&cp, 0).await.unwrap();
    cp.complete(&job.id, &failed(&job, true)).await.unwrap();
    cp.complete(&job.id, &failed(&job, true)).await.unwrap(); // a repeat does not requeue twice
    let record = cp.job(&created.id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Pending, "requeued");
    assert_eq!(record.error.as_ref().map(|e| e.code.as_str()), Some("unavailable"));
    assert!(lease_one(&cp, 0).await.is_none(), "not before its backoff");
    let started = Instant::now();
    let job = lease_one(&cp, 5).await.expect("after the backoff");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "backoff {waited:?}"
    );
    assert_eq!(job.attempt, 2);
    cp.complete(&job.id, &failed(&job, true)).await.unwrap();
    let job = lease_one(&cp, 5).await.expect("third attempt");
    assert_eq!(job.attempt, 3);
    cp.complete(&job.id, &failed(&job, true)).await.unwrap();
    let record = cp.job(&created.id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Failed, "max_grant_attempts (3) reached");
    assert_eq!(record.attempt, 3);
    assert!(lease_one(&cp, 1).await.is_none());
}
}

backends! {
#[tokio::test]
async fn a_non_retryable_failure_is_final_at_once_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let access = cp.create_access(access_create("nobody", 60, false)).unwrap();
    let job = lease_one(&cp, 0).await.unwrap();
    assert_eq!(job.id, access.grant_job_id);
    let expires = cp
        .access(&access.id)
        .unwrap()
        .unwrap()
        .expires_at
        .expect("TTL started at hand-out");
    assert_eq!(
        job.params,
        json!({"user": "nobody", "role": "cluster-member", "resource": "c-1", "create_user": false,
               "grant_id": access.id, "expires_at": expires, "owner": cp.owner().as_str()})
    );
    cp.complete(&job.id, &failed(&job, false)).await.unwrap();
    let record = cp.job(&job.id).unwrap().unwrap();
    assert_eq!((record.state, record.attempt), (JobState::Failed, 1));
    let a = cp.access(&access.id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoking, "the failed grant is cleaned up");
    let cleanup = lease_one(&cp, 0).await.expect("cleanup revoke");
    assert_eq!(Some(cleanup.id.clone()), a.revoke_job_id);
    assert_eq!(
        cleanup.params,
        json!({"user": "nobody", "role": "cluster-member", "resource": "c-1", "grant_id": access.id,
               "owner": cp.owner().as_str()})
    );
    complete_ok(&cp, &cleanup, json!({"removed_binding_ids": []})).await;
    let a = cp.access(&access.id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoked);
    assert_eq!(
        a.last_error.map(|e| e.code),
        Some("unavailable".to_string()),
        "the grant's error is kept"
    );
}
}

backends! {
#[tokio::test]
async fn access_is_granted_then_revoked_by_the_scheduler_and_revokes_retry_forever() {
    let dir = tempfile::tempdir().unwrap();
    // One grant attempt allowed: revokes must not be bound by it.
    let cp = open_with(
        Options {
            max_grant_attempts: 1,
            ..options(dir.path())
        },
        json!({}),
    );
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    let agent = spawn_fake_agent(cp.clone(), stop.clone(), 2);

    let created = cp.create_access(access_create("alice", 1, false)).unwrap();
    assert_eq!(created.state, AccessState::Pending);
    let active = wait_for(Duration::from_secs(5), || {
        cp.access(&created.id)
            .unwrap()
            .filter(|a| a.state != AccessState::Pending)
    })
    .await;
    assert_eq!(active.state, AccessState::Active);
    assert_eq!(active.user_id.as_deref(), Some("u-alice"));
    assert_eq!(active.binding_ids, vec!["c-1:crtb-apono-1".to_string()]);
    assert_eq!(active.access_details.as_deref(), Some("Log in as alice"));
    let (granted, expires) = (active.granted_at.unwrap(), active.expires_at.unwrap());
    // The TTL started when the grant was handed out, just before it completed.
    assert!(expires - granted <= chrono::Duration::seconds(1));
    assert!(expires - active.created_at >= chrono::Duration::seconds(1));

    let revoked = wait_for(Duration::from_secs(10), || {
        cp.access(&created.id)
            .unwrap()
            .filter(|a| a.state == AccessState::Revoked)
    })
    .await;
    assert!(revoked.revoked_at.unwrap() >= expires);
    assert!(revoked.last_error.is_none());
    let revoke_job = cp.job(revoked.revoke_job_id.as_deref().unwrap()).unwrap().unwrap();
    assert_eq!(revoke_job.kind, "revoke");
    assert_eq!(revoke_job.state, JobState::Succeeded);
    assert_eq!(revoke_job.attempt, 3, "two non-retryable failures, then success");
    stop.cancel();
    let _ = tokio::join!(scheduler, agent);
}
}

backends! {
#[tokio::test]
async fn revoking_a_pending_access_cancels_or_follows_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    // Not yet handed out: cancelled, nothing to revoke.
    let a = cp.create_access(access_create("alice", 60, false)).unwrap();
    let r = cp.revoke_access(&a.id).unwrap();
    assert_eq!(r.state, AccessState::Revoked);
    assert_eq!(
        cp.job(&a.grant_job_id).unwrap().unwrap().error.map(|e| e.code),
        Some("cancelled".into())
    );
    assert!(
        lease_one(&cp, 0).await.is_none(),
        "the cancelled grant is not handed out"
    );
    assert_eq!(
        cp.revoke_access(&a.id).unwrap().state,
        AccessState::Revoked,
        "idempotent"
    );

    // Running: revoked as soon as the grant succeeds.
    let b = cp.create_access(access_create("bob", 60, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    assert_eq!(cp.revoke_access(&b.id).unwrap().state, AccessState::Pending);
    complete_ok(&cp, &grant, grant_result("u-bob", false, None)).await;
    let b = cp.access(&b.id).unwrap().unwrap();
    assert_eq!(b.state, AccessState::Revoking);
    let revoke = lease_one(&cp, 0).await.expect("revoke queued");
    assert_eq!(revoke.kind, "revoke");
    assert_eq!(
        revoke.params,
        json!({"user": "bob", "role": "cluster-member", "resource": "c-1", "grant_id": b.id,
               "user_id": "u-bob", "binding_ids": ["c-1:crtb-apono-1"], "owner": cp.owner().as_str()}),
        "the revoke carries what the grant recorded"
    );
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": []})).await;
    assert_eq!(cp.access(&b.id).unwrap().unwrap().state, AccessState::Revoked);

    // Active: revoke now.
    let c = cp.create_access(access_create("carol", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-carol", false, None)).await;
    assert_eq!(cp.revoke_access(&c.id).unwrap().state, AccessState::Revoking);
    assert!(matches!(
        cp.revoke_access("ar-nope"),
        Err(ControlPlaneError::NotFound { .. })
    ));
}
}

backends! {
#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        lease_duration: Duration::from_millis(400),
        ..options(dir.path())
    };
    let (access_id, leased_id) = {
        let cp = open_with(opts.clone(), json!({}));
        let a = cp.create_access(access_create("alice", 1, false)).unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
        assert_eq!(cp.access(&a.id).unwrap().unwrap().state, AccessState::Active);
        // A job leased by the process that is about to die.
        let j = cp
            .create_job(JobCreate {
                kind: "discover".into(),
                integration: json!("test"),
                params: json!({}),
            })
            .unwrap();
        assert_eq!(lease_one(&cp, 0).await.unwrap().id, j.id);
        (a.id, j.id)
        // dropped: the process "dies" with the access active and the discover job leased
    };
    tokio::time::sleep(Duration::from_millis(1100)).await; // the TTL ends while nobody runs

    let cp = EmbeddedControlPlane::open(opts).unwrap();
    assert_eq!(cp.access(&access_id).unwrap().unwrap().state, AccessState::Active);
    cp.tick_once().unwrap();
    let a = cp.access(&access_id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Revoking, "the revoke is queued after the restart");
    let mut kinds = Vec::new();
    while let Some(job) = lease_one(&cp, 1).await {
        kinds.push((job.kind.clone(), job.attempt));
        if job.id == leased_id {
            assert_eq!(job.attempt, 2, "handed out again once the dead lease ran out");
        }
        if kinds.len() == 2 {
            break;
        }
    }
    kinds.sort();
    assert_eq!(kinds, vec![("discover".to_string(), 2), ("revoke".to_string(), 1)]);
}
}

backends! {
#[tokio::test]
async fn generated_credentials_are_shown_once_and_never_stored() {
    const CANARY: &str = "canary-password-0b1c2d3e4f";
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let a = cp.create_access(access_create("alice", 3600, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", true, Some(CANARY))).await;

    let listed = cp.list_access().unwrap();
    assert!(
        listed.iter().all(|a| a.credentials.is_none()),
        "a listing does not consume or show them"
    );
    let first = cp.access(&a.id).unwrap().unwrap();
    let creds = first.credentials.as_ref().expect("credentials on the first read");
    assert_eq!(creds.username, "alice");
    assert!(serde_json::to_string(&first).unwrap().contains(CANARY));
    assert!(!format!("{first:?}").contains(CANARY), "Debug is redacted");
    assert!(cp.access(&a.id).unwrap().unwrap().credentials.is_none(), "never again");

    let record = cp.job(&grant.id).unwrap().unwrap();
    let text = serde_json::to_string(&record).unwrap();
    assert!(!text.contains(CANARY) && !text.contains("credentials"), "{text}");
    assert!(
        !text.contains(INLINE_SECRET),
        "a job record carries no integration secret"
    );
    assert_eq!(record.result.unwrap()["user_id"], "u-alice");

    drop(cp);
    assert_not_in_files(dir.path(), CANARY);
}
}

#[cfg(unix)]
#[tokio::test]
async fn the_state_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let cp = open_with(options(&data), json!({}));
    cp.create_job(JobCreate {
        kind: "validate".into(),
        integration: json!("test"),
        params: json!({}),
    })
    .unwrap();
    let mode = std::fs::metadata(data.join(store::DB_FILE))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let wal = data.join(format!("{}-wal", store::DB_FILE));
    if wal.exists() {
        assert_eq!(
            std::fs::metadata(&wal).unwrap().permissions().mode() & 0o077,
            0,
            "WAL is private too"
        );
    }
    let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
}

backends! {
#[tokio::test]
async fn credentials_are_rotated_and_agent_created_users_cleaned_up_on_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_millis(300);
    let cp = open_with(
        Options {
            day,
            ..options(dir.path())
        },
        json!({"credential_rotation_days": 1, "user_cleanup_days": 2}),
    );
    let a = cp.create_access(access_create("alice", 3600, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", true, Some("first-password"))).await;
    assert!(cp.access(&a.id).unwrap().unwrap().credentials.is_some());
    let users = cp.managed_users().unwrap();
    assert_eq!(users.len(), 1);
    assert!(users[0].next_rotation_at.is_some(), "rotation scheduled");

    cp.tick_once().unwrap();
    assert!(lease_one(&cp, 0).await.is_none(), "not due yet");
    tokio::time::sleep(day + Duration::from_millis(50)).await;
    cp.tick_once().unwrap();
    let rotate = lease_one(&cp, 0).await.expect("rotation due");
    assert_eq!(rotate.kind, "rotate_credentials");
    assert_eq!(rotate.params, json!({"user_id": "u-alice"}));
    let mut rotated = grant_result("u-alice", false, Some("second-password"));
    rotated["created_user"] = json!(false);
    complete_ok(&cp, &rotate, rotated).await;
    let shown = cp
        .access(&a.id)
        .unwrap()
        .unwrap()
        .credentials
        .expect("new credentials shown once");
    assert_eq!(secrecy::ExposeSecret::expose_secret(&shown.password), "second-password");
    assert!(cp.access(&a.id).unwrap().unwrap().credentials.is_none());
    assert!(
        !serde_json::to_string(&cp.job(&rotate.id).unwrap().unwrap())
            .unwrap()
            .contains("second-password")
    );

    // Revoke the only access: cleanup is scheduled 2 "days" later.
    cp.revoke_access(&a.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.kind, "revoke");
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-apono-1"]})).await;
    let users = cp.managed_users().unwrap();
    assert!(users[0].cleanup_at.is_some(), "cleanup scheduled: {users:?}");
    assert!(
        users[0].next_rotation_at.is_none(),
        "no rotation without an active access"
    );
    tokio::time::sleep(day).await;
    cp.tick_once().unwrap();
    assert!(lease_one(&cp, 0).await.is_none(), "cleanup not due yet");
    tokio::time::sleep(day + Duration::from_millis(50)).await;
    cp.tick_once().unwrap();
    let delete = lease_one(&cp, 0).await.expect("cleanup due");
    assert_eq!(delete.kind, "delete_user");
    assert_eq!(delete.params, json!({"user_id": "u-alice"}));
    complete_ok(&cp, &delete, json!({"user_id": "u-alice", "deleted": true})).await;
    assert!(cp.managed_users().unwrap().is_empty());
}
}

backends! {
#[tokio::test]
async fn a_new_access_cancels_a_pending_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_millis(300);
    let cp = open_with(
        Options {
            day,
            ..options(dir.path())
        },
        json!({"user_cleanup_days": 1}),
    );
    let a = cp.create_access(access_create("alice", 3600, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", true, None)).await;
    assert!(
        cp.managed_users().unwrap()[0].next_rotation_at.is_none(),
        "rotation is off"
    );
    cp.revoke_access(&a.id).unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": []})).await;
    assert!(cp.managed_users().unwrap()[0].cleanup_at.is_some());

    let b = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
    assert_eq!(cp.access(&b.id).unwrap().unwrap().state, AccessState::Active);
    assert!(cp.managed_users().unwrap()[0].cleanup_at.is_none(), "cleanup cancelled");
    tokio::time::sleep(day + Duration::from_millis(50)).await;
    cp.tick_once().unwrap();
    assert!(lease_one(&cp, 0).await.is_none(), "no delete_user job");
}
}

backends! {
#[tokio::test]
async fn integrations_are_checked_by_name_and_inline_jobs_are_handed_out_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let e = cp
        .create_job(JobCreate {
            kind: "grant".into(),
            integration: json!("prod"),
            params: json!({}),
        })
        .unwrap_err();
    assert!(matches!(e, ControlPlaneError::Rejected { status: 400, .. }));
    assert!(
        e.to_string().contains("\"prod\"") && e.to_string().contains("test"),
        "{e}"
    );
    let e = cp.create_access(AccessRequestCreate {
        integration: IntegrationRef::Name("prod".into()),
        ..access_create("alice", 60, false)
    });
    assert!(e.unwrap_err().to_string().contains("prod"));
    assert!(
        cp.create_job(JobCreate {
            kind: " ".into(),
            integration: json!("test"),
            params: json!({})
        })
        .is_err()
    );

    let half = cp
        .create_job(JobCreate {
            kind: "grant".into(),
            integration: json!({"name": "half"}),
            params: json!({}),
        })
        .unwrap();
    assert_eq!(half.integration, "half");
    let bad = cp
        .create_job(JobCreate {
            kind: "teleport".into(),
            integration: json!(42),
            params: json!({}),
        })
        .unwrap();
    assert_eq!(bad.integration, "(invalid)");
    let jobs = cp
        .lease(&LeaseRequest {
            max_jobs: 5,
            wait_seconds: 0,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["integration"], json!({"name": "half"}));
    assert_eq!(jobs[1]["integration"], json!(42));
    assert_eq!(jobs[1]["kind"], "teleport");

    // Inline integration on an access request: validated and registered under its name.
    let spec: IntegrationSpec = serde_json::from_value(spec_json("inline-one", json!({}))).unwrap();
    let a = cp
        .create_access(AccessRequestCreate {
            integration: IntegrationRef::Inline(Box::new(spec)),
            ..access_create("alice", 60, false)
        })
        .unwrap();
    assert_eq!(a.integration, "inline-one");
    assert!(cp.integration_names().unwrap().contains(&"inline-one".to_string()));
    let record = serde_json::to_string(&cp.list_jobs().unwrap()).unwrap();
    assert!(!record.contains(INLINE_SECRET));
}
}

backends! {
#[tokio::test]
async fn a_corrupt_row_is_a_clear_error_and_does_not_stop_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let good = cp
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let bad = cp
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let a = cp.create_access(access_create("alice", 1, false)).unwrap();
    {
        let conn = cp.store.lock().unwrap();
        conn.exec("UPDATE jobs SET params = '{not json' WHERE id = ?1", &p![bad.id])
            .unwrap();
        conn.exec("UPDATE access_requests SET state = 'bogus' WHERE id = ?1", &p![a.id])
            .unwrap();
    }
    let e = cp.job(&bad.id).unwrap_err();
    assert!(matches!(e, ControlPlaneError::Store { .. }));
    assert!(
        e.to_string().contains(&bad.id) && e.to_string().contains("params"),
        "{e}"
    );
    assert!(cp.access(&a.id).unwrap_err().to_string().contains("bogus"));
    assert!(cp.list_jobs().unwrap().iter().any(|j| j.id == good.id));
    assert!(cp.list_access().unwrap().is_empty());
    cp.tick_once().unwrap();
    let jobs = cp
        .lease(&LeaseRequest {
            max_jobs: 10,
            wait_seconds: 0,
        })
        .await
        .unwrap();
    let ids: Vec<_> = jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert!(ids.contains(&good.id) && !ids.contains(&bad.id), "{ids:?}");
    let row = cp
        .store
        .lock()
        .unwrap()
        .query("SELECT state, error FROM jobs WHERE id = ?1", &p![bad.id])
        .unwrap()
        .remove(0);
    let (state, error): (String, String) = (row.get(0).unwrap(), row.get(1).unwrap());
    assert_eq!(
        state, "failed",
        "a corrupt job is failed for good, not retried on every lease"
    );
    assert!(error.contains("corrupt_job"), "{error}");
}
}

backends! {
#[tokio::test]
async fn close_ends_pending_long_polls() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let waiter = {
        let cp = cp.clone();
        tokio::spawn(async move { lease_one(&cp, 30).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.close();
    let r = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("ended at once")
        .unwrap();
    assert!(r.is_none());
}
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_with(options(dir.path()), json!({})));
    {
        let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", []).unwrap();
    }
    let e = EmbeddedControlPlane::open(options(dir.path())).unwrap_err();
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

#[test]
fn time_arithmetic_saturates_instead_of_panicking() {
    let t = now();
    assert_eq!(later(t, Duration::MAX), DateTime::<Utc>::MAX_UTC);
    assert_eq!(days_of(Duration::from_secs(86_400), 1e300), Duration::MAX);
    assert!(backoff(Duration::from_secs(2), Duration::from_secs(300), 1_000) <= Duration::from_secs(300));
    let b = backoff(Duration::from_millis(100), Duration::from_secs(300), 3);
    assert!(
        b >= Duration::from_millis(300) && b <= Duration::from_millis(500),
        "{b:?}"
    );
    assert_eq!(config_days(&json!({"config": {"k": 2}}), "k"), Some(2.0));
    assert_eq!(config_days(&json!({"config": {"k": "1.5"}}), "k"), Some(1.5));
    assert_eq!(config_days(&json!({"config": {"k": 0}}), "k"), None);
    assert_eq!(config_days(&json!({"config": {"k": -3}}), "k"), None);
    assert_eq!(config_days(&json!({"config": {}}), "k"), None);
}

backends! {
#[tokio::test]
async fn absurd_ttls_and_rotation_periods_are_refused_or_saturated() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({"credential_rotation_days": 1e300}));
    for ttl in [0, u64::MAX, MAX_TTL_SECONDS + 1] {
        let e = cp.create_access(access_create("alice", ttl, false)).unwrap_err();
        assert!(
            matches!(e, ControlPlaneError::Rejected { status: 400, .. }),
            "{ttl}: {e:?}"
        );
    }
    let a = cp.create_access(access_create("alice", MAX_TTL_SECONDS, true)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", true, None)).await;
    let a = cp.access(&a.id).unwrap().unwrap();
    assert_eq!(a.state, AccessState::Active);
    let next = cp.managed_users().unwrap()[0].next_rotation_at.unwrap();
    assert!(
        next.timestamp() > DateTime::<Utc>::MAX_UTC.timestamp() - 1,
        "saturated: {next}"
    );
    cp.tick_once().unwrap();
}
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(store::DB_FILE), vec![0x42u8; 4096]).unwrap();
    private(&dir.path().join(store::DB_FILE));
    let e = EmbeddedControlPlane::open(options(dir.path())).unwrap_err();
    assert!(matches!(e, ControlPlaneError::Store { .. }));
    assert!(e.to_string().contains("not a database"), "{e}");
}

backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_agents_get_each_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let cp = cp.clone();
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let jobs = cp
                    .lease(&LeaseRequest {
                        max_jobs: 3,
                        wait_seconds: 1,
                    })
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    return got;
                }
                for raw in jobs {
                    let job: Job = serde_json::from_value(raw).unwrap();
                    complete_ok(&cp, &job, json!({})).await;
                    got.push(job.id);
                }
            }
        }));
    }
    let mut created = Vec::new();
    for _ in 0..60 {
        let j = cp
            .create_job(JobCreate {
                kind: "validate".into(),
                integration: json!("test"),
                params: json!({}),
            })
            .unwrap();
        created.push(j.id);
        tokio::task::yield_now().await;
    }
    let mut handed = Vec::new();
    for w in workers {
        handed.extend(w.await.unwrap());
    }
    handed.sort();
    created.sort();
    assert_eq!(handed, created, "every job once, none twice");
    assert!(
        cp.list_jobs()
            .unwrap()
            .iter()
            .all(|j| j.state == JobState::Succeeded && j.attempt == 1)
    );
}
}

backends! {
#[tokio::test]
async fn a_queued_revoke_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        lease_duration: Duration::from_millis(300),
        ..options(dir.path())
    };
    let id = {
        let cp = open_with(opts.clone(), json!({}));
        let a = cp.create_access(access_create("alice", 3600, false)).unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
        assert_eq!(cp.revoke_access(&a.id).unwrap().state, AccessState::Revoking);
        // The revoke is leased by an agent that dies with the process.
        assert_eq!(lease_one(&cp, 0).await.unwrap().kind, "revoke");
        a.id
    };
    let cp = EmbeddedControlPlane::open(opts).unwrap();
    assert_eq!(cp.access(&id).unwrap().unwrap().state, AccessState::Revoking);
    let revoke = lease_one(&cp, 5).await.expect("the revoke is handed out again");
    assert_eq!((revoke.kind.as_str(), revoke.attempt), ("revoke", 2));
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-apono-1"]})).await;
    assert_eq!(cp.access(&id).unwrap().unwrap().state, AccessState::Revoked);
}
}

#[tokio::test]
async fn a_second_open_of_one_data_dir_fails_at_once_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_with(options(dir.path()), json!({}));
    let e = EmbeddedControlPlane::open(options(dir.path())).unwrap_err();
    assert!(matches!(e, ControlPlaneError::InUse { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&dir.path().display().to_string())
            && text.contains(&format!("pid {}", std::process::id()))
            && text.contains("give this one its own data_dir"),
        "{text}"
    );
    // The first keeps working; once it is gone the directory can be opened again.
    first
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    drop(first);
    let again = EmbeddedControlPlane::open(options(dir.path())).expect("the lock went with the first");
    assert_eq!(again.list_jobs().unwrap().len(), 1);
}

backends! {
#[tokio::test]
async fn old_finished_work_is_forgotten_and_live_work_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    let agent = spawn_fake_agent(cp.clone(), stop.clone(), 0);

    // One access runs to its end (revoked), one stays active (another user, another binding); a
    // raw discovery job with objects.
    let ended = cp.create_access(access_create("alice", 1, false)).unwrap();
    let live = cp.create_access(access_create("bob", 3600, false)).unwrap();
    wait_for(Duration::from_secs(10), || {
        let e = cp.access(&ended.id).unwrap()?;
        let l = cp.access(&live.id).unwrap()?;
        (e.state == AccessState::Revoked && l.state == AccessState::Active).then_some(())
    })
    .await;
    stop.cancel();
    let _ = tokio::join!(scheduler, agent);
    let discovery = cp
        .create_job(JobCreate {
            kind: "discover".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let job = lease_one(&cp, 1).await.unwrap();
    assert_eq!(job.id, discovery.id);
    cp.upload_resources(&job, &[json!({"type": "cluster", "id": "c-1", "name": "one"})])
        .await
        .unwrap();
    complete_ok(&cp, &job, json!({"objects": 1})).await;

    // Within the retention: nothing goes.
    assert_eq!(cp.prune(now()).unwrap(), Pruned::default());
    // Past it: the ended access, its jobs, and the discovery with its objects go; the live one stays.
    let later = now() + chrono::Duration::days(31);
    let pruned = cp.prune(later).unwrap();
    assert_eq!(pruned.access_requests, 1, "{pruned:?}");
    assert_eq!(pruned.resources, 1, "{pruned:?}");
    assert!(pruned.jobs >= 3, "grant, revoke and discovery jobs: {pruned:?}");
    assert!(cp.access(&ended.id).unwrap().is_none());
    assert!(cp.job(&discovery.id).unwrap().is_none());
    let kept = cp.access(&live.id).unwrap().expect("the active access is kept");
    assert_eq!(kept.state, AccessState::Active);
    assert!(cp.job(&kept.grant_job_id).unwrap().is_some(), "its grant job is kept");
}
}

#[tokio::test]
async fn a_v1_state_file_is_migrated_and_its_accesses_still_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_json("test", json!({}));
    {
        // A state file as a build with schema v1 left it: an active access, no pinned spec.
        let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).unwrap();
        conn.execute_batch(include_str!("testdata/schema_v1.sql")).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO integrations (name, spec, updated_at) VALUES ('test', ?1, 0)",
            [spec.to_string()],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO access_requests (id, integration, subject, role, resource, ttl_seconds, create_user, state,
                 created_at, granted_at, expires_at, grant_job_id, user_id, binding_ids)
             VALUES ('ar-old', 'test', '{\"user\":\"alice\"}', 'cluster-member', 'c-1', 3600, 0, 'active',
                 0, 0, 4102444800000, 'j-old', 'u-alice', '[\"c-1:crtb-old\"]')",
            [],
        )
        .unwrap();
    }
    private(&dir.path().join(store::DB_FILE));
    let cp = EmbeddedControlPlane::open(options(dir.path())).expect("a v1 file opens");
    let old = cp.access("ar-old").unwrap().expect("kept");
    assert_eq!((old.state, old.pre_existing), (AccessState::Active, false));
    let version: i64 = cp
        .store
        .lock()
        .unwrap()
        .query("SELECT MAX(version) FROM schema_version", &[])
        .unwrap()[0]
        .get(0)
        .unwrap();
    assert_eq!(version, store::SCHEMA_VERSION);
    // The config moves the integration at the upgrade: the access was pinned to the Rancher it
    // was granted on, and its revoke carries what the grant recorded.
    let moved: IntegrationSpec = serde_json::from_value(spec_json("test", json!({"host": "new.example.com"}))).unwrap();
    cp.register_integration(&moved, IntegrationSource::Config).unwrap();
    assert_eq!(cp.revoke_access("ar-old").unwrap().state, AccessState::Revoking);
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.integration["config"]["host"], "rancher.example.com");
    assert_eq!(revoke.params["binding_ids"], json!(["c-1:crtb-old"]));
    assert_eq!(revoke.params["user_id"], "u-alice");
    // A v1 integration counts as declared in the config file.
    let inline: IntegrationSpec = serde_json::from_value(spec_json("test", json!({"host": "x.example.com"}))).unwrap();
    let e = cp
        .create_access(AccessRequestCreate {
            integration: IntegrationRef::Inline(Box::new(inline)),
            ..access_create("bob", 60, false)
        })
        .unwrap_err();
    assert!(matches!(e, ControlPlaneError::Rejected { status: 409, .. }), "{e:?}");
    drop(cp);
    EmbeddedControlPlane::open(options(dir.path())).expect("opens again once migrated");
}

#[tokio::test]
async fn a_v2_state_file_is_migrated_and_its_live_accesses_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_json("test", json!({}));
    {
        // As a build with schema v2 left it, with rows migrated from v1 (no pinned spec): an
        // active access, one whose revoke an older build queued (no ids in its params), one ended.
        let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).unwrap();
        conn.execute_batch(include_str!("testdata/schema_v1.sql")).unwrap();
        conn.execute_batch(
            "ALTER TABLE integrations ADD COLUMN source TEXT NOT NULL DEFAULT 'config';
             ALTER TABLE access_requests ADD COLUMN integration_spec TEXT;
             ALTER TABLE access_requests ADD COLUMN pre_existing INTEGER NOT NULL DEFAULT 0;
             CREATE INDEX access_key ON access_requests (integration, role, resource, state);
             CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (2);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO integrations (name, spec, updated_at) VALUES ('test', ?1, 0)",
            [spec.to_string()],
        )
        .unwrap();
        let access = |id: &str, user: &str, state: &str, revoke_job: Option<&str>| {
            conn.execute(
                "INSERT INTO access_requests (id, integration, subject, role, resource, ttl_seconds, create_user,
                     state, created_at, granted_at, expires_at, grant_job_id, revoke_job_id, user_id, binding_ids)
                 VALUES (?1, 'test', ?2, 'cluster-member', 'c-1', 3600, 0, ?3, 0, 0, 4102444800000, 'j-old', ?4,
                     ?5, ?6)",
                rusqlite::params![
                    id,
                    json!({"user": user}).to_string(),
                    state,
                    revoke_job,
                    format!("u-{user}"),
                    json!([format!("c-1:crtb-{user}")]).to_string()
                ],
            )
            .unwrap();
        };
        access("ar-active", "alice", "active", None);
        access("ar-revoking", "bob", "revoking", Some("j-rev"));
        access("ar-ended", "carol", "revoked", None);
        conn.execute(
            "INSERT INTO jobs (id, kind, integration_name, params, state, attempt, access_id, created_at, updated_at)
             VALUES ('j-rev', 'revoke', 'test', ?1, 'pending', 2, 'ar-revoking', 0, 0)",
            [json!({"user": "bob", "role": "cluster-member", "resource": "c-1"}).to_string()],
        )
        .unwrap();
    }
    private(&dir.path().join(store::DB_FILE));
    let cp = EmbeddedControlPlane::open(options(dir.path())).expect("a v2 file opens");
    // The upgrade came with a config that moves the integration.
    let moved: IntegrationSpec = serde_json::from_value(spec_json("test", json!({"host": "new.example.com"}))).unwrap();
    cp.register_integration(&moved, IntegrationSource::Config).unwrap();

    let revoke = lease_one(&cp, 0).await.expect("the revoke the older build queued");
    assert_eq!(revoke.id, "j-rev");
    assert_eq!(
        revoke.integration["config"]["host"], "rancher.example.com",
        "where it was granted"
    );
    assert_eq!(
        revoke.params,
        json!({"user": "bob", "role": "cluster-member", "resource": "c-1", "grant_id": "ar-revoking",
               "user_id": "u-bob", "binding_ids": ["c-1:crtb-bob"], "owner": cp.owner().as_str()}),
        "made again from the access (lifecycle review D3a)"
    );
    cp.revoke_access("ar-active").unwrap();
    let revoke = lease_one(&cp, 0).await.unwrap();
    assert_eq!(revoke.integration["config"]["host"], "rancher.example.com");
    let guard = cp.store.lock().unwrap();
    let conn = guard.sqlite().unwrap();
    let pinned = |id: &str| store::access(conn, id).unwrap().unwrap().integration_spec;
    assert_eq!(pinned("ar-active"), Some(spec.clone()));
    assert_eq!(pinned("ar-ended"), None, "an ended access needs no Rancher");
    let version: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, store::SCHEMA_VERSION);
}

backends! {
#[tokio::test]
async fn the_install_id_is_kept_across_restarts_and_differs_per_data_dir() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = open_with(options(one.path()), json!({})).owner().clone();
    let (connector, install) = first.as_str().split_once('/').expect("connector/install");
    assert_eq!(connector, "standalone", "the config's default connector id");
    assert_eq!(install.len(), 32, "{install}");
    let again = EmbeddedControlPlane::open(options(one.path())).unwrap().owner().clone();
    assert_eq!(again, first, "kept in the state");
    let other = EmbeddedControlPlane::open(Options {
        connector_id: "prod-eu".into(),
        ..options(two.path())
    })
    .unwrap()
    .owner()
    .clone();
    assert!(other.as_str().starts_with("prod-eu/"), "{other}");
    assert_ne!(
        other.as_str().split_once('/').unwrap().1,
        install,
        "another data dir, another install"
    );
    let e = EmbeddedControlPlane::open(Options {
        connector_id: "prod eu/x".into(),
        ..options(two.path())
    })
    .unwrap_err();
    assert!(e.to_string().contains("APONO_CONNECTOR_ID"), "{e}");
}
}

backends! {
#[tokio::test]
async fn raw_grant_revoke_and_sweep_jobs_carry_the_owner_unless_they_name_one() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let grant = json!({"user": "alice", "role": "cluster-member", "resource": "c-1"});
    for (kind, params, owner) in [
        ("grant", grant.clone(), Some(cp.owner().as_str())),
        ("revoke", grant.clone(), Some(cp.owner().as_str())),
        ("sweep", json!({"dry_run": true}), Some(cp.owner().as_str())),
        (
            "grant",
            json!({"user": "alice", "role": "r", "resource": "c-1", "owner": "cli"}),
            Some("cli"),
        ),
        ("validate", json!({}), None),
    ] {
        cp.create_job(JobCreate {
            kind: kind.into(),
            integration: json!("test"),
            params,
        })
        .unwrap();
        let job = lease_one(&cp, 0).await.unwrap();
        assert_eq!(job.params.get("owner").and_then(Value::as_str), owner, "{kind}");
    }
}
}

#[tokio::test]
async fn reclaimed_leases_of_a_dead_process_are_handed_out_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        lease_duration: Duration::from_secs(3600),
        ..options(dir.path())
    };
    let (created, stale) = {
        let cp = open_with(opts.clone(), json!({}));
        let a = cp.create_access(access_create("alice", 3600, false)).unwrap();
        let grant = lease_one(&cp, 0).await.unwrap();
        complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
        cp.revoke_access(&a.id).unwrap();
        let revoke = lease_one(&cp, 0).await.unwrap(); // the process dies during the revoke
        (a.id, revoke)
    };
    let cp = EmbeddedControlPlane::open(opts).unwrap();
    assert!(
        lease_one(&cp, 0).await.is_none(),
        "without reclaim the dead lease would be waited out"
    );
    assert_eq!(cp.reclaim_leases().unwrap(), 1);
    let revoke = lease_one(&cp, 0).await.expect("handed out again at once");
    assert_eq!((revoke.id.as_str(), revoke.attempt), (stale.id.as_str(), 2));
    assert!(matches!(
        cp.complete(&stale.id, &failed(&stale, true)).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    complete_ok(&cp, &revoke, json!({"removed_binding_ids": ["c-1:crtb-apono-1"]})).await;
    assert_eq!(cp.access(&created).unwrap().unwrap().state, AccessState::Revoked);
    assert_eq!(cp.reclaim_leases().unwrap(), 0);
}

backends! {
/// On a shared database, jobs one replica queues wake another replica's long-poll at once (the
/// commit's announcement), not at its next tick; and one lease hands out a share of what is
/// ready, not all of it, so the replicas split a mass expiry.
#[tokio::test]
async fn on_a_shared_database_jobs_one_replica_queues_wake_the_others_long_poll() {
    if crate::control_plane::store::testing::current() != crate::control_plane::store::testing::TestBackend::Postgres {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = open_with(options(dir.path()), json!({}));
    let two = EmbeddedControlPlane::open(options(dir.path())).unwrap();
    // Opens its listening connection, as its scheduler does every tick; no scheduler runs here,
    // so nothing else could end the long-poll before its 10 s.
    two.store.try_lead();
    let waiting = tokio::spawn({
        let two = Arc::clone(&two);
        async move {
            let t = Instant::now();
            let jobs = two
                .lease(&LeaseRequest {
                    max_jobs: 100,
                    wait_seconds: 10,
                })
                .await
                .expect("lease");
            (jobs.len(), t.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    one.create_access(access_create("alice", 3600, false)).unwrap();
    let (n, waited) = waiting.await.unwrap();
    assert_eq!(n, 1, "the other replica's grant");
    assert!(waited < Duration::from_secs(3), "woken by the announcement, not the timeout: {waited:?}");

    for i in 0..(SHARED_LEASE_BATCH + 5) {
        one.create_access(access_create(&format!("user{i}"), 3600, false)).unwrap();
    }
    let jobs = one
        .lease(&LeaseRequest {
            max_jobs: 100,
            wait_seconds: 0,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), SHARED_LEASE_BATCH as usize, "a share, the rest for the others");
    assert_eq!(lease_all(&two).await.len(), 5);
}
}

backends! {
/// On a shared database the other replicas' leases are live: start-up hands nothing back, and
/// a dead replica's job is handed out again when its lease runs out.
#[tokio::test]
async fn on_a_shared_database_leases_are_waited_out_not_reclaimed() {
    if crate::control_plane::store::testing::current() != crate::control_plane::store::testing::TestBackend::Postgres {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        lease_duration: Duration::from_millis(700),
        ..options(dir.path())
    };
    let one = open_with(opts.clone(), json!({}));
    let two = EmbeddedControlPlane::open(opts).unwrap();
    one.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&one, 0).await.unwrap();
    assert_eq!(two.reclaim_leases().unwrap(), 0, "the first replica's lease is live");
    assert!(lease_one(&two, 0).await.is_none(), "one lease per job across replicas");
    drop(one); // dies with the lease
    let again = lease_one(&two, 5).await.expect("handed out once the lease ran out");
    assert_eq!((again.id.as_str(), again.attempt), (grant.id.as_str(), 2));
    complete_ok(&two, &again, grant_result("u-alice", false, None)).await;
    assert_eq!(two.list_access().unwrap()[0].state, AccessState::Active);
}
}

backends! {
#[tokio::test]
async fn a_released_job_is_ready_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(
        Options {
            lease_duration: Duration::from_secs(3600),
            ..options(dir.path())
        },
        json!({}),
    );
    let created = cp
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let job = lease_one(&cp, 0).await.unwrap();
    let release = |token: &str, started: bool| ReleaseRequest {
        lease_token: token.to_string(),
        started,
    };
    let e = cp.release(&job.id, &release("lt-not-mine", false)).await.unwrap_err();
    assert!(matches!(e, ControlPlaneError::LeaseLost { .. }));
    assert_eq!(e.status(), 409);
    cp.release(&job.id, &release(&job.lease_token, false)).await.unwrap();
    let again = lease_one(&cp, 0).await.expect("leased again at once");
    assert_eq!(
        (again.id.as_str(), again.attempt),
        (created.id.as_str(), 1),
        "not started: no attempt"
    );
    assert!(matches!(
        cp.release(&job.id, &release(&job.lease_token, false)).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    cp.release(&again.id, &release(&again.lease_token, true)).await.unwrap();
    let third = lease_one(&cp, 0).await.unwrap();
    assert_eq!(third.attempt, 2, "a started run counts");
}
}

/// Gives a state file written by a test the mode `open` requires (it refuses one readable by others).
fn private(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    #[cfg(not(unix))]
    let _ = path;
}

backends! {
/// With a queue, a revoke whose time has come goes out before grants queued earlier.
#[tokio::test]
async fn revokes_are_handed_out_before_grants_queued_earlier() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open_with(options(dir.path()), json!({}));
    let ending = cp.create_access(access_create("alice", 3600, false)).unwrap();
    let grant = lease_one(&cp, 0).await.unwrap();
    complete_ok(&cp, &grant, grant_result("u-alice", false, None)).await;
    for user in ["bob", "carol", "dave"] {
        cp.create_access(access_create(user, 3600, false)).unwrap();
    }
    cp.revoke_access(&ending.id).unwrap();
    let revoke = cp.access(&ending.id).unwrap().unwrap().revoke_job_id.unwrap();
    let first = lease_one(&cp, 0).await.unwrap();
    assert_eq!((first.kind.as_str(), first.id.as_str()), ("revoke", revoke.as_str()));
}
}
