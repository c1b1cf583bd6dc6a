//! Lifecycle cases off the matrix's paths, through the real `run` binary against a Rancher
//! simulator served by this test: an upgrade from a schema-v1 state file with the old build's
//! unmarked bindings, two standalone connectors on one Rancher, a person's copy of a connector
//! binding, the one-shot `revoke` next to a live access, keys that are admin only through a group
//! or a custom global role and a key that is not admin, an unknown project on Rancher 2.12, a
//! `pre_existing` access whose standing binding goes, and a second create-user grant for a user
//! whose access is live. Each asserts the promise: access ends when its time ends, and the
//! connector never takes away what it did not give.

mod common;

use std::path::Path;
use std::time::Duration;

use apono_connector::control_plane::operator::{AccessRequest, AccessState, IntegrationRef, JobRecord, JobState};
use apono_connector::integrations::Subject;
use apono_connector::sim::{RancherVersion, SimBinding, SimHandle, SimOptions};
use chrono::Utc;
use common::daemon::{
    Daemon, DaemonOptions, LONG, bindings, integration_toml, oneshot_revoke, sim, state_file, try_wait_state,
    user_id_of, wait_sweeps,
};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const LABEL: &str = "apono.io/created-by";
const OWNER: &str = "apono.io/owner";

/// A daemon on `sim` whose reconcile runs every 2 s.
async fn reconciling_daemon(sim: &SimHandle) -> Daemon {
    Daemon::start_with(integration_toml("prod", sim), 2).await
}

/// A simulator (2.13, small dataset) and a daemon on it with its reconcile every
/// `sweep_interval_seconds`.
async fn sim_and_daemon(sweep_interval_seconds: u64) -> (SimHandle, Daemon) {
    let sim = sim().await;
    let d = Daemon::start_with(integration_toml("prod", &sim), sweep_interval_seconds).await;
    (sim, d)
}

fn ids(bindings: &[SimBinding]) -> Vec<String> {
    bindings.iter().map(|b| b.id.clone()).collect()
}

fn binding(sim: &SimHandle, id: &str) -> Option<SimBinding> {
    sim.sim.bindings().into_iter().find(|b| b.id == id)
}

/// `POST /v3/<collection>` with the simulator's key, as a person (or an older build) would make
/// a binding; the created object.
async fn post(sim: &SimHandle, collection: &str, body: Value) -> Value {
    let (access, secret) = sim.sim.api_key();
    let response = reqwest::Client::new()
        .post(format!("{}/v3/{collection}", sim.base_url))
        .bearer_auth(format!("{access}:{secret}"))
        .json(&body)
        .send()
        .await
        .expect("the simulator answers");
    let status = response.status();
    let created: Value = response.json().await.expect("JSON");
    assert!(status.is_success(), "POST /v3/{collection}: {status} {created}");
    created
}

/// The name an earlier build (schema v1/v2 state, no owner in the marker) gave a binding.
fn old_name(prefix: &str, scope: &str, field: &str, value: &str, role: &str, resource: &str) -> String {
    let key = format!("{scope}|{field}={value}|{role}|{resource}");
    format!("{prefix}{}", &hex::encode(Sha256::digest(key.as_bytes()))[..16])
}

// ----- an upgrade -----

/// Milliseconds since the epoch, as the state file keeps times.
fn ms(t: chrono::DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// An `access_requests` row as a schema-v1 build wrote it (times in ms since the epoch).
struct V1Access<'a> {
    id: &'a str,
    user: &'a str,
    role: &'a str,
    resource: &'a str,
    ttl_seconds: i64,
    state: &'a str,
    granted_at: Option<i64>,
    expires_at: Option<i64>,
    grant_job_id: &'a str,
    revoke_job_id: Option<&'a str>,
    user_id: Option<&'a str>,
    binding_ids: Vec<String>,
}

/// A `jobs` row as a schema-v1 build wrote it: the integration by name only, never pinned.
struct V1Job<'a> {
    id: &'a str,
    kind: &'a str,
    params: Value,
    state: &'a str,
    attempt: i64,
    /// The lease of a process that died while it held the job.
    lease: Option<(&'a str, i64)>,
    result: Option<Value>,
    access_id: &'a str,
}

/// Lays out `data_dir` as a schema-v1 build left it: the integration `prod` on `sim` and the
/// given rows, all created at `created_at`.
fn write_v1_state(data_dir: &Path, sim: &SimHandle, created_at: i64, accesses: &[V1Access], jobs: &[V1Job]) {
    std::fs::create_dir_all(data_dir).expect("data dir");
    let file = state_file(data_dir);
    let conn = rusqlite::Connection::open(&file).expect("open the v1 state file");
    conn.execute_batch(include_str!("../src/control_plane/embedded/testdata/schema_v1.sql"))
        .expect("v1 schema");
    conn.execute_batch(
        "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);",
    )
    .expect("schema version 1");
    let (access_key, secret_key) = sim.sim.api_key();
    let spec = json!({
        "type": "rancher", "name": "prod",
        "config": {"host": sim.base_url, "status_timeout_seconds": 2},
        "secret_store": {"type": "APONO", "credentials": {"access_key": access_key, "secret_key": secret_key}},
    });
    conn.execute(
        "INSERT INTO integrations (name, spec, updated_at) VALUES ('prod', ?1, 0)",
        [spec.to_string()],
    )
    .expect("integration row");
    for a in accesses {
        conn.execute(
            "INSERT INTO access_requests (id, integration, subject, role, resource, ttl_seconds, create_user,
                 state, created_at, granted_at, expires_at, grant_job_id, revoke_job_id, user_id, binding_ids)
             VALUES (?1, 'prod', ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            rusqlite::params![
                a.id,
                json!({"user": a.user}).to_string(),
                a.role,
                a.resource,
                a.ttl_seconds,
                a.state,
                created_at,
                a.granted_at,
                a.expires_at,
                a.grant_job_id,
                a.revoke_job_id,
                a.user_id,
                json!(a.binding_ids).to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("access row {}: {e}", a.id));
    }
    for j in jobs {
        conn.execute(
            "INSERT INTO jobs (id, kind, integration_name, integration, params, state, attempt, lease_token,
                 lease_expires_at, result, access_id, created_at, updated_at)
             VALUES (?1, ?2, 'prod', NULL, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
            rusqlite::params![
                j.id,
                j.kind,
                j.params.to_string(),
                j.state,
                j.attempt,
                j.lease.map(|(token, _)| token),
                j.lease.map(|(_, until)| until),
                j.result.as_ref().map(Value::to_string),
                j.access_id,
                created_at,
            ],
        )
        .unwrap_or_else(|e| panic!("job row {}: {e}", j.id));
    }
    drop(conn);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("mode 0600");
    }
}

/// A schema-v1 state file with three accesses whose bindings an older build made under its
/// deterministic names, without any marker: one `active` (due in a few seconds), one
/// `revoking` whose revoke job carries no ids, and one `pending` whose grant had already made
/// its binding when the old process died. After the upgrade every one of them is revoked at its
/// time and its binding is gone; the people's own bindings stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_a_v1_state_file_revokes_every_old_access_at_its_time() {
    let sim = sim().await;
    let now = Utc::now();
    let cluster = "c-m-4bq8z2lp";
    let project = "c-7x2k9:p-x4m7q";

    // (a) active: bob nodes-view on the cluster, recorded id, due in 5 s.
    let a_name = old_name("crtb-", "cluster", "userId", "u-bob01", "nodes-view", cluster);
    let a_binding = post(
        &sim,
        "clusterroletemplatebindings",
        json!({"name": a_name, "clusterId": cluster, "roleTemplateId": "nodes-view", "userId": "u-bob01"}),
    )
    .await;
    let a_id = a_binding["id"].as_str().expect("id").to_string();
    // (b) revoking: alice project-member on the project; the v1 revoke job has no ids.
    let b_name = old_name("prtb-", "project", "userId", "u-alice1", "project-member", project);
    let b_binding = post(
        &sim,
        "projectroletemplatebindings",
        json!({"name": b_name, "projectId": project, "roleTemplateId": "project-member", "userId": "u-alice1"}),
    )
    .await;
    let b_id = b_binding["id"].as_str().expect("id").to_string();
    // (c) pending: alice cluster-member on the cluster; the grant made its binding, then died.
    let c_name = old_name("crtb-", "cluster", "userId", "u-alice1", "cluster-member", cluster);
    let c_binding = post(
        &sim,
        "clusterroletemplatebindings",
        json!({"name": c_name, "clusterId": cluster, "roleTemplateId": "cluster-member", "userId": "u-alice1"}),
    )
    .await;
    let c_id = c_binding["id"].as_str().expect("id").to_string();
    for (id, b) in [(&a_id, &a_binding), (&b_id, &b_binding), (&c_id, &c_binding)] {
        assert!(
            b["labels"].get(LABEL).is_none(),
            "the old build's binding {id} is unmarked"
        );
    }

    let before = ms(now - chrono::Duration::seconds(30));
    let accesses = [
        V1Access {
            id: "ar-v1-active",
            user: "bob",
            role: "nodes-view",
            resource: cluster,
            ttl_seconds: 5,
            state: "active",
            granted_at: Some(before),
            expires_at: Some(ms(now + chrono::Duration::seconds(5))),
            grant_job_id: "j-v1-a-grant",
            revoke_job_id: None,
            user_id: Some("u-bob01"),
            binding_ids: vec![a_id.clone()],
        },
        V1Access {
            id: "ar-v1-revoking",
            user: "alice",
            role: "project-member",
            resource: project,
            ttl_seconds: 60,
            state: "revoking",
            granted_at: Some(before),
            expires_at: Some(ms(now - chrono::Duration::seconds(1))),
            grant_job_id: "j-v1-b-grant",
            revoke_job_id: Some("j-v1-b-revoke"),
            user_id: Some("u-alice1"),
            binding_ids: vec![b_id.clone()],
        },
        V1Access {
            id: "ar-v1-pending",
            user: "alice",
            role: "cluster-member",
            resource: cluster,
            ttl_seconds: 4,
            state: "pending",
            granted_at: None,
            expires_at: None,
            grant_job_id: "j-v1-c-grant",
            revoke_job_id: None,
            user_id: None,
            binding_ids: Vec::new(),
        },
    ];
    let granted = |user_id: &str, binding_id: &str| {
        Some(json!({"user_id": user_id, "binding_ids": [binding_id], "created_user": false}))
    };
    let jobs = [
        V1Job {
            id: "j-v1-a-grant",
            kind: "grant",
            params: json!({"user": "bob", "role": "nodes-view", "resource": cluster}),
            state: "succeeded",
            attempt: 1,
            lease: None,
            result: granted("u-bob01", &a_id),
            access_id: "ar-v1-active",
        },
        V1Job {
            id: "j-v1-b-grant",
            kind: "grant",
            params: json!({"user": "alice", "role": "project-member", "resource": project}),
            state: "succeeded",
            attempt: 1,
            lease: None,
            result: granted("u-alice1", &b_id),
            access_id: "ar-v1-revoking",
        },
        // The v1 revoke job carries the subject, role and resource only: no ids.
        V1Job {
            id: "j-v1-b-revoke",
            kind: "revoke",
            params: json!({"user": "alice", "role": "project-member", "resource": project}),
            state: "pending",
            attempt: 0,
            lease: None,
            result: None,
            access_id: "ar-v1-revoking",
        },
        // Leased by the dead process, whose lease ran out.
        V1Job {
            id: "j-v1-c-grant",
            kind: "grant",
            params: json!({"user": "alice", "role": "cluster-member", "resource": cluster, "create_user": false}),
            state: "leased",
            attempt: 1,
            lease: Some(("lt-v1-dead", ms(now - chrono::Duration::seconds(10)))),
            result: None,
            access_id: "ar-v1-pending",
        },
    ];
    let mut d = Daemon::unstarted(
        integration_toml("prod", &sim),
        DaemonOptions {
            sweep_interval_seconds: 2,
            ..DaemonOptions::default()
        },
    );
    write_v1_state(&d.data_dir(), &sim, before, &accesses, &jobs);
    d.spawn().await;

    // Each old access is checked on its own, so one run shows every one that breaks.
    let mut failures = Vec::new();
    match try_wait_state(&d.op, "ar-v1-pending", AccessState::Active, LONG).await {
        Ok(a) if a.pre_existing => failures.push(format!(
            "pending: its grant came out pre_existing, though the binding is the old build's own: {a:?}"
        )),
        Ok(_) => {}
        Err(e) => failures.push(format!("pending: {e}")),
    }
    for (access, binding_id) in [
        ("ar-v1-active", &a_id),
        ("ar-v1-revoking", &b_id),
        ("ar-v1-pending", &c_id),
    ] {
        match try_wait_state(&d.op, access, AccessState::Revoked, LONG).await {
            Ok(ended) => {
                if let (Some(revoked), Some(expires)) = (ended.revoked_at, ended.expires_at)
                    && revoked < expires
                {
                    failures.push(format!("{access}: revoked at {revoked}, before its time {expires}"));
                }
            }
            Err(e) => failures.push(e),
        }
        if let Some(b) = binding(&sim, binding_id) {
            failures.push(format!("{access}: its binding {} is still in Rancher", b.id));
        }
    }
    // A binding the new build made for the pending access ends with it too.
    let extra: Vec<String> = ids(&bindings(&sim, "u-alice1", "cluster-member", cluster))
        .into_iter()
        .filter(|id| *id != c_id)
        .collect();
    if !extra.is_empty() {
        failures.push(format!("ar-v1-pending: Rancher still holds {extra:?}"));
    }
    // The people's own bindings are not the old build's: they stay.
    for standing in ["local:crtb-al1ce", "p-abcde:prtb-b0b01"] {
        if binding(&sim, standing).is_none() {
            failures.push(format!("a person's binding {standing} was removed"));
        }
    }
    assert!(failures.is_empty(), "after the upgrade:\n{}", failures.join("\n"));
    sim.stop().await;
}

// ----- two connectors, a copy, a one-shot revoke -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_connectors_on_one_rancher_never_share_a_binding() {
    let sim = sim().await;
    let first = reconciling_daemon(&sim).await;
    let second = reconciling_daemon(&sim).await;
    let (role, resource) = ("cluster-member", "c-m-4bq8z2lp");
    let long = first.granted("bob", role, resource, 120).await;
    let short = second.granted("bob", role, resource, 3).await;

    let held = bindings(&sim, "u-bob01", role, resource);
    assert_eq!(held.len(), 2, "each connector makes its own binding: {held:?}");
    for a in [&long, &short] {
        assert!(!a.pre_existing, "another connector's binding is not a person's: {a:?}");
        assert_eq!(a.binding_ids.len(), 1, "{a:?}");
    }
    assert_ne!(long.binding_ids, short.binding_ids, "never shared");
    let owner = |id: &str| binding(&sim, id).and_then(|b| b.annotations.get(OWNER).cloned());
    let (first_owner, second_owner) = (owner(&long.binding_ids[0]), owner(&short.binding_ids[0]));
    assert!(
        first_owner.is_some() && second_owner.is_some() && first_owner != second_owner,
        "each binding names its own connector: {first_owner:?} / {second_owner:?}"
    );

    second.wait_state(&short.id, AccessState::Revoked, LONG).await;
    // The second connector reconciles twice more: the first one's binding is not its to remove.
    wait_sweeps(&second, 2).await;
    assert_eq!(first.get(&long.id).await.state, AccessState::Active);
    assert_eq!(
        ids(&bindings(&sim, "u-bob01", role, resource)),
        long.binding_ids,
        "the first connector's binding outlives the second's access"
    );
    first.revoke_now(&long.id).await;
    assert!(bindings(&sim, "u-bob01", role, resource).is_empty());
    sim.stop().await;
}

/// A person makes a JIT binding permanent by copying it (labels and annotations included) under
/// another name: the copy is theirs, never removed by the connector's revoke or reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_connector_binding_under_another_name_is_never_removed() {
    let (sim, d) = sim_and_daemon(2).await;
    let (role, resource) = ("cluster-member", "c-m-4bq8z2lp");
    let a = d.granted("bob", role, resource, 3).await;
    let original = binding(&sim, &a.binding_ids[0]).expect("the access's binding");
    assert_eq!(original.labels.get(LABEL).map(String::as_str), Some("apono-connector"));
    let copy = post(
        &sim,
        "clusterroletemplatebindings",
        json!({
            "name": "bob-permanent", "clusterId": resource, "roleTemplateId": role, "userId": "u-bob01",
            "labels": original.labels, "annotations": original.annotations,
        }),
    )
    .await;
    let copy_id = copy["id"].as_str().expect("id").to_string();

    d.wait_state(&a.id, AccessState::Revoked, LONG).await;
    assert!(
        binding(&sim, &original.id).is_none(),
        "the connector's own binding is gone"
    );
    // Past the copied expiry, through two more reconciles.
    wait_sweeps(&d, 2).await;
    assert!(
        binding(&sim, &copy_id).is_some(),
        "the person's copy {copy_id} was removed: {:?}",
        bindings(&sim, "u-bob01", role, resource)
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_revoke_next_to_a_live_access_leaves_its_binding_and_says_so() {
    let (sim, d) = sim_and_daemon(300).await;
    let (role, resource) = ("cluster-member", "c-m-4bq8z2lp");
    let a = d.granted("bob", role, resource, 600).await;
    let live = a.binding_ids[0].clone();

    let r = oneshot_revoke(&sim, "bob", role, resource, false);
    assert_eq!(r["removed_binding_ids"], json!([]), "{r}");
    assert_eq!(r["left_binding_ids"], json!([live]), "{r}");
    let notes = r["notes"].as_array().cloned().unwrap_or_default();
    assert!(!notes.is_empty(), "says why the binding was left: {r}");
    assert_eq!(ids(&bindings(&sim, "u-bob01", role, resource)), vec![live.clone()]);
    assert_eq!(d.get(&a.id).await.state, AccessState::Active);

    // `--all` is the operator's explicit override.
    let r = oneshot_revoke(&sim, "bob", role, resource, true);
    assert_eq!(r["removed_binding_ids"], json!([live]), "{r}");
    assert!(bindings(&sim, "u-bob01", role, resource).is_empty());
    d.revoke_now(&a.id).await;
    sim.stop().await;
}

// ----- what the key may do -----

/// The admin proof of grant and revoke with a key whose owner is admin only by the given
/// means: the access is granted, and revoked at its time.
#[allow(dead_code)] // used by the two tests below, compiled out until the simulator API lands
async fn grants_and_revokes_with(sim: &SimHandle) {
    let d = Daemon::start(integration_toml("prod", sim)).await;
    let (role, resource) = ("cluster-member", "c-m-4bq8z2lp");
    let a = d.granted("bob", role, resource, 3).await;
    assert_eq!(ids(&bindings(sim, "u-bob01", role, resource)), a.binding_ids);
    d.wait_state(&a.id, AccessState::Revoked, LONG).await;
    assert!(bindings(sim, "u-bob01", role, resource).is_empty());
}

// The owner is admin only through an identity-provider group (lifecycle D2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_owner_is_admin_through_a_group_grants_and_revokes() {
    use apono_connector::integrations::BindingScope;
    use apono_connector::sim::ADMIN_USER_ID;
    let sim = sim().await;
    let admins = "github_team://rancher-admins";
    assert!(sim.sim.set_user_groups(ADMIN_USER_ID, vec![admins.to_string()]));
    sim.sim
        .add_binding(SimBinding {
            id: "grb-admins".into(),
            name: "grb-admins".into(),
            scope: BindingScope::Global,
            role_id: "admin".into(),
            resource_id: "global".into(),
            user_id: None,
            user_principal_id: None,
            group_principal_id: Some(admins.into()),
            labels: Default::default(),
            annotations: Default::default(),
        })
        .expect("the group's admin binding");
    assert!(
        sim.sim.remove_binding("grb-admin"),
        "the owner's own admin binding goes"
    );
    grants_and_revokes_with(&sim).await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_owner_is_admin_through_a_custom_global_role_grants_and_revokes() {
    use apono_connector::integrations::BindingScope;
    use apono_connector::sim::ADMIN_USER_ID;
    let sim = sim().await;
    // Rancher's rule for an admin role (`pkg/rbac/common.go` IsAdminGlobalRole): every verb on
    // every resource, and every non-resource URL.
    sim.sim
        .add_global_role("gr-cloned-admin", apono_connector::sim::PolicyRule::admin())
        .expect("the custom admin role");
    sim.sim
        .add_binding(SimBinding {
            id: "grb-cloned".into(),
            name: "grb-cloned".into(),
            scope: BindingScope::Global,
            role_id: "gr-cloned-admin".into(),
            resource_id: "global".into(),
            user_id: Some(ADMIN_USER_ID.into()),
            user_principal_id: None,
            group_principal_id: None,
            labels: Default::default(),
            annotations: Default::default(),
        })
        .expect("the owner's custom admin binding");
    assert!(sim.sim.remove_binding("grb-admin"), "the owner's `admin` binding goes");
    grants_and_revokes_with(&sim).await;
    sim.stop().await;
}

/// The grant job of an access, once it has finished.
async fn finished_grant(d: &Daemon, access: &AccessRequest) -> JobRecord {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let job =
            d.op.job(&access.grant_job_id)
                .await
                .expect("read")
                .expect("the grant job");
        if matches!(job.state, JobState::Succeeded | JobState::Failed) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the grant never finished: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A key whose owner is not an admin could make bindings it could never prove gone: the grant
/// proves admin before any write, and fails `permission_denied` with nothing created, whether
/// its subject needs a lookup (a username the key cannot see) or none (a group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_admin_key_grants_nothing() {
    let sim = sim().await;
    sim.sim.set_key_owner_admin(false);
    let d = Daemon::start(integration_toml("prod", &sim)).await;
    sim.sim.reset_stats();
    let (role, resource) = ("cluster-member", "c-m-4bq8z2lp");
    let mut accesses = Vec::new();
    for subject in [
        Subject::user("bob"),
        Subject::GroupPrincipal("github_team://888".into()),
    ] {
        let a = d
            .request_subject(IntegrationRef::Name("prod".into()), subject, role, resource, 600, false)
            .await
            .expect("accepted");
        let grant = finished_grant(&d, &a).await;
        let error = grant
            .error
            .clone()
            .unwrap_or_else(|| panic!("the grant failed: {grant:?}"));
        assert_eq!(error.code, "permission_denied", "{} : {error:?}", a.subject);
        assert!(error.message.contains("admin"), "says why: {}", error.message);
        accesses.push(a);
    }
    let stats = sim.sim.stats();
    let writes: Vec<(&String, &u64)> = stats
        .routes
        .iter()
        .filter(|(route, _)| !route.starts_with("GET "))
        .collect();
    assert!(writes.is_empty(), "no write before the proof: {writes:?}");
    assert!(
        sim.sim
            .bindings()
            .iter()
            .all(|b| !(b.role_id == role && b.resource_id == resource)),
        "nothing created"
    );
    // Admin again: the cleanups end the accesses.
    sim.sim.set_key_owner_admin(true);
    for a in accesses {
        d.wait_state(&a.id, AccessState::Revoked, Duration::from_secs(120))
            .await;
    }
    sim.stop().await;
}

// ----- Rancher per version -----

/// On 2.12+ a binding to an unknown project is a 500 naming the project (the scoped store's
/// lookup): the grant says `not_found` after one POST, and is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_project_on_rancher_2_12_is_not_found_after_one_post() {
    let sim = SimHandle::start(SimOptions {
        version: RancherVersion::new(12),
        ..SimOptions::default()
    })
    .await
    .expect("sim starts");
    let d = Daemon::start(integration_toml("prod", &sim)).await;
    sim.sim.reset_stats();
    let a = d.request("bob", "project-member", "c-7x2k9:p-nope1", 600).await;
    let grant = finished_grant(&d, &a).await;
    let error = grant
        .error
        .clone()
        .unwrap_or_else(|| panic!("the grant failed: {grant:?}"));
    assert_eq!(error.code, "not_found", "{error:?}");
    assert!(
        error.message.contains("p-nope1"),
        "names the project: {}",
        error.message
    );
    d.wait_state(&a.id, AccessState::Revoked, LONG).await;
    assert_eq!(
        sim.sim.stats().route("POST /v3/projectroletemplatebindings"),
        1,
        "{:?}",
        sim.sim.stats().routes
    );
    sim.stop().await;
}

// ----- the reconcile, and people -----

/// A `pre_existing` access whose standing binding a person deletes gets a binding of its own,
/// which then ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_existing_access_gets_its_own_binding_when_the_standing_one_goes() {
    let (sim, d) = sim_and_daemon(2).await;
    let (role, resource) = ("cluster-owner", "local");
    let a = d.granted("alice", role, resource, 120).await;
    assert!(a.pre_existing, "{a:?}");
    assert!(
        sim.sim.remove_binding("local:crtb-al1ce"),
        "a person removes the standing binding"
    );
    let deadline = tokio::time::Instant::now() + LONG;
    let own = loop {
        let now = d.get(&a.id).await;
        assert_eq!(now.state, AccessState::Active, "{now:?}");
        let held = bindings(&sim, "u-alice1", role, resource);
        if let Some(b) = held.iter().find(|b| now.binding_ids.contains(&b.id)) {
            break b.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no binding of its own: Rancher holds {held:?}, the access {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(own.labels.get(LABEL).map(String::as_str), Some("apono-connector"));
    d.revoke_now(&a.id).await;
    assert!(bindings(&sim, "u-alice1", role, resource).is_empty());
    sim.stop().await;
}

/// A second create-user grant for a user whose access is live does not reset the password the
/// first one handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_create_user_grant_keeps_the_live_password() {
    let (sim, d) = sim_and_daemon(300).await;
    let first = d.request_new_user("dana", "cluster-member", "c-7x2k9", 600).await;
    let first = d.wait_state(&first.id, AccessState::Active, LONG).await;
    let password = first.credentials.expect("credentials on the first read").password;
    let dana = user_id_of(&sim, "dana").expect("created");
    let second = d.request_new_user("dana", "nodes-view", "c-m-4bq8z2lp", 600).await;
    d.wait_state(&second.id, AccessState::Active, LONG).await;
    assert!(
        sim.sim.check_password(&dana, password.expose_secret()),
        "the first access's password still works"
    );
    sim.stop().await;
}
