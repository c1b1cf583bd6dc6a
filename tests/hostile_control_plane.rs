//! The real binary in remote mode against a hostile control plane: a fake that answers the session
//! hello properly, then answers leases with mutated jobs (wrong types, missing fields, huge
//! numbers and strings, deep nesting, odd ids) and a few malformed lease answers. The agent must
//! keep running (process alive, `/healthz` 200, no panic in any task), complete every job whose
//! envelope parses with a typed error, and never call an endpoint the protocol does not have.

mod common;
mod hostile;

use std::collections::{HashMap, VecDeque};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apono_connector::control_plane::protocol::{CompleteRequest, Job, LeaseResponse, MalformedJob, Outcome};
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::scripted_cp::{self, serve};
use common::{BIN, ChildGuard, free_port};
use hostile::{hostile_string, mutated, valid_integration};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

/// Jobs handed out in all: enough variety, bounded time.
const JOBS: usize = 200;
/// Lease answers that are not a job list at all, spread among the others.
const BAD_ANSWERS: &[&str] = &[
    r#"{"jobs": 5}"#,
    r#"{"jobs": [1, "two", null, [], {}]}"#,
    "not json",
    r#"[{"id": "x"}]"#,
];

/// A Rancher that refuses every key, the way Rancher does (norman `api/writer`: 401 JSON body):
/// every job that gets as far as Rancher fails fast and for good.
async fn rancher_refuses() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"type": "error", "status": "401", "code": "Unauthorized", "message": "must authenticate"})),
    )
        .into_response()
}

/// Valid params for each kind, the base the mutations start from.
fn valid_job(n: usize, rancher: &str) -> Value {
    let (kind, params) = match n % 7 {
        0 => (
            "grant",
            json!({"grant_id": "g-1", "user": "alice", "role": "cluster-member", "resource": "c-x", "expires_at": "2099-01-01T00:00:00Z"}),
        ),
        1 => (
            "revoke",
            json!({"grant_id": "g-1", "user": "alice", "role": "cluster-member", "resource": "c-x:p-y", "user_id": "u-1", "binding_ids": ["c-x:crtb-1"]}),
        ),
        2 => ("validate", json!({})),
        3 => ("discover", json!({})),
        4 => ("sweep", json!({"keep_binding_ids": ["c-x:crtb-1"]})),
        5 => ("rotate_credentials", json!({"user_id": "u-1"})),
        _ => ("delete_user", json!({"user_id": "u-1"})),
    };
    json!({
        "id": format!("j-{n}"),
        "kind": kind,
        "attempt": 1,
        "lease_token": format!("t-{n}"),
        "lease_expires_at": "2099-01-01T00:00:00Z",
        "integration": valid_integration(rancher),
        "params": params
    })
}

/// `JOBS` jobs, most mutated from a valid one, some with an odd id; generated from a fixed seed
/// so a failure reproduces.
fn hostile_jobs(rancher: &str) -> Vec<Value> {
    let mut runner = TestRunner::deterministic();
    (0..JOBS)
        .map(|n| {
            let base = valid_job(n, rancher);
            let strategy = prop_oneof![
                6 => mutated(base.clone()),
                1 => hostile_string().prop_map(move |id| {
                    let mut job = base.clone();
                    job["id"] = Value::String(id);
                    job
                }),
            ];
            strategy.new_tree(&mut runner).expect("a job").current()
        })
        .collect()
}

/// An id the agent can put in a path and the fake can read back as it was.
fn reportable(id: &str) -> bool {
    !id.is_empty() && id != "." && id != ".." && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_a_hostile_control_plane_and_fails_bad_jobs_typed() {
    let rancher = serve(Router::new().fallback(rancher_refuses)).await;
    let jobs = hostile_jobs(&rancher);

    // One to three jobs per answer, a malformed answer now and then.
    let mut answers = VecDeque::new();
    let mut rest = jobs.iter();
    let mut n = 0;
    loop {
        let batch: Vec<Value> = rest.by_ref().take(1 + n % 3).cloned().collect();
        if batch.is_empty() {
            break;
        }
        answers.push_back(json!({ "jobs": batch }).to_string());
        if n % 50 == 25 {
            answers.push_back(BAD_ANSWERS[(n / 50) % BAD_ANSWERS.len()].to_string());
        }
        n += 1;
    }
    let (cp, seen) = scripted_cp::start(answers).await;

    // The jobs the agent must complete: in an answer that parses (serde_json's recursion limit
    // refuses a whole answer with a job nested too deep), envelope parses, id fits a path,
    // (id, token) unique.
    let delivered: Vec<Value> = seen
        .lock()
        .expect("lock")
        .answers
        .iter()
        .filter_map(|text| serde_json::from_str::<LeaseResponse>(text).ok())
        .flat_map(|answer| answer.jobs)
        .collect();
    // A job whose id and lease token parse but whose other fields do not (a `kind` of 42, an
    // `attempt` of "../../v3/users") is completed too, as `malformed_job` (security review N8).
    let mut expected: HashMap<(String, String), usize> = HashMap::new();
    let mut malformed: HashMap<(String, String), usize> = HashMap::new();
    for raw in &delivered {
        let (job, whole) = match Job::from_leased(raw.clone()) {
            Ok(job) => (job, true),
            Err(MalformedJob { job: Some(job), .. }) => (*job, false),
            Err(_) => continue,
        };
        if reportable(&job.id) {
            let key = (job.id, job.lease_token);
            *expected.entry(key.clone()).or_default() += 1;
            if !whole {
                *malformed.entry(key).or_default() += 1;
            }
        }
    }
    expected.retain(|_, count| *count == 1);
    malformed.retain(|key, _| expected.contains_key(key));
    assert!(
        malformed.len() >= 5,
        "too few jobs with a wrong-typed field for the test to mean much: {}",
        malformed.len()
    );
    assert!(
        expected.len() >= JOBS / 4,
        "too few jobs parse for the test to mean much: {}",
        expected.len()
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let health = free_port();
    let health_addr = format!("127.0.0.1:{health}");
    let child = Command::new(BIN)
        .arg("run")
        .envs([
            ("APONO_URL", cp.as_str()),
            ("APONO_TOKEN", "hostile-token-0b8f"),
            ("APONO_CONNECTOR_ID", "hostile"),
            ("APONO_HEALTH_ADDR", health_addr.as_str()),
            ("APONO_ACTIONS_PARALLELISM", "8"),
            ("APONO_LOG_LEVEL", "warn"),
            ("APONO_DATA_DIR", &dir.path().join("data").to_string_lossy()),
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn apono-connector");
    let mut agent = ChildGuard(child);
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };

    // Wait until every expected job is completed (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        if let Some(status) = agent.0.try_wait().expect("poll the agent") {
            panic!("the agent exited ({status}) under hostile jobs:\n{}", log_tail());
        }
        let missing: Vec<(String, String)> = {
            let seen = seen.lock().expect("lock");
            expected
                .keys()
                .filter(|(id, token)| {
                    !seen
                        .actions
                        .iter()
                        .any(|(i, verb, body)| i == id && verb == "complete" && body["lease_token"] == token.as_str())
                })
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {} parseable jobs never completed, e.g. {:?}\n{}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)],
        log_tail()
    );

    // Alive and healthy after all of it.
    assert!(
        agent.0.try_wait().expect("poll the agent").is_none(),
        "the agent exited:\n{}",
        log_tail()
    );
    let healthz = reqwest::get(format!("http://{health_addr}/healthz"))
        .await
        .expect("/healthz answers");
    assert_eq!(healthz.status().as_u16(), 200, "/healthz after hostile jobs");

    let seen = seen.lock().expect("lock");
    assert!(
        seen.unexpected.is_empty(),
        "the agent called paths the protocol does not have: {:?}",
        seen.unexpected
    );
    // Every outcome is a typed failure: the fake Rancher refuses every key, so nothing succeeds.
    for (id, verb, body) in seen.actions.iter().filter(|(_, verb, _)| verb == "complete") {
        let complete: CompleteRequest = serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("job {id:?}: {verb} body does not parse ({e}): {body}"));
        assert_eq!(complete.outcome, Outcome::Failed, "job {id:?} succeeded: {body}");
        let error = complete
            .error
            .unwrap_or_else(|| panic!("job {id:?} failed without an error: {body}"));
        assert!(
            !error.code.is_empty() && !error.message.trim().is_empty(),
            "job {id:?}: untyped error {error:?}"
        );
        assert!(!error.retryable || error.code == "unavailable", "job {id:?}: {error:?}");
        if malformed.contains_key(&(id.clone(), complete.lease_token.clone())) {
            assert_eq!(error.code, "malformed_job", "job {id:?}: {error:?}");
        }
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!log.contains("panicked"), "a task panicked:\n{}", log_tail());
    agent.kill();
}

/// A job id too long for any URL (the HTTP stack refuses URIs past 64 KiB) cannot be reported:
/// that is not transient, so the agent gives up at once instead of holding a worker through a
/// minute of retries, and the error does not repeat the huge URL.
#[tokio::test]
async fn an_id_too_long_for_a_url_is_not_retried() {
    use apono_connector::control_plane::ControlPlane;
    use apono_connector::control_plane::client::HttpControlPlane;
    use apono_connector::control_plane::protocol::RenewRequest;

    let cp = serve(Router::new().fallback(|| async { StatusCode::NO_CONTENT })).await;
    let client = HttpControlPlane::new(&cp, "hostile", None).expect("client");
    let id = "\r".repeat(30_000);
    let error = client
        .renew(
            &id,
            &RenewRequest {
                lease_token: "t".into(),
            },
        )
        .await
        .expect_err("a URL past the HTTP limit cannot be sent");
    assert!(!error.retryable(), "retried: {error}");
    assert!(
        error.to_string().len() < 1_000,
        "the error repeats the URL: {} bytes",
        error.to_string().len()
    );
}
