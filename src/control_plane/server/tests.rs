use super::*;
use crate::control_plane::client::{HttpControlPlane, OperatorClient};
use crate::control_plane::embedded::{Options, tests as fixtures};
use crate::control_plane::operator::{AccessRequest, AccessState, IntegrationRef, JobState};
use crate::control_plane::protocol::{Capabilities, Outcome};
use crate::integrations::{Resource, Subject};
use serde_json::json;
use std::time::Instant;

const TOKEN: &str = "agent-token-c4n4ry";
const OP_TOKEN: &str = "operator-token-c4n4ry";

struct Served {
    cp: Arc<EmbeddedControlPlane>,
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn operator(&self) -> OperatorClient {
        OperatorClient::new(&self.url)
            .unwrap()
            .with_token(SecretString::from(OP_TOKEN))
    }
}

fn access(agent_token: Option<&str>, listen: SocketAddr) -> Access {
    Access {
        agent_token: agent_token.map(SecretString::from),
        agent_token_file: None,
        operator_token: SecretString::from(OP_TOKEN),
        listen,
    }
}

/// The agent token from a file (a mounted Secret): rotating the Secret, then the agents, needs no
/// restart of the control plane; the old token stops working; a file gone blank keeps the last
/// good token (deploy review N6).
#[tokio::test]
async fn a_rotated_agent_token_file_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "first-t0ken\n").unwrap();
    let cp = fixtures::open_with(fixtures::options(dir.path()), json!({}));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(
        cp,
        Access {
            agent_token: Some(SecretString::from("first-t0ken")),
            agent_token_file: Some(path.clone()),
            operator_token: SecretString::from(OP_TOKEN),
            listen: listener.local_addr().unwrap(),
        },
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, app, shutdown.clone()));
    let http = reqwest::Client::new();
    let lease = |token: &'static str| {
        http.post(format!("{url}/connector/v1/connectors/x/jobs:lease"))
            .bearer_auth(token)
            .json(&json!({"max_jobs": 1, "wait_seconds": 0}))
            .send()
    };
    assert_eq!(lease("first-t0ken").await.unwrap().status(), 200);
    assert_eq!(lease("second-t0ken").await.unwrap().status(), 401);
    // The Secret is rotated (a new file of another size), then the agents.
    std::fs::write(&path, "second-t0ken-longer\n").unwrap();
    assert_eq!(lease("second-t0ken-longer").await.unwrap().status(), 200);
    assert_eq!(
        lease("first-t0ken").await.unwrap().status(),
        401,
        "the old token is refused"
    );
    // A file emptied by a botched rotation keeps the last good token.
    std::fs::write(&path, "\n").unwrap();
    assert_eq!(lease("second-t0ken-longer").await.unwrap().status(), 200);
    shutdown.cancel();
    let _ = task.await;
}

/// `token`: the agent token; `None` serves the operator API only, as `run` standalone does.
async fn serve_cp(token: Option<&str>) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let cp = fixtures::open_with(
        Options {
            lease_duration: Duration::from_secs(5),
            ..fixtures::options(dir.path())
        },
        json!({}),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let app = router(cp.clone(), access(token, listener.local_addr().unwrap())).unwrap();
    let task = tokio::spawn(serve(listener, app, shutdown.clone()));
    Served {
        cp,
        url,
        shutdown,
        task,
        _dir: dir,
    }
}

fn hello_body() -> SessionHello {
    SessionHello {
        version: "0.1.0".into(),
        hostname: "test".into(),
        capabilities: Capabilities {
            integration_types: vec!["rancher".into()],
            secret_store_types: vec!["APONO".into()],
        },
    }
}

#[tokio::test]
async fn the_agent_protocol_works_over_http_with_the_client() {
    let s = serve_cp(Some(TOKEN)).await;
    let agent = HttpControlPlane::new(&s.url, "conn-1", Some(SecretString::from(TOKEN))).unwrap();
    let session = agent.hello(&hello_body()).await.unwrap();
    assert_eq!(session.lease_seconds, 5);

    let operator = s.operator();
    let created = operator
        .create_job(&JobCreate {
            kind: "discover".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .await
        .unwrap();
    let jobs = agent
        .lease(&LeaseRequest {
            max_jobs: 2,
            wait_seconds: 2,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let job: Job = serde_json::from_value(jobs[0].clone()).unwrap();
    assert_eq!(job.id, created.id);
    assert_eq!(job.integration["name"], "test");

    let renewed = agent
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
        lease_token: "lt-stale".into(),
    };
    assert!(matches!(
        agent.renew(&job.id, &stale).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert!(matches!(
        agent.renew("no-such-job", &stale).await,
        Err(ControlPlaneError::NotFound { .. })
    ));

    let batch = vec![
        json!({"type": "cluster", "id": "c-1", "name": "prod"}),
        json!({"type": "user", "id": "u-1"}),
    ];
    agent.upload_resources(&job, &batch).await.unwrap();
    let mut stale_job = job.clone();
    stale_job.lease_token = "lt-stale".into();
    assert!(matches!(
        agent.upload_resources(&stale_job, &batch).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    assert_eq!(s.cp.resources(&job.id).unwrap(), batch);
    assert_eq!(operator.resources(&job.id).await.unwrap(), batch);
    assert!(matches!(
        operator.resources("nope").await,
        Err(ControlPlaneError::NotFound { .. })
    ));

    let done = CompleteRequest {
        lease_token: job.lease_token.clone(),
        outcome: Outcome::Succeeded,
        error: None,
        result: Some(json!({"objects": 2, "uploaded": 2})),
    };
    agent.complete(&job.id, &done).await.unwrap();
    agent.complete(&job.id, &done).await.unwrap(); // idempotent
    let stale_done = CompleteRequest {
        lease_token: "lt-stale".into(),
        ..done
    };
    assert!(matches!(
        agent.complete(&job.id, &stale_done).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    let record = operator.job(&job.id).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(operator.list_jobs().await.unwrap().len(), 1);
    assert!(operator.job("nope").await.unwrap().is_none());
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthorized() {
    let s = serve_cp(Some(TOKEN)).await;
    for token in [Some(SecretString::from("wrong")), None] {
        let agent = HttpControlPlane::new(&s.url, "conn-1", token).unwrap();
        let e = agent.hello(&hello_body()).await.unwrap_err();
        assert!(matches!(e, ControlPlaneError::Unauthorized { .. }), "{e:?}");
        let e = agent
            .lease(&LeaseRequest {
                max_jobs: 1,
                wait_seconds: 0,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ControlPlaneError::Unauthorized { .. }), "{e:?}");
        assert!(!e.to_string().contains(TOKEN));
    }
    // The body is the documented error shape.
    let resp = reqwest::Client::new()
        .post(format!("{}/connector/v1/connectors/c/jobs:lease", s.url))
        .bearer_auth("nope")
        .json(&json!({"max_jobs": 1, "wait_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: ApiErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "unauthorized");
    s.shutdown.cancel();
}

#[tokio::test]
async fn without_an_agent_token_the_agent_protocol_is_not_served() {
    // `run` standalone: a local process cannot lease jobs (and their credentials) or complete a
    // revoke it never ran (reliability F3, T5).
    let s = serve_cp(None).await;
    s.operator()
        .create_job(&JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for token in [None, Some(TOKEN), Some(OP_TOKEN)] {
        let mut rb = http
            .post(format!("{}/connector/v1/connectors/x/jobs:lease", s.url))
            .json(&json!({"max_jobs": 1, "wait_seconds": 0}));
        if let Some(token) = token {
            rb = rb.bearer_auth(token);
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status(), 404, "{token:?}");
        assert!(!resp.text().await.unwrap().contains("lease_token"));
    }
    let agent = HttpControlPlane::new(&s.url, "conn-1", Some(SecretString::from(OP_TOKEN))).unwrap();
    assert!(matches!(
        agent.hello(&hello_body()).await,
        Err(ControlPlaneError::NotFound { .. })
    ));
    assert_eq!(s.operator().list_jobs().await.unwrap()[0].state, JobState::Pending);
    s.shutdown.cancel();
}

#[test]
fn a_blank_token_is_an_error_never_authentication_off() {
    let dir = tempfile::tempdir().unwrap();
    let cp = fixtures::open_with(fixtures::options(dir.path()), json!({}));
    let listen: SocketAddr = "127.0.0.1:8790".parse().unwrap();
    for blank in ["", " ", "\n\t"] {
        let e = router(cp.clone(), access(Some(blank), listen)).unwrap_err().to_string();
        assert!(e.contains("APONO_TOKEN") && e.contains("empty"), "{e}");
        let mut a = access(Some(TOKEN), listen);
        a.operator_token = SecretString::from(blank);
        let e = router(cp.clone(), a).unwrap_err().to_string();
        assert!(e.contains("operator token"), "{e}");
    }
}

#[tokio::test]
async fn the_operator_api_manages_access_requests() {
    let s = serve_cp(None).await;
    let operator = OperatorClient::new(&format!("{}/", s.url))
        .unwrap()
        .with_token(SecretString::from(OP_TOKEN));
    let request = AccessRequestCreate {
        integration: IntegrationRef::Name("test".into()),
        subject: Subject::Username("alice".into()),
        role: "cluster-member".into(),
        resource: Resource::Cluster("c-1".into()),
        ttl_seconds: 60,
        create_user: false,
    };
    let a = operator.create_access(&request).await.unwrap();
    assert_eq!(a.state, AccessState::Pending);
    assert_eq!(operator.access(&a.id).await.unwrap().unwrap().id, a.id);
    assert!(operator.access("ar-none").await.unwrap().is_none());
    assert_eq!(operator.list_access().await.unwrap().len(), 1);
    assert_eq!(operator.revoke_access(&a.id).await.unwrap().state, AccessState::Revoked);
    assert!(matches!(
        operator.revoke_access("ar-none").await,
        Err(ControlPlaneError::NotFound { .. })
    ));

    // `{id}:revoke` is the same as `{id}/revoke`.
    let b = operator.create_access(&request).await.unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/operator/v1/access-requests/{}:revoke", s.url, b.id))
        .bearer_auth(OP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let b: AccessRequest = resp.json().await.unwrap();
    assert_eq!(b.state, AccessState::Revoked);

    let unknown = AccessRequestCreate {
        integration: IntegrationRef::Name("prod".into()),
        ..request
    };
    let e = operator.create_access(&unknown).await.unwrap_err();
    assert!(
        matches!(&e, ControlPlaneError::Rejected { status: 400, message } if message.contains("prod")),
        "{e:?}"
    );

    // An inline integration may not replace the one from the config file: 409 with the reason.
    let replacing = AccessRequestCreate {
        integration: IntegrationRef::Inline(Box::new(
            serde_json::from_value(fixtures::spec_json("test", json!({"host": "elsewhere.example.com"}))).unwrap(),
        )),
        ..unknown
    };
    let e = operator.create_access(&replacing).await.unwrap_err();
    assert!(
        matches!(&e, ControlPlaneError::Rejected { status: 409, message } if message.contains("config file")),
        "{e:?}"
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_released_job_is_leased_again_at_once_over_http() {
    let s = serve_cp(Some(TOKEN)).await;
    let agent = HttpControlPlane::new(&s.url, "conn-1", Some(SecretString::from(TOKEN))).unwrap();
    let created =
        s.cp.create_job(JobCreate {
            kind: "validate".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .unwrap();
    let lease = LeaseRequest {
        max_jobs: 1,
        wait_seconds: 0,
    };
    let job: Job = serde_json::from_value(agent.lease(&lease).await.unwrap()[0].clone()).unwrap();
    let wrong = ReleaseRequest {
        lease_token: "lt-stale".into(),
        started: false,
    };
    assert!(matches!(
        agent.release(&job.id, &wrong).await,
        Err(ControlPlaneError::LeaseLost { .. })
    ));
    let release = ReleaseRequest {
        lease_token: job.lease_token.clone(),
        started: false,
    };
    agent.release(&job.id, &release).await.unwrap();
    let again: Job = serde_json::from_value(agent.lease(&lease).await.unwrap()[0].clone()).unwrap();
    assert_eq!((again.id.as_str(), again.attempt), (created.id.as_str(), 1));
    s.shutdown.cancel();
}

#[tokio::test]
async fn bad_bodies_get_a_clear_4xx_never_a_crash() {
    let s = serve_cp(Some(TOKEN)).await;
    let http = reqwest::Client::new();
    let cases: [(&str, &str, u16, &str); 10] = [
        (
            "/operator/v1/access-requests",
            r#"{"integration":{"type":"rancher","name":"x"},"user":"a","role":"r","resource":"c-1","ttl_seconds":5}"#,
            422,
            "invalid inline integration: missing field `secret_store`",
        ),
        (
            "/operator/v1/access-requests",
            r#"{"integration":{"type":"jira","name":"x","secret_store":{"type":"AWS","region":"r","secret_id":"s"}},"user":"a","role":"r","resource":"c-1","ttl_seconds":5}"#,
            400,
            "jira",
        ),
        ("/operator/v1/access-requests", "{not json", 400, "not valid JSON"),
        ("/operator/v1/access-requests", "", 400, "empty"),
        (
            "/operator/v1/access-requests",
            r#"{"integration": "test", "role": "x"}"#,
            422,
            "invalid access request",
        ),
        (
            "/operator/v1/access-requests",
            r#"{"integration":"test","user":"a","group":"g","role":"r","resource":"c-1","ttl_seconds":5}"#,
            422,
            "not both",
        ),
        ("/operator/v1/jobs", r#"{"kind": 3}"#, 422, "invalid job"),
        (
            "/operator/v1/jobs",
            r#"{"kind": "grant", "integration": "test", "params": {"user": "alice", "role": "r", "resource": "c-1"}}"#,
            400,
            "would never end",
        ),
        ("/connector/v1/connectors/c/jobs:lease", "[]", 422, "lease request"),
        ("/connector/v1/jobs/abc:explode", "{}", 404, "explode"),
    ];
    for (path, body, status, expect) in cases {
        let resp = http
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .bearer_auth(if path.starts_with("/operator") { OP_TOKEN } else { TOKEN })
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        let err: ApiErrorBody = resp.json().await.unwrap();
        assert!(
            err.error.message.contains(expect),
            "{path} {body}: {:?}",
            err.error.message
        );
    }
    let resp = http
        .get(format!("{}/operator/v1/nothing", s.url))
        .bearer_auth(OP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http
        .post(format!("{}/connector/v1/jobs/abc/resources", s.url))
        .bearer_auth(TOKEN)
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "missing lease token header");
    let resp = http
        .post(format!("{}/connector/v1/jobs/abc/resources", s.url))
        .bearer_auth(TOKEN)
        .header(LEASE_TOKEN_HEADER, "lt-x")
        .body("{}\nnot json\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: ApiErrorBody = resp.json().await.unwrap();
    assert!(err.error.message.contains("line 2"), "{}", err.error.message);
    s.shutdown.cancel();
}

#[tokio::test]
async fn serve_ends_promptly_with_a_long_poll_open() {
    let s = serve_cp(Some(TOKEN)).await;
    let agent = HttpControlPlane::new(&s.url, "conn-1", Some(SecretString::from(TOKEN))).unwrap();
    let poll = tokio::spawn(async move {
        agent
            .lease(&LeaseRequest {
                max_jobs: 1,
                wait_seconds: 30,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), s.task)
        .await
        .expect("serve ended promptly")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    let answered = tokio::time::timeout(Duration::from_secs(2), poll)
        .await
        .expect("long-poll answered")
        .unwrap();
    assert!(answered.map(|jobs| jobs.is_empty()).unwrap_or(true));
}

#[tokio::test]
async fn the_client_maps_statuses_and_transport_errors() {
    // Nothing listens on this port: Unavailable, retryable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = HttpControlPlane::new(&format!("http://127.0.0.1:{port}"), "c", None).unwrap();
    let e = agent.hello(&hello_body()).await.unwrap_err();
    assert!(
        matches!(e, ControlPlaneError::Unavailable { .. }) && e.retryable(),
        "{e:?}"
    );
    let operator = OperatorClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let e = operator.list_access().await.unwrap_err();
    assert!(e.to_string().contains("is the control plane running"), "{e}");

    // A server answering 503 and 418.
    let app = Router::new()
        .route(
            "/connector/v1/connectors/{id}/sessions",
            post(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route(
            "/connector/v1/connectors/{id}/jobs:lease",
            post(|| async { (StatusCode::IM_A_TEAPOT, "short and stout") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, app, stop.clone()));
    let agent = HttpControlPlane::new(&url, "c", None).unwrap();
    assert!(matches!(
        agent.hello(&hello_body()).await,
        Err(ControlPlaneError::Unavailable { .. })
    ));
    let e = agent
        .lease(&LeaseRequest {
            max_jobs: 1,
            wait_seconds: 0,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlPlaneError::Rejected { status: 418, message } if message.contains("stout")),
        "{e:?}"
    );
    stop.cancel();
}

/// A local non-loopback address of this host, if it has one.
fn local_non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?; // TEST-NET-1: no packet is sent by connect
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn beyond_loopback_the_operator_api_takes_the_operator_token_only() {
    let Some(ip) = local_non_loopback_ip() else {
        eprintln!("no non-loopback interface here: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cp = fixtures::open_with(fixtures::options(dir.path()), json!({}));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Cleartext to a non-loopback address needs the explicit setting (APONO_ALLOW_INSECURE_HTTP).
    let url = format!("http://{addr}");
    assert!(OperatorClient::new(&url).is_err());
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        router(cp, access(Some(TOKEN), addr)).unwrap(),
        stop.clone(),
    ));
    let e = OperatorClient::with_insecure_http(&url, true)
        .unwrap()
        .list_jobs()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlPlaneError::Unauthorized { message } if message.contains("operator token")),
        "{e:?}"
    );
    // The agent token lets an agent lease jobs; it does not let it grant access.
    let with_agent_token = OperatorClient::with_insecure_http(&url, true)
        .unwrap()
        .with_token(SecretString::from(TOKEN));
    assert!(matches!(
        with_agent_token.list_jobs().await,
        Err(ControlPlaneError::Unauthorized { .. })
    ));
    let operator = OperatorClient::with_insecure_http(&url, true)
        .unwrap()
        .with_token(SecretString::from(OP_TOKEN));
    assert!(operator.list_jobs().await.unwrap().is_empty());
    // The agent protocol is reachable from anywhere with the agent token.
    let agent = HttpControlPlane::with_insecure_http(&url, "c", Some(SecretString::from(TOKEN)), true).unwrap();
    agent.hello(&hello_body()).await.unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_runs_jobs_over_http_and_stops_promptly() {
    use crate::agent::{Agent, AgentOptions, Executor};
    let s = serve_cp(Some(TOKEN)).await;
    let cp = HttpControlPlane::new(&s.url, "conn-1", Some(SecretString::from(TOKEN))).unwrap();
    let stop = CancellationToken::new();
    let options = AgentOptions {
        parallelism: 2,
        lease_wait_seconds: 5,
        shutdown_grace: Duration::from_secs(2),
    };
    let executor = Executor::new(crate::secrets::SecretStores::default(), 1);
    let agent = tokio::spawn(Agent::new(Arc::new(cp), executor, options).run(stop.clone()));

    let operator = s.operator();
    let job = operator
        .create_job(&JobCreate {
            kind: "teleport".into(),
            integration: json!("test"),
            params: json!({}),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let j = operator.job(&job.id).await.unwrap().unwrap();
        if j.state == JobState::Failed || j.state == JobState::Succeeded {
            break j;
        }
        assert!(Instant::now() < deadline, "job not done: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = done.error.expect("an error");
    assert_eq!(error.code, "malformed_job");
    assert!(error.message.contains("teleport"), "{}", error.message);
    assert_eq!(done.attempt, 1);

    // The agent is in a long-poll now: both stop promptly.
    let started = Instant::now();
    stop.cancel();
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), agent)
        .await
        .expect("agent stopped")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(3), s.task)
        .await
        .expect("server stopped")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Browser-style and foreign calls to the operator API (reliability F3, T4): each is refused, and
/// no access is created.
#[tokio::test]
async fn csrf_dns_rebinding_and_tokenless_calls_are_refused_and_nothing_is_granted() {
    let s = serve_cp(None).await;
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let body = r#"{"integration":"test","user":"bob","role":"cluster-owner","resource":"c-1","ttl_seconds":3600}"#;
    let http = reqwest::Client::new();
    let url = format!("{}/operator/v1/access-requests", s.url);
    let own_host = format!("127.0.0.1:{port}");
    // (what, content type, Origin, Host, token, expected status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, Option<&'a str>, u16);
    let cases: [Case; 7] = [
        ("text/plain POST", "text/plain", None, &own_host, Some(OP_TOKEN), 415),
        (
            "form POST",
            "application/x-www-form-urlencoded",
            None,
            &own_host,
            Some(OP_TOKEN),
            415,
        ),
        (
            "foreign Origin",
            "application/json",
            Some("http://evil.example"),
            &own_host,
            Some(OP_TOKEN),
            403,
        ),
        (
            "null Origin",
            "application/json",
            Some("null"),
            &own_host,
            Some(OP_TOKEN),
            403,
        ),
        (
            "foreign Host (DNS rebinding)",
            "application/json",
            None,
            "evil.example:18790",
            Some(OP_TOKEN),
            403,
        ),
        ("no token", "application/json", None, &own_host, None, 401),
        (
            "the T4 request",
            "text/plain",
            Some("http://evil.example"),
            "evil.example:18790",
            None,
            403,
        ),
    ];
    for (what, content_type, origin, host, token, status) in cases {
        let mut rb = http
            .post(&url)
            .header("content-type", content_type)
            .header("host", host)
            .body(body);
        if let Some(origin) = origin {
            rb = rb.header("origin", origin);
        }
        if let Some(token) = token {
            rb = rb.bearer_auth(token);
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let err: ApiErrorBody = resp.json().await.unwrap();
        assert!(!err.error.message.is_empty(), "{what}");
    }
    // Reads need the token too (the list holds every id, and a grant's one-time password).
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let list = s.operator().list_access().await.unwrap();
    assert!(list.is_empty(), "nothing granted: {list:?}");

    // The operator's own calls work: same-origin Origin, localhost Host.
    for (origin, host) in [
        (Some(format!("http://localhost:{port}")), format!("localhost:{port}")),
        (None, own_host.clone()),
    ] {
        let mut rb = http
            .post(&url)
            .header("content-type", "application/json; charset=utf-8")
            .header("host", host)
            .bearer_auth(OP_TOKEN)
            .body(body);
        if let Some(origin) = origin {
            rb = rb.header("origin", origin);
        }
        assert_eq!(rb.send().await.unwrap().status(), 201);
    }
    // A bodiless revoke needs no content type.
    let id = &s.operator().list_access().await.unwrap()[0].id;
    let resp = http
        .post(format!("{url}/{id}/revoke"))
        .bearer_auth(OP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.shutdown.cancel();
}

#[test]
fn host_names_this_server_only_by_address() {
    let loopback: SocketAddr = "127.0.0.1:8790".parse().unwrap();
    for ok in [
        "127.0.0.1:8790",
        "localhost:8790",
        "LOCALHOST:8790",
        "[::1]:8790",
        "127.0.0.2:8790",
    ] {
        assert!(names_this_server(ok, loopback), "{ok}");
    }
    for bad in [
        "evil.example:8790",
        "127.0.0.1:8791",
        "127.0.0.1",
        "10.0.0.5:8790",
        "localhost.evil.example:8790",
        "127.0.0.1:8790/x",
        "user@127.0.0.1:8790",
        "",
    ] {
        assert!(!names_this_server(bad, loopback), "{bad}");
    }
    let any: SocketAddr = "0.0.0.0:8790".parse().unwrap();
    assert!(names_this_server("10.0.0.5:30080", any));
    assert!(!names_this_server("cp.evil.example:8790", any));
    let one: SocketAddr = "10.0.0.5:8790".parse().unwrap();
    assert!(names_this_server("10.0.0.5:8790", one));
    assert!(!names_this_server("10.0.0.6:8790", one));
}

/// Subjects, roles and ids are bounded and free of control characters at the operator API: a
/// newline in a username forged log lines, an 8 MiB one broke `access list` (security review N10).
#[tokio::test]
async fn the_operator_api_refuses_control_characters_and_huge_names() {
    let s = serve_cp(None).await;
    let operator = s.operator();
    let request = |subject: Subject, role: &str| AccessRequestCreate {
        integration: IntegrationRef::Name("test".into()),
        subject,
        role: role.into(),
        resource: Resource::Cluster("c-1".into()),
        ttl_seconds: 60,
        create_user: false,
    };
    for (subject, role, field) in [
        (
            Subject::Username("eve\nINFO access revoked access=ar-FORGED".into()),
            "cluster-member",
            "user",
        ),
        (Subject::Username("x".repeat(300)), "cluster-member", "user"),
        (
            Subject::GroupPrincipal("okta_group://\u{1b}[2J".into()),
            "cluster-member",
            "group",
        ),
        (Subject::Username("alice".into()), "cluster-\u{202E}member", "role"),
    ] {
        let e = operator.create_access(&request(subject, role)).await.unwrap_err();
        assert!(
            matches!(&e, ControlPlaneError::Rejected { status: 400, message } if message.starts_with(field)),
            "{field}: {e:?}"
        );
    }
    // An 8 MiB one does not even reach the check: the body is past the operator API's limit.
    let e = operator
        .create_access(&request(Subject::Username("x".repeat(8 << 20)), "cluster-member"))
        .await
        .unwrap_err();
    assert!(matches!(&e, ControlPlaneError::Rejected { status: 413, .. }), "{e:?}");
    assert!(operator.list_access().await.unwrap().is_empty());
    let resp = reqwest::Client::new()
        .get(format!("{}/operator/v1/jobs/{}", s.url, "j".repeat(300)))
        .bearer_auth(OP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e = operator
        .create_job(&JobCreate {
            kind: "validate\n".into(),
            integration: json!("test"),
            params: Value::Null,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlPlaneError::Rejected { status: 400, message } if message.starts_with("kind")),
        "{e:?}"
    );
    s.shutdown.cancel();
}

/// The ids of every access, as the operator client walks the pages.
async fn listed_access_ids(operator: &OperatorClient) -> Vec<String> {
    operator
        .list_access()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect()
}

/// `?limit=&after=` pages; the client walks every page; no `limit` is the whole list, as before.
#[tokio::test]
async fn operator_lists_are_paged_and_the_client_walks_the_pages() {
    let s = serve_cp(None).await;
    let operator = s.operator();
    let mut ids = Vec::new();
    for n in 0..7 {
        let a = operator
            .create_access(&AccessRequestCreate {
                integration: IntegrationRef::Name("test".into()),
                subject: Subject::Username(format!("user-{n}")),
                role: "cluster-member".into(),
                resource: Resource::Cluster("c-1".into()),
                ttl_seconds: 60,
                create_user: false,
            })
            .await
            .unwrap();
        ids.push(a.id);
    }
    let http = reqwest::Client::new();
    let get = |query: String| {
        http.get(format!("{}/operator/v1/access-requests{query}", s.url))
            .bearer_auth(OP_TOKEN)
            .send()
    };
    let first = get("?limit=3".into()).await.unwrap();
    let next = first.headers()[NEXT_CURSOR_HEADER].to_str().unwrap().to_string();
    let page: Vec<AccessRequest> = first.json().await.unwrap();
    assert_eq!(page.iter().map(|a| a.id.clone()).collect::<Vec<_>>(), ids[..3]);
    assert_eq!(next, ids[2]);
    let last = get(format!("?limit=5&after={next}")).await.unwrap();
    assert!(last.headers().get(NEXT_CURSOR_HEADER).is_none());
    assert_eq!(last.json::<Vec<AccessRequest>>().await.unwrap().len(), 4);
    let whole: Vec<AccessRequest> = get(String::new()).await.unwrap().json().await.unwrap();
    assert_eq!(whole.len(), 7);
    assert_eq!(get("?limit=0".into()).await.unwrap().status(), 400);
    let walked = listed_access_ids(&operator).await;
    assert_eq!(walked, ids);
    s.shutdown.cancel();
}

/// A stranger is refused before its body is read; a body beyond its route's limit is 413 at once.
#[tokio::test]
async fn the_agent_token_is_checked_before_the_body_and_bodies_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = serve_cp(Some(TOKEN)).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let ask = |head: String| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
                .await
                .expect("answered before the body was sent")
                .unwrap();
            String::from_utf8_lossy(&answer[..n]).into_owned()
        }
    };
    let lease = "/connector/v1/connectors/c/jobs:lease";
    // 16 MiB announced, none sent, no token: 401 at once.
    let answer = ask(format!(
        "POST {lease} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16777216\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // With the token, more than a lease call ever needs: 413 at once.
    let answer = ask(format!(
        "POST {lease} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    s.shutdown.cancel();
}

/// Rows stored out of id order (concurrent creates, on one replica or several: each id is made
/// before its transaction waits for the write lock) are still walked once each, pages of any
/// size, for accesses and for jobs. The pages followed the stored order while the cursor
/// compared ids: a two-replica benchmark's `access list` came back one short.
#[tokio::test]
async fn a_paged_walk_sees_every_row_once_when_rows_were_stored_out_of_id_order() {
    let s = serve_cp(None).await;
    let operator = s.operator();
    for n in 0..7 {
        operator
            .create_access(&fixtures::access_create(&format!("user-{n}"), 60, false))
            .await
            .unwrap();
    }
    let accesses = fixtures::store_ids_out_of_order(&s.cp, "access_requests");
    let jobs = fixtures::store_ids_out_of_order(&s.cp, "jobs");
    assert_eq!(jobs.len(), 7, "one grant job per access");
    let http = reqwest::Client::new();
    for (list, stored) in [("access-requests", &accesses), ("jobs", &jobs)] {
        let mut ascending = stored.clone();
        ascending.reverse();
        for limit in [1, 2, 3, 6, 7] {
            let mut walked: Vec<String> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut url = format!("{}/operator/v1/{list}?limit={limit}", s.url);
                if let Some(after) = &after {
                    url.push_str(&format!("&after={after}"));
                }
                let resp = http.get(url).bearer_auth(OP_TOKEN).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let next = resp
                    .headers()
                    .get(NEXT_CURSOR_HEADER)
                    .map(|v| v.to_str().unwrap().to_string());
                let page: Vec<serde_json::Value> = resp.json().await.unwrap();
                walked.extend(page.iter().map(|v| v["id"].as_str().unwrap().to_string()));
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            assert_eq!(walked, ascending, "{list}, pages of {limit}");
        }
        // The whole list (no `limit`) is in the same order as the pages.
        let whole: Vec<serde_json::Value> = http
            .get(format!("{}/operator/v1/{list}", s.url))
            .bearer_auth(OP_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let whole: Vec<&str> = whole.iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(whole, ascending, "{list}, whole");
    }
    let listed = listed_access_ids(&operator).await;
    let mut ascending = accesses.clone();
    ascending.reverse();
    assert_eq!(listed, ascending);
    s.shutdown.cancel();
}
