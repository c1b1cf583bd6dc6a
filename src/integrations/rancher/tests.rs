//! Tests: the pure parts first, then the operations over HTTP against the simulator (`crate::sim`),
//! counting requests at the simulator, and a scripted server for what the simulator cannot do.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::client::{ErrorKind, status_kind};
use super::names::{
    BindingSubject, CREATED_BY_LABEL, EXPIRES_AT_ANNOTATION, GRANT_ID_ANNOTATION, OWNER_ANNOTATION, PASSWORD_LEN,
    binding_name, external_user_id, format_expiry, legacy_binding_name,
};
use super::*;
use crate::integrations::{Owner, SweptReason};
use crate::sim::{RancherVersion, SimBinding, SimHandle, SimOptions, SimUser};

mod budget;
mod discovery;
mod endpoint;
mod fidelity;
mod grant_revoke;
mod reconcile;
mod transport;

// ---------------------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------------------

fn secret(pairs: &[(&str, &str)]) -> Secret {
    Secret::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), SecretString::from(v.to_string())))
            .collect(),
    )
}

fn config_err(v: Value) -> String {
    match RancherConfig::from_value(&v) {
        Err(IntegrationError::Config { message }) => message,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

#[test]
fn config_defaults_and_host_forms() {
    let c = RancherConfig::from_value(&json!({"host": "rancher.example.com"})).unwrap();
    assert_eq!(c.base_url.as_str(), "https://rancher.example.com/");
    assert_eq!(c.page_size, 5000);
    assert_eq!(c.concurrency, 8);
    assert_eq!(c.timeout, Duration::from_secs(30));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    let c = RancherConfig::from_value(&json!({"host": "rancher.example.com", "port": 8443})).unwrap();
    assert_eq!(c.base_url.as_str(), "https://rancher.example.com:8443/");
    let c = RancherConfig::from_value(&json!({"host": "rancher.example.com:9443", "port": 8443})).unwrap();
    assert_eq!(c.base_url.port(), Some(9443), "the host's own port wins");
    let c = RancherConfig::from_value(&json!({"host": "http://127.0.0.1:8080"})).unwrap();
    assert_eq!(c.base_url.as_str(), "http://127.0.0.1:8080/");
    let c = RancherConfig::from_value(&json!({"host": "https://r.example.com/", "port": "8443"})).unwrap();
    assert_eq!(c.base_url.as_str(), "https://r.example.com:8443/");
    // Tolerant of the control plane's keys, as numbers or numeric strings, or empty.
    let c = RancherConfig::from_value(&json!({
        "host": "r.example.com", "credential_rotation_days": 30, "user_cleanup_days": "7",
        "ui_url": "", "certificate_authority": null,
    }))
    .unwrap();
    assert_eq!(c.credential_rotation_days, Some(30.0));
    assert_eq!(c.user_cleanup_days, Some(7.0));
    let c = RancherConfig::from_value(&json!({
        "host": "r.example.com", "credential_rotation_days": 1e300, "user_cleanup_days": "1.5",
    }))
    .unwrap();
    assert_eq!(c.user_cleanup_days, Some(1.5));
    assert!(c.ui_url.is_none() && c.certificate_authority.is_none());
}

#[test]
fn config_errors_name_every_key() {
    let m = config_err(json!({"hostt": "x", "page_size": 0, "custom_access_details": "x".repeat(401)}));
    assert!(m.contains("\"hostt\""), "{m}");
    assert!(m.contains("host is required"), "{m}");
    assert!(m.contains("page_size"), "{m}");
    assert!(m.contains("custom_access_details") && m.contains("401"), "{m}");
    let m = config_err(json!({"host": "r", "page_size": 10001, "concurrency": "many", "user_cleanup_days": -1}));
    assert!(
        m.contains("page_size") && m.contains("concurrency") && m.contains("user_cleanup_days"),
        "{m}"
    );
    assert!(config_err(json!({"host": "ftp://r"})).contains("https"));
    assert!(config_err(json!({"host": "https://u:p@r"})).contains("credentials"));
    assert!(config_err(json!({"host": "r", "port": 70000})).contains("port"));
    assert!(config_err(json!({"host": "r", "ui_url": "not a url"})).contains("ui_url"));
    assert!(config_err(json!({"host": "r", "certificate_authority": "garbage"})).contains("certificate_authority"));
    assert!(config_err(json!("r")).contains("object"));
    assert!(RancherConfig::from_value(&json!({"host": "r", "custom_access_details": "é".repeat(400)})).is_ok());
}

#[test]
fn access_details_use_ui_url_then_host() {
    let c =
        RancherConfig::from_value(&json!({"host": "r.example.com", "custom_access_details": "Use the VPN."})).unwrap();
    assert_eq!(c.access_details(), "Rancher UI: https://r.example.com\nUse the VPN.");
    let c =
        RancherConfig::from_value(&json!({"host": "r.example.com", "ui_url": "https://ui.example.com/dash"})).unwrap();
    assert_eq!(c.access_details(), "Rancher UI: https://ui.example.com/dash");
}

#[test]
fn api_key_forms_and_redaction() {
    let k = ApiKey::from_secret(&secret(&[
        ("access_key", "token-abc12"),
        ("secret_key", "canary-secret-1"),
    ]))
    .unwrap();
    assert_eq!(k.token_name(), "token-abc12");
    assert!(!format!("{k:?}").contains("canary"));
    assert_eq!(k.bearer().expose_secret(), "Bearer token-abc12:canary-secret-1");
    let k = ApiKey::from_secret(&secret(&[("token", "ext/tok-1:canary-secret-2")])).unwrap();
    assert_eq!(k.token_name(), "tok-1");
    assert!(k.is_ext());
    let e = ApiKey::from_secret(&secret(&[("password", "canary-secret-3")])).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("access_key") && m.contains("secret_key") && m.contains("token"),
        "{m}"
    );
    assert!(
        m.contains("password") && !m.contains("canary"),
        "names the keys found, never values: {m}"
    );
    assert!(matches!(e, IntegrationError::Config { .. }));
    let e = ApiKey::from_secret(&secret(&[("token", "canary-no-colon")])).unwrap_err();
    assert!(!e.to_string().contains("canary"));
    let e = ApiKey::from_secret(&secret(&[("access_key", "a b"), ("secret_key", "canary")])).unwrap_err();
    assert!(!e.to_string().contains("canary"));
}

#[test]
fn error_bodies_parse_string_or_int_status() {
    let k = status_kind(
        StatusCode::UNAUTHORIZED,
        br#"{"type":"error","status":"401","message":"Unauthorized 401: must authenticate"}"#,
        "s3cr3t",
    );
    match &k {
        ErrorKind::Status {
            status, code, message, ..
        } => {
            assert_eq!(*status, 401);
            assert!(code.is_none());
            assert_eq!(message, "Unauthorized 401: must authenticate");
        }
        other => panic!("{other:?}"),
    }
    let k = status_kind(
        StatusCode::UNPROCESSABLE_ENTITY,
        br#"{"type":"error","status":422,"code":"NotUnique","message":"Username is already in use.","fieldName":"username"}"#,
        "s3cr3t",
    );
    assert!(
        matches!(&k, ErrorKind::Status { code: Some(c), field: Some(f), .. } if c == "NotUnique" && f == "username")
    );
    // A proxy's HTML page, and a body that echoes the secret.
    let k = status_kind(StatusCode::BAD_GATEWAY, b"<html><body>bad</body></html>", "s3cr3t");
    assert!(matches!(&k, ErrorKind::Status { message, .. } if message == "Bad Gateway"));
    let k = status_kind(
        StatusCode::BAD_REQUEST,
        br#"{"message":"token x:s3cr3t is bad"}"#,
        "s3cr3t",
    );
    assert!(matches!(&k, ErrorKind::Status { message, .. } if !message.contains("s3cr3t")));
}

fn api_error(status: u16, code: Option<&str>, message: &str, field: Option<&str>) -> client::ApiError {
    client::ApiError {
        method: reqwest::Method::POST,
        path: "/v3/clusterroletemplatebindings".into(),
        kind: Box::new(ErrorKind::Status {
            status,
            code: code.map(str::to_string),
            message: message.into(),
            field: field.map(str::to_string),
        }),
    }
}

#[test]
fn status_mapping() {
    let e = api_error(401, None, "Unauthorized 401: must authenticate", None).into_error();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }));
    let m = e.to_string();
    // Rancher's 401 never says why: every cause is listed, a cluster scope among them.
    assert!(m.contains("401") && m.contains("no scope"), "{m}");
    assert!(m.contains("expired") && m.contains("scoped to a cluster"), "{m}");
    assert!(matches!(
        api_error(403, Some("Forbidden"), "x", None).into_error(),
        IntegrationError::PermissionDenied { .. }
    ));
    assert!(matches!(
        api_error(404, None, "x", None).into_error(),
        IntegrationError::NotFound { .. }
    ));
    assert!(matches!(
        api_error(422, None, "x", None).into_error(),
        IntegrationError::Invalid { .. }
    ));
    for s in [500, 502, 503, 504, 429] {
        let e = api_error(s, None, "x", None);
        assert!(e.is_transient(), "{s}");
        assert!(e.into_error().retryable(), "{s}");
    }
    assert!(api_error(503, Some("ClusterUnavailable"), "x", None).is_transient());
    assert!(!api_error(422, None, "x", None).is_transient());
}

#[test]
fn binding_refusals_name_the_role_and_why() {
    use super::grant::{Kind, Target, binding_error};
    use super::names::BindingSubject;
    let cluster = Resource::Cluster("c-7x2k9".into());
    let t = |role: &'static str| Target {
        kind: Kind::Cluster,
        role,
        resource: &cluster,
        subject: BindingSubject::UserId("u-1".into()),
    };
    let e = binding_error(
        &t("no-such-role"),
        api_error(
            422,
            Some("InvalidReference"),
            "roletemplates.management.cattle.io \"no-such-role\" not found",
            Some("roleTemplateId"),
        ),
    );
    assert!(matches!(e, IntegrationError::Invalid { .. }));
    assert!(e.to_string().contains("role \"no-such-role\" does not exist"), "{e}");
    // What Rancher really answers for an unknown role template: Norman's validator's 500
    // (rancher `pkg/api/norman/customization/roletemplatebinding/validator.go`). Final: the
    // client does not retry it, and it is not "Rancher is unavailable".
    let real = api_error(
        500,
        Some("ServerError"),
        "Error getting role template: roletemplates.management.cattle.io \"no-such-role\" not found",
        None,
    );
    assert!(super::grant::is_final_refusal(&t("no-such-role"), &real));
    let e = binding_error(&t("no-such-role"), real);
    assert!(matches!(e, IntegrationError::Invalid { .. }) && !e.retryable(), "{e:?}");
    assert!(
        e.to_string()
            .contains("role \"no-such-role\" does not exist in Rancher as a cluster role"),
        "{e}"
    );
    // Any other 500 stays retryable, and is retried.
    let other = api_error(500, Some("ServerError"), "etcdserver: request timed out", None);
    assert!(!super::grant::is_final_refusal(&t("cluster-member"), &other));
    assert!(binding_error(&t("cluster-member"), other).retryable());
    // A principal the key's auth provider cannot resolve: a 500 from GetPrincipal, permanent
    // until the key changes (rancher `pkg/api/norman/customization/authn/rtb_store.go`).
    let by_principal = Target {
        kind: Kind::Cluster,
        role: "cluster-member",
        resource: &cluster,
        subject: BindingSubject::UserPrincipal("activedirectory_user://CN=x".into()),
    };
    let unresolved = api_error(
        500,
        Some("ServerError"),
        "users.management.cattle.io \"CN=x\" not found",
        None,
    );
    assert!(super::grant::is_final_refusal(&by_principal, &unresolved));
    let e = binding_error(&by_principal, unresolved);
    assert!(matches!(e, IntegrationError::Config { .. }) && !e.retryable(), "{e:?}");
    assert!(e.to_string().contains("auth provider"), "{e}");
    let e = binding_error(
        &t("rt-lock1"),
        api_error(422, Some("InvalidState"), "Role is locked and cannot be assigned", None),
    );
    assert!(e.to_string().contains("role \"rt-lock1\" is locked"), "{e}");
    let e = binding_error(
        &t("project-member"),
        api_error(
            422,
            Some("InvalidBodyContent"),
            "Cannot reference context [project] from [cluster] context",
            None,
        ),
    );
    assert!(
        e.to_string()
            .contains("role \"project-member\" is a project role and cannot be bound on cluster c-7x2k9"),
        "{e}"
    );
    let e = binding_error(
        &t("cluster-member"),
        api_error(
            422,
            Some("InvalidReference"),
            "clusters.management.cattle.io \"c-7x2k9\" not found",
            Some("clusterId"),
        ),
    );
    assert!(
        matches!(e, IntegrationError::NotFound { .. }) && e.to_string().contains("cluster c-7x2k9"),
        "{e}"
    );
    assert!(!e.retryable());
    // The webhook's words, with no field name.
    let global = Resource::Global;
    let g = Target {
        kind: Kind::Global,
        role: "no-such",
        resource: &global,
        subject: BindingSubject::UserId("u-1".into()),
    };
    let e = binding_error(
        &g,
        api_error(
            400,
            Some("BadRequest"),
            "admission webhook denied the request: globalroles.management.cattle.io \"no-such\" not found",
            None,
        ),
    );
    assert!(e.to_string().contains("role \"no-such\" does not exist"), "{e}");
    // What Rancher answers for an unknown global role: 404 from the GRB store's owner reference
    // (rancher `pkg/api/norman/store/globalrolebindings/globalrolebinding_store.go`).
    let e = binding_error(
        &g,
        api_error(
            404,
            Some("NotFound"),
            "globalrole.management.cattle.io \"no-such\" not found",
            None,
        ),
    );
    assert!(
        matches!(e, IntegrationError::Invalid { .. })
            && e.to_string()
                .contains("role \"no-such\" does not exist in Rancher as a global role"),
        "{e:?}"
    );
    let e = binding_error(
        &t("cluster-member"),
        api_error(
            400,
            Some("BadRequest"),
            "clusters.management.cattle.io \"c-7x2k9\" not found",
            None,
        ),
    );
    assert!(matches!(e, IntegrationError::NotFound { .. }), "{e}");
}

#[test]
fn expiry_is_checked() {
    let config = RancherConfig::from_value(&json!({"host": "r.example.com"})).unwrap();
    let key = ApiKey::from_secret(&secret(&[("token", "token-abc:canary")])).unwrap();
    let r = Rancher::from_parts(config, key).unwrap();
    let now = chrono::Utc::now();
    let token = |expires: Option<chrono::DateTime<chrono::Utc>>, cluster: Option<&str>| model::Token {
        id: "token-abc".into(),
        cluster_id: cluster.map(str::to_string),
        expires_at: expires.map(|t| t.to_rfc3339()),
        ..model::Token::default()
    };
    let mut res = ValidateResult::default();
    r.check_token(&token(None, None), &mut res, now).unwrap();
    assert!(res.warnings.is_empty());
    let mut res = ValidateResult::default();
    r.check_token(&token(Some(now + chrono::Duration::days(5)), None), &mut res, now)
        .unwrap();
    assert_eq!(res.warnings.len(), 1, "{res:?}");
    assert_eq!(res.details["expires_in_days"], json!(5));
    let mut res = ValidateResult::default();
    r.check_token(&token(Some(now + chrono::Duration::days(60)), None), &mut res, now)
        .unwrap();
    assert!(res.warnings.is_empty());
    let e = r
        .check_token(&token(Some(now - chrono::Duration::days(1)), None), &mut res, now)
        .unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }));
    let e = r.check_token(&token(None, Some("c-7x2k9")), &mut res, now).unwrap_err();
    assert!(matches!(e, IntegrationError::Invalid { .. }));
    assert!(
        e.to_string().contains("scoped to cluster c-7x2k9") && e.to_string().contains("no-scope"),
        "{e}"
    );
    assert!(!format!("{r:?}").contains("canary"));
}

// ---------------------------------------------------------------------------------------------
// Against the simulator, over HTTP
// ---------------------------------------------------------------------------------------------

const FAST_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    min_delay: Duration::from_millis(5),
    max_delay: Duration::from_millis(20),
};

async fn sim_with(options: SimOptions) -> SimHandle {
    SimHandle::start(options).await.expect("sim starts")
}

async fn sim() -> SimHandle {
    sim_with(SimOptions::default()).await
}

fn rancher_with(sim: &SimHandle, extra: Value, secret_key: Option<&str>) -> Rancher {
    let mut config = json!({"host": sim.base_url});
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    let (access, key) = sim.sim.api_key();
    let key = ApiKey::from_secret(&secret(&[
        ("access_key", &access),
        ("secret_key", secret_key.unwrap_or(&key)),
    ]))
    .unwrap();
    Rancher::from_parts(RancherConfig::from_value(&config).unwrap(), key)
        .unwrap()
        .with_retry(FAST_RETRY)
}

fn rancher(sim: &SimHandle) -> Rancher {
    rancher_with(sim, json!({}), None)
}

fn grant_req(user: &str, role: &str, resource: &str) -> GrantRequest {
    GrantRequest {
        subject: Subject::user(user),
        role: role.into(),
        resource: Resource::parse(resource).unwrap(),
        create_user: false,
        grant_id: None,
        expires_at: None,
        owner: None,
        keep_password: false,
    }
}

fn revoke_req(user: &str, role: &str, resource: &str) -> RevokeRequest {
    RevokeRequest {
        subject: Subject::user(user),
        role: role.into(),
        resource: Resource::parse(resource).unwrap(),
        grant_id: None,
        user_id: None,
        binding_ids: Vec::new(),
        all: false,
        owner: None,
        bound_subject: None,
    }
}

fn group_grant(group: &str, role: &str, resource: &str) -> GrantRequest {
    GrantRequest {
        subject: Subject::GroupPrincipal(group.into()),
        role: role.into(),
        resource: Resource::parse(resource).unwrap(),
        create_user: false,
        grant_id: None,
        expires_at: None,
        owner: None,
        keep_password: false,
    }
}

fn matching(sim: &SimHandle, user_id: Option<&str>, role: &str, resource: &str) -> Vec<SimBinding> {
    sim.sim
        .bindings()
        .into_iter()
        .filter(|b| b.role_id == role && b.resource_id == resource)
        .filter(|b| user_id.is_none() || b.user_id.as_deref() == user_id)
        .collect()
}

/// Proves the key's owner an admin now, so the (cached) proof does not count in what follows.
async fn admin_proven(r: &Rancher) {
    r.ensure_admin().await.expect("the simulator's key belongs to an admin");
}

/// Requests the simulator saw for `f`.
async fn counted<T>(sim: &SimHandle, f: impl std::future::Future<Output = T>) -> (T, u64) {
    sim.sim.reset_stats();
    let out = f.await;
    (out, sim.sim.stats().total)
}

#[tokio::test]
async fn grant_by_username_costs_four_requests_and_a_repeat_is_one_binding() {
    let sim = sim().await;
    let r = rancher(&sim);
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    for (role, resource) in [("cluster-member", "c-7x2k9"), ("clusters-create", "global")] {
        let req = grant_req("bob", role, resource);
        let (first, n1) = counted(&sim, r.grant(&req)).await;
        let first = first.unwrap();
        // Lookup, listing, POST, and a GET that sees `Completed` (2.11+ writes it after the 201).
        assert!(n1 <= 4, "{role}: first grant took {n1} requests");
        let (again, n2) = counted(&sim, r.grant(&req)).await;
        let again = again.unwrap();
        assert!(n2 <= 2, "{role}: repeat took {n2} requests");
        assert_eq!(first.binding_ids, again.binding_ids);
        assert_eq!(first.user_id, "u-bob01");
        assert!(!first.created_user && first.credentials.is_none());
        assert!(!first.pre_existing && !first.managed_user);
        let found = matching(&sim, Some("u-bob01"), role, resource);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(first.binding_ids, vec![found[0].id.clone()]);
        assert!(first.access_details.contains(&sim.base_url));
    }
    sim.stop().await;
}

#[tokio::test]
async fn grant_by_principal_and_to_groups() {
    let sim = sim().await;
    let r = rancher(&sim);
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    // Never logged in: bound by principal at cluster scope. The 201 has no userId (EnsureUser
    // runs in Rancher's controller): the binding is read again until it has its user and
    // `Completed`, and that user is the grant's user_id, not the principal.
    let (g, n) = counted(
        &sim,
        r.grant(&grant_req("github_user://5151", "cluster-member", "c-7x2k9")),
    )
    .await;
    let g = g.unwrap();
    assert_eq!(
        n, 3,
        "the listing, the POST, then the binding read back once Rancher filled it in"
    );
    assert_eq!(g.user_id, external_user_id("github_user://5151"));
    assert_eq!(matching(&sim, Some(&g.user_id), "cluster-member", "c-7x2k9").len(), 1);
    // A global role for an external user that exists: its deterministic id is read first.
    let (g, n) = counted(
        &sim,
        r.grant(&grant_req("github_user://4242", "clusters-create", "global")),
    )
    .await;
    let g = g.unwrap();
    assert_eq!(n, 4, "the user by its deterministic id, the listing, the POST, the GET");
    assert_eq!(g.user_id, external_user_id("github_user://4242"));
    // A global role for a principal that never logged in: a clear refusal.
    let e = r
        .grant(&grant_req("github_user://6060", "clusters-create", "global"))
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::Invalid { .. }));
    assert!(e.to_string().contains("never logged in"), "{e}");
    // local://u-x names the user: checked to exist (Rancher would bind a ghost), bound by userId.
    let g = r
        .grant(&grant_req("local://u-alice1", "project-member", "c-7x2k9:p-abcde"))
        .await
        .unwrap();
    assert_eq!(g.user_id, "u-alice1");
    assert_eq!(
        matching(&sim, Some("u-alice1"), "project-member", "c-7x2k9:p-abcde").len(),
        1
    );
    let removed = r
        .revoke(&revoke_req("local://u-alice1", "project-member", "c-7x2k9:p-abcde"))
        .await
        .unwrap();
    assert_eq!(removed.removed_binding_ids, g.binding_ids);
    // Revoke by principal.
    let removed = r
        .revoke(&revoke_req("github_user://5151", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    assert_eq!(removed.removed_binding_ids.len(), 1);
    assert!(
        matching(&sim, None, "cluster-member", "c-7x2k9")
            .iter()
            .all(|b| b.user_principal_id.as_deref() != Some("github_user://5151")
                && b.user_id.as_deref() != Some(external_user_id("github_user://5151").as_str()))
    );
    let removed = r
        .revoke(&revoke_req("github_user://4242", "clusters-create", "global"))
        .await
        .unwrap();
    assert_eq!(removed.removed_binding_ids.len(), 1);

    // Groups, at every scope. A PRTB has no status on any version: no read back.
    for (role, resource, requests) in [
        ("cluster-owner", "c-m-4bq8z2lp", 3),
        ("project-member", "c-7x2k9:p-x4m7q", 2),
        ("clusters-create", "global", 3),
    ] {
        let req = group_grant("github_team://888", role, resource);
        let (g, n) = counted(&sim, r.grant(&req)).await;
        let g = g.unwrap();
        assert_eq!(
            n, requests,
            "{role}: the listing, the POST (and the GET that sees Completed but for a PRTB)"
        );
        // A group has no user: the kind of subject travels in `bound_subject`.
        assert_eq!(g.user_id, "");
        assert_eq!(
            g.bound_subject.as_ref().map(|b| (b.field.as_str(), b.value.as_str())),
            Some(("groupPrincipalId", "github_team://888"))
        );
        let in_sim: Vec<_> = matching(&sim, None, role, resource)
            .into_iter()
            .filter(|b| b.group_principal_id.as_deref() == Some("github_team://888"))
            .collect();
        assert_eq!(in_sim.len(), 1);
        assert_eq!(g.binding_ids, vec![in_sim[0].id.clone()]);
        let rv = RevokeRequest {
            subject: req.subject.clone(),
            role: role.into(),
            resource: req.resource.clone(),
            grant_id: None,
            user_id: None,
            binding_ids: Vec::new(),
            all: false,
            owner: None,
            bound_subject: None,
        };
        assert_eq!(r.revoke(&rv).await.unwrap().removed_binding_ids, g.binding_ids);
    }
    sim.stop().await;
}

#[tokio::test]
async fn grant_with_user_creation_hands_out_working_credentials_every_time() {
    let sim = sim().await;
    let r = rancher_with(
        &sim,
        json!({"custom_access_details": "Log in with the password below."}),
        None,
    );
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    let mut req = grant_req("carol", "project-member", "c-7x2k9:p-x4m7q");
    req.create_user = true;
    let (g, n) = counted(&sim, r.grant(&req)).await;
    let g = g.unwrap();
    assert!(
        n <= 6,
        "lookup, user, binding, login binding, and each binding read back until Completed: {n}"
    );
    assert!(g.created_user && g.managed_user);
    let creds = g.credentials.clone().expect("credentials for a created user");
    assert_eq!(creds.username, "carol");
    let password = creds.password.expose_secret().to_string();
    assert!(password.len() >= 24 && password.chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(sim.sim.check_password(&g.user_id, &password));
    assert!(
        !format!("{g:?}").contains(&password),
        "Debug of the result hides the password"
    );
    assert!(g.access_details.contains("Log in with the password below."));
    let user: SimUser = sim.sim.users().into_iter().find(|u| u.id == g.user_id).unwrap();
    assert_eq!(
        user.labels.get(CREATED_BY_LABEL).map(String::as_str),
        Some("apono-connector")
    );
    assert!(!user.must_change_password && user.enabled);
    // The login-only role, never `user` (which can create clusters and own them).
    let login = matching(&sim, Some(&g.user_id), "user-base", "global");
    assert_eq!(login.len(), 1, "the login role was added");
    assert!(matching(&sim, Some(&g.user_id), "user", "global").is_empty());
    assert_eq!(
        login[0].labels.get(CREATED_BY_LABEL).map(String::as_str),
        Some("apono-connector")
    );
    assert!(!login[0].annotations.contains_key(EXPIRES_AT_ANNOTATION), "never swept");
    assert_eq!(
        matching(&sim, Some(&g.user_id), "project-member", "c-7x2k9:p-x4m7q").len(),
        1
    );
    assert!(g.binding_ids[0].starts_with("c-7x2k9-p-x4m7q:"), "{:?}", g.binding_ids);

    // A repeat (a retried job whose result was lost): a fresh working password, the old one gone.
    let again = r.grant(&req).await.unwrap();
    assert!(!again.created_user && again.managed_user);
    let fresh = again
        .credentials
        .as_ref()
        .expect("credentials again")
        .password
        .expose_secret()
        .to_string();
    assert!(sim.sim.check_password(&g.user_id, &fresh) && !sim.sim.check_password(&g.user_id, &password));
    assert_eq!(again.binding_ids, g.binding_ids);
    assert_eq!(matching(&sim, Some(&g.user_id), "user-base", "global").len(), 1);

    // An existing user that is not the agent's, with create_user: no credentials, untouched.
    let mut alice = grant_req("alice", "cluster-member", "c-7x2k9");
    alice.create_user = true;
    let a = r.grant(&alice).await.unwrap();
    assert!(!a.created_user && a.credentials.is_none() && !a.managed_user);
    assert!(sim.sim.check_password("u-alice1", "alice-sim-password-0001"));
    sim.stop().await;
}

#[tokio::test]
async fn new_users_get_the_roles_the_install_marks_new_user_default_but_never_user() {
    let sim = sim().await;
    assert!(
        RancherConfig::from_value(&json!({"host": "r", "new_user_roles": "user"}))
            .unwrap_err()
            .to_string()
            .contains("new_user_roles")
    );
    let r = rancher_with(&sim, json!({"new_user_roles": "newUserDefault"}), None);
    // A default install marks `user`: replaced by `user-base`.
    let mut req = grant_req("nina", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let g = r.grant(&req).await.unwrap();
    assert_eq!(matching(&sim, Some(&g.user_id), "user-base", "global").len(), 1);
    assert!(matching(&sim, Some(&g.user_id), "user", "global").is_empty());
    // A hardened install marks another role: that one (with `user` still replaced).
    assert!(sim.sim.set_new_user_default("clusters-create", true));
    let mut req = grant_req("oscar", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let g = r.grant(&req).await.unwrap();
    assert_eq!(matching(&sim, Some(&g.user_id), "clusters-create", "global").len(), 1);
    assert_eq!(matching(&sim, Some(&g.user_id), "user-base", "global").len(), 1);
    assert!(matching(&sim, Some(&g.user_id), "user", "global").is_empty());
    // Nothing marked: user-base.
    assert!(sim.sim.set_new_user_default("user", false));
    assert!(sim.sim.set_new_user_default("clusters-create", false));
    let mut req = grant_req("pia", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let g = r.grant(&req).await.unwrap();
    let globals: Vec<String> = sim
        .sim
        .bindings()
        .into_iter()
        .filter(|b| b.scope == BindingScope::Global && b.user_id.as_deref() == Some(g.user_id.as_str()))
        .map(|b| b.role_id)
        .collect();
    assert_eq!(globals, vec!["user-base".to_string()]);
    sim.stop().await;
}

#[tokio::test]
async fn a_refused_user_creation_never_shows_the_password() {
    let sim = sim_with(SimOptions {
        password_min_length: 40,
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    let mut req = grant_req("dave", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let e = r.grant(&req).await.unwrap_err();
    assert!(matches!(e, IntegrationError::Invalid { .. }));
    let text = format!("{e} {e:?}");
    assert!(text.contains("dave") && text.contains("40"), "{text}");
    // No generated password (32 letters and digits in a row) anywhere in the error.
    let longest = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest < PASSWORD_LEN, "{text}");
    sim.stop().await;
}

#[tokio::test]
async fn an_interrupted_user_creation_is_finished_with_a_new_password() {
    let sim = sim().await;
    let r = rancher(&sim);
    let mut req = grant_req("erin", "cluster-member", "c-7x2k9");
    req.create_user = true;
    // The user is created, then Rancher fails every binding POST (beyond the client's retries).
    sim.sim
        .fail_next_on("POST /v3/clusterroletemplatebindings", 3, 500, false);
    let e = r.grant(&req).await.unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(sim.sim.users().iter().any(|u| u.username.as_deref() == Some("erin")));
    // The job's retry: the user exists but its password was never handed out: a fresh one.
    let g = r.grant(&req).await.unwrap();
    assert!(!g.created_user && g.managed_user, "created by the earlier attempt");
    let password = g.credentials.as_ref().unwrap().password.expose_secret().to_string();
    assert!(sim.sim.check_password(&g.user_id, &password));
    assert_eq!(matching(&sim, Some(&g.user_id), "user-base", "global").len(), 1);
    // setpassword fails (after it changed the password, as Rancher's can): the next retry still
    // hands out a working one.
    sim.sim
        .fail_next_on("POST /v3/users/{id}?action=setpassword", 3, 500, true);
    assert!(r.grant(&req).await.unwrap_err().retryable());
    assert!(!sim.sim.check_password(&g.user_id, &password));
    let again = r.grant(&req).await.unwrap();
    let fresh = again.credentials.as_ref().unwrap().password.expose_secret().to_string();
    assert!(sim.sim.check_password(&g.user_id, &fresh));
    sim.stop().await;
}

#[tokio::test]
async fn project_grants_and_revokes_with_both_id_forms() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    for (project, prefix) in [("c-7x2k9:p-abcde", "p-abcde:"), ("c-7x2k9:p-x4m7q", "c-7x2k9-p-x4m7q:")] {
        let req = grant_req("alice", "project-owner", project);
        let (g, n) = counted(&sim, r.grant(&req)).await;
        let g = g.unwrap();
        assert!(n <= 4, "lookup, listing, POST, GET until Completed: {n}");
        assert!(g.binding_ids[0].starts_with(prefix), "{:?}", g.binding_ids);
        let (again, n) = counted(&sim, r.grant(&req)).await;
        assert!(n <= 2, "a repeat finds the connector's binding in the listing: {n}");
        assert_eq!(again.unwrap().binding_ids, g.binding_ids);
        assert_eq!(matching(&sim, Some("u-alice1"), "project-owner", project).len(), 1);
        let (removed, n) = counted(&sim, r.revoke(&revoke_req("alice", "project-owner", project))).await;
        assert!(n <= 5, "user lookup + listing + DELETE + GET + the user: {n}");
        assert_eq!(removed.unwrap().removed_binding_ids, g.binding_ids);
        assert!(matching(&sim, Some("u-alice1"), "project-owner", project).is_empty());
        let again = r.revoke(&revoke_req("alice", "project-owner", project)).await.unwrap();
        assert!(again.removed_binding_ids.is_empty());
    }
    // A seeded binding (not the connector's) is left, and said so.
    let left = r
        .revoke(&revoke_req("bob", "project-member", "c-7x2k9:p-abcde"))
        .await
        .unwrap();
    assert!(left.removed_binding_ids.is_empty(), "{left:?}");
    assert_eq!(left.left_binding_ids, vec!["p-abcde:prtb-b0b01".to_string()]);
    assert_eq!(
        matching(&sim, Some("u-bob01"), "project-member", "c-7x2k9:p-abcde").len(),
        1
    );
    sim.stop().await;
}

/// A project grant made by another process (or before a restart): the listing finds the
/// connector's binding whatever namespace holds it, so the repeat costs what any repeat does.
#[tokio::test]
async fn a_project_repeat_from_another_process_finds_the_binding() {
    let sim = sim().await;
    let first = rancher(&sim);
    // The same server under another name: a separate memory, as in another process.
    let other = {
        let mut config = json!({"host": sim.base_url.replace("127.0.0.1", "localhost")});
        let (access, key) = sim.sim.api_key();
        let key = ApiKey::from_secret(&secret(&[("access_key", &access), ("secret_key", &key)])).unwrap();
        if let Value::Object(c) = &mut config {
            c.insert("page_size".into(), json!(1000));
        }
        Rancher::from_parts(RancherConfig::from_value(&config).unwrap(), key)
            .unwrap()
            .with_retry(FAST_RETRY)
    };
    let req = grant_req("bob", "project-owner", "c-7x2k9:p-x4m7q");
    admin_proven(&first).await;
    admin_proven(&other).await;
    let g = first.grant(&req).await.unwrap();
    let (again, n) = counted(&sim, other.grant(&req)).await;
    assert_eq!(n, 2, "user lookup + listing");
    assert_eq!(again.unwrap().binding_ids, g.binding_ids);
    assert_eq!(
        matching(&sim, Some("u-bob01"), "project-owner", "c-7x2k9:p-x4m7q").len(),
        1
    );
    sim.stop().await;
}

fn planted(id: &str, role: &str, resource: &str, user: &str) -> SimBinding {
    SimBinding {
        id: id.into(),
        name: id.rsplit(':').next().unwrap().into(),
        scope: Resource::parse(resource).unwrap().scope(),
        role_id: role.into(),
        resource_id: resource.into(),
        user_id: Some(user.into()),
        user_principal_id: Some(format!("local://{user}")),
        group_principal_id: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

/// A binding as the connector marks it: its label, and the grant id and expiry when given.
fn marked(mut b: SimBinding, grant_id: Option<&str>, expires_at: Option<DateTime<Utc>>) -> SimBinding {
    b.labels.insert(CREATED_BY_LABEL.into(), "apono-connector".into());
    if let Some(g) = grant_id {
        b.annotations.insert(GRANT_ID_ANNOTATION.into(), g.into());
    }
    if let Some(t) = expires_at {
        b.annotations.insert(EXPIRES_AT_ANNOTATION.into(), format_expiry(t));
    }
    b
}

/// A binding as connector `owner` makes it: the name it derives, its label, owner, grant id and
/// expiry.
fn connector_binding(
    owner: &Owner,
    role: &str,
    resource: &str,
    user: &str,
    grant_id: Option<&str>,
    expires_at: Option<DateTime<Utc>>,
) -> SimBinding {
    let parsed = Resource::parse(resource).unwrap();
    let name = binding_name(
        owner,
        parsed.scope(),
        &BindingSubject::UserId(user.into()),
        role,
        resource,
    );
    let mut b = marked(
        planted(&id_in(&parsed, &name), role, resource, user),
        grant_id,
        expires_at,
    );
    b.annotations.insert(OWNER_ANNOTATION.into(), owner.to_string());
    b
}

/// A binding as a build before owners made it: the pre-owner name and the label, no owner.
fn legacy_binding(
    role: &str,
    resource: &str,
    user: &str,
    grant_id: Option<&str>,
    expires_at: Option<DateTime<Utc>>,
) -> SimBinding {
    let parsed = Resource::parse(resource).unwrap();
    let name = legacy_binding_name(parsed.scope(), &BindingSubject::UserId(user.into()), role, resource);
    marked(
        planted(&id_in(&parsed, &name), role, resource, user),
        grant_id,
        expires_at,
    )
}

/// The id of a binding named `name` on `resource` (a project's bindings in its `p-y` namespace).
fn id_in(resource: &Resource, name: &str) -> String {
    match resource {
        Resource::Global => name.to_string(),
        Resource::Cluster(c) => format!("{c}:{name}"),
        Resource::Project(p) => format!("{}:{name}", p.split_once(':').unwrap().1),
    }
}

#[tokio::test]
async fn a_standing_binding_survives_grant_and_revoke() {
    let sim = sim().await;
    let r = rancher(&sim);
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    // Alice holds cluster-owner on local (seeded `local:crtb-al1ce`), made by a person: no marker.
    assert_eq!(matching(&sim, Some("u-alice1"), "cluster-owner", "local").len(), 1);
    let mut req = grant_req("alice", "cluster-owner", "local");
    req.grant_id = Some("acc-1".into());
    req.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
    let (g, n) = counted(&sim, r.grant(&req)).await;
    let g = g.unwrap();
    assert_eq!(n, 2, "user lookup + listing: nothing created");
    assert!(g.pre_existing && g.binding_ids.is_empty(), "{g:?}");
    assert_eq!(g.pre_existing_binding_ids, vec!["local:crtb-al1ce".to_string()]);
    let mut rv = revoke_req("alice", "cluster-owner", "local");
    rv.grant_id = Some("acc-1".into());
    rv.user_id = Some(g.user_id.clone());
    let out = r.revoke(&rv).await.unwrap();
    assert!(out.removed_binding_ids.is_empty(), "{out:?}");
    assert_eq!(out.left_binding_ids, vec!["local:crtb-al1ce".to_string()]);
    // The one-shot CLI revoke (no grant id) follows the same rule.
    let out = r.revoke(&revoke_req("alice", "cluster-owner", "local")).await.unwrap();
    assert!(out.removed_binding_ids.is_empty());
    assert_eq!(matching(&sim, Some("u-alice1"), "cluster-owner", "local").len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn revoke_removes_its_own_binding_and_leaves_copies_others_and_persons() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let mut req = grant_req("bob", "cluster-member", "c-7x2k9");
    req.grant_id = Some("acc-1".into());
    let g = r.grant(&req).await.unwrap();
    let ours = sim
        .sim
        .bindings()
        .into_iter()
        .find(|b| b.id == g.binding_ids[0])
        .unwrap();
    // A copy of ours under another name (a person kept it as a template: D11), another
    // connector's binding, the binding of a build before owners made for this grant, and one a
    // person made.
    let mut copy = ours.clone();
    copy.id = "c-7x2k9:crtb-copy1".into();
    copy.name = "crtb-copy1".into();
    sim.sim.add_binding(copy).unwrap();
    let other = Owner::new("standalone", "other-install").unwrap();
    let theirs = connector_binding(&other, "cluster-member", "c-7x2k9", "u-bob01", Some("acc-9"), None);
    sim.sim.add_binding(theirs.clone()).unwrap();
    let legacy = legacy_binding("cluster-member", "c-7x2k9", "u-bob01", Some("acc-1"), None);
    sim.sim.add_binding(legacy.clone()).unwrap();
    sim.sim
        .add_binding(planted("c-7x2k9:crtb-per01", "cluster-member", "c-7x2k9", "u-bob01"))
        .unwrap();
    let mut rv = revoke_req("bob", "cluster-member", "c-7x2k9");
    rv.grant_id = Some("acc-1".into());
    rv.user_id = Some("u-bob01".into());
    rv.binding_ids = g.binding_ids.clone();
    let (out, n) = counted(&sim, r.revoke(&rv)).await;
    let out = out.unwrap();
    assert_eq!(
        n,
        2 + 1 + 2 + 1,
        "DELETE+GET, listing, DELETE+GET of the old build's binding, the user"
    );
    let mut expected = vec![g.binding_ids[0].clone(), legacy.id.clone()];
    expected.sort();
    assert_eq!(out.removed_binding_ids, expected);
    assert_eq!(
        out.left_binding_ids,
        vec!["c-7x2k9:crtb-copy1".to_string(), "c-7x2k9:crtb-per01".to_string()]
    );
    assert_eq!(out.user_id.as_deref(), Some("u-bob01"));
    let left = |sim: &SimHandle| {
        let mut ids: Vec<String> = matching(sim, Some("u-bob01"), "cluster-member", "c-7x2k9")
            .into_iter()
            .map(|b| b.id)
            .collect();
        ids.sort();
        ids
    };
    let mut expect_left = vec![
        "c-7x2k9:crtb-copy1".to_string(),
        "c-7x2k9:crtb-per01".to_string(),
        theirs.id.clone(),
    ];
    expect_left.sort();
    assert_eq!(left(&sim), expect_left);
    // A repeat removes nothing more.
    let again = r.revoke(&rv).await.unwrap();
    assert_eq!(
        again.removed_binding_ids, g.binding_ids,
        "a recorded binding already gone (404) counts as removed"
    );
    assert_eq!(left(&sim), expect_left);
    // The one-shot revoke (no grant) leaves another connector's live binding and says so.
    let one_shot = r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    assert!(one_shot.removed_binding_ids.is_empty(), "{one_shot:?}");
    assert!(one_shot.left_binding_ids.contains(&theirs.id), "{one_shot:?}");
    assert!(
        one_shot
            .notes
            .iter()
            .any(|n| n.contains(&theirs.id) && n.contains("standalone/other-install")),
        "{one_shot:?}"
    );
    // `--all`: every equal binding, whoever made it, each reported.
    let mut all = revoke_req("bob", "cluster-member", "c-7x2k9");
    all.all = true;
    let out = r.revoke(&all).await.unwrap();
    assert_eq!(out.removed_binding_ids, expect_left);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    // A user that does not exist, nothing recorded: nothing to remove.
    let none = r
        .revoke(&revoke_req("nobody-here", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    assert!(none.removed_binding_ids.is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn overlapping_grants_share_the_connectors_binding_with_the_later_expiry() {
    let sim = sim().await;
    let r = rancher(&sim);
    let soon = Utc::now() + chrono::Duration::minutes(5);
    let later = Utc::now() + chrono::Duration::hours(2);
    let mut first = grant_req("bob", "cluster-owner", "c-7x2k9");
    first.grant_id = Some("acc-1".into());
    first.expires_at = Some(soon);
    let g1 = r.grant(&first).await.unwrap();
    let expiry = |id: &str| {
        sim.sim
            .bindings()
            .into_iter()
            .find(|b| b.id == id)
            .and_then(|b| b.annotations.get(EXPIRES_AT_ANNOTATION).cloned())
    };
    let b = sim
        .sim
        .bindings()
        .into_iter()
        .find(|b| b.id == g1.binding_ids[0])
        .unwrap();
    assert_eq!(
        b.labels.get(CREATED_BY_LABEL).map(String::as_str),
        Some("apono-connector")
    );
    assert_eq!(
        b.annotations.get(GRANT_ID_ANNOTATION).map(String::as_str),
        Some("acc-1")
    );
    assert_eq!(expiry(&b.id), Some(format_expiry(soon)));
    // A second access on the same triple, ending later: finds ours, moves the expiry later.
    let mut second = first.clone();
    second.grant_id = Some("acc-2".into());
    second.expires_at = Some(later);
    let (g2, n) = counted(&sim, r.grant(&second)).await;
    let g2 = g2.unwrap();
    assert_eq!(n, 3, "user lookup + listing + PUT");
    assert_eq!(g2.binding_ids, g1.binding_ids);
    assert!(!g2.pre_existing);
    assert_eq!(expiry(&b.id), Some(format_expiry(later)));
    // A third ending sooner: recorded, the expiry stays the later one.
    let mut third = first.clone();
    third.grant_id = Some("acc-3".into());
    let (g3, n) = counted(&sim, r.grant(&third)).await;
    assert_eq!(n, 2);
    assert_eq!(g3.unwrap().binding_ids, g1.binding_ids);
    assert_eq!(expiry(&b.id), Some(format_expiry(later)));
    assert_eq!(matching(&sim, Some("u-bob01"), "cluster-owner", "c-7x2k9").len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn an_expired_access_is_refused_and_nothing_is_created() {
    let sim = sim().await;
    let r = rancher(&sim);
    let before = sim.sim.bindings().len();
    let mut req = grant_req("bob", "cluster-owner", "c-7x2k9");
    req.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
    let (e, _) = counted(&sim, r.grant(&req)).await;
    let e = e.unwrap_err();
    assert!(matches!(e, IntegrationError::Invalid { .. }) && !e.retryable(), "{e:?}");
    assert!(
        e.to_string().contains("expired") && e.to_string().contains("no binding was created"),
        "{e}"
    );
    // Judged on Rancher's clock, which the lookup and the listing told: no write.
    assert_eq!(sim.sim.stats().route("POST /v3/clusterroletemplatebindings"), 0);
    assert_eq!(sim.sim.bindings().len(), before);
    sim.stop().await;
}

#[tokio::test]
async fn repeated_grants_on_both_duplicate_behaviours() {
    // The seeded binding c-7x2k9:crtb-grp01 gives github_team://777 cluster-member on c-7x2k9
    // under a name that is not ours, with no marker: equal access that was already there.
    let req = group_grant("github_team://777", "cluster-member", "c-7x2k9");
    let revoke = RevokeRequest {
        subject: req.subject.clone(),
        role: req.role.clone(),
        resource: req.resource.clone(),
        grant_id: None,
        user_id: None,
        binding_ids: Vec::new(),
        all: false,
        owner: None,
        bound_subject: None,
    };
    for minor in [13, 14] {
        let sim = sim_with(SimOptions {
            version: RancherVersion::new(minor),
            ..SimOptions::default()
        })
        .await;
        let r = rancher(&sim);
        let g = r.grant(&req).await.unwrap();
        assert!(g.pre_existing && g.binding_ids.is_empty(), "2.{minor}: {g:?}");
        assert_eq!(g.pre_existing_binding_ids, vec!["c-7x2k9:crtb-grp01".to_string()]);
        // 2.14+: a listing that misses it (lagging) leads to the POST, which the webhook refuses
        // as a duplicate (409 Conflict): read as the same pre-existing access.
        if minor >= 14 {
            sim.sim.empty_lists_on("GET /v3/clusterroletemplatebindings", 1);
            let again = r.grant(&req).await.unwrap();
            assert!(again.pre_existing, "{again:?}");
            assert_eq!(again.pre_existing_binding_ids, g.pre_existing_binding_ids);
        }
        let out = r.revoke(&revoke).await.unwrap();
        assert!(out.removed_binding_ids.is_empty());
        assert_eq!(out.left_binding_ids, vec!["c-7x2k9:crtb-grp01".to_string()]);
        let of_group = sim
            .sim
            .bindings()
            .into_iter()
            .filter(|b| b.role_id == "cluster-member" && b.group_principal_id.as_deref() == Some("github_team://777"))
            .count();
        assert_eq!(of_group, 1, "2.{minor}: the seeded one only");
        // For a user: the first grant creates, the repeat finds it; a POST whose answer was lost
        // is 409 AlreadyExists on our own name: read back, ours.
        let u = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
        sim.sim.empty_lists_on("GET /v3/clusterroletemplatebindings", 1);
        let again = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
        assert_eq!(again.binding_ids, u.binding_ids);
        assert!(!again.pre_existing);
        assert_eq!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").len(), 1);
        sim.stop().await;
    }
}

#[tokio::test]
async fn refusals_name_the_role_the_resource_or_the_user() {
    let sim = sim().await;
    let r = rancher(&sim);
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    let cases = [
        (
            grant_req("bob", "no-such-role", "c-7x2k9"),
            "role \"no-such-role\" does not exist",
        ),
        (
            grant_req("bob", "no-such-role", "global"),
            "role \"no-such-role\" does not exist",
        ),
        (grant_req("bob", "rt-lock1", "c-7x2k9"), "role \"rt-lock1\" is locked"),
        (
            grant_req("bob", "project-member", "c-7x2k9"),
            "role \"project-member\" is a project role and cannot be bound on cluster c-7x2k9",
        ),
        (
            grant_req("bob", "cluster-member", "c-7x2k9:p-abcde"),
            "role \"cluster-member\" is a cluster role and cannot be bound on project c-7x2k9:p-abcde",
        ),
        (
            grant_req("bob", "cluster-member", "c-nope1"),
            "cluster c-nope1 not found",
        ),
        (
            grant_req("bob", "project-member", "c-7x2k9:p-nope1"),
            "project c-7x2k9:p-nope1 not found",
        ),
        (
            grant_req("nobody-here", "cluster-member", "c-7x2k9"),
            "Rancher user \"nobody-here\" not found",
        ),
    ];
    for (req, expect) in cases {
        sim.sim.reset_stats();
        let e = r.grant(&req).await.unwrap_err();
        assert!(e.to_string().contains(expect), "{expect:?} not in {e}");
        assert!(!e.retryable(), "{e}");
        // Rancher answers an unknown role template with a 500: not retried either.
        assert!(
            sim.sim.stats().total <= 3,
            "{expect}: lookup, listing and one POST; no extra request to check first, no retry"
        );
    }
    // Rancher binds a userId that names no user (201): the agent checks the user first, with
    // one GET, and creates nothing.
    sim.sim.reset_stats();
    let e = r
        .grant(&grant_req("local://u-ghost", "cluster-member", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, IntegrationError::NotFound { .. }) && e.to_string().contains("u-ghost"),
        "{e:?}"
    );
    assert_eq!(sim.sim.stats().total, 1);
    assert!(sim.sim.bindings().len() == crate::sim::Sim::new(SimOptions::default()).bindings().len());
    sim.stop().await;
}

#[tokio::test]
async fn validate_reports_the_key_owner_scope_and_expiry() {
    let sim = sim().await;
    let r = rancher(&sim);
    let (v, n) = counted(&sim, r.validate()).await;
    let v = v.unwrap();
    assert!(n <= 4);
    assert_eq!(v.principal, "admin");
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    assert_eq!(v.details["scope"], json!("none"));

    // Expiring within 14 days: a warning and the details.
    sim.sim
        .set_key_expiry(Some(chrono::Utc::now() + chrono::Duration::days(3)));
    let v = r.validate().await.unwrap();
    assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
    assert!(v.warnings[0].contains("expires in 2 day") || v.warnings[0].contains("expires in 3 day"));
    assert!(v.details.contains_key("expires_at") && v.details.contains_key("expires_in_days"));

    // Expired: Rancher answers 401 to everything.
    sim.sim
        .set_key_expiry(Some(chrono::Utc::now() - chrono::Duration::hours(1)));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    sim.sim.set_key_expiry(None);

    // Scoped to a downstream cluster: refused everywhere the agent can ask, with a 401 that never
    // says why, so the scope is named among the causes.
    sim.sim.set_key_scope(Some("c-7x2k9"));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("scoped to a cluster") && e.to_string().contains("no scope"),
        "{e}"
    );
    // Scoped to `local`: the probe finds the one cluster the key works on, and names it.
    sim.sim.set_key_scope(Some("local"));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("scoped to cluster local") && e.to_string().contains("no scope"),
        "{e}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_refused_key_is_credentials_refused_with_401_and_never_the_secret() {
    const CANARY: &str = "canary-9f8e7d6c5b4a-secret";
    let sim = sim().await;
    let r = rancher_with(&sim, json!({}), Some(CANARY));
    assert!(!format!("{r:?}").contains(CANARY));
    let ops: Vec<IntegrationError> = vec![
        r.grant(&grant_req("bob", "cluster-member", "c-7x2k9"))
            .await
            .unwrap_err(),
        r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9"))
            .await
            .unwrap_err(),
        r.validate().await.unwrap_err(),
        r.discover(mpsc::channel(10).0).await.unwrap_err(),
    ];
    for e in ops {
        assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
        let text = format!("{e} {e:?}");
        assert!(text.contains("401"), "{text}");
        assert!(!text.contains(CANARY), "{text}");
        assert!(!e.retryable());
    }
    sim.stop().await;
}

#[tokio::test]
async fn rotation_only_for_agent_created_users() {
    let sim = sim().await;
    let r = rancher(&sim);
    let mut req = grant_req("frank", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let g = r.grant(&req).await.unwrap();
    let old = g.credentials.unwrap().password.expose_secret().to_string();
    let (rot, n) = counted(
        &sim,
        r.rotate_credentials(&RotateRequest {
            user_id: g.user_id.clone(),
        }),
    )
    .await;
    let rot = rot.unwrap();
    assert_eq!(n, 2);
    let new = rot.credentials.as_ref().unwrap().password.expose_secret().to_string();
    assert_ne!(old, new);
    assert!(sim.sim.check_password(&g.user_id, &new) && !sim.sim.check_password(&g.user_id, &old));
    assert_eq!(rot.credentials.as_ref().unwrap().username, "frank");
    assert!(!rot.created_user && rot.binding_ids.is_empty());
    assert!(!format!("{rot:?}").contains(&new));
    let e = r
        .rotate_credentials(&RotateRequest {
            user_id: "u-alice1".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::Invalid { .. }) && !e.retryable());
    assert!(
        sim.sim.check_password("u-alice1", "alice-sim-password-0001"),
        "alice untouched"
    );
    let e = r
        .rotate_credentials(&RotateRequest {
            user_id: "u-ghost".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::NotFound { .. }));
    sim.stop().await;
}

#[tokio::test]
async fn delete_user_only_for_agent_created_users_without_bindings() {
    let sim = sim().await;
    let r = rancher(&sim);
    let mut req = grant_req("gina", "cluster-member", "c-7x2k9");
    req.create_user = true;
    let g = r.grant(&req).await.unwrap();
    let del = DeleteUserRequest {
        user_id: g.user_id.clone(),
    };
    let d = r.delete_user(&del).await.unwrap();
    assert!(!d.deleted);
    assert!(d.reason.as_deref().unwrap().contains(&g.binding_ids[0]), "{d:?}");
    r.revoke(&revoke_req("gina", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    let (d, n) = counted(&sim, r.delete_user(&del)).await;
    let d = d.unwrap();
    assert!(d.deleted, "{d:?}");
    assert!(n <= 5, "{n}");
    assert!(!sim.sim.users().iter().any(|u| u.id == g.user_id));
    let d = r.delete_user(&del).await.unwrap();
    assert!(!d.deleted && d.reason.as_deref() == Some("already gone"));
    let d = r
        .delete_user(&DeleteUserRequest {
            user_id: "u-alice1".into(),
        })
        .await
        .unwrap();
    assert!(!d.deleted && d.reason.unwrap().contains("not created by apono-connector"));
    assert!(sim.sim.users().iter().any(|u| u.id == "u-alice1"));
    sim.stop().await;
}

async fn discover_all(r: &Rancher) -> (Vec<DiscoveredObject>, DiscoverySummary) {
    let (tx, mut rx) = mpsc::channel(4);
    let collect = async {
        let mut all = Vec::new();
        while let Some(o) = rx.recv().await {
            all.push(o);
        }
        all
    };
    let (summary, all) = tokio::join!(r.discover(tx), collect);
    (all, summary.unwrap())
}

#[tokio::test]
async fn discovery_of_the_small_dataset_across_pages() {
    let sim = sim().await;
    let r = rancher_with(&sim, json!({"page_size": 2, "concurrency": 3}), None);
    admin_proven(&r).await;
    sim.sim.reset_stats();
    let (all, summary) = discover_all(&r).await;
    let of = |t: &str| all.iter().filter(|o| o.type_name() == t).count() as u64;
    assert_eq!(of("cluster"), 3);
    assert_eq!(of("project"), 6);
    assert_eq!(of("namespace"), 13);
    assert_eq!(of("global_role"), 6);
    assert_eq!(of("role_template"), 8);
    assert_eq!(of("user"), sim.sim.users().len() as u64);
    assert_eq!(of("binding"), sim.sim.bindings().len() as u64);
    assert_eq!(summary.objects, all.len() as u64);
    assert_eq!(summary.requests, sim.sim.stats().total);
    for t in [
        "cluster",
        "project",
        "namespace",
        "global_role",
        "role_template",
        "user",
        "binding",
    ] {
        assert_eq!(summary.counts.get(t).copied(), Some(of(t)), "{t}");
    }
    // No duplicates across pages.
    let mut keys: Vec<_> = all.iter().map(|o| serde_json::to_string(o).unwrap()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), all.len());
    // Shapes.
    let find = |id: &str| {
        all.iter()
            .find(|o| serde_json::to_value(o).unwrap()["id"] == id)
            .unwrap()
            .clone()
    };
    assert!(
        matches!(find("c-7x2k9"), DiscoveredObject::Cluster { labels, .. } if labels.get("env").map(String::as_str) == Some("prod"))
    );
    assert!(matches!(find("c-7x2k9:p-x4m7q"), DiscoveredObject::Project { cluster_id, .. } if cluster_id == "c-7x2k9"));
    assert!(
        matches!(find("c-7x2k9:payments-api"), DiscoveredObject::Namespace { project_id: Some(p), .. } if p == "c-7x2k9:p-x4m7q")
    );
    assert!(matches!(
        find("c-7x2k9:kube-system"),
        DiscoveredObject::Namespace { project_id: None, .. }
    ));
    assert!(
        matches!(find("rt-lock1"), DiscoveredObject::RoleTemplate { locked: true, context, .. } if context == "cluster")
    );
    assert!(matches!(find("u-alice1"), DiscoveredObject::User { username: Some(u), .. } if u == "alice"));
    assert!(
        matches!(find(&external_user_id("github_user://4242")), DiscoveredObject::User { username: None, principal_ids, .. } if principal_ids == vec!["github_user://4242".to_string()])
    );
    assert!(
        matches!(find("p-abcde:prtb-b0b01"), DiscoveredObject::Binding { scope: BindingScope::Project, resource_id, user_id: Some(u), .. } if resource_id == "c-7x2k9:p-abcde" && u == "u-bob01")
    );
    assert!(
        matches!(find("c-7x2k9:crtb-grp01"), DiscoveredObject::Binding { scope: BindingScope::Cluster, group_principal_id: Some(g), .. } if g == "github_team://777")
    );
    assert!(
        matches!(find("grb-admin"), DiscoveredObject::Binding { scope: BindingScope::Global, resource_id, .. } if resource_id == "global")
    );
    // Page size 5000 (the default): one page per collection.
    let big = rancher(&sim);
    let (_, summary) = discover_all(&big).await;
    assert_eq!(summary.requests, 7 + 1 + 3, "8 collections + 3 clusters' namespaces");
    sim.stop().await;
}

#[tokio::test]
async fn discovery_skips_an_unavailable_cluster_and_stops_when_the_receiver_goes() {
    let sim = sim().await;
    let r = rancher_with(&sim, json!({"concurrency": 1}), None);
    // Unavailable through its one retry (a cluster's namespaces are tried twice at most).
    sim.sim.fail_next_on("GET /v3/cluster/{id}/namespaces", 2, 503, false);
    let (all, summary) = discover_all(&r).await;
    assert_eq!(summary.skipped_clusters.len(), 1, "{summary:?}");
    let skipped = &summary.skipped_clusters[0];
    assert!(skipped.reason.contains("503"), "{}", skipped.reason);
    let flag = |id: &str| {
        all.iter().find_map(|o| match o {
            DiscoveredObject::Cluster {
                id: c,
                namespaces_listed,
                ..
            } if c == id => Some(*namespaces_listed),
            _ => None,
        })
    };
    assert_eq!(flag(&skipped.id), Some(false), "the skipped cluster says so");
    assert_eq!(all.iter().filter(|o| o.type_name() == "cluster").count(), 3);
    let ns: Vec<_> = all
        .iter()
        .filter_map(|o| match o {
            DiscoveredObject::Namespace { cluster_id, .. } => Some(cluster_id.as_str()),
            _ => None,
        })
        .collect();
    assert!(ns.len() < 13 && !ns.is_empty(), "{ns:?}");
    assert!(!ns.contains(&skipped.id.as_str()), "{ns:?}");
    // A dropped receiver ends discovery early, with Ok.
    let (tx, mut rx) = mpsc::channel(1);
    let reader = tokio::spawn(async move {
        let first = rx.recv().await;
        drop(rx);
        first
    });
    let summary = r.discover(tx).await.unwrap();
    assert!(reader.await.unwrap().is_some());
    assert!(summary.objects < 40, "{summary:?}");
    sim.stop().await;
}

#[tokio::test]
async fn paging_survives_a_marker_restart() {
    let sim = sim().await;
    for i in 0..5 {
        sim.sim
            .add_binding(planted(&format!("grb-x{i}"), "user", "global", "u-alice1"))
            .unwrap();
    }
    // Sorted ids: grb-admin grb-al1ce | grb-b0b01 grb-x0 | grb-x1 grb-x2 | grb-x3 grb-x4
    let r = rancher_with(&sim, json!({"page_size": 2}), None);
    let mut pager = r
        .client()
        .list::<model::Binding>(&["v3", "globalrolebindings"], &[], "global role bindings");
    let mut ids: Vec<String> = pager
        .next_page()
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    ids.extend(pager.next_page().await.unwrap().unwrap().into_iter().map(|b| b.id));
    // The next page's marker (grb-x1) is deleted: Rancher restarts at item 0.
    assert!(sim.sim.remove_binding("grb-x1"));
    let mut pages = 0;
    while let Some(page) = pager.next_page().await.unwrap() {
        ids.extend(page.into_iter().map(|b| b.id));
        pages += 1;
        assert!(pages < 20, "a loop");
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no item twice: {ids:?}");
    for id in ["grb-admin", "grb-x0", "grb-x2", "grb-x3", "grb-x4"] {
        assert!(ids.iter().any(|i| i == id), "{id} missing: {ids:?}");
    }
    sim.stop().await;
}

/// A server whose `next` always leads back to the same page: the pager must stop, with an error
/// the job retries (on a busy install a later listing converges).
#[tokio::test]
async fn paging_that_never_converges_stops_with_a_retryable_error() {
    use axum::Router;
    use axum::extract::State;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/v3/users",
            get(|State((base, hits)): State<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)>| async move {
                hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                axum::Json(json!({
                    "type": "collection",
                    "data": [{"id": "u-a", "username": "a"}, {"id": "u-b", "username": "b"}],
                    "pagination": {"partial": true, "limit": 2, "next": format!("{base}/v3/users?limit=2&marker=u-c")},
                }))
            }),
        )
        .with_state((base.clone(), hits.clone()));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let config = RancherConfig::from_value(&json!({"host": base, "page_size": 2})).unwrap();
    let key = ApiKey::from_secret(&secret(&[("token", "token-x:y")])).unwrap();
    let r = Rancher::from_parts(config, key).unwrap();
    // A scripted server serves no admin proof: taken as proven (the proof has its own tests).
    r.remember_proof();
    let e = r
        .grant(&grant_req("nobody", "cluster-member", "c-1"))
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::Unavailable { .. }), "{e:?}");
    assert!(e.retryable());
    assert!(
        e.to_string().contains("users") && e.to_string().contains("did not converge"),
        "{e}"
    );
    assert!(hits.load(std::sync::atomic::Ordering::Relaxed) < 10);
    server.abort();
}

#[tokio::test]
async fn transient_faults_are_absorbed_without_duplicate_bindings() {
    let sim = sim().await;
    let r = rancher(&sim);
    // GETs answered 503 / 500 twice, then fine.
    sim.sim.fail_next_on("GET /v3/users", 2, 503, false);
    let g = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    assert_eq!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").len(), 1);
    r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();

    // A POST applied, then answered 500: the retry gets 409 AlreadyExists, which means done.
    for (role, resource) in [
        ("cluster-member", "c-7x2k9"),
        ("project-member", "c-7x2k9:p-x4m7q"),
        ("clusters-create", "global"),
    ] {
        let route = match Resource::parse(resource).unwrap() {
            Resource::Global => "POST /v3/globalrolebindings",
            Resource::Cluster(_) => "POST /v3/clusterroletemplatebindings",
            Resource::Project(_) => "POST /v3/projectroletemplatebindings",
        };
        sim.sim.fail_next_on(route, 1, 500, true);
        let g2 = r.grant(&grant_req("bob", role, resource)).await.unwrap();
        let found = matching(&sim, Some("u-bob01"), role, resource);
        assert_eq!(found.len(), 1, "{role}: {found:?}");
        assert_eq!(g2.binding_ids, vec![found[0].id.clone()]);
    }
    // A DELETE applied, then answered 500: the retry's 404 means gone.
    sim.sim
        .fail_next_on("DELETE /v3/clusterroletemplatebindings/{id}", 1, 500, true);
    let g3 = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    assert_eq!(g3.binding_ids, g.binding_ids, "deterministic: the same name as before");
    let removed = r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    assert_eq!(removed.removed_binding_ids, g3.binding_ids);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    // Beyond the retries: a retryable error.
    sim.sim.fail_next(5, 500, false);
    let e = r
        .grant(&grant_req("bob", "cluster-member", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, IntegrationError::Unavailable { .. }) && e.retryable(),
        "{e:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn random_faults_converge_to_exactly_one_binding() {
    let sim = sim_with(SimOptions {
        faults: crate::sim::FaultOptions {
            error_rate: 0.3,
            after_commit_share: 0.5,
            ..crate::sim::FaultOptions::default()
        },
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    let resources = ["c-7x2k9", "local", "c-m-4bq8z2lp"];
    for resource in resources {
        let req = grant_req("bob", "cluster-owner", resource);
        // As the executor does: retry retryable failures.
        let mut tries = 0;
        loop {
            tries += 1;
            match r.grant(&req).await {
                Ok(_) => break,
                Err(e) if e.retryable() && tries < 10 => continue,
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    for resource in resources {
        assert_eq!(
            matching(&sim, Some("u-bob01"), "cluster-owner", resource).len(),
            1,
            "{resource}"
        );
    }
    sim.stop().await;
}

/// 2.11+ writes a CRTB's `status` after the 201 (Rancher's controllers), and `summary` only once
/// the downstream cluster applied it: a new binding with no summary is "not yet", read again
/// until `Completed`; one applied in Rancher but not on its cluster says so at the deadline; the
/// same holds for one found in place.
#[tokio::test]
async fn a_crtb_is_awaited_until_its_cluster_applied_it_then_reported() {
    let sim = sim_with(SimOptions {
        settle: Duration::from_millis(600),
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let (g, n) = counted(&sim, r.grant(&grant_req("bob", "cluster-member", "c-7x2k9"))).await;
    g.unwrap();
    assert!(
        n > 4,
        "read again until the downstream pass wrote summary ({n} requests)"
    );
    // Applied at once: the 201 still has no status, one GET sees `Completed`.
    sim.sim.set_settle(Duration::ZERO);
    let (_, n) = counted(&sim, r.grant(&grant_req("bob", "cluster-owner", "c-7x2k9"))).await;
    assert_eq!(n, 4, "lookup, listing, POST, GET");
    // The cluster's agent is away: applied in Rancher, never on the cluster within the wait.
    sim.sim.disconnect_cluster("c-7x2k9", true);
    let impatient = rancher_with(&sim, json!({"status_timeout_seconds": 1}), None);
    let e = impatient
        .grant(&grant_req("bob", "nodes-view", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, IntegrationError::InProgress { .. }) && e.retryable(),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("crtb-")
            && e.to_string()
                .contains("applied in Rancher, not yet on cluster c-7x2k9 (its agent may be disconnected"),
        "{e}"
    );
    // The job's retry finds the binding in place, but in place is not granted.
    let again = impatient
        .grant(&grant_req("bob", "nodes-view", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(matches!(again, IntegrationError::InProgress { .. }), "{again:?}");
    assert_eq!(matching(&sim, Some("u-bob01"), "nodes-view", "c-7x2k9").len(), 1);
    // Once the agent is back and the cluster applied it, the retry succeeds with that one
    // binding, from the listing.
    sim.sim.disconnect_cluster("c-7x2k9", false);
    let (g, n) = counted(&sim, impatient.grant(&grant_req("bob", "nodes-view", "c-7x2k9"))).await;
    let g = g.unwrap();
    assert_eq!(n, 2, "lookup + listing (which shows Completed)");
    assert!(
        e.to_string().contains(&g.binding_ids[0]),
        "{e} names {:?}",
        g.binding_ids
    );
    assert_eq!(matching(&sim, Some("u-bob01"), "nodes-view", "c-7x2k9").len(), 1);
    sim.stop().await;
}

/// Before 2.11 Rancher writes no binding status: existence is success (the version is read once
/// when a binding read back has none). A principal's user still arrives later.
#[tokio::test]
async fn before_2_11_existence_is_success_and_the_principals_user_is_awaited() {
    let sim = sim_with(SimOptions {
        version: RancherVersion::new(10),
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    // A CRTB read back without a status: the version is read, once.
    let (g, n) = counted(&sim, r.grant(&grant_req("bob", "cluster-owner", "c-7x2k9"))).await;
    assert_eq!(g.unwrap().binding_ids.len(), 1);
    assert_eq!(n, 5, "lookup, listing, POST, GET, server-version");
    // The version is known now: a new binding costs its POST and nothing more.
    let (g, n) = counted(&sim, r.grant(&grant_req("bob", "clusters-create", "global"))).await;
    g.unwrap();
    assert_eq!(n, 3, "lookup, listing, POST");
    // A PRTB never has a status, on any version: never read back.
    let (g, n) = counted(&sim, r.grant(&grant_req("bob", "project-owner", "c-7x2k9:p-abcde"))).await;
    g.unwrap();
    assert_eq!(n, 3, "lookup, listing, POST");
    // EnsureUser fills the principal's user in later: read back until it is there.
    let g = r
        .grant(&grant_req("github_user://6060", "cluster-member", "c-m-4bq8z2lp"))
        .await
        .unwrap();
    assert_eq!(g.user_id, external_user_id("github_user://6060"));
    sim.stop().await;
}

#[tokio::test]
async fn principals_the_key_cannot_resolve_get_a_hint() {
    let sim = sim_with(SimOptions {
        resolve_external_principals: false,
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    sim.sim.reset_stats();
    let e = r
        .grant(&grant_req("github_user://5151", "cluster-member", "c-7x2k9"))
        .await
        .unwrap_err();
    // Permanent until the key changes: a configuration error with the hint, not retried.
    assert!(matches!(e, IntegrationError::Config { .. }) && !e.retryable(), "{e:?}");
    assert!(
        e.to_string().contains("auth provider") && e.to_string().contains("github_user://5151"),
        "{e}"
    );
    assert_eq!(sim.sim.stats().route("POST /v3/clusterroletemplatebindings"), 1);
    sim.stop().await;
}

/// The large dataset (10,000 users, 50,000 bindings, 200 clusters) in pages of 5000.
#[tokio::test]
#[ignore = "large: run with --ignored"]
async fn discovery_of_the_large_dataset() {
    let sim = sim_with(SimOptions {
        size: crate::sim::DatasetSize::Large,
        ..SimOptions::default()
    })
    .await;
    let r = rancher(&sim);
    let started = std::time::Instant::now();
    let (all, summary) = discover_all(&r).await;
    eprintln!("{summary:?} in {:?}", started.elapsed());
    assert_eq!(
        all.iter().filter(|o| o.type_name() == "user").count(),
        sim.sim.users().len()
    );
    assert_eq!(
        all.iter().filter(|o| o.type_name() == "binding").count(),
        sim.sim.bindings().len()
    );
    sim.stop().await;
}

/// Kubernetes answers a create whose name is held by an object being deleted (a revoke's
/// finalizers still running) with 409 "object is being deleted: ... already exists". That is not
/// "already granted": the grant waits for the old binding to go, then creates it.
#[tokio::test]
async fn a_grant_waits_for_a_binding_still_being_removed() {
    use axum::Router;
    use axum::extract::State;
    use axum::routing::get;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let posts = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/v3/users",
            get(|| async { axum::Json(json!({"data": [{"id": "u-bob01", "username": "bob"}]})) }),
        )
        .route(
            "/v3/clusterroletemplatebindings/{id}",
            get(|axum::extract::Path(id): axum::extract::Path<String>| async move {
                axum::Json(json!({
                    "id": id, "clusterId": "c-1", "roleTemplateId": "cluster-member", "userId": "u-bob01",
                    "status": {"summary": "Completed"},
                }))
            }),
        )
        .route(
            "/v3/clusterroletemplatebindings",
            get(|| async { axum::Json(json!({"data": []})) }).post(|State(posts): State<Arc<AtomicU64>>, body: axum::Json<Value>| async move {
                let name = body["name"].as_str().unwrap_or_default().to_string();
                if posts.fetch_add(1, Ordering::Relaxed) < 2 {
                    let message = format!(
                        "object is being deleted: clusterroletemplatebindings.management.cattle.io \"{name}\" already exists"
                    );
                    return (
                        axum::http::StatusCode::CONFLICT,
                        axum::Json(json!({"type": "error", "status": 409, "code": "AlreadyExists", "message": message})),
                    );
                }
                (
                    axum::http::StatusCode::CREATED,
                    axum::Json(json!({
                        "id": format!("c-1:{name}"), "name": name, "clusterId": "c-1",
                        "roleTemplateId": "cluster-member", "userId": "u-bob01",
                    })),
                )
            }),
        )
        .with_state(posts.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = ApiKey::from_secret(&secret(&[("token", "token-x:y")])).unwrap();
    let r = Rancher::from_parts(RancherConfig::from_value(&json!({"host": base})).unwrap(), key.clone()).unwrap();
    r.remember_proof();
    let g = r.grant(&grant_req("bob", "cluster-member", "c-1")).await.unwrap();
    assert_eq!(posts.load(Ordering::Relaxed), 3);
    assert!(g.binding_ids[0].starts_with("c-1:crtb-"), "{g:?}");
    // Still not gone within the wait: InProgress, retryable.
    posts.store(0, Ordering::Relaxed);
    let config = json!({"host": base, "status_timeout_seconds": 0});
    let r = Rancher::from_parts(RancherConfig::from_value(&config).unwrap(), key).unwrap();
    r.remember_proof();
    let e = r.grant(&grant_req("bob", "cluster-member", "c-1")).await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::InProgress { .. }) && e.to_string().contains("being removed"),
        "{e:?}"
    );
    server.abort();
}

#[tokio::test]
async fn a_binding_still_being_removed_is_awaited_then_reported_in_progress() {
    let sim = sim().await;
    let r = rancher_with(&sim, json!({"status_timeout_seconds": 1}), None);
    // Finalizers run a little while: the revoke waits for the 404.
    sim.sim.set_removal_delay(Duration::from_millis(300));
    let g = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    let removed = r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    assert_eq!(removed.removed_binding_ids, g.binding_ids);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    // They run longer than the wait: not done, retryable, naming the binding.
    sim.sim.set_removal_delay(Duration::from_secs(30));
    let g = r.grant(&grant_req("bob", "cluster-owner", "c-7x2k9")).await.unwrap();
    let mut rv = revoke_req("bob", "cluster-owner", "c-7x2k9");
    rv.user_id = Some("u-bob01".into());
    rv.binding_ids = g.binding_ids.clone();
    let e = r.revoke(&rv).await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::InProgress { .. }) && e.retryable(),
        "{e:?}"
    );
    assert!(e.to_string().contains(&g.binding_ids[0]), "{e}");
    // Discovery skips a binding on its way out.
    let (all, _) = discover_all(&r).await;
    assert!(
        !all.iter()
            .any(|o| serde_json::to_value(o).unwrap()["id"] == g.binding_ids[0].as_str())
    );
    sim.stop().await;
}

#[tokio::test]
async fn revoke_by_recorded_id_while_listings_come_back_empty() {
    let sim = sim().await;
    let r = rancher(&sim);
    let mut req = grant_req("bob", "cluster-member", "c-7x2k9");
    req.grant_id = Some("acc-1".into());
    let g = r.grant(&req).await.unwrap();
    admin_proven(&r).await;
    // A lagging informer: every listing of users and bindings is empty.
    sim.sim
        .empty_lists_on("GET /v3/clusterroletemplatebindings", usize::MAX);
    sim.sim.empty_lists_on("GET /v3/users", usize::MAX);
    let mut rv = revoke_req("bob", "cluster-member", "c-7x2k9");
    rv.grant_id = req.grant_id.clone();
    rv.user_id = Some(g.user_id.clone());
    rv.binding_ids = g.binding_ids.clone();
    let out = r.revoke(&rv).await.unwrap();
    assert_eq!(out.removed_binding_ids, g.binding_ids);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    sim.sim.clear_list_faults();
    sim.stop().await;
}

#[tokio::test]
async fn revoke_of_a_user_hidden_from_lists_uses_the_recorded_user() {
    let sim = sim().await;
    let r = rancher(&sim);
    let g = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    admin_proven(&r).await;
    // The user is filtered out of `/v3/users`: a lookup by name would find nothing.
    sim.sim.hide_from_lists("u-bob01");
    // Only the user was recorded (a grant from before binding ids were kept): the listing by
    // `userId` still finds the connector's binding.
    let mut rv = revoke_req("bob", "cluster-member", "c-7x2k9");
    rv.user_id = Some(g.user_id.clone());
    let (out, n) = counted(&sim, r.revoke(&rv)).await;
    let out = out.unwrap();
    assert_eq!(
        sim.sim.stats().route("GET /v3/users"),
        0,
        "never looked up by name ({n} requests)"
    );
    assert_eq!(out.removed_binding_ids, g.binding_ids);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    sim.stop().await;
}

/// A DELETE that Rancher accepts while the binding stays, not being removed (a webhook or a
/// controller that put it back): never success.
#[tokio::test]
async fn a_binding_still_readable_after_its_delete_is_a_retryable_error() {
    use axum::Router;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let binding = json!({
        "id": "c-1:crtb-stays", "name": "crtb-stays", "clusterId": "c-1", "roleTemplateId": "cluster-member",
        "userId": "u-bob01", "labels": {CREATED_BY_LABEL: "apono-connector"},
    });
    let app = Router::new()
        .route(
            "/v3/users",
            get(|| async { axum::Json(json!({"data": [{"id": "user-admin1", "username": "admin", "me": true}]})) }),
        )
        .route(
            "/v3/globalrolebindings",
            get(|| async {
                axum::Json(json!({"data": [{"id": "grb-admin", "globalRoleId": "admin", "userId": "user-admin1"}]}))
            }),
        )
        .route(
            "/v3/clusterroletemplatebindings/{id}",
            get({
                let b = binding.clone();
                move || async move { axum::Json(b) }
            })
            .delete({
                let b = binding.clone();
                move || async move { axum::Json(b) }
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = ApiKey::from_secret(&secret(&[("token", "token-x:y")])).unwrap();
    let r = Rancher::from_parts(RancherConfig::from_value(&json!({"host": base})).unwrap(), key).unwrap();
    let mut rv = revoke_req("bob", "cluster-member", "c-1");
    rv.user_id = Some("u-bob01".into());
    rv.binding_ids = vec!["c-1:crtb-stays".into()];
    let e = r.revoke(&rv).await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::Unavailable { .. }) && e.retryable(),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("c-1:crtb-stays") && e.to_string().contains("still there"),
        "{e}"
    );
    server.abort();
}

#[tokio::test]
async fn a_key_whose_owner_is_not_an_admin_is_refused_and_nothing_is_trusted() {
    let sim = sim().await;
    let r = rancher(&sim);
    let g = r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    sim.sim.set_key_owner_admin(false);
    let e = r.validate().await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::PermissionDenied { .. }) && !e.retryable(),
        "{e:?}"
    );
    assert!(e.to_string().contains("not an admin"), "{e}");
    let mut rv = revoke_req("bob", "cluster-member", "c-7x2k9");
    rv.user_id = Some("u-bob01".into());
    rv.binding_ids = g.binding_ids.clone();
    for e in [
        r.revoke(&rv).await.unwrap_err(),
        r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9"))
            .await
            .unwrap_err(),
        r.sweep(&SweepRequest::default()).await.unwrap_err(),
        r.discover(mpsc::channel(10).0).await.unwrap_err(),
    ] {
        assert_eq!(e.code(), "permission_denied", "{e:?}");
        assert!(!e.retryable());
    }
    assert_eq!(
        matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").len(),
        1,
        "the binding stays"
    );
    // Made an admin again: a failed proof was not cached.
    sim.sim.set_key_owner_admin(true);
    assert_eq!(r.revoke(&rv).await.unwrap().removed_binding_ids, g.binding_ids);
    sim.stop().await;
}

#[tokio::test]
async fn the_last_revoke_disables_an_agent_created_user_and_the_next_grant_enables_it() {
    let sim = sim().await;
    let r = rancher(&sim);
    let enabled = |id: &str| sim.sim.users().into_iter().find(|u| u.id == id).map(|u| u.enabled);
    let mut a = grant_req("quinn", "cluster-member", "c-7x2k9");
    a.create_user = true;
    let ga = r.grant(&a).await.unwrap();
    let mut b = grant_req("quinn", "project-member", "c-7x2k9:p-x4m7q");
    b.create_user = true;
    let gb = r.grant(&b).await.unwrap();
    assert!(ga.managed_user && gb.managed_user);
    let revoke = |req: &GrantRequest, g: &GrantResult| {
        let mut rv = revoke_req("quinn", &req.role, req.resource.as_str());
        rv.user_id = Some(g.user_id.clone());
        rv.binding_ids = g.binding_ids.clone();
        rv
    };
    // One access left: still enabled.
    let out = r.revoke(&revoke(&a, &ga)).await.unwrap();
    assert!(out.managed_user && !out.user_disabled, "{out:?}");
    assert_eq!(enabled(&ga.user_id), Some(true));
    // The last: disabled; its login binding stays (the user is kept for rotation and cleanup).
    let out = r.revoke(&revoke(&b, &gb)).await.unwrap();
    assert!(out.managed_user && out.user_disabled, "{out:?}");
    assert_eq!(out.user_id.as_deref(), Some(ga.user_id.as_str()));
    assert_eq!(enabled(&ga.user_id), Some(false));
    assert_eq!(matching(&sim, Some(&ga.user_id), "user-base", "global").len(), 1);
    // The next grant enables it again, with working credentials.
    let g = r.grant(&a).await.unwrap();
    assert_eq!(enabled(&ga.user_id), Some(true));
    let password = g.credentials.unwrap().password.expose_secret().to_string();
    assert!(sim.sim.check_password(&ga.user_id, &password));
    // A person's user is never disabled.
    let g = r.grant(&grant_req("alice", "cluster-member", "c-7x2k9")).await.unwrap();
    let mut rv = revoke_req("alice", "cluster-member", "c-7x2k9");
    rv.binding_ids = g.binding_ids.clone();
    let out = r.revoke(&rv).await.unwrap();
    assert!(!out.managed_user && !out.user_disabled);
    assert_eq!(enabled("u-alice1"), Some(true));
    sim.stop().await;
}

#[tokio::test]
async fn the_sweep_removes_only_the_connectors_expired_bindings_not_kept() {
    let sim = sim().await;
    let r = rancher(&sim);
    let cli = Owner::cli();
    let other = Owner::new("standalone", "other-install").unwrap();
    let past = Utc::now() - chrono::Duration::minutes(5);
    let future = Utc::now() + chrono::Duration::hours(1);
    let plant = |b: SimBinding| {
        sim.sim.add_binding(b.clone()).unwrap();
        b.id
    };
    let exp01 = plant(connector_binding(
        &cli,
        "cluster-member",
        "c-7x2k9",
        "u-bob01",
        Some("acc-1"),
        Some(past),
    ));
    let exp02 = plant(connector_binding(
        &cli,
        "project-member",
        "c-7x2k9:p-abcde",
        "u-alice1",
        None,
        Some(past),
    ));
    let kep01 = plant(connector_binding(
        &cli,
        "cluster-owner",
        "c-7x2k9",
        "u-bob01",
        Some("acc-2"),
        Some(past),
    ));
    let fut01 = plant(connector_binding(
        &cli,
        "cluster-owner",
        "c-7x2k9",
        "u-alice1",
        Some("acc-3"),
        Some(future),
    ));
    let login = plant(connector_binding(&cli, "user-base", "global", "u-bob01", None, None));
    // Another connector's, expired by its own marker: no live access of it needs it.
    let theirs = plant(connector_binding(
        &other,
        "cluster-member",
        "local",
        "u-alice1",
        Some("acc-9"),
        Some(past),
    ));
    // A build before owners: its name, its label, no owner.
    let old = plant(legacy_binding(
        "cluster-member",
        "local",
        "u-bob01",
        Some("acc-0"),
        Some(past),
    ));
    let mut unreadable = connector_binding(&cli, "project-owner", "c-7x2k9:p-abcde", "u-bob01", None, None);
    unreadable
        .annotations
        .insert(EXPIRES_AT_ANNOTATION.into(), "tomorrow".into());
    let unreadable = plant(unreadable);
    // A person's binding, expired by its look: no label, never touched.
    let mut person = planted("local:crtb-per01", "cluster-owner", "local", "u-alice1");
    person
        .annotations
        .insert(EXPIRES_AT_ANNOTATION.into(), format_expiry(past));
    let person = plant(person);
    // A copy of an expired connector binding under another name (D11): never the connector's.
    let mut copy = connector_binding(&cli, "cluster-member", "c-7x2k9", "u-bob01", Some("acc-1"), Some(past));
    copy.id = "c-7x2k9:crtb-keep-forever".into();
    copy.name = "crtb-keep-forever".into();
    let copy = plant(copy);
    let keep = SweepRequest {
        keep_binding_ids: vec![kep01.clone()],
        dry_run: true,
        ..SweepRequest::default()
    };
    let before = sim.sim.bindings().len();
    let dry = r.sweep(&keep).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(sim.sim.bindings().len(), before, "a dry run removes nothing");
    let ids = |res: &SweepResult| {
        let mut ids = res.removed.iter().map(|b| b.id.clone()).collect::<Vec<_>>();
        ids.sort();
        ids
    };
    let mut expect = vec![exp01.clone(), exp02.clone(), theirs.clone(), old.clone()];
    expect.sort();
    assert_eq!(ids(&dry), expect);
    let real = r.sweep(&SweepRequest { dry_run: false, ..keep }).await.unwrap();
    assert_eq!(ids(&real), ids(&dry));
    assert_eq!(real.kept_binding_ids, vec![kep01.clone()]);
    assert!(real.rancher_time.is_some());
    let first = real.removed.iter().find(|b| b.id == exp01).unwrap();
    assert_eq!(
        (
            first.scope,
            first.role_id.as_str(),
            first.resource_id.as_str(),
            first.subject.as_str(),
            first.reason
        ),
        (
            BindingScope::Cluster,
            "cluster-member",
            "c-7x2k9",
            "u-bob01",
            SweptReason::Expired
        )
    );
    assert_eq!(first.grant_id.as_deref(), Some("acc-1"));
    assert_eq!(first.expires_at.map(|t| t.timestamp()), Some(past.timestamp()));
    let left: Vec<String> = sim.sim.bindings().into_iter().map(|b| b.id).collect();
    for gone in &expect {
        assert!(!left.contains(gone), "{gone}");
    }
    for kept in [&kep01, &fut01, &login, &unreadable, &person, &copy] {
        assert!(left.contains(kept), "{kept}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_failed_delete_does_not_stop_the_sweep() {
    let sim = sim().await;
    let r = rancher(&sim);
    let past = Utc::now() - chrono::Duration::minutes(5);
    let mut ids = Vec::new();
    for user in ["u-bob01", "u-alice1"] {
        let b = connector_binding(&Owner::cli(), "cluster-member", "c-7x2k9", user, None, Some(past));
        ids.push(b.id.clone());
        sim.sim.add_binding(b).unwrap();
    }
    admin_proven(&r).await;
    // The first DELETE fails through the client's retries.
    sim.sim.fail_next_on(
        "DELETE /v3/clusterroletemplatebindings/{id}",
        FAST_RETRY.attempts,
        500,
        false,
    );
    let e = r.sweep(&SweepRequest::default()).await.unwrap_err();
    assert!(e.retryable(), "{e:?}");
    let left: Vec<String> = sim.sim.bindings().into_iter().map(|b| b.id).collect();
    let (failed, done): (Vec<&String>, Vec<&String>) = ids.iter().partition(|i| left.contains(i));
    assert_eq!((failed.len(), done.len()), (1, 1), "one failed, the other was removed");
    assert!(e.to_string().contains(failed[0].as_str()), "{e}");
    // The next sweep finishes.
    let out = r.sweep(&SweepRequest::default()).await.unwrap();
    assert_eq!(out.removed.len(), 1);
    sim.stop().await;
}

/// Ids that would change the request (`..` dropped by the URL builder, `/`, `?`, `%`) are
/// refused before any request reaches Rancher, whichever way they come in.
#[tokio::test]
async fn hostile_ids_make_no_request() {
    let sim = sim().await;
    let r = rancher(&sim);
    let before = sim.sim.stats().total;
    for id in [
        "..",
        ".",
        "u-x/../../clusters",
        "u-x?action=setpassword",
        "local%2F..",
        "",
    ] {
        let e = r
            .rotate_credentials(&RotateRequest { user_id: id.into() })
            .await
            .unwrap_err();
        assert!(
            matches!(e, IntegrationError::Invalid { .. }) && !e.retryable(),
            "{id:?}: {e:?}"
        );
        let e = r
            .delete_user(&DeleteUserRequest { user_id: id.into() })
            .await
            .unwrap_err();
        assert!(matches!(e, IntegrationError::Invalid { .. }), "{id:?}: {e:?}");
    }
    assert_eq!(sim.sim.stats().total, before, "no request reached Rancher");
    sim.stop().await;
}

/// The same ids in job params are refused when the params are read, naming the field.
#[test]
fn hostile_ids_in_params_are_refused() {
    for id in ["c-x/../../users", "c-x?userId=y", "local%2F..", "..", "c-x:..", "C-X"] {
        let e = Resource::parse(id).unwrap_err();
        assert!(e.contains("resource"), "{e}");
        let e =
            serde_json::from_value::<GrantRequest>(json!({"user": "bob", "role": "cluster-member", "resource": id}))
                .unwrap_err();
        assert!(e.to_string().contains("resource"), "{e}");
        let e = serde_json::from_value::<RevokeRequest>(
            json!({"user": "bob", "role": "r", "resource": "c-1", "binding_ids": [id]}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("binding_ids"), "{e}");
        let e = serde_json::from_value::<RevokeRequest>(
            json!({"user": "bob", "role": "r", "resource": "c-1", "user_id": id}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("user_id"), "{e}");
        let e = serde_json::from_value::<RotateRequest>(json!({"user_id": id})).unwrap_err();
        assert!(e.to_string().contains("user_id"), "{e}");
        let e = serde_json::from_value::<SweepRequest>(json!({"keep_binding_ids": [id]})).unwrap_err();
        assert!(e.to_string().contains("keep_binding_ids"), "{e}");
    }
    let ok: RevokeRequest = serde_json::from_value(json!({
        "user": "bob", "role": "r", "resource": "c-1:p-2", "user_id": "u-bob01",
        "binding_ids": ["c-1:crtb-x", "p-2:prtb-y", "grb-z"],
    }))
    .unwrap();
    assert_eq!(ok.binding_ids.len(), 3);
}

/// A server (Rancher behind a WAF or proxy) that echoes the request body in a 422: the
/// generated password never reaches the error.
#[tokio::test]
async fn a_password_echoed_in_a_422_is_scrubbed() {
    use axum::Router;
    use axum::routing::{get, post};
    let sent = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route(
            "/v3/users/{id}",
            get(|| async {
                axum::Json(
                    json!({"id": "u-new01", "username": "newbie", "labels": {CREATED_BY_LABEL: "apono-connector"}}),
                )
            })
            .post({
                let sent = sent.clone();
                move |body: String| async move {
                    *sent.lock().unwrap() = body.clone();
                    (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        axum::Json(json!({
                            "type": "error", "status": 422, "code": "InvalidBodyContent",
                            "message": format!("invalid body: {body}"),
                        })),
                    )
                }
            }),
        )
        .route("/v3/users", post(|| async { StatusCode::NOT_FOUND }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = ApiKey::from_secret(&secret(&[("token", "token-x:y")])).unwrap();
    let r = Rancher::from_parts(RancherConfig::from_value(&json!({"host": base})).unwrap(), key).unwrap();
    let e = r
        .rotate_credentials(&RotateRequest {
            user_id: "u-new01".into(),
        })
        .await
        .unwrap_err();
    let body = sent.lock().unwrap().clone();
    let password = serde_json::from_str::<Value>(&body).unwrap()["newPassword"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(password.len(), 32, "{body}");
    let text = format!("{e} {e:?}");
    assert!(
        text.contains("invalid body") && text.contains("[REDACTED]"),
        "the echo is kept, scrubbed: {text}"
    );
    assert!(!text.contains(&password), "the password leaked: {text}");
    server.abort();
}
