//! Property tests of every parser that reads input from outside the process: the job envelope and
//! params, integration specs and configs, the connector's own config, Rancher's answers and the
//! operator API's bodies. Each property: no panic, and every rejected input gets a typed error
//! (a stable code, a message a person can act on).
//!
//! 256 cases per property by default; `PROPTEST_CASES=5000 cargo test --test properties` digs
//! deeper.

mod hostile;

use std::sync::Arc;

use apono_connector::agent::executor::Operation;
use apono_connector::config::Config;
use apono_connector::control_plane::embedded::{EmbeddedControlPlane, Options};
use apono_connector::control_plane::operator::{AccessRequestCreate, JobCreate, OPERATOR_PREFIX};
use apono_connector::control_plane::protocol::{Job, JobKind};
use apono_connector::control_plane::server::Access;
use apono_connector::integrations::rancher::RancherConfig;
use apono_connector::integrations::rancher::client::{ErrorKind, status_kind};
use apono_connector::integrations::rancher::model::{
    Binding, Cluster, Collection, GlobalRole, Namespace, Project, RoleTemplate, Setting, Token, User,
};
use apono_connector::integrations::{self, IntegrationSpec, Resource, Subject};
use hostile::{arbitrary_json, hostile_string, mutated, valid_grant_job, valid_integration};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// 256 cases unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        // Shrinking a failure is worth a little time; a runaway shrink is not.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

/// JSON text for the parsers that read bytes: mostly valid JSON (mutated or arbitrary), some
/// truncated or garbage, and some nested beyond serde_json's recursion limit.
fn json_text(base: Value) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => mutated(base).prop_map(|v| v.to_string()),
        2 => arbitrary_json().prop_map(|v| v.to_string()),
        1 => (arbitrary_json(), any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let text = v.to_string();
            let cut = i.index(text.len() + 1);
            // Cut on a char boundary: the parsers read `&str` here.
            text.char_indices().map(|(n, _)| n).rfind(|n| *n <= cut).map_or(String::new(), |n| text[..n].to_string())
        }),
        1 => (1usize..400).prop_map(|depth| "[".repeat(depth) + &"]".repeat(depth)),
        1 => (1usize..400).prop_map(|depth| "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)),
        1 => hostile_string(),
    ]
}

/// Parses `text` as `T`; a rejection must say what is wrong.
fn parse_or_explain<T: DeserializeOwned>(text: &str) -> Result<Option<T>, TestCaseError> {
    match serde_json::from_str::<T>(text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            prop_assert!(!e.to_string().trim().is_empty(), "a rejection without a message");
            Ok(None)
        }
    }
}

fn assert_malformed(e: &apono_connector::control_plane::protocol::JobError) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.code.as_str(), "malformed_job");
    prop_assert!(!e.retryable, "a malformed job is retried: {e:?}");
    prop_assert!(!e.message.trim().is_empty(), "malformed_job without a message");
    Ok(())
}

// ----- jobs -----

proptest! {
    #![proptest_config(config())]

    /// A leased job: its envelope parses or is refused with a reason; a parsed one runs through
    /// the executor's params parser, which answers an operation or `malformed_job`.
    #[test]
    fn job_envelopes_and_params_parse_or_fail_typed(text in json_text(valid_grant_job("j-1", "t-1", "http://127.0.0.1:9"))) {
        if let Some(job) = parse_or_explain::<Job>(&text)? {
            prop_assert!(job.attempt >= 1 || text.contains("\"attempt\""), "attempt defaulted to {}", job.attempt);
            // The envelope survives a round trip: the agent echoes id and token back.
            let again: Job = serde_json::from_value(serde_json::to_value(&job).expect("a parsed job serializes"))
                .expect("a serialized job parses");
            prop_assert_eq!(&again.id, &job.id);
            prop_assert_eq!(&again.lease_token, &job.lease_token);
            match Operation::parse(&job.kind, &job.params) {
                Ok(_) => prop_assert!(JobKind::parse(&job.kind).is_some(), "unknown kind {:?} accepted", job.kind),
                Err(e) => assert_malformed(&e)?,
            }
        }
    }

    /// The params parser on its own, for every kind (known, unknown, odd) and any params.
    #[test]
    fn operation_params_parse_or_fail_typed(
        kind in prop_oneof![
            4 => prop::sample::select(JobKind::ALL.iter().map(|k| k.as_str().to_string()).collect::<Vec<_>>()),
            1 => hostile_string(),
        ],
        params in prop_oneof![
            mutated(json!({"grant_id": "g-1", "user": "alice", "role": "cluster-member", "resource": "c-x", "expires_at": "2030-01-01T00:00:00Z", "create_user": true})),
            mutated(json!({"grant_id": "g-1", "user": "alice", "role": "cluster-member", "resource": "c-x:p-y", "user_id": "u-abc", "binding_ids": ["c-x:crtb-1"], "all": false})),
            mutated(json!({"user_id": "u-abc"})),
            mutated(json!({"now": "2030-01-01T00:00:00Z"})),
            arbitrary_json(),
        ],
    ) {
        match Operation::parse(&kind, &params) {
            Ok(op) => {
                let known = JobKind::parse(&kind);
                prop_assert!(known.is_some(), "unknown kind {kind:?} parsed as {op:?}");
            }
            Err(e) => assert_malformed(&e)?,
        }
    }
}

// ----- integrations -----

proptest! {
    #![proptest_config(config())]

    /// An integration spec as a job or a config file carries it: parses or is refused; a parsed
    /// one passes `validate_spec` or gets a typed integration error.
    #[test]
    fn integration_specs_parse_and_validate_or_fail_typed(text in json_text(valid_integration("http://127.0.0.1:9"))) {
        if let Some(spec) = parse_or_explain::<IntegrationSpec>(&text)?
            && let Err(e) = integrations::validate_spec(&spec)
        {
            prop_assert!(!e.code().is_empty());
            prop_assert!(!e.to_string().trim().is_empty(), "{} without a message", e.code());
            prop_assert!(!e.retryable(), "a bad spec is not worth retrying: {e:?}");
        }
    }

    /// The Rancher config parser on any value: a config or `invalid_config` naming the problem.
    #[test]
    fn rancher_configs_parse_or_fail_typed(config in prop_oneof![
        mutated(json!({
            "host": "https://rancher.example.com", "port": 443, "page_size": 100, "concurrency": 4,
            "timeout_seconds": 30, "connect_timeout_seconds": 5, "status_timeout_seconds": 10,
            "cluster_timeout_seconds": 10, "credential_rotation_days": 30, "user_cleanup_days": 7,
            "new_user_roles": "user-base", "insecure_http": false, "ui_url": "https://r.example.com",
            "custom_access_details": "ask #ops"
        })),
        arbitrary_json(),
    ]) {
        if let Err(e) = RancherConfig::from_value(&config) {
            prop_assert_eq!(e.code(), "invalid_config");
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    /// A resource string: parsed ones print back as given (trimmed) and parse again the same.
    #[test]
    fn resources_parse_round_trip_or_explain(s in prop_oneof![
        hostile_string(),
        "[a-z]{0,3}(-[a-z0-9]{0,5})?(:[a-z]{0,3}(-[a-z0-9]{0,5})?){0,2}",
    ]) {
        match Resource::parse(&s) {
            Ok(r) => {
                prop_assert_eq!(r.as_str(), s.trim());
                prop_assert_eq!(Resource::parse(r.as_str()), Ok(r.clone()));
            }
            Err(message) => prop_assert!(!message.trim().is_empty()),
        }
    }

    /// The subject's wire form (`{"user": ...}` or `{"group": ...}`): a parsed subject serializes
    /// to a form that parses to the same subject.
    #[test]
    fn subjects_round_trip_or_explain(v in prop_oneof![
        mutated(json!({"user": "alice"})),
        mutated(json!({"group": "okta_group://admins"})),
        arbitrary_json(),
    ]) {
        if let Ok(subject) = serde_json::from_value::<Subject>(v.clone()) {
            prop_assert!(!subject.as_str().trim().is_empty(), "an empty subject from {v}");
            let again: Subject = serde_json::from_value(serde_json::to_value(&subject).expect("serializes"))
                .expect("a serialized subject parses");
            prop_assert_eq!(again, subject);
        } else {
            let e = serde_json::from_value::<Subject>(v).expect_err("parsed once, failed once");
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }
}

// ----- the connector's config -----

/// Environment variables the config reads, and a few it must ignore.
const ENV_NAMES: &[&str] = &[
    "APONO_URL",
    "APONO_TOKEN",
    "APONO_TOKEN_FILE",
    "CONNECTOR_ID",
    "APONO_CONNECTOR_ID",
    "APONO_ACTIONS_PARALLELISM",
    "APONO_DATA_DIR",
    "APONO_LISTEN_ADDR",
    "APONO_LOG_FORMAT",
    "APONO_LOG_LEVEL",
    "APONO_HEALTH_ADDR",
    "ALLOWED_SECRETS_TO_READ",
    "HASHICORP_VAULT_CONFIG",
    "HASHICORP_VAULT_CONFIG_FILE_PATH",
    "APONO_SECRET_CACHE_TTL_SECONDS",
    "VAULT_NAMESPACE",
    "APONO_UNKNOWN",
];

/// A TOML value: scalars of every type, odd strings, arrays and inline tables.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("1e400".to_string()),
        Just("-0.0".to_string()),
        Just("nan".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        hostile_string().prop_map(|s| serde_json::to_string(&s).expect("a string serializes")),
        Just("\"\"".to_string()),
        Just("\"   \"".to_string()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,12}", inner), 0..4).prop_map(|kv| {
                let fields: Vec<_> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

const TOML_KEYS: &[(&str, &str)] = &[
    ("control_plane", "url"),
    ("control_plane", "token"),
    ("control_plane", "connector_id"),
    ("agent", "parallelism"),
    ("agent", "lease_wait_seconds"),
    ("agent", "shutdown_grace_seconds"),
    ("standalone", "listen"),
    ("standalone", "data_dir"),
    ("standalone", "lease_seconds"),
    ("standalone", "retention_days"),
    ("telemetry", "log_format"),
    ("telemetry", "health_addr"),
    ("secrets", "allowed_secrets_to_read"),
    ("secrets", "cache_ttl_seconds"),
    ("nonsense", "key"),
];

/// A config file: known sections and keys with any value, sometimes an `[[integrations]]` entry,
/// sometimes plain garbage.
fn toml_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (
            prop::collection::vec((prop::sample::select(TOML_KEYS), toml_value()), 0..6),
            prop::option::of(toml_value()),
        )
            .prop_map(|(entries, integration)| {
                let mut text = String::new();
                for ((section, key), value) in entries {
                    text.push_str(&format!("[{section}]\n{key} = {value}\n"));
                }
                if let Some(config) = integration {
                    text.push_str(&format!(
                        "[[integrations]]\ntype = \"rancher\"\nname = \"r\"\nconfig = {config}\n\
                         secret_store = {{ type = \"KUBERNETES\", namespace = \"n\", name = \"s\" }}\n"
                    ));
                }
                text
            }),
        1 => hostile_string(),
        1 => "\\PC{0,64}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The config loader on any file and environment: a config, or a `ConfigError` saying what
    /// is wrong. Never a panic, never an empty message, and never the token's value, however
    /// wrong the token or the rest of the config is.
    #[test]
    fn the_config_loads_or_explains(
        file in prop::option::of(toml_text()),
        mut env in prop::collection::btree_map(prop::sample::select(ENV_NAMES), hostile_string(), 0..5),
        token_in_env in any::<bool>(),
        token_in_file in prop::option::of(prop::sample::select(vec![
            format!("\"{TOKEN_CANARY}\""),
            format!("[\"{TOKEN_CANARY}\"]"),
            format!("{{ value = \"{TOKEN_CANARY}\" }}"),
            format!("\"{TOKEN_CANARY}\\u0000\""),
        ])),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("connector.toml");
        let file = match (file, token_in_file) {
            (Some(text), Some(token)) => Some(format!("{text}\n[control_plane]\ntoken = {token}\n")),
            (None, Some(token)) => Some(format!("[control_plane]\ntoken = {token}\n")),
            (file, None) => file,
        };
        if let Some(text) = &file {
            std::fs::write(&path, text).expect("write the config");
        }
        if token_in_env {
            env.insert("APONO_TOKEN", format!(" {TOKEN_CANARY} "));
        }
        let loaded = Config::load_from(file.as_ref().map(|_| path.as_path()), |name| env.get(name).cloned());
        match loaded {
            Err(e) => {
                prop_assert!(!e.0.trim().is_empty(), "a config error without a message");
                prop_assert!(!e.0.contains(TOKEN_CANARY), "the token in a config error: {}", e.0);
            }
            Ok(config) => {
                let debug = format!("{config:?}");
                prop_assert!(!debug.contains(TOKEN_CANARY), "the token in the config's Debug output");
            }
        }
    }
}

/// A token value that must never show in an error or a Debug print.
const TOKEN_CANARY: &str = "tok-canary-7f3e1d9a";

// ----- Rancher's answers -----

/// Parses a collection page of `T` and reads every accessor the integration uses.
fn collection_of<T: DeserializeOwned>(text: &str) -> Result<Option<Collection<T>>, TestCaseError> {
    parse_or_explain::<Collection<T>>(text)
}

fn page(item: Value) -> Value {
    json!({
        "type": "collection",
        "data": [item],
        "pagination": {"limit": 2, "total": 3, "partial": true, "next": "https://r.example.com/v3/users?limit=2&marker=u-2"}
    })
}

fn binding() -> Value {
    json!({
        "id": "c-x:crtb-abc", "type": "clusterRoleTemplateBinding", "clusterId": "c-x", "userId": "u-1",
        "userPrincipalId": "local://u-1", "roleTemplateId": "cluster-member",
        "labels": {"apono.io/created-by": "apono-connector"},
        "annotations": {"apono.io/grant-id": "g-1", "apono.io/expires-at": "2030-01-01T00:00:00Z"},
        "status": {"summary": "Completed", "conditions": [{"type": "Ready", "status": "True", "message": "ok"}]},
        "removed": null, "state": "active"
    })
}

proptest! {
    #![proptest_config(config())]

    /// Binding pages: every accessor the grant, revoke and sweep paths use is total.
    #[test]
    fn binding_pages_parse_or_fail_typed(text in json_text(page(binding()))) {
        if let Some(page) = collection_of::<Binding>(&text)? {
            for b in &page.data {
                let _ = (b.is_removed(), b.summary(), b.is_connectors(), b.grant_id(), b.marked_expiry());
                let _ = (b.subject(), b.object_name());
                if let Some(status) = &b.status {
                    let _ = status.messages();
                }
            }
        }
    }

    /// Every other collection the integration lists.
    #[test]
    fn other_pages_parse_or_fail_typed(text in prop_oneof![
        json_text(page(json!({"id": "u-1", "username": "alice", "principalIds": ["local://u-1"], "enabled": true}))),
        json_text(page(json!({"id": "c-x", "name": "prod", "state": "active", "conditions": []}))),
        json_text(page(json!({"id": "c-x:p-y", "name": "Default", "clusterId": "c-x"}))),
        json_text(page(json!({"id": "ns-1", "name": "ns-1", "projectId": "c-x:p-y"}))),
        json_text(page(json!({"id": "cluster-member", "name": "Cluster Member", "context": "cluster", "locked": false}))),
        json_text(page(json!({"id": "user-base", "name": "User Base", "newUserDefault": true}))),
        json_text(page(json!({"id": "token-1", "name": "token-1", "expiresAt": "2030-01-01T00:00:00Z"}))),
    ]) {
        if let Some(p) = collection_of::<User>(&text)? {
            for u in &p.data {
                let _ = u.username();
            }
        }
        collection_of::<Cluster>(&text)?;
        collection_of::<Project>(&text)?;
        collection_of::<Namespace>(&text)?;
        collection_of::<RoleTemplate>(&text)?;
        collection_of::<GlobalRole>(&text)?;
        collection_of::<Token>(&text)?;
        parse_or_explain::<Setting>(&text)?;
    }

    /// Rancher's error bodies (`status` as a number or a string, HTML from a proxy, garbage):
    /// the error keeps the HTTP status, its message is bounded and never carries the secret.
    #[test]
    fn error_bodies_are_read_bounded_and_scrubbed(
        status in 400u16..600,
        body in prop_oneof![
            json_text(json!({"type": "error", "status": "403", "code": "Forbidden", "message": "clusterroletemplatebindings is forbidden", "fieldName": "roleTemplateId", "baseType": "error"})),
            json_text(json!({"type": "error", "status": 422, "code": "InvalidBodyContent", "message": "bad"})),
            Just("<html><body><h1>502 Bad Gateway</h1></body></html>".to_string()),
            prop::collection::vec(any::<u8>(), 0..2_000).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        with_secret in any::<bool>(),
    ) {
        const SECRET: &str = "sk-canary-0d5e9f";
        let body = if with_secret { body.replace("bad", SECRET).replacen('a', SECRET, 1) } else { body };
        let Ok(code) = StatusCode::from_u16(status) else { return Ok(()) };
        match status_kind(code, body.as_bytes(), SECRET) {
            ErrorKind::Status { status: got, message, code, field } => {
                prop_assert_eq!(got, status);
                prop_assert!(message.chars().count() <= 403, "{} chars of message", message.chars().count());
                prop_assert!(!message.contains(SECRET), "the secret in the message: {message}");
                prop_assert!(!code.as_deref().unwrap_or("x").is_empty(), "an empty code is absent");
                prop_assert!(!field.as_deref().unwrap_or("x").is_empty(), "an empty field is absent");
            }
            other => prop_assert!(false, "an error status read as {other:?}"),
        }
    }
}

// ----- the operator API -----

fn access_request_body() -> Value {
    json!({
        "integration": valid_integration("http://127.0.0.1:9"),
        "user": "alice",
        "role": "cluster-member",
        "resource": "c-x",
        "ttl_seconds": 3600,
        "create_user": false
    })
}

fn job_create_body() -> Value {
    json!({"kind": "validate", "integration": "r", "params": {}})
}

proptest! {
    #![proptest_config(config())]

    /// The operator API's bodies as types: parse or explain.
    #[test]
    fn operator_bodies_parse_or_explain(
        access in json_text(access_request_body()),
        job in json_text(job_create_body()),
    ) {
        if let Some(a) = parse_or_explain::<AccessRequestCreate>(&access)? {
            prop_assert!(!a.subject.as_str().trim().is_empty());
        }
        parse_or_explain::<JobCreate>(&job)?;
    }
}

/// The operator token the embedded control plane's router is built with in these tests.
const OPERATOR_TOKEN: &str = "op-token-properties-41c2";

/// The operator endpoints a body is POSTed to. `{id}` is filled with an odd id.
const OPERATOR_POSTS: &[&str] = &[
    "/access-requests",
    "/jobs",
    "/access-requests/{id}",
    "/access-requests/{id}/revoke",
];

/// Arbitrary bodies POSTed to the embedded control plane's operator API over HTTP: every answer
/// is a 2xx or a 4xx with the API's error body, never a 5xx, and the server keeps answering.
#[test]
fn the_operator_api_answers_any_body_with_2xx_or_4xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = EmbeddedControlPlane::open(Options {
        data_dir: dir.path().to_path_buf(),
        ..Options::default()
    })
    .expect("open the embedded control plane");
    let base = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let app = apono_connector::control_plane::server::router(
            Arc::clone(&cp),
            Access {
                agent_token: None,
                agent_token_file: None,
                operator_token: OPERATOR_TOKEN.to_string().into(),
                listen: addr,
            },
        )
        .expect("a valid operator token");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        format!("http://{addr}{OPERATOR_PREFIX}")
    });
    // A fresh connection per request: a server that answers before reading a big body closes the
    // connection, and a pooled client would then blame the next request on it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let strategy = (
        prop::sample::select(OPERATOR_POSTS),
        hostile_string(),
        prop_oneof![json_text(access_request_body()), json_text(job_create_body()),],
    );
    // Run by hand (the server lives across cases): no source file to persist failures next to.
    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..config()
    });
    let outcome = runner.run(&strategy, |(endpoint, id, body)| {
        // Ids past a few hundred bytes only test hyper's URI limit; the body carries the huge ones.
        let id: String = id.chars().take(200).collect();
        let url = format!("{base}{}", endpoint.replace("{id}", &urlencode(&id)));
        rt.block_on(async {
            let sent = client
                .post(&url)
                .bearer_auth(OPERATOR_TOKEN)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let (status, text) = match sent {
                Ok(resp) => (resp.status().as_u16(), resp.text().await.unwrap_or_default()),
                // A server may answer and close before reading a big body; the write then fails.
                // Whether it still answers is checked below.
                Err(_) if body.len() > 64 * 1024 => {
                    (400, r#"{"error":{"code":"x","message":"closed early"}}"#.to_string())
                }
                Err(e) => return Err(TestCaseError::fail(format!("POST {}: {e}", short(&url)))),
            };
            prop_assert!(
                status < 500,
                "POST {} answered {status}: {}\nbody: {}",
                short(&url),
                short(&text),
                short(&body)
            );
            if status >= 400 {
                let error: Value = serde_json::from_str(&text).map_err(|e| {
                    TestCaseError::fail(format!("{status} without a JSON error body ({e}): {}", short(&text)))
                })?;
                let code = error["error"]["code"].as_str().unwrap_or("");
                let message = error["error"]["message"].as_str().unwrap_or("");
                prop_assert!(
                    !code.is_empty() && !message.trim().is_empty(),
                    "{status}: {}",
                    short(&text)
                );
            }
            let alive = client
                .get(format!("{base}/jobs"))
                .bearer_auth(OPERATOR_TOKEN)
                .send()
                .await
                .map_err(|e| TestCaseError::fail(format!("the server stopped answering: {e}")))?;
            prop_assert!(alive.status().is_success(), "GET jobs answered {}", alive.status());
            Ok(())
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    // Not only refusals: the valid bodies among them got through the token, Host and
    // Content-Type checks and queued grants.
    assert!(
        !cp.list_jobs().expect("list jobs").is_empty(),
        "no body was ever accepted: the property only reached refusals"
    );
    cp.close();
}

/// At most 300 chars of `s`, for failure messages about huge inputs.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ----- Rancher's pagination, through the client -----

/// What a fake Rancher answers, page after page, and what it was asked.
#[derive(Default)]
struct Script {
    pages: std::collections::VecDeque<(u16, String)>,
    requests: Vec<String>,
}

type SharedScript = Arc<std::sync::Mutex<Script>>;

async fn scripted_rancher(
    axum::extract::State(script): axum::extract::State<SharedScript>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut script = script.lock().expect("lock");
    script.requests.push(uri.to_string());
    let (status, body) = script.pages.pop_front().unwrap_or_else(|| {
        (
            200,
            r#"{"type":"collection","data":[],"pagination":{"partial":false}}"#.into(),
        )
    });
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
    (status, [("content-type", "application/json")], body).into_response()
}

/// `next` links a broken or hostile Rancher (or a proxy in front of it) may send.
fn hostile_next(evil: String) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(vec![
            format!("{evil}/v3/users?marker=u-2"),
            format!("{}/v3/users", evil.replacen("http:", "", 1)),
            "https://rancher.example.com/v3/users?limit=2&marker=u-2".to_string(),
            "../../v3/tokens".to_string(),
            "?marker=u-2".to_string(),
            "javascript:alert(1)".to_string(),
            "file:///etc/passwd".to_string(),
            "http://user:pass@rancher.example.com/v3/users".to_string(),
            "http://[::1/v3/users".to_string(),
            String::new(),
        ]).prop_map(Value::String),
        1 => hostile_string().prop_map(Value::String),
        1 => arbitrary_json(),
    ]
}

/// A page of users with hostile parts: ids that repeat, a `next` anywhere, wrong types.
fn hostile_page(evil: String) -> impl Strategy<Value = (u16, String)> {
    let page = (
        prop::collection::vec(prop_oneof![Just("u-1"), Just("u-2"), Just("u-3"), Just("")], 0..4),
        any::<bool>(),
        hostile_next(evil),
    )
        .prop_flat_map(|(ids, partial, next)| {
            let data: Vec<Value> = ids.iter().map(|id| json!({"id": id, "username": id})).collect();
            json_text(json!({"type": "collection", "data": data, "pagination": {"partial": partial, "next": next, "limit": 2}}))
        });
    prop_oneof![
        8 => page.prop_map(|body| (200, body)),
        1 => (prop::sample::select(vec![400u16, 401, 403, 404, 409, 422, 429, 500, 502, 503]), json_text(json!({"type": "error", "status": "503", "code": "ClusterUnavailable", "message": "down"}))),
    ]
}

/// A listing through `Client::list` against pages a broken Rancher sends: it ends (bounded) in
/// items or a typed error, and never follows a `next` to another host.
#[test]
fn pagination_ends_typed_and_stays_on_the_rancher_host() {
    use apono_connector::integrations::rancher::model::User;
    use apono_connector::integrations::rancher::{ApiKey, Client, RetryPolicy};
    use apono_connector::secrets::Secret;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let script: SharedScript = Arc::default();
    let evil_script: SharedScript = Arc::default();
    let serve = |script: SharedScript| {
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let app = axum::Router::new().fallback(scripted_rancher).with_state(script);
            tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
            format!("http://{addr}")
        })
    };
    let rancher = serve(script.clone());
    let evil = serve(evil_script.clone());

    let config = RancherConfig::from_value(
        &json!({"host": rancher, "insecure_http": true, "page_size": 2, "timeout_seconds": 5}),
    )
    .expect("a valid config");
    let key = ApiKey::from_secret(&Secret::new(
        [(
            "token".to_string(),
            "token-abcde:not-a-real-secret-0123456789".to_string().into(),
        )]
        .into(),
    ))
    .expect("a valid key");
    let client = Client::new(&config, &key).expect("client").with_retry(RetryPolicy {
        attempts: 2,
        min_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(5),
    });

    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..config_cases()
    });
    let strategy = prop::collection::vec(hostile_page(evil), 1..8);
    let outcome = runner.run(&strategy, |pages| {
        {
            let mut s = script.lock().expect("lock");
            s.pages = pages.iter().cloned().collect();
            s.requests.clear();
        }
        let listed = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                client.list::<User>(&["users"], &[], "users").collect_matching(|_| true),
            )
            .await
        });
        let listed = listed.map_err(|_| TestCaseError::fail("the listing did not end within 20 s"))?;
        if let Err(e) = &listed {
            prop_assert!(!e.code().is_empty() && !e.to_string().trim().is_empty(), "{e:?}");
        }
        let evil_requests = std::mem::take(&mut evil_script.lock().expect("lock").requests);
        prop_assert!(
            evil_requests.is_empty(),
            "a next link was followed to another host: {evil_requests:?}"
        );
        let requests = script.lock().expect("lock").requests.len();
        prop_assert!(
            requests <= 2 * pages.len() + 2,
            "{requests} requests for {} pages",
            pages.len()
        );
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// The suite's config (cases from `PROPTEST_CASES`), for tests driving a `TestRunner` by hand.
fn config_cases() -> ProptestConfig {
    config()
}
