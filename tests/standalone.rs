//! The standalone path end to end, in one process: simulator + embedded control plane + agent.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use apono_connector::control_plane::ControlPlane;
use apono_connector::control_plane::operator::{AccessRequestCreate, AccessState, IntegrationRef, JobCreate, JobState};
use apono_connector::control_plane::protocol::{Job, LeaseRequest};
use apono_connector::integrations::{self, GrantRequest, Resource, Subject};
use apono_connector::secrets::SecretStores;
use common::{Stack, bindings_of, integration_json, wait_until};
use serde_json::json;

/// Everything logged by this test binary, at trace level, for the canary checks.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map(|mut v| v.extend_from_slice(b)).ok();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn access(subject: Subject, role: &str, resource: &str, ttl_seconds: u64) -> AccessRequestCreate {
    AccessRequestCreate {
        integration: IntegrationRef::Name("sim".into()),
        subject,
        role: role.into(),
        resource: Resource::parse(resource).expect("resource"),
        ttl_seconds,
        create_user: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_granted_then_revoked_when_its_ttl_ends() {
    captured_logs();
    let stack = Stack::start().await;
    let created = stack
        .cp
        .create_access(access(
            Subject::Username("alice".into()),
            "cluster-member",
            "c-7x2k9",
            2,
        ))
        .unwrap();
    assert_eq!(created.state, AccessState::Pending);

    let active = stack
        .wait_access(&created.id, AccessState::Active, Duration::from_secs(20))
        .await;
    let in_rancher: Vec<_> = bindings_of(&stack.sim, "alice")
        .into_iter()
        .filter(|b| b.role_id == "cluster-member" && b.resource_id == "c-7x2k9")
        .collect();
    assert_eq!(in_rancher.len(), 1, "one binding in Rancher: {in_rancher:?}");
    assert_eq!(active.binding_ids, vec![in_rancher[0].id.clone()]);
    assert!(active.expires_at.is_some());
    let listed = stack.cp.list_access().unwrap();
    assert_eq!(
        listed.iter().find(|a| a.id == created.id).map(|a| a.state),
        Some(AccessState::Active)
    );

    let revoked = stack
        .wait_access(&created.id, AccessState::Revoked, Duration::from_secs(20))
        .await;
    assert!(revoked.revoked_at.is_some());
    assert!(
        bindings_of(&stack.sim, "alice")
            .iter()
            .all(|b| !(b.role_id == "cluster-member" && b.resource_id == "c-7x2k9")),
        "binding gone after the TTL"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_agent_died_is_handed_out_again_and_grants_once() {
    captured_logs();
    // No agent yet: the test plays the agent that dies.
    let stack = Stack::start_with(Duration::from_secs(2), false).await;
    let created = stack
        .cp
        .create_access(access(
            Subject::Username("bob".into()),
            "project-member",
            "c-7x2k9:p-x4m7q",
            60,
        ))
        .unwrap();

    let leased = stack
        .cp
        .lease(&LeaseRequest {
            max_jobs: 1,
            wait_seconds: 2,
        })
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let job: Job = serde_json::from_value(leased[0].clone()).unwrap();
    assert_eq!(job.attempt, 1);
    // The doomed agent does the work, then dies before reporting it.
    let spec: integrations::IntegrationSpec = serde_json::from_value(job.integration.clone()).unwrap();
    let secret = SecretStores::default().fetch(&spec.secret_store).await.unwrap();
    let request: GrantRequest = serde_json::from_value(job.params.clone()).unwrap();
    integrations::build(&spec, &secret)
        .unwrap()
        .grant(&request)
        .await
        .unwrap();
    let before = bindings_of(&stack.sim, "bob").len();

    // A live agent gets the job once the lease runs out, and the repeat is a success.
    let agent = stack.spawn_agent();
    let active = stack
        .wait_access(&created.id, AccessState::Active, Duration::from_secs(20))
        .await;
    let record = stack.cp.job(&active.grant_job_id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempt, 2, "handed out a second time");
    let matching: Vec<_> = bindings_of(&stack.sim, "bob")
        .into_iter()
        .filter(|b| b.role_id == "project-member" && b.resource_id == "c-7x2k9:p-x4m7q")
        .collect();
    assert_eq!(matching.len(), 1, "one binding, not two: {matching:?}");
    assert_eq!(bindings_of(&stack.sim, "bob").len(), before);
    stack.shutdown().await;
    let _ = agent.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_clearly_and_for_good_while_the_agent_keeps_serving() {
    captured_logs();
    let stack = Stack::start().await;
    let sim_integration = common::sim_integration(&stack.sim, "sim");
    let mut jira = sim_integration.clone();
    jira["type"] = json!("jira");
    let cases = [
        (
            "grant",
            json!("sim"),
            json!({"user": "alice", "resource": "c-7x2k9"}),
            "invalid params",
        ),
        ("grant", json!({"name": "half"}), json!({}), "integration is invalid"),
        ("teleport", json!("sim"), json!({}), "unknown job kind"),
        (
            "grant",
            jira,
            json!({"user": "alice", "role": "cluster-member", "resource": "c-7x2k9"}),
            "unknown integration type",
        ),
        (
            "grant",
            json!("sim"),
            json!({"user": "alice", "role": "no-such-role", "resource": "c-7x2k9"}),
            "no-such-role",
        ),
        (
            "grant",
            json!("sim"),
            json!({"user": "nobody-here", "role": "cluster-member", "resource": "c-7x2k9"}),
            "nobody-here",
        ),
    ];
    let mut ids = Vec::new();
    for (kind, integration, params, _) in &cases {
        ids.push(
            stack
                .cp
                .create_job(JobCreate {
                    kind: kind.to_string(),
                    integration: integration.clone(),
                    params: params.clone(),
                })
                .unwrap()
                .id,
        );
    }
    for ((_, _, _, expect), id) in cases.iter().zip(&ids) {
        let job = stack.wait_job(id).await;
        assert_eq!(job.state, JobState::Failed, "{expect}: {job:?}");
        let error = job.error.expect("an error");
        assert!(!error.retryable, "{expect}: {error:?}");
        assert!(error.message.contains(expect), "{expect:?} not in {:?}", error.message);
        assert_eq!(job.attempt, 1, "a non-retryable failure is not retried: {expect}");
    }
    // The agent still serves good jobs.
    let good = stack
        .cp
        .create_job(JobCreate {
            kind: "grant".into(),
            integration: json!("sim"),
            params: json!({"user": "alice", "role": "cluster-owner", "resource": "local"}),
        })
        .unwrap();
    assert_eq!(stack.wait_job(&good.id).await.state, JobState::Succeeded);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_fails_the_job_and_never_shows_the_secret() {
    let logs = captured_logs();
    const CANARY: &str = "canary-9f8e7d6c5b4a-secret";
    let stack = Stack::start().await;
    let (access_key, _) = stack.sim.sim.api_key();
    let wrong = integration_json(&stack.sim, "wrong-key", &access_key, CANARY);
    let job = stack
        .cp
        .create_job(JobCreate {
            kind: "grant".into(),
            integration: wrong,
            params: json!({"user": "alice", "role": "cluster-member", "resource": "c-7x2k9"}),
        })
        .unwrap();
    let job = stack.wait_job(&job.id).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.clone().expect("error");
    assert_eq!(error.code, "credentials_refused");
    assert!(error.message.contains("401"), "{}", error.message);
    assert!(!error.retryable);
    assert!(
        !serde_json::to_string(&job).unwrap().contains(CANARY),
        "canary in the job record"
    );
    assert!(!format!("{job:?}").contains(CANARY), "canary in Debug");
    wait_until(Duration::from_secs(5), || {
        (!logs.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(text.contains("credentials_refused"), "the failure is logged");
    assert!(!text.contains(CANARY), "canary in the logs");
    stack.shutdown().await;
}

/// The Rancher key is rotated in the secret store while the agent holds a cached copy: the next
/// job gets a 401, drops the cached secret, reads the new key and succeeds, without a restart.
/// A key Rancher refuses that the store has not replaced fails the job as refused, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_after_a_401_without_restart() {
    use apono_connector::secrets::{MemoryStore, SecretRef};

    let reference: SecretRef =
        serde_json::from_value(json!({"type": "AWS", "region": "eu-west-1", "secret_id": "rancher-key"})).unwrap();
    let store = Arc::new(MemoryStore::new("AWS"));
    let stores = SecretStores::default()
        .with_store(store.clone())
        .with_cache_ttl(Duration::from_secs(300));
    let stack = Stack::start_with_stores(Duration::from_secs(10), true, stores).await;
    let (sim, cp) = (&stack.sim, stack.cp.clone());
    let (access_key, secret_key) = sim.sim.api_key();
    store.set(
        &reference,
        [("access_key", access_key.as_str()), ("secret_key", secret_key.as_str())],
    );
    let spec = serde_json::from_value(json!({
        "type": "rancher", "name": "aws-sim", "config": {"host": sim.base_url},
        "secret_store": {"type": "AWS", "region": "eu-west-1", "secret_id": "rancher-key"},
    }))
    .unwrap();
    cp.register_integration(
        &spec,
        apono_connector::control_plane::embedded::IntegrationSource::Config,
    )
    .unwrap();
    let grant = |resource: &str| JobCreate {
        kind: "grant".into(),
        integration: json!("aws-sim"),
        params: json!({"user": "alice", "role": "cluster-member", "resource": resource}),
    };
    let first = stack.wait_job(&cp.create_job(grant("c-7x2k9")).unwrap().id).await;
    assert_eq!(first.state, JobState::Succeeded, "{first:?}");
    assert_eq!(store.calls(), 1, "the secret was read once");

    // Rotation: Rancher gets a new key and the store holds it; the agent's cache still has the old one.
    sim.sim.set_api_key(&access_key, "rotated-secret-key-0002");
    store.set(
        &reference,
        [
            ("access_key", access_key.as_str()),
            ("secret_key", "rotated-secret-key-0002"),
        ],
    );
    let second = stack.wait_job(&cp.create_job(grant("local")).unwrap().id).await;
    assert_eq!(
        second.state,
        JobState::Succeeded,
        "picked up the rotated key: {second:?}"
    );
    assert_eq!(second.attempt, 1, "within the same job, not by a retry of the job");
    assert_eq!(store.calls(), 2, "one fresh read after the 401");

    // Rancher refuses a key the store has not replaced: refused for good, with the 401 named.
    sim.sim.set_api_key(&access_key, "rotated-again-0003");
    let third = stack.wait_job(&cp.create_job(grant("c-m-4bq8z2lp")).unwrap().id).await;
    assert_eq!(third.state, JobState::Failed);
    let error = third.error.unwrap();
    assert_eq!(error.code, "credentials_refused");
    assert!(error.message.contains("401") && !error.retryable, "{error:?}");
    assert!(
        !error.message.contains("rotated-secret-key-0002"),
        "no secret in the error"
    );
    stack.shutdown().await;
}

/// A key that expires within 14 days: the validate job succeeds with a warning, and the days
/// left are exported as a metric an operator can alert on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_key_is_a_warning_and_a_metric() {
    let stack = Stack::start().await;
    stack.sim.sim.set_key_expiry(Some(
        chrono::Utc::now() + chrono::Duration::days(5) + chrono::Duration::hours(1),
    ));
    let job = stack
        .cp
        .create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("sim"),
            params: json!({}),
        })
        .unwrap();
    let job = stack.wait_job(&job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let result = job.result.unwrap();
    let warnings = result["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap_or("").contains("expires in 5 day")),
        "{result}"
    );
    let metrics = apono_connector::telemetry::metrics().encode();
    assert!(
        metrics.contains("apono_connector_api_key_expires_in_days{integration=\"sim\"} 5"),
        "{metrics}"
    );
    stack.shutdown().await;
}

/// SIGTERM (the agent's shutdown token) with a job still running past the grace: its lease is
/// released, so the job is ready again at once and another agent takes it, instead of waiting out
/// a 60 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_lease_of_a_job_it_does_not_finish() {
    use apono_connector::agent::{Agent, AgentOptions, Executor};
    use tokio_util::sync::CancellationToken;

    let stack = Stack::start_with(Duration::from_secs(60), false).await;
    // The grant's binding POST hangs far longer than the grace.
    stack
        .sim
        .sim
        .slow_next_on("POST /v3/clusterroletemplatebindings", 1, Duration::from_secs(30));
    let a = stack
        .cp
        .create_access(access(
            Subject::Username("alice".into()),
            "cluster-member",
            "c-m-4bq8z2lp",
            600,
        ))
        .unwrap();
    let options = AgentOptions {
        parallelism: 1,
        lease_wait_seconds: 1,
        shutdown_grace: Duration::from_millis(500),
    };
    let first_stop = CancellationToken::new();
    let executor = Executor::new(SecretStores::default(), 1).with_backoff_base(Duration::from_millis(50));
    let first = tokio::spawn(Agent::new(stack.cp.clone(), executor, options.clone()).run(first_stop.clone()));
    wait_until(Duration::from_secs(20), || {
        let job = stack.cp.job(&a.grant_job_id).unwrap().unwrap();
        (job.state == JobState::Leased).then_some(())
    })
    .await;
    first_stop.cancel();
    first.await.unwrap();
    let job = stack.cp.job(&a.grant_job_id).unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Pending,
        "released, not left leased for 60 s: {job:?}"
    );

    let second_stop = CancellationToken::new();
    let executor = Executor::new(SecretStores::default(), 3).with_backoff_base(Duration::from_millis(50));
    let second = tokio::spawn(Agent::new(stack.cp.clone(), executor, options).run(second_stop.clone()));
    stack
        .wait_access(&a.id, AccessState::Active, Duration::from_secs(20))
        .await;
    second_stop.cancel();
    second.await.unwrap();
    stack.shutdown().await;
}
